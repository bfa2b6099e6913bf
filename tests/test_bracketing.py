"""Mixed accumulation order: the matrix-chain dynamic programme (cost.best_bracketing) against an
exhaustive search, every bracketing of a chain executed against torch.func, and mode="mixed" end to end."""
import functools
import itertools
import random

import pytest
import torch
from torch import nn

import jacobian_ext as jx
from jacobian_ext import cost
from jacobian_ext.cost import Bracketing, CostItem
from jacobian_ext.memory import bytes_per_sample, run_within_budget
from jacobian_ext.walker import run_plan
from conftest import (DEVICES, DTYPES, Sin, assert_matches_reference, non_contiguous, penalty_gradients,
                      reference_jacobian)


def hourglass(widths=(48, 48, 4, 48, 48), activation=nn.ReLU):
    """Linear layers with activations between, narrow in the middle: the cheapest order joins a reverse
    sweep from the output down to the narrow layer with the part below it."""
    layers = []
    for index, (width_in, width_out) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(width_in, width_out))
        if index < len(widths) - 2:
            layers.append(activation())
    return nn.Sequential(*layers)


# ---- the dynamic programme ----

def sweep_price(chain, widths, start, stop, mode, batch):
    """One sweep over the cost items `chain` of steps [start, stop), priced with cost.sweep_cost."""
    if mode == "forward":
        return cost.sweep_cost(chain, widths[start], batch) + batch * widths[start] * widths[stop]
    return cost.sweep_cost(reversed(chain), widths[stop], batch)


def exhaustive_best(step_items, widths, batch):
    """The cheapest bracketing's cost by enumerating every binary tree over the steps, with each leaf
    priced as a whole sweep (cost.sweep_cost), independently of best_bracketing's incremental tables."""
    flat = [list(items) for items in step_items]

    def items_of(start, stop):
        return [item for items in flat[start:stop] for item in items]

    @functools.lru_cache(maxsize=None)
    def best(start, stop):
        chain = items_of(start, stop)
        costs = [sweep_price(chain, widths, start, stop, mode, batch) for mode in ("forward", "reverse")]
        per_sample = any(item.kind != "linear" for item in chain)
        for split in range(start + 1, stop):
            join = widths[stop] * widths[split] * widths[start] * (batch if per_sample else 1)
            costs.append(best(start, split) + best(split, stop) + join)
        return min(costs)

    return best(0, len(flat))


def priced(node: Bracketing, step_items, widths, batch) -> float:
    """A returned tree's cost recomputed from its shape."""
    if node.is_sweep:
        chain = [item for items in step_items[node.start:node.stop] for item in items]
        return sweep_price(chain, widths, node.start, node.stop, node.mode, batch)
    split = node.earlier.stop
    per_sample = any(item.kind != "linear" for items in step_items[node.start:node.stop] for item in items)
    join = widths[node.stop] * widths[split] * widths[node.start] * (batch if per_sample else 1)
    return priced(node.earlier, step_items, widths, batch) + priced(node.later, step_items, widths, batch) + join


def random_chain(rng: random.Random):
    steps = rng.randint(1, 7)
    widths = [rng.choice([1, 2, 3, 8, 32, 200, 512])]
    step_items = []
    for _ in range(steps):
        kind = rng.choice(["linear", "linear", "rowwise", "fallback", "reshape"])
        width_in = widths[-1]
        width_out = rng.choice([1, 4, 16, 64, 300, 512]) if kind in ("linear", "fallback") else width_in
        step_items.append([] if kind == "reshape" else [CostItem(kind, width_in, width_out, rng.choice([1.0, 3.0]))])
        widths.append(width_out)
    return step_items, widths


@pytest.mark.parametrize("seed", range(40))
def test_dynamic_programme_finds_the_cheapest_bracketing(seed):
    rng = random.Random(seed)
    step_items, widths = random_chain(rng)
    batch = rng.choice([1, 7, 256])
    best = cost.best_bracketing(step_items, widths, batch)
    assert best.cost == pytest.approx(exhaustive_best(step_items, widths, batch), rel=1e-12)
    assert best.cost == pytest.approx(priced(best, step_items, widths, batch), rel=1e-12)
    assert (best.start, best.stop) == (0, len(step_items))
    sweeps = best.sweeps()  # the parts tile the chain in input order
    assert [s.start for s in sweeps] == [0] + [s.stop for s in sweeps[:-1]] and sweeps[-1].stop == len(step_items)


def test_a_narrow_middle_layer_splits_the_chain_at_it():
    jm = jx.compile(hourglass((512, 512, 32, 512, 512)))
    plan = jm.plan_for(torch.randn(2, 512))
    chosen = plan.choose_mode(64, "auto")
    assert isinstance(chosen, Bracketing)
    assert chosen.earlier.stop in (3, 4)  # at the 32-wide layer's output, before or after its ReLU
    _, costs, _ = plan.decisions[64]
    assert costs["mixed"] < costs["reverse"] / 5 and costs["mixed"] < costs["forward"] / 5


def test_a_narrow_first_layer_keeps_the_reverse_sweep():
    # D=512 -> 32 -> 512 -> C=512: the reverse sweep already multiplies by the narrow layer last (the lazy
    # identity makes the first layer's factor free), so a split saves only activation passes, not GEMMs.
    plan = jx.compile(hourglass((512, 32, 512, 512))).plan_for(torch.randn(2, 512))
    assert plan.choose_mode(64, "auto") == "reverse"
    _, costs, best = plan.decisions[64]
    assert best.cost > 0.95 * costs["reverse"]


@pytest.mark.parametrize("middle, splits", [(48, False), (24, True)])
def test_auto_splits_only_for_a_clear_saving(middle, splits):
    # A 48-wide middle saves 10% of the reverse sweep's multiply-adds, under the extra calls' cost; 24 saves 36%.
    plan = jx.compile(hourglass((64, 64, middle, 64, 64))).plan_for(torch.randn(2, 64))
    auto = plan.choose_mode(8, "auto")
    _, costs, best = plan.decisions[8]
    assert not best.is_sweep and plan.choose_mode(8, "mixed") is best
    assert (best.cost <= cost.SPLIT_MARGIN * costs["reverse"]) == splits
    assert auto is best if splits else auto == "reverse"


# ---- every bracketing executes to the same Jacobian ----

def all_bracketings(start, stop):
    for mode in ("forward", "reverse"):
        yield Bracketing(start, stop, 0.0, mode)
    for split in range(start + 1, stop):
        for earlier, later in itertools.product(all_bracketings(start, split), all_bracketings(split, stop)):
            yield Bracketing(start, stop, 0.0, None, earlier, later)


def mixed_chain():
    """Every kind of step a chain can hold: an N-d input and a Flatten (reshape step), fused layers, a
    fallback module, a softmax head."""
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 7), nn.Tanh(), Sin(), nn.Linear(7, 5), nn.Softmax(-1))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch", [0, 1, 5])
def test_every_bracketing_of_a_chain_gives_the_jacobian(device, dtype, batch):
    model = mixed_chain().to(device=device, dtype=dtype).eval()
    x = torch.randn(batch, 3, 4, device=device, dtype=dtype)
    plan = jx.compile(model).plan_for(x)
    expected = reference_jacobian(model, x)
    trees = list(all_bracketings(0, len(plan.steps)))
    assert len(trees) > 300  # 6 steps: every tree with every choice of sweep per part
    for tree in random.Random(0).sample(trees, 60) + [t for t in trees if t.is_sweep]:
        output, jacobian = run_plan(plan, x, tree)
        assert jacobian.shape == (batch, 5, 3, 4), str(tree)
        assert_matches_reference(output, model(x), dtype)
        assert_matches_reference(jacobian, expected, dtype)


# ---- mode="mixed" through the public API ----

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch", [0, 1, 6])
@pytest.mark.parametrize("activation", [nn.ReLU, nn.Tanh])
def test_mixed_mode_matches_torch_func(device, dtype, batch, activation):
    model = hourglass(activation=activation).to(device=device, dtype=dtype).eval()
    x = non_contiguous(torch.randn(batch, 48, device=device, dtype=dtype))
    jm = jx.compile(model, mode="mixed")
    y, jacobian = jm(x)
    assert isinstance(jm.plan_for(x).choose_mode(batch, "mixed"), Bracketing) == (batch > 0)  # B=0: nothing to save
    assert_matches_reference(y, model(x), dtype)
    assert_matches_reference(jacobian, reference_jacobian(model, x), dtype)
    auto_y, auto_jacobian = jx.compile(model)(x)  # auto takes the same split here: the saving is large
    assert torch.equal(auto_jacobian, jacobian)
    if batch:
        assert "split (" in repr(jm)


def test_mixed_mode_with_a_fallback_part_and_a_nested_sequential():
    model = nn.Sequential(nn.Linear(40, 40), Sin(), nn.Sequential(nn.Linear(40, 3), nn.Tanh()),
                          nn.Linear(3, 40), nn.ReLU(), nn.Linear(40, 40)).double()
    x = torch.randn(4, 40, dtype=torch.float64)
    jm = jx.compile(model, mode="mixed")
    assert isinstance(jm.plan_for(x).choose_mode(4, "mixed"), Bracketing)
    assert_matches_reference(jm(x)[1], reference_jacobian(model, x), torch.float64)
    assert jm.fallbacks == ["1"]


def test_gradients_flow_through_a_split_bracketing():
    model = hourglass((10, 10, 2, 10, 10), activation=nn.Tanh).double()
    x = torch.randn(3, 10, dtype=torch.float64, requires_grad=True)
    jm = jx.compile(model, mode="mixed")
    assert isinstance(jm.plan_for(x).choose_mode(3, "mixed"), Bracketing)
    penalty = lambda jacobian: jacobian.pow(2).sum()  # noqa: E731
    penalty(jm(x)[1]).backward()
    input_grad, param_grads = penalty_gradients(model, x, penalty)
    assert_matches_reference(x.grad, input_grad, torch.float64)
    for name, parameter in model.named_parameters():
        assert_matches_reference(parameter.grad, param_grads[name], torch.float64)


def test_a_split_bracketing_runs_in_chunks_under_a_memory_budget():
    model = hourglass().double()
    x = torch.randn(9, 48, dtype=torch.float64)
    plan = jx.compile(model).plan_for(x)
    bracketing = plan.choose_mode(9, "mixed")
    whole = run_plan(plan, x, bracketing)
    result, work = bytes_per_sample(plan, bracketing)
    assert work >= 48 * 48 * 8  # holds at least the parts' and the joins' Jacobians
    chunked = run_within_budget(plan, x, bracketing, max_memory=4 * (result + work))
    for part, reference in zip(chunked, whole):
        assert_matches_reference(part, reference, torch.float64)


def test_traced_graphs_run_the_cheaper_sweep_for_mixed():
    model = hourglass((64, 64, 4, 64, 64)).eval()
    x = torch.randn(5, 64)
    exported = torch.export.export(jx.compile(model, mode="mixed"), (x,))
    ops = [node.target for node in exported.graph.nodes if node.op == "call_function"]
    assert torch.ops.jacext.batch_jacobian.default in ops
    assert_matches_reference(exported.module()(x)[1], reference_jacobian(model, x), torch.float32)


def test_jacobians_to_disk_with_a_split_bracketing(tmp_path):
    model = hourglass().double()
    x = torch.randn(10, 48, dtype=torch.float64)
    assert isinstance(jx.compile(model).plan_for(x).choose_mode(4, "auto"), Bracketing)
    jx.jacobians_to_disk(model, x, tmp_path / "out", batch_size=4, max_memory="64KiB")  # chunks within shards
    assert_matches_reference(jx.load_jacobians(tmp_path / "out"), reference_jacobian(model, x), torch.float64)
