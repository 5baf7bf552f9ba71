// Flash attention for Hopper (sm_90a only): TMA + wgmma, warp-specialised, FA3-style
// (ops/attention_sm90a.rs). The portable kernel is kernels/attention.cu.
//
// Math: the same as kernels/attention.cu: per sample b, head h, query i:
//   O[i] = Σ_j softmax_j(q_i·k_j·scale + mask)·v_j over the keys j ∈ [0, N + M): the N own
//   tokens of the packed qkv tensor, then the M extra tokens of kv (Stable Cascade's mapped
//   CLIP tokens), read from their two sources (no concatenated copy). Masks: causal (j > i;
//   only without extra tokens, and key tiles past the block's last query are skipped) and a
//   per-key f32 mask (0 = masked), as in attention.cu. Online softmax in f32: scores are
//   prescaled by scale·log2(e) and exponentiated with exp2; per query row a running max m and
//   sum l; each key tile rescales O and l by exp2(m_old − m_new). P is rounded to bf16 for the
//   P·V product (as in the portable kernel); Q·Kᵀ and P·V accumulate in f32; O / l at the end.
//   The row sums l add the unrounded f32 p, as the portable kernel does. A query with every
//   key masked gets zeros.
// Layout: head dim D ∈ {64, 32} (C = heads·D). qkv bf16 [B, N, 3C] (rows q | k | v, head h at
//   channels [h·D, h·D + D) of each part), kv bf16 [B, M, 2C] (rows k | v), mask f32
//   [B, N + M] or null, O [B, N, C] in the output type (bf16 or f32).
//   Both inputs reach the kernel as 3-D TMA tensor maps (dims {channels, tokens, B}, box
//   {D, 128, 1}, swizzle span 2·D bytes: 128 B for D = 64, 64 B for D = 32), so a tile never
//   crosses a sample and rows past N (or M) arrive as zeros. Shared memory (1024-byte
//   aligned): the Q tile [128 queries][D] (consumer c reading rows [64c, 64c + 64)), then
//   STAGES stages of a K tile [128 keys][D] and a V tile [128 keys][D], every row 2·D bytes in
//   the canonical K-major swizzled layout (8-row atoms of 16·D bytes), then the mbarriers.
// Key tiles: ceil(N / 128) tiles of own tokens (from qkv), then ceil(M / 128) tiles of extra
//   tokens (from kv); a tile's keys past its source's end are zero-filled by TMA and their
//   scores set to −inf before the softmax, as are masked keys' (a row whose keys are all
//   masked so far keeps a finite base, so its p are 0, not NaN).
// Launch: grid (ceil(N / 128), heads, B); 384 threads = 3 warpgroups: warpgroup 0 the producer
//   (setmaxnreg.dec to 24; one thread issues the TMA loads of Q once and of K and V per tile
//   into a STAGES-deep ring), warpgroups 1 and 2 the consumers (setmaxnreg.inc to 240), each
//   owning 64 query rows:
//     S (64×128 f32) = Q·Kᵀ: D/16 × wgmma m64n128k16, A (Q) and B (K, K-major) from shared
//     memory;
//     softmax in registers (a row's 32 values of a thread, the 4 threads of a quad combined by
//     shuffles);
//     O (64×D f32) += P·V: 8 × wgmma m64nDk16 with A = P from registers (the S accumulator
//     fragment of keys [16k, 16k + 16) is exactly the A fragment of k-step k) and B = V from
//     shared memory through an MN-major (transposed) descriptor: V's rows are keys (k) with
//     the D channels (n) contiguous (one swizzle atom wide).
//   Software pipeline per consumer (FA3's intra-warpgroup overlap): Q·Kᵀ of tile i and P·V
//   of tile i − 1 are issued back to back, and the softmax of tile i (exp2 on the scores in
//   place) runs while P·V of tile i − 1 is still on the tensor cores; O is rescaled and P
//   packed to bf16 once that P·V has completed. On top, ping-pong between the two consumers
//   (FA3's inter-warpgroup schedule): named barriers 1 and 2 make them take turns issuing
//   their wgmma batches, so one's softmax overlaps the other's matrix products.
//   Ring: full[s] (1 arrival with expect_tx of a K and a V tile + the TMA bytes), empty[s]
//   (one arrival per consumer warp, 8), q_full (1 arrival + the Q tile's bytes).
//   Dynamic shared memory: 1024 (alignment slack) + Q tile + STAGES · (K + V tiles) +
//   mbarriers = smem_bytes(D) below (82,984 for D = 64, 42,024 for D = 32).
// Limits: head dims 64 (Stage B/C, CLIP) and 32 (the INR transformer); others use the
//   portable kernel. C % 8 == 0 (TMA strides are multiples of 16 bytes), qkv and kv 16-byte
//   aligned; N, M < 2^31 − 128; heads, B < 65536.
// Names: attention_sm90a_d<D>_<out>. Parameters: the qkv and kv tensor maps (kv: any valid map
//   when M = 0, never read), then the portable kernel's AttentionParams (common/attention.cuh;
//   qkv and kv unused). The masking rule and the online softmax's per-row steps are
//   common/attention.cuh's too.
#include "common/portable.cuh"
#include "common/convert.cuh"
#include "common/hopper_sm90a.cuh"
#include "common/attention.cuh"

namespace attn_sm90a {
using namespace attn_shared;
constexpr int BQ = 128, BKV = 128, STAGES = 2;
constexpr int PRODUCER_REGS = 24, CONSUMER_REGS = 240;
// A tile row is one head's D channels: 2·D bytes, the swizzle span (128 B for D = 64, 64 B
// for D = 32); 8-row atoms of 8 spans.
constexpr int tile_bytes(int d) { return BKV * d * 2; }
constexpr int smem_bytes(int d) { return 1024 + tile_bytes(d) + STAGES * 2 * tile_bytes(d) + (1 + 2 * STAGES) * 8; }
static_assert(BQ == BKV, "Q, K and V tiles share the tensor maps' box");
static_assert(smem_bytes(64) == 82984 && smem_bytes(32) == 42024, "ops/attention_sm90a.rs smem_bytes mirrors this");
static_assert(PRODUCER_REGS * 128 + 2 * CONSUMER_REGS * 128 <= 65536, "the register file");

template <int D, typename TO>
__device__ __forceinline__ void body(const CUtensorMap* qkv_map, const CUtensorMap* kv_map, const AttentionParams& p) {
    static_assert(D == 32 || D == 64, "head dims 32 and 64");
    constexpr int TILE_BYTES = tile_bytes(D);   // one K or V tile (and the Q tile)
    constexpr int STAGE_BYTES = 2 * TILE_BYTES;  // K and V
    constexpr int SPAN = 2 * D, ATOM = 8 * SPAN;  // swizzle span (row bytes), 8-row atom bytes
    unsigned char* raw = dynamic_smem<unsigned char>();
    // Swizzle atoms start on 1024-byte (128 B swizzle) or 512-byte boundaries of the shared
    // address space.
    unsigned char* smem = raw + ((1024 - (smem_address(raw) & 1023)) & 1023);
    unsigned char* q_tile = smem;                 // [128][64] bf16
    unsigned char* kv_tiles = smem + TILE_BYTES;  // [STAGES][K 128×64 | V 128×64]
    uint64_t* full = reinterpret_cast<uint64_t*>(kv_tiles + STAGES * STAGE_BYTES);
    uint64_t* empty = full + STAGES;
    uint64_t* q_full = empty + STAGES;

    const int N = p.n, M = p.m, C = p.c;
    const int h = blockIdx.y, b = blockIdx.z, q0 = blockIdx.x * BQ;
    const int own_tiles = (N + BKV - 1) / BKV;
    // Causal (no extra tokens): keys past the block's last query are never visible.
    const int tiles = p.causal ? (min(N, q0 + BQ) + BKV - 1) / BKV : own_tiles + (M + BKV - 1) / BKV;
    const int wg = threadIdx.x / 128;

    if (threadIdx.x == 0) {
        for (int s = 0; s < STAGES; ++s) {
            mbarrier_init(&full[s], 1);
            mbarrier_init(&empty[s], 8);  // one arrival per consumer warp
        }
        mbarrier_init(q_full, 1);
        fence_mbarrier_init();
    }
    __syncthreads();

    if (wg == 0) {
        // Producer: one thread loads Q, then streams every K/V tile through the ring.
        setmaxnreg_dec<PRODUCER_REGS>();
        if (threadIdx.x == 0) {
            mbarrier_arrive_expect_tx(q_full, TILE_BYTES);
            tma_load_3d(q_tile, qkv_map, q_full, h * D, q0, b);
            for (int it = 0; it < tiles; ++it) {
                const int s = it % STAGES;
                mbarrier_wait_parity(&empty[s], ((it / STAGES) & 1) ^ 1);
                unsigned char* st = kv_tiles + s * STAGE_BYTES;
                mbarrier_arrive_expect_tx(&full[s], STAGE_BYTES);
                if (it < own_tiles) {
                    tma_load_3d(st, qkv_map, &full[s], C + h * D, it * BKV, b);
                    tma_load_3d(st + TILE_BYTES, qkv_map, &full[s], 2 * C + h * D, it * BKV, b);
                } else {
                    const int e = it - own_tiles;
                    tma_load_3d(st, kv_map, &full[s], h * D, e * BKV, b);
                    tma_load_3d(st + TILE_BYTES, kv_map, &full[s], C + h * D, e * BKV, b);
                }
            }
        }
        return;
    }

    // Consumers: warpgroup c (0, 1) owns query rows [q0 + 64c, q0 + 64c + 64).
    setmaxnreg_inc<CONSUMER_REGS>();
    const int c = wg - 1, t = threadIdx.x % 128, warp = t / 32, lane = t % 32;
    const uint32_t q_addr = smem_address(q_tile) + c * (64 * SPAN);
    const uint32_t kv_addr = smem_address(kv_tiles);
    const float sl2 = p.scale * LOG2E;
    const long long mask_row = (long long)b * (N + M);  // this sample's key mask
    const int row0 = q0 + 64 * c + 16 * warp + lane / 4;  // this thread's rows: row0, row0 + 8

    // Fragments (m64nNk16 f32 accumulator): value v of thread t is
    // [16·warp + lane/4 + 8·((v/2)%2)][8·(v/4) + 2·(lane%4) + v%2]: the thread's two rows are
    // r = (v/2)%2, its columns 8·(v/4) + 2·(lane%4) + v%2.
    float o[D / 2];
#pragma unroll
    for (int v = 0; v < D / 2; ++v) o[v] = 0.f;
    float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.f, 0.f};

    // Issues S = Q·Kᵀ of tile `it` into sc (one commit group). Both operands K-major,
    // SPAN-byte swizzled rows; a k-step is 32 bytes into the row.
    auto issue_qk = [&](float (&sc)[BKV / 2], int it) {
        const uint32_t k_addr = kv_addr + (it % STAGES) * STAGE_BYTES;
#pragma unroll
        for (int ks = 0; ks < D / 16; ++ks)
            wgmma_bf16_ss<BKV, 0, 0>(sc, make_matrix_desc(q_addr + 32 * ks, 16, ATOM, SPAN),
                                     make_matrix_desc(k_addr + 32 * ks, 16, ATOM, SPAN), ks > 0);
        wgmma_commit();
    };
    // Issues O += P·V of tile `it` (one commit group). V [keys][D] is B (K×N) MN-major: rows
    // along k SPAN bytes apart, 8-row k groups ATOM bytes apart (SBO), one D-wide n atom (LBO
    // unused); a k-step of 16 keys starts 16 rows further.
    auto issue_pv = [&](const uint32_t (&pa)[BKV / 16][4], int it) {
        const uint32_t v_addr = kv_addr + (it % STAGES) * STAGE_BYTES + TILE_BYTES;
#pragma unroll
        for (int k = 0; k < BKV / 16; ++k)
            wgmma_bf16_rs<D, 1>(o, pa[k], make_matrix_desc(v_addr + 16 * SPAN * k, 8192, ATOM, SPAN), true);
        wgmma_commit();
    };
    // The online softmax of tile `it` on its scores, in place: scale, mask (the tile's
    // zero-filled keys, causal, the key mask), the running max (alpha: the factor for the
    // previous O and l), then sc[v] = p = exp2(s − max) in f32 and row_sum = Σ p. Touches
    // neither O nor P, so it runs while the previous tile's P·V is in flight.
    auto softmax = [&](float (&sc)[BKV / 2], int it, float (&alpha)[2], float (&row_sum)[2]) {
        const int valid = it < own_tiles ? min(BKV, N - it * BKV) : min(BKV, M - (it - own_tiles) * BKV);
        const int key0 = it < own_tiles ? it * BKV : N + (it - own_tiles) * BKV;  // key of column 0
        float tile_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
        for (int v = 0; v < BKV / 2; ++v) {
            const int col = 8 * (v / 4) + 2 * (lane % 4) + v % 2, j = key0 + col;
            sc[v] = masked_score(sc[v], sl2, col < valid, j, row0 + 8 * ((v / 2) % 2), p.causal, p.mask, mask_row);
            tile_max[(v / 2) % 2] = fmaxf(tile_max[(v / 2) % 2], sc[v]);
        }
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            tile_max[r] = online_max_step(tile_max[r], m_run[r], alpha[r]);
            row_sum[r] = 0.f;
        }
#pragma unroll
        for (int v = 0; v < BKV / 2; ++v) {
            sc[v] = exp2f(sc[v] - tile_max[(v / 2) % 2]);
            row_sum[(v / 2) % 2] += sc[v];
        }
    };
    // After the previous P·V completed: rescale O and l, and P (bf16) as the A operand of
    // P·V: k-step k (keys [16k, 16k + 16)) is accumulator values [8k, 8k + 8), word w = values
    // 8k + 2w, 8k + 2w + 1.
    auto rescale_and_pack = [&](const float (&sc)[BKV / 2], const float (&alpha)[2], const float (&row_sum)[2],
                                uint32_t (&pa)[BKV / 16][4]) {
#pragma unroll
        for (int r = 0; r < 2; ++r) l_run[r] = l_run[r] * alpha[r] + row_sum[r];
#pragma unroll
        for (int v = 0; v < D / 2; ++v) o[v] *= alpha[(v / 2) % 2];
#pragma unroll
        for (int k = 0; k < BKV / 16; ++k)
#pragma unroll
            for (int w = 0; w < 4; ++w) pa[k][w] = pack_bf16x2(sc[8 * k + 2 * w], sc[8 * k + 2 * w + 1]);
    };
    // This warp is done with tile `it`'s stage (K read by its Q·Kᵀ, V by its P·V).
    auto release = [&](int it) {
        __syncwarp();
        if (lane == 0) mbarrier_arrive(&empty[it % STAGES]);
    };

    // Ping-pong (FA3's inter-warpgroup schedule): the consumers take turns issuing their
    // wgmmas, so one warpgroup's exponentials run while the other's matrix products do. Named
    // barrier 1 + c (256 threads: this warpgroup syncs, the other arrives) gates consumer c's
    // issue points; consumer 0 goes first. Both consumers have tiles + 1 issue points, and
    // consumer 1 skips its last arrival, so every barrier phase completes.
    auto turn_begin = [&]() { named_barrier_sync(1 + c, 256); };
    auto turn_end = [&](bool last) {
        if (!(last && c == 1)) named_barrier_arrive(2 - c, 256);
    };
    if (c == 1) named_barrier_arrive(1, 256);

    // Software pipeline (FA3's intra-warpgroup overlap): while the exponentials of tile it run,
    // the tensor cores do tile it−1's P·V; Q·Kᵀ of tile it is issued before P·V of tile it−1.
    float sc[BKV / 2], alpha[2], row_sum[2];
    uint32_t pa[BKV / 16][4];
    mbarrier_wait_parity(q_full, 0);
    mbarrier_wait_parity(&full[0], 0);
    wgmma_fence();
    turn_begin();
    issue_qk(sc, 0);
    turn_end(false);
    wgmma_wait<0>();
    softmax(sc, 0, alpha, row_sum);
    rescale_and_pack(sc, alpha, row_sum, pa);
    for (int it = 1; it < tiles; ++it) {
        mbarrier_wait_parity(&full[it % STAGES], (it / STAGES) & 1);
        wgmma_fence();
        turn_begin();
        issue_qk(sc, it);
        issue_pv(pa, it - 1);
        turn_end(false);
        wgmma_wait<1>();  // Q·Kᵀ of tile it is done (groups complete in order)
        softmax(sc, it, alpha, row_sum);
        wgmma_wait<0>();  // P·V of tile it − 1 is done: O and P may change, its stage is free
        release(it - 1);
        rescale_and_pack(sc, alpha, row_sum, pa);
    }
    wgmma_fence();
    turn_begin();
    issue_pv(pa, tiles - 1);
    turn_end(true);
    wgmma_wait<0>();
    release(tiles - 1);

#pragma unroll
    for (int r = 0; r < 2; ++r) l_run[r] = quad_row_inverse(l_run[r]);
    TO* out_b = static_cast<TO*>(p.out) + (long long)b * N * C + h * D;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int row = row0 + 8 * r;
        if (row >= N) continue;
#pragma unroll
        for (int j = 0; j < D / 8; ++j)
#pragma unroll
            for (int e = 0; e < 2; ++e)
                out_b[(long long)row * C + 8 * j + 2 * (lane % 4) + e] = from_f32<TO>(o[4 * j + 2 * r + e] * l_run[r]);
    }
}
}  // namespace attn_sm90a

extern "C" __global__ void __launch_bounds__(384, 1) attention_sm90a_d64_bf16(const __grid_constant__ CUtensorMap qkv_map,
        const __grid_constant__ CUtensorMap kv_map, const AttentionParams p) {
    attn_sm90a::body<64, __nv_bfloat16>(&qkv_map, &kv_map, p);
}
extern "C" __global__ void __launch_bounds__(384, 1) attention_sm90a_d64_f32(const __grid_constant__ CUtensorMap qkv_map,
        const __grid_constant__ CUtensorMap kv_map, const AttentionParams p) {
    attn_sm90a::body<64, float>(&qkv_map, &kv_map, p);
}
extern "C" __global__ void __launch_bounds__(384, 1) attention_sm90a_d32_bf16(const __grid_constant__ CUtensorMap qkv_map,
        const __grid_constant__ CUtensorMap kv_map, const AttentionParams p) {
    attn_sm90a::body<32, __nv_bfloat16>(&qkv_map, &kv_map, p);
}
extern "C" __global__ void __launch_bounds__(384, 1) attention_sm90a_d32_f32(const __grid_constant__ CUtensorMap qkv_map,
        const __grid_constant__ CUtensorMap kv_map, const AttentionParams p) {
    attn_sm90a::body<32, float>(&qkv_map, &kv_map, p);
}
