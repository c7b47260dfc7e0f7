//! diffusers' GEGLU after a Linear without bias: value · GELU(gate) (exact GELU), the bias
//! added on the way.

use rayon::prelude::*;

use crate::math::{for_cpu, gelu};

/// `h` [M, 2·I] = [value | gate] rows, `bias` [2·I] → `out` [M, I].
pub fn geglu(h: &[f32], bias: &[f32], out: &mut [f32]) {
    let n = bias.len();
    let inner = n / 2;
    assert!(n % 2 == 0 && inner > 0, "GEGLU needs an even, non-empty width");
    assert!(h.len() % n == 0 && out.len() * 2 == h.len(), "h is [M, 2I] and out [M, I]");
    out.par_chunks_mut(inner)
        .zip(h.par_chunks(n))
        .for_each(|(out, h)| geglu_row(h, bias, out));
}

for_cpu! {
    fn geglu_row(h: &[f32], bias: &[f32], out: &mut [f32]) {
        let inner = out.len();
        let (value, gate) = h.split_at(inner);
        let (bv, bg) = bias.split_at(inner);
        let values = value.iter().zip(bv).map(|(v, b)| v + b);
        let gates = gate.iter().zip(bg).map(|(g, b)| g + b);
        for ((o, v), g) in out.iter_mut().zip(values).zip(gates) {
            *o = v * gelu(g);
        }
    }
}
