//! Requests: the typed [`Request`] and its one-line text grammar, which people type
//! (`omertactl`) and the control socket carries. Parsing and encoding only; no sockets here
//! (after Firecracker's `parsed_request.rs`).
//!
//! Requests are words separated by spaces, the same words `omertactl` takes:
//!
//! ```text
//! status
//! vm list | vm show NAME | vm add SPEC | vm start SPEC | vm stop NAME | vm restart NAME
//! allow list NAME | allow set NAME EP[,EP...] | allow add NAME EP | allow remove NAME EP
//! stats [NAME] | latency [NAME] | log [NAME] | metrics
//! capture start NAME COUNT SNAPLEN | capture fetch NAME | capture stop NAME
//! ```
//!
//! Replies: `{"ok":true,"result":...}` or `{"ok":false,"code":"...","error":"..."}` where the
//! code is one of [`ErrorCode`]. docs/control-protocol.md is the reference.
use engine::Endpoint;

use crate::error::Failure;
use crate::image::ImageStart;

/// Longest request line accepted, in bytes (newline excluded).
pub const MAX_REQUEST: usize = 4096;

/// A parsed request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// Engine summary.
    Status,
    /// All VMs.
    VmList,
    /// One VM in detail.
    VmShow(String),
    /// Add and start a VM from a `--vm` description.
    VmAdd(String),
    /// Start a guest and a VM for it: a `--vm` description without `handle`, plus `kernel`,
    /// `initrd`, optional `memory` (MiB) and `firewall=no`.
    VmStart(String),
    /// Start a stock cloud image provisioned for one consumer (`vm start image=...`).
    VmStartImage(Box<ImageStart>),
    /// Stop a VM's network (its worker ends; its entry stays, state `stopped`).
    VmStop(String),
    /// Stop and start again with the same description and current allowlist.
    VmRestart(String),
    /// Boots a kept guest again from its disk (one whose VMM ended with its launcher: a
    /// reboot, a launcher restart).
    VmResume(String),
    /// Stop a VM and its guest and forget it: its sockets, console and counters go.
    VmRemove(String),
    /// The VM's allowlist.
    AllowList(String),
    /// Replace the allowlist.
    AllowSet(String, Vec<Endpoint>),
    /// Add one endpoint.
    AllowAdd(String, Endpoint),
    /// Remove one endpoint.
    AllowRemove(String, Endpoint),
    /// Counters of one VM or all.
    Stats(Option<String>),
    /// Latency percentiles of one VM or all.
    Latency(Option<String>),
    /// Recent blocked traffic of one VM or all.
    Log(Option<String>),
    /// Prometheus text exposition of everything.
    Metrics,
    /// Start capturing the next `count` dropped frames, or with `all` the next `count` frames
    /// either way (at most `snaplen` bytes each).
    CaptureStart {
        /// VM.
        vm: String,
        /// Frames.
        count: usize,
        /// Bytes per frame.
        snaplen: usize,
        /// Both directions, forwarded frames too.
        all: bool,
    },
    /// The frames captured so far.
    CaptureFetch(String),
    /// End a capture early.
    CaptureStop(String),
}

fn bad(msg: impl Into<String>) -> Failure {
    Failure::bad_request(msg)
}

fn endpoint(s: &str) -> Result<Endpoint, Failure> {
    s.parse::<Endpoint>().map_err(|e| bad(format!("'{s}': {e}")))
}

fn number(s: &str, what: &str) -> Result<usize, Failure> {
    s.parse().map_err(|_| bad(format!("{what} '{s}' is not a number")))
}

/// Parses one request line (without its newline).
pub fn parse(line: &str) -> Result<Request, Failure> {
    if line.len() > MAX_REQUEST {
        return Err(bad(format!("request longer than {MAX_REQUEST} bytes")));
    }
    if line.chars().any(|c| c.is_control() && c != '\t') {
        return Err(bad("request contains control characters"));
    }
    let words: Vec<&str> = line.split_whitespace().collect();
    let r = match words.as_slice() {
        ["status"] => Request::Status,
        ["vm", "list"] => Request::VmList,
        ["vm", "show", name] => Request::VmShow((*name).into()),
        ["vm", "add", spec] => Request::VmAdd((*spec).into()),
        ["vm", "start", spec] if ImageStart::names_an_image(spec) => {
            Request::VmStartImage(Box::new(ImageStart::parse(spec)?))
        }
        ["vm", "start", spec] => Request::VmStart((*spec).into()),
        ["vm", "stop", name] => Request::VmStop((*name).into()),
        ["vm", "restart", name] => Request::VmRestart((*name).into()),
        ["vm", "resume", name] => Request::VmResume((*name).into()),
        ["vm", "remove", name] => Request::VmRemove((*name).into()),
        ["allow", "list", name] => Request::AllowList((*name).into()),
        ["allow", "set", name, eps] => Request::AllowSet(
            (*name).into(),
            eps.split(',').filter(|e| !e.is_empty()).map(endpoint).collect::<Result<_, _>>()?,
        ),
        ["allow", "set", name] => Request::AllowSet((*name).into(), Vec::new()),
        ["allow", "add", name, ep] => Request::AllowAdd((*name).into(), endpoint(ep)?),
        ["allow", "remove", name, ep] => Request::AllowRemove((*name).into(), endpoint(ep)?),
        ["stats"] => Request::Stats(None),
        ["stats", name] => Request::Stats(Some((*name).into())),
        ["latency"] => Request::Latency(None),
        ["latency", name] => Request::Latency(Some((*name).into())),
        ["log"] => Request::Log(None),
        ["log", name] => Request::Log(Some((*name).into())),
        ["metrics"] => Request::Metrics,
        ["capture", "start", name, count, snaplen] => Request::CaptureStart {
            vm: (*name).into(),
            count: number(count, "count")?,
            snaplen: number(snaplen, "snaplen")?,
            all: false,
        },
        ["capture", "start", name, count, snaplen, "all"] => Request::CaptureStart {
            vm: (*name).into(),
            count: number(count, "count")?,
            snaplen: number(snaplen, "snaplen")?,
            all: true,
        },
        ["capture", "fetch", name] => Request::CaptureFetch((*name).into()),
        ["capture", "stop", name] => Request::CaptureStop((*name).into()),
        [] => return Err(bad("empty request")),
        [first, ..] => {
            let known = "status, vm, allow, stats, latency, log, metrics, capture";
            let word: String = first.chars().take(32).collect();
            return Err(bad(format!("unknown request '{word}' or wrong arguments (requests: {known})")));
        }
    };
    Ok(r)
}

/// The request line (no newline): the one encoder of requests, for `omertactl`, the engine's
/// tests and anyone else; [`parse`] reads it back to the same value.
impl std::fmt::Display for Request {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let opt = |n: &Option<String>| n.as_ref().map_or(String::new(), |n| format!(" {n}"));
        match self {
            Request::Status => write!(f, "status"),
            Request::VmList => write!(f, "vm list"),
            Request::VmShow(n) => write!(f, "vm show {n}"),
            Request::VmAdd(spec) => write!(f, "vm add {spec}"),
            Request::VmStart(spec) => write!(f, "vm start {spec}"),
            Request::VmStartImage(s) => write!(f, "vm start {s}"),
            Request::VmStop(n) => write!(f, "vm stop {n}"),
            Request::VmRestart(n) => write!(f, "vm restart {n}"),
            Request::VmResume(n) => write!(f, "vm resume {n}"),
            Request::VmRemove(n) => write!(f, "vm remove {n}"),
            Request::AllowList(n) => write!(f, "allow list {n}"),
            Request::AllowSet(n, eps) => {
                let list: Vec<String> = eps.iter().map(ToString::to_string).collect();
                write!(f, "allow set {n}")?;
                if !list.is_empty() {
                    write!(f, " {}", list.join(","))?;
                }
                Ok(())
            }
            Request::AllowAdd(n, ep) => write!(f, "allow add {n} {ep}"),
            Request::AllowRemove(n, ep) => write!(f, "allow remove {n} {ep}"),
            Request::Stats(n) => write!(f, "stats{}", opt(n)),
            Request::Latency(n) => write!(f, "latency{}", opt(n)),
            Request::Log(n) => write!(f, "log{}", opt(n)),
            Request::Metrics => write!(f, "metrics"),
            Request::CaptureStart { vm, count, snaplen, all } => {
                write!(f, "capture start {vm} {count} {snaplen}{}", if *all { " all" } else { "" })
            }
            Request::CaptureFetch(n) => write!(f, "capture fetch {n}"),
            Request::CaptureStop(n) => write!(f, "capture stop {n}"),
        }
    }
}

impl Request {
    /// The request line, checked: a value that [`parse`] would not read back as itself (a name
    /// with a space, a description with a newline, an empty name, a line over
    /// [`MAX_REQUEST`] bytes) is refused here, with the message the engine would have given.
    pub fn line(&self) -> Result<String, Failure> {
        let line = self.to_string();
        match parse(&line) {
            Ok(back) if back == *self => Ok(line),
            Ok(_) => Err(bad("a name or description with spaces (or an empty one) cannot be sent")),
            Err(f) => Err(f),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorCode;

    #[test]
    fn every_request_reads_back_as_it_was_written() {
        let ep: Endpoint = "203.0.113.7:51820".parse().unwrap();
        let all = [
            Request::Status,
            Request::VmList,
            Request::VmShow("a".into()),
            Request::VmAdd("name=a,handle=dgram:/x".into()),
            Request::VmStart("name=a,consumer=203.0.113.7:1,kernel=/k,initrd=/i".into()),
            Request::VmStop("a".into()),
            Request::VmRestart("a".into()),
            Request::VmResume("a".into()),
            Request::VmRemove("a".into()),
            Request::AllowList("a".into()),
            Request::AllowSet("a".into(), vec![ep, ep]),
            Request::AllowSet("a".into(), vec![]),
            Request::AllowAdd("a".into(), ep),
            Request::AllowRemove("a".into(), ep),
            Request::Stats(None),
            Request::Stats(Some("a".into())),
            Request::Latency(None),
            Request::Latency(Some("a".into())),
            Request::Log(None),
            Request::Log(Some("a".into())),
            Request::Metrics,
            Request::CaptureStart { vm: "a".into(), count: 5, snaplen: 128, all: false },
            Request::CaptureStart { vm: "a".into(), count: 5, snaplen: 128, all: true },
            Request::CaptureFetch("a".into()),
            Request::CaptureStop("a".into()),
            Request::VmStartImage(Box::new(image_start())),
            Request::VmStartImage(Box::new(ImageStart {
                dhcp: false,
                mode: Some("conntrack".into()),
                boot_timeout_s: Some(600),
                cpus: 2,
                ..image_start()
            })),
        ];
        for r in all {
            assert_eq!(parse(&r.to_string()), Ok(r.clone()), "{r}");
        }
    }

    const WG_KEY: &str = "wD0XJIBI8Cw+U9mDnz+jNyTXQqTpIiaCjBj8kgNTmTE=";
    const SSH_KEY: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKJGb+MXI3isFSgCCTF1+ZyLntVeIuD9X/phPoWvNPhk";

    fn image_start() -> ImageStart {
        ImageStart::new("a", "/img", "203.0.113.7:51820".parse().unwrap(), WG_KEY, SSH_KEY)
    }

    #[test]
    fn a_cloud_image_start_is_checked_field_by_field() {
        let base = image_start().to_string();
        let minimal = format!(
            "image=/img,name=a,consumer=203.0.113.7:51820,consumer-key={WG_KEY},ssh-key={}",
            SSH_KEY.replacen(' ', ":", 1)
        );
        assert_eq!(parse(&format!("vm start {minimal}")), Ok(Request::VmStartImage(Box::new(image_start()))));
        let bad = |extra: &str, want: &str| match parse(&format!("vm start {minimal},{extra}")) {
            Err(f) => assert!(f.message.contains(want), "{extra}: {}", f.message),
            Ok(r) => panic!("{extra}: accepted {r:?}"),
        };
        bad("cpus=0", "cpus");
        bad("memory=64", "memory");
        bad("network=bridge", "network");
        bad("ssh-user=root", "ssh-user");
        bad("tunnel=10.50.1.2", "tunnel");
        bad("password=x", "unknown key");
        bad("name=b", "twice");
        bad("disk=0", "disk");
        bad("disk=2G", "disk");
        // A disk size reads back as itself.
        let sized = ImageStart { disk_mb: Some(3072), ..image_start() };
        assert_eq!(parse(&format!("vm start {sized}")), Ok(Request::VmStartImage(Box::new(sized))));
        // Keys: a WireGuard key must be 32 bytes of base64, an SSH key must decode.
        let swap = |from: &str, to: &str| parse(&format!("vm start {}", base.replace(from, to)));
        assert!(swap(WG_KEY, "AAAA").unwrap_err().message.contains("consumer-key"));
        assert!(swap("AAAAC3NzaC1lZDI1NTE5AAAAIKJG", "AAAAnope").is_err());
        assert!(swap("ssh-ed25519:", "ssh-dss:").is_err());
        assert!(parse("vm start image=/img,name=a").unwrap_err().message.contains("missing"));
    }

    #[test]
    fn parses_every_request() {
        let ep: Endpoint = "203.0.113.7:51820".parse().unwrap();
        let cases = [
            ("status", Request::Status),
            ("vm list", Request::VmList),
            ("  vm   show  vm0 ", Request::VmShow("vm0".into())),
            ("vm add name=a,handle=dgram:/x", Request::VmAdd("name=a,handle=dgram:/x".into())),
            ("vm start name=a,kernel=/k,initrd=/i", Request::VmStart("name=a,kernel=/k,initrd=/i".into())),
            ("vm stop a", Request::VmStop("a".into())),
            ("vm restart a", Request::VmRestart("a".into())),
            ("vm resume a", Request::VmResume("a".into())),
            ("vm remove a", Request::VmRemove("a".into())),
            ("allow list a", Request::AllowList("a".into())),
            ("allow set a 203.0.113.7:51820,203.0.113.7:51820", Request::AllowSet("a".into(), vec![ep, ep])),
            ("allow set a", Request::AllowSet("a".into(), vec![])),
            ("allow add a 203.0.113.7:51820", Request::AllowAdd("a".into(), ep)),
            ("allow remove a 203.0.113.7:51820", Request::AllowRemove("a".into(), ep)),
            ("stats", Request::Stats(None)),
            ("stats a", Request::Stats(Some("a".into()))),
            ("latency a", Request::Latency(Some("a".into()))),
            ("log", Request::Log(None)),
            ("metrics", Request::Metrics),
            ("capture start a 10 128", Request::CaptureStart { vm: "a".into(), count: 10, snaplen: 128, all: false }),
            ("capture fetch a", Request::CaptureFetch("a".into())),
            ("capture stop a", Request::CaptureStop("a".into())),
        ];
        for (line, want) in cases {
            assert_eq!(parse(line), Ok(want), "{line}");
        }
    }

    #[test]
    fn refuses_garbage_with_a_clear_message() {
        for (line, want) in [
            ("", "empty request"),
            ("reboot", "unknown request 'reboot'"),
            ("vm show", "unknown request 'vm'"),
            ("allow add a nonsense", "'nonsense'"),
            ("capture start a ten 1", "count 'ten'"),
            ("status\u{0}", "control characters"),
        ] {
            let e = parse(line).unwrap_err();
            assert_eq!(e.code, ErrorCode::BadRequest);
            assert!(e.message.contains(want), "{line}: {}", e.message);
        }
        let long = "x".repeat(MAX_REQUEST + 1);
        assert!(parse(&long).unwrap_err().message.contains("longer than"));
    }

    #[test]
    fn a_request_that_would_not_read_back_is_refused_before_it_is_sent() {
        assert_eq!(Request::VmShow("vm0".into()).line().unwrap(), "vm show vm0");
        for r in [
            Request::VmShow("a b".into()),
            Request::VmShow(String::new()),
            Request::VmAdd("name=a,\nhandle=fd:3".into()),
            Request::Stats(Some(String::new())),
            Request::VmAdd("x".repeat(MAX_REQUEST)),
        ] {
            let e = r.line().unwrap_err();
            assert_eq!(e.code, ErrorCode::BadRequest, "{r:?}");
            assert!(!e.message.contains('\n'));
        }
    }
}
