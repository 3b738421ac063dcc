//! Route decision without gRPC (`resolve_number` + `routing::route`) at 1k, 100k and 1M customers,
//! each with one open assigned ticket, the index built through `apply_user` / `apply_ticket`.
//!
//! Cases per size:
//! - `canonical`: the PBX sends `+380501234567` (the `E164::candidate` fast path);
//! - `national`: it sends `050 123 45 67` (a full libphonenumber parse every time);
//! - `national_cached`: the same through `routing::Resolver` (bounded moka parse cache, all hits);
//! - `national_miss`: through the `Resolver`, cycling through up to 200k distinct callers, far more
//!   than its cache holds (every lookup a miss);
//! - `national_distinct`: the same cycle without a cache (what a miss is compared with);
//! - `route_only`: the number already resolved (the index work alone).
//!
//! Run: `cargo bench --bench lookup` (add `-- route/canonical` to filter). Target: median ≤ 1 µs
//! for `canonical` at 1M.

mod common;

use std::{hint::black_box, time::Duration};

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use deskline::routing::{self, Decision, Resolver};

const QUERIES: usize = 1024;
/// Distinct numbers cycled through by `national_miss`.
const MISS_QUERIES: usize = 200_000;

fn bench(c: &mut Criterion) {
    let parser = common::parser();
    let dir = common::directory();
    for n in [1_000usize, 100_000, 1_000_000] {
        let index = common::build(n);
        // Spread the queried customers over the whole index so lookups are not all cache-hot.
        let picks: Vec<usize> = (0..QUERIES).map(|j| (j * 7919 + 13) % n).collect();
        let canonical: Vec<String> = picks.iter().map(|&i| common::canonical(i)).collect();
        let national: Vec<String> = picks.iter().map(|&i| common::national(i)).collect();
        let resolved: Vec<_> = canonical.iter().map(|r| parser.parse(r).unwrap()).collect();
        for (raw, p) in national.iter().zip(&resolved) {
            let a = routing::route(
                &index,
                &dir,
                routing::resolve_number(&index, &parser, raw).unwrap(),
            );
            assert_eq!(a.decision, Decision::RouteToAgent, "{raw}");
            assert_eq!(a.customer.unwrap().phone, *p);
        }
        let resolver = Resolver::new(parser.clone(), Resolver::CAPACITY);
        // Distinct callers, many more than the parse cache holds: every lookup misses.
        let distinct = n.min(MISS_QUERIES);
        let unseen: Vec<String> = (0..distinct)
            .map(|j| common::national((j * 7919 + 13) % n))
            .collect();
        let missing = Resolver::new(parser.clone(), Resolver::CAPACITY);

        let mut g = c.benchmark_group("route");
        g.sample_size(50)
            .warm_up_time(Duration::from_millis(500))
            .measurement_time(Duration::from_secs(2));
        let mut k = 0usize;
        g.bench_function(BenchmarkId::new("canonical", n), |b| {
            b.iter(|| {
                k = (k + 1) % QUERIES;
                let phone =
                    routing::resolve_number(&index, &parser, black_box(&canonical[k])).unwrap();
                black_box(routing::route(&index, &dir, phone))
            })
        });
        g.bench_function(BenchmarkId::new("national", n), |b| {
            b.iter(|| {
                k = (k + 1) % QUERIES;
                let phone =
                    routing::resolve_number(&index, &parser, black_box(&national[k])).unwrap();
                black_box(routing::route(&index, &dir, phone))
            })
        });
        g.bench_function(BenchmarkId::new("national_cached", n), |b| {
            b.iter(|| {
                k = (k + 1) % QUERIES;
                let phone = resolver.resolve(&index, black_box(&national[k])).unwrap();
                black_box(routing::route(&index, &dir, phone))
            })
        });
        let mut m = 0usize;
        g.bench_function(BenchmarkId::new("national_miss", n), |b| {
            b.iter(|| {
                m = (m + 1) % distinct;
                let phone = missing.resolve(&index, black_box(&unseen[m])).unwrap();
                black_box(routing::route(&index, &dir, phone))
            })
        });
        g.bench_function(BenchmarkId::new("national_distinct", n), |b| {
            b.iter(|| {
                m = (m + 1) % distinct;
                let phone =
                    routing::resolve_number(&index, &parser, black_box(&unseen[m])).unwrap();
                black_box(routing::route(&index, &dir, phone))
            })
        });
        g.bench_function(BenchmarkId::new("route_only", n), |b| {
            b.iter(|| {
                k = (k + 1) % QUERIES;
                black_box(routing::route(&index, &dir, black_box(resolved[k])))
            })
        });
        g.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
