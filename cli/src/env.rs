//! Every environment variable pycstore reads, in one place.

/// The store directory (overridden by `--store`).
pub const PYCSTORE_DIR: &str = "PYCSTORE_DIR";
/// The config file [default: $XDG_CONFIG_HOME/pycstore/config.toml]; see config.rs.
pub const PYCSTORE_CONFIG: &str = "PYCSTORE_CONFIG";
/// `--link-mode` when no flag gives it (over the config file's `link-mode`).
pub const PYCSTORE_LINK_MODE: &str = "PYCSTORE_LINK_MODE";
/// `--jobs` when no flag gives it.
pub const PYCSTORE_JOBS: &str = "PYCSTORE_JOBS";
/// `--invalidation-mode` when no flag gives it.
pub const PYCSTORE_INVALIDATION_MODE: &str = "PYCSTORE_INVALIDATION_MODE";
/// `--exclude` patterns, whitespace-separated, when no flag gives any.
pub const PYCSTORE_EXCLUDE: &str = "PYCSTORE_EXCLUDE";
/// Per-file compile timeout in seconds; 0 for none.
pub const PYCSTORE_COMPILE_TIMEOUT: &str = pycstore_store::compile::TIMEOUT_ENV;
/// Log filter in `tracing` syntax (`debug`, `pycstore_store=trace`).
pub const PYCSTORE_LOG: &str = "PYCSTORE_LOG";
/// The group to share a newly created store with (`--shared-group`).
pub const PYCSTORE_SHARED_GROUP: &str = "PYCSTORE_SHARED_GROUP";
/// Run interpreters other users can change (`--trust-python`).
pub const PYCSTORE_TRUST_PYTHON: &str = pycstore_store::python_trust::OVERRIDE_ENV;
