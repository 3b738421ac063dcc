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

use std::time::Duration;

use common::{answers::*, *};
use deskline::proto::{Decision, IndexState};
use deskline_sim::{self as sim, NewTicket, Status, TicketPatch};

const LONG: Duration = Duration::from_secs(90);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_while_warming_agree_with_a_full_warm_up() {
    // The exports are held until the checks during warming are done (see the module doc).
    let sim = start_sim(
        sim::generate(&answers::account()),
        answers::scaled_real_limits,
    )
    .await;

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
    let service = start_service(&answers::config(&sim, dir.path(), true)).await;
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
    let all = numbers(&sim);
    let (_odir, oracle_service, oracle) = oracle(&sim, &all, LONG).await;
    eprintln!("oracle loaded after {:?}", t0.elapsed());

    // After READY: everything as the full warm-up says, the changes made around the bootstrap
    // included (a poll may be needed for the last second's changes).
    wait_agrees(service.addr(), &all, &oracle, LONG).await;
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
    let (open_checked, warming_unknown) =
        check_warming(&warming, &oracle, &holders(&sim), is_touched);
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
