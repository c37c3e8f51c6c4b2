/* tedepr compiled LSTM recurrence: one call runs one layer and direction over all time steps.
 *
 * The input projections of every step (x_t W_ih^T + b_ih, the expensive part of a
 * tensorized or pruned LSTM) are computed before the call, for all steps at once, by one
 * chain call (tedepr_cli/kernels/lstm.py). This file runs what is left, the recurrence of
 * torch.nn.LSTM (gates i, f, g, o in that order, Hochreiter & Schmidhuber 1997 with the
 * forget gate of Gers et al. 2000, exactly as torch documents nn.LSTM):
 *
 *     g_t = gx_t + b_hh + W_hh h_{t-1}        (4H gate pre-activations)
 *     c_t = sigmoid(f) * c_{t-1} + sigmoid(i) * tanh(g)
 *     h_t = sigmoid(o) * tanh(c_t)
 *
 * in ONE C loop over the time steps, with W_hh stored as CSR over its kept entries (a
 * pruned hidden-to-hidden matrix costs its kept entries, a dense one all of them). exp is a Cephes
 * style polynomial (max relative error ~2 ulp) written with plain arithmetic so that the
 * compiler vectorizes it; the cell update is written with two divisions per unit (cell()).
 *
 * fp32, single thread, deterministic (each sum in the CSR order). ABI: bump
 * TEDEPR_LSTM_ABI when a signature changes (tedepr_cli/kernels/build.py checks it).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define TEDEPR_LSTM_ABI 1

int tedepr_lstm_abi(void) { return TEDEPR_LSTM_ABI; }

/* e^x for x in float range; clamped so that the result stays finite and non-zero
 * (sigmoid/tanh saturate long before the clamp matters). */
static inline float exp_poly(float x) {
    x = x > 88.0f ? 88.0f : (x < -87.0f ? -87.0f : x);
#ifdef __FAST_MATH__ /* (a + c) - c may be folded to a: floorf vectorizes there anyway */
    float n = __builtin_floorf(x * 1.44269504088896341f + 0.5f);
#else /* n = round(x / ln 2) by the 1.5 * 2^23 trick (exact for |n| < 2^22); it vectorizes,
       * floorf does not without -fno-trapping-math */
    float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
#endif
    float r = x - n * 0.693359375f + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    const int32_t bits = ((int32_t)n + 127) << 23; /* 2^n, n in [-126, 127] */
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

/* The gates with two divisions per unit instead of five: with e = exp(-|x|) in (0, 1],
 *   sigmoid(x) = n / (1 + e),   n = 1 if x >= 0 else e
 *   tanh(x)    = s (1 - e') / (1 + e'),   e' = exp(-2|x|), s = sign(x)
 * so every denominator lies in [1, 2] (no overflow, no cancellation) and
 *   c' = sigmoid(f) c + sigmoid(i) tanh(g)
 *      = (n_f c (1+e_i)(1+e_g) + n_i s_g (1-e_g)(1+e_f)) / ((1+e_f)(1+e_i)(1+e_g))
 *   h' = sigmoid(o) tanh(c') = n_o s_c (1-e_c) / ((1+e_o)(1+e_c)). */
static inline void cell(float i, float f, float g, float o, float *restrict c, float *restrict h) {
    const float ei = exp_poly(-__builtin_fabsf(i)), ef = exp_poly(-__builtin_fabsf(f));
    const float eg = exp_poly(-2.0f * __builtin_fabsf(g)), eo = exp_poly(-__builtin_fabsf(o));
    const float ni = i >= 0.0f ? 1.0f : ei, nf = f >= 0.0f ? 1.0f : ef, no = o >= 0.0f ? 1.0f : eo;
    const float tg = g >= 0.0f ? 1.0f - eg : eg - 1.0f; /* s_g (1 - e_g) */
    const float di = 1.0f + ei, df = 1.0f + ef, dg = 1.0f + eg;
    const float cn = (nf * *c * di * dg + ni * tg * df) / (df * di * dg);
    const float ec = exp_poly(-2.0f * __builtin_fabsf(cn));
    const float tc = cn >= 0.0f ? 1.0f - ec : ec - 1.0f;
    *c = cn;
    *h = no * tc / ((1.0f + eo) * (1.0f + ec));
}

/* One layer and direction.
 *   B, T, H        batch, time steps, hidden size
 *   reverse        0: t = 0 .. T-1; 1: t = T-1 .. 0 (the backward direction)
 *   gx             input projections incl. b_ih: gate r of sample b at step t is
 *                  gx[b * gx_sb + t * gx_st + r], r < 4H (torch's gate order i, f, g, o)
 *   row_ptr, col, val   W_hh (4H x H) as CSR over its kept entries (int32 columns)
 *   bias           b_hh (4H floats) or NULL
 *   h0, c0         initial state (B, H) row-major, or NULL for zeros
 *   out            h_t of sample b goes to out[b * out_sb + t * out_st + j], j < H
 *   hn, cn         final state (B, H) row-major (may be NULL)
 * State and gates are batch-major (sample b's unit j at b * H + j), so gx is read and the
 * gates written as contiguous rows and the cell loop vectorizes over units. W_hh h is
 * computed over the rows that keep entries only: one sample, a sparse dot per row; more,
 * feature-major (h transposed once per step, every kept entry one B-wide axpy); the
 * products are then scattered onto gx + b_hh.
 * Returns 0, or 1 when the workspace cannot be allocated, 2 on bad sizes. */
int tedepr_lstm_layer(int64_t B, int64_t T, int32_t H, int32_t reverse, const float *gx,
                      int64_t gx_sb, int64_t gx_st, const int32_t *row_ptr, const int32_t *col,
                      const float *val, const float *bias, const float *h0, const float *c0,
                      float *out, int64_t out_sb, int64_t out_st, float *hn, float *cn) {
    if (B < 0 || T < 0 || H <= 0) return 2;
    if (B == 0) return 0;
    const int64_t HB = (int64_t)H * B, G = 4 * (int64_t)H;
    float *ws = (float *)malloc(sizeof(float) * (size_t)(3 * HB + G * B + G * B + 1));
    if (!ws) return 1;
    int32_t *live = (int32_t *)malloc(sizeof(int32_t) * (size_t)G); /* rows keeping entries */
    if (!live) {
        free(ws);
        return 1;
    }
    int32_t n_live = 0;
    for (int32_t r = 0; r < G; r++)
        if (row_ptr[r + 1] > row_ptr[r]) live[n_live++] = r;
    float *h = ws, *c = ws + HB, *hT = ws + 2 * HB; /* h, c: B x H; hT: H x B */
    float *g = ws + 3 * HB, *S = g + G * B;          /* g: B x 4H; S: live rows x B */
    for (int64_t n = 0; n < HB; n++) {
        h[n] = h0 ? h0[n] : 0.0f;
        c[n] = c0 ? c0[n] : 0.0f;
    }
    for (int64_t s = 0; s < T; s++) {
        const int64_t t = reverse ? T - 1 - s : s;
        /* pre-activations gx + b_hh + W_hh h: the kept entries' products feature-major,
         * S[q][b] = sum_k val[k] h[b][col[k]] over the live rows q (B-wide axpys), then
         * scattered onto gx + b_hh, which is added in one contiguous pass per sample */
        if (B == 1) { /* one sample: a sparse dot per live row */
            for (int32_t q = 0; q < n_live; q++) {
                const int32_t r = live[q];
                float acc = 0.0f;
                for (int32_t k = row_ptr[r]; k < row_ptr[r + 1]; k++) acc += val[k] * h[col[k]];
                S[q] = acc;
            }
        } else {
            for (int64_t b = 0; b < B; b++)
                for (int32_t j = 0; j < H; j++) hT[j * B + b] = h[b * H + j];
            for (int32_t q = 0; q < n_live; q++) {
                const int32_t r = live[q];
                float *restrict sq = S + (int64_t)q * B;
                for (int64_t b = 0; b < B; b++) sq[b] = 0.0f;
                for (int32_t k = row_ptr[r]; k < row_ptr[r + 1]; k++) {
                    const float v = val[k];
                    const float *restrict hc = hT + (int64_t)col[k] * B;
                    for (int64_t b = 0; b < B; b++) sq[b] += v * hc[b];
                }
            }
        }
        for (int64_t b = 0; b < B; b++) {
            const float *restrict gxb = gx + b * gx_sb + t * gx_st;
            float *restrict gb = g + b * G;
            if (bias)
                for (int64_t r = 0; r < G; r++) gb[r] = gxb[r] + bias[r];
            else
                memcpy(gb, gxb, sizeof(float) * (size_t)G);
            for (int32_t q = 0; q < n_live; q++) gb[live[q]] += S[(int64_t)q * B + b];
        }
        /* the cell, then h_t out */
        for (int64_t b = 0; b < B; b++) {
            const float *restrict gb = g + b * G;
            float *restrict cb = c + b * H, *restrict hb = h + b * H;
            for (int32_t j = 0; j < H; j++) cell(gb[j], gb[H + j], gb[2 * H + j], gb[3 * H + j], cb + j, hb + j);
            memcpy(out + b * out_sb + t * out_st, hb, sizeof(float) * (size_t)H);
        }
    }
    if (hn) memcpy(hn, h, sizeof(float) * (size_t)HB);
    if (cn) memcpy(cn, c, sizeof(float) * (size_t)HB);
    free(live);
    free(ws);
    return 0;
}
