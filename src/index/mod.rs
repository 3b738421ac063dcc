//! OWNER: index helper. The in-memory read model. Stub signatures; bodies to be written.

pub mod snapshot;

use std::sync::Arc;

use crate::{
    phone::{E164, PhoneParser},
    zendesk::models::{Identity, Organization, Ticket, User},
};

/// The index as shared by the server (readers) and the follower / sync worker (writers).
/// Readers hold the lock for a lookup only, never across an `.await`.
pub type SharedIndex = Arc<parking_lot::RwLock<Index>>;

/// Where each export stands; persisted with the index so a restart resumes without a full re-export.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Cursors {
    /// `after_cursor` of the last users-export page read.
    pub users: Option<String>,
    /// `after_cursor` of the last tickets-export page read.
    pub tickets: Option<String>,
    /// `end_time` of the last organizations-export page read (the next `start_time`).
    pub organizations: Option<i64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Export {
    Users,
    Tickets,
    Organizations,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub customers: usize,
    pub agents: usize,
    pub phones: usize,
    pub open_tickets: usize,
    pub organizations: usize,
}

#[derive(Default)]
pub struct Index {}

#[allow(unused_variables)]
impl Index {
    pub fn new() -> Self {
        todo!()
    }
    /// Inserts, updates or removes (deleted / inactive end-user) one user from an export row or a
    /// write. Keeps the phone identities already known for it (they come separately).
    pub fn apply_user(&mut self, user: &User, parser: &PhoneParser) {
        todo!()
    }
    /// Replaces the phone-number identities known for `user_id` (other identity types ignored).
    pub fn apply_identities(
        &mut self,
        user_id: i64,
        identities: &[Identity],
        parser: &PhoneParser,
    ) {
        todo!()
    }
    /// Keeps open tickets (`new|open|pending|hold`), drops any other status.
    pub fn apply_ticket(&mut self, ticket: &Ticket) {
        todo!()
    }
    pub fn apply_organization(&mut self, org: &Organization) {
        todo!()
    }
    pub fn cursors(&self) -> &Cursors {
        todo!()
    }
    pub fn cursors_mut(&mut self) -> &mut Cursors {
        todo!()
    }
    /// Records that `export` was read to its end at `at_ms` (Unix milliseconds).
    pub fn mark_fresh(&mut self, export: Export, at_ms: i64) {
        todo!()
    }
    /// Milliseconds since the oldest of the three exports was last read to its end; `None` until all were.
    pub fn age_ms(&self, now_ms: i64) -> Option<i64> {
        todo!()
    }
    /// True once a full warm-up completed (or a snapshot of one was loaded).
    pub fn is_loaded(&self) -> bool {
        todo!()
    }
    pub fn set_loaded(&mut self) {
        todo!()
    }
    pub fn counts(&self) -> Counts {
        todo!()
    }
    /// Whether any active customer has this number (the cheap check behind `E164::candidate`).
    pub fn has_phone(&self, phone: E164) -> bool {
        todo!()
    }
}
