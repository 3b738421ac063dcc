//! Deterministic account generator with the mixes real accounts have (USERS.md): phones typed in many
//! formats, numbers shared by two users, second mobiles only in identities, deleted and suspended
//! users, Cyrillic and Latin names, a few inactive agents, tickets in every status, unassigned ones.
//!
//! Determinism: the same [`GenConfig`] gives the same data byte for byte, on any platform and any
//! `rand` version, because the generator uses its own SplitMix64 stream. Only the times move: they
//! are spread over the year before "now" so exports with a recent `start_time` see few records.
//! Every number is valid for libphonenumber (UA prefixes 44, 50, 63, 66–68, 73, 93, 95–99; some
//! +1/+48/+44 numbers).

use super::store::{
    IdentRec, OrgRec, Role, Status, Store, TicketExtra, TicketRec, UserExtra, UserRec,
};

/// What to generate. `users` counts end-users; `agents` counts staff (the first is the account
/// owner, an admin with email `admin@deskline.test`; about one in six of the rest are admins).
#[derive(Debug, Clone)]
pub struct GenConfig {
    pub users: usize,
    pub tickets: usize,
    pub agents: usize,
    pub organizations: usize,
    pub seed: u64,
}

impl Default for GenConfig {
    fn default() -> Self {
        Self {
            users: 2_000,
            tickets: 3_000,
            agents: 20,
            organizations: 200,
            seed: 1,
        }
    }
}

/// The email of the generated account owner (the default `SimConfig::email`).
pub const OWNER_EMAIL: &str = "admin@deskline.test";

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { self.next() % n }
    }
    /// True with probability `pct` percent.
    fn pct(&mut self, pct: u64) -> bool {
        self.below(1000) < pct * 10
    }
    fn pick<'a, T>(&mut self, xs: &'a [T]) -> &'a T {
        &xs[self.below(xs.len() as u64) as usize]
    }
}

/// (display, transliteration) pairs so Cyrillic names still get plausible emails.
const FIRST_UA: [(&str, &str); 16] = [
    ("Олена", "olena"),
    ("Іван", "ivan"),
    ("Марія", "mariia"),
    ("Андрій", "andrii"),
    ("Оксана", "oksana"),
    ("Дмитро", "dmytro"),
    ("Наталія", "nataliia"),
    ("Сергій", "serhii"),
    ("Юлія", "yuliia"),
    ("Олександр", "oleksandr"),
    ("Тетяна", "tetiana"),
    ("Максим", "maksym"),
    ("Ірина", "iryna"),
    ("Богдан", "bohdan"),
    ("Світлана", "svitlana"),
    ("Тарас", "taras"),
];
const LAST_UA: [(&str, &str); 16] = [
    ("Петренко", "petrenko"),
    ("Коваленко", "kovalenko"),
    ("Шевченко", "shevchenko"),
    ("Бондаренко", "bondarenko"),
    ("Ткаченко", "tkachenko"),
    ("Кравченко", "kravchenko"),
    ("Олійник", "oliinyk"),
    ("Мельник", "melnyk"),
    ("Іваненко", "ivanenko"),
    ("Лисенко", "lysenko"),
    ("Савченко", "savchenko"),
    ("Руденко", "rudenko"),
    ("Марченко", "marchenko"),
    ("Поліщук", "polishchuk"),
    ("Гончаренко", "honcharenko"),
    ("Мороз", "moroz"),
];
const FIRST_LAT: [&str; 12] = [
    "Ivan", "Olena", "John", "Anna", "Piotr", "Emily", "Oleh", "Maria", "James", "Kateryna",
    "Tomasz", "Sofia",
];
const LAST_LAT: [&str; 12] = [
    "Kovalenko",
    "Petrenko",
    "Smith",
    "Nowak",
    "Brown",
    "Shevchenko",
    "Kowalski",
    "Taylor",
    "Bondar",
    "Wilson",
    "Melnyk",
    "Wisniewski",
];
const ORG_WORDS: [&str; 10] = [
    "Зоря",
    "Світанок",
    "Acme",
    "Polissia Trade",
    "Дніпро",
    "Northwind",
    "Карпати",
    "Globex",
    "Софія",
    "Initech",
];
const ORG_FORMS: [&str; 4] = ["ТОВ", "ФОП", "LLC", "Sp. z o.o."];
const SUBJECTS: [&str; 10] = [
    "Дзвінок щодо замовлення",
    "Не працює доставка",
    "Question about invoice",
    "Повернення товару",
    "Callback request",
    "Зміна тарифу",
    "Order status",
    "Скарга на якість",
    "Missed call",
    "Консультація",
];
const UA_PREFIXES: [u32; 13] = [44, 50, 63, 66, 67, 68, 73, 93, 95, 96, 97, 98, 99];
const US_AREAS: [u32; 6] = [212, 415, 646, 312, 617, 303];
const PL_PREFIXES: [u32; 8] = [501, 512, 535, 601, 691, 721, 781, 792];

/// A phone number in the structured form the formats are built from.
#[derive(Clone, Copy)]
enum Num {
    /// Ukrainian: 2-digit prefix, 7-digit subscriber.
    Ua(u32, u32),
    Us(u32, u32),
    Pl(u32, u32),
    Gb(u32),
}

impl Num {
    fn random(r: &mut Rng) -> Num {
        match r.below(100) {
            0..=84 => Num::Ua(*r.pick(&UA_PREFIXES), 2_000_000 + r.below(8_000_000) as u32),
            85..=89 => Num::Us(*r.pick(&US_AREAS), 2_000_000 + r.below(8_000_000) as u32),
            90..=94 => Num::Pl(*r.pick(&PL_PREFIXES), 100_000 + r.below(900_000) as u32),
            // UK mobiles in the 740x–745x blocks, all allocated in libphonenumber's metadata (76 is
            // pagers, 7700 900 the drama range, and many 79xx sub-blocks are not valid).
            _ => Num::Gb(400_000_000 + r.below(60_000_000) as u32),
        }
    }
    fn random_ua_mobile(r: &mut Rng) -> Num {
        Num::Ua(
            *r.pick(&UA_PREFIXES[1..]),
            2_000_000 + r.below(8_000_000) as u32,
        )
    }
    /// The number as a person might have typed it. Style `s` picks one of several formats.
    fn format(self, s: u64) -> String {
        match self {
            Num::Ua(p, n) => {
                let (a, b, c) = (n / 10_000, n / 100 % 100, n % 100);
                match s % 8 {
                    0 => format!("0{p} {a:03}-{b:02}-{c:02}"),
                    1 => format!("+380{p}{n:07}"),
                    2 => format!("380{p}{n:07}"),
                    3 => format!("(0{p}) {n:07}"),
                    4 => format!("+38 0{p} {a:03} {b:02} {c:02}"),
                    5 => format!("0{p}{n:07}"),
                    6 => format!("+380 {p} {a:03} {b:02}{c:02}"),
                    _ => format!("+380 ({p}) {a:03}-{b:02}-{c:02}"),
                }
            }
            Num::Us(area, n) => match s % 3 {
                0 => format!("+1 ({area}) {}-{:04}", n / 10_000, n % 10_000),
                1 => format!("+1{area}{n:07}"),
                _ => format!("+1-{area}-{}-{:04}", n / 10_000, n % 10_000),
            },
            Num::Pl(p, n) => match s % 2 {
                0 => format!("+48 {p} {:03} {:03}", n / 1000, n % 1000),
                _ => format!("+48{p}{n:06}"),
            },
            Num::Gb(n) => match s % 2 {
                0 => format!("+44 7{:03} {:06}", n / 1_000_000, n % 1_000_000),
                _ => format!("+447{n:09}"),
            },
        }
    }
}

/// Builds a whole account. Deterministic for a given config (see the module doc).
pub fn generate(cfg: &GenConfig) -> Store {
    generate_with_open(cfg, 50)
}

/// [`generate`] with `open_percent` of the tickets open (`new|open|pending|hold`, in the same
/// proportions among themselves; 50 is [`generate`]'s mix, record for record), the rest solved,
/// closed or deleted. Every change is in the past, as in [`generate`].
pub fn generate_with_open(cfg: &GenConfig, open_percent: u8) -> Store {
    let open_percent = u64::from(open_percent.clamp(1, 99));
    let mut r = Rng(cfg.seed ^ 0x5EED_DE5C_0000_0001);
    let mut store = Store::new();
    // Exact sizes up front: doubling a million-record Vec would briefly hold two copies.
    store.users.reserve_exact(cfg.agents + cfg.users);
    store.tickets.reserve_exact(cfg.tickets);
    store.orgs.reserve_exact(cfg.organizations);
    let now = super::store::now_ms() / 1000;
    const YEAR: u64 = 365 * 86_400;
    // Times are offsets into the past year; the last two minutes stay empty so a fresh account's
    // export is complete as soon as it starts (the one-minute rule would hide them otherwise).
    let start = now - YEAR as i64 - 120;
    let when = |r: &mut Rng| start + r.below(YEAR) as i64;

    // Organizations.
    for i in 0..cfg.organizations {
        let name = format!("{} {} {}", r.pick(&ORG_FORMS), r.pick(&ORG_WORDS), i + 1);
        let created = when(&mut r);
        let updated = created + r.below((now - 120 - created).max(1) as u64) as i64;
        let mut fields = Vec::new();
        if r.pct(30) {
            fields.push((
                0u8,
                serde_json::Value::String(format!("scheme-{}", r.below(5) + 1)),
            ));
        }
        store.push_org(OrgRec {
            id: 0,
            name: name.into(),
            external_id: None,
            created_at: created,
            updated_at: updated,
            deleted_at: None,
            fields,
            log_pos: 0,
        });
    }

    let name = |r: &mut Rng, n: usize| -> (String, String) {
        if r.pct(60) {
            let (f, ft) = *r.pick(&FIRST_UA);
            let (l, lt) = *r.pick(&LAST_UA);
            (format!("{f} {l}"), format!("{ft}.{lt}{n}"))
        } else {
            let f = *r.pick(&FIRST_LAT);
            let l = *r.pick(&LAST_LAT);
            (
                format!("{f} {l}"),
                format!("{}.{}{n}", f.to_lowercase(), l.to_lowercase()),
            )
        }
    };

    // Staff first: they exist before the customers they serve.
    let mut staff = Vec::with_capacity(cfg.agents);
    for i in 0..cfg.agents {
        let (full, handle) = if i == 0 {
            ("Olena Petrenko".to_string(), String::new())
        } else {
            name(&mut r, i)
        };
        let email = if i == 0 {
            OWNER_EMAIL.to_string()
        } else {
            format!("{handle}@deskline.test")
        };
        let role = if i == 0 || r.pct(15) {
            Role::Admin
        } else {
            Role::Agent
        };
        let created = start + r.below(86_400 * 30) as i64;
        // A few inactive (deleted) or suspended agents, never the owner: tickets assigned to them
        // must be passed over by routing.
        let (active, suspended) = match (i, r.below(100)) {
            (0, _) => (true, false),
            (_, 0..=4) => (false, false),
            (_, 5..=9) => (true, true),
            _ => (true, false),
        };
        let id = store.push_user(UserRec {
            id: 0,
            name: full.into(),
            email: Some(email.into()),
            phone: None,
            organization_id: 0,
            created_at: created,
            updated_at: created + r.below(YEAR / 2) as i64,
            email_ident: 0,
            phone_ident: 0,
            log_pos: 0,
            role,
            active,
            suspended,
            shared_phone: false,
            extra: None,
        });
        staff.push(id);
    }

    // End-users.
    let first_customer = store.users.len();
    let mut with_phone: Vec<(usize, Num)> = Vec::new();
    for i in 0..cfg.users {
        let (full, handle) = name(&mut r, i);
        let created = when(&mut r);
        let updated = created + r.below((now - 120 - created).max(1) as u64) as i64;
        let email = r.pct(75).then(|| format!("{handle}@example.com"));
        let mut shared = false;
        let phone = if r.pct(88) {
            // ~3% reuse a number already given to someone else, typed differently.
            if !with_phone.is_empty() && r.pct(3) {
                let (other, num) = with_phone[r.below(with_phone.len() as u64) as usize];
                let idx = first_customer + other;
                store.users[idx].shared_phone = true;
                // The other user's number is shared now: no direct-line identity any more.
                store.users[idx].phone_ident = 0;
                shared = true;
                Some(num.format(r.next()))
            } else {
                let num = Num::random(&mut r);
                with_phone.push((i, num));
                Some(num.format(r.next()))
            }
        } else {
            None
        };
        let mut extra = UserExtra::default();
        if phone.is_some() && r.pct(10) {
            // A second mobile, only in identities.
            let num = Num::random_ua_mobile(&mut r);
            extra.identities.push(IdentRec {
                id: store.next_identity_id(),
                kind: "phone_number",
                value: num.format(r.next()).into(),
                verified: true,
                created_at: updated,
                updated_at: updated,
            });
        }
        if r.pct(20) {
            let sources = ["google", "facebook", "instagram", "newsletter", "partner"];
            extra.user_fields.push((0, (*r.pick(&sources)).into()));
            extra
                .user_fields
                .push((2, format!("campaign-{}", r.below(12) + 1).into()));
        }
        if r.pct(1) {
            extra.external_id = Some(format!("crm-{}", 100_000 + i).into());
        }
        let organization_id = if cfg.organizations > 0 && r.pct(40) {
            store.orgs[r.below(cfg.organizations as u64) as usize].id
        } else {
            0
        };
        let (active, suspended) = match r.below(100) {
            0..=2 => (false, false),
            3..=4 => (true, true),
            _ => (true, false),
        };
        let has_extra = !extra.identities.is_empty()
            || !extra.user_fields.is_empty()
            || extra.external_id.is_some();
        store.push_user(UserRec {
            id: 0,
            name: full.into(),
            email: email.map(Into::into),
            phone: phone.map(Into::into),
            organization_id,
            created_at: created,
            updated_at: updated,
            email_ident: 0,
            phone_ident: 0,
            log_pos: 0,
            role: Role::EndUser,
            active,
            suspended,
            shared_phone: shared,
            extra: has_extra.then(|| Box::new(extra)),
        });
    }

    // Tickets, mostly from customers with a phone.
    let customers = store.users.len() - first_customer;
    for _ in 0..cfg.tickets {
        if customers == 0 {
            break;
        }
        let pick = if !with_phone.is_empty() && r.pct(85) {
            with_phone[r.below(with_phone.len() as u64) as usize].0
        } else {
            r.below(customers as u64) as usize
        };
        let req = &store.users[first_customer + pick];
        let (requester_id, org) = (req.id, req.organization_id);
        let req_created = req.created_at;
        let roll = r.below(100);
        let roll = if roll < open_percent {
            roll * 50 / open_percent
        } else {
            50 + (roll - open_percent) * 50 / (100 - open_percent)
        };
        let status = match roll {
            0..=9 => Status::New,
            10..=34 => Status::Open,
            35..=44 => Status::Pending,
            45..=49 => Status::Hold,
            50..=74 => Status::Solved,
            75..=94 => Status::Closed,
            _ => Status::Deleted,
        };
        let assignee = if staff.is_empty() || (status == Status::New && r.pct(70)) || r.pct(12) {
            0
        } else {
            *r.pick(&staff)
        };
        let created = req_created + r.below((now - 120 - req_created).max(1) as u64) as i64;
        let updated = created + r.below((now - 120 - created).max(1) as u64) as i64;
        // Some rows were touched by the system after their last visible update.
        let generated = if r.pct(5) {
            (updated + r.below(3600) as i64).min(now - 120)
        } else {
            updated
        };
        let via = r.below(4) as u8;
        let subject = format!("{} #{}", r.pick(&SUBJECTS), r.below(100_000));
        let priority = if r.pct(70) { r.below(4) as u8 + 1 } else { 0 };
        let kind = if r.pct(70) { r.below(4) as u8 + 1 } else { 0 };
        let extra = r.pct(15).then(|| {
            Box::new(TicketExtra {
                custom_fields: vec![(0, "google".into()), (3, "+380441234567".into())],
                ..Default::default()
            })
        });
        store.push_ticket(TicketRec {
            id: 0,
            subject: subject.into(),
            requester_id,
            submitter_id: if via == 3 && assignee != 0 {
                assignee
            } else {
                requester_id
            },
            assignee_id: assignee,
            organization_id: org,
            created_at: created,
            updated_at: updated,
            generated_timestamp: generated,
            log_pos: 0,
            status,
            priority,
            kind,
            via,
            is_public: !r.pct(10),
            extra,
        });
    }

    store.seal();
    store
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small() -> GenConfig {
        GenConfig {
            users: 3000,
            tickets: 4000,
            agents: 20,
            organizations: 100,
            seed: 7,
        }
    }

    #[test]
    fn deterministic_for_a_seed() {
        let a = generate(&small());
        let b = generate(&small());
        let dump = |s: &Store| {
            s.user_ids()
                .map(|id| {
                    format!(
                        "{:?}{:?}",
                        s.user(id)
                            .map(|u| (u.name, u.email, u.phone, u.role, u.active)),
                        s.identities(id).len()
                    )
                })
                .chain(s.ticket_ids().map(|id| {
                    format!(
                        "{:?}",
                        s.ticket(id)
                            .map(|t| (t.status, t.assignee_id, t.requester_id))
                    )
                }))
                .collect::<Vec<_>>()
        };
        assert_eq!(dump(&a), dump(&b));
        let c = generate(&GenConfig { seed: 8, ..small() });
        assert_ne!(dump(&a), dump(&c));
    }

    #[test]
    fn realistic_mix() {
        let s = generate(&small());
        assert_eq!(s.user_count(), 3020);
        assert_eq!(s.ticket_count(), 4000);
        assert_eq!(s.org_count(), 100);
        let users: Vec<_> = s
            .user_ids()
            .map(|id| (s.user(id).unwrap(), s.identities(id)))
            .collect();
        let count = |f: &dyn Fn(&crate::wire::User, &[crate::wire::Identity]) -> bool| {
            users.iter().filter(|(u, i)| f(u, i)).count()
        };
        let shared = count(&|u, _| u.shared_phone_number == Some(true));
        let deleted = count(&|u, _| u.active == Some(false));
        let suspended = count(&|u, _| u.suspended == Some(true));
        let second_phone = count(&|u, i| i.iter().any(|i| i.is_phone() && i.value != u.phone));
        let cyrillic = count(&|u, _| {
            u.name
                .as_deref()
                .is_some_and(|n| n.chars().any(|c| ('а'..='я').contains(&c)))
        });
        let staff = count(&|u, _| u.is_agent());
        let inactive_staff = count(&|u, _| u.is_agent() && !u.is_active());
        assert!(shared > 20, "shared {shared}");
        assert!(
            deleted > 30 && suspended > 20,
            "deleted {deleted} suspended {suspended}"
        );
        assert!(second_phone > 100, "second phones {second_phone}");
        assert!(cyrillic > 1000 && cyrillic < 2500, "cyrillic {cyrillic}");
        assert_eq!(staff, 20);
        assert!(inactive_staff >= 1, "inactive staff {inactive_staff}");
        // Formats: with and without +, spaces, dashes, parentheses, national 0-prefixed.
        let phones: Vec<&str> = users
            .iter()
            .filter_map(|(u, _)| u.phone.as_deref())
            .collect();
        for pat in [
            |p: &str| p.starts_with("+380") && !p.contains(' '),
            |p: &str| p.starts_with("380"),
            |p: &str| p.starts_with("(0"),
            |p: &str| p.starts_with("0") && p.contains('-'),
            |p: &str| p.starts_with("+38 0"),
            |p: &str| p.starts_with("+1"),
            |p: &str| p.starts_with("+48"),
            |p: &str| p.starts_with("+44"),
        ] {
            assert!(phones.iter().filter(|p| pat(p)).count() > 5);
        }
        // Every stored number is valid for libphonenumber in region UA.
        let ua: phonenumber::country::Id = "UA".parse().unwrap();
        for (u, ids) in &users {
            for p in u.phone.iter().chain(
                ids.iter()
                    .filter(|i| i.is_phone())
                    .filter_map(|i| i.value.as_ref()),
            ) {
                let n = phonenumber::parse(Some(ua), p).unwrap_or_else(|e| panic!("{p}: {e}"));
                assert!(phonenumber::is_valid(&n), "invalid number {p}");
            }
        }
        // Tickets: every status, some unassigned.
        let tickets: Vec<_> = s.ticket_ids().map(|id| s.ticket(id).unwrap()).collect();
        for st in Status::ALL {
            assert!(
                tickets
                    .iter()
                    .any(|t| t.status.as_deref() == Some(st.as_str())),
                "no {st:?}"
            );
        }
        assert!(
            tickets
                .iter()
                .filter(|t| t.is_open() && t.assignee_id.is_none())
                .count()
                > 50
        );
    }
}
