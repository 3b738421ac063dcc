//! OWNER: index helper. The routing and caller-ID decisions (DESIGN §3), pure functions over the
//! index. Stub signatures; bodies to be written.

use std::collections::BTreeMap;

use crate::{
    index::Index,
    phone::{E164, PhoneError, PhoneParser},
};

/// The key names are compared by: NFC, trimmed, inner whitespace collapsed to one space, lowercased.
pub fn name_key(name: &str) -> String {
    let _ = name;
    todo!()
}

/// `routing.directory`: full name → PBX extension, looked up by [`name_key`].
#[derive(Debug, Clone, Default)]
pub struct Directory {}

#[allow(unused_variables)]
impl Directory {
    pub fn new(entries: &BTreeMap<String, String>) -> Self {
        todo!()
    }
    pub fn extension(&self, full_name: &str) -> Option<&str> {
        todo!()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    RouteToAgent,
    DefaultRouting,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentView {
    pub id: i64,
    pub name: String,
    pub email: String,
    /// From the directory; `None` when the agent's name has no entry.
    pub extension: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TicketView {
    pub id: i64,
    pub status: &'static str,
    pub subject: String,
    /// 0 when none.
    pub assignee_id: i64,
    /// Unix seconds.
    pub updated_at: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrgView {
    pub id: i64,
    pub name: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CustomerView {
    pub id: i64,
    pub name: String,
    pub phone: E164,
    pub organization: Option<OrgView>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteAnswer {
    pub decision: Decision,
    pub agent: Option<AgentView>,
    pub ticket: Option<TicketView>,
    pub customer: Option<CustomerView>,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallerAnswer {
    pub found: bool,
    /// The customer's name, with the organization in brackets when there is one.
    pub display_name: String,
    pub customer: Option<CustomerView>,
    pub open_ticket: Option<TicketView>,
}

/// Normalises a query number: the canonical-form fast path when the index knows the number, else a
/// full libphonenumber parse.
#[allow(unused_variables)]
pub fn resolve_number(index: &Index, parser: &PhoneParser, raw: &str) -> Result<E164, PhoneError> {
    todo!()
}

/// DESIGN §3 rules 2–5.
#[allow(unused_variables)]
pub fn route(index: &Index, directory: &Directory, phone: E164) -> RouteAnswer {
    todo!()
}

/// DESIGN §3 rule 6.
#[allow(unused_variables)]
pub fn lookup_caller(index: &Index, phone: E164) -> CallerAnswer {
    todo!()
}
