//! The job queue in PostgreSQL, shared by every replica (DESIGN §8).
//!
//! # Tables
//! - `jobs`: one row per accepted report, the same columns as the SQLite queue (state, attempts,
//!   the step-by-step [`Progress`], the persisted ticket request, `comment_uncertain`) plus
//!   `lease_token`, the fencing token of the claim that holds it.
//! - `numbers`: one row per client number. It is the number's lock and lease (`lease_token`,
//!   `lease_owner`, `lease_until` in ms of the database clock) and remembers what this deployment
//!   created for the number (`own_user_id`, `own_organization_id`, `own_ticket_id`), because a
//!   replica's index may not yet hold another replica's writes.
//!
//! # Enqueue
//! One autocommit statement: upsert the number's row (which takes its row lock), then insert the
//! job `ON CONFLICT (call_id) DO NOTHING`. The row lock makes the enqueues of one number commit in
//! `seq` order, so `seq` is the number's order even across replicas; a concurrent report with the
//! same `call_id` waits for the first and finds it (`duplicate`).
//!
//! # Counts per state
//! A metrics scrape must not count the history (`GROUP BY state` over every job kept). Triggers on
//! `jobs` (schema step `0002_job_counts`) append each change of a job's state to
//! `job_count_changes` (`+1` for the new state, `-1` for the old; one row per state for a purge's
//! whole `DELETE`) in the transaction that makes it. Appending, never updating a shared counter
//! row: concurrent transactions of several replicas neither wait for each other nor deadlock on
//! the counters. [`PgQueue::counts`] reads `job_counts` plus the pending changes in one statement,
//! and [`PgQueue::compact_counts`] (housekeeping every minute, or a read that finds over
//! [`COMPACT_AT`] pending) folds the changes into `job_counts` in one transaction. The migration
//! fills `job_counts` from the rows under a table lock, so an existing deployment's figures start
//! right.
//!
//! # Claim and lease
//! A claim looks for the oldest unfinished job of each number (`queued`, `retry_wait`, or
//! `in_progress` under an expired lease) whose number has no live lease, and then, per candidate,
//! in one transaction:
//! 1. `SELECT … FROM numbers WHERE phone = $1 AND lease expired FOR UPDATE SKIP LOCKED` — the
//!    number's row lock, re-checked on its latest version, so exactly one replica wins it;
//! 2. reads the number's oldest unfinished job again *under that lock* (a fresh snapshot: every
//!    claim, enqueue and finish of the number takes the same lock first) and checks it is due;
//! 3. marks it `in_progress`, counts the attempt, stores a fresh random `lease_token` in the job
//!    and the number, and sets `lease_until = now + sync.lease_seconds`.
//!
//! The holder renews the lease every third of its length while it works. Every write the holder
//! makes (progress, finish, retry, fail, release) is fenced by `lease_token`: once another replica
//! has taken the job over, the old holder's writes match no row and it stops
//! ([`StoreError::LeaseLost`](super::StoreError)). A replica that dies simply stops renewing; when
//! the lease runs out another replica claims the job and resumes it from its recorded steps.
//!
//! # Why this is safe
//! - One job of a number at a time, in order: only the number's oldest unfinished job is ever
//!   claimable, and only while the number has no live lease; the lease is taken under the
//!   number's row lock.
//! - No duplicate in Zendesk: a job resumed elsewhere repeats at most its last, unrecorded step,
//!   and every step is idempotent or checked before it is repeated (see [`crate::sync`]). The one
//!   step that is not idempotent, a comment on a reused ticket, is preceded by a fenced write of its
//!   intent (`comment_uncertain`): a holder that lost its lease fails that write and sends nothing.
//!   The remaining window is a holder that stalls (a pause longer than the lease) *between* that
//!   write and the send: as with any lease, keep `sync.lease_seconds` well above the Zendesk
//!   timeout and any expected pause.
//! - Time is the database's (`clock_timestamp()`), so replicas' clocks do not matter for leases.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use deadpool_postgres::Pool;
use rand::Rng;
use tokio_postgres::Row;

use super::{
    CallReport, CallStatus, SyncState,
    queue::{Job, Progress},
};
use crate::{pg::PgError, phone::E164};

/// Milliseconds since the epoch on the database's clock.
macro_rules! now_ms_sql {
    () => {
        "(extract(epoch from clock_timestamp()) * 1000)::bigint"
    };
}

/// Schema step `0001_sync_queue` (see [`crate::pg::migrations`]).
pub(crate) const SCHEMA_0001: &str = "
CREATE TABLE jobs (
    seq                  BIGSERIAL PRIMARY KEY,
    call_id              TEXT     NOT NULL UNIQUE,
    phone                BIGINT   NOT NULL,
    report               TEXT     NOT NULL,
    state                TEXT     NOT NULL,
    attempts             INTEGER  NOT NULL DEFAULT 0,
    last_error           TEXT     NOT NULL DEFAULT '',
    next_attempt_at      BIGINT,
    user_id              BIGINT   NOT NULL DEFAULT 0,
    organization_id      BIGINT   NOT NULL DEFAULT 0,
    ticket_id            BIGINT   NOT NULL DEFAULT 0,
    created_user         BOOLEAN  NOT NULL DEFAULT false,
    created_organization BOOLEAN  NOT NULL DEFAULT false,
    created_ticket       BOOLEAN  NOT NULL DEFAULT false,
    comment_added        BOOLEAN  NOT NULL DEFAULT false,
    comment_uncertain    BOOLEAN  NOT NULL DEFAULT false,
    call_record_id       BIGINT   NOT NULL DEFAULT 0,
    ticket_request       TEXT,
    ticket_first_sent_ms BIGINT,
    note                 TEXT     NOT NULL DEFAULT '',
    lease_token          BIGINT,
    created_at           BIGINT   NOT NULL,
    updated_at           BIGINT   NOT NULL
);
CREATE INDEX jobs_unfinished ON jobs (phone, seq)
    WHERE state IN ('queued', 'in_progress', 'retry_wait');
CREATE INDEX jobs_state ON jobs (state);
CREATE TABLE numbers (
    phone               BIGINT PRIMARY KEY,
    lease_token         BIGINT,
    lease_owner         TEXT,
    lease_until         BIGINT,
    own_user_id         BIGINT,
    own_organization_id BIGINT,
    own_ticket_id       BIGINT
);
";

/// Schema step `0002_job_counts`: jobs per state kept as they change, so a metrics scrape reads a
/// few rows instead of counting the history (see "Counts per state" in the module doc). The lock
/// keeps every replica's writes out while the counters are created and filled from the rows.
pub(crate) const SCHEMA_0002: &str = "
LOCK TABLE jobs IN SHARE ROW EXCLUSIVE MODE;
CREATE TABLE job_counts (
    state TEXT   PRIMARY KEY,
    n     BIGINT NOT NULL
);
CREATE TABLE job_count_changes (
    id    BIGSERIAL PRIMARY KEY,
    state TEXT   NOT NULL,
    n     BIGINT NOT NULL
);
CREATE FUNCTION jobs_count_row() RETURNS trigger LANGUAGE plpgsql
    SET search_path FROM CURRENT AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO job_count_changes (state, n) VALUES (NEW.state, 1);
    ELSE
        INSERT INTO job_count_changes (state, n) VALUES (OLD.state, -1), (NEW.state, 1);
    END IF;
    RETURN NULL;
END $$;
CREATE FUNCTION jobs_count_deleted() RETURNS trigger LANGUAGE plpgsql
    SET search_path FROM CURRENT AS $$
BEGIN
    INSERT INTO job_count_changes (state, n)
        SELECT state, -count(*) FROM deleted GROUP BY state;
    RETURN NULL;
END $$;
CREATE TRIGGER jobs_count_insert AFTER INSERT ON jobs
    FOR EACH ROW EXECUTE FUNCTION jobs_count_row();
CREATE TRIGGER jobs_count_update AFTER UPDATE OF state ON jobs
    FOR EACH ROW WHEN (OLD.state IS DISTINCT FROM NEW.state) EXECUTE FUNCTION jobs_count_row();
CREATE TRIGGER jobs_count_delete AFTER DELETE ON jobs REFERENCING OLD TABLE AS deleted
    FOR EACH STATEMENT EXECUTE FUNCTION jobs_count_deleted();
INSERT INTO job_counts (state, n)
    SELECT s, (SELECT count(*) FROM jobs WHERE state = s)
    FROM unnest(ARRAY['queued', 'in_progress', 'retry_wait', 'done', 'failed']) AS s;
";

/// Pending counter changes above which a read of the counts folds them in (in the background).
const COMPACT_AT: i64 = 1_000;

const JOB_COLUMNS: &str = "seq, call_id, report, attempts, user_id, organization_id, ticket_id,
    created_user, created_organization, created_ticket, comment_added, comment_uncertain,
    call_record_id, ticket_request, ticket_first_sent_ms, note, state, next_attempt_at";

/// Cheap to clone: clones share one pool.
#[derive(Clone)]
pub(crate) struct PgQueue {
    pool: Pool,
    lease: Duration,
    /// Shown in `numbers.lease_owner` for operators: which replica holds a number.
    owner: Arc<str>,
}

impl std::fmt::Debug for PgQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgQueue")
            .field("owner", &self.owner)
            .field("lease", &self.lease)
            .finish()
    }
}

/// Errors of this module; [`super::StoreError`] wraps them.
#[derive(Debug, thiserror::Error)]
pub(crate) enum PgQueueError {
    #[error(transparent)]
    Pg(#[from] PgError),
    #[error("another replica took over the job (its lease ran out)")]
    LeaseLost,
    #[error("queue row {call_id:?} is unreadable: {message}")]
    Corrupt { call_id: String, message: String },
}

impl From<tokio_postgres::Error> for PgQueueError {
    fn from(e: tokio_postgres::Error) -> Self {
        PgQueueError::Pg(e.into())
    }
}

impl From<deadpool_postgres::PoolError> for PgQueueError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        PgQueueError::Pg(e.into())
    }
}

type Result<T> = std::result::Result<T, PgQueueError>;

/// Rows deleted per statement by [`PgQueue::purge_finished`].
const PURGE_BATCH: i64 = 1_000;

async fn timed_q<T>(f: impl std::future::Future<Output = Result<T>>) -> Result<T> {
    match tokio::time::timeout(crate::pg::OP_TIMEOUT, f).await {
        Ok(r) => r,
        Err(_) => Err(PgQueueError::Pg(PgError::Unavailable(format!(
            "no answer within {} s",
            crate::pg::OP_TIMEOUT.as_secs()
        )))),
    }
}

fn progress_of(r: &Row) -> Progress {
    Progress {
        user_id: r.get("user_id"),
        organization_id: r.get("organization_id"),
        ticket_id: r.get("ticket_id"),
        created_user: r.get("created_user"),
        created_organization: r.get("created_organization"),
        created_ticket: r.get("created_ticket"),
        comment_added: r.get("comment_added"),
        comment_uncertain: r.get("comment_uncertain"),
        call_record_id: r.get("call_record_id"),
        ticket_request: r.get("ticket_request"),
        ticket_first_sent_ms: r.get("ticket_first_sent_ms"),
        note: r.get("note"),
    }
}

fn digits(phone: E164) -> i64 {
    phone.digits() as i64
}

impl PgQueue {
    /// A queue over an already migrated database ([`crate::pg::migrate`]). `owner` names this
    /// replica in `numbers.lease_owner`.
    pub(crate) fn new(pool: Pool, lease: Duration, owner: impl Into<Arc<str>>) -> Self {
        Self {
            pool,
            lease,
            owner: owner.into(),
        }
    }

    pub(crate) fn lease(&self) -> Duration {
        self.lease
    }

    fn lease_ms(&self) -> i64 {
        self.lease.as_millis() as i64
    }

    /// Stores the report; `true` when its `call_id` was already accepted. Returns after commit.
    pub(crate) async fn enqueue(&self, r: &CallReport) -> Result<bool> {
        let json = serde_json::to_string(r).map_err(|e| PgQueueError::Corrupt {
            call_id: r.call_id.clone(),
            message: e.to_string(),
        })?;
        let phone = digits(r.client_e164);
        timed_q(async {
            let c = self.pool.get().await?;
            let stmt = c
                .prepare_cached(concat!(
                    "WITH n AS (INSERT INTO numbers (phone) VALUES ($2)
                                ON CONFLICT (phone) DO UPDATE SET phone = EXCLUDED.phone
                                RETURNING phone)
                     INSERT INTO jobs (call_id, phone, report, state, created_at, updated_at)
                     SELECT $1, n.phone, $3, 'queued', ",
                    now_ms_sql!(),
                    ", ",
                    now_ms_sql!(),
                    " FROM n ON CONFLICT (call_id) DO NOTHING"
                ))
                .await?;
            let inserted = c.execute(&stmt, &[&r.call_id, &phone, &json]).await?;
            Ok(inserted == 0)
        })
        .await
    }

    pub(crate) async fn status(&self, call_id: &str) -> Result<Option<CallStatus>> {
        timed_q(async {
            let c = self.pool.get().await?;
            let stmt = c
                .prepare_cached(
                    "SELECT call_id, state, attempts, last_error, user_id, organization_id,
                            ticket_id, created_user, created_organization, created_ticket,
                            comment_added, call_record_id, next_attempt_at, note
                     FROM jobs WHERE call_id = $1",
                )
                .await?;
            let Some(r) = c.query_opt(&stmt, &[&call_id]).await? else {
                return Ok(None);
            };
            let id: String = r.get("call_id");
            let state_name: String = r.get("state");
            let state = SyncState::parse(&state_name).ok_or_else(|| PgQueueError::Corrupt {
                call_id: id.clone(),
                message: format!("unknown state {state_name:?}"),
            })?;
            let mut last_error: String = r.get("last_error");
            let note: String = r.get("note");
            if last_error.is_empty() && !note.is_empty() {
                last_error = note;
            }
            let next: Option<i64> = r.get("next_attempt_at");
            Ok(Some(CallStatus {
                call_id: id,
                state,
                attempts: r.get::<_, i32>("attempts").max(0) as u32,
                last_error,
                user_id: r.get("user_id"),
                organization_id: r.get("organization_id"),
                ticket_id: r.get("ticket_id"),
                created_user: r.get("created_user"),
                created_organization: r.get("created_organization"),
                created_ticket: r.get("created_ticket"),
                comment_added: r.get("comment_added"),
                call_record_id: r.get("call_record_id"),
                next_attempt_at: match state {
                    SyncState::RetryWait => next.map(|ms| (ms + 999).div_euclid(1000)),
                    _ => None,
                },
            }))
        })
        .await
    }

    /// Jobs per state, every state present: the folded counters plus the changes not folded
    /// yet, in one statement (one snapshot, so a concurrent [`Self::compact_counts`] is seen
    /// whole or not at all). Folds them in the background when many are pending.
    pub(crate) async fn counts(&self) -> Result<BTreeMap<SyncState, u64>> {
        let (out, pending) = timed_q(async {
            let c = self.pool.get().await?;
            let stmt = c
                .prepare_cached(
                    "SELECT state, sum(n)::bigint, sum(pending)::bigint FROM (
                         SELECT state, n, 0 AS pending FROM job_counts
                         UNION ALL
                         SELECT state, n, 1 FROM job_count_changes) c
                     GROUP BY state",
                )
                .await?;
            let mut out: BTreeMap<SyncState, u64> =
                SyncState::ALL.into_iter().map(|s| (s, 0)).collect();
            let mut pending = 0i64;
            for r in c.query(&stmt, &[]).await? {
                let state: String = r.get(0);
                let n: i64 = r.get(1);
                pending += r.get::<_, i64>(2);
                if let Some(s) = SyncState::parse(&state) {
                    out.insert(s, n.max(0) as u64);
                }
            }
            Ok((out, pending))
        })
        .await?;
        if pending > COMPACT_AT {
            let this = self.clone();
            tokio::spawn(async move {
                if let Err(e) = this.compact_counts().await {
                    tracing::warn!(error = %e, "job counters not folded; trying again later");
                }
            });
        }
        Ok(out)
    }

    /// Folds the pending counter changes (`job_count_changes`, appended by the triggers) into
    /// `job_counts`; returns how many. One transaction, so readers see the counts unchanged; one
    /// replica at a time (a try-lock: a second caller returns 0 at once).
    pub(crate) async fn compact_counts(&self) -> Result<u64> {
        timed_q(async {
            let mut c = self.pool.get().await?;
            let tx = c.transaction().await?;
            let locked: bool = tx
                .query_one(
                    "SELECT pg_try_advisory_xact_lock($1, hashtext(current_schema() || ':job_counts'))",
                    &[&crate::pg::LOCK_NAMESPACE],
                )
                .await?
                .get(0);
            if !locked {
                return Ok(0);
            }
            let folded: i64 = tx
                .query_one(
                    "WITH moved AS (DELETE FROM job_count_changes RETURNING state, n),
                          sums AS (SELECT state, sum(n)::bigint AS n, count(*) AS rows
                                   FROM moved GROUP BY state),
                          folded AS (INSERT INTO job_counts (state, n) SELECT state, n FROM sums
                                     ON CONFLICT (state) DO UPDATE SET n = job_counts.n + EXCLUDED.n)
                     SELECT coalesce(sum(rows), 0)::bigint FROM sums",
                    &[],
                )
                .await?
                .get(0);
            tx.commit().await?;
            Ok(folded.max(0) as u64)
        })
        .await
    }

    /// Deletes the `DONE` and `FAILED` jobs whose last change is before `before_ms` (Unix ms), a
    /// batch per transaction (as the SQLite queue does); returns how many. The `numbers` rows stay:
    /// they remember what this deployment created for each number.
    pub(crate) async fn purge_finished(&self, before_ms: i64) -> Result<u64> {
        let mut total = 0u64;
        loop {
            let n = timed_q(async {
                let c = self.pool.get().await?;
                Ok(c.execute(
                    "DELETE FROM jobs WHERE seq IN (
                         SELECT seq FROM jobs
                         WHERE state IN ('done', 'failed') AND updated_at < $1
                         LIMIT $2)",
                    &[&before_ms, &PURGE_BATCH],
                )
                .await?)
            })
            .await?;
            total += n;
            if n < PURGE_BATCH as u64 {
                return Ok(total);
            }
        }
    }

    /// Claims one job (see the module doc for the protocol).
    pub(crate) async fn claim(&self) -> Result<Option<Job>> {
        timed_q(async {
            let mut c = self.pool.get().await?;
            let candidates = c
                .prepare_cached(concat!(
                    "SELECT j.phone FROM jobs j JOIN numbers n ON n.phone = j.phone
                     WHERE j.state IN ('queued', 'retry_wait', 'in_progress')
                       AND (j.state <> 'retry_wait' OR j.next_attempt_at <= ",
                    now_ms_sql!(),
                    ")
                       AND (n.lease_until IS NULL OR n.lease_until < ",
                    now_ms_sql!(),
                    ")
                       AND NOT EXISTS (SELECT 1 FROM jobs k
                                       WHERE k.phone = j.phone AND k.seq < j.seq
                                         AND k.state IN ('queued', 'retry_wait', 'in_progress'))
                     ORDER BY j.seq LIMIT 8"
                ))
                .await?;
            let phones: Vec<i64> = c
                .query(&candidates, &[])
                .await?
                .iter()
                .map(|r| r.get(0))
                .collect();
            for phone in phones {
                if let Some(job) = self.claim_number(&mut c, phone).await? {
                    return Ok(Some(job));
                }
            }
            Ok(None)
        })
        .await
    }

    async fn claim_number(
        &self,
        c: &mut deadpool_postgres::Client,
        phone: i64,
    ) -> Result<Option<Job>> {
        let lock = c
            .prepare_cached(concat!(
                "SELECT ",
                now_ms_sql!(),
                " FROM numbers WHERE phone = $1 AND (lease_until IS NULL OR lease_until < ",
                now_ms_sql!(),
                ") FOR UPDATE SKIP LOCKED"
            ))
            .await?;
        let oldest = c
            .prepare_cached(&format!(
                "SELECT {JOB_COLUMNS} FROM jobs
                 WHERE phone = $1 AND state IN ('queued', 'retry_wait', 'in_progress')
                 ORDER BY seq LIMIT 1"
            ))
            .await?;
        let tx = c.transaction().await?;
        let Some(row) = tx.query_opt(&lock, &[&phone]).await? else {
            // Another replica holds or is claiming the number.
            return Ok(None);
        };
        let now: i64 = row.get(0);
        let Some(r) = tx.query_opt(&oldest, &[&phone]).await? else {
            return Ok(None);
        };
        let state: String = r.get("state");
        let next: Option<i64> = r.get("next_attempt_at");
        if state == "retry_wait" && next.is_some_and(|at| at > now) {
            // The number's oldest job is waiting to retry: later ones wait behind it.
            return Ok(None);
        }
        let seq: i64 = r.get("seq");
        let call_id: String = r.get("call_id");
        let token: i64 = rand::rng().random();
        let json: String = r.get("report");
        let report: CallReport = match serde_json::from_str(&json) {
            Ok(rep) => rep,
            Err(e) => {
                // A row nobody can read must not block its number: fail it, say why.
                tx.execute(
                    concat!(
                        "UPDATE jobs SET state = 'failed', last_error = $2, lease_token = NULL,
                                updated_at = ",
                        now_ms_sql!(),
                        " WHERE seq = $1"
                    ),
                    &[&seq, &format!("stored report is unreadable: {e}")],
                )
                .await?;
                tx.commit().await?;
                return Err(PgQueueError::Corrupt {
                    call_id,
                    message: e.to_string(),
                });
            }
        };
        let take_job = tx
            .prepare_cached(concat!(
                "UPDATE jobs SET state = 'in_progress', attempts = attempts + 1,
                        next_attempt_at = NULL, lease_token = $2, updated_at = ",
                now_ms_sql!(),
                " WHERE seq = $1"
            ))
            .await?;
        let take_number = tx
            .prepare_cached(concat!(
                "UPDATE numbers SET lease_token = $2, lease_owner = $3, lease_until = ",
                now_ms_sql!(),
                " + $4 WHERE phone = $1"
            ))
            .await?;
        tx.execute(&take_job, &[&seq, &token]).await?;
        tx.execute(
            &take_number,
            &[&phone, &token, &&*self.owner, &self.lease_ms()],
        )
        .await?;
        tx.commit().await?;
        let attempts: i32 = r.get("attempts");
        Ok(Some(Job {
            seq,
            report,
            attempts: attempts.max(0) as u32 + 1,
            progress: progress_of(&r),
            lease: token,
        }))
    }

    /// Extends the job's lease to `now + lease`; [`PgQueueError::LeaseLost`] when another
    /// replica has taken it over.
    pub(crate) async fn renew(&self, job: &Job) -> Result<()> {
        timed_q(async {
            let c = self.pool.get().await?;
            let stmt = c
                .prepare_cached(concat!(
                    "UPDATE numbers SET lease_until = ",
                    now_ms_sql!(),
                    " + $3 WHERE phone = $1 AND lease_token = $2"
                ))
                .await?;
            let n = c
                .execute(
                    &stmt,
                    &[
                        &digits(job.report.client_e164),
                        &job.lease,
                        &self.lease_ms(),
                    ],
                )
                .await?;
            if n == 0 {
                return Err(PgQueueError::LeaseLost);
            }
            Ok(())
        })
        .await
    }

    /// Records the steps done so far (fenced by the lease token).
    pub(crate) async fn save_progress(&self, job: &Job, p: &Progress) -> Result<()> {
        timed_q(async {
            let c = self.pool.get().await?;
            let stmt = c
                .prepare_cached(concat!(
                    "UPDATE jobs SET user_id = $3, organization_id = $4, ticket_id = $5,
                            created_user = $6, created_organization = $7, created_ticket = $8,
                            comment_added = $9, comment_uncertain = $10, call_record_id = $11,
                            ticket_request = $12, ticket_first_sent_ms = $13, note = $14,
                            updated_at = ",
                    now_ms_sql!(),
                    " WHERE seq = $1 AND lease_token = $2 AND state = 'in_progress'"
                ))
                .await?;
            let n = c
                .execute(
                    &stmt,
                    &[
                        &job.seq,
                        &job.lease,
                        &p.user_id,
                        &p.organization_id,
                        &p.ticket_id,
                        &p.created_user,
                        &p.created_organization,
                        &p.created_ticket,
                        &p.comment_added,
                        &p.comment_uncertain,
                        &p.call_record_id,
                        &p.ticket_request,
                        &p.ticket_first_sent_ms,
                        &p.note,
                    ],
                )
                .await?;
            if n == 0 {
                return Err(PgQueueError::LeaseLost);
            }
            Ok(())
        })
        .await
    }

    /// Ends the claim: the job goes to `state` and the number's lease is released, in one
    /// transaction that locks the number first (the claim's lock order).
    async fn end_claim(
        &self,
        job: &Job,
        state: SyncState,
        next_attempt_ms: Option<i64>,
        error: Option<String>,
    ) -> Result<()> {
        timed_q(async {
            let mut c = self.pool.get().await?;
            let free = c
                .prepare_cached(
                    "UPDATE numbers SET lease_token = NULL, lease_owner = NULL, lease_until = NULL
                     WHERE phone = $1 AND lease_token = $2",
                )
                .await?;
            let set = c
                .prepare_cached(concat!(
                    "UPDATE jobs SET state = $3, next_attempt_at = $4,
                            last_error = COALESCE($5, last_error), lease_token = NULL,
                            updated_at = ",
                    now_ms_sql!(),
                    " WHERE seq = $1 AND lease_token = $2 AND state = 'in_progress'"
                ))
                .await?;
            let tx = c.transaction().await?;
            let freed = tx
                .execute(&free, &[&digits(job.report.client_e164), &job.lease])
                .await?;
            let set = tx
                .execute(
                    &set,
                    &[
                        &job.seq,
                        &job.lease,
                        &state.as_str(),
                        &next_attempt_ms,
                        &error,
                    ],
                )
                .await?;
            if freed == 0 || set == 0 {
                // Dropping the transaction rolls it back.
                return Err(PgQueueError::LeaseLost);
            }
            tx.commit().await?;
            Ok(())
        })
        .await
    }

    pub(crate) async fn finish(&self, job: &Job) -> Result<()> {
        self.end_claim(job, SyncState::Done, None, Some(String::new()))
            .await
    }

    pub(crate) async fn fail(&self, job: &Job, error: String) -> Result<()> {
        self.end_claim(job, SyncState::Failed, None, Some(error))
            .await
    }

    pub(crate) async fn retry_at(&self, job: &Job, at_ms: i64, error: String) -> Result<()> {
        self.end_claim(job, SyncState::RetryWait, Some(at_ms), Some(error))
            .await
    }

    /// Back to `QUEUED` at shutdown, lease released so another replica resumes it at once.
    pub(crate) async fn release(&self, job: &Job) -> Result<()> {
        self.end_claim(job, SyncState::Queued, None, None).await
    }

    /// The earliest moment (Unix ms, database clock) a job may become claimable without a new
    /// report: a retry falling due or a lease running out.
    pub(crate) async fn next_due_ms(&self) -> Result<Option<i64>> {
        timed_q(async {
            let c = self.pool.get().await?;
            let r = c
                .query_one(
                    "SELECT LEAST(
                         (SELECT MIN(next_attempt_at) FROM jobs WHERE state = 'retry_wait'),
                         (SELECT MIN(lease_until) FROM numbers WHERE lease_until IS NOT NULL))",
                    &[],
                )
                .await?;
            Ok(r.get::<_, Option<i64>>(0))
        })
        .await
    }

    /// The user this deployment created for `phone` (by any replica).
    pub(crate) async fn own_user(&self, phone: E164) -> Result<Option<i64>> {
        self.own("own_user_id", phone).await
    }

    /// The ticket this deployment created for `phone` most recently.
    pub(crate) async fn own_ticket(&self, phone: E164) -> Result<Option<i64>> {
        self.own("own_ticket_id", phone).await
    }

    async fn own(&self, column: &'static str, phone: E164) -> Result<Option<i64>> {
        timed_q(async {
            let c = self.pool.get().await?;
            let stmt = c
                .prepare_cached(&format!("SELECT {column} FROM numbers WHERE phone = $1"))
                .await?;
            Ok(c.query_opt(&stmt, &[&digits(phone)])
                .await?
                .and_then(|r| r.get::<_, Option<i64>>(0)))
        })
        .await
    }

    pub(crate) async fn remember(&self, column: OwnColumn, phone: E164, id: i64) -> Result<()> {
        let column = match column {
            OwnColumn::User => "own_user_id",
            OwnColumn::Organization => "own_organization_id",
            OwnColumn::Ticket => "own_ticket_id",
        };
        timed_q(async {
            let c = self.pool.get().await?;
            let stmt = c
                .prepare_cached(&format!(
                    "INSERT INTO numbers (phone, {column}) VALUES ($1, $2)
                     ON CONFLICT (phone) DO UPDATE SET {column} = EXCLUDED.{column}"
                ))
                .await?;
            c.execute(&stmt, &[&digits(phone), &id]).await?;
            Ok(())
        })
        .await
    }
}

/// What [`PgQueue::remember`] records for a number.
#[derive(Debug, Clone, Copy)]
pub(crate) enum OwnColumn {
    User,
    Organization,
    Ticket,
}
