//! What the checking commands (verify, validate, tune --check) share: the pass/fail tally
//! that ends their output and sets their exit code, and the `--filter` text match.

/// Passed and failed results.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Tally {
    pub passed: usize,
    pub failed: usize,
}

impl Tally {
    pub fn add(&mut self, ok: bool) {
        if ok {
            self.passed += 1;
        } else {
            self.failed += 1;
        }
    }

    /// Prints the closing `N passed, M failed` line; the exit code: 0 when nothing failed.
    pub fn finish(self) -> i32 {
        println!("{} passed, {} failed", self.passed, self.failed);
        self.exit_code()
    }

    pub fn exit_code(self) -> i32 {
        if self.failed == 0 {
            0
        } else {
            1
        }
    }
}

/// `--filter TEXT`: names containing TEXT; everything without one.
pub fn selected(filter: Option<&str>, name: &str) -> bool {
    filter.is_none_or(|f| name.contains(f))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tally_fails_on_any_failure() {
        let mut t = Tally::default();
        for ok in [true, true, false, true] {
            t.add(ok);
        }
        assert_eq!((t.passed, t.failed, t.exit_code()), (3, 1, 1));
        let mut t = Tally::default();
        t.add(true);
        assert_eq!(t.exit_code(), 0);
        assert_eq!(Tally::default().exit_code(), 0);
    }

    #[test]
    fn a_filter_selects_names_containing_it() {
        assert!(selected(None, "gemm"));
        assert!(selected(Some("em"), "gemm"));
        assert!(!selected(Some("attn"), "gemm"));
    }
}
