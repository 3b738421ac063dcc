//! Follows Zendesk's incremental exports and feeds the index.
//!
//! Warm-up reads the users (with phone identities), tickets and organizations exports from the
//! beginning of time to `end_of_stream`, all three at once; then every `index.poll_seconds` each
//! export is read on from its stored cursor. Cursors are stored in the index after each page and
//! saved with its snapshot, so a restart resumes where the last snapshot stood (at worst re-reading
//! pages since then, which is harmless: applying a record twice gives the same index).
//!
//! Throughput: each cursor export is read through `pipelined`: up to two pages are fetched (and
//! decoded on the blocking pool, users pages also prepared there: phones parsed) ahead of the one
//! being applied, so the index write lock is held for inserts only and Zendesk's serving, decoding
//! and indexing overlap (a 1M-customer account: 67k records/s before, ~130k after, with the
//! simulator on the same two cores; `cargo bench --bench warmup`).
//!
//! Consistency: what the routing path sees lags Zendesk by the export's one-minute rule plus at most
//! one poll interval, except for what the sync worker writes itself (it updates the index at once).
//! The index is marked fresh per export when a read reaches `end_of_stream`; `index_age_ms` in answers
//! is the age of the oldest of the three.
//!
//! Every change goes through the index's one writer ([`IndexWriter`]): a page, its cursor and (at
//! the end) the export's freshness are one message, so a snapshot holds a page with its cursor or
//! neither.
//!
//! Phone identities: the users export is asked for `include=identities`. Whether real Zendesk honours
//! that on the export is unverified, so when a page comes back without the sideload, the follower
//! fetches the identities of that page's end-users through `users/show_many?include=identities`
//! (100 users a request) in a background task that spends the shared request budget like everything
//! else, and applies them as they arrive. The ids waiting for that fetch are part of the index
//! (sent with the page and its cursor, saved in the snapshot, removed only once their identities are
//! applied), so a restart fetches what the last run had not, although the cursor moved past those
//! users. The users export waits while more than [`MAX_PENDING_IDENTITIES`] are waiting. A
//! `show_many` answer without the `identities` key at all (the sideload not honoured) says nothing
//! about identities: it is logged once and each user's identities are read from
//! `users/{id}/identities` instead, never taken as "no identities".

mod bootstrap;

pub(crate) use bootstrap::{DEFAULT_MARGIN, SEARCH_EXPORT_PER_MINUTE, SEARCH_PAGE};

use std::{
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use tokio::sync::{Notify, mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::{
    index::{
        Change, CursorMove, Export, Index, IndexWriter, SharedIndex, UserBatch, WriterStopped,
    },
    phone::PhoneParser,
    zendesk::{
        Client, ExportStart, ZendeskError,
        models::{Ticket, UsersCursorPage},
    },
};

/// Records per export page (the documented maximum).
pub(crate) const PER_PAGE: u32 = 1000;
/// Failed bootstraps before the full warm-up is used instead.
const BOOTSTRAP_ATTEMPTS: u32 = 3;
/// Users per `show_many` request.
pub(crate) const SHOW_MANY_BATCH: usize = 100;
/// Users whose identities may wait to be fetched before the users export waits for them (8 bytes
/// each in the index and its snapshot).
pub(crate) const MAX_PENDING_IDENTITIES: usize = 50_000;

#[derive(Debug, Clone)]
pub(crate) struct FollowerOptions {
    pub poll: Duration,
    /// Where the snapshot lives (`{data_dir}/index.snapshot`).
    pub snapshot_path: PathBuf,
    /// The least time between two snapshot writes while following.
    pub snapshot_every: Duration,
    /// How often warm-up progress is logged.
    pub progress_every: Duration,
    /// A first start (no snapshot) bootstraps through the search export and answers while
    /// warming (DESIGN §10; `index.bootstrap`). Off: the full warm-up first, as before.
    pub bootstrap: bool,
    /// How far before the bootstrap the incremental exports start (see `bootstrap`'s module doc):
    /// more than the search index's lag.
    pub search_lag_margin: Duration,
    /// The search export's own limit (Zendesk: 100 a minute) and page size (its maximum, 1000).
    pub search_export_per_minute: u32,
    pub search_page_size: u32,
}

impl FollowerOptions {
    pub(crate) fn new(poll: Duration, snapshot_path: PathBuf) -> Self {
        Self {
            poll,
            snapshot_path,
            snapshot_every: Duration::from_secs(60),
            progress_every: Duration::from_secs(5),
            bootstrap: false,
            search_lag_margin: DEFAULT_MARGIN,
            search_export_per_minute: SEARCH_EXPORT_PER_MINUTE,
            search_page_size: SEARCH_PAGE,
        }
    }
}

/// Why a read of the exports stopped.
#[derive(Debug, thiserror::Error)]
enum CycleError {
    #[error(transparent)]
    Zendesk(#[from] ZendeskError),
    #[error("shutting down")]
    Cancelled,
    #[error(transparent)]
    Index(#[from] WriterStopped),
}

pub(crate) struct Follower {
    client: Client,
    writer: IndexWriter,
    index: SharedIndex,
    /// Wakes the identity fetcher (ids were added) and the users export (ids were fetched).
    identities_added: Notify,
    identities_fetched: Notify,
    parser: PhoneParser,
    opts: FollowerOptions,
    loaded: watch::Sender<bool>,
    /// True once answers may be given: loaded, or warming after a bootstrap's first phase.
    serving: watch::Sender<bool>,
    /// Unix seconds where the incremental exports start when they have no cursor: 0 normally,
    /// before the bootstrap's start after one.
    incremental_start: AtomicI64,
    records: AtomicU64,
    /// Records read per export (users, tickets, organizations), for progress logs.
    per_export: [AtomicU64; 3],
    /// Which exports are being read right now.
    reading: [AtomicBool; 3],
    /// True while a bootstrap reads every end-user's primary phone (its phase 2): the identity
    /// fetcher then keeps to [`Follower::fetcher_share`] so the search export's pages get theirs.
    reading_end_users: watch::Sender<bool>,
    /// Set when webhooks run: counts export rows that brought changes webhooks had not, and skips
    /// ticket rows older than what webhooks applied.
    webhooks: Option<(
        Arc<crate::metrics::Metrics>,
        crate::webhooks::apply::SharedVersions,
    )>,
}

impl Follower {
    /// `loaded` turns true when the index is complete (at once when it came from a snapshot of a
    /// finished warm-up).
    pub(crate) fn new(
        client: Client,
        writer: IndexWriter,
        parser: PhoneParser,
        opts: FollowerOptions,
    ) -> (Self, watch::Receiver<bool>) {
        let index = writer.index().clone();
        let already = index.read().is_loaded();
        let (tx, rx) = watch::channel(already);
        let (serving, _) = watch::channel(already);
        (
            Self {
                client,
                writer,
                index,
                identities_added: Notify::new(),
                identities_fetched: Notify::new(),
                parser,
                opts,
                loaded: tx,
                serving,
                incremental_start: AtomicI64::new(0),
                records: AtomicU64::new(0),
                per_export: Default::default(),
                reading: Default::default(),
                reading_end_users: watch::channel(false).0,
                webhooks: None,
            },
            rx,
        )
    }

    /// The identity fetcher's requests per window while a bootstrap reads the end-users' primary
    /// phones: what the budget leaves beside the search export's pages, less a tenth for the sync
    /// worker (calls reported meanwhile). Without this the fetcher, whose requests are ready
    /// back to back, took about two thirds of the budget and the pages (each one a round trip
    /// and a thousand users to apply) arrived at two thirds of their own limit: at 1M users every
    /// primary phone took 18 minutes instead of about 13. Primary phones are what caller ID
    /// needs first; the other identities wait a little longer, READY does not (the budget is
    /// spent either way).
    fn fetcher_share(&self) -> u32 {
        let limit = self.client.budget().limit();
        limit
            .saturating_sub(self.opts.search_export_per_minute)
            .saturating_sub(limit / 10)
    }

    /// True once answers may be given (health SERVING): at once from a complete snapshot, after a
    /// bootstrap's first phase, or when the full warm-up ends.
    pub(crate) fn serving(&self) -> watch::Receiver<bool> {
        self.serving.subscribe()
    }

    /// Whether this start bootstraps: enabled, and the index is empty of any export position, or
    /// holds a bootstrap another replica began and did not get through its searches.
    fn should_bootstrap(&self) -> bool {
        let idx = self.index.read();
        self.opts.bootstrap
            && !idx.is_loaded()
            && match idx.bootstrap() {
                Some(b) => !b.searched,
                None => {
                    *idx.cursors() == crate::index::Cursors::default()
                        && idx.pending_identities_len() == 0
                }
            }
    }

    /// With webhooks on: count the export's ticket rows that found the index behind
    /// (`deskline_export_missed_by_webhooks_total`) and skip rows older than what webhooks applied.
    pub(crate) fn with_webhooks(
        mut self,
        metrics: Arc<crate::metrics::Metrics>,
        versions: crate::webhooks::apply::SharedVersions,
    ) -> Self {
        self.webhooks = Some((metrics, versions));
        self
    }

    /// Follows until `shutdown`. Zendesk errors never end it: it logs, backs off and tries again, and
    /// the routing path keeps answering from what the index has.
    pub(crate) async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let this = Arc::new(self);
        let fetcher = tokio::spawn(identity_fetcher(this.clone(), shutdown.clone()));
        let mut last_snapshot = Instant::now();
        let mut failures = 0u32;
        // A first start: the bootstrap (phases 1 and 2), retried from the start on failure; after
        // [`BOOTSTRAP_ATTEMPTS`] failures (say, `show_many` or the search export refused), today's
        // full warm-up instead, so a broken bootstrap never keeps the service from warming up.
        let mut bootstrapped = this.should_bootstrap();
        let mut abandoned = false;
        while bootstrapped {
            match this.bootstrap(&shutdown).await {
                Ok(b) => {
                    this.incremental_start
                        .store(b.incremental_start, Ordering::Relaxed);
                    break;
                }
                Err(CycleError::Cancelled) => {
                    fetcher.abort();
                    return Ok(());
                }
                Err(CycleError::Index(e)) => {
                    fetcher.abort();
                    return Err(e.into());
                }
                Err(CycleError::Zendesk(e)) => {
                    failures += 1;
                    if failures >= BOOTSTRAP_ATTEMPTS {
                        warn!(error = %e, failures, "the bootstrap failed again: falling back to the full warm-up from the exports");
                        // Its start must not apply to the full warm-up (nor to a follower that
                        // takes over from this one).
                        if this
                            .writer
                            .apply(Change::Bootstrap(crate::index::BootstrapStep::Abandoned))
                            .await
                            .is_err()
                        {
                            fetcher.abort();
                            anyhow::bail!(WriterStopped);
                        }
                        bootstrapped = false;
                        abandoned = true;
                        break;
                    }
                    let wait = backoff(failures, this.opts.poll);
                    warn!(error = %e, retry_in = ?wait, failures, "the bootstrap failed; starting it again");
                    tokio::select! {
                        _ = shutdown.cancelled() => { fetcher.abort(); return Ok(()); }
                        _ = tokio::time::sleep(wait) => {}
                    }
                }
            }
        }
        failures = 0;
        if !bootstrapped {
            // Answers wait for the full warm-up (or came at once from a complete snapshot), unless
            // a failed bootstrap had got as far as answering.
            let idx = this.index.read();
            this.serving.send_replace(idx.is_serving());
            // A follower that took over after its predecessor's bootstrap searches: only the
            // catch-up is left, from the bootstrap's start.
            if let Some(b) = idx
                .bootstrap()
                .filter(|b| b.searched && !abandoned && !idx.is_loaded())
            {
                this.incremental_start
                    .store(b.incremental_start, Ordering::Relaxed);
                bootstrapped = true;
                info!(
                    "continuing a bootstrap another replica began: catching up with the incremental exports"
                );
            }
        }
        loop {
            let warming = !this.index.read().is_loaded();
            let started = Instant::now();
            if warming {
                info!("warm-up: reading the users, tickets and organizations exports");
            }
            let progress = warming.then(|| {
                tokio::spawn(progress_logger(
                    this.clone(),
                    started,
                    shutdown.child_token(),
                ))
            });
            let result = this.cycle(&shutdown).await;
            if let Some(p) = progress {
                p.abort();
            }
            let mut wait = this.opts.poll;
            match result {
                Ok(records) => {
                    failures = 0;
                    if warming && bootstrapped {
                        // READY also needs every end-user's other phones (phase 2 queued them).
                        this.wait_for_all_identities(&shutdown).await;
                        if shutdown.is_cancelled() {
                            break;
                        }
                    }
                    if warming {
                        if this.writer.apply(Change::Loaded).await.is_err() {
                            fetcher.abort();
                            anyhow::bail!(WriterStopped);
                        }
                        let counts = this.index.read().counts();
                        let secs = started.elapsed().as_secs_f64();
                        info!(
                            records,
                            seconds = format!("{secs:.1}"),
                            rate = format!("{:.0}/s", records as f64 / secs.max(0.001)),
                            customers = counts.customers,
                            agents = counts.agents,
                            open_tickets = counts.open_tickets,
                            organizations = counts.organizations,
                            "warm-up complete: the index is ready"
                        );
                        this.loaded.send_replace(true);
                        this.serving.send_replace(true);
                        this.save_snapshot().await;
                        last_snapshot = Instant::now();
                    } else if records > 0 && last_snapshot.elapsed() >= this.opts.snapshot_every {
                        this.save_snapshot().await;
                        last_snapshot = Instant::now();
                    }
                    debug!(records, "exports followed");
                }
                Err(CycleError::Cancelled) => break,
                Err(CycleError::Index(e)) => {
                    fetcher.abort();
                    return Err(e.into());
                }
                Err(CycleError::Zendesk(e)) => {
                    failures += 1;
                    wait = backoff(failures, this.opts.poll);
                    match &e {
                        ZendeskError::Auth { .. } => {
                            error!(error = %e, retry_in = ?wait, "Zendesk refused the credentials; the index is not updated until they are fixed")
                        }
                        _ => {
                            warn!(error = %e, retry_in = ?wait, failures, "reading the exports failed; answers come from the index as it stands")
                        }
                    }
                    // A bootstrap is never saved half-done (see `bootstrap`).
                    if warming
                        && !bootstrapped
                        && last_snapshot.elapsed() >= this.opts.snapshot_every
                    {
                        // Keep the position of a long warm-up across restarts.
                        this.save_snapshot().await;
                        last_snapshot = Instant::now();
                    }
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(wait) => {}
            }
        }
        fetcher.abort();
        Ok(())
    }

    /// Reads all three exports to their end; returns how many records were applied.
    async fn cycle(&self, shutdown: &CancellationToken) -> Result<u64, CycleError> {
        for r in &self.reading {
            r.store(true, Ordering::Relaxed);
        }
        let (u, t, o) = tokio::try_join!(
            self.read_users(shutdown),
            self.read_tickets(shutdown),
            self.read_organizations(shutdown)
        )?;
        Ok(u + t + o)
    }

    async fn read_users(&self, shutdown: &CancellationToken) -> Result<u64, CycleError> {
        let start = cursor_or_start(
            self.index.read().cursors().users.clone(),
            self.incremental_start.load(Ordering::Relaxed),
        );
        let fetch = |start: ExportStart| async move {
            let page = self.client.export_users(&start, true, PER_PAGE).await?;
            let parser = self.parser.clone();
            let versions = self.webhooks.as_ref().map(|(_, v)| v.clone());
            let index = self.index.clone();
            // Phone parsing is most of a user's cost: done here, ahead of and outside the lock.
            let prepared = tokio::task::spawn_blocking(move || {
                let UsersCursorPage {
                    mut users,
                    mut identities,
                    after_cursor,
                    end_of_stream,
                    ..
                } = page;
                let records = users.len() as u64;
                // Rows older than what webhooks applied would step those users back; rows of
                // the same second are read again through the webhook applier.
                if let Some(v) = versions {
                    let idx = crate::index::read_for_lookup(&index);
                    let older: Vec<i64> = users
                        .iter()
                        .filter(|u| !v.keep_export_user(&idx, u))
                        .map(|u| u.id)
                        .collect();
                    if !older.is_empty() {
                        users.retain(|u| !older.contains(&u.id));
                        if let Some(list) = identities.as_mut() {
                            list.retain(|i| !older.contains(&i.user_id));
                        }
                    }
                }
                // Without the sideload, the end-users' identities come through show_many.
                let wanted: Vec<i64> = match identities {
                    Some(_) => Vec::new(),
                    None => users
                        .iter()
                        .filter(|u| u.is_end_user() && u.is_active())
                        .map(|u| u.id)
                        .collect(),
                };
                let batch = UserBatch::prepare(&users, identities.as_deref(), &parser);
                Fetched {
                    batch: (batch, wanted),
                    records,
                    after_cursor,
                    end_of_stream,
                }
            })
            .await
            .map_err(|e| ZendeskError::Transient {
                status: None,
                message: format!("preparing a users page failed: {e}"),
            })?;
            Ok(prepared)
        };
        let apply = |(batch, wanted): (UserBatch, Vec<i64>)| {
            let mut changes = vec![Change::Users(batch)];
            if !wanted.is_empty() {
                changes.push(Change::IdentitiesPending(wanted));
            }
            changes
        };
        self.pipelined(Export::Users, start, fetch, apply, shutdown)
            .await
    }

    async fn read_tickets(&self, shutdown: &CancellationToken) -> Result<u64, CycleError> {
        let start = cursor_or_start(
            self.index.read().cursors().tickets.clone(),
            self.incremental_start.load(Ordering::Relaxed),
        );
        let fetch = |start: ExportStart| async move {
            let page = self.client.export_tickets(&start, PER_PAGE).await?;
            Ok(Fetched {
                records: page.tickets.len() as u64,
                batch: page.tickets,
                after_cursor: page.after_cursor,
                end_of_stream: page.end_of_stream,
            })
        };
        // With webhooks: rows older than what webhooks applied are skipped (they would step the
        // index back), rows of the same second with another state are read again, and rows that change what the index holds are counted as missed by
        // webhooks. Read under a short lookup lock; the writer applies the rest.
        let apply = |mut tickets: Vec<Ticket>| {
            if let Some((metrics, versions)) = &self.webhooks {
                let idx = crate::index::read_for_lookup(&self.index);
                tickets.retain(|t| versions.keep_export_ticket(&idx, t));
                if idx.is_loaded() {
                    let missed = tickets.iter().filter(|t| webhooks_missed(&idx, t)).count();
                    if missed > 0 {
                        metrics.export_missed(Export::Tickets, missed as u64);
                    }
                }
            }
            vec![Change::Tickets(tickets)]
        };
        self.pipelined(Export::Tickets, start, fetch, apply, shutdown)
            .await
    }

    /// The organizations export is time-based: `end_time` of one page is the next `start_time`.
    /// Records of the last second come again on the next page; applying them twice is harmless.
    async fn read_organizations(&self, shutdown: &CancellationToken) -> Result<u64, CycleError> {
        let mut total = 0u64;
        loop {
            let start = self.index.read().cursors().organizations.unwrap_or(0);
            let page = cancellable(shutdown, self.client.export_organizations(start)).await??;
            let n = page.organizations.len() as u64;
            let next = match page.end_time {
                // A full page whose records all share `start`'s second would come back forever.
                Some(end) if end <= start && !page.end_of_stream => start + 1,
                Some(end) => end.max(start),
                None => start,
            };
            let mut changes = vec![
                Change::Organizations(page.organizations),
                Change::Cursor(CursorMove::Organizations(next)),
            ];
            if page.end_of_stream {
                changes.push(Change::Fresh(Export::Organizations, now_ms()));
            }
            self.writer.apply_all(changes).await?;
            total += n;
            self.counted(Export::Organizations, n);
            if page.end_of_stream || n == 0 {
                self.reading[Export::Organizations.idx()].store(false, Ordering::Relaxed);
                return Ok(total);
            }
        }
    }

    /// Reads a cursor export from `start` to `end_of_stream`, fetching the next pages while the
    /// current one is applied, so Zendesk's serving, the decoding and the index writes overlap
    /// instead of taking turns (on the warm-up of a large account that is the difference between
    /// the sum and the slowest of the three). Each page's changes (`apply`) go to the writer as
    /// one message with its cursor and, at `end_of_stream`, the export's freshness. Returns the
    /// records applied.
    ///
    /// The stored cursor only moves with an applied page, so an error (passed on after the pages
    /// before it are applied) or a cancellation leaves it at the last page really applied.
    async fn pipelined<B, F, Fut>(
        &self,
        export: Export,
        start: ExportStart,
        mut fetch: F,
        mut apply: impl FnMut(B) -> Vec<Change>,
        shutdown: &CancellationToken,
    ) -> Result<u64, CycleError>
    where
        F: FnMut(ExportStart) -> Fut,
        Fut: Future<Output = Result<Fetched<B>, ZendeskError>>,
    {
        let (tx, mut rx) = mpsc::channel::<Result<Fetched<B>, ZendeskError>>(PREFETCH_PAGES);
        let producer = async move {
            let mut start = start;
            loop {
                let page = fetch(start).await;
                let next = match &page {
                    Ok(p) if p.end_of_stream => None,
                    Ok(p) => match &p.after_cursor {
                        Some(c) => Some(ExportStart::Cursor(c.clone())),
                        None => {
                            warn!(
                                export = export.as_str(),
                                "an export page had neither end_of_stream nor after_cursor; reading on at the next poll"
                            );
                            None
                        }
                    },
                    Err(_) => None,
                };
                // The receiver is gone when the consumer stopped (error or cancellation).
                if tx.send(page).await.is_err() {
                    return;
                }
                match next {
                    Some(n) => start = n,
                    None => return,
                }
            }
        };
        let consumer = async move {
            let mut total = 0u64;
            while let Some(page) = rx.recv().await {
                let page = page?;
                let mut changes = apply(page.batch);
                let pending = changes
                    .iter()
                    .any(|c| matches!(c, Change::IdentitiesPending(_)));
                if pending {
                    self.wait_for_identity_fetches().await;
                }
                match (export, page.after_cursor) {
                    (Export::Users, Some(c)) => changes.push(Change::Cursor(CursorMove::Users(c))),
                    (Export::Tickets, Some(c)) => {
                        changes.push(Change::Cursor(CursorMove::Tickets(c)))
                    }
                    // Time-based: read by `read_organizations`, never here.
                    _ => {}
                }
                if page.end_of_stream {
                    changes.push(Change::Fresh(export, now_ms()));
                }
                self.writer.apply_all(changes).await?;
                if pending {
                    self.identities_added.notify_one();
                }
                total += page.records;
                self.counted(export, page.records);
            }
            Ok::<u64, CycleError>(total)
        };
        let ((), total) = cancellable(shutdown, async { tokio::join!(producer, consumer) }).await?;
        self.reading[export.idx()].store(false, Ordering::Relaxed);
        total
    }

    fn counted(&self, export: Export, n: u64) {
        self.records.fetch_add(n, Ordering::Relaxed);
        self.per_export[export.idx()].fetch_add(n, Ordering::Relaxed);
    }

    /// Bounds the users waiting for their identities: the users export waits (cursor and all)
    /// while too many do.
    async fn wait_for_identity_fetches(&self) {
        while self.index.read().pending_identities_len() > MAX_PENDING_IDENTITIES {
            let fetched = self.identities_fetched.notified();
            tokio::select! {
                () = fetched => {}
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }

    /// Waits until no user's identities are left to fetch (or shutdown).
    async fn wait_for_all_identities(&self, shutdown: &CancellationToken) {
        loop {
            let left = self.index.read().pending_identities_len();
            if left == 0 {
                return;
            }
            self.identities_added.notify_one();
            let fetched = self.identities_fetched.notified();
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = fetched => {}
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }

    async fn save_snapshot(&self) {
        let started = Instant::now();
        match self.writer.save(self.opts.snapshot_path.clone()).await {
            Ok(()) => debug!(took = ?started.elapsed(), "snapshot saved"),
            Err(e) => {
                error!(error = %e, "saving the index snapshot failed; a restart would re-read more of the exports")
            }
        }
    }
}

/// Whether applying export row `t` changes what the index holds of it: a change the webhooks had
/// not delivered by the time the (60 s+ late) export brought it.
fn webhooks_missed(idx: &Index, t: &Ticket) -> bool {
    let held = idx.open_ticket(t.id);
    match (t.is_open(), held) {
        (true, None) => true,
        (true, Some(h)) => {
            let at = t
                .updated_at
                .as_deref()
                .and_then(crate::zendesk::models::parse_time);
            at.is_some_and(|at| at > h.updated_at)
                || h.assignee_id != t.assignee_id
                || Some(h.requester_id) != t.requester_id
        }
        (false, held) => held.is_some(),
    }
}

/// Export pages fetched ahead of the index, with what applying each needs.
struct Fetched<B> {
    batch: B,
    records: u64,
    after_cursor: Option<String>,
    end_of_stream: bool,
}

/// Pages a cursor export may be fetched (and decoded, and prepared) ahead of the one being applied.
const PREFETCH_PAGES: usize = 2;

/// Fetches phone identities for the users the index lists as pending (their export page had no
/// identities sideload; the list survives restarts in the snapshot).
async fn identity_fetcher(this: Arc<Follower>, shutdown: CancellationToken) {
    let mut share_pacer: Option<bootstrap::Pacer> = None;
    let mut announced = false;
    let mut warned_no_sideload = false;
    loop {
        let batch = this.index.read().pending_identities(SHOW_MANY_BATCH);
        if batch.is_empty() {
            let added = this.identities_added.notified();
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = added => {}
                // Pending ids loaded from a snapshot are not announced.
                () = tokio::time::sleep(Duration::from_secs(5)) => {}
            }
            continue;
        }
        // While a bootstrap reads the end-users' pages, keep to the fetcher's share.
        let mut phase = this.reading_end_users.subscribe();
        if *phase.borrow_and_update() {
            let share = this.fetcher_share();
            let paced = async {
                match share {
                    0 => std::future::pending().await,
                    n => {
                        share_pacer
                            .get_or_insert_with(|| {
                                bootstrap::Pacer::new(n, this.client.budget().window())
                            })
                            .acquire()
                            .await
                    }
                }
            };
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = paced => {}
                // Phase 2 ended: no more pacing (a permit taken meanwhile is simply not used).
                _ = phase.wait_for(|reading| !reading) => continue,
            }
        }
        if !announced {
            info!(
                pending = this.index.read().pending_identities_len(),
                "the users export returned no identities sideload: fetching phone identities through users/show_many"
            );
            announced = true;
        }
        let fetched = match cancellable(
            &shutdown,
            fetch_identities(&this, &batch, &mut warned_no_sideload),
        )
        .await
        {
            Err(_) => return,
            Ok(r) => r,
        };
        match fetched {
            Ok(change) => {
                let done = this
                    .writer
                    .apply_all(vec![change, Change::IdentitiesFetched(batch)])
                    .await;
                if done.is_err() {
                    return;
                }
                this.identities_fetched.notify_waiters();
            }
            Err(e) => {
                warn!(error = %e, users = batch.len(), "fetching phone identities failed; will retry");
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(Duration::from_secs(5)) => {}
                }
            }
        }
    }
}

/// The phone identities of `ids` as one change: from `show_many` with the sideload, or, when the
/// answer has no `identities` key at all, from each user's identities endpoint. Users missing from
/// the answer are gone (deleted): nothing to fetch for them.
async fn fetch_identities(
    this: &Follower,
    ids: &[i64],
    warned_no_sideload: &mut bool,
) -> Result<Change, ZendeskError> {
    let found = this.client.show_many_users(ids).await?;
    let identities = match found.identities {
        Some(list) => list,
        None => {
            if !*warned_no_sideload {
                warn!(
                    "users/show_many answered without the identities sideload: reading each user's identities instead"
                );
                *warned_no_sideload = true;
            }
            let mut all = Vec::new();
            for u in &found.users {
                match this.client.user_identities(u.id).await {
                    Ok(list) => all.extend(list),
                    Err(ZendeskError::Permanent { status: 404, .. }) => {}
                    Err(e) => return Err(e),
                }
            }
            all
        }
    };
    Ok(Change::Users(UserBatch::identities_only(
        &found.users,
        &identities,
        &this.parser,
    )))
}

async fn progress_logger(this: Arc<Follower>, started: Instant, stop: CancellationToken) {
    let mut tick = tokio::time::interval(this.opts.progress_every);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let records = this.records.load(Ordering::Relaxed);
        let secs = started.elapsed().as_secs_f64();
        let counts = this.index.read().counts();
        let names = ["users", "tickets", "organizations"];
        let reading: Vec<&str> = names
            .iter()
            .zip(&this.reading)
            .filter(|(_, r)| r.load(Ordering::Relaxed))
            .map(|(n, _)| *n)
            .collect();
        let [users, tickets, organizations] =
            [0, 1, 2].map(|i| this.per_export[i].load(Ordering::Relaxed));
        info!(
            records,
            rate = format!("{:.0}/s", records as f64 / secs.max(0.001)),
            reading = reading.join(","),
            users_read = users,
            tickets_read = tickets,
            organizations_read = organizations,
            customers = counts.customers,
            open_tickets = counts.open_tickets,
            organizations = counts.organizations,
            "warm-up in progress"
        );
    }
}

fn cursor_or_start(cursor: Option<String>, start_time: i64) -> ExportStart {
    match cursor {
        Some(c) => ExportStart::Cursor(c),
        None => ExportStart::StartTime(start_time.max(0)),
    }
}

async fn cancellable<T>(
    shutdown: &CancellationToken,
    fut: impl std::future::Future<Output = T>,
) -> Result<T, CycleError> {
    tokio::select! {
        _ = shutdown.cancelled() => Err(CycleError::Cancelled),
        v = fut => Ok(v),
    }
}

/// 5 s, 10 s, 20 s … capped at the larger of the poll interval and 5 minutes.
fn backoff(failures: u32, poll: Duration) -> Duration {
    crate::clock::exponential(
        Duration::from_secs(5),
        failures.saturating_sub(1),
        poll.max(Duration::from_secs(300)),
    )
}

pub(crate) use crate::clock::now_ms;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_caps() {
        let poll = Duration::from_secs(60);
        assert_eq!(backoff(1, poll), Duration::from_secs(5));
        assert_eq!(backoff(2, poll), Duration::from_secs(10));
        assert_eq!(backoff(20, poll), Duration::from_secs(300));
    }

    /// The users export waits while more than `MAX_PENDING_IDENTITIES` users wait for their
    /// identities, and goes on as soon as a fetched batch brings the count to the bound.
    #[tokio::test]
    async fn the_users_export_waits_while_too_many_identities_are_pending() {
        let writer = IndexWriter::spawn(Index::new());
        let over: Vec<i64> = (1..=MAX_PENDING_IDENTITIES as i64 + 100).collect();
        writer.apply(Change::IdentitiesPending(over)).await.unwrap();
        let client = Client::new(crate::zendesk::ClientOptions {
            base_url: "http://127.0.0.1:9".into(),
            credentials: crate::zendesk::Credentials::ApiToken {
                email: "a@b.test".into(),
                token: secrecy::SecretString::from("t"),
            },
            requests_per_minute: 100,
            export_requests_per_minute: 10,
            timeout: Duration::from_secs(1),
            max_retries: 0,
            rate_window: std::time::Duration::from_secs(60),
        })
        .unwrap();
        let (follower, _) = Follower::new(
            client,
            writer.clone(),
            PhoneParser::new("UA").unwrap(),
            FollowerOptions::new(Duration::from_secs(60), "unused.snapshot".into()),
        );
        let follower = Arc::new(follower);
        let mut waiting = tokio::spawn({
            let f = follower.clone();
            async move { f.wait_for_identity_fetches().await }
        });
        // Still over the bound: it keeps waiting, through a wake-up and past its 1 s re-check.
        follower.identities_fetched.notify_waiters();
        assert!(
            tokio::time::timeout(Duration::from_millis(1500), &mut waiting)
                .await
                .is_err(),
            "the export went on with too many identities pending"
        );
        // A fetched batch of 100 brings the count to the bound: the export goes on.
        writer
            .apply(Change::IdentitiesFetched((1..=100).collect()))
            .await
            .unwrap();
        follower.identities_fetched.notify_waiters();
        tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("the export goes on once the bound holds")
            .unwrap();
        assert_eq!(
            follower.index.read().pending_identities_len(),
            MAX_PENDING_IDENTITIES
        );
    }
}
