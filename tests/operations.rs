//! The operator's path end to end: `deskline demo` and `deskline check` as real processes (the
//! binary Cargo built for this test run), and the metrics server of an in-process service.
//! Every wait is on a condition with a deadline.

mod common;

use std::{collections::BTreeMap, process::Stdio, time::Duration};

use common::*;
use deskline::proto::{self, LookupCallerRequest, ReportCallRequest, RouteCallRequest};
use deskline_sim::{NewTicket, NewUser, OWNER_EMAIL, Role, Status, Store};
use tokio::io::{AsyncBufReadExt, BufReader};

const BIN: &str = env!("CARGO_BIN_EXE_deskline");

/// The demo generates an account and warms up in a debug build on a loaded machine.
const DEMO_DEADLINE: Duration = Duration::from_secs(180);

fn user(s: &mut Store, name: &str, email: Option<&str>, phone: Option<&str>, role: Role) -> i64 {
    s.create_user(NewUser {
        name: name.into(),
        email: email.map(Into::into),
        phone: phone.map(Into::into),
        role: Some(role),
        organization_id: None,
        external_id: None,
        shared_phone_number: false,
        suspended: false,
        user_fields: Default::default(),
    })
    .unwrap()
}

// ---------------------------------------------------------------------------------------------
// deskline demo

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_prints_real_answers_and_exits_cleanly_on_sigint() {
    let mut child = tokio::process::Command::new(BIN)
        .args(["demo", "--listen", "127.0.0.1:0"])
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("the deskline binary starts");
    let mut stdout = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut out = String::new();
    let ready = tokio::time::timeout(DEMO_DEADLINE, async {
        while let Some(line) = stdout.next_line().await.unwrap() {
            out.push_str(&line);
            out.push('\n');
            if line.contains("Serving until Ctrl-C") {
                return true;
            }
        }
        false
    })
    .await;
    assert!(
        matches!(ready, Ok(true)),
        "the demo did not reach its serving line:\n{out}"
    );

    let has = |needle: &str| out.contains(needle);
    assert!(has("Zendesk simulator: http://127.0.0.1:"), "{out}");
    assert!(has("Deskline: gRPC on 127.0.0.1:"), "{out}");
    // A routed call, with its agent and extension.
    let routed = out
        .lines()
        .find(|l| l.contains("-> ROUTE_TO_AGENT"))
        .unwrap_or_else(|| panic!("no routed call shown:\n{out}"));
    assert!(
        routed.contains("agent=") && routed.contains("ext=\"1"),
        "{routed}"
    );
    // Default routing with a reason (the unknown number at least).
    assert!(
        out.lines().any(|l| l.contains("-> DEFAULT_ROUTING")
            && l.contains("reason=\"no customer with this number\"")),
        "{out}"
    );
    // Caller ID with both links.
    let link = |prefix: &str| {
        out.lines()
            .find_map(|l| l.trim().strip_prefix(prefix).map(|v| v.trim().to_owned()))
            .unwrap_or_default()
    };
    let contact = link("contact_url:");
    let lead = link("lead_url:");
    assert!(
        contact.starts_with("http://127.0.0.1:") && contact.contains("/agent/users/"),
        "{out}"
    );
    assert!(
        lead.starts_with("http://127.0.0.1:") && lead.contains("/agent/tickets/"),
        "{out}"
    );
    // The synced call: done, with what it created in the simulated Zendesk.
    assert!(has("GetCallStatus: DONE"), "{out}");
    assert!(
        has("created user=true") && has("ticket=true"),
        "the synced call created no user and ticket:\n{out}"
    );
    assert!(has("RouteCall +380 93 777 12 34 right away"), "{out}");
    assert!(has("grpcurl -plaintext"), "{out}");

    let pid = child.id().expect("the demo is running").to_string();
    let sent = std::process::Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .expect("kill runs");
    assert!(sent.success());
    let status = tokio::time::timeout(DEADLINE, child.wait())
        .await
        .expect("the demo exits after SIGINT")
        .unwrap();
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        use tokio::io::AsyncReadExt;
        let _ = e.read_to_string(&mut err).await;
    }
    assert!(status.success(), "exit {status:?}; stderr:\n{err}");
}

// ---------------------------------------------------------------------------------------------
// deskline check

/// An account whose agents the directories below are compared with.
fn check_store() -> Store {
    let mut s = Store::new();
    user(
        &mut s,
        "Olena Petrenko",
        Some(OWNER_EMAIL),
        None,
        Role::Admin,
    );
    user(
        &mut s,
        "Ivan Kovalenko",
        Some("ivan@acme.test"),
        None,
        Role::Agent,
    );
    user(
        &mut s,
        "Maria Shevchenko",
        Some("maria@acme.test"),
        None,
        Role::Agent,
    );
    user(
        &mut s,
        "Big Boss",
        None,
        Some("+380441112233"),
        Role::EndUser,
    );
    s
}

struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

async fn run_check(config: &str) -> Run {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("deskline.toml");
    std::fs::write(&path, config).unwrap();
    let child = tokio::process::Command::new(BIN)
        .arg("check")
        .arg("--config")
        .arg(&path)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let out = tokio::time::timeout(DEADLINE, child.wait_with_output())
        .await
        .expect("deskline check finishes")
        .unwrap();
    Run {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn check_config(url: &str, email: &str, token: &str, extra: &str) -> String {
    format!(
        "[zendesk]\nurl = \"{url}\"\nemail = \"{email}\"\ntoken = \"{token}\"\ntimeout_seconds = 5\n{extra}"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_reports_each_mismatch_and_exits_1() {
    let sim = start_sim(check_store(), |_| {}).await;
    // "Іvan" starts with a Cyrillic І; "olena PETRENKO" differs by case only.
    let extra = "[routing.directory]\n\"olena PETRENKO\" = \"101\"\n\"Іvan Kovalenko\" = \"102\"\n\
                 \"Maria Shevchenko\" = \"103\"\n\"Nobody Here\" = \"104\"\n\
                 [sync]\nsenior_manager = \"Big Boss\"\n\
                 [[sync.fields]]\nentity = \"user\"\nfield = \"utm_source\"\nsource = \"utm_source\"\n\
                 [[sync.fields]]\nentity = \"user\"\nfield = \"lead_channel\"\nsource = \"utm_medium\"\n\
                 [[sync.fields]]\nentity = \"ticket\"\nfield = \"999\"\nsource = \"scheme_name\"\n";
    let run = run_check(&check_config(&sim.url(), sim.email(), sim.token(), extra)).await;
    let out = &run.stdout;
    assert_eq!(run.code, Some(1), "stdout:\n{out}\nstderr:\n{}", run.stderr);
    let has = |needle: &str| out.lines().any(|l| l.contains(needle));
    assert!(has("ok: Zendesk at"), "{out}");
    assert!(
        has(
            "note: directory \"olena PETRENKO\" (ext 101) matches agent \"Olena Petrenko\" despite letter case"
        ),
        "{out}"
    );
    assert!(
        has(
            "problem: directory \"Іvan Kovalenko\" (ext 102) matches no agent: agent \"Ivan Kovalenko\" differs only by look-alike"
        ),
        "{out}"
    );
    assert!(
        has("problem: directory \"Nobody Here\" (ext 104) matches no active Zendesk agent"),
        "{out}"
    );
    assert!(
        has("problem: sync.senior_manager \"Big Boss\" is not an active Zendesk agent"),
        "{out}"
    );
    assert!(
        has("problem: sync.fields[1]: user field key \"lead_channel\" does not exist"),
        "{out}"
    );
    assert!(
        has("problem: sync.fields[2]: ticket field id \"999\" does not exist"),
        "{out}"
    );
    assert!(
        !has("sync.fields[0]"),
        "an existing field was reported:\n{out}"
    );
    assert!(
        !has("\"Maria Shevchenko\""),
        "an exact match was reported:\n{out}"
    );
    assert!(has("5 problem(s)"), "{out}");
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_passes_a_good_config() {
    let sim = start_sim(check_store(), |_| {}).await;
    let extra = "[routing.directory]\n\"Olena Petrenko\" = \"101\"\n\"Ivan Kovalenko\" = \"102\"\n\
                 \"Maria Shevchenko\" = \"103\"\n\
                 [sync]\nsenior_manager = \"Olena Petrenko\"\n\
                 [[sync.fields]]\nentity = \"user\"\nfield = \"utm_source\"\nsource = \"utm_source\"\n";
    let run = run_check(&check_config(&sim.url(), sim.email(), sim.token(), extra)).await;
    assert_eq!(
        run.code,
        Some(0),
        "stdout:\n{}\nstderr:\n{}",
        run.stdout,
        run.stderr
    );
    assert!(run.stdout.contains("0 problem(s)"), "{}", run.stdout);
    assert!(!run.stdout.contains("problem:"), "{}", run.stdout);
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_explains_bad_credentials_without_the_token() {
    let sim = start_sim(check_store(), |_| {}).await;
    let secret = "wrong-secret-token-7f3a9c";
    let run = run_check(&check_config(&sim.url(), sim.email(), secret, "")).await;
    let all = format!("{}{}", run.stdout, run.stderr);
    assert_eq!(run.code, Some(1), "{all}");
    assert!(
        run.stdout.contains("problem:")
            && run.stdout.contains("refused the credentials")
            && run.stdout.contains("401"),
        "{all}"
    );
    assert!(!all.contains(secret), "the token leaked:\n{all}");
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_explains_an_unreachable_zendesk() {
    // A port that was just free: nothing listens there.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let url = format!("http://127.0.0.1:{port}");
    let run = run_check(&check_config(&url, "a@acme.test", "some-token-123", "")).await;
    assert_eq!(
        run.code,
        Some(1),
        "stdout:\n{}\nstderr:\n{}",
        run.stdout,
        run.stderr
    );
    let line = run
        .stdout
        .lines()
        .find(|l| l.starts_with("problem:"))
        .unwrap_or_else(|| panic!("no problem line:\n{}", run.stdout));
    assert!(line.contains(&url), "{line}");
    assert!(
        line.to_lowercase().contains("connect"),
        "the message does not say the connection failed: {line}"
    );
    assert!(!run.stdout.contains("some-token-123"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_names_a_bad_config_key_and_exits_2() {
    let config = check_config(
        "https://acme.zendesk.com",
        "a@acme.test",
        "t",
        "[server]\nlisten_adress = \"127.0.0.1:1\"\n",
    );
    let run = run_check(&config).await;
    assert_eq!(run.code, Some(2), "{}{}", run.stdout, run.stderr);
    assert!(
        run.stderr
            .contains("config error: server.listen_adress: unknown field `listen_adress`"),
        "{}",
        run.stderr
    );
}

// ---------------------------------------------------------------------------------------------
// metrics

/// One scrape, as `series → value` (the series text is the name with its labels).
struct Scrape(BTreeMap<String, f64>, String);

impl Scrape {
    fn get(&self, series: &str) -> f64 {
        self.try_get(series)
            .unwrap_or_else(|| panic!("no series {series} in:\n{}", self.1))
    }

    fn try_get(&self, series: &str) -> Option<f64> {
        self.0.get(series).copied()
    }

    fn any(&self, prefix: &str) -> bool {
        self.0.keys().any(|k| k.starts_with(prefix))
    }
}

/// A plain HTTP client that never goes through a proxy (loopback only).
fn http() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().build().unwrap()
}

async fn scrape(addr: std::net::SocketAddr) -> Scrape {
    let resp = http()
        .get(format!("http://{addr}/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let ctype = resp.headers()["content-type"].to_str().unwrap().to_owned();
    assert!(ctype.starts_with("text/plain; version=0.0.4"), "{ctype}");
    let text = resp.text().await.unwrap();
    let map = text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            Some((series.to_owned(), value.parse().ok()?))
        })
        .collect();
    Scrape(map, text)
}

async fn healthz(addr: std::net::SocketAddr) -> u16 {
    http()
        .get(format!("http://{addr}/healthz"))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

const CUSTOMER_PHONE: &str = "+380441234567";

fn metrics_store() -> Store {
    let mut s = Store::new();
    let olena = user(
        &mut s,
        "Olena Petrenko",
        Some(OWNER_EMAIL),
        None,
        Role::Admin,
    );
    let customer = user(
        &mut s,
        "Taras Customer",
        None,
        Some(CUSTOMER_PHONE),
        Role::EndUser,
    );
    s.create_ticket(NewTicket {
        requester_id: customer,
        assignee_id: Some(olena),
        status: Some(Status::Open),
        ..NewTicket::default()
    })
    .unwrap();
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_serve_the_named_series_and_move_with_rpcs() {
    let sim = start_sim(metrics_store(), |_| {}).await;
    let dir = tempfile::tempdir().unwrap();
    let service = start_service(&config_text(
        &sim,
        dir.path(),
        "[server]\nmetrics_listen = \"127.0.0.1:0\"\n[routing.directory]\n\"Olena Petrenko\" = \"101\"\n",
    ))
    .await;
    wait_loaded(&service).await;
    let maddr = service.metrics_addr().expect("metrics are on");
    assert_eq!(healthz(maddr).await, 200);

    let before = scrape(maddr).await;
    // Everything the issue names is there.
    assert_eq!(before.get("deskline_index_loaded"), 1.0);
    assert_eq!(
        before.get(r#"deskline_index_records{kind="customers"}"#),
        1.0
    );
    assert_eq!(before.get(r#"deskline_index_records{kind="agents"}"#), 1.0);
    assert_eq!(
        before.get(r#"deskline_index_records{kind="open_tickets"}"#),
        1.0
    );
    assert_eq!(before.get(r#"deskline_index_records{kind="phones"}"#), 1.0);
    before.get(r#"deskline_index_records{kind="organizations"}"#);
    for export in ["users", "tickets", "organizations"] {
        let age = before.get(&format!(
            r#"deskline_index_age_seconds{{export="{export}"}}"#
        ));
        assert!((0.0..60.0).contains(&age), "{export}: {age}");
    }
    for state in ["queued", "in_progress", "retry_wait", "done", "failed"] {
        assert_eq!(
            before.get(&format!(r#"deskline_sync_jobs{{state="{state}"}}"#)),
            0.0
        );
    }
    assert!(
        before.get(r#"deskline_zendesk_responses_total{endpoint="GET /api/v2/incremental/users/cursor",status="200"}"#)
            >= 1.0,
        "{}",
        before.1
    );
    assert!(before.get("deskline_zendesk_requests_sent_total") >= 3.0);
    assert_eq!(before.get("deskline_zendesk_rate_limited_total"), 0.0);
    assert!(before.get(r#"deskline_zendesk_budget_used{scope="all"}"#) >= 3.0);
    assert_eq!(
        before.get(r#"deskline_zendesk_budget_limit{scope="all"}"#),
        100_000.0
    );
    before.get(r#"deskline_zendesk_budget_limit{scope="export"}"#);
    before.get("deskline_zendesk_paused_seconds");
    // SQLite: the in-process budget, no cluster series.
    assert_eq!(before.get("deskline_zendesk_budget_shared"), 0.0);
    assert!(!before.1.contains("deskline_zendesk_cluster_budget_used"));
    assert!(
        before
            .1
            .contains("# TYPE deskline_rpc_duration_seconds histogram")
    );

    let mut client = client(service.addr()).await;
    let route = |caller: &str| RouteCallRequest {
        caller: caller.into(),
        ..Default::default()
    };
    for _ in 0..2 {
        let r = client
            .route_call(route("044 123 45 67"))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.decision, proto::Decision::RouteToAgent as i32);
    }
    let r = client
        .route_call(route("+380 99 000 00 01"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.reason, "no customer with this number");
    let e = client.route_call(route("")).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    client
        .lookup_caller(LookupCallerRequest {
            number: CUSTOMER_PHONE.into(),
        })
        .await
        .unwrap();

    let after = scrape(maddr).await;
    let delta = |series: &str| after.get(series) - before.try_get(series).unwrap_or(0.0);
    let ok = r#"{method="RouteCall",code="OK"}"#;
    assert_eq!(delta(&format!("deskline_rpc_requests_total{ok}")), 3.0);
    assert_eq!(
        delta(&format!("deskline_rpc_duration_seconds_count{ok}")),
        3.0
    );
    assert!(after.get(&format!("deskline_rpc_duration_seconds_sum{ok}")) > 0.0);
    assert_eq!(
        delta(r#"deskline_rpc_duration_seconds_bucket{method="RouteCall",code="OK",le="+Inf"}"#),
        3.0
    );
    assert_eq!(
        delta(r#"deskline_rpc_requests_total{method="RouteCall",code="INVALID_ARGUMENT"}"#),
        1.0
    );
    assert_eq!(
        delta(r#"deskline_rpc_requests_total{method="LookupCaller",code="OK"}"#),
        1.0
    );
    assert_eq!(
        delta(r#"deskline_routing_decisions_total{reason="routed"}"#),
        2.0
    );
    assert_eq!(
        delta(r#"deskline_routing_decisions_total{reason="no_customer"}"#),
        1.0
    );
    assert_eq!(
        delta(r#"deskline_routing_decisions_total{reason="no_extension"}"#),
        0.0
    );

    // A reported call moves the queue gauges and the Zendesk write counters.
    client
        .report_call(ReportCallRequest {
            call_id: "ops-metrics-1".into(),
            direction: proto::Direction::Incoming as i32,
            outcome: proto::Outcome::Answered as i32,
            client_number: "+380 93 555 44 33".into(),
            started_at: Some(prost_types::Timestamp {
                seconds: 1_700_000_000,
                nanos: 0,
            }),
            employee_name: "Olena Petrenko".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let done = eventually("the reported call to show as done", DEADLINE, || async {
        let s = scrape(maddr).await;
        (s.get(r#"deskline_sync_jobs{state="done"}"#) == 1.0).then_some(s)
    })
    .await;
    assert_eq!(
        done.get(r#"deskline_rpc_requests_total{method="ReportCall",code="OK"}"#),
        1.0
    );
    assert!(
        done.any(r#"deskline_zendesk_responses_total{endpoint="POST /api/v2/tickets""#),
        "{}",
        done.1
    );

    // Low-cardinality labels only: no number, no call id.
    for secret in ["380441234567", "380935554433", "ops-metrics-1"] {
        assert!(!done.1.contains(secret), "{secret} is in the metrics");
    }
    service.shutdown().await.unwrap();
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_is_503_until_the_index_is_loaded() {
    let sim = start_sim(metrics_store(), |c| c.faults.down = true).await;
    let dir = tempfile::tempdir().unwrap();
    let service = start_service(&config_text(
        &sim,
        dir.path(),
        "[server]\nmetrics_listen = \"127.0.0.1:0\"\n[index]\npoll_seconds = 1\n",
    ))
    .await;
    let maddr = service.metrics_addr().unwrap();
    assert_eq!(healthz(maddr).await, 503);
    let s = scrape(maddr).await;
    assert_eq!(s.get("deskline_index_loaded"), 0.0);
    assert!(!s.any("deskline_index_age_seconds{"), "{}", s.1);
    // The failed export requests are counted by status.
    eventually("the 503s from Zendesk to be counted", DEADLINE, || async {
        scrape(maddr)
            .await
            .0
            .iter()
            .any(|(k, v)| {
                k.starts_with("deskline_zendesk_responses_total{")
                    && k.contains(r#"status="503""#)
                    && *v >= 1.0
            })
            .then_some(())
    })
    .await;

    sim.set_faults(Default::default());
    eventually(
        "/healthz to turn 200 once Zendesk is back",
        DEADLINE,
        || async { (healthz(maddr).await == 200).then_some(()) },
    )
    .await;
    assert_eq!(scrape(maddr).await.get("deskline_index_loaded"), 1.0);
    service.shutdown().await.unwrap();
    sim.shutdown().await;
}
