//! What of a gRPC response may be stored: pure rules over its head and trailers.

use http::HeaderMap;

const GRPC_STATUS: &str = "grpc-status";

/// Whether a response head may be stored: not trailers-only (its status would be in the
/// headers), and not compressed (a hit must be readable by any client, whatever it accepts).
pub(crate) fn storable_head(headers: &HeaderMap) -> bool {
    if headers.contains_key(GRPC_STATUS) {
        return false;
    }
    headers
        .get("grpc-encoding")
        .map_or(true, |v| v.as_bytes().eq_ignore_ascii_case(b"identity"))
}

/// Whether a response ended as a success: trailers with `grpc-status: 0`.
pub(crate) fn ok_trailers(trailers: Option<&HeaderMap>) -> bool {
    trailers
        .and_then(|t| t.get(GRPC_STATUS))
        .is_some_and(|v| v.as_bytes() == b"0")
}
