#![no_std]
// The programs live in the `wgtrace` binary target (src/main.rs); this empty
// library only lets host-side tooling resolve the package.
