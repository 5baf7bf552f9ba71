//! Build script: compiles every `kernels/*.cu` with nvcc into an embedded fatbin, records the
//! ptxas resource report, generates the kernel table with every kernel's parameter list and
//! the layout checks of the parameter structs (build/abi.rs), and compiles the same sources
//! with g++ into the host emulator library (feature `hostsim`).
//!
//! Environment: `NVCC`, `CUDA_HOME`, `CUDA_PATH`, `UPX_CUDA_VENV` (where to look for nvcc),
//! `UPX_CUDA_ARCHS` (e.g. `sm_90`: restrict the SASS targets), `UPX_REQUIRE_NVCC=1` (a missing
//! nvcc is an error), `UPX_STRICT_PTXAS=1` (any spill, local memory, serialized wgmma or
//! ignored setmaxnreg is an error), `UPX_HOSTSIM_RACECHECK=1` (the emulator's kernels instrumented
//! for its shared-memory race check).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::{env, fs};

#[path = "build/abi.rs"]
mod abi;
#[path = "build/ptxas.rs"]
mod ptxas;
use ptxas::PtxasEntry;

const DEFAULT_ARCHS: &[&str] = &["sm_80", "sm_86", "sm_89", "sm_90"];
const PTX_ARCH: &str = "compute_90";

struct KernelFile {
    stem: String,
    path: PathBuf,
    /// Hopper-only (`*_sm90a.cu`): compiled by nvcc for sm_90a alone (and emulated like the rest).
    sm90a: bool,
    kernels: Vec<abi::Kernel>,
    /// The structs its kernels take by value.
    structs: Vec<abi::ParamStruct>,
}

impl KernelFile {
    /// The path messages name, `kernels/<stem>.cu`.
    fn display(&self) -> String {
        format!("kernels/{}.cu", self.stem)
    }

    /// What a compiler compiles for this file: the file, then the C layout checks of its
    /// parameter structs (build/abi.rs), so nvcc and g++ both check them.
    fn translation_unit(&self) -> String {
        format!(
            "#include \"{}\"\n{}",
            self.path.display(),
            abi::c_checks(&self.structs)
        )
    }
}

fn main() {
    for var in [
        "NVCC",
        "CUDA_HOME",
        "CUDA_PATH",
        "UPX_CUDA_VENV",
        "UPX_CUDA_ARCHS",
        "UPX_REQUIRE_NVCC",
        "UPX_STRICT_PTXAS",
        "VIRTUAL_ENV",
        "HOME",
    ] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    let root = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let out = PathBuf::from(env::var("OUT_DIR").unwrap());
    let kdir = root.join("kernels");
    println!("cargo:rerun-if-changed={}", kdir.display());

    let common = common_sources(&kdir);
    let files = discover(&kdir, &common);
    let require = env::var("UPX_REQUIRE_NVCC").is_ok_and(|v| v == "1");
    let strict = env::var("UPX_STRICT_PTXAS").is_ok_and(|v| v == "1");

    // UPX_NO_NVCC=1: a CPU-only build on purpose (the fuzz targets), quietly.
    let skip = env::var("UPX_NO_NVCC").is_ok_and(|v| v == "1");
    println!("cargo:rerun-if-env-changed=UPX_NO_NVCC");
    let (compiled, nvcc_version, ptxas) = match find_nvcc().filter(|_| !skip) {
        Some(nvcc) => {
            let version = nvcc_version(&nvcc);
            if !version.contains("release 13.0") {
                println!(
                    "cargo:warning=nvcc at {} is not CUDA 13.0 ({version}); the GPU machines' driver may not load its PTX",
                    nvcc.display()
                );
            }
            let report = compile_fatbins(&nvcc, &files, &common, &out, strict, &version);
            (true, version, report)
        }
        None => {
            if require {
                panic!(
                    "UPX_REQUIRE_NVCC=1 but nvcc was not found (looked at $NVCC, $CUDA_HOME, $CUDA_PATH, PATH and the venv of tools/install-cuda-toolchain.sh); run tools/install-cuda-toolchain.sh"
                );
            }
            if !skip {
                println!(
                    "cargo:warning=nvcc not found: GPU kernels are NOT embedded (set NVCC or run tools/install-cuda-toolchain.sh)"
                );
            }
            for f in &files {
                fs::write(out.join(format!("{}.fatbin", f.stem)), []).unwrap();
            }
            (false, String::new(), Vec::new())
        }
    };

    let mut report = String::new();
    for e in &ptxas {
        writeln!(
            report,
            "{:<40} {:<6} regs {:>3}  smem {:>6}  stack {:>4}  spill st {:>4} ld {:>4}",
            e.kernel, e.arch, e.registers, e.smem, e.stack, e.spill_stores, e.spill_loads
        )
        .unwrap();
    }
    fs::write(out.join("ptxas_report.txt"), report).unwrap();
    fs::write(
        out.join("kernels.rs"),
        generate_table(&files, compiled, &nvcc_version, &ptxas),
    )
    .unwrap();
    // One mirror check per struct (a shared header's struct is in several files' lists).
    for st in files.iter().flat_map(|f| &f.structs) {
        let path = out.join(format!("abi_{}.rs", st.name));
        fs::write(path, abi::rust_checks(st)).unwrap();
    }

    if env::var_os("CARGO_FEATURE_HOSTSIM").is_some() {
        build_hostsim(&files, &kdir, &out);
    }
}

/// Top-level `kernels/*.cu`, sorted, with the kernel names each one exports (`common`: the
/// kernels/common headers, where shared parameter structs live).
fn discover(kdir: &Path, common: &[(PathBuf, String)]) -> Vec<KernelFile> {
    let headers: Vec<(String, String)> = common
        .iter()
        .map(|(p, text)| {
            let name = p.file_name().unwrap().to_string_lossy();
            (format!("common/{name}"), text.clone())
        })
        .collect();
    let mut paths: Vec<PathBuf> = fs::read_dir(kdir)
        .map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    paths.retain(|p| p.extension().is_some_and(|e| e == "cu"));
    paths.sort();
    let mut seen = BTreeMap::new();
    paths
        .into_iter()
        .map(|path| {
            println!("cargo:rerun-if-changed={}", path.display());
            let stem = path.file_stem().unwrap().to_string_lossy().into_owned();
            let text = fs::read_to_string(&path).unwrap();
            let file = format!("kernels/{stem}.cu");
            let (kernels, structs) = abi::parse(&text, &file, &headers);
            // A name belongs to one definition: a struct from a shared header may be taken by
            // several files, anything else is defined twice.
            let kernel_defs = kernels.iter().map(|k| (&k.name, format!("kernel in {file}")));
            let struct_defs = structs.iter().map(|s| (&s.name, format!("struct in {}", s.file)));
            for (name, def) in kernel_defs.chain(struct_defs) {
                let first = seen.entry(name.clone()).or_insert_with(|| def.clone());
                assert!(
                    *first == def,
                    "{name} is defined twice under kernels/ ({first}, {def}; kernels and parameter structs have one namespace)"
                );
            }
            KernelFile {
                sm90a: stem.ends_with("_sm90a"),
                stem,
                path,
                kernels,
                structs,
            }
        })
        .collect()
}

/// Every file under kernels/common (they are included by the kernel files).
fn common_sources(kdir: &Path) -> Vec<(PathBuf, String)> {
    let mut v: Vec<(PathBuf, String)> = fs::read_dir(kdir.join("common"))
        .map(|rd| {
            rd.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.is_file())
                .map(|p| {
                    let text = fs::read_to_string(&p).unwrap();
                    (p, text)
                })
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    for (p, _) in &v {
        println!("cargo:rerun-if-changed={}", p.display());
    }
    v
}

fn find_nvcc() -> Option<PathBuf> {
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Some(p) = env::var_os("NVCC") {
        candidates.push(p.into());
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(p) = env::var_os(var) {
            candidates.push(PathBuf::from(p).join("bin/nvcc"));
        }
    }
    if let Some(path) = env::var_os("PATH") {
        candidates.extend(env::split_paths(&path).map(|d| d.join("nvcc")));
    }
    let venv = env::var_os("UPX_CUDA_VENV")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/upx/cuda-13.0")));
    for v in venv
        .into_iter()
        .chain(env::var_os("VIRTUAL_ENV").map(PathBuf::from))
    {
        if let Ok(rd) = fs::read_dir(v.join("lib")) {
            let mut pys: Vec<PathBuf> = rd.filter_map(|e| e.ok().map(|e| e.path())).collect();
            pys.sort();
            for py in pys {
                candidates.push(py.join("site-packages/nvidia/cu13/bin/nvcc"));
            }
        }
    }
    // nvcc finds its headers relative to the path it was started by: never run it via a symlink.
    candidates
        .into_iter()
        .find(|p| p.is_file())
        .and_then(|p| p.canonicalize().ok())
}

fn nvcc_version(nvcc: &Path) -> String {
    let out = Command::new(nvcc)
        .arg("--version")
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", nvcc.display()));
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find(|l| l.contains("release"))
        .unwrap_or("unknown")
        .trim()
        .to_string()
}

fn archs() -> Vec<String> {
    match env::var("UPX_CUDA_ARCHS") {
        Ok(v) if !v.trim().is_empty() => v.split(',').map(|s| s.trim().to_string()).collect(),
        _ => DEFAULT_ARCHS.iter().map(|s| s.to_string()).collect(),
    }
}

fn nvcc_args(f: &KernelFile, strict: bool) -> Vec<String> {
    let mut args: Vec<String> = [
        "-fatbin",
        "-O3",
        "-std=c++17",
        "--expt-relaxed-constexpr",
        "-lineinfo",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.push(if strict {
        "-Xptxas=-v,-warn-spills,-warn-lmem-usage,-Werror".into()
    } else {
        "-Xptxas=-v".into()
    });
    if f.sm90a {
        args.push("-gencode=arch=compute_90a,code=sm_90a".into());
    } else {
        for a in archs() {
            let n = a.trim_start_matches("sm_");
            args.push(format!("-gencode=arch=compute_{n},code=sm_{n}"));
        }
        args.push(format!("-gencode=arch={PTX_ARCH},code={PTX_ARCH}"));
    }
    args
}

/// FNV-1a: a content hash so unchanged files are not recompiled (nvcc is slow).
fn fnv(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for p in parts {
        for b in p.iter().chain(&[0xffu8]) {
            h ^= *b as u64;
            h = h.wrapping_mul(0x100000001b3);
        }
    }
    h
}

fn compile_fatbins(
    nvcc: &Path,
    files: &[KernelFile],
    common: &[(PathBuf, String)],
    out: &Path,
    strict: bool,
    version: &str,
) -> Vec<PtxasEntry> {
    let jobs: usize = env::var("NUM_JOBS")
        .ok()
        .and_then(|j| j.parse().ok())
        .unwrap_or(2)
        .max(1);
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<(usize, Result<String, String>)>> = Mutex::new(Vec::new());
    let kdir = files
        .first()
        .map(|f| f.path.parent().unwrap().to_path_buf())
        .unwrap_or_default();
    std::thread::scope(|s| {
        for _ in 0..jobs.min(files.len().max(1)) {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                let Some(f) = files.get(i) else { break };
                let r = compile_one(nvcc, f, common, &kdir, out, strict, version);
                results.lock().unwrap().push((i, r));
            });
        }
    });
    let mut results = results.into_inner().unwrap();
    results.sort_by_key(|(i, _)| *i);
    let mut entries = Vec::new();
    let mut failures = Vec::new();
    let mut serialized = Vec::new();
    for (i, r) in results {
        match r {
            Ok(log) => {
                entries.extend(ptxas::parse(&log));
                let lines = ptxas::performance_losses(&log);
                serialized.extend(lines.map(|l| format!("{}: {l}", files[i].display())));
            }
            Err(e) => failures.push(format!("{}: {e}", files[i].path.display())),
        }
    }
    if !failures.is_empty() {
        panic!("nvcc failed:\n{}", failures.join("\n"));
    }
    // ptxas reports a serialized wgmma pipeline or an ignored setmaxnreg as info, not as a
    // warning -Werror would catch.
    if strict && !serialized.is_empty() {
        panic!(
            "UPX_STRICT_PTXAS=1: ptxas serialized wgmma or ignored setmaxnreg:\n{}",
            serialized.join("\n")
        );
    }
    for line in &serialized {
        println!("cargo:warning={line}");
    }
    for e in &entries {
        if e.spill_stores + e.spill_loads > 0 || e.stack > 0 {
            println!(
                "cargo:warning=ptxas: {} on {} uses {} bytes of stack, {} bytes spill stores, {} bytes spill loads",
                e.kernel, e.arch, e.stack, e.spill_stores, e.spill_loads
            );
        }
    }
    entries
}

/// Compiles one file (or reuses the cached fatbin and log when nothing changed); returns
/// the ptxas log.
fn compile_one(
    nvcc: &Path,
    f: &KernelFile,
    common: &[(PathBuf, String)],
    kdir: &Path,
    out: &Path,
    strict: bool,
    version: &str,
) -> Result<String, String> {
    let src = fs::read(&f.path).map_err(|e| e.to_string())?;
    let unit = f.translation_unit();
    let args = nvcc_args(f, strict);
    let mut parts: Vec<&[u8]> = vec![&src, unit.as_bytes(), version.as_bytes()];
    parts.extend(args.iter().map(|a| a.as_bytes()));
    parts.extend(common.iter().map(|(_, t)| t.as_bytes()));
    let hash = format!("{:016x}", fnv(&parts));
    let fatbin = out.join(format!("{}.fatbin", f.stem));
    let log_path = out.join(format!("{}.ptxas.log", f.stem));
    let hash_path = out.join(format!("{}.hash", f.stem));
    if fatbin.exists() && fs::read_to_string(&hash_path).is_ok_and(|h| h == hash) {
        if let Ok(log) = fs::read_to_string(&log_path) {
            return Ok(log);
        }
    }
    let unit_path = out.join(format!("nvcc_{}.cu", f.stem));
    fs::write(&unit_path, &unit).map_err(|e| e.to_string())?;
    let output = Command::new(nvcc)
        .args(&args)
        .arg(format!("-I{}", kdir.display()))
        .arg(&unit_path)
        .arg("-o")
        .arg(&fatbin)
        .output()
        .map_err(|e| format!("cannot run nvcc: {e}"))?;
    let log = String::from_utf8_lossy(&output.stderr).into_owned();
    if !output.status.success() {
        let _ = fs::remove_file(&hash_path);
        return Err(format!("{}\n{log}", output.status));
    }
    fs::write(&log_path, &log).map_err(|e| e.to_string())?;
    fs::write(&hash_path, hash).map_err(|e| e.to_string())?;
    Ok(log)
}

fn generate_table(
    files: &[KernelFile],
    compiled: bool,
    version: &str,
    ptxas: &[PtxasEntry],
) -> String {
    let mut s = String::new();
    writeln!(
        s,
        "// Generated by build.rs from kernels/*.cu. Do not edit."
    )
    .unwrap();
    writeln!(s, "pub const KERNELS_COMPILED: bool = {compiled};").unwrap();
    writeln!(s, "pub const NVCC_VERSION: &str = {version:?};").unwrap();
    let archs = if compiled { archs() } else { Vec::new() };
    writeln!(s, "pub const CUDA_ARCHS: &[&str] = &{archs:?};").unwrap();
    writeln!(
        s,
        "pub const PTX_ARCH: &str = {:?};",
        if compiled { PTX_ARCH } else { "" }
    )
    .unwrap();
    writeln!(s, "pub static MODULES: &[ModuleBlob] = &[").unwrap();
    for f in files {
        writeln!(
            s,
            "    ModuleBlob {{ name: {:?}, sm90a: {}, fatbin: include_bytes!(concat!(env!(\"OUT_DIR\"), \"/{}.fatbin\")) }},",
            f.stem, f.sm90a, f.stem
        )
        .unwrap();
    }
    writeln!(s, "];").unwrap();

    let all: Vec<(&str, usize)> = files
        .iter()
        .enumerate()
        .flat_map(|(m, f)| f.kernels.iter().map(move |k| (k.name.as_str(), m)))
        .collect();
    writeln!(s, "#[allow(non_camel_case_types)]").unwrap();
    writeln!(
        s,
        "#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]"
    )
    .unwrap();
    writeln!(s, "pub enum KernelId {{").unwrap();
    for (k, _) in &all {
        writeln!(s, "    {k},").unwrap();
    }
    writeln!(s, "}}").unwrap();
    writeln!(s, "impl KernelId {{").unwrap();
    writeln!(s, "    pub const ALL: &'static [KernelId] = &[").unwrap();
    for (k, _) in &all {
        writeln!(s, "        KernelId::{k},").unwrap();
    }
    writeln!(s, "    ];").unwrap();
    writeln!(s, "    pub fn name(self) -> &'static str {{ match self {{").unwrap();
    for (k, _) in &all {
        writeln!(s, "        KernelId::{k} => {k:?},").unwrap();
    }
    writeln!(s, "    }} }}").unwrap();
    writeln!(
        s,
        "    /// Whether the kernel is Hopper-only (`kernels/*_sm90a.cu`): launchable on a compute capability 9.0 GPU (and the emulator) alone."
    )
    .unwrap();
    writeln!(
        s,
        "    pub fn sm90a(self) -> bool {{ MODULES[self.module()].sm90a }}"
    )
    .unwrap();
    writeln!(s, "    /// Index into [`MODULES`].").unwrap();
    writeln!(s, "    pub fn module(self) -> usize {{ match self {{").unwrap();
    for (k, m) in &all {
        writeln!(s, "        KernelId::{k} => {m},").unwrap();
    }
    writeln!(s, "    }} }}").unwrap();
    writeln!(s, "}}").unwrap();
    let kernels: Vec<&abi::Kernel> = files.iter().flat_map(|f| &f.kernels).collect();
    let structs: Vec<&abi::ParamStruct> = files.iter().flat_map(|f| &f.structs).collect();
    s.push_str(&abi::params_table(&kernels, &structs));

    writeln!(s, "pub static PTXAS: &[PtxasEntry] = &[").unwrap();
    for e in ptxas {
        writeln!(
            s,
            "    PtxasEntry {{ kernel: {:?}, arch: {:?}, registers: {}, smem_bytes: {}, stack_bytes: {}, spill_stores: {}, spill_loads: {} }},",
            e.kernel, e.arch, e.registers, e.smem, e.stack, e.spill_stores, e.spill_loads
        )
        .unwrap();
    }
    writeln!(s, "];").unwrap();

    writeln!(s, "#[cfg(feature = \"hostsim\")]").unwrap();
    writeln!(s, "mod ffi {{").unwrap();
    writeln!(s, "    use crate::runtime::hostsim::LaunchCfg;").unwrap();
    writeln!(s, "    extern \"C\" {{").unwrap();
    writeln!(
        s,
        "        pub fn hostsim_last_error() -> *const std::ffi::c_char;"
    )
    .unwrap();
    for (k, _) in &all {
        writeln!(
            s,
            "        pub fn hostsim_launch_{k}(cfg: *const LaunchCfg, args: *mut *mut std::ffi::c_void) -> i32;"
        )
        .unwrap();
    }
    writeln!(s, "    }}").unwrap();
    writeln!(s, "}}").unwrap();
    writeln!(s, "#[cfg(feature = \"hostsim\")]").unwrap();
    writeln!(s, "pub use ffi::hostsim_last_error;").unwrap();
    writeln!(s, "/// The emulator entry point of a kernel.").unwrap();
    writeln!(s, "#[cfg(feature = \"hostsim\")]").unwrap();
    writeln!(
        s,
        "pub fn hostsim_entry(k: KernelId) -> crate::runtime::hostsim::LaunchFn {{ match k {{"
    )
    .unwrap();
    for (k, _) in &all {
        writeln!(s, "    KernelId::{k} => ffi::hostsim_launch_{k},").unwrap();
    }
    writeln!(s, "}} }}").unwrap();
    s
}

/// Whether the build runs on (and, not cross-compiling, for) an x86-64 CPU with FMA.
fn host_has_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        env::var("HOST").ok() == env::var("TARGET").ok() && std::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The emulator library: each kernel file is included by a generated .cpp that exports one
/// launcher per kernel (`hostsim_launch_<name>`), all compiled by g++ into one archive.
fn build_hostsim(files: &[KernelFile], kdir: &Path, out: &Path) {
    let mut build = cc::Build::new();
    build
        .cpp(true)
        .std("c++20")
        .opt_level(2)
        .debug(false)
        .include(kdir)
        .define("HOSTSIM", None)
        // Shared memory and emulator state are thread_local; the archive only ever links
        // into executables, so the fast TLS model is valid.
        .flag("-ftls-model=initial-exec")
        .flag_if_supported("-Wno-unused-parameter")
        .flag_if_supported("-Wno-unknown-pragmas");
    // UPX_HOSTSIM_RACECHECK=1: kernels instrumented for the shared-memory race check
    // (HOSTSIM_RACECHECK=1 at run time): every load and store calls the emulator's __tsan_*
    // hooks (no TSan runtime is linked); line tables let a report's code address be resolved
    // with addr2line. Off by default: the calls make the emulator about 1.7x slower even with
    // the check off.
    println!("cargo:rerun-if-env-changed=UPX_HOSTSIM_RACECHECK");
    if env::var("UPX_HOSTSIM_RACECHECK").is_ok_and(|v| v == "1") {
        build
            .flag("-fsanitize=thread")
            .flag_if_supported("--param=tsan-instrument-func-entry-exit=0")
            .flag("-g1");
    }
    // The kernels' fmaf() becomes one instruction instead of a libm call (a sixth of the
    // emulator's time) when the machine building, and so running, the tests has FMA.
    if host_has_fma() {
        build.flag("-mfma");
    }
    let mut any = false;
    for f in files {
        let mut src = f.translation_unit();
        for k in &f.kernels {
            writeln!(src, "HS_EXPORT({})", k.name).unwrap();
        }
        let path = out.join(format!("hostsim_{}.cpp", f.stem));
        if fs::read_to_string(&path).ok().as_deref() != Some(src.as_str()) {
            fs::write(&path, &src).unwrap();
        }
        build.file(&path);
        any = true;
    }
    if !any {
        // An empty archive still defines the error accessor.
        let path = out.join("hostsim_empty.cpp");
        fs::write(&path, "#include \"common/portable.cuh\"\n").unwrap();
        build.file(&path);
    }
    build.compile("kernels_host");
}
