//! Micro benchmarks of the per-file hot path of a warm `link`: hash the
//! source, derive the compile key, look the entry and the stat cache up in
//! the index, compute a pyc source hash, and place an object by hardlink.
//!
//!     cargo bench -p pycstore-store --bench hot_paths

use std::path::Path;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use pycstore_store::index::{Entry, EntrySlot, StatRecord, Writes};
use pycstore_store::key::{CompileKey, SourceDigest};
use pycstore_store::materialize::{Access, Destination, Materializer};
use pycstore_store::pyc::{source_hash, HashVariant};
use pycstore_store::{Flavor, LinkMode, Store};

const MAGIC: [u8; 4] = [0xa7, 0x0d, 0x0d, 0x0a];

/// A typical module: 16 KiB of source (the corpus averages ~16 KB a file).
fn source() -> Vec<u8> {
    "def f(x):\n    return x * 2  # comment\n"
        .repeat(420)
        .into_bytes()
}

fn hashing(c: &mut Criterion) {
    let src = source();
    let mut g = c.benchmark_group("hash");
    g.throughput(Throughput::Bytes(src.len() as u64));
    g.bench_function("blake3 source digest", |b| {
        b.iter(|| SourceDigest::of(&src))
    });
    g.bench_function("siphash-1-3 pyc source hash", |b| {
        b.iter(|| source_hash(HashVariant::Siphash13, MAGIC, &src))
    });
    g.bench_function("siphash-2-4 pyc source hash", |b| {
        b.iter(|| source_hash(HashVariant::Siphash24, MAGIC, &src))
    });
    g.finish();
    let digest = SourceDigest::of(&src);
    c.bench_function("compile key", |b| {
        b.iter(|| CompileKey::new(&digest, MAGIC, 0, 0))
    });
}

fn index(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("store")).unwrap();
    let keys: Vec<CompileKey> = (0..10_000u32)
        .map(|i| CompileKey::new(&SourceDigest::of(&i.to_le_bytes()), MAGIC, 0, 0))
        .collect();
    let mut writes = Writes::default();
    for (i, key) in keys.iter().enumerate() {
        let entry = Entry {
            object: pycstore_store::objects::ObjectId([i as u8; 32]),
            size: 1000,
            header: [0; 16],
        };
        writes.entry(key, EntrySlot::Hashed(Flavor::CheckedHash), &entry);
        let record = StatRecord {
            dev: 1,
            ino: i as u64,
            size: 1,
            mtime_ns: 0,
            ctime_ns: 0,
            seen_ns: 0,
            digest: SourceDigest([0; 32]),
        };
        writes.stat(Path::new(&format!("/prefix/pkg/mod{i}.py")), &record);
    }
    store.index().unwrap().apply(writes).unwrap();
    c.bench_function("index session open + close", |b| {
        b.iter(|| drop(store.index().unwrap()))
    });
    let index = store.index().unwrap();
    let mut i = 0;
    c.bench_function("index entry lookup (10k entries)", |b| {
        b.iter(|| {
            i = (i + 7919) % keys.len();
            index
                .entry(&keys[i], EntrySlot::Hashed(Flavor::CheckedHash))
                .unwrap()
        })
    });
    c.bench_function("stat cache lookup (10k entries)", |b| {
        b.iter(|| {
            i = (i + 7919) % keys.len();
            index
                .stat(Path::new(&format!("/prefix/pkg/mod{i}.py")))
                .unwrap()
        })
    });
}

fn materialize(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("store")).unwrap();
    let id = store.objects.put(&source()).unwrap();
    let dest_dir = dir.path().join("prefix/__pycache__");
    std::fs::create_dir_all(&dest_dir).unwrap();
    let warn = |_: String| {};
    let materializer = Materializer::new(&store.objects, LinkMode::Hardlink, &warn);
    let dir_fd = pycstore_store::tree::open_root(&dest_dir).unwrap();
    let access = Access {
        mode: 0o444,
        owner: None,
        hardlink: true,
    };
    let mut n = 0u64;
    c.bench_function("place object (hardlink, replacing)", |b| {
        b.iter_batched(
            || {
                n += 1;
                std::ffi::OsString::from(format!("m{}.cpython-311.pyc", n % 1000))
            },
            |name| {
                let path = dest_dir.join(&name);
                let dest = Destination {
                    dir: std::os::fd::AsFd::as_fd(&dir_fd),
                    name: &name,
                    path: &path,
                    dev: 0,
                    access,
                };
                materializer.place(&id, &dest).unwrap()
            },
            BatchSize::SmallInput,
        )
    });
}

criterion_group!(benches, hashing, index, materialize);
criterion_main!(benches);
