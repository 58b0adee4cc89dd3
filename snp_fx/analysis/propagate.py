"""Propagation: run the traced graph once and, alongside every real tensor, its channel labels.

The interpreter hooks live here; what each op does with labels is its family's
``propagate`` (snp_fx/ops).  The real op failing is the user's problem (``SNPError``: the
model does not run on these inputs); a family's rule failing is snp_fx's (``InternalError``).
"""
from __future__ import annotations

import math

import torch
import torch.fx as fx

from .. import labels as L
from .. import ops
from ..errors import InternalError, SNPError, SNPFXError, brief
from ..labels import FROZEN, NONE, flat_labels, map_struct
from .groups import Site

# get_attr tensors up to this size get one unit id per element
ELEMENT_ID_LIMIT = 1 << 18


def _shape(v):
    return tuple(v.shape) if isinstance(v, torch.Tensor) else None


def _written_attrs(gm: fx.GraphModule, modules) -> set[str]:
    """Targets of the get_attr tensors that an in-place op writes into (through views)."""
    out, todo = set(), []
    for n in gm.graph.nodes:
        if n.op.startswith("call_") and n.args and isinstance(n.args[0], fx.Node):
            key = ops.op_key(n, modules)
            if key.endswith("_") and not key.startswith("_") or key == "setitem" or \
                    isinstance(n.target, torch._ops.OpOverload) and n.target._schema.is_mutable:
                todo.append(n.args[0])
    seen = set()
    while todo:
        a = todo.pop()
        if a in seen:
            continue
        seen.add(a)
        if a.op == "get_attr":
            out.add(a.target)
        todo += a.all_input_nodes
    return out


class Propagator(fx.Interpreter):
    """Executes the graph on real inputs and, alongside, on channel labels.

    What the families read and write: ``lab(node)`` (labels of an argument), ``space``
    (the unit space: unions, freezing), ``pids`` (unit ids of a parameter's dims),
    ``producers`` (weights that make channels), ``sites`` (attention), ``refuse``."""

    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm, garbage_collect_values=True)
        self.extra_traceback = False  # our errors name the node in one line
        self.space = L.UnitSpace()
        self.modules = dict(gm.named_modules())
        self.labels: dict[str, object] = {}
        self.shapes: dict[str, object] = {}
        self.taint: dict[str, object] = {}
        self.param_ids: dict[str, list[torch.Tensor]] = {}
        self.elem_ids: dict[str, torch.Tensor] = {}
        self.producers: list[tuple[str, torch.Tensor]] = []
        self.producer_dim: dict[str, int] = {}  # which weight dim makes the channels (0 but embeddings)
        self.sites: list[Site] = []
        self.dep_site: dict[int, Site] = {}
        self.unknown: dict[str, str] = {}
        self.gathered: dict[str, list[str]] = {}  # elementwise node -> operands the rewrite gathers
        self.dynamic: set[str] = set()  # tensors computed from the model's tensor inputs (not constants)
        self.written = _written_attrs(gm, self.modules)  # buffers written in place (a KV cache): not constants
        self.tables: list[tuple[int, int]] = []  # id ranges of small parameters (one unit per element)
        self.summed: list[torch.Tensor] = []  # channels two computed tensors are added on (a residual stream)
        self.state: dict[str, str] = {}  # buffer -> the node writing it in place (a KV cache): laid out as it
        self.width_steps: list[tuple[torch.Tensor, int]] = []  # (units, step): a kernel needs widths in multiples
        # mixture-of-experts GEMMs, and (after ops.experts.split_experts) each expert's own hidden units
        self.expert_uses: list = []
        self.expert_dims: dict[str, dict[int, torch.Tensor]] = {}  # param -> {dim: ids (experts, n)}
        self.expert_slots: dict[int, torch.Tensor] = {}  # slot unit -> its (experts,) units
        self.param_views: dict[str, list[list[int]]] = {}  # parameter -> its dims merged for param_ids (see pids)
        # (units (blocks, per block), why): a plan keeps the same count in each block (a grouped conv's groups)
        self.width_blocks: list[tuple[torch.Tensor, str]] = []

    # ---- helpers the families use -------------------------------------------------
    def pids(self, name: str, t: torch.Tensor, soft: bool = False, view=None) -> list[torch.Tensor] | None:
        """Unit ids along every dim of a parameter or buffer (allocated once).  ``view``: groups of
        adjacent dims labelled as one (an einsum's (h, n, d) weight as a matrix (h, n * d)); the ids
        are then per merged dim.  None when the parameter was labelled in another layout before."""
        view = [list(g) for g in view] if view is not None else None
        if view is not None and view == [[d] for d in range(t.dim())]:
            view = None
        if name not in self.param_ids:
            shape = t.shape if view is None else [math.prod(t.shape[d] for d in g) for g in view]
            self.param_ids[name] = [self.space.new(s, soft) for s in shape]
            if view is not None:
                self.param_views[name] = view
        elif self.param_views.get(name) != view:
            return None
        return self.param_ids[name]

    def lab(self, a):
        if isinstance(a, fx.Node):
            return self.labels.get(a.name)
        if isinstance(a, (list, tuple)):
            return [self.lab(x) for x in a]
        return None

    def tainted(self, a) -> list[torch.Tensor]:
        """Channel ids that python ints in ``a`` were read from (x.shape[-1] and the like)."""
        out = []
        if isinstance(a, fx.Node):
            t = self.taint.get(a.name)
            if isinstance(t, torch.Tensor):
                out.append(t)
            elif isinstance(t, (list, tuple)):
                out += [x for x in t if isinstance(x, torch.Tensor)]
        elif isinstance(a, (list, tuple)):
            for x in a:
                out += self.tainted(x)
        elif isinstance(a, dict):
            for x in a.values():
                out += self.tainted(x)
        return out

    def freeze_all(self, node, reason):
        for a in list(node.args) + list(node.kwargs.values()):
            for lab in flat_labels(self.lab(a)):
                self.space.freeze(lab, reason)
            for t in self.tainted(a):
                self.space.freeze(t, reason)

    def frozen_output(self, result, reason, soft=False):
        """Labels for the result of an op we do not follow: one fresh, frozen unit
        (``soft`` for tensor factories: a constant, gathered where it meets channels)."""
        def one(r):
            if not isinstance(r, torch.Tensor):
                return None
            u = self.space.new(1, soft)
            self.space.freeze(u, reason)
            return u.reshape((1,) * r.dim()) if r.dim() else u.reshape(())
        return map_struct(result, one)

    def refuse(self, n, reason, result):
        """What an op the analysis cannot follow gives: its channels and its output frozen."""
        self.freeze_all(n, reason)
        return self.frozen_output(result, reason)

    def full(self, value, result):
        return map_struct(result, lambda r: L.constant(value, r.dim()) if isinstance(r, torch.Tensor) else None)

    def dim_taint(self, node_arg):
        """Per dim of a tensor: the channel ids its size is read from (None: no channels)."""
        lab = self.lab(node_arg)
        if not isinstance(lab, torch.Tensor):
            return None
        out = []
        for d in range(lab.dim()):
            if lab.shape[d] > 1:
                out.append(lab.movedim(d, 0).reshape(lab.shape[d], -1)[:, 0].clone())
            else:
                out.append(None)
        return out

    def elementwise(self, pairs, out_shape):
        """Labels of an elementwise op over (labels, real shape) operands; couples what aligns.

        An operand broadcast (real size 1) along a dim where another's channels
        vary, and constant along all of them, is shared by those channels: it
        does not couple them (a mask over heads, a scalar gain).
        """
        rank = len(out_shape)
        fulls, bcast = [], []
        for lab, shape in pairs:
            f = lab.reshape((1,) * (rank - lab.dim()) + tuple(lab.shape))
            shape = (1,) * (rank - len(shape)) + tuple(shape)
            bcast.append({d for d in range(rank) if shape[d] == 1 and out_shape[d] > 1})
            fulls.append(L.reduce(f))
        # work at the size where some labels vary, not the real size (attention scores are big)
        work = torch.broadcast_shapes(*[f.shape for f in fulls])
        out = L.expand(fulls[0], work)
        out_b = bcast[0]
        for f, b in zip(fulls[1:], bcast[1:]):
            other = L.expand(f, work)
            var_out = set(L.varying_dims(L.reduce(out)))
            var_f = set(L.varying_dims(f))
            other_shared = bool(b & var_out) and not (var_f & var_out)
            out_shared = bool(out_b & var_f) and not (var_out & var_f)
            if other_shared or out_shared:  # a broadcast operand neither couples nor names channels
                out = other if out_shared else out
                out_b = b if out_shared else out_b
                continue
            self.space.union(out, other)
            out = torch.where(out >= 0, out, other)
            out_b = out_b & b
        return L.reduce(out)

    def on_labels(self, n, key, fn, result):
        """Labels of the result of ``fn`` (the op run on label tensors); frozen if it cannot run."""
        try:
            out = fn()
        except Exception as e:  # noqa: BLE001 - any failure means we do not understand it
            return self.refuse(n, f"{n.name}: `{key}` could not be followed on labels ({e})", result)
        return map_struct(out, lambda t: L.reduce(t) if isinstance(t, torch.Tensor) else None)

    # ---- interpreter hooks ---------------------------------------------------
    def run_node(self, n):
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        try:
            result = super().run_node(n)
        except SNPFXError:
            raise
        except Exception as e:
            raise SNPError(f"the model does not run on the example inputs: node `{n.name}` failed with "
                           f"{brief(e)}; pass inputs of the shape, dtype and device the model expects") from e
        if n.op == "output":
            for lab in flat_labels(self.lab(n.args[0])):
                self.space.freeze(lab, "it feeds the model output")
            return result
        self.shapes[n.name] = map_struct(result, _shape)
        if (n.op == "placeholder" or n.op == "get_attr" and n.target in self.written or
                any(a.name in self.dynamic for a in n.all_input_nodes)) and \
                flat_labels(map_struct(result, lambda r: r if isinstance(r, torch.Tensor) else None)):
            self.dynamic.add(n.name)  # through tensors only: sizes read from an input are constants
        try:
            lab = self.rule(n, args, kwargs, result)
        except SNPFXError:
            raise
        except Exception as e:
            fam = type(ops.family_of(n, self.modules)[1]).__name__ if n.op.startswith("call_") else n.op
            raise InternalError(f"snp_fx bug: the `{fam}` rule failed at node `{n.name}` ({n.format_node()[:160]}): "
                                f"{brief(e)}; please report this model", node=n.name, rule=fam) from e
        self.labels[n.name] = map_struct(
            lab, lambda t: L.reduce(self.space.canon(t)) if isinstance(t, torch.Tensor) else t)
        return result

    def rule(self, n, args, kwargs, result):
        if n.op == "placeholder":
            if isinstance(result, torch.Tensor) and not (result.is_floating_point() or result.is_complex()):
                # integer inputs (token ids, cache positions) carry no channels: a constant, like
                # arange's positions, gathered where it meets channels (rotary tables of cache_position)
                return self.frozen_output(result, f"{n.name}: an integer input", soft=True)
            return self.full(FROZEN, result)
        if n.op == "get_attr":
            return self.attribute(n, result)
        key, family = ops.family_of(n, self.modules)
        in_labs = flat_labels(self.lab(list(n.args) + list(n.kwargs.values())))
        if not in_labs and not family.makes_channels:
            return self.python_value(n, key, family, result)
        if key == "getattr":  # x.shape, x.dtype, ...
            if n.args[1] == "shape":
                self.taint[n.name] = self.dim_taint(n.args[0])
            if not isinstance(result, torch.Tensor):
                return None
            lab = self.lab(n.args[0])
            if isinstance(args[0], tuple) and isinstance(lab, (list, tuple)):  # a field: x.topk(k).values
                return next(x for x, v in zip(lab, args[0]) if v is result)
            key, family = n.args[1], ops.family_of_key(n.args[1])  # a tensor attribute: x.T is a movement
        # tainted channel counts used as values (not as sizes) pin those channels
        if not family.sizes_ok:
            for t in self.tainted(list(n.args) + list(n.kwargs.values())):
                self.space.freeze(t, f"{n.name}: a channel count is used as a value by `{key}`")
        if family is ops.UNKNOWN and n.op == "call_function" and ops.moves_data_only(n.target, args, kwargs):
            family = ops.WRAPPED
        if family is ops.UNKNOWN:
            reason = f"{n.name}: op `{key}` is not in the op table"
            self.unknown[n.name] = reason
            return self.refuse(n, reason, result)
        return family.propagate(self, n, key, args, kwargs, result)

    def attribute(self, n, result):
        """Labels of a get_attr: small float tensors get one unit per element (the couplings
        decide which dim gets sliced), larger ones one unit per index along their widest dim."""
        if not (isinstance(result, torch.Tensor) and result.is_floating_point() and result.dim() > 0):
            return self.full(NONE, result)
        soft = not isinstance(result, torch.nn.Parameter)  # a buffer or constant
        if result.dim() == 2 and not soft and ops.linear.sliced_weight_rows(n):
            return self.pids(n.target, result)[0].reshape(-1, 1)  # rows taken as linear weights
        if result.dim() == 3 and not soft and ops.experts.applies_experts(n):
            return self.full(NONE, result)  # MoE expert weights: their consumers take the parameter's dims
        if not soft and n.users and all((ops.attention.einsum_weight(u, self.module) or {}).get("name") == n.target
                                        for u in n.users):
            return self.full(NONE, result)  # weights of einsums: the einsum takes the parameter's dims
        if result.numel() <= ELEMENT_ID_LIMIT:
            if n.target not in self.elem_ids:
                self.elem_ids[n.target] = self.space.new(result.numel(), soft).reshape(result.shape)
                if not soft:
                    self.tables.append((int(self.elem_ids[n.target].min()), self.space.next_id))
            return self.elem_ids[n.target]
        ids = self.pids(n.target, result, soft)
        d = max([d for d in range(result.dim()) if result.shape[d] > 1] or [result.dim() - 1])
        shape = [1] * result.dim()
        shape[d] = result.shape[d]
        return ids[d].reshape(shape)

    def python_value(self, n, key, family, result):
        """An op on no channels: shape arithmetic (tracked for channel taint), a tensor factory."""
        if family.kind == "factory" and isinstance(result, torch.Tensor):
            return self.frozen_output(result, f"{n.name}: `{key}` makes a tensor of literal size", soft=True)
        if isinstance(result, torch.Tensor):
            return self.full(NONE, result)
        t = self.tainted(list(n.args) + list(n.kwargs.values()))
        if t:
            self.taint[n.name] = torch.cat([x.reshape(-1) for x in t])
        if key == "getitem" and isinstance(n.args[0], fx.Node) and isinstance(self.taint.get(n.args[0].name), list):
            idx = n.args[1]
            tl = self.taint[n.args[0].name]
            self.taint[n.name] = tl[idx] if isinstance(idx, int) and -len(tl) <= idx < len(tl) else None
        return None


def propagate(gm: fx.GraphModule, inputs: tuple):
    """Analyse ``gm`` on ``inputs``: the ``Analysis`` (labels, channel graph, groups)."""
    from .result import Analysis
    prop = Propagator(gm)
    with torch.no_grad():
        prop.run(*inputs)
    try:
        ops.experts.split_experts(prop)
    except SNPFXError:
        raise
    except Exception as e:
        raise InternalError(f"snp_fx bug: splitting the experts' neurons failed: {brief(e)}; please report this model") from e
    try:
        return Analysis(gm, prop, inputs)
    except SNPFXError:
        raise
    except Exception as e:  # the model ran: grouping the channels failed, which is ours, not the user's
        raise InternalError(f"snp_fx bug: grouping the channels failed: {brief(e)}; please report this model") from e
