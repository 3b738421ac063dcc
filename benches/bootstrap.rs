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
//!
//! `DESKLINE_BENCH_SKIP_TODAY=1` leaves today's warm-up out (at 1M and the real clock it takes
//! three and a half hours; the bootstrap alone about one).
//!
//! **Faster clock.** `DESKLINE_BENCH_TIME_SCALE=K` divides every time limit by K on both sides:
//! the simulator's rate window, one-minute rule, search indexing delay and cursor lifetime, and
//! Deskline's rate window (`zendesk.rate_window_ms`) and poll interval (60 must divide by K). The
//! request limits stay per window, so every burst has the real shape, and times are printed
//! multiplied by K (real-limit equivalents). What does not scale is CPU: parsing and applying a
//! page takes the same time in a window K times shorter, so scaled runs come out somewhat slower
//! than real ones (at 50k, K = 10 vs K = 1: the same requests by kind, READY about a quarter
//! later). Scaling the limits × K over a real minute instead would let K times larger bursts
//! through and give wrong times.

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

fn write_config(
    dir: &Path,
    sim: &SimHandle,
    port: u16,
    bootstrap: bool,
    scale: u32,
) -> std::path::PathBuf {
    let path = dir.join("deskline.toml");
    let mut f = std::fs::File::create(&path).unwrap();
    // Deskline's defaults otherwise: requests_per_minute 200, the export limit, poll every 60 s
    // (both windows divided by the time scale).
    write!(
        f,
        "[server]\nlisten = \"127.0.0.1:{port}\"\n\
         [zendesk]\nurl = \"{}\"\nemail = \"{}\"\ntoken = \"{}\"\nrate_window_ms = {}\n\
         [storage]\ndata_dir = \"{}\"\n[index]\nbootstrap = {bootstrap}\npoll_seconds = {}\n",
        sim.url(),
        sim.email(),
        sim.token(),
        60_000 / scale,
        dir.join("data").display(),
        60 / scale,
    )
    .unwrap();
    path
}

/// The simulator's default (real) limits with every time limit divided by `scale`.
fn scaled(scale: u32) -> SimConfig {
    let d = SimConfig::default();
    SimConfig {
        rate_window: d.rate_window / scale,
        one_minute_rule: d.one_minute_rule / scale,
        search_delay: d.search_delay / scale,
        search_cursor_ttl: d.search_cursor_ttl / scale,
        ..d
    }
}

/// CPU seconds (user + system) a child process has used so far, from `/proc/{pid}/stat`.
fn cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return f64::NAN;
    };
    // Fields after the command name (which may hold spaces) start at ") ".
    let rest = &stat[stat.rfind(')').map_or(0, |i| i + 2)..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        f.get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(f64::NAN)
    };
    // utime and stime are fields 14 and 15 of stat, 11 and 12 after the state field; 100 Hz.
    (ticks(11) + ticks(12)) / 100.0
}

fn spawn_serve(config: &Path) -> Child {
    Command::new(BIN)
        .args(["serve", "--config"])
        .arg(config)
        .env(
            "RUST_LOG",
            std::env::var("DESKLINE_BENCH_LOG")
                .unwrap_or_else(|_| "warn,deskline::follow::bootstrap=info".into()),
        )
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start deskline serve")
}

/// Forwards a child's log to ours and notes when the bootstrap logged that every end-user's
/// primary phone is in the index (applied, not only served by the simulator).
fn watch_log(child: &mut Child, started: Instant) -> std::sync::mpsc::Receiver<Duration> {
    let (tx, rx) = std::sync::mpsc::channel();
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if line.contains("every end-user's primary phone loaded") {
                let _ = tx.send(started.elapsed());
            }
            eprintln!("{line}");
        }
    });
    rx
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
        Self::until(sim, u64::MAX)
    }

    /// The requests the simulator received up to `at_ms` of its clock.
    fn until(sim: &SimHandle, at_ms: u64) -> Self {
        let mut s = Spent::default();
        for r in sim.requests().into_iter().filter(|r| r.at_ms <= at_ms) {
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
    let scale: u32 = std::env::var("DESKLINE_BENCH_TIME_SCALE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    assert!(
        scale >= 1 && 60 % scale == 0,
        "DESKLINE_BENCH_TIME_SCALE must divide 60"
    );
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
    // Before the simulator's clock starts: an instant's `at_ms` on it is at most this far on.
    let sim_clock = Instant::now();
    let sim = sim::start(listener, scaled(scale), store).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let sim2 = sim::start(listener, scaled(scale), store2).await;
    eprintln!("account: {n} users, {n} tickets, {open} open; time scale {scale}");
    let deadline = Duration::from_secs(4 * 3600);

    // 2. Today's full warm-up, on the second simulator, at the same time (unless skipped: at 1M
    // and the real clock it takes three and a half hours).
    let skip_today = std::env::var("DESKLINE_BENCH_SKIP_TODAY").is_ok_and(|v| v == "1");
    let today = async {
        if skip_today {
            return None;
        }
        let dir2 = tempfile::tempdir().unwrap();
        let port2 = free_port();
        let started = Instant::now();
        let child = spawn_serve(&write_config(dir2.path(), &sim2, port2, false, scale));
        while !serving(port2).await {
            assert!(started.elapsed() < deadline, "today's warm-up not SERVING");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let t = started.elapsed();
        let spent = Spent::of(&sim2);
        let cpu = cpu_seconds(child.id());
        stop(child);
        Some((t, spent, cpu))
    };

    // 1. The bootstrap.
    let bootstrap = async {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let started = Instant::now();
        let mut child = spawn_serve(&write_config(dir.path(), &sim, port, true, scale));
        let phones_logged = watch_log(&mut child, started);
        while !serving(port).await {
            assert!(started.elapsed() < deadline, "not SERVING");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let t_serving = started.elapsed();
        let spent_serving = Spent::of(&sim);
        // Every primary phone: the bootstrap logs it once the last end-user page is applied.
        let mut t_phones = None;
        let mut spent_phones = Spent::default();
        while !ready(port).await {
            assert!(started.elapsed() < deadline, "not READY");
            if t_phones.is_none() {
                if let Ok(t) = phones_logged.try_recv() {
                    t_phones = Some(t);
                    let at = (started + t).duration_since(sim_clock).as_millis() as u64;
                    spent_phones = Spent::until(&sim, at);
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let t_ready = started.elapsed();
        let spent_ready = Spent::of(&sim);
        let cpu = cpu_seconds(child.id());
        stop(child);
        (
            t_serving,
            spent_serving,
            t_phones,
            spent_phones,
            t_ready,
            spent_ready,
            cpu,
        )
    };
    let ((t_serving, spent_serving, t_phones, spent_phones, t_ready, spent_ready, cpu), today) =
        tokio::join!(bootstrap, today);

    let t_phones = t_phones.unwrap_or(t_ready);
    // Real-limit equivalents: every time limit was divided by `scale`.
    let real = |t: Duration| {
        let s = (t * scale).as_secs_f64();
        if s < 120.0 {
            format!("{s:.1} s")
        } else {
            format!("{:.1} min", s / 60.0)
        }
    };
    println!(
        "first start, {n} users / {n} tickets (5 % open), real limits, default budget, time scale {scale} (times below x{scale}):"
    );
    println!(
        "  bootstrap: SERVING (WARMING) after {}: {spent_serving}",
        real(t_serving)
    );
    println!(
        "  bootstrap: every primary phone after {}: {spent_phones}",
        real(t_phones)
    );
    println!(
        "  bootstrap: READY after {}: {spent_ready}; {cpu:.1} s CPU",
        real(t_ready)
    );
    if let Some((t_full, spent_full, cpu_full)) = today {
        println!(
            "  today:     SERVING (READY) after {}: {spent_full}; {cpu_full:.1} s CPU",
            real(t_full)
        );
        println!(
            "  ratios vs today: routing-ready {:.3}, primary phones {:.3}, READY {:.3}",
            t_serving.as_secs_f64() / t_full.as_secs_f64(),
            t_phones.as_secs_f64() / t_full.as_secs_f64(),
            t_ready.as_secs_f64() / t_full.as_secs_f64()
        );
    } else {
        println!("  today:     skipped (DESKLINE_BENCH_SKIP_TODAY=1)");
    }
    sim.shutdown().await;
    sim2.shutdown().await;
}
