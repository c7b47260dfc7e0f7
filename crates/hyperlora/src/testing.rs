//! Helpers for parity tests: fixture paths and comparisons that name the worst element.

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};

/// Repository root (two levels above this crate).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// `crates/hyperlora/tests/fixtures/<stage>/<name>`.
pub fn fixture(stage: &str, name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(stage)
        .join(name)
}

/// `models/tiny/<name>`: the small random-weight models in real layouts.
pub fn tiny_model(name: &str) -> PathBuf {
    repo_root().join("models/tiny").join(name)
}

/// Loads every tensor of a fixture safetensors file onto the CPU.
/// The bundled tiny SDXL (`models/tiny/sdxl`), in f32 on the CPU.
pub fn tiny_sdxl() -> crate::sdxl::pipeline::SdxlPipeline {
    crate::sdxl::pipeline::SdxlPipeline::load(
        &tiny_model("sdxl"),
        &Default::default(),
        &Device::Cpu,
        DType::F32,
    )
    .unwrap()
}

pub fn load_fixture(stage: &str, name: &str) -> std::collections::HashMap<String, Tensor> {
    let path = fixture(stage, name);
    candle_core::safetensors::load(&path, &Device::Cpu)
        .unwrap_or_else(|e| panic!("cannot read fixture {}: {e}", path.display()))
}

/// Largest absolute difference, with its flat index and both values.
pub fn max_abs_diff(actual: &Tensor, expected: &Tensor) -> (f32, usize, f32, f32) {
    assert_eq!(actual.dims(), expected.dims(), "shape mismatch");
    let a = actual
        .to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let e = expected
        .to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let mut worst = (0f32, 0usize, 0f32, 0f32);
    for (i, (x, y)) in a.iter().zip(e.iter()).enumerate() {
        let d = (x - y).abs();
        if d > worst.0 || d.is_nan() {
            worst = (d, i, *x, *y);
            if d.is_nan() {
                break;
            }
        }
    }
    worst
}

/// Panics with the worst element when `actual` and `expected` differ by more than `tol`.
#[track_caller]
pub fn assert_close(what: &str, actual: &Tensor, expected: &Tensor, tol: f32) {
    let (d, i, a, e) = max_abs_diff(actual, expected);
    assert!(
        d <= tol && !d.is_nan(),
        "{what}: max abs diff {d} > {tol} at flat index {i} (shape {:?}): ours {a}, reference {e}",
        expected.dims()
    );
}
