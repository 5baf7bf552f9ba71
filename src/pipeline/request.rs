//! What to generate: prompt, size, steps and CFG per stage, seeds, output names, all validated
//! before any model is touched, with errors that say what would be accepted instead.

use super::control::{Control, CONTROL_CFG_C, PROMPT_SUFFIX};
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

/// Output sides are multiples of this: Stage B's latent is ceil(side/4) and its patch size 2
/// needs that latent even (docs/MODEL.md §1.3).
pub const SIDE_STEP: u32 = 8;
/// Smallest accepted side.
pub const MIN_SIDE: u32 = 512;
/// Largest accepted side (UltraPixel's advertised 6K).
pub const MAX_SIDE: u32 = 6144;
/// Below this side length the low-res guidance pass (≈ 1024² pixels) is larger than the
/// output itself, and UltraPixel brings nothing over plain Stable Cascade.
pub const RECOMMENDED_MIN_SIDE: u32 = 1024;

/// Output size in pixels, written and parsed as `WIDTHxHEIGHT` (the A1111 order).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Size {
    pub width: u32,
    pub height: u32,
}

impl Size {
    /// A validated size: both sides multiples of 8 in 512..=6144, any aspect ratio.
    pub fn new(width: u32, height: u32) -> Result<Size> {
        let size = Size { width, height };
        if side_is_valid(width) && side_is_valid(height) {
            return Ok(size);
        }
        let nearest: Vec<String> = size.nearest_valid().iter().map(|s| s.to_string()).collect();
        Err(Error::InvalidArgument(format!(
            "size {size} is not supported: each side must be a multiple of {SIDE_STEP} from \
             {MIN_SIDE} to {MAX_SIDE}; nearest valid: {}",
            nearest.join(" or ")
        )))
    }

    /// Parses `WIDTHxHEIGHT` (`x`, `X` or `×`), e.g. `3840x2160`.
    pub fn parse(text: &str) -> Result<Size> {
        let bad = || {
            Error::InvalidArgument(format!(
                "size `{text}`: expected WIDTHxHEIGHT in pixels, e.g. 2048x2048 or 3840x2160"
            ))
        };
        let (w, h) = text.trim().split_once(['x', 'X', '×']).ok_or_else(bad)?;
        let side = |s: &str| s.trim().parse::<u32>().map_err(|_| bad());
        Size::new(side(w)?, side(h)?)
    }

    /// A warning for sizes the model is not made for, if any.
    pub fn warning(&self) -> Option<String> {
        (self.width.min(self.height) < RECOMMENDED_MIN_SIDE).then(|| {
            format!(
                "size {self} is below {RECOMMENDED_MIN_SIDE} px on a side: UltraPixel is made for \
                 1K-6K output, smaller images look worse than plain Stable Cascade"
            )
        })
    }

    /// The one or two valid sizes closest to this one (sum of the side differences).
    fn nearest_valid(&self) -> Vec<Size> {
        let mut found: Vec<Size> = Vec::new();
        for &width in &side_candidates(self.width) {
            for &height in &side_candidates(self.height) {
                found.push(Size { width, height });
            }
        }
        let distance = |s: &Size| s.width.abs_diff(self.width) + s.height.abs_diff(self.height);
        found.sort_by_key(|s| (distance(s), s.width, s.height));
        found.truncate(2);
        found
    }
}

fn side_is_valid(side: u32) -> bool {
    (MIN_SIDE..=MAX_SIDE).contains(&side) && side % SIDE_STEP == 0
}

/// The valid sides just below and above `side` (one when they coincide).
fn side_candidates(side: u32) -> Vec<u32> {
    let clamped = side.clamp(MIN_SIDE, MAX_SIDE);
    let down = clamped / SIDE_STEP * SIDE_STEP;
    let up = down
        + if clamped % SIDE_STEP == 0 {
            0
        } else {
            SIDE_STEP
        };
    let mut sides = vec![down.max(MIN_SIDE), up.min(MAX_SIDE)];
    sides.dedup();
    sides
}

impl fmt::Display for Size {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}x{}", self.width, self.height)
    }
}

impl FromStr for Size {
    type Err = Error;
    fn from_str(s: &str) -> Result<Size> {
        Size::parse(s)
    }
}

/// Where the images go: a file name pattern with `{seed}` (the image's seed) and `{n}` (its
/// index in the batch, from 0) placeholders.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutputPattern(String);

impl OutputPattern {
    pub const DEFAULT: &'static str = "ultrapixel-{seed}.png";

    /// Checks the placeholders and the `.png` extension.
    pub fn parse(pattern: &str) -> Result<OutputPattern> {
        let bad = |reason: String| Error::InvalidSetting {
            field: "output",
            value: format!("`{pattern}`"),
            reason,
        };
        let mut rest = pattern;
        while let Some(open) = rest.find('{') {
            let close = rest[open..]
                .find('}')
                .ok_or_else(|| bad("`{` without a closing `}`".into()))?;
            let name = &rest[open + 1..open + close];
            if name != "seed" && name != "n" {
                return Err(bad(format!(
                    "unknown placeholder `{{{name}}}` (known: {{seed}}, {{n}})"
                )));
            }
            rest = &rest[open + close + 1..];
        }
        if rest.contains('}') {
            return Err(bad("`}` without an opening `{`".into()));
        }
        let is_png = std::path::Path::new(pattern)
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("png"));
        if !is_png {
            return Err(bad("output is PNG: the name must end in .png".into()));
        }
        Ok(OutputPattern(pattern.to_string()))
    }

    /// True when every image of a batch gets its own name.
    pub fn distinguishes_images(&self) -> bool {
        self.0.contains("{seed}") || self.0.contains("{n}")
    }

    /// The file name of image `n` of a batch, whose seed is `seed`.
    pub fn path(&self, seed: u64, n: u32) -> PathBuf {
        PathBuf::from(
            self.0
                .replace("{seed}", &seed.to_string())
                .replace("{n}", &n.to_string()),
        )
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Default for OutputPattern {
    fn default() -> Self {
        OutputPattern(Self::DEFAULT.to_string())
    }
}

/// Steps and classifier-free guidance scale of one sampling stage.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct StageSettings {
    pub steps: u32,
    pub cfg: f32,
}

/// Steps accepted per stage: more is never useful and usually a typo.
pub const MAX_STEPS: u32 = 1000;
/// CFG scales accepted (0 and 1 switch guidance off).
pub const MAX_CFG: f32 = 100.0;
/// Images per run.
pub const MAX_BATCH: u32 = 1000;

/// One text-to-image job. Defaults are the official inference settings (docs/MODEL.md §1.4).
#[derive(Clone, Debug, PartialEq)]
pub struct Request {
    pub prompt: String,
    pub negative_prompt: String,
    pub size: Size,
    /// Stage C: used by both the low-res guidance pass and the high-res pass.
    pub stage_c: StageSettings,
    pub stage_b: StageSettings,
    /// Seed of image 0; image k uses `seed + k`. `None`: drawn at random by [`Request::seeds`].
    pub seed: Option<u64>,
    pub batch: u32,
    pub output: OutputPattern,
    /// ControlNet conditioning ([`Request::set_control`]); the pipeline needs the ControlNet
    /// loaded ([`super::PipelineOptions::control`]).
    pub control: Option<Control>,
}

impl Request {
    pub const DEFAULT_STAGE_C: StageSettings = StageSettings {
        steps: 20,
        cfg: 4.0,
    };
    pub const DEFAULT_STAGE_B: StageSettings = StageSettings {
        steps: 10,
        cfg: 1.1,
    };
    pub const DEFAULT_SIZE: Size = Size {
        width: 2048,
        height: 2048,
    };

    /// A request for `prompt` with every other setting at its default.
    pub fn new(prompt: impl Into<String>) -> Request {
        Request {
            prompt: prompt.into(),
            negative_prompt: String::new(),
            size: Self::DEFAULT_SIZE,
            stage_c: Self::DEFAULT_STAGE_C,
            stage_b: Self::DEFAULT_STAGE_B,
            seed: None,
            batch: 1,
            output: OutputPattern::default(),
            control: None,
        }
    }

    /// Conditions the request on `control` with the official script's settings: Stage C's
    /// CFG becomes 1 (set `stage_c.cfg` afterwards for another), and generation samples
    /// Stage C at shift 2 and appends " high quality" to the prompt.
    pub fn set_control(&mut self, control: Control) {
        self.stage_c.cfg = CONTROL_CFG_C;
        self.control = Some(control);
    }

    /// The prompt the text encoder gets: with control, the official suffix appended.
    pub fn encoded_prompt(&self) -> String {
        match self.control {
            Some(_) => format!("{}{PROMPT_SUFFIX}", self.prompt),
            None => self.prompt.clone(),
        }
    }

    /// Checks everything that can be checked without the models; returns the warnings to show.
    pub fn validate(&self) -> Result<Vec<String>> {
        let invalid = |field, value: String, reason: String| {
            Err(Error::InvalidSetting {
                field,
                value,
                reason,
            })
        };
        if self.prompt.trim().is_empty() {
            return Err(Error::InvalidArgument("the prompt is empty".into()));
        }
        // Sizes built field by field bypass Size::new.
        Size::new(self.size.width, self.size.height)?;
        for (field, s) in [("stage_c", &self.stage_c), ("stage_b", &self.stage_b)] {
            if !(1..=MAX_STEPS).contains(&s.steps) {
                return invalid(
                    if field == "stage_c" {
                        "stage_c.steps"
                    } else {
                        "stage_b.steps"
                    },
                    s.steps.to_string(),
                    format!("must be from 1 to {MAX_STEPS}"),
                );
            }
            if !(s.cfg.is_finite() && (0.0..=MAX_CFG).contains(&s.cfg)) {
                return invalid(
                    if field == "stage_c" {
                        "stage_c.cfg"
                    } else {
                        "stage_b.cfg"
                    },
                    s.cfg.to_string(),
                    format!("must be a number from 0 to {MAX_CFG}"),
                );
            }
        }
        if !(1..=MAX_BATCH).contains(&self.batch) {
            return invalid(
                "batch",
                self.batch.to_string(),
                format!("must be from 1 to {MAX_BATCH}"),
            );
        }
        if let Some(seed) = self.seed {
            if seed.checked_add(u64::from(self.batch - 1)).is_none() {
                return invalid(
                    "seed",
                    seed.to_string(),
                    format!(
                        "with a batch of {}, the last image's seed (seed + {}) overflows 64 bits",
                        self.batch,
                        self.batch - 1
                    ),
                );
            }
        }
        if let Some(c) = &self.control {
            c.validate()?;
        }
        if self.batch > 1 && !self.output.distinguishes_images() {
            return invalid(
                "output",
                format!("`{}`", self.output.as_str()),
                format!(
                    "would give all {} images the same name: add {{seed}} or {{n}}",
                    self.batch
                ),
            );
        }
        Ok(self.size.warning().into_iter().collect())
    }

    /// The seed of every image of the batch: image k uses `seed + k`, so any image can be
    /// made again alone with `--seed <its seed> --batch 1`. A missing seed is drawn here
    /// (32 bits, easy to retype); call once and report the result.
    pub fn seeds(&self) -> Vec<u64> {
        let base = self
            .seed
            .unwrap_or_else(|| u64::from(rand::random::<u32>()));
        (0..u64::from(self.batch))
            .map(|k| base.saturating_add(k))
            .collect()
    }
}

/// A request setting's error under the name a front end gives its field (`stage_c.steps` is
/// `--steps-c` on the command line and `steps` in the A1111 API): the same message, with the
/// field renamed by `name` (which returns the field itself where the front end has no other).
pub fn rename_setting(e: Error, name: impl Fn(&'static str) -> &'static str) -> Error {
    match e {
        Error::InvalidSetting {
            field,
            value,
            reason,
        } => Error::InvalidArgument(format!("{} {value}: {reason}", name(field))),
        e => e,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_sizes_parse_in_any_aspect() {
        for (text, w, h) in [
            ("3840x2160", 3840, 2160),
            ("512X6144", 512, 6144),
            ("2048 × 2048", 2048, 2048),
            ("5120x2560", 5120, 2560),
        ] {
            let s = Size::parse(text).unwrap();
            assert_eq!((s.width, s.height), (w, h), "{text}");
            assert_eq!(Size::parse(&s.to_string()).unwrap(), s);
        }
        assert!(Size::parse("512x512").unwrap().warning().is_some());
        assert!(Size::parse("1024x4096").unwrap().warning().is_none());
    }

    #[test]
    fn each_rejected_size_names_the_nearest_valid_ones() {
        for (text, nearest) in [
            ("1001x1000", "1000x1000"),
            ("100x100", "512x512"),
            ("7000x512", "6144x512"),
            ("1020x2048", "1016x2048 or 1024x2048"),
            ("0x0", "512x512"),
        ] {
            let err = Size::parse(text).unwrap_err().to_string();
            assert!(
                err.contains("multiple of 8 from 512 to 6144"),
                "{text}: {err}"
            );
            assert!(
                err.contains(&format!("nearest valid: {nearest}")),
                "{text}: {err}"
            );
        }
        for text in ["2048", "axb", "2048x", "-8x512", "2048x2048x3"] {
            let err = Size::parse(text).unwrap_err().to_string();
            assert!(err.contains("expected WIDTHxHEIGHT"), "{text}: {err}");
        }
    }

    #[test]
    fn batch_seeds_are_consecutive_and_drawn_once() {
        let mut r = Request::new("a cat");
        r.seed = Some(41);
        r.batch = 3;
        assert_eq!(r.seeds(), [41, 42, 43]);
        r.seed = None;
        let s = r.seeds();
        assert_eq!(s[1], s[0] + 1);
        r.seed = Some(u64::MAX - 1);
        assert!(r.validate().unwrap_err().to_string().contains("overflows"));
    }

    #[test]
    fn settings_out_of_range_and_colliding_names_are_refused() {
        let ok = Request::new("a cat");
        assert!(ok.validate().unwrap().is_empty());
        let cases: Vec<(Request, &str)> = vec![
            (Request::new("   "), "the prompt is empty"),
            (
                Request {
                    stage_c: StageSettings { steps: 0, cfg: 4.0 },
                    ..ok.clone()
                },
                "stage_c.steps 0",
            ),
            (
                Request {
                    stage_b: StageSettings {
                        steps: 10,
                        cfg: f32::NAN,
                    },
                    ..ok.clone()
                },
                "stage_b.cfg NaN",
            ),
            (
                Request {
                    batch: 2,
                    output: OutputPattern::parse("same.png").unwrap(),
                    ..ok.clone()
                },
                "same name",
            ),
            (
                Request {
                    batch: 0,
                    ..ok.clone()
                },
                "batch 0",
            ),
        ];
        for (r, want) in cases {
            let err = r.validate().unwrap_err().to_string();
            assert!(err.contains(want), "{want}: {err}");
        }
    }

    #[test]
    fn control_sets_the_official_cfg_and_suffixes_the_positive_prompt_only() {
        let mut r = Request::new("a lake");
        r.negative_prompt = "blurry".into();
        assert_eq!(r.encoded_prompt(), "a lake");
        let map = crate::tensor::HostTensor::zeros(&[1, 768, 768]);
        r.set_control(Control::canny_map(map).unwrap());
        assert_eq!(r.stage_c.cfg, 1.0);
        assert_eq!(r.encoded_prompt(), "a lake high quality");
        assert_eq!(r.negative_prompt, "blurry");
        assert!(r.validate().is_ok());
        r.control = r.control.map(|c| c.with_strength(3.0));
        let err = r.validate().unwrap_err().to_string();
        assert!(
            err.contains("control.strength") && err.contains('3'),
            "{err}"
        );
    }

    #[test]
    fn output_patterns_fill_seed_and_index() {
        let p = OutputPattern::parse("out/{n}-{seed}.PNG").unwrap();
        assert_eq!(p.path(7, 2), PathBuf::from("out/2-7.PNG"));
        for (bad, why) in [
            ("x.jpg", "must end in .png"),
            ("{prompt}.png", "unknown placeholder `{prompt}`"),
            ("{seed.png", "without a closing"),
            ("seed}.png", "without an opening"),
        ] {
            let err = OutputPattern::parse(bad).unwrap_err().to_string();
            assert!(err.contains(why), "{bad}: {err}");
        }
    }
}
