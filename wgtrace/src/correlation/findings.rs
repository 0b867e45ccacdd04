//! Findings: what `run` and `check` report per tunnel, built by the same
//! code from the same verdicts.

use serde::Serialize;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    Info,
    Warning,
    Error,
}

#[derive(Clone, Debug, Serialize)]
pub struct Finding {
    pub severity: Severity,
    /// `nested`, `loop`, `mtu`, `no_route`, `no_bypass_mark`, `mark_overlap`, `unreadable`,
    /// `unknown_key` (a misspelt or misplaced key in a `--config` file).
    pub kind: &'static str,
    pub netns: String,
    pub interface: Option<String>,
    pub message: String,
}
