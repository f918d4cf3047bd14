//! Putting an object into a prefix: reflink, hardlink or copy, always through
//! a temp name in the destination directory and a rename over the target, so
//! Python sees the old pyc or the whole new one, never a partial file.
//!
//! `auto` decides per destination filesystem with the first file as the
//! probe: reflink, else hardlink, else copy. After the probe succeeded, a
//! failure is a real error. A hardlink that hits the link-count limit
//! (EMLINK, 65,000 on ext4) gives the object a fresh inode and retries, and
//! one that finds the object's inode replaced by another process meanwhile
//! (ENOENT while the name exists) retries too.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::objects::{with_path, ObjectId, Objects};

/// How objects are put into prefixes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LinkMode {
    /// Reflink where the filesystem can, else hardlink, else copy.
    Auto,
    /// Copy-on-write clone (XFS, btrfs): shares blocks, independent inode.
    Reflink,
    /// Hard link: shares the inode.
    Hardlink,
    /// Plain copy (shares extents where the kernel's copy_file_range does).
    Copy,
}

impl LinkMode {
    /// The name used on the command line and in JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            LinkMode::Auto => "auto",
            LinkMode::Reflink => "reflink",
            LinkMode::Hardlink => "hardlink",
            LinkMode::Copy => "copy",
        }
    }

    /// Whether the placed file shares the store's disk blocks.
    pub fn shares_blocks(self) -> bool {
        matches!(self, LinkMode::Reflink | LinkMode::Hardlink)
    }
}

/// Places objects into prefixes with one link mode, probing per device.
pub struct Materializer<'a> {
    objects: &'a Objects,
    requested: LinkMode,
    decided: Mutex<HashMap<u64, LinkMode>>,
    warn: &'a (dyn Fn(String) + Sync),
}

static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

impl<'a> Materializer<'a> {
    /// `warn` receives the one warning said when `auto` falls back to copying.
    pub fn new(
        objects: &'a Objects,
        requested: LinkMode,
        warn: &'a (dyn Fn(String) + Sync),
    ) -> Self {
        Materializer {
            objects,
            requested,
            decided: Mutex::new(HashMap::new()),
            warn,
        }
    }

    /// The modes used so far (one per destination filesystem under `auto`).
    pub fn modes_used(&self) -> Vec<LinkMode> {
        let mut modes: Vec<LinkMode> = self.decided.lock().unwrap().values().copied().collect();
        modes.sort_by_key(|m| m.as_str());
        modes.dedup();
        modes
    }

    /// Puts object `id` at `dest`, whose directory lies on device `dev`,
    /// replacing whatever is there. Returns the mode used.
    pub fn place(&self, id: &ObjectId, dest: &Path, dev: u64) -> io::Result<LinkMode> {
        let source = self.objects.path(id);
        if self.requested != LinkMode::Auto {
            self.place_with(self.requested, id, &source, dest)?;
            self.decided
                .lock()
                .unwrap()
                .entry(dev)
                .or_insert(self.requested);
            return Ok(self.requested);
        }
        let known = self.decided.lock().unwrap().get(&dev).copied();
        if let Some(mode) = known {
            self.place_with(mode, id, &source, dest)?;
            return Ok(mode);
        }
        // Probe with this file, holding the lock so one thread decides.
        let mut decided = self.decided.lock().unwrap();
        if let Some(mode) = decided.get(&dev).copied() {
            drop(decided);
            self.place_with(mode, id, &source, dest)?;
            return Ok(mode);
        }
        let mut last_err = None;
        for mode in [LinkMode::Reflink, LinkMode::Hardlink, LinkMode::Copy] {
            match self.place_with(mode, id, &source, dest) {
                Ok(()) => {
                    if mode == LinkMode::Copy {
                        (self.warn)(format!(
                            "cannot reflink or hardlink from the store into the filesystem of `{}` ({}); \
                             copying pycs instead, which costs disk space. Put the store on the same \
                             filesystem, or pass `--link-mode copy` to choose this explicitly",
                            dest.parent().unwrap_or(dest).display(),
                            last_err.as_ref().map(|e: &io::Error| e.to_string()).unwrap_or_default()
                        ));
                    } else if mode == LinkMode::Hardlink {
                        tracing::debug!(
                            "reflink not available for `{}`: {:?}; using hardlinks",
                            dest.display(),
                            last_err
                        );
                    }
                    decided.insert(dev, mode);
                    return Ok(mode);
                }
                Err(e) if is_destination_problem(&e) => return Err(e),
                Err(e) => last_err = Some(e),
            }
        }
        Err(last_err.expect("three modes were tried"))
    }

    fn place_with(
        &self,
        mode: LinkMode,
        id: &ObjectId,
        source: &Path,
        dest: &Path,
    ) -> io::Result<()> {
        let dir = dest.parent().expect("a pyc path has a parent");
        let tmp = temp_name(dir, dest);
        let made = match mode {
            LinkMode::Reflink => reflink_copy::reflink(source, &tmp),
            LinkMode::Hardlink => self.hard_link(id, source, &tmp),
            LinkMode::Copy | LinkMode::Auto => std::fs::copy(source, &tmp).map(drop),
        };
        if let Err(e) = made {
            let _ = std::fs::remove_file(&tmp);
            return Err(with_path(
                e,
                &format!("{} `{}` to", mode.as_str(), source.display()),
                dest,
            ));
        }
        if let Err(e) = std::fs::rename(&tmp, dest) {
            let _ = std::fs::remove_file(&tmp);
            return Err(with_path(e, "rename a temp file to", dest));
        }
        // rename() between two links of one inode does nothing; drop the temp.
        if std::fs::symlink_metadata(&tmp).is_ok() {
            let _ = std::fs::remove_file(&tmp);
        }
        Ok(())
    }

    fn hard_link(&self, id: &ObjectId, source: &Path, tmp: &Path) -> io::Result<()> {
        let mut attempts = 0;
        loop {
            let err = match std::fs::hard_link(source, tmp) {
                Ok(()) => return Ok(()),
                Err(e) => e,
            };
            attempts += 1;
            if attempts > RETRIES {
                return Err(err);
            }
            match err.raw_os_error() {
                Some(libc::EMLINK) => {
                    tracing::debug!(
                        "`{}` reached the link limit; giving it a fresh inode",
                        source.display()
                    );
                    self.objects.refresh_inode(id)?;
                }
                // link(2) refuses an inode whose last name went away after
                // it was looked up: another process gave the object a fresh
                // inode (same bytes) meanwhile. The name is there again.
                Some(libc::ENOENT) if source.exists() => {}
                _ => return Err(err),
            }
        }
    }
}

/// How often a hardlink is tried again: after giving the object a fresh
/// inode, or after another process did.
const RETRIES: u32 = 8;

fn temp_name(dir: &Path, dest: &Path) -> PathBuf {
    let n = TEMP_COUNTER.fetch_add(1, Ordering::Relaxed);
    let mut name = std::ffi::OsString::from(".pycstore-");
    name.push(dest.file_name().unwrap_or_default());
    name.push(format!(".{}.{n}.tmp", std::process::id()));
    dir.join(name)
}

/// Errors that no other link mode would avoid: the destination itself is
/// the problem.
fn is_destination_problem(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(
            libc::EACCES | libc::EROFS | libc::ENOSPC | libc::ENOENT | libc::ENOTDIR | libc::EDQUOT
        )
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;

    /// link(2) refuses an inode whose last name went away after the lookup:
    /// another process putting the same object again, or giving it a fresh
    /// inode, must not make a hardlink fail.
    #[test]
    fn hardlinks_survive_the_object_being_replaced_meanwhile() {
        let dir = tempfile::tempdir().unwrap();
        let tmp = dir.path().join("tmp");
        std::fs::create_dir(&tmp).unwrap();
        let objects = Objects::new(dir.path().join("objects"), tmp);
        let id = objects.put(b"an object many processes want").unwrap();
        let prefix = dir.path().join("prefix");
        std::fs::create_dir(&prefix).unwrap();
        let warn = |_: String| {};
        let materializer = Materializer::new(&objects, LinkMode::Hardlink, &warn);
        let done = AtomicBool::new(false);
        std::thread::scope(|scope| {
            scope.spawn(|| {
                while !done.load(Ordering::Relaxed) {
                    objects.refresh_inode(&id).unwrap();
                    std::thread::sleep(std::time::Duration::from_micros(20));
                }
            });
            let placed = (0..20000).try_for_each(|i| {
                let dest = prefix.join(format!("m{}.pyc", i % 10));
                materializer.place(&id, &dest, 0).map(drop)
            });
            done.store(true, Ordering::Relaxed);
            placed.unwrap();
        });
    }
}
