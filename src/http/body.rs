//! `ResponseBody`: a cached body, an untouched inner body, or an inner body recorded on its
//! way to the client (a tee bounded by the size limit). A coalescing leader's body can be
//! read ahead of its client for the requests waiting on it (see `Lead`).

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::header::{self, HeaderName};
use http::{HeaderMap, StatusCode};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

use crate::engine::ctx::Ctx;
use crate::engine::Engine;
use crate::entry::{storable_map, Entry};
use crate::outcome::{Counters, CACHE_STATUS};
use crate::policy::{TAG_HEADERS, TTL_OVERRIDE_HEADER};
use crate::store::{Write, Written, MARKER_TTL};

pin_project! {
    /// The response body of [`CacheService`](crate::CacheService).
    ///
    /// On a hit it yields the stored bytes (exact size hint) and trailers; otherwise it
    /// forwards the inner body frame by frame, size hint and end of stream included, and
    /// records it when the response may be stored.
    pub struct ResponseBody<B> {
        #[pin]
        kind: Kind<B>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<B> {
        Cached {
            data: Option<Bytes>,
            trailers: Option<HeaderMap>,
        },
        Passthrough {
            #[pin]
            body: B,
        },
        Recording {
            tee: Tee<B>,
        },
        Leading {
            lead: LeadBody<B>,
        },
    }
}

/// An inner body on its way to the client, recorded. Boxed so that, dropped before its end
/// (the client went away) while other requests wait for it (a coalesced miss), it can move to
/// a background task that finishes it for them.
struct Tee<B> {
    /// Always set; taken only by `drop`.
    body: Option<Pin<Box<B>>>,
    /// Taken when the recording ends: stored, over the limit, or failed.
    recorder: Option<Recorder>,
    /// Finishes the body in the background. A function pointer made where the body's bounds
    /// are known, since `Drop` cannot ask for them.
    detach: fn(Pin<Box<B>>, Recorder),
}

impl<B> Drop for Tee<B> {
    fn drop(&mut self) {
        if let (Some(body), Some(recorder)) = (self.body.take(), self.recorder.take()) {
            if recorder.flight.is_some() {
                (self.detach)(body, recorder);
            }
        }
    }
}

/// How long a response whose client left may take to finish in the background.
const DETACHED_DEADLINE: Duration = Duration::from_secs(60);

/// Drives a recorded body whose client went away to its end, so that the requests waiting on
/// its flight get the stored entry (see `spawn_detached` for the bounds).
pub(crate) fn finish_detached<B>(body: Pin<Box<B>>, recorder: Recorder)
where
    B: Body<Data = Bytes> + Send + 'static,
{
    let shared = Arc::clone(&recorder.shared);
    let key = recorder.key.clone();
    let body = ResponseBody {
        kind: Kind::Recording {
            tee: Tee {
                body: Some(body),
                recorder: Some(recorder),
                // Once is enough.
                detach: |_, _| {},
            },
        },
    };
    spawn_detached(&shared, &key, drain(body));
}

/// Runs the unfinished work of a coalesced miss whose client went away (its call, or the
/// rest of its body), for the requests waiting on its flight: at most `MAX_DETACHED` at once,
/// each for at most `DETACHED_DEADLINE`. Past either bound `work` is dropped, and with it
/// the flight: its followers call the inner service themselves, as without coalescing.
pub(crate) fn spawn_detached(
    shared: &Engine,
    key: &str,
    work: impl std::future::Future<Output = ()> + Send + 'static,
) {
    spawn_bounded(shared, key, work, true);
}

/// Runs `work` within the bounds of `spawn_detached`; false if it could not start.
/// `detached`: its client is gone (counted and logged as such), else it reads a leader's body
/// ahead of a client still there.
fn spawn_bounded(
    shared: &Engine,
    key: &str,
    work: impl std::future::Future<Output = ()> + Send + 'static,
    detached: bool,
) -> bool {
    let Ok(permit) = Arc::clone(&shared.runtime.detached).try_acquire_owned() else {
        tracing::debug!(
            key,
            "too many responses finishing in the background; dropped"
        );
        return false;
    };
    let Ok(rt) = tokio::runtime::Handle::try_current() else {
        return false;
    };
    if detached {
        Counters::incr(&shared.runtime.counters.detached);
        tracing::debug!(
            key,
            "client gone; response finished in the background for the requests waiting on it"
        );
    } else {
        tracing::debug!(
            key,
            "requests wait on this response: its body is read ahead of its client"
        );
    }
    rt.spawn(async move {
        let _ = tokio::time::timeout(DETACHED_DEADLINE, work).await;
        drop(permit);
    });
    true
}

/// Polls a body to its end (or its first error), dropping the frames.
pub(crate) async fn drain<B: Body>(body: B) {
    let mut body = std::pin::pin!(body);
    while let Some(frame) = std::future::poll_fn(|cx| body.as_mut().poll_frame(cx)).await {
        if frame.is_err() {
            break;
        }
    }
}

impl<B> ResponseBody<B> {
    pub(crate) fn cached(data: Option<Bytes>, trailers: Option<HeaderMap>) -> Self {
        ResponseBody {
            kind: Kind::Cached {
                data: data.filter(|d| !d.is_empty()),
                trailers,
            },
        }
    }

    pub(crate) fn passthrough(body: B) -> Self {
        ResponseBody {
            kind: Kind::Passthrough { body },
        }
    }

    /// `background`: already off any client's path (a refresh, or a detached leader), so
    /// nothing to finish for anyone when dropped.
    pub(crate) fn recording(body: B, recorder: Recorder, background: bool) -> Self
    where
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Send,
    {
        if body.is_end_stream() {
            // An empty body may never be polled: store it now.
            recorder.finish(None);
            return Self::passthrough(body);
        }
        if !background && recorder.flight.is_some() {
            return ResponseBody {
                kind: Kind::Leading {
                    lead: Lead::start(body, recorder),
                },
            };
        }
        ResponseBody {
            kind: Kind::Recording {
                tee: Tee {
                    body: Some(Box::pin(body)),
                    recorder: Some(recorder),
                    detach: if background {
                        |_, _| {}
                    } else {
                        finish_detached::<B>
                    },
                },
            },
        }
    }
}

impl<B> std::fmt::Debug for ResponseBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match &self.kind {
            Kind::Cached { .. } => "cached",
            Kind::Passthrough { .. } => "passthrough",
            Kind::Recording { .. } => "recording",
            Kind::Leading { .. } => "leading",
        };
        f.debug_struct("ResponseBody").field("kind", &kind).finish()
    }
}

impl<B> Body for ResponseBody<B>
where
    B: Body<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        match self.project().kind.project() {
            KindProj::Cached { data, trailers } => {
                if let Some(d) = data.take() {
                    return Poll::Ready(Some(Ok(Frame::data(d))));
                }
                Poll::Ready(trailers.take().map(|t| Ok(Frame::trailers(t))))
            }
            KindProj::Passthrough { body } => body.poll_frame(cx),
            KindProj::Recording { tee } => {
                let Tee { body, recorder, .. } = tee;
                let Some(body) = body.as_mut() else {
                    return Poll::Ready(None);
                };
                let frame = match body.as_mut().poll_frame(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(f) => f,
                };
                record(recorder, &frame, body.is_end_stream());
                Poll::Ready(frame)
            }
            KindProj::Leading { lead } => lead.lead.poll_client(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Cached { data, trailers } => data.is_none() && trailers.is_none(),
            Kind::Passthrough { body } => body.is_end_stream(),
            Kind::Recording { tee } => tee.body.as_ref().map_or(true, |b| b.is_end_stream()),
            Kind::Leading { lead } => lead.lead.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Cached { data, trailers } => {
                let len = data.as_ref().map_or(0, |d| d.len() as u64);
                if trailers.is_some() {
                    // Not exact, so that HTTP/1.1 uses chunked framing and sends trailers.
                    let mut hint = SizeHint::new();
                    hint.set_lower(len);
                    hint
                } else {
                    SizeHint::with_exact(len)
                }
            }
            Kind::Passthrough { body } => body.size_hint(),
            Kind::Recording { tee } => tee
                .body
                .as_ref()
                .map_or(SizeHint::with_exact(0), |b| b.size_hint()),
            Kind::Leading { lead } => lead.lead.size_hint(),
        }
    }
}

/// Records a frame the body yielded; `end`: the body says it is done. The recorder is taken
/// when the recording ends: stored at the end of the body (or its trailers), abandoned on an
/// error or past the size limit.
fn record<E>(recorder: &mut Option<Recorder>, frame: &Option<Result<Frame<Bytes>, E>>, end: bool) {
    match frame {
        None => {
            if let Some(r) = recorder.take() {
                r.finish(None);
            }
        }
        Some(Err(_)) => {
            // Dropping the recorder abandons the entry.
            recorder.take();
        }
        Some(Ok(f)) => {
            if let Some(data) = f.data_ref() {
                let over = recorder.as_mut().is_some_and(|r| !r.push(data));
                if over {
                    recorder.take();
                }
            } else if let Some(t) = f.trailers_ref() {
                if let Some(r) = recorder.take() {
                    r.finish(Some(t.clone()));
                }
            }
            // A body may say it is done without yielding `None`; callers such as hyper then
            // stop polling.
            if end {
                if let Some(r) = recorder.take() {
                    r.finish(None);
                }
            }
        }
    }
}

/// How many frames a leader's body may be read ahead of its client. Bytes are bounded by the
/// size limit (the frames are the recording's own chunks); this bounds a body of countless
/// empty frames. Past it the recording is abandoned: the waiting requests ask the inner
/// service themselves.
const MAX_AHEAD_FRAMES: usize = 16 * 1024;

/// Frames read ahead in one poll of the driver before it yields to other tasks.
const DRIVER_BUDGET: usize = 64;

/// The recorded body of a request that leads a coalesced miss, shared by its client and a
/// driver task.
///
/// Without requests waiting on the flight (the common case) the client polls the inner body
/// itself, recording as a `Tee` does: no task, no copy, and one allocation more (this one;
/// `Recorder::new` saves two by taking the request's key and path). Once a request waits, it asks for the body to be read ahead
/// (`ReadAhead`): a driver task (within the bounds of `spawn_detached`) polls the inner body
/// as fast as the handler yields it, records it and queues its frames for the client, so that
/// the waiting requests get the entry as soon as the handler's body is complete, however slowly
/// the leader's client reads (or if it never does). The queue holds the recording's own chunks
/// (reference counts, not copies), so it is bounded by the size limit; the driver stops when
/// the recording ends (stored, over the limit, failed) and the client polls the rest of the
/// body itself. A client that leaves has its body finished by the driver (as a `Tee`'s is).
/// On a route with the cross-instance lock the driver starts at once: other instances wait
/// for the entry in Redis and cannot ask.
struct Lead<B: Body> {
    state: Mutex<LeadState<B>>,
}

struct LeadState<B: Body> {
    /// The inner body; `None` once it ended (or failed) while read ahead.
    body: Option<Pin<Box<B>>>,
    /// Taken when the recording ends.
    recorder: Option<Recorder>,
    /// Frames read ahead, for the client, and their data bytes.
    ahead: VecDeque<Frame<Bytes>>,
    ahead_bytes: u64,
    /// An error read ahead: the client gets it after the frames.
    failed: Option<B::Error>,
    driver: Driver,
    /// The client's task, woken when a frame is read ahead or the driver stops.
    client: Option<Waker>,
    client_gone: bool,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Driver {
    /// Not started: the client polls the body.
    Idle,
    /// Reads the body ahead.
    Running,
    /// Stopped: the client polls the rest of the body, if it is there.
    Over,
}

impl<B: Body> Lead<B> {
    fn state(&self) -> MutexGuard<'_, LeadState<B>> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl<B> Lead<B>
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Send,
{
    /// The client's end of a new lead; the flight's waiting requests are told where to ask
    /// for the body to be read ahead.
    fn start(body: B, recorder: Recorder) -> LeadBody<B> {
        let lead = Arc::new(Lead {
            state: Mutex::new(LeadState {
                body: Some(Box::pin(body)),
                recorder: Some(recorder),
                ahead: VecDeque::new(),
                ahead_bytes: 0,
                failed: None,
                driver: Driver::Idle,
                client: None,
                client_gone: false,
            }),
        });
        let weak = Arc::downgrade(&lead);
        let weak: std::sync::Weak<dyn crate::engine::coalesce::ReadAhead> = weak;
        let mut st = lead.state();
        let eager = st.recorder.as_ref().is_some_and(|r| r.eager);
        if let Some(flight) = st.recorder.as_ref().and_then(|r| r.flight.as_ref()) {
            flight.streaming(weak);
        }
        if eager {
            // If the bounds refuse it, at the client's pace, as without read-ahead.
            lead.spawn_driver(&mut st, false);
        }
        drop(st);
        LeadBody { lead }
    }

    /// Starts the driver (the lock held). False if the bounds refused it.
    fn spawn_driver(self: &Arc<Self>, st: &mut LeadState<B>, detached: bool) -> bool {
        let Some(recorder) = st.recorder.as_ref() else {
            return true;
        };
        let (shared, key) = (Arc::clone(&recorder.shared), recorder.key.clone());
        st.driver = Driver::Running;
        let lead = Arc::clone(self);
        let work = async move {
            let guard = DriverGuard(lead);
            std::future::poll_fn(|cx| guard.0.drive(cx)).await;
        };
        if spawn_bounded(&shared, &key, work, detached) {
            return true;
        }
        // Not started (its guard did not run): the client goes on polling; a later request
        // (or the client leaving) may try again.
        st.driver = Driver::Idle;
        false
    }

    /// The driver's poll: reads the body ahead until the recording ends.
    fn drive(&self, cx: &mut Context<'_>) -> Poll<()> {
        let mut st = self.state();
        let mut wake = false;
        let mut polled = 0;
        let done = loop {
            if st.recorder.is_none() {
                break true;
            }
            if st.ahead.len() >= MAX_AHEAD_FRAMES {
                if let Some(r) = st.recorder.take() {
                    tracing::debug!(key = %r.key, "too many frames read ahead; response not stored");
                }
                break true;
            }
            if polled == DRIVER_BUDGET {
                cx.waker().wake_by_ref();
                break false;
            }
            polled += 1;
            let st = &mut *st;
            let Some(body) = st.body.as_mut() else {
                break true;
            };
            let frame = match body.as_mut().poll_frame(cx) {
                Poll::Pending => break false,
                Poll::Ready(frame) => frame,
            };
            record(&mut st.recorder, &frame, body.is_end_stream());
            wake = true;
            match frame {
                None => st.body = None,
                Some(Err(e)) => {
                    st.body = None;
                    if !st.client_gone {
                        st.failed = Some(e);
                    }
                }
                Some(Ok(frame)) if !st.client_gone => {
                    let len = frame.data_ref().map_or(0, |d| d.len() as u64);
                    st.ahead_bytes = st.ahead_bytes.saturating_add(len);
                    st.ahead.push_back(frame);
                }
                Some(Ok(_)) => {}
            }
        };
        let client = if wake || done { st.client.take() } else { None };
        drop(st);
        if let Some(client) = client {
            client.wake();
        }
        if done {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }
}

/// Ends the driver, however it ends (recording over, or its deadline): an unfinished
/// recording is abandoned (the waiting requests ask the inner service themselves), and the
/// client polls the rest of the body.
struct DriverGuard<B: Body>(Arc<Lead<B>>);

impl<B: Body> Drop for DriverGuard<B> {
    fn drop(&mut self) {
        let mut st = self.0.state();
        st.driver = Driver::Over;
        let recorder = st.recorder.take();
        let client = st.client.take();
        drop(st);
        drop(recorder);
        if let Some(client) = client {
            client.wake();
        }
    }
}

impl<B> crate::engine::coalesce::ReadAhead for Lead<B>
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Send,
{
    fn read_ahead(self: Arc<Self>) -> bool {
        let mut st = self.state();
        if st.driver != Driver::Idle || st.recorder.is_none() {
            return true;
        }
        self.spawn_driver(&mut st, false)
    }
}

/// The client's side of a `Lead`, as `ResponseBody` holds it: a trait object, so that
/// `ResponseBody` (whose definition has no bounds) need not name the body's error type.
trait LeadClient<B>: Send + Sync {
    fn poll_client(&self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, B::Error>>>
    where
        B: Body;
    fn is_end_stream(&self) -> bool;
    fn size_hint(&self) -> SizeHint;
    /// The client went away: the driver finishes the recording, if it is not done.
    fn client_gone(self: Arc<Self>);
}

impl<B> LeadClient<B> for Lead<B>
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Send,
{
    fn poll_client(&self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let mut st = self.state();
        let st = &mut *st;
        if let Some(frame) = st.ahead.pop_front() {
            let len = frame.data_ref().map_or(0, |d| d.len() as u64);
            st.ahead_bytes = st.ahead_bytes.saturating_sub(len);
            return Poll::Ready(Some(Ok(frame)));
        }
        if let Some(e) = st.failed.take() {
            return Poll::Ready(Some(Err(e)));
        }
        if st.driver != Driver::Running {
            let Some(body) = st.body.as_mut() else {
                return Poll::Ready(None);
            };
            if let Poll::Ready(frame) = body.as_mut().poll_frame(cx) {
                record(&mut st.recorder, &frame, body.is_end_stream());
                return Poll::Ready(frame);
            }
        }
        // Woken by the body, or by a driver started meanwhile (which then polls the body).
        if !st.client.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            st.client = Some(cx.waker().clone());
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        let st = self.state();
        st.ahead.is_empty()
            && st.failed.is_none()
            && st.body.as_ref().map_or(true, |b| b.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        let st = self.state();
        let body = st
            .body
            .as_ref()
            .map_or(SizeHint::with_exact(0), |b| b.size_hint());
        let mut hint = SizeHint::new();
        hint.set_lower(body.lower().saturating_add(st.ahead_bytes));
        if let Some(upper) = body.upper() {
            hint.set_upper(upper.saturating_add(st.ahead_bytes));
        }
        hint
    }

    fn client_gone(self: Arc<Self>) {
        let mut st = self.state();
        st.client_gone = true;
        st.client = None;
        st.ahead.clear();
        st.ahead_bytes = 0;
        st.failed = None;
        if st.driver == Driver::Idle && st.recorder.is_some() && !self.spawn_driver(&mut st, true) {
            // Past the bounds: the work is dropped, and with it the flight (as for a `Tee`).
            let recorder = st.recorder.take();
            let body = st.body.take();
            drop(st);
            drop((recorder, body));
        }
    }
}

/// The client's end of a `Lead`.
struct LeadBody<B> {
    lead: Arc<dyn LeadClient<B>>,
}

impl<B> Drop for LeadBody<B> {
    fn drop(&mut self) {
        Arc::clone(&self.lead).client_gone();
    }
}

/// Collects a response body on its way out and stores it at a clean end of stream.
/// Dropped before that (client gone, body error, over the limit), it stores nothing.
pub(crate) struct Recorder {
    shared: Arc<Engine>,
    key: String,
    ttl: Duration,
    status: StatusCode,
    headers: HeaderMap,
    tags: Vec<String>,
    path: String,
    route: Option<String>,
    identity: Option<Vec<u8>>,
    miss_seq: u64,
    started: Instant,
    /// The `Content-Length` the handler declared, if any: a body of another length is cut.
    declared_len: Option<usize>,
    chunks: Vec<Bytes>,
    len: usize,
    limit: usize,
    /// How long past its freshness the entry may be served while refreshed, and may answer
    /// failures.
    windows: (Duration, Duration),
    /// Whether to add a strong `ETag` computed from the body when the handler set none.
    etag: bool,
    /// Set when this response leads a coalesced miss: its followers get the entry.
    flight: Option<crate::engine::coalesce::FlightGuard>,
    finished: bool,
    /// Shared-cache mode: the response's age on arrival (`ttl` counts from its birth).
    age: Duration,
    /// A gRPC response: stored only if its trailers say `grpc-status: 0`.
    grpc: bool,
    /// `Policy::max_variants` of the route.
    max_variants: u32,
    /// Other instances may wait for this entry (the route's cross-instance lock): a leader's
    /// body is read ahead from the start, since they cannot ask for it.
    eager: bool,
}

impl Recorder {
    /// Takes what it indexes the entry under (key, path, route, identity) from `ctx`, whose
    /// request is answered: nothing else reads them after.
    pub(crate) fn new(
        ctx: &mut Ctx,
        flight: Option<crate::engine::coalesce::FlightGuard>,
        ttl: Duration,
        status: StatusCode,
        response_headers: &HeaderMap,
        tags: Vec<String>,
    ) -> Self {
        let headers = storable_headers(response_headers);
        Recorder {
            shared: Arc::clone(&ctx.shared),
            key: std::mem::take(&mut ctx.key),
            ttl,
            status,
            headers,
            tags,
            path: std::mem::take(&mut ctx.path),
            route: ctx.route.take(),
            identity: ctx.identity.take(),
            miss_seq: ctx.miss_seq.unwrap_or(0),
            started: ctx.started,
            declared_len: headers_len(response_headers),
            chunks: Vec::new(),
            len: 0,
            limit: ctx.policy.max_body_size,
            etag: ctx.policy.etag,
            windows: ctx.policy.stale_windows(response_headers),
            flight,
            finished: false,
            age: Duration::ZERO,
            grpc: ctx.grpc,
            max_variants: ctx.policy.max_variants,
            eager: ctx.policy.lock.is_some(),
        }
    }

    /// Shared-cache mode: the response was `age` old on arrival (the entry is dated back by
    /// it, so that hits carry the true `Age`), and was selected by request headers whose
    /// hash is `vary`. An origin's own header of that name is never stored.
    pub(crate) fn shared_cache(mut self, age: Duration, vary: Option<http::HeaderValue>) -> Self {
        self.age = age;
        self.headers.remove(crate::policy::VARY_FINGERPRINT);
        if let Some(vary) = vary {
            self.headers.insert(crate::policy::VARY_FINGERPRINT, vary);
        }
        self
    }

    /// Records a chunk (a reference count, not a copy); false once over the limit.
    fn push(&mut self, data: &Bytes) -> bool {
        self.len = self.len.saturating_add(data.len());
        if self.len > self.limit {
            tracing::debug!(key = %self.key, limit = self.limit, "response body over the limit; not stored");
            return false;
        }
        if !data.is_empty() {
            self.chunks.push(data.clone());
        }
        true
    }

    /// Encodes the entry and writes it in the background, within the bound on pending writes.
    fn finish(mut self, trailers: Option<HeaderMap>) {
        self.finished = true;
        let shared = Arc::clone(&self.shared);
        let counters = &shared.runtime.counters;
        if self.declared_len.is_some_and(|n| n != self.len) {
            Counters::incr(&counters.abandoned);
            tracing::debug!(key = %self.key, "body length differs from Content-Length; not stored");
            return;
        }
        if self.grpc && !crate::policy::grpc::ok_trailers(trailers.as_ref()) {
            tracing::debug!(key = %self.key, "gRPC call did not end with grpc-status 0; not stored");
            return;
        }
        if trailers.as_ref().is_some_and(|t| !storable_map(t)) {
            Counters::incr(&counters.abandoned);
            return;
        }
        if self.started.elapsed() >= MARKER_TTL {
            // Older than any invalidation marker: a race could no longer be detected.
            Counters::incr(&counters.refused);
            return;
        }
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let stored_at_ms =
            u64::try_from(now.saturating_sub(self.age).as_millis()).unwrap_or(u64::MAX);
        let ttl_ms = u64::try_from(self.ttl.as_millis()).unwrap_or(u64::MAX);
        let nonce = crate::entry::nonce(now);
        if self.etag && !self.headers.contains_key(header::ETAG) {
            // Strong, and the same in every process and after restarts: a hash of the body.
            let mut h = blake3::Hasher::new();
            for chunk in &self.chunks {
                h.update(chunk);
            }
            let tag = format!("\"{}\"", &h.finalize().to_hex()[..32]);
            if let Ok(v) = http::HeaderValue::try_from(tag) {
                self.headers.insert(header::ETAG, v);
            }
        }
        let value = Entry::encode(
            self.status,
            &self.headers,
            trailers.as_ref(),
            &self.chunks,
            nonce,
            crate::entry::Timing {
                stored_at_ms,
                ttl_ms,
                swr_ms: u64::try_from(self.windows.0.as_millis()).unwrap_or(u64::MAX),
                sie_ms: u64::try_from(self.windows.1.as_millis()).unwrap_or(u64::MAX),
                delta_ms: u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX),
            },
        );
        // Concurrent misses of this key get the response now, whatever becomes of the write;
        // later ones too, until the write ends.
        let completed = self.flight.take().map(|f| f.complete(value.clone()));
        let bytes = u32::try_from(self.len).unwrap_or(u32::MAX).max(1);
        let permits = Arc::clone(&shared.runtime.writes)
            .try_acquire_owned()
            .and_then(|w| {
                Arc::clone(&shared.runtime.write_bytes)
                    .try_acquire_many_owned(bytes)
                    .map(|b| (w, b))
            });
        let Ok(permit) = permits else {
            Counters::incr(&counters.writes_dropped);
            tracing::debug!(key = %self.key, "too many pending cache writes; write dropped");
            return;
        };
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            Counters::incr(&counters.writes_dropped);
            return;
        };
        let keyer = &shared.settings.keyer;
        let mut indexes = vec![keyer.path_index(&self.path)];
        if let Some(id) = &self.identity {
            indexes.push(keyer.user_index(id));
        }
        if let Some(route) = &self.route {
            indexes.push(keyer.route_index(route));
        }
        indexes.extend(self.tags.iter().map(|t| keyer.tag_index(t)));
        let mut markers: Vec<String> = indexes.iter().map(|i| keyer.marker_of(i)).collect();
        markers.push(keyer.all_marker());
        let write = Write {
            key: std::mem::take(&mut self.key),
            value,
            nonce,
            ttl: self
                .ttl
                .saturating_sub(self.age)
                .saturating_add(self.windows.0.max(self.windows.1)),
            indexes,
            path: Some((
                keyer.paths_key(),
                crate::key::indexed_path(&self.path).into_owned(),
            )),
            markers,
            miss_seq: self.miss_seq,
            seq_key: keyer.seq_key().to_owned(),
            started: self.started,
            variants: Some(crate::store::Variants {
                key: keyer.variants_key(
                    self.route.as_deref(),
                    self.identity.as_deref(),
                    &self.path,
                ),
                max: self.max_variants,
            }),
        };
        let task_shared = Arc::clone(&shared);
        rt.spawn(async move {
            let counters = &task_shared.runtime.counters;
            let key = write.key.clone();
            match task_shared.settings.store.write(write).await {
                Ok(Written::Stored) => {
                    Counters::incr(&counters.stored);
                    tracing::debug!(key = %key, ttl_ms, "response stored");
                }
                Ok(Written::Refused) => {
                    Counters::incr(&counters.refused);
                    tracing::debug!(key = %key, "invalidated while computed; not stored");
                }
                Ok(Written::Paused) => {
                    Counters::incr(&counters.writes_paused);
                    tracing::debug!(key = %key, "redis is nearly full; not stored");
                }
                Ok(Written::TooManyVariants) => {
                    Counters::incr(&counters.variants_refused);
                    tracing::debug!(key = %key, "path has as many variants as the route allows; not stored");
                }
                Err(e) => {
                    Counters::incr(&counters.write_errors);
                    tracing::debug!(key = %key, error = %e.details(), "cache write failed");
                }
            }
            drop(permit);
            drop(completed);
        });
    }
}

/// The declared `Content-Length`, when there is exactly one valid one.
fn headers_len(headers: &HeaderMap) -> Option<usize> {
    let mut values = headers.get_all(header::CONTENT_LENGTH).iter();
    let first = values.next()?;
    if values.next().is_some() {
        return None;
    }
    first.to_str().ok()?.trim().parse().ok()
}

impl Drop for Recorder {
    fn drop(&mut self) {
        if !self.finished {
            Counters::incr(&self.shared.runtime.counters.abandoned);
            tracing::debug!(key = %self.key, "response ended early; not stored");
        }
    }
}

/// The response headers worth storing: without hop-by-hop headers (and those named by
/// `Connection`), `Content-Length` (recomputed on a hit), `Age` and the cache's own headers.
/// `Trailer` is kept: HTTP/1.1 servers send only the trailers it declares.
pub(crate) fn storable_headers(headers: &HeaderMap) -> HeaderMap {
    let mut out = headers.clone();
    let named_by_connection: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for name in named_by_connection {
        out.remove(name);
    }
    for name in [
        header::CONNECTION,
        header::TRANSFER_ENCODING,
        header::TE,
        header::UPGRADE,
        header::PROXY_AUTHENTICATE,
        header::PROXY_AUTHORIZATION,
        header::CONTENT_LENGTH,
        header::AGE,
        CACHE_STATUS,
        TTL_OVERRIDE_HEADER,
    ] {
        out.remove(name);
    }
    for name in &TAG_HEADERS {
        out.remove(name);
    }
    out.remove("keep-alive");
    out.remove("proxy-connection");
    out
}
