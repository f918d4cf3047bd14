//! What `pycstore --version` says: the version, the commit it was built
//! from, and the RocksDB it links (asked of the linked library itself).

use std::sync::OnceLock;

/// `0.1.0 (commit 0123456789ab, RocksDB 7.8.3 static (system archive))`.
pub fn text() -> &'static str {
    static TEXT: OnceLock<String> = OnceLock::new();
    TEXT.get_or_init(|| {
        format!(
            "{} (commit {}, RocksDB {} {})",
            env!("CARGO_PKG_VERSION"),
            env!("PYCSTORE_COMMIT"),
            rocksdb_version(),
            env!("PYCSTORE_ROCKSDB_LINKAGE"),
        )
    })
}

/// The version of the RocksDB library linked in, e.g. `7.8.3`.
pub fn rocksdb_version() -> String {
    // RocksDB's C API has no version call; its C++ one,
    // `std::string rocksdb::GetRocksVersionAsString(bool with_patch)`, is
    // in every build (Debian's library and the bundled sources alike). On
    // x86-64 and aarch64 Linux a returned std::string comes back through a
    // hidden pointer to caller-owned storage: the same as a C function
    // taking that pointer first.
    #[repr(C)]
    struct CxxString {
        ptr: *mut u8,
        len: usize,
        local: [u8; 16],
    }
    extern "C" {
        #[link_name = "_ZN7rocksdb23GetRocksVersionAsStringB5cxx11Eb"]
        fn get_rocks_version_as_string(out: *mut CxxString, with_patch: bool) -> *mut CxxString;
        #[link_name = "_ZdlPv"]
        fn cxx_operator_delete(ptr: *mut u8);
    }
    let mut s = std::mem::MaybeUninit::<CxxString>::uninit();
    // SAFETY: the callee constructs a libstdc++ (C++11 ABI) std::string in
    // `s`: a data pointer, a length and 16 bytes of inline buffer. The bytes
    // are copied out, then a heap buffer (a data pointer outside the inline
    // one) is freed with operator delete, as ~basic_string would.
    unsafe {
        get_rocks_version_as_string(s.as_mut_ptr(), true);
        let s = s.assume_init_mut();
        let bytes = std::slice::from_raw_parts(s.ptr, s.len).to_vec();
        if s.ptr != s.local.as_mut_ptr() {
            cxx_operator_delete(s.ptr);
        }
        String::from_utf8_lossy(&bytes).into_owned()
    }
}
