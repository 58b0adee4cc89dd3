"""Every example imports and answers --help, run as a user would (a fresh interpreter, the repo root)."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = sorted(f for f in os.listdir(os.path.join(ROOT, "examples")) if f.endswith(".py"))


def test_the_examples_are_there():
    assert {"prune_deit.py", "prune_minilm.py", "custom_transformer.py", "recover_with_distillation.py"} <= set(EXAMPLES)


# one fresh interpreter runs every example as __main__ with --help (imports torch once: fast)
HELP_ALL = """
import runpy, sys, io, contextlib
for path in sys.argv[1:]:
    sys.argv = [path, "--help"]
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            runpy.run_path(path, run_name="__main__")
        code = "no exit"
    except SystemExit as e:
        code = e.code
    print(f"=== {path} exit={code}")
    print(out.getvalue())
"""


def test_every_example_answers_help():
    # argparse handles --help after every module-level import has run: this checks the imports too
    paths = [os.path.join("examples", n) for n in EXAMPLES]
    r = subprocess.run([sys.executable, "-c", HELP_ALL, *paths], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    parts = r.stdout.split("=== ")[1:]
    assert len(parts) == len(EXAMPLES)
    for path, part in zip(paths, parts):
        assert part.startswith(f"{path} exit=0\n"), part[:500]
        assert "usage:" in part and "--" in part.split("usage:", 1)[1], part[:500]


def test_custom_transformer_passes_on_a_small_model():
    """The example's FX passes on a small model: dropout removed, attention fused, outputs unchanged."""
    import torch
    import torch.fx as fx

    sys.path.insert(0, os.path.join(ROOT, "examples"))
    try:
        import custom_transformer as ex
    finally:
        sys.path.pop(0)
    torch.manual_seed(0)
    model = ex.TextClassifier(vocab=50, length=8, dim=32, heads=4, hidden=64, depth=2).eval()
    ids = torch.randint(0, 50, (2, 8))
    gm = fx.symbolic_trace(model)
    with torch.inference_mode():
        ref = model(ids)
        gm = ex.drop_dropout(gm).graph_module
        gm = ex.attention_to_sdpa(gm).graph_module
        torch.testing.assert_close(gm(ids), ref, atol=1e-5, rtol=1e-5)
    targets = [n.target for n in gm.graph.nodes]
    assert targets.count(torch.nn.functional.scaled_dot_product_attention) == 2
    assert "softmax" not in targets
    assert not any(isinstance(m, torch.nn.Dropout) for n, m in gm.named_modules() if n in
                   {x.target for x in gm.graph.nodes if x.op == "call_module"})
