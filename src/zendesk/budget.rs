//! The request budget shared by everything that calls one Zendesk account (export follower, sync
//! worker, `deskline check`).
//!
//! Invariants:
//! - In any window of [`WINDOW`] no more than `requests_per_minute` requests are sent, and separately
//!   no more than `export_requests_per_minute` incremental-export requests. It is a sliding log, not
//!   a token bucket: a bucket that starts full lets 2× the limit through across a minute boundary,
//!   and Zendesk counts per minute, so that would earn 429s.
//! - A request holds its slot from its [`Permit`] until the permit is finished (its answer is in, or
//!   it was given up or dropped) and [`WINDOW`] plus [`SAFETY_MARGIN`] after that; an unfinished one
//!   counts as in the window however long it takes. Zendesk counts arrivals, and a request may
//!   arrive any time between its permit and its answer: counted from the permit, a process stalled
//!   longer than the margin between permit and send (a loaded machine, a slow connection) could land
//!   it in the same Zendesk window as the requests permitted a window later. The margin covers
//!   arrivals bunching up after the answer's clock reading. Costs < 1% of the budget plus each
//!   request's own duration. The shared budget counts the same way ([`crate::cluster::budget`]).
//! - A 429's `Retry-After` pauses every request of the account until then ([`Budget::pause_until`]):
//!   Zendesk's limit is account-wide, so one caller's 429 means everyone's next request would fail too.
//! - After a pause the budget is *half-open*: one request (the probe) goes first and the others wait
//!   until it is answered. Only an answer that passed Zendesk's rate limit (anything but a 429, a
//!   5xx or no answer) releases them; a 429 pauses again, and an answer that says nothing about the
//!   limit lets the next waiter probe. Without this every waiter sends the moment the pause ends,
//!   and when other integrations share the account most of them meet a fresh 429.
//! - Zendesk's rate-limit headers ([`RateLimitHeaders`]) count everyone's use of the account, ours
//!   and other integrations': with [`LOW_REMAINING`] or fewer requests left we go one at a time (each a probe); with none left we
//!   wait for `ratelimit-reset`, or, when Zendesk did not say when, let one probe find out. Each
//!   send counts down the last reported `remaining` until a newer answer replaces it. The account's
//!   `X-Rate-Limit` is only reported ([`BudgetStats::account_limit`]), not used as our limit: the
//!   `remaining` count already covers a plan smaller than configured, and the limit alone says
//!   nothing about the window it applies to.
//! - Waiters are served first come, first served (tokio's `Mutex` is FIFO): a busy caller cannot starve
//!   another. Export requests first queue among themselves for the export limit, then join the common
//!   queue, so an export waiting for its (much smaller) limit never blocks ordinary requests.
//! - Every wait uses `tokio::time`, so tests can run it under `tokio::time::pause()`.
//! - `acquire` is cancel-safe: a dropped waiter records nothing and leaves its place in the queue.
//!
//! # Shared across replicas
//! With PostgreSQL configured, [`Budget::share`] puts a [`crate::cluster::SharedBudget`] behind the
//! same API: every [`Budget::acquire`] of every replica reserves its request (account or export
//! kind) in PostgreSQL, and the [`Permit`]'s finish (or drop) finishes that reservation there, so
//! the request holds its slot in the shared window until its answer is in and a window after it
//! (whatever stalled it on the way: see [`crate::cluster::budget`]). A 429's pause
//! ([`Budget::pause_until`]) is written there so every replica honours it, and the half-open probe
//! after it is the cluster's single probe (its answer goes with the finish). Callers do not branch.
//! Rate-limit headers keep feeding this replica's local view only (they are reported, not obeyed,
//! across replicas).
//!
//! **PostgreSQL down.** When a reservation fails or takes longer than [`crate::pg::OP_TIMEOUT`],
//! the replica falls back, with a warning, to a local budget of the limits divided by the
//! expected number of replicas (`zendesk.replicas`, so that many replicas together still stay
//! within the account's budget), and tries PostgreSQL again after [`SHARED_RETRY`]. A 429 met
//! meanwhile pauses the local fallback and, best effort, the shared budget.
//!
//! The budget also keeps the counters behind Deskline's metrics ([`BudgetStats`]): per (endpoint
//! template, HTTP status) counts whose labels never carry an id or a phone number.

use std::{
    collections::{BTreeMap, VecDeque},
    time::Duration,
};

use parking_lot::Mutex;
use tokio::time::Instant;

use crate::cluster::{BudgetKind, Grant, Reservation, SharedBudget, SharedBudgetUsage};

/// The length of the rate-limit window Zendesk enforces.
pub(crate) const WINDOW: Duration = Duration::from_secs(60);
/// Extra time each send stays in the log; see the module docs.
pub(crate) const SAFETY_MARGIN: Duration = Duration::from_millis(500);
/// The least margin of a shortened window (`zendesk.rate_window_ms`): the margin covers how far a
/// request's arrival and its answer's clock reading drift apart, which does not shrink with the
/// window (50 ms met a 429 against the simulator on a loaded machine).
const MIN_MARGIN: Duration = Duration::from_millis(250);

/// The margin for a rate-limit window: [`SAFETY_MARGIN`] at Zendesk's 60 s, scaled down with a
/// shortened window but never below [`MIN_MARGIN`].
pub(crate) fn margin_for(window: Duration) -> Duration {
    SAFETY_MARGIN
        .mul_f64(window.as_secs_f64() / WINDOW.as_secs_f64())
        .clamp(MIN_MARGIN, SAFETY_MARGIN)
}
/// At most this many distinct (endpoint, status) labels are kept; later ones fold into `other`, so a
/// caller passing an unexpected path cannot grow the metrics without bound.
const MAX_LABELS: usize = 256;

/// After a failed shared reservation, the fallback budget is used this long before PostgreSQL is
/// tried again (so a down database costs one timeout per interval, not one per request).
pub(crate) const SHARED_RETRY: Duration = Duration::from_secs(10);

/// The status recorded for an attempt that got no HTTP response (timeout, connection error).
pub(crate) const NO_RESPONSE: u16 = 0;
/// With this many requests or fewer left in Zendesk's window (its `ratelimit-remaining`), requests
/// go one at a time, so requests already in flight cannot run into the limit together.
pub(crate) const LOW_REMAINING: u32 = 5;

/// Zendesk's rate-limit headers of one response (ZENDESK.md §6). Every field is optional: the
/// `ratelimit-*` ones come only from ticketing endpoints.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct RateLimitHeaders {
    /// `X-Rate-Limit` / `ratelimit-limit`: the account's requests per minute.
    pub limit: Option<u32>,
    /// `X-Rate-Limit-Remaining` / `ratelimit-remaining` (the smaller when both are sent).
    pub remaining: Option<u32>,
    /// `ratelimit-reset`: how long until the window frees up.
    pub reset: Option<Duration>,
}

/// How an attempt sent under a [`Permit`] ended, as far as the rate limit is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Zendesk answered past its rate limit (2xx, or a 4xx other than 429).
    Admitted,
    /// 429 (the caller has already called [`Budget::pause_until`]).
    RateLimited,
    /// No answer, or one that says nothing about the limit (5xx, 408).
    Unknown,
}

/// The right to send one request, from [`Budget::acquire`]. Finish it when the request's answer
/// is in (or it was given up): its slot is held until then (locally or in the shared
/// reservation), and a window after. When it is the
/// half-open probe, its [`Outcome`] decides whether the requests waiting behind it go; dropping it
/// unreported counts as [`Outcome::Unknown`] (a cancelled caller must not hold the others back
/// forever).
#[derive(Debug)]
pub(crate) struct Permit<'a> {
    budget: &'a Budget,
    probe: bool,
    /// The reservation in the shared budget: finished there with the answer.
    shared: Option<(std::sync::Arc<SharedBudget>, Grant)>,
    /// The permit of the local fallback budget, while PostgreSQL is unreachable.
    fallback: Option<Box<Permit<'a>>>,
    /// In this (local) budget's window as in flight, `Some(export)`, until finished.
    in_flight: Option<bool>,
}

impl Permit<'_> {
    #[cfg(test)]
    /// Whether this request is the one that goes alone (after a pause, or with the account low).
    pub(crate) fn is_probe(&self) -> bool {
        self.probe
            || self.shared.as_ref().is_some_and(|(_, g)| g.probe)
            || self.fallback.as_ref().is_some_and(|p| p.is_probe())
    }

    /// Reports how the request ended.
    pub(crate) fn finish(mut self, outcome: Outcome) {
        self.resolve(outcome);
    }

    fn resolve(&mut self, outcome: Outcome) {
        if let Some(mut p) = self.fallback.take() {
            p.resolve(outcome);
        }
        if let Some(export) = self.in_flight.take() {
            self.budget.finish_in_flight(export);
        }
        if std::mem::take(&mut self.probe) {
            self.budget.resolve_probe(outcome);
        }
        if let Some((shared, grant)) = self.shared.take() {
            let status = match outcome {
                Outcome::Admitted => 200,
                Outcome::RateLimited => 429,
                Outcome::Unknown => NO_RESPONSE,
            };
            // Finished off the caller's path: until it lands the reservation holds its slot as if
            // still in flight, which only errs on the safe side. One never finished (PostgreSQL
            // gone meanwhile) holds it until its flight timeout; an unanswered probe is replaced
            // after its own timeout.
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(async move {
                    let finished =
                        tokio::time::timeout(crate::pg::OP_TIMEOUT, shared.finish(&grant, status))
                            .await;
                    if !matches!(finished, Ok(Ok(()))) {
                        tracing::warn!(
                            probe = grant.probe,
                            "could not finish a request in the shared Zendesk budget (PostgreSQL); \
                             its slot stays held until its flight timeout"
                        );
                    }
                });
            }
        }
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        self.resolve(Outcome::Unknown);
    }
}

/// The PostgreSQL side of a shared [`Budget`] (see the module docs).
struct Shared {
    budget: std::sync::Arc<SharedBudget>,
    /// Used while PostgreSQL is unreachable: the limits ÷ `zendesk.replicas`.
    fallback: Budget,
    /// Until when the fallback is used without asking PostgreSQL.
    down_until: Mutex<Option<Instant>>,
    /// FIFO queues in front of the shared reservations, as in the local budget.
    turn: tokio::sync::Mutex<()>,
    export_turn: tokio::sync::Mutex<()>,
}

/// How long a shared reservation that gets no answer (PostgreSQL slow, or this host overloaded: the
/// operation timed out, or no pooled connection came free) is asked again before the fallback.
/// PostgreSQL still coordinates the other replicas then, so this replica's local share would come
/// on top of their shared use and could meet a 429. A refused connection falls back at once.
pub(crate) const SLOW_PATIENCE: Duration = Duration::from_secs(30);

/// A reservation error that means "slow", not "down" (see [`SLOW_PATIENCE`]).
fn is_slow(e: &crate::cluster::ClusterError) -> bool {
    matches!(
        e,
        crate::cluster::ClusterError::Pool(deadpool_postgres::PoolError::Timeout(
            deadpool_postgres::TimeoutType::Wait
        ))
    )
}

impl Shared {
    /// A grant from PostgreSQL, or `None` when it is unreachable (then marked down for a while).
    async fn reserve(&self, export: bool) -> Option<Grant> {
        if self.down_until.lock().is_some_and(|t| t > Instant::now()) {
            return None;
        }
        let kind = if export {
            BudgetKind::Export
        } else {
            BudgetKind::Account
        };
        let _turn = if export {
            self.export_turn.lock().await
        } else {
            self.turn.lock().await
        };
        let asked = Instant::now();
        loop {
            let patient = asked.elapsed() < SLOW_PATIENCE;
            let failed = match tokio::time::timeout(
                crate::pg::OP_TIMEOUT,
                self.budget.reserve(kind),
            )
            .await
            {
                Ok(Ok(Reservation::Go(grant))) => {
                    if self.down_until.lock().take().is_some() {
                        tracing::info!("shared Zendesk budget reachable again; using it");
                    }
                    return Some(grant);
                }
                Ok(Ok(Reservation::Wait(d))) => {
                    tokio::time::sleep(d).await;
                    continue;
                }
                Ok(Err(e)) if patient && is_slow(&e) => continue,
                Ok(Err(e)) => format!("{e}"),
                Err(_) if patient => {
                    tracing::debug!(
                        "the shared budget's reservation got no answer yet; asking again"
                    );
                    continue;
                }
                Err(_) => format!("no answer within {} s", SLOW_PATIENCE.as_secs()),
            };
            let until = Instant::now() + SHARED_RETRY;
            let was_up = self.down_until.lock().replace(until).is_none();
            if was_up {
                tracing::warn!(
                    error = %failed,
                    fallback_limit = self.fallback.limit,
                    fallback_export_limit = self.fallback.export_limit,
                    "shared Zendesk budget unreachable (PostgreSQL); using this replica's share of the limits"
                );
            }
            return None;
        }
    }
}

/// The half-open state after a pause or while the account is nearly spent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
enum Probe {
    /// Requests go as the limits allow.
    #[default]
    Closed,
    /// The next request goes alone.
    Due,
    /// A request is going alone; the others wait for its answer.
    InFlight,
}

/// What Zendesk last said about the account's window.
#[derive(Debug, Clone, Copy)]
struct ServerView {
    /// Its `remaining`, minus what we sent since.
    remaining: u32,
    /// When the window frees up, when Zendesk said.
    reset_at: Option<Instant>,
}

/// The request budget shared by everything that calls one Zendesk account.
pub(crate) struct Budget {
    limit: u32,
    export_limit: u32,
    state: Mutex<State>,
    /// Queue for the account-wide limit (every request waits here).
    turn: tokio::sync::Mutex<()>,
    /// Queue for the export limit (export requests wait here first).
    export_turn: tokio::sync::Mutex<()>,
    /// Bumped whenever a probe is answered or a request finishes; the waiters at the head of the
    /// queues watch it.
    changed: tokio::sync::watch::Sender<u64>,
    /// [`WINDOW`], unless shortened (`zendesk.rate_window_ms`, for a simulator on a faster clock).
    window: Duration,
    /// [`SAFETY_MARGIN`], or [`margin_for`] a shortened window.
    margin: Duration,
    /// Set by [`Budget::share`]: requests are reserved in PostgreSQL across replicas.
    shared: std::sync::OnceLock<Box<Shared>>,
}

#[derive(Default)]
struct State {
    /// When each finished request of the window finished, oldest first (finishing stamps "now",
    /// so appending keeps the order). With a shared budget: when each was permitted, for the stats.
    sent: VecDeque<Instant>,
    export_sent: VecDeque<Instant>,
    /// Requests permitted and not finished yet (all kinds; exports also in `export_in_flight`):
    /// each holds a slot until it finishes.
    in_flight: usize,
    export_in_flight: usize,
    paused_until: Option<Instant>,
    probe: Probe,
    /// The account's limit as Zendesk last reported it (`X-Rate-Limit`).
    account_limit: Option<u32>,
    server: Option<ServerView>,
    total_sent: u64,
    total_rate_limited: u64,
    responses: BTreeMap<(String, u16), u64>,
}

impl State {
    /// Forgets the finished requests that left the window (`keep` after they finished).
    fn prune(&mut self, now: Instant, keep: Duration) {
        for log in [&mut self.sent, &mut self.export_sent] {
            while log.front().is_some_and(|&t| t + keep <= now) {
                log.pop_front();
            }
        }
    }

    /// When a slot frees up, with `done` the finish times in the window and `in_flight` the
    /// unfinished requests. Call after `prune`.
    fn free_at(done: &VecDeque<Instant>, in_flight: usize, limit: u32, keep: Duration) -> Slot {
        let limit = limit as usize;
        if done.len() + in_flight < limit {
            return Slot::Free;
        }
        if in_flight >= limit {
            // Only a finish starts a slot's way out of the window.
            return Slot::AfterAFinish;
        }
        // The finished entry whose expiry brings the count below the limit. A finish meanwhile
        // appends a later entry and moves no index, so this time stays right.
        let idx = done.len() + in_flight - limit;
        Slot::At(done[idx] + keep)
    }
}

/// When [`State::free_at`] finds a slot.
enum Slot {
    Free,
    At(Instant),
    /// Every slot is held by an unfinished request.
    AfterAFinish,
}

enum Wait {
    Until(Instant),
    /// For a probe's answer or an unfinished request's finish ([`Budget::changed`]).
    ForChange,
}

/// A snapshot of the budget's counters, for metrics and `deskline check`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct BudgetStats {
    pub limit: u32,
    pub export_limit: u32,
    /// Requests holding a slot of the window (all kinds, exports included): in flight, or
    /// finished within the last minute and margin.
    pub used_last_minute: u32,
    pub export_used_last_minute: u32,
    /// Requests sent since start (every attempt, retries included).
    pub total_sent: u64,
    /// 429 responses received since start.
    pub total_rate_limited: u64,
    /// How long requests are still paused by a 429 (zero when not paused).
    pub paused_for: Duration,
    /// The account's own limit as Zendesk last reported it (`X-Rate-Limit`), when it did: a value
    /// below `limit` means the configured budget is more than the plan allows.
    pub account_limit: Option<u32>,
    /// Response counts by (endpoint template such as `GET /api/v2/users/{id}`, HTTP status);
    /// status [`NO_RESPONSE`] (0) counts attempts that got no response.
    pub responses: BTreeMap<(String, u16), u64>,
}

impl Budget {
    /// A budget of `requests_per_minute` requests, of which at most `export_requests_per_minute` may
    /// be incremental-export requests. Zero limits are raised to 1 (a budget that never lets anything
    /// through would hang every caller; config validation should refuse 0 anyway).
    pub(crate) fn new(requests_per_minute: u32, export_requests_per_minute: u32) -> Self {
        let limit = requests_per_minute.max(1);
        Self {
            limit,
            export_limit: export_requests_per_minute.max(1).min(limit),
            state: Mutex::new(State::default()),
            turn: tokio::sync::Mutex::new(()),
            export_turn: tokio::sync::Mutex::new(()),
            changed: tokio::sync::watch::channel(0).0,
            window: WINDOW,
            margin: SAFETY_MARGIN,
            shared: std::sync::OnceLock::new(),
        }
    }

    /// This budget with Zendesk's window shortened to `window` (tests; benches against a
    /// simulator whose clock runs faster), its margin scaled with it ([`margin_for`]).
    pub(crate) fn with_window(mut self, window: Duration) -> Self {
        self.window = window;
        self.margin = margin_for(window);
        self
    }

    /// The rate-limit window and the margin each request is held beyond it.
    pub(crate) fn window(&self) -> (Duration, Duration) {
        (self.window, self.margin)
    }

    /// How long a finished request stays in the window.
    fn keep(&self) -> Duration {
        self.window + self.margin
    }

    /// A local permit's request is finished: it leaves the window `keep` from now.
    fn finish_in_flight(&self, export: bool) {
        {
            let now = Instant::now();
            let mut st = self.state.lock();
            st.in_flight = st.in_flight.saturating_sub(1);
            st.sent.push_back(now);
            if export {
                st.export_in_flight = st.export_in_flight.saturating_sub(1);
                st.export_sent.push_back(now);
            }
        }
        self.changed.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Shares this budget with every replica through `budget` (see the module docs). Its limits
    /// should be this budget's; the local limits divided by `replicas` (`zendesk.replicas`, the
    /// number of replicas expected) are the fallback while PostgreSQL is unreachable. Only the
    /// first call has an effect.
    pub(crate) fn share(&self, budget: SharedBudget, replicas: u32) {
        let replicas = replicas.max(1);
        let fallback = Budget::new(
            (self.limit / replicas).max(1),
            (self.export_limit / replicas).max(1),
        );
        let _ = self.shared.set(Box::new(Shared {
            budget: std::sync::Arc::new(budget),
            fallback,
            down_until: Mutex::new(None),
            turn: tokio::sync::Mutex::new(()),
            export_turn: tokio::sync::Mutex::new(()),
        }));
    }

    /// Whether requests are reserved in PostgreSQL right now (false without PostgreSQL, and
    /// while it is unreachable).
    pub(crate) fn is_shared(&self) -> bool {
        self.shared
            .get()
            .is_some_and(|s| s.down_until.lock().is_none_or(|t| t <= Instant::now()))
    }

    /// The shared budget's use across every replica, when there is one and it answers.
    pub(crate) async fn shared_usage(&self) -> Option<SharedBudgetUsage> {
        let shared = self.shared.get()?;
        tokio::time::timeout(crate::pg::OP_TIMEOUT, shared.budget.usage())
            .await
            .ok()?
            .ok()
    }

    /// The account-wide limit (requests per minute).
    pub(crate) fn limit(&self) -> u32 {
        self.limit
    }

    /// The incremental-export limit (requests per minute).
    pub(crate) fn export_limit(&self) -> u32 {
        self.export_limit
    }

    /// Waits until one more request may be sent, then counts it as in flight until the permit is
    /// finished or dropped. `export` marks an incremental-export request, which also takes the
    /// export limit.
    pub(crate) async fn acquire(&self, export: bool) -> Permit<'_> {
        if let Some(shared) = self.shared.get() {
            // A 429 met here is written to PostgreSQL by a spawned task: honour it locally at
            // once, so this replica sends nothing before the shared pause lands.
            let paused = self.state.lock().paused_until;
            if let Some(at) = paused.filter(|&p| p > Instant::now()) {
                tokio::time::sleep_until(at).await;
            }
            let permit = match shared.reserve(export).await {
                Some(grant) => Permit {
                    budget: self,
                    probe: false,
                    shared: Some((shared.budget.clone(), grant)),
                    fallback: None,
                    in_flight: None,
                },
                None => Permit {
                    budget: self,
                    probe: false,
                    shared: None,
                    fallback: Some(Box::new(Box::pin(shared.fallback.acquire(export)).await)),
                    in_flight: None,
                },
            };
            let mut st = self.state.lock();
            st.total_sent += 1;
            st.sent.push_back(Instant::now());
            if export {
                st.export_sent.push_back(Instant::now());
            }
            return permit;
        }
        let _export_turn = if export {
            let guard = self.export_turn.lock().await;
            // Wait for the export limit before joining the common queue, so an export held back
            // by its own limit does not hold up everybody else. While we hold `export_turn` nobody
            // else records an export, so the slot found here is still free below.
            loop {
                // Subscribed before looking, so a finish in between still wakes us.
                let mut changed = self.changed.subscribe();
                let wait = {
                    let mut st = self.state.lock();
                    st.prune(Instant::now(), self.keep());
                    State::free_at(
                        &st.export_sent,
                        st.export_in_flight,
                        self.export_limit,
                        self.keep(),
                    )
                };
                match wait {
                    Slot::Free => break,
                    Slot::At(at) => tokio::time::sleep_until(at).await,
                    // The sender lives as long as `self`, so this only returns on a change.
                    Slot::AfterAFinish => {
                        let _ = changed.changed().await;
                    }
                }
            }
            Some(guard)
        } else {
            None
        };

        let _turn = self.turn.lock().await;
        loop {
            // Subscribed before looking, so a probe answered (or a request finished) in between
            // still wakes us.
            let mut changed = self.changed.subscribe();
            let wait = {
                let now = Instant::now();
                let keep = self.keep();
                let mut st = self.state.lock();
                st.prune(now, keep);
                if st
                    .server
                    .is_some_and(|v| v.reset_at.is_some_and(|r| r <= now))
                {
                    st.server = None;
                }
                let mut ready = st.paused_until.filter(|&p| p > now);
                let mut after_a_finish = false;
                let server_free = match st.server {
                    Some(ServerView {
                        remaining: 0,
                        reset_at: Some(at),
                    }) => Some(at),
                    Some(ServerView {
                        remaining: 0,
                        reset_at: None,
                    }) => {
                        // Spent, and Zendesk did not say until when: one probe finds out (a 429
                        // brings an exact Retry-After).
                        st.server = None;
                        if st.probe == Probe::Closed {
                            st.probe = Probe::Due;
                        }
                        None
                    }
                    _ => None,
                };
                let slots = [
                    Some(State::free_at(&st.sent, st.in_flight, self.limit, keep)),
                    export.then(|| {
                        State::free_at(
                            &st.export_sent,
                            st.export_in_flight,
                            self.export_limit,
                            keep,
                        )
                    }),
                ];
                for slot in slots.into_iter().flatten() {
                    match slot {
                        Slot::Free => {}
                        Slot::At(at) => ready = Some(ready.map_or(at, |r| r.max(at))),
                        Slot::AfterAFinish => after_a_finish = true,
                    }
                }
                if let Some(at) = server_free {
                    ready = Some(ready.map_or(at, |r| r.max(at)));
                }
                match ready {
                    // A timed wait first: a finish meanwhile changes no time found here, and
                    // the loop looks again when it ends.
                    Some(at) => Wait::Until(at),
                    None if after_a_finish || st.probe == Probe::InFlight => Wait::ForChange,
                    None => {
                        let low = st.server.is_some_and(|v| v.remaining <= LOW_REMAINING);
                        let probe = st.probe == Probe::Due || low;
                        if probe {
                            st.probe = Probe::InFlight;
                        }
                        st.in_flight += 1;
                        if export {
                            st.export_in_flight += 1;
                        }
                        if let Some(v) = &mut st.server {
                            v.remaining = v.remaining.saturating_sub(1);
                        }
                        st.total_sent += 1;
                        return Permit {
                            budget: self,
                            probe,
                            shared: None,
                            fallback: None,
                            in_flight: Some(export),
                        };
                    }
                }
            };
            match wait {
                // A pause set while we sleep only moves the time later; the loop re-checks.
                Wait::Until(at) => tokio::time::sleep_until(at).await,
                // The sender lives as long as `self`, so this only returns on a change.
                Wait::ForChange => {
                    let _ = changed.changed().await;
                }
            }
        }
    }

    fn resolve_probe(&self, outcome: Outcome) {
        {
            let mut st = self.state.lock();
            let now = Instant::now();
            st.probe = match outcome {
                // A pause set by a request that was already out when the probe went keeps the
                // budget half-open.
                Outcome::Admitted if st.paused_until.is_none_or(|p| p <= now) => Probe::Closed,
                _ => Probe::Due,
            };
        }
        self.changed.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Takes in what Zendesk's rate-limit headers say about the account (see the module docs).
    pub(crate) fn observe(&self, h: RateLimitHeaders) {
        let mut st = self.state.lock();
        if let Some(l) = h.limit.filter(|&l| l > 0) {
            st.account_limit = Some(l);
        }
        if let Some(remaining) = h.remaining {
            st.server = Some(ServerView {
                remaining,
                reset_at: h.reset.map(|r| Instant::now() + r.min(WINDOW)),
            });
        }
    }

    /// Holds back every request of the account until `until` (a 429's `Retry-After`). A pause never
    /// shortens an existing one.
    pub(crate) fn pause_until(&self, until: Instant) {
        if let Some(shared) = self.shared.get() {
            shared.fallback.pause_until(until);
            let budget = shared.budget.clone();
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(async move {
                    let paused =
                        tokio::time::timeout(crate::pg::OP_TIMEOUT, budget.pause_until(until))
                            .await;
                    if !matches!(paused, Ok(Ok(()))) {
                        tracing::warn!("could not pause the shared Zendesk budget (PostgreSQL)");
                    }
                });
            }
        }
        let mut st = self.state.lock();
        if st.paused_until.is_none_or(|p| p < until) {
            st.paused_until = Some(until);
        }
        if st.probe == Probe::Closed {
            st.probe = Probe::Due;
        }
    }

    #[cfg(test)]
    /// Requests in the window (all kinds), unfinished ones included.
    pub(crate) fn used_last_minute(&self) -> u32 {
        let mut st = self.state.lock();
        st.prune(Instant::now(), self.keep());
        (st.sent.len() + st.in_flight) as u32
    }

    /// Counts one response (or [`NO_RESPONSE`]) for an endpoint template such as
    /// `GET /api/v2/users/{id}`. A 429 also counts towards `total_rate_limited`.
    pub(crate) fn record_response(&self, endpoint: &str, status: u16) {
        let mut st = self.state.lock();
        if status == 429 {
            st.total_rate_limited += 1;
        }
        let key = (endpoint.to_owned(), status);
        let key = if st.responses.len() >= MAX_LABELS && !st.responses.contains_key(&key) {
            ("other".to_owned(), status)
        } else {
            key
        };
        *st.responses.entry(key).or_insert(0) += 1;
    }

    /// A snapshot of every counter.
    pub(crate) fn stats(&self) -> BudgetStats {
        let now = Instant::now();
        let mut st = self.state.lock();
        st.prune(now, self.keep());
        BudgetStats {
            limit: self.limit,
            export_limit: self.export_limit,
            used_last_minute: (st.sent.len() + st.in_flight) as u32,
            export_used_last_minute: (st.export_sent.len() + st.export_in_flight) as u32,
            total_sent: st.total_sent,
            total_rate_limited: st.total_rate_limited,
            paused_for: st
                .paused_until
                .map_or(Duration::ZERO, |p| p.saturating_duration_since(now)),
            responses: st.responses.clone(),
            account_limit: st.account_limit,
        }
    }
}

impl std::fmt::Debug for Budget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Budget")
            .field("limit", &self.limit)
            .field("export_limit", &self.export_limit)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    /// PostgreSQL unreachable: the shared budget falls back at once (refused connection) to the
    /// limits divided by `zendesk.replicas`, says it is not shared, and holds the next request: a
    /// 30 budget allows 10 with 3 replicas, 6 with 5.
    #[tokio::test]
    async fn shared_budget_unreachable_falls_back_to_a_share_of_the_limits() {
        for (replicas, allowed) in [(3, 10), (5, 6)] {
            let url = secrecy::SecretString::from("postgres://postgres@127.0.0.1:1/none");
            let pool = crate::pg::pool(&url, 1).unwrap();
            let budget = Budget::new(30, 9);
            budget.share(
                SharedBudget::new(
                    pool,
                    crate::cluster::SharedBudgetConfig::new("acct", "r", 30, 9),
                ),
                replicas,
            );
            for _ in 0..allowed {
                budget.acquire(false).await.finish(Outcome::Admitted);
            }
            assert!(!budget.is_shared());
            assert!(budget.shared_usage().await.is_none());
            let held =
                tokio::time::timeout(Duration::from_millis(300), budget.acquire(false)).await;
            assert!(
                held.is_err(),
                "the fallback allows only 30 / {replicas} a window"
            );
            assert_eq!(budget.stats().total_sent, allowed);
        }
    }

    /// A simulator counting arrivals against `limit` requests per `window`, with its owner.
    async fn limited_sim(limit: u32, window: Duration) -> deskline_sim::SimHandle {
        deskline_sim::start(
            tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
            deskline_sim::SimConfig {
                requests_per_minute: limit,
                export_requests_per_minute: limit,
                rate_window: window,
                ..deskline_sim::SimConfig::default()
            },
            {
                let mut store = deskline_sim::Store::new();
                store
                    .create_user(deskline_sim::NewUser {
                        name: "Owner".into(),
                        email: Some(deskline_sim::OWNER_EMAIL.into()),
                        role: Some(deskline_sim::Role::Admin),
                        ..deskline_sim::NewUser::default()
                    })
                    .unwrap();
                store
            },
        )
        .await
    }

    /// One request as the client sends one: permit, `stall`, send, finish with the answer; returns
    /// the status.
    fn send_stalled(
        budget: Arc<Budget>,
        http: reqwest::Client,
        sim: &deskline_sim::SimHandle,
        stall: Duration,
    ) -> impl std::future::Future<Output = u16> + Send + 'static {
        let (url, email, token) = (
            format!("{}/api/v2/users/me.json", sim.url()),
            format!("{}/token", sim.email()),
            sim.token().to_owned(),
        );
        async move {
            let permit = budget.acquire(false).await;
            tokio::time::sleep(stall).await;
            let status = http
                .get(url)
                .basic_auth(email, Some(token))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16();
            permit.finish(if status == 429 {
                Outcome::RateLimited
            } else {
                Outcome::Admitted
            });
            status
        }
    }

    /// PostgreSQL slow, not down (here: the budget's lock held by another session for longer than
    /// an operation timeout): the reservation is asked again and granted once it answers, with no
    /// fallback to the local share, which would come on top of the other replicas' shared use.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_slow_shared_budget_is_waited_for_not_replaced_by_the_local_share() {
        let Some(db) = crate::cluster::testing::migrated().await else {
            return;
        };
        let budget = Budget::new(30, 9);
        budget.share(
            SharedBudget::new(
                db.pool_of(2),
                crate::cluster::SharedBudgetConfig::new("acct", "r", 30, 9),
            ),
            3,
        );
        let holder_pool = db.pool_of(1);
        let (locked_tx, locked) = tokio::sync::oneshot::channel();
        let holder = tokio::spawn(async move {
            let mut c = holder_pool.get().await.unwrap();
            let tx = c.transaction().await.unwrap();
            crate::cluster::advisory_xact_lock(&tx, "budget:acct:account")
                .await
                .unwrap();
            locked_tx.send(()).unwrap();
            tokio::time::sleep(crate::pg::OP_TIMEOUT + Duration::from_secs(2)).await;
            tx.commit().await.unwrap();
        });
        locked.await.unwrap();
        let started = Instant::now();
        budget.acquire(false).await.finish(Outcome::Admitted);
        assert!(
            started.elapsed() > crate::pg::OP_TIMEOUT,
            "the lock was held"
        );
        assert!(budget.is_shared(), "fell back to the local share");
        holder.await.unwrap();
    }

    /// The hazard behind a 429 seen once with three replicas on a loaded machine: a request
    /// reserved in the shared budget, then stalled before it reached Zendesk for longer than the
    /// margin, arrives in the same Zendesk window as the requests reserved a window after it.
    /// Here one caller stalls 1.5 s between its permit and its send while another spends the
    /// rest of the budget and then waits for a slot; the simulator counts arrivals in the same
    /// (3 s) window. Counted from the reservation (window + 200 ms margin) the waiter went at
    /// 3.2 s, into a simulator window still holding the stalled request and the three others: a
    /// 429. Held until the answer, the stalled request keeps its slot until 1.5 s + window.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_request_stalled_between_permit_and_send_never_meets_a_429() {
        let Some(db) = crate::cluster::testing::migrated().await else {
            return;
        };
        const LIMIT: u32 = 4;
        let window = Duration::from_secs(3);
        let sim = limited_sim(LIMIT, window).await;
        let budget = Arc::new(Budget::new(LIMIT, LIMIT));
        let mut cfg = crate::cluster::SharedBudgetConfig::new("acct", "r", LIMIT, LIMIT);
        cfg.window = window;
        cfg.margin = Duration::from_millis(200);
        budget.share(SharedBudget::new(db.pool_of(2), cfg), 3);
        let http = reqwest::Client::builder().no_proxy().build().unwrap();
        let send = |stall: Duration| send_stalled(budget.clone(), http.clone(), &sim, stall);
        let t0 = Instant::now();
        let stalled = tokio::spawn(send(Duration::from_millis(1500)));
        tokio::time::sleep(Duration::from_millis(600)).await;
        let mut statuses = Vec::new();
        for _ in 0..LIMIT {
            statuses.push(send(Duration::ZERO).await);
        }
        statuses.push(stalled.await.unwrap());
        let last_at = Instant::now() - t0;

        let requests = sim.requests();
        println!(
            "arrivals (ms): {:?}; last answered after {last_at:?}",
            requests
                .iter()
                .map(|r| (r.at_ms, r.status))
                .collect::<Vec<_>>()
        );
        assert_eq!(requests.len(), LIMIT as usize + 1);
        assert!(
            statuses.iter().all(|&s| s == 200),
            "the simulator answered {statuses:?}"
        );
        // The scenario happened as intended: the stalled request arrived after the three others
        // and before the last one.
        assert_eq!(
            requests.iter().position(|r| r.at_ms >= 1400),
            Some(LIMIT as usize - 1),
            "{:?}",
            requests.iter().map(|r| r.at_ms).collect::<Vec<_>>()
        );
        sim.shutdown().await;
    }

    /// The same hazard on a single replica (SQLite, the local budget with its real 500 ms
    /// margin): one caller stalls 1.5 s between its permit and its send while another, from
    /// 1 s on, spends the rest of the budget and then waits for a slot; the simulator counts
    /// arrivals in the same (3 s) window. Counted from the permit, the waiter went at 3.5 s, into
    /// a simulator window still holding the stalled request and the three others: a 429. Held
    /// until the answer, the stalled request keeps its slot until 1.5 s + window + margin, and
    /// the waiter goes when the three others leave the window (4.5 s).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_local_request_stalled_between_permit_and_send_never_meets_a_429() {
        const LIMIT: u32 = 4;
        let window = Duration::from_secs(3);
        let sim = limited_sim(LIMIT, window).await;
        let budget = Arc::new(Budget::new(LIMIT, LIMIT).with_window(window));
        let http = reqwest::Client::builder().no_proxy().build().unwrap();
        let send = |stall: Duration| send_stalled(budget.clone(), http.clone(), &sim, stall);
        let t0 = Instant::now();
        let stalled = tokio::spawn(send(Duration::from_millis(1500)));
        tokio::time::sleep(Duration::from_millis(1000)).await;
        assert_eq!(
            budget.used_last_minute(),
            1,
            "the stalled request holds its slot"
        );
        let mut statuses = Vec::new();
        for _ in 0..LIMIT {
            statuses.push(send(Duration::ZERO).await);
        }
        statuses.push(stalled.await.unwrap());
        let last_at = Instant::now() - t0;

        let requests = sim.requests();
        println!(
            "arrivals (ms): {:?}; last answered after {last_at:?}",
            requests
                .iter()
                .map(|r| (r.at_ms, r.status))
                .collect::<Vec<_>>()
        );
        assert_eq!(requests.len(), LIMIT as usize + 1);
        assert!(
            statuses.iter().all(|&s| s == 200),
            "the simulator answered {statuses:?}"
        );
        // The scenario happened as intended: the stalled request arrived after the three others
        // and before the last one.
        assert_eq!(
            requests.iter().position(|r| r.at_ms >= 1400),
            Some(LIMIT as usize - 1),
            "{:?}",
            requests.iter().map(|r| r.at_ms).collect::<Vec<_>>()
        );
        sim.shutdown().await;
    }

    /// Checks that no window of `WINDOW` holds more than `limit` of `times`.
    fn max_in_window(times: &[Instant]) -> usize {
        let mut sorted = times.to_vec();
        sorted.sort();
        let mut best = 0;
        let mut lo = 0;
        for hi in 0..sorted.len() {
            while sorted[hi] - sorted[lo] >= WINDOW {
                lo += 1;
            }
            best = best.max(hi - lo + 1);
        }
        best
    }

    async fn run_callers(
        budget: Arc<Budget>,
        callers: usize,
        each: usize,
        export: impl Fn(usize) -> bool,
    ) -> (Vec<Instant>, Vec<Instant>) {
        let mut tasks = Vec::new();
        for c in 0..callers {
            let b = budget.clone();
            let ex = export(c);
            tasks.push(tokio::spawn(async move {
                let mut times = Vec::new();
                for _ in 0..each {
                    b.acquire(ex).await;
                    times.push(Instant::now());
                }
                (ex, times)
            }));
        }
        let (mut all, mut exports) = (Vec::new(), Vec::new());
        for t in tasks {
            let (ex, times) = t.await.unwrap();
            if ex {
                exports.extend(&times);
            }
            all.extend(times);
        }
        (all, exports)
    }

    #[tokio::test(start_paused = true)]
    async fn never_more_than_the_limit_in_any_window() {
        let budget = Arc::new(Budget::new(20, 5));
        let start = Instant::now();
        let (all, _) = run_callers(budget.clone(), 8, 25, |_| false).await;
        assert_eq!(all.len(), 200);
        assert_eq!(max_in_window(&all), 20);
        // 200 requests at 20 per window: the first 20 at once, then 9 more windows.
        let took = Instant::now() - start;
        assert!(took >= 9 * WINDOW && took < 10 * WINDOW, "{took:?}");
        assert_eq!(budget.stats().total_sent, 200);
    }

    #[tokio::test(start_paused = true)]
    async fn no_double_burst_across_a_minute_boundary() {
        let budget = Budget::new(10, 10);
        let t0 = Instant::now();
        for _ in 0..10 {
            budget.acquire(false).await;
        }
        assert_eq!(Instant::now(), t0, "the first ten go at once");
        assert_eq!(budget.used_last_minute(), 10);
        budget.acquire(false).await;
        assert!(
            Instant::now() - t0 >= WINDOW,
            "the eleventh waits a full window"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn export_limit_is_separate_and_does_not_block_others() {
        let budget = Arc::new(Budget::new(30, 3));
        // Exports alone: 3 per window.
        let t0 = Instant::now();
        for _ in 0..3 {
            budget.acquire(true).await;
        }
        assert_eq!(Instant::now(), t0);
        let b = budget.clone();
        let waiting_export = tokio::spawn(async move {
            b.acquire(true).await;
            Instant::now()
        });
        tokio::task::yield_now().await;
        // Ordinary requests go through while the fourth export waits for its limit.
        for _ in 0..10 {
            budget.acquire(false).await;
        }
        assert_eq!(Instant::now(), t0, "ordinary requests were not held up");
        let export_at = waiting_export.await.unwrap();
        assert!(export_at - t0 >= WINDOW);
        let stats = budget.stats();
        assert_eq!(stats.total_sent, 14);
        assert!(stats.export_used_last_minute <= 3);
    }

    #[tokio::test(start_paused = true)]
    async fn exports_and_others_share_the_account_limit() {
        let budget = Arc::new(Budget::new(12, 4));
        let (all, exports) = run_callers(budget, 6, 10, |c| c < 2).await;
        assert_eq!(all.len(), 60);
        assert_eq!(exports.len(), 20);
        assert!(max_in_window(&all) <= 12);
        assert!(max_in_window(&exports) <= 4);
    }

    #[tokio::test(start_paused = true)]
    async fn pause_holds_everyone_and_never_shortens() {
        let budget = Budget::new(100, 10);
        let t0 = Instant::now();
        budget.pause_until(t0 + Duration::from_secs(30));
        budget.pause_until(t0 + Duration::from_secs(5)); // ignored: shorter
        assert_eq!(budget.stats().paused_for, Duration::from_secs(30));
        budget.acquire(false).await;
        assert_eq!(Instant::now() - t0, Duration::from_secs(30));
        budget.acquire(true).await;
        assert_eq!(
            Instant::now() - t0,
            Duration::from_secs(30),
            "pause is over"
        );
        assert_eq!(budget.stats().paused_for, Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn pause_set_while_waiting_is_honoured() {
        let budget = Arc::new(Budget::new(1, 1));
        let t0 = Instant::now();
        budget.acquire(false).await;
        let b = budget.clone();
        let waiter = tokio::spawn(async move {
            b.acquire(false).await;
            Instant::now()
        });
        tokio::time::sleep(Duration::from_secs(10)).await;
        budget.pause_until(t0 + Duration::from_secs(90));
        let at = waiter.await.unwrap();
        assert_eq!(at - t0, Duration::from_secs(90));
    }

    #[tokio::test(start_paused = true)]
    async fn waiters_are_served_in_arrival_order() {
        let budget = Arc::new(Budget::new(1, 1));
        budget.acquire(false).await;
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for i in 0..5 {
            let (b, o) = (budget.clone(), order.clone());
            tasks.push(tokio::spawn(async move {
                b.acquire(false).await;
                o.lock().push(i);
            }));
            // Let task i queue up before task i+1 starts.
            tokio::task::yield_now().await;
        }
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(*order.lock(), vec![0, 1, 2, 3, 4]);
    }

    #[tokio::test(start_paused = true)]
    async fn cancelled_waiter_records_nothing() {
        let budget = Budget::new(1, 1);
        budget.acquire(false).await;
        let res = tokio::time::timeout(Duration::from_secs(1), budget.acquire(false)).await;
        assert!(res.is_err());
        assert_eq!(budget.stats().total_sent, 1);
    }

    /// Starts a task that acquires and reports when it got its permit, holding the permit until
    /// told how the request ended.
    fn sender(
        budget: &Arc<Budget>,
    ) -> (
        tokio::task::JoinHandle<()>,
        tokio::sync::oneshot::Receiver<bool>,
        tokio::sync::oneshot::Sender<Outcome>,
    ) {
        let (got_tx, got_rx) = tokio::sync::oneshot::channel();
        let (out_tx, out_rx) = tokio::sync::oneshot::channel::<Outcome>();
        let b = budget.clone();
        let task = tokio::spawn(async move {
            let permit = b.acquire(false).await;
            let _ = got_tx.send(permit.is_probe());
            if let Ok(o) = out_rx.await {
                permit.finish(o);
            }
        });
        (task, got_rx, out_tx)
    }

    #[tokio::test(start_paused = true)]
    async fn after_a_pause_one_probe_goes_first_and_success_releases_the_rest() {
        let budget = Arc::new(Budget::new(100, 10));
        let t0 = Instant::now();
        budget.pause_until(t0 + Duration::from_secs(10));
        let (probe, mut probe_got, probe_out) = sender(&budget);
        tokio::task::yield_now().await;
        let mut others: Vec<_> = (0..3).map(|_| sender(&budget)).collect();
        tokio::time::sleep(Duration::from_secs(11)).await;
        assert_eq!((&mut probe_got).await, Ok(true), "the first waiter probes");
        assert_eq!(budget.stats().total_sent, 1);
        // However long the probe takes, nobody else goes.
        tokio::time::sleep(Duration::from_secs(30)).await;
        for (_, got, _) in &mut others {
            assert!(got.try_recv().is_err(), "sent while the probe was out");
        }
        probe_out.send(Outcome::Admitted).unwrap();
        probe.await.unwrap();
        for (task, got, out) in others {
            assert_eq!(got.await, Ok(false), "released as ordinary requests");
            out.send(Outcome::Admitted).unwrap();
            task.await.unwrap();
        }
        assert_eq!(budget.stats().total_sent, 4);
    }

    #[tokio::test(start_paused = true)]
    async fn a_probe_that_meets_a_429_pauses_again_and_the_next_one_probes() {
        let budget = Arc::new(Budget::new(100, 10));
        let t0 = Instant::now();
        budget.pause_until(t0 + Duration::from_secs(5));
        let (probe, probe_got, probe_out) = sender(&budget);
        tokio::task::yield_now().await;
        let (second, second_got, second_out) = sender(&budget);
        assert_eq!(probe_got.await, Ok(true));
        assert_eq!(Instant::now() - t0, Duration::from_secs(5));
        // The probe's 429: the client pauses, then reports.
        budget.pause_until(Instant::now() + Duration::from_secs(20));
        probe_out.send(Outcome::RateLimited).unwrap();
        probe.await.unwrap();
        assert_eq!(second_got.await, Ok(true), "the next request probes again");
        assert_eq!(Instant::now() - t0, Duration::from_secs(25));
        second_out.send(Outcome::Admitted).unwrap();
        second.await.unwrap();
        // Closed again: requests go together.
        let p1 = budget.acquire(false).await;
        let p2 = budget.acquire(false).await;
        assert!(!p1.is_probe() && !p2.is_probe());
    }

    #[tokio::test(start_paused = true)]
    async fn an_inconclusive_or_dropped_probe_hands_the_probe_to_the_next_waiter() {
        let budget = Arc::new(Budget::new(100, 10));
        budget.pause_until(Instant::now() + Duration::from_secs(1));
        let first = budget.acquire(false).await;
        assert!(first.is_probe());
        let (t, got, out) = sender(&budget);
        tokio::task::yield_now().await;
        first.finish(Outcome::Unknown); // a 503 says nothing about the limit
        assert_eq!(got.await, Ok(true));
        let (t2, got2, _out2) = sender(&budget);
        tokio::task::yield_now().await;
        drop(out); // the caller was cancelled: its permit is dropped unreported
        t.await.unwrap();
        assert_eq!(got2.await, Ok(true));
        t2.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn zendesk_headers_slow_us_down_before_a_429() {
        let budget = Arc::new(Budget::new(100, 10));
        // Another integration spent most of the account: 3 left, the window frees in 7 s.
        budget.observe(RateLimitHeaders {
            limit: Some(100),
            remaining: Some(3),
            reset: Some(Duration::from_secs(7)),
        });
        let t0 = Instant::now();
        // Low: one at a time.
        let p = budget.acquire(false).await;
        assert!(p.is_probe());
        let (t, mut got, out) = sender(&budget);
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(
            got.try_recv().is_err(),
            "a second request went while one was out"
        );
        p.finish(Outcome::Admitted);
        assert_eq!((&mut got).await, Ok(true));
        out.send(Outcome::Admitted).unwrap();
        t.await.unwrap();
        budget.acquire(false).await.finish(Outcome::Admitted);
        // All three used: the next waits for the reset Zendesk announced.
        budget.acquire(false).await.finish(Outcome::Admitted);
        assert_eq!(Instant::now() - t0, Duration::from_secs(7));
    }

    #[tokio::test(start_paused = true)]
    async fn spent_without_a_reset_sends_one_probe() {
        let budget = Arc::new(Budget::new(100, 10));
        budget.observe(RateLimitHeaders {
            limit: Some(700),
            remaining: Some(0),
            reset: None,
        });
        let p = budget.acquire(false).await;
        assert!(p.is_probe(), "nothing left and no reset: probe");
        p.finish(Outcome::Admitted);
        budget.observe(RateLimitHeaders {
            limit: Some(700),
            remaining: Some(200),
            reset: None,
        });
        assert!(
            !budget.acquire(false).await.is_probe(),
            "plenty left: closed"
        );
        assert_eq!(budget.stats().account_limit, Some(700));
    }

    #[test]
    fn response_counters() {
        let budget = Budget::new(10, 1);
        budget.record_response("GET /api/v2/users/{id}", 200);
        budget.record_response("GET /api/v2/users/{id}", 200);
        budget.record_response("PUT /api/v2/tickets/{id}", 429);
        budget.record_response("PUT /api/v2/tickets/{id}", NO_RESPONSE);
        let s = budget.stats();
        assert_eq!(s.total_rate_limited, 1);
        assert_eq!(s.responses[&("GET /api/v2/users/{id}".to_owned(), 200)], 2);
        assert_eq!(s.responses.len(), 3);
        for i in 0..400 {
            budget.record_response(&format!("GET /x/{i}"), 200);
        }
        assert!(budget.stats().responses.len() <= MAX_LABELS + 1);
    }
}
