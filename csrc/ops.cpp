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
  // The softmax top-k router's CPU kernel (forward only: used where no gradient is recorded).
  m.def(
      "cpu_softmax_topk(Tensor x, Tensor weight, Tensor? bias, int k, bool renormalize) -> (Tensor logits, "
      "Tensor weights, Tensor experts)");
  // The CPU expert path; <permutation> = the four tensors of a pipeline.Permutation.
  m.def(
      "cpu_expert_up(Tensor x, Tensor up_weight, Tensor? up_bias, Tensor tokens_per_expert, Tensor expert_offsets, "
      "Tensor sorted_rows, Tensor sorted_assignments, str function, bool gated, float alpha, float? limit, "
      "float up_offset, bool interleaved, bool keep_pre_activation) -> (Tensor hidden, Tensor pre_activation)");
  m.def(
      "cpu_expert_up_backward(Tensor grad_hidden, Tensor x, Tensor up_weight, Tensor? up_bias, "
      "Tensor pre_activation, Tensor tokens_per_expert, Tensor expert_offsets, Tensor sorted_rows, "
      "Tensor sorted_assignments, str function, bool gated, float alpha, float? limit, float up_offset, "
      "bool interleaved) -> (Tensor grad_x, Tensor grad_up_weight, Tensor grad_up_bias)");
  m.def(
      "cpu_expert_down_combine(Tensor hidden, Tensor down_weight, Tensor? down_bias, Tensor tokens_per_expert, "
      "Tensor expert_offsets, Tensor sorted_rows, Tensor sorted_assignments, Tensor weights) -> Tensor");
  m.def(
      "cpu_expert_down_combine_backward(Tensor grad_y, Tensor hidden, Tensor down_weight, Tensor? down_bias, "
      "Tensor tokens_per_expert, Tensor expert_offsets, Tensor sorted_rows, Tensor sorted_assignments, "
      "Tensor weights) -> (Tensor grad_hidden, Tensor grad_down_weight, Tensor grad_down_bias, Tensor grad_weights)");
  // The three forward stages above in one op, for calls that record no gradient (no autograd formula).
  m.def(
      "cpu_experts_forward(Tensor x, Tensor experts, Tensor weights, SymInt? capacity, Tensor up_weight, "
      "Tensor? up_bias, Tensor down_weight, Tensor? down_bias, str function, bool gated, float alpha, float? limit, "
      "float up_offset, bool interleaved) -> Tensor");
  // No tensor to dispatch on: one kernel for every key.
  m.def("cpu_release_memory() -> int", &moe_kernels::cpu_release_memory);
}

TORCH_LIBRARY_IMPL(moe_kernels, CPU, m) {
  m.impl("permute", &moe_kernels::permute_cpu);
  m.impl("cpu_softmax_topk", &moe_kernels::cpu_softmax_topk);
  m.impl("cpu_expert_up", &moe_kernels::cpu_expert_up);
  m.impl("cpu_expert_up_backward", &moe_kernels::cpu_expert_up_backward);
  m.impl("cpu_expert_down_combine", &moe_kernels::cpu_expert_down_combine);
  m.impl("cpu_expert_down_combine_backward", &moe_kernels::cpu_expert_down_combine_backward);
  m.impl("cpu_experts_forward", &moe_kernels::cpu_experts_forward);
}
