//! The node agent's one error type. Every variant says what failed and what to do.
/// What can stop the node agent.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "loading eBPF programs needs root, or the capabilities CAP_BPF, CAP_PERFMON and \
         CAP_DAC_READ_SEARCH (missing: {missing}); run the agent as root (e.g. with sudo)"
    )]
    MissingPrivileges { missing: String },

    #[error(
        "attaching to the kernel's {tracepoint} tracepoint failed: {source}; Trazor needs \
         Linux 6.3 or later (its socket layer has the sock_recv_length and sock_send_length \
         tracepoints)"
    )]
    Attach {
        tracepoint: &'static str,
        #[source]
        source: Box<aya::programs::ProgramError>,
    },

    #[error("loading the eBPF object failed: {0}")]
    Load(#[source] Box<aya::EbpfError>),

    #[error("the eBPF object has no {kind} named {name}: the agent and its eBPF build disagree")]
    MissingInObject { kind: &'static str, name: String },

    #[error("the kernel rejected program {program}: {source}")]
    Program {
        program: String,
        #[source]
        source: Box<aya::programs::ProgramError>,
    },

    #[error("eBPF map {map} failed: {source}")]
    Map {
        map: &'static str,
        #[source]
        source: Box<aya::maps::MapError>,
    },

    #[error("invalid configuration: {0}")]
    Config(String),

    #[error(
        "invalid collector address {address:?}: {reason}; expected e.g. http://127.0.0.1:50051"
    )]
    CollectorAddress { address: String, reason: String },

    #[error("{what} failed: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

/// The node agent's `Result`.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn map(map: &'static str) -> impl FnOnce(aya::maps::MapError) -> Self {
        move |source| Self::Map {
            map,
            source: Box::new(source),
        }
    }

    pub(crate) fn program(program: &str) -> impl FnOnce(aya::programs::ProgramError) -> Self {
        let program = program.to_owned();
        move |source| Self::Program {
            program,
            source: Box::new(source),
        }
    }
}
