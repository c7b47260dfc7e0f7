//! Single-precision matrix product `C = A·B (+ C) (+ bias)` for the CPU fast paths.
//!
//! The product itself is the `gemm` crate's, candle's own CPU matrix product, which measured
//! within a few percent of the machine's FMA peak on our shapes (docs/cpu.md). This wrapper adds
//! what candle's `matmul` does not offer: operands with any strides, so attention multiplies
//! heads in place inside `[B, S, H·D]` tensors and a Linear reads its `[out, in]` weight as its
//! transpose; and an epilogue — the bias per row (convolutions) or per column (Linears) and an
//! accumulated `C` (residuals) — so no separate broadcast pass follows the product.

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
    let biased = epi.row_bias.is_some() || epi.col_bias.is_some();
    if biased {
        for (i, row) in c.chunks_mut(c_rs).take(m).enumerate() {
            let row = &mut row[..n];
            let rb = epi.row_bias.map_or(0.0, |b| b[i]);
            match (epi.col_bias, epi.accumulate) {
                (Some(cb), true) => row.iter_mut().zip(cb).for_each(|(c, b)| *c += b + rb),
                (Some(cb), false) => row.iter_mut().zip(cb).for_each(|(c, b)| *c = b + rb),
                (None, true) => row.iter_mut().for_each(|c| *c += rb),
                (None, false) => row.fill(rb),
            }
        }
    }
    let read_c = biased || epi.accumulate;
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

    /// Edges in every dimension, K across several slices, transposed and strided operands,
    /// both epilogues and accumulation, on one and two threads (split by columns and by rows).
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
                for threads in [1, 2] {
                    let c_rs = n + 2;
                    let old = values(m.max(1) * c_rs, 5);
                    let mut c = old.clone();
                    sgemm(
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
                    sgemm(
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
