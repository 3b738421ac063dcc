//! A first start under Zendesk's real limits (issue 14): the bootstrap that answers while warming
//! (DESIGN §10) against today's full warm-up, in the same run, on the same simulated account.
//!
//! The simulator runs with its default (real) limits: 700 requests a minute, 10 a minute on the
//! incremental exports, 100 a minute on the search export, a 60 s window, the one-minute rule and a
//! 60 s search indexing delay. Deskline runs as the release `deskline serve` child with its default
//! budget (200 requests a minute). For N users and N tickets (5 % of the tickets open):
//! 1. **bootstrap** (`index.bootstrap = true`): time until health says SERVING (index WARMING),
//!    time until every end-user's primary phone is in (when the simulator has served the last
//!    search-export page of end-users: a little before they are applied), time until answers say
//!    READY, and the requests spent by kind at each point;
//! 2. **today** (`index.bootstrap = false`, empty data dir), at the same time against a second
//!    simulator holding the same account: time until SERVING (= READY) and its requests.
//!
//! Run: `cargo bench --bench bootstrap` (N defaults to 50000; `DESKLINE_BENCH_N=…`). A run at
//! 50k takes about ten minutes: today's warm-up (10 export requests a minute).

use std::{
    io::Write,
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use deskline::proto::{IndexState, LookupCallerRequest, resolver_client::ResolverClient};
use deskline_sim::{self as sim, GenConfig, SimConfig, SimHandle};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

const BIN: &str = env!("CARGO_BIN_EXE_deskline");

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn write_config(dir: &Path, sim: &SimHandle, port: u16, bootstrap: bool) -> std::path::PathBuf {
    let path = dir.join("deskline.toml");
    let mut f = std::fs::File::create(&path).unwrap();
    // Deskline's defaults otherwise: requests_per_minute 200, the export limit, poll every 60 s.
    write!(
        f,
        "[server]\nlisten = \"127.0.0.1:{port}\"\n\
         [zendesk]\nurl = \"{}\"\nemail = \"{}\"\ntoken = \"{}\"\n\
         [storage]\ndata_dir = \"{}\"\n[index]\nbootstrap = {bootstrap}\n",
        sim.url(),
        sim.email(),
        sim.token(),
        dir.join("data").display()
    )
    .unwrap();
    path
}

fn spawn_serve(config: &Path) -> Child {
    Command::new(BIN)
        .args(["serve", "--config"])
        .arg(config)
        .env(
            "RUST_LOG",
            std::env::var("DESKLINE_BENCH_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start deskline serve")
}

fn stop(mut child: Child) {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
}

async fn serving(port: u16) -> bool {
    let Ok(ch) = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port}"))
        .unwrap()
        .connect()
        .await
    else {
        return false;
    };
    HealthClient::new(ch)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .is_ok_and(|r| r.into_inner().status == ServingStatus::Serving as i32)
}

async fn ready(port: u16) -> bool {
    let Ok(ch) = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port}"))
        .unwrap()
        .connect()
        .await
    else {
        return false;
    };
    ResolverClient::new(ch)
        .lookup_caller(LookupCallerRequest {
            number: "+380449999999".into(),
        })
        .await
        .is_ok_and(|r| r.into_inner().index_state == IndexState::Ready as i32)
}

/// Requests the simulator served (any status), by kind.
#[derive(Debug, Default, Clone, Copy)]
struct Spent {
    search_export: usize,
    show_many: usize,
    incremental: usize,
    other: usize,
    refused_429: usize,
}

impl Spent {
    fn of(sim: &SimHandle) -> Self {
        let mut s = Spent::default();
        for r in sim.requests() {
            if r.status == 429 {
                s.refused_429 += 1;
            }
            if r.path.contains("search/export") {
                s.search_export += 1;
            } else if r.path.contains("show_many") {
                s.show_many += 1;
            } else if r.path.contains("/incremental/") {
                s.incremental += 1;
            } else {
                s.other += 1;
            }
        }
        s
    }
    fn total(&self) -> usize {
        self.search_export + self.show_many + self.incremental + self.other
    }
}

impl std::fmt::Display for Spent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} requests (search export {}, show_many {}, incremental exports {}, other {}; {} of them 429)",
            self.total(),
            self.search_export,
            self.show_many,
            self.incremental,
            self.other,
            self.refused_429
        )
    }
}

#[tokio::main]
async fn main() {
    let n: usize = std::env::var("DESKLINE_BENCH_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50_000);
    let store = sim::generate_with_open(
        &GenConfig {
            users: n,
            tickets: n,
            agents: (n / 1000).clamp(10, 500),
            organizations: (n / 50).max(10),
            seed: 14,
        },
        5,
    );
    let open = store
        .ticket_ids()
        .filter(|id| {
            store.ticket(*id).is_some_and(|t| {
                matches!(
                    t.status.as_deref(),
                    Some("new") | Some("open") | Some("pending") | Some("hold")
                )
            })
        })
        .count();
    // Two simulators with the same account, one per run, so both runs go at once (each is bound
    // by its simulator's limits, not by CPU) and neither spends the other's rate limits.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let store2 = store.clone();
    let sim = sim::start(listener, SimConfig::default(), store).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let sim2 = sim::start(listener, SimConfig::default(), store2).await;
    eprintln!("account: {n} users, {n} tickets, {open} open");
    let deadline = Duration::from_secs(3600);

    // 2. Today's full warm-up, on the second simulator, at the same time.
    let today = async {
        let dir2 = tempfile::tempdir().unwrap();
        let port2 = free_port();
        let started = Instant::now();
        let child = spawn_serve(&write_config(dir2.path(), &sim2, port2, false));
        while !serving(port2).await {
            assert!(started.elapsed() < deadline, "today's warm-up not SERVING");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let t = started.elapsed();
        let spent = Spent::of(&sim2);
        stop(child);
        (t, spent)
    };

    // 1. The bootstrap.
    let bootstrap = async {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let started = Instant::now();
        let child = spawn_serve(&write_config(dir.path(), &sim, port, true));
        while !serving(port).await {
            assert!(started.elapsed() < deadline, "not SERVING");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let t_serving = started.elapsed();
        let spent_serving = Spent::of(&sim);
        // Every primary phone: the end-user search export has read its last page.
        let end_user_pages = n.div_ceil(1000);
        let mut t_phones = None;
        let mut spent_phones = Spent::default();
        while !ready(port).await {
            assert!(started.elapsed() < deadline, "not READY");
            if t_phones.is_none() {
                let s = Spent::of(&sim);
                // agents (2 queries) + open tickets + every end-user page
                if s.search_export >= 2 + open.div_ceil(1000) + end_user_pages {
                    t_phones = Some(started.elapsed());
                    spent_phones = s;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let t_ready = started.elapsed();
        let spent_ready = Spent::of(&sim);
        stop(child);
        (
            t_serving,
            spent_serving,
            t_phones,
            spent_phones,
            t_ready,
            spent_ready,
        )
    };
    let (
        (t_serving, spent_serving, t_phones, spent_phones, t_ready, spent_ready),
        (t_full, spent_full),
    ) = tokio::join!(bootstrap, today);

    let t_phones = t_phones.unwrap_or(t_ready);
    println!("first start, {n} users / {n} tickets (5 % open), real limits, default budget:");
    println!("  bootstrap: SERVING (WARMING) after {t_serving:.1?}: {spent_serving}");
    println!("  bootstrap: every primary phone after {t_phones:.1?}: {spent_phones}");
    println!("  bootstrap: READY after {t_ready:.1?}: {spent_ready}");
    println!("  today:     SERVING (READY) after {t_full:.1?}: {spent_full}");
    println!(
        "  ratios vs today: routing-ready {:.3}, primary phones {:.3}, READY {:.3}",
        t_serving.as_secs_f64() / t_full.as_secs_f64(),
        t_phones.as_secs_f64() / t_full.as_secs_f64(),
        t_ready.as_secs_f64() / t_full.as_secs_f64()
    );
    sim.shutdown().await;
    sim2.shutdown().await;
}
