//! The account's Zendesk request budget, shared by every replica (DESIGN §8 "Budget").
//!
//! Same contract as the in-process [`crate::zendesk::budget::Budget`], made cluster-wide:
//! - **Sliding window of reservations.** Every request is first reserved as a row
//!   `(budget, kind, sent_at)` in `cluster_budget_sent`. A reservation of kind `k` is granted only if
//!   fewer than `limit(k)` rows of `k` have `sent_at` within the last `window + margin`; otherwise the
//!   answer is the exact wait until the oldest row that matters leaves the window. An `export`
//!   reservation also counts as an `account` one (Zendesk counts exports in the account budget too),
//!   so it writes one row of each kind.
//! - **Serialised, on the database clock.** Each reservation is one transaction that first takes
//!   `pg_advisory_xact_lock` per kind (`export` before `account`, always in that order, so no
//!   deadlock), then reads `clock_timestamp()` (not `now()`, which is the transaction's start, before
//!   the lock wait). Reservations of a kind are therefore totally ordered with increasing `sent_at`,
//!   and each sees every earlier one committed: the count can never be exceeded, whatever the number
//!   of replicas. The `margin` (500 ms by default, as in-process) covers the time between the
//!   reservation and the request's arrival at Zendesk.
//! - **Pause.** [`SharedBudget::pause_for`] (a 429's `Retry-After`) stores
//!   `paused_until = greatest(old, clock_timestamp() + retry_after)` in `cluster_budget_state`;
//!   every replica reads it in every reservation, so a 429 anywhere pauses all.
//! - **Half-open after a pause.** A pause also sets `half_open`. While half-open, a reservation is
//!   granted only as *the* probe: it must claim the state row (`probe_until` empty or expired, set to
//!   `now + probe_timeout`, with a fresh `probe_id`) in an `UPDATE … WHERE` that the row lock makes
//!   atomic across replicas. Everybody else waits. The probe's outcome is reported with
//!   [`SharedBudget::report`]: an answer (any status but 429) closes the half-open state, no answer
//!   frees the probe slot for another, a 429 leads to a new pause (which also voids the probe). A probe
//!   whose replica died is replaced after `probe_timeout`.
//! - **Pruning.** Rows older than the window are deleted by the reservations themselves, inside the
//!   same locked transaction, so the table stays at about one window of rows.
//! - **Local fairness.** Within a replica, callers queue FIFO on a tokio `Mutex` per kind, like the
//!   in-process budget; across replicas, whoever asks first after a slot frees gets it.
//!
//! If PostgreSQL is unreachable, [`SharedBudget::acquire`] returns the error: the caller decides
//! (the wiring can fall back to its local budget at `1/replicas` of the limit).

use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use deadpool_postgres::Pool;
use tokio::sync::Mutex;

use super::{ClusterError, advisory_xact_lock, from_secs, secs};

pub const MIGRATIONS: &[(&str, &str)] = &[(
    "cluster_0002_budget",
    "CREATE TABLE IF NOT EXISTS cluster_budget_sent (
        budget  text NOT NULL,
        kind    text NOT NULL,
        sent_at timestamptz NOT NULL,
        replica text NOT NULL
    );
    CREATE INDEX IF NOT EXISTS cluster_budget_sent_window
        ON cluster_budget_sent (budget, kind, sent_at);
    CREATE TABLE IF NOT EXISTS cluster_budget_state (
        budget       text PRIMARY KEY,
        paused_until timestamptz,
        half_open    boolean NOT NULL DEFAULT false,
        probe_id     bigint,
        probe_until  timestamptz,
        probe_holder text
    );",
)];

/// What a request counts against.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BudgetKind {
    /// Any request (`zendesk.requests_per_minute`).
    Account,
    /// An incremental-export request (10 a minute), which also counts as an `Account` one.
    Export,
}

impl BudgetKind {
    pub fn as_str(self) -> &'static str {
        match self {
            BudgetKind::Account => "account",
            BudgetKind::Export => "export",
        }
    }

    /// The kinds a reservation of `self` takes, in lock order.
    fn takes(self) -> &'static [BudgetKind] {
        match self {
            BudgetKind::Account => &[BudgetKind::Account],
            BudgetKind::Export => &[BudgetKind::Export, BudgetKind::Account],
        }
    }
}

/// Settings of a shared budget.
#[derive(Debug, Clone)]
pub struct SharedBudgetConfig {
    /// The budget's key: the Zendesk account (subdomain), so one database can serve several.
    pub name: String,
    /// This replica's id (recorded with each reservation, for diagnosis).
    pub replica: String,
    /// `zendesk.requests_per_minute` (per `window`).
    pub limit: u32,
    /// Incremental exports per `window` (10 at Zendesk).
    pub export_limit: u32,
    /// The rate-limit window: 60 s at Zendesk, shorter in tests.
    pub window: Duration,
    /// Extra time each reservation stays in the window (arrival jitter, see the module docs).
    pub margin: Duration,
    /// How long a granted probe may stay unanswered before another replica may probe.
    pub probe_timeout: Duration,
    /// How often a caller waiting behind someone else's probe asks again.
    pub probe_poll: Duration,
}

impl SharedBudgetConfig {
    /// Zendesk's defaults: a 60 s window, 500 ms margin, 30 s probe timeout.
    pub fn new(name: impl Into<String>, replica: impl Into<String>, limit: u32, export_limit: u32) -> Self {
        Self {
            name: name.into(),
            replica: replica.into(),
            limit: limit.max(1),
            export_limit: export_limit.max(1).min(limit.max(1)),
            window: Duration::from_secs(60),
            margin: Duration::from_millis(500),
            probe_timeout: Duration::from_secs(30),
            probe_poll: Duration::from_millis(100),
        }
    }
}

/// The answer to one reservation attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reservation {
    /// Send the request now (it has been recorded).
    Go(Grant),
    /// Nothing was recorded; ask again after this long.
    Wait(Duration),
}

/// A granted request. `probe` marks the single request let through after a pause: report its
/// outcome with [`SharedBudget::report`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grant {
    pub kind: BudgetKind,
    pub probe: bool,
    probe_id: Option<i64>,
}

/// The budget's use across all replicas (for metrics and `deskline check`).
#[derive(Debug, Clone, PartialEq)]
pub struct SharedBudgetUsage {
    pub limit: u32,
    pub export_limit: u32,
    /// Reservations in the current window (all kinds, all replicas).
    pub used: u32,
    pub export_used: u32,
    /// How long requests are still paused by a 429 (zero if not).
    pub paused_for: Duration,
    /// After a pause, until a probe succeeds.
    pub half_open: bool,
    /// Requests this replica was granted since start.
    pub granted_here: u64,
}

/// The account's request budget, shared through PostgreSQL.
pub struct SharedBudget {
    pool: Pool,
    cfg: SharedBudgetConfig,
    /// Local FIFO queues, as in the in-process budget.
    turn: Mutex<()>,
    export_turn: Mutex<()>,
    granted: AtomicU64,
}

impl std::fmt::Debug for SharedBudget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedBudget")
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

impl SharedBudget {
    pub fn new(pool: Pool, cfg: SharedBudgetConfig) -> Self {
        Self {
            pool,
            cfg,
            turn: Mutex::new(()),
            export_turn: Mutex::new(()),
            granted: AtomicU64::new(0),
        }
    }

    pub fn config(&self) -> &SharedBudgetConfig {
        &self.cfg
    }

    fn limit(&self, kind: BudgetKind) -> u32 {
        match kind {
            BudgetKind::Account => self.cfg.limit,
            BudgetKind::Export => self.cfg.export_limit,
        }
    }

    /// Waits until one more request of `kind` may be sent by any replica, then returns its grant.
    /// Cancel-safe: a dropped waiter has recorded nothing (each attempt is one transaction).
    pub async fn acquire(&self, kind: BudgetKind) -> Result<Grant, ClusterError> {
        let _export_turn = match kind {
            BudgetKind::Export => Some(self.export_turn.lock().await),
            BudgetKind::Account => None,
        };
        let _turn = self.turn.lock().await;
        loop {
            match self.reserve(kind).await? {
                Reservation::Go(grant) => return Ok(grant),
                // A pause set meanwhile only moves the time later; the next attempt re-checks.
                Reservation::Wait(d) => tokio::time::sleep(d).await,
            }
        }
    }

    /// One attempt: either records a request of `kind` now, or says how long to wait.
    pub async fn reserve(&self, kind: BudgetKind) -> Result<Reservation, ClusterError> {
        let name = &self.cfg.name;
        let keep = secs(self.cfg.window + self.cfg.margin);
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        for k in kind.takes() {
            advisory_xact_lock(&tx, &format!("budget:{name}:{}", k.as_str())).await?;
        }

        // Pause and half-open state.
        let state = tx
            .query_opt(
                "SELECT extract(epoch FROM paused_until - clock_timestamp())::float8,
                        half_open,
                        extract(epoch FROM probe_until - clock_timestamp())::float8
                 FROM cluster_budget_state WHERE budget = $1",
                &[name],
            )
            .await?;
        let mut half_open = false;
        if let Some(row) = state {
            let paused = from_secs(row.get::<_, Option<f64>>(0).unwrap_or(0.0));
            if !paused.is_zero() {
                return Ok(Reservation::Wait(paused));
            }
            half_open = row.get(1);
            let probe_left = from_secs(row.get::<_, Option<f64>>(2).unwrap_or(0.0));
            if half_open && !probe_left.is_zero() {
                return Ok(Reservation::Wait(probe_left.min(self.cfg.probe_poll)));
            }
        }

        // The window of each kind taken: wait for the slot that frees last.
        let mut wait = Duration::ZERO;
        for &k in kind.takes() {
            let offset = i64::from(self.limit(k)) - 1;
            let row = tx
                .query_opt(
                    "SELECT extract(epoch FROM sent_at + make_interval(secs => $3)
                                               - clock_timestamp())::float8
                     FROM cluster_budget_sent
                     WHERE budget = $1 AND kind = $2
                       AND sent_at > clock_timestamp() - make_interval(secs => $3)
                     ORDER BY sent_at DESC OFFSET $4 LIMIT 1",
                    &[name, &k.as_str(), &keep, &offset],
                )
                .await?;
            if let Some(row) = row {
                // At least `limit` rows are in the window: the limit-th newest must leave it. A
                // zero here (it leaves right now) still means "ask again", never "go".
                wait = wait.max(from_secs(row.get(0)).max(Duration::from_millis(1)));
            }
        }
        if !wait.is_zero() {
            return Ok(Reservation::Wait(wait));
        }

        // Half-open: only the one replica that claims the probe goes.
        let mut probe_id = None;
        if half_open {
            let id: i64 = rand::random();
            let claimed = tx
                .execute(
                    "UPDATE cluster_budget_state
                     SET probe_id = $2, probe_holder = $3,
                         probe_until = clock_timestamp() + make_interval(secs => $4)
                     WHERE budget = $1 AND half_open
                       AND (paused_until IS NULL OR paused_until <= clock_timestamp())
                       AND (probe_until IS NULL OR probe_until <= clock_timestamp())",
                    &[name, &id, &self.cfg.replica, &secs(self.cfg.probe_timeout)],
                )
                .await?;
            if claimed == 0 {
                return Ok(Reservation::Wait(self.cfg.probe_poll));
            }
            probe_id = Some(id);
        }

        for k in kind.takes() {
            tx.execute(
                "INSERT INTO cluster_budget_sent (budget, kind, sent_at, replica)
                 VALUES ($1, $2, clock_timestamp(), $3)",
                &[name, &k.as_str(), &self.cfg.replica],
            )
            .await?;
            // We hold this kind's lock, so pruning cannot race another reservation's count.
            tx.execute(
                "DELETE FROM cluster_budget_sent
                 WHERE budget = $1 AND kind = $2
                   AND sent_at <= clock_timestamp() - make_interval(secs => $3)",
                &[name, &k.as_str(), &keep],
            )
            .await?;
        }
        tx.commit().await?;
        self.granted.fetch_add(1, Ordering::Relaxed);
        Ok(Reservation::Go(Grant {
            kind,
            probe: probe_id.is_some(),
            probe_id,
        }))
    }

    /// Holds back every replica's requests for `retry_after` from now (a 429's `Retry-After`) and,
    /// after that, lets a single probe through until one is answered. Never shortens a pause.
    pub async fn pause_for(&self, retry_after: Duration) -> Result<(), ClusterError> {
        let client = self.pool.get().await?;
        client
            .execute(
                "INSERT INTO cluster_budget_state AS s (budget, paused_until, half_open)
                 VALUES ($1, clock_timestamp() + make_interval(secs => $2), true)
                 ON CONFLICT (budget) DO UPDATE SET
                     paused_until = greatest(s.paused_until, EXCLUDED.paused_until),
                     half_open = true, probe_id = NULL, probe_until = NULL, probe_holder = NULL",
                &[&self.cfg.name, &secs(retry_after)],
            )
            .await?;
        Ok(())
    }

    /// [`SharedBudget::pause_for`] with a deadline on the local clock, like the in-process budget.
    pub async fn pause_until(&self, until: tokio::time::Instant) -> Result<(), ClusterError> {
        self.pause_for(until.saturating_duration_since(tokio::time::Instant::now()))
            .await
    }

    /// Reports the HTTP status of a granted request (`0` for no response). Only a probe's outcome
    /// matters: any answer but 429 ends the half-open state; no answer lets another probe go; a 429
    /// is followed by the caller's [`SharedBudget::pause_for`].
    pub async fn report(&self, grant: &Grant, status: u16) -> Result<(), ClusterError> {
        let Some(id) = grant.probe_id else {
            return Ok(());
        };
        let sql = match status {
            429 => return Ok(()),
            0 => {
                "UPDATE cluster_budget_state SET probe_id = NULL, probe_until = NULL,
                        probe_holder = NULL
                 WHERE budget = $1 AND probe_id = $2"
            }
            _ => {
                "UPDATE cluster_budget_state SET half_open = false, probe_id = NULL,
                        probe_until = NULL, probe_holder = NULL
                 WHERE budget = $1 AND probe_id = $2"
            }
        };
        let client = self.pool.get().await?;
        client.execute(sql, &[&self.cfg.name, &id]).await?;
        Ok(())
    }

    /// The budget's use across all replicas now.
    pub async fn usage(&self) -> Result<SharedBudgetUsage, ClusterError> {
        let client = self.pool.get().await?;
        let keep = secs(self.cfg.window + self.cfg.margin);
        let row = client
            .query_one(
                "SELECT
                   (SELECT count(*) FROM cluster_budget_sent WHERE budget = $1 AND kind = 'account'
                      AND sent_at > clock_timestamp() - make_interval(secs => $2)),
                   (SELECT count(*) FROM cluster_budget_sent WHERE budget = $1 AND kind = 'export'
                      AND sent_at > clock_timestamp() - make_interval(secs => $2)),
                   (SELECT extract(epoch FROM paused_until - clock_timestamp())::float8
                      FROM cluster_budget_state WHERE budget = $1),
                   coalesce((SELECT half_open FROM cluster_budget_state WHERE budget = $1), false)",
                &[&self.cfg.name, &keep],
            )
            .await?;
        Ok(SharedBudgetUsage {
            limit: self.cfg.limit,
            export_limit: self.cfg.export_limit,
            used: u32::try_from(row.get::<_, i64>(0)).unwrap_or(u32::MAX),
            export_used: u32::try_from(row.get::<_, i64>(1)).unwrap_or(u32::MAX),
            paused_for: from_secs(row.get::<_, Option<f64>>(2).unwrap_or(0.0)),
            half_open: row.get(3),
            granted_here: self.granted.load(Ordering::Relaxed),
        })
    }
}
