//! The durable job queue: one SQLite file (`queue.sqlite3` in `storage.data_dir`), WAL mode,
//! `synchronous=FULL`, so a committed report survives a crash or a power cut, and an operator can
//! read it with the `sqlite3` shell (`SELECT call_id, state, last_error FROM jobs`).
//!
//! One process owns the file (the embedded store of DESIGN §8; replicas would use PostgreSQL).
//! Every write goes through one connection behind a mutex, run on tokio's blocking pool: the
//! queue's throughput is bounded by fsyncs, not by lock contention, and one writer makes every
//! claim trivially serialisable. Reads that clients and Prometheus make (`GetCallStatus`, the
//! per-state counts) use a second, read-only connection: WAL lets a reader see the last commit
//! while the writer is inside its next one, so a status poll or a scrape never waits behind the
//! fsync of a `ReportCall`.
//!
//! # Counts per state
//! `job_counts` holds one row per state, kept by triggers in the same transaction as every insert,
//! state change and delete of a job: a scrape reads five rows instead of counting the history, and
//! the figures can never drift from the rows (they survive restarts with them).
//!
//! # Retention
//! `DONE` and `FAILED` jobs are deleted [`purge_finished`](Queue::purge_finished) once their last
//! change is older than `storage.retention_days`. Until then they answer `GetCallStatus` and keep
//! their `call_id` taken, so a report repeated within the window is answered `duplicate`; the window
//! is counted from the job's last change, which is never before its first report. Jobs not yet
//! finished are never deleted, however old.
//!
//! # A file deleted under us
//! With WAL, SQLite keeps writing to a database file that was unlinked (the data directory removed,
//! the file replaced): every report would be acknowledged as durable and then vanish at the next
//! start. Each write first checks that the path still names the file that was opened and fails
//! with [`QueueError::Gone`] otherwise, so `ReportCall` refuses and the worker stops the process.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::Arc,
};

use parking_lot::Mutex;
use rusqlite::{Connection, OpenFlags, OptionalExtension, TransactionBehavior, params};

use super::{CallReport, CallStatus, SyncState};
use crate::phone::E164;

/// The queue file inside the data directory.
pub(super) const QUEUE_FILE: &str = "queue.sqlite3";

/// A failure of the SQLite post-call queue.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// The data directory could not be created.
    #[error("cannot create the data directory {path}: {source}")]
    Dir {
        /// The directory that failed.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// SQLite failed (open, statement, transaction).
    #[error("queue database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// A stored job cannot be decoded.
    #[error("queue row {call_id:?} is unreadable: {message}")]
    Corrupt {
        /// The job's `call_id`.
        call_id: String,
        /// What failed to decode.
        message: String,
    },
    /// The blocking task running a queue operation panicked or was cancelled.
    #[error("queue task failed: {0}")]
    Task(String),
    /// The queue file was deleted or replaced under the open connection (see the module doc).
    #[error(
        "the queue file {path} was deleted or replaced while open: what is written now would be lost"
    )]
    Gone {
        /// The queue file.
        path: PathBuf,
    },
}

/// Cheap to clone: every clone shares the two connections.
#[derive(Clone)]
pub struct Queue {
    /// Every write, and the worker's own reads.
    conn: Arc<Mutex<Connection>>,
    /// Read-only: `status` and `counts`.
    reader: Arc<Mutex<Connection>>,
    path: Arc<PathBuf>,
    /// Identity of the file opened, to notice it being deleted or replaced.
    file: FileId,
}

/// What identifies an open file beyond its path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FileId {
    dev: u64,
    ino: u64,
}

impl FileId {
    #[cfg(unix)]
    fn of(path: &Path) -> std::io::Result<FileId> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(path)?;
        Ok(FileId {
            dev: m.dev(),
            ino: m.ino(),
        })
    }

    /// Elsewhere a deleted file is still noticed; a replaced one is not.
    #[cfg(not(unix))]
    fn of(path: &Path) -> std::io::Result<FileId> {
        std::fs::metadata(path).map(|_| FileId { dev: 0, ino: 0 })
    }
}

impl std::fmt::Debug for Queue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Queue").field("path", &self.path).finish()
    }
}

/// The recorded result of each step of a job. A step whose result is recorded is never repeated.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Progress {
    pub user_id: i64,
    pub organization_id: i64,
    pub ticket_id: i64,
    pub created_user: bool,
    pub created_organization: bool,
    pub created_ticket: bool,
    pub comment_added: bool,
    /// A comment was sent on a reused ticket and the answer was lost: check before sending again.
    pub comment_uncertain: bool,
    pub call_record_id: i64,
    /// The ticket-create body (JSON), persisted before the first attempt so that every retry sends
    /// the same body with the same `Idempotency-Key` (a different body would get a 400).
    pub ticket_request: Option<String>,
    /// When the ticket request was first sent (Unix ms): idempotency keys expire after 2 hours.
    pub ticket_first_sent_ms: Option<i64>,
    /// Human-readable note for a job that ended without something (e.g. `sync.create` excluded it).
    pub note: String,
}

/// A claimed job.
#[derive(Debug, Clone)]
pub(crate) struct Job {
    pub seq: i64,
    pub report: CallReport,
    /// Including the current one.
    pub attempts: u32,
    pub progress: Progress,
    /// The claim's fencing token (PostgreSQL: every write of the holder carries it, see
    /// `sync::pg`); always 0 in SQLite, where one process owns the file.
    pub lease: i64,
}

pub(crate) use crate::clock::now_ms;

/// 2: `job_counts` and its triggers, the `jobs_finished` index for retention.
const SCHEMA_VERSION: i64 = 2;

/// Rows deleted per transaction by [`Queue::purge_finished`], so a first purge of a long history
/// holds the write lock for milliseconds at a time, not for the whole backlog.
const PURGE_BATCH: i64 = 1000;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS jobs (
    seq                  INTEGER PRIMARY KEY AUTOINCREMENT,
    call_id              TEXT    NOT NULL UNIQUE,
    phone                INTEGER NOT NULL,          -- E.164 digits: jobs of one number never run together
    report               TEXT    NOT NULL,          -- the CallReport as JSON
    state                TEXT    NOT NULL,          -- queued | in_progress | retry_wait | done | failed
    attempts             INTEGER NOT NULL DEFAULT 0,
    last_error           TEXT    NOT NULL DEFAULT '',
    next_attempt_at      INTEGER,                   -- Unix ms, set in retry_wait
    user_id              INTEGER NOT NULL DEFAULT 0,
    organization_id      INTEGER NOT NULL DEFAULT 0,
    ticket_id            INTEGER NOT NULL DEFAULT 0,
    created_user         INTEGER NOT NULL DEFAULT 0,
    created_organization INTEGER NOT NULL DEFAULT 0,
    created_ticket       INTEGER NOT NULL DEFAULT 0,
    comment_added        INTEGER NOT NULL DEFAULT 0,
    comment_uncertain    INTEGER NOT NULL DEFAULT 0,
    call_record_id       INTEGER NOT NULL DEFAULT 0,
    ticket_request       TEXT,
    ticket_first_sent_ms INTEGER,
    note                 TEXT    NOT NULL DEFAULT '',
    created_at           INTEGER NOT NULL,          -- Unix ms
    updated_at           INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state, next_attempt_at);
CREATE INDEX IF NOT EXISTS jobs_phone ON jobs(phone, state);
CREATE INDEX IF NOT EXISTS jobs_finished ON jobs(state, updated_at);
-- Jobs per state, kept by the triggers below in the transaction that changes a job.
CREATE TABLE IF NOT EXISTS job_counts (
    state TEXT PRIMARY KEY,
    n     INTEGER NOT NULL
);
INSERT INTO job_counts (state, n)
    VALUES ('queued', 0), ('in_progress', 0), ('retry_wait', 0), ('done', 0), ('failed', 0)
    ON CONFLICT (state) DO NOTHING;
CREATE TRIGGER IF NOT EXISTS jobs_count_insert AFTER INSERT ON jobs BEGIN
    UPDATE job_counts SET n = n + 1 WHERE state = NEW.state;
END;
CREATE TRIGGER IF NOT EXISTS jobs_count_delete AFTER DELETE ON jobs BEGIN
    UPDATE job_counts SET n = n - 1 WHERE state = OLD.state;
END;
CREATE TRIGGER IF NOT EXISTS jobs_count_update AFTER UPDATE OF state ON jobs
    WHEN OLD.state <> NEW.state BEGIN
    UPDATE job_counts SET n = n - 1 WHERE state = OLD.state;
    UPDATE job_counts SET n = n + 1 WHERE state = NEW.state;
END;
-- Users this instance created, by number: covers the export and search lag, across restarts.
CREATE TABLE IF NOT EXISTS own_users (
    phone      INTEGER PRIMARY KEY,
    user_id    INTEGER NOT NULL,
    created_at INTEGER NOT NULL
);
";

impl Queue {
    /// Opens (creating if needed) `data_dir/queue.sqlite3`. Jobs left `IN_PROGRESS` by a crash go
    /// back to `QUEUED`: opening is start-up, and only one process owns the file.
    pub fn open(data_dir: &Path) -> Result<Queue, QueueError> {
        std::fs::create_dir_all(data_dir).map_err(|source| QueueError::Dir {
            path: data_dir.to_owned(),
            source,
        })?;
        let path = data_dir.join(QUEUE_FILE);
        let conn = Connection::open(&path)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        // journal_mode answers with a row, so it cannot go through execute_batch.
        let mode: String = conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            tracing::warn!(
                mode,
                "SQLite refused WAL mode; the queue stays durable but slower"
            );
        }
        conn.execute_batch("PRAGMA synchronous=FULL;")?;
        let mut conn = conn;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let version: i64 = tx.pragma_query_value(None, "user_version", |r| r.get(0))?;
        tx.execute_batch(SCHEMA)?;
        if version < 2 {
            // Counted once, in the transaction that creates the triggers: from here on they
            // keep the figures.
            tx.execute(
                "UPDATE job_counts SET n = (SELECT COUNT(*) FROM jobs WHERE jobs.state = job_counts.state)",
                [],
            )?;
        }
        tx.pragma_update(None, "user_version", SCHEMA_VERSION)?;
        tx.commit()?;
        let reset = conn.execute(
            "UPDATE jobs SET state = 'queued', updated_at = ?1 WHERE state = 'in_progress'",
            [now_ms()],
        )?;
        if reset > 0 {
            tracing::info!(
                jobs = reset,
                "jobs interrupted by a restart are queued again"
            );
        }
        // Opened after the writer made the file a WAL database, so it reads through the WAL.
        let reader = Connection::open_with_flags(
            &path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        reader.busy_timeout(std::time::Duration::from_secs(5))?;
        let file = FileId::of(&path).map_err(|source| QueueError::Dir {
            path: path.clone(),
            source,
        })?;
        Ok(Queue {
            conn: Arc::new(Mutex::new(conn)),
            reader: Arc::new(Mutex::new(reader)),
            path: Arc::new(path),
            file,
        })
    }

    /// The SQLite file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` on the writer connection, after checking the file is still the one opened.
    async fn run<T, F>(&self, f: F) -> Result<T, QueueError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T, QueueError> + Send + 'static,
    {
        let (conn, path, file) = (self.conn.clone(), self.path.clone(), self.file);
        tokio::task::spawn_blocking(move || {
            // One stat per write: nothing beside the fsync each commit pays.
            if FileId::of(&path).ok() != Some(file) {
                return Err(QueueError::Gone {
                    path: path.to_path_buf(),
                });
            }
            f(&mut conn.lock())
        })
        .await
        .map_err(|e| QueueError::Task(e.to_string()))?
    }

    /// Runs `f` on the read-only connection, which never waits for the writer's mutex or commit.
    async fn read<T, F>(&self, f: F) -> Result<T, QueueError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, QueueError> + Send + 'static,
    {
        let reader = self.reader.clone();
        tokio::task::spawn_blocking(move || f(&reader.lock()))
            .await
            .map_err(|e| QueueError::Task(e.to_string()))?
    }

    /// Stores the report; returns `true` (a duplicate, nothing changed) when its `call_id` was
    /// already accepted. Returns only after the transaction is committed.
    pub(crate) async fn enqueue(&self, r: &CallReport) -> Result<bool, QueueError> {
        let json = serde_json::to_string(r).map_err(|e| QueueError::Corrupt {
            call_id: r.call_id.clone(),
            message: e.to_string(),
        })?;
        let call_id = r.call_id.clone();
        let phone = r.client_e164.digits() as i64;
        self.run(move |c| {
            let now = now_ms();
            let inserted = c.execute(
                "INSERT INTO jobs (call_id, phone, report, state, created_at, updated_at)
                 VALUES (?1, ?2, ?3, 'queued', ?4, ?4)
                 ON CONFLICT (call_id) DO NOTHING",
                params![call_id, phone, json, now],
            )?;
            Ok(inserted == 0)
        })
        .await
    }

    pub(crate) async fn status(&self, call_id: &str) -> Result<Option<CallStatus>, QueueError> {
        let call_id = call_id.to_owned();
        self.read(move |c| {
            let row = c
                .query_row(
                    "SELECT call_id, state, attempts, last_error, user_id, organization_id,
                            ticket_id, created_user, created_organization, created_ticket,
                            comment_added, call_record_id, next_attempt_at, note
                     FROM jobs WHERE call_id = ?1",
                    [&call_id],
                    |r| {
                        Ok((
                            r.get::<_, String>(0)?,
                            r.get::<_, String>(1)?,
                            CallStatus {
                                call_id: String::new(),
                                state: SyncState::Queued,
                                attempts: r.get(2)?,
                                last_error: r.get(3)?,
                                user_id: r.get(4)?,
                                organization_id: r.get(5)?,
                                ticket_id: r.get(6)?,
                                created_user: r.get(7)?,
                                created_organization: r.get(8)?,
                                created_ticket: r.get(9)?,
                                comment_added: r.get(10)?,
                                call_record_id: r.get(11)?,
                                next_attempt_at: r.get::<_, Option<i64>>(12)?,
                            },
                            r.get::<_, String>(13)?,
                        ))
                    },
                )
                .optional()?;
            let Some((id, state, mut st, note)) = row else {
                return Ok(None);
            };
            st.state = SyncState::parse(&state).ok_or_else(|| QueueError::Corrupt {
                call_id: id.clone(),
                message: format!("unknown state {state:?}"),
            })?;
            st.call_id = id;
            st.next_attempt_at = match st.state {
                // Whole seconds, rounded up so "not before" stays true.
                SyncState::RetryWait => st.next_attempt_at.map(|ms| (ms + 999).div_euclid(1000)),
                _ => None,
            };
            if st.last_error.is_empty() && !note.is_empty() {
                st.last_error = note;
            }
            Ok(Some(st))
        })
        .await
    }

    /// Jobs per state, every state present (for metrics): five rows of `job_counts`, whatever the
    /// length of the history.
    pub async fn counts(&self) -> Result<BTreeMap<SyncState, u64>, QueueError> {
        self.read(|c| {
            let mut out: BTreeMap<SyncState, u64> =
                SyncState::ALL.into_iter().map(|s| (s, 0)).collect();
            let mut stmt = c.prepare_cached("SELECT state, n FROM job_counts")?;
            let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?;
            for row in rows {
                let (state, n) = row?;
                if let Some(s) = SyncState::parse(&state) {
                    out.insert(s, n.max(0) as u64);
                }
            }
            Ok(out)
        })
        .await
    }

    /// Deletes the `DONE` and `FAILED` jobs whose last change is before `before_ms` (Unix ms), a
    /// batch per transaction; returns how many.
    pub(crate) async fn purge_finished(&self, before_ms: i64) -> Result<u64, QueueError> {
        let mut total = 0u64;
        loop {
            let n = self
                .run(move |c| {
                    Ok(c.execute(
                        "DELETE FROM jobs WHERE seq IN (
                             SELECT seq FROM jobs
                             WHERE state IN ('done', 'failed') AND updated_at < ?1
                             LIMIT ?2)",
                        params![before_ms, PURGE_BATCH],
                    )?)
                })
                .await?;
            total += n as u64;
            if (n as i64) < PURGE_BATCH {
                return Ok(total);
            }
        }
    }

    /// Claims the oldest job that is due and whose number has no job in progress, in one
    /// transaction, marking it `IN_PROGRESS` and counting the attempt.
    pub(crate) async fn claim(&self) -> Result<Option<Job>, QueueError> {
        self.run(|c| {
            let now = now_ms();
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let row = tx
                .query_row(
                    "SELECT seq, call_id, report, attempts, user_id, organization_id, ticket_id,
                            created_user, created_organization, created_ticket, comment_added,
                            comment_uncertain, call_record_id, ticket_request,
                            ticket_first_sent_ms, note
                     FROM jobs j
                     WHERE (j.state = 'queued' OR (j.state = 'retry_wait' AND j.next_attempt_at <= ?1))
                       AND NOT EXISTS (SELECT 1 FROM jobs k
                                       WHERE k.phone = j.phone
                                         AND (k.state = 'in_progress'
                                              OR (k.state IN ('queued', 'retry_wait') AND k.seq < j.seq)))
                     ORDER BY j.seq LIMIT 1",
                    [now],
                    |r| {
                        Ok((
                            r.get::<_, i64>(0)?,
                            r.get::<_, String>(1)?,
                            r.get::<_, String>(2)?,
                            r.get::<_, u32>(3)?,
                            Progress {
                                user_id: r.get(4)?,
                                organization_id: r.get(5)?,
                                ticket_id: r.get(6)?,
                                created_user: r.get(7)?,
                                created_organization: r.get(8)?,
                                created_ticket: r.get(9)?,
                                comment_added: r.get(10)?,
                                comment_uncertain: r.get(11)?,
                                call_record_id: r.get(12)?,
                                ticket_request: r.get(13)?,
                                ticket_first_sent_ms: r.get(14)?,
                                note: r.get(15)?,
                            },
                        ))
                    },
                )
                .optional()?;
            let Some((seq, call_id, json, attempts, progress)) = row else {
                return Ok(None);
            };
            let report: CallReport = match serde_json::from_str(&json) {
                Ok(r) => r,
                Err(e) => {
                    // A row nobody can read must not block the queue: fail it, say why.
                    tx.execute(
                        "UPDATE jobs SET state = 'failed', last_error = ?2, updated_at = ?3
                         WHERE seq = ?1",
                        params![seq, format!("stored report is unreadable: {e}"), now],
                    )?;
                    tx.commit()?;
                    return Err(QueueError::Corrupt {
                        call_id,
                        message: e.to_string(),
                    });
                }
            };
            tx.execute(
                "UPDATE jobs SET state = 'in_progress', attempts = attempts + 1,
                        next_attempt_at = NULL, updated_at = ?2
                 WHERE seq = ?1",
                params![seq, now],
            )?;
            tx.commit()?;
            Ok(Some(Job {
                seq,
                report,
                attempts: attempts + 1,
                progress,
                lease: 0,
            }))
        })
        .await
    }

    /// Records the steps done so far; called after every step, before the next one.
    pub(crate) async fn save_progress(&self, seq: i64, p: &Progress) -> Result<(), QueueError> {
        let p = p.clone();
        self.run(move |c| {
            c.execute(
                "UPDATE jobs SET user_id = ?2, organization_id = ?3, ticket_id = ?4,
                        created_user = ?5, created_organization = ?6, created_ticket = ?7,
                        comment_added = ?8, comment_uncertain = ?9, call_record_id = ?10,
                        ticket_request = ?11, ticket_first_sent_ms = ?12, note = ?13,
                        updated_at = ?14
                 WHERE seq = ?1",
                params![
                    seq,
                    p.user_id,
                    p.organization_id,
                    p.ticket_id,
                    p.created_user,
                    p.created_organization,
                    p.created_ticket,
                    p.comment_added,
                    p.comment_uncertain,
                    p.call_record_id,
                    p.ticket_request,
                    p.ticket_first_sent_ms,
                    p.note,
                    now_ms(),
                ],
            )?;
            Ok(())
        })
        .await
    }

    async fn set_state(
        &self,
        seq: i64,
        state: SyncState,
        next_attempt_ms: Option<i64>,
        error: String,
    ) -> Result<(), QueueError> {
        self.run(move |c| {
            c.execute(
                "UPDATE jobs SET state = ?2, next_attempt_at = ?3, last_error = ?4, updated_at = ?5
                 WHERE seq = ?1",
                params![seq, state.as_str(), next_attempt_ms, error, now_ms()],
            )?;
            Ok(())
        })
        .await
    }

    pub(crate) async fn finish(&self, seq: i64) -> Result<(), QueueError> {
        self.set_state(seq, SyncState::Done, None, String::new())
            .await
    }

    pub(crate) async fn fail(&self, seq: i64, error: String) -> Result<(), QueueError> {
        self.set_state(seq, SyncState::Failed, None, error).await
    }

    /// `RETRY_WAIT` until `at_ms` (Unix ms); the schedule is in the row, so a restart keeps it.
    pub(crate) async fn retry_at(
        &self,
        seq: i64,
        at_ms: i64,
        error: String,
    ) -> Result<(), QueueError> {
        self.set_state(seq, SyncState::RetryWait, Some(at_ms), error)
            .await
    }

    /// Back to `QUEUED` (shutdown while the job was running); its recorded steps stay.
    pub(crate) async fn release(&self, seq: i64) -> Result<(), QueueError> {
        self.run(move |c| {
            c.execute(
                "UPDATE jobs SET state = 'queued', updated_at = ?2
                 WHERE seq = ?1 AND state = 'in_progress'",
                params![seq, now_ms()],
            )?;
            Ok(())
        })
        .await
    }

    /// The earliest `next_attempt_at` (Unix ms) of the jobs waiting to retry.
    pub(crate) async fn next_due_ms(&self) -> Result<Option<i64>, QueueError> {
        self.run(|c| {
            Ok(c.query_row(
                "SELECT MIN(next_attempt_at) FROM jobs WHERE state = 'retry_wait'",
                [],
                |r| r.get::<_, Option<i64>>(0),
            )?)
        })
        .await
    }

    /// The user this instance created for `phone`, if any.
    pub(crate) async fn own_user(&self, phone: E164) -> Result<Option<i64>, QueueError> {
        let phone = phone.digits() as i64;
        self.run(move |c| {
            Ok(c.query_row(
                "SELECT user_id FROM own_users WHERE phone = ?1",
                [phone],
                |r| r.get(0),
            )
            .optional()?)
        })
        .await
    }

    pub(crate) async fn remember_user(&self, phone: E164, user_id: i64) -> Result<(), QueueError> {
        let phone = phone.digits() as i64;
        self.run(move |c| {
            c.execute(
                "INSERT INTO own_users (phone, user_id, created_at) VALUES (?1, ?2, ?3)
                 ON CONFLICT (phone) DO UPDATE SET user_id = excluded.user_id",
                params![phone, user_id, now_ms()],
            )?;
            Ok(())
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sync::test_support::report;

    fn tmp() -> tempfile::TempDir {
        tempfile::tempdir().unwrap()
    }

    #[tokio::test]
    async fn duplicate_call_id_changes_nothing() {
        let dir = tmp();
        let q = Queue::open(dir.path()).unwrap();
        let first = report("c1", 380441234567);
        assert!(!q.enqueue(&first).await.unwrap());
        let mut second = report("c1", 380501112233);
        second.employee_name = "Someone Else".into();
        assert!(q.enqueue(&second).await.unwrap());
        let job = q.claim().await.unwrap().unwrap();
        assert_eq!(job.report, first, "the first report wins");
        assert!(q.claim().await.unwrap().is_none());
        let counts = q.counts().await.unwrap();
        assert_eq!(counts[&SyncState::InProgress], 1);
        assert_eq!(counts.values().sum::<u64>(), 1);
    }

    #[tokio::test]
    async fn reports_survive_reopen_and_crash_resets_in_progress() {
        let dir = tmp();
        {
            let q = Queue::open(dir.path()).unwrap();
            q.enqueue(&report("c1", 380441234567)).await.unwrap();
            q.enqueue(&report("c2", 380441234568)).await.unwrap();
            let job = q.claim().await.unwrap().unwrap();
            let p = Progress {
                user_id: 7,
                created_user: true,
                ..Progress::default()
            };
            q.save_progress(job.seq, &p).await.unwrap();
            // Dropped without finishing: a crash.
        }
        let q = Queue::open(dir.path()).unwrap();
        let st = q.status("c1").await.unwrap().unwrap();
        assert_eq!(st.state, SyncState::Queued);
        assert_eq!((st.attempts, st.user_id, st.created_user), (1, 7, true));
        let job = q.claim().await.unwrap().unwrap();
        assert_eq!(job.report.call_id, "c1");
        assert_eq!(job.attempts, 2);
        assert_eq!(
            job.progress.user_id, 7,
            "the retry resumes from the recorded step"
        );
        assert!(q.status("nope").await.unwrap().is_none());
    }

    #[tokio::test]
    async fn state_machine() {
        let dir = tmp();
        let q = Queue::open(dir.path()).unwrap();
        for (i, id) in ["a", "b", "c"].iter().enumerate() {
            q.enqueue(&report(id, 380441234560 + i as u64))
                .await
                .unwrap();
        }
        let a = q.claim().await.unwrap().unwrap();
        assert_eq!(
            q.status("a").await.unwrap().unwrap().state,
            SyncState::InProgress
        );
        q.finish(a.seq).await.unwrap();
        let b = q.claim().await.unwrap().unwrap();
        q.fail(b.seq, "Zendesk rejected the request (HTTP 422): bad".into())
            .await
            .unwrap();
        let c = q.claim().await.unwrap().unwrap();
        let due = now_ms() + 60_000;
        q.retry_at(c.seq, due, "HTTP 503".into()).await.unwrap();

        let st = q.status("a").await.unwrap().unwrap();
        assert_eq!((st.state, st.last_error.as_str()), (SyncState::Done, ""));
        let st = q.status("b").await.unwrap().unwrap();
        assert_eq!(st.state, SyncState::Failed);
        assert!(st.last_error.contains("HTTP 422"));
        let st = q.status("c").await.unwrap().unwrap();
        assert_eq!(st.state, SyncState::RetryWait);
        assert_eq!(st.next_attempt_at, Some((due + 999) / 1000));
        assert_eq!(q.next_due_ms().await.unwrap(), Some(due));
        // Not due yet: nothing to claim.
        assert!(q.claim().await.unwrap().is_none());
        // Due now: claimable again, with the attempt counted.
        q.retry_at(c.seq, now_ms() - 1, "HTTP 503".into())
            .await
            .unwrap();
        let again = q.claim().await.unwrap().unwrap();
        assert_eq!((again.report.call_id.as_str(), again.attempts), ("c", 2));
        q.release(again.seq).await.unwrap();
        assert_eq!(
            q.status("c").await.unwrap().unwrap().state,
            SyncState::Queued
        );

        let counts = q.counts().await.unwrap();
        assert_eq!(counts[&SyncState::Done], 1);
        assert_eq!(counts[&SyncState::Failed], 1);
        assert_eq!(counts[&SyncState::Queued], 1);
        assert_eq!(counts[&SyncState::RetryWait], 0);
    }

    #[tokio::test]
    async fn one_job_per_number_at_a_time() {
        let dir = tmp();
        let q = Queue::open(dir.path()).unwrap();
        q.enqueue(&report("n1-a", 380441234567)).await.unwrap();
        q.enqueue(&report("n1-b", 380441234567)).await.unwrap();
        q.enqueue(&report("n2-a", 380501112233)).await.unwrap();
        let first = q.claim().await.unwrap().unwrap();
        let second = q.claim().await.unwrap().unwrap();
        assert_eq!(first.report.call_id, "n1-a");
        assert_eq!(second.report.call_id, "n2-a", "n1-b waits for n1-a");
        assert!(q.claim().await.unwrap().is_none());
        q.finish(first.seq).await.unwrap();
        let third = q.claim().await.unwrap().unwrap();
        assert_eq!(third.report.call_id, "n1-b");
    }

    /// A job waiting to retry still holds its number: a later report for the same number must not
    /// overtake it (it could create a second ticket, or reuse the first job's possibly created one
    /// and comment twice).
    #[tokio::test]
    async fn a_retrying_job_keeps_later_jobs_of_its_number_waiting() {
        let dir = tmp();
        let q = Queue::open(dir.path()).unwrap();
        q.enqueue(&report("n1-a", 380441234567)).await.unwrap();
        q.enqueue(&report("n1-b", 380441234567)).await.unwrap();
        let first = q.claim().await.unwrap().unwrap();
        q.retry_at(first.seq, now_ms() + 60_000, "HTTP 503".into())
            .await
            .unwrap();
        assert!(
            q.claim().await.unwrap().is_none(),
            "n1-b must wait for n1-a's retry"
        );
        q.retry_at(first.seq, now_ms() - 1, "HTTP 503".into())
            .await
            .unwrap();
        let again = q.claim().await.unwrap().unwrap();
        assert_eq!(again.report.call_id, "n1-a");
        q.finish(again.seq).await.unwrap();
        assert_eq!(q.claim().await.unwrap().unwrap().report.call_id, "n1-b");
    }

    #[tokio::test]
    async fn own_users_survive_reopen() {
        let dir = tmp();
        let phone = E164::from_digits(380441234567).unwrap();
        {
            let q = Queue::open(dir.path()).unwrap();
            assert_eq!(q.own_user(phone).await.unwrap(), None);
            q.remember_user(phone, 42).await.unwrap();
        }
        let q = Queue::open(dir.path()).unwrap();
        assert_eq!(q.own_user(phone).await.unwrap(), Some(42));
    }

    /// What the old scrape counted: the truth the kept counters must equal.
    fn counted(q: &Queue) -> BTreeMap<SyncState, u64> {
        let c = q.conn.lock();
        let mut out: BTreeMap<SyncState, u64> =
            SyncState::ALL.into_iter().map(|s| (s, 0)).collect();
        let mut stmt = c
            .prepare("SELECT state, COUNT(*) FROM jobs GROUP BY state")
            .unwrap();
        let rows = stmt
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))
            .unwrap();
        for row in rows {
            let (state, n) = row.unwrap();
            out.insert(SyncState::parse(&state).unwrap(), n as u64);
        }
        out
    }

    const DAY_MS: i64 = 86_400_000;

    /// Sets a job's last change `days` ago (what a month of running would have done).
    fn age(q: &Queue, call_id: &str, days: i64) {
        let at = now_ms() - days * DAY_MS;
        q.conn
            .lock()
            .execute(
                "UPDATE jobs SET created_at = ?2, updated_at = ?2 WHERE call_id = ?1",
                params![call_id, at],
            )
            .unwrap();
    }

    #[tokio::test]
    async fn retention_deletes_old_finished_jobs_and_keeps_duplicates_within_the_window() {
        let dir = tmp();
        let q = Queue::open(dir.path()).unwrap();
        for (i, id) in ["old-done", "old-failed", "recent-done", "old-queued"]
            .iter()
            .enumerate()
        {
            q.enqueue(&report(id, 380441234560 + i as u64))
                .await
                .unwrap();
        }
        let a = q.claim().await.unwrap().unwrap();
        q.finish(a.seq).await.unwrap();
        let b = q.claim().await.unwrap().unwrap();
        q.fail(b.seq, "HTTP 422".into()).await.unwrap();
        let c = q.claim().await.unwrap().unwrap();
        q.finish(c.seq).await.unwrap();
        age(&q, "old-done", 31);
        age(&q, "old-failed", 40);
        age(&q, "recent-done", 29);
        // Never finished: kept however old (it still has to reach Zendesk).
        age(&q, "old-queued", 90);

        let removed = q.purge_finished(now_ms() - 30 * DAY_MS).await.unwrap();
        assert_eq!(removed, 2);
        assert!(q.status("old-done").await.unwrap().is_none());
        assert!(q.status("old-failed").await.unwrap().is_none());
        assert_eq!(
            q.status("recent-done").await.unwrap().unwrap().state,
            SyncState::Done
        );
        assert_eq!(
            q.status("old-queued").await.unwrap().unwrap().state,
            SyncState::Queued
        );
        // A report of the same call within the window is still a duplicate.
        assert!(
            q.enqueue(&report("recent-done", 380441234562))
                .await
                .unwrap()
        );
        assert_eq!(q.counts().await.unwrap(), counted(&q));
        assert_eq!(q.counts().await.unwrap()[&SyncState::Done], 1);
        // Nothing more is old enough.
        assert_eq!(q.purge_finished(now_ms() - 30 * DAY_MS).await.unwrap(), 0);
    }

    #[tokio::test]
    async fn purge_goes_in_batches_past_one_transaction() {
        let dir = tmp();
        let q = Queue::open(dir.path()).unwrap();
        let n = PURGE_BATCH as usize * 2 + 7;
        {
            let mut c = q.conn.lock();
            let tx = c.transaction().unwrap();
            for i in 0..n {
                tx.execute(
                    "INSERT INTO jobs (call_id, phone, report, state, created_at, updated_at)
                     VALUES (?1, 380441234567, '{}', 'done', 1, 1)",
                    [format!("c{i}")],
                )
                .unwrap();
            }
            tx.commit().unwrap();
        }
        assert_eq!(q.counts().await.unwrap()[&SyncState::Done], n as u64);
        assert_eq!(q.purge_finished(2).await.unwrap(), n as u64);
        assert_eq!(q.counts().await.unwrap()[&SyncState::Done], 0);
    }

    #[tokio::test]
    async fn counters_follow_every_state_change_and_survive_restart() {
        let dir = tmp();
        {
            let q = Queue::open(dir.path()).unwrap();
            let check = |what: &str, counts: BTreeMap<SyncState, u64>| {
                assert_eq!(counts, counted(&q), "after {what}");
            };
            for (i, id) in ["a", "b", "c", "d"].iter().enumerate() {
                q.enqueue(&report(id, 380441234560 + i as u64))
                    .await
                    .unwrap();
            }
            check("enqueue", q.counts().await.unwrap());
            assert!(q.enqueue(&report("a", 380441234560)).await.unwrap());
            check("a duplicate", q.counts().await.unwrap());
            let a = q.claim().await.unwrap().unwrap();
            check("claim", q.counts().await.unwrap());
            q.retry_at(a.seq, now_ms() - 1, "HTTP 503".into())
                .await
                .unwrap();
            check("retry_at", q.counts().await.unwrap());
            let a = q.claim().await.unwrap().unwrap();
            q.finish(a.seq).await.unwrap();
            check("finish", q.counts().await.unwrap());
            let b = q.claim().await.unwrap().unwrap();
            q.fail(b.seq, "HTTP 422".into()).await.unwrap();
            check("fail", q.counts().await.unwrap());
            let c = q.claim().await.unwrap().unwrap();
            q.release(c.seq).await.unwrap();
            check("release", q.counts().await.unwrap());
            // Left IN_PROGRESS: the restart queues it again.
            q.claim().await.unwrap().unwrap();
            let counts = q.counts().await.unwrap();
            check("claim", counts.clone());
            assert_eq!(counts[&SyncState::InProgress], 1);
            assert_eq!(counts[&SyncState::Done], 1);
            assert_eq!(counts[&SyncState::Failed], 1);
        }
        let q = Queue::open(dir.path()).unwrap();
        let counts = q.counts().await.unwrap();
        assert_eq!(counts, counted(&q));
        assert_eq!(counts[&SyncState::InProgress], 0);
        assert_eq!(counts[&SyncState::Queued], 2);
    }

    /// A queue written by the previous version (no `job_counts`) gets its counters at open.
    #[tokio::test]
    async fn counters_are_filled_when_an_old_queue_is_opened() {
        let dir = tmp();
        {
            let q = Queue::open(dir.path()).unwrap();
            q.enqueue(&report("a", 380441234560)).await.unwrap();
            q.enqueue(&report("b", 380441234561)).await.unwrap();
            let a = q.claim().await.unwrap().unwrap();
            q.finish(a.seq).await.unwrap();
            q.conn
                .lock()
                .execute_batch(
                    "DROP TRIGGER jobs_count_insert; DROP TRIGGER jobs_count_delete;
                     DROP TRIGGER jobs_count_update; DROP TABLE job_counts;
                     PRAGMA user_version = 1;",
                )
                .unwrap();
        }
        let q = Queue::open(dir.path()).unwrap();
        let counts = q.counts().await.unwrap();
        assert_eq!(
            (counts[&SyncState::Done], counts[&SyncState::Queued]),
            (1, 1)
        );
        assert_eq!(counts, counted(&q));
    }

    /// `GetCallStatus` and scrapes read on their own connection: they answer while a write
    /// transaction is open and the writer's mutex is held (a `ReportCall` in its fsync).
    // Holding the writer across the awaits is the point: it stands for a commit in progress.
    #[allow(clippy::await_holding_lock)]
    #[tokio::test]
    async fn reads_do_not_wait_for_the_writer() {
        let dir = tmp();
        let q = Queue::open(dir.path()).unwrap();
        q.enqueue(&report("a", 380441234560)).await.unwrap();
        let mut writer = q.conn.lock();
        let tx = writer
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .unwrap();
        tx.execute("UPDATE jobs SET state = 'done' WHERE call_id = 'a'", [])
            .unwrap();
        let limit = std::time::Duration::from_secs(2);
        let st = tokio::time::timeout(limit, q.status("a"))
            .await
            .expect("status waited for the writer")
            .unwrap()
            .unwrap();
        assert_eq!(
            st.state,
            SyncState::Queued,
            "the last commit, not the open one"
        );
        let counts = tokio::time::timeout(limit, q.counts())
            .await
            .expect("counts waited for the writer")
            .unwrap();
        assert_eq!(counts[&SyncState::Queued], 1);
        tx.commit().unwrap();
        drop(writer);
        assert_eq!(q.status("a").await.unwrap().unwrap().state, SyncState::Done);
    }

    /// The data directory removed under a running queue: writes fail instead of going to a file
    /// nobody will ever open again.
    #[tokio::test]
    async fn a_deleted_queue_file_refuses_writes() {
        let dir = tmp();
        let data = dir.path().join("data");
        let q = Queue::open(&data).unwrap();
        q.enqueue(&report("a", 380441234560)).await.unwrap();
        std::fs::remove_dir_all(&data).unwrap();
        let e = q.enqueue(&report("b", 380441234561)).await.unwrap_err();
        assert!(matches!(e, QueueError::Gone { .. }), "{e}");
        assert!(matches!(
            q.claim().await.unwrap_err(),
            QueueError::Gone { .. }
        ));
        // Replaced by another file at the same path: refused too.
        let q = Queue::open(&data).unwrap();
        std::fs::rename(data.join(QUEUE_FILE), data.join("moved")).unwrap();
        std::fs::write(data.join(QUEUE_FILE), b"").unwrap();
        assert!(matches!(
            q.enqueue(&report("c", 380441234562)).await.unwrap_err(),
            QueueError::Gone { .. }
        ));
    }

    #[tokio::test]
    async fn concurrent_enqueue_of_one_id_stores_one_job() {
        let dir = tmp();
        let q = Queue::open(dir.path()).unwrap();
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let q = q.clone();
            tasks.push(tokio::spawn(async move {
                q.enqueue(&report("same", 380441234567)).await.unwrap()
            }));
        }
        let mut fresh = 0;
        for t in tasks {
            if !t.await.unwrap() {
                fresh += 1;
            }
        }
        assert_eq!(fresh, 1);
        assert_eq!(q.counts().await.unwrap()[&SyncState::Queued], 1);
    }
}
