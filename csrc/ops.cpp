// The one registration file: schemas of the moe_kernels ops and their CPU implementations.
// Fake (meta) implementations for torch.compile live in moe_kernels/native.py.
#include <Python.h>
#include <torch/library.h>

#include "ops.h"

// `import moe_kernels._C` loads this library, which registers the ops; the module itself is empty.
PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}

TORCH_LIBRARY(moe_kernels, m) {
  m.def(
      "permute(Tensor experts, int num_experts, SymInt? capacity, int block_m) -> (Tensor tokens_per_expert, "
      "Tensor expert_offsets, Tensor sorted_rows, Tensor sorted_assignments)");
}

TORCH_LIBRARY_IMPL(moe_kernels, CPU, m) {
  m.impl("permute", &moe_kernels::permute_cpu);
}
