#![no_main]
//! Fuzz target: `ultrapixel::fuzzing::safetensors` (see src/fuzzing.rs).
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| ultrapixel::fuzzing::safetensors(data));
