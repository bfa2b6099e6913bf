"""The benchmark cases: the guide's public suite plus extra shapes, built as float32 eval-mode MLPs."""
from dataclasses import dataclass
from typing import Dict, List, Tuple

import torch
from torch import nn

ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh}
DEVICES = ("cpu", "cuda")  # the choices of --device


@dataclass(frozen=True)
class Case:
    name: str
    batch: int
    in_features: int
    hidden: Tuple[int, ...]
    out_features: int
    activation: str = "relu"
    softmax_head: bool = False
    note: str = ""
    default_devices: Tuple[str, ...] = DEVICES  # where a run without --cases includes it

    @property
    def hidden_text(self) -> str:
        return ",".join(str(width) for width in self.hidden)


SUITE = [
    Case("tiny", 1, 16, (64, 64), 4, note="latency"),
    Case("small", 8, 64, (128, 128), 10, softmax_head=True, note="latency, softmax head"),
    Case("mnist", 256, 784, (512, 512), 10, note="GEMM-bound"),
    Case("deep", 64, 784, (1024, 1024, 1024), 10, note="GEMM-bound"),
    Case("pinn", 1024, 2, (64, 64, 64), 1, activation="tanh", note="tanh, narrow input"),
    Case("square", 256, 32, (256, 256, 256), 64, note="forward mode wins"),
    Case("cifar", 128, 3072, (512, 512), 100, softmax_head=True, note="softmax head"),
    Case("bottleneck", 64, 512, (32, 512), 512, note="narrow first layer: reverse already multiplies by it last"),
    Case("hourglass", 64, 512, (512, 32, 512), 512, note="narrow middle layer: a split order wins"),
    # Almost no arithmetic: its time is the per-call cost of Python, planning lookups and dispatch (bench.latency).
    Case("linear", 1, 16, (), 4, note="per-call cost", default_devices=()),
    # A batch that fills a GPU; left out of CPU runs, where a forward-mode call takes minutes.
    Case("gpu-large", 4096, 784, (1024, 1024, 1024), 10, note="GEMM-bound at GPU scale", default_devices=("cuda",)),
]
CASES: Dict[str, Case] = {case.name: case for case in SUITE}


def default_cases(device: str) -> List[Case]:
    return [case for case in SUITE if device in case.default_devices]


def build_model(case: Case, seed: int = 0) -> nn.Sequential:
    """Linear/activation stack with PyTorch's default random init; the seed makes every process agree."""
    torch.manual_seed(seed)
    widths = (case.in_features, *case.hidden, case.out_features)
    layers = []
    for index, (width_in, width_out) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(width_in, width_out))
        if index < len(widths) - 2:
            layers.append(ACTIVATIONS[case.activation]())
    if case.softmax_head:
        layers.append(nn.Softmax(dim=-1))
    return nn.Sequential(*layers).float().eval()


def build_input(case: Case, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(case.batch, case.in_features, generator=generator)


def build_model_and_input(case: Case, device: str) -> Tuple[nn.Sequential, torch.Tensor]:
    """Built on the CPU and then moved, so that every device sees the same weights and input."""
    return build_model(case).to(device), build_input(case).to(device)
