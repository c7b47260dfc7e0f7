//! ONNX execution for the antelopev2 graphs.
//!
//! Engine: **tract-onnx 0.22** (pure Rust, from crates.io; no protoc, no downloaded runtime).
//! Why: it runs all three graph types (SCRFD with nearest-neighbour Resize and dynamic input
//! size, the mxnet-converted 2d106det with BatchNormalization/PRelu, the iresnet ArcFace with
//! residual Adds and BatchNorm1d) and optimises each into a fixed-shape plan with its own
//! conv/matmul kernels. candle-onnx was the alternative: it needs protoc at build time and
//! lacks ops these graphs use. Cost: about 80 extra crates in the lock file; a first build
//! of tract on the 2-core build machine took several minutes (see the face-analysis report).
//!
//! Plans are built per input size and cached (the detector is run at 640/512/384/256), so the
//! first call at a new size pays the optimisation once.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tract_onnx::pb;
use tract_onnx::prelude::*;

use crate::error::{Error, Result};

type Plan = Arc<TypedRunnableModel<TypedModel>>;

/// One graph dimension as the file declares it: a number, or a name (dynamic).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Dim {
    Fixed(i64),
    Dynamic,
}

impl Dim {
    pub fn fixed(&self) -> Option<i64> {
        match self {
            Dim::Fixed(v) if *v > 0 => Some(*v),
            _ => None,
        }
    }
}

/// A graph input or output as declared in the file.
#[derive(Clone, Debug)]
pub struct ValueInfo {
    pub name: String,
    pub shape: Vec<Dim>,
}

/// A loaded ONNX graph with the declared signature and per-size execution plans.
pub struct OnnxModel {
    path: PathBuf,
    pub inputs: Vec<ValueInfo>,
    pub outputs: Vec<ValueInfo>,
    /// Names of the first graph nodes (insightface derives the input normalisation from them).
    pub first_node_names: Vec<String>,
    model: InferenceModel,
    plans: Mutex<HashMap<(usize, usize), Plan>>,
}

fn value_info(v: &pb::ValueInfoProto) -> ValueInfo {
    let shape = match v.r#type.as_ref().and_then(|t| t.value.as_ref()) {
        Some(pb::type_proto::Value::TensorType(t)) => t
            .shape
            .as_ref()
            .map(|s| {
                s.dim
                    .iter()
                    .map(|d| match d.value {
                        Some(pb::tensor_shape_proto::dimension::Value::DimValue(v)) if v > 0 => {
                            Dim::Fixed(v)
                        }
                        _ => Dim::Dynamic,
                    })
                    .collect()
            })
            .unwrap_or_default(),
        None => Vec::new(),
    };
    ValueInfo {
        name: v.name.clone(),
        shape,
    }
}

/// Runs tract on a graph from a file. tract answers some malformed graphs with a panic (an
/// `unwrap` or an assertion) rather than an error; either way the file is at fault, so both
/// become `BAD_WEIGHTS` naming it.
fn guarded<T>(path: &Path, what: &str, f: impl FnOnce() -> TractResult<T>) -> Result<T> {
    let bad =
        |e: &dyn std::fmt::Display| Error::bad_weights(format!("{}: {what}: {e}", path.display()));
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(bad(&e)),
        Err(panic) => {
            let message = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            Err(bad(&format!(
                "the ONNX engine failed on this graph ({message})"
            )))
        }
    }
}

/// Checks the node attributes that size what tract builds: a `Transpose` whose `perm` is not a
/// permutation sends tract's graph builder into unbounded growth, and kernel, stride, padding
/// or axis values far outside any image model's make it allocate for shapes that cannot exist.
fn check_attributes(graph: &pb::GraphProto) -> std::result::Result<(), String> {
    for node in &graph.node {
        for a in &node.attribute {
            let fail = |why: &str| {
                Err(format!(
                    "node {:?} ({}): attribute {} = {:?} {why}",
                    node.name, node.op_type, a.name, a.ints
                ))
            };
            let within =
                |lo: i64, hi: i64| a.ints.iter().chain([&a.i]).all(|v| (lo..=hi).contains(v));
            match a.name.as_str() {
                "perm" => {
                    let mut seen = vec![false; a.ints.len()];
                    for &p in &a.ints {
                        match usize::try_from(p).ok().and_then(|p| seen.get_mut(p)) {
                            Some(s) if !*s => *s = true,
                            _ => return fail("is not a permutation"),
                        }
                    }
                }
                "kernel_shape" | "strides" | "dilations" | "pads" | "group"
                    if !within(0, MAX_DECLARED_SIDE) =>
                {
                    return fail(&format!("is outside 0..={MAX_DECLARED_SIDE}"))
                }
                "axis" | "axes" if !within(-MAX_RANK, MAX_RANK) => {
                    return fail(&format!("is outside -{MAX_RANK}..={MAX_RANK}"))
                }
                _ => {}
            }
        }
        for a in &node.attribute {
            for g in a.g.iter().chain(&a.graphs) {
                check_attributes(g)?;
            }
        }
    }
    Ok(())
}

/// Largest tensor rank an attribute may refer to (image models use 4).
const MAX_RANK: i64 = 16;

/// Largest tensor an execution plan may hold between two nodes, in elements (1 GiB of f32):
/// the largest in antelopev2 at 640 px holds 13 M.
const MAX_PLANNED_ELEMENTS: usize = 1 << 28;

/// Checks that every stored tensor of a graph (initializers, constants, subgraphs) holds as
/// many values as its dims say. tract allocates a tensor from its dims before copying the data
/// in, so dims that lie would make it allocate without bound (or panic on the copy).
fn check_stored_tensors(graph: &pb::GraphProto) -> std::result::Result<(), String> {
    let attribute_tensors = graph
        .node
        .iter()
        .flat_map(|n| &n.attribute)
        .flat_map(|a| a.t.iter().chain(&a.tensors));
    for t in graph.initializer.iter().chain(attribute_tensors) {
        check_stored_tensor(t)?;
    }
    for a in graph.node.iter().flat_map(|n| &n.attribute) {
        for g in a.g.iter().chain(&a.graphs) {
            check_stored_tensors(g)?;
        }
    }
    Ok(())
}

fn check_stored_tensor(t: &pb::TensorProto) -> std::result::Result<(), String> {
    use pb::tensor_proto::{DataLocation, DataType};
    let fail = |why: String| Err(format!("tensor {:?} {:?}: {why}", t.name, t.dims));
    let mut count: u64 = 1;
    for &d in &t.dims {
        match u64::try_from(d).ok().and_then(|d| count.checked_mul(d)) {
            Some(c) => count = c,
            None => return fail("impossible dims".into()),
        }
    }
    if t.data_location == Some(DataLocation::External as i32) {
        // Read from a file beside the model by tract, which checks the length it reads.
        return Ok(());
    }
    let element_bytes = match DataType::from_i32(t.data_type) {
        Some(DataType::Uint8 | DataType::Int8 | DataType::Bool) => 1,
        Some(DataType::Uint16 | DataType::Int16 | DataType::Float16 | DataType::Bfloat16) => 2,
        Some(DataType::Float | DataType::Int32 | DataType::Uint32) => 4,
        Some(DataType::Int64 | DataType::Uint64 | DataType::Double) => 8,
        // Strings, complex numbers: never in these models, and not sized per element.
        _ => return Ok(()),
    };
    let (stored, expected) = if !t.raw_data.is_empty() {
        (t.raw_data.len() as u64, count.checked_mul(element_bytes))
    } else {
        let typed = t.float_data.len()
            + t.int32_data.len()
            + t.int64_data.len()
            + t.double_data.len()
            + t.uint64_data.len();
        (typed as u64, Some(count))
    };
    if expected != Some(stored) {
        let expected = expected.map_or("more than 2^64".into(), |e| e.to_string());
        return fail(format!(
            "{stored} values or bytes stored, the dims need {expected}"
        ));
    }
    Ok(())
}

/// Largest input side a graph may declare. insightface's models declare 112 to 640 (or leave it
/// dynamic); the callers allocate their input from the declared size.
const MAX_DECLARED_SIDE: i64 = 4096;

impl OnnxModel {
    /// Reads and parses an ONNX file. Missing → `MODEL_NOT_FOUND`; truncated or not ONNX →
    /// `BAD_WEIGHTS`, both naming the file.
    pub fn load(path: &Path) -> Result<Self> {
        if !path.is_file() {
            return Err(Error::model_not_found(format!(
                "{}: no such ONNX file",
                path.display()
            )));
        }
        let bad = |what: &str, e: &dyn std::fmt::Display| {
            Error::bad_weights(format!("{}: {what}: {e}", path.display()))
        };
        let bytes = std::fs::read(path).map_err(|e| Error::from(e).context(path.display()))?;
        let onnx = tract_onnx::onnx();
        let proto = guarded(
            path,
            "not a readable ONNX model (truncated or corrupt?)",
            || onnx.proto_model_for_read(&mut bytes.as_slice()),
        )?;
        let graph = proto
            .graph
            .as_ref()
            .ok_or_else(|| bad("not an ONNX model", &"the file holds no graph"))?;
        check_stored_tensors(graph)
            .and_then(|()| check_attributes(graph))
            .map_err(|e| bad("not a usable ONNX model", &e))?;
        let initializers: std::collections::HashSet<&str> =
            graph.initializer.iter().map(|t| t.name.as_str()).collect();
        let inputs: Vec<ValueInfo> = graph
            .input
            .iter()
            .filter(|v| !initializers.contains(v.name.as_str()))
            .map(value_info)
            .collect();
        let outputs: Vec<ValueInfo> = graph.output.iter().map(value_info).collect();
        let first_node_names = graph.node.iter().take(8).map(|n| n.name.clone()).collect();
        if inputs.is_empty() || outputs.is_empty() {
            return Err(bad("not a usable ONNX model", &"no inputs or outputs"));
        }
        let declared = inputs
            .iter()
            .flat_map(|v| v.shape.iter().filter_map(Dim::fixed));
        if let Some(side) = declared.clone().find(|&d| d > MAX_DECLARED_SIDE) {
            return Err(bad(
                "not a usable ONNX model",
                &format!("an input dimension of {side} (at most {MAX_DECLARED_SIDE})"),
            ));
        }
        let dir = path.parent().and_then(|p| p.to_str());
        let parsed = guarded(path, "cannot build the ONNX graph", || {
            onnx.parse(&proto, dir)
        })?;
        if !parsed.unresolved_inputs.is_empty() {
            return Err(bad(
                "cannot build the ONNX graph",
                &format!("unresolved inputs {:?}", parsed.unresolved_inputs),
            ));
        }
        Ok(Self {
            path: path.to_path_buf(),
            inputs,
            outputs,
            first_node_names,
            model: parsed.model,
            plans: Mutex::new(HashMap::new()),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A `BAD_WEIGHTS` error naming this file, for signature checks.
    pub fn signature_error(&self, message: impl std::fmt::Display) -> Error {
        Error::bad_weights(format!(
            "{}: {message} (inputs {:?}, outputs {:?})",
            self.path.display(),
            self.inputs
                .iter()
                .map(|v| (&v.name, &v.shape))
                .collect::<Vec<_>>(),
            self.outputs
                .iter()
                .map(|v| (&v.name, &v.shape))
                .collect::<Vec<_>>()
        ))
    }

    fn plan(&self, h: usize, w: usize) -> Result<Plan> {
        if let Some(p) = self.plans.lock().unwrap().get(&(h, w)) {
            return Ok(p.clone());
        }
        let what = format!("cannot prepare the graph for a 1x3x{h}x{w} input");
        let optimized = guarded(&self.path, &what, || {
            self.model
                .clone()
                .with_input_fact(0, f32::fact([1, 3, h, w]).into())?
                .into_optimized()
        })?;
        // Every shape is known now: refuse before running what would not fit in memory.
        for node in optimized.nodes() {
            for outlet in &node.outputs {
                let elements = outlet
                    .fact
                    .shape
                    .as_concrete()
                    .and_then(|s| s.iter().try_fold(1usize, |n, &d| n.checked_mul(d)));
                if elements.is_none_or(|n| n > MAX_PLANNED_ELEMENTS) {
                    return Err(Error::bad_weights(format!(
                        "{}: {what}: node {:?} would produce a tensor of shape {:?}",
                        self.path.display(),
                        node.name,
                        outlet.fact.shape
                    )));
                }
            }
        }
        let plan = guarded(&self.path, &what, || optimized.into_runnable())?;
        let plan = Arc::new(plan);
        self.plans.lock().unwrap().insert((h, w), plan.clone());
        Ok(plan)
    }

    /// Runs the graph on one NCHW f32 image `[1, 3, h, w]`; returns every output as
    /// (shape, values) in the file's output order.
    pub fn run(&self, input: &[f32], h: usize, w: usize) -> Result<Vec<(Vec<usize>, Vec<f32>)>> {
        if input.len() != 3 * h * w {
            return Err(Error::internal(format!(
                "ONNX input has {} values, expected 3x{h}x{w}",
                input.len()
            )));
        }
        let plan = self.plan(h, w)?;
        let x =
            Tensor::from_shape(&[1, 3, h, w], input).map_err(|e| Error::internal(e.to_string()))?;
        // The plan was built for exactly this input, so a failure here is the graph's.
        guarded(&self.path, "inference failed", || {
            let outs = plan.run(tvec!(x.into()))?;
            outs.iter()
                .map(|t| {
                    let v = t.cast_to::<f32>()?;
                    Ok((t.shape().to_vec(), v.as_slice::<f32>()?.to_vec()))
                })
                .collect()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorCode;
    use crate::testing::tiny_model;

    #[test]
    fn truncated_or_missing_files_are_named() {
        let dir = std::env::temp_dir().join(format!("hyperlora-onnx-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let src = std::fs::read(tiny_model("antelopev2").join("glintr100.onnx")).unwrap();
        let cut = dir.join("glintr100.onnx");
        std::fs::write(&cut, &src[..src.len() / 3]).unwrap();
        let e = OnnxModel::load(&cut).err().unwrap();
        assert_eq!(e.code, ErrorCode::BadWeights, "{e}");
        assert!(e.message.contains("glintr100.onnx"), "{e}");
        std::fs::write(&cut, b"not onnx at all").unwrap();
        let e = OnnxModel::load(&cut).err().unwrap();
        assert_eq!(e.code, ErrorCode::BadWeights, "{e}");
        let e = OnnxModel::load(&dir.join("missing.onnx")).err().unwrap();
        assert_eq!(e.code, ErrorCode::ModelNotFound, "{e}");
        std::fs::remove_dir_all(&dir).ok();
    }
}
