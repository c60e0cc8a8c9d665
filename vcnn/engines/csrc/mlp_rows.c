/* An MLP on rows (the point embedding of a factorised net, vcnn/fused_mlp.py): the forward
   over tiles of rows, per tile a register-blocked product (outputs in SIMD lanes, P rows at a
   time), then activation, its slope and the residual in registers; the backward's input
   gradients the same way from the stored slopes.

   Needs: LANES (floats per vector along a layer's outputs; it divides every width a load
   reads), P (rows per block), the activation's VCNN_ACTIVATION_<NAME> and VCNN_MLP_LAYERS(X), VCNN_MLP_LAYERS_REVERSED(X) and
   VCNN_MLP_LAST as described in vcnn_pair_mlp.h (the input names there are not used). The
   flat parameters hold, per layer, the weight (row-major) and the bias; `wt` the same with each
   weight transposed (in, out), so that a row of it holds one vector per group of outputs. */
#include "vcnn_common.h"

typedef float vo __attribute__((vector_size(4 * LANES)));
typedef float vou __attribute__((vector_size(4 * LANES), aligned(4)));
typedef int32_t voi __attribute__((vector_size(4 * LANES)));

#define VT vo
#define VTI voi
#define VT_LANES LANES
#define VFN(name) name
#include "vcnn_vector_ops.h"
#include "vcnn_activation.h"
#undef VT
#undef VTI
#undef VT_LANES
#undef VFN

#define VCNN_INLINE static inline __attribute__((always_inline))

/* Layer `index` on rows r..r+p-1 (p <= P): from its input (x, or the previous layer's output)
   to its output and (when slopes is not null) its activation's slope. acc: P x width / LANES
   vectors of the caller's. */
VCNN_INLINE void row_forward(int index, int p, int64_t r, const float* x, float* const* outs,
                             float* const* slopes, int size, int width, const float* bias,
                             const float* wt, int activated, int residual, vo* acc) {
  const vo zero = {0};
  const int vectors = width / LANES;
  const float* in = (index == 0 ? x : outs[index - 1]) + r * size;
  float* out = outs[index] + r * width;
  float* slope = slopes ? slopes[index] + r * width : 0;
  const vou* b = (const vou*)bias;
  for (int k = 0; k < P; ++k)
    for (int v = 0; v < vectors; ++v) acc[k * vectors + v] = b[v];
  _Pragma("GCC unroll 4") for (int i = 0; i < size; ++i) {
    const vou* w = (const vou*)(wt + i * width);
    for (int k = 0; k < P; ++k) {
      const float h = k < p ? in[k * size + i] : 0.0f;
      for (int v = 0; v < vectors; ++v) acc[k * vectors + v] += h * w[v];
    }
  }
  for (int k = 0; k < p; ++k) {
    for (int v = 0; v < vectors; ++v) {
      vo y = acc[k * vectors + v], s = zero + 1.0f;
      if (activated) y = act_slope(y, &s);
      if (residual == 1) y += *(const vou*)(in + k * size + v * LANES);
      if (residual == 2) y += *(const vou*)(in + k * size + (v * LANES) % size);
      *(vou*)(out + k * width + v * LANES) = y;
      if (slope) *(vou*)(slope + k * width + v * LANES) = s;
    }
  }
}

/* Layer `index`'s backward on rows r..r+p-1: the pre-activation gradient dz = dout * slope
   (dout the gradient of its output: grad for the last layer, else d) and, when d_in is not
   null (but for the first layer), the gradient of its input d_in = dz W (+ the residual's
   dout). acc: P x size / LANES vectors (1 when LANES does not divide size: then a scalar
   loop). */
VCNN_INLINE void row_backward(int index, int p, int64_t r, const float* grad,
                              float* const* slopes, float* const* dzs, const float* d,
                              float* d_in, int size, int width, const float* weight,
                              int residual, vo* acc) {
  const vo zero = {0};
  const float* dout = index == VCNN_MLP_LAST ? grad + r * width : d;
  const float* slope = slopes[index] + r * width;
  float* dz = dzs[index] + r * width;
  for (int k = 0; k < p; ++k)
    for (int v = 0; v < width / LANES; ++v)
      *(vou*)(dz + k * width + v * LANES) =
          *(const vou*)(dout + k * width + v * LANES) * *(const vou*)(slope + k * width + v * LANES);
  if (!d_in) return;
  if (size % LANES == 0) {
    const int vectors = size / LANES;
    for (int k = 0; k < P; ++k)
      for (int v = 0; v < vectors; ++v) acc[k * vectors + v] = zero;
    _Pragma("GCC unroll 4") for (int j = 0; j < width; ++j) {
      const vou* w = (const vou*)(weight + j * size);
      for (int k = 0; k < P; ++k) {
        const float g = k < p ? dz[k * width + j] : 0.0f;
        for (int v = 0; v < vectors; ++v) acc[k * vectors + v] += g * w[v];
      }
    }
    for (int k = 0; k < p; ++k)
      for (int v = 0; v < vectors; ++v) *(vou*)(d_in + k * size + v * LANES) = acc[k * vectors + v];
  } else {
    for (int k = 0; k < p; ++k)
      for (int i = 0; i < size; ++i) {
        float sum = 0.0f;
        for (int j = 0; j < width; ++j) sum += dz[k * width + j] * weight[j * size + i];
        d_in[k * size + i] = sum;
      }
  }
  if (residual == 1)
    for (int k = 0; k < p; ++k)
      for (int i = 0; i < size; ++i) d_in[k * size + i] += dout[k * width + i];
  if (residual == 2)
    for (int k = 0; k < p; ++k)
      for (int j = 0; j < width; ++j) d_in[k * size + j % size] += dout[k * width + j];
}

/* Per layer i, forward_i and backward_i: row_forward and row_backward with the layer's sizes
   as constants (separate functions: the compiler decides what to inline). */
#define VCNN_DEFINE_LAYER(i, input, dinput, size, width, w, b, act, res)                        \
  static void forward_##i(int p, int64_t r, const float* x, const float* params,                \
                          const float* wt, float* const* outs, float* const* slopes) {          \
    vo acc[P * ((width) / LANES)];                                                               \
    row_forward(i, p, r, x, outs, slopes, size, width, params + (b), wt + (w), act, res, acc);   \
  }                                                                                              \
  static void backward_##i(int p, int64_t r, const float* params, const float* grad,            \
                           float* const* slopes, float* const* dzs, const float* d,             \
                           float* d_in) {                                                        \
    vo acc[P * ((size) % LANES ? 1 : (size) / LANES)];                                           \
    row_backward(i, p, r, grad, slopes, dzs, d, d_in, size, width, params + (w), res, acc);      \
  }
VCNN_MLP_LAYERS(VCNN_DEFINE_LAYER)
#define VCNN_DECLARE_GRADIENT(i, input, dinput, size, width, w, b, act, res) float d##i[P * (width)];
#define VCNN_ROW_FORWARD(i, input, dinput, size, width, w, b, act, res) \
  forward_##i(p, r, x, params, wt, outs, slopes);
#define VCNN_ROW_BACKWARD(i, input, dinput, size, width, w, b, act, res) \
  backward_##i(p, r, params, grad, slopes, dzs, d##i, dinput);

/* Rows first..last-1 (see VCNN_FOR_EACH_PART). */
static int forward_part(int64_t first, int64_t last, const float* x, const float* params,
                        const float* wt, float* const* outs, float* const* slopes) {
  for (int64_t r = first; r < last; r += P) {
    const int p = last - r < P ? (int)(last - r) : P;
    VCNN_MLP_LAYERS(VCNN_ROW_FORWARD)
  }
  return 0;
}

static int backward_part(int64_t first, int64_t last, const float* params, const float* grad,
                         float* const* slopes, float* const* dzs) {
  VCNN_MLP_LAYERS(VCNN_DECLARE_GRADIENT)
  for (int64_t r = first; r < last; r += P) {
    const int p = last - r < P ? (int)(last - r) : P;
    VCNN_MLP_LAYERS_REVERSED(VCNN_ROW_BACKWARD)
  }
  return 0;
}

/* Forward of rows x (R, inputs): outs[i] (R, width_i) the layers' outputs, slopes[i] their
   activations' slopes (slopes null: not kept). */
int vcnn_rows_forward(int64_t parts, const int64_t* bounds, const float* x, const float* params,
                      const float* wt, float* const* outs, float* const* slopes) {
  int status = 0;
  VCNN_FOR_EACH_PART(p)
  status |= forward_part(bounds[p], bounds[p + 1], x, params, wt, outs, slopes);
  return status;
}

/* Backward from grad (R, width_last): dzs[i] (R, width_i) the gradients of the layers'
   pre-activations, from the stored slopes. */
int vcnn_rows_backward(int64_t parts, const int64_t* bounds, const float* params,
                       const float* grad, float* const* slopes, float* const* dzs) {
  int status = 0;
  VCNN_FOR_EACH_PART(p)
  status |= backward_part(bounds[p], bounds[p + 1], params, grad, slopes, dzs);
  return status;
}
