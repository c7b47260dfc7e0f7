//! What one LoRA module does to its layer's weight, in each form files store it, and how that
//! `ΔW` is checked against a layer and rebuilt for merging.

use candle_core::{DType, Device, Tensor};

use super::lycoris::{Loha, Lokr};
use crate::Result;

/// A module's weight update `ΔW` (before `weight · scale`).
#[derive(Debug, Clone)]
pub enum LoraUpdate {
    /// LoRA / LoCon (kohya, PEFT, diffusers): `ΔW = up @ down`. Linear: down `[r, in]`, up
    /// `[out, r]`. Convolution (LoCon): down `[r, in, kh, kw]`, up `[out, r, 1, 1]`, i.e.
    /// `ΔW = (up[:, :, 0, 0] @ down.reshape(r, in·kh·kw)).reshape(out, in, kh, kw)`.
    LowRank { down: Tensor, up: Tensor },
    /// LoCon in Tucker (CP) form, LyCORIS `LoConModule` with `use_tucker`: down `[r, in, 1, 1]`,
    /// mid `[r, r, kh, kw]`, up `[out, r, 1, 1]`;
    /// `ΔW = einsum("i j k l, j r, p i -> p r k l", mid, down, up)` (as ComfyUI applies it), scale
    /// `alpha / r` with `r = down.shape[0]`.
    LoConTucker {
        down: Tensor,
        mid: Tensor,
        up: Tensor,
    },
    /// LyCORIS LoHa (see [`Loha`]).
    LoHa(Loha),
    /// LyCORIS LoKr (see [`Lokr`]).
    LoKr(Lokr),
    /// A full difference (LyCORIS `full`, kohya/ComfyUI `diff`): `ΔW = diff`, and the bias
    /// `Δb = diff_b` when given; scale 1.
    Full {
        diff: Tensor,
        diff_b: Option<Tensor>,
    },
}

impl LoraUpdate {
    /// The short name messages use.
    pub fn kind(&self) -> &'static str {
        match self {
            LoraUpdate::LowRank { down, .. } if down.rank() == 4 => "LoCon",
            LoraUpdate::LowRank { .. } => "LoRA",
            LoraUpdate::LoConTucker { .. } => "LoCon (Tucker)",
            LoraUpdate::LoHa(_) => "LoHa",
            LoraUpdate::LoKr(_) => "LoKr",
            LoraUpdate::Full { .. } => "diff",
        }
    }

    /// The rank a file's `alpha` is divided by; `None` where the form has no such scale (a LoKr
    /// with both factors whole, a full difference).
    pub fn rank(&self) -> Option<usize> {
        match self {
            LoraUpdate::LowRank { down, .. } | LoraUpdate::LoConTucker { down, .. } => {
                down.dims().first().copied()
            }
            LoraUpdate::LoHa(h) => Some(h.rank()),
            LoraUpdate::LoKr(k) => k.rank(),
            LoraUpdate::Full { .. } => None,
        }
    }

    /// The `(down, up)` pair of a LoRA / LoCon update.
    pub fn low_rank(&self) -> Option<(&Tensor, &Tensor)> {
        match self {
            LoraUpdate::LowRank { down, up } => Some((down, up)),
            _ => None,
        }
    }

    /// The shape of `ΔW` as the file gives it: `[out, in]` or `[out, in, kh, kw]` (LoHa and
    /// LoKr store convolutions flattened as `[out, in·kh·kw]` unless in Tucker form). `None`
    /// for a low-rank pair that does not compose (parsing refuses those).
    pub fn delta_dims(&self) -> Option<Vec<usize>> {
        match self {
            LoraUpdate::LowRank { down, up } => {
                let mut d = vec![*up.dims().first()?];
                d.extend_from_slice(down.dims().get(1..)?);
                Some(d)
            }
            LoraUpdate::LoConTucker { down, mid, up } => {
                let (kh, kw) = (*mid.dims().get(2)?, *mid.dims().get(3)?);
                Some(vec![*up.dims().first()?, *down.dims().get(1)?, kh, kw])
            }
            LoraUpdate::LoHa(h) => h.validate("").ok(),
            LoraUpdate::LoKr(k) => k.validate("").ok(),
            LoraUpdate::Full { diff, .. } => Some(diff.dims().to_vec()),
        }
    }

    /// Whether `ΔW` fits a weight of shape `weight` (`[out, in]` Linear, `[out, in, kh, kw]`
    /// convolution): same output rows, and either the same full shape (a Linear counting as a
    /// 1×1 convolution) or a flattened `[out, in·kh·kw]` — the reshape LyCORIS, ComfyUI and
    /// A1111 apply.
    pub fn fits(&self, weight: &[usize]) -> bool {
        let Some(d) = self.delta_dims() else {
            return false;
        };
        let target: [usize; 4] = match *weight {
            [o, i] => [o, i, 1, 1],
            [o, i, kh, kw] => [o, i, kh, kw],
            _ => return false,
        };
        let flat = target[1] * target[2] * target[3];
        match *d.as_slice() {
            [o, i] => o == target[0] && i == flat,
            [o, i, kh, kw] => [o, i, kh, kw] == target,
            _ => false,
        }
    }

    /// `ΔW` (unscaled) in f32 on `device`, as `[out, in·kh·kw]`.
    pub fn delta_matrix(&self, device: &Device) -> Result<Tensor> {
        let f32 = |t: &Tensor| -> Result<Tensor> { Ok(t.to_device(device)?.to_dtype(DType::F32)?) };
        let delta = match self {
            LoraUpdate::LowRank { down, up } => {
                let r = down.dim(0)?;
                let up = f32(up)?.reshape((up.dim(0)?, r))?;
                up.matmul(&f32(down)?.reshape((r, ()))?)?
            }
            LoraUpdate::LoConTucker { down, mid, up } => {
                // rebuild_tucker's einsum with a = upᵀ [r, out], b = down [r, in].
                let (r_up, r_down) = (up.dim(1)?, down.dim(0)?);
                let up_t = f32(up)?.reshape((up.dim(0)?, r_up))?.t()?;
                let down = f32(down)?.reshape((r_down, ()))?;
                super::lycoris::tucker(&f32(mid)?, &up_t, &down)?
            }
            LoraUpdate::LoHa(h) => h.delta(device)?,
            LoraUpdate::LoKr(k) => k.delta(device)?,
            LoraUpdate::Full { diff, .. } => f32(diff)?,
        };
        let out = delta.dim(0)?;
        Ok(delta.reshape((out, ()))?)
    }

    /// Every tensor of the update (for checks that apply to all of them).
    pub fn tensors(&self) -> Vec<&Tensor> {
        use super::lycoris::KronFactor;
        fn factor(f: &KronFactor) -> Vec<&Tensor> {
            match f {
                KronFactor::Full(w) => vec![w],
                KronFactor::Product { a, b } => vec![a, b],
                KronFactor::Tucker { t, a, b } => vec![t, a, b],
            }
        }
        match self {
            LoraUpdate::LowRank { down, up } => vec![down, up],
            LoraUpdate::LoConTucker { down, mid, up } => vec![down, mid, up],
            LoraUpdate::LoHa(h) => {
                let mut v = vec![&h.w1a, &h.w1b, &h.w2a, &h.w2b];
                if let Some((t1, t2)) = &h.tucker {
                    v.extend([t1, t2]);
                }
                v
            }
            LoraUpdate::LoKr(k) => {
                let mut v = factor(&k.w1);
                v.extend(factor(&k.w2));
                v
            }
            LoraUpdate::Full { diff, diff_b } => {
                let mut v = vec![diff];
                v.extend(diff_b);
                v
            }
        }
    }
}
