//! 8-bit images ([`RgbImage`], [`GrayImage`]) and the pixel operations the reference gets from OpenCV (detector/landmark/ArcFace inputs) and from
//! PIL (HyperLoRA's preprocessing), reimplemented to give the same numbers:
//! - [`cv_resize_linear`]: `cv2.resize(INTER_LINEAR)` on RGB8, bit-exact (fixed-point 11-bit
//!   coefficients, the SIMD vertical pass's rounding, the 2x-downscale INTER_AREA shortcut).
//! - [`warp_affine`]: `cv2.warpAffine(INTER_LINEAR, BORDER_CONSTANT 0)` (OpenCV 5 computes it in
//!   f32; ours agrees to 1/255 on a few pixels).
//! - [`pil_resize_bicubic`] / [`pil_resize_lanczos`]: `PIL.Image.resize(BICUBIC / LANCZOS)`
//!   (support scaled when shrinking, 22-bit fixed-point coefficients, horizontal then vertical
//!   pass, u8 in between).
//! - [`pil_gaussian_blur`]: `ImageFilter.GaussianBlur` = three box blurs per axis (Pillow's
//!   BoxBlur.c), [`pil_paste_masked`], [`pil_crop`], [`pil_grayscale`], [`fill_polygon`].
//!
//! Control images: [`draw`] (OpenCV's polygon and circle rasterisers, InstantID's keypoint
//! picture) and [`canny`] (`cv2.Canny`).

pub mod canny;
pub mod draw;

/// An 8-bit RGB picture, rows top to bottom, 3 bytes per pixel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RgbImage {
    pub width: usize,
    pub height: usize,
    pub data: Vec<u8>,
}

/// A single-channel 8-bit image (masks).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GrayImage {
    pub width: usize,
    pub height: usize,
    pub data: Vec<u8>,
}

impl GrayImage {
    pub fn new(width: usize, height: usize, value: u8) -> Self {
        Self {
            width,
            height,
            data: vec![value; width * height],
        }
    }
}

/// Planar view used by the resamplers: `channels` interleaved u8 values per pixel.
struct Planes<'a> {
    w: usize,
    h: usize,
    c: usize,
    data: &'a [u8],
}

// ------------------------------------------------------------------------------ OpenCV resize
fn cv_coeffs(dst: usize, src: usize, clamp_frac: bool) -> Vec<(isize, i32, i32)> {
    let scale = 1.0 / (dst as f64 / src as f64);
    (0..dst)
        .map(|d| {
            let mut f = ((d as f64 + 0.5) * scale - 0.5) as f32;
            let mut s = f.floor() as isize;
            f -= s as f32;
            if clamp_frac && s < 0 {
                f = 0.0;
                s = 0;
            }
            if clamp_frac && s >= src as isize - 1 {
                f = 0.0;
                s = src as isize - 1;
            }
            let a0 = ((1.0 - f) * 2048.0).round_ties_even() as i32;
            let a1 = (f * 2048.0).round_ties_even() as i32;
            (s, a0, a1)
        })
        .collect()
}

fn cv_resize_planes(p: &Planes, w: usize, h: usize) -> Vec<u8> {
    let c = p.c;
    let mut out = vec![0u8; w * h * c];
    if p.w == 2 * w && p.h == 2 * h {
        // OpenCV switches INTER_LINEAR to INTER_AREA's fast path for an exact 2x reduction.
        for y in 0..h {
            for x in 0..w {
                for k in 0..c {
                    let at = |yy: usize, xx: usize| p.data[(yy * p.w + xx) * c + k] as u32;
                    let s = at(2 * y, 2 * x)
                        + at(2 * y, 2 * x + 1)
                        + at(2 * y + 1, 2 * x)
                        + at(2 * y + 1, 2 * x + 1);
                    out[(y * w + x) * c + k] = ((s + 2) >> 2) as u8;
                }
            }
        }
        return out;
    }
    let xs = cv_coeffs(w, p.w, true);
    let ys = cv_coeffs(h, p.h, false);
    let clampi = |v: isize, n: usize| v.clamp(0, n as isize - 1) as usize;
    // Horizontal pass for every source row (rows are few enough at our sizes).
    let mut hz = vec![0i32; p.h * w * c];
    for y in 0..p.h {
        let row = &p.data[y * p.w * c..(y + 1) * p.w * c];
        for (x, &(s, a0, a1)) in xs.iter().enumerate() {
            let x0 = clampi(s, p.w);
            let x1 = clampi(s + 1, p.w);
            for k in 0..c {
                hz[(y * w + x) * c + k] = row[x0 * c + k] as i32 * a0 + row[x1 * c + k] as i32 * a1;
            }
        }
    }
    for (y, &(s, b0, b1)) in ys.iter().enumerate() {
        let r0 = clampi(s, p.h);
        let r1 = clampi(s + 1, p.h);
        for i in 0..w * c {
            let s0 = hz[r0 * w * c + i] >> 4;
            let s1 = hz[r1 * w * c + i] >> 4;
            let v = ((s0 * b0) >> 16) + ((s1 * b1) >> 16);
            out[y * w * c + i] = ((v + 2) >> 2).clamp(0, 255) as u8;
        }
    }
    out
}

/// `cv2.resize(img, (w, h))` with the default INTER_LINEAR.
pub fn cv_resize_linear(img: &RgbImage, w: usize, h: usize) -> RgbImage {
    resize_rgb(img, w, h, |p| cv_resize_planes(p, w, h))
}

/// Inverse of a 2x3 affine matrix (as `cv2.invertAffineTransform`).
pub fn invert_affine(m: &[[f64; 3]; 2]) -> [[f64; 3]; 2] {
    let d = m[0][0] * m[1][1] - m[0][1] * m[1][0];
    let d = if d != 0.0 { 1.0 / d } else { 0.0 };
    let a11 = m[1][1] * d;
    let a22 = m[0][0] * d;
    let a12 = -m[0][1] * d;
    let a21 = -m[1][0] * d;
    let b1 = -a11 * m[0][2] - a12 * m[1][2];
    let b2 = -a21 * m[0][2] - a22 * m[1][2];
    [[a11, a12, b1], [a21, a22, b2]]
}

/// `cv2.warpAffine(img, m, (size, size), borderValue=0)`: `m` maps source to destination.
pub fn warp_affine(img: &RgbImage, m: &[[f64; 3]; 2], out_w: usize, out_h: usize) -> RgbImage {
    let inv = invert_affine(m);
    let mi: Vec<f32> = inv.iter().flatten().map(|&v| v as f32).collect();
    let (w, h) = (img.width as isize, img.height as isize);
    let mut out = vec![0u8; out_w * out_h * 3];
    let px = |x: isize, y: isize, k: usize| -> f32 {
        if x >= 0 && y >= 0 && x < w && y < h {
            img.data[((y * w + x) * 3) as usize + k] as f32
        } else {
            0.0
        }
    };
    for y in 0..out_h {
        for x in 0..out_w {
            let (xf, yf) = (x as f32, y as f32);
            let sx = mi[0] * xf + mi[1] * yf + mi[2];
            let sy = mi[3] * xf + mi[4] * yf + mi[5];
            let x0 = sx.floor();
            let y0 = sy.floor();
            let (fx, fy) = (sx - x0, sy - y0);
            let (x0, y0) = (x0 as isize, y0 as isize);
            if x0 >= w || y0 >= h || x0 + 1 < 0 || y0 + 1 < 0 {
                continue;
            }
            for k in 0..3 {
                let a = px(x0, y0, k) * (1.0 - fx) + px(x0 + 1, y0, k) * fx;
                let b = px(x0, y0 + 1, k) * (1.0 - fx) + px(x0 + 1, y0 + 1, k) * fx;
                let v = a * (1.0 - fy) + b * fy;
                out[(y * out_w + x) * 3 + k] = v.round_ties_even().clamp(0.0, 255.0) as u8;
            }
        }
    }
    RgbImage {
        width: out_w,
        height: out_h,
        data: out,
    }
}

// ------------------------------------------------------------------------------ PIL resample
const PRECISION_BITS: u32 = 32 - 8 - 2;

fn bicubic(x: f64) -> f64 {
    let a = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * a
    } else {
        0.0
    }
}

/// Pillow's `lanczos_filter`: `sinc(x) · sinc(x / 3)` on [-3, 3).
fn lanczos(x: f64) -> f64 {
    let sinc = |x: f64| {
        if x == 0.0 {
            1.0
        } else {
            let x = x * std::f64::consts::PI;
            x.sin() / x
        }
    };
    if (-3.0..3.0).contains(&x) {
        sinc(x) * sinc(x / 3.0)
    } else {
        0.0
    }
}

/// A Pillow resampling filter: the kernel and its support at scale 1.
#[derive(Clone, Copy)]
struct Filter {
    kernel: fn(f64) -> f64,
    support: f64,
}

const BICUBIC: Filter = Filter {
    kernel: bicubic,
    support: 2.0,
};
const LANCZOS: Filter = Filter {
    kernel: lanczos,
    support: 3.0,
};

/// Pillow's `precompute_coeffs` + `normalize_coeffs_8bpc`: per output index (first source
/// index, fixed-point weights).
fn pil_coeffs(in_size: usize, out_size: usize, filter: Filter) -> Vec<(usize, Vec<i32>)> {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = filter.support * filterscale;
    (0..out_size)
        .map(|xx| {
            let center = (xx as f64 + 0.5) * scale;
            let ss = 1.0 / filterscale;
            let xmin = ((center - support + 0.5) as isize).max(0) as usize;
            let xmax = ((center + support + 0.5) as isize).min(in_size as isize) as usize;
            let n = xmax.saturating_sub(xmin);
            let mut k: Vec<f64> = (0..n)
                .map(|x| (filter.kernel)((x as f64 + xmin as f64 - center + 0.5) * ss))
                .collect();
            let ww: f64 = k.iter().sum();
            if ww != 0.0 {
                k.iter_mut().for_each(|v| *v /= ww);
            }
            let one = (1u64 << PRECISION_BITS) as f64;
            let ik = k
                .iter()
                .map(|&v| {
                    if v < 0.0 {
                        (-0.5 + v * one) as i32
                    } else {
                        (0.5 + v * one) as i32
                    }
                })
                .collect();
            (xmin, ik)
        })
        .collect()
}

fn clip8(v: i64) -> u8 {
    (v >> PRECISION_BITS).clamp(0, 255) as u8
}

fn pil_resize_planes(p: &Planes, w: usize, h: usize, filter: Filter) -> Vec<u8> {
    let c = p.c;
    let need_h = w != p.w;
    let need_v = h != p.h;
    let xs = pil_coeffs(p.w, w, filter);
    let ys = pil_coeffs(p.h, h, filter);
    // Horizontal pass over only the rows the vertical pass reads.
    let (first, last) = if need_v {
        let (lo, _) = &ys[0];
        let (hi0, hik) = &ys[h - 1];
        (*lo, hi0 + hik.len())
    } else {
        (0, p.h)
    };
    let (tw, th, tmp): (usize, usize, Vec<u8>) = if need_h {
        let rows = last - first;
        let mut t = vec![0u8; w * rows * c];
        for y in 0..rows {
            let row = &p.data[(y + first) * p.w * c..(y + first + 1) * p.w * c];
            for (x, (xmin, k)) in xs.iter().enumerate() {
                for ch in 0..c {
                    let mut ss: i64 = 1 << (PRECISION_BITS - 1);
                    for (i, &kk) in k.iter().enumerate() {
                        ss += row[(xmin + i) * c + ch] as i64 * kk as i64;
                    }
                    t[(y * w + x) * c + ch] = clip8(ss);
                }
            }
        }
        (w, rows, t)
    } else {
        (p.w, p.h, p.data.to_vec())
    };
    if !need_v {
        return tmp;
    }
    let off = if need_h { first } else { 0 };
    let _ = th;
    let mut out = vec![0u8; w * h * c];
    for (y, (ymin, k)) in ys.iter().enumerate() {
        for i in 0..tw * c {
            let mut ss: i64 = 1 << (PRECISION_BITS - 1);
            for (j, &kk) in k.iter().enumerate() {
                ss += tmp[(ymin - off + j) * tw * c + i] as i64 * kk as i64;
            }
            out[y * w * c + i] = clip8(ss);
        }
    }
    out
}

/// `PIL.Image.resize((w, h), Image.BICUBIC)` for RGB.
pub fn pil_resize_bicubic(img: &RgbImage, w: usize, h: usize) -> RgbImage {
    pil_resize_rgb(img, w, h, BICUBIC)
}

/// `PIL.Image.resize((w, h), Image.LANCZOS)` for RGB (diffusers' image processors' default).
pub fn pil_resize_lanczos(img: &RgbImage, w: usize, h: usize) -> RgbImage {
    pil_resize_rgb(img, w, h, LANCZOS)
}

fn pil_resize_rgb(img: &RgbImage, w: usize, h: usize, filter: Filter) -> RgbImage {
    resize_rgb(img, w, h, |p| pil_resize_planes(p, w, h, filter))
}

/// `img` resized to `w × h` by `resize` (a copy when the size is already right).
fn resize_rgb(
    img: &RgbImage,
    w: usize,
    h: usize,
    resize: impl FnOnce(&Planes) -> Vec<u8>,
) -> RgbImage {
    if img.width == w && img.height == h {
        return img.clone();
    }
    let p = Planes {
        w: img.width,
        h: img.height,
        c: 3,
        data: &img.data,
    };
    RgbImage {
        width: w,
        height: h,
        data: resize(&p),
    }
}

/// `PIL.Image.resize((w, h), Image.BICUBIC)` for mode "L".
pub fn pil_resize_bicubic_gray(img: &GrayImage, w: usize, h: usize) -> GrayImage {
    if img.width == w && img.height == h {
        return img.clone();
    }
    let p = Planes {
        w: img.width,
        h: img.height,
        c: 1,
        data: &img.data,
    };
    GrayImage {
        width: w,
        height: h,
        data: pil_resize_planes(&p, w, h, BICUBIC),
    }
}

// ------------------------------------------------------------------------------ PIL blur
fn gaussian_box_radius(radius: f32, passes: i32) -> f32 {
    let sigma2 = radius * radius / passes as f32;
    let big_l = (12.0 * sigma2 as f64 + 1.0).sqrt() as f32;
    let l = ((big_l as f64 - 1.0) / 2.0).floor() as f32;
    let mut a = (2.0 * l + 1.0) * (l * (l + 1.0) - 3.0 * sigma2);
    a /= 6.0 * (sigma2 - (l + 1.0) * (l + 1.0));
    l + a
}

fn box_blur_line(out: &mut [u8], line: &[u8], radius: i32, ww: u32, fw: u32) {
    let lastx = line.len() as i32 - 1;
    let xsize = line.len() as i32;
    let edge_a = (radius + 1).min(xsize);
    let edge_b = (xsize - radius - 1).max(0);
    let at = |i: i32| line[i as usize] as u32;
    let mut acc: u32 = at(0) * (radius as u32 + 1);
    for x in 0..edge_a - 1 {
        acc += at(x);
    }
    acc = acc.wrapping_add(at(lastx).wrapping_mul((radius - edge_a + 1) as u32));
    let save = |bulk: u32| ((bulk.wrapping_add(1 << 23)) >> 24) as u8;
    let step = |acc: &mut u32, sub: i32, add: i32, left: i32, right: i32| -> u8 {
        *acc = acc.wrapping_add(at(add)).wrapping_sub(at(sub));
        let bulk = acc
            .wrapping_mul(ww)
            .wrapping_add((at(left) + at(right)).wrapping_mul(fw));
        save(bulk)
    };
    if edge_a <= edge_b {
        for x in 0..edge_a {
            out[x as usize] = step(&mut acc, 0, x + radius, 0, x + radius + 1);
        }
        for x in edge_a..edge_b {
            out[x as usize] = step(
                &mut acc,
                x - radius - 1,
                x + radius,
                x - radius - 1,
                x + radius + 1,
            );
        }
        for x in edge_b..=lastx {
            out[x as usize] = step(&mut acc, x - radius - 1, lastx, x - radius - 1, lastx);
        }
    } else {
        for x in 0..edge_b {
            out[x as usize] = step(&mut acc, 0, x + radius, 0, x + radius + 1);
        }
        for x in edge_b..edge_a {
            out[x as usize] = step(&mut acc, 0, lastx, 0, lastx);
        }
        for x in edge_a..=lastx {
            out[x as usize] = step(&mut acc, x - radius - 1, lastx, x - radius - 1, lastx);
        }
    }
}

fn horizontal_box_blur(data: &mut [u8], w: usize, h: usize, float_radius: f32) {
    let radius = float_radius as i32;
    let ww = ((1u32 << 24) as f32 / (float_radius * 2.0 + 1.0)) as u32;
    let fw = ((1u32 << 24) - (radius as u32 * 2 + 1) * ww) / 2;
    let mut tmp = vec![0u8; w];
    for y in 0..h {
        let row = &mut data[y * w..(y + 1) * w];
        box_blur_line(&mut tmp, row, radius, ww, fw);
        row.copy_from_slice(&tmp);
    }
}

fn transpose(data: &[u8], w: usize, h: usize) -> Vec<u8> {
    let mut t = vec![0u8; w * h];
    for y in 0..h {
        for x in 0..w {
            t[x * h + y] = data[y * w + x];
        }
    }
    t
}

/// `img.filter(ImageFilter.GaussianBlur(radius))` for mode "L" (3 box-blur passes per axis).
pub fn pil_gaussian_blur(img: &GrayImage, radius: f32) -> GrayImage {
    let r = gaussian_box_radius(radius, 3);
    let (w, h) = (img.width, img.height);
    let mut data = img.data.clone();
    if r != 0.0 {
        for _ in 0..3 {
            horizontal_box_blur(&mut data, w, h, r);
        }
        let mut t = transpose(&data, w, h);
        for _ in 0..3 {
            horizontal_box_blur(&mut t, h, w, r);
        }
        data = transpose(&t, h, w);
    }
    GrayImage {
        width: w,
        height: h,
        data,
    }
}

/// `ImageFilter.GaussianBlur(radius)` on an RGB image: Pillow blurs each band the same way.
pub fn pil_gaussian_blur_rgb(img: &RgbImage, radius: f32) -> RgbImage {
    let band = |k: usize| GrayImage {
        width: img.width,
        height: img.height,
        data: img.data.iter().skip(k).step_by(3).copied().collect(),
    };
    let bands = [0, 1, 2].map(|k| pil_gaussian_blur(&band(k), radius));
    let mut data = vec![0u8; img.data.len()];
    for (k, b) in bands.iter().enumerate() {
        for (px, v) in data.chunks_exact_mut(3).zip(&b.data) {
            px[k] = *v;
        }
    }
    RgbImage {
        width: img.width,
        height: img.height,
        data,
    }
}

// ------------------------------------------------------------------------------ PIL misc
/// Python's `round` (half to even) as PIL's `crop` applies it to each box coordinate.
pub fn py_round(v: f64) -> i64 {
    v.round_ties_even() as i64
}

/// `img.crop(box)`: coordinates rounded half-to-even; area outside the image is black.
pub fn pil_crop(img: &RgbImage, bx: [f64; 4]) -> (RgbImage, (i64, i64)) {
    let [x0, y0, x1, y1] = bx.map(py_round);
    let (w, h) = ((x1 - x0).max(0) as usize, (y1 - y0).max(0) as usize);
    let mut data = vec![0u8; w * h * 3];
    for y in 0..h {
        let sy = y0 + y as i64;
        if sy < 0 || sy >= img.height as i64 {
            continue;
        }
        for x in 0..w {
            let sx = x0 + x as i64;
            if sx < 0 || sx >= img.width as i64 {
                continue;
            }
            let s = (sy as usize * img.width + sx as usize) * 3;
            data[(y * w + x) * 3..(y * w + x) * 3 + 3].copy_from_slice(&img.data[s..s + 3]);
        }
    }
    (
        RgbImage {
            width: w,
            height: h,
            data,
        },
        (x0, y0),
    )
}

/// `mask.crop(box)` for mode "L".
pub fn pil_crop_gray(img: &GrayImage, bx: [f64; 4]) -> GrayImage {
    let [x0, y0, x1, y1] = bx.map(py_round);
    let (w, h) = ((x1 - x0).max(0) as usize, (y1 - y0).max(0) as usize);
    let mut data = vec![0u8; w * h];
    for y in 0..h {
        let sy = y0 + y as i64;
        if sy < 0 || sy >= img.height as i64 {
            continue;
        }
        for x in 0..w {
            let sx = x0 + x as i64;
            if sx >= 0 && sx < img.width as i64 {
                data[y * w + x] = img.data[sy as usize * img.width + sx as usize];
            }
        }
    }
    GrayImage {
        width: w,
        height: h,
        data,
    }
}

/// `canvas.paste(img, (x0, y0), mask)`: per-channel blend with Pillow's DIV255 rounding.
pub fn pil_paste_masked(canvas: &mut RgbImage, img: &RgbImage, at: (i64, i64), mask: &GrayImage) {
    for y in 0..img.height {
        let cy = at.1 + y as i64;
        if cy < 0 || cy >= canvas.height as i64 {
            continue;
        }
        for x in 0..img.width {
            let cx = at.0 + x as i64;
            if cx < 0 || cx >= canvas.width as i64 {
                continue;
            }
            let m = mask.data[y * mask.width + x] as u32;
            let o = (cy as usize * canvas.width + cx as usize) * 3;
            for k in 0..3 {
                let v = canvas.data[o + k] as u32 * (255 - m)
                    + img.data[(y * img.width + x) * 3 + k] as u32 * m;
                let t = v + 128;
                canvas.data[o + k] = (((t >> 8) + t) >> 8) as u8;
            }
        }
    }
}

/// `img.convert("L").convert("RGB")` (ITU-R 601-2 luma, Pillow's 16-bit fixed point).
pub fn pil_grayscale(img: &RgbImage) -> RgbImage {
    let mut data = img.data.clone();
    for p in data.chunks_exact_mut(3) {
        let l = (p[0] as u32 * 19595 + p[1] as u32 * 38470 + p[2] as u32 * 7471 + 0x8000) >> 16;
        p.fill(l as u8);
    }
    RgbImage {
        width: img.width,
        height: img.height,
        data,
    }
}

/// Fills a polygon with 255 on `mask` exactly as `ImageDraw.polygon(points, fill=255)` does
/// (Pillow's Draw.c: vertices truncated to int, scan-line fill with its corner rules).
pub fn fill_polygon(mask: &mut GrayImage, points: &[(f64, f64)]) {
    let xy: Vec<(i32, i32)> = points.iter().map(|&(x, y)| (x as i32, y as i32)).collect();
    let count = xy.len();
    if count == 0 {
        return;
    }
    let mut edges: Vec<Edge> = Vec::with_capacity(count);
    let mut i = 0;
    while i + 1 < count {
        let ((x0, y0), (x1, y1)) = (xy[i], xy[i + 1]);
        if y0 == y1 && i != 0 && y0 == xy[i - 1].1 {
            let prev_x = xy[i - 1].0;
            let last = edges.last_mut().unwrap();
            if x1 > x0 && x0 > prev_x {
                last.xmax = x1;
                i += 1;
                continue;
            } else if x1 < x0 && x0 < prev_x {
                last.xmin = x1;
                i += 1;
                continue;
            }
        }
        edges.push(Edge::new(x0, y0, x1, y1));
        i += 1;
    }
    if xy[i] != xy[0] {
        edges.push(Edge::new(xy[i].0, xy[i].1, xy[0].0, xy[0].1));
    }
    polygon_generic(mask, &edges);
}

#[derive(Clone, Copy, Debug)]
struct Edge {
    x0: i32,
    y0: i32,
    xmin: i32,
    xmax: i32,
    ymin: i32,
    ymax: i32,
    dx: f32,
}

impl Edge {
    fn new(x0: i32, y0: i32, x1: i32, y1: i32) -> Self {
        let dx = if y0 == y1 {
            0.0
        } else {
            (x1 - x0) as f32 / (y1 - y0) as f32
        };
        Self {
            x0,
            y0,
            xmin: x0.min(x1),
            xmax: x0.max(x1),
            ymin: y0.min(y1),
            ymax: y0.max(y1),
            dx,
        }
    }
    fn x_at(&self, y: i32) -> f32 {
        (y - self.y0) as f32 * self.dx + self.x0 as f32
    }
}

fn round_up(f: f32) -> i32 {
    if f >= 0.0 {
        (f + 0.5).floor() as i32
    } else {
        -((f.abs() + 0.5).floor() as i32)
    }
}

fn round_down(f: f32) -> i32 {
    if f >= 0.0 {
        (f - 0.5).ceil() as i32
    } else {
        -((f.abs() - 0.5).ceil() as i32)
    }
}

fn hline8(mask: &mut GrayImage, mut x0: i32, y: i32, mut x1: i32) {
    let (w, h) = (mask.width as i32, mask.height as i32);
    if y < 0 || y >= h {
        return;
    }
    if x0 < 0 {
        x0 = 0;
    } else if x0 >= w {
        return;
    }
    if x1 < 0 {
        return;
    } else if x1 >= w {
        x1 = w - 1;
    }
    for x in x0..=x1 {
        mask.data[(y * w + x) as usize] = 255;
    }
}

fn polygon_generic(mask: &mut GrayImage, e: &[Edge]) {
    let mut ymin = mask.height as i32 - 1;
    let mut ymax = 0;
    let mut table: Vec<&Edge> = Vec::new();
    for edge in e {
        ymin = ymin.min(edge.ymin);
        ymax = ymax.max(edge.ymax);
        if edge.ymin == edge.ymax {
            hline8(mask, edge.xmin, edge.ymin, edge.xmax);
            continue;
        }
        table.push(edge);
    }
    ymin = ymin.max(0);
    ymax = ymax.min(mask.height as i32);
    let mut xx: Vec<f32> = Vec::with_capacity(table.len() * 2);
    for y in ymin..=ymax {
        xx.clear();
        for (i, cur) in table.iter().enumerate() {
            if !(y >= cur.ymin && y <= cur.ymax) {
                continue;
            }
            xx.push(cur.x_at(y));
            if y == cur.ymax && y < ymax {
                let v = *xx.last().unwrap();
                xx.push(v);
            } else if (y == cur.ymin || y == cur.ymax) && cur.dx != 0.0 {
                for other in table.iter().take(i) {
                    if (y != other.ymin && y != other.ymax) || other.dx == 0.0 {
                        continue;
                    }
                    let last = *xx.last().unwrap();
                    if last.round() == other.x_at(y).round() {
                        let offset = if y == cur.ymax { -1 } else { 1 };
                        let adj = cur.x_at(y + offset);
                        if y + offset >= other.ymin && y + offset <= other.ymax {
                            let adj_other = other.x_at(y + offset);
                            let n = xx.len() - 1;
                            if last > adj + 1.0 && last > adj_other + 1.0 {
                                xx[n] = (adj.max(adj_other) as f64).round() as f32 + 1.0;
                            } else if last < adj - 1.0 && last < adj_other - 1.0 {
                                xx[n] = (adj.min(adj_other) as f64).round() as f32 - 1.0;
                            }
                            break;
                        }
                    }
                }
            }
        }
        xx.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
        let mut k = 1;
        while k < xx.len() {
            hline8(mask, round_up(xx[k - 1]), y, round_down(xx[k]));
            k += 2;
        }
    }
}
