//! Request coalescing: concurrent misses of one key in a process make one call to the inner
//! service; the others wait for its entry.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::watch;

/// What became of a leader's response.
#[derive(Clone, Debug)]
pub(crate) enum Outcome {
    /// Still being computed.
    Pending,
    /// Its head is out and its body is being recorded on its way to the leader's client:
    /// a waiting request asks for it to be read ahead, so as not to wait on that client.
    Streaming(Weak<dyn ReadAhead>),
    /// Complete and storable: the encoded entry.
    Stored(Bytes),
    /// Not storable (private, Set-Cookie, error, too large, cut short): followers must ask
    /// the inner service themselves, never receive it.
    NotStored,
    /// Stored, and its write to Redis ended (the entry is no longer held here): read it
    /// from Redis.
    Landed,
}

/// A leader's body being recorded, which can be read ahead of its client.
pub(crate) trait ReadAhead: Send + Sync {
    /// Has the body read to the end of its recording by a background task, whatever its
    /// client does (at once if it is running or done already). False if the bounds on
    /// background work refused it: the caller should not wait for the flight.
    fn read_ahead(self: Arc<Self>) -> bool;
}

/// A flight: the invalidation sequence read before it began, its outcome, and when its
/// write to Redis ended (if it did).
struct Flight {
    seq: Option<u64>,
    tx: Arc<watch::Sender<Outcome>>,
    ended: Option<Instant>,
}

/// How long a flight stays joinable after its write ended, for lookups that began before:
/// their GET may have been answered before the entry landed, and they would otherwise call
/// the inner service again right after it was stored. They read Redis again instead (the
/// flight no longer holds the entry: memory stays bounded by the writes in progress).
const ENDED_GRACE: Duration = Duration::from_millis(500);

#[derive(Default)]
struct Map {
    flights: HashMap<String, Flight>,
    /// Ended flights, oldest first, pruned past `ENDED_GRACE`.
    ended: VecDeque<(Instant, String, Arc<watch::Sender<Outcome>>)>,
}

impl Map {
    fn prune(&mut self, now: Instant) {
        while let Some((at, _, _)) = self.ended.front() {
            if now.saturating_duration_since(*at) < ENDED_GRACE {
                break;
            }
            if let Some((_, key, tx)) = self.ended.pop_front() {
                self.remove_if_same(&key, &tx);
            }
        }
    }

    fn remove_if_same(&mut self, key: &str, tx: &Arc<watch::Sender<Outcome>>) {
        if self
            .flights
            .get(key)
            .is_some_and(|f| Arc::ptr_eq(&f.tx, tx))
        {
            self.flights.remove(key);
        }
    }
}

impl std::fmt::Debug for Map {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Flights")
            .field("in_flight", &self.flights.len())
            .finish()
    }
}

/// Misses in flight, by key, with the invalidation sequence read before each began.
#[derive(Debug, Default)]
pub(crate) struct Flights(Arc<Mutex<Map>>);

/// A caller's part in a flight.
pub(crate) enum Role {
    /// Calls the inner service; completes the flight through the guard.
    Leader(FlightGuard),
    /// Waits for the leader.
    Follower(watch::Receiver<Outcome>),
}

impl Flights {
    /// Joins the flight of `key`, or leads a new one. A caller that read a later sequence
    /// (an invalidation ran since the flight began) leads its own. `looked_up` is when the
    /// caller's lookup began.
    pub(crate) fn join(&self, key: &str, seq: Option<u64>, looked_up: Instant) -> Role {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        map.prune(Instant::now());
        if let Some(f) = map.flights.get(key) {
            // A completed flight stays joinable until its write to Redis ends, so that
            // requests arriving in between get its entry instead of calling again; and a
            // little after, for lookups that began before it ended.
            let joinable = f.ended.map_or(true, |ended| looked_up < ended);
            if joinable && seq <= f.seq && !matches!(*f.tx.borrow(), Outcome::NotStored) {
                return Role::Follower(f.tx.subscribe());
            }
        }
        let tx = Arc::new(watch::Sender::new(Outcome::Pending));
        map.flights.insert(
            key.to_owned(),
            Flight {
                seq,
                tx: Arc::clone(&tx),
                ended: None,
            },
        );
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
    flights: Arc<Mutex<Map>>,
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

    /// Tells the followers that the response's body is being recorded, and where to ask
    /// for it to be read ahead.
    pub(crate) fn streaming(&self, lead: Weak<dyn ReadAhead>) {
        self.tx.send_replace(Outcome::Streaming(lead));
    }

    fn finish(&mut self, outcome: Outcome) {
        self.done = true;
        self.tx.send_replace(outcome);
        forget(&self.flights, &self.key, &self.tx);
    }
}

fn forget(flights: &Mutex<Map>, key: &str, tx: &Arc<watch::Sender<Outcome>>) {
    let mut map = flights.lock().unwrap_or_else(|e| e.into_inner());
    map.remove_if_same(key, tx);
}

/// A completed flight, joinable until dropped (when its write ended), and for
/// `ENDED_GRACE` after by lookups that began before.
pub(crate) struct Completed {
    flights: Arc<Mutex<Map>>,
    key: String,
    tx: Arc<watch::Sender<Outcome>>,
}

impl Drop for Completed {
    fn drop(&mut self) {
        let now = Instant::now();
        let mut map = self.flights.lock().unwrap_or_else(|e| e.into_inner());
        map.prune(now);
        let key = std::mem::take(&mut self.key);
        if let Some(f) = map.flights.get_mut(&key) {
            if Arc::ptr_eq(&f.tx, &self.tx) {
                f.ended = Some(now);
                // The entry is in Redis now (or was refused there): stop holding it, and
                // let late joiners read Redis.
                self.tx.send_replace(Outcome::Landed);
                map.ended.push_back((now, key, Arc::clone(&self.tx)));
                return;
            }
        }
        drop(map);
        self.tx.send_replace(Outcome::Landed);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lookup_that_began_before_the_write_ended_gets_the_entry() {
        let flights = Flights::default();
        let before = Instant::now();
        let Role::Leader(guard) = flights.join("k", Some(1), before) else {
            panic!("the first caller leads");
        };
        let written = guard.complete(Bytes::from_static(b"entry"));
        // The write to Redis ends.
        drop(written);
        let after = Instant::now() + Duration::from_millis(1);
        match flights.join("k", Some(1), before) {
            Role::Follower(rx) => assert!(matches!(&*rx.borrow(), Outcome::Landed)),
            Role::Leader(_) => panic!("began before the write ended: follows"),
        }
        // A lookup that began after the write ended would have found the entry: if it
        // missed, something removed it, and it leads a new flight.
        assert!(matches!(flights.join("k", Some(1), after), Role::Leader(_)));
    }

    #[test]
    fn ended_flights_are_forgotten_after_the_grace() {
        let flights = Flights::default();
        let before = Instant::now();
        let Role::Leader(guard) = flights.join("k", Some(1), before) else {
            panic!("the first caller leads");
        };
        drop(guard.complete(Bytes::from_static(b"entry")));
        std::thread::sleep(ENDED_GRACE + Duration::from_millis(50));
        flights.0.lock().unwrap().prune(Instant::now());
        assert!(flights.0.lock().unwrap().flights.is_empty());
        assert!(flights.0.lock().unwrap().ended.is_empty());
    }

    #[test]
    fn a_later_invalidation_never_joins_an_ended_flight() {
        let flights = Flights::default();
        let before = Instant::now();
        let Role::Leader(guard) = flights.join("k", Some(1), before) else {
            panic!("the first caller leads");
        };
        drop(guard.complete(Bytes::from_static(b"entry")));
        assert!(matches!(
            flights.join("k", Some(2), before),
            Role::Leader(_)
        ));
    }
}
