// The one registration file: schemas of the moe_kernels ops and their CPU and CUDA implementations.
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
      "gating(Tensor logits, Tensor? noise_logits, Tensor? noise, str router, int k, bool renormalize, "
      "float noise_epsilon) -> (Tensor weights, Tensor experts, Tensor importance, Tensor load, "
      "Tensor probability_sum, Tensor logsumexp)");
  m.def(
      "permute(Tensor experts, int num_experts, int? capacity, int block_m) -> (Tensor tokens_per_expert, "
      "Tensor expert_offsets, Tensor sorted_rows, Tensor sorted_assignments)");
}

TORCH_LIBRARY_IMPL(moe_kernels, CPU, m) {
  m.impl("gating", &moe_kernels::gating_cpu);
  m.impl("permute", &moe_kernels::permute_cpu);
}

#ifdef MOE_KERNELS_WITH_CUDA
TORCH_LIBRARY_IMPL(moe_kernels, CUDA, m) {
  m.impl("gating", &moe_kernels::gating_cuda);
  m.impl("permute", &moe_kernels::permute_cuda);
}
#endif
