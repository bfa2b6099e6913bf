"""CUDA-graph replay of a planned call (jx.compile(model, cuda_graphs=True)).

A small model's Jacobian on a GPU is a few dozen kernel launches of a few microseconds each, so the
call is launch-bound. Each input signature (the full shape, batch included, the dtype and the device)
is captured once into a torch.cuda.CUDAGraph over a static input buffer; later calls copy x into that
buffer, replay the graph (one launch) and return copies of its static outputs, which the next replay
overwrites.

A graph holds the addresses of the tensors it read when it was captured. Parameters updated in place
(an optimiser step, load_state_dict) keep their addresses and are seen; a parameter or buffer replaced
by another tensor changes an address, and the signature is captured again. A layout change (a replaced
layer, a new shape) drops every graph with the plans (JacobianModule._forget_stale_plans).

The capture itself is behind a backend object, so that the bookkeeping (keys, buffers, invalidation,
the fallback when a capture fails) is tested on the CPU with a stand-in (tests/test_cuda_graphs.py);
the CUDA backend runs only where a GPU is present.
"""
import threading
import warnings
from typing import Callable, Dict, Sequence, Tuple

import torch

Compute = Callable[[torch.Tensor], Tuple[torch.Tensor, ...]]


class CudaGraphBackend:
    """Captures with torch.cuda.CUDAGraph on CUDA inputs."""

    def handles(self, x: torch.Tensor) -> bool:
        return x.is_cuda

    def capture(self, compute: Compute, static_input: torch.Tensor):
        """(replay, static outputs). A warm-up run on a side stream first, as torch.cuda.graph asks: lazy
        initialisation (cuBLAS handles and workspaces, first-use allocations) must not happen in a capture."""
        side = torch.cuda.Stream(device=static_input.device)
        side.wait_stream(torch.cuda.current_stream(static_input.device))
        with torch.cuda.stream(side):
            compute(static_input)
        torch.cuda.current_stream(static_input.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outputs = compute(static_input)
        return graph.replay, outputs

    def after_previous_call(self, marker) -> None:
        """Orders this call's use of the static buffers after the previous call's, which may have run on
        another stream (another thread's)."""
        if marker is not None:
            torch.cuda.current_stream(marker.device).wait_event(marker.event)

    def mark_call_done(self, device: torch.device):
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(device))
        return _Marker(event, device)


class _Marker:
    def __init__(self, event, device):
        self.event, self.device = event, device


class _Captured:
    """One signature's graph: its static input, its replay, its static outputs, and the tensor addresses it
    was captured with."""

    def __init__(self, keep_alive, static_input, replay, outputs, addresses):
        self.keep_alive = keep_alive  # the plan: its id is part of the key, so it must not be freed and reused
        self.static_input, self.replay, self.outputs, self.addresses = static_input, replay, outputs, addresses
        self.lock = threading.Lock()
        self.marker = None


class GraphCache:
    """The captured calls of one JacobianModule, by input signature."""

    def __init__(self, backend=None):
        self.backend = backend if backend is not None else CudaGraphBackend()
        self._captured: Dict[tuple, _Captured] = {}
        self._not_capturable: Dict[tuple, str] = {}  # signature -> why its capture failed (then it runs eagerly)
        self._lock = threading.Lock()

    def clear(self) -> None:
        with self._lock:
            self._captured.clear()
            self._not_capturable.clear()

    def handles(self, x: torch.Tensor) -> bool:
        return self.backend.handles(x)

    def call(self, plan, mode, x: torch.Tensor, compute: Compute, tensors: Sequence[torch.Tensor]):
        """compute(x) through the signature's graph, captured on its first call. `tensors`: every parameter and
        buffer the computation may read (their addresses decide whether the graph is still valid)."""
        key = (id(plan), str(mode), tuple(x.shape), x.dtype, x.device)
        if key in self._not_capturable:
            return compute(x)
        addresses = tuple(t.data_ptr() for t in tensors)
        captured = self._captured.get(key)
        if captured is None or captured.addresses != addresses:
            captured = self._capture(key, plan, x, compute, addresses)
            if captured is None:
                return compute(x)
        with captured.lock:
            self.backend.after_previous_call(captured.marker)
            captured.static_input.copy_(x)
            captured.replay()
            result = tuple(output.clone() for output in captured.outputs)
            captured.marker = self.backend.mark_call_done(x.device)
        return result

    def _capture(self, key, plan, x, compute, addresses):
        with self._lock:
            static_input = x.clone()
            try:
                replay, outputs = self.backend.capture(compute, static_input)
            except Exception as error:  # noqa: BLE001  (a node that syncs with the host cannot be captured)
                self._not_capturable[key] = f"{type(error).__name__}: {error}"
                warnings.warn(f"jacobian_ext: this call cannot be captured as a CUDA graph ({type(error).__name__}: "
                              f"{error}); inputs of shape {list(x.shape)} run without one", stacklevel=4)
                return None
            captured = self._captured[key] = _Captured(plan, static_input, replay, tuple(outputs), addresses)
            return captured
