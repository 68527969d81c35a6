/* The speech decoder's output projection for a beam step, in bf16, keeping only what the
 * search needs of each row's logits (core/model/whisper/decode.py).
 *
 * Why: a beam step of 16 windows' five beams multiplies 80 rows by the (51,864, 384)
 * tied embedding: 3.2 GFLOP, 16 ms a step in fp32 on 2 Zen 4 cores, a third of the
 * search; then ATen's log-softmax and top-k over the 4 M logits take ~5 ms more. Here
 * the product runs on VDPBF16PS (bf16 pairs in, fp32 sums) and, per row, only its T
 * largest logits (their values and token ids), the largest of all and the sum of
 * exp(logit - largest) over the whole vocabulary come out. The caller recomputes those
 * T logits in fp32 and corrects the sum with them (TextDecoder.step_top), so the
 * candidates a search picks from carry fp32 log-probabilities; bf16 only decides which T
 * tokens are candidates and the rest of the normaliser.
 *
 * Layout: the weight packed once as (V16, K/2, 16, 2) bf16: 16 vocabulary entries'
 * pairs of one input dimension pair are one 64-byte load, and a block of 16 entries
 * (12 KB at K = 384) stays in L1 while every row block passes over it. Threads split
 * the vocabulary blocks; each keeps its own per-row state, merged at the end.
 */
#include <math.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"

#define RB 12   /* rows per block: 12 accumulators */
#define TMAX 32 /* the most candidates per row */

typedef struct {
    float m[16], s[16];           /* per lane: the largest logit, sum of exp(logit - m) */
    float val[TMAX];              /* the largest logits so far, descending */
    int64_t idx[TMAX];
    int n;                        /* how many val holds (<= T) */
} row_state;

static void row_init(row_state *st) {
    for (int l = 0; l < 16; l++) {
        st->m[l] = -INFINITY;
        st->s[l] = 0.f;
    }
    st->n = 0;
}

/* Insert (v, id) into the descending list of at most T entries. */
static void row_insert(row_state *st, int T, float v, int64_t id) {
    int p = st->n < T ? st->n++ : T - 1;
    while (p > 0 && st->val[p - 1] < v) {
        st->val[p] = st->val[p - 1];
        st->idx[p] = st->idx[p - 1];
        p--;
    }
    st->val[p] = v;
    st->idx[p] = id;
}

/* One block of 16 entries' logits x for one row (lanes past V: -inf): its state. */
BF16 static INL void row_update(row_state *st, int T, __m512 x, int64_t j0) {
    __m512 m = _mm512_loadu_ps(st->m), s = _mm512_loadu_ps(st->s);
    if (_mm512_cmp_ps_mask(x, m, _CMP_GT_OQ)) {  /* a lane's largest grew: rescale its sum */
        const __m512 up = _mm512_max_ps(m, x);
        s = _mm512_mul_ps(s, exp_clamped(_mm512_sub_ps(m, up)));
        m = up;
    }
    s = _mm512_add_ps(s, exp_clamped(_mm512_sub_ps(x, m)));
    _mm512_storeu_ps(st->m, m);
    _mm512_storeu_ps(st->s, s);
    float thr = st->n < T ? -INFINITY : st->val[T - 1];
    __mmask16 hit = _mm512_cmp_ps_mask(x, _mm512_set1_ps(thr), _CMP_GT_OQ);
    while (hit) {  /* rare once the list is full */
        const int l = __builtin_ctz(hit);
        float lane[16];
        _mm512_storeu_ps(lane, x);
        row_insert(st, T, lane[l], j0 + l);
        thr = st->n < T ? -INFINITY : st->val[T - 1];
        hit &= (__mmask16)(hit - 1);
        hit &= _mm512_cmp_ps_mask(x, _mm512_set1_ps(thr), _CMP_GT_OQ);
    }
}

/* nr rows (their K/2 pairs as words, hw) against vocabulary block vb. */
BF16 static INL void block(const uint32_t *hw, int64_t K2, const uint32_t *w, const float *bias,
                           int64_t V, int64_t vb, row_state *st, int T, int nr) {
    __m512 acc[RB];
    for (int r = 0; r < nr; r++) acc[r] = _mm512_setzero_ps();
    for (int64_t d = 0; d < K2; d++) {
        const __m512bh wv = (__m512bh)_mm512_loadu_si512(w + d * 16);
        for (int r = 0; r < nr; r++)
            acc[r] = _mm512_dpbf16_ps(acc[r], (__m512bh)_mm512_set1_epi32((int)hw[r * K2 + d]),
                                      wv);
    }
    const int64_t j0 = vb * 16;
    const __mmask16 real = tail_mask(V - j0);
    __m512 b = _mm512_setzero_ps();
    if (bias) b = _mm512_maskz_loadu_ps(real, bias + j0);
    const __m512 ninf = _mm512_set1_ps(-INFINITY);
    for (int r = 0; r < nr; r++)
        row_update(st + r, T, _mm512_mask_add_ps(ninf, real, acc[r], b), j0);
}

/* Vocabulary blocks [vb0, vb1) for all R rows, into st (R,). */
BF16 static void blocks(const uint32_t *hw, int64_t K2, const uint32_t *wp, const float *bias,
                        int64_t R, int64_t V, int64_t vb0, int64_t vb1, row_state *st, int T) {
    for (int64_t vb = vb0; vb < vb1; vb++) {
        const uint32_t *w = wp + vb * K2 * 16;
        int64_t r0 = 0;
        for (; r0 + RB <= R; r0 += RB) block(hw + r0 * K2, K2, w, bias, V, vb, st + r0, T, RB);
        switch (R - r0) {  /* constant row counts: the accumulators stay in registers */
            case 0: break;
            case 8: block(hw + r0 * K2, K2, w, bias, V, vb, st + r0, T, 8); break;
            case 5: block(hw + r0 * K2, K2, w, bias, V, vb, st + r0, T, 5); break;
            case 4: block(hw + r0 * K2, K2, w, bias, V, vb, st + r0, T, 4); break;
            case 1: block(hw + r0 * K2, K2, w, bias, V, vb, st + r0, T, 1); break;
            default: block(hw + r0 * K2, K2, w, bias, V, vb, st + r0, T, (int)(R - r0));
        }
    }
}

/* h: (R, K) bf16; wp: (ceil(V/16), K/2, 16, 2) bf16, entries past V zero; bias: (V,)
 * fp32 or NULL. Out: val, idx (R, T): each row's T largest logits (+ bias) descending
 * and their ids; mx (R,): its largest; sum (R,): sum over the vocabulary of
 * exp(logit - mx). K even, T <= 32, T <= V. */
int mmq_logits_top_bf16(const uint16_t *h, const uint16_t *wp, const float *bias, int64_t R,
                        int64_t V, int64_t K, int T, float *val, int64_t *idx, float *mx,
                        float *sum, int nthreads) {
    if (K % 2 || T < 1 || T > TMAX || T > V) return 1;
    const int64_t K2 = K / 2, V16 = (V + 15) / 16;
    if (nthreads < 1) nthreads = 1;
    row_state *all = malloc(sizeof(row_state) * R * nthreads);
    if (!all) return 2;
    for (int64_t i = 0; i < R * nthreads; i++) row_init(all + i);  /* a missing thread's: empty */
    const uint32_t *hw = (const uint32_t *)h;
    #pragma omp parallel num_threads(nthreads)
    {
        int t = 0, n = 1;
#ifdef _OPENMP
        t = omp_get_thread_num();
        n = omp_get_num_threads();
#endif
        blocks(hw, K2, (const uint32_t *)wp, bias, R, V, V16 * t / n, V16 * (t + 1) / n,
               all + t * R, T);
    }
    for (int64_t r = 0; r < R; r++) {  /* merge the threads' states */
        float m = -INFINITY, s = 0.f;
        for (int i = 0; i < nthreads; i++)
            for (int l = 0; l < 16; l++) m = fmaxf(m, all[i * R + r].m[l]);
        row_state *out = all + r;  /* thread 0's state takes the others' lists */
        for (int i = 0; i < nthreads; i++) {
            const row_state *o = all + i * R + r;
            for (int l = 0; l < 16; l++)
                if (o->s[l] > 0.f) s += o->s[l] * expf(o->m[l] - m);
            if (i > 0)
                for (int k = 0; k < o->n; k++)
                    if (out->n < T || o->val[k] > out->val[T - 1])
                        row_insert(out, T, o->val[k], o->idx[k]);
        }
        mx[r] = m;
        sum[r] = s;
        for (int k = 0; k < T; k++) {
            val[r * T + k] = k < out->n ? out->val[k] : -INFINITY;
            idx[r * T + k] = k < out->n ? out->idx[k] : 0;
        }
    }
    free(all);
    return 0;
}
