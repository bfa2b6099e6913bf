"""One engine: however a model is written (an nn.Sequential, a subclass calling F.relu, a lambda or a
function over modules), the same captured graph, the same chain plan and the same fast path; the plan
cache of batch_jacobian; the single-op deployment paths for models that are not nn.Sequential."""
import copy
import functools
import io
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import jacobian_ext as jx
from conftest import assert_matches_reference, loop_jacobian, non_contiguous, penalty_gradients, reference_jacobian
from jacobian_ext.graph import GraphPlan
from jacobian_ext.plan import Plan

MODES = ["auto", "forward", "reverse", "mixed"]


class SubclassedMLP(nn.Module):
    """The mnist MLP as users write it: layers as attributes, activations functional."""

    def __init__(self, widths=(7, 12, 9, 4), head="log_softmax"):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.head = head

    def forward(self, x):
        x = x.flatten(1)
        for layer in self.layers[:-1]:
            x = F.relu(layer(x))
        x = self.layers[-1](x)
        if self.head == "log_softmax":
            return F.log_softmax(x, dim=1)
        return x.softmax(-1) if self.head == "softmax" else torch.tanh(x)


def as_sequential(model: SubclassedMLP) -> nn.Sequential:
    layers = []
    for layer in model.layers[:-1]:
        layers += [layer, nn.ReLU()]
    head = {"log_softmax": nn.LogSoftmax(1), "softmax": nn.Softmax(-1), "tanh": nn.Tanh()}[model.head]
    return nn.Sequential(nn.Flatten(), *layers, model.layers[-1], head)


def planned(jm, x):
    jm(x)
    return jm.plan_for(x)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("head", ["log_softmax", "softmax", "tanh"])
@pytest.mark.parametrize("batch", [0, 1, 6])
def test_a_subclassed_mlp_runs_the_same_chain_plan_as_its_sequential(dtype, mode, head, batch):
    model = SubclassedMLP(head=head).to(dtype)
    x = non_contiguous(torch.randn(batch, 7, dtype=dtype))
    jm = jx.compile(model, mode=mode)
    y, jacobian = jm(x)
    assert_matches_reference(y, model(x), dtype)
    assert_matches_reference(jacobian, reference_jacobian(model, x), dtype)
    plan, sequential_plan = jm.plan_for(x), planned(jx.compile(as_sequential(model), mode=mode), x)
    assert isinstance(plan, Plan) and plan.all_native and jm.fallbacks == []
    assert plan.native_layers == sequential_plan.native_layers
    assert [p.data_ptr() for p in plan.native_params()] == [p.data_ptr() for p in sequential_plan.native_params()]


def global_mlp_function(t):
    return GLOBAL_MLP(t)


GLOBAL_MLP = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.first, self.second = nn.Linear(5, 6), nn.Linear(6, 3)

    def encode(self, x, squash=True):
        h = self.second(torch.sigmoid(self.first(x)))
        return torch.tanh(h) if squash else h


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", ["lambda", "closure", "global", "method", "partial"])
def test_functions_over_modules_are_captured_with_the_modules_they_close_over(mode, kind):
    mlp = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    encoder = Encoder().double()

    def closure(t):
        return mlp(torch.relu(t))

    function, reference = {
        "lambda": (lambda t: mlp(t), mlp),
        "closure": (closure, lambda t: mlp(torch.relu(t))),
        "global": (global_mlp_function, GLOBAL_MLP),
        "method": (encoder.encode, encoder.encode),
        "partial": (functools.partial(encoder.encode, squash=False), functools.partial(encoder.encode, squash=False)),
    }[kind]
    x = torch.randn(4, 5, dtype=torch.float64)
    jm = jx.compile(function, mode=mode)
    y, jacobian = jm(x)
    assert_matches_reference(y, reference(x), torch.float64)
    assert_matches_reference(jacobian, reference_jacobian(reference, x), torch.float64)
    plan = jm.plan_for(x)
    assert isinstance(plan, Plan) and plan.all_native and jm.fallbacks == []


def test_gradients_flow_to_the_modules_a_lambda_closes_over():
    mlp = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2)).double()
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    _, jacobian = jx.compile(lambda t: torch.sin(mlp(t)))(x)  # sin: a fallback step, so the Python backward
    jacobian.pow(2).sum().backward()
    expected_x, expected_params = penalty_gradients(nn.Sequential(mlp, SinModule()), x.detach(), lambda j: j.pow(2).sum())
    assert_matches_reference(x.grad, expected_x, torch.float64)
    for name, parameter in mlp.named_parameters():
        assert_matches_reference(parameter.grad, expected_params[f"0.{name}"], torch.float64)


class SinModule(nn.Module):
    def forward(self, x):
        return torch.sin(x)


def test_rebinding_a_closed_over_name_replans():
    mlp = nn.Sequential(nn.Linear(4, 3)).double()
    jm = jx.compile(lambda t: mlp(t))
    x = torch.randn(2, 4, dtype=torch.float64)
    jm(x)
    mlp = nn.Sequential(nn.Linear(4, 5), nn.Tanh()).double()  # noqa: F841  (the lambda reads the new one)
    _, jacobian = jm(x)
    assert jacobian.shape == (2, 5, 4)
    assert_matches_reference(jacobian, reference_jacobian(mlp, x), torch.float64)


class ReadsTheInputLater(nn.Module):
    def __init__(self):
        super().__init__()
        self.first, self.second = nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x):
        return self.second(torch.relu(self.first(x)).view(x.size(0), -1))  # x.size(0) read after x's step


class FansOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.first, self.second = nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x):
        h = torch.tanh(self.first(x))
        return self.second(h * 2.0 + h)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("model_type", [ReadsTheInputLater, FansOut])
def test_graphs_that_are_not_chains_keep_the_graph_plan(mode, model_type):
    model = model_type().double()
    x = torch.randn(5, 6, dtype=torch.float64)
    jm = jx.compile(model, mode=mode)
    _, jacobian = jm(x)
    assert_matches_reference(jacobian, reference_jacobian(model, x), torch.float64)
    assert isinstance(jm.plan_for(x), GraphPlan) and jm.fallbacks == []


def test_batch_jacobian_caches_its_plan_with_the_model_and_notices_changes():
    model = SubclassedMLP().double()
    x = torch.randn(3, 7, dtype=torch.float64)
    jx.batch_jacobian(model, x)
    cached = model.__dict__["_jacobian_ext_plans"]
    (jm,) = cached.values()
    plan = jm.plan_for(x)
    jx.batch_jacobian(model, x)
    assert jm.plan_for(x) is plan and len(cached) == 1
    jx.batch_jacobian(model, x, mode="reverse")
    assert len(cached) == 2
    model.layers[1] = nn.Linear(12, 5).double()  # another width: the plan must not be reused
    model.layers[2] = nn.Linear(5, 4).double()
    assert_matches_reference(jx.batch_jacobian(model, x), reference_jacobian(model, x), torch.float64)
    assert jm.plan_for(x) is not plan


def test_the_plan_cache_is_not_copied_with_the_model():
    model = SubclassedMLP().double()
    jx.batch_jacobian(model, torch.randn(2, 7, dtype=torch.float64))
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert len(clone.__dict__.get("_jacobian_ext_plans", {})) == 0
    for clone in (copy.deepcopy(model), copy.copy(model), pickle.loads(pickle.dumps(model))):
        x = torch.randn(2, 7, dtype=torch.float64)
        assert_matches_reference(jx.batch_jacobian(clone, x), reference_jacobian(clone, x), torch.float64)
        (jm,) = clone.__dict__["_jacobian_ext_plans"].values()
        assert jm.model is clone
    assert "_jacobian_ext_plans" not in model.state_dict()


def test_nothing_is_claimed_before_the_first_call():
    jm = jx.compile(SubclassedMLP())
    assert "no plan yet" in repr(jm)
    with pytest.raises(RuntimeError, match="nothing is planned yet"):
        jm.fallbacks  # noqa: B018
    jm(torch.randn(2, 7))
    assert jm.fallbacks == [] and "native linear" in repr(jm)


# ---- deployment of models that are not nn.Sequential ----

def test_torch_export_of_a_subclassed_mlp_is_one_op_call():
    model = SubclassedMLP().double().eval()
    batch = torch.export.Dim("batch")
    program = torch.export.export(jx.compile(model), (torch.randn(4, 7, dtype=torch.float64),),
                                  dynamic_shapes={"x": {0: batch}})
    calls = [n.target for n in program.graph.nodes if n.op == "call_function"]
    assert calls.count(torch.ops.jacext.batch_jacobian.default) == 1
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    buffer.seek(0)
    loaded = torch.export.load(buffer)
    for size in (1, 9):
        x = torch.randn(size, 7, dtype=torch.float64)
        output, jacobian = loaded.module()(x)
        assert_matches_reference(jacobian, reference_jacobian(model, x), torch.float64)
        assert_matches_reference(output, model(x), torch.float64)


def test_torch_compile_fullgraph_and_torchscript_of_a_lambda_and_a_subclass():
    mlp = nn.Sequential(nn.Linear(6, 9), nn.Tanh(), nn.Linear(9, 4)).double().eval()
    subclassed = SubclassedMLP(widths=(6, 9, 4)).double().eval()
    torch._dynamo.reset()  # the shared forward code has met many modules in this process: a fresh count
    for model in (lambda t: mlp(t), subclassed):
        compiled = torch.compile(jx.compile(model), fullgraph=True, backend="eager")
        jm = jx.compile(model)
        if model is subclassed:  # its flatten(1) leaves the input shape open: one example call fixes it
            jm(torch.randn(1, 6, dtype=torch.float64))
        scripted = torch.jit.script(jm)  # the lambda's first Linear fixes the input shape
        for size in (3, 5):
            x = torch.randn(size, 6, dtype=torch.float64)
            for output, jacobian in (compiled(x), scripted(x)):
                assert_matches_reference(jacobian, reference_jacobian(model, x), torch.float64)
                assert_matches_reference(output, model(x), torch.float64)
    torch._dynamo.reset()  # leave later tests the recompile budget they expect


# ---- fusion inside a graph ----

class ResidualMLPBlocks(nn.Module):
    """Residual blocks whose MLPs are chains inside a graph, and a softmax head chain at the end."""

    def __init__(self, width=6, hidden=10, classes=3, blocks=2):
        super().__init__()
        self.ins = nn.ModuleList(nn.Linear(width, hidden) for _ in range(blocks))
        self.outs = nn.ModuleList(nn.Linear(hidden, width) for _ in range(blocks))
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        for first, second in zip(self.ins, self.outs):
            x = x + second(torch.tanh(first(x)))
        return F.log_softmax(self.head(F.relu(x)), dim=-1)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("batch", [0, 1, 5])
def test_chains_inside_a_graph_run_as_one_chain_op(dtype, mode, batch):
    model = ResidualMLPBlocks().to(dtype)
    x = non_contiguous(torch.randn(batch, 6, dtype=dtype))
    jm = jx.compile(model, mode=mode)
    y, jacobian = jm(x)
    assert_matches_reference(y, model(x), dtype)
    assert_matches_reference(jacobian, reference_jacobian(model, x), dtype)
    plan = jm.plan_for(x)
    assert isinstance(plan, GraphPlan) and jm.fallbacks == []
    labels = [g.rule.label for g in plan.nodes if g.rule is not None]
    assert labels.count("native chain [linear, tanh, linear]") == 2, labels
    assert "native chain [relu, linear, log_softmax]" in labels, labels
    assert "native chain" in repr(jm)


def test_gradients_through_a_fused_chain_inside_a_graph():
    model = ResidualMLPBlocks().double()
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    _, jacobian = jx.compile(model)(x)
    jacobian.pow(2).sum().backward()
    expected_x, expected_params = penalty_gradients(model, x.detach(), lambda j: j.pow(2).sum())
    assert_matches_reference(x.grad, expected_x, torch.float64)
    for name, parameter in model.named_parameters():
        assert_matches_reference(parameter.grad, expected_params[name], torch.float64)


@pytest.mark.parametrize("mode", ["forward", "reverse"])
def test_the_eager_autograd_function_and_the_registered_kernel_give_the_same_gradients(mode):
    """ops.batch_jacobian differentiates eager calls through differentiable.FusedJacobian, the dispatcher's
    callers (torch.compile, export) through the registered kernel: same setup and backward, same gradients."""
    from jacobian_ext import ops

    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3), nn.LogSoftmax(-1)).double()
    jm = jx.compile(model)
    x = torch.randn(5, 4, dtype=torch.float64)
    plan = jm.plan_for(x)
    layers, params = plan.native_layers, plan.native_params()
    weights = torch.randn(5, 3, 4, dtype=torch.float64)
    gradients = []
    for call in (ops.batch_jacobian, torch.ops.jacext.batch_jacobian.default):
        inputs = x.clone().requires_grad_()
        _, jacobian = call(inputs, layers, params, mode)
        gradients.append(torch.autograd.grad((jacobian * weights).sum(), [inputs, *params]))
    expected_x, expected_params = penalty_gradients(model, x, lambda j: (j * weights).sum())
    for eager, registered, expected in zip(*gradients, [expected_x, *expected_params.values()]):
        assert_matches_reference(eager, expected, torch.float64)
        assert_matches_reference(registered, expected, torch.float64)


def test_other_threads_run_their_models_untouched_while_a_model_is_captured():
    import threading

    other = nn.Sequential(nn.Linear(5, 5), nn.Tanh()).double()
    x = torch.randn(3, 5, dtype=torch.float64)
    with torch.no_grad():
        expected = other(x)
    stop, failures = threading.Event(), []

    def run_other():
        while not stop.is_set():
            try:
                with torch.no_grad():
                    if not torch.equal(other(x), expected):
                        failures.append("wrong value")
            except Exception as error:  # a module call intercepted by the tracer
                failures.append(f"{type(error).__name__}: {error}")

    thread = threading.Thread(target=run_other)
    thread.start()
    try:
        for _ in range(20):
            model = SubclassedMLP().double()
            z = torch.randn(2, 7, dtype=torch.float64)
            assert_matches_reference(jx.batch_jacobian(model, z), reference_jacobian(model, z), torch.float64)
    finally:
        stop.set()
        thread.join()
    assert not failures, failures[:3]


# ---- recurrent layers: the recurrent node alone on the fallback, and fallbacks that cannot fail ----

class RecurrentClassifier(nn.Module):
    def __init__(self, kind, batch_first, layers):
        super().__init__()
        self.batch_first = batch_first
        self.rnn = getattr(nn, kind)(3, 6, num_layers=layers, batch_first=batch_first)
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        if not self.batch_first:
            x = x.transpose(0, 1)
        out, _ = self.rnn(x)  # h_n ([layers, B, H], or a pair for LSTM) is unused
        return self.head(out[:, -1] if self.batch_first else out[-1])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("mode", ["forward", "reverse"])
@pytest.mark.parametrize("kind", ["GRU", "LSTM", "RNN"])
@pytest.mark.parametrize("batch_first, layers", [(True, 1), (True, 2), (False, 2)])
def test_recurrent_classifiers_never_crash_and_match_the_classic_loop(dtype, mode, kind, batch_first, layers):
    import warnings

    model = RecurrentClassifier(kind, batch_first, layers).to(dtype)
    x = torch.randn(3, 4, 3, dtype=dtype)
    jm = jx.compile(model, mode=mode)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no whole-model fallback warning
        y, jacobian = jm(x)
    assert_matches_reference(y, model(x), dtype)
    assert_matches_reference(jacobian, loop_jacobian(model, x), dtype)
    # Only the recurrent layer falls back, not the whole model; time-major too (the batch axis is followed).
    assert jm.fallbacks == ["rnn"]


# ---- subclasses of torch layers ----

class ZeroBiasLinear(nn.Linear):
    """Configures its parent in __init__ only: the parent's rule applies (a node, not traced into)."""

    def __init__(self, a, b):
        super().__init__(a, b)
        nn.init.zeros_(self.bias)


class ScaledConv(nn.Conv2d):
    """Overrides forward: traced into, its calls planned one by one."""

    def forward(self, x):
        return super().forward(x) * 0.5


@pytest.mark.parametrize("mode", MODES)
def test_subclasses_of_torch_layers_use_the_parent_rule_or_are_traced_into(mode):
    mlp = nn.Sequential(ZeroBiasLinear(5, 7), nn.Tanh(), ZeroBiasLinear(7, 3)).double()
    x = torch.randn(4, 5, dtype=torch.float64)
    jm = jx.compile(mlp, mode=mode)
    _, jacobian = jm(x)
    assert_matches_reference(jacobian, reference_jacobian(mlp, x), torch.float64)
    plan = jm.plan_for(x)
    assert isinstance(plan, Plan) and plan.all_native and plan.native_layers[0] == "linear"

    cnn = nn.Sequential(ScaledConv(2, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 2)).double()
    z = torch.randn(2, 2, 4, 4, dtype=torch.float64)
    jm = jx.compile(cnn, mode=mode)
    _, jacobian = jm(z)
    assert_matches_reference(jacobian, reference_jacobian(cnn, z), torch.float64)
    # Traced into: the scale is an index map; the functional conv2d it calls has no native rule yet, so the
    # fallback is that call alone, named by its module.
    assert jm.fallbacks == ["0"]
    assert "index map (scale)" in repr(jm)


# ---- reductions over per-sample axes ----

class Reductions(nn.Module):
    def __init__(self, form):
        super().__init__()
        self.form = form
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h = torch.tanh(self.conv(x))
        if self.form == "mean":
            pooled = h.mean((2, 3))
        elif self.form == "mean_keepdim":
            pooled = torch.mean(h, dim=[-1, -2], keepdim=True).flatten(1)
        elif self.form == "adaptive":
            pooled = F.adaptive_avg_pool2d(h, 1).flatten(1)
        elif self.form == "sum":
            pooled = h.sum(-1).sum(dim=2) / 16.0
        else:  # a reduction of channels and width at once, then a Linear over what is left
            return h.sum((1, 3))
        return self.head(pooled)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("mode", ["forward", "reverse"])
@pytest.mark.parametrize("form", ["mean", "mean_keepdim", "adaptive", "sum", "channels_and_width"])
@pytest.mark.parametrize("batch", [0, 1, 3])
def test_reductions_over_feature_axes_are_native(dtype, mode, form, batch):
    model = Reductions(form).to(dtype)
    x = non_contiguous(torch.randn(batch, 2, 4, 4, dtype=dtype))
    jm = jx.compile(model, mode=mode)
    y, jacobian = jm(x)
    assert_matches_reference(y, model(x), dtype)
    if batch:  # torch.func's vmap over a convolution cannot take an empty batch
        assert_matches_reference(jacobian, reference_jacobian(model, x), dtype)
    else:
        assert jacobian.shape == (0, *y.shape[1:], 2, 4, 4)
    assert jm.fallbacks == []
    assert "index map (reduction)" in repr(jm)


# ---- products and quotients of two carried values ----

class Gated(nn.Module):
    """Squeeze-excitation (a [B, C, 1, 1] gate times [B, C, H, W]), a GLU-style gate, x * x and a quotient."""

    def __init__(self, form):
        super().__init__()
        self.form = form
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.squeeze, self.excite = nn.Conv2d(4, 2, 1), nn.Conv2d(2, 4, 1)
        self.value, self.gate = nn.Linear(6, 5), nn.Linear(6, 5)

    def forward(self, x):
        if self.form == "squeeze_excitation":
            h = F.relu(self.conv(x))
            scale = torch.sigmoid(self.excite(F.relu(self.squeeze(h.mean((2, 3), keepdim=True)))))
            return (h * scale).flatten(1)
        if self.form == "glu":
            return self.value(x) * torch.sigmoid(self.gate(x))
        if self.form == "square":
            return torch.tanh(x) * torch.tanh(x) + x * x
        return self.value(x) / (1.5 + torch.sigmoid(self.gate(x)))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("mode", ["forward", "reverse"])
@pytest.mark.parametrize("form", ["squeeze_excitation", "glu", "square", "quotient"])
@pytest.mark.parametrize("batch", [1, 4])
def test_products_of_two_carried_values_are_native(dtype, mode, form, batch):
    model = Gated(form).to(dtype)
    shape = (2, 4, 4) if form == "squeeze_excitation" else (6,)
    x = non_contiguous(torch.randn(batch, *shape, dtype=dtype))
    jm = jx.compile(model, mode=mode)
    y, jacobian = jm(x)
    assert_matches_reference(y, model(x), dtype)
    assert_matches_reference(jacobian, reference_jacobian(model, x), dtype)
    assert jm.fallbacks == [] and "native product" in repr(jm)
