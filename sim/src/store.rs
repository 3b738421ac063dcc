//! The simulator's data: users (with identities), organizations, tickets, comments and call records,
//! plus the change clock the exports and search run on.
//!
//! Invariants:
//! - Every write goes through a method here that stamps the record "now" and appends it to its
//!   entity's [`ChangeLog`]. A log is append-only and its times never decrease (the clock is
//!   clamped to its last value), so a cursor is just a log position: a page returns the entries at or
//!   after it, and a record changed after a page was read is always appended past that page's cursor.
//!   Nothing can be skipped, whatever the wall clock does.
//! - A record's `log_pos` names its latest log entry; older entries for the same record are stale and
//!   skipped when read, so a record appears once per page, at its latest change.
//! - Ids come from separate ranges per entity (users, organizations, identities, comments, calls),
//!   so a test that mixes up a user id with an organization id fails instead of passing by luck.
//!   Tickets count from 1 like a real account's.
//!
//! Layout is chosen for accounts of millions: records live in `Vec`s indexed by `id - base`, rarely
//! used fields sit behind one `Option<Box<…>>`, and the phone and email lookups are sorted vectors of
//! small keys built once by the generator plus a short unsorted tail for later writes.

use std::time::{SystemTime, UNIX_EPOCH};

use rustc_hash::FxHashMap;
use serde_json::{Map, Value};

use crate::wire;

pub(crate) const USER_BASE: i64 = 10_000_000_000;
pub(crate) const ORG_BASE: i64 = 20_000_000_000;
pub(crate) const IDENTITY_BASE: i64 = 30_000_000_000;
/// The first comment of ticket `t` has id `FIRST_COMMENT_BASE + t`; later ones count from
/// [`COMMENT_BASE`].
pub(crate) const FIRST_COMMENT_BASE: i64 = 40_000_000_000;
pub(crate) const COMMENT_BASE: i64 = 45_000_000_000;
pub(crate) const CALL_BASE: i64 = 50_000_000_000;

/// Wall-clock now in Unix milliseconds.
pub(crate) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// The digits of a stored phone, as search compares them.
pub fn phone_digits(s: &str) -> String {
    s.chars().filter(char::is_ascii_digit).collect()
}

/// Key of the suffix index: the last 7 digits (numbers shorter than that are not indexed; a search
/// for fewer than 7 digits scans).
fn suffix_key(digits: &str) -> Option<u32> {
    let n = digits.len();
    (n >= 7).then(|| digits[n - 7..].parse().ok()).flatten()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    EndUser,
    Agent,
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::EndUser => "end-user",
            Role::Agent => "agent",
            Role::Admin => "admin",
        }
    }
    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "end-user" | "end_user" => Some(Role::EndUser),
            "agent" => Some(Role::Agent),
            "admin" => Some(Role::Admin),
            _ => None,
        }
    }
    pub fn is_staff(self) -> bool {
        !matches!(self, Role::EndUser)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    New,
    Open,
    Pending,
    Hold,
    Solved,
    Closed,
    Deleted,
}

impl Status {
    pub const ALL: [Status; 7] = [
        Status::New,
        Status::Open,
        Status::Pending,
        Status::Hold,
        Status::Solved,
        Status::Closed,
        Status::Deleted,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            Status::New => "new",
            Status::Open => "open",
            Status::Pending => "pending",
            Status::Hold => "hold",
            Status::Solved => "solved",
            Status::Closed => "closed",
            Status::Deleted => "deleted",
        }
    }
    /// Values a client may set (`deleted` is not one of them).
    pub fn parse(s: &str) -> Option<Status> {
        Status::ALL[..6].iter().copied().find(|v| v.as_str() == s)
    }
}

pub(crate) const PRIORITIES: [&str; 4] = ["urgent", "high", "normal", "low"];
pub(crate) const TYPES: [&str; 4] = ["problem", "incident", "question", "task"];
pub(crate) const VIAS: [&str; 4] = ["web", "email", "voice", "api"];

/// One entry per change: when (Unix ms) and which record (index into the entity's `Vec`).
#[derive(Debug, Default, Clone)]
pub(crate) struct ChangeLog {
    pub(crate) entries: Vec<(i64, u32)>,
}

impl ChangeLog {
    fn push(&mut self, ms: i64, idx: u32) -> u32 {
        self.entries.push((ms, idx));
        (self.entries.len() - 1) as u32
    }
    /// First position whose change time is at or after `ms`.
    pub(crate) fn first_at_or_after(&self, ms: i64) -> usize {
        self.entries.partition_point(|e| e.0 < ms)
    }
    /// End of the visible prefix: entries changed at or before `ms`.
    pub(crate) fn visible_end(&self, ms: i64) -> usize {
        self.entries.partition_point(|e| e.0 <= ms)
    }
}

/// Sorted `(key, index)` pairs plus an unsorted tail for records added after generation. Entries
/// are never removed: a hit is verified against the record, so stale ones cost only a comparison.
#[derive(Debug, Default, Clone)]
pub(crate) struct KeyIndex<K: Ord + Copy> {
    sorted: Vec<(K, u32)>,
    tail: Vec<(K, u32)>,
    /// Until the generator seals the store, inserts only append: sorting once at the end keeps
    /// generating a million users linear instead of re-sorting the index every few thousand.
    sealed: bool,
}

impl<K: Ord + Copy> KeyIndex<K> {
    fn insert(&mut self, k: K, idx: u32) {
        self.tail.push((k, idx));
        // After sealing, keep the unsorted tail short so lookups stay fast after many writes;
        // merging costs one sort of nearly sorted data per 4096 writes.
        if self.sealed && self.tail.len() > 4096 {
            self.seal();
        }
    }
    fn seal(&mut self) {
        self.sorted.append(&mut self.tail);
        self.sorted.sort_unstable();
        self.sealed = true;
    }
    fn get(&self, k: K) -> impl Iterator<Item = u32> + '_ {
        let start = self.sorted.partition_point(|e| e.0 < k);
        let sorted = self.sorted[start..]
            .iter()
            .take_while(move |e| e.0 == k)
            .map(|e| e.1);
        sorted.chain(self.tail.iter().filter(move |e| e.0 == k).map(|e| e.1))
    }
}

fn email_key(email: &str) -> u64 {
    use std::hash::BuildHasher;
    rustc_hash::FxBuildHasher.hash_one(email.to_lowercase())
}

#[derive(Debug, Clone)]
pub(crate) struct IdentRec {
    pub(crate) id: i64,
    pub(crate) kind: &'static str,
    pub(crate) value: Box<str>,
    pub(crate) verified: bool,
    pub(crate) created_at: i64,
    pub(crate) updated_at: i64,
}

/// Fields most users don't have, kept out of line.
#[derive(Debug, Clone, Default)]
pub(crate) struct UserExtra {
    pub(crate) external_id: Option<Box<str>>,
    pub(crate) user_fields: Vec<(u8, Value)>,
    pub(crate) identities: Vec<IdentRec>,
    pub(crate) tags: Vec<Box<str>>,
}

#[derive(Debug, Clone)]
pub(crate) struct UserRec {
    pub(crate) id: i64,
    pub(crate) name: Box<str>,
    pub(crate) email: Option<Box<str>>,
    pub(crate) phone: Option<Box<str>>,
    pub(crate) organization_id: i64,
    pub(crate) created_at: i64,
    pub(crate) updated_at: i64,
    /// Id of the primary email identity (0: none yet).
    pub(crate) email_ident: i64,
    /// Id of the identity backing `phone` (0: none yet). Shared numbers have no identity: Zendesk
    /// keeps an identity per direct line only.
    pub(crate) phone_ident: i64,
    pub(crate) log_pos: u32,
    pub(crate) role: Role,
    pub(crate) active: bool,
    pub(crate) suspended: bool,
    pub(crate) shared_phone: bool,
    pub(crate) extra: Option<Box<UserExtra>>,
}

impl UserRec {
    pub(crate) fn extra_mut(&mut self) -> &mut UserExtra {
        self.extra.get_or_insert_with(Default::default)
    }
    pub(crate) fn external_id(&self) -> Option<&str> {
        self.extra.as_ref().and_then(|e| e.external_id.as_deref())
    }
    /// The identities Zendesk would list: primary email, the direct-line phone, then extras.
    /// Deleted users have none.
    pub(crate) fn identities(&self) -> impl Iterator<Item = IdentView<'_>> {
        let live = self.active;
        let email = self
            .email
            .as_deref()
            .filter(|_| live && self.email_ident != 0)
            .map(|v| IdentView {
                id: self.email_ident,
                user_id: self.id,
                kind: "email",
                value: v,
                verified: true,
                primary: true,
                created_at: self.created_at,
                updated_at: self.created_at,
            });
        let phone = self
            .phone
            .as_deref()
            .filter(|_| live && self.phone_ident != 0 && !self.shared_phone)
            .map(|v| IdentView {
                id: self.phone_ident,
                user_id: self.id,
                kind: "phone_number",
                value: v,
                verified: true,
                primary: true,
                created_at: self.created_at,
                updated_at: self.updated_at,
            });
        let extras = self
            .extra
            .iter()
            .flat_map(|e| e.identities.iter())
            .filter(move |_| live)
            .map(|i| IdentView {
                id: i.id,
                user_id: self.id,
                kind: i.kind,
                value: &i.value,
                verified: i.verified,
                primary: false,
                created_at: i.created_at,
                updated_at: i.updated_at,
            });
        email.into_iter().chain(phone).chain(extras)
    }
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct IdentView<'a> {
    pub(crate) id: i64,
    pub(crate) user_id: i64,
    pub(crate) kind: &'static str,
    pub(crate) value: &'a str,
    pub(crate) verified: bool,
    pub(crate) primary: bool,
    pub(crate) created_at: i64,
    pub(crate) updated_at: i64,
}

#[derive(Debug, Clone, Default)]
pub(crate) struct TicketExtra {
    pub(crate) custom_fields: Vec<(u8, Value)>,
    pub(crate) tags: Vec<Box<str>>,
    pub(crate) external_id: Option<Box<str>>,
    pub(crate) description: Option<Box<str>>,
}

#[derive(Debug, Clone)]
pub(crate) struct TicketRec {
    pub(crate) id: i64,
    pub(crate) subject: Box<str>,
    pub(crate) requester_id: i64,
    pub(crate) submitter_id: i64,
    pub(crate) assignee_id: i64,
    pub(crate) organization_id: i64,
    pub(crate) created_at: i64,
    pub(crate) updated_at: i64,
    /// The export clock: bumped by every change, including system ones that leave `updated_at`.
    pub(crate) generated_timestamp: i64,
    pub(crate) log_pos: u32,
    pub(crate) status: Status,
    /// Index into [`PRIORITIES`] + 1 (0: none).
    pub(crate) priority: u8,
    /// Index into [`TYPES`] + 1 (0: none).
    pub(crate) kind: u8,
    /// Index into [`VIAS`].
    pub(crate) via: u8,
    pub(crate) is_public: bool,
    pub(crate) extra: Option<Box<TicketExtra>>,
}

impl TicketRec {
    pub(crate) fn extra_mut(&mut self) -> &mut TicketExtra {
        self.extra.get_or_insert_with(Default::default)
    }
    pub(crate) fn description(&self) -> &str {
        self.extra
            .as_ref()
            .and_then(|e| e.description.as_deref())
            .unwrap_or(&self.subject)
    }
}

#[derive(Debug, Clone)]
pub(crate) struct OrgRec {
    pub(crate) id: i64,
    pub(crate) name: Box<str>,
    pub(crate) external_id: Option<Box<str>>,
    pub(crate) created_at: i64,
    pub(crate) updated_at: i64,
    pub(crate) deleted_at: Option<i64>,
    pub(crate) fields: Vec<(u8, Value)>,
    pub(crate) log_pos: u32,
}

#[derive(Debug, Clone)]
pub(crate) struct CommentRec {
    pub(crate) id: i64,
    pub(crate) body: Box<str>,
    pub(crate) html: bool,
    pub(crate) public: bool,
    pub(crate) author_id: i64,
    pub(crate) created_at: i64,
    pub(crate) via: u8,
}

/// A custom field definition.
#[derive(Debug, Clone)]
pub(crate) struct FieldRec {
    pub(crate) id: i64,
    pub(crate) key: &'static str,
    pub(crate) title: &'static str,
    pub(crate) kind: &'static str,
}

pub(crate) const USER_FIELDS: [FieldRec; 5] = [
    FieldRec {
        id: 360_010_001,
        key: "utm_source",
        title: "UTM source",
        kind: "text",
    },
    FieldRec {
        id: 360_010_002,
        key: "utm_medium",
        title: "UTM medium",
        kind: "text",
    },
    FieldRec {
        id: 360_010_003,
        key: "utm_campaign",
        title: "UTM campaign",
        kind: "text",
    },
    FieldRec {
        id: 360_010_004,
        key: "utm_term",
        title: "UTM term",
        kind: "text",
    },
    FieldRec {
        id: 360_010_005,
        key: "utm_content",
        title: "UTM content",
        kind: "text",
    },
];
pub(crate) const ORG_FIELDS: [FieldRec; 2] = [
    FieldRec {
        id: 360_020_001,
        key: "scheme",
        title: "Forwarding scheme",
        kind: "text",
    },
    FieldRec {
        id: 360_020_002,
        key: "line_number",
        title: "Line number",
        kind: "text",
    },
];
/// Ids of the system ticket fields (`subject`, `status`, …) are `SYSTEM_FIELD_BASE + 1..=8`.
pub(crate) const SYSTEM_FIELD_BASE: i64 = 360_000_001_000;
/// The account's custom ticket fields (addressed by id in `custom_fields`).
pub(crate) const TICKET_FIELDS: [FieldRec; 5] = [
    FieldRec {
        id: 360_001_111,
        key: "utm_source",
        title: "UTM source",
        kind: "text",
    },
    FieldRec {
        id: 360_002_222,
        key: "utm_medium",
        title: "UTM medium",
        kind: "text",
    },
    FieldRec {
        id: 360_003_333,
        key: "utm_campaign",
        title: "UTM campaign",
        kind: "text",
    },
    FieldRec {
        id: 360_004_444,
        key: "line_number",
        title: "Line number",
        kind: "text",
    },
    FieldRec {
        id: 360_005_555,
        key: "scheme",
        title: "Forwarding scheme",
        kind: "text",
    },
];

/// Input of [`Store::create_user`].
#[derive(Debug, Clone, Default)]
pub struct NewUser {
    pub name: String,
    pub email: Option<String>,
    pub phone: Option<String>,
    /// `None`: end-user.
    pub role: Option<Role>,
    pub organization_id: Option<i64>,
    pub external_id: Option<String>,
    pub shared_phone_number: bool,
    pub suspended: bool,
    /// Keyed by field key; unknown keys are ignored like Zendesk does.
    pub user_fields: Map<String, Value>,
}

/// Input of [`Store::update_user`]: `None` leaves a field alone; `Some(None)` clears it.
#[derive(Debug, Clone, Default)]
pub struct UserPatch {
    pub name: Option<String>,
    pub email: Option<Option<String>>,
    pub phone: Option<Option<String>>,
    pub role: Option<Role>,
    /// `false` deletes the user the way Zendesk does (soft: `active:false`, email scrubbed).
    pub active: Option<bool>,
    pub suspended: Option<bool>,
    pub shared_phone_number: Option<bool>,
    pub organization_id: Option<Option<i64>>,
    pub external_id: Option<Option<String>>,
    /// Merged into the user's fields (Zendesk merges, it doesn't replace); unknown keys ignored.
    pub user_fields: Option<Map<String, Value>>,
}

/// Input of [`Store::create_ticket`].
#[derive(Debug, Clone)]
pub struct NewTicket {
    pub subject: String,
    /// The first comment.
    pub comment: String,
    pub comment_public: bool,
    pub requester_id: i64,
    pub submitter_id: Option<i64>,
    pub assignee_id: Option<i64>,
    pub organization_id: Option<i64>,
    pub status: Option<Status>,
    pub priority: Option<String>,
    pub kind: Option<String>,
    /// Keyed by numeric field id.
    pub custom_fields: Vec<(i64, Value)>,
    pub tags: Vec<String>,
    pub via: Option<String>,
}

impl Default for NewTicket {
    fn default() -> Self {
        Self {
            subject: "Test ticket".into(),
            comment: "Test ticket".into(),
            comment_public: true,
            requester_id: 0,
            submitter_id: None,
            assignee_id: None,
            organization_id: None,
            status: None,
            priority: None,
            kind: None,
            custom_fields: Vec::new(),
            tags: Vec::new(),
            via: None,
        }
    }
}

/// Input of [`Store::update_ticket`]. `updated_at` overrides the stamp (tests of "most recently
/// updated" rules); `system_update` bumps only the export clock, as Zendesk's system updates do.
#[derive(Debug, Clone, Default)]
pub struct TicketPatch {
    pub subject: Option<String>,
    pub status: Option<Status>,
    pub assignee_id: Option<Option<i64>>,
    pub requester_id: Option<i64>,
    pub organization_id: Option<Option<i64>>,
    pub priority: Option<Option<String>>,
    pub kind: Option<Option<String>>,
    pub custom_fields: Vec<(i64, Value)>,
    pub updated_at: Option<i64>,
    pub system_update: bool,
}

/// A comment to append with [`Store::add_comment`].
#[derive(Debug, Clone)]
pub struct NewComment {
    pub body: String,
    pub html: bool,
    pub public: Option<bool>,
    pub author_id: Option<i64>,
}

/// Why a store write was refused (the HTTP layer turns it into Zendesk's 404/422 bodies).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum StoreError {
    #[error("not found")]
    NotFound,
    /// `field`: Zendesk's detail key; `code`: its error code (`DuplicateValue`, `InvalidValue`, …).
    #[error("{field}: {description}")]
    Invalid {
        field: &'static str,
        code: &'static str,
        description: String,
    },
}

impl StoreError {
    pub(crate) fn invalid(field: &'static str, code: &'static str, d: impl Into<String>) -> Self {
        StoreError::Invalid {
            field,
            code,
            description: d.into(),
        }
    }
}

/// A Talk Partner Edition call record, kept as sent (plus the server-side fields).
#[derive(Debug, Clone)]
pub struct CallRecord {
    pub id: i64,
    pub created_at: i64,
    /// The full `call` object as the API returns it.
    pub call: Map<String, Value>,
}

/// All the simulated account's data. See the module doc for the invariants.
#[derive(Debug, Default, Clone)]
pub struct Store {
    pub(crate) users: Vec<UserRec>,
    pub(crate) orgs: Vec<OrgRec>,
    pub(crate) tickets: Vec<TicketRec>,
    pub(crate) user_log: ChangeLog,
    pub(crate) ticket_log: ChangeLog,
    pub(crate) org_log: ChangeLog,
    pub(crate) comments: FxHashMap<i64, Vec<CommentRec>>,
    pub(crate) calls: Vec<CallRecord>,
    phones: KeyIndex<u32>,
    emails: KeyIndex<u64>,
    pub(crate) org_names: FxHashMap<String, u32>,
    /// Last stamp handed out (Unix ms); the clock never goes back below it.
    last_ms: i64,
    next_identity: i64,
    next_comment: i64,
    /// Records changed since the webhook dispatcher last looked (only while one runs: `changed`).
    pub(crate) dirty: Vec<Dirty>,
    /// Woken on every change when webhook delivery runs (see `crate::webhooks`).
    pub(crate) changed: Option<std::sync::Arc<tokio::sync::Notify>>,
    /// Users merged away (loser → winner), so the dispatcher can tell a merge from a deletion.
    pub(crate) merged_into: FxHashMap<i64, i64>,
}

/// A record changed by a write, for the webhook dispatcher to diff against what it last saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Dirty {
    User(i64),
    Ticket(i64),
}

impl Store {
    pub fn new() -> Self {
        Self {
            next_identity: IDENTITY_BASE + 1,
            next_comment: COMMENT_BASE + 1,
            ..Default::default()
        }
    }

    /// A monotone "now" in Unix ms for stamping a change.
    pub(crate) fn stamp(&mut self) -> i64 {
        self.last_ms = self.last_ms.max(now_ms());
        self.last_ms
    }

    pub(crate) fn next_identity_id(&mut self) -> i64 {
        let id = self.next_identity;
        self.next_identity += 1;
        id
    }

    // ---- lookups -------------------------------------------------------------------------------

    pub(crate) fn user_idx(&self, id: i64) -> Option<usize> {
        let i = id.checked_sub(USER_BASE + 1)?;
        (0..self.users.len() as i64)
            .contains(&i)
            .then_some(i as usize)
    }
    pub(crate) fn user_rec(&self, id: i64) -> Option<&UserRec> {
        self.user_idx(id).map(|i| &self.users[i])
    }
    pub(crate) fn org_idx(&self, id: i64) -> Option<usize> {
        let i = id.checked_sub(ORG_BASE + 1)?;
        (0..self.orgs.len() as i64)
            .contains(&i)
            .then_some(i as usize)
    }
    pub(crate) fn org_rec(&self, id: i64) -> Option<&OrgRec> {
        self.org_idx(id).map(|i| &self.orgs[i])
    }
    pub(crate) fn ticket_idx(&self, id: i64) -> Option<usize> {
        let i = id.checked_sub(1)?;
        (0..self.tickets.len() as i64)
            .contains(&i)
            .then_some(i as usize)
    }
    pub(crate) fn ticket_rec(&self, id: i64) -> Option<&TicketRec> {
        self.ticket_idx(id).map(|i| &self.tickets[i])
    }

    /// Live users whose email matches, case-insensitively.
    pub(crate) fn user_by_email(&self, email: &str) -> Option<&UserRec> {
        self.emails
            .get(email_key(email))
            .map(|i| &self.users[i as usize])
            .find(|u| {
                u.active
                    && u.email.as_deref().is_some_and(|e| {
                        e.eq_ignore_ascii_case(email) || e.to_lowercase() == email.to_lowercase()
                    })
            })
    }

    pub(crate) fn user_by_external_id(&self, ext: &str) -> Option<&UserRec> {
        self.users
            .iter()
            .find(|u| u.active && u.external_id().is_some_and(|e| e.eq_ignore_ascii_case(ext)))
    }

    /// Indices of users whose `phone` or a phone identity matches `digits` (exact digits, or a
    /// suffix match when `suffix`). Includes deleted users; callers filter.
    pub(crate) fn users_by_digits(&self, digits: &str, suffix: bool) -> Vec<u32> {
        let matches = |stored: &str| {
            let d = phone_digits(stored);
            if suffix {
                d.ends_with(digits)
            } else {
                d == digits
            }
        };
        let hit = |u: &UserRec| {
            u.phone.as_deref().is_some_and(matches)
                || u.identities()
                    .any(|i| i.kind == "phone_number" && matches(i.value))
        };
        let mut out: Vec<u32> = match suffix_key(digits) {
            Some(k) => self
                .phones
                .get(k)
                .filter(|&i| hit(&self.users[i as usize]))
                .collect(),
            None => (0..self.users.len() as u32)
                .filter(|&i| hit(&self.users[i as usize]))
                .collect(),
        };
        out.sort_unstable();
        out.dedup();
        out
    }

    fn index_user_phones(&mut self, idx: u32) {
        let u = &self.users[idx as usize];
        let mut keys: Vec<u32> = u
            .phone
            .iter()
            .map(|p| &**p)
            .chain(
                u.extra
                    .iter()
                    .flat_map(|e| e.identities.iter())
                    .map(|i| &*i.value),
            )
            .filter_map(|p| suffix_key(&phone_digits(p)))
            .collect();
        keys.dedup();
        for k in keys {
            self.phones.insert(k, idx);
        }
    }

    // ---- generator support ---------------------------------------------------------------------

    /// Appends a generated user as it is (no stamping). The generator calls [`Store::seal`] after.
    pub(crate) fn push_user(&mut self, mut u: UserRec) -> i64 {
        let idx = self.users.len() as u32;
        u.id = USER_BASE + 1 + idx as i64;
        if u.email.is_some() && u.email_ident == 0 {
            u.email_ident = self.next_identity_id();
        }
        if u.phone.is_some() && u.phone_ident == 0 && !u.shared_phone {
            u.phone_ident = self.next_identity_id();
        }
        let id = u.id;
        if let Some(e) = &u.email {
            self.emails.insert(email_key(e), idx);
        }
        self.users.push(u);
        self.index_user_phones(idx);
        id
    }

    pub(crate) fn push_org(&mut self, mut o: OrgRec) -> i64 {
        let idx = self.orgs.len() as u32;
        o.id = ORG_BASE + 1 + idx as i64;
        self.org_names.insert(o.name.to_lowercase(), idx);
        let id = o.id;
        self.orgs.push(o);
        id
    }

    pub(crate) fn push_ticket(&mut self, mut t: TicketRec) -> i64 {
        t.id = self.tickets.len() as i64 + 1;
        let id = t.id;
        self.tickets.push(t);
        id
    }

    /// Builds the change logs in time order and the lookup indices, after generation.
    pub(crate) fn seal(&mut self) {
        fn build<T>(
            recs: &mut [T],
            time: impl Fn(&T) -> i64,
            pos: impl Fn(&mut T) -> &mut u32,
        ) -> ChangeLog {
            let mut order: Vec<(i64, u32)> = recs
                .iter()
                .enumerate()
                .map(|(i, r)| (time(r) * 1000, i as u32))
                .collect();
            order.sort_unstable();
            for (p, &(_, i)) in order.iter().enumerate() {
                *pos(&mut recs[i as usize]) = p as u32;
            }
            ChangeLog { entries: order }
        }
        self.user_log = build(&mut self.users, |u| u.updated_at, |u| &mut u.log_pos);
        self.ticket_log = build(
            &mut self.tickets,
            |t| t.generated_timestamp,
            |t| &mut t.log_pos,
        );
        self.org_log = build(&mut self.orgs, |o| o.updated_at, |o| &mut o.log_pos);
        self.phones.seal();
        self.emails.seal();
        let last = [&self.user_log, &self.ticket_log, &self.org_log]
            .iter()
            .filter_map(|l| l.entries.last().map(|e| e.0))
            .max()
            .unwrap_or(0);
        self.last_ms = self.last_ms.max(last);
    }

    fn touch_user(&mut self, idx: usize) -> i64 {
        let ms = self.stamp();
        let pos = self.user_log.push(ms, idx as u32);
        let u = &mut self.users[idx];
        u.updated_at = ms / 1000;
        u.log_pos = pos;
        let id = u.id;
        self.mark(Dirty::User(id));
        ms
    }

    fn mark(&mut self, d: Dirty) {
        if let Some(n) = &self.changed {
            self.dirty.push(d);
            n.notify_one();
        }
    }

    fn touch_org(&mut self, idx: usize) {
        let ms = self.stamp();
        let pos = self.org_log.push(ms, idx as u32);
        let o = &mut self.orgs[idx];
        o.updated_at = ms / 1000;
        o.log_pos = pos;
    }

    fn touch_ticket(&mut self, idx: usize, updated_at: Option<i64>, system: bool) {
        let ms = self.stamp();
        let pos = self.ticket_log.push(ms, idx as u32);
        let t = &mut self.tickets[idx];
        t.generated_timestamp = ms / 1000;
        if !system {
            t.updated_at = updated_at.unwrap_or(ms / 1000);
        }
        t.log_pos = pos;
        let id = t.id;
        if !system {
            self.mark(Dirty::Ticket(id));
        }
    }

    // ---- public reads --------------------------------------------------------------------------

    pub fn user_count(&self) -> usize {
        self.users.len()
    }
    pub fn ticket_count(&self) -> usize {
        self.tickets.len()
    }
    pub fn org_count(&self) -> usize {
        self.orgs.len()
    }
    /// Every user id, in id order.
    pub fn user_ids(&self) -> impl Iterator<Item = i64> + '_ {
        self.users.iter().map(|u| u.id)
    }
    /// Every ticket id, in id order.
    pub fn ticket_ids(&self) -> impl Iterator<Item = i64> + '_ {
        self.tickets.iter().map(|t| t.id)
    }
    /// Every organization id, in id order.
    pub fn org_ids(&self) -> impl Iterator<Item = i64> + '_ {
        self.orgs.iter().map(|o| o.id)
    }

    /// A user as the API shows it to an admin (deleted users: `email` null; `phone` kept). `url` is
    /// left `None`: the store does not know the address it is served on.
    pub fn user(&self, id: i64) -> Option<wire::User> {
        let u = self.user_rec(id)?;
        let extra = u.extra.as_deref();
        Some(wire::User {
            id: u.id,
            url: None,
            name: Some(u.name.to_string()),
            email: u.email.as_deref().filter(|_| u.active).map(Into::into),
            phone: u.phone.as_deref().map(Into::into),
            shared_phone_number: u.phone.as_ref().map(|_| u.shared_phone),
            role: Some(u.role.as_str().into()),
            organization_id: (u.organization_id != 0).then_some(u.organization_id),
            external_id: u.external_id().map(Into::into),
            active: Some(u.active),
            suspended: Some(u.suspended),
            verified: Some(u.email.is_some()),
            permanently_deleted: (!u.active).then_some(false),
            tags: Some(tags_vec(extra.map(|e| &e.tags[..]))),
            time_zone: Some(TIME_ZONE.0.into()),
            iana_time_zone: Some(TIME_ZONE.1.into()),
            locale: Some(LOCALE.into()),
            created_at: Some(wire::format_time(u.created_at)),
            updated_at: Some(wire::format_time(u.updated_at)),
            user_fields: Some(user_fields_map(u)),
        })
    }

    /// All identities of a user (none once deleted); `url` left `None` as in [`Store::user`].
    pub fn identities(&self, user_id: i64) -> Vec<wire::Identity> {
        self.user_rec(user_id)
            .map(|u| {
                u.identities()
                    .map(|i| wire::Identity {
                        id: i.id,
                        url: None,
                        user_id: i.user_id,
                        kind: Some(i.kind.into()),
                        value: Some(i.value.into()),
                        verified: Some(i.verified),
                        primary: Some(i.primary),
                        created_at: Some(wire::format_time(i.created_at)),
                        updated_at: Some(wire::format_time(i.updated_at)),
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Users (with their identities) matching `pred`, at most `limit`, in id order: the way tests pick
    /// examples out of generated data.
    pub fn find_users(
        &self,
        limit: usize,
        mut pred: impl FnMut(&wire::User, &[wire::Identity]) -> bool,
    ) -> Vec<(wire::User, Vec<wire::Identity>)> {
        let mut out = Vec::new();
        for u in &self.users {
            if out.len() >= limit {
                break;
            }
            let (Some(user), ids) = (self.user(u.id), self.identities(u.id)) else {
                continue;
            };
            if pred(&user, &ids) {
                out.push((user, ids));
            }
        }
        out
    }

    /// Ids of users whose phone or a phone identity has these digits (non-digits in `digits` and in
    /// the stored values are ignored). Deleted users included.
    pub fn find_users_by_phone_digits(&self, digits: &str) -> Vec<i64> {
        let d = phone_digits(digits);
        if d.is_empty() {
            return Vec::new();
        }
        self.users_by_digits(&d, false)
            .into_iter()
            .map(|i| self.users[i as usize].id)
            .collect()
    }

    /// A ticket as an export row shows it (with `generated_timestamp`; `url` left `None`).
    pub fn ticket(&self, id: i64) -> Option<wire::Ticket> {
        let t = self.ticket_rec(id)?;
        let opt = |v: i64| (v != 0).then_some(v);
        let extra = t.extra.as_deref();
        Some(wire::Ticket {
            id: t.id,
            url: None,
            external_id: extra.and_then(|e| e.external_id.as_deref()).map(Into::into),
            via: Some(wire::Via {
                channel: Some(VIAS[t.via as usize % VIAS.len()].into()),
                source: Some(serde_json::json!({ "from": {}, "to": {}, "rel": null })),
            }),
            subject: Some(t.subject.to_string()),
            raw_subject: Some(t.subject.to_string()),
            description: Some(t.description().to_string()),
            status: Some(t.status.as_str().into()),
            priority: priority_str(t.priority).map(Into::into),
            kind: type_str(t.kind).map(Into::into),
            requester_id: opt(t.requester_id),
            submitter_id: opt(t.submitter_id),
            assignee_id: opt(t.assignee_id),
            organization_id: opt(t.organization_id),
            group_id: group_of(t),
            is_public: Some(t.is_public),
            custom_status_id: Some(custom_status_id(t.status)),
            tags: Some(tags_vec(extra.map(|e| &e.tags[..]))),
            custom_fields: Some(
                ticket_custom_fields(t)
                    .map(|(id, v)| wire::CustomField {
                        id,
                        value: v.clone(),
                    })
                    .collect(),
            ),
            created_at: Some(wire::format_time(t.created_at)),
            updated_at: Some(wire::format_time(t.updated_at)),
            generated_timestamp: Some(t.generated_timestamp),
        })
    }

    /// Tickets matching `pred`, at most `limit`, in id order.
    pub fn find_tickets(
        &self,
        limit: usize,
        mut pred: impl FnMut(&wire::Ticket) -> bool,
    ) -> Vec<wire::Ticket> {
        self.tickets
            .iter()
            .filter_map(|t| self.ticket(t.id))
            .filter(|t| pred(t))
            .take(limit)
            .collect()
    }

    /// Ids of tickets requested by a user, in id order (linear scan; fine for tests).
    pub fn tickets_of_requester(&self, user_id: i64) -> Vec<i64> {
        self.tickets
            .iter()
            .filter(|t| t.requester_id == user_id)
            .map(|t| t.id)
            .collect()
    }

    /// An organization (deleted ones carry `deleted_at`; `url` left `None`).
    pub fn organization(&self, id: i64) -> Option<wire::Organization> {
        let o = self.org_rec(id)?;
        Some(wire::Organization {
            id: o.id,
            url: None,
            name: Some(o.name.to_string()),
            external_id: o.external_id.as_deref().map(Into::into),
            tags: Some(Vec::new()),
            created_at: Some(wire::format_time(o.created_at)),
            updated_at: Some(wire::format_time(o.updated_at)),
            deleted_at: o.deleted_at.map(wire::format_time),
            organization_fields: Some(org_fields_map(o)),
        })
    }

    pub fn organization_by_name(&self, name: &str) -> Option<i64> {
        self.org_names
            .get(&name.to_lowercase())
            .map(|&i| self.orgs[i as usize].id)
    }

    /// A ticket's comments, oldest first (the first is the description), as the API lists them.
    pub fn comments(&self, ticket_id: i64) -> Vec<wire::Comment> {
        self.comment_recs(ticket_id)
            .into_iter()
            .map(|c| {
                let (plain, html) = comment_bodies(&c);
                wire::Comment {
                    id: c.id,
                    kind: Some("Comment".into()),
                    author_id: Some(c.author_id),
                    body: Some(plain.clone()),
                    html_body: Some(html),
                    plain_body: Some(plain),
                    public: Some(c.public),
                    created_at: Some(wire::format_time(c.created_at)),
                }
            })
            .collect()
    }

    /// Generated tickets carry their description only; it is shown as the first comment.
    pub(crate) fn comment_recs(&self, ticket_id: i64) -> Vec<CommentRec> {
        if let Some(c) = self.comments.get(&ticket_id) {
            return c.clone();
        }
        match self.ticket_rec(ticket_id) {
            Some(t) => vec![CommentRec {
                id: FIRST_COMMENT_BASE + t.id,
                body: t.description().into(),
                html: false,
                public: t.is_public,
                author_id: t.submitter_id,
                created_at: t.created_at,
                via: t.via,
            }],
            None => Vec::new(),
        }
    }

    /// Every call record posted, oldest first.
    pub fn calls(&self) -> &[CallRecord] {
        &self.calls
    }

    // ---- public writes -------------------------------------------------------------------------

    pub fn create_user(&mut self, n: NewUser) -> Result<i64, StoreError> {
        let name = n.name.trim();
        if name.is_empty() {
            return Err(StoreError::invalid(
                "name",
                "BlankValue",
                "Name:  cannot be blank",
            ));
        }
        if let Some(e) = n.email.as_deref() {
            if !e.contains('@') {
                return Err(StoreError::invalid(
                    "email",
                    "InvalidValue",
                    format!("Email: {e} is not properly formatted"),
                ));
            }
            if self.user_by_email(e).is_some() {
                return Err(StoreError::invalid(
                    "email",
                    "DuplicateValue",
                    format!("Email: {e} is already being used by another user"),
                ));
            }
        }
        if let Some(o) = n.organization_id {
            self.org_rec(o).ok_or_else(|| {
                StoreError::invalid("organization_id", "InvalidValue", "Organization is invalid")
            })?;
        }
        let mut extra = UserExtra {
            external_id: n.external_id.map(Into::into),
            ..Default::default()
        };
        extra.user_fields = merge_fields(&USER_FIELDS, Vec::new(), &n.user_fields);
        let now = self.stamp() / 1000;
        let rec = UserRec {
            id: 0,
            name: name.into(),
            email: n.email.map(Into::into),
            phone: n.phone.filter(|p| !p.trim().is_empty()).map(Into::into),
            organization_id: n.organization_id.unwrap_or(0),
            created_at: now,
            updated_at: now,
            email_ident: 0,
            phone_ident: 0,
            log_pos: 0,
            role: n.role.unwrap_or(Role::EndUser),
            active: true,
            suspended: n.suspended,
            shared_phone: n.shared_phone_number,
            extra: (extra.external_id.is_some() || !extra.user_fields.is_empty())
                .then(|| Box::new(extra)),
        };
        let id = self.push_user(rec);
        let idx = self.users.len() - 1;
        self.touch_user(idx);
        Ok(id)
    }

    pub fn update_user(&mut self, id: i64, p: UserPatch) -> Result<(), StoreError> {
        let idx = self.user_idx(id).ok_or(StoreError::NotFound)?;
        if let Some(Some(o)) = p.organization_id {
            self.org_rec(o).ok_or_else(|| {
                StoreError::invalid("organization_id", "InvalidValue", "Organization is invalid")
            })?;
        }
        if let Some(Some(e)) = &p.email {
            if self.user_by_email(e).is_some_and(|u| u.id != id) {
                return Err(StoreError::invalid(
                    "email",
                    "DuplicateValue",
                    format!("Email: {e} is already being used by another user"),
                ));
            }
        }
        if let Some(n) = &p.name {
            if n.trim().is_empty() {
                return Err(StoreError::invalid(
                    "name",
                    "BlankValue",
                    "Name:  cannot be blank",
                ));
            }
        }
        let mut new_email = None;
        let mut phone_changed = false;
        let mut need_email_ident = false;
        {
            let u = &mut self.users[idx];
            if let Some(n) = p.name {
                u.name = n.trim().into();
            }
            if let Some(e) = p.email {
                new_email = e.clone();
                need_email_ident = e.is_some() && u.email_ident == 0;
                u.email = e.map(Into::into);
            }
            if let Some(ph) = p.phone {
                u.phone = ph.filter(|p| !p.trim().is_empty()).map(Into::into);
                phone_changed = true;
            }
            if let Some(r) = p.role {
                u.role = r;
            }
            if let Some(a) = p.active {
                u.active = a;
            }
            if let Some(s) = p.suspended {
                u.suspended = s;
            }
            if let Some(s) = p.shared_phone_number {
                u.shared_phone = s;
            }
            if let Some(o) = p.organization_id {
                u.organization_id = o.unwrap_or(0);
            }
            if let Some(x) = p.external_id {
                u.extra_mut().external_id = x.map(Into::into);
            }
            if let Some(f) = p.user_fields {
                let old = std::mem::take(&mut u.extra_mut().user_fields);
                u.extra_mut().user_fields = merge_fields(&USER_FIELDS, old, &f);
            }
        }
        if need_email_ident {
            self.users[idx].email_ident = self.next_identity_id();
        }
        if let Some(e) = new_email {
            self.emails.insert(email_key(&e), idx as u32);
        }
        if phone_changed {
            let u = &self.users[idx];
            if u.phone.is_some() && u.phone_ident == 0 && !u.shared_phone {
                self.users[idx].phone_ident = self.next_identity_id();
            }
            self.index_user_phones(idx as u32);
        }
        self.touch_user(idx);
        Ok(())
    }

    /// Soft-deletes a user the way Zendesk does: `active:false`, identities gone, email scrubbed in
    /// API output.
    pub fn delete_user(&mut self, id: i64) -> Result<(), StoreError> {
        self.update_user(
            id,
            UserPatch {
                active: Some(false),
                ..Default::default()
            },
        )
    }

    /// Adds an identity (`phone_number`, `email`, …) to a user. Returns the identity id.
    pub fn add_identity(
        &mut self,
        user_id: i64,
        kind: &str,
        value: &str,
    ) -> Result<i64, StoreError> {
        let idx = self.user_idx(user_id).ok_or(StoreError::NotFound)?;
        let kind: &'static str = match kind {
            "phone_number" => "phone_number",
            "email" => "email",
            "twitter" => "twitter",
            "facebook" => "facebook",
            "google" => "google",
            "agent_forwarding" => "agent_forwarding",
            "any_channel" => "any_channel",
            "foreign" => "foreign",
            "sdk" => "sdk",
            _ => {
                return Err(StoreError::invalid(
                    "type",
                    "InvalidValue",
                    format!("Type: {kind} is invalid"),
                ));
            }
        };
        let value = value.trim();
        if value.is_empty() {
            return Err(StoreError::invalid(
                "value",
                "BlankValue",
                "Value: cannot be blank",
            ));
        }
        if kind == "email" && self.user_by_email(value).is_some() {
            return Err(StoreError::invalid(
                "value",
                "DuplicateValue",
                format!("Value: {value} is already being used by another user"),
            ));
        }
        let id = self.next_identity_id();
        let now = self.stamp() / 1000;
        self.users[idx].extra_mut().identities.push(IdentRec {
            id,
            kind,
            value: value.into(),
            verified: kind != "email",
            created_at: now,
            updated_at: now,
        });
        if kind == "phone_number" {
            self.index_user_phones(idx as u32);
        } else if kind == "email" {
            self.emails.insert(email_key(value), idx as u32);
        }
        self.touch_user(idx);
        Ok(id)
    }

    /// Changes the value of one of the user's extra identities (the ones [`Store::add_identity`]
    /// added).
    pub fn update_identity(
        &mut self,
        user_id: i64,
        identity_id: i64,
        value: &str,
    ) -> Result<(), StoreError> {
        let idx = self.user_idx(user_id).ok_or(StoreError::NotFound)?;
        let now = self.stamp() / 1000;
        let ident = self.users[idx]
            .extra_mut()
            .identities
            .iter_mut()
            .find(|i| i.id == identity_id)
            .ok_or(StoreError::NotFound)?;
        ident.value = value.trim().into();
        ident.updated_at = now;
        self.index_user_phones(idx as u32);
        self.touch_user(idx);
        Ok(())
    }

    /// Removes one of the user's extra identities.
    pub fn remove_identity(&mut self, user_id: i64, identity_id: i64) -> Result<(), StoreError> {
        let idx = self.user_idx(user_id).ok_or(StoreError::NotFound)?;
        let list = &mut self.users[idx].extra_mut().identities;
        let before = list.len();
        list.retain(|i| i.id != identity_id);
        if list.len() == before {
            return Err(StoreError::NotFound);
        }
        self.touch_user(idx);
        Ok(())
    }

    /// Merges end-user `loser` into `winner` the way Zendesk does: the loser's tickets get the
    /// winner as requester (system change: no ticket event fires) and the loser is deleted.
    pub fn merge_user(&mut self, loser: i64, winner: i64) -> Result<(), StoreError> {
        if self.user_rec(winner).is_none() || loser == winner {
            return Err(StoreError::NotFound);
        }
        for t in self.tickets_of_requester(loser) {
            let idx = self.ticket_idx(t).ok_or(StoreError::NotFound)?;
            self.tickets[idx].requester_id = winner;
            self.touch_ticket(idx, None, false);
        }
        self.merged_into.insert(loser, winner);
        self.delete_user(loser)
    }

    /// Adds a `phone_number` identity. Returns the identity id.
    pub fn add_phone_identity(&mut self, user_id: i64, value: &str) -> Result<i64, StoreError> {
        self.add_identity(user_id, "phone_number", value)
    }

    pub fn create_organization(
        &mut self,
        name: &str,
        external_id: Option<&str>,
    ) -> Result<i64, StoreError> {
        self.create_organization_with(name, external_id, &Map::new())
    }

    pub(crate) fn create_organization_with(
        &mut self,
        name: &str,
        external_id: Option<&str>,
        fields: &Map<String, Value>,
    ) -> Result<i64, StoreError> {
        let name = name.trim();
        if name.is_empty() {
            return Err(StoreError::invalid(
                "name",
                "BlankValue",
                "Name: cannot be blank",
            ));
        }
        if self.org_names.contains_key(&name.to_lowercase()) {
            return Err(StoreError::invalid(
                "name",
                "DuplicateValue",
                format!("Name: {name} has already been taken"),
            ));
        }
        let now = self.stamp() / 1000;
        let id = self.push_org(OrgRec {
            id: 0,
            name: name.into(),
            external_id: external_id.map(Into::into),
            created_at: now,
            updated_at: now,
            deleted_at: None,
            fields: merge_fields(&ORG_FIELDS, Vec::new(), fields),
            log_pos: 0,
        });
        self.touch_org(self.orgs.len() - 1);
        Ok(id)
    }

    /// Updates an organization's name, external id and fields (merged).
    pub fn update_organization(
        &mut self,
        id: i64,
        name: Option<&str>,
        external_id: Option<Option<&str>>,
        fields: &Map<String, Value>,
    ) -> Result<(), StoreError> {
        let idx = self.org_idx(id).ok_or(StoreError::NotFound)?;
        if let Some(n) = name.map(str::trim) {
            let key = n.to_lowercase();
            if self.org_names.get(&key).is_some_and(|&i| i as usize != idx) {
                return Err(StoreError::invalid(
                    "name",
                    "DuplicateValue",
                    format!("Name: {n} has already been taken"),
                ));
            }
            let old = self.orgs[idx].name.to_lowercase();
            self.org_names.remove(&old);
            self.org_names.insert(key, idx as u32);
            self.orgs[idx].name = n.into();
        }
        if let Some(x) = external_id {
            self.orgs[idx].external_id = x.map(Into::into);
        }
        let old = std::mem::take(&mut self.orgs[idx].fields);
        self.orgs[idx].fields = merge_fields(&ORG_FIELDS, old, fields);
        self.touch_org(idx);
        Ok(())
    }

    /// Deletes an organization (it then appears in the export with `deleted_at`).
    pub fn delete_organization(&mut self, id: i64) -> Result<(), StoreError> {
        let idx = self.org_idx(id).ok_or(StoreError::NotFound)?;
        let now = self.stamp() / 1000;
        let name = self.orgs[idx].name.to_lowercase();
        self.org_names.remove(&name);
        self.orgs[idx].deleted_at = Some(now);
        self.touch_org(idx);
        Ok(())
    }

    pub fn create_ticket(&mut self, n: NewTicket) -> Result<i64, StoreError> {
        let requester = self
            .user_rec(n.requester_id)
            .filter(|u| u.active)
            .ok_or_else(|| {
                StoreError::invalid("requester", "InvalidValue", "Requester is invalid")
            })?;
        let requester_org = requester.organization_id;
        if let Some(a) = n.assignee_id {
            self.user_rec(a)
                .filter(|u| u.active && u.role.is_staff())
                .ok_or_else(|| {
                    StoreError::invalid("assignee", "InvalidValue", "Assignee is invalid")
                })?;
        }
        let priority = parse_enum(&PRIORITIES, n.priority.as_deref(), "priority")?;
        let kind = parse_enum(&TYPES, n.kind.as_deref(), "type")?;
        let custom_fields = ticket_fields_from_pairs(Vec::new(), &n.custom_fields);
        let via = n
            .via
            .as_deref()
            .and_then(|v| VIAS.iter().position(|x| *x == v))
            .unwrap_or(3) as u8;
        let now = self.stamp() / 1000;
        let status = n.status.unwrap_or(if n.assignee_id.is_some() {
            Status::Open
        } else {
            Status::New
        });
        let submitter = n.submitter_id.unwrap_or(n.requester_id);
        let extra = TicketExtra {
            custom_fields,
            tags: n.tags.into_iter().map(Into::into).collect(),
            external_id: None,
            description: Some(n.comment.as_str().into()),
        };
        let id = self.push_ticket(TicketRec {
            id: 0,
            subject: n.subject.into(),
            requester_id: n.requester_id,
            submitter_id: submitter,
            assignee_id: n.assignee_id.unwrap_or(0),
            organization_id: n.organization_id.unwrap_or(requester_org),
            created_at: now,
            updated_at: now,
            generated_timestamp: now,
            log_pos: 0,
            status,
            priority,
            kind,
            via,
            is_public: n.comment_public,
            extra: Some(Box::new(extra)),
        });
        let cid = self.next_comment_id();
        self.comments.insert(
            id,
            vec![CommentRec {
                id: cid,
                body: n.comment.into(),
                html: false,
                public: n.comment_public,
                author_id: submitter,
                created_at: now,
                via,
            }],
        );
        self.touch_ticket(self.tickets.len() - 1, None, false);
        Ok(id)
    }

    fn next_comment_id(&mut self) -> i64 {
        let id = self.next_comment;
        self.next_comment += 1;
        id
    }

    pub fn update_ticket(&mut self, id: i64, p: TicketPatch) -> Result<(), StoreError> {
        let idx = self.ticket_idx(id).ok_or(StoreError::NotFound)?;
        let cur = self.tickets[idx].status;
        if cur == Status::Deleted {
            return Err(StoreError::NotFound);
        }
        if cur == Status::Closed && !p.system_update {
            return Err(StoreError::invalid(
                "status",
                "InvalidValue",
                "Status: closed prevents ticket update",
            ));
        }
        if let Some(Some(a)) = p.assignee_id {
            self.user_rec(a)
                .filter(|u| u.active && u.role.is_staff())
                .ok_or_else(|| {
                    StoreError::invalid("assignee", "InvalidValue", "Assignee is invalid")
                })?;
        }
        if let Some(r) = p.requester_id {
            self.user_rec(r).ok_or_else(|| {
                StoreError::invalid("requester", "InvalidValue", "Requester is invalid")
            })?;
        }
        let priority = match &p.priority {
            Some(v) => Some(parse_enum(&PRIORITIES, v.as_deref(), "priority")?),
            None => None,
        };
        let kind = match &p.kind {
            Some(v) => Some(parse_enum(&TYPES, v.as_deref(), "type")?),
            None => None,
        };
        let t = &mut self.tickets[idx];
        if let Some(s) = p.subject {
            t.subject = s.into();
        }
        if let Some(s) = p.status {
            t.status = s;
        }
        if let Some(a) = p.assignee_id {
            t.assignee_id = a.unwrap_or(0);
            if t.status == Status::New && a.is_some() && p.status.is_none() {
                t.status = Status::Open;
            }
        }
        if let Some(r) = p.requester_id {
            t.requester_id = r;
        }
        if let Some(o) = p.organization_id {
            t.organization_id = o.unwrap_or(0);
        }
        if let Some(v) = priority {
            t.priority = v;
        }
        if let Some(v) = kind {
            t.kind = v;
        }
        if !p.custom_fields.is_empty() {
            let old = std::mem::take(&mut t.extra_mut().custom_fields);
            t.extra_mut().custom_fields = ticket_fields_from_pairs(old, &p.custom_fields);
        }
        self.touch_ticket(idx, p.updated_at, p.system_update);
        Ok(())
    }

    /// One ticket update as `PUT /tickets/{id}` does it: the patch and an optional comment are
    /// validated together, so a refused update changes nothing. Returns the new comment's id.
    pub fn update_ticket_with_comment(
        &mut self,
        id: i64,
        p: TicketPatch,
        comment: Option<NewComment>,
    ) -> Result<Option<i64>, StoreError> {
        let idx = self.ticket_idx(id).ok_or(StoreError::NotFound)?;
        match self.tickets[idx].status {
            Status::Deleted => return Err(StoreError::NotFound),
            Status::Closed => {
                return Err(StoreError::invalid(
                    "status",
                    "InvalidValue",
                    "Status: closed prevents ticket update",
                ));
            }
            _ => {}
        }
        // Dry run on a copy so an invalid patch leaves no comment behind.
        let saved = self.tickets[idx].clone();
        let saved_pos = self.ticket_log.entries.len();
        self.update_ticket(id, p.clone())?;
        self.tickets[idx] = saved;
        self.ticket_log.entries.truncate(saved_pos);
        let cid = match comment {
            Some(c) => Some(self.add_comment(id, c)?),
            None => None,
        };
        self.update_ticket(id, p)?;
        Ok(cid)
    }

    /// Deletes a ticket (it then appears in the export as `status:"deleted"`).
    pub fn delete_ticket(&mut self, id: i64) -> Result<(), StoreError> {
        let idx = self.ticket_idx(id).ok_or(StoreError::NotFound)?;
        self.tickets[idx].status = Status::Deleted;
        self.touch_ticket(idx, None, false);
        Ok(())
    }

    /// Appends a comment. `public` defaults to the first comment's visibility (ZENDESK §4). Refused
    /// on closed or deleted tickets. Returns the comment id.
    pub fn add_comment(&mut self, ticket_id: i64, c: NewComment) -> Result<i64, StoreError> {
        let idx = self.ticket_idx(ticket_id).ok_or(StoreError::NotFound)?;
        match self.tickets[idx].status {
            Status::Deleted => return Err(StoreError::NotFound),
            Status::Closed => {
                return Err(StoreError::invalid(
                    "status",
                    "InvalidValue",
                    "Status: closed prevents ticket update",
                ));
            }
            _ => {}
        }
        let mut list = self.comment_recs(ticket_id);
        if list.len() >= 5000 {
            return Err(StoreError::invalid(
                "comment",
                "InvalidValue",
                "Comment: ticket has too many comments",
            ));
        }
        let first_public = list.first().map(|c| c.public).unwrap_or(true);
        let cid = self.next_comment_id();
        let now = self.stamp() / 1000;
        let t = &self.tickets[idx];
        list.push(CommentRec {
            id: cid,
            body: c.body.into(),
            html: c.html,
            public: c.public.unwrap_or(first_public),
            author_id: c.author_id.unwrap_or(t.assignee_id.max(t.submitter_id)),
            created_at: now,
            via: 3,
        });
        self.comments.insert(ticket_id, list);
        self.touch_ticket(idx, None, false);
        Ok(cid)
    }

    /// Stores a call record; fills `id`, `created_at`, `updated_at`. Returns the stored record.
    pub(crate) fn add_call(&mut self, mut call: Map<String, Value>) -> &CallRecord {
        let id = CALL_BASE + 1 + self.calls.len() as i64;
        let now = self.stamp() / 1000;
        call.insert("id".into(), id.into());
        call.insert("created_at".into(), wire::format_time(now).into());
        call.insert("updated_at".into(), wire::format_time(now).into());
        self.calls.push(CallRecord {
            id,
            created_at: now,
            call,
        });
        self.calls.last().expect("just pushed")
    }
}

/// Every user's time zone and locale: one account, one region (Zendesk's name, then IANA's).
pub(crate) const TIME_ZONE: (&str, &str) = ("Kyiv", "Europe/Kyiv");
pub(crate) const LOCALE: &str = "en-US";
/// The one group of the account; assigned tickets belong to it.
pub(crate) const GROUP_ID: i64 = 360_000_000_001;

pub(crate) fn group_of(t: &TicketRec) -> Option<i64> {
    (t.assignee_id != 0).then_some(GROUP_ID)
}

/// The id of the built-in custom ticket status of each status category.
pub(crate) fn custom_status_id(s: Status) -> i64 {
    360_000_000_300 + Status::ALL.iter().position(|x| *x == s).unwrap_or(0) as i64
}

fn tags_vec(tags: Option<&[Box<str>]>) -> Vec<String> {
    tags.unwrap_or(&[]).iter().map(|t| t.to_string()).collect()
}

/// A comment's `(body, html_body)`: plain text and HTML, whichever form it was written in
/// (`plain_body` equals `body`).
pub(crate) fn comment_bodies(c: &CommentRec) -> (String, String) {
    if c.html {
        (strip_tags(&c.body), c.body.to_string())
    } else {
        (
            c.body.to_string(),
            format!(
                "<div class=\"zd-comment\"><p>{}</p></div>",
                html_escape(&c.body)
            ),
        )
    }
}

fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

pub(crate) fn priority_str(p: u8) -> Option<&'static str> {
    p.checked_sub(1).map(|i| PRIORITIES[i as usize])
}
pub(crate) fn type_str(k: u8) -> Option<&'static str> {
    k.checked_sub(1).map(|i| TYPES[i as usize])
}

fn parse_enum(values: &[&str], v: Option<&str>, field: &'static str) -> Result<u8, StoreError> {
    match v {
        None | Some("") => Ok(0),
        Some(s) => values
            .iter()
            .position(|x| *x == s)
            .map(|i| i as u8 + 1)
            .ok_or_else(|| {
                StoreError::invalid(field, "InvalidValue", format!("{field}: {s} is not valid"))
            }),
    }
}

/// Merges keyed values into stored ones; keys not defined on the account are dropped silently, as
/// Zendesk does with unknown `user_fields` / `organization_fields` keys.
pub(crate) fn merge_fields(
    defs: &[FieldRec],
    mut old: Vec<(u8, Value)>,
    new: &Map<String, Value>,
) -> Vec<(u8, Value)> {
    for (k, v) in new {
        let Some(i) = defs.iter().position(|d| d.key == k) else {
            continue;
        };
        old.retain(|e| e.0 as usize != i);
        if !v.is_null() {
            old.push((i as u8, v.clone()));
        }
    }
    old.sort_by_key(|e| e.0);
    old
}

fn ticket_fields_from_pairs(mut old: Vec<(u8, Value)>, new: &[(i64, Value)]) -> Vec<(u8, Value)> {
    for (id, v) in new {
        let Some(i) = TICKET_FIELDS.iter().position(|d| d.id == *id) else {
            continue;
        };
        old.retain(|e| e.0 as usize != i);
        if !v.is_null() {
            old.push((i as u8, v.clone()));
        }
    }
    old.sort_by_key(|e| e.0);
    old
}

/// Every defined field, with `null` for unset ones (Zendesk always lists all keys).
pub(crate) fn user_fields_map(u: &UserRec) -> Map<String, Value> {
    let set = u.extra.as_ref().map(|e| &e.user_fields[..]).unwrap_or(&[]);
    fields_map(&USER_FIELDS, set)
}

pub(crate) fn org_fields_map(o: &OrgRec) -> Map<String, Value> {
    fields_map(&ORG_FIELDS, &o.fields)
}

fn fields_map(defs: &[FieldRec], set: &[(u8, Value)]) -> Map<String, Value> {
    defs.iter()
        .enumerate()
        .map(|(i, d)| {
            let v = set
                .iter()
                .find(|e| e.0 as usize == i)
                .map(|e| e.1.clone())
                .unwrap_or(Value::Null);
            (d.key.to_string(), v)
        })
        .collect()
}

/// Every ticket field id with its value (`null` when unset).
pub(crate) fn ticket_custom_fields(t: &TicketRec) -> impl Iterator<Item = (i64, &Value)> {
    static NULL: Value = Value::Null;
    let set = t
        .extra
        .as_ref()
        .map(|e| &e.custom_fields[..])
        .unwrap_or(&[]);
    TICKET_FIELDS.iter().enumerate().map(move |(i, d)| {
        (
            d.id,
            set.iter()
                .find(|e| e.0 as usize == i)
                .map(|e| &e.1)
                .unwrap_or(&NULL),
        )
    })
}

/// The plain text of an HTML comment, as Zendesk's `body`/`plain_body` show it: tags dropped and
/// the common entities decoded (`&amp;` is `&` in plain text).
pub(crate) fn strip_tags(html: &str) -> String {
    let mut out = String::with_capacity(html.len());
    let mut in_tag = false;
    for c in html.chars() {
        match c {
            '<' => in_tag = true,
            '>' => in_tag = false,
            c if !in_tag => out.push(c),
            _ => {}
        }
    }
    if !out.contains('&') {
        return out;
    }
    out.replace("&nbsp;", " ")
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&#39;", "'")
        .replace("&amp;", "&")
}
