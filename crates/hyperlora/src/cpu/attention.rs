//! softmax(q kᵀ · scale) v on the CPU with the heads left interleaved in `[B, S, H·D]`, as the
//! projections produce them and `to_out` reads them: the products read each head in place
//! through strides, so no head is split out or merged back.

use std::cell::RefCell;

use candle_core::Tensor;
use rayon::prelude::*;

use super::gemm::{sgemm, Epilogue, MatRef};
use super::math::{exp, for_cpu};

/// Scores kept at once per task (f32: 256 KiB, L2-sized); longer rows take fewer queries.
const SCORE_BLOCK: usize = 1 << 16;

thread_local! {
    static SCORES: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// `q` [B, Sq, H·D], `k`/`v` [B, Sk, H·D] → [B, Sq, H·D].
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    scale: f64,
) -> candle_core::Result<Option<Tensor>> {
    if !super::applies(q) || !super::applies(k) || !super::applies(v) || q.rank() != 3 {
        return Ok(None);
    }
    let (b, sq, hd) = q.dims3()?;
    let (kb, sk, khd) = k.dims3()?;
    if heads == 0 || hd % heads != 0 || (kb, khd) != (b, hd) || v.dims() != k.dims() || sk == 0 {
        return Ok(None);
    }
    let d = hd / heads;
    // Enough tasks to keep every thread busy, each with a bounded score block.
    let rows = (SCORE_BLOCK / sk)
        .min((b * sq).div_ceil(4 * super::threads()))
        .clamp(1, sq.max(1));
    let scale = scale as f32;
    let mut out = vec![0f32; b * sq * hd];
    super::with_f32(q, |q| {
        super::with_f32(k, |k| {
            super::with_f32(v, |v| {
                out.par_chunks_mut(sq * hd).enumerate().for_each(|(bi, out)| {
                    let (k, v) = (&k[bi * sk * hd..], &v[bi * sk * hd..]);
                    out.par_chunks_mut(rows * hd).enumerate().for_each(|(ci, out)| {
                        let q0 = bi * sq + ci * rows;
                        let r = out.len() / hd;
                        let q = &q[q0 * hd..(q0 + r) * hd];
                        SCORES.with_borrow_mut(|scores| {
                            scores.resize(r * sk, 0.0);
                            for h in 0..heads {
                                let one = Epilogue::default();
                                let (qh, kh, vh) = (&q[h * d..], &k[h * d..], &v[h * d..]);
                                // scores [r, Sk] = q_h [r, D] · k_hᵀ [D, Sk]
                                let kt = MatRef::new(kh, d, sk, 1, hd);
                                sgemm(1, r, sk, d, MatRef::new(qh, r, d, hd, 1), kt, scores, sk, one);
                                for row in scores.chunks_exact_mut(sk) {
                                    softmax(row, scale);
                                }
                                // out_h [r, D] = P [r, Sk] · v_h [Sk, D], into the head's columns.
                                let vm = MatRef::new(vh, sk, d, hd, 1);
                                sgemm(1, r, d, sk, MatRef::rows(scores, r, sk), vm, &mut out[h * d..], hd, one);
                            }
                        });
                    });
                });
            })
        })
    })???;
    Ok(Some(super::tensor(out, (b, sq, hd))?))
}

for_cpu! {
    /// softmax(row · scale) in place.
    fn softmax(row: &mut [f32], scale: f32) {
        let max = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
        let mut sum = 0f32;
        for x in row.iter_mut() {
            *x = exp((*x - max) * scale);
            sum += *x;
        }
        let inv = 1.0 / sum;
        for x in row.iter_mut() {
            *x *= inv;
        }
    }
}
