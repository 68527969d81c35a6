/* What the AVX-512 BF16 kernels (attn_bf16.c, logits_bf16.c) share: their target
 * attribute, the tail mask of a partial vector and a fast exponential. Their functions
 * are compiled for AVX-512 BF16 by attribute; core/model/cpu_kernels.py calls them only
 * on a CPU that has avx512_bf16. */
#ifndef MMQ_BF16_H
#define MMQ_BF16_H
#include <immintrin.h>
#include <stdint.h>

#define BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))
#define INL __attribute__((always_inline)) inline

static INL __mmask16 tail_mask(int64_t rem) {
    return rem >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << rem) - 1u);
}

/* exp(x) for x <= 0 as 2^(x log2 e): the fraction's power of two by a degree-5 polynomial
 * on [-1/2, 1/2] (relative error ~2e-7, as vexp's), the integer part by VSCALEFPS, which
 * also takes a very negative x to 0: about half of vexp's instructions. x must not be
 * -inf or NaN (exp_clamped takes those). */
BF16 static INL __m512 exp_le0(__m512 x) {
    const __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f));
    const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 f = _mm512_sub_ps(t, n);
    __m512 y = _mm512_set1_ps(1.3264711015e-3f);  /* fitted to the relative error */
    y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(9.6715120599e-3f));
    y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(5.5507339537e-2f));
    y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(2.4022242427e-1f));
    y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(6.9314700365e-1f));
    y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(y, n);
}

/* exp_le0 of x >= -104 (below, 0: exp(-104) is under fp32's smallest value); -inf and
 * NaN (-inf minus -inf) count as below: VMAXPS returns its second operand for a NaN. */
BF16 static INL __m512 exp_clamped(__m512 x) {
    return exp_le0(_mm512_max_ps(x, _mm512_set1_ps(-104.f)));
}
#endif
