//! What a remote holds, and how every byte of it is checked on the way in.
//!
//! A remote is plain storage (an S3 bucket, Redis, a WebDAV/HTTP cache, a
//! directory) that pycstore reads and writes by name. Its layout is
//! versioned, content-addressed and namespaced:
//!
//! ```text
//! ROOT/                          the URL's path (s3://BUCKET/ROOT, http://HOST/ROOT,
//! │                              file:///ROOT); for Redis, a prefix of every key
//! └── pycstore-v1/
//!     └── NAMESPACE/             --remote-namespace (default `default`): projects or
//!         │                      Python fleets sharing a bucket keep apart
//!         ├── objects/3f/3f9a0c…  zstd(pyc), named by the blake3 of the pyc: pycs
//!         │                      too large to travel inside their entry
//!         ├── entries/b2/b21e47…  named by the compile key: which object, signed,
//!         │                      and the object itself when it is small
//!         └── bundles/7c/7c05d1…  the entries of a run of directories' pycs, in
//!                                one record: named by the blake3 of their keys
//! ```
//!
//! An object is one complete pyc in the checked-hash flavor (its header
//! carries the source hash), whatever flavor the writer linked: every
//! reader can check it against its own copy of the source, and derives the
//! flavor it wants from the body. An entry is binary:
//!
//! ```text
//! "pycstore-entry-v1\n"   18 bytes
//! compile key             32
//! object id               32   blake3 of the uncompressed pyc
//! size                    u64 le, of the uncompressed pyc
//! header                  16   the pyc's first 16 bytes
//! inline object           u32 le length (0: none), then zstd(pyc): the object
//!                              itself when compressed to at most 64 KiB, so one
//!                              request fetches a pyc (checked like any object)
//! signatures              u8 count, then per signature:
//!                         u8 name length, key name (UTF-8), ed25519 signature (64)
//! ```
//!
//! A bundle saves a request per source where whole directories are
//! missed (an empty store, a CI runner). `link` cuts the directories it
//! walks, in walk order, into runs ([`super::Bundler`]: cut after a
//! directory whose own keys hash to 1 value in 8, so every machine walking
//! the same files cuts in the same places, and one changed directory moves
//! no cut but its own) and names each run's bundle after the compile keys
//! of all its pycs (sorted, each once), hits included. It asks for that
//! bundle before asking for each miss by its own name, and writes one where
//! it found none and compiled or fetched pycs of the run. It is only a
//! container:
//!
//! ```text
//! "pycstore-bundle-v1\n"  19 bytes
//! count                   u32 le
//! per entry:              u32 le length, then an entry as above
//! ```
//!
//! Each entry in it is checked as if fetched under its own name (key,
//! signatures, object, header, then the local source): a bundle can only
//! answer keys the reader asked for, and one that does not check out costs
//! the reader the per-key requests it saved, nothing more.
//!
//! Every record has a largest valid size, and a reader stops reading past
//! it (the record is then rejected, like any that does not check out): an
//! entry at [`ENTRY_MAX`] (the fixed part, a 64 KiB inline object, four
//! signatures with 255-byte key names), a bundle at [`BUNDLE_MAX`] (8 MiB:
//! a writer leaves out the entries past it, and readers fetch those by
//! name), an object stored apart at [`object_limit`] of its entry's size
//! (zstd's bound for a pyc of that size, at most 64 MiB). An empty record
//! is none; something else than a file under a record's name (a Redis
//! list, a directory, a FIFO or a symlink in a file remote) is rejected. A bundle gives at most
//! [`BUNDLE_PYCS_MAX`] of pycs; the rest of its keys are fetched by name.
//!
//! A signature is over `"pycstore remote entry v1\0" ‖ NAMESPACE ‖ "\0" ‖
//! key ‖ object ‖ size ‖ header`: the writer vouches that this object is
//! what compiling the key gives. Objects are written before the entries
//! naming them, and every write is a whole-file `PUT`/`SET`/rename, so an
//! upload cut off halfway leaves at most an object no entry names, or
//! nothing; a reader rejects any entry or object that does not check out
//! (see [`decode_entry`], [`decode_object`], and
//! [`super::Remotes::accept`] for the checks against the local source).

use std::cell::RefCell;
use std::collections::HashMap;

use ed25519_dalek::{Signature, Signer, SigningKey, Verifier};

use super::keys::TrustedKeys;
use crate::key::CompileKey;
use crate::objects::ObjectId;
use crate::pyc::HEADER_LEN;

/// The version directory of the layout.
pub const LAYOUT_DIR: &str = "pycstore-v1";

const ENTRY_MAGIC: &[u8; 18] = b"pycstore-entry-v1\n";
const SIGNED_CONTEXT: &[u8] = b"pycstore remote entry v1\0";
const BUNDLE_MAGIC: &[u8; 19] = b"pycstore-bundle-v1\n";
const BUNDLE_CONTEXT: &[u8] = b"pycstore remote bundle v1\0";
const ENTRY_FIXED: usize = 18 + 32 + 32 + 8 + HEADER_LEN;

/// The largest pyc taken from a remote (as for packs).
pub const MAX_OBJECT: u64 = 64 << 20;

/// The most signatures an entry may carry.
pub const MAX_SIGNATURES: u8 = 4;

/// The largest compressed object carried inside its entry.
pub const INLINE_MAX: usize = 64 << 10;

/// The largest entry: the fixed part, the largest inline object and the
/// most signatures, each with the longest name. A read stops past it.
pub const ENTRY_MAX: usize =
    ENTRY_FIXED + 4 + INLINE_MAX + 1 + MAX_SIGNATURES as usize * (1 + 255 + 64);

/// The largest bundle: a writer leaves out the entries past it (they are
/// fetched by their own names), a read stops past it.
pub const BUNDLE_MAX: usize = 8 << 20;

/// The most bytes of pycs taken from one bundle: past them, the bundle's
/// other entries are fetched by their own names (what a bundle gave is
/// held until the whole bundle is checked).
pub const BUNDLE_PYCS_MAX: u64 = 64 << 20;

/// The largest compressed object for a pyc of `size` bytes: what zstd
/// makes of it at worst. A read of an object stored apart stops past it.
pub fn object_limit(size: u64) -> usize {
    zstd::zstd_safe::compress_bound(size.min(MAX_OBJECT) as usize)
}

/// Where the object `id` lives under `namespace`.
pub fn object_path(namespace: &str, id: &ObjectId) -> String {
    let hex = id.to_hex();
    format!("{LAYOUT_DIR}/{namespace}/objects/{}/{hex}", &hex[..2])
}

/// Where the entry of `key` lives under `namespace`.
pub fn entry_path(namespace: &str, key: &CompileKey) -> String {
    let hex: String = key.0.iter().map(|b| format!("{b:02x}")).collect();
    format!("{LAYOUT_DIR}/{namespace}/entries/{}/{hex}", &hex[..2])
}

/// The name of the bundle of pycs with the compile keys `keys`: the blake3
/// of the keys sorted, each once (`keys` is sorted in place).
pub fn bundle_id(keys: &mut Vec<CompileKey>) -> [u8; 32] {
    keys.sort_unstable_by_key(|k| k.0);
    keys.dedup();
    let mut hasher = blake3::Hasher::new();
    hasher.update(BUNDLE_CONTEXT);
    for key in keys.iter() {
        hasher.update(&key.0);
    }
    *hasher.finalize().as_bytes()
}

/// Where the bundle `id` lives under `namespace`.
pub fn bundle_path(namespace: &str, id: &[u8; 32]) -> String {
    let hex: String = id.iter().map(|b| format!("{b:02x}")).collect();
    format!("{LAYOUT_DIR}/{namespace}/bundles/{}/{hex}", &hex[..2])
}

/// A bundle of `entries` (each as [`RemoteEntry::encode`] made it), in
/// order, up to [`BUNDLE_MAX`] bytes: the entries past it are left out
/// (readers fetch them by their own names).
pub fn encode_bundle<E: AsRef<[u8]>>(entries: &[E]) -> Vec<u8> {
    let mut v =
        Vec::with_capacity(BUNDLE_MAX.min(
            BUNDLE_MAGIC.len() + 4 + entries.iter().map(|e| 4 + e.as_ref().len()).sum::<usize>(),
        ));
    v.extend_from_slice(BUNDLE_MAGIC);
    v.extend_from_slice(&[0; 4]);
    let mut count = 0u32;
    for entry in entries {
        let entry = entry.as_ref();
        if v.len() + 4 + entry.len() > BUNDLE_MAX {
            continue;
        }
        v.extend_from_slice(&(entry.len() as u32).to_le_bytes());
        v.extend_from_slice(entry);
        count += 1;
    }
    v[BUNDLE_MAGIC.len()..BUNDLE_MAGIC.len() + 4].copy_from_slice(&count.to_le_bytes());
    v
}

/// The entries of a bundle, by the key each names (the first, where a key
/// is named twice): still to be checked one by one by [`decode_entry`].
pub fn decode_bundle(bytes: &[u8]) -> Result<HashMap<CompileKey, &[u8]>, Rejection> {
    let body = bytes
        .strip_prefix(BUNDLE_MAGIC.as_slice())
        .ok_or(Rejection::MalformedBundle)?;
    let (count, mut rest) = body.split_at_checked(4).ok_or(Rejection::MalformedBundle)?;
    let count = u32::from_le_bytes(count.try_into().expect("4 bytes"));
    let mut entries = HashMap::new();
    for _ in 0..count {
        let (len, tail) = rest.split_at_checked(4).ok_or(Rejection::MalformedBundle)?;
        let len = u32::from_le_bytes(len.try_into().expect("4 bytes")) as usize;
        let (entry, tail) = tail
            .split_at_checked(len)
            .ok_or(Rejection::MalformedBundle)?;
        let key = entry
            .get(ENTRY_MAGIC.len()..ENTRY_MAGIC.len() + 32)
            .ok_or(Rejection::MalformedBundle)?;
        let key = CompileKey(key.try_into().expect("32 bytes"));
        entries.entry(key).or_insert(entry);
        rest = tail;
    }
    if !rest.is_empty() {
        return Err(Rejection::MalformedBundle);
    }
    Ok(entries)
}

/// A remote entry: compile key → object.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RemoteEntry {
    /// The compile key it answers.
    pub key: CompileKey,
    /// The object (blake3 of the uncompressed pyc).
    pub object: ObjectId,
    /// The pyc's size.
    pub size: u64,
    /// The pyc's header.
    pub header: [u8; HEADER_LEN],
}

impl RemoteEntry {
    fn signed_message(&self, namespace: &str) -> Vec<u8> {
        let mut m = Vec::with_capacity(SIGNED_CONTEXT.len() + namespace.len() + 1 + 88);
        m.extend_from_slice(SIGNED_CONTEXT);
        m.extend_from_slice(namespace.as_bytes());
        m.push(0);
        m.extend_from_slice(&self.key.0);
        m.extend_from_slice(&self.object.0);
        m.extend_from_slice(&self.size.to_le_bytes());
        m.extend_from_slice(&self.header);
        m
    }

    /// The entry's bytes, carrying the compressed object `inline` when
    /// given, signed with `signer` (name and key) when given.
    pub fn encode(
        &self,
        namespace: &str,
        inline: Option<&[u8]>,
        signer: Option<(&str, &SigningKey)>,
    ) -> Vec<u8> {
        let inline = inline.unwrap_or_default();
        let mut v = Vec::with_capacity(ENTRY_FIXED + 4 + inline.len() + 1 + 1 + 64 + 64);
        v.extend_from_slice(ENTRY_MAGIC);
        v.extend_from_slice(&self.key.0);
        v.extend_from_slice(&self.object.0);
        v.extend_from_slice(&self.size.to_le_bytes());
        v.extend_from_slice(&self.header);
        v.extend_from_slice(&(inline.len() as u32).to_le_bytes());
        v.extend_from_slice(inline);
        match signer {
            None => v.push(0),
            Some((name, key)) => {
                let signature = key.sign(&self.signed_message(namespace));
                v.push(1);
                v.push(name.len() as u8);
                v.extend_from_slice(name.as_bytes());
                v.extend_from_slice(&signature.to_bytes());
            }
        }
        v
    }
}

/// Why something a remote returned is not used.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    /// Not an entry of this format.
    #[error("an entry that is not a pycstore-entry-v1 record")]
    Malformed,
    /// Not a bundle of this format.
    #[error("a bundle that is not a pycstore-bundle-v1 record")]
    MalformedBundle,
    /// The entry answers another key than the one it is stored under.
    #[error("an entry stored under one compile key that names another")]
    WrongKey,
    /// Trusted keys are set and no signature by one of them verifies.
    #[error("an entry {0}")]
    Untrusted(&'static str),
    /// The object does not decompress, or not to the entry's size.
    #[error("an object that does not decompress to its entry's size ({0})")]
    BadObject(String),
    /// The object's blake3 is not its name.
    #[error("an object whose blake3 is not its name")]
    WrongHash,
    /// The object's header is not the entry's.
    #[error("an object whose header is not its entry's")]
    WrongHeader,
    /// The pyc is for another interpreter, or not hash-based.
    #[error("a pyc whose magic number or flags are not those asked for")]
    WrongMagic,
    /// The pyc's source hash is not the local source's.
    #[error("a pyc whose source hash is not that of the local source")]
    WrongSource,
    /// The body is not one loadable code object.
    #[error("a pyc Python cannot load: {0}")]
    Unloadable(String),
    /// More bytes than any valid record of its kind holds: the read was
    /// stopped there.
    #[error("{0} larger than any valid one ({1} bytes at most; reading it was stopped there)")]
    TooLarge(&'static str, usize),
    /// Something else than a record stored under a record's name.
    #[error("{1} where {0} belongs")]
    NotARecord(&'static str, String),
}

/// Decodes an entry fetched under `key`, checking its signatures against
/// `trusted` when any key is trusted; with the compressed object it
/// carries, if any (still to be checked by [`decode_object`]).
pub fn decode_entry<'a>(
    bytes: &'a [u8],
    key: &CompileKey,
    namespace: &str,
    trusted: &TrustedKeys,
) -> Result<(RemoteEntry, Option<&'a [u8]>), Rejection> {
    if bytes.len() < ENTRY_FIXED + 4 + 1 || !bytes.starts_with(ENTRY_MAGIC) {
        return Err(Rejection::Malformed);
    }
    let mut at = ENTRY_MAGIC.len();
    let mut take = |n: usize| {
        let s = &bytes[at..at + n];
        at += n;
        s
    };
    let entry = RemoteEntry {
        key: CompileKey(take(32).try_into().unwrap()),
        object: ObjectId(take(32).try_into().unwrap()),
        size: u64::from_le_bytes(take(8).try_into().unwrap()),
        header: take(HEADER_LEN).try_into().unwrap(),
    };
    if entry.key != *key {
        return Err(Rejection::WrongKey);
    }
    let mut rest = &bytes[ENTRY_FIXED..];
    let inline_len = u32::from_le_bytes(rest[..4].try_into().unwrap()) as usize;
    rest = &rest[4..];
    if inline_len > INLINE_MAX || rest.len() < inline_len + 1 {
        return Err(Rejection::Malformed);
    }
    let inline = (inline_len > 0).then(|| &rest[..inline_len]);
    rest = &rest[inline_len..];
    let count = rest[0];
    rest = &rest[1..];
    // A writer signs once; a few keys at most (a key rotated in). More
    // would only make a reader verify signatures for nothing.
    if count > MAX_SIGNATURES {
        return Err(Rejection::Malformed);
    }
    let mut signatures = Vec::new();
    for _ in 0..count {
        let Some((&len, tail)) = rest.split_first() else {
            return Err(Rejection::Malformed);
        };
        let len = len as usize;
        if tail.len() < len + 64 {
            return Err(Rejection::Malformed);
        }
        let name = std::str::from_utf8(&tail[..len]).map_err(|_| Rejection::Malformed)?;
        let signature = Signature::from_bytes(tail[len..len + 64].try_into().unwrap());
        signatures.push((name, signature));
        rest = &tail[len + 64..];
    }
    if !rest.is_empty() {
        return Err(Rejection::Malformed);
    }
    if trusted.is_empty() {
        return Ok((entry, inline));
    }
    if signatures.is_empty() {
        return Err(Rejection::Untrusted("that is not signed"));
    }
    let message = entry.signed_message(namespace);
    let good = signatures.iter().any(|(name, signature)| {
        trusted
            .get(name)
            .is_some_and(|key| key.verify(&message, signature).is_ok())
    });
    if good {
        Ok((entry, inline))
    } else {
        Err(Rejection::Untrusted("not signed by a trusted key"))
    }
}

thread_local! {
    /// A decompression context per thread, made once: a context is larger
    /// than most objects, and making one for each costs more than the
    /// decompression itself.
    static DECOMPRESSOR: RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { RefCell::new(None) };
}

/// Compresses a pyc for upload.
pub fn encode_object(pyc: &[u8]) -> Vec<u8> {
    zstd::bulk::compress(pyc, 3).expect("compressing to memory does not fail")
}

/// The pyc size an entry's bytes give, unchecked (the entry is still to
/// be decoded).
pub fn entry_size(bytes: &[u8]) -> Option<u64> {
    let at = ENTRY_MAGIC.len() + 32 + 32;
    Some(u64::from_le_bytes(bytes.get(at..at + 8)?.try_into().ok()?))
}

/// Whether the size `entry` gives is one a pyc taken from a remote may
/// have: at least a header, at most [`MAX_OBJECT`].
pub fn check_size(entry: &RemoteEntry) -> Result<(), Rejection> {
    if entry.size > MAX_OBJECT || entry.size < HEADER_LEN as u64 {
        return Err(Rejection::BadObject(format!(
            "the entry says {} bytes",
            entry.size
        )));
    }
    Ok(())
}

/// Decompresses an object for `entry` and checks it against the entry: at
/// most its size (never more than [`MAX_OBJECT`]), its blake3 its name, its
/// header the entry's.
pub fn decode_object(compressed: &[u8], entry: &RemoteEntry) -> Result<Vec<u8>, Rejection> {
    check_size(entry)?;
    // Decompressed into exactly the entry's size: a frame that holds more
    // fails here, one that holds less fails the length check below.
    let mut pyc = Vec::with_capacity(entry.size as usize);
    DECOMPRESSOR
        .with(|cell| {
            let mut cell = cell.borrow_mut();
            let decompressor = match &mut *cell {
                Some(d) => d,
                empty => empty.insert(zstd::bulk::Decompressor::new()?),
            };
            decompressor.decompress_to_buffer(compressed, &mut pyc)
        })
        .map_err(|e| Rejection::BadObject(e.to_string()))?;
    if pyc.len() as u64 != entry.size {
        return Err(Rejection::BadObject(format!(
            "{} bytes, {} expected",
            pyc.len(),
            entry.size
        )));
    }
    if ObjectId::of(&pyc) != entry.object {
        return Err(Rejection::WrongHash);
    }
    if pyc[..HEADER_LEN] != entry.header {
        return Err(Rejection::WrongHeader);
    }
    Ok(pyc)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry_for(pyc: &[u8]) -> RemoteEntry {
        RemoteEntry {
            key: CompileKey([5; 32]),
            object: ObjectId::of(pyc),
            size: pyc.len() as u64,
            header: pyc[..16].try_into().unwrap(),
        }
    }

    #[test]
    fn entries_round_trip_and_signatures_are_checked() {
        let pyc = [7u8; 40];
        let entry = entry_for(&pyc);
        let none = TrustedKeys::default();
        let key = SigningKey::from_bytes(&[1; 32]);
        let other = SigningKey::from_bytes(&[2; 32]);
        let mut trusted = TrustedKeys::default();
        trusted.insert("ci-1".into(), key.verifying_key());

        let unsigned = entry.encode("ns", None, None);
        assert_eq!(
            decode_entry(&unsigned, &entry.key, "ns", &none),
            Ok((entry, None))
        );
        assert!(matches!(
            decode_entry(&unsigned, &entry.key, "ns", &trusted),
            Err(Rejection::Untrusted(_))
        ));
        let signed = entry.encode("ns", Some(b"zz"), Some(("ci-1", &key)));
        assert_eq!(
            decode_entry(&signed, &entry.key, "ns", &trusted),
            Ok((entry, Some(&b"zz"[..])))
        );
        // Another namespace, another key of the same name, another key.
        assert!(decode_entry(&signed, &entry.key, "other", &trusted).is_err());
        let forged = entry.encode("ns", None, Some(("ci-1", &other)));
        assert!(decode_entry(&forged, &entry.key, "ns", &trusted).is_err());
        assert_eq!(
            decode_entry(&signed, &CompileKey([6; 32]), "ns", &trusted),
            Err(Rejection::WrongKey)
        );
        for cut in 0..signed.len() {
            assert!(decode_entry(&signed[..cut], &entry.key, "ns", &none).is_err());
        }
        // More signatures than a writer makes: refused before any is verified.
        let mut many = unsigned.clone();
        *many.last_mut().unwrap() = MAX_SIGNATURES + 1;
        for _ in 0..=MAX_SIGNATURES {
            many.extend_from_slice(&[1, b'x']);
            many.extend_from_slice(&[0; 64]);
        }
        assert_eq!(
            decode_entry(&many, &entry.key, "ns", &trusted),
            Err(Rejection::Malformed)
        );
    }

    #[test]
    fn bundles_round_trip_and_their_names_ignore_order() {
        let a = entry_for(&[7u8; 40]);
        let b = RemoteEntry {
            key: CompileKey([6; 32]),
            ..a
        };
        let (ea, eb) = (
            a.encode("ns", None, None),
            b.encode("ns", Some(b"zz"), None),
        );
        let bundle = encode_bundle(&[&ea, &eb, &ea]);
        let entries = decode_bundle(&bundle).unwrap();
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[&a.key], &ea[..]);
        assert_eq!(entries[&b.key], &eb[..]);
        for cut in 0..bundle.len() {
            assert!(decode_bundle(&bundle[..cut]).is_err(), "cut at {cut}");
        }
        let mut longer = bundle.clone();
        longer.push(0);
        assert_eq!(decode_bundle(&longer), Err(Rejection::MalformedBundle));
        assert!(decode_bundle(&ea).is_err());
        assert_eq!(
            decode_bundle(&encode_bundle::<&[u8]>(&[])).unwrap().len(),
            0
        );

        let mut one = vec![a.key, b.key, a.key];
        let mut other = vec![b.key, a.key];
        assert_eq!(bundle_id(&mut one), bundle_id(&mut other));
        assert_eq!(one, other);
        assert_ne!(bundle_id(&mut vec![a.key]), bundle_id(&mut other));
        assert!(bundle_path("ns", &[0xab; 32]).starts_with("pycstore-v1/ns/bundles/ab/abab"));
    }

    #[test]
    fn the_largest_valid_records_are_within_their_read_limits() {
        // The largest entry: the largest inline object, and the most
        // signatures, each with the longest name.
        let entry = entry_for(&[7u8; 40]);
        let name = "k".repeat(255);
        let key = SigningKey::from_bytes(&[1; 32]);
        let mut largest = entry.encode("ns", Some(&vec![9; INLINE_MAX]), Some((&name, &key)));
        let signature = largest[largest.len() - (1 + 255 + 64)..].to_vec();
        for _ in 1..MAX_SIGNATURES {
            largest.extend_from_slice(&signature);
        }
        largest[ENTRY_FIXED + 4 + INLINE_MAX] = MAX_SIGNATURES;
        assert!(decode_entry(&largest, &entry.key, "ns", &TrustedKeys::default()).is_ok());
        assert_eq!(largest.len(), ENTRY_MAX);

        // A bundle stops short of its limit, leaving out what does not fit.
        let mut entries = Vec::new();
        for i in 0..200u8 {
            let mut e = entry;
            e.key = CompileKey([i; 32]);
            entries.push(e.encode("ns", Some(&vec![i; 60 << 10]), None));
        }
        let bundle = encode_bundle(&entries);
        assert!(bundle.len() <= BUNDLE_MAX && bundle.len() > BUNDLE_MAX - ENTRY_MAX);
        let kept = decode_bundle(&bundle).unwrap();
        assert_eq!(kept.len(), BUNDLE_MAX / (60 << 10));
        assert_eq!(kept[&CompileKey([0; 32])], &entries[0][..]);

        // zstd's bound for a pyc of the entry's size.
        let mut random = vec![0u8; 1 << 20];
        blake3::Hasher::new().finalize_xof().fill(&mut random);
        let z = encode_object(&random);
        assert!(
            z.len() > 1 << 20 && z.len() <= object_limit(1 << 20),
            "{}",
            z.len()
        );
        assert!(object_limit(u64::MAX) == object_limit(MAX_OBJECT));
    }

    #[test]
    fn objects_are_checked_against_their_entry() {
        let pyc: Vec<u8> = (0..100u8).collect();
        let entry = entry_for(&pyc);
        let z = encode_object(&pyc);
        assert_eq!(decode_object(&z, &entry).unwrap(), pyc);
        let mut bad = pyc.clone();
        bad[50] ^= 1;
        assert_eq!(
            decode_object(&encode_object(&bad), &entry),
            Err(Rejection::WrongHash)
        );
        assert!(decode_object(&z[..z.len() / 2], &entry).is_err());
        let mut longer = pyc.clone();
        longer.push(0);
        assert!(decode_object(&encode_object(&longer), &entry).is_err());
        // The thread's context still decodes after those failures.
        assert_eq!(decode_object(&z, &entry).unwrap(), pyc);
    }
}
