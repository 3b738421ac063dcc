//! Memory, apply throughput and snapshot speed of the index at 1M customers + 1M open tickets.
//!
//! Run in release: `cargo bench --bench index_memory` (or `-- 200000` for another size).
//!
//! Then, in the same run, rule 7's memory (issue 15): every customer also gets a solved ticket and
//! a reported call (the worst case: in a real account many customers have neither, and those pay
//! nothing), and the RSS it added is printed per customer, next to the figure before it.
//! Prints RSS per customer (from `/proc/self/statm`, input records generated and dropped a batch at
//! a time so only the index stays), `apply_*` throughput in records/s (generation not counted),
//! and snapshot save / load seconds and file size. Targets (issue 2): ≤ 300 B RSS per customer with
//! one open ticket, ≥ 100k records/s applied, snapshot of 1M + 1M loaded in ≤ 3 s.

mod common;

use std::time::{Duration, Instant};

use deskline::{
    index::{Index, snapshot},
    zendesk::models::{Ticket, User},
};

/// Resident set size in bytes (statm's second field is in pages; Linux pages are 4 KiB here).
fn rss() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").expect("/proc/self/statm");
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("statm resident field");
    pages * 4096
}

fn mib(b: u64) -> f64 {
    b as f64 / (1024.0 * 1024.0)
}

fn main() {
    let n: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(1_000_000);
    let parser = common::parser();
    // The first parse loads libphonenumber's metadata; keep that one-time cost out of the index's.
    parser.parse("+380501234567").expect("warm-up parse");
    let before = rss();

    let mut ix = Index::new();
    for a in common::agents() {
        ix.apply_user(&a, &parser);
    }
    let (mut t_users, mut t_tickets) = (Duration::ZERO, Duration::ZERO);
    let batch = 10_000;
    let mut start = 0;
    while start < n {
        let end = (start + batch).min(n);
        let users: Vec<User> = (start..end).map(common::user).collect();
        let tickets: Vec<Ticket> = (start..end).map(common::ticket).collect();
        let t0 = Instant::now();
        for u in &users {
            ix.apply_user(u, &parser);
        }
        let t1 = Instant::now();
        for t in &tickets {
            ix.apply_ticket(t);
        }
        t_tickets += t1.elapsed();
        t_users += t1 - t0;
        start = end;
    }
    ix.set_loaded();
    let after = rss();
    let counts = ix.counts();
    assert_eq!(counts.customers, n);
    assert_eq!(counts.open_tickets, n);

    let per = (after.saturating_sub(before)) as f64 / n as f64;
    println!(
        "customers: {n}, open tickets: {n}, phones: {}",
        counts.phones
    );
    println!(
        "RSS: before {:.1} MiB, after {:.1} MiB, index {:.1} MiB => {per:.0} bytes per customer (target <= 300)",
        mib(before),
        mib(after),
        mib(after - before)
    );
    let rate = |d: Duration| n as f64 / d.as_secs_f64();
    println!(
        "apply_user: {:.0} records/s ({:.2} s); apply_ticket: {:.0} records/s ({:.2} s); combined {:.0} records/s (target >= 100000)",
        rate(t_users),
        t_users.as_secs_f64(),
        rate(t_tickets),
        t_tickets.as_secs_f64(),
        2.0 * n as f64 / (t_users + t_tickets).as_secs_f64()
    );

    // Rule 7's worst case: a solved ticket and a reported call for every customer.
    {
        let t_recent = Instant::now();
        let mut start = 0;
        while start < n {
            let end = (start + batch).min(n);
            let solved: Vec<Ticket> = (start..end)
                .map(|i| Ticket {
                    id: common::TICKET_BASE + (n + i) as i64,
                    status: Some("solved".into()),
                    assignee_id: Some(900 + ((i as i64 + 1) % common::AGENTS)),
                    ..common::ticket(i)
                })
                .collect();
            let phones: Vec<_> = (start..end)
                .map(|i| parser.parse(&common::canonical(i)).expect("bench number"))
                .collect();
            for t in &solved {
                ix.apply_ticket(t);
            }
            for (k, phone) in phones.into_iter().enumerate() {
                ix.apply_call(
                    phone,
                    900 + ((start + k) as i64 % common::AGENTS),
                    1_714_557_600,
                );
            }
            start = end;
        }
        let with_recent = rss();
        assert_eq!(ix.recent_len(), n);
        let extra = with_recent.saturating_sub(after) as f64 / n as f64;
        println!(
            "rule 7 (a solved ticket and a reported call for every customer, {:.2} s): RSS {:.1} MiB => {:.0} bytes per customer before, {:.0} after (+{extra:.0}, x{:.3})",
            t_recent.elapsed().as_secs_f64(),
            mib(with_recent),
            per,
            per + extra,
            (per + extra) / per
        );
    }

    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("index.snapshot");
    let t0 = Instant::now();
    snapshot::save(&ix, &path).expect("save");
    let save_s = t0.elapsed().as_secs_f64();
    let size = std::fs::metadata(&path).expect("snapshot metadata").len();
    drop(ix);
    let t0 = Instant::now();
    let back = snapshot::load(&path).expect("load").expect("present");
    let load_s = t0.elapsed().as_secs_f64();
    assert_eq!(back.counts(), counts);
    assert_eq!(back.recent_len(), n);
    println!(
        "snapshot: save {save_s:.2} s (incl. fsync), load {load_s:.2} s (target <= 3), file {:.1} MiB ({:.0} bytes per customer+ticket)",
        mib(size),
        size as f64 / n as f64
    );
}
