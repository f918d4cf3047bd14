//! Objects: complete pyc files named by the blake3 of their bytes, written
//! once by temp-name + rename and never modified. Identical pycs (optimize
//! levels that compile alike, the thousands of empty `__init__.py`) are one
//! object.

use std::fmt;
use std::io::{self, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use fs_err as fs;

/// The mode of an object compiled from a source every user may read.
pub const PUBLIC_MODE: u32 = 0o444;

/// The mode of an object compiled from a source some users may not read:
/// in a group-shared store, other members cannot read it either.
pub const PRIVATE_MODE: u32 = 0o400;

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

    /// Stores `bytes` readable by everyone ([`PUBLIC_MODE`]) and returns
    /// their id. Bytes already present are not written again; a damaged file
    /// under their name is replaced.
    pub fn put(&self, bytes: &[u8]) -> io::Result<ObjectId> {
        self.put_mode(bytes, PUBLIC_MODE)
    }

    /// As [`Objects::put`], a new object getting `mode`: [`PRIVATE_MODE`]
    /// for the pyc of a source not every user may read.
    pub fn put_mode(&self, bytes: &[u8], mode: u32) -> io::Result<ObjectId> {
        let id = ObjectId::of(bytes);
        if !self.holds(&id) {
            self.adopt(&id, self.write_temp_mode(bytes, mode)?)?;
        }
        Ok(id)
    }

    /// Gives the object `id` a fresh inode with `mode`, owned by the caller,
    /// after checking its bytes still hash to its name: for an object whose
    /// metadata changed (a `chown -R` through a hardlink), or a private object
    /// now also wanted by a public source. `Ok(false)` when the bytes do not
    /// match: the object is damaged, not to be placed.
    pub fn reset(&self, id: &ObjectId, mode: u32) -> io::Result<bool> {
        let path = self.path(id);
        let bytes = fs::read(&path)?;
        if ObjectId::of(&bytes) != *id {
            return Ok(false);
        }
        write_atomic(&self.tmp, &path, &bytes, mode)?;
        Ok(true)
    }

    /// Whether the object `id` is present with bytes that hash to its name.
    fn holds(&self, id: &ObjectId) -> bool {
        fs::read(self.path(id)).is_ok_and(|bytes| ObjectId::of(&bytes) == *id)
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

    /// Gives an object a fresh inode with the same bytes, for when its link
    /// count reached the filesystem's limit (EMLINK). Existing links keep the
    /// old inode; new links go to the new one.
    pub fn refresh_inode(&self, id: &ObjectId) -> io::Result<()> {
        let path = self.path(id);
        let file = fs::File::open(&path)?;
        let mode = match file.metadata()?.permissions().mode() & 0o777 {
            PRIVATE_MODE => PRIVATE_MODE,
            _ => PUBLIC_MODE,
        };
        let bytes = fs::read(&path)?;
        write_atomic(&self.tmp, &path, &bytes, mode)
    }

    /// Whether the object `id` is present with `size` bytes (one `stat`).
    pub fn contains(&self, id: &ObjectId, size: u64) -> bool {
        std::fs::symlink_metadata(self.path(id)).is_ok_and(|m| m.is_file() && m.len() == size)
    }

    /// Writes an object's bytes (which the caller has checked against its
    /// id) to a read-only temp file in the store's scratch space, for
    /// [`Objects::adopt`] to move into place later. Dropped instead, the
    /// temp file is removed.
    pub fn write_temp(&self, bytes: &[u8]) -> io::Result<tempfile::TempPath> {
        self.write_temp_mode(bytes, PUBLIC_MODE)
    }

    /// As [`Objects::write_temp`], with `mode`.
    pub fn write_temp_mode(&self, bytes: &[u8], mode: u32) -> io::Result<tempfile::TempPath> {
        let mut tmp = tempfile::Builder::new()
            .prefix(".pycstore-")
            .suffix(".tmp")
            .tempfile_in(&self.tmp)
            .map_err(|e| with_path(e, "create a temp file in", &self.tmp))?;
        tmp.write_all(bytes)
            .map_err(|e| with_path(e, "write", tmp.path()))?;
        tmp.as_file()
            .set_permissions(std::fs::Permissions::from_mode(mode))
            .map_err(|e| with_path(e, "set permissions of", tmp.path()))?;
        Ok(tmp.into_temp_path())
    }

    /// Moves a temp file from [`Objects::write_temp`] into place as the
    /// object `id`. A good object already there is kept, never renamed over:
    /// link(2) fails with ENOENT on an inode whose name was replaced after
    /// the lookup, so another process hard linking it would fail. A damaged
    /// one is replaced.
    pub fn adopt(&self, id: &ObjectId, temp: tempfile::TempPath) -> io::Result<()> {
        let path = self.path(id);
        if let Some(shard) = path.parent() {
            fs::create_dir_all(shard)?;
        }
        let temp = match temp.persist_noclobber(&path) {
            Ok(()) => return Ok(()),
            Err(e) if e.error.kind() == io::ErrorKind::AlreadyExists => e.path,
            Err(e) => return Err(with_path(e.error, "rename a temp file to", &path)),
        };
        if self.holds(id) {
            return Ok(());
        }
        temp.persist(&path)
            .map_err(|e| with_path(e.error, "rename a temp file to", &path))
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

    #[test]
    fn adopt_keeps_a_good_object_and_replaces_a_damaged_one() {
        let dir = tempfile::tempdir().unwrap();
        let tmp = dir.path().join("tmp");
        std::fs::create_dir(&tmp).unwrap();
        let objects = Objects::new(dir.path().join("objects"), tmp);
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
        let dir = tempfile::tempdir().unwrap();
        let tmp = dir.path().join("tmp");
        std::fs::create_dir(&tmp).unwrap();
        let objects = Objects::new(dir.path().join("objects"), tmp);
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
