//! Lookups batched into `MGET`: the lookups of concurrent requests reach Redis as one command.
//!
//! When no lookup is out, a lookup is sent at once by its own request, as a plain `GET`.
//! Otherwise it queues its key and waits for its answer: one task per store takes the keys
//! queued at that moment and sends them as one `MGET`. While batches are out, keys queue, so
//! batches grow with the load. Redis and fred
//! then pay their per-command cost (parsing, dispatch, a socket write and read, a deadline
//! timer) once per batch instead of once per request.
//!
//! Bounds: a batch holds at most [`MAX_BATCH`] keys and, judged by the sizes of recent
//! replies, about [`BATCH_BYTES`] of values (the values of one reply share its buffer until
//! the last of them is sent, so large entries go in small batches); as many batches are
//! out at once as keep about [`MAX_BATCH`] keys out, and at least two (so that one slow batch
//! does not hold every lookup back): two batches for small entries, up to 8 for large ones. A batch's deadline is that of its oldest lookup, so no lookup waits past
//! its own.
//!
//! Only where every key can go in one command: not on a cluster (keys of different hash
//! slots). A lookup that cannot be queued (queue full, or no runtime) is sent on its own.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use fred::prelude::{ClientLike, Error as FredError, ErrorKind, KeysInterface, Options};
use futures_util::stream::{FuturesUnordered, StreamExt};
use tokio::sync::{mpsc, oneshot};

use crate::store::redis::Inner;

/// The most keys in one `MGET`, and about the most keys out at once.
pub(crate) const MAX_BATCH: usize = 64;
/// About the most bytes of values in one batch's reply.
pub(crate) const BATCH_BYTES: u64 = 256 << 10;
/// The most batches out at once.
const MAX_IN_FLIGHT: usize = 8;
/// Lookups waiting for a batch; past it, lookups are sent on their own.
const QUEUE: usize = 4096;

/// An entry, and the invalidation sequence read with it (when asked for and readable).
type Reply = Result<(Option<Bytes>, Option<u64>), FredError>;

struct Lookup {
    key: String,
    /// The sequence to read in the same `MGET` (added once per batch, whatever the number
    /// of lookups asking for it), so that a miss needs no second round trip for it.
    seq_key: Option<Arc<str>>,
    reply: oneshot::Sender<Reply>,
    queued: Instant,
}

/// The queue of one store, and the task that empties it (started on first use, on the
/// runtime of that use; started again if that runtime is gone).
#[derive(Default)]
pub(crate) struct Batcher {
    queue: RwLock<Option<mpsc::Sender<Lookup>>>,
    /// Lookups out now, alone or in batches.
    outstanding: AtomicUsize,
}

/// One lookup or batch out; counted until dropped.
pub(crate) struct Out<'a>(&'a AtomicUsize);

impl Drop for Out<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl std::fmt::Debug for Batcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batcher").finish_non_exhaustive()
    }
}

impl Batcher {
    /// When nothing is out, there is nothing to batch with: the caller sends its lookup on
    /// its own (no queue, no task hop) and holds the returned mark while it is out. `None`
    /// when something is out: queue it.
    pub(crate) fn alone(&self) -> Option<Out<'_>> {
        self.outstanding
            .compare_exchange(0, 1, Ordering::AcqRel, Ordering::Relaxed)
            .ok()
            .map(|_| Out(&self.outstanding))
    }

    fn out(&self) -> Out<'_> {
        self.outstanding.fetch_add(1, Ordering::AcqRel);
        Out(&self.outstanding)
    }

    /// Queues a lookup of `key` (and of `seq_key` with it); `None` when it cannot be queued
    /// (send it on its own).
    pub(crate) fn submit(
        &self,
        store: &Arc<Inner>,
        key: &str,
        seq_key: Option<&Arc<str>>,
    ) -> Option<oneshot::Receiver<Reply>> {
        let (reply, answer) = oneshot::channel();
        let mut lookup = Lookup {
            key: key.to_owned(),
            seq_key: seq_key.cloned(),
            reply,
            queued: Instant::now(),
        };
        {
            let queue = self.queue.read().unwrap_or_else(|e| e.into_inner());
            if let Some(queue) = queue.as_ref() {
                match queue.try_send(lookup) {
                    Ok(()) => return Some(answer),
                    Err(mpsc::error::TrySendError::Full(_)) => return None,
                    Err(mpsc::error::TrySendError::Closed(l)) => lookup = l,
                }
            }
        }
        // No task yet, or its runtime is gone: start one here.
        let runtime = tokio::runtime::Handle::try_current().ok()?;
        let mut queue = self.queue.write().unwrap_or_else(|e| e.into_inner());
        if queue.as_ref().map_or(true, mpsc::Sender::is_closed) {
            let (tx, rx) = mpsc::channel(QUEUE);
            runtime.spawn(run(rx, Arc::downgrade(store)));
            *queue = Some(tx);
        }
        let sent = queue.as_ref().map(|q| q.try_send(lookup).is_ok());
        sent.unwrap_or(false).then_some(answer)
    }
}

/// Keys per batch, and batches out at once, for values of `average` bytes.
fn limits(average: u64) -> (usize, usize) {
    let per_batch = usize::try_from(BATCH_BYTES / average.max(1))
        .unwrap_or(MAX_BATCH)
        .clamp(1, MAX_BATCH);
    (per_batch, (MAX_BATCH / per_batch).clamp(2, MAX_IN_FLIGHT))
}

/// Empties the queue into `MGET`s until the store is gone.
async fn run(mut queue: mpsc::Receiver<Lookup>, store: Weak<Inner>) {
    // Average bytes per value in recent replies (a moving average), 1 KiB to begin with.
    let average = AtomicU64::new(1024);
    let mut out = FuturesUnordered::new();
    loop {
        let (per_batch, in_flight) = limits(average.load(Ordering::Relaxed));
        tokio::select! {
            biased;
            Some(()) = out.next(), if !out.is_empty() => {}
            first = queue.recv(), if out.len() < in_flight => {
                let Some(first) = first else { break };
                let mut batch = Vec::with_capacity(per_batch.min(16));
                batch.push(first);
                while batch.len() < per_batch {
                    match queue.try_recv() {
                        Ok(l) => batch.push(l),
                        Err(_) => break,
                    }
                }
                let Some(store) = store.upgrade() else { break };
                out.push(send(store, batch, &average));
            }
        }
    }
}

/// Sends one batch and hands each lookup its answer.
async fn send(store: Arc<Inner>, batch: Vec<Lookup>, average: &AtomicU64) {
    let _out = store.batcher.as_ref().map(Batcher::out);
    let budget = store.lookup_timeout();
    // Lookups whose request is gone are not sent; those whose deadline passed while queued
    // are answered at once, without asking Redis (nor telling the breaker: Redis was not
    // asked). The batch's deadline is that of the oldest lookup left.
    let mut left = budget;
    let mut live = Vec::with_capacity(batch.len());
    for l in batch {
        if l.reply.is_closed() {
            continue;
        }
        let own = budget.saturating_sub(l.queued.elapsed());
        if own < Duration::from_micros(100) {
            let _ = l.reply.send(Err(FredError::new(
                ErrorKind::Timeout,
                "lookup deadline passed while queued",
            )));
            continue;
        }
        left = left.min(own);
        live.push(l);
    }
    if live.is_empty() {
        return;
    }
    // The sequences asked for (one per namespace; almost always one), after the entries.
    let mut seq_keys: Vec<Arc<str>> = Vec::new();
    let mut keys: Vec<String> = Vec::with_capacity(live.len() + 1);
    let mut replies = Vec::with_capacity(live.len());
    for l in live {
        let seq = l
            .seq_key
            .map(|s| match seq_keys.iter().position(|k| *k == s) {
                Some(i) => i,
                None => {
                    seq_keys.push(s);
                    seq_keys.len() - 1
                }
            });
        keys.push(l.key);
        replies.push((l.reply, seq));
    }
    keys.extend(seq_keys.iter().map(|k| k.to_string()));
    let options = Options {
        timeout: Some(left),
        ..store.read.clone()
    };
    let result = store
        .pool
        .next_connected()
        .with_options(&options)
        .mget::<Vec<Option<Bytes>>, _>(keys)
        .await;
    let asked = replies.len() + seq_keys.len();
    match store.observe("mget", result) {
        Ok(mut values) if values.len() == asked => {
            // A sequence not yet set is 0; one that is not a number is not used.
            let seqs: Vec<Option<u64>> = values
                .split_off(replies.len())
                .into_iter()
                .map(|v| match v {
                    None => Some(0),
                    Some(b) => std::str::from_utf8(&b).ok()?.parse().ok(),
                })
                .collect();
            let bytes: u64 = values.iter().flatten().map(|v| v.len() as u64).sum();
            let found = values.iter().flatten().count() as u64;
            if let Some(size) = bytes.checked_div(found) {
                let now = average.load(Ordering::Relaxed);
                average.store((now * 7 + size) / 8, Ordering::Relaxed);
            }
            for ((reply, seq), value) in replies.into_iter().zip(values) {
                let seq = seq.and_then(|i| seqs.get(i).copied().flatten());
                let _ = reply.send(Ok((value, seq)));
            }
        }
        Ok(values) => {
            let e = FredError::new(
                ErrorKind::Protocol,
                format!("MGET of {asked} keys answered {}", values.len()),
            );
            for (reply, _) in replies {
                let _ = reply.send(Err(e.clone()));
            }
        }
        Err(e) => {
            for (reply, _) in replies {
                let _ = reply.send(Err(e.clone()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_values_go_in_small_batches_with_more_out() {
        assert_eq!(limits(1024), (64, 2));
        assert_eq!(limits(4 * 1024), (64, 2));
        assert_eq!(limits(16 * 1024), (16, 4));
        assert_eq!(limits(64 * 1024), (4, 8));
        assert_eq!(limits(256 * 1024), (1, 8));
        assert_eq!(limits(20 << 20), (1, 8));
        assert_eq!(limits(0), (64, 2));
    }
}
