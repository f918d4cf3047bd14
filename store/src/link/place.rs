//! Placing: what to do with one target (up to date, a hit, a remembered
//! failure, or a miss for [`compile`](super::compile)), the checks of the
//! store's object and of the pyc already at its name, and the placing
//! itself. Counts and index writes go to the run's ledger; in a dry run
//! nothing is written and what would be done is counted.

use std::ffi::OsStr;
use std::io::Read;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::atomic::Ordering;

use rustix::fs::{AtFlags, FileType, Mode, OFlags};

use crate::error::{Cause, FileError, Op};
use crate::index::{Entry, EntrySlot, LinkRecord, Placed};
use crate::materialize::{Access, Destination, LinkMode};
use crate::objects::{ObjectId, PUBLIC_MODE};
use crate::pyc::{self, Flavor, HEADER_LEN};
use crate::resolve::{self, open_object, ObjectState};
use crate::source::Source;
use crate::Store;

use super::compile::CompileJob;
use super::lookup::{Lookup, Target};
use super::{Run, Settled};

/// Whose trees may share the store's inodes, and who is placing pycs.
pub(super) struct TrustDomain<'a> {
    objects: &'a crate::objects::Objects,
    /// Whether the caller is root (and can give pycs their source's owner).
    root: bool,
    /// The caller's user id.
    euid: u32,
}

impl<'a> TrustDomain<'a> {
    pub(super) fn of(store: &'a Store) -> TrustDomain<'a> {
        let euid = rustix::process::geteuid();
        TrustDomain {
            objects: &store.objects,
            root: euid.is_root(),
            euid: euid.as_raw(),
        }
    }

    /// Whether an object written by `uid` belongs to another member of a
    /// group store.
    fn foreign(&self, uid: u32) -> bool {
        matches!(self.objects.owner(), crate::trust::Owner::Group(_)) && uid != self.euid
    }

    /// Who may read the pyc of `source`: a source every user may read gets
    /// a pyc every user may read, which may share the object's inode in a
    /// tree of the store's owner (or, for a group store, its group); any
    /// other source gets its own inode with its read bits, and its owner
    /// when root places it (as `compileall` would make it). Without root
    /// the pyc is the caller's, readable by the caller only.
    fn access(&self, source: &Source) -> Access {
        if source.meta.is_public() {
            return Access {
                mode: PUBLIC_MODE,
                owner: None,
                hardlink: self.objects.owner().owns(source.dir.uid, source.dir.gid),
            };
        }
        if self.root {
            Access {
                mode: source.meta.mode & 0o444,
                owner: Some((source.meta.uid, source.meta.gid)),
                hardlink: false,
            }
        } else {
            Access {
                mode: 0o400,
                owner: None,
                hardlink: false,
            }
        }
    }

    /// Whether an object's metadata is what the store gave it.
    fn object_ok(&self, st: &rustix::fs::Stat) -> bool {
        self.objects.stat_ok(st)
    }
}

/// The identity of an object checked for placing.
#[derive(Clone, Copy)]
pub(super) struct Checked {
    dev: u64,
    ino: u64,
    mode: u32,
    /// Who wrote it (in a group store, any member).
    uid: u32,
}

impl Checked {
    fn of(st: &rustix::fs::Stat) -> Checked {
        Checked {
            dev: st.st_dev,
            ino: st.st_ino,
            mode: st.st_mode & 0o7777,
            uid: st.st_uid,
        }
    }
}

impl Run<'_> {
    /// For one pyc: up to date, a hit, a cached failure, or a compile job.
    pub(super) fn act(&self, mut target: Target) -> Result<Option<CompileJob>, FileError> {
        let lookup = std::mem::replace(&mut target.lookup, Lookup::Miss);
        match lookup {
            Lookup::Placed => {
                self.ledger.settled(|s| s.up_to_date += 1);
                return Ok(None);
            }
            Lookup::Entry(entry) => {
                if self.still_placed(&target, &entry) {
                    // A record of an earlier entries epoch (after a `gc`),
                    // or from before records carried the entry's key:
                    // written again, once per epoch.
                    if !self.recorded_for_key(&target) {
                        let inode = target.recorded.as_ref().and_then(|r| r.inode);
                        self.rerecord_link(&target, &entry, inode);
                    }
                    self.ledger.settled(|s| s.up_to_date += 1);
                    return Ok(None);
                }
                if let Some(checked) = self.check_object(&entry) {
                    return self
                        .settle(&target, &entry, Some(checked), Settled::Hit)
                        .map(|()| None);
                }
            }
            Lookup::Body(body) if self.check_object(&body).is_some() => {
                if self.options.dry_run {
                    return self
                        .settle(&target, &body, None, Settled::Hit)
                        .map(|()| None);
                }
                if let Some(entry) = self.derive(&target, &body)? {
                    return self
                        .settle(&target, &entry, None, Settled::Hit)
                        .map(|()| None);
                }
            }
            Lookup::Rejected(message) => return Err(self.rejected(&target, &message)),
            _ => {}
        }
        if self.options.dry_run {
            self.ledger.settled(|s| s.compiled += 1);
            return Ok(None);
        }
        self.miss(target)
    }

    /// Whether the pyc is still the object an earlier run hardlinked there,
    /// from one `stat` of the pyc: the inode recorded, with the size of the
    /// entry and the owner and mode of an object (the pyc's stat is the
    /// object's). Anything else goes the long way ([`Run::settle`]).
    fn still_placed(&self, target: &Target, entry: &Entry) -> bool {
        target.recorded.as_ref().is_some_and(|recorded| {
            recorded.object == entry.object && self.still_placed_as(target, recorded, entry.size)
        })
    }

    /// [`Run::still_placed`] without the entry: the pyc was placed for the
    /// very entry key `target` wants, in the index's current entries epoch
    /// (no entry has left the index since: the store still holds it), and
    /// is still that object, of the size recorded.
    pub(super) fn still_placed_for_key(&self, target: &Target) -> bool {
        let Some(recorded) = &target.recorded else {
            return false;
        };
        let Some(size) = recorded.size else {
            return false;
        };
        self.recorded_for_key(target) && self.still_placed_as(target, recorded, size)
    }

    /// Whether the record of `target`'s pyc was written for the entry key
    /// `target` wants, in the current entries epoch.
    fn recorded_for_key(&self, target: &Target) -> bool {
        target
            .recorded
            .as_ref()
            .is_some_and(|r| r.placed_for(&target.key, self.slot(target), self.entries_epoch))
    }

    fn still_placed_as(&self, target: &Target, recorded: &LinkRecord, size: u64) -> bool {
        let access = self.domain.access(&target.source);
        if !access.hardlink || access.mode != PUBLIC_MODE {
            return false;
        }
        let Some(name) = target.pyc.file_name() else {
            return false;
        };
        // Sealed: nothing wrote to the object's inode since the store did.
        resolve::still_linked(&target.source.dir, name, recorded, size).is_some_and(|st| {
            self.store.objects.sealed(&st, size) && st.st_mode & 0o7777 == PUBLIC_MODE
        })
    }

    /// Checks an entry's object before it is placed ([`open_object`]):
    /// present with the recorded size and header, and with the owner and
    /// mode the store gave it. A missing or damaged object is a miss (and is
    /// rewritten by the compile that follows), never something to link; one
    /// whose metadata changed (a `chown -R` or `chmod` through a hardlink)
    /// gets a fresh inode first, once its bytes are checked against its
    /// name, so the change never reaches another tree.
    fn check_object(&self, entry: &Entry) -> Option<Checked> {
        if let Some(st) = resolve::sealed_object(&self.store.objects, entry) {
            return Some(Checked::of(&st));
        }
        let path = self.store.objects.path(&entry.object);
        let damaged = |len: u64| {
            self.progress.warn(&format!(
                "store object `{}` does not match its index entry ({len} bytes, {} expected); \
                 it will be rewritten (run `pycstore verify` to check the whole store)",
                path.display(),
                entry.size
            ));
        };
        let st = match open_object(&self.store.objects, entry) {
            // Changed since the store wrote it, or older than the seal: its
            // whole bytes must hash to its name before it is placed (and
            // sealed again).
            Ok(ObjectState::Good(object)) => {
                if !self.store.objects.intact(&entry.object) {
                    self.progress.warn(&format!(
                        "store object `{}` does not hash to its name (damaged); it will be \
                         rewritten (run `pycstore verify` to check the whole store)",
                        path.display()
                    ));
                    return None;
                }
                self.store.objects.seal(&entry.object);
                return Some(Checked::of(&object.stat));
            }
            Ok(ObjectState::Missing) | Err(_) => return None,
            Ok(ObjectState::Damaged { len }) => {
                damaged(len);
                return None;
            }
            Ok(ObjectState::Exposed(st)) => st,
        };
        let mode = if st.st_mode & 0o004 != 0 {
            PUBLIC_MODE
        } else {
            self.store.objects.private_mode()
        };
        if !self.warned_metadata.swap(true, Ordering::Relaxed) {
            self.progress.warn(&format!(
                "store object `{}` has owner {} and mode {:o}, not what the store gave it \
                 (a `chown`/`chmod` through a hardlinked pyc?); giving such objects a fresh \
                 inode before placing them (run `pycstore verify --repair` to fix the rest)",
                path.display(),
                st.st_uid,
                st.st_mode & 0o7777
            ));
        }
        match self.store.objects.reset(&entry.object, mode) {
            Ok(true) => self.identity(&entry.object),
            Ok(false) => {
                damaged(st.st_size as u64);
                None
            }
            Err(_) => None,
        }
    }

    /// The identity of an object this run just checked or wrote.
    pub(super) fn identity(&self, object: &ObjectId) -> Option<Checked> {
        let st = self.store.objects.stat_object(object).ok()?;
        self.domain.object_ok(&st).then(|| Checked::of(&st))
    }

    /// Makes this target's flavor from a stored body; `None` when the body's
    /// object does not match its entry (then it is recompiled).
    pub(super) fn derive(&self, target: &Target, body: &Entry) -> Result<Option<Entry>, FileError> {
        match self.store.objects.read(&body.object) {
            Ok(bytes) if bytes.len() as u64 == body.size && bytes[..HEADER_LEN] == body.header => {
                self.store_pyc(
                    target,
                    self.slot(target),
                    &bytes[HEADER_LEN..],
                    false,
                    false,
                )
                .map(Some)
            }
            Ok(_) => {
                self.progress.warn(&format!(
                    "store object {:?} does not match its index entry; recompiling `{}`",
                    body.object,
                    target.source.path.display()
                ));
                Ok(None)
            }
            Err(e) => {
                self.progress.warn(&format!(
                    "{e}; recompiling `{}`",
                    target.source.path.display()
                ));
                Ok(None)
            }
        }
    }

    /// Says that `target`'s source does not compile: `message` is what
    /// its interpreter said.
    pub(super) fn rejected(&self, target: &Target, message: &str) -> FileError {
        let cause = Cause::Rejected {
            cache_tag: self.interpreters[target.interpreter].cache_tag.clone(),
            message: message.to_owned(),
        };
        FileError::new(&target.source.path, Op::Compile, cause)
    }

    /// What is at the pyc's name now, against the object to place there:
    /// its very inode where a hardlink is allowed, or the same header and
    /// size (for one source and flavor only the body could differ, and a body
    /// of the same size compiled from the same source is the same code) no
    /// more readable than the source and sharing no inode it should not.
    /// Anything else there (stale, truncated, another flavor, a symlink, a
    /// hardlink where none may be) is replaced by the store's known-good
    /// object.
    fn existing(
        &self,
        dir: Option<BorrowedFd<'_>>,
        name: &OsStr,
        entry: &Entry,
        object: Option<Checked>,
        access: &Access,
    ) -> Existing {
        let Some(dir) = dir else {
            return Existing::Other;
        };
        let Ok(st) = rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) else {
            return Existing::Other;
        };
        if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile {
            return Existing::Other;
        }
        if let Some(object) = object {
            if (st.st_dev, st.st_ino) == (object.dev, object.ino) {
                return if access.hardlink && object.mode == access.mode {
                    Existing::Ours
                } else {
                    Existing::Other
                };
            }
        }
        let flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC;
        let Ok(fd) = rustix::fs::openat(dir, name, flags, Mode::empty()) else {
            return Existing::Other;
        };
        let mut header = [0u8; HEADER_LEN];
        if std::fs::File::from(fd).read_exact(&mut header).is_err() {
            return Existing::Other;
        }
        if header[..4] == entry.header[..4]
            && header[4..8] != entry.header[4..8]
            && matches!(
                u32::from_le_bytes([header[4], header[5], header[6], header[7]]),
                0 | 1 | 3
            )
        {
            return Existing::OtherMode;
        }
        // An inode shared with other names that is not the object: an
        // object's old inode where no hardlink may be, or one whose owner or
        // mode changed (a `chown -R` of another tree holding it).
        let shared_badly = st.st_nlink > 1
            && (!access.hardlink
                || !self.domain.object_ok(&st)
                || st.st_mode & 0o7777 != PUBLIC_MODE);
        if header == entry.header
            && st.st_size as u64 == entry.size
            && st.st_mode & 0o444 & !access.mode == 0
            && !shared_badly
        {
            return Existing::Identical;
        }
        Existing::Other
    }

    /// Remembers that the pyc of `target` is the store's object (its very
    /// inode, when `inode` says which).
    /// With the inode goes the entry's key, so that the next run can tell
    /// from the record alone that the pyc is the one it wants.
    fn record_link(&self, target: &Target, entry: &Entry, inode: Option<(u64, u64)>) {
        self.write_link_record(target, entry, inode, true);
    }

    /// [`Run::record_link`] of a pyc found in place, recorded again for this
    /// entries epoch and key: not a use of its object (which would move it
    /// in `gc`'s order).
    fn rerecord_link(&self, target: &Target, entry: &Entry, inode: Option<(u64, u64)>) {
        self.write_link_record(target, entry, inode, false);
    }

    fn write_link_record(
        &self,
        target: &Target,
        entry: &Entry,
        inode: Option<(u64, u64)>,
        used: bool,
    ) {
        let trusted = self.interpreters[target.interpreter].key_domain.is_none();
        let placed = inode.map(|inode| Placed {
            inode,
            epoch: self.entries_epoch,
            key: &target.key,
            slot: self.slot(target),
        });
        self.ledger
            .record_link(&target.pyc, entry, trusted, placed, used);
    }

    /// Writes the object for `target` with `body` and records its entries.
    pub(super) fn store_pyc(
        &self,
        target: &Target,
        slot: EntrySlot,
        body: &[u8],
        new_body: bool,
        body_checked: bool,
    ) -> Result<Entry, FileError> {
        let interpreter = &self.interpreters[target.interpreter];
        let input = target
            .source
            .header_input(interpreter, self.options.flavor)?;
        let header = pyc::header(interpreter.magic, self.options.flavor, input);
        let mut bytes = Vec::with_capacity(HEADER_LEN + body.len());
        bytes.extend_from_slice(&header);
        bytes.extend_from_slice(body);
        if new_body && !body_checked {
            // What a compile worker answered must be one loadable code object.
            match crate::marshal::check_pyc(&bytes) {
                Err(e) if e.is_damage() => {
                    let cause = Cause::Unloadable(e);
                    return Err(FileError::new(&target.source.path, Op::Compile, cause));
                }
                _ => {}
            }
        }
        let mode = resolve::object_mode(&self.store.objects, target.source.meta.mode);
        let object = self
            .store
            .objects
            .put_mode(&bytes, mode)
            .map_err(|e| FileError::new(&target.source.path, Op::Store, e))?;
        let entry = Entry {
            object,
            size: bytes.len() as u64,
            header,
        };
        self.ledger.entry(&target.key, slot, &entry, new_body);
        Ok(entry)
    }

    /// Stores a pyc a remote gave (checked, see [`crate::remote`]) for
    /// `target` as it is when it is the pyc this run makes (checked-hash
    /// pycs, the default: its header is then the one
    /// [`Run::store_pyc`] would make, and its blake3 is known), else its
    /// body as [`Run::store_pyc`] does.
    pub(super) fn store_fetched(
        &self,
        target: &Target,
        slot: EntrySlot,
        fetched: &crate::remote::Accepted,
    ) -> Result<Entry, FileError> {
        // `accept` checked the magic number and the source hash; the flags
        // decide the rest of the header.
        let header: [u8; HEADER_LEN] = fetched.pyc[..HEADER_LEN].try_into().expect("a header");
        let checked_hash = header[4..8] == [3, 0, 0, 0];
        if self.options.flavor != Flavor::CheckedHash || !checked_hash {
            return self.store_pyc(target, slot, fetched.body(), true, true);
        }
        let mode = resolve::object_mode(&self.store.objects, target.source.meta.mode);
        self.store
            .objects
            .put_hashed(&fetched.object, &fetched.pyc, mode)
            .map_err(|e| FileError::new(&target.source.path, Op::Store, e))?;
        let entry = Entry {
            object: fetched.object,
            size: fetched.pyc.len() as u64,
            header,
        };
        self.ledger.entry(&target.key, slot, &entry, true);
        Ok(entry)
    }

    /// Leaves the destination alone when it already holds the object, else
    /// places the object there.
    pub(super) fn settle(
        &self,
        target: &Target,
        entry: &Entry,
        object: Option<Checked>,
        how: Settled,
    ) -> Result<(), FileError> {
        let path = &target.source.path;
        let mut access = self.domain.access(&target.source);
        let pycache = target
            .source
            .dir
            .pycache(!self.options.dry_run)
            .map_err(|e| e.at(path))?;
        let dir = pycache.fd.as_ref().map(AsFd::as_fd);
        let Some(name) = target.pyc.file_name() else {
            return Err(FileError::new(path, Op::Place, Cause::NotAModuleName));
        };
        let object = object.or_else(|| self.identity(&entry.object));
        // In a group store, an object another member wrote is theirs: they
        // could make it writable again and change, through it, every pyc
        // hard linked to it. Root is not held back by the kernel's
        // protected_hardlinks, which keeps the other members from linking
        // it: it is copied (or reflinked) here too.
        if access.hardlink && object.is_some_and(|o| self.domain.foreign(o.uid)) {
            access.hardlink = false;
            if !self.warned_foreign.swap(true, Ordering::Relaxed) {
                self.progress.warn(&format!(
                    "copying pycs into `{}`: in a store shared with a group, only the objects \
                     this user wrote are hard linked; other members could change the pycs \
                     linked from theirs",
                    target.source.dir.path.display()
                ));
            }
        }
        // A `__pycache__` this run made held nothing: no need to look.
        let existing = if pycache.made {
            Existing::Other
        } else {
            self.existing(dir, name, entry, object, &access)
        };
        match existing {
            Existing::Ours => {
                // A record from before inodes were recorded, or of an
                // object's earlier inode: the next run needs one stat.
                let inode = object.map(|o| (o.dev, o.ino));
                let recorded = target.recorded.as_ref().and_then(|r| r.inode);
                if inode.is_some() && (recorded != inode || !self.recorded_for_key(target)) {
                    self.record_link(target, entry, inode);
                }
                self.ledger.settled(|s| s.up_to_date += 1);
                return Ok(());
            }
            // The same bytes, put there by another tool (uv, `compileall
            // --invalidation-mode checked-hash`) or copied by an earlier run:
            // kept, and remembered as linked from the store.
            Existing::Identical => {
                self.record_link(target, entry, None);
                self.ledger.tally(target.interpreter, |c| match how {
                    Settled::Compiled | Settled::Fetched => c.misses += 1,
                    Settled::Hit => c.hits += 1,
                });
                self.ledger.settled(|s| match how {
                    Settled::Compiled => s.compiled += 1,
                    Settled::Fetched => s.fetched += 1,
                    Settled::Hit => s.up_to_date += 1,
                });
                return Ok(());
            }
            Existing::OtherMode => self.ledger.count(|s| s.replaced_other_mode += 1),
            Existing::Other => {}
        }
        if self.options.dry_run {
            self.ledger.settled(|s| s.hits += 1);
            return Ok(());
        }
        let pycache_path = || target.source.dir.path.join("__pycache__");
        let Some(dir) = dir else {
            let op = Op::OpenPycache(pycache_path());
            return Err(FileError::new(path, op, Cause::Unopened));
        };
        if pycache.first {
            self.ledger.created_dir(&pycache_path());
        }
        // A private object now wanted by a source every user may read: its
        // bytes are public, give it the public mode before sharing its inode.
        let object = if access.hardlink && object.is_some_and(|o| o.mode != PUBLIC_MODE) {
            let _ = self.store.objects.reset(&entry.object, PUBLIC_MODE);
            self.identity(&entry.object)
        } else {
            object
        };
        let dest = Destination {
            dir,
            name,
            path: &target.pyc,
            dev: target.source.dir.dev,
            access,
        };
        let mode = self
            .materializer
            .place(&entry.object, &dest)
            .map_err(|e| FileError::new(path, Op::Place, e))?;
        let inode = object
            .filter(|_| mode == LinkMode::Hardlink)
            .map(|o| (o.dev, o.ino));
        self.record_link(target, entry, inode);
        self.ledger.tally(target.interpreter, |c| match how {
            Settled::Compiled | Settled::Fetched => c.misses += 1,
            Settled::Hit => c.hits += 1,
        });
        self.ledger.settled(|s| {
            match how {
                Settled::Compiled => s.compiled += 1,
                Settled::Fetched => s.fetched += 1,
                Settled::Hit => s.hits += 1,
            }
            if mode.shares_blocks() {
                s.bytes_shared += entry.size;
            } else {
                s.bytes_copied += entry.size;
            }
        });
        Ok(())
    }
}

/// What is at a pyc's name before placing (see [`Run::existing`]).
enum Existing {
    /// The object itself (its inode, where a hardlink is allowed).
    Ours,
    /// The object's bytes, in a file of its own.
    Identical,
    /// A pyc of this interpreter in another invalidation mode: someone may
    /// have made it so on purpose; replaced, and said.
    OtherMode,
    /// Nothing, or anything else.
    Other,
}
