/* Lane select, square root, exp and reciprocal on one vector type (a template: included once
   per type). Before including, define
     VT        the vector type (VT_LANES floats), VTI the int32 vector of the same size,
     VT_LANES  its number of floats,
     VFN(name) the functions' names for this type (e.g. name, or name##_g). */
static inline VT VFN(blend)(VTI mask, VT yes, VT no) {
  VTI bits = ((VTI)yes & mask) | ((VTI)no & ~mask);
  return (VT)bits;
}

static inline VT VFN(vsqrt)(VT x) {
  VT y;
  for (int b = 0; b < VT_LANES; ++b) y[b] = __builtin_sqrtf(x[b]);
  return y;
}

/* exp for the activations and the proximity: arguments clamped to [-87, 88] (both saturate
   there), Cody-Waite reduction, a degree-6 polynomial; about 2 ulp; NaN propagates. */
static inline VT VFN(vexp)(VT x) {
  const VT zero = {0};
  const VT magic = zero + 12582912.0f; /* 1.5 * 2^23: adding it rounds to an integer */
  VT clamped = VFN(blend)(x > 88.0f, zero + 88.0f, VFN(blend)(x < -87.0f, zero - 87.0f, x));
  VT shifted = clamped * 1.44269504088896341f + magic;
  VT n = shifted - magic;
  VT r = clamped - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  VT p = zero + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  VTI exponent = ((VTI)shifted - (VTI)magic + 127) << 23;
  return p * (VT)exponent;
}

/* 1 / d. With AVX-512 a 14-bit estimate and one Newton step (relative error about 2^-27, NaN
   propagates) is several times cheaper than a division, which otherwise bounds the
   activations' throughput; elsewhere a division. */
static inline VT VFN(reciprocal)(VT d) {
#if VT_LANES == 4 && defined(__AVX512VL__)
  VT r = (VT)_mm_rcp14_ps((__m128)d);
  return r * (2.0f - d * r);
#elif VT_LANES == 8 && defined(__AVX512VL__)
  VT r = (VT)_mm256_rcp14_ps((__m256)d);
  return r * (2.0f - d * r);
#elif VT_LANES == 16 && defined(__AVX512F__)
  VT r = (VT)_mm512_rcp14_ps((__m512)d);
  return r * (2.0f - d * r);
#else
  return 1.0f / d;
#endif
}
