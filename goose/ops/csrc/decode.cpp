// Kernels of a decode step. Matrix-vector products: a few activation rows against a large weight, read once.
//
// At batch 1 (and a few rows) a product is bound by the weight's memory traffic, not arithmetic, so these
// kernels stream each weight row (or column block) once, for all activation rows at a time, on torch's
// own thread pool (at::parallel_for over output features). Activations are fp32 and so is the
// accumulation; only the summation order differs from a BLAS.
//
//   linear(x [M, K], weight [N, K])            = x @ weight.T       (nn.Linear layout; fp32 or bf16 weight)
//   matmul(x [M, K], w [K, N])                 = x @ w              (LoRA layout: columns of w)
//   linear_int8(x [M, K], q [N, K] int8, scale [N] bf16) = x @ (q * scale[:, None]).T
//
// M is at most MAX_ROWS. AVX-512 code where the compiler targets it (-march=native), portable loops
// (auto-vectorised) elsewhere.
//
// The small operations of an RWKV-7 step, fused (each is a few dozen tiny torch ops otherwise):
//   token_mix(x, shift, coefs)   = [x + (shift - x) * c for c in coefs]         (the token-shift lerps)
//   time_mix_step(...)           = TimeMix between its r/k/v projections and the output projection
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>
#include <vector>

#include "vec_exp.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define GOOSE_AVX512 1
#include <immintrin.h>
#endif

namespace {

constexpr int64_t MAX_ROWS = 4;
// weight rows streamed together by `linear`: 8 (measured ~10% faster than 4 at one row), 4 when the
// accumulators of more activation rows would not fit the 32 vector registers
template <int M>
constexpr int row_block() { return M <= 2 ? 8 : 4; }
constexpr int64_t COL_BLOCK = 64;               // output columns accumulated together by `matmul`
constexpr int64_t GRAIN_BYTES = 128 << 10;      // smallest share of the weight worth a thread

#ifdef GOOSE_AVX512

__mmask16 tail_mask(int64_t n) { return n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1); }

// Loads 16 weights starting at p as fp32 (masked: lanes outside `mask` read nothing and are zero).
inline __m512 load_weights(const float* p, __mmask16 mask) {
    return mask == 0xFFFF ? _mm512_loadu_ps(p) : _mm512_maskz_loadu_ps(mask, p);
}
inline __m512 load_weights(const int8_t* p, __mmask16 mask) {
    const __m128i q = mask == 0xFFFF ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(p)) : _mm_maskz_loadu_epi8(mask, p);
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q));
}
inline __m512 load_weights(const at::BFloat16* p, __mmask16 mask) {   // bf16 is the top half of an fp32
    const __m256i h = mask == 0xFFFF ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))
                                     : _mm256_maskz_loadu_epi16(mask, p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// y[m, n + j] = sum_k x[m, k] W[n + j, k] for j < R and m < M (R weight rows, contiguous rows of length K).
// One 16-wide step of dot_rows (the loops are unrolled so that the accumulators stay in registers).
template <int M, int R, typename W>
__attribute__((always_inline)) inline void dot_step(const float* x, const W* w, int64_t K, int64_t k, __mmask16 mask,
                                                    __m512 (&acc)[M][R]) {
    __m512 wv[R];
#pragma GCC unroll 8
    for (int j = 0; j < R; ++j) wv[j] = load_weights(w + j * K + k, mask);
#pragma GCC unroll 4
    for (int m = 0; m < M; ++m) {
        const __m512 xv = _mm512_maskz_loadu_ps(mask, x + m * K + k);
#pragma GCC unroll 8
        for (int j = 0; j < R; ++j) acc[m][j] = _mm512_fmadd_ps(wv[j], xv, acc[m][j]);
    }
}

template <int M, int R, typename W>
void dot_rows(const float* x, const W* w, int64_t K, float* sums /* [M][R] */) {
    __m512 acc[M][R];
#pragma GCC unroll 4
    for (int m = 0; m < M; ++m)
#pragma GCC unroll 8
        for (int j = 0; j < R; ++j) acc[m][j] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) dot_step<M, R>(x, w, K, k, 0xFFFF, acc);
    if (k < K) dot_step<M, R>(x, w, K, k, tail_mask(K - k), acc);
#pragma GCC unroll 4
    for (int m = 0; m < M; ++m)
#pragma GCC unroll 8
        for (int j = 0; j < R; ++j) sums[m * R + j] = _mm512_reduce_add_ps(acc[m][j]);
}

// y[m, n0:n0+width] = sum_k x[m, k] w[k, n0:n0+width] (w row-major [K, N], width <= COL_BLOCK).
template <int M>
void axpy_columns(const float* x, const float* w, int64_t K, int64_t N, int64_t n0, int64_t width, float* y) {
    constexpr int V = COL_BLOCK / 16;
    __m512 acc[M][V];
    __mmask16 mask[V];
#pragma GCC unroll 4
    for (int j = 0; j < V; ++j) mask[j] = tail_mask(std::max<int64_t>(0, width - 16 * j));
#pragma GCC unroll 4
    for (int m = 0; m < M; ++m)
#pragma GCC unroll 4
        for (int j = 0; j < V; ++j) acc[m][j] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; ++k) {
        __m512 wv[V];
#pragma GCC unroll 4
        for (int j = 0; j < V; ++j) wv[j] = _mm512_maskz_loadu_ps(mask[j], w + k * N + n0 + 16 * j);
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

template <int M, int R, typename W>
void dot_rows(const float* x, const W* w, int64_t K, float* sums) {
    for (int m = 0; m < M; ++m)
        for (int j = 0; j < R; ++j) {
            float s = 0.f;
#pragma omp simd reduction(+ : s)
            for (int64_t k = 0; k < K; ++k) s += static_cast<float>(w[j * K + k]) * x[m * K + k];
            sums[m * R + j] = s;
        }
}

template <int M>
void axpy_columns(const float* x, const float* w, int64_t K, int64_t N, int64_t n0, int64_t width, float* y) {
    float acc[M][COL_BLOCK] = {};
    for (int64_t k = 0; k < K; ++k)
        for (int m = 0; m < M; ++m) {
            const float xv = x[m * K + k];
#pragma omp simd
            for (int64_t j = 0; j < width; ++j) acc[m][j] += xv * w[k * N + n0 + j];
        }
    for (int m = 0; m < M; ++m) std::memcpy(y + m * N + n0, acc[m], width * sizeof(float));
}

#endif

int64_t grain_rows(int64_t row_bytes) { return std::max<int64_t>(8, GRAIN_BYTES / std::max<int64_t>(1, row_bytes)); }

// y[M, N] = x[M, K] @ W[N, K].T, times scale[n] per output if given.
template <int M, typename W>
void linear_rows(const float* x, const W* w, const at::BFloat16* scale, int64_t K, int64_t N, float* y) {
    at::parallel_for(0, N, grain_rows(K * sizeof(W)), [&](int64_t begin, int64_t end) {
        constexpr int R = row_block<M>();
        float sums[M * R];
        auto emit = [&](int64_t n, int rows) {
            for (int m = 0; m < M; ++m)
                for (int j = 0; j < rows; ++j)
                    y[m * N + n + j] = sums[m * rows + j] * (scale ? static_cast<float>(scale[n + j]) : 1.f);
        };
        int64_t n = begin;
        for (; n + R <= end; n += R) {
            dot_rows<M, R>(x, w + n * K, K, sums);
            emit(n, R);
        }
        for (; n < end; ++n) {
            dot_rows<M, 1>(x, w + n * K, K, sums);
            emit(n, 1);
        }
    });
}

template <int M>
void matmul_columns(const float* x, const float* w, int64_t K, int64_t N, float* y) {
    const int64_t blocks = (N + COL_BLOCK - 1) / COL_BLOCK;
    const int64_t grain = std::max<int64_t>(1, GRAIN_BYTES / (K * COL_BLOCK * int64_t(sizeof(float))));
    at::parallel_for(0, blocks, grain, [&](int64_t begin, int64_t end) {
        for (int64_t b = begin; b < end; ++b) {
            const int64_t n0 = b * COL_BLOCK;
            axpy_columns<M>(x, w, K, N, n0, std::min(COL_BLOCK, N - n0), y);
        }
    });
}

void check_activations(const at::Tensor& x, int64_t K) {
    TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.is_contiguous() && x.dim() == 2,
                "goose gemv: x must be a contiguous fp32 CPU matrix [M, K]");
    TORCH_CHECK(x.size(0) >= 1 && x.size(0) <= MAX_ROWS, "goose gemv: 1 to ", MAX_ROWS, " rows, got ", x.size(0));
    TORCH_CHECK(x.size(1) == K, "goose gemv: x has ", x.size(1), " columns, the weight expects ", K);
}

// Calls f.template operator()<M>() for the runtime row count (templates keep the accumulators in registers).
template <typename F>
void dispatch_rows(int64_t rows, F&& f) {
    switch (rows) {
        case 1: f(std::integral_constant<int, 1>{}); break;
        case 2: f(std::integral_constant<int, 2>{}); break;
        case 3: f(std::integral_constant<int, 3>{}); break;
        default: f(std::integral_constant<int, 4>{}); break;
    }
}

at::Tensor linear(const at::Tensor& x, const at::Tensor& weight) {
    const bool bf16 = weight.scalar_type() == at::kBFloat16;
    TORCH_CHECK((bf16 || weight.scalar_type() == at::kFloat) && weight.is_contiguous() && weight.dim() == 2,
                "goose linear: weight must be a contiguous fp32 or bf16 [N, K] matrix");
    check_activations(x, weight.size(1));
    auto y = at::empty({x.size(0), weight.size(0)}, x.options());
    dispatch_rows(x.size(0), [&](auto rows) {
        constexpr int M = decltype(rows)::value;
        if (bf16)
            linear_rows<M, at::BFloat16>(x.data_ptr<float>(), weight.data_ptr<at::BFloat16>(), nullptr,
                                         weight.size(1), weight.size(0), y.data_ptr<float>());
        else
            linear_rows<M, float>(x.data_ptr<float>(), weight.data_ptr<float>(), nullptr, weight.size(1),
                                  weight.size(0), y.data_ptr<float>());
    });
    return y;
}

at::Tensor matmul(const at::Tensor& x, const at::Tensor& w) {
    TORCH_CHECK(w.scalar_type() == at::kFloat && w.is_contiguous() && w.dim() == 2,
                "goose matmul: w must be a contiguous fp32 [K, N] matrix");
    check_activations(x, w.size(0));
    auto y = at::empty({x.size(0), w.size(1)}, x.options());
    dispatch_rows(x.size(0), [&](auto rows) {
        matmul_columns<decltype(rows)::value>(x.data_ptr<float>(), w.data_ptr<float>(), w.size(0), w.size(1),
                                              y.data_ptr<float>());
    });
    return y;
}

at::Tensor linear_int8(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale) {
    TORCH_CHECK(q.scalar_type() == at::kChar && q.is_contiguous() && q.dim() == 2,
                "goose linear_int8: q must be a contiguous int8 [N, K] matrix");
    TORCH_CHECK(scale.scalar_type() == at::kBFloat16 && scale.is_contiguous() && scale.numel() == q.size(0),
                "goose linear_int8: scale must be bf16 [N]");
    check_activations(x, q.size(1));
    auto y = at::empty({x.size(0), q.size(0)}, x.options());
    dispatch_rows(x.size(0), [&](auto rows) {
        linear_rows<decltype(rows)::value, int8_t>(x.data_ptr<float>(), q.data_ptr<int8_t>(),
                                                   scale.data_ptr<at::BFloat16>(), q.size(1), q.size(0),
                                                   y.data_ptr<float>());
    });
    return y;
}

// y[B, N] = x[B, K] @ w[K, N] for any B (in blocks of MAX_ROWS rows).
void matmul_any_rows(const float* x, const float* w, int64_t B, int64_t K, int64_t N, float* y) {
    for (int64_t b0 = 0; b0 < B; b0 += MAX_ROWS) {
        dispatch_rows(std::min(MAX_ROWS, B - b0), [&](auto rows) {
            matmul_columns<decltype(rows)::value>(x + b0 * K, w, K, N, y + b0 * N);
        });
    }
}

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

// x[b, c] += bias[c] for B rows of C
void add_bias(float* x, const float* bias, int64_t B, int64_t C) {
    for (int64_t b = 0; b < B; ++b)
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) x[b * C + c] += bias[c];
}

at::Tensor token_mix(const at::Tensor& x, const at::Tensor& shift, at::TensorList coefs) {
    TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous() && shift.is_contiguous() &&
                shift.sizes() == x.sizes(), "goose token_mix: x and shift must be contiguous fp32 [B, C]");
    const int64_t C = x.size(-1), B = x.numel() / C;
    auto out = at::empty({int64_t(coefs.size()), B, C}, x.options());
    const float *xp = x.data_ptr<float>(), *sp = shift.data_ptr<float>();
    float* op = out.data_ptr<float>();
    for (size_t i = 0; i < coefs.size(); ++i) {
        TORCH_CHECK(coefs[i].scalar_type() == at::kFloat && coefs[i].is_contiguous() && coefs[i].numel() == C,
                    "goose token_mix: every coefficient must be contiguous fp32 with C values");
        const float* cp = coefs[i].data_ptr<float>();
        for (int64_t b = 0; b < B; ++b)
            for (int64_t c = 0; c < C; ++c)
                op[(i * B + b) * C + c] = xp[b * C + c] + (sp[b * C + c] - xp[b * C + c]) * cp[c];
    }
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

// One head of one sequence: the removal key kk normalised in place, the WKV7 step on its N x N state (row =
// value index) with a = -kk, b = kk * iclr, then GroupNorm of S r, the bonus (r . (k * r_k)) v and the gate.
void head_step(const float* S, float* S_new, const float* r, const float* decay, const float* k, const float* v,
               float* kk, const float* iclr, const float* gate, const float* r_k, const float* ln_w, const float* ln_b,
               float eps, int64_t N, float* y, float* scratch /* 2 N */) {
    const float inv = 1.f / std::max(std::sqrt(dot(kk, kk, N)), 1e-12f);
    float *removal = scratch, *sa = scratch + N;
    for (int64_t j = 0; j < N; ++j) {
        kk[j] *= inv;
        removal[j] = kk[j] * iclr[j];
    }
    for (int64_t i = 0; i < N; ++i) sa[i] = -dot(S + i * N, kk, N);   // S a, from the old state
    float mean = 0.f;
    for (int64_t i = 0; i < N; ++i) {
        y[i] = update_row(S + i * N, S_new + i * N, decay, sa[i], removal, v[i], k, r, N);
        mean += y[i];
    }
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

    auto k = k_in.clone(), v = v_in.clone();
    auto g = at::empty({B, C}, r.options()), decay = at::empty({B, C}, r.options());
    auto a = at::empty({B, C}, r.options()), kk = at::empty({B, C}, r.options());
    float *kp = f(k), *vp = f(v), *gp = f(g), *wp = f(decay), *ap = f(a), *kkp = f(kk);
    const int64_t max_rank = std::max({p[W1].size(1), p[A1].size(1), p[V1].size(1), p[G1].size(1)});
    std::vector<float> hidden(B * max_rank);

    // the LoRAs: decay (tanh), gate (sigmoid inside), in-context learning rate, value residual
    matmul_any_rows(xw, f(p[W1]), B, C, p[W1].size(1), hidden.data());
    apply<Fn::Tanh>(hidden.data(), B * p[W1].size(1));
    matmul_any_rows(hidden.data(), f(p[W2]), B, p[W1].size(1), C, wp);
    add_bias(wp, f(p[W0]), B, C);
    apply<Fn::Sigmoid>(wp, B * C);
    for (int64_t i = 0; i < B * C; ++i) wp[i] *= float(log_decay_floor);
    apply<Fn::Exp>(wp, B * C);                                                   // the decay itself
    matmul_any_rows(xg, f(p[G1]), B, C, p[G1].size(1), hidden.data());
    apply<Fn::Sigmoid>(hidden.data(), B * p[G1].size(1));
    matmul_any_rows(hidden.data(), f(p[G2]), B, p[G1].size(1), C, gp);
    if (iclr) {
        matmul_any_rows(xa, f(p[A1]), B, C, p[A1].size(1), hidden.data());
        matmul_any_rows(hidden.data(), f(p[A2]), B, p[A1].size(1), C, ap);
        add_bias(ap, f(p[A0]), B, C);
        apply<Fn::Sigmoid>(ap, B * C);
    } else {
        std::fill(ap, ap + B * C, 0.f);
    }
    if (v_first) {
        TORCH_CHECK(v_first->scalar_type() == at::kFloat && v_first->is_contiguous() && v_first->numel() == B * C,
                    "goose time_mix_step: v_first must be contiguous fp32 [B, C]");
        const float* vf = v_first->data_ptr<float>();
        std::vector<float> mix(B * C);
        matmul_any_rows(xv, f(p[V1]), B, C, p[V1].size(1), hidden.data());
        matmul_any_rows(hidden.data(), f(p[V2]), B, p[V1].size(1), C, mix.data());
        add_bias(mix.data(), f(p[V0]), B, C);
        apply<Fn::Sigmoid>(mix.data(), B * C);
#pragma omp simd
        for (int64_t i = 0; i < B * C; ++i) vp[i] += (vf[i] - vp[i]) * mix[i];
    }

    const float *k_k = f(p[K_K]), *k_a = f(p[K_A]);
    for (int64_t b = 0; b < B; ++b)
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) {
            const int64_t i = b * C + c;
            kkp[i] = kp[i] * k_k[c];
            if (iclr) kp[i] *= 1.f + (ap[i] - 1.f) * k_a[c];
        }

    auto y = at::empty({B, C}, r.options());
    const float *rp = f(r), *rk = f(p[R_K]), *ln_w = f(p[LN_W]), *ln_b = f(p[LN_B]), *s_in = f(state);
    float *yp = f(y), *s_out = f(out_state);
    at::parallel_for(0, B * H, 4, [&](int64_t begin, int64_t end) {
        std::vector<float> scratch(2 * N);
        for (int64_t bh = begin; bh < end; ++bh) {
            const int64_t off = bh * N, h = bh % H;
            head_step(s_in + bh * N * N, s_out + bh * N * N, rp + off, wp + off, kp + off, vp + off, kkp + off,
                      ap + off, gp + off, rk + h * N, ln_w + h * N, ln_b + h * N, float(eps), N, yp + off,
                      scratch.data());
        }
    });
    return {y, v};
}

}  // namespace

TORCH_LIBRARY(goose_decode, m) {
    m.def("linear(Tensor x, Tensor weight) -> Tensor", &linear);
    m.def("matmul(Tensor x, Tensor w) -> Tensor", &matmul);
    m.def("linear_int8(Tensor x, Tensor q, Tensor scale) -> Tensor", &linear_int8);
    m.def("token_mix(Tensor x, Tensor shift, Tensor[] coefs) -> Tensor", &token_mix);
    m.def("time_mix_step(Tensor r, Tensor k, Tensor v, Tensor mixed, Tensor[] params, Tensor state, "
          "Tensor(a!) out_state, Tensor? v_first, float log_decay_floor, bool iclr, float eps) -> (Tensor, Tensor)",
          &time_mix_step);
}
