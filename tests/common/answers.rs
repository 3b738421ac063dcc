//! Answers of a Deskline under test compared with an oracle (a full warm-up of the final account):
//! the checks of the serve-while-warming tests (DESIGN §10), in one process (`tests/warming.rs`)
//! and with replicas (`tests/replicas.rs`).

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    time::Duration,
};

use deskline::proto::{self, Decision, LookupCallerRequest, RouteCallRequest};
use deskline_sim::{self as sim, GenConfig, NewUser, SimHandle};

use super::{channel, client, eventually, start_service};

/// The simulator's real limits with time scaled down (see `tests/warming.rs`), the incremental
/// exports held (limit 0) until the test lets them run.
pub fn scaled_real_limits(c: &mut sim::SimConfig) {
    c.rate_window = Duration::from_secs(2);
    c.one_minute_rule = Duration::from_secs(1);
    c.search_delay = Duration::from_secs(3);
    c.requests_per_minute = sim::SimConfig::default().requests_per_minute;
    c.export_requests_per_minute = 0;
}

/// Deskline's default budget scaled like [`scaled_real_limits`] (see [`config`]), as environment
/// overrides for `deskline serve` replicas, with the bootstrap on and exports polled every second.
pub const SCALED_BOOTSTRAP_ENV: &[(&str, &str)] = &[
    ("DESKLINE_INDEX__BOOTSTRAP", "true"),
    ("DESKLINE_INDEX__POLL_SECONDS", "1"),
    ("DESKLINE_INDEX__FOLLOWER_LEASE_SECONDS", "2"),
    ("DESKLINE_ZENDESK__REQUESTS_PER_MINUTE", "6000"),
    ("DESKLINE_ZENDESK__EXPORT_REQUESTS_PER_MINUTE", "300"),
];

/// The generated account of these tests.
pub fn account() -> GenConfig {
    GenConfig {
        users: 2_000,
        tickets: 2_000,
        agents: 8,
        organizations: 20,
        seed: 14,
    }
}

/// Every phone number stored in the account (each user's `phone` and phone identities), as
/// stored (many formats; the service parses them as a PBX number).
pub fn numbers(sim: &SimHandle) -> Vec<String> {
    sim.with_store(|s| {
        let ids: Vec<i64> = s.user_ids().collect();
        let mut out = std::collections::BTreeSet::new();
        for id in ids {
            let Some(u) = s.user(id) else { continue };
            if u.role.as_deref().is_some_and(|r| r != "end-user") {
                continue;
            }
            out.extend(u.phone.clone());
            for i in s.identities(id) {
                if i.kind.as_deref() == Some("phone_number") {
                    out.extend(i.value);
                }
            }
        }
        out.into_iter().collect()
    })
}

/// The end-users holding each number in the account as it is now (their `phone` or a phone
/// identity), keyed by the E.164 digits the service makes of it (the tests' region, UA).
pub fn holders(sim: &SimHandle) -> HashMap<u64, BTreeSet<i64>> {
    let parser = deskline::phone::PhoneParser::new("UA").unwrap();
    sim.with_store(|s| {
        let ids: Vec<i64> = s.user_ids().collect();
        let mut out: HashMap<u64, BTreeSet<i64>> = HashMap::new();
        for id in ids {
            let Some(u) = s.user(id) else { continue };
            if u.role.as_deref().is_some_and(|r| r != "end-user") {
                continue;
            }
            let identities = s
                .identities(id)
                .into_iter()
                .filter(|i| i.kind.as_deref() == Some("phone_number"))
                .filter_map(|i| i.value);
            for raw in u.phone.clone().into_iter().chain(identities) {
                if let Some(e) = parser.parse_stored(&raw) {
                    out.entry(e.digits()).or_default().insert(id);
                }
            }
        }
        out
    })
}

pub fn directory(sim: &SimHandle) -> String {
    sim.with_store(|s| {
        let ids: Vec<i64> = s.user_ids().collect();
        let mut out = String::from("[routing.directory]\n");
        for (n, id) in ids.into_iter().enumerate() {
            let Some(u) = s.user(id) else { continue };
            if matches!(u.role.as_deref(), Some("agent") | Some("admin")) {
                if let Some(name) = u.name {
                    out.push_str(&format!("{name:?} = \"{}\"\n", 100 + n));
                }
            }
        }
        out
    })
}

/// Deskline's default budget (200 a minute, 10 of them exports) scaled like the simulator's
/// window: Deskline's window is a fixed minute, the simulator's 2 s, so 30 times the defaults.
/// For an in-process service (`start_service`).
pub fn config(sim: &SimHandle, dir: &std::path::Path, bootstrap: bool) -> String {
    format!(
        "[zendesk]\nurl = \"{}\"\nemail = \"{}\"\ntoken = \"{}\"\ntimeout_seconds = 5\n\
         requests_per_minute = 6000\nexport_requests_per_minute = 300\n\
         [storage]\ndata_dir = \"{}\"\n[index]\npoll_seconds = 1\nbootstrap = {bootstrap}\n{}",
        sim.url(),
        sim.email(),
        sim.token(),
        dir.display(),
        directory(sim),
    )
}

/// The oracle of the warming tests: an in-process Deskline doing today's full warm-up of the
/// account as it is now (with its data directory, kept while it runs), and its answers for `all`.
/// It starts once the incremental exports include every change made so far (the one-minute
/// rule): a warm-up that started earlier would be READY without the last second's changes, and
/// its answers, taken once, would hold the test under it to a stale account.
pub async fn oracle(
    sim: &SimHandle,
    all: &[String],
    deadline: Duration,
) -> (tempfile::TempDir, deskline::app::Service, Answers) {
    eventually("the exports include every change", deadline, || async {
        sim.exports_include_every_change().then_some(())
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let service = start_service(&config(sim, dir.path(), false)).await;
    tokio::time::timeout(deadline, service.wait_loaded())
        .await
        .expect("the full warm-up in time");
    let answers = answers(service.addr(), all).await;
    (dir, service, answers)
}

/// What must agree between two answers: the decision and everything it names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub decision: i32,
    pub agent: i64,
    pub ticket: i64,
    pub customer: i64,
    pub reason: String,
    pub state: i32,
}

pub fn route_of(r: proto::RouteCallResponse) -> Route {
    Route {
        decision: r.decision,
        agent: r.agent.map_or(0, |a| a.zendesk_id),
        ticket: r.ticket.map_or(0, |t| t.id),
        customer: r.customer.map_or(0, |c| c.zendesk_id),
        reason: r.reason,
        state: r.index_state,
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lookup {
    pub found: bool,
    pub customer: i64,
    pub ticket: i64,
    pub state: i32,
}

pub async fn answers(
    addr: std::net::SocketAddr,
    numbers: &[String],
) -> BTreeMap<String, (Route, Lookup)> {
    let mut c = client(addr).await;
    let mut out = BTreeMap::new();
    for n in numbers {
        let r = c
            .route_call(RouteCallRequest {
                caller: n.clone(),
                ..Default::default()
            })
            .await;
        let l = c
            .lookup_caller(LookupCallerRequest { number: n.clone() })
            .await;
        // A stored number Deskline cannot parse is refused the same way by both.
        let (Ok(r), Ok(l)) = (r, l) else { continue };
        let l = l.into_inner();
        out.insert(
            n.clone(),
            (
                route_of(r.into_inner()),
                Lookup {
                    found: l.found,
                    customer: l.customer.map_or(0, |c| c.zendesk_id),
                    ticket: l.open_ticket.map_or(0, |t| t.id),
                    state: l.index_state,
                },
            ),
        );
    }
    out
}

pub async fn health(addr: std::net::SocketAddr) -> i32 {
    let mut h = tonic_health::pb::health_client::HealthClient::new(channel(addr).await);
    h.check(tonic_health::pb::HealthCheckRequest {
        service: "deskline.v1.Resolver".into(),
    })
    .await
    .unwrap()
    .into_inner()
    .status
}

pub fn end_user(s: &mut sim::Store, name: &str, phone: &str) -> i64 {
    s.create_user(NewUser {
        name: name.into(),
        email: None,
        phone: Some(phone.into()),
        role: None,
        organization_id: None,
        external_id: None,
        shared_phone_number: false,
        suspended: false,
        user_fields: Default::default(),
    })
    .unwrap()
}

/// Some agent (the first active one), and an open ticket with an assignee.
pub fn an_agent_and_an_open_ticket(s: &sim::Store) -> (i64, i64) {
    let agent = s
        .user_ids()
        .find(|id| {
            s.user(*id).is_some_and(|u| {
                u.role.as_deref() == Some("agent")
                    && u.active != Some(false)
                    && u.suspended != Some(true)
            })
        })
        .unwrap();
    let ticket = s
        .ticket_ids()
        .find(|id| {
            s.ticket(*id).is_some_and(|t| {
                matches!(t.status.as_deref(), Some("open") | Some("new")) && t.assignee_id.is_some()
            })
        })
        .unwrap();
    (agent, ticket)
}

/// Answers by number: what RouteCall and LookupCaller said.
pub type Answers = BTreeMap<String, (Route, Lookup)>;

/// Waits until `addr` answers every number of `all` as `oracle` does (its index state aside);
/// panics after `deadline` with the numbers that still differ.
pub async fn wait_agrees(
    addr: std::net::SocketAddr,
    all: &[String],
    oracle: &Answers,
    deadline: Duration,
) {
    let mut last_diff = String::new();
    let caught_up = tokio::time::timeout(deadline, async {
        loop {
            let now = answers(addr, all).await;
            let diff: Vec<&String> = oracle
                .iter()
                .filter(|(n, (r, l))| {
                    now.get(*n).is_none_or(|(r2, l2)| {
                        (r2.decision, r2.agent, r2.ticket, r2.customer, &r2.reason)
                            != (r.decision, r.agent, r.ticket, r.customer, &r.reason)
                            || (l2.found, l2.customer, l2.ticket) != (l.found, l.customer, l.ticket)
                    })
                })
                .map(|(n, _)| n)
                .collect();
            if diff.is_empty() {
                return;
            }
            let shown: Vec<String> = diff[..diff.len().min(5)]
                .iter()
                .map(|n| format!("{n}: {:?}, oracle {:?}", now.get(*n), oracle.get(*n)))
                .collect();
            last_diff = format!("{} differ, e.g. {shown:#?}", diff.len());
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
    assert!(caught_up.is_ok(), "after READY: {last_diff}");
}

/// Checks answers given while WARMING against the oracle (DESIGN §10): a number with an open
/// ticket routed exactly as the full warm-up says, an unknown one "index warming", a known one
/// without an open ticket the same customer and decision. Numbers for which `skip` is true
/// (changed during the test) are left out. Returns (open-ticket numbers checked, unknown ones).
///
/// A number several customers share may be answered while warming with one of them that is not
/// the final answer's (the final one, say the most recently updated, may be one whose phone
/// identity is still waiting to be fetched): that is incomplete, not contradictory, as long as the
/// customer named holds the number in the final account too (`holders`, from [`holders`]).
pub fn check_warming(
    warming: &Answers,
    oracle: &Answers,
    holders: &HashMap<u64, BTreeSet<i64>>,
    skip: impl Fn(&str) -> bool,
) -> (usize, usize) {
    let parser = deskline::phone::PhoneParser::new("UA").unwrap();
    let holds = |n: &str, customer: i64| {
        parser
            .parse_stored(n)
            .and_then(|e| holders.get(&e.digits()))
            .is_some_and(|ids| ids.contains(&customer))
    };
    let mut open_checked = 0;
    let mut warming_unknown = 0;
    for (n, (r, l)) in warming {
        if skip(n) {
            continue;
        }
        let (o, ol) = oracle
            .get(n)
            .unwrap_or_else(|| panic!("{n}: no oracle answer"));
        if o.ticket != 0 {
            open_checked += 1;
            assert_eq!(
                (r.decision, r.agent, r.ticket, r.customer, &r.reason),
                (o.decision, o.agent, o.ticket, o.customer, &o.reason),
                "{n}: an open-ticket caller routed differently while warming"
            );
            assert_eq!(
                (l.found, l.customer, l.ticket),
                (ol.found, ol.customer, ol.ticket),
                "{n}"
            );
        } else if r.customer == 0 {
            warming_unknown += 1;
            assert_eq!(r.decision, Decision::DefaultRouting as i32, "{n}");
            assert_eq!(r.reason, "index warming", "{n}");
            assert!(!l.found || l.customer == ol.customer, "{n}");
        } else {
            // Known while warming: the same (default) decision, for the same customer or for
            // another holder of a shared number (see above).
            assert_eq!((r.decision, &r.reason), (o.decision, &o.reason), "{n}");
            assert!(
                r.customer == o.customer || holds(n, r.customer),
                "{n}: routed for customer {} while warming, {} after; {} does not hold the number",
                r.customer,
                o.customer,
                r.customer
            );
            assert_eq!((l.found, l.ticket), (ol.found, ol.ticket), "{n}");
            assert!(
                l.customer == ol.customer || holds(n, l.customer),
                "{n}: caller ID named customer {} while warming, {} after",
                l.customer,
                ol.customer
            );
        }
    }
    (open_checked, warming_unknown)
}
