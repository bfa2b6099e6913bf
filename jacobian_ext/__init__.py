"""jacobian_ext: per-sample Jacobians of neural networks in one fused pass."""
from . import ops
from .api import JacobianModule, batch_jacobian, compile

__all__ = ["batch_jacobian", "compile", "JacobianModule", "ops"]
__version__ = "0.1.0"
