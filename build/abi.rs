//! The kernel ABI as the kernel sources declare it: every `extern "C" __global__` function's
//! parameter list, and the layout of each parameter struct a kernel takes by value.
//!
//! From it build.rs generates (a) the parameter table every launch is checked against
//! (`KernelId::params`, src/runtime/abi.rs), and, for each parameter struct,
//! (b) Rust const assertions on its `#[repr(C)]` mirror: size, alignment, every field's offset
//! and type, and no other field (`abi_<Struct>.rs`, included by `mirror_kernel_struct!`), and
//! (c) C `static_assert`s on `sizeof`, `alignof` and every field's `offsetof` and `sizeof`,
//! compiled right after the kernel file by nvcc and by g++ (the emulator). (b) and (c) state the same numbers: the
//! layout computed here from the C field list by the C rules, and the C struct is the only
//! place the layout is written down. A change on either side that the other does not follow,
//! and a mistake in this computation, fail a build: the structs cannot drift silently.

use std::fmt::Write as _;

/// A scalar type kernels take: its C spelling, its Rust type, its size, whether a float.
struct Scalar {
    c: &'static str,
    rust: &'static str,
    bytes: usize,
    float: bool,
}

const fn int(c: &'static str, rust: &'static str, bytes: usize) -> Scalar {
    Scalar {
        c,
        rust,
        bytes,
        float: false,
    }
}

const SCALARS: &[Scalar] = &[
    int("int", "i32", 4),
    int("unsigned", "u32", 4),
    int("uint32_t", "u32", 4),
    int("long long", "i64", 8),
    int("unsigned long long", "u64", 8),
    Scalar {
        c: "float",
        rust: "f32",
        bytes: 4,
        float: true,
    },
];

/// The type of a kernel parameter or of a parameter struct's field.
enum Ty {
    /// Any pointer: a device address, 8 bytes.
    Ptr,
    Scalar(&'static Scalar),
    /// A parameter struct by value (kernel parameters only).
    Struct(String),
    /// The driver's 128-byte `CUtensorMap`, as a `const __grid_constant__` kernel parameter
    /// (src/runtime/tensor_map.rs builds it).
    TensorMap,
}

impl Ty {
    fn parse(c: &str, structs_allowed: bool, what: &str) -> Ty {
        if c.ends_with('*') {
            return Ty::Ptr;
        }
        let bare = c.strip_prefix("const ").unwrap_or(c);
        if structs_allowed && bare == "__grid_constant__ CUtensorMap" {
            return Ty::TensorMap;
        }
        if let Some(s) = SCALARS.iter().find(|s| s.c == bare) {
            return Ty::Scalar(s);
        }
        let ident = !bare.is_empty() && bare.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        assert!(
            structs_allowed && ident,
            "{what}: type `{c}` is not a pointer, one of the scalars build/abi.rs knows ({}){}",
            SCALARS.iter().map(|s| s.c).collect::<Vec<_>>().join(", "),
            if structs_allowed {
                " or a parameter struct"
            } else {
                ""
            }
        );
        Ty::Struct(bare.to_string())
    }

    /// (size, alignment) by the C rules of every target we build for (LP64 host, CUDA device).
    fn size_align(&self) -> (usize, usize) {
        match self {
            Ty::Ptr => (8, 8),
            Ty::Scalar(s) => (s.bytes, s.bytes),
            Ty::Struct(name) => unreachable!("struct {name} inside a parameter struct"),
            Ty::TensorMap => unreachable!("a CUtensorMap inside a parameter struct"),
        }
    }

    fn rust(&self) -> &'static str {
        match self {
            Ty::Ptr => "u64",
            Ty::Scalar(s) => s.rust,
            Ty::Struct(name) => unreachable!("struct {name} inside a parameter struct"),
            Ty::TensorMap => unreachable!("a CUtensorMap inside a parameter struct"),
        }
    }
}

pub struct Param {
    name: String,
    ty: Ty,
}

/// One `extern "C" __global__` function.
pub struct Kernel {
    pub name: String,
    pub params: Vec<Param>,
}

struct Field {
    name: String,
    ty: Ty,
    offset: usize,
}

/// A struct some kernel takes by value, with its C layout.
pub struct ParamStruct {
    pub name: String,
    /// Where it is defined: the kernel file, or a `kernels/common` header it includes.
    pub file: String,
    fields: Vec<Field>,
    size: usize,
    align: usize,
}

/// The kernels of a kernel file and the parameter structs they take. A struct is defined in
/// the file or in one of the `kernels/common` headers it includes (`common`: each header's
/// path under kernels/ and text), so kernel files can share one.
pub fn parse(
    text: &str,
    file: &str,
    common: &[(String, String)],
) -> (Vec<Kernel>, Vec<ParamStruct>) {
    let text = strip_comments(text);
    let kernels = kernels(&text, file);
    // The file itself first, then its `#include "common/…"` headers.
    let mut sources = vec![(file.to_string(), text.clone())];
    for (path, header) in common {
        if text.contains(&format!("#include \"{path}\"")) {
            sources.push((format!("kernels/{path}"), strip_comments(header)));
        }
    }
    let mut structs: Vec<ParamStruct> = Vec::new();
    for p in kernels.iter().flat_map(|k| &k.params) {
        if let Ty::Struct(name) = &p.ty {
            if !structs.iter().any(|s| &s.name == name) {
                structs.push(param_struct(&sources, name, file));
            }
        }
    }
    (kernels, structs)
}

/// The text with `//` and `/* */` comments blanked out (string literals kept).
fn strip_comments(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '"' => {
                out.push(c);
                while let Some(d) = chars.next() {
                    out.push(d);
                    match d {
                        '\\' => out.extend(chars.next()),
                        '"' => break,
                        _ => {}
                    }
                }
            }
            '/' if chars.peek() == Some(&'/') => {
                while chars.peek().is_some_and(|&d| d != '\n') {
                    chars.next();
                }
            }
            '/' if chars.peek() == Some(&'*') => {
                chars.next();
                let mut prev = ' ';
                for d in chars.by_ref() {
                    if prev == '*' && d == '/' {
                        break;
                    }
                    prev = d;
                }
                out.push(' ');
            }
            _ => out.push(c),
        }
    }
    out
}

fn ident_prefix(s: &str) -> &str {
    let end = s
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .unwrap_or(s.len());
    &s[..end]
}

/// Every `extern "C" __global__ void [__launch_bounds__(…)] name(params)`.
fn kernels(text: &str, file: &str) -> Vec<Kernel> {
    const MARK: &str = "extern \"C\" __global__";
    let mut kernels = Vec::new();
    let mut rest = text;
    while let Some(i) = rest.find(MARK) {
        rest = &rest[i + MARK.len()..];
        let mut s = rest
            .trim_start()
            .strip_prefix("void")
            .unwrap_or_else(|| panic!("{file}: extern \"C\" __global__ must be followed by void"))
            .trim_start();
        if let Some(after) = s.strip_prefix("__launch_bounds__") {
            let close = after.find(')').expect("unclosed __launch_bounds__");
            s = after[close + 1..].trim_start();
        }
        let name = ident_prefix(s).to_string();
        assert!(
            !name.is_empty(),
            "{file}: could not read a kernel name near: {}",
            &s[..s.len().min(60)]
        );
        let list = s[name.len()..]
            .trim_start()
            .strip_prefix('(')
            .and_then(|l| l.split_once(')'))
            .unwrap_or_else(|| panic!("{file}: kernel {name}: no parameter list"))
            .0;
        let params = declarations(list, ',')
            .into_iter()
            .filter(|d| d != "void")
            .map(|d| {
                let what = format!("{file}: kernel {name}, parameter `{d}`");
                let (ty, pname) = split_declaration(&d, &what);
                Param {
                    name: pname.to_string(),
                    ty: Ty::parse(ty, true, &what),
                }
            })
            .collect();
        kernels.push(Kernel { name, params });
    }
    kernels
}

/// The `sep`-separated declarations of a list, whitespace normalised, `__restrict__` dropped.
fn declarations(list: &str, sep: char) -> Vec<String> {
    list.split(sep)
        .map(|d| {
            d.split_whitespace()
                .filter(|w| *w != "__restrict__")
                .collect::<Vec<_>>()
                .join(" ")
                .replace(" *", "*")
        })
        .filter(|d| !d.is_empty())
        .collect()
}

/// `type name` → (type, name).
fn split_declaration<'a>(d: &'a str, what: &str) -> (&'a str, &'a str) {
    let start = d
        .rfind(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .map_or(0, |i| i + 1);
    let (ty, name) = (d[..start].trim_end(), &d[start..]);
    assert!(
        !ty.is_empty() && !name.is_empty(),
        "{what}: not a `type name` declaration"
    );
    (ty, name)
}

/// `struct name { fields };` of the kernel file, laid out.
fn param_struct(sources: &[(String, String)], name: &str, file: &str) -> ParamStruct {
    let head = format!("struct {name}");
    let (defined_in, body) = sources
        .iter()
        .find_map(|(path, text)| {
            let body = text
                .match_indices(&head)
                .map(|(i, _)| text[i + head.len()..].trim_start())
                .find_map(|s| s.strip_prefix('{'))
                .and_then(|s| s.split_once('}'))?
                .0;
            Some((path.clone(), body))
        })
        .unwrap_or_else(|| {
            panic!("{file}: parameter struct {name}: no `struct {name} {{ … }}` definition in the file or the kernels/common headers it includes")
        });
    let what = format!("{defined_in}: parameter struct {name}");
    let mut fields = Vec::new();
    let (mut offset, mut align) = (0, 1);
    for decl in declarations(body, ';') {
        // `int m, n, k` declares three ints; pointers one per declaration, so `T* a, b` (whose
        // b is no pointer) cannot be misread.
        let mut parts = decl.split(',').map(str::trim);
        let (ty_text, first) = split_declaration(parts.next().unwrap_or_default(), &what);
        let names: Vec<&str> = std::iter::once(first).chain(parts).collect();
        assert!(
            names.len() == 1 || !ty_text.ends_with('*'),
            "{what}: declare pointer fields one per line (`{decl}`)"
        );
        for field in names {
            assert!(
                !field.is_empty() && ident_prefix(field) == field,
                "{what}: field `{field}` of `{decl}`: only plain `type name` fields are supported"
            );
            let ty = Ty::parse(ty_text, false, &format!("{what}, field {field}"));
            let (size, a) = ty.size_align();
            assert!(
                offset % a == 0,
                "{what}: field {field} would follow implicit padding (offset {offset}, alignment {a}); reorder the fields or add an explicit one: every byte of a parameter struct is a field the launch sets"
            );
            fields.push(Field {
                name: field.to_string(),
                ty,
                offset,
            });
            offset += size;
            align = align.max(a);
        }
    }
    assert!(!fields.is_empty(), "{what}: no fields");
    assert!(
        offset % align == 0,
        "{what}: {offset} bytes of fields would get trailing padding to a multiple of {align}; add an explicit field"
    );
    ParamStruct {
        name: name.to_string(),
        file: defined_in,
        fields,
        size: offset,
        align,
    }
}

/// The `ArgKind` of a kernel parameter, as Rust source.
fn arg_kind(ty: &Ty, structs: &[&ParamStruct]) -> String {
    let path = "crate::runtime::abi::ArgKind";
    match ty {
        Ty::Ptr => format!("{path}::Ptr"),
        Ty::Scalar(s) if s.float => format!("{path}::Float({})", s.bytes),
        Ty::Scalar(s) => format!("{path}::Int({})", s.bytes),
        Ty::TensorMap => format!("{path}::Struct(\"CUtensorMap\", 128)"),
        Ty::Struct(name) => {
            let s = structs
                .iter()
                .find(|s| &s.name == name)
                .expect("every kernel's structs are parsed");
            format!("{path}::Struct({name:?}, {})", s.size)
        }
    }
}

/// `impl KernelId { fn params }`: every kernel's parameter list.
pub fn params_table(kernels: &[&Kernel], structs: &[&ParamStruct]) -> String {
    let mut s = String::new();
    writeln!(s, "impl KernelId {{").unwrap();
    writeln!(
        s,
        "    /// The kernel's parameters, as its `extern \"C\" __global__` declaration names them."
    )
    .unwrap();
    writeln!(
        s,
        "    pub fn params(self) -> &'static [crate::runtime::abi::Param] {{ match self {{"
    )
    .unwrap();
    for k in kernels {
        let params: Vec<String> = k
            .params
            .iter()
            .map(|p| {
                format!(
                    "crate::runtime::abi::Param {{ name: {:?}, kind: {} }}",
                    p.name,
                    arg_kind(&p.ty, structs)
                )
            })
            .collect();
        writeln!(
            s,
            "        KernelId::{} => &[{}],",
            k.name,
            params.join(", ")
        )
        .unwrap();
    }
    if kernels.is_empty() {
        writeln!(s, "        _ => &[],").unwrap();
    }
    writeln!(s, "    }} }}").unwrap();
    writeln!(s, "}}").unwrap();
    s
}

/// The Rust side of a parameter struct: the [`KernelStruct`] impl that lets launches pass the
/// mirror, and const assertions that it has the C layout.
pub fn rust_checks(st: &ParamStruct) -> String {
    let (n, file) = (&st.name, &st.file);
    let mut s = String::new();
    writeln!(
        s,
        "// Generated by build.rs (build/abi.rs) from `struct {n}` in {file}. Do not edit."
    )
    .unwrap();
    writeln!(
        s,
        "impl crate::runtime::abi::KernelStruct for {n} {{ const C_NAME: &'static str = {n:?}; }}"
    )
    .unwrap();
    let check = |s: &mut String, what: &str, got: String, want: usize| {
        writeln!(
            s,
            "const _: () = assert!({got} == {want}, \"{n}: {what} differs from `struct {n}` in {file} (C layout: {want})\");"
        )
        .unwrap();
    };
    check(
        &mut s,
        "size",
        format!("::core::mem::size_of::<{n}>()"),
        st.size,
    );
    check(
        &mut s,
        "alignment",
        format!("::core::mem::align_of::<{n}>()"),
        st.align,
    );
    for f in &st.fields {
        check(
            &mut s,
            &format!("the offset of `{}`", f.name),
            format!("::core::mem::offset_of!({n}, {})", f.name),
            f.offset,
        );
    }
    // An exhaustive pattern: the mirror has exactly these fields, each of the Rust type of its
    // C type (a missing or extra field, or another type, does not compile).
    let names: Vec<&str> = st.fields.iter().map(|f| f.name.as_str()).collect();
    writeln!(s, "const _: fn({n}) = |{n} {{ {} }}| {{", names.join(", ")).unwrap();
    for f in &st.fields {
        writeln!(s, "    let _: {} = {};", f.ty.rust(), f.name).unwrap();
    }
    writeln!(s, "}};").unwrap();
    s
}

/// The C side: `static_assert`s on each struct's layout, compiled after the kernel file.
pub fn c_checks(structs: &[ParamStruct]) -> String {
    if structs.is_empty() {
        return String::new();
    }
    let mut s = String::from("#include <cstddef>\n");
    for st in structs {
        let (n, file) = (&st.name, &st.file);
        let mut check = |got: String, want: usize, what: &str| {
            writeln!(
                s,
                "static_assert({got} == {want}, \"struct {n} in {file}: {what} differs from build/abi.rs's layout, which its Rust mirror asserts\");"
            )
            .unwrap();
        };
        check(format!("sizeof({n})"), st.size, "size");
        check(format!("alignof({n})"), st.align, "alignment");
        for f in &st.fields {
            check(
                format!("offsetof({n}, {})", f.name),
                f.offset,
                &format!("the offset of {}", f.name),
            );
            check(
                format!("sizeof({n}::{})", f.name),
                f.ty.size_align().0,
                &format!("the size of {}", f.name),
            );
        }
    }
    s
}
