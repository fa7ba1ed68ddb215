//! Loss and duplicate accounting: each subscriber keeps one bitset of seen sequence numbers per
//! publisher, so after the run "delivered unique" is exact and can be compared with what the
//! publishers say they sent.

/// Sequence numbers above this are treated as corrupt rather than growing a huge bitset.
pub const MAX_SEQ: u64 = 1 << 34;

/// Outcome of observing one delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Observation {
    /// First time this (publisher, seq) reached this subscriber.
    First,
    /// Seen before: the broker delivered it again.
    Duplicate,
    /// Sequence number out of range: not a message this run produced.
    Invalid,
}

/// Set of sequence numbers seen from one publisher.
#[derive(Debug, Clone, Default)]
pub struct SeqSet {
    words: Vec<u64>,
    unique: u64,
}

impl SeqSet {
    /// Marks `seq` as seen; returns whether it was new.
    pub fn insert(&mut self, seq: u64) -> Observation {
        if seq >= MAX_SEQ {
            return Observation::Invalid;
        }
        let word = (seq / 64) as usize;
        if word >= self.words.len() {
            // Grow geometrically so a steady stream costs amortised O(1).
            let want = (word + 1).max(self.words.len() * 2);
            self.words.resize(want, 0);
        }
        let bit = 1u64 << (seq % 64);
        if self.words[word] & bit != 0 {
            return Observation::Duplicate;
        }
        self.words[word] |= bit;
        self.unique += 1;
        Observation::First
    }

    /// Number of distinct sequence numbers seen.
    pub fn unique(&self) -> u64 {
        self.unique
    }

    /// Sequence numbers below `upto` that were never seen, as half-open ranges (for diagnosing
    /// where a broker lost messages: at the start, in bursts, or at the end).
    pub fn gaps(&self, upto: u64) -> Vec<(u64, u64)> {
        let mut gaps = Vec::new();
        let mut start = None;
        for seq in 0..upto.min(MAX_SEQ) {
            let word = (seq / 64) as usize;
            let seen = self
                .words
                .get(word)
                .is_some_and(|w| w & (1 << (seq % 64)) != 0);
            match (seen, start) {
                (false, None) => start = Some(seq),
                (true, Some(s)) => {
                    gaps.push((s, seq));
                    start = None;
                }
                _ => {}
            }
        }
        if let Some(s) = start {
            gaps.push((s, upto));
        }
        gaps
    }
}

/// Everything one subscriber received, by publisher.
#[derive(Debug, Clone, Default)]
pub struct Ledger {
    streams: Vec<SeqSet>,
    duplicates: u64,
    invalid: u64,
}

impl Ledger {
    /// Largest publisher index accepted; a guard against corrupt payloads allocating memory.
    pub const MAX_PUBLISHERS: u32 = 1 << 20;

    /// Records one delivery from `publisher` with sequence `seq`.
    pub fn observe(&mut self, publisher: u32, seq: u64) -> Observation {
        if publisher >= Self::MAX_PUBLISHERS {
            self.invalid += 1;
            return Observation::Invalid;
        }
        let idx = publisher as usize;
        if idx >= self.streams.len() {
            self.streams.resize_with(idx + 1, SeqSet::default);
        }
        let obs = self.streams[idx].insert(seq);
        match obs {
            Observation::Duplicate => self.duplicates += 1,
            Observation::Invalid => self.invalid += 1,
            Observation::First => {}
        }
        obs
    }

    /// Distinct messages received, all publishers together.
    pub fn unique(&self) -> u64 {
        self.streams.iter().map(SeqSet::unique).sum()
    }

    /// The per-publisher set, if anything from `publisher` arrived.
    pub fn stream(&self, publisher: u32) -> Option<&SeqSet> {
        self.streams.get(publisher as usize)
    }

    /// Deliveries that repeated an already seen message.
    pub fn duplicates(&self) -> u64 {
        self.duplicates
    }

    /// Deliveries whose header was out of range.
    pub fn invalid(&self) -> u64 {
        self.invalid
    }
}

/// Run-wide delivery totals derived from publishers' and subscribers' counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct DeliveryTotals {
    /// Deliveries the run should have produced: each sent message times its matching subscribers.
    pub expected: u64,
    /// Distinct deliveries that arrived.
    pub delivered: u64,
    /// Expected deliveries that never arrived.
    pub lost: u64,
    /// Extra copies of already delivered messages.
    pub duplicates: u64,
}

impl DeliveryTotals {
    /// Combines the expected count with all subscribers' ledgers.
    pub fn from_ledgers<'a>(expected: u64, ledgers: impl IntoIterator<Item = &'a Ledger>) -> Self {
        let (delivered, duplicates) = ledgers
            .into_iter()
            .fold((0, 0), |(u, d), l| (u + l.unique(), d + l.duplicates()));
        DeliveryTotals {
            expected,
            delivered,
            lost: expected.saturating_sub(delivered),
            duplicates,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn duplicates_and_gaps_are_counted() {
        let mut l = Ledger::default();
        for seq in [0, 1, 2, 2, 4, 5, 1] {
            l.observe(0, seq);
        }
        l.observe(1, 0);
        assert_eq!(l.unique(), 6);
        assert_eq!(l.duplicates(), 2);
        let t = DeliveryTotals::from_ledgers(8, [&l]);
        assert_eq!(
            t,
            DeliveryTotals {
                expected: 8,
                delivered: 6,
                lost: 2,
                duplicates: 2
            }
        );
    }

    #[test]
    fn out_of_order_arrival_is_not_loss() {
        let mut l = Ledger::default();
        for seq in (0..1000).rev() {
            assert_eq!(l.observe(7, seq), Observation::First);
        }
        assert_eq!(DeliveryTotals::from_ledgers(1000, [&l]).lost, 0);
    }

    #[test]
    fn gaps_show_where_messages_went_missing() {
        let mut s = SeqSet::default();
        for seq in [0, 1, 4, 5, 9] {
            s.insert(seq);
        }
        assert_eq!(s.gaps(12), vec![(2, 4), (6, 9), (10, 12)]);
        assert_eq!(SeqSet::default().gaps(3), vec![(0, 3)]);
    }

    #[test]
    fn corrupt_headers_do_not_allocate() {
        let mut l = Ledger::default();
        assert_eq!(l.observe(u32::MAX, 0), Observation::Invalid);
        assert_eq!(l.observe(0, u64::MAX), Observation::Invalid);
        assert_eq!(l.invalid(), 2);
        assert_eq!(l.unique(), 0);
    }

    #[test]
    fn totals_sum_over_subscribers() {
        let mut a = Ledger::default();
        let mut b = Ledger::default();
        a.observe(0, 0);
        b.observe(0, 0);
        b.observe(0, 0);
        let t = DeliveryTotals::from_ledgers(2, [&a, &b]);
        assert_eq!((t.delivered, t.lost, t.duplicates), (2, 0, 1));
    }
}
