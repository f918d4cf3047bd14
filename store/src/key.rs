//! Compile keys: what decides the bytes of a compiled module.
//!
//! The key is blake3 over a versioned domain tag, the blake3 of the raw source
//! bytes, the interpreter's magic number, the optimize level and a word of
//! compile-affecting flags. The source's path is deliberately not part of it:
//! CPython rewrites `co_filename` on import, so one object serves every copy of
//! a file.

use std::fmt;

/// blake3 of a source file's raw bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SourceDigest(pub [u8; 32]);

impl SourceDigest {
    /// Hashes source bytes.
    pub fn of(source: &[u8]) -> Self {
        SourceDigest(*blake3::hash(source).as_bytes())
    }
}

/// Flags that change what `compile()` produces. Workers run isolated with none
/// of them set today; the word is in the key so that adding one (for example
/// `-X no_debug_ranges`) can never collide with existing entries.
pub(crate) const COMPILE_FLAGS_DEFAULT: u32 = 0;

/// The key of one compilation: (source, magic, optimize level, flags).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct CompileKey(pub [u8; 32]);

impl CompileKey {
    /// Derives the key of compiling `source` for an interpreter with `magic`.
    pub fn new(source: &SourceDigest, magic: [u8; 4], optimize: u8, flags: u32) -> Self {
        Self::hashed(
            b"pycstore compile key v1\0",
            None,
            source,
            magic,
            optimize,
            flags,
        )
    }

    /// Like [`CompileKey::new`], in a domain of its own when `domain` is
    /// given: the keys of an interpreter that others can change (see
    /// [`crate::python_trust`]) never equal another interpreter's.
    pub(crate) fn in_domain(
        source: &SourceDigest,
        magic: [u8; 4],
        optimize: u8,
        flags: u32,
        domain: Option<&[u8; 32]>,
    ) -> Self {
        match domain {
            None => Self::new(source, magic, optimize, flags),
            Some(domain) => Self::hashed(
                b"pycstore compile key v1 in domain\0",
                Some(domain),
                source,
                magic,
                optimize,
                flags,
            ),
        }
    }

    /// blake3 of `tag`, `domain`, the source digest, `magic`, `optimize`
    /// and `flags` one after the other, hashed in one call from a buffer on
    /// the stack (a re-link derives a key per pyc: an incremental hasher
    /// took 1,700 instructions a key).
    fn hashed(
        tag: &[u8],
        domain: Option<&[u8; 32]>,
        source: &SourceDigest,
        magic: [u8; 4],
        optimize: u8,
        flags: u32,
    ) -> Self {
        let mut buf = [0u8; 40 + 32 + 32 + 4 + 1 + 4];
        let mut len = 0;
        let parts: [&[u8]; 6] = [
            tag,
            domain.map_or(&[][..], |d| &d[..]),
            &source.0,
            &magic,
            &[optimize],
            &flags.to_le_bytes(),
        ];
        for part in parts {
            buf[len..len + part.len()].copy_from_slice(part);
            len += part.len();
        }
        CompileKey(*blake3::hash(&buf[..len]).as_bytes())
    }
}

impl fmt::Debug for CompileKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&crate::util::hex(&self.0[..8]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_input_changes_the_key() {
        let a = SourceDigest::of(b"x = 1\n");
        let b = SourceDigest::of(b"x = 2\n");
        let magic = [0xa7, 0x0d, 0x0d, 0x0a];
        let base = CompileKey::new(&a, magic, 0, 0);
        assert_ne!(base, CompileKey::new(&b, magic, 0, 0));
        assert_ne!(base, CompileKey::new(&a, [0xcb, 0x0d, 0x0d, 0x0a], 0, 0));
        assert_ne!(base, CompileKey::new(&a, magic, 1, 0));
        assert_ne!(base, CompileKey::new(&a, magic, 0, 1));
        assert_eq!(base, CompileKey::new(&a, magic, 0, 0));
        assert_eq!(base, CompileKey::in_domain(&a, magic, 0, 0, None));
        let one = CompileKey::in_domain(&a, magic, 0, 0, Some(&[1; 32]));
        assert_ne!(base, one);
        assert_ne!(one, CompileKey::in_domain(&a, magic, 0, 0, Some(&[2; 32])));
    }

    /// Keys name every entry of every store: the derivation never changes.
    /// (The values are those of the incremental hasher this replaced.)
    #[test]
    fn keys_are_stable() {
        let a = SourceDigest::of(b"x = 1\n");
        let magic = [0xa7, 0x0d, 0x0d, 0x0a];
        assert_eq!(
            crate::util::hex(&CompileKey::new(&a, magic, 2, 0).0),
            "e5ae950b932fe938ec2defab4604d9d029626048878ce39811e6b81aeb8fecbd"
        );
        assert_eq!(
            crate::util::hex(&CompileKey::in_domain(&a, magic, 1, 0, Some(&[7; 32])).0),
            "1784a4b23471b481439d04e4787e19437a71424a3d3855d66fb7220fbfc479f8"
        );
    }
}
