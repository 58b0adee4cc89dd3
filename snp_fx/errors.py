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


def verbose() -> bool:
    """``SNP_FX_VERBOSE=1``: keep torch's full messages (and its console output while tracing)."""
    import os
    return os.environ.get("SNP_FX_VERBOSE", "") not in ("", "0")


def brief(e: BaseException, limit: int = 240) -> str:
    """``Type: first line`` of an exception raised inside torch or the model, for a one-line message.

    torch appends notes (``While executing ...``, ``Original traceback: None``, ``Use tlparse ...``)
    and graph dumps after the first line; they stay on the chained exception (``raise ... from e``)
    and come out whole with ``SNP_FX_VERBOSE=1``.
    """
    text = str(e).strip()
    if verbose():
        return f"{type(e).__name__}: {text}"
    first = " ".join(text.splitlines()[0].split()).rstrip(".") if text else ""
    if len(first) > limit:
        first = first[:limit - 3] + "..."
    return f"{type(e).__name__}: {first}" if first else type(e).__name__
