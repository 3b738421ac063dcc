//! The one queue abstraction the worker and the gRPC handlers use: [`JobStore`], over the embedded
//! SQLite [`Queue`] (one replica) or the shared [`PgQueue`] (several replicas, DESIGN §8).
//!
//! An enum rather than a trait object: two closed variants, async methods without boxing, and
//! every caller sees in one place where the two differ (leases and the spool exist only with
//! PostgreSQL).
//!
//! # The spool (PostgreSQL down)
//! With PostgreSQL, `ReportCall` must still accept while the database is unreachable. A report
//! whose enqueue fails with [`crate::pg::PgError::Unavailable`] goes into a local SQLite spool
//! (`data_dir/spool/queue.sqlite3`, the same durable file format as the embedded queue), and is
//! acknowledged once committed there. [`JobStore::forward_spool`] moves spooled reports into
//! PostgreSQL when it is back: insert (`ON CONFLICT (call_id) DO NOTHING`), then mark the spool row
//! done; a crash in between re-sends it, and the conflict makes that harmless. The worker only
//! ever claims from PostgreSQL, so a spooled report is synced once, after forwarding.
//!
//! While the spool holds reports, new reports go into it too, behind them (until the forwarder
//! finds it empty): the forwarder moves them in order, so a number's reports keep their order
//! through an outage, and a PostgreSQL that hangs rather than refuses costs one timeout, not one
//! per report.
//!
//! `duplicate` while spooling is as right as this replica can know: a `call_id` already in the
//! spool is a duplicate; one already in PostgreSQL (accepted before the outage, or by another
//! replica) cannot be seen and is answered `duplicate = false`. When such a report is forwarded,
//! PostgreSQL's copy wins (the first report wins) and the spooled one is dropped with a log line.
//! `GetCallStatus` answers `QUEUED` for a report still in this replica's spool; another replica
//! cannot see it (`NOT_FOUND`) until it is forwarded.

use std::{
    collections::BTreeMap,
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::{
    CallReport, CallStatus, SyncState,
    pg::{OwnColumn, PgQueue, PgQueueError},
    queue::{Job, Progress, Queue, QueueError},
};
use crate::phone::E164;

/// The spool's directory inside `storage.data_dir`.
pub(crate) const SPOOL_DIR: &str = "spool";

#[derive(Debug, thiserror::Error)]
pub(crate) enum StoreError {
    #[error(transparent)]
    Sqlite(#[from] QueueError),
    #[error(transparent)]
    Postgres(PgQueueError),
    #[error("another replica took over the job (its lease ran out)")]
    LeaseLost,
    #[error("queue row {call_id:?} is unreadable: {message}")]
    Corrupt { call_id: String, message: String },
}

impl From<PgQueueError> for StoreError {
    fn from(e: PgQueueError) -> Self {
        match e {
            PgQueueError::LeaseLost => StoreError::LeaseLost,
            PgQueueError::Corrupt { call_id, message } => StoreError::Corrupt { call_id, message },
            other => StoreError::Postgres(other),
        }
    }
}

impl StoreError {
    /// PostgreSQL cannot be reached right now (not a bug; it comes back).
    pub(crate) fn is_unavailable(&self) -> bool {
        matches!(self, StoreError::Postgres(PgQueueError::Pg(e)) if e.is_unavailable())
    }

    fn corrupt(e: QueueError) -> StoreError {
        match e {
            QueueError::Corrupt { call_id, message } => StoreError::Corrupt { call_id, message },
            other => StoreError::Sqlite(other),
        }
    }
}

type Result<T> = std::result::Result<T, StoreError>;

/// Cheap to clone.
#[derive(Clone, Debug)]
pub enum JobStore {
    Sqlite(Queue),
    Postgres(Arc<Shared>),
}

/// PostgreSQL with its local spool.
#[derive(Debug)]
pub struct Shared {
    pg: PgQueue,
    spool: Queue,
    /// Reports in the spool not yet forwarded (for the metric and to skip spool reads when 0).
    spooled: AtomicU64,
    /// Held while a report is spooled and while the forwarder decides the spool is empty, so
    /// "empty" is never declared with a report being added (which would let a later report of
    /// the same number overtake it into PostgreSQL).
    spool_gate: tokio::sync::Mutex<()>,
    /// Wakes the forwarder after a report was spooled.
    spool_notify: Notify,
}

impl From<Queue> for JobStore {
    fn from(q: Queue) -> Self {
        JobStore::Sqlite(q)
    }
}

impl JobStore {
    /// PostgreSQL with its spool in `data_dir/spool`.
    pub(crate) async fn postgres(pg: PgQueue, data_dir: &Path) -> Result<Self> {
        let spool = Queue::open(&data_dir.join(SPOOL_DIR))?;
        // A spool left by a previous run is drained before new reports bypass it.
        let left = spool.counts().await?[&SyncState::Queued];
        Ok(JobStore::Postgres(Arc::new(Shared {
            pg,
            spool,
            spooled: AtomicU64::new(left),
            spool_gate: tokio::sync::Mutex::new(()),
            spool_notify: Notify::new(),
        })))
    }

    /// How often the holder of a claim must renew it; `None` when claims need no lease (SQLite).
    pub(crate) fn renew_every(&self) -> Option<Duration> {
        match self {
            JobStore::Sqlite(_) => None,
            JobStore::Postgres(s) => Some(s.pg.lease() / 3),
        }
    }

    /// The longest the worker may sleep without looking at the queue: other replicas enqueue and
    /// finish jobs without waking this one, so PostgreSQL is polled often.
    pub(crate) fn max_idle(&self) -> Option<Duration> {
        match self {
            JobStore::Sqlite(_) => None,
            JobStore::Postgres(_) => Some(Duration::from_millis(500)),
        }
    }

    /// Stores the report; `true` when its `call_id` was already accepted (see the module doc
    /// for what is knowable while PostgreSQL is down). Returns only after a commit.
    pub(crate) async fn enqueue(&self, r: &CallReport) -> Result<bool> {
        match self {
            JobStore::Sqlite(q) => Ok(q.enqueue(r).await?),
            JobStore::Postgres(s) => {
                // While the spool holds reports, new ones queue behind them: the forwarder keeps
                // their order (so a number's reports stay in order), and a PostgreSQL that hangs
                // costs one timeout, not one per report.
                if s.spooled.load(Ordering::Acquire) > 0 {
                    return s.spool_report(r, "reports are waiting in the spool").await;
                }
                match s.pg.enqueue(r).await {
                    Ok(dup) => Ok(dup),
                    Err(PgQueueError::Pg(e)) if e.is_unavailable() => {
                        s.spool_report(r, &format!("PostgreSQL is unavailable: {e}"))
                            .await
                    }
                    Err(e) => Err(e.into()),
                }
            }
        }
    }

    pub(crate) async fn status(&self, call_id: &str) -> Result<Option<CallStatus>> {
        match self {
            JobStore::Sqlite(q) => Ok(q.status(call_id).await?),
            JobStore::Postgres(s) => {
                let found = s.pg.status(call_id).await;
                if let Ok(Some(st)) = found {
                    return Ok(Some(st));
                }
                match s.spool.status(call_id).await? {
                    // Waiting in the spool: accepted, not yet in the shared queue.
                    Some(st) if st.state != SyncState::Done => Ok(Some(CallStatus {
                        state: SyncState::Queued,
                        attempts: 0,
                        last_error: String::new(),
                        next_attempt_at: None,
                        ..st
                    })),
                    // Forwarded between the two reads: PostgreSQL has it now.
                    Some(_) => Ok(s.pg.status(call_id).await?),
                    None => Ok(found?),
                }
            }
        }
    }

    /// Jobs per state, every state present (for metrics).
    pub(crate) async fn counts(&self) -> Result<BTreeMap<SyncState, u64>> {
        match self {
            JobStore::Sqlite(q) => Ok(q.counts().await?),
            JobStore::Postgres(s) => Ok(s.pg.counts().await?),
        }
    }

    /// Folds the PostgreSQL job counters' pending changes (see `sync::pg`, "Counts per state");
    /// returns how many. SQLite's triggers update its counters in place: nothing to fold.
    pub(crate) async fn compact_counts(&self) -> Result<u64> {
        match self {
            JobStore::Sqlite(_) => Ok(0),
            JobStore::Postgres(s) => Ok(s.pg.compact_counts().await?),
        }
    }

    /// Deletes finished jobs last changed before `before_ms` (`storage.retention_days`).
    pub(crate) async fn purge_finished(&self, before_ms: i64) -> Result<u64> {
        match self {
            JobStore::Sqlite(q) => Ok(q.purge_finished(before_ms).await?),
            JobStore::Postgres(s) => Ok(s.pg.purge_finished(before_ms).await?),
        }
    }

    /// Reports waiting in the local spool (0 without PostgreSQL).
    pub(crate) async fn spooled(&self) -> Result<u64> {
        match self {
            JobStore::Sqlite(_) => Ok(0),
            JobStore::Postgres(s) => {
                let c = s.spool.counts().await?;
                Ok(c[&SyncState::Queued] + c[&SyncState::InProgress])
            }
        }
    }

    pub(crate) async fn claim(&self) -> Result<Option<Job>> {
        match self {
            JobStore::Sqlite(q) => q.claim().await.map_err(StoreError::corrupt),
            JobStore::Postgres(s) => Ok(s.pg.claim().await?),
        }
    }

    /// Extends the claim's lease (no-op in SQLite); [`StoreError::LeaseLost`] if it is gone.
    pub(crate) async fn renew(&self, job: &Job) -> Result<()> {
        match self {
            JobStore::Sqlite(_) => Ok(()),
            JobStore::Postgres(s) => Ok(s.pg.renew(job).await?),
        }
    }

    pub(crate) async fn save_progress(&self, job: &Job, p: &Progress) -> Result<()> {
        match self {
            JobStore::Sqlite(q) => Ok(q.save_progress(job.seq, p).await?),
            JobStore::Postgres(s) => Ok(s.pg.save_progress(job, p).await?),
        }
    }

    pub(crate) async fn finish(&self, job: &Job) -> Result<()> {
        match self {
            JobStore::Sqlite(q) => Ok(q.finish(job.seq).await?),
            JobStore::Postgres(s) => Ok(s.pg.finish(job).await?),
        }
    }

    pub(crate) async fn fail(&self, job: &Job, error: String) -> Result<()> {
        match self {
            JobStore::Sqlite(q) => Ok(q.fail(job.seq, error).await?),
            JobStore::Postgres(s) => Ok(s.pg.fail(job, error).await?),
        }
    }

    pub(crate) async fn retry_at(&self, job: &Job, at_ms: i64, error: String) -> Result<()> {
        match self {
            JobStore::Sqlite(q) => Ok(q.retry_at(job.seq, at_ms, error).await?),
            JobStore::Postgres(s) => Ok(s.pg.retry_at(job, at_ms, error).await?),
        }
    }

    pub(crate) async fn release(&self, job: &Job) -> Result<()> {
        match self {
            JobStore::Sqlite(q) => Ok(q.release(job.seq).await?),
            JobStore::Postgres(s) => Ok(s.pg.release(job).await?),
        }
    }

    pub(crate) async fn next_due_ms(&self) -> Result<Option<i64>> {
        match self {
            JobStore::Sqlite(q) => Ok(q.next_due_ms().await?),
            JobStore::Postgres(s) => Ok(s.pg.next_due_ms().await?),
        }
    }

    /// The user this deployment created for `phone`.
    pub(crate) async fn own_user(&self, phone: E164) -> Result<Option<i64>> {
        match self {
            JobStore::Sqlite(q) => Ok(q.own_user(phone).await?),
            JobStore::Postgres(s) => Ok(s.pg.own_user(phone).await?),
        }
    }

    pub(crate) async fn remember_user(&self, phone: E164, user_id: i64) -> Result<()> {
        match self {
            JobStore::Sqlite(q) => Ok(q.remember_user(phone, user_id).await?),
            JobStore::Postgres(s) => Ok(s.pg.remember(OwnColumn::User, phone, user_id).await?),
        }
    }

    /// Records an organization or ticket this deployment created for `phone`, so the number's
    /// next job finds it on any replica. SQLite needs no record: one process, one index, and
    /// the index has every write of this process.
    pub(crate) async fn remember_organization(&self, phone: E164, id: i64) -> Result<()> {
        match self {
            JobStore::Sqlite(_) => Ok(()),
            JobStore::Postgres(s) => Ok(s.pg.remember(OwnColumn::Organization, phone, id).await?),
        }
    }

    pub(crate) async fn remember_ticket(&self, phone: E164, id: i64) -> Result<()> {
        match self {
            JobStore::Sqlite(_) => Ok(()),
            JobStore::Postgres(s) => Ok(s.pg.remember(OwnColumn::Ticket, phone, id).await?),
        }
    }

    /// The ticket this deployment last created for `phone` (PostgreSQL only).
    pub(crate) async fn own_ticket(&self, phone: E164) -> Result<Option<i64>> {
        match self {
            JobStore::Sqlite(_) => Ok(None),
            JobStore::Postgres(s) => Ok(s.pg.own_ticket(phone).await?),
        }
    }

    /// Moves spooled reports into PostgreSQL until `shutdown` (a no-op for SQLite). Each report
    /// is inserted, then marked done in the spool; the worker is woken (`on_forward`) after each.
    pub(crate) async fn forward_spool(
        self,
        shutdown: CancellationToken,
        on_forward: impl Fn() + Send + Sync,
    ) -> anyhow::Result<()> {
        let JobStore::Postgres(s) = self else {
            return Ok(());
        };
        let mut delay = Duration::from_millis(200);
        loop {
            let wait = match s.forward_one().await {
                Ok(true) => {
                    on_forward();
                    delay = Duration::from_millis(200);
                    continue;
                }
                Ok(false) => Duration::from_secs(5),
                Err(e) => {
                    tracing::warn!(error = %e, "spooled reports cannot be forwarded yet");
                    delay = (delay * 2).min(Duration::from_secs(2));
                    delay
                }
            };
            tokio::select! {
                () = s.spool_notify.notified() => {}
                () = tokio::time::sleep(wait) => {}
                () = shutdown.cancelled() => return Ok(()),
            }
        }
    }
}

impl Shared {
    /// Accepts `r` into the spool; `true` when the spool already has its `call_id`.
    async fn spool_report(&self, r: &CallReport, why: &str) -> Result<bool> {
        let _gate = self.spool_gate.lock().await;
        let dup = self.spool.enqueue(r).await?;
        if !dup {
            tracing::warn!(call_id = %r.call_id, why, "the report is spooled locally");
            self.spooled.fetch_add(1, Ordering::AcqRel);
            self.spool_notify.notify_one();
        }
        Ok(dup)
    }

    /// Forwards one spooled report; `false` when the spool is empty.
    async fn forward_one(&self) -> Result<bool> {
        let claimed = {
            let _gate = self.spool_gate.lock().await;
            let claimed = self.spool.claim().await.map_err(StoreError::corrupt)?;
            if claimed.is_none() {
                self.spooled.store(0, Ordering::Release);
            }
            claimed
        };
        let Some(job) = claimed else {
            return Ok(false);
        };
        match self.pg.enqueue(&job.report).await {
            Ok(dup) => {
                if dup {
                    tracing::warn!(call_id = %job.report.call_id, "a spooled report was already in PostgreSQL: the first report wins, the spooled one is dropped");
                } else {
                    tracing::info!(call_id = %job.report.call_id, "a spooled report moved to PostgreSQL");
                }
                self.spool.finish(job.seq).await?;
                Ok(true)
            }
            Err(e) => {
                self.spool.release(job.seq).await?;
                Err(e.into())
            }
        }
    }
}
