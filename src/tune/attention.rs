//! The attention candidates of one shape: our portable kernel (`ours/flash`, the reference)
//! and our Hopper kernel (`ours/sm90a`) where the head dim has one and the device runs it
//! (compute capability 9.0, or the emulator), each built from the op for an explicit kernel
//! choice (so neither `UPX_KERNELS` nor a tuning table in use changes what is timed), checked
//! against the portable output and timed like the GEMM candidates.

use super::checking::{measure, record, Outputs, Trial};
use super::engine::Engine;
use super::problems::AttentionProblem;
use super::table::{dtype_name, AttentionEntry, OURS, OURS_SM90A};
use crate::bench::{hash, uniform};
use crate::ops::attention_sm90a;
use crate::runtime::device::DeviceBuffer;
use crate::runtime::graph::{DevTensor, LaunchIo, TensorDesc};
use crate::runtime::kernel_choice::KernelChoice;
use crate::runtime::launch::Entry;
use crate::tensor::encode;
use crate::{Error, Result};

/// Seconds an attention is first assumed to take.
fn estimate(flops: f64) -> f64 {
    flops / 2.5e14
}

/// Values for an attention input: random q/k/v; a key mask (f32, 0 = masked) that masks
/// every seventh key but the first of each row.
fn values(desc: &TensorDesc, mask: bool) -> Vec<f32> {
    if mask {
        let keys = desc.shape[desc.shape.len() - 1];
        (0..desc.numel())
            .map(|i| f32::from(i % keys % 7 != 3))
            .collect()
    } else {
        uniform(
            hash(&format!("tune attention {}", desc.name)),
            desc.numel(),
            1.0,
        )
    }
}

/// Checks and times the candidates of one attention shape; its entry with the winner.
pub fn tune_attention(
    engine: &dyn Engine,
    p: &AttentionProblem,
    iterations: &dyn Fn(f64) -> usize,
) -> Result<AttentionEntry> {
    let s = &p.shape;
    let graph = &s.graph;
    let node = match graph.nodes.as_slice() {
        [node] => node,
        nodes => {
            return Err(Error::InvalidArgument(format!(
                "an attention shape is one node, not {}",
                nodes.len()
            )))
        }
    };
    let dev = engine.device();
    let inputs: Vec<&TensorDesc> = node.inputs.iter().map(|&t| graph.desc(t)).collect();
    let outputs: Vec<TensorDesc> = node
        .outputs
        .iter()
        .map(|&t| graph.desc(t).clone())
        .collect();
    let mut held: Vec<DeviceBuffer> = Vec::new();
    for (i, desc) in inputs.iter().enumerate() {
        let buf = dev.alloc(desc.bytes())?;
        let mask = s.op.key_mask && i == inputs.len() - 1;
        dev.write(buf.ptr, &encode(&values(desc, mask), desc.dtype))?;
        held.push(buf);
    }
    let outs = Outputs::new(engine, &outputs)?;
    let launches = |into: &[DeviceBuffer], choice: KernelChoice| -> Result<Vec<Entry>> {
        let io = LaunchIo {
            inputs: inputs
                .iter()
                .zip(&held)
                .map(|(&desc, b)| DevTensor { ptr: b.ptr, desc })
                .collect(),
            outputs: outputs
                .iter()
                .zip(into)
                .map(|(desc, b)| DevTensor { ptr: b.ptr, desc })
                .collect(),
            workspace: 0,
            target: dev.kernel_target().with_choice(choice),
        };
        Ok(super::pair::kernels(node.op.launches(&io)?))
    };
    engine.run(&mut launches(&outs.reference, KernelChoice::Portable)?)?;
    let mut trials = vec![Trial {
        record: record("ours/flash".into(), OURS),
        steps: launches(&outs.candidate, KernelChoice::Portable)?,
    }];
    let hopper = launches(&outs.candidate, KernelChoice::Sm90a)?;
    if hopper
        .iter()
        .any(|e| matches!(e, Entry::Kernel(l) if attention_sm90a::is_sm90a_attention(l)))
    {
        trials.push(Trial {
            record: record("ours/sm90a".into(), OURS_SM90A),
            steps: hopper,
        });
    }
    let (candidates, winner) = measure(
        engine,
        &outs,
        trials,
        s.flops(),
        estimate(s.flops()),
        iterations,
    );
    Ok(AttentionEntry {
        dims: p.key().dims,
        out_dtype: Some(dtype_name(s.op.out).into()),
        uses: p.uses.clone(),
        candidates,
        winner,
    })
}

/// One progress line of a tuned attention.
pub fn progress_line(i: usize, total: usize, p: &AttentionProblem, e: &AttentionEntry) -> String {
    let s = &p.shape;
    let time = |kind: &str| {
        let c = e.candidates.iter().find(|c| c.kind == kind);
        match c {
            None => "-".to_string(),
            Some(c) if !c.ok() => format!("{} ({})", c.status, c.detail.as_deref().unwrap_or("")),
            Some(c) => format!(
                "{:.3} ms ({:.0} TFLOP/s)",
                c.seconds.unwrap_or(0.0) * 1e3,
                c.tflops.unwrap_or(0.0)
            ),
        }
    };
    format!(
        "[{i:>3}/{total}] attention {} ->{}: ours {}, sm90a {} → {}",
        s.label(),
        s.op.out.suffix(),
        time(OURS),
        time(OURS_SM90A),
        if e.winner.is_empty() {
            "none"
        } else {
            &e.winner
        },
    )
}
