/* The typed part of decode_step.c, included once per weight dtype: W (weights and K/V), X (a
   matmul's input), LOAD_W / LOAD_X (16 of them as float32), W_TO_F32 / F32_TO_W / F32_TO_X,
   BF16_DOT, and SUFFIX for the names. */

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
        v16f acc = {0};
        for (int i = 0; i < dim; i += 16) {
            v16f v = load_f32(xr + i);
            acc += v * v;
        }
        float inv = 1.0f / sqrtf(hsum(acc) / dim + eps);
        for (int i = 0; i < dim; i++) y[(size_t)r * dim + i] = xr[i] * inv * W_TO_F32(w[i]);
    }
}

/* Attention of one row's `group` query heads (q: [group, hd], consecutive) that share a KV head,
   over the prompt slots [0, base) and the row's own tail slots (tail[0..n_tail), in the order
   a plain step reads them). k, v: the KV head's [slots, hd] (slot stride hd). The keys go 16
   at a time: loaded (widened) as float32 once for all heads, each head's 16 dot products
   reduced together. scores: [group, >= round16(n)] scratch; out: [group, hd]. */
static inline __attribute__((always_inline)) void SFX(attend)(const float *q, const int group, const W *k,
        const W *v, int base, const int32_t *tail, int n_tail, float scale, float *scores, int width, float *out) {
    const int hd = HEAD_DIM, n = base + n_tail, chunks = HEAD_DIM / 16;
    float kb[16 * HEAD_DIM];
    v16f part[16];
    for (int j0 = 0; j0 < n; j0 += 16) {
        for (int jj = 0; jj < 16; jj++) {
            int j = j0 + jj, slot = j < n ? (j < base ? j : tail[j - base]) : 0;
            for (int c = 0; c < chunks; c++) {
                v16f kv = LOAD_W(k + (size_t)slot * hd + 16 * c);
                memcpy(kb + jj * hd + 16 * c, &kv, sizeof kv);
            }
        }
        for (int h = 0; h < group; h++) {
            const float *qh = q + h * hd;
            for (int jj = 0; jj < 16; jj++) {
                v16f acc = load_f32(qh) * load_f32(kb + jj * hd);
                for (int c = 1; c < chunks; c++) acc += load_f32(qh + 16 * c) * load_f32(kb + jj * hd + 16 * c);
                part[jj] = acc;
            }
            v16f sc = reduce16(part) * scale;
            memcpy(scores + (size_t)h * width + j0, &sc, sizeof sc);
        }
    }
    int padded = (n + 15) & ~15;
    float inv[MAX_GROUP];
    for (int h = 0; h < group; h++) {
        float *sh = scores + (size_t)h * width;
        for (int j = n; j < padded; j++) sh[j] = -INFINITY;
        v16f vmax = load_f32(sh);
        for (int j = 16; j < padded; j += 16) {
            v16f x = load_f32(sh + j);
            vmax = blend_lanes(x > vmax, x, vmax);
        }
        float mx = vmax[0];
        for (int i = 1; i < 16; i++) mx = vmax[i] > mx ? vmax[i] : mx;
        v16f sum = {0};
        for (int j = 0; j < padded; j += 16) {
            v16f e = vexp(load_f32(sh + j) - mx);
            memcpy(sh + j, &e, sizeof e);
            sum += e;
        }
        inv[h] = 1.0f / hsum(sum);
    }
    v16f acc[MAX_GROUP][HEAD_DIM / 16] = {{{0}}};
    for (int j = 0; j < n; j++) {
        const W *vj = v + (size_t)(j < base ? j : tail[j - base]) * hd;
        v16f vrow[HEAD_DIM / 16];
        for (int c = 0; c < chunks; c++) vrow[c] = LOAD_W(vj + 16 * c);
        for (int h = 0; h < group; h++) {
            float p = scores[(size_t)h * width + j];
            for (int c = 0; c < chunks; c++) acc[h][c] += p * vrow[c];
        }
    }
    for (int h = 0; h < group; h++)
        for (int c = 0; c < chunks; c++) {
            v16f o = acc[h][c] * inv[h];
            memcpy(out + h * hd + 16 * c, &o, sizeof o);
        }
}

/* attend with the group size a compile-time constant (one copy per size). */
#define ATTEND_GROUP(G)                                                                                    \
    static void SFX(attend_##G)(const float *q, const W *k, const W *v, int base, const int32_t *tail,     \
                                int n_tail, float scale, float *scores, int width, float *out) {           \
        SFX(attend)(q, G, k, v, base, tail, n_tail, scale, scores, width, out);                            \
    }
ATTEND_GROUP(1)
ATTEND_GROUP(2)
ATTEND_GROUP(3)
ATTEND_GROUP(4)
ATTEND_GROUP(5)
ATTEND_GROUP(6)
ATTEND_GROUP(7)
ATTEND_GROUP(8)
static void (*const SFX(ATTEND)[MAX_GROUP + 1])(const float *, const W *, const W *, int, const int32_t *, int, float,
                                                 float *, int, float *) = {
    0, SFX(attend_1), SFX(attend_2), SFX(attend_3), SFX(attend_4),
    SFX(attend_5), SFX(attend_6), SFX(attend_7), SFX(attend_8)};

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
          *scores = up + (size_t)t * ffn;
    int32_t *plain = (int32_t *)(scores + (size_t)t * nh * scores_width); /* tails of a plain step */
    X *xb = (X *)(plain + (size_t)t * (start - base + t)); /* a linear's input, in its type */
    const W *embed = m->embed, *final_norm = m->norm, *lm_head = m->lm_head;

    if (!tail) {
        tail_width = start - base + t;
        for (int r = 0; r < t; r++)
            for (int j = 0; j < tail_width; j++) plain[r * tail_width + j] = base + j;
    }
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
#pragma omp parallel for num_threads(threads) schedule(static)
        for (int job = 0; job < t * kh; job++) {
            int r = job / kh, g = job % kh;
            const int32_t *tr = tail ? tail + (size_t)r * tail_width : plain + (size_t)r * tail_width;
            int n_tail = tail ? tail_len[r] : start - base + r + 1;
            SFX(ATTEND)[group](qkv + (size_t)r * qkv_dim + g * group * hd, kl + g * head_stride, vl + g * head_stride,
                   base, tr, n_tail, scale, scores + (size_t)(r * nh + g * group) * scores_width, scores_width,
                   att + ((size_t)r * nh + g * group) * hd);
        }
        SFX(linear)((const W *)w[3], 0, att, xb, t, nh * hd, dim, h, threads);
        for (size_t i = 0; i < (size_t)t * dim; i++) x[i] += h[i];
        SFX(rms_norm)(x, (const W *)w[4], t, dim, m->eps, h);
        SFX(linear)((const W *)w[5], 0, h, xb, t, dim, ffn, gate, threads);
        SFX(linear)((const W *)w[6], 0, h, xb, t, dim, ffn, up, threads);
        for (size_t i = 0; i < (size_t)t * ffn; i += 16) {
            v16f g = load_f32(gate + i);
            v16f a = g / (1.0f + vexp(-g)) * load_f32(up + i);
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

#undef DOT_ROWS
#undef ATTEND_GROUP
