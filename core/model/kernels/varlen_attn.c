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

#ifndef MMQ_VW
#define MMQ_VW 16
#endif
#ifndef MMQ_KC
#define MMQ_KC 4
#endif
#define W MMQ_VW  /* floats per vector */
#define KC MMQ_KC /* key vectors per score tile */
#define R 4       /* query rows per register block */
typedef float vf __attribute__((vector_size(4 * W)));
typedef int32_t vi __attribute__((vector_size(4 * W)));

static inline vf splat(float x) { return (vf){0} + x; }
static inline vf load(const float *p) { vf v; memcpy(&v, p, sizeof v); return v; }
static inline void store(float *p, vf v) { memcpy(p, &v, sizeof v); }

/* exp(x) for x <= 0: Cephes' polynomial, relative error about 1e-7. Rounding by adding
 * 1.5 * 2^23 needs IEEE arithmetic: this file must not be built with -ffast-math. */
static inline vf vexp(vf x) {
    const vf lo = splat(-87.0f), magic = splat(12582912.0f);
    const vi keep = x > lo;
    x = (vf)(((vi)x & keep) | ((vi)lo & ~keep));
    const vf t = x * splat(1.44269504088896341f) + magic;
    const vf n = t - magic;
    const vi e = (vi)t - (vi)magic;
    x = x - n * splat(0.693359375f) - n * splat(-2.12194440e-4f);
    vf y = splat(1.9875691500e-4f);
    y = y * x + splat(1.3981999507e-3f);
    y = y * x + splat(8.3334519073e-3f);
    y = y * x + splat(4.1665795894e-2f);
    y = y * x + splat(1.6666665459e-1f);
    y = y * x + splat(5.0000001201e-1f);
    y = y * x * x + x + splat(1.0f);
    return y * (vf)((e + 127) << 23);
}

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
    vi lane;
    for (int i = 0; i < W; i++) lane[i] = i;
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
        for (int r = 0; r < nr; r++) {
            float *sr = s + r * Lv;
            float m = -INFINITY;
            for (int64_t j = 0; j < L; j++) m = sr[j] > m ? sr[j] : m;
            vf sum = splat(0.f);
            for (int64_t c = 0; c < nv; c++) {
                vf p = vexp(load(sr + c * W) - splat(m));
                p = (vf)((vi)p & (lane + (int32_t)(c * W) < (int32_t)L));
                store(sr + c * W, p);
                sum += p;
            }
            float t = 0.f;
            for (int i = 0; i < W; i++) t += sum[i];
            inv[r] = 1.f / t;
        }
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

/* ---- softmax over bf16 rows, in place (the speech encoder's window attention) ----
 *
 * The explicit bf16 window attention (core/model/attention.py) softmaxes each head's
 * (1500, 1500) bf16 scores in place between two oneDNN matmuls. ATen's bf16 softmax
 * makes three passes over each row, converting every element each time; it was a sixth
 * of a bf16 encoder's time (0.23 s of 1.33 s for 16 windows on a Zen 5). Here a row is
 * widened once into a per-thread fp32 buffer that stays in L1 (6 KB for 1,500 keys),
 * its max, exponentials and sum are taken there, and it is rounded back to bf16
 * (round to nearest even, as torch rounds). Only finite scores are expected (no masks
 * here): the exponent's argument is <= 0. */
typedef uint16_t vh __attribute__((vector_size(2 * W)));
typedef uint32_t vu __attribute__((vector_size(4 * W)));

static inline vf bf16_load(const uint16_t *p) {
    vh h;
    memcpy(&h, p, sizeof h);
    return (vf)(__builtin_convertvector(h, vu) << 16);
}

static inline uint32_t bf16_round(uint32_t b) { return (b + 0x7FFFu + ((b >> 16) & 1u)) >> 16; }

static inline void bf16_store(uint16_t *p, vf x) {
    vu b = (vu)x;
    b = (b + 0x7FFFu + ((b >> 16) & 1u)) >> 16;
    const vh h = __builtin_convertvector(b, vh);
    memcpy(p, &h, sizeof h);
}

static inline float bf16_to_float(uint16_t h) {
    const uint32_t b = (uint32_t)h << 16;
    float f;
    memcpy(&f, &b, sizeof f);
    return f;
}

static inline uint16_t float_to_bf16(float f) {
    uint32_t b;
    memcpy(&b, &f, sizeof b);
    return (uint16_t)bf16_round(b);
}

static void softmax_row(uint16_t *row, int64_t n, float *buf) {
    const int64_t nf = n / W, nv = (n + W - 1) / W;  /* full vectors, all vectors */
    vf m = splat(-INFINITY);
    for (int64_t c = 0; c < nf; c++) {
        const vf x = bf16_load(row + c * W);
        store(buf + c * W, x);
        const vi gt = x > m;
        m = (vf)(((vi)x & gt) | ((vi)m & ~gt));
    }
    float mx = -INFINITY;
    for (int i = 0; i < W; i++) mx = m[i] > mx ? m[i] : mx;
    for (int64_t j = nf * W; j < nv * W; j++) {  /* the tail; lanes past n hold 0 */
        buf[j] = j < n ? bf16_to_float(row[j]) : 0.f;
        if (j < n && buf[j] > mx) mx = buf[j];
    }
    vi lane;
    for (int i = 0; i < W; i++) lane[i] = i;
    vf sum = splat(0.f);
    for (int64_t c = 0; c < nv; c++) {
        vf p = vexp(load(buf + c * W) - splat(mx));
        if (c == nf) p = (vf)((vi)p & (lane + (int32_t)(c * W) < (int32_t)n));
        store(buf + c * W, p);
        sum += p;
    }
    float t = 0.f;
    for (int i = 0; i < W; i++) t += sum[i];
    const vf inv = splat(1.f / t);
    for (int64_t c = 0; c < nf; c++) bf16_store(row + c * W, load(buf + c * W) * inv);
    for (int64_t j = nf * W; j < n; j++) row[j] = float_to_bf16(buf[j] * inv[0]);
}

/* x: (rows, cols) contiguous bf16, softmaxed along each row in place. */
int mmq_softmax_bf16(uint16_t *x, int64_t rows, int64_t cols, int nthreads) {
    if (cols < 1) return 0;
    const int64_t Lv = (cols + W - 1) / W * W;
    int failed = 0;
    #pragma omp parallel num_threads(nthreads)
    {
        float *buf = aligned_alloc(64, sizeof(float) * Lv);
        if (!buf) {
            #pragma omp atomic write
            failed = 2;
        }
        #pragma omp for schedule(static)
        for (int64_t r = 0; r < rows; r++)
            if (buf) softmax_row(x + r * cols, cols, buf);
        free(buf);
    }
    return failed;
}
