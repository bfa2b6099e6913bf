// Reading a graph program (grammar in graph.cpp): entries into nodes, attributes decoded once, every slot
// reference and tensor count checked, runs of chain layers fused into one node (and a pooling into the Linear
// that reads it, pooled_linear.cpp).
#include "jacext/graph.h"
#include "jacext/jacobian_block.h"
#include "jacext/graph_program.h"

#include <cerrno>
#include <cstdlib>

namespace jacext::graph {
namespace {

// The parts of a comma-separated list; none for an empty text.
std::vector<std::string> comma_parts(const std::string& text) {
  std::vector<std::string> parts;
  size_t start = 0;
  while (start < text.size()) {
    const size_t comma = std::min(text.find(',', start), text.size());
    parts.push_back(text.substr(start, comma - start));
    start = comma + 1;
  }
  if (!text.empty() && text.back() == ',') parts.emplace_back();  // a trailing comma is an empty part
  return parts;
}

std::optional<int64_t> parse_integer(const std::string& text) {
  char* end = nullptr;
  errno = 0;
  const long long value = std::strtoll(text.c_str(), &end, 10);
  if (text.empty() || *end != '\0' || errno != 0) return std::nullopt;
  return value;
}

std::optional<double> parse_number(const std::string& text) {
  char* end = nullptr;
  errno = 0;
  const double value = std::strtod(text.c_str(), &end);
  if (text.empty() || *end != '\0' || errno != 0) return std::nullopt;
  return value;
}

// Every part of a comma-separated attribute read by `parse` (parse_integer or parse_number).
template <typename Parse>
auto parsed_list(const Node& node, const std::string& key, const std::string& text, Parse parse,
                 const char* expected) {
  std::vector<typename decltype(parse(text))::value_type> values;
  for (const std::string& part : comma_parts(text)) {
    const auto value = parse(part);
    TORCH_CHECK_VALUE(value, kOp, ": ", where(node), " attribute ", key, " must be comma-separated ", expected,
                      ", got '", text, "'");
    values.push_back(*value);
  }
  return values;
}

bool is_chain_layer_name(const std::string& kind) {
  return kind == "linear" || kind == "linear_no_bias" || kind == "softmax" || kind == "log_softmax";
}

// The kind and raw attributes of one entry, `kind key=value key=value ...`.
std::pair<std::string, std::map<std::string, std::string>> tokens(const std::string& text, size_t index) {
  std::string kind;
  std::map<std::string, std::string> attributes;
  size_t start = 0;
  while (start < text.size()) {
    const size_t space = std::min(text.find(' ', start), text.size());
    const std::string token = text.substr(start, space - start);
    start = space + 1;
    if (token.empty()) continue;
    if (kind.empty()) {
      kind = token;
      continue;
    }
    const size_t equals = token.find('=');
    TORCH_CHECK_VALUE(equals != std::string::npos, kOp, ": layers[", index, "] ('", text,
                      "'): attributes are key=value, got '", token, "'");
    attributes[token.substr(0, equals)] = token.substr(equals + 1);
  }
  TORCH_CHECK_VALUE(!kind.empty(), kOp, ": layers[", index, "] is empty");
  return {kind, attributes};
}

}  // namespace

std::string where(const Node& node) { return "layers[" + std::to_string(node.index) + "] (" + node.kind + ")"; }

const std::string& AttributeText::text(const std::string& key) const {
  const auto found = text_.find(key);
  TORCH_CHECK_VALUE(found != text_.end(), kOp, ": ", where(node_), " needs the attribute ", key, "=");
  return found->second;
}

std::vector<int64_t> AttributeText::ints(const std::string& key) const {
  return parsed_list(node_, key, text(key), parse_integer, "integers");
}

int64_t AttributeText::integer(const std::string& key) const {
  const std::vector<int64_t> values = ints(key);
  TORCH_CHECK_VALUE(values.size() == 1, kOp, ": ", where(node_), " attribute ", key, " must be one integer, got '",
                    text(key), "'");
  return values[0];
}

std::vector<double> AttributeText::numbers(const std::string& key) const {
  return parsed_list(node_, key, text(key), parse_number, "numbers");
}

double AttributeText::number(const std::string& key) const {
  const std::optional<double> value = parse_number(text(key));
  TORCH_CHECK_VALUE(value, kOp, ": ", where(node_), " attribute ", key, " must be a number, got '", text(key), "'");
  return *value;
}

bool AttributeText::flag(const std::string& key) const {
  const std::string& value = text(key);
  TORCH_CHECK_VALUE(value == "0" || value == "1", kOp, ": ", where(node_), " attribute ", key,
                    " must be 0 or 1, got '", value, "'");
  return value == "1";
}

std::optional<int64_t> AttributeText::optional_integer(const std::string& key) const {
  return has(key) ? std::optional<int64_t>(integer(key)) : std::nullopt;
}

std::optional<double> AttributeText::optional_number(const std::string& key) const {
  return has(key) ? std::optional<double>(number(key)) : std::nullopt;
}

Program parse_program(c10::ArrayRef<std::string> layers, const LayerParams& params) {
  std::vector<Node> entries;
  size_t next_param = 0;
  for (size_t i = 0; i < layers.size(); ++i) {
    Node node;
    node.index = i;
    node.slot = i + 1;
    auto [kind, text] = tokens(layers[i], i);
    node.kind = kind;
    node.rule = find_graph_kind(kind);
    if (!node.rule) {
      if (!is_chain_layer_name(kind)) {
        activation_entry(kind, kOp, i);  // throws for an unknown kind
      }
      node.chain_layers = {kind};
    }
    for (const auto& [key, value] : text) {
      TORCH_CHECK_VALUE(key == "in" || (node.rule && node.rule->attribute_names.count(key)), kOp, ": ", where(node),
                        " takes no attribute ", key, node.rule ? "" : " (only in=)");
    }
    const AttributeText attributes(text, node);
    if (attributes.has("in")) {
      for (int64_t slot : attributes.ints("in")) {
        TORCH_CHECK_VALUE(slot >= 0 && static_cast<size_t>(slot) <= i, kOp, ": ", where(node), " reads slot ", slot,
                          " but only slots 0 (the input) to ", i, " are written before it");
        node.inputs.push_back(static_cast<size_t>(slot));
      }
    } else {
      node.inputs = {i};
    }
    const size_t expected = node.rule ? node.rule->inputs : 1;
    TORCH_CHECK_VALUE(expected == 0 ? !node.inputs.empty() : node.inputs.size() == expected, kOp, ": ", where(node),
                      " reads ", node.inputs.size(), " slots, expected ",
                      expected == 0 ? "at least 1" : std::to_string(expected));
    size_t count = 0;
    if (node.rule) {
      count = node.rule->decode(attributes, node);
    } else if (kind == "linear" || kind == "linear_no_bias") {
      count = kind == "linear" ? 2 : 1;
    }
    TORCH_CHECK_VALUE(next_param + count <= params.size(), kOp, ": ", where(node), " takes ", count,
                      " tensors of params but only ", params.size() - next_param, " are left");
    node.params.assign(params.begin() + next_param, params.begin() + next_param + count);
    next_param += count;
    entries.push_back(std::move(node));
  }
  TORCH_CHECK_VALUE(next_param == params.size(), kOp, ": params has ", params.size(), " tensors but the layers take ",
                    next_param);

  Program program;
  program.readers.assign(layers.size() + 1, 0);
  for (const Node& node : entries) {
    for (size_t slot : node.inputs) ++program.readers[slot];
  }
  for (Node& node : entries) {
    if (node.rule) {
      program.nodes.push_back(std::move(node));
      continue;
    }
    // A chain layer that alone reads the previous chain run's output joins that run.
    if (!program.nodes.empty()) {
      Node& last = program.nodes.back();
      if (last.kind == "chain" && node.inputs.size() == 1 && node.inputs[0] == last.slot &&
          program.readers[last.slot] == 1) {
        last.chain_layers.push_back(node.kind);
        last.params.insert(last.params.end(), node.params.begin(), node.params.end());
        last.slot = node.slot;
        last.index = node.index;
        continue;
      }
    }
    node.kind = "chain";
    program.nodes.push_back(std::move(node));
  }
  program.output_slot = layers.size();
  fuse_pooled_linears(program);
  return program;
}

}  // namespace jacext::graph
