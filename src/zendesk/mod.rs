//! The Zendesk HTTP client: auth, one shared request budget, retries, typed errors, and the export,
//! read and write calls Deskline makes (ZENDESK.md).
//!
//! OWNER: zendesk helper. The signatures below are the contract other modules build on: add to them,
//! don't change them without updating every caller.

pub mod budget;
mod client;
pub mod models;

pub use budget::{Budget, BudgetStats, Outcome, Permit, RateLimitHeaders};
pub use client::{Client, ClientOptions, ExportStart, Retry};

use std::time::Duration;

/// A failed Zendesk call, classified once (STYLE.md practice 7).
#[derive(Debug, Clone, thiserror::Error)]
pub enum ZendeskError {
    /// 429: Zendesk asked us to wait. Retryable after `retry_after`.
    #[error("rate limited by Zendesk (retry after {retry_after:?})")]
    RateLimited { retry_after: Duration },
    /// 408, 5xx, timeouts, dropped connections, truncated or malformed bodies: retryable.
    #[error("transient Zendesk error{}: {message}", status.map(|s| format!(" (HTTP {s})")).unwrap_or_default())]
    Transient {
        status: Option<u16>,
        message: String,
    },
    /// 401/403: the credentials or the role are wrong. Not retried.
    #[error("Zendesk refused the credentials (HTTP {status}): {message}")]
    Auth { status: u16, message: String },
    /// Any other 4xx: permanent. `message` is Zendesk's own text (error, description, details).
    #[error("Zendesk rejected the request (HTTP {status}): {message}")]
    Permanent { status: u16, message: String },
}

impl ZendeskError {
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::RateLimited { .. } | Self::Transient { .. })
    }

    pub fn status(&self) -> Option<u16> {
        match self {
            Self::RateLimited { .. } => Some(429),
            Self::Transient { status, .. } => *status,
            Self::Auth { status, .. } | Self::Permanent { status, .. } => Some(*status),
        }
    }
}
