//! Which kernel family an op launches where it has more than one: the portable kernels
//! (`kernels/*.cu`, every GPU from sm_80 and the emulator) or the Hopper ones
//! (`kernels/*_sm90a.cu`, compute capability 9.0 and the emulator).
//!
//! `UPX_KERNELS`:
//! - `auto` (the default): on the cuda backend the tuning table in use picks per GEMM and
//!   attention node (`tune::dispatch`: cuBLASLt, the Hopper kernel or the portable one, the
//!   measured winner); shapes the table lacks, a stale or missing table, `UPX_TUNING=off` and
//!   the other backends get the portable kernels. The Hopper kernels run under `auto` only
//!   where a table measured them the winner: they are not yet measured on hardware, so no
//!   built-in rule prefers them;
//! - `portable`: the portable kernels everywhere, whatever the table says;
//! - `sm90a`: the Hopper kernels wherever a shape qualifies, on hostsim too (on a GPU that is
//!   not compute capability 9.0 the portable ones, which are the only ones it can load),
//!   whatever the table says; a GEMM whose winner is our Hopper GEMM takes the winner's tile
//!   width ([`KernelTarget::gemm_tile_n`]), every other the launcher's modelled one.
//!
//! A graph can carry its own choice instead ([`Graph::set_kernels`]): `verify` and
//! `bench --shapes` run the portable and the Hopper kernels side by side in one process.
//! A shape that does not qualify (see each op's rules, e.g. `ops::gemm_sm90a::why_not`)
//! always falls back to the portable kernel.
//!
//! [`Graph::set_kernels`]: super::graph::Graph::set_kernels

use super::device::DrySubstitution;
use super::graph::Graph;
use super::launch::Entry;
use super::BackendKind;
use crate::{Error, Result};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};

/// The value of `UPX_KERNELS`, or a graph's own choice.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum KernelChoice {
    Portable,
    Sm90a,
    #[default]
    Auto,
}

/// The environment variable that picks the [`KernelChoice`].
pub const ENV: &str = "UPX_KERNELS";

impl KernelChoice {
    pub fn parse(s: &str) -> Result<Self> {
        match s.trim() {
            "portable" => Ok(KernelChoice::Portable),
            "sm90a" => Ok(KernelChoice::Sm90a),
            "" | "auto" => Ok(KernelChoice::Auto),
            other => Err(Error::InvalidArgument(format!(
                "{ENV}={other:?}: expected portable, sm90a or auto"
            ))),
        }
    }

    /// The value's name, as `UPX_KERNELS` spells it.
    pub fn name(self) -> &'static str {
        match self {
            KernelChoice::Portable => "portable",
            KernelChoice::Sm90a => "sm90a",
            KernelChoice::Auto => "auto",
        }
    }

    /// `UPX_KERNELS` as set now (unset: auto).
    pub fn from_env() -> Result<Self> {
        match std::env::var(ENV) {
            Ok(v) => Self::parse(&v),
            Err(std::env::VarError::NotPresent) => Ok(KernelChoice::Auto),
            Err(e) => Err(Error::InvalidArgument(format!("{ENV}: {e}"))),
        }
    }

    /// Whether an op's own launches may use a Hopper kernel on `target` under this choice (the
    /// shape still has to qualify). Under `auto` they never do: the tuning dispatch builds a
    /// node whose measured winner is the Hopper kernel with the target forced to `sm90a`.
    pub fn allows_sm90a(self, target: &KernelTarget) -> bool {
        let hopper = target.compute_capability == Some((9, 0));
        match self {
            KernelChoice::Portable | KernelChoice::Auto => false,
            KernelChoice::Sm90a => target.backend == Some(BackendKind::Hostsim) || hopper,
        }
    }
}

/// What the launches of a graph are built for: the executing backend, the GPU's compute
/// capability and its SM count (the persistent kernels' grid). The default (no backend) is a
/// dry listing or a tuner's private launch: portable kernels only.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct KernelTarget {
    pub backend: Option<BackendKind>,
    pub compute_capability: Option<(i32, i32)>,
    /// Streaming multiprocessors (0: unknown).
    pub sms: u32,
    /// The choice to apply instead of `UPX_KERNELS` (None: the environment's). Sessions set
    /// it to the graph's resolved choice; listings and tests set it so as not to depend on
    /// the process environment.
    pub choice: Option<KernelChoice>,
    /// The Hopper GEMM's output tile width (BN columns) to build instead of the one its
    /// launcher models for the shape (None: the modelled one): the width a tuning table
    /// measured fastest for the node's GEMM, set by the tuning dispatch and the tuner.
    pub gemm_tile_n: Option<usize>,
}

impl KernelTarget {
    /// The emulator: it can run every kernel; it pretends to have an H100's 132 SMs.
    pub fn hostsim() -> Self {
        KernelTarget {
            backend: Some(BackendKind::Hostsim),
            compute_capability: None,
            sms: 132,
            choice: None,
            gemm_tile_n: None,
        }
    }

    /// This target with `choice` instead of `UPX_KERNELS`.
    pub fn with_choice(self, choice: KernelChoice) -> Self {
        KernelTarget {
            choice: Some(choice),
            ..self
        }
    }

    /// This target with the Hopper GEMM built in tile width `columns` (see
    /// [`Self::gemm_tile_n`]).
    pub fn with_gemm_tile_n(self, columns: usize) -> Self {
        KernelTarget {
            gemm_tile_n: Some(columns),
            ..self
        }
    }

    /// The choice that applies here: the explicit one, else `UPX_KERNELS` (an unparsable value
    /// is an error).
    pub fn kernel_choice(&self) -> Result<KernelChoice> {
        self.resolve(None)
    }

    /// The choice launches for this target are built under: the target's own, else
    /// `graph_choice` (a graph's), else `UPX_KERNELS`.
    pub fn resolve(&self, graph_choice: Option<KernelChoice>) -> Result<KernelChoice> {
        match self.choice.or(graph_choice) {
            Some(c) => Ok(c),
            None => KernelChoice::from_env(),
        }
    }

    /// Why an op's own launches take no Hopper kernel here under `choice` (None: they may,
    /// where a shape qualifies).
    pub fn why_not_sm90a(&self, choice: KernelChoice) -> Option<String> {
        if choice.allows_sm90a(self) {
            return None;
        }
        Some(match (choice, self.backend, self.compute_capability) {
            (_, None, _) => "no backend (a dry listing)".into(),
            (KernelChoice::Portable, ..) => format!("{ENV}=portable"),
            (KernelChoice::Auto, ..) => {
                format!("{ENV}=auto runs them only where a tuning table measured them the winner")
            }
            (_, Some(BackendKind::Cpu), _) => "the cpu backend runs no kernels".into(),
            (_, _, Some((ma, mi))) => {
                format!("they need compute capability 9.0, this is {ma}.{mi}")
            }
            (_, _, None) => "they need compute capability 9.0".into(),
        })
    }

    /// Whether the Hopper kernels may run here under [`Self::kernel_choice`].
    pub fn sm90a_allowed(&self) -> Result<bool> {
        if self.backend.is_none() {
            return Ok(false);
        }
        Ok(self.kernel_choice()?.allows_sm90a(self))
    }
}

/// GEMM kernel launches placed in sessions so far in this process: (on the sm_90a kernel, on
/// either of our GEMM kernels). `validate` reports the difference over its cases.
pub fn gemm_launch_counts() -> (usize, usize) {
    FAMILIES[0].counts()
}

/// Attention kernel launches placed in sessions so far, counted as `gemm_launch_counts`.
pub fn attention_launch_counts() -> (usize, usize) {
    FAMILIES[1].counts()
}

/// A kernel family with a portable and an sm_90a implementation, told apart by name prefix,
/// and for some a vendor library's call (its description's prefix); `placed` counts (sm_90a
/// launches, all launches of our kernels).
struct Family {
    /// The ops' name in reports.
    op: &'static str,
    portable: &'static str,
    sm90a: &'static str,
    vendor: Option<&'static str>,
    placed: [AtomicUsize; 2],
}

/// Which implementation of its family an entry runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Implementation {
    Portable,
    Sm90a,
    Vendor,
}

impl Family {
    const fn new(
        op: &'static str,
        portable: &'static str,
        sm90a: &'static str,
        vendor: Option<&'static str>,
    ) -> Self {
        Family {
            op,
            portable,
            sm90a,
            vendor,
            placed: [AtomicUsize::new(0), AtomicUsize::new(0)],
        }
    }

    fn counts(&self) -> (usize, usize) {
        (
            self.placed[0].load(Ordering::Relaxed),
            self.placed[1].load(Ordering::Relaxed),
        )
    }
}

static FAMILIES: [Family; 2] = [
    Family::new(
        "gemm",
        "gemm_bf16_",
        "gemm_sm90a_",
        Some(super::cuda::cublaslt::CALL_PREFIX),
    ),
    Family::new("attention", "attention_d", "attention_sm90a_", None),
];

/// The kernel family of an entry named `name` (a kernel's name, a vendor call's description)
/// and which of its implementations it is (None: one with a single implementation).
fn family_of(name: &str) -> Option<(&'static Family, Implementation)> {
    FAMILIES.iter().find_map(|f| {
        if name.starts_with(f.sm90a) {
            Some((f, Implementation::Sm90a))
        } else if name.starts_with(f.portable) {
            Some((f, Implementation::Portable))
        } else if f.vendor.is_some_and(|v| name.starts_with(v)) {
            Some((f, Implementation::Vendor))
        } else {
            None
        }
    })
}

/// The variant of an sm_90a kernel: the first part of its name after the family's prefix
/// (`gemm_sm90a_n256_bf16_f32` → `n256`, the GEMM's tile width; `attention_sm90a_d64_bf16` →
/// `d64`).
fn sm90a_variant(f: &Family, kernel: &str) -> String {
    let rest = kernel.strip_prefix(f.sm90a).unwrap_or(kernel);
    rest.split('_').next().unwrap_or(rest).to_string()
}

/// Which kernel the GEMM and attention ops of some graphs run on one target: per op family,
/// the executions on the vendor library (cuBLASLt, for GEMMs), on the sm_90a kernel and on
/// the portable one, the latter by reason where the node's launches allowed the sm_90a
/// kernel (`OpImpl::sm90a_fallback`). `info --size` prints it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct KernelCensus {
    pub ops: BTreeMap<&'static str, OpKernels>,
}

/// One op family's part of a [`KernelCensus`].
#[derive(Clone, Debug, Default, PartialEq)]
pub struct OpKernels {
    /// Executions on the vendor library (cuBLASLt) the tuning table chose.
    pub vendor: usize,
    pub sm90a: usize,
    /// The sm_90a executions by kernel variant (the GEMM's tile width: `n64`, `n128`, `n256`).
    pub sm90a_variants: BTreeMap<String, usize>,
    pub portable: usize,
    /// The portable executions where the target allowed the sm_90a kernel, by reason.
    pub fallbacks: BTreeMap<String, usize>,
}

impl KernelCensus {
    /// Adds `runs` executions of `graph`'s launches for `target` (each node counted once per
    /// op family it runs), with the nodes `substitution` runs its own way (the tuning
    /// dispatch of the device, as its sessions would: `device::dry_node_entries`).
    pub fn add(
        &mut self,
        graph: &Graph,
        target: KernelTarget,
        substitution: Option<&dyn DrySubstitution>,
        runs: usize,
    ) -> Result<()> {
        for node in super::device::dry_node_entries(graph, target, substitution)? {
            let mut families: Vec<(&Family, Implementation, String)> = node
                .entries
                .iter()
                .filter_map(|e| {
                    let name = e.name();
                    family_of(&name).map(|(f, imp)| (f, imp, name))
                })
                .collect();
            families.dedup_by_key(|(f, ..)| f.op);
            for (f, imp, name) in families {
                let e = self.ops.entry(f.op).or_default();
                match imp {
                    Implementation::Vendor => e.vendor += runs,
                    Implementation::Sm90a => {
                        e.sm90a += runs;
                        *e.sm90a_variants.entry(sm90a_variant(f, &name)).or_default() += runs;
                    }
                    Implementation::Portable => {
                        e.portable += runs;
                        if let Some(why) = &node.sm90a_fallback {
                            *e.fallbacks.entry(why.clone()).or_default() += runs;
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// One line per op family: `gemm: 12 cublaslt, 120 sm90a (n128: 40, n256: 80), 8 portable
    /// (reason: 8)`, the vendor count for the families that have one.
    pub fn lines(&self) -> Vec<String> {
        let listed = |parts: Vec<String>, sep: &str| match parts.is_empty() {
            true => String::new(),
            false => format!(" ({})", parts.join(sep)),
        };
        self.ops
            .iter()
            .map(|(op, k)| {
                let count = |(w, n): (&String, &usize)| format!("{w}: {n}");
                // Shorter names first: n64 before n128.
                let mut variants: Vec<_> = k.sm90a_variants.iter().collect();
                variants.sort_by_key(|(w, _)| w.len());
                let variants = listed(variants.into_iter().map(count).collect(), ", ");
                let why = listed(k.fallbacks.iter().map(count).collect(), "; ");
                let has_vendor = FAMILIES.iter().any(|f| f.op == *op && f.vendor.is_some());
                let vendor = match has_vendor {
                    true => format!("{} cublaslt, ", k.vendor),
                    false => String::new(),
                };
                format!(
                    "{op}: {vendor}{} sm90a{variants}, {} portable{why}",
                    k.sm90a, k.portable
                )
            })
            .collect()
    }
}

/// Counts the GEMM and attention kernel launches of a session's launch list.
pub(crate) fn count_launches(entries: &[Entry]) {
    for e in entries {
        if let Some((f, imp)) = e.kernel().and_then(|l| family_of(l.kernel.name())) {
            f.placed[1].fetch_add(1, Ordering::Relaxed);
            if imp == Implementation::Sm90a {
                f.placed[0].fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_accepts_the_three_names_and_rejects_others() {
        use KernelChoice::*;
        assert_eq!(
            KernelChoice::parse("portable").unwrap(),
            KernelChoice::Portable
        );
        assert_eq!(KernelChoice::parse("").unwrap(), KernelChoice::Auto);
        assert_eq!(KernelChoice::default(), KernelChoice::Auto);
        for c in [Portable, Sm90a, Auto] {
            assert_eq!(KernelChoice::parse(c.name()).unwrap(), c);
        }
        assert_eq!(KernelChoice::parse("sm90a").unwrap(), KernelChoice::Sm90a);
        assert_eq!(KernelChoice::parse(" auto ").unwrap(), KernelChoice::Auto);
        let e = KernelChoice::parse("hopper").unwrap_err().to_string();
        assert!(
            e.contains("UPX_KERNELS") && e.contains("portable, sm90a or auto"),
            "{e}"
        );
    }

    #[test]
    fn the_choice_per_target() {
        let cuda = |cc| KernelTarget {
            backend: Some(BackendKind::Cuda),
            compute_capability: Some(cc),
            sms: 132,
            choice: None,
            gemm_tile_n: None,
        };
        let (h100, a100, blackwell) = (cuda((9, 0)), cuda((8, 0)), cuda((10, 0)));
        let sim = KernelTarget::hostsim();
        let none = KernelTarget::default();
        use KernelChoice::*;
        for t in [&h100, &a100, &blackwell, &sim, &none] {
            assert!(!Portable.allows_sm90a(t), "{t:?}");
        }
        assert!(Sm90a.allows_sm90a(&h100) && Sm90a.allows_sm90a(&sim));
        assert!(!Sm90a.allows_sm90a(&a100) && !Sm90a.allows_sm90a(&blackwell));
        // Under auto only the tuning dispatch picks the Hopper kernels (by forcing sm90a).
        for t in [&h100, &a100, &blackwell, &sim, &none] {
            assert!(!Auto.allows_sm90a(t), "{t:?}");
        }
        assert!(!Sm90a.allows_sm90a(&none));
        // An explicit choice wins over the environment; no backend never runs sm90a.
        assert!(sim.with_choice(Sm90a).sm90a_allowed().unwrap());
        assert!(!sim.with_choice(Portable).sm90a_allowed().unwrap());
        assert!(!none.with_choice(Sm90a).sm90a_allowed().unwrap());
        assert_eq!(sim.with_choice(Auto).kernel_choice().unwrap(), Auto);
        // Why not, for listings.
        let why = |t: KernelTarget, c| t.why_not_sm90a(c).unwrap_or_default();
        assert!(why(a100, Sm90a).contains("compute capability 9.0, this is 8.0"));
        assert!(why(h100, Auto).contains("tuning table"));
        assert!(why(h100, Portable).contains("UPX_KERNELS=portable"));
        assert_eq!(sim.why_not_sm90a(Sm90a), None);
        assert_eq!(h100.why_not_sm90a(Sm90a), None);
    }

    /// `info`'s listing: a graph with a GEMM, an attention of head dim 64 (it qualifies) and
    /// one of head dim 16 (there is no sm_90a kernel for it), counted per run.
    #[test]
    fn the_census_counts_each_op_on_its_kernel_with_the_fallback_reasons() {
        use crate::ops::attention::Attention;
        use crate::ops::gemm::Gemm;
        use crate::tensor::DType;
        let mut g = Graph::new();
        let a = g.input("a", &[2, 40, 72], DType::BF16).unwrap();
        let w = g.weight("w", &[24, 72], DType::BF16).unwrap();
        let gemm = Gemm {
            bias: false,
            gelu: false,
            residual: false,
            out: DType::BF16,
        };
        g.op1(gemm, &[a, w]).unwrap();
        for (heads, d) in [(3, 64), (2, 16)] {
            let qkv = g.input(&format!("qkv{d}"), &[2, 37, 3 * heads * d], DType::BF16);
            let attention = Attention {
                heads,
                causal: false,
                extra_kv: false,
                key_mask: false,
                out: DType::BF16,
            };
            g.op1(attention, &[qkv.unwrap()]).unwrap();
        }
        let census = |target: KernelTarget| {
            let mut c = KernelCensus::default();
            c.add(&g, target, None, 5).unwrap();
            c
        };
        let forced = census(KernelTarget::hostsim().with_choice(KernelChoice::Sm90a));
        let (gemm, attention) = (&forced.ops["gemm"], &forced.ops["attention"]);
        assert_eq!((gemm.sm90a, gemm.portable), (5, 0));
        assert!(gemm.fallbacks.is_empty());
        assert_eq!((attention.sm90a, attention.portable), (5, 5));
        let (why, n) = attention.fallbacks.iter().next().unwrap();
        assert!(why.contains("head dim 16"), "{why}");
        assert_eq!((attention.fallbacks.len(), *n), (1, 5));
        let lines = forced.lines();
        // The GEMM's tile width: the modelled one, or the one the target names.
        let modelled = crate::ops::gemm_sm90a::TileWidth::for_shape(80, 24, 132).columns();
        assert_eq!(
            lines[1],
            format!("gemm: 0 cublaslt, 5 sm90a (n{modelled}: 5), 0 portable"),
            "{lines:?}"
        );
        assert!(lines[0].starts_with("attention: 5 sm90a (d64: 5), 5 portable (head dim 16"));
        let named = census(
            KernelTarget::hostsim()
                .with_choice(KernelChoice::Sm90a)
                .with_gemm_tile_n(256),
        );
        assert_eq!(
            named.lines()[1],
            "gemm: 0 cublaslt, 5 sm90a (n256: 5), 0 portable"
        );
        // Portable: every op on the portable kernel, no reasons to give.
        let portable = census(KernelTarget::hostsim().with_choice(KernelChoice::Portable));
        assert_eq!(portable.ops["gemm"].portable, 5);
        assert_eq!(portable.ops["attention"].portable, 10);
        assert!(portable
            .ops
            .values()
            .all(|k| k.sm90a == 0 && k.fallbacks.is_empty()));
    }
}
