"""max_memory: chunked runs equal the whole-batch run, the size parser, and budget errors."""
import pytest
import torch
from torch import nn

import jacobian_ext as jx
from jacobian_ext import memory
from conftest import DEVICES, Sin, assert_matches_reference, non_contiguous, reference_jacobian


class Residual(nn.Module):
    """A graph-path model: fan-out, a residual add, a conv and a reshape."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(2, 3, 3, padding=1)
        self.inner = nn.Linear(18, 18)
        self.head = nn.Linear(18, 5)

    def forward(self, x):  # x [B, 2, 6]
        h = torch.tanh(self.conv(x)).flatten(1)
        return self.head(h + torch.relu(self.inner(h)))


MODELS = {
    "native_mlp": (lambda: nn.Sequential(nn.Linear(7, 16), nn.ReLU(), nn.Linear(16, 9), nn.Softmax(-1)), (7,)),
    "segments_with_fallback": (lambda: nn.Sequential(nn.Linear(4, 12), Sin(), nn.Linear(12, 3)), (4,)),
    "graph": (Residual, (2, 6)),
}


def budget_for_chunk(model, x, mode, chunk):
    """A max_memory under which a batch like x runs in chunks of exactly `chunk` samples."""
    plan = jx.compile(model).plan_for(x)
    result, work = memory.bytes_per_sample(plan, mode)
    return x.shape[0] * result + chunk * work


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("mode", ["forward", "reverse"])
@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("batch_chunk", [(13, 4), (5, 1), (1, 1)])
def test_chunked_equals_whole_batch(device, dtype, mode, name, batch_chunk):
    build, in_shape = MODELS[name]
    batch, chunk = batch_chunk
    model = build().to(device=device, dtype=dtype)
    x = non_contiguous(torch.randn(batch, *in_shape, device=device, dtype=dtype))
    y, jacobian = jx.batch_jacobian(model, x, mode=mode, return_output=True)
    max_memory = budget_for_chunk(model, x, mode, chunk)
    jm = jx.compile(model, mode=mode, max_memory=max_memory)
    calls = []
    original = memory.run_plan
    try:
        memory.run_plan = lambda p, part, m: calls.append(part.shape[0]) or original(p, part, m)
        y_chunked, jacobian_chunked = jm(x)
    finally:
        memory.run_plan = original
    expected_chunks = [chunk] * (batch // chunk) + ([batch % chunk] if batch % chunk else [])
    assert calls == expected_chunks
    # Not bit for bit: the forward pass's GEMMs (BLAS) may round differently for another number of
    # rows (M = 1 takes a GEMV path), and activation derivatives and softmax rules read those values.
    assert_matches_reference(y_chunked, y, dtype)
    assert_matches_reference(jacobian_chunked, jacobian, dtype)
    assert jacobian_chunked.is_contiguous()
    assert_matches_reference(jacobian_chunked, reference_jacobian(model, x), dtype)


def test_auto_mode_is_resolved_once_for_the_whole_batch():
    # Wide input, narrow output: the cost model picks reverse for the batch; every chunk must run
    # that same sweep (a per-chunk choice could differ and change the last bits).
    model = nn.Sequential(nn.Linear(30, 8), nn.Tanh(), nn.Linear(8, 2)).double()
    x = torch.randn(9, 30, dtype=torch.float64)
    jm = jx.compile(model)
    mode = jm.plan_for(x).choose_mode(9, "auto")
    seen = []
    original = memory.run_plan
    try:
        memory.run_plan = lambda p, part, m: seen.append(m) or original(p, part, m)
        jm.max_memory = budget_for_chunk(model, x, mode, 2)
        _, jacobian = jm(x)
    finally:
        memory.run_plan = original
    assert seen == [mode] * 5
    assert_matches_reference(jacobian, jx.batch_jacobian(model, x), torch.float64)


def test_default_budget_follows_available_memory(monkeypatch):
    model = nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 4)).double()
    x = torch.randn(20, 6, dtype=torch.float64)
    expected = jx.batch_jacobian(model, x, mode="reverse")
    plan = jx.compile(model).plan_for(x)
    result, work = memory.bytes_per_sample(plan, "reverse")
    # Half the available memory is the budget: this leaves room for chunks of 3. (Needs this small are taken
    # to fit without a look at the available memory, unless that threshold is lowered.)
    monkeypatch.setattr(memory, "_ALWAYS_FITS_BYTES", 0)
    monkeypatch.setattr(memory, "available_memory", lambda device: 2 * (20 * result + 3 * work))
    chunks = []
    original = memory.run_plan
    monkeypatch.setattr(memory, "run_plan", lambda p, part, m: chunks.append(part.shape[0]) or original(p, part, m))
    assert_matches_reference(jx.batch_jacobian(model, x, mode="reverse"), expected, torch.float64)
    assert chunks == [3] * 6 + [2]


def test_a_small_call_does_not_read_the_available_memory(monkeypatch):
    def unreadable(device):
        raise AssertionError("available memory read")

    monkeypatch.setattr(memory, "available_memory", unreadable)
    model = nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 4)).double()
    x = torch.randn(20, 6, dtype=torch.float64)
    assert_matches_reference(jx.batch_jacobian(model, x), reference_jacobian(model, x), torch.float64)


def test_available_memory_is_positive_and_cached():
    first = memory.available_memory(torch.device("cpu"))
    assert first > 0
    assert memory.available_memory(torch.device("cpu")) == first


def test_estimate_covers_the_result_and_is_cached():
    model = nn.Sequential(nn.Linear(5, 40), nn.ReLU(), nn.Linear(40, 3))
    plan = jx.compile(model).plan_for(torch.randn(2, 5))
    result, work = memory.bytes_per_sample(plan, "forward")
    assert result == 4 * (3 + 3 * 5)
    assert work >= 4 * (3 * 5 + 2 * 5 * 40)  # J, and a forward block [D, 40] held twice
    assert memory.bytes_per_sample(plan, "forward") == (result, work)
    assert set(plan._bytes_per_sample) == {"forward"}


@pytest.mark.parametrize("mode", ["forward", "reverse"])
def test_segment_estimate_never_counts_the_lazy_identity_seed(mode):
    # The fused segments never build a [D, D] forward seed or [C, C] reverse seed; counting one would
    # make a wide input (D = 100,000: 40 GB) or a tall output look impossible. (The graph path counts
    # it: its index-map rules materialise the identity they receive.)
    wide = nn.Sequential(nn.Linear(100_000, 8), nn.ReLU(), nn.Linear(8, 3))
    tall = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 100_000))
    for model, in_features in ((wide, 100_000), (tall, 3)):
        plan = jx.compile(model).plan_for(torch.randn(2, in_features))
        result, work = memory.bytes_per_sample(plan, mode)
        assert work <= 8 * result + 4 * 10**6


@pytest.mark.parametrize("text, expected", [
    (1000, 1000), (2.5e3, 2500), ("1000", 1000), ("2GB", 2 * 10**9), ("2 gb", 2 * 10**9), ("512MiB", 512 * 2**20),
    ("1.5 GB", 1_500_000_000), ("1.5GiB", 3 * 2**29), ("64kB", 64_000), ("3 KiB", 3072), ("7b", 7), (" 1TB ", 10**12),
    (".5MB", 500_000), (None, None),
])
def test_max_memory_parsing(text, expected):
    assert memory.parse_max_memory(text) == expected


@pytest.mark.parametrize("bad", ["", "abc", "2XB", "GB", "1.2.3GB", "-1GB", "0", 0, -5, 0.4, float("nan"),
                                 float("inf")])
def test_max_memory_garbage_zero_or_negative_is_a_value_error(bad):
    with pytest.raises(ValueError, match="max_memory"):
        jx.compile(nn.Linear(2, 2), max_memory=bad)


@pytest.mark.parametrize("bad", [True, [1], b"1GB"])
def test_max_memory_of_another_type_is_a_type_error(bad):
    with pytest.raises(TypeError, match="max_memory"):
        jx.batch_jacobian(nn.Linear(2, 2), torch.randn(1, 2), max_memory=bad)


def test_a_sample_that_cannot_fit_names_the_size_needed():
    model = nn.Sequential(nn.Linear(50, 50), nn.ReLU(), nn.Linear(50, 50))
    x = torch.randn(4, 50)
    with pytest.raises(MemoryError, match=r"needs at least .*bytes.* max_memory is 1000 bytes"):
        jx.batch_jacobian(model, x, max_memory=1000)
    # The result alone is 4 x 50 x 50 floats: no chunking can help when it exceeds the budget.
    with pytest.raises(MemoryError, match="y and J for 4 samples"):
        jx.batch_jacobian(model, x, max_memory="40kB")


def test_empty_batch_under_a_budget():
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh())
    y, jacobian = jx.batch_jacobian(model, torch.randn(0, 3), max_memory=1, return_output=True)
    assert y.shape == (0, 4) and jacobian.shape == (0, 4, 3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_chunked_run_stays_within_the_budget():
    model = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 32)).cuda()
    x = torch.randn(512, 256, device="cuda")
    expected = jx.batch_jacobian(model, x, mode="reverse")
    max_memory = 3 * expected.numel() * expected.element_size() // 2
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    baseline = torch.cuda.memory_allocated() - expected.numel() * expected.element_size()
    jacobian = jx.batch_jacobian(model, x, mode="reverse", max_memory=max_memory)
    torch.cuda.synchronize()
    assert torch.equal(jacobian, expected)
    assert torch.cuda.max_memory_allocated() - baseline <= max_memory
