//! OWNER: zendesk helper. Stub signatures; bodies to be written.

use std::time::Duration;

use serde::de::DeserializeOwned;
use serde_json::Value;

use super::{Budget, ZendeskError, models::*};
use crate::{
    config::{Config, ConfigError, Credentials},
    phone::E164,
};

/// Where an export read starts: the first call of a cursor export takes a start time, later calls
/// the cursor of the previous page.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum ExportStart {
    StartTime(i64),
    Cursor(String),
}

/// Whether a request may be repeated by the client on a transient error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// Safe to repeat (reads, `create_or_update`, ticket create with an `Idempotency-Key`).
    Idempotent,
    /// Sent at most once after it may have reached Zendesk (a comment, a plain create): a transient
    /// error is returned to the caller, which knows how to check before trying again. 429s and
    /// connection errors before sending are still retried, since Zendesk did nothing.
    Once,
}

#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// `https://{subdomain}.zendesk.com` (or the simulator's loopback URL), no trailing slash.
    pub base_url: String,
    pub credentials: Credentials,
    pub requests_per_minute: u32,
    pub export_requests_per_minute: u32,
    pub timeout: Duration,
    /// How many times a retryable error is retried inside the client before it is returned.
    pub max_retries: u32,
}

impl ClientOptions {
    pub fn from_config(cfg: &Config) -> Result<Self, ConfigError> {
        Ok(Self {
            base_url: cfg.zendesk.url.trim_end_matches('/').to_owned(),
            credentials: cfg.credentials()?,
            requests_per_minute: cfg.zendesk.requests_per_minute,
            export_requests_per_minute: cfg.zendesk.export_requests_per_minute,
            timeout: Duration::from_secs(cfg.zendesk.timeout_seconds),
            max_retries: 3,
        })
    }
}

/// Cheap to clone; every clone shares one connection pool and one budget.
#[derive(Clone)]
pub struct Client {}

#[allow(unused_variables)]
impl Client {
    pub fn new(opts: ClientOptions) -> Result<Self, ZendeskError> {
        todo!()
    }
    /// The account URL, no trailing slash: agent links are `{base_url}/agent/users/{id}`.
    pub fn base_url(&self) -> &str {
        todo!()
    }
    pub fn budget(&self) -> &Budget {
        todo!()
    }

    /// The generic call everything else uses. `path` starts with `/api/v2/`. `export` marks an
    /// incremental-export request (it also takes the export limit).
    pub async fn request<T: DeserializeOwned>(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
        extra_headers: &[(&str, &str)],
        export: bool,
        retry: Retry,
    ) -> Result<T, ZendeskError> {
        todo!()
    }

    // ---- exports ----
    pub async fn export_users(
        &self,
        start: &ExportStart,
        include_identities: bool,
        per_page: u32,
    ) -> Result<UsersCursorPage, ZendeskError> {
        todo!()
    }
    pub async fn export_tickets(
        &self,
        start: &ExportStart,
        per_page: u32,
    ) -> Result<TicketsCursorPage, ZendeskError> {
        todo!()
    }
    pub async fn export_organizations(
        &self,
        start_time: i64,
    ) -> Result<OrganizationsPage, ZendeskError> {
        todo!()
    }
    /// `users/show_many?ids=…&include=identities`, at most 100 ids.
    pub async fn show_many_users(&self, ids: &[i64]) -> Result<UsersWithIdentities, ZendeskError> {
        todo!()
    }

    // ---- reads ----
    pub async fn me(&self) -> Result<User, ZendeskError> {
        todo!()
    }
    /// Every agent and admin (all pages).
    pub async fn list_agents(&self) -> Result<Vec<User>, ZendeskError> {
        todo!()
    }
    /// End-users whose phone matches, via `search.json?query=role:end-user phone:*{digits}`.
    pub async fn search_users_by_phone(&self, phone: E164) -> Result<Vec<User>, ZendeskError> {
        todo!()
    }
    pub async fn show_user(&self, id: i64) -> Result<User, ZendeskError> {
        todo!()
    }
    pub async fn user_identities(&self, user_id: i64) -> Result<Vec<Identity>, ZendeskError> {
        todo!()
    }
    pub async fn show_ticket(&self, id: i64) -> Result<Ticket, ZendeskError> {
        todo!()
    }
    /// Tickets requested by the user (`users/{id}/tickets/requested`), all pages.
    pub async fn requested_tickets(&self, user_id: i64) -> Result<Vec<Ticket>, ZendeskError> {
        todo!()
    }
    pub async fn ticket_comments(&self, ticket_id: i64) -> Result<Vec<Comment>, ZendeskError> {
        todo!()
    }
    pub async fn show_organization(&self, id: i64) -> Result<Organization, ZendeskError> {
        todo!()
    }
    pub async fn ticket_fields(&self) -> Result<Vec<FieldDef>, ZendeskError> {
        todo!()
    }
    pub async fn user_fields(&self) -> Result<Vec<FieldDef>, ZendeskError> {
        todo!()
    }
    pub async fn organization_fields(&self) -> Result<Vec<FieldDef>, ZendeskError> {
        todo!()
    }

    // ---- writes ----
    /// `POST users/create_or_update` with `{"user": body}`: matches on email or external_id, so it
    /// is safe to repeat.
    pub async fn create_or_update_user(&self, body: Value) -> Result<User, ZendeskError> {
        todo!()
    }
    /// `PUT users/{id}` with `{"user": body}`.
    pub async fn update_user(&self, id: i64, body: Value) -> Result<User, ZendeskError> {
        todo!()
    }
    /// `POST organizations/create_or_update` with `{"organization": body}` (matches on external_id).
    pub async fn create_or_update_organization(
        &self,
        body: Value,
    ) -> Result<Organization, ZendeskError> {
        todo!()
    }
    /// `POST tickets` with `{"ticket": body}` and the `Idempotency-Key` header.
    pub async fn create_ticket(
        &self,
        body: Value,
        idempotency_key: &str,
    ) -> Result<Ticket, ZendeskError> {
        todo!()
    }
    /// `PUT tickets/{id}` with `{"ticket": body}` (a comment, fields). Sent once: see [`Retry::Once`].
    pub async fn update_ticket(&self, id: i64, body: Value) -> Result<Ticket, ZendeskError> {
        todo!()
    }
    /// `POST calls` (Talk Partner Edition) with `{"call": body}`; returns the `call` object.
    pub async fn create_call(&self, body: Value) -> Result<Value, ZendeskError> {
        todo!()
    }
}
