//! The schema against its documentation: every key in README's configuration table is set both
//! ways (TOML and environment) with a non-default value and read back typed; several problems are
//! reported at once; secrets never show.

use std::path::Path;

use secrecy::ExposeSecret;

use super::{Config, ConfigError, Credentials, Entity, FieldEntity};

const MIN: &str = r#"
[zendesk]
url = "https://acme.zendesk.com"
email = "ops@acme.com"
token = "s3cr3t-token-value"
"#;

fn load(text: &str, env: &[(String, String)]) -> Result<Config, ConfigError> {
    Config::from_toml_and_env(text, Path::new("t.toml"), env.iter().cloned())
}

/// One documented key: its value as TOML and as an environment string, keys to drop from [`MIN`]
/// (a token file replaces the token), keys it needs beside it, and the typed value to expect.
struct Case {
    key: &'static str,
    toml: String,
    env: String,
    drop: &'static [&'static str],
    with: &'static [(&'static str, &'static str)],
    check: fn(&Config),
}

fn case(key: &'static str, toml: &str, env: &str, check: fn(&Config)) -> Case {
    Case {
        key,
        toml: toml.to_owned(),
        env: env.to_owned(),
        drop: &[],
        with: &[],
        check,
    }
}

fn token(c: &Config) -> String {
    match c.credentials().unwrap() {
        Credentials::ApiToken { token, .. } | Credentials::OAuth { token } => {
            token.expose_secret().to_owned()
        }
    }
}

fn cases(dir: &Path) -> Vec<Case> {
    let file = |name: &str, content: &str| {
        let p = dir.join(name);
        std::fs::write(&p, content).unwrap();
        p.display().to_string()
    };
    let quoted = |s: &str| format!("{s:?}");
    let token_file = file("token", "file-token-value\n");
    let oauth_file = file("oauth", "file-oauth-value\n");
    let pg_file = file("pg", "postgres://u:file@db/deskline\n");
    let secret_file = file("whsec", "file-signing-secret\n");
    let directory = r#"{ "Olena Petrenko" = "101", "Іван Коваленко" = "0102" }"#;
    let fields = r#"[{ entity = "ticket", field = "360001111", source = "utm_source" }]"#;
    vec![
        case(
            "server.listen",
            "\"127.0.0.2:6000\"",
            "127.0.0.2:6000",
            |c| assert_eq!(c.server.listen.to_string(), "127.0.0.2:6000"),
        ),
        case(
            "server.tokens",
            r#"["a-token-of-16-chars-1", "a-token-of-16-chars-2"]"#,
            "a-token-of-16-chars-1, a-token-of-16-chars-2",
            |c| {
                let t: Vec<_> = c.server.tokens.iter().map(|t| t.expose_secret()).collect();
                assert_eq!(t, ["a-token-of-16-chars-1", "a-token-of-16-chars-2"]);
            },
        ),
        case(
            "server.metrics_listen",
            "\"127.0.0.1:9100\"",
            "127.0.0.1:9100",
            |c| assert_eq!(c.server.metrics_listen, Some(([127, 0, 0, 1], 9100).into())),
        ),
        Case {
            with: &[("server.tls_key", "\"/x/key.pem\"")],
            ..case("server.tls_cert", "\"/x/cert.pem\"", "/x/cert.pem", |c| {
                assert_eq!(c.server.tls_cert.as_deref(), Some(Path::new("/x/cert.pem")))
            })
        },
        Case {
            with: &[("server.tls_cert", "\"/x/cert.pem\"")],
            ..case("server.tls_key", "\"/x/key.pem\"", "/x/key.pem", |c| {
                assert_eq!(c.server.tls_key.as_deref(), Some(Path::new("/x/key.pem")))
            })
        },
        case("server.shutdown_grace_seconds", "45", "45", |c| {
            assert_eq!(c.server.shutdown_grace_seconds, 45)
        }),
        case(
            "zendesk.url",
            "\"https://other.zendesk.com\"",
            "https://other.zendesk.com",
            |c| assert_eq!(c.zendesk.url, "https://other.zendesk.com"),
        ),
        case("zendesk.email", "\"ops2@acme.com\"", "ops2@acme.com", |c| {
            assert_eq!(c.zendesk.email.as_deref(), Some("ops2@acme.com"))
        }),
        // A numeric token stays a string: the field says so, not the text.
        case("zendesk.token", "\"987654321\"", "987654321", |c| {
            assert_eq!(token(c), "987654321")
        }),
        Case {
            drop: &["zendesk.token"],
            ..case(
                "zendesk.token_file",
                &quoted(&token_file),
                &token_file,
                |c| assert_eq!(token(c), "file-token-value"),
            )
        },
        Case {
            drop: &["zendesk.token", "zendesk.email"],
            ..case(
                "zendesk.oauth_token",
                "\"oauth-value\"",
                "oauth-value",
                |c| {
                    assert!(matches!(
                        c.credentials().unwrap(),
                        Credentials::OAuth { .. }
                    ));
                    assert_eq!(token(c), "oauth-value");
                },
            )
        },
        Case {
            drop: &["zendesk.token", "zendesk.email"],
            ..case(
                "zendesk.oauth_token_file",
                &quoted(&oauth_file),
                &oauth_file,
                |c| assert_eq!(token(c), "file-oauth-value"),
            )
        },
        case("zendesk.requests_per_minute", "400", "400", |c| {
            assert_eq!(c.zendesk.requests_per_minute, 400)
        }),
        case("zendesk.export_requests_per_minute", "30", "30", |c| {
            assert_eq!(c.zendesk.export_requests_per_minute, 30)
        }),
        case("zendesk.timeout_seconds", "5", "5", |c| {
            assert_eq!(c.zendesk.timeout_seconds, 5)
        }),
        case("zendesk.replicas", "5", "5", |c| {
            assert_eq!(c.zendesk.replicas, 5)
        }),
        case(
            "zendesk.search_export_requests_per_minute",
            "50",
            "50",
            |c| assert_eq!(c.zendesk.search_export_requests_per_minute, 50),
        ),
        case("zendesk.rate_window_ms", "6000", "6000", |c| {
            assert_eq!(c.zendesk.rate_window_ms, 6000);
            assert_eq!(
                c.client_options().unwrap().rate_window,
                std::time::Duration::from_secs(6)
            );
        }),
        case(
            "storage.data_dir",
            "\"/var/lib/deskline\"",
            "/var/lib/deskline",
            |c| assert_eq!(c.storage.data_dir, Path::new("/var/lib/deskline")),
        ),
        case(
            "storage.postgres_url",
            "\"postgres://u:p@db/deskline\"",
            "postgres://u:p@db/deskline",
            |c| {
                let url = c.postgres_url().unwrap().unwrap();
                assert_eq!(url.expose_secret(), "postgres://u:p@db/deskline");
            },
        ),
        case(
            "storage.postgres_url_file",
            &quoted(&pg_file),
            &pg_file,
            |c| {
                let url = c.postgres_url().unwrap().unwrap();
                assert_eq!(url.expose_secret(), "postgres://u:file@db/deskline");
            },
        ),
        case(
            "storage.postgres_ca_file",
            &quoted(&pg_file),
            &pg_file,
            |c| {
                let ca = c.storage.postgres_ca_file.as_deref().unwrap();
                assert!(ca.ends_with("pg"), "{}", ca.display());
            },
        ),
        case("storage.retention_days", "90", "90", |c| {
            assert_eq!(c.storage.retention_days, 90)
        }),
        case("phone.default_region", "\"PL\"", "PL", |c| {
            assert_eq!(c.phone.default_region, "PL")
        }),
        case("index.poll_seconds", "15", "15", |c| {
            assert_eq!(c.index.poll_seconds, 15)
        }),
        case("index.follower_lease_seconds", "9", "9", |c| {
            assert_eq!(c.index.follower_lease_seconds, 9)
        }),
        case("index.shared_snapshot_seconds", "120", "120", |c| {
            assert_eq!(c.index.shared_snapshot_seconds, 120)
        }),
        case("index.bootstrap", "false", "false", |c| {
            assert!(!c.index.bootstrap)
        }),
        case("routing.directory", directory, directory, |c| {
            let d: Vec<_> = c
                .routing
                .directory
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            assert_eq!(d, [("Olena Petrenko", "101"), ("Іван Коваленко", "0102")]);
        }),
        case("routing.recent_days", "14", "14", |c| {
            assert_eq!(c.routing.recent_days, 14)
        }),
        Case {
            with: &[("sync.talk_app_id", "7")],
            ..case("sync.create", r#"["ticket", "call"]"#, "ticket,call", |c| {
                assert_eq!(c.sync.create, [Entity::Ticket, Entity::Call])
            })
        },
        case("sync.talk_app_id", "12345", "12345", |c| {
            assert_eq!(c.sync.talk_app_id, Some(12345))
        }),
        case(
            "sync.senior_manager",
            "\"Olena Petrenko\"",
            "Olena Petrenko",
            |c| assert_eq!(c.sync.senior_manager.as_deref(), Some("Olena Petrenko")),
        ),
        case("sync.ticket_priority", "\"high\"", "high", |c| {
            assert_eq!(c.sync.ticket_priority, "high")
        }),
        case("sync.ticket_type", "\"task\"", "task", |c| {
            assert_eq!(c.sync.ticket_type, "task")
        }),
        case("sync.comment_public", "true", "true", |c| {
            assert!(c.sync.comment_public)
        }),
        case(
            "sync.time_zone",
            "\"Europe/Warsaw\"",
            "Europe/Warsaw",
            |c| assert_eq!(c.sync.time_zone, "Europe/Warsaw"),
        ),
        case(
            "sync.organization_name",
            "\"{name} ({phone})\"",
            "{name} ({phone})",
            |c| assert_eq!(c.sync.organization_name, "{name} ({phone})"),
        ),
        case("sync.fields", fields, fields, |c| {
            assert_eq!(c.sync.fields.len(), 1);
            let f = &c.sync.fields[0];
            assert_eq!(
                (f.entity, f.field.as_str(), f.source.as_str()),
                (FieldEntity::Ticket, "360001111", "utm_source")
            );
        }),
        case("sync.lease_seconds", "60", "60", |c| {
            assert_eq!(c.sync.lease_seconds, 60)
        }),
        Case {
            with: &[("webhooks.signing_secret", "\"whsec-value\"")],
            ..case(
                "webhooks.listen",
                "\"127.0.0.1:8081\"",
                "127.0.0.1:8081",
                |c| assert_eq!(c.webhooks.listen, Some(([127, 0, 0, 1], 8081).into())),
            )
        },
        case("webhooks.path", "\"/hooks/zd\"", "/hooks/zd", |c| {
            assert_eq!(c.webhooks.path, "/hooks/zd")
        }),
        case(
            "webhooks.signing_secret",
            "\"whsec-value\"",
            "whsec-value",
            |c| {
                let s = c.webhook_signing_secrets().unwrap();
                assert_eq!(s.len(), 1);
                assert_eq!(s[0].expose_secret(), "whsec-value");
            },
        ),
        case(
            "webhooks.signing_secret_file",
            &quoted(&secret_file),
            &secret_file,
            |c| {
                let s = c.webhook_signing_secrets().unwrap();
                assert_eq!(s.len(), 1);
                assert_eq!(s[0].expose_secret(), "file-signing-secret");
            },
        ),
        case(
            "webhooks.public_url",
            "\"https://deskline.acme.com/zendesk/webhook\"",
            "https://deskline.acme.com/zendesk/webhook",
            |c| {
                assert_eq!(
                    c.webhooks.public_url.as_deref(),
                    Some("https://deskline.acme.com/zendesk/webhook")
                )
            },
        ),
    ]
}

/// The keys in the first column of README's configuration table.
fn readme_keys() -> Vec<String> {
    let readme = include_str!("../README.md");
    let section = readme
        .split("\n## Configuration\n")
        .nth(1)
        .expect("README has a Configuration section");
    let section = section.split("\n## ").next().unwrap();
    let mut keys = Vec::new();
    for row in section.lines().filter(|l| l.starts_with("| `")) {
        let first = row.split('|').nth(1).unwrap();
        for (i, part) in first.split('`').enumerate() {
            if i % 2 == 1 && part.contains('.') {
                keys.push(part.to_owned());
            }
        }
    }
    keys
}

fn set(table: &mut toml::Table, key: &str, value: &str) {
    let (section, name) = key.split_once('.').unwrap();
    let value: toml::Table = format!("v = {value}").parse().unwrap();
    table
        .entry(section)
        .or_insert_with(|| toml::Value::Table(toml::Table::new()))
        .as_table_mut()
        .unwrap()
        .insert(name.to_owned(), value["v"].clone());
}

fn env_name(key: &str) -> String {
    format!("DESKLINE_{}", key.to_ascii_uppercase().replace('.', "__"))
}

#[test]
fn every_documented_key_is_settable_both_ways() {
    let dir = tempfile::tempdir().unwrap();
    let cases = cases(dir.path());
    let documented = readme_keys();
    let tested: Vec<&str> = cases.iter().map(|c| c.key).collect();
    for key in &documented {
        assert!(
            tested.contains(&key.as_str()),
            "README documents {key} but no case sets it"
        );
    }
    for key in &tested {
        assert!(
            documented.iter().any(|d| d == key),
            "{key} is tested but not in README's table"
        );
    }
    // The keys DESIGN §6 adds for replicas and webhooks are documented (and so tested) too.
    for key in [
        "server.shutdown_grace_seconds",
        "storage.retention_days",
        "storage.postgres_url",
        "storage.postgres_url_file",
        "sync.lease_seconds",
        "routing.recent_days",
        "webhooks.listen",
        "webhooks.path",
        "webhooks.signing_secret",
        "webhooks.signing_secret_file",
        "webhooks.public_url",
    ] {
        assert!(tested.contains(&key), "{key}");
    }
    for c in &cases {
        let mut base: toml::Table = MIN.parse().unwrap();
        for key in c.drop {
            let (section, name) = key.split_once('.').unwrap();
            base[section].as_table_mut().unwrap().remove(name);
        }
        for (key, value) in c.with {
            set(&mut base, key, value);
        }
        let mut in_toml = base.clone();
        set(&mut in_toml, c.key, &c.toml);
        let text = toml::to_string(&in_toml).unwrap();
        let config = load(&text, &[]).unwrap_or_else(|e| panic!("{} in TOML: {e}", c.key));
        (c.check)(&config);

        let env = [(env_name(c.key), c.env.clone())];
        let text = toml::to_string(&base).unwrap();
        let config = load(&text, &env).unwrap_or_else(|e| panic!("{} from env: {e}", c.key));
        (c.check)(&config);
    }
}

#[test]
fn several_bad_keys_are_reported_at_once() {
    let text = r#"
        [server]
        listen_adress = "127.0.0.1:1"
        [zendesk]
        email = "ops@acme.com"
        token = "s3cr3t-token-value"
        requests_per_minute = "fast"
        [index]
        poll_seconds = 0
        [[sync.fields]]
        entity = "ticket"
        field = "1"
        [webhooks]
        listen = "127.0.0.1:8081"
    "#;
    let env = [
        (
            "DESKLINE_SYNC__CREATE".to_owned(),
            "user,spaceship".to_owned(),
        ),
        (
            "DESKLINE_SERVER__METRICS_LISTEN".to_owned(),
            "nope".to_owned(),
        ),
        (
            "DESKLINE_STORAGE__RETENTION_DAYS".to_owned(),
            "-1".to_owned(),
        ),
        (
            "DESKLINE_STORAGE__POSTGRES_CA_FILE".to_owned(),
            "/nonexistent/ca.pem".to_owned(),
        ),
    ];
    let err = load(text, &env).unwrap_err();
    let mut keys = err.keys();
    keys.sort();
    assert_eq!(
        keys,
        [
            "index.poll_seconds",
            "server.listen_adress",
            "server.metrics_listen",
            "storage.postgres_ca_file",
            "storage.retention_days",
            "sync.create[1]",
            "sync.fields[0].source",
            "webhooks.signing_secret",
            "zendesk.requests_per_minute",
            "zendesk.url",
        ],
        "{err}"
    );
    let text = err.to_string();
    assert!(text.starts_with("10 problems:\n"), "{text}");
    assert!(
        text.contains("\n  zendesk.requests_per_minute: invalid type: string \"fast\""),
        "{text}"
    );
    assert!(
        text.contains("\n  zendesk.url: missing field `url`"),
        "{text}"
    );
    assert!(
        text.contains("server.metrics_listen: invalid socket address syntax (from DESKLINE_SERVER__METRICS_LISTEN)"),
        "{text}"
    );
    assert!(!text.contains("s3cr3t"), "{text}");
}

/// A rate-limit window Zendesk does not have is refused with the key named; the defaults are
/// Zendesk's.
#[test]
fn the_rate_window_is_a_minute_unless_shortened_within_bounds() {
    let c = load(MIN, &[]).unwrap();
    assert_eq!(c.zendesk.rate_window_ms, 60_000);
    assert_eq!(c.zendesk.search_export_requests_per_minute, 100);
    for bad in ["999", "60001", "0"] {
        let err = load(
            MIN,
            &[(
                "DESKLINE_ZENDESK__RATE_WINDOW_MS".to_owned(),
                bad.to_owned(),
            )],
        )
        .unwrap_err();
        assert_eq!(err.keys(), ["zendesk.rate_window_ms"], "{bad}: {err}");
        assert!(err.to_string().contains("must be 1000 to 60000"), "{err}");
    }
    let err = load(
        MIN,
        &[(
            "DESKLINE_ZENDESK__SEARCH_EXPORT_REQUESTS_PER_MINUTE".to_owned(),
            "0".to_owned(),
        )],
    )
    .unwrap_err();
    assert_eq!(err.keys(), ["zendesk.search_export_requests_per_minute"]);
}

#[test]
fn an_unknown_key_is_named_from_either_source() {
    let err = load(&format!("{MIN}\n[storage]\nretention_dayz = 3"), &[]).unwrap_err();
    assert_eq!(err.keys(), ["storage.retention_dayz"], "{err}");
    let env = [("DESKLINE_WEBHOOKS__SECRET".to_owned(), "x".to_owned())];
    let err = load(MIN, &env).unwrap_err().to_string();
    assert!(
        err.starts_with("webhooks.secret: unknown field `secret`")
            && err.ends_with("(from DESKLINE_WEBHOOKS__SECRET)"),
        "{err}"
    );
    let err = load(&format!("{MIN}\n[tracing]\nlevel = 1"), &[])
        .unwrap_err()
        .to_string();
    assert!(err.starts_with("tracing: unknown field `tracing`"), "{err}");
}

#[test]
fn secrets_never_show_in_debug_or_errors() {
    let secret_file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(secret_file.path(), "marker-secret-5").unwrap();
    let text = format!(
        r#"{MIN}
        [server]
        tokens = ["marker-secret-1-long-enough"]
        [storage]
        postgres_url = "postgres://u:marker-secret-2@db/x"
        [webhooks]
        listen = "127.0.0.1:8081"
        signing_secret_file = "{}"
        "#,
        secret_file.path().display()
    );
    let env = [(
        "DESKLINE_ZENDESK__OAUTH_TOKEN_FILE".to_owned(),
        "/nonexistent".to_owned(),
    )];
    let c = load(&text, &[]).unwrap();
    let debug = format!("{c:?}");
    for marker in ["s3cr3t", "marker-secret"] {
        assert!(!debug.contains(marker), "{debug}");
    }
    // Errors about secret keys, and errors beside them, never carry the values.
    let bad = text.replace("postgres://u:marker", "mysql://u:marker") + "\n[zendesk.extra]\n";
    for (text, env) in [(&bad, &env[..]), (&text, &env[..])] {
        let err = load(text, env).unwrap_err().to_string();
        assert!(err.contains("zendesk."), "{err}");
        for marker in ["s3cr3t", "marker-secret"] {
            assert!(!err.contains(marker), "{err}");
        }
    }
    let err = load(&bad.replace("\n[zendesk.extra]\n", ""), &[]).unwrap_err();
    assert_eq!(err.keys(), ["storage.postgres_url"], "{err}");
}
