//! 3×3 convolutions (stride 1, padding 1) by Winograd's minimal filtering F(2×2, 3×3) (Lavin and
//! Gray, "Fast Algorithms for Convolutional Neural Networks", 2016) on the micro-kernel.
//!
//! Each 2×2 block of outputs (a *tile*) depends on the 4×4 block of inputs around it. With
//! `d` that block, `g` a 3×3 filter and
//!
//! ```text
//! Bᵀ = | 1  0 -1  0 |    G = | 1    0    0  |    Aᵀ = | 1  1  1  0 |
//!      | 0  1  1  0 |        | ½    ½    ½  |         | 0  1 -1 -1 |
//!      | 0 -1  1  0 |        | ½   -½    ½  |
//!      | 0  1  0 -1 |        | 0    0    1  |
//! ```
//!
//! the tile is `Aᵀ [Σ_ci (G g Gᵀ) ⊙ (Bᵀ d B)] A`. Summed over the input channels, the 16
//! element-wise products become 16 matrix products `V_ξ [tiles, Cin] · U_ξ [Cin, Cout]`, one per
//! position ξ of the 4×4 transformed block: 16 multiply-adds per tile and channel pair where the
//! direct convolution does 36 (4 outputs × 9 taps). The transforms only add, subtract and halve.
//! See docs/cpu.md for where this route is taken and its accuracy.

use std::arch::x86_64::*;

use rayon::prelude::*;

use crate::conv::ConvShape;
use crate::{TILE_COLS as NR, TILE_ROWS as MR};

/// Positions of a transformed 4×4 block.
const XI: usize = 16;
/// Tiles per work item (a multiple of `MR`) and input channels per transformed slice: the slice
/// `[16][TILES][KC]` (512 KiB) stays in L2 while every output channel is computed from it, and
/// each transformed weight the kernel loads serves `TILES` tiles.
const TILES: usize = 64;
const KC: usize = 128;

/// Whether this route computes `s` on `images` images: 3×3, stride 1, padding 1, with enough
/// channels on both sides for the products to dominate the transforms, and at least
/// [`MIN_TILES`] tiles.
pub(crate) fn applies(s: &ConvShape, images: usize) -> bool {
    s.kh == 3
        && s.kw == 3
        && s.stride == 1
        && s.padding == 1
        && s.cin >= 32
        && s.cout >= 32
        && images * s.h.div_ceil(2) * s.w.div_ceil(2) >= MIN_TILES
}

/// Below this many tiles, transforming the filters on every call costs about what the products
/// save (per filter, about 25 instructions against 1.25 kernel cycles per tile): a UNet step at
/// 32×32 latents ran 5% faster with its 8×8 level (32 tiles of 2 images) on the direct route.
const MIN_TILES: usize = 64;

thread_local! {
    /// Each thread's transformed inputs and products, kept between calls: a fresh buffer of
    /// hundreds of KiB per work item would cost page faults.
    static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// [`crate::conv::conv2d`] for a shape that [`applies`], on a CPU with AVX2+FMA.
///
/// # Safety
/// The CPU has AVX2 and FMA; the slices hold what `conv2d` checks.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn conv3x3(
    threads: usize,
    s: ConvShape,
    images: usize,
    x: &[f32],
    weight: &[f32],
    bias: &[f32],
    accumulate: bool,
    out: &mut [f32],
) {
    let tiles = s.h.div_ceil(2) * s.w.div_ceil(2);
    let u = transform_weights(threads, weight, s.cin, s.cout);
    let u = u.as_slice();
    let blocks = tiles.div_ceil(TILES);
    let out = crate::SendPtr(out.as_mut_ptr());
    let run = |item: usize| {
        let (image, block) = (item / blocks, item % blocks);
        let first = block * TILES;
        let x = &x[image * s.cin * s.h * s.w..(image + 1) * s.cin * s.h * s.w];
        let bias = &bias[image * s.cout..(image + 1) * s.cout];
        SCRATCH.with_borrow_mut(|scratch| {
            // SAFETY: the item writes only the outputs of its own tiles of its image, inside
            // `out`; the CPU has AVX2+FMA (the caller's promise).
            unsafe {
                let out = out.get().add(image * s.cout * s.h * s.w);
                block_conv(
                    s,
                    x,
                    u,
                    bias,
                    accumulate,
                    out,
                    first,
                    TILES.min(tiles - first),
                    scratch,
                )
            }
        });
    };
    let items = images * blocks;
    if threads <= 1 || items == 1 {
        (0..items).for_each(run);
    } else {
        (0..items).into_par_iter().for_each(run);
    }
}

/// `weight` `[cout, cin, 3, 3]` as `U = G g Gᵀ` `[cout][ξ][cin]`, each output channel
/// [`channel_stride`] apart: the micro-kernel reads a panel of channels at one position as
/// `NR` contiguous streams.
///
/// # Safety
/// The CPU has AVX2 and FMA.
unsafe fn transform_weights(threads: usize, weight: &[f32], cin: usize, cout: usize) -> Vec<f32> {
    let stride = channel_stride(cin);
    let mut u = vec![0f32; cout * stride];
    // SAFETY: AVX2+FMA (the caller's promise).
    let transform = |(co, dst): (usize, &mut [f32])| unsafe {
        transform_channel(&weight[co * cin * 9..(co + 1) * cin * 9], cin, dst)
    };
    if threads > 1 {
        u.par_chunks_mut(stride).enumerate().for_each(transform);
    } else {
        u.chunks_mut(stride).enumerate().for_each(transform);
    }
    u
}

/// Floats between two output channels' transformed filters: `16·cin`, plus one cache line so
/// that the `NR` streams the kernel reads do not all fall in the same cache set.
fn channel_stride(cin: usize) -> usize {
    XI * cin + 16
}

/// Lanes of the filter transform: eight input channels at a time.
const L: usize = 8;

/// `G g Gᵀ` of one output channel's filters `[cin][3][3]` into `dst` `[ξ][cin]`, eight input
/// channels at a time (this runs on every call: a filter at a time, it took a tenth of a UNet
/// step at 32×32).
#[target_feature(enable = "avx2,fma")]
fn transform_channel(filters: &[f32], cin: usize, dst: &mut [f32]) {
    for ci in (0..cin).step_by(L) {
        let lanes = L.min(cin - ci);
        // g[tap][lane]
        let mut g = [[0f32; L]; 9];
        for (l, f) in filters[ci * 9..(ci + lanes) * 9]
            .chunks_exact(9)
            .enumerate()
        {
            for (g, &f) in g.iter_mut().zip(f) {
                g[l] = f;
            }
        }
        // G g [row][column], then each row of it expanded along the columns.
        let mut gg = [[[0f32; L]; 3]; 4];
        for c in 0..3 {
            let column = expand(&g[c], &g[3 + c], &g[6 + c]);
            for (r, v) in column.into_iter().enumerate() {
                gg[r][c] = v;
            }
        }
        for (r, gg) in gg.iter().enumerate() {
            for (c, v) in expand(&gg[0], &gg[1], &gg[2]).iter().enumerate() {
                let at = (4 * r + c) * cin + ci;
                dst[at..at + lanes].copy_from_slice(&v[..lanes]);
            }
        }
    }
}

/// `G` along one dimension, lane by lane: (a, b, c) → (a, (a+b+c)/2, (a-b+c)/2, c).
#[inline(always)]
fn expand(a: &[f32; L], b: &[f32; L], c: &[f32; L]) -> [[f32; L]; 4] {
    let mut plus = [0f32; L];
    let mut minus = [0f32; L];
    for l in 0..L {
        plus[l] = 0.5 * (a[l] + b[l] + c[l]);
        minus[l] = 0.5 * (a[l] - b[l] + c[l]);
    }
    [*a, plus, minus, *c]
}

/// Tiles `first..first+count` of one image (tile `t` covers output rows `2·(t / tiles_wide)`
/// and the next, columns `2·(t % tiles_wide)` and the next), every output channel.
///
/// # Safety
/// AVX2+FMA; `out` is the image's output `[cout, h, w]` and only this call touches the pixels of
/// these tiles.
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn block_conv(
    s: ConvShape,
    x: &[f32],
    u: &[f32],
    bias: &[f32],
    accumulate: bool,
    out: *mut f32,
    first: usize,
    count: usize,
    scratch: &mut Vec<f32>,
) {
    let panels = count.div_ceil(MR);
    let tb = panels * MR;
    let cpanels = s.cout.div_ceil(NR);
    let stride = channel_stride(s.cin);
    let tiles_wide = s.w.div_ceil(2);
    // V: [ξ][panel][KC][MR] for one slice of input channels; M: [cout / NR][ξ][NR][tb].
    let v_len = XI * panels * KC * MR;
    let m_len = cpanels * XI * NR * tb;
    if scratch.len() < v_len + m_len {
        scratch.resize(v_len + m_len, 0.0);
    }
    let (v, m) = scratch.split_at_mut(v_len);
    let mut c0 = 0;
    while c0 < s.cin {
        let kb = KC.min(s.cin - c0);
        for p in 0..panels {
            let lanes = MR.min(count - p * MR);
            for ci in 0..kb {
                let plane = &x[(c0 + ci) * s.h * s.w..(c0 + ci + 1) * s.h * s.w];
                let at = (p * kb + ci) * MR;
                let (ty, tx) = ((first + p * MR) / tiles_wide, (first + p * MR) % tiles_wide);
                if lanes == MR && tx + MR <= tiles_wide {
                    // SAFETY: position ξ's 16 values go to v[at + ξ·panels·kb·MR..][..MR].
                    transform_row(s, plane, ty, tx, v[at..].as_mut_ptr(), panels * kb * MR);
                    continue;
                }
                let d = gather(s, plane, first + p * MR, lanes);
                for (xi, t) in input_transform(&d).iter().enumerate() {
                    let at = at + xi * panels * kb * MR;
                    v[at..at + MR].copy_from_slice(t);
                }
            }
        }
        for cp in 0..cpanels {
            let nr = NR.min(s.cout - cp * NR);
            for xi in 0..XI {
                let rhs = u[cp * NR * stride + xi * s.cin + c0..].as_ptr();
                let dst = m.as_mut_ptr().add((cp * XI + xi) * NR * tb);
                for p in 0..panels {
                    // SAFETY: the panel holds kb·MR values, the weights kb·NR from c0 at this
                    // panel and position; the tile lies in this item's M.
                    crate::micro_kernel(
                        MR,
                        nr,
                        kb,
                        dst.add(p * MR),
                        tb,
                        v.as_ptr().add((xi * panels + p) * kb * MR),
                        rhs,
                        1,
                        stride,
                        c0 > 0,
                    );
                }
            }
        }
        c0 += kb;
    }
    for (co, &bias) in bias.iter().enumerate() {
        let (cp, j) = (co / NR, co % NR);
        let plane = out.add(co * s.h * s.w);
        for p in 0..panels {
            let lanes = MR.min(count - p * MR);
            let at = |xi: usize| ((cp * XI + xi) * NR + j) * tb + p * MR;
            let mt: [[f32; MR]; XI] =
                std::array::from_fn(|xi| m[at(xi)..at(xi) + MR].try_into().expect("MR"));
            let y = output_transform(&mt);
            scatter(s, plane, first + p * MR, lanes, &y, bias, accumulate);
        }
    }
}

/// The 4×4 input blocks of tiles `first..first+lanes` of one input plane, lane by lane (tiles
/// that straddle rows of tiles, or fewer than `MR`; [`transform_row`] takes the others):
/// `d[r][c][l]` = input row `2·ty - 1 + r`, column `2·tx - 1 + c` of tile `first + l` (zeros
/// outside the plane and past `lanes`).
#[target_feature(enable = "avx2,fma")]
fn gather(s: ConvShape, plane: &[f32], first: usize, lanes: usize) -> [[[f32; MR]; 4]; 4] {
    let tiles_wide = s.w.div_ceil(2);
    let mut d = [[[0f32; MR]; 4]; 4];
    for l in 0..lanes {
        let t = first + l;
        let (ty, tx) = ((t / tiles_wide) as isize, (t % tiles_wide) as isize);
        for (r, d) in d.iter_mut().enumerate() {
            let iy = 2 * ty - 1 + r as isize;
            if iy < 0 || iy >= s.h as isize {
                continue;
            }
            for (c, d) in d.iter_mut().enumerate() {
                let ix = 2 * tx - 1 + c as isize;
                if ix >= 0 && (ix as usize) < s.w {
                    d[l] = plane[iy as usize * s.w + ix as usize];
                }
            }
        }
    }
    d
}

/// `Bᵀ d B` of the 16 tiles `tx..tx+16` of row of tiles `ty` of one input plane, position ξ
/// stored at `dst + ξ·stride` (16 values): each input row's run of 34 values is loaded as
/// vectors (masked at the plane's border) and split into even and odd columns in registers.
///
/// # Safety
/// AVX2+FMA; `dst` is valid for `15·stride + 16` values; the tiles exist.
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::needless_range_loop)] // the indices are positions in the 4×4 block
unsafe fn transform_row(
    s: ConvShape,
    plane: &[f32],
    ty: usize,
    tx: usize,
    dst: *mut f32,
    stride: usize,
) {
    let zero = _mm256_setzero_ps();
    // t[r][j][half]: input row 2·ty - 1 + r transformed along its columns (`Bᵀ` on each row).
    let mut t = [[[zero; 2]; 4]; 4];
    let x0 = 2 * tx as isize - 1;
    for (r, t) in t.iter_mut().enumerate() {
        let iy = 2 * ty as isize - 1 + r as isize;
        if iy < 0 || iy >= s.h as isize {
            continue;
        }
        let row = &plane[iy as usize * s.w..(iy as usize + 1) * s.w];
        for half in 0..2 {
            let at = x0 + 16 * half as isize;
            // Columns at + 2l, at + 2l + 1, at + 2l + 2 and at + 2l + 3 of the 8 tiles.
            let (e0, o0) = deinterleave(load8(row, at), load8(row, at + 8));
            let (e2, o2) = deinterleave(load8(row, at + 2), load8(row, at + 10));
            t[0][half] = _mm256_sub_ps(e0, e2);
            t[1][half] = _mm256_add_ps(o0, e2);
            t[2][half] = _mm256_sub_ps(e2, o0);
            t[3][half] = _mm256_sub_ps(o0, o2);
        }
    }
    for j in 0..4 {
        for half in 0..2 {
            let [a, b, c, d] = [t[0][j][half], t[1][j][half], t[2][j][half], t[3][j][half]];
            let v = [
                _mm256_sub_ps(a, c),
                _mm256_add_ps(b, c),
                _mm256_sub_ps(c, b),
                _mm256_sub_ps(b, d),
            ];
            for (i, v) in v.into_iter().enumerate() {
                // SAFETY: inside dst (the caller's promise).
                unsafe { _mm256_storeu_ps(dst.add((4 * i + j) * stride + 8 * half), v) };
            }
        }
    }
}

/// Columns `at..at+8` of `row`, zeros outside it.
#[inline]
#[target_feature(enable = "avx2,fma")]
fn load8(row: &[f32], at: isize) -> __m256 {
    let w = row.len() as isize;
    if at >= 0 && at + 8 <= w {
        // SAFETY: inside the row.
        return unsafe { _mm256_loadu_ps(row.as_ptr().add(at as usize)) };
    }
    let lane = _mm256_add_epi32(
        _mm256_set1_epi32(at as i32),
        _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
    );
    let inside = _mm256_andnot_si256(
        _mm256_cmpgt_epi32(_mm256_setzero_si256(), lane),
        _mm256_cmpgt_epi32(_mm256_set1_epi32(w as i32), lane),
    );
    // SAFETY: the masked load reads only the lanes inside the row (the others are not accessed
    // and come back as zeros).
    unsafe { _mm256_maskload_ps(row.as_ptr().wrapping_offset(at), inside) }
}

/// The even and odd lanes of the 16 values `a` then `b`.
#[inline]
#[target_feature(enable = "avx2,fma")]
fn deinterleave(a: __m256, b: __m256) -> (__m256, __m256) {
    // Per 128-bit half: [a0 a2 b0 b2] then the 64-bit pairs reordered to a0 a2 a4 a6 b0 b2 b4 b6.
    let even = _mm256_shuffle_ps::<0b10_00_10_00>(a, b);
    let odd = _mm256_shuffle_ps::<0b11_01_11_01>(a, b);
    (pairs_in_order(even), pairs_in_order(odd))
}

/// The 64-bit pairs (0, 2, 1, 3) of `v` in the order (0, 1, 2, 3).
#[inline]
#[target_feature(enable = "avx2,fma")]
fn pairs_in_order(v: __m256) -> __m256 {
    _mm256_castpd_ps(_mm256_permute4x64_pd::<0b11_01_10_00>(_mm256_castps_pd(v)))
}

/// `Bᵀ d B` lane by lane, position ξ = 4·row + column.
#[target_feature(enable = "avx2,fma")]
fn input_transform(d: &[[[f32; MR]; 4]; 4]) -> [[f32; MR]; XI] {
    // One dimension: (a, b, c, e) → (a - c, b + c, c - b, b - e).
    let mut rows = [[[0f32; MR]; 4]; 4];
    for (r, d) in d.iter().enumerate() {
        for l in 0..MR {
            rows[r][0][l] = d[0][l] - d[2][l];
            rows[r][1][l] = d[1][l] + d[2][l];
            rows[r][2][l] = d[2][l] - d[1][l];
            rows[r][3][l] = d[1][l] - d[3][l];
        }
    }
    let mut v = [[0f32; MR]; XI];
    for c in 0..4 {
        for l in 0..MR {
            let [a, b, e, f] = [rows[0][c][l], rows[1][c][l], rows[2][c][l], rows[3][c][l]];
            v[c][l] = a - e;
            v[4 + c][l] = b + e;
            v[8 + c][l] = e - b;
            v[12 + c][l] = b - f;
        }
    }
    v
}

/// `Aᵀ m A` lane by lane: the tile's outputs `[row][column][lane]`.
#[target_feature(enable = "avx2,fma")]
fn output_transform(m: &[[f32; MR]; XI]) -> [[[f32; MR]; 2]; 2] {
    // One dimension: (a, b, c, e) → (a + b + c, b - c - e).
    let mut rows = [[[0f32; MR]; 4]; 2];
    for c in 0..4 {
        for l in 0..MR {
            let [a, b, e, f] = [m[c][l], m[4 + c][l], m[8 + c][l], m[12 + c][l]];
            rows[0][c][l] = a + b + e;
            rows[1][c][l] = b - e - f;
        }
    }
    let mut y = [[[0f32; MR]; 2]; 2];
    for r in 0..2 {
        for l in 0..MR {
            let [a, b, e, f] = [rows[r][0][l], rows[r][1][l], rows[r][2][l], rows[r][3][l]];
            y[r][0][l] = a + b + e;
            y[r][1][l] = b - e - f;
        }
    }
    y
}

/// Writes the outputs of tiles `first..first+lanes` into one output plane: `bias + y` (plus
/// what the plane held, when `accumulate`), skipping rows and columns past the plane.
///
/// # Safety
/// `plane` is valid for `h·w` values and these tiles' pixels are the caller's.
#[target_feature(enable = "avx2,fma")]
unsafe fn scatter(
    s: ConvShape,
    plane: *mut f32,
    first: usize,
    lanes: usize,
    y: &[[[f32; MR]; 2]; 2],
    bias: f32,
    accumulate: bool,
) {
    let tiles_wide = s.w.div_ceil(2);
    let (ty, tx) = (first / tiles_wide, first % tiles_wide);
    if lanes == MR && 2 * (tx + MR) <= s.w && 2 * ty + 2 <= s.h {
        // One row of tiles inside the plane: two runs of 2·MR outputs.
        for (r, y) in y.iter().enumerate() {
            let mut run = [0f32; 2 * MR];
            for l in 0..MR {
                run[2 * l] = y[0][l];
                run[2 * l + 1] = y[1][l];
            }
            // SAFETY: row 2·ty + r, columns 2·tx.. 2·tx + 2·MR lie inside the plane.
            let o = unsafe {
                std::slice::from_raw_parts_mut(plane.add((2 * ty + r) * s.w + 2 * tx), 2 * MR)
            };
            if accumulate {
                o.iter_mut().zip(run).for_each(|(o, y)| *o = *o + bias + y);
            } else {
                o.iter_mut().zip(run).for_each(|(o, y)| *o = bias + y);
            }
        }
        return;
    }
    for l in 0..lanes {
        let t = first + l;
        let (ty, tx) = (t / tiles_wide, t % tiles_wide);
        for (r, y) in y.iter().enumerate() {
            let oy = 2 * ty + r;
            if oy >= s.h {
                continue;
            }
            for (c, y) in y.iter().enumerate() {
                let ox = 2 * tx + c;
                if ox < s.w {
                    let o = plane.add(oy * s.w + ox);
                    *o = if accumulate { *o + bias } else { bias } + y[l];
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conv::tests::reference;
    use crate::test_values as values;

    /// Odd sizes (tiles past the last row and column), panels of tiles within one row (at either
    /// border and inside) and across rows, partial panels and blocks, more input channels than one slice, partial panels of
    /// output channels, few channels (which `conv2d` leaves to the direct route), two images,
    /// biases per image, with and without accumulating, one and two threads.
    #[test]
    fn matches_the_definition() {
        if !crate::has_avx2_fma() {
            return; // the direct route is tested instead
        }
        let cases = [
            (3, 5, 7, 4),
            (8, 16, 16, 6),
            (40, 9, 13, 13),
            (130, 6, 70, 7),
            (33, 34, 33, 17),
            (32, 5, 32, 33),
            (40, 4, 64, 34),
        ];
        for (cin, h, w, cout) in cases {
            let s = ConvShape {
                cin,
                h,
                w,
                cout,
                kh: 3,
                kw: 3,
                stride: 1,
                padding: 1,
            };
            let images = 2;
            let x = values(images * cin * h * w, 1);
            let weight = values(cout * cin * 9, 2);
            let bias = values(images * cout, 4);
            let start = values(images * cout * h * w, 3);
            for accumulate in [false, true] {
                let mut want: Vec<f64> = (0..start.len())
                    .map(|i| {
                        bias[i / (h * w)] as f64 + if accumulate { start[i] as f64 } else { 0.0 }
                    })
                    .collect();
                reference(s, images, &x, &weight, &mut want);
                for threads in [1, 2] {
                    let mut out = start.clone();
                    // SAFETY: AVX2+FMA checked above; the slices have the lengths conv2d checks.
                    unsafe {
                        conv3x3(threads, s, images, &x, &weight, &bias, accumulate, &mut out)
                    };
                    for (i, (&got, &want)) in out.iter().zip(&want).enumerate() {
                        assert!(
                            (got as f64 - want).abs() < 1e-4 * (1.0 + (cin * 9) as f64).sqrt(),
                            "{s:?} element {i}: {got} vs {want}"
                        );
                    }
                }
            }
        }
    }
}
