//! `stats`: what the store holds and how it has been used, like `ccache -s`.

use std::collections::{BTreeMap, HashMap};
use std::os::unix::fs::MetadataExt;

use rayon::prelude::*;
use serde::Serialize;

use crate::index::{Counters, EntrySlot, Family, Writes};
use crate::layout::OBJECTS_DIR;
use crate::{Result, Store};

/// The key of the counters family holding the time of the last reset.
const RESET_KEY: &str = "";

/// The store's contents and usage.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Stats {
    /// The store directory.
    pub store: std::path::PathBuf,
    /// Object files.
    pub objects: u64,
    /// Their total size.
    pub object_bytes: u64,
    /// The disk blocks they take.
    pub disk_bytes: u64,
    /// Index entries (compile key and flavor → object).
    pub entries: u64,
    /// pycs placed in prefixes and recorded.
    pub linked_pycs: u64,
    /// What the linked pycs would take as separate files (their sizes when
    /// placed, including those whose objects `gc` evicted since).
    pub logical_bytes: u64,
    /// Of `logical_bytes`, the pycs whose objects the store still holds.
    pub linked_stored_bytes: u64,
    /// `linked_stored_bytes / object_bytes`: how many times each stored byte
    /// is used.
    pub dedup_ratio: f64,
    /// Sources known not to compile.
    pub known_failures: u64,
    /// Usage since the last reset, per interpreter (`cache_tag magic`).
    pub usage: BTreeMap<String, Counters>,
    /// When the counters were last reset (seconds since the epoch; 0: never).
    pub since: u64,
    /// Per remote (URL without credentials), what it did since the last reset.
    pub remotes: BTreeMap<String, crate::remote::RemoteCounters>,
}

/// Gathers the statistics of the store; `zero` resets the counters after.
pub fn stats(store: &Store, zero: bool) -> Result<Stats> {
    let mut stats = Stats {
        store: store.root().to_path_buf(),
        ..Stats::default()
    };
    let shards: Vec<_> = std::fs::read_dir(store.root().join(OBJECTS_DIR))
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    let sizes: HashMap<Vec<u8>, (u64, u64)> = shards
        .par_iter()
        .flat_map_iter(|shard| {
            let prefix = shard
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            std::fs::read_dir(shard)
                .into_iter()
                .flatten()
                .flatten()
                .filter_map(move |entry| {
                    let meta = entry.metadata().ok().filter(|m| m.is_file())?;
                    let hex = format!("{prefix}{}", entry.file_name().to_string_lossy());
                    Some((unhex(&hex)?, (meta.len(), meta.blocks() * 512)))
                })
        })
        .collect();
    stats.objects = sizes.len() as u64;
    stats.object_bytes = sizes.values().map(|s| s.0).sum();
    stats.disk_bytes = sizes.values().map(|s| s.1).sum();
    {
        let index = store.index_reader()?;
        // Body records repeat an entry of some flavor (see `counts_as_entry`).
        stats.entries = index
            .entries()?
            .iter()
            .filter(|(_, slot, entry)| *slot != EntrySlot::Body && entry.is_some())
            .count() as u64;
        for (pyc, record) in index.links(None)? {
            stats.linked_pycs += 1;
            let stored = record
                .as_ref()
                .and_then(|r| sizes.get(r.object.0.as_slice()))
                .map(|s| s.0);
            // The size recorded at link time, whether or not the object is
            // still stored (gc evicts objects, not the pycs placed); a record
            // from before sizes were recorded: the object's, else the pyc's.
            let size = record.as_ref().and_then(|r| r.size).or(stored).or_else(|| {
                std::fs::symlink_metadata(&pyc)
                    .ok()
                    .filter(|m| m.is_file())
                    .map(|m| m.len())
            });
            stats.logical_bytes += size.unwrap_or(0);
            if stored.is_some() {
                stats.linked_stored_bytes += size.unwrap_or(0);
            }
        }
        stats.known_failures = index.failure_keys()?.len() as u64;
        stats.remotes = crate::remote::recorded(&index)?;
        for (key, value) in index.scan(Family::Counters, b"")? {
            let label = String::from_utf8_lossy(&key).into_owned();
            if key.starts_with(crate::remote::COUNTER_PREFIX.as_bytes())
                || *key == *crate::index::ENTRIES_EPOCH_KEY
            {
                continue;
            }
            if label == RESET_KEY {
                stats.since = value
                    .get(..8)
                    .map(|b| u64::from_le_bytes(b.try_into().unwrap()))
                    .unwrap_or(0);
            } else if let Ok(c) = serde_json::from_slice::<Counters>(&value) {
                stats.usage.insert(label, c);
            }
        }
    }
    stats.dedup_ratio = if stats.object_bytes > 0 {
        stats.linked_stored_bytes as f64 / stats.object_bytes as f64
    } else {
        0.0
    };
    if zero {
        let mut writes = Writes::default();
        let labels: Vec<String> = stats.usage.keys().cloned().collect();
        for label in labels {
            writes.delete(Family::Counters, label.as_bytes());
        }
        for label in stats.remotes.keys() {
            let key = format!("{}{label}", crate::remote::COUNTER_PREFIX);
            writes.delete(Family::Counters, key.as_bytes());
        }
        writes.put(
            Family::Counters,
            RESET_KEY.as_bytes(),
            &crate::util::now_secs().to_le_bytes(),
        );
        store.record(writes)?;
    }
    Ok(stats)
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if s.len() != 64 {
        return None;
    }
    (0..64)
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).ok())
        .collect()
}
