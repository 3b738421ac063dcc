//! What one index snapshot save costs, alone: the harness for profiling the encoder (issue 10,
//! item 3). Builds the benches' index of `n` customers (`benches/common`), then saves it a few
//! times and prints, per save, the wall time and the CPU time of the saving thread (the save runs
//! on this thread, as it runs on the snapshot thread in the service).
//!
//! Run: `DESKLINE_BENCH_SIZES=1000000,5000000 cargo run --release --example snapshot_save`
//! (`DESKLINE_SAVES=3`). For instruction counts, only inside the save:
//! `valgrind --tool=callgrind --collect-atstart=no --toggle-collect='deskline::index::snapshot::save'
//! target/release/examples/snapshot_save` with `DESKLINE_SAVES=1`.

#[path = "../benches/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use deskline::index::snapshot;

fn main() {
    let sizes: Vec<usize> = env("DESKLINE_BENCH_SIZES", "1000000")
        .split(',')
        .map(|s| {
            s.trim()
                .parse()
                .expect("DESKLINE_BENCH_SIZES: customer counts")
        })
        .collect();
    let saves: usize = env("DESKLINE_SAVES", "3")
        .parse()
        .expect("DESKLINE_SAVES: a count");
    let dir = tempfile::tempdir_in(env("DESKLINE_SAVE_DIR", ".")).expect("tempdir");
    let path = dir.path().join("index.snapshot");
    for n in sizes {
        let t = Instant::now();
        let index = common::build(n);
        eprintln!("{n} customers built in {:.1?}", t.elapsed());
        let (mut walls, mut cpus) = (Vec::new(), Vec::new());
        for _ in 0..saves {
            let (t, cpu, (user, sys)) = (Instant::now(), thread_cpu(), user_sys());
            snapshot::save(&index, &path).expect("save");
            let (wall, cpu) = (t.elapsed(), thread_cpu() - cpu);
            let (user, sys) = (user_sys().0 - user, user_sys().1 - sys);
            let size = std::fs::metadata(&path).expect("snapshot").len();
            println!(
                "n={n} save: wall {}, thread cpu {} (user {}, system {}), {:.1} MB",
                ms(wall),
                ms(cpu),
                ms(user),
                ms(sys),
                size as f64 / 1e6
            );
            walls.push(wall);
            cpus.push(cpu);
        }
        if let (Some(w), Some(c)) = (walls.iter().min(), cpus.iter().min()) {
            println!(
                "n={n} best of {saves}: wall {}, thread cpu {}",
                ms(*w),
                ms(*c)
            );
        }
    }
}

fn env(key: &str, default: &str) -> String {
    std::env::var(key).unwrap_or_else(|_| default.into())
}

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1e3)
}

/// This thread's user and system CPU time, in the kernel's ticks (10 ms here): the split of
/// [`thread_cpu`] between encoding and the kernel's share of writing the file.
fn user_sys() -> (Duration, Duration) {
    let s = std::fs::read_to_string("/proc/thread-self/stat").unwrap_or_default();
    // Fields after the command name (which may hold spaces, so split after its closing paren).
    let rest = s.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<u64> = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .map(|v| v.parse().unwrap_or(0))
        .collect();
    let tick = |t: u64| Duration::from_millis(t * 10);
    (
        tick(f.first().copied().unwrap_or(0)),
        tick(f.get(1).copied().unwrap_or(0)),
    )
}

/// Time this thread has run on a CPU (user and system), from the scheduler's own count.
fn thread_cpu() -> Duration {
    let s = std::fs::read_to_string("/proc/thread-self/schedstat").unwrap_or_default();
    let ns = s
        .split_whitespace()
        .next()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    Duration::from_nanos(ns)
}
