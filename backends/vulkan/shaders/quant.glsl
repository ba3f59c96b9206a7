/* The exact arithmetic of quantization (docs/compression.md), bit-compatible
   with backends/cpu/cpu-quant.c: zero = min, scale = (max - min) / qmax
   correctly rounded then rounded UP to f16, q = clamp(rint((x - zero) / scale)).
   Division on Vulkan is only 2.5 ulp, so the quotient is corrected with exact
   residuals. Vulkan's fma() may be an unfused multiply-add, so the residual
   a - q*b uses Dekker's exact product instead; `precise` keeps the compiler
   from contracting or reassociating it. */

/* a - q*b rounded once, for q > 0 within a few ulp of a/b (so that a - q*b's
   high part cancels exactly, by Sterbenz's lemma). */
float residual(float a, float q, float b)
{
    precise const float p = q * b;
    precise const float cq = 4097.0 * q;
    precise const float qh = cq - (cq - q);
    precise const float ql = q - qh;
    precise const float cb = 4097.0 * b;
    precise const float bh = cb - (cb - b);
    precise const float bl = b - bh;
    precise const float e = ((qh * bh - p) + qh * bl + ql * bh) + ql * bl; /* p + e == q*b exactly */
    precise const float r = (a - p) - e;
    return r;
}

/* a / b correctly rounded to nearest even, for a >= 0, b > 0. */
float div_rn(float a, float b)
{
    float q = a / b;
    if (isinf(q) || isnan(q) || q == 0.0) return q;
    for (int it = 0; it < 4; it++) {
        const float up = uintBitsToFloat(floatBitsToUint(q) + 1u), dn = uintBitsToFloat(floatBitsToUint(q) - 1u);
        const float r = abs(residual(a, q, b)), ru = abs(residual(a, up, b)), rd = abs(residual(a, dn, b));
        float best = q, rb = r;
        if (ru < rb || (ru == rb && (floatBitsToUint(up) & 1u) == 0u && (floatBitsToUint(best) & 1u) != 0u)) {
            best = up;
            rb = ru;
        }
        if (rd < rb || (rd == rb && (floatBitsToUint(dn) & 1u) == 0u && (floatBitsToUint(best) & 1u) != 0u)) {
            best = dn;
            rb = rd;
        }
        if (best == q) break;
        q = best;
    }
    return q;
}

uint quantize_value(float x, float scale, float zero, int qmax)
{
    if (scale == 0.0) return 0u;
    precise const float diff = x - zero;
    float q = roundEven(div_rn(diff, scale));
    q = q < 0.0 ? 0.0 : q > float(qmax) ? float(qmax) : q;
    return uint(q);
}

/* The f16 bits of zero = lo and of scale = the f16 at or above (hi - lo) / qmax. */
uvec2 group_params_bits(float lo, float hi, int qmax)
{
    const uint zero = f32_to_f16_bits(floatBitsToUint(lo));
    uint scale = 0u;
    if (hi > lo) {
        precise const float span = hi - lo;
        const float x = div_rn(span, float(qmax));
        scale = f32_to_f16_bits(floatBitsToUint(x));
        if (f16_bits_to_f32(scale) < x) scale += 1u;
    }
    return uvec2(scale, zero);
}
