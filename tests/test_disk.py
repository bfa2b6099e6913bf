"""jacobians_to_disk / load_jacobians: inputs, reductions, targets, storage dtype, resume after a kill,
mismatching reruns, and a torchrun job with two processes against a single-process one."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

import jacobian_ext as jx
from jacobian_ext import disk, memory
import disk_job
from conftest import assert_matches_reference, reference_jacobian

REPO = Path(__file__).resolve().parents[1]
F64 = torch.float64


class Residual(nn.Module):
    """A graph-path model with an N-d output [B, 2, 3]."""

    def __init__(self):
        super().__init__()
        self.first, self.second = nn.Linear(5, 6), nn.Linear(6, 6)

    def forward(self, x):
        h = torch.tanh(self.first(x))
        return (h + torch.relu(self.second(h))).reshape(-1, 2, 3)


def mlp():
    return nn.Sequential(nn.Linear(5, 12), nn.ReLU(), nn.Linear(12, 4), nn.Softmax(-1)).double()


def mapped_file(tensor: torch.Tensor) -> str:
    """The file mapped at the tensor's memory ("" when it is ordinary memory)."""
    address = tensor.data_ptr()
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        low, high = (int(part, 16) for part in fields[0].split("-"))
        if low <= address < high:
            return fields[5] if len(fields) == 6 else ""
    return ""


def files(path: Path):
    return sorted(p.name for p in path.iterdir())


class Pairs(Dataset):
    def __init__(self, x):
        self.x = x

    def __len__(self):
        return len(self.x)

    def __getitem__(self, index):
        return self.x[index], index % 3


@pytest.mark.parametrize("kind", ["tensor", "dataset", "dataloader"])
def test_inputs_give_the_direct_jacobians_in_order(tmp_path, kind):
    model, x = mlp(), torch.randn(23, 5, dtype=F64)
    loader = DataLoader(TensorDataset(x, torch.zeros(23)), batch_size=7)
    data = {"tensor": x, "dataset": Pairs(x), "dataloader": loader}[kind]
    batch_size = None if kind == "dataloader" else 7
    assert jx.jacobians_to_disk(model, data, tmp_path, batch_size=batch_size, progress=False) == tmp_path
    loaded = jx.load_jacobians(tmp_path)
    assert_matches_reference(loaded, jx.batch_jacobian(model, x), F64)
    assert_matches_reference(loaded, reference_jacobian(model, x), F64)
    assert files(tmp_path) == ["manifest.json"] + [f"shard_{i:06d}.npy" for i in range(4)]
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["complete"] and manifest["samples"] == 23 and manifest["batch_size"] == 7
    assert [(s["start"], s["end"]) for s in manifest["shards"]] == [(0, 7), (7, 14), (14, 21), (21, 23)]
    assert manifest["result"] == {"shape": [4, 5], "dtype": "float64"}
    shards = jx.load_jacobians(tmp_path, as_shards=True)
    assert [s.shape[0] for s in shards] == [7, 7, 7, 2]
    assert [Path(mapped_file(s)).name for s in shards] == [f"shard_{i:06d}.npy" for i in range(4)]


def test_one_shard_loads_memory_mapped(tmp_path):
    jx.jacobians_to_disk(mlp(), torch.randn(3, 5, dtype=F64), tmp_path, progress=False)
    loaded = jx.load_jacobians(tmp_path)
    assert mapped_file(loaded).endswith("shard_000000.npy")
    loaded.zero_()  # a copy-on-write map: the file keeps its values
    assert jx.load_jacobians(tmp_path).abs().sum() > 0


def test_reductions(tmp_path):
    model, x = Residual().double(), torch.randn(11, 5, dtype=F64)
    jacobian = jx.batch_jacobian(model, x)  # [11, 2, 3, 5]
    expected = {
        "frobenius": jacobian.reshape(11, -1).norm(dim=1),
        "per_class_norm": jacobian.reshape(11, 2, 3, 5).norm(dim=-1),
        "callable": jacobian.sum(dim=(1, 2)),
    }
    for name, want in expected.items():
        reduce = (lambda j: j.sum(dim=(1, 2))) if name == "callable" else name
        jx.jacobians_to_disk(model, x, tmp_path / name, reduce=reduce, batch_size=4, progress=False)
        assert_matches_reference(jx.load_jacobians(tmp_path / name), want, F64)


def test_bad_reduce(tmp_path):
    x = torch.randn(4, 5, dtype=F64)
    with pytest.raises(ValueError, match="reduce must be"):
        jx.jacobians_to_disk(mlp(), x, tmp_path / "a", reduce="trace", progress=False)
    with pytest.raises(ValueError, match=r"reduce must map J .* returned \[\]"):
        jx.jacobians_to_disk(mlp(), x, tmp_path / "b", reduce=lambda j: j.sum(), progress=False)
    assert not [name for name in files(tmp_path / "b") if name != "manifest.json"]  # no shard, no temporary


def test_a_reduction_of_changing_shape_is_refused(tmp_path):
    model, x = mlp(), torch.randn(4, 5, dtype=F64)
    plan = jx.compile(model).plan_for(x)
    result, work = memory.bytes_per_sample(plan, plan.choose_mode(4, "auto"))
    with pytest.raises(ValueError, match="same shape on every chunk"):  # chunks of 3 and 1
        jx.jacobians_to_disk(model, x, tmp_path, reduce=lambda j: j[:, : j.shape[0]], max_memory=3 * (result + work),
                             progress=False)
    with pytest.raises(ValueError, match="same shape per sample on every chunk"):  # shards of 3 and 1
        jx.jacobians_to_disk(model, x, tmp_path / "b", reduce=lambda j: j[:, : j.shape[0]], batch_size=3,
                             progress=False)


def test_loading_more_than_memory_asks_for_shards(tmp_path, monkeypatch):
    jx.jacobians_to_disk(mlp(), torch.randn(4, 5, dtype=F64), tmp_path, batch_size=2, progress=False)
    monkeypatch.setattr(memory, "available_memory", lambda device: 100)
    with pytest.raises(MemoryError, match="as_shards=True"):
        jx.load_jacobians(tmp_path)
    assert len(jx.load_jacobians(tmp_path, as_shards=True)) == 2


@pytest.mark.parametrize("model", [mlp, lambda: Residual().double()], ids=["sequential", "graph"])
def test_targets_compute_only_the_selected_rows_natively(tmp_path, model):
    model, x = model(), torch.randn(9, 5, dtype=F64)
    targets = [3, 0, 3]
    jacobian = jx.batch_jacobian(model, x).reshape(9, -1, 5)
    jx.jacobians_to_disk(model, x, tmp_path, targets=targets, batch_size=4, progress=False)
    assert_matches_reference(jx.load_jacobians(tmp_path), jacobian[:, targets], F64)
    selected = disk._select_rows(model, targets, jacobian.shape[1], x)
    jm = jx.compile(selected)
    jm(x)
    assert jm.fallbacks == []
    with pytest.raises(ValueError, match=r"targets must be flat output indices in \[0, 4\)"):
        jx.jacobians_to_disk(mlp(), x, tmp_path / "bad", targets=[4], progress=False)
    for bad in ([], [1.5], ["1"], [True]):
        with pytest.raises(ValueError, match="targets must be a non-empty list"):
            jx.jacobians_to_disk(mlp(), x, tmp_path / "bad", targets=bad, progress=False)


def test_storage_dtype(tmp_path):
    model, x = mlp(), torch.randn(6, 5, dtype=F64)
    jx.jacobians_to_disk(model, x, tmp_path, dtype=torch.float16, progress=False)
    loaded = jx.load_jacobians(tmp_path)
    assert loaded.dtype == torch.float16
    assert torch.equal(loaded, jx.batch_jacobian(model, x).half())
    with pytest.raises(ValueError, match="dtype must be one of"):
        jx.jacobians_to_disk(model, x, tmp_path / "b", dtype=torch.bfloat16, progress=False)


def test_inputs_follow_the_model_dtype(tmp_path):
    model, x = mlp(), torch.randn(5, 5)  # float32 data, float64 model
    jx.jacobians_to_disk(model, x, tmp_path, progress=False)
    assert_matches_reference(jx.load_jacobians(tmp_path), jx.batch_jacobian(model, x.double()), F64)


def test_shards_run_in_chunks_under_max_memory(tmp_path, monkeypatch):
    model, x = mlp(), torch.randn(10, 5, dtype=F64)
    plan = jx.compile(model).plan_for(x)
    mode = plan.choose_mode(10, "auto")
    result, work = memory.bytes_per_sample(plan, mode)
    chunks = []
    original = disk.JacobianModule.forward
    monkeypatch.setattr(disk.JacobianModule, "forward",
                        lambda self, part: chunks.append(part.shape[0]) or original(self, part))
    jx.jacobians_to_disk(model, x, tmp_path, max_memory=3 * (result + work), batch_size=10, progress=False)
    assert chunks == [3, 3, 3, 1]
    assert_matches_reference(jx.load_jacobians(tmp_path), jx.batch_jacobian(model, x), F64)
    with pytest.raises(MemoryError, match="needs at least"):
        jx.jacobians_to_disk(model, x, tmp_path / "small", max_memory=100, progress=False)


def test_a_failing_shard_leaves_no_file_and_the_rerun_completes(tmp_path, monkeypatch):
    model, x = mlp(), torch.randn(12, 5, dtype=F64)
    calls = []
    original = disk.JacobianModule.forward

    def fails_on_the_third_chunk(self, part):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(self, part)

    monkeypatch.setattr(disk.JacobianModule, "forward", fails_on_the_third_chunk)
    plan = jx.compile(model).plan_for(x)
    result, work = memory.bytes_per_sample(plan, plan.choose_mode(4, "auto"))
    with pytest.raises(KeyboardInterrupt):  # the second shard fails after writing its first chunk
        jx.jacobians_to_disk(model, x, tmp_path, batch_size=4, max_memory=2 * (result + work), progress=False)
    assert files(tmp_path) == ["manifest.json", "shard_000000.npy"]
    with pytest.raises(ValueError, match="not finished"):
        jx.load_jacobians(tmp_path)
    monkeypatch.setattr(disk.JacobianModule, "forward", original)
    jx.jacobians_to_disk(model, x, tmp_path, batch_size=4, max_memory=2 * (result + work), progress=False)
    assert_matches_reference(jx.load_jacobians(tmp_path), jx.batch_jacobian(model, x), F64)


def test_a_shard_cut_short_is_recomputed(tmp_path):
    model, x = mlp(), torch.randn(10, 5, dtype=F64)
    jx.jacobians_to_disk(model, x, tmp_path, batch_size=4, progress=False)
    expected = jx.load_jacobians(tmp_path).clone()
    shard = tmp_path / "shard_000001.npy"
    shard.write_bytes(shard.read_bytes()[:200])  # as a crash before the fsync may leave it
    untouched = (tmp_path / "shard_000000.npy").stat().st_mtime_ns
    jx.jacobians_to_disk(model, x, tmp_path, batch_size=4, progress=False)
    assert torch.equal(jx.load_jacobians(tmp_path), expected)
    assert (tmp_path / "shard_000000.npy").stat().st_mtime_ns == untouched


def _run(args, **kwargs):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, **kwargs)


def test_a_killed_job_resumes(tmp_path):
    out = tmp_path / "job"
    kill_at = 3 * disk_job.BATCH_SIZE + 2  # while loading the fourth shard
    killed = _run([str(REPO / "tests" / "disk_job.py"), str(out), "--kill-at", str(kill_at)], timeout=120)
    assert killed.returncode == -9, killed.stderr
    assert files(out) == ["manifest.json"] + [f"shard_{i:06d}.npy" for i in range(3)]
    assert not json.loads((out / "manifest.json").read_text())["complete"]
    (out / ".shard_000003.npy.999.tmp").write_bytes(b"half a shard")  # as a kill during a write leaves it
    written = {name: (out / name).stat().st_mtime_ns for name in files(out) if name.startswith("shard")}

    model, data = disk_job.model_and_data()
    log = tmp_path / "resumed.txt"
    jx.jacobians_to_disk(model, disk_job.LoggedSamples(data, log), out, batch_size=disk_job.BATCH_SIZE, progress=False)
    assert sorted(int(i) for i in log.read_text().split()) == list(range(3 * disk_job.BATCH_SIZE, disk_job.SAMPLES))
    assert all((out / name).stat().st_mtime_ns == time for name, time in written.items())
    assert files(out) == ["manifest.json"] + [f"shard_{i:06d}.npy" for i in range(6)]
    assert_matches_reference(jx.load_jacobians(out), jx.batch_jacobian(model, data), F64)


def test_a_rerun_of_another_job_is_refused(tmp_path):
    model, x = mlp(), torch.randn(6, 5, dtype=F64)
    jx.jacobians_to_disk(model, x, tmp_path, batch_size=4, progress=False)
    other = mlp()
    other.load_state_dict(model.state_dict())
    jx.jacobians_to_disk(other, x, tmp_path, batch_size=4, progress=False)  # same weights: the same job
    with torch.no_grad():
        other[0].weight[0, 0] += 1e-12
    changes = [((other, x), {}, "model"), ((model, x), {"targets": [1]}, "targets"),
               ((model, x), {"reduce": "frobenius"}, "reduce"), ((model, x), {"dtype": "float32"}, "dtype"),
               ((model, x), {"batch_size": 3}, "batch_size"), ((model, x[:5]), {}, "num_samples"),
               ((model, x), {"mode": "forward"}, "mode")]
    for args, options, what in changes:
        with pytest.raises(ValueError, match=f"another job \\(different {what}\\)"):
            jx.jacobians_to_disk(*args, tmp_path, **{"batch_size": 4, **options}, progress=False)
    assert_matches_reference(jx.load_jacobians(tmp_path), jx.batch_jacobian(model, x), F64)
    (tmp_path / "manifest.json").unlink()
    with pytest.raises(ValueError, match="holds shards but no manifest.json"):
        jx.jacobians_to_disk(model, x, tmp_path, batch_size=4, progress=False)


def test_bad_data_and_options(tmp_path):
    x = torch.randn(4, 5, dtype=F64)
    loader = DataLoader(TensorDataset(x), batch_size=2)
    with pytest.raises(ValueError, match="batch_size is given by the DataLoader"):
        jx.jacobians_to_disk(mlp(), loader, tmp_path, batch_size=2)
    with pytest.raises(ValueError, match="shuffles"):
        jx.jacobians_to_disk(mlp(), DataLoader(TensorDataset(x), batch_size=2, shuffle=True), tmp_path)
    with pytest.raises(TypeError, match="data must be a tensor, a Dataset or a DataLoader"):
        jx.jacobians_to_disk(mlp(), [x], tmp_path)
    with pytest.raises(ValueError, match="data holds no samples"):
        jx.jacobians_to_disk(mlp(), x[:0], tmp_path)
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        jx.jacobians_to_disk(mlp(), x, tmp_path, batch_size=0)
    with pytest.raises(ValueError, match="mode must be one of"):
        jx.jacobians_to_disk(mlp(), x, tmp_path, mode="sideways")
    with pytest.raises(ValueError, match="max_memory"):
        jx.jacobians_to_disk(mlp(), x, tmp_path, max_memory="lots")
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        jx.load_jacobians(tmp_path / "nothing")
    assert not any(tmp_path.iterdir())


def test_progress_without_tqdm(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)  # import fails: the stderr fallback
    jx.jacobians_to_disk(mlp(), torch.randn(5, 5, dtype=F64), tmp_path, batch_size=2)
    assert "jacobians_to_disk: 5/5 samples" in capsys.readouterr().err


@pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                    reason="torch.distributed with gloo is unavailable")
def test_torchrun_with_two_processes_matches_one(tmp_path):
    job = str(REPO / "tests" / "disk_job.py")
    two = _run(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", job, str(tmp_path / "two")],
               timeout=120)
    assert two.returncode == 0, two.stdout + two.stderr
    single = tmp_path / "single"
    model, data = disk_job.model_and_data()
    jx.jacobians_to_disk(model, data, single, batch_size=disk_job.BATCH_SIZE, progress=False)
    assert torch.equal(jx.load_jacobians(tmp_path / "two"), jx.load_jacobians(single))
    manifests = [json.loads((path / "manifest.json").read_text()) for path in (tmp_path / "two", single)]
    assert manifests[0]["shards"] == manifests[1]["shards"] and manifests[0]["world_size"] == 2
    batch = disk_job.BATCH_SIZE
    for rank in (0, 1):  # rank r loaded exactly the shards i with i % 2 == r
        fetched = sorted(int(i) for i in (tmp_path / f"fetched_rank{rank}.txt").read_text().split())
        assert fetched == [i for i in range(disk_job.SAMPLES) if (i // batch) % 2 == rank]
    assert_matches_reference(jx.load_jacobians(single), reference_jacobian(model, data), F64)
