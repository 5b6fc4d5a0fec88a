// e^x for fp32 vectors, shared by the native kernels: x = n ln2 + f with |f| <= ln2 / 2, e^f by its Taylor
// polynomial of degree 7 (truncation error < 1e-8 relative), scaled by 2^n; about 2 ulp. The clamp to
// [-87, 88] keeps results normal and finite.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#ifdef __AVX512F__
#include <immintrin.h>

inline __m512 exp16(__m512 x) {
    x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.f)), _mm512_set1_ps(-87.f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 f = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145752f), x);     // ln2 split into an exact high part
    f = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.42860677e-6f), f);          // and the rest
    __m512 p = _mm512_set1_ps(1.f / 5040);
    for (float c : {1.f / 720, 1.f / 120, 1.f / 24, 1.f / 6, 1.f / 2, 1.f, 1.f})
        p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(c));
    return _mm512_scalef_ps(p, n);
}
#endif

// The same e^x in plain float and integer operations, which compilers vectorise: 2^n is added to the
// exponent field (the clamp keeps n in -126 .. 127, where that is exact).
#pragma omp declare simd notinbranch
inline float exp_portable(float x) {
    x = std::min(std::max(x, -87.f), 88.f);
    const float n = std::nearbyint(x * 1.44269504f);
    float f = x - n * 0.693145752f;
    f = f - n * 1.42860677e-6f;
    float p = 1.f / 5040;
    p = p * f + 1.f / 720;
    p = p * f + 1.f / 120;
    p = p * f + 1.f / 24;
    p = p * f + 1.f / 6;
    p = p * f + 1.f / 2;
    p = p * f + 1.f;
    p = p * f + 1.f;
    int32_t bits;
    std::memcpy(&bits, &p, sizeof bits);
    bits += static_cast<int32_t>(n) * (1 << 23);
    std::memcpy(&p, &bits, sizeof p);
    return p;
}
