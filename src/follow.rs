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
//! Phone identities: the users export is asked for `include=identities`. Whether real Zendesk honours
//! that on the export is unverified, so when a page comes back without the sideload, the follower
//! fetches the identities of that page's end-users through `users/show_many?include=identities`
//! (100 users a request) in a background task that spends the shared request budget like everything
//! else, and applies them as they arrive.

use std::{
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::{
    index::{Export, Index, SharedIndex, UserBatch, snapshot},
    phone::PhoneParser,
    zendesk::{
        Client, ExportStart, ZendeskError,
        models::{Ticket, UsersCursorPage},
    },
};

/// Records per export page (the documented maximum).
pub const PER_PAGE: u32 = 1000;
/// Users per `show_many` request.
const SHOW_MANY_BATCH: usize = 100;

#[derive(Debug, Clone)]
pub struct FollowerOptions {
    pub poll: Duration,
    /// Where the snapshot lives (`{data_dir}/index.snapshot`).
    pub snapshot_path: PathBuf,
    /// The least time between two snapshot writes while following.
    pub snapshot_every: Duration,
    /// How often warm-up progress is logged.
    pub progress_every: Duration,
}

impl FollowerOptions {
    pub fn new(poll: Duration, snapshot_path: PathBuf) -> Self {
        Self {
            poll,
            snapshot_path,
            snapshot_every: Duration::from_secs(60),
            progress_every: Duration::from_secs(5),
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
}

pub struct Follower {
    client: Client,
    index: SharedIndex,
    parser: PhoneParser,
    opts: FollowerOptions,
    loaded: watch::Sender<bool>,
    records: AtomicU64,
    /// Records read per export (users, tickets, organizations), for progress logs.
    per_export: [AtomicU64; 3],
    /// Which exports are being read right now.
    reading: [AtomicBool; 3],
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
    pub fn new(
        client: Client,
        index: SharedIndex,
        parser: PhoneParser,
        opts: FollowerOptions,
    ) -> (Self, watch::Receiver<bool>) {
        let already = index.read().is_loaded();
        let (tx, rx) = watch::channel(already);
        (
            Self {
                client,
                index,
                parser,
                opts,
                loaded: tx,
                records: AtomicU64::new(0),
                per_export: Default::default(),
                reading: Default::default(),
                webhooks: None,
            },
            rx,
        )
    }

    /// With webhooks on: count the export's ticket rows that found the index behind
    /// (`deskline_export_missed_by_webhooks_total`) and skip rows older than what webhooks applied.
    pub fn with_webhooks(
        mut self,
        metrics: Arc<crate::metrics::Metrics>,
        versions: crate::webhooks::apply::SharedVersions,
    ) -> Self {
        self.webhooks = Some((metrics, versions));
        self
    }

    /// Follows until `shutdown`. Zendesk errors never end it: it logs, backs off and tries again, and
    /// the routing path keeps answering from what the index has.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let this = Arc::new(self);
        let (id_tx, id_rx) = mpsc::unbounded_channel::<Vec<i64>>();
        let fetcher = tokio::spawn(identity_fetcher(this.clone(), id_rx, shutdown.clone()));
        let mut last_snapshot = Instant::now();
        let mut failures = 0u32;
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
            let result = this.cycle(&id_tx, &shutdown).await;
            if let Some(p) = progress {
                p.abort();
            }
            let mut wait = this.opts.poll;
            match result {
                Ok(records) => {
                    failures = 0;
                    if warming {
                        let counts = {
                            let mut idx = this.index.write();
                            idx.set_loaded();
                            idx.counts()
                        };
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
                        this.save_snapshot().await;
                        last_snapshot = Instant::now();
                    } else if records > 0 && last_snapshot.elapsed() >= this.opts.snapshot_every {
                        this.save_snapshot().await;
                        last_snapshot = Instant::now();
                    }
                    debug!(records, "exports followed");
                }
                Err(CycleError::Cancelled) => break,
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
                    if warming && last_snapshot.elapsed() >= this.opts.snapshot_every {
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
    async fn cycle(
        &self,
        id_tx: &mpsc::UnboundedSender<Vec<i64>>,
        shutdown: &CancellationToken,
    ) -> Result<u64, CycleError> {
        for r in &self.reading {
            r.store(true, Ordering::Relaxed);
        }
        let (u, t, o) = tokio::try_join!(
            self.read_users(id_tx, shutdown),
            self.read_tickets(shutdown),
            self.read_organizations(shutdown)
        )?;
        Ok(u + t + o)
    }

    async fn read_users(
        &self,
        id_tx: &mpsc::UnboundedSender<Vec<i64>>,
        shutdown: &CancellationToken,
    ) -> Result<u64, CycleError> {
        let start = cursor_or_start(self.index.read().cursors().users.clone());
        let fetch = |start: ExportStart| async move {
            let page = self.client.export_users(&start, true, PER_PAGE).await?;
            let parser = self.parser.clone();
            let versions = self.webhooks.as_ref().map(|(_, v)| v.clone());
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
                // Rows older than what webhooks applied would step those users back.
                if let Some(v) = versions {
                    let older: Vec<i64> = users
                        .iter()
                        .filter(|u| v.export_user_is_older(u))
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
        let apply = |idx: &mut Index, (batch, wanted): (UserBatch, Vec<i64>)| {
            idx.apply_user_batch(batch);
            if !wanted.is_empty() {
                let _ = id_tx.send(wanted);
            }
        };
        self.pipelined(Export::Users, start, fetch, apply, shutdown)
            .await
    }

    async fn read_tickets(&self, shutdown: &CancellationToken) -> Result<u64, CycleError> {
        let start = cursor_or_start(self.index.read().cursors().tickets.clone());
        let fetch = |start: ExportStart| async move {
            let page = self.client.export_tickets(&start, PER_PAGE).await?;
            Ok(Fetched {
                records: page.tickets.len() as u64,
                batch: page.tickets,
                after_cursor: page.after_cursor,
                end_of_stream: page.end_of_stream,
            })
        };
        let apply = |idx: &mut Index, tickets: Vec<Ticket>| {
            let mut missed = 0;
            for t in &tickets {
                if let Some((_, versions)) = &self.webhooks {
                    if versions.export_row_is_older(t) {
                        continue;
                    }
                    if idx.is_loaded() && webhooks_missed(idx, t) {
                        missed += 1;
                    }
                }
                idx.apply_ticket(t);
            }
            if let (Some((m, _)), true) = (&self.webhooks, missed > 0) {
                m.export_missed(Export::Tickets, missed);
            }
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
            {
                let mut idx = self.index.write();
                for o in &page.organizations {
                    idx.apply_organization(o);
                }
                let next = match page.end_time {
                    // A full page whose records all share `start`'s second would come back forever.
                    Some(end) if end <= start && !page.end_of_stream => start + 1,
                    Some(end) => end.max(start),
                    None => start,
                };
                idx.cursors_mut().organizations = Some(next);
                if page.end_of_stream {
                    idx.mark_fresh(Export::Organizations, now_ms());
                }
            }
            total += n;
            self.counted(Export::Organizations, n);
            if page.end_of_stream || n == 0 {
                self.reading[export_slot(Export::Organizations)].store(false, Ordering::Relaxed);
                return Ok(total);
            }
        }
    }

    /// Reads a cursor export from `start` to `end_of_stream`, fetching the next pages while the
    /// current one is applied, so Zendesk's serving, the decoding and the index writes overlap
    /// instead of taking turns (on the warm-up of a large account that is the difference between
    /// the sum and the slowest of the three). Each page is applied with `apply` under the write
    /// lock, together with its cursor and, at `end_of_stream`, the export's freshness. Returns the
    /// records applied.
    ///
    /// The stored cursor only moves with an applied page, so an error (passed on after the pages
    /// before it are applied) or a cancellation leaves it at the last page really applied.
    async fn pipelined<B, F, Fut>(
        &self,
        export: Export,
        start: ExportStart,
        mut fetch: F,
        mut apply: impl FnMut(&mut Index, B),
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
                {
                    let mut idx = self.index.write();
                    apply(&mut idx, page.batch);
                    if let Some(c) = page.after_cursor {
                        let cursors = idx.cursors_mut();
                        match export {
                            Export::Users => cursors.users = Some(c),
                            Export::Tickets => cursors.tickets = Some(c),
                            // Time-based: read by `read_organizations`, never here.
                            Export::Organizations => {}
                        }
                    }
                    if page.end_of_stream {
                        idx.mark_fresh(export, now_ms());
                    }
                }
                total += page.records;
                self.counted(export, page.records);
            }
            Ok::<u64, ZendeskError>(total)
        };
        let ((), total) = cancellable(shutdown, async { tokio::join!(producer, consumer) }).await?;
        self.reading[export_slot(export)].store(false, Ordering::Relaxed);
        Ok(total?)
    }

    fn counted(&self, export: Export, n: u64) {
        self.records.fetch_add(n, Ordering::Relaxed);
        self.per_export[export_slot(export)].fetch_add(n, Ordering::Relaxed);
    }

    async fn save_snapshot(&self) {
        let index = self.index.clone();
        let path = self.opts.snapshot_path.clone();
        let started = Instant::now();
        let result =
            tokio::task::spawn_blocking(move || snapshot::save(&index.read(), &path)).await;
        match result {
            Ok(Ok(())) => debug!(took = ?started.elapsed(), "snapshot saved"),
            Ok(Err(e)) => {
                error!(error = %e, "saving the index snapshot failed; a restart would re-read more of the exports")
            }
            Err(e) => error!(error = %e, "the snapshot task failed"),
        }
    }
}

/// Where an export's counters sit in `Follower::per_export` and `Follower::reading`.
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

fn export_slot(export: Export) -> usize {
    match export {
        Export::Users => 0,
        Export::Tickets => 1,
        Export::Organizations => 2,
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

/// Fetches phone identities for users whose export page had no identities sideload.
async fn identity_fetcher(
    this: Arc<Follower>,
    mut rx: mpsc::UnboundedReceiver<Vec<i64>>,
    shutdown: CancellationToken,
) {
    let mut pending: Vec<i64> = Vec::new();
    let mut warned = false;
    loop {
        while let Ok(ids) = rx.try_recv() {
            pending.extend(ids);
        }
        if pending.is_empty() {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                got = rx.recv() => match got {
                    Some(ids) => pending.extend(ids),
                    None => return,
                },
            }
            continue;
        }
        if !warned {
            info!(
                "the users export returned no identities sideload: fetching phone identities through users/show_many"
            );
            warned = true;
        }
        let batch: Vec<i64> = pending
            .drain(..pending.len().min(SHOW_MANY_BATCH))
            .collect();
        match cancellable(&shutdown, this.client.show_many_users(&batch)).await {
            Err(_) => return,
            Ok(Ok(found)) => {
                let ids = UserBatch::identities_only(&found.users, &found.identities, &this.parser);
                this.index.write().apply_user_batch(ids);
            }
            Ok(Err(e)) => {
                warn!(error = %e, users = batch.len(), "fetching phone identities failed; will retry");
                pending.extend(batch);
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(5)) => {}
                }
            }
        }
    }
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

fn cursor_or_start(cursor: Option<String>) -> ExportStart {
    match cursor {
        Some(c) => ExportStart::Cursor(c),
        None => ExportStart::StartTime(0),
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
    let step = Duration::from_secs(5).saturating_mul(1 << failures.saturating_sub(1).min(8));
    step.min(poll.max(Duration::from_secs(300)))
}

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

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
}
