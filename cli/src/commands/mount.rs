//! `pycstore mount`: serve the store's pycs through FUSE (an overlay of a
//! prefix, or a PYTHONPYCACHEPREFIX tree) until unmounted.
//!
//! In the foreground by default; `--daemon` starts the same command again
//! as a detached server (`--daemon-child`, its own session) and exits once
//! that server says the mount is up, or with the server's status if it
//! could not mount.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::process::{Command, ExitCode, Stdio};
use std::time::Duration;

use anyhow::Context;
use pycstore_fuse::{MountOptions, View};

use crate::args::{GlobalArgs, MountArgs};

/// What the detached server prints on stdout once mounted.
const READY: &str = "ready";

pub fn run(global: &GlobalArgs, args: &MountArgs) -> anyhow::Result<ExitCode> {
    let options = settings(args)?;
    // Opened before daemonizing, so that a bad path is reported on the
    // terminal, and before the server leaves its working directory.
    let log = match &args.log {
        Some(path) => Some(open_log(path)?),
        None => None,
    };
    if args.daemon && !args.daemon_child {
        return daemonize();
    }
    if let (Some(log), false) = (&log, args.daemon_child) {
        redirect_stderr(log)?;
    }
    let root = super::store_root(global)?;
    let store = pycstore_store::Store::open_unlocked(&root, global.shared_group.as_deref())
        .with_context(|| format!("cannot open the store at `{}`", root.display()))?;
    // The view's errors name the mount point or the prefix they are about.
    let mount = pycstore_fuse::mount(store, &options)?;
    let tags: Vec<String> = mount
        .interpreters()
        .iter()
        .map(|i| i.cache_tag.clone())
        .collect();
    let mountpoint = mount.mountpoint().to_path_buf();
    let what = match &options.view {
        View::Overlay { source } if *source == options.mountpoint => {
            format!("overlay over `{}`", source.display())
        }
        View::Overlay { source } => format!("overlay of `{}`", source.display()),
        View::PycachePrefix => "pycache prefix".to_string(),
    };
    let serving = format!(
        "pycstore: serving the {what} at `{}` for {} ({} pycs); `pycstore unmount {}` ends it",
        mountpoint.display(),
        tags.join(", "),
        options.flavor.as_str(),
        mountpoint.display()
    );
    eprintln!("{serving}");
    if args.daemon_child {
        detach(log.as_ref())?;
        if log.is_some() {
            eprintln!("{serving}");
        }
    }
    let report = mount.run()?;
    let fetched = if options.remotes.is_some() {
        format!("{} fetched from remotes, ", report.fetched)
    } else {
        String::new()
    };
    eprintln!(
        "pycstore: unmounted `{}`: {} pycs served from the store, {fetched}{} compiled on first \
         access in {:.2}s, {} without a pyc, {} written by Python stored, {} refused",
        mountpoint.display(),
        report.hits,
        report.compiled,
        report.compile_seconds,
        report.failed,
        report.ingested,
        report.refused
    );
    for r in &report.remotes {
        eprintln!("pycstore: remote {}", crate::remote::summary(r));
    }
    Ok(ExitCode::SUCCESS)
}

fn settings(args: &MountArgs) -> anyhow::Result<MountOptions> {
    let (view, mountpoint) = match (&args.source, &args.over, &args.mountpoint) {
        (Some(source), _, Some(mountpoint)) => (
            View::Overlay {
                source: std::path::absolute(source)?,
            },
            mountpoint.clone(),
        ),
        (None, Some(over), _) => {
            let over = std::path::absolute(over)?;
            (
                View::Overlay {
                    source: over.clone(),
                },
                over,
            )
        }
        (None, None, Some(mountpoint)) if args.pycache_prefix => {
            (View::PycachePrefix, mountpoint.clone())
        }
        _ => anyhow::bail!(
            "give --source PREFIX MOUNTPOINT, --over PREFIX or --pycache-prefix MOUNTPOINT"
        ),
    };
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    Ok(MountOptions {
        view,
        mountpoint: std::path::absolute(mountpoint)?,
        // A detached server leaves its working directory before it starts
        // compile workers: a relative path must not depend on it. A bare
        // name is looked up on PATH, as it was given.
        python: args
            .python
            .iter()
            .map(|exe| {
                if exe.components().count() > 1 {
                    std::path::absolute(exe)
                } else {
                    Ok(exe.clone())
                }
            })
            .collect::<std::io::Result<_>>()?,
        optimize: args.optimize.clone(),
        flavor: super::link::flavor(args.invalidation_mode),
        jobs: super::jobs(args.jobs),
        timeout: (args.compile_timeout > 0).then(|| Duration::from_secs(args.compile_timeout)),
        allow_other: args.allow_other,
        compile: !args.no_compile,
        threads: args.threads.unwrap_or((2 * cpus).max(4)),
        cache_ttl: Duration::from_secs(args.cache_ttl),
        // Checked before daemonizing: a bad remote exits 2 on the terminal.
        remotes: crate::remote::remotes_retried(
            &args.remote,
            Some(Duration::from_secs(args.remote_retry)),
        )?,
    })
}

/// Starts this command again as a detached server and waits for it to say
/// the mount is up.
fn daemonize() -> anyhow::Result<ExitCode> {
    let exe = std::env::current_exe().context("cannot find the pycstore executable")?;
    let mut cmd = Command::new(exe);
    cmd.args(std::env::args_os().skip(1))
        .arg("--daemon-child")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    // SAFETY: the closure runs in the child between fork and exec, where
    // only async-signal-safe calls may be made: it makes one system call,
    // setsid(2), allocates nothing and touches no memory of the parent. A
    // failure makes `spawn` fail with its error.
    unsafe {
        cmd.pre_exec(|| {
            rustix::process::setsid()?;
            Ok(())
        });
    }
    let mut child = cmd.spawn().context("cannot start the mount server")?;
    let stdout = child
        .stdout
        .take()
        .context("no pipe from the mount server")?;
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line)?;
    if line.trim_end() == READY {
        println!("{}", child.id());
        return Ok(ExitCode::SUCCESS);
    }
    let status = child.wait()?;
    Ok(ExitCode::from(
        status.code().unwrap_or(2).clamp(1, 255) as u8
    ))
}

/// The server's log file, opened for appending (created private).
fn open_log(path: &std::path::Path) -> anyhow::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot open the log file `{}`", path.display()))
}

/// Sends standard error to `log` from now on.
fn redirect_stderr(log: &std::fs::File) -> anyhow::Result<()> {
    rustix::stdio::dup2_stderr(log).context("cannot send standard error to the log file")?;
    Ok(())
}

/// In the detached server, once mounted: tell the parent, leave the working
/// directory (it could hold a filesystem busy) and the terminal; messages go
/// to `log` if there is one.
fn detach(log: Option<&std::fs::File>) -> anyhow::Result<()> {
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{READY}")?;
    stdout.flush()?;
    drop(stdout);
    std::env::set_current_dir("/")?;
    let null = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")?;
    rustix::stdio::dup2_stdin(&null)
        .and_then(|()| rustix::stdio::dup2_stdout(&null))
        .and_then(|()| rustix::stdio::dup2_stderr(&null))
        .context("cannot let go of the terminal (dup2 of /dev/null)")?;
    if let Some(log) = log {
        redirect_stderr(log)?;
    }
    Ok(())
}
