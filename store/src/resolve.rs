//! From a source to its pyc: the rules every view shares, so that `link`,
//! `status` and both FUSE views decide alike and a fix reaches all of them.
//!
//! ```text
//!  source bytes ──blake3──► SourceDigest ─┐
//!  (stat cache: trusted only once settled)│
//!  interpreter (magic, key domain) ───────┼─► CompileKey ─► index entry ─┐
//!  optimize level ────────────────────────┘     [`slot`]: which flavor   │
//!                                                                         ▼
//!  object ◄── [`open_object`]: present, regular, the entry's size and header,
//!             the store's owner and an object mode (else a miss)
//!    │
//!    └─► header for the wanted flavor ([`pyc::header`]) + body ─► the pyc
//! ```
//!
//! A remote tier is one more place to look between the index entry and a
//! compile: what it returns goes through [`open_object`] like any object.

use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::OpenOptionsExt;

use std::ffi::OsStr;

use crate::index::{Entry, EntrySlot, LinkRecord};
use crate::objects::Objects;
use crate::pyc::{Flavor, HEADER_LEN};

/// A stat-cache record (or a cached digest) is trusted only for files whose
/// last change is older than the moment they were hashed by more than the
/// filesystem's timestamp granularity: a file changed again within the same
/// clock tick could otherwise hide its change. `seen` is taken before the
/// file is read, so a change after the read is stamped later than `seen`
/// less one tick. Kernel file times tick once per jiffy (at most 10 ms,
/// with `HZ=100`) or finer (Linux 6.13 stamps a file just looked at with
/// the fine clock): 20 ms is two of the coarsest ticks. (It was 100 ms:
/// then the sources an installer wrote in the last tenth of a second before
/// a link were read again by the next link, 218 of the reference corpus's
/// 6,990 when copied right before.) Filesystems with whole-second times get
/// two seconds.
const RACY_WINDOW_NS: i64 = 20_000_000;
const RACY_WINDOW_COARSE_NS: i64 = 2_000_000_000;

/// Whether a digest taken at `seen_ns` of a file last modified at `mtime_ns`
/// and changed at `ctime_ns` can be trusted for as long as both stay the
/// same.
pub fn settled(mtime_ns: i64, ctime_ns: i64, seen_ns: i64) -> bool {
    settles_after(mtime_ns, ctime_ns) < seen_ns
}

/// The time after which a file last modified at `mtime_ns` and changed at
/// `ctime_ns` can be looked at for a digest or listing to trust
/// ([`settled`]).
pub fn settles_after(mtime_ns: i64, ctime_ns: i64) -> i64 {
    let window = if ctime_ns % 1_000_000_000 == 0 {
        RACY_WINDOW_COARSE_NS
    } else {
        RACY_WINDOW_NS
    };
    ctime_ns.max(mtime_ns).saturating_add(window)
}

/// The longest a run waits for what it changed to settle
/// ([`settles_after`]) before it looks at it again: one window of a
/// filesystem with fine times, never the two seconds of a coarse one.
pub const SETTLE_WAIT_NS: i64 = RACY_WINDOW_NS;

/// The entry slot of a source's pyc in `flavor`: hash-based flavors have one
/// per key; a timestamp pyc's header carries the source's mtime and size.
pub fn slot(flavor: Flavor, mtime_secs: i64, size: u64) -> EntrySlot {
    match flavor {
        Flavor::Timestamp => EntrySlot::Timestamp {
            mtime: mtime_secs,
            size,
        },
        flavor => EntrySlot::Hashed(flavor),
    }
}

/// The mode of a new object compiled from a source with permission bits
/// `source_mode`: readable by everyone only when the source is (see
/// `PUBLIC_MODE` (0444) and [`Objects::private_mode`]).
pub fn object_mode(objects: &Objects, source_mode: u32) -> u32 {
    if source_mode & 0o444 == 0o444 {
        crate::objects::PUBLIC_MODE
    } else {
        objects.private_mode()
    }
}

/// An object opened for placing or serving, with what `fstat` said.
#[derive(Debug)]
pub struct CheckedObject {
    /// The object, open for reading (positioned after its header).
    pub file: File,
    /// Its `fstat`.
    pub stat: rustix::fs::Stat,
}

/// What [`open_object`] found.
#[derive(Debug)]
pub enum ObjectState {
    /// Present with the entry's size and header, the store's owner and an
    /// object mode: good to place or serve.
    Good(CheckedObject),
    /// Present with the entry's size and header, but its owner or mode
    /// changed (a `chown -R` or `chmod` through a hardlinked pyc): whoever
    /// changed it may have changed its bytes too. Not to be placed as it is;
    /// [`Objects::reset`] gives it a fresh inode once its bytes are checked.
    Exposed(rustix::fs::Stat),
    /// Not the entry's object (wrong size or header, not a regular file):
    /// a miss, compiled (and rewritten) again.
    Damaged {
        /// Its size.
        len: u64,
    },
    /// No such object: a miss.
    Missing,
}

/// Opens an entry's object without following a symlink and checks it
/// against the entry and the store's rules for objects. An error is a
/// failure to open it for another reason than its absence (out of
/// descriptors, permissions).
pub fn open_object(objects: &Objects, entry: &Entry) -> io::Result<ObjectState> {
    let path = objects.path(&entry.object);
    let mut file = match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(&path)
    {
        Ok(file) => file,
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ELOOP)) => {
            return Ok(ObjectState::Missing)
        }
        Err(e) => return Err(e),
    };
    let stat = rustix::fs::fstat(&file)?;
    let len = stat.st_size as u64;
    let regular =
        rustix::fs::FileType::from_raw_mode(stat.st_mode) == rustix::fs::FileType::RegularFile;
    let mut header = [0u8; HEADER_LEN];
    if !regular || len != entry.size || file.read_exact(&mut header).is_err() {
        return Ok(ObjectState::Damaged { len });
    }
    if header != entry.header {
        return Ok(ObjectState::Damaged { len });
    }
    if !objects.stat_ok(&stat) {
        return Ok(ObjectState::Exposed(stat));
    }
    Ok(ObjectState::Good(CheckedObject { file, stat }))
}

/// The `stat` of an entry's object when one `stat` shows it is still as
/// the store wrote it ([`Objects::sealed`]); `None` when it must be opened
/// and checked ([`open_object`]): missing, changed since, or written before
/// objects were sealed.
pub(crate) fn sealed_object(objects: &Objects, entry: &Entry) -> Option<rustix::fs::Stat> {
    let st = objects.stat_object(&entry.object).ok()?;
    objects.sealed(&st, entry.size).then_some(st)
}

/// The `stat` of the pyc `name` in `dir` when it is still the object an
/// earlier `link` hardlinked there, as `record` says: the recorded inode, a
/// regular file of `size` bytes (the entry's, or the record's). One
/// `statx`, no open or read; the stat is the object's, for callers that
/// also judge its owner and mode (and, with an entry, that it is the
/// record's object). `None` for anything else (no inode recorded, another
/// file there).
pub(crate) fn still_linked(
    dir: &crate::walk::SourceDir,
    name: &OsStr,
    record: &LinkRecord,
    size: u64,
) -> Option<rustix::fs::Stat> {
    let inode = record.inode?;
    let st = dir.pyc_stat(name)?;
    let regular =
        rustix::fs::FileType::from_raw_mode(st.st_mode) == rustix::fs::FileType::RegularFile;
    ((st.st_dev, st.st_ino) == inode && regular && st.st_size as u64 == size).then_some(st)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_digest_is_settled_only_after_the_window() {
        let t = 1_000_000_000_000_123;
        assert!(!settled(t, t, t + RACY_WINDOW_NS));
        assert!(settled(t, t, t + RACY_WINDOW_NS + 1));
        // Whole-second times: two seconds.
        let coarse = 1_000_000_000_000_000_000;
        assert!(!settled(coarse, coarse, coarse + RACY_WINDOW_NS + 1));
        assert!(settled(coarse, coarse, coarse + RACY_WINDOW_COARSE_NS + 1));
    }
}
