// Large outputs of the CPU expert ops allocated on transparent huge pages.
//
// A weight gradient of all E experts is tens of MB that every backward allocates afresh: glibc serves it by
// mmap (above its 32 MiB threshold, and often below) and the kernel then faults it in 4 KiB page by page on
// first write, inside the GEMM that fills it. Mixtral-8x7B/8's grad_up_weight ([8, 3584, 512] float32,
// 58 MiB): the weight-gradient GEMM of one expert took 7.6-8.1 ms in a fresh buffer, 3.4 ms in a warm one,
// 4.0 ms with the buffer on huge pages (1 thread). madvise(MADV_HUGEPAGE) asks for 2 MiB pages where the
// system's THP mode is "madvise" (else it changes nothing); it only marks the mapping, so values and
// determinism are untouched.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

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

}  // namespace moe_kernels::cpu
