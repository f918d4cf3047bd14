//! Objects: complete pyc files named by the blake3 of their bytes, written
//! once by temp-name + rename and never modified. Identical pycs (optimize
//! levels that compile alike, the thousands of empty `__init__.py`) are one
//! object.
//!
//! A hardlinked pyc is the store's object, metadata included: its owner and
//! mode are the same in every prefix that holds it. So an object is a
//! regular file owned by the store's owner (in a group store: by its group),
//! mode 0444, or 0400 (0440 in a group store) when its source is not
//! readable by everyone; [`Objects::metadata_ok`] tells the rest apart, and
//! nothing else may be linked.
//!
//! Every object is written with the modification time [`SEAL_MTIME`] (one
//! second past the epoch, as Nix does for its store). Any write to an
//! object, through the store or through a prefix it is hard linked into,
//! sets its mtime to the time of that write, so an object still sealed, of
//! its entry's size and with an object's owner and mode, is the object the
//! store wrote: `link` checks it with one `stat` (`Objects::sealed`).
//! Anything else is opened and checked byte by byte before it is placed,
//! and sealed again once its bytes hash to its name. (An object changed
//! on purpose with its mtime put back is found by `pycstore verify`.)

use std::ffi::CStr;
use std::fmt;
use std::io::{self, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

use fs_err as fs;

use crate::trust::Owner;
use crate::util::with_path;
use crate::util::PathContext;

/// The mode of an object compiled from a source everyone may read.
pub(crate) const PUBLIC_MODE: u32 = 0o444;

/// The modification time of every object the store wrote and nothing
/// changed since: 1 second, 0 nanoseconds past the epoch.
pub const SEAL_MTIME: (i64, i64) = (1, 0);

/// When a file of the store was last written, in seconds since the epoch:
/// its mtime, or, for a file carrying the seal (an object, or a temp object
/// before its rename, whose mtime says nothing of when), its status change
/// time, which no `utimensat` sets back.
pub(crate) fn last_written(meta: &std::fs::Metadata) -> i64 {
    written_at(meta.mtime(), meta.mtime_nsec(), meta.ctime())
}

/// [`last_written`] from the times of a stat.
fn written_at(mtime: i64, mtime_nsec: i64, ctime: i64) -> i64 {
    if (mtime, mtime_nsec) == SEAL_MTIME {
        ctime
    } else {
        mtime
    }
}

/// Removes what in the scratch directory `tmp` was last written more than
/// `grace` ago ([`last_written`]: a temp object carries the seal before its
/// rename, and by its mtime alone every temp object another process is
/// writing would look ancient); with `dry_run`, only counts it. Returns
/// how many, and what could not be removed.
///
/// In a group store every member can rename and replace what is in the
/// store's directories, `tmp` itself included, and this runs (as root, as
/// anyone) on every open of the store. So `tmp` is opened once without
/// following a symlink and must belong to the store (else nothing is
/// swept), each entry is looked at without following it, and what goes is
/// unlinked by its name in that descriptor: a symlink planted there goes
/// itself, never what it points to, and nothing is `chmod`ed (removing a
/// file takes the directory's write permission, not the file's). Only
/// files and symlinks go: nothing this code writes there is a directory.
pub(crate) fn sweep_temps(
    tmp: &Path,
    grace: std::time::Duration,
    owner: Owner,
    dry_run: bool,
) -> (u64, Vec<crate::util::PathError>) {
    use rustix::fs::{AtFlags, FileType, Mode, OFlags};
    let Ok(dir) = rustix::fs::open(
        tmp,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    ) else {
        return (0, Vec::new());
    };
    match rustix::fs::fstat(&dir) {
        Ok(st) if owner.owns(st.st_uid, st.st_gid) => {}
        _ => return (0, Vec::new()),
    }
    let Ok(entries) = rustix::fs::Dir::read_from(&dir) else {
        return (0, Vec::new());
    };
    let cutoff = crate::util::now_secs().saturating_sub(grace.as_secs()) as i64;
    let (mut removed, mut failures) = (0, Vec::new());
    for entry in entries.flatten() {
        let name = entry.file_name();
        if name.to_bytes() == b"." || name.to_bytes() == b".." {
            continue;
        }
        let Ok(st) = rustix::fs::statat(&dir, name, AtFlags::SYMLINK_NOFOLLOW) else {
            continue;
        };
        let kind = FileType::from_raw_mode(st.st_mode);
        let written = written_at(st.st_mtime, st.st_mtime_nsec as i64, st.st_ctime);
        if written >= cutoff || !matches!(kind, FileType::RegularFile | FileType::Symlink) {
            continue;
        }
        removed += 1;
        if !dry_run {
            if let Err(e) = rustix::fs::unlinkat(&dir, name, AtFlags::empty()) {
                let path = tmp.join(std::ffi::OsStr::from_bytes(name.to_bytes()));
                failures.push(crate::util::PathError::new(e.into(), "remove", &path));
            }
        }
    }
    (removed, failures)
}

/// The content address of an object: blake3 of its bytes.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct ObjectId(pub [u8; 32]);

impl ObjectId {
    /// Hashes object bytes.
    pub fn of(bytes: &[u8]) -> Self {
        ObjectId(*blake3::hash(bytes).as_bytes())
    }

    /// The id as 64 lowercase hex digits.
    pub fn to_hex(&self) -> String {
        blake3::Hash::from(self.0).to_hex().to_string()
    }

    /// Parses 64 lowercase hex digits (the form [`ObjectId::to_hex`]
    /// writes); `None` for anything else.
    pub fn from_hex(hex: &str) -> Option<ObjectId> {
        let digits = hex.as_bytes();
        if digits.len() != 64
            || !digits
                .iter()
                .all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f'))
        {
            return None;
        }
        let nibble = |c: u8| if c <= b'9' { c - b'0' } else { c - b'a' + 10 };
        let mut id = [0u8; 32];
        for (i, byte) in id.iter_mut().enumerate() {
            *byte = nibble(digits[2 * i]) << 4 | nibble(digits[2 * i + 1]);
        }
        Some(ObjectId(id))
    }
}

impl fmt::Debug for ObjectId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex()[..16])
    }
}

/// What the objects bucket holds, as found by [`Objects::list`].
#[derive(Debug, Default)]
pub struct Listing {
    /// Everything named like an object (`xx/` + 62 hex digits), whatever
    /// it holds: checking the bytes is the caller's business.
    pub objects: Vec<ObjectId>,
    /// Everything else in the bucket: pycstore never writes such names.
    pub strays: Vec<PathBuf>,
}

/// The objects bucket of a store.
pub struct Objects {
    dir: PathBuf,
    tmp: PathBuf,
    owner: Owner,
    /// The shard directories this process made or found, by the object
    /// id's first byte: not made again for each object.
    shards: [AtomicBool; 256],
    /// The bucket's directory, opened once (`O_PATH`) when first needed:
    /// objects are `stat`ed and linked through it by their two-component
    /// name ([`Objects::stat_object`], [`Objects::link_object`]), not by a path the kernel walks from `/` for
    /// each (twice per pyc placed: 14,000 walks of eight components in a
    /// warm link of the reference corpus). While it cannot be opened, by
    /// path.
    fd: OnceLock<OwnedFd>,
}

/// An object's name beneath the bucket: `xx/yyyy…`, NUL-terminated, on the
/// stack.
struct ObjectName([u8; 66]);

impl ObjectName {
    fn as_c_str(&self) -> &CStr {
        CStr::from_bytes_with_nul(&self.0).expect("one NUL, at the end")
    }
}

impl Objects {
    /// A bucket of a private store of the current user in a new temporary
    /// directory (`objects/`, with `tmp/` beside it), for tests.
    #[cfg(test)]
    pub(crate) fn scratch() -> (tempfile::TempDir, Self) {
        let dir = tempfile::tempdir().unwrap();
        let tmp = dir.path().join("tmp");
        std::fs::create_dir(&tmp).unwrap();
        let objects = Self::with_owner(dir.path().join("objects"), tmp, Owner::current_user());
        (dir, objects)
    }

    pub(crate) fn with_owner(dir: PathBuf, tmp: PathBuf, owner: Owner) -> Self {
        Objects {
            dir,
            tmp,
            owner,
            shards: std::array::from_fn(|_| AtomicBool::new(false)),
            fd: OnceLock::new(),
        }
    }

    /// The bucket's descriptor ([`Objects::fd`]), opened on first use (and
    /// tried again on the next while it cannot be).
    fn bucket(&self) -> Option<BorrowedFd<'_>> {
        if let Some(fd) = self.fd.get() {
            return Some(fd.as_fd());
        }
        // Not through a symlink (the store's checks refuse a bucket that is
        // one). Until it opens, objects are reached by path, as everything
        // else in the bucket is.
        let flags = rustix::fs::OFlags::PATH
            | rustix::fs::OFlags::DIRECTORY
            | rustix::fs::OFlags::NOFOLLOW
            | rustix::fs::OFlags::CLOEXEC;
        let fd = rustix::fs::open(&self.dir, flags, rustix::fs::Mode::empty()).ok()?;
        Some(self.fd.get_or_init(|| fd).as_fd())
    }

    /// The object `id`'s name beneath the bucket.
    fn name(id: &ObjectId) -> ObjectName {
        let hex = blake3::Hash::from(id.0).to_hex();
        let hex = hex.as_bytes();
        let mut name = [0u8; 66];
        name[..2].copy_from_slice(&hex[..2]);
        name[2] = b'/';
        name[3..65].copy_from_slice(&hex[2..]);
        ObjectName(name)
    }

    /// `stat` of the object `id`, not following a symlink.
    pub(crate) fn stat_object(&self, id: &ObjectId) -> rustix::io::Result<rustix::fs::Stat> {
        let nofollow = rustix::fs::AtFlags::SYMLINK_NOFOLLOW;
        match self.bucket() {
            Some(fd) => rustix::fs::statat(fd, Self::name(id).as_c_str(), nofollow),
            None => rustix::fs::statat(rustix::fs::CWD, self.path(id), nofollow),
        }
    }

    /// Hard links the object `id` as `name` in `dir` (never replacing).
    pub(crate) fn link_object(
        &self,
        id: &ObjectId,
        dir: BorrowedFd<'_>,
        name: &std::ffi::OsStr,
    ) -> rustix::io::Result<()> {
        let flags = rustix::fs::AtFlags::empty();
        match self.bucket() {
            Some(fd) => rustix::fs::linkat(fd, Self::name(id).as_c_str(), dir, name, flags),
            None => rustix::fs::linkat(rustix::fs::CWD, self.path(id), dir, name, flags),
        }
    }

    /// Whom objects must belong to.
    pub fn owner(&self) -> Owner {
        self.owner
    }

    /// The mode of an object compiled from a source that not everyone may
    /// read: 0400, or 0440 in a group store (every member reads it).
    pub fn private_mode(&self) -> u32 {
        match self.owner {
            Owner::User(_) => 0o400,
            Owner::Group(_) => 0o440,
        }
    }

    /// Whether `mode` (permission bits only) is one an object may have.
    fn mode_ok(&self, mode: u32) -> bool {
        mode == PUBLIC_MODE || mode == self.private_mode()
    }

    /// Whether an object's metadata (from `lstat` or `fstat` of the opened
    /// object) is what the store wrote: a regular file, owned by the store's
    /// owner (in a group store: by its group), with an object mode. An
    /// object failing this may have been changed through any prefix it is
    /// hard linked into (a `chown -R` of one venv hands it to that venv's
    /// owner); never place it. One comparison, no system call.
    pub fn metadata_ok(&self, meta: &std::fs::Metadata) -> bool {
        meta.file_type().is_file()
            && self.owner.owns(meta.uid(), meta.gid())
            && self.mode_ok(meta.mode() & 0o7777)
    }

    /// Why hard linking an object failed with `err`, when the cause is the
    /// store's sharing rather than the filesystem: in a group store, with
    /// `fs.protected_hardlinks = 1` (the default), the kernel lets a member
    /// hard link only objects they own, and objects stay read-only so no
    /// member can change the pycs in another member's prefixes. For the one
    /// warning of the fallback to copies.
    pub fn hardlink_refusal(&self, err: &io::Error) -> Option<String> {
        let protected = std::fs::read_to_string("/proc/sys/fs/protected_hardlinks")
            .is_ok_and(|v| v.trim() == "1");
        (matches!(self.owner, Owner::Group(_))
            && err.raw_os_error() == Some(libc::EPERM)
            && protected)
            .then(|| {
                "in a store shared with a group, the kernel (fs.protected_hardlinks = 1) lets \
                 a member hard link only the objects they wrote; objects other members wrote \
                 are copied (or reflinked where the filesystem can)"
                    .to_string()
            })
    }

    /// [`Objects::metadata_ok`] for a `rustix` stat.
    pub fn stat_ok(&self, stat: &rustix::fs::Stat) -> bool {
        rustix::fs::FileType::from_raw_mode(stat.st_mode) == rustix::fs::FileType::RegularFile
            && self.owner.owns(stat.st_uid, stat.st_gid)
            && self.mode_ok(stat.st_mode & 0o7777)
    }

    /// Whether a `stat` of an object says it is still as the store wrote
    /// it: sealed ([`SEAL_MTIME`]), a regular file of `size` bytes with an
    /// object's owner and mode. No system call.
    pub(crate) fn sealed(&self, stat: &rustix::fs::Stat, size: u64) -> bool {
        (stat.st_mtime, stat.st_mtime_nsec as i64) == SEAL_MTIME
            && stat.st_size as u64 == size
            && self.stat_ok(stat)
    }

    /// Seals the object `id` after its bytes were checked against its
    /// name (an object of a store older than the seal, or one whose mtime
    /// changed): its next check is one `stat`. Only the object's owner (or
    /// root) may; anyone else leaves it as it is.
    pub(crate) fn seal(&self, id: &ObjectId) {
        let _ = rustix::fs::utimensat(
            rustix::fs::CWD,
            self.path(id),
            &seal_times(),
            rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
        );
    }

    /// Where the object `id` lives (whether or not it exists).
    pub fn path(&self, id: &ObjectId) -> PathBuf {
        let name = Self::name(id);
        crate::util::joined(&self.dir, &[&name.0[..65]])
    }

    /// Stores `bytes` readable by everyone (`PUBLIC_MODE`, 0444) and returns
    /// their id. Bytes already present are not written again; a damaged file
    /// under their name is replaced.
    pub fn put(&self, bytes: &[u8]) -> io::Result<ObjectId> {
        self.put_mode(bytes, PUBLIC_MODE)
    }

    /// As [`Objects::put`], a new object getting `mode`:
    /// [`Objects::private_mode`] for the pyc of a source not every user may
    /// read.
    pub fn put_mode(&self, bytes: &[u8], mode: u32) -> io::Result<ObjectId> {
        let id = ObjectId::of(bytes);
        if !self.intact(&id) {
            self.adopt(&id, self.write_temp_with_mode(bytes, mode)?)?;
        }
        Ok(id)
    }

    /// As [`Objects::put_mode`], for `bytes` whose blake3 the caller
    /// checked to be `id` (a pyc from a remote, checked against its name)
    /// and that the store most likely lacks: written without looking
    /// first ([`Objects::adopt`] keeps a good object already there).
    pub(crate) fn put_hashed(&self, id: &ObjectId, bytes: &[u8], mode: u32) -> io::Result<()> {
        debug_assert_eq!(ObjectId::of(bytes), *id);
        self.adopt(id, self.write_temp_with_mode(bytes, mode)?)
    }

    /// Gives the object `id` a fresh inode with `mode` (as
    /// [`Objects::refresh_inode`]): for a private object now also wanted by a
    /// source every user may read, or one whose metadata changed.
    /// `Ok(false)` when its bytes do not match its name: the object is
    /// damaged, not to be placed.
    pub fn reset(&self, id: &ObjectId, mode: u32) -> io::Result<bool> {
        match self.rewrite(id, Some(mode)) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::InvalidData => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Whether the object `id` is present, not a symlink, with the metadata
    /// of an object and bytes that hash to its name.
    pub(crate) fn intact(&self, id: &ObjectId) -> bool {
        use std::io::Read;
        let Ok(mut file) = crate::link::open_no_follow(&self.path(id)) else {
            return false;
        };
        let mut bytes = Vec::new();
        file.metadata().is_ok_and(|meta| self.metadata_ok(&meta))
            && file.read_to_end(&mut bytes).is_ok()
            && ObjectId::of(&bytes) == *id
    }

    /// Reads a whole object.
    pub fn read(&self, id: &ObjectId) -> io::Result<Vec<u8>> {
        fs::read(self.path(id))
    }

    /// The bucket directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Lists the whole bucket, one shard directory per task.
    pub fn list(&self) -> io::Result<Listing> {
        use rayon::prelude::*;
        let mut shards = Vec::new();
        let mut listing = Listing::default();
        for entry in fs::read_dir(&self.dir)? {
            let entry = entry?;
            let name = entry.file_name();
            let is_shard = name.len() == 2
                && name.to_str().is_some_and(|n| {
                    n.bytes()
                        .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
                })
                && entry.file_type().is_ok_and(|t| t.is_dir());
            if is_shard {
                shards.push(entry.path());
            } else {
                listing.strays.push(entry.path());
            }
        }
        let found: Vec<Listing> = shards
            .par_iter()
            .map(|shard| -> io::Result<Listing> {
                let prefix = shard
                    .file_name()
                    .and_then(|n| n.to_str())
                    .unwrap_or_default();
                let mut listing = Listing::default();
                for entry in fs::read_dir(shard)? {
                    let entry = entry?;
                    let id = entry
                        .file_name()
                        .to_str()
                        .and_then(|rest| ObjectId::from_hex(&format!("{prefix}{rest}")));
                    match id {
                        Some(id) => listing.objects.push(id),
                        None => listing.strays.push(entry.path()),
                    }
                }
                Ok(listing)
            })
            .collect::<io::Result<_>>()?;
        for mut part in found {
            listing.objects.append(&mut part.objects);
            listing.strays.append(&mut part.strays);
        }
        Ok(listing)
    }

    /// Gives an object a fresh inode with the same bytes, owned by the
    /// store's owner with an object mode: for when its link count reached
    /// the filesystem's limit (EMLINK), or its owner or mode changed.
    /// Existing links keep the old inode; new links go to the new one.
    ///
    /// The object is read without following a symlink, and its bytes must
    /// hash to its name (else `InvalidData`: a damaged object is never given
    /// fresh metadata). It keeps the private mode unless it was readable by
    /// everyone.
    pub fn refresh_inode(&self, id: &ObjectId) -> io::Result<()> {
        self.rewrite(id, None)
    }

    fn rewrite(&self, id: &ObjectId, mode: Option<u32>) -> io::Result<()> {
        use std::io::Read;
        let path = self.path(id);
        let mut file = crate::link::open_no_follow(&path).at("open", &path)?;
        let meta = file.metadata().at("stat", &path)?;
        if !meta.is_file() {
            return Err(with_path(
                io::Error::new(io::ErrorKind::InvalidData, "not a regular file"),
                "give a fresh inode to",
                &path,
            ));
        }
        let mut bytes = Vec::with_capacity(meta.len() as usize);
        file.read_to_end(&mut bytes).at("read", &path)?;
        if ObjectId::of(&bytes) != *id {
            return Err(with_path(
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    "its bytes do not match its name (damaged)",
                ),
                "give a fresh inode to",
                &path,
            ));
        }
        let mode = mode.unwrap_or(if meta.mode() & 0o004 != 0 {
            PUBLIC_MODE
        } else {
            self.private_mode()
        });
        let temp = self.write_temp_with_mode(&bytes, mode)?;
        temp.persist(&path)
            .map_err(|e| with_path(e.error, "rename a temp file to", &path))
    }

    /// Whether the object `id` is present with `size` bytes (one `stat`).
    pub fn contains(&self, id: &ObjectId, size: u64) -> bool {
        std::fs::symlink_metadata(self.path(id)).is_ok_and(|m| m.is_file() && m.len() == size)
    }

    /// The first [`HEADER_LEN`](crate::pyc::HEADER_LEN) bytes of the object
    /// `id` (zeros past a shorter one), read without following a symlink;
    /// `None` when it cannot be read.
    pub(crate) fn header(&self, id: &ObjectId) -> Option<[u8; crate::pyc::HEADER_LEN]> {
        use std::io::Read;
        let file = crate::link::open_no_follow(&self.path(id)).ok()?;
        let mut bytes = Vec::with_capacity(crate::pyc::HEADER_LEN);
        file.take(crate::pyc::HEADER_LEN as u64)
            .read_to_end(&mut bytes)
            .ok()?;
        let mut header = [0u8; crate::pyc::HEADER_LEN];
        header[..bytes.len()].copy_from_slice(&bytes);
        Some(header)
    }

    /// Writes an object's bytes (which the caller has checked against its
    /// id) to a read-only temp file in the store's scratch space, for
    /// [`Objects::adopt`] to move into place later. Dropped instead, the
    /// temp file is removed.
    pub fn write_temp(&self, bytes: &[u8]) -> io::Result<tempfile::TempPath> {
        self.write_temp_with_mode(bytes, PUBLIC_MODE)
    }

    /// [`Objects::write_temp`] with the object's mode: [`PUBLIC_MODE`], or
    /// [`Objects::private_mode`] for a source not everyone may read. In a
    /// group store the file is given the store's group.
    fn write_temp_with_mode(&self, bytes: &[u8], mode: u32) -> io::Result<tempfile::TempPath> {
        // Created with the object's mode (the descriptor is writable
        // whatever the mode): a `chmod` only where creation does not give
        // it whole ([`created_whole`]).
        let mut tmp = tempfile::Builder::new()
            .prefix(".pycstore-")
            .suffix(".tmp")
            .permissions(std::fs::Permissions::from_mode(mode))
            .tempfile_in(&self.tmp)
            .at("create a temp file in", &self.tmp)?;
        tmp.write_all(bytes).at("write", tmp.path())?;
        if let Owner::Group(gid) = self.owner {
            std::os::unix::fs::fchown(tmp.as_file(), None, Some(gid))
                .at("change the group of", tmp.path())?;
        }
        if !created_whole(tmp.as_file(), mode) {
            tmp.as_file()
                .set_permissions(std::fs::Permissions::from_mode(mode))
                .at("set permissions of", tmp.path())?;
        }
        rustix::fs::futimens(tmp.as_file(), &seal_times())
            .map_err(io::Error::from)
            .at("set the modification time of", tmp.path())?;
        Ok(tmp.into_temp_path())
    }

    /// Moves a temp file from [`Objects::write_temp`] into place as the
    /// object `id`. A good object already there is kept, never renamed over:
    /// link(2) fails with ENOENT on an inode whose name was replaced after
    /// the lookup, so another process hard linking it would fail. A damaged
    /// one is replaced.
    pub fn adopt(&self, id: &ObjectId, temp: tempfile::TempPath) -> io::Result<()> {
        let path = self.path(id);
        let shard = path.parent().expect("an object has a shard");
        let made = &self.shards[id.0[0] as usize];
        if !made.load(Ordering::Relaxed) {
            create_dir(shard, self.owner.dir_mode())?;
            made.store(true, Ordering::Relaxed);
        }
        let (mut temp, mut remade) = (temp, false);
        let temp = loop {
            match temp.persist_noclobber(&path) {
                Ok(()) => return Ok(()),
                Err(e) if e.error.kind() == io::ErrorKind::AlreadyExists => break e.path,
                // The shard was removed since (`gc`, `verify --repair`).
                Err(e)
                    if e.error.kind() == io::ErrorKind::NotFound && !remade && e.path.exists() =>
                {
                    create_dir(shard, self.owner.dir_mode())?;
                    (temp, remade) = (e.path, true);
                }
                Err(e) => return Err(with_path(e.error, "rename a temp file to", &path)),
            }
        };
        if self.intact(id) {
            return Ok(());
        }
        temp.persist(&path)
            .map_err(|e| with_path(e.error, "rename a temp file to", &path))
    }
}

/// Whether `file`, just created in the scratch space with `mode`, has
/// that mode whole. What creation takes (the umask, or a default ACL of
/// the scratch directory, which replaces it) is the same for every file
/// made there with one mode, so the first file of each object mode is
/// `fstat`ed and the answer kept for the process; every other mode is
/// set by `chmod`. Creation only ever takes bits, so a wrong answer could
/// leave an object less readable than it should be, never more.
fn created_whole(file: &std::fs::File, mode: u32) -> bool {
    use std::sync::atomic::AtomicU8;
    // Per object mode: 0 not known yet, 1 created whole, 2 not.
    static WHOLE: [AtomicU8; 3] = [AtomicU8::new(0), AtomicU8::new(0), AtomicU8::new(0)];
    let slot = match mode {
        PUBLIC_MODE => &WHOLE[0],
        0o440 => &WHOLE[1],
        0o400 => &WHOLE[2],
        _ => return false,
    };
    match slot.load(Ordering::Relaxed) {
        1 => true,
        2 => false,
        _ => {
            let whole = rustix::fs::fstat(file).is_ok_and(|st| st.st_mode & 0o7777 == mode);
            slot.store(if whole { 1 } else { 2 }, Ordering::Relaxed);
            whole
        }
    }
}

/// The access time left as it is, the modification time [`SEAL_MTIME`].
fn seal_times() -> rustix::fs::Timestamps {
    rustix::fs::Timestamps {
        last_access: rustix::fs::Timespec {
            tv_sec: 0,
            tv_nsec: rustix::fs::UTIME_OMIT,
        },
        last_modification: rustix::fs::Timespec {
            tv_sec: SEAL_MTIME.0,
            tv_nsec: SEAL_MTIME.1,
        },
    }
}

/// Writes `bytes` to a temp file in `tmp_dir` and renames it to `dest`, so a
/// reader sees either nothing or the whole file.
pub(crate) fn write_atomic(tmp_dir: &Path, dest: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    let mut tmp = tempfile::Builder::new()
        .prefix(".pycstore-")
        .suffix(".tmp")
        .tempfile_in(tmp_dir)?;
    tmp.write_all(bytes).at("write", tmp.path())?;
    tmp.as_file()
        .set_permissions(std::fs::Permissions::from_mode(mode))
        .at("set permissions of", tmp.path())?;
    tmp.persist(dest)
        .map_err(|e| with_path(e.error, "rename a temp file to", dest))?;
    Ok(())
}

/// Creates the directory `dir` (and missing parents) with exactly `mode`,
/// whatever the umask: a group store's directories must stay writable by
/// the group. An existing directory is left as it is.
pub(crate) fn create_dir(dir: &Path, mode: u32) -> io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    match std::fs::DirBuilder::new().mode(mode).create(dir) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            match dir.parent() {
                Some(parent) if parent != dir => create_dir(parent, mode)?,
                _ => return Err(with_path(e, "create", dir)),
            }
            create_dir(dir, mode)
        }
        Ok(()) => std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode))
            .at("set permissions of", dir),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(with_path(e, "create", dir)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn put_dedups_and_is_read_only() {
        let (_dir, objects) = Objects::scratch();
        let a = objects.put(b"same bytes").unwrap();
        let b = objects.put(b"same bytes").unwrap();
        assert_eq!(a, b);
        let meta = std::fs::metadata(objects.path(&a)).unwrap();
        assert_eq!(meta.mode() & 0o777, 0o444);
        assert_eq!(objects.read(&a).unwrap(), b"same bytes");
        let before = meta.ino();
        objects.refresh_inode(&a).unwrap();
        let after = std::fs::metadata(objects.path(&a)).unwrap().ino();
        assert_ne!(before, after);
        assert_eq!(objects.read(&a).unwrap(), b"same bytes");
    }

    #[test]
    fn objects_are_stated_and_linked_through_the_bucket_as_by_path() {
        let (dir, objects) = Objects::scratch();
        // Not there yet: by path, and an error like the path's.
        let missing = ObjectId::of(b"not stored");
        assert_eq!(
            objects.stat_object(&missing).unwrap_err(),
            rustix::io::Errno::NOENT
        );
        let id = objects.put(b"bytes").unwrap();
        let by_path = std::fs::symlink_metadata(objects.path(&id)).unwrap();
        let st = objects.stat_object(&id).unwrap();
        assert_eq!((st.st_dev, st.st_ino), (by_path.dev(), by_path.ino()));
        assert_eq!(
            dir.path()
                .join("objects")
                .join(Objects::name(&id).as_c_str().to_str().unwrap()),
            objects.path(&id)
        );
        let prefix = tempfile::tempdir_in(dir.path()).unwrap();
        let fd = rustix::fs::open(
            prefix.path(),
            rustix::fs::OFlags::DIRECTORY,
            rustix::fs::Mode::empty(),
        )
        .unwrap();
        objects
            .link_object(&id, fd.as_fd(), "x.pyc".as_ref())
            .unwrap();
        assert_eq!(
            std::fs::metadata(prefix.path().join("x.pyc"))
                .unwrap()
                .ino(),
            by_path.ino()
        );
        // Never over an existing name.
        assert_eq!(
            objects
                .link_object(&id, fd.as_fd(), "x.pyc".as_ref())
                .unwrap_err(),
            rustix::io::Errno::EXIST
        );
    }

    #[test]
    fn a_shard_removed_after_its_first_object_is_made_again() {
        let (_dir, objects) = Objects::scratch();
        let first = objects.put(b"0").unwrap();
        // Another object in the same shard, put after the shard is gone.
        let other = (1..)
            .map(|i: u32| i.to_string().into_bytes())
            .find(|b| ObjectId::of(b).0[0] == first.0[0])
            .unwrap();
        std::fs::remove_dir_all(objects.path(&first).parent().unwrap()).unwrap();
        let id = ObjectId::of(&other);
        objects.put_hashed(&id, &other, PUBLIC_MODE).unwrap();
        assert_eq!(objects.read(&id).unwrap(), other);
        // And a good object already there is kept.
        let before = std::fs::metadata(objects.path(&id)).unwrap().ino();
        objects.put_hashed(&id, &other, PUBLIC_MODE).unwrap();
        assert_eq!(std::fs::metadata(objects.path(&id)).unwrap().ino(), before);
    }

    #[test]
    fn adopt_keeps_a_good_object_and_replaces_a_damaged_one() {
        let (dir, objects) = Objects::scratch();
        let bytes = b"bytes two processes compiled at once";
        let id = objects.put(bytes).unwrap();
        let path = objects.path(&id);
        let inode = std::fs::metadata(&path).unwrap().ino();
        // The second writer's copy goes; the first one's inode stays.
        objects
            .adopt(&id, objects.write_temp(bytes).unwrap())
            .unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().ino(), inode);
        assert_eq!(
            std::fs::read_dir(dir.path().join("tmp")).unwrap().count(),
            0
        );
        // A truncated object under the name is replaced by the good bytes.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        std::fs::write(&path, &bytes[..10]).unwrap();
        assert_eq!(objects.put(bytes).unwrap(), id);
        assert_eq!(objects.read(&id).unwrap(), bytes);
    }

    #[test]
    fn list_finds_objects_and_strays() {
        let (_dir, objects) = Objects::scratch();
        let a = objects.put(b"first object bytes").unwrap();
        let b = objects.put(b"second object bytes").unwrap();
        std::fs::write(objects.dir().join("README"), "").unwrap();
        let shard = objects.path(&a).parent().unwrap().to_path_buf();
        std::fs::write(shard.join("not-an-object"), "").unwrap();
        let listing = objects.list().unwrap();
        let mut found = listing.objects.clone();
        found.sort_by_key(|id| id.0);
        let mut expected = vec![a, b];
        expected.sort_by_key(|id| id.0);
        assert_eq!(found, expected);
        assert_eq!(listing.strays.len(), 2, "{:?}", listing.strays);
        assert_eq!(ObjectId::from_hex(&a.to_hex()), Some(a));
        assert_eq!(ObjectId::from_hex(&a.to_hex().to_uppercase()), None);
    }
}
