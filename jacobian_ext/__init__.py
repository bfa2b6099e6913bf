"""jacobian_ext: per-sample Jacobians of neural networks in one fused pass."""
from . import ops
from .api import JacobianModule, batch_jacobian, compile
from .disk import jacobians_to_disk, load_jacobians

__all__ = ["batch_jacobian", "compile", "JacobianModule", "jacobians_to_disk", "load_jacobians", "ops"]
__version__ = "0.1.0"
