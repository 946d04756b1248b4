//! `omertactl capture`: start, fetch until done or the timeout, write pcapng.
use std::process::ExitCode;
use std::time::{Duration, Instant};

use api::reply::{self, Reply};
use api::{Client, Request};

use crate::args::Capture;
use crate::{ask, bad, report};

/// The typed answer to a capture request (any other shape is the engine's error).
pub(crate) fn captured(r: Reply) -> Result<reply::Captured, ExitCode> {
    match r {
        Reply::Captured(c) => Ok(c),
        _ => Err(report("the engine answered a capture fetch with something else", 1)),
    }
}

pub(crate) fn capture(client: &mut Client, c: &Capture, json: bool) -> Result<(), ExitCode> {
    let start = c.start().map_err(bad)?;
    let (path, all) = c.target().map_err(bad)?;
    let fail = |e: std::io::Error| {
        let hint =
            if e.kind() == std::io::ErrorKind::AlreadyExists { " (it exists: remove it or name another)" } else { "" };
        report(&format!("{}: {e}{hint}", path.display()), 1)
    };
    // Opened before anything is asked: a path that cannot be written fails now, not after the
    // wait. A new file, never through a symlink nor over an existing file (a capture run as
    // root into a shared directory must not let anyone aim it at another file).
    let mut file = {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path)
    }
    .map_err(fail)?;
    let answer = match ask(client, &start) {
        Ok(a) => a,
        Err(code) => {
            let _ = std::fs::remove_file(path);
            return Err(code);
        }
    };
    let snaplen = match answer {
        Reply::CaptureStarted(a) => a.snaplen as u64,
        _ => c.snaplen as u64,
    };
    let deadline = Instant::now() + Duration::from_secs(c.timeout);
    let fetch = Request::CaptureFetch(c.name.clone());
    let mut result = captured(ask(client, &fetch)?)?;
    while !result.done && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
        result = captured(ask(client, &fetch)?)?;
    }
    if !result.done {
        ask(client, &Request::CaptureStop(c.name.clone()))?;
        std::thread::sleep(Duration::from_millis(200));
        result = captured(ask(client, &fetch)?)?;
    }
    let records: Vec<control::pcap::Record> = result
        .frames
        .iter()
        .map(|f| control::pcap::Record {
            unix_us: f.time_us,
            len: f.len,
            bytes: f.bytes(),
            to_vm: f.to_vm,
            dropped: f.dropped.clone(),
        })
        .collect();
    control::pcap::write(&mut file, &c.name, u32::try_from(snaplen).unwrap_or(128), &records).map_err(fail)?;
    let dropped = records.iter().filter(|r| r.dropped.is_some()).count();
    if json {
        println!(
            "{}",
            serde_json::json!({"file": path, "frames": records.len(), "dropped": dropped, "snaplen": snaplen})
        );
    } else if all {
        println!(
            "{} frame(s) of {} ({dropped} dropped, {} to the VM) written to {} (pcapng, {snaplen} bytes of each)",
            records.len(),
            c.name,
            records.iter().filter(|r| r.to_vm).count(),
            path.display()
        );
    } else {
        println!("{} dropped frame(s) of {} written to {} (pcapng)", records.len(), c.name, path.display());
    }
    Ok(())
}
