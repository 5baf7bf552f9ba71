#![no_main]
//! Fuzz target: `ultrapixel::fuzzing::torch_zip` (see src/fuzzing.rs).
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| ultrapixel::fuzzing::torch_zip(data));
