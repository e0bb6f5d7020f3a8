// The test-only module `xent._C_emulated` (see csrc/module.cpp).
#define XENT_MODULE_NAME _C_emulated
#include "module.cpp"
