/* pooled_sums: adds scaled[k][c][v] times the embedding row rows[v] to acc[k][c], v < size.

   Two sets of sums (even and odd entries): the additions of one set wait on each other, two
   sets keep the multiply-add units busy. */
static inline void pooled_sums(vr acc[KERNELS][CHANNELS][WIDTH / ROW],
                               float scaled[KERNELS][CHANNELS][BLOCK], const int32_t* rows,
                               const float* table, int64_t size) {
  for (int k = 0; k < KERNELS; ++k) {
    vr sum[CHANNELS][WIDTH / ROW], odd[CHANNELS][WIDTH / ROW];
    memcpy(sum, acc[k], sizeof sum);
    memset(odd, 0, sizeof odd);
    int64_t v = 0;
    for (; v + 1 < size; v += 2) {
      const vru* even_row = (const vru*)(table + ((int64_t)rows[v] * KERNELS + k) * WIDTH);
      const vru* odd_row = (const vru*)(table + ((int64_t)rows[v + 1] * KERNELS + k) * WIDTH);
      for (int c = 0; c < WIDTH / ROW; ++c) {
        const vr a = even_row[c], b = odd_row[c];
        for (int h = 0; h < CHANNELS; ++h) {
          sum[h][c] += scaled[k][h][v] * a;
          odd[h][c] += scaled[k][h][v + 1] * b;
        }
      }
    }
    if (v < size) {
      const vru* row = (const vru*)(table + ((int64_t)rows[v] * KERNELS + k) * WIDTH);
      for (int c = 0; c < WIDTH / ROW; ++c)
        for (int h = 0; h < CHANNELS; ++h) sum[h][c] += scaled[k][h][v] * row[c];
    }
    for (int h = 0; h < CHANNELS; ++h)
      for (int c = 0; c < WIDTH / ROW; ++c) acc[k][h][c] = sum[h][c] + odd[h][c];
  }
}

/* weighted_kernels: the pair kernels of one vector of entries (x), times the pooling weight w
   plus w itself (the mean part), into lanes v .. v + LANES - 1 of scaled: channel 0 that value,
   channel c > 0 that value times the entry's extra value c - 1. */
static inline void weighted_kernels(const vf* x, const float* params, vf w, const vf* extra,
                                    float scaled[KERNELS][CHANNELS][BLOCK], int64_t v) {
  vf out[KERNELS];
  pair_kernels(x, params, out);
  for (int k = 0; k < KERNELS; ++k) {
    const vf s = w + w * out[k];
    *(vfu*)(scaled[k][0] + v) = s;
    for (int c = 1; c < CHANNELS; ++c) *(vfu*)(scaled[k][c] + v) = s * extra[c - 1];
  }
}
