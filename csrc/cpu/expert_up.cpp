// moe_kernels::cpu_expert_up and its backward: GEMM 1 of the experts with the gather fused in and the
// activation applied to each tile while it is in cache (semantics: Backend.expert_up in
// moe_kernels/pipeline.py, activations.py).
//
// Forward, one parallel loop over (expert, row tile) for the experts that received rows: gather the
// tile's tokens, one BLAS GEMM with the expert's weight (direct_gemm.h for tiles of at most kDirectRows
// rows), bias and activation row by row into hidden.
// The pre-activation is written to a [R, N] output only when the caller keeps it for backward.
// Backward: the activation's backward per row tile into grad_pre [R, N]; per row tile (and slice of d, for
// tiles of kSplitRows rows or more) one GEMM for the dx rows, then each token sums its rows in slot order;
// the weight and bias gradients per expert (or slice of N: few experts, or many rows), each one GEMM over
// all of the expert's rows.
#include <ATen/Parallel.h>
#include <ATen/core/grad_mode.h>
#include <c10/core/InferenceMode.h>

#include <cstring>
#include <type_traits>
#include <vector>

#include "../ops.h"
#include "activation.h"
#include "direct_gemm.h"
#include "expert_stages.h"
#include "experts.h"
#include "huge_pages.h"
#include "stream_gemm.h"

namespace moe_kernels {
namespace {

constexpr const char* kForward = "moe_kernels::cpu_expert_up";
constexpr const char* kBackward = "moe_kernels::cpu_expert_up_backward";

}  // namespace

UpShapes check_up(const char* op, const at::Tensor& x, const at::Tensor& up_weight,
                  const std::optional<at::Tensor>& up_bias, const cpu::Activation& activation) {
  cpu::check_cpu_floating(op, "x", x);
  cpu::check_cpu_floating(op, "up_weight", up_weight);
  TORCH_CHECK(x.dim() == 2, op, ": x must be [T, d], got ", x.sizes());
  TORCH_CHECK(up_weight.dim() == 3 && up_weight.size(2) == x.size(1), op, ": up_weight must be [E, N, d=", x.size(1),
              "], got ", up_weight.sizes());
  const int64_t n_up = up_weight.size(1);
  TORCH_CHECK(!activation.gated || n_up % 2 == 0, op, ": a gated activation needs an even N = 2*d_ff, got N=", n_up);
  if (up_bias.has_value()) {
    cpu::check_cpu_floating(op, "up_bias", *up_bias);
    TORCH_CHECK(up_bias->dim() == 2 && up_bias->size(0) == up_weight.size(0) && up_bias->size(1) == n_up, op,
                ": up_bias must be [E=", up_weight.size(0), ", N=", n_up, "], got ", up_bias->sizes());
  }
  return {x.size(1), n_up, activation.gated ? n_up / 2 : n_up};
}

namespace {

// Column j of the gate (or of the ungated pre-activation) and of the up half in a pre-activation row.
struct GateUpColumns {
  bool gated, interleaved;
  int64_t d_ff;
  int64_t gate(int64_t j) const { return interleaved ? 2 * j : j; }
  int64_t up(int64_t j) const { return interleaved ? 2 * j + 1 : d_ff + j; }
};

// The bias rows of expert e in opmath (zeros without a bias).
template <typename opmath_t>
void load_bias(const std::optional<at::Tensor>& bias, int64_t expert, std::vector<opmath_t>& out) {
  if (!bias.has_value()) return;
  const at::Tensor row = bias->select(0, expert).to(c10::CppTypeToScalarType<opmath_t>::value).contiguous();
  std::memcpy(out.data(), row.const_data_ptr<opmath_t>(), out.size() * sizeof(opmath_t));
}

}  // namespace

namespace cpu {

void expert_up_forward(const at::Tensor& x, const at::Tensor& up_weight, const std::optional<at::Tensor>& up_bias,
                       const Layout& layout, const Activation& activation, at::Tensor& hidden,
                       at::Tensor* pre_activation) {
  const bool keep_pre_activation = pre_activation != nullptr;
  const int64_t d = x.size(1), n_up = up_weight.size(1), d_ff = hidden.size(1);
  const bool gated = activation.gated, interleaved = activation.interleaved;
  const at::Tensor tokens = unit_stride_rows(x);
  const at::ScalarType dtype = x.scalar_type();
  zero_padding_rows(layout, hidden);
  if (keep_pre_activation) zero_padding_rows(layout, *pre_activation);
  const std::vector<cpu::RowTile> tiles = cpu::row_tiles(layout);
  const int64_t scratch_rows = cpu::tile_rows(tiles);
  const int64_t work_per_tile = tiles.empty() ? 0 : cpu::total_rows(tiles) * n_up * d / static_cast<int64_t>(tiles.size());
  const GateUpColumns columns{gated, interleaved, d_ff};

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "cpu_expert_up", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const scalar_t* token_data = tokens.const_data_ptr<scalar_t>();
    const int64_t token_stride = tokens.stride(0);
    scalar_t* hidden_data = hidden.data_ptr<scalar_t>();
    scalar_t* kept_data = keep_pre_activation ? pre_activation->data_ptr<scalar_t>() : nullptr;
    const bool direct = cpu::direct_weights(up_weight, dtype);
    const scalar_t* weight_data = direct ? static_cast<const scalar_t*>(up_weight.const_data_ptr()) : nullptr;
    cpu::parallel_items(static_cast<int64_t>(tiles.size()), [&](int64_t begin, int64_t end) {
      at::Tensor gathered;  // for the BLAS tiles only
      at::Tensor scratch = keep_pre_activation ? at::Tensor() : at::empty({scratch_rows, n_up}, x.options());
      std::vector<opmath_t> gate(d_ff), up(gated ? d_ff : 0), bias(n_up, opmath_t(0));
      std::vector<opmath_t> converted(std::is_same_v<scalar_t, opmath_t> ? 0 : cpu::kDirectRows * d);
      for (int64_t item = begin; item < end; ++item) {
        const cpu::RowTile& tile = tiles[item];
        const int64_t rows = tile.end - tile.begin;
        scalar_t* pre = keep_pre_activation ? kept_data + tile.begin * n_up : scratch.data_ptr<scalar_t>();
        if (direct && rows <= cpu::kDirectRows) {
          const scalar_t* token_rows[cpu::kDirectRows];
          for (int64_t i = 0; i < rows; ++i) token_rows[i] = token_data + layout.token_of_row(tile.begin + i) * token_stride;
          const opmath_t* a[cpu::kDirectRows];
          cpu::opmath_rows(token_rows, rows, d, converted.data(), a);
          cpu::direct_gemm(rows, a, weight_data + tile.expert * up_weight.stride(0), up_weight.stride(1), n_up, d, pre, n_up);
        } else {
          if (!gathered.defined()) gathered = at::empty({scratch_rows, d}, x.options());
          scalar_t* gathered_data = gathered.data_ptr<scalar_t>();
          for (int64_t i = 0; i < rows; ++i) {
            std::memcpy(gathered_data + i * d, token_data + layout.token_of_row(tile.begin + i) * token_stride,
                        d * sizeof(scalar_t));
          }
          const at::Tensor weight = cpu::expert_matrix(up_weight, tile.expert, dtype);  // [N, d]
          at::Tensor pre_tile = cpu::matrix(pre, rows, n_up, n_up, 1, dtype);
          at::mm_out(pre_tile, cpu::matrix(gathered_data, rows, d, d, 1, dtype), cpu::transposed(weight));
        }
        load_bias(up_bias, tile.expert, bias);
        for (int64_t i = 0; i < rows; ++i) {
          scalar_t* z = pre + i * n_up;
          for (int64_t j = 0; j < d_ff; ++j) {
            gate[j] = static_cast<opmath_t>(z[columns.gate(j)]) + bias[columns.gate(j)];
            if (gated) up[j] = static_cast<opmath_t>(z[columns.up(j)]) + bias[columns.up(j)];
          }
          if (keep_pre_activation && up_bias.has_value()) {  // backward reads the biased pre-activation
            for (int64_t j = 0; j < d_ff; ++j) {
              z[columns.gate(j)] = static_cast<scalar_t>(gate[j]);
              if (gated) z[columns.up(j)] = static_cast<scalar_t>(up[j]);
            }
          }
          cpu::activation_forward(activation, gate.data(), up.data(), gate.data(), d_ff);
          scalar_t* h = hidden_data + (tile.begin + i) * d_ff;
          for (int64_t j = 0; j < d_ff; ++j) h[j] = static_cast<scalar_t>(gate[j]);
        }
      }
    }, work_per_tile);
  });
}

}  // namespace cpu

std::tuple<at::Tensor, at::Tensor> cpu_expert_up(
    const at::Tensor& x, const at::Tensor& up_weight, const std::optional<at::Tensor>& up_bias,
    const at::Tensor& tokens_per_expert, const at::Tensor& expert_offsets, const at::Tensor& sorted_rows,
    const at::Tensor& sorted_assignments, std::string_view function, bool gated, double alpha,
    std::optional<double> limit, double up_offset, bool interleaved, bool keep_pre_activation) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const cpu::Activation activation = cpu::make_activation(kForward, function, gated, alpha, limit, up_offset, interleaved);
  const auto [d, n_up, d_ff] = check_up(kForward, x, up_weight, up_bias, activation);
  const cpu::Layout layout = cpu::check_layout(kForward, tokens_per_expert, expert_offsets, sorted_rows,
                                               sorted_assignments, up_weight.size(0));
  TORCH_CHECK(layout.num_tokens == x.size(0), kForward, ": sorted_rows has ", layout.num_tokens,
              " tokens but x has ", x.size(0));
  at::Tensor hidden = cpu::empty_on_huge_pages({layout.num_rows, d_ff}, x.options());
  at::Tensor pre_activation = cpu::empty_on_huge_pages({keep_pre_activation ? layout.num_rows : 0, n_up}, x.options());
  cpu::expert_up_forward(x, up_weight, up_bias, layout, activation, hidden, keep_pre_activation ? &pre_activation : nullptr);
  return {hidden, pre_activation};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cpu_expert_up_backward(
    const at::Tensor& grad_hidden, const at::Tensor& x, const at::Tensor& up_weight,
    const std::optional<at::Tensor>& up_bias, const at::Tensor& pre_activation, const at::Tensor& tokens_per_expert,
    const at::Tensor& expert_offsets, const at::Tensor& sorted_rows, const at::Tensor& sorted_assignments,
    std::string_view function, bool gated, double alpha, std::optional<double> limit, double up_offset,
    bool interleaved) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const cpu::Activation activation = cpu::make_activation(kBackward, function, gated, alpha, limit, up_offset, interleaved);
  const auto [d, n_up, d_ff] = check_up(kBackward, x, up_weight, up_bias, activation);
  const int64_t num_experts = up_weight.size(0);
  const cpu::Layout layout = cpu::check_layout(kBackward, tokens_per_expert, expert_offsets, sorted_rows,
                                               sorted_assignments, num_experts);
  const at::ScalarType dtype = x.scalar_type();
  TORCH_CHECK(layout.num_tokens == x.size(0), kBackward, ": sorted_rows has ", layout.num_tokens,
              " tokens but x has ", x.size(0));
  TORCH_CHECK(grad_hidden.dim() == 2 && grad_hidden.size(0) == layout.num_rows && grad_hidden.size(1) == d_ff &&
                  grad_hidden.scalar_type() == dtype,
              kBackward, ": grad_hidden must be [R=", layout.num_rows, ", d_ff=", d_ff, "] ", dtype, ", got ",
              grad_hidden.sizes(), " ", grad_hidden.scalar_type());
  TORCH_CHECK(pre_activation.dim() == 2 && pre_activation.size(0) == layout.num_rows &&
                  pre_activation.size(1) == n_up && pre_activation.scalar_type() == dtype,
              kBackward, ": pre_activation must be the [R=", layout.num_rows, ", N=", n_up,
              "] output of cpu_expert_up with keep_pre_activation=True, got ", pre_activation.sizes());
  const at::Tensor tokens = cpu::unit_stride_rows(x);
  const at::Tensor grad_rows = cpu::unit_stride_rows(grad_hidden);
  const at::Tensor pre_rows = cpu::unit_stride_rows(pre_activation);
  const at::ScalarType opmath_dtype = at::toOpMathType(dtype);
  at::Tensor grad_pre = cpu::empty_on_huge_pages({layout.num_rows, n_up}, x.options());
  at::Tensor grad_x_sum = at::zeros({layout.num_tokens, d}, x.options().dtype(opmath_dtype));
  at::Tensor row_dx = cpu::empty_on_huge_pages({layout.num_rows, d}, x.options().dtype(opmath_dtype));
  at::Tensor gathered_x = cpu::empty_on_huge_pages({layout.num_rows, d}, x.options());  // x[token of row]; padding unread
  at::Tensor grad_up_weight = cpu::expert_gradient(layout, up_weight.sizes(), up_weight.options());
  at::Tensor grad_up_bias = up_bias.has_value() ? cpu::expert_gradient(layout, up_bias->sizes(), up_bias->options())
                                                : at::empty({0}, x.options());
  const std::vector<cpu::RowTile> tiles = cpu::row_tiles(layout);
  const int64_t scratch_rows = cpu::tile_rows(tiles);
  const std::vector<cpu::SliceItem> dx_items = cpu::tile_slices(tiles, d);
  const std::vector<cpu::SliceItem> weight_items = cpu::expert_slices(layout, n_up);
  const GateUpColumns columns{gated, interleaved, d_ff};

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "cpu_expert_up_backward", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    scalar_t* grad_pre_data = grad_pre.data_ptr<scalar_t>();
    // 1. grad_pre = the activation's backward, row by row.
    cpu::parallel_items(static_cast<int64_t>(tiles.size()), [&](int64_t begin, int64_t end) {
      std::vector<opmath_t> gate(d_ff), up(gated ? d_ff : 0), grad(d_ff), grad_gate(d_ff), grad_up(gated ? d_ff : 0);
      for (int64_t item = begin; item < end; ++item) {
        for (int64_t r = tiles[item].begin; r < tiles[item].end; ++r) {
          const scalar_t* z = pre_rows.const_data_ptr<scalar_t>() + r * pre_rows.stride(0);
          const scalar_t* g = grad_rows.const_data_ptr<scalar_t>() + r * grad_rows.stride(0);
          for (int64_t j = 0; j < d_ff; ++j) {
            gate[j] = static_cast<opmath_t>(z[columns.gate(j)]);
            if (gated) up[j] = static_cast<opmath_t>(z[columns.up(j)]);
            grad[j] = static_cast<opmath_t>(g[j]);
          }
          cpu::activation_backward(activation, gate.data(), up.data(), grad.data(), grad_gate.data(), grad_up.data(), d_ff);
          scalar_t* out = grad_pre_data + r * n_up;
          for (int64_t j = 0; j < d_ff; ++j) {
            out[columns.gate(j)] = static_cast<scalar_t>(grad_gate[j]);
            if (gated) out[columns.up(j)] = static_cast<scalar_t>(grad_up[j]);
          }
        }
      }
    });

    // 2. dx rows = grad_pre[row] · up_weight[e], one GEMM per item (row tile × slice of d) into an [R, d]
    //    opmath buffer; then dx[t] = the sum of t's rows in slot order, token by token.
    opmath_t* row_dx_data = row_dx.data_ptr<opmath_t>();
    const bool stream_dx = cpu::streams_weight(up_weight, dtype);
    cpu::parallel_items(static_cast<int64_t>(dx_items.size()), [&](int64_t begin, int64_t end) {
      at::Tensor product = std::is_same_v<scalar_t, opmath_t> ? at::Tensor() : at::empty({scratch_rows, d}, x.options());
      for (int64_t item = begin; item < end; ++item) {
        const cpu::SliceItem& tile = dx_items[item];
        const int64_t rows = tile.row_end - tile.row_begin, width = tile.end - tile.begin;
        opmath_t* dx_rows = row_dx_data + tile.row_begin * d + tile.begin;
        if (stream_dx && rows < cpu::kSplitRows) {
          const cpu::SliceItem* next = item + 1 < end ? &dx_items[item + 1] : nullptr;
          cpu::stream_gemm(rows, width, n_up, grad_pre.const_data_ptr<float>() + tile.row_begin * n_up, n_up,
                           up_weight.const_data_ptr<float>() + tile.expert * up_weight.stride(0) + tile.begin,
                           up_weight.stride(1), row_dx.data_ptr<float>() + tile.row_begin * d + tile.begin, d,
                           next ? cpu::weight_columns(up_weight, next->expert, next->begin, next->end) : cpu::Prefetcher());
          continue;
        }
        const at::Tensor weight = cpu::expert_matrix(up_weight, tile.expert, dtype);  // [N, d]
        const at::Tensor columns_of_weight = cpu::matrix(weight.const_data_ptr<scalar_t>() + tile.begin * weight.stride(1),
                                                         n_up, width, weight.stride(0), weight.stride(1), dtype);
        at::Tensor out = std::is_same_v<scalar_t, opmath_t> ? cpu::matrix(dx_rows, rows, width, d, 1, dtype)
                                                             : cpu::matrix(product.data_ptr<scalar_t>(), rows, width, width, 1, dtype);
        at::mm_out(out, cpu::matrix(grad_pre_data + tile.row_begin * n_up, rows, n_up, n_up, 1, dtype), columns_of_weight);
        if constexpr (!std::is_same_v<scalar_t, opmath_t>) {
          const scalar_t* product_data = product.const_data_ptr<scalar_t>();
          for (int64_t i = 0; i < rows; ++i) {
            for (int64_t j = 0; j < width; ++j) dx_rows[i * d + j] = static_cast<opmath_t>(product_data[i * width + j]);
          }
        }
      }
    });
    opmath_t* grad_x_data = grad_x_sum.data_ptr<opmath_t>();
    at::parallel_for(0, layout.num_tokens, 64, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        opmath_t* sum = grad_x_data + t * d;
        for (int64_t s = 0; s < layout.num_slots; ++s) {
          const int64_t row = layout.sorted_rows[t * layout.num_slots + s];
          if (row < 0) continue;
          const opmath_t* value = row_dx_data + row * d;
          for (int64_t j = 0; j < d; ++j) sum[j] += value[j];
        }
      }
    });

    // 3. grad_up_weight[e] = grad_pre[rows of e]ᵀ · x[tokens of e], grad_up_bias[e] = Σ grad_pre[rows of e],
    //    per item (expert × slice of N), from x's rows gathered once in sorted order.
    const scalar_t* token_data = tokens.const_data_ptr<scalar_t>();
    scalar_t* gathered_data = gathered_x.data_ptr<scalar_t>();
    cpu::parallel_items(static_cast<int64_t>(tiles.size()), [&](int64_t begin, int64_t end) {
      for (int64_t item = begin; item < end; ++item) {
        for (int64_t r = tiles[item].begin; r < tiles[item].end; ++r) {
          std::memcpy(gathered_data + r * d, token_data + layout.token_of_row(r) * tokens.stride(0), d * sizeof(scalar_t));
        }
      }
    });
    cpu::parallel_items(static_cast<int64_t>(weight_items.size()), [&](int64_t begin, int64_t end) {
      for (int64_t item = begin; item < end; ++item) {
        const cpu::SliceItem& slice = weight_items[item];
        const int64_t e = slice.expert, first = slice.begin, width = slice.end - slice.begin;
        const int64_t start = slice.row_begin, rows = slice.row_end - slice.row_begin;
        const at::Tensor gathered = cpu::matrix(gathered_data + start * d, rows, d, d, 1, dtype);
        const at::Tensor grad_block = cpu::matrix(grad_pre_data + start * n_up + first, rows, width, n_up, 1, dtype);
        cpu::weight_gradient_product(grad_block, gathered, grad_up_weight.select(0, e).narrow(0, first, width));
        if (up_bias.has_value()) {
          std::vector<opmath_t> sum(width, opmath_t(0));
          for (int64_t i = 0; i < rows; ++i) {
            const scalar_t* g = grad_pre_data + (start + i) * n_up + first;
            for (int64_t j = 0; j < width; ++j) sum[j] += static_cast<opmath_t>(g[j]);
          }
          grad_up_bias.select(0, e).narrow(0, first, width).copy_(at::from_blob(sum.data(), {width}, at::TensorOptions().dtype(opmath_dtype)));
        }
      }
    });
  });
  at::Tensor grad_x = grad_x_sum.scalar_type() == dtype ? grad_x_sum : grad_x_sum.to(dtype);
  return {grad_x, grad_up_weight, grad_up_bias};
}

}  // namespace moe_kernels
