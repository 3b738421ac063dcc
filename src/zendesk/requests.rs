//! Typed bodies of the writes Deskline makes (ZENDESK.md §3–§5, §7), so what we send is as checked
//! as what we read: a misspelt field or a wrong type is a compile error, not a silent 422.
//!
//! Each struct is the object *inside* Zendesk's envelope (`{"user": …}`, `{"ticket": …}`); the
//! client adds the envelope. Absent options are left out of the JSON (`skip_serializing_if`), never
//! sent as `null`, which Zendesk would read as "clear this field". Custom user and organization
//! fields are keyed by field **key**, ticket custom fields by numeric **id** (ZENDESK.md §5).
//!
//! A ticket create is serialized once into a [`TicketCreateJson`]: that text is persisted by the
//! sync worker and resent byte for byte under the same `Idempotency-Key` (Zendesk answers 400 to a
//! different body under a known key, ZENDESK.md §4).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// `user_fields` / `organization_fields`: field key → value. Deskline's mapped sources (UTM keys,
/// scheme name, line number, `extra` keys) are all text. Ordered, so the JSON is stable.
pub(crate) type FieldValues = BTreeMap<String, String>;

/// A user's role (ZENDESK.md §3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum Role {
    EndUser,
    Agent,
    Admin,
}

/// `POST /api/v2/users/create_or_update` `{"user": …}`. Zendesk matches on `external_id` (or email,
/// never phone), so the external id is mandatory here: without it a repeat would make a second user.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub(crate) struct UserCreate {
    pub name: String,
    /// E.164 (`+15551234567`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub phone: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<Role>,
    pub external_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub organization_id: Option<i64>,
    /// `true` suppresses the verification mail.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub skip_verify_email: Option<bool>,
    #[serde(skip_serializing_if = "FieldValues::is_empty")]
    pub user_fields: FieldValues,
}

/// `PUT /api/v2/users/{id}` `{"user": …}`: only the fields set here change.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub(crate) struct UserUpdate {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub phone: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub organization_id: Option<i64>,
    #[serde(skip_serializing_if = "FieldValues::is_empty")]
    pub user_fields: FieldValues,
}

/// `POST /api/v2/organizations/create_or_update` `{"organization": …}`. Zendesk matches on `id` or
/// `external_id`, never on the name (ZENDESK.md §5), so the external id is mandatory here.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub(crate) struct OrganizationCreate {
    /// Unique in the account: another organization's name is a 422 `DuplicateValue` on `name`.
    pub name: String,
    pub external_id: String,
    #[serde(skip_serializing_if = "FieldValues::is_empty")]
    pub organization_fields: FieldValues,
}

/// A comment added through the Tickets API: the first comment of a create, or one on an update
/// (ZENDESK.md §4, `TicketCommentObject`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Comment {
    pub body: String,
    /// `false`: an internal note.
    pub public: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub author_id: Option<i64>,
}

/// One ticket custom field, addressed by its numeric id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct CustomFieldValue {
    pub id: i64,
    pub value: String,
}

/// `POST /api/v2/tickets` `{"ticket": …}`. Also deserializable, only to check a persisted body
/// before it is resent (see [`TicketCreateJson::from_stored`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct TicketCreate {
    pub subject: String,
    /// The first comment: the call itself.
    pub comment: Comment,
    pub requester_id: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub organization_id: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub assignee_id: Option<i64>,
    /// `urgent|high|normal|low`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<String>,
    /// `problem|incident|question|task`.
    #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub custom_fields: Vec<CustomFieldValue>,
    /// Makes this a follow-up of a closed ticket.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub via_followup_source_id: Option<i64>,
}

/// A ticket create as the exact JSON text sent inside `{"ticket": …}`: built once from a
/// [`TicketCreate`], or read back from where it was persisted, and then sent as is.
///
/// Why text and not the struct: Zendesk compares a replayed body under the same `Idempotency-Key`
/// with the first one. Re-serializing could change the bytes (field order differs between this
/// struct and bodies persisted by earlier versions, which were built with `json!` and so have their
/// keys in alphabetical order); the stored text cannot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TicketCreateJson(String);

impl TicketCreateJson {
    pub(crate) fn new(ticket: &TicketCreate) -> Result<Self, serde_json::Error> {
        serde_json::to_string(ticket).map(Self)
    }

    /// Takes a persisted body back, unchanged. Refused when it is not a ticket create this version
    /// could have sent (a corrupt row): resending it would only earn a 400 or a wrong ticket.
    pub(crate) fn from_stored(text: String) -> Result<Self, serde_json::Error> {
        serde_json::from_str::<TicketCreate>(&text)?;
        Ok(Self(text))
    }

    /// The text to persist and to send.
    pub(crate) fn as_str(&self) -> &str {
        &self.0
    }
}

/// A call's direction (Talk Partner Edition).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum CallDirection {
    Inbound,
    Outbound,
}

/// `POST /api/v2/calls` `{"call": …}`: a Talk Partner Edition call record with every field of
/// ZENDESK.md §7 that a client may set (`id`, `account_id`, `created_at`, `updated_at` are
/// Zendesk's), plus `call_recording_consent`, which §7 lists among the documented values and
/// Zendesk's call reference lists as writable. The five mandatory fields are plain values; build
/// with [`CallCreate::new`] and set the rest. Times are ISO-8601 UTC, durations whole seconds.
/// `call_disposition` is a string in Zendesk's call reference; the types of
/// `recording_control_interactions` (a count here) and the `ivr_*` texts are UNVERIFIED.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(crate) struct CallCreate {
    /// The Zendesk Apps Framework app id of the integration.
    pub app_id: i64,
    pub from_line: String,
    pub to_line: String,
    pub call_started_at: String,
    pub direction: CallDirection,

    #[serde(skip_serializing_if = "Option::is_none")]
    pub ticket_id: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub end_user_id: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub organization_id: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub brand_id: Option<i64>,
    /// The agent who answered.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agent_id: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub from_line_nickname: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub to_line_nickname: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub call_ended_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duration: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dnis: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub phone_name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub call_type: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub end_user_location: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub callback: Option<bool>,
    /// `queue` or `web widget`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub callback_source: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub callback_number: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub wait_time: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub time_to_answer: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub queue_time: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exceeded_queue_time: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub queue_name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ivr_time_spent: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ivr_hops: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ivr_action: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ivr_routed_to: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ivr_destination_group_name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub talk_time: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hold_time: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub consultation_time: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub wrap_up_time: Option<u32>,
    /// `completed`, `abandoned_in_queue`, … (full list UNVERIFIED).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub completion_status: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub call_abandoned_position: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub customer_requested_voicemail: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub voicemail: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outside_business_hours: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub overflowed: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub overflowed_to: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub call_disposition: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub recording_url: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub recording_time: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub not_recording_time: Option<u32>,
    /// The account's consent setting for the line: `always|opt_in|opt_out|never`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub call_recording_consent: Option<String>,
    /// The caller's choice, e.g. `caller_opted_in`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub call_recording_consent_action: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub recording_control_interactions: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub transcript: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub external_id: Option<String>,
}

impl CallCreate {
    /// A call record with the mandatory fields and nothing else.
    pub(crate) fn new(
        app_id: i64,
        from_line: String,
        to_line: String,
        call_started_at: String,
        direction: CallDirection,
    ) -> Self {
        Self {
            app_id,
            from_line,
            to_line,
            call_started_at,
            direction,
            ticket_id: None,
            end_user_id: None,
            organization_id: None,
            brand_id: None,
            agent_id: None,
            from_line_nickname: None,
            to_line_nickname: None,
            call_ended_at: None,
            duration: None,
            dnis: None,
            phone_name: None,
            call_type: None,
            end_user_location: None,
            callback: None,
            callback_source: None,
            callback_number: None,
            wait_time: None,
            time_to_answer: None,
            queue_time: None,
            exceeded_queue_time: None,
            queue_name: None,
            ivr_time_spent: None,
            ivr_hops: None,
            ivr_action: None,
            ivr_routed_to: None,
            ivr_destination_group_name: None,
            talk_time: None,
            hold_time: None,
            consultation_time: None,
            wrap_up_time: None,
            completion_status: None,
            call_abandoned_position: None,
            customer_requested_voicemail: None,
            voicemail: None,
            outside_business_hours: None,
            overflowed: None,
            overflowed_to: None,
            call_disposition: None,
            recording_url: None,
            recording_time: None,
            not_recording_time: None,
            call_recording_consent: None,
            call_recording_consent_action: None,
            recording_control_interactions: None,
            transcript: None,
            external_id: None,
        }
    }
}

/// `PUT /api/v2/tickets/{id}` `{"ticket": …}`: a comment on an existing ticket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(crate) struct TicketUpdate {
    pub comment: Comment,
}
