//! Entry points for the fuzz targets (`fuzz/`, `tools/fuzz.sh`): every parser that reads
//! input a user or a file controls, from raw bytes. Each must return (an error is fine),
//! never panic, hang or allocate beyond what its input can hold.

use crate::models::config::{parse, StageBConfig, StageCConfig};
use crate::pipeline::request::{OutputPattern, Size};
use crate::weights::SafetensorsFile;
use std::io::Cursor;
use std::path::Path;
use std::sync::OnceLock;

/// The safetensors header and offset validation, then every tensor's decode.
pub fn safetensors(data: &[u8]) {
    if let Ok(f) = SafetensorsFile::from_bytes("fuzz.safetensors", data.to_vec()) {
        let keys: Vec<String> = f.keys().map(str::to_string).collect();
        for k in keys {
            let _ = crate::models::Checkpoint::tensor(&f, &k);
        }
    }
}

/// A PyTorch zip checkpoint: the zip reader, the restricted unpickler, the strided copies.
pub fn torch_zip(data: &[u8]) {
    let _ = crate::weights::read_torch_zip_from(
        Path::new("fuzz.pt"),
        Cursor::new(data),
        data.len() as u64,
    );
}

/// A pickle alone, through the state-dict interpretation.
pub fn pickle(data: &[u8]) {
    if let Ok(u) = crate::weights::unpickle(data) {
        let _ = u.state_dict();
    }
}

/// A prompt through the CLIP tokenizer and the framing.
pub fn tokenizer(data: &[u8]) {
    static TOKENIZER: OnceLock<crate::text::Tokenizer> = OnceLock::new();
    let t = TOKENIZER.get_or_init(|| crate::text::Tokenizer::clip().expect("embedded tokenizer"));
    if let Ok(tokens) = t.encode(&String::from_utf8_lossy(data)) {
        assert_eq!(tokens.ids.len(), crate::text::CONTEXT);
        // Without added tokens both pooling rules take the first EOS.
        let eos = tokens.ids.iter().position(|&t| t == crate::text::EOS);
        assert_eq!(Some(tokens.pooled_position(crate::text::EOS)), eos);
        let legacy = tokens.pooled_position(crate::text::LEGACY_EOS_TOKEN_ID);
        assert_eq!(Some(legacy), eos);
    }
}

/// The CLI's value parsers: `--size`, `--out`, and the JSON configs.
pub fn cli_values(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    if let Ok(s) = Size::parse(&text) {
        assert_eq!(Size::parse(&s.to_string()).ok(), Some(s));
    }
    if let Ok(p) = OutputPattern::parse(&text) {
        let _ = p.path(u64::MAX, u32::MAX);
    }
    if let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) {
        if let Ok(c) = parse::<StageCConfig>(&v, "fuzz") {
            let _ = c.validate();
        }
        if let Ok(c) = parse::<StageBConfig>(&v, "fuzz") {
            let _ = c.validate();
        }
    }
}

/// A golden case file: the case reader (tensor groups, metadata, config JSON).
pub fn case_file(data: &[u8]) {
    if let Ok(f) = SafetensorsFile::from_bytes("fuzz.safetensors", data.to_vec()) {
        let _ = crate::golden::Case::from_file(Path::new("fuzz.safetensors"), f);
    }
}
