/* Vector helpers shared by the CPU kernels in this folder (GCC vector extensions: one
 * source compiles for AVX-512, AVX2 or NEON; setup.py picks MMQ_VW and MMQ_KC per
 * build, see varlen_attn.c). */
#ifndef MMQ_VEC_H
#define MMQ_VEC_H
#include <math.h>
#include <stdint.h>
#include <string.h>

#ifndef MMQ_VW
#define MMQ_VW 16
#endif
#define W MMQ_VW  /* floats per vector */
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

/* bf16 is the top half of an fp32: widening is a shift, narrowing rounds to nearest
 * even (as torch rounds). Only finite values are expected. */
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

static inline float hsum(vf v) {
    float t = 0.f;
    for (int i = 0; i < W; i++) t += v[i];
    return t;
}

static inline vf vmax(vf a, vf b) {
    const vi gt = a > b;
    return (vf)(((vi)a & gt) | ((vi)b & ~gt));
}

static inline float vmax_lanes(vf m) {
    float mx = -INFINITY;
    for (int i = 0; i < W; i++) mx = m[i] > mx ? m[i] : mx;
    return mx;
}

/* The lanes of the partial vector after n / W full ones that are still among n. */
static inline vi real_lanes(int64_t n) {
    vi lane;
    for (int i = 0; i < W; i++) lane[i] = i;
    return lane < (int32_t)(n % W);
}

/* The softmax's exponentials of every kernel here: s[j] = exp(s[j] - mx) for j < n, in
 * place, mx being the max of s[0..n); returns 1 / their sum. s holds n rounded up to
 * whole vectors; the lanes past n are read (whatever they hold) and set to 0. */
static inline float softmax_exp_from(float *s, int64_t n, float mx) {
    const int64_t nf = n / W;
    vf sum = splat(0.f);
    for (int64_t c = 0; c < nf; c++) {
        const vf p = vexp(load(s + c * W) - splat(mx));
        store(s + c * W, p);
        sum += p;
    }
    if (n % W) {
        const vf p = (vf)((vi)vexp(load(s + nf * W) - splat(mx)) & real_lanes(n));
        store(s + nf * W, p);
        sum += p;
    }
    return 1.f / hsum(sum);
}

/* The same, taking the max first. */
static inline float softmax_exp(float *s, int64_t n) {
    const int64_t nf = n / W;
    const vf ninf = splat(-INFINITY);
    vf m = ninf;
    for (int64_t c = 0; c < nf; c++) m = vmax(m, load(s + c * W));
    if (n % W) {
        const vi real = real_lanes(n);
        m = vmax(m, (vf)(((vi)load(s + nf * W) & real) | ((vi)ninf & ~real)));
    }
    return softmax_exp_from(s, n, vmax_lanes(m));
}
#endif
