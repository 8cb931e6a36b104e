//! PyTorch `.pth` files, read as `torch.load` would read them, without running anything.
//!
//! `torch.save` writes a zip (`NAME/data.pkl`, one `NAME/data/KEY` entry per storage) or, with
//! `_use_new_zipfile_serialization=False` and before PyTorch 1.6, the legacy stream: five pickles
//! (magic number, protocol, system info, the object, the storage keys) and then each storage's
//! bytes behind its element count. Only pickle's opcodes are interpreted, and a global outside
//! [`ALLOWED`] refuses the file, as `torch.load(weights_only=True)` does: nothing is ever called.
//!
//! A tensor is its storage seen through an offset, a shape and strides; all three are honoured
//! and checked against the storage, so a transposed or sliced view reads as the matrix PyTorch
//! gives, and a view past its storage is refused instead of reading zeros. Only the storages of
//! the state dict are read.
//!
//! Bounds, each checked before anything is allocated for it: the pickle is at most
//! [`MAX_PICKLE`] bytes, its stack and memo grow only with the bytes read, nesting needs no
//! recursion (containers are freed by a loop), a storage holds no more bytes than the file (so a
//! compressed entry cannot inflate past it), and the tensors hold no more values than the file
//! has bytes (plus [`EXPANDED_SLACK`] for the odd stride-0 expansion).

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;
use std::rc::Rc;

use anyhow::{anyhow, bail, Context, Result};

/// The most bytes of pickle read: a state dict's pickle is about 100 bytes per tensor.
pub const MAX_PICKLE: usize = 8 << 20;

/// The deepest the pickle's stack and marks may grow, and the most objects its memo may hold:
/// `torch.save` batches items by 1,000, so its stacks stay a few thousand deep.
const MAX_STACK: usize = 100_000;
const MAX_MEMO: usize = 1_000_000;

/// Values a file may expand to beyond one per byte it holds (a stride-0 `expand` of a bias).
pub const EXPANDED_SLACK: u128 = 1 << 24;

/// The globals a checkpoint may name: tensor and storage rebuilders, `OrderedDict`, and the
/// plain data training scripts store beside a state dict (`argparse.Namespace`, numpy scalars).
/// Unknown ones are refused, not skipped: a file that would run code is not read at all.
const ALLOWED: &[&str] = &[
    "collections.OrderedDict",
    "torch._utils._rebuild_tensor",
    "torch._utils._rebuild_tensor_v2",
    "torch._utils._rebuild_parameter",
    "torch._utils._rebuild_parameter_with_state",
    "torch._tensor._rebuild_from_type_v2",
    "torch.Tensor",
    "torch.nn.parameter.Parameter",
    "torch.Size",
    "torch.device",
    "_codecs.encode",
    "argparse.Namespace",
    "builtins.set",
    "builtins.frozenset",
    "builtins.slice",
    "builtins.complex",
    "builtins.bytearray",
    "numpy.dtype",
    "numpy.core.multiarray.scalar",
    "numpy._core.multiarray.scalar",
    "numpy.core.multiarray._reconstruct",
    "numpy._core.multiarray._reconstruct",
    "numpy.ndarray",
];

fn allowed(global: &str) -> bool {
    ALLOWED.contains(&global)
        // Quantized, sparse and meta tensors: read as opaque, refused if the state dict holds one.
        || global.starts_with("torch._utils._rebuild_")
        // Storage classes (`torch.FloatStorage`) and dtypes (`torch.float32`).
        || global.strip_prefix("torch.").is_some_and(|n| !n.contains('.') && (n.ends_with("Storage") || DTYPES.iter().any(|d| d.0 == n)))
}

/// Element types, by storage class and dtype name.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Dtype {
    F32,
    F16,
    BF16,
    Other(&'static str, usize),
}

const DTYPES: &[(&str, &str, Dtype)] = &[
    ("float32", "FloatStorage", Dtype::F32),
    ("float16", "HalfStorage", Dtype::F16),
    ("bfloat16", "BFloat16Storage", Dtype::BF16),
    ("float64", "DoubleStorage", Dtype::Other("float64", 8)),
    ("int64", "LongStorage", Dtype::Other("int64", 8)),
    ("int32", "IntStorage", Dtype::Other("int32", 4)),
    ("int16", "ShortStorage", Dtype::Other("int16", 2)),
    ("int8", "CharStorage", Dtype::Other("int8", 1)),
    ("uint8", "ByteStorage", Dtype::Other("uint8", 1)),
    ("bool", "BoolStorage", Dtype::Other("bool", 1)),
    ("complex64", "ComplexFloatStorage", Dtype::Other("complex64", 8)),
    ("complex128", "ComplexDoubleStorage", Dtype::Other("complex128", 16)),
    ("uint8", "UntypedStorage", Dtype::Other("uint8", 1)),
];

impl Dtype {
    fn of_storage(class: &str) -> Option<Self> {
        let name = class.strip_prefix("torch.")?;
        DTYPES.iter().find(|d| d.1 == name).map(|d| d.2)
    }

    fn size(self) -> usize {
        match self {
            Dtype::F32 => 4,
            Dtype::F16 | Dtype::BF16 => 2,
            Dtype::Other(_, size) => size,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Dtype::F32 => "float32",
            Dtype::F16 => "float16",
            Dtype::BF16 => "bfloat16",
            Dtype::Other(name, _) => name,
        }
    }
}

/// One storage a persistent id names.
#[derive(Debug)]
struct Storage {
    key: String,
    dtype: Dtype,
    numel: u64,
}

/// A tensor as pickled: a view of a storage.
#[derive(Debug)]
struct View {
    storage: Rc<Storage>,
    offset: u64,
    size: Vec<u64>,
    stride: Vec<u64>,
}

/// What the pickle machine builds. Lists, tuples and dicts are shared (`BINGET` hands out the
/// same object, which later opcodes may still fill), as in Python.
#[derive(Clone)]
enum Value {
    None,
    Bool(bool),
    Int(i64),
    /// An integer past 64 bits, as its little-endian two's-complement bytes.
    Long(Rc<[u8]>),
    Float(f64),
    Str(Rc<str>),
    Bytes(Rc<[u8]>),
    Global(Rc<str>),
    Seq(Rc<Seq>),
    Dict(Rc<Dict>),
    Storage(Rc<Storage>),
    Tensor(Rc<View>),
    /// What an allowed callable other than a tensor rebuilder made; never looked into.
    Object(Rc<str>),
}

#[derive(Default)]
struct Seq(RefCell<Vec<Value>>);

#[derive(Default)]
struct Dict(RefCell<Vec<(Value, Value)>>);

impl Drop for Seq {
    fn drop(&mut self) {
        release(std::mem::take(self.0.get_mut()));
    }
}

impl Drop for Dict {
    fn drop(&mut self) {
        release(self.0.get_mut().drain(..).flat_map(|(k, v)| [k, v]).collect());
    }
}

/// Frees nested containers with a loop: dropping 200,000 nested lists recursively overflows the
/// stack.
fn release(mut pending: Vec<Value>) {
    while let Some(value) = pending.pop() {
        match value {
            Value::Seq(rc) => {
                if let Ok(mut seq) = Rc::try_unwrap(rc) {
                    pending.append(seq.0.get_mut());
                }
            }
            Value::Dict(rc) => {
                if let Ok(mut dict) = Rc::try_unwrap(rc) {
                    pending.extend(dict.0.get_mut().drain(..).flat_map(|(k, v)| [k, v]));
                }
            }
            _ => {}
        }
    }
}

impl Value {
    fn seq(items: Vec<Value>) -> Self {
        Value::Seq(Rc::new(Seq(RefCell::new(items))))
    }

    /// What the value is, in a few words, for an error.
    fn what(&self) -> String {
        match self {
            Value::None => "None".into(),
            Value::Bool(b) => format!("the boolean {b}"),
            Value::Int(i) => format!("the integer {i}"),
            Value::Long(b) => format!("an integer of {} bytes", b.len()),
            Value::Float(f) => format!("the number {f}"),
            Value::Str(s) => format!("the string {:?}", s.chars().take(40).collect::<String>()),
            Value::Bytes(b) => format!("{} bytes", b.len()),
            Value::Global(g) => format!("the global `{g}`"),
            Value::Seq(s) => format!("a sequence of {}", s.0.borrow().len()),
            Value::Dict(d) => format!("a dict of {}", d.0.borrow().len()),
            Value::Storage(s) => format!("a storage (`{}`)", s.key),
            Value::Tensor(_) => "a tensor".into(),
            Value::Object(o) => format!("an object made by `{o}`"),
        }
    }

    fn int(&self) -> Option<i64> {
        match self {
            Value::Int(i) => Some(*i),
            Value::Bool(b) => Some(*b as i64),
            _ => None,
        }
    }

    fn items(&self) -> Option<Vec<Value>> {
        match self {
            Value::Seq(s) => Some(s.0.borrow().clone()),
            _ => None,
        }
    }
}

/// A pickle machine over one byte slice, from `pos` to its `STOP`.
struct Machine<'a> {
    bytes: &'a [u8],
    pos: usize,
    stack: Vec<Value>,
    marks: Vec<Vec<Value>>,
    memo: HashMap<u32, Value>,
    storages: &'a mut HashMap<String, Rc<Storage>>,
}

impl<'a> Machine<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let bytes: &'a [u8] = self.bytes;
        let end = self.pos.checked_add(n).filter(|&e| e <= bytes.len()).ok_or_else(|| anyhow!("the pickle ends inside an opcode (truncated file?)"))?;
        let out = &bytes[self.pos..end];
        self.pos = end;
        Ok(out)
    }

    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }

    fn le<const N: usize>(&mut self) -> Result<[u8; N]> {
        Ok(self.take(N)?.try_into().expect("N bytes"))
    }

    /// A length field, which cannot exceed what is left to read.
    fn len(&mut self, width: usize) -> Result<usize> {
        let mut b = [0u8; 8];
        b[..width].copy_from_slice(self.take(width)?);
        let n = u64::from_le_bytes(b);
        if n > (self.bytes.len() - self.pos) as u64 {
            bail!("a length of {n} bytes runs past the end of the pickle");
        }
        Ok(n as usize)
    }

    fn line(&mut self) -> Result<&'a str> {
        let rest = &self.bytes[self.pos..];
        let n = rest.iter().take(257).position(|&b| b == b'\n').ok_or_else(|| anyhow!("a text field longer than 256 bytes"))?;
        let text = std::str::from_utf8(&rest[..n]).map_err(|_| anyhow!("a text field that is not UTF-8"))?;
        self.pos += n + 1;
        Ok(text)
    }

    fn text(&mut self, n: usize) -> Result<Rc<str>> {
        let bytes = self.take(n)?;
        Ok(std::str::from_utf8(bytes).map_err(|_| anyhow!("a string that is not UTF-8"))?.into())
    }

    fn push(&mut self, v: Value) {
        self.stack.push(v);
    }

    fn check_bounds(&self) -> Result<()> {
        if self.stack.len() + self.marks.len() > MAX_STACK {
            bail!("the pickle's stack grows past {MAX_STACK} (nested too deep)");
        }
        if self.memo.len() > MAX_MEMO {
            bail!("the pickle memoizes more than {MAX_MEMO} objects");
        }
        Ok(())
    }

    fn pop(&mut self) -> Result<Value> {
        self.stack.pop().ok_or_else(|| anyhow!("an opcode pops an empty stack"))
    }

    fn top(&self) -> Result<&Value> {
        self.stack.last().ok_or_else(|| anyhow!("an opcode reads an empty stack"))
    }

    /// The items pushed since the last MARK.
    fn pop_mark(&mut self) -> Result<Vec<Value>> {
        let below = self.marks.pop().ok_or_else(|| anyhow!("an opcode needs a MARK that is not there"))?;
        Ok(std::mem::replace(&mut self.stack, below))
    }

    fn global(&mut self, module: &str, name: &str) -> Result<Value> {
        let global = format!("{module}.{name}");
        if !allowed(&global) {
            bail!(
                "it names `{global}`, which is not a tensor, a storage or plain data; a checkpoint is never run\n  hint: if you trust the file, save only its state dict from Python: torch.save(torch.load(F, weights_only=False)[\"model\"], \"clean.pth\")"
            );
        }
        Ok(Value::Global(global.into()))
    }

    fn run(&mut self) -> Result<Value> {
        loop {
            let at = self.pos;
            let op = self.u8()?;
            self.step(op).and_then(|()| self.check_bounds()).with_context(|| format!("pickle opcode 0x{op:02x} at byte {at}"))?;
            if op == b'.' {
                return self.pop();
            }
        }
    }

    fn step(&mut self, op: u8) -> Result<()> {
        match op {
            b'.' => {}
            0x80 => {
                self.u8()?;
            }
            0x95 => {
                self.le::<8>()?;
            }
            b'(' => {
                self.marks.push(std::mem::take(&mut self.stack));
            }
            b'0' => {
                self.pop()?;
            }
            b'1' => {
                self.pop_mark()?;
            }
            b'2' => {
                let v = self.top()?.clone();
                self.push(v);
            }
            b'N' => self.push(Value::None),
            0x88 => self.push(Value::Bool(true)),
            0x89 => self.push(Value::Bool(false)),
            b'J' => {
                let v = i32::from_le_bytes(self.le()?);
                self.push(Value::Int(v as i64));
            }
            b'K' => {
                let v = self.u8()?;
                self.push(Value::Int(v as i64));
            }
            b'M' => {
                let v = u16::from_le_bytes(self.le()?);
                self.push(Value::Int(v as i64));
            }
            0x8a | 0x8b => {
                let n = if op == 0x8a { self.u8()? as usize } else { self.len(4)? };
                let b = self.take(n)?;
                if n > 8 {
                    self.push(Value::Long(b.into()));
                    return Ok(());
                }
                let fill = if b.last().is_some_and(|&x| x & 0x80 != 0) { 0xff } else { 0 };
                let mut w = [fill; 8];
                w[..n].copy_from_slice(b);
                self.push(Value::Int(i64::from_le_bytes(w)));
            }
            b'I' => {
                let line = self.line()?;
                let v = match line {
                    "00" => Value::Bool(false),
                    "01" => Value::Bool(true),
                    _ => Value::Int(line.parse().map_err(|_| anyhow!("`{line}` is not an integer"))?),
                };
                self.push(v);
            }
            b'G' => {
                let v = f64::from_be_bytes(self.le()?);
                self.push(Value::Float(v));
            }
            b'X' | 0x8c | 0x8d => {
                let n = match op {
                    0x8c => self.len(1)?,
                    b'X' => self.len(4)?,
                    _ => self.len(8)?,
                };
                let s = self.text(n)?;
                self.push(Value::Str(s));
            }
            // Python 2's byte strings, as protocol 2 writes them: read as text if they are.
            b'T' | b'U' => {
                let n = if op == b'U' { self.len(1)? } else { self.len(4)? };
                let b = self.take(n)?;
                self.push(match std::str::from_utf8(b) {
                    Ok(s) => Value::Str(s.into()),
                    Err(_) => Value::Bytes(b.into()),
                });
            }
            b'B' | b'C' | 0x8e | 0x96 => {
                let n = match op {
                    b'C' => self.len(1)?,
                    b'B' => self.len(4)?,
                    _ => self.len(8)?,
                };
                let b = self.take(n)?;
                self.push(Value::Bytes(b.into()));
            }
            b']' | b')' | 0x8f => self.push(Value::seq(Vec::new())),
            b'}' => self.push(Value::Dict(Rc::default())),
            b'l' | b't' | 0x91 => {
                let items = self.pop_mark()?;
                self.push(Value::seq(items));
            }
            0x85..=0x87 => {
                let n = (op - 0x84) as usize;
                if self.stack.len() < n {
                    bail!("a tuple of {n} from a stack of {}", self.stack.len());
                }
                let items = self.stack.split_off(self.stack.len() - n);
                self.push(Value::seq(items));
            }
            b'd' => {
                let items = self.pop_mark()?;
                let dict = Dict::default();
                self.set_items(&dict, items)?;
                self.push(Value::Dict(Rc::new(dict)));
            }
            b'a' => {
                let v = self.pop()?;
                self.append(vec![v])?;
            }
            b'e' | 0x90 => {
                let items = self.pop_mark()?;
                self.append(items)?;
            }
            b's' => {
                let v = self.pop()?;
                let k = self.pop()?;
                self.set_into_top(vec![k, v])?;
            }
            b'u' => {
                let items = self.pop_mark()?;
                self.set_into_top(items)?;
            }
            b'c' => {
                let module = self.line()?;
                let name = self.line()?;
                let g = self.global(module, name)?;
                self.push(g);
            }
            0x93 => {
                let (name, module) = (self.pop()?, self.pop()?);
                let (Value::Str(module), Value::Str(name)) = (&module, &name) else {
                    bail!("STACK_GLOBAL on {} and {}", module.what(), name.what());
                };
                let g = self.global(module, name)?;
                self.push(g);
            }
            b'R' => {
                let args = self.pop()?;
                let callable = self.pop()?;
                let v = self.call(&callable, &args)?;
                self.push(v);
            }
            0x81 => {
                let _args = self.pop()?;
                let class = self.pop()?;
                let Value::Global(name) = class else { bail!("NEWOBJ of {}", class.what()) };
                self.push(Value::Object(name));
            }
            0x92 => {
                let (_kwargs, _args, class) = (self.pop()?, self.pop()?, self.pop()?);
                let Value::Global(name) = class else { bail!("NEWOBJ_EX of {}", class.what()) };
                self.push(Value::Object(name));
            }
            // An object's `__setstate__`: what a state dict needs never depends on it.
            b'b' => {
                self.pop()?;
                self.top()?;
            }
            b'Q' => {
                let pid = self.pop()?;
                let storage = self.persistent(&pid)?;
                self.push(storage);
            }
            b'h' | b'j' | b'g' => {
                let key = match op {
                    b'h' => self.u8()? as u32,
                    b'j' => u32::from_le_bytes(self.le()?),
                    _ => self.line()?.parse().map_err(|_| anyhow!("GET of a non-integer key"))?,
                };
                let v = self.memo.get(&key).cloned().ok_or_else(|| anyhow!("memo entry {key} was never stored"))?;
                self.push(v);
            }
            b'q' | b'r' | b'p' | 0x94 => {
                let key = match op {
                    b'q' => self.u8()? as u32,
                    b'r' => u32::from_le_bytes(self.le()?),
                    b'p' => self.line()?.parse().map_err(|_| anyhow!("PUT of a non-integer key"))?,
                    _ => self.memo.len() as u32,
                };
                let v = self.top()?.clone();
                self.memo.insert(key, v);
            }
            _ => bail!("an opcode torch.save never writes (protocol-0 text, an extension or an out-of-band buffer)"),
        }
        Ok(())
    }

    fn append(&mut self, items: Vec<Value>) -> Result<()> {
        match self.top()? {
            Value::Seq(seq) => {
                seq.0.borrow_mut().extend(items);
                Ok(())
            }
            // `numpy` arrays and `argparse` objects take their items through `extend`.
            Value::Object(_) => Ok(()),
            other => bail!("APPEND to {}", other.what()),
        }
    }

    fn set_into_top(&mut self, items: Vec<Value>) -> Result<()> {
        match self.top()?.clone() {
            Value::Dict(dict) => self.set_items(&dict, items),
            Value::Object(_) => Ok(()),
            other => bail!("SETITEM on {}", other.what()),
        }
    }

    fn set_items(&self, dict: &Dict, items: Vec<Value>) -> Result<()> {
        if items.len() % 2 == 1 {
            bail!("an odd number of items for a dict");
        }
        let mut pairs = dict.0.borrow_mut();
        let mut it = items.into_iter();
        // A later key replaces an earlier one, as in Python: readers take the last.
        while let (Some(k), Some(v)) = (it.next(), it.next()) {
            pairs.push((k, v));
        }
        Ok(())
    }

    /// `('storage', torch.FloatStorage, key, location, numel[, view])`: one storage per key,
    /// whichever tensors share it.
    fn persistent(&mut self, pid: &Value) -> Result<Value> {
        let items = pid.items().ok_or_else(|| anyhow!("a persistent id that is {}", pid.what()))?;
        let (Some(Value::Str(tag)), Some(Value::Global(class)), Some(key), Some(numel)) = (items.first(), items.get(1), items.get(2), items.get(4)) else {
            bail!("a persistent id that is not a storage");
        };
        let key: String = match key {
            Value::Str(s) => s.to_string(),
            Value::Int(i) => i.to_string(),
            other => bail!("a storage key that is {}", other.what()),
        };
        if &**tag != "storage" || items.get(5).is_some_and(|v| !matches!(v, Value::None)) {
            bail!("storage `{key}` is a view of another storage (a format older than PyTorch 1.0); re-save it with a recent PyTorch");
        }
        let dtype = Dtype::of_storage(class).ok_or_else(|| anyhow!("storage `{key}` is of the unknown class `{class}`"))?;
        let numel = numel.int().filter(|n| *n >= 0).ok_or_else(|| anyhow!("storage `{key}` has a size that is {}", numel.what()))? as u64;
        let storage = Rc::new(Storage { key: key.clone(), dtype, numel });
        let storage = self.storages.entry(key.clone()).or_insert(storage).clone();
        if storage.dtype != dtype || storage.numel != numel {
            bail!("storage `{key}` is named twice with different types or sizes");
        }
        Ok(Value::Storage(storage))
    }

    fn call(&mut self, callable: &Value, args: &Value) -> Result<Value> {
        let Value::Global(name) = callable else { bail!("REDUCE calls {}", callable.what()) };
        let args = args.items().ok_or_else(|| anyhow!("`{name}` called with {}", args.what()))?;
        Ok(match &**name {
            "collections.OrderedDict" if args.is_empty() => Value::Dict(Rc::default()),
            "torch._utils._rebuild_tensor" | "torch._utils._rebuild_tensor_v2" => Value::Tensor(Rc::new(view(&args).with_context(|| format!("`{name}`"))?)),
            "torch._utils._rebuild_parameter" | "torch._utils._rebuild_parameter_with_state" => match args.first() {
                Some(t @ Value::Tensor(_)) => t.clone(),
                _ => Value::Object(name.clone()),
            },
            // Its function is one of the others: one level, so a forged chain cannot recurse.
            "torch._tensor._rebuild_from_type_v2" => match (args.first(), args.get(2)) {
                (Some(func @ Value::Global(f)), Some(inner)) if &**f != "torch._tensor._rebuild_from_type_v2" => self.call(func, inner)?,
                _ => bail!("`{name}` with {} arguments", args.len()),
            },
            "_codecs.encode" => match args.first() {
                // Protocol 2 writes Python 3 bytes as `encode(text, "latin1")`.
                Some(Value::Str(s)) => Value::Bytes(s.chars().map(|c| c as u32 as u8).collect::<Vec<u8>>().into()),
                _ => Value::Object(name.clone()),
            },
            _ => Value::Object(name.clone()),
        })
    }
}

/// `_rebuild_tensor_v2(storage, offset, size, stride, ...)`.
fn view(args: &[Value]) -> Result<View> {
    let Some(Value::Storage(storage)) = args.first() else { bail!("without a storage") };
    let offset = args.get(1).and_then(Value::int).filter(|o| *o >= 0).ok_or_else(|| anyhow!("with a storage offset that is not a non-negative integer"))?;
    let dims = |i: usize, what: &str| -> Result<Vec<u64>> {
        let items = args.get(i).and_then(Value::items).ok_or_else(|| anyhow!("without a {what}"))?;
        if items.len() > 64 {
            bail!("with a {what} of {} dimensions", items.len());
        }
        items
            .iter()
            .map(|v| v.int().filter(|n| *n >= 0).map(|n| n as u64).ok_or_else(|| anyhow!("with a {what} entry that is {}", v.what())))
            .collect()
    };
    let (size, stride) = (dims(2, "size")?, dims(3, "stride")?);
    if size.len() != stride.len() {
        bail!("with {} sizes and {} strides", size.len(), stride.len());
    }
    Ok(View { storage: storage.clone(), offset: offset as u64, size, stride })
}

/// Where a file's storages are.
enum Archive {
    Zip { zip: zip::ZipArchive<File>, prefix: String },
    /// Legacy: each storage's byte offset in the file.
    Stream { file: File, at: HashMap<String, u64> },
}

impl Archive {
    /// The storage's bytes, of which the file has `unread` left to give.
    fn bytes(&mut self, storage: &Storage, unread: u64) -> Result<Vec<u8>> {
        let want = (storage.numel as u128) * storage.dtype.size() as u128;
        if want > unread as u128 {
            bail!("storage `{}` declares {want} bytes, more than the file holds beside the storages read before it ({unread} bytes)", storage.key);
        }
        let want = want as u64;
        let mut bytes = Vec::with_capacity(want as usize);
        match self {
            Archive::Zip { zip, prefix } => {
                let name = format!("{prefix}data/{}", storage.key);
                let entry = zip.by_name(&name).map_err(|_| anyhow!("storage `{}` is missing from the archive (no entry `{name}`)", storage.key))?;
                entry.take(want + 1).read_to_end(&mut bytes)?;
            }
            Archive::Stream { file, at } => {
                let offset = *at.get(&storage.key).ok_or_else(|| anyhow!("storage `{}` is not among the file's storages", storage.key))?;
                file.seek(SeekFrom::Start(offset))?;
                // The next storage follows: its length was checked against the file's.
                file.take(want).read_to_end(&mut bytes)?;
            }
        }
        if bytes.len() as u64 != want {
            bail!("storage `{}` holds {} bytes where its {} {} elements need {want}", storage.key, bytes.len(), storage.numel, storage.dtype.name());
        }
        Ok(bytes)
    }
}

/// The state dict of a `.pth`: the dict under `model` or `state_dict` when it holds tensors (DeiT's
/// release files, training checkpoints), else the top-level dict. Every entry must be a float
/// tensor.
pub fn read(path: &Path) -> Result<BTreeMap<String, (Vec<usize>, Vec<f32>)>> {
    let file_len = crate::files::regular_file_size(path, crate::files::MAX_CHECKPOINT)?;
    let mut file = File::open(path)?;
    let mut magic = [0u8; 4];
    let n = file.read(&mut magic)?;
    file.rewind()?;
    let mut storages = HashMap::new();
    let (top, mut archive) = if n == 4 && magic == *b"PK\x03\x04" {
        zip_top(file, &mut storages)?
    } else {
        stream_top(file, file_len, &mut storages)?
    };
    let dict = state_dict(&top)?;
    let mut entries = BTreeMap::new();
    for (key, value) in dict.0.borrow().iter() {
        let Value::Str(name) = key else { bail!("a state dict key that is {}", key.what()) };
        entries.insert(name.clone(), value.clone());
    }
    // What the tensors may expand to, and what the storages may read: a zip can point many
    // entries at the same bytes.
    let mut budget = file_len as u128 + EXPANDED_SLACK;
    let mut unread = file_len as u128;
    let mut loaded: HashMap<String, Rc<Vec<u8>>> = HashMap::new();
    let mut out = BTreeMap::new();
    for (name, value) in entries {
        let Value::Tensor(t) = value else { bail!("`{name}` is {}, not a tensor", value.what()) };
        // Checked: 64 dimensions of 2^63 overflow even a u128, and a wrapped product is small.
        let numel = t.size.iter().try_fold(1u128, |n, &d| n.checked_mul(d as u128)).unwrap_or(u128::MAX);
        if numel > budget {
            bail!(
                "tensor `{name}` declares shape {:?} ({numel} values), more than the whole file holds ({file_len} bytes): a stride-0 view or a damaged file; not read",
                t.size
            );
        }
        budget -= numel;
        let s = &t.storage;
        if !matches!(s.dtype, Dtype::F32 | Dtype::F16 | Dtype::BF16) {
            bail!("tensor `{name}` has dtype {}; only float32, float16 and bfloat16 are read", s.dtype.name());
        }
        let bytes = match loaded.get(&s.key) {
            Some(b) => b.clone(),
            None => {
                let b = Rc::new(archive.bytes(s, unread as u64)?);
                unread -= b.len() as u128;
                loaded.insert(s.key.clone(), b.clone());
                b
            }
        };
        let values = gather(&t, &bytes).with_context(|| format!("tensor `{name}`"))?;
        out.insert(name.to_string(), (t.size.iter().map(|&d| d as usize).collect(), values));
    }
    Ok(out)
}

fn unpickle(bytes: &[u8], pos: &mut usize, storages: &mut HashMap<String, Rc<Storage>>) -> Result<Value> {
    let mut m = Machine { bytes, pos: *pos, stack: Vec::new(), marks: Vec::new(), memo: HashMap::new(), storages };
    let v = m.run()?;
    *pos = m.pos;
    Ok(v)
}

fn zip_top(file: File, storages: &mut HashMap<String, Rc<Storage>>) -> Result<(Value, Archive)> {
    let mut zip = zip::ZipArchive::new(file).map_err(|e| anyhow!("not a readable zip ({e})"))?;
    let pickles: Vec<String> = zip.file_names().filter(|n| n.ends_with("data.pkl") && n.matches('/').count() <= 1).map(String::from).collect();
    let [pkl] = &pickles[..] else { bail!("the archive holds {} `data.pkl` entries, not one: not a torch.save file", pickles.len()) };
    let prefix = pkl.trim_end_matches("data.pkl").to_string();
    if let Ok(entry) = zip.by_name(&format!("{prefix}byteorder")) {
        let mut order = String::new();
        entry.take(16).read_to_string(&mut order)?;
        if order.trim() != "little" {
            bail!("it was saved on a `{}`-endian machine; re-save it on a little-endian one", order.trim());
        }
    }
    let mut bytes = Vec::new();
    zip.by_name(pkl)?.take(MAX_PICKLE as u64 + 1).read_to_end(&mut bytes)?;
    if bytes.len() > MAX_PICKLE {
        bail!("its pickle is larger than {MAX_PICKLE} bytes");
    }
    let top = unpickle(&bytes, &mut 0, storages)?;
    Ok((top, Archive::Zip { zip, prefix }))
}

/// The legacy stream: magic number, protocol, system info, the object, the storage keys, then
/// each storage as an 8-byte element count and its bytes.
fn stream_top(mut file: File, file_len: u64, storages: &mut HashMap<String, Rc<Storage>>) -> Result<(Value, Archive)> {
    let mut head = Vec::new();
    (&mut file).take(MAX_PICKLE as u64).read_to_end(&mut head)?;
    let mut pos = 0;
    let magic = unpickle(&head, &mut pos, storages).map_err(|_| anyhow!("neither a zip nor PyTorch's legacy format: not a torch.save file"))?;
    if !matches!(&magic, Value::Long(b) if **b == 0x1950a86a20f9469cfc6c_u128.to_le_bytes()[..10]) {
        bail!("neither a zip nor PyTorch's legacy format: not a torch.save file");
    }
    let protocol = unpickle(&head, &mut pos, storages)?;
    if protocol.int() != Some(1001) {
        bail!("legacy format of protocol {} (only 1001 is read)", protocol.what());
    }
    let info = unpickle(&head, &mut pos, storages)?;
    if let Value::Dict(d) = &info {
        if d.0.borrow().iter().any(|(k, v)| matches!(k, Value::Str(s) if &**s == "little_endian") && matches!(v, Value::Bool(false))) {
            bail!("it was saved on a big-endian machine; re-save it on a little-endian one");
        }
    }
    let top = unpickle(&head, &mut pos, storages)?;
    let keys = unpickle(&head, &mut pos, storages)?.items().ok_or_else(|| anyhow!("its storage list is not a list"))?;
    let mut at = HashMap::new();
    let mut offset = pos as u64;
    for key in keys {
        let Value::Str(key) = key else { bail!("a storage key that is {}", key.what()) };
        let storage = storages.get(&*key).ok_or_else(|| anyhow!("storage `{key}` is listed but no tensor uses it"))?;
        file.seek(SeekFrom::Start(offset))?;
        let mut count = [0u8; 8];
        file.read_exact(&mut count).map_err(|_| anyhow!("the file ends before storage `{key}` (truncated?)"))?;
        if u64::from_le_bytes(count) != storage.numel {
            bail!("storage `{key}` holds {} elements where its tensors say {}", u64::from_le_bytes(count), storage.numel);
        }
        at.insert(key.to_string(), offset + 8);
        offset = (offset + 8).saturating_add(storage.numel.saturating_mul(storage.dtype.size() as u64));
        if offset > file_len {
            bail!("the file ends inside storage `{key}` (truncated?)");
        }
    }
    Ok((top, Archive::Stream { file, at }))
}

/// The dict of tensors in `top`.
fn state_dict(top: &Value) -> Result<Rc<Dict>> {
    let Value::Dict(dict) = top else { bail!("it holds {}, not a dict of tensors", top.what()) };
    let holds_tensors = |d: &Dict| d.0.borrow().iter().any(|(_, v)| matches!(v, Value::Tensor(_)));
    for wanted in ["model", "state_dict"] {
        let inner = dict.0.borrow().iter().rev().find(|(k, _)| matches!(k, Value::Str(s) if &**s == wanted)).map(|(_, v)| v.clone());
        if let Some(Value::Dict(inner)) = inner {
            if holds_tensors(&inner) {
                return Ok(inner);
            }
        }
    }
    Ok(dict.clone())
}

/// The tensor's values in row-major order, read from its storage through offset and strides.
fn gather(t: &View, bytes: &[u8]) -> Result<Vec<f32>> {
    let s = &t.storage;
    if t.size.contains(&0) {
        return Ok(Vec::new());
    }
    let last = t.offset as u128 + t.size.iter().zip(&t.stride).map(|(&n, &st)| (n as u128 - 1) * st as u128).sum::<u128>();
    if last >= s.numel as u128 {
        bail!(
            "its view (offset {}, size {:?}, stride {:?}) reaches element {last} of storage `{}`, which holds {}",
            t.offset,
            t.size,
            t.stride,
            s.key,
            s.numel
        );
    }
    let value = |i: usize| -> f32 {
        match s.dtype {
            Dtype::F32 => f32::from_le_bytes(bytes[4 * i..4 * i + 4].try_into().unwrap()),
            Dtype::F16 => half::f16::from_le_bytes(bytes[2 * i..2 * i + 2].try_into().unwrap()).to_f32(),
            Dtype::BF16 => half::bf16::from_le_bytes(bytes[2 * i..2 * i + 2].try_into().unwrap()).to_f32(),
            Dtype::Other(..) => unreachable!("refused before"),
        }
    };
    let numel: usize = t.size.iter().map(|&d| d as usize).product();
    let mut out = Vec::with_capacity(numel);
    let dims = t.size.len();
    if dims == 0 {
        out.push(value(t.offset as usize));
        return Ok(out);
    }
    // An odometer over every index but the last; the last runs in the inner loop.
    let (inner, inner_stride) = (t.size[dims - 1] as usize, t.stride[dims - 1] as usize);
    let mut index = vec![0u64; dims - 1];
    loop {
        let base = t.offset as usize + index.iter().zip(&t.stride).map(|(&i, &st)| (i * st) as usize).sum::<usize>();
        out.extend((0..inner).map(|j| value(base + j * inner_stride)));
        let mut d = dims - 1;
        loop {
            if d == 0 {
                return Ok(out);
            }
            d -= 1;
            index[d] += 1;
            if index[d] < t.size[d] {
                break;
            }
            index[d] = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::checkpoint::StateDict;
    use std::io::Write;

    fn fixture(name: &str) -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/pth").join(name)
    }

    #[test]
    fn views_offsets_shared_storages_and_half_types_read_as_torch_load_gives_them() {
        let expected = StateDict::read(&fixture("expected.safetensors")).unwrap();
        assert_eq!(expected.tensors.len(), 9);
        for file in ["views.pth", "views-legacy.pth", "checkpoint.pth"] {
            assert_eq!(StateDict::read(&fixture(file)).unwrap(), expected, "{file}");
        }
    }

    #[test]
    fn other_dtypes_are_refused_naming_the_tensor() {
        for dtype in ["int64", "int8", "bool"] {
            let err = StateDict::read(&fixture(&format!("{dtype}.pth"))).unwrap_err().to_string();
            assert!(err.contains(&format!("tensor `buffer` has dtype {dtype}; only float32, float16 and bfloat16 are read")), "{err}");
        }
    }

    /// A protocol-2 pickle of `{"w": _rebuild_tensor_v2(storage "0", offset, size, stride, False, OrderedDict())}`.
    fn tensor_pickle(class: &str, numel: i32, offset: i32, size: &[i32], stride: &[i32]) -> Vec<u8> {
        let mut p = vec![0x80, 2, b'}', b'('];
        let text = |p: &mut Vec<u8>, s: &str| {
            p.push(b'X');
            p.extend((s.len() as u32).to_le_bytes());
            p.extend(s.as_bytes());
        };
        let int = |p: &mut Vec<u8>, i: i32| {
            p.push(b'J');
            p.extend(i.to_le_bytes());
        };
        text(&mut p, "w");
        p.extend(b"ctorch._utils\n_rebuild_tensor_v2\n((");
        text(&mut p, "storage");
        p.extend(format!("ctorch\n{class}\n").as_bytes());
        text(&mut p, "0");
        text(&mut p, "cpu");
        int(&mut p, numel);
        p.extend(b"tQ");
        int(&mut p, offset);
        for dims in [size, stride] {
            p.push(b'(');
            dims.iter().for_each(|&d| int(&mut p, d));
            p.push(b't');
        }
        p.push(0x89);
        p.extend(b"ccollections\nOrderedDict\n)RtRu.");
        p
    }

    fn write_zip(path: &Path, pickle: &[u8], storages: &[(&str, &[u8], bool)]) {
        let mut zip = zip::ZipWriter::new(File::create(path).unwrap());
        let stored = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
        zip.start_file("archive/data.pkl", stored).unwrap();
        zip.write_all(pickle).unwrap();
        for (key, bytes, deflated) in storages {
            let method = if *deflated { zip::CompressionMethod::Deflated } else { zip::CompressionMethod::Stored };
            zip.start_file(format!("archive/data/{key}"), stored.compression_method(method)).unwrap();
            zip.write_all(bytes).unwrap();
        }
        zip.finish().unwrap();
    }

    fn floats(values: &[f32]) -> Vec<u8> {
        values.iter().flat_map(|v| v.to_le_bytes()).collect()
    }

    #[test]
    fn a_forged_view_or_storage_is_refused_not_read_as_zeros() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.pth");
        let four = floats(&[1.0, 2.0, 3.0, 4.0]);
        let read = |pickle: Vec<u8>, storages: &[(&str, &[u8], bool)]| {
            write_zip(&path, &pickle, storages);
            read(&path).map_err(|e| format!("{e:#}"))
        };
        // A transposed view, honoured.
        let t = read(tensor_pickle("FloatStorage", 4, 0, &[2, 2], &[1, 2]), &[("0", &four, false)]).unwrap();
        assert_eq!(t["w"], (vec![2, 2], vec![1.0, 3.0, 2.0, 4.0]));
        let err = read(tensor_pickle("FloatStorage", 4, 3, &[2], &[1]), &[("0", &four, false)]).unwrap_err();
        assert!(err.contains("tensor `w`: its view (offset 3, size [2], stride [1]) reaches element 4 of storage `0`, which holds 4"), "{err}");
        let err = read(tensor_pickle("FloatStorage", 4, 0, &[2, 2], &[4, 1]), &[("0", &four, false)]).unwrap_err();
        assert!(err.contains("reaches element 5 of storage `0`"), "{err}");
        let err = read(tensor_pickle("FloatStorage", 4, 0, &[2, 2], &[-1, 1]), &[("0", &four, false)]).unwrap_err();
        assert!(err.contains("stride entry that is the integer -1"), "{err}");
        let err = read(tensor_pickle("FloatStorage", 4, 0, &[1 << 30; 5], &[0; 5]), &[("0", &four, false)]).unwrap_err();
        assert!(err.contains("more than the whole file holds"), "a product past 2^128 is not wrapped: {err}");
        let err = read(tensor_pickle("FloatStorage", 4, 0, &[4], &[1]), &[]).unwrap_err();
        assert!(err.contains("storage `0` is missing from the archive"), "{err}");
        let err = read(tensor_pickle("FloatStorage", 4, 0, &[4], &[1]), &[("0", &four[..8], false)]).unwrap_err();
        assert!(err.contains("storage `0` holds 8 bytes where its 4 float32 elements need 16"), "{err}");
        // Inflation: a storage larger than the file is refused before it is inflated, and an
        // entry that inflates past its storage stops at the storage's size.
        let zeros = vec![0u8; 8 << 20];
        let err = read(tensor_pickle("FloatStorage", i32::MAX, 0, &[4], &[1]), &[("0", &zeros, true)]).unwrap_err();
        assert!(err.contains("declares 8589934588 bytes, more than the file holds"), "{err}");
        let err = read(tensor_pickle("FloatStorage", 4, 0, &[4], &[1]), &[("0", &zeros, true)]).unwrap_err();
        assert!(err.contains("storage `0` holds 17 bytes where its 4 float32 elements need 16"), "{err}");
        let err = read(tensor_pickle("LongStorage", 2, 0, &[2], &[1]), &[("0", &four, false)]).unwrap_err();
        assert!(err.contains("tensor `w` has dtype int64"), "{err}");
        let err = read(b"\x80\x02cposix\nsystem\nX\x02\x00\x00\x00lsTR.".to_vec(), &[]).unwrap_err();
        assert!(err.contains("it names `posix.system`, which is not a tensor"), "{err}");
    }

    #[test]
    fn deep_nesting_is_an_error_or_freed_without_recursion() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("deep.pth");
        let n = 200_000;
        // 200,000 nested lists the plain way: the stack bound refuses it.
        let mut plain = vec![0x80, 2];
        plain.extend(std::iter::repeat_n(b']', n));
        plain.extend(std::iter::repeat_n(b'a', n - 1));
        plain.push(b'.');
        write_zip(&path, &plain, &[]);
        let err = format!("{:#}", read(&path).unwrap_err());
        assert!(err.contains("stack grows past 100000"), "{err}");
        // The same depth through the memo and through TUPLE1, on a stack of two: built, then
        // refused as not a dict and freed without overflowing the stack.
        let mut memo = vec![0x80, 2, b']', b'r', 0, 0, 0, 0];
        for i in 1..n as u32 {
            memo.extend([b'0', b']', b'r']);
            memo.extend(i.to_le_bytes());
            memo.push(b'j');
            memo.extend((i - 1).to_le_bytes());
            memo.push(b'a');
        }
        memo.push(b'.');
        let mut tuples = vec![0x80, 2, b'N'];
        tuples.extend(std::iter::repeat_n(0x85, n));
        tuples.push(b'.');
        for pickle in [memo, tuples] {
            write_zip(&path, &pickle, &[]);
            let err = format!("{:#}", read(&path).unwrap_err());
            assert!(err.contains("holds a sequence of 1, not a dict of tensors"), "{err}");
        }
    }
}
