//! The CLI's end of a connection to a rented VM's port: [`dial`] asks the daemon
//! (`vm_connect`) and gets either the daemon's own connection, now carrying the VM's bytes (a
//! userspace tunnel), or an address to dial through the tunnel's interface; [`join`] then
//! copies both ways, passing each side's close on as a half close.
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use crate::ipc::{self, Connected, IpcError, Request};

/// A connection to a VM's port.
#[derive(Debug)]
pub enum Conn {
    /// Through the daemon (a userspace tunnel).
    Unix(UnixStream),
    /// Straight through the tunnel's interface.
    Tcp(TcpStream),
}

/// Why a connection could not be made.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    /// The daemon refused or failed.
    #[error(transparent)]
    Ipc(#[from] IpcError),
    /// The address it gave is not one.
    #[error("omertad gave '{0}', not an address")]
    Address(String),
    /// The VM through the interface.
    #[error("{0}: {1}")]
    Tcp(SocketAddr, io::Error),
}

/// Opens a connection to `port` of the rented VM `vm_id`, through the daemon at `socket`.
pub fn dial(socket: &Path, vm_id: &str, port: u16) -> Result<Conn, DialError> {
    let req = Request::VmConnect { vm_id: vm_id.into(), port };
    let (s, how) = ipc::connect(socket, &req, Duration::from_secs(15))?;
    match how {
        Connected::Stream => Ok(Conn::Unix(s)),
        Connected::Direct { address } => {
            let to: SocketAddr =
                address.parse().map_err(|_| DialError::Address(crate::net::printable(&address, 40)))?;
            TcpStream::connect_timeout(&to, Duration::from_secs(10)).map(Conn::Tcp).map_err(|e| DialError::Tcp(to, e))
        }
    }
}

impl Conn {
    fn try_clone(&self) -> io::Result<Self> {
        Ok(match self {
            Self::Unix(s) => Self::Unix(s.try_clone()?),
            Self::Tcp(s) => Self::Tcp(s.try_clone()?),
        })
    }

    /// Says "no more bytes from us" to the VM.
    pub fn close_write(&self) {
        let _ = match self {
            Self::Unix(s) => s.shutdown(std::net::Shutdown::Write),
            Self::Tcp(s) => s.shutdown(std::net::Shutdown::Write),
        };
    }

    /// Bounds each read (for a caller that only peeks at the VM's first bytes).
    pub fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Self::Unix(s) => s.set_read_timeout(t),
            Self::Tcp(s) => s.set_read_timeout(t),
        }
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Self::Unix(s) => s.read(buf),
            Self::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Self::Unix(s) => s.write(buf),
            Self::Tcp(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Copies from `from` to `to` until `from` ends, flushing after each piece (`to` may be a
/// line-buffered stdout: SSH's bytes must not wait for a newline).
fn copy(from: &mut impl Read, to: &mut impl Write) -> io::Result<u64> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0;
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        to.write_all(buf.get(..n).unwrap_or_default())?;
        to.flush()?;
        total += n as u64;
    }
}

/// Joins `conn` to `input` and `output`: `input`'s bytes go to the VM (its end becomes a half
/// close), the VM's come out of `output`, until the VM closes its side. A thread carries
/// `input`, this one the VM's bytes.
pub fn join(conn: Conn, mut input: impl Read + Send + 'static, mut output: impl Write) -> io::Result<()> {
    let mut to_vm = conn.try_clone()?;
    std::thread::Builder::new().name("to-vm".into()).spawn(move || {
        let _ = copy(&mut input, &mut to_vm);
        to_vm.close_write();
    })?;
    let mut from_vm = conn;
    copy(&mut from_vm, &mut output)?;
    Ok(())
}

/// Joins `conn` to a local TCP connection `local` (for `omerta vm forward`): both ways, each
/// close passed on; returns when both directions ended.
pub fn join_tcp(conn: Conn, local: TcpStream) -> io::Result<()> {
    let mut to_vm = conn.try_clone()?;
    let mut from_local = local.try_clone()?;
    let up = std::thread::Builder::new().name("to-vm".into()).spawn(move || {
        let _ = copy(&mut from_local, &mut to_vm);
        to_vm.close_write();
    })?;
    let mut from_vm = conn;
    let mut to_local = local;
    let _ = copy(&mut from_vm, &mut to_local);
    let _ = to_local.shutdown(std::net::Shutdown::Write);
    let _ = up.join();
    Ok(())
}
