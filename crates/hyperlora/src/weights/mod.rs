//! Weight files: safetensors inspection and loading of real checkpoint layouts.

pub mod inspect;
