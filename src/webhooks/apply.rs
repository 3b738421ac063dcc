//! Changes from webhooks into the index, never making it older than what it holds.
//!
//! Why a version memory next to the index: the index keeps only open tickets and live customers,
//! so a late "open" event for a ticket that was solved since would find nothing to compare with.
//! [`Versions`] remembers, per ticket and per user, the `updated_at` and a digest of the state last
//! applied from a webhook (bounded by a moka TTL cache: an entry only has to outlive Zendesk's
//! retries and reorderings, minutes). An event older than the newer of that memory and the index is
//! stale. `updated_at` has one-second resolution, so two changes within a second delivered out of
//! order are told apart by the digest: same second, different state is *ambiguous* and the ticket
//! is read from Zendesk, whose answer is the current state and wins.
//!
//! The export follower asks the same memory about its rows ([`Versions::keep_export_ticket`],
//! [`Versions::keep_export_user`]): a row older than what webhooks applied is skipped, and a row of
//! the *same second* with a different state is ambiguous too — the page may have been read before
//! or after the webhook's read — so it is skipped and the entity read again through the applier
//! ([`Versions::refetch_through`]), whose answer is current. Applying such a row instead could put
//! the older of two same-second states back for good: the export's cursor has moved past it and
//! no further event comes (a customer made an agent and back within a second, say).
//!
//! All writes go through [`apply_change`], which hands them to the index's one writer
//! ([`IndexWriter`]) and returns once they are visible.

use std::{
    hash::BuildHasher as _,
    sync::{Arc, OnceLock},
    time::Duration,
};

use tokio::sync::mpsc;

use crate::{
    index::{Change, Index, IndexWriter, SharedIndex, UserBatch, WriterStopped},
    phone::PhoneParser,
    webhooks::parse::Change as Event,
    zendesk::models::{Identity, Ticket, User, parse_time},
};

/// A change the index understands, resolved from a webhook (and a read from Zendesk if needed).
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum IndexChange {
    /// Upsert, or removal when not open (`solved`, `closed`, `deleted`).
    Ticket(Ticket),
    /// Upsert (or suspend, role change, deletion via `active:false`) with the user's complete
    /// identities, so identities added, changed or removed all land.
    User {
        user: User,
        /// `None`: Zendesk did not sideload them (the key was missing); the known phones stay.
        identities: Option<Vec<Identity>>,
    },
    /// Permanently gone or merged away (Zendesk answered 404).
    UserGone(i64),
}

/// The one place webhooks write the index (see the module doc).
pub(crate) async fn apply_change(
    writer: &IndexWriter,
    parser: &PhoneParser,
    change: IndexChange,
) -> Result<(), WriterStopped> {
    let change = match change {
        IndexChange::Ticket(t) => Change::Tickets(vec![t]),
        IndexChange::User { user, identities } => {
            // Phones parsed here, outside the writer, as the follower does.
            Change::Users(UserBatch::prepare(
                std::slice::from_ref(&user),
                identities.as_deref(),
                parser,
            ))
        }
        IndexChange::UserGone(id) => {
            let gone = User {
                id,
                active: Some(false),
                ..User::default()
            };
            Change::user(&gone, parser)
        }
    };
    writer.apply(change).await
}

/// What [`Versions::judge`] decided for a change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    Apply,
    Stale,
    /// Same second as what is held but a different state: read the entity to decide.
    Ambiguous,
}

/// The last applied `(updated_at, digest)` per ticket and per user (see the module doc).
#[derive(Clone)]
pub(crate) struct Versions {
    tickets: moka::sync::Cache<i64, (i64, u64)>,
    users: moka::sync::Cache<i64, (i64, u64)>,
    /// The applier's queue, for entities an export row left ambiguous (see the module doc).
    refetch: Arc<OnceLock<mpsc::Sender<Event>>>,
}

impl Default for Versions {
    fn default() -> Self {
        let cache = || {
            moka::sync::Cache::builder()
                .max_capacity(1_000_000)
                .time_to_live(Duration::from_secs(3600))
                .build()
        };
        Self {
            tickets: cache(),
            users: cache(),
            refetch: Arc::default(),
        }
    }
}

/// A digest of what the index keeps of a ticket.
pub(crate) fn ticket_digest(status: &str, requester: i64, assignee: i64, subject: &str) -> u64 {
    foldhash::fast::FixedState::with_seed(7).hash_one((status, requester, assignee, subject))
}

fn digest_of(t: &Ticket) -> u64 {
    ticket_digest(
        t.status.as_deref().unwrap_or_default(),
        t.requester_id.unwrap_or(0),
        t.assignee_id.unwrap_or(0),
        t.subject.as_deref().unwrap_or_default(),
    )
}

fn judge(known: Option<(i64, u64)>, new: (i64, u64)) -> Verdict {
    match known {
        None => Verdict::Apply,
        Some((t, _)) if new.0 > t => Verdict::Apply,
        Some((t, _)) if new.0 < t => Verdict::Stale,
        Some((_, d)) if d == new.1 => Verdict::Stale,
        Some(_) => Verdict::Ambiguous,
    }
}

/// The newer of two `(time, digest)` versions.
fn newer(a: Option<(i64, u64)>, b: Option<(i64, u64)>) -> Option<(i64, u64)> {
    match (a, b) {
        (Some(a), Some(b)) => Some(if b.0 > a.0 { b } else { a }),
        (a, b) => a.or(b),
    }
}

impl Versions {
    /// Whether a ticket from an event's `detail` is newer than what is known of it.
    pub(crate) fn judge_ticket(&self, index: &SharedIndex, t: &Ticket) -> Verdict {
        self.judge_ticket_in(&index.read(), t)
    }

    /// [`Versions::judge_ticket`] under a lock the caller holds. What the index holds counts too:
    /// with replicas, a webhook applied by another replica reaches this one's index through the
    /// change log, not this memory.
    fn judge_ticket_in(&self, index: &Index, t: &Ticket) -> Verdict {
        let Some(at) = t.updated_at.as_deref().and_then(parse_time) else {
            return Verdict::Ambiguous;
        };
        let held = index.open_ticket(t.id).map(|r| {
            let d = ticket_digest(
                r.status,
                r.requester_id,
                r.assignee_id.unwrap_or(0),
                r.subject,
            );
            (r.updated_at, d)
        });
        judge(newer(self.tickets.get(&t.id), held), (at, digest_of(t)))
    }

    /// Whether Zendesk's current answer for a ticket may be applied: anything not older.
    pub(crate) fn current_ticket_is_fresh(&self, index: &SharedIndex, t: &Ticket) -> bool {
        let Some(at) = t.updated_at.as_deref().and_then(parse_time) else {
            return true;
        };
        let held = index.read().open_ticket(t.id).map(|r| (r.updated_at, 0));
        newer(self.tickets.get(&t.id), held).is_none_or(|(k, _)| at >= k)
    }

    /// Where ambiguous export rows are sent to be read again: the webhook applier's queue.
    pub(crate) fn refetch_through(&self, tx: mpsc::Sender<Event>) {
        let _ = self.refetch.set(tx);
    }

    /// For the export follower: whether to apply an export row of a ticket. Export rows show a
    /// record's state when the page was read; a page read just before a webhook change and applied
    /// just after it would otherwise step the record back until the next poll. A row older than
    /// what webhooks applied is skipped; one of the same second with another state is skipped and
    /// the ticket read again (see the module doc).
    pub(crate) fn keep_export_ticket(&self, index: &Index, t: &Ticket) -> bool {
        if t.updated_at.as_deref().and_then(parse_time).is_none() {
            return true;
        }
        match self.judge_ticket_in(index, t) {
            Verdict::Apply => true,
            Verdict::Stale => false,
            Verdict::Ambiguous => !self.refetch(Event::FetchTicket(t.id)),
        }
    }

    /// As [`Versions::keep_export_ticket`], for a row of the users export: skipped when older than
    /// what webhooks applied or the index holds; read again when of the same second as what
    /// webhooks applied here. Users have no digest (their phones come in a separate list), so any
    /// such row is ambiguous; a row of the same second as the index's record alone (the sync's own
    /// write, read back by the export) is applied, as it would be without webhooks.
    pub(crate) fn keep_export_user(&self, index: &Index, u: &User) -> bool {
        let Some(at) = u.updated_at.as_deref().and_then(parse_time) else {
            return true;
        };
        let held = index.customer(u.id).map(|c| c.updated_at);
        if held.is_some_and(|h| at < h) {
            return false;
        }
        match self.users.get(&u.id) {
            Some((k, _)) if at < k => false,
            Some((k, _)) if at == k => !self.refetch(Event::FetchUser(u.id)),
            _ => true,
        }
    }

    /// Queues a read of the entity; false (the row is applied after all) without an applier or
    /// when its queue is full.
    fn refetch(&self, event: Event) -> bool {
        self.refetch
            .get()
            .is_some_and(|tx| tx.try_send(event).is_ok())
    }

    pub(crate) fn applied_ticket(&self, t: &Ticket) {
        if let Some(at) = t.updated_at.as_deref().and_then(parse_time) {
            self.tickets.insert(t.id, (at, digest_of(t)));
        }
    }

    /// Whether Zendesk's current answer for a user may be applied: anything not older.
    pub(crate) fn current_user_is_fresh(&self, index: &SharedIndex, u: &User) -> bool {
        let Some(at) = u.updated_at.as_deref().and_then(parse_time) else {
            return true;
        };
        let held = index.read().customer(u.id).map(|c| (c.updated_at, 0));
        newer(self.users.get(&u.id), held).is_none_or(|(k, _)| at >= k)
    }

    pub(crate) fn applied_user(&self, u: &User) {
        if let Some(at) = u.updated_at.as_deref().and_then(parse_time) {
            self.users.insert(u.id, (at, 0));
        }
    }
}

/// Shared by the applier and the export follower.
pub(crate) type SharedVersions = Arc<Versions>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn older_never_wins() {
        assert_eq!(judge(None, (5, 1)), Verdict::Apply);
        assert_eq!(judge(Some((5, 1)), (6, 2)), Verdict::Apply);
        assert_eq!(judge(Some((5, 1)), (4, 2)), Verdict::Stale);
        assert_eq!(judge(Some((5, 1)), (5, 1)), Verdict::Stale);
        assert_eq!(judge(Some((5, 1)), (5, 2)), Verdict::Ambiguous);
    }

    #[test]
    fn a_late_open_event_does_not_reopen_a_solved_ticket() {
        let index: SharedIndex = Default::default();
        let v = Versions::default();
        let t = |status: &str, at: &str| Ticket {
            id: 1,
            status: Some(status.into()),
            requester_id: Some(2),
            updated_at: Some(at.into()),
            ..Ticket::default()
        };
        let solved = t("solved", "2024-05-01T10:00:05Z");
        assert_eq!(v.judge_ticket(&index, &solved), Verdict::Apply);
        v.applied_ticket(&solved);
        let open = t("open", "2024-05-01T10:00:01Z");
        assert_eq!(v.judge_ticket(&index, &open), Verdict::Stale);
    }

    /// Export rows against what webhooks applied: older skipped, newer applied, and the same second
    /// with another state read again through the applier instead of applied (a customer made an
    /// agent and back within one second once left a webhook-fed index unlike a clean warm-up).
    #[test]
    fn same_second_export_rows_are_read_again() {
        let v = Versions::default();
        let ix = Index::new();
        let t = |status: &str, at: &str| Ticket {
            id: 1,
            status: Some(status.into()),
            requester_id: Some(2),
            updated_at: Some(at.into()),
            ..Ticket::default()
        };
        v.applied_ticket(&t("open", "2024-05-01T10:00:05Z"));
        // No applier to read it again: the ambiguous row is applied, as before.
        assert!(v.keep_export_ticket(&ix, &t("pending", "2024-05-01T10:00:05Z")));
        let (tx, mut rx) = mpsc::channel(4);
        v.refetch_through(tx);
        assert!(!v.keep_export_ticket(&ix, &t("pending", "2024-05-01T10:00:05Z")));
        assert_eq!(rx.try_recv().unwrap(), Event::FetchTicket(1));
        assert!(!v.keep_export_ticket(&ix, &t("open", "2024-05-01T10:00:05Z")));
        assert!(!v.keep_export_ticket(&ix, &t("pending", "2024-05-01T10:00:04Z")));
        assert!(v.keep_export_ticket(&ix, &t("pending", "2024-05-01T10:00:06Z")));
        assert!(
            rx.try_recv().is_err(),
            "only the ambiguous row is read again"
        );

        let u = |role: &str, at: &str| User {
            id: 3,
            role: Some(role.into()),
            updated_at: Some(at.into()),
            ..User::default()
        };
        v.applied_user(&u("end-user", "2024-05-01T10:00:05Z"));
        assert!(!v.keep_export_user(&ix, &u("agent", "2024-05-01T10:00:05Z")));
        assert_eq!(rx.try_recv().unwrap(), Event::FetchUser(3));
        assert!(!v.keep_export_user(&ix, &u("agent", "2024-05-01T10:00:04Z")));
        assert!(v.keep_export_user(&ix, &u("agent", "2024-05-01T10:00:06Z")));
        assert!(rx.try_recv().is_err());

        // With replicas, a webhook applied by another replica is in this one's index (through the
        // change log) but not in its memory: an older row is skipped all the same.
        let mut ix = Index::new();
        let other = Ticket {
            id: 5,
            ..t("open", "2024-05-01T10:00:05Z")
        };
        ix.apply_ticket(&other);
        let v = Versions::default();
        assert!(!v.keep_export_ticket(
            &ix,
            &Ticket {
                id: 5,
                ..t("pending", "2024-05-01T10:00:04Z")
            }
        ));
        assert!(v.keep_export_ticket(
            &ix,
            &Ticket {
                id: 5,
                ..t("pending", "2024-05-01T10:00:06Z")
            }
        ));
    }

    /// A ticket solved in Zendesk and announced by a webhook becomes its requester's recent ticket
    /// for sticky routing (DESIGN §3 rule 7) through the index's one writer.
    #[tokio::test]
    async fn a_solved_ticket_event_is_remembered_for_sticky_routing() {
        let writer = IndexWriter::spawn(crate::index::Index::new());
        let parser = PhoneParser::new("UA").unwrap();
        let solved = Ticket {
            id: 7,
            status: Some("solved".into()),
            requester_id: Some(2),
            assignee_id: Some(9),
            updated_at: Some("2024-05-01T10:00:05Z".into()),
            ..Ticket::default()
        };
        apply_change(&writer, &parser, IndexChange::Ticket(solved))
            .await
            .unwrap();
        let done = writer.index().read().done_ticket_of(2).unwrap();
        assert_eq!(
            (done.id, done.status, done.assignee_id),
            (7, "solved", Some(9))
        );
    }
}
