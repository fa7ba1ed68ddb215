//! The benchmark payload: a small header (publisher, sequence, scheduled and actual send time)
//! padded to the requested size, so subscribers can measure latency, loss and duplicates without
//! any side channel to the publishers.

use bytes::{BufMut, Bytes, BytesMut};

/// Bytes taken by the header (magic 2, reserved 2, publisher 4, seq 8, scheduled 8, send lag 4);
/// the smallest payload the generator can send.
pub const HEADER_LEN: usize = 28;

/// Marker in the first two bytes so foreign messages on the same topics are not miscounted.
const MAGIC: u16 = 0xC0B1;

/// What a subscriber learns from one delivered payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    /// Index of the publishing connection.
    pub publisher: u32,
    /// Per-publisher sequence number, dense from 0.
    pub seq: u64,
    /// When the message was due to be sent (ns since the run's epoch); latency is measured
    /// from here so a stalled publisher cannot hide queueing (coordinated omission).
    pub scheduled_ns: u64,
    /// When the publisher actually encoded it (ns since the run's epoch).
    pub sent_ns: u64,
}

/// Builds payloads of a fixed size, reusing one padding buffer.
#[derive(Debug, Clone)]
pub struct PayloadBuilder {
    size: usize,
    padding: Bytes,
}

impl PayloadBuilder {
    /// A builder for payloads of `size` bytes; `size` is raised to [`HEADER_LEN`] if smaller.
    pub fn new(size: usize) -> Self {
        let size = size.max(HEADER_LEN);
        PayloadBuilder {
            size,
            padding: Bytes::from(vec![b'x'; size - HEADER_LEN]),
        }
    }

    /// The size every payload will have.
    pub fn size(&self) -> usize {
        self.size
    }

    /// Encodes one payload carrying `stamp`.
    pub fn build(&self, stamp: Stamp) -> Bytes {
        let mut buf = BytesMut::with_capacity(self.size);
        buf.put_u16_le(MAGIC);
        buf.put_u16_le(0);
        buf.put_u32_le(stamp.publisher);
        buf.put_u64_le(stamp.seq);
        buf.put_u64_le(stamp.scheduled_ns);
        buf.put_u32_le(delta32(stamp.scheduled_ns, stamp.sent_ns));
        buf.extend_from_slice(&self.padding);
        buf.freeze()
    }
}

/// Send lag fits in 32 bits of nanoseconds (~4.3 s); larger lags saturate, which only matters
/// for the secondary "from actual send" latency of a hopelessly overloaded run.
fn delta32(scheduled: u64, sent: u64) -> u32 {
    u32::try_from(sent.saturating_sub(scheduled)).unwrap_or(u32::MAX)
}

/// Reads the header back; `None` for payloads that are not ours (wrong size or magic).
pub fn parse(payload: &[u8]) -> Option<Stamp> {
    let header = payload.get(..HEADER_LEN)?;
    let u16_at = |i: usize| u16::from_le_bytes([header[i], header[i + 1]]);
    let u32_at =
        |i: usize| u32::from_le_bytes([header[i], header[i + 1], header[i + 2], header[i + 3]]);
    let u64_at = |i: usize| (u64::from(u32_at(i + 4)) << 32) | u64::from(u32_at(i));
    if u16_at(0) != MAGIC {
        return None;
    }
    let scheduled_ns = u64_at(16);
    Some(Stamp {
        publisher: u32_at(4),
        seq: u64_at(8),
        scheduled_ns,
        sent_ns: scheduled_ns + u64::from(u32_at(24)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips() {
        let b = PayloadBuilder::new(100);
        let stamp = Stamp {
            publisher: 3,
            seq: 1 << 40,
            scheduled_ns: 123_456_789_012,
            sent_ns: 123_456_800_000,
        };
        let p = b.build(stamp);
        assert_eq!(p.len(), 100);
        assert_eq!(parse(&p), Some(stamp));
    }

    #[test]
    fn small_sizes_are_raised_to_the_header() {
        let b = PayloadBuilder::new(1);
        assert_eq!(b.size(), HEADER_LEN);
        assert_eq!(
            b.build(Stamp {
                publisher: 0,
                seq: 0,
                scheduled_ns: 0,
                sent_ns: 0
            })
            .len(),
            HEADER_LEN
        );
    }

    #[test]
    fn foreign_payloads_are_rejected() {
        assert_eq!(parse(b"hello"), None);
        assert_eq!(parse(&[0u8; 64]), None);
    }
}
