//! Cache keys and caller identity.
//!
//! A key looks like `{namespace}:v1:{route}:{scope}:{request}`:
//! - `route` is 16 hex digits of a hash of the route template (`-` when there is none);
//! - `scope` is `s` for shared entries or `u` + 32 hex digits of a keyed hash of the identity;
//! - `request` is 32 hex digits (128 bits) of a BLAKE3 hash over the route, the scope, the exact
//!   path, the normalized query and the keyed request headers, each part length-prefixed, so
//!   that no two distinct requests share a key.
//!
//! Keys are therefore bounded in length whatever the request, contain no `{`/`}` (so Redis
//! Cluster hash tags never group unrelated keys) and never hold a header, cookie or token in
//! clear.

use std::fmt;
use std::sync::Arc;

use http::request::Parts;
use http::{header, HeaderMap, HeaderName};

use crate::entry::FORMAT_VERSION;

/// Where the caller's identity comes from, for per-user routes.
///
/// The identity goes into the cache key hashed (BLAKE3, keyed by the namespace), never in
/// clear. An empty identity counts as none: the request is passed through, not cached.
///
/// ```
/// use tower_redis_cache::Identity;
///
/// #[derive(Clone)]
/// struct UserId(u64);
/// impl std::fmt::Display for UserId {
///     fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
///         self.0.fmt(f)
///     }
/// }
///
/// // Set by an authentication layer that runs before the cache layer.
/// let by_user = Identity::extension::<UserId>();
/// let by_header = Identity::header(http::HeaderName::from_static("x-user-id"));
/// let by_cookie = Identity::cookie("session");
/// let by_fn = Identity::from_fn(|parts| {
///     parts.headers.get("x-tenant")?.to_str().ok().map(str::to_owned)
/// });
/// # let _ = (by_user, by_header, by_cookie, by_fn);
/// ```
///
/// **Identify callers by something they cannot forge.** A header such as `x-user-id` is only
/// safe when a proxy or an earlier layer sets it and strips any value sent by the client;
/// otherwise a client can claim another user's identity and read their cached responses.
#[derive(Clone)]
pub struct Identity(Kind);

type IdentityFn = dyn Fn(&Parts) -> Option<String> + Send + Sync;

#[derive(Clone)]
enum Kind {
    None,
    Header(HeaderName),
    Cookie(Arc<str>),
    Extension(fn(&http::Extensions) -> Option<String>, &'static str),
    Fn(Arc<IdentityFn>),
}

impl Identity {
    /// The value of a request header (all of it, for example `Bearer <token>`).
    pub fn header(name: HeaderName) -> Self {
        Identity(Kind::Header(name))
    }

    /// The value of a cookie of the `Cookie` request header.
    pub fn cookie(name: impl Into<String>) -> Self {
        Identity(Kind::Cookie(name.into().into()))
    }

    /// A request extension of type `T`, inserted by an upstream layer (for example the
    /// authenticated user id), rendered with `Display`.
    pub fn extension<T>() -> Self
    where
        T: fmt::Display + Send + Sync + 'static,
    {
        fn get<T: fmt::Display + Send + Sync + 'static>(ext: &http::Extensions) -> Option<String> {
            ext.get::<T>().map(ToString::to_string)
        }
        Identity(Kind::Extension(get::<T>, std::any::type_name::<T>()))
    }

    /// A closure over the request head.
    pub fn from_fn<F>(f: F) -> Self
    where
        F: Fn(&Parts) -> Option<String> + Send + Sync + 'static,
    {
        Identity(Kind::Fn(Arc::new(f)))
    }

    /// The identity of this request, if any (empty counts as none).
    pub(crate) fn extract(&self, parts: &Parts) -> Option<Vec<u8>> {
        let id = match &self.0 {
            Kind::None => None,
            Kind::Header(name) => parts.headers.get(name).map(|v| v.as_bytes().to_vec()),
            Kind::Cookie(name) => cookie(&parts.headers, name).map(|v| v.as_bytes().to_vec()),
            Kind::Extension(get, _) => get(&parts.extensions).map(String::into_bytes),
            Kind::Fn(f) => f(parts).map(String::into_bytes),
        }?;
        (!id.is_empty()).then_some(id)
    }
}

impl Identity {
    /// No identity: per-user routes are never cached. The layer's default, so that a
    /// per-user route caches nothing until you say where identities come from.
    pub fn none() -> Self {
        Identity(Kind::None)
    }
}

impl Default for Identity {
    /// [`Identity::none`].
    fn default() -> Self {
        Identity::none()
    }
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            Kind::None => f.write_str("Identity::none"),
            Kind::Header(n) => f.debug_tuple("Identity::header").field(n).finish(),
            Kind::Cookie(n) => f.debug_tuple("Identity::cookie").field(n).finish(),
            Kind::Extension(_, t) => write!(f, "Identity::extension::<{t}>"),
            Kind::Fn(_) => f.write_str("Identity::from_fn(..)"),
        }
    }
}

/// Finds a cookie by name in every `Cookie` header.
fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(n, _)| n.trim() == name)
        .map(|(_, v)| v.trim())
}

/// Hashes identities and requests into keys for one namespace.
#[derive(Clone, Debug)]
pub(crate) struct Keyer {
    namespace: Arc<str>,
    /// `{namespace}:v{FORMAT_VERSION}:`, the start of every entry key.
    key_prefix: Arc<str>,
    /// `{namespace}:seq`, the invalidation sequence (see [`seq_key`](Self::seq_key)).
    seq_key: Arc<str>,
    identity_key: [u8; 32],
}

/// Everything a key is derived from.
pub(crate) struct KeyInput<'a> {
    pub(crate) route: Option<&'a str>,
    pub(crate) identity: Option<&'a [u8]>,
    pub(crate) path: &'a str,
    pub(crate) query: Option<&'a str>,
    pub(crate) key_headers: &'a [HeaderName],
    pub(crate) headers: &'a HeaderMap,
    /// The request's authority (see [`authority`]): what a keyed `Host` stands for.
    pub(crate) authority: Option<&'a str>,
}

/// The request's authority, the same whichever protocol carried it: the URI's authority
/// (HTTP/2's `:authority`, or an HTTP/1.1 request in absolute form), else the `Host` header.
///
/// `Err` when the request names two authorities (two `Host` headers, a `Host` that is not
/// text, or a `Host` that differs from the URI's authority): the handler may read either,
/// so no key can hold the one it uses, and such a request must not use the cache.
pub(crate) fn authority<'a>(
    uri: &'a http::Uri,
    headers: &'a HeaderMap,
) -> Result<Option<&'a str>, ConflictingAuthority> {
    let mut hosts = headers.get_all(header::HOST).iter();
    let host = match (hosts.next(), hosts.next()) {
        (None, _) => None,
        (Some(h), None) => Some(h.to_str().map_err(|_| ConflictingAuthority)?),
        (Some(_), Some(_)) => return Err(ConflictingAuthority),
    };
    match (uri.authority().map(http::uri::Authority::as_str), host) {
        (Some(a), Some(h)) if !a.eq_ignore_ascii_case(h) => Err(ConflictingAuthority),
        (Some(a), _) => Ok(Some(a)),
        (None, h) => Ok(h),
    }
}

/// A request that names two different authorities (see [`authority`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ConflictingAuthority;

impl Keyer {
    pub(crate) fn new(namespace: &str) -> Self {
        let identity_key =
            blake3::derive_key("tower-redis-cache identity key v1", namespace.as_bytes());
        Keyer {
            namespace: namespace.into(),
            key_prefix: format!("{namespace}:v{FORMAT_VERSION}:").into(),
            seq_key: format!("{namespace}:seq").into(),
            identity_key,
        }
    }

    pub(crate) fn namespace(&self) -> &str {
        &self.namespace
    }

    /// 32 hex digits of the identity's keyed hash.
    pub(crate) fn identity_hash(&self, id: &[u8]) -> String {
        hex(&blake3::keyed_hash(&self.identity_key, id).as_bytes()[..16])
    }

    fn index(&self, kind: &str, hash: &str) -> String {
        format!("{}:ix:{kind}:{hash}", self.namespace)
    }

    /// The index of every entry of a path (all queries, users and header variants), under
    /// its [`indexed_path`] so that `/users/%34%32` and `/users/42` are one path.
    pub(crate) fn path_index(&self, path: &str) -> String {
        self.index("p", &named_hash("path", indexed_path(path).as_bytes()))
    }

    /// The index of every entry of an identity.
    pub(crate) fn user_index(&self, identity: &[u8]) -> String {
        self.index("u", &self.identity_hash(identity))
    }

    /// The index of every entry of a route template.
    pub(crate) fn route_index(&self, route: &str) -> String {
        self.index("r", &named_hash("route", route.as_bytes()))
    }

    /// The index of every entry of a tag.
    pub(crate) fn tag_index(&self, tag: &str) -> String {
        self.index("t", &named_hash("tag", tag.as_bytes()))
    }

    /// The variants of one path stored for one caller on one route (a sorted set of their
    /// keys scored by expiry, bounded by `Policy::max_variants`). Registered in the entry's
    /// indexes so that invalidating them resets it; an index key, so never counted as an
    /// entry (see [`bookkeeping_prefix`](Self::bookkeeping_prefix)).
    pub(crate) fn variants_key(
        &self,
        route: Option<&str>,
        identity: Option<&[u8]>,
        path: &str,
    ) -> String {
        let scope = identity.map_or_else(|| "s".to_owned(), |id| self.identity_hash(id));
        let mut h = RequestHash::new();
        h.part(route.unwrap_or("").as_bytes());
        h.part(&[u8::from(route.is_some())]);
        h.part(scope.as_bytes());
        h.part(indexed_path(path).as_bytes());
        self.index("v", &hex(&h.finalize().as_bytes()[..16]))
    }

    /// The start of every index key: members of indexes that start with it are the
    /// store's bookkeeping (variant sets), removed with the entries but not counted.
    pub(crate) fn bookkeeping_prefix(&self) -> String {
        format!("{}:ix:", self.namespace)
    }

    /// The invalidation marker of an index: the sequence number of its last invalidation.
    pub(crate) fn marker_of(&self, index: &str) -> String {
        index.replacen(":ix:", ":inv:", 1)
    }

    /// The marker set by invalidations that touch the whole namespace (patterns, clear).
    pub(crate) fn all_marker(&self) -> String {
        format!("{}:inv:all", self.namespace)
    }

    /// The namespace's invalidation sequence counter.
    pub(crate) fn seq_key(&self) -> &str {
        &self.seq_key
    }

    /// [`seq_key`](Self::seq_key), shared (for lookups that read it alongside the entry).
    pub(crate) fn seq_key_shared(&self) -> &Arc<str> {
        &self.seq_key
    }

    /// The sorted set of cached paths (scored by expiry), for glob patterns.
    pub(crate) fn paths_key(&self) -> String {
        format!("{}:paths", self.namespace)
    }

    /// SCAN patterns for `clear`, in the order it must delete them: indexes first, then
    /// entries (of every format version) and values. An entry written during the scan then
    /// registers in a fresh index, and stays reachable by later invalidations.
    pub(crate) fn scan_patterns(&self) -> [String; 4] {
        [
            format!("{}:ix:*", self.namespace),
            format!("{}:v[0-9]*:*", self.namespace),
            format!("{}:val:*", self.namespace),
            // Values waiting for their writer's check (`store::pending_key`).
            format!("{{{}:*", self.namespace),
        ]
    }

    pub(crate) fn key(&self, input: &KeyInput<'_>) -> String {
        self.key_with_body(input, None)
    }

    /// The key of a request whose body is part of it (an opted-in gRPC call's message).
    /// Without a body, the key is the one [`key`](Self::key) always gave.
    pub(crate) fn key_with_body(&self, input: &KeyInput<'_>, body: Option<&[u8]>) -> String {
        // Built without intermediate strings (this runs on every request); the bytes are
        // those of the first release (see the `key_format_is_pinned` test).
        let mut scope = [0u8; 33];
        let scope: &[u8] = match input.identity {
            Some(id) => {
                let hash = blake3::keyed_hash(&self.identity_key, id);
                if let Some((first, rest)) = scope.split_first_mut() {
                    *first = b'u';
                    hex_into(&hash.as_bytes()[..16], rest);
                }
                &scope
            }
            None => b"s",
        };

        let mut h = RequestHash::new();
        let mut part = |bytes: &[u8]| h.part(bytes);
        part(input.route.unwrap_or("").as_bytes());
        part(&[u8::from(input.route.is_some())]);
        part(scope);
        part(input.path.as_bytes());
        let query = input.query.unwrap_or("");
        let pairs = query.split('&').filter(|p| !p.is_empty());
        let count = pairs.clone().count();
        part(&(count as u64).to_le_bytes());
        if count > 1 {
            for pair in normalized_query(input.query) {
                part(pair.as_bytes());
            }
        } else {
            // Nothing to sort.
            for pair in pairs {
                part(pair.as_bytes());
            }
        }
        part(&(input.key_headers.len() as u64).to_le_bytes());
        for name in input.key_headers {
            part(name.as_str().as_bytes());
            if name == header::HOST {
                // The authority, however the request carried it (HTTP/2 has no `Host`),
                // in lower case: the bytes a single `Host` header gave before.
                match input.authority {
                    Some(a) => {
                        part(&1u64.to_le_bytes());
                        if a.bytes().any(|b| b.is_ascii_uppercase()) {
                            part(a.to_ascii_lowercase().as_bytes());
                        } else {
                            part(a.as_bytes());
                        }
                    }
                    None => part(&0u64.to_le_bytes()),
                }
                continue;
            }
            let values = input.headers.get_all(name);
            part(&(values.iter().count() as u64).to_le_bytes());
            for v in values {
                part(v.as_bytes());
            }
        }
        if let Some(body) = body {
            part(b"body");
            part(body);
        }
        let request = h.finalize();

        let mut key = String::with_capacity(self.key_prefix.len() + 16 + 1 + scope.len() + 1 + 32);
        key.push_str(&self.key_prefix);
        match input.route {
            Some(route) => push_hex(&mut key, &blake3::hash(route.as_bytes()).as_bytes()[..8]),
            None => key.push('-'),
        }
        key.push(':');
        key.extend(scope.iter().map(|&b| char::from(b)));
        key.push(':');
        push_hex(&mut key, &request.as_bytes()[..16]);
        key
    }
}

/// The request hash's input, fed to BLAKE3 in blocks rather than in the many small,
/// length-prefixed parts it is made of (the same bytes, so the same hash).
struct RequestHash {
    hasher: blake3::Hasher,
    buf: [u8; 256],
    len: usize,
}

impl RequestHash {
    fn new() -> Self {
        RequestHash {
            hasher: blake3::Hasher::new(),
            buf: [0; 256],
            len: 0,
        }
    }

    /// A part: its length (u64, little-endian), then its bytes.
    fn part(&mut self, bytes: &[u8]) {
        self.bytes(&(bytes.len() as u64).to_le_bytes());
        self.bytes(bytes);
    }

    fn bytes(&mut self, bytes: &[u8]) {
        let free = self.buf.get_mut(self.len..).unwrap_or_default();
        if let Some(dst) = free.get_mut(..bytes.len()) {
            dst.copy_from_slice(bytes);
            self.len += bytes.len();
            return;
        }
        self.flush();
        if let Some(dst) = self.buf.get_mut(..bytes.len()) {
            dst.copy_from_slice(bytes);
            self.len = bytes.len();
        } else {
            self.hasher.update(bytes);
        }
    }

    fn flush(&mut self) {
        self.hasher
            .update(self.buf.get(..self.len).unwrap_or_default());
        self.len = 0;
    }

    fn finalize(mut self) -> blake3::Hash {
        self.flush();
        self.hasher.finalize()
    }
}

/// The query's parameters, sorted by their decoded name; parameters of the same name keep
/// their order, since `?tag=a&tag=b` and `?tag=b&tag=a` can mean different things (and so
/// can `?a=1&%61=2` and `?%61=2&a=1`). Empty pieces (`?a=1&&b=2`, a trailing `&`) are
/// dropped. Pairs are kept exactly as sent.
pub(crate) fn normalized_query(query: Option<&str>) -> Vec<&str> {
    let mut pairs: Vec<(std::borrow::Cow<'_, [u8]>, &str)> = query
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let name = p.split('=').next().unwrap_or("");
            let name = if name.contains(['%', '+']) {
                std::borrow::Cow::Owned(decoded_name(name))
            } else {
                std::borrow::Cow::Borrowed(name.as_bytes())
            };
            (name, p)
        })
        .collect();
    pairs.sort_by(|a, b| a.0.cmp(&b.0));
    pairs.into_iter().map(|(_, p)| p).collect()
}

/// A path as indexes and patterns see it: percent-escapes of unreserved characters
/// (`A-Z a-z 0-9 - . _ ~`, RFC 3986 §6.2.2.2) decoded, others kept with upper-case hex. The
/// router gives `/users/%34%32` and `/users/42` to the same handler, so invalidating one
/// must reach the other. (Keys keep the exact path.)
pub(crate) fn indexed_path(path: &str) -> std::borrow::Cow<'_, str> {
    if !path.contains('%') {
        return std::borrow::Cow::Borrowed(path);
    }
    let bytes = path.as_bytes();
    let mut out = String::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| char::from(b).to_digit(16);
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                let c = char::from((h * 16 + l) as u8);
                if c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_' | '~') {
                    out.push(c);
                } else {
                    out.push('%');
                    out.push(bytes[i + 1].to_ascii_uppercase().into());
                    out.push(bytes[i + 2].to_ascii_uppercase().into());
                }
                i += 3;
                continue;
            }
        }
        // Non-ASCII bytes stay as they are: `path` is valid UTF-8 and we copy whole chars.
        let ch_len = path[i..].chars().next().map_or(1, char::len_utf8);
        out.push_str(&path[i..i + ch_len]);
        i += ch_len;
    }
    std::borrow::Cow::Owned(out)
}

/// A form-urlencoded name, decoded (`+` is a space; invalid escapes stay as they are).
fn decoded_name(name: &str) -> Vec<u8> {
    let bytes = name.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| char::from(b).to_digit(16);
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push((h * 16 + l) as u8);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    out
}

/// 32 hex digits of a domain-separated BLAKE3 hash.
fn named_hash(domain: &str, data: &[u8]) -> String {
    let mut h = blake3::Hasher::new();
    h.update(&(domain.len() as u64).to_le_bytes());
    h.update(domain.as_bytes());
    h.update(data);
    hex(&h.finalize().as_bytes()[..16])
}

fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    push_hex(&mut s, bytes);
    s
}

const HEX_DIGITS: &[u8; 16] = b"0123456789abcdef";

fn hex_digit(nibble: u8) -> u8 {
    HEX_DIGITS
        .get(usize::from(nibble & 0xf))
        .copied()
        .unwrap_or(b'0')
}

fn push_hex(s: &mut String, bytes: &[u8]) {
    for b in bytes {
        s.push(char::from(hex_digit(b >> 4)));
        s.push(char::from(hex_digit(*b)));
    }
}

/// Lower-case hex of `bytes` into `out` (as much as fits).
fn hex_into(bytes: &[u8], out: &mut [u8]) {
    for (b, pair) in bytes.iter().zip(out.chunks_exact_mut(2)) {
        if let [hi, lo] = pair {
            *hi = hex_digit(b >> 4);
            *lo = hex_digit(*b);
        }
    }
}

/// Checks a namespace: 1 to 64 characters of `A-Z a-z 0-9 _ - .`.
pub(crate) fn valid_namespace(ns: &str) -> bool {
    !ns.is_empty()
        && ns.len() <= 64
        && ns
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn key(route: Option<&str>, id: Option<&[u8]>, path: &str, query: Option<&str>) -> String {
        Keyer::new("ns").key(&KeyInput {
            route,
            identity: id,
            path,
            query,
            key_headers: &[],
            headers: &HeaderMap::new(),
            authority: None,
        })
    }

    #[test]
    fn query_order_is_one_entry() {
        assert_eq!(
            key(None, None, "/p", Some("a=1&b=2")),
            key(None, None, "/p", Some("b=2&a=1"))
        );
        assert_eq!(
            key(None, None, "/p", Some("a=1&&b=2&")),
            key(None, None, "/p", Some("b=2&a=1"))
        );
        assert_eq!(key(None, None, "/p", Some("")), key(None, None, "/p", None));
        // Repeated parameters keep their relative order, however their names are spelled.
        assert_ne!(
            key(None, None, "/p", Some("t=a&t=b")),
            key(None, None, "/p", Some("t=b&t=a"))
        );
        assert_ne!(
            key(None, None, "/p", Some("a=1&%61=2")),
            key(None, None, "/p", Some("%61=2&a=1"))
        );
        assert_eq!(decoded_name("%61+b%2"), b"a b%2");
        assert_eq!(decoded_name("%"), b"%");
        assert_eq!(decoded_name("%6"), b"%6");
        assert_eq!(decoded_name("x%zz"), b"x%zz");
    }

    /// Keys are stored: a change of their bytes silently empties every cache on upgrade and
    /// splits a fleet during a rolling deploy. These were computed by the first release.
    #[test]
    fn key_format_is_pinned() {
        let k = Keyer::new("ns");
        let mut headers = HeaderMap::new();
        headers.append(header::ACCEPT_LANGUAGE, HeaderValue::from_static("en"));
        headers.append(header::ACCEPT_LANGUAGE, HeaderValue::from_static("de"));
        let names = [header::ACCEPT_LANGUAGE, header::ACCEPT];
        let cases = [
            k.key(&KeyInput {
                route: None,
                identity: None,
                path: "/",
                query: None,
                key_headers: &[],
                headers: &HeaderMap::new(),
                authority: None,
            }),
            k.key(&KeyInput {
                route: Some("/item/{id}"),
                identity: None,
                path: "/item/7",
                query: Some("size=1024"),
                key_headers: &[],
                headers: &HeaderMap::new(),
                authority: None,
            }),
            k.key(&KeyInput {
                route: Some("/user/{id}"),
                identity: Some(b"42"),
                path: "/user/%34%32",
                query: Some("b=2&a=1&&%61=3&c"),
                key_headers: &names,
                headers: &headers,
                authority: None,
            }),
        ];
        assert_eq!(
            cases,
            [
                "ns:v1:-:s:7f21c9e851cf03c772e5b84a14f928f8",
                "ns:v1:b9ad3b081662f066:s:966ffe7b704d351d6022b65262ca6ed7",
                "ns:v1:ef3a7753f2566f29:u25413317569794e9d64b7e8f00ff07b3:\
                 126ea3023fb44f43bc4be12e14370b5b",
            ]
        );
    }

    #[test]
    fn distinct_requests_get_distinct_keys() {
        let cases = [
            key(None, None, "/a", None),
            key(None, None, "/a/", None),
            key(None, None, "/a", Some("x=1")),
            key(None, None, "/a", Some("x=1&y")),
            key(None, None, "/a", Some("x=1y")),
            key(None, None, "/a?x=1", None),
            key(None, None, "/a", Some("x%3D1")),
            key(Some("/a"), None, "/a", None),
            key(Some(""), None, "/a", None),
            key(None, Some(b"1"), "/a", None),
            key(None, Some(b"2"), "/a", None),
            key(Some("/a"), Some(b"1"), "/a", None),
        ];
        let set: std::collections::HashSet<_> = cases.iter().collect();
        assert_eq!(set.len(), cases.len(), "{cases:#?}");
    }

    #[test]
    fn keyed_headers_split_entries() {
        let k = Keyer::new("ns");
        let names = [header::ACCEPT_LANGUAGE];
        let mut en = HeaderMap::new();
        en.insert(header::ACCEPT_LANGUAGE, HeaderValue::from_static("en"));
        let mut de = HeaderMap::new();
        de.insert(header::ACCEPT_LANGUAGE, HeaderValue::from_static("de"));
        let input = |headers| KeyInput {
            route: None,
            identity: None,
            path: "/",
            query: None,
            key_headers: &names,
            headers,
            authority: None,
        };
        let none = HeaderMap::new();
        let keys = [k.key(&input(&en)), k.key(&input(&de)), k.key(&input(&none))];
        assert_ne!(keys[0], keys[1]);
        assert_ne!(keys[0], keys[2]);
        assert_ne!(keys[1], keys[2]);
    }

    #[test]
    fn the_authority_is_one_whatever_the_protocol() {
        let h1: http::Uri = "/tenant".parse().unwrap();
        let h2: http::Uri = "http://shop.example/tenant".parse().unwrap();
        let host = |v: &'static str| {
            let mut h = HeaderMap::new();
            h.insert(header::HOST, HeaderValue::from_static(v));
            h
        };
        let none = HeaderMap::new();
        assert_eq!(
            authority(&h1, &host("shop.example")),
            Ok(Some("shop.example"))
        );
        assert_eq!(authority(&h2, &none), Ok(Some("shop.example")));
        assert_eq!(
            authority(&h2, &host("SHOP.example")),
            Ok(Some("shop.example"))
        );
        assert_eq!(authority(&h1, &none), Ok(None));
        // Two authorities: the handler may read either one.
        assert_eq!(
            authority(&h2, &host("evil.example")),
            Err(ConflictingAuthority)
        );
        let mut two = host("shop.example");
        two.append(header::HOST, HeaderValue::from_static("evil.example"));
        assert_eq!(authority(&h1, &two), Err(ConflictingAuthority));

        // A keyed Host keys the authority: one entry for HTTP/1.1 and HTTP/2, in any case.
        let k = Keyer::new("ns");
        let names = [header::HOST];
        let key = |authority, headers: &HeaderMap| {
            k.key(&KeyInput {
                route: None,
                identity: None,
                path: "/tenant",
                query: None,
                key_headers: &names,
                headers,
                authority,
            })
        };
        let shop = key(Some("shop.example"), &none);
        assert_eq!(shop, key(Some("Shop.Example"), &none));
        assert_ne!(shop, key(Some("evil.example"), &none));
        assert_ne!(shop, key(None, &none));
    }

    #[test]
    fn keys_are_bounded_and_hide_identity() {
        let long = "x".repeat(100_000);
        let token = b"Bearer super-secret-token";
        let k = key(Some(&long), Some(token), &long, Some(&long));
        assert!(k.len() < 64 + 100, "{}", k.len());
        assert!(!k.contains("secret"));
        assert!(!k.contains('{') && !k.contains('}'));
        // Stable across processes: a fixed input gives a fixed key.
        assert_eq!(key(None, None, "/", None), key(None, None, "/", None));
    }

    #[test]
    fn namespace_separates_identity_hashes() {
        let input = KeyInput {
            route: None,
            identity: Some(b"42"),
            path: "/",
            query: None,
            key_headers: &[],
            headers: &HeaderMap::new(),
            authority: None,
        };
        let a = Keyer::new("a").key(&input);
        let b = Keyer::new("b").key(&input);
        assert_ne!(a.split(':').nth(3), b.split(':').nth(3));
    }

    #[test]
    fn identity_sources() {
        let req = http::Request::builder()
            .header("x-user", "7")
            .header("cookie", "a=1; session=abc ; z=2")
            .extension(42u32)
            .body(())
            .unwrap();
        let (parts, _) = req.into_parts();
        assert_eq!(
            Identity::header(HeaderName::from_static("x-user")).extract(&parts),
            Some(b"7".to_vec())
        );
        assert_eq!(
            Identity::cookie("session").extract(&parts),
            Some(b"abc".to_vec())
        );
        assert_eq!(Identity::cookie("sess").extract(&parts), None);
        assert_eq!(
            Identity::extension::<u32>().extract(&parts),
            Some(b"42".to_vec())
        );
        assert_eq!(Identity::extension::<u64>().extract(&parts), None);
        assert_eq!(
            Identity::from_fn(|_| Some(String::new())).extract(&parts),
            None
        );
        assert_eq!(Identity::default().extract(&parts), None);
        assert_eq!(Identity::none().extract(&parts), None);
    }

    #[test]
    fn indexed_paths_decode_unreserved_escapes_only() {
        assert_eq!(indexed_path("/users/42"), "/users/42");
        assert_eq!(indexed_path("/users/%34%32"), "/users/42");
        assert_eq!(indexed_path("/a%2fb%2Fc"), "/a%2Fb%2Fc");
        assert_eq!(indexed_path("/%7e%2D%5f"), "/~-_");
        assert_eq!(indexed_path("/x%"), "/x%");
        assert_eq!(indexed_path("/x%4"), "/x%4");
        assert_eq!(indexed_path("/x%zz/é"), "/x%zz/é");
        let k = Keyer::new("ns");
        assert_eq!(k.path_index("/users/%34%32"), k.path_index("/users/42"));
        assert_ne!(k.path_index("/a%2Fb"), k.path_index("/a/b"));
    }

    #[test]
    fn namespaces() {
        assert!(valid_namespace("backend"));
        assert!(valid_namespace("a.b-c_1"));
        for bad in ["", "a b", "a:b", "a{b}", "a*", &"x".repeat(65)] {
            assert!(!valid_namespace(bad), "{bad}");
        }
    }
}

#[cfg(test)]
mod fuzz {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn keys_are_bounded_and_distinct(
            p1 in "/[ -~]{0,300}", q1 in proptest::option::of("[ -~]{0,300}"),
            p2 in "/[ -~]{0,300}", q2 in proptest::option::of("[ -~]{0,300}"),
        ) {
            let k = Keyer::new("ns");
            let key = |path: &str, query: Option<&str>| k.key(&KeyInput {
                route: None,
                identity: None,
                path,
                query,
                key_headers: &[],
                headers: &HeaderMap::new(),
                authority: None,
            });
            let (a, b) = (key(&p1, q1.as_deref()), key(&p2, q2.as_deref()));
            prop_assert!(a.len() <= 80 && b.len() <= 80);
            let norm = |q: &Option<String>| normalized_query(q.as_deref()).join("&");
            if p1 != p2 || norm(&q1) != norm(&q2) {
                prop_assert_ne!(a, b);
            } else {
                prop_assert_eq!(a, b);
            }
        }
    }
}
