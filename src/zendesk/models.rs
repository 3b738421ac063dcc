//! Serde models of the Zendesk objects Deskline reads and writes (ZENDESK.md §2–§5, §7).
//!
//! Parsing is tolerant on purpose: every field is optional or defaulted, unknown fields are ignored,
//! and `null` is accepted wherever Zendesk may send it, so a new field or a sparse record never stops
//! the export follower. Timestamps stay strings here; [`parse_time`] turns them into Unix seconds.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Parses a Zendesk ISO-8601 timestamp (`2024-05-01T10:00:00Z`) to Unix seconds.
pub fn parse_time(s: &str) -> Option<i64> {
    s.parse::<jiff::Timestamp>().ok().map(|t| t.as_second())
}

/// Formats Unix seconds the way Zendesk does (`2024-05-01T10:00:00Z`).
pub(crate) fn format_time(secs: i64) -> String {
    jiff::Timestamp::from_second(secs)
        .map(|t| t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string())
        .unwrap_or_default()
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct User {
    pub id: i64,
    pub url: Option<String>,
    pub name: Option<String>,
    pub email: Option<String>,
    pub phone: Option<String>,
    pub shared_phone_number: Option<bool>,
    /// `end-user`, `agent` or `admin`.
    pub role: Option<String>,
    pub organization_id: Option<i64>,
    pub external_id: Option<String>,
    /// `false` once the user is deleted.
    pub active: Option<bool>,
    pub suspended: Option<bool>,
    pub permanently_deleted: Option<bool>,
    pub created_at: Option<String>,
    pub updated_at: Option<String>,
    pub user_fields: Option<Map<String, Value>>,
}

impl User {
    pub(crate) fn is_active(&self) -> bool {
        self.active.unwrap_or(true) && !self.suspended.unwrap_or(false)
    }
    pub(crate) fn is_agent(&self) -> bool {
        matches!(self.role.as_deref(), Some("agent") | Some("admin"))
    }
    pub(crate) fn is_end_user(&self) -> bool {
        matches!(self.role.as_deref(), Some("end-user") | None)
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Identity {
    pub id: i64,
    pub user_id: i64,
    /// `email`, `phone_number`, …
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub value: Option<String>,
    pub verified: Option<bool>,
    pub primary: Option<bool>,
    pub updated_at: Option<String>,
}

impl Identity {
    pub(crate) fn is_phone(&self) -> bool {
        self.kind.as_deref() == Some("phone_number")
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CustomField {
    pub id: i64,
    #[serde(default)]
    pub value: Value,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Ticket {
    pub id: i64,
    pub url: Option<String>,
    pub subject: Option<String>,
    /// `new|open|pending|hold|solved|closed`, and `deleted` in exports.
    pub status: Option<String>,
    pub priority: Option<String>,
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub requester_id: Option<i64>,
    pub submitter_id: Option<i64>,
    pub assignee_id: Option<i64>,
    pub organization_id: Option<i64>,
    pub created_at: Option<String>,
    pub updated_at: Option<String>,
    /// Export rows only: the clock the ticket export runs on.
    pub generated_timestamp: Option<i64>,
    pub custom_fields: Option<Vec<CustomField>>,
    pub tags: Option<Vec<String>>,
}

impl Ticket {
    /// `new`, `open`, `pending` and `hold` count as open (DESIGN §3 rule 3).
    pub(crate) fn is_open(&self) -> bool {
        matches!(
            self.status.as_deref(),
            Some("new" | "open" | "pending" | "hold")
        )
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Organization {
    pub id: i64,
    pub url: Option<String>,
    pub name: Option<String>,
    pub external_id: Option<String>,
    pub created_at: Option<String>,
    pub updated_at: Option<String>,
    /// Set on organizations deleted since (organizations export).
    pub deleted_at: Option<String>,
    pub organization_fields: Option<Map<String, Value>>,
}

/// The fields of an exported user that the index reads. Export rows carry many more (user fields,
/// URLs, locale, tags…); decoding those into the full [`User`] allocated for each of them and was
/// most of the warm-up's cost, so export pages decode only these and leave the rest `None`.
#[derive(Deserialize)]
#[serde(default)]
#[derive(Default)]
struct ExportUser {
    id: i64,
    name: Option<String>,
    email: Option<String>,
    phone: Option<String>,
    role: Option<String>,
    organization_id: Option<i64>,
    active: Option<bool>,
    suspended: Option<bool>,
    updated_at: Option<String>,
}

fn lean_users<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<User>, D::Error> {
    let rows: Vec<ExportUser> = Deserialize::deserialize(d)?;
    Ok(rows
        .into_iter()
        .map(|u| User {
            id: u.id,
            name: u.name,
            email: u.email,
            phone: u.phone,
            role: u.role,
            organization_id: u.organization_id,
            active: u.active,
            suspended: u.suspended,
            updated_at: u.updated_at,
            ..User::default()
        })
        .collect())
}

/// The fields of an exported ticket that the index reads (see [`ExportUser`]).
#[derive(Deserialize, Default)]
#[serde(default)]
struct ExportTicket {
    id: i64,
    subject: Option<String>,
    status: Option<String>,
    requester_id: Option<i64>,
    assignee_id: Option<i64>,
    organization_id: Option<i64>,
    updated_at: Option<String>,
    generated_timestamp: Option<i64>,
}

fn lean_tickets<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<Ticket>, D::Error> {
    let rows: Vec<ExportTicket> = Deserialize::deserialize(d)?;
    Ok(rows
        .into_iter()
        .map(|t| Ticket {
            id: t.id,
            subject: t.subject,
            status: t.status,
            requester_id: t.requester_id,
            assignee_id: t.assignee_id,
            organization_id: t.organization_id,
            updated_at: t.updated_at,
            generated_timestamp: t.generated_timestamp,
            ..Ticket::default()
        })
        .collect())
}

/// A page of `GET /api/v2/incremental/users/cursor` (users decoded lean: see [`ExportUser`]).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct UsersCursorPage {
    #[serde(deserialize_with = "lean_users")]
    pub users: Vec<User>,
    /// Present only when the export honoured `include=identities` (unverified on real Zendesk).
    pub identities: Option<Vec<Identity>>,
    pub after_cursor: Option<String>,
    pub after_url: Option<String>,
    pub end_of_stream: bool,
}

/// A page of `GET /api/v2/incremental/tickets/cursor`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct TicketsCursorPage {
    #[serde(deserialize_with = "lean_tickets")]
    pub tickets: Vec<Ticket>,
    pub after_cursor: Option<String>,
    pub after_url: Option<String>,
    pub end_of_stream: bool,
}

/// A page of `GET /api/v2/search/export` (ZENDESK.md §8): `results` of one type (each also carries
/// `result_type`, ignored here), `meta.has_more` and `meta.after_cursor` for the next page
/// (`page[after]`; the cursor expires an hour after it was issued), `links.next` the same as a URL.
#[derive(Debug, Clone, Deserialize)]
pub struct SearchExportPage<T> {
    #[serde(default = "Vec::new")]
    pub results: Vec<T>,
    #[serde(default)]
    pub meta: SearchExportMeta,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct SearchExportMeta {
    #[serde(default)]
    pub has_more: bool,
    pub after_cursor: Option<String>,
}

/// A page of the time-based `GET /api/v2/incremental/organizations`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct OrganizationsPage {
    pub organizations: Vec<Organization>,
    pub count: Option<i64>,
    pub next_page: Option<String>,
    pub end_time: Option<i64>,
    pub end_of_stream: bool,
}

/// `users/show_many?ids=…&include=identities`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub(crate) struct UsersWithIdentities {
    pub users: Vec<User>,
    /// `None` when the answer has no `identities` key: the sideload was not honoured, which says
    /// nothing about the users' identities (not the same as an empty list).
    pub identities: Option<Vec<Identity>>,
}

/// A ticket comment (`GET /api/v2/tickets/{id}/comments`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub(crate) struct Comment {
    pub id: i64,
    pub body: Option<String>,
    pub html_body: Option<String>,
    pub plain_body: Option<String>,
    pub public: Option<bool>,
    pub author_id: Option<i64>,
    pub created_at: Option<String>,
}

/// A Talk Partner Edition call record as Zendesk returns it (`{"call": …}`, ZENDESK.md §7); only
/// the fields Deskline reads.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub(crate) struct Call {
    pub id: i64,
    pub ticket_id: Option<i64>,
    pub end_user_id: Option<i64>,
    pub agent_id: Option<i64>,
    pub created_at: Option<String>,
}

/// A custom field definition (`ticket_fields`, `user_fields`, `organization_fields`).
/// Ticket fields are addressed by `id`; user and organization fields by `key`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub(crate) struct FieldDef {
    pub id: i64,
    pub key: Option<String>,
    pub title: Option<String>,
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub active: Option<bool>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tolerant_user_parsing() {
        let u: User = serde_json::from_str(
            r#"{"id":611,"active":false,"permanently_deleted":false,"phone":null,"email":null,
                "name":null,"brand_new_field":{"x":1},"suspended":null}"#,
        )
        .unwrap();
        assert_eq!(u.id, 611);
        assert!(!u.is_active());
        assert!(u.is_end_user());
    }

    #[test]
    fn times_round_trip() {
        assert_eq!(parse_time("2024-05-01T10:00:00Z"), Some(1_714_557_600));
        assert_eq!(format_time(1_714_557_600), "2024-05-01T10:00:00Z");
        assert_eq!(parse_time("garbage"), None);
    }

    #[test]
    fn export_page_with_unknown_keys() {
        let p: UsersCursorPage = serde_json::from_str(
            r#"{"users":[{"id":1,"role":"agent"}],"after_url":null,"before_url":null,
                "after_cursor":"MTY5","before_cursor":null,"end_of_stream":true}"#,
        )
        .unwrap();
        assert!(p.end_of_stream && p.identities.is_none());
        assert_eq!(p.after_cursor.as_deref(), Some("MTY5"));
        assert!(p.users[0].is_agent());
    }
}
