/* Shared by opengemma's native kernels (kernels.c: quantized linears; block.c: a decode step's
   transformer block): value conversions and the linear kernels' entry points. */
#ifndef OPENGEMMA_KERNELS_H
#define OPENGEMMA_KERNELS_H
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static inline __m512 load16(const void *x, int is_bf16, long i) {
    if (is_bf16) {
        __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)x + i));
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
    return _mm512_loadu_ps((const float *)x + i);
}

static inline uint16_t f32_to_bf16(float f) { /* round to nearest even, as torch's .to(bfloat16) */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40); /* NaN stays NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static inline float bf16_round(float f) { /* f rounded to bf16's precision, kept as fp32 */
    uint32_t u = (uint32_t)f32_to_bf16(f) << 16;
    float r;
    memcpy(&r, &u, 4);
    return r;
}

static inline float load1(const void *x, int is_bf16, long i) {
    if (is_bf16) {
        uint32_t u = (uint32_t)((const uint16_t *)x)[i] << 16;
        float r;
        memcpy(&r, &u, 4);
        return r;
    }
    return ((const float *)x)[i];
}

int og_linear_q8(const void *x, int is_bf16, long ldx, int M, int K, const int8_t *W, long ldw,
                 const uint16_t *s, int N, void *y, long ldy, int out_bf16);
int og_linear_q4(const void *x, int is_bf16, long ldx, int M, int K, const uint8_t *P, const uint16_t *sz,
                 int N, long npad, void *y, long ldy, int out_bf16);
#endif
