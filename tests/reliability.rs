//! Zendesk misbehaving, end to end (issue 6 §1): the simulator's fault injection (down, latency,
//! HTML and JSON 5xx pages, dropped connections, truncated 200 bodies, refused credentials) against
//! the real service over loopback. Each test checks the promise that matters to a PBX: routing keeps
//! answering from the index, accepted reports are never lost, and a refusal is not hammered.
//!
//! Waiting is on conditions with deadlines. The two "no retry storm" tests count the requests the
//! simulator saw over a fixed window: that window is the measurement, not a wait for luck.

mod common;

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use common::*;
use deskline::proto::{
    self, Decision, GetCallStatusRequest, GetCallStatusResponse, ReportCallRequest,
    RouteCallRequest, get_call_status_response::SyncState, resolver_client::ResolverClient,
};
use deskline_sim::{Faults, NewTicket, NewUser, SimHandle, Status};
use tonic::transport::Channel;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

type Grpc = ResolverClient<Channel>;

const CUSTOMER_PHONE: &str = "+380441234567";
const DIRECTORY: &str = "[routing.directory]\n\"Olena Petrenko\" = \"101\"\n";

fn report(call_id: &str, number: &str) -> ReportCallRequest {
    ReportCallRequest {
        call_id: call_id.into(),
        direction: proto::Direction::Incoming as i32,
        outcome: proto::Outcome::Answered as i32,
        client_number: number.into(),
        line_number: "+380441110000".into(),
        started_at: Some(prost_types::Timestamp {
            seconds: 1_714_557_600,
            nanos: 0,
        }),
        duration_seconds: 42,
        wait_seconds: 2,
        employee_name: "Olena Petrenko".into(),
        ..Default::default()
    }
}

async fn route(grpc: &mut Grpc, caller: &str) -> proto::RouteCallResponse {
    grpc.route_call(RouteCallRequest {
        caller: caller.into(),
        ..Default::default()
    })
    .await
    .expect("RouteCall must answer whatever Zendesk does")
    .into_inner()
}

async fn status(grpc: &mut Grpc, id: &str) -> GetCallStatusResponse {
    grpc.get_call_status(GetCallStatusRequest { call_id: id.into() })
        .await
        .unwrap()
        .into_inner()
}

/// Waits until the call is in `state` (DONE or FAILED end the wait early with a clear message).
async fn wait_state(
    grpc: &Grpc,
    id: &str,
    state: SyncState,
    deadline: Duration,
) -> GetCallStatusResponse {
    let what = format!("{id} to reach {state:?}");
    eventually(&what, deadline, || {
        let mut g = grpc.clone();
        async move {
            let st = status(&mut g, id).await;
            if st.state() == state {
                return Some(st);
            }
            assert!(
                !matches!(st.state(), SyncState::Done | SyncState::Failed),
                "{id} ended in {:?} while waiting for {state:?}: {st:#?}",
                st.state()
            );
            None
        }
    })
    .await
}

async fn health(addr: std::net::SocketAddr) -> i32 {
    HealthClient::new(channel(addr).await)
        .check(HealthCheckRequest {
            service: "deskline.v1.Resolver".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .status
}

fn assert_routes_to_olena(r: &proto::RouteCallResponse, a: &OneTicketAccount) {
    assert_eq!(r.decision(), Decision::RouteToAgent, "{r:#?}");
    assert_eq!(r.agent.as_ref().map(|x| x.zendesk_id), Some(a.olena));
    assert_eq!(r.ticket.as_ref().map(|t| t.id), Some(a.ticket));
}

fn comments_with(sim: &SimHandle, marker: &str) -> usize {
    sim.with_store(|s| {
        let tickets: Vec<i64> = s.ticket_ids().collect();
        tickets
            .into_iter()
            .flat_map(|t| s.comments(t))
            .filter(|c| {
                c.body
                    .as_deref()
                    .or(c.plain_body.as_deref())
                    .unwrap_or_default()
                    .lines()
                    .any(|l| l.trim() == marker)
            })
            .count()
    })
}

/// Unreachable at start-up with a snapshot: ready at once from it, health SERVING, the follower
/// keeps trying (the simulator sees its requests), and a change made during the outage arrives
/// once Zendesk is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_at_start_with_a_snapshot_serves_from_it_and_keeps_retrying() {
    let (store, a) = one_ticket_account(CUSTOMER_PHONE);
    let sim = start_sim(store, |_| {}).await;
    let dir = tempfile::tempdir().unwrap();
    let text = config_text(
        &sim,
        dir.path(),
        &format!("{DIRECTORY}[index]\npoll_seconds = 1\n"),
    );
    let service = start_service(&text).await;
    wait_loaded(&service).await;
    service.shutdown().await.unwrap();

    sim.set_faults(Faults {
        down: true,
        ..Faults::default()
    });
    sim.clear_requests();
    let service = start_service(&text).await;
    tokio::time::timeout(Duration::from_secs(5), service.wait_loaded())
        .await
        .expect("ready from the snapshot while Zendesk is down");
    assert_eq!(health(service.addr()).await, ServingStatus::Serving as i32);
    let mut grpc = client(service.addr()).await;
    assert_routes_to_olena(&route(&mut grpc, CUSTOMER_PHONE).await, &a);
    // Keeps retrying: more than one follower cycle reaches the (down) simulator.
    eventually(
        "the follower to keep asking a down Zendesk",
        DEADLINE,
        || {
            let n = sim
                .requests()
                .iter()
                .filter(|r| r.fault == Some("down"))
                .count();
            async move { (n >= 6).then_some(()) }
        },
    )
    .await;
    // A new customer with a ticket for Olena, made during the outage, is routed once it is back.
    let new_phone = "+380501112233";
    sim.with_store(|s| {
        let u = s
            .create_user(NewUser {
                name: "New During Outage".into(),
                phone: Some(new_phone.into()),
                ..NewUser::default()
            })
            .unwrap();
        s.create_ticket(NewTicket {
            requester_id: u,
            assignee_id: Some(a.olena),
            status: Some(Status::Open),
            ..NewTicket::default()
        })
        .unwrap();
    });
    assert_eq!(
        route(&mut grpc, new_phone).await.decision(),
        Decision::DefaultRouting
    );
    sim.set_faults(Faults::default());
    eventually("the outage's change to reach routing", DEADLINE, || {
        let mut g = grpc.clone();
        async move {
            (route(&mut g, new_phone).await.decision() == Decision::RouteToAgent).then_some(())
        }
    })
    .await;
    service.shutdown().await.unwrap();
    sim.shutdown().await;
}

/// Unreachable at start-up without a snapshot: NOT_SERVING (RouteCall UNAVAILABLE) while the
/// follower retries with backoff, SERVING with right answers once Zendesk answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_at_start_without_a_snapshot_serves_once_zendesk_is_back() {
    let (store, a) = one_ticket_account(CUSTOMER_PHONE);
    let sim = start_sim(store, |c| c.faults.down = true).await;
    let dir = tempfile::tempdir().unwrap();
    let service = start_service(&config_text(
        &sim,
        dir.path(),
        &format!("{DIRECTORY}[index]\npoll_seconds = 1\n"),
    ))
    .await;
    let mut grpc = client(service.addr()).await;
    eventually("a first failed export read", DEADLINE, || {
        let n = sim.requests().len();
        async move { (n > 0).then_some(()) }
    })
    .await;
    assert_eq!(
        health(service.addr()).await,
        ServingStatus::NotServing as i32
    );
    let e = grpc
        .route_call(RouteCallRequest {
            caller: CUSTOMER_PHONE.into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unavailable);
    sim.set_faults(Faults::default());
    tokio::time::timeout(DEADLINE, service.wait_loaded())
        .await
        .expect("loaded once Zendesk is back");
    // Health follows readiness through its own task: a moment after, not at the same instant.
    eventually("health to turn SERVING", DEADLINE, || async {
        (health(service.addr()).await == ServingStatus::Serving as i32).then_some(())
    })
    .await;
    assert_routes_to_olena(&route(&mut grpc, CUSTOMER_PHONE).await, &a);
    service.shutdown().await.unwrap();
    sim.shutdown().await;
}

/// Zendesk down mid-run: routing answers on with a growing `index_age_ms`; a report waits in
/// RETRY_WAIT and ends DONE, once, when Zendesk is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn down_mid_run_routing_answers_and_reports_wait_then_sync() {
    let (store, a) = one_ticket_account(CUSTOMER_PHONE);
    let sim = start_sim(store, |_| {}).await;
    let dir = tempfile::tempdir().unwrap();
    let service = start_service(&config_text(
        &sim,
        dir.path(),
        &format!("{DIRECTORY}[index]\npoll_seconds = 1\n"),
    ))
    .await;
    wait_loaded(&service).await;
    let mut grpc = client(service.addr()).await;
    let fresh = route(&mut grpc, CUSTOMER_PHONE).await;
    assert_routes_to_olena(&fresh, &a);
    let fresh_age = fresh.index_age_ms;

    sim.set_faults(Faults {
        down: true,
        ..Faults::default()
    });
    let down_at = Instant::now();
    grpc.report_call(report("down-1", CUSTOMER_PHONE))
        .await
        .unwrap();
    let waiting = wait_state(&grpc, "down-1", SyncState::RetryWait, DEADLINE).await;
    assert!(!waiting.last_error.is_empty(), "{waiting:#?}");
    // Routing meanwhile: every answer right, and the age grows past the outage's length.
    let mut answers = 0;
    eventually("index_age_ms to grow during the outage", DEADLINE, || {
        let mut g = grpc.clone();
        answers += 1;
        async move {
            let r = route(&mut g, CUSTOMER_PHONE).await;
            assert_routes_to_olena(&r, &a);
            let outage = down_at.elapsed().as_millis() as i64;
            (outage > 2_500 && r.index_age_ms >= 2_000 && r.index_age_ms > fresh_age).then_some(())
        }
    })
    .await;
    sim.set_faults(Faults::default());
    let done = wait_state(&grpc, "down-1", SyncState::Done, DEADLINE).await;
    assert!(done.attempts >= 2, "{done:#?}");
    assert!(done.comment_added);
    assert_eq!(comments_with(&sim, "Call ID: down-1"), 1);
    eprintln!(
        "down mid-run: {answers} routing answers during the outage, report done after {} attempts",
        done.attempts
    );
    service.shutdown().await.unwrap();
    sim.shutdown().await;
}

/// A Zendesk slower than `zendesk.timeout_seconds`: RouteCall stays fast, sync requests time out
/// and are retried, and the report is synced once Zendesk is quick again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_zendesk_times_out_and_retries_without_slowing_routing() {
    let (store, a) = one_ticket_account(CUSTOMER_PHONE);
    let sim = start_sim(store, |_| {}).await;
    let dir = tempfile::tempdir().unwrap();
    // The harness sets 5 s; a [zendesk] table cannot appear twice, so the value is replaced.
    let text = config_text(
        &sim,
        dir.path(),
        &format!("{DIRECTORY}[index]\npoll_seconds = 1\n"),
    )
    .replace("timeout_seconds = 5", "timeout_seconds = 1");
    let service = start_service(&text).await;
    wait_loaded(&service).await;
    let mut grpc = client(service.addr()).await;

    sim.set_faults(Faults {
        latency_ms: 1_500,
        ..Faults::default()
    });
    grpc.report_call(report("slow-1", CUSTOMER_PHONE))
        .await
        .unwrap();
    let started = Instant::now();
    let mut slowest = Duration::ZERO;
    let mut routed = 0;
    let waiting = loop {
        let t = Instant::now();
        assert_routes_to_olena(&route(&mut grpc, CUSTOMER_PHONE).await, &a);
        slowest = slowest.max(t.elapsed());
        routed += 1;
        let st = status(&mut grpc, "slow-1").await;
        if st.state() == SyncState::RetryWait {
            break st;
        }
        assert_ne!(
            st.state(),
            SyncState::Done,
            "a 1.5 s answer beat a 1 s timeout"
        );
        assert!(started.elapsed() < DEADLINE, "no timeout seen: {st:#?}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    };
    assert!(waiting.last_error.contains("timed out"), "{waiting:#?}");
    // Far below the 1 s Zendesk timeout even on a loaded machine: routing never waits on Zendesk.
    assert!(
        slowest < Duration::from_millis(500),
        "slowest RouteCall {slowest:?}"
    );
    sim.set_faults(Faults::default());
    let done = wait_state(&grpc, "slow-1", SyncState::Done, DEADLINE).await;
    assert_eq!(comments_with(&sim, "Call ID: slow-1"), 1);
    eprintln!(
        "slow Zendesk: {routed} RouteCalls while sync timed out, slowest {slowest:?}; synced after {} attempts",
        done.attempts
    );
    service.shutdown().await.unwrap();
    sim.shutdown().await;
}

/// HTML and JSON 5xx pages, dropped connections and truncated 200 bodies on every endpoint, from
/// the first request on: no crash, the warm-up completes, every report syncs exactly once, and the
/// answers are the same as without faults.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn html_pages_dropped_connections_and_truncated_bodies_are_retried() {
    let (store, a) = one_ticket_account(CUSTOMER_PHONE);
    let faults = Faults {
        error_rate: 0.15,
        drop_rate: 0.1,
        malformed_rate: 0.15,
        // Seeded, so the same faults come up in every run instead of a run that happens to see
        // too few of them to mean anything.
        seed: Some(1),
        ..Faults::default()
    };
    let sim = start_sim(store, |c| {
        c.faults = faults.clone();
        // Zendesk's search lags writes; here it does not, so what this test checks is the fault
        // handling, not the search lag (tests/sync.rs covers that).
        c.search_delay = Duration::ZERO;
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let service = start_service(&config_text(
        &sim,
        dir.path(),
        &format!(
            "{DIRECTORY}[index]\npoll_seconds = 1\n[sync]\nsenior_manager = \"Olena Petrenko\"\n"
        ),
    ))
    .await;
    tokio::time::timeout(Duration::from_secs(45), service.wait_loaded())
        .await
        .expect("warm-up completes through the faults");
    let mut grpc = client(service.addr()).await;
    assert_routes_to_olena(&route(&mut grpc, CUSTOMER_PHONE).await, &a);
    let calls = [
        ("bad-1", CUSTOMER_PHONE),
        ("bad-2", "+380671234501"),
        ("bad-3", "+380671234502"),
        ("bad-4", "+380671234501"),
    ];
    for (id, n) in calls {
        grpc.report_call(report(id, n)).await.unwrap();
    }
    for (id, _) in calls {
        let st = eventually(&format!("{id} to sync"), Duration::from_secs(50), || {
            let mut g = grpc.clone();
            async move {
                let st = status(&mut g, id).await;
                matches!(st.state(), SyncState::Done | SyncState::Failed).then_some(st)
            }
        })
        .await;
        assert_eq!(st.state(), SyncState::Done, "{st:#?}");
        let n = comments_with(&sim, &format!("Call ID: {id}"));
        assert_eq!(
            n,
            1,
            "{id}: {n} comments; {st:#?}; requests: {:#?}",
            sim.requests()
                .iter()
                .filter(|r| r.fault.is_some() || r.method != "GET")
                .collect::<Vec<_>>()
        );
    }
    for n in ["380671234501", "380671234502"] {
        let users = sim.with_store(|s| s.find_users_by_phone_digits(n));
        assert_eq!(users.len(), 1, "{n}: {users:?}");
        let tickets = sim.with_store(|s| s.tickets_of_requester(users[0]));
        assert_eq!(tickets.len(), 1, "{n}: {tickets:?}");
    }
    assert_routes_to_olena(&route(&mut grpc, CUSTOMER_PHONE).await, &a);
    let mut injected = std::collections::BTreeMap::new();
    for r in sim.requests() {
        if let Some(f) = r.fault {
            *injected.entry(f).or_insert(0usize) += 1;
        }
    }
    eprintln!(
        "faults injected over {} requests: {injected:?}",
        sim.requests().len()
    );
    // The fault stream is seeded, so this holds on every run; each kind alone is covered by the
    // simulator's and the client's own tests.
    assert!(
        injected.len() == 3 && injected.values().sum::<usize>() >= 4,
        "too few faults injected to mean anything: {injected:?}"
    );
    service.shutdown().await.unwrap();
    sim.shutdown().await;
}

/// Requests seen over `window`, starting now.
async fn requests_over(count: impl Fn() -> usize, window: Duration) -> usize {
    let before = count();
    tokio::time::sleep(window).await;
    count() - before
}

/// How many export reads a follower polling every second would make over `WINDOW` if it did not
/// back off: three exports a cycle.
const WINDOW: Duration = Duration::from_secs(6);
const WITHOUT_BACKOFF: usize = 3 * 6;

/// A 401 mid-run (the token was revoked): a clear error on the report (FAILED naming the refusal,
/// not retried), routing answers on from the index, and the follower backs off instead of polling
/// every second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthorized_is_a_clear_error_without_a_retry_storm() {
    let (store, a) = one_ticket_account(CUSTOMER_PHONE);
    let sim = start_sim(store, |_| {}).await;
    let dir = tempfile::tempdir().unwrap();
    let service = start_service(&config_text(
        &sim,
        dir.path(),
        &format!("{DIRECTORY}[index]\npoll_seconds = 1\n"),
    ))
    .await;
    wait_loaded(&service).await;
    let mut grpc = client(service.addr()).await;
    sim.set_config(|c| c.token = "revoked-and-replaced".into());
    grpc.report_call(report("auth-1", CUSTOMER_PHONE))
        .await
        .unwrap();
    let st = eventually("the report to fail on 401", DEADLINE, || {
        let mut g = grpc.clone();
        async move {
            let st = status(&mut g, "auth-1").await;
            matches!(st.state(), SyncState::Done | SyncState::Failed).then_some(st)
        }
    })
    .await;
    assert_eq!(st.state(), SyncState::Failed, "{st:#?}");
    assert!(
        st.last_error.contains("401") && st.last_error.contains("credentials"),
        "{st:#?}"
    );
    assert_eq!(st.attempts, 1, "a refusal is not retried: {st:#?}");
    let seen = requests_over(|| sim.requests().len(), WINDOW).await;
    assert_routes_to_olena(&route(&mut grpc, CUSTOMER_PHONE).await, &a);
    let refused = sim.requests().iter().filter(|r| r.status == 401).count();
    eprintln!(
        "401: {seen} requests over {WINDOW:?} (a 1 s poll without backoff: {WITHOUT_BACKOFF}); {refused} refused in all"
    );
    assert!(seen <= WITHOUT_BACKOFF / 2, "retry storm: {seen} requests");
    service.shutdown().await.unwrap();
    sim.shutdown().await;
}

/// A 403 from the first request (a role without API access), from a stand-in server that refuses
/// everything: NOT_SERVING, and no retry storm.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forbidden_at_start_is_not_serving_without_a_retry_storm() {
    let hits = Arc::new(AtomicUsize::new(0));
    let counter = hits.clone();
    let app = axum::Router::new().fallback(move || {
        let counter = counter.clone();
        async move {
            counter.fetch_add(1, Ordering::SeqCst);
            (
                axum::http::StatusCode::FORBIDDEN,
                [("content-type", "application/json")],
                r#"{"error":"Forbidden","description":"You do not have access to this page. Please contact the account owner of this help desk for further help."}"#,
            )
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "[zendesk]\nurl = \"{url}\"\nemail = \"agent@deskline.test\"\ntoken = \"forbidden-token\"\ntimeout_seconds = 5\n\
         [storage]\ndata_dir = \"{}\"\n[index]\npoll_seconds = 1\n",
        dir.path().display()
    );
    let service = start_service(&text).await;
    eventually("a first request", DEADLINE, || {
        let n = hits.load(Ordering::SeqCst);
        async move { (n > 0).then_some(()) }
    })
    .await;
    let seen = requests_over(|| hits.load(Ordering::SeqCst), WINDOW).await;
    assert_eq!(
        health(service.addr()).await,
        ServingStatus::NotServing as i32
    );
    eprintln!(
        "403: {seen} requests over {WINDOW:?} (a 1 s poll without backoff: {WITHOUT_BACKOFF})"
    );
    assert!(seen <= WITHOUT_BACKOFF / 2, "retry storm: {seen} requests");
    service.shutdown().await.unwrap();
    server.abort();
}

/// Issue 10 item 7: another integration spends part of a small account's budget (a 30-a-window
/// account, about two thirds taken by a steady second client) while Deskline makes 30 calls, 4 at
/// a time, against 20 % 5xx, with its own budget configured far above the plan. Every Retry-After
/// period the simulator announces to Deskline may see at most one more Deskline request arrive (one
/// already on its way when the 429 was answered); the rest must wait, and after the pause only one
/// request goes until it is answered. The arrivals are counted by the simulator.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_burst_into_a_fresh_429_while_another_client_spends_the_budget() {
    use deskline::{
        config::Credentials,
        zendesk::{Client, ClientOptions},
    };
    const WINDOW_MS: u64 = 3000;
    let sim = start_sim(store_with_owner(), |c| {
        c.requests_per_minute = 30;
        c.rate_window = Duration::from_millis(WINDOW_MS);
    })
    .await;
    sim.set_faults(Faults {
        error_rate: 0.2,
        ..Faults::default()
    });
    let client = Client::new(ClientOptions {
        base_url: sim.url(),
        credentials: Credentials::ApiToken {
            email: sim.email().to_owned(),
            token: secrecy::SecretString::from(sim.token().to_owned()),
        },
        requests_per_minute: 10_000,
        export_requests_per_minute: 100,
        timeout: Duration::from_secs(5),
        max_retries: 20,
        rate_window: std::time::Duration::from_secs(60),
    })
    .unwrap();
    client.set_backoff_base(Duration::from_millis(5));

    // The other integration: one request every 150 ms (20 of each 30-request window), whatever
    // Zendesk answers.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let other = {
        let (url, email, token, stop) = (
            sim.url(),
            sim.email().to_owned(),
            sim.token().to_owned(),
            stop.clone(),
        );
        tokio::spawn(async move {
            let http = reqwest::Client::new();
            while !stop.load(Ordering::Relaxed) {
                let _ = http
                    .get(format!("{url}/api/v2/ticket_fields.json"))
                    .basic_auth(format!("{email}/token"), Some(&token))
                    .send()
                    .await;
                tokio::time::sleep(Duration::from_millis(150)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(600)).await;

    let done = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let (c, done) = (client.clone(), done.clone());
        tasks.push(tokio::spawn(async move {
            while done.fetch_add(1, Ordering::SeqCst) < 30 {
                c.me().await.expect("every call succeeds in the end");
            }
        }));
    }
    tokio::time::timeout(Duration::from_secs(120), async {
        for t in tasks {
            t.await.unwrap();
        }
    })
    .await
    .expect("30 calls did not finish in time");
    stop.store(true, Ordering::Relaxed);
    other.await.unwrap();

    let records = sim.requests();
    let ours = |r: &&deskline_sim::RequestRecord| r.path.starts_with("/api/v2/users/me");
    // What the simulator counted against its window (refusals and injected 5xx are not counted).
    let admitted: Vec<u64> = records
        .iter()
        .filter(|r| r.status != 429 && r.status != 401 && r.fault != Some("error"))
        .map(|r| r.at_ms)
        .collect();
    let our_429s: Vec<u64> = records
        .iter()
        .filter(ours)
        .filter(|r| r.status == 429)
        .map(|r| r.at_ms)
        .collect();
    let mut worst = 0;
    let mut inside_total = 0;
    for &t in &our_429s {
        // The Retry-After the simulator sent: until the oldest admitted request leaves the window,
        // in whole seconds rounded up.
        let oldest = admitted
            .iter()
            .copied()
            .filter(|&a| a <= t && a + WINDOW_MS > t)
            .min()
            .unwrap_or(t);
        let retry_ms = (oldest + WINDOW_MS - t).div_ceil(1000).max(1) * 1000;
        // Arrivals after this 429 and before its period ends (a little slack at the end: the
        // client measures the pause from when it read the answer).
        let inside = records
            .iter()
            .filter(ours)
            .filter(|r| r.at_ms >= t && r.at_ms + 50 < t + retry_ms)
            .count()
            - 1; // the 429'd request itself
        worst = worst.max(inside);
        inside_total += inside;
    }
    let our_total = records.iter().filter(ours).count();
    eprintln!(
        "deskline requests {our_total}, its 429s {}, arrivals inside a Retry-After period {inside_total}, worst period {worst}",
        our_429s.len()
    );
    assert!(
        worst <= 1,
        "{worst} Deskline requests arrived inside one Retry-After period ({inside_total} over {} 429s)",
        our_429s.len()
    );
    assert_eq!(
        done.load(Ordering::SeqCst),
        34,
        "30 calls made, 4 workers saw the end"
    );
    sim.shutdown().await;
}
