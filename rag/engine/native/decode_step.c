/* One decode step of a llama-style decoder on CPU: bf16 or float32 weights and K/V, float32 math.

   Decoding reads every weight once per step for a handful of rows, so its speed is the
   speed at which the weights stream from memory. PyTorch spends ~150 small oneDNN calls
   and ~1,000 other ops a step on it (measured: ~19 GB/s for the linears where a plain sum
   streams ~39 GB/s, plus ~10 ms of per-op work); this file is the whole step in one call.

   Every row is computed on its own, in a fixed order: a token's logits are bitwise the same
   alone, as one row of a draft tree, on any branch (Lookahead's losslessness rests on it).
   The activations stay float32 from the embedding to the logits; with bf16 weights, K/V
   are rounded to bf16 into the cache and a matmul's input to bf16 (as the model's bf16
   activations are). Built by rag/native_step.py with -O3 -march=native -fopenmp; the GCC
   vector types below become AVX-512 or AVX2 code, whatever the CPU has. Without AVX-512 a
   64-byte vector is no register type and GCC keeps every v16f on the stack, so the hot loops
   (linears, scores, softmax, P.V, norms, SiLU) use 32-byte vectors there. The typed part (decode_step_typed.h) is compiled once per weight dtype. */

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
typedef float v8f __attribute__((vector_size(32)));
typedef uint16_t v8h __attribute__((vector_size(16)));
typedef uint32_t v8u __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));

#ifdef __AVX512F__
#define ROW_BLOCK 8 /* rows whose accumulators live in registers at once (32 of them) */
#else
#define ROW_BLOCK 6 /* 16 registers: 12 accumulators, the weights, an input */
#endif

/* Loads of 16 lanes, and of 8 for the loops that must stay in registers without AVX-512. */
#define DEFINE_LOADS(BF16, F32, VF, VH, VU)                       \
    static inline VF BF16(const uint16_t *p) {                    \
        VH h;                                                     \
        memcpy(&h, p, sizeof h);                                  \
        VU u = __builtin_convertvector(h, VU) << 16;              \
        VF f;                                                     \
        memcpy(&f, &u, sizeof f);                                 \
        return f;                                                 \
    }                                                             \
    static inline VF F32(const float *p) {                        \
        VF f;                                                     \
        memcpy(&f, p, sizeof f);                                  \
        return f;                                                 \
    }
DEFINE_LOADS(load_bf16, load_f32, v16f, v16h, v16u)
DEFINE_LOADS(load8_bf16, load8_f32, v8f, v8h, v8u)

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

static inline float hsum8(v8f s8) { /* hsum's last two steps */
    float s4[4];
    for (int i = 0; i < 4; i++) s4[i] = s8[i] + s8[i + 4];
    return (s4[0] + s4[2]) + (s4[1] + s4[3]);
}

static inline float hsum_halves(v8f lo, v8f hi) { return hsum8(lo + hi); } /* hsum of the v16f (lo, hi) */

/* mask ? a : b, lane by lane, for 16 and 8 lanes */
#define DEFINE_BLEND(NAME, VF, VI)                  \
    static inline VF NAME(VI mask, VF a, VF b) {    \
        VI ia, ib;                                  \
        memcpy(&ia, &a, sizeof ia);                 \
        memcpy(&ib, &b, sizeof ib);                 \
        VI r = (mask & ia) | (~mask & ib);          \
        VF f;                                       \
        memcpy(&f, &r, sizeof f);                   \
        return f;                                   \
    }
DEFINE_BLEND(blend_lanes, v16f, v16i)
DEFINE_BLEND(blend8, v8f, v8i)

/* exp: Cephes-style range reduction and a degree-6 polynomial (~2 ulp); 0 below -87.3
   (exp(-inf) = 0 for masked scores), clamped above 88.3. Defined for 16 and 8 lanes. */
#define DEFINE_VEXP(NAME, VF, VI, BLEND)                                                   \
    static inline VF NAME(VF x) {                                                          \
        const VF zero = {0}, lo = zero - 87.3f, hi = zero + 88.3f;                         \
        VF xc = BLEND(x < lo, lo, BLEND(x > hi, hi, x));                                   \
        const float magic = 12582912.0f; /* 1.5 * 2^23: rounds to the nearest even */      \
        VF n = (xc * 1.44269504088896341f + magic) - magic;                                \
        VF r = xc - n * 0.693359375f;                                                      \
        r = r - n * -2.12194440e-4f;                                                       \
        VF p = r * 1.9875691500e-4f + 1.3981999507e-3f;                                    \
        p = p * r + 8.3334519073e-3f;                                                      \
        p = p * r + 4.1665795894e-2f;                                                      \
        p = p * r + 1.6666665459e-1f;                                                      \
        p = p * r + 5.0000001201e-1f;                                                      \
        p = p * (r * r) + r + 1.0f;                                                        \
        VI e = (__builtin_convertvector(n, VI) + 127) << 23;                               \
        VF scale;                                                                          \
        memcpy(&scale, &e, sizeof scale);                                                  \
        return BLEND(x < lo, zero, p * scale);                                             \
    }
DEFINE_VEXP(vexp, v16f, v16i, blend_lanes)
DEFINE_VEXP(vexp8, v8f, v8i, blend8)

/* The widest vector that is a register type: loops that need no particular width use it. */
#ifdef __AVX512F__
#define VW 16
typedef v16f vf;
#define load_vf load_f32
#define blend_vf blend_lanes
#define vexp_vf vexp
#define hsum_vf hsum
#else
#define VW 8
typedef v8f vf;
#define load_vf load8_f32
#define blend_vf blend8
#define vexp_vf vexp8
#define hsum_vf hsum8
#endif

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
    const void *embed, *norm, *lm_head; /* the model's dtype: bf16 or float32 */
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

/* reduce16 on vectors given as 32-byte halves (lo: lanes 0-7, hi: 8-15), the same adds in the
   same order; the 16 sums, times scale, go to out. Every step of reduce16 takes the low 8 lanes
   of its result from its first operand and the high 8 from its second. */
static inline void fold8(v8f xl, v8f xh, v8f yl, v8f yh, v8i plo, v8i phi, v8f *rl, v8f *rh) {
    *rl = __builtin_shuffle(xl, xh, plo) + __builtin_shuffle(xl, xh, phi);
    *rh = __builtin_shuffle(yl, yh, plo) + __builtin_shuffle(yl, yh, phi);
}

static inline void reduce16_halves(const v8f *lo, const v8f *hi, float scale, float *out) {
    const v8i lo1 = {0, 1, 2, 3, 4, 5, 6, 7}, hi1 = {8, 9, 10, 11, 12, 13, 14, 15};
    const v8i lo2 = {0, 1, 2, 3, 8, 9, 10, 11}, hi2 = {4, 5, 6, 7, 12, 13, 14, 15};
    const v8i lo3 = {0, 1, 4, 5, 8, 9, 12, 13}, hi3 = {2, 3, 6, 7, 10, 11, 14, 15};
    const v8i lo4 = {0, 2, 4, 6, 8, 10, 12, 14}, hi4 = {1, 3, 5, 7, 9, 11, 13, 15};
    v8f bl[8], bh[8], cl[4], ch[4], dl[2], dh[2], el, eh;
    for (int i = 0; i < 8; i++) fold8(lo[2 * i], hi[2 * i], lo[2 * i + 1], hi[2 * i + 1], lo1, hi1, &bl[i], &bh[i]);
    for (int i = 0; i < 4; i++) fold8(bl[2 * i], bh[2 * i], bl[2 * i + 1], bh[2 * i + 1], lo2, hi2, &cl[i], &ch[i]);
    for (int i = 0; i < 2; i++) fold8(cl[2 * i], ch[2 * i], cl[2 * i + 1], ch[2 * i + 1], lo3, hi3, &dl[i], &dh[i]);
    fold8(dl[0], dh[0], dl[1], dh[1], lo4, hi4, &el, &eh);
    el = el * scale;
    eh = eh * scale;
    memcpy(out, &el, sizeof el);
    memcpy(out + 8, &eh, sizeof eh);
}

#define MAX_GROUP 8 /* query heads per KV head */
#define HEAD_DIM 64 /* fixed, so that every loop over it unrolls and the accumulators stay in registers */
#define KEY_BLOCKS 8 /* attention: prompt key blocks (of 16 keys) per job of scores */
#define PV_MAX_ROWS 6 /* attention: rows whose P.V accumulators (~24 of the 32 registers) a job holds at once */
#define PV_ROWS(G) ((G) >= 6 ? 1 : 6 / (G))

#define CAT_(a, b) a##b
#define CAT(a, b) CAT_(a, b)
#define SFX(name) CAT(name, SUFFIX)

/* bf16 weights and K/V; a matmul's input rounded to bf16. Without bf16 dot products the input
   is kept widened (exact), so it is not widened again for every weight row. */
static inline float round_bf16(float f) { return bf16_to_f32(f32_to_bf16(f)); }
#define SUFFIX _bf16
#define W uint16_t
#define LOAD_W load_bf16
#define LOAD8_W load8_bf16
#ifdef __AVX512BF16__
#define X uint16_t
#define LOAD_X load_bf16
#define LOAD8_X load8_bf16
#define F32_TO_X f32_to_bf16
#else
#define X float
#define LOAD_X load_f32
#define LOAD8_X load8_f32
#define F32_TO_X round_bf16
#endif
#define W_TO_F32 bf16_to_f32
#define F32_TO_W f32_to_bf16
#define BF16_DOT 1
#include "decode_step_typed.h"
#undef SUFFIX
#undef W
#undef X
#undef LOAD_W
#undef LOAD_X
#undef LOAD8_W
#undef LOAD8_X
#undef W_TO_F32
#undef F32_TO_W
#undef F32_TO_X
#undef BF16_DOT

/* float32 weights and K/V (the dtype of CPUs without native bf16) */
static inline float same_f32(float f) { return f; }
#define SUFFIX _f32
#define W float
#define X float
#define LOAD_W load_f32
#define LOAD_X load_f32
#define LOAD8_W load8_f32
#define LOAD8_X load8_f32
#define W_TO_F32 same_f32
#define F32_TO_W same_f32
#define F32_TO_X same_f32
#define BF16_DOT 0
#include "decode_step_typed.h"
