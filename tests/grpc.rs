//! gRPC through the layer: a real tonic server and client on loopback ports, messages and
//! service written by hand (no protoc), each test with its own redis-server. Behind tonic's
//! `Server` the layer needs the `tonic` feature (CI runs `--all-features`).
#![cfg(feature = "tonic")]

mod common;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use common::{wait_until, RedisServer};
use futures_util::{Stream, StreamExt};
use http::uri::PathAndQuery;
use http::HeaderName;
use tokio::sync::Notify;
use tonic::transport::{Channel, Endpoint, Server};
use tonic::{Code, Status};
use tonic_prost::ProstCodec;
use tower_redis_cache::{CacheHandle, CacheLayer, Identity, Policy, RedisStore};
use tower_service::Service;

/// Messages, derived by hand as prost-build would.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Query {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(uint32, tag = "2")]
    pub count: u32,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Reply {
    #[prost(string, tag = "1")]
    pub text: String,
    #[prost(uint64, tag = "2")]
    pub call: u64,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;
type ReplyStream = Pin<Box<dyn Stream<Item = Result<Reply, Status>> + Send>>;

/// The `test.Echo` service. `Get`, `User`, `Plain` are unary; `List` is server-streaming;
/// `Chat` is bidirectional. Counts the calls that reach it.
#[derive(Clone, Default)]
struct Echo {
    calls: Arc<AtomicU64>,
    /// `List` with the name `gated` waits on this between its two messages.
    gate: Arc<Notify>,
}

impl Echo {
    fn calls(&self) -> u64 {
        self.calls.load(Ordering::SeqCst)
    }
}

impl tonic::server::NamedService for Echo {
    const NAME: &'static str = "test.Echo";
}

impl<B> Service<http::Request<B>> for Echo
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let echo = self.clone();
        Box::pin(async move {
            let mut grpc = tonic::server::Grpc::new(ProstCodec::<Reply, Query>::default());
            let path = req.uri().path().to_owned();
            let res = match path.as_str() {
                "/test.Echo/Get" | "/test.Echo/User" | "/test.Echo/Plain" => {
                    grpc.unary(Unary(echo, path), req).await
                }
                "/test.Echo/List" => grpc.server_streaming(List(echo), req).await,
                "/test.Echo/Chat" => grpc.streaming(Chat(echo), req).await,
                _ => Status::unimplemented("no such method").into_http(),
            };
            Ok(res)
        })
    }
}

struct Unary(Echo, String);

impl tonic::server::UnaryService<Query> for Unary {
    type Response = Reply;
    type Future = BoxFuture<Result<tonic::Response<Reply>, Status>>;

    fn call(&mut self, request: tonic::Request<Query>) -> Self::Future {
        let call = self.0.calls.fetch_add(1, Ordering::SeqCst) + 1;
        let path = self.1.clone();
        Box::pin(async move {
            let user = request
                .metadata()
                .get("x-user-id")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("-")
                .to_owned();
            let q = request.into_inner();
            if q.name == "fail" {
                return Err(Status::not_found("no such thing"));
            }
            let text = if path.ends_with("/User") {
                format!("{user}:{}", q.name)
            } else {
                format!("hello {}", q.name)
            };
            let mut res = tonic::Response::new(Reply { text, call });
            res.metadata_mut().insert("x-app", "yes".parse().unwrap());
            if path.ends_with("/Plain") {
                // Names the layer reads on cached routes; metadata of the app's own here.
                res.metadata_mut()
                    .insert("cache-tag", "app".parse().unwrap());
                res.metadata_mut()
                    .insert("x-cache-ttl", "7".parse().unwrap());
            }
            Ok(res)
        })
    }
}

struct List(Echo);

impl tonic::server::ServerStreamingService<Query> for List {
    type Response = Reply;
    type ResponseStream = ReplyStream;
    type Future = BoxFuture<Result<tonic::Response<ReplyStream>, Status>>;

    fn call(&mut self, request: tonic::Request<Query>) -> Self::Future {
        let call = self.0.calls.fetch_add(1, Ordering::SeqCst) + 1;
        let gate = self.0.gate.clone();
        Box::pin(async move {
            let q = request.into_inner();
            let n = q.count.max(1);
            // Messages 1..=n, then the end: OK, or `aborted` for the name `fail`.
            let stream = futures_util::stream::unfold(0u32, move |i| {
                let (gate, q) = (gate.clone(), q.clone());
                async move {
                    if i == 1 && q.name == "gated" {
                        gate.notified().await;
                    }
                    if i < n {
                        let text = format!("{} #{}", q.name, i + 1);
                        Some((Ok(Reply { text, call }), i + 1))
                    } else if i == n && q.name == "fail" {
                        Some((Err(Status::aborted("stopped halfway")), i + 1))
                    } else {
                        None
                    }
                }
            });
            Ok(tonic::Response::new(Box::pin(stream) as ReplyStream))
        })
    }
}

struct Chat(Echo);

impl tonic::server::StreamingService<Query> for Chat {
    type Response = Reply;
    type ResponseStream = ReplyStream;
    type Future = BoxFuture<Result<tonic::Response<ReplyStream>, Status>>;

    fn call(&mut self, request: tonic::Request<tonic::Streaming<Query>>) -> Self::Future {
        let call = self.0.calls.fetch_add(1, Ordering::SeqCst) + 1;
        Box::pin(async move {
            let stream = request.into_inner().map(move |q| {
                q.map(|q| Reply {
                    text: format!("echo {}", q.name),
                    call,
                })
            });
            Ok(tonic::Response::new(Box::pin(stream) as ReplyStream))
        })
    }
}

/// A client of `test.Echo`.
#[derive(Clone)]
struct Client(tonic::client::Grpc<Channel>);

impl Client {
    async fn connect(addr: SocketAddr) -> Self {
        let channel = Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .expect("connect");
        Client(tonic::client::Grpc::new(channel))
    }

    async fn unary(
        &self,
        method: &'static str,
        name: &str,
        metadata: &[(&'static str, &str)],
    ) -> Result<tonic::Response<Reply>, Status> {
        let mut grpc = self.0.clone();
        grpc.ready().await.expect("ready");
        let mut req = tonic::Request::new(Query {
            name: name.to_owned(),
            count: 0,
        });
        for (k, v) in metadata {
            req.metadata_mut().insert(*k, v.parse().unwrap());
        }
        grpc.unary(
            req,
            PathAndQuery::from_static(method),
            ProstCodec::<Query, Reply>::default(),
        )
        .await
    }

    async fn list(
        &self,
        name: &str,
        count: u32,
    ) -> Result<tonic::Response<tonic::Streaming<Reply>>, Status> {
        let mut grpc = self.0.clone();
        grpc.ready().await.expect("ready");
        let req = tonic::Request::new(Query {
            name: name.to_owned(),
            count,
        });
        grpc.server_streaming(
            req,
            PathAndQuery::from_static("/test.Echo/List"),
            ProstCodec::<Query, Reply>::default(),
        )
        .await
    }
}

fn x_cache<T>(res: &tonic::Response<T>) -> &str {
    res.metadata()
        .get("x-cache")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-")
}

/// Starts a tonic server on a free loopback port with the cache around every service.
async fn serve(cache: CacheLayer, echo: Echo) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let incoming = tonic::transport::server::TcpIncoming::from(listener);
    let server = Server::builder()
        .layer(cache)
        .add_service(echo)
        .serve_with_incoming(incoming);
    tokio::spawn(server);
    addr
}

async fn cache_on(server: &RedisServer) -> CacheLayer {
    let store = RedisStore::connect(common::relaxed_config(&server.url()))
        .await
        .unwrap();
    CacheLayer::new(store, Policy::bypass())
        .identity(Identity::header(HeaderName::from_static("x-user-id")))
        .grpc_method(
            "/test.Echo/Get",
            Policy::shared(Duration::from_secs(60)).tag("catalog"),
        )
        .unwrap()
        .grpc_method("/test.Echo/User", Policy::per_user(Duration::from_secs(60)))
        .unwrap()
}

async fn stored(handle: &CacheHandle, n: u64) {
    wait_until(&format!("{n} entries stored"), || {
        handle.stats().stored >= n
    })
    .await;
}

/// Bounds a step that would hang if the layer buffered a stream.
async fn within<T>(what: &str, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(30), f)
        .await
        .unwrap_or_else(|_| panic!("{what}: no answer in 30 s (buffered?)"))
}

#[tokio::test]
async fn streaming_calls_pass_through_untouched() {
    let redis = RedisServer::start();
    let cache = cache_on(&redis).await.invalidate_on_write(true);
    let handle = cache.handle();
    let echo = Echo::default();
    let client = Client::connect(serve(cache, echo.clone()).await).await;

    // Server streaming: the second message is only sent once the client has the first, so
    // a layer that buffered the response would never deliver it.
    let res = within("list", client.list("gated", 2)).await.unwrap();
    assert_eq!(x_cache(&res), "-", "not opted in: no cache headers");
    assert!(res.metadata().get("cache-status").is_none());
    let mut stream = res.into_inner();
    let first = within("first", stream.message()).await.unwrap().unwrap();
    assert_eq!(first.text, "gated #1");
    echo.gate.notify_one();
    let second = within("second", stream.message()).await.unwrap().unwrap();
    assert_eq!(second.text, "gated #2");
    assert!(within("end", stream.message()).await.unwrap().is_none());
    let trailers = stream.trailers().await.unwrap().expect("trailers");
    assert_eq!(trailers.get("grpc-status").unwrap(), "0");

    // A stream that ends with an error: the messages, then grpc-status and grpc-message.
    let mut stream = within("list", client.list("fail", 2))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stream.message().await.unwrap().unwrap().text, "fail #1");
    assert_eq!(stream.message().await.unwrap().unwrap().text, "fail #2");
    let status = stream.message().await.unwrap_err();
    assert_eq!(status.code(), Code::Aborted);
    assert_eq!(status.message(), "stopped halfway");

    // Bidirectional: each answer arrives before the next request is sent.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Query>(1);
    let outbound = futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx));
    let mut grpc = client.0.clone();
    grpc.ready().await.unwrap();
    let res = grpc.streaming(
        tonic::Request::new(outbound),
        PathAndQuery::from_static("/test.Echo/Chat"),
        ProstCodec::<Query, Reply>::default(),
    );
    tx.send(Query {
        name: "one".into(),
        count: 0,
    })
    .await
    .unwrap();
    let mut inbound = within("chat", res).await.unwrap().into_inner();
    assert_eq!(
        within("echo 1", inbound.message())
            .await
            .unwrap()
            .unwrap()
            .text,
        "echo one"
    );
    tx.send(Query {
        name: "two".into(),
        count: 0,
    })
    .await
    .unwrap();
    assert_eq!(
        within("echo 2", inbound.message())
            .await
            .unwrap()
            .unwrap()
            .text,
        "echo two"
    );
    drop(tx);
    assert!(within("chat end", inbound.message())
        .await
        .unwrap()
        .is_none());
    let trailers = inbound.trailers().await.unwrap().expect("trailers");
    assert_eq!(trailers.get("grpc-status").unwrap(), "0");

    // A unary method not opted in: untouched too.
    let res = client.unary("/test.Echo/Plain", "p", &[]).await.unwrap();
    assert_eq!(x_cache(&res), "-");
    assert_eq!(res.get_ref().text, "hello p");
    // Its metadata too, even names the layer reads on the calls it caches.
    assert_eq!(res.metadata().get("cache-tag").unwrap(), "app");
    assert_eq!(res.metadata().get("x-cache-ttl").unwrap(), "7");

    let stats = handle.stats();
    assert_eq!(
        (stats.hits, stats.misses, stats.bypassed, stats.stored),
        (0, 0, 0, 0)
    );
    assert!(
        redis.keys("*").is_empty(),
        "nothing written: {:?}",
        redis.keys("*")
    );
}

#[tokio::test]
async fn unary_miss_then_hit_replays_headers_message_and_trailers() {
    let redis = RedisServer::start();
    let cache = cache_on(&redis).await;
    let handle = cache.handle();
    let echo = Echo::default();
    let client = Client::connect(serve(cache, echo.clone()).await).await;

    let res = client.unary("/test.Echo/Get", "a", &[]).await.unwrap();
    assert_eq!(x_cache(&res), "MISS");
    assert_eq!(
        res.get_ref(),
        &Reply {
            text: "hello a".into(),
            call: 1
        }
    );
    stored(&handle, 1).await;

    let res = client.unary("/test.Echo/Get", "a", &[]).await.unwrap();
    assert_eq!(x_cache(&res), "HIT");
    assert!(res
        .metadata()
        .get("cache-status")
        .unwrap()
        .to_str()
        .unwrap()
        .contains("hit"));
    assert_eq!(res.metadata().get("x-app").unwrap(), "yes");
    assert_eq!(
        res.metadata().get("content-type").unwrap(),
        "application/grpc"
    );
    // The client checked the replayed trailers' grpc-status: 0; the inner was not called.
    assert_eq!(
        res.get_ref(),
        &Reply {
            text: "hello a".into(),
            call: 1
        }
    );
    assert_eq!(echo.calls(), 1);

    // Another message is another entry.
    let res = client.unary("/test.Echo/Get", "b", &[]).await.unwrap();
    assert_eq!((x_cache(&res), res.get_ref().call), ("MISS", 2));
    assert_eq!(handle.stats().hits, 1);
}

#[tokio::test]
async fn error_statuses_are_never_cached() {
    let redis = RedisServer::start();
    let cache = cache_on(&redis)
        .await
        .grpc_method("/test.Echo/List", Policy::shared(Duration::from_secs(60)))
        .unwrap();
    let handle = cache.handle();
    let echo = Echo::default();
    let client = Client::connect(serve(cache, echo.clone()).await).await;

    // Trailers-only errors.
    for _ in 0..2 {
        let status = client
            .unary("/test.Echo/Get", "fail", &[])
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::NotFound);
        assert_eq!(status.message(), "no such thing");
    }
    assert_eq!(echo.calls(), 2);

    // A response whose trailers carry a non-zero status after messages.
    for _ in 0..2 {
        let mut s = client.list("fail", 1).await.unwrap().into_inner();
        assert_eq!(s.message().await.unwrap().unwrap().text, "fail #1");
        assert_eq!(s.message().await.unwrap_err().code(), Code::Aborted);
    }
    assert_eq!(echo.calls(), 4);

    // A success is stored (so the layer did record), the failures were not.
    let s = client.list("ok", 2).await.unwrap();
    assert_eq!(x_cache(&s), "MISS");
    let mut s = s.into_inner();
    while s.message().await.unwrap().is_some() {}
    stored(&handle, 1).await;
    assert_eq!(handle.stats().stored, 1);
    let s = client.list("ok", 2).await.unwrap();
    assert_eq!(x_cache(&s), "HIT");
    let mut s = s.into_inner();
    assert_eq!(s.message().await.unwrap().unwrap().text, "ok #1");
    assert_eq!(s.message().await.unwrap().unwrap().text, "ok #2");
    assert!(s.message().await.unwrap().is_none());
    assert!(client.unary("/test.Echo/Get", "fail", &[]).await.is_err());
    assert!(client
        .list("fail", 1)
        .await
        .unwrap()
        .into_inner()
        .message()
        .await
        .is_ok());
    assert_eq!(echo.calls(), 7);
}

#[tokio::test]
async fn per_user_entries_are_isolated_by_metadata() {
    let redis = RedisServer::start();
    let cache = cache_on(&redis).await;
    let handle = cache.handle();
    let echo = Echo::default();
    let client = Client::connect(serve(cache, echo.clone()).await).await;
    let as_user = |u: &'static str| [("x-user-id", u)];

    let res = client
        .unary("/test.Echo/User", "menu", &as_user("alice"))
        .await
        .unwrap();
    assert_eq!(
        (x_cache(&res), res.get_ref().text.as_str()),
        ("MISS", "alice:menu")
    );
    stored(&handle, 1).await;
    let res = client
        .unary("/test.Echo/User", "menu", &as_user("alice"))
        .await
        .unwrap();
    assert_eq!(
        (x_cache(&res), res.get_ref().text.as_str()),
        ("HIT", "alice:menu")
    );
    let res = client
        .unary("/test.Echo/User", "menu", &as_user("bob"))
        .await
        .unwrap();
    assert_eq!(
        (x_cache(&res), res.get_ref().text.as_str()),
        ("MISS", "bob:menu")
    );
    // No identity: not cached, answered.
    let res = client.unary("/test.Echo/User", "menu", &[]).await.unwrap();
    assert_eq!(
        (x_cache(&res), res.get_ref().text.as_str()),
        ("BYPASS", "-:menu")
    );
    // A shared method with an identity is not shared with others.
    let res = client
        .unary("/test.Echo/Get", "x", &as_user("alice"))
        .await
        .unwrap();
    assert_eq!(x_cache(&res), "BYPASS");
    assert_eq!(echo.calls(), 4);
    // The identity is never stored in clear.
    for key in redis.keys("*") {
        assert!(!key.contains("alice") && !key.contains("bob"), "{key}");
    }
}

#[tokio::test]
async fn invalidation_by_method_user_and_tag() {
    let redis = RedisServer::start();
    let cache = cache_on(&redis).await;
    let handle = cache.handle();
    let echo = Echo::default();
    let client = Client::connect(serve(cache, echo.clone()).await).await;
    let alice = [("x-user-id", "alice")];
    let bob = [("x-user-id", "bob")];

    let fill = || async {
        client.unary("/test.Echo/Get", "a", &[]).await.unwrap();
        client.unary("/test.Echo/User", "m", &alice).await.unwrap();
        client.unary("/test.Echo/User", "m", &bob).await.unwrap();
    };
    let state = || async {
        [
            x_cache(&client.unary("/test.Echo/Get", "a", &[]).await.unwrap()).to_owned(),
            x_cache(&client.unary("/test.Echo/User", "m", &alice).await.unwrap()).to_owned(),
            x_cache(&client.unary("/test.Echo/User", "m", &bob).await.unwrap()).to_owned(),
        ]
    };
    fill().await;
    stored(&handle, 3).await;
    assert_eq!(state().await, ["HIT", "HIT", "HIT"]);

    assert_eq!(
        handle
            .invalidate_grpc_method("/test.Echo/Get")
            .await
            .unwrap(),
        1
    );
    assert_eq!(state().await, ["MISS", "HIT", "HIT"]);
    stored(&handle, 4).await;

    assert_eq!(handle.invalidate_user("alice").await.unwrap(), 1);
    assert_eq!(state().await, ["HIT", "MISS", "HIT"]);
    stored(&handle, 5).await;

    assert_eq!(handle.invalidate_tag("catalog").await.unwrap(), 1);
    assert_eq!(state().await, ["MISS", "HIT", "HIT"]);
    stored(&handle, 6).await;

    assert_eq!(
        handle
            .invalidate_grpc_method("/test.Echo/User")
            .await
            .unwrap(),
        2
    );
    assert_eq!(state().await, ["HIT", "MISS", "MISS"]);
}

#[tokio::test]
async fn calls_are_answered_when_redis_is_down() {
    let mut redis = RedisServer::start();
    let cache = cache_on(&redis).await;
    let handle = cache.handle();
    let echo = Echo::default();
    let client = Client::connect(serve(cache, echo.clone()).await).await;

    client.unary("/test.Echo/Get", "a", &[]).await.unwrap();
    stored(&handle, 1).await;
    assert_eq!(
        x_cache(&client.unary("/test.Echo/Get", "a", &[]).await.unwrap()),
        "HIT"
    );

    redis.kill();
    for _ in 0..3 {
        let res = within("unary", client.unary("/test.Echo/Get", "a", &[]))
            .await
            .unwrap();
        assert_eq!(
            (x_cache(&res), res.get_ref().text.as_str()),
            ("MISS", "hello a")
        );
        let res = within(
            "user",
            client.unary("/test.Echo/User", "m", &[("x-user-id", "u")]),
        )
        .await
        .unwrap();
        assert_eq!(res.get_ref().text, "u:m");
    }
    assert_eq!(echo.calls(), 7);
    assert!(handle.stats().unavailable >= 1);
    let mut s = within("list", client.list("down", 2))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(s.message().await.unwrap().unwrap().text, "down #1");
    assert_eq!(s.message().await.unwrap().unwrap().text, "down #2");
    assert!(s.message().await.unwrap().is_none());
}

#[tokio::test]
async fn larger_requests_pass_through_whole() {
    let redis = RedisServer::start();
    let cache = cache_on(&redis).await.grpc_max_request_size(64);
    let handle = cache.handle();
    let echo = Echo::default();
    let client = Client::connect(serve(cache, echo.clone()).await).await;

    let long = "x".repeat(10_000);
    for _ in 0..2 {
        let res = client.unary("/test.Echo/Get", &long, &[]).await.unwrap();
        assert_eq!(x_cache(&res), "BYPASS");
        assert_eq!(res.get_ref().text, format!("hello {long}"));
    }
    assert!(res_status_detail(&client, &long)
        .await
        .contains("detail=grpc-message"));
    assert_eq!(echo.calls(), 3);
    let res = client.unary("/test.Echo/Get", "short", &[]).await.unwrap();
    assert_eq!(x_cache(&res), "MISS");
    stored(&handle, 1).await;
}

async fn res_status_detail(client: &Client, name: &str) -> String {
    let res = client.unary("/test.Echo/Get", name, &[]).await.unwrap();
    res.metadata()
        .get("cache-status")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned()
}

#[tokio::test]
async fn one_service_layered_alone_with_named_layer() {
    use tonic::service::LayerExt;
    let redis = RedisServer::start();
    let cache = cache_on(&redis).await;
    let handle = cache.handle();
    let echo = Echo::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = Server::builder()
        .add_service(cache.named_layer(echo.clone()))
        .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener));
    tokio::spawn(server);
    let client = Client::connect(addr).await;

    assert_eq!(
        x_cache(&client.unary("/test.Echo/Get", "a", &[]).await.unwrap()),
        "MISS"
    );
    stored(&handle, 1).await;
    assert_eq!(
        x_cache(&client.unary("/test.Echo/Get", "a", &[]).await.unwrap()),
        "HIT"
    );
    assert_eq!(echo.calls(), 1);
}

/// gRPC-Web: the cache goes inside tonic-web's layer, where calls are plain gRPC again.
#[tokio::test]
async fn grpc_web_inside_tonic_web() {
    let redis = RedisServer::start();
    let cache = cache_on(&redis).await;
    let handle = cache.handle();
    let echo = Echo::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = Server::builder()
        .accept_http1(true)
        .layer(tonic_web::GrpcWebLayer::new())
        .layer(cache.clone())
        .add_service(echo.clone())
        .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener));
    tokio::spawn(server);

    // A gRPC-Web client over HTTP/1.1.
    let http = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http();
    let svc = tower::ServiceBuilder::new()
        .layer(tonic_web::GrpcWebClientLayer::new())
        .service(http);
    let grpc = tonic::client::Grpc::with_origin(svc, format!("http://{addr}").parse().unwrap());
    let call = |name: &str| {
        let req = tonic::Request::new(Query {
            name: name.to_owned(),
            count: 0,
        });
        let mut grpc = grpc.clone();
        async move {
            grpc.ready().await.unwrap();
            grpc.unary(
                req,
                PathAndQuery::from_static("/test.Echo/Get"),
                ProstCodec::<Query, Reply>::default(),
            )
            .await
        }
    };
    let res = call("web").await.unwrap();
    assert_eq!((x_cache(&res), res.get_ref().call), ("MISS", 1));
    stored(&handle, 1).await;
    let res = call("web").await.unwrap();
    assert_eq!((x_cache(&res), res.get_ref().call), ("HIT", 1));
    assert_eq!(res.get_ref().text, "hello web");
    let status = call("fail").await.unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    assert_eq!(echo.calls(), 2);
}

/// A gRPC call is a POST, but never a write that invalidates its path.
#[tokio::test]
async fn grpc_calls_are_not_writes() {
    use axum::body::Body;
    use tower::ServiceExt;
    let redis = RedisServer::start();
    let store = RedisStore::connect(common::relaxed_config(&redis.url()))
        .await
        .unwrap();
    let cache =
        CacheLayer::new(store, Policy::shared(Duration::from_secs(60))).invalidate_on_write(true);
    let handle = cache.handle();
    let calls = Arc::new(AtomicU64::new(0));
    let c = calls.clone();
    let svc = tower::ServiceBuilder::new()
        .layer(cache)
        .service(tower::service_fn(move |_req: http::Request<Body>| {
            c.fetch_add(1, Ordering::SeqCst);
            async { Ok::<_, Infallible>(http::Response::new(Body::from("data"))) }
        }));
    let get = || http::Request::get("/svc.S/M").body(Body::empty()).unwrap();
    let res = svc.clone().oneshot(get()).await.unwrap();
    common::read(res.map(Body::new)).await;
    stored(&handle, 1).await;
    let grpc_call = http::Request::post("/svc.S/M")
        .header("content-type", "application/grpc")
        .body(Body::from(vec![0u8, 0, 0, 0, 0]))
        .unwrap();
    let res = svc.clone().oneshot(grpc_call).await.unwrap();
    assert!(res.headers().get("x-cache").is_none(), "untouched");
    let res = svc.clone().oneshot(get()).await.unwrap();
    assert_eq!(res.headers().get("x-cache").unwrap(), "HIT");
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}
