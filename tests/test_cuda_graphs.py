"""jx.compile(model, cuda_graphs=True): the capture-and-replay bookkeeping (cuda_graphs.GraphCache) on the CPU
with a stand-in backend, and the real CUDA graphs against eager calls where a GPU is present."""
import warnings

import pytest
import torch
from torch import nn

import jacobian_ext as jx
from conftest import assert_matches_reference, non_contiguous, reference_jacobian
from jacobian_ext.cuda_graphs import GraphCache


class ReplayOnCpu:
    """Stands in for CudaGraphBackend on the CPU: a capture runs the computation once on the static input and
    keeps its outputs; a replay runs it again into those same output tensors, as a graph replay rewrites
    them. Counts both, and can refuse every capture, as CUDA does for an op that syncs with the host."""

    def __init__(self, refuse: bool = False):
        self.refuse, self.captures, self.replays = refuse, 0, 0

    def handles(self, x):
        return True

    def capture(self, compute, static_input):
        self.captures += 1
        if self.refuse:
            raise RuntimeError("operation not permitted when stream is capturing")
        outputs = compute(static_input)

        def replay():
            self.replays += 1
            for output, fresh in zip(outputs, compute(static_input)):
                output.copy_(fresh)

        return replay, outputs

    def after_previous_call(self, marker):
        pass

    def mark_call_done(self, device):
        return None


def mlp():
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3), nn.Softmax(-1)).double()


def graphed(model, backend, **kwargs):
    jm = jx.compile(model, cuda_graphs=True, **kwargs)
    jm._holder["graphs"] = GraphCache(backend)
    return jm


def test_replays_match_eager_calls_and_return_copies():
    model, backend = mlp(), ReplayOnCpu()
    jm = graphed(model, backend)
    results = []
    with torch.no_grad():
        for _ in range(3):
            x = torch.randn(4, 5, dtype=torch.float64)
            y, jacobian = jm(x)
            assert_matches_reference(jacobian, reference_jacobian(model, x), torch.float64)
            assert_matches_reference(y, model(x), torch.float64)
            results.append((x, jacobian.clone(), jacobian))
    assert (backend.captures, backend.replays) == (1, 3)
    for x, kept, returned in results:  # a later replay rewrote the static outputs, not what a call returned
        assert torch.equal(kept, returned)


def test_one_capture_per_input_shape():
    backend = ReplayOnCpu()
    jm = graphed(mlp(), backend)
    with torch.no_grad():
        for batch in (4, 2, 4, 2, 1):
            jm(torch.randn(batch, 5, dtype=torch.float64))
        jm(non_contiguous(torch.randn(4, 5, dtype=torch.float64)))  # same signature: copied into the buffer
    assert backend.captures == 3


def test_in_place_updates_are_replayed_and_replaced_tensors_recaptured():
    model, backend = mlp(), ReplayOnCpu()
    jm = graphed(model, backend)
    x = torch.randn(3, 5, dtype=torch.float64)
    with torch.no_grad():
        jm(x)
        model[0].weight.mul_(-2)  # same storage: the graph reads the new values
        assert_matches_reference(jm(x)[1], reference_jacobian(model, x), torch.float64)
        assert backend.captures == 1
        model[2].weight = nn.Parameter(torch.randn(3, 7, dtype=torch.float64))  # a new address
        assert_matches_reference(jm(x)[1], reference_jacobian(model, x), torch.float64)
        assert backend.captures == 2
        model[1] = nn.Sigmoid()  # a layout change drops every graph with the plans
        assert_matches_reference(jm(x)[1], reference_jacobian(model, x), torch.float64)
        assert backend.captures == 3


def test_a_refused_capture_warns_once_and_runs_eagerly():
    model, backend = mlp(), ReplayOnCpu(refuse=True)
    jm = graphed(model, backend)
    x = torch.randn(3, 5, dtype=torch.float64)
    with torch.no_grad():
        with pytest.warns(UserWarning, match="cannot be captured as a CUDA graph.*RuntimeError"):
            first = jm(x)[1]
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            second = jm(x)[1]
    assert backend.captures == 1
    for jacobian in (first, second):
        assert_matches_reference(jacobian, reference_jacobian(model, x), torch.float64)


def test_calls_needing_gradients_or_chunks_are_not_captured():
    model, backend = mlp(), ReplayOnCpu()
    x = torch.randn(3, 5, dtype=torch.float64)
    jm = graphed(model, backend)
    jacobian = jm(x)[1]  # grad mode and parameters requiring grad: differentiable, so eager
    assert jacobian.requires_grad and backend.captures == 0
    chunked = graphed(model, backend, max_memory=2000)  # too small for the whole batch at once
    with torch.no_grad():
        assert_matches_reference(chunked(x)[1], reference_jacobian(model, x), torch.float64)
    assert backend.captures == 0


def test_the_cuda_backend_leaves_cpu_inputs_alone_and_the_flag_is_checked():
    jm = jx.compile(mlp(), cuda_graphs=True)
    x = torch.randn(3, 5, dtype=torch.float64)
    with torch.no_grad():
        jm(x)
    assert not jm._holder["graphs"]._captured
    with pytest.raises(TypeError, match="cuda_graphs must be True or False"):
        jx.compile(mlp(), cuda_graphs="yes")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("model", [
    mlp,
    lambda: nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 5 * 5, 3)).double(),
], ids=["mlp", "conv"])
def test_cuda_graph_replays_match_eager_calls(model):
    model = model().cuda()
    shape = (5,) if isinstance(model[0], nn.Linear) else (2, 5, 5)
    eager, graphs = jx.compile(model), jx.compile(model, cuda_graphs=True)
    with torch.no_grad():
        for _ in range(3):
            x = torch.randn(4, *shape, dtype=torch.float64, device="cuda")
            assert_matches_reference(graphs(x)[1], eager(x)[1], torch.float64)
        captured = graphs._holder["graphs"]._captured
        assert len(captured) == 1
        next(model.parameters()).mul_(2)
        x = torch.randn(4, *shape, dtype=torch.float64, device="cuda")
        assert_matches_reference(graphs(x)[1], eager(x)[1], torch.float64)
