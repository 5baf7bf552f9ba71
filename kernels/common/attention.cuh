// What the two attention kernels share (kernels/attention.cu, the portable one, and
// kernels/attention_sm90a.cu, Hopper's): the parameter struct, the masking rule, and the steps
// of the online softmax on a query row whose scores are spread over the 4 lanes of a quad
// (true of both mma.sync's and wgmma's f32 accumulator fragments). The per-element loops stay
// in the kernels: their fragment layouts differ.
#pragma once
#include "portable.cuh"

// Both kernels' parameters, mirrored by ops::attention::AttentionParams; build.rs checks that
// both have this layout (build/abi.rs).
struct AttentionParams {
    const __nv_bfloat16* qkv;  // [B, N, 3C]
    const __nv_bfloat16* kv;   // [B, M, 2C], or null
    const float* mask;         // [B, N + M], or null
    void* out;                 // O [B, N, C] in the output type
    int n, m, c;
    int causal;
    float scale;
    int pad;  // explicit, so every byte is a field
};

namespace attn_shared {
constexpr float LOG2E = 1.4426950408889634f;

// Whether the key mask (AttentionParams::mask, or null; this sample's row starts at
// mask_row = b·(N + M)) holds 0 for key j. (The whole mask and an offset rather than a
// pointer to the row: a null-or-row pointer costs the portable kernel 30 registers.)
__device__ __forceinline__ bool key_masked_out(const float* mask, long long mask_row, int j) {
    return mask && mask[mask_row + j] == 0.f;
}

// Whether key j attends to query `row`: it exists (in_range: false for the zero-filled keys
// past a tile's source), it is not after the query under a causal mask, and the key mask does
// not exclude it.
__device__ __forceinline__ bool key_visible(bool in_range, int j, int row, int causal, const float* mask,
                                            long long mask_row) {
    // Written as a test then an if, not one && chain: ptxas gives the portable kernel about 10
    // more registers for the chain.
    bool visible = in_range && !(causal && j > row);
    if (visible && key_masked_out(mask, mask_row, j)) visible = false;
    return visible;
}

// The score the softmax sees, in the exp2 domain: q·k·scale·log2(e) (sl2 = scale·log2(e)),
// or −inf for a key that is not visible (key_visible), so its weight is exactly 0.
__device__ __forceinline__ float masked_score(float qk, float sl2, bool in_range, int j, int row, int causal,
                                              const float* mask, long long mask_row) {
    return key_visible(in_range, j, row, causal, mask, mask_row) ? qk * sl2 : -INFINITY;
}

// One key tile's update of a row's running max m_run, given this lane's maximum of the tile's
// masked scores: combines the quad's maxima, sets alpha = exp2(m_old − m_new) (the factor for
// the previous O and row sum) and returns the base the tile's exponentials subtract. While
// every key so far is masked the base stays 0, so exp2 gives 0, not NaN.
__device__ __forceinline__ float online_max_step(float tile_max, float& m_run, float& alpha) {
    tile_max = fmaxf(tile_max, __shfl_xor_sync(0xFFFFFFFFu, tile_max, 1));
    tile_max = fmaxf(tile_max, __shfl_xor_sync(0xFFFFFFFFu, tile_max, 2));
    const float m_new = fmaxf(m_run, tile_max);
    const float base = m_new == -INFINITY ? 0.f : m_new;
    alpha = exp2f(m_run - base);
    m_run = m_new;
    return base;
}

// 1 / (the row's sum), the sum spread over the quad like the maxima; 0 for a row with every
// key masked, so its output is zeros.
__device__ __forceinline__ float quad_row_inverse(float l) {
    l += __shfl_xor_sync(0xFFFFFFFFu, l, 1);
    l += __shfl_xor_sync(0xFFFFFFFFu, l, 2);
    return l > 0.f ? 1.f / l : 0.f;
}
}  // namespace attn_shared
