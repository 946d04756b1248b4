//! `omerta-man BINARY SECTION`: writes BINARY's man page (roff) on stdout, made from its own
//! `--help` (and each subcommand's, found in the help's `Commands:` list, two levels deep) and
//! `--version`, so the page says what the program says and cannot drift from it. argh, our
//! command-line parser, has no man-page output; help2man would need a Debian package at build
//! time and knows nothing of subcommands. The help text goes into no-fill blocks verbatim:
//! `man` shows it as the program prints it.
use std::process::{Command, ExitCode};

/// The help of `bin` with `args` before `--help`.
fn help(bin: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new(bin).args(args).arg("--help").output().map_err(|e| format!("{bin}: {e}"))?;
    if !out.status.success() {
        return Err(format!("{bin} {} --help: {}", args.join(" "), out.status));
    }
    String::from_utf8(out.stdout).map_err(|_| format!("{bin}: --help is not UTF-8"))
}

/// The commands a help lists under `Commands:` (the first word of each entry).
fn commands(help: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut inside = false;
    for line in help.lines() {
        if line.trim_end() == "Commands:" {
            inside = true;
            continue;
        }
        if inside {
            if !line.starts_with("  ") {
                if !line.trim().is_empty() {
                    break;
                }
                continue;
            }
            // An entry starts at 2 spaces; its wrapped description lines start much further in.
            if !line.starts_with("   ") {
                if let Some(w) = line.split_whitespace().next() {
                    out.push(w.to_string());
                }
            }
        }
    }
    out
}

/// Text made safe for roff: backslashes as `\e`, hyphens as `\-` (so `--help` stays ASCII to
/// copy and paste, not a typographic hyphen), and a line starting with `.` or `'` kept from
/// being read as a request.
fn roff(text: &str) -> String {
    let mut out = String::new();
    for line in text.lines() {
        let l = line.replace('\\', "\\e").replace('-', "\\-");
        if l.starts_with('.') || l.starts_with('\'') {
            out.push_str("\\&");
        }
        out.push_str(&l);
        out.push('\n');
    }
    out
}

fn page(bin: &str, section: &str) -> Result<String, String> {
    let name = std::path::Path::new(bin).file_name().map_or(bin.to_string(), |f| f.to_string_lossy().into_owned());
    let top = help(bin, &[])?;
    let version = Command::new(bin)
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|v| v.split_whitespace().nth(1).map(str::to_string))
        .unwrap_or_default();
    // The description: the help's first paragraph after the usage line.
    let summary = top.split("\n\n").nth(1).unwrap_or("").split_whitespace().collect::<Vec<_>>().join(" ");
    let mut p = String::new();
    p.push_str(&format!(".TH {} {section} \"\" \"Omerta {version}\" \"Omerta manual\"\n", name.to_uppercase()));
    p.push_str(".SH NAME\n");
    p.push_str(&format!("{} \\- {}\n", roff(&name).trim_end(), roff(&summary).trim_end().trim_end_matches('.')));
    p.push_str(".SH DESCRIPTION\nWhat\n.B ");
    p.push_str(&format!("{name} --help\nprints:\n.PP\n.nf\n{}.fi\n", roff(&top)));
    for cmd in commands(&top) {
        let h = help(bin, &[&cmd])?;
        p.push_str(&format!(".SH \"{} {}\"\n.nf\n{}.fi\n", name.to_uppercase(), cmd.to_uppercase(), roff(&h)));
        for sub in commands(&h) {
            let h2 = help(bin, &[&cmd, &sub])?;
            p.push_str(&format!(".SS \"{name} {cmd} {sub}\"\n.nf\n{}.fi\n", roff(&h2)));
        }
    }
    p.push_str(".SH VERSION\n");
    p.push_str(&format!("{name} {version}\n"));
    Ok(p)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [bin, section] = args.as_slice() else {
        eprintln!("usage: omerta-man BINARY SECTION   (writes BINARY's man page, from its --help, on stdout)");
        return ExitCode::from(2);
    };
    match page(bin, section) {
        Ok(p) => {
            print!("{p}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("omerta-man: {e}");
            ExitCode::from(1)
        }
    }
}
