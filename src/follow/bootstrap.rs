//! The bootstrap of a first start without a snapshot (DESIGN §10): load what routing needs
//! through the search export and the ordinary endpoints, answer (WARMING), then complete the rest
//! behind it.
//!
//! 1. **Routing data.** The agents (`type:user role:agent`, `role:admin`), the open tickets
//!    (`type:ticket status<solved`), their requesters with every phone identity
//!    (`users/show_many?…&include=identities`, 100 a request) and any assignee the agent search
//!    did not return (a deleted or just-created agent, so "passed over" answers name the same
//!    reason as after a full warm-up). Then [`Change::Warming`]: health turns SERVING and answers
//!    carry `index_state` WARMING. Every customer with an open ticket is in the index with all
//!    its phones, so a caller with an open ticket routes exactly as after a full warm-up, and a
//!    number no customer has is answered "index warming".
//! 2. **Every end-user's primary phone** through `type:user role:end-user`, their other phone
//!    identities queued for the identity fetcher (`users/show_many`, as for a users export page
//!    without the sideload). Users already in the index (the requesters) are skipped: what phase 1
//!    read through `show_many` is fresher than the search index.
//! 3. The caller then reads the incremental exports from [`Bootstrap::incremental_start`] to
//!    their end (organizations from the beginning: they are few and only named in answers), and
//!    the index is READY once they and the identity fetches are done.
//!
//! # Why nothing changed during the bootstrap is lost
//! The search index lags Zendesk by up to a few minutes (ZENDESK.md §3): a record changed at
//! time `t` may be returned as it was before `t` until about `t + lag`. The incremental exports
//! start at `T0 − margin`, `T0` being the bootstrap's start, and are applied *after* the search
//! results (phases 1 and 2 finish before they start). A search row read at `r ≥ T0` can only be
//! stale for a record changed after `r − lag ≥ T0 − lag`; with `margin > lag` that change is after
//! `T0 − margin`, so the incremental export replays it (and every later one) on top, in order:
//! the final index is the latest state of every record, as after a full warm-up. The default
//! margin is 10 minutes against a documented lag of "a few minutes"; re-reading 10 minutes of
//! changes costs a page or two. Records deleted before `T0 − margin` are not in the search
//! results at all (deleted tickets and users are not searchable), so nothing stale survives.
//!
//! While warming, a search row may be older than Zendesk by up to the lag (as the exports'
//! answers are older by their one-minute rule and poll interval); it is never older than
//! what the final index would say except by that lag, which the catch-up then removes.
//!
//! # Interruption
//! In a single process nothing of a bootstrap is saved: no snapshot is written until the index is READY, and a
//! snapshot of an unfinished bootstrap (one saved at shutdown) is dropped at start-up
//! (`app::load_snapshot`), so a restart bootstraps again from an empty index. A search-export
//! cursor that expired (one hour) restarts that query from its first page; re-applying records is
//! harmless (every apply is last-writer-wins).
//!
//! # Replicas
//! With PostgreSQL only the replica holding the follower lease bootstraps, and every step goes
//! through the shared change log like any other change: every replica applies the same pages in
//! the same order, turns WARMING (health SERVING) at the same [`Change::Warming`], and READY at
//! the same [`Change::Loaded`]. The bootstrap's own progress travels there too
//! ([`BootstrapStep`]): its start, each search export request's time, and the end of phase 2.
//! A replica that takes the lease over mid-bootstrap therefore *continues* it: it keeps the first
//! attempt's incremental start (a second attempt's later `T0` could miss a change made between
//! the two: the first attempt's stale rows would then never be replayed), skips phase 1 when the
//! index is already WARMING, counts its predecessor's search requests (and one more that may
//! have been in flight) against that endpoint's per-minute limit, and goes straight to the
//! catch-up when phase 2 was done. No shared snapshot is stored before READY, so a replica that
//! starts meanwhile replays the log from its start and is WARMING with the others.
//!
//! # Budget
//! Every request spends the shared request budget (`zendesk.requests_per_minute`). The search
//! export's own limit (100 a minute, ZENDESK.md §6) is kept here with a sliding window
//! ([`Pacer`]), since only the bootstrap uses that endpoint (`zendesk.search_export_requests_per_minute`).
//! While phase 2 reads its pages, the identity fetcher (queued other identities of the end-users
//! read so far) keeps to a share of the budget: what the pages leave, less a tenth for the sync
//! worker (`Follower::fetcher_share`; 80 of the default 200). Left to itself it took about two
//! thirds of the budget and slowed the pages to two thirds of their limit. After phase 2 it has
//! the whole budget again, beside the incremental exports' catch-up.

use std::{collections::VecDeque, time::Duration};

use rustc_hash::FxHashSet;
use serde::de::DeserializeOwned;
use tokio::time::Instant;
use tracing::{info, warn};

use super::{CycleError, Follower, cancellable};
use crate::{
    index::{BootstrapStep, Change, UserBatch},
    zendesk::{
        ZendeskError,
        models::{SearchExportPage, Ticket, User},
    },
};

/// Records per search export page (its maximum).
pub(crate) const SEARCH_PAGE: u32 = 1000;
/// Zendesk's limit on search export requests per minute (ZENDESK.md §6).
pub(crate) const SEARCH_EXPORT_PER_MINUTE: u32 = 100;
/// How far before the bootstrap's start the incremental exports begin (see the module doc).
pub(crate) const DEFAULT_MARGIN: Duration = Duration::from_secs(600);

/// What the bootstrap did, for the caller and the logs.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Bootstrap {
    /// Unix seconds: where the incremental exports start.
    pub incremental_start: i64,
    pub open_tickets: u64,
    pub requesters: u64,
    pub end_users: u64,
}

/// A sliding window of the search export requests sent, so the bootstrap never meets that
/// endpoint's 429 (which would pause the whole account's budget for its `Retry-After`).
///
/// A request's slot is taken when it is permitted and moved to its answer once answered
/// ([`Pacer::answered`]): Zendesk counts a request when it arrives, which is somewhere between
/// the two, and a process slowed down after the permit (a loaded machine, a page being parsed)
/// can send it much later than it was permitted. Counting from the answer holds the window from
/// a time at or after the arrival, however late that was.
pub(crate) struct Pacer {
    limit: usize,
    window: Duration,
    sent: VecDeque<Instant>,
}

impl Pacer {
    /// `per_minute` requests in any `window` (Zendesk's minute) plus a margin: a request is
    /// recorded before it is sent and arrives a little later, so the window is held a second
    /// longer (60 s → 61 s), or the budget's margin for a shortened window, if that is more.
    pub(crate) fn new(per_minute: u32, (window, margin): (Duration, Duration)) -> Self {
        Self {
            limit: per_minute.max(1) as usize,
            window: window + margin.max(window / 60),
            sent: VecDeque::new(),
        }
    }

    /// Counts a predecessor's requests (Unix milliseconds, as recorded in the index) in the
    /// window, plus one at `now_ms` for a request it may have had in flight when it stopped (its
    /// page never reached the log, so its time was never recorded).
    pub(crate) fn seed(&mut self, sent_ms: &VecDeque<i64>, now_ms: i64) {
        let now = Instant::now();
        let window_ms = self.window.as_millis() as i64;
        for &t in sent_ms {
            let age = now_ms.saturating_sub(t);
            if (0..window_ms).contains(&age) {
                if let Some(at) = now.checked_sub(Duration::from_millis(age as u64)) {
                    self.sent.push_back(at);
                }
            }
        }
        self.sent.make_contiguous().sort_unstable();
        self.sent.push_back(now);
    }

    /// Moves the newest slot (the request in flight, one at a time) to now, its answer's time.
    pub(crate) fn answered(&mut self) {
        if let Some(last) = self.sent.back_mut() {
            *last = Instant::now();
        }
    }

    pub(crate) async fn acquire(&mut self) {
        loop {
            let now = Instant::now();
            while self
                .sent
                .front()
                .is_some_and(|t| now.duration_since(*t) >= self.window)
            {
                self.sent.pop_front();
            }
            if self.sent.len() < self.limit {
                self.sent.push_back(now);
                return;
            }
            let oldest = self.sent[0];
            tokio::time::sleep_until(oldest + self.window).await;
        }
    }
}

/// Ends the identity fetcher's share when phase 2 ends, however it ends.
struct ShareEnds<'a>(&'a tokio::sync::watch::Sender<bool>);

impl Drop for ShareEnds<'_> {
    fn drop(&mut self) {
        self.0.send_replace(false);
    }
}

impl Follower {
    /// Phases 1 and 2 of the module doc. Returns once every end-user's primary phone is in the
    /// index; the index is WARMING (answering) from the end of phase 1.
    pub(super) async fn bootstrap(
        &self,
        shutdown: &tokio_util::sync::CancellationToken,
    ) -> Result<Bootstrap, CycleError> {
        let started = std::time::Instant::now();
        let now_ms = super::now_ms();
        // With replicas, a follower that took the lease over mid-bootstrap continues its
        // predecessor's (see "Replicas" in the module doc).
        let (resumed, warm) = {
            let idx = self.index.read();
            (idx.bootstrap().cloned(), idx.is_warming())
        };
        let mut incremental_start = now_ms / 1000 - self.opts.search_lag_margin.as_secs() as i64;
        if let Some(b) = &resumed {
            incremental_start = incremental_start.min(b.incremental_start);
        }
        self.writer
            .apply(Change::Bootstrap(BootstrapStep::Started {
                incremental_start,
            }))
            .await?;
        let mut out = Bootstrap {
            incremental_start,
            ..Bootstrap::default()
        };
        let mut pacer = Pacer::new(
            self.opts.search_export_per_minute,
            self.client.budget().window(),
        );
        if let Some(b) = &resumed {
            pacer.seed(&b.searches, now_ms);
            info!(
                routing_data_in = warm,
                "bootstrap: continuing the one another replica began (it no longer follows)"
            );
        }
        if warm {
            // The routing data is in: answering already; only phase 2 is left.
            self.serving.send_replace(true);
        } else {
            self.load_routing_data(&mut out, &mut pacer, shutdown)
                .await?;
            let counts = self.index.read().counts();
            info!(
                seconds = format!("{:.1}", started.elapsed().as_secs_f64()),
                open_tickets = counts.open_tickets,
                customers = counts.customers,
                agents = counts.agents,
                "bootstrap: routing data loaded; answering (index WARMING)"
            );
        }
        info!("bootstrap: loading every end-user's primary phone");
        // The identity fetcher keeps to its share meanwhile (`Follower::fetcher_share`), also
        // when this phase ends in an error.
        self.reading_end_users.send_replace(true);
        let _share_ends = ShareEnds(&self.reading_end_users);
        // Every end-user's primary phone; their other identities through the identity fetcher.
        out.end_users = self
            .search_all::<User>(
                "user",
                "type:user role:end-user",
                &mut pacer,
                shutdown,
                |mut users| {
                    {
                        let idx = self.index.read();
                        users.retain(|u| !idx.knows_user(u.id));
                    }
                    let wanted: Vec<i64> = users
                        .iter()
                        .filter(|u| u.is_end_user() && u.is_active())
                        .map(|u| u.id)
                        .collect();
                    let mut changes = vec![Change::Users(UserBatch::prepare(
                        &users,
                        None,
                        &self.parser,
                    ))];
                    if !wanted.is_empty() {
                        changes.push(Change::IdentitiesPending(wanted));
                    }
                    changes
                },
            )
            .await?;
        self.identities_added.notify_one();
        info!(
            seconds = format!("{:.1}", started.elapsed().as_secs_f64()),
            end_users = out.end_users,
            identities_pending = self.index.read().pending_identities_len(),
            "bootstrap: every end-user's primary phone loaded; catching up with the incremental exports"
        );
        self.writer
            .apply(Change::Bootstrap(BootstrapStep::SearchesDone))
            .await?;
        Ok(out)
    }

    /// Phase 1: the agents, the open tickets and their requesters with every phone identity;
    /// then [`Change::Warming`] (answering).
    async fn load_routing_data(
        &self,
        out: &mut Bootstrap,
        pacer: &mut Pacer,
        shutdown: &tokio_util::sync::CancellationToken,
    ) -> Result<(), CycleError> {
        info!("bootstrap: loading the agents, the open tickets and their requesters");
        // Agents and admins.
        for q in ["type:user role:agent", "type:user role:admin"] {
            self.search_all::<User>("user", q, pacer, shutdown, |users| {
                vec![Change::Users(UserBatch::prepare(
                    &users,
                    None,
                    &self.parser,
                ))]
            })
            .await?;
        }

        // Open tickets, remembering their requesters and assignees.
        let mut requesters = FxHashSet::default();
        let mut assignees = FxHashSet::default();
        out.open_tickets = self
            .search_all::<Ticket>(
                "ticket",
                "type:ticket status<solved",
                pacer,
                shutdown,
                |tickets| {
                    for t in &tickets {
                        requesters.extend(t.requester_id.filter(|id| *id > 0));
                        assignees.extend(t.assignee_id.filter(|id| *id > 0));
                    }
                    vec![Change::Tickets(tickets)]
                },
            )
            .await?;

        // The requesters with every phone identity; assignees the agent search did not return.
        let mut ids: Vec<i64> = requesters.iter().copied().collect();
        ids.sort_unstable();
        out.requesters = ids.len() as u64;
        let missing_agents: Vec<i64> = {
            let idx = self.index.read();
            let mut v: Vec<i64> = assignees
                .iter()
                .copied()
                .filter(|id| !idx.knows_agent(*id) && !requesters.contains(id))
                .collect();
            v.sort_unstable();
            v
        };
        ids.extend(missing_agents);
        for chunk in ids.chunks(super::SHOW_MANY_BATCH) {
            let found = cancellable(shutdown, self.client.show_many_users(chunk)).await??;
            let mut changes = vec![Change::Users(UserBatch::prepare(
                &found.users,
                found.identities.as_deref(),
                &self.parser,
            ))];
            if found.identities.is_none() {
                // The sideload was not honoured: the identity fetcher reads them one by one, and
                // the index is not WARMING before they are in (see `run`).
                changes.push(Change::IdentitiesPending(chunk.to_vec()));
            }
            self.writer.apply_all(changes).await?;
        }
        self.identities_added.notify_one();
        // Requesters whose identities had to be fetched one by one must be in before answering.
        while self.index.read().pending_identities_len() > 0 {
            let fetched = self.identities_fetched.notified();
            tokio::select! {
                () = shutdown.cancelled() => return Err(CycleError::Cancelled),
                () = fetched => {}
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
        self.writer.apply(Change::Warming).await?;
        self.serving.send_replace(true);
        Ok(())
    }

    /// Reads one search export query to its end, applying each page's changes; returns the
    /// records read. An expired cursor (a page held up for an hour) starts the query again.
    /// Each page is applied before the next is requested, one request in flight. Requesting the
    /// next one while applying was tried: at 1M end-users it made no measurable difference
    /// (every primary phone after 12.2 min either way, real clock), and a request permitted
    /// before a page's parsing could arrive late enough to meet the limit.
    async fn search_all<T: DeserializeOwned + Send + 'static>(
        &self,
        filter_type: &str,
        query: &str,
        pacer: &mut Pacer,
        shutdown: &tokio_util::sync::CancellationToken,
        mut apply: impl FnMut(Vec<T>) -> Vec<Change>,
    ) -> Result<u64, CycleError> {
        let mut total = 0u64;
        let mut restarts = 0;
        let mut fetched = self
            .search_page::<T>(filter_type, query, None, pacer, shutdown)
            .await?;
        loop {
            let (page, sent, after) = fetched;
            let page = match page {
                Ok(p) => p,
                Err(e) => {
                    // Refused or failed, it still counts against the limit.
                    self.writer.apply(sent).await?;
                    match e {
                        // ZENDESK.md §8 says the cursor expires after an hour, not how the
                        // refusal looks: any client error on a cursor page restarts the query
                        // (auth and rate-limit errors are other variants), a few times at most.
                        ZendeskError::Permanent { .. } if after && restarts < 3 => {
                            restarts += 1;
                            warn!(
                                filter_type,
                                restarts,
                                "a search export cursor was refused (expired?): reading the query again from its start"
                            );
                            fetched = self
                                .search_page::<T>(filter_type, query, None, pacer, shutdown)
                                .await?;
                            continue;
                        }
                        e => return Err(e.into()),
                    }
                }
            };
            let n = page.results.len() as u64;
            total += n;
            self.records
                .fetch_add(n, std::sync::atomic::Ordering::Relaxed);
            let next = match (page.meta.has_more, page.meta.after_cursor) {
                (true, Some(c)) => Some(c),
                _ => None,
            };
            let results = page.results;
            let apply_page = async {
                let mut changes = apply(results);
                changes.push(sent);
                self.writer.apply_all(changes).await?;
                // Phase 2's pages queue identities to fetch: wake the fetcher now.
                self.identities_added.notify_one();
                Ok::<_, CycleError>(())
            };
            match next {
                Some(c) => {
                    apply_page.await?;
                    fetched = self
                        .search_page::<T>(filter_type, query, Some(&c), pacer, shutdown)
                        .await?;
                }
                None => {
                    apply_page.await?;
                    return Ok(total);
                }
            }
        }
    }

    /// One search export request, within the endpoint's limit: its answer, the bootstrap step
    /// recording when it was sent (applied with its page, or alone when it failed), and whether
    /// it was a cursor page.
    async fn search_page<T: DeserializeOwned + Send + 'static>(
        &self,
        filter_type: &str,
        query: &str,
        after: Option<&str>,
        pacer: &mut Pacer,
        shutdown: &tokio_util::sync::CancellationToken,
    ) -> Result<(Result<SearchExportPage<T>, ZendeskError>, Change, bool), CycleError> {
        cancellable(shutdown, pacer.acquire()).await?;
        let sent = Change::Bootstrap(BootstrapStep::Searched(super::now_ms()));
        let page = cancellable(
            shutdown,
            self.client
                .search_export::<T>(filter_type, query, after, self.opts.search_page_size),
        )
        .await?;
        pacer.answered();
        Ok((page, sent, after.is_some()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ZENDESK_WINDOW: (Duration, Duration) =
        (Duration::from_secs(60), Duration::from_millis(500));

    /// A client of the simulator spending `per_window` requests in each `window`, no retries.
    fn sim_client(
        sim: &deskline_sim::SimHandle,
        per_window: u32,
        window: Duration,
    ) -> crate::zendesk::Client {
        crate::zendesk::Client::new(crate::zendesk::ClientOptions {
            requests_per_minute: per_window,
            max_retries: 0,
            rate_window: window,
            ..crate::zendesk::ClientOptions::for_sim(sim)
        })
        .unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn pacer_keeps_the_limit_per_window() {
        let mut p = Pacer::new(3, ZENDESK_WINDOW);
        let start = Instant::now();
        for _ in 0..3 {
            p.acquire().await;
        }
        assert_eq!(Instant::now(), start);
        p.acquire().await;
        assert!(Instant::now() - start >= Duration::from_secs(61));
    }

    /// A slot counts from the request's answer: a request answered late (sent late by a slowed
    /// process) holds the window from then, not from its permit.
    #[tokio::test(start_paused = true)]
    async fn a_pacer_slot_counts_from_the_answer() {
        let mut p = Pacer::new(1, ZENDESK_WINDOW);
        let start = Instant::now();
        p.acquire().await;
        tokio::time::sleep(Duration::from_secs(5)).await;
        p.answered();
        p.acquire().await;
        assert_eq!(Instant::now() - start, Duration::from_secs(5 + 61));
    }

    async fn read_end_users(
        f: &Follower,
        parser: &crate::phone::PhoneParser,
        token: &tokio_util::sync::CancellationToken,
    ) -> Result<u64, CycleError> {
        let mut pacer = Pacer::new(1000, ZENDESK_WINDOW);
        f.search_all::<User>("user", "type:user role:end-user", &mut pacer, token, |u| {
            vec![Change::Users(UserBatch::prepare(&u, None, parser))]
        })
        .await
    }

    /// A search export cursor refused once mid-query (it expired) restarts that query and reads
    /// it to its end; a cursor refused every time fails the query after a few restarts instead of
    /// looping. Against the simulator, whose expired cursor is a 400.
    #[tokio::test]
    async fn a_refused_search_cursor_restarts_the_query_a_few_times_at_most() {
        use deskline_sim as sim;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let cfg = sim::SimConfig {
            one_minute_rule: Duration::ZERO,
            search_delay: Duration::ZERO,
            // Every cursor expired at once, until the test lets them live.
            search_cursor_ttl: Duration::ZERO,
            faults: sim::Faults {
                latency_ms: 30,
                ..sim::Faults::default()
            },
            ..sim::SimConfig::default()
        };
        let account = sim::GenConfig {
            users: 500,
            tickets: 10,
            agents: 2,
            organizations: 2,
            seed: 3,
        };
        let sim = sim::start(listener, cfg, sim::generate(&account)).await;
        let client = sim_client(&sim, 700, Duration::from_secs(60));
        let writer = crate::index::IndexWriter::spawn(crate::index::Index::new());
        let mut opts =
            super::super::FollowerOptions::new(Duration::from_secs(60), "unused.snapshot".into());
        opts.search_page_size = 100;
        let parser = crate::phone::PhoneParser::new("UA").unwrap();
        let (follower, _) = Follower::new(client, writer.clone(), parser.clone(), opts);
        let token = tokio_util::sync::CancellationToken::new();
        let refused = |sim: &sim::SimHandle| {
            sim.requests()
                .iter()
                .filter(|r| r.path.contains("/search/export") && r.status == 400)
                .count()
        };
        // Always refused: three restarts, then the error.
        assert!(read_end_users(&follower, &parser, &token).await.is_err());
        assert_eq!(refused(&sim), 4);
        // Refused once: as soon as the first refusal is seen, cursors live again.
        sim.clear_requests();
        let revive = async {
            while refused(&sim) == 0 {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            sim.set_config(|c| c.search_cursor_ttl = Duration::from_secs(3600));
        };
        let (read, ()) = tokio::join!(read_end_users(&follower, &parser, &token), revive);
        read.expect("the query read to its end");
        assert_eq!(refused(&sim), 1);
        let end_users: Vec<i64> = sim.with_store(|s| {
            s.user_ids()
                .filter(|id| {
                    s.user(*id).is_some_and(|u| {
                        u.role.as_deref() == Some("end-user") && u.active != Some(false)
                    })
                })
                .collect()
        });
        assert!(end_users.len() > 400);
        let missing: Vec<i64> = {
            let idx = writer.index().read();
            end_users
                .iter()
                .copied()
                .filter(|id| !idx.knows_user(*id))
                .collect()
        };
        assert!(missing.is_empty(), "{} end-users missing", missing.len());
        sim.shutdown().await;
    }

    /// While phase 2 reads the end-users' pages, the identity fetcher keeps to its share of the
    /// budget (what the pages leave, less a tenth), and still fetches, so it never takes the
    /// slots the pages' limit allows them. A 2 s window on both sides; 40 requests a window, 30
    /// of them search export pages, so the fetcher's share is 6 (left to itself it took every
    /// slot the pages left: 20 in one window).
    #[tokio::test]
    async fn the_identity_fetcher_keeps_to_its_share_while_the_end_users_are_read() {
        use deskline_sim as sim;
        let window = Duration::from_secs(2);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let cfg = sim::SimConfig {
            rate_window: window,
            requests_per_minute: 700,
            search_export_requests_per_minute: 30,
            one_minute_rule: Duration::ZERO,
            search_delay: Duration::ZERO,
            ..sim::SimConfig::default()
        };
        let account = sim::GenConfig {
            users: 4_000,
            tickets: 20,
            agents: 2,
            organizations: 2,
            seed: 5,
        };
        let sim = sim::start(listener, cfg, sim::generate(&account)).await;
        let client = sim_client(&sim, 40, window);
        let writer = crate::index::IndexWriter::spawn(crate::index::Index::new());
        let mut opts =
            super::super::FollowerOptions::new(Duration::from_secs(60), "unused.snapshot".into());
        opts.search_page_size = 100;
        opts.search_export_per_minute = 30;
        let parser = crate::phone::PhoneParser::new("UA").unwrap();
        let (follower, _) = Follower::new(client, writer.clone(), parser, opts);
        let follower = std::sync::Arc::new(follower);
        assert_eq!(follower.fetcher_share(), 6);
        let token = tokio_util::sync::CancellationToken::new();
        let fetcher = tokio::spawn(super::super::identity_fetcher(
            follower.clone(),
            token.clone(),
        ));
        // Phase 2's requests: from health SERVING (end of phase 1) to the bootstrap's return.
        let mut serving = follower.serving();
        let phase2_from = async {
            serving.wait_for(|s| *s).await.unwrap();
            sim.requests().len()
        };
        let (from, done) = tokio::join!(phase2_from, follower.bootstrap(&token));
        done.expect("bootstrap");
        let phase2 = sim.requests()[from..].to_vec();
        let busiest = |kind: &str| {
            let times: Vec<u64> = phase2
                .iter()
                .filter(|r| r.path.contains(kind))
                .map(|r| r.at_ms)
                .collect();
            let mut most = 0;
            for (i, t) in times.iter().enumerate() {
                let n = times[i..]
                    .iter()
                    .take_while(|u| **u < t + window.as_millis() as u64)
                    .count();
                most = most.max(n);
            }
            (most, times.len())
        };
        let (fetcher_busiest, fetched) = busiest("show_many");
        let (pages_busiest, pages) = busiest("search/export");
        assert!(pages >= 39, "{pages} pages");
        assert!(fetched > 0, "the fetcher stopped during phase 2");
        assert!(
            fetcher_busiest <= 6,
            "the fetcher sent {fetcher_busiest} requests in one window while the pages were read"
        );
        // The pages' own limit is kept; how close they come to it depends on the machine (a
        // debug build parsing pages beside the whole test suite reached 27 of 30 once).
        assert!(pages_busiest <= 30, "{pages_busiest} pages in one window");
        assert!(
            !sim.requests().iter().any(|r| r.status == 429),
            "a request met a 429"
        );
        // After phase 2 the fetcher has the whole budget and gets every identity.
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while writer.index().read().pending_identities_len() > 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "identities still pending"
            );
            follower.identities_added.notify_one();
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        token.cancel();
        fetcher.await.unwrap();
        sim.shutdown().await;
    }

    /// A follower that takes a bootstrap over counts its predecessor's recorded requests still in
    /// the window, and one more for a request it may have had in flight.
    #[tokio::test(start_paused = true)]
    async fn a_seeded_pacer_counts_the_predecessors_requests() {
        let now_ms = 1_000_000_000;
        let mut p = Pacer::new(4, ZENDESK_WINDOW);
        let sent: VecDeque<i64> = [now_ms - 90_000, now_ms - 30_000, now_ms - 20_000].into();
        p.seed(&sent, now_ms);
        let start = Instant::now();
        // Two recorded within the window (the one 90 s old is not) + one in flight = 3 of 4.
        p.acquire().await;
        assert_eq!(Instant::now(), start);
        // The next waits for the oldest counted one (30 s ago) to leave the 61 s window.
        p.acquire().await;
        assert_eq!(Instant::now() - start, Duration::from_secs(31));
    }
}
