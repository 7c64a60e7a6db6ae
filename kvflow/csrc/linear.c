/* Linear layers for few tokens on the CPU: out[T, N] = x[T, K] · w[N, K]ᵀ (+ bias[N]).
 *
 * At decode batch sizes a linear layer is a matrix-vector product bound by memory
 * bandwidth: every weight is read once per step and used T times. Here each thread walks
 * whole weight rows front to back (one sequential stream the hardware prefetcher follows;
 * interleaving several rows measured a third slower at one token), and each row, once in
 * L1, serves all T tokens, four at a time. From 8 tokens on, with AVX2, rows go six at a
 * time against two tokens, so that arithmetic rather than loads sets the pace. Work is
 * split over rows.
 *
 * The int8 variant reads weights of one byte with one float scale per row (symmetric,
 * per output channel). With AVX2 and K a multiple of 32 it puts the activations in int16
 * (blocks of 32 with a scale each) and multiplies in integers, 16 pairs per instruction.
 * Otherwise it converts weights to float: in the same pass for one token, or each row once
 * into a per-thread buffer reused for every token.
 *
 * AVX2/FMA intrinsics where the compiler targets them (-march=native), else plain loops
 * that the compiler vectorizes.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include "vec.h"

/* Weight element kinds: the kernels below are written once and inlined per kind. */
enum { W_F32 = 0, W_BF16 = 1, W_I8 = 2 };
#define INLINE static inline __attribute__((always_inline))

INLINE float w_at(const void *w, int64_t k, int kind)
{
    return kind == W_F32 ? ((const float *)w)[k]
         : kind == W_BF16 ? bf16_to_f32(((const uint16_t *)w)[k])
                          : (float)((const int8_t *)w)[k];
}

#if defined(__AVX2__) && defined(__FMA__)
#define VF KVFLOW_VF

INLINE vf w_load(const void *w, int64_t k, int kind)
{
    return kind == W_F32 ? vf_load((const float *)w + k)
         : kind == W_BF16 ? vf_load_bf16((const uint16_t *)w + k)
                          : vf_load_i8((const int8_t *)w + k);
}

/* Σ w[k]·x[k], four independent accumulators. */
INLINE float dot1_kind(const void *w, const float *x, int64_t K, int kind)
{
    vf a0 = vf_zero(), a1 = a0, a2 = a0, a3 = a0;
    int64_t k = 0;
    for (; k + 4 * VF <= K; k += 4 * VF) {
        a0 = vf_fma(w_load(w, k, kind), vf_load(x + k), a0);
        a1 = vf_fma(w_load(w, k + VF, kind), vf_load(x + k + VF), a1);
        a2 = vf_fma(w_load(w, k + 2 * VF, kind), vf_load(x + k + 2 * VF), a2);
        a3 = vf_fma(w_load(w, k + 3 * VF, kind), vf_load(x + k + 3 * VF), a3);
    }
    for (; k + VF <= K; k += VF)
        a0 = vf_fma(w_load(w, k, kind), vf_load(x + k), a0);
    float sum = vf_sum(vf_add(vf_add(a0, a1), vf_add(a2, a3)));
    for (; k < K; ++k)
        sum += w_at(w, k, kind) * x[k];
    return sum;
}

/* One row against four tokens x[0..3] (rows `stride` apart): four sums. */
INLINE void dot4_kind(const void *w, const float *x, int64_t stride, int64_t K, float *sums,
                      int kind)
{
    const float *x0 = x, *x1 = x + stride, *x2 = x + 2 * stride, *x3 = x + 3 * stride;
    vf a0 = vf_zero(), a1 = a0, a2 = a0, a3 = a0;
    int64_t k = 0;
    for (; k + VF <= K; k += VF) {
        const vf wv = w_load(w, k, kind);
        a0 = vf_fma(wv, vf_load(x0 + k), a0);
        a1 = vf_fma(wv, vf_load(x1 + k), a1);
        a2 = vf_fma(wv, vf_load(x2 + k), a2);
        a3 = vf_fma(wv, vf_load(x3 + k), a3);
    }
    vf_sum4(a0, a1, a2, a3, sums);
    for (; k < K; ++k) {
        const float wk = w_at(w, k, kind);
        sums[0] += wk * x0[k], sums[1] += wk * x1[k];
        sums[2] += wk * x2[k], sums[3] += wk * x3[k];
    }
}

/* Six rows against two tokens: sums[r * 2 + j] = w_r · x_j (rows K apart, tokens `stride`
 * apart). Twelve accumulators: each activation vector loaded serves six rows and each
 * weight vector two tokens. The activations of all T tokens exceed L1 and come from L2
 * for every group of rows, the rows' own vectors stay in L1: two L2 loads per twelve FMAs
 * (three rows against four tokens took four; see kvflow_linear_f32 for the figures). */
static void dot6x2(const float *w, int64_t K, const float *x, int64_t stride, float *sums)
{
    vf acc[6][2];
    for (int r = 0; r < 6; ++r)
        acc[r][0] = acc[r][1] = vf_zero();
    int64_t k = 0;
    for (; k + VF <= K; k += VF) {
        const vf x0 = vf_load(x + k), x1 = vf_load(x + stride + k);
        for (int r = 0; r < 6; ++r) {
            const vf wv = vf_load(w + r * K + k);
            acc[r][0] = vf_fma(wv, x0, acc[r][0]);
            acc[r][1] = vf_fma(wv, x1, acc[r][1]);
        }
    }
    for (int r = 0; r < 6; r += 2)  /* rows r and r + 1: four consecutive sums */
        vf_sum4(acc[r][0], acc[r][1], acc[r + 1][0], acc[r + 1][1], sums + r * 2);
    for (int r = 0; r < 6; ++r)
        for (int64_t kk = k; kk < K; ++kk)
            for (int j = 0; j < 2; ++j)
                sums[r * 2 + j] += w[r * K + kk] * x[j * stride + kk];
}

/* dot1_kind for float32 rows, as a call (the odd token of a tile loop). */
static float dot1_f32(const float *w, const float *x, int64_t K)
{
    return dot1_kind(w, x, K, W_F32);
}

/* Six rows w6 (float, K apart) against every token, into columns n..n+5 of out (inlined
 * into each caller's parallel loop, the float32 and the bfloat16 one). */
INLINE void rows6_times_tokens(const float *w6, const float *x, const float *bias, float *out,
                               int64_t T, int64_t N, int64_t K, int64_t n)
{
    float sums[12];
    int64_t t = 0;
    for (; t + 2 <= T; t += 2) {
        dot6x2(w6, K, x + t * K, K, sums);
        for (int r = 0; r < 6; ++r)
            for (int j = 0; j < 2; ++j)
                out[(t + j) * N + n + r] = sums[r * 2 + j] + (bias ? bias[n + r] : 0.f);
    }
    for (; t < T; ++t)
        for (int r = 0; r < 6; ++r)
            out[t * N + n + r] = dot1_f32(w6 + r * K, x + t * K, K) + (bias ? bias[n + r] : 0.f);
}

#else /* portable */

INLINE float dot1_kind(const void *w, const float *x, int64_t K, int kind)
{
    float sum = 0.f;
#pragma omp simd reduction(+ : sum)
    for (int64_t k = 0; k < K; ++k)
        sum += w_at(w, k, kind) * x[k];
    return sum;
}

INLINE void dot4_kind(const void *w, const float *x, int64_t stride, int64_t K, float *sums,
                      int kind)
{
    const float *x0 = x, *x1 = x + stride, *x2 = x + 2 * stride, *x3 = x + 3 * stride;
    float a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f;
#pragma omp simd reduction(+ : a0, a1, a2, a3)
    for (int64_t k = 0; k < K; ++k) {
        const float wk = w_at(w, k, kind);
        a0 += wk * x0[k], a1 += wk * x1[k];
        a2 += wk * x2[k], a3 += wk * x3[k];
    }
    sums[0] = a0, sums[1] = a1, sums[2] = a2, sums[3] = a3;
}

#endif

/* One weight row (of `kind`) against every token; results scaled, biased, stored in
 * column n. */
INLINE void row_times_tokens(const void *w, const float *x, float *out, int64_t T, int64_t N,
                             int64_t K, int64_t n, float scale, float bias, int kind)
{
    float sums[4];
    int64_t t = 0;
    for (; t + 4 <= T; t += 4) {
        dot4_kind(w, x + t * K, K, K, sums, kind);
        for (int j = 0; j < 4; ++j)
            out[(t + j) * N + n] = sums[j] * scale + bias;
    }
    for (; t < T; ++t)
        out[t * N + n] = dot1_kind(w, x + t * K, K, kind) * scale + bias;
}

/* From this many tokens on, rows go six at a time (dot6x2): 8-22% faster at 8-64 tokens
 * than three rows against four tokens, which beat one row at a time; level with oneDNN at
 * 64 tokens and ahead below (BENCHMARKS.md). Under 8 tokens the weights' bandwidth sets
 * the pace and the one-row code runs level with the tiles. */
#define TILE_MIN_TOKENS 8

void kvflow_linear_f32(const float *x, const float *w, const float *bias, float *out,
                       int64_t T, int64_t N, int64_t K, int num_threads)
{
#if defined(__AVX2__) && defined(__FMA__)
    if (T >= TILE_MIN_TOKENS) {
        const int64_t groups = N / 6;
#pragma omp parallel num_threads(num_threads)
        {
#pragma omp for schedule(static)
            for (int64_t g = 0; g < groups; ++g)
                rows6_times_tokens(w + 6 * g * K, x, bias, out, T, N, K, 6 * g);
#pragma omp for schedule(static)
            for (int64_t n = 6 * groups; n < N; ++n)
                row_times_tokens(w + n * K, x, out, T, N, K, n, 1.f, bias ? bias[n] : 0.f,
                                 W_F32);
        }
        return;
    }
#endif
#pragma omp parallel for schedule(static) num_threads(num_threads)
    for (int64_t n = 0; n < N; ++n)
        row_times_tokens(w + n * K, x, out, T, N, K, n, 1.f, bias ? bias[n] : 0.f, W_F32);
}

/* bfloat16 weights (float32 activations and sums): half the bytes of float32 per weight,
 * which is what a decode step's GEMV waits on. Up to TILE_MIN_TOKENS tokens each row is
 * widened as it is read; from there on a thread widens six rows at a time into a buffer
 * (L1/L2) and runs the float32 tile on it, so the conversion is paid once per row, not
 * once per token pair. Returns nonzero when a buffer could not be allocated. */
int kvflow_linear_bf16(const float *x, const uint16_t *w, const float *bias, float *out,
                       int64_t T, int64_t N, int64_t K, int num_threads)
{
    int failed = 0;
#if defined(__AVX2__) && defined(__FMA__)
    if (T >= TILE_MIN_TOKENS) {
        const int64_t groups = N / 6;
#pragma omp parallel num_threads(num_threads)
        {
            float *rows = malloc((size_t)(6 * K) * sizeof(float));
            if (rows == NULL) {
#pragma omp atomic write
                failed = 1;
            }
#pragma omp for schedule(static)
            for (int64_t g = 0; g < groups; ++g) {
                if (rows == NULL)
                    continue;
                const uint16_t *src = w + 6 * g * K;
                int64_t k = 0;
                for (; k + 8 <= 6 * K; k += 8)
                    _mm256_storeu_ps(rows + k, load8_bf16(src + k));
                for (; k < 6 * K; ++k)
                    rows[k] = bf16_to_f32(src[k]);
                rows6_times_tokens(rows, x, bias, out, T, N, K, 6 * g);
            }
#pragma omp for schedule(static)
            for (int64_t n = 6 * groups; n < N; ++n)
                row_times_tokens(w + n * K, x, out, T, N, K, n, 1.f, bias ? bias[n] : 0.f,
                                 W_BF16);
            free(rows);
        }
        return failed;
    }
#endif
#pragma omp parallel for schedule(static) num_threads(num_threads)
    for (int64_t n = 0; n < N; ++n)
        row_times_tokens(w + n * K, x, out, T, N, K, n, 1.f, bias ? bias[n] : 0.f, W_BF16);
    return failed;
}

#if defined(__AVX2__) && defined(__FMA__)
#define QBLOCK 32

/* Activations to int16 in blocks of 32, one float scale each (xd [T, K / 32]): the block's
 * largest |x| maps to 32767, so the rounding error (~2e-5 of it) stays far below the int8
 * weights' own; int8 activations (llama.cpp's q8_0 scheme) cost this model ~1.5% perplexity. */
static void quantize_blocks(const float *x, int16_t *xq, float *xd, int64_t T, int64_t K)
{
    for (int64_t b = 0; b < T * K / QBLOCK; ++b) {
        const float *src = x + b * QBLOCK;
        float amax = 0.f;
        for (int i = 0; i < QBLOCK; ++i)
            amax = fmaxf(amax, fabsf(src[i]));
        const float inv = amax > 0.f ? 32767.f / amax : 0.f;
        xd[b] = amax / 32767.f;
        for (int i = 0; i < QBLOCK; ++i)
            xq[b * QBLOCK + i] = (int16_t)nearbyintf(src[i] * inv);
    }
}

#if KVFLOW_VF == 16
/* The 16 partial sums (as floats) of one block's 32 products int8 w · int16 x: one
 * pairwise multiply-add (AVX512-VNNI's dpwssd where the build has it, else AVX512BW's
 * madd; 2 · 127 · 32767 fits in 32 bits). */
static inline vf block_products(const int8_t *w, const int16_t *xq)
{
    const __m512i w16 = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)w));
    const __m512i x16 = _mm512_loadu_si512((const void *)xq);
#if defined(__AVX512VNNI__)
    return _mm512_cvtepi32_ps(_mm512_dpwssd_epi32(_mm512_setzero_si512(), w16, x16));
#else
    return _mm512_cvtepi32_ps(_mm512_madd_epi16(w16, x16));
#endif
}
static inline vf vf_set1(float v) { return _mm512_set1_ps(v); }
#else
/* The 8 partial sums (as floats) of one block's 32 products int8 w · int16 x, by madd
 * (pairs of 16-bit products into 32 bits: 2 · 127 · 32767 fits). */
static inline vf block_products(const int8_t *w, const int16_t *xq)
{
    const __m256i w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)w));
    const __m256i w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(w + 16)));
    const __m256i p = _mm256_add_epi32(
        _mm256_madd_epi16(w0, _mm256_loadu_si256((const __m256i *)xq)),
        _mm256_madd_epi16(w1, _mm256_loadu_si256((const __m256i *)(xq + 16))));
    return _mm256_cvtepi32_ps(p);
}
static inline vf vf_set1(float v) { return _mm256_set1_ps(v); }
#endif

/* Σ over blocks of xd[b] · (int8 w · int16 x), two accumulators. */
static float dot_q(const int8_t *w, const int16_t *xq, const float *xd, int64_t nblocks)
{
    vf acc0 = vf_zero(), acc1 = acc0;
    int64_t b = 0;
    for (; b + 2 <= nblocks; b += 2) {
        acc0 = vf_fma(block_products(w + b * QBLOCK, xq + b * QBLOCK), vf_set1(xd[b]), acc0);
        acc1 = vf_fma(block_products(w + (b + 1) * QBLOCK, xq + (b + 1) * QBLOCK),
                      vf_set1(xd[b + 1]), acc1);
    }
    if (b < nblocks)
        acc0 = vf_fma(block_products(w + b * QBLOCK, xq + b * QBLOCK), vf_set1(xd[b]), acc0);
    return vf_sum(vf_add(acc0, acc1));
}

/* int8 weights times int16-quantized activations; K must be a multiple of 32. */
static int linear_q(const float *x, const int8_t *w, const float *scale, const float *bias,
                    float *out, int64_t T, int64_t N, int64_t K, int num_threads)
{
    const int64_t nblocks = K / QBLOCK;
    int16_t *xq = malloc((size_t)(T * K) * sizeof(int16_t));
    float *xd = malloc((size_t)(T * nblocks) * sizeof(float));
    if (xq == NULL || xd == NULL) {
        free(xq);
        free(xd);
        return 1;
    }
    quantize_blocks(x, xq, xd, T, K);
#pragma omp parallel for schedule(static) num_threads(num_threads)
    for (int64_t n = 0; n < N; ++n) {
        const int8_t *wr = w + n * K;
        const float b = bias ? bias[n] : 0.f;
        for (int64_t t = 0; t < T; ++t)
            out[t * N + n] = dot_q(wr, xq + t * K, xd + t * nblocks, nblocks) * scale[n] + b;
    }
    free(xq);
    free(xd);
    return 0;
}
#endif

/* Returns nonzero when a buffer could not be allocated. */
int kvflow_linear_i8(const float *x, const int8_t *w, const float *scale, const float *bias,
                     float *out, int64_t T, int64_t N, int64_t K, int num_threads)
{
#if defined(__AVX2__) && defined(__FMA__)
    if (K % QBLOCK == 0)
        return linear_q(x, w, scale, bias, out, T, N, K, num_threads);
#endif
    int failed = 0;
#pragma omp parallel num_threads(num_threads)
    {
        float *row = T > 1 ? malloc((size_t)K * sizeof(float)) : NULL;
        if (T > 1 && row == NULL) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int64_t n = 0; n < N; ++n) {
            const int8_t *wr = w + n * K;
            const float b = bias ? bias[n] : 0.f;
            if (T == 1) {
                out[n] = dot1_kind(wr, x, K, W_I8) * scale[n] + b;
            } else if (row != NULL) {
                for (int64_t k = 0; k < K; ++k)
                    row[k] = (float)wr[k];
                row_times_tokens(row, x, out, T, N, K, n, scale[n], b, W_F32);
            }
        }
        free(row);
    }
    return failed;
}
