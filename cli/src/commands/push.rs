//! `pycstore push [PREFIX...]`: upload what the store holds to the remotes.

use std::io::Write;
use std::process::ExitCode;

use crate::args::{GlobalArgs, PushArgs};

pub fn run(global: &GlobalArgs, args: &PushArgs) -> anyhow::Result<ExitCode> {
    let Some(remotes) = crate::remote::remotes(&args.remote)? else {
        anyhow::bail!("no remote to push to: name one with --remote URL (or PYCSTORE_REMOTE)");
    };
    if !remotes.writable() {
        anyhow::bail!(
            "the remotes are read-only (--remote-read-only or PYCSTORE_REMOTE_READ_ONLY): \
             push would upload nothing"
        );
    }
    let store = super::open_store(global)?;
    let report = pycstore_store::remote::push::push(&store, &remotes, &args.prefixes)?;
    for message in remotes.take_warnings() {
        eprintln!("pycstore: warning: {message}");
    }
    if let Err(e) = store.index().and_then(|mut index| {
        remotes.record(&mut index)?;
        index.close()
    }) {
        tracing::debug!("cannot record the remotes' counters: {e}");
    }
    let per_remote = remotes.report();
    let mut out = std::io::stdout().lock();
    if args.json {
        #[derive(serde::Serialize)]
        struct Json<'a> {
            #[serde(flatten)]
            report: &'a pycstore_store::remote::push::PushReport,
            remotes: &'a [pycstore_store::remote::RemoteReport],
        }
        crate::output::write_json(
            &mut out,
            &Json {
                report: &report,
                remotes: &per_remote,
            },
        )?;
    } else {
        writeln!(
            out,
            "{} recorded pycs, {} distinct keys: {} uploaded, {} already there, {} skipped; \
             {} bundles written",
            report.pycs,
            report.keys,
            report.uploaded,
            report.present,
            report.skipped,
            report.bundles
        )?;
    }
    let failed = per_remote.iter().any(|r| r.disabled.is_some());
    Ok(if failed {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}
