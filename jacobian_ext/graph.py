"""Graph capture with torch.fx, and the plan that propagates Jacobian blocks over the captured DAG.

Every node that carries a derivative of the model input gets one rule (graph_rules.py chooses it): a native op,
an index map (views, slicing, sums, concatenation, scaling by a constant), or the torch.func fallback
for that node alone. Nodes that carry no derivative (shapes, constants, asserts) are evaluated for
their values only. Blocks keep the feature axes of the node intact:
  forward mode: tangents   T[b, d, *shape]  (d over the model's input features, D)
  reverse mode: cotangents G[b, c, *shape]  (c over the model's output features, C)
"""
import collections
import dataclasses
import functools
import operator
import threading
import warnings
from dataclasses import dataclass, field
from types import FunctionType
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import fx, nn
from torch._subclasses.fake_tensor import FakeTensor

from . import fallback, functional_layers, graph_rules, ops, traced_forms
from .errors import GraphCaptureError, StructuredOutputError
from .blocks import IDENTITY, NodeRule, Picked, accumulate, explicit_block
from .plan import FlatWidths, short_repr
from .program import entry
from .rules import read_path, rule_type

# Tracing retries: each failed trace marks the innermost module that failed as a leaf.
_MAX_TRACE_ATTEMPTS = 16


class _Tracer(fx.Tracer):
    """torch.nn's own modules are leaves (the default); user modules are traced into, except those
    in `opaque`, whose forward could not be traced (data-dependent control flow): they become leaf
    nodes on the fallback instead of sending the whole model there."""

    # Buffers become get_attr nodes like parameters: read at every call, and usable with traced sizes.
    proxy_buffer_attributes = True

    def __init__(self, opaque: Sequence[str]):
        super().__init__()
        self.opaque = set(opaque)
        self.failed_module: Optional[str] = None
        self._function_root: Optional["FunctionRoot"] = None
        self._thread = threading.get_ident()

    def trace(self, root, concrete_args=None):
        if isinstance(root, FunctionRoot):
            # fx traces a function against an empty root module; create_args_for_root puts ours back.
            self._function_root = root
            return super().trace(root.traced_function, concrete_args)
        return super().trace(root, concrete_args)

    def create_args_for_root(self, root_fn, is_module, concrete_args=None):
        if self._function_root is not None:
            self.root = self._function_root
            self.submodule_paths = {module: name for name, module in self.root.named_modules()}
            self.tensor_attrs = {value: f"{name}.{key}" if name else key
                                 for name, module in self.root.named_modules()
                                 for key, value in module.__dict__.items() if isinstance(value, torch.Tensor)}
        return super().create_args_for_root(root_fn, is_module, concrete_args)

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return (qualified_name in self.opaque or super().is_leaf_module(module, qualified_name)
                or _runs_a_torch_layer(module))

    # torch.fx patches nn.Module.__call__ and __getattr__ process-wide while it traces: calls made by other
    # threads meanwhile (another model, another JacobianModule) reach this tracer and run untraced here.
    def getattr(self, attr, attr_val, parameter_proxy_cache):
        if threading.get_ident() != self._thread:
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def call_module(self, module, forward, args, kwargs):
        if threading.get_ident() != self._thread:
            return forward(*args, **kwargs)
        form = traced_forms.form_for(module, args, kwargs) if self.path_of_module(module) not in self.opaque else None
        if form is not None:  # a composite torch layer, traced into as the ops it is made of
            try:
                return form()
            except Exception:  # noqa: BLE001  (another torch release's private methods): the layer as a leaf
                pass
        try:
            return super().call_module(module, forward, args, kwargs)
        except Exception:
            if self.failed_module is None:  # the innermost module fails first
                self.failed_module = self.path_of_module(module)
            raise


class FunctionRoot(nn.Module):
    """A plain function or lambda as a module, holding the modules it closes over (closure cells, the
    globals it names, a bound method's object) as submodules under those names: fx traces the
    function and sees those modules' calls as layers, parameters and all, like a model's own."""

    def __init__(self, fn: Callable, modules: Dict[str, nn.Module]):
        super().__init__()
        self.fn = fn
        for name, module in modules.items():
            self.add_module(name, module)
        # fx traces a plain function with its own signature (extra arguments keep their defaults); any
        # other callable (a bound method, a partial, an object with __call__) as a function of one input.
        self.traced_function = fn if isinstance(fn, FunctionType) else (lambda x: fn(x))

    def forward(self, *args, **kwargs):
        return self.fn(*args, **kwargs)


def closed_over_modules(fn: Callable) -> Dict[str, nn.Module]:
    """The nn.Modules a function reaches without being passed them, by the name it reaches them under."""
    found: Dict[str, nn.Module] = {}
    if isinstance(fn, functools.partial):
        bound = [*fn.args, *fn.keywords.values()]
        found.update((f"partial_{i}", value) for i, value in enumerate(bound) if isinstance(value, nn.Module))
        if isinstance(fn.func, nn.Module):
            found["func"] = fn.func
            return found
        return {**closed_over_modules(fn.func), **found}
    owner = getattr(fn, "__self__", None)
    if isinstance(owner, nn.Module):
        found["self"] = owner
    function = getattr(fn, "__func__", fn)
    code = getattr(function, "__code__", None)
    if code is None:
        return found
    for name, cell in zip(code.co_freevars, getattr(function, "__closure__", None) or ()):
        try:
            value = cell.cell_contents
        except ValueError:  # a cell not filled yet
            continue
        if isinstance(value, nn.Module):
            found.setdefault(name, value)
    namespace = getattr(function, "__globals__", {})
    for name in code.co_names:
        value = namespace.get(name)
        if isinstance(value, nn.Module):
            found.setdefault(name, value)
    return found


def capture_root(model: Callable) -> nn.Module:
    """The module that graph capture traces: the model itself, or a FunctionRoot around a function."""
    return model if isinstance(model, nn.Module) else FunctionRoot(model, closed_over_modules(model))


def _runs_a_torch_layer(module: nn.Module) -> bool:
    """A user subclass of a torch layer that runs the parent's forward unchanged (rules.rule_type): a node
    like the parent, not traced into (its forward would become functional calls)."""
    parent = rule_type(module)
    return (parent is not type(module) and parent is not nn.Module
            and not issubclass(parent, (nn.Sequential, nn.ModuleList, nn.ModuleDict)))


def capture(root: nn.Module, leaves: Sequence[str] = ()) -> Tuple[fx.GraphModule, List[str]]:
    """(graph module, user modules kept opaque) of capture_root(model). `leaves`: module paths kept whole
    as one call_module node (a layer a Jacobian is taken with respect to). Raises GraphCaptureError when
    the model's own forward cannot be traced."""
    opaque: List[str] = list(leaves)
    for _ in range(_MAX_TRACE_ATTEMPTS):
        tracer = _Tracer(opaque)
        try:
            graph = tracer.trace(root)
        except Exception as error:
            failed = tracer.failed_module
            if not failed or failed in opaque:
                raise GraphCaptureError(f"torch.fx cannot trace it ({type(error).__name__}: {error})") from error
            opaque.append(failed)
            continue
        name = getattr(root.fn, "__name__", "function") if isinstance(root, FunctionRoot) else type(root).__name__
        gm = fx.GraphModule(root, graph, name)
        gm.meta[functional_layers.CAPTURED_MODEL] = root  # get_attr nodes read the model's tensors as they are now
        return gm, opaque[len(leaves):]
    raise GraphCaptureError(f"torch.fx cannot trace it: more than {_MAX_TRACE_ATTEMPTS} modules fail to trace")


@dataclass
class GraphNode:
    """One fx node: its rule (None: evaluated for its value only), the inputs that carry derivatives,
    and its per-sample shape."""

    node: fx.Node
    name: str
    rule: Optional[NodeRule]
    inputs: Tuple[fx.Node, ...] = ()
    shape: Tuple[int, ...] = ()
    owner: str = ""  # path of the module the node belongs to ("" at the top level)

    def describe(self) -> str:
        return self.rule.label if self.rule is not None else "value only"


def _target_name(gm: fx.GraphModule, node: fx.Node) -> str:
    if node.op == "call_module":
        return node.target
    if node.op == "call_method":
        return f".{node.target}()"
    if node.op == "call_function":
        return getattr(node.target, "__name__", str(node.target)) + "()"
    return node.op


def _is_float_tensor(value) -> bool:
    return isinstance(value, torch.Tensor) and value.is_floating_point()


class Evaluator:
    """Runs the nodes of a graph module one at a time (values only), with in-place calls made safe:
    a stored value may be needed again by a later rule, so it is never overwritten."""

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.attribute_source = functional_layers.attribute_source(gm)
        self.modules = dict(gm.named_modules())
        # Carried tensors whose batch axis is not the first (qkv.permute(2, 0, ...), an RNN's h_n), by that
        # axis. Once planned, such values are stored batch-first (a view moving the axis), so every rule
        # and block sees [B, *shape]; each node still receives and returns them in the layout its own op
        # works in (arguments, call).
        self.batch_axes: Dict[fx.Node, int] = {}

    def arguments(self, node: fx.Node, lookup: Callable):
        """A node's args and kwargs, each input node's value from lookup(input) in the node's own layout."""
        def own_layout(source):
            value, axis = lookup(source), self.batch_axes.get(source)
            return value if axis is None else value.movedim(0, axis)

        return fx.node.map_arg(node.args, own_layout), fx.node.map_arg(node.kwargs, own_layout)

    def call(self, node: fx.Node, args, kwargs):
        return self.batch_first(node, self._call(node, args, kwargs))

    def batch_first(self, node: fx.Node, value):
        """A node's value, computed in its op's own layout, as the plan stores it."""
        axis = self.batch_axes.get(node)
        return value if axis is None else value.movedim(axis, 0)

    def _call(self, node: fx.Node, args, kwargs):
        if node.op == "call_module":
            module = self.modules[node.target]
            if getattr(module, "inplace", False):
                args = tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)
            return module(*args, **kwargs)
        if node.op == "call_function":
            target = _OUT_OF_PLACE.get(node.target, node.target)
            if kwargs.get("inplace", False):
                kwargs = {**kwargs, "inplace": False}
            return target(*args, **kwargs)
        if node.op == "call_method":
            name = node.target
            if name.endswith("_") and not name.endswith("__") and hasattr(torch.Tensor, name[:-1]):
                name = name[:-1]
            return getattr(args[0], name)(*args[1:], **kwargs)
        if node.op == "get_attr":
            return read_path(self.attribute_source, node.target)
        raise AssertionError(f"no value for node kind {node.op}")

    def evaluate(self, node: fx.Node, env: Dict[fx.Node, object]):
        return self.call(node, *self.arguments(node, env.__getitem__))

    def run(self, x: torch.Tensor, name_failures: bool = False, feed: Optional[Callable] = None) -> Dict[fx.Node, object]:
        """Every node's value for the model input x; with name_failures, a node that raises is named
        in a ValueError (planning probes: the user learns which layer rejects the input). `feed(node,
        value)`, when given, returns the value that later nodes receive instead."""
        env: Dict[fx.Node, object] = {}
        for node in self.gm.graph.nodes:
            if node.op == "placeholder":
                env[node] = x if not env else placeholder_default(node)
            elif node.op == "output":
                env[node] = fx.node.map_arg(node.args[0], env.__getitem__)
            elif not name_failures:
                env[node] = self.evaluate(node, env)
            else:
                if node.op == "call_module":
                    _check_linear_input(node.target, self.modules[node.target], env.get(node.args[0] if node.args else None))
                try:
                    env[node] = self.evaluate(node, env)
                except Exception as error:
                    raise ValueError(f"{self._describe(node)} failed on per-sample inputs of shape "
                                     f"{_input_shapes(node, env)}: {error}") from error
            if feed is not None and node.op not in ("placeholder", "output"):
                env[node] = feed(node, env[node])
        return env

    def _describe(self, node: fx.Node) -> str:
        if node.op == "call_module":
            return f"layer '{node.target}' ({short_repr(self.modules[node.target])})"
        return f"node '{node.name}'"


def _check_linear_input(name: str, module: nn.Module, value):
    # The weight's width, not module.in_features, which a replaced weight leaves stale.
    if rule_type(module) is nn.Linear and isinstance(value, torch.Tensor) and (
            value.dim() < 2 or value.shape[-1] != module.weight.shape[-1]):
        got = value.shape[-1] if value.dim() >= 2 else "no"
        raise ValueError(f"layer '{name}' ({module}) expects {module.weight.shape[-1]} input features, but its "
                         f"input has {got} (per-sample input shape {list(value.shape[1:])})")


def _input_shapes(node: fx.Node, env) -> List[List[int]]:
    return [list(env[a].shape[1:]) for a in node.all_input_nodes if isinstance(env.get(a), torch.Tensor)]


def placeholder_default(node: fx.Node):
    """The value of an optional model argument after the input: its default (None when it has none)."""
    return node.args[0] if node.args else None


_OUT_OF_PLACE = {
    operator.iadd: operator.add,
    operator.isub: operator.sub,
    operator.imul: operator.mul,
    operator.itruediv: operator.truediv,
}


@dataclass
class GraphPlan(FlatWidths):
    """The captured graph with a rule per node, planned for one per-sample input shape. The Jacobian is
    taken with respect to `input_node`: the model input, or a layer's output (wrt=, see build_graph_plan),
    in which case `model_input` (the placeholder the model is called with) carries no derivative, and
    `input_shape` and `dtype` are the layer output's."""

    gm: fx.GraphModule
    nodes: List[GraphNode]
    input_node: fx.Node
    output_node: fx.Node
    input_shape: Tuple[int, ...]
    output_shape: Tuple[int, ...]
    dtype: torch.dtype
    device: torch.device
    opaque_modules: List[str]
    evaluator: "Evaluator"
    decisions: Dict[int, Tuple[str, dict]] = field(default_factory=dict, init=False)
    # Nodes inside a fused chain (fusion.fuse_interior_chains): computed by the chain's op, not evaluated.
    absorbed: set = field(default_factory=set, init=False)
    model_input: Optional[fx.Node] = None  # None: input_node

    def __post_init__(self):
        if self.model_input is None:
            self.model_input = self.input_node
        self.node_info = {g.node: g for g in self.nodes}
        self._program: Optional[Tuple[List[str], List[Callable]]] = None
        self._slots: Dict[fx.Node, int] = {}
        self._owned: Optional[set] = None  # owns_cotangent's nodes
        self.unencoded: List[str] = []  # nodes without a program encoding (native_program)

    def owns_cotangent(self, node: fx.Node) -> bool:
        """Whether the node's reverse-mode cotangent, when it arrives as a dense block, is held by nothing else,
        so that its rule may overwrite it: the sum of several nodes' contributions (accumulate adds them into a
        new block), or the one contribution of a rule that allocates it, or a view of such a cotangent. Not so
        a residual sum's, which hands one block to each of its inputs, nor what a rule returns for the lazy
        identity seed (a Linear's is its weight, shared by the batch)."""
        if self._owned is None:
            readers = collections.Counter(i for g in self.nodes if g.rule is not None for i in g.inputs)
            self._owned, seeded = set(), {self.output_node}  # seeded: may get the identity seed
            for g in reversed(self.nodes):  # a reader comes after the nodes it reads
                rule = g.rule
                for i in g.inputs if rule is not None else ():
                    allocated = rule.reverse_allocates and g.node not in seeded
                    if readers[i] > 1 or allocated or (rule.reverse_views and g.node in self._owned):
                        self._owned.add(i)
                    elif readers[i] == 1 and g.node in seeded:
                        seeded.add(i)
        return node in self._owned

    def shape_of(self, node: fx.Node) -> Tuple[int, ...]:
        """A carried node's per-sample shape."""
        return self.input_shape if node is self.input_node else self.node_info[node].shape

    def slot_of(self, node: fx.Node) -> int:
        """The value slot of a node in the op's graph program (native_program)."""
        return self._slots[node]

    def native_program(self) -> Optional[Tuple[List[str], List[Callable]]]:
        """The whole graph as one program of torch.ops.jacext.batch_jacobian (csrc/graph.cpp): (entries,
        parameter getters read at every call), or None when a carried node has no encoding (a torch.func
        fallback, attention's products and softmax, a constant or an amount that reads the batch size or a
        sample's values); their names are then in `unencoded`. Built once per plan."""
        if self._program is None and not self.unencoded:
            self._program = self._encode()
        return self._program

    @property
    def wrt_layer(self) -> bool:
        """Whether the Jacobian is taken with respect to a layer's output rather than the model input."""
        return self.model_input is not self.input_node

    def _encode(self):
        if self.wrt_layer:
            # The program's slot 0 is the model input; the layer's output would have to be computed first.
            self.unencoded = [f"{self.input_node.target} (a Jacobian with respect to a layer's output runs eagerly)"]
            return None
        layers: List[str] = []
        getters: List[Callable] = []
        self._slots = {self.input_node: 0}
        for g in self.nodes:
            if g.rule is None:
                continue
            sources = [self._slots[i] for i in g.inputs]
            encoded = g.rule.encode(self, g, () if sources == [len(layers)] else sources)
            if encoded is None:  # recorded; later nodes are still encoded, to name every such node
                self.unencoded.append(g.owner or g.name)
                self._slots[g.node] = len(layers)
                continue
            for text, entry_getters in encoded:
                layers.append(text)
                getters += entry_getters
            self._slots[g.node] = len(layers)
        output_slot = self._slots.get(self.output_node)
        if not self.unencoded and output_slot is not None and (output_slot != len(layers) or not layers):
            # The output is the input itself or an earlier value: a reshape to its own shape ends the program.
            layers.append(entry("reshape", [output_slot], shape=list(self.output_shape)))
        if self.unencoded or output_slot is None:
            self.unencoded = self.unencoded or ["model output (not computed from the input by an encoded node)"]
            return None
        return layers, getters

    @property
    def fallbacks(self) -> List[str]:
        """The modules holding fallback nodes (a torch layer, or the user module a functional call was
        traced in), or the node's name at the top level; each once, in graph order."""
        names = [g.owner or g.name for g in self.nodes if g.rule is not None and not g.rule.native]
        return list(dict.fromkeys(names))

    def describe(self) -> List[str]:
        lines = []
        for g in self.nodes:
            if g.rule is not None:
                lines.append(f"{g.name:<24} {_target_name(self.gm, g.node):<28} {g.describe()}")
        if self.opaque_modules:
            lines.append(f"(not traceable, kept whole: {', '.join(self.opaque_modules)})")
        return lines

    def choose_mode(self, batch: int, requested: str) -> str:
        """Both sweeps apply every node's linear map once per row; rows are D forward and C reverse,
        so the cost model compares the two widths over the summed per-row work of the nodes (the
        forward sweep pays one final transpose of J)."""
        if batch not in self.decisions:
            work = sum(g.rule.work_per_row for g in self.nodes if g.rule is not None)
            costs = {
                "forward": batch * self.in_features * work + batch * self.in_features * self.out_features,
                "reverse": batch * self.out_features * work,
            }
            self.decisions[batch] = ("forward" if costs["forward"] < costs["reverse"] else "reverse", costs)
        # A graph is not a chain: "mixed" (a split of the chain product) is the cheaper sweep here.
        return self.decisions[batch][0] if requested in ("auto", "mixed") else requested

    # ---- execution ----

    def run(self, x: torch.Tensor, mode: str) -> Tuple[torch.Tensor, torch.Tensor]:
        batch = x.shape[0]
        program = self.native_program()
        if program is not None:  # the whole graph in one C++ call
            layers, getters = program
            output, jacobian = ops.batch_jacobian(x, layers, [get() for get in getters], mode)
            if len(self.output_shape) == 1:  # already [B, C] and [B, C, *in_shape]
                return output, jacobian
            return output.reshape(batch, *self.output_shape), jacobian.reshape(batch, *self.output_shape,
                                                                               *self.input_shape)
        like = torch.empty(0, dtype=self.dtype, device=self.device)  # x may be integer-valued (wrt=)
        if mode == "forward":
            output, block = self._forward_sweep(x)
            jacobian = explicit_block(block, batch, self.output_shape, like)  # the identity: output == input
            jacobian = jacobian.reshape(batch, self.in_features, self.out_features).transpose(1, 2)
        else:
            output, block = self._reverse_sweep(x)
            jacobian = explicit_block(block, batch, self.input_shape, like)
        jacobian = jacobian.reshape(batch, *self.output_shape, *self.input_shape)
        return output, jacobian.contiguous()

    def _forward_sweep(self, x: torch.Tensor):
        env: Dict[fx.Node, object] = {self.model_input: x}
        tangents: Dict[fx.Node, object] = {self.input_node: IDENTITY}
        for node in self.gm.graph.nodes:
            if node in env or node.op == "output" or node in self.absorbed:
                continue
            if node.op == "placeholder":
                env[node] = placeholder_default(node)
                continue
            g = self.node_info[node]
            if g.rule is None:
                env[node] = self.evaluator.evaluate(node, env)
            else:
                env[node], tangents[node] = g.rule.forward(self, g, env, [tangents[i] for i in g.inputs])
        out = self.output_node
        if out not in tangents:  # the output does not depend on the input
            return env[out], torch.zeros(x.shape[0], self.in_features, *self.output_shape, dtype=self.dtype,
                                         device=x.device)
        return env[out], tangents[out]

    def _reverse_sweep(self, x: torch.Tensor):
        env = self.evaluator.run(x)
        env[self.model_input] = x
        cotangents: Dict[fx.Node, object] = {self.output_node: IDENTITY}
        for g in reversed(self.nodes):
            if g.rule is None or g.node not in cotangents:
                continue
            pulled = self._pull_back(g, env, cotangents.pop(g.node))
            for source, cotangent in zip(g.inputs, pulled):
                accumulate(cotangents, source, cotangent, env[source])
        block = cotangents.get(self.input_node)
        if block is None:
            block = torch.zeros(x.shape[0], self.out_features, *self.input_shape, dtype=self.dtype, device=x.device)
        return env[self.output_node], block

    def _pull_back(self, g: GraphNode, env, cotangent) -> List:
        """The node's rule in reverse; a Picked cotangent whose box lies within the axes the node maps position
        by position runs the rule on the box of every value involved, and its input cotangents stay Picked."""
        if isinstance(cotangent, Picked) and cotangent.within(0):  # the box is everything
            cotangent = cotangent.dense(env[g.node])
        if not isinstance(cotangent, Picked):
            return g.rule.reverse(self, g, env, cotangent)
        axes = g.rule.position_axes(self, g)
        if not cotangent.within(axes) or any(tuple(env[i].shape[1:1 + axes]) != g.shape[:axes] for i in g.inputs):
            return g.rule.reverse(self, g, env, cotangent.dense())
        box = cotangent.box[:axes]
        on_box = collections.ChainMap({n: env[n][(slice(None), *box)] for n in (*g.inputs, g.node)}, env)
        pulled = g.rule.reverse(self, dataclasses.replace(g, shape=tuple(cotangent.block.shape[2:])), on_box,
                                cotangent.block)
        return [Picked(box, block, env[i].shape[1:]) for i, block in zip(g.inputs, pulled)]


def _output_node(gm: fx.GraphModule) -> fx.Node:
    output = next(n for n in gm.graph.nodes if n.op == "output")
    result = output.args[0]
    if not isinstance(result, fx.Node):
        kind = type(result).__name__
        raise StructuredOutputError(
            f"the model returns a {kind}; a JacobianModule differentiates a single output tensor [B, *out_shape]: "
            "call jx.batch_jacobian(model, x) for a structure of Jacobians, or wrap the model to return one "
            "output, e.g. lambda x: model(x)[0]"
        )
    return result


def _input_node(gm: fx.GraphModule) -> fx.Node:
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    required = [n for n in placeholders if not n.args]
    if len(placeholders) == 0 or len(required) > 1:
        names = ", ".join(n.target for n in required)
        raise TypeError(
            f"the model takes {len(required)} required inputs ({names}); pass them as a tuple, "
            "jx.batch_jacobian(model, (x, y), argnums=...), or wrap the model, e.g. lambda x: model(x, other)"
        )
    return placeholders[0]


def _probe_values(evaluator: Evaluator, x: torch.Tensor) -> Dict[fx.Node, object]:
    with torch.no_grad():
        return evaluator.run(x, name_failures=True)


def _probe_single(evaluator: Evaluator, pair_values: Dict[fx.Node, object], pair: torch.Tensor, index: int):
    """Every node's value for sample `index` of the probe pair alone, each node computed from the pair's
    values of its inputs (that sample's rows): a node is judged on exactly the inputs it had in the pair,
    so last-bit differences upstream (a batched kernel rounds differently) that an ill-conditioned node
    amplifies (a LayerNorm over nearly equal features) do not count against it."""
    own: Dict[fx.Node, object] = {}

    def feed(node, value):
        own[node] = value
        paired = pair_values[node]
        axis = _batch_axis(paired, value)
        return value if axis is None else paired.narrow(axis, index, 1)

    with torch.no_grad():
        evaluator.run(pair[index:index + 1], name_failures=True, feed=feed)
    return own


def _batch_axis(pair, single) -> Optional[int]:
    """The axis of a value that holds the samples: of size 2 for the probe pair and 1 for one sample, every
    other axis alike (the first such axis when the value is batch-first; None when there is none)."""
    if not (_is_float_tensor(pair) and _is_float_tensor(single)) or pair.dim() != single.dim():
        return None
    differing = [axis for axis, (p, s) in enumerate(zip(pair.shape, single.shape)) if p != s]
    if len(differing) == 1 and pair.shape[differing[0]] == 2 and single.shape[differing[0]] == 1:
        return differing[0]
    return None


def _check_per_sample(node: fx.Node, pair, singles, name: str) -> int:
    """A node must map each sample on its own: its value on two samples equals its values on each. Returns
    the axis holding the samples (not always the first: qkv.permute(2, 0, 1, 3) moves it, without mixing)."""
    axes = {_batch_axis(pair, single) for single in singles}
    axis = axes.pop() if len(axes) == 1 else None
    if axis is None:
        shape = list(getattr(pair, "shape", []))
        if _is_float_tensor(pair) and pair.dim() > 0 and pair.shape[0] == 2:
            raise GraphCaptureError(f"node '{name}' changes its per-sample shape with the batch size")
        raise GraphCaptureError(f"node '{name}' does not keep the batch dimension (shape {shape} for 2 samples)")
    if isinstance(pair, FakeTensor):  # planned inside torch.export: shapes only, no values to compare
        return axis
    # A few roundings of the node's own dtype: a batched kernel may sum in another order.
    tolerance = max(1e-4, 16 * torch.finfo(pair.dtype).eps)
    for index, single in enumerate(singles):
        expected, got = single.select(axis, 0).double(), pair.select(axis, index).double()
        scale = max(expected.abs().max().item() if expected.numel() else 0.0, 1.0)
        both_nan = torch.isnan(expected) & torch.isnan(got)
        mismatch = ((expected - got).abs() > tolerance * scale) & ~both_nan
        if bool(mismatch.any()):
            raise GraphCaptureError(f"node '{name}' mixes the samples of a batch (its output for one sample "
                                    "depends on the others), so the graph path cannot split it per sample")
    return axis


def build_graph_plan(captured: Tuple[fx.GraphModule, List[str]], x: torch.Tensor,
                     wrt: Optional[str] = None) -> GraphPlan:
    """Plans a captured model (capture()) for inputs shaped like x [B, *in_shape]; raises GraphCaptureError
    (the caller falls back to the whole model) or TypeError (bad model signature or output). wrt: the path
    of a layer (captured as a leaf) whose output the Jacobian is taken with respect to; x may then hold
    integers (token ids), and everything the model computes from x but not through the layer is a
    per-sample constant."""
    gm, opaque = captured
    model_input, output_node = _input_node(gm), _output_node(gm)
    input_node = model_input if wrt is None else _layer_node(gm, wrt)
    evaluator = Evaluator(gm)
    first = x[:1] if x.shape[0] > 0 else x.new_zeros((1, *x.shape[1:]))
    # A second probe sample unlike the first, so that a node mixing the samples shows; integers (token ids)
    # cannot be moved without leaving their range, so the same sample twice.
    second = x[1:2] if x.shape[0] > 1 else first * 0.5 + 0.25 if x.is_floating_point() else first.clone()
    pair = torch.cat([first, second])
    values = _probe_values(evaluator, pair)
    singles = [_probe_single(evaluator, values, pair, index) for index in range(2)]

    out_value = values[output_node]
    if not isinstance(out_value, torch.Tensor) or out_value.dim() < 1 or out_value.shape[0] != 2:
        shape = list(out_value.shape) if isinstance(out_value, torch.Tensor) else type(out_value).__name__
        raise ValueError(f"the model must keep the batch dimension: 2 samples in gave output {shape}")

    names = _display_names(gm)
    feeds_output = _ancestors(output_node)
    carries: Dict[fx.Node, bool] = {input_node: True}
    nodes: List[GraphNode] = []
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        name = names[node]
        if node is input_node:  # wrt: the layer's output seeds the sweeps; the layer itself has no rule
            _check_layer_output(node, values[node], [s[node] for s in singles], name)
            nodes.append(GraphNode(node, name, None, shape=tuple(values[node].shape[1:]), owner=node.target))
            continue
        sources = [a for a in node.all_input_nodes if carries.get(a, False)]
        value = values[node]
        # A value that no path takes to the output (an RNN's unused h_n, [layers, B, H]) carries no
        # derivative that matters, whatever its layout.
        if not sources or node not in feeds_output:
            nodes.append(GraphNode(node, name, None))
            continue
        if not _is_float_tensor(value):
            # Shapes, integers, masks: no derivative. A tuple of tensors (a module returning several
            # outputs) is differentiated through the getitem nodes that pick from it.
            if isinstance(value, (tuple, list)) and any(_is_float_tensor(v) for v in value):
                carries[node] = True
            nodes.append(GraphNode(node, name, None))
            continue
        differentiable = [a for a in sources if _is_float_tensor(values[a]) or isinstance(values[a], (tuple, list))]
        if not differentiable:
            nodes.append(GraphNode(node, name, None))
            continue
        axis = _check_per_sample(node, value, [s[node] for s in singles], name)
        if axis != 0:
            evaluator.batch_axes[node] = axis
            value = values[node] = value.movedim(axis, 0)  # as the plan stores it (Evaluator.batch_axes)
        carries[node] = True
        rule, inputs = graph_rules.rule_for(gm, node, values, carries, evaluator.batch_axes)
        owner = node.target if node.op == "call_module" else _owner(node)
        if inputs and node.target is operator.getitem and node.args[0] not in inputs:
            producer, _ = fallback.tuple_origin(node, values)  # a pick differentiates its module
            owner = producer.target if producer.op == "call_module" else owner
        nodes.append(GraphNode(node, name, rule, tuple(inputs), tuple(value.shape[1:]), owner))

    input_value = values[input_node] if wrt is not None else x
    return GraphPlan(gm, nodes, input_node, output_node, tuple(input_value.shape[1:]), tuple(out_value.shape[1:]),
                     input_value.dtype, x.device, opaque, evaluator, model_input=model_input)


def _layer_node(gm: fx.GraphModule, path: str) -> fx.Node:
    """The one call of the layer at `path` (captured as a leaf, capture(leaves=...))."""
    calls = [n for n in gm.graph.nodes if n.op == "call_module" and n.target == path]
    if not calls:
        raise ValueError(f"wrt: layer '{path}' does not run in the model's forward (or runs inside a module that "
                         "torch.fx cannot trace), so the output has no derivative with respect to it to take")
    if len(calls) > 1:
        raise NotImplementedError(f"wrt: layer '{path}' runs {len(calls)} times in one forward; which call's output "
                                  "is meant is ambiguous, so a Jacobian with respect to it is not supported")
    return calls[0]


def _check_layer_output(node: fx.Node, pair, singles, name: str) -> None:
    """The wrt layer's output must be one floating-point tensor [B, *shape], computed per sample."""
    if not isinstance(pair, torch.Tensor):
        raise NotImplementedError(f"wrt: layer '{name}' returns a {type(pair).__name__}; a Jacobian with respect "
                                  "to a layer returning one tensor is supported, not several")
    if not pair.is_floating_point():
        raise ValueError(f"wrt: layer '{name}' returns a tensor of dtype {pair.dtype}, which has no derivative")
    if _check_per_sample(node, pair, singles, name) != 0:
        raise NotImplementedError(f"wrt: layer '{name}' returns its samples along axis "
                                  f"{_batch_axis(pair, singles[0])}; a batch-first output [B, *shape] is supported")


def _ancestors(node: fx.Node) -> set:
    """The node and every node its value is computed from."""
    found, pending = set(), [node]
    while pending:
        current = pending.pop()
        if current not in found:
            found.add(current)
            pending += current.all_input_nodes
    return found


def _owner(node: fx.Node) -> str:
    """The path of the innermost module whose forward a traced call came from ("" at the top level)."""
    stack = node.meta.get("nn_module_stack")
    return next(reversed(stack.values()))[0] if stack else ""


def _display_names(gm: fx.GraphModule) -> Dict[fx.Node, str]:
    """call_module nodes by their module path; other nodes by the module they were traced in."""
    names = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            names[node] = node.target
        else:
            owner = _owner(node)
            names[node] = f"{owner}:{node.name}" if owner else node.name
    return names


def warn_whole_model_fallback(reason: str):
    warnings.warn(f"jacobian_ext: the model runs entirely on the torch.func fallback: {reason}", stacklevel=4)
