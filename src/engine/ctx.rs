//! `Ctx`: what the engine knows of one cacheable request from its lookup to its write, and
//! `Deferred`: a request held while a front end reads its body.

use std::any::Any;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::HeaderValue;

use crate::engine::coalesce::FlightGuard;
use crate::engine::Engine;
use crate::entry::Entry;
use crate::outcome::CacheStatus;
use crate::policy::{Policy, SharedRequest};

pub(crate) struct Ctx {
    pub(crate) shared: Arc<Engine>,
    pub(crate) key: String,
    pub(crate) policy: Arc<Policy>,
    pub(crate) head: bool,
    pub(crate) status: CacheStatus,
    /// What the entry is indexed under.
    pub(crate) path: String,
    pub(crate) route: Option<String>,
    pub(crate) identity: Option<Vec<u8>>,
    pub(crate) miss_seq: Option<u64>,
    pub(crate) started: Instant,
    /// The request's `If-None-Match` and `If-Modified-Since`, for 304s on hits.
    pub(crate) conditional: Option<Box<(Option<HeaderValue>, Option<HeaderValue>)>>,
    /// Set when this request leads a coalesced miss.
    pub(crate) flight: Option<FlightGuard>,
    /// A stale entry to answer with if the inner service fails (stale-if-error).
    pub(crate) stale: Option<Entry>,
    /// This response replaces an entry that may still be served (a refresh, or a miss that
    /// found a stale entry): if the handler refuses it (see `refusal`), the entry is removed.
    pub(crate) replaces: bool,
    /// For routes with a near-cache: its epoch before the lookup, and the route's bound.
    pub(crate) near: Option<(u64, Duration)>,
    /// Shared-cache mode: what decides reuse and storage for this request.
    pub(crate) shared_request: Option<Arc<SharedRequest>>,
    /// An opted-in gRPC call: stored only if it ends with `grpc-status: 0`.
    pub(crate) grpc: bool,
}

impl Ctx {
    /// The context of a GET of `key` starting now, before its lookup: a miss so far, with
    /// nothing indexed, coalesced, conditional or near; callers set what applies.
    pub(crate) fn new(
        shared: Arc<Engine>,
        key: String,
        policy: Arc<Policy>,
        identity: Option<Vec<u8>>,
    ) -> Self {
        Ctx {
            shared,
            key,
            policy,
            head: false,
            status: CacheStatus::Miss,
            path: String::new(),
            route: None,
            identity,
            miss_seq: None,
            started: Instant::now(),
            conditional: None,
            flight: None,
            stale: None,
            replaces: false,
            near: None,
            shared_request: None,
            grpc: false,
        }
    }
}

/// A request held while its front end reads its body (an opted-in gRPC call), handed back
/// to that front end to decide how it is answered.
pub(crate) struct Deferred {
    pub(crate) parts: http::request::Parts,
    /// The whole request body when it is exactly one message within the bound.
    pub(crate) message: Option<Bytes>,
    /// The rebuilt request body, of the inner service's request body type.
    pub(crate) body: Box<dyn Any + Send>,
    pub(crate) shared: Arc<Engine>,
    pub(crate) policy: Arc<Policy>,
    pub(crate) method: String,
    pub(crate) identity: Option<Vec<u8>>,
}
