//! `omertactl`'s command line: every command's arguments (argh structs), each with the
//! request it makes, so `--help` and the request of a command are read together.
use std::path::PathBuf;

use api::Request;
use argh::FromArgs;

#[derive(FromArgs)]
/// Control a running omerta-engine over its control socket (--version prints the version).
#[argh(
    example = "Engine and VMs at a glance:\n  {command_name} status\n  {command_name} vm list",
    example = "Replace a VM's allowlist, then watch its counters:\n  {command_name} allow set vm0 203.0.113.7:51820\n  {command_name} stats vm0",
    example = "Capture the next 50 dropped frames of vm0 for Wireshark:\n  {command_name} capture vm0 --dropped /tmp/vm0-dropped.pcap --count 50",
    note = "The socket is $OMERTA_CONTROL, else /run/omerta/engine.sock for root, else\n$XDG_RUNTIME_DIR/omerta/engine.sock. Requests and replies are in docs/control-protocol.md.",
    error_code(2, "bad usage or a request the engine could not parse"),
    error_code(3, "not found: no VM of that name"),
    error_code(4, "refused: the engine understood and said no (bad endpoint, wrong state, not permitted)"),
    error_code(5, "engine not running: nothing answers on the control socket"),
    error_code(1, "any other failure")
)]
pub(crate) struct Top {
    /// the control socket (default: see below)
    #[argh(option)]
    pub(crate) socket: Option<PathBuf>,

    /// print the engine's JSON result instead of text, errors as JSON too (before or after
    /// the command's words)
    #[argh(switch)]
    pub(crate) json: bool,

    #[argh(subcommand)]
    pub(crate) cmd: Cmd,
}

#[derive(FromArgs)]
#[argh(subcommand)]
pub(crate) enum Cmd {
    Status(Status),
    Vm(VmCmd),
    Allow(AllowCmd),
    Stats(Stats),
    Latency(Latency),
    Log(Log),
    Metrics(Metrics),
    Capture(Capture),
}

#[derive(FromArgs)]
/// engine version, uptime, backend and VM count by state
#[argh(subcommand, name = "status")]
pub(crate) struct Status {}

#[derive(FromArgs)]
/// list, show, add, stop or restart VMs
#[argh(subcommand, name = "vm")]
pub(crate) struct VmCmd {
    #[argh(subcommand)]
    pub(crate) sub: VmSub,
}

#[derive(FromArgs)]
#[argh(subcommand)]
// Parsed once per run: the size of `vm start`'s options does not matter.
#[allow(clippy::large_enum_variant)]
pub(crate) enum VmSub {
    List(VmList),
    Show(VmShow),
    Add(VmAdd),
    Start(VmStart),
    Stop(VmStop),
    Restart(VmRestart),
    Resume(VmResume),
    Remove(VmRemove),
}

#[derive(FromArgs)]
/// every VM with its state, mode, handle and allowlist
#[argh(subcommand, name = "list")]
pub(crate) struct VmList {}

#[derive(FromArgs)]
/// one VM in detail
#[argh(subcommand, name = "show")]
pub(crate) struct VmShow {
    /// the VM
    #[argh(positional)]
    pub(crate) name: String,
}

#[derive(FromArgs)]
/// add and start a VM: the same description as omerta-engine --vm (dgram:PATH or stream:PATH
/// handles; fd handles only at engine start)
#[argh(subcommand, name = "add")]
pub(crate) struct VmAdd {
    /// e.g. name=vm1,handle=dgram:/run/omerta/vms/vm1.sock,consumer=203.0.113.7:51820
    #[argh(positional)]
    pub(crate) spec: String,
}

#[derive(FromArgs)]
/// boot a guest (QEMU on Linux) with its NIC on a new engine handle: the description of
/// omerta-engine --vm without handle=, and either a kernel and initrd (the test guest) or a
/// cloud image provisioned for one consumer (--image, --consumer-key, --ssh-key-file)
#[argh(subcommand, name = "start")]
pub(crate) struct VmStart {
    /// e.g. name=vm1,consumer=203.0.113.7:51820,mode=conntrack
    #[argh(positional)]
    pub(crate) spec: String,
    /// the guest kernel: a path (made absolute here, from this directory) or a file name in
    /// the engine's first --image-dir
    #[argh(option)]
    pub(crate) kernel: Option<String>,
    /// the guest initramfs (as --kernel)
    #[argh(option)]
    pub(crate) initrd: Option<String>,
    /// a cloud image directory (disk.raw, vmlinuz, initrd.img, as make image builds it; made
    /// absolute here)
    #[argh(option)]
    pub(crate) image: Option<String>,
    /// the consumer's WireGuard public key (base64), with --image
    #[argh(option)]
    pub(crate) consumer_key: Option<String>,
    /// the consumer's SSH public key file (e.g. ~/.ssh/id_ed25519.pub), with --image
    #[argh(option)]
    pub(crate) ssh_key_file: Option<String>,
    /// the consumer's login in the VM (default omerta), with --image
    #[argh(option)]
    pub(crate) ssh_user: Option<String>,
    /// the VM's tunnel address/prefix (default 10.50.1.2/24), with --image
    #[argh(option)]
    pub(crate) tunnel: Option<String>,
    /// the consumer's tunnel address (default 10.50.1.1), with --image
    #[argh(option)]
    pub(crate) consumer_tunnel: Option<String>,
    /// vCPUs (default 1), with --image
    #[argh(option)]
    pub(crate) cpus: Option<u32>,
    /// dhcp (default) or static (the seed's network-config), with --image
    #[argh(option)]
    pub(crate) network: Option<String>,
    /// guest memory in MiB (default 128; 1024 with --image)
    #[argh(option)]
    pub(crate) memory: Option<u32>,
    /// boot without the guest firewall (defense in depth) rule set
    #[argh(switch)]
    pub(crate) no_firewall: bool,
}

/// A path as the engine must see it: a bare file name stays (the engine looks it up in its
/// image directory); any other relative path is made absolute from this process's directory,
/// since the engine's own directory means nothing here.
pub(crate) fn client_path(p: &str) -> Result<String, String> {
    let path = std::path::Path::new(p);
    if path.is_absolute() || path.components().count() == 1 && !p.starts_with('.') {
        return Ok(p.to_string());
    }
    std::path::absolute(path).map(|a| a.to_string_lossy().into_owned()).map_err(|e| format!("{p}: {e}"))
}

impl VmStart {
    /// The request: a cloud image's typed one, or the description with kernel and initrd.
    pub(crate) fn request(&self) -> Result<Request, String> {
        let image = match self.image.as_deref().map(std::path::absolute).transpose() {
            Ok(i) => i.map(|i| i.to_string_lossy().into_owned()),
            Err(e) => return Err(format!("--image: {e}")),
        };
        let Some(image) = &image else {
            let (Some(k), Some(i)) = (&self.kernel, &self.initrd) else {
                return Err("vm start needs --kernel and --initrd, or --image".into());
            };
            let (k, i) = (client_path(k)?, client_path(i)?);
            return Ok(Request::VmStart(format!(
                "{},kernel={k},initrd={i},memory={}{}",
                self.spec,
                self.memory.unwrap_or(128),
                if self.no_firewall { ",firewall=no" } else { "" }
            )));
        };
        if self.kernel.is_some() || self.initrd.is_some() || self.no_firewall {
            return Err(
                "--image boots the image's own kernel with its own firewall: drop --kernel, --initrd and --no-firewall"
                    .into(),
            );
        }
        let key =
            self.consumer_key.as_deref().ok_or("--image needs --consumer-key (the consumer's WireGuard public key)")?;
        let file =
            self.ssh_key_file.as_deref().ok_or("--image needs --ssh-key-file (the consumer's SSH public key)")?;
        let text = std::fs::read_to_string(file).map_err(|e| format!("{file}: {e}"))?;
        let ssh = control::provision::ssh_public_key(text.lines().next().unwrap_or(""))
            .map_err(|e| format!("{file}: {e}"))?;
        let mut spec = format!("{},image={image},consumer-key={key},ssh-key={}", self.spec, ssh.replacen(' ', ":", 1));
        let opts = [
            ("ssh-user", self.ssh_user.clone()),
            ("tunnel", self.tunnel.clone()),
            ("consumer-tunnel", self.consumer_tunnel.clone()),
            ("cpus", self.cpus.map(|c| c.to_string())),
            ("network", self.network.clone()),
            ("memory", self.memory.map(|m| m.to_string())),
        ];
        for (k, v) in opts {
            if let Some(v) = v {
                spec.push_str(&format!(",{k}={v}"));
            }
        }
        api::ImageStart::parse(&spec).map(|s| Request::VmStartImage(Box::new(s))).map_err(|f| f.message)
    }
}

#[derive(FromArgs)]
/// stop a VM's network and its guest, if the engine started one (its entry stays)
#[argh(subcommand, name = "stop")]
pub(crate) struct VmStop {
    /// the VM
    #[argh(positional)]
    pub(crate) name: String,
}

#[derive(FromArgs)]
/// stop a VM and its guest, if the engine started one, and forget it (its sockets, console and
/// counters go; the name is free again)
#[argh(subcommand, name = "remove")]
pub(crate) struct VmRemove {
    /// the VM
    #[argh(positional)]
    pub(crate) name: String,
}

#[derive(FromArgs)]
/// stop and start a VM again with its description and current allowlist
#[argh(subcommand, name = "restart")]
pub(crate) struct VmRestart {
    /// the VM
    #[argh(positional)]
    pub(crate) name: String,
}

#[derive(FromArgs)]
/// boot a kept guest again from its disk (its VMM ended with its launcher: a reboot)
#[argh(subcommand, name = "resume")]
pub(crate) struct VmResume {
    /// the VM
    #[argh(positional)]
    pub(crate) name: String,
}

#[derive(FromArgs)]
/// show or change a VM's allowlist (changes are atomic for the data plane)
#[argh(subcommand, name = "allow")]
pub(crate) struct AllowCmd {
    #[argh(subcommand)]
    pub(crate) sub: AllowSub,
}

#[derive(FromArgs)]
#[argh(subcommand)]
pub(crate) enum AllowSub {
    List(AllowList),
    Set(AllowSet),
    Add(AllowAdd),
    Remove(AllowRemove),
}

#[derive(FromArgs)]
/// the VM's allowed endpoints
#[argh(subcommand, name = "list")]
pub(crate) struct AllowList {
    /// the VM
    #[argh(positional)]
    pub(crate) name: String,
}

#[derive(FromArgs)]
/// replace the allowlist with these endpoints (none: block everything)
#[argh(subcommand, name = "set")]
pub(crate) struct AllowSet {
    /// the VM
    #[argh(positional)]
    pub(crate) name: String,
    /// IP:PORT endpoints
    #[argh(positional, greedy)]
    pub(crate) endpoints: Vec<String>,
}

#[derive(FromArgs)]
/// add one endpoint
#[argh(subcommand, name = "add")]
pub(crate) struct AllowAdd {
    /// the VM
    #[argh(positional)]
    pub(crate) name: String,
    /// IP:PORT
    #[argh(positional)]
    pub(crate) endpoint: String,
}

#[derive(FromArgs)]
/// remove one endpoint
#[argh(subcommand, name = "remove")]
pub(crate) struct AllowRemove {
    /// the VM
    #[argh(positional)]
    pub(crate) name: String,
    /// IP:PORT
    #[argh(positional)]
    pub(crate) endpoint: String,
}

#[derive(FromArgs)]
/// frames and bytes in and out, drops by reason, forwarded/dropped/terminated counts
#[argh(subcommand, name = "stats")]
pub(crate) struct Stats {
    /// one VM (default: all)
    #[argh(positional)]
    pub(crate) name: Option<String>,
}

#[derive(FromArgs)]
/// per-frame time inside the engine: p50/p90/p99/p99.9/max in microseconds
#[argh(subcommand, name = "latency")]
pub(crate) struct Latency {
    /// one VM (default: all, and all merged)
    #[argh(positional)]
    pub(crate) name: Option<String>,
}

#[derive(FromArgs)]
/// recent blocked traffic (header fields only)
#[argh(subcommand, name = "log")]
pub(crate) struct Log {
    /// one VM (default: all)
    #[argh(positional)]
    pub(crate) name: Option<String>,
}

#[derive(FromArgs)]
/// every counter and histogram in the Prometheus text format
#[argh(subcommand, name = "metrics")]
pub(crate) struct Metrics {}

#[derive(FromArgs)]
/// write the VM's next dropped frames (--dropped FILE), or its next frames both ways
/// (--all FILE), to a pcapng file for Wireshark and tcpdump; each dropped frame's comment
/// says why it was dropped
#[argh(subcommand, name = "capture")]
pub(crate) struct Capture {
    /// the VM
    #[argh(positional)]
    pub(crate) name: String,
    /// the file for dropped frames only
    #[argh(option)]
    pub(crate) dropped: Option<PathBuf>,
    /// the file for every frame: from the VM (forwarded or dropped) and to it
    #[argh(option)]
    pub(crate) all: Option<PathBuf>,
    /// frames to capture, 1..=1000 (default 100)
    #[argh(option, default = "100")]
    pub(crate) count: usize,
    /// bytes kept of each frame, 64..=2048 (default 128: headers, not payloads)
    #[argh(option, default = "128")]
    pub(crate) snaplen: usize,
    /// seconds to wait for the frames (default 10)
    #[argh(option, default = "10")]
    pub(crate) timeout: u64,
}

impl Capture {
    /// The file and whether every frame is wanted; exactly one of --dropped and --all.
    pub(crate) fn target(&self) -> Result<(&PathBuf, bool), String> {
        match (&self.dropped, &self.all) {
            (Some(f), None) => Ok((f, false)),
            (None, Some(f)) => Ok((f, true)),
            _ => Err("capture: give one of --dropped FILE and --all FILE".into()),
        }
    }

    /// The start request, its limits checked here (the file's header states the snaplen).
    pub(crate) fn start(&self) -> Result<Request, String> {
        let (_, all) = self.target()?;
        if !(1..=1000).contains(&self.count) {
            return Err("--count: 1..=1000".into());
        }
        if !(64..=2048).contains(&self.snaplen) {
            return Err("--snaplen: 64..=2048".into());
        }
        Ok(Request::CaptureStart { vm: self.name.clone(), count: self.count, snaplen: self.snaplen, all })
    }
}
