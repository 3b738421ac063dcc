//! End to end over loopback: simulator → follower → index → gRPC server → tonic client.
//! Every rule of DESIGN §3, freshness, restart from the snapshot, auth and bad input.

mod common;

use std::time::Duration;

use common::*;
use deskline::{
    phone::PhoneParser,
    proto::{self, Basis, Decision, LookupCallerRequest, ReportCallRequest, RouteCallRequest},
};
use deskline_sim::{NewTicket, NewUser, Role, Status, Store, TicketPatch, UserPatch};
use tonic::Code;
use unicode_normalization::UnicodeNormalization;

/// The hand-made account behind the rule tests, with the ids the tests check against.
struct Rules {
    olena: i64,
    ivan: i64,
    jane: i64,
    petro: i64,
    zoe: i64,
    inactive_agent: i64,
    suspended_agent: i64,
    c1: i64,
    c1_ticket: i64,
    c2: i64,
    shared_open: i64,
    c4_newest: i64,
    c5_high: i64,
    c6_ticket: i64,
    c7_fallback: i64,
    c8_ticket: i64,
    hold_ticket: i64,
    org: i64,
}

fn user(s: &mut Store, name: &str, phone: Option<&str>, role: Option<Role>) -> i64 {
    s.create_user(NewUser {
        name: name.into(),
        email: role.map(|_| format!("{}@acme.test", name.to_lowercase().replace(' ', "."))),
        phone: phone.map(Into::into),
        role,
        organization_id: None,
        external_id: None,
        shared_phone_number: false,
        suspended: false,
        user_fields: Default::default(),
    })
    .unwrap()
}

fn ticket(
    s: &mut Store,
    requester: i64,
    assignee: Option<i64>,
    status: Status,
    updated_at: i64,
) -> i64 {
    let id = s
        .create_ticket(NewTicket {
            requester_id: requester,
            assignee_id: assignee,
            status: Some(status),
            ..NewTicket::default()
        })
        .unwrap();
    // Closed and deleted tickets refuse updates, as in Zendesk: they keep their creation stamp.
    if !matches!(status, Status::Closed | Status::Deleted) {
        s.update_ticket(
            id,
            TicketPatch {
                updated_at: Some(updated_at),
                ..TicketPatch::default()
            },
        )
        .unwrap();
    }
    id
}

fn rules_store() -> (Store, Rules) {
    let mut s = Store::new();
    let t0 = 1_700_000_000;
    let olena = user(&mut s, "Olena Petrenko", None, Some(Role::Agent));
    let ivan = user(&mut s, "Іван Коваленко", None, Some(Role::Admin));
    let jane = user(&mut s, "Jane   Doe", None, Some(Role::Agent));
    let petro = user(&mut s, "Petro Unlisted", None, Some(Role::Agent));
    let zoe = user(&mut s, "Zoë Ångström", None, Some(Role::Agent));
    let inactive_agent = user(&mut s, "Gone Agent", None, Some(Role::Agent));
    let suspended_agent = user(&mut s, "Paused Agent", None, Some(Role::Agent));

    let org = s.create_organization("Acme Kyiv", None).unwrap();
    // 1. stored in a national format, queried in others; with an organization.
    let c1 = user(&mut s, "Taras Shevchuk", Some("044 123-45-67"), None);
    s.update_user(
        c1,
        UserPatch {
            organization_id: Some(Some(org)),
            ..UserPatch::default()
        },
    )
    .unwrap();
    let c1_ticket = ticket(&mut s, c1, Some(olena), Status::Open, t0);
    // 2. found by a second phone identity only.
    let c2 = user(&mut s, "Мирослава Бондар", Some("+380501112233"), None);
    s.add_phone_identity(c2, "+380 67 123 45 67").unwrap();
    ticket(&mut s, c2, Some(ivan), Status::New, t0);
    // 3. a shared number: one user with a solved ticket, one with a pending one.
    let c3a = user(&mut s, "Office Desk One", Some("+380631111111"), None);
    let c3b = user(&mut s, "Office Desk Two", Some("063 111 1111"), None);
    s.update_user(
        c3a,
        UserPatch {
            shared_phone_number: Some(true),
            ..UserPatch::default()
        },
    )
    .unwrap();
    s.update_user(
        c3b,
        UserPatch {
            shared_phone_number: Some(true),
            ..UserPatch::default()
        },
    )
    .unwrap();
    ticket(&mut s, c3a, Some(olena), Status::Solved, t0 + 500);
    let shared_open = ticket(&mut s, c3b, Some(jane), Status::Pending, t0);
    // 4. the latest updated assigned ticket wins.
    let c4 = user(&mut s, "Latest Wins", Some("+380661000004"), None);
    ticket(&mut s, c4, Some(olena), Status::Open, t0 + 1000);
    let c4_newest = ticket(&mut s, c4, Some(jane), Status::Open, t0 + 2000);
    // 5. ties go to the higher ticket id.
    let c5 = user(&mut s, "Tie Break", Some("+380661000005"), None);
    ticket(&mut s, c5, Some(olena), Status::Open, t0);
    let c5_high = ticket(&mut s, c5, Some(jane), Status::Open, t0);
    // 6. only an unassigned ticket.
    let c6 = user(&mut s, "Nobody Assigned", Some("+380661000006"), None);
    let c6_ticket = ticket(&mut s, c6, None, Status::Open, t0);
    // 7. the newer ticket's assignee is inactive: passed over for the older one.
    let c7 = user(&mut s, "Inactive Assignee", Some("+380661000007"), None);
    let c7_fallback = ticket(&mut s, c7, Some(olena), Status::Open, t0);
    ticket(&mut s, c7, Some(inactive_agent), Status::Open, t0 + 100);
    // 8. only a suspended assignee.
    let c8 = user(&mut s, "Suspended Assignee", Some("+380661000008"), None);
    let c8_ticket = ticket(&mut s, c8, Some(suspended_agent), Status::Open, t0);
    // 9. deleted and suspended customers are no customers.
    let c9 = user(&mut s, "Deleted Customer", Some("+380661000009"), None);
    ticket(&mut s, c9, Some(olena), Status::Open, t0);
    s.update_user(
        c9,
        UserPatch {
            active: Some(false),
            ..UserPatch::default()
        },
    )
    .unwrap();
    let c10 = user(&mut s, "Suspended Customer", Some("+380661000010"), None);
    ticket(&mut s, c10, Some(olena), Status::Open, t0);
    s.update_user(
        c10,
        UserPatch {
            suspended: Some(true),
            ..UserPatch::default()
        },
    )
    .unwrap();
    // 10. solved, closed and deleted tickets are not open.
    let c11 = user(&mut s, "All Done", Some("+380661000011"), None);
    ticket(&mut s, c11, Some(olena), Status::Solved, t0);
    ticket(&mut s, c11, Some(olena), Status::Closed, t0);
    ticket(&mut s, c11, Some(olena), Status::Deleted, t0);
    // 11. hold counts as open.
    let c12 = user(&mut s, "On Hold", Some("+380661000012"), None);
    let hold_ticket = ticket(&mut s, c12, Some(olena), Status::Hold, t0);
    // 12. the owner has no PBX extension.
    let c13 = user(&mut s, "No Extension", Some("+380661000013"), None);
    ticket(&mut s, c13, Some(petro), Status::Open, t0);
    // 13. the directory has the owner's name in NFD.
    let c14 = user(&mut s, "Unicode Owner", Some("+380661000014"), None);
    ticket(&mut s, c14, Some(zoe), Status::Open, t0);
    s.update_user(
        inactive_agent,
        UserPatch {
            active: Some(false),
            ..UserPatch::default()
        },
    )
    .unwrap();
    s.update_user(
        suspended_agent,
        UserPatch {
            suspended: Some(true),
            ..UserPatch::default()
        },
    )
    .unwrap();
    let r = Rules {
        olena,
        ivan,
        jane,
        petro,
        zoe,
        inactive_agent,
        suspended_agent,
        c1,
        c1_ticket,
        c2,
        shared_open,
        c4_newest,
        c5_high,
        c6_ticket,
        c7_fallback,
        c8_ticket,
        hold_ticket,
        org,
    };
    (s, r)
}

fn directory() -> String {
    let nfd: String = "Zoë Ångström".nfd().collect();
    format!(
        "[routing.directory]\n\"olena petrenko\" = \"101\"\n\"ІВАН   КОВАЛЕНКО\" = \"102\"\n\" Jane Doe \" = \"103\"\n\"{nfd}\" = \"104\"\n"
    )
}

async fn route(
    c: &mut proto::resolver_client::ResolverClient<tonic::transport::Channel>,
    caller: &str,
) -> proto::RouteCallResponse {
    c.route_call(RouteCallRequest {
        caller: caller.into(),
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner()
}

fn agent_id(r: &proto::RouteCallResponse) -> i64 {
    r.agent.as_ref().map_or(0, |a| a.zendesk_id)
}

fn ext(r: &proto::RouteCallResponse) -> &str {
    r.agent.as_ref().map_or("", |a| a.extension.as_str())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_routing_rule_end_to_end() {
    let (store, r) = rules_store();
    let sim = start_sim(store, |_| {}).await;
    let dir = tempfile::tempdir().unwrap();
    let service = start_service(&config_text(&sim, dir.path(), &directory())).await;
    wait_loaded(&service).await;
    let mut c = client(service.addr()).await;

    // Formats other than the stored one all reach customer 1.
    for caller in [
        "+380441234567",
        "380441234567",
        "0441234567",
        "+38 (044) 123-45-67",
        "00380441234567",
    ] {
        let a = route(&mut c, caller).await;
        assert_eq!(a.decision(), Decision::RouteToAgent, "{caller}: {a:?}");
        assert_eq!((agent_id(&a), ext(&a)), (r.olena, "101"), "{caller}");
        assert_eq!(a.ticket.as_ref().unwrap().id, r.c1_ticket);
        let cust = a.customer.as_ref().unwrap();
        assert_eq!(
            (cust.zendesk_id, cust.phone.as_str()),
            (r.c1, "+380441234567")
        );
        assert_eq!(cust.url, format!("{}/agent/users/{}", sim.url(), r.c1));
        assert_eq!(
            a.ticket.as_ref().unwrap().url,
            format!("{}/agent/tickets/{}", sim.url(), r.c1_ticket)
        );
    }
    // Second identity; Cyrillic names compared case-insensitively with collapsed spaces.
    let a = route(&mut c, "067 123 45 67").await;
    assert_eq!(
        (a.decision(), agent_id(&a), ext(&a)),
        (Decision::RouteToAgent, r.ivan, "102"),
        "{a:?}"
    );
    assert_eq!(a.customer.as_ref().unwrap().zendesk_id, r.c2);
    // Shared number: the pending ticket of the second user decides; spacing differs in the directory.
    let a = route(&mut c, "+380631111111").await;
    assert_eq!(
        (a.decision(), agent_id(&a), ext(&a)),
        (Decision::RouteToAgent, r.jane, "103"),
        "{a:?}"
    );
    assert_eq!(a.ticket.as_ref().unwrap().id, r.shared_open);
    assert_eq!(a.ticket.as_ref().unwrap().status, "pending");
    // Latest updated wins; ties go to the higher id.
    let a = route(&mut c, "+380661000004").await;
    assert_eq!(
        (a.ticket.as_ref().unwrap().id, agent_id(&a)),
        (r.c4_newest, r.jane)
    );
    let a = route(&mut c, "+380661000005").await;
    assert_eq!(
        (a.ticket.as_ref().unwrap().id, agent_id(&a)),
        (r.c5_high, r.jane)
    );
    // routing.recent_days is 0 (the default): an open ticket is the only basis.
    assert_eq!(a.basis(), Basis::OpenTicket);
    // Unassigned.
    let a = route(&mut c, "+380661000006").await;
    assert_eq!(a.decision(), Decision::DefaultRouting);
    assert_eq!(a.basis(), Basis::Unspecified);
    assert_eq!(a.reason, format!("ticket {} has no assignee", r.c6_ticket));
    assert!(a.agent.is_none());
    // Inactive assignee passed over for the older ticket's active one.
    let a = route(&mut c, "+380661000007").await;
    assert_eq!(
        (a.decision(), a.ticket.as_ref().unwrap().id, agent_id(&a)),
        (Decision::RouteToAgent, r.c7_fallback, r.olena)
    );
    assert_ne!(agent_id(&a), r.inactive_agent);
    // Only a suspended assignee: default routing, and the reason names the ticket.
    let a = route(&mut c, "+380661000008").await;
    assert_eq!(a.decision(), Decision::DefaultRouting, "{a:?}");
    assert!(a.reason.contains(&r.c8_ticket.to_string()), "{}", a.reason);
    assert_ne!(agent_id(&a), r.suspended_agent);
    // Deleted and suspended customers, and unknown numbers.
    for caller in ["+380661000009", "+380661000010", "+380661999999"] {
        let a = route(&mut c, caller).await;
        assert_eq!(
            (a.decision(), a.reason.as_str()),
            (Decision::DefaultRouting, "no customer with this number"),
            "{caller}"
        );
        assert!(a.customer.is_none());
    }
    // Solved, closed and deleted tickets do not count (rule 7 is off).
    let a = route(&mut c, "+380661000011").await;
    assert_eq!(
        (a.decision(), a.reason.as_str(), a.basis()),
        (
            Decision::DefaultRouting,
            "no open ticket",
            Basis::Unspecified
        )
    );
    assert!(a.customer.is_some());
    // Hold counts as open.
    let a = route(&mut c, "+380661000012").await;
    assert_eq!(
        (a.decision(), a.ticket.as_ref().unwrap().id),
        (Decision::RouteToAgent, r.hold_ticket)
    );
    // An owner without an extension: default routing, agent still filled.
    let a = route(&mut c, "+380661000013").await;
    assert_eq!(a.decision(), Decision::DefaultRouting);
    assert_eq!(a.reason, "assignee Petro Unlisted has no PBX extension");
    assert_eq!((agent_id(&a), ext(&a)), (r.petro, ""));
    // The directory holds the name in NFD; Zendesk in NFC.
    let a = route(&mut c, "+380661000014").await;
    assert_eq!(
        (a.decision(), agent_id(&a), ext(&a)),
        (Decision::RouteToAgent, r.zoe, "104"),
        "{a:?}"
    );
    assert!(a.index_age_ms >= 0);

    // Caller ID: name (organization), both links.
    let l = c
        .lookup_caller(LookupCallerRequest {
            number: "044 123 45 67".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(l.found);
    assert_eq!(l.display_name, "Taras Shevchuk (Acme Kyiv)");
    assert_eq!(l.contact_url, format!("{}/agent/users/{}", sim.url(), r.c1));
    assert_eq!(
        l.lead_url,
        format!("{}/agent/tickets/{}", sim.url(), r.c1_ticket)
    );
    let org = l.customer.as_ref().unwrap().organization.as_ref().unwrap();
    assert_eq!(
        (org.zendesk_id, org.url.clone()),
        (
            r.org,
            format!("{}/agent/organizations/{}", sim.url(), r.org)
        )
    );
    // Shared number: the customer with the open ticket.
    let l = c
        .lookup_caller(LookupCallerRequest {
            number: "+380631111111".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(l.display_name, "Office Desk Two");
    // Unassigned only: the lead is still the open ticket.
    let l = c
        .lookup_caller(LookupCallerRequest {
            number: "+380661000006".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        l.lead_url,
        format!("{}/agent/tickets/{}", sim.url(), r.c6_ticket)
    );
    // A customer without open tickets: contact but no lead.
    let l = c
        .lookup_caller(LookupCallerRequest {
            number: "+380661000011".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(l.found && !l.contact_url.is_empty() && l.lead_url.is_empty());
    let l = c
        .lookup_caller(LookupCallerRequest {
            number: "+380661999999".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!l.found && l.contact_url.is_empty() && l.display_name.is_empty());

    service.shutdown().await.unwrap();
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_invalid_argument_naming_the_field() {
    let (store, _) = rules_store();
    let sim = start_sim(store, |_| {}).await;
    let dir = tempfile::tempdir().unwrap();
    let service = start_service(&config_text(&sim, dir.path(), "")).await;
    wait_loaded(&service).await;
    let mut c = client(service.addr()).await;
    for (caller, needle) in [
        ("", "caller: required"),
        ("   ", "caller: required"),
        ("not a number", "caller"),
        ("12", "caller"),
        (&"9".repeat(100), "too long"),
    ] {
        let e = c
            .route_call(RouteCallRequest {
                caller: caller.into(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{caller:?}");
        assert!(e.message().contains(needle), "{caller:?}: {}", e.message());
    }
    let e = c
        .route_call(RouteCallRequest {
            caller: "+380441234567".into(),
            call_id: "x".repeat(200),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().starts_with("call_id"), "{}", e.message());
    let e = c
        .lookup_caller(LookupCallerRequest { number: "".into() })
        .await
        .unwrap_err();
    assert_eq!(
        (e.code(), e.message()),
        (Code::InvalidArgument, "number: required")
    );
    service.shutdown().await.unwrap();
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_required_when_configured() {
    let (store, _) = rules_store();
    let sim = start_sim(store, |_| {}).await;
    let dir = tempfile::tempdir().unwrap();
    let token = "0123456789abcdef-secret";
    let service = start_service(&config_text(
        &sim,
        dir.path(),
        &format!("[server]\ntokens = [\"{token}\"]\n{}", directory()),
    ))
    .await;
    wait_loaded(&service).await;
    let ch = channel(service.addr()).await;
    let req = || RouteCallRequest {
        caller: "+380441234567".into(),
        ..Default::default()
    };

    let mut plain = proto::resolver_client::ResolverClient::new(ch.clone());
    let e = plain.route_call(req()).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    for bad in ["Bearer wrong-token-but-long-enough", "Basic abc", token] {
        let mut r = tonic::Request::new(req());
        r.metadata_mut()
            .insert("authorization", bad.parse().unwrap());
        let e = plain.route_call(r).await.unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated, "{bad}");
        assert!(!e.message().contains(token));
    }
    let mut r = tonic::Request::new(req());
    r.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    assert_eq!(
        plain.route_call(r).await.unwrap().into_inner().decision(),
        Decision::RouteToAgent
    );
    // Health stays reachable for probes.
    let mut h = tonic_health::pb::health_client::HealthClient::new(ch);
    let s = h
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        s.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    service.shutdown().await.unwrap();
    sim.shutdown().await;
}

/// Changes in Zendesk reach the answers after the one-minute rule and a poll.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_in_zendesk_reach_the_answers() {
    let (store, r) = rules_store();
    let sim = start_sim(store, |c| c.one_minute_rule = Duration::from_millis(300)).await;
    let dir = tempfile::tempdir().unwrap();
    let service = start_service(&config_text(
        &sim,
        dir.path(),
        &format!("[index]\npoll_seconds = 1\n{}", directory()),
    ))
    .await;
    wait_loaded(&service).await;
    let c = client(service.addr()).await;
    // Records written within the (shortened) one-minute rule reach the index with the next poll.
    eventually("the account to be visible", DEADLINE, || {
        let mut c = c.clone();
        async move { (agent_id(&route(&mut c, "+380441234567").await) == r.olena).then_some(()) }
    })
    .await;

    // Reassignment.
    sim.with_store(|s| {
        s.update_ticket(
            r.c1_ticket,
            TicketPatch {
                assignee_id: Some(Some(r.jane)),
                ..Default::default()
            },
        )
        .unwrap()
    });
    eventually("the reassignment to reach RouteCall", DEADLINE, || {
        let mut c = c.clone();
        async move { (agent_id(&route(&mut c, "+380441234567").await) == r.jane).then_some(()) }
    })
    .await;
    // Solved.
    sim.with_store(|s| {
        s.update_ticket(
            r.c1_ticket,
            TicketPatch {
                status: Some(Status::Solved),
                ..Default::default()
            },
        )
        .unwrap()
    });
    eventually("the solved ticket to leave the answers", DEADLINE, || {
        let mut c = c.clone();
        async move { (route(&mut c, "+380441234567").await.reason == "no open ticket").then_some(()) }
    })
    .await;
    // A new customer with a new ticket.
    let new_ticket = sim.with_store(|s| {
        let u = user(s, "Brand New", Some("+380972223344"), None);
        s.create_ticket(NewTicket {
            requester_id: u,
            assignee_id: Some(r.olena),
            status: Some(Status::New),
            ..NewTicket::default()
        })
        .unwrap()
    });
    eventually("the new customer to be routed", DEADLINE, || {
        let mut c = c.clone();
        async move {
            let a = route(&mut c, "097 222 33 44").await;
            (a.decision() == Decision::RouteToAgent && a.ticket.map(|t| t.id) == Some(new_ticket))
                .then_some(())
        }
    })
    .await;
    // A deleted customer.
    sim.with_store(|s| {
        s.update_user(
            r.c2,
            UserPatch {
                active: Some(false),
                ..Default::default()
            },
        )
        .unwrap()
    });
    eventually("the deleted customer to disappear", DEADLINE, || {
        let mut c = c.clone();
        async move {
            (route(&mut c, "+380671234567").await.reason == "no customer with this number")
                .then_some(())
        }
    })
    .await;
    // A phone number moved to another user.
    sim.with_store(|s| {
        s.update_user(
            r.c1,
            UserPatch {
                phone: Some(Some("+380990001122".into())),
                ..Default::default()
            },
        )
        .unwrap()
    });
    eventually("the changed phone to reach caller ID", DEADLINE, || {
        let mut c = c.clone();
        async move {
            let old = c
                .lookup_caller(LookupCallerRequest {
                    number: "+380441234567".into(),
                })
                .await
                .unwrap()
                .into_inner();
            let new = c
                .lookup_caller(LookupCallerRequest {
                    number: "+380990001122".into(),
                })
                .await
                .unwrap()
                .into_inner();
            (!old.found && new.found).then_some(())
        }
    })
    .await;
    service.shutdown().await.unwrap();
    sim.shutdown().await;
}

/// A restart serves from the snapshot before, and without, any export call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_serves_from_the_snapshot_without_zendesk() {
    let (store, r) = rules_store();
    let sim = start_sim(store, |_| {}).await;
    let dir = tempfile::tempdir().unwrap();
    let text = config_text(&sim, dir.path(), &directory());
    let service = start_service(&text).await;
    wait_loaded(&service).await;
    let before = route(&mut client(service.addr()).await, "+380441234567").await;
    service.shutdown().await.unwrap();
    assert!(dir.path().join("index.snapshot").exists());

    // Zendesk goes down; the restarted service must still be ready and answer the same.
    sim.set_faults(deskline_sim::Faults {
        down: true,
        ..Default::default()
    });
    sim.clear_requests();
    let service = start_service(&text).await;
    tokio::time::timeout(Duration::from_secs(3), service.wait_loaded())
        .await
        .expect("ready from the snapshot");
    let mut c = client(service.addr()).await;
    let after = route(&mut c, "+380441234567").await;
    assert_eq!(
        (
            after.decision(),
            agent_id(&after),
            after.ticket.as_ref().map(|t| t.id)
        ),
        (before.decision(), r.olena, Some(r.c1_ticket))
    );
    assert!(
        sim.requests().iter().all(|q| q.status >= 500),
        "no export call may have succeeded"
    );
    service.shutdown().await.unwrap();
    sim.shutdown().await;
}

/// Until the index is loaded: health NOT_SERVING and RouteCall UNAVAILABLE; then both recover.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_serving_until_loaded() {
    let (store, _) = rules_store();
    let sim = start_sim(store, |c| c.faults.down = true).await;
    let dir = tempfile::tempdir().unwrap();
    let service = start_service(&config_text(
        &sim,
        dir.path(),
        "[index]\npoll_seconds = 1\n",
    ))
    .await;
    let ch = channel(service.addr()).await;
    let mut h = tonic_health::pb::health_client::HealthClient::new(ch.clone());
    let status = || tonic_health::pb::HealthCheckRequest {
        service: "deskline.v1.Resolver".into(),
    };
    use tonic_health::pb::health_check_response::ServingStatus;
    assert_eq!(
        h.check(status()).await.unwrap().into_inner().status,
        ServingStatus::NotServing as i32
    );
    let e = proto::resolver_client::ResolverClient::new(ch.clone())
        .route_call(RouteCallRequest {
            caller: "+380441234567".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable);
    sim.set_faults(Default::default());
    eventually(
        "health to turn SERVING once Zendesk is back",
        DEADLINE,
        || {
            let mut h = h.clone();
            async move {
                (h.check(status()).await.ok()?.into_inner().status == ServingStatus::Serving as i32)
                    .then_some(())
            }
        },
    )
    .await;
    service.shutdown().await.unwrap();
    sim.shutdown().await;
}

/// Without the identities sideload on the export, second identities still route (show_many).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identities_without_the_export_sideload() {
    let (store, r) = rules_store();
    let sim = start_sim(store, |c| c.export_identities = false).await;
    let dir = tempfile::tempdir().unwrap();
    let service = start_service(&config_text(&sim, dir.path(), &directory())).await;
    wait_loaded(&service).await;
    let c = client(service.addr()).await;
    eventually(
        "the second identity to be fetched through show_many",
        DEADLINE,
        || {
            let mut c = c.clone();
            async move { (agent_id(&route(&mut c, "+380671234567").await) == r.ivan).then_some(()) }
        },
    )
    .await;
    assert!(sim.requests().iter().any(|q| q.path.contains("show_many")));
    service.shutdown().await.unwrap();
    sim.shutdown().await;
}

/// A generated account: for many numbers in several formats, the answer matches an independent
/// reading of DESIGN §3 over the simulator's own data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generated_account_matches_an_independent_oracle() {
    let store = deskline_sim::generate(&deskline_sim::GenConfig {
        users: 3000,
        tickets: 5000,
        agents: 25,
        organizations: 100,
        seed: 42,
    });
    let sim = start_sim(store, |_| {}).await;
    let dir = tempfile::tempdir().unwrap();
    let service = start_service(&config_text(&sim, dir.path(), "")).await;
    wait_loaded(&service).await;
    let mut c = client(service.addr()).await;
    let parser = PhoneParser::new("UA").unwrap();

    // The oracle: E.164 → (active end-users, best assigned open ticket by (updated_at, id)).
    let expected = sim.with_store(|s| {
        let mut by_phone: std::collections::BTreeMap<u64, Vec<i64>> = Default::default();
        for id in s.user_ids().collect::<Vec<_>>() {
            let u = s.user(id).unwrap();
            if !(u.is_end_user() && u.is_active()) {
                continue;
            }
            let mut phones: Vec<String> = u.phone.clone().into_iter().collect();
            phones.extend(
                s.identities(id)
                    .into_iter()
                    .filter(|i| i.is_phone())
                    .filter_map(|i| i.value),
            );
            for p in phones {
                if let Ok(e) = parser.parse(&p) {
                    by_phone.entry(e.digits()).or_default().push(id);
                }
            }
        }
        by_phone
            .into_iter()
            .take(400)
            .map(|(digits, users)| {
                let mut best: Option<(i64, i64, i64)> = None; // (updated_at, ticket id, assignee)
                for u in &users {
                    for t in s.tickets_of_requester(*u) {
                        let t = s.ticket(t).unwrap();
                        let Some(a) = t.assignee_id else { continue };
                        let usable = s.user(a).is_some_and(|a| a.is_agent() && a.is_active());
                        if t.is_open() && usable {
                            let key = (
                                deskline::zendesk::models::parse_time(
                                    t.updated_at.as_deref().unwrap(),
                                )
                                .unwrap(),
                                t.id,
                                a,
                            );
                            best = best.max(Some(key));
                        }
                    }
                }
                (digits, best)
            })
            .collect::<Vec<_>>()
    });
    assert!(
        expected.len() >= 300,
        "the generator should give hundreds of numbers"
    );
    let mut owned = 0;
    for (i, (digits, best)) in expected.iter().enumerate() {
        // Alternate formats: E.164, without plus, and national for UA numbers.
        let e164 = format!("+{digits}");
        let caller = match i % 3 {
            0 => e164.clone(),
            // Digits without the plus are unambiguous only with the default region's country code.
            1 if e164.starts_with("+380") => digits.to_string(),
            _ if e164.starts_with("+380") => format!("0{}", &e164[4..]),
            _ => e164.clone(),
        };
        let a = route(&mut c, &caller).await;
        assert!(a.customer.is_some(), "{caller}: {a:?}");
        match best {
            Some((_, ticket, assignee)) => {
                owned += 1;
                assert_eq!(
                    (a.ticket.as_ref().map(|t| t.id), agent_id(&a)),
                    (Some(*ticket), *assignee),
                    "{caller}: {a:?}"
                );
            }
            None => assert!(
                a.agent.is_none() || a.decision() == Decision::DefaultRouting,
                "{caller}: {a:?}"
            ),
        }
    }
    assert!(
        owned > 50,
        "the generated account should have many owned numbers, had {owned}"
    );
    service.shutdown().await.unwrap();
    sim.shutdown().await;
}

/// A `show_many` answer without the `identities` key (sideload not honoured) says nothing about
/// identities: the phones already known stay, and the identities are read per user instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn show_many_without_the_identities_key_wipes_no_phone() {
    let (store, r) = rules_store();
    let sim = start_sim(store, |_| {}).await;
    let dir = tempfile::tempdir().unwrap();
    let service = start_service(&config_text(
        &sim,
        dir.path(),
        &format!("{}\n[index]\npoll_seconds = 1\n", directory()),
    ))
    .await;
    wait_loaded(&service).await;
    let c = client(service.addr()).await;
    let second_routes = || {
        let mut c = c.clone();
        async move { agent_id(&route(&mut c, "+380671234567").await) == r.ivan }
    };
    assert!(second_routes().await, "known from the export's sideload");

    // From now on neither the export nor show_many sideloads identities; the customer changes, so
    // the export brings the user again and the follower asks show_many for its identities.
    sim.set_config(|c| {
        c.export_identities = false;
        c.show_many = deskline_sim::ShowMany::NoIdentitiesKey;
        c.one_minute_rule = Duration::ZERO;
    });
    sim.clear_requests();
    sim.with_store(|s| {
        s.update_user(
            r.c2,
            deskline_sim::UserPatch {
                name: Some("Renamed".into()),
                ..Default::default()
            },
        )
    })
    .unwrap();
    eventually(
        "show_many answered, then the identities read per user",
        DEADLINE,
        || {
            let reqs = sim.requests();
            let show_many = reqs.iter().any(|q| q.path.contains("show_many"));
            let per_user = reqs.iter().any(|q| q.path.contains("/identities"));
            async move { (show_many && per_user).then_some(()) }
        },
    )
    .await;
    assert!(second_routes().await, "the second identity was wiped");
    service.shutdown().await.unwrap();
    sim.shutdown().await;
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// DESIGN §3 rule 7 end to end, `routing.recent_days = 14`: a customer whose only ticket is solved
/// routes to its assignee (RECENT_TICKET); a call reported through ReportCall routes the next call
/// from a number with no tickets to the employee who took it (LAST_CALL) at once; an open ticket
/// still wins; a ticket solved in Zendesk counts once the export brings it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sticky_routing_end_to_end() {
    let now = unix_now();
    let day = 86_400;
    let mut s = store_with_owner();
    let olena = user(&mut s, "Olena Petrenko", None, Some(Role::Agent));
    let ivan = user(&mut s, "Іван Коваленко", None, Some(Role::Admin));
    let jane = user(&mut s, "Jane Doe", None, Some(Role::Agent));
    let solved_only = user(&mut s, "Solved Only", Some("+380662000001"), None);
    let solved = ticket(
        &mut s,
        solved_only,
        Some(olena),
        Status::Solved,
        now - 2 * day,
    );
    let no_tickets = user(&mut s, "No Tickets", Some("+380662000002"), None);
    let both = user(&mut s, "Open And Solved", Some("+380662000003"), None);
    let open = ticket(&mut s, both, Some(olena), Status::Open, now - 10 * day);
    ticket(&mut s, both, Some(jane), Status::Solved, now - day);
    let old = user(&mut s, "Long Ago", Some("+380662000004"), None);
    let old_ticket = ticket(&mut s, old, Some(olena), Status::Solved, now - 30 * day);
    let later = user(&mut s, "Solved Later", Some("+380662000005"), None);
    let later_ticket = ticket(&mut s, later, Some(jane), Status::Open, now - day);

    let sim = start_sim(s, |c| c.one_minute_rule = Duration::from_millis(300)).await;
    let dir = tempfile::tempdir().unwrap();
    // sync.create without "ticket": the sync of the reported call must not open a ticket, which
    // would route the next call by rule 4 and hide what this test is about.
    let extra = format!(
        "[index]\npoll_seconds = 1\n[sync]\ncreate = [\"user\"]\n[routing]\nrecent_days = 14\n{}",
        directory()
    );
    let service = start_service(&config_text(&sim, dir.path(), &extra)).await;
    wait_loaded(&service).await;
    let mut c = client(service.addr()).await;
    // Records written within the (shortened) one-minute rule reach the index with the next poll.
    eventually("the account to be visible", DEADLINE, || {
        let mut c = c.clone();
        async move {
            let (a, b) = (
                route(&mut c, "+380662000001").await,
                route(&mut c, "+380662000005").await,
            );
            (a.decision() == Decision::RouteToAgent && b.decision() == Decision::RouteToAgent)
                .then_some(())
        }
    })
    .await;

    // The only ticket is solved: its assignee, basis RECENT_TICKET.
    let a = route(&mut c, "066 200 00 01").await;
    assert_eq!(
        (a.decision(), a.basis(), agent_id(&a), ext(&a)),
        (Decision::RouteToAgent, Basis::RecentTicket, olena, "101"),
        "{a:?}"
    );
    assert_eq!(
        a.reason,
        format!("recent ticket {solved} (solved) of Olena Petrenko")
    );
    let t = a.ticket.as_ref().unwrap();
    assert_eq!((t.id, t.status.as_str()), (solved, "solved"));
    assert_eq!(a.customer.as_ref().unwrap().zendesk_id, solved_only);

    // An open ticket wins over a later solved one.
    let a = route(&mut c, "+380662000003").await;
    assert_eq!(
        (a.basis(), agent_id(&a), a.ticket.as_ref().unwrap().id),
        (Basis::OpenTicket, olena, open),
        "{a:?}"
    );

    // Solved 30 days ago: outside the window, and the reason says so.
    let a = route(&mut c, "+380662000004").await;
    assert_eq!(
        (a.decision(), a.basis()),
        (Decision::DefaultRouting, Basis::Unspecified)
    );
    assert!(
        a.reason.contains(&format!(
            "recent ticket {old_ticket} (solved) was updated 30 days ago, outside the 14-day window"
        )),
        "{}",
        a.reason
    );

    // No tickets: default routing until a call is reported, LAST_CALL right after.
    let a = route(&mut c, "+380662000002").await;
    assert_eq!(
        (a.decision(), a.reason.as_str()),
        (
            Decision::DefaultRouting,
            "no open ticket; no solved or closed ticket within 14 days; no reported call within 14 days"
        )
    );
    let reported = c
        .report_call(ReportCallRequest {
            call_id: "sticky-1".into(),
            direction: proto::Direction::Incoming as i32,
            outcome: proto::Outcome::Answered as i32,
            client_number: "066 200 00 02".into(),
            started_at: Some(prost_types::Timestamp {
                seconds: now - 600,
                nanos: 0,
            }),
            duration_seconds: 42,
            employee_name: "іван коваленко".into(),
            employee_extension: "102".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!reported.duplicate);
    // No waiting: the report is in the index once ReportCall has answered.
    let a = route(&mut c, "+380662000002").await;
    assert_eq!(
        (a.decision(), a.basis(), agent_id(&a), ext(&a)),
        (Decision::RouteToAgent, Basis::LastCall, ivan, "102"),
        "{a:?}"
    );
    assert!(
        a.reason
            .starts_with("last call (today) taken by Іван Коваленко"),
        "{}",
        a.reason
    );
    assert!(a.ticket.is_none());
    assert_eq!(a.customer.as_ref().unwrap().zendesk_id, no_tickets);

    // A number no customer has yet: nothing to remember at once; the sync creates the customer
    // and records the call for them then.
    let fresh = "+380662000009";
    assert_eq!(
        route(&mut c, fresh).await.reason,
        "no customer with this number"
    );
    c.report_call(ReportCallRequest {
        call_id: "sticky-2".into(),
        direction: proto::Direction::Incoming as i32,
        outcome: proto::Outcome::Answered as i32,
        client_number: fresh.into(),
        started_at: Some(prost_types::Timestamp {
            seconds: now - 300,
            nanos: 0,
        }),
        employee_name: "Jane Doe".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let a = eventually(
        "the synced customer to route by LAST_CALL",
        DEADLINE,
        || {
            let mut c = c.clone();
            async move {
                let a = route(&mut c, fresh).await;
                (a.basis() == Basis::LastCall).then_some(a)
            }
        },
    )
    .await;
    assert_eq!((agent_id(&a), ext(&a)), (jane, "103"), "{a:?}");

    // Solved in Zendesk: the export brings it, and the customer is routed to the assignee.
    let a = route(&mut c, "+380662000005").await;
    assert_eq!(a.basis(), Basis::OpenTicket);
    sim.with_store(|s| {
        s.update_ticket(
            later_ticket,
            TicketPatch {
                status: Some(Status::Solved),
                ..Default::default()
            },
        )
        .unwrap()
    });
    let a = eventually(
        "the solved ticket to route by RECENT_TICKET",
        DEADLINE,
        || {
            let mut c = c.clone();
            async move {
                let a = route(&mut c, "+380662000005").await;
                (a.basis() == Basis::RecentTicket).then_some(a)
            }
        },
    )
    .await;
    assert_eq!((agent_id(&a), ext(&a)), (jane, "103"), "{a:?}");
    assert_eq!(a.ticket.as_ref().unwrap().id, later_ticket);
}
