//! The tuning table at run time, on the cuda backend, under `UPX_KERNELS=auto` (the default;
//! `runtime::kernel_choice`): a GEMM node whose tuned winner is cuBLASLt runs cuBLASLt (with
//! its recorded algorithm) in the session's launch list, so in the same CUDA graph as our
//! kernels, followed by our epilogue pass where cuBLASLt cannot fuse the op's epilogue, and
//! preceded by our operand scaling where the op modulates A; a GEMM or attention node whose
//! winner is our Hopper kernel gets the op's launches built for `sm90a`, a GEMM in the tile
//! width of its winner (`ours-sm90a/128x<BN>x64s4`; a GEMM that modulates A gets its scaled
//! A in the node's scratch). Every other node, every node under the built-in rules (no table,
//! a stale one, `UPX_TUNING=off`), and every node under a forced `UPX_KERNELS` (`portable`,
//! `sm90a`: the family is not the table's to choose) runs the op's own launches; under a
//! forced `sm90a` a GEMM whose winner is our Hopper GEMM takes the winner's tile width.
//! The choice depends only on the table, the kernel choice and the node ([`decide`]), so a
//! run is bit-identical to the next. `info --size` lists the same decisions without placing
//! anything ([`Dispatch::listed_entries`], the cuBLASLt calls as stand-ins that name them).
//!
//! Anything that keeps a chosen call from running here (cuBLASLt missing or without a
//! workspace, an algorithm `cublasLtMatmulAlgoCheck` refuses, an inconsistent entry) makes that
//! node run our kernel, with one warning per reason.

use super::pair;
use super::problems::{attention_key, gemm_key, GemmKey};
use super::table::{parse_dtype, AttentionChoice, GemmChoice, LtChoice, Selection};
use crate::ops::gemm_sm90a::TileWidth;
use crate::runtime::cuda::cublaslt::{Algo, Lt, LtCall, LtMatmul, LtSpec};
use crate::runtime::cuda::{CudaDevice, Substitution};
use crate::runtime::device::DrySubstitution;
use crate::runtime::graph::{DevTensor, LaunchIo, Node, OpImpl, TensorDesc};
use crate::runtime::kernel_choice::{KernelChoice, KernelTarget};
use crate::runtime::launch::{Entry, VendorCall};
use crate::tensor::DType;
use crate::Result;
use std::collections::HashSet;
use std::sync::{Arc, Mutex, OnceLock};

/// The per-device state: the selection in use, cuBLASLt once a node needs it.
pub struct Dispatch {
    selection: Selection,
    lt: OnceLock<std::result::Result<Arc<Lt>, String>>,
    warned: Mutex<HashSet<String>>,
}

/// Where the scratch region of a substituted node holds what: the vendor product our
/// epilogue pass reads (its own buffer: the pass's input and output are distinct, `restrict`
/// arrays) and the scaled operand, each 256-byte aligned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ScratchLayout {
    pub product: Option<usize>,
    pub scaled_a: Option<usize>,
    pub bytes: usize,
}

/// How a vendor GEMM is completed: its product's dtype, our operand scaling before it, our
/// epilogue pass after it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PairPlan {
    pub product: DType,
    pub scale_a: bool,
    pub epilogue_pass: bool,
}

impl PairPlan {
    pub fn of(key: &GemmKey, c: &LtChoice) -> PairPlan {
        PairPlan {
            product: parse_dtype(&c.product).unwrap_or(key.out),
            scale_a: c.scale_a,
            epilogue_pass: c.epilogue_pass,
        }
    }
}

/// The scratch a vendor call with this choice needs for this GEMM.
pub fn scratch_layout(key: &GemmKey, c: &LtChoice) -> ScratchLayout {
    plan_layout(key, PairPlan::of(key, c))
}

/// The scratch of a [`PairPlan`] for this GEMM.
pub fn plan_layout(key: &GemmKey, plan: PairPlan) -> ScratchLayout {
    let mut bytes = 0;
    let mut take = |on: bool, size: usize| {
        on.then(|| {
            let at = bytes;
            bytes += pair::aligned(size);
            at
        })
    };
    let product = take(plan.epilogue_pass, key.m * key.n * plan.product.size());
    let scaled_a = take(plan.scale_a, key.m * key.k * DType::BF16.size());
    ScratchLayout {
        product,
        scaled_a,
        bytes,
    }
}

/// The scratch a GEMM needs to run our Hopper kernel: its scaled A where the op modulates A
/// (the kernel has no A modulation; the op scales A into its workspace first).
pub fn sm90a_layout(key: &GemmKey) -> ScratchLayout {
    plan_layout(
        key,
        PairPlan {
            product: key.out,
            scale_a: key.epilogue.scaled_a,
            epilogue_pass: false,
        },
    )
}

/// A GEMM node on our Hopper kernel: its key (its scratch) and the tile width its winner
/// measured fastest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sm90aGemm {
    pub key: GemmKey,
    pub width: TileWidth,
}

/// What a node runs.
#[derive(Clone, Debug, PartialEq)]
pub enum Decision {
    /// The op's own launches, under the target's kernel choice.
    Own,
    /// The table's cuBLASLt winner of this GEMM.
    CublasLt(GemmKey, LtChoice),
    /// Our Hopper kernel: the op's launches built for `sm90a`; where the node is a GEMM, in
    /// the table's tile width, with its scratch ([`sm90a_layout`]).
    Sm90a(Option<Sm90aGemm>),
    /// Under a forced `sm90a`, a GEMM whose winner is our Hopper GEMM: the op's own launches
    /// (its workspace holds a scaled A), the Hopper GEMM in the winner's tile width.
    OwnInWidth(TileWidth),
    /// The table's entry does not fit the node (why): the op's own launches.
    Unfit(String),
}

/// What a node with these inputs runs under `choice` and `selection`. `auto` follows the
/// winner of the node's shape, and the op's own launches (the portable kernels under `auto`)
/// where the selection has none (a shape the table lacks, the built-in rules). The Hopper
/// kernels are not yet measured on hardware, so without a winner saying so `auto` never
/// prefers them; a Hopper GEMM winner runs in the tile width its candidate measured. A forced
/// choice (`portable`, `sm90a`) keeps its family whatever the table says; under `sm90a` a GEMM
/// whose winner is our Hopper GEMM takes the winner's width, every other node the launcher's
/// modelled one.
pub fn decide(
    choice: KernelChoice,
    selection: &Selection,
    op: &dyn OpImpl,
    inputs: &[&TensorDesc],
) -> Decision {
    let gemm = gemm_key(op, inputs).map(|key| (key, selection.gemm(&key)));
    match choice {
        KernelChoice::Portable => return Decision::Own,
        KernelChoice::Sm90a => {
            return match gemm {
                Some((_, Some(GemmChoice::OursSm90a(Some(width))))) => Decision::OwnInWidth(width),
                _ => Decision::Own,
            }
        }
        KernelChoice::Auto => {}
    }
    if let Some((key, winner)) = gemm {
        return match winner {
            Some(GemmChoice::CublasLt(c)) => match inconsistency(&key, &c) {
                None => Decision::CublasLt(key, c),
                Some(why) => {
                    Decision::Unfit(format!("tuning table entry for {}: {why}", key.describe()))
                }
            },
            Some(GemmChoice::OursSm90a(Some(width))) => {
                Decision::Sm90a(Some(Sm90aGemm { key, width }))
            }
            Some(GemmChoice::OursSm90a(None)) => Decision::Unfit(format!(
                "tuning table entry for {}: its sm_90a winner names no tile width of this build",
                key.describe()
            )),
            Some(GemmChoice::Ours(_)) | None => Decision::Own,
        };
    }
    match attention_key(op, inputs).and_then(|key| selection.attention(&key)) {
        Some(AttentionChoice::OursSm90a) => Decision::Sm90a(None),
        Some(AttentionChoice::Ours) | None => Decision::Own,
    }
}

/// Why a recorded choice does not fit the node's GEMM (None: it fits). Tables are written
/// for their keys, so this only catches hand-edited or corrupted tables.
pub fn inconsistency(key: &GemmKey, c: &LtChoice) -> Option<String> {
    let e = key.epilogue;
    let Some(product) = parse_dtype(&c.product) else {
        return Some(format!("unknown product dtype {}", c.product));
    };
    if Algo::from_hex(&c.algo.bytes).is_none() {
        return Some("the algorithm is not 64 hex bytes".into());
    }
    if c.epilogue_pass {
        if c.epilogue != "default" || c.residual_as_c {
            return Some("cuBLASLt's own epilogue with our epilogue pass".into());
        }
        if c.scale_a != e.scaled_a {
            return Some("the operand scaling does not match the op".into());
        }
        if product == DType::BF16 && key.out == DType::F32 {
            return Some("a bf16 product for an f32 output".into());
        }
    } else {
        let bias = match c.epilogue.as_str() {
            "bias" => true,
            "default" => false,
            other => return Some(format!("unknown cuBLASLt epilogue {other}")),
        };
        if !e.vendor_fusable() || bias != e.bias || c.residual_as_c != e.residual {
            return Some(format!(
                "cuBLASLt alone cannot compute the epilogue {}",
                e.name()
            ));
        }
        if product != key.out || c.scale_a {
            return Some("cuBLASLt alone must write the output".into());
        }
    }
    None
}

/// The dispatch of `dev`'s sessions: the selection for its key, installed on first use.
pub fn of(dev: &CudaDevice) -> &Dispatch {
    dev.substitution_or_init(|| Box::new(Dispatch::new(&super::engine::cuda_key(dev.info()))))
        .as_any()
        .downcast_ref()
        .expect("a CUDA device's substitution is the tuning dispatch")
}

impl Substitution for Dispatch {
    fn scratch_bytes(&self, node: &Node, inputs: &[&TensorDesc], choice: KernelChoice) -> usize {
        Dispatch::scratch_bytes(self, node, inputs, choice)
    }

    fn entries(
        &self,
        dev: &CudaDevice,
        node: &Node,
        io: &LaunchIo,
        scratch: u64,
    ) -> Result<Option<Vec<Entry>>> {
        Dispatch::entries(self, dev, node, io, scratch)
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

impl DrySubstitution for Dispatch {
    fn scratch_bytes(&self, node: &Node, inputs: &[&TensorDesc], choice: KernelChoice) -> usize {
        Dispatch::scratch_bytes(self, node, inputs, choice)
    }

    fn entries(
        &self,
        node: &Node,
        io: &LaunchIo,
        scratch: u64,
    ) -> Result<Option<(Vec<Entry>, KernelTarget)>> {
        self.listed_entries(node, io, scratch)
    }
}

impl Dispatch {
    /// The selection for a device with this key (see [`Selection::load_for`]); `UPX_TUNING=off`
    /// forces the built-in rules.
    pub fn new(key: &super::table::TableKey) -> Dispatch {
        Dispatch::with(unless_off(|| Selection::load_for(key)))
    }

    /// The dispatch of a device that uses `selection`.
    pub fn with(selection: Selection) -> Dispatch {
        Dispatch {
            selection,
            lt: OnceLock::new(),
            warned: Mutex::new(HashSet::new()),
        }
    }

    pub fn selection(&self) -> &Selection {
        &self.selection
    }

    fn warn(&self, what: String) {
        if self
            .warned
            .lock()
            .expect("warning set")
            .insert(what.clone())
        {
            eprintln!("warning: {what}; our GEMM kernel runs instead");
        }
    }

    /// [`decide`] for this device's selection, warning once about an unfit entry.
    fn decide(&self, choice: KernelChoice, op: &dyn OpImpl, inputs: &[&TensorDesc]) -> Decision {
        let d = decide(choice, &self.selection, op, inputs);
        if let Decision::Unfit(why) = &d {
            self.warn(why.clone());
        }
        d
    }

    /// Scratch bytes the node needs when it runs a vendor GEMM or the Hopper GEMM of a
    /// `scaled_a` winner in a graph built for `choice` (0 otherwise).
    pub fn scratch_bytes(
        &self,
        node: &Node,
        inputs: &[&TensorDesc],
        choice: KernelChoice,
    ) -> usize {
        match self.decide(choice, node.op.as_ref(), inputs) {
            Decision::CublasLt(key, c) => scratch_layout(&key, &c).bytes,
            Decision::Sm90a(Some(g)) => sm90a_layout(&g.key).bytes,
            Decision::Sm90a(None)
            | Decision::Own
            | Decision::OwnInWidth(_)
            | Decision::Unfit(_) => 0,
        }
    }

    /// [`Self::entries`] for a listing without the device: the cuBLASLt call as a stand-in
    /// that names it (whether this machine's cuBLASLt accepts the algorithm is not checked),
    /// and the target the node's own launches were built for.
    pub fn listed_entries(
        &self,
        node: &Node,
        io: &LaunchIo,
        scratch: u64,
    ) -> Result<Option<(Vec<Entry>, KernelTarget)>> {
        let op = node.op.as_ref();
        let descs: Vec<&TensorDesc> = io.inputs.iter().map(|t| t.desc).collect();
        let decision = self.decide(io.target.kernel_choice()?, op, &descs);
        let entries = match &decision {
            Decision::CublasLt(key, c) => {
                let vendor = Arc::new(ListedLt(lt_spec(key, c).describe()));
                let plan = PairPlan::of(key, c);
                pair_entries(op, key, node.workspace, io, scratch, plan, &mut |_, _| {
                    Ok(Entry::Vendor(vendor.clone()))
                })?
            }
            other => our_entries(other, op, io, scratch)?,
        };
        Ok(entries.map(|e| (e, built_for(&decision, io.target))))
    }

    /// The node's entries under its target's kernel choice ([`decide`]): for a cuBLASLt
    /// winner the scaling pass where the op modulates A, cuBLASLt, the epilogue pass where it
    /// needs one; for a Hopper winner the op's launches built for `sm90a`; None for the op's
    /// own launches.
    pub fn entries(
        &self,
        dev: &CudaDevice,
        node: &Node,
        io: &LaunchIo,
        scratch: u64,
    ) -> Result<Option<Vec<Entry>>> {
        let descs: Vec<&TensorDesc> = io.inputs.iter().map(|t| t.desc).collect();
        let op = node.op.as_ref();
        match self.decide(io.target.kernel_choice()?, op, &descs) {
            Decision::CublasLt(key, c) => self.vendor_entries(dev, node, io, scratch, key, c),
            other => our_entries(&other, op, io, scratch),
        }
    }

    /// The node's entries with the table's cuBLASLt call (None: our kernel, after a warning
    /// where the call cannot run).
    fn vendor_entries(
        &self,
        dev: &CudaDevice,
        node: &Node,
        io: &LaunchIo,
        scratch: u64,
        key: GemmKey,
        c: LtChoice,
    ) -> Result<Option<Vec<Entry>>> {
        let op = node.op.as_ref();
        let lt = match self.lt.get_or_init(|| Lt::open(dev).map(Arc::new)) {
            Ok(lt) => lt.clone(),
            Err(e) => {
                self.warn(format!("the tuning table chose cuBLASLt, but {e}"));
                return Ok(None);
            }
        };
        let layout = scratch_layout(&key, &c);
        if layout.bytes > 0 && scratch == 0 {
            return Ok(None);
        }
        let algo = Algo::from_hex(&c.algo.bytes).expect("checked by inconsistency");
        let spec = lt_spec(&key, &c);
        let bias = if spec.bias {
            io.inputs[pair::bias_index()].ptr
        } else {
            0
        };
        let refused = |why: String| {
            self.warn(format!(
                "cuBLASLt algorithm {} for {}: {why}",
                c.algo.id,
                key.describe()
            ))
        };
        let mm = match LtMatmul::new(spec, bias) {
            Ok(mm) => Arc::new(mm),
            Err(e) => {
                refused(e);
                return Ok(None);
            }
        };
        if let Err(e) = mm.check(&lt, &algo) {
            refused(e);
            return Ok(None);
        }
        let residual = if spec.residual_as_c {
            io.inputs[pair::residual_index(&key)].ptr
        } else {
            0
        };
        let w = io.inputs[1].ptr;
        let entries = pair_entries(
            op,
            &key,
            node.workspace,
            io,
            scratch,
            PairPlan::of(&key, &c),
            &mut |a, d| {
                Ok(Entry::Vendor(Arc::new(LtCall {
                    lt: lt.clone(),
                    mm: mm.clone(),
                    algo,
                    a,
                    w,
                    c: residual,
                    d,
                })))
            },
        )?;
        if entries.is_none() {
            self.warn(format!(
                "the epilogue pass of {} needs more workspace than the node has",
                key.describe()
            ));
        }
        Ok(entries)
    }
}

/// `load()`, unless `UPX_TUNING=off` forces the built-in rules.
pub fn unless_off(load: impl FnOnce() -> Selection) -> Selection {
    match std::env::var("UPX_TUNING").as_deref() {
        Ok("off") => Selection::BuiltIn {
            reason: "UPX_TUNING=off".into(),
        },
        _ => load(),
    }
}

/// The cuBLASLt call of a winner that fits its GEMM ([`inconsistency`] is None).
fn lt_spec(key: &GemmKey, c: &LtChoice) -> LtSpec {
    LtSpec {
        m: key.m,
        n: key.n,
        k: key.k,
        product: parse_dtype(&c.product).expect("checked by inconsistency"),
        bias: c.epilogue == "bias",
        residual_as_c: c.residual_as_c,
    }
}

/// A listed cuBLASLt call: its description alone (a listing runs nothing).
struct ListedLt(String);

impl VendorCall for ListedLt {
    unsafe fn enqueue(&self, _stream: usize) -> Result<()> {
        Err(crate::Error::InvalidArgument(format!(
            "{} was listed, not placed on a device",
            self.0
        )))
    }

    fn describe(&self) -> String {
        self.0.clone()
    }
}

/// The entries of a decision that runs our kernels (None: the op's own launches).
fn our_entries(
    decision: &Decision,
    op: &dyn OpImpl,
    io: &LaunchIo,
    scratch: u64,
) -> Result<Option<Vec<Entry>>> {
    match decision {
        Decision::Sm90a(gemm) => sm90a_entries(op, gemm.as_ref(), io, scratch),
        Decision::OwnInWidth(width) => own_entries_in_width(op, *width, io).map(Some),
        Decision::Own | Decision::Unfit(_) | Decision::CublasLt(..) => Ok(None),
    }
}

/// What a node's own launches are built for under `decision` on `target`: the Hopper kernels
/// forced for a Hopper winner, a GEMM winner's tile width.
fn built_for(decision: &Decision, target: KernelTarget) -> KernelTarget {
    match decision {
        Decision::Sm90a(gemm) => {
            let t = target.with_choice(KernelChoice::Sm90a);
            match gemm {
                Some(g) => t.with_gemm_tile_n(g.width.columns()),
                None => t,
            }
        }
        Decision::OwnInWidth(width) => target.with_gemm_tile_n(width.columns()),
        Decision::Own | Decision::Unfit(_) | Decision::CublasLt(..) => target,
    }
}

/// A node's launches built for `sm90a` (our Hopper kernel where the shape qualifies); a GEMM
/// (`gemm`) in its tile width, with its scaled A in the scratch where the op modulates A
/// ([`sm90a_layout`]); None when that scratch is missing (the op's own launches run).
pub fn sm90a_entries(
    op: &dyn OpImpl,
    gemm: Option<&Sm90aGemm>,
    io: &LaunchIo,
    scratch: u64,
) -> Result<Option<Vec<Entry>>> {
    let mut workspace = io.workspace;
    if let Some(at) = gemm.and_then(|g| sm90a_layout(&g.key).scaled_a) {
        if scratch == 0 {
            return Ok(None);
        }
        workspace = scratch + at as u64;
    }
    let forced = LaunchIo {
        inputs: io.inputs.clone(),
        outputs: io.outputs.clone(),
        workspace,
        target: built_for(&Decision::Sm90a(gemm.copied()), io.target),
    };
    Ok(Some(pair::kernels(op.launches(&forced)?)))
}

/// A node's own launches with the Hopper GEMM in tile width `width` (a forced `sm90a`'s
/// [`Decision::OwnInWidth`]).
pub fn own_entries_in_width(
    op: &dyn OpImpl,
    width: TileWidth,
    io: &LaunchIo,
) -> Result<Vec<Entry>> {
    let io = LaunchIo {
        inputs: io.inputs.clone(),
        outputs: io.outputs.clone(),
        workspace: io.workspace,
        target: built_for(&Decision::OwnInWidth(width), io.target),
    };
    Ok(pair::kernels(op.launches(&io)?))
}

/// A GEMM node's entries with a vendor GEMM: our operand scaling (into the scratch) where the
/// plan says, the vendor call `vendor(a, d)` reading A (or the scaled A) at `a` and writing its
/// product at `d`, then our epilogue pass into the node's outputs. With the pass the product
/// goes to the scratch ([`plan_layout`]); without it, cuBLASLt writes the node's output. None
/// when the pass would need more workspace than the node has (`workspace` bytes at
/// `io.workspace`).
pub fn pair_entries(
    op: &dyn OpImpl,
    key: &GemmKey,
    workspace: usize,
    io: &LaunchIo,
    scratch: u64,
    plan: PairPlan,
    vendor: &mut dyn FnMut(u64, u64) -> Result<Entry>,
) -> Result<Option<Vec<Entry>>> {
    let layout = plan_layout(key, plan);
    let product_desc = pair::product_desc(io.outputs[0].desc, plan.product);
    let product = DevTensor {
        ptr: layout
            .product
            .map_or(io.outputs[0].ptr, |at| scratch + at as u64),
        desc: &product_desc,
    };
    if plan.epilogue_pass {
        let pass_ins: Vec<&TensorDesc> = pair::epilogue_inputs(key, &io.inputs, product)
            .iter()
            .map(|t| t.desc)
            .collect();
        let portable = crate::runtime::kernel_choice::KernelChoice::Portable;
        if pair::epilogue_op(op, key).workspace_bytes(&pass_ins, portable) > workspace {
            return Ok(None);
        }
    }
    let mut entries = Vec::new();
    let mut a = io.inputs[0].ptr;
    let scaled_desc = pair::product_desc(io.inputs[0].desc, DType::BF16);
    if let Some(at) = layout.scaled_a {
        a = scratch + at as u64;
        entries.extend(pair::scale_launches(
            op,
            io,
            DevTensor {
                ptr: a,
                desc: &scaled_desc,
            },
        )?);
    }
    entries.push(vendor(a, product.ptr)?);
    if plan.epilogue_pass {
        entries.extend(pair::epilogue_launches(op, key, io, product)?);
    }
    Ok(Some(entries))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::cuda::cublaslt::AlgoRecord;
    use crate::tune::problems::Epilogue;

    fn choice(
        product: &str,
        epilogue: &str,
        residual_as_c: bool,
        scale_a: bool,
        pass: bool,
    ) -> LtChoice {
        LtChoice {
            product: product.into(),
            epilogue: epilogue.into(),
            residual_as_c,
            scale_a,
            epilogue_pass: pass,
            algo: AlgoRecord {
                bytes: "00".repeat(64),
                id: 0,
                tile_id: 0,
                stages_id: 0,
                splitk: 0,
                reduction_scheme: 0,
                cta_swizzling: 0,
                custom_option: 0,
                inner_shape_id: 0,
                cluster_shape_id: 0,
                workspace_bytes: 0,
                waves: 0.0,
            },
        }
    }

    fn key(e: &str, out: DType) -> GemmKey {
        GemmKey {
            m: 1000,
            n: 320,
            k: 1280,
            samples: 2,
            epilogue: Epilogue::parse(e).unwrap(),
            out,
        }
    }

    #[test]
    fn scratch_holds_the_product_the_pass_reads_and_the_scaled_operand() {
        let k = key("bias+gelu", DType::BF16);
        let l = scratch_layout(&k, &choice("bf16", "default", false, false, true));
        assert_eq!(
            (l.product, l.bytes),
            (Some(0), pair::aligned(1000 * 320 * 2))
        );
        let l = scratch_layout(&k, &choice("f32", "default", false, false, true));
        assert_eq!((l.product, l.scaled_a), (Some(0), None));
        assert_eq!(l.bytes, pair::aligned(1000 * 320 * 4));
        let k = key("bias+residual+scaled_a", DType::F32);
        let l = scratch_layout(&k, &choice("f32", "default", false, true, true));
        let product = pair::aligned(1000 * 320 * 4);
        assert_eq!((l.product, l.scaled_a), (Some(0), Some(product)));
        assert_eq!(l.bytes, product + pair::aligned(1000 * 1280 * 2));
        // cuBLASLt alone writes the output.
        let k = key("bias", DType::BF16);
        assert_eq!(
            scratch_layout(&k, &choice("bf16", "bias", false, false, false)).bytes,
            0
        );
    }

    #[test]
    fn choices_that_do_not_fit_the_gemm_are_refused() {
        let fits = [
            (
                key("bias", DType::BF16),
                choice("bf16", "bias", false, false, false),
            ),
            (
                key("bias+residual", DType::F32),
                choice("f32", "bias", true, false, false),
            ),
            (
                key("none", DType::F32),
                choice("f32", "default", false, false, false),
            ),
            (
                key("bias+gelu+grn_stats", DType::BF16),
                choice("f32", "default", false, false, true),
            ),
            (
                key("bias+residual+scaled_a", DType::F32),
                choice("f32", "default", false, true, true),
            ),
        ];
        for (k, c) in &fits {
            assert_eq!(inconsistency(k, c), None, "{k:?} {c:?}");
        }
        let refused = [
            // GELU needs our pass.
            (
                key("bias+gelu", DType::BF16),
                choice("bf16", "bias", false, false, false),
            ),
            // The bias is missing.
            (
                key("bias", DType::BF16),
                choice("bf16", "default", false, false, false),
            ),
            // The scaling is missing.
            (
                key("bias+scaled_a", DType::F32),
                choice("f32", "default", false, false, true),
            ),
            // A bf16 product cannot give an f32 output.
            (
                key("bias+gelu", DType::F32),
                choice("bf16", "default", false, false, true),
            ),
            (
                key("bias", DType::F32),
                choice("f16", "bias", false, false, false),
            ),
        ];
        for (k, c) in &refused {
            assert!(inconsistency(k, c).is_some(), "{k:?} {c:?}");
        }
        let mut bad = choice("f32", "default", false, false, true);
        bad.algo.bytes = "zz".into();
        assert!(inconsistency(&key("bias+gelu", DType::BF16), &bad).is_some());
    }
}
