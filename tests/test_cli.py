"""The snp-fx command: report, written files and plots, calibration folders, checkpoints, one-line errors."""
import json
import re

import pytest
import torch
from PIL import Image

import snp_fx
from models import BlockSpec, PlainViT, randomize_norms
from snp_fx.cli import main
from snp_fx.cost import count_params
from snp_fx.report import attention_maps

TINY = "test_cli:tiny_vit"  # this module is importable under pytest (tests/ is on sys.path)
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # timm's default (ImageNet) normalisation


def tiny_vit(form="sdpa", seed=0):
    """A 3-block ViT on 32x32 images; ``input_size`` tells the CLI what to feed it."""
    torch.manual_seed(seed)
    m = randomize_norms(PlainViT(dim=32, blocks=(BlockSpec(), BlockSpec(hidden=48), BlockSpec()), img=32,
                                 patch=8, form=form), seed)
    m.input_size = (3, 32, 32)
    return m.eval()


def write_images(folder, colours, size=(40, 48)):
    folder.mkdir(parents=True, exist_ok=True)
    for i, c in enumerate(colours):
        Image.new("RGB", size, c).save(folder / f"img{i}.png")


def run(argv, capsys):
    rc = main(argv)
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_prune_writes_model_plan_report_and_plots(tmp_path, capsys):
    out = tmp_path / "out"
    write_images(tmp_path / "calib", [(255, 0, 128), (10, 200, 30), (90, 90, 90)])
    rc, text, err = run(["prune", TINY, "--ratios", "qk=0.5,v=0.25,ffn=0.5,residual=0.25", "--calib",
                         str(tmp_path / "calib"), "--calib-batch", "2", "--repeats", "3", "--out", str(out)], capsys)
    assert rc == 0, err
    assert "calibration: 3 images" in err
    for name in ("model.safetensors", "plan.json", "report.md", "widths.png", "attention.png"):
        assert (out / name).is_file(), name
    assert (out / "report.md").read_text().strip() == text.strip()  # the same report, printed and written
    # widths in the report are the lengths of the kept-index lists in plan.json
    plan = json.loads((out / "plan.json").read_text())["groups"]
    for b in range(3):
        qk = [len(k) for k in plan[f"blocks.{b}.attn.qk"]["keep"]]
        v = [len(k) for k in plan[f"blocks.{b}.attn.v"]["keep"]]
        hidden = 48 if b == 1 else 64
        ffn = len(plan[f"blocks.{b}.mlp.fc1"]["keep"])
        assert ffn == hidden // 2
        assert f"| blocks.{b} | 4/4 | {qk[0]}/8 | {v[0]}/8 | {ffn}/{hidden} |" in text
    assert qk == [4] * 4 and v == [6] * 4
    assert f"| residual | residual | {len(plan['residual']['keep'])}/32 |" in text
    dense = count_params(tiny_vit())
    pruned = snp_fx.load(str(out), tiny_vit())
    assert f"| params | {dense / 1e6:.2f} M | {count_params(pruned) / 1e6:.2f} M |" in text
    assert re.search(r"\| latency \| [\d.]+ ms \| [\d.]+ ms \| [\d.]+% \(speed-up [\d.]+x\) \|", text)
    assert str(out / "attention.png") in text
    # the plots are real images of a sensible size
    for name in ("widths.png", "attention.png"):
        with Image.open(out / name) as im:
            im.verify()
        with Image.open(out / name) as im:
            assert im.format == "PNG" and im.width > 300 and im.height > 200
    # the example input is the first calibration image, through timm's transform: a solid colour
    # stays solid after resize and crop, then (c / 255 - mean) / std
    from safetensors.torch import load_file
    x = load_file(str(out / "inputs.safetensors"))["0"]
    assert x.shape == (1, 3, 32, 32)
    expected = torch.tensor([(c / 255 - m) / s for c, m, s in zip((255, 0, 128), MEAN, STD)])
    torch.testing.assert_close(x[0].mean(dim=(1, 2)), expected, atol=1e-3, rtol=0)
    assert float(x.std(dim=(2, 3)).max()) < 1e-3


def test_calibration_from_class_subfolders(tmp_path, capsys):
    write_images(tmp_path / "calib" / "cats", [(200, 10, 10)] * 2)
    write_images(tmp_path / "calib" / "dogs", [(10, 10, 200)] * 3)
    (tmp_path / "calib" / "notes.txt").write_text("not an image")
    rc, text, err = run(["prune", TINY, "--calib", str(tmp_path / "calib"), "--no-latency"], capsys)
    assert rc == 0, err
    assert "calibration: 5 images" in err
    assert "latency" not in text and "| params |" in text


def test_checkpoint_weights_are_used(tmp_path, capsys):
    from safetensors.torch import load_file, save_file
    trained = tiny_vit(seed=7)
    state = {k: v.contiguous() for k, v in trained.state_dict().items()}
    save_file(state, str(tmp_path / "w.safetensors"))
    torch.save({"model": state}, tmp_path / "w.pth")  # a wrapped state dict, as training scripts write
    for ckpt in ("w.safetensors", "w.pth"):
        out = tmp_path / ckpt.replace(".", "_")
        rc, _, err = run(["prune", TINY, "--checkpoint", str(tmp_path / ckpt), "--ratios", "qk=0.5,ffn=0.5",
                          "--no-latency", "--out", str(out)], capsys)
        assert rc == 0, err
        saved = load_file(str(out / "model.safetensors"))
        # the classifier is never pruned (residual kept): its weights are the checkpoint's, not seed 0's
        torch.testing.assert_close(saved["head.weight"], state["head.weight"])
        assert not torch.equal(saved["head.weight"], tiny_vit(seed=0).head.weight)


def test_timm_deit_widths(tmp_path, capsys):
    rc, text, err = run(["prune", "deit_tiny_patch16_224", "--ratios", "qk=0.5,v=0.25,ffn=0.3,residual=0.2",
                         "--no-latency", "--out", str(tmp_path)], capsys)
    assert rc == 0, err
    assert "| blocks.0 | 3/3 | 32/64 | 48/64 | 538/768 |" in text
    assert "| residual | residual | 154/192 |" in text
    assert "| head | ffn | 1000/1000 (unprunable: it feeds the model output) |" in text  # not a block row
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["format"] == "snp_fx.plan/1"
    assert len(plan["groups"]["residual"]["keep"]) == 154


def test_prune_to_a_macs_target(capsys):
    rc, text, err = run(["prune", TINY, "--target-macs", "0.5", "--no-latency"], capsys)
    assert rc == 0, err
    line = next(x for x in text.splitlines() if x.startswith("| MACs"))
    ratio = float(line.split("|")[4].strip().rstrip("%"))
    assert 49.0 <= ratio <= 50.5


def test_inspect(capsys):
    rc, text, _ = run(["inspect", TINY], capsys)
    assert rc == 0
    assert "Attention sites" in text and "blocks.2.attn" in text


def test_attention_maps_read_softmax_and_sdpa_alike():
    """Two code paths (the softmax after q@k^T; probabilities rebuilt from sdpa's args) on the same weights."""
    x = torch.randn(2, 3, 32, 32)
    maps = []
    for form in ("matmul", "sdpa"):
        model = tiny_vit(form)
        a = snp_fx.analyze(model, x)
        got = attention_maps(a.gm, a.inputs, [s.node for s in a.sites])
        assert len(got) == 3
        maps.append([got[s.node] for s in a.sites])
    for m, s in zip(*maps):
        assert m.shape == (2, 4, 17, 17)
        torch.testing.assert_close(m.sum(-1), torch.ones(2, 4, 17))
        torch.testing.assert_close(m, s, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("argv, message", [
    (["prune", "no_such_model"], "unknown timm model"),
    (["prune", "no_such_module_xyz:factory"], "cannot import"),
    (["prune", TINY, "--ratios", "qk:0.5"], "bad ratio"),
    (["prune", TINY, "--ratios", "qk=1.5"], "must be a number in [0, 1)"),
    (["prune", TINY, "--target-macs", "lots"], "bad target"),
    (["prune", TINY, "--target-macs", "1k"], "below what one channel"),
    (["prune", TINY, "--ratios", "qk=0.5", "--target-macs", "0.5"], "give one budget"),
    (["prune", TINY, "--config", "/no/such/file.json"], "cannot read ratio file"),
    (["prune", TINY, "--calib", "/no/such/folder"], "does not exist"),
    (["prune", TINY, "--calib", "EMPTY"], "no images in"),
    (["prune", TINY, "--calib", "EMPTY", "--calib-random", "4"], "not both"),
    (["prune", TINY, "--checkpoint", "/no/such/w.safetensors"], "not found"),
    (["prune", TINY, "--checkpoint", "BAD_CKPT"], "does not fit the model"),
    (["prune", TINY, "--checkpoint", "NOT_A_CKPT"], "cannot read checkpoint"),
    (["inspect", "no_such_model"], "unknown timm model"),
])
def test_bad_arguments_exit_2_with_one_line(argv, message, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    torch.save({"head.weight": torch.zeros(3, 3)}, tmp_path / "bad.pt")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    names = {"EMPTY": tmp_path / "empty", "BAD_CKPT": tmp_path / "bad.pt", "NOT_A_CKPT": tmp_path / "junk.safetensors"}
    rc, _, err = run([str(names.get(a, a)) for a in argv], capsys)
    assert rc == 2
    err = [line for line in err.strip().splitlines() if not line.startswith("[snp-fx] ")]  # progress lines
    assert len(err) == 1 and err[0].startswith("snp-fx: error:") and message in err[0], err
