"""Latency budgets: op latencies measured on this machine (a table, as in HALP) predict the pruned model's.

Every node whose cost depends on pruned widths (a family that counts MACs: linear, addmm,
matmul / bmm / einsum, attention, conv) is timed alone, with random tensors of its pruned
shapes (dtypes and memory layouts as in the real forward pass; attention padded as the
rewrite pads it), on a small grid of the sizes pruning can change, and interpolated in
between (multilinear).  Those sizes are the node's *variables*: dims whose sizes agree on
every one of a few random plans are one variable (q's and k's head width; the heads of q, k
and v), so the grid is 1-3 dimensional whatever the op.

The rest of the forward pass (norms, activations, copies, python) is not timed per node: it is
fitted as a fixed part plus a part proportional to the elements the untimed nodes write, on
the dense model and one pruned to half of every group, both timed in turns with the nodes at
their dense shapes (``LatencyModel.calibrate``).  Taking the rest as fixed was measured to
overpredict DeiT-T's pruned latency by 30-50%.

Everything is for the example inputs' shapes (the whole batch, not per sample) on the device
the model is on.  Nodes with the same op, shapes and layout share one measurement (DeiT's 12
blocks are timed once), and the op grids are cached on disk (``SNP_FX_CACHE`` folder, default
``~/.cache/snp_fx``, file latency.json) keyed by the op and the machine: device, threads,
torch version, CPU name.  The calibration runs on every build (seconds), so a cached table is
brought to the machine's speed of the day, and a cached grid whose corners no longer time in the
same ratio (timed while the machine was busy) is timed again; delete the file to time every grid again.
"""
from __future__ import annotations

import bisect
import copy
import hashlib
import itertools
import json
import math
import os
import platform
import re
import statistics
import time

import torch
import torch.fx as fx
import torch.nn as nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from .cost import _counted_nodes, _Estimator
from .errors import RewriteError, SNPError, brief
from .kernels import padded_sdpa
from .ops.attention import _padded
from .ops.registry import Args
from .planning import PruningPlan, _round_width, first_kept, keep_mask
from .report import time_interleaved
from .rewrite import rewrite

GRID = 48          # about this many grid points per node: 8 sizes for one variable, 7x7 for two, 4x4x4 for three
WARMUP, REPEATS = 2, 5
CALIBRATION_ROUNDS = 8  # turns of the dense model and a half-pruned one
PROBES = 6          # random plans that find which dims move together
STALE = 2.0         # a cached grid whose smallest-to-largest time ratio moved by more than this factor is timed again
                    # (busy-machine grids were 2.3-160x off; a tiny op's timing alone moves up to ~1.5x on a loaded machine)


# ---------------------------------------------------------------------------
# Timing and the on-disk cache
# ---------------------------------------------------------------------------

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _seconds(fn, device, warmup: int = WARMUP, repeats: int = REPEATS) -> float:
    """Median seconds of ``fn()`` after ``warmup`` calls."""
    with torch.inference_mode():
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(repeats):
            _sync(device)
            t = time.perf_counter()
            fn()
            _sync(device)
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device: torch.device) -> dict:
    """What a measurement depends on besides the op: part of every cache key."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    return {"device": name, "threads": torch.get_num_threads(), "torch": torch.__version__, "cpu": cpu_name()}


def cache_path() -> str:
    return os.path.join(os.environ.get("SNP_FX_CACHE") or os.path.expanduser("~/.cache/snp_fx"), "latency.json")


def _load_cache() -> dict:
    try:
        with open(cache_path()) as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError):
        data = {}
    return data if data.get("format") == "snp_fx.latency/1" else {"format": "snp_fx.latency/1", "ops": {}}


def _save_cache(new_ops: dict) -> None:
    data = _load_cache()  # re-read: another process may have added entries meanwhile
    data["ops"].update(new_ops)
    path = cache_path()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f)
    os.replace(tmp, path)  # atomic: a reader never sees half a file


def _key(desc) -> str:
    return hashlib.sha1(json.dumps(desc, sort_keys=True, default=str).encode()).hexdigest()[:24]


def _literal(v):
    """A non-tensor argument as it enters a cache key (no memory addresses)."""
    if v is None or isinstance(v, (bool, int, float, str, torch.dtype, torch.device)):
        return repr(v)
    return type(v).__name__


# ---------------------------------------------------------------------------
# One node: its operands, variables, grid and runner
# ---------------------------------------------------------------------------

def _random(shape, dtype, order, device) -> torch.Tensor:
    """A tensor of ``shape`` whose dims lie in memory in ``order`` (outermost first), as the real one did."""
    stored = [shape[d] for d in order]
    if dtype.is_floating_point:
        t = torch.randn(stored, dtype=dtype, device=device)
    else:
        t = torch.ones(stored, dtype=dtype, device=device)
    return t.permute([order.index(d) for d in range(len(shape))])


def _order(t: torch.Tensor) -> list[int]:
    return sorted(range(t.dim()), key=lambda d: -t.stride(d))


class _Op:
    """A node to time.  Its *slots* are the dims of its operands: inputs (tensor arguments), its
    output, a module's parameters; ``vars`` groups the slots pruning changes (one size each)."""

    def __init__(self, a, node: fx.Node, key: str, family, args, kwargs, modules):
        self.node, self.key, self.family = node, key, family
        self.module = modules[node.target] if node.op == "call_module" else None
        leaves, self.spec = tree_flatten((args, kwargs))
        names, _ = tree_flatten((node.args, node.kwargs))
        self.leaves = [None if isinstance(v, torch.Tensor) else v for v in leaves]
        self.inputs = []  # (leaf position, node name, dense shape, dtype, layout)
        for i, (v, n) in enumerate(zip(leaves, names)):
            if isinstance(v, torch.Tensor):
                if not isinstance(n, fx.Node) or a.shapes.get(n.name) != tuple(v.shape):
                    raise ValueError("a tensor argument the analysis has no shape for")
                self.inputs.append((i, n.name, tuple(v.shape), v.dtype, _order(v)))
        self.device = next((x.device for x in leaves if isinstance(x, torch.Tensor)), torch.device("cpu"))
        self.params = [(f"{node.target}.{p}", p, tuple(t.shape), t.dtype)
                       for p, t in self.module.named_parameters(recurse=False)] if self.module is not None else []
        self.shapes = [s for _, _, s, _, _ in self.inputs] + [a.shapes[node.name]] + [s for _, _, s, _ in self.params]
        self.vars, self.axes, self.seconds, self.cache_key = [], [], None, None

    def sizes(self, c) -> list[int]:
        """Every slot's size under the estimator's keep mask."""
        out = []
        for _, name, _, _, _ in self.inputs:
            out += c.new(name)
        out += c.new(self.node.name)
        for qual, _, shape, _ in self.params:
            out += [int(m.sum()) for m in c.analysis.channels.dim_masks(qual, shape, c.keep)]
        return out

    def find_vars(self, probes: list[list[int]], grid: int = GRID) -> None:
        """Slots whose sizes agree on every probe are one variable; constant slots are none."""
        columns = {}
        for s, col in enumerate(zip(*probes)):
            if len(set(col)) > 1:
                columns.setdefault(col, []).append(s)
        self.vars = list(columns.values())
        if not self.vars:
            return
        n = min(8, max(2, round(grid ** (1 / len(self.vars)))))
        self.axes = [_axis(min(col), probes[0][slots[0]], n) for col, slots in columns.items()]
        self._reps = [self._where(slots[0]) for slots in self.vars]  # inputs and output come first: cheap to read

    def _where(self, slot: int) -> tuple[int, int]:
        """(operand, dim) of a slot."""
        for i, shape in enumerate(self.shapes):
            if slot < len(shape):
                return i, slot
            slot -= len(shape)
        raise IndexError(slot)

    def point(self, c) -> list[int]:
        """The variables' sizes under the estimator's keep mask."""
        out = []
        for i, d in self._reps:
            if i <= len(self.inputs):
                name = self.inputs[i][1] if i < len(self.inputs) else self.node.name
                out.append(c.new(name)[d])
            else:
                qual, _, shape, _ = self.params[i - len(self.inputs) - 1]
                out.append(int(c.analysis.channels.dim_masks(qual, shape, c.keep)[d].sum()))
        return out

    def describe(self, env: dict) -> dict:
        """What the measurement depends on (the cache key): no node or module names, so identical
        blocks share it."""
        if self.module is not None:
            op = f"{type(self.module).__name__}({self.module.extra_repr()})"
        elif self.node.op == "call_method":
            op = f"method {self.node.target}"
        else:
            t = self.node.target
            op = f"{getattr(t, '__module__', '')}.{getattr(t, '__name__', t)}"
        return {"op": op, "family": self.family.kind, "key": self.key, "spec": str(self.spec),
                "literals": [_literal(v) for v in self.leaves if v is not None],
                "inputs": [(s, str(t), o) for _, _, s, t, o in self.inputs],
                "params": [(s, str(t)) for _, _, s, t in self.params],
                "vars": self.vars, "axes": self.axes, "machine": env}

    def runner(self, values: list[int]):
        """A call of the op with every variable at ``values``, on fresh random tensors."""
        sizes = [x for s in self.shapes for x in s]
        for slots, v in zip(self.vars, values):
            for s in slots:
                sizes[s] = v
        shapes, at = [], 0
        for s in self.shapes:
            shapes.append(sizes[at:at + len(s)])
            at += len(s)
        leaves = list(self.leaves)
        for (i, _, _, dtype, order), shape in zip(self.inputs, shapes):
            leaves[i] = _random(shape, dtype, order, self.device)
        args, kwargs = tree_unflatten(leaves, self.spec)
        if self.module is not None:
            m = copy.deepcopy(self.module)  # as the rewrite does: parameters of the pruned shapes
            for (_, p, _, dtype), shape in zip(self.params, shapes[len(self.inputs) + 1:]):
                setattr(m, p, nn.Parameter(_random(shape, dtype, list(range(len(shape))), self.device),
                                           requires_grad=False))
            self.family.prune_module(None, m, self.node)
            return lambda: m(*args, **kwargs)
        if self.node.op == "call_method":
            return lambda: getattr(args[0], self.node.target)(*args[1:], **kwargs)
        target = self.node.target
        if self.family.kind == "sdpa":  # the rewrite's choice: unequal q/k and v widths run padded
            got = Args(self.node, args, kwargs)
            q, v = Args(self.node)["query"], Args(self.node)["value"]
            old = (self.shapes[self._operand(q.name)][-1], self.shapes[self._operand(v.name)][-1])
            if _padded(self.key, old, (got.value("query").shape[-1], got.value("value").shape[-1])):
                target = padded_sdpa
        return lambda: target(*args, **kwargs)

    def _operand(self, name: str) -> int:
        return next(k for k, (_, n, _, _, _) in enumerate(self.inputs) if n == name)

    def predict(self, c) -> float:
        return _interpolate(self.axes, self.seconds, self.point(c))


def _axis(lo: int, hi: int, n: int) -> list[int]:
    """``n`` sizes from ``lo`` to ``hi``; inner ones on multiples of 8 when the steps are wide
    (the widths a rounded plan keeps, and the ones fast kernels like)."""
    n = min(n, hi - lo + 1)
    step = (hi - lo) / (n - 1)
    pts = {lo, hi}
    for i in range(1, n - 1):
        v = lo + i * step
        pts.add(min(max(round(v / 8) * 8 if step >= 16 else round(v), lo), hi))
    return sorted(pts)


def _interpolate(axes: list[list[int]], values: list[float], x: list[int]) -> float:
    """Multilinear interpolation of ``values`` (row-major over the grid ``axes``) at ``x``;
    outside the grid, the nearest edge."""
    idx, frac = [], []
    for ax, v in zip(axes, x):
        v = min(max(v, ax[0]), ax[-1])
        i = min(bisect.bisect_right(ax, v) - 1, len(ax) - 2)
        idx.append(i)
        frac.append((v - ax[i]) / (ax[i + 1] - ax[i]))
    strides = [math.prod(len(ax) for ax in axes[k + 1:]) for k in range(len(axes))]
    total = 0.0
    for corner in itertools.product((0, 1), repeat=len(axes)):
        w = math.prod(f if b else 1 - f for f, b in zip(frac, corner))
        if w:
            total += w * values[sum((i + b) * s for i, b, s in zip(idx, corner, strides))]
    return total


# ---------------------------------------------------------------------------
# The model: build (measure or read the cache) and predict
# ---------------------------------------------------------------------------

class LatencyModel:
    """Predicted seconds of a pruned model's forward pass over the example inputs:
    ``scale`` x the timed nodes' interpolated latencies + ``rest_fixed`` + ``rest_per_element`` x
    the elements the other nodes write (their share of the dense model's).

    ``dense``: the dense model's measured latency; ``ops``: the timed nodes; ``skipped``: nodes that
    could not be timed alone (node -> why; their time is in the rest); ``measured``: grid points timed
    in this build (0 when the cache had every op); ``machine``: where (see ``machine()``)."""

    def __init__(self, analysis, ops_, machine_: dict, skipped: dict, measured: int):
        self.analysis, self.ops, self.machine, self.skipped, self.measured = analysis, ops_, machine_, skipped, measured
        timed = {op.node.name for op in ops_}
        self.others = [n.name for n, _, _ in _counted_nodes(analysis, _Estimator(analysis, _ones(analysis)))
                       if n.name not in timed and all(isinstance(d, int) for d in analysis.shapes[n.name])]
        self.dense_elements = self._elements(_Estimator(analysis, _ones(analysis)))
        self.dense = self.scale = self.rest_fixed = self.rest_per_element = None  # set by calibrate()

    def _elements(self, c) -> int:
        return sum(math.prod(c.new(name)) for name in self.others)

    def parts(self, keep: torch.Tensor) -> tuple[float, float]:
        """(the timed nodes' seconds as the table has them, the other nodes' share of the dense elements)."""
        c = _Estimator(self.analysis, keep)
        return sum(op.predict(c) for op in self.ops), self._elements(c) / max(self.dense_elements, 1)

    def predict(self, analysis, keep: torch.Tensor) -> float:
        """Seconds of the model pruned as ``keep`` says (``analysis``: as ``plan_for_target``'s measure has it)."""
        ops_s, share = self.parts(keep)
        return self.scale * ops_s + self.rest_fixed + self.rest_per_element * share

    def __call__(self, analysis, keep: torch.Tensor) -> float:
        return self.predict(analysis, keep)

    def calibrate(self, repeats: int = CALIBRATION_ROUNDS) -> None:
        """Time every timed node again at its dense shapes, the way the table was timed: ``scale``
        brings the table (maybe cached on another day) to today's speed.  Then time the dense model
        and one pruned to half of every group in turns, and fit the rest of both linear in the
        elements the untimed nodes write (norms, activations and copies shrink with the widths;
        python does not).

        Not timed in the same turns as the models: a node called once after other nodes runs on
        cold caches, 1.6x its repeated time on DeiT-T, and the table has repeated times."""
        a, device = self.analysis, _device(self.analysis)
        half = probe_keeps(a, False, 0, half=True)[-1]
        fresh = {}
        for op in self.ops:  # identical nodes share one timing
            if op.cache_key not in fresh:
                fresh[op.cache_key] = _seconds(op.runner([ax[-1] for ax in op.axes]), device)
        table_dense, _ = self.parts(_ones(a))
        self.scale = sum(fresh[op.cache_key] for op in self.ops) / table_dense if self.ops else 1.0
        models = {"dense": a.gm}
        try:  # a plan the rewrite cannot realise: the rest is then taken proportional to the elements
            models["half"] = rewrite(a, half)
        except RewriteError:
            pass
        with torch.inference_mode():
            t = time_interleaved(models, a.inputs, repeats=repeats)
        self.dense = t["dense"]
        if self.ops:  # the nodes cannot take longer than the whole model: the dense prediction is the measurement
            self.scale = min(self.scale, self.dense / table_dense)
        rest = max(self.dense - self.scale * table_dense, 0.0)
        self.rest_fixed, self.rest_per_element = 0.0, rest
        table_half, share = self.parts(half)
        if "half" in t and share < 1:
            rest_half = min(max(t["half"] - self.scale * table_half, 0.0), rest)
            self.rest_per_element = min((rest - rest_half) / (1 - share), rest)
            self.rest_fixed = rest - self.rest_per_element


def _ones(analysis) -> torch.Tensor:
    return torch.ones(analysis.channels.num_units, dtype=torch.bool)


def latency_model(analysis, heads: bool = False, cache: bool = True) -> LatencyModel:
    """The latency model of ``analysis`` (built once per analysis and ``heads``).

    ``heads``: plans may remove whole heads, so head counts are measured too.  ``cache``: read and
    write the op table on disk (see the module notes); the dense model is timed on every build."""
    models = analysis.__dict__.setdefault("_latency_models", {})
    if heads not in models:
        models[heads] = _build(analysis, heads, cache)
    return models[heads]


def _device(analysis) -> torch.device:
    for t in itertools.chain(analysis.gm.parameters(), tree_flatten(analysis.inputs)[0]):
        if isinstance(t, torch.Tensor):
            return t.device
    return torch.device("cpu")


def _record(analysis, nodes: set) -> dict:
    """The real arguments of ``nodes`` in one forward pass over the example inputs."""
    seen = {}

    class Reader(fx.Interpreter):
        def run_node(self, n):
            if n in nodes:
                seen[n] = self.fetch_args_kwargs_from_env(n)
            return super().run_node(n)

    with torch.inference_mode():
        Reader(analysis.gm).run(*analysis.inputs)
    return seen


def probe_keeps(analysis, heads: bool, n: int = PROBES, seed: int = 0, half: bool = False) -> list[torch.Tensor]:
    """Keep masks: dense, the smallest plan (one channel per group, one head per site with
    ``heads``), ``n`` random plans, and with ``half`` one keeping half of every group."""
    g = torch.Generator().manual_seed(seed)
    groups = [x for x in analysis.groups.values() if x.prunable]
    sites = {}
    for x in groups:
        if x.site:
            sites.setdefault(x.site, {})[x.kind] = x
    droppable = {s for s, gs in sites.items() if heads and "qk" in gs and "v" in gs
                 and gs["qk"].heads == gs["v"].heads > 1 and not gs["qk"].keep_heads and not gs["v"].keep_heads}

    def keep(width, n_heads):
        plan = {}
        for x in groups:
            w = width(x)
            if x.classes.dim() == 2:
                h = n_heads(x.site) if x.site in droppable else x.heads
                plan[x.name] = {"kind": x.kind, "keep": [list(range(w)) if i < h else [] for i in range(x.heads)]}
            else:  # widths the group's kernel and blocks take (grouped_mm rows, a grouped conv's groups)
                plan[x.name] = {"kind": x.kind, "keep": first_kept(x, _round_width(w, x.width, x.step))}
        return keep_mask(analysis, PruningPlan(plan))

    out = [_ones(analysis), keep(lambda x: 1, lambda s: 1)]
    for _ in range(n):
        widths = {x.name: int(torch.randint(1, x.width + 1, (), generator=g)) for x in groups}
        kept = {s: int(torch.randint(1, sites[s]["qk"].heads + 1, (), generator=g)) for s in droppable}
        out.append(keep(lambda x: widths[x.name], lambda s: kept[s]))
    if half:
        out.append(keep(lambda x: max(1, x.width // 2), lambda s: 1))
    return out


def _time_grid(op: _Op, device) -> list[float]:
    """Seconds of ``op`` at every point of its grid (row-major)."""
    return [_seconds(op.runner(list(p)), device) for p in itertools.product(*op.axes)]


def _still_holds(op: _Op, seconds: list[float], device) -> bool:
    """Whether a cached grid still has this machine's shape: its two corners (every variable at its
    smallest, at its largest) timed again keep their ratio within a factor ``STALE``.  The
    calibration rescales a table to the day's speed, but not a table timed while the machine was
    busy, which distorts small ops more than big ones (measured: a DeiT-S table cached under load
    had corner ratios 3-160x off, and predicted 0.96 of the dense latency for a plan that ran at 0.61)."""
    lo = hi = math.inf
    for _ in range(2):  # a second look before a whole grid is timed again: one slow timing is noise
        lo = min(lo, _seconds(op.runner([ax[0] for ax in op.axes]), device))
        hi = min(hi, _seconds(op.runner([ax[-1] for ax in op.axes]), device))
        if 1 / STALE <= (lo / seconds[0]) / (hi / seconds[-1]) <= STALE:
            return True
    return False


def _build(analysis, heads: bool, cache: bool) -> LatencyModel:
    device = _device(analysis)
    env = machine(device)
    c = _Estimator(analysis, _ones(analysis))
    counted = [(n, key, fam) for n, key, fam in _counted_nodes(analysis, c) if fam.macs(c, n, key) > 0]
    real = _record(analysis, {n for n, _, _ in counted})
    estimators = [_Estimator(analysis, k) for k in probe_keeps(analysis, heads)]
    table, skipped = [], {}
    for n, key, fam in counted:
        try:
            op = _Op(analysis, n, key, fam, *real[n], c.modules)
        except ValueError as e:
            skipped[n.name] = str(e)
            continue
        op.find_vars([op.sizes(e) for e in estimators])
        if op.vars:  # a node pruning cannot change costs the same in every plan: it is part of the rest
            table.append(op)
    stored = _load_cache()["ops"] if cache else {}
    new, measured, held = {}, 0, {}
    for op in table:
        op.cache_key = _key(op.describe(env))
        entry = new.get(op.cache_key)
        if entry is None and op.cache_key in stored:
            if op.cache_key not in held:  # identical nodes: one check
                held[op.cache_key] = _still_holds(op, stored[op.cache_key]["seconds"], device)
            entry = stored[op.cache_key] if held[op.cache_key] else None
        if entry is None:
            try:
                entry = {"op": op.describe(env)["op"], "axes": op.axes, "seconds": _time_grid(op, device)}
            except Exception as e:  # noqa: BLE001  an op that does not run alone: its time stays in the rest
                skipped[op.node.name] = f"cannot be timed alone ({brief(e)})"
                continue
            measured += len(entry["seconds"])
            new[op.cache_key] = entry
        op.seconds = entry["seconds"]
    if cache and new:
        _save_cache(new)
    model = LatencyModel(analysis, [op for op in table if op.seconds is not None], env, skipped, measured)
    model.calibrate()
    return model


# ---------------------------------------------------------------------------
# Targets and checks
# ---------------------------------------------------------------------------

def target_seconds(target, dense: float) -> float:
    """``target_latency`` in seconds: a fraction (< 1) of the dense latency ``dense``, or absolute:
    a string with a unit ("35ms", "0.035s") or a number >= 1 (seconds)."""
    if isinstance(target, str):
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*(ms|s)\s*", target)
        if m is None:
            raise SNPError(f"target_latency {target!r}: give a fraction < 1 of the dense latency, or seconds "
                           "with a unit like '35ms' or '0.035s'")
        return float(m.group(1)) * (1e-3 if m.group(2) == "ms" else 1.0)
    if not isinstance(target, (int, float)) or isinstance(target, bool) or target <= 0:
        raise SNPError(f"target_latency must be a fraction < 1 of the dense latency or seconds like '35ms', "
                       f"got {target!r}")
    return target * dense if target < 1 else float(target)


def _removes_heads(plan: PruningPlan) -> bool:
    return any(isinstance(k, list) and any(isinstance(h, list) and not h for h in k)
               for k in (g["keep"] for g in plan.groups.values()))


def compare(analysis, pruned: fx.GraphModule, repeats: int = 10) -> dict:
    """Predicted and measured seconds of ``pruned`` (from ``apply`` / ``prune`` on ``analysis``),
    the dense model timed in turns with it (``report.time_interleaved``) on the example inputs.

    Returns ``predicted`` / ``measured`` (pruned), ``dense_predicted`` (the dense latency measured
    when the latency model was built) / ``dense_measured`` (now), and both speedups; a busy machine
    moves the absolute times, the speedups less."""
    plan = PruningPlan.from_json(pruned.meta["snp_plan"])
    model = latency_model(analysis, heads=bool(plan.meta.get("heads")) or _removes_heads(plan))
    predicted = model.predict(analysis, keep_mask(analysis, plan))
    with torch.inference_mode():
        t = time_interleaved({"dense": analysis.gm, "pruned": pruned}, analysis.inputs, repeats=repeats)
    return {"predicted": predicted, "measured": t["pruned"], "dense_predicted": model.dense,
            "dense_measured": t["dense"], "predicted_speedup": model.dense / predicted,
            "measured_speedup": t["dense"] / t["pruned"]}
