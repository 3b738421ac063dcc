//! `deskline check --config FILE`: is this deployment going to work? Validates the configuration and
//! the Zendesk credentials, then compares the PBX directory with Zendesk's agents and the mapped custom
//! fields with Zendesk's field definitions (DESIGN §5).
//!
//! The comparison is a pure function ([`compare`]) so every finding is unit-tested; [`run`] only
//! gathers the data. Findings are problems (routing or sync would break: exit status 1), warnings
//! (worth a look) or notes.

use std::collections::BTreeMap;

use unicode_normalization::UnicodeNormalization;

use crate::{
    config::{Config, FieldEntity},
    routing::name_key,
    zendesk::{
        Client, ZendeskError,
        models::{FieldDef, User},
    },
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Severity {
    Note,
    Warning,
    Problem,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Finding {
    pub severity: Severity,
    pub message: String,
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let tag = match self.severity {
            Severity::Note => "note",
            Severity::Warning => "warning",
            Severity::Problem => "problem",
        };
        write!(f, "{tag}: {}", self.message)
    }
}

/// What Zendesk told us, gathered by [`run`].
pub(crate) struct Facts {
    pub me: User,
    pub agents: Vec<User>,
    pub user_fields: Vec<FieldDef>,
    pub organization_fields: Vec<FieldDef>,
    pub ticket_fields: Vec<FieldDef>,
    /// The account's request limit per minute as Zendesk reported it (`X-Rate-Limit`), if it did.
    pub account_limit: Option<u32>,
}

fn finding(severity: Severity, message: impl Into<String>) -> Finding {
    Finding {
        severity,
        message: message.into(),
    }
}

/// Latin letters that Cyrillic (and Greek) look-alikes are folded to, so "Оlena" (Cyrillic О)
/// is recognised as a near miss of "Olena".
fn fold_confusables(key: &str) -> String {
    key.chars()
        .map(|c| match c {
            'а' => 'a',
            'в' => 'b',
            'е' | 'ё' => 'e',
            'к' => 'k',
            'м' => 'm',
            'н' => 'h',
            'о' | 'ο' => 'o',
            'р' | 'ρ' => 'p',
            'с' => 'c',
            'т' => 't',
            'у' => 'y',
            'х' => 'x',
            'і' | 'ι' => 'i',
            'ј' => 'j',
            'ѕ' => 's',
            'α' => 'a',
            'ε' => 'e',
            'κ' => 'k',
            'ν' => 'v',
            other => other,
        })
        .collect()
}

fn has_mixed_scripts(name: &str) -> bool {
    let latin = name.chars().any(|c| c.is_ascii_alphabetic());
    let other = name.chars().any(|c| c.is_alphabetic() && !c.is_ascii());
    latin && other
}

/// Explains how two names that share a key differ (case, spacing, Unicode form).
fn how_they_differ(a: &str, b: &str) -> Vec<&'static str> {
    let mut why = Vec::new();
    let squash = |s: &str| s.split_whitespace().collect::<Vec<_>>().join(" ");
    if a.nfc().collect::<String>() != a || b.nfc().collect::<String>() != b {
        why.push("Unicode form (NFD vs NFC)");
    }
    if squash(a) != a.trim() || squash(b) != b.trim() || a != a.trim() || b != b.trim() {
        why.push("spacing");
    }
    if squash(a).to_lowercase() == squash(b).to_lowercase() && squash(a) != squash(b) {
        why.push("letter case");
    }
    if why.is_empty() {
        why.push("letter case");
    }
    why
}

/// The directory's extension for a [`name_key`], as rule 5 finds it (the first entry in order).
fn directory_extension<'a>(config: &'a Config, key: &str) -> Option<&'a str> {
    config
        .routing
        .directory
        .iter()
        .find(|(name, _)| name_key(name) == key)
        .map(|(_, ext)| ext.trim())
}

/// Compares the configuration with what Zendesk has.
pub(crate) fn compare(config: &Config, facts: &Facts) -> Vec<Finding> {
    use Severity::*;
    let mut out = Vec::new();
    if facts.me.role.as_deref() != Some("admin") {
        out.push(finding(
            Problem,
            format!(
                "the API user {} is {:?}, not an admin: Zendesk's incremental exports are admin-only",
                facts.me.email.as_deref().unwrap_or("?"),
                facts.me.role.as_deref().unwrap_or("unknown")
            ),
        ));
    }
    let budget = config.zendesk.requests_per_minute;
    if let Some(limit) = facts.account_limit
        && limit < budget
    {
        // The budget still holds (the client follows Zendesk's `remaining` count), but the service
        // plans for more than the plan gives, and shares the account with every other integration.
        out.push(finding(
            Warning,
            format!(
                "zendesk.requests_per_minute is {budget} but Zendesk reports an account limit \
                 (X-Rate-Limit) of {limit} requests a minute: set it to {limit} or less"
            ),
        ));
    }
    let active: Vec<&User> = facts
        .agents
        .iter()
        .filter(|a| a.is_agent() && a.is_active())
        .collect();
    let by_key: BTreeMap<String, &User> = active
        .iter()
        .map(|a| (name_key(a.name.as_deref().unwrap_or("")), *a))
        .collect();
    let by_folded: BTreeMap<String, &User> = by_key
        .iter()
        .map(|(k, a)| (fold_confusables(k), *a))
        .collect();
    let inactive: BTreeMap<String, &User> = facts
        .agents
        .iter()
        .filter(|a| a.is_agent() && !a.is_active())
        .map(|a| (name_key(a.name.as_deref().unwrap_or("")), a))
        .collect();

    // Names are the directory's key (DESIGN §3 rule 5), so active agents that share one cannot be
    // told apart: every pair is a warning (RouteCall still routes to the name's extension and says
    // so in its reason, see `routing`).
    let mut same_name: BTreeMap<String, Vec<&User>> = BTreeMap::new();
    for a in &active {
        same_name
            .entry(name_key(a.name.as_deref().unwrap_or("")))
            .or_default()
            .push(a);
    }
    for (key, group) in same_name.iter().filter(|(_, g)| g.len() > 1) {
        let ext = directory_extension(config, key);
        for (i, a) in group.iter().enumerate() {
            for b in &group[i + 1..] {
                out.push(finding(
                    Warning,
                    format!(
                        "agents {:?} (id {}) and {:?} (id {}) have the same full name: the directory \
                         cannot tell them apart, so calls routed to either go to {}; give one a \
                         distinct name in Zendesk",
                        a.name.as_deref().unwrap_or(""),
                        a.id,
                        b.name.as_deref().unwrap_or(""),
                        b.id,
                        ext.map_or("default routing (no directory entry)".to_string(), |e| {
                            format!("extension {e}")
                        }),
                    ),
                ));
            }
        }
    }

    let mut matched = std::collections::BTreeSet::new();
    for (name, ext) in &config.routing.directory {
        let key = name_key(name);
        if let Some(agent) = by_key.get(&key) {
            matched.extend(same_name.get(&key).into_iter().flatten().map(|a| a.id));
            let zname = agent.name.as_deref().unwrap_or("");
            if zname != name {
                out.push(finding(
                    Note,
                    format!(
                        "directory {name:?} (ext {ext}) matches agent {zname:?} despite {}",
                        how_they_differ(name, zname).join(", ")
                    ),
                ));
            }
            continue;
        }
        if let Some(agent) = by_folded.get(&fold_confusables(&key)) {
            out.push(finding(
                Problem,
                format!(
                    "directory {name:?} (ext {ext}) matches no agent: agent {:?} differs only by look-alike Latin/Cyrillic letters{}",
                    agent.name.as_deref().unwrap_or(""),
                    if has_mixed_scripts(name) { " (the directory name mixes scripts)" } else { "" }
                ),
            ));
            continue;
        }
        if let Some(agent) = inactive.get(&key) {
            out.push(finding(
                Problem,
                format!("directory {name:?} (ext {ext}) is agent {} who is inactive or suspended in Zendesk", agent.id),
            ));
            continue;
        }
        out.push(finding(
            Problem,
            format!("directory {name:?} (ext {ext}) matches no active Zendesk agent"),
        ));
    }
    for agent in &active {
        if !matched.contains(&agent.id) {
            out.push(finding(
                Warning,
                format!(
                    "agent {:?} (id {}) has no directory entry: calls to their tickets take default routing",
                    agent.name.as_deref().unwrap_or(""),
                    agent.id
                ),
            ));
        }
    }
    if let Some(manager) = &config.sync.senior_manager {
        if !by_key.contains_key(&name_key(manager)) {
            out.push(finding(
                Problem,
                format!("sync.senior_manager {manager:?} is not an active Zendesk agent"),
            ));
        }
    }
    for (i, f) in config.sync.fields.iter().enumerate() {
        let (defs, what, found) = match f.entity {
            FieldEntity::User => (
                &facts.user_fields,
                "user field key",
                facts
                    .user_fields
                    .iter()
                    .any(|d| d.key.as_deref() == Some(&f.field)),
            ),
            FieldEntity::Organization => (
                &facts.organization_fields,
                "organization field key",
                facts
                    .organization_fields
                    .iter()
                    .any(|d| d.key.as_deref() == Some(&f.field)),
            ),
            FieldEntity::Ticket => (
                &facts.ticket_fields,
                "ticket field id",
                facts
                    .ticket_fields
                    .iter()
                    .any(|d| d.id.to_string() == f.field),
            ),
        };
        if !found {
            let known: Vec<String> = defs
                .iter()
                .map(|d| match f.entity {
                    FieldEntity::Ticket => d.id.to_string(),
                    _ => d.key.clone().unwrap_or_default(),
                })
                .take(20)
                .collect();
            out.push(finding(
                Problem,
                format!(
                    "sync.fields[{i}]: {what} {:?} does not exist in Zendesk (known: {})",
                    f.field,
                    known.join(", ")
                ),
            ));
        }
    }
    out.sort_by_key(|f| std::cmp::Reverse(f.severity));
    out
}

/// Why the check could not even compare.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CheckError {
    #[error("config error: {0}")]
    Config(#[from] crate::config::ConfigError),
    #[error("Zendesk at {url}: {source}")]
    Zendesk { url: String, source: ZendeskError },
}

/// Gathers the facts from Zendesk and compares.
pub(crate) async fn run(config: &Config) -> Result<Vec<Finding>, CheckError> {
    let mut opts = config.client_options()?;
    opts.max_retries = 1;
    let url = opts.base_url.clone();
    let zerr = |source| CheckError::Zendesk {
        url: url.clone(),
        source,
    };
    let client = Client::new(opts).map_err(&zerr)?;
    let me = client.me().await.map_err(&zerr)?;
    let agents = client.list_agents().await.map_err(&zerr)?;
    let user_fields = client.user_fields().await.map_err(&zerr)?;
    let organization_fields = client.organization_fields().await.map_err(&zerr)?;
    let ticket_fields = client.ticket_fields().await.map_err(&zerr)?;
    let account_limit = client.budget().stats().account_limit;
    let mut findings = compare(
        config,
        &Facts {
            me,
            agents,
            user_fields,
            organization_fields,
            ticket_fields,
            account_limit,
        },
    );
    findings.extend(storage(config).await);
    Ok(findings)
}

/// The shared store: with `storage.postgres_url`, is the database reachable and is its schema the
/// one this binary expects? (Read only: `deskline serve` migrates at start.)
pub(crate) async fn storage(config: &Config) -> Vec<Finding> {
    let url = match config.postgres_url() {
        Ok(Some(url)) => url,
        Ok(None) => {
            return vec![finding(
                Severity::Note,
                format!(
                    "storage: embedded SQLite queue in {} (one replica; set storage.postgres_url for several)",
                    config.storage.data_dir.display()
                ),
            )];
        }
        Err(e) => return vec![finding(Severity::Problem, e.to_string())],
    };
    let pool = match crate::pg::Connect::new(&url, config.storage.postgres_ca_file.as_deref())
        .and_then(|connect| crate::pg::pool_with(&connect, 1))
    {
        Ok(pool) => pool,
        Err(e) => return schema_findings(Err(e)),
    };
    let version = crate::pg::schema_version(&pool).await;
    let current = matches!(&version, Ok(v) if v.newer.is_empty() && v.missing.is_empty());
    let mut findings = schema_findings(version);
    if current {
        findings.extend(replication(pool).await);
    }
    findings
}

/// Who follows the exports, and where the shared index stands (DESIGN §8).
async fn replication(pool: deadpool_postgres::Pool) -> Vec<Finding> {
    use crate::cluster::{ChangeLog, Lease, SharedSnapshot};
    let lease = Lease::new(
        pool.clone(),
        crate::replica::FOLLOWER_LEASE,
        "deskline-check",
        std::time::Duration::from_secs(1),
    );
    let lease = match lease.status().await {
        Ok(st) => match st.holder {
            Some(h) => format!(
                "follower lease: held by {h} (epoch {}, {:.0} s left before renewal is due)",
                st.epoch,
                st.expires_in.as_secs_f64()
            ),
            None => format!(
                "follower lease: free (epoch {}): no replica follows the exports right now",
                st.epoch
            ),
        },
        Err(e) => format!("follower lease: not readable: {e}"),
    };
    let head = ChangeLog::new(pool.clone(), "deskline-check")
        .newest_seq()
        .await;
    let snapshot = SharedSnapshot::new(pool, "deskline-check").latest().await;
    let shared = match (head, snapshot) {
        (Ok(head), Ok(Some(m))) => format!(
            "shared index: snapshot at change {} ({} bytes, stored by {}), change log at {head}",
            m.seq, m.size, m.origin
        ),
        (Ok(head), Ok(None)) => format!(
            "shared index: no snapshot yet (a new replica replays the change log), change log at {head}"
        ),
        (Err(e), _) | (_, Err(e)) => format!("shared index: not readable: {e}"),
    };
    vec![
        finding(Severity::Note, lease),
        finding(Severity::Note, shared),
    ]
}

fn schema_findings(version: Result<crate::pg::SchemaVersion, crate::pg::PgError>) -> Vec<Finding> {
    match version {
        Err(e) => vec![finding(
            Severity::Problem,
            format!("storage.postgres_url: {e}"),
        )],
        Ok(v) if !v.newer.is_empty() => vec![finding(
            Severity::Warning,
            format!(
                "PostgreSQL reachable; its schema has steps this release does not know ({}): a newer release migrated it",
                v.newer.join(", ")
            ),
        )],
        Ok(v) if !v.missing.is_empty() => vec![finding(
            Severity::Note,
            format!(
                "PostgreSQL reachable; schema version {} of {} (missing {}): the next `deskline serve` migrates it",
                v.applied,
                v.known,
                v.missing.join(", ")
            ),
        )],
        Ok(v) => vec![finding(
            Severity::Note,
            format!(
                "PostgreSQL reachable; schema version {} (current)",
                v.applied
            ),
        )],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn agent(id: i64, name: &str, active: bool) -> User {
        User {
            id,
            name: Some(name.into()),
            role: Some("agent".into()),
            active: Some(active),
            suspended: Some(false),
            ..Default::default()
        }
    }

    fn config(extra: &str) -> Config {
        let text = format!(
            "[zendesk]\nurl = \"https://acme.zendesk.com\"\nemail = \"a@b.c\"\ntoken = \"t\"\n{extra}"
        );
        Config::from_toml_and_env(&text, Path::new("t.toml"), std::iter::empty()).unwrap()
    }

    fn facts(agents: Vec<User>) -> Facts {
        Facts {
            me: User {
                id: 1,
                role: Some("admin".into()),
                ..Default::default()
            },
            agents,
            user_fields: vec![FieldDef {
                id: 5,
                key: Some("utm_source".into()),
                ..Default::default()
            }],
            organization_fields: vec![],
            ticket_fields: vec![FieldDef {
                id: 360001,
                ..Default::default()
            }],
            account_limit: None,
        }
    }

    #[test]
    fn finds_each_kind_of_mismatch() {
        let cfg = config(
            "[routing.directory]\n\"olena  PETRENKO\" = \"101\"\n\"Іvan Kovalenko\" = \"102\"\n\"Nobody Here\" = \"103\"\n\"Old Timer\" = \"104\"\n\
             [sync]\nsenior_manager = \"Big Boss\"\n\
             [[sync.fields]]\nentity = \"user\"\nfield = \"utm_source\"\nsource = \"utm_source\"\n\
             [[sync.fields]]\nentity = \"ticket\"\nfield = \"999\"\nsource = \"utm_medium\"\n\
             [[sync.fields]]\nentity = \"organization\"\nfield = \"scheme\"\nsource = \"scheme_name\"\n",
        );
        let f = facts(vec![
            agent(10, "Olena Petrenko", true),
            agent(11, "Ivan Kovalenko", true),
            agent(12, "Old Timer", false),
            agent(13, "Unlisted Agent", true),
        ]);
        let out = compare(&cfg, &f);
        let text: Vec<String> = out.iter().map(|f| f.to_string()).collect();
        let has = |needle: &str| text.iter().any(|t| t.contains(needle));
        assert!(has("note: directory \"olena  PETRENKO\""), "{text:#?}");
        assert!(
            has(
                "problem: directory \"Іvan Kovalenko\" (ext 102) matches no agent: agent \"Ivan Kovalenko\" differs only by look-alike"
            ),
            "{text:#?}"
        );
        assert!(
            has("problem: directory \"Nobody Here\" (ext 103) matches no active Zendesk agent"),
            "{text:#?}"
        );
        assert!(
            has("problem: directory \"Old Timer\" (ext 104) is agent 12 who is inactive"),
            "{text:#?}"
        );
        assert!(has("warning: agent \"Unlisted Agent\""), "{text:#?}");
        assert!(
            has("problem: sync.senior_manager \"Big Boss\""),
            "{text:#?}"
        );
        assert!(
            has("problem: sync.fields[1]: ticket field id \"999\""),
            "{text:#?}"
        );
        assert!(
            has("problem: sync.fields[2]: organization field key \"scheme\""),
            "{text:#?}"
        );
        assert!(!has("sync.fields[0]"), "{text:#?}");
        assert_eq!(out[0].severity, Severity::Problem);
    }

    /// Every pair of active agents with the same normalised name is a warning; inactive ones
    /// and distinct names are not.
    #[test]
    fn agents_sharing_a_name_are_warned_about_pairwise() {
        let cfg = config("[routing.directory]\n\"Olena Petrenko\" = \"101\"\n");
        let out = compare(
            &cfg,
            &facts(vec![
                agent(10, "Olena Petrenko", true),
                agent(11, "olena  PETRENKO", true),
                agent(12, "Olena Petrenko", true),
                agent(13, "Olena Petrenko", false),
                agent(14, "Ivan Franko", true),
                agent(15, "Ivan  Franko", true),
            ]),
        );
        let pairs: Vec<String> = out
            .iter()
            .filter(|f| f.severity == Severity::Warning && f.message.contains("same full name"))
            .map(|f| f.message.clone())
            .collect();
        assert_eq!(pairs.len(), 4, "{pairs:#?}");
        for (a, b) in [(10, 11), (10, 12), (11, 12)] {
            assert!(
                pairs.iter().any(|m| m.contains(&format!("(id {a}) and"))
                    && m.contains(&format!("(id {b}) have the same full name"))
                    && m.contains("go to extension 101")),
                "{a}/{b}: {pairs:#?}"
            );
        }
        assert!(
            pairs
                .iter()
                .any(|m| m.contains("(id 14) and") && m.contains("default routing")),
            "{pairs:#?}"
        );
        assert!(!pairs.iter().any(|m| m.contains("id 13")), "{pairs:#?}");
        // The namesakes of a matched entry are matched too: no "has no directory entry" for them.
        assert!(
            !out.iter()
                .any(|f| f.message.contains("(id 11) has no directory entry")),
            "{out:#?}"
        );
    }

    #[test]
    fn clean_config_has_no_problem() {
        let cfg = config(
            "[routing.directory]\n\"Olena Petrenko\" = \"101\"\n[sync]\nsenior_manager = \"olena petrenko\"\n",
        );
        let out = compare(&cfg, &facts(vec![agent(10, "Olena Petrenko", true)]));
        assert!(
            out.iter().all(|f| f.severity != Severity::Problem),
            "{out:#?}"
        );
    }

    #[test]
    fn non_admin_is_a_problem() {
        let cfg = config("");
        let mut f = facts(vec![]);
        f.me.role = Some("agent".into());
        assert!(
            compare(&cfg, &f)
                .iter()
                .any(|f| f.severity == Severity::Problem && f.message.contains("admin-only"))
        );
    }

    #[test]
    fn a_budget_above_the_account_limit_is_a_warning() {
        let cfg = config("requests_per_minute = 700\n");
        let warned = |limit: Option<u32>| {
            let mut f = facts(vec![]);
            f.account_limit = limit;
            compare(&cfg, &f)
                .iter()
                .filter(|f| f.message.contains("X-Rate-Limit"))
                .map(|f| (f.severity, f.message.clone()))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            warned(Some(400)),
            vec![(
                Severity::Warning,
                "zendesk.requests_per_minute is 700 but Zendesk reports an account limit \
                 (X-Rate-Limit) of 400 requests a minute: set it to 400 or less"
                    .to_owned()
            )]
        );
        assert!(warned(Some(700)).is_empty());
        assert!(warned(Some(2500)).is_empty());
        assert!(warned(None).is_empty(), "Zendesk did not say");
    }
}
