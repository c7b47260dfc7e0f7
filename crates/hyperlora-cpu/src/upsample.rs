//! Nearest-neighbour upsampling by two (the UNet's and VAE's `Upsample2D`), one plane per task.

use rayon::prelude::*;

/// `x` [planes, h, w] (contiguous) → `out` [planes, 2h, 2w], each pixel repeated in a 2×2 block.
pub fn upsample_nearest2x(x: &[f32], out: &mut [f32], h: usize, w: usize) {
    if h == 0 || w == 0 {
        return;
    }
    assert!(
        x.len().is_multiple_of(h * w) && out.len() == 4 * x.len(),
        "x is [planes, h, w], out 4x that"
    );
    out.par_chunks_mut(4 * h * w)
        .zip(x.par_chunks(h * w))
        .for_each(|(out, x)| {
            for (rows, src) in out.chunks_exact_mut(4 * w).zip(x.chunks_exact(w)) {
                let (top, bottom) = rows.split_at_mut(2 * w);
                for (pair, &v) in top.chunks_exact_mut(2).zip(src) {
                    pair[0] = v;
                    pair[1] = v;
                }
                bottom.copy_from_slice(top);
            }
        });
}

#[cfg(test)]
mod tests {
    #[test]
    fn repeats_each_pixel_in_a_block() {
        let x = [
            1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0, 12.0,
        ];
        let mut out = [0.0; 48];
        super::upsample_nearest2x(&x, &mut out, 2, 3);
        assert_eq!(
            &out[..12],
            &[1.0, 1.0, 2.0, 2.0, 3.0, 3.0, 1.0, 1.0, 2.0, 2.0, 3.0, 3.0]
        );
        assert_eq!(
            &out[36..],
            &[10.0, 10.0, 11.0, 11.0, 12.0, 12.0, 10.0, 10.0, 11.0, 11.0, 12.0, 12.0]
        );
    }
}
