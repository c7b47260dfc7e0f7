//! Compact identities: the resampler's output tokens ("coefficients") of an identity, which the
//! LoRA bank expands into the kohya LoRA (docs/queue.md, "Compact identities").
//!
//! An identity's LoRA is linear in `[8 × modules, hyper_dim]` f32 tokens, so the tokens (a few
//! hundred KB at the released sizes) stand for the LoRA (tens of MB). Expansion runs the same
//! bank as identity creation, so it is bit-equal to the LoRA made from the photos on a model
//! loaded with the same dtype and device.
//!
//! Format (little-endian), version 1:
//! ```text
//! magic "HLCOEFS\0" | u32 version | [u8; 32] model id | u32 queries | u32 hyper_dim | u8 has_base
//! u32 id photos    | f32 × queries·hyper_dim id tokens
//! [u32 base photos | f32 × queries·hyper_dim base tokens]   (when has_base = 1)
//! u32 embedding length | f32 × length                        (0: none; else 512)
//! ```
//!
//! The embedding is the photos' mean ArcFace embedding, which identity creation keeps for
//! likeness scores (docs/scores.md); the LoRA bank does not use it.

use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use candle_core::Tensor;
use sha2::{Digest, Sha256};

use crate::{Error, Result};

const MAGIC: &[u8; 8] = b"HLCOEFS\0";
const VERSION: u32 = 1;
const HEADER: usize = 8 + 4 + 32 + 4 + 4 + 1;
/// ArcFace's embedding size (antelopev2's glintr100).
const ARCFACE_DIM: usize = 512;

/// One LoRA's tokens `[queries, hyper_dim]` (row-major f32) and the number of photos averaged.
#[derive(Debug, Clone, PartialEq)]
pub struct Tokens {
    pub values: Vec<f32>,
    pub num_photos: u32,
}

impl Tokens {
    /// From the resampler's `[1, queries, hyper_dim]` output.
    pub fn from_tensor(t: &Tensor, num_photos: usize) -> Result<Self> {
        Ok(Self {
            values: t
                .to_dtype(candle_core::DType::F32)?
                .flatten_all()?
                .to_vec1()?,
            num_photos: num_photos as u32,
        })
    }
}

/// An identity in compact form: what [`super::HyperLora::expand`] turns back into its LoRAs.
#[derive(Debug, Clone, PartialEq)]
pub struct IdentityCoefficients {
    /// [`model_id`] of the HyperLoRA folder that made the tokens; only it can expand them.
    pub model_id: [u8; 32],
    /// `8 × modules`.
    pub queries: u32,
    pub hyper_dim: u32,
    pub id: Tokens,
    pub base: Option<Tokens>,
    /// The photos' mean ArcFace embedding, carried along for likeness scores.
    pub arcface: Option<Vec<f32>>,
}

impl IdentityCoefficients {
    pub fn to_bytes(&self) -> Vec<u8> {
        let n = self.queries as usize * self.hyper_dim as usize;
        let parts = 1 + usize::from(self.base.is_some());
        let embedding = self.arcface.as_deref().unwrap_or_default();
        let mut out = Vec::with_capacity(HEADER + parts * (4 + 4 * n) + 4 + 4 * embedding.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&self.model_id);
        out.extend_from_slice(&self.queries.to_le_bytes());
        out.extend_from_slice(&self.hyper_dim.to_le_bytes());
        out.push(u8::from(self.base.is_some()));
        for t in std::iter::once(&self.id).chain(&self.base) {
            out.extend_from_slice(&t.num_photos.to_le_bytes());
            t.values
                .iter()
                .for_each(|v| out.extend_from_slice(&v.to_le_bytes()));
        }
        out.extend_from_slice(&(embedding.len() as u32).to_le_bytes());
        embedding
            .iter()
            .for_each(|v| out.extend_from_slice(&v.to_le_bytes()));
        out
    }

    /// Parses [`IdentityCoefficients::to_bytes`]' output; anything else (truncated, trailing
    /// bytes, another version, non-finite values) is `INVALID_ARGUMENT`.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let bad = |why: String| Error::invalid_argument(format!("identity coefficients: {why}"));
        if bytes.len() < HEADER || &bytes[..8] != MAGIC {
            return Err(bad("not a HyperLoRA coefficients buffer".into()));
        }
        let u32_at = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap());
        let version = u32_at(8);
        if version != VERSION {
            return Err(bad(format!(
                "format version {version}, this build reads {VERSION}"
            )));
        }
        let model_id: [u8; 32] = bytes[12..44].try_into().unwrap();
        let (queries, hyper_dim) = (u32_at(44), u32_at(48));
        let has_base = match bytes[52] {
            0 => false,
            1 => true,
            b => return Err(bad(format!("bad base flag {b}"))),
        };
        let n = (queries as usize)
            .checked_mul(hyper_dim as usize)
            .filter(|&n| n > 0)
            .ok_or_else(|| bad(format!("bad token shape [{queries}, {hyper_dim}]")))?;
        let part = 4 + 4 * n;
        let tokens_end = HEADER + part * (1 + usize::from(has_base));
        let embedding_len = bytes
            .get(tokens_end..tokens_end + 4)
            .map(|_| u32_at(tokens_end) as usize);
        let expected = tokens_end + 4 + 4 * embedding_len.unwrap_or(0);
        if !matches!(embedding_len, Some(0 | ARCFACE_DIM)) || bytes.len() != expected {
            return Err(bad(format!(
                "{} bytes, a [{queries}, {hyper_dim}] identity{} has {expected} (with an embedding of 0 or {ARCFACE_DIM} values)",
                bytes.len(),
                if has_base { " with a Base-LoRA" } else { "" }
            )));
        }
        let floats = |range: std::ops::Range<usize>| -> Result<Vec<f32>> {
            let values: Vec<f32> = bytes[range]
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect();
            if values.iter().any(|v| !v.is_finite()) {
                return Err(bad("a value is not finite".into()));
            }
            Ok(values)
        };
        let tokens = |at: usize| -> Result<Tokens> {
            Ok(Tokens {
                values: floats(at + 4..at + part)?,
                num_photos: u32_at(at),
            })
        };
        Ok(Self {
            model_id,
            queries,
            hyper_dim,
            id: tokens(HEADER)?,
            base: has_base.then(|| tokens(HEADER + part)).transpose()?,
            arcface: (embedding_len != Some(0))
                .then(|| floats(tokens_end + 4..expected))
                .transpose()?,
        })
    }
}

/// The first 8 bytes of a model id in hex, for messages.
pub fn short_id(id: &[u8; 32]) -> String {
    id[..8].iter().map(|b| format!("{b:02x}")).collect()
}

/// Bytes read whole from each file, and in each of [`SAMPLES`] evenly spaced places of larger ones.
const CHUNK: u64 = 1 << 20;
const SAMPLES: u64 = 16;

/// Identifies a HyperLoRA folder's weights: SHA-256 over each `.json` and `.safetensors` file's
/// name and length, its first and last MiB (which hold safetensors headers) and 16 evenly spaced
/// MiB in between. Cheap on multi-GB folders; a re-export with other tensors or a fine-tune gets
/// another id, while a byte-identical copy elsewhere keeps it.
pub fn model_id(dir: &Path) -> Result<[u8; 32]> {
    let mut names: Vec<_> = std::fs::read_dir(dir)
        .map_err(|e| Error::from(e).context(dir.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".json") || n.ends_with(".safetensors"))
        .collect();
    names.sort();
    let mut h = Sha256::new();
    let mut buf = vec![0u8; CHUNK as usize];
    for name in names {
        let path = dir.join(&name);
        let io = |e: std::io::Error| Error::from(e).context(path.display());
        let mut f = std::fs::File::open(&path).map_err(io)?;
        let len = f.metadata().map_err(io)?.len();
        h.update(name.as_bytes());
        h.update(len.to_le_bytes());
        let offsets: Vec<u64> = if len <= CHUNK * (SAMPLES + 2) {
            (0..len.div_ceil(CHUNK)).map(|i| i * CHUNK).collect()
        } else {
            let step = (len - CHUNK) / (SAMPLES + 1);
            (0..=SAMPLES + 1).map(|i| i * step).collect()
        };
        for at in offsets {
            let n = CHUNK.min(len - at) as usize;
            f.seek(SeekFrom::Start(at)).map_err(io)?;
            f.read_exact(&mut buf[..n]).map_err(io)?;
            h.update(&buf[..n]);
        }
    }
    Ok(h.finalize().into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorCode;

    fn sample(base: bool) -> IdentityCoefficients {
        let tokens = |s: f32| Tokens {
            values: (0..6).map(|i| i as f32 * s).collect(),
            num_photos: 2,
        };
        IdentityCoefficients {
            model_id: [7; 32],
            queries: 2,
            hyper_dim: 3,
            id: tokens(0.5),
            base: base.then(|| tokens(-0.25)),
            arcface: base.then(|| vec![0.125; ARCFACE_DIM]),
        }
    }

    #[test]
    fn round_trips_and_refuses_damage() {
        for base in [false, true] {
            let c = sample(base);
            let bytes = c.to_bytes();
            assert_eq!(IdentityCoefficients::from_bytes(&bytes).unwrap(), c);
            for broken in [
                &bytes[..bytes.len() - 1],
                &bytes[..10],
                &[bytes.as_slice(), &[0]].concat()[..],
                b"garbage that is long enough to hold a header, or nearly so",
            ] {
                let err = IdentityCoefficients::from_bytes(broken).unwrap_err();
                assert_eq!(err.code, ErrorCode::InvalidArgument, "{err}");
            }
        }
    }
}
