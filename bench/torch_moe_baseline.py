#!/usr/bin/env python3
"""PyTorch baseline for `moe_layer_bench --backend=cuda`.

One DeepSeek MoE layer's experts computed the way Hugging Face transformers
does at inference (DeepseekV2MoE.moe_infer): sort the (token, expert) pairs by
expert, a Python loop over the experts with tokens (F.linear gate/up, SiLU,
down), scatter back, weight and sum, plus the shared expert(s) as one dense
MLP. Same device, shapes, dtype, routing scheme (top-k distinct experts per
token, uniform; normalised weights) and token counts as the C++ benchmark.

Two times per row, medians:
  wall: x float32 on the host -> output float32 on the host (the contract of
        dmoe's ExpertBackend::Compute, which the C++ `wall ms` measures);
  dev:  x already on the GPU in the compute dtype, CUDA events around the
        layer (compare with the C++ `dev ms`).

    python3 bench/torch_moe_baseline.py [--shapes v2lite,v3] [--tokens 1,8,...]
        [--dtype bf16|f32] [--device cuda:0] [--min-time 0.3]
        [--ours build/moe_cuda.json] [--json FILE]

--ours reads `moe_layer_bench --backend=cuda --json=FILE` and prints, per row
and GEMM mode, the speedup of dmoe over this baseline (torch ms / dmoe ms).
--json writes the baseline's rows (and the speedups, with --ours) as JSON.
Exits 1 without torch or without a CUDA device.
"""

import argparse
import json
import statistics
import sys
import time

SHAPES = {
    # hidden, routed experts, inter, top-k, shared inter (shared experts fused)
    "v2lite": dict(name="V2-Lite", hidden=2048, experts=64, inter=1408, top_k=6,
                   shared_inter=2 * 1408),
    "v3": dict(name="V3", hidden=7168, experts=256, inter=2048, top_k=8,
               shared_inter=2048),
}
DEFAULT_TOKENS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192]


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="v2lite,v3")
    p.add_argument("--tokens", default=",".join(map(str, DEFAULT_TOKENS)))
    p.add_argument("--dtype", default="bf16", choices=["bf16", "f32"])
    p.add_argument("--device", default="cuda:0")
    p.add_argument("--min-time", type=float, default=0.3)
    p.add_argument("--ours", help="JSON from moe_layer_bench --backend=cuda --json")
    p.add_argument("--json", help="write the rows (and speedups with --ours) here")
    return p.parse_args()


def main():
    args = parse_args()
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        print("torch_moe_baseline: PyTorch is not installed", file=sys.stderr)
        return 1
    if not torch.cuda.is_available():
        print("torch_moe_baseline: no CUDA device", file=sys.stderr)
        return 1
    dev = torch.device(args.device)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    tokens_list = [int(t) for t in args.tokens.split(",") if t]
    torch.backends.cuda.matmul.allow_tf32 = False  # f32 means f32, as in dmoe

    def mlp(t, w):
        gate, up, down = w
        return F.linear(F.silu(F.linear(t, gate)) * F.linear(t, up), down)

    def moe_infer(x, topk_ids, topk_weight, experts, shared):
        # As DeepseekV2MoE.moe_infer (transformers), plus the shared experts.
        cnts = topk_ids.new_zeros((topk_ids.shape[0], len(experts)))
        cnts.scatter_(1, topk_ids, 1)
        tokens_per_expert = cnts.sum(dim=0).tolist()  # host sync, as in HF
        idxs = topk_ids.view(-1).argsort()
        sorted_tokens = x[idxs // topk_ids.shape[1]]
        outputs, start = [], 0
        for i, n in enumerate(tokens_per_expert):
            if n == 0:
                continue
            outputs.append(mlp(sorted_tokens[start:start + n], experts[i]))
            start += n
        outs = torch.cat(outputs, dim=0)
        new_x = torch.empty_like(outs)
        new_x[idxs] = outs
        y = (new_x.view(*topk_ids.shape, -1).type(topk_weight.dtype)
             .mul_(topk_weight.unsqueeze(dim=-1)).sum(dim=1).type(new_x.dtype))
        return y + mlp(x, shared)

    results = []  # (shape name, tokens, wall ms, dev ms)
    print(f"PyTorch {torch.__version__} per-expert loop, {args.dtype}, on "
          f"{torch.cuda.get_device_name(dev)}")
    for key in args.shapes.split(","):
        s = SHAPES[key]
        h, e, inter, k = s["hidden"], s["experts"], s["inter"], s["top_k"]
        gen = torch.Generator(device=dev).manual_seed(42)

        def weights(inter_):
            return (torch.randn(inter_, h, device=dev, dtype=dtype, generator=gen) * h ** -0.5,
                    torch.randn(inter_, h, device=dev, dtype=dtype, generator=gen) * h ** -0.5,
                    torch.randn(h, inter_, device=dev, dtype=dtype, generator=gen) * inter_ ** -0.5)

        t0 = time.time()
        experts = [weights(inter) for _ in range(e)]
        shared = weights(s["shared_inter"])
        torch.cuda.synchronize(dev)
        print(f"{s['name']}: {e} experts + shared on the GPU in {time.time() - t0:.1f} s")
        for n in tokens_list:
            cpu_gen = torch.Generator().manual_seed(1000 * n)
            batches = []
            for _ in range(3 if n >= 512 else 8):
                x = torch.rand(n, h, generator=cpu_gen) * 2 - 1  # host, f32
                ids = torch.rand(n, e, generator=cpu_gen).argsort(dim=1)[:, :k]
                w = 0.05 + torch.rand(n, k, generator=cpu_gen)
                w = w / w.sum(dim=1, keepdim=True)
                batches.append((x, ids.to(dev), w.to(dev)))

            def wall_call(b):
                x, ids, w = b
                y = moe_infer(x.to(dev, dtype), ids, w, experts, shared)
                return y.float().cpu()

            for b in batches:
                wall_call(b)  # warm-up
            walls, devs = [], []
            start = time.time()
            while True:
                for b in batches:
                    t = time.perf_counter()
                    wall_call(b)
                    walls.append(time.perf_counter() - t)
                    xd = b[0].to(dev, dtype)
                    torch.cuda.synchronize(dev)
                    ev0 = torch.cuda.Event(enable_timing=True)
                    ev1 = torch.cuda.Event(enable_timing=True)
                    ev0.record()
                    moe_infer(xd, b[1], b[2], experts, shared)
                    ev1.record()
                    ev1.synchronize()
                    devs.append(ev0.elapsed_time(ev1) * 1e-3)
                if time.time() - start >= args.min_time:
                    break
            results.append((s["name"], n, statistics.median(walls) * 1e3,
                            statistics.median(devs) * 1e3))
            print(f"  {n:6d} tokens: wall {results[-1][2]:9.3f} ms, "
                  f"dev {results[-1][3]:9.3f} ms", flush=True)
        del experts, shared
        torch.cuda.empty_cache()

    speedups = []
    if args.ours:
        with open(args.ours) as f:
            ours = json.load(f)
        print(f"\ndmoe ({ours['device']}, {ours['dtype']}) vs this baseline: "
              "speedup = torch ms / dmoe ms")
        print(f"{'shape':8s} {'tokens':>6s} {'gemm':10s} {'torch wall':>10s} "
              f"{'dmoe wall':>10s} {'speedup':>8s} {'torch dev':>10s} "
              f"{'dmoe dev':>10s} {'speedup':>8s}")
        for name, n, wall, devt in results:
            for r in ours["rows"]:
                if r["shape"] != name or r["tokens"] != n:
                    continue
                print(f"{name:8s} {n:6d} {r['gemm']:10s} {wall:10.3f} "
                      f"{r['wall_ms']:10.3f} {wall / r['wall_ms']:7.2f}x "
                      f"{devt:10.3f} {r['device_ms']:10.3f} "
                      f"{devt / r['device_ms']:7.2f}x")
                speedups.append({"shape": name, "tokens": n, "gemm": r["gemm"],
                                 "wall_speedup": wall / r["wall_ms"],
                                 "device_speedup": devt / r["device_ms"]})
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"torch": torch.__version__, "dtype": args.dtype,
                       "device": torch.cuda.get_device_name(args.device),
                       "rows": [{"shape": name, "tokens": n, "wall_ms": wall,
                                 "device_ms": devt}
                                for name, n, wall, devt in results],
                       "speedups": speedups}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
