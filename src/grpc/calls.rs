//! Proto ↔ domain conversion for the post-call RPCs (`ReportCall`, `GetCallStatus`).

use crate::{
    phone::PhoneParser,
    proto,
    sync::{CallReport, CallStatus, Direction, Outcome, SyncState},
};

use super::{ApiError, invalid};

/// Builds and validates a [`CallReport`]: every problem is an `INVALID_ARGUMENT` naming its field.
pub(super) fn report_from_proto(
    req: proto::ReportCallRequest,
    parser: &PhoneParser,
) -> Result<CallReport, ApiError> {
    let direction = match proto::Direction::try_from(req.direction) {
        Ok(proto::Direction::Incoming) => Direction::Incoming,
        Ok(proto::Direction::Outgoing) => Direction::Outgoing,
        Ok(proto::Direction::Callback) => Direction::Callback,
        _ => {
            return Err(invalid(
                "direction",
                "required: INCOMING, OUTGOING or CALLBACK",
            ));
        }
    };
    let outcome = match proto::Outcome::try_from(req.outcome) {
        Ok(proto::Outcome::Answered) => Outcome::Answered,
        Ok(proto::Outcome::Missed) => Outcome::Missed,
        Ok(proto::Outcome::Busy) => Outcome::Busy,
        Ok(proto::Outcome::Failed) => Outcome::Failed,
        Ok(proto::Outcome::Voicemail) => Outcome::Voicemail,
        _ => {
            return Err(invalid(
                "outcome",
                "required: ANSWERED, MISSED, BUSY, FAILED or VOICEMAIL",
            ));
        }
    };
    if req.client_number.trim().is_empty() {
        return Err(invalid("client_number", "required"));
    }
    let client_e164 = parser
        .parse(&req.client_number)
        .map_err(|e| invalid("client_number", e.to_string()))?;
    let started_at = match req.started_at {
        Some(t) if t.seconds > 0 && (0..1_000_000_000).contains(&t.nanos) => t.seconds,
        Some(_) => return Err(invalid("started_at", "not a valid time")),
        None => return Err(invalid("started_at", "required")),
    };
    let report = CallReport {
        call_id: req.call_id,
        direction,
        outcome,
        client_number: req.client_number,
        client_e164,
        line_number: req.line_number,
        started_at,
        duration_seconds: req.duration_seconds,
        wait_seconds: req.wait_seconds,
        recording_url: req.recording_url,
        employee_name: req.employee_name,
        employee_extension: req.employee_extension,
        scheme_name: req.scheme_name,
        utm: req.utm.into_iter().collect(),
        extra: req.extra.into_iter().collect(),
        client_name: req.client_name,
    };
    report.validate().map_err(|e| invalid(e.field, e.message))?;
    Ok(report)
}

pub(super) fn status_to_proto(s: CallStatus) -> proto::GetCallStatusResponse {
    use proto::get_call_status_response::SyncState as P;
    let state = match s.state {
        SyncState::Queued => P::Queued,
        SyncState::InProgress => P::InProgress,
        SyncState::RetryWait => P::RetryWait,
        SyncState::Done => P::Done,
        SyncState::Failed => P::Failed,
    };
    proto::GetCallStatusResponse {
        call_id: s.call_id,
        state: state as i32,
        attempts: s.attempts,
        last_error: s.last_error,
        user_id: s.user_id,
        organization_id: s.organization_id,
        ticket_id: s.ticket_id,
        created_user: s.created_user,
        created_organization: s.created_organization,
        created_ticket: s.created_ticket,
        comment_added: s.comment_added,
        call_record_id: s.call_record_id,
        next_attempt_at: s.next_attempt_at.map(|secs| prost_types::Timestamp {
            seconds: secs,
            nanos: 0,
        }),
    }
}
