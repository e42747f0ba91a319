//! `ResponseFuture`: lookup, then either a hit or the inner service.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::header::{AGE, CONTENT_LENGTH};
use http::{HeaderName, HeaderValue, Request, Response};
use pin_project_lite::pin_project;
use sync_wrapper::SyncWrapper;
use tower_service::Service;

use crate::engine::coalesce::{Outcome, Role};
use crate::engine::ctx::{Ctx, Deferred};
use crate::engine::Engine;
use crate::entry::{storable_map, Entry, Ready};
use crate::http::body::{drain, spawn_detached, Recorder, ResponseBody};
use crate::outcome::{set_headers, with_number, BypassReason, CacheStatus, Counters, NotStored};
use crate::policy::{
    cache_control, handler_override, storage, take_tags, Policy, SharedRequest, TAG_HEADERS,
    TTL_OVERRIDE_HEADER, VARY_FINGERPRINT,
};

/// The read of a deferred request's body.
pub(crate) type DeferredRead = Pin<Box<dyn Future<Output = Deferred> + Send>>;
type Lookup = Pin<Box<dyn Future<Output = Found> + Send>>;
type BoxCall<R, E> = Pin<Box<dyn Future<Output = Result<R, E>> + Send>>;
type Detach<R, E> = fn(BoxCall<R, E>, Box<Ctx>);

/// The outcome of a lookup.
#[allow(clippy::large_enum_variant)] // a hit is the common case: no extra allocation
pub(crate) enum Found {
    /// A confirmed entry.
    Hit(Entry),
    /// No usable entry; `seq` is the namespace's invalidation sequence read right after,
    /// before the inner service runs (none if it could not be read: then nothing is stored).
    /// `flight` is set when this request leads a coalesced miss.
    Miss {
        seq: Option<u64>,
        flight: Option<crate::engine::coalesce::FlightGuard>,
        /// An entry past its freshness but within the stale-if-error window.
        stale: Option<Entry>,
        /// An entry of this key past its freshness but still within a stale window was
        /// found: a refusal of this miss removes it (see `Ctx::replaces`).
        replaces: bool,
    },
    /// The entry of a concurrent miss of the same key (coalescing).
    Collapsed(Entry),
    /// A stale entry within the stale-while-revalidate window; `refresh` is set (with the
    /// sequence read before it) when this request is the one to refresh it.
    Revalidate {
        entry: Entry,
        refresh: Option<(u64, crate::engine::coalesce::FlightGuard)>,
        /// Still fresh (an early refresh): served as a plain hit.
        fresh: bool,
    },
    /// Redis could not be asked.
    Unavailable,
}

pin_project! {
    /// The response future of [`CacheService`](crate::CacheService).
    pub struct ResponseFuture<S, ReqB>
    where
        S: Service<Request<ReqB>>,
    {
        #[pin]
        state: State<S, ReqB>,
        mode: Mode,
    }
}

pin_project! {
    #[project = StateProj]
    #[project_replace = StateOwn]
    enum State<S, ReqB>
    where
        S: Service<Request<ReqB>>,
    {
        Lookup {
            lookup: SyncWrapper<Lookup>,
            service: S,
            request: Request<ReqB>,
        },
        Call {
            #[pin]
            future: S::Future,
        },
        Lead {
            lead: SyncWrapper<LeadCall<S::Response, S::Error>>,
        },
        Near {
            entry: Option<Entry>,
        },
        // A near hit built before the first poll.
        Ready {
            ready: Option<Ready>,
        },
        // A request held while its front end reads its body (an opted-in gRPC call); then
        // `decide` says what to do with it.
        Deferred {
            read: SyncWrapper<DeferredRead>,
            service: S,
            decide: fn(Deferred, S) -> Option<ResponseFuture<S, ReqB>>,
        },
        Invalidate {
            invalidation: SyncWrapper<Pin<Box<dyn Future<Output = ()> + Send>>>,
            response: SyncWrapper<Option<S::Response>>,
        },
        Done,
    }
}

/// The inner call of a request that leads a coalesced miss. Dropped before the response
/// arrives (its client left), the call moves to a background task, so that the requests
/// waiting on the flight get its entry instead of each calling the inner service.
pub(crate) struct LeadCall<R, E> {
    /// Taken when it completes.
    future: Option<BoxCall<R, E>>,
    /// The request's context, back in `Mode::Cache` once the call completes.
    ctx: Option<Box<Ctx>>,
    /// Made where the response's bounds are known, since `Drop` cannot ask for them.
    detach: Detach<R, E>,
}

impl<R, E> Drop for LeadCall<R, E> {
    fn drop(&mut self) {
        if let (Some(future), Some(ctx)) = (self.future.take(), self.ctx.take()) {
            if ctx.flight.is_some() {
                (self.detach)(future, ctx);
            }
        }
    }
}

/// Finishes a leader's call and records its response in the background (see `LeadCall`).
/// Bounded by `spawn_detached`: past the bounds, the work is dropped.
fn detach_call<B, E>(future: BoxCall<Response<B>, E>, ctx: Box<Ctx>)
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Send,
    E: Send + 'static,
{
    let shared = Arc::clone(&ctx.shared);
    let key = ctx.key.clone();
    let work = async move {
        let mut mode = Mode::Cache(ctx);
        if let Ok(response) = future.await {
            drain(respond(response, &mut mode, true).into_body()).await;
        }
    };
    spawn_detached(&shared, &key, work);
}

/// What to do with the inner response.
enum Mode {
    /// Not a GET/HEAD: untouched but for the layer's control headers.
    Passthrough,
    /// A gRPC call that is not cached: untouched, metadata included.
    Untouched,
    /// GET/HEAD that did not use the cache.
    Bypass(BypassReason, Option<HeaderName>),
    /// Looked up; on a miss the response may be stored.
    Cache(Box<Ctx>),
    /// A write (PUT, PATCH, POST, DELETE) whose success invalidates its path's entries.
    Write(Arc<Engine>, String),
}

impl<S, ReqB> ResponseFuture<S, ReqB>
where
    S: Service<Request<ReqB>>,
{
    pub(crate) fn passthrough(future: S::Future) -> Self {
        ResponseFuture {
            state: State::Call { future },
            mode: Mode::Passthrough,
        }
    }

    pub(crate) fn untouched(future: S::Future) -> Self {
        ResponseFuture {
            state: State::Call { future },
            mode: Mode::Untouched,
        }
    }

    pub(crate) fn write(future: S::Future, shared: Arc<Engine>, path: String) -> Self {
        ResponseFuture {
            state: State::Call { future },
            mode: Mode::Write(shared, path),
        }
    }

    pub(crate) fn bypass(
        future: S::Future,
        reason: BypassReason,
        x_cache: Option<HeaderName>,
    ) -> Self {
        ResponseFuture {
            state: State::Call { future },
            mode: Mode::Bypass(reason, x_cache),
        }
    }

    /// A hit from the near-cache: answered on first poll.
    #[cfg(feature = "near")]
    pub(crate) fn near_hit(ctx: Ctx, entry: Entry) -> Self {
        ResponseFuture {
            state: State::Near { entry: Some(entry) },
            mode: Mode::Cache(Box::new(ctx)),
        }
    }

    /// A near hit answered from its ready head, without a request context.
    #[cfg(feature = "near")]
    pub(crate) fn near_ready(ready: Ready) -> Self {
        ResponseFuture {
            state: State::Ready { ready: Some(ready) },
            mode: Mode::Passthrough,
        }
    }

    /// A request whose body is read first; `decide` then builds the future that answers it.
    pub(crate) fn deferred(
        read: DeferredRead,
        service: S,
        decide: fn(Deferred, S) -> Option<ResponseFuture<S, ReqB>>,
    ) -> Self {
        ResponseFuture {
            state: State::Deferred {
                read: SyncWrapper::new(read),
                service,
                decide,
            },
            mode: Mode::Passthrough,
        }
    }

    pub(crate) fn lookup(ctx: Ctx, service: S, request: Request<ReqB>) -> Self {
        // A request that refuses stored responses (no-cache) could not use a flight's.
        let refuses = ctx
            .shared_request
            .as_ref()
            .is_some_and(|r| r.refuses_stored());
        let coalesce = if ctx.head || refuses {
            None
        } else {
            ctx.policy.coalesce
        };
        let lookup: Lookup = Box::pin(look_up(
            Arc::clone(&ctx.shared),
            ctx.key.clone(),
            Ask {
                coalesce,
                revalidate: !ctx.head,
                lock: ctx.policy.lock,
                early: ctx.policy.early_refresh,
                near: ctx.near,
                shared_request: ctx.shared_request.clone(),
            },
        ));
        ResponseFuture {
            state: State::Lookup {
                lookup: SyncWrapper::new(lookup),
                service,
                request,
            },
            mode: Mode::Cache(Box::new(ctx)),
        }
    }
}

impl<S, ReqB, ResB> Future for ResponseFuture<S, ReqB>
where
    S: Service<Request<ReqB>, Response = Response<ResB>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ResB: http_body::Body<Data = Bytes> + Send + 'static,
    ResB::Error: Send,
    ReqB: 'static,
{
    type Output = Result<Response<ResponseBody<ResB>>, S::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                StateProj::Lookup { lookup, .. } => {
                    let found = ready!(lookup.get_mut().as_mut().poll(cx));
                    let Mode::Cache(ctx) = this.mode else {
                        // Impossible: only `lookup` builds this state, always with
                        // `Mode::Cache`. Never a panic on a request path.
                        this.state.set(State::Done);
                        return Poll::Pending;
                    };
                    match found {
                        Found::Hit(entry) => {
                            this.state.set(State::Done);
                            return Poll::Ready(Ok(hit(entry, ctx)));
                        }
                        Found::Collapsed(entry) => {
                            this.state.set(State::Done);
                            return Poll::Ready(Ok(hit_as(entry, ctx, CacheStatus::Collapsed)));
                        }
                        Found::Revalidate {
                            entry,
                            refresh,
                            fresh,
                        } => {
                            let Some((mut service, mut request)) = take_lookup(this.state.as_mut())
                            else {
                                return Poll::Pending;
                            };
                            if let Some((seq, guard)) = refresh {
                                // This request's own call refreshes the entry, in the
                                // background; its client gets the stale entry now.
                                strip_conditionals(request.headers_mut());
                                let future = service.call(request);
                                spawn_refresh(future, refresh_ctx(ctx, seq, guard));
                            }
                            let status = if fresh {
                                CacheStatus::Hit
                            } else {
                                CacheStatus::Revalidating
                            };
                            return Poll::Ready(Ok(hit_as(entry, ctx, status)));
                        }
                        Found::Miss {
                            seq,
                            flight,
                            stale,
                            replaces,
                        } => {
                            ctx.miss_seq = seq;
                            ctx.flight = flight;
                            ctx.stale = stale;
                            ctx.replaces = replaces;
                        }
                        Found::Unavailable => ctx.status = CacheStatus::Unavailable,
                    }
                    let leads = ctx.flight.is_some();
                    let Some((mut service, mut request)) = take_lookup(this.state.as_mut()) else {
                        return Poll::Pending;
                    };
                    if leads {
                        // Its response is for every request waiting on the flight.
                        strip_conditionals(request.headers_mut());
                    }
                    let future = service.call(request);
                    match std::mem::replace(this.mode, Mode::Passthrough) {
                        Mode::Cache(ctx) if ctx.flight.is_some() => {
                            let detach: Detach<S::Response, S::Error> =
                                detach_call::<ResB, S::Error>;
                            let future: BoxCall<S::Response, S::Error> = Box::pin(future);
                            this.state.set(State::Lead {
                                lead: SyncWrapper::new(LeadCall {
                                    future: Some(future),
                                    ctx: Some(ctx),
                                    detach,
                                }),
                            });
                        }
                        mode => {
                            *this.mode = mode;
                            this.state.set(State::Call { future });
                        }
                    }
                }
                StateProj::Near { entry } => {
                    let (Mode::Cache(ctx), Some(entry)) = (&*this.mode, entry.take()) else {
                        // Polled after completion.
                        return Poll::Pending;
                    };
                    let response = hit_as(entry, ctx, CacheStatus::NearHit);
                    this.state.set(State::Done);
                    return Poll::Ready(Ok(response));
                }
                StateProj::Ready { ready } => {
                    let Some(ready) = ready.take() else {
                        // Polled after completion.
                        return Poll::Pending;
                    };
                    let response = Response::from_parts(
                        ready.parts,
                        ResponseBody::cached(ready.body, ready.trailers),
                    );
                    this.state.set(State::Done);
                    return Poll::Ready(Ok(response));
                }
                StateProj::Lead { lead } => {
                    let lead = lead.get_mut();
                    let Some(future) = lead.future.as_mut() else {
                        // Completed already: see `Done`.
                        return Poll::Pending;
                    };
                    let result = ready!(future.as_mut().poll(cx));
                    lead.future = None;
                    if let Some(ctx) = lead.ctx.take() {
                        *this.mode = Mode::Cache(ctx);
                    }
                    this.state.set(State::Done);
                    if let Some(stale) = stale_on_failure(&result, this.mode) {
                        return Poll::Ready(Ok(stale));
                    }
                    return Poll::Ready(result.map(|r| respond(r, this.mode, false)));
                }
                StateProj::Call { future } => {
                    let result = ready!(future.poll(cx));
                    if let Some(stale) = stale_on_failure(&result, this.mode) {
                        this.state.set(State::Done);
                        return Poll::Ready(Ok(stale));
                    }
                    let response = result?;
                    if let Mode::Write(shared, path) = this.mode {
                        if response.status().is_success() {
                            let invalidation =
                                invalidate_after_write(Arc::clone(shared), std::mem::take(path));
                            this.state.set(State::Invalidate {
                                invalidation: SyncWrapper::new(Box::pin(invalidation)),
                                response: SyncWrapper::new(Some(response)),
                            });
                            continue;
                        }
                    }
                    this.state.set(State::Done);
                    return Poll::Ready(Ok(respond(response, this.mode, false)));
                }
                StateProj::Deferred { read, .. } => {
                    let read = ready!(read.get_mut().as_mut().poll(cx));
                    let StateOwn::Deferred {
                        service, decide, ..
                    } = this.state.as_mut().project_replace(State::Done)
                    else {
                        return Poll::Pending; // the state matched just above
                    };
                    // `None` only if the rebuilt body had another type: cannot happen.
                    let Some(next) = decide(read, service) else {
                        return Poll::Pending;
                    };
                    let ResponseFuture { state, mode } = next;
                    this.state.set(state);
                    *this.mode = mode;
                }
                StateProj::Invalidate {
                    invalidation,
                    response,
                } => {
                    ready!(invalidation.get_mut().as_mut().poll(cx));
                    let response = response.get_mut().take();
                    this.state.set(State::Done);
                    match response {
                        Some(r) => return Poll::Ready(Ok(respond(r, this.mode, false))),
                        // Taken only here, right before `Done`.
                        None => return Poll::Pending,
                    }
                }
                StateProj::Done => {
                    // Polled after completion: a contract violation by the caller; stay
                    // pending rather than panic on a request path.
                    return Poll::Pending;
                }
            }
        }
    }
}

/// stale-if-error: a failure of the inner service (5xx, an error, or a timeout layer's 408)
/// is answered by the stale entry, when there is one.
fn stale_on_failure<B, E>(
    result: &Result<Response<B>, E>,
    mode: &mut Mode,
) -> Option<Response<ResponseBody<B>>> {
    let Mode::Cache(ctx) = mode else {
        return None;
    };
    let failed = match result {
        Ok(r) => r.status().is_server_error() || r.status() == http::StatusCode::REQUEST_TIMEOUT,
        Err(_) => true,
    };
    if !failed {
        return None;
    }
    let stale = ctx.stale.take()?;
    Counters::incr(&ctx.shared.runtime.counters.stale_if_error);
    tracing::debug!(key = %ctx.key, "inner service failed; stale entry served");
    Some(hit_as(stale, ctx, CacheStatus::Stale))
}

/// The context of a background refresh: a miss of the same key that leads its flight.
fn refresh_ctx(ctx: &Ctx, seq: u64, guard: crate::engine::coalesce::FlightGuard) -> Ctx {
    Ctx {
        shared: Arc::clone(&ctx.shared),
        key: ctx.key.clone(),
        policy: Arc::clone(&ctx.policy),
        head: false,
        status: CacheStatus::Miss,
        path: ctx.path.clone(),
        route: ctx.route.clone(),
        identity: ctx.identity.clone(),
        miss_seq: Some(seq),
        started: Instant::now(),
        conditional: None,
        flight: Some(guard),
        stale: None,
        replaces: true,
        near: None,
        shared_request: ctx.shared_request.clone(),
        grpc: ctx.grpc,
    }
}

/// Calls the inner service and records its response to the end, off any client's path.
fn spawn_refresh<F, B, E>(future: F, ctx: Ctx)
where
    F: Future<Output = Result<Response<B>, E>> + Send + 'static,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Send,
    E: Send + 'static,
{
    let Ok(rt) = tokio::runtime::Handle::try_current() else {
        return;
    };
    Counters::incr(&ctx.shared.runtime.counters.refreshes);
    rt.spawn(async move {
        let mut mode = Mode::Cache(Box::new(ctx));
        let Ok(response) = future.await else {
            return;
        };
        // Drive the body to its end: the recorder stores it (or abandons it on an error).
        drain(respond(response, &mut mode, true).into_body()).await;
    });
}

/// Invalidates a path after a successful write to it, before the response is returned, so
/// the writer's next read is fresh. A failure is logged and counted; the write's own
/// response is returned either way (it succeeded).
async fn invalidate_after_write(shared: Arc<Engine>, path: String) {
    let handle = crate::handle::CacheHandle::new((*shared).clone());
    if let Err(e) = handle.invalidate_path(&path).await {
        Counters::incr(&shared.runtime.counters.write_errors);
        tracing::warn!(path = %path, error = %e, "invalidation after a write failed; entries may be stale until their TTL");
    }
}

/// Takes the readied service and the request out of the `Lookup` state, leaving `Done`.
/// Called only from the `Lookup` arm of `poll`, so always `Some`.
fn take_lookup<S, ReqB>(state: Pin<&mut State<S, ReqB>>) -> Option<(S, Request<ReqB>)>
where
    S: Service<Request<ReqB>>,
{
    match state.project_replace(State::Done) {
        StateOwn::Lookup {
            service, request, ..
        } => Some((service, request)),
        _ => None,
    }
}

/// What a lookup may do besides the GET.
struct Ask {
    /// Coalescing's wait, when on.
    coalesce: Option<Duration>,
    /// Whether stale-while-revalidate and early refreshes may start (not for HEAD).
    revalidate: bool,
    /// The cross-instance lock's TTL, when on.
    lock: Option<Duration>,
    /// XFetch's beta, when on.
    early: Option<f64>,
    /// The near-cache's epoch and bound, for routes that use it.
    near: Option<(u64, Duration)>,
    /// Shared-cache mode: what decides reuse for this request.
    shared_request: Option<Arc<SharedRequest>>,
}

/// GET the entry; on a miss, read the invalidation sequence before the inner service runs.
async fn look_up(shared: Arc<Engine>, key: String, ask: Ask) -> Found {
    let Ask {
        coalesce,
        revalidate,
        lock,
        early,
        near,
        shared_request,
    } = ask;
    let store = &shared.settings.store;
    let counters = &shared.runtime.counters;
    let started = Instant::now();
    let mut stale = None;
    let mut replaces = false;
    let usable = |entry: &Entry| usable(shared_request.as_deref(), entry);
    let (raw, seq) = match store
        .lookup(&key, shared.settings.keyer.seq_key_shared())
        .await
    {
        Ok(found) => found,
        Err(_) => {
            Counters::incr(&counters.unavailable);
            return Found::Unavailable;
        }
    };
    match raw {
        Some(raw) => match Entry::decode(&raw) {
            Ok(entry) if entry.confirmed && !usable(&entry) => {
                tracing::debug!(key = %key, "entry does not answer this request; cache miss");
            }
            Ok(entry) if entry.confirmed && is_fresh(&entry) => {
                Counters::incr(&counters.hits);
                tracing::debug!(key = %key, "cache hit");
                #[cfg(feature = "near")]
                if let Some((epoch, max_age)) = near {
                    let left = entry
                        .stored_at_ms
                        .saturating_add(entry.ttl_ms)
                        .saturating_sub(now_ms());
                    let ttl = max_age.min(Duration::from_millis(left));
                    shared.near().insert(
                        &key,
                        &entry,
                        ttl,
                        epoch,
                        shared.settings.x_cache.as_ref(),
                    );
                }
                #[cfg(not(feature = "near"))]
                let _ = near;
                if revalidate && early.is_some_and(|beta| xfetch_due(&entry, beta)) {
                    let refresh = Box::pin(claim_refresh(&shared, &key)).await;
                    if refresh.is_some() {
                        tracing::debug!(key = %key, "early refresh");
                        return Found::Revalidate {
                            entry,
                            refresh,
                            fresh: true,
                        };
                    }
                }
                return Found::Hit(entry);
            }
            Ok(entry) if entry.confirmed && revalidate && within(&entry, entry.swr_ms) => {
                Counters::incr(&counters.stale_while_revalidate);
                let refresh = Box::pin(claim_refresh(&shared, &key)).await;
                tracing::debug!(key = %key, refresh = refresh.is_some(), "stale entry served while revalidating");
                return Found::Revalidate {
                    entry,
                    refresh,
                    fresh: false,
                };
            }
            Ok(entry) if entry.confirmed => {
                tracing::debug!(key = %key, "stale entry; cache miss");
                replaces = within(&entry, entry.swr_ms.max(entry.sie_ms));
                if within(&entry, entry.sie_ms) {
                    stale = Some(entry);
                }
            }
            Ok(_) => tracing::debug!(key = %key, "entry not confirmed yet; cache miss"),
            Err(e) => {
                Counters::incr(&counters.undecodable);
                tracing::warn!(key = %key, error = %e, "undecodable cache entry; treated as a miss");
                remove_if_unchanged(&shared, key.clone(), raw);
            }
        },
        None => tracing::debug!(key = %key, "cache miss"),
    }
    // Boxed, like the refresh claims above: the state of the miss path (sequence read,
    // coalescing, cross-instance lock) would otherwise make every lookup future several
    // times larger, and hits pay for moving it.
    let missed = Missed {
        key,
        seq,
        started,
        stale,
        replaces,
    };
    Box::pin(after_miss(shared, missed, coalesce, lock, shared_request)).await
}

/// What a lookup that found no usable entry knows.
struct Missed {
    key: String,
    /// The invalidation sequence, when it was read with the entry.
    seq: Option<u64>,
    /// When the lookup began.
    started: Instant,
    /// A stale entry that may answer if the inner service fails.
    stale: Option<Entry>,
    /// A stale entry that may still be served was found (see `Found::Miss`).
    replaces: bool,
}

/// Shared-cache mode: whether an entry may answer this request (Vary, Authorization,
/// request directives); a refused entry is a miss. Always, in other modes.
fn usable(shared_request: Option<&SharedRequest>, entry: &Entry) -> bool {
    shared_request.map_or(true, |r| {
        let age = now_ms().saturating_sub(entry.stored_at_ms);
        r.may_reuse(&entry.headers, Duration::from_millis(age))
    })
}

/// The rest of a lookup that found no usable entry: reads the invalidation sequence within
/// what is left of the lookup deadline, then joins or leads the key's flight.
async fn after_miss(
    shared: Arc<Engine>,
    missed: Missed,
    coalesce: Option<Duration>,
    lock: Option<Duration>,
    shared_request: Option<Arc<SharedRequest>>,
) -> Found {
    let Missed {
        key,
        seq,
        started,
        stale,
        replaces,
    } = missed;
    let usable = |entry: &Entry| usable(shared_request.as_deref(), entry);
    let store = &shared.settings.store;
    let counters = &shared.runtime.counters;
    Counters::incr(&counters.misses);
    // Read with the entry when the lookup was batched; else now, within what the GET left
    // of the lookup deadline.
    let left = store.lookup_timeout().saturating_sub(started.elapsed());
    let seq = match seq {
        Some(seq) => Some(seq),
        None if left.is_zero() => None,
        None => store
            .read_seq(shared.settings.keyer.seq_key(), left)
            .await
            .ok(),
    };
    let Some(wait) = coalesce.filter(|_| seq.is_some()) else {
        return Found::Miss {
            seq,
            flight: None,
            stale,
            replaces,
        };
    };
    match shared.runtime.flights.join(&key, seq, started) {
        Role::Leader(guard) => {
            if let Some(lock_ttl) = lock {
                let other = wait_for_other_instance(&shared, &key, lock_ttl, wait).await;
                if let Some(entry) = other.filter(|e| usable(&e.1)) {
                    // Our own followers get it too.
                    drop(guard.complete(entry.0));
                    Counters::incr(&counters.collapsed);
                    return Found::Collapsed(entry.1);
                }
            }
            Found::Miss {
                seq,
                flight: Some(guard),
                stale,
                replaces,
            }
        }
        Role::Follower(mut rx) => {
            let mut landed = false;
            if let Ok(Some(outcome)) = tokio::time::timeout(wait, follow(&mut rx)).await {
                match &outcome {
                    Outcome::Stored(raw) => {
                        // Another variant, or not for this request: ask ourselves.
                        if let Some(entry) = Entry::decode(raw).ok().filter(|e| usable(e)) {
                            Counters::incr(&counters.collapsed);
                            tracing::debug!(key = %key, "coalesced with a concurrent miss");
                            return Found::Collapsed(entry);
                        }
                    }
                    Outcome::Landed => landed = true,
                    Outcome::Pending | Outcome::Streaming(_) | Outcome::NotStored => {}
                }
            }
            if landed {
                // The flight's entry landed in Redis just after this lookup's GET: read it.
                if let Ok(Some(raw)) = store.get(&key).await {
                    if let Some(entry) = Entry::decode(&raw)
                        .ok()
                        .filter(|e| e.confirmed && is_fresh(e) && usable(e))
                    {
                        Counters::incr(&counters.collapsed);
                        tracing::debug!(key = %key, "entry landed right after the lookup");
                        return Found::Collapsed(entry);
                    }
                }
            }
            // Not storable, or too slow: ask the inner service ourselves.
            Found::Miss {
                seq,
                flight: None,
                stale,
                replaces,
            }
        }
    }
}

/// Waits for a flight's outcome. While the leader's body streams, has it read ahead, so that
/// the wait does not depend on how fast the leader's client reads. `None`: the flight is
/// gone, or its body could not be read ahead (the bounds on background work): the caller asks
/// the inner service itself.
async fn follow(rx: &mut tokio::sync::watch::Receiver<Outcome>) -> Option<Outcome> {
    let mut asked = false;
    loop {
        let lead = {
            let outcome = rx
                .wait_for(|o| match o {
                    Outcome::Pending => false,
                    Outcome::Streaming(_) => !asked,
                    _ => true,
                })
                .await
                .ok()?;
            match &*outcome {
                Outcome::Streaming(lead) => lead.clone(),
                other => return Some(other.clone()),
            }
        };
        // Outside the channel's lock: the recording may complete the flight meanwhile.
        asked = true;
        if let Some(lead) = lead.upgrade() {
            if !lead.read_ahead() {
                return None;
            }
        }
    }
}

/// Takes the cross-instance lock of `key`; if another instance holds it, waits (polling,
/// up to `wait`) for that instance's confirmed entry. `None`: compute it here (the lock was
/// ours, Redis did not answer, or the wait ran out: the give-up path).
async fn wait_for_other_instance(
    shared: &Engine,
    key: &str,
    lock_ttl: Duration,
    wait: Duration,
) -> Option<(Bytes, Entry)> {
    let store = &shared.settings.store;
    let lock_key = format!("{key}:lock");
    if store.try_lock(&lock_key, lock_ttl).await.unwrap_or(true) {
        return None;
    }
    // `None`: longer than `Instant` can count (`Duration::MAX` settings): no deadline but the
    // entry's arrival, as configured.
    let deadline = Instant::now().checked_add(wait.min(lock_ttl));
    while deadline.map_or(true, |d| Instant::now() < d) {
        tokio::time::sleep(Duration::from_millis(20)).await;
        if let Ok(Some(raw)) = store.get(key).await {
            if let Ok(entry) = Entry::decode(&raw) {
                if entry.confirmed && is_fresh(&entry) {
                    return Some((raw, entry));
                }
            }
        }
    }
    None
}

/// Becomes the one request of this process that refreshes `key` (the flight of the key,
/// as for a miss), with the invalidation sequence read before.
async fn claim_refresh(
    shared: &Engine,
    key: &str,
) -> Option<(u64, crate::engine::coalesce::FlightGuard)> {
    let store = &shared.settings.store;
    let seq = store
        .read_seq(shared.settings.keyer.seq_key(), store.lookup_timeout())
        .await
        .ok()?;
    match shared.runtime.flights.join(key, Some(seq), Instant::now()) {
        Role::Leader(guard) => Some((seq, guard)),
        Role::Follower(_) => None,
    }
}

/// XFetch (Vattani et al.): refresh now if `now - delta * beta * ln(u) >= expiry`, with `u`
/// uniform in (0, 1] and `delta` the time the response took to compute.
fn xfetch_due(entry: &Entry, beta: f64) -> bool {
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut h = blake3::Hasher::new();
    h.update(&n.to_le_bytes());
    h.update(&now_ms().to_le_bytes());
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&h.finalize().as_bytes()[..8]);
    let u = (u64::from_le_bytes(bytes) >> 11) as f64 / (1u64 << 53) as f64;
    let u = u.max(f64::MIN_POSITIVE);
    let gap = entry.delta_ms.max(1) as f64 * beta * -u.ln();
    let expiry = entry.stored_at_ms.saturating_add(entry.ttl_ms) as f64;
    now_ms() as f64 + gap >= expiry
}

/// Whether a stale entry is still within `window_ms` past its freshness.
fn within(entry: &Entry, window_ms: u64) -> bool {
    window_ms > 0
        && now_ms()
            < entry
                .stored_at_ms
                .saturating_add(entry.ttl_ms)
                .saturating_add(window_ms)
}

/// Whether an entry is within its freshness (entries may be kept longer for stale-if-error).
fn is_fresh(entry: &Entry) -> bool {
    now_ms() < entry.stored_at_ms.saturating_add(entry.ttl_ms)
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Builds the response for a hit: the stored head, exact `Content-Length`, `Age`, and the
/// cache status headers. HEAD gets the headers only.
fn hit<B>(entry: Entry, ctx: &Ctx) -> Response<ResponseBody<B>> {
    hit_as(entry, ctx, CacheStatus::Hit)
}

fn hit_as<B>(entry: Entry, ctx: &Ctx, status: CacheStatus) -> Response<ResponseBody<B>> {
    if ctx.policy.etag && not_modified(&entry.headers, ctx.conditional.as_deref()) {
        return not_modified_response(entry, ctx);
    }
    let now = now_ms();
    let age_secs = now.saturating_sub(entry.stored_at_ms) / 1000;
    let ttl_secs = (entry.stored_at_ms.saturating_add(entry.ttl_ms)).saturating_sub(now) / 1000;
    let len = entry.body.len();
    let chunked = entry.trailers.is_some();
    let body = if ctx.head {
        ResponseBody::cached(None, None)
    } else {
        ResponseBody::cached(Some(entry.body), entry.trailers)
    };
    let mut res = Response::new(body);
    *res.status_mut() = entry.status;
    *res.headers_mut() = entry.headers;
    let headers = res.headers_mut();
    headers.remove(VARY_FINGERPRINT);
    if !chunked {
        // With trailers, HTTP/1.1 needs chunked framing: no length.
        if let Some(len) = with_number("", len as u64) {
            headers.insert(CONTENT_LENGTH, len);
        }
    }
    if let Some(age) = with_number("", age_secs) {
        headers.insert(AGE, age);
    }
    set_headers(
        headers,
        status,
        ttl_secs,
        ctx.shared.settings.x_cache.as_ref(),
    );
    res.extensions_mut().insert(status);
    res
}

/// Whether a conditional request is satisfied by the entry: `If-None-Match` against its
/// `ETag` (weak comparison, `*` matches any), or else `If-Modified-Since` against its
/// `Last-Modified` (RFC 9110 §13.1).
fn not_modified(
    headers: &http::HeaderMap,
    conditional: Option<&(Option<HeaderValue>, Option<HeaderValue>)>,
) -> bool {
    let Some((if_none_match, if_modified_since)) = conditional else {
        return false;
    };
    let opaque = |tag: &str| tag.trim().trim_start_matches("W/").to_owned();
    if let Some(inm) = if_none_match {
        let Some(etag) = headers
            .get(http::header::ETAG)
            .and_then(|v| v.to_str().ok())
        else {
            return false;
        };
        let etag = opaque(etag);
        return inm
            .to_str()
            .map(|list| {
                list.split(',')
                    .any(|t| t.trim() == "*" || opaque(t) == etag)
            })
            .unwrap_or(false);
    }
    let date = |v: Option<&HeaderValue>| {
        v.and_then(|v| v.to_str().ok())
            .and_then(|v| httpdate::parse_http_date(v).ok())
    };
    match (
        date(headers.get(http::header::LAST_MODIFIED)),
        date(if_modified_since.as_ref()),
    ) {
        (Some(modified), Some(since)) => modified <= since,
        _ => false,
    }
}

/// `304 Not Modified` for a hit: no body, and the headers a 200 would have carried that a
/// 304 must repeat (RFC 9110 §15.4.5).
fn not_modified_response<B>(entry: Entry, ctx: &Ctx) -> Response<ResponseBody<B>> {
    use http::header::{CACHE_CONTROL, CONTENT_LOCATION, DATE, ETAG, EXPIRES, LAST_MODIFIED, VARY};
    let now = now_ms();
    let mut res = Response::new(ResponseBody::cached(None, None));
    *res.status_mut() = http::StatusCode::NOT_MODIFIED;
    let headers = res.headers_mut();
    for name in [
        CACHE_CONTROL,
        CONTENT_LOCATION,
        DATE,
        ETAG,
        EXPIRES,
        VARY,
        LAST_MODIFIED,
    ] {
        for v in entry.headers.get_all(&name) {
            headers.append(name.clone(), v.clone());
        }
    }
    if entry.trailers.is_none() {
        // What a 200 would have sent (RFC 9110 §8.6); routers otherwise write a misleading 0.
        headers.insert(CONTENT_LENGTH, HeaderValue::from(entry.body.len()));
    }
    headers.insert(
        AGE,
        HeaderValue::from(now.saturating_sub(entry.stored_at_ms) / 1000),
    );
    let ttl_secs = (entry.stored_at_ms.saturating_add(entry.ttl_ms)).saturating_sub(now) / 1000;
    set_headers(
        headers,
        CacheStatus::Hit,
        ttl_secs,
        ctx.shared.settings.x_cache.as_ref(),
    );
    res.extensions_mut().insert(CacheStatus::Hit);
    res
}

/// Wraps the inner response: marks it, and on a storable GET miss records its body.
/// `background`: no client waits for this response (a refresh, a detached leader).
fn respond<B>(response: Response<B>, mode: &mut Mode, background: bool) -> Response<ResponseBody<B>>
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Send,
{
    let ctx = match mode {
        Mode::Untouched => return response.map(ResponseBody::passthrough),
        Mode::Passthrough | Mode::Write(..) => {
            let (mut parts, body) = response.into_parts();
            strip_control_headers(&mut parts.headers);
            return Response::from_parts(parts, ResponseBody::passthrough(body));
        }
        Mode::Bypass(reason, x_cache) => {
            let (mut parts, body) = response.into_parts();
            strip_control_headers(&mut parts.headers);
            let status = CacheStatus::Bypass(*reason);
            set_headers(&mut parts.headers, status, 0, x_cache.as_ref());
            parts.extensions.insert(status);
            return Response::from_parts(parts, ResponseBody::passthrough(body));
        }
        Mode::Cache(ctx) => ctx,
    };
    let (mut parts, body) = response.into_parts();
    let over = handler_override(&parts.headers, &parts.extensions);
    parts.headers.remove(TTL_OVERRIDE_HEADER);
    let tags = take_tags(&mut parts.headers, &ctx.policy);

    let counters = &ctx.shared.runtime.counters;
    // Decided for a response that may be stored, and for one that would replace an entry
    // still served (HEAD included): refused, that entry goes.
    let decided = ((ctx.miss_seq.is_some() && !ctx.head) || ctx.replaces).then(|| {
        storage(
            parts.status,
            &parts.headers,
            over,
            &ctx.policy,
            ctx.shared_request.as_deref(),
            SystemTime::now(),
            ctx.started.elapsed(),
        )
    });
    if let Some(Err(why)) = decided {
        if ctx.replaces && refusal(why, parts.status, &parts.headers, &ctx.policy) {
            remove_refused(ctx, why);
        }
    }
    let body = if ctx.head {
        ResponseBody::passthrough(body)
    } else if ctx.miss_seq.is_none() {
        tracing::debug!(key = %ctx.key, "redis unavailable at lookup; response not stored");
        ResponseBody::passthrough(body)
    } else {
        match decided {
            // Always decided here (a GET with a sequence).
            None => ResponseBody::passthrough(body),
            Some(Err(why)) => {
                if why == NotStored::Vary {
                    Counters::incr(&counters.vary_refused);
                    let route = ctx.route.as_deref().unwrap_or(&ctx.path);
                    if ctx.shared.runtime.first_vary_refusal(route) {
                        let vary: Vec<_> =
                            parts.headers.get_all(http::header::VARY).iter().collect();
                        let star = vary.iter().any(|v| {
                            v.to_str()
                                .is_ok_and(|v| v.split(',').any(|t| t.trim() == "*"))
                        });
                        if star {
                            tracing::warn!(route, "responses say Vary: * (they depend on more than the request): never stored; logged once per route");
                        } else {
                            tracing::warn!(
                                route,
                                ?vary,
                                "responses vary on headers the route does not key on: not stored (key them with Policy::key_header); logged once per route"
                            );
                        }
                    }
                }
                tracing::debug!(key = %ctx.key, reason = why.as_str(), "response not stored");
                ResponseBody::passthrough(body)
            }
            Some(Ok(_)) if ctx.grpc && !crate::policy::grpc::storable_head(&parts.headers) => {
                tracing::debug!(key = %ctx.key, "gRPC trailers-only or compressed response; not stored");
                ResponseBody::passthrough(body)
            }
            Some(Ok(_)) if !storable_map(&parts.headers) => {
                tracing::debug!(key = %ctx.key, reason = NotStored::Headers.as_str(), "response not stored");
                ResponseBody::passthrough(body)
            }
            Some(Ok(stored)) => {
                let limit = ctx.policy.max_body_size;
                if http_body::Body::size_hint(&body).lower() > limit as u64 {
                    Counters::incr(&counters.abandoned);
                    tracing::debug!(key = %ctx.key, limit, "response larger than the limit; not stored");
                    ResponseBody::passthrough(body)
                } else {
                    let flight = ctx.flight.take();
                    let recorder =
                        Recorder::new(ctx, flight, stored.ttl, parts.status, &parts.headers, tags)
                            .shared_cache(stored.age, stored.vary);
                    ResponseBody::recording(body, recorder, background)
                }
            }
        }
    };
    set_headers(
        &mut parts.headers,
        ctx.status,
        0,
        ctx.shared.settings.x_cache.as_ref(),
    );
    parts.extensions.insert(ctx.status);
    Response::from_parts(parts, body)
}

/// Whether a response that may not be stored (for reason `why`) is the handler refusing the
/// request (a 3xx other than 304, a 4xx other than 408, `no-store`, `private` where not allowed,
/// `Set-Cookie`, a skip...), as opposed to an error (5xx, 408: stale-if-error may answer
/// those) or something about this request alone (shared-cache mode: its own `no-store`, its
/// `Authorization`).
fn refusal(
    why: NotStored,
    status: http::StatusCode,
    headers: &http::HeaderMap,
    policy: &Policy,
) -> bool {
    match why {
        // A 304 validates a client's copy: it refuses nothing.
        NotStored::Status => {
            !(status.is_server_error()
                || status == http::StatusCode::REQUEST_TIMEOUT
                || status == http::StatusCode::NOT_MODIFIED)
        }
        NotStored::NoStore => {
            let cc = cache_control(headers);
            !policy.http_shared || cc.no_store || cc.no_cache
        }
        NotStored::Authorization => false,
        NotStored::Handler
        | NotStored::SetCookie
        | NotStored::Private
        | NotStored::Vary
        | NotStored::Headers
        | NotStored::Stale => true,
    }
}

/// Removes the entry that a refused response would have replaced (the handler no longer
/// gives it: it must not be served stale, nor answer the next error), off the response path,
/// under the bound on pending writes. Race-safe like an invalidation: it takes the next
/// sequence number and raises the marker of the entry's user (or, on a route without
/// identities, its path), so that a write of the old data still in flight is refused.
fn remove_refused(ctx: &Ctx, why: NotStored) {
    let shared = Arc::clone(&ctx.shared);
    let keyer = &shared.settings.keyer;
    let index = match &ctx.identity {
        Some(id) => keyer.user_index(id),
        None => keyer.path_index(&ctx.path),
    };
    let marker = keyer.marker_of(&index);
    let key = ctx.key.clone();
    let Ok(permit) = Arc::clone(&shared.runtime.writes).try_acquire_owned() else {
        Counters::incr(&shared.runtime.counters.writes_dropped);
        tracing::debug!(key = %key, "too many pending cache writes; refused entry not removed");
        return;
    };
    let Ok(rt) = tokio::runtime::Handle::try_current() else {
        return;
    };
    rt.spawn(async move {
        let keyer = &shared.settings.keyer;
        let removed = shared
            .settings
            .store
            .invalidate_keys(keyer.seq_key(), &[marker], vec![key.clone()])
            .await;
        match removed {
            Ok(_) => tracing::debug!(key = %key, reason = why.as_str(), "the handler refused the refresh; entry removed"),
            Err(e) => tracing::debug!(key = %key, error = %e.details(), "could not remove a refused entry"),
        }
        drop(permit);
    });
}

/// Removes the request's preconditions (RFC 9110 §13.1) before the cache asks the inner
/// service for a response of its own (a refresh, a coalescing leader's miss): the answer is
/// for every client, so it must be a full one, not a 304 or a 412 to this client's
/// validators. The client's own `If-None-Match` / `If-Modified-Since` are answered by the
/// cache from the entry.
fn strip_conditionals(headers: &mut http::HeaderMap) {
    use http::header::{IF_MATCH, IF_MODIFIED_SINCE, IF_NONE_MATCH, IF_RANGE, IF_UNMODIFIED_SINCE};
    for name in [
        IF_NONE_MATCH,
        IF_MODIFIED_SINCE,
        IF_MATCH,
        IF_UNMODIFIED_SINCE,
        IF_RANGE,
    ] {
        headers.remove(name);
    }
}

/// Removes the headers through which handlers talk to the layer.
fn strip_control_headers(headers: &mut http::HeaderMap) {
    headers.remove(TTL_OVERRIDE_HEADER);
    for name in &TAG_HEADERS {
        headers.remove(name);
    }
}

/// Removes an undecodable entry, off the request path, only if it still holds the same bytes.
fn remove_if_unchanged(shared: &Arc<Engine>, key: String, raw: Bytes) {
    let store = shared.settings.store.clone();
    // Under the same bound as writes: a flood of corrupt entries cannot pile up tasks.
    let Ok(permit) = Arc::clone(&shared.runtime.writes).try_acquire_owned() else {
        return;
    };
    if let Ok(rt) = tokio::runtime::Handle::try_current() {
        rt.spawn(async move {
            if let Err(e) = store.delete_if_equal(&key, raw).await {
                tracing::debug!(key = %key, error = %e.details(), "could not remove undecodable entry");
            }
            drop(permit);
        });
    }
}
