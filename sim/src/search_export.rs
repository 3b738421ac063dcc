//! `GET /api/v2/search/export` (ZENDESK.md §8): the search syntax over one record type
//! (`filter[type]=ticket|user`, required), cursor pagination of up to 1000 records a page, an
//! `after_cursor` that expires an hour after it was issued ([`SimConfig::search_cursor_ttl`]), and
//! its own 100-a-minute limit on top of the account budget (`http.rs`).
//!
//! The answer has the real shape: `results` (each record with `result_type`), `facets: null`,
//! `meta: {has_more, after_cursor, before_cursor}`, `links: {next, prev}`.
//!
//! Understood query terms: `type:ticket|user`, `status:X` and `status<X`, `status<=X`, `status>X`,
//! `status>=X` (Zendesk's order new < open < pending < hold < solved < closed), `role:X` for users.
//! Like `/search`, records created or changed within [`SimConfig::search_delay`] are not found yet
//! (the indexing lag), deleted tickets and deleted users never are. Records are returned in store
//! order (ascending id); the cursor is the store position after the last one looked at, so records
//! created while a client pages through are found at the end.
//!
//! An expired or malformed cursor answers 400 `InvalidPaginationParameter` (the exact error Zendesk
//! gives for an expired cursor is UNVERIFIED).

use axum::http::StatusCode;
use base64::Engine as _;
use serde::Serialize;

use super::{
    SimConfig,
    http::{App, Query, Reply},
    render::{TicketOut, UserOut},
    store::{Role, Status, now_ms},
};

/// Records per page without `page[size]`, and the most a page may hold.
const DEFAULT_PAGE: usize = 100;
const MAX_PAGE: usize = 1000;

#[derive(Serialize)]
struct Hit<T> {
    #[serde(flatten)]
    record: T,
    result_type: &'static str,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Ticket,
    User,
}

/// A `status` condition: the statuses whose rank compares as `op` with the rank of `value`.
#[derive(Clone, Copy)]
struct StatusCond {
    op: std::cmp::Ordering,
    or_equal: bool,
    rank: usize,
}

fn rank(s: Status) -> usize {
    Status::ALL
        .iter()
        .position(|x| *x == s)
        .unwrap_or(usize::MAX)
}

impl StatusCond {
    fn matches(&self, s: Status) -> bool {
        let r = rank(s);
        r.cmp(&self.rank) == self.op || (self.or_equal && r == self.rank)
    }
}

fn parse_status(tok: &str) -> Option<StatusCond> {
    use std::cmp::Ordering::*;
    let rest = tok.strip_prefix("status")?;
    let (op, or_equal, v) = if let Some(v) = rest.strip_prefix("<=") {
        (Less, true, v)
    } else if let Some(v) = rest.strip_prefix(">=") {
        (Greater, true, v)
    } else if let Some(v) = rest.strip_prefix('<') {
        (Less, false, v)
    } else if let Some(v) = rest.strip_prefix('>') {
        (Greater, false, v)
    } else if let Some(v) = rest.strip_prefix(':') {
        (Equal, false, v)
    } else {
        return None;
    };
    let status = Status::ALL.iter().find(|s| s.as_str() == v)?;
    Some(StatusCond {
        op,
        or_equal,
        rank: rank(*status),
    })
}

fn bad(desc: &str) -> Reply {
    Reply::error(StatusCode::BAD_REQUEST, "InvalidPaginationParameter", desc)
}

fn encode_cursor(kind: Kind, pos: usize, issued_ms: i64) -> String {
    let k = if kind == Kind::Ticket { 't' } else { 'u' };
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!("se{k}{pos}.{issued_ms}"))
}

fn decode_cursor(c: &str, kind: Kind) -> Option<(usize, i64)> {
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(c.trim())
        .ok()?;
    let s = std::str::from_utf8(&raw).ok()?;
    let k = if kind == Kind::Ticket { 't' } else { 'u' };
    let (pos, at) = s.strip_prefix("se")?.strip_prefix(k)?.split_once('.')?;
    Some((pos.parse().ok()?, at.parse().ok()?))
}

pub(crate) fn search_export(app: &App, cfg: &SimConfig, q: &Query) -> Reply {
    let kind = match q.get("filter[type]") {
        Some("ticket") => Kind::Ticket,
        Some("user") => Kind::User,
        Some(_) => {
            return Reply::error(
                StatusCode::BAD_REQUEST,
                "InvalidValue",
                "filter[type] must be one of ticket, user, organization, group",
            );
        }
        None => {
            return Reply::error(
                StatusCode::BAD_REQUEST,
                "InvalidValue",
                "filter[type] is required",
            );
        }
    };
    let Some(query) = q.get("query") else {
        return Reply::error(
            StatusCode::BAD_REQUEST,
            "InvalidValue",
            "Parameter query is required",
        );
    };
    let mut status = None;
    let mut role = None;
    let mut other_type = false;
    for tok in query.split_whitespace() {
        if let Some(t) = tok.strip_prefix("type:") {
            other_type |= t
                != if kind == Kind::Ticket {
                    "ticket"
                } else {
                    "user"
                };
        } else if let Some(r) = tok.strip_prefix("role:") {
            role = Role::parse(r.trim_matches('"'));
        } else if tok.starts_with("status") {
            match parse_status(tok) {
                Some(c) => status = Some(c),
                None => {
                    return Reply::error(
                        StatusCode::BAD_REQUEST,
                        "InvalidValue",
                        "unknown status in query",
                    );
                }
            }
        }
    }
    let size = q
        .get("page[size]")
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(DEFAULT_PAGE)
        .clamp(1, MAX_PAGE);
    let now = now_ms();
    let start = match q.get("page[after]") {
        None => 0,
        Some(c) => match decode_cursor(c, kind) {
            None => return bad("Invalid cursor"),
            Some((_, issued)) if now - issued >= cfg.search_cursor_ttl.as_millis() as i64 => {
                return bad("The cursor has expired");
            }
            Some((pos, _)) => pos,
        },
    };
    let visible_before = now - cfg.search_delay.as_millis() as i64;
    let s = app.store.read();
    let (results, next, total): (Vec<serde_json::Value>, usize, usize) = match kind {
        Kind::Ticket => {
            let total = s.tickets.len();
            let mut out = Vec::new();
            let mut p = start.min(total);
            while p < total && out.len() < size {
                let t = &s.tickets[p];
                p += 1;
                if other_type
                    || t.status == Status::Deleted
                    || s.ticket_log.entries[t.log_pos as usize].0 > visible_before
                    || status.is_some_and(|c| !c.matches(t.status))
                {
                    continue;
                }
                out.push(
                    serde_json::to_value(Hit {
                        record: TicketOut::new(&app.base, t, false),
                        result_type: "ticket",
                    })
                    .unwrap_or_default(),
                );
            }
            (out, p, total)
        }
        Kind::User => {
            let total = s.users.len();
            let mut out = Vec::new();
            let mut p = start.min(total);
            while p < total && out.len() < size {
                let u = &s.users[p];
                p += 1;
                if other_type
                    || !u.active
                    || s.user_log.entries[u.log_pos as usize].0 > visible_before
                    || role.is_some_and(|r| u.role != r)
                {
                    continue;
                }
                out.push(
                    serde_json::to_value(Hit {
                        record: UserOut::new(&app.base, u),
                        result_type: "user",
                    })
                    .unwrap_or_default(),
                );
            }
            (out, p, total)
        }
    };
    let has_more = next < total;
    let cursor = has_more.then(|| encode_cursor(kind, next, now));
    let next_link = cursor.as_ref().map(|c| {
        format!(
            "{}/api/v2/search/export.json?filter%5Btype%5D={}&page%5Bafter%5D={c}&page%5Bsize%5D={size}&query={}",
            app.base,
            if kind == Kind::Ticket { "ticket" } else { "user" },
            super::http::form_encode(query),
        )
    });
    Reply::ok(&serde_json::json!({
        "results": results,
        "facets": null,
        "meta": { "has_more": has_more, "after_cursor": cursor, "before_cursor": null },
        "links": { "next": next_link, "prev": null },
    }))
}
