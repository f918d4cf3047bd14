//! The floor of a warm `link` of a fresh copy: the filesystem work no
//! implementation can skip, and nothing else.
//!
//! ```text
//! fs-floor TREE OBJECT TAG
//! ```
//!
//! For every directory under TREE: open it, list it to the end, close it.
//! For every `NAME.py`: open, `fstat`, read and close it, and hash its bytes
//! with blake3 (which source it is, the least a content-addressed store
//! must know). For every directory holding sources: make `__pycache__`.
//! For every source: hard link OBJECT (a file on TREE's filesystem) as
//! `__pycache__/NAME.TAG.pyc`. Directories are worked on in parallel, on
//! every core (rayon).
//!
//! Left out, and done by `pycstore link`: the index (what the store holds
//! for each source, the stat cache, the link records written at the end),
//! the check that each object is intact before it is placed, the listing
//! records, the interpreter probe, symlink and ownership checks. So this is
//! a floor, not a design: what it costs in time and syscalls (counted with
//! `strace -f -c`) is where `link` could go with every check removed.
//! Prints the seconds it took, the sources, the directories.

use std::ffi::{CStr, CString};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use rustix::fs::{self as rfs, Mode, OFlags, RawDir, CWD};

static SOURCES: AtomicU64 = AtomicU64::new(0);
static DIRS: AtomicU64 = AtomicU64::new(0);

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, tree, object, tag] = &args[..] else {
        eprintln!("usage: fs-floor TREE OBJECT TAG");
        std::process::exit(2);
    };
    let object = CString::new(object.as_str()).expect("a path");
    // The descriptor table grown while the process has one thread, as
    // `pycstore` does (`tree::prepare_descriptors`): a table shared by
    // threads grows only after an RCU grace period, which is no filesystem
    // work.
    drop(rustix::io::fcntl_dupfd_cloexec(std::io::stderr(), 8191));
    let started = Instant::now();
    let root = open_dir(CWD, tree.as_str());
    rayon::scope(|scope| walk(scope, root, &object, tag));
    println!(
        "{:.4} {} {}",
        started.elapsed().as_secs_f64(),
        SOURCES.load(Ordering::Relaxed),
        DIRS.load(Ordering::Relaxed)
    );
}

fn open_dir<P: rustix::path::Arg>(at: impl AsFd, path: P) -> OwnedFd {
    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC | OFlags::NOFOLLOW;
    rfs::openat(at, path, flags, Mode::empty()).expect("a directory")
}

/// Lists `dir`, hands each subdirectory to the pool, then works on its
/// sources.
fn walk<'s>(scope: &rayon::Scope<'s>, dir: OwnedFd, object: &'s CStr, tag: &'s str) {
    DIRS.fetch_add(1, Ordering::Relaxed);
    let mut sources = Vec::new();
    let mut buf = vec![MaybeUninit::<u8>::uninit(); 32 << 10];
    let mut entries = RawDir::new(&dir, &mut buf[..]);
    while let Some(entry) = entries.next() {
        let entry = entry.expect("a listing");
        let name = entry.file_name();
        let bytes = name.to_bytes();
        if bytes == b"." || bytes == b".." {
            continue;
        }
        match entry.file_type() {
            rfs::FileType::Directory if bytes != b"__pycache__" => {
                let sub = open_dir(&dir, name);
                scope.spawn(move |scope| walk(scope, sub, object, tag));
            }
            rfs::FileType::RegularFile if bytes.ends_with(b".py") => sources.push(name.to_owned()),
            _ => {}
        }
    }
    if sources.is_empty() {
        return;
    }
    let _ = rfs::mkdirat(&dir, "__pycache__", Mode::from_raw_mode(0o755));
    for name in sources {
        hash_source(dir.as_fd(), &name);
        let stem = &name.to_bytes()[..name.to_bytes().len() - 3];
        let mut pyc = b"__pycache__/".to_vec();
        pyc.extend_from_slice(stem);
        pyc.extend_from_slice(format!(".{tag}.pyc").as_bytes());
        let pyc = CString::new(pyc).expect("no NUL");
        rfs::linkat(CWD, object, &dir, pyc.as_c_str(), rfs::AtFlags::empty()).expect("a link");
        SOURCES.fetch_add(1, Ordering::Relaxed);
    }
}

/// Reads and hashes one source.
fn hash_source(dir: BorrowedFd<'_>, name: &CStr) -> blake3::Hash {
    let flags = OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NOFOLLOW;
    let fd = rfs::openat(dir, name, flags, Mode::empty()).expect("a source");
    let size = rfs::fstat(&fd).expect("a stat").st_size as usize;
    let mut data = vec![0u8; size];
    let mut filled = 0;
    while filled < size {
        match rustix::io::read(&fd, &mut data[filled..]).expect("a read") {
            0 => break,
            n => filled += n,
        }
    }
    blake3::hash(&data[..filled])
}
