"""Writes the input file of examples/cpp/jacobian_demo: the op's plan for a model (layer names and
weights), an input and the sweep, as a dict that torch::pickle_load reads in C++.

    python examples/cpp/export_model.py MODEL.pt        # a random 8-16-16-3 softmax classifier, B=2

JacobianModule.fused_encoding gives the encoding of any model whose nodes all have native rules: a chain of
layer names, or a graph program (residual blocks, convolutions, ...; grammar in csrc/graph.cpp).
"""
import argparse

import torch
from torch import nn

import jacobian_ext
from jacobian_ext import deploy


def export_model(model: nn.Module, x: torch.Tensor, path: str, mode: str = "auto"):
    """Saves what the C++ program needs to compute model's Jacobian at x."""
    jm = jacobian_ext.compile(model, mode=mode)
    encoding = jm.fused_encoding(x)
    params = [p.detach() for p in deploy.read_params(jm.parameter_owner, encoding)]
    torch.save({"layers": list(encoding.layers), "params": params, "x": x, "mode": encoding.mode}, path)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path")
    parser.add_argument("--seed", type=int, default=0)
    arguments = parser.parse_args()
    torch.manual_seed(arguments.seed)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3), nn.Softmax(-1))
    export_model(model.eval(), torch.randn(2, 8), arguments.path)
    print(f"wrote {arguments.path}")


if __name__ == "__main__":
    main()
