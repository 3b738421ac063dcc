//! What a call looks like in Zendesk: the ticket subject, the call comment, mapped field values and
//! the idempotency key. Pure functions of the report and the settings, so a retry renders the same
//! text (no "now" anywhere).

use std::fmt::Write as _;

use super::{CallReport, Direction, Outcome, SyncSettings};
use crate::phone::E164;

/// Every call comment ends with this line; a retry whose first attempt had an unknown outcome looks
/// for it among the ticket's comments before commenting again.
pub(crate) fn call_marker(call_id: &str) -> String {
    format!("Call ID: {call_id}")
}

/// `+380 44 123 4567`, or the plain E.164 if the metadata cannot format it.
pub(crate) fn international(phone: E164) -> String {
    phonenumber::parse(None, phone.to_string())
        .map(|n| {
            n.format()
                .mode(phonenumber::Mode::International)
                .to_string()
        })
        .unwrap_or_else(|_| phone.to_string())
}

fn call_type(r: &CallReport) -> &'static str {
    match (r.direction, r.outcome) {
        (Direction::Incoming, Outcome::Answered) => "Incoming call",
        (Direction::Incoming, _) => "Missed call",
        (Direction::Outgoing, _) => "Outgoing call",
        (Direction::Callback, _) => "Callback",
    }
}

/// "Incoming call from +380 44 123 4567", "Missed call from …", "Outgoing call to …", "Callback to …".
pub(crate) fn subject(r: &CallReport) -> String {
    let prep = match r.direction {
        Direction::Incoming => "from",
        Direction::Outgoing | Direction::Callback => "to",
    };
    format!("{} {prep} {}", call_type(r), international(r.client_e164))
}

fn outcome_text(o: Outcome) -> &'static str {
    match o {
        Outcome::Answered => "answered",
        Outcome::Missed => "missed",
        Outcome::Busy => "busy",
        Outcome::Failed => "failed",
        Outcome::Voicemail => "voicemail",
    }
}

fn direction_text(d: Direction) -> &'static str {
    match d {
        Direction::Incoming => "Incoming",
        Direction::Outgoing => "Outgoing",
        Direction::Callback => "Callback",
    }
}

/// "4 min 10 s", "12 s", "1 h 2 min 0 s".
pub(crate) fn duration(secs: u32) -> String {
    let (h, m, s) = (secs / 3600, secs / 60 % 60, secs % 60);
    match (h, m) {
        (0, 0) => format!("{s} s"),
        (0, _) => format!("{m} min {s} s"),
        _ => format!("{h} h {m} min {s} s"),
    }
}

/// The call comment (plain text, one fact per line).
pub(crate) fn body(r: &CallReport, s: &SyncSettings) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{} call, {}",
        direction_text(r.direction),
        outcome_text(r.outcome)
    );
    let when = jiff::Timestamp::from_second(r.started_at)
        .map(|t| {
            t.to_zoned_datetime(s.time_zone.clone())
                .strftime("%Y-%m-%d %H:%M:%S %Z")
                .to_string()
        })
        .unwrap_or_else(|_| r.started_at.to_string());
    let _ = writeln!(out, "Date: {when} ({})", s.time_zone_name);
    let _ = writeln!(out, "Client: {}", international(r.client_e164));
    let _ = writeln!(out, "Talk time: {}", duration(r.duration_seconds));
    let _ = writeln!(out, "Wait time: {}", duration(r.wait_seconds));
    if r.recording_url.is_empty() {
        let _ = writeln!(out, "Recording: none");
    } else {
        // USERS.md 11: say what the link is; it may expire or need PBX credentials.
        let _ = writeln!(
            out,
            "Recording (the PBX's link, it may need PBX access): {}",
            r.recording_url
        );
    }
    if !r.employee_name.is_empty() || !r.employee_extension.is_empty() {
        let ext = if r.employee_extension.is_empty() {
            String::new()
        } else {
            format!(" (ext. {})", r.employee_extension)
        };
        let _ = writeln!(out, "Employee: {}{ext}", r.employee_name);
    }
    if !r.line_number.is_empty() {
        let _ = writeln!(out, "Line: {}", r.line_number);
    }
    if !r.scheme_name.is_empty() {
        let _ = writeln!(out, "Forwarding scheme: {}", r.scheme_name);
    }
    if !r.utm.is_empty() {
        let tags: Vec<String> = r.utm.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let _ = writeln!(out, "UTM: {}", tags.join(", "));
    }
    out.push_str(&call_marker(&r.call_id));
    out
}

/// The value a `[[sync.fields]]` source takes for this report; `None` when absent or empty.
pub(crate) fn field_value<'a>(r: &'a CallReport, source: &str) -> Option<&'a str> {
    let v = match source {
        "scheme_name" => Some(r.scheme_name.as_str()),
        "line_number" => Some(r.line_number.as_str()),
        s => match s.strip_prefix("extra.") {
            Some(k) => r.extra.get(k).map(String::as_str),
            None => r.utm.get(s).map(String::as_str),
        },
    };
    v.filter(|v| !v.is_empty())
}

/// `Idempotency-Key` for the job's ticket create: `deskline-call-<call_id>` when the id is plain
/// ASCII (header values must be), else a stable 128-bit hash of it.
pub(crate) fn idempotency_key(call_id: &str) -> String {
    if call_id.bytes().all(|b| b.is_ascii_graphic()) {
        format!("deskline-call-{call_id}")
    } else {
        format!(
            "deskline-call-h{:016x}{:016x}",
            fnv1a(call_id.as_bytes(), 0xcbf2_9ce4_8422_2325),
            fnv1a(call_id.as_bytes(), 0x6c62_272e_07bb_0142)
        )
    }
}

/// FNV-1a: stable across builds and Rust versions (unlike `DefaultHasher`), which the key must be
/// for a retry after an upgrade.
fn fnv1a(bytes: &[u8], basis: u64) -> u64 {
    bytes.iter().fold(basis, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        config::{FieldEntity, FieldMapping},
        sync::test_support::report,
    };

    fn settings() -> SyncSettings {
        let text = "[zendesk]\nurl = \"https://a.zendesk.com\"\nemail = \"a@b.c\"\ntoken = \"t\"\n";
        let cfg = crate::config::Config::from_toml_and_env(
            text,
            std::path::Path::new("t.toml"),
            Vec::new(),
        )
        .unwrap();
        SyncSettings::from_config(&cfg).unwrap()
    }

    #[test]
    fn comment_carries_every_fact() {
        let mut r = report("c-42", 380441234567);
        r.utm.insert("utm_campaign".into(), "spring".into());
        let b = body(&r, &settings());
        for want in [
            "Incoming call, answered",
            // 2024-05-01T10:00:00Z is 13:00 summer time in Kyiv.
            "Date: 2024-05-01 13:00:00 EEST (Europe/Kyiv)",
            "Client: +380 44 123 4567",
            "Talk time: 4 min 10 s",
            "Wait time: 12 s",
            "Recording (the PBX's link, it may need PBX access): https://pbx.example/rec/abc.mp3",
            "Employee: Olena Petrenko (ext. 101)",
            "Line: +380441110000",
            "Forwarding scheme: Sales",
            "UTM: utm_campaign=spring, utm_source=google",
            "Call ID: c-42",
        ] {
            assert!(b.contains(want), "{want:?} missing from\n{b}");
        }
    }

    #[test]
    fn subjects_name_the_call_type() {
        let mut r = report("c", 380441234567);
        assert_eq!(subject(&r), "Incoming call from +380 44 123 4567");
        r.outcome = Outcome::Missed;
        assert_eq!(subject(&r), "Missed call from +380 44 123 4567");
        r.direction = Direction::Outgoing;
        assert_eq!(subject(&r), "Outgoing call to +380 44 123 4567");
        r.direction = Direction::Callback;
        assert_eq!(subject(&r), "Callback to +380 44 123 4567");
    }

    #[test]
    fn durations() {
        assert_eq!(duration(0), "0 s");
        assert_eq!(duration(250), "4 min 10 s");
        assert_eq!(duration(3720), "1 h 2 min 0 s");
    }

    #[test]
    fn field_sources() {
        let mut r = report("c", 380441234567);
        r.extra.insert("deal".into(), "D-1".into());
        let _ = FieldMapping {
            entity: FieldEntity::User,
            field: "x".into(),
            source: "utm_source".into(),
        };
        assert_eq!(field_value(&r, "utm_source"), Some("google"));
        assert_eq!(field_value(&r, "utm_medium"), None);
        assert_eq!(field_value(&r, "scheme_name"), Some("Sales"));
        assert_eq!(field_value(&r, "line_number"), Some("+380441110000"));
        assert_eq!(field_value(&r, "extra.deal"), Some("D-1"));
        assert_eq!(field_value(&r, "extra.none"), None);
    }

    #[test]
    fn idempotency_keys_are_header_safe_and_stable() {
        assert_eq!(idempotency_key("abc-1"), "deskline-call-abc-1");
        let k = idempotency_key("дзвінок 1");
        assert!(k.is_ascii() && k.len() == "deskline-call-h".len() + 32);
        assert_eq!(k, idempotency_key("дзвінок 1"));
        assert_ne!(k, idempotency_key("дзвінок 2"));
    }
}
