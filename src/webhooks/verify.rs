//! The signature check of a Zendesk webhook request (ZENDESK.md §10): the signature header is
//! `base64(HMAC-SHA256(signing_secret, timestamp + raw_body))`, the timestamp header ISO 8601.
//!
//! Why in this order: the signature is checked first and in constant time (the comparison never
//! stops at the first differing byte, so timing tells an attacker nothing about the expected MAC);
//! only an authentic request is then judged by its age, so `stale` counts replays of genuine
//! requests and `bad_signature` everything forged. Nothing here can panic on any input.

use base64::Engine as _;
use hmac::{Hmac, KeyInit as _, Mac as _};
use sha2::Sha256;
use subtle::ConstantTimeEq as _;

/// How far the signature timestamp may be from our clock (DESIGN §9).
pub(crate) const MAX_SKEW_SECONDS: i64 = 300;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum VerifyError {
    #[error("missing or unreadable signature headers")]
    MissingHeaders,
    #[error("signature does not match")]
    BadSignature,
    #[error("signature timestamp more than {MAX_SKEW_SECONDS} s off")]
    Stale,
}

/// `base64(HMAC-SHA256(secret, timestamp + body))`, as Zendesk computes it.
pub fn sign(secret: &[u8], timestamp: &str, body: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(mac(secret, timestamp, body))
}

fn mac(secret: &[u8], timestamp: &str, body: &[u8]) -> [u8; 32] {
    // HMAC accepts keys of any length, so this never fails; an empty MAC would then never match.
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret) else {
        return [0; 32];
    };
    mac.update(timestamp.as_bytes());
    mac.update(body);
    mac.finalize().into_bytes().into()
}

/// Checks one request. `now_secs`: our clock, Unix seconds.
pub(crate) fn verify(
    secret: &[u8],
    signature: Option<&[u8]>,
    timestamp: Option<&[u8]>,
    body: &[u8],
    now_secs: i64,
) -> Result<(), VerifyError> {
    let (Some(signature), Some(timestamp)) = (signature, timestamp) else {
        return Err(VerifyError::MissingHeaders);
    };
    let timestamp = std::str::from_utf8(timestamp).map_err(|_| VerifyError::MissingHeaders)?;
    let Ok(given) = base64::engine::general_purpose::STANDARD.decode(signature.trim_ascii()) else {
        return Err(VerifyError::BadSignature);
    };
    let expected = mac(secret, timestamp, body);
    // The length of a SHA-256 MAC is public; only the bytes are compared in constant time.
    if given.len() != expected.len() || !bool::from(given.as_slice().ct_eq(&expected)) {
        return Err(VerifyError::BadSignature);
    }
    let at = timestamp
        .trim()
        .parse::<jiff::Timestamp>()
        .map_err(|_| VerifyError::Stale)?
        .as_second();
    if (now_secs.saturating_sub(at)).abs() > MAX_SKEW_SECONDS {
        return Err(VerifyError::Stale);
    }
    Ok(())
}

/// [`verify`] against each of `secrets` (one per installed webhook): passes when one of them
/// signed the request. A valid signature with a stale timestamp is `Stale`, whatever the others say.
pub(crate) fn verify_any<'a>(
    secrets: impl IntoIterator<Item = &'a [u8]>,
    signature: Option<&[u8]>,
    timestamp: Option<&[u8]>,
    body: &[u8],
    now_secs: i64,
) -> Result<(), VerifyError> {
    let mut last = VerifyError::BadSignature;
    for secret in secrets {
        match verify(secret, signature, timestamp, body, now_secs) {
            Ok(()) => return Ok(()),
            Err(VerifyError::Stale) => return Err(VerifyError::Stale),
            Err(e) => last = e,
        }
    }
    Err(last)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const NOW: i64 = 1_616_649_000; // 2021-03-25T05:10:00Z
    const TS: &str = "2021-03-25T05:09:27Z";

    #[test]
    fn accepts_what_it_signs_and_refuses_changes() {
        let body = br#"{"type":"zen:event-type:ticket.created"}"#;
        let sig = sign(b"secret", TS, body);
        let ok = |s: &[u8], sig: &str, ts: &str, b: &[u8], now| {
            verify(s, Some(sig.as_bytes()), Some(ts.as_bytes()), b, now)
        };
        assert_eq!(ok(b"secret", &sig, TS, body, NOW), Ok(()));
        assert_eq!(
            ok(b"other", &sig, TS, body, NOW),
            Err(VerifyError::BadSignature)
        );
        assert_eq!(
            ok(b"secret", &sig, TS, b"{}", NOW),
            Err(VerifyError::BadSignature)
        );
        let later = "2021-03-25T05:09:28Z";
        assert_eq!(
            ok(b"secret", &sig, later, body, NOW),
            Err(VerifyError::BadSignature)
        );
        assert_eq!(
            ok(b"secret", &sig, TS, body, NOW + 400),
            Err(VerifyError::Stale)
        );
        assert_eq!(
            verify(b"secret", None, Some(TS.as_bytes()), body, NOW),
            Err(VerifyError::MissingHeaders)
        );
    }

    /// `install --trigger` makes two webhooks with a secret each: a request signed by either passes,
    /// one signed by neither does not, and a good signature with an old timestamp stays stale.
    #[test]
    fn any_of_several_secrets_passes() {
        let body = br#"{"type":"zen:event-type:user.created"}"#;
        let users = sign(b"users-secret", TS, body);
        let tickets = sign(b"tickets-secret", TS, body);
        let forged = sign(b"forged", TS, body);
        let both: [&[u8]; 2] = [b"tickets-secret", b"users-secret"];
        let check =
            |sig: &str, now| verify_any(both, Some(sig.as_bytes()), Some(TS.as_bytes()), body, now);
        assert_eq!(check(&users, NOW), Ok(()));
        assert_eq!(check(&tickets, NOW), Ok(()));
        assert_eq!(check(&forged, NOW), Err(VerifyError::BadSignature));
        assert_eq!(check(&users, NOW + 400), Err(VerifyError::Stale));
        assert_eq!(
            verify_any([], Some(users.as_bytes()), Some(TS.as_bytes()), body, NOW),
            Err(VerifyError::BadSignature)
        );
    }

    proptest! {
        #[test]
        fn never_panics(secret in proptest::collection::vec(any::<u8>(), 0..64),
                        sig in proptest::option::of(proptest::collection::vec(any::<u8>(), 0..80)),
                        ts in proptest::option::of(proptest::collection::vec(any::<u8>(), 0..40)),
                        body in proptest::collection::vec(any::<u8>(), 0..256),
                        now in any::<i64>()) {
            let r = verify(&secret, sig.as_deref(), ts.as_deref(), &body, now);
            prop_assert!(r.is_err() || sig.is_some());
        }

        #[test]
        fn signed_requests_pass(secret in proptest::collection::vec(any::<u8>(), 1..64),
                                body in proptest::collection::vec(any::<u8>(), 0..256),
                                skew in -MAX_SKEW_SECONDS..=MAX_SKEW_SECONDS) {
            let ts = jiff::Timestamp::from_second(NOW).unwrap().to_string();
            let sig = sign(&secret, &ts, &body);
            prop_assert_eq!(verify(&secret, Some(sig.as_bytes()), Some(ts.as_bytes()), &body, NOW + skew), Ok(()));
        }
    }
}
