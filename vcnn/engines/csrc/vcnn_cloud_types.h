/* Vector types and helpers of the per-entry kernels (inference and training).

   Needs: LANES (entries per step), ROW (floats per vector of an embedding row), GROUP (hidden
   units whose activations run together) and the activation's VCNN_ACTIVATION_<NAME>. */
#include "vcnn_common.h"

/* vf, vi: one value per entry of a step; vr: a piece of a row of the embedding; vg, vgi: GROUP
   steps at once (each operation becomes GROUP independent hardware operations in program
   order, which hides the exp's latency). The u-suffixed types are unaligned views. */
typedef float vf __attribute__((vector_size(4 * LANES)));
typedef float vfu __attribute__((vector_size(4 * LANES), aligned(4)));
typedef int32_t vi __attribute__((vector_size(4 * LANES)));
typedef float vr __attribute__((vector_size(4 * ROW)));
typedef float vru __attribute__((vector_size(4 * ROW), aligned(4)));
#define GLANES (LANES * GROUP)
typedef float vg __attribute__((vector_size(4 * GLANES)));
typedef int32_t vgi __attribute__((vector_size(4 * GLANES)));

#define VT vf
#define VTI vi
#define VT_LANES LANES
#define VFN(name) name
#include "vcnn_vector_ops.h"
#include "vcnn_activation.h"
#undef VT
#undef VTI
#undef VT_LANES
#undef VFN

#define VT vg
#define VTI vgi
#define VT_LANES GLANES
#define VFN(name) name##_g
#include "vcnn_vector_ops.h"
#include "vcnn_activation.h"
#undef VT
#undef VTI
#undef VT_LANES
#undef VFN

/* Channels per kernel: the scalar one, the point vectors' components, the position channel. */
#define CHANNELS (1 + (VECTORS + 1) * DIM)
/* Entries per block of the pooled sums. */
#define BLOCK (LANES > 64 ? LANES : 64)
