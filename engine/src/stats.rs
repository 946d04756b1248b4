//! Per-VM counters.
//!
//! The VM thread owns one [`Counters`] and updates it with plain adds (no atomics, no locks on
//! the packet path); it publishes a copy between batches for the control side to read.
#![forbid(unsafe_code)]

use crate::filter::{DropReason, StrategyStats};
use crate::nat::VmAction;

/// One counter of a VM, as every view names it: the stats JSON, `omertactl stats`, the
/// engine's exit summary and the Prometheus text are all generated from [`COUNTERS`].
#[derive(Debug, Clone, Copy)]
pub struct Counter {
    /// Its name in the stats JSON, `omertactl stats` and the exit summary.
    pub name: &'static str,
    /// Its Prometheus metric, without the `omerta_` prefix.
    pub metric: &'static str,
    /// One sentence: the metric's HELP and the field's documentation.
    pub help: &'static str,
    /// Its value.
    pub get: fn(&Counters, &StrategyStats) -> u64,
}

/// Defines [`Counters`] and [`COUNTERS`] from one list: a new counter is one line here
/// (a strategy's counter is a field of [`StrategyStats`] and a line in its part).
macro_rules! vocabulary {
    (
        counters { $( $field:ident $name:literal $metric:literal $help:literal; )* }
        strategy { $( $sfield:ident $sname:literal $smetric:literal $shelp:literal; )* }
    ) => {
        /// Traffic and drop counters of one VM.
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub struct Counters {
            $( #[doc = $help] pub $field: u64, )*
            /// Drops, indexed by [`DropReason::index`].
            pub drops: [u64; DropReason::COUNT],
        }

        impl Default for Counters {
            fn default() -> Self {
                Self { $( $field: 0, )* drops: [0; DropReason::COUNT] }
            }
        }

        /// Every counter of a VM, in the order the views show them (drops by reason and the
        /// termination reason come after them in each view).
        pub const COUNTERS: &[Counter] = &[
            $( Counter { name: $name, metric: $metric, help: $help, get: |c, _| c.$field }, )*
            $( Counter { name: $sname, metric: $smetric, help: $shelp, get: |_, s| s.$sfield }, )*
        ];
    };
}

vocabulary! {
    counters {
        vm_frames "frames_from_vm" "vm_frames_total" "Frames read from the VM.";
        vm_bytes "bytes_from_vm" "vm_bytes_total" "Bytes of frames read from the VM.";
        forwarded_udp "forwarded_udp" "forwarded_udp_total" "UDP payloads forwarded to a consumer.";
        forwarded_udp_bytes "forwarded_udp_bytes" "forwarded_udp_bytes_total" "Bytes of forwarded UDP payloads.";
        forwarded_icmp "forwarded_icmp" "forwarded_icmp_total" "ICMP echo requests forwarded to a consumer.";
        alias_out "alias_out" "alias_out_total" "UDP payloads the VM sent to its consumer's alias, sent to the endpoint it stands for.";
        alias_in "alias_in" "alias_in_total" "Datagrams from the consumer's endpoint given to the VM from its alias.";
        proofs_accepted "proofs_accepted" "proofs_accepted_total" "Endpoint proofs whose MAC, counter and time verified.";
        endpoint_proved "endpoint_proved" "endpoint_proved_total" "Accepted proofs from a new endpoint: the VM's one endpoint was asked to move there.";
        arp_replies "arp_replies" "arp_replies_total" "ARP replies sent to the VM.";
        dhcp_offers "dhcp_offers" "dhcp_offers_total" "DHCP offers sent to the VM.";
        dhcp_acks "dhcp_acks" "dhcp_acks_total" "DHCP acknowledgements (leases and renewals) sent to the VM.";
        dhcp_naks "dhcp_naks" "dhcp_naks_total" "DHCP refusals sent to the VM (it asked for another address).";
        host_datagrams "host_datagrams" "host_datagrams_total" "Datagrams received from host sockets.";
        to_vm_frames "frames_to_vm" "to_vm_frames_total" "Frames written to the VM (replies and ARP).";
        to_vm_bytes "bytes_to_vm" "to_vm_bytes_total" "Bytes of frames written to the VM.";
        terminations "terminations" "terminations_total" "Policy violations that terminated the VM (0 or 1 per VM lifetime).";
        host_send_errors "host_send_errors" "host_send_errors_total" "Sends to the host that the kernel refused (counted, the loop goes on).";
        vm_send_errors "vm_send_errors" "vm_send_errors_total" "Writes to the VM handle that failed.";
        queue_overflows "queue_overflows" "queue_overflows_total" "Frames lost because an output queue was full or a VM handle stayed full.";
        backpressure_waits "backpressure_waits" "backpressure_waits_total" "Times an output refused more and the loop waited for it to drain.";
    }
    strategy {
        allowlist_checks "allowlist_checks" "allowlist_checks_total" "Packets checked against the allowlist.";
        fast_path "fast_path" "fast_path_total" "Packets passed by the conntrack flow table without an allowlist check.";
        unchecked "unchecked" "unchecked_total" "Packets forwarded unchecked by sampling.";
        evictions "conntrack_evictions" "conntrack_evictions_total" "Flows evicted from a full conntrack table.";
    }
}

/// One line of every counter (`name=value`), the drops by reason and the termination, for
/// logs (the engine's exit summary).
pub fn summary_line(c: &Counters, s: &StrategyStats, terminated: Option<DropReason>) -> String {
    let mut out: Vec<String> = COUNTERS.iter().map(|k| format!("{}={}", k.name, (k.get)(c, s))).collect();
    out.push(format!("dropped={}", c.dropped()));
    out.extend(c.nonzero_drops().map(|(r, n)| format!("drop.{}={n}", r.name())));
    if let Some(r) = terminated {
        out.push(format!("TERMINATED={}", r.name()));
    }
    out.join(" ")
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
            VmAction::DhcpReply(r) => match r.kind {
                crate::wire::DhcpMessage::Offer => self.dhcp_offers += 1,
                crate::wire::DhcpMessage::Nak => self.dhcp_naks += 1,
                _ => self.dhcp_acks += 1,
            },
            VmAction::ForwardUdp { payload, via_alias, .. } => {
                self.alias_out += u64::from(*via_alias);
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
        c.record_vm_frame(
            70,
            &VmAction::ForwardUdp { to: "203.0.113.7:1".parse().unwrap(), payload: b"abc", via_alias: false },
        );
        assert_eq!(c.drops_for(DropReason::EthIpv6), 2);
        assert_eq!(c.drops_for(DropReason::NotAllowed), 1);
        assert_eq!(c.terminations, 1);
        assert_eq!(c.dropped(), 3);
        assert_eq!((c.vm_frames, c.vm_bytes), (4, 280));
        assert_eq!((c.forwarded_udp, c.forwarded_udp_bytes), (1, 3));
        assert_eq!(c.nonzero_drops().count(), 2);
    }

    #[test]
    fn the_vocabulary_names_every_counter_once() {
        let mut names: Vec<&str> = COUNTERS.iter().map(|k| k.name).collect();
        let mut metrics: Vec<&str> = COUNTERS.iter().map(|k| k.metric).collect();
        names.sort_unstable();
        names.dedup();
        metrics.sort_unstable();
        metrics.dedup();
        assert_eq!((names.len(), metrics.len()), (COUNTERS.len(), COUNTERS.len()));
        assert!(COUNTERS.iter().all(|k| k.metric.ends_with("_total") && k.help.ends_with('.')));
        // Each getter reads its own field: set one at a time.
        let line =
            summary_line(&Counters { queue_overflows: 7, ..Counters::default() }, &StrategyStats::default(), None);
        assert!(line.contains("queue_overflows=7") && line.contains("forwarded_udp=0"), "{line}");
    }
}
