// Kernels of a decode step. Matrix-vector products: a few activation rows against a large weight, read once.
//
// At batch 1 (and a few rows) a product is bound by the weight's memory traffic, not arithmetic, so these
// kernels stream each weight row (or column block) once, for all activation rows at a time, on torch's
// own thread pool (at::parallel_for over output features). Activations are fp32 and so is the
// accumulation (only the summation order differs from a BLAS), except that with AVX512-BF16 a bf16 weight
// is multiplied in bf16, the activations rounded to bf16, and with AVX512-VNNI int8 and int4 weights in their
// pairs layouts in integers, the activations quantized to int16 per row.
//
//   linear(x [M, K], weight [N, K])            = x @ weight.T       (nn.Linear layout; fp32 or bf16 weight)
//   matmul(x [M, K], w [K, N])                 = x @ w              (LoRA layout: rows of w split over threads)
//   linear_int8(x [M, K], q [N, K] int8, scale [N] bf16) = x @ (q * scale[:, None]).T
//   linear_int8_pairs(x [M, K], pairs [ceil(N / 16), 16 K] int8, scale [N] bf16) = the same, the weight in the
//                                                  pairs layout (AVX512-VNNI)
//   linear_int4_pairs(x, q [ceil(N / 16), 8 K] uint8, scale, zero [ceil(N / 16), K / group, 16] bf16, group, N)
//                                             = x @ W.T for an int4 weight in its pairs layout (AVX512-VNNI)
//   linear_panels(x [M, K], panels [ceil(N / 16), 16 K] fp32, fp16 or bf16, N) = x @ W.T, the weight in the panels
//                                                  layout (AVX-512; bf16: AVX512-BF16), any number of rows
//
// M is at most MAX_ROWS, except that `linear`, `linear_int8` and the pairs kernels take up to MAX_TILE_ROWS
// (batched decoding) and `linear_panels` any number: beyond MAX_ROWS the arithmetic outweighs the weight traffic
// and they switch to register-tiled kernels (linear_many_rows; the pairs and panels layouts' own). AVX-512 code
// where the compiler targets it (-march=native), portable loops (auto-vectorised) elsewhere.
//
// The small operations of an RWKV-7 step, fused (each is a few dozen tiny torch ops otherwise):
//   token_mix(x, shift, coefs, ...) = [x + (shift - x) * c for c in coefs]      (the token-shift lerps,
//                                                                                optionally after a LayerNorm)
//   time_mix_step(...)           = TimeMix between its r/k/v projections and the output projection (one
//                                  parallel region: the LoRAs' first products split by rows, then whole heads)
//
// And a whole decode step, embedding to logits, in one call from Python: DecodeStep (at the end).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "vec_exp.h"

#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define GOOSE_AVX512 1
#include <immintrin.h>
#if defined(__AVX512BF16__)
#define GOOSE_BF16_DOT 1    // vdpbf16ps: bf16 weights are multiplied in bf16
#endif
#if defined(__AVX512VNNI__)
#define GOOSE_INT16_DOT 1   // vpdpwssd: int8 weights meet activations quantized to int16
#endif
#endif

namespace {

constexpr int64_t MAX_ROWS = 4;          // rows of the streaming matrix-vector kernels
constexpr int64_t MAX_TILE_ROWS = 64;    // rows of the many-rows kernel (ops/gemm.py uses it up to 16, quant.py 64)
// weight rows streamed together by `linear`: 8 (measured ~10% faster than 4 at one row), 4 when the
// accumulators of more activation rows would not fit the 32 vector registers
template <int M>
constexpr int row_block() { return M <= 2 ? 8 : 4; }
constexpr int64_t COL_BLOCK = 64;               // output columns accumulated together by `matmul`
// LoRA-layout products (axpy_range) pass over a tile of COL_BLOCK columns and this many rows of the weight
// (16 KB: it stays in L1 while every group of MAX_ROWS activation rows passes over it), fetching the weight
// row LORA_PREFETCH_ROWS ahead in software. Measured at batch 16 (L12-D768 time-mix, per layer): 216 -> 188 us,
// at batch 4 92 -> 67 us; the first pass over a tile otherwise waits on DRAM at ~7 GB/s per core.
constexpr int64_t LORA_TILE_ROWS = 64;
constexpr int64_t LORA_PREFETCH_ROWS = 16;
constexpr int64_t PREFETCH_HEADS = 2;           // how far ahead time_mix_step fetches head states
constexpr int64_t PREFETCH_BLOCKS = 1;          // how far ahead (in row blocks) the linear kernels fetch weights
// the streaming kernels prefetch from 2 rows: one row of fp32 or bf16 weights streams as fast on the hardware
// prefetcher alone, more (measured, 4 rows on L12-D768's weights: 15.5 -> 14.4 ms per step's products) do not.
// int8 weights prefetch at one row too: each byte costs more instructions (widening), so fewer weight lines are
// in flight on the out-of-order window alone (measured at one row, int8 in int16 pairs: 22-30 -> 30-35 GB/s)
constexpr int PREFETCH_MIN_ROWS = 2;
constexpr int64_t K_CHUNK = 1024;                // the many-rows kernel splits longer dot products into chunks
constexpr int64_t GRAIN_BYTES = 128 << 10;      // smallest share of the weight worth a thread

#ifdef GOOSE_AVX512

__mmask16 tail_mask(int64_t n) { return n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1); }

// One step's operands. With a 16-lane mask: 16 values as fp32 (fp32 arithmetic; bf16, fp16 and int8 weights
// widened). With a 32-lane mask: 32 bf16 values as they are, for the pair products below. Masked lanes read
// nothing and are zero.
inline __m512 load_operand(const float* p, __mmask16 mask) {
    return mask == 0xFFFF ? _mm512_loadu_ps(p) : _mm512_maskz_loadu_ps(mask, p);
}
inline __m512 load_operand(const int8_t* p, __mmask16 mask) {
    const __m128i q = mask == 0xFFFF ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(p)) : _mm_maskz_loadu_epi8(mask, p);
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q));
}
inline __m512 load_operand(const at::BFloat16* p, __mmask16 mask) {   // bf16 is the top half of an fp32
    const __m256i h = mask == 0xFFFF ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))
                                     : _mm256_maskz_loadu_epi16(mask, p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
inline __m512 load_operand(const at::Half* p, __mmask16 mask) {
    const __m256i h = mask == 0xFFFF ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))
                                     : _mm256_maskz_loadu_epi16(mask, p);
    return _mm512_cvtph_ps(h);
}
inline __m512i load_operand(const at::BFloat16* p, __mmask32 mask) {
    return mask == ~__mmask32(0) ? _mm512_loadu_si512(p) : _mm512_maskz_loadu_epi16(mask, p);
}

// acc + w * x in the arithmetic of the activations' type (the first argument only selects it): fp32 FMAs;
// bf16 pairs (vdpbf16ps: 32 products into 16 fp32 sums per instruction, twice the FMA's products).
inline __m512 madd(const float*, __m512 acc, __m512 w, __m512 x) { return _mm512_fmadd_ps(w, x, acc); }
#ifdef GOOSE_BF16_DOT
inline __m512 madd(const at::BFloat16*, __m512 acc, __m512i w, __m512i x) {
    return _mm512_dpbf16_ps(acc, (__m512bh)w, (__m512bh)x);
}
#endif

// y[m, n + j] = sum_k x[m, k] W[n + j, k] for j < R and m < M (R weight rows; rows of x and W are ld apart).
// One step of dot_rows (the loops are unrolled so that the accumulators stay in registers).
template <int M, int R, typename X, typename W, typename Mask, typename Acc>
__attribute__((always_inline)) inline void dot_step(const X* x, const W* w, int64_t ld, int64_t k, Mask mask,
                                                    Acc (&acc)[M][R]) {
    using Operand = decltype(load_operand(w, mask));
    Operand wv[R];
#pragma GCC unroll 16
    for (int j = 0; j < R; ++j) {
        Operand v = load_operand(w + j * ld + k, mask);
        // pinned to a register: GCC otherwise folds the load into every instruction that uses it, which with
        // several activation rows doubles the loads per product and halves the rate (measured at 16 rows)
        if constexpr (M > 1) asm("" : "+v"(v));
        wv[j] = v;
    }
#pragma GCC unroll 4
    for (int m = 0; m < M; ++m) {
        Operand xv = load_operand(x + m * ld + k, mask);
        if constexpr (R > 1) asm("" : "+v"(xv));
#pragma GCC unroll 16
        for (int j = 0; j < R; ++j) acc[m][j] = madd(x, acc[m][j], wv[j], xv);
    }
}

// Lane m * 4 + j of the result is the sum of the 16 lanes of acc[m][j]: four rounds of pairwise shuffles and
// adds (unpack within 128-bit lanes twice, then swap 128-bit lanes twice), ~40% of the instructions that
// sixteen separate horizontal sums take.
inline __m512 reduce16(const __m512 (&acc)[4][4]) {
    __m512 pairs[8], quads[4], halves[2];
#pragma GCC unroll 8
    for (int i = 0; i < 8; ++i) {
        const __m512 a = acc[(2 * i) / 4][(2 * i) % 4], b = acc[(2 * i + 1) / 4][(2 * i + 1) % 4];
        pairs[i] = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
    }
#pragma GCC unroll 4
    for (int i = 0; i < 4; ++i) {
        const __m512d a = _mm512_castps_pd(pairs[2 * i]), b = _mm512_castps_pd(pairs[2 * i + 1]);
        quads[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
    }
#pragma GCC unroll 2
    for (int i = 0; i < 2; ++i)
        halves[i] = _mm512_add_ps(_mm512_shuffle_f32x4(quads[2 * i], quads[2 * i + 1], 0x88),
                                  _mm512_shuffle_f32x4(quads[2 * i], quads[2 * i + 1], 0xDD));
    return _mm512_add_ps(_mm512_shuffle_f32x4(halves[0], halves[1], 0x88),
                         _mm512_shuffle_f32x4(halves[0], halves[1], 0xDD));
}

// The M x R dot products of length K of rows ld apart (ld = K for whole rows; more for a chunk of them), in
// steps of 16 fp32 activations or, for bf16 activations, of 32. `ahead`, if given: the first of
// AHEAD weight rows needed later, fetched into cache alongside (at several activation rows a core is busy
// enough with arithmetic that the hardware prefetcher alone falls behind). `lines` cache lines from `fetch`
// (bytes needed later) are fetched too, spread over the steps.
template <int M, int R, int AHEAD = 1, typename X, typename W>
void dot_rows(const X* x, const W* w, int64_t ld, int64_t K, float* sums /* [M][R] */, const W* ahead = nullptr,
              const char* fetch = nullptr, int64_t lines = 0) {
    constexpr int STEP = std::is_same_v<X, float> ? 16 : 32;     // fp32: 16 per step; bf16: 32
    using Mask = std::conditional_t<STEP == 16, __mmask16, __mmask32>;
    __m512 acc[M][R];
#pragma GCC unroll 4
    for (int m = 0; m < M; ++m)
#pragma GCC unroll 16
        for (int j = 0; j < R; ++j) acc[m][j] = _mm512_setzero_ps();
    // line i at step i * 2^spacing, the widest spacing that fits them all (the last steps may fetch a few lines
    // past them: harmless), so that the loop tests no count
    int spacing = 0;
    while (lines > 0 && (int64_t(2) << spacing) * lines <= K / STEP) ++spacing;
    const int shift = spacing + (STEP == 16 ? 4 : 5);             // step k = i * 2^shift fetches line i
    const int64_t spaced = (int64_t(1) << shift) - 1;
    int64_t k = 0;
    for (; k + STEP <= K; k += STEP) {
        if (ahead)
#pragma GCC unroll 16
            for (int j = 0; j < AHEAD; ++j) _mm_prefetch(reinterpret_cast<const char*>(ahead + j * ld + k), _MM_HINT_T0);
        if (fetch && (k & spaced) == 0) _mm_prefetch(fetch + ((k >> shift) << 6), _MM_HINT_T0);
        dot_step<M, R>(x, w, ld, k, Mask(~Mask(0)), acc);
    }
    if (k < K) dot_step<M, R>(x, w, ld, k, Mask((1ull << (K - k)) - 1), acc);
    for (int64_t i = K / STEP; fetch && i < lines; ++i) _mm_prefetch(fetch + (i << 6), _MM_HINT_T0);   // > 1 a step
    if constexpr (M == 4 && R == 4) {
        _mm512_storeu_ps(sums, reduce16(acc));    // the many-rows kernel reads them back as one vector
        return;
    }
#pragma GCC unroll 4
    for (int m = 0; m < M; ++m)
#pragma GCC unroll 16
        for (int j = 0; j < R; ++j) sums[m * R + j] = _mm512_reduce_add_ps(acc[m][j]);
}

// y[m, n0:n0+width] += sum_{k0 <= k < k1} x[m, k] w[k, n0:n0+width] (w row-major [K, N], width <= COL_BLOCK).
template <int M>
void axpy_columns(const float* x, const float* w, int64_t K, int64_t N, int64_t k0, int64_t k1, int64_t n0,
                  int64_t width, float* y) {
    constexpr int V = COL_BLOCK / 16;
    __m512 acc[M][V];
    __mmask16 mask[V];
#pragma GCC unroll 4
    for (int j = 0; j < V; ++j) mask[j] = tail_mask(std::max<int64_t>(0, width - 16 * j));
#pragma GCC unroll 4
    for (int m = 0; m < M; ++m)
#pragma GCC unroll 4
        for (int j = 0; j < V; ++j) acc[m][j] = _mm512_maskz_loadu_ps(mask[j], y + m * N + n0 + 16 * j);
    for (int64_t k = k0; k < k1; ++k) {
        __m512 wv[V];
#pragma GCC unroll 4
        for (int j = 0; j < V; ++j) wv[j] = _mm512_maskz_loadu_ps(mask[j], w + k * N + n0 + 16 * j);
        if (k + LORA_PREFETCH_ROWS < K) {
            const float* ahead = w + (k + LORA_PREFETCH_ROWS) * N + n0;
#pragma GCC unroll 4
            for (int j = 0; j < V; ++j)
                if (16 * j < width) _mm_prefetch(reinterpret_cast<const char*>(ahead + 16 * j), _MM_HINT_T0);
        }
#pragma GCC unroll 4
        for (int m = 0; m < M; ++m) {
            const __m512 xv = _mm512_set1_ps(x[m * K + k]);
#pragma GCC unroll 4
            for (int j = 0; j < V; ++j) acc[m][j] = _mm512_fmadd_ps(wv[j], xv, acc[m][j]);
        }
    }
#pragma GCC unroll 4
    for (int m = 0; m < M; ++m)
#pragma GCC unroll 4
        for (int j = 0; j < V; ++j) _mm512_mask_storeu_ps(y + m * N + n0 + 16 * j, mask[j], acc[m][j]);
}

#else  // portable: the compiler vectorises the inner loops

template <int M, int R, int AHEAD = 1, typename W>
void dot_rows(const float* x, const W* w, int64_t ld, int64_t K, float* sums, const W* = nullptr, const char* = nullptr,
              int64_t = 0) {
    for (int m = 0; m < M; ++m)
        for (int j = 0; j < R; ++j) {
            float s = 0.f;
#pragma omp simd reduction(+ : s)
            for (int64_t k = 0; k < K; ++k) s += static_cast<float>(w[j * ld + k]) * x[m * ld + k];
            sums[m * R + j] = s;
        }
}

template <int M>
void axpy_columns(const float* x, const float* w, int64_t K, int64_t N, int64_t k0, int64_t k1, int64_t n0,
                  int64_t width, float* y) {
    for (int64_t k = k0; k < k1; ++k)
        for (int m = 0; m < M; ++m) {
            const float xv = x[m * K + k];
#pragma omp simd
            for (int64_t j = 0; j < width; ++j) y[m * N + n0 + j] += xv * w[k * N + n0 + j];
        }
}

#endif

int64_t grain_rows(int64_t row_bytes) { return std::max<int64_t>(8, GRAIN_BYTES / std::max<int64_t>(1, row_bytes)); }

// y[m * N + j] (=|+=) sums[m][j] * scale[j] for m < G, j < R (a tile of dot products; `add` after the first
// chunk of a long K).
template <int G, int R>
void store_tile(const float* sums, float* y, int64_t N, const at::BFloat16* scale, bool add) {
#ifdef GOOSE_AVX512
    if constexpr (G == 4 && R == 4) {   // the full tile: one vector, row m in 128-bit lane m
        __m512 tile = _mm512_loadu_ps(sums);
        if (scale)
            tile = _mm512_mul_ps(tile, _mm512_broadcast_f32x4(_mm_castsi128_ps(_mm_slli_epi32(
                                           _mm_cvtepu16_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(scale))), 16))));
        const __m128 rows[4] = {_mm512_extractf32x4_ps(tile, 0), _mm512_extractf32x4_ps(tile, 1),
                                _mm512_extractf32x4_ps(tile, 2), _mm512_extractf32x4_ps(tile, 3)};
        for (int m = 0; m < 4; ++m)
            _mm_storeu_ps(y + m * N, add ? _mm_add_ps(_mm_loadu_ps(y + m * N), rows[m]) : rows[m]);
        return;
    }
#endif
    for (int m = 0; m < G; ++m)
        for (int j = 0; j < R; ++j) {
            const float v = sums[m * R + j] * (scale ? static_cast<float>(scale[j]) : 1.f);
            y[m * N + j] = add ? y[m * N + j] + v : v;
        }
}

// y[M, N] = x[M, K] @ W[N, K].T, times scale[n] per output if given: R weight rows at a time, the block
// PREFETCH_BLOCKS ahead fetched in software if FETCH.
template <int M, int R, bool FETCH, typename W, typename X>
void stream_rows(const X* x, const W* w, const at::BFloat16* scale, int64_t K, int64_t N, float* y) {
    at::parallel_for(0, N, grain_rows(K * sizeof(W)), [&](int64_t begin, int64_t end) {
        float sums[M * R];
        int64_t n = begin;
        for (; n + R <= end; n += R) {
            const bool fetch = FETCH && n + (PREFETCH_BLOCKS + 1) * R <= end;
            dot_rows<M, R, R>(x, w + n * K, K, K, sums, fetch ? w + (n + PREFETCH_BLOCKS * R) * K : nullptr);
            store_tile<M, R>(sums, y + n, N, scale ? scale + n : nullptr, false);
        }
        for (; n < end; ++n) {
            dot_rows<M, 1>(x, w + n * K, K, K, sums);
            store_tile<M, 1>(sums, y + n, N, scale ? scale + n : nullptr, false);
        }
    });
}

// y[M, N] = x[M, K] @ W[N, K].T, times scale[n] per output if given (up to MAX_ROWS rows).
template <int M, typename W, typename X>
void linear_rows(const X* x, const W* w, const at::BFloat16* scale, int64_t K, int64_t N, float* y) {
    stream_rows<M, row_block<M>(), (M >= PREFETCH_MIN_ROWS || std::is_same_v<W, int8_t>)>(x, w, scale, K, N, y);
}

void check_activations(const at::Tensor& x, int64_t K, int64_t max_rows = MAX_ROWS) {
    TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.is_contiguous() && x.dim() == 2,
                "goose gemv: x must be a contiguous fp32 CPU matrix [M, K]");
    TORCH_CHECK(x.size(0) >= 1 && x.size(0) <= max_rows, "goose gemv: 1 to ", max_rows, " rows, got ", x.size(0));
    TORCH_CHECK(x.size(1) == K, "goose gemv: x has ", x.size(1), " columns, the weight expects ", K);
}

// Calls f(std::integral_constant<int, M>{}) for M = the runtime row count, at most MAX (templates keep the
// accumulators in registers).
template <int MAX = MAX_ROWS, int M = 1, typename F>
void dispatch_rows(int64_t rows, F&& f) {
    if constexpr (M == MAX)
        f(std::integral_constant<int, M>{});
    else if (rows <= M)
        f(std::integral_constant<int, M>{});
    else
        dispatch_rows<MAX, M + 1>(rows, std::forward<F>(f));
}

// y[b, n0:n1] += sum_{k0 <= k < k1} x[b, k] w[k, n0:n1] for b < B (w row-major [K, N]; rows of x are K apart,
// of y N apart): tiles of LORA_TILE_ROWS x COL_BLOCK of w, each passed over by every group of MAX_ROWS rows.
void axpy_range(const float* x, const float* w, int64_t B, int64_t K, int64_t N, int64_t k0, int64_t k1, int64_t n0,
                int64_t n1, float* y) {
    for (int64_t c = n0; c < n1; c += COL_BLOCK)
        for (int64_t tile = k0; tile < k1; tile += LORA_TILE_ROWS)
            for (int64_t b0 = 0; b0 < B; b0 += MAX_ROWS)
                dispatch_rows(std::min(MAX_ROWS, B - b0), [&](auto rows) {
                    axpy_columns<decltype(rows)::value>(x + b0 * K, w, K, N, tile, std::min(tile + LORA_TILE_ROWS, k1),
                                                        c, std::min(COL_BLOCK, n1 - c), y + b0 * N);
                });
}

// y[M, N] = x[M, K] @ w[K, N] (the LoRA layout: a few rows against a small weight). Threads split the K rows
// of w, so each streams a contiguous part of it (splitting the columns instead would stride through every
// row, which reads LoRA weights from DRAM at a fraction of the bandwidth), accumulating its partial product
// in its own small buffer, summed at the end.
void matmul_split_k(const float* x, const float* w, int64_t M, int64_t K, int64_t N, float* y) {
    const int threads = at::get_num_threads();
    if (threads == 1 || at::in_parallel_region()) {   // one thread does it all: no partial products
        std::fill(y, y + M * N, 0.f);
        axpy_range(x, w, M, K, N, 0, K, 0, N, y);
        return;
    }
    std::vector<float> partial(int64_t(threads) * M * N, 0.f);
    at::parallel_for(0, K, std::max<int64_t>(1, GRAIN_BYTES / (N * int64_t(sizeof(float)))), [&](int64_t begin, int64_t end) {
        axpy_range(x, w, M, K, N, begin, end, 0, N, partial.data() + int64_t(at::get_thread_num()) * M * N);
    });
    std::copy(partial.begin(), partial.begin() + M * N, y);
    for (int t = 1; t < threads; ++t)
#pragma omp simd
        for (int64_t i = 0; i < M * N; ++i) y[i] += partial[int64_t(t) * M * N + i];
}

// Weight values as fp32 (bf16 and int8 weights, for the many-rows kernel, which reuses each row).
template <typename W>
void widen(const W* w, int64_t n, float* out) {
#ifdef GOOSE_AVX512
    for (int64_t i = 0; i < n; i += 16) {
        const __mmask16 mask = tail_mask(n - i);
        _mm512_mask_storeu_ps(out + i, mask, load_operand(w + i, mask));
    }
#else
    for (int64_t i = 0; i < n; ++i) out[i] = static_cast<float>(w[i]);
#endif
}

// Rows [n, n + rows) of a weight [N, K] as the many-rows kernel multiplies them (type X): the weight itself when
// stored as X, else widened into `buffer`.
template <typename X>
const X* block_rows(const X* w, int64_t n, int, int64_t K, X*) { return w + n * K; }

template <typename W, typename X>
const X* block_rows(const W* w, int64_t n, int rows, int64_t K, X* buffer) {
    widen(w + n * K, rows * K, buffer);
    return buffer;
}

// Where row n of a weight is stored (rows are contiguous, stored_row_bytes apart).
template <typename W>
const char* stored_row(const W* w, int64_t n, int64_t K) { return reinterpret_cast<const char*>(w + n * K); }

template <typename W>
int64_t stored_row_bytes(const W*, int64_t K) { return K * int64_t(sizeof(W)); }

// y[M, N] = x[M, K] @ W[N, K].T, times scale[n] per output if given, for more rows than MAX_ROWS (batched
// decode). Arithmetic now outweighs the weight's memory traffic, so the weight is taken 4 rows at a time
// (widened once if stored narrower than the arithmetic) and every group of 4 activation rows passes over it
// while it sits in L1: a 4 x 4 tile of dot products per step, reduced together at the end (reduce16). A long
// K runs in chunks, so that the weight block and an activation group both fit L1 (measured at 16 rows,
// 768 x 3072 from DRAM: 187 -> ~230 GFLOP/s).
//
// X is the activations' type, the arithmetic's (see madd): float, or bf16 with bf16 weights (GOOSE_BF16_DOT).
template <typename Weight, typename X>
void linear_many_rows(const X* x, int64_t M, const Weight& w, const at::BFloat16* scale, int64_t K, int64_t N,
                      float* y) {
    constexpr int R = 4;
    constexpr bool direct = std::is_same_v<Weight, const X*>;
    const int64_t chunk = K > 2 * K_CHUNK ? K_CHUNK : K;
    const int64_t calls_per_block = (K + chunk - 1) / chunk * ((M + 3) / 4);   // of dot_rows, for a full block
    const int64_t grain = std::max<int64_t>(1, grain_rows(stored_row_bytes(w, K)) / R);
    at::parallel_for(0, (N + R - 1) / R, grain, [&](int64_t begin, int64_t end) {
        std::vector<X> widened(direct ? 0 : R * K);
        float sums[4 * R];
        for (int64_t block = begin; block < end; ++block) {
            const int64_t n = block * R;
            const int rows = static_cast<int>(std::min<int64_t>(R, N - n));
            const X* wf = block_rows(w, n, rows, K, widened.data());
            // a narrower weight: its next block, as stored (contiguous), fetched while this one is multiplied,
            // spread evenly over this block's calls of dot_rows (measured at 16 rows with int8 weights, then
            // multiplied here in int16 pairs, from DRAM: 10.4 -> 16.9 GB/s fetching it all at once before the
            // block's products; spread instead, L12 steps 3-6% faster at batch 16 in int8 and int4)
            const char* next = nullptr;
            int64_t next_lines = 0, lines_per_call = 0;
            if constexpr (!direct)
                if (n + R < N) {
                    next = stored_row(w, n + R, K);
                    next_lines = (std::min<int64_t>(R, N - n - R) * stored_row_bytes(w, K) + 63) / 64;
                    lines_per_call = (next_lines + calls_per_block - 1) / calls_per_block;
                }
            for (int64_t k0 = 0; k0 < K; k0 += chunk) {
                const int64_t len = std::min(chunk, K - k0);
                for (int64_t m0 = 0; m0 < M; m0 += 4) {
                    const X* xs = x + m0 * K + k0;
                    float* ys = y + m0 * N + n;
                    const at::BFloat16* ss = scale ? scale + n : nullptr;
                    dispatch_rows(std::min<int64_t>(4, M - m0), [&](auto group) {
                        constexpr int G = decltype(group)::value;
                        if (rows == R) {
                            // each group fetches one row of the block PREFETCH_BLOCKS ahead
                            const int64_t ahead_row = n + PREFETCH_BLOCKS * R + (m0 / 4) % R;
                            const X* ahead = nullptr;
                            if constexpr (direct) ahead = ahead_row < N ? w + ahead_row * K + k0 : nullptr;
                            const int64_t lines = std::min(lines_per_call, next_lines);
                            dot_rows<G, R>(xs, wf + k0, K, len, sums, ahead, lines > 0 ? next : nullptr, lines);
                            next += 64 * lines;
                            next_lines -= lines;
                            store_tile<G, R>(sums, ys, N, ss, k0 > 0);
                        } else {
                            for (int j = 0; j < rows; ++j) {
                                dot_rows<G, 1>(xs, wf + j * K + k0, K, len, sums);
                                store_tile<G, 1>(sums, ys + j, N, ss ? ss + j : nullptr, k0 > 0);
                            }
                        }
                    });
                }
            }
        }
    });
}

// y [M, N] = x @ w.T (times scale[n]): the streaming kernels up to MAX_ROWS rows, the many-rows one beyond.
template <typename X, typename W>
void product(const X* x, const W* w, const at::BFloat16* scale, int64_t M, int64_t K, int64_t N, float* y) {
    if (M > MAX_ROWS)
        linear_many_rows(x, M, w, scale, K, N, y);
    else
        dispatch_rows(M, [&](auto rows) { linear_rows<decltype(rows)::value>(x, w, scale, K, N, y); });
}

at::Tensor linear(const at::Tensor& x, const at::Tensor& weight) {
    const bool bf16 = weight.scalar_type() == at::kBFloat16;
    TORCH_CHECK((bf16 || weight.scalar_type() == at::kFloat) && weight.is_contiguous() && weight.dim() == 2,
                "goose linear: weight must be a contiguous fp32 or bf16 [N, K] matrix");
    check_activations(x, weight.size(1), MAX_TILE_ROWS);
    const int64_t M = x.size(0), K = weight.size(1), N = weight.size(0);
    auto y = at::empty({M, N}, x.options());
    if (!bf16) {
        product(x.data_ptr<float>(), weight.data_ptr<float>(), nullptr, M, K, N, y.data_ptr<float>());
    } else {
#ifdef GOOSE_BF16_DOT
        const auto xb = x.to(at::kBFloat16);     // bf16 pairs multiplied: the activations rounded to bf16
        product(xb.data_ptr<at::BFloat16>(), weight.data_ptr<at::BFloat16>(), nullptr, M, K, N, y.data_ptr<float>());
#else
        product(x.data_ptr<float>(), weight.data_ptr<at::BFloat16>(), nullptr, M, K, N, y.data_ptr<float>());
#endif
    }
    return y;
}

at::Tensor matmul(const at::Tensor& x, const at::Tensor& w) {
    TORCH_CHECK(w.scalar_type() == at::kFloat && w.is_contiguous() && w.dim() == 2,
                "goose matmul: w must be a contiguous fp32 [K, N] matrix");
    check_activations(x, w.size(0));
    auto y = at::empty({x.size(0), w.size(1)}, x.options());
    matmul_split_k(x.data_ptr<float>(), w.data_ptr<float>(), x.size(0), w.size(0), w.size(1), y.data_ptr<float>());
    return y;
}

#ifdef GOOSE_INT16_DOT
// x [M, K] quantized per row to int16: x[m] ~= xq[m] * step[m], step[m] = max |x[m]| / 32767 (the rounding
// error is at most step / 2 per element, ~1.5e-5 of the row's largest value). A row with an inf or NaN gets
// step NaN (and zeros), so that its outputs are NaN as an fp32 product's would be.
std::pair<at::Tensor, std::vector<float>> quantize_rows_int16(const at::Tensor& x) {
    const int64_t M = x.size(0), K = x.size(1);
    auto xq = at::empty({M, K}, x.options().dtype(at::kShort));
    std::vector<float> step(M);
    const float* xp = x.data_ptr<float>();
    int16_t* qp = xq.data_ptr<int16_t>();
    const __m512 inf = _mm512_set1_ps(std::numeric_limits<float>::infinity());
    for (int64_t m = 0; m < M; ++m) {
        const float* row = xp + m * K;
        __m512 amax = _mm512_setzero_ps();
        __mmask16 bad = 0;                    // lanes that saw an inf or a NaN (|x| >= inf, or unordered)
        for (int64_t k = 0; k < K; k += 16) {
            const __m512 a = _mm512_abs_ps(_mm512_maskz_loadu_ps(tail_mask(K - k), row + k));
            amax = _mm512_max_ps(amax, a);
            bad |= _mm512_cmp_ps_mask(a, inf, _CMP_NLT_UQ);
        }
        if (bad) {
            step[m] = std::numeric_limits<float>::quiet_NaN();
            std::fill(qp + m * K, qp + (m + 1) * K, int16_t(0));
            continue;
        }
        const float largest = _mm512_reduce_max_ps(amax);
        step[m] = largest > 0.f ? largest / 32767.f : 1.f;
        const __m512 divisor = _mm512_set1_ps(step[m]);
        for (int64_t k = 0; k < K; k += 16) {   // x / step rounded to nearest even, as std::nearbyint
            const __mmask16 mask = tail_mask(K - k);
            const __m512i q = _mm512_cvtps_epi32(_mm512_div_ps(_mm512_maskz_loadu_ps(mask, row + k), divisor));
            _mm256_mask_storeu_epi16(qp + m * K + k, mask, _mm512_cvtepi32_epi16(q));
        }
    }
    return {xq, step};
}
#endif

at::Tensor linear_int8(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale) {
    TORCH_CHECK(q.scalar_type() == at::kChar && q.is_contiguous() && q.dim() == 2,
                "goose linear_int8: q must be a contiguous int8 [N, K] matrix");
    TORCH_CHECK(scale.scalar_type() == at::kBFloat16 && scale.is_contiguous() && scale.numel() == q.size(0),
                "goose linear_int8: scale must be bf16 [N]");
    check_activations(x, q.size(1), MAX_TILE_ROWS);
    const int64_t M = x.size(0), K = q.size(1), N = q.size(0);
    auto y = at::empty({M, N}, x.options());
    float* yp = y.data_ptr<float>();
    const int8_t* qp = q.data_ptr<int8_t>();
    const at::BFloat16* sp = scale.data_ptr<at::BFloat16>();
    product(x.data_ptr<float>(), qp, sp, M, K, N, yp);   // in fp32 (CPUs with VNNI take the pairs layout)
    return y;
}

#ifdef GOOSE_INT16_DOT
// int8 weights in the "pairs" layout (goose/quant.py Int8Linear on CPUs with int16 dot products): [G, K / 2, 16, 2],
// G = ceil(N / 16) groups of 16 output rows (zero rows pad the last), in each the inputs in pairs (2p, 2p + 1)
// with the 16 rows' pairs side by side. One 32-byte load widened to int16 is 16 outputs' next two inputs; one
// vpdpwssd multiplies it by a broadcast pair of int16 activations into the 16 outputs' int32 sums. No horizontal
// sums at the end, and with many activation rows each widened weight vector serves all of them from registers
// (the [N, K] layout's many-rows kernel widens every block into a buffer first and sums each dot product across
// lanes; measured, the 73 int8 matrices of L12-D768 at 16 rows, 2 threads: 8.9 -> 5.9 ms; at one row as fast).
constexpr int64_t PAIR_GROUP = 16;     // output rows per group
constexpr int64_t PAIR_BYTES = 32;     // one pair of inputs for the 16 rows of a group
// each lane sums a whole dot product in int32: 2 products of at most 32767 * 127 per pair, so at most 256 pairs
// (2.13e9 < 2^31) before the sums go to fp32
constexpr int64_t PAIR_CHUNK = 256;

// acc[m][v] += x pairs [m, p] . W pairs [group v, p] for p in [p0, p1) (x: int16 pairs as int32, rows KP apart;
// w: the first of V consecutive groups, KP * 32 bytes each), fetching `fetch` (the same places of later groups,
// if given) a line per group every second pair.
template <int M, int V>
__attribute__((always_inline)) inline void pair_products(const int32_t* x, int64_t KP, const int8_t* w, int64_t p0,
                                                         int64_t p1, __m512i (&acc)[M][V], const int8_t* fetch) {
    const int64_t ahead = fetch ? fetch - w : 0;
    for (int64_t p = p0; p < p1; ++p) {
        __m512i wv[V];
#pragma GCC unroll 8
        for (int v = 0; v < V; ++v) {
            const int8_t* at = w + (v * KP + p) * PAIR_BYTES;
            if (fetch && (p & 1) == 0) _mm_prefetch(reinterpret_cast<const char*>(at + ahead), _MM_HINT_T0);
            __m512i wide = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(at)));
            if constexpr (M > 1) asm("" : "+v"(wide));     // in a register, not re-loaded per row (see dot_step)
            wv[v] = wide;
        }
#pragma GCC unroll 8
        for (int m = 0; m < M; ++m) {
            __m512i pair = _mm512_set1_epi32(x[m * KP + p]);
            if constexpr (V > 1) asm("" : "+v"(pair));
#pragma GCC unroll 8
            for (int v = 0; v < V; ++v) {
                // in place, in asm: GCC 12 copies the accumulator out and back around the intrinsic (two moves a
                // product); through a local: an array element as the asm operand keeps acc in memory
                __m512i sum = acc[m][v];
                asm("vpdpwssd %2, %1, %0" : "+v"(sum) : "v"(wv[v]), "v"(pair));
                acc[m][v] = sum;
            }
        }
    }
}

// y[m, 16 (g + v) + o] (+)= acc[m][v][o] * scale[16 (g + v) + o] * step[m], for outputs below N.
template <int M, int V>
__attribute__((always_inline)) inline void store_pairs(const __m512i (&acc)[M][V], float* y, int64_t N, int64_t g,
                                                      const at::BFloat16* scale, const float* step, bool add) {
#pragma GCC unroll 8
    for (int v = 0; v < V; ++v) {   // no early exit: the loop must unroll for acc to stay in registers
        const int64_t n = (g + v) * PAIR_GROUP;
        const __mmask16 mask = tail_mask(std::max<int64_t>(0, N - n));
        const __m512 s = load_operand(scale + n, mask);
#pragma GCC unroll 8
        for (int m = 0; m < M; ++m) {
            float* out = y + m * N + n;
            __m512 r = _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(acc[m][v]), s), _mm512_set1_ps(step[m]));
            if (add) r = _mm512_add_ps(r, _mm512_maskz_loadu_ps(mask, out));
            _mm512_mask_storeu_ps(out, mask, r);
        }
    }
}

// One tile of the products in the pairs layout: rows [0, M) of x against groups [g, g + V), pairs [p0, p1), in
// chunks of PAIR_CHUNK; y is added to after the first pair.
template <int M, int V>
void pair_tile(const int32_t* x, int64_t KP, const int8_t* w, int64_t g, int64_t p0, int64_t p1, float* y, int64_t N,
               const at::BFloat16* scale, const float* step, const int8_t* fetch) {
    for (int64_t c0 = p0; c0 < p1; c0 += PAIR_CHUNK) {
        __m512i acc[M][V];
#pragma GCC unroll 8
        for (int m = 0; m < M; ++m)
#pragma GCC unroll 8
            for (int v = 0; v < V; ++v) acc[m][v] = _mm512_setzero_si512();
        pair_products<M, V>(x, KP, w + g * KP * PAIR_BYTES, c0, std::min(p1, c0 + PAIR_CHUNK), acc, fetch);
        store_pairs<M, V>(acc, y, N, g, scale, step, c0 > 0);
    }
}

// x [M, K] @ W.T for an int8 weight in the pairs layout ([G, 16 K] int8), scale [N] bf16: the activations
// quantized to int16 per row (quantize_rows_int16). Up to MAX_ROWS rows, each group streams once for all rows
// (the next one fetched in software); more rows pass over a block of 2 groups 8 at a time while it sits in L1 (in
// chunks of PAIR_CHUNK pairs), the first pass fetching the next block.
at::Tensor linear_int8_pairs(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale) {
    TORCH_CHECK(q.scalar_type() == at::kChar && q.is_contiguous() && q.dim() == 2 && q.size(1) % (2 * PAIR_BYTES) == 0,
                "goose linear_int8_pairs: q must be a contiguous int8 [ceil(N / 16), 16 K] matrix, K even");
    const int64_t K = q.size(1) / PAIR_GROUP, KP = K / 2, N = scale.numel(), G = q.size(0);
    TORCH_CHECK(scale.scalar_type() == at::kBFloat16 && scale.is_contiguous() && (N + PAIR_GROUP - 1) / PAIR_GROUP == G,
                "goose linear_int8_pairs: scale must be bf16 [N] with ceil(N / 16) = ", G, " groups");
    check_activations(x, K, MAX_TILE_ROWS);
    const int64_t M = x.size(0);
    auto y = at::empty({M, N}, x.options());
    const auto [xq, step] = quantize_rows_int16(x);
    const int32_t* xp = reinterpret_cast<const int32_t*>(xq.data_ptr<int16_t>());
    const int8_t* w = q.data_ptr<int8_t>();
    const at::BFloat16* sp = scale.data_ptr<at::BFloat16>();
    float* yp = y.data_ptr<float>();
    const int64_t group_bytes = KP * PAIR_BYTES;
    if (M <= MAX_ROWS) {
        // one group at a time, the next one fetched alongside (measured on L12-D768's int8 weights, 1-4 rows: 6-10%
        // faster than 2 groups at a time, which beat 4)
        dispatch_rows(M, [&](auto rows) {
            constexpr int R = decltype(rows)::value;
            at::parallel_for(0, G, std::max<int64_t>(1, GRAIN_BYTES / group_bytes), [&](int64_t g0, int64_t g1) {
                for (int64_t g = g0; g < g1; ++g) {
                    const int8_t* next = g + 1 < g1 ? w + (g + 1) * group_bytes : nullptr;
                    pair_tile<R, 1>(xp, KP, w, g, 0, KP, yp, N, sp, step.data(), next);
                }
            });
        });
        return y;
    }
    constexpr int V = 2;
    const int64_t chunk = PAIR_CHUNK;    // 2 groups' chunk: 16 KB, in L1 while all rows pass over it
    const int64_t grain = std::max<int64_t>(1, GRAIN_BYTES / (V * group_bytes));
    at::parallel_for(0, (G + V - 1) / V, grain, [&](int64_t b0, int64_t b1) {
        for (int64_t b = b0; b < b1; ++b) {
            const int64_t g = b * V;
            const bool full = g + V <= G;
            for (int64_t p0 = 0; p0 < KP; p0 += chunk) {
                const int64_t p1 = std::min(KP, p0 + chunk);
                for (int64_t m0 = 0; m0 < M; m0 += 8) {
                    const int8_t* fetch = m0 == 0 && b + 1 < b1 ? w + (g + V) * group_bytes : nullptr;
                    const int32_t* xs = xp + m0 * KP;
                    float* ys = yp + m0 * N;
                    const float* steps = step.data() + m0;
                    dispatch_rows<8>(std::min<int64_t>(8, M - m0), [&](auto rows) {
                        constexpr int R = decltype(rows)::value;
                        if (full)
                            pair_tile<R, V>(xs, KP, w, g, p0, p1, ys, N, sp, steps, fetch);
                        else
                            pair_tile<R, 1>(xs, KP, w, g, p0, p1, ys, N, sp, steps, nullptr);
                    });
                }
            }
        }
    });
    return y;
}
// int4 weights in a pairs layout (goose/quant.py Int4Linear on CPUs with int16 dot products): q [G, K / 4, 32]
// uint8, G = ceil(N / 16) groups of 16 output rows; byte 2 o + j of block t holds q[o, 4 t + j] in its low nibble
// and q[o, 4 t + 2 + j] in its high one, so that one widening load, a mask and a shift give the 16 rows' next two
// pairs of inputs as int16. The asymmetric values w = (q - 8) s + z = q s + (z - 8 s) are summed per quantization
// group in int32, q times the row's int16 activations, then scaled once per group: y = step (sum over groups of
// s I + (z - 8 s) X), X the group's activation sum. scale and zero: [G, K / group, 16] bf16 (zero rows pad).
struct Int4Pairs {
    const uint8_t* q;
    const at::BFloat16* scale;
    const at::BFloat16* zero;
    int64_t K, group;
};

// y[m, 16 (g + v) + o] = step[m] * sum over the weight's quantization groups, for M rows of x (pairs KP apart;
// xsum [M, K / group] their sums per group) and V groups of 16 output rows from g, fetching `fetch` (the same
// places V groups later, if given) a line per group every second block.
template <int M, int V>
void int4_pair_tile(const int32_t* x, int64_t KP, const float* xsum, const Int4Pairs& w, int64_t g, float* y,
                    int64_t N, const float* step, const uint8_t* fetch) {
    // one group of rows: the block's two pairs in separate sums (two chains of latency a row); two groups: one
    // sum each, already 2 M chains
    constexpr int CHAINS = V == 1 ? 2 : 1;
    const int64_t groups = w.K / w.group, blocks = w.group / 4, group_bytes = w.K / 4 * PAIR_BYTES;
    const uint8_t* q = w.q + g * group_bytes;
    const __m512i low = _mm512_set1_epi16(0x0F);
    __m512 total[V][M];
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m)
#pragma GCC unroll 2
        for (int v = 0; v < V; ++v) total[v][m] = _mm512_setzero_ps();
    for (int64_t gi = 0; gi < groups; ++gi) {
        __m512i acc[CHAINS][V][M];
#pragma GCC unroll 8
        for (int m = 0; m < M; ++m)
#pragma GCC unroll 2
            for (int v = 0; v < V; ++v)
#pragma GCC unroll 2
                for (int c = 0; c < CHAINS; ++c) acc[c][v][m] = _mm512_setzero_si512();
        for (int64_t t = gi * blocks; t < (gi + 1) * blocks; ++t) {
            __m512i first[V], second[V];
#pragma GCC unroll 2
            for (int v = 0; v < V; ++v) {
                const uint8_t* at = q + v * group_bytes + t * PAIR_BYTES;
                if (fetch && (t & 1) == 0) _mm_prefetch(reinterpret_cast<const char*>(fetch + (at - q)), _MM_HINT_T0);
                const __m512i bytes = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(at)));
                first[v] = _mm512_and_si512(bytes, low);
                second[v] = _mm512_srli_epi16(bytes, 4);
                asm("" : "+v"(first[v]), "+v"(second[v]));
            }
#pragma GCC unroll 8
            for (int m = 0; m < M; ++m) {
                __m512i x0 = _mm512_set1_epi32(x[m * KP + 2 * t]), x1 = _mm512_set1_epi32(x[m * KP + 2 * t + 1]);
                if constexpr (V > 1) asm("" : "+v"(x0), "+v"(x1));
#pragma GCC unroll 2
                for (int v = 0; v < V; ++v) {
                    // in place and through locals, as in pair_products
                    __m512i a = acc[0][v][m], b = acc[CHAINS - 1][v][m];
                    asm("vpdpwssd %2, %1, %0" : "+v"(a) : "v"(first[v]), "v"(x0));
                    if constexpr (CHAINS == 2) {
                        asm("vpdpwssd %2, %1, %0" : "+v"(b) : "v"(second[v]), "v"(x1));
                        acc[1][v][m] = b;
                    } else {
                        asm("vpdpwssd %2, %1, %0" : "+v"(a) : "v"(second[v]), "v"(x1));
                    }
                    acc[0][v][m] = a;
                }
            }
        }
#pragma GCC unroll 2
        for (int v = 0; v < V; ++v) {
            const int64_t at = ((g + v) * groups + gi) * PAIR_GROUP;
            const __m512 s = load_operand(w.scale + at, __mmask16(0xFFFF));
            const __m512 z = _mm512_fnmadd_ps(_mm512_set1_ps(8.f), s, load_operand(w.zero + at, __mmask16(0xFFFF)));
#pragma GCC unroll 8
            for (int m = 0; m < M; ++m) {
                __m512i sum = acc[0][v][m];
                if constexpr (CHAINS == 2) sum = _mm512_add_epi32(sum, acc[1][v][m]);
                total[v][m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), s,
                                              _mm512_fmadd_ps(_mm512_set1_ps(xsum[m * groups + gi]), z, total[v][m]));
            }
        }
    }
#pragma GCC unroll 2
    for (int v = 0; v < V; ++v) {
        const __mmask16 mask = tail_mask(std::max<int64_t>(0, N - (g + v) * PAIR_GROUP));
#pragma GCC unroll 8
        for (int m = 0; m < M; ++m)
            _mm512_mask_storeu_ps(y + m * N + (g + v) * PAIR_GROUP, mask,
                                  _mm512_mul_ps(total[v][m], _mm512_set1_ps(step[m])));
    }
}

// x [M, K] @ W.T for an int4 weight in the pairs layout (Int4Pairs; groups a multiple of 4 inputs, at most 4096):
// the activations quantized to int16 per row; each group of 16 outputs streams once for up to 8 rows at a time,
// the next one fetched in software.
at::Tensor linear_int4_pairs(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale, const at::Tensor& zero,
                             int64_t group, int64_t N) {
    TORCH_CHECK(q.scalar_type() == at::kByte && q.is_contiguous() && q.dim() == 2 && q.size(1) % PAIR_BYTES == 0,
                "goose linear_int4_pairs: q must be a contiguous uint8 [ceil(N / 16), 8 K] matrix");
    const int64_t G = q.size(0), K = q.size(1) / 8;
    TORCH_CHECK(group > 0 && group % 4 == 0 && group <= 4096 && K % group == 0, "goose linear_int4_pairs: groups of "
                "a multiple of 4 inputs (at most 4096) that divide K = ", K, ", got ", group);
    TORCH_CHECK((N + PAIR_GROUP - 1) / PAIR_GROUP == G, "goose linear_int4_pairs: ", N, " outputs in ", G,
                " groups of 16 rows");
    for (const auto* t : {&scale, &zero})
        TORCH_CHECK(t->scalar_type() == at::kBFloat16 && t->is_contiguous() &&
                    t->numel() == G * (K / group) * PAIR_GROUP,
                    "goose linear_int4_pairs: scale and zero must be bf16 [ceil(N / 16), K / group, 16]");
    check_activations(x, K, MAX_TILE_ROWS);
    const int64_t M = x.size(0), KP = K / 2, groups = K / group;
    auto y = at::empty({M, N}, x.options());
    const auto [xq, step] = quantize_rows_int16(x);
    const int16_t* xs16 = xq.data_ptr<int16_t>();
    std::vector<float> xsum(M * groups);                    // each row's activation sum per group (exact in fp32)
    for (int64_t m = 0; m < M; ++m)
        for (int64_t gi = 0; gi < groups; ++gi) {
            int32_t total = 0;
            for (int64_t k = gi * group; k < (gi + 1) * group; ++k) total += xs16[m * K + k];
            xsum[m * groups + gi] = static_cast<float>(total);
        }
    const Int4Pairs w{q.data_ptr<uint8_t>(), scale.data_ptr<at::BFloat16>(), zero.data_ptr<at::BFloat16>(), K, group};
    const int32_t* xp = reinterpret_cast<const int32_t*>(xs16);
    float* yp = y.data_ptr<float>();
    const int64_t group_bytes = KP / 2 * PAIR_BYTES;
    // up to MAX_ROWS rows one group of 16 outputs at a time; more, two, 8 rows a pass
    const int64_t V = M <= MAX_ROWS ? 1 : 2, blocks = (G + V - 1) / V;
    at::parallel_for(0, blocks, std::max<int64_t>(1, GRAIN_BYTES / (V * group_bytes)), [&](int64_t b0, int64_t b1) {
        for (int64_t b = b0; b < b1; ++b)
            for (int64_t m0 = 0; m0 < M; m0 += 8) {
                const int64_t g = b * V;
                const uint8_t* fetch = m0 == 0 && b + 1 < b1 ? w.q + (g + V) * group_bytes : nullptr;
                dispatch_rows<8>(std::min<int64_t>(8, M - m0), [&](auto rows) {
                    constexpr int R = decltype(rows)::value;
                    const int32_t* xs = xp + m0 * KP;
                    const float* sums = xsum.data() + m0 * groups;
                    if (V == 2 && g + 1 < G)
                        int4_pair_tile<R, 2>(xs, KP, sums, w, g, yp + m0 * N, N, step.data() + m0, fetch);
                    else
                        int4_pair_tile<R, 1>(xs, KP, sums, w, g, yp + m0 * N, N, step.data() + m0,
                                             V == 1 ? fetch : nullptr);
                });
            }
    });
    return y;
}

// Groups [g0, g1) of a pairs-layout int4 weight back as rows [16 g0, 16 g1) of Int4Linear's [N, K / 2] layout
// (two values a byte, the even input in the low nibble), for the dequantize + GEMM path of many rows.
at::Tensor int4_pairs_rows(const at::Tensor& q, int64_t g0, int64_t g1) {
    TORCH_CHECK(q.scalar_type() == at::kByte && q.is_contiguous() && q.dim() == 2 && q.size(1) % PAIR_BYTES == 0,
                "goose int4_pairs_rows: q must be a contiguous uint8 [G, 8 K] matrix");
    TORCH_CHECK(0 <= g0 && g0 <= g1 && g1 <= q.size(0), "goose int4_pairs_rows: groups ", g0, " to ", g1, " of ",
                q.size(0));
    const int64_t blocks = q.size(1) / PAIR_BYTES;          // of 4 inputs
    auto out = at::empty({(g1 - g0) * PAIR_GROUP, 2 * blocks}, q.options());
    const uint8_t* src = q.data_ptr<uint8_t>() + g0 * blocks * PAIR_BYTES;
    uint8_t* dst = out.data_ptr<uint8_t>();
    // 16 blocks of a row at a time: one gather of 4 bytes each (the row's 2, and 2 beyond them, hence never at the
    // tensor's very end), both output bytes computed in 16 lanes
    const __m512i offsets = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                               _mm512_set1_epi32(PAIR_BYTES));
    const __m512i nibble = _mm512_set1_epi32(0x0F), high = _mm512_set1_epi32(0xF0);
    at::parallel_for(0, g1 - g0, 1, [&](int64_t begin, int64_t end) {
        for (int64_t g = begin; g < end; ++g)
            for (int64_t o = 0; o < PAIR_GROUP; ++o) {
                const uint8_t* from = src + g * blocks * PAIR_BYTES + 2 * o;
                uint8_t* to = dst + (g * PAIR_GROUP + o) * 2 * blocks;
                const int64_t vector_blocks = g0 + g + 1 < q.size(0) ? blocks : blocks - 1;
                int64_t t = 0;
                for (; t + 16 <= vector_blocks; t += 16) {
                    const __m512i w = _mm512_i32gather_epi32(offsets, from + t * PAIR_BYTES, 1);
                    const __m512i b0 = _mm512_and_si512(w, _mm512_set1_epi32(0xFF));
                    const __m512i b1 = _mm512_and_si512(_mm512_srli_epi32(w, 8), _mm512_set1_epi32(0xFF));
                    const __m512i even = _mm512_or_si512(_mm512_and_si512(b0, nibble),
                                                         _mm512_and_si512(_mm512_slli_epi32(b1, 4), high));
                    const __m512i odd = _mm512_or_si512(_mm512_srli_epi32(b0, 4), _mm512_and_si512(b1, high));
                    _mm256_storeu_si256(reinterpret_cast<__m256i*>(to + 2 * t),
                                        _mm512_cvtepi32_epi16(_mm512_or_si512(even, _mm512_slli_epi32(odd, 8))));
                }
                for (; t < blocks; ++t) {
                    const uint8_t b0 = from[t * PAIR_BYTES], b1 = from[t * PAIR_BYTES + 1];
                    to[2 * t] = uint8_t((b0 & 0x0F) | (b1 << 4));
                    to[2 * t + 1] = uint8_t((b0 >> 4) | (b1 & 0xF0));
                }
            }
    });
    return out;
}

// Groups [g0, g1) of a pairs-layout int8 weight back as rows [16 g0, 16 g1) of [N, K] (what the dequantize +
// GEMM path of many rows multiplies): each group's 16 rows gathered from its pairs while it sits in L1 (measured,
// 768 x 3072: ~0.2 ms against 1.3 for torch's transpose of the same view).
at::Tensor int8_pairs_rows(const at::Tensor& q, int64_t g0, int64_t g1) {
    TORCH_CHECK(q.scalar_type() == at::kChar && q.is_contiguous() && q.dim() == 2 && q.size(1) % (2 * PAIR_GROUP) == 0,
                "goose int8_pairs_rows: q must be a contiguous int8 [G, 16 K] matrix, K even");
    TORCH_CHECK(0 <= g0 && g0 <= g1 && g1 <= q.size(0), "goose int8_pairs_rows: groups ", g0, " to ", g1, " of ",
                q.size(0));
    const int64_t K = q.size(1) / PAIR_GROUP, KP = K / 2;
    auto out = at::empty({(g1 - g0) * PAIR_GROUP, K}, q.options());
    // a pair of int8 inputs moves as one 16-bit unit
    const uint16_t* src = reinterpret_cast<const uint16_t*>(q.data_ptr<int8_t>()) + g0 * PAIR_GROUP * KP;
    uint16_t* dst = reinterpret_cast<uint16_t*>(out.data_ptr<int8_t>());
    at::parallel_for(0, g1 - g0, 1, [&](int64_t begin, int64_t end) {
        for (int64_t g = begin; g < end; ++g)
            for (int64_t o = 0; o < PAIR_GROUP; ++o) {
                const uint16_t* from = src + g * PAIR_GROUP * KP + o;
                uint16_t* to = dst + (g * PAIR_GROUP + o) * KP;
                for (int64_t p = 0; p < KP; ++p) to[p] = from[p * PAIR_GROUP];
            }
    });
    return out;
}

#endif

#ifdef GOOSE_AVX512
// fp32, fp16 and bf16 weights in a "panels" layout (goose/quant.py DenseLinear on AVX-512 CPUs): G = ceil(N / 16)
// groups of 16 output rows (zero rows pad the last), in each the 16 rows' values of one step's inputs side by
// side: [G, K, 16] fp32 or fp16 (one input a step; fp16 widened to fp32 as loaded), [G, K / 2, 16, 2] bf16 (a
// pair of inputs a step, multiplied in bf16 pairs: vdpbf16ps). One vector load is a step of 16 outputs; one FMA
// (or pair product) with a row's broadcast activations adds it to those 16 outputs' sums. No sums across lanes
// at the end, and at many rows each loaded vector serves 8 activation rows from registers (the [N, K] many-rows
// kernel loads an activation vector per 4 products and sums every dot product across lanes). Measured on
// L12-D768's fp32 weights, whole decode steps in one process: batch 16 25.3 -> 18.2 ms, batch 1 13.9 -> 11.6,
// batch 64 (oneDNN before) 71.6 -> 57.4; at 1024 rows as fast as oneDNN's GEMM.
constexpr int PANEL_ROWS = 8;      // activation rows a tile of the many-rows path passes with
constexpr int PANEL_BLOCK = 3;     // groups a tile of the many-rows path multiplies (3 x 8 accumulators)
constexpr int PANEL_STREAM_BLOCK = 4;  // groups a tile multiplies at up to MAX_ROWS rows (4 chains a row)
constexpr int64_t PANEL_K_CHUNK = 512; // steps per pass of the many-rows path when K is longer than 2 chunks

// Inputs per lane of a step, by the arithmetic's type: 1 for fp32, a pair for bf16.
template <typename X>
constexpr int64_t panel_inputs() { return int64_t(sizeof(float) / sizeof(X)); }

// One step's activations of a row (x: its first input), in every lane.
inline __m512 broadcast_step(const float* x) { return _mm512_set1_ps(*x); }
inline __m512i broadcast_step(const at::BFloat16* x) {
    int32_t pair;
    std::memcpy(&pair, x, sizeof(pair));
    return _mm512_set1_epi32(pair);
}

// Which of the next block's cache lines a tile fetches: `per_step` lines a step from `next` (line `line` on,
// below `end`), so that a block's passes together fetch the next block once.
struct PanelFetch {
    const char* next = nullptr;
    int64_t line = 0, end = 0;
    int per_step = 0;
};

// acc[m][v] += x[m, step k] . W[group v, step k] for steps k in [k0, k1) (x rows ldx elements apart; w the
// first of V consecutive groups, S steps of 16 lanes each).
template <int M, int V, typename X, typename W>
__attribute__((always_inline)) inline void panel_products(const X* x, int64_t ldx, const W* w, int64_t S,
                                                          int64_t k0, int64_t k1, __m512 (&acc)[M][V],
                                                          PanelFetch& fetch) {
    constexpr int64_t IN = panel_inputs<X>();
    using Mask = std::conditional_t<IN == 1, __mmask16, __mmask32>;
    using Operand = decltype(load_operand(w, Mask(0)));
    for (int64_t k = k0; k < k1; ++k) {
        Operand wv[V];
#pragma GCC unroll 8
        for (int v = 0; v < V; ++v) {
            Operand loaded = load_operand(w + (v * S + k) * PAIR_GROUP * IN, Mask(~Mask(0)));
            if constexpr (M > 1) asm("" : "+v"(loaded));     // in a register, not re-loaded per row (see dot_step)
            wv[v] = loaded;
        }
        if (fetch.line < fetch.end) {
            for (int i = 0; i < fetch.per_step; ++i) _mm_prefetch(fetch.next + ((fetch.line + i) << 6), _MM_HINT_T0);
            fetch.line += fetch.per_step;
        }
#pragma GCC unroll 8
        for (int m = 0; m < M; ++m) {
            Operand xv = broadcast_step(x + m * ldx + k * IN);
            if constexpr (V > 1) asm("" : "+v"(xv));
#pragma GCC unroll 8
            for (int v = 0; v < V; ++v) acc[m][v] = madd(x, acc[m][v], wv[v], xv);
        }
    }
}

// y[m, 16 (g + v) + o] (+)= the products of steps [k0, k1) for m < M, v < V, outputs below N.
template <int M, int V, typename X, typename W>
void panel_tile(const X* x, int64_t ldx, const W* w, int64_t S, int64_t g, int64_t k0, int64_t k1, float* y,
                int64_t N, bool add, PanelFetch& fetch) {
    __m512 acc[M][V];
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m)
#pragma GCC unroll 8
        for (int v = 0; v < V; ++v) acc[m][v] = _mm512_setzero_ps();
    panel_products<M, V>(x, ldx, w + g * S * PAIR_GROUP * panel_inputs<X>(), S, k0, k1, acc, fetch);
#pragma GCC unroll 8
    for (int v = 0; v < V; ++v) {
        const int64_t n = (g + v) * PAIR_GROUP;
        const __mmask16 mask = tail_mask(std::max<int64_t>(0, N - n));
#pragma GCC unroll 8
        for (int m = 0; m < M; ++m) {
            float* out = y + m * N + n;
            const __m512 r = add ? _mm512_add_ps(acc[m][v], _mm512_maskz_loadu_ps(mask, out)) : acc[m][v];
            _mm512_mask_storeu_ps(out, mask, r);
        }
    }
}

// y [M, N] = x [M, K] @ W.T, W [G, 16 K] in the panels layout (steps of X's inputs a lane); any number of rows.
// X is the arithmetic's type (see madd), W the stored one (fp16 is widened to fp32 as it is loaded). Up to
// MAX_ROWS rows, blocks of 4 groups stream once for all rows; more rows pass over a block of 3 groups 8 at a time
// (in chunks of PANEL_K_CHUNK steps if K is long), the passes together fetching the next block in software.
template <typename X, typename W>
void panel_product(const X* xp, int64_t M, const W* w, int64_t K, int64_t N, float* yp) {
    const int64_t S = K / panel_inputs<X>(), G = (N + PAIR_GROUP - 1) / PAIR_GROUP;
    const bool few = M <= MAX_ROWS;
    const int64_t V = few ? PANEL_STREAM_BLOCK : PANEL_BLOCK;
    const int64_t chunk = !few && S > 2 * PANEL_K_CHUNK ? PANEL_K_CHUNK : S;
    const int64_t passes = (M + PANEL_ROWS - 1) / PANEL_ROWS * ((S + chunk - 1) / chunk);
    const int64_t step_bytes = PAIR_GROUP * panel_inputs<X>() * int64_t(sizeof(W));   // a step of a group
    const int64_t grain = std::max<int64_t>(1, GRAIN_BYTES / (V * S * step_bytes));
    at::parallel_for(0, (G + V - 1) / V, grain, [&](int64_t b0, int64_t b1) {
        for (int64_t b = b0; b < b1; ++b) {
            const int64_t g = b * V;
            if (few) {
                PanelFetch none;
                dispatch_rows(M, [&](auto rows) {
                    constexpr int R = decltype(rows)::value;
                    if (g + PANEL_STREAM_BLOCK <= G)
                        panel_tile<R, PANEL_STREAM_BLOCK>(xp, K, w, S, g, 0, S, yp, N, false, none);
                    else
                        for (int64_t h = g; h < G; ++h) panel_tile<R, 1>(xp, K, w, S, h, 0, S, yp, N, false, none);
                });
                continue;
            }
            // the next block (contiguous: V groups), fetched a few lines a step over all of this block's passes
            PanelFetch fetch;
            if (b + 1 < b1 && g + 2 * V <= G) {
                fetch.next = reinterpret_cast<const char*>(w + (g + V) * S * PAIR_GROUP * panel_inputs<X>());
                fetch.end = V * S * step_bytes / 64;    // cache lines
                fetch.per_step = static_cast<int>((fetch.end + passes * chunk - 1) / (passes * chunk));
            }
            for (int64_t k0 = 0; k0 < S; k0 += chunk) {
                const int64_t k1 = std::min(S, k0 + chunk);
                for (int64_t m0 = 0; m0 < M; m0 += PANEL_ROWS) {
                    const X* xs = xp + m0 * K;
                    float* ys = yp + m0 * N;
                    dispatch_rows<PANEL_ROWS>(std::min<int64_t>(PANEL_ROWS, M - m0), [&](auto rows) {
                        constexpr int R = decltype(rows)::value;
                        if (g + PANEL_BLOCK <= G)
                            panel_tile<R, PANEL_BLOCK>(xs, K, w, S, g, k0, k1, ys, N, k0 > 0, fetch);
                        else
                            for (int64_t h = g; h < G; ++h)
                                panel_tile<R, 1>(xs, K, w, S, h, k0, k1, ys, N, k0 > 0, fetch);
                    });
                }
            }
        }
    });
}

// x [M, K] fp32 @ W.T for an fp32, fp16 or (with AVX512-BF16; K even) bf16 weight in the panels layout, N
// outputs. bf16: the activations rounded to bf16, as in `linear`; fp16: the weights widened, fp32 arithmetic.
at::Tensor linear_panels(const at::Tensor& x, const at::Tensor& panels, int64_t N) {
    const bool bf16 = panels.scalar_type() == at::kBFloat16, fp16 = panels.scalar_type() == at::kHalf;
#ifdef GOOSE_BF16_DOT
    const bool supported = bf16 || fp16 || panels.scalar_type() == at::kFloat;
#else
    const bool supported = fp16 || panels.scalar_type() == at::kFloat;
#endif
    TORCH_CHECK(supported && panels.is_contiguous() && panels.dim() == 2 &&
                panels.size(1) % (PAIR_GROUP * (bf16 ? 2 : 1)) == 0 &&
                panels.size(0) == (N + PAIR_GROUP - 1) / PAIR_GROUP,
                "goose linear_panels: panels must be a contiguous fp32 or fp16 (or, with bf16 dot products, bf16) "
                "[ceil(N / 16) groups, 16 K] matrix, N = ", N, ", K even for bf16");
    const int64_t K = panels.size(1) / PAIR_GROUP;
    TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous() && x.dim() == 2 && x.size(1) == K,
                "goose linear_panels: x must be a contiguous fp32 matrix of ", K, " columns");
    auto y = at::empty({x.size(0), N}, x.options());
    if (bf16) {
#ifdef GOOSE_BF16_DOT
        const auto xb = x.to(at::kBFloat16);
        panel_product(xb.data_ptr<at::BFloat16>(), x.size(0), panels.data_ptr<at::BFloat16>(), K, N,
                      y.data_ptr<float>());
#endif
    } else if (fp16) {
        panel_product(x.data_ptr<float>(), x.size(0), panels.data_ptr<at::Half>(), K, N, y.data_ptr<float>());
    } else {
        panel_product(x.data_ptr<float>(), x.size(0), panels.data_ptr<float>(), K, N, y.data_ptr<float>());
    }
    return y;
}
#endif

// Elementwise exp, sigmoid and tanh over arrays, vectorised with vec_exp.h's e^x:
// sigmoid(x) = 1 / (1 + e^-x), tanh(x) = 1 - 2 / (1 + e^2x).
enum class Fn { Exp, Sigmoid, Tanh };


template <Fn F>
void apply(float* x, int64_t n) {
    int64_t i = 0;
#ifdef GOOSE_AVX512
    const __m512 one = _mm512_set1_ps(1.f), two = _mm512_set1_ps(2.f);
    for (; i < n; i += 16) {
        const __mmask16 mask = tail_mask(n - i);
        const __m512 v = _mm512_maskz_loadu_ps(mask, x + i);
        __m512 out;
        if constexpr (F == Fn::Exp) out = exp16(v);
        if constexpr (F == Fn::Sigmoid) out = _mm512_div_ps(one, _mm512_add_ps(one, exp16(_mm512_sub_ps(_mm512_setzero_ps(), v))));
        if constexpr (F == Fn::Tanh) out = _mm512_sub_ps(one, _mm512_div_ps(two, _mm512_add_ps(one, exp16(_mm512_mul_ps(two, v)))));
        _mm512_mask_storeu_ps(x + i, mask, out);
    }
#endif
    for (; i < n; ++i) {
        if constexpr (F == Fn::Exp) x[i] = std::exp(x[i]);
        if constexpr (F == Fn::Sigmoid) x[i] = 1.f / (1.f + std::exp(-x[i]));
        if constexpr (F == Fn::Tanh) x[i] = std::tanh(x[i]);
    }
}

// The token-shift lerps of one token, optionally after a LayerNorm of it: with xn = LayerNorm(x) (or x if no
// LayerNorm weights are given), out[i] = xn + (shift - xn) * coefs[i] for x, shift [B, C]; xn is also written
// to new_shift if given (the next token's shift; may be `shift` itself: each element is read first).
at::Tensor token_mix(const at::Tensor& x, const at::Tensor& shift, at::TensorList coefs,
                     const c10::optional<at::Tensor>& ln_weight, const c10::optional<at::Tensor>& ln_bias, double eps,
                     const c10::optional<at::Tensor>& new_shift) {
    TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous() && shift.is_contiguous() &&
                shift.sizes() == x.sizes(), "goose token_mix: x and shift must be contiguous fp32 [B, C]");
    const int64_t C = x.size(-1), B = x.numel() / C;
    for (const auto& c : coefs)
        TORCH_CHECK(c.scalar_type() == at::kFloat && c.is_contiguous() && c.numel() == C,
                    "goose token_mix: every coefficient must be contiguous fp32 with C values");
    TORCH_CHECK(ln_weight.has_value() == ln_bias.has_value(), "goose token_mix: LayerNorm needs weight and bias");
    for (const auto* t : {&ln_weight, &ln_bias, &new_shift})
        TORCH_CHECK(!t->has_value() || ((*t)->scalar_type() == at::kFloat && (*t)->is_contiguous() &&
                                         (*t)->numel() == ((t == &new_shift) ? B * C : C)),
                    "goose token_mix: LayerNorm weights [C] and new_shift [B, C] must be contiguous fp32");
    auto out = at::empty({int64_t(coefs.size()), B, C}, x.options());
    const float *xp = x.data_ptr<float>(), *sp = shift.data_ptr<float>();
    const float *lw = ln_weight ? ln_weight->data_ptr<float>() : nullptr, *lb = ln_bias ? ln_bias->data_ptr<float>() : nullptr;
    float *op = out.data_ptr<float>(), *np = new_shift ? new_shift->data_ptr<float>() : nullptr;
    std::vector<const float*> cps;
    for (const auto& c : coefs) cps.push_back(c.data_ptr<float>());
    // rows are independent: a batch splits them across threads (a few rows stay on one: ~1 us each)
    at::parallel_for(0, B, 4, [&](int64_t begin, int64_t end) {
        std::vector<float> xn(C);
        for (int64_t b = begin; b < end; ++b) {
            const float* row = xp + b * C;
            if (lw) {
                float mean = 0.f, var = 0.f;
#pragma omp simd reduction(+ : mean)
                for (int64_t c = 0; c < C; ++c) mean += row[c];
                mean /= C;
#pragma omp simd reduction(+ : var)
                for (int64_t c = 0; c < C; ++c) var += (row[c] - mean) * (row[c] - mean);
                const float rstd = 1.f / std::sqrt(var / C + float(eps));
#pragma omp simd
                for (int64_t c = 0; c < C; ++c) xn[c] = (row[c] - mean) * rstd * lw[c] + lb[c];
            } else {
                std::copy(row, row + C, xn.begin());
            }
            for (size_t i = 0; i < cps.size(); ++i) {
                const float* cp = cps[i];
                float* o = op + (int64_t(i) * B + b) * C;
#pragma omp simd
                for (int64_t c = 0; c < C; ++c) o[c] = xn[c] + (sp[b * C + c] - xn[c]) * cp[c];
            }
            if (np) std::copy(xn.begin(), xn.end(), np + b * C);
        }
    });
    return out;
}

// sum_j a[j] b[j]
float dot(const float* a, const float* b, int64_t n) {
#ifdef GOOSE_AVX512
    __m512 acc = _mm512_setzero_ps();
    for (int64_t j = 0; j < n; j += 16) {
        const __mmask16 mask = tail_mask(n - j);
        acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mask, a + j), _mm512_maskz_loadu_ps(mask, b + j), acc);
    }
    return _mm512_reduce_add_ps(acc);
#else
    float acc = 0.f;
#pragma omp simd reduction(+ : acc)
    for (int64_t j = 0; j < n; ++j) acc += a[j] * b[j];
    return acc;
#endif
}

// One row of the state update, s_new = s * decay + sa * removal + vi * k (s_new may be s), returning s_new . r.
float update_row(const float* s, float* s_new, const float* decay, float sa, const float* removal, float vi,
                 const float* k, const float* r, int64_t n) {
#ifdef GOOSE_AVX512
    __m512 acc = _mm512_setzero_ps();
    const __m512 sa_v = _mm512_set1_ps(sa), vi_v = _mm512_set1_ps(vi);
    for (int64_t j = 0; j < n; j += 16) {
        const __mmask16 mask = tail_mask(n - j);
        __m512 x = _mm512_mul_ps(_mm512_maskz_loadu_ps(mask, s + j), _mm512_maskz_loadu_ps(mask, decay + j));
        x = _mm512_fmadd_ps(sa_v, _mm512_maskz_loadu_ps(mask, removal + j), x);
        x = _mm512_fmadd_ps(vi_v, _mm512_maskz_loadu_ps(mask, k + j), x);
        _mm512_mask_storeu_ps(s_new + j, mask, x);
        acc = _mm512_fmadd_ps(x, _mm512_maskz_loadu_ps(mask, r + j), acc);
    }
    return _mm512_reduce_add_ps(acc);
#else
    float acc = 0.f;
    for (int64_t j = 0; j < n; ++j) {
        s_new[j] = s[j] * decay[j] + sa * removal[j] + vi * k[j];
        acc += s_new[j] * r[j];
    }
    return acc;
#endif
}

#ifdef GOOSE_AVX512
// The state part of head_step for N a multiple of 16, 16 rows at a time: sa = S kk (a = -kk), the row update,
// and y = S_new r. The 16 row sums of each product come out of one transposed reduction (reduce16) instead of
// one horizontal sum per row: ~30% fewer instructions per head.
void state_rows16(const float* S, float* S_new, const float* decay, const float* removal, const float* kk,
                  const float* k, const float* r, const float* v, int64_t N, float* y, const float* S_ahead) {
    alignas(64) float sa[16];
    for (int64_t i0 = 0; i0 < N; i0 += 16) {
        __m512 acc[4][4];
        for (int m = 0; m < 4; ++m)
            for (int j = 0; j < 4; ++j) {
                const int64_t i = i0 + m * 4 + j;
                if (S_ahead)   // a batch's states stream from DRAM: fetch a later head's meanwhile
                    for (int64_t c = 0; c < N; c += 16) __builtin_prefetch(S_ahead + i * N + c, 1);
                __m512 a = _mm512_setzero_ps();
                for (int64_t c = 0; c < N; c += 16)
                    a = _mm512_fmadd_ps(_mm512_loadu_ps(S + i * N + c), _mm512_loadu_ps(kk + c), a);
                acc[m][j] = a;
            }
        _mm512_store_ps(sa, reduce16(acc));
        for (int m = 0; m < 4; ++m)
            for (int j = 0; j < 4; ++j) {
                const int64_t i = i0 + m * 4 + j;
                const __m512 sa_v = _mm512_set1_ps(-sa[m * 4 + j]), v_v = _mm512_set1_ps(v[i]);
                __m512 a = _mm512_setzero_ps();
                for (int64_t c = 0; c < N; c += 16) {
                    __m512 x = _mm512_mul_ps(_mm512_loadu_ps(S + i * N + c), _mm512_loadu_ps(decay + c));
                    x = _mm512_fmadd_ps(sa_v, _mm512_loadu_ps(removal + c), x);
                    x = _mm512_fmadd_ps(v_v, _mm512_loadu_ps(k + c), x);
                    _mm512_storeu_ps(S_new + i * N + c, x);
                    a = _mm512_fmadd_ps(x, _mm512_loadu_ps(r + c), a);
                }
                acc[m][j] = a;
            }
        _mm512_storeu_ps(y + i0, reduce16(acc));
    }
}
#endif

// One head of one sequence: the removal key kk normalised in place, the WKV7 step on its N x N state (row =
// value index) with a = -kk, b = kk * iclr, then GroupNorm of S r, the bonus (r . (k * r_k)) v and the gate.
void head_step(const float* S, float* S_new, const float* r, const float* decay, const float* k, const float* v,
               float* kk, const float* iclr, const float* gate, const float* r_k, const float* ln_w, const float* ln_b,
               float eps, int64_t N, float* y, float* scratch /* 2 N */, const float* S_ahead) {
    const float inv = 1.f / std::max(std::sqrt(dot(kk, kk, N)), 1e-12f);
    float *removal = scratch, *sa = scratch + N;
    for (int64_t j = 0; j < N; ++j) {
        kk[j] *= inv;
        removal[j] = kk[j] * iclr[j];
    }
#ifdef GOOSE_AVX512
    if (N % 16 == 0) {
        state_rows16(S, S_new, decay, removal, kk, k, r, v, N, y, S_ahead);
    } else
#endif
    {
        for (int64_t i = 0; i < N; ++i) {
            // a batch's states stream from DRAM: fetching a later head's state meanwhile keeps the reads going
            // (measured at batch 16: ~2x the state bandwidth of the hardware prefetcher alone)
            if (S_ahead)
                for (int64_t j = 0; j < N; j += 16) __builtin_prefetch(S_ahead + i * N + j, 1);
            sa[i] = -dot(S + i * N, kk, N);                                  // S a, from the old state
        }
        for (int64_t i = 0; i < N; ++i)
            y[i] = update_row(S + i * N, S_new + i * N, decay, sa[i], removal, v[i], k, r, N);
    }
    float mean = 0.f;
    for (int64_t i = 0; i < N; ++i) mean += y[i];
    mean /= N;
    float var = 0.f, bonus = 0.f;
    for (int64_t j = 0; j < N; ++j) {
        var += (y[j] - mean) * (y[j] - mean);
        bonus += r[j] * k[j] * r_k[j];
    }
    const float rstd = 1.f / std::sqrt(var / N + eps);
    for (int64_t j = 0; j < N; ++j) y[j] = ((y[j] - mean) * rstd * ln_w[j] + ln_b[j] + bonus * v[j]) * gate[j];
}

// Parameters of time_mix_step, in this order (goose/model.py TimeMix names).
enum Param { W0, W1, W2, A0, A1, A2, V0, V1, V2, G1, G2, K_K, K_A, R_K, LN_W, LN_B, N_PARAMS };

// One token of TimeMix after the projections r, k, v [B, C], from the mixed inputs xw, xa, xv, xg
// (mixed[1], [4], [3], [5] of token_mix): the w/a/v/g LoRAs, the removal key, the WKV7 step on
// `state` [B, H, N, N] (written to `out_state`, which may be `state`), GroupNorm, bonus and gate.
// Returns ((GroupNorm(S r) + bonus) * g [B, C], v after the value residual: layer 0's is v_first).
// goose/model.py TimeMix.forward is the reference this must equal (tests/test_decode.py).
std::tuple<at::Tensor, at::Tensor> time_mix_step(const at::Tensor& r, const at::Tensor& k_in, const at::Tensor& v_in,
                                                 const at::Tensor& mixed, at::TensorList p, const at::Tensor& state,
                                                 at::Tensor out_state, const c10::optional<at::Tensor>& v_first,
                                                 double log_decay_floor, bool iclr, double eps) {
    TORCH_CHECK(p.size() == N_PARAMS, "goose time_mix_step: expected ", int(N_PARAMS), " parameters");
    for (const auto& t : {r, k_in, v_in, mixed, state, out_state})
        TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous(),
                    "goose time_mix_step: tensors must be contiguous fp32 on CPU");
    for (const auto& t : p)
        TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous(), "goose time_mix_step: fp32 parameters");
    const int64_t C = r.size(-1), B = r.numel() / C, H = p[R_K].size(0), N = p[R_K].size(1);
    TORCH_CHECK(H * N == C && state.numel() == B * H * N * N && mixed.numel() == 6 * B * C,
                "goose time_mix_step: shapes do not fit C = ", C, ", H = ", H, ", N = ", N);
    auto f = [](const at::Tensor& t) { return t.data_ptr<float>(); };
    const float *xw = f(mixed) + 1 * B * C, *xv = f(mixed) + 3 * B * C, *xa = f(mixed) + 4 * B * C,
                *xg = f(mixed) + 5 * B * C;

    // one allocation for every [B, C] temporary (each costs ~1 us, as much as a small layer's arithmetic)
    auto work = at::empty({8, B, C}, r.options());
    auto y = work[0], v = work[1];
    float *yp = f(work), *vp = yp + B * C, *kp = vp + B * C, *gp = kp + B * C, *wp = gp + B * C, *ap = wp + B * C,
          *kkp = ap + B * C, *value_mix = kkp + B * C;
    std::copy(f(k_in), f(k_in) + B * C, kp);
    std::copy(f(v_in), f(v_in) + B * C, vp);
    const float* vf = nullptr;
    if (v_first) {
        TORCH_CHECK(v_first->scalar_type() == at::kFloat && v_first->is_contiguous() && v_first->numel() == B * C,
                    "goose time_mix_step: v_first must be contiguous fp32 [B, C]");
        vf = v_first->data_ptr<float>();
    }

    // the LoRAs: out = bias + act(x @ down) @ up; their hidden activations lie side by side ([B, rank] each)
    struct Lora { const float* x; Param down, up; const float* bias; float* out; int64_t rank = 0, offset = 0; };
    std::vector<Lora> loras = {{xw, W1, W2, f(p[W0]), wp}, {xg, G1, G2, nullptr, gp}};   // decay (tanh), gate (sigmoid)
    if (iclr) loras.push_back({xa, A1, A2, f(p[A0]), ap});                                 // in-context learning rate
    if (vf) loras.push_back({xv, V1, V2, f(p[V0]), value_mix});                    // value residual
    int64_t hidden_size = 0;
    for (auto& l : loras) {
        l.rank = p[l.down].size(1);
        l.offset = hidden_size;
        hidden_size += B * l.rank;
    }
    const int threads = at::in_parallel_region() ? 1 : at::get_num_threads();
    std::vector<float> partial(int64_t(threads) * hidden_size, 0.f);
    const float *rp = f(r), *rk = f(p[R_K]), *ln_w = f(p[LN_W]), *ln_b = f(p[LN_B]), *s_in = f(state);
    const float *k_k = f(p[K_K]), *k_a = f(p[K_A]);
    float* s_out = f(out_state);

    // One parallel region, one barrier: the threads split the rows of the down-projections (each streams
    // a contiguous part of those weights), then each takes whole heads: the up-projections' columns of its
    // heads, the activations and keys there, and the heads' WKV steps, for every sequence.
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
#ifdef _OPENMP
        const int t = omp_get_thread_num(), T = omp_get_num_threads();
#else
        const int t = 0, T = 1;
#endif
        const int64_t k0 = C * t / T, k1 = C * (t + 1) / T;
        float* mine = partial.data() + int64_t(t) * hidden_size;
        for (const auto& l : loras) axpy_range(l.x, f(p[l.down]), B, C, l.rank, k0, k1, 0, l.rank, mine + l.offset);
#pragma omp barrier
        // every thread sums the partial products itself (a few hundred values each)
        std::vector<float> hidden(hidden_size, 0.f);
        for (int u = 0; u < threads; ++u)
#pragma omp simd
            for (int64_t i = 0; i < hidden_size; ++i) hidden[i] += partial[u * hidden_size + i];
        apply<Fn::Tanh>(hidden.data() + loras[0].offset, B * loras[0].rank);
        apply<Fn::Sigmoid>(hidden.data() + loras[1].offset, B * loras[1].rank);

        const int64_t h0 = H * t / T, h1 = H * (t + 1) / T, c0 = h0 * N, width = (h1 - h0) * N;
        for (const auto& l : loras) {
            for (int64_t b = 0; b < B; ++b)
                for (int64_t c = c0; c < c0 + width; ++c) l.out[b * C + c] = l.bias ? l.bias[c] : 0.f;
            axpy_range(hidden.data() + l.offset, f(p[l.up]), B, l.rank, C, 0, l.rank, c0, c0 + width, l.out);
        }
        for (int64_t b = 0; b < B; ++b) {
            const int64_t o = b * C + c0;
            float *w_ = wp + o, *a_ = ap + o, *k_ = kp + o, *v_ = vp + o, *kk_ = kkp + o;
            apply<Fn::Sigmoid>(w_, width);
            for (int64_t i = 0; i < width; ++i) w_[i] *= float(log_decay_floor);
            apply<Fn::Exp>(w_, width);                                                   // the decay itself
            if (iclr)
                apply<Fn::Sigmoid>(a_, width);
            else
                std::fill(a_, a_ + width, 0.f);
            if (vf) {
                float* mix = value_mix + o;
                apply<Fn::Sigmoid>(mix, width);
#pragma omp simd
                for (int64_t i = 0; i < width; ++i) v_[i] += (vf[o + i] - v_[i]) * mix[i];
            }
#pragma omp simd
            for (int64_t i = 0; i < width; ++i) {
                kk_[i] = k_[i] * k_k[c0 + i];
                if (iclr) k_[i] *= 1.f + (a_[i] - 1.f) * k_a[c0 + i];
            }
        }
        std::vector<float> scratch(2 * N);
        const int64_t mine_heads = h1 - h0, jobs = B * mine_heads;
        auto head_index = [&](int64_t j) { return (j / mine_heads) * H + h0 + j % mine_heads; };
        for (int64_t j = 0; j < jobs; ++j) {
            const int64_t bh = head_index(j), off = bh * N, h = bh % H;
            const float* ahead = j + PREFETCH_HEADS < jobs ? s_in + head_index(j + PREFETCH_HEADS) * N * N : nullptr;
            head_step(s_in + bh * N * N, s_out + bh * N * N, rp + off, wp + off, kp + off, vp + off, kkp + off,
                      ap + off, gp + off, rk + h * N, ln_w + h * N, ln_b + h * N, float(eps), N, yp + off,
                      scratch.data(), ahead);
        }
    }
    return {y, v};
}

// A whole decode step in one call. Called op by op from Python, a step spends ~75 us a layer in the interpreter
// and torch's dispatcher (measured: a 12-layer model 64 wide, whose kernels take ~0.1 ms, steps in 0.94 ms op by
// op and 0.19 ms here; on L12-D768 the one call saves 2.1 ms of an fp32 step's 14.5 and 1.2 of an int4 step's
// 3.8). DecodeStep holds a model's tensors (the model's own, no copies; goose/model.py RWKV7._decoder lists them)
// and composes the kernels above as goose/model.py's forward does:
//
//   x = LN0(emb[token])
//   per layer:  m = token_mix(x, LN1);  x += O time_mix_step(R m_r, K m_k, V m_v, m)
//               x += FV relu(FK token_mix(x, LN2)_k)^2
//   logits = HEAD LN_out(x)
//
// Each product is one of the kernels above, named as its op, with its operands. A step first checks that every
// tensor it holds still has the dtype, shape and memory it had when added, and returns None otherwise, having
// written nothing (the caller builds a new one).
enum class Kernel { Linear, Int8, Panels, Int8Pairs, Int4Pairs };

struct Product {
    Kernel kernel;
    std::vector<at::Tensor> w;     // the operands after x
    std::vector<int64_t> args;     // the op's int arguments

    at::Tensor operator()(const at::Tensor& x) const {
        switch (kernel) {
        case Kernel::Linear: return ::linear(x, w[0]);      // not at::linear
        case Kernel::Int8: return linear_int8(x, w[0], w[1]);
#ifdef GOOSE_AVX512
        case Kernel::Panels: return linear_panels(x, w[0], args[0]);
#endif
#ifdef GOOSE_INT16_DOT
        case Kernel::Int8Pairs: return linear_int8_pairs(x, w[0], w[1]);
        case Kernel::Int4Pairs: return linear_int4_pairs(x, w[0], w[1], w[2], args[0], args[1]);
#endif
        default: TORCH_CHECK(false, "goose decode step: kernel not built for this CPU");
        }
    }
};

Product make_product(const std::string& op, std::vector<at::Tensor> w, std::vector<int64_t> args) {
    struct Signature { const char* op; Kernel kernel; size_t tensors, ints; };
    static const Signature signatures[] = {
        {"linear", Kernel::Linear, 1, 0}, {"linear_int8", Kernel::Int8, 2, 0}, {"linear_panels", Kernel::Panels, 1, 1},
        {"linear_int8_pairs", Kernel::Int8Pairs, 2, 0}, {"linear_int4_pairs", Kernel::Int4Pairs, 3, 2}};
    for (const auto& s : signatures)
        if (op == s.op) {
            TORCH_CHECK(w.size() == s.tensors && args.size() == s.ints, "goose decode step: ", op, " takes ",
                        s.tensors, " tensors and ", s.ints, " ints");
            return {s.kernel, std::move(w), std::move(args)};
        }
    TORCH_CHECK(false, "goose decode step: no kernel named ", op);
}

// token_mix's coefficients, time_mix_step's parameters and the LayerNorms of one block, in the order
// RWKV7._decoder lists them
enum LayerTensor { LN1_W, LN1_B, X_R, X_W, X_K, X_V, X_A, X_G, MIX_PARAMS, LN2_W = MIX_PARAMS + N_PARAMS, LN2_B, FFN_X_K,
                   N_LAYER_TENSORS };
enum LayerProduct { RECEPTANCE, KEY, VALUE, OUTPUT, FFN_KEY, FFN_VALUE, N_LAYER_PRODUCTS };

struct DecodeStep : torch::CustomClassHolder {
    struct Held {           // a tensor as it was added
        at::Tensor t;
        const void* data;
        at::ScalarType dtype;
        std::vector<int64_t> sizes;
        bool unchanged() const { return t.data_ptr() == data && t.scalar_type() == dtype && t.sizes() == sizes; }
    };
    struct Layer {
        std::vector<at::Tensor> att_coefs, ffn_coefs, params;
        at::Tensor ln1_w, ln1_b, ln2_w, ln2_b;
        double ln1_eps, ln2_eps, ln_x_eps;
    };

    at::Tensor emb, ln0_w, ln0_b, ln_out_w, ln_out_b;
    double ln0_eps, ln_out_eps, log_decay_floor;
    bool iclr;
    std::vector<Layer> layers;
    std::vector<Product> products;     // N_LAYER_PRODUCTS a layer, then the head
    std::vector<Held> held;

    DecodeStep(at::Tensor emb, at::Tensor ln0_w, at::Tensor ln0_b, double ln0_eps, at::Tensor ln_out_w,
               at::Tensor ln_out_b, double ln_out_eps, double log_decay_floor, bool iclr)
        : emb(emb), ln0_w(ln0_w), ln0_b(ln0_b), ln_out_w(ln_out_w), ln_out_b(ln_out_b), ln0_eps(ln0_eps),
          ln_out_eps(ln_out_eps), log_decay_floor(log_decay_floor), iclr(iclr) {
        for (const auto& t : {emb, ln0_w, ln0_b, ln_out_w, ln_out_b}) hold(t);
    }

    void hold(const at::Tensor& t) {
        TORCH_CHECK(t.defined() && t.device().is_cpu(), "goose decode step: tensors must be on the CPU");
        held.push_back({t, t.data_ptr(), t.scalar_type(), t.sizes().vec()});
    }

    void add_layer(std::vector<at::Tensor> t, std::vector<double> eps) {
        TORCH_CHECK(t.size() == N_LAYER_TENSORS && eps.size() == 3, "goose decode step: a layer takes ",
                    int(N_LAYER_TENSORS), " tensors and 3 LayerNorm epsilons");
        for (const auto& x : t) hold(x);
        layers.push_back({{t.begin() + X_R, t.begin() + X_G + 1}, {t[FFN_X_K]},
                          {t.begin() + MIX_PARAMS, t.begin() + MIX_PARAMS + N_PARAMS}, t[LN1_W], t[LN1_B], t[LN2_W],
                          t[LN2_B], eps[0], eps[1], eps[2]});
    }

    void add_product(std::string op, std::vector<at::Tensor> w, std::vector<int64_t> args) {
        for (const auto& x : w) hold(x);
        products.push_back(make_product(op, std::move(w), std::move(args)));
    }

    // The logits [B, V] of `tokens` [B] (int64 or int32) after `state` (att_shift, wkv, ffn_shift: [L, B, ...],
    // fp32, each layer's part contiguous), the new state written to `new_state` (which may be `state`); None if a
    // tensor changed.
    c10::optional<at::Tensor> step(const at::Tensor& tokens, const at::Tensor& att_shift, const at::Tensor& wkv,
                                   const at::Tensor& ffn_shift, at::Tensor new_att_shift, at::Tensor new_wkv,
                                   at::Tensor new_ffn_shift) {
        for (const auto& h : held)
            if (!h.unchanged()) return c10::nullopt;
        const int64_t L = int64_t(layers.size()), B = tokens.numel(), C = emb.size(1);
        TORCH_CHECK(int64_t(products.size()) == N_LAYER_PRODUCTS * L + 1, "goose decode step: incomplete model");
        TORCH_CHECK(tokens.scalar_type() == at::kLong || tokens.scalar_type() == at::kInt,
                    "goose decode step: tokens must be int64 or int32");
        for (const auto& s : {att_shift, wkv, ffn_shift, new_att_shift, new_wkv, new_ffn_shift})
            TORCH_CHECK(s.device().is_cpu() && s.scalar_type() == at::kFloat && s.dim() >= 3 && s.size(0) == L &&
                        s.size(1) == B && s[0].is_contiguous(), "goose decode step: the state must be fp32 [", L,
                        ", ", B, ", ...], each layer's part contiguous");
        TORCH_CHECK(att_shift.sizes() == new_att_shift.sizes() && wkv.sizes() == new_wkv.sizes() &&
                    ffn_shift.sizes() == new_ffn_shift.sizes(), "goose decode step: the new state's shapes differ");
        // the token lookup checks the ids before anything is written
        at::Tensor x = at::layer_norm(at::embedding(emb, tokens.reshape({B})), {C}, ln0_w, ln0_b, ln0_eps);
        at::Tensor v_first;
        for (int64_t i = 0; i < L; ++i) {
            const Layer& l = layers[i];
            const Product* p = products.data() + N_LAYER_PRODUCTS * i;
            const auto mixed = token_mix(x, att_shift[i], l.att_coefs, l.ln1_w, l.ln1_b, l.ln1_eps, new_att_shift[i]);
            const auto [y, v] = time_mix_step(p[RECEPTANCE](mixed[0]), p[KEY](mixed[2]), p[VALUE](mixed[3]), mixed,
                                              l.params, wkv[i], new_wkv[i],
                                              i == 0 ? c10::optional<at::Tensor>() : v_first, log_decay_floor, iclr,
                                              l.ln_x_eps);
            if (i == 0) v_first = v;
            x = x + p[OUTPUT](y);
            const auto xk = token_mix(x, ffn_shift[i], l.ffn_coefs, l.ln2_w, l.ln2_b, l.ln2_eps, new_ffn_shift[i])[0];
            x = x + p[FFN_VALUE](at::pow(at::relu(p[FFN_KEY](xk)), 2));
        }
        return products.back()(at::layer_norm(x, {C}, ln_out_w, ln_out_b, ln_out_eps));
    }
};

}  // namespace

// Whether bf16 weights are multiplied in bf16, the activations rounded.
bool bf16_dot() {
#ifdef GOOSE_BF16_DOT
    return true;
#else
    return false;
#endif
}

// Whether fp32 weights can be kept in the panels layout (linear_panels).
bool fp32_panels() {
#ifdef GOOSE_AVX512
    return true;
#else
    return false;
#endif
}

// Whether int8 weights are multiplied with the activations quantized to int16 per row.
bool int16_dot() {
#ifdef GOOSE_INT16_DOT
    return true;
#else
    return false;
#endif
}

TORCH_LIBRARY(goose_decode, m) {
    m.def("bf16_dot() -> bool", &bf16_dot);
    m.def("int16_dot() -> bool", &int16_dot);
    m.def("fp32_panels() -> bool", &fp32_panels);
    m.def("linear(Tensor x, Tensor weight) -> Tensor", &linear);
    m.def("matmul(Tensor x, Tensor w) -> Tensor", &matmul);
    m.def("linear_int8(Tensor x, Tensor q, Tensor scale) -> Tensor", &linear_int8);
#ifdef GOOSE_AVX512
    m.def("linear_panels(Tensor x, Tensor panels, int N) -> Tensor", &linear_panels);
#endif
#ifdef GOOSE_INT16_DOT
    m.def("linear_int8_pairs(Tensor x, Tensor q, Tensor scale) -> Tensor", &linear_int8_pairs);
    m.def("int8_pairs_rows(Tensor q, int g0, int g1) -> Tensor", &int8_pairs_rows);
    m.def("int4_pairs_rows(Tensor q, int g0, int g1) -> Tensor", &int4_pairs_rows);
    m.def("linear_int4_pairs(Tensor x, Tensor q, Tensor scale, Tensor zero, int group, int N) -> Tensor",
          &linear_int4_pairs);
#endif
    m.def("token_mix(Tensor x, Tensor shift, Tensor[] coefs, Tensor? ln_weight, Tensor? ln_bias, float eps, "
          "Tensor(a!)? new_shift) -> Tensor", &token_mix);
    m.def("time_mix_step(Tensor r, Tensor k, Tensor v, Tensor mixed, Tensor[] params, Tensor state, "
          "Tensor(a!) out_state, Tensor? v_first, float log_decay_floor, bool iclr, float eps) -> (Tensor, Tensor)",
          &time_mix_step);
    m.class_<DecodeStep>("DecodeStep")
        .def(torch::init<at::Tensor, at::Tensor, at::Tensor, double, at::Tensor, at::Tensor, double, double, bool>())
        .def("add_layer", &DecodeStep::add_layer)
        .def("add_product", &DecodeStep::add_product)
        .def("step", &DecodeStep::step);
}
