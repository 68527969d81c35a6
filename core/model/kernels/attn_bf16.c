/* Whisper's attention over bf16 keys and values, AVX-512 BF16, inference: the decoder's
 * cross-attention (mmq_cross_attn_bf16) and the encoder's window self-attention
 * (mmq_window_attn_bf16, below).
 *
 * Why a cross-attention kernel of our own: a beam step asks few queries (5 rows: the beams) of many keys
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
 * for AVX-512 BF16 by attribute: core/model/cpu_kernels.py calls them only on a CPU that
 * has avx512_bf16.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"
#include "vec.h"

#if MMQ_VW != 16
#error "the AVX-512 build only: its vectors are 16 floats"
#endif

#define QR 8  /* query rows per score block (cross-attention) */
#define WR 12 /* query rows per score block (window attention): two P V blocks */
#define QMAX 12
#define PR 6  /* query rows per P V block: 6 x 4 accumulators, 4 value vectors */
#define HS 64 /* the head size this kernel handles (every Whisper size's) */

/* s[r][j] = scale * q_r . k_j for nr rows (at stride qs) and the L keys (16 at a time);
 * kp's rows (dimension pairs) are S keys apart. */
BF16 static INL void scores(const uint16_t *q, int64_t qs, const uint16_t *kp, int64_t S,
                            int64_t L, float scale, float *s, int64_t Lv, int nr, float *mx) {
    uint32_t qp[QMAX][HS / 2];  /* each row's dimension pairs, as 32-bit words */
    for (int r = 0; r < nr; r++) memcpy(qp[r], q + r * qs, sizeof qp[r]);
    const __m512 sc = _mm512_set1_ps(scale);
    __m512 top[QMAX];  /* with mx: each row's largest score so far, per lane */
    if (mx)
        for (int r = 0; r < nr; r++) top[r] = _mm512_set1_ps(-INFINITY);
    for (int64_t j0 = 0; j0 < L; j0 += 16) {
        const __mmask16 m = tail_mask(L - j0);
        __m512 acc[QMAX];
        for (int r = 0; r < nr; r++) acc[r] = _mm512_setzero_ps();
        for (int d = 0; d < HS / 2; d++) {
            const __m512i k = _mm512_maskz_loadu_epi32(m, kp + (d * S + j0) * 2);
            for (int r = 0; r < nr; r++)
                acc[r] = _mm512_dpbf16_ps(acc[r], (__m512bh)_mm512_set1_epi32((int)qp[r][d]),
                                          (__m512bh)k);
        }
        for (int r = 0; r < nr; r++) {
            const __m512 x = _mm512_mul_ps(acc[r], sc);
            _mm512_storeu_ps(s + r * Lv + j0, x);
            if (mx) top[r] = _mm512_mask_max_ps(top[r], m, top[r], x);
        }
    }
    if (mx)
        for (int r = 0; r < nr; r++) mx[r] = _mm512_reduce_max_ps(top[r]);
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
            case 8: scores(q0, HS, kp, S, L, scale, s, Lv, 8, NULL); break;
            case 5: scores(q0, HS, kp, S, L, scale, s, Lv, 5, NULL); break;
            case 1: scores(q0, HS, kp, S, L, scale, s, Lv, 1, NULL); break;
            default: scores(q0, HS, kp, S, L, scale, s, Lv, nr, NULL);
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


/* -- the encoder's window self-attention ------------------------------------------------
 *
 * Each 30 s window's (S, S) attention per head, S = 1,500 (or any S): the queries, keys and
 * values read straight from the q, k, v projection's output (B, S, 3, nh, HS), the output
 * written as (B, S, nh, HS) bf16, the next projection's input. Per (window, head) the keys
 * are packed pair-interleaved as above and the values in pairs of keys, (S/2, HS, 2), so
 * that both products run on VDPBF16PS: the scores (fp32, never rounded: ATen's bf16 matmul
 * rounds them to bf16 before the softmax) and P V, the probabilities rounded to bf16 as
 * ATen's bf16 path rounds them. Two matmuls around a softmax wrote each head's 1,500 x
 * 1,500 scores out and read them back twice; here a block of 12 query rows' scores stays
 * in L1/L2. */

/* One head's keys and values from rows of stride rs: kp (HS/2, Lv, 2), vp (Lv/2, HS, 2);
 * value pairs past S are zero (their probabilities are zero, and 0 x garbage may be NaN). */
BF16 static void pack_kv(const uint16_t *k, const uint16_t *v, int64_t rs, int64_t S,
                         int64_t Lv, uint32_t *kp, uint16_t *vp) {
    for (int64_t j = 0; j < S; j++) {
        const uint32_t *kr = (const uint32_t *)(k + j * rs);  /* HS/2 words */
        for (int d = 0; d < HS / 2; d++) kp[d * Lv + j] = kr[d];
    }
    /* Interleave rows 2i and 2i+1 of v: 32 values of each at a time. */
    const __m512i lo = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41,
                                        9, 40, 8, 39, 7, 38, 6, 37, 5, 36, 4, 35, 3, 34, 2,
                                        33, 1, 32, 0);
    const __m512i hi = _mm512_add_epi16(lo, _mm512_set1_epi16(16));
    for (int64_t i = 0; i < Lv / 2; i++) {
        const int64_t a = 2 * i, b = 2 * i + 1;
        for (int c = 0; c < HS / 32; c++) {
            const __m512i va = a < S ? _mm512_loadu_si512(v + a * rs + c * 32)
                                     : _mm512_setzero_si512();
            const __m512i vb = b < S ? _mm512_loadu_si512(v + b * rs + c * 32)
                                     : _mm512_setzero_si512();
            _mm512_storeu_si512(vp + (i * HS + c * 32) * 2, _mm512_permutex2var_epi16(va, lo, vb));
            _mm512_storeu_si512(vp + (i * HS + c * 32 + 16) * 2,
                                _mm512_permutex2var_epi16(va, hi, vb));
        }
    }
}

/* o_r = bf16(inv_r * (sum_j p[r][j] v_j + alpha_r add_r)) for nr rows: p (rows of Lv/2
 * words, bf16 pairs of keys), vp (Lv/2, HS, 2), Lp key pairs; add (nr rows of HS fp32)
 * and alpha only for the rows past a clip (``split``), else NULL. */
BF16 static INL void pv_pairs(const uint32_t *p, int64_t Lw, const uint16_t *vp, int64_t Lp,
                              const float *inv, uint16_t *o, int64_t os, int nr,
                              const float *const *add, const float *alpha) {
    __m512 acc[PR][HS / 16];
    for (int r = 0; r < nr; r++)
        for (int c = 0; c < HS / 16; c++) acc[r][c] = _mm512_setzero_ps();
    for (int64_t jp = 0; jp < Lp; jp++) {
        __m512i vv[HS / 16];
        for (int c = 0; c < HS / 16; c++)
            vv[c] = _mm512_loadu_si512(vp + (jp * HS + c * 16) * 2);
        for (int r = 0; r < nr; r++) {
            const __m512bh pr = (__m512bh)_mm512_set1_epi32((int)p[r * Lw + jp]);
            for (int c = 0; c < HS / 16; c++)
                acc[r][c] = _mm512_dpbf16_ps(acc[r][c], pr, (__m512bh)vv[c]);
        }
    }
    if (add)
        for (int r = 0; r < nr; r++)
            for (int c = 0; c < HS / 16; c++)
                acc[r][c] = _mm512_fmadd_ps(_mm512_set1_ps(alpha[r]),
                                            _mm512_loadu_ps(add[r] + c * 16), acc[r][c]);
    for (int r = 0; r < nr; r++)
        for (int c = 0; c < HS / 16; c++)
            _mm256_storeu_si256((__m256i *)(o + r * os + c * 16), (__m256i)_mm512_cvtneps_pbh(
                _mm512_mul_ps(acc[r][c], _mm512_set1_ps(inv[r]))));
}

/* One row of fp32 scores s[0..S), ``top`` >= each -> the exponentials exp(s - top)
 * rounded to bf16 in p[0..Lv) (zeros past S), in one pass; returns their fp32 sum. */
BF16 static INL float softmax_row_bf16(const float *s, float top, int64_t S, int64_t Lv,
                                       uint16_t *p) {
    const __m512 mx = _mm512_set1_ps(top);
    __m512 sum = _mm512_setzero_ps();
    int64_t j = 0;
    for (; j + 32 <= S; j += 32) {
        const __m512 a = exp_le0(_mm512_sub_ps(_mm512_loadu_ps(s + j), mx));
        const __m512 b = exp_le0(_mm512_sub_ps(_mm512_loadu_ps(s + j + 16), mx));
        sum = _mm512_add_ps(sum, _mm512_add_ps(a, b));
        _mm512_storeu_si512(p + j, (__m512i)_mm512_cvtne2ps_pbh(b, a));
    }
    for (; j < Lv; j += 32) {  /* the last partial pair of vectors, then zeros */
        const __mmask16 ma = tail_mask(S > j ? S - j : 0);
        const __mmask16 mb = tail_mask(S > j + 16 ? S - j - 16 : 0);
        const __m512 a = _mm512_maskz_mov_ps(ma, exp_le0(_mm512_sub_ps(
            _mm512_maskz_loadu_ps(ma, s + j), mx)));
        const __m512 b = _mm512_maskz_mov_ps(mb, exp_le0(_mm512_sub_ps(
            _mm512_maskz_loadu_ps(mb, s + j + 16), mx)));
        sum = _mm512_add_ps(sum, _mm512_add_ps(a, b));
        _mm512_storeu_si512(p + j, (__m512i)_mm512_cvtne2ps_pbh(b, a));
    }
    return _mm512_reduce_add_ps(sum);
}

/* The part of a padded window's first attention that its rows past the clip share with
 * an all-zero window's (core/model/whisper/padding.py): from row u on, the keys and
 * values are the zero window's, so for a query row i >= u, A_i = sum over j >= u of
 * exp(s_ij - M_i) v_j and Z_i = the sum of those exponentials (M_i: the largest of row
 * i's scores against those keys) are made once per u, a multiple of ``step``. Row i then
 * needs only its scores against the u keys before: attention over S keys becomes one
 * over u. For split k = u / step: rows from off[k] on of A (S - u, nh, HS), Z and M
 * (S - u, nh), fp32. */
typedef struct {
    const float *A, *Z, *M;
    const int64_t *off;
    int64_t step;
} split_t;

/* Query rows [m_begin, m_end) against the first L keys (kp, vp at stride Lv), into out;
 * with sp, rows from u = m_begin on add the zero window's part (split_t) for head h. */
BF16 static void window_rows(const uint16_t *q, int64_t rs, const uint32_t *kp,
                             const uint16_t *vp, int64_t L, int64_t Lv, float *s,
                             uint16_t *pb, uint16_t *out, int64_t os, int64_t m_begin,
                             int64_t m_end, const split_t *sp, int64_t nh, int64_t h) {
    const int64_t Lp = (L + 1) / 2, LvL = (L + 31) / 32 * 32;
    const int64_t u = m_begin;
    const float *A = NULL, *Z = NULL, *M = NULL;
    if (sp) {
        const int64_t first = sp->off[u / sp->step];
        A = sp->A + first * nh * HS;
        Z = sp->Z + first * nh;
        M = sp->M + first * nh;
    }
    for (int64_t m0 = m_begin; m0 < m_end; m0 += WR) {
        const int nr = m_end - m0 < WR ? (int)(m_end - m0) : WR;
        float mx[WR], inv[WR], alpha[WR];
        const float *add[WR];
        if (nr == WR) scores(q + m0 * rs, rs, (const uint16_t *)kp, Lv, L, 1.f, s, Lv, WR, mx);
        else scores(q + m0 * rs, rs, (const uint16_t *)kp, Lv, L, 1.f, s, Lv, nr, mx);
        for (int r = 0; r < nr; r++) {
            if (!sp) {
                inv[r] = 1.f / softmax_row_bf16(s + r * Lv, mx[r], L, LvL, pb + r * Lv);
                continue;
            }
            const int64_t i = m0 + r;
            const float m_pad = M[(i - u) * nh + h];
            const float top = mx[r] > m_pad ? mx[r] : m_pad;
            const float sum = softmax_row_bf16(s + r * Lv, top, L, LvL, pb + r * Lv);
            alpha[r] = expf(m_pad - top);
            inv[r] = 1.f / (sum + alpha[r] * Z[(i - u) * nh + h]);
            add[r] = A + ((i - u) * nh + h) * HS;
        }
        const uint32_t *p = (const uint32_t *)pb;
        for (int r0 = 0; r0 < nr; r0 += PR) {
            const int n = nr - r0 < PR ? nr - r0 : PR;
            uint16_t *o = out + (m0 + r0) * os;
            const uint32_t *pr = p + r0 * Lv / 2;
            if (!sp && n == PR) pv_pairs(pr, Lv / 2, vp, Lp, inv + r0, o, os, PR, NULL, NULL);
            else if (!sp) pv_pairs(pr, Lv / 2, vp, Lp, inv + r0, o, os, n, NULL, NULL);
            else pv_pairs(pr, Lv / 2, vp, Lp, inv + r0, o, os, n, add + r0, alpha + r0);
        }
    }
}

/* qkv: (B, S, 3, nh, HS) bf16, the queries already scaled by 1/sqrt(HS); out: (B, S, nh,
 * HS) bf16. Threads split the (window, head) pairs. rows: NULL, or (B,) each window's u
 * (S: none of its rows are the zero window's; else a multiple of step), with the
 * zero window's A, Z, M and off (split_t). */
int mmq_window_attn_bf16(const uint16_t *qkv, int64_t B, int64_t S, int64_t nh, int64_t hs,
                         uint16_t *out, int nthreads, const int64_t *rows, const float *A,
                         const float *Z, const float *M, const int64_t *off, int64_t step) {
    if (hs != HS) return 1;
    const split_t split = {A, Z, M, off, step};
    const int64_t Lv = (S + 31) / 32 * 32;  /* whole bf16 vectors of probabilities */
    const int64_t rs = 3 * nh * HS;  /* one position's q, k, v */
    int failed = 0;
    #pragma omp parallel num_threads(nthreads)
    {
        float *s = aligned_alloc(64, sizeof(float) * WR * Lv);
        uint16_t *pb = aligned_alloc(64, sizeof(uint16_t) * WR * Lv);
        uint32_t *kp = aligned_alloc(64, sizeof(uint32_t) * (HS / 2) * Lv);
        uint16_t *vp = aligned_alloc(64, sizeof(uint16_t) * Lv * HS);
        const int ok = s && pb && kp && vp;
        if (!ok) {
            #pragma omp atomic write
            failed = 2;
        }
        #pragma omp for schedule(dynamic, 1)
        for (int64_t t = 0; t < B * nh; t++) {
            if (!ok) continue;
            const int64_t b = t / nh, h = t % nh;
            const uint16_t *base = qkv + b * S * rs + h * HS;
            const int64_t u = rows ? rows[b] : S;
            uint16_t *o = out + b * S * nh * HS + h * HS;
            pack_kv(base + nh * HS, base + 2 * nh * HS, rs, S, Lv, kp, vp);
            window_rows(base, rs, kp, vp, S, Lv, s, pb, o, nh * HS, 0, u, NULL, nh, h);
            if (u < S)
                window_rows(base, rs, kp, vp, u, Lv, s, pb, o, nh * HS, u, S, &split, nh, h);
        }
        free(s);
        free(pb);
        free(kp);
        free(vp);
    }
    return failed;
}
