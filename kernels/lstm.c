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
 * pruned hidden-to-hidden matrix costs its kept entries, a dense one all of them). State
 * and gates are kept feature-major (unit j of sample b at j * B + b) so each kept entry is
 * one B-wide axpy and the gate arithmetic is one flat, vectorizable loop. exp is a Cephes
 * style polynomial (max relative error ~2 ulp) written with plain arithmetic so that the
 * compiler vectorizes it; sigmoid and tanh are built from it.
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

static inline float sigmoid_f(float x) { return 1.0f / (1.0f + exp_poly(-x)); }

/* tanh(x) = sign(x) (1 - e) / (1 + e), e = exp(-2|x|): no cancellation for large |x|,
 * and for small |x| the absolute error stays at float rounding. */
static inline float tanh_f(float x) {
    float a = x < 0.0f ? -x : x;
    float e = exp_poly(-2.0f * a);
    float t = (1.0f - e) / (1.0f + e);
    return x < 0.0f ? -t : t;
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
 * Returns 0, or 1 when the workspace cannot be allocated, 2 on bad sizes. */
int tedepr_lstm_layer(int64_t B, int64_t T, int32_t H, int32_t reverse, const float *gx,
                      int64_t gx_sb, int64_t gx_st, const int32_t *row_ptr, const int32_t *col,
                      const float *val, const float *bias, const float *h0, const float *c0,
                      float *out, int64_t out_sb, int64_t out_st, float *hn, float *cn) {
    if (B < 0 || T < 0 || H <= 0) return 2;
    if (B == 0) return 0;
    const int64_t HB = (int64_t)H * B, G = 4 * (int64_t)H;
    float *ws = (float *)malloc(sizeof(float) * (size_t)(6 * HB + 1));
    if (!ws) return 1;
    float *hT = ws, *cT = ws + HB, *g = ws + 2 * HB; /* g: 4H x B */
    for (int64_t b = 0; b < B; b++)
        for (int32_t j = 0; j < H; j++) {
            hT[j * B + b] = h0 ? h0[b * H + j] : 0.0f;
            cT[j * B + b] = c0 ? c0[b * H + j] : 0.0f;
        }
    for (int64_t s = 0; s < T; s++) {
        const int64_t t = reverse ? T - 1 - s : s;
        /* pre-activations: b_hh + W_hh h (sparse), then + gx (as torch: gx + (W_hh h + b_hh)) */
        if (B == 1) { /* one sample: a scalar sparse mat-vec, gx added in the same pass */
            const float *restrict gxb = gx + t * gx_st;
            for (int64_t r = 0; r < G; r++) {
                float acc = bias ? bias[r] : 0.0f;
                for (int32_t k = row_ptr[r]; k < row_ptr[r + 1]; k++) acc += val[k] * hT[col[k]];
                g[r] = gxb[r] + acc;
            }
        } else {
            for (int64_t r = 0; r < G; r++) {
                float *restrict gr = g + r * B;
                const float br = bias ? bias[r] : 0.0f;
                for (int64_t b = 0; b < B; b++) gr[b] = br;
                for (int32_t k = row_ptr[r]; k < row_ptr[r + 1]; k++) {
                    const float v = val[k];
                    const float *restrict hc = hT + (int64_t)col[k] * B;
                    for (int64_t b = 0; b < B; b++) gr[b] += v * hc[b];
                }
            }
            for (int64_t b = 0; b < B; b++) {
                const float *restrict gxb = gx + b * gx_sb + t * gx_st;
                for (int64_t r = 0; r < G; r++) g[r * B + b] += gxb[r];
            }
        }
        /* the cell: one flat loop over (unit, sample) */
        const float *restrict gi = g, *restrict gf = g + HB, *restrict gg = g + 2 * HB,
                              *restrict go = g + 3 * HB;
        for (int64_t n = 0; n < HB; n++) {
            const float c = sigmoid_f(gf[n]) * cT[n] + sigmoid_f(gi[n]) * tanh_f(gg[n]);
            cT[n] = c;
            hT[n] = sigmoid_f(go[n]) * tanh_f(c);
        }
        for (int64_t b = 0; b < B; b++) {
            float *restrict ob = out + b * out_sb + t * out_st;
            for (int32_t j = 0; j < H; j++) ob[j] = hT[j * B + b];
        }
    }
    for (int64_t b = 0; b < B; b++)
        for (int32_t j = 0; j < H; j++) {
            if (hn) hn[b * H + j] = hT[j * B + b];
            if (cn) cn[b * H + j] = cT[j * B + b];
        }
    free(ws);
    return 0;
}
