//! The index's one writer: a dedicated OS thread that applies every [`Change`], fed by a bounded
//! channel. See the [module doc](super) for why and what readers see.
//!
//! Writers on tokio (the follower, the sync worker's jobs) only send and await the writer's
//! acknowledgement, so none of them ever holds or waits for the index lock on a tokio worker thread.
//! The writer takes the write lock for one message at a time, and a large message (an export page)
//! is applied in pieces of [`PIECE`] records with the lock handed fairly to waiting readers between
//! them, so a lookup waits at most for one piece.

use std::{
    path::PathBuf,
    sync::{Arc, mpsc as std_mpsc},
    time::Instant,
};

use tokio::sync::{mpsc, oneshot, watch};

use super::{Export, Index, SharedIndex, UserBatch, snapshot};
use crate::{
    phone::PhoneParser,
    zendesk::models::{Organization, Ticket, User},
};

/// Records applied under one hold of the write lock (about 100 µs of work at most).
const PIECE: usize = 128;
/// Messages the channel holds before senders wait (backpressure on a warm-up, never a lock).
const QUEUE: usize = 64;
/// Changes applied as one message by [`IndexWriter::batched`].
const BATCH: usize = 512;
/// Changes waiting in [`IndexWriter::batched`]'s channel before it refuses more.
pub(crate) const BATCHED_QUEUE: usize = 8192;

/// One change to the index. Every source of changes (the exports, the sync worker's writes, and
/// next webhooks and other replicas' change logs) speaks this, so they all go through one writer.
/// Serialisable: with PostgreSQL, changes travel between replicas through the shared change log
/// ([`Publish`]) as postcard-encoded `Vec<Change>`.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub enum Change {
    /// Users (an export page, a write's answer, a `show_many` answer), phones parsed by the sender
    /// ([`UserBatch::prepare`]), with or without their phone identities.
    Users(UserBatch),
    /// Tickets in Zendesk's current view: open ones are kept, any other status removes the ticket.
    Tickets(Vec<Ticket>),
    /// A ticket known to be closed or deleted.
    TicketGone(i64),
    /// Organizations inserted, updated, or removed when `deleted_at` is set.
    Organizations(Vec<Organization>),
    /// An export read up to here (stored with the index and saved in its snapshot).
    Cursor(CursorMove),
    /// `export` was read to its end at Unix milliseconds.
    Fresh(Export, i64),
    /// A full warm-up completed.
    Loaded,
    /// A bootstrap loaded what routing needs: answer, marked WARMING (DESIGN §10).
    Warming,
    /// Users whose phone identities are still to be fetched (the users export came without
    /// them); kept in the index and its snapshot until [`Change::IdentitiesFetched`].
    IdentitiesPending(Vec<i64>),
    /// Those users' identities were applied (or they need none any more).
    IdentitiesFetched(Vec<i64>),
    /// A call reported to Deskline (`ReportCall`) that an employee took: the last call of the
    /// customers on `phone` (DESIGN §3 rule 7, `LAST_CALL`). The employee's full name is matched
    /// to an active agent here, by [`super::name_key`]; a name that matches none records nothing.
    CallTaken {
        /// The caller's number: every customer with it gets the call.
        phone: crate::phone::E164,
        /// The employee's full name as the PBX reported it.
        employee_name: String,
        /// Unix seconds.
        started_at: i64,
    },
    /// A step of a first start's bootstrap (DESIGN §10), recorded so that, with replicas, the
    /// next follower continues it rather than starting one that could miss changes.
    Bootstrap(BootstrapStep),
}

/// See [`Change::Bootstrap`] and `follow::bootstrap`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum BootstrapStep {
    /// A bootstrap began; the incremental exports will start at `incremental_start` (Unix
    /// seconds). A later attempt keeps the earliest.
    Started {
        /// Unix seconds.
        incremental_start: i64,
    },
    /// A search export request was sent at these Unix milliseconds.
    Searched(i64),
    /// Phases 1 and 2 are done (every end-user's primary phone is in).
    SearchesDone,
    /// The bootstrap gave up (the full warm-up runs instead): its start no longer applies.
    Abandoned,
}

/// Where an export stands after a page.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum CursorMove {
    /// The users export's new `after_cursor`.
    Users(String),
    /// The tickets export's new `after_cursor`.
    Tickets(String),
    /// The organizations export's next `start_time`.
    Organizations(i64),
}

impl Change {
    /// One user as a write (or a search) returned it.
    pub fn user(user: &User, parser: &PhoneParser) -> Self {
        Self::Users(UserBatch::prepare(std::slice::from_ref(user), None, parser))
    }

    /// One ticket as a write (or a webhook fetch) returned it.
    pub fn ticket(ticket: &Ticket) -> Self {
        Self::Tickets(vec![ticket.clone()])
    }

    /// One organization as a write (or a webhook fetch) returned it.
    pub fn organization(org: &Organization) -> Self {
        Self::Organizations(vec![org.clone()])
    }
}

/// The writer thread has stopped (it only does when it panicked): nothing can be applied.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("the index writer has stopped")]
pub struct WriterStopped;

/// What became of a batch handed to a [`Publish`]er.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Published {
    /// Committed to the shared log and applied here, in log order, by this replica's subscriber:
    /// a read that starts now sees it.
    Applied,
    /// Committed to the shared log; this replica's subscriber has not applied it yet (it lags). It
    /// will, in order; applying it now out of order could put an older record over a newer one.
    Pending,
    /// Refused: the publisher's lease fence is stale (another replica follows now). Nothing applied.
    Refused,
    /// The shared log is unreachable: apply it here only, so this replica's answers stay right
    /// (the exports bring the change to the other replicas later).
    Unavailable,
}

/// Where changes go before the index when replicas share one (DESIGN §8): the shared change log,
/// whose subscriber applies them back through [`IndexWriter::apply_replicated`]. `payload` is a
/// postcard-encoded `Vec<Change>`.
pub trait Publish: Send + Sync + 'static {
    /// Appends `payload` to the log and says what became of it (see [`Published`]).
    fn publish(
        &self,
        payload: Vec<u8>,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Published> + Send + '_>>;
}

/// Encodes changes as the change log stores them. Fields the index never reads and that postcard
/// could not decode (free-form JSON: ticket custom fields, organization fields) are dropped first.
pub(crate) fn encode_changes(changes: &mut [Change]) -> Vec<u8> {
    for c in changes.iter_mut() {
        match c {
            Change::Tickets(tickets) => {
                for t in tickets {
                    t.custom_fields = None;
                    t.tags = None;
                }
            }
            Change::Organizations(orgs) => {
                for o in orgs {
                    o.organization_fields = None;
                }
            }
            _ => {}
        }
    }
    postcard::to_stdvec(changes).expect("index changes always encode")
}

/// Decodes a change-log payload written by [`encode_changes`].
pub(crate) fn decode_changes(payload: &[u8]) -> Result<Vec<Change>, postcard::Error> {
    postcard::from_bytes(payload)
}

enum Msg {
    Apply(Vec<Change>, oneshot::Sender<()>),
    /// Replaces the whole index (a replica reloading the shared snapshot).
    Replace(Box<Index>, oneshot::Sender<()>),
    Save(
        PathBuf,
        oneshot::Sender<Result<(), snapshot::SnapshotError>>,
    ),
}

/// The handle writers hold: cheap to clone; the thread ends when the last handle is dropped.
#[derive(Clone)]
pub struct IndexWriter {
    tx: mpsc::Sender<Msg>,
    index: SharedIndex,
    /// True once the index is complete (loaded from a snapshot or warmed up), as the writer saw it
    /// after its last change: waiters are woken instead of polling the index.
    loaded: watch::Receiver<bool>,
    /// True once answers may be given (loaded, or WARMING after a bootstrap's first phase), as
    /// the writer saw it after its last change.
    serving: watch::Receiver<bool>,
    /// With replicas: changes go through the shared log instead of straight to the thread.
    publisher: Option<Arc<dyn Publish>>,
}

impl std::fmt::Debug for IndexWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IndexWriter").finish_non_exhaustive()
    }
}

impl IndexWriter {
    /// Starts the writer thread over `index`; readers use the returned handle's [`index`](Self::index).
    pub fn spawn(index: Index) -> Self {
        let index: SharedIndex = Arc::new(parking_lot::RwLock::new(index));
        let (tx, rx) = mpsc::channel(QUEUE);
        let (loaded_tx, loaded) = watch::channel(index.read().is_loaded());
        let (serving_tx, serving) = watch::channel(index.read().is_serving());
        let shared = index.clone();
        std::thread::Builder::new()
            .name("index-writer".into())
            .spawn(move || run(shared, rx, loaded_tx, serving_tx))
            .expect("spawn the index writer thread");
        Self {
            tx,
            index,
            loaded,
            serving,
            publisher: None,
        }
    }

    /// A handle whose [`apply`](Self::apply) / [`apply_all`](Self::apply_all) publish through
    /// `publisher` (the shared change log) and return once this replica applied the change from
    /// the log; only [`Published::Unavailable`] falls back to applying here directly.
    pub fn with_publisher(&self, publisher: Arc<dyn Publish>) -> Self {
        Self {
            publisher: Some(publisher),
            ..self.clone()
        }
    }

    /// Applies changes read from the shared log (the subscriber's path: never published again).
    pub async fn apply_replicated(&self, changes: Vec<Change>) -> Result<(), WriterStopped> {
        self.send_apply(changes).await
    }

    /// Replaces the whole index with `index` (a reload of the shared snapshot), between two changes.
    pub async fn replace(&self, index: Index) -> Result<(), WriterStopped> {
        let (ack, done) = oneshot::channel();
        self.tx
            .send(Msg::Replace(Box::new(index), ack))
            .await
            .map_err(|_| WriterStopped)?;
        done.await.map_err(|_| WriterStopped)
    }

    /// Queues a save to `path` and returns at once with its outcome to await: the view saved is
    /// the index after every change sent before this call and none sent after (the channel keeps
    /// order), so the caller knows exactly which changes the file holds.
    pub async fn save_queued(
        &self,
        path: PathBuf,
    ) -> Result<oneshot::Receiver<Result<(), snapshot::SnapshotError>>, WriterStopped> {
        let (reply, done) = oneshot::channel();
        self.tx
            .send(Msg::Save(path, reply))
            .await
            .map_err(|_| WriterStopped)?;
        Ok(done)
    }

    /// Turns true when the index is complete; `wait_for(|l| *l)` instead of polling `is_loaded`.
    pub(crate) fn loaded(&self) -> watch::Receiver<bool> {
        self.loaded.clone()
    }

    /// Turns true when answers may be given: the index is complete, or WARMING after a
    /// bootstrap's first phase (with replicas, whichever replica bootstrapped).
    pub(crate) fn serving(&self) -> watch::Receiver<bool> {
        self.serving.clone()
    }

    /// The index, for reading (lookups take [`super::read_for_lookup`]).
    pub fn index(&self) -> &SharedIndex {
        &self.index
    }

    /// Applies `change` and returns once it is in the index: a read that starts after this
    /// returns sees it (the sync worker's read-your-writes, DESIGN §4 step 6).
    pub async fn apply(&self, change: Change) -> Result<(), WriterStopped> {
        self.apply_all(vec![change]).await
    }

    /// Applies `changes` in order, as one message: a snapshot holds all of them or none (so a
    /// page and the cursor after it are saved together).
    ///
    /// With a publisher, the changes go to the shared log first (see [`Published`]).
    pub async fn apply_all(&self, mut changes: Vec<Change>) -> Result<(), WriterStopped> {
        if let Some(p) = &self.publisher {
            match p.publish(encode_changes(&mut changes)).await {
                Published::Applied | Published::Pending | Published::Refused => return Ok(()),
                Published::Unavailable => {}
            }
        }
        self.send_apply(changes).await
    }

    async fn send_apply(&self, changes: Vec<Change>) -> Result<(), WriterStopped> {
        let (ack, done) = oneshot::channel();
        self.tx
            .send(Msg::Apply(changes, ack))
            .await
            .map_err(|_| WriterStopped)?;
        done.await.map_err(|_| WriterStopped)
    }

    /// A sender whose changes are applied through this handle in batches, in the order sent: a
    /// background task takes every change waiting (up to [`BATCH`]) and applies them as one
    /// message, so with a publisher a burst costs one append to the shared log, not one each.
    /// For changes nobody waits on (`ReportCall`'s last-call record); a full channel
    /// ([`BATCHED_QUEUE`]) refuses the change (`try_send`), the caller's fallback decides. The task
    /// ends when every sender is dropped.
    pub(crate) fn batched(&self) -> mpsc::Sender<Change> {
        let (tx, mut rx) = mpsc::channel::<Change>(BATCHED_QUEUE);
        let writer = self.clone();
        tokio::spawn(async move {
            let mut batch = Vec::new();
            while rx.recv_many(&mut batch, BATCH).await > 0 {
                if writer.apply_all(std::mem::take(&mut batch)).await.is_err() {
                    return;
                }
            }
        });
        tx
    }

    /// Saves a snapshot to `path` (atomically, see [`snapshot::save`]): the writer takes a frozen
    /// view between two changes (an `Arc` clone per chunk of records, see [`super::store`]) and a
    /// separate thread encodes and writes it while the writer goes on. Saves run one at a time.
    pub async fn save(&self, path: PathBuf) -> Result<(), snapshot::SnapshotError> {
        let (reply, done) = oneshot::channel();
        let stopped = || snapshot::SnapshotError::Io(std::io::Error::other(WriterStopped));
        self.tx
            .send(Msg::Save(path, reply))
            .await
            .map_err(|_| stopped())?;
        done.await.map_err(|_| stopped())?
    }
}

type SaveJob = (
    snapshot::Frozen,
    PathBuf,
    oneshot::Sender<Result<(), snapshot::SnapshotError>>,
);

fn run(
    index: SharedIndex,
    mut rx: mpsc::Receiver<Msg>,
    loaded: watch::Sender<bool>,
    serving: watch::Sender<bool>,
) {
    let publish = |is_loaded: bool, is_serving: bool| {
        loaded.send_if_modified(|l| std::mem::replace(l, is_loaded) != is_loaded);
        serving.send_if_modified(|s| std::mem::replace(s, is_serving) != is_serving);
    };
    let mut saver: Option<std_mpsc::Sender<SaveJob>> = None;
    while let Some(msg) = rx.blocking_recv() {
        match msg {
            Msg::Apply(changes, ack) => {
                let mut guard = index.write();
                for change in changes {
                    apply(&mut guard, change);
                }
                let (is_loaded, is_serving) = (guard.is_loaded(), guard.is_serving());
                drop(guard);
                publish(is_loaded, is_serving);
                // The sender may have given up waiting (cancelled job): the change stands anyway.
                let _ = ack.send(());
            }
            Msg::Replace(new, ack) => {
                let (is_loaded, is_serving) = (new.is_loaded(), new.is_serving());
                *index.write() = *new;
                publish(is_loaded, is_serving);
                let _ = ack.send(());
            }
            Msg::Save(path, reply) => {
                let started = Instant::now();
                let frozen = snapshot::Frozen::of(&index.read());
                tracing::debug!(took = ?started.elapsed(), "snapshot view taken");
                let tx = saver.get_or_insert_with(spawn_saver);
                if let Err(std_mpsc::SendError((_, _, reply))) = tx.send((frozen, path, reply)) {
                    let _ = reply.send(Err(snapshot::SnapshotError::Io(std::io::Error::other(
                        "the snapshot thread has stopped",
                    ))));
                    saver = None;
                }
            }
        }
    }
}

fn spawn_saver() -> std_mpsc::Sender<SaveJob> {
    let (tx, rx) = std_mpsc::channel::<SaveJob>();
    std::thread::Builder::new()
        .name("index-snapshot".into())
        .spawn(move || {
            lower_priority();
            for (frozen, path, reply) in rx {
                let _ = reply.send(snapshot::save_frozen(&frozen, &path));
            }
        })
        .expect("spawn the snapshot thread");
    tx
}

/// Gives the calling thread (the snapshot encoder) the lowest CPU priority: a save is a few hundred
/// milliseconds of CPU a few times an hour and can wait, while the writer thread and the tokio
/// workers answering RPCs cannot. On two shared cores an encoder at the same priority preempted the
/// writer while it held the index lock for a few microseconds, and every lookup then waited a
/// scheduler slice (milliseconds) for it. On Linux the nice value is per thread, so this touches no
/// other thread; elsewhere, or if refused, the save simply runs at normal priority.
fn lower_priority() {
    #[cfg(target_os = "linux")]
    if let Err(e) = rustix::process::setpriority_process(Some(rustix::thread::gettid()), 19) {
        tracing::debug!(error = %e, "the snapshot thread keeps its priority");
    }
}

/// Applies one change, handing the lock to waiting readers every [`PIECE`] records.
fn apply(guard: &mut parking_lot::RwLockWriteGuard<'_, Index>, change: Change) {
    match change {
        Change::Users(batch) => {
            for piece in batch.into_pieces(PIECE) {
                guard.apply_user_batch(piece);
                parking_lot::RwLockWriteGuard::bump(guard);
            }
        }
        Change::Tickets(tickets) => {
            for piece in tickets.chunks(PIECE) {
                for t in piece {
                    guard.apply_ticket(t);
                }
                parking_lot::RwLockWriteGuard::bump(guard);
            }
        }
        Change::TicketGone(id) => guard.remove_ticket(id),
        Change::Organizations(orgs) => {
            for piece in orgs.chunks(PIECE) {
                for o in piece {
                    guard.apply_organization(o);
                }
                parking_lot::RwLockWriteGuard::bump(guard);
            }
        }
        Change::Cursor(m) => {
            let c = guard.cursors_mut();
            match m {
                CursorMove::Users(s) => c.users = Some(s),
                CursorMove::Tickets(s) => c.tickets = Some(s),
                CursorMove::Organizations(t) => c.organizations = Some(t),
            }
        }
        Change::Fresh(export, at_ms) => guard.mark_fresh(export, at_ms),
        Change::Loaded => guard.set_loaded(),
        Change::Warming => guard.set_warming(),
        Change::Bootstrap(step) => guard.apply_bootstrap(step),
        Change::IdentitiesPending(ids) => guard.add_pending_identities(ids),
        Change::IdentitiesFetched(ids) => guard.remove_pending_identities(&ids),
        Change::CallTaken {
            phone,
            employee_name,
            started_at,
        } => {
            if let Some(agent) = guard.agent_by_name(&employee_name) {
                guard.apply_call(phone, agent, started_at);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn customer(id: i64, phone: &str) -> User {
        User {
            id,
            name: Some(format!("Customer {id}")),
            phone: Some(phone.into()),
            role: Some("end-user".into()),
            ..Default::default()
        }
    }

    /// What the change log carries decodes to the same index: users (prepared, with identities),
    /// tickets and organizations with free-form JSON fields, cursors and markers.
    #[tokio::test]
    async fn changes_round_trip_through_the_log_encoding() {
        let p = PhoneParser::new("UA").unwrap();
        let ticket = Ticket {
            id: 7,
            requester_id: Some(1),
            assignee_id: Some(2),
            status: Some("open".into()),
            subject: Some("Call".into()),
            custom_fields: Some(vec![crate::zendesk::models::CustomField {
                id: 5,
                value: serde_json::json!({"any": ["json"]}),
            }]),
            tags: Some(vec!["t".into()]),
            ..Default::default()
        };
        let org = Organization {
            id: 9,
            name: Some("Acme".into()),
            organization_fields: Some(serde_json::from_str(r#"{"k": 1}"#).unwrap()),
            ..Default::default()
        };
        let mut changes = vec![
            Change::user(&customer(1, "044 123 45 67"), &p),
            Change::ticket(&ticket),
            Change::organization(&org),
            Change::Cursor(CursorMove::Users("c9".into())),
            Change::Fresh(Export::Users, 42),
            Change::Loaded,
            Change::Bootstrap(BootstrapStep::Started {
                incremental_start: 7,
            }),
        ];
        let bytes = encode_changes(&mut changes);
        let back = decode_changes(&bytes).unwrap();
        assert_eq!(back.len(), 7);
        assert!(matches!(
            back[6],
            Change::Bootstrap(BootstrapStep::Started {
                incremental_start: 7
            })
        ));
        let w = IndexWriter::spawn(Index::new());
        w.apply_replicated(back).await.unwrap();
        let ix = w.index().read();
        let e = p.parse("+380441234567").unwrap();
        assert_eq!(ix.customer_ids_by_phone(e), vec![1]);
        assert_eq!(ix.open_ticket(7).map(|t| t.assignee_id), Some(Some(2)));
        assert_eq!(ix.organization_name(9), Some("Acme"));
        assert_eq!(ix.cursors().users.as_deref(), Some("c9"));
        assert!(ix.is_loaded());
    }

    /// Read-your-writes: once `apply` returned, a read sees the change; a page larger than a piece
    /// lands whole; a save is the index at the moment it was asked for.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn applied_changes_are_visible_and_saved() {
        let p = PhoneParser::new("UA").unwrap();
        let w = IndexWriter::spawn(Index::new());
        w.apply(Change::user(&customer(1, "044 123 45 67"), &p))
            .await
            .unwrap();
        let e = p.parse("+380441234567").unwrap();
        assert_eq!(w.index().read().customer_ids_by_phone(e), vec![1]);

        let page: Vec<User> = (0..1000)
            .map(|i| customer(100 + i, &format!("+38050{:07}", i)))
            .collect();
        w.apply_all(vec![
            Change::Users(UserBatch::prepare(&page, None, &p)),
            Change::Cursor(CursorMove::Users("c1".into())),
        ])
        .await
        .unwrap();
        assert_eq!(w.index().read().counts().customers, 1001);
        assert_eq!(w.index().read().cursors().users.as_deref(), Some("c1"));

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("index.snapshot");
        let save = w.save(path.clone());
        let gone = User {
            active: Some(false),
            ..customer(1, "")
        };
        let (saved, applied) = tokio::join!(save, w.apply(Change::user(&gone, &p)));
        saved.unwrap();
        applied.unwrap();
        assert!(w.index().read().customer(1).is_none());
        let back = snapshot::load(&path).unwrap().unwrap();
        assert_eq!(back.counts().customers, 1001, "saved before the delete");
    }

    /// A publisher that takes 50 ms per append and applies nothing itself (as if the log were
    /// unreachable, so the writer applies each batch here), counting its appends.
    struct SlowLog(std::sync::atomic::AtomicUsize);

    impl Publish for SlowLog {
        fn publish(
            &self,
            _payload: Vec<u8>,
        ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Published> + Send + '_>> {
            Box::pin(async move {
                self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                Published::Unavailable
            })
        }
    }

    /// A burst sent to a batched writer costs a few appends, not one a change, and every change
    /// is applied.
    #[tokio::test]
    async fn a_batched_burst_is_published_in_a_few_appends() {
        let log = Arc::new(SlowLog(Default::default()));
        let w = IndexWriter::spawn(Index::new());
        let batched = w.with_publisher(log.clone()).batched();
        for id in 1..=200 {
            batched
                .try_send(Change::IdentitiesPending(vec![id]))
                .unwrap();
        }
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        while w.index().read().pending_identities_len() < 200 {
            assert!(tokio::time::Instant::now() < deadline, "not all applied");
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        let appends = log.0.load(std::sync::atomic::Ordering::SeqCst);
        assert!(appends <= 3, "{appends} appends for 200 changes");
    }
}
