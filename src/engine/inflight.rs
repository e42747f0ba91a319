//! `get_or_insert_json` computations in flight, by key: one per key and sequence.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::OnceCell;

/// A computation in flight, and the invalidation sequence read before it began: a caller
/// that read a later sequence (an invalidation ran since) does not join it.
type Slot = (Option<u64>, Arc<OnceCell<Bytes>>);

/// Computations in flight, so that concurrent callers of one key share one run.
#[derive(Debug, Default)]
pub(crate) struct Inflight(Mutex<HashMap<String, Slot>>);

impl Inflight {
    pub(crate) fn cell(&self, key: &str, seq: Option<u64>) -> Arc<OnceCell<Bytes>> {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        match map.get(key) {
            // Join unless this caller saw an invalidation the computation did not (a caller
            // without a sequence, Redis being unreachable, joins any).
            Some((started, cell)) if seq <= *started => Arc::clone(cell),
            _ => {
                let cell = Arc::new(OnceCell::new());
                map.insert(key.to_owned(), (seq, Arc::clone(&cell)));
                cell
            }
        }
    }

    pub(crate) fn done(&self, key: &str, cell: &Arc<OnceCell<Bytes>>) {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if map.get(key).is_some_and(|(_, c)| Arc::ptr_eq(c, cell)) {
            map.remove(key);
        }
    }
}
