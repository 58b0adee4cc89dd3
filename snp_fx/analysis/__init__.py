"""Analysis: propagate channel labels through the traced graph, build the channel graph and groups.

    propagate.py   the interpreter: real values and labels side by side (rules: snp_fx/ops)
    channels.py    the channel graph: classes, what pins them, parameter keep masks
    groups.py      attention sites, q/k / v / FFN / residual groups
    result.py      Analysis, what users see
"""
from .groups import Group, Site
from .propagate import propagate
from .result import Analysis

__all__ = ["Analysis", "Group", "Site", "propagate"]
