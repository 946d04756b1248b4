//! Verdicts and drop reasons.
//!
//! A drop is a value, not an error: every reason is a fieldless variant that indexes a per-VM
//! counter array ([`DropReason::COUNT`] entries), so counting a drop is one add and never
//! allocates. Names are stable: they appear in counters (`drop_<name>`), logs and the control
//! protocol.

/// What the data plane does with one packet after the policy check.
#[must_use]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Send it on.
    Forward,
    /// Discard it and count the reason; the VM keeps running.
    Drop(DropReason),
    /// A policy violation in a terminating mode (conntrack, sampled): stop the VM.
    Terminate(DropReason),
}

macro_rules! drop_reasons {
    ($($(#[doc = $doc:literal])* $variant:ident => $name:literal,)+) => {
        /// Why a frame or datagram was not forwarded.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        #[repr(u8)]
        pub enum DropReason {
            $($(#[doc = $doc])* $variant,)+
        }

        impl DropReason {
            /// Every reason, in counter-array order.
            pub const ALL: &'static [DropReason] = &[$(DropReason::$variant,)+];
            /// Number of reasons: the length of a per-VM drop counter array.
            pub const COUNT: usize = Self::ALL.len();

            /// Stable snake_case name used in counters, logs and the control protocol.
            pub const fn name(self) -> &'static str {
                match self { $(DropReason::$variant => $name,)+ }
            }

            /// One sentence for operators (the drop reasons table of ARCHITECTURE.md).
            pub const fn description(self) -> &'static str {
                match self { $(DropReason::$variant => concat!($($doc),+),)+ }
            }
        }
    };
}

drop_reasons! {
    /// The frame is shorter than an Ethernet header (14 bytes).
    EthTruncated => "eth_truncated",
    /// The frame is longer than the VM's MTU plus the Ethernet header.
    FrameTooBig => "frame_too_big",
    /// The source MAC is not the VM's own MAC.
    EthSrcSpoofed => "eth_src_spoofed",
    /// A non-ARP frame to a broadcast or multicast MAC.
    EthMulticastDst => "eth_multicast_dst",
    /// A unicast frame to a MAC other than the gateway's (there is no other host on the link).
    EthDstNotGateway => "eth_dst_not_gateway",
    /// An IPv6 frame: the engine forwards IPv4 only.
    EthIpv6 => "eth_ipv6",
    /// A non-IP ethertype (including 802.1Q tags and raw Ethernet protocols).
    EthNotIp => "eth_not_ip",
    /// An ARP packet that is truncated or not IPv4-over-Ethernet.
    ArpMalformed => "arp_malformed",
    /// An ARP operation other than a request (the VM never needs to answer us).
    ArpNotRequest => "arp_not_request",
    /// An ARP request whose sender MAC or IP is not the VM's.
    ArpSpoofed => "arp_spoofed",
    /// An ARP request for an address the VM may not reach (not the gateway nor a consumer).
    ArpUnknownTarget => "arp_unknown_target",
    /// A DHCP client message that is truncated, relayed, not Ethernet's or without a client type.
    DhcpMalformed => "dhcp_malformed",
    /// A DHCP message for another hardware address than the VM's own.
    DhcpForeignClient => "dhcp_foreign_client",
    /// A DHCP request that answers another server (there is none on the VM's link).
    DhcpOtherServer => "dhcp_other_server",
    /// A DHCP message while the VM's DHCP is off (`dhcp=no`).
    DhcpOff => "dhcp_off",
    /// A DHCP release or decline: noted, nothing to answer.
    DhcpNoReply => "dhcp_no_reply",
    /// Fewer bytes than an IPv4 header.
    Ipv4Truncated => "ipv4_truncated",
    /// The IP version field is not 4.
    Ipv4BadVersion => "ipv4_bad_version",
    /// The IHL is below 5 or runs past the total length.
    Ipv4BadIhl => "ipv4_bad_ihl",
    /// The total length is shorter than the header or longer than the frame.
    Ipv4BadTotalLen => "ipv4_bad_total_len",
    /// The IPv4 header checksum does not verify.
    Ipv4BadChecksum => "ipv4_bad_checksum",
    /// An IPv4 fragment (later fragments carry no port, so they cannot be checked).
    Ipv4Fragment => "ipv4_fragment",
    /// The TTL is zero.
    Ipv4TtlZero => "ipv4_ttl_zero",
    /// The source IP is not the VM's own address.
    Ipv4SrcSpoofed => "ipv4_src_spoofed",
    /// The destination is the limited or the subnet-directed broadcast address.
    Ipv4Broadcast => "ipv4_broadcast",
    /// The destination is a multicast address.
    Ipv4Multicast => "ipv4_multicast",
    /// Fewer bytes than a UDP header.
    UdpTruncated => "udp_truncated",
    /// The UDP length is below 8 or longer than the IP payload.
    UdpBadLength => "udp_bad_length",
    /// Fewer bytes than an ICMP echo header.
    IcmpTruncated => "icmp_truncated",
    /// An ICMP message other than an echo request (from the VM) or echo reply (from the host).
    IcmpNotEcho => "icmp_not_echo",
    /// Fewer bytes than a TCP header.
    TcpTruncated => "tcp_truncated",
    /// The destination endpoint is not on the allowlist.
    NotAllowed => "not_allowed",
    /// A transport protocol the engine never forwards (TCP and all but UDP and ICMP echo).
    ProtocolNotAllowed => "protocol_not_allowed",
    /// The VM was terminated for a violation: nothing flows either way any more.
    Terminated => "terminated",
    /// A host datagram from an endpoint that is not on the allowlist.
    InboundNotAllowed => "inbound_not_allowed",
    /// A host datagram from an allowed endpoint before the VM has sent it anything.
    InboundNoFlow => "inbound_no_flow",
    /// A datagram to the consumer's alias while the VM has no consumer endpoint to stand for.
    AliasUnbound => "alias_unbound",
    /// A valid endpoint proof that would move the VM's endpoint again within a second of the
    /// last move (a consumer flapping between sockets); its next proof is taken.
    ProofRate => "proof_rate",
    /// An endpoint proof whose MAC does not verify with the VM's rental key (a forgery).
    ProofBadMac => "proof_bad_mac",
    /// An endpoint proof whose counter is not above the last accepted one (a replay).
    ProofReplayed => "proof_replayed",
    /// An endpoint proof whose counter (the sender's clock) is more than 120 s from the engine's.
    ProofStale => "proof_stale",
    /// A host datagram too large to fit in one frame at the VM's MTU.
    InboundTooBig => "inbound_too_big",
    /// A host datagram placed without room for the frame headers in front of it.
    InboundNoHeadroom => "inbound_no_headroom",
    /// An ICMP echo to an allowed consumer, but the host permits no ICMP socket.
    IcmpUnavailable => "icmp_unavailable",
    /// An echo reply on a raw ICMP socket for a request that was not this VM's (its identifier
    /// is another's): host noise, counted, not logged.
    IcmpForeignReply => "icmp_foreign_reply",
    /// A frame on a `dgram:PATH` handle from a socket other than the VM's own, or a connection
    /// to a `stream:PATH` handle from a uid other than `peer-uid=`.
    ForeignSender => "foreign_sender",
    /// An ICMP echo to an allowed consumer whose connected ICMP socket could not be opened
    /// (out of descriptors, say): the engine has no socket that could send it anywhere.
    NoEgressSocket => "no_egress_socket",
}

impl DropReason {
    /// Position in a counter array of [`DropReason::COUNT`] entries.
    pub const fn index(self) -> usize {
        self as usize
    }
}

impl core::fmt::Display for DropReason {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn indices_follow_all_and_names_are_unique() {
        for (i, r) in DropReason::ALL.iter().enumerate() {
            assert_eq!(r.index(), i);
            assert!(!r.description().is_empty());
        }
        let mut names: Vec<_> = DropReason::ALL.iter().map(|r| r.name()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), DropReason::COUNT);
    }
}
