//! Build script of the `pycstore` binary:
//!
//! - refuses targets pycstore does not run on, saying which it does;
//! - records the commit the binary is built from (`pycstore --version`);
//! - when RocksDB is linked statically (`ROCKSDB_STATIC` with
//!   `ROCKSDB_LIB_DIR`, as `scripts/build-wheel` does with Debian's
//!   `librocksdb.a`), links the compression libraries that archive needs
//!   statically too, and with any static RocksDB (that or one built from
//!   the bundled sources) links libstdc++ statically, so the binary needs
//!   nothing but glibc and libgcc_s.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The compression libraries Debian's `librocksdb.a` calls into. Each is
/// linked from `lib<name>.a` when that archive exists; an archive only
/// contributes the members something references.
const COMPRESSION_LIBS: [&str; 5] = ["snappy", "lz4", "zstd", "bz2", "z"];

fn main() {
    check_target();
    record_commit();
    link_statically();
}

fn check_target() {
    let os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    let target_env = std::env::var("CARGO_CFG_TARGET_ENV").unwrap_or_default();
    if os != "linux" {
        panic!(
            "\n\npycstore runs on Linux only (it links pycs with openat2, \
             reflinks and FUSE); this target is `{}`. Supported: Linux with \
             glibc (x86_64-unknown-linux-gnu; other glibc architectures \
             build from source with a C++ compiler).\n\n",
            std::env::var("TARGET").unwrap_or_default()
        );
    }
    if target_env != "gnu" {
        println!(
            "cargo:warning=pycstore is built and tested for Linux with glibc; \
             target environment `{target_env}` is untested"
        );
    }
}

fn record_commit() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let commit = git_commit(&manifest)
        .or_else(|| vcs_info_commit(&manifest))
        .unwrap_or_else(|| "unknown".to_owned());
    println!("cargo:rustc-env=PYCSTORE_COMMIT={commit}");
    println!("cargo:rerun-if-env-changed=PYCSTORE_COMMIT");
    if let Some(git_dir) = git_path(&manifest, "HEAD") {
        println!("cargo:rerun-if-changed={}", git_dir.display());
    }
    if let Some(refs) = git_path(&manifest, "refs") {
        println!("cargo:rerun-if-changed={}", refs.display());
    }
    // Whether the checkout is dirty changes with its files, not its HEAD:
    // without these, a binary built from an edited checkout kept
    // `-dirty` once the edit was undone (and a clean build kept its
    // cleanliness through later edits).
    if let Some(index) = git_path(&manifest, "index") {
        println!("cargo:rerun-if-changed={}", index.display());
    }
    if let Some(workspace) = manifest.parent() {
        for tracked in [
            "Cargo.toml",
            "Cargo.lock",
            "cli/src",
            "store/src",
            "fuse/src",
        ] {
            println!(
                "cargo:rerun-if-changed={}",
                workspace.join(tracked).display()
            );
        }
    }
}

/// The short commit of the checkout, with `-dirty` when tracked files
/// differ from it. `PYCSTORE_COMMIT` overrides (for builds from a tarball).
fn git_commit(dir: &Path) -> Option<String> {
    if let Ok(commit) = std::env::var("PYCSTORE_COMMIT") {
        return Some(commit);
    }
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let mut commit = String::from_utf8(out.stdout).ok()?.trim().to_owned();
    let dirty = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(["diff-index", "--quiet", "HEAD", "--"])
        .status()
        .map(|s| s.code() == Some(1))
        .unwrap_or(false);
    if dirty {
        commit.push_str("-dirty");
    }
    Some(commit)
}

fn git_path(dir: &Path, name: &str) -> Option<PathBuf> {
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(["rev-parse", "--git-path", name])
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let path = PathBuf::from(String::from_utf8(out.stdout).ok()?.trim());
    Some(if path.is_absolute() {
        path
    } else {
        dir.join(path)
    })
}

/// `cargo package` records the commit in `.cargo_vcs_info.json`; a crate
/// installed from a registry has no `.git`.
fn vcs_info_commit(dir: &Path) -> Option<String> {
    let text = std::fs::read_to_string(dir.join(".cargo_vcs_info.json")).ok()?;
    let at = text.find("\"sha1\"")?;
    let rest = &text[at + 6..];
    let start = rest.find('"')? + 1;
    let len = rest[start..].find('"')?;
    Some(rest[start..start + len.min(12)].to_owned())
}

fn link_statically() {
    for var in [
        "ROCKSDB_STATIC",
        "ROCKSDB_LIB_DIR",
        "ROCKSDB_COMPILE",
        "CXX",
        "PYCSTORE_DYNAMIC_LIBSTDCXX",
    ] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    let var = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty());
    let compile = var("ROCKSDB_COMPILE").is_some_and(|v| v == "1" || v == "true");
    let lib_dir = var("ROCKSDB_LIB_DIR")
        .filter(|_| !compile)
        .map(PathBuf::from);
    let static_rocksdb = match &lib_dir {
        // A system library: static only when asked for.
        Some(_) => var("ROCKSDB_STATIC").is_some(),
        // Built from the bundled sources: always a static archive.
        None => true,
    };
    let mode = match (&lib_dir, static_rocksdb) {
        (Some(_), true) => "static (system archive)",
        (Some(_), false) => "shared (system library)",
        (None, _) => "static (built from source)",
    };
    println!("cargo:rustc-env=PYCSTORE_ROCKSDB_LINKAGE={mode}");
    if !static_rocksdb {
        return;
    }
    if let Some(dir) = &lib_dir {
        // After every library on the command line (cargo puts link args
        // last), so they resolve what librocksdb.a left undefined.
        for name in COMPRESSION_LIBS {
            let archive = format!("lib{name}.a");
            if dir.join(&archive).exists() {
                println!("cargo:rustc-link-arg=-l:{archive}");
            } else {
                println!(
                    "cargo:warning=no {archive} in {}: linking RocksDB statically needs it \
                     if librocksdb.a was built with {name}",
                    dir.display()
                );
            }
        }
    }
    if var("PYCSTORE_DYNAMIC_LIBSTDCXX").is_some() {
        return;
    }
    // librocksdb-sys asks for `-lstdc++`; a search directory holding only
    // libstdc++.a makes the linker take the archive (the shared library sits
    // in the compiler's own directory, searched after every -L).
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".to_owned());
    let Some(archive) = Command::new(&cxx)
        .arg("-print-file-name=libstdc++.a")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| PathBuf::from(s.trim()))
        .filter(|p| p.is_absolute() && p.exists())
    else {
        println!("cargo:warning=no libstdc++.a from `{cxx}`: libstdc++ stays a shared library");
        return;
    };
    let dir = PathBuf::from(std::env::var("OUT_DIR").unwrap()).join("static-libstdcxx");
    std::fs::create_dir_all(&dir).unwrap();
    let link = dir.join("libstdc++.a");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(&archive, &link).unwrap();
    println!("cargo:rustc-link-search=native={}", dir.display());
}
