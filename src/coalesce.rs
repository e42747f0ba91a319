//! Request coalescing: concurrent misses of one key in a process make one call to the inner
//! service; the others wait for its entry.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::watch;

/// What became of a leader's response.
#[derive(Clone, Debug)]
pub(crate) enum Outcome {
    /// Still being computed.
    Pending,
    /// Complete and storable: the encoded entry.
    Stored(Bytes),
    /// Not storable (private, Set-Cookie, error, too large, cut short): followers must ask
    /// the inner service themselves, never receive it.
    NotStored,
}

type Flight = (Option<u64>, Arc<watch::Sender<Outcome>>);

/// Misses in flight, by key, with the invalidation sequence read before each began.
#[derive(Debug, Default)]
pub(crate) struct Flights(Arc<Mutex<HashMap<String, Flight>>>);

/// A caller's part in a flight.
pub(crate) enum Role {
    /// Calls the inner service; completes the flight through the guard.
    Leader(FlightGuard),
    /// Waits for the leader.
    Follower(watch::Receiver<Outcome>),
}

impl Flights {
    /// Joins the flight of `key`, or leads a new one. A caller that read a later sequence
    /// (an invalidation ran since the flight began) leads its own.
    pub(crate) fn join(&self, key: &str, seq: Option<u64>) -> Role {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((started, tx)) = map.get(key) {
            // A completed flight stays joinable until its write to Redis ends, so that
            // requests arriving in between get its entry instead of calling again.
            if seq <= *started && !matches!(*tx.borrow(), Outcome::NotStored) {
                return Role::Follower(tx.subscribe());
            }
        }
        let tx = Arc::new(watch::Sender::new(Outcome::Pending));
        map.insert(key.to_owned(), (seq, Arc::clone(&tx)));
        Role::Leader(FlightGuard {
            flights: Arc::clone(&self.0),
            key: key.to_owned(),
            tx,
            done: false,
        })
    }
}

/// The leader's end of a flight. Dropped without [`complete`](Self::complete), it tells
/// the followers to ask the inner service themselves.
pub(crate) struct FlightGuard {
    flights: Arc<Mutex<HashMap<String, Flight>>>,
    key: String,
    tx: Arc<watch::Sender<Outcome>>,
    done: bool,
}

impl FlightGuard {
    /// Hands the encoded entry to the followers. The flight stays joinable until the
    /// returned handle is dropped (when the write to Redis ends).
    pub(crate) fn complete(mut self, entry: Bytes) -> Completed {
        self.done = true;
        self.tx.send_replace(Outcome::Stored(entry));
        Completed {
            flights: Arc::clone(&self.flights),
            key: std::mem::take(&mut self.key),
            tx: Arc::clone(&self.tx),
        }
    }

    fn finish(&mut self, outcome: Outcome) {
        self.done = true;
        self.tx.send_replace(outcome);
        forget(&self.flights, &self.key, &self.tx);
    }
}

fn forget(flights: &Mutex<HashMap<String, Flight>>, key: &str, tx: &Arc<watch::Sender<Outcome>>) {
    let mut map = flights.lock().unwrap_or_else(|e| e.into_inner());
    if map.get(key).is_some_and(|(_, t)| Arc::ptr_eq(t, tx)) {
        map.remove(key);
    }
}

/// A completed flight, joinable until dropped.
pub(crate) struct Completed {
    flights: Arc<Mutex<HashMap<String, Flight>>>,
    key: String,
    tx: Arc<watch::Sender<Outcome>>,
}

impl Drop for Completed {
    fn drop(&mut self) {
        forget(&self.flights, &self.key, &self.tx);
    }
}

impl Drop for FlightGuard {
    fn drop(&mut self) {
        if !self.done {
            self.finish(Outcome::NotStored);
        }
    }
}

impl std::fmt::Debug for FlightGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FlightGuard")
            .field("key", &self.key)
            .finish()
    }
}
