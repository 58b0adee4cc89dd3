"""Which kept widths this machine likes: time per unit of work against the width, per layer kind.

    python benchmarks/widths.py [--threads 2] [--batch 16] [--repeats 15]

DeiT-S shapes (197 tokens, residual 384, 6 heads, FFN 1536), fp32, eval + inference_mode:
  * FFN: fc1 384 -> w and fc2 w -> 384 over batch x 197 tokens, for w in 1224..1240;
  * residual width d in 376..392: LayerNorm, a GEMM reading the stream (d -> 1536), one writing it, the add;
  * head width: fused attention [batch, 6, 197, w] and the qkv GEMM 384 -> 6 * 3w, w in 20..40;
  * the fused attention alone at head widths 8..64 (steps of 8): how little of its time a narrower
    head saves (the 197 x 197 scores and their softmax cost the same at any width).
Every width of a sweep is timed in turns (a, b, c, a, b, c, ...; medians), so load hits all alike.
The column "ns per MAC" shows whether a width costs more than its size says: spikes at widths off
a multiple mean that multiple is worth rounding to (snp_fx's hardware="cpu" default, HARDWARE in
snp_fx/api.py, is set from this table).  Writes results/widths.json.
"""
import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from common import report


def interleaved(fns: dict, repeats: int) -> dict:
    for f in fns.values():
        f()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    tokens, dim, heads = args.batch * 197, 384, 6
    x = torch.randn(tokens, dim)
    rows = []
    with torch.inference_mode():
        ffn = {}
        for w in range(1224, 1241):
            w1, w2 = torch.randn(w, dim), torch.randn(dim, w)
            h = torch.randn(tokens, w)
            ffn[w] = (lambda w1=w1, w2=w2, h=h: (F.linear(x, w1), F.linear(h, w2)), 2 * tokens * dim * w)
        t = interleaved({w: f for w, (f, _) in ffn.items()}, args.repeats)
        rows += [{"kind": "ffn (fc1 + fc2)", "width": w, "ms": t[w] * 1e3, "ns_per_mac": t[w] / m * 1e9}
                 for w, (_, m) in ffn.items()]
        res = {}  # the residual width: the K of the GEMMs reading the stream, N of those writing it
        for d in range(376, 393):
            xd, wi, wo, g = torch.randn(tokens, d), torch.randn(1536, d), torch.randn(d, 1536), torch.randn(d)
            h = torch.randn(tokens, 1536)
            res[d] = (lambda xd=xd, wi=wi, wo=wo, g=g, d=d: (
                F.linear(F.layer_norm(xd, (d,), g, g), wi), xd + F.linear(h, wo, g)), 2 * tokens * d * 1536)
        t = interleaved({d: f for d, (f, _) in res.items()}, args.repeats)
        rows += [{"kind": "residual (LayerNorm, GEMMs in and out, add)", "width": d, "ms": t[d] * 1e3,
                  "ns_per_mac": t[d] / m * 1e9} for d, (_, m) in res.items()]
        att = {}
        for w in range(20, 41):
            q, k, v = (torch.randn(args.batch, heads, 197, w) for _ in range(3))
            wq = torch.randn(heads * 3 * w, dim)
            att[w] = (lambda q=q, k=k, v=v, wq=wq: (F.linear(x, wq), F.scaled_dot_product_attention(q, k, v)),
                      tokens * dim * heads * 3 * w + 2 * args.batch * heads * 197 * 197 * w)
        t = interleaved({w: f for w, (f, _) in att.items()}, args.repeats)
        rows += [{"kind": "head (qkv GEMM + fused attention)", "width": w, "ms": t[w] * 1e3,
                  "ns_per_mac": t[w] / m * 1e9} for w, (_, m) in att.items()]
        sdpa = {}  # the fused kernel alone over the head widths pruning leaves: its cost is not its MACs
        for w in range(8, 65, 8):
            q, k, v = (torch.randn(args.batch, heads, 197, w) for _ in range(3))
            sdpa[w] = (lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v),
                       2 * args.batch * heads * 197 * 197 * w)
        t = interleaved({w: f for w, (f, _) in sdpa.items()}, args.repeats)
        rows += [{"kind": "fused attention alone", "width": w, "ms": t[w] * 1e3, "ns_per_mac": t[w] / m * 1e9}
                 for w, (_, m) in sdpa.items()]
    report("widths", [("kind", "kind", "s"), ("width", "width", "d"), ("ms", "ms", ".2f"),
                      ("ns per MAC", "ns_per_mac", ".4f")], rows)


if __name__ == "__main__":
    main()
