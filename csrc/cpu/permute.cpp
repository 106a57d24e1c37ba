// moe_kernels::permute on the CPU: the layout of moe_kernels/pipeline.py.
//
// The assignments are walked in capacity-priority (slot-major) order, split into at most kMaxChunks
// chunks: one parallel pass counts each chunk's assignments per expert, a serial scan turns the counts
// into each chunk's first rank per expert and the segment offsets, a second parallel pass writes the rows.
#include <ATen/Parallel.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "../ops.h"

namespace moe_kernels {
namespace {

constexpr int64_t kMaxChunks = 64;
constexpr int64_t kMinChunkSize = 4096;

}  // namespace

PermuteOutputs permute_cpu(const at::Tensor& experts, int64_t num_experts, std::optional<int64_t> capacity,
                           int64_t block_m) {
  const int64_t max_kept = check_permute_args(experts, num_experts, capacity, block_m);
  const int64_t num_tokens = experts.size(0), k = experts.size(1), num_assignments = num_tokens * k;
  const int32_t* expert_ids = experts.data_ptr<int32_t>();
  const int64_t stride_t = experts.stride(0), stride_s = experts.stride(1);
  // The id check in one pass over [T, k] (at::aminmax and its .item() calls cost ~6 µs at T = 1).
  int32_t lowest = std::numeric_limits<int32_t>::max(), highest = std::numeric_limits<int32_t>::min();
  for (int64_t t = 0; t < num_tokens; ++t) {
    for (int64_t s = 0; s < k; ++s) {
      const int32_t id = expert_ids[t * stride_t + s * stride_s];
      lowest = std::min(lowest, id);
      highest = std::max(highest, id);
    }
  }
  TORCH_CHECK(num_assignments == 0 || (lowest >= 0 && highest < num_experts),
              "moe_kernels::permute: expert ids must lie in [0, num_experts=", num_experts, "), got ids from ", lowest,
              " to ", highest);
  const auto options = experts.options();
  at::Tensor tokens_per_expert = at::empty({num_experts}, options);
  at::Tensor expert_offsets = at::empty({num_experts + 1}, options);
  at::Tensor sorted_rows = at::empty({num_tokens, k}, options);
  // at::empty and a plain fill: at::full's TensorIterator fill is a cold code path at decode sizes.
  at::Tensor sorted_assignments = at::empty({num_sorted_rows(num_tokens, k, num_experts, block_m)}, options);
  std::fill_n(sorted_assignments.data_ptr<int32_t>(), sorted_assignments.numel(), -1);

  // Slot-major position i holds assignment t·k + s with s = i / T, t = i % T.
  auto expert_at = [&](int64_t i) { return expert_ids[(i % num_tokens) * stride_t + (i / num_tokens) * stride_s]; };

  const int64_t num_chunks = std::clamp<int64_t>(num_assignments / kMinChunkSize, 1, kMaxChunks);
  const int64_t chunk_size = (num_assignments + num_chunks - 1) / num_chunks;
  // chunk_ranks[c·E + e]: first the chunk's count of expert e, then the rank of its first one.
  std::vector<int64_t> chunk_ranks(num_chunks * num_experts, 0);
  at::parallel_for(0, num_chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      const int64_t last = std::min(num_assignments, (chunk + 1) * chunk_size);
      for (int64_t i = chunk * chunk_size; i < last; ++i) ++chunk_ranks[chunk * num_experts + expert_at(i)];
    }
  });

  int32_t* kept = tokens_per_expert.data_ptr<int32_t>();
  int32_t* offsets = expert_offsets.data_ptr<int32_t>();
  int64_t segment_start = 0;
  for (int64_t e = 0; e < num_experts; ++e) {
    int64_t total = 0;
    for (int64_t chunk = 0; chunk < num_chunks; ++chunk) {
      const int64_t count = chunk_ranks[chunk * num_experts + e];
      chunk_ranks[chunk * num_experts + e] = total;
      total += count;
    }
    kept[e] = static_cast<int32_t>(max_kept < 0 ? total : std::min(total, max_kept));
    offsets[e] = static_cast<int32_t>(segment_start);
    segment_start = (segment_start + kept[e] + block_m - 1) / block_m * block_m;
  }
  offsets[num_experts] = static_cast<int32_t>(segment_start);

  int32_t* rows = sorted_rows.data_ptr<int32_t>();
  int32_t* assignments = sorted_assignments.data_ptr<int32_t>();
  at::parallel_for(0, num_chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      int64_t* rank = chunk_ranks.data() + chunk * num_experts;
      const int64_t last = std::min(num_assignments, (chunk + 1) * chunk_size);
      for (int64_t i = chunk * chunk_size; i < last; ++i) {
        const int32_t e = expert_at(i);
        const int64_t assignment = (i % num_tokens) * k + i / num_tokens;
        const int64_t r = rank[e]++;
        if (max_kept >= 0 && r >= max_kept) {
          rows[assignment] = -1;
          continue;
        }
        rows[assignment] = static_cast<int32_t>(offsets[e] + r);
        assignments[offsets[e] + r] = static_cast<int32_t>(assignment);
      }
    }
  });
  return {tokens_per_expert, expert_offsets, sorted_rows, sorted_assignments};
}

}  // namespace moe_kernels
