//! The Canny control image: `cv2.Canny(rgb, low, high)` on the RGB picture as diffusers' and
//! controlnet_aux's Canny examples call it, stacked into three equal channels.
//!
//! OpenCV's algorithm with its defaults (aperture 3, L1 gradient): 3×3 Sobel per channel with
//! replicated borders, per pixel the channel of largest `|dx| + |dy|` (the first on ties),
//! non-maximum suppression in four directions by OpenCV's fixed-point tan 22.5° test (strict on
//! one side, `>=` on the other, zero magnitude outside the picture), then hysteresis: a kept
//! pixel above `high` is an edge, and so is a kept pixel above `low` joined to an edge through
//! 8-connected kept pixels above `low`. Thresholds are floored, and swapped if given reversed.

use super::RgbImage;

/// Default thresholds of the diffusers ControlNet Canny examples.
pub const DEFAULT_LOW: f64 = 100.0;
pub const DEFAULT_HIGH: f64 = 200.0;

/// tan(22.5°) in Q15, as OpenCV's `TG22`.
const TG22: i64 = 13573;

/// The edge picture: 255 on edges, 0 elsewhere, in all three channels.
pub fn canny(img: &RgbImage, low: f64, high: f64) -> RgbImage {
    let (w, h) = (img.width, img.height);
    if w == 0 || h == 0 {
        return img.clone();
    }
    let (low, high) = if low > high { (high, low) } else { (low, high) };
    let (low, high) = (low.floor() as i64, high.floor() as i64);
    let (dx, dy, mag) = gradients(img);
    // Magnitude with a zero border, so that neighbours outside the picture are 0.
    let pw = w + 2;
    let mut m = vec![0i64; pw * (h + 2)];
    for y in 0..h {
        for x in 0..w {
            m[(y + 1) * pw + x + 1] = mag[y * w + x];
        }
    }
    // 0: kept, may be an edge; 1: not an edge; 2: edge.
    let mut map = vec![1u8; w * h];
    let mut stack = Vec::new();
    for y in 0..h {
        for x in 0..w {
            let i = y * w + x;
            let c = (y + 1) * pw + x + 1;
            let v = m[c];
            if v <= low {
                continue;
            }
            let (xs, ys) = (dx[i], dy[i]);
            let ax = xs.abs();
            let ay = ys.abs() << 15;
            let tg22x = ax * TG22;
            let keep = if ay < tg22x {
                v > m[c - 1] && v >= m[c + 1]
            } else if ay > tg22x + (ax << 16) {
                v > m[c - pw] && v >= m[c + pw]
            } else {
                let s: isize = if (xs ^ ys) < 0 { -1 } else { 1 };
                let up = (c as isize - pw as isize - s) as usize;
                let down = (c as isize + pw as isize + s) as usize;
                v > m[up] && v > m[down]
            };
            if !keep {
                continue;
            }
            if v > high {
                map[i] = 2;
                stack.push(i);
            } else {
                map[i] = 0;
            }
        }
    }
    while let Some(i) = stack.pop() {
        let (x, y) = ((i % w) as isize, (i / w) as isize);
        for (ox, oy) in [
            (-1, -1),
            (0, -1),
            (1, -1),
            (-1, 0),
            (1, 0),
            (-1, 1),
            (0, 1),
            (1, 1),
        ] {
            let (nx, ny) = (x + ox, y + oy);
            if nx < 0 || ny < 0 || nx >= w as isize || ny >= h as isize {
                continue;
            }
            let j = ny as usize * w + nx as usize;
            if map[j] == 0 {
                map[j] = 2;
                stack.push(j);
            }
        }
    }
    let data = map
        .iter()
        .flat_map(|&v| [if v == 2 { 255 } else { 0 }; 3])
        .collect();
    RgbImage {
        width: w,
        height: h,
        data,
    }
}

/// Per pixel the Sobel `dx`, `dy` and `|dx| + |dy|` of the channel with the largest magnitude.
fn gradients(img: &RgbImage) -> (Vec<i64>, Vec<i64>, Vec<i64>) {
    let (w, h) = (img.width, img.height);
    let n = w * h;
    let (mut gx, mut gy, mut gm) = (vec![0i64; n], vec![0i64; n], vec![-1i64; n]);
    let px = |x: isize, y: isize, c: usize| -> i64 {
        let x = x.clamp(0, w as isize - 1) as usize;
        let y = y.clamp(0, h as isize - 1) as usize;
        i64::from(img.data[(y * w + x) * 3 + c])
    };
    for y in 0..h as isize {
        for x in 0..w as isize {
            let i = y as usize * w + x as usize;
            for c in 0..3 {
                let p = |ox: isize, oy: isize| px(x + ox, y + oy, c);
                let dx = (p(1, -1) - p(-1, -1)) + 2 * (p(1, 0) - p(-1, 0)) + (p(1, 1) - p(-1, 1));
                let dy = (p(-1, 1) - p(-1, -1)) + 2 * (p(0, 1) - p(0, -1)) + (p(1, 1) - p(1, -1));
                let m = dx.abs() + dy.abs();
                if m > gm[i] {
                    (gx[i], gy[i], gm[i]) = (dx, dy, m);
                }
            }
        }
    }
    (gx, gy, gm)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_vertical_step_gives_one_edge_column() {
        let (w, h) = (8, 6);
        let mut data = vec![0u8; w * h * 3];
        for y in 0..h {
            for x in 4..w {
                data[(y * w + x) * 3..][..3].copy_from_slice(&[200, 200, 200]);
            }
        }
        let out = canny(
            &RgbImage {
                width: w,
                height: h,
                data,
            },
            100.0,
            200.0,
        );
        for y in 0..h {
            let row: Vec<u8> = (0..w).map(|x| out.data[(y * w + x) * 3]).collect();
            assert_eq!(row, [0, 0, 0, 255, 0, 0, 0, 0], "row {y}");
        }
    }
}
