//! The in-memory read model: customers by phone number, their open tickets, agents and
//! organizations, kept just complete enough to answer DESIGN §3 without asking Zendesk.
//!
//! # What is in it (invariants)
//! - **Customers**: end-users (role `end-user` or unset) that are not deleted (`active: false` or
//!   `permanently_deleted` removes them and their phone identities). Suspended end-users keep their
//!   record but are not in the phone index, so they are never found by number.
//! - **Phone index**: `(E.164, customer)` pairs for the user's `phone` and every `phone_number`
//!   identity, each pair at most once, all normalised with the same [`PhoneParser`] the queries use.
//!   Unparsable stored numbers are skipped. A number shared by several customers simply has several
//!   pairs. Identities are kept per user id even before the user itself arrives, because the users
//!   export and the identities fetch come in either order.
//! - **Agents**: every agent/admin ever seen, with their active/suspended flags, so an answer can
//!   say *why* an assignee was passed over. Their [`name_key`] is precomputed for the directory.
//! - **Open tickets**: only `new|open|pending|hold` tickets that have a requester; any other status
//!   (`solved`, `closed`, `deleted`) removes the ticket. A changed requester moves the ticket.
//! - **Organizations**: id → name; `deleted_at` removes one.
//! - Every `apply_*` is last-writer-wins: the exports and the sync worker both hand in Zendesk's
//!   current view of a record, so the latest applied one is the truth.
//!
//! # Why it is built this way
//! The targets (issue 2) are a sub-microsecond route decision and at most 300 bytes of RSS per
//! customer with one open ticket at a million customers, plus ≥ 100k applied records/s at warm-up.
//! A concurrent cache such as `moka` is the wrong tool for a *complete* index: it costs well over a
//! hundred bytes per entry in bookkeeping (eviction deques, timestamps, `Arc`s) and an eviction
//! would silently turn a known customer into "no customer". It is used where a bounded cache fits:
//! the parse cache in [`crate::routing::Resolver`]. Here records live in dense slabs addressed by
//! `u32` slots and the hash tables hold only slots (see [`store`]); strings are `Box<str>`, times
//! are Unix seconds, "none" ids are 0.
//!
//! # One writer, readers that never wait for long
//! Every change goes through one writer ([`writer`]): a dedicated OS thread fed by a bounded
//! channel of [`Change`]s (users with their identities, tickets, organizations, cursors,
//! freshness, identities still to fetch). The follower and the sync worker send and await its
//! acknowledgement; none of them takes the lock, so no tokio worker thread ever parks on it
//! (before, a sync job's write waiting behind a 0.2–1 s snapshot save parked its worker, and with
//! two of them parked no RPC was served). The index sits behind a `RwLock` ([`SharedIndex`]) that
//! only that thread takes for writing, a message at a time and at most [`writer`]'s 128 records
//! per hold, handing it fairly to waiting readers in between; readers take it for one lookup
//! ([`read_for_lookup`]). A lookup therefore waits at most one short apply, never a save, and a
//! write waits for no reader for longer than a lookup.
//!
//! Why not two copies (left-right) or a persistent map: either doubles the bytes per customer
//! or more (the budget is 300 B; the index alone is ~234 B), and the lock held only by one
//! thread for tens of microseconds costs lookups nothing measurable (see the README's latency
//! under writes).
//!
//! Snapshots: the record slabs are lists of 1024-record chunks behind `Arc`s, copy-on-write
//! ([`store::Store`]). A save asks the writer, which takes a frozen view between two changes (an
//! `Arc` clone per chunk: about 1k per million records) and hands it to a snapshot thread; the
//! writer goes on, copying a chunk the first time it changes one the snapshot still holds. The
//! file is the index at one point between two changes.
//!
//! # Consistency
//! - Read-your-writes: [`IndexWriter::apply`] returns once the change is in the index, so the
//!   sync worker's next step and the next `RouteCall` see it (DESIGN §4 step 6).
//! - A message is applied whole before the next one (an export page, its cursor and freshness
//!   travel together, so a snapshot has a page with its cursor or neither); readers may see part
//!   of a large message, which is harmless because every apply is last-writer-wins per record.
//!
//! Measured on the dev machine (`cargo bench --bench index_memory`, release, 1M customers each with
//! one open ticket): 234 bytes of RSS per customer, `apply_user` ≈ 400k records/s (the phone parse
//! dominates; the follower does it outside the lock, see [`UserBatch`]), `apply_ticket` ≈ 1.7M
//! records/s, snapshot save 0.20 s, load 0.40 s, 74 MiB.
//!
//! # Staleness
//! The index is as fresh as the last export page read plus the sync worker's own writes, which are
//! applied at once. [`Index::age_ms`] reports the age of the *oldest* of the three exports, so a
//! stuck organizations export is visible too.

pub mod snapshot;
mod store;
pub(crate) mod writer;

use std::sync::Arc;

use hashbrown::HashTable;
use rustc_hash::FxHashMap;
use unicode_normalization::UnicodeNormalization;

use crate::{
    phone::{E164, PhoneParser},
    zendesk::models::{Identity, Organization, Ticket, User, parse_time},
};
use store::{Keyed, Store, fx};
pub use writer::{
    BootstrapStep, Change, CursorMove, IndexWriter, Publish, Published, WriterStopped,
};

/// The index as shared by the server (readers) and the follower / sync worker (writers).
/// Readers hold the lock for a lookup only, never across an `.await`; the answering path takes it
/// through [`read_for_lookup`].
pub type SharedIndex = Arc<parking_lot::RwLock<Index>>;

/// The read lock for one lookup of the answering path. parking_lot's lock is fair: once a writer
/// waits, new readers queue behind it. A snapshot save holds the read lock for the whole encoding
/// (0.2 s at 1M customers), so a sync-worker write arriving meanwhile would park every `RouteCall`
/// behind itself until the save ended. A recursive read gets in while other readers hold the lock,
/// so lookups continue through a save; a waiting writer still gets the lock as soon as the readers
/// drain, which at a microsecond a lookup happens at once.
pub(crate) fn read_for_lookup(index: &SharedIndex) -> parking_lot::RwLockReadGuard<'_, Index> {
    index.read_recursive()
}

/// Where each export stands; persisted with the index so a restart resumes without a full re-export.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct Cursors {
    /// `after_cursor` of the last users-export page read.
    pub users: Option<String>,
    /// `after_cursor` of the last tickets-export page read.
    pub tickets: Option<String>,
    /// `end_time` of the last organizations-export page read (the next `start_time`).
    pub organizations: Option<i64>,
}

/// One of the three incremental exports the index follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum Export {
    /// `incremental/users/cursor` (with identities when honoured).
    Users,
    /// `incremental/tickets/cursor`.
    Tickets,
    /// The time-based `incremental/organizations`.
    Organizations,
}

impl Export {
    pub(crate) const ALL: [Export; 3] = [Export::Users, Export::Tickets, Export::Organizations];

    /// A low-cardinality name (metric label, logs).
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Export::Users => "users",
            Export::Tickets => "tickets",
            Export::Organizations => "organizations",
        }
    }

    /// Its position in [`Export::ALL`]: the slot of per-export arrays (cursors, counters).
    pub(crate) fn idx(self) -> usize {
        match self {
            Export::Users => 0,
            Export::Tickets => 1,
            Export::Organizations => 2,
        }
    }
}

/// How much the index holds (for `/healthz`, metrics and `deskline check`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// End-users that can be found by number (not suspended).
    pub customers: usize,
    /// Agents and admins, whatever their state.
    pub agents: usize,
    /// `(number, customer)` pairs in the phone index.
    pub phones: usize,
    /// Tickets with an open status (`new`, `open`, `pending`, `hold`) and a requester.
    pub open_tickets: usize,
    /// Organizations not deleted.
    pub organizations: usize,
}

/// The key names are compared by (DESIGN §3 rule 5): NFC, trimmed, inner whitespace collapsed to
/// one space, lowercased. Lives here so the index can precompute it for agents; `routing` re-exports
/// it as [`crate::routing::name_key`].
pub(crate) fn name_key(name: &str) -> String {
    let nfc: String = name.nfc().collect();
    let mut out = String::with_capacity(nfc.len());
    for word in nfc.split_whitespace() {
        if !out.is_empty() {
            out.push(' ');
        }
        out.extend(word.chars().flat_map(char::to_lowercase));
    }
    out
}

/// Ticket statuses that count as open (DESIGN §3 rule 3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[repr(u8)]
pub(crate) enum OpenStatus {
    New,
    Open,
    Pending,
    Hold,
}

impl OpenStatus {
    fn parse(s: Option<&str>) -> Option<Self> {
        match s? {
            "new" => Some(Self::New),
            "open" => Some(Self::Open),
            "pending" => Some(Self::Pending),
            "hold" => Some(Self::Hold),
            _ => None,
        }
    }
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::New => "new",
            Self::Open => "open",
            Self::Pending => "pending",
            Self::Hold => "hold",
        }
    }
}

/// An end-user: 48 bytes (checked by a test); see the module doc for why every field is as narrow
/// as it is.
#[derive(Clone, serde::Serialize, serde::Deserialize)]
pub(crate) struct CustomerRec {
    pub(crate) id: i64,
    pub(crate) name: Box<str>,
    /// Digits of the parsed `phone` field, 0 when absent or unparsable.
    pub(crate) phone: u64,
    /// 0 when none.
    pub(crate) org: i64,
    /// Unix seconds of `updated_at` (u32 lasts until 2106), 0 when unknown.
    pub(crate) updated_at: u32,
    pub(crate) suspended: bool,
}

impl Keyed for CustomerRec {
    fn key(&self) -> i64 {
        self.id
    }
}

/// An open ticket: 48 bytes (checked by a test).
#[derive(Clone)]
pub(crate) struct TicketRec {
    pub(crate) id: i64,
    pub(crate) requester: i64,
    /// 0 when unassigned.
    pub(crate) assignee: i64,
    /// Unix seconds, 0 when unknown (as [`CustomerRec::updated_at`]).
    pub(crate) updated_at: u32,
    pub(crate) subject: Box<str>,
    pub(crate) status: OpenStatus,
}

impl Keyed for TicketRec {
    fn key(&self) -> i64 {
        self.id
    }
}

/// What DESIGN §3 rule 7 needs of one customer: their most recently updated solved or closed
/// ticket and the agent of their most recent call reported to Deskline. Kept only for customers
/// that have either (a sparse store beside the customers, keyed by the requester id), so an
/// account without them pays nothing: 48 bytes a record (checked by a test), no subject, no
/// strings. Keyed by the requester id rather than stored in [`CustomerRec`] because the tickets
/// export runs ahead of the users export during a warm-up: a solved ticket must not be lost
/// because its requester has not arrived yet.
#[derive(Clone)]
pub(crate) struct RecentRec {
    pub(crate) customer: i64,
    /// The solved/closed ticket; 0 when only a call is known.
    pub(crate) ticket: i64,
    /// Its assignee, 0 when unassigned.
    pub(crate) ticket_agent: i64,
    /// The agent who took the most recent reported call; 0 when none.
    pub(crate) call_agent: i64,
    /// Unix seconds of the ticket's `updated_at` (as [`CustomerRec::updated_at`]).
    pub(crate) ticket_at: u32,
    /// Unix seconds of the call's start.
    pub(crate) call_at: u32,
    /// `closed` rather than `solved`.
    pub(crate) closed: bool,
}

impl Keyed for RecentRec {
    fn key(&self) -> i64 {
        self.customer
    }
}

impl RecentRec {
    fn empty(customer: i64) -> Self {
        Self {
            customer,
            ticket: 0,
            ticket_agent: 0,
            call_agent: 0,
            ticket_at: 0,
            call_at: 0,
            closed: false,
        }
    }

    fn is_empty(&self) -> bool {
        self.ticket == 0 && self.call_agent == 0
    }
}

/// A user's phone identities, sorted and deduplicated (only users that have any).
#[derive(Clone)]
pub(crate) struct IdentRec {
    pub(crate) user: i64,
    pub(crate) phones: Box<[u64]>,
}

impl Keyed for IdentRec {
    fn key(&self) -> i64 {
        self.user
    }
}

#[derive(Clone)]
pub(crate) struct OrgRec {
    pub(crate) id: i64,
    pub(crate) name: Box<str>,
}

impl Keyed for OrgRec {
    fn key(&self) -> i64 {
        self.id
    }
}

/// An agent or admin; few of them, so no squeezing.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub(crate) struct AgentRec {
    pub(crate) name: Box<str>,
    pub(crate) key: Box<str>,
    pub(crate) email: Box<str>,
    pub(crate) active: bool,
    pub(crate) suspended: bool,
}

/// One `(number, customer slot)` pair of the phone index: 12 bytes, the number split in two
/// halves so the pair is not padded to 16 (a million customers have over a million pairs, in a
/// table with up to twice as many buckets).
#[derive(Clone, Copy)]
struct PhoneEntry {
    phone_lo: u32,
    phone_hi: u32,
    slot: u32,
}

impl PhoneEntry {
    fn new(phone: u64, slot: u32) -> Self {
        Self {
            phone_lo: phone as u32,
            phone_hi: (phone >> 32) as u32,
            slot,
        }
    }

    fn phone(&self) -> u64 {
        u64::from(self.phone_hi) << 32 | u64::from(self.phone_lo)
    }
}

/// A customer as the index knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CustomerRef<'a> {
    /// Zendesk user id.
    pub id: i64,
    /// Full name; empty when Zendesk has none.
    pub name: &'a str,
    /// The customer's organization, if any.
    pub organization_id: Option<i64>,
    /// Unix seconds, 0 when unknown.
    pub updated_at: i64,
}

/// An open ticket as the index knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TicketRef<'a> {
    /// Zendesk ticket id.
    pub id: i64,
    /// The customer the ticket is for (never 0 in the index).
    pub requester_id: i64,
    /// The assignee; `None` while unassigned.
    pub assignee_id: Option<i64>,
    /// `new`, `open`, `pending` or `hold`.
    pub status: &'static str,
    /// Subject; empty when the ticket has none.
    pub subject: &'a str,
    /// Unix seconds, 0 when unknown.
    pub updated_at: i64,
}

/// A customer's most recently updated solved or closed ticket (DESIGN §3 rule 7).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DoneTicketRef {
    /// The Zendesk ticket id.
    pub id: i64,
    /// The customer it belongs to.
    pub requester_id: i64,
    /// Its assignee when it was solved or closed; `None` when it had none.
    pub assignee_id: Option<i64>,
    /// `solved` or `closed`.
    pub status: &'static str,
    /// Unix seconds.
    pub updated_at: i64,
}

/// The most recent call of a customer reported to Deskline and the agent who took it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CallRef {
    /// The customer who called.
    pub customer_id: i64,
    /// The agent (matched by full name) who took the call.
    pub agent_id: i64,
    /// Unix seconds of the call's start.
    pub started_at: i64,
}

/// An agent or admin as the index knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct AgentRef<'a> {
    pub id: i64,
    pub name: &'a str,
    pub email: &'a str,
    /// [`name_key`] of `name`.
    pub name_key: &'a str,
    pub active: bool,
    pub suspended: bool,
}

impl AgentRef<'_> {
    /// Whether tickets assigned to this agent can decide a route (DESIGN §3 rule 4).
    pub(crate) fn is_usable(&self) -> bool {
        self.active && !self.suspended
    }
}

/// An owned agent listing entry (for `deskline check`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentInfo {
    /// Zendesk user id.
    pub id: i64,
    /// Full name as in Zendesk.
    pub name: String,
    /// Email address; empty when none.
    pub email: String,
    /// `name_key` of `name` (DESIGN §3 rule 5): what the directory is matched on.
    pub name_key: String,
    /// `false` once the user is deleted or deactivated.
    pub active: bool,
    /// `true` while suspended; suspended agents never own a route.
    pub suspended: bool,
}

/// The in-memory read model (DESIGN §3): customers by phone, open tickets by requester, agents and
/// organizations, fed by the exports, webhooks and the post-call sync; routing reads it under a lock.
#[derive(Default)]
pub struct Index {
    customers: Store<CustomerRec>,
    /// Phone identities by user id; only users that have any.
    identities: Store<IdentRec>,
    phones: HashTable<PhoneEntry>,
    /// Customers not suspended (the ones in the phone index).
    findable: usize,
    tickets: Store<TicketRec>,
    /// Ticket slots hashed by requester id (a multi-map: iterate with `iter_hash`).
    by_requester: HashTable<u32>,
    /// Rule 7's memory per customer id; only customers that have a solved/closed ticket or a
    /// reported call.
    recent: Store<RecentRec>,
    agents: FxHashMap<i64, AgentRec>,
    agent_keys: FxHashMap<Box<str>, Vec<i64>>,
    orgs: Store<OrgRec>,
    cursors: Cursors,
    /// Users whose phone identities are still to be fetched (`users/show_many`), saved with the
    /// cursors: the users export moved past them, so only this list remembers them.
    pending_identities: std::collections::BTreeSet<i64>,
    fresh: [Option<i64>; 3],
    loaded: bool,
    /// A first start's bootstrap loaded what routing needs (open tickets, their requesters with
    /// all their phones, the agents): answers are given, marked WARMING, until `loaded`. Not
    /// saved in snapshots: an interrupted bootstrap starts again (see `follow::bootstrap`).
    warming: bool,
    /// A bootstrap under way (with replicas it travels through the change log, so the replica
    /// that takes the follower lease over continues it: see `follow::bootstrap`). Not saved in
    /// snapshots, like `warming`.
    bootstrap: Option<BootstrapState>,
}

/// Where a bootstrap stands, as the follower recorded it through [`writer::BootstrapStep`]s.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct BootstrapState {
    /// Unix seconds where the incremental exports start (the first attempt's, kept by every
    /// later attempt and every later follower: see `follow::bootstrap`).
    pub incremental_start: i64,
    /// Phases 1 and 2 are done: only the incremental exports' catch-up is left.
    pub searched: bool,
    /// Unix milliseconds of the latest search export requests (the last [`SEARCHES_KEPT`]), so a
    /// follower that takes over keeps that endpoint's per-minute limit with its predecessor's
    /// requests counted.
    pub searches: std::collections::VecDeque<i64>,
}

/// Search export requests remembered in [`BootstrapState::searches`] (Zendesk's limit is 100 a
/// minute; more than that can never matter).
pub(crate) const SEARCHES_KEPT: usize = 1000;

impl std::fmt::Debug for Index {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Index")
            .field("counts", &self.counts())
            .field("loaded", &self.loaded)
            .finish_non_exhaustive()
    }
}

/// Unix seconds as stored in records; 0 for unknown or out of `u32` range.
fn time_of(s: Option<&str>) -> u32 {
    s.and_then(parse_time)
        .and_then(|t| u32::try_from(t).ok())
        .unwrap_or(0)
}

fn boxed(s: Option<&str>) -> Box<str> {
    s.unwrap_or_default().into()
}

/// One user of an export page or a write, turned into what the index stores, without the lock.
/// Serialisable so a prepared page travels through the shared change log as it is (phones parsed
/// once, by the replica that read it).
#[derive(serde::Serialize, serde::Deserialize)]
pub(crate) enum PreparedUser {
    Customer(CustomerRec),
    Agent {
        id: i64,
        rec: AgentRec,
    },
    /// Deleted (`deleted`: its identities go too), or not an end-user nor an agent.
    Gone {
        id: i64,
        deleted: bool,
    },
}

impl PreparedUser {
    pub(crate) fn new(user: &User, parser: &PhoneParser) -> Self {
        Self::with_phone(
            user,
            user.phone.as_deref().and_then(|p| parser.parse_stored(p)),
        )
    }

    /// `phone`: the parsed `user.phone`.
    fn with_phone(user: &User, phone: Option<E164>) -> Self {
        let id = user.id;
        if user.is_agent() {
            let name = boxed(user.name.as_deref());
            return Self::Agent {
                id,
                rec: AgentRec {
                    key: name_key(&name).into(),
                    name,
                    email: boxed(user.email.as_deref()),
                    active: user.active != Some(false),
                    suspended: user.suspended == Some(true),
                },
            };
        }
        let deleted = user.active == Some(false) || user.permanently_deleted == Some(true);
        if deleted || !user.is_end_user() {
            return Self::Gone { id, deleted };
        }
        Self::Customer(CustomerRec {
            id,
            name: boxed(user.name.as_deref()),
            phone: phone.map_or(0, E164::digits),
            org: user.organization_id.unwrap_or(0),
            updated_at: time_of(user.updated_at.as_deref()),
            suspended: user.suspended == Some(true),
        })
    }

    fn id(&self) -> i64 {
        match self {
            Self::Customer(c) => c.id,
            Self::Agent { id, .. } | Self::Gone { id, .. } => *id,
        }
    }
}

impl std::fmt::Debug for UserBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UserBatch")
            .field("users", &self.users.len())
            .field("identities", &self.identities.as_ref().map(|m| m.len()))
            .finish()
    }
}

/// A page of the users export made ready for [`Index::apply_user_batch`] outside the index lock:
/// every phone parsed (the costly part of applying a user), records built, identities grouped.
#[derive(serde::Serialize, serde::Deserialize)]
pub struct UserBatch {
    users: Vec<PreparedUser>,
    /// Phone identities by user, for every user of the page (an empty list removes the user's
    /// identities); `None` when the page came without the identities sideload.
    identities: Option<FxHashMap<i64, Vec<u64>>>,
}

impl UserBatch {
    /// Parses the page's phones and builds its records; `identities` is `None` when the sideload was missing.
    pub fn prepare(users: &[User], identities: Option<&[Identity]>, parser: &PhoneParser) -> Self {
        // A user's `phone` is usually also one of its phone identities: parse that string once.
        let mut main: FxHashMap<i64, (&str, Option<E164>)> = FxHashMap::default();
        main.reserve(users.len());
        let mut prepared = Vec::with_capacity(users.len());
        for u in users {
            let phone = u
                .phone
                .as_deref()
                .map(|raw| (raw, parser.parse_stored(raw)));
            if let Some(p) = phone {
                main.insert(u.id, p);
            }
            prepared.push(PreparedUser::with_phone(u, phone.and_then(|(_, e)| e)));
        }
        Self {
            users: prepared,
            identities: identities.map(|list| group_phones(users, list, &main, parser)),
        }
    }

    /// Splits the batch into batches of at most `n` users each (for the writer to apply with
    /// pauses between them); identities of users not on the page go with the last one.
    pub(crate) fn into_pieces(self, n: usize) -> Vec<UserBatch> {
        let Self {
            users,
            mut identities,
        } = self;
        let mut out = Vec::with_capacity(users.len() / n.max(1) + 1);
        let mut users = users.into_iter().peekable();
        while users.peek().is_some() {
            let piece: Vec<PreparedUser> = users.by_ref().take(n.max(1)).collect();
            let ids = identities.as_mut().map(|m| {
                piece
                    .iter()
                    .filter_map(|u| m.remove_entry(&u.id()))
                    .collect::<FxHashMap<i64, Vec<u64>>>()
            });
            out.push(UserBatch {
                users: piece,
                identities: ids,
            });
        }
        if let Some(rest) = identities.filter(|m| !m.is_empty()) {
            out.push(UserBatch {
                users: Vec::new(),
                identities: Some(rest),
            });
        }
        out
    }

    /// Only the phone identities of `users` (as `users/show_many?include=identities` returns them),
    /// for a page whose users were applied without them; the users themselves are left as they are.
    pub(crate) fn identities_only(
        users: &[User],
        identities: &[Identity],
        parser: &PhoneParser,
    ) -> Self {
        Self {
            users: Vec::new(),
            identities: Some(group_phones(
                users,
                identities,
                &FxHashMap::default(),
                parser,
            )),
        }
    }
}

/// The parsed phone identities by user, with an entry (maybe empty) for every one of `users`, so a
/// user whose last phone identity was removed loses it in the index too. `main`: user id → its
/// `phone` string and that string parsed, reused when an identity repeats it.
fn group_phones(
    users: &[User],
    identities: &[Identity],
    main: &FxHashMap<i64, (&str, Option<E164>)>,
    parser: &PhoneParser,
) -> FxHashMap<i64, Vec<u64>> {
    let mut by_user = FxHashMap::default();
    by_user.reserve(users.len());
    for u in users {
        by_user.insert(u.id, Vec::new());
    }
    for i in identities.iter().filter(|i| i.is_phone()) {
        let Some(raw) = i.value.as_deref() else {
            continue;
        };
        let parsed = match main.get(&i.user_id) {
            Some((same, parsed)) if *same == raw => *parsed,
            _ => parser.parse_stored(raw),
        };
        let phones: &mut Vec<u64> = by_user.entry(i.user_id).or_default();
        if let Some(e) = parsed {
            phones.push(e.digits());
        }
    }
    for phones in by_user.values_mut() {
        phones.sort_unstable();
        phones.dedup();
    }
    by_user
}

#[cfg(test)]
/// The sorted, deduplicated digits of the phone identities among `identities`.
fn phones_of<'a>(identities: impl Iterator<Item = &'a Identity>, parser: &PhoneParser) -> Vec<u64> {
    let mut phones: Vec<u64> = identities
        .filter(|i| i.is_phone())
        .filter_map(|i| parser.parse_stored(i.value.as_deref()?))
        .map(E164::digits)
        .collect();
    phones.sort_unstable();
    phones.dedup();
    phones
}

impl Index {
    /// An empty index, not yet loaded.
    pub fn new() -> Self {
        Self::default()
    }

    /// Inserts, updates or removes (deleted / inactive end-user) one user from an export row or a
    /// write. Keeps the phone identities already known for it (they come separately).
    pub fn apply_user(&mut self, user: &User, parser: &PhoneParser) {
        let prepared = PreparedUser::new(user, parser);
        self.commit_user(prepared, None);
    }

    /// Applies a page prepared by [`UserBatch::prepare`]: each user as [`apply_user`](Self::apply_user)
    /// would, then its phone identities as [`apply_identities`](Self::apply_identities) would, but
    /// with every phone already parsed and each customer re-indexed once.
    pub fn apply_user_batch(&mut self, batch: UserBatch) {
        let UserBatch {
            users,
            mut identities,
        } = batch;
        for user in users {
            let phones = identities
                .as_mut()
                .map(|m| m.remove(&user.id()).unwrap_or_default());
            self.commit_user(user, phones);
        }
        // Identities of users that are not on the page (a sideload should not have any).
        for (user_id, phones) in identities.into_iter().flatten() {
            self.set_identities(user_id, phones);
        }
    }

    /// `phones`: the user's complete phone identities, sorted and deduplicated, when known.
    fn commit_user(&mut self, user: PreparedUser, phones: Option<Vec<u64>>) {
        let id = user.id();
        let slot = self.customers.slot(id);
        if let Some(slot) = slot {
            // With the identities it was indexed under, before they change.
            self.unindex_customer(slot);
        }
        if let Some(phones) = phones {
            self.store_identities(id, phones);
        }
        match user {
            PreparedUser::Customer(rec) => {
                self.remove_agent(id);
                let slot = match slot {
                    Some(slot) => {
                        *self.customers.at_mut(slot) = rec;
                        slot
                    }
                    None => self.customers.insert_new(rec),
                };
                self.index_customer(slot);
            }
            PreparedUser::Agent { id, rec } => {
                if slot.is_some() {
                    self.customers.remove(id);
                }
                self.upsert_agent(id, rec);
            }
            PreparedUser::Gone { id, deleted } => {
                if slot.is_some() {
                    self.customers.remove(id);
                }
                self.remove_agent(id);
                if deleted {
                    self.identities.remove(id);
                    self.recent.remove(id);
                }
            }
        }
    }

    fn store_identities(&mut self, user_id: i64, phones: Vec<u64>) {
        if phones.is_empty() {
            self.identities.remove(user_id);
            return;
        }
        let phones = phones.into_boxed_slice();
        match self.identities.slot(user_id) {
            Some(slot) => self.identities.at_mut(slot).phones = phones,
            None => {
                self.identities.insert_new(IdentRec {
                    user: user_id,
                    phones,
                });
            }
        }
    }

    fn set_identities(&mut self, user_id: i64, phones: Vec<u64>) {
        let slot = self.customers.slot(user_id);
        if let Some(slot) = slot {
            self.unindex_customer(slot);
        }
        self.store_identities(user_id, phones);
        if let Some(slot) = slot {
            self.index_customer(slot);
        }
    }

    #[cfg(test)]
    /// Replaces the phone-number identities known for `user_id` (other identity types ignored).
    pub(crate) fn apply_identities(
        &mut self,
        user_id: i64,
        identities: &[Identity],
        parser: &PhoneParser,
    ) {
        let phones = phones_of(identities.iter(), parser);
        self.set_identities(user_id, phones);
    }

    /// Keeps open tickets (`new|open|pending|hold`), drops any other status. A `solved` or
    /// `closed` ticket becomes its requester's recent ticket (rule 7) when it is the most recently
    /// updated one known for them; a ticket that is reopened or deleted stops being one.
    pub fn apply_ticket(&mut self, ticket: &Ticket) {
        let status = OpenStatus::parse(ticket.status.as_deref());
        let requester = ticket.requester_id.unwrap_or(0);
        match ticket.status.as_deref() {
            Some(done @ ("solved" | "closed")) if requester != 0 => {
                self.note_done_ticket(ticket, requester, done == "closed");
            }
            _ => self.forget_done_ticket(ticket.id, requester),
        }
        let Some(status) = status.filter(|_| requester != 0) else {
            self.remove_ticket(ticket.id);
            return;
        };
        let rec = TicketRec {
            id: ticket.id,
            requester,
            assignee: ticket.assignee_id.unwrap_or(0),
            updated_at: time_of(ticket.updated_at.as_deref()),
            subject: boxed(ticket.subject.as_deref()),
            status,
        };
        match self.tickets.slot(ticket.id) {
            Some(slot) if self.tickets.at(slot).requester == requester => {
                *self.tickets.at_mut(slot) = rec;
            }
            Some(_) => {
                self.remove_ticket(ticket.id);
                self.insert_ticket(rec);
            }
            None => self.insert_ticket(rec),
        }
    }

    /// Rule 7's recent ticket: replaces the one held when this one is the same ticket or was
    /// updated later (ties: the higher id), so a late or repeated export row never steps it back.
    fn note_done_ticket(&mut self, ticket: &Ticket, requester: i64, closed: bool) {
        let at = time_of(ticket.updated_at.as_deref());
        let rec = self.recent_mut(requester);
        let newer = rec.ticket == 0
            || (rec.ticket == ticket.id && at >= rec.ticket_at)
            || (at, ticket.id) > (rec.ticket_at, rec.ticket);
        if newer {
            rec.ticket = ticket.id;
            rec.ticket_agent = ticket.assignee_id.unwrap_or(0);
            rec.ticket_at = at;
            rec.closed = closed;
        }
        self.drop_recent_if_empty(requester);
    }

    /// A ticket that is no longer solved or closed (reopened, deleted) is nobody's recent ticket.
    /// Only its requester's record is looked at: a solved ticket that also changed requester stays
    /// on the old requester until a newer one replaces it (rare, and only ever a fallback).
    fn forget_done_ticket(&mut self, id: i64, requester: i64) {
        let Some(slot) = self.recent.slot(requester) else {
            return;
        };
        if self.recent.at(slot).ticket != id {
            return;
        }
        let rec = self.recent.at_mut(slot);
        rec.ticket = 0;
        rec.ticket_agent = 0;
        rec.ticket_at = 0;
        rec.closed = false;
        self.drop_recent_if_empty(requester);
    }

    /// A call to or from `phone` taken by agent `agent_id` that started at `started_at` (Unix
    /// seconds), reported to Deskline: it becomes the last call of every customer on that number
    /// whose last known call started earlier (a shared number: the PBX cannot say which of them
    /// called). A number with no customer yet records nothing.
    pub fn apply_call(&mut self, phone: E164, agent_id: i64, started_at: i64) {
        let Ok(at) = u32::try_from(started_at) else {
            return;
        };
        if agent_id == 0 {
            return;
        }
        let ids: Vec<i64> = self.customers_by_phone(phone).map(|c| c.id).collect();
        for id in ids {
            let rec = self.recent_mut(id);
            if rec.call_agent == 0 || at >= rec.call_at {
                rec.call_agent = agent_id;
                rec.call_at = at;
            }
        }
    }

    fn recent_mut(&mut self, customer: i64) -> &mut RecentRec {
        let slot = match self.recent.slot(customer) {
            Some(slot) => slot,
            None => self.recent.insert_new(RecentRec::empty(customer)),
        };
        self.recent.at_mut(slot)
    }

    fn drop_recent_if_empty(&mut self, customer: i64) {
        if self.recent.get(customer).is_some_and(RecentRec::is_empty) {
            self.recent.remove(customer);
        }
    }

    /// The customer's most recently updated solved or closed ticket, when one is known.
    pub fn done_ticket_of(&self, customer_id: i64) -> Option<DoneTicketRef> {
        let r = self.recent.get(customer_id).filter(|r| r.ticket != 0)?;
        Some(DoneTicketRef {
            id: r.ticket,
            requester_id: r.customer,
            assignee_id: (r.ticket_agent != 0).then_some(r.ticket_agent),
            status: if r.closed { "closed" } else { "solved" },
            updated_at: i64::from(r.ticket_at),
        })
    }

    /// The customer's most recent call reported to Deskline, when one is known.
    pub fn last_call_of(&self, customer_id: i64) -> Option<CallRef> {
        let r = self.recent.get(customer_id).filter(|r| r.call_agent != 0)?;
        Some(CallRef {
            customer_id: r.customer,
            agent_id: r.call_agent,
            started_at: i64::from(r.call_at),
        })
    }

    /// Customers with a recent ticket or a reported call held for rule 7.
    pub fn recent_len(&self) -> usize {
        self.recent.len()
    }

    /// Inserts or updates one organization; removes it when `deleted_at` is set.
    pub fn apply_organization(&mut self, org: &Organization) {
        if org.deleted_at.is_some() {
            self.orgs.remove(org.id);
            return;
        }
        let name = boxed(org.name.as_deref());
        match self.orgs.slot(org.id) {
            Some(slot) => self.orgs.at_mut(slot).name = name,
            None => {
                self.orgs.insert_new(OrgRec { id: org.id, name });
            }
        }
    }

    pub(crate) fn cursors(&self) -> &Cursors {
        &self.cursors
    }

    /// Up to `n` of the users whose phone identities are still to be fetched, lowest ids first.
    pub(crate) fn pending_identities(&self, n: usize) -> Vec<i64> {
        self.pending_identities.iter().take(n).copied().collect()
    }

    /// How many users' phone identities are still to be fetched.
    pub(crate) fn pending_identities_len(&self) -> usize {
        self.pending_identities.len()
    }

    pub(crate) fn add_pending_identities(&mut self, ids: Vec<i64>) {
        self.pending_identities.extend(ids);
    }

    pub(crate) fn remove_pending_identities(&mut self, ids: &[i64]) {
        for id in ids {
            self.pending_identities.remove(id);
        }
    }

    pub(crate) fn cursors_mut(&mut self) -> &mut Cursors {
        &mut self.cursors
    }

    /// Records that `export` was read to its end at `at_ms` (Unix milliseconds).
    pub(crate) fn mark_fresh(&mut self, export: Export, at_ms: i64) {
        self.fresh[export.idx()] = Some(at_ms);
    }

    /// When `export` was last read to its end (Unix milliseconds); `None` until it was.
    pub(crate) fn fresh_at(&self, export: Export) -> Option<i64> {
        self.fresh[export.idx()]
    }

    /// Milliseconds since the oldest of the three exports was last read to its end; `None` until all were.
    pub(crate) fn age_ms(&self, now_ms: i64) -> Option<i64> {
        let mut oldest = i64::MAX;
        for f in self.fresh {
            oldest = oldest.min(f?);
        }
        Some(now_ms.saturating_sub(oldest).max(0))
    }

    /// True once a full warm-up completed (or a snapshot of one was loaded).
    pub fn is_loaded(&self) -> bool {
        self.loaded
    }

    /// Marks the full warm-up as complete (see `is_loaded`).
    pub fn set_loaded(&mut self) {
        self.loaded = true;
        self.warming = false;
        self.bootstrap = None;
    }

    /// True while a bootstrap's routing data is in but the rest is still coming.
    pub fn is_warming(&self) -> bool {
        self.warming && !self.loaded
    }

    /// Marks the index as answering before it is complete (a bootstrap's first phase is in);
    /// `loaded` ends it.
    pub fn set_warming(&mut self) {
        self.warming = true;
    }

    /// The bootstrap under way, if any (see [`BootstrapState`]).
    pub(crate) fn bootstrap(&self) -> Option<&BootstrapState> {
        self.bootstrap.as_ref()
    }

    /// Records a step of the bootstrap (see [`writer::BootstrapStep`]).
    pub(crate) fn apply_bootstrap(&mut self, step: writer::BootstrapStep) {
        use writer::BootstrapStep as S;
        match step {
            // A later attempt keeps the first attempt's start: what the first one read may be
            // older than the second's margin (see `follow::bootstrap`).
            S::Started { incremental_start } => match &mut self.bootstrap {
                Some(b) => b.incremental_start = b.incremental_start.min(incremental_start),
                None => {
                    self.bootstrap = Some(BootstrapState {
                        incremental_start,
                        ..BootstrapState::default()
                    })
                }
            },
            S::Searched(at_ms) => {
                if let Some(b) = &mut self.bootstrap {
                    b.searches.push_back(at_ms);
                    while b.searches.len() > SEARCHES_KEPT {
                        b.searches.pop_front();
                    }
                }
            }
            S::SearchesDone => {
                if let Some(b) = &mut self.bootstrap {
                    b.searched = true;
                }
            }
            S::Abandoned => self.bootstrap = None,
        }
    }

    /// Whether answers may be given: complete, or warming after a bootstrap.
    pub fn is_serving(&self) -> bool {
        self.loaded || self.warming
    }

    /// Whether user `id` is in the index as a customer or an agent.
    pub fn knows_user(&self, id: i64) -> bool {
        self.customers.get(id).is_some() || self.agents.contains_key(&id)
    }

    /// Whether `id` is a known agent or admin (whatever its flags).
    pub fn knows_agent(&self, id: i64) -> bool {
        self.agents.contains_key(&id)
    }

    /// How much the index holds now.
    pub fn counts(&self) -> Counts {
        Counts {
            customers: self.findable,
            agents: self.agents.len(),
            phones: self.phones.len(),
            open_tickets: self.tickets.len(),
            organizations: self.orgs.len(),
        }
    }

    /// Whether any active customer has this number (the cheap check behind `E164::candidate`).
    pub(crate) fn has_phone(&self, phone: E164) -> bool {
        let p = phone.digits();
        self.phones.find(fx(p), |e| e.phone() == p).is_some()
    }

    /// The active, unsuspended customers on `phone`, in no particular order.
    pub(crate) fn customers_by_phone(&self, phone: E164) -> impl Iterator<Item = CustomerRef<'_>> {
        let p = phone.digits();
        self.phones
            .iter_hash(fx(p))
            .filter(move |e| e.phone() == p)
            .map(|e| customer_ref(self.customers.at(e.slot)))
    }

    /// Ids of the active customers on that number, ascending.
    pub fn customer_ids_by_phone(&self, phone: E164) -> Vec<i64> {
        let mut ids: Vec<i64> = self.customers_by_phone(phone).map(|c| c.id).collect();
        ids.sort_unstable();
        ids
    }

    /// An end-user known to the index (suspended ones included; deleted ones are gone).
    pub fn customer(&self, id: i64) -> Option<CustomerRef<'_>> {
        self.customers.get(id).map(customer_ref)
    }

    /// The open tickets requested by `requester_id`, in no particular order.
    pub fn open_tickets_of(&self, requester_id: i64) -> impl Iterator<Item = TicketRef<'_>> {
        let chunks = self.tickets.chunks();
        self.by_requester
            .iter_hash(fx(requester_id as u64))
            .filter_map(move |&s| store::record(chunks, s))
            .filter(move |t| t.requester == requester_id)
            .map(ticket_ref)
    }

    pub(crate) fn open_ticket(&self, id: i64) -> Option<TicketRef<'_>> {
        self.tickets.get(id).map(ticket_ref)
    }

    /// Any agent or admin seen, whatever their state.
    pub(crate) fn agent(&self, id: i64) -> Option<AgentRef<'_>> {
        self.agents.get(&id).map(|a| agent_ref(id, a))
    }

    /// The active, unsuspended agent/admin whose [`name_key`] matches `full_name`; the lowest id
    /// when several share the name (deterministic; `deskline check` lists such clashes).
    pub(crate) fn agent_by_name(&self, full_name: &str) -> Option<i64> {
        let key = name_key(full_name);
        self.agent_keys
            .get(key.as_str())?
            .iter()
            .copied()
            .filter(|id| self.agent(*id).is_some_and(|a| a.is_usable()))
            .min()
    }

    /// The other active, unsuspended agents/admins whose [`name_key`] is `agent_id`'s, ascending:
    /// the directory (keyed by name) cannot tell them apart.
    pub fn namesakes(&self, agent_id: i64) -> Vec<i64> {
        let Some(a) = self.agents.get(&agent_id) else {
            return Vec::new();
        };
        let mut ids: Vec<i64> = self
            .agent_keys
            .get(&a.key)
            .into_iter()
            .flatten()
            .copied()
            .filter(|&id| id != agent_id && self.agent(id).is_some_and(|a| a.is_usable()))
            .collect();
        ids.sort_unstable();
        ids
    }

    /// Every agent and admin with their flags, sorted by name then id.
    pub fn agents(&self) -> Vec<AgentInfo> {
        let mut out: Vec<AgentInfo> = self
            .agents
            .iter()
            .map(|(&id, a)| AgentInfo {
                id,
                name: a.name.to_string(),
                email: a.email.to_string(),
                name_key: a.key.to_string(),
                active: a.active,
                suspended: a.suspended,
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name).then(a.id.cmp(&b.id)));
        out
    }

    #[cfg(test)]
    /// The name of any known user (customer or agent).
    pub(crate) fn user_name(&self, id: i64) -> Option<&str> {
        match self.customers.get(id) {
            Some(c) => Some(&c.name),
            None => self.agents.get(&id).map(|a| &*a.name),
        }
    }

    /// The organization of a known end-user, when it has one.
    pub(crate) fn user_organization(&self, id: i64) -> Option<i64> {
        self.customers
            .get(id)
            .and_then(|c| (c.org != 0).then_some(c.org))
    }

    pub(crate) fn organization_name(&self, id: i64) -> Option<&str> {
        self.orgs.get(id).map(|o| &*o.name)
    }

    // ---- internals ----

    fn index_customer(&mut self, slot: u32) {
        let c = self.customers.at(slot);
        if c.suspended {
            return;
        }
        let (main, id) = (c.phone, c.id);
        if main != 0 {
            insert_phone(&mut self.phones, main, slot);
        }
        if let Some(extra) = self.identities.get(id) {
            for &p in extra.phones.iter().filter(|&&p| p != main) {
                insert_phone(&mut self.phones, p, slot);
            }
        }
        self.findable += 1;
    }

    fn unindex_customer(&mut self, slot: u32) {
        let c = self.customers.at(slot);
        if c.suspended {
            return;
        }
        let (main, id) = (c.phone, c.id);
        if main != 0 {
            remove_phone(&mut self.phones, main, slot);
        }
        if let Some(extra) = self.identities.get(id) {
            for &p in extra.phones.iter().filter(|&&p| p != main) {
                remove_phone(&mut self.phones, p, slot);
            }
        }
        self.findable -= 1;
    }

    fn upsert_agent(&mut self, id: i64, rec: AgentRec) {
        self.remove_agent(id);
        self.agent_keys.entry(rec.key.clone()).or_default().push(id);
        self.agents.insert(id, rec);
    }

    fn remove_agent(&mut self, id: i64) {
        let Some(old) = self.agents.remove(&id) else {
            return;
        };
        if let Some(ids) = self.agent_keys.get_mut(&old.key) {
            ids.retain(|&x| x != id);
            if ids.is_empty() {
                self.agent_keys.remove(&old.key);
            }
        }
    }

    /// Builds the phone index and the tickets-by-requester table from the stores, which were
    /// just bulk-loaded (both tables empty).
    fn index_loaded(&mut self) {
        let mut phones: Vec<(u64, PhoneEntry)> =
            Vec::with_capacity(self.customers.len() + self.identities.len());
        self.findable = 0;
        for (slot, c) in self.customers.iter().filter(|(_, c)| !c.suspended) {
            self.findable += 1;
            if c.phone != 0 {
                phones.push((fx(c.phone), PhoneEntry::new(c.phone, slot)));
            }
            if let Some(extra) = self.identities.get(c.id) {
                for &p in extra.phones.iter().filter(|&&p| p != c.phone) {
                    phones.push((fx(p), PhoneEntry::new(p, slot)));
                }
            }
        }
        store::insert_in_bucket_order(&mut self.phones, phones, |e| fx(e.phone()), |_, _| false);
        let by_requester: Vec<(u64, u32)> = self
            .tickets
            .iter()
            .map(|(slot, t)| (fx(t.requester as u64), slot))
            .collect();
        let items = self.tickets.chunks();
        store::insert_in_bucket_order(
            &mut self.by_requester,
            by_requester,
            |&s| requester_hash(items, s),
            |_, _| false,
        );
    }

    fn insert_ticket(&mut self, rec: TicketRec) {
        let hash = fx(rec.requester as u64);
        let slot = self.tickets.insert_new(rec);
        let items = self.tickets.chunks();
        self.by_requester
            .insert_unique(hash, slot, |&s| requester_hash(items, s));
    }

    pub(crate) fn remove_ticket(&mut self, id: i64) {
        let Some(slot) = self.tickets.slot(id) else {
            return;
        };
        let hash = fx(self.tickets.at(slot).requester as u64);
        if let Ok(e) = self.by_requester.find_entry(hash, |&s| s == slot) {
            e.remove();
        }
        self.tickets.remove(id);
    }
}

fn requester_hash(chunks: &[store::Chunk<TicketRec>], slot: u32) -> u64 {
    fx(store::record(chunks, slot).map_or(0, |t| t.requester) as u64)
}

fn insert_phone(phones: &mut HashTable<PhoneEntry>, phone: u64, slot: u32) {
    phones.insert_unique(fx(phone), PhoneEntry::new(phone, slot), |e| fx(e.phone()));
}

fn remove_phone(phones: &mut HashTable<PhoneEntry>, phone: u64, slot: u32) {
    if let Ok(e) = phones.find_entry(fx(phone), |e| e.phone() == phone && e.slot == slot) {
        e.remove();
    }
}

fn customer_ref(c: &CustomerRec) -> CustomerRef<'_> {
    CustomerRef {
        id: c.id,
        name: &c.name,
        organization_id: (c.org != 0).then_some(c.org),
        updated_at: i64::from(c.updated_at),
    }
}

fn ticket_ref(t: &TicketRec) -> TicketRef<'_> {
    TicketRef {
        id: t.id,
        requester_id: t.requester,
        assignee_id: (t.assignee != 0).then_some(t.assignee),
        status: t.status.as_str(),
        subject: &t.subject,
        updated_at: i64::from(t.updated_at),
    }
}

fn agent_ref(id: i64, a: &AgentRec) -> AgentRef<'_> {
    AgentRef {
        id,
        name: &a.name,
        email: &a.email,
        name_key: &a.key,
        active: a.active,
        suspended: a.suspended,
    }
}

#[cfg(test)]
impl Index {
    /// [`customer_ids_by_phone`](Self::customer_ids_by_phone) sorted, to compare two indexes.
    pub(crate) fn sorted_ids_by_phone(&self, phone: E164) -> Vec<i64> {
        let mut ids = self.customer_ids_by_phone(phone);
        ids.sort_unstable();
        ids
    }
}

#[cfg(test)]
mod tests;
