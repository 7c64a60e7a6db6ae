/* Helpers shared by the kernels: bfloat16 conversions (every build), AVX2/FMA helpers
 * (where the compiler targets AVX2+FMA), and `vf`, one float vector of the widest kind the
 * build targets (16 lanes with AVX-512F, else 8 with AVX2), for the kernels written once
 * for both widths.
 *
 * kvflow compiles csrc/ once per instruction set (kvflow/model/cpu_isa.py picks the build
 * at load time): a build only holds instructions of its own ISA, so a newer build never
 * reaches an older CPU.
 */
#ifndef KVFLOW_VEC_H
#define KVFLOW_VEC_H
#include <stdint.h>
#include <string.h>

/* bfloat16 as its 16 bits: the upper half of a float32. */
static inline float bf16_to_f32(uint16_t h)
{
    const uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* Round to nearest, ties to even (as torch's .to(torch.bfloat16)); NaN stays NaN. */
static inline uint16_t f32_to_bf16(float f)
{
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    if ((bits & 0x7fffffffu) > 0x7f800000u)
        return (uint16_t)((bits >> 16) | 0x40u);
    bits += 0x7fffu + ((bits >> 16) & 1u);
    return (uint16_t)(bits >> 16);
}

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>

static inline float hsum8(__m256 v)
{
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_hadd_ps(s, s);
    s = _mm_hadd_ps(s, s);
    return _mm_cvtss_f32(s);
}

/* The four horizontal sums of a, b, c, d, in that order. */
static inline __m128 hsum8x4(__m256 a, __m256 b, __m256 c, __m256 d)
{
    const __m256 s = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
    return _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
}

/* 8 bfloat16 values widened to float32 (exact: a shift into the upper half). */
static inline __m256 load8_bf16(const uint16_t *p)
{
    const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}

/* 8 floats rounded to bfloat16 (ties to even; inputs are finite activations). */
static inline void store8_bf16(uint16_t *p, __m256 v)
{
    const __m256i bits = _mm256_castps_si256(v);
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
    const __m256i rounded = _mm256_srli_epi32(
        _mm256_add_epi32(bits, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7fff))), 16);
    /* packus works per 128-bit lane: gather the four results of each lane, then the lanes. */
    const __m256i packed = _mm256_packus_epi32(rounded, rounded);
    const __m256i ordered = _mm256_permute4x64_epi64(packed, 0x08); /* qwords 0 and 2 */
    _mm_storeu_si128((__m128i *)p, _mm256_castsi256_si128(ordered));
}

/* e^x for 8 floats (libm's expf does not vectorize without -ffast-math): x = n ln2 + r
 * with ln2 split in two (Cody-Waite), e^r by a degree-6 polynomial (Cephes expf's
 * coefficients), 2^n built in the exponent bits. About 1 ulp over the float range. */
static inline __m256 exp8(__m256 x)
{
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.7f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
    const __m256i bits = _mm256_slli_epi32(
        _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
}

/* vf: the build's widest float vector. */
#if defined(__AVX512F__) && defined(__AVX512BW__)
#define KVFLOW_VF 16
typedef __m512 vf;
static inline vf vf_zero(void) { return _mm512_setzero_ps(); }
static inline vf vf_load(const float *p) { return _mm512_loadu_ps(p); }
static inline vf vf_fma(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
static inline vf vf_add(vf a, vf b) { return _mm512_add_ps(a, b); }
static inline float vf_sum(vf v) { return _mm512_reduce_add_ps(v); }
static inline vf vf_load_bf16(const uint16_t *p)
{
    const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}
static inline vf vf_load_i8(const int8_t *p)
{
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
}
/* The two halves of v added: 8 partial sums. */
static inline __m256 vf_fold(vf v)
{
    return _mm256_add_ps(_mm512_castps512_ps256(v),
                         _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
}
/* The four sums of a, b, c, d into s[0..3]. */
static inline void vf_sum4(vf a, vf b, vf c, vf d, float *s)
{
    _mm_storeu_ps(s, hsum8x4(vf_fold(a), vf_fold(b), vf_fold(c), vf_fold(d)));
}
#else
#define KVFLOW_VF 8
typedef __m256 vf;
static inline vf vf_zero(void) { return _mm256_setzero_ps(); }
static inline vf vf_load(const float *p) { return _mm256_loadu_ps(p); }
static inline vf vf_fma(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
static inline vf vf_add(vf a, vf b) { return _mm256_add_ps(a, b); }
static inline float vf_sum(vf v) { return hsum8(v); }
static inline vf vf_load_bf16(const uint16_t *p) { return load8_bf16(p); }
static inline vf vf_load_i8(const int8_t *p)
{
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}
static inline void vf_sum4(vf a, vf b, vf c, vf d, float *s)
{
    _mm_storeu_ps(s, hsum8x4(a, b, c, d));
}
#endif

#endif
#endif
