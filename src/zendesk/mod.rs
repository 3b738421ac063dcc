//! The Zendesk HTTP client: auth, one shared request budget, retries, typed errors, and the export,
//! read and write calls Deskline makes (ZENDESK.md). What it reads is typed in [`models`], what it
//! writes in [`requests`].
//!
//! OWNER: zendesk helper. The signatures below are the contract other modules build on: add to them,
//! don't change them without updating every caller.

pub(crate) mod budget;
mod client;
pub mod models;
pub(crate) mod requests;

pub(crate) use budget::Budget;
pub use client::{Client, ClientOptions, Credentials};
pub(crate) use client::{ExportStart, Retry};

use std::time::Duration;

/// A failed Zendesk call, classified once (STYLE.md practice 7).
#[derive(Debug, Clone, thiserror::Error)]
pub enum ZendeskError {
    /// 429: Zendesk asked us to wait. Retryable after `retry_after`.
    #[error("rate limited by Zendesk (retry after {retry_after:?})")]
    RateLimited {
        /// From `Retry-After`: 60 s when absent or unreadable, clamped to 1 s ..= 1 h.
        retry_after: Duration,
    },
    /// 408, 5xx, timeouts, dropped connections, truncated or malformed bodies: retryable.
    #[error("transient Zendesk error{}: {message}", status.map(|s| format!(" (HTTP {s})")).unwrap_or_default())]
    Transient {
        /// The HTTP status; `None` when no response arrived (timeout, connection error).
        status: Option<u16>,
        /// What went wrong, for logs.
        message: String,
    },
    /// 401/403: the credentials or the role are wrong. Not retried.
    #[error("Zendesk refused the credentials (HTTP {status}): {message}")]
    Auth {
        /// 401 or 403.
        status: u16,
        /// Zendesk's own text.
        message: String,
    },
    /// Any other 4xx: permanent. `reason` is what Zendesk's error code and `details` mean, read
    /// once here; `message` is Zendesk's own text (error, description, details).
    #[error("Zendesk rejected the request (HTTP {status}): {message}")]
    Permanent {
        /// The HTTP status (4xx).
        status: u16,
        /// What the refusal means to the caller.
        reason: Rejection,
        /// Zendesk's own text (error, description, details).
        message: String,
    },
    /// Nothing was sent: the request could not be built (a bad base URL or path, an invalid
    /// header, a body that does not serialize, an argument Zendesk would refuse). Not retried.
    #[error("Zendesk request not sent: {message}")]
    Local {
        /// What could not be built.
        message: String,
    },
}

/// What a permanent refusal means to a caller, from Zendesk's error code and `details`
/// (ZENDESK.md §9). Callers decide on this, never on the message text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rejection {
    /// 422 `RecordInvalid` with a `details.<field>[].error` of `DuplicateValue` (or `taken`): the
    /// value must be unique and another record has it (an email, an organization name).
    Duplicate {
        /// The field whose value is taken, e.g. `email` or `name`.
        field: String,
    },
    /// 422 on a closed ticket (`details.status[]`: "Status closed prevents ticket update"): only a
    /// follow-up ticket can take the comment.
    TicketClosed,
    /// 404 (`RecordNotFound`): the record is gone or never was.
    NotFound,
    /// 400 `IdempotentRequestError`: the `Idempotency-Key` was used with another body.
    IdempotencyConflict,
    /// 400 `TooManyValues`.
    TooManyValues,
    /// Any other refusal; the message says what.
    Other,
}

impl ZendeskError {
    /// The meaning of a permanent refusal (`None` for any other error).
    pub(crate) fn rejection(&self) -> Option<&Rejection> {
        match self {
            Self::Permanent { reason, .. } => Some(reason),
            _ => None,
        }
    }

    pub(crate) fn is_retryable(&self) -> bool {
        matches!(self, Self::RateLimited { .. } | Self::Transient { .. })
    }

    pub(crate) fn status(&self) -> Option<u16> {
        match self {
            Self::RateLimited { .. } => Some(429),
            Self::Transient { status, .. } => *status,
            Self::Auth { status, .. } | Self::Permanent { status, .. } => Some(*status),
            Self::Local { .. } => None,
        }
    }
}
