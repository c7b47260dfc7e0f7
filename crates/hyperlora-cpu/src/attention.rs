//! softmax(q kᵀ · scale) v with the heads left interleaved in `[B, S, H·D]`, as the projections
//! produce them and `to_out` reads them: no head is split out or merged back.
//!
//! On AVX2+FMA CPUs the products run on the `gemm` crate's micro-kernel with operands packed by
//! this module: each head's keys and values once per call, each block of queries once per task.
//! Through the general product (elsewhere) every task packed its head's keys and values again,
//! and at 1024 tokens that copying was a quarter of the attention's time (docs/cpu.md).

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
/// image, head and block of queries on rayon's pool.
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
    let hd = heads * head_dim;
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
    #[cfg(target_arch = "x86_64")]
    if crate::has_avx2_fma() {
        packed::attention(q, k, v, out, b, sq, sk, heads, head_dim, scale);
        return;
    }
    by_products(q, k, v, out, b, sq, sk, heads, head_dim, scale);
}

/// The portable route: per task and head, the two products through [`sgemm`], reading each head
/// in place through strides. One task per image and block of queries.
#[allow(clippy::too_many_arguments)]
fn by_products(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &mut [f32],
    b: usize,
    sq: usize,
    sk: usize,
    heads: usize,
    head_dim: usize,
    scale: f32,
) {
    let (d, hd) = (head_dim, heads * head_dim);
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
    fn softmax<M>(row: &mut [f32], scale: f32) {
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
            *x = exp::<M>((*x - max) * scale);
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

/// The micro-kernel route, with the queries in the kernel's vector rows (16 at a time): the
/// scores come out as `[key][16 queries]`, so the softmax runs down columns with no horizontal
/// reductions, and that block is already the packed left operand of the product with the values.
/// The probabilities are left unnormalised; each output row is divided by its sum at the end
/// (`d` divisions per query instead of `sk`).
#[cfg(target_arch = "x86_64")]
mod packed {
    use super::*;
    // The micro-kernel tile: rows are queries, columns keys (then head dimensions).
    use crate::{TILE_COLS as NR, TILE_ROWS as MR};
    /// Keys per slice of the output product: one slice of a query panel's probabilities
    /// (16 KiB) stays in L1 while every value panel is multiplied by it.
    const KC: usize = 256;

    /// One task's packed queries, probabilities and (transposed) output.
    #[derive(Default)]
    struct Scratch {
        queries: Vec<f32>,
        probs: Vec<f32>,
        out: Vec<f32>,
        sums: Vec<f32>,
    }

    thread_local! {
        static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn attention(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        out: &mut [f32],
        b: usize,
        sq: usize,
        sk: usize,
        heads: usize,
        d: usize,
        scale: f32,
    ) {
        let hd = heads * d;
        // Per image and head, as the kernel's right operands: keys as [panel of 6 keys]
        // [dimension][6], values as [panel of 6 dimensions][key][6]; zeros past the end.
        let (keys_len, values_len) = (sk.div_ceil(NR) * NR * d, d.div_ceil(NR) * NR * sk);
        let mut keys = vec![0f32; b * heads * keys_len];
        let mut values = vec![0f32; b * heads * values_len];
        keys.par_chunks_mut(keys_len)
            .zip(values.par_chunks_mut(values_len))
            .enumerate()
            .for_each(|(bh, (kp, vp))| {
                let at = |key: usize| (bh / heads * sk + key) * hd + bh % heads * d;
                for key in 0..sk {
                    let (panel, lane) = (key / NR, key % NR);
                    for (dd, &x) in k[at(key)..][..d].iter().enumerate() {
                        kp[(panel * d + dd) * NR + lane] = x;
                    }
                    for (p, dims) in v[at(key)..][..d].chunks(NR).enumerate() {
                        vp[(p * sk + key) * NR..][..dims.len()].copy_from_slice(dims);
                    }
                }
            });
        // Query blocks: whole panels, probabilities within SCORE_BLOCK, and enough tasks to
        // keep every thread busy.
        let per_task = (b * heads * sq).div_ceil(4 * rayon::current_num_threads());
        let rows = ((SCORE_BLOCK / sk).min(per_task) / MR).max(1) * MR;
        let blocks = sq.div_ceil(rows);
        let out = crate::SendPtr(out.as_mut_ptr());
        (0..b * heads * blocks).into_par_iter().for_each(|task| {
            let (bh, block) = (task / blocks, task % blocks);
            let (bi, h) = (bh / heads, bh % heads);
            let q0 = block * rows;
            let r = rows.min(sq - q0);
            let q = &q[(bi * sq + q0) * hd + h * d..];
            let keys = &keys[bh * keys_len..][..keys_len];
            let values = &values[bh * values_len..][..values_len];
            SCRATCH.with_borrow_mut(|s| {
                query_block(s, q, keys, values, r, sk, hd, d, scale);
                // Rows q0..q0+r, columns h·d..(h+1)·d of image bi: this task's alone.
                let panels = r.div_ceil(MR);
                for j in 0..r {
                    let inv = 1.0 / s.sums[j];
                    // SAFETY: the row lies inside `out` (its length was checked) and only
                    // this task writes these d values.
                    let row = unsafe {
                        std::slice::from_raw_parts_mut(
                            out.get().add((bi * sq + q0 + j) * hd + h * d),
                            d,
                        )
                    };
                    for (dd, o) in row.iter_mut().enumerate() {
                        *o = s.out[dd * panels * MR + j] * inv;
                    }
                }
            });
        });
    }

    /// Unnormalised output of queries `0..r` of one head, transposed, into `s.out`
    /// (`[dimension][panels·16]`), and each query's sum of probabilities into `s.sums`.
    #[allow(clippy::too_many_arguments)]
    fn query_block(
        s: &mut Scratch,
        q: &[f32],
        keys: &[f32],
        values: &[f32],
        r: usize,
        sk: usize,
        hd: usize,
        d: usize,
        scale: f32,
    ) {
        let panels = r.div_ceil(MR);
        // Queries as [panel of 16 queries][dimension][16], zeros past r.
        s.queries.clear();
        s.queries.resize(panels * d * MR, 0.0);
        for j in 0..r {
            for (dd, &x) in q[j * hd..][..d].iter().enumerate() {
                s.queries[(j / MR * d + dd) * MR + j % MR] = x;
            }
        }
        // Scores as [panel of 16 queries][key][16], whole 16×6 tiles (keys padded to 6).
        let ld = sk.div_ceil(NR) * NR;
        s.probs.resize(panels * ld * MR, 0.0);
        for kp in 0..ld / NR {
            for qp in 0..panels {
                // SAFETY: the query panel holds d·16 values, the key panel d·6; the tile is
                // keys kp·6.. of query panel qp, inside the scores.
                unsafe {
                    crate::micro_kernel(
                        MR,
                        NR,
                        d,
                        s.probs.as_mut_ptr().add((qp * ld + kp * NR) * MR),
                        MR,
                        s.queries.as_ptr().add(qp * d * MR),
                        keys.as_ptr().add(kp * d * NR),
                        NR,
                        1,
                        false,
                    )
                };
            }
        }
        s.sums.resize(panels * MR, 0.0);
        for (probs, sums) in s
            .probs
            .chunks_exact_mut(ld * MR)
            .zip(s.sums.chunks_exact_mut(MR))
        {
            softmax_columns(&mut probs[..sk * MR], scale, sums);
        }
        // out [dimension][query] = Σ_key values[key][dimension] · probs[key][query], in slices
        // of KC keys; the first slice overwrites, the others add.
        let dims = d.div_ceil(NR);
        s.out.resize(dims * NR * panels * MR, 0.0);
        let mut k0 = 0;
        while k0 < sk {
            let kb = KC.min(sk - k0);
            for qp in 0..panels {
                let lhs = s.probs[(qp * ld + k0) * MR..].as_ptr();
                for dp in 0..dims {
                    let n = NR.min(d - dp * NR);
                    // SAFETY: the probabilities hold kb·16 values from key k0, the value panel
                    // kb·6; the 16×n tile is dimensions dp·6.. of query panel qp in `s.out`.
                    unsafe {
                        crate::micro_kernel(
                            MR,
                            n,
                            kb,
                            s.out.as_mut_ptr().add(dp * NR * panels * MR + qp * MR),
                            panels * MR,
                            lhs,
                            values.as_ptr().add((dp * sk + k0) * NR),
                            NR,
                            1,
                            k0 > 0,
                        )
                    };
                }
            }
            k0 += kb;
        }
    }

    for_cpu! {
        /// exp((x − max) · scale) down each of the 16 columns of `scores` ([key][16]), in
        /// place, and the columns' sums.
        fn softmax_columns<M>(scores: &mut [f32], scale: f32, sums: &mut [f32]) {
            let mut max = [f32::NEG_INFINITY; MR];
            for row in scores.chunks_exact(MR) {
                for (m, &x) in max.iter_mut().zip(row) {
                    *m = m.max(x);
                }
            }
            let mut sum = [0f32; MR];
            for row in scores.chunks_exact_mut(MR) {
                for ((x, m), s) in row.iter_mut().zip(&max).zip(&mut sum) {
                    *x = exp::<M>((*x - m) * scale);
                    *s += *x;
                }
            }
            sums.copy_from_slice(&sum);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The definition in f64, heads interleaved as in `attention`.
    #[allow(clippy::too_many_arguments)]
    fn reference(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        b: usize,
        sq: usize,
        sk: usize,
        heads: usize,
        d: usize,
        scale: f32,
    ) -> Vec<f32> {
        let hd = heads * d;
        let mut out = vec![0f32; b * sq * hd];
        for (bi, h, i) in
            (0..b).flat_map(|bi| (0..heads).flat_map(move |h| (0..sq).map(move |i| (bi, h, i))))
        {
            let at = |t: &[f32], s: usize, row: usize, dd: usize| {
                t[(bi * s + row) * hd + h * d + dd] as f64
            };
            let scores: Vec<f64> = (0..sk)
                .map(|j| {
                    (0..d)
                        .map(|dd| at(q, sq, i, dd) * at(k, sk, j, dd))
                        .sum::<f64>()
                        * scale as f64
                })
                .collect();
            let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
            let sum: f64 = e.iter().sum();
            for dd in 0..d {
                let o: f64 = (0..sk).map(|j| e[j] * at(v, sk, j, dd)).sum::<f64>() / sum;
                out[(bi * sq + i) * hd + h * d + dd] = o as f32;
            }
        }
        out
    }

    #[test]
    fn both_routes_match_the_definition() {
        // Ragged query panels and blocks, key panels and slices, head dimensions of part of a
        // panel, one key.
        for (b, sq, sk, heads, d) in [
            (2, 37, 11, 3, 8),
            (1, 300, 300, 2, 64),
            (3, 5, 77, 1, 20),
            (1, 13, 1, 2, 16),
            (2, 64, 530, 1, 40),
        ] {
            let hd = heads * d;
            let q = crate::test_values(b * sq * hd, 1);
            let k = crate::test_values(b * sk * hd, 2);
            let v = crate::test_values(b * sk * hd, 3);
            let expected = reference(&q, &k, &v, b, sq, sk, heads, d, 0.3);
            let mut fast = vec![f32::NAN; q.len()];
            attention(&q, &k, &v, &mut fast, sq, sk, heads, d, 0.3);
            let mut plain = vec![f32::NAN; q.len()];
            by_products(&q, &k, &v, &mut plain, b, sq, sk, heads, d, 0.3);
            for (route, got) in [("attention", &fast), ("by_products", &plain)] {
                assert!(
                    got.iter().all(|x| x.is_finite()),
                    "{route}: unwritten output"
                );
                let worst = got
                    .iter()
                    .zip(&expected)
                    .map(|(a, e)| (a - e).abs())
                    .fold(0f32, f32::max);
                assert!(worst < 2e-6, "{route} {b}x{sq}x{sk}x{heads}x{d}: {worst}");
            }
        }
    }
}
