//! ptxas's `-v` report: resource use per kernel and architecture, and the notes that say a
//! wgmma pipeline was serialized or a setmaxnreg ignored (C7508, C7511, C7512, C7515 and
//! relatives, "Potential Performance Loss": ptxas prints them as "info", so `-Werror` does not
//! catch them and strict builds look for them here).

#[derive(Default, Clone)]
pub struct PtxasEntry {
    pub kernel: String,
    pub arch: String,
    pub registers: u32,
    pub smem: u32,
    pub stack: u32,
    pub spill_stores: u32,
    pub spill_loads: u32,
}

/// Parses `-Xptxas=-v` output into one entry per (entry function, arch).
pub fn parse(log: &str) -> Vec<PtxasEntry> {
    let mut entries: Vec<PtxasEntry> = Vec::new();
    let mut props_for_current = false;
    for line in log.lines() {
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            let kernel = rest.split('\'').next().unwrap_or("").to_string();
            let arch = rest
                .split("for '")
                .nth(1)
                .and_then(|a| a.split('\'').next());
            entries.push(PtxasEntry {
                kernel,
                arch: arch.unwrap_or("?").to_string(),
                ..Default::default()
            });
            props_for_current = false;
        } else if let Some(rest) = line.split("Function properties for ").nth(1) {
            props_for_current = entries.last().is_some_and(|e| e.kernel == rest.trim());
        } else if line.contains("bytes stack frame") && props_for_current {
            let e = entries.last_mut().unwrap();
            e.stack = number_before(line, "bytes stack frame");
            e.spill_stores = number_before(line, "bytes spill stores");
            e.spill_loads = number_before(line, "bytes spill loads");
        } else if line.contains("Used") && line.contains("registers") {
            if let Some(e) = entries.last_mut() {
                e.registers = number_before(line, "registers");
                e.smem = number_before(line, "bytes smem");
            }
        }
    }
    entries
}

fn number_before(line: &str, unit: &str) -> u32 {
    line.find(unit)
        .and_then(|i| line[..i].split_whitespace().last())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// The lines saying ptxas serialized wgmma instructions ("Potential Performance Loss:
/// wgmma.mma_async instructions are serialized due to ...") or ignored a setmaxnreg
/// ("Potential Performance Loss: 'setmaxnreg' ignored; unable to determine register count at
/// entry").
pub fn performance_losses(log: &str) -> impl Iterator<Item = &str> {
    log.lines()
        .filter(|l| {
            l.contains("Potential Performance Loss")
                || (l.contains("wgmma") && l.contains("serialized"))
        })
        .map(str::trim)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A report as ptxas 13.0 prints it for sm_90a, with a serialization note.
    const LOG: &str = "ptxas info    : (C7511) Potential Performance Loss: wgmma.mma_async instructions are serialized due to insufficient register resources for the wgmma pipeline in the function 'k2'
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'k2' for 'sm_90a'
ptxas info    : Function properties for k2
    8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 90 registers, used 1 barriers, 2048 bytes smem
ptxas info    : Compiling entry function 'k3' for 'sm_80'
ptxas info    : Function properties for k3
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 32 registers
";

    #[test]
    fn the_report_parses_per_kernel_and_arch() {
        let e = parse(LOG);
        assert_eq!(e.len(), 2);
        let k2 = &e[0];
        assert_eq!((k2.kernel.as_str(), k2.arch.as_str()), ("k2", "sm_90a"));
        assert_eq!((k2.registers, k2.smem, k2.stack), (90, 2048, 8));
        assert_eq!((k2.spill_stores, k2.spill_loads), (4, 12));
        assert_eq!(
            (e[1].kernel.as_str(), e[1].arch.as_str(), e[1].registers),
            ("k3", "sm_80", 32)
        );
    }

    #[test]
    fn serialized_wgmma_is_found() {
        let found: Vec<&str> = performance_losses(LOG).collect();
        assert_eq!(found.len(), 1);
        assert!(found[0].contains("C7511"), "{found:?}");
        assert_eq!(
            performance_losses(&LOG[LOG.find("ptxas info    : 0").unwrap()..]).count(),
            0
        );
    }

    #[test]
    fn ignored_setmaxnreg_is_found() {
        let log = "ptxas info    : (C7508) Potential Performance Loss: 'setmaxnreg' ignored; unable to determine register count at entry.\nptxas info    : Used 32 registers\n";
        let found: Vec<&str> = performance_losses(log).collect();
        assert_eq!(found.len(), 1);
        assert!(found[0].contains("setmaxnreg"), "{found:?}");
    }
}
