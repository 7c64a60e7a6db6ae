/* The batched LoRA op on the CPU (Punica's BGMV idea): one call adds every token's own
 * adapter to a projection's output, for a step whose tokens use different adapters.
 *
 *   h       = x[t] · A[s]ᵀ                                    shrink: [n_sub R] per token
 *   out[t] += h[i R .. i R + R] · Bᵀ[s][i R .. i R + R, part i]  expand, for each part i
 *
 * with s = slot[t]. Adapter weights sit in preallocated slots: A [S, n_sub R, K] (the parts
 * of a fused projection stacked: q, k, v or gate, up) and Bᵀ [S, n_sub R, N] (rank-major,
 * scale folded in, block-diagonal: part i's rows feed only its columns off_i .. off_i + N_i,
 * and only those blocks are read here). Ranks below R are zero-padded. Tokens with slot -1
 * run the base model only.
 *
 * Tokens are grouped by slot (a counting sort) and taken four at a time, each four within
 * one slot. For four tokens: the shrink against every row of A (the tokens in L1, A in L2),
 * then the expand over 64 output columns at a time, accumulating the R rank-1 updates of
 * each token in registers (no horizontal sums; each output row is written front to back,
 * which the prefetcher follows). One parallel loop over the groups of four, no barrier
 * inside; a group's weights come from L2, shared with the next group of its slot.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AVX2__) && defined(__FMA__)
#include "vec.h"
#endif

#define COLS 64 /* expand block width */

/* sums[j] = a · x_j for four tokens x_0..x_3 of length K. */
static void dot_x4(const float *a, const float *const *x, int64_t K, float *sums)
{
    int64_t k = 0;
#if defined(__AVX2__) && defined(__FMA__)
    __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
    for (; k + 8 <= K; k += 8) {
        const __m256 av = _mm256_loadu_ps(a + k);
        s0 = _mm256_fmadd_ps(av, _mm256_loadu_ps(x[0] + k), s0);
        s1 = _mm256_fmadd_ps(av, _mm256_loadu_ps(x[1] + k), s1);
        s2 = _mm256_fmadd_ps(av, _mm256_loadu_ps(x[2] + k), s2);
        s3 = _mm256_fmadd_ps(av, _mm256_loadu_ps(x[3] + k), s3);
    }
    _mm_storeu_ps(sums, hsum8x4(s0, s1, s2, s3));
#else
    sums[0] = sums[1] = sums[2] = sums[3] = 0.f;
#endif
    for (; k < K; ++k)
        for (int j = 0; j < 4; ++j)
            sums[j] += a[k] * x[j][k];
}

static float dot(const float *a, const float *b, int64_t n)
{
    float sum = 0.f;
    int64_t k = 0;
#if defined(__AVX2__) && defined(__FMA__)
    __m256 acc = _mm256_setzero_ps();
    for (; k + 8 <= n; k += 8)
        acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + k), _mm256_loadu_ps(b + k), acc);
    sum = hsum8(acc);
#endif
    for (; k < n; ++k)
        sum += a[k] * b[k];
    return sum;
}

/* o[0..len) += Σ_r h[r] · bt[r * N + 0..len), len <= COLS. */
static void expand_block(float *o, const float *h, const float *bt, int64_t R, int64_t N,
                         int64_t len)
{
#if defined(__AVX2__) && defined(__FMA__)
    if (len == COLS) {
        __m256 acc[COLS / 8];
        for (int v = 0; v < COLS / 8; ++v)
            acc[v] = _mm256_loadu_ps(o + 8 * v);
        for (int64_t r = 0; r < R; ++r) {
            const __m256 hv = _mm256_set1_ps(h[r]);
            const float *row = bt + r * N;
            for (int v = 0; v < COLS / 8; ++v)
                acc[v] = _mm256_fmadd_ps(hv, _mm256_loadu_ps(row + 8 * v), acc[v]);
        }
        for (int v = 0; v < COLS / 8; ++v)
            _mm256_storeu_ps(o + 8 * v, acc[v]);
        return;
    }
#endif
    float acc[COLS];
    memcpy(acc, o, (size_t)len * sizeof(float));
    for (int64_t r = 0; r < R; ++r) {
        const float hr = h[r], *row = bt + r * N;
        for (int64_t c = 0; c < len; ++c)
            acc[c] += hr * row[c];
    }
    memcpy(o, acc, (size_t)len * sizeof(float));
}

/* out rows are out_stride floats apart (a fused qkv output read in place); x is [T, K].
 * sub_sizes[n_sub] are the output widths of the parts, in column order.
 * Returns nonzero when its buffers could not be allocated. */
int kvflow_lora_add(float *out, int64_t out_stride, const float *x, int64_t T, int64_t K,
                    const int64_t *slot_of_token, const float *A, const float *Bt,
                    int64_t num_slots, int64_t R, int64_t n_sub, const int64_t *sub_sizes,
                    int num_threads)
{
    int64_t N = 0, num_blocks = 0;
    for (int64_t i = 0; i < n_sub; ++i) {
        N += sub_sizes[i];
        num_blocks += (sub_sizes[i] + COLS - 1) / COLS;
    }
    const int64_t H = n_sub * R; /* shrink width */
    /* one allocation: order[T], start[S + 1], next[S], used[S], blocks[3 num_blocks],
     * quads[2 (T / 4 + S)], h[T H] */
    const int64_t max_quads = T / 4 + num_slots;
    const size_t ints = (size_t)(T + 3 * num_slots + 1 + 3 * num_blocks + 2 * max_quads);
    int64_t *order = malloc(ints * sizeof(int64_t) + (size_t)(T * H) * sizeof(float));
    if (!order)
        return 1;
    int64_t *start = order + T, *next = start + num_slots + 1, *used = next + num_slots;
    int64_t *blocks = used + num_slots; /* (part, first column, width) of each block */
    int64_t *quads = blocks + 3 * num_blocks; /* (slot, first j) of each group of <= 4 */
    float *h = (float *)(quads + 2 * max_quads);
    memset(start, 0, (size_t)(num_slots + 1) * sizeof(int64_t));
    for (int64_t t = 0; t < T; ++t) /* counting sort of the tokens by slot */
        if (slot_of_token[t] >= 0 && slot_of_token[t] < num_slots)
            ++start[slot_of_token[t] + 1];
    int64_t num_used = 0;
    for (int64_t s = 0; s < num_slots; ++s) {
        start[s + 1] += start[s];
        next[s] = start[s];
        if (start[s + 1] > start[s])
            used[num_used++] = s;
    }
    for (int64_t t = 0; t < T; ++t)
        if (slot_of_token[t] >= 0 && slot_of_token[t] < num_slots)
            order[next[slot_of_token[t]]++] = t;
    int64_t num_quads = 0;
    for (int64_t u = 0; u < num_used; ++u)
        for (int64_t j = start[used[u]]; j < start[used[u] + 1]; j += 4) {
            quads[2 * num_quads] = used[u], quads[2 * num_quads + 1] = j;
            ++num_quads;
        }
    for (int64_t i = 0, b = 0, first = 0; i < n_sub; first += sub_sizes[i++])
        for (int64_t c = 0; c < sub_sizes[i]; c += COLS, ++b) {
            blocks[3 * b] = i, blocks[3 * b + 1] = first + c;
            blocks[3 * b + 2] = sub_sizes[i] - c < COLS ? sub_sizes[i] - c : COLS;
        }
#pragma omp parallel for schedule(static) num_threads(num_threads)
    for (int64_t quad = 0; quad < num_quads; ++quad) {
        const int64_t s = quads[2 * quad], j = quads[2 * quad + 1];
        const int64_t n = start[s + 1] - j < 4 ? start[s + 1] - j : 4;
        const float *a = A + s * H * K;
        float *hq = h + j * H; /* the shrink of these (up to) four tokens */
        if (n == 4) {
            const float *xs[4] = {x + order[j] * K, x + order[j + 1] * K, x + order[j + 2] * K,
                                  x + order[j + 3] * K};
            for (int64_t r = 0; r < H; ++r) {
                float sums[4];
                dot_x4(a + r * K, xs, K, sums);
                for (int q = 0; q < 4; ++q)
                    hq[q * H + r] = sums[q];
            }
        } else {
            for (int64_t q = 0; q < n; ++q)
                for (int64_t r = 0; r < H; ++r)
                    hq[q * H + r] = dot(a + r * K, x + order[j + q] * K, K);
        }
        for (int64_t b = 0; b < num_blocks; ++b) { /* the expand, block by block */
            const int64_t *block = blocks + 3 * b;
            const float *bt = Bt + (s * H + block[0] * R) * N + block[1];
            for (int64_t q = 0; q < n; ++q)
                expand_block(out + order[j + q] * out_stride + block[1], hq + q * H + block[0] * R,
                             bt, R, N, block[2]);
        }
    }
    free(order);
    return 0;
}
