// The MoE permute as a stable counting sort in three passes over tiles of
// kTile assignments (one thread each):
//   1. histogram: group of every assignment (slot map lookup, validation),
//      rows per (tile, group) in shared memory; offsets monotonicity;
//   2. scan (one block): per group an exclusive scan over tiles, then over
//      groups, giving each (tile, group) its first permuted row;
//   3. scatter: inside a tile the warps take turns (32 steps); a warp ranks its
//      lanes of equal group with __match_any_sync and advances the group's
//      cursor once. Rows inside a group thus follow assignment order.
// The token of an assignment is a binary search over token_offsets: always a
// token in [0, N) even for inconsistent offsets, so the gather that follows
// can run before the host has looked at the errors.
#include "core/kernels/cuda/moe_permute.cuh"

namespace dmoe::core::cuda {
namespace {

constexpr int kTile = 1024;  // assignments per tile = threads per block
constexpr int kWarps = kTile / 32;

__device__ int32_t GroupOf(int32_t id, const int32_t* slot_to_group, int32_t num_slots) {
  const int64_t slot = int64_t{id} + 1;
  if (slot < 0 || slot >= num_slots) return -1;
  return slot_to_group[slot];
}

// Largest t in [0, N) with off[t] <= a (the owner of a for monotone offsets).
__device__ int32_t TokenOf(const int32_t* off, int32_t num_tokens, int32_t a) {
  int32_t lo = 0, hi = num_tokens - 1;
  while (lo < hi) {
    const int32_t mid = lo + (hi - lo + 1) / 2;
    if (off[mid] <= a) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

__global__ void HistogramKernel(MoeRoutingBuffers b, int32_t num_tokens, int32_t num_assignments,
                                int32_t num_slots, int32_t num_groups) {
  extern __shared__ int32_t counts[];  // [G + 1]
  for (int i = threadIdx.x; i <= num_groups; i += blockDim.x) counts[i] = 0;
  __syncthreads();
  for (int64_t t = int64_t{blockIdx.x} * blockDim.x + threadIdx.x; t < num_tokens;
       t += int64_t{gridDim.x} * blockDim.x) {
    if (b.token_offsets[t + 1] < b.token_offsets[t])
      atomicMin(&b.summary[kSummaryBadToken], static_cast<int32_t>(t));
  }
  const int64_t a = int64_t{blockIdx.x} * kTile + threadIdx.x;
  if (a < num_assignments) {
    int32_t g = GroupOf(b.ffn_ids[a], b.slot_to_group, num_slots);
    if (g < 0 || g >= num_groups) {
      atomicMin(&b.summary[kSummaryBadAssignment], static_cast<int32_t>(a));
      g = num_groups;
    }
    b.assignment_to_group[a] = g;
    atomicAdd(&counts[g], 1);
  }
  __syncthreads();
  int32_t* mine = b.tile_group_offset + int64_t{blockIdx.x} * (num_groups + 1);
  for (int i = threadIdx.x; i <= num_groups; i += blockDim.x) mine[i] = counts[i];
}

// One block of kTile threads.
__global__ void ScanKernel(MoeRoutingBuffers b, int32_t tiles, int32_t num_assignments,
                           int32_t num_groups) {
  __shared__ int32_t part[kTile];
  __shared__ int32_t carry;
  const int32_t width = num_groups + 1;
  // Per group: rows of the tiles before each tile (exclusive), total rows.
  for (int32_t g = threadIdx.x; g < width; g += blockDim.x) {
    int32_t running = 0;
    for (int32_t t = 0; t < tiles; ++t) {
      int32_t* p = b.tile_group_offset + int64_t{t} * width + g;
      const int32_t c = *p;
      *p = running;
      running += c;
    }
    b.expert_first_offset[g] = running;
    if (g < num_groups) b.summary[kSummaryCounts + g] = running;
  }
  if (threadIdx.x == 0) carry = 0;
  __syncthreads();
  // Exclusive scan of the totals over groups, kTile at a time (Hillis-Steele).
  for (int32_t base = 0; base < width; base += kTile) {
    const int32_t i = base + threadIdx.x;
    const int32_t v = i < width ? b.expert_first_offset[i] : 0;
    part[threadIdx.x] = v;
    __syncthreads();
    for (int off = 1; off < kTile; off <<= 1) {
      const int32_t add = threadIdx.x >= off ? part[threadIdx.x - off] : 0;
      __syncthreads();
      part[threadIdx.x] += add;
      __syncthreads();
    }
    if (i < width) b.expert_first_offset[i] = carry + part[threadIdx.x] - v;
    __syncthreads();
    if (threadIdx.x == kTile - 1) carry += part[kTile - 1];
    __syncthreads();
  }
  if (threadIdx.x == 0) b.expert_first_offset[width] = num_assignments;
  __syncthreads();
  // First permuted row of each (tile, group).
  for (int32_t g = threadIdx.x; g < width; g += blockDim.x) {
    const int32_t first = b.expert_first_offset[g];
    for (int32_t t = 0; t < tiles; ++t) b.tile_group_offset[int64_t{t} * width + g] += first;
  }
}

__global__ void ScatterKernel(MoeRoutingBuffers b, int32_t num_tokens, int32_t num_assignments,
                              int32_t num_groups) {
  extern __shared__ int32_t cursor[];  // [G + 1]
  const int32_t* mine = b.tile_group_offset + int64_t{blockIdx.x} * (num_groups + 1);
  for (int i = threadIdx.x; i <= num_groups; i += blockDim.x) cursor[i] = mine[i];
  __syncthreads();
  const int64_t a = int64_t{blockIdx.x} * kTile + threadIdx.x;
  const bool valid = a < num_assignments;
  const int32_t g = valid ? b.assignment_to_group[a] : -1;
  const int32_t token = valid ? TokenOf(b.token_offsets, num_tokens, static_cast<int32_t>(a)) : 0;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int w = 0; w < kWarps; ++w) {
    if (warp == w) {
      const unsigned peers = __match_any_sync(0xffffffffu, g);
      const int rank = __popc(peers & ((1u << lane) - 1u));
      const int32_t base = valid ? cursor[g] : 0;
      __syncwarp();
      if (valid) {
        const int32_t p = base + rank;
        b.permuted_to_token[p] = token;
        b.assignment_to_permuted[a] = p;
        if (rank == 0) cursor[g] = base + __popc(peers);
      }
    }
    __syncthreads();
  }
}

template <typename T>
__device__ T Convert(float f);
template <>
__device__ float Convert<float>(float f) {
  return f;
}
template <>
__device__ __nv_bfloat16 Convert<__nv_bfloat16>(float f) {
  return __float2bfloat16_rn(f);
}

template <typename T>
__global__ void GatherKernel(const float* x, int64_t hidden, const int32_t* permuted_to_token,
                             T* xp) {
  const int64_t p = blockIdx.x;
  const float* src = x + int64_t{permuted_to_token[p]} * hidden;
  T* dst = xp + p * hidden;
  for (int64_t j = threadIdx.x; j < hidden; j += blockDim.x) dst[j] = Convert<T>(src[j]);
}

}  // namespace

int64_t MoeRoutingTiles(int64_t num_assignments) {
  return num_assignments <= 0 ? 1 : (num_assignments + kTile - 1) / kTile;
}

cudaError_t LaunchMoeRouting(const MoeRoutingBuffers& b, int64_t num_tokens,
                             int32_t num_assignments, int32_t num_slots, int32_t num_groups,
                             cudaStream_t stream) {
  const int32_t tiles = static_cast<int32_t>(MoeRoutingTiles(num_assignments));
  const size_t smem = sizeof(int32_t) * (num_groups + 1);
  if (smem > 48 * 1024) return cudaErrorInvalidValue;  // > ~12k FFNs per layer
  // Error fields to kNoError (byte 0x7f); counts are written by the scan.
  cudaError_t e = cudaMemsetAsync(b.summary, 0x7f, sizeof(int32_t) * kSummaryCounts, stream);
  if (e != cudaSuccess) return e;
  const int32_t n = static_cast<int32_t>(num_tokens);
  HistogramKernel<<<tiles, kTile, smem, stream>>>(b, n, num_assignments, num_slots, num_groups);
  ScanKernel<<<1, kTile, 0, stream>>>(b, tiles, num_assignments, num_groups);
  ScatterKernel<<<tiles, kTile, smem, stream>>>(b, n, num_assignments, num_groups);
  return cudaGetLastError();
}

template <typename T>
cudaError_t LaunchMoeGather(const float* x, int64_t hidden, const int32_t* permuted_to_token,
                            int32_t rows, T* xp, cudaStream_t stream) {
  if (rows <= 0) return cudaSuccess;
  const int threads = hidden >= 1024 ? 256 : 128;
  GatherKernel<T><<<rows, threads, 0, stream>>>(x, hidden, permuted_to_token, xp);
  return cudaGetLastError();
}

template cudaError_t LaunchMoeGather<float>(const float*, int64_t, const int32_t*, int32_t, float*,
                                            cudaStream_t);
template cudaError_t LaunchMoeGather<__nv_bfloat16>(const float*, int64_t, const int32_t*, int32_t,
                                                    __nv_bfloat16*, cudaStream_t);

}  // namespace dmoe::core::cuda
