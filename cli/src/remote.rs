//! Resolves the remote flags into the store's remote tier, before any I/O
//! on the store: a bad URL or missing credentials end the command (exit 2)
//! having written nothing.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use pycstore_store::remote::{config, Remotes, Requested, Settings};

use crate::args::RemoteArgs;

/// The remotes `args` name (flags, else `PYCSTORE_REMOTE`), or `None`; a
/// remote that fails is left alone for the rest of the run.
pub fn remotes(args: &RemoteArgs) -> anyhow::Result<Option<Arc<Remotes>>> {
    remotes_retried(args, None)
}

/// [`remotes`] for a process that lives long (a mount): a remote that
/// failed is tried again after `retry_after`.
pub fn remotes_retried(
    args: &RemoteArgs,
    retry_after: Option<Duration>,
) -> anyhow::Result<Option<Arc<Remotes>>> {
    let urls = if args.remote.is_empty() {
        config::process_env(crate::env::PYCSTORE_REMOTE)
            .map(|v| v.split_whitespace().map(str::to_string).collect())
            .unwrap_or_default()
    } else {
        args.remote.clone()
    };
    let requested = Requested {
        urls,
        read_only: args.remote_read_only,
        timeout_secs: args.remote_timeout,
        namespace: args.remote_namespace.clone(),
        signing_key: args.remote_signing_key.clone(),
        trusted_keys: args.remote_trusted_keys.clone(),
        concurrency: args.remote_jobs,
        retry_after,
    };
    let Some(settings) = Settings::resolve(&requested, &config::process_env)? else {
        return Ok(None);
    };
    let remotes = Remotes::new(settings).context("cannot set up the remotes")?;
    Ok(Some(Arc::new(remotes)))
}

/// One remote's counters in a line (its URL without credentials first).
pub fn summary(r: &pycstore_store::remote::RemoteReport) -> String {
    let c = &r.counters;
    let mut line = format!(
        "{}: {} hits, {} misses, {} uploads, {} requests, {} errors, {} rejected",
        r.remote, c.hits, c.misses, c.uploads, c.requests, c.errors, c.rejected
    );
    if let Some(why) = &r.disabled {
        line.push_str(&format!("; left alone after: {why}"));
    }
    line
}
