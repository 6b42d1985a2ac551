/* bpcompile's runtime support for generated modules: the vector math declarations, the scalar
 * type, the BLAS declaration, the thread pool, the matrix product, random numbers and the
 * workspace plan. Real C, compiled into every generated module (and exported library) as its
 * first part: templates/module.c.j2 pastes it in after defining BP_REAL_IS_FLOAT (1: float32
 * model, 0: float64), BP_BLAS_MIN_FLOPS and BP_PARALLEL_MIN_WORK for the model;
 * tests/test_runtime_c.py compiles it alone as well. Everything here is static but the two
 * functions the Python runtime calls (bp_set_num_threads, bp_plan_workspace; declared in
 * model.h): each module holds its own copy (and its own thread pool). */
#ifndef BP_RUNTIME_H
#define BP_RUNTIME_H
#ifndef _POSIX_C_SOURCE
#define _POSIX_C_SOURCE 200809L /* pthreads and clock_gettime under -std=c99 */
#endif
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>
#include <time.h>

#ifndef BP_REAL_IS_FLOAT
#define BP_REAL_IS_FLOAT 0
#endif
#ifndef BP_USE_LIBMVEC
#define BP_USE_LIBMVEC 0
#endif
#if BP_USE_LIBMVEC
/* glibc's libmvec has vector versions of these functions (within 4 ulp, NaN and Inf kept as
 * the scalar ones do). Declaring them lets gcc vectorize loops that call them without
 * -ffast-math, whose semantics would break NaN/Inf handling. */
#define BP_SIMD __attribute__((__simd__("notinbranch")))
BP_SIMD float expf(float);
BP_SIMD float logf(float);
BP_SIMD float log1pf(float);
BP_SIMD float expm1f(float);
BP_SIMD float tanhf(float);
BP_SIMD float erff(float);
BP_SIMD float sinf(float);
BP_SIMD float cosf(float);
BP_SIMD float sinhf(float);
BP_SIMD float coshf(float);
BP_SIMD float atanf(float);
BP_SIMD double exp(double);
BP_SIMD double log(double);
BP_SIMD double log1p(double);
BP_SIMD double expm1(double);
BP_SIMD double tanh(double);
BP_SIMD double erf(double);
BP_SIMD double sin(double);
BP_SIMD double cos(double);
BP_SIMD double sinh(double);
BP_SIMD double cosh(double);
BP_SIMD double atan(double);
#endif

#if BP_REAL_IS_FLOAT
typedef float bp_real;
#define BP_EXP expf
#define BP_LOG logf
#else
typedef double bp_real;
#define BP_EXP exp
#define BP_LOG log
#endif

#ifndef BP_USE_BLAS
#define BP_USE_BLAS 0
#endif
#if BP_USE_BLAS
/* The one BLAS routine the model calls (CBLAS's GEMM; any CBLAS has it, under this name or
 * BP_CBLAS_GEMM), declared here so that no BLAS header is needed. Its enumerations are ints
 * with the standard's values. */
#ifndef BP_CBLAS_GEMM
#if BP_REAL_IS_FLOAT
#define BP_CBLAS_GEMM cblas_sgemm
#else
#define BP_CBLAS_GEMM cblas_dgemm
#endif
#endif
enum { BP_CBLAS_ROW_MAJOR = 101, BP_CBLAS_NO_TRANS = 111, BP_CBLAS_TRANS = 112 };
void BP_CBLAS_GEMM(int layout, int transa, int transb, int m, int n, int k, bp_real alpha, const bp_real *a,
                   int lda, const bp_real *b, int ldb, bp_real beta, bp_real *c, int ldc);
#endif
/* Entry points are sequences of kernel calls: nothing in them gains from optimization, and gcc's
 * optimizing passes over an entry of thousands of calls took most of a large model's compile. */
#if defined(__GNUC__) && !defined(__clang__)
#define BP_ENTRY __attribute__((optimize("O0")))
#else
#define BP_ENTRY
#endif
/* A module compiles whole (an exported library, a test), or, built by bpcompile, as parts compiled
 * in parallel: model.c once per part with BP_PART set (build.cffi_build). Split, the kernels and
 * the runtime's shared state (the pool, the functions that are not inline) have hidden external
 * linkage, defined in part 0 (the entry points, and the runtime) or the kernel's part and declared
 * in the others. With BP_RUNTIME_APART set, no part of model.c defines the runtime: runtime.c
 * (templates/runtime.c.j2, this file alone) does, compiled with BP_PART -1 (build.runtime_object).
 * Whole, they are static as before. */
#ifndef BP_RUNTIME_APART
#define BP_RUNTIME_APART 0
#endif
#ifdef BP_PART
#define BP_KERNEL __attribute__((noinline, visibility("hidden")))
#define BP_SHARED __attribute__((visibility("hidden")))
#define BP_DEFINES_RUNTIME (BP_PART == -1 || (BP_PART == 0 && !BP_RUNTIME_APART))
#define BP_IN_PART(k) ((k) == BP_PART)
#else
#define BP_KERNEL __attribute__((noinline)) static
#define BP_SHARED static
#define BP_DEFINES_RUNTIME 1
#define BP_IN_PART(k) 1
#endif
#ifndef BP_BLAS_MIN_FLOPS
#error "define BP_BLAS_MIN_FLOPS: products of fewer multiply-adds run as loops (0: all through BLAS)"
#endif
/* --- the thread pool ---------------------------------------------------------------------
 * A parallel region runs `parts` independent pieces of work, fn(arg, part, parts). The calling
 * thread and the pool's workers claim pieces one at a time from one shared counter, so a region
 * never waits for a worker that has not begun: the pieces of a worker the system has not
 * scheduled yet are done by the caller. Workers start at the first region (a model whose work
 * is all small never starts one), spin for a moment after each region, since the next one
 * usually follows within microseconds, then sleep. One region runs at a time: a region begun
 * while another runs (a second calling thread, or a region inside a piece) runs its pieces
 * one after another in the calling thread. bpcompile's OpenBLAS runs single-threaded, so
 * these threads are the only ones bpcompile uses. */
#ifndef BP_MAX_THREADS
#define BP_MAX_THREADS 64
#endif
#ifndef BP_SPIN_NS
#define BP_SPIN_NS 2000000LL /* how long an idle worker spins before it sleeps: 2 ms */
#endif
#ifndef BP_PARALLEL_MIN_WORK
#error "define BP_PARALLEL_MIN_WORK: the least work (elements; multiply-adds / 16) split across the pool"
#endif
typedef void (*bp_task)(const void *arg, int64_t part, int64_t parts);

struct bp_pool_state {
    pthread_mutex_t region;     /* held by the thread running a region */
    pthread_mutex_t sleep_lock; /* with `wake`: where idle workers sleep */
    pthread_cond_t wake;
    int threads;                /* the caller plus the workers a region uses (atomic) */
    int started;                /* workers running */
    int sleepers;               /* workers asleep (atomic) */
    uint64_t work;              /* region tag (32 bits) | parts (16) | next part (16) (atomic) */
    int64_t done;               /* pieces of the current region finished (atomic) */
    bp_task fn;
    const void *arg;
};

BP_SHARED void bp_parallel(bp_task fn, const void *arg, int64_t parts);
#if BP_DEFINES_RUNTIME
BP_SHARED struct bp_pool_state bp_pool = {.region = PTHREAD_MUTEX_INITIALIZER, .sleep_lock = PTHREAD_MUTEX_INITIALIZER,
                                          .wake = PTHREAD_COND_INITIALIZER, .threads = 1};

static inline void bp_pause(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

/* Claims the next piece of region `tag`; 0 when it has none left (or a newer region began). */
static int bp_claim(uint32_t tag, int64_t *part, int64_t *parts)
{
    uint64_t w = __atomic_load_n(&bp_pool.work, __ATOMIC_ACQUIRE);
    for (;;) {
        const int64_t next = (int64_t)(w & 0xffff), count = (int64_t)((w >> 16) & 0xffff);
        if ((uint32_t)(w >> 32) != tag || next >= count)
            return 0;
        if (__atomic_compare_exchange_n(&bp_pool.work, &w, w + 1, 1, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) {
            *part = next;
            *parts = count;
            return 1;
        }
    }
}

static void bp_run_pieces(uint32_t tag)
{
    int64_t part, parts;
    while (bp_claim(tag, &part, &parts)) {
        bp_pool.fn(bp_pool.arg, part, parts);
        __atomic_add_fetch(&bp_pool.done, 1, __ATOMIC_RELEASE);
    }
}

static int64_t bp_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static void *bp_worker(void *index)
{
    const int me = (int)(intptr_t)index;
    uint32_t seen = (uint32_t)(__atomic_load_n(&bp_pool.work, __ATOMIC_ACQUIRE) >> 32);
    int64_t idle_since = bp_now_ns();
    for (unsigned spins = 1;; ++spins) {
        const uint32_t tag = (uint32_t)(__atomic_load_n(&bp_pool.work, __ATOMIC_ACQUIRE) >> 32);
        if (tag != seen) {
            seen = tag;
            if (me < __atomic_load_n(&bp_pool.threads, __ATOMIC_RELAXED))
                bp_run_pieces(tag);
            idle_since = bp_now_ns();
        } else if (spins % 256 || bp_now_ns() - idle_since < BP_SPIN_NS) {
            bp_pause();
        } else {
            pthread_mutex_lock(&bp_pool.sleep_lock);
            __atomic_add_fetch(&bp_pool.sleepers, 1, __ATOMIC_SEQ_CST);
            while ((uint32_t)(__atomic_load_n(&bp_pool.work, __ATOMIC_SEQ_CST) >> 32) == seen)
                pthread_cond_wait(&bp_pool.wake, &bp_pool.sleep_lock);
            __atomic_sub_fetch(&bp_pool.sleepers, 1, __ATOMIC_SEQ_CST);
            pthread_mutex_unlock(&bp_pool.sleep_lock);
            idle_since = bp_now_ns();
        }
    }
    return NULL;
}

/* A forked child has none of the parent's workers: start afresh. */
static void bp_pool_after_fork(void)
{
    pthread_mutex_init(&bp_pool.region, NULL);
    pthread_mutex_init(&bp_pool.sleep_lock, NULL);
    pthread_cond_init(&bp_pool.wake, NULL);
    bp_pool.started = 0;
    bp_pool.sleepers = 0;
}

/* Starts the workers a region needs (called holding `region`); the number running. */
static int bp_start_workers(int threads)
{
    static int fork_handler;
    if (!fork_handler)
        fork_handler = pthread_atfork(NULL, NULL, bp_pool_after_fork) == 0 ? 1 : -1;
    while (bp_pool.started < threads - 1 && bp_pool.started < BP_MAX_THREADS - 1) {
        pthread_t id;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        const int failed = pthread_create(&id, &attr, bp_worker, (void *)(intptr_t)(bp_pool.started + 1));
        pthread_attr_destroy(&attr);
        if (failed)
            break;
        bp_pool.started++;
    }
    return bp_pool.started;
}

/* Runs fn(arg, part, parts) for every part in [0, parts), on the pool when it has threads.
 * Kept out of line: inlined at every call site it doubles the module's compile time. */
__attribute__((noinline)) BP_SHARED void bp_parallel(bp_task fn, const void *arg, int64_t parts)
{
    const int threads = __atomic_load_n(&bp_pool.threads, __ATOMIC_RELAXED);
    if (parts > 0xffff)
        parts = 0xffff;
    if (parts > 1 && threads > 1 && pthread_mutex_trylock(&bp_pool.region) == 0) {
        if (bp_start_workers(threads) > 0) {
            bp_pool.fn = fn;
            bp_pool.arg = arg;
            __atomic_store_n(&bp_pool.done, 0, __ATOMIC_RELAXED);
            const uint32_t tag = (uint32_t)(__atomic_load_n(&bp_pool.work, __ATOMIC_RELAXED) >> 32) + 1;
            __atomic_store_n(&bp_pool.work, ((uint64_t)tag << 32) | ((uint64_t)parts << 16), __ATOMIC_SEQ_CST);
            if (__atomic_load_n(&bp_pool.sleepers, __ATOMIC_SEQ_CST)) {
                pthread_mutex_lock(&bp_pool.sleep_lock);
                pthread_cond_broadcast(&bp_pool.wake);
                pthread_mutex_unlock(&bp_pool.sleep_lock);
            }
            bp_run_pieces(tag);
            while (__atomic_load_n(&bp_pool.done, __ATOMIC_ACQUIRE) < parts)
                bp_pause();
            pthread_mutex_unlock(&bp_pool.region);
            return;
        }
        pthread_mutex_unlock(&bp_pool.region);
    }
    for (int64_t part = 0; part < parts; ++part)
        fn(arg, part, parts);
}

/* Sets the pool's size (the calling thread included); returns the size in use. */
int bp_set_num_threads(int n)
{
    if (n >= 1)
        __atomic_store_n(&bp_pool.threads, n < BP_MAX_THREADS ? n : BP_MAX_THREADS, __ATOMIC_RELAXED);
    return __atomic_load_n(&bp_pool.threads, __ATOMIC_RELAXED);
}
#else
extern BP_SHARED struct bp_pool_state bp_pool;
#endif

/* How many pieces a loop of `work` elements is worth splitting into. */
static inline int64_t bp_parts(int64_t work)
{
    return work >= BP_PARALLEL_MIN_WORK ? __atomic_load_n(&bp_pool.threads, __ATOMIC_RELAXED) : 1;
}

/* Rows [*lo, *hi) of n for piece `part` of `parts`: near-equal shares, multiples of `grain`. */
static inline void bp_share(int64_t n, int64_t grain, int64_t part, int64_t parts, int64_t *lo, int64_t *hi)
{
    const int64_t blocks = (n + grain - 1) / grain;
    *lo = blocks * part / parts * grain;
    *hi = part + 1 == parts ? n : blocks * (part + 1) / parts * grain;
    if (*lo > n)
        *lo = n;
    if (*hi > n)
        *hi = n;
}

/* Whether a product calls BLAS: those of at least BP_BLAS_MIN_FLOPS multiply-adds and an inner
 * dimension K of at least 16 (or every product, when BP_BLAS_MIN_FLOPS is 0). Smaller ones, and
 * those with a short inner dimension (a 3x3 convolution's K = 9), run as plain loops the compiler
 * unrolls and vectorizes, their sizes being constants after inlining. */
static inline int bp_gemm_blas(int64_t M, int64_t N, int64_t K)
{
    (void)M; (void)N; (void)K;
    return BP_USE_BLAS && (BP_BLAS_MIN_FLOPS == 0 || (M * N * K >= BP_BLAS_MIN_FLOPS && K >= 16));
}

#if BP_USE_BLAS
#ifndef BP_BLAS_INT_MAX
#define BP_BLAS_INT_MAX 2147483647LL  /* CBLAS takes its sizes as int */
#endif
/* C = op(A) op(B) by BLAS in blocks whose sizes fit its int arguments: blocks of C's rows and
 * columns, and of the inner dimension summed into C (beta 1 after the first). Returns 0, leaving
 * the product to the plain loops, when a leading dimension itself is out of int's range. */
BP_SHARED int bp_blas_gemm(int ta, int tb, int64_t M, int64_t N, int64_t K,
                           const bp_real *restrict A, int64_t lda, const bp_real *restrict B, int64_t ldb,
                           bp_real *restrict C, int64_t ldc);
#if BP_DEFINES_RUNTIME
BP_SHARED int bp_blas_gemm(int ta, int tb, int64_t M, int64_t N, int64_t K,
                           const bp_real *restrict A, int64_t lda, const bp_real *restrict B, int64_t ldb,
                           bp_real *restrict C, int64_t ldc)
{
    const int64_t most = BP_BLAS_INT_MAX;
    if (lda > most || ldb > most || ldc > most)
        return 0;
    for (int64_t i = 0; i < M; i += most) {
        const int64_t m = M - i < most ? M - i : most;
        for (int64_t j = 0; j < N; j += most) {
            const int64_t n = N - j < most ? N - j : most;
            for (int64_t p = 0; p == 0 || p < K; p += most) {  /* K = 0 still sets C to 0 */
                const int64_t k = K - p < most ? K - p : most;
                const bp_real *a = A + (ta ? p * lda + i : i * lda + p);
                const bp_real *b = B + (tb ? j * ldb + p : p * ldb + j);
                BP_CBLAS_GEMM(BP_CBLAS_ROW_MAJOR, ta ? BP_CBLAS_TRANS : BP_CBLAS_NO_TRANS,
                              tb ? BP_CBLAS_TRANS : BP_CBLAS_NO_TRANS, (int)m, (int)n, (int)k, 1, a, (int)lda,
                              b, (int)ldb, p ? 1 : 0, C + i * ldc + j, (int)ldc);
            }
        }
    }
    return 1;
}
#endif
#endif

#define BP_TILE 64  /* rows and inner length of the tile of B that A Bᵀ transposes on the stack */

/* --- register tiles for products of few rows --------------------------------------------------
 * OpenBLAS packs B anew at every call, which a product of few rows cannot repay: with the 64-row
 * pieces of W2's layers as the tiles below, its step took 392 µs instead of 560 on an AMD EPYC.
 * Used where the build sets BP_TILED_PRODUCTS (a BLAS other than MKL, or none; MKL's small
 * products were not slow on an Intel Xeon). */
#ifndef BP_TILED_PRODUCTS
#define BP_TILED_PRODUCTS 0
#endif
#define BP_VLEN (64 / (int)sizeof(bp_real)) /* lanes of a 64-byte vector: one AVX-512 register */
/* Longest inner length of A Bᵀ as tiles (attention's q kᵀ, head 32): every call transposes its
 * panels of Bᵀ (8 KiB, on the stack); at 128 and more (an LSTM step's h W_hhᵀ, an MLP's input
 * gradients) that cost more than OpenBLAS's packing, W6 1.74 -> 1.91 ms a step. */
#define BP_PANEL_K 64
typedef bp_real bp_vec __attribute__((vector_size(64)));

/* Whether C = A op(B) runs as bp_gemm_tiles: A not transposed, 8 to 128 rows, at least one tile of
 * columns, a B of at most 1 MiB (streamed from cache once per 8 rows), and for Bᵀ an inner length
 * of at most BP_PANEL_K. */
static inline int bp_gemm_tiled(int ta, int tb, int64_t M, int64_t N, int64_t K)
{
    return BP_TILED_PRODUCTS && !ta && M >= 8 && M <= 128 && N >= 2 * BP_VLEN &&
           K * N * (int64_t)sizeof(bp_real) <= (1 << 20) && (!tb || K <= BP_PANEL_K);
}

BP_SHARED void bp_gemm_tiles(int tb, int64_t M, int64_t N, int64_t K, const bp_real *restrict A, int64_t lda,
                             const bp_real *restrict B, int64_t ldb, bp_real *restrict C, int64_t ldc);
#if BP_DEFINES_RUNTIME
/* Rows [0, R) of C = A B at columns [0, 2 BP_VLEN): R x 2 vector sums held in registers over the
 * whole inner length, each step one broadcast of A per row and two loads of B's row. Each sum
 * runs over p in order, as in the plain loops. */
__attribute__((always_inline)) static inline void bp_gemm_tile(int R, int64_t K, const bp_real *restrict A,
                                                            int64_t lda, const bp_real *restrict B, int64_t ldb,
                                                            bp_real *restrict C, int64_t ldc)
{
    bp_vec acc[8][2];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r)
        acc[r][0] = acc[r][1] = (bp_vec){0};
    for (int64_t p = 0; p < K; ++p) {
        bp_vec b0, b1;
        memcpy(&b0, B + p * ldb, sizeof b0);
        memcpy(&b1, B + p * ldb + BP_VLEN, sizeof b1);
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r) {
            const bp_real a = A[r * lda + p];
            acc[r][0] += a * b0;
            acc[r][1] += a * b1;
        }
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
        memcpy(C + r * ldc, &acc[r][0], sizeof acc[r][0]);
        memcpy(C + r * ldc + BP_VLEN, &acc[r][1], sizeof acc[r][1]);
    }
}

/* C = A op(B) by tiles of 8 rows (then 4, then 1) x 2 BP_VLEN columns, each strip of B's columns
 * reused by every tile of rows; with Bᵀ (tb) the strip is first transposed into a panel, which
 * holds an inner length of BP_PANEL_K (bp_gemm_tiled admits no longer one). The last columns,
 * short of a tile, as plain loops. */
BP_SHARED void bp_gemm_tiles(int tb, int64_t M, int64_t N, int64_t K, const bp_real *restrict A, int64_t lda,
                             const bp_real *restrict B, int64_t ldb, bp_real *restrict C, int64_t ldc)
{
    enum { W = 2 * BP_VLEN };
    bp_real panel[BP_PANEL_K * W];
    const int64_t tiled = N / W * W;
    for (int64_t j0 = 0; j0 < tiled; j0 += W) {
        const bp_real *b = B + j0;
        int64_t ld = ldb;
        if (tb) {
            for (int64_t j = 0; j < W; ++j)
                for (int64_t p = 0; p < K; ++p)
                    panel[p * W + j] = B[(j0 + j) * ldb + p];
            b = panel;
            ld = W;
        }
        int64_t i0 = 0;
        for (; i0 + 8 <= M; i0 += 8)
            bp_gemm_tile(8, K, A + i0 * lda, lda, b, ld, C + i0 * ldc + j0, ldc);
        for (; i0 + 4 <= M; i0 += 4)
            bp_gemm_tile(4, K, A + i0 * lda, lda, b, ld, C + i0 * ldc + j0, ldc);
        for (; i0 < M; ++i0)
            bp_gemm_tile(1, K, A + i0 * lda, lda, b, ld, C + i0 * ldc + j0, ldc);
    }
    for (int64_t i = 0; i < M && tiled < N; ++i) {
        bp_real *restrict c = C + i * ldc;
        for (int64_t j = tiled; j < N; ++j)
            c[j] = 0;
        for (int64_t p = 0; p < K; ++p) {
            const bp_real a = A[i * lda + p];
            for (int64_t j = tiled; j < N; ++j)
                c[j] += a * B[tb ? j * ldb + p : p * ldb + j];
        }
    }
}
#endif

/* C = op(A) op(B) in row-major storage, op transposing when ta / tb is set, on the calling
 * thread. Always inlined, so that a product kernel's loops are specialized to its constant sizes
 * and transposes however the module is compiled (in parts, gcc kept a shared copy for some). */
__attribute__((always_inline)) static inline void bp_gemm_serial(int ta, int tb, int64_t M, int64_t N, int64_t K,
                                  const bp_real *restrict A, int64_t lda, const bp_real *restrict B, int64_t ldb,
                                  bp_real *restrict C, int64_t ldc)
{
    if (bp_gemm_tiled(ta, tb, M, N, K)) {
        bp_gemm_tiles(tb, M, N, K, A, lda, B, ldb, C, ldc);
        return;
    }
#if BP_USE_BLAS
    if (bp_gemm_blas(M, N, K) && bp_blas_gemm(ta, tb, M, N, K, A, lda, B, ldb, C, ldc))
        return;
#endif
    if (!tb && ta && N < 16) {
        /* Aᵀ B with few columns (a weight gradient into a narrow layer): sums of outer products
         * of A's and B's rows, so that the loop over A's contiguous row vectorizes */
        for (int64_t i = 0; i < M; ++i)
            for (int64_t j = 0; j < N; ++j)
                C[i * ldc + j] = 0;
        for (int64_t p = 0; p < K; ++p) {
            const bp_real *restrict a = A + p * lda;
            const bp_real *restrict b = B + p * ldb;
            /* kept a loop: fully unrolled at a small constant M, gcc vectorizes across the
             * strided rows of A instead (a 16x1 weight gradient 24x slower) */
#pragma GCC unroll 1
            for (int64_t i = 0; i < M; ++i)
                for (int64_t j = 0; j < N; ++j)
                    C[i * ldc + j] += a[i] * b[j];
        }
    } else if (!tb) {
        for (int64_t i = 0; i < M; ++i) {
            bp_real *restrict c = C + i * ldc;
            for (int64_t j = 0; j < N; ++j)
                c[j] = 0;
            for (int64_t p = 0; p < K; ++p) {
                const bp_real a = ta ? A[p * lda + i] : A[i * lda + p];
                const bp_real *restrict b = B + p * ldb;
                /* kept a loop: fully unrolled at a small constant N, gcc vectorizes across the
                 * strided reads of A instead (a 2x16 weight gradient 12x slower) */
#pragma GCC unroll 1
                for (int64_t j = 0; j < N; ++j)
                    c[j] += a * b[j];
            }
        }
    } else if (!ta) {
        /* A Bᵀ: a tile of B (BP_TILE rows x BP_TILE of K) transposed into a buffer, then the rows of
         * C accumulated as in A B, so that the loop over C's columns vectorizes (rows dotted with
         * rows would end every element in a horizontal sum) */
        bp_real bt[BP_TILE * BP_TILE];
        for (int64_t j0 = 0; j0 < N; j0 += BP_TILE) {
            const int64_t nb = N - j0 < BP_TILE ? N - j0 : BP_TILE;
            for (int64_t p0 = 0; p0 < K; p0 += BP_TILE) {
                const int64_t kb = K - p0 < BP_TILE ? K - p0 : BP_TILE;
                for (int64_t j = 0; j < nb; ++j)
                    for (int64_t p = 0; p < kb; ++p)
                        bt[p * nb + j] = B[(j0 + j) * ldb + p0 + p];
                for (int64_t i = 0; i < M; ++i) {
                    bp_real *restrict c = C + i * ldc + j0;
                    const bp_real *restrict a = A + i * lda + p0;
                    if (p0 == 0)
                        for (int64_t j = 0; j < nb; ++j)
                            c[j] = 0;
                    for (int64_t p = 0; p < kb; ++p) {
                        const bp_real av = a[p];
                        const bp_real *restrict b = bt + p * nb;
                        for (int64_t j = 0; j < nb; ++j)
                            c[j] += av * b[j];
                    }
                }
            }
        }
    } else {
        for (int64_t i = 0; i < M; ++i) {
            for (int64_t j = 0; j < N; ++j) {
                bp_real acc = 0;
                for (int64_t p = 0; p < K; ++p)
                    acc += A[p * lda + i] * B[j * ldb + p];
                C[i * ldc + j] = acc;
            }
        }
    }
}


struct bp_gemm_args {
    int ta, tb;
    int64_t M, N, K, lda, ldb, ldc;
    const bp_real *A, *B;
    bp_real *C;
};

/* C = op(A) op(B) for the small products of a fused kernel (attention's, per (batch, head)):
 * BLAS when the inner length is at least 16, whatever BP_BLAS_MIN_FLOPS says (these products are
 * small, but BLAS runs them faster than plain loops: measured at T 64, head 32), else the plain
 * loops. */
static inline void bp_gemm_small(int ta, int tb, int64_t M, int64_t N, int64_t K,
                                 const bp_real *restrict A, int64_t lda, const bp_real *restrict B, int64_t ldb,
                                 bp_real *restrict C, int64_t ldc)
{
#if BP_USE_BLAS
    if (K >= 16 && !bp_gemm_tiled(ta, tb, M, N, K) && bp_blas_gemm(ta, tb, M, N, K, A, lda, B, ldb, C, ldc))
        return;
#endif
    bp_gemm_serial(ta, tb, M, N, K, A, lda, B, ldb, C, ldc);
}

/* One piece of a product split across the pool: a block of C's rows, or of its columns when C
 * is wider than tall (multiples of 16, whole vectors). Each element's sum runs in the same order
 * as in the unsplit product. Only BLAS products are split (bp_gemm): the loops inlined here run
 * only for a leading dimension beyond int's range, so the piece is compiled as cold code, for size
 * (-O3 vectorizing its four generic loop nests took 0.1 s of every module's compile). */
BP_SHARED void bp_gemm_piece(const void *arg, int64_t part, int64_t parts);
#if BP_DEFINES_RUNTIME
__attribute__((cold)) BP_SHARED void bp_gemm_piece(const void *arg, int64_t part, int64_t parts)
{
    const struct bp_gemm_args *g = arg;
    int64_t lo, hi;
    if (g->M >= g->N) {
        bp_share(g->M, 16, part, parts, &lo, &hi);
        bp_gemm_serial(g->ta, g->tb, hi - lo, g->N, g->K, g->A + (g->ta ? lo : lo * g->lda), g->lda,
                       g->B, g->ldb, g->C + lo * g->ldc, g->ldc);
    } else {
        bp_share(g->N, 16, part, parts, &lo, &hi);
        bp_gemm_serial(g->ta, g->tb, g->M, hi - lo, g->K, g->A, g->lda,
                       g->B + (g->tb ? lo * g->ldb : lo), g->ldb, g->C + lo, g->ldc);
    }
}
#endif

/* C = op(A) op(B): BLAS products of at least BP_PARALLEL_MIN_WORK * 16 multiply-adds are split
 * across the thread pool (the plain loops stay whole, where their sizes are constants). */
__attribute__((always_inline)) static inline void bp_gemm(int ta, int tb, int64_t M, int64_t N, int64_t K,
                           const bp_real *restrict A, int64_t lda, const bp_real *restrict B, int64_t ldb,
                           bp_real *restrict C, int64_t ldc)
{
    const int64_t parts = bp_gemm_blas(M, N, K) ? bp_parts(M * N * K / 16) : 1;
    if (parts > 1 && (M >= 32 || N >= 32)) {
        const struct bp_gemm_args g = {ta, tb, M, N, K, lda, ldb, ldc, A, B, C};
        bp_parallel(bp_gemm_piece, &g, parts);
    } else {
        bp_gemm_serial(ta, tb, M, N, K, A, lda, B, ldb, C, ldc);
    }
}

/* --- random numbers ------------------------------------------------------------------------
 * splitmix64 (Steele, Lea and Flood, 2014) and a counter-based generator built on its mixing
 * function. The one C implementation: the dropout kernels (templates/random.c.j2) and the
 * exported library (bp_model_splitmix64, its parameter initialization) call these; NumPy
 * copies exist only as test oracles (bpcompile.ops.core's mix64, uniform_stream). */
#define BP_GOLDEN 0x9E3779B97F4A7C15ULL /* 2^64 / golden ratio: splitmix64's increment */

/* splitmix64's output function: a bijective mix of 64 bits. */
static inline uint64_t bp_mix64(uint64_t x)
{
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ULL;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBULL;
    return x ^ (x >> 31);
}

/* The next output of the splitmix64 stream whose state is *state. */
static inline uint64_t bp_splitmix64(uint64_t *state)
{
    return bp_mix64(*state += BP_GOLDEN);
}

/* A uniform double in [0, 1) from the top 53 bits of x. */
static inline double bp_unit(uint64_t x)
{
    return (double)(x >> 11) * 0x1.0p-53;
}

/* The key of random stream `salt` at step `counter` of the model seeded `seed`. */
static inline uint64_t bp_random_key(int64_t seed, uint64_t salt, int64_t counter)
{
    return ((uint64_t)seed * BP_GOLDEN + salt * 0xBF58476D1CE4E5B9ULL) ^ ((uint64_t)counter * 0xD1B54A32D192ED03ULL);
}

/* Element i of the stream with this key: uniform in [0, 1), two mixing rounds of splitmix64's
 * i+1-th state, so any element is drawn without drawing the ones before it. */
static inline double bp_random_uniform(uint64_t key, int64_t i)
{
    return bp_unit(bp_mix64(bp_mix64(key + (uint64_t)(i + 1) * BP_GOLDEN)));
}

/* --- the workspace plan ------------------------------------------------------------------
 * Where an entry point's workspace buffers go in its arena, for the runtime sizes `dims` (the
 * `num_dims` named dimensions, in the model's order). Buffer i is row i of `table`, `stride`
 * values long:
 *     { coef, start, end, ndims, d_0, ..., d_(ndims-1) }
 * holding coef * dims[d_0] * ... * dims[d_(ndims-1)] values of `itemsize` bytes (rounded up to
 * 64 bytes) and live from kernel `start` to kernel `end`, both included. Buffers are placed
 * largest first (ties in table order), each at the lowest 64-byte-aligned offset that overlaps
 * no buffer already placed and live at the same time; offsets go to off[i]. `work` is scratch
 * of 3 n values, so the plan allocates nothing. Returns the arena's size in bytes (0 without
 * buffers); -1 for a malformed table (an unknown dimension, a negative size or interval), -2
 * when a size is beyond int64. The one implementation of the plan: the Python runtime calls it
 * through cffi (runtime.native) and the exported C library from bp_model_set_dims. */
#if BP_DEFINES_RUNTIME /* defined once: in part 0 of a module built in parts */
#define BP_PLAN_ALIGN 64
int64_t bp_plan_workspace(int64_t n, const int64_t *table, int64_t stride, const int64_t *dims, int64_t num_dims,
                          int64_t itemsize, int64_t *off, int64_t *work)
{
    int64_t *size = work, *order = work + n, *placed = work + 2 * n; /* placed: by (offset, end) */
    int64_t total = 0;
    if (n < 0 || stride < 4 || itemsize < 1)
        return -1;
    for (int64_t i = 0; i < n; ++i) {
        const int64_t *row = table + i * stride;
        int64_t count = row[0];
        if (count < 0 || row[1] < 0 || row[2] < row[1] || row[3] < 0 || row[3] > stride - 4)
            return -1;
        for (int64_t k = 0; k < row[3]; ++k) {
            const int64_t d = row[4 + k];
            if (d < 0 || d >= num_dims || dims[d] < 0)
                return -1;
            if (dims[d] > 0 && count > INT64_MAX / dims[d])
                return -2;
            count *= dims[d];
        }
        if (count > (INT64_MAX - BP_PLAN_ALIGN) / itemsize)
            return -2;
        size[i] = (count * itemsize + BP_PLAN_ALIGN - 1) / BP_PLAN_ALIGN * BP_PLAN_ALIGN;
        int64_t j = i; /* insertion into `order`, by size descending, stable */
        while (j > 0 && size[order[j - 1]] < size[i]) {
            order[j] = order[j - 1];
            --j;
        }
        order[j] = i;
    }
    for (int64_t p = 0; p < n; ++p) {
        const int64_t b = order[p], start = table[b * stride + 1], end = table[b * stride + 2];
        int64_t offset = 0;
        for (int64_t q = 0; q < p; ++q) { /* the buffers placed so far, by (offset, end) */
            const int64_t c = placed[q];
            if (table[c * stride + 1] > end || start > table[c * stride + 2])
                continue; /* not live at the same time */
            if (offset + size[b] <= off[c])
                break; /* fits in the gap below c, and below every later one */
            if (off[c] + size[c] > offset)
                offset = off[c] + size[c];
        }
        off[b] = offset;
        if (offset + size[b] > total)
            total = offset + size[b];
        int64_t q = p; /* insertion into `placed`, by (offset, end) */
        while (q > 0 && (off[placed[q - 1]] > offset ||
                         (off[placed[q - 1]] == offset && size[placed[q - 1]] > size[b]))) {
            placed[q] = placed[q - 1];
            --q;
        }
        placed[q] = b;
    }
    return total;
}
#endif

#endif /* BP_RUNTIME_H */
