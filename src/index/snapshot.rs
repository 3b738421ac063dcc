//! The index on disk, so a restart answers at once and resumes the exports where they stood.
//!
//! # Format (one file, version 3)
//! ```text
//! "DESKLIDX"  magic, 8 bytes
//! u32 LE      format version (3; versions 1 and 2, without the last fields, are still read)
//! …           postcard body: customers, identities, agents, open tickets, organizations,
//!             cursors, fresh times, loaded flag, users whose identities are still to be fetched
//!             (since 2), rule 7's recent tickets and last calls per customer (since 3)
//! u64 LE      length of magic + version + body
//! u32 LE      crc32 (crc32fast) of magic + version + body
//! ```
//! # Invariants
//! - A snapshot is written whole or not at all: temp file beside the target, fsync, rename over
//!   the target, fsync of the directory. A crash leaves the previous snapshot (or none).
//! - [`load`] either returns a complete index or an error: the length and checksum are checked
//!   before a byte is decoded, and decoding builds a fresh [`Index`] that is only returned once
//!   every record is in. A bad magic, an unknown version, a short file, a checksum mismatch, a
//!   decode error or a duplicate id are all [`SnapshotError::Corrupt`]; the caller then warms up
//!   from the exports instead.
//! - The cursors are saved with the records they produced, so resuming from them never skips a
//!   change (at worst a page is applied twice, which is harmless: applying is idempotent).
//! - Migration from versions 1 and 2: they hold no recent tickets, and the tickets export's cursor
//!   in them has moved past every solved ticket already read, so [`load`] drops that one cursor:
//!   the follower re-reads the tickets export from the start (behind a loaded index that keeps
//!   answering) and rule 7's recent tickets fill in as it goes. Calls reported before the
//!   upgrade are not in any snapshot and are not recovered.
//! - A save encodes a [`Frozen`] view: the index as it stood between two changes of the writer,
//!   taken in an `Arc` clone per chunk of records (see `store`), so the index keeps changing while
//!   the file is written and the file is still one consistent point in time.
//! - A save costs the CPU of encoding and writing the bytes and little else: the body is encoded
//!   into a buffer (customers and tickets by hand, the rest through serde, both exactly postcard)
//!   that is checksummed and written a megabyte at a time (see `write_content`).

use std::{
    fs::{self, File},
    io::{self, Write},
    path::Path,
};

use serde::{Deserialize, Serialize, ser::SerializeSeq};

use rustc_hash::FxHashMap;

use super::{
    AgentRec, Cursors, CustomerRec, IdentRec, Index, OpenStatus, OrgRec, RecentRec, TicketRec,
    name_key, store::Frozen as FrozenStore,
};

const MAGIC: &[u8; 8] = b"DESKLIDX";
const VERSION: u32 = 3;
const HEADER_LEN: usize = 12;
const TRAILER_LEN: usize = 12;

/// The index snapshot could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// Reading or writing the file failed.
    #[error("snapshot I/O: {0}")]
    Io(#[from] std::io::Error),
    /// The file is damaged or of another format: the path and what is wrong.
    #[error("snapshot {0} is corrupt: {1}")]
    Corrupt(String, String),
}

/// The index as it stood when [`Frozen::of`] was called, for a save that runs while it changes.
pub(crate) struct Frozen {
    customers: FrozenStore<CustomerRec>,
    identities: FrozenStore<IdentRec>,
    tickets: FrozenStore<TicketRec>,
    orgs: FrozenStore<OrgRec>,
    recent: FrozenStore<RecentRec>,
    /// Few (agents and admins): copied.
    agents: FxHashMap<i64, AgentRec>,
    cursors: Cursors,
    fresh: [Option<i64>; 3],
    loaded: bool,
    pending: Vec<i64>,
}

impl Frozen {
    /// Cheap: an `Arc` clone per chunk of 1024 records, plus a copy of the agents and of the
    /// pending-identities list (both small).
    pub(crate) fn of(ix: &Index) -> Self {
        Self {
            customers: ix.customers.frozen(),
            identities: ix.identities.frozen(),
            tickets: ix.tickets.frozen(),
            orgs: ix.orgs.frozen(),
            recent: ix.recent.frozen(),
            agents: ix.agents.clone(),
            cursors: ix.cursors.clone(),
            fresh: ix.fresh,
            loaded: ix.loaded,
            pending: ix.pending_identities.iter().copied().collect(),
        }
    }
}

/// Writes atomically (temp file, fsync, rename, fsync of the directory).
pub fn save(index: &Index, path: &Path) -> Result<(), SnapshotError> {
    save_frozen(&Frozen::of(index), path)
}

/// [`save`] of a view taken earlier (what the index writer does, see [`super::writer`]).
pub(crate) fn save_frozen(index: &Frozen, path: &Path) -> Result<(), SnapshotError> {
    let file_name = path.file_name().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            "snapshot path has no file name",
        )
    })?;
    let mut tmp_name = file_name.to_os_string();
    tmp_name.push(".tmp");
    let tmp = path.with_file_name(tmp_name);
    let result = write_file(index, &tmp).and_then(|()| {
        fs::rename(&tmp, path)?;
        sync_dir(path)
    });
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.map_err(SnapshotError::Io)
}

fn write_file(index: &Frozen, tmp: &Path) -> io::Result<()> {
    let mut file = File::create(tmp)?;
    let (len, crc) = write_content(index, &mut file, SPILL_AT)?;
    file.write_all(&len.to_le_bytes())?;
    file.write_all(&crc.to_le_bytes())?;
    file.sync_all()
}

/// Bytes the encoder gathers before it checksums and writes them, in one piece each.
const SPILL_AT: usize = 1 << 20;

/// Writes magic, version and body to `out` in pieces of about `spill_at` bytes and returns their
/// length and crc32 (what the trailer holds).
///
/// Why not `postcard::to_io` into a checksumming `BufWriter`, as before: postcard hands its writer
/// every field (a varint, a string, a flag) in a `write_all` of its own, so the checksum and the
/// buffered writer ran about seven times per record, on a few bytes each, and at 5M customers that
/// bookkeeping was most of a save's CPU (see [`Spill`]).
fn write_content(index: &Frozen, out: &mut impl Write, spill_at: usize) -> io::Result<(u64, u32)> {
    let mut spill = Spill {
        buf: Vec::with_capacity(spill_at + 4096),
        spill_at,
        out,
        crc: crc32fast::Hasher::new(),
        len: 0,
        error: None,
    };
    spill.buf.extend_from_slice(MAGIC);
    spill.buf.extend_from_slice(&VERSION.to_le_bytes());
    let encoded = encode_body(index, &mut spill);
    if let Some(e) = spill.error.take() {
        return Err(e);
    }
    encoded.map_err(io::Error::other)?;
    spill.spill()?;
    Ok((spill.len, spill.crc.finalize()))
}

/// The body, as postcard encodes [`Body`]: a struct is its fields one after the other, a
/// sequence its length then its items. The customers and the tickets (nearly all of the bytes) are
/// encoded here by hand, a record at a time, straight into the buffer; the rest goes through serde.
/// `content_written_in_pieces_is_the_postcard_body` holds the two to the same bytes.
fn encode_body<W: Write>(ix: &Frozen, out: &mut Spill<'_, W>) -> postcard::Result<()> {
    out.varint(ix.customers.len() as u64);
    for c in ix.customers.iter() {
        // CustomerRow
        out.zigzag(c.id);
        out.str(&c.name);
        out.varint(c.phone);
        out.zigzag(c.org);
        out.zigzag(i64::from(c.updated_at));
        out.buf.push(u8::from(c.suspended));
        out.spill_if_full()?;
    }
    out.serde(&Rows(&ix.identities, identity_row))?;
    out.serde(&agent_rows(ix))?;
    out.varint(ix.tickets.len() as u64);
    for t in ix.tickets.iter() {
        // TicketRow
        out.zigzag(t.id);
        out.zigzag(t.requester);
        out.zigzag(t.assignee);
        out.zigzag(i64::from(t.updated_at));
        out.str(&t.subject);
        // A unit variant is its index, a one-byte varint here (the enum's declared order).
        out.buf.push(t.status as u8);
        out.spill_if_full()?;
    }
    out.serde(&Rows(&ix.orgs, org_row))?;
    out.serde(&ix.cursors)?;
    out.serde(&ix.fresh)?;
    out.serde(&ix.loaded)?;
    out.serde(&ix.pending)?;
    out.serde(&Rows(&ix.recent, recent_row))
}

/// A postcard output that appends to a buffer (a `Vec` push per field, nothing else) and, once the
/// buffer holds `spill_at` bytes, checksums it in one call (crc32fast's SIMD path wants long
/// slices) and writes it to `out` in one call.
struct Spill<'a, W> {
    buf: Vec<u8>,
    spill_at: usize,
    out: &'a mut W,
    crc: crc32fast::Hasher,
    len: u64,
    /// The write that failed (postcard's own error can only say "buffer full").
    error: Option<io::Error>,
}

impl<W: Write> Spill<'_, W> {
    fn spill(&mut self) -> io::Result<()> {
        self.crc.update(&self.buf);
        self.len += self.buf.len() as u64;
        self.out.write_all(&self.buf)?;
        self.buf.clear();
        Ok(())
    }

    /// postcard's varint (LEB128) of an unsigned integer or a length.
    #[inline]
    fn varint(&mut self, mut v: u64) {
        while v >= 0x80 {
            self.buf.push(v as u8 | 0x80);
            v >>= 7;
        }
        self.buf.push(v as u8);
    }

    /// postcard's signed integer: zigzag, then varint.
    #[inline]
    fn zigzag(&mut self, v: i64) {
        self.varint(((v << 1) ^ (v >> 63)) as u64);
    }

    #[inline]
    fn str(&mut self, s: &str) {
        self.varint(s.len() as u64);
        self.buf.extend_from_slice(s.as_bytes());
    }

    fn serde<T: Serialize + ?Sized>(&mut self, value: &T) -> postcard::Result<()> {
        postcard::serialize_with_flavor(value, self)
    }

    #[inline]
    fn spill_if_full(&mut self) -> postcard::Result<()> {
        if self.buf.len() < self.spill_at {
            return Ok(());
        }
        self.spill().map_err(|e| {
            self.error = Some(e);
            postcard::Error::SerializeBufferFull
        })
    }
}

impl<W: Write> postcard::ser_flavors::Flavor for &mut Spill<'_, W> {
    type Output = ();

    #[inline]
    fn try_push(&mut self, byte: u8) -> postcard::Result<()> {
        self.buf.push(byte);
        self.spill_if_full()
    }

    #[inline]
    fn try_extend(&mut self, bytes: &[u8]) -> postcard::Result<()> {
        self.buf.extend_from_slice(bytes);
        self.spill_if_full()
    }

    fn finalize(self) -> postcard::Result<()> {
        Ok(())
    }
}

#[cfg(unix)]
fn sync_dir(path: &Path) -> io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    File::open(dir)?.sync_all()
}

#[cfg(not(unix))]
fn sync_dir(_path: &Path) -> io::Result<()> {
    // Directories cannot be opened for fsync here; the rename itself is the best we get.
    Ok(())
}

/// `Ok(None)` when there is no snapshot; `Err(Corrupt)` when it is unreadable (never half-read).
pub fn load(path: &Path) -> Result<Option<Index>, SnapshotError> {
    let bytes = match fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    decode(&bytes, &path.display().to_string()).map(Some)
}

/// A snapshot file's bytes (the shared snapshot in PostgreSQL holds the same format) back to an
/// index; `name` says where they came from in a [`SnapshotError::Corrupt`].
pub fn decode(bytes: &[u8], name: &str) -> Result<Index, SnapshotError> {
    let corrupt = |why: String| SnapshotError::Corrupt(name.to_owned(), why);
    if bytes.len() < HEADER_LEN + TRAILER_LEN {
        return Err(corrupt(format!("only {} bytes", bytes.len())));
    }
    if &bytes[..8] != MAGIC {
        return Err(corrupt("not a Deskline index snapshot (bad magic)".into()));
    }
    let version = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes"));
    if !(1..=VERSION).contains(&version) {
        return Err(corrupt(format!(
            "format version {version}, this build reads {VERSION}"
        )));
    }
    let (content, trailer) = bytes.split_at(bytes.len() - TRAILER_LEN);
    let len = u64::from_le_bytes(trailer[..8].try_into().expect("8 bytes"));
    let crc = u32::from_le_bytes(trailer[8..].try_into().expect("4 bytes"));
    if len != content.len() as u64 {
        return Err(corrupt(format!(
            "length {} does not match the recorded {len} (truncated?)",
            content.len()
        )));
    }
    if crc32fast::hash(content) != crc {
        return Err(corrupt("checksum mismatch".into()));
    }
    let (body, rest): (BodyIn<'_>, _) = postcard::take_from_bytes(&content[HEADER_LEN..])
        .map_err(|e| corrupt(format!("cannot decode: {e}")))?;
    let (pending, recent): (Vec<i64>, Vec<RecentRow>) = match version {
        1 => Ok((Vec::new(), Vec::new())),
        2 => postcard::from_bytes(rest).map(|p| (p, Vec::new())),
        _ => postcard::from_bytes(rest),
    }
    .map_err(|e| corrupt(format!("cannot decode: {e}")))?;
    let mut ix = build(body).map_err(corrupt)?;
    ix.pending_identities = pending.into_iter().collect();
    ix.recent
        .bulk_load(recent.into_iter().map(RecentRec::from).collect())
        .map_err(|id| corrupt(format!("recent tickets of customer {id} appear twice")))?;
    if version < 3 && ix.cursors.tickets.take().is_some() {
        tracing::warn!(
            version,
            "index snapshot from before recent tickets: re-reading the tickets export from the start \
             (the index keeps answering meanwhile; rule 7's recent tickets fill in as it goes)"
        );
    }
    Ok(ix)
}

// ---- body: written straight from the index (no intermediate copy), read into borrowed rows ----

#[derive(Serialize, Deserialize)]
struct CustomerRow<'a> {
    id: i64,
    name: &'a str,
    phone: u64,
    org: i64,
    updated_at: i64,
    suspended: bool,
}

#[derive(Serialize, Deserialize)]
struct AgentRow<'a> {
    id: i64,
    name: &'a str,
    email: &'a str,
    active: bool,
    suspended: bool,
}

#[derive(Serialize, Deserialize)]
struct TicketRow<'a> {
    id: i64,
    requester: i64,
    assignee: i64,
    updated_at: i64,
    subject: &'a str,
    status: OpenStatus,
}

/// Rule 7's memory of one customer (version 3).
#[derive(Serialize, Deserialize)]
struct RecentRow {
    customer: i64,
    ticket: i64,
    ticket_agent: i64,
    ticket_at: u32,
    closed: bool,
    call_agent: i64,
    call_at: u32,
}

fn recent_row(r: &RecentRec) -> RecentRow {
    RecentRow {
        customer: r.customer,
        ticket: r.ticket,
        ticket_agent: r.ticket_agent,
        ticket_at: r.ticket_at,
        closed: r.closed,
        call_agent: r.call_agent,
        call_at: r.call_at,
    }
}

impl From<RecentRow> for RecentRec {
    fn from(r: RecentRow) -> Self {
        RecentRec {
            customer: r.customer,
            ticket: r.ticket,
            ticket_agent: r.ticket_agent,
            call_agent: r.call_agent,
            ticket_at: r.ticket_at,
            call_at: r.call_at,
            closed: r.closed,
        }
    }
}

/// Field order must match [`BodyIn`] (then the pending list, then the recent rows): postcard encodes a struct as the
/// tuple of its fields. Saves write it with [`encode_body`]; this serde form, the encoder of
/// versions 1 to 3 as they were first written, stays as the tests' reference.
#[cfg(test)]
struct Body<'a>(&'a Frozen);

#[derive(Deserialize)]
struct BodyIn<'a> {
    #[serde(borrow)]
    customers: Vec<CustomerRow<'a>>,
    identities: Vec<(i64, Vec<u64>)>,
    #[serde(borrow)]
    agents: Vec<AgentRow<'a>>,
    #[serde(borrow)]
    tickets: Vec<TicketRow<'a>>,
    #[serde(borrow)]
    orgs: Vec<(i64, &'a str)>,
    cursors: Cursors,
    fresh: [Option<i64>; 3],
    loaded: bool,
}

#[cfg(test)]
impl Serialize for Body<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeTuple;
        let ix = self.0;
        let mut t = s.serialize_tuple(10)?;
        t.serialize_element(&Rows(&ix.customers, customer_row))?;
        t.serialize_element(&Rows(&ix.identities, identity_row))?;
        t.serialize_element(&agent_rows(ix))?;
        t.serialize_element(&Rows(&ix.tickets, ticket_row))?;
        t.serialize_element(&Rows(&ix.orgs, org_row))?;
        t.serialize_element(&ix.cursors)?;
        t.serialize_element(&ix.fresh)?;
        t.serialize_element(&ix.loaded)?;
        t.serialize_element(&ix.pending)?;
        t.serialize_element(&Rows(&ix.recent, recent_row))?;
        t.end()
    }
}

fn agent_rows<'a>(ix: &'a Frozen) -> Seq<impl Fn() -> AgentRows<'a>> {
    Seq(ix.agents.len(), || {
        ix.agents.iter().map(agent_row as fn(_) -> _)
    })
}

type AgentRows<'a> = std::iter::Map<
    std::collections::hash_map::Iter<'a, i64, AgentRec>,
    fn((&'a i64, &'a AgentRec)) -> AgentRow<'a>,
>;

fn agent_row<'a>((&id, a): (&'a i64, &'a AgentRec)) -> AgentRow<'a> {
    AgentRow {
        id,
        name: &a.name,
        email: &a.email,
        active: a.active,
        suspended: a.suspended,
    }
}

#[cfg(test)]
fn customer_row(c: &CustomerRec) -> CustomerRow<'_> {
    CustomerRow {
        id: c.id,
        name: &c.name,
        phone: c.phone,
        org: c.org,
        updated_at: i64::from(c.updated_at),
        suspended: c.suspended,
    }
}

fn identity_row(i: &IdentRec) -> (i64, &[u64]) {
    (i.user, &i.phones)
}

fn org_row(o: &OrgRec) -> (i64, &str) {
    (o.id, &o.name)
}

#[cfg(test)]
fn ticket_row(t: &TicketRec) -> TicketRow<'_> {
    TicketRow {
        id: t.id,
        requester: t.requester,
        assignee: t.assignee,
        updated_at: i64::from(t.updated_at),
        subject: &t.subject,
        status: t.status,
    }
}

/// A sequence of known length produced by a closure (serde needs the length up front for postcard).
struct Seq<F>(usize, F);

impl<F, I> Serialize for Seq<F>
where
    F: Fn() -> I,
    I: Iterator,
    I::Item: Serialize,
{
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(self.0))?;
        for item in (self.1)() {
            seq.serialize_element(&item)?;
        }
        seq.end()
    }
}

/// The live records of a frozen store, each mapped to its row.
struct Rows<'a, T, F>(&'a FrozenStore<T>, F);

impl<'a, T, F, R> Serialize for Rows<'a, T, F>
where
    F: Fn(&'a T) -> R,
    R: Serialize,
{
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(self.0.len()))?;
        for rec in self.0.iter() {
            seq.serialize_element(&(self.1)(rec))?;
        }
        seq.end()
    }
}

fn build(body: BodyIn<'_>) -> Result<Index, String> {
    let mut ix = Index::new();
    let identities: Vec<IdentRec> = body
        .identities
        .into_iter()
        .map(|(user, phones)| IdentRec {
            user,
            phones: phones.into_boxed_slice(),
        })
        .collect();
    ix.identities
        .bulk_load(identities)
        .map_err(|id| format!("identities of user {id} appear twice"))?;
    // The stores and the tables derived from them are filled in bulk, each table sized once and
    // swept in bucket order (see `store::insert_in_bucket_order`): what keeps a restart linear in
    // the account's size.
    let customers: Vec<CustomerRec> = body
        .customers
        .into_iter()
        .map(|c| CustomerRec {
            id: c.id,
            name: c.name.into(),
            phone: c.phone,
            org: c.org,
            updated_at: u32::try_from(c.updated_at).unwrap_or(0),
            suspended: c.suspended,
        })
        .collect();
    ix.customers
        .bulk_load(customers)
        .map_err(|id| format!("customer {id} appears twice"))?;
    for a in body.agents {
        let key: Box<str> = name_key(a.name).into();
        ix.agent_keys.entry(key.clone()).or_default().push(a.id);
        let rec = AgentRec {
            name: a.name.into(),
            key,
            email: a.email.into(),
            active: a.active,
            suspended: a.suspended,
        };
        if ix.agents.insert(a.id, rec).is_some() {
            return Err(format!("agent {} appears twice", a.id));
        }
    }
    let tickets: Vec<TicketRec> = body
        .tickets
        .into_iter()
        .map(|t| TicketRec {
            id: t.id,
            requester: t.requester,
            assignee: t.assignee,
            updated_at: u32::try_from(t.updated_at).unwrap_or(0),
            subject: t.subject.into(),
            status: t.status,
        })
        .collect();
    ix.tickets
        .bulk_load(tickets)
        .map_err(|id| format!("ticket {id} appears twice"))?;
    ix.index_loaded();
    let orgs: Vec<OrgRec> = body
        .orgs
        .into_iter()
        .map(|(id, name)| OrgRec {
            id,
            name: name.into(),
        })
        .collect();
    ix.orgs
        .bulk_load(orgs)
        .map_err(|id| format!("organization {id} appears twice"))?;
    ix.cursors = body.cursors;
    ix.fresh = body.fresh;
    ix.loaded = body.loaded;
    Ok(ix)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        index::Export,
        phone::PhoneParser,
        zendesk::models::{Identity, Organization, Ticket, User},
    };

    fn sample() -> Index {
        let p = PhoneParser::new("UA").unwrap();
        let mut ix = Index::new();
        ix.apply_user(
            &User {
                id: 1,
                name: Some("Іван Франко".into()),
                phone: Some("044 123 45 67".into()),
                role: Some("end-user".into()),
                organization_id: Some(9),
                updated_at: Some("2024-05-01T10:00:00Z".into()),
                ..Default::default()
            },
            &p,
        );
        ix.apply_identities(
            1,
            &[Identity {
                id: 5,
                user_id: 1,
                kind: Some("phone_number".into()),
                value: Some("+380501112233".into()),
                ..Default::default()
            }],
            &p,
        );
        ix.apply_user(
            &User {
                id: 2,
                name: Some("Olena Petrenko".into()),
                email: Some("olena@example.com".into()),
                role: Some("agent".into()),
                ..Default::default()
            },
            &p,
        );
        ix.apply_ticket(&Ticket {
            id: 77,
            subject: Some("Call me".into()),
            status: Some("pending".into()),
            requester_id: Some(1),
            assignee_id: Some(2),
            updated_at: Some("2024-05-02T10:00:00Z".into()),
            ..Default::default()
        });
        ix.apply_organization(&Organization {
            id: 9,
            name: Some("Acme".into()),
            ..Default::default()
        });
        ix.cursors_mut().users = Some("MTY5".into());
        ix.cursors_mut().organizations = Some(1_700_000_000);
        ix.mark_fresh(Export::Users, 1_000);
        ix.mark_fresh(Export::Tickets, 2_000);
        ix.mark_fresh(Export::Organizations, 3_000);
        ix.set_loaded();
        ix
    }

    #[test]
    fn round_trip_keeps_everything() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("index.snapshot");
        assert!(load(&path).unwrap().is_none());
        let ix = sample();
        save(&ix, &path).unwrap();
        let back = load(&path).unwrap().expect("snapshot present");
        assert_eq!(back.counts(), ix.counts());
        assert_eq!(back.cursors(), ix.cursors());
        assert_eq!(back.age_ms(5_000), Some(4_000));
        assert!(back.is_loaded());
        let p = PhoneParser::new("UA").unwrap();
        for raw in ["+380441234567", "+380501112233"] {
            let phone = p.parse(raw).unwrap();
            assert_eq!(back.customer_ids_by_phone(phone), vec![1], "{raw}");
        }
        let t: Vec<_> = back.open_tickets_of(1).collect();
        assert_eq!(t, ix.open_tickets_of(1).collect::<Vec<_>>());
        assert_eq!(back.agent(2), ix.agent(2));
        assert_eq!(back.agent_by_name("olena  petrenko"), Some(2));
        assert_eq!(back.organization_name(9), Some("Acme"));
        assert_eq!(back.customer(1), ix.customer(1));
        // No temp file is left behind.
        let names: Vec<_> = fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 1);
        // Saving again over an existing snapshot replaces it.
        save(&back, &path).unwrap();
        assert!(load(&path).unwrap().is_some());
    }

    /// Rule 7's memory is saved (version 3); a version 2 file, which has none, still loads, and
    /// its tickets cursor is dropped so the tickets export is read again and fills it in.
    #[test]
    fn recent_tickets_and_calls_round_trip_and_v2_migrates() {
        let p = PhoneParser::new("UA").unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("index.snapshot");
        let mut ix = sample();
        ix.cursors_mut().tickets = Some("t-cursor".into());
        ix.apply_ticket(&Ticket {
            id: 70,
            status: Some("closed".into()),
            requester_id: Some(1),
            assignee_id: Some(2),
            updated_at: Some("2024-05-02T10:00:00Z".into()),
            ..Default::default()
        });
        ix.apply_call(p.parse("+380441234567").unwrap(), 2, 1_717_000_000);
        save(&ix, &path).unwrap();
        let back = load(&path).unwrap().unwrap();
        assert_eq!(back.done_ticket_of(1), ix.done_ticket_of(1));
        assert_eq!(back.done_ticket_of(1).unwrap().status, "closed");
        assert_eq!(back.last_call_of(1), ix.last_call_of(1));
        assert_eq!(back.last_call_of(1).unwrap().started_at, 1_717_000_000);
        assert_eq!(back.cursors().tickets.as_deref(), Some("t-cursor"));

        // The same index without rule 7's memory, written as version 2 wrote it: the body up to
        // the pending list (an empty recent list is one zero byte at its end), version 2.
        let mut old = sample();
        old.cursors_mut().tickets = Some("t-cursor".into());
        save(&old, &path).unwrap();
        let bytes = fs::read(&path).unwrap();
        let body_end = bytes.len() - TRAILER_LEN;
        assert_eq!(bytes[body_end - 1], 0, "empty recent list");
        let mut v2 = bytes[..body_end - 1].to_vec();
        v2[8..12].copy_from_slice(&2u32.to_le_bytes());
        let len = v2.len() as u64;
        let crc = crc32fast::hash(&v2);
        v2.extend_from_slice(&len.to_le_bytes());
        v2.extend_from_slice(&crc.to_le_bytes());
        fs::write(&path, &v2).unwrap();
        let back = load(&path).unwrap().expect("a version 2 snapshot loads");
        assert_eq!(back.counts(), old.counts());
        assert!(back.is_loaded());
        assert_eq!(back.recent_len(), 0);
        assert_eq!(
            back.cursors().tickets,
            None,
            "the tickets export is read again"
        );
        assert_eq!(back.cursors().users, old.cursors().users);
    }

    /// The body written in pieces (here of a few bytes, so every field boundary is crossed by
    /// some spill) is byte for byte postcard's encoding of the whole body after magic and
    /// version, as `postcard::to_io` wrote it before: existing snapshots and the new ones are one
    /// format. The returned length and crc32 are those of all the bytes.
    #[test]
    fn content_written_in_pieces_is_the_postcard_body() {
        let p = PhoneParser::new("UA").unwrap();
        let mut ix = sample();
        ix.add_pending_identities(vec![5, 6]);
        ix.apply_call(p.parse("+380441234567").unwrap(), 2, 1_717_000_000);
        for i in 0..3000 {
            ix.apply_user(
                &User {
                    id: 1000 + i,
                    name: Some(format!("Customer {i} {}", "x".repeat(i as usize % 300))),
                    phone: Some(format!("+38050{:07}", i)),
                    role: Some("end-user".into()),
                    ..Default::default()
                },
                &p,
            );
        }
        for (i, status) in ["new", "open", "pending", "hold"].into_iter().enumerate() {
            ix.apply_ticket(&Ticket {
                id: 500 + i as i64,
                subject: Some(format!("Ticket {status} ☎")),
                status: Some(status.into()),
                requester_id: Some(1000 + i as i64),
                assignee_id: Some(2),
                updated_at: Some("2024-05-02T10:00:00Z".into()),
                ..Default::default()
            });
        }
        ix.apply_user(
            &User {
                id: i64::MAX - 1,
                name: Some("Suspended".into()),
                phone: Some("+380671234567".into()),
                role: Some("end-user".into()),
                suspended: Some(true),
                organization_id: Some(9),
                updated_at: Some("2024-05-01T10:00:00Z".into()),
                ..Default::default()
            },
            &p,
        );
        let frozen = Frozen::of(&ix);
        let mut expected = MAGIC.to_vec();
        expected.extend_from_slice(&VERSION.to_le_bytes());
        expected.extend(postcard::to_stdvec(&Body(&frozen)).unwrap());
        for spill_at in [1, 7, 4096, SPILL_AT] {
            let mut out = Vec::new();
            let (len, crc) = write_content(&frozen, &mut out, spill_at).unwrap();
            assert!(out == expected, "spill_at {spill_at}: bytes differ");
            assert_eq!(len, expected.len() as u64, "spill_at {spill_at}");
            assert_eq!(crc, crc32fast::hash(&expected), "spill_at {spill_at}");
        }
    }

    /// A write that fails mid-body (a full disk) is reported as itself, not as postcard's
    /// "buffer full", and nothing after it is written.
    #[test]
    fn a_failed_write_is_reported_as_itself() {
        struct FullAfter(usize, usize);
        impl Write for FullAfter {
            fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
                if self.1 + buf.len() > self.0 {
                    return Err(io::Error::new(io::ErrorKind::StorageFull, "disk full"));
                }
                self.1 += buf.len();
                Ok(buf.len())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let frozen = Frozen::of(&sample());
        let mut out = FullAfter(40, 0);
        let err = write_content(&frozen, &mut out, 16).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::StorageFull, "{err}");
        assert_eq!(err.to_string(), "disk full");
        assert!(out.1 <= 40);
    }

    #[test]
    fn truncated_file_is_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("index.snapshot");
        save(&sample(), &path).unwrap();
        let bytes = fs::read(&path).unwrap();
        for cut in [0, 5, HEADER_LEN, bytes.len() / 2, bytes.len() - 1] {
            fs::write(&path, &bytes[..cut]).unwrap();
            assert!(
                matches!(load(&path), Err(SnapshotError::Corrupt(..))),
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn any_flipped_byte_is_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("index.snapshot");
        save(&sample(), &path).unwrap();
        let bytes = fs::read(&path).unwrap();
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0x20;
            fs::write(&path, &b).unwrap();
            assert!(
                matches!(load(&path), Err(SnapshotError::Corrupt(..))),
                "byte {i}"
            );
        }
    }

    #[test]
    fn other_version_is_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("index.snapshot");
        save(&sample(), &path).unwrap();
        let mut b = fs::read(&path).unwrap();
        b[8] = 4;
        fs::write(&path, &b).unwrap();
        let err = load(&path).unwrap_err();
        assert!(err.to_string().contains("version 4"), "{err}");
    }

    /// A save encodes the index as it was when the view was taken, while the index goes on
    /// changing in every store (the chunks it shares are copied on write, not changed under it).
    #[test]
    fn a_frozen_view_is_saved_as_it_was() {
        let p = PhoneParser::new("UA").unwrap();
        let mut ix = sample();
        ix.add_pending_identities(vec![5, 6]);
        let frozen = Frozen::of(&ix);
        let before = ix.counts();
        ix.apply_user(
            &User {
                id: 1,
                active: Some(false),
                ..Default::default()
            },
            &p,
        );
        ix.apply_ticket(&Ticket {
            id: 78,
            status: Some("open".into()),
            requester_id: Some(3),
            ..Default::default()
        });
        ix.apply_organization(&Organization {
            id: 9,
            deleted_at: Some("2024-06-01T00:00:00Z".into()),
            ..Default::default()
        });
        ix.remove_pending_identities(&[5]);
        ix.cursors_mut().users = Some("later".into());
        assert_ne!(ix.counts(), before);

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("index.snapshot");
        save_frozen(&frozen, &path).unwrap();
        drop(frozen);
        let back = load(&path).unwrap().unwrap();
        assert_eq!(back.counts(), before);
        assert_eq!(back.customer(1).map(|c| c.id), Some(1));
        assert!(back.open_ticket(78).is_none());
        assert_eq!(back.organization_name(9), Some("Acme"));
        assert_eq!(back.pending_identities(10), vec![5, 6]);
        assert_ne!(back.cursors().users.as_deref(), Some("later"));
        // The live index kept its own changes.
        assert!(ix.customer(1).is_none());
        assert_eq!(ix.pending_identities(10), vec![6]);
    }

    /// The bulk rebuild on load (tables filled in bucket order) gives the same answers as the
    /// index that was saved, over a generated account with shared numbers, second identities,
    /// suspended customers and several open tickets per requester.
    #[test]
    fn generated_account_round_trips() {
        let store = deskline_sim::generate(&deskline_sim::GenConfig {
            users: 4000,
            tickets: 6000,
            agents: 20,
            organizations: 50,
            seed: 5,
        });
        let p = PhoneParser::new("UA").unwrap();
        let mut ix = Index::new();
        // The simulator's own wire types, read as the client's models through JSON as over HTTP.
        fn model<T: serde::de::DeserializeOwned>(v: impl serde::Serialize) -> T {
            serde_json::from_value(serde_json::to_value(v).unwrap()).unwrap()
        }
        let users: Vec<User> = model(
            store
                .user_ids()
                .filter_map(|id| store.user(id))
                .collect::<Vec<_>>(),
        );
        let ids: Vec<Identity> = model(
            users
                .iter()
                .flat_map(|u| store.identities(u.id))
                .collect::<Vec<_>>(),
        );
        ix.apply_user_batch(crate::index::UserBatch::prepare(&users, Some(&ids), &p));
        for id in store.ticket_ids() {
            ix.apply_ticket(&model(store.ticket(id).unwrap()));
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("index.snapshot");
        save(&ix, &path).unwrap();
        let back = load(&path).unwrap().unwrap();
        assert_eq!(back.counts(), ix.counts());
        assert!(ix.counts().open_tickets > 1000, "{:?}", ix.counts());
        for u in &users {
            assert_eq!(back.customer(u.id), ix.customer(u.id));
            let mut a: Vec<_> = back.open_tickets_of(u.id).collect();
            let mut b: Vec<_> = ix.open_tickets_of(u.id).collect();
            a.sort_by_key(|t| t.id);
            b.sort_by_key(|t| t.id);
            assert_eq!(a, b, "tickets of {}", u.id);
        }
        for raw in ids.iter().filter_map(|i| i.value.as_deref()) {
            if let Ok(e) = p.parse(raw) {
                assert_eq!(
                    back.sorted_ids_by_phone(e),
                    ix.sorted_ids_by_phone(e),
                    "{raw}"
                );
            }
        }
    }

    #[test]
    fn duplicate_records_are_corrupt() {
        let row = |id| CustomerRow {
            id,
            name: "x",
            phone: 380441234567,
            org: 0,
            updated_at: 0,
            suspended: false,
        };
        let body = |customers| BodyIn {
            customers,
            identities: Vec::new(),
            agents: Vec::new(),
            tickets: Vec::new(),
            orgs: Vec::new(),
            cursors: Cursors::default(),
            fresh: [None; 3],
            loaded: true,
        };
        assert!(build(body(vec![row(1), row(2), row(3)])).is_ok());
        let err = build(body(vec![row(1), row(2), row(1)])).unwrap_err();
        assert_eq!(err, "customer 1 appears twice");
    }
}
