//! Files opened, stat'ed and read in batches through io_uring.
//!
//! Reading a new source one by one takes four syscalls: `openat`, `fstat`,
//! `read`, `close`. Here a batch's opens go to the kernel in one
//! `io_uring_enter`, each open file is `fstat`ed by a call of its own, and
//! the reads (each followed by its close) go in a second `io_uring_enter`:
//! one syscall a file and two a batch. The kernel does the same work in the same order for each file: the open is
//! relative to the same directory descriptor with the same flags
//! (`O_NOFOLLOW`, `O_NONBLOCK`), the `fstat` is of the open file, and only
//! what its caller accepts from that `fstat` is read.
//!
//! Where io_uring cannot be used, [`open_stat_read`] returns `None` and its
//! caller reads one file at a time: a kernel before 5.6, io_uring disabled
//! (`kernel.io_uring_disabled`, or a container's seccomp profile refusing
//! `io_uring_setup`), or `PYCSTORE_IO_URING=0` in the environment.

use std::cell::{Cell, RefCell};
use std::ffi::{CString, OsStr};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, IntoRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

use io_uring::{opcode, squeue, types, IoUring, Probe};
use rustix::fs::{OFlags, Stat};
use rustix::io::Errno;

/// The most files in one batch: their reads and closes fill the queue.
pub(crate) const BATCH: usize = 64;

/// The bytes read in one round: files are read into the same memory round
/// after round. Reading each into a buffer of its own cost a warm link of
/// the reference corpus 2,200 page faults (of 7,400), each page new to the
/// process zeroed by the kernel, and data hashed out of the CPU's cache.
const ROUND_BYTES: usize = 256 << 10;

/// The files of one batch on this thread: [`BATCH`], or fewer when the
/// limit on open files is low. A batch holds its files open at once, and
/// the directories it opens them from when those are not held: an eighth
/// of the descriptors outside the walk's budget is shared among the pool's
/// threads (16 each with 2 threads under a limit of 1,024).
pub(crate) fn batch_size() -> usize {
    let threads = rayon::current_num_threads().max(1);
    (crate::tree::unheld() / (8 * threads)).clamp(1, BATCH)
}

/// The queue's entries: a read and a close for each file of a batch.
const ENTRIES: u32 = 2 * BATCH as u32;

/// The largest file read through the ring; larger ones are read one by one
/// (a single read's length is 32 bits).
const MAX_READ: u64 = 1 << 30;

/// What became of one file of a batch.
pub(crate) enum Opened {
    /// `openat` failed.
    OpenFailed(Errno),
    /// `fstat` of the open file failed.
    StatFailed(Errno),
    /// Stat'ed, and read if its caller asked for it.
    Stated {
        /// `fstat` of the open file.
        stat: Box<Stat>,
        /// The read, when asked for.
        read: Option<Read>,
    },
    /// Not done here (the file is too large for one read): read it one by
    /// one.
    Again,
}

/// A read of a file's whole size, asked for one byte more.
pub(crate) enum Read {
    /// Exactly its size: the file as stat'ed, handed over as it was read.
    Whole,
    /// More than its size: it grew after its `fstat`.
    Grew,
    /// Less than its size (it shrank, or the kernel returned part of it),
    /// or not done (`EAGAIN`, `EINTR`): read it one by one.
    Again,
    /// The read failed.
    Failed(Errno),
}

/// Set once reads through the ring have been seen to fail where reads one
/// by one would not: none is tried again in this process.
static GIVEN_UP: AtomicBool = AtomicBool::new(false);

/// Whether io_uring may be tried (`PYCSTORE_IO_URING=0` says no).
fn allowed() -> bool {
    static ALLOWED: OnceLock<bool> = OnceLock::new();
    let allowed = *ALLOWED.get_or_init(|| {
        !matches!(
            std::env::var("PYCSTORE_IO_URING").as_deref(),
            Ok("0" | "off" | "no" | "false")
        )
    });
    allowed && !GIVEN_UP.load(Ordering::Relaxed)
}

/// No more batches in this process, once a read through the ring failed
/// with `EAGAIN`. Kernels before 6.4 fail, rather than wait for, the read of an
/// `O_NONBLOCK` file on a filesystem they cannot read without blocking
/// (tmpfs, overlayfs, NFS, FUSE), where `read(2)` ignores the flag.
fn give_up() {
    GIVEN_UP.store(true, Ordering::Relaxed);
}

/// Whether this thread reads through io_uring: allowed, and a ring could
/// be set up with the operations needed.
pub(crate) fn in_use() -> bool {
    with_ring(|_| Some(())).is_some()
}

thread_local! {
    /// This thread's ring: set up on first use; `None` inside when it could
    /// not be, or broke.
    static RING: RefCell<Option<Option<IoUring>>> = const { RefCell::new(None) };
    /// This thread's memory for reads ([`ROUND_BYTES`]), once used.
    static ARENA: Cell<Option<Box<[u8]>>> = const { Cell::new(None) };
}

/// Runs `f` with this thread's ring, set up on first use. `None` when there
/// is none.
fn with_ring<R>(f: impl FnOnce(&mut IoUring) -> Option<R>) -> Option<R> {
    if !allowed() {
        return None;
    }
    RING.with(|slot| {
        let mut slot = slot.borrow_mut();
        let ring = slot.get_or_insert_with(set_up).as_mut()?;
        let out = f(ring);
        if out.is_none() {
            // A round failed with requests perhaps still in flight: the
            // ring and the memory they point into are given up (never
            // freed while the kernel may still write into them).
            if let Some(ring) = slot.take().flatten() {
                Box::leak(Box::new(ring));
            }
            *slot = Some(None);
        }
        out
    })
}

/// A ring for this thread, with completions run only when it waits for
/// them (kernels from 6.1), else a plain one; `None` when io_uring is not
/// available or lacks an operation used here.
fn set_up() -> Option<IoUring> {
    // Once a plain ring is refused, no thread asks again.
    static REFUSED: AtomicBool = AtomicBool::new(false);
    if REFUSED.load(Ordering::Relaxed) {
        return None;
    }
    let ring = IoUring::builder()
        .setup_single_issuer()
        .setup_defer_taskrun()
        .build(ENTRIES)
        .or_else(|_| IoUring::new(ENTRIES));
    let Ok(ring) = ring else {
        REFUSED.store(true, Ordering::Relaxed);
        return None;
    };
    let mut probe = Probe::new();
    ring.submitter().register_probe(&mut probe).ok()?;
    let needed = [
        opcode::OpenAt::CODE,
        opcode::Read::CODE,
        opcode::Close::CODE,
    ];
    needed
        .iter()
        .all(|&code| probe.is_supported(code))
        .then_some(ring)
}

/// Submits `entries` (each with its index into `results` as user data)
/// and waits for all of them: `results` gets each one's result. `None`
/// when the ring failed, and requests may still be in flight.
fn round(ring: &mut IoUring, entries: &[squeue::Entry], results: &mut [i32]) -> Option<()> {
    debug_assert!(entries.len() <= ENTRIES as usize);
    for entry in entries {
        // SAFETY: every pointer in the entries is to memory the caller
        // keeps until this round is complete, or never frees if it fails.
        unsafe { ring.submission().push(entry) }.ok()?;
    }
    let mut left = entries.len();
    while left > 0 {
        match ring.submit_and_wait(left) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
            Err(_) => return None,
        }
        for cqe in ring.completion() {
            *results.get_mut(cqe.user_data() as usize)? = cqe.result();
            left -= 1;
        }
    }
    Some(())
}

fn errno(result: i32) -> Errno {
    Errno::from_raw_os_error(-result)
}

/// Opens each `(directory, name)` with `flags` (read only), `fstat`s the
/// open file, and reads it whole when `size` says so: `size(i, stat)` is
/// the size to read of the file `items[i]` (checked by the caller, which
/// reads one more byte to see growth), or `None` to only close it. Each
/// file read whole is handed to `whole(i, stat, bytes)` at once, and its
/// bytes are not kept: they are read into this thread's arena in rounds
/// of at most [`ROUND_BYTES`], each handed over before the next round is
/// read into the same memory (still in the CPU's cache when hashed, and
/// never more memory than that touched). Every file opened here is closed
/// here. At most [`BATCH`] items.
///
/// `None` when io_uring is not in use, or failed: then the files handed to
/// `whole` (if any) were read, the others not. `whole` runs while this
/// thread's ring is in use: it must not read through it.
pub(crate) fn open_stat_read(
    items: &[(BorrowedFd<'_>, &OsStr)],
    flags: OFlags,
    mut size: impl FnMut(usize, &Stat) -> Option<u64>,
    mut whole: impl FnMut(usize, &Stat, &[u8]),
) -> Option<Vec<Opened>> {
    assert!(items.len() <= BATCH);
    if items.is_empty() || !allowed() {
        return None;
    }
    // A name from a directory listing holds no NUL.
    let names: Vec<CString> = items
        .iter()
        .map(|(_, name)| CString::new(name.as_bytes()).ok())
        .collect::<Option<_>>()?;
    with_ring(|ring| {
        let n = items.len();
        let mut results = vec![0; 2 * n];

        // The opens.
        let opens: Vec<_> = items
            .iter()
            .zip(&names)
            .enumerate()
            .map(|(i, ((dir, _), name))| {
                opcode::OpenAt::new(types::Fd(dir.as_raw_fd()), name.as_ptr())
                    .flags((flags | OFlags::CLOEXEC).bits() as i32)
                    .build()
                    .user_data(i as u64)
            })
            .collect();
        if round(ring, &opens, &mut results).is_none() {
            names.leak();
            return None;
        }
        drop(names);
        let mut out: Vec<Opened> = Vec::with_capacity(n);
        let mut fds: Vec<Option<OwnedFd>> = Vec::with_capacity(n);
        for &result in &results[..n] {
            if result < 0 {
                out.push(Opened::OpenFailed(errno(result)));
                fds.push(None);
            } else {
                out.push(Opened::Again);
                // SAFETY: the kernel opened it for this process, and
                // nothing else owns it.
                fds.push(Some(unsafe { OwnedFd::from_raw_fd(result) }));
            }
        }

        // The `fstat`s of the open files, one by one: the ring would hand
        // each `statx` to a kernel worker thread (an `IORING_OP_STATX` is
        // never run inline), slower than the calls themselves.
        let mut wants: Vec<(usize, usize)> = Vec::with_capacity(n);
        for (i, fd) in fds.iter().enumerate() {
            let Some(fd) = fd else { continue };
            let stat = match rustix::fs::fstat(fd) {
                Ok(stat) => stat,
                Err(e) => {
                    out[i] = Opened::StatFailed(e);
                    continue;
                }
            };
            match size(i, &stat) {
                // Too large for one read: left `Again`, read one by one.
                Some(want) if want >= MAX_READ => continue,
                Some(want) => wants.push((i, want as usize)),
                None => {}
            }
            out[i] = Opened::Stated {
                stat: Box::new(stat),
                read: None,
            };
        }

        // The reads, in rounds that fit in the arena (a file larger than
        // it alone, in a buffer of its own), each followed by the close of
        // its file (whatever the read's result); the first round also
        // closes the files not read.
        let mut arena = ARENA.take();
        let mut reading = vec![false; n];
        for &(i, _) in &wants {
            reading[i] = true;
        }
        let mut wants = wants.into_iter().peekable();
        let mut first = true;
        loop {
            // (file, where in the buffer, size)
            let mut reads: Vec<(usize, usize, usize)> = Vec::new();
            let mut used = 0;
            while let Some(&(i, want)) = wants.peek() {
                if used + want + 1 > ROUND_BYTES && !reads.is_empty() {
                    break;
                }
                reads.push((i, used, want));
                used += want + 1;
                wants.next();
            }
            if reads.is_empty() && !first {
                break;
            }
            let mut own: Option<Box<[u8]>> = None;
            let buffer: &mut [u8] = if used > ROUND_BYTES {
                own.insert(vec![0; used].into_boxed_slice())
            } else {
                arena.get_or_insert_with(|| vec![0; ROUND_BYTES].into_boxed_slice())
            };
            let mut entries = Vec::with_capacity(2 * n);
            let mut closing = Vec::with_capacity(n);
            for &(i, at, want) in &reads {
                let fd = types::Fd(fds[i].as_ref().expect("read files are open").as_raw_fd());
                entries.push(
                    opcode::Read::new(fd, buffer[at..].as_mut_ptr(), (want + 1) as u32)
                        .offset(0)
                        .build()
                        .flags(squeue::Flags::IO_HARDLINK)
                        .user_data(2 * i as u64),
                );
                entries.push(opcode::Close::new(fd).build().user_data(2 * i as u64 + 1));
                closing.push(i);
            }
            if std::mem::take(&mut first) {
                for (i, fd) in fds.iter().enumerate() {
                    if let Some(fd) = fd.as_ref().filter(|_| !reading[i]) {
                        let fd = types::Fd(fd.as_raw_fd());
                        entries.push(opcode::Close::new(fd).build().user_data(2 * i as u64 + 1));
                        closing.push(i);
                    }
                }
            }
            if round(ring, &entries, &mut results).is_none() {
                // This round's files closed by the kernel, or in flight:
                // never closed here (those of later rounds are, on drop);
                // and the memory read into is never freed.
                for i in closing {
                    if let Some(fd) = fds[i].take() {
                        let _ = fd.into_raw_fd();
                    }
                }
                arena.map(Box::leak);
                own.map(Box::leak);
                return None;
            }
            for i in closing {
                // A close cancelled (its read could not be issued) leaves
                // the descriptor open: it is closed on drop. Any other
                // result means the kernel closed it.
                if let Some(fd) = fds[i].take() {
                    if results[2 * i + 1] != -libc::ECANCELED {
                        let _ = fd.into_raw_fd();
                    }
                }
            }
            for &(i, at, want) in &reads {
                let result = results[2 * i];
                let read = if result == -libc::EAGAIN {
                    give_up();
                    Read::Again
                } else if result == -libc::EINTR {
                    Read::Again
                } else if result < 0 {
                    Read::Failed(errno(result))
                } else if result as usize > want {
                    Read::Grew
                } else if (result as usize) < want {
                    Read::Again
                } else {
                    Read::Whole
                };
                if let Opened::Stated { stat, read: slot } = &mut out[i] {
                    if let Read::Whole = read {
                        whole(i, stat, &buffer[at..at + want]);
                    }
                    *slot = Some(read);
                }
            }
        }
        ARENA.set(arena);
        Some(out)
    })
}

/// Whether io_uring is there to test. Where it is unavailable,
/// `PYCSTORE_IO_URING=0` skips the tests of batched reads (README,
/// "Tests"), except under CI.
#[cfg(test)]
pub(crate) fn usable_in_tests() -> bool {
    if !allowed() {
        let ci = std::env::var("CI").unwrap_or_default().to_lowercase();
        assert!(
            ["", "0", "false"].contains(&ci.as_str()),
            "CI={ci}: not skipped"
        );
        eprintln!("SKIPPED: PYCSTORE_IO_URING=0");
        return false;
    }
    assert!(
        in_use(),
        "io_uring is unavailable here: PYCSTORE_IO_URING=0 skips this test"
    );
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    /// Where io_uring is usable, each kind of file gets what one-by-one
    /// reads would give it.
    #[test]
    fn a_batch_opens_stats_and_reads_what_it_is_asked_to() {
        if !usable_in_tests() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.py"), b"x = 1\n").unwrap();
        std::fs::write(dir.path().join("empty.py"), b"").unwrap();
        std::fs::write(dir.path().join("big.py"), vec![b'#'; 300_000]).unwrap();
        std::os::unix::fs::symlink("a.py", dir.path().join("link.py")).unwrap();
        std::fs::create_dir(dir.path().join("sub.py")).unwrap();
        // Sparse: too large for one read through the ring.
        let huge = std::fs::File::create(dir.path().join("huge.py")).unwrap();
        huge.set_len(MAX_READ).unwrap();
        let fd = std::fs::File::open(dir.path()).unwrap();
        let names = [
            "a.py", "empty.py", "big.py", "link.py", "gone.py", "sub.py", "huge.py",
        ];
        let items: Vec<_> = names
            .iter()
            .map(|name| (fd.as_fd(), OsStr::new(name)))
            .collect();
        let flags = OFlags::RDONLY | OFlags::NONBLOCK | OFlags::NOFOLLOW;
        let mut read = vec![None; names.len()];
        let out = open_stat_read(
            &items,
            flags,
            |i, stat| {
                // Not the directory; the big one as if it were smaller.
                let regular = stat.st_mode & libc::S_IFMT == libc::S_IFREG;
                let size = stat.st_size as u64;
                match names[i] {
                    "big.py" => Some(size - 1),
                    _ => regular.then_some(size),
                }
            },
            |i, stat, data| {
                assert_eq!(data.len() as i64, stat.st_size);
                read[i] = Some(data.to_vec());
            },
        )
        .unwrap();
        let whole = |i: usize| match out[i] {
            Opened::Stated {
                read: Some(Read::Whole),
                ..
            } => read[i].clone(),
            _ => None,
        };
        assert_eq!(whole(0).unwrap(), b"x = 1\n");
        assert_eq!(whole(1).unwrap(), b"");
        assert!(matches!(
            out[2],
            Opened::Stated {
                read: Some(Read::Grew),
                ..
            }
        ));
        assert!(matches!(out[3], Opened::OpenFailed(Errno::LOOP)));
        assert!(matches!(out[4], Opened::OpenFailed(Errno::NOENT)));
        assert!(matches!(out[5], Opened::Stated { read: None, .. }));
        assert!(matches!(out[6], Opened::Again));
    }

    /// Files read in rounds through one thread's memory, a file larger
    /// than a round alone in memory of its own: each handed over whole,
    /// with its own bytes.
    #[test]
    fn files_larger_than_a_round_together_are_each_read_whole() {
        if !usable_in_tests() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        // 40 files of 40 KiB: seven rounds; one of twice a round's size.
        let mut sizes: Vec<usize> = vec![40 << 10; 40];
        sizes.insert(17, 2 * ROUND_BYTES);
        sizes.push(0);
        let content = |i: usize, size: usize| -> Vec<u8> {
            (0..size).map(|k| (i * 7 + k / 4096) as u8).collect()
        };
        let names: Vec<String> = (0..sizes.len()).map(|i| format!("m{i}.py")).collect();
        for (i, (name, &size)) in names.iter().zip(&sizes).enumerate() {
            std::fs::write(dir.path().join(name), content(i, size)).unwrap();
        }
        let fd = std::fs::File::open(dir.path()).unwrap();
        let items: Vec<_> = names
            .iter()
            .map(|name| (fd.as_fd(), OsStr::new(name)))
            .collect();
        let flags = OFlags::RDONLY | OFlags::NONBLOCK | OFlags::NOFOLLOW;
        for _ in 0..2 {
            let mut read = vec![None; names.len()];
            let out = open_stat_read(
                &items,
                flags,
                |_, stat| Some(stat.st_size as u64),
                |i, _, data| read[i] = Some(data.to_vec()),
            )
            .unwrap();
            for (i, &size) in sizes.iter().enumerate() {
                assert!(matches!(
                    out[i],
                    Opened::Stated {
                        read: Some(Read::Whole),
                        ..
                    }
                ));
                assert!(
                    read[i].as_ref().unwrap() == &content(i, size),
                    "{}",
                    names[i]
                );
            }
        }
    }
}
