/* The activation and its derivative on one vector type (a template like vcnn_vector_ops.h,
   whose functions for the type it uses): activation(x), and act_slope(z, &slope), the
   activation with its derivative. The activation is chosen by one of
   VCNN_ACTIVATION_SILU, _TANH, _RELU (vector forms), _GELU, _SOFTPLUS (lane by lane, libm). */
#if defined(VCNN_ACTIVATION_SILU)
static inline VT VFN(activation)(VT x) { return x * VFN(reciprocal)(1.0f + VFN(vexp)(-x)); }
static inline VT VFN(act_slope)(VT z, VT* slope) {
  const VT sigma = VFN(reciprocal)(1.0f + VFN(vexp)(-z));
  *slope = sigma * (1.0f + z * (1.0f - sigma));
  return z * sigma;
}
#elif defined(VCNN_ACTIVATION_TANH)
static inline VT VFN(activation)(VT x) {
  return 1.0f - 2.0f * VFN(reciprocal)(VFN(vexp)(2.0f * x) + 1.0f);
}
static inline VT VFN(act_slope)(VT z, VT* slope) {
  const VT t = 1.0f - 2.0f * VFN(reciprocal)(VFN(vexp)(2.0f * z) + 1.0f);
  *slope = 1.0f - t * t;
  return t;
}
#elif defined(VCNN_ACTIVATION_RELU)
static inline VT VFN(activation)(VT x) {
  const VT zero = {0};
  return VFN(blend)(x > 0.0f, x, zero);
}
static inline VT VFN(act_slope)(VT z, VT* slope) {
  const VT zero = {0};
  *slope = VFN(blend)(z > 0.0f, zero + 1.0f, zero);
  return VFN(blend)(z > 0.0f, z, zero);
}
#elif defined(VCNN_ACTIVATION_GELU)
static inline VT VFN(activation)(VT x) {
  VT y = x;
  for (int b = 0; b < VT_LANES; ++b) y[b] = 0.5f * x[b] * (1.0f + erff(x[b] * 0.70710678118654752f));
  return y;
}
static inline VT VFN(act_slope)(VT z, VT* slope) {
  VT y = z, s = z;
  for (int b = 0; b < VT_LANES; ++b) {
    const float v = z[b], phi = 0.5f * (1.0f + erff(v * 0.70710678118654752f));
    y[b] = v * phi;
    s[b] = phi + v * expf(-0.5f * v * v) * 0.39894228040143268f;
  }
  *slope = s;
  return y;
}
#elif defined(VCNN_ACTIVATION_SOFTPLUS)
/* torch's softplus: beta 1, threshold 20 */
static inline VT VFN(activation)(VT x) {
  VT y = x;
  for (int b = 0; b < VT_LANES; ++b) y[b] = x[b] > 20.0f ? x[b] : log1pf(expf(x[b]));
  return y;
}
static inline VT VFN(act_slope)(VT z, VT* slope) {
  VT y = z, s = z;
  for (int b = 0; b < VT_LANES; ++b) {
    const float v = z[b];
    y[b] = v > 20.0f ? v : log1pf(expf(v));
    s[b] = v > 20.0f ? 1.0f : 1.0f / (1.0f + expf(-v));
  }
  *slope = s;
  return y;
}
#else
#error "no VCNN_ACTIVATION_<NAME> defined"
#endif
