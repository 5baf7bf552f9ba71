//! For the emulator tests of the Hopper kernels' dispatch: one op's launches built for the
//! emulator under `UPX_KERNELS=sm90a`, the kernels they picked, run on guarded buffers, and
//! the op's CPU reference. (Included by path after `guarded_buf`, whose `Buf` holds the
//! workspace: `#[path = "common/sm90a_op.rs"] mod sm90a_op;`.)

use crate::guarded_buf::Buf;
use ultrapixel::runtime::graph::{DevTensor, LaunchIo, OpImpl, Role, TensorDesc};
use ultrapixel::runtime::hostsim::launch;
use ultrapixel::runtime::kernel_choice::{KernelChoice, KernelTarget};
use ultrapixel::tensor::{DType, HostTensor};
use ultrapixel::Result;

/// A tensor of the op under test: its description, its device address, and its values for
/// the CPU reference (an output's are empty).
pub struct Operand<'a> {
    pub desc: TensorDesc,
    pub ptr: u64,
    pub values: &'a [f32],
}

impl<'a> Operand<'a> {
    pub fn new(name: &str, shape: Vec<usize>, dtype: DType, ptr: u64, values: &'a [f32]) -> Self {
        let desc = TensorDesc {
            name: name.into(),
            shape,
            dtype,
            role: Role::Input,
        };
        Operand { desc, ptr, values }
    }

    fn dev(&self) -> DevTensor<'_> {
        DevTensor {
            ptr: self.ptr,
            desc: &self.desc,
        }
    }
}

/// An op with its inputs and its one output.
pub struct OpCall<'a> {
    pub op: &'a dyn OpImpl,
    pub inputs: Vec<Operand<'a>>,
    pub output: Operand<'a>,
}

impl OpCall<'_> {
    /// Builds the op's launches for the emulator's target under `UPX_KERNELS=sm90a` (a test
    /// binary that uses this forces the Hopper kernels in all its tests), with the workspace
    /// the op asks for when `workspace` (none otherwise), and runs them when `run`: their
    /// kernel names, which say what the dispatch picked.
    pub fn launch(&self, workspace: bool, run: bool) -> Result<Vec<String>> {
        std::env::set_var("UPX_KERNELS", "sm90a");
        let descs: Vec<&TensorDesc> = self.inputs.iter().map(|t| &t.desc).collect();
        let ws = workspace.then(|| Buf::new(self.op.workspace_bytes(&descs, KernelChoice::Sm90a)));
        let io = LaunchIo {
            inputs: self.inputs.iter().map(Operand::dev).collect(),
            outputs: vec![self.output.dev()],
            workspace: ws.as_ref().map_or(0, Buf::addr),
            target: KernelTarget::hostsim(),
        };
        let mut launches = self.op.launches(&io)?;
        let names = launches
            .iter()
            .map(|l| l.kernel.name().to_string())
            .collect();
        if run {
            for l in &mut launches {
                launch(l)?;
            }
        }
        Ok(names)
    }

    /// The op's CPU reference of the output, from the inputs' values.
    pub fn reference(&self) -> Vec<f32> {
        let host: Vec<HostTensor> = self
            .inputs
            .iter()
            .map(|t| HostTensor::new(t.desc.shape.clone(), t.values.to_vec()))
            .collect();
        let refs: Vec<&HostTensor> = host.iter().collect();
        let mut want = vec![HostTensor::zeros(&self.output.desc.shape)];
        self.op.reference(&refs, &mut want).unwrap();
        want.swap_remove(0).data
    }
}
