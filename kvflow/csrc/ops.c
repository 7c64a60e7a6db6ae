/* The small per-token operations of a decoder layer, fused, for the CPU float32 path.
 *
 * In eager PyTorch, RMSNorm, rotary embedding, the KV cache write and SiLU-and-multiply
 * are some forty tensor operations per layer, each costing microseconds of dispatch
 * however few tokens there are: at one decode token they took more time than the
 * layer's arithmetic. Each function below is one call instead. Work is split over tokens.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "vec.h"

/* out = rms_norm(x) * weight, rows of H. With a residual: residual += x first, and the sum
 * is normalized (the residual stream of the next sub-layer). Matches the float32 reference:
 * x * rsqrt(mean(x^2) + eps) * weight. */
void kvflow_rms_norm(const float *x, float *residual, const float *weight, float *out,
                     int64_t T, int64_t H, float eps, int num_threads)
{
#pragma omp parallel for schedule(static) num_threads(num_threads) if (T > 1)
    for (int64_t t = 0; t < T; ++t) {
        const float *xt = x + t * H;
        float *src = (float *)xt;
        if (residual) {
            src = residual + t * H;
#pragma omp simd
            for (int64_t i = 0; i < H; ++i)
                src[i] += xt[i];
        }
        float squares = 0.f;
#pragma omp simd reduction(+ : squares)
        for (int64_t i = 0; i < H; ++i)
            squares += src[i] * src[i];
        const float inv = 1.f / sqrtf(squares / (float)H + eps);
        float *o = out + t * H;
#pragma omp simd
        for (int64_t i = 0; i < H; ++i)
            o[i] = weight[i] * (src[i] * inv);
    }
}

#define INLINE static inline __attribute__((always_inline))

/* Element i of a row of float32 or bfloat16, and its store (rounded to nearest even). */
INLINE float load_at(const void *row, int64_t i, int bf16)
{
    return bf16 ? bf16_to_f32(((const uint16_t *)row)[i]) : ((const float *)row)[i];
}

INLINE void store_at(void *row, int64_t i, float v, int bf16)
{
    if (bf16)
        ((uint16_t *)row)[i] = f32_to_bf16(v);
    else
        ((float *)row)[i] = v;
}

/* Half-split (GPT-NeoX) rotation of one head in place: (x1, x2) -> (x1 c - x2 s, x2 c + x1 s),
 * computed in float32 whatever the element type. */
INLINE void rotate(void *x, const float *cos, const float *sin, int64_t half, int bf16)
{
#pragma omp simd
    for (int64_t i = 0; i < half; ++i) {
        const float x1 = load_at(x, i, bf16), x2 = load_at(x, i + half, bf16);
        store_at(x, i, x1 * cos[i] - x2 * sin[i], bf16);
        store_at(x, i + half, x2 * cos[i + half] + x1 * sin[i + half], bf16);
    }
}

/* A row of n elements into a cache row, converted where the element types differ. */
INLINE void copy_row(void *dst, const void *src, int64_t n, int src_bf16, int dst_bf16)
{
    if (src_bf16 == dst_bf16) {
        memcpy(dst, src, (size_t)n * (src_bf16 ? 2 : 4));
        return;
    }
    for (int64_t i = 0; i < n; ++i)
        store_at(dst, i, load_at(src, i, src_bf16), dst_bf16);
}

/* Token t's rotation and cache write; inlined into each parallel loop below with the
 * element types as literals (flags passed into an OpenMP region are variables there). */
INLINE void rotate_and_store(int64_t t, void *qkv, int64_t row_stride, const float *cos,
                             const float *sin, void *key_cache, void *value_cache,
                             const int64_t *slots, int64_t H, int64_t KvH, int64_t hd,
                             const int qkv_bf16, const int cache_bf16)
{
    const int64_t half = hd / 2, kv = KvH * hd;
    const int64_t qe = qkv_bf16 ? 2 : 4, ce = cache_bf16 ? 2 : 4; /* element sizes */
    char *q = (char *)qkv + t * row_stride * qe, *k = q + H * hd * qe, *v = k + kv * qe;
    const float *c = cos + t * hd, *s = sin + t * hd;
    for (int64_t h = 0; h < H; ++h)
        rotate(q + h * hd * qe, c, s, half, qkv_bf16);
    for (int64_t h = 0; h < KvH; ++h)
        rotate(k + h * hd * qe, c, s, half, qkv_bf16);
    copy_row((char *)key_cache + slots[t] * kv * ce, k, kv, qkv_bf16, cache_bf16);
    copy_row((char *)value_cache + slots[t] * kv * ce, v, kv, qkv_bf16, cache_bf16);
}

#define ROTARY_LOOP(QKV_BF16, CACHE_BF16)                                                   \
    _Pragma("omp parallel for schedule(static) num_threads(num_threads) if (T > 1)")       \
    for (int64_t t = 0; t < T; ++t)                                                         \
        rotate_and_store(t, qkv, row_stride, cos, sin, key_cache, value_cache, slots, H,     \
                         KvH, hd, QKV_BF16, CACHE_BF16)

/* Rotate the q and k heads of each token's fused qkv row [q (H*hd) | k (KvH*hd) | v] in
 * place by its cos/sin row [hd] (float32), then store k and v in the cache slot
 * `slots[t]` (key/value caches [num_slots, KvH, hd]). qkv rows are `row_stride` elements
 * apart. qkv_bf16 / cache_bf16: those hold bfloat16, else float32 (a float32 qkv into a
 * bfloat16 cache is the decode layer's case). */
void kvflow_rotary_cache_write(void *qkv, int64_t row_stride, const float *cos,
                               const float *sin, void *key_cache, void *value_cache,
                               const int64_t *slots, int64_t T, int64_t H, int64_t KvH,
                               int64_t hd, int qkv_bf16, int cache_bf16, int num_threads)
{
    if (!qkv_bf16 && !cache_bf16)
        ROTARY_LOOP(0, 0);
    else if (!qkv_bf16)
        ROTARY_LOOP(0, 1);
    else
        ROTARY_LOOP(1, 1);
}


static void silu_mul_row(const float *g, const float *u, float *o, int64_t n)
{
    int64_t i = 0;
#if defined(__AVX2__) && defined(__FMA__)
    const __m256 one = _mm256_set1_ps(1.f);
    for (; i + 8 <= n; i += 8) {
        const __m256 gv = _mm256_loadu_ps(g + i);
        const __m256 e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), gv));
        const __m256 silu = _mm256_div_ps(gv, _mm256_add_ps(one, e));
        _mm256_storeu_ps(o + i, _mm256_mul_ps(silu, _mm256_loadu_ps(u + i)));
    }
#endif
    for (; i < n; ++i)
        o[i] = g[i] / (1.f + expf(-g[i])) * u[i];
}

/* out[t, i] = silu(gate[t, i]) * up[t, i] over rows [gate (I) | up (I)]. */
void kvflow_silu_mul(const float *gate_up, float *out, int64_t T, int64_t I, int num_threads)
{
#pragma omp parallel for schedule(static) num_threads(num_threads) if (T * I > 8192)
    for (int64_t t = 0; t < T; ++t)
        silu_mul_row(gate_up + t * 2 * I, gate_up + t * 2 * I + I, out + t * I, I);
}
