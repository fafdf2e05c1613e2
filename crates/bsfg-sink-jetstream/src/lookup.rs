//! The on-disk look-up of the idempotency index: message_id token -> what the zone
//! knows of it, kept in an embedded key-value store (redb) beside the gateway.
//!
//! The look-up is a cache of the index stream and never the truth: every entry comes
//! from a reservation the log holds, and `applied` says up to
//! which index sequence the store has read the stream. A store that is lost, from
//! another stream, or of another format is emptied and rebuilt from the stream at
//! start-up.
//!
//! Changes land first in memory (an overlay that look-ups read before the file) and
//! reach the file every half second in one synced transaction, together with the
//! `applied` watermark and bucket sequences they came with: the file is always a
//! consistent earlier state, and a crash loses only the overlay, which start-up reads
//! again from the stream. Big transactions keep redb's copy-on-write amplification
//! low; the overlay holds at most half a second of appends.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::Duration;

use redb::{
    Database, Durability, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition,
};

use crate::error::SinkError;

/// Token (first 128 bits of SHA-256 of the message_id) -> encoded [`Entry`].
const IDS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("ids");
/// Index bucket -> the sequence of its last reservation message this store knows.
const BUCKETS: TableDefinition<u16, u64> = TableDefinition::new("buckets");
/// `applied`, `stream_created`, `format`, `writer`.
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

/// Format of the encoded entries; a store of another format is rebuilt.
const FORMAT: u64 = 2;
/// Changes the overlay holds before the writer who adds more writes them itself (a
/// rebuild reading the stream faster than the flusher's pace).
const MAX_OVERLAY: usize = 200_000;
/// How often the overlay is written to the file.
const FLUSH_EVERY: Duration = Duration::from_millis(500);

/// What the zone knows of one message_id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The message_id itself (the key is its hash).
    pub id: String,
    /// Payload digest, hex.
    pub digest: String,
    /// Class stream the reservation chose.
    pub stream: String,
    /// Fact subject in that stream.
    pub subject: String,
    /// Kept for the stored format; the one-stream log writes 0 (a reservation and
    /// its fact are committed together, so nothing is ever read after it).
    pub after: u64,
    /// Where the fact was stored, once known.
    pub offset: Option<u64>,
    /// When the reservation was made (server time, Unix ms).
    pub at_unix_ms: i64,
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u32).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

impl Entry {
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64 + self.id.len() + self.subject.len());
        out.extend_from_slice(&self.after.to_le_bytes());
        out.extend_from_slice(&self.offset.map_or(0, |o| o.saturating_add(1)).to_le_bytes());
        out.extend_from_slice(&self.at_unix_ms.to_le_bytes());
        let mut digest = [0u8; 32];
        if hex::decode_to_slice(&self.digest, &mut digest).is_ok() {
            out.push(1);
            out.extend_from_slice(&digest);
        } else {
            out.push(0);
            put_str(&mut out, &self.digest);
        }
        put_str(&mut out, &self.stream);
        put_str(&mut out, &self.subject);
        put_str(&mut out, &self.id);
        out
    }

    fn decode(mut b: &[u8]) -> Option<Entry> {
        fn u64_of(b: &mut &[u8]) -> Option<u64> {
            let (head, rest) = b.split_first_chunk::<8>()?;
            *b = rest;
            Some(u64::from_le_bytes(*head))
        }
        fn str_of(b: &mut &[u8]) -> Option<String> {
            let (head, rest) = b.split_first_chunk::<4>()?;
            let n = u32::from_le_bytes(*head) as usize;
            let s = rest.get(..n)?;
            *b = rest.get(n..)?;
            String::from_utf8(s.to_vec()).ok()
        }
        let after = u64_of(&mut b)?;
        let offset = u64_of(&mut b)?.checked_sub(1);
        let at_unix_ms = u64_of(&mut b)? as i64;
        let (kind, rest) = b.split_first()?;
        b = rest;
        let digest = if *kind == 1 {
            let (d, rest) = b.split_first_chunk::<32>()?;
            b = rest;
            hex::encode(d)
        } else {
            str_of(&mut b)?
        };
        Some(Entry {
            digest,
            stream: str_of(&mut b)?,
            subject: str_of(&mut b)?,
            id: str_of(&mut b)?,
            after,
            offset,
            at_unix_ms,
        })
    }
}

/// Changes to apply in one transaction.
#[derive(Debug, Default)]
pub struct Update {
    /// Reservations: inserted unless the token is known already (the first
    /// reservation of an id wins, as in the stream).
    pub reserve: Vec<([u8; 16], Entry)>,
    /// Offsets learnt for known tokens.
    pub offsets: Vec<([u8; 16], u64)>,
    /// Last known reservation sequence per bucket (only ever raised).
    pub buckets: Vec<(u16, u64)>,
    /// New `applied` watermark (only ever raised).
    pub applied: Option<u64>,
    /// The reservations are ones this gateway just won under compare-and-set (after
    /// looking their ids up): stored as they are, without looking again for an
    /// earlier reservation, which cannot exist within the horizon.
    pub won: bool,
}

impl Update {
    /// Nothing to write.
    pub fn is_empty(&self) -> bool {
        self.reserve.is_empty()
            && self.offsets.is_empty()
            && self.buckets.is_empty()
            && self.applied.is_none()
    }
}

/// What start-up reads back.
#[derive(Debug, Clone)]
pub struct State {
    /// Index stream sequence up to which the store has read the stream.
    pub applied: u64,
    /// Last known reservation sequence of every bucket.
    pub buckets: Vec<u64>,
}

/// Changes not yet in the file.
#[derive(Default)]
struct Overlay {
    entries: HashMap<[u8; 16], Entry>,
    /// Offsets for entries that are in the file.
    offsets: HashMap<[u8; 16], u64>,
    buckets: HashMap<u16, u64>,
    applied: Option<u64>,
}

impl Overlay {
    fn is_empty(&self) -> bool {
        self.entries.is_empty()
            && self.offsets.is_empty()
            && self.buckets.is_empty()
            && self.applied.is_none()
    }
}

struct Inner {
    db: Database,
    /// Reservations older than this may be replaced (0: never).
    horizon_ms: i64,
    /// Newest changes.
    mem: Mutex<Overlay>,
    /// Changes being written to the file (read by look-ups meanwhile).
    flushing: RwLock<Overlay>,
    /// One flush at a time.
    flush_lock: Mutex<()>,
}

/// The look-up store. Cheap to share; calls may touch the disk, so async code runs
/// them on the blocking pool.
#[derive(Clone)]
pub struct Lookup {
    inner: Arc<Inner>,
}

fn err(what: &str, e: impl std::fmt::Display) -> SinkError {
    SinkError::Lookup(format!("{what}: {e}"))
}

fn poisoned() -> SinkError {
    SinkError::Lookup("look-up state poisoned".into())
}

impl Lookup {
    /// Opens (or creates) the store at `path`, or an in-memory one when `path` is
    /// `None` (rebuilt from the stream at every start). `stream_created` identifies
    /// the index stream: a store written from another stream is emptied. A
    /// reservation older than `horizon` (zero: never) gives way to a newer one of the
    /// same id. A thread writes the overlay to the file every half second while the
    /// store is in use.
    pub fn open(
        path: Option<&Path>,
        stream_created: u64,
        horizon: Duration,
    ) -> Result<Lookup, SinkError> {
        let mut builder = Database::builder();
        builder.set_cache_size(64 * 1024 * 1024);
        let db = match path {
            Some(p) => {
                if let Some(dir) = p.parent() {
                    std::fs::create_dir_all(dir)
                        .map_err(|e| err(&format!("create {}", dir.display()), e))?;
                }
                // The file is locked while open: by a gateway still shutting down in
                // this process, for a moment, or by another gateway, which is a
                // configuration mistake.
                let mut waited = Duration::ZERO;
                loop {
                    match builder.create(p) {
                        Ok(db) => break db,
                        Err(redb::DatabaseError::DatabaseAlreadyOpen)
                            if waited < Duration::from_secs(10) =>
                        {
                            std::thread::sleep(Duration::from_millis(50));
                            waited += Duration::from_millis(50);
                        }
                        Err(redb::DatabaseError::DatabaseAlreadyOpen) => {
                            return Err(SinkError::Lookup(format!(
                                "{} is in use by another gateway; each gateway of a zone needs its own sink.index_path",
                                p.display()
                            )));
                        }
                        Err(e) => return Err(err(&format!("open {}", p.display()), e)),
                    }
                }
            }
            None => builder
                .create_with_backend(redb::backends::InMemoryBackend::new())
                .map_err(|e| err("open in memory", e))?,
        };
        let lookup = Lookup {
            inner: Arc::new(Inner {
                db,
                horizon_ms: horizon.as_millis() as i64,
                mem: Mutex::new(Overlay::default()),
                flushing: RwLock::new(Overlay::default()),
                flush_lock: Mutex::new(()),
            }),
        };
        let (created, format) = lookup.meta()?;
        if created != Some(stream_created) || format != Some(FORMAT) {
            lookup.reset(stream_created)?;
        }
        let weak = Arc::downgrade(&lookup.inner);
        std::thread::Builder::new()
            .name("bsfg-lookup-flush".into())
            .spawn(move || flusher(weak))
            .map_err(|e| err("start flusher", e))?;
        Ok(lookup)
    }

    fn meta(&self) -> Result<(Option<u64>, Option<u64>), SinkError> {
        let tx = self.inner.db.begin_read().map_err(|e| err("read", e))?;
        let t = match tx.open_table(META) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok((None, None)),
            Err(e) => return Err(err("read meta", e)),
        };
        let get = |k: &str| -> Result<Option<u64>, SinkError> {
            Ok(t.get(k)
                .map_err(|e| err("read meta", e))?
                .map(|v| v.value()))
        };
        Ok((get("stream_created")?, get("format")?))
    }

    /// Empties the store for the index stream identified by `stream_created`.
    fn reset(&self, stream_created: u64) -> Result<(), SinkError> {
        let mut tx = self.inner.db.begin_write().map_err(|e| err("write", e))?;
        tx.set_durability(Durability::Immediate)
            .map_err(|e| err("write", e))?;
        // After a crash (a gateway killed), reopening is then almost instant instead
        // of a walk of the whole file; commits are few (every half second).
        tx.set_quick_repair(true);
        tx.delete_table(IDS).map_err(|e| err("reset", e))?;
        tx.delete_table(BUCKETS).map_err(|e| err("reset", e))?;
        tx.delete_table(META).map_err(|e| err("reset", e))?;
        {
            let mut meta = tx.open_table(META).map_err(|e| err("reset", e))?;
            meta.insert("stream_created", stream_created)
                .map_err(|e| err("reset", e))?;
            meta.insert("format", FORMAT).map_err(|e| err("reset", e))?;
            meta.insert("applied", 0).map_err(|e| err("reset", e))?;
            meta.insert("writer", new_writer())
                .map_err(|e| err("reset", e))?;
            tx.open_table(IDS).map_err(|e| err("reset", e))?;
            tx.open_table(BUCKETS).map_err(|e| err("reset", e))?;
        }
        tx.commit().map_err(|e| err("reset", e))
    }

    /// This gateway's writer number: picked at random when the store is created and
    /// kept with it, so that each gateway of a zone publishes facts on subjects of
    /// its own and gateways never race each other's compare-and-set there.
    pub fn writer(&self) -> Result<u16, SinkError> {
        let tx = self.inner.db.begin_read().map_err(|e| err("read", e))?;
        let meta = tx.open_table(META).map_err(|e| err("read meta", e))?;
        Ok(meta
            .get("writer")
            .map_err(|e| err("read meta", e))?
            .map_or(0, |v| v.value() as u16))
    }

    /// The applied watermark and the bucket sequences (file and overlay).
    pub fn state(&self, buckets: usize) -> Result<State, SinkError> {
        let tx = self.inner.db.begin_read().map_err(|e| err("read", e))?;
        let meta = tx.open_table(META).map_err(|e| err("read meta", e))?;
        let mut applied = meta
            .get("applied")
            .map_err(|e| err("read meta", e))?
            .map_or(0, |v| v.value());
        let table = tx.open_table(BUCKETS).map_err(|e| err("read buckets", e))?;
        let mut out = vec![0; buckets];
        for row in table.iter().map_err(|e| err("read buckets", e))? {
            let (k, v) = row.map_err(|e| err("read buckets", e))?;
            if let Some(slot) = out.get_mut(usize::from(k.value())) {
                *slot = v.value();
            }
        }
        let flushing = self.inner.flushing.read().map_err(|_| poisoned())?;
        let mem = self.inner.mem.lock().map_err(|_| poisoned())?;
        for o in [&*flushing, &*mem] {
            applied = applied.max(o.applied.unwrap_or(0));
            for (b, seq) in &o.buckets {
                if let Some(slot) = out.get_mut(usize::from(*b)) {
                    *slot = (*slot).max(*seq);
                }
            }
        }
        Ok(State {
            applied,
            buckets: out,
        })
    }

    fn read_file(&self, tokens: &[[u8; 16]]) -> Result<Vec<Option<Entry>>, SinkError> {
        let tx = self.inner.db.begin_read().map_err(|e| err("read", e))?;
        let t = tx.open_table(IDS).map_err(|e| err("read ids", e))?;
        tokens
            .iter()
            .map(|k| {
                let Some(v) = t.get(&k[..]).map_err(|e| err("read ids", e))? else {
                    return Ok(None);
                };
                Entry::decode(v.value())
                    .map(Some)
                    .ok_or_else(|| SinkError::Lookup("corrupt look-up entry".into()))
            })
            .collect()
    }

    /// Looks tokens up; one answer per token, in order.
    pub fn get_many(&self, tokens: &[[u8; 16]]) -> Result<Vec<Option<Entry>>, SinkError> {
        let mut out: Vec<Option<Entry>> = vec![None; tokens.len()];
        let mut missing = Vec::new();
        {
            let flushing = self.inner.flushing.read().map_err(|_| poisoned())?;
            let mem = self.inner.mem.lock().map_err(|_| poisoned())?;
            for (i, k) in tokens.iter().enumerate() {
                match mem.entries.get(k).or_else(|| flushing.entries.get(k)) {
                    Some(e) => out[i] = Some(e.clone()),
                    None => missing.push(i),
                }
            }
        }
        if !missing.is_empty() {
            let keys: Vec<[u8; 16]> = missing.iter().map(|i| tokens[*i]).collect();
            for (i, e) in missing.into_iter().zip(self.read_file(&keys)?) {
                out[i] = e;
            }
        }
        let flushing = self.inner.flushing.read().map_err(|_| poisoned())?;
        let mem = self.inner.mem.lock().map_err(|_| poisoned())?;
        for (k, e) in tokens.iter().zip(out.iter_mut()) {
            if let Some(e) = e
                && e.offset.is_none()
            {
                e.offset = mem
                    .offsets
                    .get(k)
                    .or_else(|| flushing.offsets.get(k))
                    .copied();
            }
        }
        Ok(out)
    }

    /// Number of ids the store knows.
    pub fn len(&self) -> Result<u64, SinkError> {
        let tx = self.inner.db.begin_read().map_err(|e| err("read", e))?;
        let t = tx.open_table(IDS).map_err(|e| err("read ids", e))?;
        let file = t.len().map_err(|e| err("read ids", e))?;
        let flushing = self.inner.flushing.read().map_err(|_| poisoned())?;
        let mem = self.inner.mem.lock().map_err(|_| poisoned())?;
        Ok(file + flushing.entries.len() as u64 + mem.entries.len() as u64)
    }

    /// Whether the store knows no id.
    pub fn is_empty(&self) -> Result<bool, SinkError> {
        Ok(self.len()? == 0)
    }

    /// Whether `new` takes the place of `old` (a reservation of the same id made
    /// after `old` fell past the horizon); otherwise the first reservation stays.
    fn replaces(&self, old: &Entry, new: &Entry) -> bool {
        self.inner.horizon_ms > 0 && new.at_unix_ms - old.at_unix_ms >= self.inner.horizon_ms
    }

    /// Applies an update: in memory at once, in the file with the next flush (at
    /// once when `durable`).
    pub fn apply(&self, u: &Update, durable: bool) -> Result<(), SinkError> {
        if u.won {
            let mut mem = self.inner.mem.lock().map_err(|_| poisoned())?;
            for (k, e) in &u.reserve {
                mem.offsets.remove(k);
                mem.entries.insert(*k, e.clone());
            }
        } else if !u.reserve.is_empty() {
            // Reservations of ids the file already knows keep the file's entry.
            let keys: Vec<[u8; 16]> = u.reserve.iter().map(|(k, _)| *k).collect();
            let known = self.get_many(&keys)?;
            let flushing = self.inner.flushing.read().map_err(|_| poisoned())?;
            let mut mem = self.inner.mem.lock().map_err(|_| poisoned())?;
            for ((k, e), old) in u.reserve.iter().zip(known) {
                // Recheck the overlays: an earlier item of this update may be it.
                let current = mem
                    .entries
                    .get(k)
                    .or_else(|| flushing.entries.get(k))
                    .cloned()
                    .or(old);
                match current {
                    Some(old) if !self.replaces(&old, e) => {}
                    _ => {
                        mem.offsets.remove(k);
                        mem.entries.insert(*k, e.clone());
                    }
                }
            }
        }
        let big = {
            let mut mem = self.inner.mem.lock().map_err(|_| poisoned())?;
            for (k, offset) in &u.offsets {
                match mem.entries.get_mut(k) {
                    Some(e) => {
                        e.offset.get_or_insert(*offset);
                    }
                    None => {
                        mem.offsets.entry(*k).or_insert(*offset);
                    }
                }
            }
            for (b, seq) in &u.buckets {
                let slot = mem.buckets.entry(*b).or_insert(0);
                *slot = (*slot).max(*seq);
            }
            if let Some(a) = u.applied {
                mem.applied = Some(mem.applied.unwrap_or(0).max(a));
            }
            mem.entries.len() + mem.offsets.len() > MAX_OVERLAY
        };
        if durable || big {
            self.flush()?;
        }
        Ok(())
    }

    /// Writes the overlay to the file in one synced transaction.
    pub fn flush(&self) -> Result<(), SinkError> {
        let _one = self.inner.flush_lock.lock().map_err(|_| poisoned())?;
        {
            // Lock order everywhere: `flushing`, then `mem`.
            let mut flushing = self.inner.flushing.write().map_err(|_| poisoned())?;
            let mut mem = self.inner.mem.lock().map_err(|_| poisoned())?;
            if mem.is_empty() {
                return Ok(());
            }
            *flushing = std::mem::take(&mut *mem);
        }
        let written = {
            let flushing = self.inner.flushing.read().map_err(|_| poisoned())?;
            self.write(&flushing)
        };
        if written.is_ok() {
            *self.inner.flushing.write().map_err(|_| poisoned())? = Overlay::default();
        }
        // On failure the changes stay in `flushing`, read by look-ups; the next
        // flush merges them back.
        else if let (Ok(mut f), Ok(mut mem)) =
            (self.inner.flushing.write(), self.inner.mem.lock())
        {
            let old = std::mem::take(&mut *f);
            for (k, e) in old.entries {
                mem.entries.entry(k).or_insert(e);
            }
            for (k, o) in old.offsets {
                mem.offsets.entry(k).or_insert(o);
            }
            for (b, s) in old.buckets {
                let slot = mem.buckets.entry(b).or_insert(0);
                *slot = (*slot).max(s);
            }
            if let Some(a) = old.applied {
                mem.applied = Some(mem.applied.unwrap_or(0).max(a));
            }
        }
        written
    }

    fn write(&self, o: &Overlay) -> Result<(), SinkError> {
        let mut tx = self.inner.db.begin_write().map_err(|e| err("write", e))?;
        tx.set_durability(Durability::Immediate)
            .map_err(|e| err("write", e))?;
        // After a crash (a gateway killed), reopening is then almost instant instead
        // of a walk of the whole file; commits are few (every half second).
        tx.set_quick_repair(true);
        {
            let mut ids = tx.open_table(IDS).map_err(|e| err("write ids", e))?;
            // Sorted keys: each leaf of the tree is touched once.
            let mut keys: Vec<&[u8; 16]> = o.entries.keys().chain(o.offsets.keys()).collect();
            keys.sort_unstable();
            keys.dedup();
            for k in keys {
                let old = ids
                    .get(&k[..])
                    .map_err(|e| err("write ids", e))?
                    .and_then(|v| Entry::decode(v.value()));
                let new = match (o.entries.get(k), old) {
                    (Some(e), Some(old)) if !self.replaces(&old, e) => {
                        let mut old = old;
                        if old.offset.is_none() {
                            old.offset = e.offset;
                        }
                        old
                    }
                    (Some(e), _) => e.clone(),
                    (None, Some(old)) => old,
                    (None, None) => continue,
                };
                let mut new = new;
                if new.offset.is_none() {
                    new.offset = o.offsets.get(k).copied();
                }
                ids.insert(&k[..], new.encode().as_slice())
                    .map_err(|e| err("write ids", e))?;
            }
            let mut buckets = tx
                .open_table(BUCKETS)
                .map_err(|e| err("write buckets", e))?;
            for (b, seq) in &o.buckets {
                let have = buckets
                    .get(*b)
                    .map_err(|e| err("write buckets", e))?
                    .map_or(0, |v| v.value());
                if *seq > have {
                    buckets
                        .insert(*b, *seq)
                        .map_err(|e| err("write buckets", e))?;
                }
            }
            if let Some(applied) = o.applied {
                let mut meta = tx.open_table(META).map_err(|e| err("write meta", e))?;
                let have = meta
                    .get("applied")
                    .map_err(|e| err("write meta", e))?
                    .map_or(0, |v| v.value());
                if applied > have {
                    meta.insert("applied", applied)
                        .map_err(|e| err("write meta", e))?;
                }
            }
        }
        tx.commit().map_err(|e| err("commit", e))
    }
}

/// Writes the overlay to the file every [`FLUSH_EVERY`] while the store is in use.
fn flusher(inner: Weak<Inner>) {
    loop {
        std::thread::sleep(FLUSH_EVERY);
        let Some(inner) = inner.upgrade() else {
            return;
        };
        if let Err(e) = (Lookup { inner }).flush() {
            tracing::warn!(error = %e, "writing the idempotency look-up to disk failed; retrying");
        }
    }
}

fn new_writer() -> u64 {
    use sha2::Digest;
    let d = sha2::Sha256::digest(nuid::next().as_bytes());
    u64::from(u16::from_be_bytes([d[0], d[1]]))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn entry(id: &str) -> Entry {
        Entry {
            id: id.into(),
            digest: "ab".repeat(32),
            stream: "facts_operational".into(),
            subject: "facts.operational.batch.0f".into(),
            after: 41,
            offset: None,
            at_unix_ms: 1_764_000_000_000,
        }
    }

    #[test]
    fn entries_round_trip_with_and_without_offset() {
        let mut e = entry("m-1");
        assert_eq!(Entry::decode(&e.encode()), Some(e.clone()));
        e.offset = Some(0);
        assert_eq!(Entry::decode(&e.encode()), Some(e.clone()));
        e.offset = Some(u64::MAX - 1);
        assert_eq!(Entry::decode(&e.encode()), Some(e));
        assert_eq!(Entry::decode(&[1, 2, 3]), None);
    }

    #[test]
    fn first_reservation_wins_offsets_fill_once_and_watermarks_only_rise() {
        let l = Lookup::open(None, 7, Duration::ZERO).unwrap();
        let k = [1u8; 16];
        let mut other = entry("m-1");
        other.digest = "cd".repeat(32);
        l.apply(
            &Update {
                reserve: vec![(k, entry("m-1")), (k, other)],
                buckets: vec![(3, 10)],
                applied: Some(10),
                ..Default::default()
            },
            false,
        )
        .unwrap();
        l.apply(
            &Update {
                offsets: vec![(k, 5), (k, 6)],
                buckets: vec![(3, 4)],
                applied: Some(2),
                ..Default::default()
            },
            true,
        )
        .unwrap();
        let got = l.get_many(&[k, [2u8; 16]]).unwrap();
        assert_eq!(got[0].as_ref().unwrap().digest, "ab".repeat(32));
        assert_eq!(got[0].as_ref().unwrap().offset, Some(5));
        assert_eq!(got[1], None);
        let s = l.state(4096).unwrap();
        assert_eq!((s.applied, s.buckets[3]), (10, 10));
        assert_eq!(l.len().unwrap(), 1);
    }

    #[test]
    fn a_reservation_read_again_keeps_the_offset_the_file_has_and_an_expired_one_gives_way() {
        let l = Lookup::open(None, 7, Duration::from_secs(60)).unwrap();
        let k = [4u8; 16];
        let mut first = entry("m-4");
        first.offset = Some(9);
        l.apply(
            &Update {
                reserve: vec![(k, first.clone())],
                ..Default::default()
            },
            true,
        )
        .unwrap();
        // The same reservation read again from the stream (no offset, later time
        // within the horizon) changes nothing.
        let mut again = entry("m-4");
        again.at_unix_ms += 1000;
        l.apply(
            &Update {
                reserve: vec![(k, again)],
                ..Default::default()
            },
            false,
        )
        .unwrap();
        assert_eq!(
            l.get_many(&[k]).unwrap()[0].as_ref().unwrap().offset,
            Some(9)
        );
        l.flush().unwrap();
        assert_eq!(
            l.get_many(&[k]).unwrap()[0].as_ref().unwrap().offset,
            Some(9)
        );
        // A reservation made after the first fell past the horizon replaces it.
        let mut later = entry("m-4");
        later.digest = "ef".repeat(32);
        later.at_unix_ms += 61_000;
        l.apply(
            &Update {
                reserve: vec![(k, later.clone())],
                offsets: vec![(k, 30)],
                ..Default::default()
            },
            false,
        )
        .unwrap();
        let got = l.get_many(&[k]).unwrap()[0].clone().unwrap();
        assert_eq!(
            (got.digest.as_str(), got.offset),
            (later.digest.as_str(), Some(30))
        );
        l.flush().unwrap();
        let got = l.get_many(&[k]).unwrap()[0].clone().unwrap();
        assert_eq!(
            (got.digest.as_str(), got.offset),
            (later.digest.as_str(), Some(30))
        );
        assert_eq!(l.len().unwrap(), 1);
    }

    #[test]
    fn offsets_for_entries_in_the_file_are_read_from_memory_until_written() {
        let l = Lookup::open(None, 7, Duration::ZERO).unwrap();
        let k = [5u8; 16];
        l.apply(
            &Update {
                reserve: vec![(k, entry("m-5"))],
                ..Default::default()
            },
            true,
        )
        .unwrap();
        l.apply(
            &Update {
                offsets: vec![(k, 77)],
                ..Default::default()
            },
            false,
        )
        .unwrap();
        assert_eq!(
            l.get_many(&[k]).unwrap()[0].as_ref().unwrap().offset,
            Some(77)
        );
        l.flush().unwrap();
        assert_eq!(
            l.read_file(&[k]).unwrap()[0].as_ref().unwrap().offset,
            Some(77)
        );
    }

    #[test]
    fn a_won_reservation_is_read_back_from_memory_and_from_the_file() {
        let l = Lookup::open(None, 7, Duration::ZERO).unwrap();
        let k = [6u8; 16];
        l.apply(
            &Update {
                reserve: vec![(k, entry("m-6"))],
                won: true,
                ..Default::default()
            },
            false,
        )
        .unwrap();
        assert_eq!(l.get_many(&[k]).unwrap()[0].as_ref().unwrap().id, "m-6");
        l.flush().unwrap();
        assert_eq!(l.read_file(&[k]).unwrap()[0].as_ref().unwrap().id, "m-6");
        assert_eq!(l.len().unwrap(), 1);
    }

    #[test]
    fn a_store_from_another_index_stream_is_emptied() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("index.redb");
        {
            let l = Lookup::open(Some(&path), 1, Duration::ZERO).unwrap();
            l.apply(
                &Update {
                    reserve: vec![([9u8; 16], entry("m-9"))],
                    applied: Some(3),
                    ..Default::default()
                },
                true,
            )
            .unwrap();
        }
        let same = Lookup::open(Some(&path), 1, Duration::ZERO).unwrap();
        assert_eq!(same.len().unwrap(), 1);
        assert_eq!(same.state(16).unwrap().applied, 3);
        drop(same);
        let other = Lookup::open(Some(&path), 2, Duration::ZERO).unwrap();
        assert_eq!(other.len().unwrap(), 0);
        assert_eq!(other.state(16).unwrap().applied, 0);
    }
}
