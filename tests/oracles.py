"""Shared checks used by several test files."""
import torch

from snp_fx.planning import keep_mask, make_plan
from snp_fx.rewrite import rewrite
from snp_fx.verify import mask_equivalence, relative_error


def random_scores(analysis, seed):
    return torch.rand(analysis.channels.num_units, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def check_mask_equivalence(analysis, ratios, seed, model=None):
    """Prune with a random plan; the result must equal the masked original and be smaller."""
    plan = make_plan(analysis, ratios, random_scores(analysis, seed))
    keep = keep_mask(analysis, plan)
    pruned = rewrite(analysis, keep).eval()
    # residual pruning: the reference's normalisations count kept channels only
    err = mask_equivalence(analysis, keep, pruned, analysis.inputs, exact_norms=ratios.get("residual", 0) > 0)
    assert err < 1e-4, f"mask equivalence failed: relative error {err:.2e} for {ratios}"
    removed = sum(1 for name, e in plan.groups.items()
                  for w in ([len(h) for h in e["keep"]] if e["keep"] and isinstance(e["keep"][0], list)
                            else [len(e["keep"])])
                  if w < analysis.groups[name].width)
    if removed:
        n_dense = sum(p.numel() for p in analysis.gm.parameters())
        n_pruned = sum(p.numel() for p in pruned.parameters())
        assert n_pruned < n_dense
        with torch.no_grad():  # the oracle is not vacuous: outputs really changed
            assert relative_error(pruned(*analysis.inputs), analysis.gm(*analysis.inputs)) > 1e-6
    return pruned, plan


@torch.no_grad()
def sharpen(model, seed=0):
    """Re-draw a model's floating parameters so its attention is sharp: Hugging Face's default
    init (std 0.02) makes a tiny model's attention nearly uniform, and a wrong q/k channel then
    moves the output by ~1e-4, below the check's tolerance.  Matrices ~ N(0, (2 / sqrt(fan_in))^2),
    vectors (biases, norm weights) get noise of 0.1.  MoE expert weights (experts, out, in): one
    matrix per expert (fan_in: their last dim)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if not p.is_floating_point():
            continue
        noise = torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype)
        if p.dim() >= 2:
            fan_in = p.shape[-1] if p.dim() == 3 and "experts" in name else p[0].numel()
            p.copy_(noise * (2.0 / fan_in ** 0.5))
        else:
            p.add_(0.1 * noise)
    return model


def swapped_keep(analysis, keep):
    """``keep`` with one kept q/k unit of one head swapped for a removed one (whole classes: a
    class's root may be a bias element only)."""
    cls = analysis.channels.class_of
    for g in analysis.prunable("qk"):
        for h in range(g.heads):
            kept = keep[g.classes[h]]
            if kept.any() and not kept.all():
                wrong = keep.clone()
                i, j = int(kept.nonzero()[0]), int((~kept).nonzero()[0])
                wrong[cls == g.classes[h, i]], wrong[cls == g.classes[h, j]] = False, True
                return g, wrong
    raise AssertionError("no q/k group with a removed unit: nothing to check the check against")


def assert_sensitive(analysis, keep, pruned, tolerance=1e-4):
    """The check can see a q/k mistake: against a reference that keeps one other q/k unit in one
    head (a kept one swapped for a removed one), the pruned model must fail mask equivalence."""
    g, wrong = swapped_keep(analysis, keep)
    err = mask_equivalence(analysis, wrong, pruned, analysis.inputs)
    assert err > tolerance, f"the check cannot see a swapped q/k unit in {g.name}: error {err:.2e}"
