//! ed25519 keys for remote entries, in the format of Nix binary caches.
//!
//! A secret key file holds one line `NAME:BASE64` of the 32-byte seed
//! followed by the 32-byte public key; a public key is `NAME:BASE64` of the
//! 32-byte public key. The name travels with each signature, so readers
//! find the key to check it with, and a fleet can rotate keys by trusting
//! the old and the new name for a while.

use std::path::Path;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use ed25519_dalek::{SigningKey, VerifyingKey};

/// The public keys whose signatures a reader accepts.
#[derive(Clone, Debug, Default)]
pub struct TrustedKeys(Vec<(String, VerifyingKey)>);

impl TrustedKeys {
    /// Whether no key is trusted (then entries need no signature).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Trusts `key` under `name`.
    pub fn insert(&mut self, name: String, key: VerifyingKey) {
        self.0.push((name, key));
    }

    /// The trusted key named `name`.
    pub fn get(&self, name: &str) -> Option<&VerifyingKey> {
        self.0.iter().find(|(n, _)| n == name).map(|(_, k)| k)
    }

    /// The names of the trusted keys.
    pub fn names(&self) -> Vec<&str> {
        self.0.iter().map(|(n, _)| n.as_str()).collect()
    }

    /// Parses a whitespace-separated list of public keys (`NAME:BASE64`) or
    /// files holding such keys (`#` starts a comment in a file).
    ///
    /// An error never quotes key material: a secret key given by mistake
    /// (its file's path, or its text) would otherwise end up in a CI log.
    pub fn parse(list: &str) -> Result<TrustedKeys, String> {
        let mut keys = TrustedKeys::default();
        for (n, item) in list.split_whitespace().enumerate() {
            if let Some((name, key)) = parse_public(item) {
                keys.insert(name, key);
                continue;
            }
            let path = Path::new(item);
            if !path.is_file() {
                return Err(match not_a_public_key(item) {
                    // Key material: described, never quoted.
                    Some(what) => format!("trusted key {} is {what}", n + 1),
                    None => format!(
                        "`{item}` is neither a public key (NAME:BASE64, as `pycstore keygen` \
                         prints) nor a file of them"
                    ),
                });
            }
            let text =
                std::fs::read_to_string(path).map_err(|e| format!("cannot read `{item}`: {e}"))?;
            for (l, line) in text.lines().enumerate() {
                let line = line.split('#').next().unwrap_or("");
                for word in line.split_whitespace() {
                    let (name, key) = parse_public(word).ok_or_else(|| {
                        let what = not_a_public_key(word)
                            .unwrap_or_else(|| "not a public key (NAME:BASE64)".into());
                        format!("`{item}`, line {}: {what}", l + 1)
                    })?;
                    keys.insert(name, key);
                }
            }
        }
        Ok(keys)
    }
}

/// What a word that should be a public key is, when it looks like key
/// material (`NAME:BASE64`); `None` for anything else.
fn not_a_public_key(word: &str) -> Option<String> {
    let (_, bytes) = split_named(word)?;
    Some(if bytes.len() == 64 {
        "a secret key (NAME:BASE64 of 64 bytes, as in the `.secret` file `pycstore keygen` \
         writes), not a public key: trust the public key it printed (its `.pub` file) instead, \
         and treat this secret key as disclosed if this went anywhere others can read"
            .into()
    } else {
        format!(
            "not a public key: NAME:BASE64 of {} bytes, where a public key has 32",
            bytes.len()
        )
    })
}

fn split_named(text: &str) -> Option<(&str, Vec<u8>)> {
    let (name, b64) = text.trim().rsplit_once(':')?;
    if name.is_empty() || name.len() > 255 {
        return None;
    }
    Some((name, STANDARD.decode(b64).ok()?))
}

/// Parses one public key `NAME:BASE64`.
pub fn parse_public(text: &str) -> Option<(String, VerifyingKey)> {
    let (name, bytes) = split_named(text)?;
    let key = VerifyingKey::from_bytes(&bytes.try_into().ok()?).ok()?;
    Some((name.to_string(), key))
}

/// Reads a secret key file. The error never quotes the file's contents.
pub fn read_secret(path: &Path) -> Result<(String, SigningKey), String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read the signing key `{}`: {e}", path.display()))?;
    let bad = || {
        format!(
            "`{}` is not a pycstore signing key (one line NAME:BASE64 of 64 bytes, as \
             `pycstore keygen` writes)",
            path.display()
        )
    };
    let (name, bytes) = split_named(&text).ok_or_else(bad)?;
    let bytes: [u8; 64] = bytes.try_into().map_err(|_| bad())?;
    let key = SigningKey::from_keypair_bytes(&bytes).map_err(|_| bad())?;
    Ok((name.to_string(), key))
}

/// A new key pair named `name`: (secret key file contents, public key).
pub fn generate(name: &str) -> std::io::Result<(String, String)> {
    let mut seed = [0u8; 32];
    std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom")?, &mut seed)?;
    let key = SigningKey::from_bytes(&seed);
    let secret = format!("{name}:{}\n", STANDARD.encode(key.to_keypair_bytes()));
    Ok((secret, public_text(name, &key.verifying_key())))
}

/// The `NAME:BASE64` form of a public key.
pub fn public_text(name: &str, key: &VerifyingKey) -> String {
    format!("{name}:{}", STANDARD.encode(key.to_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_parse_back() {
        let dir = tempfile::tempdir().unwrap();
        let (secret, public) = generate("ci-1").unwrap();
        let path = dir.path().join("k");
        std::fs::write(&path, &secret).unwrap();
        let (name, key) = read_secret(&path).unwrap();
        assert_eq!(name, "ci-1");
        let trusted = TrustedKeys::parse(&format!("  {public}\n")).unwrap();
        assert_eq!(trusted.get("ci-1"), Some(&key.verifying_key()));
        std::fs::write(dir.path().join("trusted"), format!("# ours\n{public}\n")).unwrap();
        let from_file = TrustedKeys::parse(dir.path().join("trusted").to_str().unwrap()).unwrap();
        assert_eq!(from_file.names(), vec!["ci-1"]);
        assert!(TrustedKeys::parse("nope:AAAA").is_err());
    }

    #[test]
    fn a_secret_key_given_as_trusted_is_never_quoted() {
        let dir = tempfile::tempdir().unwrap();
        let (secret, public) = generate("ci-1").unwrap();
        let path = dir.path().join("ci-1.secret");
        std::fs::write(&path, &secret).unwrap();
        let b64 = secret.trim().split_once(':').unwrap().1;
        // The secret key file where its public key should be, the secret
        // key's text itself, and the file among good keys.
        for list in [
            path.to_str().unwrap().to_string(),
            secret.trim().to_string(),
            format!("{public} {}", path.display()),
        ] {
            let e = TrustedKeys::parse(&list).unwrap_err();
            assert!(!e.contains(b64), "{e}");
            assert!(!e.contains(&b64[..16]), "{e}");
            assert!(e.contains("a secret key"), "{e}");
        }
        let e = TrustedKeys::parse(path.to_str().unwrap()).unwrap_err();
        assert!(
            e.contains(path.to_str().unwrap()) && e.contains("line 1"),
            "{e}"
        );
        // A path that is no file is still named, to be corrected.
        let e = TrustedKeys::parse("/no/such/keys.pub").unwrap_err();
        assert!(e.contains("/no/such/keys.pub"), "{e}");
    }
}
