//! Per-VM counters.
//!
//! The VM thread owns one [`Counters`] and updates it with plain adds (no atomics, no locks on
//! the packet path); it publishes a copy between batches for the control side to read.
#![forbid(unsafe_code)]

use crate::filter::DropReason;
use crate::nat::VmAction;

/// Traffic and drop counters of one VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Counters {
    /// Frames read from the VM.
    pub vm_frames: u64,
    /// Bytes of those frames.
    pub vm_bytes: u64,
    /// UDP payloads forwarded to a consumer.
    pub forwarded_udp: u64,
    /// Bytes of forwarded UDP payloads.
    pub forwarded_udp_bytes: u64,
    /// ICMP echo requests forwarded to a consumer.
    pub forwarded_icmp: u64,
    /// ARP replies sent to the VM.
    pub arp_replies: u64,
    /// Datagrams received from host sockets.
    pub host_datagrams: u64,
    /// Frames written to the VM (replies and ARP).
    pub to_vm_frames: u64,
    /// Bytes of frames written to the VM.
    pub to_vm_bytes: u64,
    /// Policy violations that terminated the VM (0 or 1 per VM lifetime).
    pub terminations: u64,
    /// Sends to the host that the kernel refused (counted, the loop goes on).
    pub host_send_errors: u64,
    /// Writes to the VM handle that failed.
    pub vm_send_errors: u64,
    /// Frames lost because an output queue was full.
    pub queue_overflows: u64,
    /// Times the loop waited for an output to drain (backpressure) instead of dropping.
    pub backpressure_waits: u64,
    /// Drops, indexed by [`DropReason::index`].
    pub drops: [u64; DropReason::COUNT],
}

impl Default for Counters {
    fn default() -> Self {
        Self {
            vm_frames: 0,
            vm_bytes: 0,
            forwarded_udp: 0,
            forwarded_udp_bytes: 0,
            forwarded_icmp: 0,
            arp_replies: 0,
            host_datagrams: 0,
            to_vm_frames: 0,
            to_vm_bytes: 0,
            terminations: 0,
            host_send_errors: 0,
            vm_send_errors: 0,
            queue_overflows: 0,
            backpressure_waits: 0,
            drops: [0; DropReason::COUNT],
        }
    }
}

impl Counters {
    /// Counts one drop.
    #[inline]
    pub fn count_drop(&mut self, reason: DropReason) {
        if let Some(c) = self.drops.get_mut(reason.index()) {
            *c += 1;
        }
    }

    /// Drops for one reason.
    pub fn drops_for(&self, reason: DropReason) -> u64 {
        self.drops.get(reason.index()).copied().unwrap_or(0)
    }

    /// All drops.
    pub fn dropped(&self) -> u64 {
        self.drops.iter().sum()
    }

    /// Counts one frame from the VM of `len` bytes and the action taken on it.
    #[inline]
    pub fn record_vm_frame(&mut self, len: usize, action: &VmAction<'_>) {
        self.vm_frames += 1;
        self.vm_bytes += len as u64;
        match action {
            VmAction::ArpReply(_) => self.arp_replies += 1,
            VmAction::ForwardUdp { payload, .. } => {
                self.forwarded_udp += 1;
                self.forwarded_udp_bytes += payload.len() as u64;
            }
            VmAction::ForwardIcmpEcho { .. } => self.forwarded_icmp += 1,
            VmAction::Drop(r) => self.count_drop(*r),
            VmAction::Terminate(r) => {
                self.terminations += 1;
                self.count_drop(*r);
            }
        }
    }

    /// The non-zero drop counters as `(reason, count)`.
    pub fn nonzero_drops(&self) -> impl Iterator<Item = (DropReason, u64)> + '_ {
        DropReason::ALL.iter().zip(self.drops.iter()).filter(|(_, c)| **c > 0).map(|(r, c)| (*r, *c))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_by_reason() {
        let mut c = Counters::default();
        c.record_vm_frame(60, &VmAction::Drop(DropReason::EthIpv6));
        c.record_vm_frame(60, &VmAction::Drop(DropReason::EthIpv6));
        c.record_vm_frame(90, &VmAction::Terminate(DropReason::NotAllowed));
        c.record_vm_frame(70, &VmAction::ForwardUdp { to: "203.0.113.7:1".parse().unwrap(), payload: b"abc" });
        assert_eq!(c.drops_for(DropReason::EthIpv6), 2);
        assert_eq!(c.drops_for(DropReason::NotAllowed), 1);
        assert_eq!(c.terminations, 1);
        assert_eq!(c.dropped(), 3);
        assert_eq!((c.vm_frames, c.vm_bytes), (4, 280));
        assert_eq!((c.forwarded_udp, c.forwarded_udp_bytes), (1, 3));
        assert_eq!(c.nonzero_drops().count(), 2);
    }
}
