"""Hand-written transformers for the tests.

``PlainViT`` takes per-block widths (heads, q/k dim, v dim, FFN hidden) and an
embedding width, so a pruned model can be rebuilt independently of snp_fx
(the residual-pruning oracle).  Its attention is written with separate q/k/v
Linears and explicit matmuls, in several forms.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn


@dataclasses.dataclass
class BlockSpec:
    heads: int = 4
    qk_dim: int = 8
    v_dim: int = 8
    hidden: int = 64


class SeparateQKVAttention(nn.Module):
    """q, k, v Linears, view into heads, transpose, explicit attention."""

    def __init__(self, dim, spec: BlockSpec, form="matmul", qk_bias=True, scale=None):
        super().__init__()
        self.h, self.dqk, self.dv = spec.heads, spec.qk_dim, spec.v_dim
        self.form = form
        self.scale = scale if scale is not None else 8 ** -0.5  # explicit: survives pruning
        self.sdpa_scale = None  # None: sdpa's default 1/sqrt(width), which pruning must not change
        self.q = nn.Linear(dim, self.h * self.dqk, bias=qk_bias)
        self.k = nn.Linear(dim, self.h * self.dqk, bias=qk_bias)
        self.v = nn.Linear(dim, self.h * self.dv)
        self.proj = nn.Linear(self.h * self.dv, dim)

    def forward(self, x):
        B, N, _ = x.shape
        q = self.q(x).view(B, N, self.h, self.dqk).transpose(1, 2)
        k = self.k(x).view(B, N, self.h, self.dqk).transpose(1, 2)
        v = self.v(x).view(B, N, self.h, self.dv).transpose(1, 2)
        if self.form in ("matmul", "head_last"):  # scale before the product
            attn = (q * self.scale) @ k.transpose(-2, -1)
        elif self.form == "matmul_after":
            attn = torch.matmul(q, k.transpose(-2, -1)) * self.scale
        elif self.form == "einsum":
            attn = torch.einsum("bhid,bhjd->bhij", q, k) * self.scale
        elif self.form == "bmm":
            attn = torch.bmm(q.reshape(B * self.h, N, self.dqk),
                             k.reshape(B * self.h, N, self.dqk).transpose(1, 2)).view(B, self.h, N, N)
            attn = attn * self.scale
        elif self.form == "baddbmm":  # Bloom's: a position bias (ALiBi) added in the same op
            bias = torch.arange(N, dtype=x.dtype).view(1, 1, N) * -0.1
            attn = torch.baddbmm(bias, q.reshape(B * self.h, N, self.dqk), k.reshape(B * self.h, N, self.dqk)
                                 .transpose(1, 2), alpha=self.scale).view(B, self.h, N, N)
        elif self.form == "sdpa":
            out = nn.functional.scaled_dot_product_attention(q, k, v, scale=self.sdpa_scale)
            return self.proj(out.transpose(1, 2).reshape(B, N, self.h * self.dv))
        else:
            raise ValueError(self.form)
        attn = attn.softmax(dim=-1)
        if self.form == "einsum":
            out = torch.einsum("bhij,bhjd->bhid", attn, v)
        else:
            out = attn @ v
        if self.form == "head_last":  # NesT's layout: channel = d * heads + h
            return self.proj(out.permute(0, 2, 3, 1).reshape(B, N, self.h * self.dv))
        out = out.transpose(1, 2).reshape(B, N, self.h * self.dv)
        return self.proj(out)


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim, spec: BlockSpec, form="matmul"):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = SeparateQKVAttention(dim, spec, form)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, spec.hidden)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PlainViT(nn.Module):
    """A small ViT with per-block widths; ``pool`` is "cls" (x[:, 0]) or "mean"."""

    def __init__(self, dim=32, blocks=None, img=32, patch=8, classes=10, form="matmul", pool="cls"):
        super().__init__()
        blocks = blocks if blocks is not None else (BlockSpec(), BlockSpec())
        self.patch_embed = nn.Conv2d(3, dim, patch, patch)
        n = (img // patch) ** 2
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, n + 1, dim) * 0.02)
        self.blocks = nn.ModuleList(Block(dim, s, form) for s in blocks)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)
        self.pool = pool

    def forward(self, x):
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        x = self.norm(x)
        x = x[:, 0] if self.pool == "cls" else x.mean(dim=1)
        return self.head(x)


class MHATransformer(nn.Module):
    """Uses nn.MultiheadAttention, which fx keeps as one leaf module."""

    def __init__(self, dim=32, heads=4, hidden=64, depth=2):
        super().__init__()
        self.embed = nn.Linear(16, dim)
        self.attn = nn.ModuleList(nn.MultiheadAttention(dim, heads, batch_first=True) for _ in range(depth))
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(depth))
        self.mlps = nn.ModuleList(Mlp(dim, hidden) for _ in range(depth))
        self.head = nn.Linear(dim, 5)

    def forward(self, x):
        x = self.embed(x)
        for attn, norm, mlp in zip(self.attn, self.norms, self.mlps):
            h = norm(x)
            x = x + attn(h, h, h, need_weights=False)[0]
            x = x + mlp(x)
        return self.head(x.mean(1))


def randomize_norms(model: nn.Module, seed=0) -> nn.Module:
    """Give LayerNorms non-trivial affine parameters (init is 1/0)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.LayerNorm) and m.weight is not None:
            with torch.no_grad():
                m.weight.copy_(1 + 0.2 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=g))
    return model


def randomize_constants(model: nn.Module) -> nn.Module:
    """Some inits are constant (zero heads, layer scales of 1e-5): make every output depend on every
    weight, so an oracle comparing outputs can see what pruning removed."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if bool((p == p.flatten()[0]).all()):
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return randomize_norms(model)
