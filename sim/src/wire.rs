//! Zendesk's JSON wire types as this simulator understands them, written from ZENDESK.md (§2–§9) and
//! the recorded responses it cites, never from Deskline's client models.
//!
//! Why a second definition of the same shapes: the simulator exists to test a client. When both
//! sides share one struct, a field the client names wrongly is served wrongly too and every test
//! passes. Here the names, `null`s and nesting come from Zendesk's documentation alone, so a mistake
//! in the client shows up as a parse failure or a wrong value in a test.
//!
//! Two families of types live here:
//! - owned, tolerant `Serialize + Deserialize` objects ([`User`], [`Identity`], [`Ticket`],
//!   [`Organization`], [`Comment`], [`TicketField`], [`Error`]) and page envelopes
//!   ([`CursorPage`], [`TimePage`], [`OffsetPage`]): what [`crate::Store`]'s read methods return and
//!   what a test may parse a response into. Every field is optional or defaulted and unknown keys are
//!   ignored, as a response carries many more keys than a test reads.
//! - the time format: [`format_time`] / [`parse_time`] and the allocation-free [`Ts`].
//!
//! The served JSON of the big objects is written by the borrowed views in `render.rs` (an export page
//! of 1000 users must not clone 1000 users); a unit test checks that every served user, identity,
//! ticket, organization and comment parses into these types with the values the store reports.

use serde::{Deserialize, Serialize, Serializer};
use serde_json::{Map, Value};

// ---- time ----------------------------------------------------------------------------------------

/// Unix seconds written as Zendesk writes every timestamp: ISO-8601 UTC with a `Z` and no fraction
/// (`2024-05-01T10:00:00Z`, ZENDESK.md §1), without allocating.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ts(pub i64);

impl Ts {
    /// The 20 ASCII bytes of the timestamp. Years outside 0000–9999 are clamped.
    pub fn format(self) -> [u8; 20] {
        let secs = self.0;
        let days = secs.div_euclid(86_400);
        let sod = secs.rem_euclid(86_400);
        // Howard Hinnant's civil_from_days.
        let z = days + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z - era * 146_097;
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let d = doy - (153 * mp + 2) / 5 + 1;
        let m = if mp < 10 { mp + 3 } else { mp - 9 };
        let y = yoe + era * 400 + i64::from(m <= 2);
        let (h, mi, s) = (sod / 3600, sod % 3600 / 60, sod % 60);
        let mut b = *b"0000-00-00T00:00:00Z";
        let mut put = |at: usize, v: i64, n: usize| {
            let mut v = v.clamp(0, 9999);
            for i in (0..n).rev() {
                b[at + i] = b'0' + (v % 10) as u8;
                v /= 10;
            }
        };
        put(0, y, 4);
        put(5, m, 2);
        put(8, d, 2);
        put(11, h, 2);
        put(14, mi, 2);
        put(17, s, 2);
        b
    }
}

impl Serialize for Ts {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let b = self.format();
        s.serialize_str(std::str::from_utf8(&b).unwrap_or("1970-01-01T00:00:00Z"))
    }
}

/// Formats Unix seconds as Zendesk does: `2024-05-01T10:00:00Z`.
pub fn format_time(secs: i64) -> String {
    String::from_utf8_lossy(&Ts(secs).format()).into_owned()
}

/// Parses an ISO-8601 time with an offset (`…Z`, `…+01:00`, `…+01`, fractions allowed) to Unix
/// seconds. Zendesk accepts any offset on input and answers in UTC (the call API stored
/// `…15:31:40+01` as `…14:31:40Z`, ZENDESK.md §1).
pub fn parse_time(s: &str) -> Option<i64> {
    let s = s.trim();
    if let Ok(t) = s.parse::<jiff::Timestamp>() {
        return Some(t.as_second());
    }
    // An hours-only offset (`+01`), which the recorded call API accepted: widen it to `+01:00`.
    let (head, tail) = s.split_at(s.len().checked_sub(3)?);
    let sign = tail.as_bytes()[0];
    if (sign == b'+' || sign == b'-') && tail[1..].bytes().all(|b| b.is_ascii_digit()) {
        return format!("{head}{tail}:00")
            .parse::<jiff::Timestamp>()
            .ok()
            .map(|t| t.as_second());
    }
    None
}

// ---- users ---------------------------------------------------------------------------------------

/// A user as an admin sees it (ZENDESK.md §3). Deleted users: `active:false`,
/// `permanently_deleted:false`, `email:null`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct User {
    pub id: i64,
    pub url: Option<String>,
    pub name: Option<String>,
    pub email: Option<String>,
    pub phone: Option<String>,
    /// `true` when the number is shared by several users (no identity then); `null` without phone.
    pub shared_phone_number: Option<bool>,
    /// `end-user`, `agent` or `admin`.
    pub role: Option<String>,
    /// The default organization when the user has several memberships.
    pub organization_id: Option<i64>,
    /// Compared case-insensitively by Zendesk.
    pub external_id: Option<String>,
    pub active: Option<bool>,
    pub suspended: Option<bool>,
    pub verified: Option<bool>,
    /// Only on deleted users in the recordings.
    pub permanently_deleted: Option<bool>,
    pub tags: Option<Vec<String>>,
    pub time_zone: Option<String>,
    pub iana_time_zone: Option<String>,
    pub locale: Option<String>,
    pub created_at: Option<String>,
    pub updated_at: Option<String>,
    /// Keyed by the custom field's **key**; every defined key is present, `null` when unset.
    pub user_fields: Option<Map<String, Value>>,
}

impl User {
    /// Not deleted and not suspended.
    pub fn is_active(&self) -> bool {
        self.active.unwrap_or(true) && !self.suspended.unwrap_or(false)
    }
    /// Agents and admins.
    pub fn is_agent(&self) -> bool {
        matches!(self.role.as_deref(), Some("agent" | "admin"))
    }
    pub fn is_end_user(&self) -> bool {
        matches!(self.role.as_deref(), Some("end-user") | None)
    }
}

/// A user identity (ZENDESK.md §3): `type` is `email`, `phone_number`, `twitter`, …
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Identity {
    pub id: i64,
    pub url: Option<String>,
    pub user_id: i64,
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub value: Option<String>,
    pub verified: Option<bool>,
    /// Settable only at creation; later through `make_primary`.
    pub primary: Option<bool>,
    pub created_at: Option<String>,
    pub updated_at: Option<String>,
}

impl Identity {
    pub fn is_phone(&self) -> bool {
        self.kind.as_deref() == Some("phone_number")
    }
}

// ---- tickets -------------------------------------------------------------------------------------

/// One entry of a ticket's `custom_fields` (and its duplicate `fields`): keyed by numeric field id.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CustomField {
    pub id: i64,
    #[serde(default)]
    pub value: Value,
}

/// `via: {channel, source: {from, to, rel}}`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Via {
    pub channel: Option<String>,
    pub source: Option<Value>,
}

/// A ticket (ZENDESK.md §4). `status` is `new|open|pending|hold|solved|closed`, plus `deleted` in
/// exports; export rows add `generated_timestamp`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Ticket {
    pub id: i64,
    pub url: Option<String>,
    pub external_id: Option<String>,
    pub via: Option<Via>,
    pub subject: Option<String>,
    pub raw_subject: Option<String>,
    /// The first comment, read-only.
    pub description: Option<String>,
    pub status: Option<String>,
    /// `urgent|high|normal|low`.
    pub priority: Option<String>,
    /// `problem|incident|question|task`.
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub requester_id: Option<i64>,
    pub submitter_id: Option<i64>,
    pub assignee_id: Option<i64>,
    pub organization_id: Option<i64>,
    pub group_id: Option<i64>,
    pub is_public: Option<bool>,
    pub custom_status_id: Option<i64>,
    pub tags: Option<Vec<String>>,
    pub custom_fields: Option<Vec<CustomField>>,
    pub created_at: Option<String>,
    pub updated_at: Option<String>,
    /// Export rows only: the clock the ticket export runs on (Unix seconds).
    pub generated_timestamp: Option<i64>,
}

impl Ticket {
    /// `new`, `open`, `pending` and `hold`.
    pub fn is_open(&self) -> bool {
        matches!(
            self.status.as_deref(),
            Some("new" | "open" | "pending" | "hold")
        )
    }
}

/// A ticket comment (`GET /api/v2/tickets/{id}/comments`; `public:false` is an internal note).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Comment {
    pub id: i64,
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub author_id: Option<i64>,
    pub body: Option<String>,
    pub html_body: Option<String>,
    pub plain_body: Option<String>,
    pub public: Option<bool>,
    pub created_at: Option<String>,
}

// ---- organizations -------------------------------------------------------------------------------

/// An organization (ZENDESK.md §5). `deleted_at` appears on organizations-export rows of deleted
/// organizations.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Organization {
    pub id: i64,
    pub url: Option<String>,
    /// Unique, required.
    pub name: Option<String>,
    pub external_id: Option<String>,
    pub tags: Option<Vec<String>>,
    pub created_at: Option<String>,
    pub updated_at: Option<String>,
    pub deleted_at: Option<String>,
    /// Keyed by field **key**, like `user_fields`.
    pub organization_fields: Option<Map<String, Value>>,
}

// ---- field definitions ---------------------------------------------------------------------------

/// `{name, value}` of a system field's fixed choices (`status`, `tickettype`, `priority`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FieldOption {
    pub name: String,
    pub value: String,
}

/// A field definition from `ticket_fields`, `user_fields` or `organization_fields`. Ticket fields
/// are addressed by `id` and include the system fields (`type` `subject`, `description`, `status`,
/// `tickettype`, `priority`, `group`, `assignee`, `custom_status`); user and organization fields by
/// `key`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TicketField {
    pub id: i64,
    pub url: Option<String>,
    /// `text`, `tagger`, … for custom fields; the system field's own name for system fields.
    #[serde(rename = "type")]
    pub kind: Option<String>,
    /// User and organization fields only.
    pub key: Option<String>,
    pub title: Option<String>,
    pub description: Option<String>,
    pub position: Option<i64>,
    pub active: Option<bool>,
    pub required: Option<bool>,
    /// `false` on system fields, which cannot be deleted.
    pub removable: Option<bool>,
    /// System fields with fixed choices only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub system_field_options: Option<Vec<FieldOption>>,
    pub created_at: Option<String>,
    pub updated_at: Option<String>,
}

// ---- errors --------------------------------------------------------------------------------------

/// One entry under `details.<field>` of a 422.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ErrorDetail {
    pub description: String,
    /// The machine code (`DuplicateValue`, `InvalidValue`, `BlankValue`); the recorded "closed
    /// ticket" refusal has none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Zendesk's usual error body (ZENDESK.md §9):
/// `{"error":"RecordInvalid","description":"…","details":{"email":[{"description","error"}]}}`.
/// Some errors carry only `error` (401 `Couldn't authenticate you`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Error {
    pub error: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub details: Option<Map<String, Value>>,
    /// `TooManyValues` says how many values were allowed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_count: Option<u32>,
}

impl Error {
    pub fn new(error: &str, description: &str) -> Self {
        Error {
            error: error.into(),
            description: Some(description.into()),
            ..Error::default()
        }
    }
    /// A 422 `RecordInvalid` with one detail. `code: None` gives the detail without `error`.
    pub fn record_invalid(field: &str, code: Option<&str>, description: &str) -> Self {
        let detail = ErrorDetail {
            description: description.into(),
            error: code.map(Into::into),
        };
        let mut details = Map::new();
        details.insert(
            field.into(),
            Value::Array(vec![serde_json::to_value(detail).unwrap_or_default()]),
        );
        Error {
            error: "RecordInvalid".into(),
            description: Some("Record validation errors".into()),
            details: Some(details),
            max_count: None,
        }
    }
}

// ---- page envelopes ------------------------------------------------------------------------------

/// A cursor-export page (`incremental/users/cursor`, `incremental/tickets/cursor`). `R` holds the
/// records under their key (`{"users":[…]}`, flattened in). A page with `end_of_stream:true` still
/// carries the cursor to resume from on the next poll (ZENDESK.md §2).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CursorPage<R> {
    /// The records under their key, plus `identities` when the users export honoured
    /// `include=identities` (UNVERIFIED on real Zendesk).
    #[serde(flatten)]
    pub records: R,
    #[serde(default)]
    pub after_url: Option<String>,
    #[serde(default)]
    pub after_cursor: Option<String>,
    #[serde(default)]
    pub before_url: Option<String>,
    #[serde(default)]
    pub before_cursor: Option<String>,
    #[serde(default)]
    pub end_of_stream: bool,
}

/// A time-based export page (`incremental/organizations`): feed `end_time` into the next call and
/// stop when `end_of_stream`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TimePage<R> {
    #[serde(flatten)]
    pub records: R,
    #[serde(default)]
    pub count: usize,
    #[serde(default)]
    pub next_page: Option<String>,
    #[serde(default)]
    pub end_of_stream: bool,
    #[serde(default)]
    pub end_time: i64,
}

/// An offset-paginated list (`page`/`per_page`): ordinary lists, `show_many`, search.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct OffsetPage<R> {
    #[serde(flatten)]
    pub records: R,
    #[serde(default)]
    pub next_page: Option<String>,
    #[serde(default)]
    pub previous_page: Option<String>,
    #[serde(default)]
    pub count: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ts_formats_like_jiff() {
        for s in [0, 1_714_557_600, 1_709_251_199, 951_782_400, 4_102_444_799] {
            let want = jiff::Timestamp::from_second(s)
                .unwrap()
                .strftime("%Y-%m-%dT%H:%M:%SZ")
                .to_string();
            assert_eq!(format_time(s), want);
        }
    }

    #[test]
    fn times_parse_with_any_offset() {
        assert_eq!(parse_time("2024-05-01T10:00:00Z"), Some(1_714_557_600));
        assert_eq!(parse_time("2024-05-01T11:00:00+01:00"), Some(1_714_557_600));
        // The recorded call API accepted an hours-only offset.
        assert_eq!(parse_time("2024-05-01T11:00:00+01"), Some(1_714_557_600));
        assert_eq!(parse_time("2024-05-01T09:00:00-01"), Some(1_714_557_600));
        assert_eq!(parse_time("2024-05-01T10:00:00.250Z"), Some(1_714_557_600));
        for bad in ["garbage", "", "2024-05-01", "2024-05-01T10:00:00"] {
            assert_eq!(parse_time(bad), None, "{bad}");
        }
    }

    #[test]
    fn error_bodies_have_zendesk_shape() {
        let e = Error::record_invalid("email", Some("DuplicateValue"), "Email: x is taken");
        assert_eq!(
            serde_json::to_value(&e).unwrap(),
            serde_json::json!({"error":"RecordInvalid","description":"Record validation errors",
                "details":{"email":[{"description":"Email: x is taken","error":"DuplicateValue"}]}})
        );
        let closed = Error::record_invalid("status", None, "Status closed prevents ticket update");
        assert_eq!(
            serde_json::to_value(&closed).unwrap()["details"]["status"][0],
            serde_json::json!({"description":"Status closed prevents ticket update"})
        );
        let nf = Error::new("RecordNotFound", "Not found");
        assert_eq!(
            serde_json::to_value(&nf).unwrap(),
            serde_json::json!({"error":"RecordNotFound","description":"Not found"})
        );
    }

    #[test]
    fn recorded_export_page_parses() {
        #[derive(Deserialize, Default)]
        struct Users {
            users: Vec<User>,
        }
        let p: CursorPage<Users> = serde_json::from_str(
            r#"{ "users": [ { "id": 611, "active": false, "permanently_deleted": false, "phone": null } ],
  "after_url": "https://x.zendesk.com/api/v2/incremental/users/cursor.json?cursor=MTY5&per_page=1",
  "before_url": null, "after_cursor": "MTY5", "before_cursor": null, "end_of_stream": false }"#,
        )
        .unwrap();
        assert_eq!(p.records.users[0].id, 611);
        assert!(!p.records.users[0].is_active());
        assert_eq!(p.after_cursor.as_deref(), Some("MTY5"));
        assert!(!p.end_of_stream);
        #[derive(Deserialize, Default)]
        struct Orgs {
            organizations: Vec<Organization>,
        }
        let t: TimePage<Orgs> = serde_json::from_str(
            r#"{ "organizations": [ { "id": 41, "name": "Acme", "external_id": null, "organization_fields": {} } ],
  "count": 1, "next_page": "https://x.zendesk.com/api/v2/incremental/organizations.json?start_time=1601357503",
  "end_of_stream": true, "end_time": 1601357503 }"#,
        )
        .unwrap();
        assert_eq!(t.records.organizations[0].name.as_deref(), Some("Acme"));
        assert!(t.end_of_stream && t.end_time == 1_601_357_503 && t.count == 1);
    }
}
