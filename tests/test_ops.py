"""The op registry's specification: one row per op family (fx and ATen spellings).

Each row is a tiny model running that family's ops on channels.  Every row is analysed with
each front-end it lists and must (1) contain a node of that family, (2) give back the original
outputs for an empty plan, (3) equal the masked original on random plans, and (4) have
something prunable.  ``test_every_family_has_a_row`` makes a new family without a row fail.
Adding an op is one file (snp_fx/ops/) plus one row here.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from models import PlainViT, randomize_norms
from oracles import check_mask_equivalence, sharpen

import snp_fx
from snp_fx import ops
from snp_fx.ops import registry
from snp_fx.ops.cache import CacheWrite, CopyInto
from snp_fx.ops.experts import Counts, GroupedMM, IndexPut
from snp_fx.ops.rms_norm import RMSNorm
from snp_fx.planning import PruningPlan, keep_mask
from snp_fx.rewrite import rewrite
from snp_fx.verify import relative_error

C, H = 8, 12  # model width, inner width


@torch.fx.wrap
def swap_halves(t):
    """A python helper fx keeps whole; it only moves data (the probe finds out)."""
    return torch.cat([t[:, t.shape[1] // 2:], t[:, :t.shape[1] // 2]], dim=1)


class Sandwich(nn.Module):
    """x + down(mid(up(x))) on tokens (B, N, C): the inner width H is an FFN group."""

    def __init__(self, mid, up=H):
        super().__init__()
        self.up, self.down, self.mid = nn.Linear(C, up), nn.Linear(H, C), mid
        self.register_buffer("offset", torch.randn(H))       # a constant operand: gathered, not coupled
        self.gain = nn.Parameter(torch.rand(H) + 0.5)         # a parameter operand: coupled

    def forward(self, x):
        return x + self.down(self.mid(self, self.up(x)))


class Channels(nn.Module):
    """Channels-first images (B, C, S, S): conv up -> mid -> conv down."""

    def __init__(self, mid_module=None, mid=None, up=None):
        super().__init__()
        self.up = up or nn.Conv2d(C, H, 1)
        self.m = mid_module if mid_module is not None else nn.Identity()
        self.mid = mid or (lambda s, y: s.m(y))
        self.down = nn.Conv2d(H, C, 1)

    def forward(self, x):
        return self.down(F.relu(self.mid(self, self.up(x))))


class Tokens(nn.Module):
    """Token ids -> Embedding -> a residual FFN -> norm -> head."""

    def __init__(self, norm):
        super().__init__()
        self.emb = nn.Embedding(20, C)
        self.ffn = Sandwich(lambda s, y: F.gelu(y))
        self.norm, self.head = norm, nn.Linear(C, 3)

    def forward(self, ids):
        return self.head(self.norm(self.ffn(self.emb(ids))).mean(1))


class Conv1D(nn.Module):
    """GPT-2's Conv1D: addmm(bias, x, W) with W stored (in, out)."""

    def __init__(self, n_in, n_out):
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.randn(n_in, n_out) * 0.3), nn.Parameter(torch.randn(n_out))

    def forward(self, x):
        B, N, _ = x.shape
        return torch.addmm(self.bias, x.reshape(B * N, -1), self.weight).view(B, N, -1)


class AddmmFFN(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.proj = Conv1D(C, H), Conv1D(H, C)

    def forward(self, x):
        return x + self.proj(F.gelu(self.fc(x)))


def _glu(s, y):
    a, b = y.chunk(2, dim=-1)
    return a * torch.sigmoid(b)


def _indexing(s, y):
    head, tail = y.split([4, H - 4], dim=-1)
    y = torch.cat([head, tail.narrow(-1, 0, H - 4)], dim=-1)[:, 1:]
    return torch.cat([y[:, :1], y], dim=1).index_select(1, torch.tensor([1, 0, 2, 3, 4]))


def _reshape(s, y):
    B, N, _ = y.size()
    return y.reshape(B * N, H).view(B, N, -1).unsqueeze(2).flatten(2).unflatten(-1, (1, H)).reshape(B, N, -1)


def _movement(s, y):
    return y.unsqueeze(1).transpose(1, 2).squeeze(2).flip(1).roll(1, 1).contiguous()


def _elementwise(s, y):
    return (F.gelu(y) * s.gain + s.offset - y.sigmoid()) / 2 + torch.zeros_like(y)


def _elementwise_more(s, y):
    """Element-wise max / min of two tensors (T5's bucket code), multiply, clamp bounds, in-place fills."""
    z = torch.max(y, torch.multiply(y, s.gain)) - torch.min(y, F.gelu(y)) * torch.zeros_like(y).fill_(0.5)
    return z.clamp_min(-2.0).clamp(max=s.gain) + torch.empty_like(y).zero_()


def _along_dim(s, y):
    """topk / sort / cumsum along tokens, not along channels."""
    return y.topk(y.shape[1], dim=1).values + y.sort(dim=1).values * 0.5 + y.cumsum(1) * 0.1


def _transposed_weight(s, y):
    """x @ W.T with W a parameter (Falcon's linear layers): a linear map, not an attention product."""
    return y @ s.w.T


def _factory(s, y):
    return y + torch.arange(y.shape[1], dtype=y.dtype)[:, None] * torch.ones(1)


def _meshgrid(s, y):
    """Positions from a meshgrid of ranges (Pixtral's patch grid): a constant added to channels."""
    rows, cols = torch.meshgrid(torch.arange(y.shape[1], dtype=y.dtype), torch.arange(2, dtype=y.dtype),
                                indexing="ij")
    return y + (rows + cols).sum(-1, keepdim=True)


def _reduce(s, y):
    return y - y.mean(1, keepdim=True) + y.softmax(dim=1) + y.amax(1, keepdim=True)


def _pad(s, y):
    return F.pad(y, (0, 0, 1, 1))[:, 1:-1]


def _asserted(s, y):
    torch._assert(y.dim() == 3, "tokens expected")
    return F.relu(y)


def _depthwise(s, y):
    return F.conv2d(y, s.dw, None, padding=1, groups=H)


def _dw(m):
    m.dw = nn.Parameter(torch.randn(H, 1, 3, 3) * 0.3)
    return m


def _functional_linear(s, y):
    return F.linear(y, s.w)


def _sliced_linear(s, y):
    """Weights that are rows of one parameter (nn.MultiheadAttention's in_proj as cross-attention)."""
    return F.linear(y, s.w[:H]) * F.linear(y, s.w.chunk(2)[1])


def _repeat(s, y):
    """repeat along the channel dim: the copies keep the same channels."""
    return y.repeat(1, 1, 2).unflatten(-1, (2, H)).mean(2)


def _with(**params):
    """A Sandwich-making factory with extra parameters on it."""
    def make(mid):
        m = Sandwich(mid)
        for k, v in params.items():
            setattr(m, k, nn.Parameter(v))
        return m
    return make


def _tokens():
    return torch.randn(2, 5, C)


def _image():
    return torch.randn(2, C, 6, 6)


def _ids():
    return torch.randint(0, 20, (2, 7))


def _vit(form):
    return randomize_norms(PlainViT(dim=16, form=form))


def _core_aten(make):
    """The core ATen graph torch.export decomposes to (aten.convolution, native batch norm)."""
    def build():
        ep = torch.export.export(make().eval(), (_image(),)).run_decompositions()
        gm = ep.module()
        gm._forward_pre_hooks.clear()
        return gm
    return build


@torch.library.custom_op("snp_test::grouped_mm_fallback", mutates_args=())
def grouped_mm_loop(input: torch.Tensor, weight: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """transformers' stand-in for ``_grouped_mm`` where aten's cannot run (float32 under export): an
    opaque op, known to the table by its name."""
    out, start = input.new_zeros(input.shape[0], weight.shape[2]), 0
    for e, end in enumerate(offs.tolist()):
        out[start:end] = input[start:end] @ weight[e]
        start = end
    return out


@grouped_mm_loop.register_fake
def _(input, weight, offs):
    return input.new_empty(input.shape[0], weight.shape[2])


class MoE(nn.Module):
    """A mixture-of-experts FFN as transformers runs it: a router picks 2 of 4 experts per token;
    the experts' weights are 3-d parameters (experts, out, in).  "grouped": tokens sorted by expert,
    ``_grouped_mm`` with offsets from ``histc``, the inverse permutation by ``index_put_``;
    "batched": each token's expert weights gathered by id, then ``bmm``."""

    def __init__(self, form, mix=None):
        super().__init__()
        self.form, self.mix, self.gate = form, mix, nn.Linear(C, 4, bias=False)
        self.bias = nn.Parameter(torch.randn(H) * 0.5)
        self.up = nn.Parameter(torch.randn(4, 2 * H, C) * 0.5)
        self.down = nn.Parameter(torch.randn(4, C, H) * 0.5)

    def forward(self, x):
        B, N, _ = x.shape
        h = x.reshape(-1, C)
        weights, idx = self.gate(h).softmax(-1).topk(2, dim=-1)
        if self.form != "batched":
            mm = torch._grouped_mm if self.form == "grouped" else grouped_mm_loop
            ids, perm = idx.reshape(-1).sort()
            offs = torch.histc(ids.float(), bins=4, min=0, max=3).cumsum(0).to(torch.int32)
            g, u = mm(h[perm // 2], self.up.transpose(-2, -1), offs=offs).chunk(2, dim=-1)
            y = mm(self.between(F.silu(g) * u), self.down.transpose(-2, -1), offs=offs)
            inverse = torch.empty_like(perm).index_put_((perm,), torch.arange(perm.shape[0]))
            y = (y * weights.reshape(-1)[perm].unsqueeze(-1))[inverse]
        else:
            ids = idx.reshape(-1)
            g, u = torch.bmm(self.up[ids], h.repeat_interleave(2, dim=0).unsqueeze(-1)).squeeze(-1).chunk(2, dim=-1)
            y = torch.bmm(self.down[ids], self.between(F.silu(g) * u).unsqueeze(-1)).squeeze(-1) * weights.reshape(-1, 1)
        return x + y.view(B * N, 2, C).sum(1).view(B, N, C)

    def between(self, a):
        """What runs between the experts' GEMMs: a shared bias, or token rows moved (another
        expert's row), neither of which allows each expert its own neurons."""
        if self.mix == "bias":
            return a + self.bias
        if self.mix == "rows":
            return torch.cat([a[1:], a[:1]])
        return a


class _Transposed(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.t, self.down = nn.Conv2d(C, H, 1), nn.ConvTranspose2d(H, H, 4, 2, 1), nn.Conv2d(H, C, 1)

    def forward(self, x):
        return self.down(F.relu(self.t(F.relu(self.up(x)))))


class CachedAttention(nn.Module):
    """Attention through a static KV cache, as decoders export it: k and v written in place into
    buffers (heads, length, head dim) at their positions, attention reads the whole buffers (the
    unwritten tail masked), a position counter reset with copy_."""

    def __init__(self, heads=2, hd=6, length=8):
        super().__init__()
        self.h, self.hd, self.length = heads, hd, length
        self.q, self.k, self.v = (nn.Linear(C, heads * hd) for _ in range(3))
        self.proj = nn.Linear(heads * hd, C)
        self.register_buffer("k_cache", torch.zeros(2, heads, length, hd))
        self.register_buffer("v_cache", torch.zeros(2, heads, length, hd))
        self.register_buffer("seen", torch.zeros(1, dtype=torch.long))

    read_again = False  # the k cache read apart from its write too: not understood

    def forward(self, x):
        B, N, _ = x.shape
        q, k, v = (f(x).view(B, N, self.h, self.hd).transpose(1, 2) for f in (self.q, self.k, self.v))
        pos = torch.arange(N)
        self.seen.copy_(pos[-1:] + 1)
        kc, vc = self.k_cache.index_copy_(2, pos, k), self.v_cache.index_copy_(2, pos, v)
        mask = (torch.arange(self.length) < N).expand(N, -1)
        out = F.scaled_dot_product_attention(q, kc, vc, attn_mask=mask)
        if self.read_again:
            out = torch.cat([out, self.k_cache], 2)[:, :, :N]  # the same values, through a second reader
        return x + self.proj(out.transpose(1, 2).reshape(B, N, -1))


class EinsumAttention(nn.Module):
    """XLNet's attention: q/k/v/o are raw (C, heads, head dim) parameters applied by einsum (the
    output projection contracts two letters), q gets a per-head bias (heads, head dim)."""

    def __init__(self, heads=2, hd=6):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Parameter(torch.randn(C, heads, hd) * 0.5) for _ in range(4))
        self.q_bias = nn.Parameter(torch.randn(heads, hd))

    def forward(self, x):
        q = torch.einsum("bic,chd->bihd", x, self.q) + self.q_bias
        k, v = (torch.einsum("bic,chd->bihd", x, w) for w in (self.k, self.v))
        attn = torch.einsum("bihd,bjhd->bhij", q, k).softmax(-1)
        return x + torch.einsum("bihd,chd->bic", torch.einsum("bhij,bjhd->bihd", attn, v), self.o)


class GroupedFFN(nn.Module):
    """SqueezeBERT's grouped 1 x 1 convs on (batch, channels, tokens): the up conv's 2 groups each
    read half the residual and make half the hidden channels (the same count kept in each group)."""

    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Conv1d(C, H, 1, groups=2), nn.Conv1d(H, C, 1)

    def forward(self, x):
        return x + self.down(F.gelu(self.up(x)))


class PositionTable(nn.Module):
    """Two FFNs whose hidden units are scaled by one table over positions, a parameter shared by
    both (RoFormer's sinusoidal embedding of positions, used by every layer's q/k)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = Sandwich(self._scaled), Sandwich(self._scaled)
        self.table = nn.Parameter(torch.rand(5, H) + 0.5)

    def _scaled(self, s, y):
        return F.gelu(y) * F.embedding(torch.arange(y.shape[1]), self.table)

    def forward(self, x):
        return self.b(self.a(x))


def _qk_norm_vit():
    """timm's ViT with qk_norm: a LayerNorm over each head's q and k (nn.LayerNorm(head_dim))."""
    timm = pytest.importorskip("timm")
    model = timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, qk_norm=True, num_classes=10)
    return sharpen(model)  # q/k mistakes must show above the tolerance


def _seq():
    return torch.randn(2, C, 5)


ATTN = {"qk": 0.5, "v": 0.25, "heads": 0.5}
# (id, model factory, input factory, {frontend: family the graph must contain}, ratios)
FFN = {"ffn": 0.4}
ROWS = [
    ("unary", lambda: Sandwich(lambda s, y: F.gelu(y).relu_()), _tokens, {"fx": ops.Unary, "export": ops.Unary}, FFN),
    ("elementwise", lambda: Sandwich(_elementwise), _tokens, {"fx": ops.Binary, "export": ops.Binary}, FFN),
    ("like", lambda: Sandwich(_elementwise), _tokens, {"fx": ops.Like, "export": ops.Like}, FFN),
    ("elementwise_more", lambda: Sandwich(_elementwise_more), _tokens, {"fx": ops.Reduce, "export": ops.Binary},
     FFN),
    ("along_dim", lambda: Sandwich(_along_dim), _tokens, {"fx": ops.AlongDim, "export": ops.AlongDim}, FFN),
    ("transposed_weight", lambda: _with(w=torch.randn(H, H) * 0.3)(_transposed_weight), _tokens,
     {"fx": ops.Matmul, "export": ops.Matmul}, FFN),
    ("factory", lambda: Sandwich(_factory), _tokens, {"fx": ops.Factory, "export": ops.Factory}, FFN),
    ("meshgrid", lambda: Sandwich(_meshgrid), _tokens, {"fx": ops.Meshgrid, "export": ops.Meshgrid}, FFN),
    ("shape", lambda: Sandwich(_reshape), _tokens, {"fx": ops.Shape}, FFN),
    ("assert", lambda: Sandwich(_asserted), _tokens, {"fx": ops.Ignore}, FFN),
    ("move", lambda: Sandwich(_movement), _tokens, {"fx": ops.Move, "export": ops.Move}, FFN),
    ("repeat", lambda: Sandwich(_repeat), _tokens, {"fx": ops.Move, "export": ops.Move}, FFN),
    ("reshape", lambda: Sandwich(_reshape), _tokens, {"fx": ops.Reshape, "export": ops.Reshape}, FFN),
    ("flatten", lambda: Sandwich(_reshape), _tokens, {"fx": ops.Flatten}, FFN),
    ("index", lambda: Sandwich(_indexing), _tokens, {"fx": ops.Index, "export": ops.Index}, FFN),
    ("chunk", lambda: Sandwich(_glu, up=2 * H), _tokens, {"fx": ops.Index, "export": ops.Index}, FFN),
    ("wrapped", lambda: Sandwich(lambda s, y: swap_halves(y)), _tokens, {"fx": "swap_halves"}, FFN),
    ("pad", lambda: Sandwich(_pad), _tokens, {"fx": ops.Pad, "export": ops.Pad}, FFN),
    ("reduce_softmax", lambda: Sandwich(_reduce), _tokens, {"fx": ops.Softmax, "export": ops.Reduce}, FFN),
    ("linear", lambda: _with(w=torch.randn(H, H) * 0.3)(_functional_linear), _tokens,
     {"fx": ops.Linear, "export": ops.Linear}, FFN),
    ("linear_sliced_weight", lambda: _with(w=torch.randn(2 * H, H) * 0.3)(_sliced_linear), _tokens,
     {"fx": ops.Linear, "export": ops.Linear}, FFN),
    ("addmm", AddmmFFN, _tokens, {"fx": ops.Addmm, "export": ops.Addmm}, FFN),
    ("embedding", lambda: Tokens(nn.LayerNorm(C)), _ids, {"fx": ops.Embedding, "export": ops.Embedding},
     {"ffn": 0.4, "residual": 0.25}),
    ("conv", lambda: _dw(Channels(mid=_depthwise)), _image, {"fx": ops.Conv, "export": ops.Conv}, FFN),
    ("conv_grouped", GroupedFFN, _seq, {"fx": ops.Conv, "export": ops.Conv}, FFN),
    ("conv_transpose", _Transposed, _image, {"fx": ops.ConvTranspose, "export": ops.ConvTranspose}, FFN),
    ("convolution", _core_aten(_Transposed), _image, {"fx": ops.Convolution}, FFN),
    ("pool", lambda: Channels(nn.AvgPool2d(3, 1, 1)), _image, {"fx": ops.Pool, "export": ops.Pool}, FFN),
    ("batch_norm", lambda: Channels(nn.BatchNorm2d(H)), _image, {"fx": ops.BatchNorm, "export": ops.BatchNorm},
     FFN),
    ("batch_norm_core", _core_aten(lambda: Channels(nn.BatchNorm2d(H))), _image, {"fx": ops.BatchNorm}, FFN),
    ("group_norm", lambda: Channels(nn.GroupNorm(1, H)), _image, {"fx": ops.GroupNorm, "export": ops.GroupNorm},
     {"residual": 0.4}),
    ("layer_norm", lambda: _vit("matmul"), lambda: torch.randn(2, 3, 32, 32),
     {"fx": ops.LayerNorm, "export": ops.LayerNorm}, {"qk": 0.5, "v": 0.25, "ffn": 0.3, "residual": 0.25}),
    ("matmul", lambda: _vit("matmul"), lambda: torch.randn(2, 3, 32, 32), {"fx": ops.Matmul, "export": ops.Matmul},
     {"qk": 0.5, "v": 0.25, "heads": 0.5}),
    ("bmm", lambda: _vit("bmm"), lambda: torch.randn(2, 3, 32, 32), {"fx": ops.Matmul, "export": ops.Matmul},
     {"qk": 0.5, "v": 0.25}),
    ("baddbmm", lambda: _vit("baddbmm"), lambda: torch.randn(2, 3, 32, 32), {"fx": ops.Baddbmm, "export": ops.Baddbmm},
     {"qk": 0.5, "v": 0.25}),
    ("einsum", lambda: _vit("einsum"), lambda: torch.randn(2, 3, 32, 32), {"fx": ops.Einsum, "export": ops.Einsum},
     {"qk": 0.5, "v": 0.25}),
    ("rms_norm", lambda: Tokens(nn.RMSNorm(C)), _ids, {"fx": RMSNorm, "export": RMSNorm}, {"ffn": 0.4, "residual": 0.25}),
    ("rms_norm_functional", lambda: _with(w=torch.rand(H) + 0.5)(lambda s, y: F.rms_norm(y, (H,), s.w, 1e-6)),
     _tokens, {"fx": RMSNorm, "export": RMSNorm}, {"residual": 0.4}),
    ("cache_write", CachedAttention, _tokens, {"fx": CacheWrite, "export": CacheWrite}, ATTN),
    ("copy_into", CachedAttention, _tokens, {"fx": CopyInto, "export": CopyInto}, ATTN),
    ("grouped_mm", lambda: MoE("grouped"), _tokens, {"fx": GroupedMM}, {"ffn": 0.4, "residual": 0.25}),
    ("grouped_mm_loop", lambda: MoE("loop"), _tokens, {"fx": GroupedMM, "export": GroupedMM},
     {"ffn": 0.4, "residual": 0.25}),
    ("counts", lambda: MoE("loop"), _tokens, {"fx": Counts, "export": Counts}, FFN),
    ("index_put", lambda: MoE("loop"), _tokens, {"fx": IndexPut, "export": IndexPut}, FFN),
    ("experts_gathered", lambda: MoE("batched"), _tokens, {"fx": ops.Matmul, "export": ops.Matmul},
     {"ffn": 0.4, "residual": 0.25}),
    ("einsum_weight", EinsumAttention, _tokens, {"fx": ops.Einsum, "export": ops.Einsum}, ATTN),
    ("position_table", PositionTable, _tokens, {"fx": ops.Binary, "export": ops.Binary}, FFN),
    ("layer_norm_qk", _qk_norm_vit, lambda: torch.randn(2, 3, 32, 32), {"fx": ops.LayerNorm, "export": ops.LayerNorm},
     {"qk": 0.5, "v": 0.25}),
    ("sdpa", lambda: _vit("sdpa"), lambda: torch.randn(2, 3, 32, 32), {"fx": ops.SDPA, "export": ops.SDPA},
     {"qk": 0.5, "v": 0.25, "heads": 0.5}),
]


def _cases():
    for rid, make, inputs, fronts, ratios in ROWS:
        for frontend, family in fronts.items():
            yield pytest.param(make, inputs, frontend, family, ratios, id=f"{rid}-{frontend}")


def _families(gm):
    modules = dict(gm.named_modules())
    return {type(ops.family_of(n, modules)[1]) for n in gm.graph.nodes
            if n.op in ("call_function", "call_method", "call_module")}


@pytest.mark.parametrize("make, inputs, frontend, family, ratios", list(_cases()))
def test_row(make, inputs, frontend, family, ratios):
    torch.manual_seed(0)
    model = make()
    model = model if isinstance(model, torch.fx.GraphModule) else model.eval()
    x = inputs()
    a = snp_fx.analyze(model, x, frontend=frontend)
    if isinstance(family, str):  # a wrapped python function: one node, followed on labels
        assert any(getattr(n.target, "__name__", "") == family for n in a.gm.graph.nodes)
    else:
        assert family in _families(a.gm), f"no {family.__name__} node in the {frontend} graph"
    assert not a.unknown_ops, a.unknown_ops
    assert any(g.kind in ratios for g in a.prunable()), str(a)
    # identity: an empty plan gives the original outputs
    with torch.no_grad():
        same = rewrite(a, keep_mask(a, PruningPlan({})))
        assert relative_error(same(*a.inputs), a.gm(*a.inputs)) < 1e-6
    for seed in (0, 1):
        check_mask_equivalence(a, ratios, seed)


def test_grouped_mm_widths_are_aligned():
    """aten's _grouped_mm takes rows of a multiple of 16 bytes: the groups through it are planned in
    steps of 4 float32 channels, and a plan keeping another width is refused, saying why; the opaque
    loop op has no such limit."""
    torch.manual_seed(0)
    a = snp_fx.analyze(MoE("grouped").eval(), _tokens(), frontend="fx")
    (ffn,) = a.prunable("ffn")
    assert ffn.width == H and ffn.step == 4 and all(g.step == 4 for g in a.prunable("residual"))
    assert ffn.slots is not None and ffn.classes.shape == (4, H)  # each expert its own neurons
    p = snp_fx.plan(a, ratios={"ffn": 0.4}, importance="l2")
    assert [len(k) for k in p.groups[ffn.name]["keep"]] == [8] * 4  # 12 * 0.6 = 7.2, to a multiple of 4
    p.groups[ffn.name]["keep"] = [list(range(7))] * 4
    with pytest.raises(snp_fx.SNPError, match="multiples of 4"):
        snp_fx.apply(a, p)
    p.groups[ffn.name]["keep"] = [list(range(8))] * 3 + [list(range(4))]
    with pytest.raises(snp_fx.SNPError, match="same count"):
        snp_fx.apply(a, p)
    loop = snp_fx.analyze(MoE("loop").eval(), _tokens(), frontend="fx")
    assert all(g.step == 1 for g in loop.groups.values())


@pytest.mark.parametrize("form", ["grouped", "loop", "batched"])
@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_moe_experts_own_neurons_or_shared(form, frontend):
    """Each expert keeps its own neurons (a group of (experts, neurons), exact on random plans that
    differ between experts) unless something between the expert GEMMs does not treat token rows as
    their expert's: a bias shared by the experts, or rows moved to other positions.  Then every
    expert keeps the same neurons (one 1-d group), still exact."""
    if form == "grouped" and frontend == "export":
        pytest.skip("aten._grouped_mm is traced through fx here (the loop op stands for it in export)")
    for mix in (None, "bias", "rows"):
        torch.manual_seed(0)
        a = snp_fx.analyze(MoE(form, mix).eval(), _tokens(), frontend=frontend)
        (ffn,) = a.prunable("ffn")
        assert (ffn.slots is not None) == (mix is None) and ffn.classes.dim() == (2 if mix is None else 1), mix
        for seed in (0, 1):
            pruned, plan = check_mask_equivalence(a, {"ffn": 0.4, "residual": 0.25 * seed}, seed)
            if mix is None:
                assert len({tuple(k) for k in plan.groups[ffn.name]["keep"]}) > 1


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_grouped_conv_keeps_the_same_count_in_every_group(frontend):
    """A grouped conv's output channels are planned per group (the same count in each: the pruned conv
    keeps its groups); a plan keeping other counts is refused, saying why."""
    torch.manual_seed(0)
    model = GroupedFFN().eval()
    a = snp_fx.analyze(model, _seq(), frontend=frontend)
    (ffn,) = a.prunable("ffn")
    assert ffn.width == H and ffn.blocks is not None and ffn.step == 2
    p = snp_fx.plan(a, ratios={"ffn": 0.5}, importance="l2")
    keep = p.groups[ffn.name]["keep"]
    assert torch.bincount(ffn.blocks[keep]).tolist() == [3, 3]
    pruned = snp_fx.apply(model, p, None, analysis=a)
    w = [t for name, t in pruned.named_parameters() if name.startswith("up") and t.dim() == 3][0]
    assert w.shape == (6, C // 2, 1)
    p.groups[ffn.name]["keep"] = [i for i in range(H) if ffn.blocks[i] == 0][:4] + \
        [i for i in range(H) if ffn.blocks[i] == 1][:2]
    with pytest.raises(snp_fx.SNPError, match="same count"):
        snp_fx.apply(model, p, None, analysis=a)


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_a_position_table_is_gathered_per_use(frontend):
    """A constant table over positions made from a parameter, multiplied into two FFNs' hidden
    units, is gathered per use (both FFNs prune) and its units are pinned; a per-channel parameter
    (a gain) multiplied in is coupled with the channels and sliced with them."""
    torch.manual_seed(0)
    a = snp_fx.analyze(PositionTable().eval(), _tokens(), frontend=frontend)
    assert [g.name for g in a.prunable("ffn")] == ["a.up", "b.up"], a.reasons()
    assert len(a.gathered) == 2 and any("table" in r for r in a.reasons().values()), a.reasons()
    a = snp_fx.analyze(Sandwich(_elementwise).eval(), _tokens(), frontend=frontend)
    gain = next(n.name for n in a.gm.graph.nodes if n.op == "get_attr" and "gain" in n.target)
    assert not any(gain in ops for ops in a.gathered.values())


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_a_q_k_layer_norm_keeps_the_original_widths_statistics(frontend):
    """A LayerNorm over each head's q / k: q/k prune (the removed channels are zeros in the masked
    original, its weight and bias entries too), the pruned norm counting them in its statistics."""
    torch.manual_seed(0)
    a = snp_fx.analyze(_qk_norm_vit().eval(), torch.randn(2, 3, 32, 32), frontend=frontend)
    assert len(a.prunable("qk")) == 2, a.reasons()
    pruned, _ = check_mask_equivalence(a, {"qk": 0.5}, 0)
    code = pruned.code + "".join(type(m).__name__ for m in pruned.modules())
    assert "layer_norm_of_width" in code or "LayerNormOfWidth" in code


def test_every_family_has_a_row():
    covered = {f for _, _, _, fronts, _ in ROWS for f in fronts.values() if not isinstance(f, str)}
    covered |= {ops.Wrapped, ops.Like}
    families = {type(f) for f in registry._BY_NAME.values()} | {type(f) for _, f in registry._BY_MODULE}
    families |= {type(f) for f in registry._BY_TARGET.values()}
    missing = {f.__name__ for f in families} - {f.__name__ for f in covered}
    assert not missing, f"op families without a conformance row in tests/test_ops.py: {sorted(missing)}"


@torch.fx.wrap
def scaled_gelu(x, alpha: float = 1.5):
    """A user's activation that fx keeps as one opaque call."""
    return alpha * F.gelu(x)


def test_register_op_teaches_an_op():
    """The README's worked example: unknown, the op freezes its channels; registered, it prunes exactly."""
    torch.manual_seed(0)
    model = Sandwich(lambda s, y: scaled_gelu(y)).eval()
    before = snp_fx.analyze(model, _tokens(), frontend="fx")  # ("auto" would export through it)
    assert before.unknown_ops and not before.prunable("ffn")
    snp_fx.register_op(scaled_gelu, snp_fx.ops.Unary())
    after = snp_fx.analyze(model, _tokens(), frontend="fx")
    assert not after.unknown_ops and after.prunable("ffn")
    check_mask_equivalence(after, FFN, 0)
    pruned = snp_fx.prune(model, _tokens(), ratios=FFN, frontend="fx")  # as the README shows it
    assert pruned.down.in_features < H
    with pytest.raises(TypeError, match="OpFamily"):
        snp_fx.register_op(scaled_gelu, "unary")


def test_a_cache_read_apart_from_its_write_is_refused():
    """A KV cache buffer read by something else than its in-place write (fx: a second get_attr of
    it): not understood, its channels are frozen, with the reason.  (torch.export's graph reads the
    written cache through the write's result instead, whose labels are the written k's.)"""
    torch.manual_seed(0)
    model = CachedAttention().eval()
    model.read_again = True
    a = snp_fx.analyze(model, _tokens(), frontend="fx")
    assert "`k_cache` is used elsewhere" in " ".join(a.reasons().values()) and not a.prunable("qk")
    model.read_again = False
    assert snp_fx.analyze(model, _tokens(), frontend="fx").prunable("qk")  # read only where written: prunes


class BrokenRule(ops.Unary):
    def propagate(self, p, n, key, args, kwargs, result):
        raise KeyError("oops")


@torch.fx.wrap
def broken_act(x):
    return F.relu(x)


def test_a_failing_rule_is_an_internal_error_naming_node_and_rule():
    snp_fx.register_op(broken_act, BrokenRule())
    model = Sandwich(lambda s, y: broken_act(y)).eval()
    with pytest.raises(snp_fx.InternalError, match="BrokenRule.*broken_act") as e:
        snp_fx.analyze(model, _tokens())  # not retried with torch.export, not blamed on the inputs
    assert not isinstance(e.value, snp_fx.SNPError) and e.value.rule == "BrokenRule"


class InterleavedQKV(nn.Module):
    """Bloom's fused qkv: the projection's rows are (heads, 3, head_dim), q/k/v interleaved per head."""

    def __init__(self, dim=16, heads=2, hd=8, take="select"):
        super().__init__()
        self.h, self.hd, self.take = heads, hd, take
        self.qkv, self.proj = nn.Linear(dim, heads * 3 * hd), nn.Linear(heads * hd, dim)
        self.fc1, self.fc2 = nn.Linear(dim, 32), nn.Linear(32, dim)

    def forward(self, x):
        B, N, _ = x.shape
        qkv = self.qkv(x).view(B, N, self.h, 3, self.hd)
        q, k, v = qkv.unbind(3) if self.take == "unbind" else (qkv[..., 0, :], qkv[..., 1, :], qkv[..., 2, :])
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        attn = (q @ k.transpose(-2, -1) * self.hd ** -0.5).softmax(-1)
        x = x + self.proj((attn @ v).transpose(1, 2).reshape(B, N, -1))
        return x + self.fc2(F.gelu(self.fc1(x)))


@pytest.mark.parametrize("frontend", ["fx", "export"])
@pytest.mark.parametrize("take", ["select", "unbind"])
def test_interleaved_fused_qkv_keeps_different_qk_and_v_widths(frontend, take):
    """q/k and v keep different widths: the (heads, 3, head_dim) view cannot exist pruned, so each
    of q, k, v is gathered from the pruned projection; the result equals the masked original."""
    torch.manual_seed(0)
    a = snp_fx.analyze(InterleavedQKV(take=take).eval(), torch.randn(2, 5, 16), frontend=frontend)
    assert len(a.sites) == 1 and a.prunable("qk") and a.prunable("v")
    for seed in (0, 1):
        pruned, plan = check_mask_equivalence(a, {"qk": 0.5, "v": 0.25, "ffn": 0.5}, seed)
        widths = {e["kind"]: len(e["keep"][0]) for e in plan.groups.values() if e["kind"] in ("qk", "v")}
        assert widths["qk"] != widths["v"]  # the case the view cannot hold
        (w,) = [p for name, p in pruned.named_parameters() if name.startswith("qkv") and p.dim() == 2]
        assert w.shape[0] == 2 * (2 * widths["qk"] + widths["v"])


class Router(nn.Module):
    """An MoE router: top experts of the gate's logits, over the gate's own channels."""

    def __init__(self):
        super().__init__()
        self.gate, self.fc1, self.fc2 = nn.Linear(C, 4), nn.Linear(C, H), nn.Linear(H, C)

    def forward(self, x):
        weights, idx = self.gate(x).softmax(-1).topk(2, dim=-1)
        return x + self.fc2(F.gelu(self.fc1(x))) * weights.sum(-1, keepdim=True) + idx.float().mean()


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_topk_over_channels_is_refused(frontend):
    a = snp_fx.analyze(Router().eval(), _tokens(), frontend=frontend)
    (gate,) = [g for g in a.groups.values() if g.width == 4]  # the gate's experts
    assert not gate.prunable and "`topk` over channels" in gate.reason
    assert a.prunable("ffn")
    check_mask_equivalence(a, FFN, 0)


def test_max_of_two_tensors_is_elementwise_max_over_a_dim_a_reduction():
    """aten.max.other is element-wise (Binary, by overload); aten.max.dim is a reduction."""
    def node(op):
        g = torch.fx.Graph()
        return g.call_function(op, (g.placeholder("x"), 1))
    assert isinstance(ops.family_of(node(torch.ops.aten.max.other), {})[1], ops.Binary)
    assert isinstance(ops.family_of(node(torch.ops.aten.min.other), {})[1], ops.Binary)
    assert isinstance(ops.family_of(node(torch.ops.aten.max.dim), {})[1], ops.Reduce)
