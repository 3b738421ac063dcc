//! A Prometheus scrape with a long queue history (issue 10, item 5): 100,000 finished jobs (95 %
//! `done`, 5 % `failed`) plus a few in flight, in a real queue file.
//!
//! Cases, all in the same run:
//! - `scrape`: the whole `/metrics` body (`Metrics::render`), which reads the per-state counters
//!   kept by the queue's triggers on its read-only connection;
//! - `counts`: that counter read alone (`Queue::counts`);
//! - `old_group_by`: what every scrape ran before, `SELECT state, COUNT(*) FROM jobs GROUP BY
//!   state`, on its own connection to the same file (before, it also ran on the connection that
//!   commits every `ReportCall`, so it queued behind them as well: not measured here).
//!
//! Run: `cargo bench --bench queue_scrape`. Target: `scrape` under 10 ms. A summary line with the
//! medians and the ratio is printed at the end.

use std::{
    hint::black_box,
    sync::Arc,
    time::{Duration, Instant},
};

use criterion::{Criterion, criterion_group, criterion_main};
use deskline::{
    index::{Index, SharedIndex},
    metrics::Metrics,
    sync::Queue,
};

const FINISHED: usize = 100_000;

/// A report as the queue stores it (about 450 bytes of JSON), so the table has a realistic size.
fn report_json(i: usize) -> String {
    format!(
        r#"{{"call_id":"bench-{i}","direction":"incoming","outcome":"answered","client_number":"+38050{i:07}","client_e164":"+38050{i:07}","line_number":"+380441110000","started_at":1714557600,"duration_seconds":61,"wait_seconds":3,"recording_url":"https://pbx.example/rec/{i}.mp3","employee_name":"Olena Petrenko","employee_extension":"101","scheme_name":"Sales","utm":{{"utm_source":"google","utm_medium":"cpc"}},"extra":{{}},"client_name":""}}"#
    )
}

/// A queue file with `FINISHED` finished jobs and 20 queued ones, written through the real schema
/// (its triggers keep the counters as the rows go in).
fn queue_with_history(dir: &std::path::Path) -> Queue {
    let queue = Queue::open(dir).unwrap();
    let mut conn = rusqlite::Connection::open(queue.path()).unwrap();
    let tx = conn.transaction().unwrap();
    {
        let mut insert = tx
            .prepare(
                "INSERT INTO jobs (call_id, phone, report, state, attempts, ticket_id, user_id,
                                   created_at, updated_at)
                 VALUES (?1, ?2, ?3, ?4, 1, ?5, ?6, ?7, ?7)",
            )
            .unwrap();
        let now = 1_764_000_000_000i64;
        for i in 0..FINISHED + 20 {
            let state = match i {
                _ if i >= FINISHED => "queued",
                _ if i % 20 == 0 => "failed",
                _ => "done",
            };
            insert
                .execute(rusqlite::params![
                    format!("bench-{i}"),
                    380_500_000_000i64 + i as i64,
                    report_json(i),
                    state,
                    1_000 + i as i64,
                    2_000 + i as i64,
                    now - (FINISHED - i.min(FINISHED)) as i64 * 20_000,
                ])
                .unwrap();
        }
    }
    tx.commit().unwrap();
    queue
}

fn old_group_by(conn: &rusqlite::Connection) -> Vec<(String, i64)> {
    let mut stmt = conn
        .prepare("SELECT state, COUNT(*) FROM jobs GROUP BY state")
        .unwrap();
    stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect()
}

fn median(mut f: impl FnMut(), runs: usize) -> Duration {
    let mut times: Vec<Duration> = (0..runs)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed()
        })
        .collect();
    times.sort_unstable();
    times[runs / 2]
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let queue = queue_with_history(dir.path());
    let index: SharedIndex = Arc::new(parking_lot::RwLock::new(Index::new()));
    let metrics = Metrics::new(index, None, Some(queue.clone().into()));
    let old = rusqlite::Connection::open(queue.path()).unwrap();

    // The counters agree with the history before anything is timed.
    let counts = rt.block_on(queue.counts()).unwrap();
    let total: u64 = counts.values().sum();
    assert_eq!(total as usize, FINISHED + 20);
    for (state, n) in old_group_by(&old) {
        let kept = counts.iter().find(|(s, _)| s.as_str() == state).unwrap().1;
        assert_eq!(*kept, n as u64, "{state}");
    }
    let body = rt.block_on(metrics.render()).unwrap();
    assert!(
        body.contains(r#"deskline_sync_jobs{state="done"} 95000"#),
        "{body}"
    );

    let mut g = c.benchmark_group("queue_scrape_100k");
    g.bench_function("scrape", |b| {
        b.to_async(&rt)
            .iter(|| async { black_box(metrics.render().await.unwrap()) })
    });
    g.bench_function("counts", |b| {
        b.to_async(&rt)
            .iter(|| async { black_box(queue.counts().await.unwrap()) })
    });
    g.bench_function("old_group_by", |b| b.iter(|| black_box(old_group_by(&old))));
    g.finish();

    let scrape = median(
        || {
            rt.block_on(metrics.render()).unwrap();
        },
        101,
    );
    let group_by = median(
        || {
            old_group_by(&old);
        },
        101,
    );
    println!(
        "queue_scrape {FINISHED} finished jobs: scrape median {:.3} ms (target < 10 ms); \
         old GROUP BY alone {:.3} ms; old / new {:.1}x",
        scrape.as_secs_f64() * 1e3,
        group_by.as_secs_f64() * 1e3,
        group_by.as_secs_f64() / scrape.as_secs_f64()
    );
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(30).measurement_time(Duration::from_secs(3));
    targets = bench
}
criterion_main!(benches);
