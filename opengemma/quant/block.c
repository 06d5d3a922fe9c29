/* A decode step's whole transformer block in one native call (og_block_decode), for quantized
   models whose four linears the native kernels of kernels.c read.

   Built with kernels.c and loaded by opengemma/quant/native.py; driven by
   opengemma/quant/native_block.py, which explains why it exists and when it runs. It computes, for
   R = B * T rows (at most 16; T new tokens per sequence, each at its own position), what
   opengemma.model.Block computes with the fused projections of opengemma.fusion:

     pre-attention RMSNorm -> qkv -> [q/k RMSNorm per head] -> RoPE -> keys and values written into
     the KV cache at the step's slots -> attention over the first n slots under the step's additive
     mask [soft-capped] -> o -> [post-attention norm] -> residual -> pre-MLP norm -> gate/up ->
     GELU(tanh)(gate) * up -> down -> [post-MLP norm] -> residual.

   Everything is computed in fp32. With bf16 activations (bf = 1) each value is rounded to bf16
   wherever PyTorch's path stores a bf16 tensor (after every norm, linear, RoPE product and sum,
   residual add, GELU and product), so the two paths differ only in the order of their sums (the
   norms' mean, the attention's dot products) and in exp/tanh's last bits. Attention is fp32 over
   any number of keys (PyTorch's bf16 path rounds its scores to bf16 beyond 256 keys). */
#include <math.h>

#include "kernels.h"

typedef struct {
    int kind; /* 8: Int8Linear, int8 rows [N][ldw] with bf16 scales s; 4: Int4Linear, int4pack, ldw = npad */
    int K, N;
    long ldw;
    const void *w;
    const uint16_t *s;
} og_lin;

typedef struct {
    int d, H, KV, D, F;    /* d_model, query heads, key/value heads, head dim, ffn width */
    int qk_norm, sandwich; /* Gemma 3's q/k norms; Gemma 2/3's post-sub-layer norms */
    float eps, scale, softcap; /* softcap <= 0: none */
    const float *pre_attn, *post_attn, *pre_mlp, *post_mlp, *q_norm, *k_norm; /* (1 + w), fp32 */
    /* qkv: q, k and v stacked, or q alone with k and v beside it (k.kind != 0); gate_up: gate and
       up stacked, or gate alone with up beside it (up.kind != 0) */
    og_lin qkv, k, v, o, gate_up, up, down;
} og_block;

/* exp(x), |error| ~1 ulp: Cephes' range reduction and polynomial, 16 lanes. */
static inline __m512 exp16(__m512 x) {
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-104.0f)), _mm512_set1_ps(88.72283f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(p, n);
}

static int lin_ok(const og_lin *L, int K, int N) {
    if (L->K != K || L->N != N) return 0;
    if (L->kind == 8) return L->K % 64 == 0 && L->ldw >= L->K;
    return L->kind == 4 && L->K % 32 == 0 && L->ldw % 64 == 0 && L->ldw >= L->N;
}

static inline float exp1(float x) { return _mm512_cvtss_f32(exp16(_mm512_set1_ps(x))); }

static inline float rnd(float x, int bf) { return bf ? bf16_round(x) : x; }

static void round_all(float *x, long n, int bf) {
    if (bf)
        for (long i = 0; i < n; i++) x[i] = bf16_round(x[i]);
}

/* y = x / sqrt(mean(x^2) + eps) * w, as torch's rms_norm (fp32), then rounded; x and y may alias. */
static void rms_norm(const float *x, float *y, int n, const float *w, float eps, int bf) {
    __m512 acc = _mm512_setzero_ps();
    int i = 0;
    for (; i + 16 <= n; i += 16) {
        __m512 v = _mm512_loadu_ps(x + i);
        acc = _mm512_fmadd_ps(v, v, acc);
    }
    float ss = _mm512_reduce_add_ps(acc);
    for (; i < n; i++) ss += x[i] * x[i];
    float r = 1.0f / sqrtf(ss / (float)n + eps);
    for (i = 0; i < n; i++) y[i] = rnd((x[i] * r) * w[i], bf);
}

/* y [M][N] (row stride ldy) = x [M][K] (row stride ldx, fp32) @ W.T, fp32, rounded to the activation dtype. */
static int linear(const og_lin *L, const float *x, long ldx, int M, float *y, long ldy, int bf) {
    int rc = L->kind == 8
        ? og_linear_q8(x, 0, ldx, M, L->K, (const int8_t *)L->w, L->ldw, L->s, L->N, y, ldy, 0)
        : og_linear_q4(x, 0, ldx, M, L->K, (const uint8_t *)L->w, L->s, L->N, L->ldw, y, ldy, 0);
    if (bf)
        for (int m = 0; m < M; m++) round_all(y + (long)m * ldy, L->N, bf);
    return rc;
}

/* x * cos + roll(x, D/2) * sin_signed (opengemma.model.apply_rope), rounding each product and the sum. */
static void rope(float *x, const void *cos, const void *sin, long off, int D, int bf, float *tmp) {
    memcpy(tmp, x, (size_t)D * 4);
    for (int i = 0; i < D; i++) {
        float c = load1(cos, bf, off + i), s = load1(sin, bf, off + i);
        float a = rnd(tmp[i] * c, bf), b = rnd(tmp[(i + D / 2) % D] * s, bf);
        x[i] = rnd(a + b, bf);
    }
}

static inline float dot(const float *q, const void *k, int bf, int D) {
    __m512 acc = _mm512_setzero_ps();
    int i = 0;
    for (; i + 16 <= D; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(q + i), load16(k, bf, i), acc);
    float s = _mm512_reduce_add_ps(acc);
    for (; i < D; i++) s += q[i] * load1(k, bf, i);
    return s;
}

static inline void axpy(float *o, float p, const void *v, int bf, int D) {
    int i = 0;
    for (; i + 16 <= D; i += 16)
        _mm512_storeu_ps(o + i, _mm512_fmadd_ps(_mm512_set1_ps(p), load16(v, bf, i), _mm512_loadu_ps(o + i)));
    for (; i < D; i++) o[i] += p * load1(v, bf, i);
}

/* One query head over n cached keys: softmax(scale q.k [soft-capped] + mask) . v -> out [D]. */
static void attend_one(const og_block *L, const float *q, const void *kc, const void *vc, long ss, int n,
                       const void *mask, int bf, float *sc, float *out) {
    const int D = L->D;
    float mx = -INFINITY;
    for (int s = 0; s < n; s++) {
        float v = dot(q, (const char *)kc + (bf ? 2 : 4) * s * ss, bf, D);
        if (L->softcap > 0) { /* cap * tanh(v * scale / cap), tanh(y) = 1 - 2 / (1 + exp(2y)) */
            float y = v * L->scale / L->softcap;
            v = L->softcap * (1.0f - 2.0f / (1.0f + exp1(2.0f * y)));
        } else {
            v = v * L->scale;
        }
        v += load1(mask, bf, s);
        sc[s] = v;
        mx = v > mx ? v : mx;
    }
    float sum = 0.0f;
    int s = 0;
    __m512 acc = _mm512_setzero_ps();
    for (; s + 16 <= n; s += 16) {
        __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(sc + s), _mm512_set1_ps(mx)));
        _mm512_storeu_ps(sc + s, e);
        acc = _mm512_add_ps(acc, e);
    }
    for (; s < n; s++) {
        sc[s] = exp1(sc[s] - mx);
        sum += sc[s];
    }
    sum += _mm512_reduce_add_ps(acc);
    float inv = 1.0f / sum;
    memset(out, 0, (size_t)D * 4);
    for (s = 0; s < n; s++) axpy(out, sc[s] * inv, (const char *)vc + (bf ? 2 : 4) * s * ss, bf, D);
    round_all(out, D, bf);
}

static void gelu_mul(float *g, const float *u, int n, int bf) {
    /* GELU(tanh) = 0.5 x (1 + tanh(c (x + 0.044715 x^3))) = x / (1 + exp(-2 c (x + 0.044715 x^3))) */
    const float c = 0.7978845608028654f;
    int i = 0;
    for (; i + 16 <= n; i += 16) {
        __m512 x = _mm512_loadu_ps(g + i);
        __m512 t = _mm512_mul_ps(x, _mm512_fmadd_ps(_mm512_mul_ps(x, x), _mm512_set1_ps(0.044715f), _mm512_set1_ps(1.0f)));
        __m512 e = exp16(_mm512_mul_ps(t, _mm512_set1_ps(-2.0f * c)));
        _mm512_storeu_ps(g + i, _mm512_div_ps(x, _mm512_add_ps(e, _mm512_set1_ps(1.0f))));
    }
    for (; i < n; i++) {
        float x = g[i], t = x * (1.0f + 0.044715f * x * x);
        g[i] = x / (1.0f + exp1(-2.0f * c * t));
    }
    for (i = 0; i < n; i++) g[i] = rnd(rnd(g[i], bf) * u[i], bf);
}

static void store(void *dst, int bf, long i, float v) {
    if (bf)
        ((uint16_t *)dst)[i] = f32_to_bf16(v);
    else
        ((float *)dst)[i] = v;
}

/* out [B][T][d] = block(h [B][T][d]) in the activation dtype (bf: bf16, else fp32). cos, sin:
   [B][T][D]; the cache k, v: element strides sb, sh, ss per row, head and slot (the head dim
   contiguous), written at slots [B][T], attended over slots 0..n-1 under mask [B][T][n].
   Returns 0, or -1 when the arguments are out of range (then nothing is written) or memory ran out
   (out is not written; the caller's PyTorch path redoes the block, rewriting the same cache slots). */
int og_block_decode(const og_block *L, const void *h, void *out, int B, int T, int bf, const void *cos,
                    const void *sin, void *ck, void *cv, long sb, long sh, long ss, const int64_t *slots,
                    const void *mask, int n) {
    const int d = L->d, H = L->H, KV = L->KV, D = L->D, F = L->F, R = B * T, W = (H + 2 * KV) * D;
    const int sq = L->k.kind == 0, sg = L->up.kind == 0; /* stacked projections */
    if (R < 1 || R > 16 || n < 1 || KV < 1 || H % KV || D % 2 || !lin_ok(&L->qkv, d, sq ? W : H * D)
        || (!sq && (!lin_ok(&L->k, d, KV * D) || !lin_ok(&L->v, d, KV * D))) || !lin_ok(&L->o, H * D, d)
        || !lin_ok(&L->gate_up, d, sg ? 2 * F : F) || (!sg && !lin_ok(&L->up, d, F)) || !lin_ok(&L->down, F, d))
        return -1;
    long nx = (long)R * d, nq = (long)R * W, na = (long)R * H * D, ng = (long)R * 2 * F;
    float *x = malloc(sizeof(float) * (3 * nx + nq + na + ng + D));
    if (!x) return -1;
    float *a = x + nx, *r = a + nx, *qkv = r + nx, *att = qkv + nq, *gu = att + na, *tmp = gu + ng;
    int rc = 0;
    for (long i = 0; i < nx; i++) x[i] = load1(h, bf, i);

    for (int m = 0; m < R; m++) rms_norm(x + (long)m * d, a + (long)m * d, d, L->pre_attn, L->eps, bf);
    rc |= linear(&L->qkv, a, d, R, qkv, W, bf);
    if (!sq) {
        rc |= linear(&L->k, a, d, R, qkv + (long)H * D, W, bf);
        rc |= linear(&L->v, a, d, R, qkv + (long)(H + KV) * D, W, bf);
    }
    for (int m = 0; m < R; m++) {
        float *row = qkv + (long)m * W;
        for (int j = 0; j < H + KV; j++) {
            if (L->qk_norm) rms_norm(row + j * D, row + j * D, D, j < H ? L->q_norm : L->k_norm, L->eps, bf);
            rope(row + j * D, cos, sin, (long)m * D, D, bf, tmp);
        }
        int b = m / T;
        long slot = (long)slots[m];
        for (int j = 0; j < KV; j++) {
            long base = b * sb + j * sh + slot * ss;
            for (int i = 0; i < D; i++) {
                store(ck, bf, base + i, row[(H + j) * D + i]);
                store(cv, bf, base + i, row[(H + KV + j) * D + i]);
            }
        }
    }

    const int G = H / KV;
    int oom = 0;
    #pragma omp parallel for schedule(static) if ((long)R * H * n * D > (1L << 16))
    for (int mh = 0; mh < R * H; mh++) {
        int m = mh / H, j = mh % H, b = m / T;
        float *sc = malloc(sizeof(float) * (size_t)n);
        if (!sc) {
            #pragma omp atomic write
            oom = 1;
            continue;
        }
        long base = b * sb + (long)(j / G) * sh;
        const void *kc = (const char *)ck + (bf ? 2 : 4) * base, *vc = (const char *)cv + (bf ? 2 : 4) * base;
        const void *mk = (const char *)mask + (bf ? 2 : 4) * (long)m * n;
        attend_one(L, qkv + (long)m * W + (long)j * D, kc, vc, ss, n, mk, bf, sc, att + ((long)m * H + j) * D);
        free(sc);
    }

    if (oom) {
        free(x);
        return -1;
    }
    rc |= linear(&L->o, att, (long)H * D, R, r, d, bf);
    for (int m = 0; m < R; m++) {
        float *rr = r + (long)m * d, *xx = x + (long)m * d;
        if (L->sandwich) rms_norm(rr, rr, d, L->post_attn, L->eps, bf);
        for (int i = 0; i < d; i++) xx[i] = rnd(xx[i] + rr[i], bf);
        rms_norm(xx, a + (long)m * d, d, L->pre_mlp, L->eps, bf);
    }
    rc |= linear(&L->gate_up, a, d, R, gu, 2L * F, bf);
    if (!sg) rc |= linear(&L->up, a, d, R, gu + F, 2L * F, bf);
    for (int m = 0; m < R; m++) gelu_mul(gu + (long)m * 2 * F, gu + (long)m * 2 * F + F, F, bf);
    rc |= linear(&L->down, gu, 2L * F, R, r, d, bf);
    for (int m = 0; m < R; m++) {
        float *rr = r + (long)m * d, *xx = x + (long)m * d;
        if (L->sandwich) rms_norm(rr, rr, d, L->post_mlp, L->eps, bf);
        for (int i = 0; i < d; i++) store(out, bf, (long)m * d + i, rnd(xx[i] + rr[i], bf));
    }
    free(x);
    return rc ? -1 : 0;
}
