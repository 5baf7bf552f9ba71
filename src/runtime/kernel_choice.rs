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
//!   whatever the table says.
//!
//! A shape that does not qualify (see each op's rules, e.g. `ops::gemm_sm90a::qualifies`)
//! always falls back to the portable kernel.

use super::launch::Entry;
use super::BackendKind;
use crate::{Error, Result};
use std::sync::atomic::{AtomicUsize, Ordering};

/// The value of `UPX_KERNELS`.
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
    /// The choice to apply instead of `UPX_KERNELS` (None: the environment's), for listings
    /// and tests that must not depend on the process environment.
    pub choice: Option<KernelChoice>,
}

impl KernelTarget {
    /// The emulator: it can run every kernel; it pretends to have an H100's 132 SMs.
    pub fn hostsim() -> Self {
        KernelTarget {
            backend: Some(BackendKind::Hostsim),
            compute_capability: None,
            sms: 132,
            choice: None,
        }
    }

    /// This target with `choice` instead of `UPX_KERNELS`.
    pub fn with_choice(self, choice: KernelChoice) -> Self {
        KernelTarget {
            choice: Some(choice),
            ..self
        }
    }

    /// The choice that applies here: the explicit one, else `UPX_KERNELS` (an unparsable value
    /// is an error).
    pub fn kernel_choice(&self) -> Result<KernelChoice> {
        match self.choice {
            Some(c) => Ok(c),
            None => KernelChoice::from_env(),
        }
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

/// A kernel family with a portable and an sm_90a implementation, told apart by name prefix;
/// `placed` counts (sm_90a launches, all launches).
struct Family {
    portable: &'static str,
    sm90a: &'static str,
    placed: [AtomicUsize; 2],
}

impl Family {
    const fn new(portable: &'static str, sm90a: &'static str) -> Self {
        Family {
            portable,
            sm90a,
            placed: [AtomicUsize::new(0), AtomicUsize::new(0)],
        }
    }

    fn counts(&self) -> (usize, usize) {
        (
            self.placed[0].load(Ordering::Relaxed),
            self.placed[1].load(Ordering::Relaxed),
        )
    }

    fn count(&self, name: &str) {
        let sm90a = name.starts_with(self.sm90a);
        if sm90a || name.starts_with(self.portable) {
            self.placed[1].fetch_add(1, Ordering::Relaxed);
        }
        if sm90a {
            self.placed[0].fetch_add(1, Ordering::Relaxed);
        }
    }
}

static FAMILIES: [Family; 2] = [
    Family::new("gemm_bf16_", "gemm_sm90a_"),
    Family::new("attention_d", "attention_sm90a_"),
];

/// Counts the GEMM and attention kernel launches of a session's launch list.
pub(crate) fn count_launches(entries: &[Entry]) {
    for e in entries {
        if let Entry::Kernel(l) = e {
            let name = l.kernel.name();
            FAMILIES.iter().for_each(|f| f.count(name));
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
    }
}
