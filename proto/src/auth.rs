//! The shared secret agents present to the collector (`authorization: Bearer <token>`):
//! both sides read it the same way, from a file (a mounted Secret) or `TRAZOR_TOKEN`. The
//! feed's viewer token is read the same way from its own file or variable
//! ([`load_secret`]).

use std::path::{Path, PathBuf};

/// The environment variable holding the token when no file is given.
pub const TOKEN_ENV: &str = "TRAZOR_TOKEN";

/// Why the token could not be read.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("cannot read the token file {}: {source}", path.display())]
    File {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The file or `env` held only white space.
    #[error(
        "the token is empty; put the secret in the file (or {env}), or set neither to run without authentication"
    )]
    Empty { env: &'static str },
}

/// Reads the token from `file` (trimmed), else from `TRAZOR_TOKEN`; `None` when neither is
/// set. An empty token is an error, never "no authentication" by accident.
pub fn load_token(file: Option<&Path>) -> Result<Option<String>, TokenError> {
    load_secret(file, TOKEN_ENV)
}

/// Reads a secret from `file` (trimmed), else from the environment variable `env`; `None`
/// when neither is set. An empty secret is [`TokenError::Empty`], never "no
/// authentication" by accident; callers with their own flags word that error themselves.
pub fn load_secret(file: Option<&Path>, env: &'static str) -> Result<Option<String>, TokenError> {
    let token = match file {
        Some(path) => Some(
            std::fs::read_to_string(path)
                .map_err(|source| TokenError::File {
                    path: path.to_owned(),
                    source,
                })?
                .trim()
                .to_owned(),
        ),
        None => std::env::var(env).ok().map(|token| token.trim().to_owned()),
    };
    match token {
        Some(token) if token.is_empty() => Err(TokenError::Empty { env }),
        other => Ok(other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_and_trims_a_token_file_and_refuses_an_empty_one() {
        let path = std::env::temp_dir().join(format!("trazor-token-{}", std::process::id()));
        std::fs::write(&path, "s3cret\n").unwrap();
        assert_eq!(load_token(Some(&path)).unwrap().as_deref(), Some("s3cret"));
        std::fs::write(&path, " \n").unwrap();
        assert!(matches!(
            load_token(Some(&path)),
            Err(TokenError::Empty { env: TOKEN_ENV })
        ));
        assert!(matches!(
            load_secret(Some(&path), "TRAZOR_FEED_TOKEN"),
            Err(TokenError::Empty {
                env: "TRAZOR_FEED_TOKEN"
            })
        ));
        std::fs::remove_file(&path).unwrap();
        assert!(matches!(
            load_token(Some(Path::new("/nonexistent/token"))),
            Err(TokenError::File { .. })
        ));
    }
}
