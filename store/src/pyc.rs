//! The pyc file format: the 16-byte header, its three invalidation flavors,
//! and the source hash that hash-based pycs carry.
//!
//! ```text
//! bytes 0..4   magic (u16 word + b"\r\n")
//! bytes 4..8   flags u32 LE: bit 0 hash-based, bit 1 check_source
//! bytes 8..16  timestamp: source mtime u32 + size u32 | hash: SipHash u64 LE
//! bytes 16..   marshal.dumps(code)
//! ```

use std::hash::Hasher;

use serde::{Deserialize, Serialize};
use siphasher::sip::{SipHasher13, SipHasher24};

/// Length of a pyc header (CPython 3.7 and later, PyPy 3).
pub const HEADER_LEN: usize = 16;

/// How Python decides whether a pyc still matches its source.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Flavor {
    /// Hash of the source in the header, checked at every import (the default:
    /// safe to share, and safe when the source changes).
    CheckedHash,
    /// Hash in the header, never checked: fastest import, for immutable prefixes.
    UncheckedHash,
    /// Source mtime and size in the header: what most tools write; its header
    /// depends on each destination's source file.
    Timestamp,
}

impl Flavor {
    /// The header flags word of this flavor.
    pub fn flags(self) -> u32 {
        match self {
            Flavor::CheckedHash => 0b11,
            Flavor::UncheckedHash => 0b01,
            Flavor::Timestamp => 0b00,
        }
    }

    /// A one-byte tag for index keys (0 is reserved for "any flavor").
    pub(crate) fn tag(self) -> u8 {
        match self {
            Flavor::CheckedHash => 1,
            Flavor::UncheckedHash => 2,
            Flavor::Timestamp => 3,
        }
    }

    /// The name used on the command line and in JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Flavor::CheckedHash => "checked-hash",
            Flavor::UncheckedHash => "unchecked-hash",
            Flavor::Timestamp => "timestamp",
        }
    }
}

/// Which SipHash an interpreter uses for `importlib.util.source_hash`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum HashVariant {
    /// SipHash-1-3: CPython 3.11 and later.
    Siphash13,
    /// SipHash-2-4: CPython 3.7 to 3.10, PyPy 3.
    Siphash24,
}

impl HashVariant {
    /// Both variants, for matching an interpreter's answer against.
    pub const ALL: [HashVariant; 2] = [HashVariant::Siphash13, HashVariant::Siphash24];
}

/// `importlib.util.source_hash(source)` for an interpreter with `magic`: SipHash
/// keyed by the magic read as a little-endian u32, over the raw bytes.
pub fn source_hash(variant: HashVariant, magic: [u8; 4], source: &[u8]) -> [u8; 8] {
    let k0 = u64::from(u32::from_le_bytes(magic));
    let value = match variant {
        HashVariant::Siphash13 => {
            let mut h = SipHasher13::new_with_keys(k0, 0);
            h.write(source);
            h.finish()
        }
        HashVariant::Siphash24 => {
            let mut h = SipHasher24::new_with_keys(k0, 0);
            h.write(source);
            h.finish()
        }
    };
    value.to_le_bytes()
}

/// What the header of a pyc is derived from, besides the magic and flavor.
#[derive(Clone, Copy, Debug)]
pub enum HeaderInput {
    /// The source hash, for the hash-based flavors.
    Hash([u8; 8]),
    /// The source's `st_mtime` seconds and `st_size`, for timestamp pycs.
    Stat {
        /// `st_mtime` in whole seconds.
        mtime: i64,
        /// `st_size`.
        size: u64,
    },
}

/// Builds the 16-byte header of a pyc.
pub fn header(magic: [u8; 4], flavor: Flavor, input: HeaderInput) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[..4].copy_from_slice(&magic);
    h[4..8].copy_from_slice(&flavor.flags().to_le_bytes());
    match input {
        HeaderInput::Hash(hash) => h[8..16].copy_from_slice(&hash),
        HeaderInput::Stat { mtime, size } => {
            h[8..12].copy_from_slice(&((mtime as u64 & 0xFFFF_FFFF) as u32).to_le_bytes());
            h[12..16].copy_from_slice(&((size & 0xFFFF_FFFF) as u32).to_le_bytes());
        }
    }
    h
}

/// What an existing pyc's header says about its source, as import would judge it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum HeaderVerdict {
    /// Import would use it.
    Valid,
    /// Wrong magic, bad flags, or a mismatch with the source: import would
    /// recompile.
    Stale,
}

/// Judges a pyc header against its source the way `importlib` does.
/// `source` is only read for checked-hash pycs, through the closure.
pub(crate) fn judge_header(
    header: &[u8],
    magic: [u8; 4],
    variant: HashVariant,
    mtime: i64,
    size: u64,
    source: impl FnOnce() -> Option<Vec<u8>>,
) -> HeaderVerdict {
    if header.len() < HEADER_LEN || header[..4] != magic {
        return HeaderVerdict::Stale;
    }
    let flags = u32::from_le_bytes(header[4..8].try_into().expect("4 bytes"));
    if flags & !0b11 != 0 {
        return HeaderVerdict::Stale;
    }
    let ok = if flags & 0b01 == 0 {
        header[8..16]
            == self::header(magic, Flavor::Timestamp, HeaderInput::Stat { mtime, size })[8..16]
    } else if flags & 0b10 == 0 {
        true
    } else {
        source().is_some_and(|src| header[8..16] == source_hash(variant, magic, &src))
    };
    if ok {
        HeaderVerdict::Valid
    } else {
        HeaderVerdict::Stale
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unhex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    /// Vectors produced by real interpreters' `importlib.util.source_hash`.
    #[test]
    fn source_hash_matches_real_interpreters() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../tests/data/source_hash_vectors.jsonl"
        );
        let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
        let mut checked = 0;
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            let magic: [u8; 4] = unhex(v["magic_hex"].as_str().unwrap()).try_into().unwrap();
            let input = unhex(v["input_hex"].as_str().unwrap());
            let want = unhex(v["source_hash_hex"].as_str().unwrap());
            let version = v["version"].as_str().unwrap();
            let implementation = v["implementation"].as_str().unwrap();
            let minor: u32 = version.split('.').nth(1).unwrap().parse().unwrap();
            let variant = if implementation == "cpython" && minor >= 11 {
                HashVariant::Siphash13
            } else {
                HashVariant::Siphash24
            };
            assert_eq!(
                source_hash(variant, magic, &input).to_vec(),
                want,
                "{implementation} {version} input {}",
                v["input_name"]
            );
            checked += 1;
        }
        assert!(checked >= 20, "only {checked} vectors in {path}");
    }

    #[test]
    fn headers_by_flavor() {
        let magic = [0xa7, 0x0d, 0x0d, 0x0a];
        let h = header(magic, Flavor::CheckedHash, HeaderInput::Hash([1; 8]));
        assert_eq!(&h[4..8], &[3, 0, 0, 0]);
        assert_eq!(&h[8..], &[1; 8]);
        let t = header(
            magic,
            Flavor::Timestamp,
            HeaderInput::Stat {
                mtime: 0x1_0000_0005,
                size: 7,
            },
        );
        assert_eq!(&t[4..], &[0, 0, 0, 0, 5, 0, 0, 0, 7, 0, 0, 0]);
        let verdict = judge_header(&t, magic, HashVariant::Siphash13, 5, 7, || None);
        assert_eq!(verdict, HeaderVerdict::Valid);
        let verdict = judge_header(&t, magic, HashVariant::Siphash13, 6, 7, || None);
        assert_eq!(verdict, HeaderVerdict::Stale);
        let src = b"x = 1\n".to_vec();
        let hash = source_hash(HashVariant::Siphash13, magic, &src);
        let c = header(magic, Flavor::CheckedHash, HeaderInput::Hash(hash));
        let verdict = judge_header(&c, magic, HashVariant::Siphash13, 0, 0, || {
            Some(src.clone())
        });
        assert_eq!(verdict, HeaderVerdict::Valid);
        let verdict = judge_header(&c, magic, HashVariant::Siphash13, 0, 0, || {
            Some(b"x".to_vec())
        });
        assert_eq!(verdict, HeaderVerdict::Stale);
    }
}
