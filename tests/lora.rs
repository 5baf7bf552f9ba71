//! LoRAs with learned tokens on the tiny model (`make-tiny-model` writes `lora_tiny`):
//! switching and unloading in a loaded pipeline, scale 0, the learned token rows through the
//! text encoder, bad files, and `generate --lora` on the emulator.

mod common;

use common::tiny_model;
use std::path::{Path, PathBuf};
use std::process::Output;
use ultrapixel::hub::HubOptions;
use ultrapixel::models::config::ClipTextConfig;
use ultrapixel::models::Checkpoint;
use ultrapixel::pipeline::lora::{LoraSet, LoraSpec, ModelShapes};
use ultrapixel::pipeline::stages::{encode_text, RunContext, TextEmbedding};
use ultrapixel::pipeline::tiny::tiny_configs;
use ultrapixel::pipeline::tiny_lora::{TINY_LORA_FILE, TINY_LORA_SHIFTED_WORD, TINY_LORA_TOKEN};
use ultrapixel::pipeline::{LoraUse, ModelDir, Pipeline, PipelineOptions, Request, Size};
use ultrapixel::runtime::{Backend, BackendKind};
use ultrapixel::tensor::HostTensor;
use ultrapixel::text::{Tokenizer, Tokens};
use ultrapixel::weights::{open_checkpoint, SafetensorsFile};

fn lora(dir: &Path, scale: f32) -> LoraSpec {
    LoraSpec::new(dir.join(TINY_LORA_FILE), scale)
}

/// A copy of Stage A's weights (without their config beside them).
fn not_a_lora(dir: &Path) -> PathBuf {
    let to = dir.join("not_a_lora.safetensors");
    std::fs::copy(dir.join("stage_a.safetensors"), &to).unwrap();
    to
}

fn options(dir: &Path) -> PipelineOptions {
    PipelineOptions {
        conversion_cache: dir.join("cache"),
        ..PipelineOptions::default()
    }
}

fn request(prompt: &str) -> Request {
    let mut r = Request::new(prompt);
    r.size = Size::new(512, 512).unwrap();
    (r.stage_c.steps, r.stage_b.steps, r.seed) = (2, 1, Some(11));
    r
}

fn pixels(p: &Pipeline, r: &Request) -> Vec<u8> {
    p.generate(r).unwrap().remove(0).rgb.pixels
}

#[test]
fn switching_and_unloading_loras_in_a_loaded_pipeline_restores_the_base_bit_for_bit() {
    let dir = tiny_model(5);
    let md = ModelDir::resolve(Some(dir.path()), &HubOptions::from_env()).unwrap();
    let cpu = || Backend::open(BackendKind::Cpu).unwrap();
    let r = request(&format!("a photo of {TINY_LORA_TOKEN} on a sofa"));
    let mut p = Pipeline::load(&md, cpu(), options(dir.path())).unwrap();
    let base = pixels(&p, &r);

    p.set_loras(&[lora(dir.path(), 1.0)]).unwrap();
    assert_eq!(p.loras().len(), 1);
    let full = pixels(&p, &r);
    assert_ne!(full, base, "the LoRA changes nothing");
    p.set_loras(&[lora(dir.path(), 0.5)]).unwrap();
    let image = p.generate(&r).unwrap().remove(0);
    let half = image.rgb.pixels;
    assert!(half != full && half != base, "scale 0.5 is neither 1 nor 0");
    let named = LoraUse {
        file: TINY_LORA_FILE.into(),
        scale: 0.5,
    };
    assert_eq!(image.metadata.loras, [named]);

    // A bad file is refused and the LoRA in use stays.
    let bad = not_a_lora(dir.path());
    assert!(p.set_loras(&[LoraSpec::new(bad, 1.0)]).is_err());
    assert_eq!(pixels(&p, &r), half);

    p.set_loras(&[]).unwrap();
    assert!(p.loras().is_empty());
    assert_eq!(pixels(&p, &r), base, "unloading does not restore the base");
    p.set_loras(&[lora(dir.path(), 1.0)]).unwrap();
    assert_eq!(pixels(&p, &r), full, "loading again differs");

    // Scale 0, from the start: no LoRA at all.
    let zero = PipelineOptions {
        loras: vec![lora(dir.path(), 0.0)],
        ..options(dir.path())
    };
    let p0 = Pipeline::load(&md, cpu(), zero).unwrap();
    let image = p0.generate(&r).unwrap().remove(0);
    assert_eq!(image.rgb.pixels, base, "scale 0 differs from no LoRA");
    assert!(image.metadata.loras.is_empty());
}

/// The tiny text encoder on the cpu backend.
fn encode(weights: &dyn Checkpoint, cfg: &ClipTextConfig, tokens: &[Tokens]) -> TextEmbedding {
    let backend = Backend::open(BackendKind::Cpu).unwrap();
    let ctx = RunContext {
        backend: &backend,
        options: Default::default(),
        record: false,
        weights: None,
        sessions: None,
    };
    encode_text(&ctx, weights, cfg, tokens).unwrap()
}

/// A checkpoint serving `table` as the token embedding and `base` for the rest.
struct WithTable<'a> {
    base: &'a dyn Checkpoint,
    table: HostTensor,
}

impl Checkpoint for WithTable<'_> {
    fn tensor(&self, key: &str) -> ultrapixel::Result<HostTensor> {
        if key == "text_model.embeddings.token_embedding.weight" {
            return Ok(self.table.clone());
        }
        self.base.tensor(key)
    }
}

#[test]
fn the_trigger_word_changes_the_text_encoder_exactly_by_the_learned_rows() {
    let dir = tiny_model(6);
    let cfg = tiny_configs().text;
    let weights = open_checkpoint(&[dir.path().join("text_encoder/model.safetensors")]).unwrap();
    let manifest = ultrapixel::models::stage_c::manifest(&tiny_configs().stage_c, true).unwrap();
    let shapes = ModelShapes {
        stage_c: &manifest,
        text_width: cfg.hidden_size,
        vocab: cfg.vocab_size,
    };
    let set = LoraSet::load(&[lora(dir.path(), 1.0)], &shapes, &dir.path().join("cache")).unwrap();
    let tokenizer = set.tokenizer().expect("the LoRA adds a token");
    let plain = Tokenizer::clip().unwrap();
    let prompt = format!("a {TINY_LORA_TOKEN} chasing a dog");
    let ids = tokenizer.encode(&prompt).unwrap();
    let new_id = cfg.vocab_size as u32;
    let dog = plain
        .vocab_matching(&format!("^{TINY_LORA_SHIFTED_WORD}$"))
        .unwrap()[0];
    let cat = plain.vocab_matching("^cat</w>$").unwrap()[0];
    assert_eq!(
        ids.ids.iter().filter(|&&t| t == new_id).count(),
        1,
        "the trigger word is one token: {:?}",
        &ids.ids[..10]
    );
    assert!(ids.ids.contains(&dog));

    // The expected table, from the file's tensors: cat's row plus the first offset as the
    // new row, the second offset added to dog's row.
    let file = SafetensorsFile::open(dir.path().join(TINY_LORA_FILE)).unwrap();
    let n = file.keys().filter(|k| k.ends_with("lora_down")).count();
    let offsets = file.tensor(&format!("module.{n}.embeddings")).unwrap();
    let w = cfg.hidden_size;
    let mut table = weights
        .tensor("text_model.embeddings.token_embedding.weight")
        .unwrap()
        .data;
    let cat_row = table[cat as usize * w..(cat as usize + 1) * w].to_vec();
    table.extend(cat_row.iter().zip(&offsets.data[..w]).map(|(a, b)| a + b));
    for (a, b) in table[dog as usize * w..(dog as usize + 1) * w]
        .iter_mut()
        .zip(&offsets.data[w..])
    {
        *a += b;
    }
    let grown_cfg = ClipTextConfig {
        vocab_size: cfg.vocab_size + 1,
        ..cfg.clone()
    };
    let expected = WithTable {
        base: &weights,
        table: HostTensor::new(vec![cfg.vocab_size + 1, w], table),
    };
    let (lora_cfg, lora_weights) = set.text(&cfg, &weights);
    assert_eq!(lora_cfg, grown_cfg);
    let got = encode(&lora_weights, &lora_cfg, std::slice::from_ref(&ids));
    let want = encode(&expected, &grown_cfg, std::slice::from_ref(&ids));
    assert_eq!(got.hidden.data, want.hidden.data);
    assert_eq!(got.pooled.data, want.pooled.data);

    // Without the trigger word or a shifted word, the encoder is the base one exactly.
    let other = plain.encode("a bird on a branch").unwrap();
    assert_eq!(tokenizer.encode("a bird on a branch").unwrap(), other);
    let base = encode(&weights, &cfg, std::slice::from_ref(&other));
    let with = encode(&lora_weights, &lora_cfg, std::slice::from_ref(&other));
    assert_eq!(with.hidden.data, base.hidden.data);
    assert_eq!(with.pooled.data, base.pooled.data);
    // With it, it is not.
    let without = encode(&weights, &cfg, &[plain.encode(&prompt).unwrap()]);
    assert_ne!(got.hidden.data, without.hidden.data);
}

/// A quick `generate` of the tiny model with the LoRA's trigger word in the prompt.
fn cli_generate(model: &Path, out: &Path, backend: &str, extra: &[&str]) -> Output {
    let args = [extra, &["--seed", "4", "a portrait of [tinycat]"]].concat();
    common::quick_generate(model, out, backend, &args)
}

#[test]
fn a_lora_that_does_not_fit_fails_the_cli_naming_its_keys_and_writes_nothing() {
    let dir = tiny_model(7);
    let out = tempfile::tempdir().unwrap();
    let png = out.path().join("x.png");
    // Stage A's weights are no LoRA: every key is listed.
    let bad = not_a_lora(dir.path());
    let arg = format!("{}:0.7", bad.display());
    let o = cli_generate(dir.path(), &png, "cpu", &["--lora", &arg]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    let file = SafetensorsFile::open(&bad).unwrap();
    for key in file.keys() {
        assert!(
            err.contains(&format!("{key}: not a LoRA tensor name")),
            "{key}: {err}"
        );
    }
    assert_eq!(std::fs::read_dir(out.path()).unwrap().count(), 0);
    // A missing file is named too.
    let o = cli_generate(
        dir.path(),
        &png,
        "cpu",
        &["--lora", "/nonexistent/l.safetensors"],
    );
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("/nonexistent/l.safetensors"));
    assert_eq!(std::fs::read_dir(out.path()).unwrap().count(), 0);
}

#[cfg(feature = "hostsim")]
#[test]
fn generate_with_the_tiny_lora_on_the_emulator_differs_and_at_scale_0_is_identical() {
    let dir = tiny_model(0);
    let out = tempfile::tempdir().unwrap();
    let path = |n: &str| -> PathBuf { out.path().join(n) };
    let lora = dir.path().join(TINY_LORA_FILE);
    let zero = format!("{}:0", lora.display());
    let runs: [(&str, Vec<&str>); 3] = [
        ("plain.png", vec![]),
        ("lora.png", vec!["--lora", lora.to_str().unwrap()]),
        ("zero.png", vec!["--lora", &zero]),
    ];
    for (name, extra) in &runs {
        let o = cli_generate(dir.path(), &path(name), "hostsim", extra);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    let plain = common::png_image(&path("plain.png"));
    assert_ne!(common::png_image(&path("lora.png")), plain);
    assert_eq!(common::png_image(&path("zero.png")), plain);
}

/// Pickle opcodes for an int, as `torch.save` (protocol 2) writes them.
fn pickle_int(v: usize) -> Vec<u8> {
    match v {
        0..=0xff => vec![b'K', v as u8],
        0x100..=0xffff => [&[b'M'][..], &(v as u16).to_le_bytes()].concat(),
        _ => [&[b'J'][..], &(v as i32).to_le_bytes()].concat(),
    }
}

fn pickle_str(s: &str) -> Vec<u8> {
    [&[b'X'][..], &(s.len() as u32).to_le_bytes(), s.as_bytes()].concat()
}

/// A tuple of ints (built from a mark).
fn pickle_ints(v: &[usize]) -> Vec<u8> {
    let mut p = vec![b'('];
    v.iter().for_each(|&x| p.extend(pickle_int(x)));
    p.push(b't');
    p
}

/// Writes `entries` (key, torch storage type, shape, little-endian bytes) as `torch.save`
/// writes a state dict: a zip of `archive/data.pkl` and one stored entry per storage.
fn torch_save(path: &Path, entries: &[(String, &str, Vec<usize>, Vec<u8>)]) {
    use std::io::Write;
    let mut pkl = b"\x80\x02}(".to_vec();
    for (i, (key, storage, shape, bytes)) in entries.iter().enumerate() {
        let numel: usize = shape.iter().product();
        let mut stride = vec![1; shape.len()];
        for d in (0..shape.len().saturating_sub(1)).rev() {
            stride[d] = stride[d + 1] * shape[d + 1];
        }
        pkl.extend(pickle_str(key));
        pkl.extend(b"ctorch._utils\n_rebuild_tensor_v2\n((");
        pkl.extend(pickle_str("storage"));
        pkl.extend(format!("ctorch\n{storage}\n").as_bytes());
        pkl.extend(pickle_str(&i.to_string()));
        pkl.extend(pickle_str("cpu"));
        pkl.extend(pickle_int(numel));
        pkl.extend(b"tQ");
        pkl.extend(pickle_int(0));
        pkl.extend(pickle_ints(shape));
        pkl.extend(pickle_ints(&stride));
        pkl.extend(b"\x89ccollections\nOrderedDict\n)RtR");
        assert_eq!(bytes.len() % numel, 0);
    }
    pkl.extend(b"u.");
    let mut zip = zip::ZipWriter::new(std::fs::File::create(path).unwrap());
    let stored =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    zip.start_file("archive/data.pkl", stored).unwrap();
    zip.write_all(&pkl).unwrap();
    zip.start_file("archive/byteorder", stored).unwrap();
    zip.write_all(b"little").unwrap();
    for (i, (_, _, _, bytes)) in entries.iter().enumerate() {
        zip.start_file(format!("archive/data/{i}"), stored).unwrap();
        zip.write_all(bytes).unwrap();
    }
    zip.finish().unwrap();
}

#[test]
fn a_pickled_lora_is_converted_safely_keeping_its_layer_numbers() {
    let dir = tiny_model(8);
    let manifest = ultrapixel::models::stage_c::manifest(&tiny_configs().stage_c, true).unwrap();
    let cfg = tiny_configs().text;
    let shapes = ModelShapes {
        stage_c: &manifest,
        text_width: cfg.hidden_size,
        vocab: cfg.vocab_size,
    };
    let cache = dir.path().join("cache");
    let file = SafetensorsFile::open(dir.path().join(TINY_LORA_FILE)).unwrap();
    // The tiny LoRA as `torch.save` of the official module list writes it: f32 factors
    // and offsets, int64 token rows.
    let mut entries: Vec<(String, &str, Vec<usize>, Vec<u8>)> = file
        .keys()
        .map(|k| {
            let t = file.tensor(k).unwrap();
            let (storage, bytes): (&str, Vec<u8>) = if k.ends_with(".indices") {
                let rows = t.data.iter().flat_map(|&v| (v as i64).to_le_bytes());
                ("LongStorage", rows.collect())
            } else {
                let values = t.data.iter().flat_map(|v| v.to_le_bytes());
                ("FloatStorage", values.collect())
            };
            (k.to_string(), storage, t.shape, bytes)
        })
        .collect();
    let pt = dir.path().join("lora_tiny.pt");
    torch_save(&pt, &entries);
    let specs = |p: &Path| [LoraSpec::new(p, 1.0)];
    let from_pt = LoraSet::load(&specs(&pt), &shapes, &cache).unwrap();
    let from_st = LoraSet::load(&specs(&dir.path().join(TINY_LORA_FILE)), &shapes, &cache).unwrap();
    let (a, b) = (&from_pt.loaded()[0].lora, &from_st.loaded()[0].lora);
    assert_eq!(a.layers.len(), b.layers.len());
    for (k, u) in &b.layers {
        assert_eq!(a.layers[k].down.data, u.down.data, "{k}");
        assert_eq!(a.layers[k].up.data, u.up.data, "{k}");
    }
    let (ta, tb) = (a.tokens.as_ref().unwrap(), b.tokens.as_ref().unwrap());
    assert_eq!((&ta.rows, &ta.offsets.data), (&tb.rows, &tb.offsets.data));

    // Layer 64 of a LoRA stays layer 64 (UltraPixel's own file would call it agg_net).
    entries[0].0 = "module.64.lora_down".into();
    let pt64 = dir.path().join("lora64.pt");
    torch_save(&pt64, &entries);
    let err = LoraSet::load(&specs(&pt64), &shapes, &cache)
        .err()
        .expect("layer 64 of 8 is refused")
        .to_string();
    assert!(
        err.contains("module.64.lora_down: layer 64 of the official order"),
        "{err}"
    );
}
