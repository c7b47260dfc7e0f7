//! Parity of the seeded noise with torch's CPU generator (scripts/fixtures/noise.py).

use candle_core::{DType, Device, Tensor};
use hyperlora::sdxl::sampling::noise::{NormalKernel, TorchGenerator};
use sha2::Digest;

use crate::common::{assert_close, fixture, load_fixture};

/// Each case in the fixture: a seed, a dtype and a sequence of shapes drawn from one
/// generator; the reference stores either all values or, for large draws, slices + a hash.
#[test]
fn randn_matches_torch() {
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("noise", "randn.json")).unwrap())
            .unwrap();
    let tensors = load_fixture("noise", "randn.safetensors");
    let cases = meta["params"]["cases"].as_array().unwrap();
    assert!(cases.len() >= 18);
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let seed = case["seed"].as_u64().unwrap();
        let kernel = match case["kernel"].as_str().unwrap() {
            "avx2" => NormalKernel::Avx2,
            _ => NormalKernel::Scalar,
        };
        let dtype = match case["dtype"].as_str().unwrap() {
            "float32" => DType::F32,
            "float64" => DType::F64,
            "float16" => DType::F16,
            "bfloat16" => DType::BF16,
            d => panic!("dtype {d}"),
        };
        let mut g = TorchGenerator::with_kernel(seed, kernel);
        for (i, draw) in case["draws"].as_array().unwrap().iter().enumerate() {
            let shape: Vec<usize> = draw["shape"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as usize)
                .collect();
            let got = g.randn_dtype(shape.as_slice(), dtype).unwrap();
            assert_eq!(got.dtype(), dtype);
            let got = got.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
            let key = format!("{name}.{i}");
            if draw["stored"].as_str().unwrap() == "full" {
                let want = tensors[&key]
                    .to_dtype(DType::F64)
                    .unwrap()
                    .flatten_all()
                    .unwrap();
                assert_close(
                    &key,
                    &got.to_dtype(DType::F32).unwrap(),
                    &want.to_dtype(DType::F32).unwrap(),
                    0.0,
                );
            } else {
                let n = got.dim(0).unwrap();
                let head = got.narrow(0, 0, 1024).unwrap();
                let tail = got.narrow(0, n - 1024, 1024).unwrap();
                let want_head = &tensors[&format!("{key}.head")];
                let want_tail = &tensors[&format!("{key}.tail")];
                assert_close(
                    &format!("{key} head"),
                    &head.to_dtype(DType::F32).unwrap(),
                    want_head,
                    0.0,
                );
                assert_close(
                    &format!("{key} tail"),
                    &tail.to_dtype(DType::F32).unwrap(),
                    want_tail,
                    0.0,
                );
                let stride = draw["stride"].as_u64().unwrap() as usize;
                let idx: Vec<u32> = (0..n).step_by(stride).map(|i| i as u32).collect();
                let idx = Tensor::new(idx.as_slice(), &Device::Cpu).unwrap();
                let strided = got
                    .index_select(&idx, 0)
                    .unwrap()
                    .to_dtype(DType::F32)
                    .unwrap();
                assert_close(
                    &format!("{key} strided"),
                    &strided,
                    &tensors[&format!("{key}.strided")],
                    0.0,
                );
                // The whole draw, bit for bit: SHA-256 of its little-endian f32 bytes.
                let bytes: Vec<u8> = got
                    .to_dtype(DType::F32)
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect();
                let digest = sha2::Sha256::digest(&bytes);
                let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
                assert_eq!(
                    hex,
                    draw["sha256_f32"].as_str().unwrap(),
                    "{key}: whole-draw hash differs"
                );
            }
        }
    }
}
