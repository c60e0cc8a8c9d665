/* The pair kernels' MLP on one vector of entries (one lane per entry).

   Needs VCNN_MLP_LAYERS(X) and VCNN_MLP_LAYERS_REVERSED(X): per layer, in order and in
   reverse, X(index, input, input_gradient, size, width, weights, bias, activated, residual)
   with the layer's input (x or h<index - 1>), the gradient of that input (0 or
   d<index - 1>), input and output widths, offsets of its weight (row-major) and bias in the
   flat parameters, whether it is activated and its residual (0 none, 1 add the input, 2 add
   the input twice over); and VCNN_MLP_LAST, the last layer's index.

   The sizes are constants at every call (always inlined), so every loop has a fixed trip
   count and the weights are scalars broadcast into multiply-adds whose independent chains
   overlap; activations run GROUP units at a time. */
#define VCNN_INLINE static inline __attribute__((always_inline))

/* One layer's forward: out = activation(weight in + bias) (+ residual), with slope (when not
   null) the activation's derivative (1 where not activated). */
VCNN_INLINE void pair_layer_forward(const vf* in, int size, int width, const float* weight,
                                    const float* bias, int activated, int residual, vf* out,
                                    vf* slope) {
  const vf zero = {0};
  _Pragma("GCC unroll 64") for (int j = 0; j < width; ++j) {
    vf sum = zero + bias[j];
    _Pragma("GCC unroll 64") for (int i = 0; i < size; ++i) sum += weight[j * size + i] * in[i];
    out[j] = sum;
    if (slope) slope[j] = zero + 1.0f;
  }
  if (activated) {
    int j = 0;
    for (; j + GROUP <= width; j += GROUP) {
      vg t, u;
      memcpy(&t, &out[j], sizeof t);
      if (slope) {
        t = act_slope_g(t, &u);
        memcpy(&slope[j], &u, sizeof u);
      } else {
        t = activation_g(t);
      }
      memcpy(&out[j], &t, sizeof t);
    }
    for (; j < width; ++j) out[j] = slope ? act_slope(out[j], &slope[j]) : activation(out[j]);
  }
  if (residual == 1)
    for (int j = 0; j < width; ++j) out[j] += in[j];
  else if (residual == 2)
    for (int j = 0; j < width; ++j) out[j] += in[j % size];
}

/* One layer's backward from d (gradient of its output) and slope: adds the gradients of its
   weight and bias to grads and, when d_in is not null, writes the gradient of its input. */
VCNN_INLINE void pair_layer_backward(const vf* in, int size, int width, int weights, int bias,
                                     int residual, const float* params, const vf* d,
                                     const vf* slope, vf* grads, vf* d_in) {
  const vf zero = {0};
  for (int j = 0; j < width; ++j) {
    const vf dz = d[j] * slope[j];
    grads[bias + j] += dz;
    _Pragma("GCC unroll 64") for (int i = 0; i < size; ++i) grads[weights + j * size + i] += dz * in[i];
  }
  if (!d_in) return;
  for (int i = 0; i < size; ++i) {
    vf sum = zero;
    _Pragma("GCC unroll 64") for (int j = 0; j < width; ++j)
      sum += params[weights + j * size + i] * (d[j] * slope[j]);
    d_in[i] = sum;
  }
  if (residual == 1)
    for (int j = 0; j < width; ++j) d_in[j] += d[j];
  else if (residual == 2)
    for (int j = 0; j < width; ++j) d_in[j % size] += d[j];
}

#define VCNN_CAT_(a, b) a##b
#define VCNN_CAT(a, b) VCNN_CAT_(a, b)

/* The pair kernels (the last layer's outputs) of the inputs x. */
#define VCNN_DECLARE_OUTPUT(i, input, dinput, size, width, w, b, act, res) vf h##i[width];
#define VCNN_FORWARD(i, input, dinput, size, width, w, b, act, res) \
  pair_layer_forward(input, size, width, params + (w), params + (b), act, res, h##i, 0);
static inline void pair_kernels(const vf* x, const float* params, vf* out) {
  VCNN_MLP_LAYERS(VCNN_DECLARE_OUTPUT)
  VCNN_MLP_LAYERS(VCNN_FORWARD)
  for (int k = 0; k < KERNELS; ++k) out[k] = VCNN_CAT(h, VCNN_MLP_LAST)[k];
}

/* Training: MLP_STATE declares every layer's output h, slope s and output gradient d;
   MLP_FORWARD() fills h and s from x, MLP_BACKWARD() adds the parameters' gradients to grads
   from MLP_DOUT, the gradient of MLP_OUT (the last layer's output). */
#define VCNN_DECLARE_STATE(i, input, dinput, size, width, w, b, act, res) \
  vf h##i[width], s##i[width], d##i[width];
#define VCNN_FORWARD_SLOPES(i, input, dinput, size, width, w, b, act, res) \
  pair_layer_forward(input, size, width, params + (w), params + (b), act, res, h##i, s##i);
#define VCNN_BACKWARD(i, input, dinput, size, width, w, b, act, res) \
  pair_layer_backward(input, size, width, w, b, res, params, d##i, s##i, grads, dinput);
#define MLP_STATE VCNN_MLP_LAYERS(VCNN_DECLARE_STATE)
#define MLP_FORWARD() VCNN_MLP_LAYERS(VCNN_FORWARD_SLOPES)
#define MLP_BACKWARD() VCNN_MLP_LAYERS_REVERSED(VCNN_BACKWARD)
#define MLP_OUT VCNN_CAT(h, VCNN_MLP_LAST)
#define MLP_DOUT VCNN_CAT(d, VCNN_MLP_LAST)
