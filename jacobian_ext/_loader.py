"""Loads the compiled operator library, refusing one built against another torch."""
import torch


def load_library():
    try:
        from . import _build_info
    except ImportError:
        raise ImportError(
            "jacobian_ext's C++ library is not built. Build it with `make build` "
            "(or `pip install --no-build-isolation -e .`) in the repository."
        ) from None
    if _build_info.TORCH_VERSION != torch.__version__:
        raise ImportError(
            f"jacobian_ext was built against torch {_build_info.TORCH_VERSION} but torch {torch.__version__} "
            "is running. Rebuild it against this torch: `make build` "
            "(or `pip install --no-build-isolation -e .`)."
        )
    try:
        from . import _C  # noqa: F401  (registers torch.ops.jacext.*)
    except ImportError as error:
        raise ImportError(
            f"jacobian_ext's C++ library failed to load ({error}). Rebuild it: `make build`."
        ) from error
    return _build_info
