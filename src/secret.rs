//! Secrets: values that never appear in logs, errors or `Debug` output, and where they come from.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// A secret string. `Debug` and `Display` print `[redacted]`; the value is only reachable
/// through [`Secret::expose`], whose call sites are the few places that send it to a server.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }

    /// The secret value. Only for handing it to the server or the SASL layer.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl Drop for Secret {
    fn drop(&mut self) {
        // Best effort: overwrite the bytes before the allocation is freed.
        // SAFETY: zero bytes are valid UTF-8.
        unsafe { self.0.as_bytes_mut().fill(0) };
    }
}

/// Where a secret comes from, as written in the config:
/// `"literal"`, `{ env = "VAR" }`, `{ file = "path" }` or `{ command = ["prog", "arg"] }`.
#[derive(Clone, PartialEq, Eq)]
pub enum SecretSource {
    Literal(Secret),
    Env(String),
    File(PathBuf),
    Command(Vec<String>),
}

impl fmt::Debug for SecretSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SecretSource::Literal(_) => f.write_str("Literal([redacted])"),
            SecretSource::Env(v) => f.debug_tuple("Env").field(v).finish(),
            SecretSource::File(p) => f.debug_tuple("File").field(p).finish(),
            SecretSource::Command(c) => f.debug_tuple("Command").field(c).finish(),
        }
    }
}

/// Why a secret could not be read. Never contains the secret.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("environment variable {0} is not set or not valid UTF-8")]
    Env(String),
    #[error("cannot read secret file {path}")]
    File {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot run secret command {program}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("secret command {program} failed with {status}")]
    Command {
        program: String,
        status: std::process::ExitStatus,
    },
    #[error("secret from {0} is not valid UTF-8")]
    Utf8(String),
}

impl SecretSource {
    /// Reads the secret. Files and command output lose one trailing newline (`\n` or `\r\n`),
    /// nothing else: a password may legitimately end in spaces.
    pub async fn resolve(&self) -> Result<Secret, SecretError> {
        match self {
            SecretSource::Literal(s) => Ok(s.clone()),
            SecretSource::Env(var) => std::env::var(var)
                .map(Secret)
                .map_err(|_| SecretError::Env(var.clone())),
            SecretSource::File(path) => {
                let bytes = tokio::fs::read(path).await.map_err(|source| SecretError::File {
                    path: path.clone(),
                    source,
                })?;
                trimmed(bytes).ok_or_else(|| SecretError::Utf8(path.display().to_string()))
            }
            SecretSource::Command(argv) => {
                let program = argv.first().cloned().unwrap_or_default();
                let out = tokio::process::Command::new(&program)
                    .args(&argv[1.min(argv.len())..])
                    .stdin(std::process::Stdio::null())
                    .stderr(std::process::Stdio::inherit())
                    .output()
                    .await
                    .map_err(|source| SecretError::Spawn {
                        program: program.clone(),
                        source,
                    })?;
                if !out.status.success() {
                    return Err(SecretError::Command {
                        program,
                        status: out.status,
                    });
                }
                trimmed(out.stdout).ok_or(SecretError::Utf8(program))
            }
        }
    }

    /// Makes a `file` source relative to `base` (the config file's folder).
    pub(crate) fn relative_to(self, base: &Path) -> SecretSource {
        match self {
            SecretSource::File(p) => SecretSource::File(base.join(p)),
            other => other,
        }
    }
}

fn trimmed(mut bytes: Vec<u8>) -> Option<Secret> {
    if bytes.ends_with(b"\n") {
        bytes.pop();
        if bytes.ends_with(b"\r") {
            bytes.pop();
        }
    }
    String::from_utf8(bytes).ok().map(Secret)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SecretTable {
    env: Option<String>,
    file: Option<PathBuf>,
    command: Option<Vec<String>>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawSecret {
    Literal(String),
    Table(SecretTable),
}

impl<'de> Deserialize<'de> for SecretSource {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let raw = RawSecret::deserialize(d).map_err(|_| {
            D::Error::custom("expected a string, { env = \"VAR\" }, { file = \"path\" } or { command = [..] }")
        })?;
        match raw {
            RawSecret::Literal(s) => Ok(SecretSource::Literal(Secret(s))),
            RawSecret::Table(SecretTable {
                env: Some(v),
                file: None,
                command: None,
            }) => Ok(SecretSource::Env(v)),
            RawSecret::Table(SecretTable {
                env: None,
                file: Some(p),
                command: None,
            }) => Ok(SecretSource::File(p)),
            RawSecret::Table(SecretTable {
                env: None,
                file: None,
                command: Some(c),
            }) => {
                if c.is_empty() {
                    return Err(D::Error::custom("`command` needs at least a program"));
                }
                Ok(SecretSource::Command(c))
            }
            RawSecret::Table(_) => Err(D::Error::custom("give exactly one of `env`, `file` or `command`")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_the_value() {
        let s = SecretSource::Literal(Secret::new("hunter2"));
        assert!(!format!("{s:?}").contains("hunter2"));
        assert!(!format!("{:?} {}", Secret::new("hunter2"), Secret::new("hunter2")).contains("hunter2"));
    }

    #[tokio::test]
    async fn file_and_command_lose_one_newline_only() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("pw");
        std::fs::write(&p, "a b \n").unwrap();
        let got = SecretSource::File(p).resolve().await.unwrap();
        assert_eq!(got.expose(), "a b ");
        let cmd = SecretSource::Command(vec!["printf".into(), "x\\r\\n".into()]);
        assert_eq!(cmd.resolve().await.unwrap().expose(), "x");
    }
}
