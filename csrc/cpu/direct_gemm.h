// The GEMM of an expert that received a handful of rows, as a direct vectorised loop instead of at::mm.
//
// At decode sizes most experts get one or two rows, and an at::mm call (dispatcher, strided views, MKL's
// own setup) costs several microseconds whatever the FLOPs: Qwen3-30B-A3B/8 at T = 1 made ~25 of them per
// forward. Below kDirectRows rows the product is instead dot products of each row with the unit-stride rows
// of the expert's weight, straight from its memory (no tensor, no view), accumulated in the opmath type.
// The order of every sum depends on the shapes only: bitwise the same for any thread count.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

namespace moe_kernels::cpu {

// Rows at or below which an expert's tile runs direct_gemm. Qwen3-30B-A3B/8 (d 256, d_ff 96, E 128, k 8),
// 1 thread, experts only, median µs at::mm -> direct (4 rows): T = 1 459 -> 348, T = 16 3951 -> 2958,
// T = 64 9013 -> 7602 (limit 4 / 8 / 16: 8965 / 7866 / 7930); with 16 to 32 rows per expert both paths run
// alike, and at 64 rows (Mixtral/8 at T = 256) MKL is ~30% faster: 16.
constexpr int64_t kDirectRows = 16;

// Output columns computed together are taken from kColumns lanes far apart (column b of each lane, lane l
// starting at column l·cols/kColumns), not from kColumns neighbours: each lane then reads its weight rows
// strictly in address order, one sequential stream per lane that the hardware prefetcher follows, and the
// lanes' streams are in flight at once. Neighbouring columns interleave their rows line by line, which the
// prefetcher takes for one stream. The weights of a decode step come from DRAM, and with one stream one
// core stays latency-bound: 8 cold [192, 256] float32 GEMVs (Qwen3-30B-A3B/8's up projections at T = 1),
// 1 row, median µs: neighbour columns 186-230 (7-8.5 GB/s), 2 lanes 169-202, 4 lanes 89-97 (16-17 GB/s),
// 8 lanes 108; software prefetch on top of the lanes made it slower (102-116).

// Bytes of each lane of the next product that direct_gemm prefetches (next_b). 8 cold [128, 96] float32
// GEMVs (a 128-column slice of Qwen3-30B-A3B/8's down projections at T = 1), median µs: 32 -> 25 with 4 lines
// (2 and 8 lines alike); no change on the [192, 256] up projections, whose lanes are longer.
constexpr int64_t kLaneHeadBytes = 256;

namespace detail {

// kColumns output columns of kRows rows: out[i][c] = Σ_k a[i][k]·b[c][k], for k < depth.
template <int kRows, int kColumns, typename scalar_t, typename opmath_t>
inline void direct_block(const opmath_t* const* a, const scalar_t* const (&b)[kColumns], int64_t depth,
                         opmath_t (&out)[kRows][kColumns]) {
  using Vec = at::vec::Vectorized<opmath_t>;
  constexpr int64_t step = Vec::size();
  const int64_t vector_depth = depth - depth % step;
  Vec acc[kRows][kColumns];
  for (int i = 0; i < kRows; ++i) {
    for (int c = 0; c < kColumns; ++c) acc[i][c] = Vec(opmath_t(0));
  }
  for (int64_t k = 0; k < vector_depth; k += step) {
    Vec w[kColumns];
    for (int c = 0; c < kColumns; ++c) {
      if constexpr (std::is_same_v<scalar_t, opmath_t>) {
        w[c] = Vec::loadu(b[c] + k);
      } else {
        at::vec::load_to_float(b[c] + k, w[c]);
      }
    }
    for (int i = 0; i < kRows; ++i) {
      const Vec row = Vec::loadu(a[i] + k);
      for (int c = 0; c < kColumns; ++c) acc[i][c] = at::vec::fmadd(row, w[c], acc[i][c]);
    }
  }
  for (int i = 0; i < kRows; ++i) {
    for (int c = 0; c < kColumns; ++c) {
      opmath_t sum = at::vec::vec_reduce_all<opmath_t>([](Vec x, Vec y) { return x + y; }, acc[i][c]);
      for (int64_t k = vector_depth; k < depth; ++k) sum += a[i][k] * static_cast<opmath_t>(b[c][k]);
      out[i][c] = sum;
    }
  }
}

// direct_gemm for a fixed row count: kColumns lanes of cols / kColumns columns each, walked together
// (independent accumulators keep the FMA units busy, independent streams the memory), then the remaining
// columns one by one.
template <int kRows, typename scalar_t, typename opmath_t>
inline void direct_rows(const opmath_t* const* a, const scalar_t* b, int64_t b_stride, int64_t cols, int64_t depth,
                        scalar_t* out, int64_t out_stride) {
  constexpr int kColumns = kRows <= 2 ? 4 : 2;  // kRows·kColumns accumulators and kColumns weights in 16 registers
  const int64_t lane = cols / kColumns;
  for (int64_t j = 0; j < lane; ++j) {
    const scalar_t* columns[kColumns];
    for (int c = 0; c < kColumns; ++c) columns[c] = b + (c * lane + j) * b_stride;
    opmath_t block[kRows][kColumns];
    direct_block<kRows, kColumns>(a, columns, depth, block);
    for (int i = 0; i < kRows; ++i) {
      for (int c = 0; c < kColumns; ++c) out[i * out_stride + c * lane + j] = static_cast<scalar_t>(block[i][c]);
    }
  }
  for (int64_t j = kColumns * lane; j < cols; ++j) {
    const scalar_t* column[1] = {b + j * b_stride};
    opmath_t block[kRows][1];
    direct_block<kRows, 1>(a, column, depth, block);
    for (int i = 0; i < kRows; ++i) out[i * out_stride + j] = static_cast<scalar_t>(block[i][0]);
  }
}

}  // namespace detail

// Whether expert matrices of `weight` [E, n, m] can feed direct_gemm as b for compute type `dtype`: same
// dtype (else the general path converts one expert per call) and unit-stride rows.
inline bool direct_weights(const at::Tensor& weight, at::ScalarType dtype) {
  return weight.scalar_type() == dtype && weight.stride(2) == 1;
}

// The opmath rows direct_gemm reads as a: the rows themselves when scalar_t is the opmath type, else
// converted into scratch [count, depth].
template <typename scalar_t, typename opmath_t>
void opmath_rows(const scalar_t* const* rows, int64_t count, int64_t depth, opmath_t* scratch, const opmath_t** out) {
  for (int64_t i = 0; i < count; ++i) {
    if constexpr (std::is_same_v<scalar_t, opmath_t>) {
      out[i] = rows[i];
    } else {
      at::vec::convert(rows[i], scratch + i * depth, depth);
      out[i] = scratch + i * depth;
    }
  }
}

// out[i, j] = Σ_k a[i][k]·b[j·b_stride + k] for i < rows, j < cols, k < depth: rows × depth (opmath rows,
// each unit-stride) times the transpose of cols × depth (scalar_t rows of stride b_stride, unit-stride
// inside), rounded once into out (scalar_t, rows of stride out_stride). Callers hold rows ≤ kDirectRows.
// next_b: the b of the caller's next direct_gemm (same cols, depth, b_stride), or nullptr: the first bytes of
// each of its lanes are prefetched before this product starts, so that its streams are under way when it
// begins (each lane's hardware stream otherwise starts with a few latency-bound lines).
template <typename scalar_t, typename opmath_t = at::opmath_type<scalar_t>>
void direct_gemm(int64_t rows, const opmath_t* const* a, const scalar_t* b, int64_t b_stride, int64_t cols,
                 int64_t depth, scalar_t* out, int64_t out_stride, const scalar_t* next_b = nullptr) {
  if (next_b != nullptr) {
    for (int lane = 0; lane < 4; ++lane) {  // the lane starts of 4 lanes (those of 2 lanes among them)
      const char* head = reinterpret_cast<const char*>(next_b + lane * (cols / 4) * b_stride);
      for (int64_t byte = 0; byte < kLaneHeadBytes; byte += 64) __builtin_prefetch(head + byte);
    }
  }
  for (int64_t first = 0; first < rows; first += 4) {  // groups of up to 4 rows (register blocking)
    const opmath_t* const* group = a + first;
    scalar_t* group_out = out + first * out_stride;
    switch (std::min<int64_t>(4, rows - first)) {
      case 1: detail::direct_rows<1>(group, b, b_stride, cols, depth, group_out, out_stride); break;
      case 2: detail::direct_rows<2>(group, b, b_stride, cols, depth, group_out, out_stride); break;
      case 3: detail::direct_rows<3>(group, b, b_stride, cols, depth, group_out, out_stride); break;
      default: detail::direct_rows<4>(group, b, b_stride, cols, depth, group_out, out_stride); break;
    }
  }
}

}  // namespace moe_kernels::cpu
