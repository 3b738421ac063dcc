//! The ordered log of index changes, delivered to every replica within a second (DESIGN §8).
//!
//! **Appending.** A change is opaque bytes (the index writer's postcard-encoded batch) with the
//! origin replica and, for the follower's changes, the lease epoch. [`ChangeLog::append`] runs one
//! transaction: check the [`Fence`] if any (which share-locks the lease row, see [`super::lease`]),
//! take the change log's advisory lock, insert (the `bigserial` allocates `seq`),
//! `pg_notify('deskline_changes', seq)`, commit. [`ChangeLog::append_in`] does the same inside a
//! caller's transaction, so a sync write and its index change commit together.
//!
//! **Why the lock: commit order = seq order.** With a bare `bigserial`, transaction A can draw seq 7,
//! B seq 8, and B commit first: a reader that saw 8 and moved its cursor past it would never see 7.
//! Waiting on gaps does not fix that safely, since a gap is also left forever by a rollback and a
//! reader cannot tell "slow" from "never". Holding a transaction-scoped advisory lock from before the
//! seq is drawn until commit makes appends one at a time, so a seq becomes visible only after every
//! lower one has committed or rolled back (PostgreSQL makes a commit visible before it releases the
//! transaction's locks). Every snapshot of the table therefore shows a complete prefix of the log,
//! and a reader simply reads `seq > last ORDER BY seq`. Holes left by rollbacks are never filled and
//! never needed. The cost is one append at a time per database (a commit, about a millisecond), far
//! above the rate of index change batches.
//!
//! **Delivery.** Each [`Subscription`] owns a dedicated connection (not from the pool: `LISTEN`
//! belongs to a session) that runs `LISTEN deskline_changes`, then reads the table after its last
//! delivered seq; afterwards it reads again on each notification (the payload is only a hint: a
//! notification for a seq already delivered, or from another schema of the same database, costs one
//! empty read), and on a periodic poll as a safety net. After a lost connection it reconnects with
//! backoff and, because notifications sent while it was away are lost, re-reads from the table
//! before waiting again. `LISTEN` always precedes the read, so a change committed in between is
//! either read or notified. Changes are yielded strictly in seq order, each once.
//!
//! **Pruning.** [`ChangeLog::prune_through`] deletes changes up to a seq covered by the oldest kept
//! shared snapshot and records that seq in `cluster_change_meta.pruned_through`. A reader that asks
//! for changes after a pruned seq gets [`ClusterError::Pruned`] (checked in the same statement as
//! the read, so it is consistent) and must reload the snapshot instead of silently skipping.

use std::time::{Duration, SystemTime};

use deadpool_postgres::Pool;
use futures_util::StreamExt;
use tokio::{
    sync::{mpsc, watch},
    task::JoinHandle,
};
use tokio_postgres::AsyncMessage;

use super::{ClusterError, Fence, advisory_xact_lock, from_secs, secs};

/// The `LISTEN/NOTIFY` channel; the payload is the appended seq.
pub(crate) const CHANNEL: &str = "deskline_changes";

pub(crate) const MIGRATIONS: &[(&str, &str)] = &[(
    "cluster_0003_changelog",
    "CREATE TABLE IF NOT EXISTS cluster_changes (
        seq        bigserial PRIMARY KEY,
        origin     text NOT NULL,
        epoch      bigint,
        created_at timestamptz NOT NULL DEFAULT clock_timestamp(),
        payload    bytea NOT NULL
    );
    CREATE TABLE IF NOT EXISTS cluster_change_meta (
        id             boolean PRIMARY KEY DEFAULT true CHECK (id),
        pruned_through bigint NOT NULL DEFAULT 0
    );
    INSERT INTO cluster_change_meta (id) VALUES (true) ON CONFLICT DO NOTHING;",
)];

/// One change of the index, as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Change {
    pub seq: i64,
    /// The replica that appended it.
    pub origin: String,
    /// The lease epoch it was appended under, for the follower's changes.
    pub epoch: Option<i64>,
    /// When it was appended (database clock).
    pub created_at: SystemTime,
    pub payload: Vec<u8>,
}

/// How far a replica is behind the log (for metrics).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ChangeLag {
    /// The newest seq in the log (0 if empty).
    pub newest_seq: i64,
    /// Changes after `applied` still to apply.
    pub behind: i64,
    /// Age of the oldest change not applied yet (zero if none).
    pub oldest_unapplied_age: Duration,
}

/// A subscription's state (for metrics).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct SubscriberStatus {
    pub connected: bool,
    /// Connections lost and re-made since the start.
    pub reconnects: u64,
    /// The last seq delivered to the consumer.
    pub delivered_seq: i64,
    /// When the last delivered change was appended (database clock).
    pub delivered_created_at: Option<SystemTime>,
}

/// Settings of a subscription.
#[derive(Debug, Clone)]
pub(crate) struct SubscriberConfig {
    /// Re-read the table this often even without a notification.
    pub poll_interval: Duration,
    /// First wait before reconnecting; doubles up to `max_backoff`.
    pub reconnect_backoff: Duration,
    pub max_backoff: Duration,
    /// Rows per read.
    pub batch: i64,
    /// Changes buffered ahead of the consumer.
    pub buffer: usize,
    /// A connect or read that takes longer counts as a lost connection (a silently dead TCP
    /// connection would otherwise stall the subscriber until the kernel's keepalive gives up).
    pub query_timeout: Duration,
}

impl Default for SubscriberConfig {
    fn default() -> Self {
        Self {
            poll_interval: Duration::from_secs(1),
            reconnect_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(5),
            batch: 256,
            buffer: 1024,
            query_timeout: Duration::from_secs(10),
        }
    }
}

/// The shared change log.
#[derive(Clone)]
pub(crate) struct ChangeLog {
    pool: Pool,
    origin: String,
}

impl std::fmt::Debug for ChangeLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChangeLog")
            .field("origin", &self.origin)
            .finish_non_exhaustive()
    }
}

const READ_SQL: &str = "SELECT m.pruned_through, c.seq, c.origin, c.epoch, c.created_at, c.payload
    FROM cluster_change_meta m
    LEFT JOIN LATERAL (
        SELECT * FROM cluster_changes WHERE seq > $1 ORDER BY seq LIMIT $2
    ) c ON true
    ORDER BY c.seq";

/// Reads up to `limit` changes after `after`, in order; [`ClusterError::Pruned`] if some of them
/// were pruned. One statement, so the prune mark and the rows come from one snapshot.
async fn read_after(
    client: &tokio_postgres::Client,
    after: i64,
    limit: i64,
) -> Result<Vec<Change>, ClusterError> {
    let rows = client.query(READ_SQL, &[&after, &limit]).await?;
    let mut out = Vec::with_capacity(rows.len());
    for row in rows {
        let pruned_through: i64 = row.get(0);
        if after < pruned_through {
            return Err(ClusterError::Pruned {
                after,
                pruned_through,
            });
        }
        let Some(seq) = row.get::<_, Option<i64>>(1) else {
            continue;
        };
        out.push(Change {
            seq,
            origin: row.get(2),
            epoch: row.get(3),
            created_at: row.get(4),
            payload: row.get(5),
        });
    }
    Ok(out)
}

impl ChangeLog {
    /// The log as seen by replica `origin`.
    pub(crate) fn new(pool: Pool, origin: impl Into<String>) -> Self {
        Self {
            pool,
            origin: origin.into(),
        }
    }

    /// Appends one change and notifies every subscriber; returns its seq once committed. With a
    /// `fence`, refused ([`ClusterError::Fenced`]) unless that lease epoch is current and live.
    pub(crate) async fn append(
        &self,
        payload: &[u8],
        fence: Option<&Fence>,
    ) -> Result<i64, ClusterError> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        let seq = Self::append_in(&tx, &self.origin, payload, fence).await?;
        tx.commit().await?;
        Ok(seq)
    }

    /// Appends within the caller's transaction (commit it soon: appends wait for it). The change
    /// and its notification take effect when that transaction commits.
    pub(crate) async fn append_in(
        tx: &tokio_postgres::Transaction<'_>,
        origin: &str,
        payload: &[u8],
        fence: Option<&Fence>,
    ) -> Result<i64, ClusterError> {
        if let Some(fence) = fence {
            fence.check(tx).await?;
        }
        advisory_xact_lock(tx, "changelog").await?;
        let row = tx
            .query_one(
                "WITH c AS (
                     INSERT INTO cluster_changes (origin, epoch, payload) VALUES ($1, $2, $3)
                     RETURNING seq)
                 SELECT seq, pg_notify($4, seq::text) FROM c",
                &[&origin, &fence.map(|f| f.epoch), &payload, &CHANNEL],
            )
            .await?;
        Ok(row.get(0))
    }

    #[cfg(test)]
    /// Up to `limit` changes after `after`, in seq order.
    pub(crate) async fn read_after(
        &self,
        after: i64,
        limit: i64,
    ) -> Result<Vec<Change>, ClusterError> {
        let client = self.pool.get().await?;
        read_after(&client, after, limit).await
    }

    /// One trivial round trip through the pool: whether PostgreSQL answers at all.
    pub(crate) async fn ping(&self) -> Result<(), ClusterError> {
        let client = self.pool.get().await?;
        client.query_one("SELECT 1", &[]).await?;
        Ok(())
    }

    /// The highest seq pruned so far (0 while the log is whole from its start).
    pub(crate) async fn pruned_through(&self) -> Result<i64, ClusterError> {
        let client = self.pool.get().await?;
        let row = client
            .query_one("SELECT pruned_through FROM cluster_change_meta", &[])
            .await?;
        Ok(row.get(0))
    }

    /// The newest committed seq (0 if the log is empty).
    pub(crate) async fn newest_seq(&self) -> Result<i64, ClusterError> {
        let client = self.pool.get().await?;
        let row = client
            .query_one("SELECT coalesce(max(seq), 0) FROM cluster_changes", &[])
            .await?;
        Ok(row.get(0))
    }

    /// How far a replica that applied everything through `applied` is behind.
    pub(crate) async fn lag(&self, applied: i64) -> Result<ChangeLag, ClusterError> {
        let client = self.pool.get().await?;
        let row = client
            .query_one(
                "SELECT coalesce((SELECT max(seq) FROM cluster_changes), 0),
                        (SELECT count(*) FROM cluster_changes WHERE seq > $1),
                        (SELECT extract(epoch FROM clock_timestamp() - created_at)::float8
                           FROM cluster_changes WHERE seq > $1 ORDER BY seq LIMIT 1)",
                &[&applied],
            )
            .await?;
        Ok(ChangeLag {
            newest_seq: row.get(0),
            behind: row.get(1),
            oldest_unapplied_age: from_secs(row.get::<_, Option<f64>>(2).unwrap_or(0.0)),
        })
    }

    /// Deletes changes through `seq` (a seq included in the newest shared snapshot) that are older
    /// than `min_age`, so a replica a little behind can still follow on without a reload. Returns the
    /// number deleted.
    pub(crate) async fn prune_through(
        &self,
        seq: i64,
        min_age: Duration,
    ) -> Result<u64, ClusterError> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        // The highest seq actually deleted becomes the mark; nothing newer than it goes.
        let row = tx
            .query_one(
                "WITH d AS (
                     DELETE FROM cluster_changes
                     WHERE seq <= $1 AND created_at < clock_timestamp() - make_interval(secs => $2)
                     RETURNING seq)
                 SELECT count(*), max(seq) FROM d",
                &[&seq, &secs(min_age)],
            )
            .await?;
        let deleted: i64 = row.get(0);
        if let Some(through) = row.get::<_, Option<i64>>(1) {
            tx.execute(
                "UPDATE cluster_change_meta SET pruned_through = greatest(pruned_through, $1)",
                &[&through],
            )
            .await?;
        }
        tx.commit().await?;
        Ok(deleted as u64)
    }

    /// Prunes through the seq of the oldest shared snapshot kept (see [`Self::prune_through`]):
    /// a replica that finds the newest snapshot damaged starts from the one before and needs the
    /// changes after it.
    pub(crate) async fn prune_to_snapshot(&self, min_age: Duration) -> Result<u64, ClusterError> {
        let seq = {
            let client = self.pool.get().await?;
            let row = client
                .query_one("SELECT coalesce(min(seq), 0) FROM cluster_snapshots", &[])
                .await?;
            row.get::<_, i64>(0)
        };
        self.prune_through(seq, min_age).await
    }

    /// Follows the log from after `after` on a dedicated connection made with `connect` (the same
    /// settings as the pool's, `search_path` included). Ends with a [`ClusterError::Pruned`] item if
    /// the changes it needs were pruned; connection failures are retried, not yielded.
    pub(crate) fn subscribe(
        &self,
        connect: crate::pg::Connect,
        after: i64,
        cfg: SubscriberConfig,
    ) -> Subscription {
        let (tx, rx) = mpsc::channel(cfg.buffer.max(1));
        let (status_tx, status) = watch::channel(SubscriberStatus {
            connected: false,
            reconnects: 0,
            delivered_seq: after,
            delivered_created_at: None,
        });
        let task = tokio::spawn(follow(connect, after, cfg, tx, status_tx));
        Subscription { rx, status, task }
    }
}

/// A replica's stream of changes; dropping it stops the follower task and closes its connection.
pub(crate) struct Subscription {
    rx: mpsc::Receiver<Result<Change, ClusterError>>,
    status: watch::Receiver<SubscriberStatus>,
    task: JoinHandle<()>,
}

impl std::fmt::Debug for Subscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscription")
            .field("status", &*self.status.borrow())
            .finish_non_exhaustive()
    }
}

impl Subscription {
    /// The next change in seq order; `None` only after the task stopped.
    pub(crate) async fn next(&mut self) -> Option<Result<Change, ClusterError>> {
        self.rx.recv().await
    }

    #[cfg(test)]
    pub(crate) fn status(&self) -> SubscriberStatus {
        self.status.borrow().clone()
    }

    #[cfg(test)]
    /// Watches the status (connected, reconnects, delivered seq).
    pub(crate) fn watch_status(&self) -> watch::Receiver<SubscriberStatus> {
        self.status.clone()
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Why one connection's session ended.
enum SessionEnd {
    /// The consumer went away or the log was pruned: stop for good.
    Stop,
    /// The connection failed: reconnect.
    Lost(ClusterError),
}

async fn follow(
    connect: crate::pg::Connect,
    mut last: i64,
    cfg: SubscriberConfig,
    out: mpsc::Sender<Result<Change, ClusterError>>,
    status: watch::Sender<SubscriberStatus>,
) {
    let mut backoff = cfg.reconnect_backoff;
    loop {
        match session(&connect, &mut last, &cfg, &out, &status, &mut backoff).await {
            SessionEnd::Stop => return,
            SessionEnd::Lost(e) => {
                tracing::warn!(error = %e, source = ?std::error::Error::source(&e), last_seq = last,
                    "change log connection lost; reconnecting and re-reading");
                status.send_modify(|s| {
                    s.connected = false;
                    s.reconnects += 1;
                });
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = out.closed() => return,
        }
        backoff = (backoff * 2).min(cfg.max_backoff);
    }
}

async fn session(
    connect: &crate::pg::Connect,
    last: &mut i64,
    cfg: &SubscriberConfig,
    out: &mpsc::Sender<Result<Change, ClusterError>>,
    status: &watch::Sender<SubscriberStatus>,
    backoff: &mut Duration,
) -> SessionEnd {
    let timed_out = || ClusterError::Io(std::io::Error::from(std::io::ErrorKind::TimedOut));
    let (client, mut conn) = match tokio::time::timeout(
        cfg.query_timeout,
        connect.config.connect(connect.tls.clone()),
    )
    .await
    {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => return SessionEnd::Lost(e.into()),
        Err(_) => return SessionEnd::Lost(timed_out()),
    };
    // Drive the connection, forwarding notifications; the channel closes when the connection does.
    let (notify_tx, mut notify_rx) = mpsc::unbounded_channel::<i64>();
    let driver = tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
        while let Some(msg) = messages.next().await {
            match msg {
                Ok(AsyncMessage::Notification(n)) if n.channel() == CHANNEL => {
                    // An unparsable payload still means "something changed": read anyway.
                    let seq = n.payload().parse().unwrap_or(i64::MAX);
                    if notify_tx.send(seq).is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::debug!(error = %e, "change log connection ended");
                    return;
                }
            }
        }
    });
    let _stop_driver = AbortOnDrop(driver);

    match tokio::time::timeout(
        cfg.query_timeout,
        client.batch_execute(&format!("LISTEN {CHANNEL}")),
    )
    .await
    {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return SessionEnd::Lost(e.into()),
        Err(_) => return SessionEnd::Lost(timed_out()),
    }
    status.send_modify(|s| s.connected = true);
    *backoff = cfg.reconnect_backoff;

    let mut poll = tokio::time::interval(cfg.poll_interval);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The first read (catch-up after connecting) happens at once: `interval` ticks immediately.
    loop {
        tokio::select! {
            biased;
            _ = out.closed() => return SessionEnd::Stop,
            n = notify_rx.recv() => match n {
                Some(seq) => {
                    // Coalesce a burst of notifications into one read.
                    let mut newest = seq;
                    while let Ok(s) = notify_rx.try_recv() {
                        newest = newest.max(s);
                    }
                    if newest <= *last {
                        continue;
                    }
                }
                None => {
                    // The driver ended: find out why through the client.
                    let probe = tokio::time::timeout(cfg.query_timeout, client.simple_query("SELECT 1"));
                    let e = match probe.await {
                        Ok(Err(e)) => e.into(),
                        Ok(Ok(_)) => ClusterError::Io(std::io::Error::other("notification stream ended")),
                        Err(_) => timed_out(),
                    };
                    return SessionEnd::Lost(e);
                }
            },
            _ = poll.tick() => {}
        }
        // Read everything after `last`, batch by batch.
        loop {
            let read =
                tokio::time::timeout(cfg.query_timeout, read_after(&client, *last, cfg.batch));
            let changes = match read.await {
                Ok(Ok(c)) => c,
                Ok(Err(e @ ClusterError::Pruned { .. })) => {
                    let _ = out.send(Err(e)).await;
                    return SessionEnd::Stop;
                }
                Ok(Err(e)) => return SessionEnd::Lost(e),
                Err(_) => return SessionEnd::Lost(timed_out()),
            };
            let n = changes.len() as i64;
            for change in changes {
                let (seq, created_at) = (change.seq, change.created_at);
                if out.send(Ok(change)).await.is_err() {
                    return SessionEnd::Stop;
                }
                *last = seq;
                status.send_modify(|s| {
                    s.delivered_seq = seq;
                    s.delivered_created_at = Some(created_at);
                });
            }
            if n < cfg.batch {
                break;
            }
        }
    }
}

struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use std::{collections::HashMap, sync::Arc};

    use tokio::time::Instant;

    use super::*;
    use crate::cluster::{
        lease::Lease,
        testing::{migrated, wait_for},
    };

    /// Notifications only: the safety-net poll never fires during a test.
    fn notify_only() -> SubscriberConfig {
        SubscriberConfig {
            poll_interval: Duration::from_secs(3600),
            ..SubscriberConfig::default()
        }
    }

    async fn next(sub: &mut Subscription) -> Change {
        tokio::time::timeout(Duration::from_secs(10), sub.next())
            .await
            .expect("no change delivered within 10 s")
            .expect("subscription ended")
            .expect("subscription failed")
    }

    fn percentile(sorted: &[Duration], p: f64) -> Duration {
        sorted[((sorted.len() - 1) as f64 * p).round() as usize]
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_subscribers_get_every_change_in_order_under_concurrent_appends() {
        let Some(db) = migrated().await else {
            return;
        };
        let (writers, each) = (4, 50);
        let log = ChangeLog::new(db.pool_of(1), "reader");
        let mut subs = [
            log.subscribe(db.config(), 0, notify_only()),
            log.subscribe(db.config(), 0, notify_only()),
        ];
        for sub in &subs {
            let status = sub.watch_status();
            wait_for("subscriber connected", Duration::from_secs(5), || {
                let connected = status.borrow().connected;
                async move { connected }
            })
            .await;
        }

        // Several writers, each on its own connection, appending concurrently.
        let started: Arc<parking_lot::Mutex<HashMap<i64, Instant>>> = Arc::default();
        let mut tasks = Vec::new();
        for w in 0..writers {
            let (log, started) = (
                ChangeLog::new(db.pool_of(1), format!("writer-{w}")),
                started.clone(),
            );
            tasks.push(tokio::spawn(async move {
                for i in 0..each {
                    let t = Instant::now();
                    let payload = [w as u8, i as u8];
                    let seq = log.append(&payload, None).await.unwrap();
                    started.lock().insert(seq, t);
                    // Spread the appends so that latency is measured on a live stream, not a
                    // burst that queues behind itself.
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }));
        }

        let mut deliveries: Vec<Vec<(Change, Instant)>> = vec![Vec::new(), Vec::new()];
        for _ in 0..writers * each {
            for (sub, got) in subs.iter_mut().zip(&mut deliveries) {
                let change = next(sub).await;
                got.push((change, Instant::now()));
            }
        }
        for t in tasks {
            t.await.unwrap();
        }
        let started = started.lock().clone();
        let mut appended: Vec<i64> = started.keys().copied().collect();
        appended.sort();
        assert_eq!(appended.len(), writers * each);

        let mut latencies = Vec::new();
        for got in &deliveries {
            let seqs: Vec<i64> = got.iter().map(|(c, _)| c.seq).collect();
            assert_eq!(
                seqs, appended,
                "a subscriber missed, repeated or reordered a change"
            );
            // Each writer's changes arrive in the order it appended them.
            let mut next_i = [0u8; 4];
            for (c, _) in got {
                let (w, i) = (c.payload[0] as usize, c.payload[1]);
                assert_eq!(i, next_i[w], "writer {w} out of order");
                next_i[w] += 1;
                assert_eq!(c.origin, format!("writer-{w}"));
            }
            latencies.extend(
                got.iter()
                    .map(|(c, at)| at.saturating_duration_since(started[&c.seq])),
            );
        }
        latencies.sort();
        let (p50, p99) = (percentile(&latencies, 0.5), percentile(&latencies, 0.99));
        println!(
            "change log: {} deliveries to 2 subscribers from {writers} writers, append→delivery \
             p50 {p50:?} p99 {p99:?} max {:?}",
            latencies.len(),
            latencies.last().unwrap()
        );
        assert!(p99 < Duration::from_secs(1), "p99 {p99:?}");

        // Metrics hooks.
        let newest = *appended.last().unwrap();
        assert_eq!(log.newest_seq().await.unwrap(), newest);
        for sub in &subs {
            assert_eq!(sub.status().delivered_seq, newest);
            assert!(sub.status().delivered_created_at.is_some());
        }
        let lag = log.lag(newest).await.unwrap();
        assert_eq!((lag.behind, lag.oldest_unapplied_age), (0, Duration::ZERO));
        let lag = log.lag(appended[9]).await.unwrap();
        assert_eq!(lag.behind, (appended.len() - 10) as i64);
        assert!(lag.oldest_unapplied_age > Duration::ZERO);
    }

    #[tokio::test]
    async fn reconnect_re_reads_what_was_appended_while_away() {
        let Some(db) = migrated().await else {
            return;
        };
        let log = ChangeLog::new(db.pool_of(2), "writer");
        let app = format!("deskline-sub-{:x}", rand::random::<u32>());
        let mut connect = db.config();
        connect.config.application_name(&app);
        let cfg = SubscriberConfig {
            reconnect_backoff: Duration::from_secs(1),
            ..notify_only()
        };
        let mut sub = log.subscribe(connect, 0, cfg);
        let first = log.append(b"one", None).await.unwrap();
        assert_eq!(next(&mut sub).await.seq, first);

        // Kill the subscriber's connection, then append while it is away: those notifications
        // are lost, and the poll never fires, so only the re-read after reconnecting finds them.
        let admin = db.pool_of(1);
        let killed: bool = admin
            .get()
            .await
            .unwrap()
            .query_one(
                "SELECT bool_or(pg_terminate_backend(pid)) FROM pg_stat_activity
                 WHERE application_name = $1",
                &[&app],
            )
            .await
            .unwrap()
            .get(0);
        assert!(killed);
        let status = sub.watch_status();
        wait_for("subscriber to notice", Duration::from_secs(5), || {
            let s = status.borrow().clone();
            async move { !s.connected && s.reconnects == 1 }
        })
        .await;
        let mut missed = Vec::new();
        for i in 0..5 {
            missed.push(
                log.append(format!("away {i}").as_bytes(), None)
                    .await
                    .unwrap(),
            );
        }
        assert!(
            !sub.status().connected,
            "reconnected before the appends: the test did not exercise the re-read"
        );
        for &seq in &missed {
            assert_eq!(next(&mut sub).await.seq, seq);
        }
        assert!(sub.status().connected);
        // And notifications work again on the new connection.
        let after = log.append(b"back", None).await.unwrap();
        assert_eq!(next(&mut sub).await.seq, after);
        assert_eq!(sub.status().reconnects, 1);
    }

    #[tokio::test]
    async fn fenced_append_and_prune() {
        let Some(db) = migrated().await else {
            return;
        };
        let ttl = Duration::from_secs(30);
        let a = Lease::new(db.pool_of(1), "follower", "a", ttl);
        let b = Lease::new(db.pool_of(1), "follower", "b", ttl);
        let log = ChangeLog::new(db.pool_of(1), "a");
        let fa = a.try_take().await.unwrap().unwrap();
        let s1 = log.append(b"x", Some(&fa)).await.unwrap();
        a.release().await.unwrap();
        let fb = b.try_take().await.unwrap().unwrap();
        assert!(matches!(
            log.append(b"stale", Some(&fa)).await,
            Err(ClusterError::Fenced { .. })
        ));
        let s2 = log.append(b"y", Some(&fb)).await.unwrap();
        let changes = log.read_after(0, 10).await.unwrap();
        assert_eq!(
            changes.iter().map(|c| (c.seq, c.epoch)).collect::<Vec<_>>(),
            vec![(s1, Some(fa.epoch)), (s2, Some(fb.epoch))],
            "the refused append left nothing"
        );

        // Pruning through s1: reading after s1 works, after 0 says "pruned".
        assert_eq!(log.prune_through(s1, Duration::ZERO).await.unwrap(), 1);
        assert_eq!(log.read_after(s1, 10).await.unwrap().len(), 1);
        assert!(matches!(
            log.read_after(0, 10).await,
            Err(ClusterError::Pruned { after: 0, pruned_through }) if pruned_through == s1
        ));
        // A subscription that starts too far back ends with the same error.
        let mut sub = log.subscribe(db.config(), 0, notify_only());
        let end = tokio::time::timeout(Duration::from_secs(5), sub.next())
            .await
            .unwrap();
        assert!(matches!(end, Some(Err(ClusterError::Pruned { .. }))));
        // Young changes are kept whatever the seq.
        assert_eq!(
            log.prune_through(s2, Duration::from_secs(3600))
                .await
                .unwrap(),
            0
        );
    }
}
