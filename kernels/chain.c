/* tedepr sparse tensor-chain kernel: one call runs a whole tensorized layer for a batch.
 *
 * A layer is a chain of steps. Step k multiplies a sparse core matrix A_k (CSR, rows = the
 * core axes the step produces, columns = the axes it contracts) into the activation buffer
 * X_k, stored "feature-major": X_k[kk][f] with the contracted index kk as the row and the
 * free indices + batch as the contiguous column f = g * B + b (B = batch, innermost):
 *
 *     Y[o][f] = sum_j val[j] * X_k[col[j]][f]      for j in row_ptr[o] .. row_ptr[o+1]
 *
 * The permutation into the next step's layout is fused into the store: element (o, f) goes
 * to out[unit * (roff[o] + goff[g]) + b * bstride] (unit = B, bstride = 1 between steps),
 * so no step ever transposes a buffer.
 * The columns are walked in tiles of 64/32/16/8/4/1 floats held in registers while the CSR
 * rows stream past; every output element is written exactly once.
 *
 * Portable C99 + GCC/Clang vector extensions (SSE, AVX2, AVX-512, NEON alike); fp32;
 * deterministic: each output element is one sum in an order fixed by the CSR and the tile
 * width (a function of the batch size), never by the thread count. Threads: the caller
 * passes nthreads (default 1 from Python); tiles of each step are split statically across
 * POSIX threads, with a barrier between steps.
 *
 * ABI: see kernels/README.md; bump TEDEPR_ABI when a struct or a signature changes.
 */
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define TEDEPR_ABI 4

#ifndef TEDEPR_VB
#if defined(__AVX512F__)
#define TEDEPR_VB 16
#elif defined(__AVX__)
#define TEDEPR_VB 8
#else
#define TEDEPR_VB 4
#endif
#endif

typedef float vf __attribute__((vector_size(TEDEPR_VB * 4)));
typedef float v8 __attribute__((vector_size(32)));
typedef float v4 __attribute__((vector_size(16)));

/* One step of the chain (mirrored by tedepr_cli/kernels/cpu.py:_Step). */
typedef struct {
    int32_t n_rows;        /* output rows o of the step (CSR rows) */
    int32_t n_in_rows;     /* rows kk of the input buffer */
    int32_t g_in;          /* free groups of the input buffer: it has g_in * B columns */
    int32_t col_bytes;     /* 2 (uint16 columns) or 4 (int32 columns) */
    int32_t g_lo, g_hi;    /* live free groups [g_lo, g_hi): only their outputs are ever read */
    const int32_t *row_ptr; /* n_rows + 1 */
    const void *col;       /* input row kk of each stored entry */
    const float *val;      /* stored entries */
    const int32_t *roff;   /* n_rows: destination offset of each output row, in units */
    const int32_t *goff;   /* g_in: destination offset of each free group, in units */
} tedepr_step;

typedef struct {
    int32_t n_steps;
    int32_t n_in;          /* N: features of x */
    int32_t n_out;         /* M: features of y */
    int32_t buf_units;     /* largest intermediate buffer, per batch element */
    const tedepr_step *steps;
    const float *bias;     /* M floats or NULL: used by tedepr_chain_forward */
    int32_t nthreads;      /* used by tedepr_chain_forward */
    int32_t pad_;
    int64_t chunk;         /* used by tedepr_chain_forward (0: auto) */
} tedepr_chain;

int tedepr_abi(void) { return TEDEPR_ABI; }
int tedepr_vector_floats(void) { return TEDEPR_VB; }

#define OVERREAD_SLACK 64 /* floats every workspace keeps after its buffers (tiles read past) */
#ifndef TEDEPR_DIRECT_MAX
#define TEDEPR_DIRECT_MAX 8 /* batch-major outputs of up to this many samples are written in place */
#endif
#ifndef TEDEPR_CACHE_BYTES
#define TEDEPR_CACHE_BYTES (512 * 1024) /* intermediates of one batch chunk should fit here (L2) */
#endif

/* An auto chunk from the samples that fit the cache budget: a multiple of 16 (whole
 * 16-float vectors of lanes), rounded up from 12 (a chunk of 8 on 16-float vectors halves
 * every store), else 8 (huge intermediates: staying in cache matters more). Measured:
 * LeNet-300's fused program (15 fit) runs 1.8x faster at 16 than at 8; a 1024 TT layer
 * of rank 16 (3 fit) 1.1x faster at 8 than at 16. */
static int64_t round_chunk(int64_t fit) {
    if (fit >= 16) return fit - fit % 16;
    return fit >= 12 ? 16 : 8;
}

/* Samples per chunk: a call runs the chain on chunks of the batch so that the intermediate
 * buffers stay in cache. Batch-major chunks are rows of x and y; feature-major chunks are
 * column blocks, copied in and written back in place. Auto chunks: see round_chunk;
 * batch-major runs of fewer
 * than 8 samples through a multi-step chain go one by one (the in-place B = 1 path is the
 * fast one there). */
static int64_t batch_chunk(const tedepr_chain *c, int64_t batch, int32_t fm, int64_t chunk) {
    if (batch <= 1) return batch;
    if (chunk <= 0) {
        const int64_t per = 4 * (2 * (int64_t)c->buf_units + c->n_in + c->n_out);
        chunk = round_chunk(TEDEPR_CACHE_BYTES / (per > 0 ? per : 1));
    }
    (void)fm;
    return chunk < batch ? chunk : batch;
}

/* Floats of workspace one call needs (input copy, two ping-pong buffers, output buffer). */
int64_t tedepr_chain_workspace(const tedepr_chain *c, int64_t batch, int32_t x_fm, int32_t y_fm,
                               int64_t chunk) {
    const int64_t b = batch_chunk(c, batch, x_fm && y_fm, chunk);
    int64_t n = 2 * (int64_t)c->buf_units * b + (int64_t)c->n_in * b;
    if (!y_fm && b > TEDEPR_DIRECT_MAX) n += (int64_t)c->n_out * b;
    return n + OVERREAD_SLACK;
}

/* ------------------------------------------------------------ register transposes */
#if defined(__clang__)
#define SHUF8(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
typedef int32_t v8i __attribute__((vector_size(32)));
#define SHUF8(a, b, ...) __builtin_shuffle(a, b, (v8i){__VA_ARGS__})
#endif

/* In-register transpose of an 8 x 8 block (three butterfly stages). */
static inline void transpose8(v8 r[8]) {
    v8 t[8];
    for (int i = 0; i < 4; i++) {
        t[i] = SHUF8(r[i], r[i + 4], 0, 1, 2, 3, 8, 9, 10, 11);
        t[i + 4] = SHUF8(r[i], r[i + 4], 4, 5, 6, 7, 12, 13, 14, 15);
    }
    for (int i = 0; i < 8; i += 4)
        for (int k = 0; k < 2; k++) {
            r[i + k] = SHUF8(t[i + k], t[i + k + 2], 0, 1, 8, 9, 4, 5, 12, 13);
            r[i + k + 2] = SHUF8(t[i + k], t[i + k + 2], 2, 3, 10, 11, 6, 7, 14, 15);
        }
    for (int i = 0; i < 8; i += 2) {
        t[i] = SHUF8(r[i], r[i + 1], 0, 8, 2, 10, 4, 12, 6, 14);
        t[i + 1] = SHUF8(r[i], r[i + 1], 1, 9, 3, 11, 5, 13, 7, 15);
    }
    for (int i = 0; i < 8; i++) r[i] = t[i];
}

/* Unaligned, alias-free vector loads and stores by type punning (no address of an
 * accumulator is ever taken, so the accumulators stay in registers). */
typedef float vfu __attribute__((vector_size(TEDEPR_VB * 4), aligned(4), may_alias));
typedef float v8u __attribute__((vector_size(32), aligned(4), may_alias));
typedef float v4u __attribute__((vector_size(16), aligned(4), may_alias));
typedef float f1u __attribute__((aligned(4), may_alias));

/* Store the first nl lanes of a block of nr (8..16) rows x L lanes (tmp, row-major, L a
 * multiple of 8) whose rows are consecutive in memory: lane l's values go to base +
 * lane[l] as one or two vector stores of 8, after 8 x 8 register transposes, instead of
 * nr scalar stores (rows past 8 of a short block are stored one by one). */
static void flush_rows(const float *restrict tmp, int L, int nl, int nr, float *restrict base,
                       const int64_t *restrict lane) {
    for (int l0 = 0; l0 < nl; l0 += 8) {
        const int nk = nl - l0 < 8 ? nl - l0 : 8;
        v8 a[8], b[8];
        for (int i = 0; i < 8; i++) a[i] = *(const v8u *)(tmp + i * L + l0);
        transpose8(a);
        if (nr == 16) {
            for (int i = 0; i < 8; i++) b[i] = *(const v8u *)(tmp + (i + 8) * L + l0);
            transpose8(b);
            for (int k = 0; k < nk; k++) {
                *(v8u *)(base + lane[l0 + k]) = a[k];
                *(v8u *)(base + lane[l0 + k] + 8) = b[k];
            }
        } else {
            for (int k = 0; k < nk; k++) {
                *(v8u *)(base + lane[l0 + k]) = a[k];
                for (int i = 8; i < nr; i++) base[lane[l0 + k] + i] = tmp[i * L + l0 + k];
            }
        }
    }
}

/* ------------------------------------------------------------------ the tile kernels */
/* Row loop over one column tile of L = NV * E floats (E floats per vector VT): the tile's
 * accumulators live in registers, P partial sums over alternate stored entries keep
 * enough independent multiply-adds in flight (rows are short), one broadcast
 * multiply-add per stored entry and vector. mode E (or 8): every run of E (or 8) lanes
 * lands on consecutive addresses (lane[] gives each start): vector stores. mode 0: lanes
 * scatter; mode -n: a partial tile whose first n lanes are valid (the rest is padding read
 * past the columns' end and never stored). Scattered lanes are stored RB rows at a time,
 * lane by lane, so consecutive rows (roff + 1) fill each cache line in turn (with register
 * transposes where they are adjacent in memory) instead of touching L lines per row. */
#define RB 16
#ifndef TEDEPR_CHAINS
#define TEDEPR_CHAINS 4 /* independent multiply-add chains a row keeps in flight */
#endif
#define PARTIALS(NV) (TEDEPR_CHAINS / (NV) < 1 ? 1 : TEDEPR_CHAINS / (NV) > 8 ? 8 : TEDEPR_CHAINS / (NV))
#define DEFINE_TILE(NAME, VT, VTU, NV, CT)                                                   \
    static void NAME(const tedepr_step *s, const float *restrict X, int64_t ld,              \
                     float *restrict out, int64_t unit, const int64_t *restrict lane,        \
                     int mode) {                                                             \
        enum { E = (int)(sizeof(VT) / 4), L = NV * E, P = E == 1 ? 1 : PARTIALS(NV) };                    \
        const int32_t *rp = s->row_ptr, *roff = s->roff;                                    \
        const CT *restrict col = (const CT *)s->col;                                        \
        const float *restrict val = s->val;                                                  \
        const int nvalid = mode < 0 ? -mode : L;                                             \
        float tmp[RB][L] __attribute__((aligned(64)));                                       \
        for (int32_t o0 = 0; o0 < s->n_rows; o0 += RB) {                                     \
            const int nb = s->n_rows - o0 < RB ? s->n_rows - o0 : RB;                        \
            for (int i = 0; i < nb; i++) {                                                   \
                const int32_t o = o0 + i, je = rp[o + 1];                                    \
                int32_t j = rp[o];                                                           \
                VT acc[P][NV];                                                               \
                for (int p = 0; p < P; p++)                                                  \
                    for (int v = 0; v < NV; v++) acc[p][v] = (VT){0};                        \
                for (; j + P <= je; j += P)                                                  \
                    for (int p = 0; p < P; p++) {                                            \
                        const float w = val[j + p];                                          \
                        const float *xp = X + (int64_t)col[j + p] * ld;                      \
                        for (int v = 0; v < NV; v++) acc[p][v] += w * *(const VTU *)(xp + v * E); \
                    }                                                                        \
                for (; j < je; j++) {                                                        \
                    const float w = val[j];                                                  \
                    const float *xp = X + (int64_t)col[j] * ld;                              \
                    for (int v = 0; v < NV; v++) acc[0][v] += w * *(const VTU *)(xp + v * E); \
                }                                                                            \
                for (int p = 1; p < P; p++)                                                  \
                    for (int v = 0; v < NV; v++) acc[0][v] += acc[p][v];                     \
                if (mode == E) {                                                             \
                    float *dst = out + unit * (int64_t)roff[o];                              \
                    for (int v = 0; v < NV; v++) *(VTU *)(dst + lane[v * E]) = acc[0][v];    \
                } else if (E > 8 && mode == 8) {                                             \
                    float *dst = out + unit * (int64_t)roff[o];                              \
                    for (int v = 0; v < NV; v++) {                                           \
                        *(VTU *)tmp[0] = acc[0][v];                                          \
                        for (int c = 0; c < E; c += 8)                                       \
                            *(v8u *)(dst + lane[v * E + c]) = *(const v8u *)(tmp[0] + c);    \
                    }                                                                        \
                } else {                                                                     \
                    for (int v = 0; v < NV; v++) *(VTU *)(tmp[i] + v * E) = acc[0][v];       \
                }                                                                            \
            }                                                                                \
            if (mode <= 0) {                                                                 \
                int seq = unit == 1 && nb >= 8 && L % 8 == 0;                                \
                for (int i = 1; seq && i < nb; i++) seq = roff[o0 + i] == roff[o0] + i;      \
                if (seq)                                                                     \
                    flush_rows(tmp[0], L, nvalid, nb, out + roff[o0], lane);                 \
                else                                                                         \
                    for (int l = 0; l < nvalid; l++)                                         \
                        for (int i = 0; i < nb; i++)                                         \
                            out[unit * (int64_t)roff[o0 + i] + lane[l]] = tmp[i][l];         \
            }                                                                                \
        }                                                                                    \
    }

#define DEFINE_TILES(SUF, CT)                                                                \
    DEFINE_TILE(tile64_##SUF, vf, vfu, 64 / TEDEPR_VB, CT)                                   \
    DEFINE_TILE(tile32_##SUF, vf, vfu, 32 / TEDEPR_VB, CT)                                   \
    DEFINE_TILE(tile16_##SUF, vf, vfu, 16 / TEDEPR_VB, CT)                                   \
    DEFINE_TILE(tile8_##SUF, v8, v8u, 1, CT)                                                 \
    DEFINE_TILE(tile4_##SUF, v4, v4u, 1, CT)                                                 \
    DEFINE_TILE(tile1_##SUF, float, f1u, 1, CT)

DEFINE_TILES(u16, uint16_t)
DEFINE_TILES(i32, int32_t)

typedef void (*tile_fn)(const tedepr_step *, const float *, int64_t, float *, int64_t,
                        const int64_t *, int);

static const int TILE_W[6] = {64, 32, 16, 8, 4, 1};
static const int TILE_E[6] = {TEDEPR_VB, TEDEPR_VB, TEDEPR_VB, 8, 4, 1};
static const tile_fn TILES_U16[6] = {tile64_u16, tile32_u16, tile16_u16, tile8_u16, tile4_u16, tile1_u16};
static const tile_fn TILES_I32[6] = {tile64_i32, tile32_i32, tile16_i32, tile8_i32, tile4_i32, tile1_i32};

/* The tile for the next rem columns: the widest that fits, or (when the input buffer has
 * slack after its end: up to 16 floats may be read past it) one partial tile of the next
 * wider kind when that wastes less than one vector, e.g. 28 columns as one 32-wide sweep
 * over the core instead of 16 + 8 + 4. Returns the kind; *valid gets the columns it covers.
 * (Narrower tiles whose input slice fits L1 were measured slower: the extra sweeps over
 * the core cost more than the L2 reads they save.) */
static int next_tile(int64_t rem, int overread, int *valid) {
    int k = 0;
    while (TILE_W[k] > rem) k++;
    *valid = TILE_W[k];
    if (overread && k > 0 && TILE_W[k] != rem && TILE_W[k - 1] - rem < (TEDEPR_VB > 8 ? TEDEPR_VB : 8)) {
        *valid = (int)rem;
        return k - 1;
    }
    return k;
}

static int64_t n_tiles(int64_t n, int overread) {
    int64_t t = n / 64;
    int valid;
    for (n %= 64; n > 0; n -= valid, t++) next_tile(n, overread, &valid);
    return t;
}

/* Run tiles [t0, t1) of one step. overread: X may be read up to 8 floats past its end. */
static void run_step(const tedepr_step *s, int64_t batch, const float *X, float *out, int64_t unit,
                     int64_t bstride, int overread, int64_t t0, int64_t t1) {
    const int64_t ld = (int64_t)s->g_in * batch, F = (int64_t)s->g_hi * batch;
    const tile_fn *tiles = s->col_bytes == 2 ? TILES_U16 : TILES_I32;
    int64_t f0 = (int64_t)s->g_lo * batch, t = 0;
    int64_t lane[64];
    while (f0 < F && t < t1) {
        int valid;
        const int k = next_tile(F - f0, overread, &valid), w = TILE_W[k], e = TILE_E[k];
        if (t >= t0) {
            /* destination of each lane: unit * goff[g] + b * bstride, f = g * B + b */
            int64_t g = f0 / batch, b = f0 % batch;
            int mode;
            if (valid == w && e > 1 && bstride == 1 && batch % e == 0 && b % e == 0) {
                /* every run of e lanes is e consecutive samples of one group: only the
                 * run starts are needed (the common batch >= 16 case) */
                for (int l = 0; l < w; l += e) {
                    lane[l] = unit * (int64_t)s->goff[g] + b;
                    if ((b += e) == batch) { b = 0; g++; }
                }
                mode = e;
            } else {
                int run_e = 1, run_8 = e >= 8 && e % 8 == 0;
                for (int l = 0; l < valid; l++) {
                    lane[l] = unit * (int64_t)s->goff[g] + b * bstride;
                    if (l % 8 && lane[l] != lane[l - 1] + 1) run_8 = run_e = 0;
                    else if (l % e && lane[l] != lane[l - 1] + 1) run_e = 0;
                    if (++b == batch) { b = 0; g++; }
                }
                mode = valid < w ? -valid : run_e ? e : run_8 ? 8 : 0;
            }
            tiles[k](s, X + f0, ld, out, unit, lane, mode);
        }
        f0 += valid;
        t++;
    }
}

/* One h x w block (h, w <= 16) of dst = transpose(src), where src has row stride cols
 * and dst row stride rows. */
static void transpose_block(const float *restrict src, float *restrict dst, int64_t rows,
                            int64_t cols, int64_t r0, int64_t c0, int h, int w) {
    if (h == 16 && w == 16) {
        /* whole cache lines in, whole cache lines out: power-of-two strides cannot thrash */
        v8 q[4][8];
        for (int i = 0; i < 8; i++)
            for (int k = 0; k < 4; k++)
                memcpy(&q[k][i], src + (r0 + i + 8 * (k & 1)) * cols + c0 + 8 * (k >> 1), sizeof(v8));
        for (int k = 0; k < 4; k++) transpose8(q[k]);
        for (int i = 0; i < 8; i++)
            for (int k = 0; k < 4; k++)
                memcpy(dst + (c0 + i + 8 * (k >> 1)) * rows + r0 + 8 * (k & 1), &q[k][i], sizeof(v8));
        return;
    }
    for (int i = 0; i < h; i++)
        for (int k = 0; k < w; k++) dst[(c0 + k) * rows + r0 + i] = src[(r0 + i) * cols + c0 + k];
}

/* dst (cols x rows) = transpose of src (rows x cols) + bias (one value per src row, may be
 * NULL). Wide src: 16 x 16 blocks (whole cache lines in and out). Tall src: 8 destination
 * rows at a time, so that only 8 write streams are open (long power-of-two rows would
 * otherwise all fall in one cache set). */
static void transpose(const float *restrict src, float *restrict dst, int64_t rows, int64_t cols,
                      const float *restrict bias) {
    if (rows <= cols) {
        for (int64_t r = 0; r < rows; r += 16)
            for (int64_t c = 0; c < cols; c += 16)
                transpose_block(src, dst, rows, cols, r, c, rows - r < 16 ? (int)(rows - r) : 16,
                                cols - c < 16 ? (int)(cols - c) : 16);
    } else {
        int64_t c = 0;
        for (; c + 8 <= cols; c += 8) {
            int64_t r = 0;
            for (; r + 16 <= rows; r += 16) {
                v8 a[8], b[8];
                for (int i = 0; i < 8; i++) {
                    memcpy(&a[i], src + (r + i) * cols + c, sizeof(v8));
                    memcpy(&b[i], src + (r + 8 + i) * cols + c, sizeof(v8));
                }
                transpose8(a);
                transpose8(b);
                for (int k = 0; k < 8; k++) {
                    memcpy(dst + (c + k) * rows + r, &a[k], sizeof(v8));
                    memcpy(dst + (c + k) * rows + r + 8, &b[k], sizeof(v8));
                }
            }
            for (; r < rows; r++)
                for (int k = 0; k < 8; k++) dst[(c + k) * rows + r] = src[r * cols + c + k];
        }
        for (; c < cols; c++)
            for (int64_t r = 0; r < rows; r++) dst[c * rows + r] = src[r * cols + c];
    }
    if (bias)
        for (int64_t c = 0; c < cols; c++)
            for (int64_t r = 0; r < rows; r++) dst[c * rows + r] += bias[r];
}

/* ------------------------------------------------------------------------ driver */
typedef struct {
    const tedepr_chain *c;
    const float *x;
    float *y;
    int64_t batch, nouter, xs, ys, chunk;
    int32_t x_fm, y_fm, nthreads, x_slack;
    const float *bias;
    float *work;
    pthread_barrier_t bar;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int state; /* 0: wait, 1: go, -1: abort (a thread could not be started) */
} job_t;

typedef struct {
    job_t *job;
    int id;
} worker_t;

static void sync_all(job_t *j) {
    if (j->nthreads > 1) pthread_barrier_wait(&j->bar);
}

/* One chunk: x -> y for B of the call's samples; x and y point at the chunk's first
 * sample (row b0 of a batch-major array, column b0 of a feature-major one). */
static void run_block(job_t *j, int id, const float *x, float *y, int64_t B) {
    const tedepr_chain *c = j->c;
    const int64_t M = c->n_out, N = c->n_in, Ball = j->batch;
    float *pack = j->work;
    float *ping = pack + N * B;
    float *pong = ping + (int64_t)c->buf_units * B;
    float *ybuf = pong + (int64_t)c->buf_units * B;
    /* input: feature-major (N, B) is read in place (or its column block copied out);
     * batch-major (B, N) is transposed */
    const float *X = x;
    /* one sample whose first step needs a partial tile: copy it (N floats) into the
     * workspace, whose slack lets that tile read past the end */
    const int32_t live0 = c->steps[0].g_hi - c->steps[0].g_lo;
    const int pad = B == 1 && !j->x_slack && live0 % 16 != 0 && live0 > 1;
    if ((j->x_fm ? B < Ball : B > 1) || pad) {
        if (id == 0) {
            if (j->x_fm && B < Ball) {
                for (int64_t n = 0; n < N; n++) memcpy(pack + n * B, x + n * Ball, 4 * (size_t)B);
            } else if (B == 1) {
                memcpy(pack, x, 4 * (size_t)N);
            } else {
                transpose(x, pack, B, N, NULL);
            }
        }
        X = pack;
        sync_all(j);
    }
    /* output: feature-major (M, B) is the buffers' own layout, written in place (unit: the
     * call's batch); so is a narrow batch-major (B, M) (the batch at stride M, each feature
     * at unit 1); a wide batch-major one is written as (M, B) and transposed once */
    const int via_buf = !j->y_fm && B > TEDEPR_DIRECT_MAX;
    for (int32_t k = 0; k < c->n_steps; k++) {
        const tedepr_step *s = &c->steps[k];
        const int last = k + 1 == c->n_steps;
        float *out = last ? (via_buf ? ybuf : y) : ((k & 1) ? pong : ping);
        int64_t unit = B, bstride = 1;
        if (last && j->y_fm) unit = Ball;
        if (last && !j->y_fm && !via_buf) unit = 1, bstride = M;
        /* workspace buffers have slack after their end; the caller's x has not */
        const int overread = X != x || j->x_slack;
        const int64_t nt = n_tiles((int64_t)(s->g_hi - s->g_lo) * B, overread);
        const int64_t t0 = nt * id / j->nthreads, t1 = nt * (id + 1) / j->nthreads;
        run_step(s, B, X, out, unit, bstride, overread, t0, t1);
        sync_all(j);
        X = out;
    }
    if (id == 0) {
        if (via_buf) {
            transpose(ybuf, y, M, B, j->bias);
        } else if (j->bias && j->y_fm) {
            for (int64_t m = 0; m < M; m++)
                for (int64_t b = 0; b < B; b++) y[m * Ball + b] += j->bias[m];
        } else if (j->bias) {
            for (int64_t b = 0; b < B; b++)
                for (int64_t m = 0; m < M; m++) y[b * M + m] += j->bias[m];
        }
    }
    sync_all(j);
}

static void chain_work(job_t *j, int id) {
    const int64_t B = j->batch, M = j->c->n_out, N = j->c->n_in;
    for (int64_t i = 0; i < j->nouter; i++)
        for (int64_t b0 = 0, nb; b0 < B; b0 += nb) {
            nb = B - b0 < j->chunk ? B - b0 : j->chunk;
            if (!j->x_fm && !j->y_fm && nb < 8 && j->c->n_steps > 1) nb = 1;
            run_block(j, id, j->x + i * j->xs + b0 * (j->x_fm ? 1 : N),
                      j->y + i * j->ys + b0 * (j->y_fm ? 1 : M), nb);
        }
}

static void *worker(void *arg) {
    worker_t *wk = (worker_t *)arg;
    job_t *j = wk->job;
    pthread_mutex_lock(&j->mu);
    while (j->state == 0) pthread_cond_wait(&j->cv, &j->mu);
    const int go = j->state > 0;
    pthread_mutex_unlock(&j->mu);
    if (go) chain_work(j, wk->id);
    return NULL;
}

/* Run job j (fields c .. work set, nthreads requested) on nthreads threads, the caller's
 * included; 1 runs inline. If a thread cannot be started the call runs on the caller's
 * thread alone. */
static void chain_exec(job_t *job, int32_t nthreads) {
    if (nthreads < 1) nthreads = 1;
    if (nthreads > 64) nthreads = 64;
    job->nthreads = 1;
    if (nthreads == 1) {
        chain_work(job, 0);
        return;
    }
    pthread_t th[64];
    worker_t wk[64];
    pthread_mutex_init(&job->mu, NULL);
    pthread_cond_init(&job->cv, NULL);
    job->state = 0;
    int started = 1;
    for (int t = 1; t < nthreads; t++, started++) {
        wk[t].job = job;
        wk[t].id = t;
        if (pthread_create(&th[t], NULL, worker, &wk[t])) break;
    }
    job->nthreads = started;
    const int ok = started == nthreads && !pthread_barrier_init(&job->bar, NULL, (unsigned)nthreads);
    pthread_mutex_lock(&job->mu);
    job->state = ok ? 1 : -1;
    pthread_cond_broadcast(&job->cv);
    pthread_mutex_unlock(&job->mu);
    if (!ok) job->nthreads = 1;
    chain_work(job, 0);
    for (int t = 1; t < started; t++) pthread_join(th[t], NULL);
    if (ok) pthread_barrier_destroy(&job->bar);
    pthread_cond_destroy(&job->cv);
    pthread_mutex_destroy(&job->mu);
}

/* ------------------------------------------------------------ thread-local workspace */
/* A call given work == NULL uses a buffer owned by the calling thread, grown on demand and
 * freed when the thread exits: the Python side then passes no workspace at all (one
 * argument less per call, no per-call bookkeeping), and concurrent callers never share. */
typedef struct {
    float *p;
    int64_t n;
} tl_ws_t;
static pthread_key_t ws_key;
static pthread_once_t ws_once = PTHREAD_ONCE_INIT;
static int ws_key_ok;
static __thread tl_ws_t *tl_ws;

static void ws_free(void *a) {
    tl_ws_t *w = (tl_ws_t *)a;
    free(w->p);
    free(w);
}
static void ws_init(void) { ws_key_ok = !pthread_key_create(&ws_key, ws_free); }

static float *thread_workspace(int64_t n) {
    tl_ws_t *w = tl_ws;
    if (w && w->n >= n) return w->p;
    if (!w) {
        pthread_once(&ws_once, ws_init);
        w = (tl_ws_t *)calloc(1, sizeof *w);
        if (!w) return NULL;
        if (ws_key_ok) pthread_setspecific(ws_key, w);
        tl_ws = w;
    }
    free(w->p);
    w->p = NULL;
    w->n = 0;
    void *p = NULL;
    if (posix_memalign(&p, 64, (size_t)n * sizeof(float))) return NULL;
    w->p = (float *)p;
    w->n = n;
    return w->p;
}

/* Run the chain on nouter independent blocks: block i reads x + i*xs and writes y + i*ys.
 * x is (B, N) batch-major, or (N, B) feature-major if x_fm; likewise y with y_fm. bias
 * (M floats) may be NULL. chunk: samples per batch chunk of a batch-major call (0: auto,
 * see batch_chunk). work holds tedepr_chain_workspace(c, batch, x_fm, y_fm, chunk) floats,
 * or is NULL (the calling thread's own buffer). nthreads threads (the caller's included)
 * share each step; 1 runs inline. Returns 0, -1 on bad arguments, -2 if no workspace
 * could be allocated. */
int tedepr_chain_run(const tedepr_chain *c, const float *x, float *y, int64_t batch,
                     int64_t nouter, int64_t xs, int64_t ys, int32_t x_fm, int32_t y_fm,
                     const float *bias, float *work, int32_t nthreads, int64_t chunk) {
    if (!c || !x || !y || batch < 0 || nouter < 0 || c->n_steps < 1) return -1;
    if (batch == 0 || nouter == 0) return 0;
    if (!work) work = thread_workspace(tedepr_chain_workspace(c, batch, x_fm, y_fm, chunk));
    if (!work) return -2;
    job_t job;
    memset(&job, 0, sizeof job);
    job.c = c; job.x = x; job.y = y; job.batch = batch; job.nouter = nouter;
    job.xs = xs; job.ys = ys; job.x_fm = x_fm; job.y_fm = y_fm; job.bias = bias;
    job.work = work;
    job.chunk = batch_chunk(c, batch, x_fm && y_fm, chunk);
    chain_exec(&job, nthreads);
    return 0;
}

/* The common call with few arguments (each ctypes argument costs time at batch 1):
 * batch-major (B, N) -> (B, M) with the chain's own bias, threads and chunk; work may be
 * NULL (the calling thread's own buffer). */
int tedepr_chain_forward(const tedepr_chain *c, const float *x, float *y, int64_t batch,
                         float *work) {
    return tedepr_chain_run(c, x, y, batch, 1, 0, 0, 0, 0, c->bias, work, c->nthreads, c->chunk);
}

/* The same for feature-major (N, B) -> (M, B). */
int tedepr_chain_forward_fm(const tedepr_chain *c, const float *x, float *y, int64_t batch,
                            float *work) {
    return tedepr_chain_run(c, x, y, batch, 1, 0, 0, 1, 1, c->bias, work, c->nthreads, c->chunk);
}

/* ------------------------------------------------------------------------ programs */
/* A program runs consecutive layers back to back in one call: layer i is a chain with its
 * own bias, followed by an elementwise activation act[i] (0: none, 1: ReLU). The batch
 * runs in chunks of `chunk` samples (0: auto, sized so that the intermediates stay in
 * cache); within a chunk the first layer reads the batch-major input rows, the activations
 * between layers stay feature-major (n_out, chunk) in the workspace (no transposes) and
 * the last layer writes the batch-major output rows. Mirrored by
 * tedepr_cli/kernels/cpu.py:_Program. */
typedef struct {
    int32_t n_layers;
    int32_t nthreads;
    const tedepr_chain *const *layers;
    const int32_t *act;
    int64_t chunk;
} tedepr_program;

static int64_t prog_mid(const tedepr_program *p) {
    int64_t mid = 0;
    for (int32_t i = 0; i + 1 < p->n_layers; i++)
        if (p->layers[i]->n_out > mid) mid = p->layers[i]->n_out;
    return mid;
}

static int64_t prog_chunk(const tedepr_program *p, int64_t batch, int64_t chunk) {
    if (batch <= 1) return batch;
    if (chunk <= 0) {
        int64_t widest = 0;
        for (int32_t i = 0; i < p->n_layers; i++) {
            const tedepr_chain *c = p->layers[i];
            const int64_t u = 2 * (int64_t)c->buf_units + c->n_in + c->n_out;
            if (u > widest) widest = u;
        }
        const int64_t per = 4 * (2 * prog_mid(p) + widest);
        chunk = round_chunk(TEDEPR_CACHE_BYTES / (per > 0 ? per : 1));
    }
    return chunk < batch ? chunk : batch;
}

/* Floats of workspace one call needs: two activation buffers (with slack for over-reads)
 * and the largest layer workspace, for one chunk. */
int64_t tedepr_program_workspace(const tedepr_program *p, int64_t batch, int64_t chunk) {
    const int64_t b = prog_chunk(p, batch, chunk);
    int64_t layer = 0;
    for (int32_t i = 0; i < p->n_layers; i++) {
        const tedepr_chain *c = p->layers[i];
        const int64_t n = (2 * (int64_t)c->buf_units + c->n_in + c->n_out) * b;
        if (n > layer) layer = n;
    }
    return 2 * (prog_mid(p) * b + OVERREAD_SLACK) + layer + OVERREAD_SLACK;
}

/* y = act(y + bias) over a feature-major (M, B) block. */
static void bias_act(float *restrict y, int64_t M, int64_t B, const float *restrict bias, int32_t act) {
    if (B == 1) { /* one sample: a single contiguous vector */
        for (int64_t m = 0; m < M; m++) {
            const float v = y[m] + (bias ? bias[m] : 0.0f);
            y[m] = act == 1 && v < 0.0f ? 0.0f : v;
        }
        return;
    }
    for (int64_t m = 0; m < M; m++) {
        float *restrict r = y + m * B;
        const float bm = bias ? bias[m] : 0.0f;
        if (act == 1)
            for (int64_t b = 0; b < B; b++) {
                const float v = r[b] + bm;
                r[b] = v > 0.0f ? v : 0.0f;
            }
        else if (bias)
            for (int64_t b = 0; b < B; b++) r[b] += bm;
    }
}

/* x (batch, N_0) -> y (batch, M_last), both batch-major (row-major). work holds
 * tedepr_program_workspace(p, batch, p->chunk) floats, or is NULL (the calling thread's
 * own buffer). Returns 0, -1 on bad arguments, -2 if no workspace could be allocated. */
int tedepr_program_run(const tedepr_program *p, const float *x, float *y, int64_t batch, float *work) {
    if (!p || !x || !y || batch < 0 || p->n_layers < 1 || !p->layers) return -1;
    for (int32_t i = 0; i < p->n_layers; i++) {
        if (!p->layers[i] || p->layers[i]->n_steps < 1) return -1;
        if (i && p->layers[i]->n_in != p->layers[i - 1]->n_out) return -1;
    }
    if (batch == 0) return 0;
    if (!work) work = thread_workspace(tedepr_program_workspace(p, batch, p->chunk));
    if (!work) return -2;
    const int32_t L = p->n_layers;
    const int64_t chunk = prog_chunk(p, batch, p->chunk), mid = prog_mid(p);
    const int64_t N0 = p->layers[0]->n_in, ML = p->layers[L - 1]->n_out;
    float *act_buf[2] = {work, work + mid * chunk + OVERREAD_SLACK};
    float *lwork = act_buf[1] + mid * chunk + OVERREAD_SLACK;
    for (int64_t b0 = 0, nb; b0 < batch; b0 += nb) {
        nb = batch - b0 < chunk ? batch - b0 : chunk;
        const float *in = x + b0 * N0;
        for (int32_t i = 0; i < L; i++) {
            const tedepr_chain *c = p->layers[i];
            const int last = i + 1 == L;
            float *out = last ? y + b0 * ML : act_buf[i & 1];
            job_t job;
            memset(&job, 0, sizeof job);
            job.c = c; job.x = in; job.y = out; job.batch = nb; job.nouter = 1;
            job.x_fm = i > 0; job.y_fm = !last; job.x_slack = i > 0;
            job.bias = last ? c->bias : NULL;
            job.work = lwork;
            job.chunk = nb;
            chain_exec(&job, p->nthreads);
            if (!last) {
                bias_act(out, c->n_out, nb, c->bias, p->act ? p->act[i] : 0);
            } else if (p->act && p->act[i] == 1) {
                for (int64_t k = 0; k < nb * ML; k++) out[k] = out[k] > 0.0f ? out[k] : 0.0f;
            }
            in = out;
        }
    }
    return 0;
}

/* The same with the program's own workspace choice (one argument less per call). */
int tedepr_program_forward(const tedepr_program *p, const float *x, float *y, int64_t batch) {
    return tedepr_program_run(p, x, y, batch, NULL);
}

/* ------------------------------------------------------------------------ training */
/* A training forward keeps every step's input buffer X_k (feature-major, the whole batch
 * at once: no chunks) for the backward; the backward walks the steps in reverse:
 *
 *     dY_k[o][g, b] = dX_{k+1}[roff[o] + goff[g]][b]      (the forward's store, read back)
 *     dval[j]       = sum_{g live, b} dY_k[o][g, b] X_k[col[j]][g, b]     (kept entries only)
 *     dX_k          = A_k^T dY_k                         (the transposed CSR, live groups)
 *
 * dY_k is gathered into a contiguous (n_rows, live * B) buffer (B floats per (o, g)); the
 * transposed product runs through the same tile kernels as the forward, as a step whose
 * CSR is A_k^T (built and valued by the caller: tsteps[k], rows kk, columns o) and whose
 * stores put (kk, g) at kk * g_in + g_lo + g, so dX_k comes out in step k's input layout.
 * Groups outside [g_lo, g_hi) get zero gradient (their outputs are never read). Every sum
 * has a fixed order: deterministic, one thread. */

/* Floats from one saved buffer to the next: X_0 (N x B), then each step's output but the
 * last, each followed by the over-read slack the tile kernels need. */
static int64_t saved_stride(const tedepr_chain *c, int32_t k, int64_t batch) {
    const int64_t units = k == 0 ? c->n_in : (int64_t)c->steps[k].n_in_rows * c->steps[k].g_in;
    return units * batch + OVERREAD_SLACK;
}

/* Floats the caller provides for tedepr_chain_train_forward's saved buffers. */
int64_t tedepr_chain_train_saved(const tedepr_chain *c, int64_t batch) {
    int64_t n = 0;
    for (int32_t k = 0; k < c->n_steps; k++) n += saved_stride(c, k, batch);
    return n;
}

/* Steps at most a training chain has (its struct copies live on the stack). */
#define TRAIN_MAX_STEPS 64

/* Copies of the chain's steps and their transposes pointing at this call's values:
 * vals/tvals hold every step's kept entries in CSR / transposed-CSR order, step by step. */
static void bind_values(const tedepr_chain *c, const tedepr_step *tsteps, const float *vals,
                        const float *tvals, tedepr_step *st, tedepr_step *tt, int64_t *voff) {
    int64_t off = 0;
    for (int32_t k = 0; k < c->n_steps; k++) {
        st[k] = c->steps[k];
        tt[k] = tsteps[k];
        st[k].val = vals + off;
        tt[k].val = tvals + off;
        voff[k] = off;
        off += c->steps[k].row_ptr[c->steps[k].n_rows];
    }
    voff[c->n_steps] = off;
}

/* x (B, N) -> y (B, M) batch-major, plus bias (M floats or NULL), keeping the step inputs
 * in saved (tedepr_chain_train_saved(c, batch) floats). The values come from the cores:
 * core[k] is the (row-major) core step k contracts, src / tsrc each entry's index into it
 * in CSR / transposed-CSR order (all steps, concatenated); they are gathered into vals /
 * tvals (the backward reads them again). c->steps[k].val and c->bias are not used.
 * Returns 0, -1 on bad arguments, -2 if no workspace could be allocated. */
int tedepr_chain_train_forward(const tedepr_chain *c, const tedepr_step *tsteps,
                               const float *const *core, const int32_t *src, const int32_t *tsrc,
                               float *vals, float *tvals, const float *bias, const float *x, float *y,
                               int64_t batch, float *saved) {
    if (!c || !tsteps || !core || !x || !y || !saved || batch < 0 || c->n_steps < 1 ||
        c->n_steps > TRAIN_MAX_STEPS)
        return -1;
    tedepr_step st[TRAIN_MAX_STEPS], tt[TRAIN_MAX_STEPS];
    int64_t voff[TRAIN_MAX_STEPS + 1];
    bind_values(c, tsteps, vals, tvals, st, tt, voff);
    for (int32_t k = 0; k < c->n_steps; k++)
        for (int64_t j = voff[k]; j < voff[k + 1]; j++) {
            vals[j] = core[k][src[j]];
            tvals[j] = core[k][tsrc[j]];
        }
    if (batch == 0) return 0;
    const int64_t B = batch, M = c->n_out, N = c->n_in;
    float *ybuf = thread_workspace(M * B + OVERREAD_SLACK);
    if (!ybuf) return -2;
    if (B == 1) memcpy(saved, x, 4 * (size_t)N);
    else transpose(x, saved, B, N, NULL);
    float *X = saved;
    for (int32_t k = 0; k < c->n_steps; k++) {
        const tedepr_step *s = &st[k];
        const int last = k + 1 == c->n_steps;
        float *out = last ? ybuf : X + saved_stride(c, k, B);
        run_step(s, B, X, out, B, 1, 1, 0, n_tiles((int64_t)(s->g_hi - s->g_lo) * B, 1));
        X = out;
    }
    if (B == 1) {
        for (int64_t m = 0; m < M; m++) y[m] = ybuf[m] + (bias ? bias[m] : 0.0f);
    } else {
        transpose(ybuf, y, M, B, bias);
    }
    return 0;
}

/* sum_{i < G} <x + goff[i] * n, y + i * n> over n floats each (goff NULL: i): four
 * vector partial sums (independent multiply-add chains) and a scalar one for the tail,
 * combined in a fixed order, so deterministic. */
static float dot_seg(const float *restrict x, const int32_t *restrict goff, int64_t G,
                     const float *restrict y, int64_t n) {
    vf a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
    float tail = 0.0f;
    for (int64_t i = 0; i < G; i++) {
        const float *xp = x + (goff ? (int64_t)goff[i] : i) * n, *yp = y + i * n;
        int64_t b = 0;
        for (; b + 4 * TEDEPR_VB <= n; b += 4 * TEDEPR_VB) {
            a0 += *(const vfu *)(xp + b) * *(const vfu *)(yp + b);
            a1 += *(const vfu *)(xp + b + TEDEPR_VB) * *(const vfu *)(yp + b + TEDEPR_VB);
            a2 += *(const vfu *)(xp + b + 2 * TEDEPR_VB) * *(const vfu *)(yp + b + 2 * TEDEPR_VB);
            a3 += *(const vfu *)(xp + b + 3 * TEDEPR_VB) * *(const vfu *)(yp + b + 3 * TEDEPR_VB);
        }
        for (; b + TEDEPR_VB <= n; b += TEDEPR_VB) a0 += *(const vfu *)(xp + b) * *(const vfu *)(yp + b);
        for (; b < n; b++) tail += xp[b] * yp[b];
    }
    const vf sum = (a0 + a1) + (a2 + a3);
    float r = 0.0f;
    for (int l = 0; l < TEDEPR_VB; l++) r += sum[l];
    return r + tail;
}

/* The backward of tedepr_chain_train_forward: dy (B, M) batch-major -> dx (B, N) (or NULL:
 * not needed), the kept entries' gradients written into dcore[k] (the gradient of the core
 * step k contracts, row-major, zero-filled by the caller; at src[j] for entry j; NULL: no
 * core gradients) and dbias (M floats, or NULL). saved, vals, tvals: the forward's.
 * tsteps[k]: A_k^T (n_rows = steps[k].n_in_rows, n_in_rows = steps[k].n_rows, g_in = g_hi
 * = steps[k].g_hi - steps[k].g_lo, g_lo = 0, roff[kk] = kk * steps[k].g_in, goff[i] =
 * steps[k].g_lo + i). Returns 0, -1 on bad arguments, -2 if no workspace could be
 * allocated. */
int tedepr_chain_train_backward(const tedepr_chain *c, const tedepr_step *tsteps, const float *vals,
                                const float *tvals, const int32_t *src, float *const *dcore,
                                const float *saved, const float *dy, float *dx, float *dbias,
                                int64_t batch) {
    if (!c || !tsteps || !saved || !dy || batch < 0 || c->n_steps < 1 || c->n_steps > TRAIN_MAX_STEPS)
        return -1;
    if (dbias) memset(dbias, 0, 4 * (size_t)c->n_out);
    if (batch == 0) return 0;
    tedepr_step st[TRAIN_MAX_STEPS], tt[TRAIN_MAX_STEPS];
    int64_t voff[TRAIN_MAX_STEPS + 1];
    bind_values(c, tsteps, vals, tvals, st, tt, voff);
    const int64_t B = batch, M = c->n_out, N = c->n_in;
    /* workspace: dy feature-major, the gathered dY_k, two dX buffers (ping-pong) */
    int64_t gmax = 0, xmax = N * B;
    for (int32_t k = 0; k < c->n_steps; k++) {
        const tedepr_step *s = &st[k];
        const int64_t g = (int64_t)s->n_rows * (s->g_hi - s->g_lo) * B;
        const int64_t u = (int64_t)s->n_in_rows * s->g_in * B;
        if (g > gmax) gmax = g;
        if (u > xmax) xmax = u;
    }
    float *w = thread_workspace(M * B + gmax + 2 * xmax + 4 * OVERREAD_SLACK);
    if (!w) return -2;
    float *dnext = w, *dY = dnext + M * B + OVERREAD_SLACK;
    float *dbuf[2] = {dY + gmax + OVERREAD_SLACK, dY + gmax + xmax + 2 * OVERREAD_SLACK};
    if (B == 1) memcpy(dnext, dy, 4 * (size_t)M);
    else transpose(dy, dnext, B, M, NULL);
    if (dbias)
        for (int64_t m = 0; m < M; m++) {
            float acc = 0.0f;
            for (int64_t b = 0; b < B; b++) acc += dnext[m * B + b];
            dbias[m] = acc;
        }
    const float *Xk[TRAIN_MAX_STEPS];
    for (int32_t k = 0; k < c->n_steps; k++) Xk[k] = k ? Xk[k - 1] + saved_stride(c, k - 1, B) : saved;
    for (int32_t k = c->n_steps - 1; k >= 0; k--) {
        const tedepr_step *s = &st[k];
        const int64_t lo = s->g_lo, G = s->g_hi - s->g_lo, ld = (int64_t)s->g_in * B;
        const int need_dx = k > 0 || dx;
        if (need_dx) /* dY_k: the live groups of every output row, read back from where they were stored */
            for (int32_t o = 0; o < s->n_rows; o++)
                for (int64_t i = 0; i < G; i++)
                    memcpy(dY + ((int64_t)o * G + i) * B,
                           dnext + ((int64_t)s->roff[o] + s->goff[lo + i]) * B, 4 * (size_t)B);
        if (dcore && dcore[k]) { /* SDDMM: one dot per kept entry over the live lanes */
            const int32_t *rp = s->row_ptr;
            for (int32_t o = 0; o < s->n_rows; o++)
                for (int32_t j = rp[o]; j < rp[o + 1]; j++) {
                    const int64_t kk = s->col_bytes == 2 ? ((const uint16_t *)s->col)[j]
                                                         : ((const int32_t *)s->col)[j];
                    const float *xr = Xk[k] + kk * ld + lo * B;
                    /* the same sum in the same order either way (from the gathered dY_k, or
                     * read in place where no dX_k is needed and dY_k is not gathered) */
                    dcore[k][src[voff[k] + j]] =
                        need_dx ? dot_seg(dY + (int64_t)o * G * B, NULL, G, xr, B)
                                : dot_seg(dnext + (int64_t)s->roff[o] * B, s->goff + lo, G, xr, B);
                }
        }
        if (!need_dx) break;
        float *dcur = dbuf[k & 1];
        if (G > 0) run_step(&tt[k], B, dY, dcur, B, 1, 1, 0, n_tiles(G * B, 1));
        if (G < s->g_in)
            for (int32_t kk = 0; kk < s->n_in_rows; kk++) {
                memset(dcur + kk * ld, 0, 4 * (size_t)(lo * B));
                memset(dcur + kk * ld + (lo + G) * B, 0, 4 * (size_t)((s->g_in - lo - G) * B));
            }
        dnext = dcur;
    }
    if (dx) {
        if (B == 1) memcpy(dx, dnext, 4 * (size_t)N);
        else transpose(dnext, dx, N, B, NULL);
    }
    return 0;
}
