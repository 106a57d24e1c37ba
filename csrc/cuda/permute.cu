// moe_kernels::permute on CUDA: the layout of moe_kernels/pipeline.py in two launches, no host sync.
//
// The assignments, in capacity-priority (slot-major) order, are cut into at most kMaxChunks chunks.
// Launch 1 counts each chunk's assignments per expert. Launch 2 (one block per chunk) adds the earlier
// chunks' counts to get its first rank per expert and all the counts to get the segment offsets, then
// one warp walks the chunk in order and ranks each assignment among its expert's with __match_any_sync.
// The ranks are those of a sequential walk, so the rows are identical to the CPU op's.
#include <cuda_runtime.h>

#include <cub/block/block_scan.cuh>
#include <cstdint>

#include "launch.h"

namespace moe_kernels {
namespace {

constexpr int kThreads = 256;
constexpr int kWarp = 32;
constexpr int64_t kMaxChunks = 128;  // launch 2 reads kMaxChunks x E counts per block
constexpr int64_t kMinChunkSize = 1024;

struct Chunking {
  int64_t num_chunks, chunk_size;
};

Chunking chunking(int64_t num_assignments) {
  int64_t num_chunks = num_assignments / kMinChunkSize;
  num_chunks = num_chunks < 1 ? 1 : (num_chunks > kMaxChunks ? kMaxChunks : num_chunks);
  return {num_chunks, (num_assignments + num_chunks - 1) / num_chunks};
}

// The expert of slot-major position i (assignment t·k + s with s = i / T, t = i % T), -1 if out of range.
__device__ __forceinline__ int expert_at(const PermuteLaunch& args, int64_t i) {
  const int64_t t = i % args.num_tokens, s = i / args.num_tokens;
  const int e = args.experts[t * args.stride_t + s * args.stride_s];
  return e >= 0 && e < args.num_experts ? e : -1;
}

__global__ void count_kernel(PermuteLaunch args, int64_t chunk_size, int32_t* __restrict__ chunk_counts /* [C, E] */) {
  extern __shared__ int32_t counts[];
  for (int e = threadIdx.x; e < args.num_experts; e += blockDim.x) counts[e] = 0;
  __syncthreads();
  const int64_t num_assignments = args.num_tokens * args.k;
  const int64_t begin = blockIdx.x * chunk_size;
  const int64_t end = begin + chunk_size < num_assignments ? begin + chunk_size : num_assignments;
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
    const int e = expert_at(args, i);
    if (e >= 0) atomicAdd(&counts[e], 1);
  }
  __syncthreads();
  for (int e = threadIdx.x; e < args.num_experts; e += blockDim.x) {
    chunk_counts[static_cast<int64_t>(blockIdx.x) * args.num_experts + e] = counts[e];
  }
}

__global__ void scatter_kernel(PermuteLaunch args, int64_t chunk_size, const int32_t* __restrict__ chunk_counts) {
  using BlockScan = cub::BlockScan<int, kThreads>;
  __shared__ typename BlockScan::TempStorage scan_storage;
  extern __shared__ int32_t shared[];
  const int num_experts = args.num_experts;
  int32_t* rank = shared;                    // [E] next rank of each expert in this chunk
  int32_t* kept = shared + num_experts;      // [E] tokens_per_expert
  int32_t* offsets = kept + num_experts;     // [E + 1] expert_offsets

  for (int e = threadIdx.x; e < num_experts; e += kThreads) {
    int before = 0, total = 0;
    for (int chunk = 0; chunk < gridDim.x; ++chunk) {
      const int count = chunk_counts[static_cast<int64_t>(chunk) * num_experts + e];
      before += chunk < blockIdx.x ? count : 0;
      total += count;
    }
    rank[e] = before;
    kept[e] = args.capacity < 0 || total < args.capacity ? total : static_cast<int>(args.capacity);
  }
  __syncthreads();

  // Segment sizes, padded to a multiple of block_m; each thread scans a run of experts.
  const int per_thread = (num_experts + kThreads - 1) / kThreads;
  const int first = threadIdx.x * per_thread;
  auto segment_size = [&](int e) { return (kept[e] + args.block_m - 1) / args.block_m * args.block_m; };
  int run_size = 0;
  for (int e = first; e < first + per_thread && e < num_experts; ++e) run_size += segment_size(e);
  int run_start;
  BlockScan(scan_storage).ExclusiveSum(run_size, run_start);
  for (int e = first; e < first + per_thread && e < num_experts; ++e) {
    offsets[e] = run_start;
    run_start += segment_size(e);
    if (e == num_experts - 1) offsets[num_experts] = run_start;
  }
  __syncthreads();

  if (blockIdx.x == 0) {
    for (int e = threadIdx.x; e <= num_experts; e += kThreads) {
      if (e < num_experts) args.tokens_per_expert[e] = kept[e];
      args.expert_offsets[e] = offsets[e];
    }
  }
  // Padding rows: those past the kept rows of the segment they fall in (the last expert's covers the tail).
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; row < args.num_rows;
       row += static_cast<int64_t>(gridDim.x) * kThreads) {
    int low = 0, high = num_experts - 1;  // the last expert whose segment starts at or before row
    while (low < high) {
      const int middle = (low + high + 1) / 2;
      if (offsets[middle] <= row) low = middle; else high = middle - 1;
    }
    if (row >= offsets[low] + kept[low]) args.sorted_assignments[row] = -1;
  }

  if (threadIdx.x >= kWarp) return;
  const int lane = threadIdx.x;
  const unsigned lanes_before = (1u << lane) - 1u;
  const int64_t num_assignments = args.num_tokens * args.k;
  const int64_t begin = blockIdx.x * chunk_size;
  const int64_t end = begin + chunk_size < num_assignments ? begin + chunk_size : num_assignments;
  for (int64_t base = begin; base < end; base += kWarp) {
    const int64_t i = base + lane;
    const int e = i < end ? expert_at(args, i) : -1;
    const unsigned peers = __match_any_sync(0xffffffffu, e);
    const int my_rank = (e >= 0 ? rank[e] : 0) + __popc(peers & lanes_before);
    __syncwarp();
    if (e >= 0 && lane == __ffs(peers) - 1) rank[e] += __popc(peers);
    __syncwarp();
    if (i >= end) continue;
    const int64_t assignment = (i % args.num_tokens) * args.k + i / args.num_tokens;
    if (e < 0 || (args.capacity >= 0 && my_rank >= args.capacity)) {
      args.sorted_rows[assignment] = -1;
    } else {
      const int row = offsets[e] + my_rank;
      args.sorted_rows[assignment] = row;
      args.sorted_assignments[row] = static_cast<int32_t>(assignment);
    }
  }
}

}  // namespace

int64_t permute_scratch_size(int64_t num_assignments, int64_t num_experts) {
  return chunking(num_assignments).num_chunks * num_experts;
}

cudaError_t launch_permute(const PermuteLaunch& args, int32_t* chunk_counts, cudaStream_t stream) {
  const Chunking chunks = chunking(args.num_tokens * args.k);
  const int blocks = static_cast<int>(chunks.num_chunks);
  const size_t count_bytes = sizeof(int32_t) * args.num_experts;
  count_kernel<<<blocks, kThreads, count_bytes, stream>>>(args, chunks.chunk_size, chunk_counts);
  const size_t scatter_bytes = sizeof(int32_t) * (3 * static_cast<size_t>(args.num_experts) + 1);
  scatter_kernel<<<blocks, kThreads, scatter_bytes, stream>>>(args, chunks.chunk_size, chunk_counts);
  return cudaGetLastError();
}

}  // namespace moe_kernels
