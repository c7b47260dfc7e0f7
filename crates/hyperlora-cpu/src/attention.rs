//! softmax(q kᵀ · scale) v with the heads left interleaved in `[B, S, H·D]`, as the projections
//! produce them and `to_out` reads them: the products read each head in place through strides,
//! so no head is split out or merged back.

use std::cell::RefCell;

use rayon::prelude::*;

use crate::gemm::{sgemm, Epilogue, MatRef};
use crate::math::{exp, for_cpu};

/// Scores kept at once per task (f32: 256 KiB, L2-sized); longer rows take fewer queries.
const SCORE_BLOCK: usize = 1 << 16;

thread_local! {
    static SCORES: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// `q` [B, Sq, H·D], `k`/`v` [B, Sk, H·D] (contiguous) → `out` [B, Sq, H·D], one task per
/// image and block of queries on rayon's pool.
#[allow(clippy::too_many_arguments)]
pub fn attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &mut [f32],
    sq: usize,
    sk: usize,
    heads: usize,
    head_dim: usize,
    scale: f32,
) {
    let (d, hd) = (head_dim, heads * head_dim);
    if sq == 0 || hd == 0 {
        return;
    }
    let b = q.len() / (sq * hd);
    assert!(
        q.len() == b * sq * hd && out.len() == q.len(),
        "q and out are [B, Sq, H·D]"
    );
    assert!(
        k.len() == b * sk * hd && v.len() == k.len(),
        "k and v are [B, Sk, H·D]"
    );
    assert!(sk > 0, "attention needs at least one key");
    // Enough tasks to keep every thread busy, each with a bounded score block.
    let rows = (SCORE_BLOCK / sk)
        .min((b * sq).div_ceil(4 * rayon::current_num_threads()))
        .clamp(1, sq);
    out.par_chunks_mut(sq * hd)
        .enumerate()
        .for_each(|(bi, out)| {
            let (k, v) = (&k[bi * sk * hd..], &v[bi * sk * hd..]);
            out.par_chunks_mut(rows * hd)
                .enumerate()
                .for_each(|(ci, out)| {
                    let q0 = bi * sq + ci * rows;
                    let r = out.len() / hd;
                    let q = &q[q0 * hd..(q0 + r) * hd];
                    SCORES.with_borrow_mut(|scores| {
                        scores.resize(r * sk, 0.0);
                        for h in 0..heads {
                            let plain = Epilogue::default();
                            let (qh, kh, vh) = (&q[h * d..], &k[h * d..], &v[h * d..]);
                            // scores [r, Sk] = q_h [r, D] · k_hᵀ [D, Sk]
                            let kt = MatRef::new(kh, d, sk, 1, hd);
                            sgemm(
                                1,
                                r,
                                sk,
                                d,
                                MatRef::new(qh, r, d, hd, 1),
                                kt,
                                scores,
                                sk,
                                plain,
                            );
                            for row in scores.chunks_exact_mut(sk) {
                                softmax(row, scale);
                            }
                            // out_h [r, D] = P [r, Sk] · v_h [Sk, D], into the head's columns.
                            let p = MatRef::rows(scores, r, sk);
                            let vm = MatRef::new(vh, sk, d, hd, 1);
                            sgemm(1, r, d, sk, p, vm, &mut out[h * d..], hd, plain);
                        }
                    });
                });
        });
}

/// Lanes reduced separately, so that the max and the sum vectorise.
const LANES: usize = 16;

for_cpu! {
    /// softmax(row · scale) in place.
    fn softmax(row: &mut [f32], scale: f32) {
        let mut lanes = [f32::NEG_INFINITY; LANES];
        let chunks = row.chunks_exact(LANES);
        let tail = chunks.remainder().iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
        for chunk in chunks {
            for (m, &x) in lanes.iter_mut().zip(chunk) {
                *m = m.max(x);
            }
        }
        let max = lanes.iter().fold(tail, |m, &x| m.max(x));
        for x in row.iter_mut() {
            *x = exp((*x - max) * scale);
        }
        let mut lanes = [0f32; LANES];
        let chunks = row.chunks_exact(LANES);
        let tail: f32 = chunks.remainder().iter().sum();
        for chunk in chunks {
            for (s, &x) in lanes.iter_mut().zip(chunk) {
                *s += x;
            }
        }
        let inv = 1.0 / (lanes.iter().sum::<f32>() + tail);
        for x in row.iter_mut() {
            *x *= inv;
        }
    }
}
