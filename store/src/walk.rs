//! Finding the sources of a prefix: every `*.py` file, the way `compileall`
//! finds them (directory symlinks are not followed, `__pycache__` is skipped),
//! minus what the user excluded. Unreadable directories and other walk errors
//! are reported per path, never the end of the walk.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use globset::{GlobBuilder, GlobSet, GlobSetBuilder};

use crate::{Error, Result};

/// A source file found by the walk.
#[derive(Clone, Debug)]
pub struct Found {
    /// The path as reached from the prefix (a symlinked file keeps its own
    /// name: its pyc goes beside the link).
    pub path: PathBuf,
    /// The device of the directory holding it: where its pyc will be written.
    pub dir_dev: u64,
}

/// Exclude patterns. A pattern with a `/` is matched against the path
/// relative to the prefix; one without is matched against every file and
/// directory name (`tests` excludes every `tests` directory).
pub struct Excludes {
    by_path: GlobSet,
    by_name: GlobSet,
}

impl Excludes {
    /// Compiles the patterns.
    pub fn new(patterns: &[String]) -> Result<Excludes> {
        let mut by_path = GlobSetBuilder::new();
        let mut by_name = GlobSetBuilder::new();
        for pattern in patterns {
            let glob = GlobBuilder::new(pattern.trim_end_matches('/'))
                .literal_separator(true)
                .build()
                .map_err(|e| Error::Pattern {
                    pattern: pattern.clone(),
                    message: e.kind().to_string(),
                })?;
            if pattern.trim_end_matches('/').contains('/') {
                by_path.add(glob);
            } else {
                by_name.add(glob);
            }
        }
        let build = |b: GlobSetBuilder| b.build().expect("globs compiled one by one above");
        Ok(Excludes {
            by_path: build(by_path),
            by_name: build(by_name),
        })
    }

    fn excluded(&self, relative: &Path) -> bool {
        self.by_path.is_match(relative)
            || relative
                .file_name()
                .is_some_and(|name| self.by_name.is_match(name))
    }
}

/// Walks `prefix`, returning the sources and the paths that could not be read.
pub fn walk(prefix: &Path, excludes: &Excludes) -> (Vec<Found>, Vec<(PathBuf, String)>) {
    let mut found = Vec::new();
    let mut errors = Vec::new();
    let mut dir_devs: Vec<(PathBuf, u64)> = Vec::new();
    let walker = walkdir::WalkDir::new(prefix)
        .follow_links(false)
        .follow_root_links(true)
        .sort_by_file_name()
        .into_iter()
        .filter_entry(|e| {
            if e.depth() == 0 {
                return true;
            }
            if e.file_type().is_dir() && e.file_name() == "__pycache__" {
                return false;
            }
            let rel = e.path().strip_prefix(prefix).unwrap_or(e.path());
            !excludes.excluded(rel)
        });
    for entry in walker {
        let entry = match entry {
            Ok(entry) => entry,
            Err(err) => {
                let path = err.path().unwrap_or(prefix).to_path_buf();
                let message = err
                    .io_error()
                    .map(|e| e.to_string())
                    .unwrap_or_else(|| err.to_string());
                errors.push((path, format!("cannot read: {message}")));
                continue;
            }
        };
        if entry.file_type().is_dir() {
            if let Ok(meta) = entry.metadata() {
                // Directories arrive before their files; keep the stack of
                // ancestors of the current entry.
                while dir_devs
                    .last()
                    .is_some_and(|(d, _)| !entry.path().starts_with(d))
                {
                    dir_devs.pop();
                }
                dir_devs.push((entry.path().to_path_buf(), meta.dev()));
            }
            continue;
        }
        let is_py = entry
            .file_name()
            .as_encoded_bytes()
            .strip_suffix(b".py")
            .is_some_and(|stem| !stem.is_empty());
        if !is_py {
            continue;
        }
        // A symlink counts when it leads to a regular file, as for compileall.
        if entry.file_type().is_symlink() && !entry.path().is_file() {
            continue;
        }
        let parent = entry.path().parent().unwrap_or(prefix);
        while dir_devs.last().is_some_and(|(d, _)| d != parent) {
            dir_devs.pop();
        }
        let dir_dev = dir_devs.last().map(|(_, dev)| *dev).unwrap_or(0);
        found.push(Found {
            path: entry.into_path(),
            dir_dev,
        });
    }
    (found, errors)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_sources_skips_pycache_and_excludes() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        for p in [
            "a.py",
            "pkg/b.py",
            "pkg/tests/c.py",
            "pkg/__pycache__/d.py",
            "pkg/e.txt",
            "sub/f.py",
        ] {
            let path = root.join(p);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, "").unwrap();
        }
        std::os::unix::fs::symlink(root.join("sub"), root.join("linked")).unwrap();
        let excludes = Excludes::new(&["tests".into(), "sub/*.py".into()]).unwrap();
        let (found, errors) = walk(root, &excludes);
        let names: Vec<_> = found
            .iter()
            .map(|f| {
                f.path
                    .strip_prefix(root)
                    .unwrap()
                    .to_str()
                    .unwrap()
                    .to_string()
            })
            .collect();
        assert_eq!(names, ["a.py", "pkg/b.py"]);
        assert!(errors.is_empty());
        assert!(found.iter().all(|f| f.dir_dev != 0));
    }
}
