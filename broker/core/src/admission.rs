//! What a connection holds against the listeners' limits (`limits.max_connections`,
//! `limits.max_connections_per_ip`): taken by the accept loop, carried by the connection (also
//! while it parks) and given back when it ends, so no path can forget to release it.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// Live connection counts shared by all listeners, for `limits.max_connections` and
/// `limits.max_connections_per_ip`.
#[derive(Debug, Default)]
pub struct ConnCount(AtomicUsize, parking_lot::Mutex<HashMap<IpAddr, usize>>);

impl ConnCount {
    /// Counts one more connection unless `max` are open already.
    pub fn take_slot(self: &Arc<Self>, max: usize) -> Option<ConnSlot> {
        if self.0.fetch_add(1, Ordering::Relaxed) >= max {
            self.0.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        Some(ConnSlot(self.clone()))
    }

    /// Counts one more connection from `ip` unless it already has `max` (0 = unlimited).
    fn take_ip(&self, ip: IpAddr, max: usize) -> bool {
        let mut per_ip = self.1.lock();
        let n = per_ip.entry(ip).or_insert(0);
        if max > 0 && *n >= max {
            return false;
        }
        *n += 1;
        true
    }

    /// Counts one connection from `ip` less.
    fn release_ip(&self, ip: IpAddr) {
        let mut per_ip = self.1.lock();
        if let Some(n) = per_ip.get_mut(&ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                per_ip.remove(&ip);
            }
        }
    }
}

/// One connection counted against `limits.max_connections`; given back when dropped.
#[derive(Debug)]
pub struct ConnSlot(Arc<ConnCount>);

impl ConnSlot {
    /// Counts the connection against its source address too (the client's own, after any
    /// PROXY header) unless that address has `max` already (0 = unlimited); refused, the
    /// slot is given back.
    pub fn admit(self, ip: IpAddr, max: usize) -> Option<Admission> {
        self.0.take_ip(ip, max).then_some(Admission {
            total: Some(self),
            ip: Some(ip),
        })
    }
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        (self.0).0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What admitted a connection against the listeners' limits: dropped when it ends (it
/// travels with the connection when it parks, so it is kept to two words and an address).
/// The default counts against nothing (connections made in-process by tests).
#[derive(Debug, Default)]
pub struct Admission {
    total: Option<ConnSlot>,
    /// The source address counted against `limits.max_connections_per_ip`.
    ip: Option<IpAddr>,
}

impl Drop for Admission {
    fn drop(&mut self) {
        if let (Some(ConnSlot(count)), Some(ip)) = (&self.total, self.ip) {
            count.release_ip(ip);
        }
    }
}
