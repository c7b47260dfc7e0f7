//! Single-precision matrix product `C = A·B (+ C) (+ bias)` for the CPU fast paths.
//!
//! What candle's `matmul` does not offer: operands with any strides, so attention multiplies
//! heads in place inside `[B, S, H·D]` tensors and a Linear reads its `[out, in]` weight as its
//! transpose; and an epilogue — the bias per row (convolutions) or per column (Linears) and an
//! accumulated `C` (residuals) — so no separate broadcast pass follows the product. On x86-64
//! with AVX2+FMA the blocking is this module's, on the `gemm` crate's micro-kernel; elsewhere
//! the product is the crate's own (the one candle uses). See the repository's docs/cpu.md.

use std::ops::Range;

/// A read-only strided matrix: element `(i, j)` at `ptr + i·rs + j·cs`.
#[derive(Clone, Copy)]
pub struct MatRef<'a> {
    data: &'a [f32],
    rs: usize,
    cs: usize,
}

impl<'a> MatRef<'a> {
    /// `rows`×`cols` view of `data`; panics when an element would fall outside it.
    pub fn new(data: &'a [f32], rows: usize, cols: usize, rs: usize, cs: usize) -> Self {
        if rows > 0 && cols > 0 {
            let last = (rows - 1) * rs + (cols - 1) * cs;
            assert!(last < data.len(), "matrix view out of bounds");
        }
        Self { data, rs, cs }
    }

    /// A contiguous row-major `rows`×`cols` matrix.
    pub fn rows(data: &'a [f32], rows: usize, cols: usize) -> Self {
        Self::new(data, rows, cols, cols, 1)
    }
}

/// What the product's tile is combined with before it is stored.
#[derive(Clone, Copy, Default)]
pub struct Epilogue<'a> {
    /// `C += A·B` instead of `C = A·B`.
    pub accumulate: bool,
    /// Added to every element of row `i` (a convolution's bias, `[m]`).
    pub row_bias: Option<&'a [f32]>,
    /// Added to every element of column `j` (a Linear's bias, `[n]`).
    pub col_bias: Option<&'a [f32]>,
}

impl Epilogue<'_> {
    fn biased(&self) -> bool {
        self.row_bias.is_some() || self.col_bias.is_some()
    }

    /// Starts the block `rows`×`cols` of C as the biases, added to what it holds when
    /// accumulating (nothing to do without biases).
    ///
    /// # Safety
    /// The block must lie inside C (row stride `c_rs`), which the caller alone touches.
    unsafe fn start(&self, c: *mut f32, c_rs: usize, rows: Range<usize>, cols: Range<usize>) {
        if !self.biased() {
            return;
        }
        for i in rows {
            // SAFETY: row i, columns `cols` lie inside C.
            let row =
                unsafe { std::slice::from_raw_parts_mut(c.add(i * c_rs + cols.start), cols.len()) };
            let rb = self.row_bias.map_or(0.0, |b| b[i]);
            match (self.col_bias.map(|b| &b[cols.clone()]), self.accumulate) {
                (Some(cb), true) => row.iter_mut().zip(cb).for_each(|(c, b)| *c += b + rb),
                (Some(cb), false) => row.iter_mut().zip(cb).for_each(|(c, b)| *c = b + rb),
                (None, true) => row.iter_mut().for_each(|c| *c += rb),
                (None, false) => row.fill(rb),
            }
        }
    }
}

/// `C[m×n] = A[m×k]·B[k×n]` combined as `epi` says, `C` row-major with row stride `c_rs`, on up
/// to `threads` threads of rayon's pool (1: on the calling thread).
#[allow(clippy::too_many_arguments)]
pub fn sgemm(
    threads: usize,
    m: usize,
    n: usize,
    k: usize,
    a: MatRef,
    b: MatRef,
    c: &mut [f32],
    c_rs: usize,
    epi: Epilogue,
) {
    sgemm_routed(true, threads, m, n, k, a, b, c, c_rs, epi)
}

/// [`sgemm`], on the packed route where it applies when `packed_route` (the tests run both).
#[allow(clippy::too_many_arguments)]
fn sgemm_routed(
    packed_route: bool,
    threads: usize,
    m: usize,
    n: usize,
    k: usize,
    a: MatRef,
    b: MatRef,
    c: &mut [f32],
    c_rs: usize,
    epi: Epilogue,
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(
        c_rs >= n && (m - 1) * c_rs + n <= c.len(),
        "output view out of bounds"
    );
    assert!(
        epi.row_bias.is_none_or(|b| b.len() >= m),
        "row bias too short"
    );
    assert!(
        epi.col_bias.is_none_or(|b| b.len() >= n),
        "column bias too short"
    );
    if k > 0 {
        MatRef::new(a.data, m, k, a.rs, a.cs);
        MatRef::new(b.data, k, n, b.rs, b.cs);
    }
    // The biases go in first; the product then adds itself to C.
    let read_c = epi.biased() || epi.accumulate;
    #[cfg(not(target_arch = "x86_64"))]
    let _ = packed_route;
    #[cfg(target_arch = "x86_64")]
    if packed_route
        && m >= packed::MIN_SIDE
        && n >= packed::MIN_SIDE
        && k > 0
        && crate::has_avx2_fma()
    {
        let threads = if m * n * k >= SPLIT_MIN_WORK {
            threads
        } else {
            1
        };
        // SAFETY: every element read or written lies inside `a`, `b` and `c` (checked above),
        // `c` is borrowed exclusively, and the CPU has AVX2 and FMA.
        unsafe { packed::product(threads, m, n, k, a, b, c.as_mut_ptr(), c_rs, epi) };
        return;
    }
    // SAFETY: the m×n view lies inside `c` (checked above), borrowed exclusively.
    unsafe { epi.start(c.as_mut_ptr(), c_rs, 0..m, 0..n) };
    if threads > 1 && m * n * k >= SPLIT_MIN_WORK {
        split(threads, m, n, k, a, b, c, c_rs, read_c);
    } else {
        // SAFETY: every element the product reads or writes lies inside `a`, `b` and `c`
        // (checked above), and `c` is borrowed exclusively.
        unsafe { product(m, n, k, a, b, c.as_mut_ptr(), c_rs, read_c) };
    }
}

/// Below this many multiply-adds (≈20 µs of work) a product runs on one thread.
const SPLIT_MIN_WORK: usize = 1 << 21;

/// Parallel product in one piece per thread, each a one-thread product of its own rows or
/// columns of `C`. The `gemm` crate's own threading has every thread pack the whole of its
/// left operand (in its orientation: a Linear's weight) and joins the threads once per slice of
/// K; the pieces pack disjoint parts and meet once. The operand that is not split is packed by
/// every piece, so the split goes along the dimension that leaves the smaller one to repeat.
#[allow(clippy::too_many_arguments)]
fn split(
    threads: usize,
    m: usize,
    n: usize,
    k: usize,
    a: MatRef,
    b: MatRef,
    c: &mut [f32],
    c_rs: usize,
    read_c: bool,
) {
    use rayon::prelude::*;
    let by_cols = m <= n;
    let len = if by_cols { n } else { m };
    let step = len.div_ceil(threads).next_multiple_of(16);
    let pieces = len.div_ceil(step);
    let cptr = crate::SendPtr(c.as_mut_ptr());
    (0..pieces).into_par_iter().for_each(|p| {
        let start = p * step;
        let size = step.min(len - start);
        // SAFETY: piece `p` reads inside `a` and `b` and writes only its own rows or columns
        // of `c`, all inside the views checked by `sgemm`.
        unsafe {
            if by_cols {
                let b = MatRef {
                    data: &b.data[start * b.cs..],
                    ..b
                };
                product(m, size, k, a, b, cptr.get().add(start), c_rs, read_c);
            } else {
                let a = MatRef {
                    data: &a.data[start * a.rs..],
                    ..a
                };
                product(size, n, k, a, b, cptr.get().add(start * c_rs), c_rs, read_c);
            }
        }
    });
}

/// The `gemm` crate's `C (+)= A·B` on the calling thread.
///
/// # Safety
/// Every element read or written must lie inside `a`, `b` and the `m`×`n` view of `c`.
#[allow(clippy::too_many_arguments)]
unsafe fn product(
    m: usize,
    n: usize,
    k: usize,
    a: MatRef,
    b: MatRef,
    c: *mut f32,
    c_rs: usize,
    read_c: bool,
) {
    unsafe {
        ::gemm::gemm(
            m,
            n,
            k,
            c,
            1,
            c_rs as isize,
            read_c,
            a.data.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            ::gemm::Parallelism::None,
        )
    }
}

/// The product on the `gemm` crate's AVX2+FMA micro-kernel with both operands packed once per
/// call into buffers every thread reads: the kernel's 16-lane rows run along C's columns (B's
/// columns, contiguous in C), its 6 broadcast columns along C's rows (A's rows). Through the
/// crate's own driver, split one piece per thread, each thread packed the whole of the operand
/// it did not split, and two threads ran 1.3x one thread's speed on the UNet's Linears, against
/// PyTorch's 1.65x (docs/cpu.md).
#[cfg(target_arch = "x86_64")]
mod packed {
    use std::cell::RefCell;

    use rayon::prelude::*;

    use super::{Epilogue, MatRef};
    // The micro-kernel tile: rows run along C's columns, columns along C's rows.
    use crate::{TILE_COLS as NR, TILE_ROWS as MR};

    /// K per slice, and C's columns per work item (at most): an item's slice of packed B
    /// (256 KiB) stays in L2 while each 6-row slice of A (12 KiB, L1) passes over it; 512
    /// measured a few percent faster than 256 on the UNet's Linears (fewer passes over C).
    const KC: usize = 512;
    const NC: usize = 128;
    /// Rows of C per work item at most (its C block, up to 96 KiB, stays in L2 beside B's).
    const MC_MAX: usize = 192;
    /// Below this many rows or columns packing costs more than it saves (a row vector times a
    /// matrix reads each element of B once): the `gemm` crate's driver takes those.
    pub(super) const MIN_SIDE: usize = 16;

    thread_local! {
        /// Packed A and B, kept between calls: fresh buffers of tens of MiB cost more in
        /// page faults than the packing itself.
        static BUFFERS: RefCell<(Vec<f32>, Vec<f32>)> = const { RefCell::new((Vec::new(), Vec::new())) };
    }

    /// `C = A·B` combined as `epi` says, on up to `threads` threads.
    ///
    /// # Safety
    /// The CPU has AVX2 and FMA; every element read or written lies inside `a`, `b` and the
    /// `m`×`n` view of `c` (row stride `c_rs`), which nothing else touches meanwhile.
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn product(
        threads: usize,
        m: usize,
        n: usize,
        k: usize,
        a: MatRef,
        b: MatRef,
        c: *mut f32,
        c_rs: usize,
        epi: Epilogue,
    ) {
        if m <= MC_MAX && b.rs == 1 && b.cs != 1 {
            // SAFETY: forwarded from the caller.
            unsafe {
                with_buffers(|ap, ct| few_rows(threads, m, n, k, a, b, c, c_rs, epi, ap, ct))
            };
            return;
        }
        // A with its rows contiguous is read in place: the kernel's broadcasts then come from
        // 6 rows instead of one packed stream, and a 6-row slice stays in L1 either way.
        let in_place = a.cs == 1;
        let a_len = if in_place { 0 } else { m.div_ceil(NR) * NR * k };
        let b_len = n.div_ceil(MR) * MR * k;
        let run = |ap: &mut Vec<f32>, bp: &mut Vec<f32>| {
            // Packing writes every element used, padding included.
            let (ap, bp) = (take(ap, a_len), take(bp, b_len));
            pack(threads, a.data, m, a.rs, a.cs, NR, k, ap);
            pack(threads, b.data, n, b.cs, b.rs, MR, k, bp);
            let a = if in_place {
                Lhs::InPlace(a)
            } else {
                Lhs::Packed(ap)
            };
            // SAFETY: forwarded from the caller; the packed operands cover m×k and k×n.
            unsafe { blocks(threads, m, n, k, a, bp, c, c_rs, epi) };
        };
        with_buffers(run);
    }

    /// `f` with this thread's two packing buffers. A call from inside another one's parallel
    /// section (rayon lets a waiting thread run other tasks) finds them borrowed and gets
    /// fresh ones.
    fn with_buffers(f: impl FnOnce(&mut Vec<f32>, &mut Vec<f32>)) {
        BUFFERS.with(|buffers| match buffers.try_borrow_mut() {
            Ok(mut buffers) => {
                let (x, y) = &mut *buffers;
                f(x, y)
            }
            Err(_) => f(&mut Vec::new(), &mut Vec::new()),
        });
    }

    /// Grows `buffer` to at least `len` (never shrinks or clears it) and returns its first
    /// `len` elements.
    fn take(buffer: &mut Vec<f32>, len: usize) -> &mut [f32] {
        if buffer.len() < len {
            buffer.resize(len, 0.0);
        }
        &mut buffer[..len]
    }

    /// The product for few rows of A (tokens of a prompt) times a Linear's weight read as its
    /// transpose (B's columns contiguous along K). Packing such a B is a transposition of the
    /// whole weight on every call — each weight element then serves only `m` rows, and on the
    /// text encoders the packing took 18% of the time. Here the kernel's roles swap: its 16
    /// lanes run along A's rows (A packed, `m·k` values), its 6 broadcasts come straight from 6
    /// columns of B, and the tiles land transposed in `ct` (`[n][m rounded up to 16]`), added
    /// into C with the biases at the end of each work item. The next 6 columns' slice of B is
    /// prefetched while the current one is multiplied by every panel of A.
    ///
    /// # Safety
    /// As [`product`].
    #[allow(clippy::too_many_arguments)]
    unsafe fn few_rows(
        threads: usize,
        m: usize,
        n: usize,
        k: usize,
        a: MatRef,
        b: MatRef,
        c: *mut f32,
        c_rs: usize,
        epi: Epilogue,
        ap: &mut Vec<f32>,
        ct: &mut Vec<f32>,
    ) {
        let mp = m.div_ceil(MR) * MR;
        let ap = take(ap, mp * k);
        // A as [panel of 16 rows][k][16], zeros past m.
        pack(threads, a.data, m, a.rs, a.cs, MR, k, ap);
        let ap = &*ap;
        let ct = crate::SendPtr(take(ct, n * mp).as_mut_ptr());
        let c = crate::SendPtr(c);
        // Items of 16 column panels; enough of them for every thread to take several.
        let nc = (16 * NR).min(n.div_ceil(4 * threads).next_multiple_of(NR));
        let item = |item: usize| {
            let j0 = item * nc;
            let cols = nc.min(n - j0);
            let mut k0 = 0;
            while k0 < k {
                let kb = FEW_KC.min(k - k0);
                for j in (j0..j0 + cols).step_by(NR) {
                    let nr = NR.min(j0 + cols - j);
                    let rhs = b.data[k0 + j * b.cs..].as_ptr();
                    if j + NR < j0 + cols {
                        prefetch(
                            &b.data[k0 + (j + NR) * b.cs..],
                            NR.min(j0 + cols - j - NR),
                            b.cs,
                            kb,
                        );
                    }
                    for p in 0..mp / MR {
                        // SAFETY: the packed panel holds kb steps from k0; columns j..j+nr of B
                        // hold kb values from k0; the 16×nr tile of `ct` is this item's alone.
                        unsafe {
                            crate::micro_kernel(
                                MR,
                                nr,
                                kb,
                                ct.get().add(j * mp + p * MR),
                                mp,
                                ap[(p * k + k0) * MR..].as_ptr(),
                                rhs,
                                1,
                                b.cs,
                                k0 > 0,
                            )
                        };
                    }
                }
                k0 += kb;
            }
            // SAFETY: columns j0..j0+cols of C and of `ct`'s rows are this item's alone.
            unsafe {
                epi.start(c.get(), c_rs, 0..m, j0..j0 + cols);
                let read_c = epi.biased() || epi.accumulate;
                for i in 0..m {
                    let row = std::slice::from_raw_parts_mut(c.get().add(i * c_rs + j0), cols);
                    for (jj, v) in row.iter_mut().enumerate() {
                        let t = *ct.get().add((j0 + jj) * mp + i);
                        *v = if read_c { *v + t } else { t };
                    }
                }
            }
        };
        let items = n.div_ceil(nc);
        if threads > 1 && items > 1 {
            (0..items).into_par_iter().for_each(item);
        } else {
            (0..items).for_each(item);
        }
    }

    /// K per slice on the few-rows route: A's slice (up to 12 panels × 16 KiB) stays in L2.
    const FEW_KC: usize = 256;

    /// Asks for `cols` columns of `len` values (`stride` apart, from `b`'s start) to be cached.
    fn prefetch(b: &[f32], cols: usize, stride: usize, len: usize) {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        for col in 0..cols {
            for line in (0..len).step_by(16) {
                // SAFETY: a prefetch is a hint; the address lies inside `b`.
                unsafe { _mm_prefetch::<_MM_HINT_T0>(b[col * stride + line..].as_ptr().cast()) };
            }
        }
    }

    /// Every panel of a strided operand into `dst` (see [`pack_panel`]), on up to `threads`
    /// threads.
    #[allow(clippy::too_many_arguments)]
    fn pack(
        threads: usize,
        data: &[f32],
        lanes: usize,
        lane_stride: usize,
        step_stride: usize,
        width: usize,
        k: usize,
        dst: &mut [f32],
    ) {
        let panel = |(p, dst): (usize, &mut [f32])| {
            pack_panel(data, lanes, lane_stride, step_stride, width, p, dst)
        };
        if threads > 1 {
            dst.par_chunks_mut(width * k).enumerate().for_each(panel);
        } else {
            dst.chunks_mut(width * k).enumerate().for_each(panel);
        }
    }

    /// Panel `p` of a strided operand as `[step][width]`: lane `l` of step `q` is element
    /// `(p·width + l)·lane_stride + q·step_stride` of `data`, zeros past `lanes` lanes. Rows of
    /// A (`width` 6) and columns of B (16) are packed this way.
    fn pack_panel(
        data: &[f32],
        lanes: usize,
        lane_stride: usize,
        step_stride: usize,
        width: usize,
        p: usize,
        dst: &mut [f32],
    ) {
        let used = width.min(lanes - p * width);
        if used < width {
            dst.fill(0.0);
        }
        let data = &data[p * width * lane_stride..];
        if lane_stride == 1 {
            // Each step's lanes side by side (rows of B, tokens read from a feature map).
            for (q, d) in dst.chunks_exact_mut(width).enumerate() {
                d[..used].copy_from_slice(&data[q * step_stride..][..used]);
            }
        } else {
            // Each lane contiguous along the steps (rows of A, a Linear's weight transposed).
            for l in 0..used {
                for (q, d) in dst.chunks_exact_mut(width).enumerate() {
                    d[l] = data[l * lane_stride + q * step_stride];
                }
            }
        }
    }

    /// A as the kernel reads it.
    #[derive(Clone, Copy)]
    enum Lhs<'a> {
        /// Rows contiguous (`cs` 1): read where it lies.
        InPlace(MatRef<'a>),
        /// Packed by [`pack_panel`].
        Packed(&'a [f32]),
    }

    impl Lhs<'_> {
        /// The kernel's broadcast operand for rows `i..` (a multiple of 6) from step `p`:
        /// pointer, stride between steps, stride between rows.
        fn panel(self, i: usize, p: usize, k: usize) -> (*const f32, usize, usize) {
            match self {
                Lhs::InPlace(a) => (a.data[i * a.rs + p..].as_ptr(), 1, a.rs),
                Lhs::Packed(ap) => (ap[(i / NR * k + p) * NR..].as_ptr(), NR, 1),
            }
        }
    }

    /// The products of the packed operands, one work item per block of C (up to `MC_MAX` rows
    /// × `NC` columns) on rayon's pool, each K slice of it in turn.
    ///
    /// # Safety
    /// As [`product`], with `bp` packed from B.
    #[allow(clippy::too_many_arguments)]
    unsafe fn blocks(
        threads: usize,
        m: usize,
        n: usize,
        k: usize,
        a: Lhs,
        bp: &[f32],
        c: *mut f32,
        c_rs: usize,
        epi: Epilogue,
    ) {
        // As few row blocks as fit MC_MAX (each one reads all of packed B), then narrower and
        // more blocks until every thread has at least two items.
        let (mut nc, mut row_blocks) = (NC, m.div_ceil(MC_MAX));
        while row_blocks * n.div_ceil(nc) < 2 * threads && nc > 2 * MR {
            nc /= 2;
        }
        while row_blocks * n.div_ceil(nc) < 2 * threads && m.div_ceil(row_blocks) > NR {
            row_blocks += 1;
        }
        let mc = m.div_ceil(row_blocks).next_multiple_of(NR);
        let col_blocks = n.div_ceil(nc);
        let items = col_blocks * m.div_ceil(mc);
        let c = crate::SendPtr(c);
        let item = |item: usize| {
            let (i0, j0) = (item / col_blocks * mc, item % col_blocks * nc);
            let (rows, cols) = (mc.min(m - i0), nc.min(n - j0));
            // The biases per block, just before the kernel reads it: a pass over all of C first
            // would send it through memory once more.
            // SAFETY: the block lies inside C and is this item's alone.
            unsafe { epi.start(c.get(), c_rs, i0..i0 + rows, j0..j0 + cols) };
            let read_c = epi.biased() || epi.accumulate;
            let mut k0 = 0;
            while k0 < k {
                let kb = KC.min(k - k0);
                // The first slice stores, unless C holds biases or a residual to add to.
                for i in (0..rows).step_by(NR) {
                    let nr = NR.min(rows - i);
                    let (rhs, rhs_rs, rhs_cs) = a.panel(i0 + i, k0, k);
                    for j in (0..cols).step_by(MR) {
                        let mr = MR.min(cols - j);
                        let lhs = bp[((j0 + j) / MR * k + k0) * MR..].as_ptr();
                        // SAFETY: the packed panels hold kb steps from k0; the mr×nr tile of
                        // C at (i0+i, j0+j) lies inside the view and is this item's alone.
                        unsafe {
                            crate::micro_kernel(
                                mr,
                                nr,
                                kb,
                                c.get().add((i0 + i) * c_rs + j0 + j),
                                c_rs,
                                lhs,
                                rhs,
                                rhs_rs,
                                rhs_cs,
                                read_c || k0 > 0,
                            )
                        };
                    }
                }
                k0 += kb;
            }
        };
        if threads > 1 && items > 1 {
            (0..items).into_par_iter().for_each(item);
        } else {
            (0..items).for_each(item);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_values as values;

    /// A·B by the definition, in f64.
    fn reference(m: usize, n: usize, k: usize, a: MatRef, b: MatRef) -> Vec<f64> {
        let mut c = vec![0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                for p in 0..k {
                    let x = a.data[i * a.rs + p * a.cs] as f64;
                    c[i * n + j] += x * b.data[p * b.rs + j * b.cs] as f64;
                }
            }
        }
        c
    }

    /// Edges in every dimension, K across several slices, C across several blocks, transposed
    /// and strided operands, both epilogues and accumulation, on one and two threads (split by
    /// columns and by rows), on the packed routes (transposed B with up to 192 rows of A takes
    /// the few-rows one) and the `gemm` crate's.
    #[test]
    fn matches_a_plain_triple_loop() {
        for &(m, n, k) in &[
            (1, 1, 1),
            (7, 17, 5),
            (13, 33, 300),
            (120, 16, 256),
            (61, 70, 513),
            (300, 40, 200),
            (6, 3100, 9),
            (200, 300, 70),
            (37, 130, 600),
            (0, 4, 4),
            (5, 5, 0),
        ] {
            for &(transpose_a, transpose_b) in
                &[(false, false), (true, false), (false, true), (true, true)]
            {
                let a = values(m * k + 3, 1);
                let b = values(k * n + 3, 2);
                let (ars, acs) = if transpose_a { (1, m) } else { (k, 1) };
                let (brs, bcs) = if transpose_b { (1, k) } else { (n, 1) };
                let expected = reference(
                    m,
                    n,
                    k,
                    MatRef::new(&a, m, k, ars, acs),
                    MatRef::new(&b, k, n, brs, bcs),
                );
                let rb = values(m, 3);
                let cb = values(n, 4);
                for (threads, packed_route) in [(1, true), (2, true), (1, false), (2, false)] {
                    let c_rs = n + 2;
                    let old = values(m.max(1) * c_rs, 5);
                    let mut c = old.clone();
                    sgemm_routed(
                        packed_route,
                        threads,
                        m,
                        n,
                        k,
                        MatRef::new(&a, m, k, ars, acs),
                        MatRef::new(&b, k, n, brs, bcs),
                        &mut c,
                        c_rs,
                        Epilogue {
                            accumulate: true,
                            row_bias: Some(&rb),
                            col_bias: Some(&cb),
                        },
                    );
                    for i in 0..m {
                        for j in 0..n {
                            let want = expected[i * n + j]
                                + old[i * c_rs + j] as f64
                                + rb[i] as f64
                                + cb[j] as f64;
                            let got = c[i * c_rs + j] as f64;
                            assert!(
                                (got - want).abs() < 1e-4 * (1.0 + k as f64).sqrt(),
                                "{m}x{n}x{k} ({i},{j}): {got} vs {want}"
                            );
                        }
                        // The gap between rows is left alone.
                        for j in n..c_rs {
                            assert_eq!(c[i * c_rs + j], old[i * c_rs + j]);
                        }
                    }
                    let mut c = vec![7.0; m.max(1) * n];
                    sgemm_routed(
                        packed_route,
                        threads,
                        m,
                        n,
                        k,
                        MatRef::new(&a, m, k, ars, acs),
                        MatRef::new(&b, k, n, brs, bcs),
                        &mut c,
                        n,
                        Epilogue::default(),
                    );
                    for i in 0..m * n {
                        assert!((c[i] as f64 - expected[i]).abs() < 1e-4 * (1.0 + k as f64).sqrt());
                    }
                }
            }
        }
    }
}
