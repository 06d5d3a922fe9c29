/* opengemma's int8 x int8 CPU kernels for few-row (decode) quantized linears: AVX-512 VNNI + VBMI.

   Built and loaded at run time by opengemma/quant/native.py (which explains why they exist and how
   they were measured); called through ctypes with the data pointers of the modules' own buffers:

   - og_linear_q8: the int8 weights of Int8Linear (row-major [N][K], per-row bf16 scale);
   - og_linear_q4: the int4 weights of Int4Linear in PyTorch's CPU int4pack layout (no copy).

   Both first quantize the activations to int8 in blocks of 32 (llama.cpp's Q8_0: one fp32 scale
   d = max|x| / 127 per block, q = round-to-nearest-even(x * 127 / max|x|)), then multiply int8 by
   int8 with vpdpbusd, accumulating exactly in int32 inside a block and in fp32 across blocks.
   Every output row is one dot product computed the same way whatever the number of input rows M,
   so a row's result does not depend on the call's other rows (bitwise). */
#include "kernels.h"

#define QB 32          /* activation block (and int4 group) size */
#define MAX_M 16       /* most input rows per call */
#define STACK_BYTES (1L << 16)
#ifndef PAR_MIN
#define PAR_MIN (1L << 19) /* weights below which one thread is faster than waking a second */
#endif

int og_abi_version(void) { return 2; }

static inline void store_row(void *y, int out_bf16, long i, const float *v, int n) {
    if (out_bf16) {
        uint16_t *o = (uint16_t *)y + i;
        for (int j = 0; j < n; j++) o[j] = f32_to_bf16(v[j]);
    } else {
        memcpy((float *)y + i, v, (size_t)n * 4);
    }
}

/* M rows of K activations (row stride ldx) -> q [M][K] int8 (+128 as uint8 when offset), d [M][K/32],
   qsum [M][K/32] (sum of q per block) and dl [M][K/4] (d repeated per 4-byte lane). */
static void quantize(const void *x, int is_bf16, long ldx, int M, int K, int offset,
                     int8_t *q, float *d, int32_t *qsum, float *dl) {
    for (int m = 0; m < M; m++) {
        for (int b = 0; b < K / QB; b++) {
            long i = (long)m * ldx + (long)b * QB;
            __m512 v0 = load16(x, is_bf16, i), v1 = load16(x, is_bf16, i + 16);
            float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
            float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
            __m512i i0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, _mm512_set1_ps(inv)));
            __m512i i1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, _mm512_set1_ps(inv)));
            __m128i b0 = _mm512_cvtsepi32_epi8(i0), b1 = _mm512_cvtsepi32_epi8(i1);
            if (offset) {
                b0 = _mm_xor_si128(b0, _mm_set1_epi8((char)0x80));
                b1 = _mm_xor_si128(b1, _mm_set1_epi8((char)0x80));
            }
            int8_t *qo = q + (long)m * K + (long)b * QB;
            _mm_storeu_si128((__m128i *)qo, b0);
            _mm_storeu_si128((__m128i *)(qo + 16), b1);
            d[m * (K / QB) + b] = amax / 127.0f;
            qsum[m * (K / QB) + b] = _mm512_reduce_add_epi32(_mm512_add_epi32(i0, i1));
            for (int l = 0; l < QB / 4; l++) dl[m * (K / 4) + b * (QB / 4) + l] = amax / 127.0f;
        }
    }
}

/* int8: y[m][n] = s[n] * sum_k d[m][k/32] * W[n][k] * q[m][k], K % 64 == 0. vpdpbusd multiplies
   unsigned by signed bytes, so the activations carry +128 and 128 * sum(W) (one more vpdpbusd
   against a constant 128) is subtracted again, exactly, in int32 per 4-byte lane. */
static inline void q8_rows(const int8_t *W, long ldw, const uint16_t *s, int n0, int n1, int K, int M,
                           const uint8_t *xq, const float *dl, void *y, long ldy, int out_bf16) {
    const __m512i c128 = _mm512_set1_epi8((char)0x80);
    for (int n = n0; n < n1; n++) {
        const int8_t *w = W + (long)n * ldw;
        __m512 acc[MAX_M];
        for (int m = 0; m < M; m++) acc[m] = _mm512_setzero_ps();
        for (int k = 0; k < K; k += 64) {
            __m512i wv = _mm512_loadu_si512((const void *)(w + k));
            __m512i ws = _mm512_dpbusd_epi32(_mm512_setzero_si512(), c128, wv);
            for (int m = 0; m < M; m++) {
                __m512i av = _mm512_loadu_si512((const void *)(xq + (long)m * K + k));
                __m512i p = _mm512_sub_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), av, wv), ws);
                acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), _mm512_loadu_ps(dl + (long)m * (K / 4) + k / 4), acc[m]);
            }
        }
        uint32_t sb = (uint32_t)s[n] << 16;
        float sf;
        memcpy(&sf, &sb, 4);
        for (int m = 0; m < M; m++) {
            float v = _mm512_reduce_add_ps(acc[m]) * sf;
            store_row(y, out_bf16, (long)m * ldy + n, &v, 1);
        }
    }
}

/* int4, PyTorch's CPU int4pack layout: P [N/64][K][32] bytes, byte j of (block b, column k) holds
   row 64b+j in its low nibble and row 64b+32+j in its high nibble; sz [K/32][npad][2] bf16 (scale,
   zero), w = (q - 8) * scale + zero. Per group g of 32 columns, with P_ = d_g and Q_ = d_g * qsum_g:
   sum_k w x = scale * (P_ * sum q*xq - 8 Q_) + zero * Q_. vpermt2b gathers 4 consecutive columns
   of 16 rows into vpdpbusd's 4-byte lanes (q unsigned, activations signed: no offset needed). */
static inline void q4_block(const uint8_t *P, const uint16_t *sz, long npad, int b, int K, int M,
                            const int8_t *xq, const float *d, const int32_t *qsum, float *out /* [M][64] */) {
    const __m512i lo = _mm512_set1_epi8(0x0F);
    uint8_t t0[64], t1[64];
    for (int r = 0; r < 16; r++)
        for (int t = 0; t < 4; t++) {
            t0[4 * r + t] = (uint8_t)(32 * t + r);
            t1[4 * r + t] = (uint8_t)(32 * t + 16 + r);
        }
    const __m512i idx0 = _mm512_loadu_si512(t0), idx1 = _mm512_loadu_si512(t1);
    __m512 acc[4][4];
    for (int m = 0; m < M; m++)
        for (int j = 0; j < 4; j++) acc[m][j] = _mm512_setzero_ps();
    const uint8_t *base = P + (long)b * K * 32;
    for (int g = 0; g < K / QB; g++) {
        __m512i ia[4][4];
        for (int m = 0; m < M; m++)
            for (int j = 0; j < 4; j++) ia[m][j] = _mm512_setzero_si512();
        for (int kk = 0; kk < QB; kk += 4) {
            int k = g * QB + kk;
            __m512i A = _mm512_loadu_si512((const void *)(base + (long)k * 32));      /* columns k, k+1 */
            __m512i B = _mm512_loadu_si512((const void *)(base + (long)k * 32 + 64)); /* columns k+2, k+3 */
            __m512i la = _mm512_and_si512(A, lo), lb = _mm512_and_si512(B, lo);
            __m512i ha = _mm512_and_si512(_mm512_srli_epi16(A, 4), lo);
            __m512i hb = _mm512_and_si512(_mm512_srli_epi16(B, 4), lo);
            __m512i r0 = _mm512_permutex2var_epi8(la, idx0, lb), r1 = _mm512_permutex2var_epi8(la, idx1, lb);
            __m512i r2 = _mm512_permutex2var_epi8(ha, idx0, hb), r3 = _mm512_permutex2var_epi8(ha, idx1, hb);
            for (int m = 0; m < M; m++) {
                int32_t a4;
                memcpy(&a4, xq + (long)m * K + k, 4);
                __m512i av = _mm512_set1_epi32(a4);
                ia[m][0] = _mm512_dpbusd_epi32(ia[m][0], r0, av);
                ia[m][1] = _mm512_dpbusd_epi32(ia[m][1], r1, av);
                ia[m][2] = _mm512_dpbusd_epi32(ia[m][2], r2, av);
                ia[m][3] = _mm512_dpbusd_epi32(ia[m][3], r3, av);
            }
        }
        const uint16_t *szg = sz + ((long)g * npad + (long)b * 64) * 2;
        for (int j = 0; j < 4; j++) {
            __m512i v = _mm512_loadu_si512((const void *)(szg + 32 * j)); /* 16 (scale, zero) pairs */
            __m512 sc = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
            __m512 ze = _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32((int)0xFFFF0000u)));
            for (int m = 0; m < M; m++) {
                float P_ = d[m * (K / QB) + g], Q_ = P_ * (float)qsum[m * (K / QB) + g];
                __m512 t = _mm512_fmadd_ps(_mm512_cvtepi32_ps(ia[m][j]), _mm512_set1_ps(P_), _mm512_set1_ps(-8.0f * Q_));
                acc[m][j] = _mm512_fmadd_ps(sc, t, acc[m][j]);
                acc[m][j] = _mm512_fmadd_ps(ze, _mm512_set1_ps(Q_), acc[m][j]);
            }
        }
    }
    for (int m = 0; m < M; m++)
        for (int j = 0; j < 4; j++) _mm512_storeu_ps(out + m * 64 + 16 * j, acc[m][j]);
}

/* Scratch for the quantized activations: on the stack when small, else on the heap. */
typedef struct { int8_t *q; float *d, *dl; int32_t *qs; void *heap; } scratch_t;

static int scratch_init(scratch_t *s, int M, int K, void *stack) {
    size_t nq = (size_t)M * K, nb = (size_t)M * (K / QB), nl = (size_t)M * (K / 4);
    size_t bytes = nq + 4 * (2 * nb + nl) + 64;
    char *p = bytes <= STACK_BYTES ? (char *)stack : (char *)(s->heap = malloc(bytes));
    if (bytes <= STACK_BYTES) s->heap = NULL;
    if (!p) return -1;
    s->d = (float *)p;
    s->qs = (int32_t *)(s->d + nb);
    s->dl = (float *)(s->qs + nb);
    s->q = (int8_t *)(s->dl + nl);
    return 0;
}

/* y [M][N] (row stride ldy, fp32 or bf16) = x [M][K] @ (W * s[:, None]).T; returns 0, or -1 when
   the arguments are out of the kernel's range (the caller then uses PyTorch's kernel). */
int og_linear_q8(const void *x, int is_bf16, long ldx, int M, int K, const int8_t *W, long ldw,
                 const uint16_t *s, int N, void *y, long ldy, int out_bf16) {
    if (M < 1 || M > MAX_M || K % 64 || N < 1) return -1;
    float stack[STACK_BYTES / 4];
    scratch_t sc;
    if (scratch_init(&sc, M, K, stack)) return -1;
    quantize(x, is_bf16, ldx, M, K, 1, sc.q, sc.d, sc.qs, sc.dl);
    const int R = 16;
    #pragma omp parallel for schedule(static) if ((long)N * K > PAR_MIN)
    for (int n0 = 0; n0 < N; n0 += R) {
        int n1 = n0 + R < N ? n0 + R : N;
        if (M == 1)
            q8_rows(W, ldw, s, n0, n1, K, 1, (const uint8_t *)sc.q, sc.dl, y, ldy, out_bf16);
        else
            q8_rows(W, ldw, s, n0, n1, K, M, (const uint8_t *)sc.q, sc.dl, y, ldy, out_bf16);
    }
    free(sc.heap);
    return 0;
}

/* y [M][N] = x [M][K] @ W.T for an int4pack weight of N rows (padded to npad, a multiple of 64). */
int og_linear_q4(const void *x, int is_bf16, long ldx, int M, int K, const uint8_t *P, const uint16_t *sz,
                 int N, long npad, void *y, long ldy, int out_bf16) {
    if (M < 1 || M > MAX_M || K % QB || N < 1 || npad % 64 || npad < N) return -1;
    float stack[STACK_BYTES / 4];
    scratch_t sc;
    if (scratch_init(&sc, M, K, stack)) return -1;
    quantize(x, is_bf16, ldx, M, K, 0, sc.q, sc.d, sc.qs, sc.dl);
    int nb = (int)(npad / 64);
    #pragma omp parallel for schedule(static) if ((long)N * K > PAR_MIN)
    for (int b = 0; b < nb; b++) {
        float out[4 * 64];
        int nn = N - 64 * b < 64 ? N - 64 * b : 64;
        for (int m0 = 0; m0 < M; m0 += 4) {
            int mm = M - m0 < 4 ? M - m0 : 4;
            const int8_t *q = sc.q + (long)m0 * K;
            const float *d = sc.d + m0 * (K / QB);
            const int32_t *qs = sc.qs + m0 * (K / QB);
            if (mm == 1)
                q4_block(P, sz, npad, b, K, 1, q, d, qs, out);
            else
                q4_block(P, sz, npad, b, K, mm, q, d, qs, out);
            for (int m = 0; m < mm; m++)
                if (nn > 0) store_row(y, out_bf16, (long)(m0 + m) * ldy + 64L * b, out + m * 64, nn);
        }
    }
    free(sc.heap);
    return 0;
}
