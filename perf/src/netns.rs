//! Named network namespaces a benchmark makes for itself (`ip netns`), inside the private
//! namespace `omerta-perf` seals every run in: made empty (only `lo`), joined by veth pairs
//! the benchmark adds, deleted on drop. [`Named::confined`] is the refusal: it checks that a
//! namespace holds only the interfaces the benchmark put there and no route out, and that
//! every address traffic is sent to is one of the benchmark's own namespaces' addresses.
use std::net::Ipv4Addr;
use std::process::Command;

use crate::command::run;

/// The prefix of every namespace made here: `omerta-perf-TAG-PID`.
const PREFIX: &str = "omerta-perf-";

/// A network namespace made by this process (`/run/netns/NAME`), deleted on drop.
#[derive(Debug)]
pub struct Named {
    name: String,
}

fn ip(args: &[&str]) -> Result<String, String> {
    run(Command::new("ip").args(args))
}

impl Named {
    /// Makes `omerta-perf-TAG-PID` with `lo` up (after deleting what a killed run of ours may
    /// have left, see [`remove_stale`]).
    pub fn add(tag: &str) -> Result<Self, String> {
        remove_stale();
        let name = format!("{PREFIX}{tag}-{}", std::process::id());
        let _ = ip(&["netns", "del", &name]);
        ip(&["netns", "add", &name])?;
        let me = Self { name };
        me.ip(&["link", "set", "lo", "up"])?;
        Ok(me)
    }

    /// Its name (`ip netns`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `ip -n NAME args`: its stdout, or one line naming the command with its stderr.
    pub fn ip(&self, args: &[&str]) -> Result<String, String> {
        run(Command::new("ip").arg("-n").arg(&self.name).args(args))
    }

    /// `program` to be run inside it (through `ip netns exec`, which execs `program`: the
    /// child's pid is the program's).
    pub fn cmd(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }

    /// Runs `f` on a thread inside it: sockets `f` makes stay there, wherever they are used
    /// afterwards.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> Result<T, String> {
        let path = format!("/run/netns/{}", self.name);
        std::thread::spawn(move || {
            let ns = std::fs::File::open(&path).map_err(|e| format!("{path}: {e}"))?;
            sys::enter_network(std::os::fd::AsFd::as_fd(&ns)).map_err(|e| format!("setns {path}: {e}"))?;
            Ok(f())
        })
        .join()
        .map_err(|_| format!("a thread in {} panicked", self.name))?
    }

    /// Its interfaces' names.
    pub fn links(&self) -> Result<Vec<String>, String> {
        Ok(self
            .ip(&["-o", "link", "show"])?
            .lines()
            .filter_map(|l| l.split(": ").nth(1))
            .map(|n| n.split('@').next().unwrap_or(n).to_string())
            .collect())
    }

    /// Its IPv4 addresses.
    pub fn addrs(&self) -> Result<Vec<Ipv4Addr>, String> {
        Ok(self
            .ip(&["-o", "-4", "addr", "show"])?
            .lines()
            .filter_map(|l| l.split_whitespace().skip_while(|w| *w != "inet").nth(1))
            .filter_map(|a| a.split('/').next()?.parse().ok())
            .collect())
    }

    /// Checks that it holds only `lo` and `expected` interfaces and has no default route.
    pub fn confined(&self, expected: &[&str]) -> Result<(), String> {
        let links = self.links()?;
        if let Some(l) = links.iter().find(|l| *l != "lo" && !expected.contains(&l.as_str())) {
            return Err(format!("{} has an interface the benchmark did not make ({l}; all: {links:?})", self.name));
        }
        let default = self.ip(&["-4", "route", "show", "default"])?;
        if !default.trim().is_empty() {
            return Err(format!("{} has a default route ({}); refusing to send", self.name, default.trim()));
        }
        Ok(())
    }
}

impl Drop for Named {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.name]);
    }
}

/// Joins `a` and `b` with a veth pair: `a_if` with `a_addr` (CIDR) in `a`, `b_if` with
/// `b_addr` in `b`, both up. The pair goes when either namespace is deleted.
pub fn veth(a: &Named, a_if: &str, a_addr: &str, b: &Named, b_if: &str, b_addr: &str) -> Result<(), String> {
    a.ip(&["link", "add", a_if, "type", "veth", "peer", "name", b_if, "netns", b.name()])?;
    a.ip(&["addr", "add", a_addr, "dev", a_if])?;
    b.ip(&["addr", "add", b_addr, "dev", b_if])?;
    a.ip(&["link", "set", a_if, "up"])?;
    b.ip(&["link", "set", b_if, "up"])?;
    Ok(())
}

/// Refuses (an `Err` naming it) any of `to` that is not an address of one of `ours`: traffic
/// goes only to namespaces the benchmark made.
pub fn only_to_ours(ours: &[&Named], to: &[Ipv4Addr]) -> Result<(), String> {
    let mut have = Vec::new();
    for n in ours {
        have.extend(n.addrs()?);
    }
    match to.iter().find(|a| !have.contains(a)) {
        Some(a) => Err(format!("{a} is not an address of the benchmark's own namespaces ({have:?}); refusing to send")),
        None => Ok(()),
    }
}

/// Deletes the namespaces `omerta-perf-*-PID` whose process is gone (a run that was killed
/// before its drops ran).
pub fn remove_stale() {
    let Ok(dir) = std::fs::read_dir("/run/netns") else { return };
    for e in dir.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name.strip_prefix(PREFIX).and_then(|r| r.rsplit('-').next()) else { continue };
        if pid.parse::<u32>().is_ok() && !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = ip(&["netns", "del", &name]);
        }
    }
}
