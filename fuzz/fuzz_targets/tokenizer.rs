#![no_main]
//! Fuzz target: `ultrapixel::fuzzing::tokenizer` (see src/fuzzing.rs).
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| ultrapixel::fuzzing::tokenizer(data));
