//! TLS for the OTLP export, over HTTP and gRPC, with certificates made at test time (no
//! key is committed). Rotel, the third-party receiver of `otlp_grpc.rs`, has TLS options
//! for its exporter only, so the third-party path is nginx (a real TLS server, requiring a
//! client certificate) in front of Rotel; the failure cases use receivers in this test: an
//! OTLP/HTTP server (hyper over tokio-rustls) and an OTLP/gRPC server (tonic with rustls),
//! both decoding the real `opentelemetry-proto` messages and both requiring a client
//! certificate from the test CA.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    convert::Infallible,
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use bytes::Bytes;
use common::{metrics_with_all, pod_window, send, start_collector, window_end, with_exemplars};
use http_body_util::{BodyExt as _, Full};
use hyper_util::rt::TokioIo;
use opentelemetry_proto::tonic::collector::{
    metrics::v1::{
        ExportMetricsServiceRequest, ExportMetricsServiceResponse,
        metrics_service_server::{MetricsService, MetricsServiceServer},
    },
    trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
        trace_service_server::{TraceService, TraceServiceServer},
    },
};
use prost::Message as _;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType, IsCa, KeyPair,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _};
use trazor_collector::otlp::{OtlpConfig, OtlpProtocol, SERVER_DURATION_METRIC, TlsPaths};
use trazor_proto::v1::{AgentMessage, Exemplar, agent_message};

mod common;

/// A CA with a server certificate for `localhost` and a client certificate, as PEM files.
struct Pki {
    ca: PathBuf,
    server: (String, String),
    client: (PathBuf, PathBuf),
    ca_pem: String,
}

fn make_pki(directory: &std::path::Path, name: &str) -> Pki {
    // Distinct names for the CA and each leaf: with rcgen's one default name for all,
    // OpenSSL (nginx) takes a leaf whose issuer is its own subject for self-signed.
    let named = |params: &mut CertificateParams, name: &str| {
        let mut distinguished = DistinguishedName::new();
        distinguished.push(DnType::CommonName, name);
        params.distinguished_name = distinguished;
    };
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    named(&mut ca_params, &format!("Trazor test CA {name}"));
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let leaf = |names: Vec<String>| {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(names.clone()).unwrap();
        named(&mut params, &names[0]);
        let cert = params.signed_by(&key, &ca).unwrap();
        (cert.pem(), key.serialize_pem())
    };
    let server = leaf(vec!["localhost".into()]);
    let client = leaf(vec!["trazor-collector.test".into()]);
    let write = |file: &str, text: &str| {
        let path = directory.join(format!("{name}-{file}"));
        std::fs::write(&path, text).unwrap();
        path
    };
    Pki {
        ca: write("ca.crt", &ca.pem()),
        client: (write("tls.crt", &client.0), write("tls.key", &client.1)),
        server,
        ca_pem: ca.pem(),
    }
}

/// A fresh directory for one test's PEM files.
fn directory(test: &str) -> PathBuf {
    let directory =
        std::env::temp_dir().join(format!("trazor-otlp-tls-{test}-{}", std::process::id()));
    std::fs::create_dir_all(&directory).unwrap();
    directory
}

/// What a receiver decoded: metric names and span names.
#[derive(Default)]
struct Decoded {
    metrics: Vec<String>,
    spans: Vec<String>,
}

type Received = Arc<Mutex<Decoded>>;

fn record_metrics(received: &Received, request: &ExportMetricsServiceRequest) {
    let names = request
        .resource_metrics
        .iter()
        .flat_map(|resource| &resource.scope_metrics)
        .flat_map(|scope| &scope.metrics)
        .map(|metric| metric.name.clone());
    received.lock().unwrap().metrics.extend(names);
}

fn record_spans(received: &Received, request: &ExportTraceServiceRequest) {
    let names = request
        .resource_spans
        .iter()
        .flat_map(|resource| &resource.scope_spans)
        .flat_map(|scope| &scope.spans)
        .map(|span| span.name.clone());
    received.lock().unwrap().spans.extend(names);
}

/// An OTLP/HTTP receiver over TLS with `pki`'s server certificate that requires a client
/// certificate from `pki`'s CA.
async fn serve_https(pki: &Pki) -> (SocketAddr, Received) {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(pki.ca_pem.as_bytes()).unwrap())
        .unwrap();
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()
    .unwrap();
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            vec![CertificateDer::from_pem_slice(pki.server.0.as_bytes()).unwrap()],
            PrivateKeyDer::from_pem_slice(pki.server.1.as_bytes()).unwrap(),
        )
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let received = Received::default();
    let recorder = received.clone();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let (acceptor, received) = (acceptor.clone(), recorder.clone());
            tokio::spawn(async move {
                // A refused handshake is what some tests expect.
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let service = hyper::service::service_fn(
                    move |request: http::Request<hyper::body::Incoming>| {
                        let received = received.clone();
                        async move {
                            let path = request.uri().path().to_owned();
                            let body: Bytes =
                                request.into_body().collect().await.unwrap().to_bytes();
                            match path.as_str() {
                                "/v1/metrics" => record_metrics(
                                    &received,
                                    &ExportMetricsServiceRequest::decode(body).unwrap(),
                                ),
                                "/v1/traces" => record_spans(
                                    &received,
                                    &ExportTraceServiceRequest::decode(body).unwrap(),
                                ),
                                other => panic!("request to {other}"),
                            }
                            Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::new())))
                        }
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    (address, received)
}

struct GrpcReceiver(Received);

#[tonic::async_trait]
impl MetricsService for GrpcReceiver {
    async fn export(
        &self,
        request: tonic::Request<ExportMetricsServiceRequest>,
    ) -> Result<tonic::Response<ExportMetricsServiceResponse>, tonic::Status> {
        record_metrics(&self.0, request.get_ref());
        Ok(tonic::Response::new(ExportMetricsServiceResponse::default()))
    }
}

#[tonic::async_trait]
impl TraceService for GrpcReceiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        record_spans(&self.0, request.get_ref());
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

/// An OTLP/gRPC receiver over TLS, requiring a client certificate from `pki`'s CA.
async fn serve_grpcs(pki: &Pki) -> (SocketAddr, Received) {
    use tonic::transport::{Certificate, Identity, ServerTlsConfig};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let received = Received::default();
    let tls = ServerTlsConfig::new()
        .identity(Identity::from_pem(&pki.server.0, &pki.server.1))
        .client_ca_root(Certificate::from_pem(&pki.ca_pem));
    tokio::spawn(
        tonic::transport::Server::builder()
            .tls_config(tls)
            .unwrap()
            .add_service(MetricsServiceServer::new(GrpcReceiver(received.clone())))
            .add_service(TraceServiceServer::new(GrpcReceiver(received.clone())))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    (address, received)
}

/// A window of Deployment shop/checkout with two exemplars.
fn checkout_window() -> AgentMessage {
    with_exemplars(
        pod_window(1, "checkout-1", window_end(), &[(1_400, 3)], &[0, 0, 3]),
        2,
    )
}

/// Exports one checkout window with `config` and returns the collector's counters once
/// the export has ended as `lines` say.
async fn export(config: OtlpConfig, lines: &[&str]) -> String {
    let running = start_collector(Some(config)).await;
    send(&running.grpc, "agent-a", vec![checkout_window()]).await;
    metrics_with_all(&running.stats, lines).await
}

/// Settings trusting `pki`'s CA, with its client certificate when `identity`.
fn tls_config(
    protocol: OtlpProtocol,
    address: SocketAddr,
    pki: &Pki,
    identity: bool,
) -> OtlpConfig {
    OtlpConfig {
        protocol,
        certificate: Some(pki.ca.clone()),
        client_certificate: identity.then(|| pki.client.0.clone()),
        client_key: identity.then(|| pki.client.1.clone()),
        ..OtlpConfig::new(format!("https://localhost:{}", address.port()))
    }
}

const DELIVERED: &[&str] = &[
    "trazor_collector_otlp_points_exported_total 2",
    "trazor_collector_otlp_spans_exported_total 2",
    "trazor_collector_otlp_failures_total 0",
];

/// Refused at the handshake: dropped after one attempt each (metrics and spans), not
/// retried (the default policy would try six times over more than 7 s).
const REFUSED_AT_ONCE: &[&str] = &[
    "trazor_collector_otlp_points_dropped_total 2",
    "trazor_collector_otlp_spans_dropped_total 2",
    "trazor_collector_otlp_failures_total 2",
    "trazor_collector_otlp_points_exported_total 0",
];

fn assert_delivered(received: &Received) {
    let received = received.lock().unwrap();
    assert!(
        received
            .metrics
            .iter()
            .any(|name| name == SERVER_DURATION_METRIC),
        "{:?}",
        received.metrics
    );
    assert_eq!(received.spans, ["GET /cart/{id}", "GET /cart/{id}"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_mtls_receiver_gets_metrics_and_spans_over_http_and_grpc() {
    let directory = directory("delivered");
    let pki = make_pki(&directory, "test");
    let (address, received) = serve_https(&pki).await;
    export(
        tls_config(OtlpProtocol::HttpProtobuf, address, &pki, true),
        DELIVERED,
    )
    .await;
    assert_delivered(&received);
    let (address, received) = serve_grpcs(&pki).await;
    export(
        tls_config(OtlpProtocol::Grpc, address, &pki, true),
        DELIVERED,
    )
    .await;
    assert_delivered(&received);
    std::fs::remove_dir_all(&directory).unwrap();
}

/// Metrics to one receiver and spans to another, each with its own CA and client
/// certificate (as Mimir and Tempo behind different CAs): the traces settings
/// (`OTEL_EXPORTER_OTLP_TRACES_*`) win over the generic ones for spans alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_signal_can_have_its_own_ca_and_client_certificate() {
    let directory = directory("signals");
    let mimir = make_pki(&directory, "mimir");
    let tempo = make_pki(&directory, "tempo");
    let (metrics_address, metrics_received) = serve_https(&mimir).await;
    let (traces_address, traces_received) = serve_https(&tempo).await;
    export(
        OtlpConfig {
            endpoint: None,
            metrics_endpoint: Some(format!(
                "https://localhost:{}/v1/metrics",
                metrics_address.port()
            )),
            traces_endpoint: Some(format!(
                "https://localhost:{}/v1/traces",
                traces_address.port()
            )),
            certificate: Some(mimir.ca.clone()),
            client_certificate: Some(mimir.client.0.clone()),
            client_key: Some(mimir.client.1.clone()),
            traces_tls: TlsPaths {
                certificate: Some(tempo.ca.clone()),
                client_certificate: Some(tempo.client.0.clone()),
                client_key: Some(tempo.client.1.clone()),
            },
            ..OtlpConfig::default()
        },
        DELIVERED,
    )
    .await;
    let metrics = metrics_received.lock().unwrap();
    assert!(
        metrics
            .metrics
            .iter()
            .any(|name| name == SERVER_DURATION_METRIC)
    );
    assert!(metrics.spans.is_empty());
    let traces = traces_received.lock().unwrap();
    assert!(traces.metrics.is_empty());
    assert_eq!(traces.spans, ["GET /cart/{id}", "GET /cart/{id}"]);
    std::fs::remove_dir_all(&directory).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_whose_certificate_is_not_from_the_given_ca_is_refused_at_once() {
    let directory = directory("rogue");
    let trusted = make_pki(&directory, "trusted");
    let rogue = make_pki(&directory, "rogue");
    for protocol in [OtlpProtocol::HttpProtobuf, OtlpProtocol::Grpc] {
        let (address, received) = match protocol {
            OtlpProtocol::HttpProtobuf => serve_https(&rogue).await,
            OtlpProtocol::Grpc => serve_grpcs(&rogue).await,
        };
        let started = Instant::now();
        export(
            tls_config(protocol, address, &trusted, true),
            REFUSED_AT_ONCE,
        )
        .await;
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{protocol:?}: refused after {:?}: retried",
            started.elapsed()
        );
        let received = received.lock().unwrap();
        assert!(received.metrics.is_empty() && received.spans.is_empty());
    }
    std::fs::remove_dir_all(&directory).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_mtls_receiver_refuses_a_collector_without_a_client_certificate() {
    let directory = directory("anonymous");
    let pki = make_pki(&directory, "test");
    for protocol in [OtlpProtocol::HttpProtobuf, OtlpProtocol::Grpc] {
        let (address, received) = match protocol {
            OtlpProtocol::HttpProtobuf => serve_https(&pki).await,
            OtlpProtocol::Grpc => serve_grpcs(&pki).await,
        };
        let config = OtlpConfig {
            // Whether the receiver's refusal reaches the collector as a TLS alert (not
            // retried) or as a closed connection (retried) depends on timing: TLS 1.3 checks
            // the client certificate after the client's handshake is done. Both were seen
            // here; either way nothing may get through.
            max_attempts: 2,
            initial_backoff: Duration::from_millis(50),
            ..tls_config(protocol, address, &pki, false)
        };
        export(
            config,
            &[
                "trazor_collector_otlp_points_dropped_total 2",
                "trazor_collector_otlp_spans_dropped_total 2",
                "trazor_collector_otlp_points_exported_total 0",
            ],
        )
        .await;
        let received = received.lock().unwrap();
        assert!(received.metrics.is_empty() && received.spans.is_empty());
    }
    std::fs::remove_dir_all(&directory).unwrap();
}

/// The real binary, started with `args` and the system roots taken from `roots` (a file
/// rustls-native-certs reads instead of the system's): its exit and what it printed.
fn collector_binary(args: &[&str], roots: &std::path::Path) -> (bool, String) {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_trazor-collector"))
        .args(["--grpc-listen=127.0.0.1:0", "--http-listen=127.0.0.1:0"])
        .args(args)
        .env("SSL_CERT_FILE", roots)
        .env_remove("SSL_CERT_DIR")
        .env_remove("OTEL_EXPORTER_OTLP_CERTIFICATE")
        .env_remove("OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE")
        .env_remove("OTEL_EXPORTER_OTLP_CLIENT_KEY")
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn settings_that_cannot_work_stop_the_collector_at_start_saying_what_to_do() {
    let directory = directory("start");
    let pki = make_pki(&directory, "test");
    let no_roots = directory.join("no-roots.pem");
    std::fs::write(&no_roots, "").unwrap();
    let ca = pki.ca.to_str().unwrap();
    for (args, says) in [
        // As in the collector's image, which has no CA bundle.
        (
            vec!["--otlp-endpoint=https://otel:4318"],
            "has no root certificates (the collector's image has none): give the endpoint's \
             CA with --otlp-certificate",
        ),
        (
            vec!["--otlp-endpoint=http://otel:4318", "--otlp-certificate", ca],
            "is plain http:// but a TLS certificate or key is set: use an https:// endpoint",
        ),
        (
            vec![
                "--otlp-endpoint=https://otel:4318",
                "--otlp-client-key",
                pki.client.1.to_str().unwrap(),
            ],
            "--otlp-client-key needs its certificate",
        ),
        (
            vec![
                "--otlp-endpoint=https://otel:4318",
                "--otlp-certificate",
                pki.client.1.to_str().unwrap(),
            ],
            "holds no PEM certificate",
        ),
    ] {
        let (success, stderr) = collector_binary(&args, &no_roots);
        assert!(!success, "{args:?} started");
        assert!(stderr.contains(says), "{args:?}: {stderr}");
    }
    std::fs::remove_dir_all(&directory).unwrap();
}

/// nginx (Debian's `nginx-light`, installed by scripts/setup.sh), a third-party TLS server,
/// terminating mutual TLS in front of Rotel: OTLP/HTTP proxied to Rotel's HTTP port,
/// OTLP/gRPC (HTTP/2, `grpc_pass`) to its gRPC port. Killed on drop.
struct Nginx {
    child: std::process::Child,
    https_port: u16,
    grpcs_port: u16,
}

impl Nginx {
    fn start(directory: &std::path::Path, pki: &Pki, rotel: &common::rotel::Rotel) -> Self {
        let binary = ["/usr/sbin/nginx", "/usr/local/sbin/nginx"]
            .into_iter()
            .map(PathBuf::from)
            .find(|path| path.is_file())
            .expect(
                "nginx is missing: this test needs the nginx that scripts/setup.sh installs \
                 (Debian's nginx-light) as the TLS server in front of Rotel; run it",
            );
        // The ports are picked free, but a test running in parallel may bind one before nginx
        // does: nginx then exits at start, and another set of ports is tried.
        for _ in 0..3 {
            let ports = (common::rotel::free_port(), common::rotel::free_port());
            if let Some(nginx) = Self::start_on(&binary, directory, pki, rotel, ports) {
                return nginx;
            }
        }
        panic!("nginx could not start (see its errors above)");
    }

    /// nginx on `https_port` (HTTP) and `grpcs_port` (gRPC), once both listen; `None` if it
    /// exited instead.
    fn start_on(
        binary: &std::path::Path,
        directory: &std::path::Path,
        pki: &Pki,
        rotel: &common::rotel::Rotel,
        (https_port, grpcs_port): (u16, u16),
    ) -> Option<Self> {
        let write = |file: &str, text: &str| {
            let path = directory.join(file);
            std::fs::write(&path, text).unwrap();
            path.display().to_string()
        };
        let certificate = write("nginx-server.crt", &pki.server.0);
        let key = write("nginx-server.key", &pki.server.1);
        let ca = pki.ca.display().to_string();
        let prefix = directory.display();
        let tls = format!(
            "ssl_certificate {certificate}; ssl_certificate_key {key}; \
             ssl_client_certificate {ca}; ssl_verify_client on;"
        );
        let config = format!(
            "worker_processes 1;\n\
             master_process off;\n\
             pid {prefix}/nginx.pid;\n\
             error_log stderr info;\n\
             events {{ worker_connections 64; }}\n\
             http {{\n\
               access_log off;\n\
               client_body_temp_path {prefix}/nginx-body;\n\
               proxy_temp_path {prefix}/nginx-proxy;\n\
               fastcgi_temp_path {prefix}/nginx-fastcgi;\n\
               uwsgi_temp_path {prefix}/nginx-uwsgi;\n\
               scgi_temp_path {prefix}/nginx-scgi;\n\
               server {{ listen 127.0.0.1:{https_port} ssl; {tls}\n\
                 location / {{ proxy_http_version 1.1; proxy_pass http://127.0.0.1:{}; }} }}\n\
               server {{ listen 127.0.0.1:{grpcs_port} ssl http2; {tls}\n\
                 location / {{ grpc_pass grpc://127.0.0.1:{}; }} }}\n\
             }}\n",
            rotel.http_port, rotel.grpc_port
        );
        let config_path = write("nginx.conf", &config);
        let child = std::process::Command::new(binary)
            .args(["-p", &prefix.to_string(), "-c", &config_path])
            .args(["-g", "daemon off;"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::inherit())
            .spawn()
            .unwrap_or_else(|error| panic!("cannot start {}: {error}", binary.display()));
        let mut nginx = Self {
            child,
            https_port,
            grpcs_port,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        for port in [https_port, grpcs_port] {
            while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
                if let Ok(Some(_)) = nginx.child.try_wait() {
                    return None;
                }
                assert!(Instant::now() < deadline, "nginx did not listen on {port}");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        // What answered must be nginx, not a server of another test on a port taken first.
        std::thread::sleep(Duration::from_millis(200));
        match nginx.child.try_wait() {
            Ok(None) => Some(nginx),
            _ => None,
        }
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Through a real TLS server to a real receiver: nginx checks the collector's client
/// certificate against the test CA and presents a server certificate the collector checks
/// against it, over HTTP/1.1 and over HTTP/2 (gRPC); Rotel behind it decodes and prints
/// the metrics and spans. Without a client certificate nginx answers 400 and nothing
/// reaches Rotel.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_through_nginx_reaches_rotel_over_http_and_grpc() {
    let directory = directory("nginx");
    let pki = make_pki(&directory, "test");
    let rotel = common::rotel::Rotel::start();
    let nginx = Nginx::start(&directory, &pki, &rotel);
    let address = |port: u16| SocketAddr::from(([127, 0, 0, 1], port));
    for (protocol, port, count) in [
        (OtlpProtocol::HttpProtobuf, nginx.https_port, 3),
        (OtlpProtocol::Grpc, nginx.grpcs_port, 6),
    ] {
        let running = start_collector(Some(tls_config(protocol, address(port), &pki, true))).await;
        let end = window_end();
        let mut message = pod_window(1, "checkout-1", end, &[(1_400, count)], &[0, 0, count]);
        let Some(agent_message::Kind::Window(window)) = &mut message.kind else {
            panic!("pod_window made no window");
        };
        window.exemplars = vec![Exemplar {
            start_unix_nanos: end - 500_000_000,
            duration_nanos: 2_000_000,
            method: "GET".into(),
            status_code: 200,
            path: "/cart/42".into(),
            tid: u32::try_from(count).unwrap(),
        }];
        send(&running.grpc, "agent-a", vec![message]).await;
        let metrics = rotel
            .wait_for(&format!("{protocol:?} metrics through nginx"), |block| {
                block.signal == "metrics"
                    && block.attribute("service.name") == Some("checkout")
                    && block.counts.contains(&count)
            })
            .await;
        assert!(
            metrics
                .units
                .contains(&(SERVER_DURATION_METRIC.to_owned(), "s".to_owned())),
            "{metrics:?}"
        );
        metrics_with_all(
            &running.stats,
            &[
                "trazor_collector_otlp_points_exported_total 2",
                "trazor_collector_otlp_spans_exported_total 1",
                "trazor_collector_otlp_failures_total 0",
            ],
        )
        .await;
    }
    let spans: usize = rotel
        .blocks()
        .iter()
        .filter(|block| block.signal == "spans")
        .map(|block| block.names.len())
        .sum();
    assert_eq!(spans, 2, "{:?}", rotel.blocks());

    // No client certificate: nginx refuses the request (400), which is not retried.
    let blocks = rotel.blocks().len();
    export(
        tls_config(
            OtlpProtocol::HttpProtobuf,
            address(nginx.https_port),
            &pki,
            false,
        ),
        &[
            "trazor_collector_otlp_points_dropped_total 2",
            "trazor_collector_otlp_spans_dropped_total 2",
            "trazor_collector_otlp_points_exported_total 0",
        ],
    )
    .await;
    assert_eq!(rotel.blocks().len(), blocks, "{:?}", rotel.blocks());
    drop(nginx);
    std::fs::remove_dir_all(&directory).unwrap();
}
