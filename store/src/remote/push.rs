//! `push`: upload what the local store holds to the remotes, to prewarm a
//! shared cache from a trusted job.
//!
//! What to push is found from the pycs `link` recorded placing (under the
//! given prefixes, or all): each names its object, and its path names its
//! source and optimize level; the source as it is now gives the compile
//! key. A record of an interpreter whose keys are not the common ones (one
//! others can change) is never pushed, nor an object that no longer
//! matches its source (the source changed since), nor one Python could not
//! load.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::io::Read;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use serde::Serialize;

use super::{format, prepare, Bundler, Read as Got, Record, Remotes};
use crate::index::{EntrySlot, Family};
use crate::key::{CompileKey, SourceDigest, COMPILE_FLAGS_DEFAULT};
use crate::pyc::{self, HashVariant, HEADER_LEN};
use crate::{Result, Store};

/// What `push` did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct PushReport {
    /// Recorded pycs considered.
    pub pycs: u64,
    /// Distinct compile keys found among them.
    pub keys: u64,
    /// Keys every remote already had.
    pub present: u64,
    /// Keys uploaded to at least one remote.
    pub uploaded: u64,
    /// Bundles written to at least one remote (those every remote held
    /// whole are not written again).
    pub bundles: u64,
    /// Recorded pycs left out: interpreters whose keys are their own, sources
    /// changed or gone, objects missing or not loadable.
    pub skipped: u64,
}

/// The source and optimize level of a pyc at `DIR/__pycache__/NAME.TAG[.opt-N].pyc`.
fn source_of(pyc: &Path) -> Option<(PathBuf, u8)> {
    let dir = pyc.parent()?;
    if dir.file_name()? != "__pycache__" {
        return None;
    }
    let name = pyc.file_name()?.to_str()?.strip_suffix(".pyc")?;
    let (name, optimize) = match name.rsplit_once(".opt-") {
        Some((rest, n)) => (rest, n.parse::<u8>().ok().filter(|n| *n <= 2)?),
        None => (name, 0),
    };
    let (stem, _tag) = name.rsplit_once('.')?;
    Some((dir.parent()?.join(format!("{stem}.py")), optimize))
}

fn read_source(path: &Path) -> Option<Vec<u8>> {
    let file = crate::link::open_no_follow(path).ok()?;
    let meta = file.metadata().ok()?;
    if !meta.is_file() || meta.len() > 64 << 20 {
        return None;
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    file.take(64 << 20).read_to_end(&mut bytes).ok()?;
    Some(bytes)
}

/// The source-hash variant of each magic number the store has probed.
fn variants(index: &crate::index::Index) -> Result<HashMap<[u8; 4], HashVariant>> {
    let mut out = HashMap::new();
    for (_, value) in index.scan(Family::Interpreters, b"")? {
        let Ok(json) = serde_json::from_slice::<serde_json::Value>(&value) else {
            continue;
        };
        let interpreter = &json["interpreter"];
        let magic = interpreter["magic"].as_str().and_then(|h| {
            let bytes: Vec<u8> = (0..h.len())
                .step_by(2)
                .filter_map(|i| u8::from_str_radix(h.get(i..i + 2)?, 16).ok())
                .collect();
            <[u8; 4]>::try_from(bytes).ok()
        });
        let variant = serde_json::from_value::<HashVariant>(interpreter["hash_variant"].clone());
        if let (Some(magic), Ok(variant)) = (magic, variant) {
            out.insert(magic, variant);
        }
    }
    Ok(out)
}

/// Uploads the pycs recorded under `prefixes` (all when empty) that the
/// remotes lack.
pub fn push(store: &Store, remotes: &Remotes, prefixes: &[PathBuf]) -> Result<PushReport> {
    let mut report = PushReport::default();
    let index = store.index_reader()?;
    let (records, variants) = {
        // Each record with the place of its prefix among `prefixes`.
        let mut records = Vec::new();
        if prefixes.is_empty() {
            records.extend(index.scan(Family::Links, b"")?.into_iter().map(|r| (0, r)));
        } else {
            for (i, prefix) in prefixes.iter().enumerate() {
                let abs = std::path::absolute(prefix).unwrap_or_else(|_| prefix.clone());
                let mut key = crate::index::path_key(&abs);
                if !key.ends_with(b"/") {
                    key.push(b'/');
                }
                records.extend(index.scan(Family::Links, &key)?.into_iter().map(|r| (i, r)));
            }
        }
        (records, variants(&index)?)
    };
    let mut wanted: HashMap<CompileKey, Arc<Pushed>> = HashMap::new();
    // Each source directory's pycs, for the bundles, in the order a link
    // of the prefixes walks them: prefix after prefix, as given.
    let mut dirs: BTreeMap<(usize, PathBuf), DirKeys> = BTreeMap::new();
    for (prefix, (path, value)) in records {
        report.pycs += 1;
        let pyc_path = PathBuf::from(String::from_utf8_lossy(&path).into_owned());
        let found = (|| {
            // Only records of interpreters whose keys are the common ones.
            if value.len() < 34 || value[33] != 1 {
                return None;
            }
            let object = crate::objects::ObjectId(value[..32].try_into().ok()?);
            let (source_path, optimize) = source_of(&pyc_path)?;
            let bytes = store.objects.read(&object).ok()?;
            if bytes.len() < HEADER_LEN || crate::objects::ObjectId::of(&bytes) != object {
                return None;
            }
            let magic: [u8; 4] = bytes[..4].try_into().ok()?;
            if !super::eligible(None, magic) {
                return None;
            }
            let variant = *variants.get(&magic)?;
            let source = read_source(&source_path)?;
            let flags = u32::from_le_bytes(bytes[4..8].try_into().ok()?);
            let matches = if flags & 1 == 1 {
                bytes[8..16] == pyc::source_hash(variant, magic, &source)
            } else {
                let meta = std::fs::metadata(&source_path).ok()?;
                use std::os::unix::fs::MetadataExt;
                let header = pyc::header(
                    magic,
                    pyc::Flavor::Timestamp,
                    pyc::HeaderInput::Stat {
                        mtime: meta.mtime(),
                        size: meta.size(),
                    },
                );
                bytes[8..16] == header[8..16]
            };
            if !matches {
                return None;
            }
            if crate::marshal::check_pyc(&bytes).is_err_and(|e| e.is_damage()) {
                return None;
            }
            let key = CompileKey::new(
                &SourceDigest::of(&source),
                magic,
                optimize,
                COMPILE_FLAGS_DEFAULT,
            );
            // The store made this body from this very source: its entry
            // for the key has the same body. A timestamp header names the
            // source's mtime and size only, which the owner of the tree
            // can give another source since the link.
            let made = index.entry(&key, EntrySlot::Body).ok()??;
            if made.object != object
                && store.objects.read(&made.object).ok()?.get(HEADER_LEN..)
                    != bytes.get(HEADER_LEN..)
            {
                return None;
            }
            let dir = source_path.parent()?.to_path_buf();
            let name = source_path.file_name()?.to_os_string();
            Some((
                (dir, name, (magic, optimize)),
                prepare(&key, magic, variant, &source, &bytes[HEADER_LEN..]),
            ))
        })();
        match found {
            Some(((dir, name, kind), (entry, pyc))) => {
                let keys = dirs.entry((prefix, dir)).or_default();
                keys.keys.push(entry.key);
                keys.kinds.insert(kind);
                keys.have.insert((name, kind));
                wanted.entry(entry.key).or_insert_with(|| {
                    Arc::new(Pushed {
                        entry,
                        pyc,
                        encoded: OnceLock::new(),
                    })
                });
            }
            None => report.skipped += 1,
        }
    }
    drop(index);
    report.keys = wanted.len() as u64;
    // The bundles a link of these directories asks for: only groups of
    // more than one pyc are asked for as a bundle.
    let root = rustix::fs::open(
        "/",
        rustix::fs::OFlags::PATH | rustix::fs::OFlags::DIRECTORY | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )
    .map_err(std::io::Error::from)?;
    let mut bundler = Bundler::default();
    let mut groups = Vec::new();
    for ((_, dir), mut keys) in dirs {
        keys.add_unrecorded(root.as_fd(), &dir);
        groups.extend(bundler.add(keys.keys.clone(), keys.keys));
    }
    groups.extend(bundler.finish());
    let bundles: Vec<([u8; 32], Vec<Arc<Pushed>>)> = groups
        .into_iter()
        .filter_map(|group| {
            let id = group.bundle.filter(|_| group.misses.len() > 1)?;
            let mut keys = group.misses;
            keys.sort_unstable_by_key(|k| k.0);
            keys.dedup();
            Some((
                id,
                keys.iter().filter_map(|k| wanted.get(k).cloned()).collect(),
            ))
        })
        .collect();
    let shared = Arc::clone(&remotes.shared);
    let semaphore = Arc::clone(&remotes.semaphore);
    let (present, uploaded, bundled) = remotes.runtime.block_on(async move {
        // The entries (and objects) first: a bundle names objects stored
        // apart, which must be there when it is read.
        let mut tasks = Vec::new();
        for pushed in wanted.into_values() {
            let shared = Arc::clone(&shared);
            let permit = Arc::clone(&semaphore).acquire_owned().await;
            tasks.push(tokio::spawn(async move {
                let _permit = permit;
                shared.push_one(&pushed).await
            }));
        }
        let (mut present, mut uploaded) = (0, 0);
        for task in tasks {
            match task.await {
                Ok(true) => uploaded += 1,
                Ok(false) => present += 1,
                Err(_) => {}
            }
        }
        let mut tasks = Vec::new();
        for (id, items) in bundles {
            let shared = Arc::clone(&shared);
            let permit = Arc::clone(&semaphore).acquire_owned().await;
            tasks.push(tokio::spawn(async move {
                let _permit = permit;
                shared.push_bundle(&id, &items).await
            }));
        }
        let mut bundled = 0;
        for task in tasks {
            if let Ok(true) = task.await {
                bundled += 1;
            }
        }
        (present, uploaded, bundled)
    });
    report.present = present;
    report.uploaded = uploaded;
    report.bundles = bundled;
    Ok(report)
}

/// The compile keys of a source directory's pycs, as `link` names its
/// bundle after them: every pyc of every source it finds there, not only
/// those that were placed.
#[derive(Default)]
struct DirKeys {
    keys: Vec<CompileKey>,
    /// The interpreters (by magic number) and optimize levels of the
    /// pushed pycs.
    kinds: BTreeSet<([u8; 4], u8)>,
    /// The sources with a pushed pyc, and of which kind.
    have: HashSet<(OsString, ([u8; 4], u8))>,
}

impl DirKeys {
    /// Adds the keys of the sources in `dir` that have no pushed pyc of
    /// one of the directory's kinds (a source that does not compile, or
    /// whose recorded pyc was left out): `link` names the bundle after
    /// their keys too, and would otherwise ask for one nobody wrote. A
    /// source that cannot be read is left out, as `link` leaves it. The
    /// directory is opened from `root` (`/`) following no symlink, and its
    /// sources are read through it ([`crate::tree::read_at`]: regular
    /// files only, no symlink, no FIFO blocking): a directory of the tree
    /// swapped for a symlink since the link is not read.
    fn add_unrecorded(&mut self, root: BorrowedFd<'_>, dir: &Path) {
        let Some(fd) = dir
            .strip_prefix("/")
            .ok()
            .and_then(|relative| crate::tree::open_listable_beneath(root, relative).ok())
        else {
            return;
        };
        let Ok(mut entries) = rustix::fs::Dir::read_from(&fd) else {
            return;
        };
        while let Some(Ok(entry)) = entries.next() {
            let name = OsStr::from_bytes(entry.file_name().to_bytes());
            let unrecorded = |k: &([u8; 4], u8)| !self.have.contains(&(name.to_os_string(), *k));
            if !name.as_bytes().ends_with(b".py") || !self.kinds.iter().any(unrecorded) {
                continue;
            }
            // Its bytes' blake3, which is what a source digest is.
            let Some((_, hash)) = crate::tree::read_at(&fd, name) else {
                continue;
            };
            let digest = SourceDigest(hash.0);
            let missing: Vec<_> = self
                .kinds
                .iter()
                .copied()
                .filter(|k| unrecorded(k))
                .collect();
            for (magic, optimize) in missing {
                self.keys.push(CompileKey::new(
                    &digest,
                    magic,
                    optimize,
                    COMPILE_FLAGS_DEFAULT,
                ));
            }
        }
    }
}

/// A pyc to push: its entry, the pyc, and both as stored on a remote
/// (made once, when a remote lacks either).
struct Pushed {
    entry: format::RemoteEntry,
    pyc: Vec<u8>,
    /// The object stored apart (when too large to go inline) and the
    /// entry's record.
    encoded: OnceLock<(Option<Vec<u8>>, Vec<u8>)>,
}

impl super::Shared {
    /// Uploads one pyc to every remote that does not hold a valid entry for
    /// it; whether any upload was made.
    async fn push_one(&self, pushed: &Pushed) -> bool {
        let entry = &pushed.entry;
        let ns = &self.settings.namespace;
        let mut uploaded = false;
        for i in 0..self.remotes.len() {
            if self.remotes[i]
                .off
                .load(std::sync::atomic::Ordering::Relaxed)
            {
                continue;
            }
            match self
                .get(i, &format::entry_path(ns, &entry.key), Record::Entry)
                .await
            {
                Got::Found(bytes) if self.holds(&bytes, entry) => continue,
                Got::Failed(e) => {
                    self.failed(i, "reading an entry", e);
                    continue;
                }
                // Missing, too large or not valid: replaced.
                _ => {}
            }
            let (object, record) = self.encoded(pushed);
            self.put_to(i, entry, object.as_deref(), record.clone())
                .await;
            uploaded = true;
        }
        uploaded
    }

    /// Writes the bundle `id` of `items` to every remote that does not
    /// hold it whole (each of the items' entries in it, valid as
    /// [`Self::holds`] says); whether any write was made.
    async fn push_bundle(&self, id: &[u8; 32], items: &[Arc<Pushed>]) -> bool {
        if items.is_empty() {
            return false;
        }
        let path = format::bundle_path(&self.settings.namespace, id);
        let mut written = false;
        for i in 0..self.remotes.len() {
            if self.remotes[i]
                .off
                .load(std::sync::atomic::Ordering::Relaxed)
            {
                continue;
            }
            match self.get(i, &path, Record::Bundle).await {
                Got::Found(bytes)
                    if format::decode_bundle(&bytes).is_ok_and(|entries| {
                        // A bundle at its size limit holds what fitted
                        // (`format::encode_bundle`); the rest is asked
                        // for by name.
                        let full = bytes.len() + 4 + format::ENTRY_MAX > format::BUNDLE_MAX;
                        items.iter().all(|item| match entries.get(&item.entry.key) {
                            Some(bytes) => self.holds(bytes, &item.entry),
                            None => full,
                        })
                    }) =>
                {
                    continue
                }
                Got::Failed(e) => {
                    self.failed(i, "reading a bundle", e);
                    continue;
                }
                // Missing, partial, too large or not valid: replaced.
                _ => {}
            }
            let records: Vec<&[u8]> = items
                .iter()
                .map(|item| self.encoded(item).1.as_slice())
                .collect();
            match self.write(i, &path, format::encode_bundle(&records)).await {
                Ok(()) => written = true,
                Err(e) => self.failed(i, "writing a bundle", e),
            }
        }
        written
    }

    /// Whether the entry record `bytes` (from a remote) is as good as
    /// `entry`'s: valid for the readers' trusted keys, naming the same
    /// object and size, carrying it whole when it carries it (what readers check:
    /// a damaged one is written again, not left for every reader to
    /// reject), and signed with this writer's key when it has one.
    fn holds(&self, bytes: &[u8], entry: &format::RemoteEntry) -> bool {
        let ns = &self.settings.namespace;
        format::decode_entry(bytes, &entry.key, ns, &self.settings.trusted).is_ok_and(
            |(e, inline)| {
                // The same object has the same size: checked first, so a
                // forged size cannot make the check below decompress more
                // than this pyc.
                e.object == entry.object
                    && e.size == entry.size
                    && inline.is_none_or(|object| format::decode_object(object, &e).is_ok())
            },
        ) && (self.settings.signing_key.is_none()
            || format::decode_entry(bytes, &entry.key, ns, &self.own_key()).is_ok())
    }

    /// `pushed` as stored on a remote, made on first use.
    fn encoded<'a>(&self, pushed: &'a Pushed) -> &'a (Option<Vec<u8>>, Vec<u8>) {
        pushed
            .encoded
            .get_or_init(|| self.encode(&pushed.entry, &pushed.pyc))
    }

    /// The signing key's public half, as trusted keys.
    fn own_key(&self) -> super::keys::TrustedKeys {
        let mut keys = super::keys::TrustedKeys::default();
        if let Some((name, key)) = &self.settings.signing_key {
            keys.insert(name.clone(), key.verifying_key());
        }
        keys
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pyc_paths_name_their_source() {
        assert_eq!(
            source_of(Path::new("/v/lib/a/__pycache__/m.cpython-311.opt-2.pyc")),
            Some((PathBuf::from("/v/lib/a/m.py"), 2))
        );
        assert_eq!(
            source_of(Path::new("/v/__pycache__/x.y.pypy39.pyc")),
            Some((PathBuf::from("/v/x.y.py"), 0))
        );
        assert_eq!(source_of(Path::new("/v/m.cpython-311.pyc")), None);
    }
}
