//! Warm-up, restart and memory of the real `deskline serve` process on a generated account
//! (issue 2's benchmark; issue 5's scaling curve with `DESKLINE_BENCH_SIZES`).
//!
//! For each size N (customers; tickets = N): the simulator runs in this process on 127.0.0.1 with
//! its export limits lifted, and
//! 1. **baseline**: the simulator alone serves every export page (users with identities, tickets,
//!    organizations; the three exports read at once, as the follower reads them) to a plain HTTP
//!    client that only reads the bytes; then **ingest alone**: Deskline's decoding and indexing of
//!    those same pages in-process on one core, without network or simulator;
//! 2. **warm-up**: `deskline serve` (release binary, child process) starts with an empty data dir;
//!    time until its gRPC health says SERVING, records/s, and the ratio against the baseline;
//! 3. **restart**: SIGTERM (the snapshot is written), start again on the same data dir, time to SERVING;
//! 4. **memory**: the child's RSS after warm-up minus the RSS of a child serving an empty account,
//!    per customer (each with its tickets).
//!
//! Today's full warm-up is measured (`index.bootstrap = false`); `benches/bootstrap.rs` measures
//! the first start that answers while warming, under Zendesk's real limits.
//!
//! Run: `cargo bench --bench warmup` (sizes default to 1000000; e.g. `DESKLINE_BENCH_SIZES=100000,1000000,5000000`).

use std::{
    io::Write,
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use deskline_sim::{self as sim, GenConfig, SimConfig};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

const BIN: &str = env!("CARGO_BIN_EXE_deskline");

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn write_config(
    dir: &Path,
    sim_url: &str,
    email: &str,
    token: &str,
    port: u16,
) -> std::path::PathBuf {
    let path = dir.join("deskline.toml");
    let mut f = std::fs::File::create(&path).unwrap();
    write!(
        f,
        "[server]\nlisten = \"127.0.0.1:{port}\"\n\
         [zendesk]\nurl = \"{sim_url}\"\nemail = \"{email}\"\ntoken = \"{token}\"\n\
         requests_per_minute = 1000000\nexport_requests_per_minute = 1000000\n\
         [storage]\ndata_dir = \"{}\"\n[index]\npoll_seconds = 3600\nbootstrap = false\n",
        dir.join("data").display()
    )
    .unwrap();
    path
}

fn spawn_serve(config: &Path) -> Child {
    Command::new(BIN)
        .args(["serve", "--config"])
        .arg(config)
        // DESKLINE_BENCH_LOG=info shows the child's own timings (snapshot load, warm-up rate).
        .env(
            "RUST_LOG",
            std::env::var("DESKLINE_BENCH_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start deskline serve")
}

/// Polls gRPC health until SERVING; returns the time it took.
async fn wait_serving(port: u16, started: Instant, deadline: Duration) -> Duration {
    loop {
        if started.elapsed() > deadline {
            panic!("deskline did not become SERVING within {deadline:?}");
        }
        let endpoint =
            tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port}")).unwrap();
        if let Ok(ch) = endpoint.connect().await {
            let mut c = HealthClient::new(ch);
            if let Ok(r) = c
                .check(HealthCheckRequest {
                    service: String::new(),
                })
                .await
            {
                if r.into_inner().status == ServingStatus::Serving as i32 {
                    return started.elapsed();
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn stop(mut child: Child) {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
}

#[derive(serde::Deserialize)]
struct PageEnd {
    after_cursor: Option<String>,
    #[serde(default)]
    end_of_stream: bool,
    end_time: Option<i64>,
}

/// Reads one export to its end the way the follower does (same page size and sideload), keeping
/// the bodies and reading only the cursor out of each.
async fn read_export(
    http: &reqwest::Client,
    url: &str,
    auth: &(String, String),
    path: &str,
) -> Vec<Vec<u8>> {
    let mut pages = Vec::new();
    let cursor_mode = path != "organizations";
    let extra = if path == "users/cursor" {
        "&include=identities"
    } else {
        ""
    };
    let mut next =
        format!("{url}/api/v2/incremental/{path}.json?start_time=0&per_page=1000{extra}");
    let mut start_time = 0i64;
    loop {
        let r = http
            .get(&next)
            .basic_auth(&auth.0, Some(&auth.1))
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "baseline {next}: {}", r.status());
        let body: Vec<u8> = r.bytes().await.unwrap().into();
        let end: PageEnd = serde_json::from_slice(&body).unwrap();
        pages.push(body);
        if end.end_of_stream {
            break;
        }
        if cursor_mode {
            let cursor = end.after_cursor.unwrap();
            next = format!(
                "{url}/api/v2/incremental/{path}.json?cursor={cursor}&per_page=1000{extra}"
            );
        } else {
            let t = end.end_time.unwrap_or(start_time).max(start_time + 1);
            start_time = t;
            next = format!("{url}/api/v2/incremental/{path}.json?start_time={t}");
        }
    }
    pages
}

/// Baseline: the simulator alone serves every page of the three exports, read concurrently as the
/// follower reads them, to a client that does nothing with them.
async fn baseline(url: &str, email: &str, token: &str) -> (Duration, [Vec<Vec<u8>>; 3]) {
    let http = reqwest::Client::new();
    let auth = (format!("{email}/token"), token.to_owned());
    let started = Instant::now();
    let (u, t, o) = tokio::join!(
        read_export(&http, url, &auth, "users/cursor"),
        read_export(&http, url, &auth, "tickets/cursor"),
        read_export(&http, url, &auth, "organizations"),
    );
    (started.elapsed(), [u, t, o])
}

/// Deskline's own ingest cost, without the network or the simulator: decode the pages, prepare
/// them and apply them to an index, all on one core (the follower spreads these over the cores).
fn ingest_alone(pages: &[Vec<Vec<u8>>; 3]) -> (Duration, usize) {
    use deskline::index::UserBatch;
    use deskline::zendesk::models::{OrganizationsPage, TicketsCursorPage, UsersCursorPage};
    let parser = deskline::phone::PhoneParser::new("UA").unwrap();
    let mut index = deskline::index::Index::new();
    let started = Instant::now();
    let mut records = 0;
    for body in &pages[0] {
        let page: UsersCursorPage = serde_json::from_slice(body).unwrap();
        records += page.users.len();
        let batch = UserBatch::prepare(&page.users, page.identities.as_deref(), &parser);
        index.apply_user_batch(batch);
    }
    for body in &pages[1] {
        let page: TicketsCursorPage = serde_json::from_slice(body).unwrap();
        records += page.tickets.len();
        for t in &page.tickets {
            index.apply_ticket(t);
        }
    }
    for body in &pages[2] {
        let page: OrganizationsPage = serde_json::from_slice(body).unwrap();
        records += page.organizations.len();
        for o in &page.organizations {
            index.apply_organization(o);
        }
    }
    (started.elapsed(), records)
}

async fn start_sim(users: usize) -> sim::SimHandle {
    let store = sim::generate(&GenConfig {
        users,
        tickets: users,
        agents: 50,
        organizations: (users / 20).max(1),
        seed: 7,
    });
    let cfg = SimConfig {
        requests_per_minute: 10_000_000,
        export_requests_per_minute: 10_000_000,
        one_minute_rule: Duration::from_secs(0),
        ..SimConfig::default()
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    sim::start(listener, cfg, store).await
}

#[tokio::main]
async fn main() {
    let sizes: Vec<usize> = std::env::var("DESKLINE_BENCH_SIZES")
        .unwrap_or_else(|_| "1000000".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();

    // The empty process, for the memory baseline.
    let empty_rss = {
        let sim = start_sim(0).await;
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let cfg = write_config(dir.path(), &sim.url(), sim.email(), sim.token(), port);
        let child = spawn_serve(&cfg);
        wait_serving(port, Instant::now(), Duration::from_secs(60)).await;
        let rss = rss_kib(child.id());
        stop(child);
        sim.shutdown().await;
        rss
    };
    println!("empty deskline serve: RSS {empty_rss} KiB");
    println!(
        "| customers | records | sim alone (baseline) | warm-up | records/s | warm-up / baseline | ingest alone, 1 core | restart to SERVING | snapshot | RSS above empty | bytes per customer |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    for n in sizes {
        let gen_started = Instant::now();
        let sim = start_sim(n).await;
        let records =
            sim.with_store(|s| s.user_ids().count() + s.ticket_ids().count() + s.org_ids().count());
        eprintln!("generated {n} customers in {:?}", gen_started.elapsed());
        let (base, pages) = baseline(&sim.url(), sim.email(), sim.token()).await;
        let bytes: usize = pages.iter().flatten().map(Vec::len).sum();
        eprintln!("baseline: {base:?} for {} MiB", bytes >> 20);
        let (alone, ingested) = ingest_alone(&pages);
        drop(pages);
        eprintln!("ingest alone: {ingested} records in {alone:?}");
        if std::env::var_os("DESKLINE_BENCH_INGEST_ONLY").is_some() {
            continue;
        }

        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let cfg = write_config(dir.path(), &sim.url(), sim.email(), sim.token(), port);
        let started = Instant::now();
        let child = spawn_serve(&cfg);
        let warm = wait_serving(port, started, Duration::from_secs(1800)).await;
        let rss = rss_kib(child.id());
        stop(child);
        let snap = std::fs::metadata(dir.path().join("data/index.snapshot"))
            .map(|m| m.len())
            .unwrap_or(0);

        // Restart: the simulator goes down so nothing can come from the export.
        sim.set_faults(sim::Faults {
            down: true,
            ..Default::default()
        });
        let started = Instant::now();
        let child = spawn_serve(&cfg);
        let restart = wait_serving(port, started, Duration::from_secs(300)).await;
        stop(child);
        sim.shutdown().await;

        let above = rss.saturating_sub(empty_rss) * 1024;
        println!(
            "| {n} | {records} | {:.2} s | {:.2} s | {:.0} | {:.2} | {:.0} records/s | {:.2} s | {} MiB | {} MiB | {} |",
            base.as_secs_f64(),
            warm.as_secs_f64(),
            records as f64 / warm.as_secs_f64(),
            warm.as_secs_f64() / base.as_secs_f64(),
            ingested as f64 / alone.as_secs_f64(),
            restart.as_secs_f64(),
            snap >> 20,
            above >> 20,
            above / n.max(1) as u64
        );
    }
}
