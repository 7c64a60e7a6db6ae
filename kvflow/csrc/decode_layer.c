/* One whole decoder layer for a decode step on the CPU, in one call.
 *
 * At one token per request a layer's arithmetic is a few hundred microseconds, and the
 * dispatch of its dozen operations from Python (argument checks, allocations, ctypes) was
 * a fifth of it. This runs the same kernels back to back from C:
 *
 *   residual += hidden; x = rms_norm(residual)          (first layer: residual starts at 0)
 *   qkv = x Wqkv (+b); rotate q, k; k, v -> cache slots
 *   attn = attention(q, cached k/v of each request)
 *   hidden = attn Wo (+b)
 *   residual += hidden; x = rms_norm(residual)
 *   hidden = (silu(x Wgate) * x Wup) Wdown
 *
 * Weights are float32, bfloat16, or int8 with per-row scales (a quantized model); the
 * activations between the kernels stay float32 (norms, softmax and sums in float32 too),
 * and the KV cache is float32 or bfloat16. Pointers:
 *   p[0..1]   input and post-attention norm weights
 *   p[2 + 3j] weight, scale (NULL for float32), bias (or NULL) of projection j:
 *             0 qkv, 1 o, 2 gate_up, 3 down
 * Dimensions d: hidden, heads, kv_heads, head_dim, intermediate, weight kind (0 float32,
 * 1 int8, 2 bfloat16), KV cache in bfloat16 (0/1), part (0: the whole layer; 1: up to the
 * output projection; 2: from the post-attention norm on). Tensor parallelism runs the two
 * parts with an all-reduce of `hidden` after each: each rank's o and down projections
 * give a partial sum over its heads and FFN columns.
 * LoRA (lora.c), when `lora` is not NULL: lora[2j], lora[2j + 1] are the slot weights A and
 * B of projection j, lora_dims = {slots, max rank}, and lora_slots[T] each token's slot (-1:
 * none); each projection's adapters are added to its output before the output is used.
 * scratch holds T * (hidden + (3 heads + 2 kv_heads) head_dim + 3 intermediate) floats. Returns nonzero if an allocation inside a kernel failed.
 */
#include <stdint.h>
#include <string.h>

void kvflow_linear_f32(const float *x, const float *w, const float *bias, float *out,
                       int64_t T, int64_t N, int64_t K, int num_threads);
int kvflow_linear_i8(const float *x, const int8_t *w, const float *scale, const float *bias,
                     float *out, int64_t T, int64_t N, int64_t K, int num_threads);
void kvflow_rms_norm(const float *x, float *residual, const float *weight, float *out,
                     int64_t T, int64_t H, float eps, int num_threads);
int kvflow_linear_bf16(const float *x, const uint16_t *w, const float *bias, float *out,
                       int64_t T, int64_t N, int64_t K, int num_threads);
void kvflow_rotary_cache_write(void *qkv, int64_t row_stride, const float *cos,
                               const float *sin, void *key_cache, void *value_cache,
                               const int64_t *slots, int64_t T, int64_t H, int64_t KvH,
                               int64_t hd, int qkv_bf16, int cache_bf16, int num_threads);
int kvflow_paged_decode_attention(
    const float *query, const void *key_cache, const void *value_cache,
    const int64_t *block_tables, const int64_t *seq_lens, float *out,
    int64_t num_decodes, int64_t table_width, int64_t block_size,
    int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, float scale, int kv_bf16,
    int num_threads);
void kvflow_silu_mul(const float *gate_up, float *out, int64_t T, int64_t I, int num_threads);
int kvflow_lora_add(float *out, int64_t out_stride, const float *x, int64_t T, int64_t K,
                    const int64_t *slot_of_token, const float *A, const float *B,
                    int64_t num_slots, int64_t R, int64_t n_sub, const int64_t *sub_sizes,
                    int num_threads);

/* Adds projection j's adapters to out [T, N] (a no-op without LoRA). */
static int add_lora(void *const *lora, const int64_t *lora_dims, const int64_t *lora_slots,
                    int j, float *out, const float *x, int64_t T, int64_t K, int64_t n_sub,
                    const int64_t *sub_sizes, int num_threads)
{
    int64_t N = 0;
    if (!lora)
        return 0;
    for (int64_t i = 0; i < n_sub; ++i)
        N += sub_sizes[i];
    return kvflow_lora_add(out, N, x, T, K, lora_slots, lora[2 * j], lora[2 * j + 1],
                           lora_dims[0], lora_dims[1], n_sub, sub_sizes, num_threads);
}

enum { W_F32 = 0, W_I8 = 1, W_BF16 = 2 };

static int project(void *const *p, int j, int kind, const float *x, float *out, int64_t T,
                   int64_t N, int64_t K, int num_threads)
{
    const void *w = p[2 + 3 * j];
    const float *scale = p[3 + 3 * j], *bias = p[4 + 3 * j];
    if (kind == W_I8)
        return kvflow_linear_i8(x, w, scale, bias, out, T, N, K, num_threads);
    if (kind == W_BF16)
        return kvflow_linear_bf16(x, w, bias, out, T, N, K, num_threads);
    kvflow_linear_f32(x, w, bias, out, T, N, K, num_threads);
    return 0;
}

int kvflow_decode_layer(void *const *p, const int64_t *d, float eps, float attn_scale,
                        float *hidden, float *residual, const float *cos, const float *sin,
                        void *key_cache, void *value_cache, const int64_t *slots,
                        const int64_t *block_tables, const int64_t *seq_lens,
                        int64_t table_width, int64_t block_size, int64_t T, float *scratch,
                        void *const *lora, const int64_t *lora_dims, const int64_t *lora_slots,
                        int num_threads)
{
    const int64_t H = d[0], nh = d[1], nkv = d[2], hd = d[3], I = d[4];
    const int kind = (int)d[5], kv_bf16 = (int)d[6], part = (int)d[7];
    const int64_t qkv_width = (nh + 2 * nkv) * hd;
    float *x = scratch, *qkv = x + T * H, *q = qkv + T * qkv_width, *attn = q + T * nh * hd;
    float *gate_up = attn + T * nh * hd, *act = gate_up + T * 2 * I;
    const int64_t qkv_sizes[3] = {nh * hd, nkv * hd, nkv * hd}, gate_up_sizes[2] = {I, I};
    int failed = 0;

    if (part == 2)
        goto mlp;
    kvflow_rms_norm(hidden, residual, p[0], x, T, H, eps, num_threads);
    failed |= project(p, 0, kind, x, qkv, T, qkv_width, H, num_threads);
    failed |= add_lora(lora, lora_dims, lora_slots, 0, qkv, x, T, H, 3, qkv_sizes, num_threads);
    kvflow_rotary_cache_write(qkv, qkv_width, cos, sin, key_cache, value_cache, slots, T, nh,
                              nkv, hd, 0, kv_bf16, num_threads);
    for (int64_t t = 0; t < T; ++t)
        memcpy(q + t * nh * hd, qkv + t * qkv_width, (size_t)(nh * hd) * sizeof(float));
    failed |= kvflow_paged_decode_attention(q, key_cache, value_cache, block_tables, seq_lens,
                                            attn, T, table_width, block_size, nh, nkv, hd,
                                            attn_scale, kv_bf16, num_threads);
    failed |= project(p, 1, kind, attn, hidden, T, H, nh * hd, num_threads);
    failed |= add_lora(lora, lora_dims, lora_slots, 1, hidden, attn, T, nh * hd, 1, &H,
                       num_threads);
    if (part == 1)
        return failed;
mlp:
    kvflow_rms_norm(hidden, residual, p[1], x, T, H, eps, num_threads);
    failed |= project(p, 2, kind, x, gate_up, T, 2 * I, H, num_threads);
    failed |= add_lora(lora, lora_dims, lora_slots, 2, gate_up, x, T, H, 2, gate_up_sizes,
                       num_threads);
    kvflow_silu_mul(gate_up, act, T, I, num_threads);
    failed |= project(p, 3, kind, act, hidden, T, H, I, num_threads);
    failed |= add_lora(lora, lora_dims, lora_slots, 3, hidden, act, T, I, 1, &H, num_threads);
    return failed;
}
