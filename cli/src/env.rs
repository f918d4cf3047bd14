//! Every environment variable pycstore reads, in one place.

/// The store directory (overridden by `--store`).
pub const PYCSTORE_DIR: &str = "PYCSTORE_DIR";
/// Per-file compile timeout in seconds; 0 for none.
pub const PYCSTORE_COMPILE_TIMEOUT: &str = pycstore_store::compile::TIMEOUT_ENV;
/// Log filter in `tracing` syntax (`debug`, `pycstore_store=trace`).
pub const PYCSTORE_LOG: &str = "PYCSTORE_LOG";
/// The group to share a newly created store with (`--shared-group`).
pub const PYCSTORE_SHARED_GROUP: &str = "PYCSTORE_SHARED_GROUP";
/// Run interpreters other users can change (`--trust-python`).
pub const PYCSTORE_TRUST_PYTHON: &str = pycstore_store::python_trust::OVERRIDE_ENV;
