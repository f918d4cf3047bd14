//! The index: a RocksDB database holding everything the store remembers
//! besides the objects themselves.
//!
//! ```text
//! column family   key                                    value
//! entries         compile key ‖ flavor tag [‖ mtime ‖ size] object id ‖ size ‖ header
//!                 compile key ‖ 0   (any flavor: the body)  the same, for deriving
//! failures        compile key                            the compiler's message
//! stat            absolute source path                   dev ‖ ino ‖ size ‖ mtime ‖ ctime ‖ seen ‖ blake3
//! interpreters    executable path                        identity + probe (JSON)
//! links           absolute pyc path                      object id ‖ flavor tag
//! ```
//!
//! Objects are written before the entries that name them, so an entry never
//! points at a missing object after a crash.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rocksdb::{ColumnFamilyDescriptor, Options, DB};

use crate::key::{CompileKey, SourceDigest};
use crate::objects::ObjectId;
use crate::pyc::{Flavor, HEADER_LEN};
use crate::{Error, Result};

const CF_ENTRIES: &str = "entries";
const CF_FAILURES: &str = "failures";
const CF_STAT: &str = "stat";
const CF_INTERPRETERS: &str = "interpreters";
const CF_LINKS: &str = "links";
const FAMILIES: [&str; 5] = [CF_ENTRIES, CF_FAILURES, CF_STAT, CF_INTERPRETERS, CF_LINKS];

/// How long to wait for another process holding the index before giving up.
const LOCK_WAIT: Duration = Duration::from_secs(600);

/// One stored pyc: which object, how big, and its header (to recognise a
/// destination that already holds it without reading the object).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    /// The object's content address.
    pub object: ObjectId,
    /// The object's size in bytes.
    pub size: u64,
    /// The object's first 16 bytes.
    pub header: [u8; HEADER_LEN],
}

impl Entry {
    fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(32 + 8 + HEADER_LEN);
        v.extend_from_slice(&self.object.0);
        v.extend_from_slice(&self.size.to_le_bytes());
        v.extend_from_slice(&self.header);
        v
    }

    fn decode(v: &[u8]) -> Option<Entry> {
        if v.len() != 32 + 8 + HEADER_LEN {
            return None;
        }
        Some(Entry {
            object: ObjectId(v[..32].try_into().ok()?),
            size: u64::from_le_bytes(v[32..40].try_into().ok()?),
            header: v[40..].try_into().ok()?,
        })
    }
}

/// Which entry of a compile key: a flavor (with the source's stat for
/// timestamp pycs, whose header depends on it), or the body in any flavor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntrySlot {
    /// Any pyc with this body; its header is replaced to derive other flavors.
    Body,
    /// A hash-based flavor.
    Hashed(Flavor),
    /// A timestamp pyc for a source with this mtime (seconds) and size.
    Timestamp {
        /// `st_mtime` in whole seconds.
        mtime: i64,
        /// `st_size`.
        size: u64,
    },
}

fn entry_key(key: &CompileKey, slot: EntrySlot) -> Vec<u8> {
    let mut k = Vec::with_capacity(32 + 1 + 16);
    k.extend_from_slice(&key.0);
    match slot {
        EntrySlot::Body => k.push(0),
        EntrySlot::Hashed(flavor) => k.push(flavor.tag()),
        EntrySlot::Timestamp { mtime, size } => {
            k.push(Flavor::Timestamp.tag());
            k.extend_from_slice(&mtime.to_le_bytes());
            k.extend_from_slice(&size.to_le_bytes());
        }
    }
    k
}

/// What the stat cache remembers of a source file: enough of its `stat` to
/// tell it has not changed, and the blake3 of its bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StatRecord {
    /// `st_dev`.
    pub dev: u64,
    /// `st_ino`.
    pub ino: u64,
    /// `st_size`.
    pub size: u64,
    /// `st_mtime` in nanoseconds.
    pub mtime_ns: i64,
    /// `st_ctime` in nanoseconds.
    pub ctime_ns: i64,
    /// When the file was hashed, in nanoseconds since the epoch.
    pub seen_ns: i64,
    /// blake3 of the bytes.
    pub digest: SourceDigest,
}

impl StatRecord {
    fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(6 * 8 + 32);
        for n in [self.dev, self.ino, self.size] {
            v.extend_from_slice(&n.to_le_bytes());
        }
        for n in [self.mtime_ns, self.ctime_ns, self.seen_ns] {
            v.extend_from_slice(&n.to_le_bytes());
        }
        v.extend_from_slice(&self.digest.0);
        v
    }

    fn decode(v: &[u8]) -> Option<StatRecord> {
        if v.len() != 6 * 8 + 32 {
            return None;
        }
        let u = |i: usize| u64::from_le_bytes(v[i * 8..i * 8 + 8].try_into().unwrap());
        Some(StatRecord {
            dev: u(0),
            ino: u(1),
            size: u(2),
            mtime_ns: u(3) as i64,
            ctime_ns: u(4) as i64,
            seen_ns: u(5) as i64,
            digest: SourceDigest(v[48..80].try_into().ok()?),
        })
    }
}

/// The open index.
pub struct Index {
    db: DB,
    path: PathBuf,
    /// Whether this process wrote anything: then its memtables are flushed
    /// on close, so the next open does not replay the write-ahead log.
    dirty: AtomicBool,
}

impl Index {
    /// Opens (creating if needed) the index at `path`. When another process
    /// holds it, waits and says so once on stderr.
    pub fn open(path: &Path) -> Result<Index> {
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        opts.set_keep_log_file_num(2);
        opts.set_max_log_file_size(1 << 20);
        let started = Instant::now();
        let mut said = false;
        loop {
            let families = FAMILIES
                .iter()
                .map(|name| ColumnFamilyDescriptor::new(*name, Options::default()));
            match DB::open_cf_descriptors(&opts, path, families) {
                Ok(db) => {
                    return Ok(Index {
                        db,
                        path: path.to_path_buf(),
                        dirty: AtomicBool::new(false),
                    })
                }
                Err(e) if is_lock_error(&e) && started.elapsed() < LOCK_WAIT => {
                    if !said {
                        eprintln!(
                            "pycstore: waiting for another pycstore process using the store index `{}`",
                            path.display()
                        );
                        said = true;
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => {
                    return Err(Error::Index {
                        path: path.to_path_buf(),
                        message: format!(
                            "{e}; if the index is damaged, move `{}` aside and run `pycstore link` again \
                             to rebuild it (objects are kept)",
                            path.display()
                        ),
                    })
                }
            }
        }
    }

    fn cf(&self, name: &str) -> &rocksdb::ColumnFamily {
        self.db
            .cf_handle(name)
            .expect("column families are created on open")
    }

    fn get(&self, cf: &str, key: &[u8]) -> Result<Option<Vec<u8>>> {
        self.db
            .get_cf(self.cf(cf), key)
            .map_err(|e| Error::index(&self.path, e))
    }

    fn put(&self, cf: &str, key: &[u8], value: &[u8]) -> Result<()> {
        self.dirty.store(true, Ordering::Relaxed);
        self.db
            .put_cf(self.cf(cf), key, value)
            .map_err(|e| Error::index(&self.path, e))
    }

    /// Looks up a stored pyc. An undecodable value is a miss.
    pub fn entry(&self, key: &CompileKey, slot: EntrySlot) -> Result<Option<Entry>> {
        Ok(self
            .get(CF_ENTRIES, &entry_key(key, slot))?
            .and_then(|v| Entry::decode(&v)))
    }

    /// Records a stored pyc.
    pub fn put_entry(&self, key: &CompileKey, slot: EntrySlot, entry: &Entry) -> Result<()> {
        self.put(CF_ENTRIES, &entry_key(key, slot), &entry.encode())
    }

    /// The compiler's message for a source that does not compile, if known.
    pub fn failure(&self, key: &CompileKey) -> Result<Option<String>> {
        Ok(self
            .get(CF_FAILURES, &key.0)?
            .map(|v| String::from_utf8_lossy(&v).into_owned()))
    }

    /// Remembers that a source does not compile, so it is not retried.
    pub fn put_failure(&self, key: &CompileKey, message: &str) -> Result<()> {
        self.put(CF_FAILURES, &key.0, message.as_bytes())
    }

    /// The stat cache's record of a source path.
    pub fn stat(&self, path: &Path) -> Result<Option<StatRecord>> {
        Ok(self
            .get(CF_STAT, path.as_os_str().as_encoded_bytes())?
            .and_then(|v| StatRecord::decode(&v)))
    }

    /// Updates the stat cache.
    pub fn put_stat(&self, path: &Path, record: &StatRecord) -> Result<()> {
        self.put(
            CF_STAT,
            path.as_os_str().as_encoded_bytes(),
            &record.encode(),
        )
    }

    /// A cached interpreter probe (JSON).
    pub fn interpreter(&self, exe: &Path) -> Result<Option<Vec<u8>>> {
        self.get(CF_INTERPRETERS, exe.as_os_str().as_encoded_bytes())
    }

    /// Caches an interpreter probe (JSON).
    pub fn put_interpreter(&self, exe: &Path, probe: &[u8]) -> Result<()> {
        self.put(CF_INTERPRETERS, exe.as_os_str().as_encoded_bytes(), probe)
    }

    /// Records that `pyc` was materialized from `object`.
    pub fn put_link(&self, pyc: &Path, object: &ObjectId, flavor: Flavor) -> Result<()> {
        let mut v = object.0.to_vec();
        v.push(flavor.tag());
        self.put(CF_LINKS, pyc.as_os_str().as_encoded_bytes(), &v)
    }

    /// The object recorded for a materialized pyc path, if any.
    pub fn link_of(&self, pyc: &Path) -> Result<Option<ObjectId>> {
        Ok(self
            .get(CF_LINKS, pyc.as_os_str().as_encoded_bytes())?
            .and_then(|v| v.get(..32).and_then(|b| b.try_into().ok()).map(ObjectId)))
    }
}

impl Drop for Index {
    fn drop(&mut self) {
        if self.dirty.load(Ordering::Relaxed) {
            for name in FAMILIES {
                if let Err(e) = self.db.flush_cf(self.cf(name)) {
                    tracing::debug!("flushing `{}` ({name}) failed: {e}", self.path.display());
                }
            }
        }
    }
}

fn is_lock_error(e: &rocksdb::Error) -> bool {
    let s = e.to_string();
    s.contains("lock")
        && (s.contains("Resource temporarily unavailable") || s.contains("No locks available"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip_per_slot() {
        let dir = tempfile::tempdir().unwrap();
        let index = Index::open(&dir.path().join("index")).unwrap();
        let key = CompileKey([7; 32]);
        let entry = Entry {
            object: ObjectId([9; 32]),
            size: 1234,
            header: [3; 16],
        };
        index
            .put_entry(&key, EntrySlot::Hashed(Flavor::CheckedHash), &entry)
            .unwrap();
        assert_eq!(
            index
                .entry(&key, EntrySlot::Hashed(Flavor::CheckedHash))
                .unwrap(),
            Some(entry)
        );
        assert_eq!(index.entry(&key, EntrySlot::Body).unwrap(), None);
        assert_eq!(
            index
                .entry(&key, EntrySlot::Timestamp { mtime: 1, size: 2 })
                .unwrap(),
            None
        );
        let rec = StatRecord {
            dev: 1,
            ino: 2,
            size: 3,
            mtime_ns: 4,
            ctime_ns: 5,
            seen_ns: 6,
            digest: SourceDigest([8; 32]),
        };
        index.put_stat(Path::new("/a/b.py"), &rec).unwrap();
        assert_eq!(index.stat(Path::new("/a/b.py")).unwrap(), Some(rec));
    }
}
