//! `pycstore keygen NAME`: an ed25519 key pair for signing remote entries.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::process::ExitCode;

use anyhow::Context;

use crate::args::{GlobalArgs, KeygenArgs};

pub fn run(_global: &GlobalArgs, args: &KeygenArgs) -> anyhow::Result<ExitCode> {
    if args.name.is_empty()
        || args.name.len() > 255
        || args
            .name
            .contains(|c: char| c.is_whitespace() || c == ':' || c == '/')
    {
        anyhow::bail!("bad key name `{}`: no spaces, `:` or `/`", args.name);
    }
    let (secret, public) =
        pycstore_store::remote::keys::generate(&args.name).context("cannot make a key")?;
    // `--dir ci` in a fresh checkout: made, as `mkdir -p` would.
    std::fs::create_dir_all(&args.dir)
        .with_context(|| format!("cannot create the directory `{}`", args.dir.display()))?;
    let secret_path = args.dir.join(format!("{}.secret", args.name));
    let public_path = args.dir.join(format!("{}.pub", args.name));
    let write = |path: &std::path::Path, text: &str, mode: u32| -> anyhow::Result<()> {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(path)
            .with_context(|| format!("cannot create `{}`", path.display()))?;
        file.write_all(text.as_bytes())
            .with_context(|| format!("cannot write `{}`", path.display()))
    };
    write(&secret_path, &secret, 0o600)?;
    write(&public_path, &format!("{public}\n"), 0o644)?;
    eprintln!(
        "pycstore: wrote the signing key `{}` (keep it secret: PYCSTORE_REMOTE_SIGNING_KEY) \
         and the public key `{}` (PYCSTORE_REMOTE_TRUSTED_KEYS)",
        secret_path.display(),
        public_path.display()
    );
    println!("{public}");
    Ok(ExitCode::SUCCESS)
}
