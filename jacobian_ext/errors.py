"""Exceptions shared by the planner modules."""


class GraphCaptureError(Exception):
    """The model cannot run on the graph path; the message says why (shown in a warning before the
    whole model runs on the torch.func fallback)."""


class StructuredOutputError(TypeError):
    """The model returns a tuple, list or dict, not one tensor: jx.batch_jacobian handles it (structured.py);
    jx.compile's modules differentiate one output tensor and raise this."""
