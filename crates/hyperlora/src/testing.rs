//! Helpers for the inline unit tests. They live in `tests/parity/common.rs`, the parity tests'
//! helpers, so that each exists once; this module includes that file and re-exports what the
//! inline tests use.

#[allow(dead_code)]
#[path = "../tests/parity/common.rs"]
mod common;

pub use common::*;
