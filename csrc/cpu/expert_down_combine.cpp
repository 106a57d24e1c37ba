// moe_kernels::cpu_expert_down_combine and its backward: GEMM 2 of the experts and the weighted combine
// (semantics: Backend.expert_down_combine in moe_kernels/pipeline.py).
//
// Forward, one parallel loop over column slices of d: each slice runs GEMM 2 (BLAS, or direct_gemm.h for
// tiles of at most kDirectRows rows) tile by tile for the experts that received rows (in expert order) and
// adds weight·(row + bias) into the rows of y it owns, so no [R, d] buffer of expert outputs exists and
// each token's sum has one fixed order (experts ascending, then sorted rows) whatever the thread count.
// Accumulation in the opmath type.
// Backward: dy gathered into sorted rows once; per (expert, row tile, and slice of d_ff for tiles of
// kSplitRows rows or more) u = dy[token]·W_e into d(hidden)'s rows, then per row d(weight) = <u, hidden> +
// <dy, bias> and d(hidden) = weight·u; per (expert, slice of d) one GEMM over all of the expert's rows gives
// d(W_e) and d(bias_e).
#include <ATen/Parallel.h>

#include <cstring>
#include <type_traits>
#include <vector>

#include "../ops.h"
#include "direct_gemm.h"
#include "expert_stages.h"
#include "experts.h"
#include "huge_pages.h"
#include "stream_gemm.h"

namespace moe_kernels {
namespace {

constexpr const char* kForward = "moe_kernels::cpu_expert_down_combine";
constexpr const char* kBackward = "moe_kernels::cpu_expert_down_combine_backward";

}  // namespace

void check_down(const char* op, const at::Tensor& hidden, const at::Tensor& down_weight,
                const std::optional<at::Tensor>& down_bias, const at::Tensor& weights, const cpu::Layout& layout) {
  cpu::check_cpu_floating(op, "hidden", hidden);
  cpu::check_cpu_floating(op, "down_weight", down_weight);
  TORCH_CHECK(hidden.dim() == 2 && hidden.size(0) == layout.num_rows, op, ": hidden must be [R=", layout.num_rows,
              ", d_ff], got ", hidden.sizes());
  TORCH_CHECK(down_weight.dim() == 3 && down_weight.size(2) == hidden.size(1), op,
              ": down_weight must be [E, d, d_ff=", hidden.size(1), "], got ", down_weight.sizes());
  if (down_bias.has_value()) {
    cpu::check_cpu_floating(op, "down_bias", *down_bias);
    TORCH_CHECK(down_bias->dim() == 2 && down_bias->size(0) == down_weight.size(0) &&
                    down_bias->size(1) == down_weight.size(1),
                op, ": down_bias must be [E=", down_weight.size(0), ", d=", down_weight.size(1), "], got ",
                down_bias->sizes());
  }
  const at::ScalarType opmath = at::toOpMathType(hidden.scalar_type());
  TORCH_CHECK(weights.device().is_cpu() && weights.dim() == 2 && weights.size(0) == layout.num_tokens &&
                  weights.size(1) == layout.num_slots && weights.scalar_type() == opmath,
              op, ": weights must be a [T=", layout.num_tokens, ", S=", layout.num_slots, "] ", opmath,
              " CPU tensor (float64 for float64 hidden, else float32), got ", weights.sizes(), " ",
              weights.scalar_type());
}

namespace {

// Expert e's down bias in opmath, columns [first, first + width) (zeros without a bias).
template <typename opmath_t>
void load_bias(const std::optional<at::Tensor>& bias, int64_t expert, int64_t first, std::vector<opmath_t>& out) {
  if (!bias.has_value()) return;
  const at::Tensor row = bias->select(0, expert).narrow(0, first, static_cast<int64_t>(out.size()))
                             .to(c10::CppTypeToScalarType<opmath_t>::value).contiguous();
  std::memcpy(out.data(), row.const_data_ptr<opmath_t>(), out.size() * sizeof(opmath_t));
}

}  // namespace

namespace cpu {

at::Tensor expert_down_combine_forward(const at::Tensor& hidden, const at::Tensor& down_weight,
                                       const std::optional<at::Tensor>& down_bias, const Layout& layout,
                                       const at::Tensor& weights) {
  const at::ScalarType dtype = hidden.scalar_type();
  const int64_t d = down_weight.size(1), d_ff = down_weight.size(2);
  const at::Tensor rows = unit_stride_rows(hidden);
  at::Tensor y_sum = at::empty({layout.num_tokens, d}, hidden.options().dtype(weights.scalar_type()));
  std::memset(y_sum.data_ptr(), 0, y_sum.nbytes());  // not at::zeros: its TensorIterator fill is cold code at T = 1
  const std::vector<cpu::RowTile> tiles = cpu::row_tiles(layout);
  const int64_t scratch_rows = cpu::tile_rows(tiles);
  const int64_t num_slices = (d + cpu::kSliceColumns - 1) / cpu::kSliceColumns;
  const int64_t work_per_slice = cpu::total_rows(tiles) * std::min(cpu::kSliceColumns, d) * d_ff;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "cpu_expert_down_combine", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const scalar_t* row_data = rows.const_data_ptr<scalar_t>();
    const opmath_t* weight_data = weights.const_data_ptr<opmath_t>();
    opmath_t* y_data = y_sum.data_ptr<opmath_t>();
    const bool direct = cpu::direct_weights(down_weight, dtype);
    const scalar_t* down_data = direct ? static_cast<const scalar_t*>(down_weight.const_data_ptr()) : nullptr;
    cpu::parallel_items(num_slices, [&](int64_t begin, int64_t end) {
      at::Tensor product = at::empty({scratch_rows, cpu::kSliceColumns}, hidden.options());
      std::vector<opmath_t> converted(std::is_same_v<scalar_t, opmath_t> ? 0 : cpu::kDirectRows * d_ff);
      for (int64_t slice = begin; slice < end; ++slice) {
        const int64_t first = slice * cpu::kSliceColumns, width = std::min(cpu::kSliceColumns, d - first);
        std::vector<opmath_t> bias(width, opmath_t(0));
        for (size_t item = 0; item < tiles.size(); ++item) {
          const cpu::RowTile& tile = tiles[item];
          const int64_t count = tile.end - tile.begin;
          if (direct && count <= cpu::kDirectRows) {
            const scalar_t* hidden_rows[cpu::kDirectRows];
            for (int64_t i = 0; i < count; ++i) hidden_rows[i] = row_data + (tile.begin + i) * rows.stride(0);
            const opmath_t* a[cpu::kDirectRows];
            cpu::opmath_rows(hidden_rows, count, d_ff, converted.data(), a);
            const auto slice_of = [&](int64_t expert) {
              return down_data + expert * down_weight.stride(0) + first * down_weight.stride(1);
            };
            const scalar_t* next = item + 1 < tiles.size() ? slice_of(tiles[item + 1].expert) : nullptr;
            cpu::direct_gemm(count, a, slice_of(tile.expert), down_weight.stride(1), width, d_ff,
                             product.data_ptr<scalar_t>(), width, next);
          } else {
            const at::Tensor weight = cpu::expert_matrix(down_weight, tile.expert, dtype);  // [d, d_ff]
            at::Tensor out = cpu::matrix(product.data_ptr<scalar_t>(), count, width, width, 1, dtype);
            at::mm_out(out, cpu::matrix(row_data + tile.begin * rows.stride(0), count, d_ff, rows.stride(0), 1, dtype),
                       cpu::matrix(weight.const_data_ptr<scalar_t>() + first * weight.stride(0), d_ff, width,
                                   weight.stride(1), weight.stride(0), dtype));
          }
          load_bias(down_bias, tile.expert, first, bias);
          const scalar_t* product_data = product.const_data_ptr<scalar_t>();
          for (int64_t i = 0; i < count; ++i) {
            const int64_t assignment = layout.sorted_assignments[tile.begin + i];
            const int64_t token = assignment / layout.num_slots, slot = assignment % layout.num_slots;
            const opmath_t gate = weight_data[token * weights.stride(0) + slot * weights.stride(1)];
            opmath_t* y = y_data + token * d + first;
            for (int64_t j = 0; j < width; ++j) y[j] += gate * (static_cast<opmath_t>(product_data[i * width + j]) + bias[j]);
          }
        }
      }
    }, work_per_slice);
  });
  return y_sum.scalar_type() == dtype ? y_sum : y_sum.to(dtype);
}

}  // namespace cpu

at::Tensor cpu_expert_down_combine(const at::Tensor& hidden, const at::Tensor& down_weight,
                                   const std::optional<at::Tensor>& down_bias, const at::Tensor& tokens_per_expert,
                                   const at::Tensor& expert_offsets, const at::Tensor& sorted_rows,
                                   const at::Tensor& sorted_assignments, const at::Tensor& weights) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const cpu::Layout layout = cpu::check_layout(kForward, tokens_per_expert, expert_offsets, sorted_rows,
                                               sorted_assignments, down_weight.size(0));
  check_down(kForward, hidden, down_weight, down_bias, weights, layout);
  return cpu::expert_down_combine_forward(hidden, down_weight, down_bias, layout, weights);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> cpu_expert_down_combine_backward(
    const at::Tensor& grad_y, const at::Tensor& hidden, const at::Tensor& down_weight,
    const std::optional<at::Tensor>& down_bias, const at::Tensor& tokens_per_expert, const at::Tensor& expert_offsets,
    const at::Tensor& sorted_rows, const at::Tensor& sorted_assignments, const at::Tensor& weights) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const int64_t num_experts = down_weight.size(0);
  const cpu::Layout layout = cpu::check_layout(kBackward, tokens_per_expert, expert_offsets, sorted_rows,
                                               sorted_assignments, num_experts);
  check_down(kBackward, hidden, down_weight, down_bias, weights, layout);
  const at::ScalarType dtype = hidden.scalar_type();
  const int64_t d = down_weight.size(1), d_ff = down_weight.size(2);
  TORCH_CHECK(grad_y.dim() == 2 && grad_y.size(0) == layout.num_tokens && grad_y.size(1) == d, kBackward,
              ": grad_y must be [T=", layout.num_tokens, ", d=", d, "], got ", grad_y.sizes());
  const at::Tensor grad_rows = cpu::unit_stride_rows(grad_y.to(dtype));
  const at::Tensor rows = cpu::unit_stride_rows(hidden);
  at::Tensor grad_hidden = cpu::empty_on_huge_pages({layout.num_rows, d_ff}, hidden.options());
  cpu::zero_padding_rows(layout, grad_hidden);
  at::Tensor grad_weights = at::zeros(weights.sizes(), weights.options());
  at::Tensor grad_down_weight = cpu::expert_gradient(layout, down_weight.sizes(), down_weight.options());
  at::Tensor grad_down_bias = down_bias.has_value() ? cpu::expert_gradient(layout, down_bias->sizes(), down_bias->options())
                                                    : at::empty({0}, hidden.options());
  at::Tensor dy_rows = cpu::empty_on_huge_pages({layout.num_rows, d}, hidden.options());  // dy[token of row]; padding unread
  const std::vector<cpu::RowTile> tiles = cpu::row_tiles(layout);
  const std::vector<cpu::SliceItem> u_items = cpu::tile_slices(tiles, d_ff);
  const std::vector<cpu::SliceItem> weight_items = cpu::expert_slices(layout, d);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "cpu_expert_down_combine_backward", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const scalar_t* grad_data = grad_rows.const_data_ptr<scalar_t>();
    const int64_t grad_stride = grad_rows.stride(0);
    const scalar_t* row_data = rows.const_data_ptr<scalar_t>();
    const opmath_t* weight_data = weights.const_data_ptr<opmath_t>();
    auto gate_of = [&](int64_t row, int64_t* token, int64_t* slot) {
      const int64_t assignment = layout.sorted_assignments[row];
      *token = assignment / layout.num_slots;
      *slot = assignment % layout.num_slots;
      return weight_data[*token * weights.stride(0) + *slot * weights.stride(1)];
    };
    // 1. u = dy[token]·W_e per item (row tile × slice of d_ff) into grad_hidden; then row by row
    //    d(gate) = <u, hidden> + <dy, bias_e> and d(hidden) = gate·u in place.
    scalar_t* dy_data = dy_rows.data_ptr<scalar_t>();
    scalar_t* grad_hidden_data = grad_hidden.data_ptr<scalar_t>();
    opmath_t* grad_weight_data = grad_weights.data_ptr<opmath_t>();
    cpu::parallel_items(static_cast<int64_t>(tiles.size()), [&](int64_t begin, int64_t end) {
      for (int64_t item = begin; item < end; ++item) {
        for (int64_t r = tiles[item].begin; r < tiles[item].end; ++r) {
          std::memcpy(dy_data + r * d, grad_data + layout.token_of_row(r) * grad_stride, d * sizeof(scalar_t));
        }
      }
    });
    const bool stream_u = cpu::streams_weight(down_weight, dtype);
    cpu::parallel_items(static_cast<int64_t>(u_items.size()), [&](int64_t begin, int64_t end) {
      for (int64_t item = begin; item < end; ++item) {
        const cpu::SliceItem& tile = u_items[item];
        const int64_t count = tile.row_end - tile.row_begin, width = tile.end - tile.begin;
        if (stream_u && count < cpu::kSplitRows) {
          const cpu::SliceItem* next = item + 1 < end ? &u_items[item + 1] : nullptr;
          cpu::stream_gemm(count, width, d, dy_rows.const_data_ptr<float>() + tile.row_begin * d, d,
                           down_weight.const_data_ptr<float>() + tile.expert * down_weight.stride(0) + tile.begin,
                           down_weight.stride(1), grad_hidden.data_ptr<float>() + tile.row_begin * d_ff + tile.begin, d_ff,
                           next ? cpu::weight_columns(down_weight, next->expert, next->begin, next->end) : cpu::Prefetcher());
          continue;
        }
        const at::Tensor weight = cpu::expert_matrix(down_weight, tile.expert, dtype);  // [d, d_ff]
        at::Tensor out = cpu::matrix(grad_hidden_data + tile.row_begin * d_ff + tile.begin, count, width, d_ff, 1, dtype);
        at::mm_out(out, cpu::matrix(dy_data + tile.row_begin * d, count, d, d, 1, dtype),
                   cpu::matrix(weight.const_data_ptr<scalar_t>() + tile.begin * weight.stride(1), d, width,
                               weight.stride(0), weight.stride(1), dtype));
      }
    });
    cpu::parallel_items(static_cast<int64_t>(tiles.size()), [&](int64_t begin, int64_t end) {
      std::vector<opmath_t> bias(down_bias.has_value() ? d : 0, opmath_t(0));
      for (int64_t item = begin; item < end; ++item) {
        const cpu::RowTile& tile = tiles[item];
        load_bias(down_bias, tile.expert, 0, bias);
        for (int64_t row = tile.begin; row < tile.end; ++row) {
          int64_t token, slot;
          const opmath_t gate = gate_of(row, &token, &slot);
          const scalar_t* h = row_data + row * rows.stride(0);
          scalar_t* grad_h = grad_hidden_data + row * d_ff;  // holds u
          opmath_t dot = 0;
          for (int64_t j = 0; j < d_ff; ++j) {
            const opmath_t value = static_cast<opmath_t>(grad_h[j]);
            grad_h[j] = static_cast<scalar_t>(gate * value);
            dot += value * static_cast<opmath_t>(h[j]);
          }
          for (int64_t j = 0; j < static_cast<int64_t>(bias.size()); ++j) {
            dot += static_cast<opmath_t>(dy_data[row * d + j]) * bias[j];
          }
          grad_weight_data[token * grad_weights.stride(0) + slot * grad_weights.stride(1)] = dot;
        }
      }
    });

    // 2. d(W_e)[slice] = (gate·dy[tokens of e])[slice]ᵀ · hidden[rows of e]; d(bias_e)[slice] = Σ gate·dy.
    cpu::parallel_items(static_cast<int64_t>(weight_items.size()), [&](int64_t begin, int64_t end) {
      for (int64_t item = begin; item < end; ++item) {
        const cpu::SliceItem& slice = weight_items[item];
        const int64_t e = slice.expert, first = slice.begin, width = slice.end - slice.begin;
        const int64_t start = slice.row_begin, count = slice.row_end - slice.row_begin;
        at::Tensor weighted = at::empty({count, width}, hidden.options());
        scalar_t* weighted_data = weighted.data_ptr<scalar_t>();
        std::vector<opmath_t> bias_sum(down_bias.has_value() ? width : 0, opmath_t(0));
        for (int64_t i = 0; i < count; ++i) {
          int64_t token, slot;
          const opmath_t gate = gate_of(start + i, &token, &slot);
          const scalar_t* g = dy_data + (start + i) * d + first;
          for (int64_t j = 0; j < width; ++j) weighted_data[i * width + j] = static_cast<scalar_t>(gate * static_cast<opmath_t>(g[j]));
          for (int64_t j = 0; j < static_cast<int64_t>(bias_sum.size()); ++j) bias_sum[j] += gate * static_cast<opmath_t>(g[j]);
        }
        const at::Tensor hidden_block = cpu::matrix(row_data + start * rows.stride(0), count, d_ff, rows.stride(0), 1, dtype);
        cpu::weight_gradient_product(weighted, hidden_block, grad_down_weight.select(0, e).narrow(0, first, width));
        if (down_bias.has_value()) {
          grad_down_bias.select(0, e).narrow(0, first, width).copy_(
              at::from_blob(bias_sum.data(), {width}, at::TensorOptions().dtype(weights.scalar_type())));
        }
      }
    });
  });
  return {grad_hidden, grad_down_weight, grad_down_bias, grad_weights};
}

}  // namespace moe_kernels
