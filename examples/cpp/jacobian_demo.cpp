// Calls torch.ops.jacext.batch_jacobian from C++, through the dispatcher, as a production service would:
//
//   jacobian_demo MODEL.pt [RESULT.pt]
//
// MODEL.pt is written by Python (examples/cpp/export_model.py): a dict with the op's plan, "layers"
// (list of str) and "params" (list of tensors), an input "x" and the sweep "mode". Prints the output and
// the Jacobian, and writes the tuple (output, jacobian) to RESULT.pt, which torch.load reads.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/serialize.h>
#include <torch/torch.h>

#include <fstream>
#include <iostream>
#include <iterator>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

std::vector<char> read_file(const std::string& path) {
  std::ifstream file(path, std::ios::binary);
  if (!file) throw std::runtime_error("cannot open " + path);
  return {std::istreambuf_iterator<char>(file), std::istreambuf_iterator<char>()};
}

c10::IValue entry(const c10::Dict<c10::IValue, c10::IValue>& model, const std::string& key) {
  if (!model.contains(key)) throw std::runtime_error("the model file has no \"" + key + "\" entry");
  return model.at(key);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2 || argc > 3) {
    std::cerr << "usage: " << argv[0] << " MODEL.pt [RESULT.pt]\n";
    return 2;
  }
  try {
    const auto model = torch::pickle_load(read_file(argv[1])).toGenericDict();
    const at::Tensor x = entry(model, "x").toTensor();

    // Boxed call: the arguments travel as IValues checked against the op's schema, so this program needs
    // no C++ signature of the kernel, only the library's registrations (see CMakeLists.txt).
    const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("jacext::batch_jacobian", "");
    // Unpickled lists are generic (lists of IValues); the schema's str[] and Tensor[] want typed ones.
    c10::List<std::string> layers;
    for (const c10::IValue& layer : entry(model, "layers").toListRef()) layers.push_back(layer.toStringRef());
    c10::List<at::Tensor> params;
    for (const c10::IValue& param : entry(model, "params").toListRef()) params.push_back(param.toTensor());
    torch::jit::Stack stack{x, layers, params, entry(model, "mode")};
    op.callBoxed(&stack);
    const at::Tensor output = stack.at(0).toTensor();
    const at::Tensor jacobian = stack.at(1).toTensor();

    std::cout << "jacext::batch_jacobian on x " << x.sizes() << " (" << x.dtype() << ")\n"
              << "output " << output.sizes() << ":\n" << output << "\n"
              << "jacobian " << jacobian.sizes() << ":\n" << jacobian << "\n";
    if (argc == 3) {
      // A tuple: typed containers would carry TorchScript type tags that torch.load refuses by default.
      const std::vector<char> bytes = torch::pickle_save(c10::ivalue::Tuple::create({output, jacobian}));
      std::ofstream(argv[2], std::ios::binary).write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
    }
  } catch (const std::exception& error) {
    std::cerr << "jacobian_demo: " << error.what() << "\n";
    return 1;
  }
  return 0;
}
