//! The stored envelope: a versioned binary encoding of a response.
//!
//! Layout (all integers big-endian):
//!
//! ```text
//! magic "TRC" | version u8 | state u8 | nonce [u8; 8] | stored_at_ms u64 | ttl_ms u64
//! | swr_ms u64 | sie_ms u64 | delta_ms u64 | status u16
//! | n_headers u16 | (name_len u16, name, value_len u32, value)*
//! | has_trailers u8 | [n_trailers u16 | (name_len u16, name, value_len u32, value)*]
//! | body_len u64 | body
//! ```
//!
//! Decoding checks every length against the remaining input and requires the input to end
//! exactly after the body, so a truncated, extended or foreign value is rejected, never
//! misread. On a hit the body is a slice of the Redis reply (no copy).
//!
//! `state` is [`PENDING`] when written (beside its key, see `store::pending_key`) and flipped
//! to [`CONFIRMED`] (one byte, at [`STATE_OFFSET`]) as it is moved to its key, once the
//! writer has checked that no invalidation ran since its miss began. A pending entry is never
//! served. The nonce identifies the write, so that a writer confirms or withdraws only its
//! own value.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};

const MAGIC: &[u8; 3] = b"TRC";
/// The envelope format version; bump on any layout change.
pub(crate) const FORMAT_VERSION: u8 = 1;
/// Where the state byte is (the Lua scripts in `store.rs` use it; a test checks them).
#[cfg_attr(not(test), allow(dead_code))]
pub(crate) const STATE_OFFSET: usize = 4;
/// Where the write's nonce is (likewise).
#[cfg_attr(not(test), allow(dead_code))]
pub(crate) const NONCE_OFFSET: usize = 5;
/// Written, not yet confirmed: never served.
pub(crate) const PENDING: u8 = 0;
/// Confirmed: may be served.
pub(crate) const CONFIRMED: u8 = 1;

/// A response as stored in Redis.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Entry {
    pub(crate) status: StatusCode,
    pub(crate) headers: HeaderMap,
    pub(crate) trailers: Option<HeaderMap>,
    pub(crate) body: Bytes,
    /// Unix time in milliseconds at which the entry was stored.
    pub(crate) stored_at_ms: u64,
    /// The time to live the entry was stored with, in milliseconds.
    pub(crate) ttl_ms: u64,
    /// How long past `ttl_ms` it may be served while refreshed (stale-while-revalidate).
    pub(crate) swr_ms: u64,
    /// How long past `ttl_ms` it may answer when the inner service fails (stale-if-error).
    pub(crate) sie_ms: u64,
    /// How long the response took to compute, in milliseconds (for early refresh).
    pub(crate) delta_ms: u64,
    /// Whether the writer confirmed it (see the module docs).
    pub(crate) confirmed: bool,
}

/// When an entry was stored and how long it lives, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Timing {
    pub(crate) stored_at_ms: u64,
    pub(crate) ttl_ms: u64,
    pub(crate) swr_ms: u64,
    pub(crate) sie_ms: u64,
    /// How long the response took to compute (for early refresh).
    pub(crate) delta_ms: u64,
}

/// Why a stored value could not be decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DecodeError {
    /// Not one of our envelopes (wrong magic).
    Foreign,
    /// An envelope of another format version.
    Version(u8),
    /// Truncated, over-long or otherwise malformed.
    Malformed,
}

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DecodeError::Foreign => f.write_str("not a tower-redis-cache entry"),
            DecodeError::Version(v) => write!(f, "unsupported entry format version {v}"),
            DecodeError::Malformed => f.write_str("malformed entry"),
        }
    }
}

impl Entry {
    /// Encodes a pending entry. `body` is given as chunks so that a recorded body is copied
    /// once.
    pub(crate) fn encode(
        status: StatusCode,
        headers: &HeaderMap,
        trailers: Option<&HeaderMap>,
        body: &[Bytes],
        nonce: [u8; 8],
        timing: Timing,
    ) -> Bytes {
        let Timing {
            stored_at_ms,
            ttl_ms,
            swr_ms,
            sie_ms,
            delta_ms,
        } = timing;
        let body_len: usize = body.iter().map(Bytes::len).sum();
        let map_len = |m: &HeaderMap| {
            m.iter()
                .map(|(n, v)| 6 + n.as_str().len() + v.len())
                .sum::<usize>()
                + 2
        };
        let cap = 3
            + 1
            + 1
            + 8
            + 8
            + 8
            + 24
            + 2
            + map_len(headers)
            + 1
            + trailers.map(map_len).unwrap_or(0)
            + 8
            + body_len;
        let mut out = BytesMut::with_capacity(cap);
        out.put_slice(MAGIC);
        out.put_u8(FORMAT_VERSION);
        out.put_u8(PENDING);
        out.put_slice(&nonce);
        out.put_u64(stored_at_ms);
        out.put_u64(ttl_ms);
        out.put_u64(swr_ms);
        out.put_u64(sie_ms);
        out.put_u64(delta_ms);
        out.put_u16(status.as_u16());
        put_map(&mut out, headers);
        match trailers {
            Some(t) => {
                out.put_u8(1);
                put_map(&mut out, t);
            }
            None => out.put_u8(0),
        }
        out.put_u64(body_len as u64);
        for chunk in body {
            out.put_slice(chunk);
        }
        out.freeze()
    }

    /// Decodes an envelope; the body shares `raw`'s allocation.
    pub(crate) fn decode(raw: &Bytes) -> Result<Entry, DecodeError> {
        let mut cur = Cursor {
            buf: raw.clone(),
            err: DecodeError::Malformed,
        };
        if raw.len() < 4 || &raw[..3] != MAGIC {
            return Err(DecodeError::Foreign);
        }
        cur.buf.advance(3);
        let version = cur.u8()?;
        if version != FORMAT_VERSION {
            return Err(DecodeError::Version(version));
        }
        let confirmed = match cur.u8()? {
            PENDING => false,
            CONFIRMED => true,
            _ => return Err(DecodeError::Malformed),
        };
        let _nonce = cur.u64()?;
        let stored_at_ms = cur.u64()?;
        let ttl_ms = cur.u64()?;
        let swr_ms = cur.u64()?;
        let sie_ms = cur.u64()?;
        let delta_ms = cur.u64()?;
        let status = StatusCode::from_u16(cur.u16()?).map_err(|_| DecodeError::Malformed)?;
        let headers = cur.map(HIT_HEADERS)?;
        let trailers = match cur.u8()? {
            0 => None,
            1 => Some(cur.map(0)?),
            _ => return Err(DecodeError::Malformed),
        };
        let body_len = usize::try_from(cur.u64()?).map_err(|_| DecodeError::Malformed)?;
        let body = cur.take(body_len)?;
        if cur.buf.has_remaining() {
            return Err(DecodeError::Malformed);
        }
        Ok(Entry {
            status,
            headers,
            trailers,
            body,
            stored_at_ms,
            ttl_ms,
            swr_ms,
            sie_ms,
            delta_ms,
            confirmed,
        })
    }
}

/// The headers a hit adds to the stored ones (`Content-Length`, `Age`, `Cache-Status`,
/// `X-Cache`): reserved when decoding, so that a hit does not grow the map twice.
const HIT_HEADERS: usize = 4;

/// The most header (or trailer) values an entry keeps; a response with more is not stored.
pub(crate) const MAX_HEADER_VALUES: usize = 1000;

/// Whether a header map fits in an entry.
pub(crate) fn storable_map(map: &HeaderMap) -> bool {
    map.len() <= MAX_HEADER_VALUES && map.iter().all(|(_, v)| v.len() <= u32::MAX as usize)
}

fn put_map(out: &mut BytesMut, map: &HeaderMap) {
    // Callers check `storable_map` first; the count is clamped anyway so the length prefix
    // never lies.
    let n = map.len().min(MAX_HEADER_VALUES);
    out.put_u16(n as u16);
    for (name, value) in map.iter().take(n) {
        out.put_u16(name.as_str().len() as u16);
        out.put_slice(name.as_str().as_bytes());
        out.put_u32(value.len() as u32);
        out.put_slice(value.as_bytes());
    }
}

struct Cursor {
    buf: Bytes,
    err: DecodeError,
}

impl Cursor {
    fn need(&self, n: usize) -> Result<(), DecodeError> {
        if self.buf.remaining() < n {
            Err(self.err)
        } else {
            Ok(())
        }
    }
    fn u8(&mut self) -> Result<u8, DecodeError> {
        self.need(1)?;
        Ok(self.buf.get_u8())
    }
    fn u16(&mut self) -> Result<u16, DecodeError> {
        self.need(2)?;
        Ok(self.buf.get_u16())
    }
    fn u32(&mut self) -> Result<u32, DecodeError> {
        self.need(4)?;
        Ok(self.buf.get_u32())
    }
    fn u64(&mut self) -> Result<u64, DecodeError> {
        self.need(8)?;
        Ok(self.buf.get_u64())
    }
    fn take(&mut self, n: usize) -> Result<Bytes, DecodeError> {
        self.need(n)?;
        Ok(self.buf.split_to(n))
    }
    /// A header map, with room for `extra` more headers.
    fn map(&mut self, extra: usize) -> Result<HeaderMap, DecodeError> {
        let n = usize::from(self.u16()?);
        if n > MAX_HEADER_VALUES {
            return Err(DecodeError::Malformed);
        }
        // Reserve little: the count comes from Redis, and `HeaderMap` panics past its limits.
        let mut map =
            HeaderMap::try_with_capacity(n.min(64) + extra).map_err(|_| DecodeError::Malformed)?;
        for _ in 0..n {
            let name_len = usize::from(self.u16()?);
            let name = self.take(name_len)?;
            let name = HeaderName::from_bytes(&name).map_err(|_| DecodeError::Malformed)?;
            let value_len = self.u32()? as usize;
            let value = self.take(value_len)?;
            let value =
                HeaderValue::from_maybe_shared(value).map_err(|_| DecodeError::Malformed)?;
            map.try_append(name, value)
                .map_err(|_| DecodeError::Malformed)?;
        }
        Ok(map)
    }
}

/// A response made before the first poll (a near hit): its head and its body.
pub(crate) struct Ready {
    pub(crate) parts: http::response::Parts,
    pub(crate) body: Option<bytes::Bytes>,
    pub(crate) trailers: Option<http::HeaderMap>,
}

/// A nonce for a write starting now.
pub(crate) fn nonce_now() -> [u8; 8] {
    nonce(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default(),
    )
}

/// A value unique to one write: time, process and a counter.
pub(crate) fn nonce(now: std::time::Duration) -> [u8; 8] {
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut h = blake3::Hasher::new();
    h.update(&now.as_nanos().to_le_bytes());
    h.update(&std::process::id().to_le_bytes());
    h.update(&n.to_le_bytes());
    let mut out = [0u8; 8];
    out.copy_from_slice(&h.finalize().as_bytes()[..8]);
    out
}

#[cfg(test)]
fn timing(e: &Entry) -> Timing {
    Timing {
        stored_at_ms: e.stored_at_ms,
        ttl_ms: e.ttl_ms,
        swr_ms: e.swr_ms,
        sie_ms: e.sie_ms,
        delta_ms: e.delta_ms,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Entry {
        let mut headers = HeaderMap::new();
        headers.insert("content-type", HeaderValue::from_static("application/json"));
        headers.append("x-multi", HeaderValue::from_static("a"));
        headers.append("x-multi", HeaderValue::from_static("b"));
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", HeaderValue::from_static("0"));
        Entry {
            status: StatusCode::OK,
            headers,
            trailers: Some(trailers),
            body: Bytes::from_static(b"{\"hello\":\"world\"}"),
            stored_at_ms: 1_700_000_000_123,
            ttl_ms: 60_000,
            swr_ms: 5_000,
            sie_ms: 86_400_000,
            delta_ms: 42,
            confirmed: false,
        }
    }

    fn encode(e: &Entry) -> Bytes {
        // Split the body in two chunks to exercise chunked encoding.
        let (a, b) = e.body.split_at(3);
        Entry::encode(
            e.status,
            &e.headers,
            e.trailers.as_ref(),
            &[Bytes::copy_from_slice(a), Bytes::copy_from_slice(b)],
            *b"12345678",
            timing(e),
        )
    }

    #[test]
    fn round_trip_keeps_repeated_headers_trailers_and_body() {
        let e = sample();
        let raw = encode(&e);
        let d = Entry::decode(&raw).unwrap();
        assert_eq!(d, e);
        let multi: Vec<_> = d.headers.get_all("x-multi").iter().collect();
        assert_eq!(multi, ["a", "b"]);
    }

    #[test]
    fn round_trip_without_trailers_and_empty_body() {
        let e = Entry {
            trailers: None,
            body: Bytes::new(),
            ..sample()
        };
        let raw = Entry::encode(e.status, &e.headers, None, &[], [0; 8], timing(&e));
        assert_eq!(Entry::decode(&raw).unwrap(), e);
    }

    #[test]
    fn every_truncation_is_rejected() {
        let raw = encode(&sample());
        for cut in 0..raw.len() {
            assert!(Entry::decode(&raw.slice(..cut)).is_err(), "cut at {cut}");
        }
    }

    #[test]
    fn trailing_garbage_is_rejected() {
        let mut raw = BytesMut::from(&encode(&sample())[..]);
        raw.put_u8(0);
        assert_eq!(Entry::decode(&raw.freeze()), Err(DecodeError::Malformed));
    }

    #[test]
    fn foreign_and_future_versions_are_rejected() {
        assert_eq!(
            Entry::decode(&Bytes::from_static(b"{\"json\":1}")),
            Err(DecodeError::Foreign)
        );
        let mut raw = BytesMut::from(&encode(&sample())[..]);
        raw[3] = FORMAT_VERSION + 1;
        assert_eq!(
            Entry::decode(&raw.freeze()),
            Err(DecodeError::Version(FORMAT_VERSION + 1))
        );
    }

    #[test]
    fn random_bytes_never_panic() {
        // A small deterministic xorshift generator: the decoder must return, never panic.
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        for len in 0..2000usize {
            let mut v = Vec::with_capacity(len + 4);
            v.extend_from_slice(b"TRC\x01");
            for _ in 0..len {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                v.push(x as u8);
            }
            let _ = Entry::decode(&Bytes::from(v));
        }
    }

    #[test]
    fn huge_header_counts_are_malformed_not_a_panic() {
        let mut raw = BytesMut::new();
        raw.put_slice(b"TRC\x01\x01");
        raw.put_slice(&[0; 8 + 8 + 8 + 24]);
        raw.put_u16(200);
        raw.put_u16(u16::MAX);
        for _ in 0..30_000 {
            raw.put_u16(1);
            raw.put_slice(b"a");
            raw.put_u32(0);
        }
        assert_eq!(Entry::decode(&raw.freeze()), Err(DecodeError::Malformed));
        let mut many = HeaderMap::new();
        for _ in 0..=MAX_HEADER_VALUES {
            many.append("x-a", HeaderValue::from_static("1"));
        }
        assert!(!storable_map(&many));
    }

    #[test]
    fn the_state_byte_confirms_in_place() {
        let mut raw = BytesMut::from(&encode(&sample())[..]);
        assert!(!Entry::decode(&raw.clone().freeze()).unwrap().confirmed);
        assert_eq!(&raw[NONCE_OFFSET..NONCE_OFFSET + 8], b"12345678");
        raw[STATE_OFFSET] = CONFIRMED;
        assert!(Entry::decode(&raw.clone().freeze()).unwrap().confirmed);
        raw[STATE_OFFSET] = 7;
        assert_eq!(Entry::decode(&raw.freeze()), Err(DecodeError::Malformed));
    }

    #[test]
    fn decoded_body_shares_the_reply_allocation() {
        let raw = encode(&sample());
        let d = Entry::decode(&raw).unwrap();
        let start = raw.as_ptr() as usize;
        let body = d.body.as_ptr() as usize;
        assert!(body >= start && body < start + raw.len());
    }
}

#[cfg(test)]
mod fuzz {
    //! Property tests run in CI: the decoder never panics and never accepts a mangled
    //! envelope as the original.
    use super::*;
    use proptest::prelude::*;

    fn entry_strategy() -> impl Strategy<Value = Entry> {
        (
            200u16..600,
            proptest::collection::vec(("[a-z][a-z0-9-]{0,20}", "[ -~]{0,40}"), 0..8),
            proptest::option::of(proptest::collection::vec(
                ("[a-z]{1,10}", "[ -~]{0,10}"),
                0..3,
            )),
            proptest::collection::vec(any::<u8>(), 0..2048),
            any::<u64>(),
            any::<u64>(),
        )
            .prop_map(|(status, headers, trailers, body, at, ttl)| {
                let map = |pairs: Vec<(String, String)>| {
                    let mut m = HeaderMap::new();
                    for (n, v) in pairs {
                        m.append(
                            HeaderName::from_bytes(n.as_bytes()).unwrap(),
                            HeaderValue::from_str(&v).unwrap(),
                        );
                    }
                    m
                };
                Entry {
                    status: StatusCode::from_u16(status).unwrap(),
                    headers: map(headers),
                    trailers: trailers.map(map),
                    body: Bytes::from(body),
                    stored_at_ms: at,
                    ttl_ms: ttl,
                    swr_ms: ttl / 3,
                    sie_ms: ttl / 7,
                    delta_ms: ttl / 11,
                    confirmed: false,
                }
            })
    }

    fn encode(e: &Entry) -> Bytes {
        Entry::encode(
            e.status,
            &e.headers,
            e.trailers.as_ref(),
            std::slice::from_ref(&e.body),
            [7; 8],
            timing(e),
        )
    }

    proptest! {
        #[test]
        fn round_trips(e in entry_strategy()) {
            prop_assert_eq!(Entry::decode(&encode(&e)).unwrap(), e);
        }

        #[test]
        fn arbitrary_bytes_never_panic(raw in proptest::collection::vec(any::<u8>(), 0..4096)) {
            let _ = Entry::decode(&Bytes::from(raw.clone()));
            let mut prefixed = b"TRC\x01\x01".to_vec();
            prefixed.extend(raw);
            let _ = Entry::decode(&Bytes::from(prefixed));
        }

        #[test]
        fn a_flipped_byte_is_rejected_or_decodes_to_a_different_entry(
            e in entry_strategy(),
            at in any::<prop::sample::Index>(),
            bit in 0u8..8,
        ) {
            let raw = encode(&e);
            let mut bad = raw.to_vec();
            let i = at.index(bad.len());
            bad[i] ^= 1 << bit;
            match Entry::decode(&Bytes::from(bad)) {
                Err(_) => {}
                // The state byte (0/1) and the nonce are not part of the entry's value.
                Ok(d) if (STATE_OFFSET..NONCE_OFFSET + 8).contains(&i) => {
                    prop_assert_eq!(d.body, e.body);
                }
                // Header names are case-insensitive: a flipped case bit names the same header.
                Ok(d) if d == e => prop_assert!(bit == 5 && raw[i].is_ascii_alphabetic()),
                Ok(_) => {}
            }
        }

        #[test]
        fn truncations_are_rejected(e in entry_strategy(), at in any::<prop::sample::Index>()) {
            let raw = encode(&e);
            let cut = at.index(raw.len());
            prop_assert!(Entry::decode(&raw.slice(..cut)).is_err());
        }
    }
}
