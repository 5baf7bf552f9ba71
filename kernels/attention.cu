// Flash attention over packed projections (ops/attention.rs).
//
// Math: per sample b, head h, query i: O[i] = Σ_j softmax_j(q_i·k_j·scale + mask)·v_j over the
//   keys j ∈ [0, N + M): the N own tokens, then the M extra tokens (Stable Cascade's mapped
//   CLIP tokens) — two sources, no concatenated copy. Masks: causal (j > i) and a per-key f32
//   mask (0 = masked). Online softmax in f32 (running max and sum per row, base-2 exponent);
//   P is rounded to bf16 for the P·V product (f32 accumulation). A query with every key masked
//   gets zeros.
// Layout: qkv bf16 [B, N, 3C] (rows q | k | v, head h at channels [h·D, (h+1)·D) of each part),
//   kv bf16 [B, M, 2C] (rows k | v) or null, mask f32 [B, N + M] or null, O [B, N, C] in the
//   output type. C = heads·D.
// Launch: grid (ceil(N / 64), heads, B), 128 threads = 4 warps, each warp 16 query rows; K/V
//   tiles of 64 keys double-buffered through cp.async; dynamic shared memory
//   (64 + 4·64)·(D + 8)·2 bytes (46,080 for D = 64). Q·Kᵀ and P·V on mma.sync m16n8k16 with
//   ldmatrix through mma.cuh's fragment loaders: ldmatrix_a_frag for Q, ldmatrix_b_pair for K,
//   ldmatrix_b_pair_trans (.trans) for V.
// Limits: D ∈ {16, 32, 64} (one kernel each; 16 serves small test configurations); C % 8 == 0 (16-byte rows); N, M < 2^31 / 3C.
// Names: attention_d<D>_<out>.
//
// Small heads (D ∈ {4, 8}: the tiny test configurations of CLIP and the INR transformer,
// narrower than one mma k-step): the same math in scalar f32 — one thread per query row, keys
// streamed from global memory with the online softmax, P·V in f32. Launch: grid
// (ceil(N / 128), heads, B), 128 threads, no shared memory. Names: attention_d<D>_<out>.
// Parameters: one AttentionParams (common/attention.cuh) by value; the masking rule and the
// online softmax's per-row steps are common/attention.cuh's too, shared with attention_sm90a.cu.
#include "common/portable.cuh"
#include "common/convert.cuh"
#include "common/mma.cuh"
#include "common/attention.cuh"

namespace attn {
using namespace attn_shared;
constexpr int BQ = 64, BKV = 64, THREADS = 128;

template <int D, typename TO>
__device__ __forceinline__ void body(const __nv_bfloat16* __restrict__ qkv, const __nv_bfloat16* __restrict__ kv,
                                     const float* __restrict__ mask, TO* __restrict__ out, int N, int M, int C,
                                     int causal, float scale) {
    constexpr int LD = D + 8;       // padded row pitch: ldmatrix rows land on distinct banks
    constexpr int CHUNKS = D / 8;   // 16-byte chunks per row
    constexpr int KSTEPS = D / 16;  // k-steps of Q·Kᵀ
    constexpr int DTILES = D / 8;   // n-tiles of the output
    __nv_bfloat16* Qs = dynamic_smem<__nv_bfloat16>();  // [BQ][LD]
    __nv_bfloat16* Ks = Qs + BQ * LD;                   // [2][BKV][LD]
    __nv_bfloat16* Vs = Ks + 2 * BKV * LD;              // [2][BKV][LD]

    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane >> 2, t = lane & 3;
    const int h = blockIdx.y, b = blockIdx.z;
    const int q0 = blockIdx.x * BQ;
    const int keys = N + M;
    const long long C3 = 3LL * C, C2 = 2LL * C;
    const __nv_bfloat16* qkv_b = qkv + (long long)b * N * C3;
    const __nv_bfloat16* kv_b = kv ? kv + (long long)b * M * C2 : nullptr;
    const long long mask_row = (long long)b * keys;  // this sample's key mask

    // Q tile: rows past N are zero-filled.
    for (int c = tid; c < BQ * CHUNKS; c += THREADS) {
        const int r = c / CHUNKS, ch = (c % CHUNKS) * 8;
        const bool ok = q0 + r < N;
        cp_async_16_zfill(Qs + r * LD + ch, ok ? qkv_b + (q0 + r) * C3 + h * D + ch : qkv, ok);
    }
    // One K/V tile: key j from the own tokens (j < N) or the extra ones; past the end: zeros.
    auto load_kv = [&](int stage, int tile) {
        for (int c = tid; c < BKV * CHUNKS; c += THREADS) {
            const int r = c / CHUNKS, ch = (c % CHUNKS) * 8, j = tile * BKV + r;
            const __nv_bfloat16* k_src = qkv;
            long long v_off = 0;
            const bool ok = j < keys;
            if (j < N) {
                k_src = qkv_b + j * C3 + C + h * D + ch;
                v_off = C;
            } else if (ok) {
                k_src = kv_b + (long long)(j - N) * C2 + h * D + ch;
                v_off = C;
            }
            cp_async_16_zfill(Ks + (stage * BKV + r) * LD + ch, k_src, ok);
            cp_async_16_zfill(Vs + (stage * BKV + r) * LD + ch, ok ? k_src + v_off : qkv, ok);
        }
    };
    load_kv(0, 0);
    cp_async_commit();

    // Causal: keys past the block's last query are never visible.
    const int last_key = causal ? min(keys, q0 + BQ) : keys;
    const int tiles = (last_key + BKV - 1) / BKV;
    const float sl2 = scale * LOG2E;
    const int row0 = q0 + warp * 16 + g, row1 = row0 + 8;  // this lane's two query rows

    uint32_t qf[KSTEPS][4];
    float o[DTILES][4];
    for (int i = 0; i < DTILES; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
    float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.f, 0.f};

    for (int tile = 0; tile < tiles; ++tile) {
        if (tile + 1 < tiles) load_kv((tile + 1) & 1, tile + 1);
        cp_async_commit();
        cp_async_wait<1>();
        __syncthreads();
        if (tile == 0) {
#pragma unroll
            for (int ks = 0; ks < KSTEPS; ++ks)
                ldmatrix_a_frag(qf[ks], Qs, warp * 16, ks * 16, LD, lane);
        }
        const __nv_bfloat16* k_s = Ks + (tile & 1) * BKV * LD;
        const __nv_bfloat16* v_s = Vs + (tile & 1) * BKV * LD;

        // S = Q·Kᵀ for 16 rows × 64 keys: 8 n-tiles.
        float s[8][4];
#pragma unroll
        for (int nt = 0; nt < 8; ++nt) s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
#pragma unroll
        for (int ks = 0; ks < KSTEPS; ++ks)
#pragma unroll
            for (int nt = 0; nt < 8; nt += 2) {
                uint32_t b0[2], b1[2];
                ldmatrix_b_pair(b0, b1, k_s, nt * 8, ks * 16, LD, lane);
                mma_bf16_16816(s[nt], qf[ks], b0, s[nt]);
                mma_bf16_16816(s[nt + 1], qf[ks], b1, s[nt + 1]);
            }

        // Scale, mask, online softmax. Lane holds rows row0 (e = 0, 1) and row1 (e = 2, 3);
        // a row's 64 scores are spread over the 4 lanes of a quad.
        float tile_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
        for (int nt = 0; nt < 8; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int j = tile * BKV + nt * 8 + 2 * t + (e & 1);
                s[nt][e] = masked_score(s[nt][e], sl2, j < keys, j, e < 2 ? row0 : row1, causal, mask, mask_row);
                tile_max[e >> 1] = fmaxf(tile_max[e >> 1], s[nt][e]);
            }
        float alpha[2];
#pragma unroll
        for (int r = 0; r < 2; ++r) tile_max[r] = online_max_step(tile_max[r], m_run[r], alpha[r]);
        float row_sum[2] = {0.f, 0.f};
        uint32_t pf[4][4];  // P as the A operand of P·V: 4 k-steps of 16 keys
#pragma unroll
        for (int nt = 0; nt < 8; ++nt) {
            float p[4];
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                p[e] = exp2f(s[nt][e] - tile_max[e >> 1]);
                row_sum[e >> 1] += p[e];
            }
            // C layout of n-tiles 2k, 2k+1 = A layout of k-step k: regs {0,1} from 2k, {2,3} from 2k+1.
            pf[nt >> 1][(nt & 1) * 2 + 0] = pack_bf16x2(p[0], p[1]);
            pf[nt >> 1][(nt & 1) * 2 + 1] = pack_bf16x2(p[2], p[3]);
        }
#pragma unroll
        for (int r = 0; r < 2; ++r) l_run[r] = l_run[r] * alpha[r] + row_sum[r];
#pragma unroll
        for (int dt = 0; dt < DTILES; ++dt) {
            o[dt][0] *= alpha[0];
            o[dt][1] *= alpha[0];
            o[dt][2] *= alpha[1];
            o[dt][3] *= alpha[1];
        }
        // O += P·V: V tile [key][d] is B stored [k][n]: ldmatrix .trans.
#pragma unroll
        for (int ks = 0; ks < 4; ++ks)
#pragma unroll
            for (int dt = 0; dt < DTILES; dt += 2) {
                uint32_t b0[2], b1[2];
                ldmatrix_b_pair_trans(b0, b1, v_s, ks * 16, dt * 8, LD, lane);
                mma_bf16_16816(o[dt], pf[ks], b0, o[dt]);
                mma_bf16_16816(o[dt + 1], pf[ks], b1, o[dt + 1]);
            }
        __syncthreads();  // everyone is done with this stage before it is refilled
    }
    cp_async_wait_all();

#pragma unroll
    for (int r = 0; r < 2; ++r) l_run[r] = quad_row_inverse(l_run[r]);
    TO* out_b = out + (long long)b * N * C + h * D;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int row = r ? row1 : row0;
        if (row >= N) continue;
#pragma unroll
        for (int dt = 0; dt < DTILES; ++dt)
#pragma unroll
            for (int e = 0; e < 2; ++e) out_b[(long long)row * C + dt * 8 + 2 * t + e] = from_f32<TO>(o[dt][2 * r + e] * l_run[r]);
    }
}

// Scalar path for heads narrower than an mma k-step (see the header).
template <int D, typename TO>
__device__ __forceinline__ void small_body(const __nv_bfloat16* __restrict__ qkv, const __nv_bfloat16* __restrict__ kv,
                                           const float* __restrict__ mask, TO* __restrict__ out, int N, int M, int C,
                                           int causal, float scale) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x, h = blockIdx.y, b = blockIdx.z;
    if (i >= N) return;
    const int keys = N + M;
    const long long C3 = 3LL * C, C2 = 2LL * C;
    const __nv_bfloat16* qkv_b = qkv + (long long)b * N * C3;
    float q[D], acc[D];
#pragma unroll
    for (int d = 0; d < D; ++d) {
        q[d] = to_f32(qkv_b[i * C3 + h * D + d]) * scale * LOG2E;
        acc[d] = 0.f;
    }
    float m_run = -INFINITY, l_run = 0.f;
    const int last_key = causal ? min(keys, i + 1) : keys;
    const long long mask_row = (long long)b * keys;  // this sample's key mask
    for (int j = 0; j < last_key; ++j) {
        if (key_masked_out(mask, mask_row, j)) continue;  // (causal: last_key bounds the loop)
        const __nv_bfloat16* k = j < N ? qkv_b + j * C3 + C + h * D : kv + ((long long)b * M + j - N) * C2 + h * D;
        const __nv_bfloat16* v = k + C;
        float s = 0.f;
#pragma unroll
        for (int d = 0; d < D; ++d) s += q[d] * to_f32(k[d]);
        const float m_new = fmaxf(m_run, s);
        const float alpha = exp2f(m_run - m_new), p = exp2f(s - m_new);
        l_run = l_run * alpha + p;
#pragma unroll
        for (int d = 0; d < D; ++d) acc[d] = acc[d] * alpha + p * to_f32(v[d]);
        m_run = m_new;
    }
    const float inv = l_run > 0.f ? 1.f / l_run : 0.f;
    TO* o = out + ((long long)b * N + i) * C + h * D;
#pragma unroll
    for (int d = 0; d < D; ++d) o[d] = from_f32<TO>(acc[d] * inv);
}

// A kernel: the struct unpacked into the body's arguments (the scalar one for small heads).
template <int D, typename TO>
__device__ __forceinline__ void entry(const AttentionParams& p) {
    if constexpr (D >= 16)
        body<D>(p.qkv, p.kv, p.mask, static_cast<TO*>(p.out), p.n, p.m, p.c, p.causal, p.scale);
    else
        small_body<D>(p.qkv, p.kv, p.mask, static_cast<TO*>(p.out), p.n, p.m, p.c, p.causal, p.scale);
}
}  // namespace attn

extern "C" __global__ void __launch_bounds__(128) attention_d64_bf16(const AttentionParams p) { attn::entry<64, __nv_bfloat16>(p); }
extern "C" __global__ void __launch_bounds__(128) attention_d64_f32(const AttentionParams p) { attn::entry<64, float>(p); }
extern "C" __global__ void __launch_bounds__(128) attention_d32_bf16(const AttentionParams p) { attn::entry<32, __nv_bfloat16>(p); }
extern "C" __global__ void __launch_bounds__(128) attention_d32_f32(const AttentionParams p) { attn::entry<32, float>(p); }
extern "C" __global__ void __launch_bounds__(128) attention_d16_bf16(const AttentionParams p) { attn::entry<16, __nv_bfloat16>(p); }
extern "C" __global__ void __launch_bounds__(128) attention_d16_f32(const AttentionParams p) { attn::entry<16, float>(p); }
extern "C" __global__ void __launch_bounds__(128) attention_d8_bf16(const AttentionParams p) { attn::entry<8, __nv_bfloat16>(p); }
extern "C" __global__ void __launch_bounds__(128) attention_d8_f32(const AttentionParams p) { attn::entry<8, float>(p); }
extern "C" __global__ void __launch_bounds__(128) attention_d4_bf16(const AttentionParams p) { attn::entry<4, __nv_bfloat16>(p); }
extern "C" __global__ void __launch_bounds__(128) attention_d4_f32(const AttentionParams p) { attn::entry<4, float>(p); }
