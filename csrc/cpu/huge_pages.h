// Large outputs of the CPU expert ops allocated on transparent huge pages.
//
// A weight gradient of all E experts is tens of MB that every backward allocates afresh: glibc serves it by
// mmap (above its 32 MiB threshold, and often below) and the kernel then faults it in 4 KiB page by page on
// first write, inside the GEMM that fills it. Mixtral-8x7B/8's grad_up_weight ([8, 3584, 512] float32,
// 58 MiB): the weight-gradient GEMM of one expert took 7.6-8.1 ms in a fresh buffer, 3.4 ms in a warm one,
// 4.0 ms with the buffer on huge pages (1 thread). madvise(MADV_HUGEPAGE) asks for 2 MiB pages where the
// system's THP mode is "madvise" (else it changes nothing); it only marks the mapping, so values and
// determinism are untouched.
//
// The weight gradients of all E experts are zero for every expert that received no rows: DeepSeek-V3-like/8
// at T = 16 writes ~100 of its 256 experts' gradients, and the other ~420 MB of its 704 MB are zeros.
// expert_gradient maps a gradient of kFreshPagesMinBytes or more for itself: fresh anonymous pages read as
// zero until written, so those zeros cost neither a fill pass nor a page fault here, only when (and if) a
// reader touches them (a read maps the shared zero page). transformers' grouped_mm backward zero-fills them.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <cstring>

#include "experts.h"

#ifdef __linux__
#include <sys/mman.h>
#endif

namespace moe_kernels::cpu {

// Bytes from which an output is madvised: 4 MiB always hold at least one whole 2 MiB-aligned page, and
// smaller outputs (every output of a decode step) skip the system call.
constexpr int64_t kHugePageMinBytes = int64_t{4} << 20;

// at::empty(sizes, options), contiguous, with the 2 MiB-aligned pages inside it marked for huge pages.
inline at::Tensor empty_on_huge_pages(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor tensor = at::empty(sizes, options.memory_format(at::MemoryFormat::Contiguous));
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  const int64_t bytes = tensor.nbytes();
  if (bytes >= kHugePageMinBytes) {
    constexpr uintptr_t kHugePage = uintptr_t{1} << 21;
    const auto data = reinterpret_cast<uintptr_t>(tensor.data_ptr());
    const uintptr_t begin = (data + kHugePage - 1) & ~(kHugePage - 1), end = (data + bytes) & ~(kHugePage - 1);
    if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);  // advice: failure is harmless
  }
#endif
  return tensor;
}

// Bytes from which expert_gradient maps its gradient itself: glibc's largest mmap threshold (32 MiB on 64-bit),
// above which at::empty's memory comes from a fresh mapping anyway, so mapping it here costs nothing more.
// Below it, memory that malloc reuses (no page faults at all) beats fresh zero pages.
constexpr int64_t kFreshPagesMinBytes = int64_t{32} << 20;

// Below it, a gradient of kSparseFreshMinBytes or more whose experts with rows are at most 1/kSparseShare of
// all still goes on fresh zero pages, of 4 KiB (a 2 MiB page would zero 2 MiB for each expert written): the
// memset of the idle experts (~1.5 ms for Shazeer-style/8's 16 MiB of weight gradients at T = 1) then costs
// a few page faults per expert with rows instead.
constexpr int64_t kSparseFreshMinBytes = int64_t{1} << 20;
constexpr int64_t kSparseShare = 8;

#if defined(__linux__) && defined(MADV_HUGEPAGE)
// A zero tensor of `sizes` on a private anonymous mapping of its own (unmapped when the tensor's storage is
// freed), with `huge`: 2 MiB-aligned and marked for huge pages; an undefined tensor when mmap fails.
inline at::Tensor zeros_on_fresh_pages(at::IntArrayRef sizes, const at::TensorOptions& options, bool huge) {
  constexpr size_t kHugePage = size_t{1} << 21;
  const size_t bytes = c10::multiply_integers(sizes) * options.dtype().itemsize();
  const size_t length = huge ? bytes + kHugePage : bytes;  // room to start on a 2 MiB boundary
  void* base = mmap(nullptr, length, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (base == MAP_FAILED) return at::Tensor();
  auto start = reinterpret_cast<uintptr_t>(base);
  if (huge) {
    start = (start + kHugePage - 1) & ~(kHugePage - 1);
    madvise(reinterpret_cast<void*>(start), (bytes + kHugePage - 1) & ~(kHugePage - 1), MADV_HUGEPAGE);
  }
  return at::from_blob(reinterpret_cast<void*>(start), sizes, [base, length](void*) { munmap(base, length); },
                       options.device(at::kCPU));
}
#endif

// The gradient [E, ...] (contiguous, `sizes`) of an expert weight or bias, with the experts that received no
// rows already zero; the caller writes the others whole. From kFreshPagesMinBytes on, on fresh zero huge
// pages, and from kSparseFreshMinBytes on with few experts written, on fresh zero 4 KiB pages (see above);
// else on empty_on_huge_pages's memory with those experts zero-filled.
inline at::Tensor expert_gradient(const Layout& layout, at::IntArrayRef sizes, const at::TensorOptions& options) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  const auto bytes = static_cast<int64_t>(c10::multiply_integers(sizes) * options.dtype().itemsize());
  int64_t written = 0;
  for (int64_t e = 0; e < layout.num_experts; ++e) written += layout.tokens_per_expert[e] != 0;
  const bool sparse = bytes >= kSparseFreshMinBytes && written * kSparseShare <= layout.num_experts;
  if (bytes >= kFreshPagesMinBytes || sparse) {
    at::Tensor zeros = zeros_on_fresh_pages(sizes, options, /*huge=*/bytes >= kFreshPagesMinBytes);
    if (zeros.defined()) return zeros;
  }
#endif
  at::Tensor gradient = empty_on_huge_pages(sizes, options);
  const int64_t block_bytes = gradient.stride(0) * gradient.element_size();
  for (int64_t e = 0; e < layout.num_experts; ++e) {
    if (layout.tokens_per_expert[e] == 0) std::memset(static_cast<char*>(gradient.data_ptr()) + e * block_bytes, 0, block_bytes);
  }
  return gradient;
}

}  // namespace moe_kernels::cpu
