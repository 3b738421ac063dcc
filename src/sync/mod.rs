//! The post-call sync: a durable queue of call reports and the worker that writes each call into
//! Zendesk exactly once (DESIGN §4).
//!
//! # What the queue promises
//! - A report is acknowledged ([`Queue::enqueue`] returns) only after its SQLite transaction is
//!   committed with `synchronous=FULL`: a power cut after the answer loses nothing.
//! - `call_id` is the primary identity: a second report with the same id changes nothing and is
//!   answered `duplicate = true` (the first report wins).
//!
//! # The state machine (DESIGN §2)
//! ```text
//!   enqueue ──▶ QUEUED ──claim──▶ IN_PROGRESS ──▶ DONE
//!                 ▲                 │   │
//!                 │  due again      │   └──permanent error──▶ FAILED (Zendesk's text in last_error)
//!             RETRY_WAIT ◀─retryable┘
//!   IN_PROGRESS found at start-up (a crash) or released at shutdown ──▶ QUEUED
//! ```
//! `DONE` and `FAILED` are final.
//!
//! # Why every retry is safe
//! Delivery to Zendesk is at least once, so each step is made idempotent and its result is written
//! to the job row before the next step starts; a retry (after an error or a crash) resumes from the
//! first step without a recorded result:
//! 1. user: found (index, this instance's own writes, Zendesk search) or created with
//!    `create_or_update` keyed by `external_id = deskline:<E.164>`, which Zendesk matches;
//! 2. organization: `create_or_update` keyed by an `external_id` derived from the number;
//! 3. ticket: created with `Idempotency-Key: deskline-call-<call_id>` and a request body persisted
//!    in the row before the first attempt, so a retry sends byte-for-byte the same request;
//! 4. comment on a reused ticket: sent once; if the outcome is unknown the retry first reads the
//!    ticket's comments for the call id the comment carries;
//! 5. call record (Talk Partner Edition).
//!
//! Jobs for the same client number never run at the same time (the claim skips numbers with a job
//! in progress), so concurrent calls from a new number create one user, one organization and one
//! ticket: the second job finds what the first one wrote in the index, or, with several replicas,
//! in the records PostgreSQL keeps per number (`own_user_id`, `own_ticket_id`; the user's own
//! organization comes with the user from Zendesk).
//!
//! # Two stores, one abstraction
//! [`JobStore`] is what the worker and the gRPC handlers use: the embedded SQLite [`Queue`] (one
//! replica; the default) or [`PgQueue`] (several replicas on one PostgreSQL, DESIGN §8: claims
//! carry a renewed lease, see [`pg`]), with a local spool when PostgreSQL is down (see `store`).
//! One test suite (`store_tests`) runs against both.

mod comment;
pub(crate) mod pg;
mod queue;
mod settings;
mod store;
#[cfg(test)]
mod store_tests;
mod worker;
#[cfg(test)]
mod worker_tests;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::phone::E164;

pub(crate) use pg::PgQueue;
pub use queue::{Queue, QueueError};
pub(crate) use settings::SyncSettings;
pub(crate) use store::{JobStore, StoreError};
pub(crate) use worker::{Worker, WorkerHandle};

/// How often finished jobs past `storage.retention_days` are deleted (and once at start).
pub(crate) const HOUSEKEEPING_EVERY: std::time::Duration = std::time::Duration::from_secs(60 * 60);

/// How often the PostgreSQL job counters' pending changes are folded (a no-op with SQLite), so
/// they stay few even when nothing scrapes the metrics.
const FOLD_COUNTS_EVERY: std::time::Duration = std::time::Duration::from_secs(60);

/// Deletes finished jobs older than `retention` now and every [`HOUSEKEEPING_EVERY`], and folds
/// the PostgreSQL job counters every [`FOLD_COUNTS_EVERY`], until `stop`.
/// A failed purge is logged and tried again next time: old rows cost disk, not correctness, and a
/// queue that really broke stops the worker, which stops the process.
pub(crate) async fn housekeeping(
    queue: JobStore,
    retention: std::time::Duration,
    stop: tokio_util::sync::CancellationToken,
) -> anyhow::Result<()> {
    let mut tick = tokio::time::interval(HOUSEKEEPING_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut fold = tokio::time::interval(FOLD_COUNTS_EVERY);
    fold.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = fold.tick() => {
                if let Err(e) = queue.compact_counts().await {
                    tracing::warn!(error = %e, "job counters not folded; trying again later");
                }
                continue;
            }
            () = stop.cancelled() => return Ok(()),
        }
        let before = queue::now_ms().saturating_sub(retention.as_millis() as i64);
        match queue.purge_finished(before).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(jobs = n, "finished jobs past the retention deleted"),
            Err(e) => {
                tracing::warn!(error = %e, "cannot delete old finished jobs; trying again later")
            }
        }
    }
}

/// Who started the call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Direction {
    Incoming,
    Outgoing,
    Callback,
}

/// How the call ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Outcome {
    Answered,
    Missed,
    Busy,
    Failed,
    Voicemail,
}

/// Where a job stands (DESIGN §2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SyncState {
    /// Accepted, waiting for the worker.
    Queued,
    /// The worker is writing it into Zendesk now.
    InProgress,
    /// A retryable error happened; waiting for the next attempt.
    RetryWait,
    /// Everything was written into Zendesk.
    Done,
    /// Ended on a permanent error (retryable ones never end here); `last_error` says why.
    Failed,
}

impl SyncState {
    pub(crate) const ALL: [SyncState; 5] = [
        Self::Queued,
        Self::InProgress,
        Self::RetryWait,
        Self::Done,
        Self::Failed,
    ];

    /// The name stored in the queue (and usable as a low-cardinality metric label).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::InProgress => "in_progress",
            Self::RetryWait => "retry_wait",
            Self::Done => "done",
            Self::Failed => "failed",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|st| st.as_str() == s)
    }
}

/// One finished call as the PBX reported it. Stored as JSON in the queue, so fields may be added
/// (with `#[serde(default)]`) without migrating stored rows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct CallReport {
    pub call_id: String,
    pub direction: Direction,
    pub outcome: Outcome,
    /// As the PBX sent it.
    pub client_number: String,
    /// Parsed by the gRPC layer (INVALID_ARGUMENT when it does not parse).
    pub client_e164: E164,
    pub line_number: String,
    /// Unix seconds.
    pub started_at: i64,
    /// Talk time.
    pub duration_seconds: u32,
    pub wait_seconds: u32,
    pub recording_url: String,
    pub employee_name: String,
    pub employee_extension: String,
    pub scheme_name: String,
    #[serde(default)]
    pub utm: BTreeMap<String, String>,
    #[serde(default)]
    pub extra: BTreeMap<String, String>,
    #[serde(default)]
    pub client_name: String,
}

/// A report field that failed validation; the gRPC layer turns it into INVALID_ARGUMENT.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub(crate) struct FieldError {
    pub field: &'static str,
    pub message: String,
}

const MAX_CALL_ID: usize = 128;
const MAX_NAME: usize = 256;
const MAX_URL: usize = 2048;
const MAX_MAP_ENTRIES: usize = 32;
const MAX_MAP_KEY: usize = 64;
const MAX_MAP_VALUE: usize = 1024;
pub(crate) const UTM_KEYS: [&str; 5] = [
    "utm_source",
    "utm_medium",
    "utm_campaign",
    "utm_term",
    "utm_content",
];

fn field_err(field: &'static str, message: impl Into<String>) -> FieldError {
    FieldError {
        field,
        message: message.into(),
    }
}

impl CallReport {
    /// What this call means for sticky routing (DESIGN §3 rule 7, `LAST_CALL`): the employee took
    /// the customer's call. Only answered calls with a named employee: a missed call was taken by
    /// nobody. Applied when `ReportCall` accepts the report (so it counts at once) and again by the
    /// sync once the customer is known (a customer the sync created, or a replica other than the
    /// one that accepted it); applying it twice changes nothing.
    pub(crate) fn call_taken(&self) -> Option<crate::index::Change> {
        (self.outcome == Outcome::Answered && !self.employee_name.trim().is_empty()).then(|| {
            crate::index::Change::CallTaken {
                phone: self.client_e164,
                employee_name: self.employee_name.clone(),
                started_at: self.started_at,
            }
        })
    }

    /// Bounds every field, so a bad PBX cannot fill the queue with megabytes or smuggle control
    /// characters into Zendesk comments. Lengths are counted in characters.
    pub(crate) fn validate(&self) -> Result<(), FieldError> {
        let id = &self.call_id;
        if id.trim().is_empty() {
            return Err(field_err("call_id", "required"));
        }
        if id.chars().count() > MAX_CALL_ID {
            return Err(field_err(
                "call_id",
                format!("longer than {MAX_CALL_ID} characters"),
            ));
        }
        if id.chars().any(char::is_control) {
            return Err(field_err(
                "call_id",
                "must be printable (no control characters)",
            ));
        }
        for (field, value) in [
            ("client_number", &self.client_number),
            ("line_number", &self.line_number),
            ("employee_name", &self.employee_name),
            ("employee_extension", &self.employee_extension),
            ("scheme_name", &self.scheme_name),
            ("client_name", &self.client_name),
        ] {
            if value.chars().count() > MAX_NAME {
                return Err(field_err(
                    field,
                    format!("longer than {MAX_NAME} characters"),
                ));
            }
            if value.chars().any(char::is_control) {
                return Err(field_err(field, "must not contain control characters"));
            }
        }
        if !self.recording_url.is_empty() {
            if self.recording_url.len() > MAX_URL {
                return Err(field_err(
                    "recording_url",
                    format!("longer than {MAX_URL} bytes"),
                ));
            }
            let ok = reqwest::Url::parse(&self.recording_url).is_ok_and(|u| {
                matches!(u.scheme(), "http" | "https")
                    && u.host_str().is_some_and(|h| !h.is_empty())
            });
            if !ok {
                return Err(field_err(
                    "recording_url",
                    "must be empty or an http(s) URL",
                ));
            }
        }
        if self.started_at < 0 {
            return Err(field_err("started_at", "before 1970"));
        }
        for (field, map) in [("utm", &self.utm), ("extra", &self.extra)] {
            if map.len() > MAX_MAP_ENTRIES {
                return Err(field_err(
                    field,
                    format!("more than {MAX_MAP_ENTRIES} entries"),
                ));
            }
            for (k, v) in map {
                if k.is_empty() || k.chars().count() > MAX_MAP_KEY {
                    return Err(field_err(
                        field,
                        format!("keys must have 1 to {MAX_MAP_KEY} characters"),
                    ));
                }
                if v.chars().count() > MAX_MAP_VALUE {
                    return Err(field_err(
                        field,
                        format!("value of {k:?} is longer than {MAX_MAP_VALUE} characters"),
                    ));
                }
                if k.chars().chain(v.chars()).any(char::is_control) {
                    return Err(field_err(
                        field,
                        format!("entry {k:?} contains control characters"),
                    ));
                }
            }
        }
        if let Some(k) = self.utm.keys().find(|k| !UTM_KEYS.contains(&k.as_str())) {
            return Err(field_err(
                "utm",
                format!(
                    "unknown key {k:?}: expected utm_source, utm_medium, utm_campaign, utm_term or utm_content"
                ),
            ));
        }
        Ok(())
    }
}

/// What `GetCallStatus` reports. Ids are 0 when not (yet) known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CallStatus {
    pub call_id: String,
    pub state: SyncState,
    pub attempts: u32,
    pub last_error: String,
    pub user_id: i64,
    pub organization_id: i64,
    pub ticket_id: i64,
    pub created_user: bool,
    pub created_organization: bool,
    pub created_ticket: bool,
    pub comment_added: bool,
    pub call_record_id: i64,
    /// Unix seconds of the next attempt while in `RETRY_WAIT`.
    pub next_attempt_at: Option<i64>,
}

#[cfg(test)]
pub(crate) mod test_support {
    use super::*;

    pub(crate) fn report(call_id: &str, phone: u64) -> CallReport {
        CallReport {
            call_id: call_id.to_owned(),
            direction: Direction::Incoming,
            outcome: Outcome::Answered,
            client_number: format!("+{phone}"),
            client_e164: E164::from_digits(phone).unwrap(),
            line_number: "+380441110000".into(),
            started_at: 1_714_557_600,
            duration_seconds: 250,
            wait_seconds: 12,
            recording_url: "https://pbx.example/rec/abc.mp3".into(),
            employee_name: "Olena Petrenko".into(),
            employee_extension: "101".into(),
            scheme_name: "Sales".into(),
            utm: BTreeMap::from([("utm_source".into(), "google".into())]),
            extra: BTreeMap::new(),
            client_name: String::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{test_support::report, *};

    #[test]
    fn valid_report_passes() {
        assert_eq!(report("c1", 380441234567).validate(), Ok(()));
    }

    #[test]
    fn validation_names_the_field() {
        type Mutation = Box<dyn Fn(&mut CallReport)>;
        let cases: Vec<(Mutation, &str)> = vec![
            (Box::new(|r| r.call_id.clear()), "call_id"),
            (Box::new(|r| r.call_id = "x".repeat(129)), "call_id"),
            (Box::new(|r| r.call_id = "a\nb".into()), "call_id"),
            (
                Box::new(|r| r.recording_url = "ftp://x/y".into()),
                "recording_url",
            ),
            (
                Box::new(|r| r.recording_url = "not a url".into()),
                "recording_url",
            ),
            (
                Box::new(|r| r.employee_name = "я".repeat(257)),
                "employee_name",
            ),
            (
                Box::new(|r| {
                    r.utm.insert("utm_bogus".into(), "x".into());
                }),
                "utm",
            ),
            (
                Box::new(|r| {
                    for i in 0..33 {
                        r.extra.insert(format!("k{i}"), "v".into());
                    }
                }),
                "extra",
            ),
            (
                Box::new(|r| {
                    r.extra.insert("k".into(), "v".repeat(1025));
                }),
                "extra",
            ),
            (
                Box::new(|r| {
                    r.extra.insert("k".repeat(65), "v".into());
                }),
                "extra",
            ),
        ];
        for (mutate, field) in cases {
            let mut r = report("c1", 380441234567);
            mutate(&mut r);
            assert_eq!(r.validate().unwrap_err().field, field, "{r:?}");
        }
        // Exactly at the limits is fine; Cyrillic counts characters, not bytes.
        let mut r = report(&"x".repeat(128), 380441234567);
        r.employee_name = "я".repeat(256);
        r.recording_url = String::new();
        assert_eq!(r.validate(), Ok(()));
    }

    #[test]
    fn report_json_round_trip() {
        let r = report("c1", 380441234567);
        let json = serde_json::to_string(&r).unwrap();
        assert!(json.contains("\"direction\":\"incoming\""));
        assert_eq!(serde_json::from_str::<CallReport>(&json).unwrap(), r);
    }
}
