//! `omertactl`: the command-line client of a running `omerta-engine`, by job: `args.rs` every
//! command's arguments and its request, `render.rs` each reply as text, `capture.rs` the
//! capture command; this file turns a command into a request, asks, and reports failures (exit
//! statuses by `api::ClientError::exit_status`).
use std::process::ExitCode;

use api::reply::Reply;
use api::{default_socket_path, Client, Failure, Request};

mod args;
mod capture;
mod render;

use args::{AllowSub, Cmd, Top, VmSub};

/// An endpoint from the command line; a bad one is bad usage (exit 2), said in one line.
fn endpoint(s: &str) -> Result<engine::Endpoint, ExitCode> {
    s.parse().map_err(|e| {
        report(&format!("'{s}': {e}"), 2);
        ExitCode::from(2)
    })
}

/// A request that cannot be encoded: bad usage (exit 2), said in one line.
/// `--json` was given (anywhere): errors are JSON objects on stdout too.
static JSON: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Says what went wrong and gives the exit status: one line on stderr, or with `--json`
/// `{"ok": false, "error": ..., "status": N}` on stdout.
fn report(msg: &str, status: u8) -> ExitCode {
    if JSON.load(std::sync::atomic::Ordering::Relaxed) {
        println!("{}", serde_json::json!({"ok": false, "error": msg, "status": status}));
    } else {
        eprintln!("omertactl: {msg}");
    }
    ExitCode::from(status)
}

fn usage(f: Failure) -> ExitCode {
    report(&f.message, 2)
}

/// Bad usage found here (not by the protocol's encoder): one line, status 2.
fn bad(msg: String) -> ExitCode {
    report(&msg, 2)
}

/// A duration as people read it: `45 s`, `12 min 5 s`, `3 h 20 min`, `2 d 4 h`.
fn ask(client: &mut Client, req: &Request) -> Result<Reply, ExitCode> {
    client.call(req).map_err(|e| report(&e.to_string(), e.exit_status()))
}

/// Endpoints as one line, space-separated.
fn run(top: Top) -> Result<(), ExitCode> {
    let path = top.socket.clone().unwrap_or_else(default_socket_path);
    let connect = || Client::connect(&path).map_err(|e| report(&e.to_string(), 5));
    let json = top.json;
    let (req, as_json): (Request, bool) = match &top.cmd {
        Cmd::Status(_) => (Request::Status, json),
        Cmd::Vm(v) => match &v.sub {
            VmSub::List(_) => (Request::VmList, json),
            VmSub::Show(c) => (Request::VmShow(c.name.clone()), json),
            VmSub::Add(c) => (Request::VmAdd(c.spec.clone()), json),
            VmSub::Start(c) => (c.request().map_err(bad)?, json),
            VmSub::Stop(c) => (Request::VmStop(c.name.clone()), json),
            VmSub::Restart(c) => (Request::VmRestart(c.name.clone()), json),
            VmSub::Resume(c) => (Request::VmResume(c.name.clone()), json),
            VmSub::Remove(c) => (Request::VmRemove(c.name.clone()), json),
        },
        Cmd::Allow(a) => match &a.sub {
            AllowSub::List(c) => (Request::AllowList(c.name.clone()), json),
            AllowSub::Set(c) => {
                let eps = c.endpoints.iter().flat_map(|e| e.split(',')).filter(|e| !e.is_empty()).map(endpoint);
                (Request::AllowSet(c.name.clone(), eps.collect::<Result<_, _>>()?), json)
            }
            AllowSub::Add(c) => (Request::AllowAdd(c.name.clone(), endpoint(&c.endpoint)?), json),
            AllowSub::Remove(c) => (Request::AllowRemove(c.name.clone(), endpoint(&c.endpoint)?), json),
        },
        Cmd::Stats(c) => (Request::Stats(c.name.clone()), json),
        Cmd::Latency(c) => (Request::Latency(c.name.clone()), json),
        Cmd::Log(c) => (Request::Log(c.name.clone()), json),
        Cmd::Metrics(_) => (Request::Metrics, json),
        Cmd::Capture(c) => {
            c.start().map_err(bad)?.line().map_err(usage)?;
            return capture::capture(&mut connect()?, c, json);
        }
    };
    // A request that cannot be sent is bad usage, whether or not an engine listens.
    req.line().map_err(usage)?;
    let r = ask(&mut connect()?, &req)?;
    if as_json {
        println!("{}", r.to_json());
        return Ok(());
    }
    render::print(r);
    Ok(())
}

fn main() -> ExitCode {
    // --json is taken wherever it stands (every command has it), and known before parsing, so
    // that even a parse error comes out as JSON.
    let argv: Vec<String> = std::env::args().collect();
    // Up to `--` only: after it, `--json` is a word like any other (a VM may be named so).
    let end = argv.iter().position(|a| a == "--").unwrap_or(argv.len());
    let json = argv[1.min(end)..end].iter().any(|a| a == "--json");
    JSON.store(json, std::sync::atomic::Ordering::Relaxed);
    let args: Vec<String> = argv
        .iter()
        .enumerate()
        .filter(|(i, a)| *i == 0 || *i >= end || a.as_str() != "--json")
        .map(|(_, a)| a.clone())
        .collect();
    let top: Top = match control::cli::parse_from::<Top>(&args) {
        Ok(mut t) => {
            t.json |= json;
            t
        }
        Err((text, code)) if code == ExitCode::SUCCESS => {
            println!("{text}");
            return code;
        }
        Err((text, _)) => return report(text.lines().next().unwrap_or("bad usage"), 2),
    };
    match run(top) {
        Ok(()) => ExitCode::SUCCESS,
        Err(code) => code,
    }
}
