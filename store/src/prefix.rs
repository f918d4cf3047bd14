//! What pycstore knows and does about a prefix after `link`: `status`
//! (which sources have a pyc from the store, a foreign valid pyc, a stale
//! pyc, or none) and `unlink` (remove exactly the pycs pycstore placed).

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsStr;
use std::io::Read;
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use serde::Serialize;

use crate::index::{EntrySlot, LinkRecord, Writes};
use crate::link::open_no_follow;
use crate::objects::ObjectId;
use crate::pyc::{self, Flavor, HeaderVerdict, HEADER_LEN};
use crate::source::{check_prefix, Hashed, Plan, Source};
use crate::tree::{remove_empty_dir, remove_placed_if, Expect, Placed};
use crate::util::now_ns;
use crate::walk::Excludes;
use crate::{Result, Store};

/// What `status` should look at.
#[derive(Clone, Debug)]
pub struct StatusOptions {
    /// Interpreters; empty: each prefix's own.
    pub python: Vec<PathBuf>,
    /// Optimize levels.
    pub optimize: Vec<u8>,
    /// The flavor pycs from the store are expected in.
    pub flavor: Flavor,
    /// Exclude patterns, as for `link`.
    pub excludes: Vec<String>,
    /// Remotes to ask which pycs the store lacks they would give.
    pub remotes: Option<std::sync::Arc<crate::remote::Remotes>>,
}

/// The state of the pycs of one interpreter across the prefixes.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct PycCounts {
    /// pycs wanted: sources × optimize levels.
    pub pycs: u64,
    /// Placed by `link` and still what it placed (the object's inode or
    /// bytes, as `unlink` checks before removing it), valid for the source
    /// in the requested invalidation mode.
    pub from_store: u64,
    /// Valid for the source (import would use it), but not placed by
    /// pycstore or changed since (Python or an installer wrote it).
    pub foreign: u64,
    /// Present but not valid: import would recompile.
    pub stale: u64,
    /// No pyc at all.
    pub missing: u64,
    /// Of the missing, sources the store knows do not compile.
    pub does_not_compile: u64,
    /// Of the stale and missing, pycs the store lacks that a remote would
    /// give `link` instead of a compile (see
    /// [`crate::remote::Remotes::available`]); 0 without remotes.
    pub from_remote: u64,
}

/// The report of `status`.
#[derive(Clone, Debug, Serialize)]
pub struct StatusReport {
    /// Sources found.
    pub sources: u64,
    /// Per interpreter (by cache tag and executable).
    pub interpreters: BTreeMap<String, PycCounts>,
    /// Sources that could not be read.
    pub unreadable: Vec<PathBuf>,
    /// What each remote did (asked only with remotes).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub remotes: Vec<crate::remote::RemoteReport>,
}

/// Reports on the pycs of the prefixes; writes nothing.
pub fn status(
    store: &Store,
    prefixes: &[PathBuf],
    options: &StatusOptions,
) -> Result<StatusReport> {
    let excludes = Excludes::new(&options.excludes)?;
    let index = store.index_reader()?;
    let mut probes = Writes::default();
    let (plan, (found, errors)) = Plan::resolve_and_walk(
        prefixes,
        &options.python,
        &excludes,
        &index,
        &mut probes,
        None,
    )?;
    let mut recorded: HashMap<PathBuf, LinkRecord> = HashMap::new();
    for (prefix, _) in &plan.prefixes {
        for (pyc, record) in index.links(Some(prefix))? {
            if let Some(record) = record {
                recorded.insert(pyc, record);
            }
        }
    }
    let recorded = &recorded;
    let now = now_ns();
    let index = &index;
    // Per source: each pyc's state, and the misses to ask the remotes about.
    type Judged = (Vec<(usize, State)>, Vec<(usize, crate::remote::Wanted)>);
    let per_source: Vec<std::result::Result<Judged, PathBuf>> = found
        .par_iter()
        .map(|(found, chosen)| {
            let source = match Source::hash(found, index, now, None, crate::source::MAX_SOURCE_SIZE)
            {
                Hashed::Source(source) => source,
                Hashed::Skipped => return Ok((Vec::new(), Vec::new())),
                Hashed::Failed(_) => return Err(found.path.clone()),
            };
            let mut states = Vec::new();
            let mut asked = Vec::new();
            for &i in chosen {
                let interpreter = &plan.interpreters[i];
                let travels = options.remotes.is_some()
                    && crate::remote::eligible(interpreter.key_domain.as_ref(), interpreter.magic);
                for &optimize in &options.optimize {
                    let key = interpreter.compile_key(&source.digest, optimize);
                    let slot = match options.flavor {
                        Flavor::Timestamp => crate::resolve::slot(
                            Flavor::Timestamp,
                            source.meta.mtime(),
                            source.meta.size(),
                        ),
                        flavor => EntrySlot::Hashed(flavor),
                    };
                    let entry = index.entry(&key, slot).ok().flatten();
                    let Some(pyc) = source.pyc_path(interpreter, optimize) else {
                        continue;
                    };
                    // The object an earlier link hardlinked there, still
                    // the entry's: known from one stat of the pyc.
                    let still_linked = || {
                        let record = recorded.get(&pyc)?;
                        let entry = entry.as_ref().filter(|e| e.object == record.object)?;
                        crate::resolve::still_linked(
                            &source.dir,
                            pyc.file_name()?,
                            record,
                            entry.size,
                        )
                    };
                    let head = if still_linked().is_some() {
                        Head::Linked
                    } else if !source.dir.listed_pycache {
                        Head::Missing
                    } else {
                        match read_head(&pyc) {
                            Some((header, len)) => Head::Read(header, len),
                            None => Head::Missing,
                        }
                    };
                    let state = match head {
                        Head::Linked => State::FromStore,
                        Head::Missing => {
                            if index.failure(&key).ok().flatten().is_some() {
                                State::DoesNotCompile
                            } else {
                                State::Missing
                            }
                        }
                        Head::Read(header, len) => {
                            let valid = entry.is_some_and(|e| e.header == header && e.size == len)
                                || (len > HEADER_LEN as u64
                                    && matches!(
                                        pyc::judge_header(
                                            &header,
                                            interpreter.magic,
                                            interpreter.hash_variant,
                                            source.meta.mtime(),
                                            source.meta.size(),
                                            || source.bytes().ok().map(|b| b.to_vec()),
                                        ),
                                        HeaderVerdict::Valid
                                    ));
                            let flags =
                                u32::from_le_bytes(header[4..8].try_into().expect("4 bytes"));
                            // What `unlink` would remove as pycstore's own.
                            let placed_here = || {
                                recorded.get(&pyc).is_some_and(|record| {
                                    matches!(
                                        remove_placed_if(&pyc, &placed(store, record.object), true),
                                        Ok(Placed::Removed(_))
                                    )
                                })
                            };
                            if !valid {
                                State::Stale
                            } else if flags == options.flavor.flags() && placed_here() {
                                State::FromStore
                            } else {
                                State::Foreign
                            }
                        }
                    };
                    // What the store lacks, and a remote might give.
                    let ask = travels
                        && matches!(state, State::Stale | State::Missing)
                        && index.entry(&key, EntrySlot::Body).ok().flatten().is_none();
                    if ask {
                        if let Ok(bytes) = source.bytes() {
                            let source_hash = pyc::source_hash(
                                interpreter.hash_variant,
                                interpreter.magic,
                                &bytes,
                            );
                            asked.push((
                                i,
                                crate::remote::Wanted {
                                    key,
                                    magic: interpreter.magic,
                                    source_hash,
                                },
                            ));
                        }
                    }
                    states.push((i, state));
                }
            }
            Ok((states, asked))
        })
        .collect();
    let mut report = StatusReport {
        sources: found.len() as u64,
        interpreters: BTreeMap::new(),
        unreadable: errors.into_iter().map(|e| e.path).collect(),
        remotes: Vec::new(),
    };
    let labels: Vec<String> = plan
        .interpreters
        .iter()
        .map(|i| format!("{} ({})", i.cache_tag, i.executable.display()))
        .collect();
    for label in &labels {
        report
            .interpreters
            .insert(label.clone(), PycCounts::default());
    }
    let mut asked: Vec<(usize, crate::remote::Wanted)> = Vec::new();
    for states in per_source {
        match states {
            Err(path) => report.unreadable.push(path),
            Ok((states, wanted)) => {
                asked.extend(wanted);
                for (i, state) in states {
                    let c = report
                        .interpreters
                        .get_mut(&labels[i])
                        .expect("every label inserted");
                    c.pycs += 1;
                    match state {
                        State::FromStore => c.from_store += 1,
                        State::Foreign => c.foreign += 1,
                        State::Stale => c.stale += 1,
                        State::Missing => c.missing += 1,
                        State::DoesNotCompile => {
                            c.missing += 1;
                            c.does_not_compile += 1;
                        }
                    }
                }
            }
        }
    }
    if let Some(remotes) = &options.remotes {
        // One request per distinct key, many in flight at once.
        let mut distinct: Vec<crate::remote::Wanted> = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for (_, w) in &asked {
            if seen.insert(w.key) {
                distinct.push(*w);
            }
        }
        let available: std::collections::HashSet<_> = distinct
            .iter()
            .zip(remotes.available(&distinct))
            .filter(|(_, yes)| *yes)
            .map(|(w, _)| w.key)
            .collect();
        for (i, w) in &asked {
            if available.contains(&w.key) {
                report
                    .interpreters
                    .get_mut(&labels[*i])
                    .expect("every label inserted")
                    .from_remote += 1;
            }
        }
        report.remotes = remotes.report();
    }
    report.unreadable.sort();
    Ok(report)
}

/// What is at a pyc's name, for `status`.
enum Head {
    /// The object `link` hardlinked there (see `still_linked`).
    Linked,
    /// Something else: its first bytes and its size.
    Read([u8; HEADER_LEN], u64),
    /// Nothing.
    Missing,
}

enum State {
    FromStore,
    Foreign,
    Stale,
    Missing,
    DoesNotCompile,
}

/// The first 16 bytes and the size of a pyc, if there is a regular file.
fn read_head(pyc: &Path) -> Option<([u8; HEADER_LEN], u64)> {
    let mut file = open_no_follow(pyc).ok()?;
    let len = file.metadata().ok()?.len();
    let mut header = [0u8; HEADER_LEN];
    if len < HEADER_LEN as u64 || file.read_exact(&mut header).is_err() {
        return Some(([0; HEADER_LEN], len));
    }
    Some((header, len))
}

/// What a pyc pycstore placed from `id` must still be to count as placed:
/// the object's inode (a hard link), or its bytes (a reflink or a copy; the
/// object's name is the blake3 of its bytes, so this holds after `gc`
/// evicted the object too).
fn placed(store: &Store, id: ObjectId) -> Expect {
    let object = rustix::fs::stat(store.objects.path(&id)).ok();
    Expect {
        inode: object.as_ref().map(|st| (st.st_dev, st.st_ino)),
        bytes: Some((object.map(|st| st.st_size as u64), id)),
    }
}

/// The report of `unlink`.
#[derive(Clone, Debug, Default, Serialize)]
pub struct UnlinkReport {
    /// pycs removed.
    pub removed: u64,
    /// Bytes of the pycs removed.
    pub bytes: u64,
    /// pycs pycstore placed that were replaced since (by Python recompiling
    /// an edited source, or by hand): left alone.
    pub changed: u64,
    /// pycs pycstore placed that are gone already.
    pub gone: u64,
    /// `__pycache__` directories pycstore created, removed because empty.
    pub dirs_removed: u64,
    /// What could not be removed, and why.
    pub failures: Vec<(PathBuf, String)>,
}

/// Removes the pycs pycstore placed under the prefixes, and the
/// `__pycache__` directories it created once they are empty.
pub fn unlink(store: &Store, prefixes: &[PathBuf], dry_run: bool) -> Result<UnlinkReport> {
    let mut decoded = Vec::new();
    let mut dirs = Vec::new();
    {
        let index = store.index_reader()?;
        for given in prefixes {
            let prefix = std::path::absolute(given)?;
            let links = index.links(Some(&prefix))?;
            let created = index.created_dirs(Some(&prefix))?;
            // A prefix removed since it was linked still has records to
            // forget; anything else that is not a directory is a mistake.
            if links.is_empty() && created.is_empty() {
                check_prefix(given)?;
            }
            decoded.extend(
                links
                    .into_iter()
                    .map(|(pyc, record)| (pyc, record.map(|r| r.object))),
            );
            dirs.extend(created);
        }
    }
    let outcomes: Vec<(PathBuf, std::io::Result<Placed>)> = decoded
        .into_par_iter()
        .map(|(pyc, id)| {
            let outcome = match id {
                Some(id) => remove_placed_if(&pyc, &placed(store, id), dry_run),
                None => Ok(Placed::Changed),
            };
            (pyc, outcome)
        })
        .collect();
    let mut report = UnlinkReport::default();
    let mut writes = Writes::default();
    let mut removed = std::collections::HashSet::new();
    for (pyc, done) in outcomes {
        match done {
            Ok(Placed::Removed(bytes)) => {
                report.removed += 1;
                report.bytes += bytes;
                writes.forget_link(&pyc);
                removed.insert(pyc);
            }
            Ok(Placed::Changed) => {
                report.changed += 1;
                writes.forget_link(&pyc);
            }
            Ok(Placed::Gone) => {
                report.gone += 1;
                writes.forget_link(&pyc);
            }
            Err(e) => report.failures.push((pyc, e.to_string())),
        }
    }
    for dir in dirs {
        // A dry run removes nothing: a directory whose every entry is a pyc
        // it would remove counts as the empty directory it would be.
        let would_go = |name: &OsStr| dry_run && removed.contains(&dir.join(name));
        match remove_empty_dir(&dir, dry_run, &would_go) {
            Ok(true) => {
                report.dirs_removed += 1;
                writes.forget_dir(&dir);
            }
            Ok(false) => {
                if std::fs::symlink_metadata(&dir).is_err() {
                    writes.forget_dir(&dir);
                }
            }
            Err(e) => report.failures.push((dir, e.to_string())),
        }
    }
    if !dry_run {
        store.record(writes)?;
    }
    Ok(report)
}
