#!/usr/bin/env python3
"""The PyTorch peer of `ultrapixel bench --shapes`: the same GEMM and attention shapes of a
generation, timed with what a PyTorch user would run (bf16 `F.linear` through cuBLAS,
`F.scaled_dot_product_attention`), captured in CUDA graphs and timed with CUDA events like
ours. Prints the same rows, the ceilings of this run, and per size the time one image spends
in those ops (GEMMs and attention are ~all of the cascade's FLOPs, so this is a lower bound of
a PyTorch implementation's time). The ResBlocks' depthwise conv + LayerNorm2d, fused in one
kernel of ours, runs here as the reference runs it: a grouped conv2d, then LayerNorm over
channels between two permutes.

    ultrapixel bench --shapes --list --size 4096x4096 > shapes.json
    python3 tools/torch-peer.py shapes.json [--iters 5] [--device cuda]

Without PyTorch it says so and exits 0; `--device cpu` runs the same logic on the CPU with a
wall clock (a check of the script, not a benchmark).
"""
import argparse
import json
import sys
import time


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("shapes", help="JSON from `ultrapixel bench --shapes --list`")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--max-flops", type=float, default=float("inf"),
                    help="skip shapes with more work than this (for --device cpu checks)")
    args = ap.parse_args()
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        print("torch peer: skipped: no PyTorch on this machine (needs torch >= 2.1)")
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        print("torch peer: skipped: PyTorch sees no CUDA device")
        return 0
    with open(args.shapes) as f:
        sizes = json.load(f)
    dev = torch.device(args.device)
    timer = Timer(torch, dev, args.iters)
    print(f"torch {torch.__version__} on {timer.describe()}")
    dtype = torch.bfloat16
    if dev.type == "cuda":
        big = torch.empty(1 << 29, dtype=torch.uint16, device=dev)  # 1 GiB
        dst = torch.empty_like(big)
        copy = 2 * big.numel() * 2 / timer.time(lambda: dst.copy_(big))
        d = 8192
        a, w = (torch.randn(d, d, device=dev, dtype=dtype) for _ in range(2))
        matmul = 2 * d**3 / timer.time(lambda: F.linear(a, w))
        print(f"copy bandwidth: {copy / 1e9:.0f} GB/s; matmul ceiling: "
              f"{matmul / 1e12:.0f} TFLOP/s (torch bf16 {d}x{d}x{d})")
        del big, dst, a, w
    for size, shapes in sizes.items():
        print(f"\n{size}: {len(shapes['gemms'])} GEMM shapes (torch F.linear, bf16)")
        total = flops_total = 0.0
        for g in shapes["gemms"]:
            flops = 2.0 * g["m"] * g["n"] * g["k"]
            if flops > args.max_flops:
                continue
            a = torch.randn(g["m"], g["k"], device=dev, dtype=dtype)
            w = torch.randn(g["n"], g["k"], device=dev, dtype=dtype)
            t = timer.time(lambda: F.linear(a, w))
            total += t * g["per_image"]
            flops_total += flops * g["per_image"]
            print(f"{g['m']:>8} {g['n']:>6} {g['k']:>6} {g['per_image']:>5}  "
                  f"{t * 1e3:>10.3f} ms {flops / t / 1e12:>6.1f} TFLOP/s  {g['example']}")
            del a, w
        print(f"GEMMs of one image (torch): {flops_total / 1e12:.1f} TFLOP in {total:.3f} s")
        print(f"\n{size}: {len(shapes['attention'])} attention shapes (torch SDPA, bf16)")
        attn = 0.0
        for s in shapes["attention"]:
            b, n, m, h, d = s["batch"], s["queries"], s["extra"], s["heads"], s["head_dim"]
            flops = 4.0 * b * n * (n + m) * h * d
            if flops > args.max_flops:
                continue
            q = torch.randn(b, h, n, d, device=dev, dtype=dtype)
            k, v = (torch.randn(b, h, n + m, d, device=dev, dtype=dtype) for _ in range(2))
            mask = None
            if s["causal"]:
                # Key j > query i masked; the model has no extra keys with a causal mask.
                mask = torch.ones(n, n + m, device=dev, dtype=torch.bool).tril()
            t = timer.time(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
            attn += t * s["per_image"]
            print(f"b{b} n{n} m{m} h{h}x{d} causal={str(s['causal']).lower()} "
                  f"mask={str(s['key_mask']).lower()} × {s['per_image']:>3}: {t * 1e3:>9.3f} ms "
                  f"{flops / t / 1e12:>6.1f} TFLOP/s  {s['example']}")
            del q, k, v
        print(f"attention of one image (torch): {attn:.3f} s")
        dws = shapes.get("dwconv_ln", [])
        print(f"\n{size}: {len(dws)} depthwise conv + LayerNorm shapes (torch, unfused)")
        dw_total = 0.0
        for s in dws:
            b, h, w, c, k = s["batch"], s["h"], s["w"], s["c"], s["k"]
            xtype = torch.float32 if s["x_f32"] else dtype
            x = torch.randn(b, c, h, w, device=dev, dtype=xtype)
            wt = torch.randn(c, 1, k, k, device=dev, dtype=xtype)
            bias = torch.randn(c, device=dev, dtype=xtype)
            eps = s["eps"]

            def dwconv_ln():
                y = F.conv2d(x, wt, bias, padding=k // 2, groups=c)
                return F.layer_norm(y.permute(0, 2, 3, 1), (c,), eps=eps).permute(0, 3, 1, 2)

            t = timer.time(dwconv_ln)
            dw_total += t * s["per_image"]
            # The bytes the fused op must move (ours: every input and the output once).
            moved = s["bytes"]
            print(f"b{b} {h}x{w} c{c} k{k} × {s['per_image']:>3}: {t * 1e3:>9.3f} ms "
                  f"{moved / t / 1e9:>7.0f} GB/s  {s['example']}")
            del x, wt, bias
        print(f"depthwise conv + LayerNorm of one image (torch): {dw_total:.3f} s")
        print(f"{size}: these ops of one image (torch): {total + attn + dw_total:.3f} s")

    return 0


class Timer:
    """Seconds per call: on CUDA, `iters` calls captured in one CUDA graph and timed with
    events (no launch overhead counted, as in `ultrapixel bench`); on the CPU, a wall clock."""

    def __init__(self, torch, dev, iters):
        self.torch, self.dev, self.iters = torch, dev, max(1, iters)

    def describe(self):
        if self.dev.type == "cuda":
            return self.torch.cuda.get_device_name(self.dev)
        return "cpu (wall clock: a check of the script, not a benchmark)"

    def time(self, f):
        torch = self.torch
        if self.dev.type != "cuda":
            f()
            start = time.perf_counter()
            for _ in range(self.iters):
                f()
            return (time.perf_counter() - start) / self.iters
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            f()  # warm-up outside the capture: library handles, autotuning
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            f()
        graph.replay()
        start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
        start.record()
        for _ in range(self.iters):
            graph.replay()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / self.iters


if __name__ == "__main__":
    sys.exit(main())
