/* The batched LoRA op on the CPU (Punica's BGMV idea): one call adds every token's own
 * adapter to a projection's output, for a step whose tokens use different adapters.
 *
 *   out[t, sub i columns] += (x[t] · A[s]ᵀ)[i R .. i R + R] · B[s, sub i rows]ᵀ,  s = slot[t]
 *
 * Adapter weights sit in preallocated slots: A [S, n_sub R, K] (the shrink, the fused
 * projection's sub-projections stacked: q, k, v or gate, up) and B [S, N, R] (the expand,
 * scale folded in; the rows of sub i read columns 0..R-1 against h[i R ..]). Ranks below R
 * are zero-padded. Tokens with slot -1 run the base model only.
 *
 * Tokens are grouped by slot (a counting sort) so each adapter's rows are read once per
 * call and serve all of its tokens; the shrink splits over A's rows, the expand over B's.
 */
#include <stdint.h>
#include <stdlib.h>

#if defined(__AVX2__) && defined(__FMA__)
#include "vec.h"
#endif

static float dot(const float *a, const float *b, int64_t n)
{
#if defined(__AVX2__) && defined(__FMA__)
    __m256 acc0 = _mm256_setzero_ps(), acc1 = acc0;
    int64_t k = 0;
    for (; k + 16 <= n; k += 16) {
        acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + k), _mm256_loadu_ps(b + k), acc0);
        acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + k + 8), _mm256_loadu_ps(b + k + 8), acc1);
    }
    for (; k + 8 <= n; k += 8)
        acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + k), _mm256_loadu_ps(b + k), acc0);
    float sum = hsum8(_mm256_add_ps(acc0, acc1));
#else
    float sum = 0.f;
    int64_t k = 0;
#endif
    for (; k < n; ++k)
        sum += a[k] * b[k];
    return sum;
}

/* out rows are out_stride floats apart (a fused qkv output read in place); x is [T, K].
 * sub_sizes[n_sub] are the output widths of the sub-projections, in column order.
 * Returns nonzero when its buffers could not be allocated. */
int kvflow_lora_add(float *out, int64_t out_stride, const float *x, int64_t T, int64_t K,
                    const int64_t *slot_of_token, const float *A, const float *B,
                    int64_t num_slots, int64_t R, int64_t n_sub, const int64_t *sub_sizes,
                    int num_threads)
{
    int64_t N = 0;
    for (int64_t i = 0; i < n_sub; ++i)
        N += sub_sizes[i];
    const int64_t H = n_sub * R; /* shrink width */
    int64_t *order = malloc((size_t)T * sizeof(int64_t));
    int64_t *start = calloc((size_t)num_slots + 1, sizeof(int64_t));
    float *h = malloc((size_t)(T * H) * sizeof(float));
    if (!order || !start || !h) {
        free(order), free(start), free(h);
        return 1;
    }
    for (int64_t t = 0; t < T; ++t) /* counting sort of the tokens by slot */
        if (slot_of_token[t] >= 0 && slot_of_token[t] < num_slots)
            ++start[slot_of_token[t] + 1];
    for (int64_t s = 0; s < num_slots; ++s)
        start[s + 1] += start[s];
    {
        int64_t *next = malloc((size_t)num_slots * sizeof(int64_t) + 1);
        if (!next) {
            free(order), free(start), free(h);
            return 1;
        }
        for (int64_t s = 0; s < num_slots; ++s)
            next[s] = start[s];
        for (int64_t t = 0; t < T; ++t)
            if (slot_of_token[t] >= 0 && slot_of_token[t] < num_slots)
                order[next[slot_of_token[t]]++] = t;
        free(next);
    }
    /* The slots in use, so each phase is one flat loop over (slot, row): two barriers per
     * call whatever the number of adapters (a barrier per slot cost much more than the
     * arithmetic whenever a thread was descheduled). */
    int64_t *used = malloc((size_t)num_slots * sizeof(int64_t) + 1), num_used = 0;
    if (!used) {
        free(order), free(start), free(h);
        return 1;
    }
    for (int64_t s = 0; s < num_slots; ++s)
        if (start[s + 1] > start[s])
            used[num_used++] = s;
    /* h[j] belongs to token order[j]: the shrink of each token against its slot's A. */
#pragma omp parallel num_threads(num_threads)
    {
#pragma omp for schedule(static)
        for (int64_t item = 0; item < num_used * H; ++item) {
            const int64_t s = used[item / H], r = item % H;
            const float *a = A + (s * H + r) * K;
            for (int64_t j = start[s]; j < start[s + 1]; ++j)
                h[j * H + r] = dot(a, x + order[j] * K, K);
        }
        /* (the loop's implicit barrier: every h is ready) */
#pragma omp for schedule(static)
        for (int64_t item = 0; item < num_used * N; ++item) {
            const int64_t s = used[item / N], n = item % N;
            int64_t sub = 0, edge = sub_sizes[0];
            while (n >= edge) /* which sub-projection column n belongs to */
                edge += sub_sizes[++sub];
            const float *b = B + (s * N + n) * R;
            for (int64_t j = start[s]; j < start[s + 1]; ++j)
                out[order[j] * out_stride + n] += dot(b, h + j * H + sub * R, R);
        }
    }
    free(order), free(start), free(h), free(used);
    return 0;
}
