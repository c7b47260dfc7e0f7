//! The LoRA basis bank (docs/hyperlora-model.md §4): resampler tokens → a kohya LoRA.
//!
//! Tokens come in groups of 8 per module (json order); inside a group, pairs for
//! `to_q, to_k, to_v, to_out`, the first of a pair the down coefficients `c_d`, the second the
//! up coefficients `c_u` (length hyper_dim):
//! `lora_down = (Σ_i c_d[i] · down_basis[i])ᵀ` `[rank, in]`,
//! `lora_up = (Σ_i c_u[i] · up_basis[i])ᵀ` `[out, rank]`, `alpha = rank / 2`.

use candle_core::{DType, Tensor};

use super::folder::{ModuleInfo, Proj};
use crate::lora::{KohyaLora, LoraWeights};
use crate::{Error, Result};

/// Which basis set (and rank) to mix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoraKind {
    /// Identity LoRA (`id_*_basis`, rank `lora_rank`).
    Id,
    /// Background/clothes LoRA (`base_*_basis`, rank `lora_rank / 2`).
    Base,
}

impl LoraKind {
    pub fn as_str(self) -> &'static str {
        match self {
            LoraKind::Id => "id",
            LoraKind::Base => "base",
        }
    }
}

/// One projection's bases, flattened for a single matmul each:
/// `down` `[hyper_dim, in × rank]`, `up` `[hyper_dim, rank × out]`.
#[derive(Debug, Clone)]
struct Bases {
    down: Tensor,
    up: Tensor,
    rank: usize,
    in_features: usize,
    out_features: usize,
}

impl Bases {
    fn new(down: &Tensor, up: &Tensor) -> Result<Self> {
        let (h, inp, rank) = down.dims3()?;
        let (_, _, out) = up.dims3()?;
        Ok(Self {
            down: down.reshape((h, inp * rank))?,
            up: up.reshape((h, rank * out))?,
            rank,
            in_features: inp,
            out_features: out,
        })
    }

    /// `c_d`, `c_u`: `[1, hyper_dim]` in the bases' dtype.
    fn mix(&self, c_d: &Tensor, c_u: &Tensor) -> Result<(Tensor, Tensor)> {
        let down = c_d
            .matmul(&self.down)?
            .reshape((self.in_features, self.rank))?
            .t()?
            .contiguous()?;
        let up = c_u
            .matmul(&self.up)?
            .reshape((self.rank, self.out_features))?
            .t()?
            .contiguous()?;
        Ok((down, up))
    }
}

/// All modules' bases.
#[derive(Debug, Clone)]
pub struct LoraBank {
    modules: Vec<ModuleInfo>,
    /// `[module][proj]`.
    id: Vec<[Bases; 4]>,
    base: Option<Vec<[Bases; 4]>>,
    hyper_dim: usize,
    dtype: DType,
}

impl LoraBank {
    /// `bases`: `{i}.{proj}.{id|base}_{down|up}_basis`, validated by the folder loader.
    pub(crate) fn new(
        modules: Vec<ModuleInfo>,
        bases: &std::collections::HashMap<String, Tensor>,
        hyper_dim: usize,
        has_base: bool,
        dtype: DType,
    ) -> Result<Self> {
        let set = |kind: &str| -> Result<Vec<[Bases; 4]>> {
            (0..modules.len())
                .map(|i| {
                    let one = |p: Proj| -> Result<Bases> {
                        let key = |d: &str| format!("{i}.{}.{kind}_{d}_basis", p.file_name());
                        let get = |k: String| {
                            bases
                                .get(&k)
                                .ok_or_else(|| Error::internal(format!("basis {k} not loaded")))
                        };
                        Bases::new(get(key("down"))?, get(key("up"))?)
                    };
                    Ok([one(Proj::Q)?, one(Proj::K)?, one(Proj::V)?, one(Proj::Out)?])
                })
                .collect()
        };
        Ok(Self {
            id: set("id")?,
            base: if has_base { Some(set("base")?) } else { None },
            modules,
            hyper_dim,
            dtype,
        })
    }

    pub fn modules(&self) -> &[ModuleInfo] {
        &self.modules
    }

    pub fn has_base(&self) -> bool {
        self.base.is_some()
    }

    /// Tokens `[1, 8 × modules, hyper_dim]` (any float dtype; cast to the bank's) → LoRA.
    /// Module names are `{json key}_{to_q|to_k|to_v|to_out_0}`.
    pub fn lora(&self, tokens: &Tensor, kind: LoraKind) -> Result<KohyaLora> {
        let q = 8 * self.modules.len();
        let tokens = match tokens.dims() {
            [1, t, h] | [t, h] if *t == q && *h == self.hyper_dim => {
                tokens.reshape((q, self.hyper_dim))?
            }
            other => {
                return Err(Error::invalid_argument(format!(
                    "LoRA tokens must be [1, {q}, {}], got {other:?}",
                    self.hyper_dim
                )))
            }
        };
        let tokens = tokens.to_device(self.device())?.to_dtype(self.dtype)?;
        let set = match kind {
            LoraKind::Id => &self.id,
            LoraKind::Base => self
                .base
                .as_ref()
                .ok_or_else(|| Error::invalid_argument("this HyperLoRA model has no Base-LoRA"))?,
        };
        let mut lora = KohyaLora::new();
        for (i, (m, projs)) in self.modules.iter().zip(set).enumerate() {
            let group = tokens.narrow(0, 8 * i, 8)?;
            for (j, (p, b)) in Proj::ALL.iter().zip(projs).enumerate() {
                let c_d = group.narrow(0, 2 * j, 1)?;
                let c_u = group.narrow(0, 2 * j + 1, 1)?;
                let (down, up) = b.mix(&c_d, &c_u)?;
                lora.insert(
                    format!("{}_{}", m.name, p.kohya_suffix()),
                    LoraWeights {
                        down,
                        up,
                        alpha: b.rank as f32 * 0.5,
                    },
                )?;
            }
        }
        lora.metadata
            .insert("hyperlora_lora_kind".into(), kind.as_str().into());
        Ok(lora)
    }

    fn device(&self) -> &candle_core::Device {
        self.id[0][0].down.device()
    }
}
