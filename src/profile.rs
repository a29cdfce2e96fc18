//! Client profiles: the knock options a user would otherwise type every time,
//! so that `nxknock knock` and `ssh -o ProxyCommand="nxknock connect %h %p"` need
//! no flags at all.
//!
//! One file, `$XDG_CONFIG_HOME/nxknock/client.toml` (else
//! `~/.config/nxknock/client.toml`):
//!
//! ```toml
//! default = "work"
//!
//! [profile.work]
//! credential = "alice.cred"      # relative to this file's directory; ~/ is $HOME
//! server = "ns1.example.com"     # the knock zone's nameserver (name or address[:port])
//! # resolver = "system"          # or knock through a recursive resolver
//! ip = "auto"                    # the address the door admits, or `auto` (whoami)
//! service = "ssh"
//! ```
//!
//! Unknown keys are an error naming the key and the file, like the daemon's
//! config. The file names the credential and steers where knocks go, so it is
//! refused when group or others may read or write it, like the credential.
//! Command-line flags override a profile's values one by one.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// One `[profile.NAME]` table. Every key is optional; flags fill or override them.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    /// Credential file; relative paths are relative to the profile file's directory.
    pub credential: Option<PathBuf>,
    /// The knock zone's nameserver, `HOST` or `HOST:PORT`.
    pub server: Option<String>,
    /// A recursive resolver to knock through, `HOST[:PORT]` or `system`.
    pub resolver: Option<String>,
    /// The address the door should admit, or `auto`.
    pub ip: Option<String>,
    /// The service to open.
    pub service: Option<String>,
}

/// The whole file.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProfileFile {
    /// The profile used when no `--profile` is given.
    pub default: Option<String>,
    #[serde(default)]
    pub profile: BTreeMap<String, Profile>,
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProfileError {
    #[error("cannot find the client profile file: neither XDG_CONFIG_HOME nor HOME is set")]
    NoHome,
    #[error("client profile file {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "client profile file {path} may be read or changed by group or others (mode {mode:o}); \
         run `chmod 600 {path}`"
    )]
    Permissions { path: PathBuf, mode: u32 },
    #[error("client profile file {path}: {detail}")]
    Invalid { path: PathBuf, detail: String },
    #[error("client profile file {path} has no [profile.{name}] (it has: {known})")]
    Unknown { path: PathBuf, name: String, known: String },
    #[error("client profile file {path} sets no `default`; pass --profile NAME (it has: {known})")]
    NoDefault { path: PathBuf, known: String },
}

/// Where the profile file lives: `$XDG_CONFIG_HOME/nxknock/client.toml`, else
/// `$HOME/.config/nxknock/client.toml` (an empty variable counts as unset, as
/// the XDG base directory specification says).
pub fn default_path() -> Result<PathBuf, ProfileError> {
    let var = |k| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    let base = var("XDG_CONFIG_HOME").or_else(|| var("HOME").map(|h| h.join(".config"))).ok_or(ProfileError::NoHome)?;
    Ok(base.join("nxknock").join("client.toml"))
}

impl ProfileFile {
    /// Read and check the file at `path`.
    pub fn load(path: &Path) -> Result<ProfileFile, ProfileError> {
        let io = |source| ProfileError::Io { path: path.to_owned(), source };
        let mode = std::fs::metadata(path).map_err(io)?.permissions().mode();
        if mode & 0o066 != 0 {
            return Err(ProfileError::Permissions { path: path.to_owned(), mode: mode & 0o777 });
        }
        let text = std::fs::read_to_string(path).map_err(io)?;
        let invalid = |detail: String| ProfileError::Invalid { path: path.to_owned(), detail };
        let mut file: ProfileFile = toml::from_str(&text).map_err(|e| invalid(e.to_string().trim_end().to_owned()))?;
        if let Some(name) = &file.default {
            if !file.profile.contains_key(name) {
                return Err(invalid(format!("default = {name:?} but there is no [profile.{name}]")));
            }
        }
        let dir = path.parent().unwrap_or(Path::new("."));
        for p in file.profile.values_mut() {
            if let Some(c) = &p.credential {
                p.credential = Some(expand(c, dir));
            }
        }
        Ok(file)
    }

    /// The profile called `name`, or the default one.
    pub fn select(&self, path: &Path, name: Option<&str>) -> Result<&Profile, ProfileError> {
        let known = || {
            let names: Vec<&str> = self.profile.keys().map(String::as_str).collect();
            if names.is_empty() { "no profiles".to_owned() } else { names.join(", ") }
        };
        let name = match name.or(self.default.as_deref()) {
            Some(n) => n,
            None => return Err(ProfileError::NoDefault { path: path.to_owned(), known: known() }),
        };
        self.profile.get(name).ok_or_else(|| ProfileError::Unknown {
            path: path.to_owned(),
            name: name.to_owned(),
            known: known(),
        })
    }
}

/// `~/x` is `$HOME/x`; a relative path is relative to the profile file's directory.
fn expand(p: &Path, dir: &Path) -> PathBuf {
    if let Ok(rest) = p.strip_prefix("~") {
        if let Some(home) = std::env::var_os("HOME").filter(|h| !h.is_empty()) {
            return PathBuf::from(home).join(rest);
        }
    }
    if p.is_relative() { dir.join(p) } else { p.to_owned() }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, text: &str, mode: u32) -> PathBuf {
        let p = dir.join("client.toml");
        std::fs::write(&p, text).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        p
    }

    #[test]
    fn profiles_load_select_and_resolve_relative_credentials() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(
            dir.path(),
            "default = \"work\"\n[profile.work]\ncredential = \"a.cred\"\nserver = \"ns1.example\"\nip = \"auto\"\n\
             [profile.home]\ncredential = \"/abs/b.cred\"\nresolver = \"system\"\nservice = \"ssh\"\n",
            0o600,
        );
        let f = ProfileFile::load(&p).unwrap();
        let work = f.select(&p, None).unwrap();
        assert_eq!(work.credential.as_deref(), Some(dir.path().join("a.cred").as_path()));
        assert_eq!((work.server.as_deref(), work.ip.as_deref()), (Some("ns1.example"), Some("auto")));
        let home = f.select(&p, Some("home")).unwrap();
        assert_eq!(home.credential.as_deref(), Some(Path::new("/abs/b.cred")));
        let e = f.select(&p, Some("nope")).unwrap_err().to_string();
        assert!(e.contains("nope") && e.contains("home, work"), "{e}");
    }

    #[test]
    fn unknown_keys_open_files_and_a_missing_default_are_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(dir.path(), "[profile.x]\ncredentials = \"a\"\n", 0o600);
        let e = ProfileFile::load(&p).unwrap_err().to_string();
        assert!(e.contains("credentials") && e.contains("client.toml"), "{e}");
        let p = write(dir.path(), "defualt = \"x\"\n", 0o600);
        assert!(ProfileFile::load(&p).unwrap_err().to_string().contains("defualt"));
        let p = write(dir.path(), "[profile.x]\n", 0o644);
        let e = ProfileFile::load(&p).unwrap_err().to_string();
        assert!(e.contains("chmod 600") && e.contains("client.toml"), "{e}");
        let p = write(dir.path(), "default = \"y\"\n[profile.x]\n", 0o600);
        assert!(ProfileFile::load(&p).unwrap_err().to_string().contains("no [profile.y]"));
        let p = write(dir.path(), "[profile.x]\n", 0o600);
        let e = ProfileFile::load(&p).unwrap().select(&p, None).unwrap_err().to_string();
        assert!(e.contains("--profile") && e.contains('x'), "{e}");
    }
}
