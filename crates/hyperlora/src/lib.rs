//! hyperlora engine: SDXL, face analysis and the HyperLoRA identity hypernetwork on candle.
//!
//! No Node.js in here: `crates/hyperlora-node` wraps this crate for JavaScript.

pub mod clip;
pub mod cpu;
pub mod cuda;
pub mod detailer;
pub mod device;
pub mod error;
pub mod face;
pub mod hypernet;
pub mod identity;
pub mod image;
pub mod instantid;
pub mod lora;
pub mod memory;
pub mod score;
pub mod sdxl;
pub mod session;
pub mod task;
pub mod weights;

#[cfg(test)]
pub(crate) mod testing;

// Lets the test helpers shared with `tests/parity/` name the engine `hyperlora::` here too.
#[cfg(test)]
extern crate self as hyperlora;

pub use error::{Error, ErrorCode, Result};
pub use task::{CancelToken, Progress, Stage};
