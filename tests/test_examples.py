"""Every example run as a user would (a fresh interpreter, the repo root) on small settings; what it
prints is checked: the pruned model is smaller than the dense one, the numbers are in their ranges."""
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM = r"([-\d.]+)"


def run_example(name, *args, timeout=180):
    """``python examples/<name> <args>`` from the repo root; this checkout's snp_fx is the one imported."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    r = subprocess.run([sys.executable, os.path.join("examples", name), *args], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{name} {' '.join(args)} failed:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"
    return r.stdout


def table_row(text, first_cell):
    """The cells of the markdown table row whose first cell is ``first_cell``."""
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] == first_cell:
            return cells
    raise AssertionError(f"no table row '{first_cell}' in:\n{text}")


def percent(cell):
    m = re.search(r"([\d.]+)%", cell)
    assert m, cell
    return float(m.group(1))


@pytest.mark.parametrize("hardware", [[], ["--hardware", "cpu"]])
def test_prune_deit(hardware):
    out = run_example("prune_deit.py", "--model", "deit_tiny_patch16_224", "--config", "DeiT_t", "--calib", "4",
                      "--img-size", "64", *hardware)
    m = re.search(r"^deit_tiny_patch16_224: (\d+) attention sites, (\d+) prunable groups", out, re.M)
    assert m and int(m.group(1)) == 12 and int(m.group(2)) > 12, out
    # one row per block: heads kept of 3, q/k and v widths per head of 64, FFN of 768
    for b in range(12):
        cells = table_row(out, f"blocks.{b}")
        heads, qk, v, ffn = (tuple(int(x) for x in c.split("/")) for c in cells[1:5])
        assert heads[1] == 3 and qk[1] == 64 and v[1] == 64 and ffn[1] == 768, cells
        assert 1 <= heads[0] <= 3 and 1 <= qk[0] <= 64 and 1 <= v[0] <= 64 and 1 <= ffn[0] <= 768, cells
        if hardware:  # the authors' widths rounded to the CPU's step
            assert qk[0] % 8 == 0 and v[0] % 8 == 0 and ffn[0] % 8 == 0, cells
    kept, width = map(int, table_row(out, "residual")[2].split("/"))
    assert width == 192 and 1 <= kept <= 192
    assert kept == (152 if hardware else 153)  # the DeiT_t config keeps 153 of 192
    assert table_row(out, "head")[2] == "1000/1000 (unprunable: it feeds the model output)"
    for what, unit in (("params", "M"), ("MACs", "G")):
        cells = table_row(out, what)
        dense, pruned = (float(c.removesuffix(f" {unit}")) for c in cells[1:3])
        assert 0 < pruned < dense, cells
        assert percent(cells[3]) == pytest.approx(100 * pruned / dense, rel=0.03), cells  # printed rounded
    assert 0.05 < float(table_row(out, "MACs")[1].removesuffix(" G")) < 0.15  # DeiT-T on 64 x 64: 0.09 GMACs
    assert re.search(r"\| latency \| [\d.]+ ms \| [\d.]+ ms \| [\d.]+% \(speed-up [\d.]+x\) \|", out), out
    assert "pruned output: (1, 1000) - same as dense: (1, 1000)" in out


def test_prune_minilm_real_pretrained_encoder():
    settings = ["qk=0.5,v=0.25,ffn=0.3"]
    out = run_example("prune_minilm.py", "--calib", "8", "--eval", "16", "--batch", "8", "--length", "16",
                      *(a for s in settings for a in ("--ratios", s)))
    m = re.search(r"^(\d+) distinct standard-library sentences; calibration 8, evaluation 16 \(disjoint\), "
                  r"batches of 8 x 16 tokens$", out, re.M)
    assert m and int(m.group(1)) > 1000, out
    assert re.search(r"^analyze: [\d.]+ s, 6 attention sites$", out, re.M), out  # MiniLM-L6: 6 layers
    m = re.search(r"^dense: ([\d.]+) M params, ([\d.]+) GMACs per sequence of 16 tokens$", out, re.M)
    assert m and 22 < float(m.group(1)) < 23.5 and float(m.group(2)) > 0, out  # all-MiniLM-L6-v2: 22.7 M
    rows = [line for line in out.splitlines() if line.startswith("| ") and "=" in line.split("|")[1]]
    assert [tuple(c.strip() for c in r.split("|")[1:3]) for r in rows] == \
        [(s, imp) for s in settings for imp in ("snp", "random")], out
    for r in rows:
        cells = [c.strip() for c in r.strip().strip("|").split("|")]
        params, macs = percent(cells[2]), percent(cells[3])
        assert 0 < params < 100 and 0 < macs < 100, r
        cos_mean, cos_min = float(cells[4]), float(cells[5])
        assert 0 < cos_mean <= 1 and -1 <= cos_min <= cos_mean, r
        assert 0 <= percent(cells[6]) <= 100, r
    # the two importances of one setting prune the same widths
    for i in range(0, len(rows), 2):
        assert rows[i].split("|")[3:5] == rows[i + 1].split("|")[3:5]


def test_custom_transformer_pass_manager():
    out = run_example("custom_transformer.py", "--dim", "64", "--heads", "4", "--hidden", "128", "--depth", "2",
                      "--length", "16", "--batch", "2")
    assert "drop_dropout: removed 4 Dropout nodes" in out  # two per block
    assert "attention_to_sdpa: fused 2 attention blocks" in out
    m = re.search(r"PassManager result vs snp_fx.prune alone: relative error ([\d.]+e[-+]\d+)", out)
    assert m and 0 <= float(m.group(1)) < 1e-4, out  # the example's own check
    assert 0 < percent(table_row(out, "params")[2]) < 100
    assert 0 < percent(table_row(out, "MACs (per sequence of 16 tokens)")[2]) < 100
    assert re.search(r"\| latency \(batch 2\) \| [\d.]+ ms \| pruned: [\d.]+ ms, pruned \+ sdpa: [\d.]+ ms \|", out)


def test_recover_with_distillation():
    out = run_example("recover_with_distillation.py", "--dense-epochs", "1", "--epochs", "1")
    assert re.search(r"^dense: trained 1 epochs in \d+ s, test top-1 [\d.]+%$", out, re.M), out
    m = re.search(rf"^pruned to {NUM}% of the MACs \({NUM} M -> {NUM} M\), {NUM}% of the params", out, re.M)
    assert m, out
    ratio, m0, m1, params = (float(g) for g in m.groups())
    assert 30 <= ratio <= 40.5 and 0 < m1 < m0 and 0 < params < 100, out  # the 40% MACs target
    names = ["dense", "pruned, one-shot", "pruned + 1 epochs cross-entropy",
             "pruned + 1 epochs distillation (KL T=4 + CE)"]
    assert table_row(out, "model (449 test digits)")[1] == "top-1"
    for name in names:
        assert 0 <= percent(table_row(out, name)[1]) <= 100


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
    from snp_fx.kernels import padded_sdpa
    assert targets.count(padded_sdpa) == 2  # attention on the fused kernel whatever the pruned widths
    assert "softmax" not in targets
    assert not any(isinstance(m, torch.nn.Dropout) for n, m in gm.named_modules() if n in
                   {x.target for x in gm.graph.nodes if x.op == "call_module"})


def test_prune_llm():
    out = run_example("prune_llm.py", "--tokens", "8", "--prompt", "8", "--target-params", "0.6")
    assert "a LlamaForCausalLM loaded with from_pretrained" in out
    dense, pruned = table_row(out, "parameters")[1:3]
    assert float(pruned.split(" M")[0]) < float(dense.removesuffix(" M"))
    assert percent(pruned) == pytest.approx(60, abs=2)  # the target, met from below within the tolerance
    ffn = table_row(out, "intermediate_size")[1:3]
    assert int(ffn[1]) < int(ffn[0]) and int(ffn[1]) % 8 == 0
    heads, kv = (tuple(map(int, table_row(out, k)[1:3])) for k in ("num_attention_heads", "num_key_value_heads"))
    assert 256 % heads[1] == 0 and heads[1] // kv[1] == heads[0] // kv[0]  # the config's own rules
    for model in ("dense", "pruned"):
        for cache in ("yes", "no"):
            assert any(line.startswith(f"| {model} | {cache} |") for line in out.splitlines())
    assert len(re.findall(r"^greedy tokens, (dense|pruned): +\[(\d+, ){7}\d+\]$", out, re.M)) == 2


def test_prune_llm_any_plan():
    """--any-plan: a default SNP plan (widths per layer) generating through a static KV cache of the
    pruned widths, the same tokens as the masked dense model."""
    out = run_example("prune_llm.py", "--any-plan", "--tokens", "8", "--prompt", "8", "--target-params", "0.7",
                      timeout=600)
    assert "the masked dense model generates the same tokens: True" in out
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in out.splitlines()
            if re.match(r"^\| \d \| \[", line)]
    assert len(rows) == 4  # one per layer, each with its key / value cache of the kept widths
    for row in rows:
        qk, v = eval(row[1]), eval(row[2])  # kept q/k pairs and v channels per kv head
        assert eval(row[4])[-1] == 2 * qk[0] and eval(row[5])[-1] == v[0]
    assert len({row[2] for row in rows}) > 1 or len({row[1] for row in rows}) > 1  # widths differ by layer
    for cache in ("yes", "no"):
        assert any(line.startswith(f"| {cache} (") for line in out.splitlines())
