//! A first start without a snapshot (DESIGN §10): the bootstrap answers WARMING before the index
//! is complete, and what it answers agrees with a full warm-up of the final account.
//!
//! The simulator runs with its real limits (700 a minute, 10 a minute on the incremental exports,
//! 100 a minute on the search export) and Deskline with its default budget; only time is scaled
//! down: the rate-limit window (2 s), the search indexing delay (3 s) and the one-minute rule (1 s).
//! While the answers during warming are checked, the incremental exports are held (their limit set
//! to 0), which keeps the index WARMING for as long as the checks take without a sleep: READY needs
//! the exports. The oracle is a second Deskline doing today's full warm-up of the final account.

mod common;

use std::{collections::BTreeMap, time::Duration};

use common::*;
use deskline::proto::{self, Decision, IndexState, LookupCallerRequest, RouteCallRequest};
use deskline_sim::{self as sim, GenConfig, NewTicket, NewUser, SimHandle, Status, TicketPatch};

const LONG: Duration = Duration::from_secs(90);

fn account() -> GenConfig {
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
fn numbers(sim: &SimHandle) -> Vec<String> {
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

fn directory(sim: &SimHandle) -> String {
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
fn config(sim: &SimHandle, dir: &std::path::Path, bootstrap: bool) -> String {
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

/// What must agree between two answers: the decision and everything it names.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Route {
    decision: i32,
    agent: i64,
    ticket: i64,
    customer: i64,
    reason: String,
    state: i32,
}

fn route_of(r: proto::RouteCallResponse) -> Route {
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
struct Lookup {
    found: bool,
    customer: i64,
    ticket: i64,
    state: i32,
}

async fn answers(
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

async fn health(addr: std::net::SocketAddr) -> i32 {
    let mut h = tonic_health::pb::health_client::HealthClient::new(channel(addr).await);
    h.check(tonic_health::pb::HealthCheckRequest {
        service: "deskline.v1.Resolver".into(),
    })
    .await
    .unwrap()
    .into_inner()
    .status
}

fn end_user(s: &mut sim::Store, name: &str, phone: &str) -> i64 {
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
fn an_agent_and_an_open_ticket(s: &sim::Store) -> (i64, i64) {
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_while_warming_agree_with_a_full_warm_up() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let cfg = sim::SimConfig {
        rate_window: Duration::from_secs(2),
        one_minute_rule: Duration::from_secs(1),
        search_delay: Duration::from_secs(3),
        // Held until the checks during warming are done (see the module doc).
        export_requests_per_minute: 0,
        ..sim::SimConfig::default()
    };
    let sim = sim::start(listener, cfg, sim::generate(&account())).await;

    // Changes just before the start, within the search delay: the search export cannot see them,
    // only the incremental exports from before the start can.
    let mut touched: Vec<String> = Vec::new();
    let (before_user, before_ticket) = sim.with_store(|s| {
        let (agent, _) = an_agent_and_an_open_ticket(s);
        let u = end_user(s, "Before Start", "+380 67 000 11 01");
        let t = s
            .create_ticket(NewTicket {
                requester_id: u,
                assignee_id: Some(agent),
                status: Some(Status::Open),
                ..NewTicket::default()
            })
            .unwrap();
        (u, t)
    });
    touched.push("+380 67 000 11 01".into());

    let t0 = std::time::Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let service = start_service(&config(&sim, dir.path(), true)).await;
    tokio::time::timeout(LONG, service.wait_serving())
        .await
        .expect("SERVING (warming) in time");
    use tonic_health::pb::health_check_response::ServingStatus;
    assert_eq!(health(service.addr()).await, ServingStatus::Serving as i32);
    eprintln!("SERVING (warming) after {:?}", t0.elapsed());

    // Answers during warming (the exports are held, so every one of them is WARMING).
    let all = numbers(&sim);
    let warming = answers(service.addr(), &all).await;
    assert!(warming.len() > 1000, "{} numbers answered", warming.len());
    assert!(
        warming
            .values()
            .all(|(r, l)| r.state == IndexState::Warming as i32
                && l.state == IndexState::Warming as i32),
        "every answer during the bootstrap says WARMING"
    );
    assert!(!service.index().read().is_loaded());

    // Changes during the bootstrap: a new caller with an open ticket, a reassigned ticket, a
    // solved ticket, a second phone for an existing caller.
    let (during_user, reassigned, solved) = sim.with_store(|s| {
        let (agent, t) = an_agent_and_an_open_ticket(s);
        let u = end_user(s, "During Bootstrap", "+380 67 000 11 02");
        s.create_ticket(NewTicket {
            requester_id: u,
            assignee_id: Some(agent),
            status: Some(Status::New),
            ..NewTicket::default()
        })
        .unwrap();
        let other_agent = s
            .user_ids()
            .filter(|id| {
                s.user(*id).is_some_and(|x| {
                    x.role.as_deref() == Some("agent")
                        && x.active != Some(false)
                        && x.suspended != Some(true)
                })
            })
            .nth(1)
            .unwrap();
        s.update_ticket(
            t,
            TicketPatch {
                assignee_id: Some(Some(other_agent)),
                ..TicketPatch::default()
            },
        )
        .unwrap();
        let solved = s
            .ticket_ids()
            .find(|id| {
                *id != t
                    && s.ticket(*id)
                        .is_some_and(|x| x.status.as_deref() == Some("open"))
            })
            .unwrap();
        s.update_ticket(
            solved,
            TicketPatch {
                status: Some(Status::Solved),
                ..TicketPatch::default()
            },
        )
        .unwrap();
        (u, t, solved)
    });
    touched.push("+380 67 000 11 02".into());
    let requester_numbers = |s: &sim::Store, ticket: i64| -> Vec<String> {
        let req = s.ticket(ticket).and_then(|t| t.requester_id).unwrap();
        let mut v: Vec<String> = s.user(req).and_then(|u| u.phone).into_iter().collect();
        v.extend(s.identities(req).into_iter().filter_map(|i| i.value));
        v
    };
    let more = sim.with_store(|s| {
        let mut v = requester_numbers(s, reassigned);
        v.extend(requester_numbers(s, solved));
        v
    });
    touched.extend(more);
    // A shared number routes by the latest ticket among all its customers: leave out every number
    // that any customer touched above shares.
    let touched_digits: Vec<String> = touched
        .iter()
        .map(|n| n.chars().filter(char::is_ascii_digit).collect::<String>())
        .collect();
    let is_touched = |n: &str| {
        let d: String = n.chars().filter(char::is_ascii_digit).collect();
        touched_digits
            .iter()
            .any(|t| t.ends_with(&d[d.len().saturating_sub(9)..]))
    };

    // Let the exports run (Zendesk's real 10 a minute): the index catches up and is READY.
    sim.set_config(|c| c.export_requests_per_minute = 10);
    tokio::time::timeout(LONG, service.wait_loaded())
        .await
        .expect("READY in time");
    eprintln!("READY after {:?}", t0.elapsed());

    // The oracle: today's full warm-up of the final account.
    let odir = tempfile::tempdir().unwrap();
    let oracle_service = start_service(&config(&sim, odir.path(), false)).await;
    tokio::time::timeout(LONG, oracle_service.wait_loaded())
        .await
        .expect("the full warm-up in time");
    eprintln!("oracle loaded after {:?}", t0.elapsed());
    let all = numbers(&sim);
    let oracle = answers(oracle_service.addr(), &all).await;

    // After READY: everything as the full warm-up says, the changes made around the bootstrap
    // included (a poll may be needed for the last second's changes).
    let mut last_diff = String::new();
    let caught_up = tokio::time::timeout(LONG, async {
        loop {
            let now = answers(service.addr(), &all).await;
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
            last_diff = format!(
                "{} differ, e.g. {:?}",
                diff.len(),
                &diff[..diff.len().min(5)]
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
    assert!(caught_up.is_ok(), "after READY: {last_diff}");
    // The changes made before and during the bootstrap are in.
    let route = |n: &str| oracle.get(n).map(|(r, _)| r.clone()).unwrap();
    assert_eq!(route("+380 67 000 11 01").customer, before_user);
    assert_eq!(route("+380 67 000 11 01").ticket, before_ticket);
    assert_eq!(route("+380 67 000 11 02").customer, during_user);
    assert_eq!(
        route("+380 67 000 11 02").decision,
        Decision::RouteToAgent as i32
    );

    // During warming: every number with an open ticket routed as the full warm-up says; a number
    // no customer had was "index warming"; nothing contradicted the final index.
    let mut open_checked = 0;
    let mut warming_unknown = 0;
    for (n, (r, l)) in &warming {
        if is_touched(n) {
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
            // Known while warming: the same customer and the same (default) decision.
            assert_eq!(
                (r.decision, r.customer, &r.reason),
                (o.decision, o.customer, &o.reason),
                "{n}"
            );
            assert_eq!(
                (l.found, l.customer, l.ticket),
                (ol.found, ol.customer, ol.ticket),
                "{n}"
            );
        }
    }
    assert!(
        open_checked > 20,
        "only {open_checked} open-ticket numbers checked"
    );
    eprintln!(
        "checked during warming: {} numbers, {open_checked} with an open ticket, {warming_unknown} not yet known",
        warming.len()
    );
    oracle_service.shutdown().await.unwrap();
    service.shutdown().await.unwrap();
    sim.shutdown().await;
}
