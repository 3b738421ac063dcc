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
//! - **Consistent reads.** A load runs in a `REPEATABLE READ` transaction: if a new snapshot replaces
//!   the one being read, MVCC keeps the old chunks visible to that reader until it finishes.
//! - **Checked.** The header keeps the size, the chunk count and a CRC-32 of the whole blob; a load
//!   verifies all three.
//! - Only the lease holder writes snapshots; pass its [`Fence`] so a stale holder cannot.

use std::time::SystemTime;

use deadpool_postgres::Pool;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::{ClusterError, Fence, advisory_xact_lock};

pub const MIGRATIONS: &[(&str, &str)] = &[(
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
pub const CHUNK_SIZE: usize = 8 << 20;

/// A stored snapshot's header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotMeta {
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
pub struct SharedSnapshot {
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
    pub fn new(pool: Pool, origin: impl Into<String>) -> Self {
        Self {
            pool,
            origin: origin.into(),
            chunk_size: CHUNK_SIZE,
        }
    }

    /// Changes the chunk size (tests; the default suits production).
    pub fn with_chunk_size(mut self, chunk_size: usize) -> Self {
        self.chunk_size = chunk_size.max(1);
        self
    }

    /// Stores the blob read from `source` as the snapshot including change-log seq `seq`, replacing
    /// every older one in the same transaction. `None` if a snapshot with a higher seq is already
    /// stored (nothing changed).
    pub async fn store(
        &self,
        seq: i64,
        mut source: impl AsyncRead + Unpin,
        fence: Option<&Fence>,
    ) -> Result<Option<SnapshotMeta>, ClusterError> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        if let Some(fence) = fence {
            fence.check(&tx).await?;
        }
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
        tx.execute("DELETE FROM cluster_snapshots WHERE id <> $1", &[&id])
            .await?;
        tx.commit().await?;
        Ok(Some(meta(&row)))
    }

    /// The latest snapshot's header, if any.
    pub async fn latest(&self) -> Result<Option<SnapshotMeta>, ClusterError> {
        let client = self.pool.get().await?;
        let row = client
            .query_opt(
                &format!(
                    "SELECT {META_COLUMNS} FROM cluster_snapshots ORDER BY seq DESC, id DESC LIMIT 1"
                ),
                &[],
            )
            .await?;
        Ok(row.as_ref().map(meta))
    }

    /// Writes the latest snapshot into `sink`, chunk by chunk, and returns its header (`None`, with
    /// nothing written, if there is none). Verifies size, chunk count and CRC-32.
    pub async fn load_latest(
        &self,
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
                    "SELECT {META_COLUMNS} FROM cluster_snapshots ORDER BY seq DESC, id DESC LIMIT 1"
                ),
                &[],
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
    pub async fn load_latest_bytes(&self) -> Result<Option<(SnapshotMeta, Vec<u8>)>, ClusterError> {
        let mut buf = Vec::new();
        Ok(self.load_latest(&mut buf).await?.map(|m| (m, buf)))
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
