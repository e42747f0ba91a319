//! One process, one cache: an axum HTTP API and a tonic gRPC service on the same port,
//! behind one `CacheLayer`. The gRPC messages and service are written by hand (what
//! `tonic-prost-build` would generate, minus the parts we do not use), so no `protoc` is
//! needed.
//!
//! Run with `cargo run --example grpc` (Redis on 127.0.0.1:6379 by default). It serves:
//!
//! - gRPC `shop.Catalog/GetProduct` (unary): cached 60 s, shared, tagged `catalog`;
//! - gRPC `shop.Catalog/ListProducts` (server streaming): not opted in, passes through;
//! - HTTP `GET /products/{id}`: cached 60 s, tagged `catalog` too;
//! - HTTP `POST /admin/prices`: "changes the prices", invalidating the tag `catalog`, so
//!   both the HTTP and the gRPC entries go;
//! - HTTP `GET /health`.
//!
//! `cargo run --example grpc -- demo` starts the same server, calls it with a tonic client
//! (a miss, a hit, a stream, an invalidation, a miss again), prints what it saw and exits.
//!
//! ```text
//! curl -i localhost:3001/products/7            # MISS, then HIT
//! curl -i -X POST localhost:3001/admin/prices  # invalidates HTTP and gRPC entries
//! ```
//!
//! Settings (environment): `BIND` (127.0.0.1:3001), `REDIS_URL` or `REDIS_HOST`,
//! `REDIS_PORT`, `REDIS_PASSWORD`, `REDIS_DB`, `REDIS_SSL` (see `RedisConfig::from_env`),
//! `RUST_LOG` (for example `tower_redis_cache=debug`).
//!
//! Here the gRPC service is merged into the axum router (`Routes::into_axum_router`), so the
//! cache sees axum's request body. Behind tonic's own `Server::builder().layer(cache)` it
//! sees tonic's, which the crate's `tonic` feature lets it rebuild.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::{Path, State};
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use futures_util::Stream;
use http::uri::PathAndQuery;
use serde_json::{json, Value};
use tonic::Status;
use tonic_prost::ProstCodec;
use tower_redis_cache::{CacheHandle, CacheLayer, Policy, RedisConfig, RedisStore};
use tower_service::Service;

// ---- messages (as prost-build would derive them from a .proto) ----

/// `message GetProductRequest { uint64 id = 1; }`
#[derive(Clone, PartialEq, prost::Message)]
pub struct GetProductRequest {
    #[prost(uint64, tag = "1")]
    pub id: u64,
}

/// `message Product { uint64 id = 1; string name = 2; uint64 price_cents = 3; uint64 read = 4; }`
#[derive(Clone, PartialEq, prost::Message)]
pub struct Product {
    #[prost(uint64, tag = "1")]
    pub id: u64,
    #[prost(string, tag = "2")]
    pub name: String,
    #[prost(uint64, tag = "3")]
    pub price_cents: u64,
    /// Which database read produced this answer (a hit repeats the stored one).
    #[prost(uint64, tag = "4")]
    pub read: u64,
}

/// `message ListProductsRequest { uint32 limit = 1; }`
#[derive(Clone, PartialEq, prost::Message)]
pub struct ListProductsRequest {
    #[prost(uint32, tag = "1")]
    pub limit: u32,
}

// ---- the "database" ----

#[derive(Default)]
struct Db {
    reads: AtomicU64,
}

impl Db {
    async fn product(&self, id: u64) -> Option<Product> {
        let read = self.reads.fetch_add(1, Ordering::Relaxed) + 1;
        tokio::time::sleep(Duration::from_millis(20)).await; // the cost of a query
        (1..=100).contains(&id).then(|| Product {
            id,
            name: format!("product {id}"),
            price_cents: 100 * id + 99,
            read,
        })
    }
}

// ---- the gRPC service `shop.Catalog`, written by hand ----

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;
type ProductStream = Pin<Box<dyn Stream<Item = Result<Product, Status>> + Send>>;

#[derive(Clone)]
struct Catalog {
    db: Arc<Db>,
}

impl tonic::server::NamedService for Catalog {
    const NAME: &'static str = "shop.Catalog";
}

impl<B> Service<http::Request<B>> for Catalog
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
        let db = Arc::clone(&self.db);
        Box::pin(async move {
            let res = match req.uri().path() {
                "/shop.Catalog/GetProduct" => {
                    let codec = ProstCodec::<Product, GetProductRequest>::default();
                    tonic::server::Grpc::new(codec)
                        .unary(GetProduct(db), req)
                        .await
                }
                "/shop.Catalog/ListProducts" => {
                    let codec = ProstCodec::<Product, ListProductsRequest>::default();
                    tonic::server::Grpc::new(codec)
                        .server_streaming(ListProducts(db), req)
                        .await
                }
                _ => Status::unimplemented("").into_http(),
            };
            Ok(res)
        })
    }
}

struct GetProduct(Arc<Db>);

impl tonic::server::UnaryService<GetProductRequest> for GetProduct {
    type Response = Product;
    type Future = BoxFuture<Result<tonic::Response<Product>, Status>>;

    fn call(&mut self, request: tonic::Request<GetProductRequest>) -> Self::Future {
        let db = Arc::clone(&self.0);
        Box::pin(async move {
            let id = request.into_inner().id;
            match db.product(id).await {
                Some(p) => Ok(tonic::Response::new(p)),
                // A trailers-only error: never cached.
                None => Err(Status::not_found(format!("no product {id}"))),
            }
        })
    }
}

struct ListProducts(Arc<Db>);

impl tonic::server::ServerStreamingService<ListProductsRequest> for ListProducts {
    type Response = Product;
    type ResponseStream = ProductStream;
    type Future = BoxFuture<Result<tonic::Response<ProductStream>, Status>>;

    fn call(&mut self, request: tonic::Request<ListProductsRequest>) -> Self::Future {
        let db = Arc::clone(&self.0);
        let limit = u64::from(request.into_inner().limit.clamp(1, 100));
        let stream = futures_util::stream::unfold(1u64, move |id| {
            let db = Arc::clone(&db);
            async move {
                if id > limit {
                    return None;
                }
                let p = db.product(id).await.ok_or_else(|| Status::internal("gone"));
                Some((p, id + 1))
            }
        });
        Box::pin(async move { Ok(tonic::Response::new(Box::pin(stream) as ProductStream)) })
    }
}

// ---- the HTTP API ----

#[derive(Clone)]
struct AppState {
    db: Arc<Db>,
    cache: CacheHandle,
}

async fn product(
    State(state): State<AppState>,
    Path(id): Path<u64>,
) -> (http::StatusCode, Json<Value>) {
    match state.db.product(id).await {
        Some(p) => (
            http::StatusCode::OK,
            Json(
                json!({ "id": p.id, "name": p.name, "price_cents": p.price_cents, "read": p.read }),
            ),
        ),
        None => (
            http::StatusCode::NOT_FOUND,
            Json(json!({ "error": "no such product" })),
        ),
    }
}

async fn change_prices(State(state): State<AppState>) -> (http::StatusCode, Json<Value>) {
    // One tag reaches the entries of both protocols.
    match state.cache.invalidate_tag("catalog").await {
        Ok(n) => (http::StatusCode::OK, Json(json!({ "invalidated": n }))),
        Err(e) => (
            http::StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "error": e.to_string() })),
        ),
    }
}

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name)
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| default.to_owned())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,tower_redis_cache=debug".into()),
        )
        .init();
    let demo = std::env::args().nth(1).as_deref() == Some("demo");

    let store = RedisStore::connect(RedisConfig::from_env()?).await?;
    let cache = CacheLayer::new(store, Policy::bypass())
        .namespace("shop")?
        .route(
            "/products/{id}",
            Policy::shared(Duration::from_secs(60)).tag("catalog"),
        )?
        .grpc_method(
            "/shop.Catalog/GetProduct",
            Policy::shared(Duration::from_secs(60)).tag("catalog"),
        )?;
    let handle = cache.handle();

    let db = Arc::new(Db::default());
    let grpc = tonic::service::Routes::new(Catalog {
        db: Arc::clone(&db),
    })
    .into_axum_router();
    let app = Router::new()
        .route("/products/{id}", get(product))
        .route("/admin/prices", post(change_prices))
        .route(
            "/health",
            tower_redis_cache::health_route(handle.clone(), "development"),
        )
        .with_state(AppState {
            db,
            cache: handle.clone(),
        })
        .merge(grpc)
        .layer(cache);

    let listener = tokio::net::TcpListener::bind(env_or("BIND", "127.0.0.1:3001")).await?;
    let addr = listener.local_addr()?;
    tracing::info!(%addr, "listening (HTTP/1.1 and gRPC over HTTP/2)");
    // HTTP/1.1 and HTTP/2 (gRPC clients speak it without TLS, "prior knowledge").
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    if demo {
        run_demo(addr, &handle).await?;
        return Ok(());
    }
    server.await??;
    Ok(())
}

/// Calls the server as a gRPC client would, and prints what the cache did.
async fn run_demo(
    addr: std::net::SocketAddr,
    handle: &CacheHandle,
) -> Result<(), Box<dyn std::error::Error>> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
        .connect()
        .await?;
    let grpc = tonic::client::Grpc::new(channel);
    let get_product = |id: u64| {
        let mut grpc = grpc.clone();
        async move {
            grpc.ready().await?;
            let res = grpc
                .unary(
                    tonic::Request::new(GetProductRequest { id }),
                    PathAndQuery::from_static("/shop.Catalog/GetProduct"),
                    ProstCodec::<GetProductRequest, Product>::default(),
                )
                .await;
            Ok::<_, Box<dyn std::error::Error>>(res)
        }
    };
    let show = |res: &Result<tonic::Response<Product>, Status>| match res {
        Ok(r) => format!(
            "{} (x-cache: {}, read #{})",
            r.get_ref().name,
            r.metadata()
                .get("x-cache")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("-"),
            r.get_ref().read
        ),
        Err(s) => format!("{:?}: {}", s.code(), s.message()),
    };

    println!("GetProduct(7): {}", show(&get_product(7).await?));
    wait_stored(handle, 1).await;
    println!("GetProduct(7): {}", show(&get_product(7).await?));
    println!("GetProduct(0): {}", show(&get_product(0).await?));
    println!("GetProduct(0): {}", show(&get_product(0).await?));

    let mut streaming = grpc.clone();
    streaming.ready().await?;
    let mut stream = streaming
        .server_streaming(
            tonic::Request::new(ListProductsRequest { limit: 3 }),
            PathAndQuery::from_static("/shop.Catalog/ListProducts"),
            ProstCodec::<ListProductsRequest, Product>::default(),
        )
        .await?
        .into_inner();
    while let Some(p) = stream.message().await? {
        println!("ListProducts: {}", p.name);
    }

    let removed = handle.invalidate_tag("catalog").await?;
    println!("invalidate_tag(\"catalog\"): {removed} entries");
    println!("GetProduct(7): {}", show(&get_product(7).await?));
    println!("stats: {:?}", handle.stats());
    Ok(())
}

/// Entries are written after the response, in the background (waits up to about 20 s).
async fn wait_stored(handle: &CacheHandle, n: u64) {
    for _ in 0..4000 {
        if handle.stats().stored >= n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
