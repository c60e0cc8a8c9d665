/* The fused full-cloud pass (vcnn/fused.py): per cloud, every entry's inputs, pair kernels
   and pooling weight, and the moments against the point embedding, in registers and L1. */
#include "vcnn_cloud_types.h"
#include "vcnn_pair_mlp.h"
#include "vcnn_entry.h"
#include "vcnn_pooled_sums.h"

/* The clouds first..last-1; counts and uses: this part's own (see VCNN_FOR_EACH_PART).
   weights: NULL, or one pooling weight per entry that replaces the computed one (quadrature
   clouds, vcnn/cloud_quadrature.py). */
static int moments_part(int64_t first, int64_t last, int64_t part, const int64_t* offsets,
                        const int32_t* points, const int32_t* images, const float* weights,
                        const int64_t* queries,
                        const double* coords, const double* periods, const float* records,
                        const float* constants, const float* params, const float* table,
                        float* sums, float* totals, int64_t* counts, int64_t* uses,
                        int64_t rows_count) {
  counts += part * (PAIRS + 1);
  if (uses) uses += part * rows_count;
  const vf zero = {0};
  vf lane;
  for (int b = 0; b < LANES; ++b) lane[b] = (float)b;
  float scaled[KERNELS][CHANNELS][BLOCK] __attribute__((aligned(128)));
  int32_t block_rows[BLOCK];
  vi outside_any = {0};
  vi outside_pair[PAIRS + 1];
  for (int j = 0; j < PAIRS + 1; ++j) outside_pair[j] = (vi){0};
  for (int64_t q = first; q < last; ++q) {
    const int64_t begin = offsets[q], end = offsets[q + 1];
    const int64_t query = queries[q];
    const float* own = records + query * RECORD;
    double origin[DIM], length[DIM], inverse[DIM];
    for (int a = 0; a < DIM; ++a) {
      origin[a] = coords[query * DIM + a];
      length[a] = periods[query * 2 * DIM + 2 * a];
      inverse[a] = periods[query * 2 * DIM + 2 * a + 1];
    }
    vr acc[KERNELS][CHANNELS][WIDTH / ROW];
    memset(acc, 0, sizeof acc);
    vf total = zero;
    for (int64_t block = begin; block < end; block += BLOCK) {
      const int64_t size = end - block < BLOCK ? end - block : BLOCK;
      for (int64_t v = 0; v < size; v += LANES) {
        /* lanes past the cloud's end repeat its last entry and weigh nothing */
        const int64_t e = block + v;
        const vi valid = lane < (float)(end - e);
        int32_t row[LANES];
        for (int b = 0; b < LANES; ++b) {
          /* an entry is a point, or with images an image id of a point */
          const int32_t id = points[e + b < end ? e + b : end - 1];
          row[b] = images ? images[id] : id;
          block_rows[v + b] = row[b];
        }
        vf x[INPUTS], extra[CHANNELS - 1], raw[PAIRS + 1], point_outside = zero;
        vf w = entry_values(row, valid, origin, length, inverse, own, coords, records,
                            constants, x, extra, raw, &point_outside);
        if (weights) {
          vf given;
          for (int b = 0; b < LANES; ++b) given[b] = weights[e + b < end ? e + b : end - 1];
          w = (vf)((vi)given & valid);
        }
#if VCNN_RANGE_TEST
        vi any = point_outside > 0.5f;
        for (int j = 0; j < PAIRS; ++j) {
          const vi out = (raw[j] < constants[CONST_LOW + j]) | (raw[j] > constants[CONST_HIGH + j]);
          outside_pair[j] -= out & valid;
          any |= out;
        }
        outside_any -= any & valid;
        if (uses)
          for (int b = 0; b < LANES; ++b)
            if (valid[b]) uses[row[b]] += 1;
#endif
        weighted_kernels(x, params, w, extra, scaled, v);
        total += w;
      }
      pooled_sums(acc, scaled, block_rows, table, size);
    }
    float whole = 0.0f;
    for (int b = 0; b < LANES; ++b) whole += total[b];
    totals[q] = whole;
    memcpy(sums + q * KERNELS * CHANNELS * WIDTH, acc, sizeof acc);
  }
  for (int b = 0; b < LANES; ++b) {
    counts[0] += outside_any[b];
    for (int j = 0; j < PAIRS; ++j) counts[1 + j] += outside_pair[j][b];
  }
  return 0;
}

int vcnn_fused_moments(int64_t parts, const int64_t* bounds, const int64_t* offsets,
                       const int32_t* points, const int32_t* images, const float* weights,
                       const int64_t* queries,
                       const double* coords, const double* periods, const float* records,
                       const float* constants, const float* params, const float* table,
                       float* sums, float* totals, int64_t* counts, int64_t* uses,
                       int64_t rows_count) {
  int status = 0;
  VCNN_FOR_EACH_PART(p)
  status |= moments_part(bounds[p], bounds[p + 1], p, offsets, points, images, weights, queries,
                         coords,
                         periods, records, constants, params, table, sums, totals, counts, uses,
                         rows_count);
  return status;
}

/* For tests: the kernel's exp and activation on n values (n a multiple of GLANES). */
int vcnn_probe_exp(const float* x, float* y, int64_t n) {
  for (int64_t i = 0; i + GLANES <= n; i += GLANES) {
    vg v;
    memcpy(&v, x + i, sizeof v);
    v = vexp_g(v);
    memcpy(y + i, &v, sizeof v);
  }
  return 0;
}

int vcnn_probe_activation(const float* x, float* y, int64_t n) {
  for (int64_t i = 0; i + GLANES <= n; i += GLANES) {
    vg v;
    memcpy(&v, x + i, sizeof v);
    v = activation_g(v);
    memcpy(y + i, &v, sizeof v);
  }
  return 0;
}
