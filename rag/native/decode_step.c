/* One decode step of a llama-style decoder on CPU, bf16 weights and K/V, float32 math.

   Decoding reads every weight once per step for a handful of rows, so its speed is the
   speed at which the weights stream from memory. PyTorch spends ~150 small oneDNN calls
   and ~1,000 other ops a step on it (measured: ~19 GB/s for the linears where a plain sum
   streams ~39 GB/s, plus ~10 ms of per-op work); this file is the whole step in one call.

   Every row is computed on its own, in a fixed order: a token's logits are bitwise the same
   alone, as one row of a draft tree, on any branch (Lookahead's losslessness rests on it).
   The activations stay float32 from the embedding to the logits; only K/V are rounded to
   bf16, into the cache. Built by rag/native_step.py with -O3 -march=native -fopenmp; the
   GCC vector types below become AVX-512 or AVX2 code, whatever the CPU has. */

#ifdef __AVX512BF16__
#include <immintrin.h>
#endif
#include <math.h>
#include <stdint.h>
#include <string.h>

typedef float v16f __attribute__((vector_size(64)));
typedef uint16_t v16h __attribute__((vector_size(32)));
typedef uint32_t v16u __attribute__((vector_size(64)));
typedef int32_t v16i __attribute__((vector_size(64)));

#define ROW_BLOCK 8 /* rows whose accumulators live in registers at once */

static inline v16f load_bf16(const uint16_t *p) {
    v16h h;
    memcpy(&h, p, sizeof h);
    v16u u = __builtin_convertvector(h, v16u) << 16;
    v16f f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline v16f load_f32(const float *p) {
    v16f f;
    memcpy(&f, p, sizeof f);
    return f;
}

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline uint16_t f32_to_bf16(float f) { /* round to nearest even, as torch does */
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static inline float hsum(v16f v) { /* a fixed pairwise order */
    float s8[8], s4[4];
    for (int i = 0; i < 8; i++) s8[i] = v[i] + v[i + 8];
    for (int i = 0; i < 4; i++) s4[i] = s8[i] + s8[i + 4];
    return (s4[0] + s4[2]) + (s4[1] + s4[3]);
}

static inline v16f blend_lanes(v16i mask, v16f a, v16f b) { /* mask ? a : b, lane by lane */
    v16i ia, ib;
    memcpy(&ia, &a, sizeof ia);
    memcpy(&ib, &b, sizeof ib);
    v16i r = (mask & ia) | (~mask & ib);
    v16f f;
    memcpy(&f, &r, sizeof f);
    return f;
}

/* exp: Cephes-style range reduction and a degree-6 polynomial (~2 ulp); 0 below -87.3
   (exp(-inf) = 0 for masked scores), clamped above 88.3. */
static inline v16f vexp(v16f x) {
    const v16f zero = {0}, lo = zero - 87.3f, hi = zero + 88.3f;
    v16f xc = blend_lanes(x < lo, lo, blend_lanes(x > hi, hi, x));
    const float magic = 12582912.0f; /* 1.5 * 2^23: adding it rounds to the nearest even integer */
    v16f n = (xc * 1.44269504088896341f + magic) - magic;
    v16f r = xc - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    v16f p = r * 1.9875691500e-4f + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * (r * r) + r + 1.0f;
    v16i e = (__builtin_convertvector(n, v16i) + 127) << 23;
    v16f scale;
    memcpy(&scale, &e, sizeof scale);
    return blend_lanes(x < lo, zero, p * scale);
}

/* Dot products of one weight row with M rows of x (bf16, rounded from float32 as the model's
   bf16 activations are), M fixed at compile time so the accumulators stay in registers. Every
   row is summed in the same order whatever M is. With AVX512-BF16 a dot-product instruction
   does 32 multiply-adds, so the extra rows of a draft tree cost little next to streaming the
   weights; elsewhere the bf16 values are widened and summed with float32 FMAs. */
#ifdef __AVX512BF16__
#define DOT_ROWS(M)                                                                              \
    static inline void dot_rows_##M(const uint16_t *w, const uint16_t *x, int in, float *out) {  \
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
    static inline void dot_rows_##M(const uint16_t *w, const uint16_t *x, int in, float *out) {  \
        v16f acc[M] = {{0}};                                                                     \
        for (int i = 0; i < in; i += 16) {                                                       \
            v16f wv = load_bf16(w + i);                                                          \
            for (int r = 0; r < M; r++) acc[r] += wv * load_bf16(x + (size_t)r * in + i);        \
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

/* y[r, o] = sum_i w[o, i] x[r, i] (+ bias[o]) for rows r < n, w [out, in] bf16 row-major.
   x is float32 [n, in]; xb receives its bf16 rounding. */
static void linear(const uint16_t *w, const uint16_t *bias, const float *x, uint16_t *xb, int n, int in,
                   int out, float *y, int threads) {
    for (size_t i = 0; i < (size_t)n * in; i++) xb[i] = f32_to_bf16(x[i]);
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int o = 0; o < out; o++) {
        const uint16_t *wo = w + (size_t)o * in;
        float b = bias ? bf16_to_f32(bias[o]) : 0.0f, dots[ROW_BLOCK];
        for (int r0 = 0; r0 < n; r0 += ROW_BLOCK) {
            int m = n - r0 < ROW_BLOCK ? n - r0 : ROW_BLOCK;
            const uint16_t *xr = xb + (size_t)r0 * in;
            switch (m) {
                case 1: dot_rows_1(wo, xr, in, dots); break;
                case 2: dot_rows_2(wo, xr, in, dots); break;
                case 3: dot_rows_3(wo, xr, in, dots); break;
                case 4: dot_rows_4(wo, xr, in, dots); break;
                case 5: dot_rows_5(wo, xr, in, dots); break;
                case 6: dot_rows_6(wo, xr, in, dots); break;
                case 7: dot_rows_7(wo, xr, in, dots); break;
                default: dot_rows_8(wo, xr, in, dots); break;
            }
            for (int r = 0; r < m; r++) y[(size_t)(r0 + r) * out + o] = dots[r] + b;
        }
    }
}

static void rms_norm(const float *x, const uint16_t *w, int n, int dim, float eps, float *y) {
    for (int r = 0; r < n; r++) {
        const float *xr = x + (size_t)r * dim;
        v16f acc = {0};
        for (int i = 0; i < dim; i += 16) {
            v16f v = load_f32(xr + i);
            acc += v * v;
        }
        float inv = 1.0f / sqrtf(hsum(acc) / dim + eps);
        for (int i = 0; i < dim; i++) y[(size_t)r * dim + i] = xr[i] * inv * bf16_to_f32(w[i]);
    }
}

static void rope(float *x, const float *cos, const float *sin, int half) {
    for (int i = 0; i < half; i++) {
        float a = x[i], b = x[i + half];
        x[i] = a * cos[i] - b * sin[i];
        x[i + half] = b * cos[i + half] + a * sin[i + half];
    }
}

typedef struct {
    int n_layers, dim, ffn, n_heads, n_kv, head_dim, vocab;
    float eps;
    const uint16_t *embed, *norm, *lm_head;
    /* per layer: attn_norm, wqkv, bqkv (or 0), wo, mlp_norm, w_gate, w_up, w_down */
    const int64_t *layers;
} Model;

/* 16 vectors -> one vector of their 16 lane sums, in a fixed order (15 shuffle-adds instead of
   16 horizontal sums). */
static inline v16f reduce16(v16f *a) {
    const v16i lo1 = {0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23};
    const v16i hi1 = {8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31};
    const v16i lo2 = {0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27};
    const v16i hi2 = {4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31};
    const v16i lo3 = {0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29};
    const v16i hi3 = {2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31};
    const v16i lo4 = {0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30};
    const v16i hi4 = {1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31};
    v16f b[8], c[4], d[2];
    for (int i = 0; i < 8; i++)
        b[i] = __builtin_shuffle(a[2 * i], a[2 * i + 1], lo1) + __builtin_shuffle(a[2 * i], a[2 * i + 1], hi1);
    for (int i = 0; i < 4; i++)
        c[i] = __builtin_shuffle(b[2 * i], b[2 * i + 1], lo2) + __builtin_shuffle(b[2 * i], b[2 * i + 1], hi2);
    for (int i = 0; i < 2; i++)
        d[i] = __builtin_shuffle(c[2 * i], c[2 * i + 1], lo3) + __builtin_shuffle(c[2 * i], c[2 * i + 1], hi3);
    return __builtin_shuffle(d[0], d[1], lo4) + __builtin_shuffle(d[0], d[1], hi4);
}

#define MAX_GROUP 8 /* query heads per KV head */
#define HEAD_DIM 64 /* fixed, so that every loop over it unrolls and the accumulators stay in registers */

/* Attention of one row's `group` query heads (q: [group, hd], consecutive) that share a KV head,
   over the prompt slots [0, base) and the row's own tail slots (tail[0..n_tail), in the order
   a plain step reads them). k, v: the KV head's [slots, hd] (slot stride hd). The keys go 16
   at a time: widened to float32 once for all heads, each head's 16 dot products reduced
   together. scores: [group, >= round16(n)] scratch; out: [group, hd]. */
static inline __attribute__((always_inline)) void attend(const float *q, const int group, const uint16_t *k,
        const uint16_t *v, int base, const int32_t *tail, int n_tail, float scale, float *scores, int width, float *out) {
    const int hd = HEAD_DIM, n = base + n_tail, chunks = HEAD_DIM / 16;
    float kb[16 * HEAD_DIM];
    v16f part[16];
    for (int j0 = 0; j0 < n; j0 += 16) {
        for (int jj = 0; jj < 16; jj++) {
            int j = j0 + jj, slot = j < n ? (j < base ? j : tail[j - base]) : 0;
            for (int c = 0; c < chunks; c++) {
                v16f kv = load_bf16(k + (size_t)slot * hd + 16 * c);
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
        const uint16_t *vj = v + (size_t)(j < base ? j : tail[j - base]) * hd;
        v16f vrow[HEAD_DIM / 16];
        for (int c = 0; c < chunks; c++) vrow[c] = load_bf16(vj + 16 * c);
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
    static void attend_##G(const float *q, const uint16_t *k, const uint16_t *v, int base, const int32_t *tail, \
                           int n_tail, float scale, float *scores, int width, float *out) {                \
        attend(q, G, k, v, base, tail, n_tail, scale, scores, width, out);                                 \
    }
ATTEND_GROUP(1)
ATTEND_GROUP(2)
ATTEND_GROUP(3)
ATTEND_GROUP(4)
ATTEND_GROUP(5)
ATTEND_GROUP(6)
ATTEND_GROUP(7)
ATTEND_GROUP(8)
typedef void (*attend_fn)(const float *, const uint16_t *, const uint16_t *, int, const int32_t *, int, float, float *,
                          int, float *);
static const attend_fn ATTEND[MAX_GROUP + 1] = {0, attend_1, attend_2, attend_3, attend_4,
                                                attend_5, attend_6, attend_7, attend_8};

/* Tokens ids[0..t) at slots start..start+t (positions pos[]) through every layer.

   kc, vc: the request's K/V buffers [n_layers, n_kv, slots, head_dim] (batch row 0), with
   the given layer and head strides. Row r reads the prompt slots [0, base) and its tail:
   tail[r * tail_width .. + tail_len[r]) if tail is given, else the slots base..start + r.
   cos/sin: [*, head_dim] float32 tables indexed by position. Logits of the last row, or of
   every row if all_logits, go to logits [*, vocab]. scratch: see native_step.py. */
int kvrag_decode_step(const Model *m, const int64_t *ids, const int64_t *pos, int t, const float *cos,
                      const float *sin, uint16_t *kc, uint16_t *vc, int64_t layer_stride, int64_t head_stride,
                      int start, int base, const int32_t *tail, const int32_t *tail_len, int tail_width,
                      float *scratch, int scores_width, float *logits, int all_logits, int threads) {
    const int dim = m->dim, hd = m->head_dim, nh = m->n_heads, kh = m->n_kv, ffn = m->ffn;
    const int group = nh / kh, qkv_dim = (nh + 2 * kh) * hd;
    if (hd != HEAD_DIM || dim % 32 || ffn % 32 || group > MAX_GROUP) return -1;
    const float scale = 1.0f / sqrtf((float)hd);
    float *x = scratch, *h = x + (size_t)t * dim, *qkv = h + (size_t)t * ffn,
          *att = qkv + (size_t)t * qkv_dim, *gate = att + (size_t)t * nh * hd, *up = gate + (size_t)t * ffn,
          *scores = up + (size_t)t * ffn;
    int32_t *plain = (int32_t *)(scores + (size_t)t * nh * scores_width); /* tails of a plain step */
    uint16_t *xb = (uint16_t *)(plain + (size_t)t * (start - base + t)); /* a linear's input in bf16 */

    if (!tail) {
        tail_width = start - base + t;
        for (int r = 0; r < t; r++)
            for (int j = 0; j < tail_width; j++) plain[r * tail_width + j] = base + j;
    }
    for (int r = 0; r < t; r++)
        for (int i = 0; i < dim; i++) x[(size_t)r * dim + i] = bf16_to_f32(m->embed[ids[r] * dim + i]);

    for (int l = 0; l < m->n_layers; l++) {
        const int64_t *w = m->layers + 8 * l;
        uint16_t *kl = kc + l * layer_stride, *vl = vc + l * layer_stride;
        rms_norm(x, (const uint16_t *)w[0], t, dim, m->eps, h);
        linear((const uint16_t *)w[1], (const uint16_t *)w[2], h, xb, t, dim, qkv_dim, qkv, threads);
        for (int r = 0; r < t; r++) {
            float *row = qkv + (size_t)r * qkv_dim;
            const float *c = cos + pos[r] * hd, *s = sin + pos[r] * hd;
            for (int head = 0; head < nh + kh; head++) rope(row + head * hd, c, s, hd / 2);
            for (int g = 0; g < kh; g++) {
                uint16_t *kd = kl + g * head_stride + (size_t)(start + r) * hd;
                uint16_t *vd = vl + g * head_stride + (size_t)(start + r) * hd;
                for (int d = 0; d < hd; d++) {
                    kd[d] = f32_to_bf16(row[(nh + g) * hd + d]);
                    vd[d] = f32_to_bf16(row[(nh + kh + g) * hd + d]);
                }
            }
        }
#pragma omp parallel for num_threads(threads) schedule(static)
        for (int job = 0; job < t * kh; job++) {
            int r = job / kh, g = job % kh;
            const int32_t *tr = tail ? tail + (size_t)r * tail_width : plain + (size_t)r * tail_width;
            int n_tail = tail ? tail_len[r] : start - base + r + 1;
            ATTEND[group](qkv + (size_t)r * qkv_dim + g * group * hd, kl + g * head_stride, vl + g * head_stride,
                   base, tr, n_tail, scale, scores + (size_t)(r * nh + g * group) * scores_width, scores_width,
                   att + ((size_t)r * nh + g * group) * hd);
        }
        linear((const uint16_t *)w[3], 0, att, xb, t, nh * hd, dim, h, threads);
        for (size_t i = 0; i < (size_t)t * dim; i++) x[i] += h[i];
        rms_norm(x, (const uint16_t *)w[4], t, dim, m->eps, h);
        linear((const uint16_t *)w[5], 0, h, xb, t, dim, ffn, gate, threads);
        linear((const uint16_t *)w[6], 0, h, xb, t, dim, ffn, up, threads);
        for (size_t i = 0; i < (size_t)t * ffn; i += 16) {
            v16f g = load_f32(gate + i);
            v16f a = g / (1.0f + vexp(-g)) * load_f32(up + i);
            memcpy(gate + i, &a, sizeof a);
        }
        linear((const uint16_t *)w[7], 0, gate, xb, t, ffn, dim, h, threads);
        for (size_t i = 0; i < (size_t)t * dim; i++) x[i] += h[i];
    }
    int first = all_logits ? 0 : t - 1;
    rms_norm(x + (size_t)first * dim, m->norm, t - first, dim, m->eps, h);
    linear(m->lm_head, 0, h, xb, t - first, dim, m->vocab, logits, threads);
    return 0;
}
