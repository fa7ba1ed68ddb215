//! Idle connections without a task: a plain-TCP connection that has had nothing to do for
//! [`PARK_AFTER`] gives up its task and its registration with Tokio's reactor, and waits here as
//! its bare protocol state and socket until its socket has bytes (or closes), its session has
//! something to send, someone kicks it, its keep alive runs out or the broker shuts down. Then a
//! new task picks it up where it left off.
//!
//! Why: a task (its future, Tokio's cell) and a reactor registration are two thirds of what an
//! idle connection costs, and most connections of a large fleet are idle: a device pings once
//! per keep alive and sends a reading now and then. The sockets of parked connections are in
//! one epoll set of this module's own, which Tokio's reactor watches as one descriptor.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Weak};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// How long a connection must have had nothing to do before it parks. Long enough that a
/// connection moving messages never parks between two of them; short enough that a crowd of
/// devices that just connected stops costing a task each within a moment.
pub const PARK_AFTER: Duration = Duration::from_secs(1);

/// The same for a connection woken after at least [`PARK_AFTER`] parked: it parks again as
/// soon as it has nothing to do, since what woke it is most likely one ping or one message (a
/// fleet that pings in step would otherwise hold a task per device meanwhile). One woken
/// sooner than that waits the full [`PARK_AFTER`]: a client that wakes its connection every
/// few hundred milliseconds (busy, or trickling pings to make the broker spawn tasks) keeps
/// its task.
pub const REPARK_AFTER: Duration = Duration::ZERO;

/// A parked connection's state: everything needed to serve it again except its socket.
pub trait Parkable: Send + 'static {
    /// Starts serving again (on a new task of `handle`'s runtime) over `stream`, with the
    /// keep alive deadline it parked with, after `parked_for` without a task.
    fn resume(
        self: Box<Self>,
        stream: std::net::TcpStream,
        keep_alive: Option<Instant>,
        parked_for: Duration,
        handle: &tokio::runtime::Handle,
    );
}

/// One parked connection. Times are milliseconds since the parker started, so a slot stays
/// 40 bytes.
struct Entry {
    /// Tells this parking apart from earlier ones in the same slot.
    stamp: u32,
    stream: std::net::TcpStream,
    /// Its keep alive deadline (`u64::MAX`: none).
    keep_alive_ms: u64,
    /// When it parked.
    parked_ms: u64,
    state: Box<dyn Parkable>,
}

/// How often parked connections' keep alive deadlines are looked at: a quiet client is let
/// go at most this late (a sweep costs a few nanoseconds per parked connection, where a timer
/// each would cost memory).
const SWEEP_EVERY: Duration = Duration::from_millis(250);

/// The parked connections, under one lock.
#[derive(Default)]
struct Lot {
    slots: Slots,
    free: Vec<u32>,
    next_stamp: u32,
    parked: usize,
}

/// Slots for parked connections, in pages: the table grows a page at a time instead of
/// doubling (a vector of 19,000 slots would hold room for 32,768).
#[derive(Default)]
struct Slots {
    pages: Vec<Box<[Option<Entry>]>>,
    len: usize,
}

impl Slots {
    const PAGE: usize = 1024;

    fn get(&self, i: u32) -> Option<&Option<Entry>> {
        let i = i as usize;
        self.pages.get(i / Self::PAGE)?.get(i % Self::PAGE)
    }

    fn get_mut(&mut self, i: u32) -> Option<&mut Option<Entry>> {
        let i = i as usize;
        self.pages.get_mut(i / Self::PAGE)?.get_mut(i % Self::PAGE)
    }

    /// Puts `e` in a new slot at the end.
    fn push(&mut self, e: Entry) -> u32 {
        if self.len % Self::PAGE == 0 {
            let page = std::iter::repeat_with(|| None).take(Self::PAGE).collect();
            self.pages.push(page);
        }
        let i = self.len;
        self.len += 1;
        if let Some(slot) = self.get_mut(i as u32) {
            *slot = Some(e);
        }
        i as u32
    }

    /// Every slot handed out, with its index.
    fn iter(&self) -> impl Iterator<Item = (u32, &Option<Entry>)> {
        self.pages
            .iter()
            .flat_map(|p| p.iter())
            .take(self.len)
            .enumerate()
            .map(|(i, e)| (i as u32, e))
    }
}

/// Where idle connections wait; one per broker, created on first use (inside its runtime).
pub struct Parker {
    epoll: AsyncFd<OwnedFd>,
    lot: Mutex<Lot>,
    handle: tokio::runtime::Handle,
    /// What [`Entry`]'s times count from.
    epoch: Instant,
    shutdown: CancellationToken,
    /// `corvid_connections_parked`.
    gauge: prometheus::IntGauge,
    /// Connections parked since start (the memory-return loop counts them like ended ones).
    pub parks: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for Parker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Parker")
            .field("parked", &self.lot.lock().parked)
            .finish()
    }
}

impl Parker {
    /// A parker on the current runtime, with its waiting loop running.
    pub fn start(
        shutdown: CancellationToken,
        gauge: prometheus::IntGauge,
    ) -> std::io::Result<Arc<Self>> {
        // SAFETY: epoll_create1 has no preconditions; a non-negative result is a new
        // descriptor this process owns.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` was just created and is owned by nothing else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: the `OwnedFd` is open and owned by the `AsyncFd` for its whole life.
        let epoll = unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }
            .map_err(|e| e.into_parts().1)?;
        let parker = Arc::new(Parker {
            epoll,
            lot: Mutex::new(Lot::default()),
            handle: tokio::runtime::Handle::current(),
            epoch: Instant::now(),
            shutdown,
            gauge,
            parks: Default::default(),
        });
        tokio::spawn(watch(Arc::downgrade(&parker)));
        Ok(parker)
    }

    /// Parks a connection: keeps its socket (already taken from Tokio) and `state` until
    /// something wakes it. Returns the wake-up that resumes it (to install where its session and
    /// kicks will find it) and the ticket to [`Parker::arm`] once that is done; until then its
    /// socket is not watched.
    pub fn park(
        self: &Arc<Self>,
        stream: std::net::TcpStream,
        keep_alive: Option<Instant>,
        state: Box<dyn Parkable>,
    ) -> (Wakeup, Ticket) {
        let mut lot = self.lot.lock();
        lot.next_stamp = lot.next_stamp.wrapping_add(1);
        let stamp = lot.next_stamp;
        let entry = Entry {
            stamp,
            stream,
            keep_alive_ms: keep_alive.map_or(u64::MAX, |d| self.ms(d)),
            parked_ms: self.ms(Instant::now()),
            state,
        };
        let slot = match lot.free.pop() {
            Some(i) => {
                if let Some(free) = lot.slots.get_mut(i) {
                    *free = Some(entry);
                }
                i
            }
            None => lot.slots.push(entry),
        };
        lot.parked += 1;
        drop(lot);
        self.gauge.inc();
        self.parks
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let ticket = Ticket { slot, stamp };
        let wakeup = Wakeup {
            parker: Arc::downgrade(self),
            ticket,
        };
        (wakeup, ticket)
    }

    /// Starts watching a parked connection's socket (see [`Parker::park`]): bytes, a close or
    /// an error on it resume the connection.
    pub fn arm(&self, t: Ticket) {
        if self.shutdown.is_cancelled() {
            // Parked after the loop resumed everyone for the shutdown: resume it now.
            self.unpark(t);
            return;
        }
        let lot = self.lot.lock();
        let Some(Some(e)) = lot.slots.get(t.slot) else {
            return;
        };
        if e.stamp != t.stamp {
            return; // already resumed
        }
        let fd = e.stream.as_raw_fd();
        let mut ev = libc::epoll_event {
            events: (libc::EPOLLIN | libc::EPOLLRDHUP | libc::EPOLLONESHOT) as u32,
            u64: t.key(),
        };
        // SAFETY: both descriptors are open (the socket is owned by the entry, under the lock).
        let mut rc = unsafe { libc::epoll_ctl(self.epoll_fd(), libc::EPOLL_CTL_ADD, fd, &mut ev) };
        if rc != 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EEXIST) {
            // SAFETY: as above.
            rc = unsafe { libc::epoll_ctl(self.epoll_fd(), libc::EPOLL_CTL_MOD, fd, &mut ev) };
        }
        let failed = (rc != 0).then(std::io::Error::last_os_error);
        drop(lot);
        if let Some(e) = failed {
            tracing::warn!(error = %e, "could not watch a parked connection; resuming it");
            self.unpark(t);
        }
    }

    /// Resumes the connection parked under `t`, if it still is.
    pub fn unpark(&self, t: Ticket) {
        let mut lot = self.lot.lock();
        let Some(slot) = lot.slots.get_mut(t.slot) else {
            return;
        };
        if slot.as_ref().is_none_or(|e| e.stamp != t.stamp) {
            return;
        }
        let Some(e) = slot.take() else {
            return;
        };
        lot.free.push(t.slot);
        lot.parked -= 1;
        // SAFETY: both descriptors are open; removing one that was never added fails harmlessly.
        unsafe {
            libc::epoll_ctl(
                self.epoll_fd(),
                libc::EPOLL_CTL_DEL,
                e.stream.as_raw_fd(),
                std::ptr::null_mut(),
            );
        }
        drop(lot);
        self.gauge.dec();
        let keep_alive = (e.keep_alive_ms != u64::MAX)
            .then(|| self.epoch + Duration::from_millis(e.keep_alive_ms));
        let parked_for = Duration::from_millis(self.ms(Instant::now()).saturating_sub(e.parked_ms));
        e.state
            .resume(e.stream, keep_alive, parked_for, &self.handle);
    }

    /// Resumes every parked connection (the broker is shutting down).
    fn unpark_all(&self) {
        let tickets: Vec<Ticket> = {
            let lot = self.lot.lock();
            lot.slots
                .iter()
                .filter_map(|(i, e)| {
                    e.as_ref().map(|e| Ticket {
                        slot: i,
                        stamp: e.stamp,
                    })
                })
                .collect()
        };
        for t in tickets {
            self.unpark(t);
        }
    }

    /// Resumes the connections whose keep alive ran out.
    fn expire(&self, now: Instant) {
        let now_ms = self.ms(now);
        let due: Vec<Ticket> = {
            let lot = self.lot.lock();
            lot.slots
                .iter()
                .filter_map(|(i, e)| {
                    let e = e.as_ref()?;
                    (e.keep_alive_ms <= now_ms).then_some(())?;
                    Some(Ticket {
                        slot: i,
                        stamp: e.stamp,
                    })
                })
                .collect()
        };
        for t in due {
            self.unpark(t);
        }
    }

    /// How many connections are parked now.
    pub fn parked(&self) -> usize {
        self.lot.lock().parked
    }

    /// `t` in milliseconds since the parker started (rounded up: a deadline never comes early).
    fn ms(&self, t: Instant) -> u64 {
        let d = t.saturating_duration_since(self.epoch);
        let ms = d.as_millis() + u128::from(d.subsec_nanos() % 1_000_000 != 0);
        ms.min(u128::from(u64::MAX - 1)) as u64
    }

    fn epoll_fd(&self) -> RawFd {
        self.epoll.get_ref().as_raw_fd()
    }

    /// Takes the ready events off the epoll set without waiting: `WouldBlock` when none.
    fn ready(&self, events: &mut [libc::epoll_event]) -> std::io::Result<usize> {
        // SAFETY: `events` is valid for its length; the epoll descriptor is open.
        let n = unsafe {
            libc::epoll_wait(
                self.epoll_fd(),
                events.as_mut_ptr(),
                events.len() as libc::c_int,
                0,
            )
        };
        match n {
            n if n < 0 => Err(std::io::Error::last_os_error()),
            0 => Err(std::io::ErrorKind::WouldBlock.into()),
            n => Ok(n as usize),
        }
    }
}

/// Names one parking of one connection.
#[derive(Debug, Clone, Copy)]
pub struct Ticket {
    slot: u32,
    stamp: u32,
}

impl Ticket {
    /// The epoll event's data for this parking.
    fn key(self) -> u64 {
        (u64::from(self.slot) << 32) | u64::from(self.stamp)
    }

    fn from_key(k: u64) -> Self {
        Ticket {
            slot: (k >> 32) as u32,
            stamp: k as u32,
        }
    }
}

/// Resumes a parked connection when its session or kick slot wakes it: left in the
/// connection's kick slot while it is parked (two words, no allocation).
#[derive(Debug)]
pub struct Wakeup {
    parker: Weak<Parker>,
    ticket: Ticket,
}

impl Wakeup {
    /// Resumes the connection, if it is still parked under this ticket.
    pub fn wake(self) {
        if let Some(p) = self.parker.upgrade() {
            p.unpark(self.ticket);
        }
    }
}

/// The parker's loop: resumes connections whose sockets are ready or whose keep alive ran out,
/// and all of them when the broker shuts down.
async fn watch(parker: Weak<Parker>) {
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 256];
    let mut sweep = tokio::time::interval(SWEEP_EVERY);
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut stopped = false;
    loop {
        let Some(p) = parker.upgrade() else {
            return;
        };
        tokio::select! {
            r = p.epoll.readable() => {
                let Ok(mut guard) = r else {
                    tracing::error!("the parked connections' epoll set failed; parking stops");
                    p.unpark_all();
                    return;
                };
                loop {
                    match guard.try_io(|_| p.ready(&mut events)) {
                        Ok(Ok(n)) => {
                            for ev in &events[..n] {
                                p.unpark(Ticket::from_key(ev.u64));
                            }
                        }
                        Ok(Err(e)) => {
                            tracing::warn!(error = %e, "epoll_wait on parked connections failed");
                            break;
                        }
                        Err(_would_block) => break,
                    }
                }
            }
            _ = sweep.tick() => p.expire(Instant::now()),
            _ = p.shutdown.cancelled(), if !stopped => {
                stopped = true;
                p.unpark_all();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A parked connection's state for the slot tests: never resumed.
    struct Nothing;

    impl Parkable for Nothing {
        fn resume(
            self: Box<Self>,
            _: std::net::TcpStream,
            _: Option<Instant>,
            _: Duration,
            _: &tokio::runtime::Handle,
        ) {
        }
    }

    fn entry(stamp: u32, stream: &std::net::TcpStream) -> Entry {
        Entry {
            stamp,
            stream: stream.try_clone().expect("clone a socket"),
            keep_alive_ms: u64::MAX,
            parked_ms: 0,
            state: Box::new(Nothing),
        }
    }

    /// Slots past the first page land in the right page and are found again by index.
    #[test]
    fn slots_grow_a_page_at_a_time() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let s = std::net::TcpStream::connect(l.local_addr().expect("addr")).expect("connect");
        let mut slots = Slots::default();
        let n = Slots::PAGE as u32 + 3;
        for i in 0..n {
            assert_eq!(slots.push(entry(i, &s)), i);
        }
        assert_eq!(slots.pages.len(), 2);
        for i in [0, Slots::PAGE as u32 - 1, Slots::PAGE as u32, n - 1] {
            assert_eq!(
                slots.get(i).and_then(|e| e.as_ref()).map(|e| e.stamp),
                Some(i)
            );
        }
        assert!(slots.get(n).and_then(|e| e.as_ref()).is_none());
        assert_eq!(slots.iter().count(), n as usize);
    }
}
