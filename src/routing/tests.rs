use super::*;
use crate::zendesk::models::{Identity, Organization, Ticket, User};

fn ua() -> PhoneParser {
    PhoneParser::new("UA").unwrap()
}

fn e164(raw: &str) -> E164 {
    ua().parse(raw).unwrap()
}

const NUM: &str = "+380441234567";

fn customer(id: i64, name: &str, phone: &str, updated: &str) -> User {
    User {
        id,
        name: Some(name.into()),
        phone: Some(phone.into()),
        role: Some("end-user".into()),
        updated_at: Some(updated.into()),
        ..Default::default()
    }
}

fn agent(id: i64, name: &str) -> User {
    User {
        id,
        name: Some(name.into()),
        email: Some(format!("agent{id}@example.com")),
        role: Some("agent".into()),
        active: Some(true),
        suspended: Some(false),
        ..Default::default()
    }
}

fn ticket(id: i64, requester: i64, assignee: Option<i64>, updated: &str) -> Ticket {
    Ticket {
        id,
        subject: Some(format!("subject {id}")),
        status: Some("open".into()),
        requester_id: Some(requester),
        assignee_id: assignee,
        updated_at: Some(updated.into()),
        ..Default::default()
    }
}

fn dir(entries: &[(&str, &str)]) -> Directory {
    Directory::new(
        &entries
            .iter()
            .map(|(n, e)| (n.to_string(), e.to_string()))
            .collect(),
    )
}

/// One customer on NUM, agent 100 "Olena Petrenko" (ext 101), agent 200 "Іван Франко" (ext 102).
fn base() -> Index {
    let p = ua();
    let mut ix = Index::new();
    ix.apply_user(
        &customer(1, "Acme Buyer", "044 123 45 67", "2024-01-01T00:00:00Z"),
        &p,
    );
    ix.apply_user(&agent(100, "Olena Petrenko"), &p);
    ix.apply_user(&agent(200, "Іван Франко"), &p);
    ix
}

fn std_dir() -> Directory {
    dir(&[("Olena Petrenko", "101"), ("Іван Франко", "102")])
}

#[test]
fn unknown_number_while_warming() {
    let mut ix = base();
    ix.set_warming();
    let a = route(&ix, &std_dir(), e164("+380509999999"));
    assert_eq!(a.decision, Decision::DefaultRouting);
    assert_eq!(a.reason, "index warming");
    assert_eq!(a.kind, ReasonKind::Warming);
    // Once complete, the same number has no customer, said as such.
    ix.set_loaded();
    let b = route(&ix, &std_dir(), e164("+380509999999"));
    assert_eq!(b.kind, ReasonKind::NoCustomer);
}

#[test]
fn unknown_number() {
    let ix = base();
    let a = route(&ix, &std_dir(), e164("+380509999999"));
    assert_eq!(a.decision, Decision::DefaultRouting);
    assert_eq!(a.reason, "no customer with this number");
    assert_eq!(a.kind, ReasonKind::NoCustomer);
    assert!(a.agent.is_none() && a.customer.is_none() && a.ticket.is_none());
    let c = lookup_caller(&ix, e164("+380509999999"));
    assert!(!c.found);
    assert!(c.display_name.is_empty());
}

#[test]
fn no_open_ticket() {
    let mut ix = base();
    let mut solved = ticket(5, 1, Some(100), "2024-02-01T00:00:00Z");
    solved.status = Some("solved".into());
    ix.apply_ticket(&solved);
    let a = route(&ix, &std_dir(), e164(NUM));
    assert_eq!(a.decision, Decision::DefaultRouting);
    assert_eq!(a.reason, "no open ticket");
    assert_eq!(a.kind, ReasonKind::NoOpenTicket);
    assert_eq!(a.customer.unwrap().id, 1);
    assert!(a.agent.is_none() && a.ticket.is_none());
}

#[test]
fn routes_to_the_assignee_of_the_open_ticket() {
    let mut ix = base();
    ix.apply_ticket(&ticket(123, 1, Some(100), "2024-02-01T00:00:00Z"));
    let a = route(&ix, &std_dir(), e164(NUM));
    assert_eq!(a.decision, Decision::RouteToAgent);
    assert_eq!(a.reason, "ticket 123 is assigned to Olena Petrenko");
    assert_eq!(a.kind, ReasonKind::Routed);
    let agent = a.agent.unwrap();
    assert_eq!((agent.id, agent.extension.as_deref()), (100, Some("101")));
    assert_eq!(agent.email, "agent100@example.com");
    let t = a.ticket.unwrap();
    assert_eq!((t.id, t.assignee_id, t.status), (123, 100, "open"));
    assert_eq!(t.updated_at, 1_706_745_600);
    let c = a.customer.unwrap();
    assert_eq!((c.id, c.phone), (1, e164(NUM)));
}

#[test]
fn pending_and_hold_count_as_open() {
    for st in ["new", "pending", "hold"] {
        let mut ix = base();
        let mut t = ticket(9, 1, Some(200), "2024-02-01T00:00:00Z");
        t.status = Some(st.into());
        ix.apply_ticket(&t);
        let a = route(&ix, &std_dir(), e164(NUM));
        assert_eq!(a.decision, Decision::RouteToAgent, "{st}");
        assert_eq!(a.agent.unwrap().extension.as_deref(), Some("102"));
        assert_eq!(a.ticket.unwrap().status, st);
    }
}

#[test]
fn latest_updated_assigned_ticket_wins_and_ties_go_to_higher_id() {
    let mut ix = base();
    ix.apply_ticket(&ticket(10, 1, Some(100), "2024-02-01T00:00:00Z"));
    ix.apply_ticket(&ticket(11, 1, Some(200), "2024-03-01T00:00:00Z"));
    let a = route(&ix, &std_dir(), e164(NUM));
    assert_eq!(a.ticket.unwrap().id, 11);
    assert_eq!(a.agent.unwrap().id, 200);

    // Same updated_at: higher id wins, whatever the insertion order.
    ix.apply_ticket(&ticket(9, 1, Some(100), "2024-03-01T00:00:00Z"));
    assert_eq!(route(&ix, &std_dir(), e164(NUM)).ticket.unwrap().id, 11);
    ix.apply_ticket(&ticket(12, 1, Some(100), "2024-03-01T00:00:00Z"));
    let a = route(&ix, &std_dir(), e164(NUM));
    assert_eq!(a.ticket.unwrap().id, 12);
    assert_eq!(a.agent.unwrap().id, 100);
}

#[test]
fn unassigned_newer_ticket_is_passed_over() {
    let mut ix = base();
    ix.apply_ticket(&ticket(10, 1, Some(100), "2024-02-01T00:00:00Z"));
    ix.apply_ticket(&ticket(11, 1, None, "2024-03-01T00:00:00Z"));
    let a = route(&ix, &std_dir(), e164(NUM));
    assert_eq!(a.decision, Decision::RouteToAgent);
    assert_eq!(a.ticket.unwrap().id, 10);
    // Caller ID's lead is rule 4's ticket too.
    assert_eq!(lookup_caller(&ix, e164(NUM)).open_ticket.unwrap().id, 10);
}

#[test]
fn only_unassigned_tickets() {
    let mut ix = base();
    ix.apply_ticket(&ticket(10, 1, None, "2024-02-01T00:00:00Z"));
    ix.apply_ticket(&ticket(123, 1, None, "2024-03-01T00:00:00Z"));
    let a = route(&ix, &std_dir(), e164(NUM));
    assert_eq!(a.decision, Decision::DefaultRouting);
    assert_eq!(a.reason, "ticket 123 has no assignee");
    assert_eq!(a.kind, ReasonKind::NoAssignee);
    assert!(a.agent.is_none());
    assert_eq!(a.ticket.unwrap().id, 123);
    // Caller ID falls back to the most recently updated open ticket.
    let c = lookup_caller(&ix, e164(NUM));
    assert_eq!(c.open_ticket.unwrap().id, 123);
}

#[test]
fn inactive_or_suspended_assignee_is_passed_over() {
    let p = ua();
    let mut ix = base();
    ix.apply_ticket(&ticket(10, 1, Some(100), "2024-02-01T00:00:00Z"));
    ix.apply_ticket(&ticket(11, 1, Some(200), "2024-03-01T00:00:00Z"));
    let mut gone = agent(200, "Іван Франко");
    gone.active = Some(false);
    ix.apply_user(&gone, &p);
    let a = route(&ix, &std_dir(), e164(NUM));
    assert_eq!(a.decision, Decision::RouteToAgent);
    assert_eq!(a.agent.unwrap().id, 100);

    let mut susp = agent(100, "Olena Petrenko");
    susp.suspended = Some(true);
    ix.apply_user(&susp, &p);
    let a = route(&ix, &std_dir(), e164(NUM));
    assert_eq!(a.decision, Decision::DefaultRouting);
    assert_eq!(a.reason, "ticket 11's assignee Іван Франко is inactive");
    assert_eq!(a.kind, ReasonKind::InactiveAssignee);
    assert!(a.agent.is_none());

    ix.apply_ticket(&ticket(11, 1, Some(555), "2024-03-01T00:00:00Z"));
    let a = route(&ix, &std_dir(), e164(NUM));
    assert_eq!(
        a.reason,
        "ticket 11's assignee (user 555) is not a known agent"
    );
    ix.apply_ticket(&ticket(11, 1, Some(100), "2024-03-01T00:00:00Z"));
    let a = route(&ix, &std_dir(), e164(NUM));
    assert_eq!(a.reason, "ticket 11's assignee Olena Petrenko is suspended");
    assert_eq!(a.kind, ReasonKind::InactiveAssignee);
}

#[test]
fn assignee_without_extension_still_fills_agent() {
    let mut ix = base();
    ix.apply_ticket(&ticket(10, 1, Some(100), "2024-02-01T00:00:00Z"));
    let a = route(&ix, &dir(&[("Іван Франко", "102")]), e164(NUM));
    assert_eq!(a.decision, Decision::DefaultRouting);
    assert_eq!(a.reason, "assignee Olena Petrenko has no PBX extension");
    assert_eq!(a.kind, ReasonKind::NoExtension);
    let agent = a.agent.unwrap();
    assert_eq!((agent.id, agent.extension), (100, None));
    assert_eq!(a.ticket.unwrap().id, 10);
}

#[test]
fn directory_matches_case_spacing_and_normal_form() {
    let mut ix = base();
    let p = ua();
    // Agent names in Zendesk written differently from the directory.
    ix.apply_user(&agent(100, "  olena   PETRENKO"), &p);
    ix.apply_user(&agent(200, "Іва\u{0438}\u{0306} Франко"), &p); // NFD "й"
    ix.apply_user(&agent(300, "Андрій Шевченко"), &p);
    let d = dir(&[
        ("Olena Petrenko", "101"),
        ("ІВАЙ франко", "102"),
        ("Андрі\u{0438}\u{0306}  Шевченко", "103"),
    ]);
    for (assignee, ext) in [(100, "101"), (200, "102"), (300, "103")] {
        ix.apply_ticket(&ticket(10, 1, Some(assignee), "2024-02-01T00:00:00Z"));
        let a = route(&ix, &d, e164(NUM));
        assert_eq!(a.decision, Decision::RouteToAgent, "{assignee}");
        assert_eq!(a.agent.unwrap().extension.as_deref(), Some(ext));
    }
    assert_eq!(d.extension("OLENA PETRENKO"), Some("101"));
    assert_eq!(d.extension("Olena Petrenk0"), None);
}

#[test]
fn reassignment_updates_the_answer() {
    let mut ix = base();
    ix.apply_ticket(&ticket(10, 1, Some(100), "2024-02-01T00:00:00Z"));
    assert_eq!(route(&ix, &std_dir(), e164(NUM)).agent.unwrap().id, 100);
    ix.apply_ticket(&ticket(10, 1, Some(200), "2024-02-02T00:00:00Z"));
    let a = route(&ix, &std_dir(), e164(NUM));
    assert_eq!(a.agent.unwrap().id, 200);
    assert_eq!(a.reason, "ticket 10 is assigned to Іван Франко");
    let mut solved = ticket(10, 1, Some(200), "2024-02-03T00:00:00Z");
    solved.status = Some("solved".into());
    ix.apply_ticket(&solved);
    assert_eq!(route(&ix, &std_dir(), e164(NUM)).reason, "no open ticket");
}

#[test]
fn shared_number_routes_across_all_customers() {
    let p = ua();
    let mut ix = base();
    ix.apply_user(
        &customer(2, "Second", "380441234567", "2024-06-01T00:00:00Z"),
        &p,
    );
    ix.apply_user(
        &customer(3, "Third", "0441234567", "2024-07-01T00:00:00Z"),
        &p,
    );
    ix.apply_ticket(&ticket(10, 1, Some(100), "2024-02-01T00:00:00Z"));
    ix.apply_ticket(&ticket(20, 2, Some(200), "2024-03-01T00:00:00Z"));
    ix.apply_ticket(&ticket(30, 3, None, "2024-04-01T00:00:00Z"));
    let a = route(&ix, &std_dir(), e164(NUM));
    assert_eq!(a.ticket.unwrap().id, 20);
    assert_eq!(a.agent.unwrap().id, 200);
    assert_eq!(a.customer.unwrap().id, 2);
    let c = lookup_caller(&ix, e164(NUM));
    assert_eq!(c.customer.unwrap().id, 2);
    assert_eq!(c.open_ticket.unwrap().id, 20);
}

#[test]
fn caller_id_shared_number_without_tickets_picks_latest_updated() {
    let p = ua();
    let mut ix = base();
    ix.apply_user(
        &customer(2, "Newest", "380441234567", "2024-06-01T00:00:00Z"),
        &p,
    );
    ix.apply_user(
        &customer(3, "Middle", "0441234567", "2024-03-01T00:00:00Z"),
        &p,
    );
    let c = lookup_caller(&ix, e164(NUM));
    assert!(c.found);
    assert_eq!(c.display_name, "Newest");
    assert!(c.open_ticket.is_none());
    // The one with an (unassigned) open ticket beats the most recently updated.
    ix.apply_ticket(&ticket(30, 3, None, "2024-04-01T00:00:00Z"));
    let c = lookup_caller(&ix, e164(NUM));
    assert_eq!(c.display_name, "Middle");
    assert_eq!(c.open_ticket.unwrap().id, 30);
    let a = route(&ix, &std_dir(), e164(NUM));
    assert_eq!(a.customer.unwrap().id, 3);
}

#[test]
fn caller_id_with_organization_in_brackets() {
    let p = ua();
    let mut ix = Index::new();
    let mut u = customer(1, "Іван Петренко", "0441234567", "2024-01-01T00:00:00Z");
    u.organization_id = Some(77);
    ix.apply_user(&u, &p);
    // Org not known yet: no brackets.
    assert_eq!(lookup_caller(&ix, e164(NUM)).display_name, "Іван Петренко");
    ix.apply_organization(&Organization {
        id: 77,
        name: Some("ТОВ Ромашка".into()),
        ..Default::default()
    });
    let c = lookup_caller(&ix, e164(NUM));
    assert_eq!(c.display_name, "Іван Петренко (ТОВ Ромашка)");
    let org = c.customer.unwrap().organization.unwrap();
    assert_eq!((org.id, org.name.as_str()), (77, "ТОВ Ромашка"));
}

#[test]
fn second_identity_routes_and_suspended_customer_does_not() {
    let p = ua();
    let mut ix = base();
    ix.apply_identities(
        1,
        &[Identity {
            id: 1,
            user_id: 1,
            kind: Some("phone_number".into()),
            value: Some("+380 50 111 22 33".into()),
            ..Default::default()
        }],
        &p,
    );
    ix.apply_ticket(&ticket(10, 1, Some(100), "2024-02-01T00:00:00Z"));
    let a = route(&ix, &std_dir(), e164("050-111-22-33"));
    assert_eq!(a.decision, Decision::RouteToAgent);
    let mut s = customer(1, "Acme Buyer", "044 123 45 67", "2024-01-01T00:00:00Z");
    s.suspended = Some(true);
    ix.apply_user(&s, &p);
    assert_eq!(
        route(&ix, &std_dir(), e164("0501112233")).reason,
        "no customer with this number"
    );
    assert!(!lookup_caller(&ix, e164(NUM)).found);
}

#[test]
fn phone_change_and_requester_change_move_the_route() {
    let p = ua();
    let mut ix = base();
    ix.apply_user(
        &customer(2, "Other", "0509999999", "2024-01-01T00:00:00Z"),
        &p,
    );
    ix.apply_ticket(&ticket(10, 1, Some(100), "2024-02-01T00:00:00Z"));
    ix.apply_ticket(&ticket(10, 2, Some(100), "2024-02-02T00:00:00Z"));
    assert_eq!(route(&ix, &std_dir(), e164(NUM)).reason, "no open ticket");
    assert_eq!(
        route(&ix, &std_dir(), e164("0509999999")).decision,
        Decision::RouteToAgent
    );
    ix.apply_user(
        &customer(2, "Other", "0661234567", "2024-01-02T00:00:00Z"),
        &p,
    );
    assert_eq!(
        route(&ix, &std_dir(), e164("0509999999")).reason,
        "no customer with this number"
    );
    assert_eq!(
        route(&ix, &std_dir(), e164("066 123 45 67")).decision,
        Decision::RouteToAgent
    );
}

#[test]
fn resolve_number_fast_path_and_fallback() {
    let p = ua();
    let ix = base();
    assert_eq!(resolve_number(&ix, &p, "+380441234567"), Ok(e164(NUM)));
    assert_eq!(resolve_number(&ix, &p, "044 123 45 67"), Ok(e164(NUM)));
    // Canonical-looking but unknown: still validated by a full parse.
    assert_eq!(
        resolve_number(&ix, &p, "+380501112233"),
        Ok(e164("+380501112233"))
    );
    assert!(resolve_number(&ix, &p, "+38 (0) 44 123 45 67").is_ok());
    assert_eq!(resolve_number(&ix, &p, "  "), Err(PhoneError::Empty));
    assert!(resolve_number(&ix, &p, "hello").is_err());

    let r = Resolver::new(p.clone(), 100);
    for _ in 0..3 {
        assert_eq!(r.resolve(&ix, "044 123 45 67"), Ok(e164(NUM)));
        assert_eq!(r.resolve(&ix, "+380441234567"), Ok(e164(NUM)));
        assert!(r.resolve(&ix, "hello").is_err());
        assert!(r.resolve(&ix, &"9".repeat(100)).is_err());
    }
}

/// Numbers enter the parse cache on their second sighting: a stream of new callers leaves it empty
/// (no insert, no eviction), a repeated caller is cached, and every answer equals a plain parse.
#[test]
fn parse_cache_admits_on_second_sighting() {
    let p = PhoneParser::new("UA").unwrap();
    let ix = Index::new();
    let r = Resolver::new(p.clone(), 1000);
    for i in 0..500 {
        let raw = format!("050 {:03} {:02} {:02}", i / 100, i % 100, i % 7);
        assert_eq!(r.resolve(&ix, &raw), p.parse(&raw), "{raw}");
    }
    assert_eq!(r.cached(), 0, "numbers seen once are not cached");
    for _ in 0..2 {
        assert_eq!(r.resolve(&ix, "044 123 45 67"), Ok(e164(NUM)));
    }
    assert_eq!(r.cached(), 1, "the second sighting caches");
    assert_eq!(r.resolve(&ix, "044 123 45 67"), Ok(e164(NUM)));
    // Errors are cached the same way and stay errors.
    for _ in 0..3 {
        assert!(r.resolve(&ix, "12").is_err());
    }
    assert_eq!(r.cached(), 2);
    let none = Resolver::new(p.clone(), 0);
    assert_eq!(none.resolve(&ix, "044 123 45 67"), Ok(e164(NUM)));
}

// ---- DESIGN §3 rule 7: the fallback to a recent ticket or the last reported call ----

/// "Now" of the rule-7 tests: 2024-06-15T00:00:00Z.
fn now() -> i64 {
    "2024-06-15T00:00:00Z"
        .parse::<jiff::Timestamp>()
        .unwrap()
        .as_second()
}

fn days_ago(d: i64) -> i64 {
    now() - d * 86_400
}

fn stamp(secs: i64) -> String {
    jiff::Timestamp::from_second(secs).unwrap().to_string()
}

fn done(id: i64, requester: i64, assignee: Option<i64>, status: &str, at: i64) -> Ticket {
    Ticket {
        status: Some(status.into()),
        ..ticket(id, requester, assignee, &stamp(at))
    }
}

fn two_weeks() -> Fallback {
    Fallback::new(14, now())
}

fn sticky(ix: &Index, d: &Directory, fb: Fallback) -> RouteAnswer {
    route_with(ix, d, e164(NUM), fb)
}

#[test]
fn recent_ticket_routes_to_its_assignee() {
    let mut ix = base();
    ix.apply_ticket(&done(7, 1, Some(100), "solved", days_ago(3)));
    let a = sticky(&ix, &std_dir(), two_weeks());
    assert_eq!(
        (a.decision, a.basis, a.kind),
        (
            Decision::RouteToAgent,
            Basis::RecentTicket,
            ReasonKind::Routed
        )
    );
    assert_eq!(a.reason, "recent ticket 7 (solved) of Olena Petrenko");
    assert_eq!(a.agent.as_ref().unwrap().extension.as_deref(), Some("101"));
    let t = a.ticket.unwrap();
    assert_eq!((t.id, t.status, t.assignee_id), (7, "solved", 100));
    assert_eq!(a.customer.unwrap().id, 1);
    // Off (the default): today's answer exactly.
    let off = sticky(&ix, &std_dir(), Fallback::new(0, now()));
    assert_eq!(off, route(&ix, &std_dir(), e164(NUM)));
    assert_eq!(
        (off.decision, off.basis),
        (Decision::DefaultRouting, Basis::None)
    );
    assert_eq!(off.reason, "no open ticket");
}

#[test]
fn open_ticket_beats_recent_ticket_and_last_call() {
    let mut ix = base();
    ix.apply_ticket(&ticket(5, 1, Some(100), &stamp(days_ago(30))));
    ix.apply_ticket(&done(7, 1, Some(200), "solved", days_ago(1)));
    ix.apply_call(e164(NUM), 200, days_ago(0));
    let a = sticky(&ix, &std_dir(), two_weeks());
    assert_eq!((a.basis, a.agent.unwrap().id), (Basis::OpenTicket, 100));
    assert_eq!(a.ticket.unwrap().id, 5);
    // Even when the open ticket's owner has no extension: the open ticket decides.
    let only_ivan = dir(&[("Іван Франко", "102")]);
    let a = sticky(&ix, &only_ivan, two_weeks());
    assert_eq!(
        (a.decision, a.basis),
        (Decision::DefaultRouting, Basis::None)
    );
    assert_eq!(a.reason, "assignee Olena Petrenko has no PBX extension");
}

#[test]
fn recent_ticket_beats_a_later_call() {
    let mut ix = base();
    ix.apply_ticket(&done(7, 1, Some(100), "closed", days_ago(5)));
    ix.apply_call(e164(NUM), 200, days_ago(1));
    let a = sticky(&ix, &std_dir(), two_weeks());
    assert_eq!((a.basis, a.agent.unwrap().id), (Basis::RecentTicket, 100));
    assert_eq!(a.reason, "recent ticket 7 (closed) of Olena Petrenko");
}

#[test]
fn last_call_routes_when_there_is_no_recent_ticket() {
    let mut ix = base();
    ix.apply_call(e164(NUM), 200, days_ago(2));
    let a = sticky(&ix, &std_dir(), two_weeks());
    assert_eq!(
        (a.decision, a.basis, a.agent.as_ref().unwrap().id),
        (Decision::RouteToAgent, Basis::LastCall, 200)
    );
    assert_eq!(
        a.reason,
        "last call (2 days ago) taken by Іван Франко (no solved or closed ticket within 14 days)"
    );
    assert!(a.ticket.is_none());
    assert_eq!(a.customer.unwrap().id, 1);
    // A later call replaces it; an older one (a late report) does not.
    ix.apply_call(e164(NUM), 100, days_ago(1));
    ix.apply_call(e164(NUM), 200, days_ago(10));
    let a = sticky(&ix, &std_dir(), two_weeks());
    assert_eq!((a.basis, a.agent.unwrap().id), (Basis::LastCall, 100));
}

#[test]
fn expired_window_falls_through_and_says_why() {
    let mut ix = base();
    ix.apply_ticket(&done(7, 1, Some(100), "solved", days_ago(20)));
    ix.apply_call(e164(NUM), 200, days_ago(3));
    // The ticket is outside the window (measured from its updated_at): the call decides.
    let a = sticky(&ix, &std_dir(), two_weeks());
    assert_eq!(
        (a.basis, a.agent.as_ref().unwrap().id),
        (Basis::LastCall, 200)
    );
    assert!(
        a.reason.contains(
            "recent ticket 7 (solved) was updated 20 days ago, outside the 14-day window"
        ),
        "{}",
        a.reason
    );
    // A two-day window: the call (measured from its start) is outside too.
    let a = sticky(&ix, &std_dir(), Fallback::new(2, now()));
    assert_eq!(
        (a.decision, a.basis),
        (Decision::DefaultRouting, Basis::None)
    );
    assert_eq!(a.kind, ReasonKind::NoOpenTicket);
    assert_eq!(
        a.reason,
        "no open ticket; recent ticket 7 (solved) was updated 20 days ago, outside the 2-day window; \
         the last reported call was 3 days ago, outside the 2-day window"
    );
    // Nothing at all.
    let a = sticky(&base(), &std_dir(), two_weeks());
    assert_eq!(
        a.reason,
        "no open ticket; no solved or closed ticket within 14 days; no reported call within 14 days"
    );
}

#[test]
fn inactive_or_unmapped_agents_do_not_take_the_fallback() {
    let p = ua();
    let mut ix = base();
    ix.apply_user(
        &User {
            active: Some(false),
            ..agent(300, "Gone Agent")
        },
        &p,
    );
    ix.apply_ticket(&done(7, 1, Some(300), "solved", days_ago(1)));
    ix.apply_call(e164(NUM), 200, days_ago(2));
    // The recent ticket's assignee is inactive: the last call decides.
    let a = sticky(&ix, &std_dir(), two_weeks());
    assert_eq!(
        (a.basis, a.agent.as_ref().unwrap().id),
        (Basis::LastCall, 200)
    );
    assert!(
        a.reason
            .contains("recent ticket 7 (solved): Gone Agent is inactive"),
        "{}",
        a.reason
    );
    // The last call's agent has no extension either: default routing, both stories told.
    let only_olena = dir(&[("Olena Petrenko", "101")]);
    let a = sticky(&ix, &only_olena, two_weeks());
    assert_eq!(
        (a.decision, a.basis),
        (Decision::DefaultRouting, Basis::None)
    );
    assert_eq!(
        a.reason,
        "no open ticket; recent ticket 7 (solved): Gone Agent is inactive; \
         the last reported call's agent Іван Франко has no PBX extension"
    );
    // Unassigned recent ticket, suspended call agent.
    let mut ix = base();
    ix.apply_ticket(&done(8, 1, None, "solved", days_ago(1)));
    ix.apply_call(e164(NUM), 200, days_ago(1));
    ix.apply_user(
        &User {
            suspended: Some(true),
            ..agent(200, "Іван Франко")
        },
        &p,
    );
    let a = sticky(&ix, &std_dir(), two_weeks());
    assert_eq!(a.decision, Decision::DefaultRouting);
    assert_eq!(
        a.reason,
        "no open ticket; recent ticket 8 (solved) has no assignee; \
         the last reported call's agent Іван Франко is suspended"
    );
}

#[test]
fn an_open_ticket_passed_over_lets_the_fallback_apply() {
    let mut ix = base();
    ix.apply_ticket(&ticket(5, 1, None, &stamp(days_ago(1))));
    ix.apply_ticket(&done(7, 1, Some(100), "solved", days_ago(3)));
    let a = sticky(&ix, &std_dir(), two_weeks());
    assert_eq!((a.basis, a.agent.unwrap().id), (Basis::RecentTicket, 100));
    assert_eq!(
        a.reason,
        "ticket 5 has no assignee; recent ticket 7 (solved) of Olena Petrenko"
    );
}

#[test]
fn several_customers_on_one_number_use_the_most_recent_evidence() {
    let p = ua();
    let mut ix = base();
    ix.apply_user(
        &customer(2, "Second Desk", "+380441234567", "2024-01-02T00:00:00Z"),
        &p,
    );
    ix.apply_ticket(&done(7, 1, Some(100), "solved", days_ago(6)));
    ix.apply_ticket(&done(8, 2, Some(200), "solved", days_ago(2)));
    let a = sticky(&ix, &std_dir(), two_weeks());
    assert_eq!(
        (a.basis, a.agent.unwrap().id, a.customer.unwrap().id),
        (Basis::RecentTicket, 200, 2)
    );
    // The newer one's assignee cannot take it: the other customer's ticket is next.
    ix.apply_ticket(&done(8, 2, None, "solved", days_ago(1)));
    let a = sticky(&ix, &std_dir(), two_weeks());
    assert_eq!(
        (a.basis, a.agent.unwrap().id, a.customer.unwrap().id),
        (Basis::RecentTicket, 100, 1)
    );
    // A call on a shared number counts for every customer on it.
    let mut ix = base();
    ix.apply_user(
        &customer(2, "Second Desk", "+380441234567", "2024-01-02T00:00:00Z"),
        &p,
    );
    ix.apply_call(e164(NUM), 200, days_ago(1));
    assert_eq!(ix.last_call_of(1).map(|c| c.agent_id), Some(200));
    assert_eq!(ix.last_call_of(2).map(|c| c.agent_id), Some(200));
}

#[test]
fn reopened_or_deleted_ticket_is_no_longer_recent() {
    let mut ix = base();
    ix.apply_ticket(&done(7, 1, Some(100), "solved", days_ago(3)));
    // A stale export row of an older ticket does not replace it.
    ix.apply_ticket(&done(6, 1, Some(200), "closed", days_ago(9)));
    assert_eq!(ix.done_ticket_of(1).map(|t| t.id), Some(7));
    // Reopened: an open ticket now (rule 4 decides), and no longer the recent one.
    ix.apply_ticket(&ticket(7, 1, Some(100), &stamp(days_ago(1))));
    assert!(ix.done_ticket_of(1).is_none());
    assert_eq!(
        sticky(&ix, &std_dir(), two_weeks()).basis,
        Basis::OpenTicket
    );
    ix.apply_ticket(&done(7, 1, Some(100), "solved", days_ago(0)));
    assert_eq!(ix.done_ticket_of(1).map(|t| t.id), Some(7));
    ix.apply_ticket(&done(7, 1, Some(100), "deleted", days_ago(0)));
    assert!(ix.done_ticket_of(1).is_none());
    assert_eq!(ix.recent_len(), 0, "an empty record is dropped");
}

#[test]
fn recent_days_zero_answers_as_before_for_every_kind_of_number() {
    let p = ua();
    let mut ix = base();
    ix.apply_user(
        &customer(2, "B", "+380501000002", "2024-01-01T00:00:00Z"),
        &p,
    );
    ix.apply_user(
        &customer(3, "C", "+380501000003", "2024-01-01T00:00:00Z"),
        &p,
    );
    ix.apply_ticket(&ticket(5, 2, Some(100), &stamp(days_ago(1))));
    ix.apply_ticket(&ticket(6, 3, None, &stamp(days_ago(1))));
    ix.apply_ticket(&done(7, 1, Some(100), "solved", days_ago(1)));
    ix.apply_call(e164("+380501000003"), 200, days_ago(1));
    for n in [NUM, "+380501000002", "+380501000003", "+380509999999"] {
        let before = route(&ix, &std_dir(), e164(n));
        let off = route_with(&ix, &std_dir(), e164(n), Fallback::new(0, now()));
        assert_eq!(off, before, "{n}");
        let expected = match before.decision {
            Decision::RouteToAgent => Basis::OpenTicket,
            Decision::DefaultRouting => Basis::None,
        };
        assert_eq!(off.basis, expected, "{n}");
    }
}

#[test]
fn an_owner_sharing_a_name_with_another_active_agent_is_flagged() {
    let p = ua();
    let mut ix = base();
    ix.apply_user(&agent(101, "olena  PETRENKO"), &p);
    ix.apply_ticket(&ticket(5, 1, Some(100), "2024-02-01T00:00:00Z"));
    let a = route(&ix, &std_dir(), e164(NUM));
    assert_eq!(
        (a.decision, a.basis),
        (Decision::RouteToAgent, Basis::OpenTicket)
    );
    assert_eq!(
        a.reason,
        "ticket 5 is assigned to Olena Petrenko; but Olena Petrenko shares this name with active \
         agent 101 (the directory cannot tell them apart: give one a distinct name)"
    );
    // Once the namesake is inactive, nothing to say.
    ix.apply_user(
        &User {
            active: Some(false),
            ..agent(101, "olena  PETRENKO")
        },
        &p,
    );
    assert_eq!(
        route(&ix, &std_dir(), e164(NUM)).reason,
        "ticket 5 is assigned to Olena Petrenko"
    );
}
