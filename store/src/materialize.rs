//! Putting an object into a prefix: reflink, hardlink or copy, through the
//! `__pycache__` directory's descriptor (see [`crate::tree`]), so Python sees
//! the old pyc or the whole new one, never a partial file, and nothing a
//! prefix's owner plants can redirect the write.
//!
//! Where nothing is at the pyc's name, a hardlink goes straight there
//! (`linkat` never replaces); anything else is made at a random temp name
//! created exclusively, then renamed over the pyc.
//!
//! Who may read the placed file is decided per pyc ([`Access`]): a hardlink
//! shares the object's inode, owner and mode with every tree holding it, so
//! it is used only for sources every user may read, in trees of the store
//! owner's trust domain; anything else gets its own inode (reflink or copy)
//! with the source's read bits and owner.
//!
//! `auto` decides per destination filesystem with the first file as the
//! probe: reflink, else hardlink, else copy. After the probe succeeded, a
//! failure is a real error. A hardlink that hits the link-count limit
//! (EMLINK, 65,000 on ext4) gives the object a fresh inode and retries, and
//! one that finds the object's inode replaced by another process meanwhile
//! (ENOENT while the name exists) retries too.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::path::Path;
use std::sync::Mutex;

use rustix::fs::Mode;
use serde::{Deserialize, Serialize};

use crate::objects::{ObjectId, Objects};
use crate::tree;
use crate::util::with_path;

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
    pub(crate) fn shares_blocks(self) -> bool {
        matches!(self, LinkMode::Reflink | LinkMode::Hardlink)
    }
}

/// Who may read one placed pyc, and whether it may share the object's inode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Access {
    /// Permission bits of a pyc with its own inode (copy, reflink).
    pub mode: u32,
    /// Owner and group to give it (root placing a private source's pyc).
    pub owner: Option<(u32, u32)>,
    /// Whether a hardlink to the object is allowed.
    pub hardlink: bool,
}

/// Where one pyc goes.
pub struct Destination<'a> {
    /// The `__pycache__` directory, opened without following symlinks.
    pub dir: BorrowedFd<'a>,
    /// The pyc's name in it.
    pub name: &'a OsStr,
    /// Its path, for messages.
    pub path: &'a Path,
    /// The device of the directory.
    pub dev: u64,
    /// Who may read it.
    pub access: Access,
}

/// Places objects into prefixes with one link mode, probing per device.
pub struct Materializer<'a> {
    objects: &'a Objects,
    requested: LinkMode,
    /// The mode decided per (device, whether hardlinks are allowed).
    decided: Mutex<HashMap<(u64, bool), LinkMode>>,
    warn: &'a (dyn Fn(String) + Sync),
}

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

    fn decided(&self) -> std::sync::MutexGuard<'_, HashMap<(u64, bool), LinkMode>> {
        // A panic elsewhere cannot leave the map half-updated: entries are
        // inserted whole.
        self.decided.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The modes used so far (one per destination filesystem under `auto`).
    pub(crate) fn modes_used(&self) -> Vec<LinkMode> {
        let mut modes: Vec<LinkMode> = self.decided().values().copied().collect();
        modes.sort_by_key(|m| m.as_str());
        modes.dedup();
        modes
    }

    /// The modes to try for `dest`, in order, and whether they are a
    /// fallback to be said once.
    fn candidates(&self, dest: &Destination<'_>) -> &'static [LinkMode] {
        match (self.requested, dest.access.hardlink) {
            (LinkMode::Auto, true) => &[LinkMode::Reflink, LinkMode::Hardlink, LinkMode::Copy],
            (LinkMode::Auto | LinkMode::Hardlink, false) => &[LinkMode::Reflink, LinkMode::Copy],
            (LinkMode::Hardlink, true) => &[LinkMode::Hardlink],
            (LinkMode::Reflink, _) => &[LinkMode::Reflink],
            (LinkMode::Copy, _) => &[LinkMode::Copy],
        }
    }

    /// Puts object `id` at `dest`, replacing whatever is there. Returns the
    /// mode used.
    pub fn place(&self, id: &ObjectId, dest: &Destination<'_>) -> io::Result<LinkMode> {
        let source = self.objects.path(id);
        let key = (dest.dev, dest.access.hardlink);
        let candidates = self.candidates(dest);
        if let [only] = candidates {
            self.place_with(*only, id, &source, dest)?;
            self.decided().entry(key).or_insert(*only);
            return Ok(*only);
        }
        let known = self.decided().get(&key).copied();
        if let Some(mode) = known {
            self.place_with(mode, id, &source, dest)?;
            return Ok(mode);
        }
        // Probe with this file, holding the lock so one thread decides.
        let mut decided = self.decided();
        if let Some(mode) = decided.get(&key).copied() {
            drop(decided);
            self.place_with(mode, id, &source, dest)?;
            return Ok(mode);
        }
        let mut last_err = None;
        for &mode in candidates {
            match self.place_with(mode, id, &source, dest) {
                Ok(()) => {
                    if self.requested == LinkMode::Hardlink {
                        (self.warn)(format!(
                            "not hardlinking into `{}`: hardlinks share the store's inode, \
                             owner and mode, so they go only into trees owned by the store's \
                             owner and only for sources every user may read; {} instead",
                            dest.path.parent().unwrap_or(dest.path).display(),
                            if mode == LinkMode::Copy {
                                "copying"
                            } else {
                                "reflinking"
                            },
                        ));
                    } else if let Some(why) = (mode == LinkMode::Copy)
                        .then(|| {
                            last_err
                                .as_ref()
                                .and_then(|e| self.objects.hardlink_refusal(e))
                        })
                        .flatten()
                    {
                        (self.warn)(format!(
                            "copying pycs into `{}`: {why}",
                            dest.path.parent().unwrap_or(dest.path).display(),
                        ));
                    } else if mode == LinkMode::Copy && dest.access.hardlink {
                        (self.warn)(format!(
                            "cannot reflink or hardlink from the store into the filesystem of `{}` ({}); \
                             copying pycs instead, which costs disk space. Put the store on the same \
                             filesystem, or pass `--link-mode copy` to choose this explicitly",
                            dest.path.parent().unwrap_or(dest.path).display(),
                            last_err.as_ref().map(|e: &io::Error| e.to_string()).unwrap_or_default()
                        ));
                    } else if mode != LinkMode::Reflink {
                        tracing::debug!(
                            "reflink not available for `{}`: {:?}; using {}",
                            dest.path.display(),
                            last_err,
                            mode.as_str()
                        );
                    }
                    decided.insert(key, mode);
                    return Ok(mode);
                }
                Err(e) if is_destination_problem(&e) => return Err(e),
                Err(e) => last_err = Some(e),
            }
        }
        Err(last_err.unwrap_or_else(|| io::Error::other("no link mode to try")))
    }

    fn place_with(
        &self,
        mode: LinkMode,
        id: &ObjectId,
        source: &Path,
        dest: &Destination<'_>,
    ) -> io::Result<()> {
        let placed = match mode {
            LinkMode::Hardlink => self.hard_link(id, source, dest),
            LinkMode::Reflink | LinkMode::Copy | LinkMode::Auto => {
                self.write_copy(mode, source, dest)
            }
        };
        placed.map_err(|e| {
            with_path(
                e,
                &format!("{} `{}` to", mode.as_str(), source.display()),
                dest.path,
            )
        })
    }

    /// Links the object at the pyc's name when nothing is there, else at a
    /// temp name renamed over it.
    fn hard_link(&self, id: &ObjectId, source: &Path, dest: &Destination<'_>) -> io::Result<()> {
        match self.link_retrying(id, source, dest.dir, dest.name) {
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
            done => return done,
        }
        let (tmp, ()) =
            tree::with_temp_name(|tmp| match self.link_retrying(id, source, dest.dir, tmp) {
                Ok(()) => Ok(()),
                Err(e) => {
                    Err(rustix::io::Errno::from_io_error(&e).unwrap_or(rustix::io::Errno::IO))
                }
            })?;
        let renamed = rustix::fs::renameat(dest.dir, &tmp, dest.dir, dest.name);
        // rename() between two links of one inode does nothing: drop the temp.
        let _ = tree::remove(dest.dir, &tmp);
        Ok(renamed?)
    }

    fn link_retrying(
        &self,
        id: &ObjectId,
        source: &Path,
        dir: BorrowedFd<'_>,
        name: &OsStr,
    ) -> io::Result<()> {
        let mut attempts = 0;
        loop {
            let err = match self.objects.link_object(id, dir, name) {
                Ok(()) => return Ok(()),
                Err(e) => io::Error::from(e),
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

    /// Reflinks or copies the object into a new temp file with the pyc's
    /// own mode and owner, then renames it over the pyc.
    fn write_copy(&self, mode: LinkMode, source: &Path, dest: &Destination<'_>) -> io::Result<()> {
        let (tmp, fd) = tree::create_temp(dest.dir, 0o600)?;
        let written = (|| -> io::Result<()> {
            let object = std::fs::File::open(source)?;
            if mode == LinkMode::Reflink {
                rustix::fs::ioctl_ficlone(&fd, &object)?;
            } else {
                let mut out = std::fs::File::from(fd.try_clone()?);
                io::copy(&mut &object, &mut out)?;
            }
            if let Some((uid, gid)) = dest.access.owner {
                rustix::fs::fchown(
                    &fd,
                    Some(rustix::fs::Uid::from_raw(uid)),
                    Some(rustix::fs::Gid::from_raw(gid)),
                )?;
            }
            rustix::fs::fchmod(&fd, Mode::from_raw_mode(dest.access.mode))?;
            drop(fd);
            rustix::fs::renameat(dest.dir, &tmp, dest.dir, dest.name)?;
            Ok(())
        })();
        if written.is_err() {
            let _ = tree::remove(dest.dir.as_fd(), &tmp);
        }
        written
    }
}

/// How often a hardlink is tried again: after giving the object a fresh
/// inode, or after another process did.
const RETRIES: u32 = 8;

/// Errors that no other link mode would avoid: the destination itself is
/// the problem.
fn is_destination_problem(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(
            libc::EACCES
                | libc::EROFS
                | libc::ENOSPC
                | libc::ENOENT
                | libc::ENOTDIR
                | libc::EDQUOT
                | libc::ENAMETOOLONG
                | libc::ELOOP
        )
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};

    /// link(2) refuses an inode whose last name went away after the lookup:
    /// another process putting the same object again, or giving it a fresh
    /// inode, must not make a hardlink fail.
    #[test]
    fn hardlinks_survive_the_object_being_replaced_meanwhile() {
        let (dir, objects) = Objects::scratch();
        let id = objects.put(b"an object many processes want").unwrap();
        let prefix = dir.path().join("prefix");
        std::fs::create_dir(&prefix).unwrap();
        let warn = |_: String| {};
        let materializer = Materializer::new(&objects, LinkMode::Hardlink, &warn);
        let dir_fd = tree::open_root(&prefix).unwrap();
        let done = AtomicBool::new(false);
        std::thread::scope(|scope| {
            scope.spawn(|| {
                while !done.load(Ordering::Relaxed) {
                    objects.refresh_inode(&id).unwrap();
                    std::thread::sleep(std::time::Duration::from_micros(20));
                }
            });
            let placed = (0..20000).try_for_each(|i| {
                let name = std::ffi::OsString::from(format!("m{}.pyc", i % 10));
                let path = prefix.join(&name);
                let dest = Destination {
                    dir: dir_fd.as_fd(),
                    name: &name,
                    path: &path,
                    dev: 0,
                    access: Access {
                        mode: 0o444,
                        owner: None,
                        hardlink: true,
                    },
                };
                materializer.place(&id, &dest).map(drop)
            });
            done.store(true, Ordering::Relaxed);
            placed.unwrap();
        });
    }
}
