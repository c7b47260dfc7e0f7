//! HyperLoRA's per-photo preprocessing (docs/hyperlora-model.md §3, steps 2-4 geometry), in PIL's terms:
//! outline mask, blurred soft mask, grey background, the CLIP crop and the 2x ArcFace crop.

use crate::image::RgbImage;
use crate::image::{
    fill_polygon, pil_crop, pil_crop_gray, pil_gaussian_blur, pil_gaussian_blur_rgb, pil_grayscale,
    pil_paste_masked, pil_resize_bicubic, pil_resize_bicubic_gray, GrayImage,
};

/// Landmark indices of the face outline polygon, in drawing order.
pub const OUTLINE: [usize; 43] = [
    1, 9, 10, 11, 12, 13, 14, 15, 16, 2, 3, 4, 5, 6, 7, 8, 0, 24, 23, 22, 21, 20, 19, 18, 32, 31,
    30, 29, 28, 27, 26, 25, 17, 101, 105, 104, 103, 102, 50, 51, 49, 48, 43,
];

fn pts64(lmk: &[[f32; 2]]) -> Vec<(f64, f64)> {
    lmk.iter().map(|p| (p[0] as f64, p[1] as f64)).collect()
}

/// The white-on-black outline polygon at the image's size.
pub fn outline_mask(width: usize, height: usize, lmk: &[[f32; 2]]) -> GrayImage {
    let all = pts64(lmk);
    let poly: Vec<(f64, f64)> = OUTLINE.iter().map(|&i| all[i]).collect();
    let mut mask = GrayImage::new(width, height, 0);
    fill_polygon(&mut mask, &poly);
    mask
}

/// Step 2: the face (soft-masked by its outline) on a (127,127,127) background.
pub fn remove_background(img: &RgbImage, lmk: &[[f32; 2]]) -> RgbImage {
    let all = pts64(lmk);
    let poly: Vec<(f64, f64)> = OUTLINE.iter().map(|&i| all[i]).collect();
    let mask = outline_mask(img.width, img.height, lmk);
    let n = poly.len() as f64;
    let c = (
        poly.iter().map(|p| p.0).sum::<f64>() / n,
        poly.iter().map(|p| p.1).sum::<f64>() / n,
    );
    let (x0, x1) = poly
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |a, p| {
            (a.0.min(p.0), a.1.max(p.0))
        });
    let (y0, y1) = poly
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |a, p| {
            (a.0.min(p.1), a.1.max(p.1))
        });
    let l = 0.8 * (x1 - x0).max(y1 - y0);
    let bx = [c.0 - l, c.1 - l, c.0 + l, c.1 + l];
    let (crop, _) = pil_crop(img, bx);
    let mcrop = pil_crop_gray(&mask, bx);
    let big = pil_resize_bicubic_gray(&mcrop, 512, 512);
    let soft = pil_resize_bicubic_gray(&pil_gaussian_blur(&big, 15.0), mcrop.width, mcrop.height);
    let mut canvas = RgbImage {
        width: img.width,
        height: img.height,
        data: vec![127; img.width * img.height * 3],
    };
    pil_paste_masked(&mut canvas, &crop, paste_origin(bx), &soft);
    canvas
}

/// Where the reference pastes a crop cut at `bx`: `(int(x0), int(y0))`, truncated, while the crop
/// itself starts at the rounded corner; so the pasted face may sit one pixel left of / above
/// where it was cut, and we do the same.
fn paste_origin(bx: [f64; 4]) -> (i64, i64) {
    (bx[0].trunc() as i64, bx[1].trunc() as i64)
}

/// Step 3's box: landmarks' bounding box, l = 0.75 max(w, h), centre raised by l/8;
/// `scale` 2 gives step 4's ArcFace crop.
pub fn clip_box(lmk: &[[f32; 2]], scale: f64) -> [f64; 4] {
    let p = pts64(lmk);
    let (x0, x1) = p.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |a, q| {
        (a.0.min(q.0), a.1.max(q.0))
    });
    let (y0, y1) = p.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |a, q| {
        (a.0.min(q.1), a.1.max(q.1))
    });
    let (cx, mut cy) = ((x0 + x1) / 2.0, (y0 + y1) / 2.0);
    let mut l = 0.75 * (x1 - x0).max(y1 - y0);
    cy -= 0.125 * l;
    l *= scale;
    [cx - l, cy - l, cx + l, cy + l]
}

/// Step 3: the crop, optionally grey, then what CLIP's image processor does with it.
pub fn clip_crop(img: &RgbImage, lmk: &[[f32; 2]], size: usize, grayscale: bool) -> RgbImage {
    let (mut crop, _) = pil_crop(img, clip_box(lmk, 1.0));
    if grayscale {
        crop = pil_grayscale(&crop);
    }
    clip_resize(&crop, size)
}

/// CLIP's image processor on a crop of any shape: shortest side to `size` (PIL bicubic, the
/// long side truncated), then the centred `size` x `size` square.
fn clip_resize(crop: &RgbImage, size: usize) -> RgbImage {
    let (w, h) = (crop.width.max(1), crop.height.max(1));
    let (nw, nh) = if w <= h {
        (size, (size as f64 * h as f64 / w as f64) as usize)
    } else {
        ((size as f64 * w as f64 / h as f64) as usize, size)
    };
    let r = pil_resize_bicubic(crop, nw, nh);
    let (left, top) = ((nw - size) / 2, (nh - size) / 2);
    let (c, _) = pil_crop(
        &r,
        [
            left as f64,
            top as f64,
            (left + size) as f64,
            (top + size) as f64,
        ],
    );
    c
}

/// The Base-LoRA's input (docs/hyperlora-model.md §3, Base-LoRA): the face blurred away (so only
/// hair, clothes and surroundings remain), then the CLIP box clamped to the photo, through CLIP's
/// image processor. As the reference's base-condition step with its defaults: the outline
/// polygon grown 1.4x about its centre as the mask, the face square resized to 512², blurred
/// with radius 45 and resized back, pasted through the mask (blurred with radius 15) onto the
/// photo; then the crop with scales (1, 1, 1, 1) and safe cropping.
pub fn base_crop(img: &RgbImage, lmk: &[[f32; 2]], size: usize) -> RgbImage {
    let all = pts64(lmk);
    let poly: Vec<(f64, f64)> = OUTLINE.iter().map(|&i| all[i]).collect();
    let n = poly.len() as f64;
    let c = (
        poly.iter().map(|p| p.0).sum::<f64>() / n,
        poly.iter().map(|p| p.1).sum::<f64>() / n,
    );
    let grown: Vec<(f64, f64)> = poly
        .iter()
        .map(|p| ((p.0 - c.0) * 1.4 + c.0, (p.1 - c.1) * 1.4 + c.1))
        .collect();
    let mut mask = GrayImage::new(img.width, img.height, 0);
    fill_polygon(&mut mask, &grown);
    let extent = |f: fn(&(f64, f64)) -> f64| {
        let (lo, hi) = poly
            .iter()
            .map(f)
            .fold((f64::INFINITY, f64::NEG_INFINITY), |a, v| {
                (a.0.min(v), a.1.max(v))
            });
        hi - lo
    };
    let l = 0.8 * extent(|p| p.0).max(extent(|p| p.1));
    let bx = [c.0 - l, c.1 - l, c.0 + l, c.1 + l];
    let (crop, _) = pil_crop(img, bx);
    let mcrop = pil_crop_gray(&mask, bx);
    let (w, h) = (crop.width, crop.height);
    let blurred = pil_resize_bicubic(
        &pil_gaussian_blur_rgb(&pil_resize_bicubic(&crop, 512, 512), 45.0),
        w,
        h,
    );
    let soft = pil_resize_bicubic_gray(
        &pil_gaussian_blur(&pil_resize_bicubic_gray(&mcrop, 512, 512), 15.0),
        w,
        h,
    );
    let mut photo = img.clone();
    pil_paste_masked(&mut photo, &blurred, paste_origin(bx), &soft);
    let [x0, y0, x1, y1] = clip_box(lmk, 1.0);
    let (wf, hf) = (img.width as f64, img.height as f64);
    let safe = [x0.max(0.0), y0.max(0.0), x1.min(wf), y1.min(hf)];
    clip_resize(&pil_crop(&photo, safe).0, size)
}

/// The user-facing preview: the CLIP crop region at 512x512.
pub fn preview(img: &RgbImage, lmk: &[[f32; 2]]) -> RgbImage {
    let (crop, _) = pil_crop(img, clip_box(lmk, 1.0));
    pil_resize_bicubic(&crop, 512, 512)
}

/// Step 4's input: twice the CLIP box, cut from the original photo (black outside).
pub fn arcface_crop(img: &RgbImage, lmk: &[[f32; 2]]) -> RgbImage {
    pil_crop(img, clip_box(lmk, 2.0)).0
}
