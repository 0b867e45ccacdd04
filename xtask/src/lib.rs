//! Developer tasks for wgtrace (`cargo xtask ...`): toolchain setup, the
//! nesting lab, and the commands the README's quick start runs. The
//! integration tests use the lab through this library.

pub mod bench;
pub mod cmd;
pub mod delay;
pub mod fuzz;
pub mod http;
pub mod lab;
pub mod setup;
pub mod soak;
pub mod speakers_lab;
pub mod vm;
pub mod vmtest;
