//! Bounded fuzzer for the engine's input parsers: the dependency-free equivalent of cargo-fuzz
//! (which needs nightly and libFuzzer), run by `bench/fuzz.sh`.
//!
//! ```text
//! fuzz <target|all> [--seconds N] [--seed S] [--work DIR] [--case-timeout S]
//!      [--max-alloc-mb M] [--corpus DIR]
//! fuzz --replay <target> FILE...      outcome and time of each file
//! fuzz --minimise <target> FILE...    shrink each file keeping its outcome, into the corpus
//! ```
//! Targets are `hyperlora_fuzz::Target` (safetensors, configs, onnx, lora, hyperlora,
//! prompts). Inputs start from the real files in `models/tiny/` and the test fixtures and are
//! mutated both blindly (bit flips, interesting integers, truncation, splices, repeats) and by
//! format (safetensors headers, JSON trees, protobuf fields, prompt syntax), from a seeded
//! xorshift generator, so a run is reproducible from its seed. Inputs whose error message is new
//! join the pool, a cheap stand-in for coverage feedback.
//!
//! Each target runs in a worker process under a supervisor (this same binary). In the worker
//! every case runs under `catch_unwind`; a panic or an `INTERNAL` error is a crash, minimised by
//! cutting chunks while the crash stays the same, and saved to
//! `crates/hyperlora-fuzz/corpus/<target>/<hash>.bin`, which `cargo test` replays. A
//! counting global allocator measures each case's peak and refuses a single allocation above
//! `--max-alloc-mb`, which aborts the worker; the supervisor then saves the case being run (it
//! is always in `<work>/inflight-<target>.bin`), as it does for a case that outlives
//! `--case-timeout` (the worker is killed), and starts a new worker for the remaining time.

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::{BTreeMap, HashSet};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use hyperlora::ErrorCode;
use hyperlora_fuzz::{corpus_dir, fixtures_dir, Harness, Target};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

// ---------------------------------------------------------------------------------------------
// Allocation accounting.

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);
static MAX_SINGLE: AtomicUsize = AtomicUsize::new(usize::MAX);

/// The system allocator, counting live bytes and refusing oversized single requests (a null
/// return aborts the process: the supervisor records it as a crash).
struct Counting;

impl Counting {
    fn grew(&self, size: usize) {
        let live = LIVE.fetch_add(size, Ordering::Relaxed) + size;
        PEAK.fetch_max(live, Ordering::Relaxed);
    }
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout.size() > MAX_SINGLE.load(Ordering::Relaxed) {
            return std::ptr::null_mut();
        }
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            self.grew(layout.size());
        }
        p
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if layout.size() > MAX_SINGLE.load(Ordering::Relaxed) {
            return std::ptr::null_mut();
        }
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            self.grew(layout.size());
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if new_size > MAX_SINGLE.load(Ordering::Relaxed) {
            return std::ptr::null_mut();
        }
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
            self.grew(new_size);
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

// ---------------------------------------------------------------------------------------------
// Randomness: xorshift64*, seeded.

struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
    fn pick<'a, T>(&mut self, xs: &'a [T]) -> &'a T {
        &xs[self.below(xs.len())]
    }
}

/// Integers that break size arithmetic: zero, small, powers of two around type limits.
const INTERESTING: [u64; 30] = [
    0,
    1,
    2,
    3,
    7,
    8,
    16,
    31,
    64,
    127,
    255,
    256,
    1024,
    4096,
    65535,
    65536,
    1 << 20,
    1 << 24,
    1_000_000_000,
    (1 << 31) - 1,
    1 << 31,
    (1 << 32) - 1,
    1 << 32,
    1 << 40,
    1 << 53,
    (1 << 62) + 1,
    (1 << 63) - 1,
    1 << 63,
    u64::MAX - 7,
    u64::MAX,
];

fn interesting(rng: &mut Rng) -> u64 {
    *rng.pick(&INTERESTING)
}

// ---------------------------------------------------------------------------------------------
// Blind byte mutations.

const TOKENS: [&[u8]; 22] = [
    b"null",
    b"-1",
    b"0",
    b"1e309",
    b"-1e309",
    b"1e9",
    b"18446744073709551616",
    b"[]",
    b"{}",
    b"\"\"",
    b"true",
    b"NaN",
    b"\\u0000",
    b"\xff\xfe",
    b"\xc3\x28",
    b"\x00",
    b"\"",
    b"{",
    b"[",
    b",",
    b":",
    b"\\",
];

const MAX_INPUT: usize = 12 << 20;

fn mutate_bytes(rng: &mut Rng, data: &mut Vec<u8>, other: &[u8]) {
    let len = data.len();
    let at = |rng: &mut Rng| rng.below(len.max(1));
    match rng.below(11) {
        0 if len > 0 => {
            let i = at(rng);
            data[i] ^= 1 << rng.below(8);
        }
        1 if len > 0 => {
            let i = at(rng);
            data[i] = *rng.pick(&[0u8, 1, 0x7f, 0x80, 0xff, b'"', b'{', b'}', b'9', b'-']);
        }
        2 if len > 0 => {
            let i = at(rng);
            data[i] = rng.next() as u8;
        }
        3 => {
            let cut = rng.below(len + 1);
            data.truncate(cut);
        }
        4 if len > 0 => {
            let i = at(rng);
            let n = (1 + rng.below(64)).min(len - i);
            data.drain(i..i + n);
        }
        5 => {
            let i = rng.below(len + 1);
            let n = 1 + rng.below(16);
            let bytes: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
            data.splice(i..i, bytes);
        }
        6 if len > 0 => {
            // Repeat a chunk.
            let i = at(rng);
            let n = (1 + rng.below(256)).min(len - i);
            let chunk = data[i..i + n].to_vec();
            let times = 1 + rng.below(16);
            let rep: Vec<u8> = chunk.iter().copied().cycle().take(n * times).collect();
            data.splice(i..i, rep);
        }
        7 if !other.is_empty() => {
            // Splice: our head, another seed's tail.
            let i = rng.below(len + 1);
            let j = rng.below(other.len());
            data.truncate(i);
            data.extend_from_slice(&other[j..]);
        }
        8 if len >= 8 => {
            // An interesting integer, often over a length field at the start.
            let i = if rng.chance(30) {
                0
            } else {
                rng.below(len - 7)
            };
            let v = interesting(rng);
            if rng.chance(50) {
                data[i..i + 8].copy_from_slice(&v.to_le_bytes());
            } else {
                data[i..i + 4].copy_from_slice(&(v as u32).to_le_bytes());
            }
        }
        9 if len > 1 => {
            let (src, dst) = (at(rng), at(rng));
            let n = (1 + rng.below(64)).min(len - src).min(len - dst);
            data.copy_within(src..src + n, dst);
        }
        _ => {
            let i = rng.below(len + 1);
            data.splice(i..i, rng.pick(&TOKENS).iter().copied());
        }
    }
    data.truncate(MAX_INPUT);
}

// ---------------------------------------------------------------------------------------------
// JSON tree mutations (configs, HyperLoRA JSON, safetensors headers).

#[derive(Clone, Debug)]
enum Seg {
    Key(String),
    Index(usize),
}

fn json_paths(v: &Value, path: &mut Vec<Seg>, out: &mut Vec<Vec<Seg>>) {
    out.push(path.clone());
    match v {
        Value::Object(m) => {
            for (k, child) in m {
                path.push(Seg::Key(k.clone()));
                json_paths(child, path, out);
                path.pop();
            }
        }
        Value::Array(a) => {
            for (i, child) in a.iter().enumerate() {
                path.push(Seg::Index(i));
                json_paths(child, path, out);
                path.pop();
            }
        }
        _ => {}
    }
}

fn json_at<'a>(v: &'a mut Value, path: &[Seg]) -> &'a mut Value {
    path.iter().fold(v, |v, seg| match seg {
        Seg::Key(k) => &mut v[k.as_str()],
        Seg::Index(i) => &mut v[*i],
    })
}

fn interesting_json(rng: &mut Rng, old: &Value) -> Value {
    match rng.below(14) {
        0 => Value::Null,
        1 => json!(rng.chance(50)),
        2 => json!(interesting(rng)),
        3 => json!(-((interesting(rng) >> 1) as i64)),
        4 => json!(*rng.pick(&[0.5, -0.5, 1e-30, 1e30, 1e300, -1e300, 3.4e38, 1e39])),
        5 => json!(*rng.pick(&[
            "",
            "x",
            "silu",
            "gelu",
            "quick_gelu",
            "clip",
            "arcface",
            "\u{0}"
        ])),
        6 => json!([]),
        7 => json!({}),
        8 => json!([old.clone()]),
        9 => json!([old.clone(), old.clone()]),
        10 => json!("a".repeat(1 + rng.below(5000))),
        11 => match old {
            Value::Number(n) => {
                let f = n.as_f64().unwrap_or(0.0);
                json!(*rng.pick(&[f * 2.0, f + 1.0, f - 1.0, -f, f * 1e6, f / 3.0]))
            }
            _ => json!(1_000_000_000u64),
        },
        12 => match old.as_u64() {
            Some(n) => json!(n.wrapping_mul(1 + rng.below(1000) as u64)),
            None => json!(0),
        },
        _ => json!(-1),
    }
}

/// One structural change to a JSON document; `None` when the text is not JSON.
fn mutate_json(rng: &mut Rng, text: &[u8]) -> Option<Vec<u8>> {
    let mut doc: Value = serde_json::from_slice(text).ok()?;
    let mut paths = Vec::new();
    json_paths(&doc, &mut Vec::new(), &mut paths);
    let path = rng.pick(&paths).clone();
    let mut dup: Option<String> = None;
    match rng.below(10) {
        0..=4 => {
            let node = json_at(&mut doc, &path);
            *node = interesting_json(rng, node);
        }
        5 => {
            // Delete the node from its parent.
            if let Some((last, parent)) = path.split_last() {
                match (json_at(&mut doc, parent), last) {
                    (Value::Object(m), Seg::Key(k)) => {
                        m.remove(k);
                    }
                    (Value::Array(a), Seg::Index(i)) => {
                        a.remove(*i);
                    }
                    _ => {}
                }
            }
        }
        6 => {
            // Add a key, known elsewhere in the document or unknown.
            let keys: Vec<String> = paths
                .iter()
                .filter_map(|p| match p.last() {
                    Some(Seg::Key(k)) => Some(k.clone()),
                    _ => None,
                })
                .collect();
            let key = if keys.is_empty() || rng.chance(30) {
                "unknown_key".to_string()
            } else {
                rng.pick(&keys).clone()
            };
            let value = interesting_json(rng, &Value::Null);
            if let Value::Object(m) = json_at(&mut doc, &path) {
                m.insert(key, value);
            }
        }
        7 => {
            // Duplicate a key with another value (serde_json maps cannot hold it: patched in
            // the text below).
            let value = interesting_json(rng, &Value::Null);
            if let Value::Object(m) = json_at(&mut doc, &path) {
                if let Some(k) = m.keys().next().cloned() {
                    m.insert("\u{1}dup\u{1}".into(), value);
                    dup = Some(k);
                }
            }
        }
        8 => {
            // Grow an array.
            if let Value::Array(a) = json_at(&mut doc, &path) {
                let n = 1 + rng.below(64);
                if let Some(x) = a.first().cloned() {
                    a.extend(std::iter::repeat_n(x, n));
                } else {
                    a.push(json!(1));
                }
            }
        }
        _ => {
            // Bury the node in arrays.
            let node = json_at(&mut doc, &path);
            let mut v = node.clone();
            for _ in 0..1 + rng.below(200) {
                v = json!([v]);
            }
            *node = v;
        }
    }
    let mut out = serde_json::to_string(&doc).ok()?;
    if let Some(k) = dup {
        out = out.replace("\"\\u0001dup\\u0001\"", &serde_json::to_string(&k).ok()?);
    }
    if rng.chance(10) {
        // A number no float holds, or no integer type.
        if let Some(i) = out.find(|c: char| c.is_ascii_digit()) {
            let end = out[i..]
                .find(|c: char| !(c.is_ascii_digit() || c == '.'))
                .map_or(out.len(), |e| i + e);
            let lit = *rng.pick(&["1e309", "-1e309", "1e400", "99999999999999999999999", "-0"]);
            out.replace_range(i..end, lit);
        }
    }
    Some(out.into_bytes())
}

// ---------------------------------------------------------------------------------------------
// safetensors header mutations.

const DTYPES: [&str; 20] = [
    "F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U64", "U32", "U16", "U8", "BOOL",
    "F8_E4M3", "F8_E5M2", "F8_E8M0", "F4", "F6_E2M3", "C64", "X",
];

/// Dtypes with the same element size, so a swap still passes the size check.
fn same_size_dtype(rng: &mut Rng, dtype: &str) -> &'static str {
    const GROUPS: [&[&str]; 4] = [
        &["F64", "I64", "U64"],
        &["F32", "I32", "U32"],
        &["F16", "BF16", "I16", "U16"],
        &["U8", "I8", "BOOL", "F8_E4M3", "F8_E5M2"],
    ];
    let group = GROUPS
        .iter()
        .find(|g| g.contains(&dtype))
        .copied()
        .unwrap_or(&["F32"]);
    group[rng.below(group.len())]
}

struct Safetensors {
    entries: Vec<(String, Value)>,
    body: Vec<u8>,
}

impl Safetensors {
    fn parse(data: &[u8]) -> Option<Self> {
        let n = u64::from_le_bytes(data.get(..8)?.try_into().ok()?) as usize;
        let header = data.get(8..8usize.checked_add(n)?)?;
        let Value::Object(map) = serde_json::from_slice(header).ok()? else {
            return None;
        };
        Some(Self {
            entries: map.into_iter().collect(),
            body: data[8 + n..].to_vec(),
        })
    }

    fn tensors(&self) -> Vec<usize> {
        (0..self.entries.len())
            .filter(|&i| self.entries[i].0 != "__metadata__")
            .collect()
    }

    fn offsets(v: &Value) -> Option<(usize, usize)> {
        let o = v.get("data_offsets")?;
        Some((o.get(0)?.as_u64()? as usize, o.get(1)?.as_u64()? as usize))
    }

    /// Lays the tensors' data out again, in file order, dropping what no tensor covers.
    fn compact(&mut self) {
        let mut order: Vec<usize> = self.tensors();
        order.sort_by_key(|&i| Self::offsets(&self.entries[i].1).map_or(0, |o| o.0));
        let mut body = Vec::new();
        for i in order {
            let Some((s, e)) = Self::offsets(&self.entries[i].1) else {
                continue;
            };
            let start = body.len();
            if s <= e && e <= self.body.len() {
                body.extend_from_slice(&self.body[s..e]);
            }
            self.entries[i].1["data_offsets"] = json!([start, body.len()]);
        }
        self.body = body;
    }

    fn encode(&self, length_lie: Option<u64>) -> Vec<u8> {
        let mut header = String::from("{");
        for (i, (k, v)) in self.entries.iter().enumerate() {
            if i > 0 {
                header.push(',');
            }
            header.push_str(&serde_json::to_string(k).unwrap());
            header.push(':');
            header.push_str(&serde_json::to_string(v).unwrap());
        }
        header.push('}');
        while header.len() % 8 != 0 {
            header.push(' ');
        }
        let n = length_lie.unwrap_or(header.len() as u64);
        let mut out = n.to_le_bytes().to_vec();
        out.extend_from_slice(header.as_bytes());
        out.extend_from_slice(&self.body);
        out
    }
}

/// Sets `key` of a tensor entry, when the entry is still an object.
fn set_field(entry: &mut Value, key: &str, value: Value) {
    if let Value::Object(m) = entry {
        m.insert(key.into(), value);
    }
}

/// A safetensors header entry's `shape`, where it is a list of integers.
fn shape_of(entry: &Value) -> Option<Vec<u64>> {
    Some(
        entry["shape"]
            .as_array()?
            .iter()
            .filter_map(Value::as_u64)
            .collect(),
    )
}

/// The element count of a shape, unless it overflows.
fn checked_count(shape: &[u64]) -> Option<u64> {
    shape.iter().try_fold(1u64, |a, &d| a.checked_mul(d))
}

/// One structural change to a safetensors file; `None` when the header does not parse.
fn mutate_safetensors(rng: &mut Rng, data: &[u8]) -> Option<Vec<u8>> {
    let mut st = Safetensors::parse(data)?;
    let tensors = st.tensors();
    let mut lie = None;
    let pick = |rng: &mut Rng| (!tensors.is_empty()).then(|| *rng.pick(&tensors));
    match rng.below(12) {
        0 => {
            // The length field.
            let real = (data.len() - 8 - st.body.len()) as u64;
            let wild = interesting(rng);
            lie = Some(*rng.pick(&[
                real + 1,
                real.saturating_sub(1),
                real + 8,
                data.len() as u64,
                data.len() as u64 - 7,
                wild,
            ]));
        }
        1 => {
            let i = pick(rng)?;
            let (s, e) = Safetensors::offsets(&st.entries[i].1).unwrap_or((0, 0));
            let other = pick(rng).and_then(|j| Safetensors::offsets(&st.entries[j].1));
            let body = st.body.len();
            let v = match rng.below(9) {
                0 => json!([e, s]),
                1 => json!([0, e]),
                2 => json!([s, s]),
                3 => json!([s, body + 1 + rng.below(64)]),
                4 => json!([s, interesting(rng)]),
                5 => json!([interesting(rng), interesting(rng)]),
                6 => other.map_or(json!([0, 0]), |(a, b)| json!([a, b])),
                7 => json!([-1, 4]),
                _ => json!([s.saturating_sub(1 + rng.below(16)), e.saturating_sub(1)]),
            };
            set_field(&mut st.entries[i].1, "data_offsets", v);
        }
        2 => {
            // A shape whose element count overflows or is huge (byte size left alone).
            let i = pick(rng)?;
            let v = match rng.below(8) {
                0 => json!([1u64 << 32, 1u64 << 32]),
                1 => json!([1u64 << 62, 4]),
                2 => json!([interesting(rng)]),
                3 => json!([0, interesting(rng), interesting(rng)]),
                4 => json!([]),
                5 => json!([-1]),
                6 => json!([1.5]),
                _ => json!("2"),
            };
            set_field(&mut st.entries[i].1, "shape", v);
        }
        3 => {
            // A consistent reshape (same element count): shapes that do not fit the model.
            let i = pick(rng)?;
            let shape = shape_of(&st.entries[i].1)?;
            let count = checked_count(&shape)?;
            let new = match rng.below(5) {
                0 => shape.iter().rev().copied().collect(),
                1 => vec![count],
                2 => [shape.clone(), vec![1]].concat(),
                3 => [vec![1], shape.clone()].concat(),
                _ => match count {
                    c if c % 2 == 0 && c > 0 => vec![2, c / 2],
                    c => vec![c, 1, 1, 1],
                },
            };
            set_field(&mut st.entries[i].1, "shape", json!(new));
        }
        4 => {
            let i = pick(rng)?;
            let old = st.entries[i].1["dtype"]
                .as_str()
                .unwrap_or("F32")
                .to_string();
            let v = match rng.below(4) {
                0 | 1 => json!(same_size_dtype(rng, &old)),
                2 => json!(*rng.pick(&DTYPES)),
                _ => interesting_json(rng, &Value::Null),
            };
            set_field(&mut st.entries[i].1, "dtype", v);
        }
        5 => {
            // Rename: a duplicate, an empty or reserved name, junk.
            let i = pick(rng)?;
            let other = pick(rng).map(|j| st.entries[j].0.clone());
            // The LyCORIS parts a module can be made of, to swap one for another.
            const PARTS: [&str; 13] = [
                "lora_down.weight",
                "lora_mid.weight",
                "hada_w1_a",
                "hada_w2_b",
                "hada_t1",
                "lokr_w1",
                "lokr_w1_a",
                "lokr_w2",
                "lokr_w2_b",
                "lokr_t2",
                "diff",
                "diff_b",
                "dora_scale",
            ];
            let name = match rng.below(7) {
                0 => other.unwrap_or_default(),
                1 => String::new(),
                2 => "__metadata__".into(),
                3 => format!("{}.{}", st.entries[i].0, "x".repeat(rng.below(300))),
                4 => st.entries[i].0.replace('.', "_"),
                5 => match st.entries[i].0.split_once('.') {
                    Some((module, _)) => format!("{module}.{}", rng.pick(&PARTS)),
                    None => st.entries[i].0.clone(),
                },
                _ => st.entries[i].0.replace("lora_down", "lora_up"),
            };
            st.entries[i].0 = name;
        }
        6 => {
            // Drop a tensor, with or without laying the data out again.
            let i = pick(rng)?;
            st.entries.remove(i);
            if rng.chance(70) {
                st.compact();
            }
        }
        7 => {
            // __metadata__ of the wrong type, or values our readers parse as JSON.
            let v = match rng.below(6) {
                0 => interesting_json(rng, &Value::Null),
                1 => {
                    json!({"hyperlora_module_order": interesting_json(rng, &Value::Null).to_string()})
                }
                2 => json!({"hyperlora_module_order": "[\"a\", \"a\"]"}),
                3 => {
                    json!({"lora_adapter_metadata": json!({"unet.lora_alpha": interesting_json(rng, &Value::Null), "unet.r": 0, "unet.alpha_pattern": {"x": "y"}}).to_string()})
                }
                4 => json!({"k": 5}),
                _ => json!({"format": "pt", "nested": {"a": 1}}),
            };
            st.entries.retain(|(k, _)| k != "__metadata__");
            st.entries.insert(0, ("__metadata__".into(), v));
        }
        8 => {
            // Poison a tensor's data: NaN, infinity, zero, huge.
            let i = pick(rng)?;
            let (s, e) = Safetensors::offsets(&st.entries[i].1)?;
            let patterns: [&[u8]; 5] = [
                &[0xff, 0xff, 0xff, 0x7f][..],
                &[0x00, 0x00, 0x80, 0x7f],
                &[0, 0, 0, 0],
                &[0xff, 0xff, 0x7f, 0x7f],
                &[0x00, 0x7c],
            ];
            let pattern = *rng.pick(&patterns);
            let end = e.min(st.body.len());
            for (k, b) in st.body[s.min(end)..end].iter_mut().enumerate() {
                *b = pattern[k % pattern.len()];
            }
        }
        9 => {
            // Grow or shrink one tensor consistently (offsets and data follow).
            let i = pick(rng)?;
            let shape = shape_of(&st.entries[i].1)?;
            let (s, e) = Safetensors::offsets(&st.entries[i].1)?;
            let count = checked_count(&shape)?.max(1);
            let elem = (e.checked_sub(s)? as u64 / count).max(1);
            let mut new = shape.clone();
            if new.is_empty() {
                new.push(1);
            }
            let d = rng.below(new.len());
            let old = new[d];
            new[d] = *rng.pick(&[
                0,
                1,
                old.saturating_add(1),
                old.saturating_sub(1),
                old.saturating_mul(2),
            ]);
            let bytes = checked_count(&new)?.checked_mul(elem)? as usize;
            if bytes > 64 << 20 {
                return None;
            }
            set_field(&mut st.entries[i].1, "shape", json!(new));
            let data: Vec<u8> = (0..bytes).map(|_| rng.next() as u8 & 0x3f).collect();
            let at = st.body.len();
            st.body.extend_from_slice(&data);
            set_field(
                &mut st.entries[i].1,
                "data_offsets",
                json!([at, at + bytes]),
            );
            st.compact();
        }
        10 => {
            // Padding or junk after the JSON inside the header.
            let mut out = st.encode(None);
            let n = u64::from_le_bytes(out[..8].try_into().unwrap()) as usize;
            let junks: [&[u8]; 5] = [b"        ", b"\x00\x00", b"\xff", b"}", b",{}"];
            let junk = *rng.pick(&junks);
            out.splice(8 + n..8 + n, junk.iter().copied());
            let n = (n + junk.len()) as u64;
            out[..8].copy_from_slice(&n.to_le_bytes());
            return Some(out);
        }
        _ => {
            // A tensor entry that is not an object, or lacks a field.
            let i = pick(rng)?;
            let v = &mut st.entries[i].1;
            match rng.below(4) {
                0 => *v = interesting_json(rng, v),
                1 => {
                    v.as_object_mut()?.remove("shape");
                }
                2 => {
                    v.as_object_mut()?.remove("dtype");
                }
                _ => {
                    v.as_object_mut()?.insert("extra".into(), json!(1));
                }
            }
        }
    }
    Some(st.encode(lie))
}

// ---------------------------------------------------------------------------------------------
// Protobuf (ONNX) mutations: the wire format, parsed as far as it nests.

#[derive(Clone)]
enum Pb {
    Varint(u64),
    Fixed64([u8; 8]),
    Fixed32([u8; 4]),
    Bytes(Vec<u8>),
    Message(Vec<PbField>),
}

#[derive(Clone)]
struct PbField {
    number: u64,
    value: Pb,
    /// Added to the encoded length of a length-delimited field (a lying length).
    length_lie: i64,
}

fn read_varint(buf: &[u8], pos: &mut usize) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let b = *buf.get(*pos)?;
        *pos += 1;
        v |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Some(v);
        }
    }
    None
}

fn write_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn pb_parse(buf: &[u8], depth: usize) -> Option<Vec<PbField>> {
    let mut fields = Vec::new();
    let mut pos = 0;
    while pos < buf.len() {
        let key = read_varint(buf, &mut pos)?;
        let number = key >> 3;
        if number == 0 || number > 1 << 29 {
            return None;
        }
        let value = match key & 7 {
            0 => Pb::Varint(read_varint(buf, &mut pos)?),
            1 => {
                let b = buf.get(pos..pos + 8)?;
                pos += 8;
                Pb::Fixed64(b.try_into().ok()?)
            }
            2 => {
                let n = read_varint(buf, &mut pos)? as usize;
                let b = buf.get(pos..pos.checked_add(n)?)?;
                pos += n;
                match (depth < 16 && !b.is_empty())
                    .then(|| pb_parse(b, depth + 1))
                    .flatten()
                {
                    Some(m) => Pb::Message(m),
                    None => Pb::Bytes(b.to_vec()),
                }
            }
            5 => {
                let b = buf.get(pos..pos + 4)?;
                pos += 4;
                Pb::Fixed32(b.try_into().ok()?)
            }
            _ => return None,
        };
        fields.push(PbField {
            number,
            value,
            length_lie: 0,
        });
    }
    Some(fields)
}

fn pb_encode(fields: &[PbField], out: &mut Vec<u8>) {
    for f in fields {
        let wire = match f.value {
            Pb::Varint(_) => 0,
            Pb::Fixed64(_) => 1,
            Pb::Bytes(_) | Pb::Message(_) => 2,
            Pb::Fixed32(_) => 5,
        };
        write_varint(out, f.number << 3 | wire);
        match &f.value {
            Pb::Varint(v) => write_varint(out, *v),
            Pb::Fixed64(b) => out.extend_from_slice(b),
            Pb::Fixed32(b) => out.extend_from_slice(b),
            Pb::Bytes(b) => {
                write_varint(out, (b.len() as i64 + f.length_lie).max(0) as u64);
                out.extend_from_slice(b);
            }
            Pb::Message(m) => {
                let mut inner = Vec::new();
                pb_encode(m, &mut inner);
                write_varint(out, (inner.len() as i64 + f.length_lie).max(0) as u64);
                out.extend_from_slice(&inner);
            }
        }
    }
}

fn pb_paths(fields: &[PbField], path: &mut Vec<usize>, out: &mut Vec<Vec<usize>>) {
    for (i, f) in fields.iter().enumerate() {
        path.push(i);
        out.push(path.clone());
        if let Pb::Message(m) = &f.value {
            pb_paths(m, path, out);
        }
        path.pop();
    }
}

/// The field list holding the field at `path`, and the field's index in it.
fn pb_parent<'a>(fields: &'a mut Vec<PbField>, path: &[usize]) -> (&'a mut Vec<PbField>, usize) {
    let (last, parents) = path.split_last().expect("non-empty path");
    let mut list = fields;
    for &i in parents {
        list = match &mut list[i].value {
            Pb::Message(m) => m,
            _ => unreachable!("paths only go through messages"),
        };
    }
    (list, *last)
}

const OP_TYPES: [&str; 16] = [
    "Conv",
    "Relu",
    "Add",
    "Mul",
    "Reshape",
    "Resize",
    "Gather",
    "Concat",
    "Transpose",
    "MatMul",
    "Gemm",
    "BatchNormalization",
    "PRelu",
    "Flatten",
    "Slice",
    "Loop",
];

/// One change to a protobuf message tree; `None` when the bytes are not protobuf.
fn mutate_protobuf(rng: &mut Rng, data: &[u8]) -> Option<Vec<u8>> {
    let mut fields = pb_parse(data, 0)?;
    let mut paths = Vec::new();
    pb_paths(&fields, &mut Vec::new(), &mut paths);
    if paths.is_empty() {
        return None;
    }
    let path = rng.pick(&paths).clone();
    let (list, i) = pb_parent(&mut fields, &path);
    match rng.below(8) {
        0 => {
            list.remove(i);
        }
        1 => {
            let copy = list[i].clone();
            let most = if rng.chance(10) { 1000 } else { 3 };
            let n = 1 + rng.below(most);
            for _ in 0..n {
                list.insert(i, copy.clone());
            }
        }
        2 => list[i].length_lie = *rng.pick(&[-1, 1, 8, -8, 1 << 20, i64::MAX / 2]),
        3 if i + 1 < list.len() => list.swap(i, i + 1),
        _ => {
            let f = &mut list[i];
            f.value = match std::mem::replace(&mut f.value, Pb::Varint(0)) {
                Pb::Varint(v) => Pb::Varint(match rng.below(4) {
                    0 => v.wrapping_add(1),
                    1 => v.wrapping_sub(1),
                    2 => (-(1 + rng.below(4) as i64)) as u64,
                    _ => interesting(rng),
                }),
                Pb::Fixed32(_) => Pb::Fixed32(
                    rng.pick(&[
                        f32::NAN,
                        f32::INFINITY,
                        -f32::INFINITY,
                        0.0,
                        -1.0,
                        1e30,
                        1e-40,
                    ])
                    .to_le_bytes(),
                ),
                Pb::Fixed64(_) => Pb::Fixed64(interesting(rng).to_le_bytes()),
                Pb::Bytes(mut b) => {
                    match rng.below(4) {
                        0 => b = rng.pick(&OP_TYPES).as_bytes().to_vec(),
                        1 => b.truncate(rng.below(b.len() + 1)),
                        2 if !b.is_empty() => {
                            let k = rng.below(b.len());
                            b[k] ^= 1 << rng.below(8);
                        }
                        _ => b.extend((0..1 + rng.below(32)).map(|_| rng.next() as u8)),
                    }
                    Pb::Bytes(b)
                }
                Pb::Message(mut m) => {
                    if rng.chance(50) {
                        m.clear();
                    } else {
                        m.push(PbField {
                            number: 1 + rng.below(20) as u64,
                            value: Pb::Varint(interesting(rng)),
                            length_lie: 0,
                        });
                    }
                    Pb::Message(m)
                }
            };
        }
    }
    let mut out = Vec::new();
    pb_encode(&fields, &mut out);
    Some(out)
}

// ---------------------------------------------------------------------------------------------
// Prompt mutations.

const PROMPT_PIECES: [&str; 52] = [
    "(",
    ")",
    "[",
    "]",
    "\\",
    "\\(",
    ":",
    ":1.5)",
    ":1e309)",
    ":-1e309)",
    ":0)",
    ":-1)",
    ":1e38)",
    ":1e39)",
    ":3.5e38)",
    ":1.2.3)",
    ":.)",
    ":\u{663})",
    ":+)",
    ":1e-320)",
    "BREAK",
    " BREAK ",
    "BREAKBREAK",
    ",",
    ", ",
    "<|startoftext|>",
    "<|endoftext|>",
    "!",
    "!!!",
    "\u{1F469}\u{200D}\u{1F680}",
    "\u{1F3F3}\u{FE0F}\u{200D}\u{1F308}",
    "\u{645}\u{631}\u{62D}\u{628}\u{627}",
    "\u{202E}abc\u{202C}",
    "\u{5E9}\u{5DC}\u{5D5}\u{5DD}",
    "\0",
    "\u{1C}",
    "\t",
    "\n",
    "\r\n",
    "e\u{301}",
    "z\u{335}\u{327}\u{31B}\u{316}a\u{336}l\u{334}g\u{337}o",
    "\u{6F22}\u{5B57}\u{30C6}\u{30B9}\u{30C8}",
    "\u{3A3}\u{3A3}\u{3A3}",
    "\u{130}",
    "\u{DF}",
    "\u{FB01}",
    "\u{FEFF}",
    "\u{200B}",
    "\u{FFFD}",
    "a photo of a cat",
    "  ",
    "\u{3000}",
];

fn char_boundary(rng: &mut Rng, s: &str) -> usize {
    let mut i = rng.below(s.len() + 1);
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

const MAX_PROMPT: usize = 256 << 10;

fn mutate_prompt(rng: &mut Rng, prompt: &[u8]) -> Vec<u8> {
    let mut s = String::from_utf8_lossy(prompt).into_owned();
    match rng.below(7) {
        0 | 1 => {
            for _ in 0..1 + rng.below(8) {
                let i = char_boundary(rng, &s);
                let piece = *rng.pick(&PROMPT_PIECES);
                s.insert_str(i, piece);
            }
        }
        2 => {
            // Storms: thousands of one piece.
            let piece = *rng.pick(&PROMPT_PIECES);
            let most = if rng.chance(30) { 10_000 } else { 100 };
            let times = 1 + rng.below(most);
            let i = char_boundary(rng, &s);
            s.insert_str(i, &piece.repeat(times));
        }
        3 => {
            // One long word (a single BPE run).
            let letter = *rng.pick(&["a", "x", "\u{E9}", "\u{6F22}", "1", "!"]);
            let i = char_boundary(rng, &s);
            s.insert_str(i, &letter.repeat(1 + rng.below(3000)));
        }
        4 => s = s.repeat(2 + rng.below(8)),
        5 => {
            let (a, b) = (char_boundary(rng, &s), char_boundary(rng, &s));
            s.replace_range(a.min(b)..a.max(b), "");
        }
        _ => {
            let mut bytes = s.into_bytes();
            mutate_bytes(rng, &mut bytes, &[]);
            bytes.truncate(MAX_PROMPT);
            return bytes;
        }
    }
    let mut bytes = s.into_bytes();
    bytes.truncate(MAX_PROMPT);
    bytes
}

fn prompt_seeds() -> Vec<Vec<u8>> {
    let mut seeds: Vec<String> = vec![
        String::new(),
        "a photo of a cat".into(),
        "fcsks fxhks fhyks, a portrait photo of a woman, (smiling:1.3), [blurry], ((masterpiece))"
            .into(),
        "a (red:1.5) car BREAK on a [street], ((night))".into(),
        "a, ".repeat(5000),
        "(((((((((((((((((((((((((((((portrait".into(),
        "photo)))]]] of (a:1e309) person".into(),
    ];
    let cases = fixtures_dir().join("sdxl_tokenizer/cases.json");
    if let Ok(text) = std::fs::read_to_string(cases) {
        if let Ok(v) = serde_json::from_str::<Value>(&text) {
            for c in v["cases"].as_array().into_iter().flatten() {
                if let Some(p) = c["prompt"].as_str() {
                    seeds.push(p.to_string());
                }
            }
        }
    }
    seeds.into_iter().map(String::into_bytes).collect()
}

// ---------------------------------------------------------------------------------------------
// Inputs: seeds, pool, mutation by format.

#[derive(Clone, Copy, PartialEq)]
enum Format {
    Safetensors,
    Json,
    Protobuf,
    Prompt,
    /// Blind byte mutations only (torch.save zips and their pickles).
    Bytes,
}

fn format_of(target: Target, variant: usize) -> Format {
    match target {
        Target::Safetensors | Target::Lora => Format::Safetensors,
        Target::Configs => Format::Json,
        Target::Onnx => Format::Protobuf,
        Target::Prompts => Format::Prompt,
        Target::Torch => Format::Bytes,
        Target::Hyperlora => {
            if target.variants()[variant].ends_with(".json") {
                Format::Json
            } else {
                Format::Safetensors
            }
        }
    }
}

struct Pool {
    target: Target,
    /// (variant, file bytes).
    inputs: Vec<(usize, Vec<u8>)>,
    seeds: usize,
}

impl Pool {
    fn new(target: Target) -> Self {
        let mut inputs: Vec<(usize, Vec<u8>)> = target
            .seeds()
            .into_iter()
            .filter_map(|(v, p)| std::fs::read(p).ok().map(|b| (v, b)))
            .collect();
        if target == Target::Prompts {
            inputs.extend(prompt_seeds().into_iter().map(|p| (0, p)));
        }
        assert!(!inputs.is_empty(), "no seeds for {}", target.name());
        let seeds = inputs.len();
        Self {
            target,
            inputs,
            seeds,
        }
    }

    /// A mutated input, with its variant byte where the target has variants.
    fn next<'a>(&'a self, rng: &mut Rng) -> Vec<u8> {
        // Each file of the target equally often, however many of its inputs the pool keeps.
        let variant = rng.below(self.target.variants().len().max(1));
        let (seeds, finds): (Vec<_>, Vec<_>) = self
            .inputs
            .iter()
            .enumerate()
            .filter(|(_, (v, _))| *v == variant)
            .map(|(i, (_, b))| (i, b.as_slice()))
            .partition(|(i, _)| *i < self.seeds);
        let strip = |v: Vec<(usize, &'a [u8])>| v.into_iter().map(|(_, b)| b).collect::<Vec<_>>();
        let (seeds, finds) = (strip(seeds), strip(finds));
        // Half the time a real file: finds are mostly already broken, and breaking them further
        // rarely gets past the first check.
        let same = if finds.is_empty() || rng.chance(50) {
            &seeds
        } else {
            &finds
        };
        let mut data = rng.pick(same).to_vec();
        let format = format_of(self.target, variant);
        for _ in 0..1 + rng.below(3) {
            // A mutator bug must not pass for a crash of the engine: it only costs the mutation.
            let structured =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| match format {
                    Format::Prompt => Some(mutate_prompt(rng, &data)),
                    _ if rng.chance(30) => None,
                    Format::Safetensors => mutate_safetensors(rng, &data),
                    Format::Json => mutate_json(rng, &data),
                    Format::Protobuf => mutate_protobuf(rng, &data),
                    Format::Bytes => None,
                }))
                .unwrap_or_else(|_| {
                    PANIC_MESSAGE
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .take();
                    None
                });
            match structured {
                Some(d) => data = d,
                None => {
                    let other = rng.pick(same);
                    mutate_bytes(rng, &mut data, other);
                }
            }
        }
        data.truncate(MAX_INPUT);
        self.with_variant(variant, data)
    }

    fn with_variant(&self, variant: usize, data: Vec<u8>) -> Vec<u8> {
        if self.target.variants().is_empty() {
            data
        } else {
            let mut v = vec![variant as u8];
            v.extend(data);
            v
        }
    }

    /// Keeps an input that reached a new outcome (bounded: old finds are replaced).
    fn keep(&mut self, rng: &mut Rng, input: &[u8]) {
        let (variant, bytes) = self.target.split(input);
        if bytes.len() > 8 << 20 {
            return;
        }
        let entry = (variant, bytes.to_vec());
        if self.inputs.len() < self.seeds + 512 {
            self.inputs.push(entry);
        } else {
            let i = self.seeds + rng.below(self.inputs.len() - self.seeds);
            self.inputs[i] = entry;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Running one case.

static PANIC_MESSAGE: Mutex<Option<String>> = Mutex::new(None);

fn quiet_panics() {
    std::panic::set_hook(Box::new(|info| {
        let payload = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_default();
        let at = info
            .location()
            .map(|l| format!("{}:{}", l.file(), l.line()))
            .unwrap_or_default();
        let message = format!("{at}: {payload}");
        // Also on stderr: a panic outside a case ends the worker, and this is its last word.
        eprintln!("panic: {message}");
        *PANIC_MESSAGE.lock().unwrap_or_else(|p| p.into_inner()) = Some(message);
    }));
}

struct Outcome {
    /// `OK`, an error code, or `PANIC`.
    label: &'static str,
    message: String,
    elapsed: Duration,
    peak_bytes: usize,
}

impl Outcome {
    fn is_crash(&self) -> bool {
        self.label == "PANIC" || self.label == ErrorCode::Internal.as_str()
    }

    /// What identifies a bug: panic location or error text, digits and paths left out.
    fn signature(&self) -> String {
        let text = match self.label {
            "PANIC" => self.message.split(": ").next().unwrap_or("").to_string(),
            _ => self.message.clone(),
        };
        let sig: String = text
            .split_whitespace()
            .filter(|w| !w.contains('/'))
            .collect::<Vec<_>>()
            .join(" ")
            .chars()
            .filter(|c| !c.is_ascii_digit())
            .take(120)
            .collect();
        format!("{} {sig}", self.label)
    }
}

fn run_case(harness: &Harness, target: Target, input: &[u8]) -> Outcome {
    let base = LIVE.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);
    let start = Instant::now();
    let result =
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| harness.run(target, input)));
    let elapsed = start.elapsed();
    let peak_bytes = PEAK.load(Ordering::Relaxed).saturating_sub(base);
    let (label, message) = match result {
        Ok(Ok(())) => ("OK", String::new()),
        Ok(Err(e)) => (e.code.as_str(), e.message),
        Err(_) => (
            "PANIC",
            PANIC_MESSAGE
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take()
                .unwrap_or_default(),
        ),
    };
    Outcome {
        label,
        message,
        elapsed,
        peak_bytes,
    }
}

/// Shrinks an input while its outcome keeps the same signature (so a crash stays the same
/// crash, and an input that reaches a fix keeps reaching it), within `budget`: whole tensors
/// out of a safetensors file, whole fields out of a protobuf, then chunks of bytes.
fn minimise(harness: &Harness, target: Target, input: &[u8], budget: Duration) -> Vec<u8> {
    let signature = run_case(harness, target, input).signature();
    let keep = usize::from(!target.variants().is_empty());
    let deadline = Instant::now() + budget;
    let same = |body: &[u8]| {
        let mut candidate = input[..keep].to_vec();
        candidate.extend_from_slice(body);
        run_case(harness, target, &candidate).signature() == signature
    };
    let (variant, _) = target.split(input);
    let mut best = input[keep..].to_vec();
    match format_of(target, variant) {
        Format::Safetensors => {
            if let Some(mut st) = Safetensors::parse(&best) {
                let mut i = st.entries.len();
                while i > 0 && Instant::now() < deadline {
                    i -= 1;
                    let mut fewer = Safetensors {
                        entries: st.entries.clone(),
                        body: st.body.clone(),
                    };
                    fewer.entries.remove(i);
                    fewer.compact();
                    let encoded = fewer.encode(None);
                    if same(&encoded) {
                        st = fewer;
                        best = encoded;
                    }
                }
            }
        }
        Format::Protobuf => {
            if let Some(mut fields) = pb_parse(&best, 0) {
                // Pre-order, so a whole message goes before its parts are tried.
                let mut at = 0;
                loop {
                    let mut paths = Vec::new();
                    pb_paths(&fields, &mut Vec::new(), &mut paths);
                    if at >= paths.len() || Instant::now() >= deadline {
                        break;
                    }
                    let mut fewer = fields.clone();
                    let (list, i) = pb_parent(&mut fewer, &paths[at]);
                    list.remove(i);
                    let mut encoded = Vec::new();
                    pb_encode(&fewer, &mut encoded);
                    if same(&encoded) {
                        fields = fewer;
                        best = encoded;
                    } else {
                        at += 1;
                    }
                }
            }
        }
        Format::Json | Format::Prompt | Format::Bytes => {}
    }
    let mut chunk = best.len() / 2;
    while chunk > 0 && Instant::now() < deadline {
        let mut at = 0;
        while at < best.len() && Instant::now() < deadline {
            let end = (at + chunk).min(best.len());
            let mut candidate = best[..at].to_vec();
            candidate.extend_from_slice(&best[end..]);
            if same(&candidate) {
                best = candidate;
            } else {
                at += chunk;
            }
        }
        chunk /= 2;
    }
    let mut out = input[..keep].to_vec();
    out.extend(best);
    out
}

fn short_hash(bytes: &[u8]) -> String {
    Sha256::digest(bytes)[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Corpus files stay small: bigger crash inputs are kept in the work folder and reported.
const MAX_CORPUS_BYTES: usize = 320 << 10;

fn save_crash(corpus: &Path, work: &Path, target: Target, input: &[u8]) -> PathBuf {
    let dir = if input.len() <= MAX_CORPUS_BYTES {
        corpus.join(target.name())
    } else {
        work.join("big-crashes").join(target.name())
    };
    std::fs::create_dir_all(&dir).expect("crash folder");
    let path = dir.join(format!("{}.bin", short_hash(input)));
    std::fs::write(&path, input).expect("save crash");
    path
}

// ---------------------------------------------------------------------------------------------
// Statistics, as one JSON file per worker.

#[derive(Default)]
struct Stats {
    cases: u64,
    outcomes: BTreeMap<String, u64>,
    variants: BTreeMap<String, BTreeMap<String, u64>>,
    crashes: Vec<Value>,
    slow: Vec<Value>,
    max_ms: f64,
    max_peak: usize,
    big_alloc: u64,
    caught_panics: u64,
    seconds: f64,
}

impl Stats {
    fn to_json(&self, target: Target) -> Value {
        json!({
            "target": target.name(),
            "cases": self.cases,
            "outcomes": self.outcomes,
            "variants": self.variants,
            "crashes": self.crashes,
            "slow": self.slow,
            "max_ms": self.max_ms,
            "max_peak_bytes": self.max_peak,
            "big_alloc": self.big_alloc,
            "caught_panics": self.caught_panics,
            "seconds": self.seconds,
        })
    }
}

/// How `face::onnx` reports a panic of the ONNX engine that it caught.
const CAUGHT_PANIC: &str = "the ONNX engine failed on this graph";

const SLOW: Duration = Duration::from_secs(1);
const BIG_ALLOC: usize = 512 << 20;

struct Options {
    seconds: f64,
    seed: u64,
    work: PathBuf,
    corpus: PathBuf,
    case_timeout: f64,
    max_alloc_mb: usize,
}

fn worker(target: Target, o: &Options) {
    quiet_panics();
    MAX_SINGLE.store(o.max_alloc_mb << 20, Ordering::Relaxed);
    let scratch = o.work.join(format!("scratch-{}-{}", target.name(), o.seed));
    let harness = Harness::new(&scratch);
    harness.warm(target);
    let mut pool = Pool::new(target);
    let mut rng = Rng::new(o.seed);
    let inflight = o.work.join(format!("inflight-{}.bin", target.name()));
    let stats_path = o
        .work
        .join(format!("stats-{}-{}.json", target.name(), o.seed));
    let mut stats = Stats::default();
    let mut seen: HashSet<String> = HashSet::new();
    let mut crash_signatures: HashSet<String> = HashSet::new();
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(o.seconds);
    let mut last_write = Instant::now();
    while Instant::now() < deadline {
        let input = pool.next(&mut rng);
        std::fs::write(&inflight, &input).expect("inflight");
        let outcome = run_case(&harness, target, &input);
        stats.cases += 1;
        *stats.outcomes.entry(outcome.label.into()).or_default() += 1;
        let variants = target.variants();
        if !variants.is_empty() {
            let (v, _) = target.split(&input);
            *stats
                .variants
                .entry(variants[v].into())
                .or_default()
                .entry(outcome.label.into())
                .or_default() += 1;
        }
        let ms = outcome.elapsed.as_secs_f64() * 1e3;
        stats.max_ms = stats.max_ms.max(ms);
        stats.max_peak = stats.max_peak.max(outcome.peak_bytes);
        if outcome.peak_bytes > BIG_ALLOC {
            stats.big_alloc += 1;
        }
        if outcome.message.contains(CAUGHT_PANIC) {
            stats.caught_panics += 1;
        }
        if (outcome.elapsed > SLOW || outcome.peak_bytes > BIG_ALLOC) && stats.slow.len() < 20 {
            let dir = o.work.join("slow").join(target.name());
            std::fs::create_dir_all(&dir).expect("slow folder");
            let path = dir.join(format!("{}.bin", short_hash(&input)));
            std::fs::write(&path, &input).expect("slow input");
            stats.slow.push(json!({
                "ms": ms.round(),
                "peak_mb": outcome.peak_bytes >> 20,
                "outcome": outcome.label,
                "bytes": input.len(),
                "file": path,
            }));
        }
        let signature = outcome.signature();
        if outcome.is_crash() && crash_signatures.insert(signature.clone()) {
            let small = minimise(&harness, target, &input, Duration::from_secs(4));
            let path = save_crash(&o.corpus, &o.work, target, &small);
            stats.crashes.push(json!({
                "kind": outcome.label,
                "signature": signature,
                "message": outcome.message.chars().take(400).collect::<String>(),
                "file": path,
                "bytes": small.len(),
            }));
        }
        if seen.insert(signature) {
            pool.keep(&mut rng, &input);
        }
        if last_write.elapsed() > Duration::from_millis(500) {
            stats.seconds = start.elapsed().as_secs_f64();
            write_stats(&stats_path, &stats.to_json(target));
            last_write = Instant::now();
        }
    }
    stats.seconds = start.elapsed().as_secs_f64();
    write_stats(&stats_path, &stats.to_json(target));
    let _ = std::fs::remove_file(&inflight);
    let _ = std::fs::remove_dir_all(&scratch);
}

fn write_stats(path: &Path, v: &Value) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, v.to_string()).expect("stats");
    std::fs::rename(&tmp, path).expect("stats");
}

// ---------------------------------------------------------------------------------------------
// Supervisor: one worker process at a time, restarted after an abort or a hang.

fn stderr_tail(path: &Path) -> String {
    let mut text = String::new();
    if let Ok(mut f) = std::fs::File::open(path) {
        let _ = f.read_to_string(&mut text);
    }
    let lines: Vec<&str> = text.lines().rev().take(2).collect();
    lines.into_iter().rev().collect::<Vec<_>>().join(" | ")
}

fn supervise(target: Target, o: &Options) -> Value {
    let exe = std::env::current_exe().expect("own path");
    let inflight = o.work.join(format!("inflight-{}.bin", target.name()));
    let start = Instant::now();
    let mut dead: Vec<Value> = Vec::new();
    let mut restarts = 0u64;
    loop {
        let left = o.seconds - start.elapsed().as_secs_f64();
        if left < 1.0 || restarts > 20 {
            break;
        }
        let _ = std::fs::remove_file(&inflight);
        let stderr_path = o
            .work
            .join(format!("worker-{}-{restarts}.stderr", target.name()));
        let mut child = Command::new(&exe)
            .arg("--worker")
            .arg(target.name())
            .args(["--seconds", &format!("{left:.1}")])
            .args(["--seed", &(o.seed + restarts).to_string()])
            .arg("--work")
            .arg(&o.work)
            .arg("--corpus")
            .arg(&o.corpus)
            .args(["--max-alloc-mb", &o.max_alloc_mb.to_string()])
            .env("RUST_BACKTRACE", "0")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr_path).expect("stderr file"))
            .spawn()
            .expect("start worker");
        let (status, hung) = loop {
            std::thread::sleep(Duration::from_millis(50));
            if let Some(status) = child.try_wait().expect("wait") {
                break (status, false);
            }
            let age = std::fs::metadata(&inflight)
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok());
            if age.is_some_and(|a| a.as_secs_f64() > o.case_timeout) {
                let _ = child.kill();
                break (child.wait().expect("wait"), true);
            }
        };
        if status.success() {
            break;
        }
        restarts += 1;
        let input = std::fs::read(&inflight).unwrap_or_default();
        let path = save_crash(&o.corpus, &o.work, target, &input);
        let kind = if hung { "HANG" } else { "ABORT" };
        let message = if hung {
            format!("a case ran over {} s", o.case_timeout)
        } else {
            format!("worker exited with {status}: {}", stderr_tail(&stderr_path))
        };
        eprintln!("{}: {kind}: {message} -> {}", target.name(), path.display());
        dead.push(json!({
            "kind": kind,
            "signature": kind,
            "message": message,
            "file": path,
            "bytes": input.len(),
        }));
    }
    // Sum the workers' statistics.
    let mut total = json!({
        "target": target.name(), "cases": 0, "outcomes": {}, "variants": {}, "crashes": dead,
        "slow": [], "max_ms": 0.0, "max_peak_bytes": 0, "big_alloc": 0, "caught_panics": 0,
        "restarts": restarts,
        "seconds": start.elapsed().as_secs_f64(),
    });
    for seed in o.seed..=o.seed + restarts {
        let path = o.work.join(format!("stats-{}-{seed}.json", target.name()));
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        let s: Value = serde_json::from_str(&text).expect("stats json");
        merge_stats(&mut total, &s);
    }
    total
}

fn add_counts(into: &mut Value, from: &Value) {
    for (k, v) in from.as_object().into_iter().flatten() {
        let old = into[k.as_str()].as_u64().unwrap_or(0);
        into[k.as_str()] = json!(old + v.as_u64().unwrap_or(0));
    }
}

fn merge_stats(total: &mut Value, s: &Value) {
    total["cases"] = json!(total["cases"].as_u64().unwrap() + s["cases"].as_u64().unwrap_or(0));
    add_counts(&mut total["outcomes"], &s["outcomes"]);
    for (variant, counts) in s["variants"].as_object().into_iter().flatten() {
        if total["variants"].get(variant).is_none() {
            total["variants"][variant.as_str()] = json!({});
        }
        add_counts(&mut total["variants"][variant.as_str()], counts);
    }
    for key in ["crashes", "slow"] {
        let extra = s[key].as_array().cloned().unwrap_or_default();
        total[key].as_array_mut().unwrap().extend(extra);
    }
    let max = |a: &Value, b: &Value| a.as_f64().unwrap_or(0.0).max(b.as_f64().unwrap_or(0.0));
    total["max_ms"] = json!(max(&total["max_ms"], &s["max_ms"]));
    total["max_peak_bytes"] = json!(max(&total["max_peak_bytes"], &s["max_peak_bytes"]) as u64);
    for key in ["big_alloc", "caught_panics"] {
        total[key] = json!(total[key].as_u64().unwrap() + s[key].as_u64().unwrap_or(0));
    }
}

const CODES: [&str; 8] = [
    "OK",
    "BAD_WEIGHTS",
    "INVALID_ARGUMENT",
    "MODEL_NOT_FOUND",
    "IO",
    "OUT_OF_MEMORY",
    "INTERNAL",
    "PANIC",
];

fn print_table(results: &[Value]) {
    let mut header = format!("{:<38} {:>8}", "target", "cases");
    for c in CODES {
        header.push_str(&format!(" {:>9}", abbreviate(c)));
    }
    header.push_str(&format!(
        " {:>7} {:>6} {:>6} {:>8} {:>8} {:>6}",
        "crashes", "caught", "slow", "max ms", "peak MB", "secs"
    ));
    println!("{header}");
    for r in results {
        let row = |name: &str, counts: &Value, whole: bool| {
            let cases: u64 = counts
                .as_object()
                .map(|m| m.values().filter_map(Value::as_u64).sum())
                .unwrap_or(0);
            let mut line = format!("{name:<38} {cases:>8}");
            for c in CODES {
                line.push_str(&format!(" {:>9}", counts[c].as_u64().unwrap_or(0)));
            }
            if whole {
                line.push_str(&format!(
                    " {:>7} {:>6} {:>6} {:>8.0} {:>8} {:>6.0}",
                    r["crashes"].as_array().map_or(0, Vec::len),
                    r["caught_panics"].as_u64().unwrap_or(0),
                    r["slow"].as_array().map_or(0, Vec::len),
                    r["max_ms"].as_f64().unwrap_or(0.0),
                    r["max_peak_bytes"].as_u64().unwrap_or(0) >> 20,
                    r["seconds"].as_f64().unwrap_or(0.0),
                ));
            }
            println!("{line}");
        };
        row(r["target"].as_str().unwrap(), &r["outcomes"], true);
        for (variant, counts) in r["variants"].as_object().into_iter().flatten() {
            row(&format!("  {variant}"), counts, false);
        }
    }
    for r in results {
        for c in r["crashes"].as_array().into_iter().flatten() {
            println!(
                "crash {}: {} [{} bytes] {}\n    {}",
                r["target"].as_str().unwrap(),
                c["kind"].as_str().unwrap_or(""),
                c["bytes"],
                c["file"].as_str().unwrap_or(""),
                c["message"].as_str().unwrap_or("")
            );
        }
        for s in r["slow"].as_array().into_iter().flatten() {
            println!(
                "slow  {}: {} ms, peak {} MB, {} [{} bytes] {}",
                r["target"].as_str().unwrap(),
                s["ms"],
                s["peak_mb"],
                s["outcome"].as_str().unwrap_or(""),
                s["bytes"],
                s["file"].as_str().unwrap_or("")
            );
        }
    }
}

fn abbreviate(code: &str) -> &str {
    match code {
        "BAD_WEIGHTS" => "BAD_WGHT",
        "INVALID_ARGUMENT" => "INVAL_ARG",
        "MODEL_NOT_FOUND" => "NOT_FOUND",
        "OUT_OF_MEMORY" => "OOM",
        c => c,
    }
}

// ---------------------------------------------------------------------------------------------

/// The default `--max-alloc-mb`; also what `--replay` and `--minimise` run with.
const MAX_ALLOC_MB: usize = 3072;

fn replay(target: Target, files: &[String]) {
    quiet_panics();
    MAX_SINGLE.store(MAX_ALLOC_MB << 20, Ordering::Relaxed);
    let scratch =
        std::env::temp_dir().join(format!("hyperlora-fuzz-replay-{}", std::process::id()));
    let harness = Harness::new(&scratch);
    harness.warm(target);
    for f in files {
        let input = std::fs::read(f).unwrap_or_else(|e| panic!("{f}: {e}"));
        let o = run_case(&harness, target, &input);
        println!(
            "{f}: {} in {:.1} ms, peak {} MB: {}",
            o.label,
            o.elapsed.as_secs_f64() * 1e3,
            o.peak_bytes >> 20,
            o.message.chars().take(300).collect::<String>()
        );
    }
    let _ = std::fs::remove_dir_all(&scratch);
}

/// Shrinks each file keeping its outcome (see [`minimise`]) and keeps it in the corpus: how an
/// input that crashed before a fix becomes a small regression input after it.
fn minimise_into_corpus(target: Target, files: &[String], corpus: &Path) {
    quiet_panics();
    MAX_SINGLE.store(MAX_ALLOC_MB << 20, Ordering::Relaxed);
    let scratch =
        std::env::temp_dir().join(format!("hyperlora-fuzz-minimise-{}", std::process::id()));
    let harness = Harness::new(&scratch);
    harness.warm(target);
    let dir = corpus.join(target.name());
    std::fs::create_dir_all(&dir).expect("corpus folder");
    for f in files {
        let input = std::fs::read(f).unwrap_or_else(|e| panic!("{f}: {e}"));
        let small = minimise(&harness, target, &input, Duration::from_secs(30));
        let o = run_case(&harness, target, &small);
        let path = dir.join(format!("{}.bin", short_hash(&small)));
        std::fs::write(&path, &small).expect("corpus file");
        println!(
            "{f} ({} bytes) -> {} ({} bytes): {}",
            input.len(),
            path.display(),
            small.len(),
            o.signature()
        );
    }
    let _ = std::fs::remove_dir_all(&scratch);
}

fn usage() -> ! {
    eprintln!(
        "usage: fuzz <target|all> [--seconds N] [--seed S] [--work DIR] [--case-timeout S] \
         [--max-alloc-mb M] [--corpus DIR]\n       fuzz --replay <target> FILE...\n\
         \x20      fuzz --minimise <target> FILE...\n\
         targets: {}",
        Target::ALL.map(Target::name).join(", ")
    );
    std::process::exit(2)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let target_of = |name: &str| Target::parse(name).unwrap_or_else(|| usage());
    match args.first().map(String::as_str) {
        Some("--replay") => {
            let Some(name) = args.get(1) else { usage() };
            return replay(target_of(name), &args[2..]);
        }
        Some("--minimise") => {
            let Some(name) = args.get(1) else { usage() };
            return minimise_into_corpus(target_of(name), &args[2..], &corpus_dir());
        }
        _ => {}
    }
    let mut o = Options {
        seconds: 60.0,
        seed: 1,
        work: std::env::temp_dir().join("hyperlora-fuzz"),
        corpus: corpus_dir(),
        case_timeout: 20.0,
        max_alloc_mb: MAX_ALLOC_MB,
    };
    let mut worker_target = None;
    let mut targets = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = || it.next().cloned().unwrap_or_else(|| usage());
        match a.as_str() {
            "--seconds" => o.seconds = value().parse().unwrap_or_else(|_| usage()),
            "--seed" => o.seed = value().parse().unwrap_or_else(|_| usage()),
            "--work" => o.work = value().into(),
            "--corpus" => o.corpus = value().into(),
            "--case-timeout" => o.case_timeout = value().parse().unwrap_or_else(|_| usage()),
            "--max-alloc-mb" => o.max_alloc_mb = value().parse().unwrap_or_else(|_| usage()),
            "--worker" => worker_target = Some(target_of(&value())),
            "all" => targets.extend(Target::ALL),
            name => targets.push(target_of(name)),
        }
    }
    std::fs::create_dir_all(&o.work).expect("work folder");
    if let Some(t) = worker_target {
        return worker(t, &o);
    }
    if targets.is_empty() {
        usage();
    }
    let mut results = Vec::new();
    for t in targets {
        eprintln!("fuzzing {} for {} s (seed {})", t.name(), o.seconds, o.seed);
        results.push(supervise(t, &o));
    }
    print_table(&results);
    let summary = o.work.join("summary.json");
    std::fs::write(&summary, Value::Array(results).to_string()).expect("summary");
    eprintln!("summary: {}", summary.display());
}
