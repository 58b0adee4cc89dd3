"""The prune report and the plots: reasons of unprunable groups, the rotary q/k note, the busy-machine
flag on latency, every residual group in widths.png, colour bars and a caption in attention.png."""
import pytest
import torch

import snp_fx
from models import BlockSpec, PlainViT
from snp_fx import plots, report
from snp_fx.report import load_warning, prune_report

STATS = {"params": (2.0e6, 1.0e6), "macs": (4.0e8, 2.0e8)}


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    model = PlainViT(dim=32, blocks=(BlockSpec(), BlockSpec(hidden=48), BlockSpec())).eval()
    a = snp_fx.analyze(model, torch.randn(2, 3, 32, 32))
    p = snp_fx.plan(a, importance="l2", ratios={"qk": 0.5, "v": 0.25, "ffn": 0.5, "residual": 0.25, "heads": 0.25})
    return a, p, snp_fx.apply(a, p)


def test_unprunable_groups_say_why(vit):
    a, p, _ = vit
    text = prune_report("t", a, p, STATS)
    assert "| head | ffn | 10/10 (unprunable: it feeds the model output) |" in text
    assert "MACs are per sample" in text
    assert "rotary" not in text  # no rotary q/k here
    # long reasons are cut, and a | would end the table cell
    cell = report._unprunable(False, "x|y " * 40)
    assert cell.startswith(" (unprunable: x\\|y") and cell.endswith("...)") and len(cell) < 100
    assert report._unprunable(True, "") == ""


def test_groups_left_whole_inside_blocks_are_listed_with_the_reason(vit):
    a, p, _ = vit
    g = a.groups["blocks.1.attn.v"]
    saved = g.prunable, g.reason
    try:
        g.prunable, g.reason = False, "a test reason"
        text = prune_report("t", a, snp_fx.plan(a, importance="l2", ratios={"qk": 0.5}), STATS)
    finally:
        g.prunable, g.reason = saved
    assert "Left whole: blocks.1.attn.v (unprunable: a test reason)." in text


def test_rotary_qk_widths_in_channels_with_a_note():
    import hf_models
    model, inputs = hf_models.llama()  # head dim 16: rotary pairs i, i + 8
    a = snp_fx.analyze(model.eval(), inputs)
    p = snp_fx.plan(a, importance="l2", ratios={"qk": 0.5, "v": 0.25})
    g = a.groups["model.layers.0.self_attn.qk"]
    assert (g.unit_channels, g.width) == (2, 8)
    text = prune_report("t", a, p, STATS)
    # 4 of 8 pairs = 8 of 16 channels per head, next to v's 12 of 16
    assert "| model.layers.0 | 2/2 | 8/16 | 12/16 |" in text  # 2 kv heads (grouped-query)
    assert "q/k (every block): rotary embeddings tie q/k channels in pairs (2 channels each)" in text


def test_load_warning(monkeypatch):
    monkeypatch.setattr("os.getloadavg", lambda: (9.04, 1.0, 1.0))
    assert load_warning(cores=2) == "unreliable: load 9.0 on 2 cores"
    assert load_warning(cores=16) is None
    monkeypatch.setattr("os.cpu_count", lambda: 4)
    assert load_warning() == "unreliable: load 9.0 on 4 cores"


def test_latency_on_a_busy_machine_is_flagged(vit, monkeypatch):
    a, p, _ = vit
    stats = dict(STATS, latency=(0.02, 0.01), latency_note="Latency: median of 3 interleaved passes")
    flagged = dict(stats, load_warning="unreliable: load 9.0 on 2 cores")
    assert "Latency: median of 3 interleaved passes (unreliable: load 9.0 on 2 cores)." in \
        prune_report("t", a, p, flagged)
    assert "Latency: median of 3 interleaved passes." in prune_report("t", a, p, dict(stats, load_warning=None))
    # not given: measured when the report is built
    monkeypatch.setattr("os.getloadavg", lambda: (50.0, 1.0, 1.0))
    assert f"(unreliable: load 50.0 on {__import__('os').cpu_count()} cores)." in prune_report("t", a, p, stats)
    assert "unreliable" not in prune_report("t", a, p, STATS)  # no latency, no flag


def test_residual_caption_shows_all_or_says_how_many_are_left_out():
    res = [{"name": f"residual.{i}", "kept": 8 * i + 8, "dense": 16 * i + 16} for i in range(6)]
    assert plots.residual_caption([]) == ""
    assert plots.residual_caption(res[:4]) == "residual: residual.0 8/16, residual.1 16/32, residual.2 24/48, " \
                                              "residual.3 32/64"
    assert plots.residual_caption(res) == "residual: residual.0 8/16, residual.1 16/32, residual.2 24/48, " \
                                          "... and 3 more (listed in the report)"


def test_widths_figure_title_has_the_residual_groups(vit):
    a, p, _ = vit
    fig = plots.widths_figure(a, p, title="tiny")
    assert fig._suptitle.get_text() == f"tiny  (residual: residual {len(p.groups['residual']['keep'])}/32)"


def test_attention_figure_has_colour_bars_and_a_caption(vit):
    a, p, pruned = vit
    fig, cols = plots.attention_figure(a, p, pruned, plots.first_item(a.inputs))
    assert cols == 6  # 3 sites x 2 heads
    bars = [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]
    assert len(bars) == cols and all(b.get_xlabel() == "probability" for b in bars)
    caption = fig._supxlabel.get_text()
    for words in ("Top row: the dense model", "TV: total-variation distance", "'head h'", "'head removed'"):
        assert words in caption.replace("\n", " ")
