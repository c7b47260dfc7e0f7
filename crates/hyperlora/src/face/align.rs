//! 5-point face alignment: the similarity transform skimage's `SimilarityTransform.estimate`
//! finds (Umeyama with scale, never a reflection), onto insightface's ArcFace template.

/// insightface `arcface_dst`: eye centres, nose tip, mouth corners in a 112x112 crop.
pub const ARCFACE_TEMPLATE: [[f32; 2]; 5] = [
    [38.2946, 51.6963],
    [73.5318, 51.5014],
    [56.0252, 71.7366],
    [41.5493, 92.3655],
    [70.7299, 92.2041],
];

/// Least-squares similarity (rotation, uniform scale, translation) mapping `src` onto `dst`,
/// as a 2x3 matrix. The 2-D closed form of Umeyama's estimate with `estimate_scale=True`.
pub fn similarity_transform(src: &[[f64; 2]], dst: &[[f64; 2]]) -> [[f64; 3]; 2] {
    let n = src.len() as f64;
    let mean = |p: &[[f64; 2]]| {
        let (sx, sy) = p.iter().fold((0.0, 0.0), |a, v| (a.0 + v[0], a.1 + v[1]));
        [sx / n, sy / n]
    };
    let (ms, md) = (mean(src), mean(dst));
    // A = dst_demean^T src_demean / n
    let (mut a00, mut a01, mut a10, mut a11, mut var) = (0.0, 0.0, 0.0, 0.0, 0.0);
    for (s, d) in src.iter().zip(dst) {
        let (sx, sy) = (s[0] - ms[0], s[1] - ms[1]);
        let (dx, dy) = (d[0] - md[0], d[1] - md[1]);
        a00 += dx * sx;
        a01 += dx * sy;
        a10 += dy * sx;
        a11 += dy * sy;
        var += sx * sx + sy * sy;
    }
    let (a00, a01, a10, a11, var) = (a00 / n, a01 / n, a10 / n, a11 / n, var / n);
    let (p, q) = (a00 + a11, a10 - a01);
    let norm = (p * p + q * q).sqrt();
    if norm == 0.0 || var == 0.0 {
        return [[f64::NAN; 3]; 2];
    }
    let (c, s) = (p / norm, q / norm);
    let scale = norm / var;
    let tx = md[0] - scale * (c * ms[0] - s * ms[1]);
    let ty = md[1] - scale * (s * ms[0] + c * ms[1]);
    [[scale * c, -scale * s, tx], [scale * s, scale * c, ty]]
}

/// insightface `estimate_norm(kps, image_size)` for the ArcFace mode (size a multiple of 112).
pub fn estimate_norm(kps: &[[f32; 2]; 5], image_size: usize) -> [[f64; 3]; 2] {
    let ratio = image_size as f32 / 112.0;
    let dst: Vec<[f64; 2]> = ARCFACE_TEMPLATE
        .iter()
        .map(|p| [(p[0] * ratio) as f64, (p[1] * ratio) as f64])
        .collect();
    let src: Vec<[f64; 2]> = kps.iter().map(|p| [p[0] as f64, p[1] as f64]).collect();
    similarity_transform(&src, &dst)
}
