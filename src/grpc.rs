//! gRPC: calls pass through untouched, except unary methods opted in with
//! [`CacheLayer::grpc_method`](crate::CacheLayer::grpc_method), which are cached like GET
//! routes.
//!
//! gRPC over HTTP/2 is plain HTTP: a `POST` to `/package.Service/Method` with
//! `content-type: application/grpc[+proto]`, a body of 5-byte length-prefixed messages, and
//! the status in the trailers (`grpc-status`), or in the headers of a trailers-only response
//! (errors). For an opted-in method the layer reads the request body (bounded), keys the
//! entry on the method path and the message bytes, and rebuilds the request for the inner
//! service. A response is stored only if it ends with `grpc-status: 0` in its trailers.

// Without axum or tonic there is no request body to rebuild: the reader goes unused.
#![cfg_attr(
    not(any(feature = "axum", feature = "tonic")),
    allow(dead_code, unused_mut)
)]

use std::any::Any;
use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{AUTHORIZATION, CONTENT_TYPE, COOKIE};
use http::{HeaderMap, HeaderName, Method, Request};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tower_service::Service;

use crate::engine::ctx::{Ctx, Deferred};
use crate::engine::Engine;
use crate::http::future::ResponseFuture;
use crate::key::KeyInput;
use crate::outcome::{BypassReason, Counters};
use crate::policy::Policy;

/// The request header naming the compression of the request message.
const GRPC_ENCODING: HeaderName = HeaderName::from_static("grpc-encoding");

/// Whether a method path has the shape `/package.Service/Method`.
pub(crate) fn valid_method_path(path: &str) -> bool {
    let Some(rest) = path.strip_prefix('/') else {
        return false;
    };
    let mut parts = rest.split('/');
    let (Some(service), Some(method), None) = (parts.next(), parts.next(), parts.next()) else {
        return false;
    };
    let ok = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    };
    ok(service) && ok(method)
}

/// The policy of an opted-in method as the layer uses it: keyed on the request's
/// `content-type` (the codec) and `grpc-encoding` (the message's compression) as well, and
/// without ETags (gRPC clients send no conditional requests).
pub(crate) fn method_policy(policy: Policy) -> Policy {
    let mut policy = policy;
    for name in [CONTENT_TYPE, GRPC_ENCODING] {
        if !policy.key_headers.contains(&name) {
            policy.key_headers.push(name);
        }
    }
    policy.etag = false;
    policy
}

/// Whether a request or response is gRPC (or gRPC-Web): `content-type: application/grpc*`.
pub(crate) fn is_grpc(headers: &HeaderMap) -> bool {
    headers.get(CONTENT_TYPE).is_some_and(|v| {
        v.as_bytes()
            .get(..16)
            .is_some_and(|p| p.eq_ignore_ascii_case(b"application/grpc"))
    })
}

/// gRPC proper, not gRPC-Web (`application/grpc`, `application/grpc+proto`, ...).
fn is_grpc_over_http2(headers: &HeaderMap) -> bool {
    headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            let v = v.trim().to_ascii_lowercase();
            v == "application/grpc" || v.starts_with("application/grpc+")
        })
}

/// Handles a gRPC call: untouched unless its method is opted in.
pub(crate) fn call<S, ReqB>(
    shared: &Arc<Engine>,
    mut inner: S,
    req: Request<ReqB>,
) -> ResponseFuture<S, ReqB>
where
    S: Service<Request<ReqB>>,
    ReqB: 'static,
{
    let methods = &shared.routes.grpc.by_path;
    if methods.is_empty() {
        return ResponseFuture::untouched(inner.call(req));
    }
    let policy = match methods.get(req.uri().path()) {
        Some(p) if req.method() == Method::POST && is_grpc_over_http2(req.headers()) => p,
        // Not opted in, or gRPC-Web seen outside tonic-web's layer: untouched.
        _ => return ResponseFuture::untouched(inner.call(req)),
    };
    let x_cache = shared.settings.x_cache.clone();
    let bypass = |reason: BypassReason, mut inner: S, req: Request<ReqB>| {
        Counters::incr(&shared.runtime.counters.bypassed);
        tracing::debug!(
            method = req.uri().path(),
            reason = reason.as_str(),
            "cache bypass"
        );
        ResponseFuture::bypass(inner.call(req), reason, x_cache.clone())
    };
    let (parts, body) = req.into_parts();
    if !policy.enabled {
        return bypass(BypassReason::Route, inner, Request::from_parts(parts, body));
    }
    if policy.is_strictly_shared() {
        let reason = if parts.headers.contains_key(AUTHORIZATION) {
            Some(BypassReason::Authorization)
        } else if parts.headers.contains_key(COOKIE) {
            Some(BypassReason::Cookie)
        } else if (shared.settings.credentials.iter()).any(|n| parts.headers.contains_key(n)) {
            Some(BypassReason::Credential)
        } else if shared.settings.identity.extract(&parts).is_some() {
            Some(BypassReason::Identity)
        } else {
            None
        };
        if let Some(reason) = reason {
            return bypass(reason, inner, Request::from_parts(parts, body));
        }
    }
    let identity = if policy.is_per_user() {
        match shared.settings.identity.extract(&parts) {
            Some(id) => Some(id),
            None => {
                return bypass(
                    BypassReason::NoIdentity,
                    inner,
                    Request::from_parts(parts, body),
                )
            }
        }
    } else {
        None
    };
    let limit = shared.routes.grpc.max_request;
    let read = match read_body(body, limit) {
        Ok(read) => read,
        Err(body) => {
            warn_unsupported_body::<ReqB>();
            return bypass(
                BypassReason::BodyType,
                inner,
                Request::from_parts(parts, body),
            );
        }
    };
    let method = parts.uri.path().to_owned();
    let (shared, policy) = (Arc::clone(shared), Arc::clone(policy));
    let future: crate::http::future::DeferredRead = Box::pin(async move {
        let (message, body) = read.await;
        Deferred {
            parts,
            message,
            body,
            shared,
            policy,
            method,
            identity,
        }
    });
    ResponseFuture::deferred(future, inner, after_read::<S, ReqB>)
}

/// After the request body was read: looks the call up, or passes it through when its
/// message cannot be keyed.
pub(crate) fn after_read<S, ReqB>(read: Deferred, mut inner: S) -> Option<ResponseFuture<S, ReqB>>
where
    S: Service<Request<ReqB>>,
    ReqB: 'static,
{
    let Deferred {
        parts,
        message,
        body,
        shared,
        policy,
        method,
        identity,
    } = read;
    // `read_body` rebuilt a body of this very type.
    let body = *body.downcast::<ReqB>().ok()?;
    let Some(message) = message else {
        Counters::incr(&shared.runtime.counters.bypassed);
        tracing::debug!(method = %method, "gRPC request message not cacheable (size or shape); cache bypass");
        let x_cache = shared.settings.x_cache.clone();
        return Some(ResponseFuture::bypass(
            inner.call(Request::from_parts(parts, body)),
            BypassReason::Message,
            x_cache,
        ));
    };
    let authority = if policy.key_headers.contains(&http::header::HOST) {
        match crate::key::authority(&parts.uri, &parts.headers) {
            Ok(authority) => authority,
            Err(_) => {
                Counters::incr(&shared.runtime.counters.bypassed);
                tracing::debug!(method = %method, "two authorities on a call keyed on the host; cache bypass");
                let x_cache = shared.settings.x_cache.clone();
                return Some(ResponseFuture::bypass(
                    inner.call(Request::from_parts(parts, body)),
                    BypassReason::Authority,
                    x_cache,
                ));
            }
        }
    } else {
        None
    };
    let key = shared.settings.keyer.key_with_body(
        &KeyInput {
            route: Some(&method),
            identity: identity.as_deref(),
            path: &method,
            query: None,
            key_headers: &policy.key_headers,
            headers: &parts.headers,
            authority,
        },
        Some(&message),
    );
    // gRPC methods do not use the near-cache or the shared-cache mode.
    let ctx = Ctx {
        path: method.clone(),
        route: Some(method),
        grpc: true,
        ..Ctx::new(shared, key, policy, identity)
    };
    Some(ResponseFuture::lookup(
        ctx,
        inner,
        Request::from_parts(parts, body),
    ))
}

/// Logs once per process that a request body type cannot be rebuilt.
fn warn_unsupported_body<B>() {
    static WARNED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if !WARNED.swap(true, std::sync::atomic::Ordering::Relaxed) {
        tracing::warn!(
            body = std::any::type_name::<B>(),
            "opted-in gRPC methods need a request body the cache can rebuild (tonic's with the `tonic` feature, axum's with `axum`); calls pass through uncached; logged once"
        );
    }
}

type Rebuilt = (Option<Bytes>, Box<dyn Any + Send>);

/// Starts reading a request body of a type the layer can rebuild; gives the body back
/// otherwise.
fn read_body<B: 'static>(
    body: B,
    limit: usize,
) -> Result<Pin<Box<dyn Future<Output = Rebuilt> + Send>>, B> {
    let mut slot = Some(body);
    #[cfg(feature = "tonic")]
    if let Some(read) = read_as(&mut slot, limit, tonic::body::Body::new) {
        return Ok(read);
    }
    #[cfg(feature = "axum")]
    if let Some(read) = read_as(&mut slot, limit, axum::body::Body::new) {
        return Ok(read);
    }
    let _ = limit;
    match slot {
        Some(body) => Err(body),
        // Taken only by a branch that returned.
        None => Ok(Box::pin(std::future::pending())),
    }
}

/// Starts reading the body in `slot` if it is a `T` (taking it), rebuilt with `rebuild`.
#[cfg(any(feature = "tonic", feature = "axum"))]
fn read_as<T, B: 'static>(
    slot: &mut Option<B>,
    limit: usize,
    rebuild: fn(Replay<T>) -> T,
) -> Option<Pin<Box<dyn Future<Output = Rebuilt> + Send>>>
where
    T: Body<Data = Bytes> + Unpin + Send + 'static,
    T::Error: Send,
{
    let body = (slot as &mut dyn Any).downcast_mut::<Option<T>>()?.take()?;
    Some(Box::pin(async move {
        let (message, body) = read_message(body, limit, rebuild).await;
        (message, Box::new(body) as Box<dyn Any + Send>)
    }))
}

/// Reads a request body up to `limit` bytes. Returns its bytes when it is exactly one
/// gRPC message (5-byte prefix and the length it declares) within the limit, and the body
/// rebuilt with everything read, followed by what was not read.
async fn read_message<B>(
    mut body: B,
    limit: usize,
    rebuild: fn(Replay<B>) -> B,
) -> (Option<Bytes>, B)
where
    B: Body<Data = Bytes> + Unpin,
{
    let mut chunks: VecDeque<Bytes> = VecDeque::new();
    let mut len = 0usize;
    let mut trailers = None;
    let mut error = None;
    let mut rest = None;
    loop {
        match std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await {
            None => break,
            Some(Err(e)) => {
                error = Some(e);
                break;
            }
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => {
                    len = len.saturating_add(data.len());
                    if !data.is_empty() {
                        chunks.push_back(data);
                    }
                    if len > limit || declared_len(&chunks).is_some_and(|n| n > limit) {
                        rest = Some(body);
                        break;
                    }
                }
                Err(frame) => {
                    if let Ok(t) = frame.into_trailers() {
                        trailers = Some(t);
                    }
                }
            },
        }
    }
    let message = if rest.is_none() && error.is_none() && trailers.is_none() {
        let whole = concat(&chunks);
        // Exactly one message: the prefix and the length it declares, nothing more.
        (whole.len() >= 5 && declared_len(&chunks) == Some(whole.len())).then_some(whole)
    } else {
        None
    };
    let replay = Replay {
        chunks,
        trailers,
        error,
        rest,
    };
    (message, rebuild(replay))
}

/// The length (prefix included) the first message declares, once its 5-byte prefix is read.
fn declared_len(chunks: &VecDeque<Bytes>) -> Option<usize> {
    let mut prefix = [0u8; 5];
    let mut filled = 0;
    for chunk in chunks {
        let n = chunk.len().min(5 - filled);
        prefix[filled..filled + n].copy_from_slice(&chunk[..n]);
        filled += n;
        if filled == 5 {
            let len = u32::from_be_bytes([prefix[1], prefix[2], prefix[3], prefix[4]]);
            return usize::try_from(len).ok()?.checked_add(5);
        }
    }
    None
}

fn concat(chunks: &VecDeque<Bytes>) -> Bytes {
    match chunks.len() {
        0 => Bytes::new(),
        1 => chunks.front().cloned().unwrap_or_default(),
        _ => {
            let mut out = BytesMut::with_capacity(chunks.iter().map(Bytes::len).sum());
            for c in chunks {
                out.extend_from_slice(c);
            }
            out.freeze()
        }
    }
}

pin_project! {
    /// A request body given back to the inner service: the frames the layer read, then the
    /// rest of the original body (or the error it ended with).
    pub(crate) struct Replay<B: Body> {
        chunks: VecDeque<Bytes>,
        trailers: Option<HeaderMap>,
        error: Option<B::Error>,
        #[pin]
        rest: Option<B>,
    }
}

impl<B> Body for Replay<B>
where
    B: Body<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.project();
        if let Some(chunk) = this.chunks.pop_front() {
            return Poll::Ready(Some(Ok(Frame::data(chunk))));
        }
        if let Some(rest) = this.rest.as_pin_mut() {
            return rest.poll_frame(cx);
        }
        if let Some(e) = this.error.take() {
            return Poll::Ready(Some(Err(e)));
        }
        Poll::Ready(this.trailers.take().map(|t| Ok(Frame::trailers(t))))
    }

    fn is_end_stream(&self) -> bool {
        self.chunks.is_empty()
            && self.trailers.is_none()
            && self.error.is_none()
            && self.rest.as_ref().map_or(true, Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        let buffered: u64 = self.chunks.iter().map(|c| c.remaining() as u64).sum();
        match &self.rest {
            Some(rest) => {
                let hint = rest.size_hint();
                let mut out = SizeHint::new();
                out.set_lower(hint.lower().saturating_add(buffered));
                if let Some(upper) = hint.upper() {
                    out.set_upper(upper.saturating_add(buffered));
                }
                out
            }
            None if self.trailers.is_none() && self.error.is_none() => {
                SizeHint::with_exact(buffered)
            }
            None => {
                let mut out = SizeHint::new();
                out.set_lower(buffered);
                out
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::grpc::{ok_trailers, storable_head};
    use http::HeaderValue;
    use http_body_util::{BodyExt, StreamBody};

    #[test]
    fn method_paths() {
        assert!(valid_method_path("/hello.Greeter/SayHello"));
        assert!(valid_method_path("/Svc/M"));
        for bad in [
            "",
            "/",
            "hello.Greeter/SayHello",
            "/a/",
            "//b",
            "/a/b/c",
            "/a b/c",
        ] {
            assert!(!valid_method_path(bad), "{bad:?}");
        }
    }

    #[test]
    fn content_types() {
        let h = |ct: &'static str| {
            let mut m = HeaderMap::new();
            m.insert(CONTENT_TYPE, HeaderValue::from_static(ct));
            m
        };
        assert!(is_grpc(&h("application/grpc")));
        assert!(is_grpc(&h("Application/GRPC+proto")));
        assert!(is_grpc(&h("application/grpc-web-text")));
        assert!(!is_grpc(&h("application/json")));
        assert!(!is_grpc(&HeaderMap::new()));
        assert!(is_grpc_over_http2(&h("application/grpc")));
        assert!(is_grpc_over_http2(&h("application/grpc+proto")));
        assert!(!is_grpc_over_http2(&h("application/grpc-web")));
        assert!(!is_grpc_over_http2(&h("application/grpcx")));
    }

    #[test]
    fn storability() {
        let mut head = HeaderMap::new();
        head.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
        assert!(storable_head(&head));
        head.insert("grpc-encoding", HeaderValue::from_static("gzip"));
        assert!(!storable_head(&head));
        head.insert("grpc-encoding", HeaderValue::from_static("identity"));
        assert!(storable_head(&head));
        head.insert("grpc-status", HeaderValue::from_static("0"));
        assert!(!storable_head(&head), "trailers-only");

        let mut t = HeaderMap::new();
        assert!(!ok_trailers(None));
        assert!(!ok_trailers(Some(&t)));
        t.insert("grpc-status", HeaderValue::from_static("5"));
        assert!(!ok_trailers(Some(&t)));
        t.insert("grpc-status", HeaderValue::from_static("0"));
        assert!(ok_trailers(Some(&t)));
    }

    #[test]
    fn the_message_is_part_of_the_key_and_http_keys_are_unchanged() {
        let keyer = crate::key::Keyer::new("ns");
        let headers = HeaderMap::new();
        let input = KeyInput {
            route: Some("/a.B/C"),
            identity: None,
            path: "/a.B/C",
            query: None,
            key_headers: &[],
            headers: &headers,
            authority: None,
        };
        let plain = keyer.key(&input);
        assert_eq!(keyer.key_with_body(&input, None), plain);
        let one = keyer.key_with_body(&input, Some(b"\0\0\0\0\x01a"));
        let other = keyer.key_with_body(&input, Some(b"\0\0\0\0\x01b"));
        let empty = keyer.key_with_body(&input, Some(b""));
        assert!(one != other && one != plain && empty != plain);
        assert!(!one.contains("\x01a"));
    }

    #[test]
    fn other_body_types_are_given_back() {
        let body = String::from("not rebuildable");
        match read_body(body, 64) {
            Err(b) => assert_eq!(b, "not rebuildable"),
            Ok(_) => panic!("a String body cannot be rebuilt"),
        }
    }

    type TestBody = http_body_util::combinators::UnsyncBoxBody<Bytes, std::io::Error>;

    fn body_of(chunks: Vec<&'static [u8]>) -> TestBody {
        let frames = chunks
            .into_iter()
            .map(|c| Ok::<_, std::io::Error>(Frame::data(Bytes::from_static(c))));
        StreamBody::new(futures_util::stream::iter(frames)).boxed_unsync()
    }

    fn rebuild(r: Replay<TestBody>) -> TestBody {
        r.boxed_unsync()
    }

    fn message(payload: &[u8]) -> Vec<u8> {
        let mut m = vec![0u8];
        m.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        m.extend_from_slice(payload);
        m
    }

    #[tokio::test]
    async fn one_message_in_several_frames_is_read_and_replayed() {
        let m: &'static [u8] = Box::leak(message(b"hello world").into_boxed_slice());
        let (got, body) =
            read_message(body_of(vec![&m[..3], &m[3..7], &m[7..]]), 64, rebuild).await;
        assert_eq!(got.as_deref(), Some(m));
        assert_eq!(body.collect().await.unwrap().to_bytes(), m);
    }

    #[tokio::test]
    async fn larger_requests_are_replayed_whole_and_not_keyed() {
        let m: &'static [u8] = Box::leak(message(&[7u8; 100]).into_boxed_slice());
        // The prefix declares more than the limit: reading stops at the first frame.
        let (got, body) = read_message(body_of(vec![&m[..10], &m[10..]]), 64, rebuild).await;
        assert!(got.is_none());
        assert_eq!(body.collect().await.unwrap().to_bytes(), m);
        // Several messages within the limit: replayed, not keyed.
        let two: &'static [u8] =
            Box::leak([message(b"a"), message(b"b")].concat().into_boxed_slice());
        let (got, body) = read_message(body_of(vec![two]), 64, rebuild).await;
        assert!(got.is_none());
        assert_eq!(body.collect().await.unwrap().to_bytes(), two);
        // A truncated message.
        let (got, _) = read_message(body_of(vec![&m[..20]]), 1000, rebuild).await;
        assert!(got.is_none());
    }

    #[tokio::test]
    async fn a_body_error_is_replayed_after_the_bytes_read() {
        let frames = vec![
            Ok(Frame::data(Bytes::from_static(b"\0\0\0"))),
            Err(std::io::Error::other("reset")),
        ];
        let body: TestBody = StreamBody::new(futures_util::stream::iter(frames)).boxed_unsync();
        let (got, mut body) = read_message(body, 64, rebuild).await;
        assert!(got.is_none());
        let first = body.frame().await.unwrap().unwrap();
        assert_eq!(first.into_data().unwrap(), Bytes::from_static(b"\0\0\0"));
        assert!(body.frame().await.unwrap().is_err());
    }
}
