"""Only the requested rows of the per-sample Jacobian, without touching the core: the model is composed
with a selection head, a bias-free nn.Linear whose weight is the one-hot matrix [K, C], so the reverse
sweep starts from K rows instead of C (and the cost model sees a K-output model). The model is wrapped in a
module that calls it and then the head; graph capture traces through it, so a model whose graph is a chain
stays one fused chain with the head as its last layer."""
import threading
from collections import OrderedDict
from typing import Callable, Optional, Tuple

import torch
from torch import nn

from ..api import JacobianModule, breaks_per_sample_jacobian
from ..graph import capture_root
from .prefix import split_affine_prefix
from .targets import TargetSpec

# Per-sample targets with several distinct classes: one call per distinct class computes B rows in all,
# one call for their union computes B * U rows. Grouping costs (U - 1) extra calls, the union
# B * (U - 1) extra rows, so the union wins while one row over the batch costs less than one call's fixed
# overhead (plan lookup, op dispatch, a forward per call: a few hundred microseconds). The cost of a row
# per sample is estimated by the parameter count (the multiply-adds of a dense layer; a convolution does
# more, which only makes grouping win sooner), the call overhead as multiply-adds in that time.
CALL_OVERHEAD_MACS = 2e6
# Compiled modules kept per model (one per number of selected rows, dtype and device), each with its plans.
MAX_CACHED_SELECTIONS = 16


class _SelectedOutputs(nn.Module):
    """head(model(x))."""

    def __init__(self, model: Callable, head: nn.Linear):
        super().__init__()
        # A function (a bound method, a lambda) with the modules it reaches as submodules: else graph capture
        # meets their calls outside the module tree and the whole model falls back to torch.func.
        self.model = capture_root(model)
        self.head = head

    def forward(self, x):
        return self.head(self.model(x))


class JacobianRows:
    """Jacobian rows of one model for checked targets (targets.TargetSpec); the compiled modules (the
    model alone, and the model with each selection head) are cached, so repeated calls (integrated
    gradients' chunks, a Captum-style object's calls) plan once."""

    def __init__(self, model: Callable, mode: str = "auto"):
        if not callable(model):
            raise TypeError(f"model must be an nn.Module or a callable, got {type(model).__name__}")
        self.model = model
        self.mode = mode
        self._compiled: "OrderedDict[tuple, JacobianModule]" = OrderedDict()
        self._widths = {}
        self._lock = threading.Lock()
        self._suffix: Optional[JacobianRows] = None
        self._selections = {}  # key of a compiled module with a head -> the rows its head selects now

    def affine_split(self) -> Optional[Tuple[nn.Module, "JacobianRows"]]:
        """(leading affine layers, JacobianRows of the rest) when the model starts with affine layers
        (prefix.py), else None. Re-split on every call, so a replaced layer is seen; the rest's compiled
        modules are kept while its layers are the same objects."""
        parts = split_affine_prefix(self.model)
        if parts is None:
            return None
        prefix, suffix = parts
        if self._suffix is None or not _same_layers(self._suffix.model, suffix):
            self._suffix = JacobianRows(suffix, self.mode)
        return prefix, self._suffix

    def num_outputs(self, x: torch.Tensor) -> int:
        """C of a model mapping [B, *in] to [B, C], from a probe forward of one sample (cached per input
        signature and parameter shapes, which is what a change of C would change)."""
        _check_input(x)
        key = (tuple(x.shape[1:]), x.dtype, x.device, self._parameter_shapes())
        if key not in self._widths:
            self._check_eval_mode()  # before the probe, which would update BatchNorm statistics or draw dropout
            probe = x[:1] if x.shape[0] > 0 else x.new_zeros((1, *x.shape[1:]))
            with torch.no_grad():
                output = self.model(probe)
            if not isinstance(output, torch.Tensor) or output.dim() != 2:
                shape = list(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
                raise ValueError(
                    f"explain needs a model returning [B, C] (one row of C outputs per sample), got {shape}; "
                    "wrap it, e.g. lambda x: model(x).flatten(1) or lambda x: model(x).unsqueeze(1) for one output"
                )
            self._widths[key] = output.shape[1]
        return self._widths[key]

    def __call__(self, x: torch.Tensor, spec: TargetSpec) -> Tuple[torch.Tensor, torch.Tensor]:
        """(targeted outputs, rows): [B, C] and [B, C, *in] for "all", [B] and [B, *in] for one target
        per sample ("single", "per_sample"), [B, K] and [B, K, *in] for "classes"."""
        if spec.rows is not None and len(spec.rows) == 0:  # classes() or per-sample targets of an empty batch
            self.num_outputs(x)  # still checks the model
            rows = x.new_zeros(x.shape[0], *(() if spec.squeezes_row_axis else (0,)), *x.shape[1:])
            return x.new_zeros(rows.shape[:2 - spec.squeezes_row_axis]), rows
        with torch.no_grad(), self._lock:
            if spec.kind == "per_sample" and len(spec.rows) > 1:
                return self._per_sample_rows(x, spec)
            outputs, rows = self._compiled_for(spec.rows, x)(x)
            if spec.squeezes_row_axis:
                return outputs[:, 0], rows[:, 0]
            return outputs, rows

    def _per_sample_rows(self, x, spec):
        batch = x.shape[0]
        per_row_macs = sum(p.numel() for p in self._parameters())
        if batch * per_row_macs < CALL_OVERHEAD_MACS:
            outputs, rows = self._compiled_for(spec.rows, x)(x)
            position = torch.searchsorted(torch.tensor(spec.rows), spec.per_sample).to(x.device)
            picked = torch.arange(batch, device=x.device)
            return outputs[picked, position], rows[picked, position]
        outputs = x.new_empty(batch)
        rows = None
        per_sample = spec.per_sample.to(x.device)
        for target in spec.rows:
            samples = (per_sample == target).nonzero().squeeze(1)
            group_outputs, group_rows = self._compiled_for((target,), x)(x.index_select(0, samples))
            if rows is None:
                rows = x.new_empty(batch, *group_rows.shape[2:])
            outputs[samples] = group_outputs[:, 0]
            rows[samples] = group_rows[:, 0]
        return outputs, rows

    def _compiled_for(self, selected: Optional[Tuple[int, ...]], x: torch.Tensor) -> JacobianModule:
        """The compiled model (selected None) or model + head for these rows. One compiled module serves
        every selection of K rows: its head's weight is overwritten with the selection (same shape, so the
        plan is kept; parameters are read at every call). The caller holds self._lock until the call is
        done, so that a concurrent call cannot change the selection in between."""
        # The model's width C is in the key: a replaced last layer of another width needs another head.
        width = None if selected is None else self.num_outputs(x)
        key = (None if selected is None else len(selected), width, x.dtype, x.device)
        compiled = self._compiled.get(key)
        if compiled is None:
            model = self.model if selected is None else self._with_head(len(selected), width, x)
            compiled = self._compiled[key] = JacobianModule(model, mode=self.mode)
            self._selections.pop(key, None)
            if len(self._compiled) > MAX_CACHED_SELECTIONS:
                self._compiled.popitem(last=False)
        else:
            self._compiled.move_to_end(key)
        if selected is not None and self._selections.get(key) != selected:
            head = compiled.model.head
            head.weight.zero_()
            head.weight[torch.arange(len(selected)), torch.tensor(selected)] = 1
            self._selections[key] = selected
        return compiled

    def _with_head(self, rows: int, num_outputs: int, x: torch.Tensor) -> nn.Module:
        # Made on the meta device: nn.Linear's random initialisation would draw from torch's global
        # generator and change the user's random stream (e.g. a NoiseTunnel's noise after the first call).
        head = nn.Linear(num_outputs, rows, bias=False, device="meta", dtype=x.dtype).to_empty(device=x.device)
        head.requires_grad_(False)
        return _SelectedOutputs(self.model, head)

    def _check_eval_mode(self):
        if not isinstance(self.model, nn.Module):
            return
        for name, module in self.model.named_modules():
            if breaks_per_sample_jacobian(module):
                raise ValueError(f"layer '{name or 'model'}' ({type(module).__name__}) is in training mode, where "
                                 "it couples or randomises the samples and no attribution is well defined; call "
                                 "model.eval() first")

    def _parameters(self):
        return list(self.model.parameters()) if isinstance(self.model, nn.Module) else []

    def _parameter_shapes(self):
        return tuple(p.shape for p in self._parameters())


def _same_layers(first: nn.Sequential, second: nn.Sequential) -> bool:
    return len(first) == len(second) and all(a is b for a, b in zip(first, second))


def _check_input(x):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"inputs must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"inputs must be a floating-point tensor, got dtype {x.dtype}")
    if x.dim() < 2:
        raise ValueError(f"inputs must be [B, *in_shape] with a batch dimension, got shape {list(x.shape)}")
