#!/usr/bin/env python3
"""Golden case files for the control and personalization paths (issue 16), made by running
the official PyTorch code (UltraPixel + Stable Cascade, torchvision, OpenCV) on tiny
configurations with random weights, on the CPU in float32. Format: tests/cases/README.md.

Usage (see tools/golden/README.md for the environment):
    python tools/golden/make_cases.py --ultrapixel DIR --stablecascade DIR --out DIR [--only a,b]

Byte-reproducible for a given torch/torchvision/OpenCV build: every tensor comes from a
seeded generator, torch runs single-threaded with deterministic algorithms, and safetensors
writes its keys sorted.
"""
import argparse
import json
import os
import sys
import zlib
from functools import partial

import numpy as np
import torch
from torch import nn

SEED = 1616
UP_COMMIT = "e85d3bc9b0eaedbe1b5aea8a5c2624caab9df1f3"
SC_COMMIT = "7a7d341f729ccaa042920a1fac3e7b9326079aca"

# The tiny UltraPixel Stage C of the existing stage_c_ultrapixel_* cases.
STAGE_C = {
    "block_repeat": [[1, 1], [1, 1]], "blocks": [[1, 1], [1, 1]], "c_clip_img": 32,
    "c_clip_seq": 4, "c_clip_text": 32, "c_clip_text_pooled": 32, "c_cond": 32,
    "c_hidden": [32, 32], "c_in": 16, "c_out": 16, "c_r": 64, "dropout": [0.1, 0.1],
    "kernel_size": 3, "level_config": ["CTA", "CTA"], "nhead": [2, 2], "patch_size": 1,
    "self_attn": True, "switch_level": [False], "t_conds": ["sca", "crp"],
}
TRANS_INR = {"ch": 16, "f_dim": 16, "head_dim": 8, "ind": 32, "n_groups": 16, "n_head": 2,
             "t_conds": [], "time_dim": 64}
# torchvision's EfficientNetV2 uses BatchNorm with eps 1e-3.
BN_EPS = 1e-3
# The tiny EfficientNetV2 feature stack of `controlnet_canny_tiny`: the stem is 24 wide as
# in the real one (the official ControlNet hard-codes 24 when it replaces the stem), then
# one stage of each block type and stride, then the 1x1 head.
TINY_STAGES = [
    # (type, expand_ratio, kernel, stride, c_in, c_out, layers)
    ("fused", 1, 3, 1, 24, 24, 1),
    ("fused", 4, 3, 2, 24, 16, 2),
    ("mb", 4, 3, 2, 16, 24, 2),
    ("mb", 6, 3, 1, 24, 32, 1),
    ("mb", 6, 3, 2, 32, 40, 1),
]
TINY_LAST = 64


def gen(seed):
    return torch.Generator().manual_seed(seed)


def redraw(module, seed):
    """Every floating parameter and BatchNorm statistic redrawn, well scaled (the official
    init zeroes output layers, which would make outputs trivial)."""
    g = gen(seed)
    with torch.no_grad():
        for name, t in module.state_dict(keep_vars=True).items():
            if not t.is_floating_point():
                continue
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif name.endswith("running_mean"):
                t.copy_(torch.randn(t.shape, generator=g) * 0.2)
            elif t.dim() >= 2:
                fan_in = max(1, t[0].numel())
                t.copy_(torch.randn(t.shape, generator=g) / fan_in ** 0.5)
            elif name.endswith("weight"):
                t.copy_(1 + 0.2 * torch.randn(t.shape, generator=g))
            else:
                t.copy_(0.2 * torch.randn(t.shape, generator=g))


def weights_of(module, prefix="weights."):
    return {prefix + k: v.detach().clone().contiguous() for k, v in module.state_dict().items()
            if v.is_floating_point()}


def save(out_dir, name, module_kind, config, tensors, description, call, extra=None):
    import torchvision
    import cv2
    meta = {
        "module": module_kind, "config": json.dumps(config, sort_keys=True), "seed": str(SEED),
        "description": description, "call": call, "dtype": "float32",
        "torch_version": torch.__version__, "torchvision_version": torchvision.__version__,
        "opencv_version": cv2.__version__, "ultrapixel_commit": UP_COMMIT,
        "stablecascade_commit": SC_COMMIT, "variant": "visible",
        "generator": "tools/golden/make_cases.py: official PyTorch code, CPU float32",
    }
    meta.update(extra or {})
    tensors = {k: v.detach().contiguous() for k, v in tensors.items()}
    path = os.path.join(out_dir, name + ".safetensors")
    write_safetensors(path, tensors, meta)
    print(f"{name}: {os.path.getsize(path):,} bytes")


DTYPES = {torch.float32: "F32", torch.int64: "I64"}


def write_safetensors(path, tensors, meta):
    """A standard safetensors file with its header keys sorted (the `safetensors` package
    writes the metadata in hash order, which changes from run to run)."""
    header, blobs, at = {"__metadata__": meta}, [], 0
    for name in sorted(tensors):
        t = tensors[name]
        raw = t.numpy().tobytes()
        header[name] = {"dtype": DTYPES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [at, at + len(raw)]}
        blobs.append(raw)
        at += len(raw)
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        for raw in blobs:
            f.write(raw)


def rand_image(g, shape):
    """A smooth random image with a few sharp-edged rectangles and discs, values in [0, 1]
    (plain noise gives Canny nothing structured to find)."""
    b, c, h, w = shape
    low = torch.rand((b, c, max(2, h // 16), max(2, w // 16)), generator=g)
    img = nn.functional.interpolate(low, size=(h, w), mode="bicubic", align_corners=False)
    yy = torch.arange(h).view(h, 1).float()
    xx = torch.arange(w).view(1, w).float()
    for _ in range(6):
        y0, x0 = (torch.rand(2, generator=g) * torch.tensor([h, w])).tolist()
        ry, rx = (torch.rand(2, generator=g) * torch.tensor([h / 3, w / 3]) + 3).tolist()
        color = torch.rand((b, c, 1, 1), generator=g)
        if torch.rand(1, generator=g).item() < 0.5:
            m = ((yy - y0).abs() < ry) & ((xx - x0).abs() < rx)
        else:
            m = ((yy - y0) / ry) ** 2 + ((xx - x0) / rx) ** 2 < 1
        img = torch.where(m, color, img)
    img = img + 0.03 * torch.randn(img.shape, generator=g)
    return img.clamp(0, 1)


# --- EfficientNetV2 pieces -------------------------------------------------------------

def effnet_cases(out, up):
    import torchvision
    from torchvision.models import efficientnet as tve
    from torchvision.ops.misc import Conv2dNormActivation
    from modules.controlnet import ControlNet

    norm = partial(nn.BatchNorm2d, eps=BN_EPS)
    g = gen(SEED + 1)

    def conv_case(name, layer, x, config, description, call):
        redraw(layer, SEED + zlib.crc32(name.encode()) % 1000)
        layer.eval()
        with torch.no_grad():
            y = layer(x)
        save(out, name, "effnet_conv_bn_silu", config,
             {**weights_of(layer), "input.x": x, "output.out": y}, description, call)

    # The stem as torchvision builds it (features[0]: 3x3, stride 2, padding 1).
    stem = torchvision.models.efficientnet_v2_s().features[0]
    conv_case("effnet_stem", stem, torch.randn((2, 3, 37, 30), generator=g),
              {"c_in": 3, "c_out": 24, "kernel": 3, "stride": 2, "padding": 1, "bn_eps": BN_EPS},
              "torchvision efficientnet_v2_s().features[0]: Conv2d(3, 24, 3, stride 2, padding 1, "
              "no bias) -> BatchNorm2d(eps 1e-3, running stats) -> SiLU. Weight keys: 0.weight "
              "(conv), 1.{weight,bias,running_mean,running_var} (BatchNorm).",
              "out = features[0].eval()(x)")
    # The stem the official ControlNet builds for c_in != 3: padding 0 (the default).
    cn = ControlNet(c_in=1, c_proj=8, proj_blocks=[0])
    stem_c = cn.backbone[0]
    assert stem_c[0].padding == (0, 0) and stem_c[0].stride == (2, 2)
    conv_case("effnet_stem_canny", stem_c, torch.rand((2, 1, 38, 29), generator=g),
              {"c_in": 1, "c_out": 24, "kernel": 3, "stride": 2, "padding": 0, "bn_eps": BN_EPS},
              "The stem of the official ControlNet(c_in=1) (modules/controlnet.py): features[0][0] "
              "replaced by nn.Conv2d(c_in, 24, kernel_size=3, stride=2, bias=False) -- NO padding, "
              "so H_out = (H - 3) // 2 + 1 -- then the torchvision BatchNorm2d(eps 1e-3) and SiLU. "
              "Keys as effnet_stem.", "out = ControlNet(c_in=1).backbone[0].eval()(x)")
    # The head (features[7] of v2_s is Conv2dNormActivation(256, 1280, 1)), tiny widths.
    head = Conv2dNormActivation(32, 64, kernel_size=1, norm_layer=norm, activation_layer=nn.SiLU)
    conv_case("effnet_head", head, torch.randn((1, 32, 5, 7), generator=g),
              {"c_in": 32, "c_out": 64, "kernel": 1, "stride": 1, "padding": 0, "bn_eps": BN_EPS},
              "The last layer of the EfficientNetV2 features (torchvision Conv2dNormActivation, "
              "kernel 1): Conv2d(c_in, c_out, 1, no bias) -> BatchNorm2d(eps 1e-3) -> SiLU. Tiny "
              "widths (the real one is 256 -> 1280).", "out = Conv2dNormActivation(...).eval()(x)")

    def block_case(name, kind, cnf_cls, e, k, s, ci, co, x, description):
        cnf = cnf_cls(e, k, s, ci, co, 1)
        block = (tve.FusedMBConv if kind == "effnet_fused_mbconv" else tve.MBConv)(cnf, 0.0, norm)
        redraw(block, SEED + zlib.crc32(name.encode()) % 1000)
        block.eval()
        with torch.no_grad():
            y = block(x)
        config = {"expand_ratio": e, "kernel": k, "stride": s, "c_in": ci, "c_out": co,
                  "bn_eps": BN_EPS, "residual": block.use_res_connect}
        if kind == "effnet_mbconv":
            config["se_channels"] = max(1, ci // 4)
        save(out, name, kind, config,
             {**weights_of(block), "input.x": x, "output.out": y}, description,
             f"out = torchvision.models.efficientnet.{type(block).__name__}({cnf_cls.__name__}"
             f"({e}, {k}, {s}, {ci}, {co}, 1), 0.0, BatchNorm2d(eps=1e-3)).eval()(x)")

    fused = ("torchvision FusedMBConv, eval (stochastic depth is the identity). expand_ratio 1: "
             "block.0 = Conv3x3(stride, padding 1, no bias) -> BN -> SiLU. expand_ratio > 1: "
             "block.0 = Conv3x3(c_in -> c_in*e, stride, padding 1) -> BN -> SiLU, block.1 = "
             "Conv1x1(c_in*e -> c_out) -> BN (no activation). Residual x + ... when stride 1 and "
             "c_in == c_out. Keys block.<i>.0.weight (conv), block.<i>.1.* (BatchNorm eps 1e-3).")
    block_case("effnet_fused_mbconv_e1", "effnet_fused_mbconv", tve.FusedMBConvConfig,
               1, 3, 1, 24, 24, torch.randn((1, 24, 13, 10), generator=g), fused)
    block_case("effnet_fused_mbconv_e4", "effnet_fused_mbconv", tve.FusedMBConvConfig,
               4, 3, 2, 16, 24, torch.randn((2, 16, 15, 12), generator=g), fused)
    block_case("effnet_fused_mbconv_e4_s1", "effnet_fused_mbconv", tve.FusedMBConvConfig,
               4, 3, 1, 24, 24, torch.randn((1, 24, 9, 11), generator=g), fused)
    mb = ("torchvision MBConv, eval: block.0 = Conv1x1(c_in -> c_in*e) -> BN -> SiLU; block.1 = "
          "depthwise Conv3x3(stride, padding 1, groups c_in*e) -> BN -> SiLU; block.2 = "
          "SqueezeExcitation: s = sigmoid(fc2(SiLU(fc1(mean over H,W)))) with fc1 Conv1x1(c_in*e "
          "-> se_channels = max(1, c_in // 4)) and fc2 back, both with bias, then x * s; block.3 "
          "= Conv1x1(c_in*e -> c_out) -> BN (no activation). Residual when stride 1 and c_in == "
          "c_out. Keys block.{0,1,3}.0.weight, block.{0,1,3}.1.* (BatchNorm eps 1e-3), "
          "block.2.fc1/fc2.{weight,bias}.")
    block_case("effnet_mbconv_s1", "effnet_mbconv", tve.MBConvConfig,
               6, 3, 1, 24, 24, torch.randn((1, 24, 11, 9), generator=g), mb)
    block_case("effnet_mbconv_s2", "effnet_mbconv", tve.MBConvConfig,
               4, 3, 2, 16, 32, torch.randn((2, 16, 13, 14), generator=g), mb)


def tiny_backbone():
    """A tiny torchvision EfficientNet feature stack of the v2 family (for the ControlNet)."""
    from torchvision.models import efficientnet as tve
    setting = [(tve.FusedMBConvConfig if t == "fused" else tve.MBConvConfig)(e, k, s, ci, co, n)
               for (t, e, k, s, ci, co, n) in TINY_STAGES]
    return tve.EfficientNet(setting, dropout=0.0, stochastic_depth_prob=0.0,
                            norm_layer=partial(nn.BatchNorm2d, eps=BN_EPS),
                            last_channel=TINY_LAST)


def tiny_controlnet(c_proj, proj_blocks):
    """The official ControlNet(c_in=1) with torchvision's efficientnet_v2_s replaced by the
    tiny stack (the official code then swaps the stem for its padding-0 c_in=1 conv), and its
    projections rebuilt at the tiny embedding width (the official code hard-codes 1280)."""
    import torchvision
    from modules import controlnet as cnm
    real = torchvision.models.efficientnet_v2_s
    torchvision.models.efficientnet_v2_s = lambda *a, **k: tiny_backbone()
    try:
        cn = cnm.ControlNet(c_in=1, c_proj=c_proj, proj_blocks=proj_blocks)
    finally:
        torchvision.models.efficientnet_v2_s = real
    cn.projections = nn.ModuleList([nn.Sequential(
        nn.Conv2d(TINY_LAST, TINY_LAST, kernel_size=1, bias=False),
        nn.LeakyReLU(0.2, inplace=True),
        nn.Conv2d(TINY_LAST, c_proj, kernel_size=1, bias=False),
    ) for _ in proj_blocks])
    redraw(cn, SEED + 7)
    return cn.eval()


# The tiny `large` backbone of `controlnet_sr_tiny` (official: 4096*4, 1024, 8 blocks, 1280).
SR_LARGE = {"expand": 16, "width": 8, "blocks": 1, "out": 12}


def sr_case(out, up):
    """The super-resolution ControlNet (bottleneck 'large', c_in 16) at tiny widths, on the
    doubled latent its SREffnetFilter delivers."""
    from modules import controlnet as cnm
    L = SR_LARGE
    # Built at the official widths, then the backbone and the projections rebuilt from the
    # same module classes at tiny ones (the official code hard-codes them).
    cn = cnm.ControlNet(c_in=16, c_proj=8, proj_blocks=PROJ_BLOCKS, bottleneck_mode="large")
    cn.backbone = nn.Sequential(
        nn.Conv2d(16, L["expand"], kernel_size=1), nn.LeakyReLU(0.2, inplace=True),
        nn.Conv2d(L["expand"], L["width"], kernel_size=1),
        *[cnm.CNetResBlock(L["width"]) for _ in range(L["blocks"])],
        nn.Conv2d(L["width"], L["out"], kernel_size=1))
    cn.projections = nn.ModuleList([nn.Sequential(
        nn.Conv2d(L["out"], L["out"], kernel_size=1, bias=False),
        nn.LeakyReLU(0.2, inplace=True),
        nn.Conv2d(L["out"], 8, kernel_size=1, bias=False),
    ) for _ in PROJ_BLOCKS])
    redraw(cn, SEED + 31)
    cn.eval()
    g = gen(SEED + 32)
    latent = torch.randn((1, 16, 3, 4), generator=g)
    x = nn.functional.interpolate(latent, scale_factor=2, mode="nearest")
    with torch.no_grad():
        maps = cn(x)
    cfg = {"c_in": 16, "c_proj": 8, "proj_blocks": PROJ_BLOCKS, "bottleneck_mode": "large",
           "large": L}
    tensors = {**weights_of(cn), "input.x": x}
    for i, mp in enumerate(maps):
        if mp is not None:
            tensors[f"output.cnet.{i}"] = mp
    save(out, "controlnet_sr_tiny", "controlnet", cfg, tensors,
         "Official ControlNet (modules/controlnet.py) with bottleneck 'large' and c_in=16, the "
         "super-resolution one (configs/inference/controlnet_c_3b_sr.yaml): backbone = Conv1x1("
         "c_in -> expand) -> LeakyReLU(0.2) -> Conv1x1(-> width) -> `blocks` CNetResBlock(width) "
         "(LayerNorm2d affine eps 1e-5, GELU, Conv3x3 pad 1, twice, plus the input) -> Conv1x1(-> "
         "out), every conv biased; widths from config.large (official 16384, 1024, 8, 1280). "
         "Projections as in controlnet_canny_tiny, `out` wide. The input is a random 16-channel "
         "latent doubled by nearest interpolation, as SREffnetFilter(scale_factor=0.5) delivers it.",
         "cnet = ControlNet(c_in=16, c_proj=8, proj_blocks=[0, 1, 3], bottleneck_mode='large')(x)")


# --- UltraPixel Stage C with control, and with a LoRA --------------------------------------

def stage_c_model(with_inr):
    from modules import model_4stage_lite as m4
    real = m4.TransInr
    m4.TransInr = lambda **kw: real(**{**kw, **TRANS_INR})
    try:
        model = m4.StageC(**STAGE_C)
        if with_inr:
            model._init_extra_parameter()
    finally:
        m4.TransInr = real
    if with_inr:
        # Created but never used in forward, and absent from the released checkpoint.
        del model.norm_down_blocks, model.norm_up_blocks
    redraw(model, SEED + 11)
    return model.eval()


def clip_inputs(g, b):
    return (torch.randn((b, 77, 32), generator=g), torch.randn((b, 1, 32), generator=g),
            torch.randn((b, 1, 32), generator=g))


CONTROL_WEIGHT = 0.7
PROJ_BLOCKS = [0, 1, 3]


def control_cases(out, up):
    g = gen(SEED + 21)
    cn = tiny_controlnet(32, PROJ_BLOCKS)
    # A canny-like control input: the official filter's output is an upsampled 0/1 edge map.
    edges = (torch.rand((2, 1, 40, 30), generator=g) < 0.15).float()
    x_ctl = nn.functional.interpolate(edges, size=(151, 117), mode="bilinear")
    with torch.no_grad():
        maps = cn(x_ctl)
    backbone_cfg = {"stem_out": 24, "stem_padding": 0, "stages": [list(s) for s in TINY_STAGES],
                    "stage_fields": ["type", "expand_ratio", "kernel", "stride", "c_in", "c_out",
                                     "layers"], "last_channel": TINY_LAST, "bn_eps": BN_EPS}
    cfg = {"c_in": 1, "c_proj": 32, "proj_blocks": PROJ_BLOCKS, "bottleneck_mode": "effnet",
           "backbone": backbone_cfg}
    tensors = {**weights_of(cn), "input.x": x_ctl}
    for i, mp in enumerate(maps):
        if mp is not None:
            tensors[f"output.cnet.{i}"] = mp
    save(out, "controlnet_canny_tiny", "controlnet", cfg, tensors,
         "Official ControlNet (modules/controlnet.py, bottleneck 'effnet') with c_in=1 (Canny): "
         "backbone = torchvision EfficientNet features (here a tiny stack of the v2 family: see "
         "config.backbone; layer i of `backbone` is the stem for i=0, stage i for 1..len(stages), "
         "the 1x1 head last; keys as torchvision's features: backbone.<i>.<layer>.block...), whose "
         "stem conv the official code replaces by Conv2d(1, 24, 3, stride 2, padding 0, no bias). "
         "Then for each i, projections[i] = Conv1x1(no bias) -> LeakyReLU(0.2) -> Conv1x1(-> c_proj, "
         "no bias) of the backbone output, delivered as map number proj_blocks[i]; the other "
         "numbers up to max(proj_blocks) are None (no output stored). Eval mode (BatchNorm running "
         "stats). The official projections are 1280 wide; here they are last_channel wide.",
         "cnet = ControlNet(c_in=1, c_proj=32, proj_blocks=[0, 1, 3])(x)")

    model = stage_c_model(with_inr=True)
    b = 2
    x_lr = torch.randn((b, 16, 13, 11), generator=g)
    r = torch.tensor([0.83, 0.83])
    clip = clip_inputs(g, b)
    cnet = [(mp * CONTROL_WEIGHT) if mp is not None else None for mp in maps]
    with torch.no_grad():
        out_lr, lr_enc, lr_dec = model(x_lr, r, *clip, reuire_f=True, cnet=cnet)
        plain_lr, _, _ = model(x_lr, r, *clip, reuire_f=True)
    assert (out_lr - plain_lr).abs().max() > 1e-3, "control must change the LR pass"
    lr_w = {k: v for k, v in weights_of(model).items() if ".agg_net" not in k}
    ctl_inputs = {f"input.cnet.{i}": mp for i, mp in enumerate(maps) if mp is not None}
    common = {"input.clip_text": clip[0], "input.clip_text_pooled": clip[1],
              "input.clip_img": clip[2], **ctl_inputs}
    cfg_c = {**STAGE_C, "control_weight": CONTROL_WEIGHT, "proj_blocks": PROJ_BLOCKS}
    t = {**lr_w, **common, "input.x": x_lr, "input.r": r, "output.out": out_lr}
    for i, f in enumerate(lr_enc):
        t[f"output.lr_enc.{i}"] = f
    for i, f in enumerate(lr_dec):
        t[f"output.lr_dec.{i}"] = f
    save(out, "stage_c_ultrapixel_lr_control", "stage_c_ultrapixel_lr_control", cfg_c, t,
         "UltraPixel StageC LR pass (reuire_f=True, as the sampler's LR phase calls it) with the "
         "ControlNet maps injected (lr_guide is None, so injection is on): every ResBlock visit, "
         "down blocks then up blocks in forward order (block repeats included), draws the next "
         "map number n = 0, 1, 2, ...; when input.cnet.<n> exists, x += bilinear_resize("
         "control_weight * cnet.n, size of x, align_corners=True) just BEFORE that ResBlock "
         "(in the up path after x was resized to its skip's size). The maps are stored unscaled; "
         "the official script multiplies them by control_weight before the model call. Outputs "
         "as stage_c_ultrapixel_lr.",
         "out, lr_enc, lr_dec = StageC(**config)(x, r, clip_text, clip_text_pooled, clip_img, "
         "reuire_f=True, cnet=[c * control_weight for c in cnet])")

    x_hr = torch.randn((b, 16, 25, 21), generator=g)
    with torch.no_grad():
        out_hr = model(x_hr, r, *clip, lr_guide=(lr_enc, lr_dec), cnet=cnet)
        no_ctl = model(x_hr, r, *clip, lr_guide=(lr_enc, lr_dec))
    assert torch.equal(out_hr, no_ctl), "the official HR pass skips injection"
    t = {**weights_of(model), **common, "input.x": x_hr, "input.r": r, "input.x_lr": x_lr,
         "output.out": out_hr}
    for i, f in enumerate(lr_enc):
        t[f"input.lr_enc.{i}"] = f
    for i, f in enumerate(lr_dec):
        t[f"input.lr_dec.{i}"] = f
    save(out, "stage_c_ultrapixel_hr_control", "stage_c_ultrapixel_hr_control",
         {**cfg_c, "_init_extra_parameter.TransInr": TRANS_INR}, t,
         "UltraPixel StageC HR pass with LR guidance AND the control maps passed, as the "
         "official sampler (GDF_dual_fixlrt.sample) calls it: _down_encode injects only when "
         "lr_guide is None and _up_decode only when agg_f is None, so with guidance the maps "
         "are NOT injected and out equals stage_c_ultrapixel_hr on the same inputs (checked at "
         "generation). lr_enc/lr_dec are the features of the controlled LR pass on x_lr "
         "(= stage_c_ultrapixel_lr_control's outputs). Guide scale 0.3 (25*21 < 72*72).",
         "out = StageC(**config)(x, r, clip_text, clip_text_pooled, clip_img, lr_guide=(lr_enc, "
         "lr_dec), cnet=[c * control_weight for c in cnet])", {"guide_scale_up": "0.3"})


def lora_case(out, up):
    from modules.lora import apply_lora, LoRA
    g = gen(SEED + 31)
    model = stage_c_model(with_inr=False)
    base = weights_of(model)
    apply_lora(model, filters=[".attn"], rank=4)
    # The trainer's ModuleList: the LoRA modules in generator.modules() order.
    train_lora = nn.ModuleList([m for m in model.modules() if isinstance(m, LoRA)])
    with torch.no_grad():
        for lm in train_lora:
            lm.lora_down.copy_(torch.randn(lm.lora_down.shape, generator=g) * 0.5)
            lm.lora_up.copy_(torch.randn(lm.lora_up.shape, generator=g) * 0.5)
    b = 1
    x = torch.randn((b, 16, 13, 11), generator=g)
    r = torch.tensor([0.61])
    clip = clip_inputs(g, b)
    with torch.no_grad():
        out_l, enc, dec = model(x, r, *clip, reuire_f=True)
    t = {**base, "input.x": x, "input.r": r, "input.clip_text": clip[0],
         "input.clip_text_pooled": clip[1], "input.clip_img": clip[2], "output.out": out_l}
    for k, v in train_lora.state_dict().items():
        t["input.lora." + k] = v
    for i, f in enumerate(enc):
        t[f"output.lr_enc.{i}"] = f
    for i, f in enumerate(dec):
        t[f"output.lr_dec.{i}"] = f
    save(out, "stage_c_lora", "stage_c_lora",
         {**STAGE_C, "lora": {"rank": 4, "alpha": 1, "filters": [".attn"]}}, t,
         "UltraPixel StageC LR pass (as stage_c_ultrapixel_lr) with a LoRA applied the official "
         "way (modules/lora.py apply_lora(generator, filters=['.attn'], rank=4), as "
         "train_personalized.py / test_personalized.py do): every module whose name contains "
         "'.attn' and owns a `weight` (the attention out_proj) or an `in_proj_weight` (the packed "
         "q/k/v) gets W + (alpha/rank) * lora_up @ lora_down, alpha = 1. weights.* are the BASE "
         "weights; input.lora.<k> is the LoRA file exactly as the trainer saves "
         "train_lora.state_dict() (a ModuleList of the LoRA modules in generator.modules() "
         "order: for each AttnBlock, down blocks then up blocks, out_proj before in_proj_weight), "
         "without the learned tokens.",
         "apply_lora(model, ['.attn'], 4); train_lora.load_state_dict(lora); out, lr_enc, lr_dec "
         "= model(x, r, clip_text, clip_text_pooled, clip_img, reuire_f=True)")


# --- Learned tokens (ReToken) on the CLIP text encoder ------------------------------------

# A tiny CLIP text tower (width 8) with the real vocabulary and context, and the legacy
# `eos_token_id` 2 of the released laion ViT-bigG-14 config (pooling at argmax(input_ids)).
CLIP_TINY = {"bos_token_id": 49406, "eos_token_id": 2, "hidden_act": "gelu", "hidden_size": 8,
             "intermediate_size": 16, "layer_norm_eps": 1e-5, "max_position_embeddings": 77,
             "num_attention_heads": 2, "num_hidden_layers": 2, "pad_token_id": 1,
             "projection_dim": 8, "vocab_size": 49408}
# The official config's `train_tokens` (configs/training/lora_personalization.yaml has
# [['[roubaobao]', '^cat</w>']]): two new tokens (one initialised from `cat</w>`, one from
# zeros) and one regex over existing vocabulary entries.
TRAIN_TOKENS = [["[roubaobao]", "^cat</w>"], ["<sks>", None], ["^dog", None]]
RETOKEN_PROMPTS = [
    "a photo of a cat [roubaobao] sitting on a sofa",
    "A photo of [Roubaobao] with <sks> and a dog",
    "<sks> first, then [roubaobao], then [roubaobao] again",
    "a cat and two dogs on the beach",
    "",
    " ".join(f"w{i}" for i in range(80)) + " [roubaobao]",
]


def retoken_case(out, up):
    """The CLIP text path of test_personalized.py with learned tokens: the tokenizer and
    embedding table grown the way train_personalized.py's setup_models grows them, the
    official ReToken parametrization, and the conditioning get_conditions takes."""
    import re
    import transformers
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizerFast
    import modules.lora as up_lora

    tok_file = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "data",
                            "clip-vit-bigg-14-tokenizer.json")
    tokenizer = CLIPTokenizerFast(tokenizer_file=tok_file, bos_token="<|startoftext|>",
                                  eos_token="<|endoftext|>", unk_token="<|endoftext|>",
                                  pad_token="<|endoftext|>", model_max_length=77)
    width = CLIP_TINY["hidden_size"]
    model = CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_TINY))
    redraw(model, SEED + 41)
    model.eval()
    emb = model.text_model.embeddings.token_embedding
    base = weights_of(model)
    base_table = emb.weight.detach().clone()

    # train_personalized.py WurstCoreC.setup_models, "PREPARE LORA", line for line.
    update_tokens, aggr_rows = [], []
    for tkn_regex, aggr_regex in TRAIN_TOKENS:
        if (tkn_regex.startswith('[') and tkn_regex.endswith(']')) or \
                (tkn_regex.startswith('<') and tkn_regex.endswith('>')):
            tokenizer.add_tokens([tkn_regex])
            new_embedding = torch.zeros_like(emb.weight.data)[:1]
            if aggr_regex is not None:
                aggr_tokens = [v for k, v in tokenizer.vocab.items()
                               if re.search(aggr_regex, k) is not None]
                if len(aggr_tokens) > 0:
                    new_embedding = emb.weight.data[aggr_tokens].mean(dim=0, keepdim=True)
                    aggr_rows += aggr_tokens
            emb.weight.data = torch.cat([emb.weight.data, new_embedding], dim=0)
            selected_tokens = [len(tokenizer.vocab) - 1]
        else:
            selected_tokens = [v for k, v in tokenizer.vocab.items()
                               if re.search(tkn_regex, k) is not None]
        update_tokens += selected_tokens
    update_tokens = list(set(update_tokens))
    # That order follows tokenizer.vocab's iteration order, which changes from run to run; it
    # only pairs each learned vector with its row, so a seeded shuffle of the sorted rows
    # makes the file reproducible (and still out of order, as a released file can be).
    update_tokens = sorted(update_tokens)
    update_tokens = [update_tokens[i] for i in
                     torch.randperm(len(update_tokens), generator=gen(SEED + 42)).tolist()]
    # ReToken hard-codes the 1280-wide ViT-bigG embedding; at this tiny width its learned
    # vector table is made `width` wide instead (nothing else changes).
    orig_init = up_lora.ReToken.__init__

    def narrow_init(self, indices=None):
        orig_init(self, indices)
        self.embeddings = nn.Parameter(torch.zeros(len(indices), width))
    up_lora.ReToken.__init__ = narrow_init
    try:
        up_lora.apply_retoken(emb, update_tokens)
    finally:
        up_lora.ReToken.__init__ = orig_init
    retoken = emb.parametrizations.weight[0]
    g = gen(SEED + 43)
    with torch.no_grad():
        retoken.embeddings.copy_(torch.randn(retoken.embeddings.shape, generator=g) * 0.5)
    # The trainer saves train_lora (the Stage C LoRA modules, then this ReToken last); a
    # text-only file is the ModuleList with the ReToken alone.
    train_lora = nn.ModuleList([retoken])

    # WurstCore.get_conditions (train/base.py): clip_text and clip_text_pooled.
    enc = tokenizer(RETOKEN_PROMPTS, truncation=True, padding="max_length",
                    max_length=tokenizer.model_max_length, return_tensors="pt")
    with torch.no_grad():
        o = model(**enc, output_hidden_states=True)
        ids = enc["input_ids"]
        # The legacy pooling of eos_token_id == 2: argmax(input_ids), the highest id.
        at = ids.to(torch.int).argmax(dim=-1)
        pooled = model.text_projection(o.last_hidden_state[torch.arange(len(ids)), at])
        assert torch.equal(pooled, o.text_embeds), "transformers no longer pools at argmax"
    assert any(int(ids[i, at[i]]) > 49407 for i in range(len(ids)))
    # The same model with the eos_token_id of the released Stable Cascade text encoder
    # config (49407; transformers >= 4.31 loads the laion config so): pooled at the first EOS.
    model.text_model.eos_token_id = 49407
    with torch.no_grad():
        o_eos = model(**enc, output_hidden_states=True)
        first_eos = (ids.to(torch.int) == 49407).int().argmax(dim=-1)
        assert torch.equal(o_eos.hidden_states[-1], o.hidden_states[-1])
        assert torch.equal(o_eos.text_embeds, model.text_projection(
            o.last_hidden_state[torch.arange(len(ids)), first_eos]))
    model.text_model.eos_token_id = CLIP_TINY["eos_token_id"]

    # Only the base table rows the computation reads: the prompts' ids below the base
    # vocabulary and the aggregation rows of the new tokens.
    used = sorted({int(v) for v in ids.flatten() if int(v) < CLIP_TINY["vocab_size"]}
                  | set(aggr_rows))
    rows = torch.tensor(used, dtype=torch.int64)
    table_key = "text_model.embeddings.token_embedding.weight"
    t = {k: v for k, v in base.items() if k != "weights." + table_key}
    t["weights.text_model.embeddings.token_embedding.rows"] = base_table[rows].clone()
    t["input.token_embedding_ids"] = rows
    t["input.input_ids"] = ids
    t["input.attention_mask"] = enc["attention_mask"]
    for k, v in train_lora.state_dict().items():
        t["input.lora." + k] = v
    t["output.clip_text"] = o.hidden_states[-1]
    t["output.last_hidden_state"] = o.last_hidden_state
    t["output.text_embeds"] = o.text_embeds
    t["output.text_embeds_eos_49407"] = o_eos.text_embeds
    save(out, "clip_text_retoken", "clip_text_retoken", CLIP_TINY, t,
         "The CLIP text path of UltraPixel's test_personalized.py with learned tokens. "
         "transformers CLIPTextModelWithProjection (tiny width, the real 49408 vocabulary and "
         "77 positions, eos_token_id 2 as in the released laion ViT-bigG-14 config); the "
         "tokenizer is data/clip-vit-bigg-14-tokenizer.json as CLIPTokenizerFast with pad "
         "token <|endoftext|>. Tokens added exactly as train_personalized.py setup_models "
         "does for train_tokens (metadata): a bracketed word is tokenizer.add_tokens()-ed and "
         "the embedding table grows by one row, the mean of the rows its aggregation regex "
         "selects in tokenizer.vocab (zeros if none), its id len(tokenizer.vocab) - 1; any "
         "other entry selects existing vocabulary rows by regex. modules/lora.py "
         "apply_retoken then adds the learned vectors (input.lora.0.embeddings, rows "
         "input.lora.0.indices: the trainer's train_lora ModuleList holding only the ReToken, "
         "whose hard-coded width 1280 is the tiny width here) to those rows. Only the BASE "
         "table rows the computation reads are stored: weights.<table>.rows at the ids "
         "input.token_embedding_ids (the prompts' ids below 49408 and the aggregation rows); "
         "every other row must be unreadable. Outputs as get_conditions takes them: "
         "clip_text = hidden_states[-1] (before final_layer_norm), text_embeds = "
         "text_projection(final_layer_norm(h)[argmax(input_ids)]): the legacy pooling of "
         "eos_token_id 2 takes the position of the HIGHEST id, the first EOS only when no "
         "added token is in the row, else the first occurrence of the newest added token. "
         "text_embeds_eos_49407: the same model with eos_token_id 49407 (the released Stable "
         "Cascade text encoder config; transformers >= 4.31 pools at the first 49407).",
         "tokenizer.add_tokens / table grown as setup_models; apply_retoken(token_embedding, "
         "update_tokens); enc = tokenizer(prompts, truncation=True, padding='max_length', "
         "max_length=77); o = model(**enc, output_hidden_states=True); clip_text = "
         "o.hidden_states[-1]; text_embeds = o.text_embeds; text_embeds_eos_49407 = the same "
         "with model.text_model.eos_token_id = 49407",
         {"prompts": json.dumps(RETOKEN_PROMPTS), "train_tokens": json.dumps(TRAIN_TOKENS),
          "transformers_version": transformers.__version__,
          "tokenizers_version": __import__("tokenizers").__version__})


# --- Canny preprocessing and the control-image resize --------------------------------------

def canny_case(out, up):
    import cv2
    from modules.controlnet import CannyFilter
    g = gen(SEED + 41)
    x = rand_image(g, (1, 3, 131, 241))
    filt = CannyFilter("cpu", resize=224)
    edges = filt(x)
    # The filter's intermediate steps, recomputed the same way for debugging.
    small = nn.functional.interpolate(x, size=(224, 224), mode="bilinear")
    quant = small.mul(255)[0].permute(1, 2, 0).numpy().astype(np.uint8)
    e224 = cv2.Canny(quant, 100, 200)
    assert e224.any(), "the test image must have edges"
    t = {"input.image": x,
         "output.quantized": torch.tensor(quant).permute(2, 0, 1)[None].float(),
         "output.edges_224": torch.tensor(e224)[None, None].float().div(255),
         "output.edges": edges}
    save(out, "canny_filter", "canny_filter",
         {"resize": 224, "low_threshold": 100, "high_threshold": 200, "aperture": 3,
          "l2_gradient": False}, t,
         "Official CannyFilter(resize=224) (modules/controlnet.py), as cfg_control_lr.yaml sets "
         "it: resized = F.interpolate(image, (224, 224), 'bilinear') (align_corners False, no "
         "antialias); quantized = uint8(resized * 255) (truncation, HWC, 3 channels); "
         "edges_224 = cv2.Canny(quantized, 100, 200) / 255 (Sobel 3x3, L1 gradient; OpenCV on a "
         "3-channel image takes, per pixel, the channel with the largest |dx|+|dy|); edges = "
         "F.interpolate(edges_224, image size, 'bilinear') (align_corners False). The image "
         "stands for the control image after resize_image (see control_image_resize).",
         "edges = CannyFilter('cpu', resize=224)(image)")


def resize_cases(out, up):
    sys.path.insert(0, os.path.join(up, "inference"))
    from PIL import Image
    import torchvision.transforms.functional as F
    g = gen(SEED + 51)
    for name, (h, w), size in [("control_resize_down", (61, 89), 40),
                               ("control_resize_up", (23, 30), 40)]:
        img = (rand_image(g, (1, 3, h, w))[0].permute(1, 2, 0) * 255).round().to(torch.uint8)
        pil = Image.fromarray(img.numpy())
        # inference/utils.py resize_image(image, size), here with a small `size` (768 in use).
        res = F.resize(F.to_tensor(pil), size, antialias=True)
        save(out, name, "control_image_resize", {"size": size, "official_size": 768},
             {"input.pixels": img.float(), "output.image": res[None]},
             "inference/utils.py resize_image(image, size): to_tensor (u8 / 255, CHW) then "
             "torchvision F.resize(t, size, antialias=True): the SHORT side becomes `size`, the "
             "long side int(size * long / short) (truncated), bilinear with antialias (a "
             "triangle filter widened by the downscale factor, align_corners False; plain "
             "bilinear when upscaling). The official script uses size 768 (test_controlnet.py "
             "resize_image(Image.open(url).convert('RGB'))); a smaller size keeps the file small. "
             "input.pixels is the decoded RGB image [H, W, 3] as float32 integers 0..255.",
             f"image = F.resize(F.to_tensor(pil), {size}, antialias=True)[None]")


def stub_core():
    """The official `core` package imports its trainers' dependencies (wandb, webdataset, ...);
    the modules used here need only `core.utils.load_or_fail`, which loads checkpoints and is
    never called on random weights."""
    import types

    def load_or_fail(path, *a, **k):
        raise RuntimeError(f"no checkpoints are loaded here ({path})")
    core = types.ModuleType("core")
    utils = types.ModuleType("core.utils")
    utils.load_or_fail = load_or_fail
    core.utils = utils
    sys.modules["core"], sys.modules["core.utils"] = core, utils


CASES = {"effnet": effnet_cases, "control": control_cases, "lora": lora_case,
         "canny": canny_case, "resize": resize_cases, "retoken": retoken_case, "sr": sr_case}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ultrapixel", required=True, help="work tree of catcathh/UltraPixel")
    ap.add_argument("--stablecascade", required=True,
                    help="work tree of Stability-AI/StableCascade (informational: UltraPixel "
                         "vendors the modules used)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--only", default=",".join(CASES), help="comma list of: " + ",".join(CASES))
    a = ap.parse_args()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    up = os.path.abspath(a.ultrapixel)
    sys.path.insert(0, up)
    stub_core()
    os.makedirs(a.out, exist_ok=True)
    for name in a.only.split(","):
        CASES[name](a.out, up)


if __name__ == "__main__":
    main()
