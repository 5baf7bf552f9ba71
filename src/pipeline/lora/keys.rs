//! The key names a LoRA file may use, and where each tensor goes in our model.
//!
//! Three namings exist (all with an optional DDP `module.` prefix):
//! - Named, as a parametrized generator's state dict has them:
//!   `<module>.parametrizations.<param>.0.lora_down` / `.lora_up`, for the Stage C weight
//!   `<module>.<param>` (`param` is `weight`, or `in_proj_weight` of a MultiheadAttention).
//! - Stable Cascade's `train_c_lora.py` (a ModuleDict): `weights.<i>.lora_down` / `.lora_up`
//!   and the learned tokens `embeddings.embeddings` / `embeddings.indices`.
//! - UltraPixel's `train_personalized.py` (a ModuleList, e.g. `lora_cat`): `<i>.lora_down` /
//!   `.lora_up` and the learned tokens as the last entry, `<n>.embeddings` / `<n>.indices`.
//!
//! The indexed namings count the wrapped layers in the order `generator.modules()` visits
//! them under the released filter `['.attn']`: every AttnBlock, down blocks before up
//! blocks, each level and block in order; inside a block the output projection comes before
//! the packed q/k/v projection, because MultiheadAttention registered `out_proj` before the
//! parametrization of its own `in_proj_weight` was added.

use crate::models::Manifest;

/// Which factor of a low-rank update a tensor is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Factor {
    /// `[rank, in]`.
    Down,
    /// `[out, rank]`.
    Up,
}

/// Where a LoRA file's tensor goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Slot {
    /// A factor of the update of the Stage C weight with this (original) key.
    Layer(String, Factor),
    /// A factor of the `i`-th layer of the official order ([`official_layers`]).
    Indexed(usize, Factor),
    /// The learned token offsets, `[n, width]`.
    TokenOffsets,
    /// Their vocabulary rows, `[n]`.
    TokenIndices,
}

/// Where `key` goes, or None when it is no LoRA tensor.
pub fn slot(key: &str) -> Option<Slot> {
    let key = key.strip_prefix("module.").unwrap_or(key);
    let factor = |name: &str| match name {
        "lora_down" => Some(Factor::Down),
        "lora_up" => Some(Factor::Up),
        _ => None,
    };
    match key {
        "embeddings.embeddings" => return Some(Slot::TokenOffsets),
        "embeddings.indices" => return Some(Slot::TokenIndices),
        _ => {}
    }
    let (head, last) = key.rsplit_once('.')?;
    if let Some((module, param)) = head
        .strip_suffix(".0")
        .and_then(|h| h.split_once(".parametrizations."))
    {
        if matches!(param, "weight" | "in_proj_weight") && !module.is_empty() {
            return Some(Slot::Layer(format!("{module}.{param}"), factor(last)?));
        }
        return None;
    }
    let index = head.strip_prefix("weights.").unwrap_or(head);
    let i: usize = index.parse().ok()?;
    let indexed_form = index == head || head.starts_with("weights.");
    match last {
        "embeddings" if index == head => Some(Slot::TokenOffsets),
        "indices" if index == head => Some(Slot::TokenIndices),
        _ if indexed_form => Some(Slot::Indexed(i, factor(last)?)),
        _ => None,
    }
}

/// The Stage C weights the official trainers wrap with the `['.attn']` filter, in the order
/// their LoRA modules are numbered (see the module documentation).
pub fn official_layers(stage_c: &Manifest) -> Vec<String> {
    const PACKED: &str = "attention.attn.in_proj_weight";
    let mut blocks: Vec<(usize, Vec<usize>, &str)> = stage_c
        .iter()
        .filter_map(|(k, _)| {
            let prefix = k.strip_suffix(PACKED)?;
            let (path, rank) = if let Some(rest) = prefix.strip_prefix("down_blocks.") {
                (rest, 0)
            } else {
                (prefix.strip_prefix("up_blocks.")?, 1)
            };
            let indices: Option<Vec<usize>> = path
                .trim_end_matches('.')
                .split('.')
                .map(|s| s.parse().ok())
                .collect();
            Some((rank, indices?, prefix))
        })
        .collect();
    blocks.sort();
    blocks
        .into_iter()
        .flat_map(|(_, _, p)| {
            [
                format!("{p}attention.attn.out_proj.weight"),
                format!("{p}{PACKED}"),
            ]
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_naming_maps_to_its_slot_and_other_keys_to_none() {
        let layer = |k: &str, f| Some(Slot::Layer(k.to_string(), f));
        assert_eq!(
            slot("down_blocks.0.2.attention.attn.parametrizations.in_proj_weight.0.lora_down"),
            layer(
                "down_blocks.0.2.attention.attn.in_proj_weight",
                Factor::Down
            )
        );
        assert_eq!(
            slot("module.up_blocks.1.5.attention.attn.out_proj.parametrizations.weight.0.lora_up"),
            layer("up_blocks.1.5.attention.attn.out_proj.weight", Factor::Up)
        );
        assert_eq!(
            slot("weights.12.lora_up"),
            Some(Slot::Indexed(12, Factor::Up))
        );
        assert_eq!(
            slot("module.7.lora_down"),
            Some(Slot::Indexed(7, Factor::Down))
        );
        assert_eq!(slot("module.96.embeddings"), Some(Slot::TokenOffsets));
        assert_eq!(slot("96.indices"), Some(Slot::TokenIndices));
        assert_eq!(slot("embeddings.embeddings"), Some(Slot::TokenOffsets));
        assert_eq!(slot("embeddings.indices"), Some(Slot::TokenIndices));
        for bad in [
            "down_blocks.0.2.attention.attn.out_proj.parametrizations.weight.original",
            "down_blocks.0.2.attention.attn.out_proj.weight",
            "x.parametrizations.bias.0.lora_up",
            "weights.3.embeddings",
            "3.lora_middle",
            "lora_up",
            "",
        ] {
            assert_eq!(slot(bad), None, "{bad}");
        }
    }

    #[test]
    fn the_official_order_is_down_then_up_blocks_numerically_out_proj_first() {
        let key = |p: &str| (format!("{p}.attention.attn.in_proj_weight"), vec![6, 2]);
        // Shuffled, with a two-digit block index that sorts before `2` as text.
        let manifest: Manifest = vec![
            key("up_blocks.0.2"),
            key("down_blocks.1.10"),
            key("down_blocks.0.2"),
            key("down_blocks.1.2"),
            ("down_blocks.0.2.kv_mapper.1.weight".into(), vec![2, 2]),
            key("up_blocks.1.2"),
        ];
        let order: Vec<String> = official_layers(&manifest)
            .iter()
            .map(|k| k.replace(".attention.attn", ""))
            .collect();
        assert_eq!(
            order,
            [
                "down_blocks.0.2.out_proj.weight",
                "down_blocks.0.2.in_proj_weight",
                "down_blocks.1.2.out_proj.weight",
                "down_blocks.1.2.in_proj_weight",
                "down_blocks.1.10.out_proj.weight",
                "down_blocks.1.10.in_proj_weight",
                "up_blocks.0.2.out_proj.weight",
                "up_blocks.0.2.in_proj_weight",
                "up_blocks.1.2.out_proj.weight",
                "up_blocks.1.2.in_proj_weight",
            ]
        );
    }
}
