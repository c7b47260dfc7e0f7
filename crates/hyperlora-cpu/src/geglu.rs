//! GELU-family activations: diffusers' GEGLU after a Linear without bias (value · GELU(gate),
//! exact GELU, the bias added on the way), and GELU / CLIP's quick GELU in place.

use rayon::prelude::*;

use crate::math::{exp, for_cpu, gelu};

/// `h` [M, 2·I] = [value | gate] rows, `bias` [2·I] → `out` [M, I].
pub fn geglu(h: &[f32], bias: &[f32], out: &mut [f32]) {
    let n = bias.len();
    let inner = n / 2;
    assert!(
        n.is_multiple_of(2) && inner > 0,
        "GEGLU needs an even, non-empty width"
    );
    assert!(
        h.len().is_multiple_of(n) && out.len() * 2 == h.len(),
        "h is [M, 2I] and out [M, I]"
    );
    out.par_chunks_mut(inner)
        .zip(h.par_chunks(n))
        .for_each(|(out, h)| geglu_row(h, bias, out));
}

for_cpu! {
    fn geglu_row<M>(h: &[f32], bias: &[f32], out: &mut [f32]) {
        let inner = out.len();
        let (value, gate) = h.split_at(inner);
        let (bv, bg) = bias.split_at(inner);
        let values = value.iter().zip(bv).map(|(v, b)| v + b);
        let gates = gate.iter().zip(bg).map(|(g, b)| g + b);
        for ((o, v), g) in out.iter_mut().zip(values).zip(gates) {
            *o = v * gelu::<M>(g);
        }
    }
}

/// GELU (exact) of every element of `x`, in place.
pub fn gelu_in_place(x: &mut [f32]) {
    x.par_chunks_mut(ACTIVATION_CHUNK).for_each(gelu_chunk);
}

/// CLIP's `quick_gelu`, `x · sigmoid(1.702 x)`, of every element of `x`, in place.
pub fn quick_gelu_in_place(x: &mut [f32]) {
    x.par_chunks_mut(ACTIVATION_CHUNK)
        .for_each(quick_gelu_chunk);
}

/// Elements per task of the in-place activations.
const ACTIVATION_CHUNK: usize = 1 << 14;

for_cpu! {
    fn gelu_chunk<M>(x: &mut [f32]) {
        for v in x.iter_mut() {
            *v = gelu::<M>(*v);
        }
    }
}

for_cpu! {
    fn quick_gelu_chunk<M>(x: &mut [f32]) {
        for v in x.iter_mut() {
            *v /= 1.0 + exp::<M>(-1.702 * *v);
        }
    }
}
