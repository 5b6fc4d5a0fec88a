// WKV7 chunked forward on CPU (no autograd): the chunked form of goose/ops/README.md, one head at a time.
//
// Per head, with state S (N x N, row i = value index, column j = key index) and tokens t:
//     S_t = S_{t-1} diag(e^{w_t}) + (S_{t-1} a_t) b_t^T + v_t k_t^T,        y_t = S_t r_t
// Per chunk of C tokens, with L_t = sum_{u<=t} w_u within the chunk (per key channel):
//     rows  Qa_t = a_t e^{L_{t-1}},  Qr_t = r_t e^{L_t},  Kb_s = b_s e^{-L_s},  Kk_s = k_s e^{-L_s}
//     scores [Qa; Qr] [Kb; Kk]^T, masked to M_b, M_k (s < t) and A_rb, A_rk (s <= t)
//     (I - M_b) Z = Qa S^T + M_k V                     forward substitution, by blocks of rows
//     Y = Qr S^T + A_rb Z + A_rk V
//     S <- (S + Z^T Kb + V^T Kk) diag(e^{L_C})
// The last chunk is padded with decay 1 and zero inputs, which leave the state unchanged.
//
// Layout: r, w, k, v, a, b and y are contiguous fp32 [B, T, H, N]; the state is [B, H, N, N]. Heads are
// independent: each thread takes a range of them (at::parallel_for) and walks them chunk by chunk, keeping
// each head's state transposed (St = S^T, row = key index) in a scratch buffer, so that every product above
// has the form
//     out[i, :] = scale[i] (init[i, :] + sum_p A[i, p] M[p, :])      (M row-major, A read with any strides)
// which is a broadcast of A[i, p] and a few vector FMAs per (i, p): `multiply_rows`, register-tiled with
// AVX-512 where available and plain loops otherwise. The scores need the keys as such a row-major matrix,
// so Kb, Kk are also stored transposed, [N, 2C].

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "vec_exp.h"

#ifdef __AVX512F__
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kMaxChunk = 64;

// One product A x M added to a block of output rows. Row i of A has nonzeros only in columns < `depth`,
// and, if `lower`, only in columns <= i (the caller zeroed the rest), so rows may stop early.
struct Product {
  const float* a;
  int64_t a_row_stride, a_col_stride;
  const float* m;
  int64_t m_row_stride;
  int64_t depth;
  bool lower;
};

// Where the products go: out[i, :] = scale[i] * (init[i, :] + sum of products), `init` (may be `out`) and
// `scale` optional; `out` must not overlap any M.
struct Target {
  float* out;
  int64_t out_stride;
  const float* init = nullptr;
  int64_t init_stride = 0;
  const float* scale = nullptr;
};

int64_t depth_for_rows(const Product& p, int64_t last_row) {
  return p.lower ? std::min(p.depth, last_row + 1) : p.depth;
}

// The tiles' vector type: 8 floats in a GCC/Clang vector-extension register (one AVX register, two SSE or
// NEON ones) on any CPU, or 16 in an AVX-512 register.
typedef float Vec8 __attribute__((vector_size(32)));
struct PortableLanes {
  using V = Vec8;
  static constexpr int kWidth = 8;
  static V load(const float* p) {
    V v;
    std::memcpy(&v, p, sizeof v);
    return v;
  }
  static V zero() { return V{}; }
  static V splat(float x) { return V{} + x; }
  static V fma(V a, V b, V acc) { return acc + a * b; }
  static V mul(V a, V b) { return a * b; }
  static void store(float* p, V v) { std::memcpy(p, &v, sizeof v); }
};
#ifdef __AVX512F__
struct Avx512Lanes {
  using V = __m512;
  static constexpr int kWidth = 16;
  static V load(const float* p) { return _mm512_loadu_ps(p); }
  static V zero() { return _mm512_setzero_ps(); }
  static V splat(float x) { return _mm512_set1_ps(x); }
  static V fma(V a, V b, V acc) { return _mm512_fmadd_ps(a, b, acc); }
  static V mul(V a, V b) { return _mm512_mul_ps(a, b); }
  static void store(float* p, V v) { _mm512_storeu_ps(p, v); }
};
#endif

// Output rows row0 .. row0 + ROWS - 1 by columns col0 .. col0 + VECS vectors, held in registers over the
// whole depth: per step of the depth, VECS loads of M, and per row one broadcast of A and VECS FMAs.
template <typename L, int ROWS, int VECS>
void multiply_tile(const Target& to, const Product* products, int n_products, int64_t row0, int64_t col0) {
  constexpr int W = L::kWidth;
  typename L::V acc[ROWS][VECS];
  for (int r = 0; r < ROWS; ++r)
    for (int v = 0; v < VECS; ++v)
      acc[r][v] = to.init ? L::load(to.init + (row0 + r) * to.init_stride + col0 + W * v) : L::zero();
  for (int q = 0; q < n_products; ++q) {
    const Product& p = products[q];
    const int64_t depth = depth_for_rows(p, row0 + ROWS - 1);
    const float* a = p.a + row0 * p.a_row_stride;
    for (int64_t d = 0; d < depth; ++d) {
      typename L::V m[VECS];
      for (int v = 0; v < VECS; ++v) m[v] = L::load(p.m + d * p.m_row_stride + col0 + W * v);
      for (int r = 0; r < ROWS; ++r) {
        const typename L::V x = L::splat(a[r * p.a_row_stride + d * p.a_col_stride]);
        for (int v = 0; v < VECS; ++v) acc[r][v] = L::fma(x, m[v], acc[r][v]);
      }
    }
  }
  for (int r = 0; r < ROWS; ++r) {
    const typename L::V scale = L::splat(to.scale ? to.scale[row0 + r] : 1.f);
    for (int v = 0; v < VECS; ++v)
      L::store(to.out + (row0 + r) * to.out_stride + col0 + W * v, L::mul(acc[r][v], scale));
  }
}

// Portable code, any CPU: tiles of 6 rows by kPortableWidth columns; the columns beyond the last full tile by
// plain loops.
constexpr int kPortableVecs = 2;
constexpr int64_t kPortableWidth = PortableLanes::kWidth * kPortableVecs;

void multiply_rows_portable(const Target& to, const Product* products, int n_products, int64_t rows,
                            int64_t cols) {
  constexpr int kRows = 6;
  const int64_t tiled_cols = cols / kPortableWidth * kPortableWidth;
  for (int64_t col0 = 0; col0 < tiled_cols; col0 += kPortableWidth) {
    int64_t row0 = 0;
    for (; row0 + kRows <= rows; row0 += kRows)
      multiply_tile<PortableLanes, kRows, kPortableVecs>(to, products, n_products, row0, col0);
    for (; row0 < rows; ++row0) multiply_tile<PortableLanes, 1, kPortableVecs>(to, products, n_products, row0, col0);
  }
  for (int64_t i = 0; i < rows && tiled_cols < cols; ++i) {
    float* o = to.out + i * to.out_stride;
    for (int64_t c = tiled_cols; c < cols; ++c) o[c] = to.init ? to.init[i * to.init_stride + c] : 0.f;
    for (int q = 0; q < n_products; ++q) {
      const Product& p = products[q];
      const int64_t depth = depth_for_rows(p, i);
      for (int64_t d = 0; d < depth; ++d) {
        const float x = p.a[i * p.a_row_stride + d * p.a_col_stride];
        const float* m = p.m + d * p.m_row_stride;
        for (int64_t c = tiled_cols; c < cols; ++c) o[c] += x * m[c];
      }
    }
    if (to.scale)
      for (int64_t c = tiled_cols; c < cols; ++c) o[c] *= to.scale[i];
  }
}

#ifdef __AVX512F__
// Rows per tile: as many accumulators as fit in the 32 vector registers beside the VECS loaded M vectors.
template <int VECS>
constexpr int kTileRows = VECS == 4 ? 6 : VECS == 3 ? 8 : VECS == 2 ? 12 : 16;

// The last rows < kTileRows: a tile of exactly `rows` rows.
template <int VECS, int ROWS>
void multiply_remainder(int64_t rows, const Target& to, const Product* products, int n_products, int64_t row0,
                        int64_t col0) {
  if constexpr (ROWS > 0) {
    if (rows == ROWS)
      multiply_tile<Avx512Lanes, ROWS, VECS>(to, products, n_products, row0, col0);
    else
      multiply_remainder<VECS, ROWS - 1>(rows, to, products, n_products, row0, col0);
  }
}

template <int VECS>
void multiply_column_block(const Target& to, const Product* products, int n_products, int64_t rows,
                           int64_t col0) {
  constexpr int R = kTileRows<VECS>;
  int64_t row0 = 0;
  for (; row0 + R <= rows; row0 += R) multiply_tile<Avx512Lanes, R, VECS>(to, products, n_products, row0, col0);
  if (row0 < rows) multiply_remainder<VECS, R - 1>(rows - row0, to, products, n_products, row0, col0);
}
#endif

// to.out[i, :cols] = to.scale[i] * (to.init[i, :cols] + sum over products of A[i, :depth] M[:depth, :cols]).
void multiply_rows(const Target& to, std::initializer_list<Product> product_list, int64_t rows, int64_t cols) {
  const Product* products = product_list.begin();
  const int n_products = static_cast<int>(product_list.size());
#ifdef __AVX512F__
  if (cols % 16 == 0) {
    for (int64_t col0 = 0; col0 < cols; col0 += 64) {
      switch (std::min<int64_t>(4, (cols - col0) / 16)) {
        case 4: multiply_column_block<4>(to, products, n_products, rows, col0); break;
        case 3: multiply_column_block<3>(to, products, n_products, rows, col0); break;
        case 2: multiply_column_block<2>(to, products, n_products, rows, col0); break;
        default: multiply_column_block<1>(to, products, n_products, rows, col0);
      }
    }
    return;
  }
#endif
  multiply_rows_portable(to, products, n_products, rows, cols);
}

#ifdef __AVX512F__
// Permute indices for transpose_16x16: kTransposeIndex[stage][half][j], indices >= 16 select from the
// second row. Stage s swaps bit s of the row index with bit s of the column index, pairing rows i and
// i | (1 << s): half 0 builds the row with that bit clear, half 1 the row with it set.
struct TransposeIndex {
  alignas(64) int32_t index[4][2][16];
  constexpr TransposeIndex() : index{} {
    for (int stage = 0; stage < 4; ++stage) {
      const int bit = 1 << stage;
      for (int j = 0; j < 16; ++j) {
        index[stage][0][j] = (j & bit) ? 16 + (j ^ bit) : j;
        index[stage][1][j] = (j & bit) ? 16 + j : (j | bit);
      }
    }
  }
};
constexpr TransposeIndex kTransposeIndex;

// dst = src^T for a 16 x 16 block: four stages of two-source permutes, one per output row.
void transpose_16x16(const float* src, int64_t src_stride, float* dst, int64_t dst_stride) {
  __m512 rows[16];
  for (int i = 0; i < 16; ++i) rows[i] = _mm512_loadu_ps(src + i * src_stride);
  for (int stage = 0; stage < 4; ++stage) {
    const int bit = 1 << stage;
    const __m512i low = _mm512_load_si512(kTransposeIndex.index[stage][0]);
    const __m512i high = _mm512_load_si512(kTransposeIndex.index[stage][1]);
    for (int i = 0; i < 16; ++i) {
      if (i & bit) continue;
      const __m512 first = rows[i], second = rows[i | bit];
      rows[i] = _mm512_permutex2var_ps(first, low, second);
      rows[i | bit] = _mm512_permutex2var_ps(first, high, second);
    }
  }
  for (int i = 0; i < 16; ++i) _mm512_storeu_ps(dst + i * dst_stride, rows[i]);
}
#endif

// dst [cols, rows] = src [rows, cols]^T, both row-major.
void transpose(const float* src, int64_t rows, int64_t cols, float* dst) {
#ifdef __AVX512F__
  if (rows % 16 == 0 && cols % 16 == 0) {
    for (int64_t i = 0; i < rows; i += 16)
      for (int64_t j = 0; j < cols; j += 16) transpose_16x16(src + i * cols + j, cols, dst + j * rows + i, rows);
    return;
  }
#endif
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j) dst[j * rows + i] = src[i * cols + j];
}

struct Inputs {
  const float *r, *w, *k, *v, *a, *b;
  int64_t T, H, N;
};

// Per-thread working memory for one head's chunk, all row-major.
struct Scratch {
  int64_t C, N;
  float* q;       // [2C, N]  rows Qa then Qr
  float* keys;    // [2C, N]  rows Kb then Kk
  float* keys_t;  // [N, 2C]  the same, transposed, for the scores
  float* zv;      // [2C, N]  rows Z then V
  float* scores;  // [2C, 2C] [[M_b, M_k], [A_rb, A_rk]]
  float* qs;      // [2C, N]  [Qa; Qr] S^T
  float* cum;     // [N]      L_t
  float* decay;   // [N]      e^{L_t}, after the chunk e^{L_C}

  static int64_t floats(int64_t C, int64_t N) { return 5 * 2 * C * N + 4 * C * C + 2 * N; }

  Scratch(float* base, int64_t C_, int64_t N_) : C(C_), N(N_) {
    q = base;
    keys = q + 2 * C * N;
    keys_t = keys + 2 * C * N;
    zv = keys_t + 2 * C * N;
    scores = zv + 2 * C * N;
    qs = scores + 4 * C * C;
    cum = qs + 2 * C * N;
    decay = cum + N;
  }
};

// The rows of one chunk (tokens t0 .. t0 + valid - 1, the rest padding): Qa, Qr, Kb, Kk, V and e^{L_C}.
void prepare_chunk(const Inputs& in, const float* y, int64_t head_offset, int64_t t0, int64_t valid, Scratch& s) {
  const int64_t C = s.C, N = s.N;
  std::fill(s.cum, s.cum + N, 0.f);
  std::fill(s.decay, s.decay + N, 1.f);
  for (int64_t t = 0; t < C; ++t) {
    float *qa = s.q + t * N, *qr = s.q + (C + t) * N;
    float *kb = s.keys + t * N, *kk = s.keys + (C + t) * N, *v = s.zv + (C + t) * N;
    if (t >= valid) {
      for (float* row : {qa, qr, kb, kk, v}) std::fill(row, row + N, 0.f);
      continue;
    }
    const int64_t at = head_offset + (t0 + t) * in.H * N;
    // fetch this token's rows of the next chunk while this one computes (written out here: GCC drops calls
    // to a function that only prefetches, as it has no side effects)
    if (t0 + C + t < in.T) {
      const int64_t next = at + C * in.H * N;
      for (int64_t line = 0; line < N; line += 64 / sizeof(float)) {
        for (const float* x : {in.r, in.w, in.k, in.v, in.a, in.b}) __builtin_prefetch(x + next + line, 0);
        __builtin_prefetch(y + next + line, 1);
      }
    }
    std::memcpy(v, in.v + at, N * sizeof(float));
    int64_t j = 0;
#ifdef __AVX512F__
    for (; j + 16 <= N; j += 16) {
      const __m512 decay_before = _mm512_loadu_ps(s.decay + j);
      _mm512_storeu_ps(qa + j, _mm512_mul_ps(_mm512_loadu_ps(in.a + at + j), decay_before));
      const __m512 cum = _mm512_add_ps(_mm512_loadu_ps(s.cum + j), _mm512_loadu_ps(in.w + at + j));
      const __m512 decay = exp16(cum), growth = exp16(_mm512_sub_ps(_mm512_setzero_ps(), cum));
      _mm512_storeu_ps(s.cum + j, cum);
      _mm512_storeu_ps(s.decay + j, decay);
      _mm512_storeu_ps(qr + j, _mm512_mul_ps(_mm512_loadu_ps(in.r + at + j), decay));
      _mm512_storeu_ps(kb + j, _mm512_mul_ps(_mm512_loadu_ps(in.b + at + j), growth));
      _mm512_storeu_ps(kk + j, _mm512_mul_ps(_mm512_loadu_ps(in.k + at + j), growth));
    }
#endif
#pragma omp simd
    for (int64_t jj = j; jj < N; ++jj) {
      qa[jj] = in.a[at + jj] * s.decay[jj];
      s.cum[jj] += in.w[at + jj];
      s.decay[jj] = exp_portable(s.cum[jj]);
      const float growth = exp_portable(-s.cum[jj]);
      qr[jj] = in.r[at + jj] * s.decay[jj];
      kb[jj] = in.b[at + jj] * growth;
      kk[jj] = in.k[at + jj] * growth;
    }
  }
  transpose(s.keys, 2 * C, N, s.keys_t);
}

// Keep the scores' lower triangles: s < t for the Qa rows (the state before step t), s <= t for the Qr rows.
void mask_scores(Scratch& s) {
  const int64_t C = s.C;
  for (int64_t t = 0; t < 2 * C; ++t) {
    const int64_t first_zero = t < C ? t : t - C + 1;
    float* row = s.scores + t * 2 * C;
    std::fill(row + first_zero, row + C, 0.f);
    std::fill(row + C + first_zero, row + 2 * C, 0.f);
  }
}

// Z = Qa S^T + M_k V + M_b Z (M_b strictly lower), by blocks of rows: the terms that use V and the earlier
// blocks' Z as one product, then forward substitution inside the block.
void solve_z(Scratch& s, float* z, const float* v) {
  constexpr int64_t kBlock = 6;
  const int64_t C = s.C, N = s.N, ld = 2 * C;
  for (int64_t t0 = 0; t0 < C; t0 += kBlock) {
    const int64_t t1 = std::min(C, t0 + kBlock);
    const float* m_row = s.scores + t0 * ld;   // [M_b, M_k] rows t0 .. t1 - 1
    multiply_rows({z + t0 * N, N, s.qs + t0 * N, N},
                  {{m_row + C, ld, 1, v, N, t1 - 1, false}, {m_row, ld, 1, z, N, t0, false}}, t1 - t0, N);
    for (int64_t t = t0 + 1; t < t1; ++t) {
      float* z_t = z + t * N;
      for (int64_t u = t0; u < t; ++u) {
        const float m = s.scores[t * ld + u];
        const float* z_u = z + u * N;
#pragma omp simd
        for (int64_t i = 0; i < N; ++i) z_t[i] += m * z_u[i];
      }
    }
  }
}

// One chunk (tokens t0 .. t0 + C - 1, fewer at the end) of one head: writes its outputs, advances St.
void chunk_forward(const Inputs& in, int64_t head_offset, int64_t t0, float* st, float* y, Scratch& s) {
  const int64_t C = s.C, N = s.N, token_stride = in.H * N, valid = std::min(C, in.T - t0);
  float *z = s.zv, *v = s.zv + C * N;
  prepare_chunk(in, y, head_offset, t0, valid, s);
  // [Qa; Qr] S^T and the scores
  multiply_rows({s.qs, N}, {{s.q, N, 1, st, N, N, false}}, 2 * C, N);
  multiply_rows({s.scores, 2 * C}, {{s.q, N, 1, s.keys_t, 2 * C, N, false}}, 2 * C, 2 * C);
  mask_scores(s);
  solve_z(s, z, v);
  // Y = Qr S^T + A_rb Z + A_rk V, straight into the output rows
  const float* a_r = s.scores + C * 2 * C;
  multiply_rows({y + head_offset + t0 * token_stride, token_stride, s.qs + C * N, N},
                {{a_r, 2 * C, 1, z, N, C, true}, {a_r + C, 2 * C, 1, v, N, C, true}}, valid, N);
  // S^T <- diag(e^{L_C}) (S^T + Kb^T Z + Kk^T V)
  multiply_rows({st, N, st, N, s.decay}, {{s.keys, 1, N, s.zv, N, 2 * C, false}}, N, N);
}

std::tuple<at::Tensor, at::Tensor> chunked_forward(const at::Tensor& r, const at::Tensor& w, const at::Tensor& k,
                                                   const at::Tensor& v, const at::Tensor& a, const at::Tensor& b,
                                                   const at::Tensor& state, int64_t chunk_len) {
  TORCH_CHECK(r.dim() == 4, "wkv chunked_forward: inputs must be [B, T, H, N]");
  for (const at::Tensor* x : {&r, &w, &k, &v, &a, &b, &state}) {
    TORCH_CHECK(x->device().is_cpu() && x->scalar_type() == at::kFloat && x->is_contiguous(),
                "wkv chunked_forward: inputs must be contiguous fp32 CPU tensors");
  }
  for (const at::Tensor* x : {&w, &k, &v, &a, &b}) TORCH_CHECK(x->sizes() == r.sizes(), "wkv: input shapes differ");
  const int64_t B = r.size(0), T = r.size(1), H = r.size(2), N = r.size(3);
  TORCH_CHECK(state.sizes() == at::IntArrayRef({B, H, N, N}), "wkv chunked_forward: state must be [B, H, N, N]");
  TORCH_CHECK(chunk_len >= 1 && chunk_len <= kMaxChunk, "wkv chunked_forward: chunk_len must be in 1..64");

  at::Tensor y = at::empty_like(r), new_state = at::empty_like(state);
  const Inputs in{r.data_ptr<float>(), w.data_ptr<float>(), k.data_ptr<float>(), v.data_ptr<float>(),
                  a.data_ptr<float>(), b.data_ptr<float>(), T, H, N};
  const float* state_in = state.data_ptr<float>();
  float *y_out = y.data_ptr<float>(), *state_outs = new_state.data_ptr<float>();
  // Each thread takes a range of heads and walks them chunk by chunk, all its heads at each chunk, so that
  // it reads the inputs' rows in memory order.
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    const int64_t heads = end - begin;
    at::Tensor buffer = at::empty({Scratch::floats(chunk_len, N) + heads * N * N}, r.options());
    Scratch scratch(buffer.data_ptr<float>(), chunk_len, N);
    float* states_t = buffer.data_ptr<float>() + Scratch::floats(chunk_len, N);   // S^T of each head
    for (int64_t h = 0; h < heads; ++h) transpose(state_in + (begin + h) * N * N, N, N, states_t + h * N * N);
    for (int64_t t0 = 0; t0 < T; t0 += chunk_len)
      for (int64_t bh = begin; bh < end; ++bh)
        chunk_forward(in, (bh / H) * T * H * N + (bh % H) * N, t0, states_t + (bh - begin) * N * N, y_out,
                      scratch);
    for (int64_t h = 0; h < heads; ++h) transpose(states_t + h * N * N, N, N, state_outs + (begin + h) * N * N);
  });
  return {y, new_state};
}

}  // namespace

TORCH_LIBRARY(goose_wkv, m) {
  m.def("chunked_forward(Tensor r, Tensor w, Tensor k, Tensor v, Tensor a, Tensor b, Tensor state, int chunk_len)"
        " -> (Tensor, Tensor)",
        &chunked_forward);
}
