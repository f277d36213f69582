//! The collector's one error type.
use std::{net::SocketAddr, path::PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot listen on {address} ({source}); pick a free address with --{flag}")]
    Listen {
        address: SocketAddr,
        flag: &'static str,
        source: std::io::Error,
    },
    #[error("the {server} server failed: {reason}")]
    Serve {
        server: &'static str,
        reason: String,
    },
    #[error("cannot read {} ({source}); check --token-file and the --tls-* flags", path.display())]
    TokenFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "cannot open the state directory {} ({source}); check --state-dir and its permissions",
        path.display()
    )]
    State {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid configuration: {0}")]
    Config(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
