//! OpenCV's integer rasterisers as `cv2` runs them with `lineType=LINE_8, shift=0`, and
//! InstantID's keypoint picture built from them ([`draw_kps`]).
//!
//! - [`ellipse2poly`]: `cv2.ellipse2Poly` (OpenCV's 1°-step sine table in f32, points rounded
//!   half-to-even, repeats dropped);
//! - [`fill_convex_poly`]: `cv2.fillConvexPoly`: the outline drawn with 8-connected Bresenham
//!   lines (clipped to the image), then the span fill in 16.16 fixed point;
//! - [`fill_circle`]: `cv2.circle(..., thickness=-1)`: the midpoint circle, rows filled.

use super::RgbImage;

const XY_SHIFT: u32 = 16;
const XY_ONE: i64 = 1 << XY_SHIFT;

/// InstantID's keypoint colours: left eye, right eye, nose, left and right mouth corner.
pub const KPS_COLORS: [[u8; 3]; 5] = [
    [255, 0, 0],
    [0, 255, 0],
    [0, 0, 255],
    [255, 255, 0],
    [255, 0, 255],
];

/// InstantID's limbs: each keypoint but the nose joined to the nose, in the first one's colour.
const LIMBS: [[usize; 2]; 4] = [[0, 2], [1, 2], [3, 2], [4, 2]];
const STICK_WIDTH: i32 = 4;
const KP_RADIUS: i32 = 10;

/// InstantID's `draw_kps(image, kps)`: on a black `width`×`height` picture, each limb as a
/// filled ellipse (half-length along the limb, half-width 4) in full colour, the picture × 0.6,
/// then each keypoint as a filled circle of radius 10.
pub fn draw_kps(width: usize, height: usize, kps: &[[f32; 2]; 5]) -> RgbImage {
    let mut img = RgbImage {
        width,
        height,
        data: vec![0; width * height * 3],
    };
    for [a, b] in LIMBS {
        // insightface's keypoints are float32 and numpy keeps them so: the length and the
        // mean in f32, the angle through Python floats.
        let (dx, dy) = (kps[a][0] - kps[b][0], kps[a][1] - kps[b][1]);
        let length = (dx * dx + dy * dy).sqrt();
        let angle = f64::from(dy).atan2(f64::from(dx)).to_degrees();
        // Python's int() truncates toward zero.
        let center = (
            ((kps[a][0] + kps[b][0]) / 2.0) as i32,
            ((kps[a][1] + kps[b][1]) / 2.0) as i32,
        );
        let axes = ((length / 2.0) as i32, STICK_WIDTH);
        let poly = ellipse2poly(center, axes, angle as i32, 0, 360, 1);
        fill_convex_poly(&mut img, &poly, KPS_COLORS[a]);
    }
    // The reference draws on float64 and truncates after × 0.6: 255 → 153 (exact in f64).
    for v in &mut img.data {
        *v = (f64::from(*v) * 0.6) as u8;
    }
    for (kp, color) in kps.iter().zip(KPS_COLORS) {
        fill_circle(&mut img, (kp[0] as i32, kp[1] as i32), KP_RADIUS, color);
    }
    img
}

/// OpenCV's `SinTable`: sin of each whole degree 0..=450, written with 7 decimals, as f32.
fn sin_table(deg: i32) -> f32 {
    let s = f64::from(deg).to_radians().sin();
    ((s * 1e7).round() / 1e7) as f32
}

/// `cv2.ellipse2Poly(center, axes, angle, arc_start, arc_end, delta)`.
pub fn ellipse2poly(
    center: (i32, i32),
    axes: (i32, i32),
    angle: i32,
    arc_start: i32,
    arc_end: i32,
    delta: i32,
) -> Vec<(i32, i32)> {
    let mut angle = angle;
    while angle < 0 {
        angle += 360;
    }
    while angle > 360 {
        angle -= 360;
    }
    let (mut start, mut end) = if arc_start > arc_end {
        (arc_end, arc_start)
    } else {
        (arc_start, arc_end)
    };
    while start < 0 {
        start += 360;
        end += 360;
    }
    while end > 360 {
        end -= 360;
        start -= 360;
    }
    if end - start > 360 {
        start = 0;
        end = 360;
    }
    let (alpha, beta) = (sin_table(450 - angle), sin_table(angle));
    let (cx, cy) = (f64::from(center.0), f64::from(center.1));
    let mut pts: Vec<(i32, i32)> = Vec::new();
    let mut i = start;
    let delta = delta.clamp(1, 180);
    while i < end + delta {
        let mut a = i.min(end);
        if a < 0 {
            a += 360;
        }
        let x = f64::from(axes.0) * f64::from(sin_table(450 - a));
        let y = f64::from(axes.1) * f64::from(sin_table(a));
        let px = cx + x * f64::from(alpha) - y * f64::from(beta);
        let py = cy + x * f64::from(beta) + y * f64::from(alpha);
        let p = (px.round_ties_even() as i32, py.round_ties_even() as i32);
        if pts.last() != Some(&p) {
            pts.push(p);
        }
        i += delta;
    }
    if pts.len() == 1 {
        pts = vec![center; 2];
    }
    pts
}

fn put(img: &mut RgbImage, x: i64, y: i64, color: [u8; 3]) {
    let at = (y as usize * img.width + x as usize) * 3;
    img.data[at..at + 3].copy_from_slice(&color);
}

/// A row span `x1..=x2` on row `y`, all inside the image.
fn hline(img: &mut RgbImage, y: i64, x1: i64, x2: i64, color: [u8; 3]) {
    for x in x1..=x2 {
        put(img, x, y, color);
    }
}

/// OpenCV's `clipLine` to `[0, w) × [0, h)`: false when the segment misses the image.
fn clip_line(w: i64, h: i64, p1: &mut (i64, i64), p2: &mut (i64, i64)) -> bool {
    let (right, bottom) = (w - 1, h - 1);
    if w <= 0 || h <= 0 {
        return false;
    }
    let code = |p: (i64, i64)| {
        i32::from(p.0 < 0)
            + i32::from(p.0 > right) * 2
            + i32::from(p.1 < 0) * 4
            + i32::from(p.1 > bottom) * 8
    };
    let (mut c1, mut c2) = (code(*p1), code(*p2));
    if (c1 & c2) == 0 && (c1 | c2) != 0 {
        if c1 & 12 != 0 {
            let a = if c1 < 8 { 0 } else { bottom };
            p1.0 += (a - p1.1) * (p2.0 - p1.0) / (p2.1 - p1.1);
            p1.1 = a;
            c1 = i32::from(p1.0 < 0) + i32::from(p1.0 > right) * 2;
        }
        if c2 & 12 != 0 {
            let a = if c2 < 8 { 0 } else { bottom };
            p2.0 += (a - p2.1) * (p2.0 - p1.0) / (p2.1 - p1.1);
            p2.1 = a;
            c2 = i32::from(p2.0 < 0) + i32::from(p2.0 > right) * 2;
        }
        if (c1 & c2) == 0 && (c1 | c2) != 0 {
            if c1 != 0 {
                let a = if c1 == 1 { 0 } else { right };
                p1.1 += (a - p1.0) * (p2.1 - p1.1) / (p2.0 - p1.0);
                p1.0 = a;
                c1 = 0;
            }
            if c2 != 0 {
                let a = if c2 == 1 { 0 } else { right };
                p2.1 += (a - p2.0) * (p2.1 - p1.1) / (p2.0 - p1.0);
                p2.0 = a;
                c2 = 0;
            }
        }
    }
    (c1 | c2) == 0
}

/// OpenCV's `Line` with `LineIterator(connectivity 8, left_to_right)`.
fn line(img: &mut RgbImage, p1: (i64, i64), p2: (i64, i64), color: [u8; 3]) {
    let (w, h) = (img.width as i64, img.height as i64);
    let (mut p1, mut p2) = (p1, p2);
    let outside = |p: (i64, i64)| p.0 < 0 || p.0 >= w || p.1 < 0 || p.1 >= h;
    if (outside(p1) || outside(p2)) && !clip_line(w, h, &mut p1, &mut p2) {
        return;
    }
    if p2.0 < p1.0 {
        std::mem::swap(&mut p1, &mut p2);
    }
    let (dx, dy) = (p2.0 - p1.0, p2.1 - p1.1);
    let sy = if dy < 0 { -1 } else { 1 };
    let dy = dy.abs();
    // Steps along the major and the minor axis.
    let (major, minor, (dx, dy)) = if dy > dx {
        ((0, sy), (1, 0), (dy, dx))
    } else {
        ((1, 0), (0, sy), (dx, dy))
    };
    let mut err = dx - 2 * dy;
    let (mut x, mut y) = p1;
    for _ in 0..=dx {
        put(img, x, y, color);
        let diagonal = err < 0;
        err += -2 * dy + if diagonal { 2 * dx } else { 0 };
        x += major.0;
        y += major.1;
        if diagonal {
            x += minor.0;
            y += minor.1;
        }
    }
}

/// `cv2.fillConvexPoly(img, pts, color)` (LINE_8, shift 0).
pub fn fill_convex_poly(img: &mut RgbImage, v: &[(i32, i32)], color: [u8; 3]) {
    let n = v.len();
    if n == 0 {
        return;
    }
    let v: Vec<(i64, i64)> = v
        .iter()
        .map(|&(x, y)| (i64::from(x), i64::from(y)))
        .collect();
    let (w, h) = (img.width as i64, img.height as i64);
    let half = XY_ONE >> 1;
    let (mut xmin, mut xmax, mut ymin, mut ymax) = (v[0].0, v[0].0, v[0].1, v[0].1);
    let mut imin = 0;
    let mut p0 = v[n - 1];
    for (i, &p) in v.iter().enumerate() {
        if p.1 < ymin {
            ymin = p.1;
            imin = i;
        }
        ymax = ymax.max(p.1);
        xmax = xmax.max(p.0);
        xmin = xmin.min(p.0);
        line(img, p0, p, color);
        p0 = p;
    }
    if n < 3 || xmax < 0 || ymax < 0 || xmin >= w || ymin >= h {
        return;
    }
    let ymax = ymax.min(h - 1);
    #[derive(Clone, Copy)]
    struct Edge {
        idx: usize,
        di: usize,
        x: i64,
        dx: i64,
        ye: i64,
    }
    let mut edge = [
        Edge {
            idx: imin,
            di: 1,
            x: -XY_ONE,
            dx: 0,
            ye: ymin,
        },
        Edge {
            idx: imin,
            di: n - 1,
            x: -XY_ONE,
            dx: 0,
            ye: ymin,
        },
    ];
    let mut edges = n as i64;
    let mut y = ymin;
    loop {
        for e in &mut edge {
            if y >= e.ye {
                let mut idx0 = e.idx;
                let mut idx = (idx0 + e.di) % n;
                loop {
                    edges -= 1;
                    if edges < 0 {
                        break;
                    }
                    let ty = v[idx].1;
                    if ty > y {
                        let (xs, xe) = (v[idx0].0 << XY_SHIFT, v[idx].0 << XY_SHIFT);
                        e.ye = ty;
                        e.dx = ((xe - xs) * 2 + (ty - y)) / (2 * (ty - y));
                        e.x = xs;
                        e.idx = idx;
                        break;
                    }
                    idx0 = idx;
                    idx = (idx + e.di) % n;
                }
            }
        }
        if edges < 0 {
            break;
        }
        if y >= 0 {
            let (l, r) = if edge[0].x > edge[1].x {
                (1, 0)
            } else {
                (0, 1)
            };
            let x1 = (edge[l].x + half) >> XY_SHIFT;
            let x2 = (edge[r].x + half) >> XY_SHIFT;
            if x2 >= 0 && x1 < w {
                hline(img, y, x1.max(0), x2.min(w - 1), color);
            }
        }
        edge[0].x += edge[0].dx;
        edge[1].x += edge[1].dx;
        y += 1;
        if y > ymax {
            break;
        }
    }
}

/// `cv2.circle(img, center, radius, color, -1)`: OpenCV's midpoint `Circle` with `fill`.
pub fn fill_circle(img: &mut RgbImage, center: (i32, i32), radius: i32, color: [u8; 3]) {
    let (w, h) = (img.width as i64, img.height as i64);
    let (cx, cy, r) = (i64::from(center.0), i64::from(center.1), i64::from(radius));
    let (mut err, mut dx, mut dy, mut plus, mut minus) = (0i64, r, 0i64, 1i64, (r << 1) - 1);
    // Rows y with the span x1..=x2, clipped as OpenCV clips (whole circle inside or not, the
    // spans are the same once clipped).
    let span = |img: &mut RgbImage, y: i64, x1: i64, x2: i64| {
        if (0..h).contains(&y) && x1 < w && x2 >= 0 {
            hline(img, y, x1.max(0), x2.min(w - 1), color);
        }
    };
    while dx >= dy {
        let (y11, y12, y21, y22) = (cy - dy, cy + dy, cy - dx, cy + dx);
        let (x11, x12, x21, x22) = (cx - dx, cx + dx, cx - dy, cx + dy);
        if x11 < w && x12 >= 0 && y21 < h && y22 >= 0 {
            span(img, y11, x11, x12);
            span(img, y12, x11, x12);
            if x21 < w && x22 >= 0 {
                span(img, y21, x21, x22);
                span(img, y22, x21, x22);
            }
        }
        dy += 1;
        err += plus;
        plus += 2;
        let mask = if err <= 0 { 0 } else { -1 };
        err -= minus & mask;
        dx += mask;
        minus -= mask & 2;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sine_table_matches_opencvs_literals() {
        assert_eq!(sin_table(1), 0.0174524f32);
        assert_eq!(sin_table(90), 1.0);
        assert_eq!(sin_table(450 - 60), 0.5);
    }

    #[test]
    fn a_circle_off_the_picture_draws_nothing_and_does_not_panic() {
        let mut img = RgbImage {
            width: 8,
            height: 8,
            data: vec![0; 8 * 8 * 3],
        };
        fill_circle(&mut img, (-20, 40), 10, [1, 2, 3]);
        fill_convex_poly(&mut img, &[(-50, -50), (100, -40), (-60, 90)], [9, 9, 9]);
        assert!(img.data.chunks(3).all(|p| p == [9, 9, 9]));
    }
}
