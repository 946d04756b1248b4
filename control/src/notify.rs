//! systemd's service readiness protocol (`sd_notify(3)`): state lines such as `READY=1` sent as
//! one datagram to the unix socket `$NOTIFY_SOCKET` names (a path, or an abstract name written
//! with a leading `@`). Without that variable (not started by systemd, or not `Type=notify`)
//! every call does nothing. The socket is connected when the notifier is made, while the
//! engine may still reach it; children never see the variable.
use std::os::unix::net::UnixDatagram;

/// A connection to the service manager, or none.
#[derive(Debug, Default)]
pub struct Notifier(Option<UnixDatagram>);

impl Notifier {
    /// Connects to `$NOTIFY_SOCKET` if it is set (and unsets it, so no VMM inherits it). An
    /// address that cannot be reached is an error: a unit that waits for readiness would
    /// otherwise time out with no word why.
    pub fn from_env() -> Result<Self, String> {
        let Some(path) = std::env::var_os("NOTIFY_SOCKET") else { return Ok(Self(None)) };
        std::env::remove_var("NOTIFY_SOCKET");
        Self::connect(&path)
            .map(|s| Self(Some(s)))
            .map_err(|e| format!("NOTIFY_SOCKET {}: {e}", path.to_string_lossy()))
    }

    fn connect(path: &std::ffi::OsStr) -> std::io::Result<UnixDatagram> {
        use std::os::unix::ffi::OsStrExt;
        let sock = UnixDatagram::unbound()?;
        let bytes = path.as_bytes();
        match bytes.strip_prefix(b"@") {
            #[cfg(target_os = "linux")]
            Some(name) => {
                use std::os::linux::net::SocketAddrExt;
                sock.connect_addr(&std::os::unix::net::SocketAddr::from_abstract_name(name)?)?;
            }
            _ => sock.connect(path)?,
        }
        Ok(sock)
    }

    /// True when a service manager listens.
    pub fn active(&self) -> bool {
        self.0.is_some()
    }

    /// Sends state lines (`READY=1`, `RELOADING=1`, `STOPPING=1`, `STATUS=...`), newline
    /// separated; a failure is ignored (the manager may be gone; the engine goes on).
    pub fn send(&self, state: &str) {
        if let Some(s) = &self.0 {
            let _ = s.send(state.as_bytes());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_reach_the_socket_path_and_abstract_names() {
        let dir = std::env::temp_dir().join(format!("omerta-notify-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify");
        let manager = UnixDatagram::bind(&path).unwrap();
        let n = Notifier(Some(Notifier::connect(path.as_os_str()).unwrap()));
        n.send("READY=1\nSTATUS=serving 2 VMs");
        let mut b = [0u8; 64];
        let k = manager.recv(&mut b).unwrap();
        assert_eq!(&b[..k], b"READY=1\nSTATUS=serving 2 VMs");
        assert!(Notifier::connect(dir.join("nobody-listens").as_os_str()).is_err());
        let _ = std::fs::remove_dir_all(dir);
        Notifier::default().send("READY=1");
        assert!(!Notifier::default().active());
    }
}
