//! Webhook bodies to changes: Zendesk's event-subscription schema and Deskline's trigger template.
//!
//! Event subscriptions (`{"type":"zen:event-type:…","id","time","subject","detail","event"}`)
//! carry ids as strings (`"organization_id":"0"` for none) and upper-case enums
//! (`"status":"OPEN"`); parsing accepts strings, numbers and `null` for every id so a schema
//! version change does not turn into dropped events. A ticket event's `detail` is the ticket's
//! whole state after the change, so it is applied as is. A user event's `detail` has no name, phone
//! or suspension flag, so it only says *which* user to re-read. The trigger template (see
//! [`TRIGGER_TEMPLATE`]) names only the ticket: placeholders render localised, unescaped text, so
//! Deskline re-reads the ticket rather than trusting them.
//!
//! Parsing never panics (a proptest feeds it arbitrary bytes) and reads nothing it does not need.

use serde::Deserialize;
use serde_json::Value;

use crate::zendesk::models::Ticket;

/// The JSON body of the trigger variant (`deskline webhooks install --trigger`): Zendesk renders
/// `{{ticket.id}}` as digits.
pub(crate) const TRIGGER_TEMPLATE: &str = r#"{"deskline_ticket_id": "{{ticket.id}}"}"#;

/// What one webhook request asks of the index.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Change {
    /// A ticket's full state from an event's `detail` (status `deleted` for a deletion).
    Ticket(Box<Ticket>),
    /// Only the ticket's id is known: read it from Zendesk.
    FetchTicket(i64),
    /// A user event: read the user and its identities from Zendesk (covers created, suspended,
    /// role, identity created/changed/removed, deleted, merged).
    FetchUser(i64),
    /// A well-formed event Deskline does not use (organizations, comments…).
    Ignored,
}

/// A parsed body: the change and the event's own id (deduplicated as the invocation id is).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Parsed {
    pub event_id: Option<String>,
    /// The event type, for logs (`zen:event-type:…`, or `trigger`).
    pub kind: String,
    pub change: Change,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum ParseError {
    #[error("not a JSON object")]
    NotJson,
    #[error("neither an event (`type`) nor Deskline's trigger body")]
    UnknownShape,
    #[error("no usable id in the event")]
    NoId,
}

#[derive(Deserialize)]
struct Envelope {
    #[serde(rename = "type")]
    kind: Option<String>,
    id: Option<Value>,
    subject: Option<String>,
    detail: Option<Value>,
    deskline_ticket_id: Option<Value>,
}

/// An id as Zendesk may send it: `"123"`, `123`; `"0"`, `0`, `""` and `null` mean none.
fn id_of(v: Option<&Value>) -> Option<i64> {
    let id = match v? {
        Value::String(s) => s.trim().parse::<i64>().ok()?,
        Value::Number(n) => n.as_i64()?,
        _ => return None,
    };
    (id > 0).then_some(id)
}

fn str_of(v: Option<&Value>) -> Option<String> {
    v?.as_str().map(str::to_owned)
}

/// The id at the end of `zen:ticket:123` / `zen:user:123`.
fn subject_id(subject: Option<&str>, kind: &str) -> Option<i64> {
    let rest = subject?.strip_prefix("zen:")?.strip_prefix(kind)?;
    rest.strip_prefix(':')?.parse().ok().filter(|id| *id > 0)
}

pub(crate) fn parse(body: &[u8]) -> Result<Parsed, ParseError> {
    let env: Envelope = serde_json::from_slice(body).map_err(|_| ParseError::NotJson)?;
    if let Some(v) = &env.deskline_ticket_id {
        let id = id_of(Some(v)).ok_or(ParseError::NoId)?;
        return Ok(Parsed {
            event_id: None,
            kind: "trigger".into(),
            change: Change::FetchTicket(id),
        });
    }
    let kind = env.kind.ok_or(ParseError::UnknownShape)?;
    let event_id = env.id.as_ref().and_then(|v| match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    });
    let short = kind.strip_prefix("zen:event-type:").unwrap_or(&kind);
    let detail = env.detail.as_ref().filter(|d| d.is_object());
    let change = if short.starts_with("ticket.") {
        let id = id_of(detail.and_then(|d| d.get("id")))
            .or_else(|| subject_id(env.subject.as_deref(), "ticket"))
            .ok_or(ParseError::NoId)?;
        match detail.and_then(|d| ticket_of(id, d, short)) {
            Some(t) => Change::Ticket(Box::new(t)),
            None => Change::FetchTicket(id),
        }
    } else if short.starts_with("user.") {
        let id = id_of(detail.and_then(|d| d.get("id")))
            .or_else(|| subject_id(env.subject.as_deref(), "user"))
            .ok_or(ParseError::NoId)?;
        Change::FetchUser(id)
    } else {
        Change::Ignored
    };
    Ok(Parsed {
        event_id,
        kind,
        change,
    })
}

/// The ticket's state from `detail`, or `None` when a field the index needs is missing.
fn ticket_of(id: i64, d: &Value, short: &str) -> Option<Ticket> {
    let deleted = matches!(short, "ticket.soft_deleted" | "ticket.permanently_deleted");
    let status = if deleted {
        "deleted".to_owned()
    } else {
        str_of(d.get("status"))?.to_ascii_lowercase()
    };
    let updated_at = str_of(d.get("updated_at"))?;
    crate::zendesk::models::parse_time(&updated_at)?;
    Some(Ticket {
        id,
        subject: str_of(d.get("subject")),
        status: Some(status),
        requester_id: id_of(d.get("requester_id")),
        assignee_id: id_of(d.get("assignee_id")),
        organization_id: id_of(d.get("organization_id")),
        updated_at: Some(updated_at),
        ..Ticket::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn ticket_event_with_string_ids() {
        let body = br#"{"type":"zen:event-type:ticket.agent_assignment_changed","account_id":1,
            "id":"5e1b-77aa","time":"2024-05-01T10:00:01Z","zendesk_event_version":"2022-11-06",
            "subject":"zen:ticket:35436","detail":{"id":"35436","assignee_id":"42",
            "requester_id":"9001","organization_id":null,"status":"OPEN","subject":"Hi",
            "updated_at":"2024-05-01T10:00:00Z"},"event":{"current":"42","previous":null}}"#;
        let p = parse(body).unwrap();
        assert_eq!(p.event_id.as_deref(), Some("5e1b-77aa"));
        let Change::Ticket(t) = p.change else {
            panic!("{p:?}")
        };
        assert_eq!(
            (t.id, t.assignee_id, t.requester_id),
            (35436, Some(42), Some(9001))
        );
        assert_eq!(
            (t.status.as_deref(), t.organization_id),
            (Some("open"), None)
        );
    }

    #[test]
    fn deletions_users_triggers_and_others() {
        let del = br#"{"type":"zen:event-type:ticket.soft_deleted","subject":"zen:ticket:7",
            "detail":{"id":"7","status":"OPEN","updated_at":"2024-05-01T10:00:00Z"}}"#;
        let Change::Ticket(t) = parse(del).unwrap().change else {
            panic!()
        };
        assert_eq!(t.status.as_deref(), Some("deleted"));
        let user = br#"{"type":"zen:event-type:user.identity_created","subject":"zen:user:8",
            "detail":{"id":"8","role":"end-user"}}"#;
        assert_eq!(parse(user).unwrap().change, Change::FetchUser(8));
        let sparse = br#"{"type":"zen:event-type:ticket.created","subject":"zen:ticket:9"}"#;
        assert_eq!(parse(sparse).unwrap().change, Change::FetchTicket(9));
        let trig = br#"{"deskline_ticket_id": "12"}"#;
        assert_eq!(parse(trig).unwrap().change, Change::FetchTicket(12));
        let org = br#"{"type":"zen:event-type:organization.created","detail":{"id":"1"}}"#;
        assert_eq!(parse(org).unwrap().change, Change::Ignored);
        assert_eq!(parse(b"[1]"), Err(ParseError::NotJson));
        assert_eq!(parse(b"{}"), Err(ParseError::UnknownShape));
        assert_eq!(
            parse(br#"{"type":"zen:event-type:user.created","detail":{"id":"0"}}"#),
            Err(ParseError::NoId)
        );
    }

    proptest! {
        #[test]
        fn never_panics_on_bytes(body in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = parse(&body);
        }

        #[test]
        fn never_panics_on_event_like_json(kind in "[a-z:._-]{0,40}", id in any::<i64>(),
                                           status in "[A-Za-z]{0,8}", ts in ".{0,30}") {
            let body = serde_json::json!({"type": kind, "subject": format!("zen:ticket:{id}"),
                "detail": {"id": id.to_string(), "status": status, "updated_at": ts}});
            let _ = parse(body.to_string().as_bytes());
        }
    }
}
