//! Client tests against tiny scripted axum servers on 127.0.0.1:0.
//!
//! Real sockets and `tokio::time::pause()` don't mix (a paused clock auto-advances while the runtime
//! waits on I/O, firing request timeouts early), so these run on real time with short delays: the
//! backoff base is set to 1 ms and `Retry-After` to 1 s where a pause is the point of the test. The
//! budget's windowing is tested under paused time in `budget.rs`.

use std::{
    collections::VecDeque,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use axum::{
    Router,
    body::{Body, Bytes},
    extract::Request,
    http::{HeaderMap as AxHeaders, StatusCode as AxStatus},
    response::{IntoResponse, Response},
};
use parking_lot::Mutex;
use serde_json::json;

use super::*;
use crate::zendesk::requests::{
    CallCreate, CallDirection, Comment as NewComment, CustomFieldValue, FieldValues,
    OrganizationCreate, Role, TicketCreate, TicketCreateJson, TicketUpdate, UserCreate, UserUpdate,
};

const EMAIL: &str = "agent@example.test";
const TOKEN: &str = "s3cr3t-token-value";
const OAUTH: &str = "oauth-bearer-secret";

/// One scripted answer.
#[derive(Clone)]
enum Reply {
    Json(u16, Value),
    Text(u16, &'static str, &'static str),
    RateLimited(Option<&'static str>, &'static str),
    /// Waits this long before a 200 `{}`.
    Slow(Duration),
    /// A 200 whose body stream fails after a few bytes.
    Truncated,
    /// Echoes the request's `Authorization` header in a 422 body.
    EchoAuth,
}

#[derive(Debug, Clone)]
struct Recorded {
    method: String,
    uri: String,
    headers: AxHeaders,
    body: String,
}

#[derive(Default)]
struct Script {
    replies: Mutex<VecDeque<Reply>>,
    fallback: Mutex<Option<Reply>>,
    requests: Mutex<Vec<Recorded>>,
    hits: AtomicUsize,
    notify: tokio::sync::Notify,
}

impl Script {
    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
    fn requests(&self) -> Vec<Recorded> {
        self.requests.lock().clone()
    }
    /// Waits until the server has seen `n` requests, with a deadline.
    async fn wait_hits(&self, n: usize) {
        tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                let notified = self.notify.notified();
                if self.hits() >= n {
                    return;
                }
                notified.await;
            }
        })
        .await
        .expect("server never saw the expected requests");
    }
}

async fn handle(script: Arc<Script>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let body = axum::body::to_bytes(body, 1 << 20)
        .await
        .unwrap_or_default();
    script.requests.lock().push(Recorded {
        method: parts.method.to_string(),
        uri: parts.uri.to_string(),
        headers: parts.headers.clone(),
        body: String::from_utf8_lossy(&body).into_owned(),
    });
    let reply = script
        .replies
        .lock()
        .pop_front()
        .or_else(|| script.fallback.lock().clone())
        .unwrap_or(Reply::Json(200, json!({})));
    script.hits.fetch_add(1, Ordering::SeqCst);
    script.notify.notify_waiters();
    let status = |s: u16| AxStatus::from_u16(s).unwrap();
    match reply {
        Reply::Json(s, v) => (
            status(s),
            [("content-type", "application/json")],
            v.to_string(),
        )
            .into_response(),
        Reply::Text(s, ct, body) => (status(s), [("content-type", ct)], body).into_response(),
        Reply::RateLimited(retry_after, body) => {
            let mut r = (status(429), body).into_response();
            if let Some(ra) = retry_after {
                r.headers_mut().insert("retry-after", ra.parse().unwrap());
            }
            r
        }
        Reply::Slow(d) => {
            tokio::time::sleep(d).await;
            (status(200), "{}").into_response()
        }
        Reply::Truncated => {
            let chunks: Vec<Result<Bytes, std::io::Error>> = vec![
                Ok(Bytes::from_static(b"{\"user\":{\"id\":")),
                Err(std::io::Error::other("dropped")),
            ];
            Response::builder()
                .status(200)
                .header("content-type", "application/json")
                .body(Body::from_stream(futures_util::stream::iter(chunks)))
                .unwrap()
        }
        Reply::EchoAuth => {
            let auth = parts
                .headers
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_owned();
            let token = auth
                .strip_prefix("Basic ")
                .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
                .map(|d| String::from_utf8_lossy(&d).into_owned())
                .unwrap_or_default();
            (
                status(422),
                json!({"error": format!("bad {auth}"), "description": format!("decoded {token}")})
                    .to_string(),
            )
                .into_response()
        }
    }
}

async fn server(replies: Vec<Reply>) -> (String, Arc<Script>) {
    let script = Arc::new(Script::default());
    script.replies.lock().extend(replies);
    let s = script.clone();
    let app = Router::new().fallback(move |req: Request| handle(s.clone(), req));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}"), script)
}

fn options(url: &str) -> ClientOptions {
    ClientOptions {
        base_url: url.to_owned(),
        credentials: Credentials::ApiToken {
            email: EMAIL.to_owned(),
            token: SecretString::from(TOKEN),
        },
        requests_per_minute: 1000,
        export_requests_per_minute: 100,
        timeout: Duration::from_secs(5),
        max_retries: 3,
        rate_window: std::time::Duration::from_secs(60),
    }
}

fn client(url: &str) -> Client {
    let c = Client::new(options(url)).unwrap();
    c.set_backoff_base(Duration::from_millis(1));
    c
}

fn user(id: i64) -> Value {
    json!({"user": {"id": id, "name": "Olena", "role": "end-user"}})
}

/// A comment-only ticket update, as the worker sends on a reused ticket.
fn comment_update(body: &str) -> TicketUpdate {
    TicketUpdate {
        comment: NewComment {
            body: body.to_owned(),
            public: false,
            author_id: None,
        },
    }
}

/// A minimal ticket create, ready to send.
fn ticket_create(subject: &str) -> TicketCreateJson {
    TicketCreateJson::new(&TicketCreate {
        subject: subject.to_owned(),
        comment: NewComment {
            body: "call".to_owned(),
            public: false,
            author_id: None,
        },
        requester_id: 1,
        organization_id: None,
        assignee_id: None,
        priority: None,
        kind: None,
        custom_fields: Vec::new(),
        via_followup_source_id: None,
    })
    .unwrap()
}

/// A call record with only the mandatory fields.
fn call_create(app_id: i64) -> CallCreate {
    CallCreate::new(
        app_id,
        "+15551234567".to_owned(),
        "+15557654321".to_owned(),
        "2024-05-01T10:00:00Z".to_owned(),
        CallDirection::Inbound,
    )
}

fn organization_create(name: &str, external_id: &str) -> OrganizationCreate {
    OrganizationCreate {
        name: name.to_owned(),
        external_id: external_id.to_owned(),
        organization_fields: FieldValues::new(),
    }
}

fn query_of(uri: &str) -> Vec<(String, String)> {
    let url = Url::parse(&format!("http://x{uri}")).unwrap();
    url.query_pairs()
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

fn assert_no_secret(text: &str) {
    let basic = base64::engine::general_purpose::STANDARD.encode(format!("{EMAIL}/token:{TOKEN}"));
    assert!(!text.contains(TOKEN), "token leaked: {text}");
    assert!(!text.contains(&basic), "basic credentials leaked: {text}");
    assert!(!text.contains(OAUTH), "oauth token leaked: {text}");
}

// ---- auth and headers ----

#[tokio::test]
async fn basic_auth_and_standard_headers() {
    let (url, script) = server(vec![Reply::Json(200, user(7)), Reply::Json(201, user(8))]).await;
    let c = client(&url);
    assert_eq!(c.me().await.unwrap().id, 7);
    let u = c
        .create_or_update_user(&UserCreate {
            name: "X".to_owned(),
            phone: None,
            role: None,
            external_id: "deskline:+380441234567".to_owned(),
            organization_id: None,
            skip_verify_email: None,
            user_fields: FieldValues::new(),
        })
        .await
        .unwrap();
    assert_eq!(u.id, 8);

    let reqs = script.requests();
    let expected = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{EMAIL}/token:{TOKEN}"))
    );
    for r in &reqs {
        assert_eq!(r.headers["authorization"], expected.as_str());
        assert_eq!(r.headers["accept"], "application/json");
        let ua = r.headers["user-agent"].to_str().unwrap();
        assert!(ua.starts_with("deskline/"), "{ua}");
    }
    assert_eq!(reqs[0].method, "GET");
    assert_eq!(reqs[0].uri, "/api/v2/users/me");
    assert!(!reqs[0].headers.contains_key("content-type"));
    assert_eq!(reqs[1].method, "POST");
    assert_eq!(reqs[1].uri, "/api/v2/users/create_or_update");
    assert_eq!(reqs[1].headers["content-type"], "application/json");
    let sent: Value = serde_json::from_str(&reqs[1].body).unwrap();
    assert_eq!(sent["user"]["external_id"], "deskline:+380441234567");
}

#[tokio::test]
async fn bearer_auth() {
    let (url, script) = server(vec![Reply::Json(200, user(1))]).await;
    let mut opts = options(&url);
    opts.credentials = Credentials::OAuth {
        token: SecretString::from(OAUTH),
    };
    let c = Client::new(opts).unwrap();
    c.show_user(1).await.unwrap();
    assert_eq!(
        script.requests()[0].headers["authorization"],
        format!("Bearer {OAUTH}").as_str()
    );
}

#[tokio::test]
async fn debug_output_hides_credentials() {
    let c = client("http://127.0.0.1:1");
    assert_no_secret(&format!("{c:?}"));
    assert_no_secret(&format!("{:?}", options("http://127.0.0.1:1")));
}

#[test]
fn bad_base_url_is_refused() {
    let mut o = options("ftp://example.test");
    assert!(Client::new(o.clone()).is_err());
    o.base_url = "not a url".into();
    assert!(Client::new(o).is_err());
}

// ---- 429 ----

#[tokio::test]
async fn rate_limit_with_plain_text_body_is_waited_out_then_succeeds() {
    let (url, script) = server(vec![
        Reply::RateLimited(
            Some("1"),
            "Number of allowed API requests per minute exceeded",
        ),
        Reply::Json(200, user(5)),
    ])
    .await;
    let c = client(&url);
    let t0 = Instant::now();
    let u = c.show_user(5).await.unwrap();
    assert_eq!(u.id, 5);
    assert!(
        t0.elapsed() >= Duration::from_secs(1),
        "Retry-After honoured"
    );
    assert_eq!(script.hits(), 2);
    let stats = c.budget().stats();
    assert_eq!(stats.total_rate_limited, 1);
    assert_eq!(stats.total_sent, 2);
    assert_eq!(
        stats.responses[&("GET /api/v2/users/{id}".to_owned(), 429)],
        1
    );
    assert_eq!(
        stats.responses[&("GET /api/v2/users/{id}".to_owned(), 200)],
        1
    );
}

#[tokio::test]
async fn rate_limit_pauses_other_callers_too() {
    let (url, script) = server(vec![
        Reply::RateLimited(
            Some("1"),
            r#"{"error":"APIRateLimitExceeded","description":"Number of allowed incremental export API requests per minute exceeded"}"#,
        ),
    ])
    .await;
    // Whichever caller goes first gets an answer it can read.
    *script.fallback.lock() = Some(Reply::Json(
        200,
        json!({"users": [], "end_of_stream": true, "after_cursor": "c1", "user": {"id": 1}}),
    ));
    let c = client(&url);
    let export = c.export_users(&ExportStart::StartTime(1_700_000_000), true, 1000);
    let other = async {
        // Starts once the 429 has paused the account; must wait for the same pause.
        script.wait_hits(1).await;
        tokio::time::timeout(Duration::from_secs(10), async {
            while c.budget().stats().paused_for.is_zero() {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
        .await
        .expect("the 429 never paused the budget");
        let t = Instant::now();
        c.show_user(1).await.unwrap();
        t.elapsed()
    };
    let (page, waited) = tokio::join!(export, other);
    assert_eq!(page.unwrap().after_cursor.as_deref(), Some("c1"));
    assert!(waited >= Duration::from_millis(500), "{waited:?}");
}

#[tokio::test]
async fn rate_limit_is_retried_even_for_once_writes() {
    let (url, script) = server(vec![
        Reply::RateLimited(Some("1"), "slow down"),
        Reply::Json(200, json!({"ticket": {"id": 3}, "audit": {}})),
    ])
    .await;
    let c = client(&url);
    let t = c.update_ticket(3, &comment_update("x")).await;
    assert_eq!(t.unwrap().id, 3);
    assert_eq!(script.hits(), 2);
}

#[test]
fn retry_after_parsing() {
    assert_eq!(parse_retry_after(Some("7")), Duration::from_secs(7));
    assert_eq!(
        parse_retry_after(Some(" 2.5 ")),
        Duration::from_millis(2500)
    );
    assert_eq!(parse_retry_after(None), DEFAULT_RETRY_AFTER);
    assert_eq!(parse_retry_after(Some("soon")), DEFAULT_RETRY_AFTER);
    assert_eq!(parse_retry_after(Some("-3")), DEFAULT_RETRY_AFTER);
    assert_eq!(parse_retry_after(Some("0")), Duration::from_secs(1));
    assert_eq!(parse_retry_after(Some("99999999")), MAX_RETRY_AFTER);
    // An HTTP date in the past means "now" (at least 1 s).
    assert_eq!(
        parse_retry_after(Some("Wed, 21 Oct 2015 07:28:00 GMT")),
        Duration::from_secs(1)
    );
}

// ---- transient errors ----

#[tokio::test]
async fn server_errors_are_retried_then_succeed() {
    let (url, script) = server(vec![
        Reply::Text(
            500,
            "text/html",
            "<html><body><h1>500 Internal</h1></body></html>",
        ),
        Reply::Json(503, json!({"error": "unavailable"})),
        Reply::Json(200, user(9)),
    ])
    .await;
    let c = client(&url);
    assert_eq!(c.show_user(9).await.unwrap().id, 9);
    assert_eq!(script.hits(), 3);
}

#[tokio::test]
async fn server_errors_exhaust_retries_as_transient() {
    let (url, script) = server(vec![]).await;
    *script.fallback.lock() = Some(Reply::Text(502, "text/html", "<h1>Bad Gateway</h1>"));
    let c = client(&url);
    let err = c.show_user(1).await.unwrap_err();
    match &err {
        ZendeskError::Transient { status, message } => {
            assert_eq!(*status, Some(502));
            assert_eq!(message, "Bad Gateway");
        }
        other => panic!("{other:?}"),
    }
    assert!(err.is_retryable());
    assert_eq!(script.hits(), 4, "one try and max_retries = 3 retries");
}

#[tokio::test]
async fn once_write_is_not_retried_after_a_server_error() {
    let (url, script) = server(vec![Reply::Json(500, json!({"error": "boom"}))]).await;
    let c = client(&url);
    let err = c
        .update_ticket(4, &comment_update("call"))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            ZendeskError::Transient {
                status: Some(500),
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(script.hits(), 1);

    // The same for a malformed 200 (the write may have landed).
    let (url, script) = server(vec![Reply::Text(200, "application/json", "{\"ticket\":")]).await;
    let c = client(&url);
    let err = c.create_call(&call_create(1)).await.unwrap_err();
    assert!(
        matches!(err, ZendeskError::Transient { status: None, .. }),
        "{err:?}"
    );
    assert_eq!(script.hits(), 1);
}

#[tokio::test]
async fn once_write_is_retried_when_nothing_was_sent() {
    // A port with nobody listening: connection refused, the request never left.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    drop(listener);
    let c = client(&url);
    let err = c.update_ticket(1, &comment_update("x")).await.unwrap_err();
    match &err {
        ZendeskError::Transient {
            status: None,
            message,
        } => {
            assert!(message.starts_with("could not connect"), "{message}");
            assert!(
                !message.contains("127.0.0.1"),
                "no URL in errors: {message}"
            );
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        c.budget().stats().total_sent,
        4,
        "retried, every attempt budgeted"
    );
    assert_eq!(
        c.budget().stats().responses[&("PUT /api/v2/tickets/{id}".to_owned(), NO_RESPONSE)],
        4
    );
}

#[tokio::test]
async fn idempotent_ticket_create_is_retried_with_the_same_key() {
    let (url, script) = server(vec![
        Reply::Json(500, json!({"error": "boom"})),
        Reply::Json(201, json!({"ticket": {"id": 77}, "audit": {}})),
    ])
    .await;
    let c = client(&url);
    let t = c
        .create_ticket(&ticket_create("Incoming call"), "deskline-call-abc")
        .await
        .unwrap();
    assert_eq!(t.id, 77);
    let reqs = script.requests();
    assert_eq!(reqs.len(), 2);
    for r in &reqs {
        assert_eq!(r.headers["idempotency-key"], "deskline-call-abc");
        assert_eq!(r.body, reqs[0].body, "same body on the retry");
    }
    assert!(c.create_ticket(&ticket_create(""), "").await.is_err());
    assert_eq!(script.hits(), 2, "an empty key is refused locally");
}

#[tokio::test]
async fn malformed_json_on_200_is_transient_and_retried() {
    let (url, script) = server(vec![
        Reply::Text(200, "application/json", "{\"user\": {\"id\": 1,"),
        Reply::Json(200, json!({"user": {"id": "not a number"}})),
        Reply::Json(200, user(1)),
    ])
    .await;
    let c = client(&url);
    assert_eq!(c.show_user(1).await.unwrap().id, 1);
    assert_eq!(script.hits(), 3);

    let (url, _script) = server(vec![]).await;
    *_script.fallback.lock() = Some(Reply::Json(200, json!({"user": {"id": "x"}})));
    let err = client(&url).show_user(1).await.unwrap_err();
    match err {
        ZendeskError::Transient {
            status: None,
            message,
        } => {
            assert!(message.contains("user.id"), "the path is named: {message}");
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn truncated_body_is_transient_and_retried() {
    let (url, script) = server(vec![Reply::Truncated, Reply::Json(200, user(2))]).await;
    let c = client(&url);
    assert_eq!(c.show_user(2).await.unwrap().id, 2);
    assert_eq!(script.hits(), 2);

    let (url, script) = server(vec![]).await;
    *script.fallback.lock() = Some(Reply::Truncated);
    let err = client(&url).show_user(2).await.unwrap_err();
    assert!(matches!(err, ZendeskError::Transient { .. }), "{err:?}");
}

#[tokio::test]
async fn timeouts_are_transient_and_bounded() {
    let (url, script) = server(vec![]).await;
    *script.fallback.lock() = Some(Reply::Slow(Duration::from_secs(30)));
    let mut opts = options(&url);
    opts.timeout = Duration::from_millis(200);
    opts.max_retries = 1;
    let c = Client::new(opts).unwrap();
    c.set_backoff_base(Duration::from_millis(1));
    let t0 = Instant::now();
    let err = c.show_user(1).await.unwrap_err();
    match &err {
        ZendeskError::Transient {
            status: None,
            message,
        } => {
            assert!(message.starts_with("timed out"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    assert!(t0.elapsed() < Duration::from_secs(5));
    assert_eq!(script.hits(), 2);
}

// ---- permanent errors ----

#[tokio::test]
async fn unprocessable_is_permanent_with_zendesks_message() {
    let (url, script) = server(vec![Reply::Json(
        422,
        json!({"error": "RecordInvalid", "description": "Record validation errors",
               "details": {"status": [{"description": "Status closed prevents ticket update"}]}}),
    )])
    .await;
    let err = client(&url)
        .update_ticket(5, &comment_update("x"))
        .await
        .unwrap_err();
    match &err {
        ZendeskError::Permanent {
            status, message, ..
        } => {
            assert_eq!(*status, 422);
            assert_eq!(
                message,
                "RecordInvalid: Record validation errors (status: Status closed prevents ticket update)"
            );
        }
        other => panic!("{other:?}"),
    }
    assert!(!err.is_retryable());
    assert_eq!(script.hits(), 1);
}

#[tokio::test]
async fn unauthorized_is_auth_and_not_retried() {
    let (url, script) = server(vec![]).await;
    *script.fallback.lock() = Some(Reply::Json(
        401,
        json!({"error": "Couldn't authenticate you"}),
    ));
    let err = client(&url).me().await.unwrap_err();
    match &err {
        ZendeskError::Auth { status, message } => {
            assert_eq!(*status, 401);
            assert_eq!(message, "Couldn't authenticate you");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(script.hits(), 1);
    assert_no_secret(&err.to_string());
}

#[tokio::test]
async fn no_secret_in_error_text_even_when_echoed() {
    let (url, _script) = server(vec![Reply::EchoAuth]).await;
    let err = client(&url).show_user(1).await.unwrap_err();
    let text = format!("{err} {err:?}");
    assert!(text.contains("[REDACTED]"), "{text}");
    assert_no_secret(&text);

    let (url, _script) = server(vec![Reply::EchoAuth]).await;
    let mut opts = options(&url);
    opts.credentials = Credentials::OAuth {
        token: SecretString::from(OAUTH),
    };
    let err = Client::new(opts).unwrap().me().await.unwrap_err();
    assert_no_secret(&format!("{err} {err:?}"));
}

#[test]
fn zendesk_messages_are_read_tolerantly() {
    let m = |body: &str, status: u16| {
        zendesk_message(body.as_bytes(), StatusCode::from_u16(status).unwrap())
    };
    assert_eq!(
        m(
            r#"{"error":"RecordInvalid","description":"Record validation errors","details":{"email":[{"description":"Email: x is already being used","error":"DuplicateValue"}],"name":[{"description":"Name: is too short"}]}}"#,
            422
        ),
        "RecordInvalid: Record validation errors (email: Email: x is already being used; name: Name: is too short)"
    );
    assert_eq!(
        m(
            r#"{"error":"RecordNotFound","description":"Not found"}"#,
            404
        ),
        "RecordNotFound: Not found"
    );
    assert_eq!(
        m(r#"{"error":"Only end-users can be merged"}"#, 422),
        "Only end-users can be merged"
    );
    assert_eq!(
        m(
            r#"{"error":"invalid_token","error_description":"The access token provided is expired"}"#,
            401
        ),
        "invalid_token: The access token provided is expired"
    );
    assert_eq!(
        m(
            r#"{"errors":[{"code":"Forbidden","title":"Forbidden","detail":"no"}]}"#,
            403
        ),
        "Forbidden: Forbidden: no"
    );
    assert_eq!(
        m(
            r#"{"error":{"title":"Forbidden","message":"You do not have access"}}"#,
            403
        ),
        "Forbidden: You do not have access"
    );
    assert_eq!(
        m(
            "<html><head><style>p{x}</style><script>var a='<b>';</script></head><body><h1>Gone</h1>\n\n<p>away</p></body></html>",
            410
        ),
        "Gone away"
    );
    assert_eq!(m("", 404), "Not Found");
    assert_eq!(m("   ", 400), "Bad Request");
    let long = "é".repeat(5000);
    let cut = m(&long, 400);
    assert_eq!(cut.chars().count(), MAX_MESSAGE_CHARS + 1);
    assert!(cut.ends_with('…'));
    assert_eq!(m(r#"{"weird":1}"#, 400), r#"{"weird":1}"#);
}

#[tokio::test]
async fn other_client_errors_are_permanent() {
    let (url, _s) = server(vec![Reply::Json(
        400,
        json!({"error": "IdempotentRequestError", "description": "key reused with another body"}),
    )])
    .await;
    let err = client(&url)
        .create_ticket(&ticket_create("x"), "k")
        .await
        .unwrap_err();
    assert!(
        matches!(&err, ZendeskError::Permanent { status: 400, message, .. } if message.starts_with("IdempotentRequestError")),
        "{err:?}"
    );
    let (url, s) = server(vec![
        Reply::Json(409, json!({"error": "Conflict"})),
        Reply::Json(200, user(1)),
    ])
    .await;
    client(&url).show_user(1).await.unwrap();
    assert_eq!(s.hits(), 2, "409 is a retryable conflict");
}

// ---- budget ----

#[tokio::test]
async fn budget_is_never_exceeded_by_concurrent_callers() {
    let (url, script) = server(vec![]).await;
    *script.fallback.lock() = Some(Reply::Json(200, user(1)));
    let mut opts = options(&url);
    opts.requests_per_minute = 5;
    let c = Client::new(opts).unwrap();
    let mut tasks = Vec::new();
    for i in 0..8 {
        let c = c.clone();
        tasks.push(tokio::spawn(async move { c.show_user(i).await }));
    }
    script.wait_hits(5).await;
    // The other three must wait for the window (a minute): give them a fair chance to misbehave.
    let rest = tokio::time::timeout(Duration::from_millis(500), async {
        for t in tasks {
            t.await.unwrap().unwrap();
        }
    })
    .await;
    assert!(rest.is_err(), "more than the budget went out");
    assert_eq!(script.hits(), 5);
    assert_eq!(c.budget().used_last_minute(), 5);
    assert_eq!(c.budget().limit(), 5);
}

#[tokio::test]
async fn exports_take_the_export_limit() {
    let (url, script) = server(vec![]).await;
    *script.fallback.lock() = Some(Reply::Json(
        200,
        json!({"organizations": [{"id": 1, "name": "Acme"}], "count": 1, "end_of_stream": true,
               "end_time": 5, "user": {"id": 1}}),
    ));
    let c = client(&url);
    let page = c.export_organizations(1_600_000_000).await.unwrap();
    assert_eq!(page.organizations[0].id, 1);
    assert_eq!(page.end_time, Some(5));
    c.show_user(1).await.unwrap();
    let stats = c.budget().stats();
    assert_eq!(stats.export_used_last_minute, 1);
    assert_eq!(stats.used_last_minute, 2);
    assert_eq!(
        script.requests()[0].uri,
        "/api/v2/incremental/organizations?start_time=1600000000"
    );
}

// ---- exports and pagination ----

#[tokio::test]
async fn export_parameters() {
    let (url, script) = server(vec![
        Reply::Json(200, json!({"users": [{"id": 1}], "identities": [{"id": 10, "user_id": 1, "type": "phone_number", "value": "+380441234567"}], "after_cursor": "abc=", "end_of_stream": false})),
        Reply::Json(200, json!({"users": [], "after_cursor": "def", "end_of_stream": true})),
        Reply::Json(200, json!({"tickets": [{"id": 5, "status": "deleted", "generated_timestamp": 9}], "after_cursor": "t1", "end_of_stream": true})),
    ])
    .await;
    let c = client(&url);
    let p1 = c
        .export_users(&ExportStart::StartTime(1_700_000_000), true, 500)
        .await
        .unwrap();
    assert_eq!(p1.identities.as_ref().unwrap()[0].user_id, 1);
    let p2 = c
        .export_users(&ExportStart::Cursor(p1.after_cursor.unwrap()), false, 1000)
        .await
        .unwrap();
    assert!(p2.end_of_stream);
    let t = c
        .export_tickets(&ExportStart::Cursor("x y+z".into()), 1000)
        .await
        .unwrap();
    assert_eq!(t.tickets[0].generated_timestamp, Some(9));

    let reqs = script.requests();
    assert!(reqs[0].uri.starts_with("/api/v2/incremental/users/cursor?"));
    assert_eq!(
        query_of(&reqs[0].uri),
        vec![
            ("start_time".into(), "1700000000".into()),
            ("per_page".into(), "500".into()),
            ("include".into(), "identities".into())
        ]
    );
    assert_eq!(
        query_of(&reqs[1].uri),
        vec![
            ("cursor".into(), "abc=".into()),
            ("per_page".into(), "1000".into())
        ]
    );
    assert!(
        reqs[2]
            .uri
            .starts_with("/api/v2/incremental/tickets/cursor?")
    );
    assert_eq!(query_of(&reqs[2].uri)[0], ("cursor".into(), "x y+z".into()));
    assert_eq!(c.budget().stats().export_used_last_minute, 3);
}

#[tokio::test]
async fn show_many_users_limits_and_query() {
    let (url, script) = server(vec![Reply::Json(
        200,
        json!({"users": [{"id": 1}, {"id": 2}], "identities": [{"id": 3, "user_id": 2, "type": "phone_number", "value": "+1"}]}),
    )])
    .await;
    let c = client(&url);
    assert!(c.show_many_users(&[]).await.unwrap().users.is_empty());
    let too_many: Vec<i64> = (1..=101).collect();
    assert!(matches!(
        c.show_many_users(&too_many).await,
        Err(ZendeskError::Permanent { status: 400, .. })
    ));
    assert_eq!(
        script.hits(),
        0,
        "nothing sent for an empty or oversized list"
    );
    let r = c.show_many_users(&[1, 2]).await.unwrap();
    assert_eq!(r.identities.as_ref().unwrap()[0].user_id, 2);
    assert_eq!(
        query_of(&script.requests()[0].uri),
        vec![
            ("ids".into(), "1,2".into()),
            ("include".into(), "identities".into())
        ]
    );
}

#[tokio::test]
async fn search_by_phone_follows_pages_on_our_host_and_keeps_users() {
    let (url, script) = server(vec![
        Reply::Json(200, json!({
            "results": [
                {"id": 1, "result_type": "user", "name": "A", "phone": "+380441234567"},
                {"id": 50, "result_type": "ticket", "subject": "not a user"}
            ],
            "count": 3,
            // An absolute link on another host: only its path and query are followed.
            "next_page": "https://elsewhere.example/api/v2/search.json?page=2&query=role%3Aend-user+phone%3A%2A380441234567",
        })),
        Reply::Json(200, json!({"results": [{"id": 2, "result_type": "user"}], "next_page": null})),
    ])
    .await;
    let c = client(&url);
    let phone = E164::from_digits(380_441_234_567).unwrap();
    let users = c.search_users_by_phone(phone).await.unwrap();
    assert_eq!(users.iter().map(|u| u.id).collect::<Vec<_>>(), vec![1, 2]);
    let reqs = script.requests();
    assert_eq!(reqs.len(), 2, "both pages came to our server");
    assert!(reqs[0].uri.starts_with("/api/v2/search?"));
    assert_eq!(
        query_of(&reqs[0].uri)[0],
        ("query".into(), "role:end-user phone:*380441234567".into())
    );
    assert!(!reqs[0].uri.contains(' '), "the query is URL-encoded");
    assert_eq!(reqs[1].uri.split('?').next(), Some("/api/v2/search.json"));
    assert_eq!(query_of(&reqs[1].uri)[0], ("page".into(), "2".into()));
    let labels: Vec<_> = c.budget().stats().responses.into_keys().collect();
    assert_eq!(
        labels,
        vec![("GET /api/v2/search".to_owned(), 200)],
        "no phone in labels"
    );
}

#[tokio::test]
async fn search_stops_at_the_result_cap() {
    let (url, script) = server(vec![]).await;
    let results: Vec<Value> = (0..100)
        .map(|i| json!({"id": i, "result_type": "user"}))
        .collect();
    let next = format!("{url}/api/v2/search?page=next");
    *script.fallback.lock() = Some(Reply::Json(
        200,
        json!({"results": results, "next_page": next}),
    ));
    // Each page names the same next link; the client must stop at the cap before noticing.
    let c = client(&url);
    let err_or_users = c
        .search_users_by_phone(E164::from_digits(15_551_234_567).unwrap())
        .await;
    // Page 2 links to itself, which the client treats as a broken link.
    assert!(err_or_users.is_err());

    // With distinct links, the cap ends it at 1000 results (10 pages).
    let (url, script) = server(vec![]).await;
    for p in 2..=12 {
        script.replies.lock().push_back(Reply::Json(
            200,
            json!({"results": results, "next_page": format!("{url}/api/v2/search?page={p}")}),
        ));
    }
    let users = client(&url)
        .search_users_by_phone(E164::from_digits(15_551_234_567).unwrap())
        .await
        .unwrap();
    assert_eq!(users.len(), SEARCH_RESULT_CAP);
    assert_eq!(script.hits(), 10);
}

#[tokio::test]
async fn list_agents_pages_through_offset_pages() {
    let (url, script) = server(vec![]).await;
    script.replies.lock().extend([
        Reply::Json(200, json!({"users": [{"id": 1, "role": "agent"}], "next_page": format!("{url}/api/v2/users.json?page=2&per_page=100&role%5B%5D=agent&role%5B%5D=admin"), "count": 2})),
        Reply::Json(200, json!({"users": [{"id": 2, "role": "admin"}], "next_page": null, "count": 2})),
    ]);
    let agents = client(&url).list_agents().await.unwrap();
    assert_eq!(agents.iter().map(|u| u.id).collect::<Vec<_>>(), vec![1, 2]);
    let reqs = script.requests();
    assert_eq!(
        query_of(&reqs[0].uri),
        vec![
            ("role[]".into(), "agent".into()),
            ("role[]".into(), "admin".into()),
            ("per_page".into(), "100".into())
        ]
    );
    assert_eq!(query_of(&reqs[1].uri)[0], ("page".into(), "2".into()));
}

#[tokio::test]
async fn identities_follow_cursor_pages() {
    let (url, script) = server(vec![]).await;
    script.replies.lock().extend([
        Reply::Json(200, json!({"identities": [{"id": 1, "user_id": 9, "type": "email"}],
            "meta": {"has_more": true, "after_cursor": "a"},
            "links": {"next": format!("{url}/api/v2/users/9/identities?page%5Bafter%5D=a&page%5Bsize%5D=100")}})),
        Reply::Json(200, json!({"identities": [{"id": 2, "user_id": 9, "type": "phone_number"}],
            "meta": {"has_more": false}, "links": {"next": "ignored"}})),
    ]);
    let ids = client(&url).user_identities(9).await.unwrap();
    assert_eq!(ids.len(), 2);
    assert!(ids[1].is_phone());
    assert_eq!(script.hits(), 2);
}

#[tokio::test]
async fn reads_and_writes_use_the_documented_paths() {
    let (url, script) = server(vec![
        Reply::Json(200, json!({"ticket": {"id": 1, "status": "open"}})),
        Reply::Json(
            200,
            json!({"tickets": [{"id": 1}, {"id": 2}], "next_page": null}),
        ),
        Reply::Json(200, json!({"comments": [{"id": 1, "body": "hi"}]})),
        Reply::Json(
            200,
            json!({"ticket_fields": [{"id": 360001, "title": "Source", "type": "text"}]}),
        ),
        Reply::Json(
            200,
            json!({"user_fields": [{"id": 1, "key": "utm_source"}]}),
        ),
        Reply::Json(
            200,
            json!({"organization_fields": [{"id": 2, "key": "scheme"}]}),
        ),
        Reply::Json(200, user(6)),
        Reply::Json(201, json!({"organization": {"id": 8}})),
        Reply::Json(201, json!({"call": {"id": 99, "ticket_id": 5}})),
    ])
    .await;
    let c = client(&url);
    assert!(c.show_ticket(1).await.unwrap().is_open());
    assert_eq!(c.requested_tickets(3).await.unwrap().len(), 2);
    assert_eq!(
        c.ticket_comments(1).await.unwrap()[0].body.as_deref(),
        Some("hi")
    );
    assert_eq!(c.ticket_fields().await.unwrap()[0].id, 360001);
    assert_eq!(
        c.user_fields().await.unwrap()[0].key.as_deref(),
        Some("utm_source")
    );
    assert_eq!(
        c.organization_fields().await.unwrap()[0].key.as_deref(),
        Some("scheme")
    );
    assert_eq!(
        c.update_user(
            6,
            &UserUpdate {
                organization_id: Some(8),
                ..UserUpdate::default()
            }
        )
        .await
        .unwrap()
        .id,
        6
    );
    assert_eq!(
        c.create_or_update_organization(&organization_create("Acme", "x"))
            .await
            .unwrap()
            .id,
        8
    );
    assert_eq!(c.create_call(&call_create(1)).await.unwrap().id, 99);

    let got: Vec<(String, String)> = script
        .requests()
        .into_iter()
        .map(|r| (r.method, r.uri.split('?').next().unwrap().to_owned()))
        .collect();
    let want = [
        ("GET", "/api/v2/tickets/1"),
        ("GET", "/api/v2/users/3/tickets/requested"),
        ("GET", "/api/v2/tickets/1/comments"),
        ("GET", "/api/v2/ticket_fields"),
        ("GET", "/api/v2/user_fields"),
        ("GET", "/api/v2/organization_fields"),
        ("PUT", "/api/v2/users/6"),
        ("POST", "/api/v2/organizations/create_or_update"),
        ("POST", "/api/v2/calls"),
    ];
    assert_eq!(
        got,
        want.iter()
            .map(|(m, p)| (m.to_string(), p.to_string()))
            .collect::<Vec<_>>()
    );
    // The mandatory fields only (ZENDESK.md §7), byte for byte; every write type has its exact
    // body checked in `typed_bodies_are_sent_as_documented`.
    assert_eq!(
        script.requests()[8].body,
        r#"{"call":{"app_id":1,"from_line":"+15551234567","to_line":"+15557654321","call_started_at":"2024-05-01T10:00:00Z","direction":"inbound"}}"#
    );
}

#[tokio::test]
async fn generic_request_checks_its_inputs() {
    let (url, script) = server(vec![Reply::Json(204, Value::Null)]).await;
    let c = client(&url);
    let bad: Result<Value, _> = c
        .request(Method::GET, "/users/1", None, &[], false, Retry::Idempotent)
        .await;
    // A local failure is its own variant now, not a fake HTTP status 0 (issue 11 item 2).
    assert!(matches!(bad, Err(ZendeskError::Local { .. })));
    let bad: Result<Value, _> = c
        .request(
            Method::GET,
            "/api/v2/x",
            None,
            &[("bad header", "v")],
            false,
            Retry::Idempotent,
        )
        .await;
    assert!(bad.is_err());
    assert_eq!(script.hits(), 0);
    // A POST without a body still says it speaks JSON; an empty 2xx reads as null.
    let v: Value = c
        .request(
            Method::POST,
            "/api/v2/channels/voice/agents/1/users/2/display",
            None,
            &[],
            false,
            Retry::Once,
        )
        .await
        .unwrap();
    assert_eq!(v, Value::Null);
    assert_eq!(
        script.requests()[0].headers["content-type"],
        "application/json"
    );
}

#[test]
fn endpoint_templates_have_no_ids() {
    let t = |m: Method, p: &str| endpoint_template(&m, p);
    assert_eq!(
        t(Method::GET, "/api/v2/users/123"),
        "GET /api/v2/users/{id}"
    );
    assert_eq!(
        t(Method::GET, "/api/v2/users/123.json"),
        "GET /api/v2/users/{id}"
    );
    assert_eq!(
        t(Method::PUT, "/api/v2/tickets/9/comments?x=1"),
        "PUT /api/v2/tickets/{id}/comments"
    );
    assert_eq!(
        t(Method::GET, "/api/v2/job_statuses/V3-abc1"),
        "GET /api/v2/job_statuses/{id}"
    );
    assert_eq!(
        t(Method::GET, "/api/v2/incremental/users/cursor"),
        "GET /api/v2/incremental/users/cursor"
    );
}

// ---- classification of refusals (issue 11 item 2) ----

/// Bodies as Zendesk sends them (ZENDESK.md §9 and the threads it cites).
#[test]
fn refusals_are_classified_from_codes_and_details() {
    let cases: &[(u16, &str, Rejection)] = &[
        (
            422,
            r#"{"error":"RecordInvalid","description":"Record validation errors","details":{"email":[{"description":"Email: jo@example.com is already being used by another user","error":"DuplicateValue"}]}}"#,
            Rejection::Duplicate {
                field: "email".into(),
            },
        ),
        (
            422,
            r#"{"error":"RecordInvalid","description":"Record validation errors","details":{"name":[{"description":"Name: has already been taken","error":"DuplicateValue"}]}}"#,
            Rejection::Duplicate {
                field: "name".into(),
            },
        ),
        (
            422,
            r#"{"error":"RecordInvalid","description":"Record validation errors","details":{"status":[{"description":"Status closed prevents ticket update"}]}}"#,
            Rejection::TicketClosed,
        ),
        (
            404,
            r#"{"error":"RecordNotFound","description":"Not found"}"#,
            Rejection::NotFound,
        ),
        (
            400,
            r#"{"error":"IdempotentRequestError","description":"Request body does not match the original request"}"#,
            Rejection::IdempotencyConflict,
        ),
        (
            400,
            r#"{"error":"TooManyValues","description":"Parameter  cannot specify more than 100 values","max_count":100}"#,
            Rejection::TooManyValues,
        ),
        // Validation of another kind, a merge refusal with only `error`, and a body that is not
        // JSON: nothing a caller acts on.
        (
            422,
            r#"{"error":"RecordInvalid","description":"Record validation errors","details":{"phone":[{"description":"Phone: is invalid","error":"InvalidValue"}]}}"#,
            Rejection::Other,
        ),
        (
            422,
            r#"{"error":"Merge refused: the user has a closed ticket"}"#,
            Rejection::Other,
        ),
        (400, "<html>Bad Request</html>", Rejection::Other),
    ];
    for (status, body, want) in cases {
        assert_eq!(&super::rejection(*status, body.as_bytes()), want, "{body}");
    }
}

#[tokio::test]
async fn a_duplicate_is_a_permanent_rejection_with_its_field() {
    let (url, _script) = server(vec![Reply::Json(
        422,
        json!({"error": "RecordInvalid", "description": "Record validation errors",
               "details": {"name": [{"description": "Name: has already been taken", "error": "DuplicateValue"}]}}),
    )])
    .await;
    let err = client(&url)
        .create_or_update_organization(&organization_create("Acme", "x"))
        .await
        .unwrap_err();
    assert_eq!(
        err.rejection(),
        Some(&Rejection::Duplicate {
            field: "name".into()
        })
    );
    assert_eq!(err.status(), Some(422));
    assert!(!err.is_retryable());
}

// ---- typed request bodies (issue 11 item 2) ----

/// Every write type, fully set, sent through the client: the exact bytes on the wire, in the shapes
/// ZENDESK.md documents (§3 user create, §5 organization create, §4 ticket create and update with
/// `custom_fields` keyed by id, §7 call record).
#[tokio::test]
async fn typed_bodies_are_sent_as_documented() {
    let (url, script) = server(vec![
        Reply::Json(201, user(8)),
        Reply::Json(200, user(8)),
        Reply::Json(201, json!({"organization": {"id": 4}})),
        Reply::Json(201, json!({"ticket": {"id": 35436}, "audit": {}})),
        Reply::Json(200, json!({"ticket": {"id": 35436}, "audit": {}})),
        Reply::Json(201, json!({"call": {"id": 99, "ticket_id": 35436}})),
    ])
    .await;
    let c = client(&url);
    let fields = |pairs: &[(&str, &str)]| -> FieldValues {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    };
    c.create_or_update_user(&UserCreate {
        name: "Caller: 15551234567".to_owned(),
        phone: Some("+15551234567".to_owned()),
        role: Some(Role::EndUser),
        external_id: "deskline:+15551234567".to_owned(),
        organization_id: Some(4),
        skip_verify_email: Some(true),
        user_fields: fields(&[("utm_source", "google"), ("line", "+380441234567")]),
    })
    .await
    .unwrap();
    c.update_user(
        8,
        &UserUpdate {
            name: Some("Olena".to_owned()),
            phone: Some("+15551234567".to_owned()),
            organization_id: Some(4),
            user_fields: fields(&[("utm_source", "google")]),
        },
    )
    .await
    .unwrap();
    c.create_or_update_organization(&OrganizationCreate {
        name: "Acme".to_owned(),
        external_id: "deskline-org:+15551234567".to_owned(),
        organization_fields: fields(&[("org_field_1", "x")]),
    })
    .await
    .unwrap();
    let ticket = TicketCreate {
        subject: "Incoming call from +1 555-123-4567".to_owned(),
        comment: NewComment {
            body: "Inbound call, answered".to_owned(),
            public: false,
            author_id: Some(42),
        },
        requester_id: 8,
        organization_id: Some(4),
        assignee_id: Some(42),
        priority: Some("normal".to_owned()),
        kind: Some("question".to_owned()),
        custom_fields: vec![
            CustomFieldValue {
                id: 360_001_111,
                value: "google".to_owned(),
            },
            CustomFieldValue {
                id: 360_002_222,
                value: "cpc".to_owned(),
            },
        ],
        via_followup_source_id: Some(35000),
    };
    c.create_ticket(&TicketCreateJson::new(&ticket).unwrap(), "deskline-call-1")
        .await
        .unwrap();
    c.update_ticket(
        35436,
        &TicketUpdate {
            comment: NewComment {
                body: "Inbound call, answered".to_owned(),
                public: true,
                author_id: Some(42),
            },
        },
    )
    .await
    .unwrap();
    let call = CallCreate {
        call_ended_at: Some("2024-05-01T10:04:10Z".to_owned()),
        agent_id: Some(42),
        end_user_id: Some(9001),
        duration: Some(250),
        recording_url: Some("https://pbx.example/rec/abc.mp3".to_owned()),
        completion_status: Some("completed".to_owned()),
        ticket_id: Some(35436),
        ..CallCreate::new(
            1_003_048,
            "+15551234567".to_owned(),
            "+15557654321".to_owned(),
            "2024-05-01T10:00:00Z".to_owned(),
            CallDirection::Inbound,
        )
    };
    assert_eq!(c.create_call(&call).await.unwrap().ticket_id, Some(35436));

    let sent: Vec<(String, String, String)> = script
        .requests()
        .into_iter()
        .map(|r| (r.method, r.uri, r.body))
        .collect();
    let want = [
        (
            "POST",
            "/api/v2/users/create_or_update",
            r#"{"user":{"name":"Caller: 15551234567","phone":"+15551234567","role":"end-user","external_id":"deskline:+15551234567","organization_id":4,"skip_verify_email":true,"user_fields":{"line":"+380441234567","utm_source":"google"}}}"#,
        ),
        (
            "PUT",
            "/api/v2/users/8",
            r#"{"user":{"name":"Olena","phone":"+15551234567","organization_id":4,"user_fields":{"utm_source":"google"}}}"#,
        ),
        (
            "POST",
            "/api/v2/organizations/create_or_update",
            r#"{"organization":{"name":"Acme","external_id":"deskline-org:+15551234567","organization_fields":{"org_field_1":"x"}}}"#,
        ),
        (
            "POST",
            "/api/v2/tickets",
            r#"{"ticket":{"subject":"Incoming call from +1 555-123-4567","comment":{"body":"Inbound call, answered","public":false,"author_id":42},"requester_id":8,"organization_id":4,"assignee_id":42,"priority":"normal","type":"question","custom_fields":[{"id":360001111,"value":"google"},{"id":360002222,"value":"cpc"}],"via_followup_source_id":35000}}"#,
        ),
        (
            "PUT",
            "/api/v2/tickets/35436",
            r#"{"ticket":{"comment":{"body":"Inbound call, answered","public":true,"author_id":42}}}"#,
        ),
        (
            "POST",
            "/api/v2/calls",
            r#"{"call":{"app_id":1003048,"from_line":"+15551234567","to_line":"+15557654321","call_started_at":"2024-05-01T10:00:00Z","direction":"inbound","ticket_id":35436,"end_user_id":9001,"agent_id":42,"call_ended_at":"2024-05-01T10:04:10Z","duration":250,"completion_status":"completed","recording_url":"https://pbx.example/rec/abc.mp3"}}"#,
        ),
    ];
    assert_eq!(sent.len(), want.len());
    for ((method, uri, body), (m, u, b)) in sent.iter().zip(want) {
        assert_eq!((method.as_str(), uri.as_str()), (m, u));
        assert_eq!(body, b, "{m} {u}");
        // And it is JSON Zendesk can read (no trailing garbage from the envelope).
        serde_json::from_str::<Value>(body).unwrap();
    }
}

/// Absent options are left out, never sent as `null` (which Zendesk reads as "clear it").
#[test]
fn absent_options_are_left_out() {
    fn json(v: &impl Serialize) -> String {
        serde_json::to_string(v).unwrap()
    }
    assert_eq!(
        json(&UserCreate {
            name: "+380 44 123 4567".to_owned(),
            phone: None,
            role: None,
            external_id: "deskline:+380441234567".to_owned(),
            organization_id: None,
            skip_verify_email: None,
            user_fields: FieldValues::new(),
        }),
        r#"{"name":"+380 44 123 4567","external_id":"deskline:+380441234567"}"#
    );
    assert_eq!(json(&UserUpdate::default()), "{}");
    assert_eq!(
        json(&organization_create("Acme", "x")),
        r#"{"name":"Acme","external_id":"x"}"#
    );
    assert_eq!(
        json(&comment_update("x")),
        r#"{"comment":{"body":"x","public":false}}"#
    );
    assert_eq!(
        ticket_create("s").as_str(),
        r#"{"subject":"s","comment":{"body":"call","public":false},"requester_id":1}"#
    );
}

/// Every settable field of the call record (ZENDESK.md §7's recorded list, less `id`, `account_id`,
/// `created_at` and `updated_at`, which are Zendesk's, plus the documented
/// `call_recording_consent`) has its place in [`CallCreate`].
#[test]
fn call_create_covers_every_documented_field() {
    let documented = "ticket_id end_user_id organization_id brand_id app_id agent_id from_line \
        from_line_nickname to_line to_line_nickname call_started_at call_ended_at direction duration \
        dnis phone_name call_type end_user_location callback callback_source callback_number \
        wait_time time_to_answer queue_time exceeded_queue_time queue_name ivr_time_spent ivr_hops \
        ivr_action ivr_routed_to ivr_destination_group_name talk_time hold_time consultation_time \
        wrap_up_time completion_status call_abandoned_position customer_requested_voicemail \
        voicemail outside_business_hours overflowed overflowed_to call_disposition recording_url \
        recording_time not_recording_time call_recording_consent call_recording_consent_action \
        recording_control_interactions transcript external_id";
    let s = |v: &str| Some(v.to_owned());
    let full = CallCreate {
        ticket_id: Some(1),
        end_user_id: Some(2),
        organization_id: Some(3),
        brand_id: Some(4),
        agent_id: Some(5),
        from_line_nickname: s("Kyiv office"),
        to_line_nickname: s("Sales"),
        call_ended_at: s("2024-05-01T10:04:10Z"),
        duration: Some(250),
        dnis: s("+15557654321"),
        phone_name: s("Sales line"),
        call_type: s("inbound"),
        end_user_location: s("Kyiv"),
        callback: Some(false),
        callback_source: s("queue"),
        callback_number: s("+15551234567"),
        wait_time: Some(10),
        time_to_answer: Some(12),
        queue_time: Some(8),
        exceeded_queue_time: Some(false),
        queue_name: s("Support"),
        ivr_time_spent: Some(5),
        ivr_hops: Some(2),
        ivr_action: s("menu"),
        ivr_routed_to: s("Support"),
        ivr_destination_group_name: s("Support"),
        talk_time: Some(230),
        hold_time: Some(0),
        consultation_time: Some(0),
        wrap_up_time: Some(20),
        completion_status: s("completed"),
        call_abandoned_position: Some(0),
        customer_requested_voicemail: Some(false),
        voicemail: Some(false),
        outside_business_hours: Some(false),
        overflowed: Some(false),
        overflowed_to: s("+15550000000"),
        call_disposition: s("resolved"),
        recording_url: s("https://pbx.example/rec/abc.mp3"),
        recording_time: Some(230),
        not_recording_time: Some(0),
        call_recording_consent: s("always"),
        call_recording_consent_action: s("caller_opted_in"),
        recording_control_interactions: Some(0),
        transcript: s("Hello"),
        external_id: s("pbx-call-1"),
        ..call_create(1_003_048)
    };
    let v = serde_json::to_value(&full).unwrap();
    let mut sent: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
    let mut want: Vec<&str> = documented.split_whitespace().collect();
    sent.sort_unstable();
    want.sort_unstable();
    assert_eq!(sent, want);
    assert_eq!(v["direction"], "inbound");
    assert_eq!(
        serde_json::to_value(CallDirection::Outbound).unwrap(),
        "outbound"
    );
}

/// A ticket body persisted by an earlier Deskline (built with `json!`, so its keys are in
/// alphabetical order) is resent byte for byte after the upgrade: Zendesk refuses a different body
/// under the same `Idempotency-Key`. So is one persisted by this version.
#[tokio::test]
async fn a_stored_ticket_body_is_resent_byte_for_byte() {
    let old = r#"{"assignee_id":12,"comment":{"author_id":12,"body":"Incoming call, answered\nCall: deskline-call c-1","public":false},"custom_fields":[{"id":360001,"value":"google"}],"organization_id":7,"priority":"normal","requester_id":9,"subject":"Incoming call from +380 44 123 4567","type":"question"}"#;
    let new = ticket_create("Incoming call").as_str().to_owned();
    let (url, script) = server(vec![]).await;
    *script.fallback.lock() = Some(Reply::Json(201, json!({"ticket": {"id": 5}})));
    let c = client(&url);
    for stored in [old, new.as_str()] {
        let body = TicketCreateJson::from_stored(stored.to_owned()).unwrap();
        assert_eq!(body.as_str(), stored);
        c.create_ticket(&body, "deskline-call-c-1").await.unwrap();
    }
    let reqs = script.requests();
    assert_eq!(reqs[0].body, format!(r#"{{"ticket":{old}}}"#));
    assert_eq!(reqs[1].body, format!(r#"{{"ticket":{new}}}"#));
    // A corrupt row is not sent at all.
    assert!(TicketCreateJson::from_stored(r#"{"subject":"x"}"#.to_owned()).is_err());
    assert!(TicketCreateJson::from_stored("not json".to_owned()).is_err());
}

#[tokio::test]
async fn a_bad_idempotency_key_is_a_local_error() {
    let (url, script) = server(vec![]).await;
    *script.fallback.lock() = Some(Reply::Json(201, json!({"ticket": {"id": 5}})));
    let c = client(&url);
    let body = ticket_create("x");
    for key in [String::new(), "k".repeat(256)] {
        let err = c.create_ticket(&body, &key).await.unwrap_err();
        assert!(matches!(err, ZendeskError::Local { .. }), "{err:?}");
        assert_eq!(err.status(), None, "not a fake HTTP status");
    }
    assert_eq!(script.hits(), 0);
    c.create_ticket(&body, &"k".repeat(255)).await.unwrap();
    assert_eq!(script.hits(), 1);
}
