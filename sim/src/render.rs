//! The served JSON of the API objects, as borrowed `Serialize` views over the store's records
//! (the owned types a reader parses them into are in `wire.rs`).
//!
//! Every field a real Zendesk object carries is written, `null`s included (ZENDESK.md §3–§5 and the
//! recorded responses), so clients are tested against the full shape and not a convenient subset.
//! Views borrow from the store and are serialized while the read lock is held; nothing is cloned,
//! which keeps a 1000-record export page within a few milliseconds.

use serde::Serialize;
use serde::ser::{SerializeMap, SerializeSeq, Serializer};
use serde_json::Value;

use crate::store::{
    self, CommentRec, IdentView, OrgRec, TicketRec, UserRec, priority_str, type_str,
};
pub(crate) use crate::wire::Ts;

fn opt_id(v: i64) -> Option<i64> {
    (v != 0).then_some(v)
}

/// A `user` object. Deleted users show `active:false`, `permanently_deleted:false`, `email:null`.
#[derive(Serialize)]
pub(crate) struct UserOut<'a> {
    id: i64,
    url: String,
    name: &'a str,
    email: Option<&'a str>,
    created_at: Ts,
    updated_at: Ts,
    time_zone: &'static str,
    iana_time_zone: &'static str,
    phone: Option<&'a str>,
    shared_phone_number: Option<bool>,
    photo: Option<()>,
    locale_id: i64,
    locale: &'static str,
    organization_id: Option<i64>,
    role: &'static str,
    verified: bool,
    external_id: Option<&'a str>,
    tags: Tags<'a>,
    alias: Option<()>,
    active: bool,
    shared: bool,
    shared_agent: bool,
    last_login_at: Option<Ts>,
    two_factor_auth_enabled: Option<bool>,
    signature: Option<()>,
    details: Option<()>,
    notes: Option<()>,
    role_type: Option<i64>,
    custom_role_id: Option<i64>,
    moderator: bool,
    ticket_restriction: Option<&'static str>,
    only_private_comments: bool,
    restricted_agent: bool,
    suspended: bool,
    default_group_id: Option<i64>,
    report_csv: bool,
    user_fields: FieldsOut<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    permanently_deleted: Option<bool>,
}

impl<'a> UserOut<'a> {
    pub(crate) fn new(base: &str, u: &'a UserRec) -> Self {
        let staff = u.role.is_staff();
        let extra = u.extra.as_deref();
        UserOut {
            id: u.id,
            url: format!("{base}/api/v2/users/{}.json", u.id),
            name: &u.name,
            email: u.email.as_deref().filter(|_| u.active),
            created_at: Ts(u.created_at),
            updated_at: Ts(u.updated_at),
            time_zone: store::TIME_ZONE.0,
            iana_time_zone: store::TIME_ZONE.1,
            phone: u.phone.as_deref(),
            shared_phone_number: u.phone.as_ref().map(|_| u.shared_phone),
            photo: None,
            locale_id: 1,
            locale: store::LOCALE,
            organization_id: opt_id(u.organization_id),
            role: u.role.as_str(),
            verified: u.email.is_some(),
            external_id: extra.and_then(|e| e.external_id.as_deref()),
            tags: Tags(extra.map(|e| &e.tags[..]).unwrap_or(&[])),
            alias: None,
            active: u.active,
            shared: false,
            shared_agent: false,
            last_login_at: staff.then_some(Ts(u.updated_at)),
            two_factor_auth_enabled: None,
            signature: None,
            details: None,
            notes: None,
            role_type: None,
            custom_role_id: None,
            moderator: u.role == store::Role::Admin,
            ticket_restriction: (!staff).then_some("requested"),
            only_private_comments: false,
            restricted_agent: !staff,
            suspended: u.suspended,
            default_group_id: staff.then_some(store::GROUP_ID),
            report_csv: u.role == store::Role::Admin,
            user_fields: FieldsOut(
                &store::USER_FIELDS,
                extra.map(|e| &e.user_fields[..]).unwrap_or(&[]),
            ),
            permanently_deleted: (!u.active).then_some(false),
        }
    }
}

pub(crate) struct Tags<'a>(&'a [Box<str>]);

impl Serialize for Tags<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(self.0.len()))?;
        for t in self.0 {
            seq.serialize_element(&**t)?;
        }
        seq.end()
    }
}

/// `user_fields` / `organization_fields`: every defined key, `null` when unset.
pub(crate) struct FieldsOut<'a>(&'static [store::FieldRec], &'a [(u8, Value)]);

impl Serialize for FieldsOut<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(self.0.len()))?;
        for (i, d) in self.0.iter().enumerate() {
            let v = self.1.iter().find(|e| e.0 as usize == i).map(|e| &e.1);
            m.serialize_entry(d.key, &v)?;
        }
        m.end()
    }
}

#[derive(Serialize)]
pub(crate) struct IdentityOut<'a> {
    url: String,
    id: i64,
    user_id: i64,
    #[serde(rename = "type")]
    kind: &'static str,
    value: &'a str,
    verified: bool,
    primary: bool,
    created_at: Ts,
    updated_at: Ts,
    undeliverable_count: u32,
    deliverable_state: &'static str,
}

impl<'a> IdentityOut<'a> {
    pub(crate) fn new(base: &str, i: IdentView<'a>) -> Self {
        IdentityOut {
            url: format!("{base}/api/v2/users/{}/identities/{}.json", i.user_id, i.id),
            id: i.id,
            user_id: i.user_id,
            kind: i.kind,
            value: i.value,
            verified: i.verified,
            primary: i.primary,
            created_at: Ts(i.created_at),
            updated_at: Ts(i.updated_at),
            undeliverable_count: 0,
            deliverable_state: "deliverable",
        }
    }
}

#[derive(Serialize)]
struct ViaOut {
    channel: &'static str,
    source: ViaSource,
}

#[derive(Serialize)]
struct ViaSource {
    from: EmptyObj,
    to: EmptyObj,
    rel: Option<()>,
}

struct EmptyObj;
impl Serialize for EmptyObj {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_map(Some(0))?.end()
    }
}

struct CustomFieldsOut<'a>(&'a TicketRec);
impl Serialize for CustomFieldsOut<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct F<'a> {
            id: i64,
            value: &'a Value,
        }
        let mut seq = s.serialize_seq(Some(store::TICKET_FIELDS.len()))?;
        for (id, value) in store::ticket_custom_fields(self.0) {
            seq.serialize_element(&F { id, value })?;
        }
        seq.end()
    }
}

/// A `ticket` object; `generated_timestamp` only in export rows.
#[derive(Serialize)]
pub(crate) struct TicketOut<'a> {
    url: String,
    id: i64,
    external_id: Option<&'a str>,
    via: ViaOut,
    created_at: Ts,
    updated_at: Ts,
    #[serde(skip_serializing_if = "Option::is_none")]
    generated_timestamp: Option<i64>,
    #[serde(rename = "type")]
    kind: Option<&'static str>,
    subject: &'a str,
    raw_subject: &'a str,
    description: &'a str,
    priority: Option<&'static str>,
    status: &'static str,
    recipient: Option<()>,
    requester_id: Option<i64>,
    submitter_id: Option<i64>,
    assignee_id: Option<i64>,
    organization_id: Option<i64>,
    group_id: Option<i64>,
    collaborator_ids: [i64; 0],
    follower_ids: [i64; 0],
    email_cc_ids: [i64; 0],
    forum_topic_id: Option<()>,
    problem_id: Option<()>,
    has_incidents: bool,
    is_public: bool,
    due_at: Option<()>,
    tags: Tags<'a>,
    custom_fields: CustomFieldsOut<'a>,
    satisfaction_rating: Option<()>,
    sharing_agreement_ids: [i64; 0],
    custom_status_id: i64,
    fields: CustomFieldsOut<'a>,
    followup_ids: [i64; 0],
    ticket_form_id: i64,
    brand_id: i64,
    allow_channelback: bool,
    allow_attachments: bool,
    from_messaging_channel: bool,
}

impl<'a> TicketOut<'a> {
    pub(crate) fn new(base: &str, t: &'a TicketRec, export: bool) -> Self {
        let extra = t.extra.as_deref();
        TicketOut {
            url: format!("{base}/api/v2/tickets/{}.json", t.id),
            id: t.id,
            external_id: extra.and_then(|e| e.external_id.as_deref()),
            via: ViaOut {
                channel: store::VIAS[t.via as usize % store::VIAS.len()],
                source: ViaSource {
                    from: EmptyObj,
                    to: EmptyObj,
                    rel: None,
                },
            },
            created_at: Ts(t.created_at),
            updated_at: Ts(t.updated_at),
            generated_timestamp: export.then_some(t.generated_timestamp),
            kind: type_str(t.kind),
            subject: &t.subject,
            raw_subject: &t.subject,
            description: t.description(),
            priority: priority_str(t.priority),
            status: t.status.as_str(),
            recipient: None,
            requester_id: opt_id(t.requester_id),
            submitter_id: opt_id(t.submitter_id),
            assignee_id: opt_id(t.assignee_id),
            organization_id: opt_id(t.organization_id),
            group_id: store::group_of(t),
            collaborator_ids: [],
            follower_ids: [],
            email_cc_ids: [],
            forum_topic_id: None,
            problem_id: None,
            has_incidents: false,
            is_public: t.is_public,
            due_at: None,
            tags: Tags(extra.map(|e| &e.tags[..]).unwrap_or(&[])),
            custom_fields: CustomFieldsOut(t),
            satisfaction_rating: None,
            sharing_agreement_ids: [],
            custom_status_id: store::custom_status_id(t.status),
            fields: CustomFieldsOut(t),
            followup_ids: [],
            ticket_form_id: 360_000_000_100,
            brand_id: 360_000_000_200,
            allow_channelback: false,
            allow_attachments: true,
            from_messaging_channel: false,
        }
    }
}

#[derive(Serialize)]
pub(crate) struct OrgOut<'a> {
    url: String,
    id: i64,
    name: &'a str,
    shared_tickets: bool,
    shared_comments: bool,
    external_id: Option<&'a str>,
    created_at: Ts,
    updated_at: Ts,
    domain_names: [&'static str; 0],
    details: Option<()>,
    notes: Option<()>,
    group_id: Option<()>,
    tags: [&'static str; 0],
    organization_fields: FieldsOut<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    deleted_at: Option<Ts>,
}

impl<'a> OrgOut<'a> {
    pub(crate) fn new(base: &str, o: &'a OrgRec) -> Self {
        OrgOut {
            url: format!("{base}/api/v2/organizations/{}.json", o.id),
            id: o.id,
            name: &o.name,
            shared_tickets: false,
            shared_comments: false,
            external_id: o.external_id.as_deref(),
            created_at: Ts(o.created_at),
            updated_at: Ts(o.updated_at),
            domain_names: [],
            details: None,
            notes: None,
            group_id: None,
            tags: [],
            organization_fields: FieldsOut(&store::ORG_FIELDS, &o.fields),
            deleted_at: o.deleted_at.map(Ts),
        }
    }
}

#[derive(Serialize)]
pub(crate) struct CommentOut<'a> {
    id: i64,
    #[serde(rename = "type")]
    kind: &'static str,
    author_id: i64,
    body: String,
    html_body: String,
    plain_body: String,
    public: bool,
    attachments: [(); 0],
    audit_id: i64,
    via: ViaOut,
    created_at: Ts,
    #[serde(skip)]
    _p: std::marker::PhantomData<&'a ()>,
}

impl CommentOut<'_> {
    pub(crate) fn new(c: &CommentRec) -> Self {
        let (body, html) = store::comment_bodies(c);
        CommentOut {
            id: c.id,
            kind: "Comment",
            author_id: c.author_id,
            plain_body: body.clone(),
            body,
            html_body: html,
            public: c.public,
            attachments: [],
            audit_id: c.id + 1,
            via: ViaOut {
                channel: store::VIAS[c.via as usize % store::VIAS.len()],
                source: ViaSource {
                    from: EmptyObj,
                    to: EmptyObj,
                    rel: None,
                },
            },
            created_at: Ts(c.created_at),
            _p: std::marker::PhantomData,
        }
    }
}
