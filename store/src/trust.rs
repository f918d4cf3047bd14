//! Who may use a store. Whoever can write the store can run code in every
//! environment linked from it, so a store is private to its owner (mode
//! 0700) unless it was created shared with a group (mode 2770, owned by the
//! group, with a `SHARED-GROUP` file naming it). A store owned by another
//! user is refused unless it is shared with a group the caller belongs to.
//!
//! Everything inside a store belongs to its [`Owner`]: the owning user of a
//! private store, the group of a group store (each member owns what they
//! wrote). A bucket (`objects-v1`, `tmp`, `index-v2`, the lock files) that
//! is a symlink or belongs to someone else makes opening the store fail:
//! its owner could change the pycs of every environment linked from it.

use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use rustix::fs::{FileType, Mode, OFlags};

use crate::util::{with_path, PathContext};
use crate::{Error, Result};

/// The marker of a group-shared store, holding the group's name.
pub const SHARED_MARKER: &str = "SHARED-GROUP";

/// Whom the files of a store must belong to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Owner {
    /// A private store: everything belongs to this user id.
    User(u32),
    /// A store shared with a group: everything belongs to this group id,
    /// whichever member wrote it.
    Group(u32),
}

impl Owner {
    /// The owner of a store this process creates or uses privately.
    pub fn current_user() -> Owner {
        Owner::User(euid())
    }

    /// Whether a file with this owner and group belongs to the store.
    pub fn owns(&self, uid: u32, gid: u32) -> bool {
        match *self {
            Owner::User(owner) => uid == owner,
            Owner::Group(group) => gid == group,
        }
    }

    /// The mode of the store's directories: 0700, or 2770 for a group.
    pub fn dir_mode(&self) -> u32 {
        match self {
            Owner::User(_) => 0o700,
            Owner::Group(_) => 0o2770,
        }
    }

    /// The mode of the store's lock files: 0600, or 0660 for a group.
    pub fn file_mode(&self) -> u32 {
        match self {
            Owner::User(_) => 0o600,
            Owner::Group(_) => 0o660,
        }
    }

    /// "user id N" or "group id N", for messages.
    pub fn describe(&self) -> String {
        match self {
            Owner::User(uid) => format!("user id {uid}"),
            Owner::Group(gid) => format!("group id {gid}"),
        }
    }
}

/// Whether the store at `root` was created shared with a group.
pub fn is_shared(root: &Path) -> bool {
    std::fs::symlink_metadata(root.join(SHARED_MARKER)).is_ok_and(|m| m.is_file())
}

/// Makes a freshly created store directory belong to `group`, mode 2770.
pub fn share(root: &Path, group: &str) -> Result<()> {
    let gid = group_id(group).ok_or_else(|| Error::Untrusted {
        path: root.to_path_buf(),
        reason: format!("no such group `{group}`"),
    })?;
    std::os::unix::fs::chown(root, None, Some(gid)).at("change the group of", root)?;
    std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o2770))
        .at("set permissions of", root)?;
    let marker = root.join(SHARED_MARKER);
    std::fs::write(&marker, format!("{group}\n")).at("write", &marker)?;
    // Every member reads it, whatever the creator's umask.
    std::fs::set_permissions(&marker, std::fs::Permissions::from_mode(0o644))
        .at("set permissions of", &marker)?;
    Ok(())
}

/// Refuses a store the caller should not trust (or that does not trust the
/// caller): owned by someone else and not shared with one of their groups,
/// or writable by others. Returns whom its files must belong to.
pub fn check(root: &Path) -> Result<Owner> {
    let meta = std::fs::metadata(root).at("stat", root)?;
    let refuse = |reason: String| {
        Err(Error::Untrusted {
            path: root.to_path_buf(),
            reason,
        })
    };
    if meta.mode() & 0o002 != 0 {
        return refuse("it is writable by every user; `chmod o-w` it".into());
    }
    let uid = euid();
    let shared = is_shared(root) && meta.mode() & 0o070 == 0o070;
    if shared && (meta.uid() == uid || in_group(meta.gid())) {
        return Ok(Owner::Group(meta.gid()));
    }
    if meta.uid() == uid {
        return Ok(Owner::User(uid));
    }
    refuse(format!(
        "it belongs to user id {} and was not created shared with one of your groups \
         (create stores to share with `--shared-group GROUP`), or use a store of your own with `--store`",
        meta.uid()
    ))
}

const SYMLINK: &str = "is a symlink: a store keeps its data inside its own directory, never \
     behind a symlink someone could point elsewhere; remove the symlink (pycstore recreates \
     the bucket), or point `--store` at the real store";

/// What a bucket of the store should be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bucket {
    /// A directory (`objects-v1`, `tmp`, `index-v2`).
    Dir,
    /// A regular file (the lock files).
    File,
}

/// Refuses a bucket of the store at `root` that is a symlink, writable by
/// every user, or owned by someone other than `owner`. A missing bucket is
/// fine: the store creates it; one of the wrong type is for its user to
/// report (an index that is a file is set aside by `verify --repair`).
/// Opens it with `O_NOFOLLOW`, so no symlink is ever followed to decide.
pub fn check_bucket(root: &Path, name: &str, kind: Bucket, owner: Owner) -> Result<()> {
    open_bucket(root, name, kind, owner).map(drop)
}

/// [`check_bucket`], giving the bucket's descriptor (none when it is
/// missing): what is read through it is what was checked, whatever its
/// name is swapped for since.
pub(crate) fn open_bucket(
    root: &Path,
    name: &str,
    kind: Bucket,
    owner: Owner,
) -> Result<Option<OwnedFd>> {
    let path = root.join(name);
    let refuse = |what: String| {
        Err(Error::Untrusted {
            path: root.to_path_buf(),
            reason: format!("`{}` {what}", path.display()),
        })
    };
    let flags = OFlags::NOFOLLOW
        | OFlags::CLOEXEC
        | match kind {
            Bucket::Dir => OFlags::DIRECTORY | OFlags::RDONLY,
            Bucket::File => OFlags::PATH,
        };
    let opened = match rustix::fs::open(&path, flags, Mode::empty()) {
        // O_NOFOLLOW | O_DIRECTORY says ENOTDIR for a symlink to a
        // directory, and for anything else not a directory: look at it.
        Err(rustix::io::Errno::NOTDIR) => rustix::fs::open(
            &path,
            OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        ),
        other => other,
    };
    let fd: OwnedFd = match opened {
        Ok(fd) => fd,
        Err(rustix::io::Errno::NOENT) => return Ok(None),
        Err(rustix::io::Errno::LOOP) => return refuse(SYMLINK.into()),
        Err(e) => return Err(with_path(e.into(), "open", &path).into()),
    };
    let stat = rustix::fs::fstat(fd.as_fd()).at("stat", &path)?;
    if FileType::from_raw_mode(stat.st_mode) == FileType::Symlink {
        return refuse(SYMLINK.into());
    }
    if !owner.owns(stat.st_uid, stat.st_gid) {
        return refuse(format!(
            "belongs to user id {} and group id {}, not to the store's owner ({}): whoever \
             owns it can change the pycs of every environment linked from the store. Remove \
             it (pycstore recreates it; `pycstore verify` then checks the rest), or give it \
             back with `chown`",
            stat.st_uid,
            stat.st_gid,
            owner.describe()
        ));
    }
    if stat.st_mode & 0o002 != 0 {
        return refuse("is writable by every user; `chmod o-w` it".into());
    }
    Ok(Some(fd))
}

/// The effective user id of this process.
pub fn euid() -> u32 {
    rustix::process::geteuid().as_raw()
}

/// Whether this process is in the group `gid`: its effective group, or one
/// of its supplementary groups.
fn in_group(gid: u32) -> bool {
    rustix::process::getegid().as_raw() == gid
        || rustix::process::getgroups().is_ok_and(|groups| groups.iter().any(|g| g.as_raw() == gid))
}

/// The id of a group given by name or number. By name through `nix`, which
/// calls the reentrant `getgrnam_r` (a store opens from many threads of a
/// FUSE server).
fn group_id(name: &str) -> Option<u32> {
    if let Ok(gid) = name.parse::<u32>() {
        return Some(gid);
    }
    match nix::unistd::Group::from_name(name) {
        Ok(group) => group.map(|g| g.gid.as_raw()),
        Err(e) => {
            tracing::debug!("cannot look up the group `{name}`: {e}");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_resolve_by_name_and_number() {
        assert_eq!(group_id("root"), Some(0));
        assert_eq!(group_id("0"), Some(0));
        assert_eq!(group_id("no-such-group-pycstore"), None);
        assert_eq!(group_id("bad\0name"), None);
    }
}
