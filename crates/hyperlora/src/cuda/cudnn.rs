//! 2-D convolutions through cuDNN (feature `cudnn`), called directly rather than through
//! candle's cuDNN path, which computes half-precision convolutions with half-precision
//! accumulation and re-runs cuDNN's heuristics on every call. Here:
//! - accumulation is always f32 (cuDNN's "pseudo half/bfloat16" configurations), as PyTorch does;
//! - tensor cores for f16/bf16; for f32 plain FMA unless `HYPERLORA_ALLOW_TF32=1` (PyTorch's
//!   `torch.backends.cudnn.allow_tf32`), so f32 stays f32;
//! - the algorithm is chosen once per problem shape by timing the candidates on the problem's
//!   own buffers with a bounded scratch workspace (`cudnnFindConvolutionForwardAlgorithmEx`, so
//!   the search allocates nothing else), preferring deterministic ones, and cached
//!   (`HYPERLORA_CUDNN_LOG=1` prints each search's candidates).

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Mutex;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::cudnn::{result, sys};
use candle_core::cuda_backend::cudarc::driver::{DevicePtr, DevicePtrMut};
use candle_core::cuda_backend::{CudaDType, DeviceId};
use candle_core::{CudaDevice, CudaStorage, DType, Layout, Shape, Tensor};

/// Largest workspace an algorithm may ask for. cuDNN's tensor-core kernels work in NHWC and
/// convert NCHW tensors through the workspace, which at the VAE's full resolution (128 channels
/// at 1024², f32: input and output 512 MiB each) takes just over a gigabyte.
const MAX_WORKSPACE: usize = 2 << 30;

fn err(e: result::CudnnError) -> candle_core::Error {
    candle_core::Error::Msg(format!("cuDNN: {e:?}"))
}

struct Handle(sys::cudnnHandle_t);

impl Drop for Handle {
    fn drop(&mut self) {
        // SAFETY: created by create_handle, destroyed once.
        let _ = unsafe { result::destroy_handle(self.0) };
    }
}

thread_local! {
    // cuDNN handles may not be shared between threads; one per thread and device, bound to the
    // device's (per-thread) stream, like candle's own.
    static HANDLES: RefCell<HashMap<DeviceId, Handle>> = RefCell::new(HashMap::new());
}

#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct Problem {
    device: DeviceId,
    dtype: DType,
    x: [i32; 4],
    w: [i32; 4],
    pad: i32,
    stride: i32,
    dilation: i32,
    tf32: bool,
}

#[derive(Clone, Copy)]
struct Plan {
    algo: sys::cudnnConvolutionFwdAlgo_t,
    workspace: usize,
}

static PLANS: Mutex<Option<HashMap<Problem, Plan>>> = Mutex::new(None);

fn cached_plan(problem: &Problem) -> Option<Plan> {
    PLANS.lock().expect("plans").as_ref()?.get(problem).copied()
}

fn cache_plan(problem: Problem, plan: Plan) {
    PLANS
        .lock()
        .expect("plans")
        .get_or_insert_with(HashMap::new)
        .insert(problem, plan);
}

fn allow_tf32() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("HYPERLORA_ALLOW_TF32").is_ok_and(|v| v == "1"))
}

/// Descriptors of one problem, destroyed on drop.
struct Descriptors {
    x: sys::cudnnTensorDescriptor_t,
    w: sys::cudnnFilterDescriptor_t,
    y: sys::cudnnTensorDescriptor_t,
    conv: sys::cudnnConvolutionDescriptor_t,
}

impl Drop for Descriptors {
    fn drop(&mut self) {
        // SAFETY: each was created once in `Descriptors::new`.
        unsafe {
            let _ = result::destroy_tensor_descriptor(self.x);
            let _ = result::destroy_filter_descriptor(self.w);
            let _ = result::destroy_tensor_descriptor(self.y);
            let _ = result::destroy_convolution_descriptor(self.conv);
        }
    }
}

impl Descriptors {
    fn new(p: &Problem, y: [i32; 4]) -> Result<Self, result::CudnnError> {
        use sys::cudnnDataType_t as D;
        let data = match p.dtype {
            DType::F16 => D::CUDNN_DATA_HALF,
            DType::BF16 => D::CUDNN_DATA_BFLOAT16,
            _ => D::CUDNN_DATA_FLOAT,
        };
        let nchw = sys::cudnnTensorFormat_t::CUDNN_TENSOR_NCHW;
        let d = Descriptors {
            x: result::create_tensor_descriptor()?,
            w: result::create_filter_descriptor()?,
            y: result::create_tensor_descriptor()?,
            conv: result::create_convolution_descriptor()?,
        };
        let math = match (p.dtype, p.tf32) {
            (DType::F32, false) => sys::cudnnMathType_t::CUDNN_FMA_MATH,
            (DType::F32, true) => sys::cudnnMathType_t::CUDNN_DEFAULT_MATH,
            _ => sys::cudnnMathType_t::CUDNN_TENSOR_OP_MATH,
        };
        // SAFETY: freshly created descriptors.
        unsafe {
            result::set_tensor4d_descriptor(d.x, nchw, data, p.x)?;
            result::set_filter4d_descriptor(d.w, data, nchw, p.w)?;
            result::set_tensor4d_descriptor(d.y, nchw, data, y)?;
            result::set_convolution2d_descriptor(
                d.conv,
                p.pad,
                p.pad,
                p.stride,
                p.stride,
                p.dilation,
                p.dilation,
                sys::cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION,
                D::CUDNN_DATA_FLOAT,
            )?;
            result::set_convolution_math_type(d.conv, math)?;
        }
        Ok(d)
    }
}

/// Device buffers of one search: the problem's own input, filter and output, and a scratch
/// workspace that bounds what the candidates may use (and what the search allocates).
struct SearchBuffers {
    x: u64,
    w: u64,
    y: u64,
    workspace: u64,
    workspace_size: usize,
}

/// The fastest deterministic algorithm within the workspace, found by timing the candidates on
/// the problem's buffers (`cudnnFindConvolutionForwardAlgorithmEx`).
fn find_plan(
    handle: sys::cudnnHandle_t,
    d: &Descriptors,
    b: &SearchBuffers,
) -> Result<Plan, result::CudnnError> {
    const N: usize = 10;
    // SAFETY: plain-data out parameters; descriptors and buffers match.
    let mut perf: [sys::cudnnConvolutionFwdAlgoPerf_t; N] = unsafe { std::mem::zeroed() };
    let mut count = 0;
    unsafe {
        sys::cudnnFindConvolutionForwardAlgorithmEx(
            handle,
            d.x,
            b.x as *const std::ffi::c_void,
            d.w,
            b.w as *const std::ffi::c_void,
            d.conv,
            d.y,
            b.y as *mut std::ffi::c_void,
            N as i32,
            &mut count,
            perf.as_mut_ptr(),
            b.workspace as *mut std::ffi::c_void,
            b.workspace_size,
        )
        .result()?;
    }
    let found = &perf[..count.max(0) as usize];
    if std::env::var_os("HYPERLORA_CUDNN_LOG").is_some() {
        for p in found {
            eprintln!(
                "cudnn find: {:?} {:?} {:.3} ms, {} MiB, {:?}",
                p.algo,
                p.status,
                p.time,
                p.memory >> 20,
                p.determinism
            );
        }
    }
    let ok = |p: &&sys::cudnnConvolutionFwdAlgoPerf_t| {
        p.status == sys::cudnnStatus_t::CUDNN_STATUS_SUCCESS && p.memory <= b.workspace_size
    };
    let best = found
        .iter()
        .filter(ok)
        .find(|p| p.determinism == sys::cudnnDeterminism_t::CUDNN_DETERMINISTIC)
        .or_else(|| found.iter().find(ok))
        .ok_or(result::CudnnError(
            sys::cudnnStatus_t::CUDNN_STATUS_NOT_SUPPORTED,
        ))?;
    Ok(Plan {
        algo: best.algo,
        workspace: best.memory,
    })
}

struct Conv2d {
    pad: usize,
    stride: usize,
    dilation: usize,
}

impl candle_core::CustomOp2 for Conv2d {
    fn name(&self) -> &'static str {
        "hyperlora-cudnn-conv2d"
    }

    cuda_only!("cuDNN convolution", _s1 _l1, _s2 _l2);

    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        xl: &Layout,
        w: &CudaStorage,
        wl: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        by_dtype!(x.dtype(), launch_conv2d(self, x, xl, w, wl))
    }
}

fn launch_conv2d<T: CudaDType + candle_core::cuda_backend::cudarc::driver::DeviceRepr>(
    op: &Conv2d,
    x: &CudaStorage,
    xl: &Layout,
    w: &CudaStorage,
    wl: &Layout,
) -> candle_core::Result<(CudaStorage, Shape)> {
    let (n, c, h, wd) = xl.shape().dims4()?;
    let (k, _, r, s) = wl.shape().dims4()?;
    let out = |size: usize, kernel: usize| {
        (size + 2 * op.pad - op.dilation * (kernel - 1) - 1) / op.stride + 1
    };
    let (ho, wo) = (out(h, r), out(wd, s));
    let dev: &CudaDevice = &x.device;
    let problem = Problem {
        device: dev.id(),
        dtype: x.dtype(),
        x: [n, c, h, wd].map(|v| v as i32),
        w: [k, c, r, s].map(|v| v as i32),
        pad: op.pad as i32,
        stride: op.stride as i32,
        dilation: op.dilation as i32,
        tf32: allow_tf32(),
    };
    let y_dims = [n, k, ho, wo].map(|v| v as i32);
    let stream = dev.cuda_stream();
    let d = Descriptors::new(&problem, y_dims).map_err(err)?;
    let xs = x.as_cuda_slice::<T>()?.slice(xl.start_offset()..);
    let ws = w.as_cuda_slice::<T>()?.slice(wl.start_offset()..);
    // SAFETY: cuDNN writes every output element (beta = 0).
    let mut y = unsafe { dev.alloc::<T>(n * k * ho * wo)? };
    HANDLES.with(|handles| -> candle_core::Result<()> {
        let mut handles = handles.borrow_mut();
        let handle = match handles.entry(problem.device) {
            std::collections::hash_map::Entry::Occupied(e) => e.get().0,
            std::collections::hash_map::Entry::Vacant(e) => {
                stream
                    .context()
                    .bind_to_thread()
                    .map_err(candle_core::Error::wrap)?;
                let handle = Handle(result::create_handle().map_err(err)?);
                // SAFETY: a live handle and candle's stream for this device.
                unsafe { result::set_stream(handle.0, stream.cu_stream() as _) }.map_err(err)?;
                e.insert(handle).0
            }
        };
        let (x_ptr, _x_guard) = xs.device_ptr(&stream);
        let (w_ptr, _w_guard) = ws.device_ptr(&stream);
        let (y_ptr, _y_guard) = y.device_ptr_mut(&stream);
        let plan = match cached_plan(&problem) {
            Some(plan) => plan,
            None => {
                // Room for cuDNN's NHWC copies of input and output, within the bound.
                let bytes = (n * c * h * wd + n * k * ho * wo) * x.dtype().size_in_bytes();
                let size = (2 * bytes + (64 << 20)).min(MAX_WORKSPACE);
                // SAFETY: scratch space, written by the search only.
                let mut scratch = unsafe { dev.alloc::<u8>(size)? };
                let (scratch_ptr, _guard) = scratch.device_ptr_mut(&stream);
                let buffers = SearchBuffers {
                    x: x_ptr,
                    w: w_ptr,
                    y: y_ptr,
                    workspace: scratch_ptr,
                    workspace_size: size,
                };
                let plan = find_plan(handle, &d, &buffers).map_err(err)?;
                cache_plan(problem, plan);
                plan
            }
        };
        // SAFETY: the workspace is only used by this launch.
        let mut workspace = unsafe { dev.alloc::<u8>(plan.workspace.max(1))? };
        let (alpha, beta) = (1f32, 0f32);
        let (ws_ptr, _ws_guard) = workspace.device_ptr_mut(&stream);
        // SAFETY: descriptors match the buffers' shapes and dtype; f32 scaling parameters for
        // the f32 compute type.
        unsafe {
            result::convolution_forward(
                handle,
                &alpha as *const f32 as *const std::ffi::c_void,
                d.x,
                x_ptr as *const std::ffi::c_void,
                d.w,
                w_ptr as *const std::ffi::c_void,
                d.conv,
                plan.algo,
                ws_ptr as *mut std::ffi::c_void,
                plan.workspace,
                &beta as *const f32 as *const std::ffi::c_void,
                d.y,
                y_ptr as *mut std::ffi::c_void,
            )
        }
        .map_err(err)
    })?;
    Ok((
        CudaStorage::wrap_cuda_slice(y, dev.clone()),
        Shape::from((n, k, ho, wo)),
    ))
}

/// Convolution of contiguous NCHW `x` with `weight` [K, C, R, S] (groups = 1), no bias.
pub(super) fn conv2d(
    x: &Tensor,
    weight: &Tensor,
    padding: usize,
    stride: usize,
    dilation: usize,
) -> candle_core::Result<Tensor> {
    let op = Conv2d {
        pad: padding,
        stride,
        dilation,
    };
    x.contiguous()?.apply_op2_no_bwd(&weight.contiguous()?, &op)
}
