/* Row-wise kernels over bf16 activations on the CPU, inference only: the speech
 * encoder's bf16 window path (core/model/whisper/model.py, core/model/attention.py).
 * Loaded by core/model/cpu_kernels.py from the same library as varlen_attn.c. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "vec.h"

/* ---- softmax over bf16 rows, in place (the window attention) ----
 *
 * The explicit bf16 window attention (core/model/attention.py) softmaxes each head's
 * (1500, 1500) bf16 scores in place between two oneDNN matmuls. ATen's bf16 softmax
 * makes three passes over each row, converting every element each time; it was a sixth
 * of a bf16 encoder's time (0.23 s of 1.33 s for 16 windows on a Zen 5). Here a row is
 * widened once into a per-thread fp32 buffer that stays in L1 (6 KB for 1,500 keys),
 * its max, exponentials and sum are taken there (softmax_exp, vec.h), and it is
 * rounded back to bf16
 * (round to nearest even, as torch rounds). Only finite scores are expected (no masks
 * here): the exponent's argument is <= 0. */
static void softmax_row(uint16_t *row, int64_t n, float *buf) {
    const int64_t nf = n / W;  /* full vectors */
    vf m = splat(-INFINITY);
    for (int64_t c = 0; c < nf; c++) {  /* widened once; the max on the way */
        const vf x = bf16_load(row + c * W);
        store(buf + c * W, x);
        m = vmax(m, x);
    }
    float mx = vmax_lanes(m);
    for (int64_t j = nf * W; j < n; j++) {
        buf[j] = bf16_to_float(row[j]);
        mx = buf[j] > mx ? buf[j] : mx;
    }
    const vf inv = splat(softmax_exp_from(buf, n, mx));
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

/* ---- residual add and layer norm, bf16 out (the encoder's pre-LN layers) ----
 *
 * Between a layer's matmuls, the fp32 residual stream x takes the bf16 output of the
 * last matmul (x += y) and the next layer norm's output goes to the next matmul as
 * bf16. In ATen that is an add that widens y, a layer norm writing fp32 and a cast to
 * bf16: three passes over 9-18 MB. Here one pass per row (C = 384 floats stays in L1):
 * add, mean, variance (of the centred values), then (x * rstd - mean * rstd) * w + b
 * rounded to bf16, as ATen's float layer norm computes it. */
static void add_ln_row(float *x, const uint16_t *y, const float *w, const float *b,
                       float eps, int64_t C, uint16_t *h) {
    vf sum = splat(0.f);
    for (int64_t c = 0; c < C; c += W) {
        vf v = load(x + c);
        if (y) {
            v += bf16_load(y + c);
            store(x + c, v);
        }
        sum += v;
    }
    const float mean = hsum(sum) / (float)C;
    vf sq = splat(0.f);
    for (int64_t c = 0; c < C; c += W) {
        const vf d = load(x + c) - splat(mean);
        sq += d * d;
    }
    const float rstd = 1.f / sqrtf(hsum(sq) / (float)C + eps);
    const vf a = splat(rstd), o = splat(-mean * rstd);
    for (int64_t c = 0; c < C; c += W)
        bf16_store(h + c, (load(x + c) * a + o) * load(w + c) + load(b + c));
}

/* x: (N, C) fp32, updated in place when y (N, C) bf16 is given; w, b: (C,) fp32;
 * h: (N, C) bf16 out. C % W == 0. */
int mmq_add_ln_bf16(float *x, const uint16_t *y, const float *w, const float *b, float eps,
                    int64_t N, int64_t C, uint16_t *h, int nthreads) {
    if (C % W) return 1;
    #pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t r = 0; r < N; r++)
        add_ln_row(x + r * C, y ? y + r * C : NULL, w, b, eps, C, h + r * C);
    return 0;
}
