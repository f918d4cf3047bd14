//! Who may use a store. Whoever can write the store can run code in every
//! environment linked from it, so a store is private to its owner (mode
//! 0700) unless it was created shared with a group (mode 2770, owned by the
//! group, with a `SHARED-GROUP` file naming it). A store owned by another
//! user is refused unless it is shared with a group the caller belongs to.

use std::ffi::CString;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use crate::{Error, Result};

/// The marker of a group-shared store, holding the group's name.
pub const SHARED_MARKER: &str = "SHARED-GROUP";

/// Whether the store at `root` was created shared with a group.
pub fn is_shared(root: &Path) -> bool {
    root.join(SHARED_MARKER).exists()
}

/// Makes a freshly created store directory belong to `group`, mode 2770.
pub fn share(root: &Path, group: &str) -> Result<()> {
    let gid = group_id(group).ok_or_else(|| Error::Untrusted {
        path: root.to_path_buf(),
        reason: format!("no such group `{group}`"),
    })?;
    std::os::unix::fs::chown(root, None, Some(gid))
        .map_err(|e| io(e, "change the group of", root))?;
    std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o2770))
        .map_err(|e| io(e, "set permissions of", root))?;
    std::fs::write(root.join(SHARED_MARKER), format!("{group}\n"))
        .map_err(|e| io(e, "write", &root.join(SHARED_MARKER)))?;
    Ok(())
}

/// Refuses a store the caller should not trust (or that does not trust the
/// caller): owned by someone else and not shared with one of their groups,
/// or writable by others.
pub fn check(root: &Path) -> Result<()> {
    let meta = std::fs::metadata(root).map_err(|e| io(e, "stat", root))?;
    let refuse = |reason: String| {
        Err(Error::Untrusted {
            path: root.to_path_buf(),
            reason,
        })
    };
    if meta.mode() & 0o002 != 0 {
        return refuse("it is writable by every user; `chmod o-w` it".into());
    }
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    if meta.uid() == uid {
        return Ok(());
    }
    if is_shared(root) && meta.mode() & 0o070 == 0o070 && in_group(meta.gid()) {
        return Ok(());
    }
    refuse(format!(
        "it belongs to user id {} and was not created shared with one of your groups \
         (create stores to share with `--shared-group GROUP`), or use a store of your own with `--store`",
        meta.uid()
    ))
}

fn in_group(gid: u32) -> bool {
    // SAFETY: getegid has no preconditions; getgroups writes at most `n` ids.
    unsafe {
        if libc::getegid() == gid {
            return true;
        }
        let n = libc::getgroups(0, std::ptr::null_mut());
        if n <= 0 {
            return false;
        }
        let mut groups = vec![0 as libc::gid_t; n as usize];
        let n = libc::getgroups(n, groups.as_mut_ptr());
        n > 0 && groups[..n as usize].contains(&gid)
    }
}

fn group_id(name: &str) -> Option<u32> {
    if let Ok(gid) = name.parse::<u32>() {
        return Some(gid);
    }
    let cname = CString::new(name).ok()?;
    // SAFETY: getgrnam takes a NUL-terminated string and returns a pointer
    // to static storage or null; we read one field before any other call.
    unsafe {
        let group = libc::getgrnam(cname.as_ptr());
        (!group.is_null()).then(|| (*group).gr_gid)
    }
}

fn io(err: std::io::Error, action: &str, path: &Path) -> Error {
    Error::Io(crate::objects::with_path(err, action, path))
}
