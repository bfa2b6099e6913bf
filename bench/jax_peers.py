"""JAX jit(vmap(jacrev|jacfwd)) on the same weights, when JAX is installed (an optional extra)."""
import importlib.util

import numpy as np
import torch
from torch import nn


def available() -> bool:
    return importlib.util.find_spec("jax") is not None


def version() -> str:
    if not available():
        return "not installed"
    import jax

    return jax.__version__


def _layer_functions(model: nn.Sequential):
    """The model as a list of JAX functions of one sample, with the torch weights copied to numpy."""
    import jax
    import jax.numpy as jnp

    functions = []
    for layer in model:
        if isinstance(layer, nn.Linear):
            weight = jnp.asarray(layer.weight.detach().numpy())
            bias = jnp.asarray(layer.bias.detach().numpy()) if layer.bias is not None else 0.0
            functions.append(lambda h, w=weight, b=bias: w @ h + b)
        elif isinstance(layer, nn.ReLU):
            functions.append(jax.nn.relu)
        elif isinstance(layer, nn.Tanh):
            functions.append(jnp.tanh)
        elif isinstance(layer, nn.Softmax):
            functions.append(jax.nn.softmax)
        else:
            raise NotImplementedError(f"no JAX translation for {type(layer).__name__}")
    return functions


def prepare(transform_name: str):
    def prepare_for(model, x):
        import jax

        functions = _layer_functions(model)

        def per_sample(h):
            for function in functions:
                h = function(h)
            return h

        x_jax = jax.device_put(x.detach().numpy())
        # Compiled ahead of time, so that the first call, which decides whether a method is slow, runs
        # the program rather than XLA.
        compiled = jax.jit(jax.vmap(getattr(jax, transform_name)(per_sample))).lower(x_jax).compile()
        return lambda: compiled(x_jax).block_until_ready()

    return prepare_for


def to_torch(array) -> torch.Tensor:
    return torch.from_numpy(np.array(array))
