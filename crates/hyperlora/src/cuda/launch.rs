//! Launching the kernels of kernels.cu through candle's custom ops.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{CudaStorage, CustomOp3, DType, Layout, Shape, Tensor};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/kernels.ptx"));
const MODULE: &str = "hyperlora_kernels";
const HEAD_DIM: usize = 64;

/// Row strides (elements) of a [B, S, W] layout whose last dimension is contiguous, if the
/// kernel can read it with 16-byte vectors: (offset, batch stride, row stride).
fn rows_of(l: &Layout) -> Option<(usize, usize, usize)> {
    let s = l.stride();
    let aligned = |x: usize| x.is_multiple_of(8);
    (s.len() == 3 && s[2] == 1 && aligned(s[0]) && aligned(s[1]) && aligned(l.start_offset()))
        .then_some((l.start_offset(), s[0], s[1]))
}

struct FlashAttention {
    heads: usize,
    scale: f32,
}

impl CustomOp3 for FlashAttention {
    fn name(&self) -> &'static str {
        "hyperlora-flash-attention"
    }

    cuda_only!("flash attention", _s1 _l1, _s2 _l2, _s3 _l3);

    fn cuda_fwd(
        &self,
        q: &CudaStorage,
        ql: &Layout,
        k: &CudaStorage,
        kl: &Layout,
        v: &CudaStorage,
        vl: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        by_dtype!(q.dtype(), launch_flash_attention(self, q, ql, k, kl, v, vl))
    }
}

fn launch_flash_attention<T: CudaDType + DeviceRepr>(
    op: &FlashAttention,
    q: &CudaStorage,
    ql: &Layout,
    k: &CudaStorage,
    kl: &Layout,
    v: &CudaStorage,
    vl: &Layout,
) -> candle_core::Result<(CudaStorage, Shape)> {
    let (b, sq, width) = ql.shape().dims3()?;
    let sk = kl.shape().dims3()?.1;
    let (Some((qo, q_bs, q_ss)), Some((ko, k_bs, k_ss)), Some((vo, v_bs, v_ss))) =
        (rows_of(ql), rows_of(kl), rows_of(vl))
    else {
        candle_core::bail!("flash attention: unsupported layout")
    };
    let dev = &q.device;
    let name = format!("flash_attn_{}", dtype_suffix(q.dtype())?);
    let func = dev.get_or_load_custom_func(&name, MODULE, PTX)?;
    // SAFETY: every element is written by the kernel (rows < sq, all heads and dims).
    let out = unsafe { dev.alloc::<T>(b * sq * width)? };
    let qs = q.as_cuda_slice::<T>()?.slice(qo..);
    let ks = k.as_cuda_slice::<T>()?.slice(ko..);
    let vs = v.as_cuda_slice::<T>()?.slice(vo..);
    let (heads, sq_i, sk_i) = (op.heads as i32, sq as i32, sk as i32);
    let strides = [q_bs, q_ss, k_bs, k_ss, v_bs, v_ss, sq * width, width].map(|s| s as i64);
    let scale_log2 = op.scale * std::f32::consts::LOG2_E;
    let mut builder = func.builder();
    builder.arg(&qs).arg(&ks).arg(&vs).arg(&out);
    builder.arg(&heads).arg(&sq_i).arg(&sk_i);
    for s in &strides {
        builder.arg(s);
    }
    builder.arg(&scale_log2);
    let cfg = LaunchConfig {
        grid_dim: (sq.div_ceil(128) as u32, (b * op.heads) as u32, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: arguments match the kernel's signature in kernels.cu.
    unsafe { builder.launch(cfg) }.w()?;
    Ok((
        CudaStorage::wrap_cuda_slice(out, dev.clone()),
        Shape::from((b, sq, width)),
    ))
}

pub(super) fn flash_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    scale: f64,
) -> candle_core::Result<Option<Tensor>> {
    let supported = matches!(q.dtype(), DType::F16 | DType::BF16)
        && k.dtype() == q.dtype()
        && v.dtype() == q.dtype()
        && q.rank() == 3
        && q.dim(2)? == heads * HEAD_DIM
        && k.dims() == v.dims()
        && k.dim(2)? == q.dim(2)?
        && k.dim(0)? == q.dim(0)?
        && k.dim(1)? > 0
        && [q, k, v].iter().all(|t| rows_of(t.layout()).is_some());
    if !supported {
        return Ok(None);
    }
    let op = FlashAttention {
        heads,
        scale: scale as f32,
    };
    Ok(Some(q.apply_op3_no_bwd(k, v, &op)?))
}

struct GroupNorm {
    groups: usize,
    eps: f32,
    silu: bool,
}

impl CustomOp3 for GroupNorm {
    fn name(&self) -> &'static str {
        "hyperlora-group-norm"
    }

    cuda_only!("fused group norm", _s1 _l1, _s2 _l2, _s3 _l3);

    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        xl: &Layout,
        w: &CudaStorage,
        wl: &Layout,
        b: &CudaStorage,
        bl: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        by_dtype!(x.dtype(), launch_group_norm(self, x, xl, w, wl, b, bl))
    }
}

fn launch_group_norm<T: CudaDType + DeviceRepr>(
    op: &GroupNorm,
    x: &CudaStorage,
    xl: &Layout,
    w: &CudaStorage,
    wl: &Layout,
    b: &CudaStorage,
    bl: &Layout,
) -> candle_core::Result<(CudaStorage, Shape)> {
    let suffix = dtype_suffix(x.dtype())?;
    let dims = xl.shape().dims();
    let (batch, channels) = (dims[0], dims[1]);
    let hw: usize = dims[2..].iter().product();
    let n = channels / op.groups * hw;
    let rows = batch * op.groups;
    // Enough blocks to fill the GPU even when B·G is small (64 at SDXL's 32 groups, B = 2).
    let splits = n.div_ceil(16384).clamp(1, 64);
    let chunk = n.div_ceil(splits);
    let dev = &x.device;
    let xs = x.as_cuda_slice::<T>()?.slice(xl.start_offset()..);
    let ws = w.as_cuda_slice::<T>()?.slice(wl.start_offset()..);
    let bs = b.as_cuda_slice::<T>()?.slice(bl.start_offset()..);
    // SAFETY: the stats kernel writes every partial; the apply kernel every output.
    let partial: CudaSlice<f32> = unsafe { dev.alloc::<f32>(rows * splits * 2)? };
    let out = unsafe { dev.alloc::<T>(batch * channels * hw)? };
    let cfg = LaunchConfig {
        grid_dim: (rows as u32, splits as u32, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    let (n_i, chunk_i, hw_i) = (n as i64, chunk as i64, hw as i64);
    let stats = dev.get_or_load_custom_func(&format!("group_norm_stats_{suffix}"), MODULE, PTX)?;
    let mut builder = stats.builder();
    builder.arg(&xs).arg(&partial).arg(&n_i).arg(&chunk_i);
    // SAFETY: arguments match group_norm_stats in kernels.cu.
    unsafe { builder.launch(cfg) }.w()?;
    let apply = dev.get_or_load_custom_func(&format!("group_norm_apply_{suffix}"), MODULE, PTX)?;
    let (cpg, groups, eps, silu) = (
        (channels / op.groups) as i32,
        op.groups as i32,
        op.eps,
        op.silu as i32,
    );
    let mut builder = apply.builder();
    builder.arg(&xs).arg(&ws).arg(&bs).arg(&partial).arg(&out);
    builder.arg(&n_i).arg(&chunk_i).arg(&hw_i);
    builder.arg(&cpg).arg(&groups).arg(&eps).arg(&silu);
    // SAFETY: arguments match group_norm_apply in kernels.cu.
    unsafe { builder.launch(cfg) }.w()?;
    Ok((
        CudaStorage::wrap_cuda_slice(out, dev.clone()),
        xl.shape().clone(),
    ))
}

pub(super) fn group_norm(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    groups: usize,
    eps: f64,
    silu: bool,
) -> candle_core::Result<Option<Tensor>> {
    let supported = x.rank() >= 3
        && matches!(x.dtype(), DType::F32 | DType::F16 | DType::BF16)
        && weight.dtype() == x.dtype()
        && bias.dtype() == x.dtype()
        && groups > 0
        && x.dim(1)? % groups == 0
        && weight.dims1()? == x.dim(1)?
        && bias.dims1()? == x.dim(1)?
        && x.elem_count() > 0
        && x.elem_count() / x.dim(0)? < i32::MAX as usize;
    if !supported {
        return Ok(None);
    }
    let x = x.contiguous()?;
    let (weight, bias) = (weight.contiguous()?, bias.contiguous()?);
    let op = GroupNorm {
        groups,
        eps: eps as f32,
        silu,
    };
    Ok(Some(x.apply_op3_no_bwd(&weight, &bias, &op)?))
}

/// Blocks for a grid-stride loop over `n` elements: enough to fill any current GPU.
fn elementwise_config(n: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (n.div_ceil(256).clamp(1, 4096) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn dtype_suffix(dtype: DType) -> candle_core::Result<&'static str> {
    Ok(match dtype {
        DType::F32 => "f32",
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        other => candle_core::bail!("hyperlora kernels: unsupported dtype {other:?}"),
    })
}

/// Launches add_bias: `x` + `b` along the dimension with `inner` elements per step, plus `r`
/// (same layout as `x`) when given.
fn launch_add_bias<T: CudaDType + DeviceRepr>(
    x: &CudaStorage,
    xl: &Layout,
    b: &CudaStorage,
    bl: &Layout,
    r: Option<(&CudaStorage, &Layout)>,
    inner: usize,
) -> candle_core::Result<CudaStorage> {
    let n = xl.shape().elem_count();
    let c = bl.shape().elem_count();
    let dev = &x.device;
    let func = dev.get_or_load_custom_func(
        &format!("add_bias_{}", dtype_suffix(x.dtype())?),
        MODULE,
        PTX,
    )?;
    let xs = x.as_cuda_slice::<T>()?.slice(xl.start_offset()..);
    let bs = b.as_cuda_slice::<T>()?.slice(bl.start_offset()..);
    let rs = match r {
        Some((r, rl)) => Some(r.as_cuda_slice::<T>()?.slice(rl.start_offset()..)),
        None => None,
    };
    // SAFETY: the kernel writes all n elements.
    let out = unsafe { dev.alloc::<T>(n)? };
    let (n_i, inner_i, c_i, null) = (n as i64, inner as i64, c as i32, 0u64);
    let mut builder = func.builder();
    builder.arg(&xs).arg(&bs);
    match &rs {
        Some(rs) => builder.arg(rs),
        None => builder.arg(&null),
    };
    builder.arg(&out).arg(&n_i).arg(&inner_i).arg(&c_i);
    // SAFETY: arguments match add_bias in kernels.cu (a null residual pointer is allowed).
    unsafe { builder.launch(elementwise_config(n)) }.w()?;
    Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
}

struct AddBias {
    inner: usize,
}

impl candle_core::CustomOp2 for AddBias {
    fn name(&self) -> &'static str {
        "hyperlora-add-bias"
    }

    cuda_only!("add_bias", _s1 _l1, _s2 _l2);

    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        xl: &Layout,
        b: &CudaStorage,
        bl: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let out = by_dtype!(x.dtype(), launch_add_bias(x, xl, b, bl, None, self.inner))?;
        Ok((out, xl.shape().clone()))
    }
}

struct AddBiasResidual;

impl CustomOp3 for AddBiasResidual {
    fn name(&self) -> &'static str {
        "hyperlora-add-bias-residual"
    }

    cuda_only!("add_bias", _s1 _l1, _s2 _l2, _s3 _l3);

    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        xl: &Layout,
        b: &CudaStorage,
        bl: &Layout,
        r: &CudaStorage,
        rl: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let out = by_dtype!(x.dtype(), launch_add_bias(x, xl, b, bl, Some((r, rl)), 1))?;
        Ok((out, xl.shape().clone()))
    }
}

fn bias_applies(x: &Tensor, bias: &Tensor, channels: usize) -> bool {
    matches!(x.dtype(), DType::F32 | DType::F16 | DType::BF16)
        && bias.dtype() == x.dtype()
        && bias.elem_count() == channels
        && x.elem_count() > 0
        && x.elem_count() < i32::MAX as usize
}

/// `x` + `bias` [C] broadcast over dimension `dim` of `x` (C = x.dim(dim)).
pub(super) fn add_bias(
    x: &Tensor,
    bias: &Tensor,
    dim: usize,
) -> candle_core::Result<Option<Tensor>> {
    if dim >= x.rank() || !bias_applies(x, bias, x.dim(dim)?) {
        return Ok(None);
    }
    let inner: usize = x.dims()[dim + 1..].iter().product();
    let (x, bias) = (x.contiguous()?, bias.contiguous()?);
    Ok(Some(x.apply_op2_no_bwd(&bias, &AddBias { inner })?))
}

/// `x` + `bias` [C] along the last dimension + `residual` (x's shape), in one pass.
pub(super) fn add_bias_residual(
    x: &Tensor,
    bias: &Tensor,
    residual: &Tensor,
) -> candle_core::Result<Option<Tensor>> {
    if x.rank() == 0
        || residual.dims() != x.dims()
        || residual.dtype() != x.dtype()
        || !bias_applies(x, bias, x.dim(x.rank() - 1)?)
    {
        return Ok(None);
    }
    let (x, bias, residual) = (x.contiguous()?, bias.contiguous()?, residual.contiguous()?);
    Ok(Some(x.apply_op3_no_bwd(
        &bias,
        &residual,
        &AddBiasResidual,
    )?))
}

/// Launches geglu over `h` [rows, 2·inner], adding the projection's `bias` [2·inner] if given.
fn launch_geglu<T: CudaDType + DeviceRepr>(
    h: &CudaStorage,
    hl: &Layout,
    bias: Option<(&CudaStorage, &Layout)>,
) -> candle_core::Result<(CudaStorage, Shape)> {
    let dims = hl.shape().dims();
    let inner = dims[dims.len() - 1] / 2;
    let rows = hl.shape().elem_count() / (2 * inner);
    let dev = &h.device;
    let func =
        dev.get_or_load_custom_func(&format!("geglu_{}", dtype_suffix(h.dtype())?), MODULE, PTX)?;
    let hs = h.as_cuda_slice::<T>()?.slice(hl.start_offset()..);
    let bs = match bias {
        Some((b, bl)) => Some(b.as_cuda_slice::<T>()?.slice(bl.start_offset()..)),
        None => None,
    };
    // SAFETY: the kernel writes all rows·inner elements.
    let out = unsafe { dev.alloc::<T>(rows * inner)? };
    let (rows_i, inner_i, null) = (rows as i64, inner as i64, 0u64);
    let mut builder = func.builder();
    builder.arg(&hs);
    match &bs {
        Some(bs) => builder.arg(bs),
        None => builder.arg(&null),
    };
    builder.arg(&out).arg(&rows_i).arg(&inner_i);
    // SAFETY: arguments match geglu in kernels.cu (a null bias pointer is allowed).
    unsafe { builder.launch(elementwise_config(rows * inner)) }.w()?;
    let mut shape = dims.to_vec();
    *shape.last_mut().expect("rank ≥ 1") = inner;
    Ok((
        CudaStorage::wrap_cuda_slice(out, dev.clone()),
        Shape::from(shape),
    ))
}

struct Geglu;

impl candle_core::CustomOp1 for Geglu {
    fn name(&self) -> &'static str {
        "hyperlora-geglu"
    }

    cuda_only!("geglu", _s1 _l1);

    fn cuda_fwd(&self, h: &CudaStorage, hl: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        by_dtype!(h.dtype(), launch_geglu(h, hl, None))
    }
}

struct GegluBias;

impl candle_core::CustomOp2 for GegluBias {
    fn name(&self) -> &'static str {
        "hyperlora-geglu-bias"
    }

    cuda_only!("geglu", _s1 _l1, _s2 _l2);

    fn cuda_fwd(
        &self,
        h: &CudaStorage,
        hl: &Layout,
        b: &CudaStorage,
        bl: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        by_dtype!(h.dtype(), launch_geglu(h, hl, Some((b, bl))))
    }
}

/// value · GELU(gate) for `h` = [..., 2·inner] split into [value | gate] halves, each plus its
/// half of `bias` [2·inner] when given.
pub(super) fn geglu(h: &Tensor, bias: Option<&Tensor>) -> candle_core::Result<Option<Tensor>> {
    let supported = matches!(h.dtype(), DType::F32 | DType::F16 | DType::BF16)
        && h.rank() >= 1
        && h.dim(h.rank() - 1)? % 2 == 0
        && h.elem_count() > 0
        && h.elem_count() < i32::MAX as usize
        && bias.is_none_or(|b| {
            b.dtype() == h.dtype() && b.elem_count() == h.dim(h.rank() - 1).unwrap_or(0)
        });
    if !supported {
        return Ok(None);
    }
    let h = h.contiguous()?;
    Ok(Some(match bias {
        Some(b) => h.apply_op2_no_bwd(&b.contiguous()?, &GegluBias)?,
        None => h.apply_op1_no_bwd(&Geglu)?,
    }))
}
