"""The snp-fx command: report, written files and plots, calibration folders, checkpoints, one-line errors."""
import contextlib
import json
import random
import re
import sys

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


# (argv, message, early): `early` errors come before any model is built (no progress line at all)
BAD_ARGUMENTS = [
    (["prune", "no_such_model"], "unknown timm model", True),
    (["prune", "vit_bse_patch16_224"], "did you mean vit_base_patch16_224", True),
    (["prune", "no_such_module_xyz:factory"], "cannot import", False),
    (["prune", "EMPTY"], "folder without config.json", True),
    (["prune", "./no/such/folder"], "does not exist", True),
    (["prune", TINY, "--ratios", "qk:0.5"], "bad ratio", True),
    (["prune", TINY, "--ratios", "qk=1.5"], "must be in [0, 1)", True),
    (["prune", TINY, "--ratios", "qkk=0.5"], "unknown ratio key 'qkk'", False),
    (["prune", TINY, "--target-macs", "lots"], "bad target", True),
    (["prune", TINY, "--target-macs", "1.5"], "bad target", True),
    (["prune", TINY, "--target-macs", "1k"], "below what one channel", False),
    (["prune", TINY, "--target-macs", "50G"], "at or above the dense model's", False),
    (["prune", TINY, "--target-params", "50M"], "at or above the dense model's", False),
    (["prune", TINY, "--ratios", "qk=0.5", "--target-macs", "0.5"], "give one budget", True),
    (["prune", TINY, "--target-latency", "fast"], "target_latency 'fast'", True),
    (["prune", TINY, "--target-latency", "2"], "bad --target-latency", True),
    (["prune", TINY, "--config", "/no/such/file.json"], "neither a file nor one of", True),
    (["prune", TINY, "--config", "NOT_A_CKPT"], "not a JSON ratio file", True),
    (["prune", TINY, "--calib", "/no/such/folder"], "is not a folder", True),
    (["prune", TINY, "--calib", "EMPTY"], "no images in", False),
    (["prune", TINY, "--calib", "EMPTY", "--calib-random", "4"], "one calibration source", True),
    (["prune", TINY, "--calib-text", "/no/such/lines.txt"], "is not a file", True),
    (["prune", TINY, "--calib-text", "LINES"], "--calib-text is for text models", False),
    (["prune", TINY, "--tokenizer", "/no/such/tokenizer"], "is not a folder", True),
    (["prune", TINY, "--checkpoint", "/no/such/w.safetensors"], "is not a file", True),
    (["prune", TINY, "--checkpoint", "BAD_CKPT"], "does not fit the model", False),
    (["prune", TINY, "--checkpoint", "NOT_A_CKPT"], "cannot read checkpoint", False),
    (["prune", TINY, "--importance", "snpp"], "invalid choice: 'snpp'", True),
    (["prune", TINY, "--selection", "best"], "invalid choice: 'best'", True),
    (["prune", TINY, "--preset", "fast"], "invalid choice: 'fast'", True),
    (["prune", TINY, "--frontend", "onnx"], "invalid choice: 'onnx'", True),
    (["prune", TINY, "--dtype", "int8"], "invalid choice: 'int8'", True),
    (["prune", TINY, "--device", "tpu"], "use cpu, cuda or cuda:N", True),
    (["prune", TINY, "--round-to", "0"], "steps must be >= 1", True),
    (["prune", TINY, "--round-to", "qk=8,ffn=x"], "bad --round-to", True),
    (["prune", TINY, "--gamma", "0"], "--gamma must be >= 1", True),
    (["prune", TINY, "--calib-batch", "0"], "--calib-batch must be >= 1", True),
    (["prune", TINY, "--out", "A_FILE"], "is a file: give a folder", True),
    (["prune", TINY, "--leaf-modules", "NoSuchBlock"], "neither a module class nor a module name", False),
    (["prune", TINY, "--gamma", "many"], "invalid int value", True),
    (["inspect", "no_such_model"], "unknown timm model", True),
    (["inspect", TINY, "--frontend", "onnx"], "invalid choice", True),
]
if not torch.cuda.is_available():
    BAD_ARGUMENTS.append((["prune", TINY, "--device", "cuda"], "no CUDA GPU", True))


@pytest.mark.parametrize("argv, message, early", BAD_ARGUMENTS)
def test_bad_arguments_exit_2_with_one_line(argv, message, early, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    torch.save({"head.weight": torch.zeros(3, 3)}, tmp_path / "bad.pt")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "lines.txt").write_text("one line\nanother line\n")
    names = {"EMPTY": tmp_path / "empty", "BAD_CKPT": tmp_path / "bad.pt", "NOT_A_CKPT": tmp_path / "junk.safetensors",
             "A_FILE": tmp_path / "a_file", "LINES": tmp_path / "lines.txt"}
    out = tmp_path / "out"
    argv = [str(names.get(a, a)) for a in argv] + (["--out", str(out)] if argv[0] == "prune" and
                                                      "--out" not in argv else [])
    argparse_check = any(w in message for w in ("invalid", "--round-to", "steps must"))
    with pytest.raises(SystemExit) if argparse_check else contextlib.nullcontext() as exit_:
        rc, _, err = run(argv, capsys)
    if exit_ is not None:  # argparse's own checks exit directly
        rc, err = exit_.value.code, capsys.readouterr().err
    assert rc == 2
    progress = [line for line in err.strip().splitlines() if line.startswith("[snp-fx] ")]
    err = [line for line in err.strip().splitlines() if not line.startswith("[snp-fx] ")]
    assert len(err) == 1 and err[0].startswith("snp-fx: error:") and message in err[0], err
    assert not progress if early else progress, progress  # early: nothing was loaded
    assert not out.exists()  # nothing written on failure


# ---------------------------------------------------------------------------
# Text models: a Hugging Face model folder (config.json + weights + tokenizer), --calib-text
# ---------------------------------------------------------------------------

WORDS = ("the a of to and in is it that was for on are with as his they be at one have this from "
         "by hot word but what some we can out other were all there when up use your how said an each").split()


def bert_folder(path):
    """A tiny BertModel saved with its tokenizer, as `save_pretrained` writes them."""
    import transformers
    path.mkdir()
    (path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS) + "\n")
    transformers.BertTokenizerFast(vocab_file=str(path / "vocab.txt")).save_pretrained(str(path))
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=len(WORDS) + 5, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=4, intermediate_size=64, max_position_embeddings=32)
    model = transformers.BertModel(cfg).eval()
    with torch.no_grad():  # HF's init (std 0.02) leaves attention and FFN all but invisible in the output
        for m in model.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.normal_(0, 0.4)
    model.save_pretrained(str(path))
    return path


def write_lines(path, n, seed=0):
    rng = random.Random(seed)
    path.write_text("\n".join(" ".join(rng.choices(WORDS, k=rng.randint(3, 10))) for _ in range(n)) + "\n")
    return path


def cosine(text):
    m = re.search(r"Embedding cosine to the dense model on (\d+) held-out lines of .*: mean (-?\d+\.\d+), min (-?\d+\.\d+)",
                  text)
    assert m, text
    return int(m[1]), float(m[2]), float(m[3])


def test_hugging_face_folder_with_calibration_text(tmp_path, capsys):
    import transformers
    folder, out = bert_folder(tmp_path / "bert"), tmp_path / "out"
    lines = write_lines(tmp_path / "lines.txt", 30)
    common = ["--calib-text", str(lines), "--seq-len", "12", "--calib-batch", "4", "--eval-lines", "6"]
    rc, text, err = run(["prune", str(folder), *common, "--ratios", "qk=0.5,v=0.25,ffn=0.5", "--repeats", "2",
                         "--out", str(out)], capsys)
    assert rc == 0, err
    assert "calibration: 24 lines in batches of 4 x 12 tokens; 6 held out" in err
    n, mean, low = cosine(text)
    assert n == 6 and -1 <= low <= mean < 0.9999  # pruned: the embeddings moved
    assert "| encoder.layer.0 | 4/4 | 4/8 | 6/8 | 32/64 |" in text
    assert "batch 4 x 12 tokens" in text
    for name in ("model.safetensors", "plan.json", "report.md", "widths.png"):
        assert (out / name).is_file(), name
    # the saved model loads onto the original and reproduces what was recorded at save time
    pruned = snp_fx.load(str(out), transformers.BertModel.from_pretrained(str(folder)))
    assert count_params(pruned) < count_params(transformers.BertModel.from_pretrained(str(folder)))
    # the cosine compares the right things: nothing removed -> exactly the dense embeddings
    rc, text, err = run(["prune", str(folder), *common, "--ratios", "qk=0", "--no-latency"], capsys)
    assert rc == 0, err
    assert cosine(text) == (6, 1.0, 1.0)


def test_text_factory_from_the_current_folder(tmp_path, capsys, monkeypatch):
    folder = bert_folder(tmp_path / "bert")
    (tmp_path / "mymini_cli_test.py").write_text(
        "import transformers\n\ndef build():\n"
        f"    return transformers.BertModel.from_pretrained({str(folder)!r})\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    # random token ids without --calib-text (the CLI used to feed an image tensor)
    rc, text, err = run(["prune", "mymini_cli_test:build", "--ratios", "qk=0.5", "--seq-len", "8",
                         "--no-latency"], capsys)
    assert rc == 0, err
    assert "| encoder.layer.1 | 4/4 | 4/8 | 8/8 | 64/64 |" in text
    # the tokenizer is found in the folder the model was loaded from
    lines = write_lines(tmp_path / "lines.txt", 12)
    rc, text, err = run(["prune", "mymini_cli_test:build", "--ratios", "ffn=0.5", "--seq-len", "8", "--calib-text",
                         str(lines), "--calib-batch", "3", "--eval-lines", "3", "--no-latency"], capsys)
    assert rc == 0, err
    assert cosine(text)[0] == 3


def test_dtype_converts_the_verified_model(tmp_path, capsys):
    from safetensors.torch import load_file
    out32, out16 = tmp_path / "fp32", tmp_path / "bf16"
    for out, extra in ((out32, []), (out16, ["--dtype", "bfloat16"])):
        rc, text, err = run(["prune", TINY, "--ratios", "qk=0.5,ffn=0.5", "--repeats", "2", "--out", str(out),
                             *extra], capsys)
        assert rc == 0, err
    assert "bfloat16" in text and "snp_fx.load(DIR, model.to(torch.bfloat16))" in text
    w32, w16 = load_file(str(out32 / "model.safetensors")), load_file(str(out16 / "model.safetensors"))
    assert {v.dtype for v in w16.values() if v.is_floating_point()} == {torch.bfloat16}
    for k in w32:  # the same pruned model (pruned and checked in float32), converted
        torch.testing.assert_close(w16[k], w32[k].to(torch.bfloat16))
    x = torch.randn(1, 3, 32, 32)
    p32 = snp_fx.load(str(out32), tiny_vit())
    p16 = snp_fx.load(str(out16), tiny_vit().to(torch.bfloat16))
    torch.testing.assert_close(p16(x.bfloat16()).float(), p32(x), atol=0.1, rtol=0.05)
