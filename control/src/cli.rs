//! What every Omerta binary does with its command line before its own work: `--version`, and
//! argh's parse with the exit statuses the help promises (0 for `--help`, 2 for bad usage;
//! argh's own `from_env` exits with 1 for both kinds of mistake).
use std::process::ExitCode;

/// The program's name as invoked (its file name), for messages.
pub fn program() -> String {
    std::env::args()
        .next()
        .and_then(|a| std::path::Path::new(&a).file_name().map(|f| f.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "omerta".into())
}

/// Parses the command line into `T`. `--version` anywhere before `--` prints `NAME VERSION`
/// and exits 0; `--help` prints the help and exits 0; a mistake prints argh's message and
/// exits 2.
pub fn parse<T: argh::FromArgs>() -> T {
    let args: Vec<String> = std::env::args().collect();
    match parse_from(&args) {
        Ok(t) => t,
        Err((text, code)) => {
            if code == ExitCode::SUCCESS {
                println!("{text}");
            } else {
                eprintln!("{text}");
            }
            std::process::exit(if code == ExitCode::SUCCESS { 0 } else { 2 });
        }
    }
}

/// [`parse`] without exiting: `Err((text, status))` for `--version`, `--help` and mistakes.
pub fn parse_from<T: argh::FromArgs>(args: &[String]) -> Result<T, (String, ExitCode)> {
    let name = args
        .first()
        .map(|a| std::path::Path::new(a).file_name().map_or_else(|| a.clone(), |f| f.to_string_lossy().into_owned()));
    let name = name.unwrap_or_else(|| "omerta".into());
    // `--option=value` is `--option value` (argh takes only the second form).
    let mut rest: Vec<&str> = Vec::with_capacity(args.len());
    let mut options = true;
    for a in args.iter().skip(1).map(String::as_str) {
        options &= a != "--";
        match a.split_once('=').filter(|(k, _)| options && k.starts_with("--") && k.len() > 2) {
            Some((k, v)) => rest.extend([k, v]),
            None => rest.push(a),
        }
    }
    if rest.iter().take_while(|a| **a != "--").any(|a| *a == "--version") {
        return Err((format!("{name} {}", env!("CARGO_PKG_VERSION")), ExitCode::SUCCESS));
    }
    T::from_args(&[&name], &rest).map_err(|e| {
        let code = if e.status.is_ok() { ExitCode::SUCCESS } else { ExitCode::from(2) };
        (e.output.trim_end().to_string(), code)
    })
}
