//! The `pycstore` binary: parses flags, runs one subcommand, prints errors.
//!
//! Exit codes: 0 success; 1 the command ran but some files failed (each is
//! reported); 2 the command could not run (bad flags, no store, no
//! interpreter).
#![allow(
    rustdoc::broken_intra_doc_links,
    reason = "doc comments are clap's help texts, whose [OPTIONAL] parts are not links"
)]

use std::io::IsTerminal;
use std::process::ExitCode;

mod args;
mod commands;
mod config;
mod env;
#[cfg(all(target_os = "linux", target_env = "gnu"))]
mod glibc_compat;
mod output;
mod remote;
mod version;

/// jemalloc, for Rust's allocations and (its `malloc` and `free` taking the
/// place of glibc's in the whole process) RocksDB's: a re-link of the
/// reference corpus allocates about 22 times per source, and RocksDB a
/// block per table it reads. With glibc's allocator those were a sixth of
/// its instructions; with jemalloc the re-link takes 9% fewer instructions
/// and 7% less time (BENCHMARKS.md, "The allocator").
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    // Before any thread starts (see their docs).
    pycstore_store::tree::prepare_descriptors();
    let cli = match config::parse() {
        Ok(cli) => cli,
        Err(err) => {
            eprintln!("pycstore: error: {err:#}");
            return ExitCode::from(2);
        }
    };
    let to_file = matches!(&cli.command, args::Command::Mount(m) if m.log.is_some());
    init_logging(cli.verbose, std::io::stderr().is_terminal() && !to_file);
    match run(cli) {
        Ok(code) => code,
        Err(err) => {
            if is_broken_pipe(&err) {
                return ExitCode::SUCCESS;
            }
            eprintln!("pycstore: error: {err:#}");
            ExitCode::from(2)
        }
    }
}

fn run(cli: args::Cli) -> anyhow::Result<ExitCode> {
    pycstore_store::python_trust::set_override(cli.global.trust_python);
    match cli.command {
        args::Command::Link(ref args) => commands::link::run(&cli.global, args),
        args::Command::Unlink(ref args) => commands::unlink::run(&cli.global, args),
        args::Command::Status(ref args) => commands::status::run(&cli.global, args),
        args::Command::Stats(ref args) => commands::stats::run(&cli.global, args),
        args::Command::Gc(ref args) => commands::gc::run(&cli.global, args),
        args::Command::Verify(ref args) => commands::verify::run(&cli.global, args),
        args::Command::Export(ref args) => commands::export::run(&cli.global, args),
        args::Command::Import(ref args) => commands::import::run(&cli.global, args),
        args::Command::Mount(ref args) => commands::mount::run(&cli.global, args),
        args::Command::Unmount(ref args) => commands::unmount::run(args),
        args::Command::Config(ref args) => commands::config::run(args),
        args::Command::Completions(ref args) => commands::completions::run(args),
        args::Command::Man(ref args) => commands::man::run(args),
        args::Command::Push(ref args) => commands::push::run(&cli.global, args),
        args::Command::Keygen(ref args) => commands::keygen::run(&cli.global, args),
    }
}

/// Logs to standard error, in color on a terminal (not when a mount sends
/// its messages to a file).
fn init_logging(verbose: u8, ansi: bool) {
    let default = match verbose {
        // The TLS verifier logs each certificate it refuses as an error;
        // the remote tier says it once, in its warning.
        0 => "warn,rustls_platform_verifier=off",
        1 => "pycstore=debug,pycstore_store=debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env(env::PYCSTORE_LOG)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .without_time()
        .init();
}

fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
    })
}
