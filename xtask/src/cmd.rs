//! Running external commands with errors that say what was run.

use std::process::{Command, Output, Stdio};

use anyhow::{Context as _, Result, bail};

/// Runs `program args...`, failing with its stderr when it exits non-zero.
pub fn run(program: &str, args: &[&str]) -> Result<String> {
    let output = output(program, args)?;
    if !output.status.success() {
        // Scripts often send their diagnostics to stdout (`2>&1`): show both.
        bail!(
            "`{} {}` failed ({}): {}{}",
            program,
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim(),
            String::from_utf8_lossy(&output.stdout).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

pub fn output(program: &str, args: &[&str]) -> Result<Output> {
    Command::new(program).args(args).stdin(Stdio::null()).output().with_context(|| {
        format!("running `{program}` (is it installed? `cargo xtask setup` installs what wgtrace needs)")
    })
}

/// Runs a shell snippet, for the few steps that are clearer as shell.
pub fn shell(script: &str) -> Result<String> {
    run("sh", &["-c", script])
}

/// Whether `program` is on PATH.
pub fn have(program: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {program} >/dev/null 2>&1")])
        .status()
        .is_ok_and(|s| s.success())
}
