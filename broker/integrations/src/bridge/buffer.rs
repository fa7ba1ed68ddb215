//! A bounded, never-blocking hand-off buffer between the publish path and a slow outside
//! system (an MQTT or Kafka bridge, an event store): producers push without waiting, one
//! consumer takes batches, and when the buffer is full the oldest entry is dropped and counted.
//!
//! Invariants: [`Buffer::push`] takes a short lock and never awaits, so a remote that is down
//! or slow can only cost memory up to `capacity` entries, never latency on the publish path.
//! Every entry that enters is, in the end, either taken by the consumer or counted in
//! [`Buffer::dropped`]. The optional Prometheus gauge/counter mirror [`Buffer::pending`] (what
//! waits here plus what the consumer holds, see [`Buffer::set_held`]) and `dropped`.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use prometheus::{IntCounter, IntGauge};
use tokio::sync::Notify;

/// What [`Buffer::push`] did with an entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    /// Queued; nothing was lost.
    Queued,
    /// Queued, and the oldest entry was dropped to make room.
    DroppedOldest,
}

/// Metrics a buffer keeps up to date, so callers never poll it.
#[derive(Debug, Clone)]
pub struct BufferMetrics {
    /// Entries waiting now, including those the consumer holds.
    pub buffered: IntGauge,
    /// Entries dropped because the buffer was full.
    pub dropped: IntCounter,
}

/// A bounded FIFO with drop-oldest overflow; cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct Buffer<T> {
    queue: Mutex<VecDeque<T>>,
    capacity: usize,
    ready: Notify,
    dropped: AtomicU64,
    /// Entries the consumer took and has not settled yet (a batch being produced, messages
    /// written to the remote and not yet acknowledged), as it last reported.
    held: AtomicUsize,
    metrics: Option<BufferMetrics>,
}

impl<T> Buffer<T> {
    /// A buffer holding at most `capacity` entries (at least 1).
    pub fn new(capacity: usize, metrics: Option<BufferMetrics>) -> Self {
        Buffer {
            queue: Mutex::new(VecDeque::new()),
            capacity: capacity.max(1),
            ready: Notify::new(),
            dropped: AtomicU64::new(0),
            held: AtomicUsize::new(0),
            metrics,
        }
    }

    /// Adds an entry without waiting; drops (and counts) the oldest one when full.
    pub fn push(&self, item: T) -> Pushed {
        let (outcome, len) = {
            let mut q = self.queue.lock();
            let outcome = if q.len() >= self.capacity {
                q.pop_front();
                Pushed::DroppedOldest
            } else {
                Pushed::Queued
            };
            q.push_back(item);
            (outcome, q.len())
        };
        if outcome == Pushed::DroppedOldest {
            self.count_dropped(1);
        }
        self.set_gauge(len);
        self.ready.notify_one();
        outcome
    }

    /// Puts entries the consumer took but could not deliver back at the front, in order, so
    /// they are retried first. Entries that no longer fit (newer ones arrived meanwhile) are
    /// dropped from the front — the oldest — and counted. Returns how many were dropped.
    pub fn requeue(&self, items: Vec<T>) -> usize {
        if items.is_empty() {
            return 0;
        }
        let (dropped, len) = {
            let mut q = self.queue.lock();
            for item in items.into_iter().rev() {
                q.push_front(item);
            }
            let over = q.len().saturating_sub(self.capacity);
            q.drain(..over);
            (over, q.len())
        };
        self.count_dropped(dropped);
        self.set_gauge(len);
        self.ready.notify_one();
        dropped
    }

    /// Takes up to `max` entries, oldest first, without waiting (possibly none).
    pub fn take(&self, max: usize) -> Vec<T> {
        let (batch, len) = {
            let mut q = self.queue.lock();
            let n = max.min(q.len());
            let batch: Vec<T> = q.drain(..n).collect();
            (batch, q.len())
        };
        self.set_gauge(len);
        batch
    }

    /// Waits until at least one entry is buffered, then up to `linger` more for the batch to
    /// fill to `max`, and takes up to `max` entries. Meant for one consumer at a time.
    pub async fn next_batch(&self, max: usize, linger: Duration) -> Vec<T> {
        let max = max.max(1);
        loop {
            // Register interest before looking, so a push between the check and the wait
            // is never missed.
            let notified = self.ready.notified();
            if !self.is_empty() {
                break;
            }
            notified.await;
        }
        if !linger.is_zero() {
            let deadline = tokio::time::Instant::now() + linger;
            loop {
                let notified = self.ready.notified();
                if self.len() >= max {
                    break;
                }
                if tokio::time::timeout_at(deadline, notified).await.is_err() {
                    break;
                }
            }
        }
        self.take(max)
    }

    /// Records how many taken entries the consumer still holds (not yet delivered, dropped or
    /// requeued), so [`Buffer::pending`] and the gauge count everything not yet settled.
    pub fn set_held(&self, n: usize) {
        self.held.store(n, Ordering::Relaxed);
        self.set_gauge(self.len());
    }

    /// Entries held by the consumer (see [`Buffer::set_held`]).
    pub fn held(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }

    /// Everything not yet settled: waiting here plus held by the consumer. This is what
    /// `buffered` in the status and `corvid_bridge_buffered` report.
    pub fn pending(&self) -> usize {
        self.len() + self.held()
    }

    /// Entries waiting here now (not counting those the consumer holds).
    pub fn len(&self) -> usize {
        self.queue.lock().len()
    }

    /// Whether nothing is waiting.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The configured capacity.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Entries dropped since the buffer was made.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    fn count_dropped(&self, n: usize) {
        if n == 0 {
            return;
        }
        let n = u64::try_from(n).unwrap_or(u64::MAX);
        self.dropped.fetch_add(n, Ordering::Relaxed);
        if let Some(m) = &self.metrics {
            m.dropped.inc_by(n);
        }
    }

    fn set_gauge(&self, len: usize) {
        if let Some(m) = &self.metrics {
            let all = len.saturating_add(self.held.load(Ordering::Relaxed));
            m.buffered.set(i64::try_from(all).unwrap_or(i64::MAX));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pending_counts_what_the_consumer_holds() {
        let gauge = IntGauge::new("t_buffered", "t").expect("gauge");
        let b = Buffer::new(
            10,
            Some(BufferMetrics {
                buffered: gauge.clone(),
                dropped: IntCounter::new("t_dropped", "t").expect("counter"),
            }),
        );
        for i in 0..5 {
            b.push(i);
        }
        let batch = b.take(3);
        b.set_held(batch.len());
        assert_eq!((b.len(), b.held(), b.pending()), (2, 3, 5));
        assert_eq!(gauge.get(), 5);
        b.requeue(batch);
        b.set_held(0);
        assert_eq!((b.len(), b.pending()), (5, 5));
        assert_eq!(gauge.get(), 5);
    }

    #[test]
    fn drops_oldest_when_full_and_counts() {
        let b = Buffer::new(3, None);
        for i in 0..5 {
            b.push(i);
        }
        assert_eq!(b.len(), 3);
        assert_eq!(b.dropped(), 2);
        assert_eq!(b.take(10), vec![2, 3, 4]);
        assert!(b.is_empty());
    }

    #[test]
    fn requeue_keeps_order_and_drops_oldest_overflow() {
        let b = Buffer::new(4, None);
        b.push(1);
        b.push(2);
        let taken = b.take(2);
        b.push(3);
        b.push(4);
        b.push(5);
        assert_eq!(b.requeue(taken), 1);
        assert_eq!(b.take(10), vec![2, 3, 4, 5]);
        assert_eq!(b.dropped(), 1);
    }

    #[test]
    fn metrics_mirror_len_and_drops() {
        let m = BufferMetrics {
            buffered: IntGauge::new("b", "b").expect("gauge"),
            dropped: IntCounter::new("d", "d").expect("counter"),
        };
        let b = Buffer::new(2, Some(m.clone()));
        b.push(1);
        b.push(2);
        b.push(3);
        assert_eq!(m.buffered.get(), 2);
        assert_eq!(m.dropped.get(), 1);
        b.take(1);
        assert_eq!(m.buffered.get(), 1);
    }

    #[tokio::test]
    async fn next_batch_waits_for_first_then_lingers() {
        let b = std::sync::Arc::new(Buffer::new(100, None));
        let b2 = b.clone();
        let consumer = tokio::spawn(async move { b2.next_batch(3, Duration::from_secs(10)).await });
        tokio::task::yield_now().await;
        b.push(1);
        b.push(2);
        b.push(3);
        b.push(4);
        let got = consumer.await.expect("join");
        assert_eq!(got, vec![1, 2, 3]);
        // Linger ends at the deadline with a partial batch.
        let got = b.next_batch(3, Duration::from_millis(20)).await;
        assert_eq!(got, vec![4]);
    }
}
