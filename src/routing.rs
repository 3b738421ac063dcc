//! The routing and caller-ID decisions (DESIGN §3), pure functions over the [`Index`].
//!
//! Nothing here waits on anything: a decision reads the index under the caller's read lock and
//! allocates only the few strings of its answer. The rules, in the order they are applied:
//! - the number is resolved to E.164 ([`resolve_number`], or [`Resolver`] with its parse cache);
//! - candidates are all active, unsuspended customers on that number (shared numbers included);
//! - the owner is the assignee of the most recently updated open ticket (ties: higher ticket id)
//!   among the candidates' tickets whose assignee is an active, unsuspended agent/admin;
//! - the owner's name is looked up in the [`Directory`] by [`name_key`];
//! - every answer carries a `reason` naming the rule that decided it (USERS.md point 9).

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
}

impl ReasonKind {
    pub(crate) const ALL: [ReasonKind; 6] = [
        Self::Routed,
        Self::NoCustomer,
        Self::NoOpenTicket,
        Self::NoAssignee,
        Self::InactiveAssignee,
        Self::NoExtension,
    ];

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Routed => "routed",
            Self::NoCustomer => "no_customer",
            Self::NoOpenTicket => "no_open_ticket",
            Self::NoAssignee => "no_assignee",
            Self::InactiveAssignee => "inactive_assignee",
            Self::NoExtension => "no_extension",
        }
    }
}

/// The answer to `RouteCall` (DESIGN §3): the decision and what it was based on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteAnswer {
    /// Route to an agent or leave it to the PBX.
    pub decision: Decision,
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

/// DESIGN §3 rules 2–5.
pub fn route(index: &Index, directory: &Directory, phone: E164) -> RouteAnswer {
    let f = find(index, phone);
    let default =
        |kind, reason: String, customer: Option<CustomerView>, ticket, agent| RouteAnswer {
            decision: Decision::DefaultRouting,
            kind,
            agent,
            ticket,
            customer,
            reason,
        };
    let Some(latest_customer) = f.latest_customer else {
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
        return match f.latest_open {
            None => default(
                ReasonKind::NoOpenTicket,
                "no open ticket".into(),
                customer,
                None,
                None,
            ),
            Some(t) => {
                let (kind, reason) = passed_over(index, &t);
                default(kind, reason, customer, Some(ticket_view(&t)), None)
            }
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
