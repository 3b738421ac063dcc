//! ReportCall latency on the two stores, same machine, same run: the embedded SQLite queue
//! (`synchronous=FULL`) against PostgreSQL (a fresh schema in `DESKLINE_TEST_POSTGRES_URL`, default
//! `postgres://postgres@127.0.0.1:5432/test`). The real `app::Service` is started in-process for each
//! store and driven over loopback gRPC by a tonic client.
//!
//! What is measured is the accept path only: `ReportCall` returns after the report is committed.
//! The simulator answers 503 to everything, so the index never loads and the worker never starts
//! claiming: background sync does not compete with the commits being timed.
//!
//! Run: `cargo bench --bench report_latency` (`REPORTS=N` changes the count per phase).

use std::{sync::Arc, time::Duration};

use deskline::{
    app::Service,
    config::Config,
    pg::testing::TestSchema,
    proto::{self, ReportCallRequest, resolver_client::ResolverClient},
};
use deskline_sim::{self as sim, Faults, SimConfig, Store};
use tokio::sync::Mutex;
use tonic::transport::Channel;

fn report(call_id: String, i: usize) -> ReportCallRequest {
    ReportCallRequest {
        call_id,
        direction: proto::Direction::Incoming as i32,
        outcome: proto::Outcome::Answered as i32,
        client_number: format!("+38050{:07}", i % 10_000_000),
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

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Sequential, then `concurrency` in flight; returns (p50, p99, reports/s) per phase.
async fn measure(
    grpc: ResolverClient<Channel>,
    label: &str,
    n: usize,
    concurrency: usize,
) -> (Duration, Duration, f64) {
    // Warm-up: connections, prepared statements, the page cache.
    for i in 0..50 {
        grpc.clone()
            .report_call(report(format!("{label}-warm-{i}"), i))
            .await
            .unwrap();
    }
    let lat = Arc::new(Mutex::new(Vec::with_capacity(n)));
    let started = std::time::Instant::now();
    let mut tasks = Vec::new();
    for w in 0..concurrency {
        let (mut grpc, lat) = (grpc.clone(), lat.clone());
        let label = label.to_owned();
        tasks.push(tokio::spawn(async move {
            let mut mine = Vec::new();
            for i in (w..n).step_by(concurrency) {
                let t = std::time::Instant::now();
                let r = grpc
                    .report_call(report(format!("{label}-{i}"), i))
                    .await
                    .unwrap()
                    .into_inner();
                mine.push(t.elapsed());
                assert!(!r.duplicate);
            }
            lat.lock().await.extend(mine);
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let elapsed = started.elapsed();
    let mut lat = lat.lock().await.clone();
    lat.sort_unstable();
    (
        percentile(&lat, 0.50),
        percentile(&lat, 0.99),
        n as f64 / elapsed.as_secs_f64(),
    )
}

async fn start(sim_url: &sim::SimHandle, dir: &std::path::Path, extra: &str) -> Service {
    let text = format!(
        "[zendesk]\nurl = \"{}\"\nemail = \"{}\"\ntoken = \"{}\"\ntimeout_seconds = 5\n\
         [storage]\ndata_dir = \"{}\"\n{extra}[index]\npoll_seconds = 3600\n",
        sim_url.url(),
        sim_url.email(),
        sim_url.token(),
        dir.display()
    );
    let config = Config::from_toml_and_env(
        &text,
        std::path::Path::new("bench.toml"),
        std::iter::empty(),
    )
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    Service::start(config, listener).await.unwrap()
}

async fn client(service: &Service) -> ResolverClient<Channel> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", service.addr()))
        .unwrap()
        .connect()
        .await
        .unwrap();
    ResolverClient::new(channel)
}

#[tokio::main]
async fn main() {
    let n: usize = std::env::var("REPORTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    if std::env::var(deskline::pg::testing::ENV).is_err() {
        eprintln!(
            "set {}=postgres://postgres@127.0.0.1:5432/test (or another database) to run this bench",
            deskline::pg::testing::ENV
        );
        std::process::exit(2);
    }
    let schema = TestSchema::new()
        .await
        .expect("a PostgreSQL for the comparison");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let sim = sim::start(
        listener,
        SimConfig {
            faults: Faults {
                down: true,
                ..Faults::default()
            },
            ..SimConfig::default()
        },
        Store::new(),
    )
    .await;

    println!("ReportCall latency, {n} reports per phase (accept path: committed, then answered)");
    println!(
        "{:<11} {:>4} {:>10} {:>10} {:>10}",
        "store", "in-flight", "p50", "p99", "reports/s"
    );
    for concurrency in [1usize, 16] {
        let sqlite_dir = tempfile::tempdir().unwrap();
        let s = start(&sim, sqlite_dir.path(), "").await;
        let r = measure(
            client(&s).await,
            &format!("sqlite-c{concurrency}"),
            n,
            concurrency,
        )
        .await;
        print_row("SQLite", concurrency, r);
        s.shutdown().await.unwrap();

        let pg_dir = tempfile::tempdir().unwrap();
        let p = start(
            &sim,
            pg_dir.path(),
            &format!("postgres_url = \"{}\"\n", schema.url()),
        )
        .await;
        let r = measure(
            client(&p).await,
            &format!("pg-c{concurrency}"),
            n,
            concurrency,
        )
        .await;
        print_row("PostgreSQL", concurrency, r);
        p.shutdown().await.unwrap();
    }
    sim.shutdown().await;
}

fn print_row(store: &str, concurrency: usize, (p50, p99, rate): (Duration, Duration, f64)) {
    println!(
        "{store:<11} {concurrency:>9} {:>8.2}ms {:>8.2}ms {rate:>10.0}",
        p50.as_secs_f64() * 1e3,
        p99.as_secs_f64() * 1e3
    );
}
