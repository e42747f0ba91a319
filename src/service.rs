//! `CacheService`: decides per request, then hands over to `ResponseFuture`.

use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Method, Request, Response};
use tower_service::Service;

use crate::engine::ctx::Ctx;
use crate::engine::Engine;
use crate::http::body::ResponseBody;
use crate::http::future::ResponseFuture;
use crate::key::KeyInput;
use crate::outcome::{BypassReason, Counters};
use crate::policy::{cacheable_method, request_bypass, SharedRequest};

/// The service made by [`CacheLayer`](crate::CacheLayer). See the [crate docs](crate) for an example.
pub struct CacheService<S> {
    inner: S,
    shared: Arc<Engine>,
}

impl<S> CacheService<S> {
    pub(crate) fn new(inner: S, engine: Engine) -> Self {
        CacheService {
            inner,
            shared: Arc::new(engine),
        }
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Consumes `self`, returning the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S: Clone> Clone for CacheService<S> {
    fn clone(&self) -> Self {
        CacheService {
            inner: self.inner.clone(),
            shared: Arc::clone(&self.shared),
        }
    }
}

impl<S: fmt::Debug> fmt::Debug for CacheService<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CacheService")
            .field("inner", &self.inner)
            .field("layer", &self.shared)
            .finish()
    }
}

impl<S, ReqB, ResB> Service<Request<ReqB>> for CacheService<S>
where
    S: Service<Request<ReqB>, Response = Response<ResB>> + Clone,
    // Sent to a background task by stale-while-revalidate refreshes.
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ResB: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    // Read ahead of a slow client for the requests waiting on its response (coalescing).
    ResB::Error: Send,
    // Opted-in gRPC calls rebuild their request body, of a type found at run time; a GET
    // whose body is not empty is not cached (the body says so itself).
    ReqB: http_body::Body + 'static,
{
    type Response = Response<ResponseBody<ResB>>;
    type Error = S::Error;
    type Future = ResponseFuture<S, ReqB>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqB>) -> Self::Future {
        // The readied service goes into the future; a clone stays for the next request.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);

        if crate::grpc::is_grpc(req.headers()) {
            // Never a write that invalidates its path; cached only when opted in.
            return crate::grpc::call(&self.shared, inner, req);
        }
        if !cacheable_method(req.method()) {
            let writes = [Method::PUT, Method::PATCH, Method::POST, Method::DELETE];
            if self.shared.settings.invalidate_on_write && writes.contains(req.method()) {
                let path = req.uri().path().to_owned();
                return ResponseFuture::write(inner.call(req), Arc::clone(&self.shared), path);
            }
            return ResponseFuture::passthrough(inner.call(req));
        }
        let shared = &self.shared;
        let counters = &shared.runtime.counters;
        let (parts, body) = req.into_parts();

        let matched = matched_path(&parts);
        let (route, policy) = shared.routes.lookup(matched, parts.uri.path());
        let bypass = |reason: BypassReason, parts, body| {
            Counters::incr(&counters.bypassed);
            tracing::debug!(uri = %uri_for_log(&parts), reason = reason.as_str(), "cache bypass");
            (reason, Request::from_parts(parts, body))
        };
        let body_empty = body.is_end_stream() || body.size_hint().exact() == Some(0);
        let credentials = &shared.settings.credentials;
        if let Some(reason) = request_bypass(&parts.headers, body_empty, policy, credentials) {
            let (reason, req) = bypass(reason, parts, body);
            return ResponseFuture::bypass(
                inner.call(req),
                reason,
                shared.settings.x_cache.clone(),
            );
        }
        let identity = if policy.is_per_user() {
            match shared.settings.identity.extract(&parts) {
                Some(id) => Some(id),
                None => {
                    let (reason, req) = bypass(BypassReason::NoIdentity, parts, body);
                    return ResponseFuture::bypass(
                        inner.call(req),
                        reason,
                        shared.settings.x_cache.clone(),
                    );
                }
            }
        } else {
            if policy.is_strictly_shared() && shared.settings.identity.extract(&parts).is_some() {
                // Whoever the layer can identify may get a personalised answer.
                let (reason, req) = bypass(BypassReason::Identity, parts, body);
                return ResponseFuture::bypass(
                    inner.call(req),
                    reason,
                    shared.settings.x_cache.clone(),
                );
            }
            None
        };
        // The authority only where it is keyed (`Policy::key_header(HOST)`).
        let authority = if policy.key_headers.contains(&http::header::HOST) {
            match crate::key::authority(&parts.uri, &parts.headers) {
                Ok(authority) => authority,
                Err(_) => {
                    let (reason, req) = bypass(BypassReason::Authority, parts, body);
                    return ResponseFuture::bypass(
                        inner.call(req),
                        reason,
                        shared.settings.x_cache.clone(),
                    );
                }
            }
        } else {
            None
        };
        let key = shared.settings.keyer.key(&KeyInput {
            route,
            identity: identity.as_deref(),
            path: parts.uri.path(),
            query: parts.uri.query(),
            key_headers: &policy.key_headers,
            headers: &parts.headers,
            authority,
        });
        let head = parts.method == Method::HEAD;
        let conditional = {
            let inm = parts.headers.get(http::header::IF_NONE_MATCH).cloned();
            let ims = parts.headers.get(http::header::IF_MODIFIED_SINCE).cloned();
            (inm.is_some() || ims.is_some()).then(|| Box::new((inm, ims)))
        };
        #[cfg(feature = "near")]
        let mut near_epoch = None;
        #[cfg(feature = "near")]
        // Not in shared-cache mode: its reuse rules (Vary, Authorization, request
        // directives) are checked on the Redis lookup, and the near-cache would skip them.
        // Nor in front of the in-process store, which is near already.
        if let (Some(max_age), Some(redis)) = (
            policy.near.filter(|_| !policy.http_shared),
            shared.settings.store.as_redis(),
        ) {
            let near = shared.near();
            if near.usable(redis) {
                if let Some(held) = near.get(&key) {
                    Counters::incr(&counters.hits);
                    tracing::debug!(key = %key, "near-cache hit");
                    if !(policy.etag && conditional.is_some()) {
                        // The common case: the ready head, no request context.
                        let now = crate::http::future::now_ms();
                        return ResponseFuture::near_ready(held.respond(head, now));
                    }
                    let ctx = Ctx {
                        head,
                        conditional,
                        ..Ctx::new(Arc::clone(shared), key, Arc::clone(policy), identity)
                    };
                    return ResponseFuture::near_hit(ctx, held.entry());
                }
                near_epoch = Some((near.epoch(), max_age));
            }
        }
        let ctx = Ctx {
            head,
            path: parts.uri.path().to_owned(),
            route: route.map(str::to_owned),
            conditional,
            #[cfg(feature = "near")]
            near: near_epoch,
            shared_request: policy
                .http_shared
                .then(|| Arc::new(SharedRequest::for_request(&parts.uri, &parts.headers))),
            ..Ctx::new(Arc::clone(shared), key, Arc::clone(policy), identity)
        };
        ResponseFuture::lookup(ctx, inner, Request::from_parts(parts, body))
    }
}

#[cfg(feature = "axum")]
fn matched_path(parts: &http::request::Parts) -> Option<&str> {
    parts
        .extensions
        .get::<axum::extract::MatchedPath>()
        .map(|m| m.as_str())
}

#[cfg(not(feature = "axum"))]
fn matched_path(_: &http::request::Parts) -> Option<&str> {
    None
}

/// The path only: queries may carry tokens, and logs must not.
fn uri_for_log(parts: &http::request::Parts) -> &str {
    parts.uri.path()
}
