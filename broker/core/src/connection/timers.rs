//! The serving loop's time decisions, without I/O: when keep alive lets a client go, and when
//! an idle connection parks. The loop feeds them what happened (a whole packet, a pause the
//! broker imposed, a timer firing) and sleeps until [`next_timer`]; the rules are tested here,
//! instant by instant, instead of over sockets with real waits.

use std::time::Duration;

use tokio::time::Instant;

/// The keep alive deadline: a client that sends no whole control packet for one and a half
/// keep alive periods is let go [MQTT-3.1.2-24]. Time the broker itself does not read (a rate
/// pause, congested sessions) does not count against the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct KeepAlive {
    /// One and a half keep alive periods; zero turns keep alive off.
    grace: Duration,
    /// When the client is let go unless a packet comes first (`None`: never).
    deadline: Option<Instant>,
}

impl KeepAlive {
    /// A connection served from `now` (`grace`: one and a half periods; zero: off).
    pub(super) fn new(grace: Duration, now: Instant) -> Self {
        KeepAlive {
            grace,
            deadline: (!grace.is_zero()).then(|| now + grace),
        }
    }

    /// A parked connection resumed with the deadline it parked with.
    pub(super) fn resumed(grace: Duration, deadline: Option<Instant>) -> Self {
        KeepAlive { grace, deadline }
    }

    /// A whole control packet arrived at `now` (bytes alone do not count: a client trickling a
    /// packet byte by byte is let go all the same).
    pub(super) fn packet(&mut self, now: Instant) {
        self.not_reading_until(now);
    }

    /// The broker does not read from the client until `until`: the clock restarts from there.
    pub(super) fn not_reading_until(&mut self, until: Instant) {
        if !self.grace.is_zero() {
            self.deadline = Some(until + self.grace);
        }
    }

    /// Whether the client is let go at `now`.
    pub(super) fn expired(&self, now: Instant) -> bool {
        self.deadline.is_some_and(|d| d <= now)
    }

    /// The deadline (`None`: keep alive off).
    pub(super) fn deadline(&self) -> Option<Instant> {
        self.deadline
    }
}

/// What the serving loop does when its timer fires.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum OnTimer {
    /// Keep alive expired: let the client go.
    LetGo,
    /// Idle for the whole grace: park.
    Park,
    /// Not yet: sleep until this instant and look again.
    SleepUntil(Instant),
}

/// How often a connection that is not idle yet (acks held, a pause) looks again at parking.
const PARK_RECHECK: Duration =
    Duration::from_millis(crate::park::PARK_AFTER.as_millis() as u64 / 4);

/// The decision when the timer fires at `now`: keep alive first, then parking (only for
/// connections that can park) once the connection has had nothing to do since `idle_since`
/// for `grace`.
pub(super) fn on_timer(
    keep_alive: &KeepAlive,
    park: Option<Duration>,
    idle: bool,
    idle_since: Instant,
    now: Instant,
) -> OnTimer {
    if keep_alive.expired(now) {
        return OnTimer::LetGo;
    }
    if let Some(grace) = park {
        if idle && idle_since + grace <= now {
            return OnTimer::Park;
        }
    }
    let park_at = park.map(|grace| (idle_since + grace).max(now + PARK_RECHECK));
    OnTimer::SleepUntil(next_timer(keep_alive.deadline(), park_at, now))
}

/// The serving loop's next timer: the keep alive deadline or the next look at parking,
/// whichever comes first (a year away when neither applies).
pub(super) fn next_timer(
    keep_alive: Option<Instant>,
    park_at: Option<Instant>,
    now: Instant,
) -> Instant {
    let far = now + Duration::from_secs(86400 * 365);
    keep_alive.into_iter().chain(park_at).min().unwrap_or(far)
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn keep_alive_counts_packets_and_not_the_brokers_pauses() {
        let t0 = Instant::now();
        let mut ka = KeepAlive::new(15 * S, t0);
        assert_eq!(ka.deadline(), Some(t0 + 15 * S));
        assert!(!ka.expired(t0 + 14 * S));
        assert!(ka.expired(t0 + 15 * S), "one and a half periods, no packet");
        ka.packet(t0 + 10 * S);
        assert!(!ka.expired(t0 + 24 * S));
        assert!(ka.expired(t0 + 25 * S));
        // Paused by the broker until t0 + 40 s: the client's clock restarts there.
        ka.not_reading_until(t0 + 40 * S);
        assert!(!ka.expired(t0 + 54 * S));
        assert!(ka.expired(t0 + 55 * S));
    }

    #[test]
    fn keep_alive_zero_never_lets_go() {
        let t0 = Instant::now();
        let mut ka = KeepAlive::new(Duration::ZERO, t0);
        ka.packet(t0 + S);
        ka.not_reading_until(t0 + 2 * S);
        assert_eq!(ka.deadline(), None);
        assert!(!ka.expired(t0 + 86400 * S));
        assert_eq!(KeepAlive::resumed(Duration::ZERO, None), ka);
    }

    #[test]
    fn the_timer_lets_go_first_then_parks_an_idle_connection() {
        let t0 = Instant::now();
        let ka = KeepAlive::new(90 * S, t0);
        let grace = Some(30 * S);
        assert_eq!(on_timer(&ka, grace, true, t0, t0 + 30 * S), OnTimer::Park);
        assert_eq!(
            on_timer(&ka, grace, true, t0, t0 + 90 * S),
            OnTimer::LetGo,
            "expired keep alive wins over parking"
        );
        // Busy (acks held): look again a while later, never sooner than the recheck.
        assert_eq!(
            on_timer(&ka, grace, false, t0, t0 + 30 * S),
            OnTimer::SleepUntil(t0 + 30 * S + PARK_RECHECK)
        );
        // Idle, but active 20 s ago: sleep until the grace is over since then.
        assert_eq!(
            on_timer(&ka, grace, true, t0 + 20 * S, t0 + 30 * S),
            OnTimer::SleepUntil(t0 + 50 * S)
        );
        // A connection that cannot park only sleeps until its keep alive deadline.
        assert_eq!(
            on_timer(&ka, None, true, t0, t0 + 30 * S),
            OnTimer::SleepUntil(t0 + 90 * S)
        );
        // Neither keep alive nor parking: a year.
        let off = KeepAlive::new(Duration::ZERO, t0);
        assert_eq!(
            on_timer(&off, None, true, t0, t0 + S),
            OnTimer::SleepUntil(t0 + S + Duration::from_secs(86400 * 365))
        );
    }
}
