//! Objects: complete pyc files named by the blake3 of their bytes, written
//! once by temp-name + rename and never modified. Identical pycs (optimize
//! levels that compile alike, the thousands of empty `__init__.py`) are one
//! object.

use std::fmt;
use std::io::{self, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use fs_err as fs;

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
}

impl fmt::Debug for ObjectId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex()[..16])
    }
}

/// The objects bucket of a store.
pub struct Objects {
    dir: PathBuf,
    tmp: PathBuf,
}

impl Objects {
    pub(crate) fn new(dir: PathBuf, tmp: PathBuf) -> Self {
        Objects { dir, tmp }
    }

    /// Where the object `id` lives (whether or not it exists).
    pub fn path(&self, id: &ObjectId) -> PathBuf {
        let hex = id.to_hex();
        self.dir.join(&hex[..2]).join(&hex[2..])
    }

    /// Stores `bytes` and returns their id. Storing bytes that are already
    /// present costs one `stat`.
    pub fn put(&self, bytes: &[u8]) -> io::Result<ObjectId> {
        let id = ObjectId::of(bytes);
        let path = self.path(&id);
        if std::fs::symlink_metadata(&path).is_ok_and(|m| m.len() == bytes.len() as u64) {
            return Ok(id);
        }
        if let Some(shard) = path.parent() {
            fs::create_dir_all(shard)?;
        }
        write_atomic(&self.tmp, &path, bytes, 0o444)?;
        Ok(id)
    }

    /// Reads a whole object.
    pub fn read(&self, id: &ObjectId) -> io::Result<Vec<u8>> {
        fs::read(self.path(id))
    }

    /// Gives an object a fresh inode with the same bytes, for when its link
    /// count reached the filesystem's limit (EMLINK). Existing links keep the
    /// old inode; new links go to the new one.
    pub fn refresh_inode(&self, id: &ObjectId) -> io::Result<()> {
        let path = self.path(id);
        let bytes = fs::read(&path)?;
        write_atomic(&self.tmp, &path, &bytes, 0o444)
    }
}

/// Writes `bytes` to a temp file in `tmp_dir` and renames it to `dest`, so a
/// reader sees either nothing or the whole file.
pub(crate) fn write_atomic(tmp_dir: &Path, dest: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    let mut tmp = tempfile::Builder::new()
        .prefix(".pycstore-")
        .suffix(".tmp")
        .tempfile_in(tmp_dir)?;
    tmp.write_all(bytes)
        .map_err(|e| with_path(e, "write", tmp.path()))?;
    tmp.as_file()
        .set_permissions(std::fs::Permissions::from_mode(mode))
        .map_err(|e| with_path(e, "set permissions of", tmp.path()))?;
    tmp.persist(dest)
        .map_err(|e| with_path(e.error, "rename a temp file to", dest))?;
    Ok(())
}

pub(crate) fn with_path(err: io::Error, action: &str, path: &Path) -> io::Error {
    io::Error::new(
        err.kind(),
        format!("failed to {action} `{}`: {err}", path.display()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn put_dedups_and_is_read_only() {
        let dir = tempfile::tempdir().unwrap();
        let tmp = dir.path().join("tmp");
        std::fs::create_dir(&tmp).unwrap();
        let objects = Objects::new(dir.path().join("objects"), tmp);
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
}
