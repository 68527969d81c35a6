/* Whisper's decoder cross-attention over bf16 keys and values, AVX-512 BF16, inference.
 *
 * Why a kernel of our own: a beam step asks few queries (5 rows: the beams) of many keys
 * (1,500 encoder positions per 30 s window) per (window, head). ATen's SDPA, and two
 * matmuls around a softmax alike, spend ~40 us on each such problem: 4.2 ms per layer
 * and step for 16 windows (96 problems), a third of the whole beam search on a Zen 5,
 * where reading the 37 MB of keys and values takes ~0.5 ms.
 *
 * Per (window, head): the scores of up to 8 query rows against 16 keys at a time are
 * accumulated with VDPBF16PS, which multiplies pairs of bf16 along the head dimension
 * into fp32 lanes. For that, the keys are stored pair-interleaved, (hs/2, S, 2): 16
 * keys' values of one dimension pair are one 64-byte load (core/model/whisper/model.py
 * lays them out so once per window). The softmax is fp32, the other kernels' (softmax_exp in
 * vec.h); the probabilities stay fp32 and multiply the values widened to fp32
 * (ATen's bf16 SDPA rounds them to bf16 first), and each output row is scaled by the
 * inverse sum at the end. Threads (OpenMP, torch's runtime) split the (window, head)
 * pairs.
 *
 * Built into the AVX-512 level's library only (setup.py), with these functions compiled
 * for AVX-512 BF16 by attribute: core/model/cpu_kernels.py calls it only on a CPU that
 * has avx512_bf16.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "vec.h"

#if MMQ_VW != 16
#error "the AVX-512 build only: its vectors are 16 floats"
#endif

#define BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))
#define INL __attribute__((always_inline)) inline
#define QR 8  /* query rows per score block */
#define PR 6  /* query rows per P V block: 6 x 4 accumulators, 4 value vectors */
#define HS 64 /* the head size this kernel handles (every Whisper size's) */

static INL __mmask16 tail_mask(int64_t rem) {
    return rem >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << rem) - 1u);
}

/* s[r][j] = scale * q_r . k_j for nr rows and the L keys (16 at a time). */
BF16 static INL void scores(const uint16_t *q, const uint16_t *kp, int64_t S, int64_t L,
                            float scale, float *s, int64_t Lv, int nr) {
    uint32_t qp[QR][HS / 2];  /* each row's dimension pairs, as 32-bit words */
    for (int r = 0; r < nr; r++) memcpy(qp[r], q + r * HS, sizeof qp[r]);
    const __m512 sc = _mm512_set1_ps(scale);
    for (int64_t j0 = 0; j0 < L; j0 += 16) {
        const __mmask16 m = tail_mask(L - j0);
        __m512 acc[QR];
        for (int r = 0; r < nr; r++) acc[r] = _mm512_setzero_ps();
        for (int d = 0; d < HS / 2; d++) {
            const __m512i k = _mm512_maskz_loadu_epi32(m, kp + (d * S + j0) * 2);
            for (int r = 0; r < nr; r++)
                acc[r] = _mm512_dpbf16_ps(acc[r], (__m512bh)_mm512_set1_epi32((int)qp[r][d]),
                                          (__m512bh)k);
        }
        for (int r = 0; r < nr; r++) _mm512_storeu_ps(s + r * Lv + j0, _mm512_mul_ps(acc[r], sc));
    }
}

/* o_r = inv_r * sum_j p[r][j] v_j for nr rows, v (L, HS) bf16 widened to fp32. */
BF16 static INL void pv(const float *p, int64_t Lv, const uint16_t *v, int64_t L,
                        const float *inv, float *o, int64_t os, int nr) {
    __m512 acc[PR][HS / 16];
    for (int r = 0; r < nr; r++)
        for (int c = 0; c < HS / 16; c++) acc[r][c] = _mm512_setzero_ps();
    for (int64_t j = 0; j < L; j++) {
        __m512 vv[HS / 16];
        for (int c = 0; c < HS / 16; c++)
            vv[c] = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(
                _mm256_loadu_si256((const __m256i *)(v + j * HS + c * 16))), 16));
        for (int r = 0; r < nr; r++) {
            const __m512 pr = _mm512_set1_ps(p[r * Lv + j]);
            for (int c = 0; c < HS / 16; c++) acc[r][c] = _mm512_fmadd_ps(pr, vv[c], acc[r][c]);
        }
    }
    for (int r = 0; r < nr; r++)
        for (int c = 0; c < HS / 16; c++)
            _mm512_storeu_ps(o + r * os + c * 16, _mm512_mul_ps(acc[r][c], _mm512_set1_ps(inv[r])));
}

/* One (window, head): q (M, HS), kp (HS/2, S, 2), v (S, HS), L real keys; output rows
 * at stride os. The call sites pass constant row counts, so the accumulators stay in
 * registers. */
BF16 static void attend(const uint16_t *q, const uint16_t *kp, const uint16_t *v, int64_t S,
                        int64_t L, int64_t M, float scale, float *out, int64_t os, float *s,
                        int64_t Lv) {
    for (int64_t m0 = 0; m0 < M; m0 += QR) {
        const int nr = M - m0 < QR ? (int)(M - m0) : QR;
        const uint16_t *q0 = q + m0 * HS;
        switch (nr) {
            case 8: scores(q0, kp, S, L, scale, s, Lv, 8); break;
            case 5: scores(q0, kp, S, L, scale, s, Lv, 5); break;
            case 1: scores(q0, kp, S, L, scale, s, Lv, 1); break;
            default: scores(q0, kp, S, L, scale, s, Lv, nr);
        }
        float inv[QR];
        for (int r = 0; r < nr; r++) inv[r] = softmax_exp(s + r * Lv, L);
        for (int r0 = 0; r0 < nr; r0 += PR) {
            const int n = nr - r0 < PR ? nr - r0 : PR;
            float *o = out + (m0 + r0) * os;
            if (n == PR) pv(s + r0 * Lv, Lv, v, L, inv + r0, o, os, PR);
            else if (n == 5) pv(s + r0 * Lv, Lv, v, L, inv + r0, o, os, 5);
            else if (n == 1) pv(s + r0 * Lv, Lv, v, L, inv + r0, o, os, 1);
            else pv(s + r0 * Lv, Lv, v, L, inv + r0, o, os, n);
        }
    }
}

/* q: (B, nh, M, HS) bf16; kp: (B, nh, HS/2, S, 2) bf16; v: (B, nh, S, HS) bf16; lens:
 * (B,) real keys per window (a prefix), or NULL for all S; out: (B, M, nh, HS) fp32. */
int mmq_cross_attn_bf16(const uint16_t *q, const uint16_t *kp, const uint16_t *v,
                        const int64_t *lens, int64_t B, int64_t nh, int64_t M, int64_t S,
                        int64_t hs, float scale, float *out, int nthreads) {
    if (hs != HS) return 1;
    const int64_t Lv = (S + 15) / 16 * 16;
    int failed = 0;
    #pragma omp parallel num_threads(nthreads)
    {
        float *s = aligned_alloc(64, sizeof(float) * QR * Lv);
        if (!s) {
            #pragma omp atomic write
            failed = 2;
        }
        #pragma omp for schedule(dynamic, 2)
        for (int64_t t = 0; t < B * nh; t++) {
            const int64_t b = t / nh, h = t % nh;
            const int64_t L = lens ? lens[b] : S;
            if (!s || L > S) continue;
            if (L < 1) {  /* no keys: zeros, not what the last call left there */
                for (int64_t m = 0; m < M; m++)
                    memset(out + (b * M + m) * nh * HS + h * HS, 0, sizeof(float) * HS);
                continue;
            }
            attend(q + t * M * HS, kp + t * S * HS, v + t * S * HS, S, L, M, scale,
                   out + b * M * nh * HS + h * HS, nh * HS, s, Lv);
        }
        free(s);
    }
    return failed;
}
