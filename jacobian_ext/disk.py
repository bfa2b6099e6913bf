"""Dataset-sized jobs: per-sample Jacobians (or reductions of them) streamed to .npy shards with a JSON
manifest, resumable, and split across the ranks of a torchrun job.

Layout of out_dir: shard_000000.npy, shard_000001.npy, ... (shard i holds the results of the i-th
batch of the data, in order) and manifest.json. A shard is written under a hidden temporary name and
renamed when complete, so a shard file that exists is whole; a rerun skips those (after checking
each one's length, which only a crash of the machine before its fsync can cut short). Rank r of a world of
N processes computes the shards i with i % N == r, so the layout does not depend on N.
"""
import hashlib
import json
import math
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, RandomSampler

from . import memory
from .api import MODES, JacobianModule
from .distributed import Ranks

FORMAT = "jacobian_ext.jacobians"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
DEFAULT_BATCH_SIZE = 256
REDUCTIONS = ("frobenius", "per_class_norm")
STORAGE_DTYPES = {"float16": torch.float16, "float32": torch.float32, "float64": torch.float64}


def jacobians_to_disk(model: Callable, data, out_dir: Union[str, os.PathLike], *,
                      targets: Optional[Sequence[int]] = None, reduce: Union[None, str, Callable] = None,
                      batch_size: Optional[int] = None, max_memory=None, dtype=None, mode: str = "auto",
                      progress: bool = True) -> Path:
    """Computes the per-sample Jacobians of model over data and stores them in out_dir; returns out_dir.

    data: a tensor [N, *in_shape], a map-style Dataset of samples (an item that is a tuple or list, such
    as (x, label), contributes its first element), or a DataLoader yielding [n, *in_shape] batches (or
    tuples led by them) in a fixed order; its batches are the shards. Each batch is moved to the device
    and dtype of the model's first floating parameter.
    batch_size: samples per shard for a tensor or Dataset (default 256); a DataLoader brings its own.
    targets: flat indices of the output rows to keep; only those rows are computed (a 0/1 selection
    layer is appended to the model, which every path runs natively). Stored J: [N, len(targets), *in_shape].
    reduce: store a per-sample reduction instead of J: "frobenius" ([N], the norm of each J),
    "per_class_norm" ([N, *out_shape], the norm of each output row) or a callable mapping a chunk of
    J [n, *out, *in] to a tensor [n, ...] (called on chunks of any size).
    dtype: storage dtype (float16, float32 or float64; default: the model's); the computation runs in
    the model's dtype. max_memory, mode: as in batch_jacobian; each shard runs in chunks that fit.
    Rerunning the same call skips the shards already written; a different model (weights included),
    targets, reduce, dtype, batch_size, mode or data length raises ValueError.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(repr(m) for m in MODES)}; got {mode!r}")
    out_dir = Path(out_dir)
    max_memory = memory.parse_max_memory(max_memory)
    storage_dtype = _storage_dtype(dtype)
    reduce_label = _reduce_label(reduce)
    targets = _check_targets(targets)
    source = _Source(data, batch_size)
    ranks = Ranks(_model_device(model))
    try:
        settings = {
            "format": FORMAT, "version": FORMAT_VERSION, "model": _fingerprint(model), "targets": targets,
            "reduce": reduce_label, "dtype": None if storage_dtype is None else _dtype_name(storage_dtype),
            "batch_size": source.batch_size, "mode": mode, "num_samples": source.num_samples,
        }
        ranks.check_same(settings, "job")
        out_dir.mkdir(parents=True, exist_ok=True)
        _check_resumable(out_dir, settings)
        ranks.barrier()  # every rank has read the old manifest before rank 0 replaces it
        if ranks.rank == 0:
            for stale in out_dir.glob(".*.tmp"):  # left by a killed run; no rank writes yet
                stale.unlink()
            _write_json(out_dir / MANIFEST, {**settings, "complete": False})
        ranks.barrier()
        mine = lambda index: index % ranks.world_size == ranks.rank
        with _Job(model, targets, reduce, storage_dtype, mode, max_memory, source.batch_size) as job, \
                _Progress(source.pending_samples(out_dir, mine), enabled=progress and ranks.rank == 0) as bar:
            shards_seen = 0
            for index, size, load in source.shards():
                shards_seen += 1
                path = out_dir / _shard_name(index)
                if not mine(index) or (path.exists() and _is_whole_shard(path, size)):
                    continue
                job.write_shard(load(), path)
                bar.update(size)
        ranks.barrier()
        if ranks.rank == 0:
            _finish_manifest(out_dir, settings, shards_seen, ranks.world_size)
        ranks.barrier()
    finally:
        ranks.close()
    return out_dir


def load_jacobians(out_dir: Union[str, os.PathLike], *, as_shards: bool = False):
    """The stored results of a finished job in dataset order: one tensor [N, ...] (memory-mapped,
    without a copy, when the job has one shard; otherwise concatenated in memory, MemoryError when that
    exceeds half the available RAM) or, with as_shards=True, the list of memory-mapped shard tensors."""
    out_dir = Path(out_dir)
    manifest = _read_manifest(out_dir)
    if manifest is None:
        raise FileNotFoundError(f"{out_dir} holds no {MANIFEST}: not the output of jacobians_to_disk")
    if not manifest.get("complete"):
        done = len(list(out_dir.glob("shard_*.npy")))
        raise ValueError(f"the job in {out_dir} is not finished ({done} shards written); rerun jacobians_to_disk "
                         "with the same arguments to finish it")
    # Copy-on-write maps: torch gets writable arrays (no warning) and writes never reach the files.
    shards = [torch.from_numpy(np.load(out_dir / shard["file"], mmap_mode="c")) for shard in manifest["shards"]]
    if as_shards:
        return shards
    if len(shards) == 1:
        return shards[0]
    total = sum(shard.numel() * shard.element_size() for shard in shards)
    if total > memory.budget(None, torch.device("cpu")):
        raise MemoryError(f"the results in {out_dir} take {total} bytes, more than half the available memory; "
                          "load them with load_jacobians(out_dir, as_shards=True)")
    return torch.cat(shards)


class _Job:
    """Computes and writes one shard at a time; planned on the first shard."""

    def __init__(self, model, targets, reduce, storage_dtype, mode, max_memory, batch_size):
        self.model, self.targets, self.reduce = model, targets, reduce
        self.storage_dtype, self.mode, self.max_memory, self.batch_size = storage_dtype, mode, max_memory, batch_size
        self.jm = None
        self._syncer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="jacobians_to_disk")
        self._sync = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        try:
            self.wait_for_sync()
        finally:
            self._syncer.shutdown()

    def _plan(self, x: torch.Tensor):
        model = self.model
        if self.targets is not None:
            with torch.no_grad():
                out_shape = model(x[:1]).shape[1:]
            model = _select_rows(model, self.targets, math.prod(out_shape), x)
        # The sweep is chosen once, for a whole shard, and every chunk of every shard runs it: the sweep
        # must not depend on the memory available at the time, which sets the chunk size.
        plan = JacobianModule(model, mode=self.mode).plan_for(x)
        self.resolved_mode = plan.choose_mode(self.batch_size or x.shape[0], self.mode)
        # A split bracketing is no mode name: "mixed" finds it again per chunk, the same for equal chunks.
        chunk_mode = self.resolved_mode if isinstance(self.resolved_mode, str) else "mixed"
        self.jm = JacobianModule(model, mode=chunk_mode, max_memory=self.max_memory)
        self.plan = plan

    def write_shard(self, x: torch.Tensor, path: Path):
        x = _to_model(x, self.model)
        if self.jm is None:
            self._plan(x)
        size = x.shape[0]
        chunk = memory.samples_per_chunk(self.plan, self.resolved_mode, size,
                                         memory.budget(self.max_memory, x.device), keep_result=False)
        temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            # Chunks arrive in order, so the .npy is written as a stream: the header (once the first
            # chunk gives the per-sample shape), then each chunk's bytes, then the rename.
            with open(temporary, "wb") as file, torch.no_grad():
                per_sample = None
                for start in range(0, size, chunk):
                    _, jacobian = self.jm(x[start:start + chunk])
                    result = self._reduce(jacobian).to(device="cpu", dtype=self.storage_dtype or jacobian.dtype)
                    if per_sample is None:
                        per_sample = tuple(result.shape[1:])
                        np.lib.format.write_array_header_1_0(file, {
                            "descr": np.lib.format.dtype_to_descr(_numpy_dtype(result.dtype)),
                            "fortran_order": False, "shape": (size, *per_sample)})
                    elif tuple(result.shape[1:]) != per_sample:
                        raise ValueError(f"reduce returned {list(result.shape[1:])} per sample on one chunk and "
                                         f"{list(per_sample)} on another: it must return the same shape on every chunk")
                    file.write(result.contiguous().numpy().data)
            os.replace(temporary, path)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
        # A killed process leaves the page cache behind, so the shard is safe once renamed; the fsync,
        # against a crash of the machine, runs beside the next shard's computation.
        self.wait_for_sync()
        self._sync = self._syncer.submit(_fsync, path)

    def wait_for_sync(self):
        """Waits for the last shard's fsync, raising its error if it failed."""
        if self._sync is not None:
            sync, self._sync = self._sync, None
            sync.result()

    def _reduce(self, jacobian: torch.Tensor) -> torch.Tensor:
        rows = jacobian.shape[0]
        if self.reduce is None:
            return jacobian
        if self.reduce == "frobenius":
            return torch.linalg.vector_norm(jacobian.reshape(rows, -1), dim=1)
        out_shape = self.plan.output_shape
        if self.reduce == "per_class_norm":
            rows_of_j = jacobian.reshape(rows, math.prod(out_shape), -1)
            return torch.linalg.vector_norm(rows_of_j, dim=2).reshape(rows, *out_shape)
        result = self.reduce(jacobian)
        if not isinstance(result, torch.Tensor) or result.dim() == 0 or result.shape[0] != rows:
            got = list(result.shape) if isinstance(result, torch.Tensor) else type(result).__name__
            raise ValueError(f"reduce must map J [n, ...] to a tensor [n, ...] (one row per sample); "
                             f"for n={rows} it returned {got}")
        return result


def _fsync(path: Path):
    with open(path, "rb") as file:
        os.fsync(file.fileno())


def _is_whole_shard(path: Path, size: int) -> bool:
    """Whether a shard file holds `size` samples: a crash of the machine before its fsync can leave a
    renamed file empty or short (a killed process cannot)."""
    try:
        return np.load(path, mmap_mode="r").shape[0] == size
    except (OSError, ValueError):
        return False


class _RowSelection(nn.Module):
    """model followed by a 0/1 Linear keeping the target rows of the flat output: exact (each output
    is one product by 1 plus zeros), and native on the graph path, so only those rows are propagated."""

    def __init__(self, model, selection: nn.Linear):
        super().__init__()
        self.model, self.selection = model, selection

    def forward(self, x):
        return self.selection(self.model(x).flatten(1))


def _select_rows(model, targets: List[int], out_features: int, like: torch.Tensor):
    for index in targets:
        if not 0 <= index < out_features:
            raise ValueError(f"targets must be flat output indices in [0, {out_features}), got {index}")
    selection = nn.Linear(out_features, len(targets), bias=False).to(device=like.device, dtype=like.dtype)
    selection.requires_grad_(False)
    selection.weight.zero_()
    selection.weight[range(len(targets)), targets] = 1
    return _RowSelection(model, selection)


class _Source:
    """The shards of the data: (index, size, load) in order, where load() gives the batch [size, *in]."""

    def __init__(self, data, batch_size: Optional[int]):
        if batch_size is not None and (type(batch_size) is not int or batch_size < 1):
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if isinstance(data, DataLoader):
            if batch_size is not None:
                raise ValueError("batch_size is given by the DataLoader; pass batch_size=None with a DataLoader")
            if isinstance(data.sampler, RandomSampler):
                raise ValueError("the DataLoader shuffles (shuffle=True): results are stored in the order of the "
                                 "batches, which must be the same on every run and every rank")
            self.batch_size = data.batch_size
            self.num_samples = _length(data.dataset)
        elif isinstance(data, torch.Tensor) or (isinstance(data, Dataset) and not isinstance(data, IterableDataset)):
            self.batch_size = batch_size or DEFAULT_BATCH_SIZE
            self.num_samples = len(data)
        elif isinstance(data, IterableDataset):
            self.batch_size = batch_size or DEFAULT_BATCH_SIZE
            self.num_samples = None
            data = DataLoader(data, batch_size=self.batch_size)
        else:
            raise TypeError(f"data must be a tensor, a Dataset or a DataLoader, got {type(data).__name__}")
        if self.num_samples == 0:
            raise ValueError("data holds no samples")
        self.data = data

    def shards(self) -> Iterator[Tuple[int, int, Callable[[], torch.Tensor]]]:
        if isinstance(self.data, DataLoader):
            for index, batch in enumerate(self.data):
                batch = _first(batch)
                yield index, batch.shape[0], lambda batch=batch: batch
            return
        for index, start in enumerate(range(0, self.num_samples, self.batch_size)):
            stop = min(start + self.batch_size, self.num_samples)
            yield index, stop - start, lambda start=start, stop=stop: self._load(start, stop)

    def pending_samples(self, out_dir: Path, mine) -> Optional[int]:
        """Samples this rank still has to compute (None for a DataLoader, whose batches are unknown)."""
        if isinstance(self.data, DataLoader):
            return None
        return sum(min(self.batch_size, self.num_samples - start)
                   for index, start in enumerate(range(0, self.num_samples, self.batch_size))
                   if mine(index) and not (out_dir / _shard_name(index)).exists())

    def _load(self, start: int, stop: int) -> torch.Tensor:
        if isinstance(self.data, torch.Tensor):
            return self.data[start:stop]
        return torch.stack([torch.as_tensor(_first(self.data[i])) for i in range(start, stop)])


def _first(item):
    """A sample or batch, from an item that may be (x, label, ...)."""
    if isinstance(item, (tuple, list)):
        item = item[0]
    if not isinstance(item, (torch.Tensor, np.ndarray)):
        raise TypeError(f"data items must be tensors or tuples led by a tensor, got {type(item).__name__}")
    return torch.as_tensor(item)


def _length(dataset) -> Optional[int]:
    try:
        return len(dataset)
    except TypeError:
        return None


def _to_model(x: torch.Tensor, model) -> torch.Tensor:
    """x on the device and in the dtype of the model's first floating parameter or buffer."""
    if isinstance(model, nn.Module):
        for tensor in (*model.parameters(), *model.buffers()):
            if tensor.is_floating_point():
                return x.to(device=tensor.device, dtype=tensor.dtype)
    return x


def _model_device(model) -> torch.device:
    if isinstance(model, nn.Module):
        for tensor in (*model.parameters(), *model.buffers()):
            return tensor.device
    return torch.device("cpu")


def _fingerprint(model) -> str:
    """sha256 of the model's structure (its repr: layer types and configurations) and of every
    parameter and buffer (name, dtype, shape, bytes). A plain function: its qualified name and code."""
    digest = hashlib.sha256()
    if isinstance(model, nn.Module):
        digest.update(repr(model).encode())
        for name, tensor in (*model.named_parameters(), *model.named_buffers()):
            digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
            digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    else:
        digest.update(_callable_label(model).encode())
    return digest.hexdigest()


def _callable_label(function) -> str:
    code = getattr(function, "__code__", None)
    code_hash = hashlib.sha256(code.co_code + repr(code.co_consts).encode()).hexdigest()[:16] if code else ""
    name = getattr(function, "__qualname__", type(function).__name__)
    return f"{getattr(function, '__module__', '')}.{name}:{code_hash}"


def _reduce_label(reduce) -> Optional[str]:
    if reduce is None or reduce in REDUCTIONS:
        return reduce
    if callable(reduce):
        return "callable:" + _callable_label(reduce)
    raise ValueError(f"reduce must be None, {', '.join(repr(r) for r in REDUCTIONS)} or a callable, got {reduce!r}")


def _check_targets(targets) -> Optional[List[int]]:
    if targets is None:
        return None
    try:
        values = [int(t) for t in targets if not isinstance(t, bool) and int(t) == t]
    except (TypeError, ValueError):
        values = []
    if not values or len(values) != len(targets):
        raise ValueError(f"targets must be a non-empty list of flat output indices, got {targets!r}")
    return values


def _dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def _storage_dtype(dtype) -> Optional[torch.dtype]:
    if dtype is None:
        return None
    name = _dtype_name(dtype)
    if name not in STORAGE_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(STORAGE_DTYPES)} (or None: the model's), got {dtype!r}")
    return STORAGE_DTYPES[name]


def _numpy_dtype(dtype: torch.dtype):
    return torch.empty((), dtype=dtype).numpy().dtype


def _shard_name(index: int) -> str:
    return f"shard_{index:06d}.npy"


def _read_manifest(out_dir: Path) -> Optional[dict]:
    path = out_dir / MANIFEST
    if not path.exists():
        return None
    with open(path) as file:
        return json.load(file)


def _write_json(path: Path, content: dict):
    """Atomic: written to a hidden temporary file, then renamed."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(temporary, "w") as file:
        json.dump(content, file, indent=1)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)


def _check_resumable(out_dir: Path, settings: dict):
    previous = _read_manifest(out_dir)
    if previous is None:
        if any(out_dir.glob("shard_*.npy")):
            raise ValueError(f"{out_dir} holds shards but no {MANIFEST}: not resumable; use an empty directory")
        return
    differing = [key for key in settings if previous.get(key) != settings[key]]
    if differing:
        raise ValueError(f"{out_dir} holds results of another job (different {', '.join(differing)}); "
                         "use another directory, or delete this one to start over")


def _finish_manifest(out_dir: Path, settings: dict, num_shards: int, world_size: int):
    """Records the shards with their sample ranges and marks the job complete, once every shard exists."""
    shards, start, per_sample = [], 0, None
    for index in range(num_shards):
        path = out_dir / _shard_name(index)
        if not path.exists():
            raise RuntimeError(f"shard {path.name} is missing after every rank finished; rerun to complete it")
        array = np.load(path, mmap_mode="r")
        if per_sample is None:
            per_sample = {"shape": list(array.shape[1:]), "dtype": str(array.dtype)}
        elif list(array.shape[1:]) != per_sample["shape"]:
            raise ValueError(f"{path.name} holds results of shape {list(array.shape[1:])}, other shards "
                             f"{per_sample['shape']}: reduce must return the same shape per sample on every chunk")
        shards.append({"file": path.name, "start": start, "end": start + array.shape[0]})
        start += array.shape[0]
    _write_json(out_dir / MANIFEST, {**settings, "complete": True, "samples": start, "result": per_sample,
                                     "world_size": world_size, "shards": shards})


class _Progress:
    """tqdm when installed, else a line on stderr every few seconds; samples, rate and ETA."""

    def __init__(self, total: Optional[int], enabled: bool):
        self.total, self.enabled, self.done = total, enabled, 0
        self.started = self.printed = time.monotonic()
        self.bar = None
        if enabled and total != 0:
            try:
                from tqdm.auto import tqdm
                self.bar = tqdm(total=total, unit="sample", desc="jacobians_to_disk", file=sys.stderr)
            except ImportError:
                pass

    def __enter__(self):
        return self

    def update(self, samples: int):
        self.done += samples
        if self.bar is not None:
            self.bar.update(samples)
        elif self.enabled and (time.monotonic() - self.printed > 5 or self.done == self.total):
            self.printed = time.monotonic()
            rate = self.done / max(self.printed - self.started, 1e-9)
            eta = f", ETA {(self.total - self.done) / rate:.0f} s" if self.total else ""
            print(f"jacobians_to_disk: {self.done}/{self.total or '?'} samples, {rate:.0f} samples/s{eta}",
                  file=sys.stderr)

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.close()
