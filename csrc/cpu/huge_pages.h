// Large outputs of the CPU expert ops allocated on transparent huge pages, and weight gradients on mappings
// kept for reuse.
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
// expert_gradient maps a gradient of kPooledMinBytes or more for itself: fresh anonymous
// pages read as zero until written, and on a kept mapping the idle experts' pages are dropped, so those zeros
// cost neither a fill pass nor a page fault here, only when (and if) a reader touches them (a read maps the
// shared zero page). transformers' grouped_mm backward zero-fills them.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <cstring>
#include <iterator>
#include <mutex>
#include <vector>

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

// Bytes from which expert_gradient maps its gradient itself (MappingPool) rather than take glibc's memory,
// which comes from its heap or from a fresh mapping depending on the process's history (its mmap threshold
// starts at 128 KiB and rises with the largest mapped chunk freed; its heap is trimmed beyond twice that).
// Side by side in one process, 1 thread, forward+backward median ms, kept mappings vs at::empty for the same
// gradients (16-58 MB each): Mixtral-8x7B/8 T = 16 31.5 vs 42.8 (540 page faults per call), main-64e-top8
// T = 16 13.0 vs 16.9, Shazeer-style/8 T = 1 3.6 vs 5.9, main-8e-top2 T = 256 79.7 vs 83.3; Qwen3-30B-A3B/8
// T = 16 and 256 level. 1 MiB is where sparse gradients already had mappings of their own.
constexpr int64_t kPooledMinBytes = int64_t{1} << 20;

// A gradient whose experts with rows are at most 1/kSparseShare of all goes on 4 KiB pages (a 2 MiB page would
// zero 2 MiB for each expert written): the idle experts cost neither a memset (~1.5 ms for Shazeer-style/8's
// 16 MiB of weight gradients at T = 1) nor a fault, and the others a few page faults each.
constexpr int64_t kSparseShare = 8;

// Bytes of freed gradient mappings kept for reuse (MappingPool): DeepSeek-V3-like/8's two weight gradients
// (688 MB), the largest of the bench's layers, fit.
constexpr size_t kPoolMaxBytes = size_t{1} << 30;

#if defined(__linux__) && defined(MADV_HUGEPAGE)
// The mappings of expert_gradient, kept once their tensors are freed and handed to the next gradient of the
// same length and page size, so that a training step's weight gradients stop being faulted in afresh.
//
// Memory unmapped and mapped again is faulted in again, and how fast depends on what happened to those pages
// in between, beyond the process: on this VM (free page reporting: the kernel hands freed 2 MiB blocks back to
// the host, which must fault them in again) the first write of a fresh 64 MiB mapping took 4-7 ms on huge pages
// the host still held and 35-44 ms on pages it had taken back (18 ms on 4 KiB pages either way), and DeepSeek-
// V3-like/8 T = 256 forward+backward took 278-289 ms or 537-610 ms call by call, the slow calls those during
// which the kernel reported 212-270 MB to the host. A kept mapping stays faulted in: no page fault at all.
// At most kPoolMaxBytes are kept (the oldest unmapped first), until moe_kernels::cpu_release_memory gives them
// back; nothing about the results depends on it.
class MappingPool {
 public:
  // The one pool of the process (never destroyed: tensors may be freed during exit).
  static MappingPool& instance() {
    static MappingPool* pool = new MappingPool();
    return *pool;
  }

  // A kept mapping of `length` bytes and page size `huge` (stale contents), or nullptr.
  void* take(size_t length, bool huge) {
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto kept = kept_.rbegin(); kept != kept_.rend(); ++kept) {
      if (kept->length == length && kept->huge == huge) {
        void* base = kept->base;
        bytes_ -= length;
        kept_.erase(std::next(kept).base());
        return base;
      }
    }
    return nullptr;
  }

  // Unmaps every kept mapping; returns their bytes.
  size_t release() {
    std::lock_guard<std::mutex> lock(mutex_);
    const size_t released = bytes_;
    for (const Mapping& kept : kept_) munmap(kept.base, kept.length);
    kept_.clear();
    bytes_ = 0;
    return released;
  }

  // Keeps a freed mapping, unmapping the oldest kept ones beyond kPoolMaxBytes.
  void give(void* base, size_t length, bool huge) {
    std::lock_guard<std::mutex> lock(mutex_);
    kept_.push_back({base, length, huge});
    bytes_ += length;
    while (bytes_ > kPoolMaxBytes) {
      munmap(kept_.front().base, kept_.front().length);
      bytes_ -= kept_.front().length;
      kept_.erase(kept_.begin());
    }
  }

 private:
  struct Mapping {
    void* base;
    size_t length;
    bool huge;
  };
  std::mutex mutex_;
  std::vector<Mapping> kept_;  // oldest first
  size_t bytes_ = 0;
};

// A tensor of `sizes` on a private anonymous mapping, given back to the MappingPool when the tensor's storage is
// freed, with its experts of `layout` that received no rows zero; an undefined tensor when mmap fails. With
// `sparse` (see kSparseShare) of 4 KiB pages, else 2 MiB-aligned and marked for huge pages from
// kHugePageMinBytes on. A fresh mapping reads as zero. On a kept one, those experts are zero-filled, or with
// `sparse` their whole pages dropped (MADV_DONTNEED: they read as zero again without a pass, and are faulted in
// only if written) and the rest of them zero-filled. Dropping the idle experts of a dense gradient instead made
// the experts written next call fault in again: Qwen3-30B-A3B/8 T = 16 (~46 of 128 experts idle) forward+
// backward took 11-14 ms with 1600-2400 page faults per call, against 7.8 ms with no fault and the memset.
inline at::Tensor gradient_on_pooled_pages(const Layout& layout, at::IntArrayRef sizes, const at::TensorOptions& options,
                                           bool sparse) {
  constexpr size_t kHugePage = size_t{1} << 21, kPage = size_t{1} << 12;
  const size_t bytes = c10::multiply_integers(sizes) * options.dtype().itemsize();
  const bool huge = !sparse && bytes >= static_cast<size_t>(kHugePageMinBytes);
  const size_t length = huge ? bytes + kHugePage : (bytes + kPage - 1) & ~(kPage - 1);  // huge: room to align
  MappingPool& pool = MappingPool::instance();
  void* base = pool.take(length, huge);
  const bool kept = base != nullptr;
  if (!kept) base = mmap(nullptr, length, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (base == MAP_FAILED) return at::Tensor();
  auto start = reinterpret_cast<uintptr_t>(base);
  if (huge) {
    start = (start + kHugePage - 1) & ~(kHugePage - 1);
    if (!kept) madvise(reinterpret_cast<void*>(start), (bytes + kHugePage - 1) & ~(kHugePage - 1), MADV_HUGEPAGE);
  }
  if (kept) {
    const uintptr_t block_bytes = bytes / layout.num_experts;
    for (int64_t e = 0; e < layout.num_experts; ++e) {
      if (layout.tokens_per_expert[e] != 0) continue;
      int64_t last = e;  // a run of idle experts [e, last]
      while (last + 1 < layout.num_experts && layout.tokens_per_expert[last + 1] == 0) ++last;
      const uintptr_t begin = start + e * block_bytes, end = start + (last + 1) * block_bytes;
      const uintptr_t page_begin = (begin + kPage - 1) & ~(kPage - 1), page_end = end & ~(kPage - 1);
      if (sparse && page_end > page_begin) {
        std::memset(reinterpret_cast<void*>(begin), 0, page_begin - begin);
        madvise(reinterpret_cast<void*>(page_begin), page_end - page_begin, MADV_DONTNEED);
        std::memset(reinterpret_cast<void*>(page_end), 0, end - page_end);
      } else {
        std::memset(reinterpret_cast<void*>(begin), 0, end - begin);
      }
      e = last;
    }
  }
  return at::from_blob(reinterpret_cast<void*>(start), sizes,
                       [base, length, huge](void*) { MappingPool::instance().give(base, length, huge); },
                       options.device(at::kCPU));
}
#endif

// The gradient [E, ...] (contiguous, `sizes`) of an expert weight or bias, with the experts that received no
// rows already zero; the caller writes the others whole. From kPooledMinBytes on, on pooled pages (see
// gradient_on_pooled_pages); smaller ones on at::empty's memory with those experts zero-filled.
inline at::Tensor expert_gradient(const Layout& layout, at::IntArrayRef sizes, const at::TensorOptions& options) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  const auto bytes = static_cast<int64_t>(c10::multiply_integers(sizes) * options.dtype().itemsize());
  if (bytes >= kPooledMinBytes) {
    int64_t written = 0;
    for (int64_t e = 0; e < layout.num_experts; ++e) written += layout.tokens_per_expert[e] != 0;
    at::Tensor gradient = gradient_on_pooled_pages(layout, sizes, options, /*sparse=*/written * kSparseShare <= layout.num_experts);
    if (gradient.defined()) return gradient;
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
