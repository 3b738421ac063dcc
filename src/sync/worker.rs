//! The worker: claims jobs and walks each through DESIGN §4, recording every step's result in the
//! job row before the next (see the module doc of [`crate::sync`] for why each step is safe to
//! repeat).
//!
//! Index changes: every change a step makes is handed to the index writer (with replicas, appended
//! to the shared change log) *before* the step's result is recorded. A crash between the two
//! leaves the step unrecorded, so its retry repeats it and publishes the change again; the one step
//! whose retry does not repeat the write (a comment found already landed) reads the ticket back to
//! publish it. So no replica depends on the exports for a sync write, even across a crash.
//!
//! Concurrency: up to `concurrency` jobs at once, never two of one number (the claim guarantees
//! it), so the index answers the second job of a new number with what the first one created.
//! Budget: every request goes through the shared [`zendesk::Client`], which owns the account's
//! request budget and honours `Retry-After`; what still fails retryably is rescheduled here with a
//! jittered exponential backoff whose due time lives in the queue row (a restart keeps it).

use std::{sync::Arc, time::Duration};

use tokio::sync::{Notify, Semaphore};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::Instrument;

use super::{
    CallReport, Direction, Outcome, SyncSettings, comment,
    queue::{Job, now_ms},
    store::{JobStore, StoreError},
};
use crate::{
    config::FieldEntity,
    index::{Change, IndexWriter, SharedIndex, WriterStopped},
    phone::{E164, mask},
    routing,
    zendesk::{
        self, Rejection, ZendeskError,
        models::{Ticket, User, format_time},
        requests::{
            CallCreate, CallDirection, Comment, CustomFieldValue, FieldValues, OrganizationCreate,
            Role, TicketCreate, TicketCreateJson, TicketUpdate, UserCreate, UserUpdate,
        },
    },
};

/// Why a job stopped.
#[derive(Debug, thiserror::Error)]
enum StepError {
    #[error(transparent)]
    Zendesk(#[from] ZendeskError),
    #[error(transparent)]
    Queue(#[from] StoreError),
    /// The index writer has stopped: retried like a queue error (the process is going down).
    #[error(transparent)]
    Index(#[from] WriterStopped),
    /// Not a Zendesk answer but just as final (e.g. no usable organization name).
    #[error("{0}")]
    Permanent(String),
}

/// Wakes the worker (e.g. after `ReportCall` stored a report) so it does not wait for its poll.
#[derive(Clone, Debug)]
pub struct WorkerHandle {
    notify: Arc<Notify>,
}

impl WorkerHandle {
    pub(crate) fn notify(&self) {
        self.notify.notify_one();
    }
}

pub(crate) struct Worker {
    inner: Arc<Inner>,
}

struct Inner {
    queue: JobStore,
    client: zendesk::Client,
    /// For reads; writes go through `writer` and are visible here once it acknowledged them.
    index: SharedIndex,
    writer: IndexWriter,
    settings: SyncSettings,
    notify: Arc<Notify>,
}

/// The end-user a job writes for, as far as known.
#[derive(Debug, Clone)]
struct UserInfo {
    id: i64,
    name: String,
    organization_id: Option<i64>,
}

impl Worker {
    pub(crate) fn new(
        queue: impl Into<JobStore>,
        client: zendesk::Client,
        writer: IndexWriter,
        settings: SyncSettings,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                queue: queue.into(),
                client,
                index: writer.index().clone(),
                writer,
                settings,
                notify: Arc::new(Notify::new()),
            }),
        }
    }

    /// A handle that wakes the worker; take it before [`run`](Self::run) consumes the worker.
    pub(crate) fn handle(&self) -> WorkerHandle {
        WorkerHandle {
            notify: self.inner.notify.clone(),
        }
    }

    /// Runs until `shutdown`: then it stops claiming, releases the jobs in flight back to `QUEUED`
    /// (their recorded steps stay, so the next start resumes them) and returns. Returns an error
    /// only when the queue itself fails (the process should then stop rather than limp on).
    pub(crate) async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let inner = self.inner;
        let permits = Arc::new(Semaphore::new(inner.settings.concurrency.max(1)));
        let tracker = TaskTracker::new();
        let mut queue_failures = 0u32;
        tracing::info!(
            concurrency = inner.settings.concurrency,
            "sync worker started"
        );
        // Step 1 finds the user in the index first; Zendesk search, the fallback, does not see
        // users changed in the last minutes. A job run on a half-warmed index would miss such a
        // customer and create a second user, organization and ticket for the number, so jobs wait
        // (durably queued) until the index is loaded; the index writer signals it.
        let mut loaded = inner.writer.loaded();
        if !*loaded.borrow() {
            tracing::info!("sync waits for the index to load before writing to Zendesk");
            tokio::select! {
                r = loaded.wait_for(|l| *l) => {
                    if r.is_err() {
                        anyhow::bail!("the index writer stopped before the index was loaded");
                    }
                }
                () = shutdown.cancelled() => {
                    tracing::info!("sync worker stopped");
                    return Ok(());
                }
            }
        }
        let result = loop {
            let permit = tokio::select! {
                p = permits.clone().acquire_owned() => p?,
                () = shutdown.cancelled() => break Ok(()),
            };
            // Created before the claim so a wake-up during the claim is not lost.
            let woken = inner.notify.notified();
            match inner.queue.claim().await {
                Ok(Some(job)) => {
                    queue_failures = 0;
                    let inner = inner.clone();
                    let shutdown = shutdown.clone();
                    let span = tracing::info_span!(
                        "sync_job",
                        call_id = %job.report.call_id,
                        attempt = job.attempts
                    );
                    tracker.spawn(
                        async move {
                            inner.process(job, shutdown).await;
                            drop(permit);
                            // A finished job may unblock another job of the same number.
                            inner.notify.notify_one();
                        }
                        .instrument(span),
                    );
                }
                Ok(None) => {
                    drop(permit);
                    let idle = inner
                        .queue
                        .max_idle()
                        .map_or(inner.settings.idle_poll, |m| {
                            m.min(inner.settings.idle_poll)
                        });
                    let wait = match inner.queue.next_due_ms().await {
                        Ok(Some(due)) => Duration::from_millis((due - now_ms()).max(0) as u64),
                        _ => idle,
                    }
                    .min(idle);
                    tokio::select! {
                        () = woken => {}
                        () = tokio::time::sleep(wait) => {}
                        () = shutdown.cancelled() => break Ok(()),
                    }
                }
                Err(StoreError::Corrupt { call_id, message }) => {
                    // The row is marked FAILED by the claim; go on with the others.
                    tracing::error!(%call_id, %message, "unreadable job failed");
                }
                Err(e) if e.is_unavailable() => {
                    // PostgreSQL is down: reports go to the spool meanwhile; wait, never give up.
                    drop(permit);
                    tracing::warn!(error = %e, "cannot claim a job: PostgreSQL is unavailable");
                    tokio::select! {
                        () = tokio::time::sleep(Duration::from_secs(1)) => {}
                        () = shutdown.cancelled() => break Ok(()),
                    }
                }
                Err(e) => {
                    drop(permit);
                    queue_failures += 1;
                    tracing::error!(error = %e, failures = queue_failures, "cannot claim a job");
                    if queue_failures >= 5 {
                        break Err(anyhow::Error::new(e).context("the sync queue keeps failing"));
                    }
                    tokio::select! {
                        () = tokio::time::sleep(Duration::from_secs(1)) => {}
                        () = shutdown.cancelled() => break Ok(()),
                    }
                }
            }
        };
        tracker.close();
        tracker.wait().await;
        tracing::info!("sync worker stopped");
        result
    }
}

impl Inner {
    async fn process(&self, mut job: Job, shutdown: CancellationToken) {
        let attempts = job.attempts;
        // The claim as taken (seq, number, lease token): what every state change is fenced by.
        let claim = job.clone();
        let result = tokio::select! {
            r = self.sync_job(&mut job) => r,
            lost = self.keep_lease(&claim) => {
                // Another replica resumes the job from its recorded steps; anything this one
                // had in flight is a step that is safe to repeat (see the module doc of `sync`).
                tracing::warn!(error = %lost, "lost the job's lease: stopped working on it");
                return;
            }
            () = shutdown.cancelled() => {
                // Every step is safe to repeat or checked before repeating, so a step cut short
                // is simply done again by the next start.
                if let Err(e) = self.queue.release(&claim).await {
                    tracing::error!(error = %e, "cannot release the job at shutdown");
                }
                return;
            }
        };
        let recorded = match result {
            Ok(()) => {
                tracing::info!("call synced");
                self.queue.finish(&claim).await
            }
            Err(StepError::Queue(StoreError::LeaseLost)) => {
                tracing::warn!("lost the job's lease: another replica resumes it");
                return;
            }
            Err(StepError::Zendesk(e)) if e.is_retryable() => {
                let delay = self.backoff(attempts, &e);
                tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "call sync will retry");
                self.queue
                    .retry_at(&claim, now_ms() + delay.as_millis() as i64, e.to_string())
                    .await
            }
            Err(e @ (StepError::Queue(_) | StepError::Index(_))) => {
                tracing::error!(error = %e, "queue error during the job; it will be retried");
                let at = now_ms() + self.settings.retry_base.as_millis() as i64;
                self.queue.retry_at(&claim, at, e.to_string()).await
            }
            Err(e) => {
                tracing::warn!(error = %e, "call sync failed permanently");
                self.queue.fail(&claim, e.to_string()).await
            }
        };
        if let Err(e) = recorded {
            tracing::error!(error = %e, "cannot record the job's state; it resumes after a restart or when its lease runs out");
        }
    }

    /// Renews the claim's lease every third of its length; returns only when the lease is lost
    /// (never for SQLite, whose claims need no lease). A renewal that fails because PostgreSQL
    /// is briefly unreachable is retried until the lease would have run out.
    async fn keep_lease(&self, claim: &Job) -> StoreError {
        let Some(every) = self.queue.renew_every() else {
            return std::future::pending().await;
        };
        let mut last_ok = tokio::time::Instant::now();
        loop {
            tokio::time::sleep(every).await;
            match self.queue.renew(claim).await {
                Ok(()) => last_ok = tokio::time::Instant::now(),
                Err(StoreError::LeaseLost) => return StoreError::LeaseLost,
                Err(e) if last_ok.elapsed() >= every * 3 => return e,
                Err(e) => tracing::warn!(error = %e, "cannot renew the job's lease yet"),
            }
        }
    }

    /// `Retry-After` when Zendesk gave one, else `retry_base · 2^(attempt-1)` capped at `retry_max`,
    /// each with ±50 % jitter so a burst of failed jobs does not come back as one burst.
    fn backoff(&self, attempts: u32, e: &ZendeskError) -> Duration {
        let s = &self.settings;
        match e {
            // Never earlier than Zendesk asked.
            ZendeskError::RateLimited { retry_after } => {
                crate::clock::jittered(*retry_after).max(*retry_after)
            }
            _ => crate::clock::jittered(crate::clock::exponential(
                s.retry_base,
                attempts.saturating_sub(1),
                s.retry_max,
            )),
        }
    }

    async fn save(&self, job: &Job) -> Result<(), StepError> {
        Ok(self.queue.save_progress(job, &job.progress).await?)
    }

    async fn sync_job(&self, job: &mut Job) -> Result<(), StepError> {
        // 1. User.
        let mut user = None;
        if job.progress.user_id == 0 {
            match self.find_or_create_user(job).await? {
                Some(u) => {
                    // The customer is known now (perhaps just created): the call is their last
                    // one for sticky routing (see `CallReport::call_taken`). Published before the
                    // step is recorded, as every index change of a step is: a crash in between
                    // repeats the step, and with it the change (applying it twice is harmless).
                    if let Some(change) = job.report.call_taken() {
                        self.writer.apply(change).await?;
                    }
                    job.progress.user_id = u.id;
                    self.save(job).await?;
                    user = Some(u);
                }
                None => {
                    job.progress.note = "no Zendesk user has this number and sync.create does not include \"user\": nothing written".into();
                    self.save(job).await?;
                    return Ok(());
                }
            }
        }

        // 2. Organization.
        if job.progress.organization_id == 0 {
            let user = match user.take() {
                Some(u) => u,
                None => self.user_by_id(job.progress.user_id).await?,
            };
            if let Some(org) = self.organization_for(job, &user).await? {
                job.progress.organization_id = org;
                self.save(job).await?;
            }
        }

        // 3. Ticket (with the call comment as its first comment), or 4. a comment on the open one.
        if job.progress.ticket_id == 0 && job.progress.ticket_request.is_some() {
            // A create may already have reached Zendesk (its answer was lost): replay it with the
            // same Idempotency-Key and body instead of looking for an open ticket, which could be
            // that very ticket and would get this call's comment a second time. Jobs of one number
            // run strictly in order (see the queue's claim), so nothing else created one meanwhile.
            self.create_ticket(job, None).await?;
        }
        if job.progress.ticket_id == 0 {
            match self.open_ticket(job).await? {
                Some(id) => {
                    job.progress.ticket_id = id;
                    self.save(job).await?;
                }
                None if self.settings.create_ticket => {
                    self.create_ticket(job, None).await?;
                }
                None => {
                    job.progress.note = "the user has no open ticket and sync.create does not include \"ticket\": the call comment was not written".into();
                    self.save(job).await?;
                }
            }
        }
        if job.progress.ticket_id != 0 && !job.progress.comment_added {
            self.add_comment(job).await?;
        }

        // 5. Call record.
        if self.settings.create_call && job.progress.call_record_id == 0 {
            self.create_call(job).await?;
        }
        Ok(())
    }

    // ---- step 1: the user ----

    /// The index, this instance's own writes, then Zendesk search (which lags for new users); else
    /// create one when allowed.
    async fn find_or_create_user(&self, job: &mut Job) -> Result<Option<UserInfo>, StepError> {
        let phone = job.report.client_e164;
        if let Some(u) = self.index_customer(phone) {
            return Ok(Some(u));
        }
        if let Some(id) = self.queue.own_user(phone).await? {
            match self.client.show_user(id).await {
                Ok(u) if u.is_active() => {
                    self.writer
                        .apply(Change::user(&u, &self.settings.parser))
                        .await?;
                    return Ok(Some(user_info(&u)));
                }
                // Deleted or suspended since: look further.
                Ok(_) => {}
                Err(ZendeskError::Permanent {
                    reason: Rejection::NotFound,
                    ..
                }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        let found = self.client.search_users_by_phone(phone).await?;
        // Search matches digit suffixes: prefer a user whose stored phone is exactly this number,
        // then the most recently updated (shared numbers, identities).
        let parser = &self.settings.parser;
        if let Some(u) = found
            .iter()
            .filter(|u| u.is_end_user() && u.is_active())
            .max_by_key(|u| {
                (
                    u.phone.as_deref().and_then(|p| parser.parse_stored(p)) == Some(phone),
                    u.updated_at
                        .as_deref()
                        .and_then(zendesk::models::parse_time),
                    u.id,
                )
            })
        {
            self.writer.apply(Change::user(u, parser)).await?;
            return Ok(Some(user_info(u)));
        }
        if !self.settings.create_user {
            return Ok(None);
        }
        let r = &job.report;
        let name = if r.client_name.trim().is_empty() {
            comment::international(phone)
        } else {
            r.client_name.trim().to_owned()
        };
        let request = UserCreate {
            name,
            phone: Some(phone.to_string()),
            role: Some(Role::EndUser),
            // create_or_update matches on external_id, so a retry after a lost answer finds the
            // user the first attempt created instead of making a second one.
            external_id: format!("deskline:{phone}"),
            organization_id: None,
            skip_verify_email: Some(true),
            user_fields: field_values(&self.settings, FieldEntity::User, r),
        };
        let u = self.client.create_or_update_user(&request).await?;
        self.queue.remember_user(phone, u.id).await?;
        self.writer
            .apply(Change::user(&u, &self.settings.parser))
            .await?;
        job.progress.created_user = true;
        tracing::info!(user_id = u.id, phone = %mask(&phone.to_string()), "created the end-user");
        Ok(Some(user_info(&u)))
    }

    /// The customer the index knows on this number (DESIGN §3 rule 6 picks among shared ones).
    fn index_customer(&self, phone: E164) -> Option<UserInfo> {
        let index = self.index.read();
        let c = routing::lookup_caller(&index, phone).customer?;
        Some(UserInfo {
            id: c.id,
            // From the user record, not the caller-ID view: that one omits an organization the
            // index has no name for yet, and the user must not be moved to a new one.
            organization_id: index.user_organization(c.id),
            name: c.name,
        })
    }

    async fn user_by_id(&self, id: i64) -> Result<UserInfo, StepError> {
        Ok(user_info(&self.client.show_user(id).await?))
    }

    // ---- step 2: the organization ----

    async fn organization_for(
        &self,
        job: &mut Job,
        user: &UserInfo,
    ) -> Result<Option<i64>, StepError> {
        if let Some(org) = user.organization_id.filter(|&o| o != 0) {
            return Ok(Some(org));
        }
        if !self.settings.create_organization {
            return Ok(None);
        }
        let r = &job.report;
        let phone = comment::international(r.client_e164);
        let name = self
            .settings
            .organization_name
            .replace("{name}", &user.name)
            .replace("{phone}", &phone);
        let name = if name.trim().is_empty() {
            phone.clone()
        } else {
            name.trim().to_owned()
        };
        let mut request = OrganizationCreate {
            name: name.clone(),
            // Keyed on the number, so a retry (or another job of the number) upserts the same one.
            external_id: format!("deskline-org:{}", r.client_e164),
            organization_fields: field_values(&self.settings, FieldEntity::Organization, r),
        };
        let org = match self.client.create_or_update_organization(&request).await {
            Ok(o) => o,
            // Names are unique in Zendesk: another organization already has this one.
            Err(e) if is_duplicate_name(&e) => {
                request.name = format!("{name} ({phone})");
                match self.client.create_or_update_organization(&request).await {
                    Ok(o) => o,
                    Err(e2) if is_duplicate_name(&e2) => {
                        return Err(StepError::Permanent(format!(
                            "cannot create an organization: the names {name:?} and \"{name} ({phone})\" are taken ({e2})"
                        )));
                    }
                    Err(e2) => return Err(e2.into()),
                }
            }
            Err(e) => return Err(e.into()),
        };
        self.writer.apply(Change::organization(&org)).await?;
        // Recorded only after the link below: the upsert above is safe to repeat, a missing link
        // would not be repaired if the organization counted as done.
        let linked = self
            .client
            .update_user(
                user.id,
                &UserUpdate {
                    organization_id: Some(org.id),
                    ..UserUpdate::default()
                },
            )
            .await?;
        self.writer
            .apply(Change::user(&linked, &self.settings.parser))
            .await?;
        job.progress.created_organization = true;
        self.queue
            .remember_organization(r.client_e164, org.id)
            .await?;
        tracing::info!(organization_id = org.id, "created the organization");
        Ok(Some(org.id))
    }

    // ---- step 3: the ticket ----

    /// The user's open ticket: from the index when it knows the user, else (export lag) from
    /// Zendesk. A user this job has just created has none.
    async fn open_ticket(&self, job: &Job) -> Result<Option<i64>, StepError> {
        let user_id = job.progress.user_id;
        if let Some(id) = self.index_open_ticket(user_id) {
            return Ok(Some(id));
        }
        if job.progress.created_user {
            return Ok(None);
        }
        // Another replica may have created the number's ticket; its index has it, ours may not.
        if let Some(id) = self.queue.own_ticket(job.report.client_e164).await? {
            match self.client.show_ticket(id).await {
                Ok(t) if t.is_open() && t.requester_id == Some(user_id) => {
                    self.writer.apply(Change::ticket(&t)).await?;
                    return Ok(Some(t.id));
                }
                Ok(_) | Err(ZendeskError::Permanent { status: 404, .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        let tickets = self.client.requested_tickets(user_id).await?;
        let mut open: Vec<&Ticket> = tickets.iter().filter(|t| t.is_open()).collect();
        self.writer
            .apply(Change::Tickets(open.iter().map(|&t| t.clone()).collect()))
            .await?;
        // DESIGN §3 rule 4 as far as Zendesk's answer tells: assigned first, then the latest.
        open.sort_by_key(|t| {
            (
                t.assignee_id.is_some_and(|a| a != 0),
                t.updated_at
                    .as_deref()
                    .and_then(zendesk::models::parse_time),
                t.id,
            )
        });
        Ok(open.last().map(|t| t.id))
    }

    /// DESIGN §3 rule 4 for one requester: the most recently updated open ticket (ties: higher id)
    /// with a usable assignee, else the most recently updated open one.
    fn index_open_ticket(&self, user_id: i64) -> Option<i64> {
        let index = self.index.read();
        index
            .open_tickets_of(user_id)
            .max_by_key(|t| {
                let usable = t
                    .assignee_id
                    .and_then(|a| index.agent(a))
                    .is_some_and(|a| a.is_usable());
                (usable, t.updated_at, t.id)
            })
            .map(|t| t.id)
    }

    /// Creates the ticket with the call comment as its first comment; `followup_of` makes it a
    /// follow-up of a closed ticket.
    async fn create_ticket(
        &self,
        job: &mut Job,
        followup_of: Option<i64>,
    ) -> Result<(), StepError> {
        // The persisted text is resent as is, never re-serialized: the replay must be byte for byte
        // the first attempt's body, including one persisted by an earlier version of Deskline.
        let body = match &job.progress.ticket_request {
            Some(saved) => TicketCreateJson::from_stored(saved.clone()).map_err(|e| {
                StepError::Permanent(format!("stored ticket request is unreadable: {e}"))
            })?,
            None => {
                let body = TicketCreateJson::new(&self.ticket_body(job, followup_of))
                    .map_err(|e| StepError::Permanent(format!("ticket request: {e}")))?;
                job.progress.ticket_request = Some(body.as_str().to_owned());
                job.progress.ticket_first_sent_ms = Some(now_ms());
                self.save(job).await?;
                body
            }
        };
        let key = comment::idempotency_key(&job.report.call_id);
        let ticket = self.client.create_ticket(&body, &key).await?;
        self.writer.apply(Change::ticket(&ticket)).await?;
        self.queue
            .remember_ticket(job.report.client_e164, ticket.id)
            .await?;
        job.progress.ticket_id = ticket.id;
        job.progress.created_ticket = true;
        job.progress.comment_added = true;
        job.progress.comment_uncertain = false;
        self.save(job).await?;
        tracing::info!(
            ticket_id = ticket.id,
            followup = followup_of.is_some(),
            "created the ticket"
        );
        Ok(())
    }

    /// Deterministic for the job (no clock in it), and persisted before it is first sent.
    fn ticket_body(&self, job: &Job, followup_of: Option<i64>) -> TicketCreate {
        let r = &job.report;
        let s = &self.settings;
        let (assignee, author) = {
            let index = self.index.read();
            let employee = non_empty(&r.employee_name).and_then(|n| index.agent_by_name(n));
            let senior = s
                .senior_manager
                .as_deref()
                .and_then(|n| index.agent_by_name(n));
            (employee.or(senior), employee)
        };
        TicketCreate {
            subject: comment::subject(r),
            comment: Comment {
                body: comment::body(r, s),
                public: s.comment_public,
                author_id: author,
            },
            requester_id: job.progress.user_id,
            organization_id: Some(job.progress.organization_id).filter(|&o| o != 0),
            assignee_id: assignee,
            priority: Some(s.ticket_priority.clone()),
            kind: Some(s.ticket_type.clone()),
            // Ticket fields are addressed by numeric id; a mapping naming anything else is
            // reported by `deskline check` and skipped here.
            custom_fields: s
                .fields_for(FieldEntity::Ticket)
                .filter_map(|f| {
                    Some(CustomFieldValue {
                        id: f.field.parse::<i64>().ok()?,
                        value: comment::field_value(r, &f.source)?.to_owned(),
                    })
                })
                .collect(),
            via_followup_source_id: followup_of,
        }
    }

    // ---- step 4: the comment on a reused ticket ----

    async fn add_comment(&self, job: &mut Job) -> Result<(), StepError> {
        let ticket_id = job.progress.ticket_id;
        let marker = comment::call_marker(&job.report.call_id);
        if job.progress.comment_uncertain {
            let comments = self.client.ticket_comments(ticket_id).await?;
            let landed = comments.iter().any(|c| {
                [&c.body, &c.plain_body, &c.html_body]
                    .into_iter()
                    .flatten()
                    .any(|b| b.lines().any(|l| l.trim() == marker))
            });
            if landed {
                // The answer that would have carried the ticket's new state was lost (or the
                // process died before publishing it): read it, so the index (every replica's,
                // through the change log) learns it now rather than from the next export.
                match self.client.show_ticket(ticket_id).await {
                    Ok(t) => self.writer.apply(Change::ticket(&t)).await?,
                    Err(ZendeskError::Permanent { status: 404, .. }) => {
                        self.forget_ticket(ticket_id).await?
                    }
                    Err(e) => return Err(e.into()),
                }
                job.progress.comment_added = true;
                job.progress.comment_uncertain = false;
                self.save(job).await?;
                return Ok(());
            }
        }
        let r = &job.report;
        let update = TicketUpdate {
            comment: Comment {
                body: comment::body(r, &self.settings),
                public: self.settings.comment_public,
                author_id: non_empty(&r.employee_name)
                    .and_then(|n| self.index.read().agent_by_name(n)),
            },
        };
        // An intent record: if the answer is lost (or we crash), the retry checks first.
        job.progress.comment_uncertain = true;
        self.save(job).await?;
        match self.client.update_ticket(ticket_id, &update).await {
            Ok(t) => {
                self.writer.apply(Change::ticket(&t)).await?;
                job.progress.comment_added = true;
                job.progress.comment_uncertain = false;
                self.save(job).await?;
                Ok(())
            }
            Err(ZendeskError::Permanent {
                reason: Rejection::TicketClosed,
                ..
            }) => {
                tracing::info!(ticket_id, "ticket is closed: creating a follow-up");
                self.forget_ticket(ticket_id).await?;
                job.progress.comment_uncertain = false;
                job.progress.ticket_id = 0;
                self.create_ticket(job, Some(ticket_id)).await
            }
            Err(ZendeskError::Permanent {
                reason: Rejection::NotFound,
                ..
            }) => {
                tracing::info!(ticket_id, "ticket is gone: creating a new one");
                self.forget_ticket(ticket_id).await?;
                job.progress.comment_uncertain = false;
                job.progress.ticket_id = 0;
                if self.settings.create_ticket {
                    self.create_ticket(job, None).await
                } else {
                    job.progress.note = "the open ticket was deleted and sync.create does not include \"ticket\": the call comment was not written".into();
                    self.save(job).await
                }
            }
            Err(e) => {
                if !e.is_retryable() {
                    // A definite refusal: nothing landed.
                    job.progress.comment_uncertain = false;
                    self.save(job).await?;
                }
                Err(e.into())
            }
        }
    }

    /// Drops a ticket the index still thinks is open (closed or deleted in Zendesk).
    async fn forget_ticket(&self, id: i64) -> Result<(), StepError> {
        Ok(self.writer.apply(Change::TicketGone(id)).await?)
    }

    // ---- step 5: the call record ----

    async fn create_call(&self, job: &mut Job) -> Result<(), StepError> {
        let Some(app_id) = self.settings.talk_app_id else {
            return Ok(());
        };
        let r = &job.report;
        let client_line = r.client_e164.to_string();
        let line = self
            .settings
            .parser
            .parse_stored(&r.line_number)
            .map(|p| p.to_string())
            .unwrap_or_else(|| r.line_number.clone());
        let (from, to, direction) = match r.direction {
            Direction::Incoming => (client_line, line, CallDirection::Inbound),
            Direction::Outgoing | Direction::Callback => {
                (line, client_line, CallDirection::Outbound)
            }
        };
        let ended = r.started_at + i64::from(r.wait_seconds) + i64::from(r.duration_seconds);
        let call = CallCreate {
            call_ended_at: Some(format_time(ended)),
            duration: Some(r.duration_seconds),
            talk_time: Some(r.duration_seconds),
            wait_time: Some(r.wait_seconds),
            end_user_id: Some(job.progress.user_id),
            callback: Some(r.direction == Direction::Callback),
            completion_status: (r.outcome == Outcome::Answered).then(|| "completed".to_owned()),
            ticket_id: Some(job.progress.ticket_id).filter(|&t| t != 0),
            recording_url: (!r.recording_url.is_empty()).then(|| r.recording_url.clone()),
            agent_id: non_empty(&r.employee_name).and_then(|n| self.index.read().agent_by_name(n)),
            ..CallCreate::new(app_id, from, to, format_time(r.started_at), direction)
        };
        let created = self.client.create_call(&call).await?;
        job.progress.call_record_id = created.id;
        if job.progress.call_record_id == 0 {
            return Err(StepError::Permanent(
                "Zendesk created the call record but returned no id".into(),
            ));
        }
        self.save(job).await
    }
}

/// The mapped custom user or organization fields, keyed by field key (DESIGN §4); sources the
/// report leaves empty are left out.
fn field_values(s: &SyncSettings, entity: FieldEntity, r: &CallReport) -> FieldValues {
    s.fields_for(entity)
        .filter_map(|f| {
            Some((
                f.field.clone(),
                comment::field_value(r, &f.source)?.to_owned(),
            ))
        })
        .collect()
}

fn user_info(u: &User) -> UserInfo {
    UserInfo {
        id: u.id,
        name: u.name.clone().unwrap_or_default(),
        organization_id: u.organization_id.filter(|&o| o != 0),
    }
}

fn non_empty(s: &str) -> Option<&str> {
    let s = s.trim();
    (!s.is_empty()).then_some(s)
}

/// Zendesk's 422 for a name another organization has (`DuplicateValue` on `name`).
fn is_duplicate_name(e: &ZendeskError) -> bool {
    matches!(e.rejection(), Some(Rejection::Duplicate { field }) if field == "name")
}
