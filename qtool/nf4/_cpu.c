/* NF4 CPU kernels, compiled ahead of time (see qtool/nf4/_cpu.py for how they are built and loaded, and
 * qtool/nf4/codec.py for the format). Plain C11 + pthreads, no Python API: called through ctypes, which releases the
 * GIL for the duration of a call.
 *
 * They reproduce bitsandbytes 0.50.2 bit for bit:
 *   - element -> fp32 exactly (fp16 by the exponent-rebias multiply, bf16 by a 16-bit shift, fp32 as is);
 *   - absmax of a block = max |x| in fp32 (an input value, so exact), taken as the integer max of the sign-cleared
 *     bits (an integer reduction vectorises; a float one with NaN semantics does not);
 *   - scale = fp32 reciprocal of absmax (clamped to 1e-38 as bitsandbytes does), then x * scale in fp32;
 *   - 4-bit code = number of NF4 thresholds strictly below the scaled value (a value on a threshold takes the
 *     lower code);
 *   - double quantisation of the block constants: the CPU look-up table or the CUDA binary search.
 * Every operation is IEEE fp32/fp64 with no contraction into FMA (built with -ffp-contract=off, never -ffast-math),
 * so the vector width a CPU offers (the target_clones below) never changes a result.
 *
 * Inputs are raw bit patterns: uint16 for fp16/bf16, uint32 for fp32 (`kind` says which). Arrays are contiguous.
 * Work is split over `n_threads` threads by groups of GROUP_BLOCKS blocks; every per-group result lands in its own
 * slot, so the results do not depend on the thread count or on which thread ran which group.
 */
#include <float.h>
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>

#if FLT_EVAL_METHOD != 0
#error "the kernels need fp32 arithmetic in fp32 (SSE, not x87): bit-exactness depends on it"
#endif

#define KIND_F16 0
#define KIND_BF16 1
#define KIND_F32 2
#define GROUP_BLOCKS 256 /* blocks per work item: 16 Ki elements at blocksize 64 (= the nested blocksize) */
#define LANES 16         /* independent partial sums per quantity in measure_block */
#define MAX_BLOCKSIZE 4096
#define MAX_THREADS 256
#define ABI_VERSION 1 /* bump when a signature below changes; _cpu.py checks it */

#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(QTOOL_NO_CLONES)
/* one compiled copy per instruction set, chosen when the library loads (GCC/clang function multi-versioning) */
#define HOT __attribute__((target_clones("default", "arch=x86-64-v3", "arch=x86-64-v4")))
#else
#define HOT
#endif

static const float MIN_ABSMAX = 1e-38f;  /* bitsandbytes: absmax.clamp(min=1e-38) before the reciprocal */
static const float F16_REBIAS = 0x1p112f; /* (fp16 magnitude bits << 13) read as fp32, times 2**112, = the value */

#ifndef QTOOL_SOURCE_SHA256
#define QTOOL_SOURCE_SHA256 "" /* set by the build: the sha256 of this file, so that a stale build is never used */
#endif

int qtool_abi_version(void) { return ABI_VERSION; }
const char *qtool_source_sha256(void) { return QTOOL_SOURCE_SHA256; }

/* ------------------------------------------------------------------------------------------------- threads */
typedef void (*group_fn)(void *ctx, int64_t g);

typedef struct {
    group_fn fn;
    void *ctx;
    int64_t n_groups;
    int64_t next; /* the next group to take (atomic) */
} pool_t;

static void *pool_worker(void *arg) {
    pool_t *p = (pool_t *)arg;
    for (;;) {
        int64_t g = __atomic_fetch_add(&p->next, 1, __ATOMIC_RELAXED);
        if (g >= p->n_groups) return NULL;
        p->fn(p->ctx, g);
    }
}

/* fn(ctx, g) for g in [0, n_groups), on up to n_threads threads (this one included). */
static void parallel_for(int n_threads, int64_t n_groups, group_fn fn, void *ctx) {
    pool_t pool = {fn, ctx, n_groups, 0};
    pthread_t threads[MAX_THREADS];
    int started = 0;
    if (n_threads > n_groups) n_threads = (int)n_groups;
    if (n_threads > MAX_THREADS) n_threads = MAX_THREADS;
    for (int i = 1; i < n_threads; i++) { /* a thread that cannot start leaves its share to the others */
        if (pthread_create(&threads[started], NULL, pool_worker, &pool) == 0) started++;
    }
    pool_worker(&pool);
    for (int i = 0; i < started; i++) pthread_join(threads[i], NULL);
}

/* ------------------------------------------------------------------------------------------------ one block */
static inline float f32_from_bits(uint32_t u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint32_t bits_of_f32(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

/* The fp32 values of the m elements starting at element lo of src, into f. */
static inline void to_f32(const void *src, int kind, int64_t lo, int m, float *restrict f) {
    if (kind == KIND_F32) {
        memcpy(f, (const uint32_t *)src + lo, 4 * (size_t)m);
        return;
    }
    const uint16_t *restrict s = (const uint16_t *)src + lo;
    if (kind == KIND_BF16) {
        for (int j = 0; j < m; j++) f[j] = f32_from_bits((uint32_t)s[j] << 16);
        return;
    }
    for (int j = 0; j < m; j++) { /* exact for normals and subnormals; Inf/NaN are refused before this runs */
        float mag = f32_from_bits(((uint32_t)s[j] & 0x7FFFu) << 13) * F16_REBIAS;
        f[j] = f32_from_bits(bits_of_f32(mag) | (((uint32_t)s[j] & 0x8000u) << 16));
    }
}

/* max |x| over the m elements starting at lo, as fp32; *nonfinite = whether they hold Inf/NaN. */
static inline float block_absmax_of(const void *src, int kind, int64_t lo, int m, int *nonfinite) {
    if (kind == KIND_F32) {
        const uint32_t *restrict s = (const uint32_t *)src + lo;
        uint32_t mx = 0;
        for (int j = 0; j < m; j++) {
            uint32_t v = s[j] & 0x7FFFFFFFu;
            mx = v > mx ? v : mx;
        }
        *nonfinite = mx >= 0x7F800000u;
        return f32_from_bits(mx);
    }
    const uint16_t *restrict s = (const uint16_t *)src + lo;
    uint16_t mx = 0;
    for (int j = 0; j < m; j++) {
        uint16_t v = s[j] & 0x7FFFu;
        mx = v > mx ? v : mx;
    }
    if (kind == KIND_BF16) {
        *nonfinite = mx >= 0x7F80u;
        return f32_from_bits((uint32_t)mx << 16);
    }
    *nonfinite = mx >= 0x7C00u;
    return f32_from_bits((uint32_t)mx << 13) * F16_REBIAS;
}

/* The NF4 code of a scaled value: how many of the 15 thresholds lie strictly below it (branch-free: vectorises). */
static inline uint8_t nf4_code(float s, const float *th) {
    int q = 0;
    for (int k = 0; k < 15; k++) q += s > th[k];
    return (uint8_t)q;
}

/* Add one block's reconstruction error to the lane sums acc (fp64; rows: sum x^2, sum err^2, sum ideal err^2,
 * max |err|); return the count of non-finite x_hat in it. fb: the block's m fp32 source values; pb: its packed
 * codes (decoded here, as a loader would, rather than taken from the encoder); stored / exact: its constant as the
 * loaders see it and as max |x|; c: scratch of at least m + 1 floats. Element j goes to lane j % LANES, the elements
 * after the last full multiple of LANES to lane 0. Each lane's arithmetic is plain IEEE, so the sums do not depend
 * on the vector width. */
static inline int64_t measure_block(const float *restrict fb, const uint8_t *restrict pb, int m, float stored,
                                    float exact, const float *restrict code, float *restrict c,
                                    double acc[4][LANES]) {
    for (int j = 0; j < (m + 1) / 2; j++) { /* element 2j from the high nibble, 2j + 1 from the low one */
        c[2 * j] = code[pb[j] >> 4];
        c[2 * j + 1] = code[pb[j] & 15];
    }
    int full = m - m % LANES;
    for (int j0 = 0; j0 < full; j0 += LANES) {
        for (int l = 0; l < LANES; l++) {
            double x = fb[j0 + l];
            double d = x - (double)(c[j0 + l] * stored); /* the product in fp32, as the loaders compute it */
            double di = x - (double)(c[j0 + l] * exact);
            acc[0][l] += x * x;
            acc[1][l] += d * d;
            acc[2][l] += di * di;
            double ad = fabs(d);
            acc[3][l] = ad > acc[3][l] ? ad : acc[3][l];
        }
    }
    for (int j = full; j < m; j++) {
        double x = fb[j];
        double d = x - (double)(c[j] * stored);
        double di = x - (double)(c[j] * exact);
        acc[0][0] += x * x;
        acc[1][0] += d * d;
        acc[2][0] += di * di;
        double ad = fabs(d);
        acc[3][0] = ad > acc[3][0] ? ad : acc[3][0];
    }
    /* |code| <= 1, so x_hat = code * stored is finite exactly when stored is (0 * inf is NaN too) */
    return isfinite(stored) ? 0 : m;
}

/* Whether a block constant `stored` is further from the block's exact absmax than double quantisation may move it
 * (tol: one gap of the 8-bit code times the group's nested absmax, 0 without double quantisation), plus fp32
 * rounding of code * nested + offset (4 ulp) and the 1e-38 that bitsandbytes stores for a zero tail block. NaN
 * compares false: non-finite constants are counted as non-finite output instead. */
static inline int constant_is_off(float stored, float exact, double tol) {
    float big = fabsf(stored);
    if (exact > big || isnan(exact)) big = exact;
    if (isnan(stored)) big = stored;
    float spacing = f32_from_bits(bits_of_f32(big) + 1u) - big; /* the fp32 gap above big */
    return fabs((double)stored - (double)exact) > tol + (4.0 * (double)spacing + 1e-37);
}

static inline void store_group(int64_t g, double acc[4][LANES], int64_t n_nonfinite, int64_t n_off, double *sums,
                               int64_t *counts) {
    double s0 = 0, s1 = 0, s2 = 0, mx = 0;
    for (int l = 0; l < LANES; l++) { /* in lane order */
        s0 += acc[0][l];
        s1 += acc[1][l];
        s2 += acc[2][l];
        mx = acc[3][l] > mx ? acc[3][l] : mx;
    }
    sums[4 * g] = s0;
    sums[4 * g + 1] = s1;
    sums[4 * g + 2] = s2;
    sums[4 * g + 3] = mx;
    counts[2 * g] = n_nonfinite;
    counts[2 * g + 1] = n_off;
}

/* --------------------------------------------------------------------------------------- pass 1: block absmax */
typedef struct {
    const void *src;
    int kind;
    int64_t n;
    int blocksize;
    float *absmax;
    int64_t *bad; /* per group: blocks holding Inf/NaN */
} absmax_args;

HOT static void absmax_group(void *ctx, int64_t g) {
    absmax_args *a = (absmax_args *)ctx;
    int64_t n_blocks = (a->n + a->blocksize - 1) / a->blocksize;
    int64_t end = (g + 1) * GROUP_BLOCKS < n_blocks ? (g + 1) * GROUP_BLOCKS : n_blocks;
    int64_t bad = 0;
    for (int64_t b = g * GROUP_BLOCKS; b < end; b++) {
        int64_t lo = b * a->blocksize;
        int m = (int)(a->n - lo < a->blocksize ? a->n - lo : a->blocksize);
        int nonfinite;
        a->absmax[b] = block_absmax_of(a->src, a->kind, lo, m, &nonfinite);
        bad += nonfinite;
    }
    a->bad[g] = bad;
}

/* absmax[b] = max |x| over block b of the n elements (the last block may be partial), in fp32. Returns the number of
 * blocks holding Inf/NaN (their absmax is then meaningless). `bad`: scratch of one int64 per group. */
int64_t qtool_block_absmax(const void *src, int kind, int64_t n, int blocksize, float *absmax, int64_t *bad,
                           int n_threads) {
    absmax_args a = {src, kind, n, blocksize, absmax, bad};
    int64_t n_groups = ((n + blocksize - 1) / blocksize + GROUP_BLOCKS - 1) / GROUP_BLOCKS;
    parallel_for(n_threads, n_groups, absmax_group, &a);
    int64_t total = 0;
    for (int64_t g = 0; g < n_groups; g++) total += bad[g];
    return total;
}

/* ------------------------------------------------------------------------- pass 2: 4-bit codes (and measurement) */
typedef struct {
    const void *src;
    int kind;
    int64_t n;
    int blocksize;
    const float *th;
    int zero_block_code;
    const float *exact;
    uint8_t *packed;
    int measure;
    const float *stored;
    const float *code;
    const double *tol;
    int64_t tol_blocks;
    double *sums;
    int64_t *counts;
} quantize_args;

HOT static void quantize_group(void *ctx, int64_t g) {
    quantize_args *a = (quantize_args *)ctx;
    const int bs = a->blocksize;
    int64_t n_blocks = (a->n + bs - 1) / bs, n_full = a->n / bs;
    int64_t end = (g + 1) * GROUP_BLOCKS < n_blocks ? (g + 1) * GROUP_BLOCKS : n_blocks;
    float f[MAX_BLOCKSIZE];     /* the block's fp32 values */
    uint8_t q[MAX_BLOCKSIZE];   /* its 4-bit codes, one per byte before packing */
    float c[MAX_BLOCKSIZE + 1]; /* measure: its decoded code values */
    float th[15];
    double acc[4][LANES] = {{0}};
    int64_t n_nonfinite = 0, n_off = 0;
    uint8_t zero_byte = (uint8_t)((a->zero_block_code << 4) | a->zero_block_code);
    memcpy(th, a->th, sizeof th);
    for (int64_t b = g * GROUP_BLOCKS; b < end; b++) {
        int64_t lo = b * bs;
        int m = (int)(a->n - lo < bs ? a->n - lo : bs);
        uint8_t *pb = a->packed + lo / 2;
        to_f32(a->src, a->kind, lo, m, f);
        if (b < n_full) { /* the partial last block is the caller's (bitsandbytes treats it differently) */
            float am = a->exact[b];
            if (am == 0.0f) {
                memset(pb, zero_byte, (size_t)bs / 2);
            } else {
                float r = 1.0f / (am > MIN_ABSMAX ? am : MIN_ABSMAX);
                /* codes into a byte buffer first: a contiguous loop vectorises, the pairwise one does not */
                for (int j = 0; j < bs; j++) q[j] = nf4_code(f[j] * r, th);
                for (int j = 0; j < bs / 2; j++) pb[j] = (uint8_t)((q[2 * j] << 4) | q[2 * j + 1]);
            }
        }
        if (a->measure) {
            n_nonfinite += measure_block(f, pb, m, a->stored[b], a->exact[b], a->code, c, acc);
            n_off += constant_is_off(a->stored[b], a->exact[b], a->tol[b / a->tol_blocks]);
        }
    }
    if (a->measure) store_group(g, acc, n_nonfinite, n_off, a->sums, a->counts);
}

/* Quantise the full blocks of src (n elements) given each block's exact absmax `exact` (from qtool_block_absmax):
 * writes packed[0 : (n / blocksize) * blocksize / 2], the first element of a pair in the high nibble. An all-zero
 * block gets zero_block_code for every element (7 on bitsandbytes' CPU path, 0 on its CUDA path).
 *
 * With `measure`, also compares every block, the partial last one included (its codes must already be in packed),
 * with its source: per group g of GROUP_BLOCKS blocks, sums[4g .. 4g+3] = (sum x^2, sum (x - x_hat)^2,
 * sum (x - x_ideal)^2, max |x - x_hat|) and counts[2g, 2g+1] = (non-finite x_hat, constants off), where
 * x_hat = code[q] * stored[b] (fp32, as the loaders compute it), x_ideal = code[q] * exact[b], and a constant is off
 * by constant_is_off with tol[b / tol_blocks]. Without `measure`, stored/code/tol/sums/counts may be NULL. */
void qtool_quantize_blocks(const void *src, int kind, int64_t n, int blocksize, const float *th, int zero_block_code,
                           const float *exact, uint8_t *packed, int measure, const float *stored, const float *code,
                           const double *tol, int64_t tol_blocks, double *sums, int64_t *counts, int n_threads) {
    quantize_args a = {src, kind, n, blocksize, th, zero_block_code, exact, packed, measure, stored, code, tol,
                       tol_blocks, sums, counts};
    int64_t n_groups = ((n + blocksize - 1) / blocksize + GROUP_BLOCKS - 1) / GROUP_BLOCKS;
    parallel_for(n_threads, n_groups, quantize_group, &a);
}

/* ------------------------------------------------------------------- measurement of a tensor quantised elsewhere */
typedef struct {
    const void *src;
    int kind;
    const uint8_t *packed;
    const float *stored;
    const float *code;
    int blocksize;
    int64_t n;
    const double *tol;
    int64_t tol_blocks;
    double *sums;
    int64_t *counts;
} stats_args;

HOT static void stats_group(void *ctx, int64_t g) {
    stats_args *a = (stats_args *)ctx;
    const int bs = a->blocksize;
    int64_t n_blocks = (a->n + bs - 1) / bs;
    int64_t end = (g + 1) * GROUP_BLOCKS < n_blocks ? (g + 1) * GROUP_BLOCKS : n_blocks;
    float f[MAX_BLOCKSIZE];
    float c[MAX_BLOCKSIZE + 1];
    double acc[4][LANES] = {{0}};
    int64_t n_nonfinite = 0, n_off = 0;
    for (int64_t b = g * GROUP_BLOCKS; b < end; b++) {
        int64_t lo = b * bs;
        int m = (int)(a->n - lo < bs ? a->n - lo : bs);
        int nonfinite;
        float exact = block_absmax_of(a->src, a->kind, lo, m, &nonfinite);
        to_f32(a->src, a->kind, lo, m, f);
        n_nonfinite += measure_block(f, a->packed + lo / 2, m, a->stored[b], exact, a->code, c, acc);
        n_off += constant_is_off(a->stored[b], exact, a->tol[b / a->tol_blocks]);
    }
    store_group(g, acc, n_nonfinite, n_off, a->sums, a->counts);
}

/* qtool_quantize_blocks' measurement on its own, for a tensor quantised elsewhere (qtool verify --source, a GPU
 * conversion): each block's exact absmax is found here from src. Fills sums and counts alike. */
void qtool_reconstruction_stats(const void *src, int kind, const uint8_t *packed, const float *stored,
                                const float *code, int blocksize, int64_t n, const double *tol, int64_t tol_blocks,
                                double *sums, int64_t *counts, int n_threads) {
    stats_args a = {src, kind, packed, stored, code, blocksize, n, tol, tol_blocks, sums, counts};
    int64_t n_groups = ((n + blocksize - 1) / blocksize + GROUP_BLOCKS - 1) / GROUP_BLOCKS;
    parallel_for(n_threads, n_groups, stats_group, &a);
}

/* The per-group results summed over the tensor, in group order: out = (sum x^2, sum err^2, sum ideal err^2,
 * max |err|), out_counts = (non-finite x_hat, constants off). */
void qtool_total_stats(const double *sums, const int64_t *counts, int64_t n_groups, double *out, int64_t *out_counts) {
    double s0 = 0, s1 = 0, s2 = 0, mx = 0;
    int64_t c0 = 0, c1 = 0;
    for (int64_t g = 0; g < n_groups; g++) {
        s0 += sums[4 * g];
        s1 += sums[4 * g + 1];
        s2 += sums[4 * g + 2];
        mx = sums[4 * g + 3] > mx ? sums[4 * g + 3] : mx;
        c0 += counts[2 * g];
        c1 += counts[2 * g + 1];
    }
    out[0] = s0;
    out[1] = s1;
    out[2] = s2;
    out[3] = mx;
    out_counts[0] = c0;
    out_counts[1] = c1;
}

/* ------------------------------------------------------------------------------------- double quantisation */
static float nested_block_absmax(const float *y, int64_t lo, int64_t hi) {
    float am = 0.0f;
    for (int64_t j = lo; j < hi; j++) {
        float v = fabsf(y[j]);
        am = v > am ? v : am;
    }
    return am;
}

/* bitsandbytes 0.50 CPU quantize_blockwise (csrc/cpu_ops.cpp): a 65,536-bin look-up table on y * (1/absmax). The bin
 * index is uint16((clamp(v, -1, 1) + 1) * 0.5 * 65535 + 0.5) in fp32; an all-zero block gets code 0. */
void qtool_nested_codes_lut(const float *y, int64_t n, int blocksize, const uint8_t *lut, uint8_t *codes,
                            float *nested_absmax) {
    for (int64_t b = 0; b < (n + blocksize - 1) / blocksize; b++) {
        int64_t lo = b * blocksize, hi = lo + blocksize < n ? lo + blocksize : n;
        float am = nested_block_absmax(y, lo, hi);
        nested_absmax[b] = am;
        if (am == 0.0f) {
            memset(codes + lo, 0, (size_t)(hi - lo));
            continue;
        }
        float inv = 1.0f / am;
        for (int64_t j = lo; j < hi; j++) {
            float v = y[j] * inv;
            v = v < -1.0f ? -1.0f : (v > 1.0f ? 1.0f : v);
            float t = (v + 1.0f) * 0.5f;
            t = t * 65535.0f;
            codes[j] = lut[(uint16_t)(t + 0.5f)];
        }
    }
}

/* bitsandbytes' dQuantize<0> of one scaled value: a 7-step binary search over the 256 sorted code values, then a
 * midpoint test (ties go to the pivot); NaN fails every comparison and lands on code 0. Written with selects rather
 * than branches (the comparisons are data-dependent: branches mispredicted ~90 ns per value), so it vectorises. */
static inline uint8_t dquantize(float x, const float *code) {
    int pivot = 127, upper_pivot = 255, lower_pivot = 0;
    float lower = -1.0f, upper = 1.0f, val = code[127];
    for (int step = 64; step > 0; step >>= 1) {
        int above = x > val;
        lower_pivot = above ? pivot : lower_pivot;
        lower = above ? val : lower;
        upper_pivot = above ? upper_pivot : pivot;
        upper = above ? upper : val;
        pivot = above ? pivot + step : pivot - step;
        val = code[pivot];
    }
    upper = upper_pivot == 255 ? code[255] : upper;
    lower = lower_pivot == 0 ? code[0] : lower;
    int up = x > (upper + val) * 0.5f ? upper_pivot : pivot;
    int down = x < (lower + val) * 0.5f ? lower_pivot : pivot;
    return (uint8_t)(x > val ? up : down);
}

/* bitsandbytes CUDA kQuantizeBlockwise + dQuantize<0>, with an IEEE reciprocal: 8-bit codes of y * (1/absmax) per
 * block. An all-zero block scales to NaN there, which lands on code 0.
 *
 * The search ends next to its answer with both neighbours as bracket, so its result is the number of fp32
 * midpoints mid[k] = (code[k] + code[k+1]) * 0.5f strictly below x — except for x exactly on a midpoint, where the
 * path decides (dquantize above is asked then). That count is found from the CPU's 65,536-bin look-up table `lut`
 * (at most two codes off) and corrected by comparing with the neighbouring midpoints: ~5 ns a value instead of ~50
 * for the search itself. tests/test_nf4.py checks it against the literal search, midpoints and their neighbours
 * included. */
HOT void qtool_nested_codes_search(const float *y, int64_t n, int blocksize, const float *code, const uint8_t *lut,
                                   uint8_t *codes, float *nested_absmax) {
    float mid[255];
    for (int k = 0; k < 255; k++) mid[k] = (code[k + 1] + code[k]) * 0.5f;
    for (int64_t b = 0; b < (n + blocksize - 1) / blocksize; b++) {
        int64_t lo = b * blocksize, hi = lo + blocksize < n ? lo + blocksize : n;
        float am = nested_block_absmax(y, lo, hi);
        nested_absmax[b] = am;
        if (am == 0.0f) {
            memset(codes + lo, 0, (size_t)(hi - lo));
            continue;
        }
        float inv = 1.0f / am;
        for (int64_t j = lo; j < hi; j++) {
            float x = y[j] * inv;
            if (isnan(x)) {
                codes[j] = 0;
                continue;
            }
            float v = x < -1.0f ? -1.0f : (x > 1.0f ? 1.0f : x);
            int c = lut[(uint16_t)((v + 1.0f) * 0.5f * 65535.0f + 0.5f)];
            while (c < 255 && mid[c] < x) c++;
            while (c > 0 && !(mid[c - 1] < x)) c--;
            codes[j] = (c < 255 && x == mid[c]) ? dquantize(x, code) : (uint8_t)c;
        }
    }
}

/* The fp32 block constants of double quantisation as the loaders compute them (bitsandbytes dequantize_blockwise,
 * then + offset): out[b] = code8[codes[b]] * nested[b / nested_blocksize] + offset, an fp32 multiply then an fp32
 * add (two roundings; never one FMA). */
void qtool_absmax_fp32(const uint8_t *codes, const float *nested, const float *code8, float offset,
                       int nested_blocksize, int64_t n_blocks, float *out) {
    for (int64_t b = 0; b < n_blocks; b++) {
        float scaled = code8[codes[b]] * nested[b / nested_blocksize];
        out[b] = scaled + offset;
    }
}

/* ------------------------------------------------------------------------------------------- dequantisation */
typedef struct {
    const uint8_t *packed;
    const float *absmax;
    const float *code;
    int blocksize;
    int64_t n;
    float *out;
} dequant_args;

HOT static void dequant_group(void *ctx, int64_t g) {
    dequant_args *a = (dequant_args *)ctx;
    const int bs = a->blocksize;
    int64_t n_blocks = (a->n + bs - 1) / bs;
    int64_t end = (g + 1) * GROUP_BLOCKS < n_blocks ? (g + 1) * GROUP_BLOCKS : n_blocks;
    float code[16];
    memcpy(code, a->code, sizeof code);
    for (int64_t b = g * GROUP_BLOCKS; b < end; b++) {
        int64_t lo = b * bs;
        int64_t m = a->n - lo < bs ? a->n - lo : bs;
        float s = a->absmax[b];
        const uint8_t *pb = a->packed + lo / 2;
        float *o = a->out + lo;
        for (int64_t j = 0; j < m / 2; j++) { /* element 2j from the high nibble, 2j + 1 from the low one */
            o[2 * j] = code[pb[j] >> 4] * s;
            o[2 * j + 1] = code[pb[j] & 15] * s;
        }
        if (m % 2) o[m - 1] = code[pb[m / 2] >> 4] * s; /* an odd last element: the high nibble of the last byte */
    }
}

/* out[i] = code[nibble i] * absmax[i / blocksize] in fp32, for the n elements. */
void qtool_dequantize_blocks(const uint8_t *packed, const float *absmax, const float *code, int blocksize, int64_t n,
                             float *out, int n_threads) {
    dequant_args a = {packed, absmax, code, blocksize, n, out};
    int64_t n_groups = ((n + blocksize - 1) / blocksize + GROUP_BLOCKS - 1) / GROUP_BLOCKS;
    parallel_for(n_threads, n_groups, dequant_group, &a);
}
