"""The main job: all per-sample Jacobians [B, 10, 784] of a 784-512-512-10 softmax classifier, checked
against torch.func and timed against the two usual answers."""
import statistics
import time

import torch
from torch import nn

import jacobian_ext as jx


def median_seconds(fn, repeats=5):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def loop_over_outputs(model, x):
    """The classic answer: one backward per output class."""
    x = x.detach().requires_grad_(True)
    y = model(x)
    rows = [torch.autograd.grad(y[:, i].sum(), x, retain_graph=True)[0] for i in range(y.shape[1])]
    return torch.stack(rows, 1)


def main():
    torch.manual_seed(0)
    batch = 256
    model = nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10),
                          nn.Softmax(dim=-1)).eval()
    x = torch.rand(batch, 784)
    jm = jx.compile(model)

    with torch.no_grad():
        y, jacobian = jm(x)
    single = lambda sample: model(sample.unsqueeze(0)).squeeze(0)  # noqa: E731
    reference = torch.func.vmap(torch.func.jacrev(single))(x).detach()
    error = (jacobian - reference).abs().max().item()
    print(jm)
    print(f"J shape: {tuple(jacobian.shape)}   output matches model(x): {torch.allclose(y, model(x))}")
    print(f"max |J - torch.func| = {error:.2e}  (reference max {reference.abs().max().item():.2e}, float32)")

    def ours():
        with torch.no_grad():
            jm(x)

    timings = {
        "jacobian_ext": median_seconds(ours),
        "loop over outputs (autograd.grad x10)": median_seconds(lambda: loop_over_outputs(model, x)),
        "torch.func.vmap(jacrev)": median_seconds(lambda: torch.func.vmap(torch.func.jacrev(single))(x)),
    }
    print(f"\nB={batch}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    for name, seconds in timings.items():
        ratio = seconds / timings["jacobian_ext"]
        print(f"  {name:<40} {seconds * 1e3:8.2f} ms   ({ratio:.2f}x the time of jacobian_ext)")


if __name__ == "__main__":
    main()
