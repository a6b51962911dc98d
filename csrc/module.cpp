// `import msam_fused._C` loads the library, and with it the op registrations (ops.cpp and the
// per-device kernel files); the Python module itself is empty.
#include <Python.h>

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
