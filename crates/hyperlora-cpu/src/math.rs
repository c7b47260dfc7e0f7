//! Branch-free `exp`, SiLU and exact (erf) GELU for f32 that the compiler vectorises, and
//! [`for_cpu!`], which compiles a loop once for AVX2+FMA and once for the baseline target and
//! picks at run time.
//!
//! Accuracy: `exp` is Cephes' `expf` polynomial (relative error ≈ 1e-7 on [-87, 88]); GELU uses
//! the complementary error function of Numerical Recipes' `erfcc` (relative error 1.2e-7 in exact
//! arithmetic, < 2e-6 in f32), which keeps GELU's small negative tail accurate: the `1 + erf`
//! form loses it to cancellation in f32.

/// How the polynomials below multiply and add: [`Fused`] (one rounding, the FMA instruction) in
/// code compiled for AVX2+FMA, [`Separate`] where `f32::mul_add` would be a library call (x86-64
/// without FMA). The fused form shortens every Horner step to one instruction: a third off an
/// `exp` (docs/cpu.md). [`for_cpu!`] picks one per compiled copy of a loop.
pub trait MulAdd {
    /// `a · b + c`.
    fn mul_add(a: f32, b: f32, c: f32) -> f32;
}

/// `a · b + c` rounded once.
pub struct Fused;

/// `a · b + c` rounded twice.
pub struct Separate;

impl MulAdd for Fused {
    #[inline(always)]
    fn mul_add(a: f32, b: f32, c: f32) -> f32 {
        a.mul_add(b, c)
    }
}

impl MulAdd for Separate {
    #[inline(always)]
    fn mul_add(a: f32, b: f32, c: f32) -> f32 {
        a * b + c
    }
}

/// The baseline target's choice: arm64 always has FMA.
#[cfg(target_arch = "aarch64")]
pub type Baseline = Fused;
#[cfg(not(target_arch = "aarch64"))]
pub type Baseline = Separate;

/// `exp(x)` for x in [-87.3, 88.7] (clamped outside).
#[inline(always)]
pub fn exp<M: MulAdd>(x: f32) -> f32 {
    let x = x.clamp(-87.3, 88.7);
    // n = round(x / ln 2) with the 1.5·2²³ trick (no rounding instruction needed): `shifted`
    // is 1.5·2²³ + n, whose bits are those of 1.5·2²³ plus n.
    let shifted = M::mul_add(x, std::f32::consts::LOG2_E, 12_582_912.0);
    let n = shifted - 12_582_912.0;
    let r = M::mul_add(n, -0.693_359_4, x);
    let r = M::mul_add(n, 2.121_944_4e-4, r);
    let p = 1.987_569_1e-4;
    let p = M::mul_add(p, r, 1.398_199_9e-3);
    let p = M::mul_add(p, r, 8.333_452e-3);
    let p = M::mul_add(p, r, 4.166_579_6e-2);
    let p = M::mul_add(p, r, 1.666_666_5e-1);
    let p = M::mul_add(p, r, 0.5);
    let p = M::mul_add(p * r, r, r) + 1.0;
    // 2ⁿ from the bits: `n as i32` would not vectorise (Rust's saturating conversion).
    let n = shifted.to_bits().wrapping_sub(12_582_912f32.to_bits());
    p * f32::from_bits(n.wrapping_add(127) << 23)
}

/// `x · sigmoid(x)`.
#[inline(always)]
pub fn silu<M: MulAdd>(x: f32) -> f32 {
    x / (1.0 + exp::<M>(-x))
}

/// `x · Φ(x)` with the exact normal CDF, as PyTorch's `gelu(approximate="none")`.
#[inline(always)]
pub fn gelu<M: MulAdd>(x: f32) -> f32 {
    let z = x.abs() * std::f32::consts::FRAC_1_SQRT_2;
    let t = 1.0 / M::mul_add(0.5, z, 1.0);
    let poly = M::mul_add(t, 0.170_872_77, -0.822_152_23);
    let poly = M::mul_add(t, poly, 1.488_515_9);
    let poly = M::mul_add(t, poly, -1.135_204);
    let poly = M::mul_add(t, poly, 0.278_868_07);
    let poly = M::mul_add(t, poly, -0.186_288_06);
    let poly = M::mul_add(t, poly, 0.096_784_18);
    let poly = M::mul_add(t, poly, 0.374_091_96);
    let poly = M::mul_add(t, poly, 1.000_023_7);
    let poly = M::mul_add(t, poly, -1.265_512_2);
    // erfc(|x|/√2); Φ(x) = erfc(-x/√2) / 2.
    let erfc = t * exp::<M>(M::mul_add(-z, z, poly));
    let half = 0.5 * erfc;
    x * if x < 0.0 { half } else { 1.0 - half }
}

/// Defines `fn $name<M>(args)` that runs `$body` compiled for AVX2+FMA on x86-64 CPUs that have
/// them and for the baseline target elsewhere: the branch-free math above then vectorises 8 wide.
/// Inside the body `M` names the [`MulAdd`] of the copy (`exp::<M>(x)`); the function itself
/// takes no type parameter.
macro_rules! for_cpu {
    ($(#[$meta:meta])* $vis:vis fn $name:ident<$m:ident>($($arg:ident: $ty:ty),* $(,)?) $body:block) => {
        $(#[$meta])*
        $vis fn $name($($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                unsafe fn fast($($arg: $ty),*) {
                    type $m = $crate::math::Fused;
                    $body
                }
                if $crate::has_avx2_fma() {
                    // SAFETY: the CPU has AVX2 and FMA.
                    return unsafe { fast($($arg),*) };
                }
            }
            #[inline(always)]
            fn plain($($arg: $ty),*) {
                type $m = $crate::math::Baseline;
                $body
            }
            plain($($arg),*)
        }
    };
}
pub(crate) use for_cpu;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_to_libm() {
        close_to_libm_with::<Separate>();
        close_to_libm_with::<Fused>();
    }

    fn close_to_libm_with<M: MulAdd>() {
        let exp = exp::<M>;
        let silu = silu::<M>;
        let gelu = gelu::<M>;
        for i in -2000..=2000 {
            let x = i as f32 * 0.01;
            let e = (x as f64).exp();
            assert!(((exp(x) as f64 - e) / e).abs() < 3e-7, "exp({x})");
            let s = x as f64 / (1.0 + (-x as f64).exp());
            assert!(
                (silu(x) as f64 - s).abs() < 3e-7 * (1.0 + s.abs()),
                "silu({x})"
            );
        }
        // GELU against erf's Taylor series in f64 (exact enough for |x| ≤ 4).
        for i in -400..=400 {
            let x = i as f64 * 0.01;
            let g = x * 0.5 * (1.0 + erf(x / std::f64::consts::SQRT_2));
            let ours = gelu(x as f32) as f64;
            assert!(
                (ours - g).abs() < 2e-6 * g.abs() + 1e-9,
                "gelu({x}): {ours} vs {g}"
            );
        }
        // The negative tail keeps its relative accuracy: x·Φ(x) with Φ(-5), Φ(-8) from tables.
        for (x, phi) in [
            (-5.0f32, 2.866_515_718_791_939e-7),
            (-8.0, 6.220_960_574_271_785e-16),
        ] {
            let g = x as f64 * phi;
            let rel = ((gelu(x) as f64 - g) / g).abs();
            assert!(rel < 1e-5, "gelu({x}): relative error {rel:e}");
        }
        assert!(gelu(-30.0).abs() < 1e-30);
        assert_eq!(gelu(30.0), 30.0);
    }

    /// erf by its Taylor series (|x| ≤ 7.1 here; terms alternate, f64 is enough).
    fn erf(x: f64) -> f64 {
        let (mut term, mut sum, mut n) = (x, x, 0.0);
        while term.abs() > 1e-17 * sum.abs() {
            n += 1.0;
            term *= -x * x / n;
            sum += term / (2.0 * n + 1.0);
        }
        sum * 2.0 / std::f64::consts::PI.sqrt()
    }
}
