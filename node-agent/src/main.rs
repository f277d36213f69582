//! `trazor-node-agent`: traces this host's HTTP servers with eBPF and streams per-window
//! latencies to a Trazor collector.
use std::{path::PathBuf, process::ExitCode, time::Duration};

use clap::Parser;
use trazor_node_agent::{AgentConfig, agent::ProfileSource, pods::PodSource};

/// Measures the latency of every HTTP/1.x request served on this host, with eBPF.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Flags {
    /// Collector gRPC address.
    #[arg(
        long,
        env = "TRAZOR_COLLECTOR",
        default_value = "http://127.0.0.1:50051"
    )]
    collector: String,
    /// Window length, 1s to 5m; windows are aligned to the wall clock.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    window: Duration,
    /// Percentiles to report per window, as fractions.
    #[arg(long, value_delimiter = ',', default_value = "0.5,0.95,0.99")]
    percentiles: Vec<f64>,
    /// Node name reported with each window (default: the host name).
    #[arg(long, env = "NODE_NAME")]
    node_name: Option<String>,
    /// Stable agent identity (default: the node name).
    #[arg(long)]
    agent_id: Option<String>,
    /// Unacknowledged windows kept while the collector is unreachable; the oldest is
    /// dropped (and counted) beyond this.
    #[arg(long, default_value_t = 120_000)]
    buffer_windows: usize,
    /// Trace only processes in this cgroup (repeatable; a path under the cgroup2 mount,
    /// e.g. /system.slice/nginx.service). Default: every process on the host.
    #[arg(long = "select-cgroup", value_name = "PATH")]
    select_cgroups: Vec<PathBuf>,
    /// Which requests to measure: served (server), made (client), or both.
    #[arg(long, value_delimiter = ',', default_value = "server,client")]
    directions: Vec<DirectionFlag>,
    /// Requests at least this slow are kept as exemplars ("0s" disables).
    #[arg(long, default_value = "500ms", value_parser = humantime::parse_duration)]
    slow_threshold: Duration,
    /// Fraction of other requests kept as exemplars.
    #[arg(long, default_value_t = 0.0)]
    sample_rate: f64,
    /// Route template such as /users/{id} or /static/* (repeatable; first match wins).
    #[arg(long = "route-template", value_name = "TEMPLATE")]
    route_templates: Vec<String>,
    /// Distinct routes (by method, and peer) per process and window; the rest go to "other".
    #[arg(long, default_value_t = 200)]
    max_series: usize,
    /// Connections traced at once (about 170 bytes of kernel memory each); beyond, the
    /// least recently used is evicted and counted.
    #[arg(long, default_value_t = trazor_node_agent::capture::DEFAULT_MAX_CONNECTIONS)]
    max_connections: u32,
    /// standalone: trace this host's processes (all, or --select-cgroup). kubernetes: trace
    /// the pods the TraceProfiles select (--config), watching this node's pods in the API.
    #[arg(long, value_enum, default_value = "standalone")]
    mode: Mode,
    /// The operator's configuration document (the mounted ConfigMap); re-read when it
    /// changes. Default in kubernetes mode: /etc/trazor/agent-config.json.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Without a cluster: take the node's pods from this JSON file (an array of
    /// {namespace, name, uid, labels, containers: [{name, id}], workloadKind, workloadName})
    /// instead of the API; used with --config.
    #[arg(long, value_name = "FILE")]
    pods_file: Option<PathBuf>,
    /// Kubernetes mode: the ConfigMap holding the configuration, watched through the API so
    /// changes apply within seconds (the mounted file lags by up to a minute).
    #[arg(long, default_value = "trazor-node-agent-config")]
    config_map: String,
    /// Namespace of --config-map (the agent's own, from the downward API).
    #[arg(long, env = "POD_NAMESPACE")]
    namespace: Option<String>,
    /// File holding the bearer token for the collector (e.g. a mounted Secret). Without
    /// it, the TRAZOR_TOKEN environment variable; without either, no token is sent.
    #[arg(long, value_name = "FILE")]
    token_file: Option<PathBuf>,
    /// Keep unacknowledged windows on disk here too, so a restart resends them instead of
    /// losing them (a hostPath in Kubernetes). Without it the outbox is in memory only.
    #[arg(long, value_name = "DIR")]
    spool_dir: Option<PathBuf>,
    /// Size limit of the spool in bytes; past it the oldest segment is deleted (counted).
    #[arg(long, default_value_t = 256 * 1024 * 1024)]
    spool_max_bytes: u64,
    /// CA (PEM) that signed the collector's certificate: TLS to the collector (use an
    /// https:// --collector address).
    #[arg(long, value_name = "FILE")]
    tls_ca: Option<PathBuf>,
    /// This agent's certificate (PEM) for mutual TLS; with --tls-key and --tls-ca.
    #[arg(long, value_name = "FILE", requires_all = ["tls_key", "tls_ca"])]
    tls_cert: Option<PathBuf>,
    /// This agent's private key (PEM) for mutual TLS; with --tls-cert.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Name the collector's certificate must carry (default: the --collector host).
    #[arg(long, requires = "tls_ca")]
    tls_domain: Option<String>,
    /// Address for the agent's own /metrics, /healthz and /readyz; "off" to not serve them.
    #[arg(long, default_value = "0.0.0.0:9464")]
    metrics_listen: String,
    /// Log filter, e.g. `info` or `trazor_node_agent=debug`.
    #[arg(long, env = "TRAZOR_LOG", default_value = "info")]
    log: String,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Standalone,
    Kubernetes,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum DirectionFlag {
    Server,
    Client,
}

#[tokio::main]
async fn main() -> ExitCode {
    let flags = Flags::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&flags.log)
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let node_name = flags.node_name.unwrap_or_else(host_name);
    let mut config = AgentConfig::new(flags.collector, node_name);
    if let Some(agent_id) = flags.agent_id {
        config.agent_id = agent_id;
    }
    config.window = flags.window;
    config.quantiles = flags.percentiles;
    config.buffer_windows = flags.buffer_windows;
    config.select_cgroups = flags.select_cgroups;
    config.server = flags.directions.contains(&DirectionFlag::Server);
    config.client = flags.directions.contains(&DirectionFlag::Client);
    config.slow_threshold = (!flags.slow_threshold.is_zero()).then_some(flags.slow_threshold);
    config.sample_rate = flags.sample_rate;
    config.route_templates = flags.route_templates;
    config.max_series_per_source = flags.max_series;
    config.max_connections = flags.max_connections;
    config.transport.token = match trazor_node_agent::ship::load_token(flags.token_file.as_deref())
    {
        Ok(token) => token,
        Err(error) => {
            eprintln!("trazor-node-agent: error: {error}");
            return ExitCode::FAILURE;
        }
    };
    config.transport.spool = flags
        .spool_dir
        .map(|dir| trazor_node_agent::spool::SpoolConfig {
            dir,
            max_bytes: flags.spool_max_bytes,
        });
    if let Some(ca) = &flags.tls_ca {
        let identity = flags.tls_cert.as_deref().zip(flags.tls_key.as_deref());
        match trazor_node_agent::ship::ClientTls::from_files(ca, identity, flags.tls_domain.clone())
        {
            Ok(tls) => config.transport.tls = Some(tls),
            Err(error) => {
                eprintln!("trazor-node-agent: error: {error}");
                return ExitCode::FAILURE;
            }
        }
    }
    config.transport.metrics_listen = match flags.metrics_listen.as_str() {
        "off" | "" => None,
        address => match address.parse() {
            Ok(address) => Some(address),
            Err(error) => {
                eprintln!(
                    "trazor-node-agent: error: --metrics-listen {address:?} is not an address \
                     ({error}); use e.g. 0.0.0.0:9464, or off"
                );
                return ExitCode::FAILURE;
            }
        },
    };
    config.profiles = match (flags.mode, flags.config, flags.pods_file) {
        (Mode::Standalone, None, None) => None,
        (Mode::Standalone, Some(config_file), Some(pods_file)) => Some(ProfileSource {
            config_file,
            pods: PodSource::File(pods_file),
            config_map: None,
        }),
        (Mode::Standalone, _, _) => {
            eprintln!(
                "trazor-node-agent: error: --config and --pods-file go together in standalone \
                 mode (profiles select pods); or use --mode kubernetes to take pods from the API"
            );
            return ExitCode::FAILURE;
        }
        (Mode::Kubernetes, config_file, pods_file) => Some(ProfileSource {
            config_file: config_file
                .unwrap_or_else(|| PathBuf::from("/etc/trazor/agent-config.json")),
            config_map: match (&pods_file, flags.namespace) {
                (None, Some(namespace)) => Some((namespace, flags.config_map)),
                _ => None,
            },
            pods: match pods_file {
                Some(path) => PodSource::File(path),
                None => PodSource::Api {
                    node_name: config.node_name.clone(),
                },
            },
        }),
    };
    let agent = match trazor_node_agent::start(config).await {
        Ok(agent) => agent,
        Err(error) => {
            eprintln!("trazor-node-agent: error: {error}");
            return ExitCode::FAILURE;
        }
    };
    tokio::select! {
        () = agent.wait() => {
            eprintln!("trazor-node-agent: error: the agent stopped unexpectedly");
            ExitCode::FAILURE
        }
        _ = tokio::signal::ctrl_c() => ExitCode::SUCCESS,
    }
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|name| name.trim().to_owned())
        .ok()
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "localhost".to_owned())
}
