//! LyCORIS weight updates, rebuilt as full `ΔW` for merging: LoHa (Hadamard product of two
//! low-rank products) and LoKr (Kronecker product), in the forms their files store.
//!
//! Formulas, and which tensor is which, follow LyCORIS (`lycoris/modules/loha.py` `LohaModule`,
//! `lycoris/modules/lokr.py` `LokrModule`, `lycoris/functional/general.py` `rebuild_tucker`,
//! `lycoris/functional/lokr.py` `make_kron`), the definitions ComfyUI's and A1111's loaders
//! apply to the same files; PEFT's `tuners/loha` `make_weight` / `make_weight_cp` is the same
//! LoHa. The scale `alpha / r` is applied by the caller ([`super::update::LoraUpdate::scale`]).

use candle_core::{DType, Device, Tensor};

use crate::{Error, Result};

/// LoHa: `ΔW = (w1a @ w1b) ⊙ (w2a @ w2b)`, reshaped to the layer's weight (a convolution's
/// `[out, in·kh·kw]` becomes `[out, in, kh, kw]`), scaled by `alpha / r` with
/// `r = hada_w1_b.shape[0]`. With `hada_t1`/`hada_t2` (Tucker / CP form, convolutions) each
/// factor is `einsum("i j k l, j r, i p -> p r k l", t, w_b, w_a)`: `w_a` is then `[r, out]` and
/// `w_b` `[r, in]`.
#[derive(Debug, Clone)]
pub struct Loha {
    pub w1a: Tensor,
    pub w1b: Tensor,
    pub w2a: Tensor,
    pub w2b: Tensor,
    /// `(hada_t1, hada_t2)`, each `[r, r, kh, kw]`.
    pub tucker: Option<(Tensor, Tensor)>,
}

/// One Kronecker factor of a LoKr module: stored whole, as a low-rank product `a @ b`, or (w2
/// only) in Tucker form `einsum("i j k l, i p, j r -> p r k l", t, a, b)`.
#[derive(Debug, Clone)]
pub enum KronFactor {
    Full(Tensor),
    Product { a: Tensor, b: Tensor },
    Tucker { t: Tensor, a: Tensor, b: Tensor },
}

/// LoKr: `ΔW = kron(w1, w2)` (w1 `[a, c]` unsqueezed to w2's rank for convolutions), scaled by
/// `alpha / r` where `r` is the rank of the factored part (w2's when both are factored, as
/// ComfyUI reads it; LyCORIS writes one rank for both), and by 1 when neither is factored
/// (LyCORIS `LokrModule` sets `alpha = lora_dim` then).
#[derive(Debug, Clone)]
pub struct Lokr {
    pub w1: KronFactor,
    pub w2: KronFactor,
}

fn dims2(name: &str, t: &Tensor) -> Result<(usize, usize)> {
    match *t.dims() {
        [a, b] => Ok((a, b)),
        ref d => Err(Error::bad_weights(format!(
            "{name} has shape {d:?}, expected a matrix"
        ))),
    }
}

fn dims4(name: &str, t: &Tensor) -> Result<[usize; 4]> {
    match *t.dims() {
        [a, b, c, d] => Ok([a, b, c, d]),
        ref d => Err(Error::bad_weights(format!(
            "{name} has shape {d:?}, expected [r, r, kh, kw]"
        ))),
    }
}

fn mismatch(what: &str, detail: String) -> Error {
    Error::bad_weights(format!("{what}: {detail}"))
}

impl Loha {
    /// The rank `alpha` is divided by: `hada_w1_b.shape[0]`.
    pub fn rank(&self) -> usize {
        self.w1b.dims().first().copied().unwrap_or(0)
    }

    /// Checks that the four (six) tensors compose; returns `ΔW`'s shape (`[out, in·k]`, or
    /// `[out, in, kh, kw]` in Tucker form). `name` is the module's key prefix.
    pub fn validate(&self, name: &str) -> Result<Vec<usize>> {
        let shape = |i: usize, a: &Tensor, b: &Tensor, t: Option<&Tensor>| -> Result<Vec<usize>> {
            let (ka, kb) = (format!("{name}.hada_w{i}_a"), format!("{name}.hada_w{i}_b"));
            let (a0, a1) = dims2(&ka, a)?;
            let (b0, b1) = dims2(&kb, b)?;
            match t {
                None if a1 == b0 && b0 > 0 => Ok(vec![a0, b1]),
                None => Err(mismatch(
                    name,
                    format!("{ka} [{a0}, {a1}] @ {kb} [{b0}, {b1}] do not compose"),
                )),
                Some(t) => {
                    let kt = format!("{name}.hada_t{i}");
                    let [t0, t1, kh, kw] = dims4(&kt, t)?;
                    if t0 == a0 && t1 == b0 && b0 > 0 {
                        Ok(vec![a1, b1, kh, kw])
                    } else {
                        Err(mismatch(
                            name,
                            format!(
                                "{kt} {:?} does not join {ka} [{a0}, {a1}] and {kb} [{b0}, {b1}]",
                                t.dims()
                            ),
                        ))
                    }
                }
            }
        };
        let (t1, t2) = match &self.tucker {
            Some((t1, t2)) => (Some(t1), Some(t2)),
            None => (None, None),
        };
        let s1 = shape(1, &self.w1a, &self.w1b, t1)?;
        let s2 = shape(2, &self.w2a, &self.w2b, t2)?;
        if s1 != s2 {
            return Err(mismatch(
                name,
                format!("its two Hadamard factors have shapes {s1:?} and {s2:?}"),
            ));
        }
        Ok(s1)
    }

    /// `ΔW` (unscaled) in f32 on `device`, shape as [`Self::validate`] gives it.
    pub fn delta(&self, device: &Device) -> Result<Tensor> {
        let f = |t: &Tensor| -> Result<Tensor> { Ok(t.to_device(device)?.to_dtype(DType::F32)?) };
        let (m1, m2) = match &self.tucker {
            None => (
                f(&self.w1a)?.matmul(&f(&self.w1b)?)?,
                f(&self.w2a)?.matmul(&f(&self.w2b)?)?,
            ),
            Some((t1, t2)) => (
                tucker(&f(t1)?, &f(&self.w1a)?, &f(&self.w1b)?)?,
                tucker(&f(t2)?, &f(&self.w2a)?, &f(&self.w2b)?)?,
            ),
        };
        Ok((m1 * m2)?)
    }
}

/// `einsum("i j k l, i p, j r -> p r k l", t, a, b)` (LyCORIS `rebuild_tucker`): `t`
/// `[i, j, kh, kw]`, `a` `[i, p]`, `b` `[j, r]` → `[p, r, kh, kw]`. As one batched product over
/// the kernel positions: `aᵀ · t[:, :, k, l] · b`.
pub(crate) fn tucker(t: &Tensor, a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let (i, j, kh, kw) = t.dims4()?;
    let (p, r) = (a.dim(1)?, b.dim(1)?);
    let per_position = t
        .permute((2, 3, 0, 1))?
        .reshape((kh * kw, i, j))?
        .contiguous()?;
    let at = a.t()?.contiguous()?.broadcast_as((kh * kw, p, i))?;
    let out = at.matmul(&per_position)?.broadcast_matmul(b)?; // [kh·kw, p, r]
    Ok(out
        .reshape((kh, kw, p, r))?
        .permute((2, 3, 0, 1))?
        .contiguous()?)
}

impl KronFactor {
    /// `(rank, shape)`: the rank of a factored form (`None` when stored whole), and the
    /// factor's shape (`[rows, cols]`, or `[rows, cols, kh, kw]`).
    fn validate(&self, name: &str, which: &str) -> Result<(Option<usize>, Vec<usize>)> {
        let key = |s: &str| format!("{name}.lokr_{which}{s}");
        match self {
            KronFactor::Full(w) => match w.rank() {
                2 | 4 if w.elem_count() > 0 => Ok((None, w.dims().to_vec())),
                _ => Err(mismatch(
                    name,
                    format!("{} has shape {:?}", key(""), w.dims()),
                )),
            },
            KronFactor::Product { a, b } => {
                let (a0, a1) = dims2(&key("_a"), a)?;
                let (b0, b1) = dims2(&key("_b"), b)?;
                if a1 != b0 || b0 == 0 {
                    return Err(mismatch(
                        name,
                        format!(
                            "{} [{a0}, {a1}] @ {} [{b0}, {b1}] do not compose",
                            key("_a"),
                            key("_b")
                        ),
                    ));
                }
                Ok((Some(b0), vec![a0, b1]))
            }
            KronFactor::Tucker { t, a, b } => {
                let [t0, t1, kh, kw] = dims4(&format!("{name}.lokr_t2"), t)?;
                let (a0, a1) = dims2(&key("_a"), a)?;
                let (b0, b1) = dims2(&key("_b"), b)?;
                if t0 != a0 || t1 != b0 || b0 == 0 {
                    return Err(mismatch(
                        name,
                        format!(
                            "{name}.lokr_t2 {:?} does not join {} [{a0}, {a1}] and {} [{b0}, {b1}]",
                            t.dims(),
                            key("_a"),
                            key("_b")
                        ),
                    ));
                }
                Ok((Some(b0), vec![a1, b1, kh, kw]))
            }
        }
    }

    fn rebuild(&self, device: &Device) -> Result<Tensor> {
        let f = |t: &Tensor| -> Result<Tensor> { Ok(t.to_device(device)?.to_dtype(DType::F32)?) };
        match self {
            KronFactor::Full(w) => f(w),
            KronFactor::Product { a, b } => Ok(f(a)?.matmul(&f(b)?)?),
            KronFactor::Tucker { t, a, b } => tucker(&f(t)?, &f(a)?, &f(b)?),
        }
    }
}

impl Lokr {
    /// The rank `alpha` is divided by (see the type's docs); `None`: scale 1.
    pub fn rank(&self) -> Option<usize> {
        let rank = |f: &KronFactor| match f {
            KronFactor::Full(_) => None,
            KronFactor::Product { b, .. } | KronFactor::Tucker { b, .. } => {
                b.dims().first().copied()
            }
        };
        rank(&self.w2).or_else(|| rank(&self.w1))
    }

    /// Checks the factors; returns `ΔW`'s shape: `[a·b, c·d]` or `[a·b, c·d, kh, kw]`.
    pub fn validate(&self, name: &str) -> Result<Vec<usize>> {
        let (_, s1) = self.w1.validate(name, "w1")?;
        let (_, s2) = self.w2.validate(name, "w2")?;
        if s1.len() != 2 {
            return Err(mismatch(
                name,
                format!("lokr_w1 has shape {s1:?}, expected a matrix"),
            ));
        }
        let too_big = || mismatch(name, "its Kronecker product overflows".into());
        let rows = s1[0].checked_mul(s2[0]).ok_or_else(too_big)?;
        let cols = s1[1].checked_mul(s2[1]).ok_or_else(too_big)?;
        let mut shape = vec![rows, cols];
        shape.extend_from_slice(&s2[2..]);
        shape
            .iter()
            .try_fold(1usize, |n, &d| n.checked_mul(d))
            .ok_or_else(too_big)?;
        Ok(shape)
    }

    /// `kron(w1, w2)` (unscaled) in f32 on `device`.
    pub fn delta(&self, device: &Device) -> Result<Tensor> {
        let w1 = self.w1.rebuild(device)?;
        let w2 = self.w2.rebuild(device)?;
        let (a, c) = w1.dims2()?;
        let (b, d) = (w2.dim(0)?, w2.dim(1)?);
        let kernel = &w2.dims()[2..];
        // kron: out[i1·b + i2, j1·d + j2, …] = w1[i1, j1] · w2[i2, j2, …], as one broadcast
        // product [a, 1, c, 1, …] · [1, b, 1, d, …] → [a, b, c, d, …].
        let mut s1 = vec![a, 1, c, 1];
        let mut s2 = vec![1, b, 1, d];
        s1.extend(kernel.iter().map(|_| 1));
        s2.extend_from_slice(kernel);
        let full = w1.reshape(s1)?.broadcast_mul(&w2.reshape(s2)?)?;
        let mut shape = vec![a * b, c * d];
        shape.extend_from_slice(kernel);
        Ok(full.reshape(shape)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::assert_close;

    fn t(shape: &[usize], seed: f64) -> Tensor {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|i| ((i as f64 * 0.37 + seed).sin()) as f32)
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    /// Tucker rebuild against the einsum written out as loops.
    #[test]
    fn tucker_matches_the_einsum() {
        let (i, j, p, r, kh, kw) = (2, 3, 4, 5, 3, 2);
        let (tt, a, b) = (t(&[i, j, kh, kw], 0.1), t(&[i, p], 0.7), t(&[j, r], 1.3));
        let got = tucker(&tt, &a, &b).unwrap();
        let tv = tt.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let av = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let bv = b.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let mut want = vec![0f32; p * r * kh * kw];
        for pp in 0..p {
            for rr in 0..r {
                for k in 0..kh {
                    for l in 0..kw {
                        let mut s = 0.0;
                        for ii in 0..i {
                            for jj in 0..j {
                                s += tv[((ii * j + jj) * kh + k) * kw + l]
                                    * av[ii * p + pp]
                                    * bv[jj * r + rr];
                            }
                        }
                        want[((pp * r + rr) * kh + k) * kw + l] = s;
                    }
                }
            }
        }
        let want = Tensor::from_vec(want, (p, r, kh, kw), &Device::Cpu).unwrap();
        assert_close("tucker", &got, &want, 1e-5);
    }

    #[test]
    fn kron_matches_its_definition() {
        let w1 = t(&[2, 3], 0.2);
        let w2 = t(&[4, 5, 3, 3], 0.9);
        let lokr = Lokr {
            w1: KronFactor::Full(w1.clone()),
            w2: KronFactor::Full(w2.clone()),
        };
        assert_eq!(lokr.validate("m").unwrap(), [8, 15, 3, 3]);
        assert_eq!(lokr.rank(), None);
        let got = lokr.delta(&Device::Cpu).unwrap();
        let (v1, v2) = (
            w1.to_vec2::<f32>().unwrap(),
            w2.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        );
        let g = got.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for (i1, row) in v1.iter().enumerate() {
            for (j1, x) in row.iter().enumerate() {
                for i2 in 0..4 {
                    for j2 in 0..5 {
                        for k in 0..9 {
                            let out = (((i1 * 4 + i2) * 15) + j1 * 5 + j2) * 9 + k;
                            let w = v2[((i2 * 5) + j2) * 9 + k];
                            assert!((g[out] - x * w).abs() < 1e-6);
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn malformed_factors_name_the_tensor() {
        let loha = Loha {
            w1a: t(&[4, 2], 0.0),
            w1b: t(&[3, 6], 0.0),
            w2a: t(&[4, 2], 0.0),
            w2b: t(&[2, 6], 0.0),
            tucker: None,
        };
        let e = loha.validate("lora_unet_x").unwrap_err();
        assert!(e.message.contains("lora_unet_x.hada_w1_b"), "{e}");
        let lokr = Lokr {
            w1: KronFactor::Full(t(&[2, 2], 0.0)),
            w2: KronFactor::Product {
                a: t(&[3, 2], 0.0),
                b: t(&[0, 4], 0.0),
            },
        };
        assert!(lokr.validate("m").is_err());
    }
}
