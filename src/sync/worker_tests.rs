//! End-to-end worker tests: the in-process simulator on 127.0.0.1:0, the real client, the real
//! index and queue. Waits are on conditions with deadlines, never on luck.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use tokio_util::sync::CancellationToken;

use super::{test_support::report, *};
use crate::{
    config::{Config, FieldEntity, FieldMapping},
    index::{Index, IndexWriter, SharedIndex},
    phone::E164,
    routing,
    zendesk::{Client, ClientOptions},
};
use deskline_sim::{
    self as sim, Faults, NewTicket, NewUser, Role, SimConfig, SimHandle, Status, Store,
};

/// The simulator's own wire type read as the client's model, through JSON as over HTTP.
fn model<T: serde::de::DeserializeOwned>(v: &impl serde::Serialize) -> T {
    serde_json::from_value(serde_json::to_value(v).unwrap()).unwrap()
}

const OLENA: &str = "Olena Petrenko";
const IVAN: &str = "Ivan Kovalenko";

struct Harness {
    sim: SimHandle,
    queue: Queue,
    index: SharedIndex,
    writer: IndexWriter,
    handle: WorkerHandle,
    shutdown: CancellationToken,
    worker: tokio::task::JoinHandle<anyhow::Result<()>>,
    olena: i64,
    ivan: i64,
    _dir: tempfile::TempDir,
}

/// An account with two agents (the employee and the senior manager) and the owner.
fn base_store() -> (Store, i64, i64) {
    let mut store = Store::new();
    store
        .create_user(NewUser {
            name: "Owner".into(),
            email: Some(sim::OWNER_EMAIL.into()),
            role: Some(Role::Admin),
            ..NewUser::default()
        })
        .unwrap();
    let olena = store
        .create_user(NewUser {
            name: OLENA.into(),
            email: Some("olena@deskline.test".into()),
            role: Some(Role::Agent),
            ..NewUser::default()
        })
        .unwrap();
    let ivan = store
        .create_user(NewUser {
            name: IVAN.into(),
            email: Some("ivan@deskline.test".into()),
            role: Some(Role::Agent),
            ..NewUser::default()
        })
        .unwrap();
    (store, olena, ivan)
}

fn warm(index: &SharedIndex, sim: &SimHandle, settings: &SyncSettings) {
    let mut ix = index.write();
    sim.with_store(|s| {
        let users: Vec<i64> = s.user_ids().collect();
        for id in users {
            if let Some(u) = s.user(id) {
                ix.apply_user(&model(&u), &settings.parser);
                ix.apply_identities(id, &model::<Vec<_>>(&s.identities(id)), &settings.parser);
            }
        }
        let orgs: Vec<i64> = s.org_ids().collect();
        for id in orgs {
            if let Some(o) = s.organization(id) {
                ix.apply_organization(&model(&o));
            }
        }
        let tickets: Vec<i64> = s.ticket_ids().collect();
        for id in tickets {
            if let Some(t) = s.ticket(id) {
                ix.apply_ticket(&model(&t));
            }
        }
    });
    ix.set_loaded();
}

fn settings_for(url: &str) -> SyncSettings {
    let text = format!(
        r#"
        [zendesk]
        url = "{url}"
        email = "{}"
        token = "sim-token"
        [sync]
        senior_manager = "{IVAN}"
        "#,
        sim::OWNER_EMAIL
    );
    let cfg = Config::from_toml_and_env(&text, std::path::Path::new("t.toml"), Vec::new()).unwrap();
    let mut s = SyncSettings::from_config(&cfg).unwrap();
    s.retry_base = Duration::from_millis(20);
    s.retry_max = Duration::from_millis(400);
    s.idle_poll = Duration::from_millis(200);
    s
}

async fn harness(
    store: Store,
    olena: i64,
    ivan: i64,
    sim_cfg: SimConfig,
    client_rpm: u32,
    tweak: impl FnOnce(&mut SyncSettings),
) -> Harness {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let sim = sim::start(listener, sim_cfg, store).await;
    let mut settings = settings_for(&sim.url());
    tweak(&mut settings);
    let client = Client::new(ClientOptions {
        requests_per_minute: client_rpm,
        ..ClientOptions::for_sim(&sim)
    })
    .unwrap();
    client.set_backoff_base(Duration::from_millis(10));
    let writer = IndexWriter::spawn(Index::new());
    let index: SharedIndex = writer.index().clone();
    warm(&index, &sim, &settings);
    // Loaded behind the writer's back (a test shortcut): tell the writer, whose signal the worker
    // waits for.
    writer.apply(crate::index::Change::Loaded).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let queue = Queue::open(dir.path()).unwrap();
    let worker = Worker::new(queue.clone(), client, writer.clone(), settings);
    let handle = worker.handle();
    let shutdown = CancellationToken::new();
    let worker = tokio::spawn(worker.run(shutdown.clone()));
    Harness {
        sim,
        queue,
        index,
        writer,
        handle,
        shutdown,
        worker,
        olena,
        ivan,
        _dir: dir,
    }
}

async fn default_harness(tweak: impl FnOnce(&mut SyncSettings)) -> Harness {
    let (store, olena, ivan) = base_store();
    harness(store, olena, ivan, SimConfig::default(), 700, tweak).await
}

impl Harness {
    async fn submit(&self, reports: &[CallReport]) {
        for r in reports {
            r.validate().unwrap();
            assert!(!self.queue.enqueue(r).await.unwrap());
        }
        self.handle.notify();
    }

    /// Waits until every call is DONE or FAILED.
    async fn settle(&self, ids: &[&str], deadline: Duration) -> Vec<CallStatus> {
        let until = Instant::now() + deadline;
        loop {
            let mut out = Vec::new();
            for id in ids {
                out.push(self.queue.status(id).await.unwrap().unwrap());
            }
            if out
                .iter()
                .all(|s| matches!(s.state, SyncState::Done | SyncState::Failed))
            {
                return out;
            }
            assert!(
                Instant::now() < until,
                "calls not settled in {deadline:?}: {out:#?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn run(&self, reports: &[CallReport]) -> Vec<CallStatus> {
        self.submit(reports).await;
        let ids: Vec<&str> = reports.iter().map(|r| r.call_id.as_str()).collect();
        self.settle(&ids, Duration::from_secs(30)).await
    }

    async fn stop(self) {
        self.shutdown.cancel();
        self.worker.await.unwrap().unwrap();
        self.sim.shutdown().await;
    }

    /// A restart on `dir` after a crash: the harness's worker stops and a new queue on `dir` and a
    /// new worker (same simulator and index) take over; `interrupted` was left IN_PROGRESS and is
    /// queued again.
    async fn restart_on(&mut self, dir: &std::path::Path, interrupted: &str) {
        self.shutdown.cancel();
        (&mut self.worker).await.unwrap().unwrap();
        let queue = Queue::open(dir).unwrap();
        assert_eq!(
            queue.status(interrupted).await.unwrap().unwrap().state,
            SyncState::Queued,
            "an interrupted job is queued again at start-up"
        );
        let client = Client::new(ClientOptions::for_sim(&self.sim)).unwrap();
        let worker = Worker::new(
            queue.clone(),
            client,
            self.writer.clone(),
            settings_for(&self.sim.url()),
        );
        self.handle = worker.handle();
        self.shutdown = CancellationToken::new();
        self.worker = tokio::spawn(worker.run(self.shutdown.clone()));
        self.queue = queue;
        self.handle.notify();
    }

    fn users_with_phone(&self, phone: u64) -> Vec<i64> {
        self.sim
            .with_store(|s| s.find_users_by_phone_digits(&phone.to_string()))
    }

    fn writes(&self) -> Vec<(String, String)> {
        self.sim
            .requests()
            .into_iter()
            .filter(|r| r.method != "GET")
            .map(|r| (r.method, r.path))
            .collect()
    }
}

fn assert_done(st: &CallStatus) {
    assert_eq!(st.state, SyncState::Done, "{st:#?}");
}

fn e164(d: u64) -> E164 {
    E164::from_digits(d).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_number_creates_user_organization_and_ticket_with_every_field() {
    let h = default_harness(|s| {
        s.fields = vec![
            FieldMapping {
                entity: FieldEntity::User,
                field: "utm_source".into(),
                source: "utm_source".into(),
            },
            FieldMapping {
                entity: FieldEntity::Organization,
                field: "scheme".into(),
                source: "scheme_name".into(),
            },
            FieldMapping {
                entity: FieldEntity::Ticket,
                field: "360001111".into(),
                source: "utm_source".into(),
            },
        ];
    })
    .await;
    let mut r = report("new-1", 380501234567);
    r.client_name = "Taras Shevchuk".into();
    let st = h.run(&[r]).await;
    let st = &st[0];
    assert_done(st);
    assert!(st.created_user && st.created_organization && st.created_ticket && st.comment_added);
    assert_eq!(st.attempts, 1);

    let (user, org, ticket, comments) = h.sim.with_store(|s| {
        (
            s.user(st.user_id).unwrap(),
            s.organization(st.organization_id).unwrap(),
            s.ticket(st.ticket_id).unwrap(),
            s.comments(st.ticket_id),
        )
    });
    assert_eq!(user.name.as_deref(), Some("Taras Shevchuk"));
    assert_eq!(user.phone.as_deref(), Some("+380501234567"));
    assert_eq!(user.organization_id, Some(st.organization_id));
    assert_eq!(user.user_fields.unwrap()["utm_source"], "google");
    assert_eq!(org.name.as_deref(), Some("Taras Shevchuk"));
    assert_eq!(org.organization_fields.unwrap()["scheme"], "Sales");

    assert_eq!(ticket.requester_id, Some(st.user_id));
    assert_eq!(ticket.organization_id, Some(st.organization_id));
    assert_eq!(ticket.assignee_id, Some(h.olena));
    assert_eq!(ticket.priority.as_deref(), Some("normal"));
    assert_eq!(ticket.kind.as_deref(), Some("question"));
    assert_eq!(
        ticket.subject.as_deref(),
        Some("Incoming call from +380 50 123 4567")
    );
    let cf = ticket.custom_fields.unwrap_or_default();
    assert!(
        cf.iter().any(|f| f.id == 360001111 && f.value == "google"),
        "{cf:?}"
    );
    assert_eq!(comments.len(), 1);
    let c = &comments[0];
    let body = c.body.clone().or(c.plain_body.clone()).unwrap_or_default();
    for want in [
        "https://pbx.example/rec/abc.mp3",
        "Talk time: 4 min 10 s",
        "Date: 2024-05-01 13:00:00 EEST",
        "Call ID: new-1",
    ] {
        assert!(body.contains(want), "{want:?} not in {body}");
    }
    assert_eq!(c.public, Some(false));
    assert_eq!(c.author_id, Some(h.olena));
    assert!(h.users_with_phone(380501234567).len() == 1);
    // At most 6 requests for a new number (DESIGN budget target).
    assert!(h.sim.requests().len() <= 6, "{:?}", h.sim.requests());
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn existing_customer_with_open_ticket_gets_one_comment_and_nothing_else() {
    let (mut store, olena, ivan) = base_store();
    let org = store.create_organization("Acme", None).unwrap();
    let customer = store
        .create_user(NewUser {
            name: "Petro Ivanenko".into(),
            phone: Some("044 123-45-67".into()),
            organization_id: Some(org),
            ..NewUser::default()
        })
        .unwrap();
    let ticket = store
        .create_ticket(NewTicket {
            requester_id: customer,
            assignee_id: Some(ivan),
            organization_id: Some(org),
            status: Some(Status::Open),
            ..NewTicket::default()
        })
        .unwrap();
    let h = harness(store, olena, ivan, SimConfig::default(), 700, |_| {}).await;
    let st = h.run(&[report("old-1", 380441234567)]).await;
    let st = &st[0];
    assert_done(st);
    assert_eq!(
        (st.user_id, st.organization_id, st.ticket_id),
        (customer, org, ticket)
    );
    assert!(!st.created_user && !st.created_organization && !st.created_ticket);
    assert!(st.comment_added);
    let comments = h.sim.with_store(|s| s.comments(ticket));
    assert_eq!(comments.len(), 2, "the first comment plus the call");
    let reqs = h.sim.requests();
    assert_eq!(reqs.len(), 1, "{reqs:?}");
    assert_eq!(reqs[0].method, "PUT");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_concurrent_calls_from_a_new_number_make_one_of_each() {
    let h = default_harness(|_| {}).await;
    let reports: Vec<CallReport> = (0..5)
        .map(|i| report(&format!("burst-{i}"), 380671112233))
        .collect();
    // Submitted concurrently, as five ReportCall RPCs would be.
    let mut tasks = Vec::new();
    for r in reports.clone() {
        let q = h.queue.clone();
        let n = h.handle.clone();
        tasks.push(tokio::spawn(async move {
            assert!(!q.enqueue(&r).await.unwrap());
            n.notify();
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let ids: Vec<&str> = reports.iter().map(|r| r.call_id.as_str()).collect();
    let sts = h.settle(&ids, Duration::from_secs(30)).await;
    sts.iter().for_each(assert_done);
    let users = h.users_with_phone(380671112233);
    assert_eq!(users.len(), 1, "one user");
    let (orgs, tickets, comments) = h.sim.with_store(|s| {
        let t = s.tickets_of_requester(users[0]);
        let c = t.iter().map(|&t| s.comments(t).len()).sum::<usize>();
        (s.org_count(), t, c)
    });
    assert_eq!(orgs, 1, "one organization");
    assert_eq!(tickets.len(), 1, "one ticket");
    assert_eq!(comments, 5, "five call comments");
    assert_eq!(sts.iter().filter(|s| s.created_ticket).count(), 1);
    assert!(sts.iter().all(|s| s.ticket_id == tickets[0]));
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_call_id_is_synced_once() {
    let h = default_harness(|_| {}).await;
    let r = report("dup-1", 380931112233);
    assert!(!h.queue.enqueue(&r).await.unwrap());
    assert!(
        h.queue.enqueue(&r).await.unwrap(),
        "second report is a duplicate"
    );
    h.handle.notify();
    let st = h.settle(&["dup-1"], Duration::from_secs(30)).await;
    assert_done(&st[0]);
    let comments = h.sim.with_store(|s| s.comments(st[0].ticket_id).len());
    assert_eq!(comments, 1);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_employee_falls_back_to_the_senior_manager() {
    let h = default_harness(|_| {}).await;
    let mut r = report("unknown-emp", 380951112233);
    r.employee_name = "Nobody Known".into();
    let st = h.run(&[r]).await;
    assert_done(&st[0]);
    let t = h.sim.with_store(|s| s.ticket(st[0].ticket_id).unwrap());
    assert_eq!(t.assignee_id, Some(h.ivan));
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_without_organization() {
    let h = default_harness(|s| s.create_organization = false).await;
    let st = h.run(&[report("no-org", 380961112233)]).await;
    let st = &st[0];
    assert_done(st);
    assert!(st.created_user && st.created_ticket && !st.created_organization);
    assert_eq!(st.organization_id, 0);
    assert_eq!(h.sim.with_store(|s| s.org_count()), 0);
    let t = h.sim.with_store(|s| s.ticket(st.ticket_id).unwrap());
    assert_eq!(t.organization_id, None);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_without_ticket() {
    let h = default_harness(|s| s.create_ticket = false).await;
    let st = h.run(&[report("no-ticket", 380971112233)]).await;
    let st = &st[0];
    assert_done(st);
    assert!(st.created_user && st.created_organization);
    assert!(!st.created_ticket && !st.comment_added);
    assert_eq!(st.ticket_id, 0);
    assert!(st.last_error.contains("sync.create"), "{st:?}");
    assert_eq!(h.sim.with_store(|s| s.ticket_count()), 0);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permanent_error_fails_with_zendesks_message() {
    let h = default_harness(|s| s.ticket_priority = "whenever".into()).await;
    let st = h.run(&[report("bad-prio", 380981112233)]).await;
    let st = &st[0];
    assert_eq!(st.state, SyncState::Failed, "{st:?}");
    assert!(st.last_error.contains("422"), "{st:?}");
    assert!(st.last_error.to_lowercase().contains("priority"), "{st:?}");
    assert_eq!(st.attempts, 1, "a permanent error is not retried");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_your_writes_routes_to_the_new_ticket_at_once() {
    let h = default_harness(|_| {}).await;
    let phone = 380991112233;
    let directory = routing::Directory::new(&BTreeMap::from([(OLENA.into(), "101".into())]));
    let before = routing::route(&h.index.read(), &directory, e164(phone));
    assert_eq!(before.decision, routing::Decision::DefaultRouting);
    let st = h.run(&[report("ryw", phone)]).await;
    assert_done(&st[0]);
    // No export has run: only what the worker wrote is in the index.
    let after = routing::route(&h.index.read(), &directory, e164(phone));
    assert_eq!(after.decision, routing::Decision::RouteToAgent, "{after:?}");
    assert_eq!(after.agent.unwrap().id, h.olena);
    assert_eq!(after.ticket.unwrap().id, st[0].ticket_id);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_ticket_gets_a_follow_up() {
    let (mut store, olena, ivan) = base_store();
    let customer = store
        .create_user(NewUser {
            name: "Closed Case".into(),
            phone: Some("+380631112233".into()),
            ..NewUser::default()
        })
        .unwrap();
    let ticket = store
        .create_ticket(NewTicket {
            requester_id: customer,
            assignee_id: Some(olena),
            status: Some(Status::Open),
            ..NewTicket::default()
        })
        .unwrap();
    let h = harness(store, olena, ivan, SimConfig::default(), 700, |s| {
        s.create_organization = false;
    })
    .await;
    // Closed in Zendesk after the index saw it open (the export has not caught up).
    h.sim.with_store(|s| {
        s.update_ticket(
            ticket,
            sim::TicketPatch {
                status: Some(Status::Closed),
                ..Default::default()
            },
        )
        .unwrap()
    });
    let st = h.run(&[report("followup", 380631112233)]).await;
    let st = &st[0];
    assert_done(st);
    assert!(st.created_ticket && st.comment_added);
    assert_ne!(st.ticket_id, ticket);
    assert_eq!(h.sim.with_store(|s| s.comments(ticket).len()), 1);
    assert_eq!(h.sim.with_store(|s| s.comments(st.ticket_id).len()), 1);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn call_record_is_tied_to_the_ticket() {
    let h = default_harness(|s| {
        s.create_call = true;
        s.talk_app_id = Some(1003048);
    })
    .await;
    let st = h.run(&[report("with-call", 380731112233)]).await;
    let st = &st[0];
    assert_done(st);
    assert_ne!(st.call_record_id, 0);
    let calls = h.sim.with_store(|s| s.calls().to_vec());
    assert_eq!(calls.len(), 1);
    let c = &calls[0].call;
    assert_eq!(c["ticket_id"], st.ticket_id);
    assert_eq!(c["end_user_id"], st.user_id);
    assert_eq!(c["direction"], "inbound");
    assert_eq!(c["from_line"], "+380731112233");
    assert_eq!(c["agent_id"], h.olena);
    assert_eq!(c["recording_url"], "https://pbx.example/rec/abc.mp3");
    h.stop().await;
}

/// 429 storms (a tiny simulator limit on a short window) and random 5xx: every call ends DONE,
/// nothing is created twice, and the simulator never sees more than the client's budget in any
/// 60-second window.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storms_and_5xx_within_budget() {
    let (mut store, olena, ivan) = base_store();
    let mut existing = Vec::new();
    for i in 0..4u64 {
        let phone = 380441000000 + i;
        let u = store
            .create_user(NewUser {
                name: format!("Customer {i}"),
                phone: Some(format!("+{phone}")),
                ..NewUser::default()
            })
            .unwrap();
        let t = store
            .create_ticket(NewTicket {
                requester_id: u,
                assignee_id: Some(olena),
                status: Some(Status::Open),
                ..NewTicket::default()
            })
            .unwrap();
        existing.push((phone, t));
    }
    let sim_cfg = SimConfig {
        requests_per_minute: 4,
        rate_window: Duration::from_secs(1),
        // Without Zendesk's headers the client cannot slow down before the limit: the storm.
        rate_limit_headers: false,
        ..SimConfig::default()
    };
    const BUDGET: u32 = 40;
    let h = harness(store, olena, ivan, sim_cfg, BUDGET, |s| {
        s.create_organization = false;
    })
    .await;
    h.sim.set_faults(Faults {
        error_rate: 0.15,
        ..Faults::default()
    });
    let mut reports: Vec<CallReport> = existing
        .iter()
        .map(|(p, _)| report(&format!("storm-old-{p}"), *p))
        .collect();
    for i in 0..2u64 {
        for k in 0..2 {
            reports.push(report(&format!("storm-new-{i}-{k}"), 380502000000 + i));
        }
    }
    h.submit(&reports).await;
    let ids: Vec<&str> = reports.iter().map(|r| r.call_id.as_str()).collect();
    let sts = h.settle(&ids, Duration::from_secs(120)).await;
    sts.iter().for_each(assert_done);
    for (_, t) in &existing {
        assert_eq!(h.sim.with_store(|s| s.comments(*t).len()), 2, "ticket {t}");
    }
    for i in 0..2u64 {
        let users = h.users_with_phone(380502000000 + i);
        assert_eq!(users.len(), 1);
        let tickets = h.sim.with_store(|s| s.tickets_of_requester(users[0]));
        assert_eq!(tickets.len(), 1);
        assert_eq!(h.sim.with_store(|s| s.comments(tickets[0]).len()), 2);
    }
    let reqs = h.sim.requests();
    assert!(reqs.iter().any(|r| r.status == 429), "the storm happened");
    let times: Vec<u64> = reqs.iter().map(|r| r.at_ms).collect();
    for (i, &t0) in times.iter().enumerate() {
        let in_window = times[i..].iter().take_while(|&&t| t < t0 + 60_000).count();
        assert!(
            in_window as u32 <= BUDGET,
            "{in_window} requests in a minute"
        );
    }
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outage_retries_on_a_persisted_schedule() {
    let h = default_harness(|_| {}).await;
    h.sim.set_faults(Faults {
        down: true,
        ..Faults::default()
    });
    h.submit(&[report("resume", 380661112233)]).await;
    // Wait for the first failed attempt to be recorded.
    let until = Instant::now() + Duration::from_secs(20);
    loop {
        let st = h.queue.status("resume").await.unwrap().unwrap();
        if st.state == SyncState::RetryWait {
            assert!(st.next_attempt_at.is_some());
            assert!(st.last_error.contains("503"), "{st:?}");
            break;
        }
        assert!(Instant::now() < until, "{st:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    h.sim.set_faults(Faults::default());
    let st = h.settle(&["resume"], Duration::from_secs(30)).await;
    assert_done(&st[0]);
    assert!(st[0].attempts >= 2);
    assert_eq!(h.users_with_phone(380661112233).len(), 1);
    assert!(h.writes().len() <= 4, "{:?}", h.writes());
    h.stop().await;
}

/// A crash after Zendesk created the user but before the worker recorded it: the user is not in
/// the index, not in the instance's own writes and not yet searchable. The restarted worker must
/// find it through the `external_id` upsert instead of creating a second user.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_after_an_unrecorded_create_makes_no_duplicate() {
    let (mut store, olena, ivan) = base_store();
    let phone = 380681112233u64;
    let dir = tempfile::tempdir().unwrap();
    {
        let q = Queue::open(dir.path()).unwrap();
        q.enqueue(&report("crash-1", phone)).await.unwrap();
        let job = q.claim().await.unwrap().unwrap();
        assert_eq!(job.attempts, 1);
        // The process dies here, with the job IN_PROGRESS.
    }
    let first = store
        .create_user(NewUser {
            name: format!("+{phone}"),
            phone: Some(format!("+{phone}")),
            external_id: Some(format!("deskline:+{phone}")),
            ..NewUser::default()
        })
        .unwrap();
    let mut h = harness(store, olena, ivan, SimConfig::default(), 700, |_| {}).await;
    // The index was warmed from the store above (as a snapshot would be); forget the user again,
    // as if the crash happened before any export saw it.
    h.index.write().apply_user(
        &crate::zendesk::models::User {
            id: first,
            active: Some(false),
            ..Default::default()
        },
        &settings_for("http://127.0.0.1:1").parser,
    );
    h.restart_on(dir.path(), "crash-1").await;
    let st = h.settle(&["crash-1"], Duration::from_secs(30)).await;
    assert_done(&st[0]);
    assert_eq!(st[0].attempts, 2);
    assert_eq!(st[0].user_id, first, "the user of the first attempt");
    assert_eq!(h.users_with_phone(phone), vec![first]);
    drop(dir);
    h.stop().await;
}

/// A crash after the call comment reached Zendesk but before the worker recorded it (or published
/// the ticket's new state): the retry finds the comment already there, adds none, and still
/// publishes the ticket as Zendesk has it now, so the index (with replicas, every replica's through
/// the change log) does not wait for the next export.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_comment_found_landed_after_a_crash_still_updates_the_index() {
    let (mut store, olena, ivan) = base_store();
    let customer = store
        .create_user(NewUser {
            name: "Petro Ivanenko".into(),
            phone: Some("+380441234567".into()),
            ..NewUser::default()
        })
        .unwrap();
    let ticket = store
        .create_ticket(NewTicket {
            requester_id: customer,
            assignee_id: Some(ivan),
            status: Some(Status::Open),
            ..NewTicket::default()
        })
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    {
        let q = Queue::open(dir.path()).unwrap();
        q.enqueue(&report("lost-1", 380441234567)).await.unwrap();
        let job = q.claim().await.unwrap().unwrap();
        let progress = crate::sync::queue::Progress {
            user_id: customer,
            ticket_id: ticket,
            comment_uncertain: true,
            ..crate::sync::queue::Progress::default()
        };
        q.save_progress(job.seq, &progress).await.unwrap();
        // The process dies here: the comment was sent, its answer never handled.
    }
    let mut h = harness(store, olena, ivan, SimConfig::default(), 700, |_| {}).await;
    h.sim.with_store(|s| {
        s.add_comment(
            ticket,
            sim::NewComment {
                body: format!("earlier attempt\n{}", comment::call_marker("lost-1")),
                html: false,
                public: Some(false),
                author_id: None,
            },
        )
        .unwrap();
    });
    // The index holds the ticket as it was an hour before the comment.
    let mut old = h.sim.with_store(|s| s.ticket(ticket)).unwrap();
    old.updated_at = Some("2020-01-01T00:00:00Z".into());
    h.writer
        .apply(crate::index::Change::ticket(&model(&old)))
        .await
        .unwrap();
    h.restart_on(dir.path(), "lost-1").await;
    let st = h.settle(&["lost-1"], Duration::from_secs(30)).await;
    assert_done(&st[0]);
    assert_eq!(
        h.sim.with_store(|s| s.comments(ticket)).len(),
        2,
        "the first comment plus the call, once"
    );
    let now: crate::zendesk::models::Ticket =
        model(&h.sim.with_store(|s| s.ticket(ticket)).unwrap());
    let held = h.index.read().open_ticket(ticket).map(|t| t.updated_at);
    assert_eq!(
        held,
        now.updated_at
            .as_deref()
            .and_then(crate::zendesk::models::parse_time),
        "the index has the ticket as Zendesk has it after the comment"
    );
    drop(dir);
    h.stop().await;
}

/// After an upgrade, a job whose ticket create was persisted by the previous Deskline (built with
/// `json!`, so its keys are in alphabetical order, unlike the typed `TicketCreate`) and had already
/// reached Zendesk is resent exactly as stored with the same `Idempotency-Key`: Zendesk answers with
/// the ticket of the first attempt and no second ticket appears. (The byte-for-byte resend itself is
/// checked on the wire in the client's `a_stored_ticket_body_is_resent_byte_for_byte`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_resends_an_old_style_ticket_body_as_stored() {
    let (mut store, olena, ivan) = base_store();
    let phone = 380671112233u64;
    let customer = store
        .create_user(NewUser {
            name: "Old Customer".into(),
            phone: Some(format!("+{phone}")),
            ..NewUser::default()
        })
        .unwrap();
    let mut h = harness(store, olena, ivan, SimConfig::default(), 700, |_| {}).await;
    h.shutdown.cancel();
    (&mut h.worker).await.unwrap().unwrap();

    let old = format!(
        r#"{{"assignee_id":{ivan},"comment":{{"body":"Incoming call, answered","public":false}},"priority":"normal","requester_id":{customer},"subject":"Incoming call from +380 67 111 2233","type":"question"}}"#
    );
    let client = Client::new(ClientOptions::for_sim(&h.sim)).unwrap();
    // The old version's first attempt: it reached Zendesk, its answer was lost in the crash.
    let key = comment::idempotency_key("upgrade-1");
    let first = client
        .create_ticket(
            &crate::zendesk::requests::TicketCreateJson::from_stored(old.clone()).unwrap(),
            &key,
        )
        .await
        .unwrap();

    let dir = tempfile::tempdir().unwrap();
    let queue = Queue::open(dir.path()).unwrap();
    queue.enqueue(&report("upgrade-1", phone)).await.unwrap();
    let job = queue.claim().await.unwrap().unwrap();
    let stored = super::queue::Progress {
        user_id: customer,
        ticket_request: Some(old.clone()),
        ticket_first_sent_ms: Some(super::queue::now_ms()),
        ..Default::default()
    };
    queue.save_progress(job.seq, &stored).await.unwrap();
    queue.release(job.seq).await.unwrap();

    // The upgraded worker takes over the same queue.
    let worker = Worker::new(
        queue.clone(),
        client,
        h.writer.clone(),
        settings_for(&h.sim.url()),
    );
    h.handle = worker.handle();
    h.shutdown = CancellationToken::new();
    h.worker = tokio::spawn(worker.run(h.shutdown.clone()));
    h.queue = queue;
    h.handle.notify();
    let st = h.settle(&["upgrade-1"], Duration::from_secs(30)).await;
    assert_done(&st[0]);
    assert_eq!(st[0].ticket_id, first.id, "the ticket of the first attempt");
    assert_eq!(
        h.sim.with_store(|s| s.tickets_of_requester(customer)),
        vec![first.id],
        "no second ticket"
    );
    drop(dir);
    h.stop().await;
}
