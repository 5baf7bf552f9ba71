//! How the tuner accepts a candidate: run on the same inputs as our portable kernel, its
//! outputs compared with ours on the device (more than the bf16 bound away, and it is
//! `wrong`), run again and compared bit for bit with the first run (any difference, and it is
//! `nondeterministic`); then timed. The winner is the fastest accepted candidate, the earlier
//! on a tie, so the order the candidates are tried in (ours first) decides ties.

use super::engine::Engine;
use super::table::{Candidate, OURS};
use crate::ops::gemm_epilogue::{compare_blocks, CompareSummary, TuneCompare};
use crate::runtime::device::DeviceBuffer;
use crate::runtime::graph::{DevTensor, LaunchIo, OpImpl, Role, TensorDesc};
use crate::runtime::launch::Entry;
use crate::tensor::DType;
use crate::verify::Tolerance;
use crate::Result;

/// The bound a candidate must meet against our kernel's output: both are bf16-rounded
/// approximations of the same result (the GRN statistics of bf16-rounded values, attention's
/// softmax of bf16 probabilities), so this is a few bf16 units of the largest value; a wrong
/// algorithm misses it by far.
pub const BOUND: Tolerance = Tolerance {
    atol: 1e-5,
    rtol: 1.6e-2,
};

/// A candidate before it is run: its record and its steps.
pub struct Trial {
    pub record: Candidate,
    pub steps: Vec<Entry>,
}

/// A fresh record of a candidate (`ok` until a check says otherwise).
pub fn record(name: String, kind: &str) -> Candidate {
    Candidate {
        name,
        kind: kind.into(),
        config: None,
        cublaslt: None,
        status: "ok".into(),
        detail: None,
        seconds: None,
        tflops: None,
        max_err: None,
        limit: None,
    }
}

/// The outputs of one problem: our kernel's (the reference), the candidate's, a copy of the
/// candidate's first run (determinism), and the comparison rows.
pub struct Outputs {
    descs: Vec<TensorDesc>,
    pub reference: Vec<DeviceBuffer>,
    pub candidate: Vec<DeviceBuffer>,
    previous: Vec<DeviceBuffer>,
    compare: DeviceBuffer,
}

impl Outputs {
    pub fn new(engine: &dyn Engine, descs: &[TensorDesc]) -> Result<Self> {
        let dev = engine.device();
        let bufs = || -> Result<Vec<DeviceBuffer>> {
            descs.iter().map(|d| dev.alloc(d.bytes())).collect()
        };
        let largest = descs.iter().map(|d| d.numel()).max().unwrap_or(1);
        Ok(Outputs {
            descs: descs.to_vec(),
            reference: bufs()?,
            candidate: bufs()?,
            previous: bufs()?,
            compare: dev.alloc(compare_blocks(largest) * 16)?,
        })
    }

    /// Compares every candidate output with `against` on the device.
    fn compare(
        &self,
        engine: &dyn Engine,
        against: &[DeviceBuffer],
    ) -> Result<Vec<CompareSummary>> {
        let mut v = Vec::new();
        for ((desc, got), want) in self.descs.iter().zip(&self.candidate).zip(against) {
            let rows = compare_blocks(desc.numel());
            let out = TensorDesc {
                name: "compare".into(),
                shape: vec![rows, 4],
                dtype: DType::F32,
                role: Role::Activation,
            };
            let io = LaunchIo {
                inputs: vec![
                    DevTensor { ptr: got.ptr, desc },
                    DevTensor {
                        ptr: want.ptr,
                        desc,
                    },
                ],
                outputs: vec![DevTensor {
                    ptr: self.compare.ptr,
                    desc: &out,
                }],
                workspace: 0,
                target: Default::default(),
            };
            let mut steps: Vec<Entry> = TuneCompare
                .launches(&io)?
                .into_iter()
                .map(Entry::Kernel)
                .collect();
            engine.run(&mut steps)?;
            let mut bytes = vec![0u8; rows * 16];
            engine.device().read(self.compare.ptr, &mut bytes)?;
            v.push(CompareSummary::of(&crate::tensor::decode(
                &bytes,
                DType::F32,
            )));
        }
        Ok(v)
    }

    /// Runs a trial twice: within the bound of ours, and bit-identical across the runs. The
    /// outputs are poisoned first (all ones: NaN in bf16 and f32), so a candidate that leaves
    /// any element unwritten fails instead of passing on an earlier candidate's values.
    pub fn check(&self, engine: &dyn Engine, t: &mut Trial) -> Result<()> {
        for c in &self.candidate {
            engine.device().fill(c.ptr, 0xff, c.bytes)?;
        }
        engine.run(&mut t.steps)?;
        let mut worst = (0f32, 0f32);
        for s in self.compare(engine, &self.reference)? {
            let limit = BOUND.atol + BOUND.rtol * s.max_ref;
            if s.max_err - limit >= worst.0 - worst.1 || worst == (0.0, 0.0) {
                worst = (s.max_err, limit);
            }
            if !s.within(BOUND) {
                t.record.status = "wrong".into();
                t.record.detail = Some(format!(
                    "max error {:.3e} > {:.3e}{}",
                    s.max_err,
                    limit,
                    if s.non_finite > 0 {
                        format!(", {} non-finite", s.non_finite)
                    } else {
                        String::new()
                    }
                ));
            }
        }
        t.record.max_err = Some(worst.0);
        t.record.limit = Some(worst.1);
        if t.record.status != "ok" {
            return Ok(());
        }
        for (prev, cand) in self.previous.iter().zip(&self.candidate) {
            engine.copy(prev.ptr, cand.ptr, cand.bytes)?;
        }
        engine.run(&mut t.steps)?;
        let differing: u64 = self
            .compare(engine, &self.previous)?
            .iter()
            .map(|s| s.differing)
            .sum();
        if differing > 0 {
            t.record.status = "nondeterministic".into();
            t.record.detail = Some(format!("{differing} elements differ between two runs"));
        }
        Ok(())
    }
}

fn tflops(flops: f64, seconds: f64) -> f64 {
    flops / seconds / 1e12
}

/// Checks then times every trial still `ok` (`iterations` of a guessed time: our portable
/// kernel's once timed, else `estimate`); returns the records and the winner's name (empty
/// when none passed).
pub fn measure(
    engine: &dyn Engine,
    outputs: &Outputs,
    trials: Vec<Trial>,
    flops: f64,
    estimate: f64,
    iterations: &dyn Fn(f64) -> usize,
) -> (Vec<Candidate>, String) {
    let mut ours_seconds = None;
    let mut records = Vec::new();
    for mut t in trials {
        if t.record.status == "ok" {
            if let Err(e) = outputs.check(engine, &mut t) {
                t.record.status = "failed".into();
                t.record.detail = Some(e.to_string());
            }
        }
        if t.record.status == "ok" {
            let guess = ours_seconds.unwrap_or(estimate);
            match engine.time(&mut t.steps, iterations(guess)) {
                Ok(s) => {
                    t.record.seconds = Some(s);
                    t.record.tflops = Some(tflops(flops, s));
                    if t.record.kind == OURS && ours_seconds.is_none() {
                        ours_seconds = Some(s);
                    }
                }
                Err(e) => {
                    t.record.status = "failed".into();
                    t.record.detail = Some(e.to_string());
                }
            }
        }
        records.push(t.record);
    }
    let winner = winner(&records);
    (records, winner)
}

/// The fastest candidate that passed its checks, the earlier on a tie (empty: none).
pub fn winner(candidates: &[Candidate]) -> String {
    candidates
        .iter()
        .filter(|c| c.ok())
        .fold(None::<&Candidate>, |best, c| match best {
            Some(b) if b.seconds <= c.seconds => Some(b),
            _ => Some(c),
        })
        .map_or(String::new(), |c| c.name.clone())
}
