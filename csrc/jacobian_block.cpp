#include "jacext/jacobian_block.h"
#include "jacext/graph.h"

#include <cmath>
#include <cstdlib>
#include <optional>
#include <string>

namespace jacext {

at::Tensor JacobianBlock::explicit_values(int64_t features, const at::TensorOptions& options) const {
  if (kind == Kind::Identity) return at::eye(features, options);
  return values.contiguous();
}

at::Tensor JacobianBlock::dense(int64_t batch, int64_t features, const at::TensorOptions& options) const {
  switch (kind) {
    case Kind::Identity:
      return at::eye(features, options).expand({batch, features, features}).clone(at::MemoryFormat::Contiguous);
    case Kind::Shared:
      // clone, not contiguous(): for batch 1 the expanded view is already contiguous and would alias
      // the shared values (possibly a weight).
      return values.expand({batch, values.size(0), values.size(1)}).clone(at::MemoryFormat::Contiguous);
    case Kind::PerSample:
      return values;
  }
  TORCH_INTERNAL_ASSERT(false, "unknown JacobianBlock kind");
}

namespace {

#define JACEXT_ACTIVATION(kind, name, parameters, first, second, grammar, ...) grammar ", "
#define JACEXT_ACTIVATION_ALIAS(name, kind, parameters, first, second, grammar) grammar ", "
constexpr const char* kAcceptedActivations =
#include "jacext/activations.def"
    "with finite decimal parameters, e.g. 'leaky_relu:0.01', 'softplus:1.0:20.0'";
#undef JACEXT_ACTIVATION
#undef JACEXT_ACTIVATION_ALIAS

struct ActivationForm {
  std::string_view name;
  ActivationKind kind;
  int parameters;  // how many may follow the name
  double first, second;  // torch's defaults
};

constexpr ActivationForm kActivationForms[] = {
#define JACEXT_ACTIVATION(kind, name, parameters, first, second, ...) {name, ActivationKind::kind, parameters, first, second},
#define JACEXT_ACTIVATION_ALIAS(name, kind, parameters, first, second, grammar) \
  {name, ActivationKind::kind, parameters, first, second},
#include "jacext/activations.def"
#undef JACEXT_ACTIVATION
#undef JACEXT_ACTIVATION_ALIAS
};

// The whole of `text` as a finite number, or nullopt.
std::optional<double> parse_number(std::string_view text) {
  if (text.empty()) return std::nullopt;
  const std::string copy(text);  // strtod needs a terminated string
  char* end = nullptr;
  const double value = std::strtod(copy.c_str(), &end);
  if (end != copy.c_str() + copy.size() || !std::isfinite(value)) return std::nullopt;
  return value;
}

std::optional<Activation> parse_activation(std::string_view text) {
  const size_t colon = text.find(':');
  const std::string_view name = text.substr(0, colon);
  for (const ActivationForm& form : kActivationForms) {
    if (form.name != name) continue;
    Activation activation{form.kind, form.first, form.second};
    double* slots[] = {&activation.first, &activation.second};
    std::string_view rest = colon == std::string_view::npos ? std::string_view() : text.substr(colon + 1);
    for (int i = 0; colon != std::string_view::npos; ++i) {
      if (i == form.parameters) return std::nullopt;  // one parameter too many
      const size_t next = rest.find(':');
      const std::optional<double> value = parse_number(rest.substr(0, next));
      if (!value) return std::nullopt;
      *slots[i] = *value;
      if (next == std::string_view::npos) break;
      rest = rest.substr(next + 1);
    }
    return activation;
  }
  return std::nullopt;
}

}  // namespace

namespace {

// activation_from_name's checks, with the argument's description built only for an error message.
template <typename DescribeArg>
Activation checked_activation(std::string_view name, const char* op, const DescribeArg& describe_arg) {
  const std::optional<Activation> activation = parse_activation(name);
  TORCH_CHECK_VALUE(activation.has_value(), op, ": ", describe_arg(), " is '", name, "'; expected an activation: ",
                    kAcceptedActivations);
  if (activation->kind == ActivationKind::Softplus) {
    TORCH_CHECK_VALUE(activation->first != 0.0, op, ": ", describe_arg(), " is '", name,
                      "'; softplus needs a nonzero beta");
  }
  if (activation->kind == ActivationKind::Hardtanh) {
    TORCH_CHECK_VALUE(activation->first <= activation->second, op, ": ", describe_arg(), " is '", name,
                      "'; hardtanh needs min_val <= max_val");
  }
  return *activation;
}

}  // namespace

Activation activation_from_name(std::string_view name, const char* op, const char* arg) {
  return checked_activation(name, op, [arg] { return arg; });
}

Activation activation_entry(std::string_view name, const char* op, size_t index) {
  return checked_activation(name, op, [index] {
    return "layers[" + std::to_string(index) + "] (" + kLayerEntryKinds + ")";
  });
}

}  // namespace jacext
