//! HTTP tests of the simulator over 127.0.0.1 with reqwest.

use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use super::*;

async fn sim(cfg: SimConfig, g: GenConfig) -> SimHandle {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    start(listener, cfg, generate(&g)).await
}

fn small() -> GenConfig {
    GenConfig {
        users: 300,
        tickets: 400,
        agents: 8,
        organizations: 30,
        seed: 3,
    }
}

struct Resp {
    status: StatusCode,
    headers: reqwest::header::HeaderMap,
    text: String,
}

impl Resp {
    fn json(&self) -> Value {
        serde_json::from_str(&self.text).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text))
    }
    fn header(&self, k: &str) -> Option<&str> {
        self.headers.get(k).and_then(|v| v.to_str().ok())
    }
}

async fn call(
    h: &SimHandle,
    method: Method,
    path: &str,
    body: Option<Value>,
    extra: &[(&str, &str)],
) -> Resp {
    let c = reqwest::Client::new();
    let mut rb = c
        .request(method, format!("{}{path}", h.url()))
        .basic_auth(format!("{}/token", h.email()), Some(h.token()));
    for (k, v) in extra {
        rb = rb.header(*k, *v);
    }
    if let Some(b) = body {
        rb = rb.json(&b);
    }
    let r = rb.send().await.unwrap();
    let status = r.status();
    let headers = r.headers().clone();
    Resp {
        status,
        headers,
        text: r.text().await.unwrap(),
    }
}

async fn get(h: &SimHandle, path: &str) -> Resp {
    call(h, Method::GET, path, None, &[]).await
}

fn now_secs() -> i64 {
    store::now_ms() / 1000
}

/// Follows a cursor export to its end; returns the ids seen and the final cursor.
async fn drain(h: &SimHandle, first: &str, key: &str) -> (Vec<i64>, String) {
    let mut path = first.to_string();
    let mut ids = Vec::new();
    for _ in 0..1000 {
        let r = get(h, &path).await;
        assert_eq!(r.status, 200, "{}", r.text);
        let v = r.json();
        ids.extend(
            v[key]
                .as_array()
                .unwrap()
                .iter()
                .map(|u| u["id"].as_i64().unwrap()),
        );
        let cursor = v["after_cursor"].as_str().unwrap().to_string();
        assert!(v["after_url"].as_str().unwrap().contains(&cursor));
        if v["end_of_stream"] == true {
            return (ids, cursor);
        }
        path = format!("/api/v2/incremental/{key}/cursor.json?cursor={cursor}&per_page=70");
    }
    panic!("export never ended");
}

fn unlimited() -> SimConfig {
    SimConfig {
        export_requests_per_minute: 10_000,
        requests_per_minute: 100_000,
        ..SimConfig::default()
    }
}

#[tokio::test]
async fn auth() {
    let h = sim(
        SimConfig {
            oauth_token: Some("oauth-1".into()),
            ..SimConfig::default()
        },
        small(),
    )
    .await;
    let c = reqwest::Client::new();
    let url = format!("{}/api/v2/users/me.json", h.url());
    let r = c.get(&url).send().await.unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(
        r.headers()["www-authenticate"],
        "Basic realm=\"Web Password\""
    );
    assert_eq!(
        r.json::<Value>().await.unwrap(),
        json!({"error":"Couldn't authenticate you"})
    );
    let r = c
        .get(&url)
        .basic_auth("admin@deskline.test/token", Some("wrong"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = c
        .get(&url)
        .basic_auth("nobody@x.test/token", Some("sim-token"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = c.get(&url).bearer_auth("bad").send().await.unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(r.json::<Value>().await.unwrap()["error"], "invalid_token");
    let r = c.get(&url).bearer_auth("oauth-1").send().await.unwrap();
    assert_eq!(r.status(), 200);
    let me = get(&h, "/api/v2/users/me").await;
    assert_eq!(me.status, 200);
    assert_eq!(me.json()["user"]["email"], "admin@deskline.test");
    assert_eq!(me.json()["user"]["role"], "admin");
    assert!(me.header("x-rate-limit").is_some() && me.header("x-rate-limit-remaining").is_some());
    // Any active agent's email works with the account token.
    let agent = h.with_store(|s| {
        s.find_users(1, |u, _| {
            u.role.as_deref() == Some("agent") && u.is_active()
        })[0]
            .0
            .email
            .clone()
            .unwrap()
    });
    let r = c
        .get(&url)
        .basic_auth(format!("{agent}/token"), Some("sim-token"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.json::<Value>().await.unwrap()["user"]["email"],
        agent.as_str()
    );
    h.shutdown().await;
}

#[tokio::test]
async fn users_cursor_export_pages_to_the_end_and_resumes() {
    let h = sim(unlimited(), small()).await;
    let (ids, cursor) = drain(
        &h,
        "/api/v2/incremental/users/cursor?start_time=0&per_page=70",
        "users",
    )
    .await;
    let total = h.with_store(|s| s.user_count());
    let mut uniq = ids.clone();
    uniq.sort();
    uniq.dedup();
    assert_eq!((ids.len(), uniq.len()), (total, total));

    // Shape: every field, nulls included; deleted users as recorded.
    let page = get(
        &h,
        "/api/v2/incremental/users/cursor.json?start_time=0&per_page=1000",
    )
    .await
    .json();
    let users = page["users"].as_array().unwrap();
    for k in [
        "url",
        "name",
        "email",
        "phone",
        "shared_phone_number",
        "role",
        "organization_id",
        "external_id",
        "active",
        "suspended",
        "user_fields",
        "time_zone",
        "locale",
        "tags",
        "verified",
    ] {
        assert!(users.iter().all(|u| u.get(k).is_some()), "missing {k}");
    }
    assert_eq!(page["before_cursor"], Value::Null);
    let deleted: Vec<&Value> = users.iter().filter(|u| u["active"] == false).collect();
    assert!(!deleted.is_empty());
    assert!(
        deleted
            .iter()
            .all(|u| u["permanently_deleted"] == false && u["email"].is_null())
    );
    assert!(
        users
            .iter()
            .filter(|u| u["active"] == true)
            .all(|u| u.get("permanently_deleted").is_none())
    );
    // Ordered by change time.
    let times: Vec<&str> = users
        .iter()
        .map(|u| u["updated_at"].as_str().unwrap())
        .collect();
    assert!(times.windows(2).all(|w| w[0] <= w[1]));

    // A change now is hidden by the one-minute rule, then shows up on resume.
    let id = h
        .with_store(|s| {
            s.create_user(NewUser {
                name: "Нова Людина".into(),
                phone: Some("+380501112233".into()),
                ..Default::default()
            })
        })
        .unwrap();
    let r = get(
        &h,
        &format!("/api/v2/incremental/users/cursor?cursor={cursor}"),
    )
    .await
    .json();
    assert_eq!(r["users"].as_array().unwrap().len(), 0);
    assert_eq!(r["end_of_stream"], true);
    assert_eq!(r["after_cursor"], cursor.as_str());
    h.set_config(|c| c.one_minute_rule = Duration::ZERO);
    let r = get(
        &h,
        &format!("/api/v2/incremental/users/cursor?cursor={cursor}"),
    )
    .await
    .json();
    let got: Vec<i64> = r["users"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["id"].as_i64().unwrap())
        .collect();
    assert_eq!(got, vec![id]);
    // An update moves the user past the new cursor, once.
    let c2 = r["after_cursor"].as_str().unwrap().to_string();
    h.with_store(|s| {
        s.update_user(
            id,
            UserPatch {
                name: Some("Renamed".into()),
                ..Default::default()
            },
        )
    })
    .unwrap();
    let r = get(&h, &format!("/api/v2/incremental/users/cursor?cursor={c2}"))
        .await
        .json();
    assert_eq!(r["users"][0]["name"], "Renamed");
    assert_eq!(r["users"].as_array().unwrap().len(), 1);
    let bad = get(&h, "/api/v2/incremental/users/cursor?cursor=garbage!").await;
    assert_eq!(bad.status, 400);
    h.shutdown().await;
}

#[tokio::test]
async fn too_recent_start_time_is_refused() {
    let h = sim(unlimited(), small()).await;
    let r = get(
        &h,
        &format!(
            "/api/v2/incremental/users/cursor.json?start_time={}",
            now_secs() - 10
        ),
    )
    .await;
    assert_eq!(r.status, 422);
    assert_eq!(
        r.json(),
        json!({"error":"InvalidValue","description":"Too recent start_time. Use a start_time at least one minute in the past"})
    );
    let r = get(
        &h,
        &format!(
            "/api/v2/incremental/tickets/cursor.json?start_time={}",
            now_secs() - 120
        ),
    )
    .await;
    assert_eq!(r.status, 200);
    let r = get(&h, "/api/v2/incremental/users/cursor.json").await;
    assert_eq!(r.status, 422);
    h.shutdown().await;
}

#[tokio::test]
async fn identities_sideload_on_and_off() {
    let h = sim(unlimited(), small()).await;
    let with = get(
        &h,
        "/api/v2/incremental/users/cursor?start_time=0&include=identities",
    )
    .await
    .json();
    let ids = with["identities"].as_array().unwrap();
    let page_users: Vec<i64> = with["users"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["id"].as_i64().unwrap())
        .collect();
    assert!(
        ids.iter()
            .all(|i| page_users.contains(&i["user_id"].as_i64().unwrap()))
    );
    // Second mobiles exist only as identities.
    assert!(
        ids.iter()
            .any(|i| i["type"] == "phone_number" && i["primary"] == false)
    );
    let without = get(&h, "/api/v2/incremental/users/cursor?start_time=0")
        .await
        .json();
    assert!(without.get("identities").is_none());
    h.set_config(|c| c.export_identities = false);
    let off = get(
        &h,
        "/api/v2/incremental/users/cursor?start_time=0&include=identities",
    )
    .await
    .json();
    assert!(off.get("identities").is_none());
    // show_many always sideloads.
    let some: Vec<String> = page_users.iter().take(100).map(|i| i.to_string()).collect();
    let r = get(
        &h,
        &format!(
            "/api/v2/users/show_many.json?ids={}&include=identities",
            some.join(",")
        ),
    )
    .await
    .json();
    assert_eq!(r["users"].as_array().unwrap().len(), 100);
    assert!(!r["identities"].as_array().unwrap().is_empty());
    let too_many: Vec<String> = (0..101).map(|i| i.to_string()).collect();
    let r = get(
        &h,
        &format!("/api/v2/users/show_many?ids={}", too_many.join(",")),
    )
    .await;
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"], "TooManyValues");
    h.shutdown().await;
}

#[tokio::test]
async fn tickets_export_and_deleted() {
    let h = sim(unlimited(), small()).await;
    let (all, _) = drain(
        &h,
        "/api/v2/incremental/tickets/cursor?start_time=0&per_page=70",
        "tickets",
    )
    .await;
    assert_eq!(all.len(), 400);
    let page = get(&h, "/api/v2/incremental/tickets/cursor?start_time=0")
        .await
        .json();
    let t = &page["tickets"].as_array().unwrap();
    assert!(t.iter().any(|t| t["status"] == "deleted"));
    for k in [
        "generated_timestamp",
        "custom_fields",
        "fields",
        "via",
        "assignee_id",
        "requester_id",
        "organization_id",
        "description",
        "tags",
    ] {
        assert!(t.iter().all(|x| x.get(k).is_some()), "missing {k}");
    }
    let gts: Vec<i64> = t
        .iter()
        .map(|x| x["generated_timestamp"].as_i64().unwrap())
        .collect();
    assert!(gts.windows(2).all(|w| w[0] <= w[1]));
    let excl = get(
        &h,
        "/api/v2/incremental/tickets/cursor?start_time=0&exclude_deleted=true",
    )
    .await
    .json();
    assert!(
        excl["tickets"]
            .as_array()
            .unwrap()
            .iter()
            .all(|t| t["status"] != "deleted")
    );
    h.shutdown().await;
}

#[tokio::test]
async fn organizations_export_never_splits_a_second() {
    let mut s = Store::new();
    let t0 = now_secs() - 3600;
    for (i, sec) in [0, 0, 0, 1, 1, 2, 2, 2].iter().enumerate() {
        s.push_org(store::OrgRec {
            id: 0,
            name: format!("Org {i}").into(),
            external_id: None,
            created_at: t0 + sec,
            updated_at: t0 + sec,
            deleted_at: None,
            fields: Vec::new(),
            log_pos: 0,
        });
    }
    s.seal();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let h = start(listener, unlimited(), s).await;
    let page = |st: i64, n: usize| {
        let h = &h;
        async move {
            get(
                h,
                &format!("/api/v2/incremental/organizations.json?start_time={st}&per_page={n}"),
            )
            .await
            .json()
        }
    };
    let p = page(t0, 4).await;
    assert_eq!(
        (
            p["count"].as_i64(),
            p["end_time"].as_i64(),
            p["end_of_stream"].as_bool()
        ),
        (Some(5), Some(t0 + 1), Some(false))
    );
    assert!(
        p["next_page"]
            .as_str()
            .unwrap()
            .ends_with(&format!("start_time={}", t0 + 1))
    );
    let p = page(t0 + 1, 4).await;
    assert_eq!(
        (p["count"].as_i64(), p["end_time"].as_i64()),
        (Some(5), Some(t0 + 2))
    );
    let p = page(t0 + 2, 4).await;
    assert_eq!(
        (
            p["count"].as_i64(),
            p["end_time"].as_i64(),
            p["end_of_stream"].as_bool()
        ),
        (Some(3), Some(t0 + 2), Some(true))
    );
    // A full page of one second moves on to the next second, so clients can't loop.
    let p = page(t0, 2).await;
    assert_eq!(
        (p["count"].as_i64(), p["end_time"].as_i64()),
        (Some(3), Some(t0 + 1))
    );
    let p = page(t0 + 3, 2).await;
    assert_eq!(
        (
            p["count"].as_i64(),
            p["end_of_stream"].as_bool(),
            p["end_time"].as_i64()
        ),
        (Some(0), Some(true), Some(t0 + 3))
    );
    assert!(p["organizations"].is_array());
    let r = get(
        &h,
        &format!(
            "/api/v2/incremental/organizations?start_time={}",
            now_secs()
        ),
    )
    .await;
    assert_eq!(r.status, 422);
    h.shutdown().await;
}

#[tokio::test]
async fn account_rate_limit_is_plain_text_and_recovers() {
    let cfg = SimConfig {
        requests_per_minute: 3,
        // Long enough that three requests fit in it on a loaded machine, short enough to wait out.
        rate_window: Duration::from_secs(2),
        ..SimConfig::default()
    };
    let h = sim(cfg, small()).await;
    for i in 0..3 {
        let r = get(&h, "/api/v2/users/me").await;
        assert_eq!(r.status, 200);
        assert_eq!(
            r.header("x-rate-limit-remaining"),
            Some((2 - i).to_string().as_str())
        );
    }
    let r = get(&h, "/api/v2/users/me").await;
    assert_eq!(r.status, 429);
    assert_eq!(r.text, "Number of allowed API requests per minute exceeded");
    assert!(r.header("content-type").unwrap().starts_with("text/plain"));
    let secs: u64 = r.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=2).contains(&secs), "retry-after {secs}");
    // Refused requests don't count (this loop keeps getting 429s without pushing the window
    // out): once the window passes, requests are served again.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        if get(&h, "/api/v2/users/me").await.status == 200 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "limit never recovered"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    h.shutdown().await;
}

/// `rate_limit_next`: exactly the next requests get the account limit's 429 with the given
/// Retry-After, recorded as such and not counted in the window; then requests are served again.
#[tokio::test]
async fn forced_429_answers_the_next_requests_only() {
    let cfg = SimConfig {
        requests_per_minute: 5,
        ..SimConfig::default()
    };
    let h = sim(cfg, small()).await;
    h.rate_limit_next(2, Duration::from_millis(3500));
    for _ in 0..2 {
        let r = get(&h, "/api/v2/users/me").await;
        assert_eq!(r.status, 429);
        assert_eq!(r.text, "Number of allowed API requests per minute exceeded");
        assert_eq!(r.header("retry-after"), Some("4"));
    }
    for i in 0..5 {
        let r = get(&h, "/api/v2/users/me").await;
        assert_eq!(r.status, 200, "request {i} after the forced 429s");
    }
    let faults: Vec<_> = h.requests().iter().map(|r| (r.status, r.fault)).collect();
    assert_eq!(&faults[..2], &[(429, Some("rate_limit")); 2]);
    assert!(faults[2..].iter().all(|&f| f == (200, None)), "{faults:?}");
    h.shutdown().await;
}

#[tokio::test]
async fn export_rate_limit_is_json() {
    let cfg = SimConfig {
        export_requests_per_minute: 2,
        ..SimConfig::default()
    };
    let h = sim(cfg, small()).await;
    for _ in 0..2 {
        assert_eq!(
            get(&h, "/api/v2/incremental/users/cursor?start_time=0")
                .await
                .status,
            200
        );
    }
    let r = get(&h, "/api/v2/incremental/tickets/cursor?start_time=0").await;
    assert_eq!(r.status, 429);
    assert_eq!(r.json()["error"], "APIRateLimitExceeded");
    let secs: u64 = r.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=60).contains(&secs));
    // Other endpoints still work.
    assert_eq!(get(&h, "/api/v2/users/me").await.status, 200);
    h.shutdown().await;
}

/// A seeded fault stream gives the same faults in the same order on every run, so a test that
/// needs faults to happen does not depend on luck.
#[tokio::test]
async fn seeded_faults_repeat() {
    let h = sim(SimConfig::default(), small()).await;
    let mut runs = Vec::new();
    for _ in 0..2 {
        h.set_faults(Faults {
            error_rate: 0.3,
            seed: Some(42),
            ..Faults::default()
        });
        let mut statuses = Vec::new();
        for _ in 0..40 {
            statuses.push(get(&h, "/api/v2/users/me").await.status.as_u16());
        }
        runs.push(statuses);
    }
    assert_eq!(runs[0], runs[1]);
    let errors = runs[0].iter().filter(|s| **s >= 500).count();
    assert!((1..40).contains(&errors), "{:?}", runs[0]);
    h.shutdown().await;
}

#[tokio::test]
async fn faults() {
    let h = sim(SimConfig::default(), small()).await;
    h.set_faults(Faults {
        down: true,
        ..Faults::default()
    });
    assert_eq!(get(&h, "/api/v2/users/me").await.status, 503);
    h.set_faults(Faults {
        error_rate: 1.0,
        ..Faults::default()
    });
    let mut kinds = std::collections::HashSet::new();
    for _ in 0..30 {
        let r = get(&h, "/api/v2/users/me").await;
        assert!([500, 502, 503].contains(&r.status.as_u16()));
        kinds.insert(r.header("content-type").unwrap().starts_with("text/html"));
    }
    assert_eq!(kinds.len(), 2, "both HTML and JSON error bodies");
    h.set_faults(Faults {
        drop_rate: 1.0,
        ..Faults::default()
    });
    let res = reqwest::Client::new()
        .get(format!(
            "{}/api/v2/incremental/users/cursor?start_time=0",
            h.url()
        ))
        .basic_auth("admin@deskline.test/token", Some("sim-token"))
        .send()
        .await;
    let failed = match res {
        Err(_) => true,
        Ok(r) => r.bytes().await.is_err(),
    };
    assert!(failed, "a dropped response must not read cleanly");
    h.set_faults(Faults {
        malformed_rate: 1.0,
        ..Faults::default()
    });
    let r = get(&h, "/api/v2/users/me").await;
    assert_eq!(r.status, 200);
    assert!(serde_json::from_str::<Value>(&r.text).is_err());
    h.set_faults(Faults {
        latency_ms: 150,
        ..Faults::default()
    });
    let t = std::time::Instant::now();
    assert_eq!(get(&h, "/api/v2/users/me").await.status, 200);
    assert!(t.elapsed() >= Duration::from_millis(150));
    // Steering through the admin endpoint.
    let c = reqwest::Client::new();
    let r = c
        .put(format!("{}/__sim/faults", h.url()))
        .json(&json!({"down": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(get(&h, "/api/v2/users/me").await.status, 503);
    let stats: Value = c
        .get(format!("{}/__sim/stats", h.url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(stats["requests"].as_u64().unwrap() >= 35);
    assert!(stats["faults_injected"]["drop"].as_u64().unwrap() >= 1);
    let recs = h.requests();
    assert!(recs.iter().any(|r| r.fault == Some("malformed")));
    assert!(recs.iter().all(|r| !r.path.starts_with("/__sim")));
    h.shutdown().await;
}

#[tokio::test]
async fn ticket_create_idempotency() {
    let h = sim(unlimited(), small()).await;
    let requester = h.with_store(|s| {
        s.find_users(1, |u, _| u.is_end_user() && u.is_active())[0]
            .0
            .id
    });
    let body = json!({"ticket": {"subject": "Incoming call", "priority": "normal", "type": "question",
        "requester_id": requester, "comment": {"body": "Call from +380441234567", "public": false},
        "custom_fields": [{"id": 360_001_111, "value": "google"}]}});
    let before = h.with_store(|s| s.ticket_count());
    let a = call(
        &h,
        Method::POST,
        "/api/v2/tickets.json",
        Some(body.clone()),
        &[("Idempotency-Key", "call-1")],
    )
    .await;
    assert_eq!(a.status, 201, "{}", a.text);
    assert_eq!(a.header("x-idempotency-lookup"), Some("miss"));
    let id = a.json()["ticket"]["id"].as_i64().unwrap();
    assert_eq!(
        a.header("location").unwrap(),
        format!("{}/api/v2/tickets/{id}.json", h.url())
    );
    assert!(
        a.json()["audit"]["events"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["type"] == "Comment" && e["public"] == false)
    );
    let b = call(
        &h,
        Method::POST,
        "/api/v2/tickets",
        Some(body.clone()),
        &[("Idempotency-Key", "call-1")],
    )
    .await;
    assert_eq!(b.status, 201);
    assert_eq!(b.header("x-idempotency-lookup"), Some("hit"));
    assert_eq!(b.json()["ticket"]["id"], id);
    assert_eq!(h.with_store(|s| s.ticket_count()), before + 1);
    let mut other = body.clone();
    other["ticket"]["subject"] = "Different".into();
    let c = call(
        &h,
        Method::POST,
        "/api/v2/tickets",
        Some(other),
        &[("Idempotency-Key", "call-1")],
    )
    .await;
    assert_eq!(c.status, 400);
    assert_eq!(c.json()["error"], "IdempotentRequestError");
    // Without a key a retry makes a second ticket, as on the real Zendesk.
    call(&h, Method::POST, "/api/v2/tickets", Some(body.clone()), &[]).await;
    call(&h, Method::POST, "/api/v2/tickets", Some(body.clone()), &[]).await;
    assert_eq!(h.with_store(|s| s.ticket_count()), before + 3);
    // Validation.
    let r = call(
        &h,
        Method::POST,
        "/api/v2/tickets",
        Some(json!({"ticket": {"subject": "x", "requester_id": requester}})),
        &[],
    )
    .await;
    assert_eq!(r.status, 422);
    let r = call(&h, Method::POST, "/api/v2/tickets", Some(json!({"ticket": {"comment": {"body": "x"}, "priority": "meh", "requester_id": requester}})), &[]).await;
    assert_eq!(r.status, 422);
    assert_eq!(r.json()["error"], "RecordInvalid");
    let stored = h.with_store(|s| s.ticket(id)).unwrap();
    assert_eq!(
        stored
            .custom_fields
            .unwrap()
            .iter()
            .find(|f| f.id == 360_001_111)
            .unwrap()
            .value,
        "google"
    );
    h.shutdown().await;
}

#[tokio::test]
async fn ticket_update_comments_and_closed() {
    let h = sim(unlimited(), small()).await;
    let (open, closed) = h.with_store(|s| {
        (
            s.find_tickets(1, |t| t.status.as_deref() == Some("open"))[0].id,
            s.find_tickets(1, |t| t.status.as_deref() == Some("closed"))[0].id,
        )
    });
    let r = call(
        &h,
        Method::PUT,
        &format!("/api/v2/tickets/{closed}.json"),
        Some(json!({"ticket": {"comment": {"body": "hi"}}})),
        &[],
    )
    .await;
    assert_eq!(r.status, 422);
    assert_eq!(
        r.json()["details"]["status"][0]["description"],
        "Status closed prevents ticket update"
    );
    let before = h.with_store(|s| s.comments(open).len());
    let first_public = h.with_store(|s| s.comments(open)[0].public);
    let r = call(
        &h,
        Method::PUT,
        &format!("/api/v2/tickets/{open}"),
        Some(json!({"ticket": {"comment": {"body": "Missed call"}, "status": "pending"}})),
        &[],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let comments = h.with_store(|s| s.comments(open));
    assert_eq!(comments.len(), before + 1);
    assert_eq!(
        comments.last().unwrap().public,
        first_public,
        "public defaults to the first comment's"
    );
    assert_eq!(
        h.with_store(|s| s.ticket(open)).unwrap().status.as_deref(),
        Some("pending")
    );
    let r = get(&h, &format!("/api/v2/tickets/{open}/comments.json")).await;
    assert_eq!(r.json()["comments"].as_array().unwrap().len(), before + 1);
    // A refused update leaves no comment behind.
    let r = call(
        &h,
        Method::PUT,
        &format!("/api/v2/tickets/{open}"),
        Some(json!({"ticket": {"comment": {"body": "x"}, "priority": "bogus"}})),
        &[],
    )
    .await;
    assert_eq!(r.status, 422);
    assert_eq!(h.with_store(|s| s.comments(open).len()), before + 1);
    h.shutdown().await;
}

#[tokio::test]
async fn users_create_update_and_search_delay() {
    let h = sim(unlimited(), small()).await;
    let r = call(
        &h,
        Method::POST,
        "/api/v2/users",
        Some(json!({"user": {"phone": "+380671234567"}})),
        &[],
    )
    .await;
    assert_eq!(r.status, 422);
    assert_eq!(r.json()["details"]["name"][0]["error"], "BlankValue");
    let r = call(
        &h,
        Method::POST,
        "/api/v2/users.json",
        Some(
            json!({"user": {"name": "Caller: 380671234567", "phone": "+380671234567",
        "user_fields": {"utm_source": "google", "no_such_field": 1}}}),
        ),
        &[],
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.text);
    let id = r.json()["user"]["id"].as_i64().unwrap();
    assert!(
        r.header("location")
            .unwrap()
            .ends_with(&format!("/api/v2/users/{id}.json"))
    );
    assert_eq!(r.json()["user"]["user_fields"]["utm_source"], "google");
    assert!(
        r.json()["user"]["user_fields"]
            .get("no_such_field")
            .is_none()
    );
    // Not searchable yet…
    let q = "/api/v2/search.json?query=role%3Aend-user%20phone%3A*671234567";
    let r = get(&h, q).await.json();
    assert_eq!(r["count"], 0);
    // …until the indexing delay has passed.
    h.set_config(|c| c.search_delay = Duration::ZERO);
    let r = get(&h, q).await.json();
    assert_eq!(r["results"][0]["id"], id);
    assert_eq!(r["results"][0]["result_type"], "user");
    assert_eq!(
        get(&h, "/api/v2/search?query=phone%3A380671234567")
            .await
            .json()["count"],
        1
    );
    assert_eq!(
        get(&h, "/api/v2/search?query=phone%3A671234567")
            .await
            .json()["count"],
        0
    );
    // Stored formats are found by digits.
    let (digits, uid) = h.with_store(|s| {
        let (u, _) = s.find_users(1, |u, _| {
            u.is_active()
                && !u.is_agent()
                && u.phone.as_deref().is_some_and(|p| p.starts_with("(0"))
        })[0]
            .clone();
        (store::phone_digits(u.phone.as_deref().unwrap()), u.id)
    });
    let r = get(&h, &format!("/api/v2/search?query=phone:*{}", &digits[1..]))
        .await
        .json();
    assert!(
        r["results"]
            .as_array()
            .unwrap()
            .iter()
            .any(|x| x["id"] == uid)
    );
    // Update: organization and user_fields merge.
    let org = h.with_store(|s| s.org_ids().next().unwrap());
    let r = call(
        &h,
        Method::PUT,
        &format!("/api/v2/users/{id}"),
        Some(json!({"user": {"organization_id": org, "user_fields": {"utm_campaign": "spring"}}})),
        &[],
    )
    .await;
    assert_eq!(r.status, 200);
    let u = r.json()["user"].clone();
    assert_eq!(
        (
            u["organization_id"].as_i64(),
            u["user_fields"]["utm_source"].as_str(),
            u["user_fields"]["utm_campaign"].as_str()
        ),
        (Some(org), Some("google"), Some("spring"))
    );
    // create_or_update matches by email only.
    let body =
        json!({"user": {"name": "Eve", "email": "eve@example.org", "phone": "+380671234567"}});
    let a = call(
        &h,
        Method::POST,
        "/api/v2/users/create_or_update",
        Some(body.clone()),
        &[],
    )
    .await;
    assert_eq!(a.status, 201);
    let b = call(
        &h,
        Method::POST,
        "/api/v2/users/create_or_update",
        Some(body),
        &[],
    )
    .await;
    assert_eq!(b.status, 200);
    assert_eq!(a.json()["user"]["id"], b.json()["user"]["id"]);
    assert_ne!(a.json()["user"]["id"], id);
    // Identities.
    let r = call(
        &h,
        Method::POST,
        &format!("/api/v2/users/{id}/identities"),
        Some(json!({"identity": {"type": "phone_number", "value": "+380931112233"}})),
        &[],
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.text);
    let r = get(&h, &format!("/api/v2/users/{id}/identities.json"))
        .await
        .json();
    assert!(
        r["identities"]
            .as_array()
            .unwrap()
            .iter()
            .any(|i| i["value"] == "+380931112233")
    );
    assert_eq!(
        h.with_store(|s| s.find_users_by_phone_digits("380931112233")),
        vec![id]
    );
    h.shutdown().await;
}

#[tokio::test]
async fn organizations_and_lists() {
    let h = sim(unlimited(), small()).await;
    let r = call(&h, Method::POST, "/api/v2/organizations", Some(json!({"organization": {"name": "Acme Kyiv", "organization_fields": {"scheme": "main"}}})), &[]).await;
    assert_eq!(r.status, 201);
    let id = r.json()["organization"]["id"].as_i64().unwrap();
    assert_eq!(
        r.json()["organization"]["organization_fields"]["scheme"],
        "main"
    );
    let r = call(
        &h,
        Method::POST,
        "/api/v2/organizations",
        Some(json!({"organization": {"name": "ACME kyiv"}})),
        &[],
    )
    .await;
    assert_eq!(r.status, 422);
    assert_eq!(r.json()["details"]["name"][0]["error"], "DuplicateValue");
    // create_or_update never matches by name.
    let r = call(
        &h,
        Method::POST,
        "/api/v2/organizations/create_or_update",
        Some(json!({"organization": {"name": "Acme Kyiv"}})),
        &[],
    )
    .await;
    assert_eq!(r.status, 422);
    let r = call(
        &h,
        Method::POST,
        "/api/v2/organizations/create_or_update",
        Some(json!({"organization": {"id": id, "name": "Acme Kyiv", "external_id": "x1"}})),
        &[],
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(
        get(&h, &format!("/api/v2/organizations/{id}.json"))
            .await
            .json()["organization"]["external_id"],
        "x1"
    );
    // Agents list with offset pagination.
    let r = get(
        &h,
        "/api/v2/users.json?role[]=agent&role[]=admin&per_page=5",
    )
    .await
    .json();
    assert_eq!(r["count"], 8);
    assert_eq!(r["users"].as_array().unwrap().len(), 5);
    let next = r["next_page"]
        .as_str()
        .unwrap()
        .strip_prefix(&h.url())
        .unwrap()
        .to_string();
    let r2 = get(&h, &next).await.json();
    assert_eq!(r2["users"].as_array().unwrap().len(), 3);
    assert!(r2["next_page"].is_null());
    let f = get(&h, "/api/v2/user_fields").await.json();
    assert!(
        f["user_fields"]
            .as_array()
            .unwrap()
            .iter()
            .any(|x| x["key"] == "utm_source")
    );
    let f = get(&h, "/api/v2/ticket_fields").await.json();
    assert!(
        f["ticket_fields"]
            .as_array()
            .unwrap()
            .iter()
            .all(|x| x["id"].is_i64())
    );
    assert_eq!(
        get(&h, "/api/v2/organization_fields").await.json()["organization_fields"][0]["key"],
        "scheme"
    );
    assert_eq!(get(&h, "/api/v2/nothing/here").await.status, 404);
    assert_eq!(
        get(&h, "/api/v2/users/1").await.json()["error"],
        "RecordNotFound"
    );
    h.shutdown().await;
}

#[tokio::test]
async fn talk_call_records() {
    let h = sim(unlimited(), small()).await;
    let r = call(
        &h,
        Method::POST,
        "/api/v2/calls",
        Some(json!({"call": {"from_line": "+380441234567"}})),
        &[],
    )
    .await;
    assert_eq!(r.status, 422);
    assert!(r.json()["details"].get("app_id").is_some());
    let user = h.with_store(|s| {
        s.find_users(1, |u, _| u.is_end_user() && u.is_active())[0]
            .0
            .id
    });
    let r = call(&h, Method::POST, "/api/v2/calls", Some(json!({
        "call": {"app_id": 1003048, "from_line": "+380441234567", "to_line": "+380442000000",
            "call_started_at": "2024-05-01T15:31:40+01:00", "direction": "inbound", "end_user_id": user, "duration": 250},
        "comment": {"title": "Inbound call", "call_fields": ["from_line", "duration"]}})), &[]).await;
    assert_eq!(r.status, 201, "{}", r.text);
    let c = r.json()["call"].clone();
    assert_eq!(c["call_started_at"], "2024-05-01T14:31:40Z");
    assert!(c["ticket_id"].is_i64());
    assert!(c.get("wrap_up_time").is_some());
    let calls = h.with_store(|s| s.calls().to_vec());
    assert_eq!(calls.len(), 1);
    assert_eq!(
        get(&h, &format!("/api/v2/calls/{}", calls[0].id))
            .await
            .status,
        200
    );
    h.shutdown().await;
}

/// Scale check, run by hand with optimisations:
/// `cargo test --release --lib sim::tests::scale -- --ignored --nocapture`.
#[tokio::test]
#[ignore]
async fn scale() {
    let t = std::time::Instant::now();
    let store = generate(&GenConfig {
        users: 1_000_000,
        tickets: 1_000_000,
        agents: 200,
        organizations: 100_000,
        seed: 1,
    });
    eprintln!("generated 1M users + 1M tickets in {:?}", t.elapsed());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let h = start(listener, unlimited(), store).await;
    let c = reqwest::Client::new();
    for path in [
        "/api/v2/incremental/users/cursor?start_time=0&include=identities",
        "/api/v2/incremental/tickets/cursor?start_time=0",
        "/api/v2/search?query=role%3Aend-user%20phone%3A*441234567",
    ] {
        let mut best = Duration::MAX;
        let mut len = 0;
        for _ in 0..5 {
            let t = std::time::Instant::now();
            let r = c
                .get(format!("{}{path}", h.url()))
                .basic_auth("admin@deskline.test/token", Some("sim-token"))
                .send()
                .await
                .unwrap();
            len = r.bytes().await.unwrap().len();
            best = best.min(t.elapsed());
        }
        eprintln!("{path}: {best:?} ({len} bytes)");
    }
    h.shutdown().await;
}

#[test]
fn cli_args() {
    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        sim: SimArgs,
    }
    let a = <Cli as clap::Parser>::try_parse_from([
        "sim",
        "--listen",
        "127.0.0.1:0",
        "--users",
        "10",
        "--tickets",
        "5",
        "--seed",
        "9",
        "--error-rate",
        "0.5",
        "--one-minute-rule-secs",
        "2",
        "--no-export-identities",
    ])
    .unwrap()
    .sim;
    let (c, g) = (a.sim_config(), a.gen_config());
    assert_eq!(
        (g.users, g.tickets, g.agents, g.organizations, g.seed),
        (10, 5, 20, 1, 9)
    );
    assert_eq!(c.one_minute_rule, Duration::from_secs(2));
    assert!(!c.export_identities && c.faults.error_rate == 0.5);
    assert_eq!(
        (c.email.as_str(), c.token.as_str()),
        ("admin@deskline.test", "sim-token")
    );
}

// ---- wire types, show_many, ticket fields, rate-limit headers -------------------------------------

/// What every served object parses into, compared with the store's typed reads (which leave `url`
/// unset: the store does not know its address).
fn without_url<T: serde::Serialize + serde::de::DeserializeOwned>(v: &T) -> T {
    let mut j = serde_json::to_value(v).unwrap();
    j["url"] = Value::Null;
    serde_json::from_value(j).unwrap()
}

/// Every user, identity, ticket, organization and comment the API serves parses into the `wire`
/// types with exactly the values `Store` reports: the served views and the typed reads are one shape.
#[tokio::test]
async fn served_objects_parse_into_wire_types_with_the_store_values() {
    #[derive(serde::Deserialize)]
    struct Users {
        users: Vec<wire::User>,
        identities: Vec<wire::Identity>,
    }
    #[derive(serde::Deserialize)]
    struct Tickets {
        tickets: Vec<wire::Ticket>,
    }
    #[derive(serde::Deserialize)]
    struct Orgs {
        organizations: Vec<wire::Organization>,
    }
    #[derive(serde::Deserialize)]
    struct Comments {
        comments: Vec<wire::Comment>,
    }
    let h = sim(unlimited(), small()).await;
    // A deleted organization and an HTML comment, which the generator does not make.
    let (org, ticket) = h.with_store(|s| {
        let org = s.org_ids().nth(3).unwrap();
        s.delete_organization(org).unwrap();
        let ticket = s.find_tickets(1, |t| t.is_open())[0].id;
        s.add_comment(
            ticket,
            NewComment {
                body: "<p>Recording &amp; notes</p>".into(),
                html: true,
                public: Some(false),
                author_id: None,
            },
        )
        .unwrap();
        (org, ticket)
    });
    h.set_config(|c| c.one_minute_rule = Duration::ZERO);
    let start = "start_time=0&per_page=1000";

    let mut seen = 0;
    let mut path = format!("/api/v2/incremental/users/cursor?{start}&include=identities");
    loop {
        let page: wire::CursorPage<Users> =
            serde_json::from_str(&get(&h, &path).await.text).unwrap();
        for u in &page.records.users {
            assert!(
                u.url
                    .as_deref()
                    .unwrap()
                    .ends_with(&format!("/users/{}.json", u.id))
            );
            assert_eq!(
                Some(without_url(u)),
                h.with_store(|s| s.user(u.id)),
                "user {}",
                u.id
            );
            let want = h.with_store(|s| s.identities(u.id));
            let got: Vec<_> = page
                .records
                .identities
                .iter()
                .filter(|i| i.user_id == u.id)
                .map(without_url)
                .collect();
            assert_eq!(got, want, "identities of {}", u.id);
        }
        seen += page.records.users.len();
        if page.end_of_stream {
            break;
        }
        path = format!(
            "/api/v2/incremental/users/cursor?cursor={}",
            page.after_cursor.unwrap()
        );
    }
    assert_eq!(seen, h.with_store(|s| s.user_count()));

    let page: wire::CursorPage<Tickets> = serde_json::from_str(
        &get(&h, &format!("/api/v2/incremental/tickets/cursor?{start}"))
            .await
            .text,
    )
    .unwrap();
    assert!(page.end_of_stream);
    assert_eq!(
        page.records.tickets.len(),
        h.with_store(|s| s.ticket_count())
    );
    for t in &page.records.tickets {
        assert_eq!(
            Some(without_url(t)),
            h.with_store(|s| s.ticket(t.id)),
            "ticket {}",
            t.id
        );
    }

    let page: wire::TimePage<Orgs> = serde_json::from_str(
        &get(&h, "/api/v2/incremental/organizations?start_time=0")
            .await
            .text,
    )
    .unwrap();
    assert_eq!(page.count, h.with_store(|s| s.org_count()));
    for o in &page.records.organizations {
        assert_eq!(
            Some(without_url(o)),
            h.with_store(|s| s.organization(o.id)),
            "org {}",
            o.id
        );
    }
    assert!(
        page.records
            .organizations
            .iter()
            .any(|o| o.id == org && o.deleted_at.is_some())
    );

    let live = h.with_store(|s| s.find_tickets(2, |t| t.status.as_deref() != Some("deleted")));
    for t in [live[0].id, live[1].id, ticket] {
        let got: wire::OffsetPage<Comments> =
            serde_json::from_str(&get(&h, &format!("/api/v2/tickets/{t}/comments")).await.text)
                .unwrap();
        assert_eq!(
            got.records.comments,
            h.with_store(|s| s.comments(t)),
            "ticket {t}"
        );
    }
    let last = h.with_store(|s| s.comments(ticket)).pop().unwrap();
    assert_eq!(last.body.as_deref(), Some("Recording & notes"));
    assert_eq!(
        last.html_body.as_deref(),
        Some("<p>Recording &amp; notes</p>")
    );
    assert_eq!(last.public, Some(false));
    h.shutdown().await;
}

#[tokio::test]
async fn tickets_show_many_skips_missing_and_deleted_and_keeps_the_order() {
    #[derive(serde::Deserialize)]
    struct Tickets {
        tickets: Vec<wire::Ticket>,
    }
    let h = sim(unlimited(), small()).await;
    let deleted =
        h.with_store(|s| s.find_tickets(1, |t| t.status.as_deref() == Some("deleted"))[0].id);
    let r = get(
        &h,
        &format!("/api/v2/tickets/show_many.json?ids=7,{deleted},3,999999,7,x"),
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("content-type"),
        Some("application/json; charset=utf-8")
    );
    let page: wire::OffsetPage<Tickets> = serde_json::from_str(&r.text).unwrap();
    let ids: Vec<i64> = page.records.tickets.iter().map(|t| t.id).collect();
    assert_eq!(ids, [7, 3]);
    assert_eq!(
        (page.count, page.next_page, page.previous_page),
        (2, None, None)
    );
    for t in &page.records.tickets {
        assert!(
            t.generated_timestamp.is_none(),
            "export-only field on show_many"
        );
        let mut want = h.with_store(|s| s.ticket(t.id)).unwrap();
        want.generated_timestamp = None;
        assert_eq!(without_url(t), want);
    }
    // The raw shape carries the offset-page keys and the ticket keys a client reads.
    let raw = r.json();
    for k in ["tickets", "next_page", "previous_page", "count"] {
        assert!(raw.get(k).is_some(), "{k}");
    }
    for k in [
        "custom_fields",
        "fields",
        "custom_status_id",
        "via",
        "requester_id",
        "status",
    ] {
        assert!(raw["tickets"][0].get(k).is_some(), "ticket.{k}");
    }

    let empty = get(&h, "/api/v2/tickets/show_many?ids=").await;
    assert_eq!(
        (empty.status, empty.json()["count"].as_i64()),
        (StatusCode::OK, Some(0))
    );
    let many: Vec<String> = (1..=101).map(|i| i.to_string()).collect();
    let r = get(
        &h,
        &format!("/api/v2/tickets/show_many?ids={}", many.join(",")),
    )
    .await;
    assert_eq!(r.status, 400);
    let e: wire::Error = serde_json::from_str(&r.text).unwrap();
    assert_eq!(
        (e.error.as_str(), e.max_count),
        ("TooManyValues", Some(100))
    );
    let r = get(
        &h,
        &format!("/api/v2/tickets/show_many?ids={}", many[..100].join(",")),
    )
    .await;
    // 100 ids are allowed; the deleted ones among them are left out.
    let live = h.with_store(|s| {
        (1..=100)
            .filter(|&id| s.ticket(id).unwrap().status.as_deref() != Some("deleted"))
            .count()
    });
    assert!(live < 100, "the generator deletes some tickets");
    assert_eq!(r.json()["tickets"].as_array().unwrap().len(), live);
    h.shutdown().await;
}

#[tokio::test]
async fn organizations_show_many_by_ids_or_external_ids() {
    #[derive(serde::Deserialize)]
    struct Orgs {
        organizations: Vec<wire::Organization>,
    }
    let h = sim(unlimited(), small()).await;
    let (a, b, gone, x) = h.with_store(|s| {
        let ids: Vec<i64> = s.org_ids().take(3).collect();
        s.delete_organization(ids[2]).unwrap();
        let x = s
            .create_organization("Lviv office", Some("CRM-77"))
            .unwrap();
        (ids[0], ids[1], ids[2], x)
    });
    let r = get(
        &h,
        &format!("/api/v2/organizations/show_many?ids={b},{gone},{a},42,{x}"),
    )
    .await;
    assert_eq!(r.status, 200);
    let page: wire::OffsetPage<Orgs> = serde_json::from_str(&r.text).unwrap();
    let ids: Vec<i64> = page.records.organizations.iter().map(|o| o.id).collect();
    assert_eq!(ids, [b, a, x]);
    assert_eq!(page.count, 3);
    for o in &page.records.organizations {
        assert_eq!(Some(without_url(o)), h.with_store(|s| s.organization(o.id)));
    }
    // external_ids match case-insensitively, like every external_id lookup.
    let r = get(
        &h,
        "/api/v2/organizations/show_many?external_ids=crm-77,nope",
    )
    .await;
    let page: wire::OffsetPage<Orgs> = serde_json::from_str(&r.text).unwrap();
    assert_eq!(page.records.organizations.len(), 1);
    assert_eq!(
        page.records.organizations[0].name.as_deref(),
        Some("Lviv office")
    );
    let many: Vec<String> = (1..=101).map(|i| i.to_string()).collect();
    let r = get(
        &h,
        &format!("/api/v2/organizations/show_many?ids={}", many.join(",")),
    )
    .await;
    assert_eq!(
        (r.status, r.json()["error"].as_str()),
        (StatusCode::BAD_REQUEST, Some("TooManyValues"))
    );
    h.shutdown().await;
}

#[tokio::test]
async fn ticket_fields_list_the_system_fields_then_the_custom_ones() {
    #[derive(serde::Deserialize)]
    struct Fields {
        ticket_fields: Vec<wire::TicketField>,
    }
    let h = sim(unlimited(), small()).await;
    let r = get(&h, "/api/v2/ticket_fields.json").await;
    let page: wire::OffsetPage<Fields> = serde_json::from_str(&r.text).unwrap();
    let f = &page.records.ticket_fields;
    assert_eq!(page.count, f.len());
    let kinds: Vec<&str> = f.iter().map(|x| x.kind.as_deref().unwrap()).collect();
    assert_eq!(
        kinds[..8],
        [
            "subject",
            "description",
            "status",
            "tickettype",
            "priority",
            "group",
            "assignee",
            "custom_status"
        ]
    );
    let mut ids: Vec<i64> = f.iter().map(|x| x.id).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), f.len(), "field ids are unique");
    for (pos, x) in f.iter().enumerate() {
        assert_eq!(x.position, Some(pos as i64));
        assert_eq!(x.active, Some(true));
        assert!(x.title.as_deref().is_some_and(|t| !t.is_empty()));
        assert!(x.key.is_none(), "ticket fields are addressed by id");
        assert!(
            x.url
                .as_deref()
                .unwrap()
                .ends_with(&format!("/ticket_fields/{}.json", x.id))
        );
        assert_eq!(x.removable, Some(pos >= 8), "{:?}", x.kind);
    }
    let options = |kind: &str| -> Vec<String> {
        f.iter()
            .find(|x| x.kind.as_deref() == Some(kind))
            .and_then(|x| x.system_field_options.clone())
            .unwrap_or_default()
            .into_iter()
            .map(|o| o.value)
            .collect()
    };
    assert_eq!(options("status"), ["open", "pending", "hold", "solved"]);
    assert_eq!(
        options("tickettype"),
        ["question", "incident", "problem", "task"]
    );
    assert_eq!(options("priority"), ["low", "normal", "high", "urgent"]);
    assert!(options("subject").is_empty());
    // The raw body has no `system_field_options` key on fields without fixed choices.
    assert!(
        r.json()["ticket_fields"][0]
            .get("system_field_options")
            .is_none()
    );
    // The custom fields keep their ids, which ticket `custom_fields` use.
    let custom: Vec<(i64, &str)> = f[8..]
        .iter()
        .map(|x| (x.id, x.kind.as_deref().unwrap()))
        .collect();
    assert_eq!(custom[0], (360_001_111, "text"));
    let on_ticket: Vec<i64> = h
        .with_store(|s| s.ticket(1))
        .unwrap()
        .custom_fields
        .unwrap()
        .iter()
        .map(|c| c.id)
        .collect();
    assert_eq!(on_ticket, custom.iter().map(|c| c.0).collect::<Vec<_>>());
    h.shutdown().await;
}

fn header_num(r: &Resp, k: &str) -> u64 {
    r.header(k)
        .unwrap_or_else(|| panic!("no {k} header"))
        .parse()
        .unwrap_or_else(|e| panic!("{k}: {e}"))
}

/// The headers report the sliding-window budget the simulator enforces: a client that obeys them
/// never meets a 429, and one that meets a 429 reads the same numbers there.
#[tokio::test]
async fn rate_limit_headers_report_the_real_budget() {
    let cfg = SimConfig {
        requests_per_minute: 4,
        // Long enough that five requests fit in it on a loaded machine.
        rate_window: Duration::from_secs(5),
        ..SimConfig::default()
    };
    let h = sim(cfg, small()).await;
    for i in 1..=3u64 {
        let r = get(&h, "/api/v2/users/me").await;
        assert_eq!(r.status, 200);
        assert_eq!(header_num(&r, "x-rate-limit"), 4);
        assert_eq!(header_num(&r, "x-rate-limit-remaining"), 4 - i);
        assert_eq!(header_num(&r, "ratelimit-limit"), 4);
        assert_eq!(header_num(&r, "ratelimit-remaining"), 4 - i);
        // Seconds until the oldest counted request leaves the 5 s window.
        assert!((1..=5).contains(&header_num(&r, "ratelimit-reset")));
    }
    // A refused login counts nothing and says so.
    let bad = reqwest::Client::new()
        .get(format!("{}/api/v2/users/me", h.url()))
        .basic_auth("nobody@x.test/token", Some("wrong"))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 401);
    assert_eq!(bad.headers()["x-rate-limit-remaining"], "1");
    // Talk Partner Edition endpoints carry only the X-Rate-Limit pair.
    let r = get(&h, "/api/v2/calls/1").await;
    assert_eq!(r.status, 404);
    assert_eq!(header_num(&r, "x-rate-limit-remaining"), 0);
    assert!(r.header("ratelimit-limit").is_none() && r.header("ratelimit-reset").is_none());
    // Over budget: the 429 reports remaining 0 and a reset no later than its Retry-After.
    let r = get(&h, "/api/v2/tickets/1").await;
    assert_eq!(r.status, 429);
    assert_eq!(header_num(&r, "x-rate-limit-remaining"), 0);
    assert_eq!(header_num(&r, "ratelimit-remaining"), 0);
    let (reset, retry) = (
        header_num(&r, "ratelimit-reset"),
        header_num(&r, "retry-after"),
    );
    assert!(
        reset <= retry && retry <= reset + 1,
        "reset {reset} retry-after {retry}"
    );
    // Waiting `ratelimit-reset` seconds is enough: the oldest request has left the window.
    let last = get(&h, "/api/v2/tickets/1").await;
    assert_eq!(last.status, 429);
    tokio::time::sleep(Duration::from_secs(header_num(&last, "ratelimit-reset"))).await;
    let r = get(&h, "/api/v2/tickets/1").await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert!(header_num(&r, "ratelimit-remaining") < 4);
    h.shutdown().await;
}

/// Export responses report the account budget (ZENDESK.md §6: the recorded `ratelimit-*` on an
/// export showed the account limit), including on an export 429.
#[tokio::test]
async fn export_responses_report_the_account_budget() {
    let cfg = SimConfig {
        requests_per_minute: 50,
        export_requests_per_minute: 1,
        ..SimConfig::default()
    };
    let h = sim(cfg, small()).await;
    let r = get(&h, "/api/v2/incremental/users/cursor?start_time=0").await;
    assert_eq!(r.status, 200);
    assert_eq!(
        (
            header_num(&r, "ratelimit-limit"),
            header_num(&r, "ratelimit-remaining")
        ),
        (50, 49)
    );
    let r = get(&h, "/api/v2/incremental/users/cursor?start_time=0").await;
    assert_eq!(r.status, 429);
    assert_eq!(r.json()["error"], "APIRateLimitExceeded");
    assert_eq!(
        header_num(&r, "x-rate-limit-remaining"),
        49,
        "a refused export counts nothing"
    );
    assert_eq!(header_num(&r, "ratelimit-remaining"), 49);
    h.shutdown().await;
}

/// A webhook subscribed to ticket and user events receives signed events with string ids for a
/// reassignment, an identity added and a merge; a failing endpoint is retried with the same
/// invocation id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_api_and_signed_delivery() {
    use std::sync::Arc;
    type Received = Vec<(axum::http::HeaderMap, Vec<u8>)>;
    let got: Arc<parking_lot::Mutex<Received>> = Default::default();
    let fail_first = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let (g, f) = (got.clone(), fail_first.clone());
    let receiver = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |h: axum::http::HeaderMap, b: axum::body::Bytes| {
            let (g, f) = (g.clone(), f.clone());
            async move {
                g.lock().push((h, b.to_vec()));
                if f.swap(false, std::sync::atomic::Ordering::SeqCst) {
                    axum::http::StatusCode::INTERNAL_SERVER_ERROR
                } else {
                    axum::http::StatusCode::OK
                }
            }
        }),
    );
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}/hook", l.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(l, receiver).await });
    let mut st = Store::new();
    let agent = st
        .create_user(NewUser {
            name: "Hook Agent".into(),
            email: Some("hook.agent@sim.test".into()),
            role: Some(Role::Admin),
            ..NewUser::default()
        })
        .unwrap();
    let end = |st: &mut Store, n: &str| {
        st.create_user(NewUser {
            name: n.into(),
            ..NewUser::default()
        })
        .unwrap()
    };
    let (u1, u2) = (end(&mut st, "One"), end(&mut st, "Two"));
    let ticket = st
        .create_ticket(NewTicket {
            requester_id: u2,
            status: Some(Status::Open),
            ..NewTicket::default()
        })
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let h = start(
        listener,
        SimConfig {
            email: "hook.agent@sim.test".into(),
            ..SimConfig::default()
        },
        st,
    )
    .await;
    let created = call(
        &h,
        Method::POST,
        "/api/v2/webhooks",
        Some(json!({ "webhook": { "name": "t", "endpoint": endpoint, "http_method": "POST",
            "request_format": "json", "status": "active", "subscriptions": [
            "zen:event-type:ticket.agent_assignment_changed", "zen:event-type:user.identity_created",
            "zen:event-type:user.merged" ] } })),
        &[],
    )
    .await;
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.text);
    let id = created.json()["webhook"]["id"].as_str().unwrap().to_owned();
    let secret = get(&h, &format!("/api/v2/webhooks/{id}/signing_secret"))
        .await
        .json()["signing_secret"]["secret"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(
        get(&h, "/api/v2/webhooks").await.json()["webhooks"][0]["id"],
        id
    );
    h.with_store(|s| {
        s.update_ticket(
            ticket,
            TicketPatch {
                assignee_id: Some(Some(agent)),
                ..Default::default()
            },
        )
        .unwrap();
        s.add_phone_identity(u1, "+380501112233").unwrap();
        s.merge_user(u2, u1).unwrap();
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while h.webhook_stats().delivered < 3 || h.webhook_stats().pending > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "{:?}",
            h.webhook_stats()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let got = got.lock().clone();
    assert_eq!(h.webhook_stats().failed, 1);
    let mut types = Vec::new();
    for (headers, body) in &got {
        let hv = |k: &str| headers.get(k).unwrap().to_str().unwrap().to_owned();
        let ts = hv("x-zendesk-webhook-signature-timestamp");
        assert_eq!(
            hv("x-zendesk-webhook-signature"),
            webhooks::sign(secret.as_bytes(), &ts, body)
        );
        assert_eq!(hv("x-zendesk-webhook-id"), id);
        let v: Value = serde_json::from_slice(body).unwrap();
        assert!(v["detail"]["id"].is_string(), "{v}");
        types.push(v["type"].as_str().unwrap().to_owned());
    }
    // The failed first POST was retried with the same invocation id.
    let inv = |i: usize| got[i].0.get("x-zendesk-webhook-invocation-id").cloned();
    assert!((1..got.len()).any(|i| inv(i) == inv(0)));
    for t in [
        "ticket.agent_assignment_changed",
        "user.identity_created",
        "user.merged",
    ] {
        assert!(
            types.iter().any(|x| x.ends_with(t)),
            "{t} missing from {types:?}"
        );
    }
    h.shutdown().await;
}

/// Follows a search export from its first page to `has_more: false` through `links.next`,
/// checking the real shape on every page; returns the records.
async fn drain_search_export(h: &SimHandle, first: &str) -> Vec<Value> {
    let mut path = first.to_string();
    let mut out = Vec::new();
    for _ in 0..10_000 {
        let r = get(h, &path).await;
        assert_eq!(r.status, 200, "{}", r.text);
        let v = r.json();
        assert!(v["facets"].is_null());
        assert!(v["meta"]["before_cursor"].is_null());
        assert!(v["links"]["prev"].is_null());
        out.extend(v["results"].as_array().unwrap().iter().cloned());
        if !v["meta"]["has_more"].as_bool().unwrap() {
            assert!(v["links"]["next"].is_null());
            return out;
        }
        let cursor = v["meta"]["after_cursor"].as_str().unwrap();
        let next = v["links"]["next"].as_str().unwrap();
        assert!(
            next.contains(&format!("page%5Bafter%5D={cursor}")),
            "{next}"
        );
        path = next.strip_prefix(&h.url()).unwrap().to_string();
    }
    panic!("the search export never ended");
}

#[tokio::test]
async fn search_export_pages_open_tickets_and_users_by_role() {
    let h = sim(unlimited(), small()).await;
    let tickets = drain_search_export(
        &h,
        "/api/v2/search/export?query=type%3Aticket+status%3Csolved&filter[type]=ticket&page[size]=37",
    )
    .await;
    let want: Vec<i64> = h.with_store(|s| {
        s.tickets
            .iter()
            .filter(|t| {
                matches!(
                    t.status,
                    store::Status::New
                        | store::Status::Open
                        | store::Status::Pending
                        | store::Status::Hold
                )
            })
            .map(|t| t.id)
            .collect()
    });
    assert!(want.len() > 37, "the account needs several pages");
    let got: Vec<i64> = tickets.iter().map(|t| t["id"].as_i64().unwrap()).collect();
    assert_eq!(got, want);
    assert!(tickets.iter().all(|t| t["result_type"] == "ticket"));
    assert!(tickets.iter().all(|t| t["requester_id"].is_i64()));

    let users = drain_search_export(
        &h,
        "/api/v2/search/export?query=type%3Auser+role%3Aend-user&filter[type]=user&page[size]=1000",
    )
    .await;
    let want: Vec<i64> = h.with_store(|s| {
        s.users
            .iter()
            .filter(|u| u.active && u.role == store::Role::EndUser)
            .map(|u| u.id)
            .collect()
    });
    let got: Vec<i64> = users.iter().map(|u| u["id"].as_i64().unwrap()).collect();
    assert_eq!(got, want);
    assert!(users.iter().all(|u| u["result_type"] == "user"));
    let agents = drain_search_export(
        &h,
        "/api/v2/search/export?query=role%3Aagent&filter[type]=user&page[size]=1000",
    )
    .await;
    assert!(!agents.is_empty());
    assert!(agents.iter().all(|u| u["role"] == "agent"));

    // filter[type] is required.
    let r = get(&h, "/api/v2/search/export?query=type%3Aticket").await;
    assert_eq!(r.status, 400);
    h.shutdown().await;
}

#[tokio::test]
async fn search_export_cursor_expires_and_new_records_wait_for_indexing() {
    let h = sim(unlimited(), small()).await;
    let r = get(
        &h,
        "/api/v2/search/export?query=type%3Auser&filter[type]=user&page[size]=10",
    )
    .await;
    let next = r.json()["links"]["next"].as_str().unwrap().to_string();
    let next = next.strip_prefix(&h.url()).unwrap().to_string();
    assert_eq!(get(&h, &next).await.status, 200);
    // Every cursor is older than a zero lifetime.
    h.set_config(|c| c.search_cursor_ttl = Duration::ZERO);
    let r = get(&h, &next).await;
    assert_eq!(r.status, 400, "{}", r.text);
    assert_eq!(r.json()["error"], "InvalidPaginationParameter");
    h.set_config(|c| c.search_cursor_ttl = Duration::from_secs(3600));

    // A user created now is not in the search export until the indexing delay has passed.
    let r = call(
        &h,
        Method::POST,
        "/api/v2/users",
        Some(json!({"user": {"name": "New Caller", "phone": "+380671230000"}})),
        &[],
    )
    .await;
    assert_eq!(r.status, 201);
    let id = r.json()["user"]["id"].as_i64().unwrap();
    let first = "/api/v2/search/export?query=role%3Aend-user&filter[type]=user&page[size]=1000";
    let ids = |v: Vec<Value>| {
        v.iter()
            .map(|u| u["id"].as_i64().unwrap())
            .collect::<Vec<_>>()
    };
    assert!(!ids(drain_search_export(&h, first).await).contains(&id));
    h.set_config(|c| c.search_delay = Duration::ZERO);
    assert!(ids(drain_search_export(&h, first).await).contains(&id));
    h.shutdown().await;
}

#[tokio::test]
async fn search_export_has_its_own_rate_limit() {
    // The defaults are Zendesk's: 10 a minute for the incremental exports, 100 for this one.
    assert_eq!(SimConfig::default().export_requests_per_minute, 10);
    assert_eq!(SimConfig::default().search_export_requests_per_minute, 100);
    let cfg = SimConfig {
        search_export_requests_per_minute: 2,
        ..SimConfig::default()
    };
    let h = sim(cfg, small()).await;
    let path = "/api/v2/search/export?query=type%3Aticket&filter[type]=ticket";
    for _ in 0..2 {
        assert_eq!(get(&h, path).await.status, 200);
    }
    let r = get(&h, path).await;
    assert_eq!(r.status, 429);
    assert_eq!(r.json()["error"], "APIRateLimitExceeded");
    let secs: u64 = r.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=60).contains(&secs));
    // The incremental exports and the rest are not held back by it.
    assert_eq!(
        get(&h, "/api/v2/incremental/users/cursor?start_time=0")
            .await
            .status,
        200
    );
    assert_eq!(get(&h, "/api/v2/users/me").await.status, 200);
    h.shutdown().await;
}
