//! A restricted unpickler for the `data.pkl` of `torch.save` checkpoints.
//!
//! It interprets the opcodes `torch.save` emits (protocol 2, plus the few protocol 4 adds)
//! into plain data and never executes anything: the only callables it knows are the tensor
//! rebuilders, `OrderedDict` and the float storage classes, and any other global is refused
//! by name. Containers live in an arena and values refer to them by index, so no input can
//! build a structure whose drop or traversal recurses without bound.

use super::dtype::WeightDtype;
use std::collections::HashMap;
use std::rc::Rc;

/// A pickled value. Containers, storages and tensors are indices into [`Unpickled`].
#[derive(Clone, Debug)]
pub(crate) enum Value {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(Rc<str>),
    Global(Global),
    Object(usize),
    Storage(usize),
    Tensor(usize),
}

#[derive(Debug)]
enum Object {
    Tuple(Vec<Value>),
    List(Vec<Value>),
    Dict(Vec<(Value, Value)>),
}

/// The globals a checkpoint may name.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Global {
    RebuildTensor,
    RebuildParameter,
    OrderedDict,
    Storage(WeightDtype),
}

const STORAGES: [(&str, WeightDtype); 4] = [
    ("BFloat16Storage", WeightDtype::BF16),
    ("HalfStorage", WeightDtype::F16),
    ("FloatStorage", WeightDtype::F32),
    // A LoRA's learned token rows (`ReToken.indices`).
    ("LongStorage", WeightDtype::I64),
];

fn resolve_global(module: &str, name: &str) -> Result<Global, String> {
    let global = match (module, name) {
        ("torch._utils", "_rebuild_tensor_v2") => Some(Global::RebuildTensor),
        ("torch._utils", "_rebuild_parameter") => Some(Global::RebuildParameter),
        ("collections", "OrderedDict") => Some(Global::OrderedDict),
        ("torch", _) => STORAGES
            .iter()
            .find(|(n, _)| *n == name)
            .map(|&(_, d)| Global::Storage(d)),
        _ => None,
    };
    global.ok_or_else(|| {
        format!(
            "refusing pickle global {module}.{name}: only torch tensor rebuilds, \
             collections.OrderedDict and torch.{{BFloat16,Half,Float,Long}}Storage are allowed"
        )
    })
}

/// A storage named by a persistent id: the zip entry `data/<key>` holds `numel` elements.
#[derive(Clone, Debug)]
pub(crate) struct StorageRef {
    pub dtype: WeightDtype,
    pub key: String,
    pub numel: usize,
}

/// A strided view of a storage, in elements.
#[derive(Clone, Debug)]
pub(crate) struct TensorRef {
    pub storage: usize,
    pub offset: usize,
    pub shape: Vec<usize>,
    pub stride: Vec<usize>,
}

/// The result of unpickling: the root value and the arena it refers to.
#[derive(Debug)]
pub(crate) struct Unpickled {
    objects: Vec<Object>,
    pub storages: Vec<StorageRef>,
    pub tensors: Vec<TensorRef>,
    root: Value,
}

/// The tensors of a state dict by key, and the keys whose values were not tensors.
#[derive(Debug, Default)]
pub(crate) struct StateDict {
    pub tensors: Vec<(String, usize)>,
    pub skipped: Vec<String>,
}

/// How deep nested checkpoint dicts are searched for the state dict.
const MAX_NESTING: usize = 8;

impl Unpickled {
    fn dict(&self, v: &Value) -> Option<&[(Value, Value)]> {
        match v {
            Value::Object(i) => match &self.objects[*i] {
                Object::Dict(d) => Some(d),
                _ => None,
            },
            _ => None,
        }
    }

    /// The state dict: the root dict if it holds tensors, else the nested dict under
    /// `state_dict` (or the only nested dict).
    pub fn state_dict(&self) -> Result<StateDict, String> {
        let mut at = &self.root;
        for _ in 0..MAX_NESTING {
            let entries = self.dict(at).ok_or_else(|| {
                format!(
                    "the checkpoint holds {}, not a dict of tensors",
                    describe(at)
                )
            })?;
            if entries.iter().any(|(_, v)| matches!(v, Value::Tensor(_))) {
                return collect_tensors(entries);
            }
            let nested: Vec<(&Value, &Value)> = entries
                .iter()
                .filter(|(_, v)| self.dict(v).is_some())
                .map(|(k, v)| (k, v))
                .collect();
            let named = nested
                .iter()
                .find(|(k, _)| matches!(k, Value::Str(s) if &**s == "state_dict"));
            at = match (named, nested.as_slice()) {
                (Some((_, v)), _) | (None, [(_, v)]) => *v,
                (None, []) => return Err("the checkpoint holds no tensors".into()),
                (None, many) => {
                    return Err(format!(
                        "the checkpoint holds no tensors at its top level and several nested dicts ({}): cannot tell which is the state dict",
                        many.iter().map(|(k, _)| describe(k)).collect::<Vec<_>>().join(", ")
                    ))
                }
            };
        }
        Err(format!(
            "no state dict within {MAX_NESTING} levels of nested dicts"
        ))
    }
}

fn collect_tensors(entries: &[(Value, Value)]) -> Result<StateDict, String> {
    let mut out = StateDict::default();
    for (k, v) in entries {
        let Value::Str(key) = k else {
            return Err(format!("state dict key {} is not a string", describe(k)));
        };
        match v {
            Value::Tensor(t) => out.tensors.push((key.to_string(), *t)),
            _ => out.skipped.push(key.to_string()),
        }
    }
    Ok(out)
}

fn describe(v: &Value) -> String {
    match v {
        Value::None => "None".into(),
        Value::Bool(b) => b.to_string(),
        Value::Int(i) => i.to_string(),
        Value::Float(f) => f.to_string(),
        Value::Str(s) => format!("'{s}'"),
        Value::Global(g) => format!("{g:?}"),
        Value::Object(_) => "a container".into(),
        Value::Storage(_) => "a storage".into(),
        Value::Tensor(_) => "a tensor".into(),
    }
}

/// Interprets `code` (a whole `data.pkl`).
pub(crate) fn unpickle(code: &[u8]) -> Result<Unpickled, String> {
    let mut m = Machine {
        code,
        pos: 0,
        stack: Vec::new(),
        marks: Vec::new(),
        memo: HashMap::new(),
        objects: Vec::new(),
        storages: Vec::new(),
        tensors: Vec::new(),
    };
    loop {
        let at = m.pos;
        let op = m.take(1)?[0];
        if op == b'.' {
            let root = m.pop()?;
            return Ok(Unpickled {
                objects: m.objects,
                storages: m.storages,
                tensors: m.tensors,
                root,
            });
        }
        m.step(op)
            .map_err(|e| format!("pickle opcode {} at byte {at}: {e}", opcode_name(op)))?;
    }
}

fn opcode_name(op: u8) -> String {
    if op.is_ascii_graphic() {
        format!("'{}'", op as char)
    } else {
        format!("0x{op:02x}")
    }
}

struct Machine<'a> {
    code: &'a [u8],
    pos: usize,
    stack: Vec<Value>,
    marks: Vec<usize>,
    memo: HashMap<u32, Value>,
    objects: Vec<Object>,
    storages: Vec<StorageRef>,
    tensors: Vec<TensorRef>,
}

impl<'a> Machine<'a> {
    fn step(&mut self, op: u8) -> Result<(), String> {
        match op {
            0x80 => {
                let proto = self.u8()?;
                if proto > 5 {
                    return Err(format!("unknown protocol {proto}"));
                }
            }
            0x95 => {
                self.take(8)?; // FRAME: a length hint
            }
            b'(' => self.marks.push(self.stack.len()),
            b'1' => {
                self.pop_mark()?;
            }
            b'0' => {
                self.pop()?;
            }
            b'}' => self.push_object(Object::Dict(Vec::new())),
            b']' => self.push_object(Object::List(Vec::new())),
            b')' => self.push_object(Object::Tuple(Vec::new())),
            b't' => {
                let items = self.pop_mark()?;
                self.push_object(Object::Tuple(items));
            }
            0x85..=0x87 => {
                let mut items = (0..op - 0x84)
                    .map(|_| self.pop())
                    .collect::<Result<Vec<_>, _>>()?;
                items.reverse();
                self.push_object(Object::Tuple(items));
            }
            b'l' => {
                let items = self.pop_mark()?;
                self.push_object(Object::List(items));
            }
            b'd' => {
                let items = self.pop_mark()?;
                let pairs = pairs(items)?;
                self.push_object(Object::Dict(pairs));
            }
            b'a' => {
                let v = self.pop()?;
                self.top_list()?.push(v);
            }
            b'e' => {
                let items = self.pop_mark()?;
                self.top_list()?.extend(items);
            }
            b's' => {
                let v = self.pop()?;
                let k = self.pop()?;
                self.top_dict()?.push((k, v));
            }
            b'u' => {
                let items = self.pop_mark()?;
                let pairs = pairs(items)?;
                self.top_dict()?.extend(pairs);
            }
            b'J' => {
                let b = self.take(4)?;
                let v = i32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                self.stack.push(Value::Int(v.into()));
            }
            b'K' => {
                let v = self.u8()?;
                self.stack.push(Value::Int(v.into()));
            }
            b'M' => {
                let b = self.take(2)?;
                self.stack
                    .push(Value::Int(u16::from_le_bytes([b[0], b[1]]).into()));
            }
            0x8a => {
                let n = usize::from(self.u8()?);
                let v = long(self.take(n)?)?;
                self.stack.push(Value::Int(v));
            }
            b'G' => {
                let b: [u8; 8] = self.take(8)?.try_into().map_err(|_| "short float")?;
                self.stack.push(Value::Float(f64::from_be_bytes(b)));
            }
            b'N' => self.stack.push(Value::None),
            0x88 => self.stack.push(Value::Bool(true)),
            0x89 => self.stack.push(Value::Bool(false)),
            b'X' => {
                let n = self.u32()? as usize;
                let s = self.text(n)?;
                self.stack.push(Value::Str(s.into()));
            }
            0x8c => {
                let n = usize::from(self.u8()?);
                let s = self.text(n)?;
                self.stack.push(Value::Str(s.into()));
            }
            b'c' => {
                let module = self.line()?;
                let name = self.line()?;
                let g = resolve_global(&module, &name)?;
                self.stack.push(Value::Global(g));
            }
            0x93 => {
                let name = self.pop_str()?;
                let module = self.pop_str()?;
                let g = resolve_global(&module, &name)?;
                self.stack.push(Value::Global(g));
            }
            b'R' => {
                let args = self.pop()?;
                let callable = self.pop()?;
                let v = self.call(callable, args)?;
                self.stack.push(v);
            }
            b'b' => {
                // BUILD sets attributes: OrderedDict state dicts carry `_metadata`, which
                // weights do not need.
                self.pop()?;
                self.top_dict()?;
            }
            b'Q' => {
                let pid = self.pop()?;
                let v = self.persistent_load(pid)?;
                self.stack.push(v);
            }
            b'q' => {
                let i = self.u8()?.into();
                self.memoize(i)?;
            }
            b'r' => {
                let i = self.u32()?;
                self.memoize(i)?;
            }
            0x94 => {
                let i = u32::try_from(self.memo.len()).map_err(|_| "memo too large")?;
                self.memoize(i)?;
            }
            b'h' => {
                let i = self.u8()?.into();
                self.memo_get(i)?;
            }
            b'j' => {
                let i = self.u32()?;
                self.memo_get(i)?;
            }
            _ => return Err("unsupported opcode".into()),
        }
        Ok(())
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let code = self.code;
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.code.len())
            .ok_or("the pickle ends early")?;
        let bytes = &code[self.pos..end];
        self.pos = end;
        Ok(bytes)
    }

    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }

    fn u32(&mut self) -> Result<u32, String> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn text(&mut self, n: usize) -> Result<&'a str, String> {
        std::str::from_utf8(self.take(n)?).map_err(|e| format!("string is not UTF-8: {e}"))
    }

    /// A newline-terminated argument of GLOBAL.
    fn line(&mut self) -> Result<String, String> {
        let rest = &self.code[self.pos..];
        let n = rest
            .iter()
            .position(|&b| b == b'\n')
            .ok_or("unterminated global name")?;
        let s = self.text(n)?.to_string();
        self.pos += 1;
        Ok(s)
    }

    /// The top of the stack; values below the innermost mark are out of reach.
    fn top(&self) -> Result<&Value, String> {
        if self.marks.last() == Some(&self.stack.len()) {
            return Err("stack underflow at a mark".into());
        }
        self.stack.last().ok_or_else(|| "stack underflow".into())
    }

    fn pop(&mut self) -> Result<Value, String> {
        self.top()?;
        self.stack.pop().ok_or_else(|| "stack underflow".into())
    }

    fn pop_str(&mut self) -> Result<Rc<str>, String> {
        match self.pop()? {
            Value::Str(s) => Ok(s),
            v => Err(format!("expected a string, found {}", describe(&v))),
        }
    }

    fn pop_mark(&mut self) -> Result<Vec<Value>, String> {
        let at = self.marks.pop().ok_or("no mark on the stack")?;
        Ok(self.stack.split_off(at))
    }

    fn push_object(&mut self, o: Object) {
        self.objects.push(o);
        self.stack.push(Value::Object(self.objects.len() - 1));
    }

    fn top_object(&mut self) -> Result<&mut Object, String> {
        match self.top()? {
            &Value::Object(i) => Ok(&mut self.objects[i]),
            v => Err(format!("expected a container, found {}", describe(v))),
        }
    }

    fn top_list(&mut self) -> Result<&mut Vec<Value>, String> {
        match self.top_object()? {
            Object::List(l) => Ok(l),
            _ => Err("expected a list".into()),
        }
    }

    fn top_dict(&mut self) -> Result<&mut Vec<(Value, Value)>, String> {
        match self.top_object()? {
            Object::Dict(d) => Ok(d),
            _ => Err("expected a dict".into()),
        }
    }

    fn memoize(&mut self, i: u32) -> Result<(), String> {
        let v = self.top()?.clone();
        self.memo.insert(i, v);
        Ok(())
    }

    fn memo_get(&mut self, i: u32) -> Result<(), String> {
        let v = self.memo.get(&i).ok_or(format!("memo {i} is not set"))?;
        self.stack.push(v.clone());
        Ok(())
    }

    fn tuple(&self, v: &Value) -> Result<&[Value], String> {
        match v {
            Value::Object(i) => match &self.objects[*i] {
                Object::Tuple(t) => Ok(t),
                _ => Err("expected a tuple".into()),
            },
            _ => Err(format!("expected a tuple, found {}", describe(v))),
        }
    }

    fn call(&mut self, callable: Value, args: Value) -> Result<Value, String> {
        let Value::Global(g) = callable else {
            return Err(format!("cannot call {}", describe(&callable)));
        };
        let args = self.tuple(&args)?;
        match g {
            Global::OrderedDict if args.is_empty() => {
                self.objects.push(Object::Dict(Vec::new()));
                Ok(Value::Object(self.objects.len() - 1))
            }
            Global::RebuildParameter => match args.first() {
                Some(t @ Value::Tensor(_)) => Ok(t.clone()),
                _ => Err("_rebuild_parameter needs a tensor".into()),
            },
            Global::RebuildTensor => {
                let t = self.rebuild_tensor(args)?;
                self.tensors.push(t);
                Ok(Value::Tensor(self.tensors.len() - 1))
            }
            _ => Err(format!(
                "calling {g:?} with these arguments is not supported"
            )),
        }
    }

    /// `_rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks[, metadata])`.
    fn rebuild_tensor(&self, args: &[Value]) -> Result<TensorRef, String> {
        let [Value::Storage(storage), offset, size, stride, _, _, ..] = args else {
            return Err("_rebuild_tensor_v2 needs (storage, offset, size, stride, ...)".into());
        };
        if args.len() > 7 {
            return Err("_rebuild_tensor_v2 takes at most 7 arguments".into());
        }
        let shape = self.sizes(size)?;
        let stride = self.sizes(stride)?;
        if shape.len() != stride.len() {
            return Err(format!(
                "size {shape:?} and stride {stride:?} differ in rank"
            ));
        }
        Ok(TensorRef {
            storage: *storage,
            offset: size_of(offset)?,
            shape,
            stride,
        })
    }

    fn sizes(&self, v: &Value) -> Result<Vec<usize>, String> {
        self.tuple(v)?.iter().map(size_of).collect()
    }

    /// `('storage', torch.XStorage, key, location, numel)`.
    fn persistent_load(&mut self, pid: Value) -> Result<Value, String> {
        let fields = self.tuple(&pid)?;
        let [Value::Str(tag), Value::Global(Global::Storage(dtype)), Value::Str(key), _, numel] =
            fields
        else {
            return Err(
                "persistent id is not ('storage', torch.<dtype>Storage, key, location, numel)"
                    .into(),
            );
        };
        if &**tag != "storage" {
            return Err(format!("unknown persistent id kind '{tag}'"));
        }
        let storage = StorageRef {
            dtype: *dtype,
            key: key.to_string(),
            numel: size_of(numel)?,
        };
        self.storages.push(storage);
        Ok(Value::Storage(self.storages.len() - 1))
    }
}

fn size_of(v: &Value) -> Result<usize, String> {
    match v {
        Value::Int(i) => usize::try_from(*i).map_err(|_| format!("negative size {i}")),
        _ => Err(format!("expected a size, found {}", describe(v))),
    }
}

fn pairs(items: Vec<Value>) -> Result<Vec<(Value, Value)>, String> {
    if items.len() % 2 != 0 {
        return Err("odd number of items for a dict".into());
    }
    let mut it = items.into_iter();
    let mut out = Vec::new();
    while let (Some(k), Some(v)) = (it.next(), it.next()) {
        out.push((k, v));
    }
    Ok(out)
}

/// A LONG1 payload: little-endian two's complement.
fn long(bytes: &[u8]) -> Result<i64, String> {
    if bytes.len() > 8 {
        return Err(format!("integer of {} bytes is too large", bytes.len()));
    }
    let fill = if bytes.last().is_some_and(|b| b & 0x80 != 0) {
        0xff
    } else {
        0
    };
    let mut b = [fill; 8];
    b[..bytes.len()].copy_from_slice(bytes);
    Ok(i64::from_le_bytes(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `{'w': _rebuild_tensor_v2(<storage '0' of 6 BFloat16>, 1, (2, 2), (1, 2), False, OrderedDict())}`
    /// in the opcodes `torch.save` writes.
    fn torch_like_pickle(global: &[u8]) -> Vec<u8> {
        let mut p = b"\x80\x02}q\x00(X\x01\x00\x00\x00wq\x01c".to_vec();
        p.extend_from_slice(global);
        p.extend_from_slice(
            b"q\x02((X\x07\x00\x00\x00storageq\x03ctorch\nBFloat16Storage\nq\x04\
              X\x01\x00\x00\x000q\x05X\x03\x00\x00\x00cpuq\x06K\x06tq\x07Q\
              K\x01K\x02K\x02\x86q\x08K\x01K\x02\x86q\t\x89ccollections\nOrderedDict\nq\n)Rq\x0btq\x0cRq\ru.",
        );
        p
    }

    #[test]
    fn torch_state_dict_opcodes_give_tensor_refs() {
        let u = unpickle(&torch_like_pickle(b"torch._utils\n_rebuild_tensor_v2\n")).unwrap();
        let sd = u.state_dict().unwrap();
        assert_eq!(sd.tensors.len(), 1);
        assert_eq!(sd.tensors[0].0, "w");
        let t = &u.tensors[sd.tensors[0].1];
        assert_eq!(
            (t.offset, &t.shape[..], &t.stride[..]),
            (1, &[2, 2][..], &[1, 2][..])
        );
        let s = &u.storages[t.storage];
        assert_eq!(
            (s.dtype, s.key.as_str(), s.numel),
            (WeightDtype::BF16, "0", 6)
        );
    }

    #[test]
    fn other_globals_are_refused_by_name() {
        let err = unpickle(&torch_like_pickle(b"os\nsystem\n")).unwrap_err();
        assert!(err.contains("refusing pickle global os.system"), "{err}");
        // Protocol 4 spells it STACK_GLOBAL.
        let p = b"\x80\x04\x8c\x05posix\x8c\x06system\x93\x8c\x02ls\x85R.";
        let err = unpickle(p).unwrap_err();
        assert!(err.contains("refusing pickle global posix.system"), "{err}");
    }

    #[test]
    fn malformed_pickles_are_errors() {
        let cases: [(&[u8], &str); 7] = [
            (b"\x80\x02", "ends early"),
            (b"\x80\x02e.", "no mark"),
            (b"\x80\x02(.", "underflow at a mark"),
            (b"\x80\x02h\x07.", "memo 7 is not set"),
            (b"\x80\x02K\x01K\x02a.", "expected a container"),
            (b"\x80\x02\xff", "unsupported opcode"),
            (
                b"\x80\x02\x8a\x09\x00\x00\x00\x00\x00\x00\x00\x00\x01.",
                "too large",
            ),
        ];
        for (p, want) in cases {
            let err = unpickle(p).unwrap_err();
            assert!(err.contains(want), "{p:?}: {err}");
        }
    }

    #[test]
    fn nested_state_dicts_are_found() {
        // {'epoch': 3, 'state_dict': {'w': tensor}} built around the tensor pickle body.
        let inner = torch_like_pickle(b"torch._utils\n_rebuild_tensor_v2\n");
        let body = &inner[2..inner.len() - 1];
        let mut p = b"\x80\x02}(X\x05\x00\x00\x00epochK\x03X\n\x00\x00\x00state_dict".to_vec();
        p.extend_from_slice(body);
        p.extend_from_slice(b"u.");
        let sd = unpickle(&p).unwrap().state_dict().unwrap();
        assert_eq!(sd.tensors[0].0, "w");
        let err = unpickle(b"\x80\x02]K\x01a.")
            .unwrap()
            .state_dict()
            .unwrap_err();
        assert!(err.contains("not a dict of tensors"), "{err}");
    }

    #[test]
    fn long1_decodes_twos_complement() {
        assert_eq!(long(&[]).unwrap(), 0);
        assert_eq!(long(&[0xff]).unwrap(), -1);
        assert_eq!(long(&[0x00, 0x01]).unwrap(), 256);
        assert_eq!(long(&[0xff, 0x00]).unwrap(), 255);
    }
}
