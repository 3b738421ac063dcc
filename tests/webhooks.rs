//! End to end through the simulator's webhook delivery (issue 13): with the export poll at 10
//! minutes only webhooks can explain a change reaching `RouteCall` / `LookupCaller` within 1 s.
//! Also: refused requests (status, nothing applied, nothing of the body logged) and duplicated and
//! reordered deliveries converging to what a clean warm-up of the final state gives.

mod common;

use std::{
    io::Write,
    sync::{Arc, OnceLock},
    time::{Duration, Instant},
};

use common::*;
use deskline::{
    app::Service,
    metrics::WebhookResult,
    phone::PhoneParser,
    proto::{self, Decision, LookupCallerRequest, RouteCallRequest},
    webhooks::{install, verify::sign},
    zendesk::Client,
};
use deskline_sim::{NewTicket, NewUser, Role, SimHandle, Status, TicketPatch, UserPatch};
use parking_lot::Mutex;
use secrecy::ExposeSecret as _;

/// Every log line of this test binary, to prove bodies never reach the logs.
fn logs() -> &'static Arc<Mutex<Vec<u8>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let b = buf.clone();
        let _ = tracing_subscriber::fmt()
            .with_env_filter("debug,h2=info,hyper=info,tower=info,reqwest=info")
            .with_writer(move || Capture(b.clone()))
            .try_init();
        buf
    })
}

struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

const POLL_10_MIN: &str = "[index]\npoll_seconds = 600\n";
const DIRECTORY: &str =
    "[routing.directory]\n\"Olena Petrenko\" = \"101\"\n\"Mykola Ivanenko\" = \"102\"\n";

fn zendesk_client(sim: &SimHandle, dir: &std::path::Path) -> Client {
    let cfg = parse_config(&config_text(sim, dir, ""));
    Client::new(cfg.client_options().unwrap()).unwrap()
}

/// Installs the webhook (placeholder URL first: the secret goes into the service's config), starts
/// the service with webhooks on and a 10-minute export poll, then points the webhook at it.
async fn service_with_webhooks(sim: &SimHandle, dir: &std::path::Path, extra: &str) -> Service {
    service_with_webhooks_polling(sim, dir, extra, POLL_10_MIN).await
}

/// [`service_with_webhooks`] with the export poll given as an `[index]` table.
async fn service_with_webhooks_polling(
    sim: &SimHandle,
    dir: &std::path::Path,
    extra: &str,
    poll: &str,
) -> Service {
    let _ = logs();
    let zd = zendesk_client(sim, dir);
    let first = install::install(
        &zd,
        "http://127.0.0.1:9/zendesk/webhook",
        install::Mode::Events,
    )
    .await
    .unwrap();
    assert!(first.webhooks[0].1, "created");
    let secret = first.secrets[0].expose_secret().to_owned();
    let text = config_text(
        sim,
        dir,
        &format!(
            "{poll}{extra}[webhooks]\nlisten = \"127.0.0.1:0\"\nsigning_secret = \"{secret}\"\n"
        ),
    );
    let service = Service::start(
        parse_config(&text),
        tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
    )
    .await
    .unwrap();
    let url = format!(
        "http://{}/zendesk/webhook",
        service.webhooks_addr().unwrap()
    );
    let again = install::install(&zd, &url, install::Mode::Events)
        .await
        .unwrap();
    let (w, created) = &again.webhooks[0];
    assert!(!created, "the second install updates the same webhook");
    assert_eq!(
        (w.id.as_str(), w.endpoint.as_str()),
        (first.webhooks[0].0.id.as_str(), url.as_str())
    );
    assert_eq!(again.secrets[0].expose_secret(), secret);
    assert!(install::check_line(&zd, Some(&url)).await.contains("ok:"));
    wait_loaded(&service).await;
    service
}

async fn route(
    c: &mut proto::resolver_client::ResolverClient<tonic::transport::Channel>,
    caller: &str,
) -> proto::RouteCallResponse {
    c.route_call(RouteCallRequest {
        caller: caller.into(),
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner()
}

fn ext(r: &proto::RouteCallResponse) -> &str {
    r.agent.as_ref().map_or("", |a| a.extension.as_str())
}

/// Waits (at most 1 s) for `ok` on `RouteCall(caller)`, returning how long it took.
async fn route_within_1s(
    c: &mut proto::resolver_client::ResolverClient<tonic::transport::Channel>,
    caller: &str,
    what: &str,
    ok: impl Fn(&proto::RouteCallResponse) -> bool,
) -> Duration {
    let t0 = Instant::now();
    loop {
        let r = route(c, caller).await;
        if ok(&r) {
            return t0.elapsed();
        }
        assert!(
            t0.elapsed() < Duration::from_secs(1),
            "{what}: not within 1 s: {r:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits (at most 1 s) for `LookupCaller(number)` to find a customer, returning how long it took.
async fn found_within_1s(
    c: &mut proto::resolver_client::ResolverClient<tonic::transport::Channel>,
    number: &str,
    what: &str,
) -> Duration {
    let t0 = Instant::now();
    loop {
        let found = c
            .lookup_caller(LookupCallerRequest {
                number: number.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .found;
        if found {
            return t0.elapsed();
        }
        assert!(
            t0.elapsed() < Duration::from_secs(1),
            "{what}: not within 1 s"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_reach_routing_within_a_second_through_webhooks() {
    let (mut store, a) = one_ticket_account("+380441234567");
    let mykola = store
        .create_user(NewUser {
            name: "Mykola Ivanenko".into(),
            email: Some("mykola@deskline.test".into()),
            role: Some(Role::Agent),
            ..NewUser::default()
        })
        .unwrap();
    let known = store
        .create_user(NewUser {
            name: "Known Customer".into(),
            phone: Some("+380442220000".into()),
            ..NewUser::default()
        })
        .unwrap();
    let sim = start_sim(store, |_| {}).await;
    let dir = tempfile::tempdir().unwrap();
    let service = service_with_webhooks(&sim, dir.path(), DIRECTORY).await;
    let mut c = client(service.addr()).await;
    assert_eq!(ext(&route(&mut c, "+380441234567").await), "101");

    // 1. reassign the ticket
    sim.with_store(|s| {
        s.update_ticket(
            a.ticket,
            TicketPatch {
                assignee_id: Some(Some(mykola)),
                ..Default::default()
            },
        )
    })
    .unwrap();
    let took = route_within_1s(&mut c, "+380441234567", "reassignment", |r| ext(r) == "102").await;
    eprintln!("reassignment seen after {took:?}");

    // 2. a ticket opened for a known customer
    assert_eq!(
        route(&mut c, "+380442220000").await.decision(),
        Decision::DefaultRouting
    );
    sim.with_store(|s| {
        s.create_ticket(NewTicket {
            requester_id: known,
            assignee_id: Some(a.olena),
            status: Some(Status::New),
            ..NewTicket::default()
        })
    })
    .unwrap();
    let took = route_within_1s(&mut c, "+380442220000", "new ticket", |r| ext(r) == "101").await;
    eprintln!("new ticket seen after {took:?}");

    // 3. a phone identity added to a customer
    let lookup = |n: &'static str| {
        let mut c = c.clone();
        async move {
            c.lookup_caller(LookupCallerRequest { number: n.into() })
                .await
                .unwrap()
                .into_inner()
        }
    };
    assert!(!lookup("+380443330000").await.found);
    sim.with_store(|s| s.add_phone_identity(a.customer, "+380443330000"))
        .unwrap();
    let took = found_within_1s(&mut c, "+380443330000", "identity").await;
    eprintln!("identity seen after {took:?}");

    // 3b. the assignee renamed (`user.name_changed`): the directory no longer maps the owner; and
    // back.
    for (name, want_ext) in [("Mykola Renamed", ""), ("Mykola Ivanenko", "102")] {
        sim.with_store(|s| {
            s.update_user(
                mykola,
                UserPatch {
                    name: Some(name.into()),
                    ..Default::default()
                },
            )
        })
        .unwrap();
        let took = route_within_1s(&mut c, "+380441234567", "rename", |r| ext(r) == want_ext).await;
        eprintln!("rename to {name:?} seen after {took:?}");
    }

    // 4. the ticket's assignee demoted to end-user (`user.role_changed`): passed over. (A
    // suspension has no user event in Zendesk; `suspension_without_an_event_is_repaired_by_the_export`
    // covers it.)
    sim.with_store(|s| {
        s.update_user(
            mykola,
            UserPatch {
                role: Some(Role::EndUser),
                ..Default::default()
            },
        )
    })
    .unwrap();
    let took = route_within_1s(&mut c, "+380441234567", "role change", |r| {
        r.decision() == Decision::DefaultRouting
    })
    .await;
    eprintln!("role change seen after {took:?}");
    assert!(service.metrics().webhook_count(WebhookResult::Applied) >= 4);
    service.shutdown().await.unwrap();
    sim.shutdown().await;
}

/// Zendesk has no user event for a suspension, so none is delivered; the export follower, which
/// keeps running next to the webhooks, takes the suspended assignee out of routing within its lag.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suspension_without_an_event_is_repaired_by_the_export() {
    let (store, a) = one_ticket_account("+380441234567");
    let sim = start_sim(store, |_| {}).await;
    let dir = tempfile::tempdir().unwrap();
    let service =
        service_with_webhooks_polling(&sim, dir.path(), DIRECTORY, "[index]\npoll_seconds = 1\n")
            .await;
    let mut c = client(service.addr()).await;
    assert_eq!(ext(&route(&mut c, "+380441234567").await), "101");
    let delivered_before = sim.webhook_stats().delivered;
    sim.with_store(|s| {
        s.update_user(
            a.olena,
            UserPatch {
                suspended: Some(true),
                ..Default::default()
            },
        )
    })
    .unwrap();
    eventually("the suspension through the export", DEADLINE, || {
        let mut c = c.clone();
        async move {
            (route(&mut c, "+380441234567").await.decision() == Decision::DefaultRouting)
                .then_some(())
        }
    })
    .await;
    assert_eq!(
        sim.webhook_stats().delivered,
        delivered_before,
        "no subscribed event carries a suspension"
    );
    service.shutdown().await.unwrap();
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_requests_change_nothing_and_log_no_body() {
    let (store, a) = one_ticket_account("+380441234567");
    let sim = start_sim(store, |_| {}).await;
    let dir = tempfile::tempdir().unwrap();
    let service = service_with_webhooks(&sim, dir.path(), DIRECTORY).await;
    let url = format!(
        "http://{}/zendesk/webhook",
        service.webhooks_addr().unwrap()
    );
    let zd = zendesk_client(&sim, dir.path());
    let real_secret = install::install(&zd, &url, install::Mode::Events)
        .await
        .unwrap()
        .secrets[0]
        .expose_secret()
        .to_owned();
    let marker = "BODY-MARKER-7f3a";
    // A well-formed event that would unassign the ticket if it were applied.
    let body = serde_json::json!({
        "type": "zen:event-type:ticket.agent_assignment_changed", "id": "ev-1",
        "subject": format!("zen:ticket:{}", a.ticket),
        "detail": { "id": a.ticket.to_string(), "requester_id": a.customer.to_string(),
            "assignee_id": null, "status": "OPEN", "subject": marker,
            "updated_at": "2099-01-01T00:00:00Z" } })
    .to_string();
    let now = jiff::Timestamp::now();
    let ts = now.strftime("%Y-%m-%dT%H:%M:%SZ").to_string();
    let old = (now - jiff::SignedDuration::from_secs(600))
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string();
    let http = reqwest::Client::new();
    let post = |ts: String, sig: String, body: Vec<u8>| {
        let (http, url) = (http.clone(), url.clone());
        async move {
            http.post(&url)
                .header("x-zendesk-webhook-signature", sig)
                .header("x-zendesk-webhook-signature-timestamp", ts)
                .header(
                    "x-zendesk-webhook-invocation-id",
                    format!("{:?}", Instant::now()),
                )
                .body(body)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    let b = body.as_bytes().to_vec();
    let bad = "AAAA".to_owned() + &sign(real_secret.as_bytes(), &ts, &b)[4..];
    assert_eq!(post(ts.clone(), bad, b.clone()).await, 401, "bad signature");
    assert_eq!(
        post(
            old.clone(),
            sign(real_secret.as_bytes(), &old, &b),
            b.clone()
        )
        .await,
        401,
        "stale"
    );
    assert_eq!(
        post(ts.clone(), sign(b"wrong secret", &ts, &b), b.clone()).await,
        401,
        "wrong secret"
    );
    let broken = format!("{{\"type\": \"{marker}\"").into_bytes();
    assert_eq!(
        post(
            ts.clone(),
            sign(real_secret.as_bytes(), &ts, &broken),
            broken
        )
        .await,
        400,
        "malformed"
    );
    let huge = [marker.as_bytes(), &vec![b' '; 1 << 20]].concat();
    assert_eq!(
        post(ts.clone(), sign(real_secret.as_bytes(), &ts, &huge), huge).await,
        413,
        "huge"
    );
    assert_eq!(
        post(ts.clone(), String::new(), b.clone()).await,
        401,
        "no signature"
    );

    let m = service.metrics();
    assert_eq!(m.webhook_count(WebhookResult::BadSignature), 3);
    assert_eq!(m.webhook_count(WebhookResult::StaleTimestamp), 1);
    assert_eq!(m.webhook_count(WebhookResult::Malformed), 1);
    assert_eq!(m.webhook_count(WebhookResult::TooLarge), 1);
    assert_eq!(m.webhook_count(WebhookResult::Applied), 0);
    let mut c = client(service.addr()).await;
    assert_eq!(
        ext(&route(&mut c, "+380441234567").await),
        "101",
        "nothing applied"
    );
    let logged = String::from_utf8_lossy(&logs().lock()).into_owned();
    assert!(logged.contains("webhook refused"), "refusals are logged");
    assert!(!logged.contains(marker), "a body reached the logs");

    // The same body, signed, is applied; its repeat (same event id) is not applied twice.
    assert_eq!(
        post(ts.clone(), sign(real_secret.as_bytes(), &ts, &b), b.clone()).await,
        200
    );
    assert_eq!(
        post(ts.clone(), sign(real_secret.as_bytes(), &ts, &b), b.clone()).await,
        200
    );
    eventually("the signed event applied", DEADLINE, || {
        let mut c = c.clone();
        async move {
            let r = route(&mut c, "+380441234567").await;
            (r.decision() == Decision::DefaultRouting).then_some(())
        }
    })
    .await;
    assert_eq!(m.webhook_count(WebhookResult::Duplicate), 1);
    assert!(!String::from_utf8_lossy(&logs().lock()).contains(marker));
    service.shutdown().await.unwrap();
    sim.shutdown().await;
}

/// What the index says about every user, number and open ticket of the simulated account.
fn fingerprint(service: &Service, sim: &SimHandle) -> String {
    let parser = PhoneParser::new("UA").unwrap();
    let (ids, numbers) = sim.with_store(|s| {
        let ids: Vec<i64> = s.user_ids().collect();
        let mut numbers = Vec::new();
        for id in &ids {
            if let Some(p) = s.user(*id).and_then(|u| u.phone) {
                numbers.push(p);
            }
            numbers.extend(s.identities(*id).into_iter().filter_map(|i| i.value));
        }
        (ids, numbers)
    });
    let index = service.index().read();
    let mut out = String::new();
    for id in ids {
        out += &format!("{:?}\n", index.customer(id));
        let mut t: Vec<_> = index
            .open_tickets_of(id)
            .map(|t| format!("{t:?}"))
            .collect();
        t.sort();
        out += &format!("{t:?}\n");
    }
    out += &format!("{:?}\n", index.agents());
    for n in numbers {
        if let Some(e) = parser.parse_stored(&n) {
            out += &format!("{n}: {:?}\n", index.customer_ids_by_phone(e));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicated_and_reordered_deliveries_equal_a_clean_warm_up() {
    use rand::{Rng as _, SeedableRng as _};
    let (mut store, a) = one_ticket_account("+380441234567");
    let mykola = store
        .create_user(NewUser {
            name: "Mykola Ivanenko".into(),
            email: Some("mykola@deskline.test".into()),
            role: Some(Role::Agent),
            ..NewUser::default()
        })
        .unwrap();
    let mut customers = vec![a.customer];
    for i in 0..6 {
        customers.push(
            store
                .create_user(NewUser {
                    name: format!("Customer {i}"),
                    phone: Some(format!("+38044555000{i}")),
                    ..NewUser::default()
                })
                .unwrap(),
        );
    }
    let sim = start_sim(store, |c| {
        c.webhook_faults.duplicate_rate = 0.3;
        c.webhook_faults.reorder_rate = 0.5;
        c.webhook_faults.reorder_delay_ms = 400;
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let service = service_with_webhooks(&sim, dir.path(), DIRECTORY).await;
    let mut rng = rand::rngs::StdRng::seed_from_u64(13);
    let mut tickets = vec![a.ticket];
    for step in 0..60 {
        let customer = customers[rng.random_range(0..customers.len())];
        sim.with_store(|s| match rng.random_range(0..6) {
            0 => {
                let t = s
                    .create_ticket(NewTicket {
                        requester_id: customer,
                        assignee_id: Some(a.olena),
                        status: Some(Status::Open),
                        ..NewTicket::default()
                    })
                    .unwrap();
                tickets.push(t);
            }
            1 | 2 => {
                let t = tickets[rng.random_range(0..tickets.len())];
                let status =
                    [Status::Open, Status::Pending, Status::Solved][rng.random_range(0..3)];
                let assignee = [None, Some(a.olena), Some(mykola)][rng.random_range(0..3)];
                let _ = s.update_ticket(
                    t,
                    TicketPatch {
                        status: Some(status),
                        assignee_id: Some(assignee),
                        ..Default::default()
                    },
                );
            }
            3 => {
                s.add_phone_identity(customer, &format!("+3804466{step:05}"))
                    .unwrap();
            }
            4 => {
                // A customer made an agent and back (`user.role_changed`), often within a second:
                // the export's rows of that second must not undo what webhooks applied.
                let role = [Role::EndUser, Role::Agent][rng.random_range(0..2)];
                s.update_user(
                    customer,
                    UserPatch {
                        role: Some(role),
                        ..Default::default()
                    },
                )
                .unwrap();
            }
            _ => {
                // A rename has an event (a suspension has none in Zendesk).
                let name = ["Taras Shevchenko", "Taras Bondar"][rng.random_range(0..2)];
                s.update_user(
                    customer,
                    UserPatch {
                        name: Some(name.into()),
                        ..Default::default()
                    },
                )
                .unwrap();
            }
        });
        if step % 7 == 0 {
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
    }
    // Every delivery done (retries included), then the applier drained.
    eventually("all webhook deliveries finished", DEADLINE, || async {
        (sim.webhook_stats().pending == 0).then_some(())
    })
    .await;
    let stats = sim.webhook_stats();
    assert!(stats.duplicated > 0, "{stats:?}");
    let dir2 = tempfile::tempdir().unwrap();
    let clean = start_service(&config_text(&sim, dir2.path(), DIRECTORY)).await;
    wait_loaded(&clean).await;
    let want = fingerprint(&clean, &sim);
    eventually("webhook-fed index equals a clean warm-up", DEADLINE, || {
        let got = fingerprint(&service, &sim);
        let same = got == want;
        async move { same.then_some(()) }
    })
    .await;
    assert!(service.metrics().webhook_count(WebhookResult::Duplicate) > 0);
    clean.shutdown().await.unwrap();
    service.shutdown().await.unwrap();
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trigger_variant_delivers_ticket_changes() {
    let _ = logs();
    let (mut store, a) = one_ticket_account("+380441234567");
    let mykola = store
        .create_user(NewUser {
            name: "Mykola Ivanenko".into(),
            email: Some("mykola@deskline.test".into()),
            role: Some(Role::Agent),
            ..NewUser::default()
        })
        .unwrap();
    let sim = start_sim(store, |_| {}).await;
    let dir = tempfile::tempdir().unwrap();
    let zd = zendesk_client(&sim, dir.path());
    let first = install::install(&zd, "http://127.0.0.1:9/x", install::Mode::Trigger)
        .await
        .unwrap();
    assert_eq!(
        first.webhooks[0].0.subscriptions,
        ["conditional_ticket_events"]
    );
    // Two webhooks (tickets by trigger, users by events), a secret each: both go in the file, one
    // a line, as `deskline webhooks install --trigger` tells the operator.
    assert_eq!(first.secrets.len(), 2);
    let secrets: Vec<&str> = first.secrets.iter().map(|s| s.expose_secret()).collect();
    assert_ne!(secrets[0], secrets[1]);
    let secret_file = dir.path().join("webhook-secrets");
    std::fs::write(&secret_file, secrets.join("\n") + "\n").unwrap();
    let text = config_text(
        &sim,
        dir.path(),
        &format!(
            "{POLL_10_MIN}{DIRECTORY}[webhooks]\nlisten = \"127.0.0.1:0\"\nsigning_secret_file = {:?}\n",
            secret_file.display().to_string()
        ),
    );
    let service = start_service(&text).await;
    let url = format!(
        "http://{}/zendesk/webhook",
        service.webhooks_addr().unwrap()
    );
    let again = install::install(&zd, &url, install::Mode::Trigger)
        .await
        .unwrap();
    assert_eq!(
        again.trigger_id, first.trigger_id,
        "the trigger is updated, not duplicated"
    );
    assert!(again.webhooks.iter().all(|(_, created)| !created));
    wait_loaded(&service).await;
    let mut c = client(service.addr()).await;
    assert_eq!(ext(&route(&mut c, "+380441234567").await), "101");
    sim.with_store(|s| {
        s.update_ticket(
            a.ticket,
            TicketPatch {
                assignee_id: Some(Some(mykola)),
                ..Default::default()
            },
        )
    })
    .unwrap();
    route_within_1s(&mut c, "+380441234567", "reassignment by trigger", |r| {
        ext(r) == "102"
    })
    .await;
    // A user event, through the second webhook and verified with its own secret.
    sim.with_store(|s| s.add_phone_identity(a.customer, "+380443330001"))
        .unwrap();
    found_within_1s(
        &mut c,
        "+380443330001",
        "user event through the users webhook",
    )
    .await;
    assert_eq!(
        service.metrics().webhook_count(WebhookResult::BadSignature),
        0
    );
    service.shutdown().await.unwrap();
    sim.shutdown().await;
}
