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
                  for w in ([len(h) for h in e["keep"]] if e["kind"] in ("qk", "v") else [len(e["keep"])])
                  if w < analysis.groups[name].width)
    if removed:
        n_dense = sum(p.numel() for p in analysis.gm.parameters())
        n_pruned = sum(p.numel() for p in pruned.parameters())
        assert n_pruned < n_dense
        with torch.no_grad():  # the oracle is not vacuous: outputs really changed
            assert relative_error(pruned(*analysis.inputs), analysis.gm(*analysis.inputs)) > 1e-6
    return pruned, plan
