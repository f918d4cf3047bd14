//! How long `gc` and `verify` take on a large store: 100,000 small
//! synthetic objects, each named by two index entries (its flavor and its
//! body) and a use time, 1% of them hard linked into a prefix. Each step
//! runs once on the store the previous one left (eviction cannot be
//! repeated on the same store), with a warm page cache:
//!
//!     cargo bench -p pycstore-store --bench gc
//!
//! `PYCSTORE_BENCH_OBJECTS` changes the number of objects,
//! `PYCSTORE_BENCH_DIR` where the store is made (default: the temp dir).

use std::time::{Duration, Instant};

use rayon::prelude::*;

use pycstore_store::gc::{gc, GcOptions};
use pycstore_store::index::{Entry, EntrySlot, Writes};
use pycstore_store::key::{CompileKey, SourceDigest};
use pycstore_store::lock::LockMode;
use pycstore_store::verify::{verify, VerifyOptions};
use pycstore_store::{Flavor, Store};

const MAGIC: [u8; 4] = [0xa7, 0x0d, 0x0d, 0x0a];
const BATCH: usize = 10_000;

/// Object `i`: a 16-byte header and a body of 200 to 4,000 bytes.
fn object_bytes(i: u64) -> Vec<u8> {
    let len = 200 + (i.wrapping_mul(2_654_435_761) % 3800) as usize;
    let mut bytes = Vec::with_capacity(16 + len);
    bytes.extend_from_slice(&MAGIC);
    bytes.extend_from_slice(&[3, 0, 0, 0]);
    bytes.extend_from_slice(&i.to_le_bytes());
    let seed = blake3::hash(&i.to_le_bytes());
    let mut reader = blake3::Hasher::new_keyed(seed.as_bytes()).finalize_xof();
    let mut body = vec![0u8; len];
    reader.fill(&mut body);
    bytes.extend_from_slice(&body);
    bytes
}

fn build(store: &Store, n: u64, prefix: &std::path::Path) {
    std::fs::create_dir_all(prefix).unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let ids: Vec<u64> = (0..n).collect();
    for chunk in ids.chunks(BATCH) {
        let stored: Vec<(u64, Entry)> = chunk
            .par_iter()
            .map(|&i| {
                let bytes = object_bytes(i);
                let object = store.objects.put(&bytes).unwrap();
                if i % 100 == 0 {
                    std::fs::hard_link(
                        store.objects.path(&object),
                        prefix.join(format!("m{i}.pyc")),
                    )
                    .unwrap();
                }
                let entry = Entry {
                    object,
                    size: bytes.len() as u64,
                    header: bytes[..16].try_into().unwrap(),
                };
                (i, entry)
            })
            .collect();
        let mut writes = Writes::default();
        for (i, entry) in &stored {
            let key = CompileKey::new(&SourceDigest::of(&i.to_le_bytes()), MAGIC, 0, 0);
            writes.entry(&key, EntrySlot::Hashed(Flavor::CheckedHash), entry);
            writes.entry(&key, EntrySlot::Body, entry);
            // Use times over the last 100 days, in no order of `i`.
            let age = i.wrapping_mul(40_503) % (100 * 86_400);
            writes.used(&entry.object, now - age);
        }
        store.index().unwrap().apply(writes).unwrap();
    }
}

fn timed<T>(what: &str, f: impl FnOnce() -> T) -> (T, Duration) {
    let started = Instant::now();
    let out = f();
    let took = started.elapsed();
    println!("{what:<52} {:>8.3} s", took.as_secs_f64());
    (out, took)
}

fn main() {
    // `cargo bench` passes `--bench`; a filter argument is not supported.
    let n: u64 = std::env::var("PYCSTORE_BENCH_OBJECTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let dir = match std::env::var_os("PYCSTORE_BENCH_DIR") {
        Some(d) => tempfile::tempdir_in(d),
        None => tempfile::tempdir(),
    }
    .unwrap();
    let root = dir.path().join("store");
    let store = Store::open_with(&root, LockMode::Exclusive).unwrap();

    println!(
        "gc and verify of a store of {n} objects ({} CPUs)",
        rayon::current_num_threads()
    );
    timed(
        &format!("build: put {n} objects, record {} entries", 2 * n),
        || build(&store, n, &dir.path().join("prefix")),
    );
    let report = gc(&store, &GcOptions::default()).unwrap();
    let total = report.stats.bytes_before;
    println!(
        "{:<52} {:>8.1} MiB",
        "disk taken by the objects",
        total as f64 / (1 << 20) as f64
    );

    let half = GcOptions {
        max_size: Some(total / 2),
        ..GcOptions::default()
    };
    let (dry, _) = timed("gc --dry-run --max-size HALF (plan only)", || {
        gc(
            &store,
            &GcOptions {
                dry_run: true,
                ..half.clone()
            },
        )
        .unwrap()
    });
    let (real, took) = timed("gc --max-size HALF", || gc(&store, &half).unwrap());
    assert_eq!(dry.stats, real.stats);
    println!(
        "{:<52} {:>8} objects, {} entries",
        "  evicted", real.stats.evicted, real.stats.entries_removed
    );
    timed("gc, nothing to evict", || {
        gc(&store, &GcOptions::default()).unwrap()
    });
    let (checked, _) = timed("verify (re-hash every object)", || {
        verify(&store, &VerifyOptions::default()).unwrap()
    });
    assert!(!checked.broken(), "{:?}", &checked.problems[..1]);
    println!(
        "gc --max-size of {n} objects: {:.2} s (target: under 10 s)",
        took.as_secs_f64()
    );
}
