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
 * Waiting spins ~50 us (ranks on their own CPUs meet within that on a quiet machine), then
 * sleeps on a futex (Linux), woken by the publishing rank: on a busy shared machine a
 * spinning rank would hold a CPU its peer needs. A line's second word counts its
 * sleepers; publisher and sleeper use sequentially consistent accesses (store, then read
 * the other's word), so a wake is never missed. It gives up (returns 1) when the abort
 * word is set (the engine core saw a rank die) or after timeout_s.
 */
#include <sched.h>
#include <stdint.h>
#include <string.h>
#include <time.h>
#ifdef __linux__
#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

#define LINE 8 /* int64 words per 64-byte line: [0] round, [1] sleepers */
#define SPINS 2000

static void cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

/* Sleep until the round word's low half may have changed from `seen` (or 10 ms pass). */
static void sleep_on(int64_t *word, int64_t seen)
{
#ifdef __linux__
    struct timespec ten_ms = {0, 10000000};
    /* shared (not private) futex: the word lives in memory mapped by several processes */
    syscall(SYS_futex, (uint32_t *)word, FUTEX_WAIT, (uint32_t)seen, &ten_ms, NULL, 0);
#else
    (void)word;
    (void)seen;
    sched_yield();
#endif
}

static void wake_sleepers(int64_t *word)
{
#ifdef __linux__
    if (__atomic_load_n(word + 1, __ATOMIC_SEQ_CST) > 0)
        syscall(SYS_futex, (uint32_t *)word, FUTEX_WAKE, INT32_MAX, NULL, NULL, 0);
#else
    (void)word;
#endif
}

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static int wait_for(int64_t *word, int64_t round, int64_t *abort_word, double timeout_s)
{
    for (int i = 0; i < SPINS; ++i) {
        if (__atomic_load_n(word, __ATOMIC_ACQUIRE) >= round)
            return 0;
        cpu_relax();
    }
    const double deadline = now_s() + timeout_s;
    for (;;) {
        __atomic_add_fetch(word + 1, 1, __ATOMIC_SEQ_CST);
        int64_t seen = __atomic_load_n(word, __ATOMIC_SEQ_CST);
        if (seen < round)
            sleep_on(word, seen);
        __atomic_sub_fetch(word + 1, 1, __ATOMIC_SEQ_CST);
        if (__atomic_load_n(word, __ATOMIC_ACQUIRE) >= round)
            return 0;
        if (__atomic_load_n(abort_word, __ATOMIC_ACQUIRE) || now_s() > deadline)
            return 1;
    }
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
    __atomic_store_n(&words[rank * LINE], round, __ATOMIC_SEQ_CST);
    wake_sleepers(&words[rank * LINE]);
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
    __atomic_store_n(&words[rank * LINE], round, __ATOMIC_SEQ_CST);
    wake_sleepers(&words[rank * LINE]);
    if (rank != 0)
        return 0;
    for (int64_t j = 1; j < world; ++j)
        if (wait_for(&words[j * LINE], round, &words[world * LINE], timeout_s))
            return 1;
    for (int64_t j = 0; j < world; ++j) /* out [world, n]: rank-major */
        memcpy(out + j * n, set + j * capacity, (size_t)n * sizeof(float));
    return 0;
}
