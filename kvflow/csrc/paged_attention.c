/* Decode attention over the paged KV cache on the CPU: one query token per request.
 *
 * The torch path must first gather every request's blocks into a padded copy; this kernel
 * reads each cached K/V row once, in place, and never touches a slot past a request's
 * length, so its cost is the bandwidth of the live KV cache itself.
 *
 * Layouts (float32, contiguous):
 *   query, out     [num_decodes, num_heads, head_dim]
 *   key/value      [num_blocks, block_size, num_kv_heads, head_dim]  (one layer's cache)
 *   block_tables   [num_decodes, table_width]  block ids, int64
 *   seq_lens       [num_decodes]               context length including the new token
 *
 * Work is split over requests (dynamic schedule, as lengths differ). A task reads its
 * blocks front to back, each token's K (then V) row for all KV heads contiguous, which keeps
 * the hardware prefetcher streaming; a split by KV head instead strided through memory and
 * ran at a tenth of the bandwidth. Each K/V row serves its whole group of query heads
 * (grouped-query attention). Softmax is exact: all scores first, then max, exp and sum,
 * then the weighted sum of V.
 *
 * With AVX2 and head_dim a multiple of 8 the loops are written out so that the arithmetic
 * keeps up with memory: scores four tokens at a time (four independent accumulators, one
 * horizontal reduction for all four), exp eight scores at a time, and each head's output
 * held in registers while V streams past (no load and store of the output per token).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "vec.h"

/* Where token t's K (or V) row of one layer starts: [num_kv_heads * head_dim] floats. */
static inline const float *row_of(const float *cache, const int64_t *table, int64_t t,
                                  int64_t block_size, int64_t block_stride, int64_t token_stride)
{
    return cache + table[t / block_size] * block_stride + (t % block_size) * token_stride;
}

/* scores[h * len + t] = scale * q_h · k_t for every head and context token. */
static void scores_of(const float *q, const float *key_cache, const int64_t *table, int64_t len,
                      int64_t block_size, int64_t num_heads, int64_t group, int64_t head_dim,
                      int64_t token_stride, float scale, float *scores)
{
    const int64_t block_stride = block_size * token_stride;
    int64_t t = 0;
#if defined(__AVX2__) && defined(__FMA__)
    if (head_dim % 8 == 0) {
        for (; t + 4 <= len; t += 4) {
            const float *k0 = row_of(key_cache, table, t, block_size, block_stride, token_stride);
            const float *k1 = row_of(key_cache, table, t + 1, block_size, block_stride, token_stride);
            const float *k2 = row_of(key_cache, table, t + 2, block_size, block_stride, token_stride);
            const float *k3 = row_of(key_cache, table, t + 3, block_size, block_stride, token_stride);
            for (int64_t h = 0; h < num_heads; ++h) {
                const int64_t off = (h / group) * head_dim;
                const float *qh = q + h * head_dim;
                __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
                for (int64_t i = 0; i < head_dim; i += 8) {
                    const __m256 qv = _mm256_loadu_ps(qh + i);
                    a0 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k0 + off + i), a0);
                    a1 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k1 + off + i), a1);
                    a2 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k2 + off + i), a2);
                    a3 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k3 + off + i), a3);
                }
                _mm_storeu_ps(scores + h * len + t,
                              _mm_mul_ps(hsum8x4(a0, a1, a2, a3), _mm_set1_ps(scale)));
            }
        }
    }
#endif
    for (; t < len; ++t) {
        const float *k_row = row_of(key_cache, table, t, block_size, block_stride, token_stride);
        for (int64_t h = 0; h < num_heads; ++h) {
            const float *k = k_row + (h / group) * head_dim;
            const float *qh = q + h * head_dim;
            float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
            for (int64_t i = 0; i < head_dim; ++i)
                dot += qh[i] * k[i];
            scores[h * len + t] = dot * scale;
        }
    }
}

/* s[0..len) = softmax(s[0..len)), exact: max, exp of the differences, sum, scale. */
static void softmax_in_place(float *s, int64_t len)
{
    float peak = -INFINITY, total = 0.0f;
    for (int64_t t = 0; t < len; ++t)
        peak = s[t] > peak ? s[t] : peak;
    int64_t t = 0;
#if defined(__AVX2__) && defined(__FMA__)
    __m256 sum8 = _mm256_setzero_ps();
    const __m256 peak8 = _mm256_set1_ps(peak);
    for (; t + 8 <= len; t += 8) {
        const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + t), peak8));
        _mm256_storeu_ps(s + t, e);
        sum8 = _mm256_add_ps(sum8, e);
    }
    total = hsum8(sum8);
#endif
    for (; t < len; ++t) {
        s[t] = expf(s[t] - peak);
        total += s[t];
    }
    const float inverse = 1.0f / total;
    for (t = 0; t < len; ++t)
        s[t] *= inverse;
}

/* o_h = Σ_t p[h, t] v_t (o zeroed by the caller for the portable loop). */
static void weighted_values(const float *probs, const float *value_cache, const int64_t *table,
                            int64_t len, int64_t block_size, int64_t num_heads, int64_t group,
                            int64_t head_dim, int64_t token_stride, float *o)
{
    const int64_t block_stride = block_size * token_stride;
#if defined(__AVX2__) && defined(__FMA__)
    if (head_dim % 8 == 0) {
        /* Per head and slice of up to 64 dimensions: eight accumulators stay in registers. */
        for (int64_t h = 0; h < num_heads; ++h) {
            const int64_t off = (h / group) * head_dim;
            const float *p = probs + h * len;
            for (int64_t i0 = 0; i0 < head_dim; i0 += 64) {
                const int64_t width = head_dim - i0 < 64 ? head_dim - i0 : 64;
                __m256 acc[8];
                for (int j = 0; j < 8; ++j)
                    acc[j] = _mm256_setzero_ps();
                for (int64_t t = 0; t < len; ++t) {
                    const float *v = row_of(value_cache, table, t, block_size, block_stride,
                                            token_stride) + off + i0;
                    const __m256 w = _mm256_broadcast_ss(p + t);
                    for (int64_t j = 0; j < width / 8; ++j)
                        acc[j] = _mm256_fmadd_ps(w, _mm256_loadu_ps(v + 8 * j), acc[j]);
                }
                for (int64_t j = 0; j < width / 8; ++j)
                    _mm256_storeu_ps(o + h * head_dim + i0 + 8 * j, acc[j]);
            }
        }
        return;
    }
#endif
    for (int64_t t = 0; t < len; ++t) {
        const float *v_row = row_of(value_cache, table, t, block_size, block_stride, token_stride);
        for (int64_t h = 0; h < num_heads; ++h) {
            const float *v = v_row + (h / group) * head_dim;
            const float w = probs[h * len + t];
            float *oh = o + h * head_dim;
#pragma omp simd
            for (int64_t i = 0; i < head_dim; ++i)
                oh[i] += w * v[i];
        }
    }
}

int kvflow_paged_decode_attention(
    const float *query, const float *key_cache, const float *value_cache,
    const int64_t *block_tables, const int64_t *seq_lens, float *out,
    int64_t num_decodes, int64_t table_width, int64_t block_size,
    int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, float scale, int num_threads)
{
    const int64_t group = num_heads / num_kv_heads;
    const int64_t token_stride = num_kv_heads * head_dim;
    int failed = 0;

#pragma omp parallel for schedule(dynamic, 1) num_threads(num_threads)
    for (int64_t d = 0; d < num_decodes; ++d) {
        const int64_t len = seq_lens[d];
        const int64_t *table = block_tables + d * table_width;
        const float *q = query + d * num_heads * head_dim; /* [H, hd] */
        float *o = out + d * num_heads * head_dim;         /* [H, hd] */
        float *scores = malloc(sizeof(float) * (size_t)(num_heads * len)); /* [H, len] */
        if (scores == NULL) {
            failed = 1;
            continue;
        }
        scores_of(q, key_cache, table, len, block_size, num_heads, group, head_dim,
                  token_stride, scale, scores);
        for (int64_t h = 0; h < num_heads; ++h)
            softmax_in_place(scores + h * len, len);
        memset(o, 0, sizeof(float) * (size_t)(num_heads * head_dim));
        weighted_values(scores, value_cache, table, len, block_size, num_heads, group, head_dim,
                        token_stride, o);
        free(scores);
    }
    return failed ? -1 : 0;
}
