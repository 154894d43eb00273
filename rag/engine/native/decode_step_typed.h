/* The typed part of decode_step.c, included once per weight dtype: W (weights and K/V), X (a
   matmul's input), LOAD_W / LOAD_X (16 of them as float32), W_TO_F32 / F32_TO_W / F32_TO_X,
   BF16_DOT, and SUFFIX for the names. */

#ifdef __AVX512F__
#define LOADV_W LOAD_W
#else
#define LOADV_W LOAD8_W
#endif

/* Dot products of one weight row with M rows of x, M fixed at compile time so the
   accumulators stay in registers. Every row is summed in the same order whatever M is. With
   AVX512-BF16 a dot-product instruction does 32 bf16 multiply-adds; elsewhere the values are
   widened and summed with float32 FMAs. */
#if BF16_DOT && defined(__AVX512BF16__)
#define DOT_ROWS(M)                                                                              \
    static inline void SFX(dot_rows_##M)(const W *w, const X *x, int in, float *out) {           \
        __m512 acc[M];                                                                           \
        for (int r = 0; r < M; r++) acc[r] = _mm512_setzero_ps();                                \
        for (int i = 0; i < in; i += 32) {                                                       \
            __m512bh wv = (__m512bh)_mm512_loadu_si512(w + i);                                   \
            for (int r = 0; r < M; r++)                                                          \
                acc[r] = _mm512_dpbf16_ps(acc[r], wv, (__m512bh)_mm512_loadu_si512(x + (size_t)r * in + i)); \
        }                                                                                        \
        for (int r = 0; r < M; r++) out[r] = _mm512_reduce_add_ps(acc[r]);                       \
    }
#elif !defined(__AVX512F__)
/* The v16f loop below with each vector as two 32-byte halves (see load8_bf16): the same
   multiply-adds and the same final sum, in registers. */
#define DOT_ROWS(M)                                                                              \
    static inline void SFX(dot_rows_##M)(const W *w, const X *x, int in, float *out) {           \
        v8f lo[M], hi[M];                                                                        \
        for (int r = 0; r < M; r++) lo[r] = hi[r] = (v8f){0};                                    \
        for (int i = 0; i < in; i += 16) {                                                       \
            v8f wl = LOAD8_W(w + i), wh = LOAD8_W(w + i + 8);                                    \
            for (int r = 0; r < M; r++) {                                                        \
                lo[r] += wl * LOAD8_X(x + (size_t)r * in + i);                                   \
                hi[r] += wh * LOAD8_X(x + (size_t)r * in + i + 8);                               \
            }                                                                                    \
        }                                                                                        \
        for (int r = 0; r < M; r++) out[r] = hsum_halves(lo[r], hi[r]);                          \
    }
#else
#define DOT_ROWS(M)                                                                              \
    static inline void SFX(dot_rows_##M)(const W *w, const X *x, int in, float *out) {           \
        v16f acc[M] = {{0}};                                                                     \
        for (int i = 0; i < in; i += 16) {                                                       \
            v16f wv = LOAD_W(w + i);                                                             \
            for (int r = 0; r < M; r++) acc[r] += wv * LOAD_X(x + (size_t)r * in + i);           \
        }                                                                                        \
        for (int r = 0; r < M; r++) out[r] = hsum(acc[r]);                                       \
    }
#endif
DOT_ROWS(1)
DOT_ROWS(2)
DOT_ROWS(3)
DOT_ROWS(4)
DOT_ROWS(5)
DOT_ROWS(6)
DOT_ROWS(7)
DOT_ROWS(8)

/* y[r, o] = sum_i w[o, i] x[r, i] (+ bias[o]) for rows r < n, w [out, in] row-major.
   x is float32 [n, in]; xb receives it in the matmul's input type. */
static void SFX(linear)(const W *w, const W *bias, const float *x, X *xb, int n, int in, int out, float *y,
                        int threads) {
    for (size_t i = 0; i < (size_t)n * in; i++) xb[i] = F32_TO_X(x[i]);
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int o = 0; o < out; o++) {
        const W *wo = w + (size_t)o * in;
        float b = bias ? W_TO_F32(bias[o]) : 0.0f, dots[ROW_BLOCK];
        for (int r0 = 0; r0 < n; r0 += ROW_BLOCK) {
            int m = n - r0 < ROW_BLOCK ? n - r0 : ROW_BLOCK;
            const X *xr = xb + (size_t)r0 * in;
            switch (m) {
                case 1: SFX(dot_rows_1)(wo, xr, in, dots); break;
                case 2: SFX(dot_rows_2)(wo, xr, in, dots); break;
                case 3: SFX(dot_rows_3)(wo, xr, in, dots); break;
                case 4: SFX(dot_rows_4)(wo, xr, in, dots); break;
                case 5: SFX(dot_rows_5)(wo, xr, in, dots); break;
                case 6: SFX(dot_rows_6)(wo, xr, in, dots); break;
                case 7: SFX(dot_rows_7)(wo, xr, in, dots); break;
                default: SFX(dot_rows_8)(wo, xr, in, dots); break;
            }
            for (int r = 0; r < m; r++) y[(size_t)(r0 + r) * out + o] = dots[r] + b;
        }
    }
}

static void SFX(rms_norm)(const float *x, const W *w, int n, int dim, float eps, float *y) {
    for (int r = 0; r < n; r++) {
        const float *xr = x + (size_t)r * dim;
        vf acc = {0};
        for (int i = 0; i < dim; i += VW) {
            vf v = load_vf(xr + i);
            acc += v * v;
        }
        float inv = 1.0f / sqrtf(hsum_vf(acc) / dim + eps);
        for (int i = 0; i < dim; i++) y[(size_t)r * dim + i] = xr[i] * inv * W_TO_F32(w[i]);
    }
}

/* Attention of a layer's rows, sharing the prompt: a KV head's prompt slots [0, base) are
   read and widened once for all rows and their query heads, not once per row (for a tree of
   t rows that was t passes over the whole prompt's K/V). Every (row, head) is still computed
   exactly as a plain one-row step would: the same score per key, the same softmax, the same
   P.V sums in the same slot order (prompt slots, then the row's tail), so a tree's rows stay
   bitwise plain steps.

   The keys go 16 at a time, widened to float32 into kb [16, HEAD_DIM]. */
static inline void SFX(load_keys)(const W *k, int j0, int n, int base, const int32_t *tail, float *kb) {
    for (int jj = 0; jj < 16; jj++) {
        int j = j0 + jj, slot = j < n ? (j < base ? j : tail[j - base]) : 0;
        for (int c = 0; c < HEAD_DIM; c += VW) {
            vf kv = LOADV_W(k + (size_t)slot * HEAD_DIM + c);
            memcpy(kb + jj * HEAD_DIM + c, &kv, sizeof kv);
        }
    }
}

/* One query's 16 scores against kb. Not inlined: one copy of the code, so a key's score is
   the same bits whichever pass (shared prompt block or a row's own block) computes it. Each
   lane of reduce16 sums one key's products, so the blocking doesn't matter either. */
#ifdef __AVX512F__
static __attribute__((noinline)) void SFX(score16)(const float *q, const float *kb, float scale, float *out) {
    v16f part[16];
    for (int jj = 0; jj < 16; jj++) {
        v16f acc = load_f32(q) * load_f32(kb + jj * HEAD_DIM);
        for (int c = 1; c < HEAD_DIM / 16; c++) acc += load_f32(q + 16 * c) * load_f32(kb + jj * HEAD_DIM + 16 * c);
        part[jj] = acc;
    }
    v16f sc = reduce16(part) * scale;
    memcpy(out, &sc, sizeof sc);
}
#else
static __attribute__((noinline)) void SFX(score16)(const float *q, const float *kb, float scale, float *out) {
    v8f lo[16], hi[16]; /* the v16f code above in halves: the same sums */
    for (int jj = 0; jj < 16; jj++) {
        const float *kj = kb + jj * HEAD_DIM;
        v8f l = load8_f32(q) * load8_f32(kj), h = load8_f32(q + 8) * load8_f32(kj + 8);
        for (int c = 1; c < HEAD_DIM / 16; c++) {
            l += load8_f32(q + 16 * c) * load8_f32(kj + 16 * c);
            h += load8_f32(q + 16 * c + 8) * load8_f32(kj + 16 * c + 8);
        }
        lo[jj] = l;
        hi[jj] = h;
    }
    reduce16_halves(lo, hi, scale, out);
}
#endif

/* Softmax numerators of one (row, head)'s scores sh [n, padded to 16], in place: the max,
   then exp(s - max) summed in vectors of the widest register type (vf); returns 1 / sum. */
static float SFX(softmax)(float *sh, int n) {
    int padded = (n + 15) & ~15;
    for (int j = n; j < padded; j++) sh[j] = -INFINITY;
    vf vmax = load_vf(sh);
    for (int j = VW; j < padded; j += VW) {
        vf x = load_vf(sh + j);
        vmax = blend_vf(x > vmax, x, vmax);
    }
    float mx = vmax[0];
    for (int i = 1; i < VW; i++) mx = vmax[i] > mx ? vmax[i] : mx;
    vf sum = {0};
    for (int j = 0; j < padded; j += VW) {
        vf e = vexp_vf(load_vf(sh + j) - mx);
        memcpy(sh + j, &e, sizeof e);
        sum += e;
    }
    return 1.0f / hsum_vf(sum);
}

/* P.V of R rows (R and the group size G compile-time constants, so the R*G*4 accumulators
   stay in registers) for one KV head: v [slots, HEAD_DIM]; p: the softmax numerators [R, nh,
   width], inv [R, nh] and out [R, nh, HEAD_DIM], each offset to the KV head's first query
   head. Each prompt slot's values are widened once for all R*G (row, head)s, then each row
   goes on over its own tail: for every (row, head) the sum runs j = 0..n-1 in order, as a
   plain step's. */
static inline __attribute__((always_inline)) void SFX(pv)(const int R, const int G, const W *v, int base,
        const int32_t *tails, int tail_width, const int *n_tail, const float *p, int width, const float *inv,
        int nh, float *out) {
#ifdef __AVX512F__
    const int chunks = HEAD_DIM / 16;
    v16f acc[PV_MAX_ROWS][MAX_GROUP][HEAD_DIM / 16] = {{{{0}}}}, vj[HEAD_DIM / 16];
    for (int j = 0; j < base; j++) {
        for (int c = 0; c < chunks; c++) vj[c] = LOAD_W(v + (size_t)j * HEAD_DIM + 16 * c);
        for (int r = 0; r < R; r++)
            for (int h = 0; h < G; h++)
                for (int c = 0; c < chunks; c++) acc[r][h][c] += p[((size_t)r * nh + h) * width + j] * vj[c];
    }
    for (int r = 0; r < R; r++) {
        const int32_t *tr = tails + (size_t)r * tail_width;
        for (int j = base; j < base + n_tail[r]; j++) {
            for (int c = 0; c < chunks; c++) vj[c] = LOAD_W(v + (size_t)tr[j - base] * HEAD_DIM + 16 * c);
            for (int h = 0; h < G; h++)
                for (int c = 0; c < chunks; c++) acc[r][h][c] += p[((size_t)r * nh + h) * width + j] * vj[c];
        }
        for (int h = 0; h < G; h++)
            for (int c = 0; c < chunks; c++) {
                v16f o = acc[r][h][c] * inv[(size_t)r * nh + h];
                memcpy(out + ((size_t)r * nh + h) * HEAD_DIM + 16 * c, &o, sizeof o);
            }
    }
#else
    /* The same sums, 16 columns at a time in 32-byte halves: R*G*4 accumulators would not fit
       AVX2's 16 registers (and a v16f there lives in memory). */
    for (int c0 = 0; c0 < HEAD_DIM; c0 += 16) {
        v8f lo[PV_MAX_ROWS][MAX_GROUP], hi[PV_MAX_ROWS][MAX_GROUP];
        for (int r = 0; r < R; r++)
            for (int h = 0; h < G; h++) lo[r][h] = hi[r][h] = (v8f){0};
        for (int j = 0; j < base; j++) {
            v8f vl = LOAD8_W(v + (size_t)j * HEAD_DIM + c0), vh = LOAD8_W(v + (size_t)j * HEAD_DIM + c0 + 8);
            for (int r = 0; r < R; r++)
                for (int h = 0; h < G; h++) {
                    float pj = p[((size_t)r * nh + h) * width + j];
                    lo[r][h] += pj * vl;
                    hi[r][h] += pj * vh;
                }
        }
        for (int r = 0; r < R; r++) {
            const int32_t *tr = tails + (size_t)r * tail_width;
            for (int j = base; j < base + n_tail[r]; j++) {
                const W *vr = v + (size_t)tr[j - base] * HEAD_DIM + c0;
                v8f vl = LOAD8_W(vr), vh = LOAD8_W(vr + 8);
                for (int h = 0; h < G; h++) {
                    float pj = p[((size_t)r * nh + h) * width + j];
                    lo[r][h] += pj * vl;
                    hi[r][h] += pj * vh;
                }
            }
            for (int h = 0; h < G; h++) {
                float s = inv[(size_t)r * nh + h];
                v8f ol = lo[r][h] * s, oh = hi[r][h] * s;
                float *o = out + ((size_t)r * nh + h) * HEAD_DIM + c0;
                memcpy(o, &ol, sizeof ol);
                memcpy(o + 8, &oh, sizeof oh);
            }
        }
    }
#endif
}

/* pv with the group size compile-time (one copy per size), for m <= PV_ROWS(G) rows. */
#define PV_CASE(G, R)                                                                                             \
    case R:                                                                                                       \
        if (PV_ROWS(G) >= R) SFX(pv)(R, G, v, base, tails, tail_width, n_tail, p, width, inv, nh, out);           \
        break;
#define PV_GROUP(G)                                                                                               \
    static void SFX(pv_##G)(int m, const W *v, int base, const int32_t *tails, int tail_width, const int *n_tail, \
                            const float *p, int width, const float *inv, int nh, float *out) {                    \
        switch (m) { PV_CASE(G, 1) PV_CASE(G, 2) PV_CASE(G, 3) PV_CASE(G, 4) PV_CASE(G, 5) PV_CASE(G, 6) }        \
    }
PV_GROUP(1)
PV_GROUP(2)
PV_GROUP(3)
PV_GROUP(4)
PV_GROUP(5)
PV_GROUP(6)
PV_GROUP(7)
PV_GROUP(8)
static void (*const SFX(PV)[MAX_GROUP + 1])(int, const W *, int, const int32_t *, int, const int *, const float *, int,
                                             const float *, int, float *) = {
    0, SFX(pv_1), SFX(pv_2), SFX(pv_3), SFX(pv_4), SFX(pv_5), SFX(pv_6), SFX(pv_7), SFX(pv_8)};

/* Scores of rows r < t for the query heads of KV head g (k: its keys) against the prompt's
   full 16-key blocks [b0, b1): each block widened once for every row and head. */
static void SFX(prompt_scores)(const float *qkv, int qkv_dim, int t, int nh, int group, int g, const W *k, int b0,
                               int b1, float scale, float *scores, int width) {
    float kb[16 * HEAD_DIM];
    for (int b = b0; b < b1; b++) {
        SFX(load_keys)(k, 16 * b, 16 * b + 16, 16 * b + 16, 0, kb); /* all prompt slots */
        for (int r = 0; r < t; r++)
            for (int head = g * group; head < (g + 1) * group; head++) {
                SFX(score16)(qkv + (size_t)r * qkv_dim + head * HEAD_DIM, kb, scale,
                             scores + ((size_t)r * nh + head) * width + 16 * b);
            }
    }
}

/* Row r's other scores for KV head g: slots [16 * shared, n), the last partial prompt block
   and its tail. */
static void SFX(row_scores)(const float *q, int group, int g, const W *k, int shared, int base,
                            const int32_t *tail, int n, float scale, float *scores, int width) {
    float kb[16 * HEAD_DIM];
    for (int j0 = 16 * shared; j0 < n; j0 += 16) {
        SFX(load_keys)(k, j0, n, base, tail, kb);
        for (int head = g * group; head < (g + 1) * group; head++) {
            SFX(score16)(q + head * HEAD_DIM, kb, scale, scores + (size_t)head * width + j0);
        }
    }
}

/* Rows r0..r0+m of KV head g (v: its values): each (row, head)'s softmax, then P.V. */
static void SFX(softmax_pv)(int r0, int m, int nh, int group, int g, const W *v, int base, const int32_t *tails,
                            int tail_width, const int *n_tail, float *scores, float *inv, int width, float *att) {
    for (int r = r0; r < r0 + m; r++)
        for (int head = g * group; head < (g + 1) * group; head++)
            inv[(size_t)r * nh + head] = SFX(softmax)(scores + ((size_t)r * nh + head) * width, base + n_tail[r]);
    size_t first = (size_t)r0 * nh + g * group; /* (row r0, the KV head's first query head) */
    SFX(PV)[group](m, v, base, tails + (size_t)r0 * tail_width, tail_width, n_tail + r0, scores + first * width,
                   width, inv + first, nh, att + first * HEAD_DIM);
}

/* One layer's attention for rows r < t: q in qkv (rows of qkv_dim), k/v the layer's KV heads
   (head stride hs); row r reads the prompt [0, base) and tails[r * tail_width ..
   + n_tail[r]). scores: [t, nh, width]; inv: [t, nh]; att: [t, nh * HEAD_DIM]. Called inside
   an OpenMP parallel region. */
static void SFX(attention)(const float *qkv, int qkv_dim, int t, int nh, int kh, const W *k, const W *v,
                           int64_t hs, int base, const int32_t *tails, int tail_width, const int *n_tail,
                           float scale, float *scores, float *inv, int width, float *att) {
    const int group = nh / kh, shared = base / 16, spans = (shared + KEY_BLOCKS - 1) / KEY_BLOCKS;
    const int passes = (t + PV_ROWS(group) - 1) / PV_ROWS(group), rows = (t + passes - 1) / passes;
    if (t == 1) { /* a plain step: nothing to share, a job per KV head, no waiting between passes */
#pragma omp for schedule(dynamic)
        for (int g = 0; g < kh; g++) {
            SFX(prompt_scores)(qkv, qkv_dim, 1, nh, group, g, k + g * hs, 0, shared, scale, scores, width);
            SFX(row_scores)(qkv, group, g, k + g * hs, shared, base, tails, base + n_tail[0], scale, scores, width);
            SFX(softmax_pv)(0, 1, nh, group, g, v + g * hs, base, tails, tail_width, n_tail, scores, inv, width, att);
        }
        return;
    }
    /* 1. Scores: the prompt's blocks, KEY_BLOCKS at a time, for every row; then each row's rest. */
#pragma omp for schedule(dynamic)
    for (int job = 0; job < kh * spans + t * kh; job++) {
        if (job < kh * spans) {
            int g = job / spans, b0 = job % spans * KEY_BLOCKS;
            int b1 = b0 + KEY_BLOCKS < shared ? b0 + KEY_BLOCKS : shared;
            SFX(prompt_scores)(qkv, qkv_dim, t, nh, group, g, k + g * hs, b0, b1, scale, scores, width);
        } else {
            int r = (job - kh * spans) / kh, g = (job - kh * spans) % kh;
            SFX(row_scores)(qkv + (size_t)r * qkv_dim, group, g, k + g * hs, shared, base,
                            tails + (size_t)r * tail_width, base + n_tail[r], scale, scores + (size_t)r * nh * width,
                            width);
        }
    }
    /* 2. Softmax and P.V by (KV head, block of rows). */
#pragma omp for schedule(dynamic)
    for (int job = 0; job < kh * passes; job++) {
        int g = job / passes, r0 = job % passes * rows;
        SFX(softmax_pv)(r0, t - r0 < rows ? t - r0 : rows, nh, group, g, v + g * hs, base, tails, tail_width, n_tail,
                        scores, inv, width, att);
    }
}

/* Tokens ids[0..t) at slots start..start+t (positions pos[]) through every layer.

   kc, vc: the request's K/V buffers [n_layers, n_kv, slots, head_dim] (batch row 0), with
   the given layer and head strides. Row r reads the prompt slots [0, base) and its tail:
   tail[r * tail_width .. + tail_len[r]) if tail is given, else the slots base..start + r.
   cos/sin: [*, head_dim] float32 tables indexed by position. Logits of the last row, or of
   every row if all_logits, go to logits [*, vocab]. scratch: see native_step.py. */
int SFX(kvrag_decode_step)(const Model *m, const int64_t *ids, const int64_t *pos, int t, const float *cos,
                           const float *sin, W *kc, W *vc, int64_t layer_stride, int64_t head_stride,
                      int start, int base, const int32_t *tail, const int32_t *tail_len, int tail_width,
                      float *scratch, int scores_width, float *logits, int all_logits, int threads) {
    const int dim = m->dim, hd = m->head_dim, nh = m->n_heads, kh = m->n_kv, ffn = m->ffn;
    const int group = nh / kh, qkv_dim = (nh + 2 * kh) * hd;
    if (hd != HEAD_DIM || dim % 32 || ffn % 32 || group > MAX_GROUP) return -1; /* bf16 dots: 32 at a time */
    const float scale = 1.0f / sqrtf((float)hd);
    float *x = scratch, *h = x + (size_t)t * dim, *qkv = h + (size_t)t * ffn,
          *att = qkv + (size_t)t * qkv_dim, *gate = att + (size_t)t * nh * hd, *up = gate + (size_t)t * ffn,
          *scores = up + (size_t)t * ffn, *inv = scores + (size_t)t * nh * scores_width;
    int32_t *plain = (int32_t *)(inv + (size_t)t * nh); /* tails of a plain step */
    int32_t *n_tail = plain + (size_t)t * (start - base + t);
    X *xb = (X *)(((uintptr_t)(n_tail + t) + 63) & ~(uintptr_t)63); /* a linear's input, its type, 64-aligned */
    const W *embed = m->embed, *final_norm = m->norm, *lm_head = m->lm_head;

    if (!tail) {
        tail_width = start - base + t;
        for (int r = 0; r < t; r++)
            for (int j = 0; j < tail_width; j++) plain[r * tail_width + j] = base + j;
    }
    const int32_t *tails = tail ? tail : plain;
    for (int r = 0; r < t; r++) n_tail[r] = tail ? tail_len[r] : start - base + r + 1;
    for (int r = 0; r < t; r++)
        for (int i = 0; i < dim; i++) x[(size_t)r * dim + i] = W_TO_F32(embed[ids[r] * dim + i]);

    for (int l = 0; l < m->n_layers; l++) {
        const int64_t *w = m->layers + 8 * l;
        W *kl = kc + l * layer_stride, *vl = vc + l * layer_stride;
        SFX(rms_norm)(x, (const W *)w[0], t, dim, m->eps, h);
        SFX(linear)((const W *)w[1], (const W *)w[2], h, xb, t, dim, qkv_dim, qkv, threads);
        for (int r = 0; r < t; r++) {
            float *row = qkv + (size_t)r * qkv_dim;
            const float *c = cos + pos[r] * hd, *s = sin + pos[r] * hd;
            for (int head = 0; head < nh + kh; head++) rope(row + head * hd, c, s, hd / 2);
            for (int g = 0; g < kh; g++) {
                W *kd = kl + g * head_stride + (size_t)(start + r) * hd;
                W *vd = vl + g * head_stride + (size_t)(start + r) * hd;
                for (int d = 0; d < hd; d++) {
                    kd[d] = F32_TO_W(row[(nh + g) * hd + d]);
                    vd[d] = F32_TO_W(row[(nh + kh + g) * hd + d]);
                }
            }
        }
#pragma omp parallel num_threads(threads)
        SFX(attention)(qkv, qkv_dim, t, nh, kh, kl, vl, head_stride, base, tails, tail_width, n_tail, scale, scores,
                       inv, scores_width, att);
        SFX(linear)((const W *)w[3], 0, att, xb, t, nh * hd, dim, h, threads);
        for (size_t i = 0; i < (size_t)t * dim; i++) x[i] += h[i];
        SFX(rms_norm)(x, (const W *)w[4], t, dim, m->eps, h);
        SFX(linear)((const W *)w[5], 0, h, xb, t, dim, ffn, gate, threads);
        SFX(linear)((const W *)w[6], 0, h, xb, t, dim, ffn, up, threads);
        for (size_t i = 0; i < (size_t)t * ffn; i += VW) {
            vf g = load_vf(gate + i);
            vf a = g / (1.0f + vexp_vf(-g)) * load_vf(up + i);
            memcpy(gate + i, &a, sizeof a);
        }
        SFX(linear)((const W *)w[7], 0, gate, xb, t, ffn, dim, h, threads);
        for (size_t i = 0; i < (size_t)t * dim; i++) x[i] += h[i];
    }
    int first = all_logits ? 0 : t - 1;
    SFX(rms_norm)(x + (size_t)first * dim, final_norm, t - first, dim, m->eps, h);
    SFX(linear)(lm_head, 0, h, xb, t - first, dim, m->vocab, logits, threads);
    return 0;
}

/* One token for each of t requests, the weights streamed once for all of them: row r goes to
   slot pos[r] of its own K/V buffers kc[r], vc[r] (layer and head strides ls[r], hs[r]) and
   reads its prompt [0, base[r]) and its tail base[r]..pos[r], as that request's plain step
   would. Every row is computed exactly as kvrag_decode_step computes a one-row step (the same
   linears, row by row, and the same per-KV-head attention job), so a request's logits are
   bitwise the same alone and in any batch. scratch: see native_step.py; logits [t, vocab]. */
int SFX(kvrag_decode_batch)(const Model *m, const int64_t *ids, const int64_t *pos, const int32_t *base, int t,
                            const float *cos, const float *sin, W *const *kc, W *const *vc, const int64_t *ls,
                            const int64_t *hs, float *scratch, int scores_width, int tail_width, float *logits,
                            int threads) {
    const int dim = m->dim, hd = m->head_dim, nh = m->n_heads, kh = m->n_kv, ffn = m->ffn;
    const int group = nh / kh, qkv_dim = (nh + 2 * kh) * hd;
    if (hd != HEAD_DIM || dim % 32 || ffn % 32 || group > MAX_GROUP) return -1;
    const float scale = 1.0f / sqrtf((float)hd);
    float *x = scratch, *h = x + (size_t)t * dim, *qkv = h + (size_t)t * ffn,
          *att = qkv + (size_t)t * qkv_dim, *gate = att + (size_t)t * nh * hd, *up = gate + (size_t)t * ffn,
          *scores = up + (size_t)t * ffn, *inv = scores + (size_t)t * nh * scores_width;
    int32_t *tails = (int32_t *)(inv + (size_t)t * nh);
    int32_t *n_tail = tails + (size_t)t * tail_width;
    X *xb = (X *)(((uintptr_t)(n_tail + t) + 63) & ~(uintptr_t)63);
    const W *embed = m->embed;

    for (int r = 0; r < t; r++) {
        n_tail[r] = (int32_t)(pos[r] - base[r] + 1);
        if (n_tail[r] < 1 || n_tail[r] > tail_width) return -2;
        for (int j = 0; j < n_tail[r]; j++) tails[(size_t)r * tail_width + j] = base[r] + j;
        for (int i = 0; i < dim; i++) x[(size_t)r * dim + i] = W_TO_F32(embed[ids[r] * dim + i]);
    }
    for (int l = 0; l < m->n_layers; l++) {
        const int64_t *w = m->layers + 8 * l;
        SFX(rms_norm)(x, (const W *)w[0], t, dim, m->eps, h);
        SFX(linear)((const W *)w[1], (const W *)w[2], h, xb, t, dim, qkv_dim, qkv, threads);
        for (int r = 0; r < t; r++) {
            float *row = qkv + (size_t)r * qkv_dim;
            const float *c = cos + pos[r] * hd, *s = sin + pos[r] * hd;
            for (int head = 0; head < nh + kh; head++) rope(row + head * hd, c, s, hd / 2);
            for (int g = 0; g < kh; g++) {
                W *kd = kc[r] + l * ls[r] + g * hs[r] + (size_t)pos[r] * hd;
                W *vd = vc[r] + l * ls[r] + g * hs[r] + (size_t)pos[r] * hd;
                for (int d = 0; d < hd; d++) {
                    kd[d] = F32_TO_W(row[(nh + g) * hd + d]);
                    vd[d] = F32_TO_W(row[(nh + kh + g) * hd + d]);
                }
            }
        }
#pragma omp parallel for num_threads(threads) schedule(dynamic)
        for (int job = 0; job < t * kh; job++) { /* a plain step's job: one row, one KV head */
            const int r = job / kh, g = job % kh, b = base[r], shared = b / 16;
            const W *k = kc[r] + l * ls[r] + g * hs[r], *v = vc[r] + l * ls[r] + g * hs[r];
            const float *q = qkv + (size_t)r * qkv_dim;
            const int32_t *tr = tails + (size_t)r * tail_width;
            float *sc = scores + (size_t)r * nh * scores_width;
            SFX(prompt_scores)(q, qkv_dim, 1, nh, group, g, k, 0, shared, scale, sc, scores_width);
            SFX(row_scores)(q, group, g, k, shared, b, tr, b + n_tail[r], scale, sc, scores_width);
            SFX(softmax_pv)(0, 1, nh, group, g, v, b, tr, tail_width, n_tail + r, sc, inv + (size_t)r * nh,
                            scores_width, att + (size_t)r * nh * hd);
        }
        SFX(linear)((const W *)w[3], 0, att, xb, t, nh * hd, dim, h, threads);
        for (size_t i = 0; i < (size_t)t * dim; i++) x[i] += h[i];
        SFX(rms_norm)(x, (const W *)w[4], t, dim, m->eps, h);
        SFX(linear)((const W *)w[5], 0, h, xb, t, dim, ffn, gate, threads);
        SFX(linear)((const W *)w[6], 0, h, xb, t, dim, ffn, up, threads);
        for (size_t i = 0; i < (size_t)t * ffn; i += VW) {
            vf gv = load_vf(gate + i);
            vf a = gv / (1.0f + vexp_vf(-gv)) * load_vf(up + i);
            memcpy(gate + i, &a, sizeof a);
        }
        SFX(linear)((const W *)w[7], 0, gate, xb, t, ffn, dim, h, threads);
        for (size_t i = 0; i < (size_t)t * dim; i++) x[i] += h[i];
    }
    SFX(rms_norm)(x, m->norm, t, dim, m->eps, h);
    SFX(linear)(m->lm_head, 0, h, xb, t, dim, m->vocab, logits, threads);
    return 0;
}

#undef DOT_ROWS
#undef PV_GROUP
#undef PV_CASE
#undef LOADV_W
