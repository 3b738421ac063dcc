//! The routing and caller-ID decisions (DESIGN §3), pure functions over the [`Index`].
//!
//! Nothing here waits on anything: a decision reads the index under the caller's read lock and
//! allocates only the few strings of its answer. The rules, in the order they are applied:
//! - the number is resolved to E.164 ([`resolve_number`], or [`Resolver`] with its parse cache);
//! - candidates are all active, unsuspended customers on that number (shared numbers included);
//! - the owner is the assignee of the most recently updated open ticket (ties: higher ticket id)
//!   among the candidates' tickets whose assignee is an active, unsuspended agent/admin;
//! - the owner's name is looked up in the [`Directory`] by [`name_key`];
//! - when no open ticket has an active owner and `routing.recent_days` > 0 ([`Fallback`]), rule 7:
//!   the assignee of the candidates' most recently updated solved/closed ticket updated within the
//!   window, else the agent who took their most recent call reported to Deskline within it, each
//!   under the same activity and directory rules ([`route_with`]);
//! - every answer carries a `reason` naming the rule that decided it (USERS.md point 9), and a
//!   [`Basis`] saying which kind of evidence routed it.
//!
//! Two choices the contract leaves open, made here:
//! - An open ticket whose owner is active but has no PBX extension still *decides* (default
//!   routing, "assignee … has no PBX extension"), as before rule 7 existed: the customer has a case
//!   open with that agent, and routing them to whoever solved an older one would hide the gap in
//!   the directory. Rule 7 applies only when no open ticket has an active owner.
//! - An owner whose full name is shared with another active agent is still routed to the name's
//!   extension (the directory is keyed by name, so it is the extension the operator configured for
//!   that name; refusing would send both agents' callers to the default route), but the reason
//!   says so, and `deskline check` warns about every such pair.

use std::{
    collections::BTreeMap,
    hash::BuildHasher,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use rustc_hash::FxHashMap;

use crate::{
    index::{AgentRef, CustomerRef, Index, TicketRef},
    phone::{E164, PhoneError, PhoneParser},
};

/// The key names are compared by: NFC, trimmed, inner whitespace collapsed to one space, lowercased.
pub(crate) fn name_key(name: &str) -> String {
    crate::index::name_key(name)
}

/// `routing.directory`: full name → PBX extension, looked up by [`name_key`].
#[derive(Debug, Clone, Default)]
pub struct Directory {
    by_key: FxHashMap<String, String>,
}

impl Directory {
    /// When two names share a key (a config mistake `deskline check` can report), the one that
    /// sorts first in the table wins, so the choice is stable.
    pub fn new(entries: &BTreeMap<String, String>) -> Self {
        let mut by_key = FxHashMap::default();
        for (name, ext) in entries {
            by_key
                .entry(name_key(name))
                .or_insert_with(|| ext.trim().to_string());
        }
        Self { by_key }
    }

    #[cfg(test)]
    pub(crate) fn extension(&self, full_name: &str) -> Option<&str> {
        self.extension_by_key(&name_key(full_name))
    }

    /// Lookup by an already computed [`name_key`] (the index keeps one per agent).
    pub(crate) fn extension_by_key(&self, key: &str) -> Option<&str> {
        self.by_key.get(key).map(String::as_str)
    }
}

/// What the PBX should do with a call (`RouteCall.decision`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Route to the owner's extension (`agent.extension`).
    RouteToAgent,
    /// Let the PBX route as it would without Deskline; `reason` says why.
    DefaultRouting,
}

/// An agent as routing reports it: the owner of the chosen ticket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentView {
    /// Zendesk user id of the agent.
    pub id: i64,
    /// Full name as in Zendesk (the directory is matched against it).
    pub name: String,
    /// Email address; empty when Zendesk has none.
    pub email: String,
    /// From the directory; `None` when the agent's name has no entry.
    pub extension: Option<String>,
}

/// An open ticket as routing and caller ID report it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TicketView {
    /// Zendesk ticket id.
    pub id: i64,
    /// `new`, `open`, `pending` or `hold`.
    pub status: &'static str,
    /// Subject; empty when the ticket has none.
    pub subject: String,
    /// 0 when none.
    pub assignee_id: i64,
    /// Unix seconds.
    pub updated_at: i64,
}

/// A customer's organization.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrgView {
    /// Zendesk organization id.
    pub id: i64,
    /// Organization name; empty when Zendesk has none.
    pub name: String,
}

/// The customer a number resolved to: an active, unsuspended end user with that phone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CustomerView {
    /// Zendesk user id.
    pub id: i64,
    /// Full name; empty when Zendesk has none.
    pub name: String,
    /// The number that matched, in E.164.
    pub phone: E164,
    /// The customer's organization; `None` when there is none (or it is not indexed).
    pub organization: Option<OrgView>,
}

/// Which rule decided a route, as a closed set: the metric label behind `reason` (whose text names
/// tickets and agents, so it can never be a label itself).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReasonKind {
    /// Routed to the owner's extension.
    Routed,
    /// No customer has this number.
    NoCustomer,
    /// The customer has no open ticket.
    NoOpenTicket,
    /// The most recent open ticket has no assignee.
    NoAssignee,
    /// The most recent open ticket's assignee is inactive, suspended or not a known agent.
    InactiveAssignee,
    /// The owner has no entry in the directory.
    NoExtension,
    /// No customer has this number yet and the index is still warming (DESIGN §10): every
    /// customer with an open ticket is in already, so the caller has none, but who it is may
    /// still be unknown.
    Warming,
}

impl ReasonKind {
    /// Every kind, in the order of the metric's labels.
    pub const ALL: [ReasonKind; 7] = [
        Self::Routed,
        Self::NoCustomer,
        Self::NoOpenTicket,
        Self::NoAssignee,
        Self::InactiveAssignee,
        Self::NoExtension,
        Self::Warming,
    ];

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Routed => "routed",
            Self::NoCustomer => "no_customer",
            Self::NoOpenTicket => "no_open_ticket",
            Self::NoAssignee => "no_assignee",
            Self::InactiveAssignee => "inactive_assignee",
            Self::NoExtension => "no_extension",
            Self::Warming => "warming",
        }
    }
}

/// What routed a call (DESIGN §2 `basis`); [`Basis::None`] for default routing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum Basis {
    /// Default routing: nothing routed the call.
    #[default]
    None,
    /// Rule 4: the owner of an open ticket.
    OpenTicket,
    /// Rule 7: the assignee of a recently solved or closed ticket.
    RecentTicket,
    /// Rule 7: the agent who took the last call reported to Deskline.
    LastCall,
}

/// DESIGN §3 rule 7's settings for one decision: the window (`routing.recent_days`, 0 = off) and
/// the time it ends at (the decision stays a pure function: the caller passes the clock).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fallback {
    /// The window in days; 0 turns rule 7 off.
    pub recent_days: u32,
    /// Unix seconds.
    pub now: i64,
}

impl Fallback {
    /// Rule 7 off: the answers of rules 1–5 only.
    pub const OFF: Fallback = Fallback {
        recent_days: 0,
        now: 0,
    };

    /// Rule 7 with a window of `recent_days` ending at `now` (Unix seconds).
    pub fn new(recent_days: u32, now: i64) -> Self {
        Self { recent_days, now }
    }

    fn enabled(&self) -> bool {
        self.recent_days > 0
    }

    /// Whether something that happened at `at` (Unix seconds) is inside the window. A time ahead
    /// of `now` (clock skew between Zendesk, the PBX and this host) counts as inside.
    fn within(&self, at: i64) -> bool {
        at >= self.now - i64::from(self.recent_days) * 86_400
    }

    /// "3 days ago" / "today", for reasons.
    fn ago(&self, at: i64) -> String {
        match (self.now - at).max(0) / 86_400 {
            0 => "today".into(),
            1 => "1 day ago".into(),
            d => format!("{d} days ago"),
        }
    }
}

/// The answer to `RouteCall` (DESIGN §3): the decision and what it was based on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteAnswer {
    /// Route to an agent or leave it to the PBX.
    pub decision: Decision,
    /// What routed the call; [`Basis::None`] with default routing.
    pub basis: Basis,
    /// The category of `reason`.
    pub kind: ReasonKind,
    /// The owner, when one was found (also with `DefaultRouting` when only the extension is missing).
    pub agent: Option<AgentView>,
    /// The ticket that decided the owner, if any.
    pub ticket: Option<TicketView>,
    /// The customer the number resolved to, if any.
    pub customer: Option<CustomerView>,
    /// Human-readable why, naming tickets and agents (e.g. "ticket 123 has no assignee").
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CallerAnswer {
    pub found: bool,
    /// The customer's name, with the organization in brackets when there is one.
    pub display_name: String,
    pub customer: Option<CustomerView>,
    pub open_ticket: Option<TicketView>,
}

/// Normalises a query number: the canonical-form fast path when the index knows the number, else a
/// full libphonenumber parse.
pub fn resolve_number(index: &Index, parser: &PhoneParser, raw: &str) -> Result<E164, PhoneError> {
    match E164::candidate(raw) {
        Some(c) if index.has_phone(c) => Ok(c),
        _ => parser.parse(raw),
    }
}

/// The parse cache of [`Resolver`]: trimmed raw input → result of the full parse.
type ParseCache =
    moka::sync::Cache<Box<str>, Result<E164, PhoneError>, foldhash::quality::RandomState>;

/// [`resolve_number`] with a bounded cache of full parses (raw string → result).
///
/// A PBX tends to send the same non-canonical format for the same callers again and again
/// ("0441234567", "380441234567"), and a call's `RouteCall` is followed by its softphone's
/// `LookupCaller` for the same number; a full libphonenumber parse costs about 2 µs, a cache hit a
/// fraction of that. A bounded `moka` cache is the right tool for the hits: the working set is
/// "recent callers", losing an entry only costs a re-parse, and the parse result does not depend
/// on the index, so entries never go stale. Canonical numbers the index knows take the fast path
/// and never touch the cache.
///
/// But an insert into a full moka cache (the eviction it triggers) cost more than the parse it
/// would save: with every caller new (`national_miss` in `cargo bench --bench lookup`) a lookup
/// took 7.3 µs instead of 2.8 µs without a cache. So a number is admitted on its second sighting
/// only: a small table of fingerprints (a doorkeeper, the idea TinyLFU uses inside moka, applied
/// before the expensive insert) remembers the numbers seen once. A stream of new callers then
/// costs a parse and one atomic swap each; a number asked about again is cached from then on.
#[derive(Clone)]
pub struct Resolver {
    parser: PhoneParser,
    /// `None` with capacity 0. foldhash instead of SipHash: several times cheaper on these short
    /// keys and still seeded per process, so callers cannot aim numbers at one bucket.
    cache: Option<ParseCache>,
    /// Fingerprints of inputs parsed once (0: empty slot); a power-of-two number of slots.
    seen: Arc<[AtomicU64]>,
    hasher: foldhash::quality::RandomState,
}

impl std::fmt::Debug for Resolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Resolver")
            .field("parser", &self.parser)
            .field("cached", &self.cache.as_ref().map(|c| c.entry_count()))
            .finish()
    }
}

impl Resolver {
    /// Inputs longer than this are parsed (and rejected) without being cached.
    const MAX_CACHED_LEN: usize = crate::phone::MAX_INPUT_LEN;

    /// Entries of the parse cache: the recent callers (see the type's doc).
    pub const CAPACITY: u64 = 10_000;

    /// A resolver over `parser` caching up to `capacity` parses; 0 disables the cache.
    pub fn new(parser: PhoneParser, capacity: u64) -> Self {
        let hasher = foldhash::quality::RandomState::default();
        let slots = if capacity == 0 {
            0
        } else {
            (capacity as usize).next_power_of_two()
        };
        Self {
            parser,
            cache: (capacity > 0).then(|| {
                moka::sync::Cache::builder()
                    .max_capacity(capacity)
                    .build_with_hasher(hasher.clone())
            }),
            seen: (0..slots).map(|_| AtomicU64::new(0)).collect(),
            hasher,
        }
    }

    /// Normalizes `raw` to E.164 like [`resolve_number`], caching full parses (see the type's doc).
    pub fn resolve(&self, index: &Index, raw: &str) -> Result<E164, PhoneError> {
        if let Some(c) = E164::candidate(raw) {
            if index.has_phone(c) {
                return Ok(c);
            }
        }
        let key = raw.trim();
        let Some(cache) = self
            .cache
            .as_ref()
            .filter(|_| key.len() <= Self::MAX_CACHED_LEN)
        else {
            return self.parser.parse(key);
        };
        if let Some(hit) = cache.get(key) {
            return hit;
        }
        let result = self.parser.parse(key);
        if self.seen_before(key) {
            cache.insert(key.into(), result.clone());
        }
        result
    }

    /// Entries in the cache, after moka's pending inserts are applied.
    #[cfg(test)]
    fn cached(&self) -> u64 {
        self.cache.as_ref().map_or(0, |c| {
            c.run_pending_tasks();
            c.entry_count()
        })
    }

    /// Records `key` in the doorkeeper; true when its fingerprint was already there. A slot holds
    /// the last key that hashed to it, so two numbers that share a slot and alternate are never
    /// admitted: they just keep being parsed, which is always correct.
    fn seen_before(&self, key: &str) -> bool {
        let fp = self.hasher.hash_one(key) | 1;
        let slot = &self.seen[(fp >> 1) as usize & (self.seen.len() - 1)];
        slot.swap(fp, Ordering::Relaxed) == fp
    }
}

/// What the rules found for one number, before it is turned into an answer.
struct Findings<'a> {
    /// The candidate with the most recently updated customer record (caller-ID fallback).
    latest_customer: Option<CustomerRef<'a>>,
    /// The most recently updated open ticket among all candidates.
    latest_open: Option<TicketRef<'a>>,
    /// Rule 4's ticket and its owner.
    owned: Option<(TicketRef<'a>, AgentRef<'a>)>,
}

/// Most recently updated first; ties go to the higher id.
fn newer(a: &TicketRef<'_>, b: &TicketRef<'_>) -> bool {
    (a.updated_at, a.id) > (b.updated_at, b.id)
}

fn find(index: &Index, phone: E164) -> Findings<'_> {
    let mut f = Findings {
        latest_customer: None,
        latest_open: None,
        owned: None,
    };
    for c in index.customers_by_phone(phone) {
        if f.latest_customer
            .is_none_or(|l| (c.updated_at, c.id) > (l.updated_at, l.id))
        {
            f.latest_customer = Some(c);
        }
        for t in index.open_tickets_of(c.id) {
            if f.latest_open.is_none_or(|l| newer(&t, &l)) {
                f.latest_open = Some(t);
            }
            if f.owned.is_some_and(|(o, _)| !newer(&t, &o)) {
                continue;
            }
            let owner = t
                .assignee_id
                .and_then(|a| index.agent(a))
                .filter(AgentRef::is_usable);
            if let Some(agent) = owner {
                f.owned = Some((t, agent));
            }
        }
    }
    f
}

fn ticket_view(t: &TicketRef<'_>) -> TicketView {
    TicketView {
        id: t.id,
        status: t.status,
        subject: t.subject.to_string(),
        assignee_id: t.assignee_id.unwrap_or(0),
        updated_at: t.updated_at,
    }
}

fn customer_view(index: &Index, c: &CustomerRef<'_>, phone: E164) -> CustomerView {
    CustomerView {
        id: c.id,
        name: c.name.to_string(),
        phone,
        organization: c.organization_id.and_then(|id| {
            index.organization_name(id).map(|name| OrgView {
                id,
                name: name.to_string(),
            })
        }),
    }
}

/// Why no open ticket could decide the route, naming the most recent one.
fn passed_over(index: &Index, t: &TicketRef<'_>) -> (ReasonKind, String) {
    let reason = match t.assignee_id {
        None => {
            return (
                ReasonKind::NoAssignee,
                format!("ticket {} has no assignee", t.id),
            );
        }
        Some(a) => match index.agent(a) {
            Some(ag) if !ag.active => format!("ticket {}'s assignee {} is inactive", t.id, ag.name),
            Some(ag) if ag.suspended => {
                format!("ticket {}'s assignee {} is suspended", t.id, ag.name)
            }
            _ => format!("ticket {}'s assignee (user {a}) is not a known agent", t.id),
        },
    };
    (ReasonKind::InactiveAssignee, reason)
}

/// DESIGN §3 rules 2–5 (rule 7 off).
pub fn route(index: &Index, directory: &Directory, phone: E164) -> RouteAnswer {
    route_with(index, directory, phone, Fallback::OFF)
}

/// DESIGN §3 rules 2–5 and, when `fallback` is on, rule 7.
pub fn route_with(
    index: &Index,
    directory: &Directory,
    phone: E164,
    fallback: Fallback,
) -> RouteAnswer {
    let mut answer = route_open(index, directory, phone, fallback);
    if let Some(agent) = &answer.agent
        && answer.decision == Decision::RouteToAgent
    {
        let same = index.namesakes(agent.id);
        if !same.is_empty() {
            let ids: Vec<String> = same.iter().map(i64::to_string).collect();
            answer.reason = format!(
                "{}; but {} shares this name with active agent {} (the directory cannot tell them \
                 apart: give one a distinct name)",
                answer.reason,
                agent.name,
                ids.join(", ")
            );
        }
    }
    answer
}

fn route_open(
    index: &Index,
    directory: &Directory,
    phone: E164,
    fallback: Fallback,
) -> RouteAnswer {
    let f = find(index, phone);
    let default =
        |kind, reason: String, customer: Option<CustomerView>, ticket, agent| RouteAnswer {
            decision: Decision::DefaultRouting,
            basis: Basis::None,
            kind,
            agent,
            ticket,
            customer,
            reason,
        };
    let Some(latest_customer) = f.latest_customer else {
        if index.is_warming() {
            return default(
                ReasonKind::Warming,
                "index warming".into(),
                None,
                None,
                None,
            );
        }
        return default(
            ReasonKind::NoCustomer,
            "no customer with this number".into(),
            None,
            None,
            None,
        );
    };
    let Some((ticket, agent)) = f.owned else {
        // The customer caller ID would show: the one with the latest open ticket, else the latest.
        let cust = f
            .latest_open
            .and_then(|t| index.customer(t.requester_id))
            .unwrap_or(latest_customer);
        let customer = Some(customer_view(index, &cust, phone));
        let (kind, reason, ticket) = match f.latest_open {
            None => (ReasonKind::NoOpenTicket, "no open ticket".to_string(), None),
            Some(t) => {
                let (kind, reason) = passed_over(index, &t);
                (kind, reason, Some(ticket_view(&t)))
            }
        };
        if !fallback.enabled() {
            return default(kind, reason, customer, ticket, None);
        }
        return match recent(index, directory, phone, fallback) {
            Ok(mut routed) => {
                if f.latest_open.is_some() {
                    routed.reason = format!("{reason}; {}", routed.reason);
                }
                routed
            }
            Err(why) => default(kind, format!("{reason}; {why}"), customer, ticket, None),
        };
    };
    let customer = index
        .customer(ticket.requester_id)
        .map(|c| customer_view(index, &c, phone));
    let extension = directory.extension_by_key(agent.name_key);
    let view = AgentView {
        id: agent.id,
        name: agent.name.to_string(),
        email: agent.email.to_string(),
        extension: extension.map(str::to_string),
    };
    match extension {
        Some(_) => RouteAnswer {
            decision: Decision::RouteToAgent,
            basis: Basis::OpenTicket,
            kind: ReasonKind::Routed,
            reason: format!("ticket {} is assigned to {}", ticket.id, agent.name),
            agent: Some(view),
            ticket: Some(ticket_view(&ticket)),
            customer,
        },
        None => default(
            ReasonKind::NoExtension,
            format!("assignee {} has no PBX extension", agent.name),
            customer,
            Some(ticket_view(&ticket)),
            Some(view),
        ),
    }
}

/// The agent view of a usable owner, when the directory has their name.
fn routable(index: &Index, directory: &Directory, agent_id: Option<i64>) -> Owner {
    let Some(id) = agent_id else {
        return Owner::Missing;
    };
    let Some(agent) = index.agent(id) else {
        return Owner::Unusable(format!("user {id} is not a known agent"));
    };
    if !agent.active {
        return Owner::Unusable(format!("{} is inactive", agent.name));
    }
    if agent.suspended {
        return Owner::Unusable(format!("{} is suspended", agent.name));
    }
    match directory.extension_by_key(agent.name_key) {
        None => Owner::Unusable(format!("{} has no PBX extension", agent.name)),
        Some(ext) => Owner::Routable(AgentView {
            id: agent.id,
            name: agent.name.to_string(),
            email: agent.email.to_string(),
            extension: Some(ext.to_string()),
        }),
    }
}

enum Owner {
    Missing,
    /// Why the owner cannot take the call.
    Unusable(String),
    Routable(AgentView),
}

/// DESIGN §3 rule 7 over every candidate on `phone` (several customers on a number: the most
/// recent evidence among all of them, passing over owners that cannot take the call, as rule 4
/// does). `Err` is why the fallback did not apply, for the reason of the default route.
fn recent(
    index: &Index,
    directory: &Directory,
    phone: E164,
    fb: Fallback,
) -> Result<RouteAnswer, String> {
    let mut tickets = Vec::new();
    let mut calls = Vec::new();
    for c in index.customers_by_phone(phone) {
        tickets.extend(index.done_ticket_of(c.id));
        calls.extend(index.last_call_of(c.id));
    }
    // Most recent first; ties: the higher ticket id, the higher customer id (deterministic).
    tickets.sort_unstable_by_key(|t| std::cmp::Reverse((t.updated_at, t.id)));
    calls.sort_unstable_by_key(|c| std::cmp::Reverse((c.started_at, c.customer_id)));
    let days = fb.recent_days;

    let mut why_ticket = None;
    for t in &tickets {
        if !fb.within(t.updated_at) {
            why_ticket.get_or_insert_with(|| {
                format!(
                    "recent ticket {} ({}) was updated {}, outside the {days}-day window",
                    t.id,
                    t.status,
                    fb.ago(t.updated_at)
                )
            });
            continue;
        }
        let reason = match routable(index, directory, t.assignee_id) {
            Owner::Routable(agent) => {
                return Ok(RouteAnswer {
                    decision: Decision::RouteToAgent,
                    basis: Basis::RecentTicket,
                    kind: ReasonKind::Routed,
                    reason: format!("recent ticket {} ({}) of {}", t.id, t.status, agent.name),
                    agent: Some(agent),
                    ticket: Some(TicketView {
                        id: t.id,
                        status: t.status,
                        // Not kept for solved tickets (a string per customer of the whole history).
                        subject: String::new(),
                        assignee_id: t.assignee_id.unwrap_or(0),
                        updated_at: t.updated_at,
                    }),
                    customer: index
                        .customer(t.requester_id)
                        .map(|c| customer_view(index, &c, phone)),
                });
            }
            Owner::Missing => format!("recent ticket {} ({}) has no assignee", t.id, t.status),
            Owner::Unusable(why) => format!("recent ticket {} ({}): {why}", t.id, t.status),
        };
        // The most recent ticket's story is the one worth telling.
        why_ticket.get_or_insert(reason);
    }
    let why_ticket =
        why_ticket.unwrap_or_else(|| format!("no solved or closed ticket within {days} days"));

    let mut why_call = None;
    for c in &calls {
        if !fb.within(c.started_at) {
            why_call.get_or_insert_with(|| {
                format!(
                    "the last reported call was {}, outside the {days}-day window",
                    fb.ago(c.started_at)
                )
            });
            continue;
        }
        let reason = match routable(index, directory, Some(c.agent_id)) {
            Owner::Routable(agent) => {
                return Ok(RouteAnswer {
                    decision: Decision::RouteToAgent,
                    basis: Basis::LastCall,
                    kind: ReasonKind::Routed,
                    reason: format!(
                        "last call ({}) taken by {} ({why_ticket})",
                        fb.ago(c.started_at),
                        agent.name
                    ),
                    agent: Some(agent),
                    ticket: None,
                    customer: index
                        .customer(c.customer_id)
                        .map(|cu| customer_view(index, &cu, phone)),
                });
            }
            Owner::Missing => "the last reported call has no agent".to_string(),
            Owner::Unusable(why) => format!("the last reported call's agent {why}"),
        };
        why_call.get_or_insert(reason);
    }
    let why_call = why_call.unwrap_or_else(|| format!("no reported call within {days} days"));
    Err(format!("{why_ticket}; {why_call}"))
}

/// DESIGN §3 rule 6.
pub(crate) fn lookup_caller(index: &Index, phone: E164) -> CallerAnswer {
    let f = find(index, phone);
    let lead = f.owned.map(|(t, _)| t).or(f.latest_open);
    let cust = lead
        .and_then(|t| index.customer(t.requester_id))
        .or(f.latest_customer);
    let Some(cust) = cust else {
        return CallerAnswer {
            found: false,
            display_name: String::new(),
            customer: None,
            open_ticket: None,
        };
    };
    let view = customer_view(index, &cust, phone);
    let name = if view.name.trim().is_empty() {
        phone.to_string()
    } else {
        view.name.clone()
    };
    let display_name = match &view.organization {
        Some(org) if !org.name.is_empty() => format!("{name} ({})", org.name),
        _ => name,
    };
    CallerAnswer {
        found: true,
        display_name,
        customer: Some(view),
        open_ticket: lead.as_ref().map(ticket_view),
    }
}

#[cfg(test)]
mod tests;
