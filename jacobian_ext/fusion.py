"""Fusion pass: a captured graph whose derivative-carrying nodes form one chain becomes a chain Plan.

A chain Plan is what the fast machinery runs: the whole-plan op (one C++ call), the small-chain and
masked ReLU kernels, pending scales, the matrix-chain bracketing and every deployment path. Any model
reaches it when its graph is a chain, however it was written: an nn.Sequential, a subclass whose
forward calls its layers and F.relu in turn, a lambda over modules.

Each node of the chain becomes one plan.Step. Its callable maps the previous node's value to its own;
nodes that carry no derivative but feed the node (x.size(0) of a view, a parameter read with get_attr)
are replayed inside it, from the previous value. A graph that is not a chain (fan-out, residual adds,
helpers that read an earlier value) or that holds a node whose native rule exists on the graph path
only (convolutions, norms, permutes) stays a GraphPlan, and fuse_interior_chains turns each maximal run
of chain-encodable nodes inside it into one call of the chain ops (fused_chain_rule).
"""
from typing import Dict, List, Optional, Sequence

import torch
from torch import fx, nn

from . import feature_rules, index_rules, ops
from .graph import GraphNode, GraphPlan, placeholder_default
from .plan import Plan, Step
from .rules import RESHAPE, NativeRule, functional_activation_spec, functional_softmax_layer, native_rule


class NodeFunction:
    """One chain node as a function of the previous node's value, with the value-only nodes that feed
    it replayed in graph order."""

    def __init__(self, plan: GraphPlan, g: GraphNode, helpers: Sequence[fx.Node]):
        self.evaluator, self.node, self.helpers = plan.evaluator, g.node, list(helpers)
        self.source = g.inputs[0]

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        env: Dict[fx.Node, object] = {self.source: hidden}
        for helper in self.helpers:
            env[helper] = placeholder_default(helper) if helper.op == "placeholder" else self.evaluator.evaluate(helper, env)
        return self.evaluator.evaluate(self.node, env)

    def __repr__(self) -> str:
        target = self.node.target
        name = target if isinstance(target, str) else getattr(target, "__name__", str(target))
        return f".{name}()" if self.node.op == "call_method" else f"{name}()"


def chain_plan(graph_plan: GraphPlan, native: bool) -> Optional[Plan]:
    """The chain Plan of a graph plan, or None when the graph is not a chain that the chain Plan runs at
    least as natively as the graph path does. native=False (a dtype without native ops) puts every
    step on the fallback."""
    if graph_plan.wrt_layer:
        return None  # a chain Plan starts at the model input
    carrying = [g for g in graph_plan.nodes if g.rule is not None]
    previous = graph_plan.input_node
    for g in carrying:
        if g.inputs != (previous,):
            return None
        previous = g.node
    if previous is not graph_plan.output_node or not carrying:
        return None
    steps: List[Step] = []
    for g in carrying:
        # Fan-out, value-only readers included: a helper reading an earlier value than its own step's
        # input could not be replayed from that input.
        if sum(user.op != "output" for user in g.node.users) > 1:
            return None
        helpers = _helpers(graph_plan, g)
        if helpers is None:
            return None
        module = _direct_module(graph_plan, g, helpers)
        function = module if module is not None else NodeFunction(graph_plan, g, helpers)
        input_shape = _shape_of(graph_plan, g.inputs[0])
        rule = _native_step_rule(graph_plan, g, module, input_shape) if native else None
        if rule is None and native and g.rule.native:
            return None  # native on the graph path only: the graph runs it better than a fallback step
        name = g.node.target if g.node.op == "call_module" else g.name
        steps.append(Step(name if rule is not None else (g.owner or g.name), function, rule, input_shape, g.shape))
    return Plan(steps, graph_plan.input_shape, graph_plan.output_shape, graph_plan.dtype, graph_plan.device,
                opaque_modules=list(graph_plan.opaque_modules))


def _helpers(graph_plan: GraphPlan, g: GraphNode) -> Optional[List[fx.Node]]:
    """The value-only nodes that `g` needs, in graph order, when each of them depends on nothing but
    parameters, constants, default arguments and g's own input; None otherwise."""
    source = g.inputs[0]
    needed, pending = set(), [a for a in g.node.all_input_nodes if a is not source]
    by_node = graph_plan.node_info
    while pending:
        node = pending.pop()
        if node in needed or node is source:
            continue
        if node in (graph_plan.input_node, graph_plan.model_input) or (node in by_node and by_node[node].rule is not None):
            return None  # reads the model input or another carried value than g's own input
        needed.add(node)
        pending += node.all_input_nodes
    return [n for n in graph_plan.gm.graph.nodes if n in needed]


def _direct_module(graph_plan: GraphPlan, g: GraphNode, helpers) -> Optional[nn.Module]:
    """The module itself when the node is a plain call of it on the previous value."""
    node = g.node
    if node.op == "call_module" and node.args == (g.inputs[0],) and not node.kwargs and not helpers:
        return graph_plan.evaluator.modules[node.target]
    return None


def _shape_of(graph_plan: GraphPlan, node: fx.Node):
    if node is graph_plan.input_node:
        return graph_plan.input_shape
    return graph_plan.node_info[node].shape


def _native_step_rule(graph_plan: GraphPlan, g: GraphNode, module: Optional[nn.Module], input_shape) -> Optional[NativeRule]:
    """The chain op's rule for a node (the same layer kinds the graph's FeatureOpRule and ReshapeRule cover)."""
    if isinstance(g.rule, index_rules.ReshapeRule):
        return RESHAPE
    node = g.node
    if node.op == "call_module":
        return native_rule(module, input_shape) if module is not None else None
    if node.op not in ("call_function", "call_method") or not node.args or node.args[0] is not g.inputs[0]:
        return None
    spec = functional_activation_spec(node.target, node.args, node.kwargs)
    if spec is not None:
        return NativeRule(spec)
    layer = functional_softmax_layer(node.target, node.args, node.kwargs, input_shape)
    return NativeRule(layer) if layer is not None else None


def fused_chain_rule(steps: List[tuple], work_per_row: float) -> feature_rules.FeatureOpRule:
    """A run of chain-encodable nodes inside a graph (the MLP of a residual block, a classifier head) as
    one call of the chain ops, so the small-chain and masked ReLU kernels and pending scales apply there
    as in a chain plan: a feature op like any single layer's. Sits on the run's last node; the run's other
    nodes are absorbed (not evaluated). Parameters are read from the modules at every call."""
    layers = [rule.layer for rule, _ in steps if not rule.is_reshape]

    def params():
        return [p for rule, module in steps for p in rule.params(module)]

    def layers_of():
        getters = [lambda rule=rule, module=module, k=k: rule.params(module)[k]
                   for rule, module in steps for k in range(len(rule.params(module)))]
        return layers, getters

    return feature_rules.FeatureOpRule(
        f"chain [{', '.join(layers)}]",
        lambda x, jac: ops.sequential_jac_forward(x, jac, layers, params()),
        lambda x, out, cotangent: ops.sequential_jac_reverse(x, cotangent, layers, params())[1],
        needs_output=False,
        work_per_row=work_per_row,
        layers_of=layers_of,
    )


def fuse_interior_chains(graph_plan: GraphPlan) -> GraphPlan:
    """Every maximal run of at least two chain-encodable nodes with at least one non-reshape layer, each
    node the only reader of the one before, becomes one fused_chain_rule (in place)."""
    runs, run = [], []
    for g in graph_plan.nodes:
        if g.rule is None:
            continue
        step = _fusable_step(graph_plan, g)
        if step is not None and run and g.inputs == (run[-1][0].node,) and len(run[-1][0].node.users) == 1:
            run.append((g, step))
            continue
        if len(run) >= 2:
            runs.append(run)
        run = [(g, step)] if step is not None else []
    if len(run) >= 2:
        runs.append(run)
    for run in runs:
        steps = [step for _, step in run]
        if sum(not rule.is_reshape for rule, _ in steps) < 2:
            continue  # one layer: its own rule already is the op
        first, last = run[0][0], run[-1][0]
        last.rule = fused_chain_rule(steps, sum(g.rule.work_per_row for g, _ in run))
        last.inputs = first.inputs
        for g, _ in run[:-1]:
            g.rule, g.inputs = None, ()
            graph_plan.absorbed.add(g.node)
    return graph_plan


def _fusable_step(graph_plan: GraphPlan, g: GraphNode):
    """(NativeRule, module) of a node the chain ops can run, or None."""
    if len(g.inputs) != 1 or not (isinstance(g.rule, (feature_rules.FeatureOpRule, index_rules.ReshapeRule))):
        return None
    helpers = _helpers(graph_plan, g)
    if helpers is None or (helpers and not isinstance(g.rule, index_rules.ReshapeRule)):
        return None
    module = _direct_module(graph_plan, g, helpers)
    rule = _native_step_rule(graph_plan, g, module, _shape_of(graph_plan, g.inputs[0]))
    return None if rule is None else (rule, module)
