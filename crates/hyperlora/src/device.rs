//! Choosing the device and precision a model runs on.

use candle_core::{DType, Device};

use crate::error::{Error, Result};

/// `auto` takes CUDA, then Metal, when this build has it and a device answers; else the CPU.
pub fn select_device(name: &str) -> Result<Device> {
    match name {
        "cpu" => Ok(Device::Cpu),
        "cuda" => Device::new_cuda(0).map_err(|e| unavailable("cuda", e)),
        "metal" => Device::new_metal(0).map_err(|e| unavailable("metal", e)),
        "auto" => Ok(Device::cuda_if_available(0)
            .ok()
            .filter(Device::is_cuda)
            .or_else(|| Device::metal_if_available(0).ok().filter(Device::is_metal))
            .unwrap_or(Device::Cpu)),
        other => Err(Error::invalid_argument(format!(
            "unknown device {other:?} (expected auto, cpu, cuda or metal)"
        ))),
    }
}

fn unavailable(what: &str, e: candle_core::Error) -> Error {
    Error::invalid_argument(format!(
        "device {what} is not available in this build or machine: {e}"
    ))
}

/// The name `select_device` accepts for `device`.
pub fn device_name(device: &Device) -> &'static str {
    match device {
        Device::Cpu => "cpu",
        Device::Cuda(_) => "cuda",
        Device::Metal(_) => "metal",
    }
}

/// `None` picks the device's natural precision: f16 on GPUs, f32 on the CPU (where candle has
/// no fast half-precision matrix multiply).
pub fn select_dtype(name: Option<&str>, device: &Device) -> Result<DType> {
    match name {
        None | Some("auto") => Ok(if device.is_cpu() {
            DType::F32
        } else {
            DType::F16
        }),
        Some("f32" | "float32") => Ok(DType::F32),
        Some("f16" | "float16" | "fp16") => Ok(DType::F16),
        Some("bf16" | "bfloat16") => Ok(DType::BF16),
        Some(other) => Err(Error::invalid_argument(format!(
            "unknown dtype {other:?} (expected auto, f32, f16 or bf16)"
        ))),
    }
}
