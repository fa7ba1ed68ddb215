//! Per-connection flow control: token buckets for the PUBLISH rate and the inbound byte rate
//! (`limits.message_rate` / `limits.byte_rate`, written `rate,burst`).
//!
//! A bucket may go into debt: the connection task takes what it read, and if the bucket is
//! below zero it stops reading the socket until the debt is repaid (`throttle`), or closes
//! the connection with MQTT 5 reason 0x96 (`disconnect`). Deliveries to the client go on
//! while its reading is paused.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::config::Rate;

/// A token bucket that refills at `rate` per second up to `burst`.
#[derive(Debug, Clone)]
pub struct Bucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl Bucket {
    /// A full bucket.
    pub fn new(r: Rate, now: Instant) -> Self {
        Bucket {
            rate: r.rate as f64,
            burst: r.burst as f64,
            tokens: r.burst as f64,
            last: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + dt * self.rate).min(self.burst);
        self.last = now;
    }

    /// Takes `n` tokens; returns how long to wait until the bucket is out of debt, if it is
    /// in debt now.
    pub fn take(&mut self, n: u64, now: Instant) -> Option<Duration> {
        self.refill(now);
        self.tokens -= n as f64;
        self.debt(now)
    }

    /// How long until the bucket is out of debt, if it is in debt.
    pub fn debt(&mut self, now: Instant) -> Option<Duration> {
        self.refill(now);
        (self.tokens < 0.0).then(|| Duration::from_secs_f64(-self.tokens / self.rate))
    }
}

/// The buckets of one connection.
#[derive(Debug, Clone, Default)]
pub struct ConnLimits {
    /// PUBLISH packets.
    pub messages: Option<Bucket>,
    /// Bytes read.
    pub bytes: Option<Bucket>,
}

impl ConnLimits {
    /// Buckets for the configured rates.
    pub fn new(messages: Option<Rate>, bytes: Option<Rate>) -> Self {
        let now = Instant::now();
        ConnLimits {
            messages: messages.map(|r| Bucket::new(r, now)),
            bytes: bytes.map(|r| Bucket::new(r, now)),
        }
    }

    /// Whether any limit is configured.
    pub fn any(&self) -> bool {
        self.messages.is_some() || self.bytes.is_some()
    }
}

/// Failed authentications per source address in the current minute
/// (`limits.max_auth_failures_per_minute`), so password guessing from one address is cut off
/// before it reaches the (slow, bounded) password hashing.
#[derive(Debug)]
pub struct AuthFailures {
    max: u32,
    seen: Mutex<HashMap<IpAddr, (Instant, u32)>>,
}

impl AuthFailures {
    /// Addresses tracked at most; older windows are pruned beyond it.
    const CAP: usize = 100_000;
    const WINDOW: Duration = Duration::from_secs(60);

    /// A limiter allowing `max` failures per address per minute (0 = unlimited).
    pub fn new(max: u32) -> Self {
        AuthFailures {
            max,
            seen: Mutex::new(HashMap::new()),
        }
    }

    /// Whether `ip` has used up its failures for this minute.
    pub fn blocked(&self, ip: IpAddr, now: Instant) -> bool {
        if self.max == 0 {
            return false;
        }
        self.seen
            .lock()
            .get(&ip)
            .is_some_and(|(start, n)| now.duration_since(*start) < Self::WINDOW && *n >= self.max)
    }

    /// Records a failed authentication from `ip`.
    pub fn failed(&self, ip: IpAddr, now: Instant) {
        if self.max == 0 {
            return;
        }
        let mut seen = self.seen.lock();
        if seen.len() >= Self::CAP {
            seen.retain(|_, (start, _)| now.duration_since(*start) < Self::WINDOW);
            if seen.len() >= Self::CAP {
                seen.clear();
            }
        }
        let e = seen.entry(ip).or_insert((now, 0));
        if now.duration_since(e.0) >= Self::WINDOW {
            *e = (now, 0);
        }
        e.1 = e.1.saturating_add(1);
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn auth_failures_block_for_the_rest_of_the_minute() {
        let ip: std::net::IpAddr = "10.0.0.1".parse().expect("ip");
        let other: std::net::IpAddr = "10.0.0.2".parse().expect("ip");
        let t0 = Instant::now();
        let f = AuthFailures::new(3);
        for _ in 0..3 {
            assert!(!f.blocked(ip, t0));
            f.failed(ip, t0);
        }
        assert!(f.blocked(ip, t0));
        assert!(!f.blocked(other, t0));
        assert!(!f.blocked(ip, t0 + Duration::from_secs(61)));
        assert!(!AuthFailures::new(0).blocked(ip, t0));
    }

    use super::*;

    #[test]
    fn burst_then_rate() {
        let t0 = Instant::now();
        let mut b = Bucket::new(Rate { rate: 10, burst: 5 }, t0);
        for _ in 0..5 {
            assert_eq!(b.take(1, t0), None);
        }
        let wait = b.take(1, t0).expect("in debt");
        assert!((wait.as_secs_f64() - 0.1).abs() < 1e-6, "{wait:?}");
        assert_eq!(b.debt(t0 + Duration::from_millis(100)), None);
        // Refill is capped at the burst.
        let later = t0 + Duration::from_secs(60);
        for _ in 0..5 {
            assert_eq!(b.take(1, later), None);
        }
        assert!(b.take(1, later).is_some());
    }

    #[test]
    fn bytes_can_overdraw() {
        let t0 = Instant::now();
        let mut b = Bucket::new(
            Rate {
                rate: 1000,
                burst: 1000,
            },
            t0,
        );
        let wait = b.take(3000, t0).expect("debt");
        assert!((wait.as_secs_f64() - 2.0).abs() < 1e-6, "{wait:?}");
    }
}
