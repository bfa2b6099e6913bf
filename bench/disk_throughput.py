"""Throughput (samples/s) of a dataset job with jacobians_to_disk against the direct call.

    python -m bench.disk_throughput                     # mnist shape (784-512-512-10), 4096 samples
    python -m bench.disk_throughput --samples 8192 --batch-size 512 --runs 5 --threads 1

Rows: the direct call on the whole data at once (J in memory), the direct call batch by batch
(jx.compile, the job's unit of work), and jacobians_to_disk into a fresh directory (full J; the
Frobenius reduction; float16 storage), plus load_jacobians of the full-J result. Median of --runs,
interleaved, each job into a new directory under --dir (default: a temporary one), after one warm-up
of each.
"""
import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

import jacobian_ext as jx

from .cases import CASES, build_model


def _interleaved_medians(calls, runs: int):
    """Median seconds of each call, the calls taking turns (a busy neighbour slows all alike), after
    one warm-up each (planning, first touch of the pages)."""
    times = [[] for _ in calls]
    for call in calls:
        call()
    for _ in range(runs):
        for call, record in zip(calls, times):
            start = time.perf_counter()
            call()
            record.append(time.perf_counter() - start)
    return [statistics.median(record) for record in times]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", default="mnist")
    parser.add_argument("--samples", type=int, default=4096)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where the jobs write (default: a temporary directory)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    case = CASES[args.case]
    model = build_model(case)
    data = torch.randn(args.samples, case.in_features)
    root = Path(args.dir or tempfile.mkdtemp(prefix="jx-disk-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    jm = jx.compile(model)
    counter = iter(range(10**9))

    def job(**options):
        def run():
            out = root / f"job{next(counter)}"
            jx.jacobians_to_disk(model, data, out, batch_size=args.batch_size, progress=False, **options)
            shutil.rmtree(out)
        return run

    loaded = root / "loaded"
    jx.jacobians_to_disk(model, data, loaded, batch_size=args.batch_size, progress=False)

    def by_batch():
        with torch.no_grad():
            for start in range(0, args.samples, args.batch_size):
                jm(data[start:start + args.batch_size])

    def load():
        torch.cat(jx.load_jacobians(loaded, as_shards=True)).sum()  # read every byte

    rows = [
        ("direct, whole data at once", lambda: jx.batch_jacobian(model, data)),
        (f"direct, batches of {args.batch_size}", by_batch),
        ("jacobians_to_disk, full J", job()),
        ("jacobians_to_disk, reduce='frobenius'", job(reduce="frobenius")),
        ("jacobians_to_disk, dtype=float16", job(dtype=torch.float16)),
        ("load_jacobians (full J) + read", load),
    ]
    bytes_j = args.samples * case.out_features * case.in_features * 4
    widths = "-".join(map(str, (case.in_features, *case.hidden, case.out_features)))
    print(f"case {case.name}: {widths}, {args.samples} samples, "
          f"float32, J = {bytes_j / 2**20:.0f} MiB, {torch.get_num_threads()} threads, median of {args.runs}")
    print("| method | seconds | samples/s |\n| --- | --- | --- |")
    for (name, _), seconds in zip(rows, _interleaved_medians([call for _, call in rows], args.runs)):
        print(f"| {name} | {seconds:.3f} | {args.samples / seconds:,.0f} |")
    if args.dir is None:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
