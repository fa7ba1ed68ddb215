//! Precise pacing for open-loop runs. Tokio's timer has millisecond granularity, which would add up
//! to 1 ms of generator-made delay to every "latency from scheduled send" sample; on a quiet machine
//! that is ten times what a broker takes. One OS thread sleeps with the kernel's high-resolution
//! timer until each scheduled send and wakes the publisher that owns it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::Notify;

/// Shortest sleep between wake-ups; above ~20k msg/s publishers are woken in batches instead.
const MIN_TICK: Duration = Duration::from_micros(50);

/// The global schedule: message `g` (over all publishers) is due at `start + g / rate` and belongs
/// to publisher `g % publishers` — the same schedule the publishers compute for themselves.
#[derive(Debug, Clone, Copy)]
pub struct PacePlan {
    /// Time zero of the run.
    pub epoch: Instant,
    /// First scheduled send, ns after `epoch`.
    pub start_ns: u64,
    /// No sends are scheduled at or after this, ns after `epoch`.
    pub end_ns: u64,
    /// Total offered messages per second (> 0).
    pub rate: f64,
}

/// A running pacer thread; stops at the end of the schedule or when dropped.
#[derive(Debug)]
pub struct Pacer {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Pacer {
    /// Starts waking `wakers[i]` whenever publisher `i` has a message due.
    pub fn start(plan: PacePlan, wakers: Vec<Arc<Notify>>) -> std::io::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("corvid-bench-pacer".into())
            .spawn(move || run(plan, &wakers, &flag))?;
        Ok(Pacer {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Pacer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Index of the last message due at `now_ns` (None before the first), per [`PacePlan`].
pub fn last_due(plan: &PacePlan, now_ns: u64) -> Option<u64> {
    if now_ns < plan.start_ns {
        return None;
    }
    Some(((now_ns - plan.start_ns) as f64 * plan.rate / 1e9) as u64)
}

fn run(plan: PacePlan, wakers: &[Arc<Notify>], stop: &AtomicBool) {
    let n = wakers.len() as u64;
    if n == 0 || plan.rate <= 0.0 || !plan.rate.is_finite() {
        return;
    }
    let now_ns = || u64::try_from(plan.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX);
    let mut woken: Option<u64> = None;
    while !stop.load(Ordering::Relaxed) {
        let now = now_ns();
        if now >= plan.end_ns {
            break;
        }
        if let Some(due) = last_due(&plan, now) {
            let from = woken.map_or(0, |w| w + 1);
            if due >= from {
                if due - from + 1 >= n {
                    wakers.iter().for_each(|w| w.notify_one());
                } else {
                    (from..=due).for_each(|g| wakers[(g % n) as usize].notify_one());
                }
                woken = Some(due);
            }
        }
        let next_g = woken.map_or(0, |w| w + 1);
        let next_ns = plan.start_ns + (next_g as f64 * 1e9 / plan.rate) as u64;
        let wait = Duration::from_nanos(next_ns.saturating_sub(now_ns())).max(MIN_TICK);
        std::thread::sleep(wait.min(Duration::from_millis(100)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_index_matches_the_rate() {
        let plan = PacePlan {
            epoch: Instant::now(),
            start_ns: 1_000,
            end_ns: u64::MAX,
            rate: 1000.0,
        };
        assert_eq!(last_due(&plan, 999), None);
        assert_eq!(last_due(&plan, 1_000), Some(0));
        assert_eq!(last_due(&plan, 1_000 + 999_999), Some(0));
        assert_eq!(last_due(&plan, 1_000 + 1_000_000), Some(1));
    }

    #[test]
    fn wakes_each_publisher_close_to_its_turn() {
        let epoch = Instant::now();
        let plan = PacePlan {
            epoch,
            start_ns: 5_000_000,
            end_ns: 45_000_000,
            rate: 200.0,
        };
        let wakers: Vec<_> = (0..2).map(|_| Arc::new(Notify::new())).collect();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let _pacer = Pacer::start(plan, wakers.clone()).expect("pacer");
        // Publisher 1's first message is global index 1, due at 5 ms + 5 ms.
        let woke_at = rt.block_on(async {
            wakers[1].notified().await;
            epoch.elapsed()
        });
        assert!(
            woke_at >= Duration::from_millis(10),
            "woke too early: {woke_at:?}"
        );
        // Generous: CI machines are shared; this guards against "never" or "only on the next tick".
        assert!(
            woke_at < Duration::from_millis(500),
            "woke too late: {woke_at:?}"
        );
    }
}
