"""Any all-native graph as ONE call of torch.ops.jacext.batch_jacobian (a graph program, csrc/graph.cpp):
every program kind against torch.func in float64 in both sweeps, the eager path running through the op,
the deployment paths (torch.compile, torch.export with save/load, TorchScript, opcheck) on resnet18 and
a subclassed residual MLP, and clear errors for bad programs."""
import io

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import jacobian_ext as jx
from conftest import assert_matches_reference, reference_jacobian
from jacobian_ext.graph import GraphPlan
from jacobian_ext.program import replay
from test_graph import FunctionalNorms

DOUBLE = torch.float64


class ResidualMLP(nn.Module):
    """A subclassed MLP with residual blocks and functional calls: a graph, not a chain."""

    def __init__(self, features=7, hidden=9, classes=4):
        super().__init__()
        self.stem = nn.Linear(features, hidden)
        self.blocks = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(2))
        self.head = nn.Linear(hidden, classes)

    def forward(self, x):
        h = F.gelu(self.stem(x))
        for block in self.blocks:
            h = h + torch.tanh(block(h))
        return F.log_softmax(self.head(h), dim=-1)


class EveryKind(nn.Module):
    """One model holding each kind of the program: conv, batch norm, pools (2-d and 1-d), layer norm,
    reshape, permute, mean, sum, cat, a slice, add (with constants), mul and div of two carried values, scale by a
    number and by a buffer."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.pool = nn.MaxPool2d(2, ceil_mode=True)
        self.avg = nn.AvgPool2d(2, stride=1, padding=1, count_include_pad=False)
        self.adaptive = nn.AdaptiveAvgPool2d((2, 1))
        self.gate = nn.Conv2d(4, 4, 1)
        self.norm = nn.LayerNorm(4)
        self.pool1d = nn.AvgPool1d(2)
        self.head = nn.Linear(4 * 2 + 4 + 4, 5, bias=False)
        self.register_buffer("scale", torch.linspace(0.5, 1.5, 4).reshape(4, 1, 1))
        with torch.no_grad():
            self.bn.running_mean.uniform_(-0.5, 0.5)
            self.bn.running_var.uniform_(0.5, 2.0)

    def forward(self, x):
        h = F.silu(self.bn(self.conv(x)))                      # [B, 4, 5, 5]
        h = self.pool(h) * self.scale                          # scale by a buffer; [B, 4, 3, 3]
        gate = torch.sigmoid(self.gate(h.mean((2, 3), keepdim=True)))
        h = h * gate + 0.5                                     # squeeze-excitation; add a number
        h = self.avg(h) / 2.0                                  # [B, 4, 4, 4]
        tokens = self.norm(h.flatten(2).permute(0, 2, 1))      # [B, 16, 4]
        pooled = self.pool1d(tokens.permute(0, 2, 1))          # [B, 4, 8]
        a = self.adaptive(h).flatten(1)                        # [B, 8]
        b = pooled.sum(-1) - tokens.mean(1)                    # [B, 4]
        t = torch.tanh(b)
        c = pooled[..., 1::3].mean(-1) / (1.5 + t * t)       # a slice; quotient of two carried values
        return self.head(torch.cat([a, b, c], dim=1))


def resnet18():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=6).double().eval()
    with torch.no_grad():  # warmed statistics, so batch norm is not the identity
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 1.5)
    return model


def planned(model, x, mode):
    jm = jx.compile(model, mode=mode)
    with torch.no_grad():
        output, jacobian = jm(x)
    plan = jm._last["plan"]
    return plan, output, jacobian


def program_kinds(plan):
    """The kinds of the plan's program entries, in order (the plan must have a program)."""
    program = plan.native_program()
    assert program is not None, plan.unencoded
    return [entry.split()[0] for entry in program[0]]


def check(model, x, output, jacobian):
    with torch.no_grad():
        expected_output = model(x)
    assert_matches_reference(output, expected_output, DOUBLE)
    if x.shape[0] == 0:  # torch.func cannot vmap over an empty batch: the shape is the reference
        assert jacobian.shape == (0, *expected_output.shape[1:], *x.shape[1:])
        return
    assert_matches_reference(jacobian, reference_jacobian(model, x), DOUBLE)


@pytest.mark.parametrize("mode", ["forward", "reverse"])
@pytest.mark.parametrize("batch", [0, 1, 3])
def test_every_kind_runs_as_one_program(mode, batch):
    torch.manual_seed(batch)
    model = EveryKind().double().eval()
    x = torch.randn(batch, 2, 5, 5, dtype=DOUBLE)
    plan, output, jacobian = planned(model, x, mode)
    assert isinstance(plan, GraphPlan)
    kinds = set(program_kinds(plan))
    assert {"conv", "batch_norm", "max_pool2d", "avg_pool2d", "adaptive_avg_pool2d", "layer_norm", "reshape",
            "permute", "mean", "sum", "cat", "slice", "add", "mul", "div", "scale"} <= kinds, kinds
    check(model, x, output, jacobian)


@pytest.mark.parametrize("mode", ["forward", "reverse"])
def test_non_contiguous_input_and_replay_agree(mode):
    torch.manual_seed(1)
    model = EveryKind().double().eval()
    x = torch.randn(5, 5, 2, 3, dtype=DOUBLE).permute(3, 2, 0, 1)  # [3, 2, 5, 5], not contiguous
    plan, output, jacobian = planned(model, x, mode)
    check(model, x, output, jacobian)
    layers, getters = plan.native_program()
    with torch.no_grad():  # the plain-PyTorch replay (fake impl, backward) computes the same model
        assert_matches_reference(replay(x, layers, [get() for get in getters]), model(x), DOUBLE)


@pytest.mark.parametrize("mode", ["forward", "reverse"])
def test_subclassed_residual_mlp_is_one_program_with_fused_chain_runs(mode):
    torch.manual_seed(2)
    model = ResidualMLP().double().eval()
    x = torch.randn(4, 7, dtype=DOUBLE)
    plan, output, jacobian = planned(model, x, mode)
    assert plan.native_program() is not None
    check(model, x, output, jacobian)


class ConvNorms(nn.Module):
    """Convolutions followed by eval-mode batch norms: a stem whose small weight takes the norm's scale in
    reverse mode (affine and not), and a convolution that a residual sum reads besides its norm (not
    folded: the sum's cotangent must not be scaled)."""

    def __init__(self):
        super().__init__()
        self.stem, self.stem_norm = nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.BatchNorm2d(4)
        self.conv, self.norm = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4, affine=False)
        self.shared, self.shared_norm = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)
        self.head = nn.Linear(4 * 4 * 4, 3)
        for norm in (self.stem_norm, self.norm, self.shared_norm):
            norm.running_mean.uniform_(-0.5, 0.5)
            norm.running_var.uniform_(0.25, 4.0)
            if norm.affine:
                norm.weight.data.uniform_(-2.0, 2.0)

    def forward(self, x):
        h = F.relu(self.stem_norm(self.stem(x)))
        h = F.relu(self.norm(self.conv(h)))
        shared = self.shared(h)
        return self.head((self.shared_norm(shared) + shared).flatten(1))


@pytest.mark.parametrize("batch", [0, 1, 3])
def test_batch_norms_folded_into_convolution_weights_in_reverse(batch):
    torch.manual_seed(3)
    model = ConvNorms().double().eval()
    x = torch.randn(batch, 3, 8, 8, dtype=DOUBLE)
    plan, output, jacobian = planned(model, x, "reverse")
    assert plan.native_program() is not None
    check(model, x, output, jacobian)


class TokenMLP(nn.Module):
    """Linear layers over the last axis of [B, N, H] (a transformer's MLP block), with and without bias."""

    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(4, 6), nn.Linear(6, 4, bias=False)
        self.head = nn.Linear(3 * 4, 2)

    def forward(self, x):
        return self.head((x + self.down(F.gelu(self.up(x)))).flatten(1))


@pytest.mark.parametrize("mode", ["forward", "reverse"])
@pytest.mark.parametrize("batch", [0, 1, 3])
def test_last_axis_linear_is_a_program_entry(mode, batch):
    torch.manual_seed(6)
    model = TokenMLP().double().eval()
    x = torch.randn(batch, 3, 4, dtype=DOUBLE)
    plan, output, jacobian = planned(model, x, mode)
    layers = plan.native_program()[0]
    assert sum(layer.startswith("linear_last_axis") for layer in layers) == 2, layers
    check(model, x, output, jacobian)


def test_last_axis_linear_entry_checks_its_weight():
    with pytest.raises(ValueError, match=r"linear_last_axis\) needs a weight \[out, 4\]"):
        torch.ops.jacext.batch_jacobian(torch.randn(2, 3, 4), ["linear_last_axis bias=0"], [torch.randn(5, 3)],
                                        "reverse")


def test_resnet18_is_one_program_in_both_sweeps():
    model = resnet18()
    x = torch.randn(2, 3, 16, 16, dtype=DOUBLE)
    for mode in ("reverse", "forward"):
        plan, output, jacobian = planned(model, x, mode)
        assert plan.native_program() is not None, plan.unencoded
        check(model, x, output, jacobian)


# ---- deployment ----

def jacext_calls(graph):
    return [n for n in graph.nodes if n.op == "call_function" and "jacext" in str(n.target)]


@pytest.mark.parametrize("make_model, shape", [(resnet18, (3, 16, 16)), (ResidualMLP, (7,)),
                                               (lambda: FunctionalNorms(affine=True), (2, 4, 4))],
                         ids=["resnet18", "ResidualMLP", "FunctionalNorms"])
def test_torch_export_with_a_dynamic_batch_save_and_load(make_model, shape):
    check_export_with_a_dynamic_batch(make_model().double().eval(), shape)


def check_export_with_a_dynamic_batch(model, shape):
    """torch.export of jx.compile(model) with a dynamic batch is one op call, and after save and load it
    computes the model's Jacobian at other batch sizes."""
    batch = torch.export.Dim("batch")
    program = torch.export.export(jx.compile(model), (torch.randn(3, *shape, dtype=DOUBLE),),
                                  dynamic_shapes={"x": {0: batch}})
    assert len(jacext_calls(program.graph)) == 1, program.graph
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    buffer.seek(0)
    loaded = torch.export.load(buffer)
    for size in (1, 4):
        x = torch.randn(size, *shape, dtype=DOUBLE)
        check(model, x, *loaded.module()(x))


@pytest.mark.parametrize("make_model, shape", [(resnet18, (3, 16, 16)), (ResidualMLP, (7,))])
def test_torch_compile_fullgraph(make_model, shape):
    torch._dynamo.reset()  # every JacobianModule is one more compile of the same forward code (limit 8)
    model = make_model().double().eval()
    jm = jx.compile(model)
    jm(torch.randn(1, *shape, dtype=DOUBLE))  # resnet18 does not fix its input shape (README, Deploying)
    compiled = torch.compile(jm, fullgraph=True, backend="eager")
    with torch.no_grad():
        for size in (2, 3):
            x = torch.randn(size, *shape, dtype=DOUBLE)
            check(model, x, *compiled(x))


def test_torchscript_of_resnet18_saves_and_loads():
    model = resnet18()
    jm = jx.compile(model)
    jm(torch.randn(1, 3, 16, 16, dtype=DOUBLE))  # a convolution does not fix the input shape
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(jm), buffer)
    buffer.seek(0)
    loaded = torch.jit.load(buffer)
    x = torch.randn(2, 3, 16, 16, dtype=DOUBLE)
    check(model, x, *loaded(x))


def test_opcheck_of_a_graph_program():
    torch.manual_seed(3)
    model = EveryKind().double().eval()
    x = torch.randn(2, 2, 5, 5, dtype=DOUBLE)
    opcheck_program(model, x, gradient_mode="reverse")


def opcheck_program(model, x, gradient_mode):
    """opcheck of the op on the model's program in both sweeps, and with gradients (x and every floating
    parameter requiring grad; integer params such as an index stay constants) in gradient_mode: the registered
    backward differentiates the replayed program. Returns the program's entries."""
    plan, _, _ = planned(model, x, "reverse")
    layers, getters = plan.native_program()
    params = [get().detach() for get in getters]
    for mode in ("forward", "reverse"):
        torch.library.opcheck(torch.ops.jacext.batch_jacobian.default, (x, layers, params, mode))
    differentiable = [p.clone().requires_grad_() if p.is_floating_point() else p for p in params]
    torch.library.opcheck(torch.ops.jacext.batch_jacobian.default,
                          (x.clone().requires_grad_(), layers, differentiable, gradient_mode),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    return layers


def test_gradients_of_a_program_jacobian_equal_torch_func():
    torch.manual_seed(4)
    model = ResidualMLP(features=3, hidden=4, classes=2).double().eval()
    x = torch.randn(2, 3, dtype=DOUBLE)
    plan, _, _ = planned(model, x, "reverse")
    layers, getters = plan.native_program()
    params = [get().detach().clone().requires_grad_() for get in getters]
    xg = x.clone().requires_grad_()
    torch.autograd.gradcheck(lambda v, *p: torch.ops.jacext.batch_jacobian(v, layers, list(p), "forward")[1],
                             (xg, *params))


def test_export_of_a_model_with_a_fallback_node_names_it():
    class WithSin(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(4, 4)

        def forward(self, x):
            return x + torch.sin(self.linear(x)).cumsum(-1)

    model = WithSin().double().eval()
    with pytest.raises(NotImplementedError, match=r"\['sin', 'cumsum'\]"):
        torch.export.export(jx.compile(model), (torch.randn(2, 4, dtype=DOUBLE),))
    x = torch.randn(3, 4, dtype=DOUBLE)
    check(model, x, *jx.compile(model)(x))  # eagerly it runs, the fallback node included


# ---- bad programs ----

@pytest.mark.parametrize("layers, params, message", [
    (["frobnicate"], [], r"layers\[0\].*graph program: conv"),
    (["frobnicate in=0"], [], r"layers\[0\].*graph program: conv"),
    (["reshape shape=4,x"], [], r"comma-separated integers"),
    (["reshape"], [], r"needs the attribute shape="),
    (["reshape shape=5"], [], r"cannot reshape per-sample shape"),
    (["tanh in=3"], [], r"reads slot 3"),
    (["mul in=0"], [], r"reads 1 slots, expected 2"),
    (["scale divide=2 factor=1.0"], [], r"must be 0 or 1"),
    (["scale divide=0 factor=abc"], [], r"must be a number"),
    (["add coef=1,1"], [], r"2 coefficients for 1 inputs"),
    (["conv stride=1 padding=0 dilation=1 groups=1 bias=1"], [torch.randn(2, 2, 1)], r"takes 2 tensors"),
    (["permute dims=0,0"], [], r"permutation"),
    (["mean dims=3 keepdim=0"], [], r"per-sample axis 3"),
    (["slice dim=0 start=1 stop=3 step=1"], [], r"stop <= 2"),
    (["slice dim=1 start=0 stop=1 step=0"], [], r"step >= 1"),
    (["reshape shape=4 colour=red"], [], r"takes no attribute colour"),
    (["relu", "linear in=1 bias=1"], [], r"takes no attribute bias"),
])
def test_bad_programs_raise_value_errors(layers, params, message):
    x = torch.randn(2, 2, 2, dtype=DOUBLE)
    with pytest.raises(ValueError, match=message):
        torch.ops.jacext.batch_jacobian(x, layers, [p.double() for p in params], "reverse")


@pytest.mark.slow  # a minute or more of C++ compilation on 2 cores (`make test-slow`)
def test_aot_inductor_package_of_a_residual_graph(tmp_path):
    model = ResidualMLP().double().eval()
    batch = torch.export.Dim("batch")
    program = torch.export.export(jx.compile(model), (torch.randn(3, 7, dtype=DOUBLE),), dynamic_shapes={"x": {0: batch}})
    package = torch._inductor.aoti_compile_and_package(program, package_path=str(tmp_path / "jacobian.pt2"))
    x = torch.randn(5, 7, dtype=DOUBLE)
    check(model, x, *torch._inductor.aoti_load_package(package)(x))
