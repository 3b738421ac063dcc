//! Generated Zendesk records for the benches: `n` end-users, each with a unique Ukrainian mobile
//! number stored in one of several formats, and one open ticket assigned to one of 50 agents whose
//! names are all in the directory.
#![allow(dead_code)]

use std::collections::BTreeMap;

use deskline::{
    index::Index,
    phone::PhoneParser,
    routing::Directory,
    zendesk::models::{Ticket, User},
};

pub const AGENTS: i64 = 50;
pub const CUSTOMER_BASE: i64 = 360_000_000_000;
pub const TICKET_BASE: i64 = 10_000_000;

pub fn parser() -> PhoneParser {
    PhoneParser::new("UA").unwrap()
}

/// Customer `i`'s number: `+38050` then seven digits (valid UA mobile numbers).
pub fn digits(i: usize) -> String {
    format!("{:07}", i % 10_000_000)
}

pub fn canonical(i: usize) -> String {
    format!("+38050{}", digits(i))
}

pub fn national(i: usize) -> String {
    let d = digits(i);
    format!("050 {} {} {}", &d[..3], &d[3..5], &d[5..])
}

/// How a number is stored in Zendesk: a mix, as agents typed them.
fn stored(i: usize) -> String {
    let d = digits(i);
    match i % 4 {
        0 => canonical(i),
        1 => national(i),
        2 => format!("38050{d}"),
        _ => format!("+38 (050) {}-{}-{}", &d[..3], &d[3..5], &d[5..]),
    }
}

pub fn agent_name(k: i64) -> String {
    format!("Agent Number{k}")
}

pub fn agents() -> Vec<User> {
    (0..AGENTS)
        .map(|k| User {
            id: 900 + k,
            name: Some(agent_name(k)),
            email: Some(format!("agent{k}@example.com")),
            role: Some("agent".into()),
            active: Some(true),
            suspended: Some(false),
            ..Default::default()
        })
        .collect()
}

pub fn directory() -> Directory {
    let entries: BTreeMap<String, String> = (0..AGENTS)
        .map(|k| (agent_name(k), format!("{}", 100 + k)))
        .collect();
    Directory::new(&entries)
}

pub fn user(i: usize) -> User {
    User {
        id: CUSTOMER_BASE + i as i64,
        name: Some(format!("Customer {i:07}")),
        phone: Some(stored(i)),
        role: Some("end-user".into()),
        active: Some(true),
        suspended: Some(false),
        updated_at: Some("2024-05-01T10:00:00Z".into()),
        ..Default::default()
    }
}

pub fn ticket(i: usize) -> Ticket {
    Ticket {
        id: TICKET_BASE + i as i64,
        subject: Some(format!("Call from {}", canonical(i))),
        status: Some("open".into()),
        requester_id: Some(CUSTOMER_BASE + i as i64),
        assignee_id: Some(900 + (i as i64 % AGENTS)),
        updated_at: Some("2024-05-02T10:00:00Z".into()),
        ..Default::default()
    }
}

/// An index of `n` customers with one open assigned ticket each, built through `apply_*` from
/// generated records, a batch at a time so the input never sits in memory whole.
pub fn build(n: usize) -> Index {
    let p = parser();
    let mut ix = Index::new();
    for a in agents() {
        ix.apply_user(&a, &p);
    }
    let batch = 10_000;
    let mut start = 0;
    while start < n {
        let end = (start + batch).min(n);
        let users: Vec<User> = (start..end).map(user).collect();
        let tickets: Vec<Ticket> = (start..end).map(ticket).collect();
        for u in &users {
            ix.apply_user(u, &p);
        }
        for t in &tickets {
            ix.apply_ticket(t);
        }
        start = end;
    }
    ix.set_loaded();
    ix
}
