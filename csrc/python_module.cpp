// An empty Python module, so that `import jacobian_ext._C` loads this library and runs its operator
// registrations. The operators themselves are reached through torch.ops.jacext (no pybind11 needed).
#include <Python.h>

PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "jacobian_ext operator library", -1, nullptr};
  return PyModule_Create(&module_def);
}
