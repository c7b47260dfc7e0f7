//! LoRA files: the kohya format HyperLoRA produces ([`KohyaLora`], read and written), and
//! reading other LoRA layouts (kohya diffusers/SGM names, text-encoder LoRAs, PEFT, old
//! diffusers; LoCon and LyCORIS LoHa / LoKr / full-difference modules) into one representation
//! for application ([`read_lora_file`] → [`ParsedLora`], each module's [`LoraUpdate`]).
//!
//! SGM-named LoRA modules are mapped with the single-file checkpoint table
//! ([`crate::weights::sgm_names`]) through [`names::sgm_to_diffusers`].

pub mod apply;
pub mod format;
pub mod lycoris;
pub mod names;
pub mod per_sample;
pub mod update;

pub use apply::{LayerMut, LoraMerger, LoraTarget, MergeTarget};
pub use format::{KohyaLora, LoraWeights};
pub use names::{
    kohya_to_module, module_to_kohya, parse_lora, read_lora_file, sgm_to_diffusers,
    summarize_skipped, LoraComponent, LoraLayer, LoraNaming, ParsedLora, SkippedKey,
};
pub use per_sample::{forward_linear, forward_linear_residual, RowLoras, SampleAdapters};
pub use update::LoraUpdate;
