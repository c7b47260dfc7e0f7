//! Times the CPU kernels alone on the shapes that dominate the benchmark models: 3×3
//! convolutions, Linears and attention. Prints one line per shape, `<op> <shape>: <ms> ms
//! <GFLOP/s> GFLOP/s`, the best of `--iters` runs after one warm-up; `bench/ops.py` runs it
//! against PyTorch on the same shapes, alternating. Threads: `RAYON_NUM_THREADS`.
//!
//! `cargo run -p hyperlora-cpu --example ops -- [conv|linear|attention] [--iters N]` (the dev
//! profile builds this crate optimised; see the workspace's Cargo.toml)

use std::time::Instant;

use hyperlora_cpu::conv::{conv2d, ConvShape};
use hyperlora_cpu::gemm::{sgemm, Epilogue, MatRef};

/// (channels, side, batch): the UNet's three levels at 64×64 latents, then the VAE decoder's
/// widest layers at 256² output.
const CONVS: [(usize, usize, usize); 6] = [
    (128, 64, 2),
    (256, 32, 2),
    (512, 16, 2),
    (128, 256, 1),
    (256, 128, 1),
    (512, 64, 1),
];

/// (rows, in, out): the UNet's projections and feed-forwards at 64×64 (2048 and 512 tokens),
/// a prompt's 154 tokens through a cross-attention projection, OpenCLIP bigG's MLP and
/// projections, and CLIP ViT-L's.
const LINEARS: [(usize, usize, usize); 13] = [
    (2048, 256, 2048),
    (2048, 1024, 256),
    (2048, 256, 256),
    (512, 512, 4096),
    (512, 2048, 512),
    (512, 512, 512),
    (154, 2048, 256),
    (154, 1280, 5120),
    (154, 5120, 1280),
    (154, 1280, 1280),
    (154, 768, 768),
    (154, 768, 3072),
    (154, 3072, 768),
];

/// (queries, keys, heads) of 64 dimensions, batch 2: self-attention at the UNet's two
/// transformer levels at 64×64, and cross-attention to 77 text tokens.
const ATTENTIONS: [(usize, usize, usize); 3] = [(1024, 1024, 4), (256, 256, 8), (1024, 77, 4)];

fn values(len: usize) -> Vec<f32> {
    (0..len)
        .map(|i| ((i * 7919 % 2001) as f32 / 1000.0 - 1.0) * 0.05)
        .collect()
}

/// The best of `iters` timings of `f` after one warm-up run, in seconds.
fn best(iters: usize, mut f: impl FnMut()) -> f64 {
    f();
    (0..iters)
        .map(|_| {
            let start = Instant::now();
            f();
            start.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

fn report(op: &str, shape: &str, seconds: f64, flops: f64) {
    println!(
        "{op} {shape}: {:.2} ms {:.1} GFLOP/s",
        seconds * 1e3,
        flops / seconds / 1e9
    );
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let iters = args
        .iter()
        .position(|a| a == "--iters")
        .and_then(|i| args.get(i + 1))
        .map_or(7, |n| n.parse().expect("--iters takes a number"));
    let which = args.first().filter(|a| !a.starts_with("--"));
    let wants = |op: &str| which.is_none_or(|w| w == op);
    let threads = rayon::current_num_threads();
    if wants("conv") {
        for (c, side, b) in CONVS {
            let shape = ConvShape {
                cin: c,
                h: side,
                w: side,
                cout: c,
                kh: 3,
                kw: 3,
                stride: 1,
                padding: 1,
            };
            let (x, w, bias) = (
                values(b * c * side * side),
                values(c * c * 9),
                values(b * c),
            );
            let mut out = vec![0f32; b * c * side * side];
            let seconds = best(iters, || {
                if !conv2d(threads, shape, b, &x, &w, &bias, false, &mut out) {
                    panic!("this CPU has no AVX2+FMA: the implicit convolution does not run");
                }
            });
            let flops = 2.0 * (b * c * c * 9 * side * side) as f64;
            report("conv", &format!("{c}x{side}x{b}"), seconds, flops);
        }
    }
    if wants("linear") {
        for (m, k, n) in LINEARS {
            let (x, w, bias) = (values(m * k), values(n * k), values(n));
            let mut out = vec![0f32; m * n];
            let epi = Epilogue {
                col_bias: Some(&bias),
                ..Default::default()
            };
            let seconds = best(iters, || {
                let (x, w) = (MatRef::rows(&x, m, k), MatRef::new(&w, k, n, 1, k));
                sgemm(threads, m, n, k, x, w, &mut out, n, epi)
            });
            report(
                "linear",
                &format!("{m}x{k}->{n}"),
                seconds,
                2.0 * (m * n * k) as f64,
            );
        }
    }
    if wants("attention") {
        for (sq, sk, heads) in ATTENTIONS {
            let (d, b) = (64, 2);
            let hd = heads * d;
            let (q, k, v) = (
                values(b * sq * hd),
                values(b * sk * hd),
                values(b * sk * hd),
            );
            let mut out = vec![0f32; b * sq * hd];
            let seconds = best(iters, || {
                hyperlora_cpu::attention(&q, &k, &v, &mut out, sq, sk, heads, d, 0.125)
            });
            let flops = 4.0 * (b * heads * sq * sk * d) as f64;
            report("attention", &format!("{sq}x{sk}x{heads}"), seconds, flops);
        }
    }
}
