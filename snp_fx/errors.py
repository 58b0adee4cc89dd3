"""Every error snp_fx raises, under one base class ``SNPFXError``.

* ``SNPError`` (a ``ValueError``): bad input — model, inputs, ratios, plan; the message says
  what was wrong and what to do.  ``TraceError`` is the model not tracing.
* ``RewriteError``: the rewrite could not realise a plan at some node; ``prune`` then leaves
  the groups there unpruned.
* ``InternalError``: a bug in snp_fx itself (an op rule failed on a model that runs); it names
  the node and the rule and is never taken for the user's fault.
"""


class SNPFXError(Exception):
    """Base class of every snp_fx error."""


class SNPError(SNPFXError, ValueError):
    """Bad input to snp_fx (model, inputs, ratios, plan)."""


class TraceError(SNPError):
    """The model could not be traced into an fx graph."""


class RewriteError(SNPFXError, RuntimeError):
    """The rewrite could not realise a plan; the model is left untouched.

    ``node`` names the graph node it stopped at, when known.
    """

    def __init__(self, message, node=None):
        super().__init__(message)
        self.node = node


class InternalError(SNPFXError, RuntimeError):
    """A bug in snp_fx: an op's rule failed on a graph that runs.  Please report it."""

    def __init__(self, message, node=None, rule=None):
        super().__init__(message)
        self.node = node
        self.rule = rule
