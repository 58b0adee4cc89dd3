"""Errors snp_fx raises: each says what was wrong and what to do."""


class SNPError(ValueError):
    """Bad input to snp_fx (model, inputs, ratios, plan)."""


class TraceError(SNPError):
    """The model could not be traced into an fx graph."""


class RewriteError(RuntimeError):
    """The rewrite could not realise a plan; the model is left untouched.

    ``node`` names the graph node it stopped at, when known.
    """

    def __init__(self, message, node=None):
        super().__init__(message)
        self.node = node
