//! `ultrapixel validate`: golden case files against this build, output by output.

use super::backend_arg::BackendArg;
use super::tally::Tally;
use crate::Result;

#[derive(clap::Args, Debug)]
pub struct ValidateArgs {
    /// Where to run: cpu uses the f32 tolerances, hostsim and cuda (bf16 kernels) the bf16 rule.
    #[arg(long, value_enum, default_value_t = BackendArg::Cpu)]
    pub backend: BackendArg,
    /// Case files (safetensors).
    #[arg(required = true)]
    pub cases: Vec<std::path::PathBuf>,
}

/// `validate`: every case is read first, so a bad file stops the run before any work (exit 2);
/// a case that fails to run counts as failed, with its error.
pub fn validate(a: ValidateArgs) -> Result<i32> {
    let cases = a
        .cases
        .iter()
        .map(|p| crate::golden::Case::load(p))
        .collect::<Result<Vec<_>>>()?;
    if let Some(c) = cases
        .iter()
        .find(|c| !crate::golden::SUPPORTED_KINDS.contains(&c.module.as_str()))
    {
        return Err(crate::Error::Case {
            case: c.path.display().to_string(),
            message: format!(
                "unknown or unsupported case kind `{}` (this build runs: {})",
                c.module,
                crate::golden::SUPPORTED_KINDS.join(", ")
            ),
        });
    }
    let backend = super::backend_arg::open(a.backend)?;
    let mut tally = Tally::default();
    let (sm90a_before, gemms_before) = crate::runtime::kernel_choice::gemm_launch_counts();
    let (attn_sm90a_before, attns_before) =
        crate::runtime::kernel_choice::attention_launch_counts();
    for case in &cases {
        match crate::golden::run_case(case, &backend) {
            Ok(checks) => {
                for c in checks {
                    let ok = c.passed();
                    println!(
                        "{:<24} {:<24} {} {:.3e} <= {:.3e}  {}",
                        c.case,
                        c.output,
                        c.rule,
                        c.error,
                        c.limit,
                        if ok { "PASS" } else { "FAIL" }
                    );
                    tally.add(ok);
                }
            }
            Err(e) => {
                println!("{:<24} {:<24} FAIL ({e})", case.path.display(), "-");
                tally.add(false);
            }
        }
    }
    let (sm90a, gemms) = crate::runtime::kernel_choice::gemm_launch_counts();
    println!(
        "GEMM launches on the sm_90a kernel: {} of {} (UPX_KERNELS={})",
        sm90a - sm90a_before,
        gemms - gemms_before,
        std::env::var(crate::runtime::kernel_choice::ENV).unwrap_or_else(|_| {
            crate::runtime::kernel_choice::KernelChoice::default()
                .name()
                .into()
        })
    );
    let (attn_sm90a, attns) = crate::runtime::kernel_choice::attention_launch_counts();
    println!(
        "attention launches on the sm_90a kernel: {} of {}",
        attn_sm90a - attn_sm90a_before,
        attns - attns_before,
    );
    Ok(tally.finish())
}
