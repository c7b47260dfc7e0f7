//! A minimal, refusing pickle VM for the `data.pkl` of PyTorch checkpoints.
//!
//! It runs only the opcodes `torch.save` emits (protocol 2, plus the few protocol 4 framing
//! opcodes) and knows only the globals a state dict needs: `collections.OrderedDict`,
//! `torch._utils._rebuild_tensor_v2`, `torch._utils._rebuild_parameter` and the
//! `torch.*Storage` types. Any other global is refused by name before anything is called, so a
//! checkpoint cannot run code. Memory and nesting are bounded by the input: every value a step
//! pushes costs at least one byte of the pickle, except memo lookups, which are charged
//! against a budget proportional to the pickle's length; containers nest at most
//! [`MAX_DEPTH`] deep. Every failure is `BAD_WEIGHTS`.

use std::collections::HashMap;

use candle_core::DType;

use crate::{Error, Result};

/// Deepest nesting of containers accepted (a state dict nests 2–3 levels).
pub const MAX_DEPTH: u32 = 64;

/// Values the VM builds. Containers carry their depth and node count so that both limits are
/// checked in O(1).
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Tuple(Seq),
    List(Seq),
    /// Insertion-ordered, like `OrderedDict` (plain dicts are too, since Python 3.7).
    Dict(Dict),
    Global(Global),
    /// A storage named by a persistent id: `data/<key>` in the archive.
    Storage(StorageRef),
    Tensor(TensorRef),
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Seq {
    pub items: Vec<Value>,
    depth: u32,
    nodes: usize,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Dict {
    pub items: Vec<(Value, Value)>,
    depth: u32,
    nodes: usize,
}

/// The globals a checkpoint may name.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Global {
    OrderedDict,
    RebuildTensorV2,
    RebuildParameter,
    Storage(DType),
}

#[derive(Debug, Clone, PartialEq)]
pub struct StorageRef {
    pub key: String,
    pub dtype: DType,
    /// Elements in the storage.
    pub numel: usize,
}

/// `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)`, not yet read.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorRef {
    pub storage: StorageRef,
    /// In elements.
    pub offset: usize,
    pub shape: Vec<usize>,
    pub stride: Vec<usize>,
}

impl Global {
    fn resolve(module: &str, name: &str) -> Result<Self> {
        let storage = |d| Ok(Global::Storage(d));
        match (module, name) {
            ("collections", "OrderedDict") => Ok(Global::OrderedDict),
            ("torch._utils", "_rebuild_tensor_v2") => Ok(Global::RebuildTensorV2),
            ("torch._utils", "_rebuild_parameter") => Ok(Global::RebuildParameter),
            ("torch", "FloatStorage") => storage(DType::F32),
            ("torch", "HalfStorage") => storage(DType::F16),
            ("torch", "BFloat16Storage") => storage(DType::BF16),
            ("torch", "DoubleStorage") => storage(DType::F64),
            ("torch", "LongStorage") => storage(DType::I64),
            ("torch", "ByteStorage") => storage(DType::U8),
            _ => Err(bad(format!(
                "refusing the global {module}.{name}: a weights file holds only tensors"
            ))),
        }
    }
}

impl Value {
    fn depth(&self) -> u32 {
        match self {
            Value::Tuple(s) | Value::List(s) => s.depth,
            Value::Dict(d) => d.depth,
            _ => 0,
        }
    }

    fn nodes(&self) -> usize {
        match self {
            Value::Tuple(s) | Value::List(s) => s.nodes,
            Value::Dict(d) => d.nodes,
            _ => 1,
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            Value::None => "None",
            Value::Bool(_) => "bool",
            Value::Int(_) => "int",
            Value::Float(_) => "float",
            Value::Str(_) => "str",
            Value::Tuple(_) => "tuple",
            Value::List(_) => "list",
            Value::Dict(_) => "dict",
            Value::Global(_) => "global",
            Value::Storage(_) => "storage",
            Value::Tensor(_) => "tensor",
        }
    }
}

impl Seq {
    fn new(items: Vec<Value>) -> Result<Self> {
        let mut s = Seq {
            nodes: 1,
            ..Seq::default()
        };
        for v in items {
            s.push(v)?;
        }
        Ok(s)
    }

    fn push(&mut self, v: Value) -> Result<()> {
        self.depth = grow_depth(self.depth, &v)?;
        self.nodes = self.nodes.saturating_add(v.nodes());
        self.items.push(v);
        Ok(())
    }
}

impl Dict {
    fn new() -> Self {
        Dict {
            nodes: 1,
            ..Dict::default()
        }
    }

    fn insert(&mut self, k: Value, v: Value) -> Result<()> {
        self.depth = grow_depth(grow_depth(self.depth, &k)?, &v)?;
        self.nodes = self
            .nodes
            .saturating_add(k.nodes())
            .saturating_add(v.nodes());
        // Later keys replace earlier ones, as in Python.
        match self.items.iter_mut().find(|(old, _)| *old == k) {
            Some(slot) => slot.1 = v,
            None => self.items.push((k, v)),
        }
        Ok(())
    }
}

fn grow_depth(depth: u32, child: &Value) -> Result<u32> {
    let d = depth.max(child.depth() + 1);
    if d > MAX_DEPTH {
        return Err(bad(format!("containers nested deeper than {MAX_DEPTH}")));
    }
    Ok(d)
}

fn bad(what: impl std::fmt::Display) -> Error {
    Error::bad_weights(format!("checkpoint pickle: {what}"))
}

/// Runs `data` (a `data.pkl`) and returns the object it builds.
pub fn load(data: &[u8]) -> Result<Value> {
    Vm::new(data).run()
}

struct Vm<'a> {
    data: &'a [u8],
    pos: usize,
    stack: Vec<Value>,
    /// Stack lengths at each MARK.
    marks: Vec<usize>,
    memo: HashMap<u32, Value>,
    /// Nodes memo lookups may still copy.
    budget: usize,
}

impl<'a> Vm<'a> {
    fn new(data: &'a [u8]) -> Self {
        Self {
            data,
            pos: 0,
            stack: Vec::new(),
            marks: Vec::new(),
            memo: HashMap::new(),
            budget: data.len().saturating_mul(8).saturating_add(1 << 16),
        }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.data.len())
            .ok_or_else(|| bad("truncated"))?;
        let s = &self.data[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().unwrap()))
    }

    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }

    fn line(&mut self) -> Result<&'a str> {
        let rest = &self.data[self.pos..];
        let n = rest
            .iter()
            .position(|&b| b == b'\n')
            .ok_or_else(|| bad("truncated GLOBAL"))?;
        let line = self.take(n + 1)?;
        std::str::from_utf8(&line[..n]).map_err(|_| bad("a GLOBAL name is not UTF-8"))
    }

    fn string(&mut self, n: usize) -> Result<Value> {
        let bytes = self.take(n)?;
        let s = std::str::from_utf8(bytes).map_err(|_| bad("a string is not UTF-8"))?;
        Ok(Value::Str(s.to_string()))
    }

    fn pop(&mut self) -> Result<Value> {
        self.stack.pop().ok_or_else(|| bad("stack underflow"))
    }

    fn top(&mut self) -> Result<&mut Value> {
        self.stack.last_mut().ok_or_else(|| bad("stack underflow"))
    }

    /// The values pushed since the last MARK, which is removed.
    fn pop_mark(&mut self) -> Result<Vec<Value>> {
        let at = self.marks.pop().ok_or_else(|| bad("no MARK"))?;
        if at > self.stack.len() {
            return Err(bad("MARK above the stack"));
        }
        Ok(self.stack.split_off(at))
    }

    fn put(&mut self, key: u32) -> Result<()> {
        let v = self
            .stack
            .last()
            .ok_or_else(|| bad("stack underflow"))?
            .clone();
        self.charge(&v)?;
        self.memo.insert(key, v);
        Ok(())
    }

    fn get(&mut self, key: u32) -> Result<()> {
        let v = self
            .memo
            .get(&key)
            .ok_or_else(|| bad(format!("memo {key} is not set")))?
            .clone();
        self.charge(&v)?;
        self.stack.push(v);
        Ok(())
    }

    fn charge(&mut self, v: &Value) -> Result<()> {
        self.budget = self
            .budget
            .checked_sub(v.nodes())
            .ok_or_else(|| bad("memo copies exceed the size limit"))?;
        Ok(())
    }

    fn tuple(&mut self, n: usize) -> Result<()> {
        if n > self.stack.len() {
            return Err(bad("stack underflow"));
        }
        let items = self.stack.split_off(self.stack.len() - n);
        self.stack.push(Value::Tuple(Seq::new(items)?));
        Ok(())
    }

    fn extend(&mut self, items: Vec<Value>) -> Result<()> {
        match self.top()? {
            Value::List(s) => items.into_iter().try_for_each(|v| s.push(v)),
            other => Err(bad(format!("APPEND to a {}", other.kind()))),
        }
    }

    fn set_items(&mut self, items: Vec<Value>) -> Result<()> {
        if !items.len().is_multiple_of(2) {
            return Err(bad("SETITEMS with an odd number of values"));
        }
        match self.top()? {
            Value::Dict(d) => {
                let mut it = items.into_iter();
                while let (Some(k), Some(v)) = (it.next(), it.next()) {
                    d.insert(k, v)?;
                }
                Ok(())
            }
            other => Err(bad(format!("SETITEM on a {}", other.kind()))),
        }
    }

    fn run(mut self) -> Result<Value> {
        loop {
            let op = self.u8()?;
            match op {
                0x80 => {
                    // PROTO
                    let p = self.u8()?;
                    if p > 5 {
                        return Err(bad(format!("pickle protocol {p}")));
                    }
                }
                0x95 => {
                    // FRAME: a length hint only.
                    self.take(8)?;
                }
                b'.' => {
                    // STOP
                    let v = self.pop()?;
                    return Ok(v);
                }
                b'(' => self.marks.push(self.stack.len()),
                b'N' => self.stack.push(Value::None),
                0x88 => self.stack.push(Value::Bool(true)),
                0x89 => self.stack.push(Value::Bool(false)),
                b'K' => {
                    let v = self.u8()?;
                    self.stack.push(Value::Int(v.into()))
                }
                b'M' => {
                    let v = self.u16()?;
                    self.stack.push(Value::Int(v.into()))
                }
                b'J' => {
                    let v = self.u32()? as i32;
                    self.stack.push(Value::Int(v.into()))
                }
                0x8a => {
                    // LONG1: little-endian two's complement of n ≤ 8 bytes.
                    let n = self.u8()? as usize;
                    if n > 8 {
                        return Err(bad(format!("an integer of {n} bytes")));
                    }
                    let b = self.take(n)?;
                    let mut buf = [if b.last().is_some_and(|&x| x & 0x80 != 0) {
                        0xff
                    } else {
                        0
                    }; 8];
                    buf[..n].copy_from_slice(b);
                    self.stack.push(Value::Int(i64::from_le_bytes(buf)))
                }
                b'G' => {
                    let b = self.take(8)?;
                    self.stack
                        .push(Value::Float(f64::from_be_bytes(b.try_into().unwrap())))
                }
                b'X' => {
                    let n = self.u32()? as usize;
                    let v = self.string(n)?;
                    self.stack.push(v)
                }
                0x8c => {
                    let n = self.u8()? as usize;
                    let v = self.string(n)?;
                    self.stack.push(v)
                }
                b')' => self.stack.push(Value::Tuple(Seq::new(Vec::new())?)),
                b']' => self.stack.push(Value::List(Seq::new(Vec::new())?)),
                b'}' => self.stack.push(Value::Dict(Dict::new())),
                b't' => {
                    let items = self.pop_mark()?;
                    self.stack.push(Value::Tuple(Seq::new(items)?))
                }
                0x85 => self.tuple(1)?,
                0x86 => self.tuple(2)?,
                0x87 => self.tuple(3)?,
                b'a' => {
                    let v = self.pop()?;
                    self.extend(vec![v])?
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    self.extend(items)?
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    self.set_items(vec![k, v])?
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    self.set_items(items)?
                }
                b'q' => {
                    let k = self.u8()?;
                    self.put(k.into())?
                }
                b'r' => {
                    let k = self.u32()?;
                    self.put(k)?
                }
                0x94 => {
                    // MEMOIZE
                    let k = self.memo.len() as u32;
                    self.put(k)?
                }
                b'h' => {
                    let k = self.u8()?;
                    self.get(k.into())?
                }
                b'j' => {
                    let k = self.u32()?;
                    self.get(k)?
                }
                b'c' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    self.stack
                        .push(Value::Global(Global::resolve(module, name)?))
                }
                0x93 => {
                    // STACK_GLOBAL
                    let name = self.pop()?;
                    let module = self.pop()?;
                    match (module, name) {
                        (Value::Str(m), Value::Str(n)) => {
                            self.stack.push(Value::Global(Global::resolve(&m, &n)?))
                        }
                        _ => return Err(bad("STACK_GLOBAL without two strings")),
                    }
                }
                b'Q' => {
                    // BINPERSID
                    let pid = self.pop()?;
                    self.stack.push(Value::Storage(storage_ref(pid)?))
                }
                b'R' => {
                    let args = self.pop()?;
                    let f = self.pop()?;
                    self.stack.push(reduce(f, args)?)
                }
                b'b' => {
                    // BUILD: the only state torch.save writes is an OrderedDict's `_metadata`
                    // (module versions), which a reader of tensors does not need.
                    let _state = self.pop()?;
                    match self.top()? {
                        Value::Dict(_) | Value::Tensor(_) => {}
                        other => return Err(bad(format!("BUILD on a {}", other.kind()))),
                    }
                }
                _ => {
                    return Err(bad(format!(
                        "opcode 0x{op:02x} at byte {} is not one torch.save writes",
                        self.pos - 1
                    )))
                }
            }
        }
    }
}

fn as_usize(v: &Value, what: &str) -> Result<usize> {
    match v {
        Value::Int(i) if *i >= 0 => Ok(*i as usize),
        other => Err(bad(format!("{what} is a {} {other:?}", other.kind()))),
    }
}

fn usize_tuple(v: &Value, what: &str) -> Result<Vec<usize>> {
    match v {
        Value::Tuple(s) => s.items.iter().map(|x| as_usize(x, what)).collect(),
        other => Err(bad(format!("{what} is a {}", other.kind()))),
    }
}

/// `('storage', torch.FloatStorage, key, location, numel)`.
fn storage_ref(pid: Value) -> Result<StorageRef> {
    let Value::Tuple(s) = pid else {
        return Err(bad("a persistent id that is not a tuple"));
    };
    match s.items.as_slice() {
        [Value::Str(tag), Value::Global(Global::Storage(dtype)), Value::Str(key), Value::Str(_), numel]
            if tag == "storage" =>
        {
            Ok(StorageRef {
                key: key.clone(),
                dtype: *dtype,
                numel: as_usize(numel, "a storage size")?,
            })
        }
        _ => Err(bad("a persistent id that is not a torch storage")),
    }
}

fn reduce(f: Value, args: Value) -> Result<Value> {
    let Value::Tuple(args) = args else {
        return Err(bad("REDUCE arguments are not a tuple"));
    };
    let args = args.items;
    match f {
        Value::Global(Global::OrderedDict) if args.is_empty() => Ok(Value::Dict(Dict::new())),
        Value::Global(Global::RebuildTensorV2) if (6..=7).contains(&args.len()) => {
            let Value::Storage(storage) = &args[0] else {
                return Err(bad("a tensor without a storage"));
            };
            let shape = usize_tuple(&args[2], "a tensor size")?;
            let stride = usize_tuple(&args[3], "a tensor stride")?;
            if shape.len() != stride.len() {
                return Err(bad(format!(
                    "a tensor with size {shape:?} and stride {stride:?}"
                )));
            }
            Ok(Value::Tensor(TensorRef {
                storage: storage.clone(),
                offset: as_usize(&args[1], "a storage offset")?,
                shape,
                stride,
            }))
        }
        Value::Global(Global::RebuildParameter) if args.len() == 3 => match &args[0] {
            Value::Tensor(t) => Ok(Value::Tensor(t.clone())),
            other => Err(bad(format!("a parameter of a {}", other.kind()))),
        },
        Value::Global(g) => Err(bad(format!("{g:?} called with {} arguments", args.len()))),
        other => Err(bad(format!("REDUCE on a {}", other.kind()))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_foreign_globals_by_name() {
        let e = load(b"\x80\x02cos\nsystem\nq\x00.").unwrap_err();
        assert_eq!(e.code, crate::ErrorCode::BadWeights);
        assert!(e.message.contains("os.system"), "{e}");
    }

    #[test]
    fn bounds_nesting_and_memo_copies() {
        // 100 nested lists.
        let mut p = b"\x80\x02".to_vec();
        p.extend(std::iter::repeat_n(b']', 100));
        p.extend(std::iter::repeat_n(b'a', 99));
        p.push(b'.');
        assert!(load(&p).unwrap_err().message.contains("nested"));
        // A list copied from the memo into itself, doubling each time.
        let mut p = b"\x80\x02]q\x00".to_vec();
        for _ in 0..40 {
            p.extend(b"(h\x00h\x00eq\x00");
        }
        p.push(b'.');
        assert!(load(&p).is_err());
    }

    #[test]
    fn reads_an_ordered_dict_of_ints() {
        // pickle.dumps(OrderedDict(a=1, b=-2**40), protocol=2)
        let p = b"\x80\x02ccollections\nOrderedDict\nq\x00)Rq\x01(X\x01\x00\x00\x00aq\x02K\x01X\x01\x00\x00\x00bq\x03\x8a\x06\x00\x00\x00\x00\x00\xffq\x04u.";
        let Value::Dict(d) = load(p).unwrap() else {
            panic!()
        };
        assert_eq!(d.items[0], (Value::Str("a".into()), Value::Int(1)));
        assert_eq!(d.items[1], (Value::Str("b".into()), Value::Int(-(1 << 40))));
    }
}
