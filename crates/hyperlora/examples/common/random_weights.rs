//! Random weights of any published configuration, shared by the benchmark examples: the same
//! shapes and compute as real weights, nothing read from disk.

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};

/// Weights made on demand: the initialisation each layer asks for (Kaiming for linears and
/// convolutions, N(0, 1) for embeddings, ones/zeros for norms), drawn in f32 on the device and
/// converted to the model's dtype. Nothing is read from disk.
pub struct RandomWeights;

impl SimpleBackend for RandomWeights {
    fn get(
        &self,
        s: Shape,
        name: &str,
        h: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let h = match h {
            // Loaders that pass no hint (plain `vb.get`): norm scales are ones, matrices
            // scaled normal.
            Init::Const(v) if v == 0.0 && s.rank() == 1 && name.ends_with("weight") => {
                Init::Const(1.0)
            }
            Init::Const(v) if v == 0.0 && s.rank() >= 2 => Init::Randn {
                mean: 0.0,
                stdev: 1.0 / (s.dims()[s.rank() - 1] as f64).sqrt(),
            },
            h => h,
        };
        // detach: a Var would keep the f32 original alive behind the converted copy.
        h.var(s, DType::F32, dev)?
            .into_inner()
            .detach()
            .to_dtype(dtype)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("random weights: {name} requested without a shape")
    }

    fn contains_tensor(&self, _: &str) -> bool {
        false
    }
}

pub fn random_vb(dtype: DType, device: &Device) -> VarBuilder<'static> {
    VarBuilder::from_backend(Box::new(RandomWeights), dtype, device.clone())
}
