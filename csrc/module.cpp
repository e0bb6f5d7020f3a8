// The Python module `xent._C`. It has no functions: importing it loads this shared library, whose static
// initializers register the operators (csrc/ops.cpp) and their CPU/CUDA kernels with the dispatcher.
// Written against the limited C API (no pybind11), so one build serves every Python >= 3.9.
#include <Python.h>

#ifndef XENT_MODULE_NAME
#define XENT_MODULE_NAME _C
#endif
#define XENT_STR2(x) #x
#define XENT_STR(x) XENT_STR2(x)
#define XENT_CAT2(a, b) a##b
#define XENT_CAT(a, b) XENT_CAT2(a, b)

extern "C" PyMODINIT_FUNC XENT_CAT(PyInit_, XENT_MODULE_NAME)(void) {
  static PyModuleDef module = {
      PyModuleDef_HEAD_INIT,
      XENT_STR(XENT_MODULE_NAME), // m_name
      "xent operator library; the operators live in torch.ops", // m_doc
      -1, // m_size
      nullptr, // m_methods
  };
  return PyModule_Create(&module);
}
