"""ATen / functional vocabulary of the analysis: functional batch norm, depthwise functional conv,
transposed convs (module and ATen), attention written as v @ attn^T.

Small hand-written conv models, analysed through torch.fx (F.* calls, modules) and torch.export
(ATen ops with get_attr parameters); each must prune and equal the masked original."""
import pytest
import torch
import torch.nn.functional as F
from oracles import check_mask_equivalence, random_scores
from torch import nn

import snp_fx
from snp_fx.planning import keep_mask, make_plan
from snp_fx.cost import count_macs, estimate_macs
from snp_fx.rewrite import rewrite

C, HID = 4, 8


def _param(*shape):
    return nn.Parameter(torch.randn(*shape) * 0.5)


class FunctionalBN(nn.Module):
    """conv 1x1 -> F.batch_norm (parameters and running statistics as attributes) -> conv 1x1."""

    def __init__(self):
        super().__init__()
        self.up = nn.Conv2d(C, HID, 1)
        self.weight, self.bias = _param(HID), _param(HID)
        self.register_buffer("running_mean", torch.randn(HID))
        self.register_buffer("running_var", torch.rand(HID) + 0.5)
        self.down = nn.Conv2d(HID, C, 1)

    def forward(self, x):
        y = F.batch_norm(self.up(x), self.running_mean, self.running_var, self.weight, self.bias, False, 0.1, 1e-5)
        return self.down(F.relu(y))


class FunctionalDepthwise(nn.Module):
    """conv 1x1 -> F.conv2d(groups=HID // group_size) -> conv 1x1."""

    def __init__(self, group_size=1):
        super().__init__()
        self.group_size = group_size
        self.up = nn.Conv2d(C, HID, 1)
        self.dw_weight, self.dw_bias = _param(HID, group_size, 3, 3), _param(HID)
        self.down = nn.Conv2d(HID, C, 1)

    def forward(self, x):
        y = F.conv2d(self.up(x), self.dw_weight, self.dw_bias, padding=1, groups=HID // self.group_size)
        return self.down(F.gelu(y))


class Upsample(nn.Module):
    """conv 1x1 -> ConvTranspose (dense: HID -> 2 HID, depthwise: HID -> HID, or grouped) -> conv 1x1."""

    def __init__(self, kind="dense", dims=2):
        super().__init__()
        conv, convt = (nn.Conv2d, nn.ConvTranspose2d) if dims == 2 else (nn.Conv1d, nn.ConvTranspose1d)
        out, groups = {"dense": (2 * HID, 1), "depthwise": (HID, HID), "grouped": (HID, 2)}[kind]
        self.up = conv(C, HID, 1)
        self.t = convt(HID, out, 4, stride=2, padding=1, groups=groups)
        self.down = conv(out, C, 1)

    def forward(self, x):
        return self.down(F.relu(self.t(F.relu(self.up(x)))))


def _inputs(dims=2):
    torch.manual_seed(0)
    return torch.randn(2, C, 6, 6) if dims == 2 else torch.randn(2, C, 6)


def _analyze(model, frontend, dims=2):
    torch.manual_seed(1)
    return snp_fx.analyze(model.eval(), _inputs(dims), frontend=frontend)


def _hidden_groups(a):
    """The widths inside the model (the last conv's output is the model output: never prunable)."""
    return [g for g in a.groups.values() if g.kind == "ffn" and g.name != "down"]


def _check(a, n_groups, seeds=(0, 1, 2)):
    """Every hidden width is a prunable group, and random plans equal the masked original."""
    groups = _hidden_groups(a)
    assert len(groups) == n_groups and all(g.prunable for g in groups), str(a)
    assert not a.unknown_ops, a.unknown_ops
    for seed in seeds:
        check_mask_equivalence(a, {"ffn": 0.25 + 0.25 * seed}, seed)


def _decomposed(model):
    """The core ATen graph torch.export decomposes to: batch norm as _native_batch_norm_legit_no_training,
    every conv as aten.convolution(..., transposed, output_padding, groups)."""
    ep = torch.export.export(model.eval(), (_inputs(),)).run_decompositions()
    gm = ep.module()
    gm._forward_pre_hooks.clear()
    return gm


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_functional_batch_norm(frontend):
    torch.manual_seed(0)
    a = _analyze(FunctionalBN(), frontend)
    _check(a, 1)
    key = "batch_norm" if frontend == "fx" else "aten.batch_norm"
    assert any(key in str(n.target) for n in a.gm.graph.nodes)


@pytest.mark.parametrize("make, n_groups", [(FunctionalBN, 1), (FunctionalDepthwise, 1),
                                             (lambda: Upsample("dense"), 2), (lambda: Upsample("depthwise"), 1)],
                         ids=["batch_norm", "depthwise", "transposed", "transposed_depthwise"])
def test_core_aten_graph(make, n_groups):
    torch.manual_seed(0)
    gm = _decomposed(make())
    targets = {str(n.target) for n in gm.graph.nodes}
    assert "aten.convolution.default" in targets
    if make is FunctionalBN:
        assert "aten._native_batch_norm_legit_no_training.default" in targets
    _check(snp_fx.analyze(gm, _inputs(), frontend="fx"), n_groups)


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_depthwise_functional_conv(frontend):
    torch.manual_seed(0)
    a = _analyze(FunctionalDepthwise(), frontend)
    _check(a, 1)
    pruned, _ = check_mask_equivalence(a, {"ffn": 0.5}, 7)
    conv = next(n for n in pruned.graph.nodes if "conv2d" in str(n.target) and n.args[1].op == "get_attr"
                and pruned.get_parameter(n.args[1].target).shape[1] == 1)
    groups = conv.args[6] if len(conv.args) > 6 else conv.kwargs["groups"]
    assert groups == HID // 2  # the literal groups follows the kept channels


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_grouped_functional_conv(frontend):
    """A grouped F.conv2d (2 input channels per group): input j of every group is one channel (the up
    conv's outputs fall into 2 classes), and every group keeps the same count of its outputs."""
    torch.manual_seed(0)
    a = _analyze(FunctionalDepthwise(group_size=2), frontend)
    _check(a, 2)
    assert sorted(g.width for g in _hidden_groups(a)) == [2, HID]
    (g,) = [g for g in _hidden_groups(a) if g.width == HID]
    assert g.blocks is not None and g.step == HID // 2


@pytest.mark.parametrize("frontend", ["fx", "export"])
@pytest.mark.parametrize("dims", [1, 2])
def test_conv_transpose_dense(frontend, dims):
    """Weight (in, out, k): dim 0 couples with the input channels, dim 1 makes the output channels."""
    torch.manual_seed(0)
    a = _analyze(Upsample("dense", dims), frontend, dims)
    _check(a, 2)
    assert sorted(g.width for g in _hidden_groups(a)) == [HID, 2 * HID]


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_conv_transpose_depthwise(frontend):
    torch.manual_seed(0)
    a = _analyze(Upsample("depthwise"), frontend)
    _check(a, 1)  # channel i -> channel i: one group through the transposed conv
    pruned, _ = check_mask_equivalence(a, {"ffn": 0.5}, 5)
    if frontend == "fx":
        t = pruned.get_submodule("t")
        assert t.in_channels == t.out_channels == t.groups == HID // 2
        assert t.weight.shape == (HID // 2, 1, 4, 4)


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_grouped_conv_transpose_is_refused(frontend):
    torch.manual_seed(0)
    a = _analyze(Upsample("grouped"), frontend)
    assert _hidden_groups(a) and not any(g.prunable for g in _hidden_groups(a)), str(a)
    assert all("grouped conv_transpose" in g.reason for g in _hidden_groups(a))


class ChannelsFirstAttention(nn.Module):
    """Tokens on the last dim (EfficientViT): attn = q^T k, out = v attn^T, v the LEFT operand."""

    def __init__(self, heads=2, dqk=4, dv=6):
        super().__init__()
        self.h, self.dqk, self.dv = heads, dqk, dv
        self.qkv = nn.Conv2d(C, heads * (2 * dqk + dv), 1)
        self.proj = nn.Conv2d(heads * dv, C, 1)

    def forward(self, x):
        B, _, H, W = x.shape
        q, k, v = self.qkv(x).view(B, self.h, 2 * self.dqk + self.dv, H * W).split(
            [self.dqk, self.dqk, self.dv], dim=2)
        attn = (q.transpose(-2, -1) @ k * 0.5).softmax(dim=-1)
        out = v @ attn.transpose(-2, -1)  # (B, h, dv, N)
        return x + self.proj(out.reshape(B, self.h * self.dv, H, W))


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_v_as_left_operand(frontend):
    torch.manual_seed(0)
    a = _analyze(ChannelsFirstAttention(), frontend)
    (site,) = a.sites
    assert site.av_node is not None
    qk, v = a.groups[f"{site.name}.qk"], a.groups[f"{site.name}.v"]
    assert qk.prunable and v.prunable and (qk.heads, qk.width, v.heads, v.width) == (2, 4, 2, 6), str(a)
    for seed in (0, 1, 2):
        check_mask_equivalence(a, {"qk": 0.5, "v": 0.5, "heads": 0.5 * (seed == 2)}, seed)


@pytest.mark.parametrize("frontend", ["fx", "export", "core_aten"])
@pytest.mark.parametrize("make", [FunctionalDepthwise, lambda: Upsample("dense"), lambda: Upsample("depthwise")],
                         ids=["depthwise", "transposed", "transposed_depthwise"])
def test_estimated_macs_equal_counted(frontend, make):
    """The MACs predicted from the labels equal FlopCounterMode's count of the pruned model."""
    torch.manual_seed(0)
    if frontend == "core_aten":
        a = snp_fx.analyze(_decomposed(make()), _inputs(), frontend="fx")
    else:
        a = _analyze(make(), frontend)
    keep = keep_mask(a, make_plan(a, {"ffn": 0.5}, random_scores(a, 0)))
    assert not bool(keep.all())
    assert estimate_macs(a, keep) == count_macs(rewrite(a, keep), a.inputs)
