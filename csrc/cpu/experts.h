// What the CPU expert ops (expert_up.cpp, expert_down_combine.cpp) share: the permutation read on the
// host, the work lists their parallel loops walk, and one GEMM on strided views through ATen's BLAS.
//
// Determinism (PLAN decision 9): every work list and tile size below depends on the routing and the
// shapes only, never on the thread count; each parallel item writes its own outputs; every sum over
// the rows of a token or of an expert runs in one fixed order inside one item. So results are bitwise
// the same for any number of threads.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Config.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <string_view>
#include <vector>

namespace moe_kernels::cpu {

#if AT_MKL_ENABLED()
extern "C" int MKL_Set_Num_Threads_Local(int num_threads);  // exported by libtorch_cpu, which links MKL
#endif

// While alive, BLAS calls of this thread run on one thread. MKL splits a GEMM differently for different
// thread counts (a 10-row product comes out different in its last rows with 1 and 2 threads), and inside
// a parallel region it still partitions by the global count: each work item's GEMMs run single-threaded,
// the same way whatever the thread count, and the parallelism is ours.
class SingleThreadedBlas {
 public:
#if AT_MKL_ENABLED()
  SingleThreadedBlas() : previous_(MKL_Set_Num_Threads_Local(1)) {}
  ~SingleThreadedBlas() { MKL_Set_Num_Threads_Local(previous_); }

 private:
  int previous_;
#endif
};

// Multiply-adds each thread of a parallel loop gets at least (parallel_items' work_per_item). A parallel region
// costs its fork and join, microseconds on a quiet machine, and a whole time slice (~10 ms) while another
// process holds a core, so a loop with less work than two threads' share runs on one thread, as ATen keeps
// at::internal::GRAIN_SIZE elements per thread. 1M float32 multiply-adds of a decode step stream 4 MB of
// weights, ~0.2 ms of one core. Qwen3-30B-A3B/8 T = 1 (~0.4M in GEMM 1): one thread; Mixtral-8x7B/8 T = 1
// (3.7M): two. Which thread runs an item never changes the result.
constexpr int64_t kMinWorkPerThread = int64_t{1} << 20;

// at::parallel_for over [0, count) items, each thread's BLAS single-threaded (see SingleThreadedBlas), each
// thread given at least kMinWorkPerThread multiply-adds of items of `work_per_item` (default: any one item).
template <typename F>
void parallel_items(int64_t count, const F& body, int64_t work_per_item = kMinWorkPerThread) {
  const int64_t grain = (kMinWorkPerThread + std::max<int64_t>(work_per_item, 1) - 1) / std::max<int64_t>(work_per_item, 1);
  at::parallel_for(0, count, grain, [&](int64_t begin, int64_t end) {
    SingleThreadedBlas single_threaded;
    body(begin, end);
  });
}

// Rows per GEMM tile of one expert, and output columns per slice of the scatter-GEMMs (combine, dx) and
// of the weight gradients. Fixed numbers: a tile's shape must not depend on the thread count (see above).
// 128 keeps a float32 tile of a 4096-wide layer at 2 MiB, inside L2/L3, and BLAS at full speed.
constexpr int64_t kTileRows = 128;
constexpr int64_t kSliceColumns = 128;

// The pipeline's Permutation (moe_kernels/pipeline.py), checked, as host pointers.
struct Layout {
  int64_t num_tokens;
  int64_t num_slots;
  int64_t num_experts;
  int64_t num_rows;
  const int32_t* tokens_per_expert;
  const int32_t* expert_offsets;
  const int32_t* sorted_rows;
  const int32_t* sorted_assignments;

  // The token of the assignment held by sorted row r (a real row: inside its expert's count).
  int64_t token_of_row(int64_t row) const { return sorted_assignments[row] / num_slots; }
};

inline Layout check_layout(std::string_view op, const at::Tensor& tokens_per_expert, const at::Tensor& expert_offsets,
                           const at::Tensor& sorted_rows, const at::Tensor& sorted_assignments, int64_t num_experts) {
  for (const at::Tensor* tensor : {&tokens_per_expert, &expert_offsets, &sorted_rows, &sorted_assignments}) {
    TORCH_CHECK(tensor->device().is_cpu() && tensor->scalar_type() == at::kInt && tensor->is_contiguous(), op,
                ": the permutation tensors must be contiguous int32 CPU tensors (moe_kernels.pipeline.Permutation), got ",
                tensor->scalar_type(), " on ", tensor->device());
  }
  TORCH_CHECK(tokens_per_expert.dim() == 1 && tokens_per_expert.size(0) == num_experts, op,
              ": tokens_per_expert must be [E=", num_experts, "], got ", tokens_per_expert.sizes());
  TORCH_CHECK(expert_offsets.dim() == 1 && expert_offsets.size(0) == num_experts + 1, op,
              ": expert_offsets must be [E+1=", num_experts + 1, "], got ", expert_offsets.sizes());
  TORCH_CHECK(sorted_rows.dim() == 2 && sorted_assignments.dim() == 1, op,
              ": sorted_rows must be [T, S] and sorted_assignments [R], got ", sorted_rows.sizes(), " and ",
              sorted_assignments.sizes());
  Layout layout{sorted_rows.size(0), sorted_rows.size(1), num_experts, sorted_assignments.size(0),
                tokens_per_expert.data_ptr<int32_t>(), expert_offsets.data_ptr<int32_t>(),
                sorted_rows.data_ptr<int32_t>(), sorted_assignments.data_ptr<int32_t>()};
  for (int64_t e = 0; e < num_experts; ++e) {
    const int64_t start = layout.expert_offsets[e], count = layout.tokens_per_expert[e];
    TORCH_CHECK(start >= 0 && count >= 0 && start + count <= layout.expert_offsets[e + 1] &&
                    layout.expert_offsets[e + 1] <= layout.num_rows,
                op, ": expert ", e, "'s segment [", start, ", ", start, " + ", count, ") does not fit expert_offsets ",
                "and R=", layout.num_rows, ": not a Permutation of moe_kernels.pipeline's layout");
  }
  const int64_t num_assignments = layout.num_tokens * layout.num_slots;
  for (int64_t e = 0; e < num_experts; ++e) {
    for (int64_t r = layout.expert_offsets[e]; r < layout.expert_offsets[e] + layout.tokens_per_expert[e]; ++r) {
      TORCH_CHECK(layout.sorted_assignments[r] >= 0 && layout.sorted_assignments[r] < num_assignments, op,
                  ": sorted_assignments[", r, "] = ", layout.sorted_assignments[r], " is outside [0, T*S=",
                  num_assignments, ") inside expert ", e, "'s rows");
    }
  }
  for (int64_t a = 0; a < num_assignments; ++a) {
    TORCH_CHECK(layout.sorted_rows[a] >= -1 && layout.sorted_rows[a] < layout.num_rows, op, ": sorted_rows holds ",
                layout.sorted_rows[a], " at assignment ", a, ", outside [-1, R=", layout.num_rows, ")");
  }
  return layout;
}

// A run of at most kTileRows consecutive sorted rows [begin, end) of one expert.
struct RowTile {
  int64_t expert;
  int64_t begin;
  int64_t end;
};

// Every expert's rows cut into tiles, experts in order; experts without rows give none.
inline std::vector<RowTile> row_tiles(const Layout& layout) {
  std::vector<RowTile> tiles;
  for (int64_t e = 0; e < layout.num_experts; ++e) {
    const int64_t start = layout.expert_offsets[e], end = start + layout.tokens_per_expert[e];
    for (int64_t begin = start; begin < end; begin += kTileRows) tiles.push_back({e, begin, std::min(end, begin + kTileRows)});
  }
  return tiles;
}

// Rows of all tiles together (the kept assignments): a loop's work, for parallel_items.
inline int64_t total_rows(const std::vector<RowTile>& tiles) {
  int64_t rows = 0;
  for (const RowTile& tile : tiles) rows += tile.end - tile.begin;
  return rows;
}

// Rows of the largest tile: what a work item's scratch needs (never more than kTileRows; 1 at T = 1, so a
// decode step allocates no 128-row buffers).
inline int64_t tile_rows(const std::vector<RowTile>& tiles) {
  int64_t rows = 0;
  for (const RowTile& tile : tiles) rows = std::max(rows, tile.end - tile.begin);
  return rows;
}

// Experts at or above which a weight gradient is one item per expert: enough items to share among threads,
// and half the GEMM calls of slicing (which matter when each expert has a handful of rows).
constexpr int64_t kWholeExpertItems = 8;

// Rows from which one GEMM (an expert's weight gradient, or a row tile's product with an expert's weight) is
// split by its output columns into items of kSliceColumns: a few large experts (Mixtral-8x7B/8 at T = 256:
// 8 experts of ~64 rows) then give tens of items rather than 8 of uneven sizes, so that threads share them
// evenly, and each slice still reads its columns of the weight once for all of its rows.
constexpr int64_t kSplitRows = 64;

// Output columns [begin, end) of `width` for one GEMM of `rows` rows: the whole width below kSplitRows rows
// (unless `always_slice`), else slices of kSliceColumns (a rule on the shapes, never on the thread count).
inline int64_t slice_width(int64_t rows, int64_t width, bool always_slice = false) {
  return always_slice || rows >= kSplitRows ? kSliceColumns : width;
}

// A work item: a run of sorted rows [row_begin, row_end) of one expert times output columns [begin, end).
struct SliceItem {
  int64_t expert;
  int64_t row_begin;
  int64_t row_end;
  int64_t begin;
  int64_t end;
};

// The items of a per-row-tile GEMM with `width` output columns: each tile, sliced by slice_width.
inline std::vector<SliceItem> tile_slices(const std::vector<RowTile>& tiles, int64_t width) {
  std::vector<SliceItem> items;
  for (const RowTile& tile : tiles) {
    const int64_t slice = slice_width(tile.end - tile.begin, width);
    for (int64_t begin = 0; begin < width; begin += slice) {
      items.push_back({tile.expert, tile.begin, tile.end, begin, std::min(width, begin + slice)});
    }
  }
  return items;
}

// The items of the weight-gradient loops: every expert that has rows, all of its rows, its `width` gradient
// rows sliced by slice_width (always with fewer than kWholeExpertItems experts).
inline std::vector<SliceItem> expert_slices(const Layout& layout, int64_t width) {
  std::vector<SliceItem> items;
  for (int64_t e = 0; e < layout.num_experts; ++e) {
    const int64_t rows = layout.tokens_per_expert[e], start = layout.expert_offsets[e];
    if (rows == 0) continue;
    const int64_t slice = slice_width(rows, width, layout.num_experts < kWholeExpertItems);
    for (int64_t begin = 0; begin < width; begin += slice) {
      items.push_back({e, start, start + rows, begin, std::min(width, begin + slice)});
    }
  }
  return items;
}

// Zero-fills the padding rows of a contiguous [R, n] tensor: rows [expert_offsets[e] + tokens_per_expert[e],
// expert_offsets[e + 1]) of every expert and rows [expert_offsets[E], R).
inline void zero_padding_rows(const Layout& layout, at::Tensor& rows) {
  const int64_t row_bytes = rows.size(1) * rows.element_size();
  char* data = static_cast<char*>(rows.data_ptr());
  for (int64_t e = 0; e <= layout.num_experts; ++e) {
    const int64_t begin = e < layout.num_experts ? layout.expert_offsets[e] + layout.tokens_per_expert[e]
                                                 : layout.expert_offsets[e];
    const int64_t end = e < layout.num_experts ? layout.expert_offsets[e + 1] : layout.num_rows;
    if (end > begin) std::memset(data + begin * row_bytes, 0, (end - begin) * row_bytes);
  }
}

// A [rows, cols] view of raw memory with element strides, for at::mm_out without dispatcher views.
inline at::Tensor matrix(const void* data, int64_t rows, int64_t cols, int64_t row_stride, int64_t col_stride,
                         at::ScalarType dtype) {
  return at::from_blob(const_cast<void*>(data), {rows, cols}, {row_stride, col_stride},
                       at::TensorOptions().dtype(dtype));
}

// Expert e of a [E, n, m] weight as an [n, m] matrix of `dtype`: a view when the dtype matches, else a
// converted copy of that one expert (kernels convert on load: never all E experts per call).
inline at::Tensor expert_matrix(const at::Tensor& weight, int64_t expert, at::ScalarType dtype) {
  if (weight.scalar_type() == dtype) {
    const auto element_size = weight.element_size();
    return matrix(static_cast<const char*>(weight.const_data_ptr()) + expert * weight.stride(0) * element_size,
                  weight.size(1), weight.size(2), weight.stride(1), weight.stride(2), dtype);
  }
  return weight.select(0, expert).to(dtype);
}

// The transpose of a matrix as a view (no dispatcher call).
inline at::Tensor transposed(const at::Tensor& m) {
  return matrix(m.const_data_ptr(), m.size(1), m.size(0), m.stride(1), m.stride(0), m.scalar_type());
}

// Rows of a [n, m] tensor as it is when its rows are unit-stride, else a contiguous copy.
inline at::Tensor unit_stride_rows(const at::Tensor& tensor) {
  return tensor.stride(1) == 1 ? tensor : tensor.contiguous();
}

// Checks shared by the four ops: a CPU floating tensor of `dtype` (or any floating dtype for weights).
inline void check_cpu_floating(std::string_view op, std::string_view name, const at::Tensor& tensor) {
  TORCH_CHECK(tensor.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got one on ", tensor.device());
  TORCH_CHECK(at::isFloatingType(tensor.scalar_type()), op, ": ", name, " must be floating point, got ",
              tensor.scalar_type());
}

}  // namespace moe_kernels::cpu
