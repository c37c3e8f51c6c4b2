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
 * Training (tedepr_lstm_train_forward / tedepr_lstm_train_backward, wrapped by
 * tedepr_cli/kernels/lstm_train.py as a torch.autograd.Function): the forward also saves,
 * per step, the gate activations, c_t and h_{t-1}; the backward runs back through time
 * (BPTT) and returns the gate pre-activation gradients dL/dgx_t (torch autograd carries
 * them back through the input projections), dL/dh_0, dL/dc_0, dL/db_hh and dL/dW_hh at the
 * KEPT entries only (an SDDMM: sum over samples and steps of dgates[b, r] h_{t-1}[b, c] per
 * kept (r, c)); dh_{t-1} gets W_hh^T dgates over the kept entries (the CSR read by columns).
 *
 * fp32, single thread, deterministic (each sum in the CSR order, the batch and the steps in
 * a fixed order). ABI: bump TEDEPR_LSTM_ABI when a signature changes
 * (tedepr_cli/kernels/build.py checks it).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define TEDEPR_LSTM_ABI 2

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

/* S[q][b] = sum over row live[q]'s kept entries k of val[k] * hT[col[k]][b]: the kept
 * entries' products with h (feature-major, H x B), one B-wide axpy per entry. */
static inline void live_products(int64_t B, int32_t n_live, const int32_t *restrict live,
                                 const int32_t *row_ptr, const int32_t *col, const float *val,
                                 const float *restrict hT, float *restrict S) {
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

/* g (B x G) = gx at step t (+ bias) with the live rows' products S scattered on: the
 * pre-activations, one contiguous pass per sample. */
static inline void preactivations(int64_t B, int64_t G, int64_t t, const float *gx, int64_t gx_sb,
                                  int64_t gx_st, const float *bias, int32_t n_live,
                                  const int32_t *restrict live, const float *restrict S,
                                  float *restrict g) {
    for (int64_t b = 0; b < B; b++) {
        const float *restrict gxb = gx + b * gx_sb + t * gx_st;
        float *restrict gb = g + b * G;
        if (bias)
            for (int64_t r = 0; r < G; r++) gb[r] = gxb[r] + bias[r];
        else
            memcpy(gb, gxb, sizeof(float) * (size_t)G);
        for (int32_t q = 0; q < n_live; q++) gb[live[q]] += S[(int64_t)q * B + b];
    }
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
            live_products(B, n_live, live, row_ptr, col, val, hT, S);
        }
        preactivations(B, G, t, gx, gx_sb, gx_st, bias, n_live, live, S, g);
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


/* ------------------------------------------------------------------------------ training */

static inline float sigmoid_f(float x) { /* n / (1 + e), e = exp(-|x|): no overflow */
    const float e = exp_poly(-__builtin_fabsf(x));
    return (x >= 0.0f ? 1.0f : e) / (1.0f + e);
}

static inline float tanh_f(float x) { /* s (1 - e) / (1 + e), e = exp(-2|x|) */
    const float e = exp_poly(-2.0f * __builtin_fabsf(x));
    const float t = (1.0f - e) / (1.0f + e);
    return x >= 0.0f ? t : -t;
}

/* One sample's cell in training: from the pre-activations (i, f, g, o rows of H) the
 * activations (saved), c_t (updated in place and saved) and h_t. Separate restrict
 * pointers per gate so that the loop vectorizes. */
static inline void cell_train(int32_t H, const float *restrict pi, const float *restrict pf,
                              const float *restrict pg, const float *restrict po, float *restrict ai,
                              float *restrict af, float *restrict ag, float *restrict ao,
                              float *restrict c, float *restrict cs, float *restrict h) {
    for (int32_t j = 0; j < H; j++) {
        const float si = sigmoid_f(pi[j]), sf = sigmoid_f(pf[j]);
        const float tg = tanh_f(pg[j]), so = sigmoid_f(po[j]);
        const float cc = sf * c[j] + si * tg;
        ai[j] = si;
        af[j] = sf;
        ag[j] = tg;
        ao[j] = so;
        c[j] = cc;
        cs[j] = cc;
        h[j] = so * tanh_f(cc);
    }
}

/* One sample's cell backward (see tedepr_lstm_train_backward): from the saved activations,
 * c_t and c_{t-1}, dL/dh_t (dh + dout) and the carried dc (updated in place to dc_{t-1}),
 * the gate pre-activation gradients. */
static inline void cell_backward(int32_t H, const float *restrict ai, const float *restrict af,
                                 const float *restrict ag, const float *restrict ao,
                                 const float *restrict c, const float *restrict cp,
                                 const float *restrict dout, const float *restrict dh,
                                 float *restrict dc, float *restrict di, float *restrict df,
                                 float *restrict dg, float *restrict dov) {
    for (int32_t j = 0; j < H; j++) {
        const float i = ai[j], f = af[j], g = ag[j], o = ao[j];
        const float tc = tanh_f(c[j]);
        const float dhj = dh[j] + dout[j];
        const float dcj = dc[j] + dhj * o * (1.0f - tc * tc);
        di[j] = dcj * g * i * (1.0f - i);
        df[j] = dcj * cp[j] * f * (1.0f - f);
        dg[j] = dcj * i * (1.0f - g * g);
        dov[j] = dhj * tc * o * (1.0f - o);
        dc[j] = dcj * f;
    }
}

/* sum_b x[b] y[b] in DOT_LANES partial sums (lane l takes b = l mod DOT_LANES) combined in a
 * fixed order: vectorizes without reassociating anything, so deterministic. */
#define DOT_LANES 16
static inline float dot(const float *restrict x, const float *restrict y, int64_t n) {
    float acc[DOT_LANES] = {0.0f};
    int64_t b = 0;
    for (; b + DOT_LANES <= n; b += DOT_LANES)
        for (int l = 0; l < DOT_LANES; l++) acc[l] += x[b + l] * y[b + l];
    for (int l = 0; b < n; b++, l++) acc[l] += x[b] * y[b];
    float sum = 0.0f;
    for (int l = 0; l < DOT_LANES; l++) sum += acc[l];
    return sum;
}

/* rows of W_hh (4H) that keep entries, and columns (H) that do: their counts */
static void live_rows_cols(int32_t G, int32_t H, const int32_t *row_ptr, const int32_t *col,
                           int32_t *live, int32_t *n_live, int32_t *cpos, int32_t *lcol,
                           int32_t *n_lcol) {
    *n_live = 0;
    for (int32_t r = 0; r < G; r++)
        if (row_ptr[r + 1] > row_ptr[r]) live[(*n_live)++] = r;
    if (!cpos) return;
    for (int32_t j = 0; j < H; j++) cpos[j] = -1;
    for (int32_t k = 0; k < row_ptr[G]; k++) cpos[col[k]] = 0;
    *n_lcol = 0;
    for (int32_t j = 0; j < H; j++)
        if (cpos[j] == 0) {
            cpos[j] = *n_lcol;
            lcol[(*n_lcol)++] = j;
        }
}

/* The forward of tedepr_lstm_layer (same arguments, same results up to the cell's rounding),
 * saving what tedepr_lstm_train_backward needs, per processing step s (s = t forward, T-1-t
 * for reverse):
 *   act   (T, B, 4H)  the gate activations sigmoid(i), sigmoid(f), tanh(g), sigmoid(o)
 *   cs    (T, B, H)   c after step s
 *   hT    (T, H, B)   h BEFORE step s (h_0 at s = 0), feature-major: the SDDMM's operand
 * hn/cn may be NULL. Returns 0, 1 (no memory) or 2 (bad sizes). */
int tedepr_lstm_train_forward(int64_t B, int64_t T, int32_t H, int32_t reverse, const float *gx,
                              int64_t gx_sb, int64_t gx_st, const int32_t *row_ptr,
                              const int32_t *col, const float *val, const float *bias,
                              const float *h0, const float *c0, float *out, int64_t out_sb,
                              int64_t out_st, float *hn, float *cn, float *act, float *cs,
                              float *hT) {
    if (B < 0 || T < 0 || H <= 0) return 2;
    if (B == 0) return 0;
    const int64_t HB = (int64_t)H * B, G = 4 * (int64_t)H;
    float *ws = (float *)malloc(sizeof(float) * (size_t)(2 * HB + G * B + G * B + 1));
    int32_t *live = (int32_t *)malloc(sizeof(int32_t) * (size_t)G);
    if (!ws || !live) {
        free(ws);
        free(live);
        return 1;
    }
    int32_t n_live = 0, n_lcol = 0;
    live_rows_cols((int32_t)G, H, row_ptr, col, live, &n_live, NULL, NULL, &n_lcol);
    float *h = ws, *c = ws + HB, *g = ws + 2 * HB, *S = g + G * B;
    for (int64_t n = 0; n < HB; n++) {
        h[n] = h0 ? h0[n] : 0.0f;
        c[n] = c0 ? c0[n] : 0.0f;
    }
    for (int64_t s = 0; s < T; s++) {
        const int64_t t = reverse ? T - 1 - s : s;
        float *restrict hTs = hT + s * HB; /* h_{t-1} feature-major, kept for the backward */
        for (int64_t b = 0; b < B; b++)
            for (int32_t j = 0; j < H; j++) hTs[j * B + b] = h[b * H + j];
        live_products(B, n_live, live, row_ptr, col, val, hTs, S);
        preactivations(B, G, t, gx, gx_sb, gx_st, bias, n_live, live, S, g);
        float *restrict as = act + s * G * B, *restrict css = cs + s * HB;
        for (int64_t b = 0; b < B; b++) {
            const float *restrict gb = g + b * G;
            float *restrict ab = as + b * G;
            float *restrict cb = c + b * H, *restrict hb = h + b * H, *restrict csb = css + b * H;
            cell_train(H, gb, gb + H, gb + 2 * H, gb + 3 * H, ab, ab + H, ab + 2 * H, ab + 3 * H, cb, csb, hb);
            memcpy(out + b * out_sb + t * out_st, hb, sizeof(float) * (size_t)H);
        }
    }
    if (hn) memcpy(hn, h, sizeof(float) * (size_t)HB);
    if (cn) memcpy(cn, c, sizeof(float) * (size_t)HB);
    free(live);
    free(ws);
    return 0;
}

/* Back through time over what tedepr_lstm_train_forward saved (same B, T, H, reverse, CSR).
 *   c0                 the initial cell state (B, H) or NULL (zeros)
 *   dout               dL/dh_t of every step at dout[b * out_sb + t * out_st + j], or NULL
 *   dhn, dcn           dL/dh_T, dL/dc_T (B, H), or NULL (zero)
 *   dgx                out: dL/d(gate pre-activations) of every step, at gx's strides
 *   dval               out or NULL: dL/dW_hh at the kept entries, in CSR order (nnz floats)
 *   dbias              out or NULL: dL/db_hh (4H floats)
 *   dh0, dc0           out or NULL: dL/dh_0, dL/dc_0 (B, H)
 * Per step (processing order reversed), with dh = dL/dh_t and dc the cell gradient carried:
 *   dc += dh o (1 - tanh(c_t)^2);  di = dc g;  df = dc c_{t-1};  dg = dc i;  do = dh tanh(c_t)
 *   pre-activations: di i (1 - i), df f (1 - f), dg (1 - g^2), do o (1 - o)
 *   dc_{t-1} = dc f;  dh_{t-1} = W_hh^T dgates (kept entries);  dW_hh[k] += dgates[:, r]. h_{t-1}[:, c]
 * Per step the batch sums of dW_hh and db_hh are taken in float, in a fixed order, and the
 * steps' sums are accumulated in double.
 * Returns 0, 1 (no memory) or 2 (bad sizes). */
int tedepr_lstm_train_backward(int64_t B, int64_t T, int32_t H, int32_t reverse,
                               const int32_t *row_ptr, const int32_t *col, const float *val,
                               const float *c0, const float *act, const float *cs,
                               const float *hT, const float *dout, int64_t out_sb, int64_t out_st,
                               const float *dhn, const float *dcn, float *dgx, int64_t gx_sb,
                               int64_t gx_st, float *dval, float *dbias, float *dh0, float *dc0) {
    if (B < 0 || T < 0 || H <= 0) return 2;
    const int64_t HB = (int64_t)H * B, G = 4 * (int64_t)H;
    const int32_t nnz = row_ptr[G];
    double *acc = (double *)calloc((size_t)(nnz + G + 1), sizeof(double)); /* dval, dbias */
    int32_t *idx = (int32_t *)malloc(sizeof(int32_t) * (size_t)(G + 2 * H + 1));
    float *ws = (float *)malloc(sizeof(float) * (size_t)(3 * HB + (G + H) * B + G + 1));
    if (!acc || !idx || !ws) {
        free(acc);
        free(idx);
        free(ws);
        return 1;
    }
    int32_t *live = idx, *cpos = idx + G, *lcol = idx + G + H;
    int32_t n_live = 0, n_lcol = 0;
    live_rows_cols((int32_t)G, H, row_ptr, col, live, &n_live, cpos, lcol, &n_lcol);
    double *adval = acc, *adb = acc + nnz;
    float *dh = ws, *dc = ws + HB, *zero = ws + 2 * HB; /* (B, H) each */
    float *daT = ws + 3 * HB, *dhT = daT + (int64_t)n_live * B; /* live rows x B, live cols x B */
    float *dsum = dhT + (int64_t)n_lcol * B;                     /* G: a step's db_hh */
    for (int64_t n = 0; n < HB; n++) {
        dh[n] = dhn ? dhn[n] : 0.0f;
        dc[n] = dcn ? dcn[n] : 0.0f;
        zero[n] = 0.0f;
    }
    for (int64_t s = T - 1; s >= 0; s--) {
        const int64_t t = reverse ? T - 1 - s : s;
        const float *restrict as = act + s * G * B, *restrict css = cs + s * HB;
        const float *restrict cps = s > 0 ? cs + (s - 1) * HB : (c0 ? c0 : zero);
        for (int64_t b = 0; b < B; b++) {
            const float *restrict ab = as + b * G, *restrict cb = css + b * H, *restrict cpb = cps + b * H;
            const float *restrict dob = dout ? dout + b * out_sb + t * out_st : zero;
            float *restrict dhb = dh + b * H, *restrict dcb = dc + b * H;
            float *restrict dab = dgx + b * gx_sb + t * gx_st; /* written in place */
            cell_backward(H, ab, ab + H, ab + 2 * H, ab + 3 * H, cb, cpb, dob, dhb, dcb, dab, dab + H,
                          dab + 2 * H, dab + 3 * H);
        }
        if (dbias) { /* this step's sum over the batch in float (vectorized), then into double */
            for (int64_t r = 0; r < G; r++) dsum[r] = 0.0f;
            for (int64_t b = 0; b < B; b++) {
                const float *restrict dab = dgx + b * gx_sb + t * gx_st;
                for (int64_t r = 0; r < G; r++) dsum[r] += dab[r];
            }
            for (int64_t r = 0; r < G; r++) adb[r] += (double)dsum[r];
        }
        /* the kept rows' gate gradients feature-major: one B-wide run per live row */
        for (int64_t b = 0; b < B; b++)
            for (int32_t q = 0; q < n_live; q++) daT[(int64_t)q * B + b] = dgx[b * gx_sb + t * gx_st + live[q]];
        const float *restrict hTs = hT + s * HB; /* h_{t-1}, feature-major */
        for (int32_t p = 0; p < n_lcol; p++)
            for (int64_t b = 0; b < B; b++) dhT[(int64_t)p * B + b] = 0.0f;
        for (int32_t q = 0; q < n_live; q++) {
            const int32_t r = live[q];
            const float *restrict dq = daT + (int64_t)q * B;
            for (int32_t k = row_ptr[r]; k < row_ptr[r + 1]; k++) {
                if (dval) /* SDDMM: this kept entry's gradient, one B-long dot */
                    adval[k] += (double)dot(dq, hTs + (int64_t)col[k] * B, B);
                const float v = val[k]; /* dh_{t-1} += W_hh^T dgates, by this entry */
                float *restrict dcol = dhT + (int64_t)cpos[col[k]] * B;
                for (int64_t b = 0; b < B; b++) dcol[b] += v * dq[b];
            }
        }
        for (int64_t n = 0; n < HB; n++) dh[n] = 0.0f;
        for (int32_t p = 0; p < n_lcol; p++) {
            const int32_t j = lcol[p];
            const float *restrict dcol = dhT + (int64_t)p * B;
            for (int64_t b = 0; b < B; b++) dh[b * H + j] = dcol[b];
        }
    }
    if (dval)
        for (int32_t k = 0; k < nnz; k++) dval[k] = (float)adval[k];
    if (dbias)
        for (int64_t r = 0; r < G; r++) dbias[r] = (float)adb[r];
    if (dh0) memcpy(dh0, dh, sizeof(float) * (size_t)HB);
    if (dc0) memcpy(dc0, dc, sizeof(float) * (size_t)HB);
    free(ws);
    free(idx);
    free(acc);
    return 0;
}
