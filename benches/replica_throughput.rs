//! Sync throughput with 1, 2 and 3 replicas at one fixed account budget (issue 12): the budget is
//! the account's, so adding replicas must neither exceed it nor leave it unused.
//!
//! For each replica count: a fresh simulator enforcing 60 requests a minute (10 on the exports) in
//! a 60 s sliding window, a fresh PostgreSQL schema, that many real `deskline serve` processes (the
//! harness of `tests/replicas.rs`), each configured with the account's whole limits. Once every
//! replica is SERVING, a backlog of reports of new numbers (each costs several requests: search,
//! user, organization, ticket, comment) is spread over the replicas at once, and the run ends when
//! every report is `DONE`. Reported per replica count, from the simulator's own record of requests:
//! - requests during the backlog, and the 429s (must be 0);
//! - the busiest 60 s window of the whole run (warm-up included) against the budget (never above);
//! - budget use over the backlog's full windows: requests in as many whole 60 s windows as fit from
//!   its first request to its last, against what the budget allows there (must be ≥ 90 %);
//! - reports `DONE` per minute (reports ÷ time from reporting to the last `DONE`).
//!
//! Run: `DESKLINE_TEST_POSTGRES_URL=postgres://postgres@127.0.0.1:5432/test cargo bench --bench
//! replica_throughput` (about 8 minutes: a backlog of two to three minutes per replica count).
//! `DESKLINE_BENCH_REPLICAS=1,3` picks the counts, `DESKLINE_BENCH_NUMBERS` the backlog (28). The
//! throughput is the budget's, not the build's, so a dev build measures the same
//! (`cargo bench --profile dev …`). Without the PostgreSQL URL it says it skipped and exits.

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::{replicas::*, *};
use deskline::pg::testing::TestSchema;

const LIMIT: usize = 60;
const EXPORT_LIMIT: usize = 10;
const WINDOW_MS: u64 = 60_000;

/// One replica count's figures.
struct Row {
    replicas: usize,
    requests: usize,
    busiest: usize,
    windows: u64,
    use_pct: f64,
    limited: usize,
    done_per_minute: f64,
    took: Duration,
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let counts: Vec<usize> = std::env::var("DESKLINE_BENCH_REPLICAS")
        .unwrap_or_else(|_| "1,2,3".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let numbers: usize = env_or("DESKLINE_BENCH_NUMBERS", 28);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut rows = Vec::new();
    for k in counts {
        match rt.block_on(run(k, numbers)) {
            Some(row) => rows.push(row),
            None => return,
        }
    }
    println!(
        "\nbudget {LIMIT}/min (exports {EXPORT_LIMIT}), simulator window 60 s, {numbers} reports of new numbers\n"
    );
    println!(
        "| replicas | requests (backlog) | busiest 60 s window / budget | use over the backlog's full windows | 429s | reports DONE / min | backlog synced in |"
    );
    println!("|---|---|---|---|---|---|---|");
    for r in &rows {
        println!(
            "| {} | {} | {}/{LIMIT} | {:.1} % ({} windows) | {} | {:.1} | {:.0} s |",
            r.replicas,
            r.requests,
            r.busiest,
            r.use_pct,
            r.windows,
            r.limited,
            r.done_per_minute,
            r.took.as_secs_f64()
        );
    }
    for r in &rows {
        assert!(
            r.busiest <= LIMIT,
            "{} replicas: a window above the budget",
            r.replicas
        );
        assert_eq!(r.limited, 0, "{} replicas met 429s", r.replicas);
        if r.windows < 2 {
            eprintln!(
                "{} replicas: the backlog lasted {} full window(s); raise DESKLINE_BENCH_NUMBERS",
                r.replicas, r.windows
            );
        }
    }
}

async fn run(k: usize, n: usize) -> Option<Row> {
    let schema = TestSchema::new().await?;
    let sim = start_sim(account(), |c| {
        c.requests_per_minute = LIMIT as u32;
        c.export_requests_per_minute = EXPORT_LIMIT as u32;
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let url = schema.url();
    let (limit, export_limit) = (LIMIT.to_string(), EXPORT_LIMIT.to_string());
    let env = [
        ("DESKLINE_ZENDESK__REQUESTS_PER_MINUTE", limit.as_str()),
        (
            "DESKLINE_ZENDESK__EXPORT_REQUESTS_PER_MINUTE",
            export_limit.as_str(),
        ),
    ];
    let mut replicas = Vec::new();
    for i in 0..k {
        replicas.push(Replica::start_env(dir.path(), &format!("r{i}"), &sim, &url, &env).await);
    }
    let mut clients = Vec::new();
    for r in &replicas {
        r.wait_serving().await;
        clients.push(r.grpc().await);
    }
    // Simulator time before the backlog: its use is measured from the first request after it.
    let before = sim.requests().last().map_or(0, |r| r.at_ms);
    let numbers: Vec<String> = (0..n).map(number).collect();
    let ids: Vec<String> = (0..n).map(|i| format!("bench-{k}-{i}")).collect();
    let reports = ids
        .iter()
        .zip(&numbers)
        .map(|(id, n)| report(id, n))
        .collect();
    let started = Instant::now();
    report_spread(&clients, reports).await;
    let refs: Vec<&Replica> = replicas.iter().collect();
    wait_all_done(&refs, &ids, Duration::from_secs(900)).await;
    let took = started.elapsed();
    assert_synced_once(&sim, &numbers, &ids);

    let requests = sim.requests();
    let times: Vec<u64> = requests.iter().map(|r| r.at_ms).collect();
    let mut busiest = 0;
    let mut lo = 0;
    for hi in 0..times.len() {
        while times[hi] - times[lo] >= WINDOW_MS {
            lo += 1;
        }
        busiest = busiest.max(hi - lo + 1);
    }
    let backlog: Vec<u64> = times.iter().copied().filter(|&t| t > before).collect();
    let (first, last) = (backlog[0], *backlog.last().unwrap());
    let windows = (last - first) / WINDOW_MS;
    let in_windows = backlog
        .iter()
        .filter(|&&t| t < first + windows * WINDOW_MS)
        .count();
    let use_pct = if windows == 0 {
        0.0
    } else {
        100.0 * in_windows as f64 / (windows as f64 * LIMIT as f64)
    };
    let row = Row {
        replicas: k,
        requests: backlog.len(),
        busiest,
        windows,
        use_pct,
        limited: requests.iter().filter(|r| r.status == 429).count(),
        done_per_minute: n as f64 / took.as_secs_f64() * 60.0,
        took,
    };
    eprintln!(
        "{k} replica(s): {} requests, busiest window {busiest}/{LIMIT}, {:.1} % use over {windows} full windows, {} × 429, {:.1} DONE/min",
        row.requests, row.use_pct, row.limited, row.done_per_minute
    );
    drop(replicas);
    sim.shutdown().await;
    Some(row)
}
