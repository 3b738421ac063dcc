//! Real `deskline serve` processes on one PostgreSQL schema and one simulator: the harness of
//! `tests/replicas.rs`, shared with `benches/replica_throughput.rs`. Each replica is a child
//! process with its own data directory, gRPC and metrics ports and log file.

use std::{
    collections::HashMap,
    io::Read as _,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use deskline::proto::{
    self, GetCallStatusRequest, ReportCallRequest, get_call_status_response::SyncState,
    resolver_client::ResolverClient,
};
use deskline_sim::{NewUser, Role, SimHandle, Store};
use tonic::transport::Channel;

use super::{DEADLINE, client, config_text, forget_listening, store_with_owner, wait_listening};

/// One `deskline serve` child; SIGKILLed and reaped when dropped.
pub struct Replica {
    child: Child,
    pub addr: SocketAddr,
    /// `server.metrics_listen`.
    pub metrics: SocketAddr,
    log: PathBuf,
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Replica {
    pub async fn start(dir: &Path, name: &str, sim: &SimHandle, postgres_url: &str) -> Replica {
        Self::start_env(dir, name, sim, postgres_url, &[]).await
    }

    /// [`Replica::start`] with `DESKLINE_*` overrides in the environment.
    pub async fn start_env(
        dir: &Path,
        name: &str,
        sim: &SimHandle,
        postgres_url: &str,
        env: &[(&str, &str)],
    ) -> Replica {
        Self::start_with(dir, name, sim, postgres_url, env, "").await
    }

    /// [`Replica::start_env`] with `toml` appended to the configuration (after `[sync]`).
    pub async fn start_with(
        dir: &Path,
        name: &str,
        sim: &SimHandle,
        postgres_url: &str,
        env: &[(&str, &str)],
        toml: &str,
    ) -> Replica {
        // Port 0: the child binds free ports itself and announces them (see `wait_listening`).
        let dir = dir.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let config = dir.join("deskline.toml");
        // These tests are about the sync, the log and the shared snapshot: a full warm-up first
        // (the bootstrap with replicas has its own tests, which set `DESKLINE_INDEX__BOOTSTRAP`).
        let extra = format!(
            "postgres_url = \"{postgres_url}\"\n[server]\nlisten = \"127.0.0.1:0\"\nmetrics_listen = \"127.0.0.1:0\"\n[index]\npoll_seconds = 3600\nbootstrap = false\n\
             [sync]\nlease_seconds = 2\nsenior_manager = \"Olena Petrenko\"\n{toml}"
        );
        let data_dir = dir.join("data");
        std::fs::write(&config, config_text(sim, &data_dir, &extra)).unwrap();
        forget_listening(&data_dir);
        let log = dir.join("deskline.log");
        let mut child = Command::new(env!("CARGO_BIN_EXE_deskline"))
            .arg("serve")
            .arg("--config")
            .arg(&config)
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("cannot start deskline serve");
        let listening = wait_listening(&mut child, &data_dir, || tail(&log)).await;
        let addr = listening.grpc;
        let mut r = Replica {
            child,
            addr,
            metrics: listening.metrics.expect("server.metrics_listen is set"),
            log,
        };
        let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}")).unwrap();
        let started = tokio::time::Instant::now();
        loop {
            if endpoint.connect().await.is_ok() {
                return r;
            }
            if let Ok(Some(status)) = r.child.try_wait() {
                panic!("deskline exited with {status}:\n{}", r.log_text());
            }
            assert!(
                started.elapsed() < DEADLINE,
                "deskline did not listen on {addr}:\n{}",
                r.log_text()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until health says SERVING (its index is loaded, or WARMING after a bootstrap).
    pub async fn wait_serving(&self) {
        self.wait_serving_within(DEADLINE).await;
    }

    /// [`Replica::wait_serving`] with its own deadline.
    pub async fn wait_serving_within(&self, deadline: Duration) {
        let health =
            tonic_health::pb::health_client::HealthClient::new(super::channel(self.addr).await);
        super::eventually("the replica SERVING", deadline, || {
            let mut health = health.clone();
            async move {
                let st = health
                    .check(tonic_health::pb::HealthCheckRequest::default())
                    .await
                    .ok()?
                    .into_inner();
                (st.status
                    == tonic_health::pb::health_check_response::ServingStatus::Serving as i32)
                    .then_some(())
            }
        })
        .await;
    }

    pub async fn grpc(&self) -> ResolverClient<Channel> {
        client(self.addr).await
    }

    /// The value of an unlabelled metric on this replica's `/metrics`.
    pub async fn metric(&self, name: &str) -> Option<f64> {
        let text = reqwest::get(format!("http://{}/metrics", self.metrics))
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
    }

    pub fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// Lines of the whole log containing `needle`.
    pub fn log_count(&self, needle: &str) -> usize {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains(needle))
            .count()
    }

    pub fn log_text(&self) -> String {
        tail(&self.log)
    }
}

/// The last 30 lines of the log at `path`.
fn tail(path: &Path) -> String {
    let mut s = String::new();
    if let Ok(mut f) = std::fs::File::open(path) {
        let _ = f.read_to_string(&mut s);
    }
    let tail: Vec<&str> = s.lines().rev().take(30).collect();
    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
}

pub fn account() -> Store {
    let mut s = store_with_owner();
    s.create_user(NewUser {
        name: "Olena Petrenko".into(),
        email: Some("olena@deskline.test".into()),
        role: Some(Role::Agent),
        ..NewUser::default()
    })
    .unwrap();
    s
}

pub fn report(call_id: &str, number: &str) -> ReportCallRequest {
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
        employee_name: "Olena Petrenko".into(),
        scheme_name: "Sales".into(),
        ..Default::default()
    }
}

pub fn number(i: usize) -> String {
    format!("+38050700{i:04}")
}

/// Waits until every call is DONE, asking the replicas in turn; panics on FAILED or timeout.
pub async fn wait_all_done(replicas: &[&Replica], ids: &[String], deadline: Duration) {
    let mut clients = Vec::new();
    for r in replicas {
        clients.push(r.grpc().await);
    }
    let started = tokio::time::Instant::now();
    for (i, id) in ids.iter().enumerate() {
        loop {
            let grpc = &mut clients[i % replicas.len()];
            let st = match grpc
                .get_call_status(GetCallStatusRequest {
                    call_id: id.clone(),
                })
                .await
            {
                Ok(r) => r.into_inner(),
                // "storage unavailable … try again": a status read that timed out on an
                // overloaded machine is retried, as a PBX would; the deadline below still holds.
                Err(e) if e.code() == tonic::Code::Unavailable => {
                    assert!(
                        started.elapsed() < deadline,
                        "{id}: status unavailable until the deadline: {e}"
                    );
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
                Err(e) => panic!("{id}: {e}"),
            };
            match st.state() {
                SyncState::Done => {
                    assert!(st.comment_added, "{id}: {st:?}");
                    break;
                }
                SyncState::Failed => panic!(
                    "{id} failed: {st:?}\n{}",
                    replicas[i % replicas.len()].log_text()
                ),
                _ => {}
            }
            assert!(
                started.elapsed() < deadline,
                "{id} not synced in {deadline:?}: {st:?}\n{}",
                replicas
                    .iter()
                    .map(|r| r.log_text())
                    .collect::<Vec<_>>()
                    .join("\n----\n")
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
}

/// What the simulator holds for `numbers` and `ids`: one user, one organization and one ticket
/// per number, and each call's comment exactly once.
pub fn assert_synced_once(sim: &SimHandle, numbers: &[String], ids: &[String]) {
    let mut orgs = Vec::new();
    let mut tickets = 0;
    for n in numbers {
        let digits = n.trim_start_matches('+').to_owned();
        let users = sim.with_store(|s| s.find_users_by_phone_digits(&digits));
        assert_eq!(users.len(), 1, "{n}: users {users:?}");
        let (user, t) =
            sim.with_store(|s| (s.user(users[0]).unwrap(), s.tickets_of_requester(users[0])));
        assert_eq!(t.len(), 1, "{n}: tickets {t:?}");
        tickets += t.len();
        orgs.push(user.organization_id.expect("linked to its organization"));
    }
    orgs.sort_unstable();
    orgs.dedup();
    assert_eq!(orgs.len(), numbers.len(), "an organization per number");
    assert_eq!(
        sim.with_store(|s| s.org_count()),
        numbers.len(),
        "no stray organizations"
    );
    assert_eq!(
        sim.with_store(|s| s.ticket_count()),
        tickets,
        "no stray tickets"
    );
    let comments: Vec<String> = sim.with_store(|s| {
        let tickets: Vec<i64> = s.ticket_ids().collect();
        tickets
            .into_iter()
            .flat_map(|t| s.comments(t))
            .map(|c| c.body.or(c.plain_body).unwrap_or_default())
            .collect()
    });
    assert_eq!(comments.len(), ids.len(), "one comment per call");
    let mut per_call: HashMap<&str, usize> = HashMap::new();
    for c in &comments {
        for l in c.lines() {
            if let Some(id) = l.trim().strip_prefix("Call ID: ") {
                *per_call.entry(id).or_default() += 1;
            }
        }
    }
    for id in ids {
        assert_eq!(per_call.get(id.as_str()), Some(&1), "{id}");
    }
}

/// Sends `reports[i]` to `clients[i % len]`, all at once; every report must be accepted fresh.
pub async fn report_spread(clients: &[ResolverClient<Channel>], reports: Vec<ReportCallRequest>) {
    let mut tasks = Vec::new();
    for (i, r) in reports.into_iter().enumerate() {
        let mut c = clients[i % clients.len()].clone();
        tasks.push(tokio::spawn(async move {
            let id = r.call_id.clone();
            let resp = c.report_call(r).await.unwrap().into_inner();
            assert!(!resp.duplicate, "{id}");
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}
