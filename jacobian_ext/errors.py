"""Exceptions shared by the planner modules."""


class GraphCaptureError(Exception):
    """The model cannot run on the graph path; the message says why (shown in a warning before the
    whole model runs on the torch.func fallback)."""
