"""Bad input gets a clear error; the input model is never modified."""
import copy

import pytest
import torch
import torch.nn as nn

import snp_fx
from models import PlainViT


@pytest.fixture()
def model():
    torch.manual_seed(0)
    return PlainViT().eval()


X = torch.randn(1, 3, 32, 32)


def state(m):
    return {k: v.clone() for k, v in m.state_dict().items()}


@pytest.mark.parametrize("ratios, match", [
    ({"qk": 1.0}, r"must be a number in \[0, 1\)"),
    ({"qk": -0.1}, r"must be a number in \[0, 1\)"),
    ({"qk": "half"}, r"must be a number"),
    ({"attention": 0.5}, r"unknown ratio key 'attention'"),
    ({"blocks.0.attn.qk": 0.99}, r"would remove every channel"),
    ({"blocks.0.attn.heads": 0.9}, r"would remove every channel of heads"),
    ({"head": 0.5}, r"cannot be pruned: it feeds the model output"),
])
def test_bad_ratios(model, ratios, match):
    before = state(model)
    with pytest.raises(snp_fx.SNPError, match=match):
        snp_fx.prune(model, X, ratios=ratios)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_ratios_must_be_a_dict(model):
    with pytest.raises(snp_fx.SNPError, match="ratios must be a dict"):
        snp_fx.prune(model, X, ratios=[0.5])


def test_inputs_that_do_not_run(model):
    with pytest.raises(snp_fx.SNPError, match="does not run on the example inputs"):
        snp_fx.analyze(model, torch.randn(1, 5, 32, 32))
    with pytest.raises(snp_fx.SNPError, match="example_inputs are required"):
        snp_fx.analyze(model, None)
    with pytest.raises(snp_fx.SNPError, match="unknown input names"):
        snp_fx.analyze(model, {"pixels": X})
    with pytest.raises(snp_fx.SNPError, match="must be a tensor, a tuple"):
        snp_fx.analyze(model, "image.png")


def test_not_a_module():
    with pytest.raises(snp_fx.SNPError, match="expected a torch.nn.Module"):
        snp_fx.analyze(lambda x: x, X)


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:  # fx cannot trace this
            return self.fc(x)
        return x


def test_untraceable_model_says_what_to_do(capfd, monkeypatch):
    monkeypatch.delenv("SNP_FX_VERBOSE", raising=False)
    with pytest.raises(snp_fx.TraceError, match="leaf") as e:
        snp_fx.analyze(DataDependent(), torch.randn(2, 4))
    assert "\n" not in str(e.value) and "torch.cond" in str(e.value)
    assert capfd.readouterr().err == ""  # torch.export's graph dumps and warnings are kept back
    monkeypatch.setenv("SNP_FX_VERBOSE", "1")  # ... and come out on request
    with pytest.raises(snp_fx.TraceError):
        snp_fx.analyze(DataDependent(), torch.randn(2, 4))
    assert "def forward" in capfd.readouterr().err


@pytest.mark.parametrize("x, says", [(torch.randn(1, 3, 24, 32), "doesn't match model"),
                                     (torch.ones(1, 3, 32, 32, dtype=torch.long), "should be the same")])
def test_wrong_input_shape_or_dtype_is_one_line(x, says):
    timm = pytest.importorskip("timm")
    m = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1).eval()
    with pytest.raises(snp_fx.SNPError, match="does not run on the example inputs") as e:
        snp_fx.analyze(m, x)
    message = str(e.value)
    assert "\n" not in message and says in message and "pass inputs of the shape" in message
    assert not any(noise in message for noise in ("While executing", "Original traceback", "tlparse"))


def test_bad_plans(model):
    plan = snp_fx.plan(model, X, ratios={"qk": 0.5})
    bad = copy.deepcopy(plan)
    bad.groups["blocks.0.attn.qk"]["keep"][0] = [0, 1, 2]  # 3 kept in head 0, 4 in the others
    with pytest.raises(snp_fx.SNPError, match="same count"):
        snp_fx.apply(model, bad, X)
    bad = copy.deepcopy(plan)
    bad.groups["blocks.0.attn.qk"]["keep"][0] = [0, 99, 1, 2]
    with pytest.raises(snp_fx.SNPError, match="invalid indices"):
        snp_fx.apply(model, bad, X)
    bad = copy.deepcopy(plan)
    bad.groups["blocks.9.mlp.fc1"] = {"kind": "ffn", "keep": [0]}
    with pytest.raises(snp_fx.SNPError, match="does not have"):
        snp_fx.apply(model, bad, X)
    bad = copy.deepcopy(plan)
    bad.groups["blocks.0.attn.qk"]["keep"][1] = []  # head 1 removed from q/k only
    bad.groups["blocks.0.attn.qk"]["keep"][0] = bad.groups["blocks.0.attn.qk"]["keep"][2]
    with pytest.raises(snp_fx.SNPError, match="removed from q/k and v together"):
        snp_fx.apply(model, bad, X)
    with pytest.raises(snp_fx.SNPError, match="not an snp_fx plan"):
        snp_fx.PruningPlan.from_json('{"groups": {}}')


def test_input_never_modified_and_train_mode_kept(model):
    model.train()
    before = state(model)
    pruned = snp_fx.prune(model, X, ratios={"qk": 0.5, "residual": 0.25, "ffn": 0.5})
    assert model.training and pruned.training
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    gm = torch.fx.symbolic_trace(model.eval())
    code = gm.code
    snp_fx.prune(gm, X, ratios={"qk": 0.5, "residual": 0.25})
    assert gm.code == code


def test_float64_model(model):
    m = model.double()
    pruned = snp_fx.prune(m, X.double(), ratios={"qk": 0.5, "v": 0.5, "ffn": 0.5})
    assert next(pruned.parameters()).dtype == torch.float64


def test_a_failure_after_the_model_ran_is_not_blamed_on_the_model(model, monkeypatch):
    """Grouping channels runs after the model ran on the inputs: its failure is snp_fx's (InternalError)."""
    from snp_fx.analysis import result

    def broken(self, *args):
        raise RuntimeError("Boolean value of Tensor with more than one value is ambiguous")
    monkeypatch.setattr(result.Analysis, "__init__", broken)
    with pytest.raises(snp_fx.InternalError, match="grouping the channels failed") as e:
        snp_fx.analyze(model, X)
    assert not isinstance(e.value, snp_fx.SNPError)
