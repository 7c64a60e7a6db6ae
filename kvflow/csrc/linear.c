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

#if defined(__AVX2__) && defined(__FMA__)
#include "vec.h"

static inline __m256 load8_i8(const int8_t *p)
{
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}

/* Σ w[k]·x[k], four independent accumulators. */
static float dot1(const float *w, const float *x, int64_t K)
{
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    int64_t k = 0;
    for (; k + 32 <= K; k += 32) {
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + k), _mm256_loadu_ps(x + k), a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(w + k + 8), _mm256_loadu_ps(x + k + 8), a1);
        a2 = _mm256_fmadd_ps(_mm256_loadu_ps(w + k + 16), _mm256_loadu_ps(x + k + 16), a2);
        a3 = _mm256_fmadd_ps(_mm256_loadu_ps(w + k + 24), _mm256_loadu_ps(x + k + 24), a3);
    }
    for (; k + 8 <= K; k += 8)
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + k), _mm256_loadu_ps(x + k), a0);
    float sum = hsum8(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
    for (; k < K; ++k)
        sum += w[k] * x[k];
    return sum;
}

/* One row against four tokens x[0..3] (rows `stride` apart): four sums. */
static void dot4(const float *w, const float *x, int64_t stride, int64_t K, float *sums)
{
    const float *x0 = x, *x1 = x + stride, *x2 = x + 2 * stride, *x3 = x + 3 * stride;
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) {
        const __m256 wv = _mm256_loadu_ps(w + k);
        a0 = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x0 + k), a0);
        a1 = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x1 + k), a1);
        a2 = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x2 + k), a2);
        a3 = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x3 + k), a3);
    }
    sums[0] = hsum8(a0), sums[1] = hsum8(a1), sums[2] = hsum8(a2), sums[3] = hsum8(a3);
    for (; k < K; ++k) {
        sums[0] += w[k] * x0[k], sums[1] += w[k] * x1[k];
        sums[2] += w[k] * x2[k], sums[3] += w[k] * x3[k];
    }
}

/* Six rows against two tokens: sums[r * 2 + j] = w_r · x_j (rows K apart, tokens `stride`
 * apart). Twelve accumulators: each activation vector loaded serves six rows and each
 * weight vector two tokens. The activations of all T tokens exceed L1 and come from L2
 * for every group of rows, the rows' own vectors stay in L1: two L2 loads per twelve FMAs
 * (three rows against four tokens took four; see kvflow_linear_f32 for the figures). */
static void dot6x2(const float *w, int64_t K, const float *x, int64_t stride, float *sums)
{
    __m256 acc[6][2];
    for (int r = 0; r < 6; ++r)
        acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) {
        const __m256 x0 = _mm256_loadu_ps(x + k), x1 = _mm256_loadu_ps(x + stride + k);
        for (int r = 0; r < 6; ++r) {
            const __m256 wv = _mm256_loadu_ps(w + r * K + k);
            acc[r][0] = _mm256_fmadd_ps(wv, x0, acc[r][0]);
            acc[r][1] = _mm256_fmadd_ps(wv, x1, acc[r][1]);
        }
    }
    for (int r = 0; r < 6; r += 2)  /* rows r and r + 1: four consecutive sums */
        _mm_storeu_ps(sums + r * 2, hsum8x4(acc[r][0], acc[r][1], acc[r + 1][0], acc[r + 1][1]));
    for (int r = 0; r < 6; ++r)
        for (int64_t kk = k; kk < K; ++kk)
            for (int j = 0; j < 2; ++j)
                sums[r * 2 + j] += w[r * K + kk] * x[j * stride + kk];
}

/* Rows n..n+5 against every token, into columns n..n+5 of out. */
static void rows6_times_tokens(const float *w, const float *x, const float *bias, float *out,
                               int64_t T, int64_t N, int64_t K, int64_t n)
{
    float sums[12];
    int64_t t = 0;
    for (; t + 2 <= T; t += 2) {
        dot6x2(w + n * K, K, x + t * K, K, sums);
        for (int r = 0; r < 6; ++r)
            for (int j = 0; j < 2; ++j)
                out[(t + j) * N + n + r] = sums[r * 2 + j] + (bias ? bias[n + r] : 0.f);
    }
    for (; t < T; ++t)
        for (int r = 0; r < 6; ++r)
            out[t * N + n + r] = dot1(w + (n + r) * K, x + t * K, K) + (bias ? bias[n + r] : 0.f);
}

/* Σ w[k]·x[k] with int8 weights converted on the fly. */
static float dot1_i8(const int8_t *w, const float *x, int64_t K)
{
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    int64_t k = 0;
    for (; k + 32 <= K; k += 32) {
        a0 = _mm256_fmadd_ps(load8_i8(w + k), _mm256_loadu_ps(x + k), a0);
        a1 = _mm256_fmadd_ps(load8_i8(w + k + 8), _mm256_loadu_ps(x + k + 8), a1);
        a2 = _mm256_fmadd_ps(load8_i8(w + k + 16), _mm256_loadu_ps(x + k + 16), a2);
        a3 = _mm256_fmadd_ps(load8_i8(w + k + 24), _mm256_loadu_ps(x + k + 24), a3);
    }
    for (; k + 8 <= K; k += 8)
        a0 = _mm256_fmadd_ps(load8_i8(w + k), _mm256_loadu_ps(x + k), a0);
    float sum = hsum8(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
    for (; k < K; ++k)
        sum += (float)w[k] * x[k];
    return sum;
}

#else /* portable */

static float dot1(const float *w, const float *x, int64_t K)
{
    float sum = 0.f;
#pragma omp simd reduction(+ : sum)
    for (int64_t k = 0; k < K; ++k)
        sum += w[k] * x[k];
    return sum;
}

static void dot4(const float *w, const float *x, int64_t stride, int64_t K, float *sums)
{
    const float *x0 = x, *x1 = x + stride, *x2 = x + 2 * stride, *x3 = x + 3 * stride;
    float a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f;
#pragma omp simd reduction(+ : a0, a1, a2, a3)
    for (int64_t k = 0; k < K; ++k) {
        a0 += w[k] * x0[k], a1 += w[k] * x1[k];
        a2 += w[k] * x2[k], a3 += w[k] * x3[k];
    }
    sums[0] = a0, sums[1] = a1, sums[2] = a2, sums[3] = a3;
}

static float dot1_i8(const int8_t *w, const float *x, int64_t K)
{
    float sum = 0.f;
#pragma omp simd reduction(+ : sum)
    for (int64_t k = 0; k < K; ++k)
        sum += (float)w[k] * x[k];
    return sum;
}

#endif

/* One weight row (float) against every token; results scaled, biased, stored in column n. */
static void row_times_tokens(const float *w, const float *x, float *out, int64_t T, int64_t N,
                             int64_t K, int64_t n, float scale, float bias)
{
    float sums[4];
    int64_t t = 0;
    for (; t + 4 <= T; t += 4) {
        dot4(w, x + t * K, K, K, sums);
        for (int j = 0; j < 4; ++j)
            out[(t + j) * N + n] = sums[j] * scale + bias;
    }
    for (; t < T; ++t)
        out[t * N + n] = dot1(w, x + t * K, K) * scale + bias;
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
                rows6_times_tokens(w, x, bias, out, T, N, K, 6 * g);
#pragma omp for schedule(static)
            for (int64_t n = 6 * groups; n < N; ++n)
                row_times_tokens(w + n * K, x, out, T, N, K, n, 1.f, bias ? bias[n] : 0.f);
        }
        return;
    }
#endif
#pragma omp parallel for schedule(static) num_threads(num_threads)
    for (int64_t n = 0; n < N; ++n)
        row_times_tokens(w + n * K, x, out, T, N, K, n, 1.f, bias ? bias[n] : 0.f);
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

/* The 8 partial sums (as floats) of one block's 32 products int8 w · int16 x, by madd
 * (pairs of 16-bit products into 32 bits: 2 · 127 · 32767 fits). */
static inline __m256 block_products(const int8_t *w, const int16_t *xq)
{
    const __m256i w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)w));
    const __m256i w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(w + 16)));
    const __m256i p = _mm256_add_epi32(
        _mm256_madd_epi16(w0, _mm256_loadu_si256((const __m256i *)xq)),
        _mm256_madd_epi16(w1, _mm256_loadu_si256((const __m256i *)(xq + 16))));
    return _mm256_cvtepi32_ps(p);
}

/* Σ over blocks of xd[b] · (int8 w · int16 x), two accumulators. */
static float dot_q(const int8_t *w, const int16_t *xq, const float *xd, int64_t nblocks)
{
    __m256 acc0 = _mm256_setzero_ps(), acc1 = acc0;
    int64_t b = 0;
    for (; b + 2 <= nblocks; b += 2) {
        acc0 = _mm256_fmadd_ps(block_products(w + b * QBLOCK, xq + b * QBLOCK),
                               _mm256_set1_ps(xd[b]), acc0);
        acc1 = _mm256_fmadd_ps(block_products(w + (b + 1) * QBLOCK, xq + (b + 1) * QBLOCK),
                               _mm256_set1_ps(xd[b + 1]), acc1);
    }
    if (b < nblocks)
        acc0 = _mm256_fmadd_ps(block_products(w + b * QBLOCK, xq + b * QBLOCK),
                               _mm256_set1_ps(xd[b]), acc0);
    return hsum8(_mm256_add_ps(acc0, acc1));
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
                out[n] = dot1_i8(wr, x, K) * scale[n] + b;
            } else if (row != NULL) {
                for (int64_t k = 0; k < K; ++k)
                    row[k] = (float)wr[k];
                row_times_tokens(row, x, out, T, N, K, n, scale[n], b);
            }
        }
        free(row);
    }
    return failed;
}
