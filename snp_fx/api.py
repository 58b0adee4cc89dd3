"""The public pipeline: trace -> analyze -> score -> plan -> rewrite -> verify."""
from __future__ import annotations

import copy
import warnings

import torch
import torch.fx as fx

from . import verify as _verify
from .analysis import Analysis, propagate
from .errors import RewriteError, SNPError
from .importance import DEFAULT_GAMMA, compute_scores
from .plan import (PruningPlan, check_ratios, check_target, keep_mask, make_plan, paper_ratios,
                   plan_for_target)
from .rewrite import rewrite
from .trace import normalize_inputs, trace

TOLERANCE = 1e-4


def analyze(model: torch.nn.Module, example_inputs, leaf_modules=(), frontend: str = "auto") -> Analysis:
    """Trace ``model`` and find its attention sites and coupled channel groups.

    ``model`` is copied first, so nothing that happens here (even an error
    halfway) can change it.  ``example_inputs``: a tensor, a tuple of
    positional tensors, or a dict of keyword inputs.  ``frontend``: "auto"
    (torch.fx, else torch.export), "fx" or "export".
    """
    if not isinstance(model, torch.nn.Module):
        raise SNPError(f"expected a torch.nn.Module or fx.GraphModule, got {type(model).__name__}")
    work = copy.deepcopy(model).eval()
    gm = trace(work, leaf_modules, example_inputs, frontend)
    inputs = normalize_inputs(gm, example_inputs)
    try:
        return propagate(gm, inputs)
    except SNPError:
        raise
    except Exception as e:
        raise SNPError(f"the model does not run on the example inputs: {type(e).__name__}: {e}\n"
                       "Pass inputs of the shape, dtype and device the model expects.") from e


def plan(model, example_inputs, ratios=None, importance: str = "snp", analysis: Analysis | None = None,
         leaf_modules=(), seed: int = 0, calibration=None, gamma: int = DEFAULT_GAMMA, progress: bool = True,
         target_macs=None, target_params=None, round_to: int = 1, heads: bool = False,
         scores=None) -> PruningPlan:
    """Which channels to keep in every group, as a JSON-serialisable PruningPlan.

    Budget, one of: ``ratios`` (dict of kind or group name -> fraction removed, or the path of an
    authors' config file, or a bundled one by name: "DeiT_t", "DeiT_s", "DeiT_s_small", "DeiT_b");
    ``target_macs`` / ``target_params``
    (absolute, or a fraction < 1 of the dense model; ``heads=True`` lets whole heads go too).
    ``round_to``: kept widths (per head, FFN, residual) are multiples of it.
    ``importance``: "snp" (default), "l1", "l2", "gm", "random", "reverse" (see snp_fx.importance).
    ``calibration``: batches for the q/k scores (default: the example inputs).
    ``scores``: precomputed ``snp_fx.importance.Scores`` (skips scoring).
    """
    a = analysis or analyze(model, example_inputs, leaf_modules)
    targeted = target_macs is not None or target_params is not None
    if targeted and ratios:
        raise SNPError("give either ratios or a target (target_macs / target_params), not both")
    if targeted:
        check_target(a, target_macs, target_params, round_to)
    else:
        if isinstance(ratios, str) or hasattr(ratios, "__fspath__"):
            ratios = paper_ratios(a, ratios)
        ratios = {} if ratios is None else ratios
        check_ratios(a, ratios)
    sc = scores if scores is not None else compute_scores(a, importance, calibration, gamma, seed, progress)
    if targeted:
        p = plan_for_target(a, sc, target_macs, target_params, round_to=round_to, heads=heads)
    else:
        p = make_plan(a, ratios, sc, round_to=round_to)
    p.meta.update(importance=importance, gamma=gamma)
    p.scores = sc
    return p


def _prunes_residual(analysis: Analysis, p: PruningPlan) -> bool:
    for name, entry in p.groups.items():
        g = analysis.groups[name]
        if g.kind == "residual" and len(entry["keep"]) < g.width:
            return True
    return False


def apply(model, plan: PruningPlan, example_inputs, verify: bool = True, analysis: Analysis | None = None,
          leaf_modules=()) -> fx.GraphModule:
    """Rewrite ``model`` into a smaller GraphModule following ``plan``.

    With ``verify`` (default) the result is checked on the example inputs
    against the original with the removed weights zeroed (and, when the
    residual stream is pruned, its normalisations counting kept channels
    only).  A failed check raises RewriteError.
    """
    if not isinstance(plan, PruningPlan):
        raise SNPError(f"plan must be a PruningPlan, got {type(plan).__name__}")
    a = analysis or analyze(model, example_inputs, leaf_modules)
    keep = keep_mask(a, plan)
    pruned = rewrite(a, keep)
    pruned.eval()
    if verify:
        _check(a, keep, pruned, plan)
    pruned.train(model.training)
    pruned.meta["snp_plan"] = plan.to_json()
    return pruned


@torch.no_grad()
def _check(a: Analysis, keep, pruned, p: PruningPlan):
    try:
        out = pruned(*a.inputs)
    except Exception as e:
        raise RewriteError(f"the pruned graph does not run ({type(e).__name__}: {e}); please report this "
                           "model; groups involved can be excluded with ratios={group: 0}") from e
    residual = _prunes_residual(a, p)
    try:
        err = _verify.mask_equivalence(a, keep, pruned, a.inputs, exact_norms=residual)
    except ValueError as e:  # a normalisation the reference cannot mask: check shapes only
        warnings.warn(f"snp_fx: residual pruning checked for shapes only ({e})", stacklevel=3)
        if _verify.relative_error(out, a.gm(*a.inputs)) == float("inf"):
            raise RewriteError("the pruned graph's outputs do not have the original shapes") from None
        return
    if not err < TOLERANCE:
        raise RewriteError(f"internal check failed: pruned output differs from the masked original "
                           f"(relative error {err:.2e}); please report this model")


def prune(model, example_inputs, ratios=None, importance: str = "snp", verify: bool = True,
          leaf_modules=(), seed: int = 0, calibration=None, gamma: int = DEFAULT_GAMMA,
          progress: bool = True, target_macs=None, target_params=None, round_to: int = 1,
          heads: bool = False) -> fx.GraphModule:
    """Analyze, plan and rewrite in one call (arguments as in ``plan``).

    ``ratios``: fraction removed per kind — {"qk", "v", "ffn", "residual", "heads"} —
    or per group name from ``analyze``; q/k and v remove the same count in every head.
    """
    a = analyze(model, example_inputs, leaf_modules)
    sc = None  # scored once (one calibration pass), re-planned if a group has to be set aside
    for _ in range(len(a.groups) + 1):
        p = plan(model, example_inputs, ratios, importance, analysis=a, seed=seed, calibration=calibration,
                 gamma=gamma, progress=progress, target_macs=target_macs, target_params=target_params,
                 round_to=round_to, heads=heads, scores=sc)
        sc = p.scores
        try:
            return apply(model, p, example_inputs, verify=verify, analysis=a)
        except RewriteError as e:
            # a node the rewrite cannot fix: leave its groups alone (reported in the analysis) and replan
            refused = a.refuse(e.node, f"not rewritable at `{e.node}`: {e}") if e.node else []
            if not refused or (isinstance(ratios, dict) and any(g in ratios for g in refused)):
                raise
            warnings.warn(f"snp_fx: left {refused} unpruned: {e}", stacklevel=2)
    raise RewriteError("could not find a plan the rewrite supports")
