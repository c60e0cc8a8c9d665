/* entry_values: the pair kernels' inputs, the channels and the pooling weight of one vector of
   a cloud's entries, read from the table's rows. It mirrors vcnn.features.entry_inputs, the
   normaliser (vcnn.features.FeatureNormalizer) and the pooling weight of
   vcnn.network.VectorCloudNet; the inference kernel and the training kernel both call it.

   Needs, besides the sizes (DIM, VECTORS, POINT_SCALARS, PAIRS, INPUTS, RECORD):
     VCNN_PAIR_SCALARS(X)   X(index, KIND) per pair scalar in the feature spec's order, KIND one
                            of PROXIMITY, DISTANCE, NORMALIZED_RADIUS, UPSTREAM_COSINE;
     VCNN_UPSTREAM, VCNN_RADIUS, VCNN_FRAME, VCNN_CUTOFF, VCNN_VOLUME_POOLING, VCNN_RANGE_TEST,
     VCNN_POSITION_SCALAR, VCNN_ANGLE, VCNN_POSITION_DIRECTION   (0 or 1: the options);
     RECORD_<FIELD>         offsets of the per-point record's fields;
     CONST_<NAME>           offsets of the per-model numbers in `constants`: the normaliser's
                            pair means and deviations, range ends, position scale, -1 / L of
                            the proximity, 1 / b^2 of the region, the cutoff's start and span,
                            the frame's rotation (row-major). */

/* As vcnn.network (a float32 1e-24, and twice it). */
#define VCNN_SOFTENING_SQUARED 0x1.357c2ap-80f
#define VCNN_SOFTENING_SQUARED_TWICE 0x1.357c2ap-79f

#define VCNN_RAW_PROXIMITY vexp(distance * constants[CONST_PROXIMITY])
#define VCNN_RAW_DISTANCE distance
#define VCNN_RAW_NORMALIZED_RADIUS radius
#define VCNN_RAW_UPSTREAM_COSINE \
  blend(distance > 0.0f, upstream_dot / blend(distance > 1e-30f, distance, zero + 1e-30f), zero)
#define VCNN_SET_RAW(index, kind) raw[index] = VCNN_RAW_##kind;

/* Field `start` (count floats) of the records of the rows, one vector per float. */
static inline void gather_records(const float* records, const int32_t* row, int start, int count,
                                  vf* out) {
  for (int i = 0; i < count; ++i) {
    float lanes[LANES];
    for (int b = 0; b < LANES; ++b) lanes[b] = records[(int64_t)row[b] * RECORD + start + i];
    memcpy(&out[i], lanes, sizeof lanes);
  }
}

/* From the entries' rows, the query's origin, periods (length, inverse: 0 on axes without a
   wrap) and record `own`: writes the pair kernels' normalised inputs x, the channels besides
   the constant one (extra), the raw pair scalars (raw, for the range test) and whether the
   entries' points are outside a range (point_outside); returns the pooling weight (0 in lanes
   that are not valid; not yet divided by the cloud's total). */
static inline vf entry_values(const int32_t* row, vi valid, const double* origin,
                              const double* length, const double* inverse, const float* own,
                              const double* coords, const float* records,
                              const float* constants, vf* x, vf* extra, vf* raw,
                              vf* point_outside) {
  const vf zero = {0};
  (void)own;
  (void)raw;
  (void)point_outside;
  /* relative positions, wrapped on the query's periodic axes (one branch per axis: the lane
     loops of both branches vectorise) */
  vf rel[DIM];
  for (int a = 0; a < DIM; ++a) {
    float lanes[LANES];
    if (inverse[a] != 0.0) {
      for (int b = 0; b < LANES; ++b) {
        const double r = coords[(int64_t)row[b] * DIM + a] - origin[a];
        lanes[b] = (float)(r - length[a] * nearbyint(r * inverse[a]));
      }
    } else {
      for (int b = 0; b < LANES; ++b) lanes[b] = (float)(coords[(int64_t)row[b] * DIM + a] - origin[a]);
    }
    memcpy(&rel[a], lanes, sizeof lanes);
  }
#if VCNN_FRAME
  vf turned[DIM];
  for (int r = 0; r < DIM; ++r) {
    turned[r] = constants[CONST_FRAME + r * DIM] * rel[0];
    for (int c = 1; c < DIM; ++c) turned[r] += constants[CONST_FRAME + r * DIM + c] * rel[c];
  }
  memcpy(rel, turned, sizeof rel);
#endif
  vf distance_squared = rel[0] * rel[0];
  for (int a = 1; a < DIM; ++a) distance_squared += rel[a] * rel[a];
  const vf distance = vsqrt(distance_squared);
#if VCNN_RADIUS
  vf parallel = rel[0] * own[RECORD_DIRECTION];
  for (int a = 1; a < DIM; ++a) parallel += rel[a] * own[RECORD_DIRECTION + a];
  const float across = constants[CONST_ACROSS];
  const vf radius_squared = parallel * parallel * (own[RECORD_INVERSE_ALONG_SQUARED] - across) +
                            distance_squared * across;
  const vf radius = vsqrt(blend(radius_squared > 0.0f, radius_squared, zero));
#endif
#if VCNN_UPSTREAM
  vf upstream[DIM];
  gather_records(records, row, RECORD_UPSTREAM, DIM, upstream);
  vf upstream_dot = rel[0] * upstream[0];
  for (int a = 1; a < DIM; ++a) upstream_dot += rel[a] * upstream[a];
#endif
#if VECTORS
  vf vectors[VECTORS * DIM];
  gather_records(records, row, RECORD_VECTORS, VECTORS * DIM, vectors);
#endif
#if POINT_SCALARS
  vf point_scalars[POINT_SCALARS];
  gather_records(records, row, RECORD_POINT_SCALARS, POINT_SCALARS, point_scalars);
#endif
#if VCNN_RANGE_TEST
  gather_records(records, row, RECORD_OUTSIDE, 1, point_outside);
#endif
  /* raw pair scalars, in the spec's order */
  VCNN_PAIR_SCALARS(VCNN_SET_RAW)
  /* normalised pair-kernel inputs: pair scalars, derived scalars, point scalars */
  vf position[DIM];
  for (int a = 0; a < DIM; ++a) position[a] = rel[a] / constants[CONST_POSITION_SCALE];
  for (int j = 0; j < PAIRS; ++j)
    x[j] = (raw[j] - constants[CONST_MEAN + j]) / constants[CONST_STD + j];
  int n = PAIRS;
#if VCNN_POSITION_SCALAR || VCNN_ANGLE || VCNN_POSITION_DIRECTION
  vf softened = position[0] * position[0];
  for (int a = 1; a < DIM; ++a) softened += position[a] * position[a];
  softened += VCNN_SOFTENING_SQUARED;
#endif
#if VCNN_POSITION_SCALAR
  x[n++] = vsqrt(softened);
#endif
#if VCNN_ANGLE
  vf dot = position[0] * vectors[0], first_squared = vectors[0] * vectors[0];
  for (int a = 1; a < DIM; ++a) {
    dot += position[a] * vectors[a];
    first_squared += vectors[a] * vectors[a];
  }
  x[n++] = dot * (1.0f / vsqrt(softened)) *
           (1.0f / vsqrt(first_squared + VCNN_SOFTENING_SQUARED));
#endif
#if POINT_SCALARS
  for (int i = 0; i < POINT_SCALARS; ++i) x[n++] = point_scalars[i];
#endif
  (void)n;
  /* pooling weight */
  vf weight = zero + 1.0f;
#if VCNN_CUTOFF
  vf t = (radius - constants[CONST_CUTOFF_START]) / constants[CONST_CUTOFF_SPAN];
  t = blend(t > 1.0f, zero + 1.0f, blend(t > 0.0f, t, zero));
  vf cut = 1.0f - t * t * t * (t * (6.0f * t - 15.0f) + 10.0f);
  weight = blend(cut > 1.0f, zero + 1.0f, blend(cut > 0.0f, cut, zero));
#endif
#if VCNN_VOLUME_POOLING
  vf volume;
  gather_records(records, row, RECORD_VOLUME, 1, &volume);
  weight = weight * (volume / own[RECORD_VOLUME]);
#endif
  /* channels: the point vectors' components, then the position channel */
#if VECTORS
  for (int i = 0; i < VECTORS * DIM; ++i) extra[i] = vectors[i];
#endif
#if VCNN_POSITION_DIRECTION
  const vf unit = blend(softened > VCNN_SOFTENING_SQUARED_TWICE, 1.0f / vsqrt(softened), zero);
  for (int a = 0; a < DIM; ++a) extra[VECTORS * DIM + a] = position[a] * unit;
#else
  for (int a = 0; a < DIM; ++a) extra[VECTORS * DIM + a] = position[a];
#endif
  return blend(valid, weight, zero);
}
