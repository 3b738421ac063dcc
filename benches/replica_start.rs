//! A new replica's start from the shared snapshot (issue 12, DESIGN §8) against a warm-up, at 1M
//! customers, with real processes: the release `deskline serve` (the harness of
//! `tests/replicas.rs`) on a fresh PostgreSQL schema and the simulator holding N users and N
//! tickets (limits lifted, so the warm-up is Deskline's own speed, not Zendesk's budget).
//!
//! 1. Replica A starts on the empty database and warms up from the exports: time from its spawn to
//!    health SERVING. It then stores the shared snapshot (at once after the warm-up).
//! 2. Three times, a new replica starts beside it: time from its spawn to SERVING, and the export
//!    requests it made (must be none: it never warms up from Zendesk while a snapshot exists).
//!
//! Run: `DESKLINE_TEST_POSTGRES_URL=postgres://postgres@127.0.0.1:5432/test cargo bench --bench
//! replica_start` (N = 1,000,000 by default, `DESKLINE_BENCH_N=…`; about two minutes). Without the
//! PostgreSQL URL it says it skipped and exits.

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::{replicas::*, *};
use deskline::pg::testing::TestSchema;
use deskline_sim::GenConfig;

const LONG: Duration = Duration::from_secs(600);

fn main() {
    let n: usize = std::env::var("DESKLINE_BENCH_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(run(n));
}

/// Time from `spawned` until `r`'s health says SERVING.
async fn serving_after(r: &Replica, spawned: Instant) -> Duration {
    r.wait_serving_within(LONG).await;
    spawned.elapsed()
}

fn export_requests(sim: &deskline_sim::SimHandle) -> usize {
    sim.requests()
        .iter()
        .filter(|r| r.path.contains("/incremental/"))
        .count()
}

async fn run(n: usize) {
    let Some(schema) = TestSchema::new().await else {
        eprintln!("replica_start: skipped (set DESKLINE_TEST_POSTGRES_URL)");
        return;
    };
    let generated = Instant::now();
    let store = deskline_sim::generate(&GenConfig {
        users: n,
        tickets: n,
        agents: 50,
        organizations: 1000,
        seed: 12,
    });
    eprintln!(
        "account of {n} users and {n} tickets generated in {:?}",
        generated.elapsed()
    );
    let sim = start_sim(store, |_| {}).await;
    let dir = tempfile::tempdir().unwrap();
    let url = schema.url();
    // The shared snapshot stored once, right after the warm-up.
    let env = [
        ("DESKLINE_INDEX__FOLLOWER_LEASE_SECONDS", "5"),
        ("DESKLINE_INDEX__SHARED_SNAPSHOT_SECONDS", "3600"),
    ];
    let spawned = Instant::now();
    let a = Replica::start_env(dir.path(), "a", &sim, &url, &env).await;
    let warm_up = serving_after(&a, spawned).await;
    eprintln!("A warmed up to SERVING in {warm_up:?}");
    let pool = schema.pool_of(1);
    let stored = Instant::now();
    let size: i64 = eventually("the shared snapshot stored", LONG, || async {
        let c = pool.get().await.ok()?;
        c.query_opt(
            "SELECT size FROM cluster_snapshots ORDER BY id DESC LIMIT 1",
            &[],
        )
        .await
        .ok()?
        .map(|r| r.get(0))
    })
    .await;
    eprintln!(
        "shared snapshot of {size} bytes stored {:?} after SERVING",
        stored.elapsed()
    );

    let mut starts = Vec::new();
    for i in 0..3 {
        let exports_before = export_requests(&sim);
        let spawned = Instant::now();
        let b = Replica::start_env(dir.path(), &format!("b{i}"), &sim, &url, &env).await;
        let took = serving_after(&b, spawned).await;
        let exports = export_requests(&sim) - exports_before;
        eprintln!("replica b{i} SERVING {took:?} after its spawn, {exports} export requests");
        assert_eq!(exports, 0, "a new replica read the exports");
        starts.push(took);
        b.kill();
    }
    println!(
        "\n{n} users + {n} tickets, shared snapshot {:.1} MB, release `deskline serve`\n",
        size as f64 / 1e6
    );
    println!("| start | spawn → SERVING | vs warm-up |");
    println!("|---|---|---|");
    println!(
        "| first replica: warm-up from the exports | {:.2} s | 1 |",
        warm_up.as_secs_f64()
    );
    for (i, t) in starts.iter().enumerate() {
        println!(
            "| new replica {}: shared snapshot + log | {:.2} s | {:.3} × |",
            i + 1,
            t.as_secs_f64(),
            t.as_secs_f64() / warm_up.as_secs_f64()
        );
    }
    drop(a);
    sim.shutdown().await;
}
