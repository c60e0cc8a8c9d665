/* The training pass of a factorised net on row batches (vcnn/fused_training.py): the
   forward's normalised pooled sums per cloud, keeping each entry's inputs, channels and
   weight, and the backward, which recomputes the pair MLP per entry and adds the gradients of
   its parameters and of the embedding into per-part buffers. */
#include "vcnn_cloud_types.h"
#include "vcnn_pair_mlp.h"
#include "vcnn_entry.h"
#include "vcnn_pooled_sums.h"

/* The query's origin, periods and record. */
#define CLOUD_SETUP(query) \
  const float* own = records + (query) * RECORD; \
  double origin[DIM], length[DIM], inverse[DIM]; \
  for (int a = 0; a < DIM; ++a) { \
    origin[a] = coords[(query) * DIM + a]; \
    length[a] = periods[(query) * 2 * DIM + 2 * a]; \
    inverse[a] = periods[(query) * 2 * DIM + 2 * a + 1]; \
  }

/* Entries e..e+LANES-1 of a cloud ending at `end`: table rows (padding and lanes past the end
   read the query's own row and are not valid) and rows of the embedding. */
static inline vi entry_rows(const int32_t* points, const int32_t* erows, int64_t query,
                            int64_t e, int64_t end, int32_t* row, int32_t* embedding_row) {
  vi valid;
  for (int l = 0; l < LANES; ++l) {
    const int64_t at = e + l < end ? e + l : end - 1;
    const int32_t point = points[at];
    row[l] = point >= 0 ? point : (int32_t)query;
    valid[l] = e + l < end && point >= 0 ? -1 : 0;
    embedding_row[l] = erows[at];
  }
  return valid;
}

/* Per-entry values kept for the backward (when `saved` is given): the pair kernels' inputs,
   the other channels and the pooling weight, value-major, each cloud padded to whole vectors. */
#define SAVED_VALUES (INPUTS + CHANNELS)
static inline int64_t padded_width(int64_t n) { return (n + LANES - 1) / LANES * LANES; }

/* Forward: normalised sums and total weights of the clouds first..last-1 (n entries each). */
static int forward_part(int64_t first, int64_t last, int64_t part, int64_t n,
                        const int64_t* queries, const int32_t* points, const int32_t* erows,
                        const double* coords, const double* periods, const float* records,
                        const float* constants, const float* params, const float* table,
                        float* sums, float* totals, float* saved, int64_t saved_stride) {
  (void)part;
  const vf zero = {0};
  const int64_t width = padded_width(n);
  float scaled[KERNELS][CHANNELS][BLOCK] __attribute__((aligned(128)));
  int32_t block_rows[BLOCK];
  for (int64_t q = first; q < last; ++q) {
    const int64_t query = queries[q];
    CLOUD_SETUP(query);
    vr acc[KERNELS][CHANNELS][WIDTH / ROW];
    memset(acc, 0, sizeof acc);
    vf total = zero;
    const int64_t begin = q * n, end = begin + n;
    for (int64_t block = begin; block < end; block += BLOCK) {
      const int64_t size = end - block < BLOCK ? end - block : BLOCK;
      for (int64_t v = 0; v < size; v += LANES) {
        int32_t row[LANES];
        const vi valid = entry_rows(points, erows, query, block + v, end, row, block_rows + v);
        vf x[INPUTS], extra[CHANNELS - 1], raw[PAIRS + 1], point_outside = zero;
        const vf w = entry_values(row, valid, origin, length, inverse, own, coords, records,
                                  constants, x, extra, raw, &point_outside);
        if (saved) {
          float* keep = saved + q * width + (block - begin) + v;
          for (int i = 0; i < INPUTS; ++i) *(vfu*)(keep + i * saved_stride) = x[i];
          for (int c = 0; c < CHANNELS - 1; ++c) *(vfu*)(keep + (INPUTS + c) * saved_stride) = extra[c];
          *(vfu*)(keep + (SAVED_VALUES - 1) * saved_stride) = w;
        }
        weighted_kernels(x, params, w, extra, scaled, v);
        total += w;
      }
      pooled_sums(acc, scaled, block_rows, table, size);
    }
    float whole = 0.0f;
    for (int b = 0; b < LANES; ++b) whole += total[b];
    /* an empty cloud (total 0 or NaN) is reported by the caller from totals */
    const float scale = whole > 0.0f ? 1.0f / whole : 0.0f;
    for (int k = 0; k < KERNELS; ++k)
      for (int c = 0; c < CHANNELS; ++c)
        for (int j = 0; j < WIDTH / ROW; ++j) acc[k][c][j] *= scale;
    totals[q] = whole;
    memcpy(sums + q * KERNELS * CHANNELS * WIDTH, acc, sizeof acc);
  }
  return 0;
}

/* Backward: gradients of the MLP's parameters and of the table from the clouds first..last-1,
   added into this part's own grad_params and grad_table. */
static int backward_part(int64_t first, int64_t last, int64_t part, int64_t n,
                         const int32_t* erows, const float* params, const float* table,
                         const float* totals, const float* saved, int64_t saved_stride,
                         const float* grad, float* grad_params, float* grad_table,
                         int64_t table_size) {
  grad_params += part * PARAMETERS;
  grad_table += part * table_size;
  const vf zero = {0};
  const int64_t width = padded_width(n);
  vf grads[PARAMETERS];
  for (int p = 0; p < PARAMETERS; ++p) grads[p] = zero;
  for (int64_t q = first; q < last; ++q) {
    /* the sums were divided by the total weight: so is their gradient */
    vr g[KERNELS * CHANNELS * (WIDTH / ROW)];
    const vru* given = (const vru*)(grad + q * KERNELS * CHANNELS * WIDTH);
    const float scale = 1.0f / totals[q];
    for (int j = 0; j < KERNELS * CHANNELS * (WIDTH / ROW); ++j) g[j] = given[j] * scale;
    const int64_t begin = q * n, end = begin + n;
    for (int64_t e = begin; e < end; e += LANES) {
      int32_t embedding_row[LANES];
      for (int l = 0; l < LANES; ++l) embedding_row[l] = erows[e + l < end ? e + l : end - 1];
      const float* kept = saved + q * width + (e - begin);
      vf x[INPUTS], extra[CHANNELS - 1];
      for (int i = 0; i < INPUTS; ++i) x[i] = *(const vfu*)(kept + i * saved_stride);
      for (int c = 0; c < CHANNELS - 1; ++c) extra[c] = *(const vfu*)(kept + (INPUTS + c) * saved_stride);
      const vf w = *(const vfu*)(kept + (SAVED_VALUES - 1) * saved_stride);
      MLP_STATE;
      MLP_FORWARD();
      for (int k = 0; k < KERNELS; ++k) MLP_DOUT[k] = zero;
      for (int l = 0; l < LANES; ++l) {
        if (w[l] == 0.0f) continue;
        float placed[CHANNELS];
        placed[0] = w[l];
        for (int c = 1; c < CHANNELS; ++c) placed[c] = w[l] * extra[c - 1][l];
        const int64_t offset = (int64_t)embedding_row[l] * KERNELS * WIDTH;
        const vru* a = (const vru*)(table + offset);
        vru* da = (vru*)(grad_table + offset);
        for (int k = 0; k < KERNELS; ++k) {
          vr dot = {0};
          const float kernel = 1.0f + MLP_OUT[k][l];
          for (int j = 0; j < WIDTH / ROW; ++j) {
            vr seen = placed[0] * g[(k * CHANNELS) * (WIDTH / ROW) + j];
            for (int c = 1; c < CHANNELS; ++c) seen += placed[c] * g[(k * CHANNELS + c) * (WIDTH / ROW) + j];
            dot += seen * a[k * (WIDTH / ROW) + j];
            da[k * (WIDTH / ROW) + j] += kernel * seen;
          }
          float sum = 0.0f;
          for (int r = 0; r < ROW; ++r) sum += dot[r];
          MLP_DOUT[k][l] = sum;
        }
      }
      MLP_BACKWARD();
    }
  }
  for (int p = 0; p < PARAMETERS; ++p) {
    float sum = 0.0f;
    for (int l = 0; l < LANES; ++l) sum += grads[p][l];
    grad_params[p] += sum;
  }
  return 0;
}

int vcnn_train_forward(int64_t parts, const int64_t* bounds, int64_t n, const int64_t* queries,
                       const int32_t* points, const int32_t* erows, const double* coords,
                       const double* periods, const float* records, const float* constants,
                       const float* params, const float* table, float* sums, float* totals,
                       float* saved, int64_t saved_stride) {
  int status = 0;
  VCNN_FOR_EACH_PART(p)
  status |= forward_part(bounds[p], bounds[p + 1], p, n, queries, points, erows, coords, periods,
                         records, constants, params, table, sums, totals, saved, saved_stride);
  return status;
}

int vcnn_train_backward(int64_t parts, const int64_t* bounds, int64_t n, const int32_t* erows,
                        const float* params, const float* table, const float* totals,
                        const float* saved, int64_t saved_stride, const float* grad,
                        float* grad_params, float* grad_table, int64_t table_size) {
  int status = 0;
  VCNN_FOR_EACH_PART(p)
  status |= backward_part(bounds[p], bounds[p + 1], p, n, erows, params, table, totals, saved,
                          saved_stride, grad, grad_params, grad_table, table_size);
  return status;
}
