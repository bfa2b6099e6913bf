// The jacext library's schemas and kernels, registered per backend from the one table of operators
// (jacext/operators.def).
// The op functions are device-generic (their element-wise work dispatches on the input's device), so
// the CPU and CUDA registrations share one list.
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

#include <string_view>

#include "jacext/ops.h"

TORCH_LIBRARY(jacext, m) {
#define JACEXT_OPERATOR(name, signature) m.def(#name signature);
#include "jacext/operators.def"
#undef JACEXT_OPERATOR
}

namespace {

void register_kernels(torch::Library& m) {
#define JACEXT_OPERATOR(name, signature) m.impl(#name, TORCH_FN(jacext::name));
#include "jacext/operators.def"
#undef JACEXT_OPERATOR
}

}  // namespace

TORCH_LIBRARY_IMPL(jacext, CPU, m) { register_kernels(m); }

// The whole-plan op batch_jacobian is differentiable: jacobian_ext/differentiable.py registers its
// backward (torch.library.register_autograd). The per-layer rules are not: this C++ fallback records a
// node that raises "not implemented" on backward whenever an input (a weight included) requires grad,
// never a silently wrong gradient, and no Python on the call path.
TORCH_LIBRARY_IMPL(jacext, Autograd, m) {
#define JACEXT_OPERATOR(name, signature)                                 \
  if (std::string_view(#name) != "batch_jacobian") {                     \
    m.impl(#name, torch::autograd::autogradNotImplementedFallback());    \
  }
#include "jacext/operators.def"
#undef JACEXT_OPERATOR
}

#ifdef JACEXT_WITH_CUDA
TORCH_LIBRARY_IMPL(jacext, CUDA, m) { register_kernels(m); }
#endif
