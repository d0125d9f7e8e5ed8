//! Why a device refused a descriptor chain, and the counts by reason: one vocabulary for
//! every device that checks chains before any I/O (virtio-net, virtio-console).

use super::iov::RangeError;

/// Why a descriptor chain was dropped (returned to the driver with length 0).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChainDrop {
    /// A device-writable descriptor where the device reads, or a readable one where it
    /// writes.
    WrongDirection,
    /// Too few bytes for what the chain must carry: less than virtio-net's 12-byte header;
    /// for virtio-console a receive chain of 0 bytes, a control message shorter than its
    /// 8-byte header or one that does not fit the chain.
    TooShort,
    /// Longer than the device takes in one chain (virtio-net's `MAX_PACKET_LEN`,
    /// virtio-console's `MAX_TX_CHAIN_LEN`).
    TooLong,
    /// A buffer (partly) outside guest RAM.
    OutsideMemory,
    /// More guest memory segments than one `readv`/`writev` takes.
    TooManySegments,
    /// The chain loops, is longer than the queue, or links to a descriptor that does not
    /// exist (virtio-queue stops following it; the rest is missing).
    BrokenLink,
    /// virtio-net TX: a header asking for an offload (checksum, GSO type, ECN) not
    /// negotiated.
    BadOffload,
}

impl From<RangeError> for ChainDrop {
    fn from(e: RangeError) -> Self {
        match e {
            RangeError::OutsideMemory => ChainDrop::OutsideMemory,
            RangeError::TooManySegments => ChainDrop::TooManySegments,
        }
    }
}

/// Dropped chains by reason.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DropCounts {
    /// See [`ChainDrop::WrongDirection`].
    pub wrong_direction: u64,
    /// See [`ChainDrop::TooShort`].
    pub too_short: u64,
    /// See [`ChainDrop::TooLong`].
    pub too_long: u64,
    /// See [`ChainDrop::OutsideMemory`].
    pub outside_memory: u64,
    /// See [`ChainDrop::TooManySegments`].
    pub too_many_segments: u64,
    /// See [`ChainDrop::BrokenLink`].
    pub broken_link: u64,
    /// See [`ChainDrop::BadOffload`].
    pub bad_offload: u64,
}

impl DropCounts {
    /// Counts one dropped chain.
    pub fn count(&mut self, why: ChainDrop) {
        let counter = match why {
            ChainDrop::WrongDirection => &mut self.wrong_direction,
            ChainDrop::TooShort => &mut self.too_short,
            ChainDrop::TooLong => &mut self.too_long,
            ChainDrop::OutsideMemory => &mut self.outside_memory,
            ChainDrop::TooManySegments => &mut self.too_many_segments,
            ChainDrop::BrokenLink => &mut self.broken_link,
            ChainDrop::BadOffload => &mut self.bad_offload,
        };
        *counter += 1;
    }

    /// All dropped chains.
    pub fn total(&self) -> u64 {
        self.wrong_direction
            + self.too_short
            + self.too_long
            + self.outside_memory
            + self.too_many_segments
            + self.broken_link
            + self.bad_offload
    }
}
