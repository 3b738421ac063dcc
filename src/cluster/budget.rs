//! The account's Zendesk request budget, shared by every replica (DESIGN §8 "Budget").
//!
//! Same contract as the in-process [`crate::zendesk::budget::Budget`], made cluster-wide:
//! - **Sliding window of requests, each held from its reservation to its answer.** Every request
//!   is first reserved as a row `(budget, kind, sent_at, grant_id)` in `cluster_budget_sent`, and
//!   finished ([`SharedBudget::finish`]) once its answer is in (or it was given up), which sets
//!   `done_at`. A row holds a slot while its request may still reach Zendesk, and one window plus
//!   `margin` after that: from `sent_at` to `done_at + window + margin`, an unfinished row as if it
//!   were finished now. A reservation of kind `k` is granted only if fewer than `limit(k)` rows of
//!   `k` hold a slot; otherwise the answer is the wait until the row that matters frees it (for an
//!   unfinished row, a lower bound: it cannot free its slot sooner). An `export` reservation also
//!   counts as an `account` one (Zendesk counts exports in the account budget too), so it writes one
//!   row of each kind.
//! - **Why until the answer, not from the reservation.** Zendesk counts a request when it arrives,
//!   which is after the reservation by however long the replica took to send it and the network to
//!   carry it; a replica that stalls between the two (a loaded machine, a pause of the process) can
//!   land an old request in the same Zendesk minute as the requests reserved a window after it. A
//!   window counted from the reservation with a fixed margin let exactly that through (a 429 in
//!   `tests/replicas.rs` on a machine at load 13). Counted up to the answer, which comes after the
//!   arrival, the window covers every arrival whatever the stall: with reservations serialised
//!   (below), no `window` of arrivals at Zendesk can hold more than the limit. The `margin` (500 ms
//!   by default) remains only for how Zendesk rounds its own window. The cost is each request's
//!   latency added to its time in the window, well under 1 % of a minute.
//! - **A replica that dies with requests in flight** cannot finish them: an unfinished row is
//!   treated as finished `flight_timeout` after its reservation (longer than any request lasts: the
//!   service sets it to twice `zendesk.timeout_seconds`, at least a minute). A live replica whose
//!   finish fails (PostgreSQL down) leaves the same: its rows hold their slots until then, which
//!   only wastes budget.
//! - **Serialised, on the database clock.** Each reservation is one transaction that first takes
//!   `pg_advisory_xact_lock` per kind (`export` before `account`, always in that order, so no
//!   deadlock), then reads `clock_timestamp()` (not `now()`, which is the transaction's start, before
//!   the lock wait). Reservations of a kind are therefore totally ordered with increasing `sent_at`,
//!   and each sees every earlier one committed: the count can never be exceeded, whatever the number
//!   of replicas.
//! - **Pause.** [`SharedBudget::pause_for`] (a 429's `Retry-After`) stores
//!   `paused_until = greatest(old, clock_timestamp() + retry_after)` in `cluster_budget_state`;
//!   every replica reads it in every reservation, so a 429 anywhere pauses all.
//! - **Half-open after a pause.** A pause also sets `half_open`. While half-open, a reservation is
//!   granted only as *the* probe: it must claim the state row (`probe_until` empty or expired, set to
//!   `now + probe_timeout`, with the grant's id as `probe_id`) in an `UPDATE … WHERE` that the row
//!   lock makes atomic across replicas. Everybody else waits. The probe's outcome comes with its
//!   [`SharedBudget::finish`]: an answer (any status but 429) closes the half-open state, no answer
//!   frees the probe slot for another, a 429 leads to a new pause (which also voids the probe). A
//!   probe whose replica died is replaced after `probe_timeout`.
//! - **Pruning.** Rows that no longer hold a slot are deleted by the reservations themselves, inside
//!   the same locked transaction, so the table stays at about one window of rows.
//! - **Local fairness.** Within a replica, callers of a kind queue FIFO on a tokio `Mutex`, like the
//!   in-process budget; an export never holds the ordinary queue while it waits for the export limit.
//!   Across replicas (and between an export and ordinary requests), whoever asks first after a slot
//!   frees gets it: each waiter sleeps exactly until the slot the database named frees up.
//!
//! If PostgreSQL is unreachable, [`SharedBudget::acquire`] returns the error: the caller decides
//! (the wiring falls back to its local budget at `1/zendesk.replicas` of the limits).

use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use deadpool_postgres::Pool;

use super::{ClusterError, advisory_xact_lock, from_secs, secs};

pub(crate) const MIGRATIONS: &[(&str, &str)] = &[
    (
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
    ),
    (
        // Rows are held until their request's answer (see the module docs). Rows written before this
        // step have no `done_at`: they count as unfinished, i.e. until `flight_timeout`.
        "cluster_0005_budget_until_answered",
        "ALTER TABLE cluster_budget_sent
        ADD COLUMN IF NOT EXISTS grant_id bigint,
        ADD COLUMN IF NOT EXISTS done_at timestamptz;
    CREATE INDEX IF NOT EXISTS cluster_budget_sent_grant
        ON cluster_budget_sent (budget, grant_id);",
    ),
];

/// What a request counts against.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum BudgetKind {
    /// Any request (`zendesk.requests_per_minute`).
    Account,
    /// An incremental-export request (10 a minute), which also counts as an `Account` one.
    Export,
}

impl BudgetKind {
    pub(crate) fn as_str(self) -> &'static str {
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
pub(crate) struct SharedBudgetConfig {
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
    /// Extra time each request stays in the window after its answer (see the module docs).
    pub margin: Duration,
    /// An unfinished reservation (its replica died, or could not finish it) is treated as finished
    /// this long after it was made: longer than any request may take.
    pub flight_timeout: Duration,
    /// How long a granted probe may stay unanswered before another replica may probe.
    pub probe_timeout: Duration,
    /// How often a caller waiting behind someone else's probe asks again.
    pub probe_poll: Duration,
}

impl SharedBudgetConfig {
    /// Zendesk's defaults: a 60 s window, 500 ms margin, 30 s probe timeout, unfinished
    /// reservations held for at most 60 s.
    pub(crate) fn new(
        name: impl Into<String>,
        replica: impl Into<String>,
        limit: u32,
        export_limit: u32,
    ) -> Self {
        Self {
            name: name.into(),
            replica: replica.into(),
            limit: limit.max(1),
            export_limit: export_limit.max(1).min(limit.max(1)),
            window: Duration::from_secs(60),
            margin: Duration::from_millis(500),
            flight_timeout: Duration::from_secs(60),
            probe_timeout: Duration::from_secs(30),
            probe_poll: Duration::from_millis(100),
        }
    }
}

/// The answer to one reservation attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Reservation {
    /// Send the request now (it has been recorded).
    Go(Grant),
    /// Nothing was recorded; ask again after this long.
    Wait(Duration),
}

/// A granted request: finish it with [`SharedBudget::finish`] once its answer is in. `probe`
/// marks the single request let through after a pause, whose answer decides for the others.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Grant {
    pub kind: BudgetKind,
    pub probe: bool,
    /// The reservation's rows (`grant_id`), and the probe's `probe_id` when it is one.
    id: i64,
}

/// The budget's use across all replicas (for metrics and `deskline check`).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct SharedBudgetUsage {
    pub limit: u32,
    pub export_limit: u32,
    /// Requests holding a slot now (all kinds, all replicas; in flight or answered within the
    /// window).
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
pub(crate) struct SharedBudget {
    pool: Pool,
    cfg: SharedBudgetConfig,
    /// Local FIFO queues for [`acquire`](Self::acquire), as in the in-process budget (the service
    /// waits through `zendesk::Budget`, which keeps its own).
    #[cfg(test)]
    turn: tokio::sync::Mutex<()>,
    #[cfg(test)]
    export_turn: tokio::sync::Mutex<()>,
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
    pub(crate) fn new(pool: Pool, cfg: SharedBudgetConfig) -> Self {
        Self {
            pool,
            cfg,
            #[cfg(test)]
            turn: Default::default(),
            #[cfg(test)]
            export_turn: Default::default(),
            granted: AtomicU64::new(0),
        }
    }

    fn limit(&self, kind: BudgetKind) -> u32 {
        match kind {
            BudgetKind::Account => self.cfg.limit,
            BudgetKind::Export => self.cfg.export_limit,
        }
    }

    /// Waits until one more request of `kind` may be sent by any replica, then returns its grant.
    /// Cancel-safe: a dropped waiter has recorded nothing (each attempt is one transaction). The
    /// service waits through `zendesk::Budget`, which keeps the local queues; this is for tests.
    #[cfg(test)]
    pub(crate) async fn acquire(&self, kind: BudgetKind) -> Result<Grant, ClusterError> {
        // An export waits in its own queue only: holding the common one while it sleeps on the
        // (much smaller) export limit would stall every ordinary request of this replica.
        let _turn = match kind {
            BudgetKind::Export => self.export_turn.lock().await,
            BudgetKind::Account => self.turn.lock().await,
        };
        loop {
            match self.reserve(kind).await? {
                Reservation::Go(grant) => return Ok(grant),
                // A pause set meanwhile only moves the time later; the next attempt re-checks.
                Reservation::Wait(d) => tokio::time::sleep(d).await,
            }
        }
    }

    /// One attempt: either records a request of `kind` now, or says how long to wait.
    pub(crate) async fn reserve(&self, kind: BudgetKind) -> Result<Reservation, ClusterError> {
        let name = &self.cfg.name;
        let keep = secs(self.cfg.window + self.cfg.margin);
        let flight = secs(self.cfg.flight_timeout);
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

        // The window of each kind taken: wait for the slot that frees last. A row frees its slot
        // `keep` after its answer (`done_at`); an unfinished one no sooner than `keep` from now,
        // and at the latest `keep` after its flight timeout.
        let mut wait = Duration::ZERO;
        for &k in kind.takes() {
            let offset = i64::from(self.limit(k)) - 1;
            let row = tx
                .query_opt(
                    "SELECT extract(epoch FROM frees_at - now)::float8 FROM (
                         SELECT coalesce(done_at, least(t.now, sent_at + make_interval(secs => $4)))
                                    + make_interval(secs => $3) AS frees_at,
                                t.now
                         FROM cluster_budget_sent, (SELECT clock_timestamp() AS now) t
                         WHERE budget = $1 AND kind = $2) held
                     WHERE frees_at > now
                     ORDER BY frees_at DESC OFFSET $5 LIMIT 1",
                    &[name, &k.as_str(), &keep, &flight, &offset],
                )
                .await?;
            if let Some(row) = row {
                // At least `limit` rows hold a slot: the limit-th latest to free must free it. A
                // zero here (it frees right now) still means "ask again", never "go".
                wait = wait.max(from_secs(row.get(0)).max(Duration::from_millis(1)));
            }
        }
        if !wait.is_zero() {
            return Ok(Reservation::Wait(wait));
        }

        // Half-open: only the one replica that claims the probe goes.
        let id: i64 = rand::random();
        let mut probe = false;
        if half_open {
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
            probe = true;
        }

        for k in kind.takes() {
            // Record, and prune what holds no slot any more: we hold this kind's lock, so pruning
            // cannot race another reservation's count.
            tx.execute(
                "WITH pruned AS (
                     DELETE FROM cluster_budget_sent
                     WHERE budget = $1 AND kind = $2
                       AND coalesce(done_at, sent_at + make_interval(secs => $5))
                           <= clock_timestamp() - make_interval(secs => $4))
                 INSERT INTO cluster_budget_sent (budget, kind, sent_at, replica, grant_id)
                 VALUES ($1, $2, clock_timestamp(), $3, $6)",
                &[name, &k.as_str(), &self.cfg.replica, &keep, &flight, &id],
            )
            .await?;
        }
        tx.commit().await?;
        self.granted.fetch_add(1, Ordering::Relaxed);
        Ok(Reservation::Go(Grant { kind, probe, id }))
    }

    /// Holds back every replica's requests for `retry_after` from now (a 429's `Retry-After`) and,
    /// after that, lets a single probe through until one is answered. Never shortens a pause.
    pub(crate) async fn pause_for(&self, retry_after: Duration) -> Result<(), ClusterError> {
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
    pub(crate) async fn pause_until(
        &self,
        until: tokio::time::Instant,
    ) -> Result<(), ClusterError> {
        self.pause_for(until.saturating_duration_since(tokio::time::Instant::now()))
            .await
    }

    /// Finishes a granted request, once its answer is in (`status` is its HTTP status) or it was
    /// given up without one (`0`): from now its rows hold their slots for one window plus the
    /// margin (see the module docs). A probe's outcome also decides for the others: any answer but
    /// 429 ends the half-open state; no answer lets another probe go; a 429 is followed by the
    /// caller's [`SharedBudget::pause_for`]. Finishing twice changes nothing.
    pub(crate) async fn finish(&self, grant: &Grant, status: u16) -> Result<(), ClusterError> {
        const DONE: &str = "UPDATE cluster_budget_sent SET done_at = clock_timestamp()
                            WHERE budget = $1 AND grant_id = $2 AND done_at IS NULL";
        let sql = match (grant.probe, status) {
            (false, _) | (true, 429) => DONE.to_owned(),
            (true, 0) => format!(
                "WITH done AS ({DONE})
                 UPDATE cluster_budget_state SET probe_id = NULL, probe_until = NULL,
                        probe_holder = NULL
                 WHERE budget = $1 AND probe_id = $2"
            ),
            (true, _) => format!(
                "WITH done AS ({DONE})
                 UPDATE cluster_budget_state SET half_open = false, probe_id = NULL,
                        probe_until = NULL, probe_holder = NULL
                 WHERE budget = $1 AND probe_id = $2"
            ),
        };
        let client = self.pool.get().await?;
        client.execute(&sql, &[&self.cfg.name, &grant.id]).await?;
        Ok(())
    }

    /// The budget's use across all replicas now.
    pub(crate) async fn usage(&self) -> Result<SharedBudgetUsage, ClusterError> {
        let client = self.pool.get().await?;
        let keep = secs(self.cfg.window + self.cfg.margin);
        let flight = secs(self.cfg.flight_timeout);
        let row = client
            .query_one(
                "WITH held AS (
                     SELECT kind FROM cluster_budget_sent
                     WHERE budget = $1
                       AND coalesce(done_at, sent_at + make_interval(secs => $3))
                           > clock_timestamp() - make_interval(secs => $2))
                 SELECT
                   (SELECT count(*) FROM held WHERE kind = 'account'),
                   (SELECT count(*) FROM held WHERE kind = 'export'),
                   (SELECT extract(epoch FROM paused_until - clock_timestamp())::float8
                      FROM cluster_budget_state WHERE budget = $1),
                   coalesce((SELECT half_open FROM cluster_budget_state WHERE budget = $1), false)",
                &[&self.cfg.name, &keep, &flight],
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

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use tokio::time::Instant;

    use super::*;
    use crate::cluster::testing::migrated;

    /// The most of `times` in any window of `window`.
    fn max_in_window(times: &[Instant], window: Duration) -> usize {
        let mut sorted = times.to_vec();
        sorted.sort();
        let (mut best, mut lo) = (0, 0);
        for hi in 0..sorted.len() {
            while sorted[hi] - sorted[lo] >= window {
                lo += 1;
            }
            best = best.max(hi - lo + 1);
        }
        best
    }

    fn config(
        replica: usize,
        limit: u32,
        export_limit: u32,
        window: Duration,
    ) -> SharedBudgetConfig {
        let mut cfg =
            SharedBudgetConfig::new("acme", format!("replica-{replica}"), limit, export_limit);
        cfg.window = window;
        cfg.margin = Duration::from_millis(100);
        cfg.probe_poll = Duration::from_millis(20);
        cfg
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn three_replicas_never_exceed_any_window_and_use_at_least_90_percent() {
        let Some(db) = migrated().await else {
            return;
        };
        // A 4 s window: with 2 s the use and duration checks failed once while the machine was
        // busy compiling (scheduling delay is a larger share of a short window).
        let (limit, export_limit, window) = (40, 6, Duration::from_secs(4));
        // Four windows' worth of requests; then the callers still waiting are cancelled (acquire is
        // cancel-safe), so the measured span is the busy period only.
        let target = 4 * limit as usize;
        let granted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let done = tokio_util::sync::CancellationToken::new();
        let start = Instant::now();
        let mut tasks = Vec::new();
        for r in 0..3 {
            let budget = Arc::new(SharedBudget::new(
                db.pool_of(4),
                config(r, limit, export_limit, window),
            ));
            // Per replica: three callers of ordinary requests, one of exports.
            for c in 0..4 {
                let kind = if c == 0 {
                    BudgetKind::Export
                } else {
                    BudgetKind::Account
                };
                let (budget, granted, done) = (budget.clone(), granted.clone(), done.clone());
                tasks.push(tokio::spawn(async move {
                    let mut times = Vec::new();
                    loop {
                        let grant = tokio::select! {
                            g = budget.acquire(kind) => g.unwrap(),
                            _ = done.cancelled() => break,
                        };
                        assert!(!grant.probe);
                        times.push(Instant::now());
                        // Answered at once, as by a Zendesk that answers in no time.
                        budget.finish(&grant, 200).await.unwrap();
                        if granted.fetch_add(1, Ordering::SeqCst) + 1 >= target {
                            done.cancel();
                        }
                    }
                    (kind, times)
                }));
            }
        }
        let (mut all, mut exports) = (Vec::new(), Vec::new());
        for t in tasks {
            let (kind, times) = t.await.unwrap();
            if kind == BudgetKind::Export {
                exports.extend(&times);
            }
            all.extend(times);
        }
        all.sort();
        let busiest = max_in_window(&all, window);
        let busiest_export = max_in_window(&exports, window);
        // Use: requests in the whole windows of the busy period (from the first request, as many
        // windows of `window` as fit before the last one) against what the limit allows there.
        let (first, last) = (all[0], *all.last().unwrap());
        let windows = ((last - first).as_secs_f64() / window.as_secs_f64()).floor() as u32;
        assert!(windows >= 2, "busy period too short: {:?}", last - first);
        let in_windows = all
            .iter()
            .filter(|&&t| t < first + window * windows)
            .count();
        let used = in_windows as f64 / f64::from(windows * limit);
        println!(
            "shared budget: {} requests from 3 replicas (limit {limit} per {window:?}): busiest \
             window {busiest}, exports {} (busiest {busiest_export}/{export_limit}), \
             {in_windows} in the first {windows} windows = {:.1} % use",
            all.len(),
            exports.len(),
            used * 100.0
        );
        assert!(
            busiest <= limit as usize,
            "a window held {busiest} > {limit}"
        );
        assert!(busiest_export <= export_limit as usize);
        assert!(used >= 0.9, "budget use {:.1} % < 90 %", used * 100.0);
        assert!(start.elapsed() < window * 6, "took {:?}", start.elapsed());
        assert!(
            exports.len() >= 3 * export_limit as usize,
            "exports starved: {}",
            exports.len()
        );
        // Pruned to about one window.
        let client = db.pool_of(1).get().await.unwrap();
        let rows: i64 = client
            .query_one("SELECT count(*) FROM cluster_budget_sent", &[])
            .await
            .unwrap()
            .get(0);
        assert!(
            rows <= i64::from(limit + export_limit) * 2,
            "{rows} rows left"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn pause_is_honoured_by_all_replicas_then_one_probe_at_a_time() {
        let Some(db) = migrated().await else {
            return;
        };
        let budgets: Vec<_> = (0..3)
            .map(|r| {
                Arc::new(SharedBudget::new(
                    db.pool_of(2),
                    config(r, 100, 10, Duration::from_secs(60)),
                ))
            })
            .collect();
        // Normal traffic first.
        budgets[1].acquire(BudgetKind::Account).await.unwrap();

        let pause = Duration::from_secs(1);
        let t0 = Instant::now();
        budgets[0].pause_until(t0 + pause).await.unwrap();
        let usage = budgets[2].usage().await.unwrap();
        assert!(usage.half_open && !usage.paused_for.is_zero());

        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let mut tasks = Vec::new();
        for (r, b) in budgets.iter().enumerate() {
            for _ in 0..2 {
                let (b, tx) = (b.clone(), tx.clone());
                tasks.push(tokio::spawn(async move {
                    let grant = b.acquire(BudgetKind::Account).await.unwrap();
                    let _ = tx.send((r, grant, Instant::now()));
                }));
            }
        }
        // The first grant comes after the pause, and is the probe.
        let (r, probe, at) = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("no request after the pause")
            .unwrap();
        assert!(
            at - t0 >= pause,
            "granted {:?} into a {pause:?} pause",
            at - t0
        );
        assert!(probe.probe);
        // Nobody else goes while the probe is unanswered (an observation window, not a wait).
        let other = tokio::time::timeout(Duration::from_millis(600), rx.recv()).await;
        assert!(
            other.is_err(),
            "a second request went before the probe was answered: {other:?}"
        );

        // The probe got no response: exactly one more probe goes.
        budgets[r].finish(&probe, 0).await.unwrap();
        let (r2, probe2, _) = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("no second probe")
            .unwrap();
        assert!(probe2.probe);
        let other = tokio::time::timeout(Duration::from_millis(300), rx.recv()).await;
        assert!(other.is_err(), "two probes at once: {other:?}");

        // The probe is answered: everybody goes.
        budgets[r2].finish(&probe2, 200).await.unwrap();
        for _ in 0..4 {
            let (_, grant, _) = tokio::time::timeout(Duration::from_secs(5), rx.recv())
                .await
                .expect("requests still held after the probe succeeded")
                .unwrap();
            assert!(!grant.probe);
        }
        for t in tasks {
            t.await.unwrap();
        }
        let usage = budgets[0].usage().await.unwrap();
        assert!(!usage.half_open && usage.paused_for.is_zero());
        assert_eq!(usage.used, 7);
        // A shorter pause never shortens a longer one.
        budgets[0].pause_for(Duration::from_secs(30)).await.unwrap();
        budgets[1].pause_for(Duration::from_secs(1)).await.unwrap();
        assert!(budgets[2].usage().await.unwrap().paused_for > Duration::from_secs(20));
        assert!(matches!(
            budgets[2].reserve(BudgetKind::Export).await.unwrap(),
            Reservation::Wait(d) if d > Duration::from_secs(20)
        ));
    }

    #[tokio::test]
    async fn an_unanswered_probe_is_replaced_after_its_timeout_and_stale_reports_are_ignored() {
        let Some(db) = migrated().await else {
            return;
        };
        let mut cfg = config(0, 100, 10, Duration::from_secs(60));
        cfg.probe_timeout = Duration::from_millis(300);
        let budget = SharedBudget::new(db.pool_of(1), cfg);
        budget.pause_for(Duration::ZERO).await.unwrap();
        let first = budget.acquire(BudgetKind::Account).await.unwrap();
        assert!(first.probe);
        let t = Instant::now();
        assert!(matches!(
            budget.reserve(BudgetKind::Export).await.unwrap(),
            Reservation::Wait(_)
        ));
        // The first probe's replica went silent: another probe goes once its time is up.
        let second = budget.acquire(BudgetKind::Account).await.unwrap();
        assert!(second.probe && second != first);
        assert!(
            t.elapsed() >= Duration::from_millis(250),
            "{:?}",
            t.elapsed()
        );
        // The late answer to the first probe changes nothing; the second one's closes half-open.
        budget.finish(&first, 200).await.unwrap();
        assert!(budget.usage().await.unwrap().half_open);
        budget.finish(&second, 200).await.unwrap();
        assert!(!budget.usage().await.unwrap().half_open);
        let third = budget.acquire(BudgetKind::Export).await.unwrap();
        assert!(!third.probe);
    }

    /// A request holds its slot until its answer and a window (plus margin) after it, however
    /// long it was in flight; one never finished (its replica died) until its flight timeout.
    #[tokio::test]
    async fn a_request_holds_its_slot_until_answered_then_a_window() {
        let Some(db) = migrated().await else {
            return;
        };
        let window = Duration::from_millis(600);
        let mut cfg = config(0, 1, 1, window);
        cfg.flight_timeout = Duration::from_secs(2);
        let keep = window + cfg.margin;
        let budget = SharedBudget::new(db.pool_of(1), cfg.clone());
        let Reservation::Go(first) = budget.reserve(BudgetKind::Account).await.unwrap() else {
            panic!("an empty budget refused a request");
        };
        // In flight (a stalled replica, a slow network) for twice the window: still holding its
        // slot. A negative check, so an observation window rather than a condition.
        tokio::time::sleep(window * 2).await;
        assert!(matches!(
            budget.reserve(BudgetKind::Account).await.unwrap(),
            Reservation::Wait(d) if d >= keep - Duration::from_millis(50)
        ));
        // Answered: the slot frees a window plus the margin after the answer, not before.
        let answered = Instant::now();
        budget.finish(&first, 200).await.unwrap();
        budget.finish(&first, 200).await.unwrap(); // twice: no effect
        let second = budget.acquire(BudgetKind::Account).await.unwrap();
        let got = Instant::now();
        assert!(
            got - answered >= keep,
            "granted {:?} after the answer",
            got - answered
        );
        assert_eq!(budget.usage().await.unwrap().used, 1);
        // Never finished: held until the flight timeout, then a window plus the margin.
        let _ = second;
        budget.acquire(BudgetKind::Account).await.unwrap();
        let held = got.elapsed();
        let expected = cfg.flight_timeout + keep;
        assert!(
            held >= expected - Duration::from_millis(100)
                && held < expected + Duration::from_secs(2),
            "an unfinished request held its slot {held:?}, expected about {expected:?}"
        );
    }
}
