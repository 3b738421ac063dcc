//! The sync's view of the configuration (`sync.*`, the phone region), resolved once at start-up.

use std::time::Duration;

use crate::{
    config::{Config, ConfigError, Entity, FieldEntity, FieldMapping},
    phone::PhoneParser,
};

/// Everything the worker needs to decide what to write. Built with [`SyncSettings::from_config`];
/// tests adjust the public fields.
#[derive(Debug, Clone)]
pub(crate) struct SyncSettings {
    pub create_user: bool,
    pub create_organization: bool,
    pub create_ticket: bool,
    /// `call` in `sync.create` and `sync.talk_app_id` set.
    pub create_call: bool,
    pub talk_app_id: Option<i64>,
    /// Full name of the fallback assignee.
    pub senior_manager: Option<String>,
    pub ticket_priority: String,
    pub ticket_type: String,
    pub comment_public: bool,
    pub time_zone: jiff::tz::TimeZone,
    pub time_zone_name: String,
    pub fields: Vec<FieldMapping>,
    /// `{name}` is the user's name, `{phone}` the number in international format.
    pub organization_name: String,
    pub parser: PhoneParser,
    /// Jobs run at the same time (always for different numbers).
    pub concurrency: usize,
    /// First retry delay after a transient error; doubles per attempt, with ±50 % jitter.
    pub retry_base: Duration,
    pub retry_max: Duration,
    /// The worker looks at the queue at least this often even without a wake-up.
    pub idle_poll: Duration,
}

impl SyncSettings {
    pub(crate) fn from_config(cfg: &Config) -> Result<Self, ConfigError> {
        let key = |k: &str, m: String| ConfigError::Key {
            key: k.to_owned(),
            message: m,
        };
        let s = &cfg.sync;
        let time_zone = jiff::tz::TimeZone::get(&s.time_zone).map_err(|_| {
            key(
                "sync.time_zone",
                format!("unknown time zone {:?}", s.time_zone),
            )
        })?;
        let parser = PhoneParser::new(&cfg.phone.default_region)
            .map_err(|m| key("phone.default_region", m))?;
        Ok(Self {
            create_user: cfg.may_create(Entity::User),
            create_organization: cfg.may_create(Entity::Organization),
            create_ticket: cfg.may_create(Entity::Ticket),
            create_call: cfg.may_create(Entity::Call) && s.talk_app_id.is_some(),
            talk_app_id: s.talk_app_id,
            senior_manager: s.senior_manager.clone().filter(|n| !n.trim().is_empty()),
            ticket_priority: s.ticket_priority.clone(),
            ticket_type: s.ticket_type.clone(),
            comment_public: s.comment_public,
            time_zone,
            time_zone_name: s.time_zone.clone(),
            fields: s.fields.clone(),
            organization_name: if s.organization_name.trim().is_empty() {
                "{name}".into()
            } else {
                s.organization_name.clone()
            },
            parser,
            concurrency: 4,
            retry_base: Duration::from_secs(2),
            retry_max: Duration::from_secs(10 * 60),
            idle_poll: Duration::from_secs(30),
        })
    }

    pub(crate) fn fields_for(&self, entity: FieldEntity) -> impl Iterator<Item = &FieldMapping> {
        self.fields.iter().filter(move |f| f.entity == entity)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn from_config_defaults_and_call() {
        let text = r#"
            [zendesk]
            url = "https://acme.zendesk.com"
            email = "ops@acme.com"
            token = "s3cr3t-token-value"
            [sync]
            create = ["user", "ticket", "call"]
            talk_app_id = 77
            senior_manager = "Ivan Kovalenko"
            time_zone = "UTC"
        "#;
        let cfg =
            Config::from_toml_and_env(text, std::path::Path::new("t.toml"), Vec::new()).unwrap();
        let s = SyncSettings::from_config(&cfg).unwrap();
        assert!(s.create_user && s.create_ticket && s.create_call);
        assert!(!s.create_organization);
        assert_eq!(s.talk_app_id, Some(77));
        assert_eq!(s.senior_manager.as_deref(), Some("Ivan Kovalenko"));
        assert_eq!(s.organization_name, "{name}");
        assert_eq!(s.parser.region(), "UA");
    }
}
