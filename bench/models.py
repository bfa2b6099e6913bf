"""python -m bench.models [--batch B] [--dtype float32|float64] [--out PATH]

Real architectures with random weights on the graph path: for each, the nodes that fall back to
torch.func, and our time against torch.func.vmap(jacrev) and against a multiply-add floor, all measured
side by side (interleaved, median), written as a markdown table (default bench/MODELS.md). Not a test:
nothing asserts a time.

The floor: a reverse sweep runs every layer's input-gradient map once per output row (C rows per sample),
a forward sweep its tangent map once per input row (D rows), and each such pass costs the layer's
forward multiply-adds. So the floor is the multiply-adds of the model's nn.Conv*d and nn.Linear layers,
times B * rows, over the machine's convolution rate, measured in the same process on a dense 3 x 3
convolution (64 to 64 channels, 16 x 16 maps, batch 64). It leaves out attention products, recurrences
and element-wise work, and depthwise convolutions never reach the dense rate, so where those matter the
floor is low; it is not shown for recurrent models."""
import argparse
import copy
import datetime
import math
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

    def with_random_head(vit):
        nn.init.normal_(vit.heads.head.weight)  # zero-initialised by torchvision: J would be 0
        return vit

    def vit_small():
        return with_random_head(torchvision.models.VisionTransformer(
            image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=64, mlp_dim=128, num_classes=10))

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

    class TokenClassifier(nn.Module):
        """A text-style encoder on embedded tokens [B, T, E]: torch's TransformerEncoder, mean-pooled."""

        def __init__(self, width=64, layers=2):
            super().__init__()
            layer = nn.TransformerEncoderLayer(width, 4, 2 * width, dropout=0.0, batch_first=True)
            self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
            self.head = nn.Linear(width, 10)

        def forward(self, x):
            return self.head(self.encoder(x).mean(1))

    class RecurrentClassifier(nn.Module):
        def __init__(self, kind, width=64):
            super().__init__()
            self.rnn = getattr(nn, kind)(32, width, num_layers=2, batch_first=True)
            self.head = nn.Linear(width, 10)

        def forward(self, x):
            out, _ = self.rnn(x)
            return self.head(out[:, -1])

    def torchvision_model(name, **kwargs):
        return lambda: getattr(torchvision.models, name)(num_classes=10, **kwargs)

    def maxvit_small():
        """torchvision's MaxVit (MBConv, window and grid attention with relative-position bias, as in
        maxvit_t) in a configuration for 32 x 32 images: maxvit_t itself needs 224 x 224 inputs."""
        return torchvision.models.MaxVit(input_size=(32, 32), stem_channels=16, partition_size=2,
                                         block_channels=[32, 64], block_layers=[1, 1], head_dim=16,
                                         stochastic_depth_prob=0.0, num_classes=10)

    image = (3, 32, 32)
    # The torchvision classification zoo, one model per family (the smallest), on 32 x 32 images where the
    # architecture accepts them.
    models = {
        "alexnet": torchvision_model("alexnet"),
        "vgg11_bn": torchvision_model("vgg11_bn"),
        "resnet18": torchvision_model("resnet18"),
        "resnext50_32x4d": torchvision_model("resnext50_32x4d"),
        "squeezenet1_1": torchvision_model("squeezenet1_1"),
        "densenet121": torchvision_model("densenet121"),
        "inception_v3": torchvision_model("inception_v3", aux_logits=False, init_weights=False),
        "googlenet": torchvision_model("googlenet", aux_logits=False, init_weights=False),
        "shufflenet_v2_x0_5": torchvision_model("shufflenet_v2_x0_5"),
        "mobilenet_v2": torchvision_model("mobilenet_v2"),
        "mobilenet_v3_small": torchvision_model("mobilenet_v3_small"),
        "mnasnet0_5": torchvision_model("mnasnet0_5"),
        "efficientnet_b0": torchvision_model("efficientnet_b0"),
        "efficientnet_v2_s": torchvision_model("efficientnet_v2_s"),
        "regnet_x_400mf": torchvision_model("regnet_x_400mf"),
        "regnet_y_400mf": torchvision_model("regnet_y_400mf"),
        "vit_b_16": lambda: with_random_head(torchvision.models.vit_b_16(num_classes=10, image_size=32)),
        "convnext_tiny": torchvision_model("convnext_tiny"),
        "swin_t": torchvision_model("swin_t"),
        "swin_v2_t": torchvision_model("swin_v2_t"),
        "maxvit (32 x 32 config)": maxvit_small,
        "vit_small": vit_small,
        "residual_mlp": ResidualMLP,
        "cnn_classifier": cnn_classifier,
    }
    shapes = {name: image for name in models}
    shapes["alexnet"] = (3, 64, 64)  # its features need at least 63 x 63
    shapes["inception_v3"] = (3, 80, 80)  # at least 75 x 75
    try:
        import timm
    except ImportError:  # an optional extra (make bench-peers)
        print("timm is not installed: its models are skipped (make bench-peers installs it)", file=sys.stderr)
    else:
        def timm_model(name, **kwargs):
            return lambda: timm.create_model(name, pretrained=False, num_classes=10, **kwargs)

        small_vit = {"img_size": 32, "patch_size": 8}
        for name, build in {
            "timm vit_tiny": timm_model("vit_tiny_patch16_224", **small_vit),
            "timm deit_tiny": timm_model("deit_tiny_patch16_224", **small_vit),
            "timm mobilenetv3_small_100": timm_model("mobilenetv3_small_100"),
            "timm efficientnet_b0": timm_model("efficientnet_b0"),
            "timm convnext_atto": timm_model("convnext_atto"),
        }.items():
            models[name], shapes[name] = build, image
    for name, build, sample_shape in [  # embedded tokens [T, E] / sequence features [T, F]
        ("transformer_encoder", TokenClassifier, (16, 64)),
        ("lstm_classifier", lambda: RecurrentClassifier("LSTM"), (16, 32)),
        ("gru_classifier", lambda: RecurrentClassifier("GRU"), (16, 32)),
    ]:
        models[name], shapes[name] = build, sample_shape
    return {name: (build, shapes[name]) for name, build in models.items()}


def _peer(model, x):
    """(name, function) of torch.func's answer, vmap(jacrev), timed under torch.no_grad like ours; in grad mode
    where a kernel needs it (the CPU LSTM keeps its backward's workspace only there); the classic loop of
    backward passes, sample by sample, where vmap cannot batch the model at all."""
    def single(sample):
        return model(sample.unsqueeze(0)).squeeze(0)

    batched = torch.func.vmap(torch.func.jacrev(single))

    def in_grad_mode(t):
        with torch.enable_grad():
            return batched(t)

    for name, function in (("vmap(jacrev)", batched), ("vmap(jacrev), grad mode", in_grad_mode)):
        try:
            with torch.no_grad():
                function(x)
            return name, function
        except Exception:  # noqa: BLE001
            continue
    return "autograd loop", lambda t: torch.stack([torch.autograd.functional.jacobian(single, s) for s in t])


def _float64_error(model: nn.Module, x: torch.Tensor) -> float:
    """Our Jacobian's largest difference from torch.func's over its largest entry, both in float64 on a float64
    copy of the model and input: agreement without float32's rounding, which the timed dtype's error mixes in."""
    model64, x64 = copy.deepcopy(model).double(), x.double()
    _, reference = _peer(model64, x64)
    with torch.no_grad():
        ours, theirs = jx.compile(model64)(x64)[1], reference(x64)
    return ((ours - theirs).abs().max() / theirs.abs().max()).item()


def convolution_rate(dtype: torch.dtype) -> float:
    """Multiply-adds per second of a dense 3 x 3 convolution (64 to 64 channels, 16 x 16, batch 64), median."""
    x, weight = torch.randn(64, 64, 16, 16, dtype=dtype), torch.randn(64, 64, 3, 3, dtype=dtype)
    macs = 64 * 64 * 16 * 16 * 64 * 9
    with torch.no_grad():
        torch.nn.functional.conv2d(x, weight, padding=1)
        seconds = statistics.median(seconds_of(lambda: torch.nn.functional.conv2d(x, weight, padding=1), "cpu")
                                    for _ in range(15))
    return macs / seconds


def _layer_macs(model: nn.Module, x: torch.Tensor):
    """Multiply-adds of one sample's forward through the model's Conv/Linear layers, or None for a recurrent
    model or one without such layers."""
    if any(isinstance(m, nn.RNNBase) for m in model.modules()):
        return None
    macs = []

    def count(module, args, output):
        if isinstance(module, nn.Linear):
            macs.append(output.numel() * module.in_features)
        else:  # each output entry: in_channels / groups times the kernel's taps
            macs.append(output.numel() * module.in_channels // module.groups * math.prod(module.kernel_size))

    hooks = [m.register_forward_hook(count) for m in model.modules()
             if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear))]
    try:
        with torch.no_grad():
            model(x[:1])
    finally:
        for hook in hooks:
            hook.remove()
    return sum(macs) or None


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.models", description=__doc__.split("\n\n")[1])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "MODELS.md")
    parser.add_argument("--only", nargs="*", help="run only the models whose name contains one of these")
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    warnings.simplefilter("ignore")  # torch.func's "performance drop" notes for attention
    rate = convolution_rate(dtype)
    print(f"convolution rate {rate / 1e9:.1f} GMAC/s", file=sys.stderr)
    rows = []
    for name, (build, sample_shape) in _models().items():
        if args.only and not any(part in name for part in args.only):
            continue
        torch.manual_seed(0)
        model = build().to(dtype).eval()
        x = torch.randn(args.batch, *sample_shape, dtype=dtype)
        jm = jx.compile(model)
        peer, reference = _peer(model, x)
        with torch.no_grad():
            ours, theirs = jm(x)[1], reference(x)  # ours plans here: the timed first calls below must not
            # include it, since a first call over the budget's slow_call_s decides how few runs are timed
            first = {"ours": seconds_of(lambda: jm(x), "cpu"), peer: seconds_of(lambda: reference(x), "cpu")}
        error = ((ours - theirs).abs().max() / theirs.abs().max()).item()
        plan = jm._last["plan"]
        mode = plan.decisions[args.batch][0]
        with torch.no_grad():
            timings = time_interleaved({"ours": lambda: jm(x), peer: lambda: reference(x)}, first, FULL, "cpu")
        ours_s, peer_s = (statistics.median(timings[k].samples) for k in ("ours", peer))
        macs = _layer_macs(model, x)
        rows_per_sample = plan.out_features if mode == "reverse" else plan.in_features
        floor_s = macs * args.batch * rows_per_sample / rate if macs else None
        fallbacks = jm.fallbacks
        error64 = error if dtype == torch.float64 else _float64_error(model, x)
        rows.append((name, sample_shape, mode, ours_s, peer, peer_s, floor_s, error, error64, fallbacks))
        print(f"{name:<26} {mode:<8} ours {ours_s * 1e3:9.1f} ms  {peer} {peer_s * 1e3:9.1f} ms  "
              f"x{peer_s / ours_s:5.2f}  ours/floor {ours_s / floor_s if floor_s else float('nan'):5.2f}  "
              f"rel. err {error:.1e} (float64 {error64:.1e})  modules with fallback nodes {len(fallbacks)}", file=sys.stderr)

    lines = [
        "# Real models on the graph path (CPU)",
        "",
        f"{datetime.date.today().isoformat()}, {cpu_model()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"Python {platform.python_version()}; `python -m bench.models --batch {args.batch} --dtype {args.dtype}`; "
        f"B = {args.batch}, random weights (timm: its constructors, no download), median of interleaved runs; "
        "error: the largest difference from torch.func's Jacobian over its largest entry, in the timed dtype and "
        "in float64 (the same model and input cast, compiled afresh).",
        "",
        f"floor: the multiply-adds of the model's Conv/Linear layers times B × rows (C reverse, D forward) over the "
        f"measured rate of a dense 3 × 3 convolution, {rate / 1e9:.1f} GMAC/s (module docstring); ours / floor is how "
        "far above it we are.",
        "",
        f"| model | per-sample input | mode | ours | torch.func | speed-up | floor | ours / floor | rel. error ({args.dtype}) | "
        "rel. error (float64) | modules holding fallback nodes |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for name, sample_shape, mode, ours_s, peer, peer_s, floor_s, error, error64, fallbacks in rows:
        shown = ", ".join(f"`{f}`" for f in fallbacks[:6]) + (f" … ({len(fallbacks)} in all)" if len(fallbacks) > 6 else "")
        floor_cells = f"{floor_s * 1e3:.1f} ms | {ours_s / floor_s:.2f}×" if floor_s else "— | —"
        lines.append(f"| {name} | {list(sample_shape)} | {mode} | {ours_s * 1e3:.1f} ms | {peer_s * 1e3:.1f} ms ({peer}) | "
                     f"{peer_s / ours_s:.2f}× | {floor_cells} | {error:.1e} | {error64:.1e} | {shown or 'none'} |")
    if rows:
        speedups = [row[5] / row[3] for row in rows]  # peer_s / ours_s
        lines += ["", f"Geometric mean speed-up over {len(rows)} models: "
                      f"{statistics.geometric_mean(speedups):.2f}× (lowest {min(speedups):.2f}×)."]
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
