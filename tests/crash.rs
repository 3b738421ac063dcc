//! Crash safety of the post-call sync with the real binary: `deskline serve` runs as a child
//! process against an in-process simulator (with latency, so jobs are in flight), receives a batch
//! of reports, and is killed with SIGKILL at a random point of the work; the next round restarts it
//! on the same `data_dir`. At the end every call must be DONE, and the simulator must hold each
//! call's comment exactly once and one user, organization and ticket per new number (DESIGN §4:
//! "a crash at any point followed by a restart produces no duplicate and loses no report").
//!
//! A second test kills the process while it writes its index snapshot (SIGTERM starts the ordered
//! shutdown, whose last stage is the snapshot; SIGKILL follows at a random moment within the time a
//! save takes) and checks that every restart either loads a complete snapshot or detects a corrupt
//! one and rebuilds from the exports: the answers after each restart are compared with those of a
//! clean warm-up, so half-read data would show.
//!
//! A third kills the process during a first start's bootstrap (DESIGN §10), at a random number of
//! simulator requests into it, with a change in Zendesk between rounds, and checks that the last
//! restart completes (READY) with the answers of a clean full warm-up of the final account.
//!
//! The kill point is a condition, not a sleep: a random number of simulator requests after the
//! batch was accepted (0 kills right after the reports were acknowledged).

mod common;

use std::{
    io::Read as _,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use common::*;
use deskline::proto::{
    self, GetCallStatusRequest, GetCallStatusResponse, ReportCallRequest,
    get_call_status_response::SyncState, resolver_client::ResolverClient,
};
use deskline_sim::{self as sim, Faults, NewTicket, NewUser, Role, SimHandle, Status, Store};
use rand::Rng;
use tonic::transport::Channel;

/// Kill rounds (each: start or restart, a batch of reports, SIGKILL mid-work). Issue 6 raises it.
const ROUNDS: usize = 20;
/// Added to every simulator response, so a job spans several round trips.
const LATENCY_MS: u64 = 25;
/// Existing customers, each with an organization and an open ticket.
const EXISTING: usize = 3;

/// The child process; killed (SIGKILL) and reaped when dropped, so a failing test leaves nothing.
struct Deskline {
    child: Child,
    addr: SocketAddr,
    log: PathBuf,
}

impl Drop for Deskline {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Deskline {
    /// Starts `deskline serve` and waits until its gRPC port answers.
    async fn start(dir: &Path, sim: &SimHandle, round: usize) -> Self {
        Self::start_with(
            dir,
            sim,
            round,
            "[sync]\nsenior_manager = \"Ivan Kovalenko\"\n",
        )
        .await
    }

    /// Today's full warm-up on a first start (`index.bootstrap = false`): these tests are about
    /// the sync queue and the snapshot, and compare answers with those of a complete index.
    async fn start_with(dir: &Path, sim: &SimHandle, round: usize, extra: &str) -> Self {
        Self::start_cfg(dir, sim, round, extra, false).await
    }

    async fn start_cfg(
        dir: &Path,
        sim: &SimHandle,
        round: usize,
        extra: &str,
        bootstrap: bool,
    ) -> Self {
        // Port 0: the child binds a free port and announces it (see `wait_listening`).
        let data_dir = dir.join("data");
        let config = dir.join("deskline.toml");
        let poll = if bootstrap { 1 } else { 3600 };
        let extra = format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n[index]\npoll_seconds = {poll}\nbootstrap = {bootstrap}\n{extra}"
        );
        std::fs::write(&config, config_text(sim, &data_dir, &extra)).unwrap();
        forget_listening(&data_dir);
        let log = dir.join(format!("round-{round}.log"));
        let mut child = Command::new(env!("CARGO_BIN_EXE_deskline"))
            .arg("serve")
            .arg("--config")
            .arg(&config)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("cannot start deskline serve");
        let addr = wait_listening(&mut child, &data_dir, || tail(&log))
            .await
            .grpc;
        let mut d = Self { child, addr, log };
        let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}")).unwrap();
        let started = tokio::time::Instant::now();
        loop {
            if endpoint.connect().await.is_ok() {
                return d;
            }
            if let Ok(Some(status)) = d.child.try_wait() {
                panic!("deskline exited with {status}:\n{}", d.log_text());
            }
            assert!(
                started.elapsed() < DEADLINE,
                "deskline did not listen on {addr}:\n{}",
                d.log_text()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGTERM: the ordered shutdown, which ends by writing the snapshot.
    fn terminate(&self) {
        let ok = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -TERM failed");
    }

    async fn grpc(&self) -> ResolverClient<Channel> {
        client(self.addr).await
    }

    /// SIGKILL: no shutdown, no snapshot, jobs left IN_PROGRESS in the queue.
    fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    fn log_text(&self) -> String {
        tail(&self.log)
    }
}

/// The last 40 lines of the log at `path`.
fn tail(path: &Path) -> String {
    let mut s = String::new();
    if let Ok(mut f) = std::fs::File::open(path) {
        let _ = f.read_to_string(&mut s);
    }
    let tail: Vec<&str> = s.lines().rev().take(40).collect();
    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
}

fn account() -> (Store, Vec<(String, i64)>) {
    let mut s = store_with_owner();
    let mut agents = Vec::new();
    for (name, email) in [
        ("Olena Petrenko", "olena@deskline.test"),
        ("Ivan Kovalenko", "ivan@deskline.test"),
    ] {
        agents.push(
            s.create_user(NewUser {
                name: name.into(),
                email: Some(email.into()),
                role: Some(Role::Agent),
                ..NewUser::default()
            })
            .unwrap(),
        );
    }
    let org = s.create_organization("Existing Customers", None).unwrap();
    let mut existing = Vec::new();
    for i in 0..EXISTING {
        let phone = format!("+38044200000{i}");
        let user = s
            .create_user(NewUser {
                name: format!("Customer {i}"),
                phone: Some(phone.clone()),
                organization_id: Some(org),
                ..NewUser::default()
            })
            .unwrap();
        let ticket = s
            .create_ticket(NewTicket {
                requester_id: user,
                assignee_id: Some(agents[0]),
                organization_id: Some(org),
                status: Some(Status::Open),
                ..NewTicket::default()
            })
            .unwrap();
        existing.push((phone, ticket));
    }
    (s, existing)
}

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
        duration_seconds: 61,
        wait_seconds: 3,
        recording_url: "https://pbx.example/rec/crash.mp3".into(),
        employee_name: "Olena Petrenko".into(),
        scheme_name: "Sales".into(),
        ..Default::default()
    }
}

/// The new numbers of a round: two calls from the first, one from the second.
fn new_numbers(round: usize) -> [String; 2] {
    [
        format!("+38050300{round:02}01"),
        format!("+38050300{round:02}02"),
    ]
}

/// Round `r`'s batch: a call from each existing customer, two from a new number, one from another
/// new number, and one from the first new number of the previous round (new then, maybe half
/// synced when that round's process died).
fn batch(round: usize, existing: &[(String, i64)]) -> Vec<ReportCallRequest> {
    let mut out: Vec<ReportCallRequest> = existing
        .iter()
        .enumerate()
        .map(|(i, (p, _))| report(&format!("r{round}-old-{i}"), p))
        .collect();
    let [a, b] = new_numbers(round);
    out.push(report(&format!("r{round}-a-1"), &a));
    out.push(report(&format!("r{round}-a-2"), &a));
    out.push(report(&format!("r{round}-b-1"), &b));
    if round > 0 {
        out.push(report(
            &format!("r{round}-prev-a"),
            &new_numbers(round - 1)[0],
        ));
    }
    out
}

async fn status(grpc: &mut ResolverClient<Channel>, id: &str) -> GetCallStatusResponse {
    grpc.get_call_status(GetCallStatusRequest { call_id: id.into() })
        .await
        .unwrap()
        .into_inner()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_sync_then_restart_syncs_every_call_once() {
    let (store, existing) = account();
    let sim = start_sim(store, |c| {
        c.faults = Faults {
            latency_ms: LATENCY_MS,
            ..Faults::default()
        };
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let mut rng = rand::rng();
    let mut ids = Vec::new();
    let mut kills = Vec::new();

    for round in 0..ROUNDS {
        let d = Deskline::start(dir.path(), &sim, round).await;
        let mut grpc = d.grpc().await;
        let before = sim.requests().len();
        for r in batch(round, &existing) {
            let id = r.call_id.clone();
            let resp = grpc.report_call(r).await.unwrap().into_inner();
            assert!(!resp.duplicate, "{id}");
            ids.push(id);
        }
        // Kill after a random number of further Zendesk requests (warm-up and sync alike).
        let after = rng.random_range(0..12usize);
        let started = tokio::time::Instant::now();
        while sim.requests().len() < before + after {
            if started.elapsed() > DEADLINE {
                panic!("deskline stopped sending requests:\n{}", d.log_text());
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let mut in_progress = 0;
        for id in &ids {
            if status(&mut grpc, id).await.state() == SyncState::InProgress {
                in_progress += 1;
            }
        }
        kills.push((after, in_progress));
        d.kill();
    }

    // The last restart runs to the end.
    let d = Deskline::start(dir.path(), &sim, ROUNDS).await;
    let mut grpc = d.grpc().await;
    let started = tokio::time::Instant::now();
    let mut statuses = Vec::new();
    for id in &ids {
        loop {
            let st = status(&mut grpc, id).await;
            if matches!(st.state(), SyncState::Done | SyncState::Failed) {
                assert_eq!(st.state(), SyncState::Done, "{st:#?}\n{}", d.log_text());
                statuses.push(st);
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(45),
                "{id} not synced: {st:#?}\n{}",
                d.log_text()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let interrupted: usize = kills.iter().map(|k| k.1).sum();
    eprintln!(
        "{ROUNDS} kills (requests after the batch, jobs IN_PROGRESS at the kill): {kills:?}; {} calls",
        ids.len()
    );
    assert!(interrupted > 0, "no kill hit a job in flight: {kills:?}");

    // Every call's comment exactly once, wherever it landed.
    let comments: Vec<String> = sim.with_store(|s| {
        let tickets: Vec<i64> = s.ticket_ids().collect();
        tickets
            .into_iter()
            .flat_map(|t| s.comments(t))
            .map(|c| c.body.or(c.plain_body).unwrap_or_default())
            .collect()
    });
    for id in &ids {
        let marker = format!("Call ID: {id}");
        let n = comments
            .iter()
            .filter(|c| c.lines().any(|l| l.trim() == marker))
            .count();
        assert_eq!(n, 1, "{id}: {n} comments");
    }
    // Existing customers: their open ticket got their calls, nothing new was created for them.
    for (phone, ticket) in &existing {
        let digits = phone.trim_start_matches('+');
        assert_eq!(
            sim.with_store(|s| s.find_users_by_phone_digits(digits))
                .len(),
            1
        );
        assert_eq!(
            sim.with_store(|s| s.comments(*ticket).len()),
            1 + ROUNDS,
            "ticket {ticket}"
        );
    }
    // One user, organization and ticket per new number.
    let mut new_orgs = Vec::new();
    for round in 0..ROUNDS {
        for n in new_numbers(round) {
            let digits = n.trim_start_matches('+').to_owned();
            let users = sim.with_store(|s| s.find_users_by_phone_digits(&digits));
            assert_eq!(users.len(), 1, "{n}: users {users:?}");
            let (user, tickets) =
                sim.with_store(|s| (s.user(users[0]).unwrap(), s.tickets_of_requester(users[0])));
            assert_eq!(tickets.len(), 1, "{n}: tickets {tickets:?}");
            new_orgs.push(user.organization_id.expect("linked to its organization"));
        }
    }
    new_orgs.sort_unstable();
    new_orgs.dedup();
    assert_eq!(new_orgs.len(), 2 * ROUNDS, "an organization per new number");
    assert_eq!(
        sim.with_store(|s| s.org_count()),
        1 + 2 * ROUNDS,
        "no stray organizations"
    );
    assert_eq!(
        sim.with_store(|s| s.ticket_count()),
        EXISTING + 2 * ROUNDS,
        "no stray tickets"
    );
    assert!(statuses.iter().all(|s| s.comment_added));
    drop(d);
    sim.shutdown().await;
}

/// Snapshot rounds: SIGTERM, then SIGKILL at a random moment of the save.
const SNAPSHOT_ROUNDS: usize = 20;

/// What a RouteCall answered, comparable across restarts.
type Answer = Result<(i32, i64, i64, i64), tonic::Code>;

async fn answers(grpc: &mut ResolverClient<Channel>, numbers: &[String]) -> Vec<Answer> {
    let mut out = Vec::with_capacity(numbers.len());
    for n in numbers {
        let r = grpc
            .route_call(proto::RouteCallRequest {
                caller: n.clone(),
                ..Default::default()
            })
            .await;
        out.push(match r {
            Ok(r) => {
                let r = r.into_inner();
                Ok((
                    r.decision,
                    r.agent.map_or(0, |a| a.zendesk_id),
                    r.ticket.map_or(0, |t| t.id),
                    r.customer.map_or(0, |c| c.zendesk_id),
                ))
            }
            Err(e) => Err(e.code()),
        });
    }
    out
}

async fn wait_serving(d: &Deskline) {
    use tonic_health::pb::{
        HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
    };
    let mut h = HealthClient::new(channel(d.addr).await);
    let started = tokio::time::Instant::now();
    loop {
        let st = h
            .check(HealthCheckRequest {
                service: "deskline.v1.Resolver".into(),
            })
            .await
            .map(|r| r.into_inner().status);
        if st.is_ok_and(|s| s == ServingStatus::Serving as i32) {
            return;
        }
        assert!(
            started.elapsed() < DEADLINE,
            "not serving in time:\n{}",
            d.log_text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn full_log(d: &Deskline) -> String {
    std::fs::read_to_string(&d.log).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_snapshot_writes_never_serves_half_read_data() {
    let store = sim::generate(&sim::GenConfig {
        users: 8_000,
        tickets: 8_000,
        agents: 20,
        organizations: 300,
        seed: 6,
    });
    // A sample of the account's numbers, in the formats Zendesk stores them, plus unknown ones.
    let mut numbers: Vec<String> = store
        .user_ids()
        .step_by(97)
        .filter_map(|id| store.user(id).and_then(|u| u.phone))
        .take(150)
        .collect();
    numbers.extend(["+380449999999".to_owned(), "+12025550100".to_owned()]);
    let sim = start_sim(store, |_| {}).await;
    let dir = tempfile::tempdir().unwrap();
    let snapshot = dir.path().join("data").join("index.snapshot");

    // Round 0: a clean warm-up and a clean shutdown give the reference answers and the save time.
    let d = Deskline::start_with(dir.path(), &sim, 0, "").await;
    wait_serving(&d).await;
    let reference = answers(&mut d.grpc().await, &numbers).await;
    // No directory is configured, so every decision is DEFAULT_ROUTING; the owner and ticket
    // found are what a half-read index would get wrong.
    assert!(
        reference
            .iter()
            .filter(|a| matches!(a, Ok((_, agent, ..)) if *agent != 0))
            .count()
            > 10,
        "the sample must contain customers with an owner: {reference:?}"
    );
    let t = std::time::Instant::now();
    d.terminate();
    let mut d = d;
    let exit = d.child.wait().unwrap();
    let save_time = t.elapsed();
    assert!(exit.success(), "{}", full_log(&d));
    assert!(snapshot.exists());
    drop(d);

    let mut rng = rand::rng();
    let (mut loaded, mut rebuilt, mut tmp_left) = (0, 0, 0);
    for round in 1..=SNAPSHOT_ROUNDS {
        // Every fifth round the snapshot is damaged on purpose (cut short, or a flipped byte): the
        // restart must notice and rebuild rather than serve it.
        let damaged = round % 5 == 0 && snapshot.exists();
        if damaged {
            let mut bytes = std::fs::read(&snapshot).unwrap();
            if round % 10 == 0 {
                let cut = rng.random_range(1..bytes.len());
                bytes.truncate(cut);
            } else {
                let i = rng.random_range(0..bytes.len());
                bytes[i] ^= 0x5a;
            }
            std::fs::write(&snapshot, bytes).unwrap();
        }
        let d = Deskline::start_with(dir.path(), &sim, round, "").await;
        wait_serving(&d).await;
        let got = answers(&mut d.grpc().await, &numbers).await;
        let log = full_log(&d);
        if log.contains("index snapshot loaded") {
            assert!(!damaged, "a damaged snapshot was loaded:\n{log}");
            loaded += 1;
        } else {
            assert!(
                log.contains("unreadable") || log.contains("no index snapshot yet"),
                "{log}"
            );
            rebuilt += 1;
        }
        if damaged {
            assert!(log.contains("unreadable"), "damage not detected:\n{log}");
        }
        assert_eq!(
            got, reference,
            "round {round}: answers differ after restart"
        );
        // Kill somewhere inside the save (or just before, or just after).
        let delay = save_time.mul_f64(rng.random_range(0.0..1.2));
        d.terminate();
        tokio::time::sleep(delay).await;
        let tmp = snapshot.with_file_name("index.snapshot.tmp");
        if tmp.exists() {
            tmp_left += 1;
        }
        d.kill();
    }
    eprintln!(
        "{SNAPSHOT_ROUNDS} SIGKILLs during snapshot writes (a save takes {save_time:?}): \
         {loaded} restarts loaded a complete snapshot, {rebuilt} rebuilt from the exports \
         (4 snapshots damaged on purpose), {tmp_left} kills left a half-written temp file"
    );
    assert!(
        rebuilt >= SNAPSHOT_ROUNDS / 5,
        "every damaged snapshot must be rebuilt"
    );
    sim.shutdown().await;
}

/// Issue 10 item 4: the users export came without identities, the page and its cursor were applied
/// and saved, and the process was killed before `users/show_many` answered. The restarted process
/// must still fetch those users' identities (the ids waiting for them are saved with the cursor),
/// although the export has nothing new to say about them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identities_still_to_fetch_survive_a_kill() {
    let (mut store, a) = one_ticket_account("+380441234567");
    store
        .add_phone_identity(a.customer, "+380 67 123 45 67")
        .unwrap();
    let sim = start_sim(store, |c| {
        c.export_identities = false;
        // show_many never answers until the restart.
        c.show_many = sim::ShowMany::Unavailable;
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let second = "+380671234567";
    let found = |d: &Deskline| {
        let addr = d.addr;
        async move {
            let mut c = client(addr).await;
            let r = c
                .lookup_caller(proto::LookupCallerRequest {
                    number: second.into(),
                })
                .await
                .ok()?
                .into_inner();
            Some(r.found)
        }
    };

    let d = Deskline::start(dir.path(), &sim, 0).await;
    let snapshot = dir.path().join("data").join("index.snapshot");
    // Killed only once the warm-up is saved and show_many has been refused at least once.
    eventually("warm-up saved, show_many refused", DEADLINE, || {
        let refused = sim
            .requests()
            .iter()
            .any(|q| q.path.contains("show_many") && q.status == 503);
        let ready = snapshot.exists();
        async move { (refused && ready).then_some(()) }
    })
    .await;
    let found_before = found(&d).await.expect("LookupCaller answers");
    assert!(!found_before, "the second identity cannot be known yet");
    d.kill();

    sim.set_config(|c| c.show_many = sim::ShowMany::Sideload);
    let d = Deskline::start(dir.path(), &sim, 1).await;
    let started = tokio::time::Instant::now();
    while found(&d).await != Some(true) {
        assert!(
            started.elapsed() < DEADLINE,
            "the second identity was not fetched after the restart:\n{}\nfirst run:\n{}",
            d.log_text(),
            std::fs::read_to_string(dir.path().join("round-0.log")).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    d.kill();
    sim.shutdown().await;
}

/// `index_state` of a LookupCaller answer, if the service answers.
async fn index_state(d: &Deskline) -> Option<i32> {
    let mut c = client(d.addr).await;
    let r = c
        .lookup_caller(proto::LookupCallerRequest {
            number: "+380449999999".into(),
        })
        .await
        .ok()?;
    Some(r.into_inner().index_state)
}

/// Kill rounds during the bootstrap.
const BOOTSTRAP_ROUNDS: usize = 4;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_the_bootstrap_then_restart_completes() {
    let store = sim::generate(&sim::GenConfig {
        users: 3_000,
        tickets: 3_000,
        agents: 10,
        organizations: 50,
        seed: 21,
    });
    // Search sees records a second after their change (the lag the bootstrap's margin covers).
    let sim = start_sim(store, |c| {
        c.search_delay = Duration::from_secs(1);
        c.faults.latency_ms = 5;
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let snapshot = dir.path().join("data").join("index.snapshot");
    let mut rng = rand::rng();
    let mut numbers_changed = Vec::new();
    for round in 0..BOOTSTRAP_ROUNDS {
        sim.clear_requests();
        let d = Deskline::start_cfg(dir.path(), &sim, round, "", true).await;
        // A change in Zendesk while it bootstraps: a new caller with an open ticket.
        let phone = format!("+38067555{round:04}");
        sim.with_store(|s| {
            let agent = s
                .user_ids()
                .find(|id| {
                    s.user(*id).is_some_and(|u| {
                        u.role.as_deref() == Some("agent") && u.active != Some(false)
                    })
                })
                .unwrap();
            let u = s
                .create_user(NewUser {
                    name: format!("Round {round}"),
                    email: None,
                    phone: Some(phone.clone()),
                    role: None,
                    organization_id: None,
                    external_id: None,
                    shared_phone_number: false,
                    suspended: false,
                    user_fields: Default::default(),
                })
                .unwrap();
            s.create_ticket(NewTicket {
                requester_id: u,
                assignee_id: Some(agent),
                status: Some(Status::Open),
                ..NewTicket::default()
            })
            .unwrap();
        });
        numbers_changed.push(phone);
        // Killed a random number of requests into the bootstrap (search export pages, show_many).
        let kill_after = rng.random_range(1..12);
        eventually("bootstrap requests", DEADLINE, || {
            let n = sim
                .requests()
                .iter()
                .filter(|q| q.path.contains("search/export") || q.path.contains("show_many"))
                .count();
            async move { (n >= kill_after).then_some(()) }
        })
        .await;
        if round == 1 {
            // An ordered shutdown during the bootstrap saves a snapshot of it; the restart must
            // not resume from it (it is dropped as an unfinished bootstrap).
            d.terminate();
            let mut d = d;
            let exit = d.child.wait().unwrap();
            assert!(exit.success(), "{}", full_log(&d));
        } else {
            d.kill();
        }
    }
    let d = Deskline::start_cfg(dir.path(), &sim, BOOTSTRAP_ROUNDS, "", true).await;
    let started = tokio::time::Instant::now();
    while index_state(&d).await != Some(proto::IndexState::Ready as i32) {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "not READY after the restart:\n{}",
            d.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if snapshot.exists() {
        assert!(
            full_log(&d).contains("unfinished bootstrap")
                || full_log(&d).contains("snapshot loaded"),
            "{}",
            full_log(&d)
        );
    }

    // The reference: a clean full warm-up of the same (final) account.
    let rdir = tempfile::tempdir().unwrap();
    let r = Deskline::start_cfg(rdir.path(), &sim, 99, "", false).await;
    wait_serving(&r).await;
    let mut numbers: Vec<String> = sim.with_store(|s| {
        s.user_ids()
            .step_by(7)
            .filter_map(|id| s.user(id).and_then(|u| u.phone))
            .collect()
    });
    numbers.extend(numbers_changed.iter().cloned());
    let reference = answers(&mut r.grpc().await, &numbers).await;
    let got = answers(&mut d.grpc().await, &numbers).await;
    let differ: Vec<&String> = numbers
        .iter()
        .zip(got.iter().zip(&reference))
        .filter(|(_, (a, b))| a != b)
        .map(|(n, _)| n)
        .collect();
    assert!(
        differ.is_empty(),
        "{} of {} answers differ from a clean warm-up, e.g. {:?}",
        differ.len(),
        numbers.len(),
        &differ[..differ.len().min(5)]
    );
    for (n, a) in numbers_changed
        .iter()
        .zip(&got[numbers.len() - numbers_changed.len()..])
    {
        assert!(
            matches!(a, Ok((_, agent, ticket, _)) if *agent != 0 && *ticket != 0),
            "{n}: {a:?}"
        );
    }
    drop(d);
    drop(r);
    sim.shutdown().await;
}
