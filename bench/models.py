"""python -m bench.models [--batch B] [--dtype float32|float64] [--out PATH]

Real architectures with random weights on the graph path: for each, the nodes that fall back to
torch.func, and our time against torch.func.vmap(jacrev) measured side by side (interleaved, median),
written as a markdown table (default bench/MODELS.md). Not a test: nothing asserts a time."""
import argparse
import datetime
import platform
import statistics
import sys
import warnings
from pathlib import Path

import torch
from torch import nn

import jacobian_ext as jx

from .report import cpu_model
from .timing import FULL, seconds_of, time_interleaved

BENCH_DIR = Path(__file__).resolve().parent


def _models():
    import torchvision

    def vit_small():
        model = torchvision.models.VisionTransformer(
            image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=64, mlp_dim=128, num_classes=10)
        nn.init.normal_(model.heads.head.weight)  # zero-initialised by torchvision
        return model

    class ResidualMLP(nn.Module):
        def __init__(self, width=256, depth=4):
            super().__init__()
            self.stem = nn.Linear(3 * 32 * 32, width)
            self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width))
                                        for _ in range(depth))
            self.head = nn.Linear(width, 10)

        def forward(self, x):
            h = self.stem(x.flatten(1))
            for block in self.blocks:
                h = h + block(h)
            return self.head(torch.relu(h))

    def cnn_classifier():
        return nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d((4, 4)), nn.Flatten(),
            nn.Linear(512, 10), nn.Softmax(dim=-1))

    return {
        "resnet18": lambda: torchvision.models.resnet18(num_classes=10),
        "mobilenet_v3_small": lambda: torchvision.models.mobilenet_v3_small(num_classes=10),
        "efficientnet_b0": lambda: torchvision.models.efficientnet_b0(num_classes=10),
        "convnext_tiny": lambda: torchvision.models.convnext_tiny(num_classes=10),
        "regnet_y_400mf": lambda: torchvision.models.regnet_y_400mf(num_classes=10),
        "densenet121": lambda: torchvision.models.densenet121(num_classes=10),
        "googlenet": lambda: torchvision.models.googlenet(num_classes=10, aux_logits=False, init_weights=False),
        "shufflenet_v2_x0_5": lambda: torchvision.models.shufflenet_v2_x0_5(num_classes=10),
        "vit_small": vit_small,
        "residual_mlp": ResidualMLP,
        "cnn_classifier": cnn_classifier,
    }


def _vmap_jacrev(model):
    def single(sample):
        return model(sample.unsqueeze(0)).squeeze(0)

    return torch.func.vmap(torch.func.jacrev(single))


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.models", description=__doc__.split("\n\n")[1])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "MODELS.md")
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    warnings.simplefilter("ignore")  # torch.func's "performance drop" notes for attention
    rows = []
    for name, build in _models().items():
        torch.manual_seed(0)
        model = build().to(dtype).eval()
        x = torch.randn(args.batch, 3, 32, 32, dtype=dtype)
        jm = jx.compile(model)
        reference = _vmap_jacrev(model)
        with torch.no_grad():
            first = {"ours": seconds_of(lambda: jm(x), "cpu"), "vmap(jacrev)": seconds_of(lambda: reference(x), "cpu")}
            ours, theirs = jm(x)[1], reference(x)
        error = ((ours - theirs).abs().max() / theirs.abs().max()).item()
        with torch.no_grad():
            timings = time_interleaved({"ours": lambda: jm(x), "vmap(jacrev)": lambda: reference(x)}, first, FULL, "cpu")
        ours_s, peer_s = (statistics.median(timings[k].samples) for k in ("ours", "vmap(jacrev)"))
        plan = jm._last["plan"]
        mode = plan.decisions[args.batch][0]
        fallbacks = jm.fallbacks
        rows.append((name, mode, ours_s, peer_s, error, fallbacks))
        print(f"{name:<20} {mode:<8} ours {ours_s * 1e3:9.1f} ms  vmap(jacrev) {peer_s * 1e3:9.1f} ms  "
              f"x{peer_s / ours_s:5.2f}  rel. err {error:.1e}  modules with fallback nodes {len(fallbacks)}", file=sys.stderr)

    lines = [
        "# Real models on the graph path (CPU)",
        "",
        f"{datetime.date.today().isoformat()}, {cpu_model()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"Python {platform.python_version()}; `python -m bench.models --batch {args.batch} --dtype {args.dtype}`; "
        f"input [{args.batch}, 3, 32, 32], random weights, median of interleaved runs.",
        "",
        "| model | mode | ours | vmap(jacrev) | speed-up | max rel. error | modules holding fallback nodes |",
        "| --- | --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for name, mode, ours_s, peer_s, error, fallbacks in rows:
        shown = ", ".join(f"`{f}`" for f in fallbacks[:6]) + (f" … ({len(fallbacks)} in all)" if len(fallbacks) > 6 else "")
        lines.append(f"| {name} | {mode} | {ours_s * 1e3:.1f} ms | {peer_s * 1e3:.1f} ms | {peer_s / ours_s:.2f}× | "
                     f"{error:.1e} | {shown or 'none'} |")
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
