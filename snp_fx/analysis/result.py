"""``Analysis``: what ``snp_fx.analyze`` returns — groups, attention sites, reasons."""
from __future__ import annotations

import torch
import torch.fx as fx

from .. import labels as L
from ..cost import batch_size
from ..labels import flat_labels, map_struct
from .channels import ChannelGraph
from .groups import Group, build_groups


class Analysis:
    """The analysed model.

    For users: ``groups`` (name -> Group), ``sites`` (attention), ``prunable(kind)``,
    ``unknown_ops`` and ``print(analysis)``.  For the later stages: ``gm`` and ``inputs``
    (what was analysed), per-node ``labels`` (class ids) and real ``shapes``, and
    ``channels`` (the channel graph: classes, parameter dims, keep masks).
    ``batch``: samples in ``inputs`` (the leading dim of the first tensor input); MACs
    budgets and estimates are per sample (snp_fx/cost.py).  Set it to 1 for a model whose
    inputs have no batch dim.
    """

    def __init__(self, gm: fx.GraphModule, prop, inputs: tuple):
        self.gm = gm
        self.inputs = inputs
        self.batch = batch_size(inputs)
        self.shapes = prop.shapes
        self.taint = prop.taint        # python ints read from channel dims
        self.gathered = prop.gathered  # elementwise nodes whose constant operands the rewrite gathers
        self.sites = prop.sites
        self.state = prop.state        # buffers written in place (a static KV cache) -> the writing node
        self.unknown_ops = prop.unknown
        self.channels = ChannelGraph(prop)
        canon = lambda t: L.reduce(self.channels.classes(t)) if isinstance(t, torch.Tensor) else t  # noqa: E731
        self.labels = {k: map_struct(v, canon) for k, v in prop.labels.items()}
        self.groups: dict[str, Group] = build_groups(self.channels, self.sites, prop.producers, prop.width_steps,
                                                    prop.width_blocks)

    def refuse(self, node_name: str, reason: str) -> list[str]:
        """Mark every group with channels at ``node_name`` (or its inputs) unprunable."""
        node = next(n for n in self.gm.graph.nodes if n.name == node_name)
        touched = set()
        for n in [node] + list(node.all_input_nodes):
            for lab in flat_labels(self.labels.get(n.name)):
                touched.update(torch.unique(lab[lab >= 0]).tolist())
        refused = []
        for g in self.groups.values():
            if g.prunable and touched & set(torch.unique(g.classes).tolist()):
                g.prunable, g.reason = False, reason
                refused.append(g.name)
        return refused

    def prunable(self, kind: str | None = None) -> list[Group]:
        return [g for g in self.groups.values() if g.prunable and (kind is None or g.kind == kind)]

    def reasons(self) -> dict[str, str]:
        """Why each unprunable group is so."""
        return {g.name: g.reason for g in self.groups.values() if not g.prunable}

    def __str__(self) -> str:
        lines = ["snp_fx analysis", "", "Attention sites:",
                 f"  {'site':<34} {'heads':>5} {'q/k width':>9} {'v width':>7}  op"]
        for s in self.sites:
            qk = self.groups.get(f"{s.name}.qk")
            v = self.groups.get(f"{s.name}.v")
            lines.append(f"  {s.name:<34} {qk.heads:>5} {qk.width:>9} {v.width if v else '-':>7}  {s.kind}")
        for kind, title in (("ffn", "FFN groups"), ("residual", "Residual groups")):
            gs = [g for g in self.groups.values() if g.kind == kind]
            lines += ["", f"{title}:"]
            for g in gs:
                per = f" per expert ({g.heads} experts, each its own neurons)" if g.slots is not None else ""
                lines.append(f"  {g.name:<40} width {g.width:>5}{per}" + ("" if g.prunable else "  (unprunable)"))
        shapes = self.gm.meta.get("snp_input_shapes")
        if shapes:  # an exported graph: what shapes the pruned model takes
            from ..trace import describe_shapes
            lines += ["", f"Inputs (d: dynamic sizes): {describe_shapes(shapes)}"]
            if self.gm.meta.get("snp_static_reason"):
                lines.append(f"  exported for the example's shapes only: {self.gm.meta['snp_static_reason']}")
        lines += ["", "Unprunable:"]
        lines += [f"  {name:<40} {why}" for name, why in self.reasons().items()] or ["  (none)"]
        if self.unknown_ops:
            lines += ["", "Ops not understood (channels through them are left alone):"]
            lines += [f"  {r}" for r in list(self.unknown_ops.values())[:20]]
        return "\n".join(lines)

    __repr__ = __str__
