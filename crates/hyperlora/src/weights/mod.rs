//! Weight files: safetensors inspection and loading of real checkpoint layouts.

pub mod inspect;

// PyTorch zip checkpoints (`.bin`), read without running code.
pub mod pickle;
pub mod torch_checkpoint;

// Real checkpoint layouts (diffusers folders, single-file SGM checkpoints) and their name table.
pub mod diffusers;
pub mod sgm_names;
pub mod single_file;

pub use diffusers::{Component, ComponentFiles, DiffusersModel};
pub use single_file::{ModelSource, SingleFileCheckpoint};
