//! The collector's one error type.
use std::net::SocketAddr;

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
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
