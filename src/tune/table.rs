//! The tuning table: per distinct GEMM (with its epilogue) and attention shape of a
//! generation, every candidate's measured time and the winner, keyed by what makes the
//! measurement valid (device, compute capability, driver, cuBLASLt version, kernel binaries).
//! Written by `ultrapixel tune` to `tuning/<device-slug>.json`; read at run time, where a
//! table whose key differs from this machine's is stale and the built-in rules apply.

use super::problems::{AttentionDims, AttentionKey, Epilogue, GemmKey};
use crate::ops::gemm_sm90a::{self, TileWidth};
use crate::runtime::cuda::cublaslt::AlgoRecord;
use crate::runtime::kernels::{CUDA_ARCHS, KERNELS_COMPILED, NVCC_VERSION, PTX_ARCH};
use crate::tensor::DType;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

/// The table format this build reads and writes.
pub const FORMAT: u32 = 1;

/// The environment variable naming a directory of tables that take precedence over the
/// embedded ones.
pub const DIR_ENV: &str = "UPX_TUNING_DIR";

/// The committed tables (`tuning/*.json`), embedded at build time, by file name. A table
/// committed to `tuning/` must be listed here (a test checks that every file is).
pub const EMBEDDED: &[(&str, &str)] = &[(
    "nvidia-h200.json",
    include_str!("../../tuning/nvidia-h200.json"),
)];

/// What a table's measurements depend on. Any field that differs makes a table stale.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableKey {
    pub device_name: String,
    /// "major.minor".
    pub compute_capability: String,
    /// `cuDriverGetVersion` (e.g. 13000 for a CUDA 13.0 driver).
    pub driver_version: i32,
    /// `cublasLtGetVersion` (e.g. 130002), null when the library is not installed.
    pub cublaslt_version: Option<u64>,
    /// [`kernels_hash`] of the binary that measured.
    pub kernels_hash: String,
}

impl TableKey {
    /// One line per field that differs, with both values (`self` is the table's).
    pub fn differences(&self, current: &TableKey) -> Vec<String> {
        let mut v = Vec::new();
        let mut field = |name: &str, table: String, now: String| {
            if table != now {
                v.push(format!(
                    "{name} differs (table {table}, this machine {now})"
                ));
            }
        };
        field(
            "device_name",
            self.device_name.clone(),
            current.device_name.clone(),
        );
        field(
            "compute_capability",
            self.compute_capability.clone(),
            current.compute_capability.clone(),
        );
        field(
            "driver_version",
            self.driver_version.to_string(),
            current.driver_version.to_string(),
        );
        let lt = |v: Option<u64>| v.map_or("none".to_string(), |v| v.to_string());
        field(
            "cublaslt_version",
            lt(self.cublaslt_version),
            lt(current.cublaslt_version),
        );
        field(
            "kernels_hash",
            self.kernels_hash.clone(),
            current.kernels_hash.clone(),
        );
        v
    }

    /// The table's file name: `<device-slug>.json`.
    pub fn file_name(&self) -> String {
        format!("{}.json", device_slug(&self.device_name))
    }
}

/// `NVIDIA H200` → `nvidia-h200`: lower-case letters and digits, runs of anything else as one
/// dash, none at either end.
pub fn device_slug(name: &str) -> String {
    let mut s = String::new();
    for c in name.chars() {
        if c.is_ascii_alphanumeric() {
            s.push(c.to_ascii_lowercase());
        } else if !s.is_empty() && !s.ends_with('-') {
            s.push('-');
        }
    }
    while s.ends_with('-') {
        s.pop();
    }
    if s.is_empty() {
        "unnamed-device".into()
    } else {
        s
    }
}

/// Whether a kernel module's timings are in the table: the GEMM family (our GEMM, its
/// epilogue passes, Hopper variants), the GRN slab reduction a GEMM pair launches, and
/// attention. Other kernels may change without making a table stale.
pub fn tuned_module(name: &str) -> bool {
    name.starts_with("gemm") || name.starts_with("attention") || name == "grn"
}

/// The device sources of the tuned modules ([`tuned_module`]) and every header they can
/// include (kernels/common, but the emulator's `hostsim.h`, which nvcc never compiles, and
/// Hopper-only `*_sm90a.cuh` headers until a tuned module includes one), embedded at build
/// time. A test checks that the list is complete.
pub const TUNED_SOURCES: &[(&str, &str)] = &[
    ("attention.cu", include_str!("../../kernels/attention.cu")),
    (
        "attention_sm90a.cu",
        include_str!("../../kernels/attention_sm90a.cu"),
    ),
    ("gemm.cu", include_str!("../../kernels/gemm.cu")),
    (
        "gemm_epilogue.cu",
        include_str!("../../kernels/gemm_epilogue.cu"),
    ),
    ("gemm_sm90a.cu", include_str!("../../kernels/gemm_sm90a.cu")),
    ("grn.cu", include_str!("../../kernels/grn.cu")),
    (
        "common/accurate_math.cuh",
        include_str!("../../kernels/common/accurate_math.cuh"),
    ),
    (
        "common/attention.cuh",
        include_str!("../../kernels/common/attention.cuh"),
    ),
    (
        "common/convert.cuh",
        include_str!("../../kernels/common/convert.cuh"),
    ),
    (
        "common/gemm_epilogue.cuh",
        include_str!("../../kernels/common/gemm_epilogue.cuh"),
    ),
    (
        "common/gemm_params.cuh",
        include_str!("../../kernels/common/gemm_params.cuh"),
    ),
    (
        "common/hopper_sm90a.cuh",
        include_str!("../../kernels/common/hopper_sm90a.cuh"),
    ),
    (
        "common/mma.cuh",
        include_str!("../../kernels/common/mma.cuh"),
    ),
    (
        "common/portable.cuh",
        include_str!("../../kernels/common/portable.cuh"),
    ),
    (
        "common/reduce.cuh",
        include_str!("../../kernels/common/reduce.cuh"),
    ),
];

/// A hash of what the tuned kernels' machine code is made from: their sources
/// ([`TUNED_SOURCES`]), the nvcc release and the compiled architectures. A table goes stale
/// when those kernels change, not on unrelated changes to the binary, and not with the
/// directory the binary was built in (the fatbins themselves embed source paths).
pub fn kernels_hash() -> String {
    let mut h = Sha256::new();
    let mut field = |name: &str, bytes: &[u8]| {
        h.update((name.len() as u64).to_le_bytes());
        h.update(name.as_bytes());
        h.update((bytes.len() as u64).to_le_bytes());
        h.update(bytes);
    };
    for (name, text) in TUNED_SOURCES {
        field(name, text.as_bytes());
    }
    field("nvcc", NVCC_VERSION.as_bytes());
    field("archs", CUDA_ARCHS.join(",").as_bytes());
    field("ptx", PTX_ARCH.as_bytes());
    field("compiled", &[KERNELS_COMPILED as u8]);
    h.finalize()[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A whole table.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Table {
    pub format: u32,
    pub key: TableKey,
    /// UTC time of the run, `YYYY-MM-DDTHH:MM:SSZ`.
    pub created: String,
    /// The generation sizes whose shapes were tuned.
    #[serde(default)]
    pub sizes: Vec<String>,
    pub gemm: Vec<GemmEntry>,
    pub attention: Vec<AttentionEntry>,
}

/// Where a shape occurs: size, runs per image, first node.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Use {
    pub size: String,
    pub per_image: usize,
    pub example: String,
}

/// One distinct GEMM: `[M, K]·[N, K]ᵀ` with its epilogue and output dtype.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GemmEntry {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    /// Samples the rows split into (FiLM, GRN, operand scaling); 1 otherwise.
    pub samples: usize,
    /// `none` or the parts joined by `+`: bias, gelu, residual, film, grn_stats, scaled_a.
    pub epilogue: String,
    /// `bf16` or `f32`.
    pub out_dtype: String,
    #[serde(default)]
    pub uses: Vec<Use>,
    pub candidates: Vec<Candidate>,
    /// The name of the fastest candidate that passed its checks.
    pub winner: String,
}

/// One timed candidate.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Candidate {
    /// Unique within its entry: `ours/<config>`, `ours-sm90a/<config>`,
    /// `cublaslt/<variant>/<rank>`; for attention `ours/flash` and `ours/sm90a`.
    pub name: String,
    /// `ours` (our portable kernel), `ours-sm90a` (our Hopper kernel, after its operand-scaling
    /// pass for a `scaled_a` GEMM), `cublaslt` (cuBLASLt alone, with its own epilogue) or
    /// `cublaslt+epilogue` (cuBLASLt's product, then our epilogue pass), `standin+epilogue`
    /// (the emulator's stand-in for a vendor GEMM: our plain GEMM, then the epilogue pass).
    pub kind: String,
    /// Our kernel's tile configuration (GEMM kinds `ours` and `ours-sm90a`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<OurConfig>,
    /// The cuBLASLt call (kinds `cublaslt…`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cublaslt: Option<LtChoice>,
    /// `ok` (checked and timed), `wrong` (outside the bf16 bound of ours),
    /// `nondeterministic` (two runs differ), `failed` (an error; see `detail`).
    pub status: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// Device seconds per run (graph replays).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seconds: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tflops: Option<f64>,
    /// Largest difference from our kernel's output, and the bound it had to meet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_err: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<f32>,
}

impl Candidate {
    pub fn ok(&self) -> bool {
        self.status == "ok" && self.seconds.is_some()
    }
}

/// One of our GEMM kernel's compiled tile configurations.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OurConfig {
    pub name: String,
    /// Block tile M × N × K.
    pub tile: [u32; 3],
    pub stages: u32,
    /// `mma.sync` (sm_80+) or `wgmma` (sm_90a).
    pub mma: String,
}

/// A cuBLASLt call as the tuner timed it, replayable: the algorithm's raw bytes with the
/// descriptors this record names.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LtChoice {
    /// cuBLASLt's output (D) dtype: the op's own (kind `cublaslt`) or the product our
    /// epilogue pass reads (`bf16` or `f32`).
    pub product: String,
    /// cuBLASLt's epilogue: `default` or `bias` (f32 bias vector).
    pub epilogue: String,
    /// The residual added by cuBLASLt as `C` with β = 1 (D separate).
    pub residual_as_c: bool,
    /// Our operand-scaling pass (GRN) runs first.
    pub scale_a: bool,
    /// Our epilogue pass runs after.
    pub epilogue_pass: bool,
    pub algo: AlgoRecord,
}

/// One distinct attention: its shape (the fields of [`AttentionDims`], inline), output dtype,
/// uses and candidates.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AttentionEntry {
    #[serde(flatten)]
    pub dims: AttentionDims,
    /// `bf16` or `f32`; absent in tables written before it was recorded (any output then).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub out_dtype: Option<String>,
    #[serde(default)]
    pub uses: Vec<Use>,
    pub candidates: Vec<Candidate>,
    pub winner: String,
}

/// The candidate kind of our portable kernels.
pub const OURS: &str = "ours";
/// The candidate kind of our Hopper kernels.
pub const OURS_SM90A: &str = "ours-sm90a";

impl OurConfig {
    /// Our Hopper GEMM's configuration at tile width `width` (kernels/gemm_sm90a.cu: 4 TMA
    /// stages, two consumer warpgroups on `wgmma`): `128x<BN>x64s4`.
    pub fn sm90a(width: TileWidth) -> OurConfig {
        let tile = [gemm_sm90a::TILE_M, width.columns(), gemm_sm90a::TILE_K];
        OurConfig {
            name: format!("{}x{}x{}s{}", tile[0], tile[1], tile[2], gemm_sm90a::STAGES),
            tile: tile.map(|t| t as u32),
            stages: gemm_sm90a::STAGES,
            mma: "wgmma".into(),
        }
    }
}

/// The name of our Hopper GEMM's candidate at tile width `width`:
/// `ours-sm90a/128x<BN>x64s4`.
pub fn sm90a_candidate(width: TileWidth) -> String {
    format!("{OURS_SM90A}/{}", OurConfig::sm90a(width).name)
}

/// The tile width a Hopper GEMM candidate's name records (the inverse of
/// [`sm90a_candidate`]); None for any name this build does not write.
pub fn sm90a_width(name: &str) -> Option<TileWidth> {
    TileWidth::ALL
        .into_iter()
        .find(|&w| sm90a_candidate(w) == name)
}

/// What a GEMM node runs, by the table.
#[derive(Clone, Debug, PartialEq)]
pub enum GemmChoice {
    Ours(OurConfig),
    /// Our Hopper GEMM in the tile width the winner's name records; None where the name
    /// records none this build has (an invalid entry: the node runs the op's own launches).
    OursSm90a(Option<TileWidth>),
    CublasLt(LtChoice),
}

/// What an attention node runs, by the table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttentionChoice {
    Ours,
    OursSm90a,
}

/// The winner of an entry, if it passed its checks.
fn checked_winner<'a>(candidates: &'a [Candidate], winner: &str) -> Option<&'a Candidate> {
    candidates.iter().find(|c| c.name == winner && c.ok())
}

impl GemmEntry {
    pub fn key(&self) -> Option<GemmKey> {
        Some(GemmKey {
            m: self.m,
            n: self.n,
            k: self.k,
            samples: self.samples,
            epilogue: Epilogue::parse(&self.epilogue)?,
            out: parse_dtype(&self.out_dtype)?,
        })
    }

    /// The winner, as something a GEMM node can run (None when it names no usable
    /// candidate, e.g. the emulator's stand-in).
    pub fn choice(&self) -> Option<GemmChoice> {
        let c = checked_winner(&self.candidates, &self.winner)?;
        match c.kind.as_str() {
            OURS => c.config.clone().map(GemmChoice::Ours),
            OURS_SM90A => Some(GemmChoice::OursSm90a(sm90a_width(&c.name))),
            "cublaslt" | "cublaslt+epilogue" => c.cublaslt.clone().map(GemmChoice::CublasLt),
            _ => None,
        }
    }
}

impl AttentionEntry {
    /// Whether this entry is the attention of `key` (an entry without an output dtype, from
    /// an older table, matches either).
    pub fn matches(&self, key: &AttentionKey) -> bool {
        self.dims == key.dims
            && self
                .out_dtype
                .as_deref()
                .is_none_or(|d| parse_dtype(d) == Some(key.out))
    }

    /// The winner, as something an attention node can run.
    pub fn choice(&self) -> Option<AttentionChoice> {
        match checked_winner(&self.candidates, &self.winner)?
            .kind
            .as_str()
        {
            OURS => Some(AttentionChoice::Ours),
            OURS_SM90A => Some(AttentionChoice::OursSm90a),
            _ => None,
        }
    }
}

pub fn dtype_name(d: DType) -> &'static str {
    d.suffix()
}

pub fn parse_dtype(s: &str) -> Option<DType> {
    match s {
        "bf16" => Some(DType::BF16),
        "f32" => Some(DType::F32),
        _ => None,
    }
}

impl Table {
    /// The entry of a GEMM, if the table has it.
    pub fn gemm(&self, key: &GemmKey) -> Option<&GemmEntry> {
        self.gemm.iter().find(|e| e.key().as_ref() == Some(key))
    }

    /// The entry of an attention, if the table has it.
    pub fn attention(&self, key: &AttentionKey) -> Option<&AttentionEntry> {
        self.attention.iter().find(|e| e.matches(key))
    }

    /// Parses a table, checking its format.
    pub fn parse(text: &str) -> Result<Table, String> {
        // The format first, so a newer table says so rather than failing on a field.
        let v: serde_json::Value = serde_json::from_str(text).map_err(|e| e.to_string())?;
        match v.get("format").and_then(|f| f.as_u64()) {
            Some(f) if f == FORMAT as u64 => {}
            Some(f) => return Err(format!("format {f}, this build reads format {FORMAT}")),
            None => return Err("no format field: not a tuning table".into()),
        }
        serde_json::from_value(v).map_err(|e| e.to_string())
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("a table is plain data") + "\n"
    }
}

/// Which rules pick the kernels on this device.
#[derive(Clone, Debug, PartialEq)]
pub enum Selection {
    /// A table whose key matches this machine, and where it came from.
    Table { table: Box<Table>, source: String },
    /// Our kernels by the built-in rules, and why no table is used.
    BuiltIn { reason: String },
}

impl Selection {
    /// The table a device uses: `$UPX_TUNING_DIR/<slug>.json` when that file exists, else
    /// the embedded table of that name; built-in rules when neither exists, the file cannot
    /// be read or parsed, or its key differs from `key` (stale).
    pub fn load_for(key: &TableKey) -> Selection {
        let dir = std::env::var_os(DIR_ENV).map(PathBuf::from);
        Self::load_from(dir.as_deref(), EMBEDDED, key)
    }

    /// [`Self::load_for`] with the override directory and the embedded tables given.
    pub fn load_from(dir: Option<&Path>, embedded: &[(&str, &str)], key: &TableKey) -> Selection {
        let file = key.file_name();
        let (source, text) = match dir.map(|d| d.join(&file)).filter(|p| p.exists()) {
            Some(path) => {
                let source = path.display().to_string();
                match std::fs::read_to_string(&path) {
                    Ok(t) => (source, t),
                    Err(e) => return Self::unreadable(&source, e.to_string()),
                }
            }
            None => match embedded.iter().find(|(name, _)| *name == file) {
                Some((name, text)) => (format!("tuning/{name} (embedded)"), text.to_string()),
                None => {
                    let looked = match dir {
                        Some(d) => format!("{} and the embedded tables", d.display()),
                        None => format!("the embedded tables (set {DIR_ENV} to add a directory)"),
                    };
                    return Selection::BuiltIn {
                        reason: format!("no tuning table {file} in {looked}"),
                    };
                }
            },
        };
        match Table::parse(&text) {
            Ok(t) => Self::unless_stale(source, t, key),
            Err(e) => Self::unreadable(&source, e),
        }
    }

    /// The table in file `path` wherever it was measured, for listing what it picks without
    /// its device: used unless it cannot be read or its kernels are not this build's (the one
    /// key field that does not depend on the device).
    pub fn load_file(path: &Path) -> Selection {
        let source = path.display().to_string();
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) => return Self::unreadable(&source, e.to_string()),
        };
        match Table::parse(&text) {
            Ok(t) => {
                let key = TableKey {
                    kernels_hash: kernels_hash(),
                    ..t.key.clone()
                };
                Self::unless_stale(source, t, &key)
            }
            Err(e) => Self::unreadable(&source, e),
        }
    }

    fn unreadable(source: &str, e: String) -> Selection {
        Selection::BuiltIn {
            reason: format!("unreadable tuning table {source}: {e}"),
        }
    }

    /// `table` (from `source`) where its key matches `key`, else the built-in rules.
    fn unless_stale(source: String, table: Table, key: &TableKey) -> Selection {
        let diff = table.key.differences(key);
        if !diff.is_empty() {
            return Selection::BuiltIn {
                reason: format!(
                    "stale tuning table {source}: {}; rerun `ultrapixel tune`",
                    diff.join(", ")
                ),
            };
        }
        Selection::Table {
            table: Box::new(table),
            source,
        }
    }

    /// One line for `info`.
    pub fn describe(&self) -> String {
        match self {
            Selection::Table { table, source } => format!(
                "tuning table {source} ({} GEMM and {} attention shapes, created {})",
                table.gemm.len(),
                table.attention.len(),
                table.created
            ),
            Selection::BuiltIn { reason } => format!("built-in rules ({reason})"),
        }
    }

    pub fn table(&self) -> Option<&Table> {
        match self {
            Selection::Table { table, .. } => Some(table),
            Selection::BuiltIn { .. } => None,
        }
    }

    /// What a GEMM runs: the table's winner, or our kernel (built-in rules, or a shape the
    /// table lacks).
    pub fn gemm(&self, key: &GemmKey) -> Option<GemmChoice> {
        self.table()?.gemm(key)?.choice()
    }

    /// What an attention runs: the table's winner, or None (the built-in rules).
    pub fn attention(&self, key: &AttentionKey) -> Option<AttentionChoice> {
        self.table()?.attention(key)?.choice()
    }
}

/// `YYYY-MM-DDTHH:MM:SSZ` of a Unix time.
pub fn utc_timestamp(unix_seconds: u64) -> String {
    let days = (unix_seconds / 86_400) as i64;
    let secs = unix_seconds % 86_400;
    // Civil date from days since 1970-01-01 (proleptic Gregorian, era-based).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + (month <= 2) as i64;
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

/// Now, as [`utc_timestamp`].
pub fn now_utc() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    utc_timestamp(secs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hopper_candidate_name_gives_back_its_width_and_no_other_name_does() {
        let names = TileWidth::ALL.map(sm90a_candidate);
        assert_eq!(
            names,
            [
                "ours-sm90a/128x64x64s4",
                "ours-sm90a/128x128x64s4",
                "ours-sm90a/128x256x64s4"
            ]
        );
        for w in TileWidth::ALL {
            assert_eq!(sm90a_width(&sm90a_candidate(w)), Some(w));
            assert_eq!(OurConfig::sm90a(w).tile, [128, w.columns() as u32, 64]);
        }
        for bad in [
            "",
            "ours-sm90a/",
            "ours-sm90a/128x96x64s4",
            "ours-sm90a/128x128x64s4 ",
            "ours-sm90a/128x128x64s3",
            "ours-sm90a/128x128x32s4",
            "ours/128x128x64s4",
            "ours-sm90a/128x1280x64s4",
            "ours-sm90a/128x12Ⅷx64s4",
            "cublaslt/f32/0",
        ] {
            assert_eq!(sm90a_width(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn slugs_and_timestamps() {
        assert_eq!(device_slug("NVIDIA H200"), "nvidia-h200");
        assert_eq!(
            device_slug("  NVIDIA H100 80GB HBM3 "),
            "nvidia-h100-80gb-hbm3"
        );
        assert_eq!(device_slug("hostsim"), "hostsim");
        assert_eq!(device_slug("--"), "unnamed-device");
        assert_eq!(utc_timestamp(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc_timestamp(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(utc_timestamp(1_767_225_599), "2025-12-31T23:59:59Z");
    }

    #[test]
    fn the_kernel_hash_covers_the_gemm_and_attention_modules_only() {
        assert!(tuned_module("gemm") && tuned_module("gemm_epilogue"));
        assert!(tuned_module("gemm_sm90a") && tuned_module("attention"));
        assert!(!tuned_module("conv") && !tuned_module("sampler"));
        assert_eq!(kernels_hash().len(), 32);
        assert_eq!(kernels_hash(), kernels_hash());
    }

    /// Every source of a tuned module and every device header is hashed, as it is on disk; a
    /// Hopper-only header is hashed once a tuned module includes it.
    #[test]
    fn the_hashed_sources_are_every_tuned_kernel_file_and_header() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("kernels");
        let tuned_text: String = std::fs::read_dir(&root)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| {
                p.extension().is_some_and(|x| x == "cu")
                    && tuned_module(&p.file_stem().unwrap().to_string_lossy())
            })
            .map(|p| std::fs::read_to_string(p).unwrap())
            .collect();
        let mut want: Vec<String> = Vec::new();
        for (dir, prefix) in [(root.clone(), ""), (root.join("common"), "common/")] {
            for e in std::fs::read_dir(dir).unwrap() {
                let name = e.unwrap().file_name().to_string_lossy().into_owned();
                let tuned = match name.strip_suffix(".cu") {
                    Some(stem) => prefix.is_empty() && tuned_module(stem),
                    None if name.ends_with("_sm90a.cuh") => {
                        tuned_text.contains(&format!("\"common/{name}\""))
                    }
                    None => !prefix.is_empty() && name != "hostsim.h",
                };
                if tuned {
                    want.push(format!("{prefix}{name}"));
                }
            }
        }
        want.sort();
        let mut have: Vec<String> = TUNED_SOURCES.iter().map(|(n, _)| n.to_string()).collect();
        have.sort();
        assert_eq!(have, want, "tune::table::TUNED_SOURCES is out of date");
        for (name, text) in TUNED_SOURCES {
            assert_eq!(
                std::fs::read_to_string(root.join(name)).unwrap(),
                *text,
                "{name}"
            );
        }
    }
}
