//! TLS (as for Azure Cache for Redis: `rediss://`, password) against a local redis-server
//! started with TLS only, with certificates the test generates (openssl).

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use axum::routing::get;
use axum::Router;
use common::{get as get_req, send, wait_until, RedisServer};
use tower_redis_cache::{CacheLayer, ConfigError, Policy, RedisConfig, RedisStore};

fn openssl(dir: &Path, args: &[&str]) {
    let status = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .expect("openssl");
    assert!(status.success(), "openssl {args:?}");
}

/// A CA, a server certificate for localhost signed by it, and an unrelated CA.
fn certificates(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    for (key, crt, cn) in [
        ("ca.key", "ca.crt", "Test CA"),
        ("other.key", "other.crt", "Other CA"),
    ] {
        openssl(
            dir,
            &[
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                key,
                "-out",
                crt,
                "-days",
                "2",
                "-subj",
                &format!("/CN={cn}"),
            ],
        );
    }
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=localhost",
        ],
    );
    std::fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\n",
    )
    .unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.crt",
            "-days",
            "2",
            "-extfile",
            "ext.cnf",
        ],
    );
}

fn tls_server() -> (RedisServer, std::path::PathBuf) {
    let certs =
        std::env::temp_dir().join(format!("trc-tls-{}-{}", std::process::id(), rand_suffix()));
    certificates(&certs);
    let p = |f: &str| certs.join(f).display().to_string();
    let args = [
        "--tls-cert-file".to_owned(),
        p("server.crt"),
        "--tls-key-file".to_owned(),
        p("server.key"),
        "--tls-ca-cert-file".to_owned(),
        p("ca.crt"),
        "--tls-auth-clients".to_owned(),
        "no".to_owned(),
        "--requirepass".to_owned(),
        "p@ss/w+rd=".to_owned(),
    ];
    (RedisServer::start_with(&args, true), certs)
}

fn rand_suffix() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

#[tokio::test]
async fn tls_with_a_custom_ca_and_a_password_caches() {
    let (server, certs) = tls_server();
    // The password percent-encoded, as Azure access keys must be.
    let url = format!("rediss://:p%40ss%2Fw%2Brd%3D@localhost:{}", server.port());
    let config = common::relaxed_config(&url)
        .ca_cert(certs.join("ca.crt"))
        .unwrap();
    let store = RedisStore::connect(config).await.unwrap();
    let cache = CacheLayer::new(store, Policy::shared(Duration::from_secs(60)));
    let handle = cache.handle();
    handle.check().await.unwrap();
    let app = Router::new()
        .route("/", get(|| async { "secure" }))
        .layer(cache);
    assert_eq!(send(&app, get_req("/")).await.x_cache(), "MISS");
    wait_until("stored", || handle.stats().stored == 1).await;
    assert_eq!(send(&app, get_req("/")).await.x_cache(), "HIT");

    // The same through the environment, as the Python utility configured it.
    let env = |k: &str| match k {
        "REDIS_HOST" => Some("localhost".to_owned()),
        "REDIS_PORT" => Some(server.port().to_string()),
        "REDIS_PASSWORD" => Some("p@ss/w+rd=".to_owned()),
        "REDIS_SSL" => Some("true".to_owned()),
        "REDIS_CA_CERT" => Some(certs.join("ca.crt").display().to_string()),
        _ => None,
    };
    let config = tower_redis_cache::RedisConfig::from_env_with(env).unwrap();
    let store = RedisStore::connect(config).await.unwrap();
    let handle = CacheLayer::new(store, Policy::shared(Duration::from_secs(60))).handle();
    assert_eq!(
        handle.health().await.redis,
        tower_redis_cache::RedisStatus::Connected
    );
    let _ = std::fs::remove_dir_all(certs);
}

#[tokio::test]
async fn an_untrusted_certificate_or_a_wrong_password_is_a_clear_error() {
    let (server, certs) = tls_server();
    let url = |pw: &str| format!("rediss://:{pw}@localhost:{}", server.port());

    // Wrong CA.
    let config = RedisConfig::from_url(&url("p%40ss%2Fw%2Brd%3D"))
        .unwrap()
        .ca_cert(certs.join("other.crt"))
        .unwrap();
    match RedisStore::connect(config).await {
        Err(ConfigError::Tls(reason)) => {
            assert!(reason.to_lowercase().contains("certificate"), "{reason}")
        }
        other => panic!("expected a TLS error, got {other:?}"),
    }
    // No custom CA: the system's roots do not know the test CA.
    match RedisStore::connect(RedisConfig::from_url(&url("p%40ss%2Fw%2Brd%3D")).unwrap()).await {
        Err(ConfigError::Tls(_)) => {}
        other => panic!("expected a TLS error, got {other:?}"),
    }
    // Wrong password, never echoed.
    let config = RedisConfig::from_url(&url("hunter2"))
        .unwrap()
        .ca_cert(certs.join("ca.crt"))
        .unwrap();
    match RedisStore::connect(config).await {
        Err(e @ ConfigError::Auth(_)) => assert!(!e.to_string().contains("hunter2"), "{e}"),
        other => panic!("expected an auth error, got {other:?}"),
    }
    // A CA file for a plain connection, or one without certificates: errors too.
    let plain = RedisConfig::from_url("redis://127.0.0.1:1").unwrap();
    assert!(matches!(
        plain.ca_cert(certs.join("ca.crt")),
        Err(ConfigError::Tls(_))
    ));
    let tls = RedisConfig::from_url(&url("x")).unwrap();
    assert!(matches!(
        tls.ca_cert(certs.join("ext.cnf")),
        Err(ConfigError::Tls(_))
    ));
    let tls = RedisConfig::from_url(&url("x")).unwrap();
    assert!(matches!(
        tls.ca_cert(certs.join("missing.pem")),
        Err(ConfigError::Tls(_))
    ));
    let _ = std::fs::remove_dir_all(certs);
}
