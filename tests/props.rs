//! Property tests over hostile input (issue 6 §3): phone parsing over arbitrary strings, and every
//! field of RouteCall, LookupCaller, ReportCall and GetCallStatus with arbitrary Unicode and
//! lengths, sent through a real server over loopback. The only acceptable answers are OK (or
//! NOT_FOUND for an unknown call) and INVALID_ARGUMENT whose message starts with the field's name;
//! a panic in a handler would surface as UNKNOWN/INTERNAL or a reset connection and fail the case.
//!
//! Case counts are modest (proptest's `cases`) so the suite stays fast on a loaded CI machine.

mod common;

use std::{collections::HashMap, net::SocketAddr, sync::OnceLock};

use common::*;
use deskline::{
    phone::{E164, PhoneParser},
    proto::{
        GetCallStatusRequest, LookupCallerRequest, ReportCallRequest, RouteCallRequest,
        resolver_client::ResolverClient,
    },
};
use deskline_sim::NewUser;
use proptest::prelude::*;
use tonic::{Code, transport::Channel};

/// One simulator and one service for the whole file, on a runtime of their own; each case sends
/// its requests from that runtime too.
struct Server {
    rt: tokio::runtime::Runtime,
    addr: SocketAddr,
    client: ResolverClient<Channel>,
}

fn server() -> &'static Server {
    static SERVER: OnceLock<Server> = OnceLock::new();
    SERVER.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let (addr, client) = rt.block_on(async {
            let mut s = store_with_owner();
            s.create_user(NewUser {
                name: "Зоя Ångström 👩‍💼".into(),
                phone: Some("+380441234567".into()),
                ..NewUser::default()
            })
            .unwrap();
            let sim = start_sim(s, |_| {}).await;
            // Kept for the life of the test binary: the service needs it to stay up.
            let dir = Box::leak(Box::new(tempfile::tempdir().unwrap()));
            let service = start_service(&config_text(&sim, dir.path(), "")).await;
            wait_loaded(&service).await;
            let addr = service.addr();
            std::mem::forget(service);
            std::mem::forget(sim);
            (addr, client(addr).await)
        });
        Server { rt, addr, client }
    })
}

/// Arbitrary strings: any Unicode, biased towards the shapes that reach deep into the parsers.
fn text(max: usize) -> impl Strategy<Value = String> {
    prop_oneof![
        proptest::string::string_regex(&format!(".{{0,{max}}}")).unwrap(),
        proptest::string::string_regex(&format!("[+0-9 ()\\-.]{{0,{}}}", max.min(40))).unwrap(),
        proptest::string::string_regex("\\PC{0,300}").unwrap(),
        Just(String::new()),
        (0usize..5000).prop_map(|n| "9".repeat(n)),
    ]
}

fn assert_ok_or_invalid<T: std::fmt::Debug>(
    r: Result<T, tonic::Status>,
    fields: &[&str],
    also_ok: &[Code],
) {
    if let Err(s) = r {
        if also_ok.contains(&s.code()) {
            return;
        }
        assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
        assert!(
            fields
                .iter()
                .any(|f| s.message().starts_with(&format!("{f}:"))),
            "message names no field of {fields:?}: {:?}",
            s.message()
        );
    }
}

const REPORT_FIELDS: &[&str] = &[
    "call_id",
    "direction",
    "outcome",
    "client_number",
    "line_number",
    "started_at",
    "recording_url",
    "employee_name",
    "employee_extension",
    "scheme_name",
    "client_name",
    "utm",
    "extra",
    "duration_seconds",
    "wait_seconds",
];

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// No input panics the parser; a parsed number prints and re-parses to itself; where the
    /// canonical fast path yields a candidate and the full parse succeeds, they agree.
    #[test]
    fn phone_parsing_never_panics_and_agrees_with_the_fast_path(raw in text(80), region in prop::sample::select(vec!["UA", "US", "GB", "DE", "PL"])) {
        let p = PhoneParser::new(region).unwrap();
        let parsed = p.parse(&raw);
        let candidate = E164::candidate(&raw);
        if let Ok(e) = parsed {
            prop_assert_eq!(p.parse(&e.to_string()).ok(), Some(e));
            if let Some(c) = candidate {
                prop_assert_eq!(c, e, "candidate vs parse of {:?}", raw);
            }
        }
    }

    /// International numbers written with separators: the fast path and the full parse agree.
    #[test]
    fn canonical_numbers_with_separators(cc in prop::sample::select(vec!["380", "1", "44", "49", "48"]), rest in "[1-9][0-9]{8,9}", seps in proptest::collection::vec(prop::sample::select(vec![" ", "-", ".", "(", ")", ""]), 12)) {
        let digits = format!("{cc}{rest}");
        let mut raw = String::from("+");
        for (i, ch) in digits.chars().enumerate() {
            raw.push(ch);
            raw.push_str(seps[i % seps.len()]);
        }
        let p = PhoneParser::new("UA").unwrap();
        if let Ok(e) = p.parse(&raw) {
            prop_assert_eq!(E164::candidate(&raw), Some(e), "{}", raw);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn route_call_fields(caller in text(100), called in text(100), call_id in text(200)) {
        let s = server();
        let r = s.rt.block_on(s.client.clone().route_call(RouteCallRequest { caller, called, call_id }));
        assert_ok_or_invalid(r, &["caller", "called", "call_id"], &[]);
    }

    #[test]
    fn lookup_caller_field(number in text(100)) {
        let s = server();
        let r = s.rt.block_on(s.client.clone().lookup_caller(LookupCallerRequest { number }));
        assert_ok_or_invalid(r, &["number"], &[]);
    }

    #[test]
    fn get_call_status_field(call_id in text(200)) {
        let s = server();
        let r = s.rt.block_on(s.client.clone().get_call_status(GetCallStatusRequest { call_id }));
        assert_ok_or_invalid(r, &["call_id"], &[Code::NotFound]);
    }

    #[test]
    fn report_call_fields(
        call_id in text(150),
        direction in -2i32..6,
        outcome in -2i32..8,
        client_number in prop_oneof![text(80), Just("+380441234567".to_owned())],
        line_number in text(80),
        recording_url in prop_oneof![text(300), Just("https://pbx.example/r.mp3".to_owned()), Just("javascript:alert(1)".to_owned()), Just("ftp://pbx.example/r.mp3".to_owned())],
        employee_name in text(300),
        employee_extension in text(40),
        scheme_name in text(300),
        client_name in text(300),
        seconds in (any::<i64>(), any::<i32>()),
        durations in (any::<u32>(), any::<u32>()),
        utm in proptest::collection::hash_map(prop_oneof![Just("utm_source".to_owned()), text(20)], text(300), 0..4),
        extra in proptest::collection::hash_map(text(80), text(600), 0..4),
    ) {
        let req = ReportCallRequest {
            call_id,
            direction,
            outcome,
            client_number,
            line_number,
            started_at: Some(prost_types::Timestamp { seconds: seconds.0, nanos: seconds.1 }),
            duration_seconds: durations.0 as _,
            wait_seconds: durations.1 as _,
            recording_url,
            employee_name,
            employee_extension,
            scheme_name,
            client_name,
            utm: utm.into_iter().collect::<HashMap<_, _>>(),
            extra: extra.into_iter().collect::<HashMap<_, _>>(),
        };
        let s = server();
        let r = s.rt.block_on(s.client.clone().report_call(req));
        assert_ok_or_invalid(r, REPORT_FIELDS, &[]);
    }
}

/// A message above the server's limit is refused whole (tonic answers OUT_OF_RANGE, before any handler),
/// and the server answers the next request normally.
#[test]
fn oversized_messages_are_refused_and_the_server_lives_on() {
    let s = server();
    s.rt.block_on(async {
        let mut c = s.client.clone();
        let big = "x".repeat(deskline::grpc::MAX_MESSAGE_BYTES + 1);
        let e = c
            .route_call(RouteCallRequest {
                caller: big.clone(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::OutOfRange, "{e:?}");
        let mut extra = HashMap::new();
        extra.insert("k".to_owned(), big);
        let e = c
            .report_call(ReportCallRequest {
                call_id: "big-1".into(),
                extra,
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::OutOfRange, "{e:?}");
        // Just under the limit: decoded, then refused by field validation naming the field.
        let e = c
            .route_call(RouteCallRequest {
                caller: "1".repeat(deskline::grpc::MAX_MESSAGE_BYTES - 64),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
        assert!(e.message().starts_with("caller:"), "{e:?}");
        // Still serving, and on a fresh connection too.
        let ok = client(s.addr)
            .await
            .route_call(RouteCallRequest {
                caller: "+380441234567".into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            ok.customer.map(|c| c.name),
            Some("Зоя Ångström 👩‍💼".to_owned())
        );
    });
}
