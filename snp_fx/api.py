"""The public pipeline: trace -> analyze -> score -> plan -> rewrite -> verify."""
from __future__ import annotations

import copy
import statistics
import warnings

import torch
import torch.fx as fx

from . import verify as _verify
from .analysis import Analysis, propagate
from .calibration import default_calibration
from .compensate import DEFAULT_RIDGE
from .compensate import compensate as _compensate
from .errors import RewriteError, SNPError, SNPFXError, brief
from .importance import DEFAULT_GAMMA, check_importance, check_selection, compute_scores, name_of
from .planning import (UNIFORM_STEP, PruningPlan, check_normalise, check_ratios, check_target, check_uniform,
                       check_uniform_ratios, keep_mask, make_plan, paper_ratios, plan_for_target,
                       uniform_ratios_for_target)
from .report import time_turns
from .rewrite import rewrite
from .trace import export, normalize_inputs, trace
from .verify import TOLERANCE  # noqa: F401  (the self-check's tolerance in float32; see verify.tolerance)

# Named combinations of options (measured: benchmarks/quality_minilm.py, quality_digits.py).
PRESETS = {
    # FLAP's activation-aware fluctuation sets the widths (it keeps q/k pairs and cuts the FFN where
    # L2 removed rotary q/k pairs: quality_lm.py), exact attention-error selection picks the q/k
    # pairs, least squares refits the v / FFN consumers (the refit's ridge is cross-validated, so
    # thin statistics shrink it toward plain pruning).  Ahead of l2 widths on MiniLM, digits and the LM.
    "best": {"importance": "fluctuation", "selection": "exact", "compensate": True},
    # the paper's method as published
    "paper": {"importance": "snp", "selection": "score", "compensate": False},
}


# Width steps (``round_to``) per kind that each kind of hardware runs fastest.
HARDWARE = {
    # measured, benchmarks/widths.py (x86 CPU, 2 threads, fp32, DeiT-S shapes, batch 16): head widths
    # at multiples of 8 run faster than one channel less (32: 8.13 ms vs 31: 8.50; 40: 10.07 vs 39:
    # 10.29); a residual width of 384 took 24.5 ms where 383 took 26.6 (+8%: LayerNorm, the GEMMs
    # reading and writing the stream); FFN widths 1224 / 1232 ran 2% faster than their neighbours
    "cpu": {"qk": 8, "v": 8, "ffn": 8, "residual": 8},
    # FlashAttention needs head dims that are multiples of 8; tensor-core GEMMs run best on
    # multiples of 64 (fp16/bf16); not measured here (no GPU on this project's machines)
    "cuda": {"qk": 8, "v": 8, "ffn": 64, "residual": 64},
}


def hardware_round_to(hardware, round_to):
    """``round_to`` for ``hardware`` when the caller left it at 1 (an explicit one wins)."""
    if hardware is None:
        return round_to
    if hardware not in HARDWARE:
        raise SNPError(f"unknown hardware {hardware!r}; use one of {list(HARDWARE)}")
    return dict(HARDWARE[hardware]) if round_to == 1 else round_to


def _preset(preset, **given):
    """Options of ``preset`` for every argument still at its default (None: no preset)."""
    defaults = {"importance": "snp", "selection": "score", "compensate": False}
    if preset is None:
        return given
    if preset not in PRESETS:
        raise SNPError(f"unknown preset '{preset}'; available: {list(PRESETS)}")
    return {k: (PRESETS[preset].get(k, v) if not callable(v) and v == defaults[k] else v) for k, v in given.items()}


def analyze(model: torch.nn.Module, example_inputs, *, leaf_modules=(), frontend: str = "auto") -> Analysis:
    """Trace ``model`` and find its attention sites and coupled channel groups.

    ``model`` is copied first (modules and buffers; the parameters are shared, never written:
    ``analysis.gm`` holds the model's own weights, so train a pruned model, not the analysed
    graph), so nothing that happens here (even an error halfway) can change it.  ``example_inputs``: a tensor, a tuple of
    positional tensors, or a dict of keyword inputs.  ``leaf_modules``: module
    classes or qualified names kept whole (not traced into).  ``frontend``: "auto"
    (torch.fx, else torch.export), "fx" or "export".

    The result can be passed to ``plan`` and ``apply`` in place of the model and
    its inputs.  Bad input raises ``SNPError`` (a ``ValueError``); a failure of
    snp_fx itself raises ``InternalError``.
    """
    if not isinstance(model, torch.nn.Module):
        raise SNPError(f"expected a torch.nn.Module or fx.GraphModule, got {type(model).__name__}")
    source = _source_meta(model, example_inputs)
    work = _copy(model).eval()
    gm = trace(work, leaf_modules, example_inputs, frontend)
    try:
        a = _analyze(gm, example_inputs, leaf_modules, source)
    except SNPError as first:  # bad input (or an fx graph that does not run); InternalError propagates
        if frontend != "auto" or gm.meta.get("snp_frontend") == "export" or leaf_modules:
            raise
        try:  # the fx graph does not run (e.g. it baked in a default argument): the exported one may
            return _analyze(export(_copy(model).eval(), example_inputs), example_inputs, leaf_modules, source)
        except SNPError:
            raise first from None
    release_memory(a.gm)
    if frontend == "auto" and a.unknown_ops and not leaf_modules and a.gm.meta["snp_frontend"] == "fx":
        # ops the table does not know (often python helpers fx keeps whole, like torchvision's
        # shifted_window_attention): torch.export traces through them to ATen; keep whichever
        # graph the analysis finds more in
        try:
            b = _analyze(export(_copy(model).eval(), example_inputs), example_inputs, leaf_modules, source)
        except SNPError:
            return a
        if _findings(b) > _findings(a):
            return b
    return a


def _findings(a: Analysis) -> tuple:
    """What an analysis can prune, to choose between front-ends: attention sites first, then
    prunable channel classes, then fewer ops not understood."""
    classes = sum(g.classes.numel() for g in a.prunable())
    return len(a.sites), classes, -len(a.unknown_ops)


def release_memory(model: torch.nn.Module) -> None:
    """Hand freed memory back to the system: the analysis and the check allocate many mid-sized
    label and activation tensors, which glibc keeps in its heap after they are freed (measured on a
    1.1 B Llama: 1.2 GB of RSS after analysis, gone after malloc_trim).  No-op off glibc, and for a
    model under 256 MB, whose labels are small: there a full garbage collection costs more (0.3 s
    in a process holding many models) than it gives back."""
    import ctypes
    import gc
    if sum(p.numel() * p.element_size() for p in model.parameters()) < 2 ** 28:
        return
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _source_meta(model: torch.nn.Module, example_inputs) -> dict:
    """What ``apply`` records about the original model (see snp_fx/io.py), kept with the analysis."""
    return {"snp_source_training": model.training,
            "snp_source_shapes": {k: list(v.shape) for k, v in model.state_dict().items()},
            "snp_example_inputs": dict(example_inputs) if isinstance(example_inputs, dict) else example_inputs}


def _copy(model: torch.nn.Module) -> torch.nn.Module:
    """A copy to trace and analyse that shares the parameters: nothing in snp_fx writes to them
    (the rewrite slices into new tensors), and a second copy of a large model's weights would
    double the memory pruning needs.  Modules and buffers are copied (a forward may update a
    buffer in place: a static KV cache, running statistics); tensors a model caches with autograd
    history (timm's EfficientViT caches its attention biases after an eval forward) are copied
    detached."""
    memo = {id(p): p for p in model.parameters()}
    todo = [vars(m) for m in model.modules()]
    while todo:
        v = todo.pop()
        if isinstance(v, torch.Tensor) and v.grad_fn is not None:
            memo[id(v)] = v.detach().clone()
        elif isinstance(v, dict):
            todo += list(v.values())
        elif isinstance(v, (list, tuple)):
            todo += list(v)
    return copy.deepcopy(model, memo)


def _analyze(gm, example_inputs, leaf_modules, source: dict | None = None) -> Analysis:
    gm.meta.setdefault("snp_frontend", "fx")  # recorded (with the leaves) so snp_fx.load can re-trace the same graph
    gm.meta["snp_leaf_modules"] = tuple(leaf_modules)
    gm.meta.update(source or {})
    inputs = normalize_inputs(gm, example_inputs)
    try:
        return propagate(gm, inputs)
    except SNPFXError:  # snp_fx's own verdict: bad input (SNPError) or a bug of ours (InternalError)
        raise
    except Exception as e:  # anything else: the model's own code failed on these inputs
        raise SNPError(f"the model does not run on the example inputs: {brief(e)}; "
                       "pass inputs of the shape, dtype and device the model expects") from e


def _analysis_of(model_or_analysis, example_inputs, analysis, leaf_modules, what: str,
                 frontend: str = "auto") -> Analysis:
    """The Analysis to work on: the one given (first argument or ``analysis=``), else a new one."""
    if isinstance(model_or_analysis, Analysis):
        return model_or_analysis
    if analysis is not None:
        if not isinstance(analysis, Analysis):
            raise SNPError(f"analysis must be an Analysis from snp_fx.analyze, got {type(analysis).__name__}")
        return analysis
    if example_inputs is None:
        raise SNPError(f"{what}(model, ...) needs example_inputs; or pass an Analysis: "
                       f"{what}(snp_fx.analyze(model, example_inputs), ...)")
    return analyze(model_or_analysis, example_inputs, leaf_modules=leaf_modules, frontend=frontend)


def plan(model_or_analysis, example_inputs=None, *, ratios=None, importance="snp",
         analysis: Analysis | None = None, leaf_modules=(), seed: int = 0, calibration=None,
         gamma: int = DEFAULT_GAMMA, progress: bool | None = None, target_macs=None, target_params=None,
         round_to=1, heads: bool = False, scores=None, selection="score",
         preset: str | None = None, hardware: str | None = None, target_latency=None,
         frontend: str = "auto", uniform: bool = False, normalise: str = "group") -> PruningPlan:
    """Which channels to keep in every group, as a JSON-serialisable PruningPlan.

    ``plan(model, example_inputs, ratios=...)`` analyzes the model first (``frontend`` and
    ``leaf_modules`` as in ``analyze``);
    ``plan(analysis, ratios=...)`` reuses an ``Analysis`` from ``analyze`` (so does the
    ``analysis=`` keyword).  Every option is keyword-only.

    Budget, one of: ``ratios`` (dict of kind or group name -> fraction removed, or the path of an
    authors' config file, or a bundled one by name: "DeiT_t", "DeiT_s", "DeiT_s_small", "DeiT_b");
    ``target_macs`` / ``target_params``
    (absolute, or a fraction < 1 of the dense model; ``heads=True`` lets whole heads go too).
    MACs are per sample: one forward pass over the example inputs divided by their batch size,
    the leading dim of the first tensor input (``analysis.batch``; set it to 1 for unbatched inputs).
    ``target_latency``: a fraction < 1 of the dense model's latency, or seconds with a unit
    ("35ms"), for the example inputs' whole batch on the device the model is on: op latencies
    are measured on this machine (cached) and the plan's predicted seconds are in
    ``meta["predicted_latency"]`` (snp_fx.latency; ``snp_fx.latency.compare`` times the result).
    ``round_to``: kept widths (per head, FFN, residual) are multiples of it; an int, or per kind or
    group name: ``{"qk": 8, "v": 8, "ffn": 64}`` (in channels; rotary q/k pairs count as two).
    ``importance``: "snp" (default), "l1", "l2", "gm", "random", "reverse", "fluctuation" (see snp_fx.importance),
    or a callable ``(analysis, group) -> Tensor`` shaped like ``group.classes`` (higher = keep).
    ``calibration``: batches for the q/k scores (default: the example inputs).
    ``scores``: precomputed ``snp_fx.importance.Scores`` (skips scoring).
    ``selection``: "score" (the top scores), "exact" (q/k pairs chosen per head to minimise the
    exact change of the pre-softmax scores over the calibration set; the scores still set the counts)
    or a callable ``(analysis, group, head, n_keep) -> list[int]`` choosing the kept q/k positions.
    ``preset``: a name from ``PRESETS`` ("best", "paper") filling the options left at their defaults.
    ``hardware``: "cpu" or "cuda": the widths that hardware runs fastest (``HARDWARE``) as
    ``round_to`` when it is left at 1; a target plan then also gives q/k and v of an SDPA call one
    head width (``plan_for_target``'s ``fill_padding``: its fused kernels need one).
    ``uniform``: the same widths in every layer, as a standard model config states them (what
    ``snp_fx.to_hf`` writes): ratios per kind only; with a MACs / parameter target one ratio for
    whole heads and FFN neurons is bisected; rotary attention keeps its head dim; FFN and
    residual widths are multiples of 8 (``round_to`` left at 1).
    ``normalise``: how a target plan compares scores across groups: "group" (each group's scores
    over their mean, one threshold for all) or "kind" (then each kind's deviations from 1 over their
    pooled spread: nearly flat scores, such as SNP's v and FFN redundancy, are cut gradually rather
    than at once; see ``plan_for_target`` and README "Where a MACs budget goes").
    ``progress``: tqdm bars (None: when stderr is a terminal).
    """
    check_normalise(normalise)
    round_to = hardware_round_to(hardware, round_to)
    if uniform:
        round_to = UNIFORM_STEP if round_to == 1 else round_to
        if target_latency is not None:
            raise SNPError("uniform=True plans for target_macs or target_params, not target_latency")
    check_importance(importance)
    check_selection(selection)
    opts = _preset(preset, importance=importance, selection=selection)
    importance, selection = opts["importance"], opts["selection"]
    a = _analysis_of(model_or_analysis, example_inputs, analysis, leaf_modules, "plan", frontend)
    targeted = target_macs is not None or target_params is not None or target_latency is not None
    if targeted and ratios:
        raise SNPError("give either ratios or a target (target_macs / target_params / target_latency), not both")
    if normalise != "group" and (not targeted or uniform):
        raise SNPError(f"normalise={normalise!r} compares groups for a target plan (target_macs / target_params "
                       "/ target_latency, not uniform=True); ratios set the widths themselves: drop normalise")
    if targeted:
        check_target(a, target_macs, target_params, round_to, target_latency=target_latency, heads=heads or uniform)
    else:
        if isinstance(ratios, str) or hasattr(ratios, "__fspath__"):
            ratios = paper_ratios(a, ratios)
        ratios = {} if ratios is None else ratios
        check_ratios(a, ratios)
        if uniform:
            check_uniform_ratios(a, ratios)
    sc = scores if scores is not None else compute_scores(a, importance, calibration, gamma, seed, progress,
                                                          selection=selection)
    if uniform:
        if targeted:
            ratios = uniform_ratios_for_target(a, sc, target_macs, target_params, round_to)
        p = make_plan(a, ratios, sc, round_to=round_to)
        check_uniform(a, p)
        p.meta["uniform"] = True
    elif targeted:
        fill = hardware is not None  # the fused kernels need one head width: fill the pad with channels
        p = plan_for_target(a, sc, target_macs, target_params, round_to=round_to, heads=heads,
                            target_latency=target_latency, fill_padding=fill, normalise=normalise)
        if target_latency is not None:
            p = _latency_feedback(a, sc, p, round_to, heads, fill, normalise=normalise)
    else:
        p = make_plan(a, ratios, sc, round_to=round_to)
    p.meta.update(importance=name_of(importance), gamma=gamma, selection=name_of(selection))
    if targeted and not uniform:
        p.meta["normalise"] = normalise
    for site, why in p.meta.get("heads_kept", {}).items():
        warnings.warn(f"snp_fx: heads of {site} kept: {why}", stacklevel=2)
    p.scores = sc
    return p


def _latency_feedback(a: Analysis, scores, p: PruningPlan, round_to, heads: bool, fill_padding: bool = False,
                      rounds: int = 8, tolerance: float = 0.01, turns: int = 7,
                      normalise: str = "group") -> PruningPlan:
    """Ops timed alone (the latency table) can cost more or less than inside the whole model
    (threads, caches): time the planned model in turns with the dense one on the example inputs and
    re-plan with the table's target moved until the measured fraction of the dense latency is within
    ``tolerance`` of the one asked (measured: at 2 threads the table alone planned DeiT-S at batch 16
    to 0.28 of the dense latency for 0.448).  The table's target is stepped by the ratio asked /
    measured, then interpolated between the closest measured plans on either side.

    The measured fraction is the median of per-turn ratios (pruned / dense of the same turn): over
    looks of 7 turns on DeiT-S at batch 16 its standard deviation was 0.9%, against 1.1% for the
    ratio of the medians.  A plan that looks within ``tolerance`` is timed for as many turns again
    before it is taken, so one lucky look does not decide.  The tolerance leaves room for the timing
    a user checks with, minutes later: a plan taken at the edge of 2.5% measured 6.6% off in
    benchmarks/latency.py (DeiT-S, batch 16), which times ten models in turns (a pruned model reads
    up to 2% faster against the dense one there than with the two alone), and the same two models
    timed a few minutes apart on this shared machine read up to 3% apart."""
    asked = p.meta["target_latency"] / p.meta["dense"]  # the fraction of the dense latency asked for
    frac, tried, best = asked, [], None
    for _ in range(rounds):
        pruned = rewrite(a, keep_mask(a, p)).eval()
        ratios = _turn_ratios(a, pruned, turns)
        if abs(statistics.median(ratios) / asked - 1) <= tolerance:  # close: look again before taking it
            ratios += _turn_ratios(a, pruned, turns)
        got = statistics.median(ratios)
        p.meta.update(measured_fraction=got, planned_fraction=frac)
        tried.append((frac, got))
        if best is None or abs(got / asked - 1) < abs(best.meta["measured_fraction"] / asked - 1):
            best = p
        if abs(got / asked - 1) <= tolerance:
            break
        below = [f for f in tried if f[1] < asked]
        above = [f for f in tried if f[1] > asked]
        if below and above:  # bracketed: interpolate between the closest plans on either side
            (f0, g0), (f1, g1) = max(below, key=lambda f: f[1]), min(above, key=lambda f: f[1])
            frac = f0 + (asked - g0) / (g1 - g0) * (f1 - f0)
        else:
            frac = min(frac * asked / got, 0.99)
        try:
            p = plan_for_target(a, scores, target_latency=frac, round_to=round_to, heads=heads,
                                fill_padding=fill_padding, normalise=normalise)
        except SNPError:  # the table allows nothing smaller: keep the closest plan measured
            break
    best.meta.update(target_latency=asked * best.meta["dense"])
    return best


def _turn_ratios(a: Analysis, pruned, turns: int) -> list[float]:
    """pruned / dense seconds of each turn, the two timed back to back on the example inputs."""
    t = time_turns({"dense": a.gm, "pruned": pruned}, a.inputs, repeats=turns)
    return [q / d for d, q in zip(t["dense"], t["pruned"])]


def _prunes_residual(analysis: Analysis, p: PruningPlan) -> bool:
    for name, entry in p.groups.items():
        g = analysis.groups[name]
        if g.kind == "residual" and len(entry["keep"]) < g.width:
            return True
    return False


def apply(model_or_analysis, plan: PruningPlan, example_inputs=None, *, verify: bool = True,
          analysis: Analysis | None = None, leaf_modules=(), compensate: bool = False, calibration=None,
          ridge: float | None = DEFAULT_RIDGE, progress: bool | None = None,
          frontend: str = "auto") -> fx.GraphModule:
    """Rewrite the model into a smaller GraphModule following ``plan``.

    ``apply(model, plan, example_inputs)`` analyzes the model first (``frontend`` as in
    ``analyze``; use the one the plan was made with); ``apply(analysis, plan)``
    reuses an ``Analysis`` from ``analyze`` (so does the ``analysis=`` keyword).  Every option
    is keyword-only.

    With ``verify`` (default) the result is checked on the example inputs
    against the original with the removed weights zeroed (and, when the
    residual stream is pruned, its normalisations counting kept channels
    only): the relative error must stay below 1e-4 in float32; in float16 / bfloat16
    below 3 times the masked original's own rounding error (its outputs in the model's
    dtype against float32 on the same inputs; ``snp_fx.verify.tolerance``).  A failed
    check raises RewriteError.  The pruned model keeps the model's dtype.

    ``compensate=True`` then refits the consumer of every pruned v / FFN group
    (output projection, fc2) by ridge least squares over ``calibration`` (default: the
    example inputs) so it reproduces the dense layer output from the kept channels
    (snp_fx.compensate); what was done is in ``pruned.meta["snp_compensation"]``.
    ``ridge``: None (default) picks the strength per layer by cross-validation on the
    calibration rows, shrinking toward the plain pruned weights, and leaves a layer
    unrefit when no strength helps on held-out rows (little calibration data); a number
    fixes a ridge toward zero (lam = ridge * mean variance of the kept inputs).
    ``progress``: a tqdm bar for that pass (None: when stderr is a terminal).
    """
    if not isinstance(plan, PruningPlan):
        raise SNPError(f"plan must be a PruningPlan, got {type(plan).__name__}")
    a = _analysis_of(model_or_analysis, example_inputs, analysis, leaf_modules, "apply", frontend)
    keep = keep_mask(a, plan)
    pruned = rewrite(a, keep)
    pruned.eval()
    if verify:
        _check(a, keep, pruned, plan)  # before compensation, which changes the kept weights
        release_memory(a.gm)
    if compensate:
        if calibration is None:
            calibration = default_calibration(a)
        pruned.meta["snp_compensation"] = _compensate(a, keep, pruned, calibration, ridge, progress=progress)
    # the original model's training flag and parameter shapes: from the model when given, else as
    # analyze recorded them (a.gm is the analysed copy, in eval mode)
    source = model_or_analysis if isinstance(model_or_analysis, torch.nn.Module) else a.gm
    recorded = source is a.gm
    training = a.gm.meta.get("snp_source_training", a.gm.training) if recorded else source.training
    pruned.train(training)
    pruned.meta["snp_plan"] = plan.to_json()
    # what snp_fx.save needs to rebuild this graph from the original model (see snp_fx/io.py)
    if example_inputs is None:
        example_inputs = a.gm.meta.get("snp_example_inputs", a.inputs)
    pruned.meta["snp_example_inputs"] = dict(example_inputs) if isinstance(example_inputs, dict) else example_inputs
    shapes = a.gm.meta.get("snp_source_shapes") if recorded else None
    pruned.meta["snp_source_shapes"] = shapes if shapes is not None else \
        {k: list(v.shape) for k, v in source.state_dict().items()}
    return pruned


@torch.no_grad()
def _check(a: Analysis, keep, pruned, p: PruningPlan):
    try:
        out = pruned(*a.inputs)
    except Exception as e:
        node = _failing_node(pruned, a)  # named, so prune can leave that node's groups unpruned
        raise RewriteError(f"the pruned graph does not run ({brief(e)}"
                           f"{f' at `{node}`' if node else ''}); please report this "
                           "model; groups involved can be excluded with ratios={group: 0}", node=node) from e
    residual = _prunes_residual(a, p)
    try:
        err, tol = _verify.check(a, keep, pruned, a.inputs, exact_norms=residual)
    except ValueError as e:  # a normalisation the reference cannot mask: check shapes only
        warnings.warn(f"snp_fx: residual pruning checked for shapes only ({e})", stacklevel=3)
        if _verify.relative_error(out, a.gm(*a.inputs)) == float("inf"):
            raise RewriteError("the pruned graph's outputs do not have the original shapes") from None
        return
    if not err < tol:
        raise RewriteError(f"internal check failed: pruned output differs from the masked original "
                           f"(relative error {err:.2e}, tolerance {tol:.1e}); please report this model")


def _failing_node(pruned: fx.GraphModule, a: Analysis) -> str | None:
    """The node of the original graph whose copy fails first when ``pruned`` runs, if any."""
    failed = []

    class Finder(fx.Interpreter):
        def run_node(self, n):
            try:
                return super().run_node(n)
            except Exception:
                failed.append(n.name)
                raise

    try:
        Finder(pruned).run(*a.inputs)
    except Exception:  # noqa: BLE001 - the failure is what we look for
        pass
    source = pruned.meta.get("snp_source_nodes", {})
    todo = [n for n in pruned.graph.nodes if failed and n.name == failed[0]]
    while todo:  # a node the rewrite inserted (a gather) stands for the original node it feeds
        n = todo.pop(0)
        if n.name in source:
            return source[n.name]
        todo += list(n.users)
    return None


def prune(model, example_inputs, *, ratios=None, importance="snp", verify: bool = True,
          leaf_modules=(), frontend: str = "auto", seed: int = 0, calibration=None, gamma: int = DEFAULT_GAMMA,
          progress: bool | None = None, target_macs=None, target_params=None, round_to=1,
          heads: bool = False, selection="score", compensate: bool = False,
          preset: str | None = None, hardware: str | None = None, target_latency=None,
          uniform: bool = False, normalise: str = "group") -> fx.GraphModule:
    """Analyze, plan and rewrite in one call (arguments as in ``plan`` and ``apply``).

    ``preset="best"``: exact q/k selection and least-squares compensation (see ``PRESETS``).

    ``ratios``: fraction removed per kind — {"qk", "v", "ffn", "residual", "heads"} —
    or per group name from ``analyze``; q/k and v remove the same count in every head.
    """
    opts = _preset(preset, importance=importance, selection=selection, compensate=compensate)
    importance, selection, compensate = opts["importance"], opts["selection"], opts["compensate"]
    check_importance(importance)
    check_selection(selection)
    hardware_round_to(hardware, round_to)  # a bad name fails before the analysis
    check_normalise(normalise)
    a = analyze(model, example_inputs, leaf_modules=leaf_modules, frontend=frontend)
    sc = None  # scored once (one calibration pass), re-planned if a group has to be set aside
    for _ in range(len(a.groups) + 1):
        p = plan(a, ratios=ratios, importance=importance, seed=seed, calibration=calibration,
                 gamma=gamma, progress=progress, target_macs=target_macs, target_params=target_params,
                 round_to=round_to, heads=heads, scores=sc, selection=selection, hardware=hardware,
                 target_latency=target_latency, uniform=uniform, normalise=normalise)
        sc = p.scores
        try:
            return apply(model, p, example_inputs, verify=verify, analysis=a, compensate=compensate,
                         calibration=calibration, progress=progress)
        except RewriteError as e:
            # a node the rewrite cannot fix: leave its groups alone (reported in the analysis) and replan
            refused = a.refuse(e.node, f"not rewritable at `{e.node}`: {e}") if e.node else []
            if not refused or (isinstance(ratios, dict) and any(g in ratios for g in refused)):
                raise
            warnings.warn(f"snp_fx: left {refused} unpruned: {e}", stacklevel=2)
    raise RewriteError("could not find a plan the rewrite supports")
