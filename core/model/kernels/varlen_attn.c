/* Attention over packed ragged sequences on the CPU, fp32, inference only.
 *
 * Why a kernel of our own: with sentence-length sequences (10-40 tokens) and a head
 * size of 32, one (sequence, head) problem is a few thousand multiply-adds, and
 * PyTorch's CPU SDPA spends more on each problem's set-up than on the arithmetic
 * (about 3 us each; bench/attention.py). It also needs the sequences gathered into
 * padded groups and the real rows picked out again, two copies per layer. This
 * kernel reads q, k and v straight from the packed (N, 3, nh, hs) projection and
 * writes the packed (N, nh, hs) output: no padding, no copies, one call per layer.
 *
 * Per (sequence, head): K is transposed into a small buffer so that the scores of 4
 * query rows against 4 vectors of keys are held in registers while the head
 * dimension is swept; a masked softmax over the real keys; then P V with the head
 * dimension in vectors. Threads (OpenMP, the same runtime as torch's) split the
 * (sequence, head) pairs. Written with GCC vector extensions, so one source
 * compiles for AVX-512, AVX2 or NEON. setup.py picks the vector width and the key tile
 * per build: 16 floats and 4 key vectors for AVX-512's 32 registers of 16 floats; for
 * AVX2's 16 registers of 8 floats, 8 floats and 2 key vectors, so that the 4 x KC
 * accumulators, KC key vectors and a broadcast query fit without spilling (16-float
 * vectors and 4 key vectors there spilled and ran 4.2x slower than AVX-512).
 *
 * core/cpu_kernels.py compiles and loads it; core/attention.py decides when to
 * call it and checks it against the reference path in the tests.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "vec.h"

#ifndef MMQ_KC
#define MMQ_KC 4
#endif
#define KC MMQ_KC /* key vectors per score tile */
#define R 4       /* query rows per register block */

/* s[r][c*W..] = scale * (q_r . k) for nr query rows and nc key vectors. The call sites
 * pass constants, so the accumulators (at most 4 x 4 vectors) stay in registers. */
static inline __attribute__((always_inline)) void qk_tile(
        const float *q, int64_t rs, const float *kt, int64_t Lv, int64_t hs, float scale,
        float *s, int nr, int nc) {
    vf acc[R][KC];
    for (int r = 0; r < nr; r++)
        for (int c = 0; c < nc; c++) acc[r][c] = splat(0.f);
    for (int64_t d = 0; d < hs; d++) {
        vf kv[KC];
        for (int c = 0; c < nc; c++) kv[c] = load(kt + d * Lv + c * W);
        for (int r = 0; r < nr; r++) {
            const vf qv = splat(q[r * rs + d]);
            for (int c = 0; c < nc; c++) acc[r][c] += qv * kv[c];
        }
    }
    for (int r = 0; r < nr; r++)
        for (int c = 0; c < nc; c++) store(s + r * Lv + c * W, acc[r][c] * splat(scale));
}

/* o_r = inv_r * sum_j p[r][j] v_j over nd vectors of the head dimension */
static inline __attribute__((always_inline)) void pv_tile(
        const float *p, int64_t Lv, const float *v, int64_t rs, int64_t L, const float *inv,
        float *o, int64_t os, int nr, int nd) {
    vf acc[R][2];
    for (int r = 0; r < nr; r++)
        for (int c = 0; c < nd; c++) acc[r][c] = splat(0.f);
    for (int64_t j = 0; j < L; j++) {
        vf vv[2];
        for (int c = 0; c < nd; c++) vv[c] = load(v + j * rs + c * W);
        for (int r = 0; r < nr; r++) {
            const vf pr = splat(p[r * Lv + j]);
            for (int c = 0; c < nd; c++) acc[r][c] += pr * vv[c];
        }
    }
    for (int r = 0; r < nr; r++)
        for (int c = 0; c < nd; c++) store(o + r * os + c * W, acc[r][c] * splat(inv[r]));
}

/* One (sequence, head): rows of q, k, v at stride rs, output rows at stride os. */
static void attend(const float *qb, const float *kb, const float *vb, int64_t rs, int64_t L,
                   int64_t hs, float scale, float *ob, int64_t os, float *kt, float *s) {
    const int64_t nv = (L + W - 1) / W, Lv = nv * W;
    for (int64_t d = 0; d < hs; d++) store(kt + d * Lv + (nv - 1) * W, splat(0.f));
    for (int64_t j = 0; j < L; j++)
        for (int64_t d = 0; d < hs; d++) kt[d * Lv + j] = kb[j * rs + d];
    for (int64_t i0 = 0; i0 < L; i0 += R) {
        const int nr = L - i0 < R ? (int)(L - i0) : R;
        const float *q0 = qb + i0 * rs;
        for (int64_t c0 = 0; c0 < nv; c0 += KC) {
            const int nc = nv - c0 < KC ? (int)(nv - c0) : KC;
            const float *k0 = kt + c0 * W;
            float *s0 = s + c0 * W;
            if (nr == R && nc == KC) qk_tile(q0, rs, k0, Lv, hs, scale, s0, R, KC);
            else if (nr == R && nc == 1) qk_tile(q0, rs, k0, Lv, hs, scale, s0, R, 1);
#if KC > 2
            else if (nr == R && nc == 2) qk_tile(q0, rs, k0, Lv, hs, scale, s0, R, 2);
#endif
#if KC > 3
            else if (nr == R && nc == 3) qk_tile(q0, rs, k0, Lv, hs, scale, s0, R, 3);
#endif
            else qk_tile(q0, rs, k0, Lv, hs, scale, s0, nr, nc);
        }
        /* softmax over the L real keys of each row; lanes past L get weight 0 */
        float inv[R];
        for (int r = 0; r < nr; r++) inv[r] = softmax_exp(s + r * Lv, L);
        for (int64_t d0 = 0; d0 < hs; d0 += 2 * W) {
            const int nd = hs - d0 >= 2 * W ? 2 : 1;
            float *o0 = ob + i0 * os + d0;
            if (nr == R && nd == 2) pv_tile(s, Lv, vb + d0, rs, L, inv, o0, os, R, 2);
            else pv_tile(s, Lv, vb + d0, rs, L, inv, o0, os, nr, nd);
        }
    }
}

/* qkv: (N, 3, nh, hs) contiguous; cu: (B+1,) offsets; out: (N, nh, hs). hs % W == 0.
 * Sequences longer than max_len are skipped (the caller runs them through SDPA, which
 * is faster there); max_len also sizes the per-thread buffers. */
int mmq_varlen_attn(const float *qkv, const int64_t *cu, int64_t B, int64_t nh, int64_t hs,
                    int64_t max_len, float scale, float *out, int nthreads) {
    if (hs % W) return 1;
    const int64_t rs = 3 * nh * hs, os = nh * hs;
    const int64_t Lv = (max_len + W - 1) / W * W;
    int failed = 0;
    #pragma omp parallel num_threads(nthreads)
    {
        float *kt = aligned_alloc(64, sizeof(float) * hs * Lv);
        float *s = aligned_alloc(64, sizeof(float) * R * Lv);
        if (!kt || !s) {
            #pragma omp atomic write
            failed = 2;
        }
        #pragma omp for schedule(dynamic, 4)
        for (int64_t t = 0; t < B * nh; t++) {
            const int64_t b = t / nh, h = t % nh, start = cu[b], L = cu[b + 1] - start;
            if (L < 1 || L > max_len || !kt || !s) continue;
            const float *q = qkv + start * rs + h * hs;
            attend(q, q + nh * hs, q + 2 * nh * hs, rs, L, hs, scale, out + start * os + h * hs,
                   os, kt, s);
        }
        free(kt);
        free(s);
    }
    return failed;
}

