"""The one streamed pass over calibration batches through a traced graph.

Both consumers of calibration data — the q/k scores (importance/calibrate.py) and the
least-squares compensation statistics (compensate.py) — read the batches here:
``stream(analysis, calibration, run, desc=..., progress=...)`` turns every batch into graph
inputs (``graph_runs``), moves them to the model's device (floating ones in the example inputs'
dtype) and calls ``run(inputs)`` under ``torch.inference_mode``, with a tqdm bar when asked.
A batch the model does not run on becomes one SNPError naming the batch; an empty iterable is
an SNPError too.

Every statistic gathered from the batches is a sum, so calibration spreads over processes: when a
``torch.distributed`` process group is initialised, each rank streams its own shard of the data and
``all_reduce_sums`` adds the sums of all ranks (gloo on CPU, NCCL on GPU) before anything is decided
from them; every rank then makes the same plan and weights.
"""
from __future__ import annotations

import sys
from typing import Callable, Iterable

import torch

from .errors import SNPError, SNPFXError, brief


def show_progress(progress: bool | None) -> bool:
    """``progress``: True / False force the tqdm bars; None shows them when stderr is a terminal."""
    if progress is None:
        try:
            return bool(sys.stderr.isatty())
        except (AttributeError, ValueError):  # replaced or closed stderr
            return False
    return bool(progress)


def _bar(iterable, desc: str, progress: bool | None):
    if not show_progress(progress):
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        return iterable
    return tqdm(iterable, desc=desc, leave=False)


def as_inputs(batch, n_inputs: int, names: list[str]):
    """How a calibration batch is read: a tensor (the model's single input), a tuple/list of
    positional tensors, a pair ``(inputs, labels)`` from a DataLoader (labels ignored) or a dict
    of keyword inputs.  Returns (args, kwargs)."""
    if isinstance(batch, torch.Tensor):
        return (batch,), {}
    if isinstance(batch, dict):
        return (), dict(batch)
    if isinstance(batch, (list, tuple)):
        items = list(batch)
        # (inputs, labels) from a DataLoader: the labels are not inputs of the model
        if len(items) == n_inputs + 1 and n_inputs == 1:
            items = items[:1]
        if len(items) == 1 and isinstance(items[0], (list, tuple)):
            items = list(items[0])
        return tuple(items), {}
    raise SNPError(f"calibration batch of type {type(batch).__name__}: give tensors, tuples of tensors "
                   "or dicts of keyword inputs")


def graph_runs(analysis, batch, placeholders: list[str]) -> list[tuple]:
    """The graph inputs of one calibration batch, as one or more runs.

    An exported graph keeps batch and length dynamic where torch.export could (snp_fx.trace.export);
    where it specialised a dim to the example's size, a batch larger by a whole multiple (the other
    dims equal) runs in chunks of the example batch size; any other shape is refused, saying what
    to give instead."""
    from .trace import describe_shapes, normalize_inputs
    args, kwargs = as_inputs(batch, len(placeholders), placeholders)
    inputs = normalize_inputs(analysis.gm, kwargs if kwargs else args)
    if analysis.gm.meta.get("snp_frontend") != "export":
        return [inputs]
    spec = analysis.gm.meta.get("snp_input_shapes", {})
    pairs = [(i, x, r) for i, (x, r) in enumerate(zip(inputs, analysis.inputs))
             if isinstance(x, torch.Tensor) and isinstance(r, torch.Tensor) and x.shape != r.shape]
    if all(_fits(x.shape, spec.get(placeholders[i])) for i, x, _ in pairs):
        return [inputs]
    factors = {x.shape[0] // r.shape[0] if x.dim() == r.dim() >= 1 and x.shape[1:] == r.shape[1:]
               and x.shape[0] % r.shape[0] == 0 else None for _, x, r in pairs}
    if len(factors) != 1 or None in factors:
        got = {placeholders[i] if i < len(placeholders) else i: tuple(x.shape) for i, x, _ in pairs}
        want = describe_shapes(spec) if spec else {placeholders[i] if i < len(placeholders) else i: tuple(r.shape)
                                                   for i, _, r in pairs}
        raise SNPError(f"calibration batch shapes {got} do not fit the exported graph, which torch.export "
                       f"exported for {want} (d: a dynamic size): give batches of those shapes "
                       "(a whole multiple of the example batch size is split), or example inputs shaped "
                       "like the calibration batches")
    n = factors.pop()
    split = {i: x.chunk(n, 0) for i, x, _ in pairs}
    return [tuple(split[i][c] if i in split else x for i, x in enumerate(inputs)) for c in range(n)]


def distributed() -> bool:
    """Whether a torch.distributed process group of more than one rank is running."""
    import torch.distributed as dist
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sums(tensors: list[torch.Tensor]) -> None:
    """Add each tensor over the ranks of the default process group, in place (no-op on one process).
    NCCL reduces CUDA tensors only: CPU sums travel through the GPU there."""
    if not distributed():
        return
    import torch.distributed as dist
    on_gpu = dist.get_backend() == "nccl"
    for t in tensors:
        work = t.cuda() if on_gpu and not t.is_cuda else t
        dist.all_reduce(work, op=dist.ReduceOp.SUM)
        if work is not t:
            t.copy_(work)


def _like(x, example, device):
    """A calibration input on the graph's device; floating, in the floating dtype of the example
    input it stands for (a float32 DataLoader for a bfloat16 model)."""
    if not isinstance(x, torch.Tensor):
        return x
    same = isinstance(example, torch.Tensor) and example.is_floating_point() and x.is_floating_point()
    return x.to(device, example.dtype if same else None)


def _fits(shape, dims) -> bool:
    """``shape`` fits an exported input's dims (snp_fx.trace.input_shapes): the sizes that
    were kept, and dynamic dims within their ranges (several inputs sharing a size are not
    compared: a batch the graph cannot take fails in its guards)."""
    if dims is None or len(shape) != len(dims):
        return False
    return all(s == d if isinstance(d, int) else d[1] <= s and (d[2] is None or s <= d[2])
               for s, d in zip(shape, dims))


def default_calibration(analysis) -> list:
    """The example inputs as a one-batch calibration set."""
    return [analysis.inputs if len(analysis.inputs) > 1 else analysis.inputs[0]]


def stream(analysis, calibration: Iterable, run: Callable[[tuple], object], *, desc: str = "snp_fx calibration",
           progress: bool | None = None, empty_hint: str = "") -> int:
    """Call ``run(inputs)`` for every graph run of every batch of ``calibration``; return the batch count.

    ``inputs`` is a tuple of the graph's positional inputs, on the device of the graph's parameters.
    snp_fx's own errors raised by ``run`` pass through; any other exception is a batch the model
    does not run on (SNPError).  ``empty_hint`` is appended to the empty-iterable error."""
    gm = analysis.gm
    placeholders = [n.target for n in gm.graph.nodes if n.op == "placeholder"]
    device = next((p.device for p in gm.parameters()), torch.device("cpu"))
    n_batches = 0
    with torch.inference_mode():
        for b, batch in enumerate(_bar(calibration, desc, progress)):
            for inputs in graph_runs(analysis, batch, placeholders):
                ex = analysis.inputs
                inputs = tuple(_like(x, ex[i] if i < len(ex) else None, device) for i, x in enumerate(inputs))
                try:
                    run(inputs)
                except SNPFXError:
                    raise
                except Exception as e:
                    raise SNPError(f"calibration batch {b} does not run through the model: "
                                   f"{brief(e)}") from e
            n_batches += 1
    if n_batches == 0:
        raise SNPError("the calibration iterable is empty; give at least one batch" + empty_hint)
    return n_batches
