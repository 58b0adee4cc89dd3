"""A hand-written transformer pruned by snp_fx as one pass among others in a torch.fx PassManager.

    drop_dropout  ->  SNPPass (q/k, v, FFN, residual)  ->  attention_to_sdpa  [->  torch.compile]

`drop_dropout` removes Dropout nodes before pruning; `attention_to_sdpa` runs after it and replaces
the explicit `softmax(q @ k^T * scale) @ v` of the pruned graph with one
`scaled_dot_product_attention` call (snp_fx.kernels.padded_sdpa: on the fused kernel even where
pruning left q/k and v with different head widths).  Each step is checked: outputs before and after the other
passes must agree, and the pruned model must be smaller.

    python examples/custom_transformer.py
    python examples/custom_transformer.py --compile      # also torch.compile the result (needs a C++ compiler)
    python examples/custom_transformer.py --dim 64 --hidden 128 --depth 2 --length 16 --batch 2   # a small one
"""
from __future__ import annotations

import argparse
import operator

import torch
import torch.fx as fx
import torch.nn as nn
from torch.fx.passes.infra.pass_base import PassResult
from torch.fx.passes.infra.pass_manager import PassManager

import snp_fx
from snp_fx.kernels import padded_sdpa
from snp_fx.cost import count_macs, count_params
from snp_fx.report import load_warning, time_interleaved
from snp_fx.verify import relative_error


class Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads, self.scale = heads, (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.drop = nn.Dropout(0.1)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        attn = (q @ k.transpose(-2, -1)) * self.scale
        attn = self.drop(attn.softmax(dim=-1))
        return self.proj((attn @ v).transpose(1, 2).reshape(B, N, C))


class Block(nn.Module):
    def __init__(self, dim, heads, hidden):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(0.1), nn.Linear(hidden, dim))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TextClassifier(nn.Module):
    """Token embedding + learned positions, pre-norm blocks, mean pooling, a linear classifier."""

    def __init__(self, vocab=1000, length=64, dim=256, heads=8, hidden=1024, depth=4, classes=5):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.randn(1, length, dim) * 0.02)
        self.blocks = nn.Sequential(*(Block(dim, heads, hidden) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, ids):
        x = self.blocks(self.embed(ids) + self.pos)
        return self.head(self.norm(x).mean(dim=1))


# ---------------------------------------------------------------------------
# Passes: GraphModule -> PassResult
# ---------------------------------------------------------------------------

def drop_dropout(gm: fx.GraphModule) -> PassResult:
    """Dropout is the identity at inference: route its input to its users and delete it."""
    modules = dict(gm.named_modules())
    n_removed = 0
    for n in list(gm.graph.nodes):
        if n.op == "call_module" and isinstance(modules[n.target], nn.Dropout):
            n.replace_all_uses_with(n.args[0])
            gm.graph.erase_node(n)
            n_removed += 1
    gm.graph.lint()
    gm.recompile()
    print(f"drop_dropout: removed {n_removed} Dropout nodes")
    return PassResult(gm, n_removed > 0)


def _is_method(n, name):
    return isinstance(n, fx.Node) and n.op == "call_method" and n.target == name


def attention_to_sdpa(gm: fx.GraphModule) -> PassResult:
    """softmax((q @ k.transpose(-2, -1)) * scale, dim=-1) @ v  ->  padded_sdpa(q, k, v, scale=scale)."""
    n_fused = 0
    for av in list(gm.graph.nodes):
        if not (av.op == "call_function" and av.target is operator.matmul and _is_method(av.args[0], "softmax")):
            continue
        sm, v = av.args
        mul = sm.args[0]
        if len(sm.users) != 1 or sm.kwargs.get("dim", sm.args[1] if len(sm.args) > 1 else None) not in (-1, 3):
            continue
        if not (isinstance(mul, fx.Node) and mul.target is operator.mul and isinstance(mul.args[1], float)):
            continue
        qk, scale = mul.args
        if not (isinstance(qk, fx.Node) and qk.target is operator.matmul and _is_method(qk.args[1], "transpose")
                and tuple(qk.args[1].args[1:]) in ((-2, -1), (-1, -2))):
            continue
        q, k = qk.args[0], qk.args[1].args[0]
        with gm.graph.inserting_before(av):
            # padded_sdpa: scaled_dot_product_attention that stays on the fused kernel when pruning
            # left q/k and v with different head widths (snp_fx/kernels.py)
            fused = gm.graph.call_function(padded_sdpa, (q, k, v), {"scale": scale})
        av.replace_all_uses_with(fused)
        gm.graph.erase_node(av)
        n_fused += 1
    gm.graph.eliminate_dead_code()  # the softmax, mul, matmul and transpose nodes now unused
    gm.graph.lint()
    gm.recompile()
    print(f"attention_to_sdpa: fused {n_fused} attention blocks")
    return PassResult(gm, n_fused > 0)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ratios", default="qk=0.5,v=0.25,ffn=0.5,residual=0.25", help="fraction removed per kind")
    ap.add_argument("--compile", action="store_true", help="torch.compile the result and check it")
    ap.add_argument("--dim", type=int, default=256, help="model width")
    ap.add_argument("--heads", type=int, default=8, help="attention heads (must divide --dim)")
    ap.add_argument("--hidden", type=int, default=1024, help="FFN width")
    ap.add_argument("--depth", type=int, default=4, help="transformer blocks")
    ap.add_argument("--length", type=int, default=64, help="tokens per sequence")
    ap.add_argument("--batch", type=int, default=8, help="sequences per batch")
    args = ap.parse_args(argv)
    from snp_fx.cli import parse_ratios

    torch.manual_seed(0)
    model = TextClassifier(length=args.length, dim=args.dim, heads=args.heads, hidden=args.hidden,
                           depth=args.depth).eval()
    ids = torch.randint(0, 1000, (args.batch, args.length))
    gm = fx.symbolic_trace(model)

    passes = [drop_dropout, snp_fx.SNPPass(ids, ratios=parse_ratios(args.ratios), progress=False), attention_to_sdpa]
    out = PassManager(passes=passes)(gm)
    final = out.graph_module

    # check each step against an independent path: the same SNP pass alone, without the other passes
    pruned_alone = snp_fx.prune(model, ids, ratios=parse_ratios(args.ratios), progress=False)
    with torch.inference_mode():
        err = relative_error(final(ids), pruned_alone(ids))
    print(f"PassManager result vs snp_fx.prune alone: relative error {err:.1e}")
    assert err < 1e-4, "the surrounding passes changed what the model computes"
    assert not any(n.target == "softmax" for n in final.graph.nodes)

    print("\n| | dense | after the passes |\n|---|---|---|")
    p0, p1 = count_params(model), count_params(final)
    m0, m1 = count_macs(model, (ids,)), count_macs(final, (ids,))
    print(f"| params | {p0 / 1e6:.2f} M | {p1 / 1e6:.2f} M ({p1 / p0:.0%}) |")
    print(f"| MACs (per sequence of {args.length} tokens) | {m0 / 1e6:.1f} M | {m1 / 1e6:.1f} M ({m1 / m0:.0%}) |")
    models = {"dense": model, "pruned": pruned_alone, "pruned + sdpa": final}
    if args.compile:
        compiled = torch.compile(final)
        with torch.inference_mode():
            print(f"torch.compile: relative error {relative_error(compiled(ids), final(ids)):.1e}")
        models["compiled"] = compiled
    lat = time_interleaved(models, (ids,), repeats=10)
    print(f"| latency (batch {args.batch}) | " + f"{lat['dense'] * 1e3:.1f} ms | "
          + ", ".join(f"{k}: {v * 1e3:.1f} ms" for k, v in lat.items() if k != "dense") + " |")
    busy = load_warning()  # other jobs on the CPUs: the times are not to be trusted
    if busy:
        print(f"\nLatency {busy}.")


if __name__ == "__main__":
    main()
