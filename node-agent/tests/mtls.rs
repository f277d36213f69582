//! Mutual TLS between the real shipper and the real collector: certificates are made at
//! test time (no key is ever committed); an agent with a certificate from the collector's
//! client CA delivers, one without cannot connect, and neither can one that does not trust
//! the collector's CA.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use trazor_collector::{BoundCollector, CollectorConfig, auth::ServerTls};
use trazor_node_agent::ship::{
    ClientTls, Delivery, Outbox, ShipperStats, collector_endpoint, deliver, with_tls,
};
use trazor_proto::v1::{AgentHello, LatencyWindow};

struct Pki {
    ca_pem: String,
    server: (String, String),
    client: (String, String),
}

fn make_pki() -> Pki {
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let leaf = |names: Vec<String>| {
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(names)
            .unwrap()
            .signed_by(&key, &ca)
            .unwrap();
        (cert.pem(), key.serialize_pem())
    };
    Pki {
        server: leaf(vec!["collector.trazor.test".into()]),
        client: leaf(vec!["agent.trazor.test".into()]),
        ca_pem: ca.pem(),
    }
}

fn agent_tls(pki: &Pki, with_identity: bool) -> ClientTls {
    ClientTls {
        ca_pem: pki.ca_pem.clone().into_bytes(),
        identity: with_identity.then(|| {
            (
                pki.client.0.clone().into_bytes(),
                pki.client.1.clone().into_bytes(),
            )
        }),
        domain: Some("collector.trazor.test".into()),
    }
}

fn start_agent(address: &str, tls: &ClientTls) -> (Arc<Outbox>, tokio::task::JoinHandle<()>) {
    let outbox = Arc::new(Outbox::new(100, Arc::new(ShipperStats::default())));
    let endpoint = with_tls(collector_endpoint(address).unwrap(), Some(tls))
        .unwrap()
        .connect_timeout(Duration::from_millis(500));
    let task = tokio::spawn(deliver(
        Delivery {
            endpoint,
            hello: AgentHello {
                node_name: "n".into(),
                agent_id: "tls-agent".into(),
                boot_id: format!("{:p}", &outbox),
                version: "test".into(),
                capabilities: vec![],
            },
            token: None,
        },
        outbox.clone(),
    ));
    let windows = (0..5)
        .map(|_| LatencyWindow {
            start_unix_nanos: 1,
            end_unix_nanos: 2,
            ..Default::default()
        })
        .collect();
    outbox.push(windows);
    (outbox, task)
}

async fn until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_agents_with_a_client_certificate_deliver() {
    let pki = make_pki();
    let collector = BoundCollector::bind(&CollectorConfig {
        tls: Some(ServerTls {
            cert_pem: pki.server.0.clone().into_bytes(),
            key_pem: pki.server.1.clone().into_bytes(),
            client_ca_pem: Some(pki.ca_pem.clone().into_bytes()),
        }),
        ..Default::default()
    })
    .await
    .unwrap();
    let https = format!("https://{}", collector.grpc_addr());
    let stats = collector.stats();
    tokio::spawn(collector.serve());

    let (trusted, _task) = start_agent(&https, &agent_tls(&pki, true));
    until("the agent with a certificate is acknowledged", || {
        trusted.acked_through() == 5
    })
    .await;

    // No client certificate: the handshake fails, again and again; nothing is delivered.
    let (anonymous, _task) = start_agent(&https, &agent_tls(&pki, false));
    until("the agent without a certificate failed twice", || {
        anonymous.stats().stream_failures.load(Ordering::Relaxed) >= 2
    })
    .await;
    assert_eq!(anonymous.acked_through(), 0);
    assert!(!anonymous.stats().connected.load(Ordering::Relaxed));

    // An agent that trusts another CA refuses the collector.
    let other = make_pki();
    let (distrustful, _task) = start_agent(&https, &agent_tls(&other, true));
    until("the agent trusting another CA failed twice", || {
        distrustful.stats().stream_failures.load(Ordering::Relaxed) >= 2
    })
    .await;
    assert_eq!(distrustful.acked_through(), 0);
    assert_eq!(
        stats.windows_merged.load(Ordering::Relaxed) + stats.windows_late.load(Ordering::Relaxed),
        5
    );
}
