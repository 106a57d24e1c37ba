// The backward's float32 GEMMs of an expert with few rows, as register-blocked loops instead of at::mm.
//
// A backward at T = 256 of a layer with many small experts (Qwen3-30B-A3B/8: 128 experts of ~16 rows) runs,
// per expert, products that read the expert's whole weight once (dx rows = grad_pre·W_up, u = dy·W_down) and
// products that write the expert's whole weight gradient once (grad_pre[rows]ᵀ·x[rows]), with only ~16
// rows of work for each weight byte. MKL then spends its time packing the cold weight and zero-scaling the
// cold gradient before accumulating into it; these loops instead
//   - read the weight in place, while prefetching the next work item's weight a line at a time spread over
//     the product (the weight of the next expert is not in any cache: the hardware prefetcher does not
//     cross to it, and reading it only when its product starts leaves one core latency-bound), and
//   - write each line of the gradient once, with non-temporal stores (no read for ownership of the cold
//     line; the optimizer reads the gradient long after the backward).
// Qwen3-30B-A3B/8 shapes, 128 experts of ~16 rows, caches flushed, 1 thread, ms MKL -> here: dx rows
// [16, 192]·[192, 256] 6.2 -> 4.0, u [16, 256]·[256, 96] 3.4 -> 2.2, grad_up_weight [192, 16]·[16, 256] 7.1
// -> 4.6, grad_down_weight [256, 16]·[16, 96] 4.1 -> 2.2. The ops use these for row tiles below kSplitRows
// rows (experts.h): at 64 rows (Mixtral-8x7B/8, main-8e-top2 at T = 256) MKL's packing pays for itself and
// the two run alike. A long depth (Mixtral-8x7B/8's dx rows, depth 3584) re-reads its column strip of the
// weight from L2 for every 6 rows: MKL's blocking wins there (28 vs 45 ms), hence kStreamDepth.
//
// Every output element is one fused multiply-add chain over k in increasing order, whatever the tile it
// falls in: bitwise the same for any thread count and any split of the columns into work items.
#pragma once

#include <ATen/ATen.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include "experts.h"

#include <algorithm>
#include <cstdint>
#include <vector>

#if defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif

namespace moe_kernels::cpu {

// Depth (the summed dimension) up to which the products below run instead of at::mm: their column strip of
// the weight, depth × 64 bytes, then stays within L1/L2 while all row blocks reuse it.
constexpr int64_t kStreamDepth = 1024;

// The lines of a [rows, row_bytes] region with a row stride, handed out one at a time to prefetch: the next
// work item's weight (or its slice of columns), spread over the current product.
class Prefetcher {
 public:
  Prefetcher() = default;
  Prefetcher(const void* data, int64_t rows, int64_t row_bytes, int64_t stride_bytes)
      : row_(static_cast<const char*>(data)), rows_(rows), row_bytes_(row_bytes), stride_(stride_bytes) {}

  int64_t lines() const { return rows_ * ((row_bytes_ + 63) / 64); }

  // Issues one prefetch every `every` calls of step().
  void pace(int64_t every) { every_ = countdown_ = std::max<int64_t>(1, every); }

  void step() {
    if (--countdown_ > 0 || rows_ == 0) return;
    countdown_ = every_;
    __builtin_prefetch(row_ + offset_, 0, 2);
    offset_ += 64;
    if (offset_ >= row_bytes_) {
      offset_ = 0;
      row_ += stride_;
      --rows_;
    }
  }

 private:
  const char* row_ = nullptr;
  int64_t rows_ = 0, row_bytes_ = 0, stride_ = 0, offset_ = 0;
  int64_t every_ = 1, countdown_ = 1;
};

namespace detail {

using FloatVec = at::vec::Vectorized<float>;
constexpr int64_t kBlockRows = 6;                  // rows of an output block: 6 × 2 accumulators + 2 loads fit 16 registers
constexpr int64_t kBlockColumns = 2 * FloatVec::size();  // 16 floats: one 64-byte line

// Columns [j, j + width) of rows c[0..kRows) (row stride ldc) from 2 accumulators per row; width < kBlockColumns
// only at the right edge. Full lines go out with non-temporal stores when `stream` (32-byte aligned rows).
template <int kRows>
inline void store_block(const FloatVec (&acc)[kRows][2], float* c, int64_t ldc, int64_t width, bool stream) {
  for (int r = 0; r < kRows; ++r) {
    float* out = c + r * ldc;
    if (width == kBlockColumns) {
#if defined(CPU_CAPABILITY_AVX2)
      if (stream) {
        _mm256_stream_ps(out, acc[r][0]);
        _mm256_stream_ps(out + FloatVec::size(), acc[r][1]);
        continue;
      }
#endif
      acc[r][0].store(out);
      acc[r][1].store(out + FloatVec::size());
    } else {
      acc[r][0].store(out, std::min<int64_t>(width, FloatVec::size()));
      if (width > FloatVec::size()) acc[r][1].store(out + FloatVec::size(), width - FloatVec::size());
    }
  }
}

// Columns [0, width) of b's row k as two vectors (width <= kBlockColumns; zeros past it).
inline void load_line(const float* b, int64_t width, FloatVec& low, FloatVec& high) {
  if (width == kBlockColumns) {
    low = FloatVec::loadu(b);
    high = FloatVec::loadu(b + FloatVec::size());
  } else {
    low = FloatVec::loadu(b, std::min<int64_t>(width, FloatVec::size()));
    high = width > FloatVec::size() ? FloatVec::loadu(b + FloatVec::size(), width - FloatVec::size()) : FloatVec(0.f);
  }
}

// c[kRows, width] = a[kRows, depth] · b[depth, width] (rows of a at stride lda, of b at ldb), one prefetch step per k.
template <int kRows>
inline void rows_block(int64_t depth, int64_t width, const float* a, int64_t lda, const float* b, int64_t ldb,
                       float* c, int64_t ldc, Prefetcher& prefetcher) {
  FloatVec acc[kRows][2];
  for (int r = 0; r < kRows; ++r) acc[r][0] = acc[r][1] = FloatVec(0.f);
  for (int64_t k = 0; k < depth; ++k) {
    FloatVec low, high;
    load_line(b + k * ldb, width, low, high);
    prefetcher.step();
    for (int r = 0; r < kRows; ++r) {
      const FloatVec ar(a[r * lda + k]);
      acc[r][0] = at::vec::fmadd(ar, low, acc[r][0]);
      acc[r][1] = at::vec::fmadd(ar, high, acc[r][1]);
    }
  }
  store_block<kRows>(acc, c, ldc, width, /*stream=*/false);
}

// c[kRows, width] = a[depth, kRows]ᵀ · b[depth, width] (a's columns at unit stride, its rows at lda).
template <int kRows>
inline void transposed_block(int64_t depth, int64_t width, const float* a, int64_t lda, const float* b, int64_t ldb,
                             float* c, int64_t ldc, bool stream) {
  FloatVec acc[kRows][2];
  for (int r = 0; r < kRows; ++r) acc[r][0] = acc[r][1] = FloatVec(0.f);
  for (int64_t k = 0; k < depth; ++k) {
    FloatVec low, high;
    load_line(b + k * ldb, width, low, high);
    for (int r = 0; r < kRows; ++r) {
      const FloatVec ar(a[k * lda + r]);
      acc[r][0] = at::vec::fmadd(ar, low, acc[r][0]);
      acc[r][1] = at::vec::fmadd(ar, high, acc[r][1]);
    }
  }
  store_block<kRows>(acc, c, ldc, width, stream);
}

// Calls block<r>(...) for the r = rows (1..kBlockRows) of the last, partial row block.
template <template <int> class Block, typename... Args>
inline void dispatch_rows(int64_t rows, Args&&... args) {
  switch (rows) {
    case 6: Block<6>::run(args...); break;
    case 5: Block<5>::run(args...); break;
    case 4: Block<4>::run(args...); break;
    case 3: Block<3>::run(args...); break;
    case 2: Block<2>::run(args...); break;
    default: Block<1>::run(args...); break;
  }
}

template <int kRows>
struct RowsBlock {
  template <typename... Args>
  static void run(Args&&... args) { rows_block<kRows>(args...); }
};

template <int kRows>
struct TransposedBlock {
  template <typename... Args>
  static void run(Args&&... args) { transposed_block<kRows>(args...); }
};

}  // namespace detail

// Whether the expert matrices [depth, n] of `weight` [E, depth, n] feed stream_gemm as b for compute dtype
// `dtype`: float32 weights with unit-stride rows and depth <= kStreamDepth (else at::mm).
inline bool streams_weight(const at::Tensor& weight, at::ScalarType dtype) {
  return dtype == at::kFloat && weight.scalar_type() == at::kFloat && weight.stride(2) == 1 &&
         weight.size(1) <= kStreamDepth;
}

// Columns [begin, end) of expert `expert` of a float32 `weight` [E, depth, n] as a Prefetcher.
inline Prefetcher weight_columns(const at::Tensor& weight, int64_t expert, int64_t begin, int64_t end) {
  const float* data = static_cast<const float*>(weight.const_data_ptr()) + expert * weight.stride(0) + begin;
  return Prefetcher(data, weight.size(1), (end - begin) * 4, weight.stride(1) * 4);
}

// Whether an expert's weight gradient [n, p] from `depth` rows is stream_gemm_transposed_a's: while its
// packed b (depth × p floats) fits L1 (32 KiB), which every row block of the gradient reads again. Above,
// MKL's blocking wins: main-64e-top8's grad_up_weight (32 rows × 512) 0.84× MKL here, Qwen3-30B-A3B/8's
// (16 × 256) 1.4×, main-64e-top8's grad_down_weight (32 × 128) 1.5×.
inline bool streams_gradient(int64_t depth, int64_t p) { return depth * p * int64_t{sizeof(float)} <= int64_t{32} << 10; }

// c[m, n] = a[m, depth] · b[depth, n], float32, every matrix row-major with row strides lda, ldb, ldc (b is
// an expert's weight, or a slice of its columns, read in place). `next` (the next work item's weight) is
// prefetched meanwhile, its lines spread evenly over the product's k steps.
inline void stream_gemm(int64_t m, int64_t n, int64_t depth, const float* a, int64_t lda, const float* b, int64_t ldb,
                        float* c, int64_t ldc, Prefetcher next) {
  using namespace detail;
  const int64_t strips = (n + kBlockColumns - 1) / kBlockColumns, blocks = (m + kBlockRows - 1) / kBlockRows;
  next.pace(strips * blocks * depth / std::max<int64_t>(1, next.lines()));
  for (int64_t j = 0; j < n; j += kBlockColumns) {
    const int64_t width = std::min(kBlockColumns, n - j);
    for (int64_t i = 0; i < m; i += kBlockRows) {
      dispatch_rows<RowsBlock>(std::min(kBlockRows, m - i), depth, width, a + i * lda, lda, b + j, ldb, c + i * ldc + j,
                               ldc, next);
    }
  }
}

// c[n, p] = a[depth, n]ᵀ · b[depth, p], float32, row-major with row strides lda, ldb, ldc: an expert's weight
// gradient (or a slice of its rows) from its `depth` rows, each line of c written once, with non-temporal
// stores where c's rows are 32-byte aligned.
inline void stream_gemm_transposed_a(int64_t n, int64_t p, int64_t depth, const float* a, int64_t lda, const float* b,
                                     int64_t ldb, float* c, int64_t ldc) {
  using namespace detail;
  const bool stream = reinterpret_cast<uintptr_t>(c) % 32 == 0 && ldc % FloatVec::size() == 0;
  // b's column strips packed [strips][depth][kBlockColumns] (zeros past p), and a row block's columns of a
  // [depth][kBlockRows]: unit-stride operands whatever the row strides, which are often 2^k floats and would
  // map a strip's depth lines onto a few L1 sets (Mixtral-8x7B/8's 64 rows at 2 KiB and 14 KiB strides).
  const int64_t strips = (p + kBlockColumns - 1) / kBlockColumns;
  std::vector<float> b_strips(strips * depth * kBlockColumns, 0.f), a_block(depth * kBlockRows);
  for (int64_t k = 0; k < depth; ++k) {
    for (int64_t s = 0; s < strips; ++s) {
      std::copy_n(b + k * ldb + s * kBlockColumns, std::min(kBlockColumns, p - s * kBlockColumns),
                  b_strips.data() + (s * depth + k) * kBlockColumns);
    }
  }
  for (int64_t i = 0; i < n; i += kBlockRows) {
    const int64_t rows = std::min(kBlockRows, n - i);
    for (int64_t k = 0; k < depth; ++k) std::copy_n(a + k * lda + i, rows, a_block.data() + k * kBlockRows);
    for (int64_t s = 0; s < strips; ++s) {
      dispatch_rows<TransposedBlock>(rows, depth, std::min(kBlockColumns, p - s * kBlockColumns), a_block.data(),
                                     kBlockRows, b_strips.data() + s * depth * kBlockColumns, kBlockColumns,
                                     c + i * ldc + s * kBlockColumns, ldc, stream);
    }
  }
#if defined(CPU_CAPABILITY_AVX2)
  _mm_sfence();  // the non-temporal stores are visible before the item ends
#endif
}

// target[n, p] = a[depth, n]ᵀ · b[depth, p]: a slice of an expert's weight gradient (target, unit-stride rows)
// from its `depth` rows (a and b: row-major views in the compute dtype, unit column stride). By
// stream_gemm_transposed_a for float32 where streams_gradient says it beats MKL, else by at::mm, into target
// or converted to target's dtype.
inline void weight_gradient_product(const at::Tensor& a, const at::Tensor& b, at::Tensor target) {
  const int64_t depth = a.size(0), n = a.size(1), p = b.size(1);
  if (a.scalar_type() == at::kFloat && target.scalar_type() == at::kFloat && streams_gradient(depth, p)) {
    stream_gemm_transposed_a(n, p, depth, a.const_data_ptr<float>(), a.stride(0), b.const_data_ptr<float>(),
                             b.stride(0), target.data_ptr<float>(), target.stride(0));
  } else if (target.scalar_type() == a.scalar_type()) {
    at::mm_out(target, transposed(a), b);
  } else {
    target.copy_(at::mm(transposed(a), b));
  }
}

}  // namespace moe_kernels::cpu
