//! Linux capabilities by name: the few the engine's processes keep, as `capability.h`
//! numbers them. The platform boundary's calls (`sys::keep_capabilities`,
//! `sys::confine_control_thread`) take a set as its bit mask ([`CapSet::bits`]); nothing here
//! changes a capability.

/// A capability, numbered as in `linux/capability.h`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Cap {
    /// `CAP_DAC_READ_SEARCH`: read any file and search any directory (a VMM's /proc/PID/fd).
    DacReadSearch = 2,
    /// `CAP_KILL`: signal another user's processes (VMMs).
    Kill = 5,
    /// `CAP_SETGID`: change gids (start a VMM as its user).
    SetGid = 6,
    /// `CAP_SETUID`: change uids (start a VMM as its user).
    SetUid = 7,
    /// `CAP_NET_BIND_SERVICE`: bind a port below 1024.
    NetBindService = 10,
    /// `CAP_NET_ADMIN`: configure interfaces, routes, firewalls (direct mode's namespaces).
    NetAdmin = 12,
    /// `CAP_NET_RAW`: raw sockets (raw ICMP, `iptables`).
    NetRaw = 13,
    /// `CAP_SYS_PTRACE`: read another user's /proc/PID/fd (a VMM's sockets).
    SysPtrace = 19,
    /// `CAP_SYS_ADMIN`: network namespaces (`unshare`, `ip netns`, `nsenter`).
    SysAdmin = 21,
}

impl Cap {
    /// Its bit in a capability mask.
    pub const fn bit(self) -> u32 {
        1 << self as u32
    }
}

/// A set of capabilities (all below 32, as every [`Cap`] is).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CapSet(u32);

impl CapSet {
    /// No capability.
    pub const EMPTY: CapSet = CapSet(0);

    /// The set of `caps`.
    pub const fn of(caps: &[Cap]) -> CapSet {
        let mut bits = 0;
        let mut i = 0;
        while i < caps.len() {
            bits |= caps[i].bit();
            i += 1;
        }
        CapSet(bits)
    }

    /// The mask `sys`'s capability calls take.
    pub const fn bits(self) -> u32 {
        self.0
    }

    /// Whether `cap` is in the set.
    pub const fn contains(self, cap: Cap) -> bool {
        self.0 & cap.bit() != 0
    }
}

impl From<CapSet> for u64 {
    fn from(set: CapSet) -> u64 {
        u64::from(set.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_the_kernels_numbers() {
        // The numbers of linux/capability.h, which libc mirrors where it has them.
        assert_eq!(Cap::DacReadSearch as u32, 2);
        assert_eq!(Cap::Kill as u32, 5);
        assert_eq!(Cap::SetGid as u32, 6);
        assert_eq!(Cap::SetUid as u32, 7);
        assert_eq!(Cap::NetBindService as u32, 10);
        assert_eq!(Cap::NetAdmin as u32, 12);
        assert_eq!(Cap::NetRaw as u32, 13);
        assert_eq!(Cap::SysPtrace as u32, 19);
        assert_eq!(Cap::SysAdmin as u32, 21);
        let set = CapSet::of(&[Cap::NetRaw, Cap::Kill]);
        assert!(set.contains(Cap::NetRaw) && set.contains(Cap::Kill) && !set.contains(Cap::SysAdmin));
        assert_eq!(CapSet::EMPTY.bits(), 0);
    }
}
