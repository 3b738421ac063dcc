//! One index, many copies (DESIGN §8): how a replica's index follows the shared change log, and
//! how one replica at a time follows the exports for all of them. Only with PostgreSQL; a single
//! replica on SQLite never touches this module.
//!
//! - **Every change goes through the log.** The sync worker, the webhooks and the follower hold an
//!   [`IndexWriter`] with a [`Publish`]er ([`Replica::publisher`]): a change is appended to
//!   `cluster_changes` (postcard-encoded `Vec<index::Change>`, the writer's own messages) and the
//!   call returns once this replica's *subscriber* has applied it. So every replica, the writer's
//!   own included, applies the same changes in the same (seq) order, and none applies its own write
//!   out of order: the index keeps the last write it applied, it does not compare `updated_at`, so
//!   a local write applied before an older change of the log would be overwritten by it.
//!   Read-your-writes holds on the writing replica (it waits for its subscriber, normally a few
//!   milliseconds, at most [`APPLY_WAIT`]) and on the others one `LISTEN/NOTIFY` round later.
//! - **PostgreSQL down.** An append that fails (or takes over [`APPEND_TIMEOUT`]) applies the
//!   change here only (answers stay right on this replica); the others get it from the exports
//!   once the follower reads it. It also opens a breaker: until a background probe (every
//!   [`PROBE_EVERY`]) gets an answer from PostgreSQL again, the next changes skip the log at once
//!   instead of each waiting for its own timeout, so a hanging PostgreSQL costs one sync step or
//!   webhook one timeout, not every one of them. `ReportCall` never waits on any of this: its
//!   last-call record is published in a task of its own. The follower's fenced pages are not
//!   behind the breaker: they must reach the log, so the follower waits and retries.
//! - **An append that commits after all.** A timed-out (or failed) append may still commit: the
//!   INSERT was sent, and PostgreSQL may answer it after we stopped waiting. Applied again when
//!   the subscriber reaches it, that change could land after a newer change of the same entity
//!   and win (the index keeps the last write it applied). So the replica remembers the SHA-256
//!   of every payload it applied locally that way ([`Unconfirmed`], bounded, for
//!   [`UNCONFIRMED_TTL`]), and its subscriber skips a change of its own origin with a remembered
//!   digest once (counted in `deskline_changelog_late_own_skipped_total`). The other replicas
//!   apply it in log order as usual: on them it may come after a newer change another replica
//!   appended meanwhile, and the exports repair that. A payload re-sent identical by this replica
//!   while the first is remembered is skipped instead of the late one when it comes first; both
//!   carry the same state, which this replica already applied.
//! - **One follower.** [`Replica::run_follower`] keeps the `follower` lease; while it holds it, it
//!   first catches up with the log (so the export cursors in its index are the last holder's:
//!   cursors travel in the log with their pages) and then runs a [`Follower`] whose writes carry the
//!   lease's fence, so a holder that lost the lease cannot append another page. Losing the lease
//!   cancels the follower. The others never read the exports.
//! - **Shared snapshot.** The holder stores the index every `index.shared_snapshot_seconds` (first
//!   as soon as the warm-up is done) with the seq it includes, and prunes the log behind it. The
//!   seq is exact: the subscriber, the only path that applies log changes, queues the save between
//!   two changes. A new replica loads the latest snapshot and follows the log after its seq, so it
//!   never warms up from Zendesk while one exists; without one it replays the log from seq 0 (the
//!   first follower's warm-up pages included). A subscriber that finds its position pruned reloads
//!   the snapshot.

use std::{
    collections::{HashSet, VecDeque},
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, SystemTime},
};

use deadpool_postgres::Pool;
use tokio::{
    sync::{mpsc, oneshot, watch},
    time::Instant,
};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::{
    cluster::{
        ChangeLog, ClusterError, Fence, Lease, SharedSnapshot, SubscriberConfig,
        snapshot::SnapshotMeta,
    },
    follow::Follower,
    index::{Index, IndexWriter, Publish, Published, snapshot, writer},
    metrics::ReplicaGauges,
};

/// How long a writer waits for its own subscriber to apply what it appended before it returns
/// anyway ([`Published::Pending`]); the change is applied later, in order.
pub(crate) const APPLY_WAIT: Duration = Duration::from_secs(2);
/// An append that takes longer counts as PostgreSQL being unreachable.
const APPEND_TIMEOUT: Duration = Duration::from_secs(2);
/// How often the breaker's probe asks PostgreSQL whether it is back (see [`Replica::probe`]).
const PROBE_EVERY: Duration = Duration::from_secs(1);
/// The lease's name in `cluster_lease`.
pub(crate) const FOLLOWER_LEASE: &str = "follower";
/// How old pruned changes must be: a replica a little behind follows on without a reload.
const PRUNE_MIN_AGE: Duration = Duration::from_secs(60);
/// How often the change-log lag is measured for the metrics.
const LAG_EVERY: Duration = Duration::from_secs(2);
/// How often a replica without a usable snapshot ([`StartFrom::Rebuild`]) looks for a new one.
const REBUILD_POLL: Duration = Duration::from_secs(2);
/// How long the digest of a payload whose append timed out or failed is remembered: longer than
/// such an append can still commit (its connection dies within about a minute of a cut network:
/// the keepalive in [`crate::pg::Connect::new`]), short enough not to catch an unrelated repeat.
const UNCONFIRMED_TTL: Duration = Duration::from_secs(600);
/// At most this many are remembered (the oldest are forgotten first). Appends time out only until
/// the breaker opens, so a few per outage.
const UNCONFIRMED_MAX: usize = 1024;

#[derive(Debug, Clone)]
pub(crate) struct ReplicaOptions {
    /// `index.follower_lease_seconds`.
    pub lease_ttl: Duration,
    /// `index.shared_snapshot_seconds`.
    pub snapshot_every: Duration,
    /// Where the snapshot being shared is written first (`{data_dir}/shared-index.snapshot`).
    pub snapshot_path: PathBuf,
}

/// This replica's side of the shared index.
pub(crate) struct Replica {
    pool: Pool,
    connect: crate::pg::Connect,
    id: String,
    log: ChangeLog,
    snapshots: SharedSnapshot,
    /// The last seq applied to the index by the subscriber.
    applied: watch::Sender<i64>,
    gauges: ReplicaGauges,
    opts: ReplicaOptions,
    /// Save requests to the subscriber (the one place that knows which seq the index is at).
    save_tx: mpsc::Sender<SaveRequest>,
    save_rx: parking_lot::Mutex<Option<mpsc::Receiver<SaveRequest>>>,
    /// The change log's breaker for the unfenced writers: open (true) from a failed append until
    /// [`Replica::probe`] reaches PostgreSQL again; while open, changes skip the log at once.
    breaker: AtomicBool,
    /// Shared snapshots this process found unusable: never read again (no loop over a bad one).
    unusable: parking_lot::Mutex<HashSet<i64>>,
    /// Set while the index waits for a new shared snapshot ([`StartFrom::Rebuild`]).
    rebuilding: AtomicBool,
    /// Payloads applied here only because their append failed or timed out, which may still
    /// commit (see the module doc).
    unconfirmed: parking_lot::Mutex<Unconfirmed>,
}

/// The SHA-256 digests of payloads whose append failed or timed out on this replica, each for
/// [`UNCONFIRMED_TTL`], at most [`UNCONFIRMED_MAX`]. A digest remembered twice (the same payload
/// failed twice) is skipped twice.
#[derive(Debug, Default)]
struct Unconfirmed {
    /// Oldest first, with when each is forgotten.
    entries: VecDeque<(Instant, [u8; 32])>,
}

impl Unconfirmed {
    fn digest(payload: &[u8]) -> [u8; 32] {
        use sha2::Digest as _;
        sha2::Sha256::digest(payload).into()
    }

    fn expire(&mut self, now: Instant) {
        while self.entries.front().is_some_and(|(until, _)| *until <= now) {
            self.entries.pop_front();
        }
    }

    fn remember(&mut self, payload: &[u8]) {
        let now = Instant::now();
        self.expire(now);
        if self.entries.len() >= UNCONFIRMED_MAX {
            self.entries.pop_front();
        }
        self.entries
            .push_back((now + UNCONFIRMED_TTL, Self::digest(payload)));
    }

    /// Whether `payload` was remembered; forgets it (one occurrence).
    fn take(&mut self, payload: &[u8]) -> bool {
        self.expire(Instant::now());
        if self.entries.is_empty() {
            return false;
        }
        let digest = Self::digest(payload);
        match self.entries.iter().position(|(_, d)| *d == digest) {
            Some(i) => {
                self.entries.remove(i);
                true
            }
            None => false,
        }
    }
}

impl std::fmt::Debug for Replica {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replica")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

type SaveDone = oneshot::Receiver<Result<(), snapshot::SnapshotError>>;

struct SaveRequest {
    path: PathBuf,
    reply: oneshot::Sender<(i64, SaveDone)>,
}

/// Where a replica's index starts.
pub(crate) struct Start {
    pub index: Index,
    /// The seq the index includes: the subscriber follows the log after it.
    pub seq: i64,
    pub from: StartFrom,
}

/// What [`Replica::start`] found to start from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StartFrom {
    /// The shared snapshot with this id (the newest usable one).
    Snapshot(i64),
    /// No usable snapshot, and the log was never pruned: the whole log from seq 0 (on a first
    /// start, the first follower's warm-up pages).
    Log,
    /// No usable snapshot, and the log no longer reaches back: an empty index at the log's head.
    /// The subscriber polls for a new snapshot (the follower stores one at its next period, or at
    /// once when the damaged one was deleted) and loads it; if this replica takes the follower
    /// lease first, its follower finds no export cursor and warms up from Zendesk through the log.
    Rebuild,
}

impl Replica {
    /// `connect`: the pool's connection settings (`search_path` included) for the subscription's
    /// own connection; `id`: this replica's unique name.
    pub(crate) fn new(
        pool: Pool,
        connect: crate::pg::Connect,
        id: String,
        gauges: ReplicaGauges,
        opts: ReplicaOptions,
    ) -> Arc<Self> {
        let (save_tx, save_rx) = mpsc::channel(1);
        Arc::new(Self {
            log: ChangeLog::new(pool.clone(), id.clone()),
            snapshots: SharedSnapshot::new(pool.clone(), id.clone()),
            pool,
            connect,
            id,
            applied: watch::channel(0).0,
            gauges,
            opts,
            save_tx,
            save_rx: parking_lot::Mutex::new(Some(save_rx)),
            breaker: AtomicBool::new(false),
            unusable: Default::default(),
            rebuilding: AtomicBool::new(false),
            unconfirmed: Default::default(),
        })
    }

    /// Where this replica's index starts (see [`StartFrom`]): the newest usable shared snapshot
    /// (a damaged or undecodable one is skipped with a warning naming it, counted in
    /// `deskline_shared_snapshot_unusable_total`, and never tried again by this process), else the
    /// whole log if it was never pruned, else an empty index at the log's head ([`StartFrom::Rebuild`]).
    pub(crate) async fn start(&self) -> anyhow::Result<Start> {
        let started = std::time::Instant::now();
        let listed = self.snapshots.list().await?;
        for meta in &listed {
            if self.unusable.lock().contains(&meta.id) {
                continue;
            }
            let Some(index) = self.load_snapshot(meta).await? else {
                continue;
            };
            info!(
                snapshot_id = meta.id,
                seq = meta.seq,
                bytes = meta.size,
                customers = index.counts().customers,
                took_ms = started.elapsed().as_millis() as u64,
                "index loaded from the shared snapshot"
            );
            return Ok(Start {
                index,
                seq: meta.seq,
                from: StartFrom::Snapshot(meta.id),
            });
        }
        let pruned_through = self.log.pruned_through().await?;
        if pruned_through == 0 {
            if listed.is_empty() {
                info!("no shared index snapshot yet: following the change log from its start");
            } else {
                warn!("no usable shared index snapshot: replaying the whole change log instead");
            }
            return Ok(Start {
                index: Index::new(),
                seq: 0,
                from: StartFrom::Log,
            });
        }
        // A log pruned to its last change is empty: its head is then the pruned seq.
        let head = self.log.newest_seq().await?.max(pruned_through);
        warn!(
            pruned_through,
            head,
            "no usable shared index snapshot, and the change log no longer reaches back to its \
             start: the index starts empty (NOT_SERVING) and follows the log from its head until \
             the follower stores a new snapshot, or this replica takes the follower lease and warms \
             up from Zendesk"
        );
        self.rebuilding.store(true, Ordering::Release);
        Ok(Start {
            index: Index::new(),
            seq: head,
            from: StartFrom::Rebuild,
        })
    }

    /// Reads, checks and decodes one shared snapshot; `None` when it is gone (replaced since it
    /// was listed) or unusable. An unusable one is logged, counted and remembered so that it is
    /// never read again; a damaged one (size, chunks or CRC-32 wrong) is also deleted, which makes
    /// the follower store a fresh one. Only PostgreSQL failing is an error.
    async fn load_snapshot(&self, meta: &SnapshotMeta) -> anyhow::Result<Option<Index>> {
        let bytes = match self.snapshots.load_bytes(meta.id).await {
            Ok(Some((_, bytes))) => bytes,
            Ok(None) => return Ok(None),
            Err(ClusterError::CorruptSnapshot { id, reason }) => {
                warn!(
                    snapshot_id = id,
                    seq = meta.seq,
                    origin = %meta.origin,
                    reason,
                    "the shared index snapshot is damaged: skipped and deleted"
                );
                self.gauges.snapshots_unusable.inc();
                self.unusable.lock().insert(id);
                if let Err(e) = self.snapshots.discard(id).await {
                    warn!(snapshot_id = id, error = %e, "the damaged shared snapshot was not deleted");
                }
                return Ok(None);
            }
            Err(e) => return Err(e.into()),
        };
        match decode(meta.id, bytes).await {
            Ok(index) => Ok(Some(index)),
            Err(e) => {
                // Not deleted: a newer release's format is no damage to the replicas that read it.
                warn!(
                    snapshot_id = meta.id,
                    seq = meta.seq,
                    origin = %meta.origin,
                    error = format!("{e:#}"),
                    "the shared index snapshot cannot be decoded (damaged before it was stored, or \
                     written by a newer release): skipped"
                );
                self.gauges.snapshots_unusable.inc();
                self.unusable.lock().insert(meta.id);
                Ok(None)
            }
        }
    }

    /// While [`StartFrom::Rebuild`]: a newer shared snapshot than those found unusable, loaded,
    /// or `None`. Errors only log: the next poll tries again.
    async fn rebuild_from_new_snapshot(&self) -> Option<(SnapshotMeta, Index)> {
        let listed = match self.snapshots.list().await {
            Ok(l) => l,
            Err(e) => {
                warn!(error = %e, "listing the shared snapshots failed; trying again");
                return None;
            }
        };
        for meta in listed {
            if self.unusable.lock().contains(&meta.id) {
                continue;
            }
            match self.load_snapshot(&meta).await {
                Ok(Some(index)) => return Some((meta, index)),
                Ok(None) => {}
                Err(e) => {
                    warn!(
                        error = format!("{e:#}"),
                        "reading a shared snapshot failed; trying again"
                    );
                    return None;
                }
            }
        }
        None
    }

    /// A publisher for the sync worker and the webhooks (no fence: any replica may write).
    pub(crate) fn publisher(self: &Arc<Self>) -> Arc<dyn Publish> {
        Arc::new(LogPublisher {
            replica: self.clone(),
            fence: None,
        })
    }

    /// The last seq applied to this replica's index.
    pub(crate) fn applied(&self) -> watch::Receiver<i64> {
        self.applied.subscribe()
    }

    /// Applies the log after `from` through `writer`, in seq order, until `stop`; reloads the
    /// shared snapshot when its position was pruned; serves the follower's save requests.
    pub(crate) async fn run_subscriber(
        self: Arc<Self>,
        writer: IndexWriter,
        from: i64,
        stop: CancellationToken,
    ) -> anyhow::Result<()> {
        let mut save_rx = self
            .save_rx
            .lock()
            .take()
            .ok_or_else(|| anyhow::anyhow!("the change-log subscriber runs once"))?;
        let mut after = from;
        self.set_applied(after);
        let mut lag_tick = tokio::time::interval(LAG_EVERY);
        let mut rebuild_tick = tokio::time::interval(REBUILD_POLL);
        rebuild_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Set when a reload found no usable snapshot and the index was kept as it was: loaded,
        // but missing the pruned changes, so only a new snapshot ends the rebuild.
        let mut keep_until_snapshot = false;
        'subscribe: loop {
            let mut sub =
                self.log
                    .subscribe(self.connect.clone(), after, SubscriberConfig::default());
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return Ok(()),
                    Some(req) = save_rx.recv() => {
                        // Queued between two changes: the file holds exactly the changes through
                        // `after`.
                        match writer.save_queued(req.path).await {
                            Ok(done) => { let _ = req.reply.send((after, done)); }
                            Err(e) => return Err(e.into()),
                        }
                    }
                    _ = rebuild_tick.tick(), if self.rebuilding.load(Ordering::Acquire) => {
                        if !keep_until_snapshot && *writer.loaded().borrow() {
                            // The log brought a whole warm-up (this replica's as the follower).
                            self.rebuilding.store(false, Ordering::Release);
                            info!("the index was rebuilt from the change log");
                        } else if let Some((meta, index)) = self.rebuild_from_new_snapshot().await {
                            writer.replace(index).await?;
                            self.rebuilding.store(false, Ordering::Release);
                            keep_until_snapshot = false;
                            info!(snapshot_id = meta.id, seq = meta.seq,
                                "index loaded from a new shared snapshot");
                            after = meta.seq;
                            self.set_applied(after);
                            continue 'subscribe;
                        }
                    }
                    _ = lag_tick.tick() => {
                        match tokio::time::timeout(APPEND_TIMEOUT, self.log.lag(after)).await {
                            Ok(Ok(lag)) => {
                                self.gauges.behind.set(lag.behind);
                                self.gauges.lag_seconds.set(lag.oldest_unapplied_age.as_secs_f64());
                            }
                            Ok(Err(e)) => warn!(error = %e, "change-log lag not measured"),
                            Err(_) => warn!("change-log lag not measured: PostgreSQL is slow"),
                        }
                    }
                    item = sub.next() => match item {
                        None => anyhow::bail!("the change-log subscription stopped"),
                        Some(Ok(change)) => {
                            if change.origin == self.id
                                && self.unconfirmed.lock().take(&change.payload)
                            {
                                // Applied here when its append timed out; applying it again
                                // now could undo a newer change (see the module doc).
                                self.gauges.late_own_skipped.inc();
                                warn!(seq = change.seq, "a change whose append had timed out \
                                    committed after all: already applied on this replica, not \
                                    applied again here");
                            } else {
                                match writer::decode_changes(&change.payload) {
                                    Ok(changes) => writer.apply_replicated(changes).await?,
                                    // A newer build's change: skip it rather than stop following.
                                    Err(e) => error!(seq = change.seq, origin = %change.origin,
                                        error = %e, "an undecodable index change was skipped"),
                                }
                            }
                            after = change.seq;
                            self.set_applied(after);
                            if let Ok(age) = SystemTime::now().duration_since(change.created_at) {
                                if age > Duration::from_secs(1) {
                                    tracing::debug!(seq = after, age_ms = age.as_millis() as u64,
                                        "applied a change more than a second old");
                                }
                            }
                        }
                        Some(Err(ClusterError::Pruned { after: a, pruned_through })) => {
                            warn!(after = a, pruned_through,
                                "the change log was pruned past this replica: reloading the shared snapshot");
                            let start = self.start().await?;
                            if start.from == StartFrom::Rebuild {
                                keep_until_snapshot = true;
                                // An index missing some changes beats an empty one: keep it
                                // until a new snapshot replaces it (the rebuild poll).
                                warn!(head = start.seq, "no usable shared snapshot to reload: \
                                    this replica keeps its index, without the pruned changes, \
                                    until a new snapshot is stored");
                            } else if start.seq < pruned_through {
                                anyhow::bail!("the shared snapshot (seq {}) is older than the pruned log (seq {pruned_through})", start.seq);
                            } else {
                                writer.replace(start.index).await?;
                            }
                            after = start.seq;
                            self.set_applied(after);
                            continue 'subscribe;
                        }
                        Some(Err(e)) => {
                            warn!(error = %e, "the change-log subscription failed: subscribing again");
                            tokio::time::sleep(Duration::from_millis(200)).await;
                            continue 'subscribe;
                        }
                    }
                }
            }
        }
    }

    /// Opens the breaker after a failed append (once: a second failure while it is open only
    /// counts) and starts the probe that closes it.
    fn open_breaker(self: &Arc<Self>, why: &str) {
        if self.breaker.swap(true, Ordering::AcqRel) {
            return;
        }
        self.gauges.breaker_open.set(1);
        warn!(
            error = why,
            "an index change could not be appended to the shared log: it is applied on this \
             replica only, and so are the next ones, without waiting, until PostgreSQL answers again"
        );
        tokio::spawn(self.clone().probe());
    }

    /// Asks PostgreSQL a trivial question every [`PROBE_EVERY`] until it answers within
    /// [`APPEND_TIMEOUT`], then closes the breaker. Only one probe runs at a time.
    async fn probe(self: Arc<Self>) {
        let down = std::time::Instant::now();
        loop {
            tokio::time::sleep(PROBE_EVERY).await;
            if let Ok(Ok(())) = tokio::time::timeout(APPEND_TIMEOUT, self.log.ping()).await {
                break;
            }
        }
        self.breaker.store(false, Ordering::Release);
        self.gauges.breaker_open.set(0);
        info!(
            down_ms = down.elapsed().as_millis() as u64,
            "PostgreSQL answers again: index changes go through the shared log again"
        );
    }

    fn set_applied(&self, seq: i64) {
        self.applied.send_replace(seq);
        self.gauges.applied_seq.set(seq);
    }

    /// Keeps the follower lease and, while this replica holds it, runs the follower that
    /// `make_follower` builds on a fenced writer, and stores the shared snapshot.
    pub(crate) async fn run_follower<F>(
        self: Arc<Self>,
        writer: IndexWriter,
        make_follower: F,
        stop: CancellationToken,
    ) -> anyhow::Result<()>
    where
        F: Fn(IndexWriter) -> Follower + Send,
    {
        let lease = Arc::new(Lease::new(
            self.pool.clone(),
            FOLLOWER_LEASE,
            self.id.clone(),
            self.opts.lease_ttl,
        ));
        let (fence_tx, mut fence_rx) = watch::channel(None::<Fence>);
        let keeper = {
            let (lease, stop) = (lease.clone(), stop.clone());
            tokio::spawn(async move { lease.keep(fence_tx, stop).await })
        };
        let result = async {
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return Ok(()),
                    r = async { fence_rx.wait_for(|f| f.is_some()).await.map(|_| ()) } => if r.is_err() { return Ok(()) },
                }
                let Some(fence) = fence_rx.borrow().clone() else {
                    continue;
                };
                self.gauges.lease_held.set(1);
                self.gauges.lease_epoch.set(fence.epoch);
                info!(
                    epoch = fence.epoch,
                    "this replica holds the follower lease: following the exports"
                );
                let r = self
                    .follow_while_held(&writer, &make_follower, &fence, &mut fence_rx, &stop)
                    .await;
                self.gauges.lease_held.set(0);
                r?;
            }
        }
        .await;
        // `stop` ends the keeper, which releases the lease so another replica takes over at once.
        let _ = keeper.await;
        result
    }

    async fn follow_while_held<F>(
        self: &Arc<Self>,
        writer: &IndexWriter,
        make_follower: &F,
        fence: &Fence,
        fence_rx: &mut watch::Receiver<Option<Fence>>,
        stop: &CancellationToken,
    ) -> anyhow::Result<()>
    where
        F: Fn(IndexWriter) -> Follower,
    {
        let held = |f: &Option<Fence>| f.as_ref().is_some_and(|f| f.epoch == fence.epoch);
        // Catch up first: the export cursors are in the log, with the pages they follow.
        let caught_up = async {
            loop {
                match self.log.newest_seq().await {
                    Ok(head) => {
                        let mut applied = self.applied();
                        let _ = applied.wait_for(|a| *a >= head).await;
                        return;
                    }
                    Err(e) => {
                        warn!(error = %e, "reading the change log's head failed; retrying");
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                }
            }
        };
        tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            _ = async { fence_rx.wait_for(|f| !held(f)).await.map(|_| ()) } => {
                warn!(epoch = fence.epoch, "follower lease lost before the change log was caught up");
                return Ok(());
            }
            _ = caught_up => {}
        }
        let publisher = Arc::new(LogPublisher {
            replica: self.clone(),
            fence: Some((fence_rx.clone(), fence.epoch)),
        });
        let follower = make_follower(writer.with_publisher(publisher));
        let token = stop.child_token();
        let mut run = tokio::spawn(follower.run(token.clone()));
        let mut last_stored = match self.snapshots.latest().await {
            Ok(m) => m.map_or(-1, |m| m.seq),
            Err(_) => -1,
        };
        let mut next_snapshot = Instant::now();
        let mut next_check = Instant::now() + self.opts.snapshot_every;
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let outcome = loop {
            tokio::select! {
                _ = stop.cancelled() => break Ok(()),
                _ = async { fence_rx.wait_for(|f| !held(f)).await.map(|_| ()) } => {
                    warn!(epoch = fence.epoch, "follower lease lost: this replica stops following the exports");
                    break Ok(());
                }
                r = &mut run => {
                    break match r {
                        // Stopping: the follower saw the (child) token first, and `select!` may
                        // poll this branch before the one above.
                        Ok(Ok(())) if stop.is_cancelled() => Ok(()),
                        Ok(Ok(())) => Err(anyhow::anyhow!("the follower stopped while holding the lease")),
                        Ok(Err(e)) => Err(e),
                        Err(e) => Err(anyhow::anyhow!("the follower task failed: {e}")),
                    };
                }
                _ = tick.tick() => {
                    let applied = *self.applied.borrow();
                    let loaded = *writer.loaded().borrow();
                    if loaded && Instant::now() >= next_check {
                        // A replica that found the snapshot damaged deleted it: store a fresh
                        // one now rather than at the next change.
                        next_check = Instant::now() + self.opts.snapshot_every;
                        if let Ok(newest) = self.snapshots.latest().await {
                            let newest = newest.map_or(-1, |m| m.seq);
                            if newest < last_stored {
                                warn!(newest, last_stored, "the shared snapshot this replica stored is gone: storing a fresh one");
                                last_stored = newest;
                            }
                        }
                    }
                    if loaded && Instant::now() >= next_snapshot && applied > last_stored {
                        match self.store_snapshot(fence).await {
                            Ok(seq) => last_stored = seq,
                            Err(e) => warn!(error = format!("{e:#}"), "the shared snapshot was not stored"),
                        }
                        next_snapshot = Instant::now() + self.opts.snapshot_every;
                    }
                }
            }
        };
        token.cancel();
        if !run.is_finished() {
            let _ = tokio::time::timeout(Duration::from_secs(5), &mut run).await;
            run.abort();
        }
        outcome
    }

    /// Stores the index as the shared snapshot and prunes the log behind it; returns its seq.
    async fn store_snapshot(&self, fence: &Fence) -> anyhow::Result<i64> {
        let started = std::time::Instant::now();
        let (reply, seq_done) = oneshot::channel();
        let path = self.opts.snapshot_path.clone();
        self.save_tx
            .send(SaveRequest {
                path: path.clone(),
                reply,
            })
            .await
            .map_err(|_| anyhow::anyhow!("the change-log subscriber has stopped"))?;
        let (seq, done) = seq_done
            .await
            .map_err(|_| anyhow::anyhow!("the change-log subscriber has stopped"))?;
        done.await
            .map_err(|_| anyhow::anyhow!("the index writer has stopped"))??;
        let file =
            tokio::io::BufReader::with_capacity(1 << 20, tokio::fs::File::open(&path).await?);
        let stored = self.snapshots.store(seq, file, Some(fence)).await?;
        let _ = tokio::fs::remove_file(&path).await;
        let pruned = self.log.prune_to_snapshot(PRUNE_MIN_AGE).await?;
        match stored {
            Some(meta) => info!(
                seq,
                bytes = meta.size,
                pruned,
                took_ms = started.elapsed().as_millis() as u64,
                "shared index snapshot stored"
            ),
            None => info!(
                seq,
                "a newer shared snapshot exists: this one was not stored"
            ),
        }
        Ok(seq)
    }
}

async fn decode(id: i64, bytes: Vec<u8>) -> anyhow::Result<Index> {
    let name = format!("shared snapshot {id}");
    Ok(tokio::task::spawn_blocking(move || snapshot::decode(&bytes, &name)).await??)
}

/// Appends to the shared log, then waits for this replica's subscriber to apply it.
struct LogPublisher {
    replica: Arc<Replica>,
    /// The follower's: its lease fence and the epoch it was made for.
    fence: Option<(watch::Receiver<Option<Fence>>, i64)>,
}

impl LogPublisher {
    async fn append(&self, payload: Vec<u8>) -> Result<i64, Published> {
        let log = &self.replica.log;
        let Some((fence_rx, epoch)) = &self.fence else {
            let replica = &self.replica;
            if replica.breaker.load(Ordering::Acquire) {
                // The log failed a moment ago and the probe has not seen PostgreSQL since: do
                // not wait another timeout for each change.
                replica.gauges.local_only.inc();
                return Err(Published::Unavailable);
            }
            let why = match tokio::time::timeout(APPEND_TIMEOUT, log.append(&payload, None)).await {
                Ok(Ok(seq)) => return Ok(seq),
                Ok(Err(e)) => format!("{e:#}"),
                Err(_) => format!("no answer within {} s", APPEND_TIMEOUT.as_secs()),
            };
            // Remembered before the caller applies it here: the append may still commit (any
            // failure, not only a timeout: a connection lost after the COMMIT was sent looks the
            // same as one lost before).
            replica.unconfirmed.lock().remember(&payload);
            replica.gauges.local_only.inc();
            replica.open_breaker(&why);
            return Err(Published::Unavailable);
        };
        // The follower's page must reach the log (or be refused): the next page is read from
        // the cursor this one moves, so waiting is right while PostgreSQL is away.
        loop {
            let fence = fence_rx.borrow().clone();
            let Some(fence) = fence.filter(|f| f.epoch == *epoch) else {
                return Err(Published::Refused);
            };
            match tokio::time::timeout(APPEND_TIMEOUT, log.append(&payload, Some(&fence))).await {
                Ok(Ok(seq)) => return Ok(seq),
                Ok(Err(ClusterError::Fenced { .. } | ClusterError::LeaseLost { .. })) => {
                    warn!(
                        epoch,
                        "an export page was refused: the follower lease moved on"
                    );
                    return Err(Published::Refused);
                }
                Ok(Err(e)) => warn!(error = %e, "appending an export page failed; retrying"),
                Err(_) => warn!("appending an export page timed out; retrying"),
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

impl Publish for LogPublisher {
    fn publish(
        &self,
        payload: Vec<u8>,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Published> + Send + '_>> {
        Box::pin(async move {
            let seq = match self.append(payload).await {
                Ok(seq) => seq,
                Err(outcome) => return outcome,
            };
            let mut applied = self.replica.applied();
            match tokio::time::timeout(APPLY_WAIT, applied.wait_for(|a| *a >= seq)).await {
                Ok(Ok(_)) => Published::Applied,
                _ => Published::Pending,
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        cluster::testing::{migrated, wait_for},
        index::Change,
        pg::testing::{Proxy, TestSchema},
        phone::PhoneParser,
        zendesk::models::User,
    };

    fn customer(id: i64, name: &str, phone: &str) -> User {
        User {
            id,
            name: Some(name.into()),
            phone: Some(phone.into()),
            role: Some("end-user".into()),
            ..Default::default()
        }
    }

    /// One in-process replica: its `Replica`, its plain writer (the subscriber's) and its
    /// publishing writer (what the sync worker holds).
    struct Node {
        replica: Arc<Replica>,
        writer: IndexWriter,
        publishing: IndexWriter,
        gauges: ReplicaGauges,
        stop: CancellationToken,
        _dir: tempfile::TempDir,
    }

    impl Node {
        async fn start(db: &TestSchema, id: &str) -> Node {
            Node::start_on(db.pool_of(4), db.config(), id).await
        }

        /// A replica that reaches PostgreSQL through `proxy` (its pool and its subscription).
        async fn start_via(db: &TestSchema, proxy: &Proxy, id: &str) -> Node {
            let url = secrecy::SecretString::from(db.url_via(proxy.addr));
            let connect = crate::pg::Connect::new(&url, None).unwrap();
            let pool = crate::pg::pool_with(&connect, 4).unwrap();
            Node::start_on(pool, connect, id).await
        }

        async fn start_on(pool: Pool, connect: crate::pg::Connect, id: &str) -> Node {
            let dir = tempfile::tempdir().unwrap();
            let gauges = ReplicaGauges::default();
            let replica = Replica::new(
                pool,
                connect,
                id.into(),
                gauges.clone(),
                ReplicaOptions {
                    lease_ttl: Duration::from_secs(2),
                    snapshot_every: Duration::from_secs(1),
                    snapshot_path: dir.path().join("shared-index.snapshot"),
                },
            );
            let start = replica.start().await.unwrap();
            let writer = IndexWriter::spawn(start.index);
            let publishing = writer.with_publisher(replica.publisher());
            let stop = CancellationToken::new();
            tokio::spawn(
                replica
                    .clone()
                    .run_subscriber(writer.clone(), start.seq, stop.clone()),
            );
            Node {
                replica,
                writer,
                publishing,
                gauges,
                stop,
                _dir: dir,
            }
        }

        fn name_of(&self, id: i64) -> Option<String> {
            self.writer
                .index()
                .read()
                .customer(id)
                .map(|c| c.name.to_owned())
        }
    }

    impl Drop for Node {
        fn drop(&mut self) {
            self.stop.cancel();
        }
    }

    /// A write through either replica is in its own index when `apply` returns (read-your-writes)
    /// and reaches the other; both end in the log's order (the later write wins on both), and the
    /// applied-seq gauges agree.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn writes_reach_every_replica_in_log_order() {
        let Some(db) = migrated().await else {
            return;
        };
        let p = PhoneParser::new("UA").unwrap();
        let (a, b) = (Node::start(&db, "a").await, Node::start(&db, "b").await);
        a.publishing
            .apply(Change::user(&customer(1, "v1", "+380501234567"), &p))
            .await
            .unwrap();
        assert_eq!(a.name_of(1).as_deref(), Some("v1"), "read-your-writes on A");
        b.publishing
            .apply(Change::user(&customer(1, "v2", "+380501234567"), &p))
            .await
            .unwrap();
        assert_eq!(b.name_of(1).as_deref(), Some("v2"), "read-your-writes on B");
        wait_for(
            "A applies B's later write",
            Duration::from_secs(5),
            || async { a.name_of(1).as_deref() == Some("v2") },
        )
        .await;
        let head = a.replica.log.newest_seq().await.unwrap();
        assert_eq!(head, 2);
        wait_for(
            "both gauges at the head",
            Duration::from_secs(5),
            || async { a.gauges.applied_seq.get() == head && b.gauges.applied_seq.get() == head },
        )
        .await;
        // No local shortcut: each write was applied once per replica, from the log.
        assert_eq!(*a.replica.applied().borrow(), head);
    }

    /// PostgreSQL hanging (a proxy that holds every byte, connections left open): the first index
    /// write waits one append timeout, the next ones are applied on this replica at once (the
    /// breaker is open, and counted), answers on this replica are right all along; once PostgreSQL
    /// answers again the probe closes the breaker and writes reach the log and the other replica.
    /// Without the breaker the ten writes take ten timeouts (20 s).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_hanging_postgres_costs_one_append_timeout_not_one_per_write() {
        let Some(db) = migrated().await else {
            return;
        };
        let p = PhoneParser::new("UA").unwrap();
        let proxy = Proxy::start(&db).await;
        let a = Node::start_via(&db, &proxy, "a").await;
        let b = Node::start(&db, "b").await;
        a.publishing
            .apply(Change::user(&customer(1, "before", "+380501234501"), &p))
            .await
            .unwrap();
        wait_for("B gets A's write", Duration::from_secs(5), || async {
            b.name_of(1).as_deref() == Some("before")
        })
        .await;

        proxy.hang();
        let started = Instant::now();
        let writes = 10;
        for i in 2..2 + writes {
            let name = format!("during {i}");
            a.publishing
                .apply(Change::user(
                    &customer(i, &name, &format!("+3805012345{i:02}")),
                    &p,
                ))
                .await
                .unwrap();
            assert_eq!(a.name_of(i), Some(name), "A answers with its own write");
        }
        let took = started.elapsed();
        assert!(
            took < APPEND_TIMEOUT * 2 + Duration::from_secs(1),
            "{writes} writes with PostgreSQL hanging took {took:?}"
        );
        assert_eq!(a.gauges.local_only.get(), writes as u64);
        assert_eq!(a.gauges.breaker_open.get(), 1);

        proxy.restore();
        wait_for(
            "the probe closes the breaker",
            Duration::from_secs(15),
            || async { a.gauges.breaker_open.get() == 0 },
        )
        .await;
        a.publishing
            .apply(Change::user(&customer(30, "after", "+380501234530"), &p))
            .await
            .unwrap();
        assert_eq!(a.name_of(30).as_deref(), Some("after"));
        wait_for(
            "B gets the write made after PostgreSQL came back",
            Duration::from_secs(5),
            || async { b.name_of(30).as_deref() == Some("after") },
        )
        .await;
        assert_eq!(
            a.gauges.local_only.get(),
            writes as u64,
            "appended, not local"
        );
        // A write skipped during the outage stayed on A (the exports bring it to B).
        assert!(b.name_of(5).is_none());
    }

    /// An append that timed out (the change-log lock held by another session past
    /// [`APPEND_TIMEOUT`]) and so was applied on A only, then committed after all (appended again
    /// here with A's origin and payload, as a COMMIT answered late would), after B's newer change
    /// of the same customer: A skips it (it has it already; applied now it would undo B's newer
    /// change on A), B applies it in log order (the documented residual, repaired by the exports).
    /// A's later own changes, and the same payload committed once more, are applied as usual.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_append_that_timed_out_and_committed_late_is_not_applied_twice() {
        let Some(db) = migrated().await else {
            return;
        };
        let p = PhoneParser::new("UA").unwrap();
        let (a, b) = (Node::start(&db, "a").await, Node::start(&db, "b").await);
        let old = || Change::user(&customer(1, "old", "+380501234501"), &p);

        let holder_pool = db.pool_of(1);
        let holder = holder_pool.get().await.unwrap();
        let lock = "hashtext(current_schema() || ':changelog')";
        holder
            .execute(
                &format!("SELECT pg_advisory_lock($1, {lock})"),
                &[&crate::pg::LOCK_NAMESPACE],
            )
            .await
            .unwrap();
        a.publishing.apply(old()).await.unwrap();
        assert_eq!(a.name_of(1).as_deref(), Some("old"), "applied on A only");
        assert_eq!(a.gauges.local_only.get(), 1);
        holder
            .execute(
                &format!("SELECT pg_advisory_unlock($1, {lock})"),
                &[&crate::pg::LOCK_NAMESPACE],
            )
            .await
            .unwrap();
        wait_for(
            "the probe closes the breaker",
            Duration::from_secs(15),
            || async { a.gauges.breaker_open.get() == 0 },
        )
        .await;

        b.publishing
            .apply(Change::user(&customer(1, "new", "+380501234501"), &p))
            .await
            .unwrap();
        wait_for(
            "A applies B's newer change",
            Duration::from_secs(5),
            || async { a.name_of(1).as_deref() == Some("new") },
        )
        .await;
        // The timed-out append commits after all: same origin, same payload.
        let late = ChangeLog::new(db.pool_of(1), "a");
        let payload = writer::encode_changes(&mut [old()]);
        late.append(&payload, None).await.unwrap();
        a.publishing
            .apply(Change::user(&customer(2, "own", "+380501234502"), &p))
            .await
            .unwrap();
        let head = a.replica.log.newest_seq().await.unwrap();
        wait_for(
            "both replicas at the head",
            Duration::from_secs(5),
            || async { a.gauges.applied_seq.get() == head && b.gauges.applied_seq.get() == head },
        )
        .await;
        assert_eq!(a.name_of(2).as_deref(), Some("own"), "A's next own change");
        assert_eq!(
            a.name_of(1).as_deref(),
            Some("new"),
            "the late change was not applied again on A"
        );
        assert_eq!(a.gauges.late_own_skipped.get(), 1);
        assert_eq!(
            b.name_of(1).as_deref(),
            Some("old"),
            "B applies it in log order"
        );
        assert_eq!(b.name_of(2).as_deref(), Some("own"));

        // Skipped once, then forgotten: the same payload appended again is applied.
        late.append(&payload, None).await.unwrap();
        wait_for("A applies the repeat", Duration::from_secs(5), || async {
            a.name_of(1).as_deref() == Some("old")
        })
        .await;
        assert_eq!(a.gauges.late_own_skipped.get(), 1);
    }

    /// The holder stores the shared snapshot with the seq it includes; after the log is pruned
    /// behind it, a replica starting from the log's beginning finds its position pruned, reloads
    /// the snapshot, and follows on with the changes after it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_replica_behind_the_pruned_log_reloads_the_shared_snapshot() {
        let Some(db) = migrated().await else {
            return;
        };
        let p = PhoneParser::new("UA").unwrap();
        let a = Node::start(&db, "a").await;
        for i in 1..=3 {
            let phone = format!("+38050123456{i}");
            a.publishing
                .apply(Change::user(&customer(i, &format!("c{i}"), &phone), &p))
                .await
                .unwrap();
        }
        let lease = Lease::new(db.pool_of(1), FOLLOWER_LEASE, "a", Duration::from_secs(5));
        let fence = lease.try_take().await.unwrap().expect("the lease is free");
        let seq = a.replica.store_snapshot(&fence).await.unwrap();
        assert_eq!(seq, 3);
        a.replica
            .log
            .prune_through(seq, Duration::ZERO)
            .await
            .unwrap();
        a.publishing
            .apply(Change::user(&customer(4, "c4", "+380501234564"), &p))
            .await
            .unwrap();

        // B as an old replica would be: an empty index at seq 0, so its next change is pruned.
        let gauges = ReplicaGauges::default();
        let dir = tempfile::tempdir().unwrap();
        let b = Replica::new(
            db.pool_of(2),
            db.config(),
            "b".into(),
            gauges,
            ReplicaOptions {
                lease_ttl: Duration::from_secs(2),
                snapshot_every: Duration::from_secs(1),
                snapshot_path: dir.path().join("s"),
            },
        );
        let writer = IndexWriter::spawn(Index::new());
        let stop = CancellationToken::new();
        let task = tokio::spawn(b.clone().run_subscriber(writer.clone(), 0, stop.clone()));
        wait_for(
            "B reloads and follows on",
            Duration::from_secs(5),
            || async {
                let ix = writer.index().read();
                (1..=4).all(|i| ix.customer(i).is_some())
            },
        )
        .await;
        assert_eq!(*b.applied().borrow(), 4);
        // A new replica starts from the snapshot directly.
        let start = b.start().await.unwrap();
        assert!(matches!(start.from, StartFrom::Snapshot(_)));
        assert_eq!((start.seq, start.index.counts().customers), (3, 3));
        stop.cancel();
        task.await.unwrap().unwrap();
    }

    /// Runs `sql` on the test's schema.
    async fn exec(db: &TestSchema, sql: &str) {
        db.pool_of(1)
            .get()
            .await
            .unwrap()
            .batch_execute(sql)
            .await
            .unwrap();
    }

    async fn snapshot_ids(db: &TestSchema) -> Vec<i64> {
        db.pool_of(1)
            .get()
            .await
            .unwrap()
            .query(
                "SELECT id FROM cluster_snapshots ORDER BY seq DESC, id DESC",
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect()
    }

    /// Customers 1..=n written through `node`'s publishing writer (one change each).
    async fn write_customers(node: &Node, ids: std::ops::RangeInclusive<i64>, p: &PhoneParser) {
        for i in ids {
            let phone = format!("+3805012300{i:02}");
            node.publishing
                .apply(Change::user(&customer(i, &format!("c{i}"), &phone), p))
                .await
                .unwrap();
        }
    }

    /// Two snapshots kept, the newest damaged in PostgreSQL (one byte changed: CRC mismatch): a
    /// new replica skips it (deleting it, counted), starts from the one before and replays the log
    /// after it, which pruning kept for that; the damaged one is never read again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_damaged_newest_snapshot_falls_back_to_the_one_before() {
        let Some(db) = migrated().await else {
            return;
        };
        let p = PhoneParser::new("UA").unwrap();
        let a = Node::start(&db, "a").await;
        let lease = Lease::new(db.pool_of(1), FOLLOWER_LEASE, "a", Duration::from_secs(30));
        let fence = lease.try_take().await.unwrap().unwrap();
        write_customers(&a, 1..=3, &p).await;
        assert_eq!(a.replica.store_snapshot(&fence).await.unwrap(), 3);
        write_customers(&a, 4..=5, &p).await;
        assert_eq!(a.replica.store_snapshot(&fence).await.unwrap(), 5);
        a.replica
            .log
            .prune_to_snapshot(Duration::ZERO)
            .await
            .unwrap();
        assert_eq!(
            a.replica.log.pruned_through().await.unwrap(),
            3,
            "kept back to the older"
        );
        write_customers(&a, 6..=6, &p).await;
        let ids = snapshot_ids(&db).await;
        assert_eq!(ids.len(), 2, "two snapshots kept");
        exec(
            &db,
            &format!(
                "UPDATE cluster_snapshot_chunks SET data = set_byte(data, 7, (get_byte(data, 7) + 1) % 256)
                 WHERE snapshot_id = {} AND idx = 0",
                ids[0]
            ),
        )
        .await;

        let b = Node::start(&db, "b").await;
        let start = b.replica.start().await.unwrap(); // a second start: the same outcome
        assert_eq!(start.from, StartFrom::Snapshot(ids[1]));
        assert_eq!(start.seq, 3);
        wait_for(
            "B replays the changes after the older snapshot",
            Duration::from_secs(5),
            || async { (1..=6).all(|i| b.name_of(i).as_deref() == Some(&format!("c{i}"))) },
        )
        .await;
        assert_eq!(
            b.gauges.snapshots_unusable.get(),
            1,
            "read once, skipped once"
        );
        assert_eq!(
            snapshot_ids(&db).await,
            vec![ids[1]],
            "the damaged one was deleted"
        );
    }

    /// The only snapshot undecodable (its bytes replaced, header and CRC-32 made to match, so the
    /// check passes and decoding fails) and the log pruned behind it: a new replica starts empty
    /// at the log's head (nothing to replay from), skips that snapshot once, and loads the next one
    /// the follower stores, then follows on; the bad one is never read again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn no_usable_snapshot_and_a_pruned_log_waits_for_the_next_snapshot() {
        let Some(db) = migrated().await else {
            return;
        };
        let p = PhoneParser::new("UA").unwrap();
        let a = Node::start(&db, "a").await;
        let lease = Lease::new(db.pool_of(1), FOLLOWER_LEASE, "a", Duration::from_secs(30));
        let fence = lease.try_take().await.unwrap().unwrap();
        // A loaded index (as after the follower's warm-up), then customers.
        a.publishing.apply(Change::Loaded).await.unwrap();
        write_customers(&a, 1..=3, &p).await;
        assert_eq!(a.replica.store_snapshot(&fence).await.unwrap(), 4);
        a.replica
            .log
            .prune_to_snapshot(Duration::ZERO)
            .await
            .unwrap();
        let bad = snapshot_ids(&db).await[0];
        let garbage = b"not an index snapshot at all".to_vec();
        let crc = crc32fast::hash(&garbage);
        let hex: String = garbage.iter().map(|b| format!("{b:02x}")).collect();
        exec(
            &db,
            &format!(
                "DELETE FROM cluster_snapshot_chunks WHERE snapshot_id = {bad};
                 INSERT INTO cluster_snapshot_chunks (snapshot_id, idx, data)
                     VALUES ({bad}, 0, '\\x{hex}');
                 UPDATE cluster_snapshots SET chunks = 1, size = {}, crc32 = {crc} WHERE id = {bad};",
                garbage.len()
            ),
        )
        .await;

        let b = Node::start(&db, "b").await;
        assert!(b.name_of(1).is_none(), "B starts empty");
        assert!(
            !b.writer.index().read().is_loaded(),
            "and not loaded (NOT_SERVING)"
        );
        assert_eq!(b.gauges.snapshots_unusable.get(), 1);
        write_customers(&a, 4..=4, &p).await;
        wait_for(
            "B applies changes after the head",
            Duration::from_secs(5),
            || async { b.name_of(4).is_some() },
        )
        .await;
        // The follower's next snapshot (its index has every customer).
        assert_eq!(a.replica.store_snapshot(&fence).await.unwrap(), 5);
        wait_for(
            "B loads the new snapshot",
            Duration::from_secs(10),
            || async {
                (1..=4).all(|i| b.name_of(i).is_some()) && b.writer.index().read().is_loaded()
            },
        )
        .await;
        write_customers(&a, 5..=5, &p).await;
        wait_for("and follows on", Duration::from_secs(5), || async {
            b.name_of(5).is_some()
        })
        .await;
        assert_eq!(
            b.gauges.snapshots_unusable.get(),
            1,
            "the bad one was not read again"
        );
        assert!(
            snapshot_ids(&db).await.contains(&bad),
            "undecodable is not deleted"
        );
    }

    /// A follower whose lease moved on cannot append: its page is refused and applied nowhere.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stale_follower_cannot_publish() {
        let Some(db) = migrated().await else {
            return;
        };
        let p = PhoneParser::new("UA").unwrap();
        let a = Node::start(&db, "a").await;
        let ttl = Duration::from_millis(600);
        let old = Lease::new(db.pool_of(1), FOLLOWER_LEASE, "a", ttl);
        let fence = old.try_take().await.unwrap().unwrap();
        let (fence_tx, fence_rx) = watch::channel(Some(fence.clone()));
        let stale = a.writer.with_publisher(Arc::new(LogPublisher {
            replica: a.replica.clone(),
            fence: Some((fence_rx, fence.epoch)),
        }));
        stale
            .apply(Change::user(&customer(1, "held", "+380501234567"), &p))
            .await
            .unwrap();
        assert_eq!(a.name_of(1).as_deref(), Some("held"));
        // The lease expires and B takes it; A's fence channel has not noticed yet.
        tokio::time::sleep(ttl + Duration::from_millis(100)).await;
        let new = Lease::new(db.pool_of(1), FOLLOWER_LEASE, "b", ttl);
        assert!(new.try_take().await.unwrap().is_some());
        stale
            .apply(Change::user(&customer(2, "stale", "+380501234568"), &p))
            .await
            .unwrap();
        assert_eq!(a.replica.log.newest_seq().await.unwrap(), 1, "refused");
        assert!(a.name_of(2).is_none(), "not applied locally either");
        drop(fence_tx);
    }

    fn percentile(sorted: &[Duration], p: f64) -> Duration {
        sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
    }

    /// Figure for the README: a write through replica A's publishing writer (what the sync worker
    /// does after a Zendesk write) until replica B's index has it, over real PostgreSQL. Run:
    /// `DESKLINE_TEST_POSTGRES_URL=… cargo test --lib -- --ignored change_propagation --nocapture`
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "a measurement, not a check"]
    async fn change_propagation_latency() {
        let Some(db) = migrated().await else {
            return;
        };
        let p = PhoneParser::new("UA").unwrap();
        let (a, b) = (Node::start(&db, "a").await, Node::start(&db, "b").await);
        let mut samples = Vec::new();
        for i in 0..500i64 {
            let user = customer(i + 1, "x", &format!("+38050{:07}", i));
            let change = Change::user(&user, &p);
            let started = std::time::Instant::now();
            a.publishing.apply(change).await.unwrap();
            while b.writer.index().read().customer(i + 1).is_none() {
                tokio::task::yield_now().await;
            }
            samples.push(started.elapsed());
        }
        samples.sort();
        eprintln!(
            "change propagation A write → B index, {} writes: p50 {:?}, p90 {:?}, p99 {:?}, max {:?}",
            samples.len(),
            percentile(&samples, 0.5),
            percentile(&samples, 0.9),
            percentile(&samples, 0.99),
            samples[samples.len() - 1]
        );
    }

    /// Figure for the README: a new replica's start from the shared snapshot (read from
    /// PostgreSQL, checked, decoded) at `DESKLINE_BENCH_CUSTOMERS` customers (1M by default). Run:
    /// `DESKLINE_TEST_POSTGRES_URL=… cargo test --lib -- --ignored shared_snapshot_start --nocapture`
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "a measurement, not a check"]
    async fn shared_snapshot_start_at_scale() {
        let Some(db) = migrated().await else {
            return;
        };
        let n: i64 = std::env::var("DESKLINE_BENCH_CUSTOMERS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(1_000_000);
        let p = PhoneParser::new("UA").unwrap();
        let a = Node::start(&db, "a").await;
        let built = std::time::Instant::now();
        for start in (0..n).step_by(1000) {
            let users: Vec<User> = (start..(start + 1000).min(n))
                .map(|i| customer(i + 1, &format!("Customer {i}"), &format!("+38050{:07}", i)))
                .collect();
            let batch = crate::index::UserBatch::prepare(&users, None, &p);
            a.writer
                .apply_replicated(vec![Change::Users(batch)])
                .await
                .unwrap();
        }
        a.writer
            .apply_replicated(vec![Change::Loaded])
            .await
            .unwrap();
        eprintln!("built {n} customers in {:?}", built.elapsed());
        let lease = Lease::new(db.pool_of(1), FOLLOWER_LEASE, "a", Duration::from_secs(600));
        let fence = lease.try_take().await.unwrap().unwrap();
        let stored = std::time::Instant::now();
        a.replica.store_snapshot(&fence).await.unwrap();
        eprintln!("stored the shared snapshot in {:?}", stored.elapsed());
        let b = Node::start(&db, "b").await; // warms the pool and the page cache like a restart
        drop(b);
        let mut runs = Vec::new();
        for _ in 0..3 {
            let fresh = Replica::new(
                db.pool_of(2),
                db.config(),
                "c".into(),
                ReplicaGauges::default(),
                ReplicaOptions {
                    lease_ttl: Duration::from_secs(2),
                    snapshot_every: Duration::from_secs(60),
                    snapshot_path: std::env::temp_dir().join("unused"),
                },
            );
            let t = std::time::Instant::now();
            let start = fresh.start().await.unwrap();
            let took = t.elapsed();
            assert_eq!(start.index.counts().customers as i64, n);
            assert!(start.index.is_loaded());
            runs.push(took);
        }
        // Where the time goes: reading the chunks out of PostgreSQL (with the CRC) vs decoding.
        let t = std::time::Instant::now();
        let (meta, bytes) = a
            .replica
            .snapshots
            .load_latest_bytes()
            .await
            .unwrap()
            .unwrap();
        let read = t.elapsed();
        let t = std::time::Instant::now();
        let ix = decode(meta.id, bytes).await.unwrap();
        eprintln!(
            "of which: read from PostgreSQL {read:?}, decode {:?} ({} customers)",
            t.elapsed(),
            ix.counts().customers
        );
        eprintln!(
            "start from the shared snapshot, {n} customers, {} bytes: {runs:?}",
            meta.size
        );
    }
}
