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

/// A Zendesk user (end-user, agent or admin), as read from `users/show_many` and the user export.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct User {
    /// Zendesk user id.
    pub id: i64,
    /// API URL of the user record.
    pub url: Option<String>,
    /// Display name; `None` when Zendesk sends none.
    pub name: Option<String>,
    /// Primary email address, if any.
    pub email: Option<String>,
    /// Primary phone as typed in Zendesk (not normalized); `None` when unset.
    pub phone: Option<String>,
    /// Whether `phone` is shared with other users, so it does not identify this one alone.
    pub shared_phone_number: Option<bool>,
    /// `end-user`, `agent` or `admin`.
    pub role: Option<String>,
    /// The user's organization, if any.
    pub organization_id: Option<i64>,
    /// The id of the user in an external system, if set.
    pub external_id: Option<String>,
    /// `false` once the user is deleted.
    pub active: Option<bool>,
    /// `true` once the user is suspended; suspended users count as inactive.
    pub suspended: Option<bool>,
    /// `true` once the user's data is permanently deleted.
    pub permanently_deleted: Option<bool>,
    /// Creation time, ISO-8601 (see [`parse_time`]).
    pub created_at: Option<String>,
    /// Last update time, ISO-8601 (see [`parse_time`]).
    pub updated_at: Option<String>,
    /// Custom user fields by key; `None` in export pages (decoded lean).
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

/// A user identity (email, phone number, …) from `users/{id}/identities` or the `identities` sideload.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Identity {
    /// Identity id.
    pub id: i64,
    /// The user the identity belongs to.
    pub user_id: i64,
    /// `email`, `phone_number`, …
    #[serde(rename = "type")]
    pub kind: Option<String>,
    /// The address itself: an email, or a phone number as typed.
    pub value: Option<String>,
    /// Whether the user verified this identity.
    pub verified: Option<bool>,
    /// Whether this is the user's primary identity of its kind.
    pub primary: Option<bool>,
    /// Last update time, ISO-8601.
    pub updated_at: Option<String>,
}

impl Identity {
    pub(crate) fn is_phone(&self) -> bool {
        self.kind.as_deref() == Some("phone_number")
    }
}

/// One custom field value on a ticket (`custom_fields[]`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CustomField {
    /// The ticket field id (see [`crate::zendesk`] field definitions).
    pub id: i64,
    /// The value; `null` when unset, else a string, number, bool or list depending on the field type.
    #[serde(default)]
    pub value: Value,
}

/// A Zendesk ticket, as read from the API or the ticket export (decoded lean there).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Ticket {
    /// Ticket id.
    pub id: i64,
    /// API URL of the ticket.
    pub url: Option<String>,
    /// Subject line, if any.
    pub subject: Option<String>,
    /// `new|open|pending|hold|solved|closed`, and `deleted` in exports.
    pub status: Option<String>,
    /// `urgent|high|normal|low`, or `None` when unset.
    pub priority: Option<String>,
    /// `problem|incident|question|task`, or `None` when unset.
    #[serde(rename = "type")]
    pub kind: Option<String>,
    /// The end user the ticket is for.
    pub requester_id: Option<i64>,
    /// The user who submitted the ticket (can be an agent).
    pub submitter_id: Option<i64>,
    /// The assigned agent; `None` while unassigned.
    pub assignee_id: Option<i64>,
    /// The ticket's organization, if any.
    pub organization_id: Option<i64>,
    /// Creation time, ISO-8601.
    pub created_at: Option<String>,
    /// Last update time, ISO-8601.
    pub updated_at: Option<String>,
    /// Export rows only: the clock the ticket export runs on.
    pub generated_timestamp: Option<i64>,
    /// Custom field values; `None` in export pages (decoded lean).
    pub custom_fields: Option<Vec<CustomField>>,
    /// Tags; `None` in export pages (decoded lean).
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

/// A Zendesk organization.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Organization {
    /// Organization id.
    pub id: i64,
    /// API URL of the organization.
    pub url: Option<String>,
    /// Organization name, if any.
    pub name: Option<String>,
    /// The id of the organization in an external system, if set.
    pub external_id: Option<String>,
    /// Creation time, ISO-8601.
    pub created_at: Option<String>,
    /// Last update time, ISO-8601.
    pub updated_at: Option<String>,
    /// Set on organizations deleted since (organizations export).
    pub deleted_at: Option<String>,
    /// Custom organization fields by key, if any.
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
    /// The users on this page, in export order.
    #[serde(deserialize_with = "lean_users")]
    pub users: Vec<User>,
    /// Present only when the export honoured `include=identities` (unverified on real Zendesk).
    pub identities: Option<Vec<Identity>>,
    /// Cursor to resume the export after this page; kept as the follower's checkpoint.
    pub after_cursor: Option<String>,
    /// URL of the next page; `None` at the end of the stream.
    pub after_url: Option<String>,
    /// `true` when this page reaches the present: poll again later with `after_cursor`.
    pub end_of_stream: bool,
}

/// A page of `GET /api/v2/incremental/tickets/cursor`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct TicketsCursorPage {
    /// The tickets on this page (deleted ones have status `deleted`).
    #[serde(deserialize_with = "lean_tickets")]
    pub tickets: Vec<Ticket>,
    /// Cursor to resume the export after this page; kept as the follower's checkpoint.
    pub after_cursor: Option<String>,
    /// URL of the next page; `None` at the end of the stream.
    pub after_url: Option<String>,
    /// `true` when this page reaches the present: poll again later with `after_cursor`.
    pub end_of_stream: bool,
}

/// A page of `GET /api/v2/search/export` (ZENDESK.md §8): `results` of one type (each also carries
/// `result_type`, ignored here), `meta.has_more` and `meta.after_cursor` for the next page
/// (`page[after]`; the cursor expires an hour after it was issued), `links.next` the same as a URL.
#[derive(Debug, Clone, Deserialize)]
pub struct SearchExportPage<T> {
    /// The records of this page (up to `page[size]`).
    #[serde(default = "Vec::new")]
    pub results: Vec<T>,
    /// Whether there is a next page, and its cursor.
    #[serde(default)]
    pub meta: SearchExportMeta,
}

/// The `meta` object of a search-export page.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct SearchExportMeta {
    /// `true` while more pages follow.
    #[serde(default)]
    pub has_more: bool,
    /// The cursor for `page[after]`; expires an hour after it was issued.
    pub after_cursor: Option<String>,
}

/// A page of the time-based `GET /api/v2/incremental/organizations`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct OrganizationsPage {
    /// The organizations changed since the requested start time.
    pub organizations: Vec<Organization>,
    /// Number of organizations on this page.
    pub count: Option<i64>,
    /// URL of the next page (carries the next `start_time`).
    pub next_page: Option<String>,
    /// Unix seconds to start the next request at; the follower's checkpoint.
    pub end_time: Option<i64>,
    /// `true` when this page reaches the present.
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
