//! The latest index snapshot, shared so a new replica starts from it instead of warming up from
//! Zendesk (DESIGN §8 "One index, many copies").
//!
//! A snapshot is an opaque blob (the index's own snapshot format, tens to hundreds of MB at 1M–5M
//! customers) plus the change-log seq it includes. A new replica loads the latest one and then
//! subscribes to the change log after that seq ([`super::ChangeLog::subscribe`]).
//!
//! - **Streamed in chunks.** The blob is read from an `AsyncRead` and stored as rows of
//!   `chunk_size` bytes (8 MiB by default) in `cluster_snapshot_chunks`, one `INSERT` per chunk, so
//!   neither side ever holds more than a chunk in a message; loading writes chunk by chunk into an
//!   `AsyncWrite`. The column is `STORAGE EXTERNAL` (no pglz pass: the blob is dense already).
//! - **Atomic.** Header, chunks and the deletion of older snapshots are one transaction: readers see
//!   the old snapshot whole until commit, then the new one whole; a failed or interrupted store leaves
//!   nothing. Stores are serialised by an advisory lock, and one whose seq is below the latest
//!   stored one is refused (`Ok(None)`), so the shared snapshot never goes back in time.
//! - **Two kept.** A store keeps the previous snapshot ([`KEEP`]) and deletes older ones, so a
//!   replica that finds the newest damaged can start from the one before (the change log is kept
//!   back to it). A snapshot found damaged is deleted ([`SharedSnapshot::discard`]).
//! - **Consistent reads.** A load runs in a `REPEATABLE READ` transaction: if a new snapshot replaces
//!   the one being read, MVCC keeps the old chunks visible to that reader until it finishes.
//! - **Checked.** The header keeps the size, the chunk count and a CRC-32 of the whole blob; a load
//!   verifies all three.
//! - Only the lease holder writes snapshots; pass its [`Fence`] so a stale holder cannot. The fence
//!   is checked just before commit (see [`super::lease`] on why fenced transactions stay short).
//! - Cost: a store writes the blob once to the table and once to the WAL; a 500 MB index in one
//!   transaction is fine for PostgreSQL, but schedule stores minutes apart, not per change.

use std::time::SystemTime;

use deadpool_postgres::Pool;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::{ClusterError, Fence, advisory_xact_lock};

pub(crate) const MIGRATIONS: &[(&str, &str)] = &[(
    "cluster_0004_snapshot",
    "CREATE TABLE IF NOT EXISTS cluster_snapshots (
        id         bigserial PRIMARY KEY,
        seq        bigint NOT NULL,
        size       bigint NOT NULL,
        chunks     integer NOT NULL,
        crc32      bigint NOT NULL,
        origin     text NOT NULL,
        created_at timestamptz NOT NULL DEFAULT clock_timestamp()
    );
    CREATE TABLE IF NOT EXISTS cluster_snapshot_chunks (
        snapshot_id bigint NOT NULL REFERENCES cluster_snapshots (id) ON DELETE CASCADE,
        idx         integer NOT NULL,
        data        bytea NOT NULL,
        PRIMARY KEY (snapshot_id, idx)
    );
    ALTER TABLE cluster_snapshot_chunks ALTER COLUMN data SET STORAGE EXTERNAL;",
)];

/// The default chunk: large enough for few round trips, small enough for one message in memory.
pub(crate) const CHUNK_SIZE: usize = 8 << 20;

/// Snapshots kept: the newest and the one before it, so a replica that finds the newest damaged
/// starts from the previous one plus the log after it (which is pruned only behind the oldest kept
/// snapshot, see [`super::ChangeLog::prune_to_snapshot`]).
pub(crate) const KEEP: i64 = 2;

/// A stored snapshot's header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SnapshotMeta {
    pub id: i64,
    /// The newest change-log seq the snapshot includes.
    pub seq: i64,
    pub size: u64,
    pub chunks: i32,
    pub crc32: u32,
    pub origin: String,
    pub created_at: SystemTime,
}

/// The shared snapshot store.
#[derive(Clone)]
pub(crate) struct SharedSnapshot {
    pool: Pool,
    origin: String,
    chunk_size: usize,
}

impl std::fmt::Debug for SharedSnapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedSnapshot")
            .field("origin", &self.origin)
            .field("chunk_size", &self.chunk_size)
            .finish_non_exhaustive()
    }
}

const META_COLUMNS: &str = "id, seq, size, chunks, crc32, origin, created_at";

fn meta(row: &tokio_postgres::Row) -> SnapshotMeta {
    SnapshotMeta {
        id: row.get(0),
        seq: row.get(1),
        size: row.get::<_, i64>(2) as u64,
        chunks: row.get(3),
        crc32: row.get::<_, i64>(4) as u32,
        origin: row.get(5),
        created_at: row.get(6),
    }
}

impl SharedSnapshot {
    pub(crate) fn new(pool: Pool, origin: impl Into<String>) -> Self {
        Self {
            pool,
            origin: origin.into(),
            chunk_size: CHUNK_SIZE,
        }
    }

    /// Changes the chunk size (tests; the default suits production).
    #[cfg(test)]
    pub(crate) fn with_chunk_size(mut self, chunk_size: usize) -> Self {
        self.chunk_size = chunk_size.max(1);
        self
    }

    /// Stores the blob read from `source` as the snapshot including change-log seq `seq`, replacing
    /// every older one in the same transaction. `None` if a snapshot with a higher seq is already
    /// stored (nothing changed).
    pub(crate) async fn store(
        &self,
        seq: i64,
        mut source: impl AsyncRead + Unpin,
        fence: Option<&Fence>,
    ) -> Result<Option<SnapshotMeta>, ClusterError> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        advisory_xact_lock(&tx, "snapshot").await?;
        let newest: Option<i64> = tx
            .query_one("SELECT max(seq) FROM cluster_snapshots", &[])
            .await?
            .get(0);
        if newest.is_some_and(|n| n > seq) {
            return Ok(None);
        }
        let id: i64 = tx
            .query_one(
                "INSERT INTO cluster_snapshots (seq, size, chunks, crc32, origin)
                 VALUES ($1, 0, 0, 0, $2) RETURNING id",
                &[&seq, &self.origin],
            )
            .await?
            .get(0);
        let insert = tx
            .prepare(
                "INSERT INTO cluster_snapshot_chunks (snapshot_id, idx, data) VALUES ($1, $2, $3)",
            )
            .await?;
        let mut crc = crc32fast::Hasher::new();
        let (mut size, mut chunks) = (0u64, 0i32);
        let mut buf = vec![0u8; self.chunk_size];
        loop {
            let n = fill(&mut source, &mut buf).await?;
            if n == 0 {
                break;
            }
            let chunk = &buf[..n];
            crc.update(chunk);
            tx.execute(&insert, &[&id, &chunks, &chunk]).await?;
            size += n as u64;
            chunks += 1;
        }
        let row = tx
            .query_one(
                &format!(
                    "UPDATE cluster_snapshots SET size = $2, chunks = $3, crc32 = $4 WHERE id = $1
                     RETURNING {META_COLUMNS}"
                ),
                &[&id, &(size as i64), &chunks, &i64::from(crc.finalize())],
            )
            .await?;
        // The previous one stays (a fallback if this one turns out damaged); older ones go.
        tx.execute(
            "DELETE FROM cluster_snapshots WHERE id NOT IN (
                 SELECT id FROM cluster_snapshots ORDER BY seq DESC, id DESC LIMIT $1)",
            &[&KEEP],
        )
        .await?;
        // The fence is checked last: its share lock on the lease row would otherwise hold up our
        // own renewals for the whole (seconds-long) upload. It only has to hold at commit.
        if let Some(fence) = fence {
            fence.check(&tx).await?;
        }
        tx.commit().await?;
        Ok(Some(meta(&row)))
    }

    /// The latest snapshot's header, if any.
    pub(crate) async fn latest(&self) -> Result<Option<SnapshotMeta>, ClusterError> {
        Ok(self.list().await?.into_iter().next())
    }

    /// The stored snapshots' headers, newest first (at most [`KEEP`]).
    pub(crate) async fn list(&self) -> Result<Vec<SnapshotMeta>, ClusterError> {
        let client = self.pool.get().await?;
        let rows = client
            .query(
                &format!("SELECT {META_COLUMNS} FROM cluster_snapshots ORDER BY seq DESC, id DESC"),
                &[],
            )
            .await?;
        Ok(rows.iter().map(meta).collect())
    }

    /// Writes the latest snapshot into `sink`, chunk by chunk, and returns its header (`None`, with
    /// nothing written, if there is none). Verifies size, chunk count and CRC-32.
    #[cfg(test)]
    pub(crate) async fn load_latest(
        &self,
        sink: impl AsyncWrite + Unpin,
    ) -> Result<Option<SnapshotMeta>, ClusterError> {
        self.load_where(None, sink).await
    }

    /// [`Self::load_latest`] for the snapshot `id`: `None`, with nothing written, if it is gone
    /// (replaced since it was listed).
    pub(crate) async fn load(
        &self,
        id: i64,
        sink: impl AsyncWrite + Unpin,
    ) -> Result<Option<SnapshotMeta>, ClusterError> {
        self.load_where(Some(id), sink).await
    }

    async fn load_where(
        &self,
        id: Option<i64>,
        mut sink: impl AsyncWrite + Unpin,
    ) -> Result<Option<SnapshotMeta>, ClusterError> {
        let mut client = self.pool.get().await?;
        let tx = client
            .build_transaction()
            .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await?;
        let Some(row) = tx
            .query_opt(
                &format!(
                    "SELECT {META_COLUMNS} FROM cluster_snapshots WHERE $1::bigint IS NULL OR id = $1
                     ORDER BY seq DESC, id DESC LIMIT 1"
                ),
                &[&id],
            )
            .await?
        else {
            return Ok(None);
        };
        let meta = meta(&row);
        let chunk = tx
            .prepare("SELECT data FROM cluster_snapshot_chunks WHERE snapshot_id = $1 AND idx = $2")
            .await?;
        let mut crc = crc32fast::Hasher::new();
        let mut size = 0u64;
        for idx in 0..meta.chunks {
            let Some(row) = tx.query_opt(&chunk, &[&meta.id, &idx]).await? else {
                return Err(ClusterError::CorruptSnapshot {
                    id: meta.id,
                    reason: format!("chunk {idx} of {} missing", meta.chunks),
                });
            };
            let data: &[u8] = row.get(0);
            crc.update(data);
            size += data.len() as u64;
            sink.write_all(data).await?;
        }
        sink.flush().await?;
        tx.commit().await?;
        let crc = crc.finalize();
        if size != meta.size || crc != meta.crc32 {
            return Err(ClusterError::CorruptSnapshot {
                id: meta.id,
                reason: format!(
                    "read {size} bytes with CRC {crc:08x}, header says {} with {:08x}",
                    meta.size, meta.crc32
                ),
            });
        }
        Ok(Some(meta))
    }

    /// [`Self::load_latest`] into memory.
    #[cfg(test)]
    pub(crate) async fn load_latest_bytes(
        &self,
    ) -> Result<Option<(SnapshotMeta, Vec<u8>)>, ClusterError> {
        let mut buf = Vec::new();
        Ok(self.load_latest(&mut buf).await?.map(|m| (m, buf)))
    }

    /// [`Self::load`] into memory.
    pub(crate) async fn load_bytes(
        &self,
        id: i64,
    ) -> Result<Option<(SnapshotMeta, Vec<u8>)>, ClusterError> {
        let mut buf = Vec::new();
        Ok(self.load(id, &mut buf).await?.map(|m| (m, buf)))
    }

    /// Deletes snapshot `id`, found damaged ([`ClusterError::CorruptSnapshot`]): useless to every
    /// replica, and once it is gone the follower stores a fresh one (see `crate::replica`).
    /// Returns whether it was still there.
    pub(crate) async fn discard(&self, id: i64) -> Result<bool, ClusterError> {
        let client = self.pool.get().await?;
        let n = client
            .execute("DELETE FROM cluster_snapshots WHERE id = $1", &[&id])
            .await?;
        Ok(n > 0)
    }
}

/// Reads until `buf` is full or the source ends; returns the bytes read.
async fn fill(source: &mut (impl AsyncRead + Unpin), buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match source.read(&mut buf[n..]).await? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::{io::AsyncWriteExt as _, time::Instant};

    use super::*;
    use crate::cluster::{
        changelog::{ChangeLog, SubscriberConfig},
        testing::migrated,
    };

    /// Deterministic incompressible bytes (xorshift), fast enough in a debug build.
    fn blob(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        let mut out = Vec::with_capacity(len + 8);
        while out.len() < len {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            out.extend_from_slice(&x.to_le_bytes());
        }
        out.truncate(len);
        out
    }

    async fn count(db: &crate::pg::testing::TestSchema, table: &str) -> i64 {
        let client = db.pool_of(1).get().await.unwrap();
        client
            .query_one(&format!("SELECT count(*) FROM {table}"), &[])
            .await
            .unwrap()
            .get(0)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn round_trip_of_a_50_mb_blob_in_8_mib_chunks() {
        let Some(db) = migrated().await else {
            return;
        };
        let store = SharedSnapshot::new(db.pool_of(2), "replica-a");
        let data = blob(50 << 20, 7);
        let t = Instant::now();
        let meta = store.store(42, &data[..], None).await.unwrap().unwrap();
        let stored_in = t.elapsed();
        assert_eq!(
            (meta.seq, meta.size, meta.chunks),
            (42, data.len() as u64, 7)
        );
        let largest: i32 = db
            .pool_of(1)
            .get()
            .await
            .unwrap()
            .query_one("SELECT max(length(data)) FROM cluster_snapshot_chunks", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(largest as usize, CHUNK_SIZE);

        let t = Instant::now();
        let (loaded, bytes) = store.load_latest_bytes().await.unwrap().unwrap();
        let loaded_in = t.elapsed();
        assert_eq!(loaded, meta);
        assert!(bytes == data, "the loaded snapshot differs");
        println!(
            "shared snapshot: 50 MiB stored in {stored_in:?} ({:.0} MiB/s), loaded in {loaded_in:?} \
             ({:.0} MiB/s)",
            50.0 / stored_in.as_secs_f64(),
            50.0 / loaded_in.as_secs_f64()
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn replacement_is_atomic_for_readers_and_writers() {
        let Some(db) = migrated().await else {
            return;
        };
        let store = SharedSnapshot::new(db.pool_of(4), "replica-a").with_chunk_size(1024);
        assert!(store.latest().await.unwrap().is_none());
        assert!(store.load_latest_bytes().await.unwrap().is_none());
        let old = blob(10 * 1024, 1);
        let new = blob(12 * 1024 + 5, 2);
        let old_meta = store.store(10, &old[..], None).await.unwrap().unwrap();

        // A reader starts on the old snapshot and is held after its first chunk (the pipe is full).
        let (mut from_loader, to_reader) = tokio::io::duplex(1024);
        let loader = {
            let store = store.clone();
            tokio::spawn(async move { store.load_latest(to_reader).await })
        };
        let mut head = vec![0u8; 1024];
        from_loader.read_exact(&mut head).await.unwrap();
        assert_eq!(head, old[..1024]);

        // A writer streams the new snapshot and is held half-way.
        let (mut to_writer, from_source) = tokio::io::duplex(1024);
        let writer = {
            let store = store.clone();
            tokio::spawn(async move { store.store(20, from_source, None).await })
        };
        to_writer.write_all(&new[..6 * 1024]).await.unwrap();
        // Half a snapshot is never visible.
        assert_eq!(store.latest().await.unwrap().unwrap(), old_meta);
        assert_eq!(store.load_latest_bytes().await.unwrap().unwrap().1, old);

        // The writer finishes: the new snapshot replaces the old one at once, whole.
        to_writer.write_all(&new[6 * 1024..]).await.unwrap();
        drop(to_writer);
        let new_meta = writer.await.unwrap().unwrap().unwrap();
        assert_eq!(
            (new_meta.seq, new_meta.size, new_meta.chunks),
            (20, new.len() as u64, 13)
        );
        let (meta, bytes) = store.load_latest_bytes().await.unwrap().unwrap();
        assert_eq!((meta, bytes == new), (new_meta.clone(), true));
        // The previous one is kept as a fallback ([`KEEP`]).
        assert_eq!(count(&db, "cluster_snapshots").await, 2);
        assert_eq!(count(&db, "cluster_snapshot_chunks").await, 10 + 13);
        assert_eq!(
            store.list().await.unwrap(),
            vec![new_meta.clone(), old_meta.clone()]
        );

        // The reader that started before still gets the old snapshot, whole and verified.
        let mut rest = Vec::new();
        from_loader.read_to_end(&mut rest).await.unwrap();
        assert_eq!(loader.await.unwrap().unwrap().unwrap(), old_meta);
        head.extend(rest);
        assert!(head == old);

        // A store that fails mid-stream leaves nothing behind.
        let failing = tokio::io::AsyncReadExt::chain(&new[..3000], tokio_test_reader_error());
        assert!(matches!(
            store.store(30, failing, None).await,
            Err(ClusterError::Io(_))
        ));
        assert_eq!(store.latest().await.unwrap().unwrap(), new_meta);
        assert_eq!(count(&db, "cluster_snapshot_chunks").await, 10 + 13);
        // An older snapshot never replaces a newer one.
        assert!(store.store(15, &old[..], None).await.unwrap().is_none());
        assert_eq!(store.latest().await.unwrap().unwrap(), new_meta);
        // A third one: the oldest goes, the previous stays.
        let third = store.store(40, &old[..], None).await.unwrap().unwrap();
        assert_eq!(store.list().await.unwrap(), vec![third, new_meta]);
        assert_eq!(count(&db, "cluster_snapshot_chunks").await, 13 + 10);
    }

    /// A reader that fails at once.
    fn tokio_test_reader_error() -> impl AsyncRead + Unpin {
        struct Failing;
        impl AsyncRead for Failing {
            fn poll_read(
                self: std::pin::Pin<&mut Self>,
                _: &mut std::task::Context<'_>,
                _: &mut tokio::io::ReadBuf<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                std::task::Poll::Ready(Err(std::io::Error::other("disk gone")))
            }
        }
        Failing
    }

    #[tokio::test]
    async fn new_replica_loads_the_latest_snapshot_then_the_changes_after_it() {
        let Some(db) = migrated().await else {
            return;
        };
        // The follower: changes 1..=5, a snapshot that includes the first three, two more changes.
        let log = ChangeLog::new(db.pool_of(1), "follower");
        let mut seqs = Vec::new();
        for i in 0..5u8 {
            seqs.push(log.append(&[i], None).await.unwrap());
        }
        let snapshots = SharedSnapshot::new(db.pool_of(1), "follower");
        snapshots
            .store(seqs[2], &b"index through 3"[..], None)
            .await
            .unwrap()
            .unwrap();
        for i in 5..7u8 {
            seqs.push(log.append(&[i], None).await.unwrap());
        }
        // Changes covered by the snapshot can go.
        assert_eq!(log.prune_to_snapshot(Duration::ZERO).await.unwrap(), 3);

        // A new replica.
        let (meta, bytes) = SharedSnapshot::new(db.pool_of(1), "new")
            .load_latest_bytes()
            .await
            .unwrap()
            .unwrap();
        assert_eq!((meta.seq, &bytes[..]), (seqs[2], &b"index through 3"[..]));
        let mut sub = ChangeLog::new(db.pool_of(1), "new").subscribe(
            db.config(),
            meta.seq,
            SubscriberConfig::default(),
        );
        let mut got = Vec::new();
        for _ in 3..7 {
            let change = tokio::time::timeout(Duration::from_secs(10), sub.next())
                .await
                .expect("change not delivered")
                .unwrap()
                .unwrap();
            got.push((change.seq, change.payload[0]));
        }
        let want: Vec<_> = seqs[3..].iter().copied().zip(3u8..).collect();
        assert_eq!(got, want);
    }
}
