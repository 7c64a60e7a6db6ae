/* Sum of float32 vectors over the tensor-parallel ranks of one machine, in shared memory.
 *
 * gloo's all-reduce over loopback TCP took 1-2 ms here for one decode step's [T, hidden]
 * (socket wake-ups between two busy processes); a decoder layer needs two. Ranks on one
 * machine can instead meet in a shared area: each copies its part into its slot, publishes
 * the round's number, waits for every other rank's number, and sums the slots in rank order
 * (the same order on every rank, so every rank holds bitwise the same result).
 *
 * Area layout (64-byte lines): line j holds rank j's last published round; line `world`
 * holds the abort word; then two buffer sets (rounds alternate between them), each `world`
 * slots of `capacity` floats. A rank writes set (round & 1) only after finishing the round
 * before, and no rank finishes a round before every rank has published it, which it does
 * only after reading the set of the round before that: a slot is never overwritten while a
 * rank still reads it.
 *
 * The gather (rank 0 collects every rank's vector: the LM head's vocabulary slices) uses the
 * same slots and rounds; only rank 0 waits. A rank that does not wait can still not reuse
 * its slot too early: its next round in the same set comes after a round that waits for
 * rank 0, which publishes only after reading.
 *
 * Waiting spins, then yields the CPU (the machine may be shared). It gives up (returns 1)
 * when the abort word is set (the engine core saw a rank die) or after timeout_s.
 */
#include <sched.h>
#include <stdint.h>
#include <string.h>
#include <time.h>

#define LINE 8 /* int64 words per 64-byte line */
#define SPINS 4096

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static int wait_for(int64_t *word, int64_t round, int64_t *abort_word, double timeout_s)
{
    double deadline = -1.0;
    for (int64_t i = 0; __atomic_load_n(word, __ATOMIC_ACQUIRE) < round; ++i) {
        if (i < SPINS)
            continue;
        if (__atomic_load_n(abort_word, __ATOMIC_ACQUIRE))
            return 1;
        if ((i & 255) == 0) {
            double t = now_s();
            if (deadline < 0)
                deadline = t + timeout_s;
            else if (t > deadline)
                return 1;
        }
        sched_yield();
    }
    return 0;
}

void kvflow_shm_set_abort(void *area, int64_t world)
{
    __atomic_store_n((int64_t *)area + world * LINE, 1, __ATOMIC_RELEASE);
}

int kvflow_shm_all_reduce(void *area, int64_t rank, int64_t world, int64_t capacity,
                          int64_t round, float *data, int64_t n, double timeout_s)
{
    int64_t *words = area;
    float *set = (float *)(words + (world + 1) * LINE) + (round & 1) * world * capacity;
    memcpy(set + rank * capacity, data, (size_t)n * sizeof(float));
    __atomic_store_n(&words[rank * LINE], round, __ATOMIC_RELEASE);
    for (int64_t j = 0; j < world; ++j)
        if (j != rank && wait_for(&words[j * LINE], round, &words[world * LINE], timeout_s))
            return 1;
    memcpy(data, set, (size_t)n * sizeof(float));
    for (int64_t j = 1; j < world; ++j) {
        const float *slot = set + j * capacity;
        for (int64_t i = 0; i < n; ++i)
            data[i] += slot[i];
    }
    return 0;
}

int kvflow_shm_gather(void *area, int64_t rank, int64_t world, int64_t capacity, int64_t round,
                      const float *data, int64_t n, float *out, double timeout_s)
{
    int64_t *words = area;
    float *set = (float *)(words + (world + 1) * LINE) + (round & 1) * world * capacity;
    memcpy(set + rank * capacity, data, (size_t)n * sizeof(float));
    __atomic_store_n(&words[rank * LINE], round, __ATOMIC_RELEASE);
    if (rank != 0)
        return 0;
    for (int64_t j = 1; j < world; ++j)
        if (wait_for(&words[j * LINE], round, &words[world * LINE], timeout_s))
            return 1;
    for (int64_t j = 0; j < world; ++j) /* out [world, n]: rank-major */
        memcpy(out + j * n, set + j * capacity, (size_t)n * sizeof(float));
    return 0;
}
