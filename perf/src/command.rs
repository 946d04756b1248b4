//! Running a program and keeping what it said: the one helper the harnesses (the benchmarks
//! here, the integration tests in `omerta-it`) use to run a command and report its stderr.
use std::process::Command;

/// `cmd` as a line for messages: its program and arguments.
pub fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Runs `cmd` to its end: (exit code, -1 when a signal ended it; stdout; stderr), or why it
/// could not start, naming it.
pub fn output(cmd: &mut Command) -> Result<(i32, String, String), String> {
    let out = cmd.output().map_err(|e| format!("{}: {e}", describe(cmd)))?;
    Ok((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// Runs `cmd`: its stdout when it succeeds, else one message naming it with its stderr.
pub fn run(cmd: &mut Command) -> Result<String, String> {
    let (code, out, err) = output(cmd)?;
    if code == 0 {
        Ok(out)
    } else {
        Err(format!("{} (exit status {code}): {}", describe(cmd), err.trim()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failure_names_the_command_and_keeps_its_stderr() {
        let err = run(Command::new("sh").args(["-c", "echo nope >&2; exit 3"])).unwrap_err();
        assert_eq!(err, "sh -c echo nope >&2; exit 3 (exit status 3): nope");
        assert_eq!(run(Command::new("sh").args(["-c", "echo yes"])).unwrap(), "yes\n");
        assert!(output(&mut Command::new("/nonexistent/x")).unwrap_err().starts_with("/nonexistent/x: "));
    }
}
