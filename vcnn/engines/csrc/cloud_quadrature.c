/* The cloud quadrature's node search and weights (vcnn/cloud_quadrature.py): the k nearest mesh
   points of every node by a uniform cell grid, then the node's partition-of-unity weights, its
   extrapolated wall distance and its inside-the-domain step, in one pass per query.

   Needs: VCNN_MAX_NEAREST (the largest k + 1 a call may ask for; the nearest lists live on the
   stack).

   The grid (built by the caller): grid_sizes = {cells_x, cells_y, periodic_x, periodic_y};
   grid_geometry = {low_x, low_y, width_x, width_y, period_x, period_y}; the points sorted by
   cell (sorted_points, (N, 2) double), order[s] the original index of sorted point s,
   starts[c]..starts[c + 1] - 1 the sorted points of cell c = cx + cells_x * cy, and
   empty_rings[c] the Chebyshev distance in cells from c to the nearest cell with points. A
   periodic axis has period = cells * width, its cell index wraps and the sorted points'
   coordinates along it lie in [low, low + period); a non-periodic axis clamps the cell index. Distances wrap
   periodic axes to the minimum image. The search visits rings of cells around the target's
   cell until the k-th distance found is no larger than the distance to any cell not yet
   visited: the result is exact, whatever the grading of the mesh (only its speed depends on
   the points per cell). */
#include "vcnn_common.h"

#define VCNN_INLINE static inline __attribute__((always_inline))

typedef struct {
  int64_t cells[2], periodic[2];
  double low[2], width[2], period[2];
  const int64_t* order;
  const int64_t* starts;
  const int64_t* empty_rings;
  const double* points;
} grid_t;

static grid_t make_grid(const int64_t* sizes, const double* geometry, const int64_t* order,
                        const int64_t* starts, const int64_t* empty_rings,
                        const double* sorted_points) {
  grid_t grid;
  for (int a = 0; a < 2; ++a) {
    grid.cells[a] = sizes[a];
    grid.periodic[a] = sizes[2 + a];
    grid.low[a] = geometry[a];
    grid.width[a] = geometry[2 + a];
    grid.period[a] = geometry[4 + a];
  }
  grid.order = order;
  grid.starts = starts;
  grid.empty_rings = empty_rings;
  grid.points = sorted_points;
  return grid;
}

/* A coordinate difference, wrapped to the minimum image on a periodic axis (as numpy's
   difference - length * round(difference / length)). */
VCNN_INLINE double wrapped(const grid_t* grid, int a, double difference) {
  if (!grid->periodic[a]) return difference;
  return difference - grid->period[a] * nearbyint(difference / grid->period[a]);
}

/* Sorted points s0..s1-1 (at x - sx, y - sy from the target) into the k nearest found so far:
   squared distances ascending, ties in the order scanned (the caller's weights give tied
   points equal weights, or none at the k-th distance, so the order of ties never matters). */
VCNN_INLINE void scan(const grid_t* grid, int64_t s0, int64_t s1, double sx, double sy, int k,
                      int* found, double* best_d2, int64_t* best) {
  for (int64_t s = s0; s < s1; ++s) {
    const double ex = grid->points[2 * s] - sx;
    const double ey = grid->points[2 * s + 1] - sy;
    const double d2 = ex * ex + ey * ey;
    if (*found == k && !(d2 < best_d2[k - 1])) continue;
    int place = *found < k ? (*found)++ : k - 1;
    while (place > 0 && d2 < best_d2[place - 1]) {
      best_d2[place] = best_d2[place - 1];
      best[place] = best[place - 1];
      --place;
    }
    best_d2[place] = d2;
    best[place] = s;
  }
}

/* The cells of ring r (Chebyshev distance r from cell c, offsets within -lo_cap..hi_cap) into
   the k nearest found so far; `at` the target in the sorted points' period. */
static void scan_ring(const grid_t* grid, int64_t r, const int64_t* c, const int64_t* lo_cap,
                      const int64_t* hi_cap, const double* at, int k, int* found,
                      double* best_d2, int64_t* best) {
  int64_t lo[2], hi[2];
  for (int a = 0; a < 2; ++a) {
    lo[a] = r < lo_cap[a] ? r : lo_cap[a];
    hi[a] = r < hi_cap[a] ? r : hi_cap[a];
  }
  for (int64_t dy = -lo[1]; dy <= hi[1]; ++dy) {
    const int edge_row = dy == -r || dy == r;
    for (int64_t dx = -lo[0]; dx <= hi[0]; ++dx) {
      if (!edge_row && dx != -r && dx != r) {
        if (dx < r - 1 && r > 0) dx = r - 1; /* skip the ring's inside */
        continue;
      }
      /* a column (row) beyond the period: its points one period over, the minimum image
         (the offsets never reach half the cells further) */
      int64_t cx = c[0] + dx, cy = c[1] + dy;
      double sx = at[0], sy = at[1];
      if (cx < 0) cx += grid->cells[0], sx += grid->period[0];
      if (cx >= grid->cells[0]) cx -= grid->cells[0], sx -= grid->period[0];
      if (cy < 0) cy += grid->cells[1], sy += grid->period[1];
      if (cy >= grid->cells[1]) cy -= grid->cells[1], sy -= grid->period[1];
      const int64_t cell = cx + grid->cells[0] * cy;
      scan(grid, grid->starts[cell], grid->starts[cell + 1], sx, sy, k, found, best_d2, best);
    }
  }
}

/* The k nearest points of `target` (k <= VCNN_MAX_NEAREST): their squared distances, sorted,
   and their sorted-point indices; fewer than k when the grid
   holds fewer points (returns how many). */
static int nearest(const grid_t* grid, const double* target, int k, double* best_d2,
                   int64_t* best) {
  double t[2], at[2];
  int64_t c[2], lo_cap[2], hi_cap[2];
  for (int a = 0; a < 2; ++a) {
    t[a] = (target[a] - grid->low[a]) / grid->width[a];
    at[a] = target[a];
    const int64_t n = grid->cells[a];
    if (grid->periodic[a]) {
      /* the target moved into the period of the sorted points, [low, low + period) */
      const double turns = floor(t[a] / (double)n);
      t[a] -= (double)n * turns;
      at[a] -= grid->period[a] * turns;
      c[a] = (int64_t)floor(t[a]);
      if (c[a] >= n) c[a] = n - 1; /* t rounded up to n */
      if (c[a] < 0) c[a] = 0;
      /* offsets -lo_cap..hi_cap reach every column once */
      lo_cap[a] = (n - 1) / 2;
      hi_cap[a] = n / 2;
    } else {
      const double f = floor(t[a]);
      c[a] = f < 0.0 ? 0 : (f > (double)(n - 1) ? n - 1 : (int64_t)f);
      lo_cap[a] = c[a];
      hi_cap[a] = n - 1 - c[a];
    }
  }
  int found = 0;
  /* rings nearer than the nearest cell with points are empty: start there (a node beyond a
     wall lies in empty cells, up to the cloud's size from the nearest point) */
  int64_t r = grid->empty_rings[c[0] + grid->cells[0] * c[1]];
  if (r > 0) {
    scan_ring(grid, r, c, lo_cap, hi_cap, at, k, &found, best_d2, best);
  } else if (c[0] >= 1 && c[0] + 1 < grid->cells[0] && c[1] >= 1 && c[1] + 1 < grid->cells[1]) {
    /* inside the grid: rings 0 and 1, the 3 x 3 block, as three runs of sorted points (the
       cells of a row are consecutive) */
    for (int64_t dy = -1; dy <= 1; ++dy) {
      const int64_t left = c[0] - 1 + grid->cells[0] * (c[1] + dy);
      scan(grid, grid->starts[left], grid->starts[left + 3], at[0], at[1], k, &found, best_d2,
           best);
    }
    r = 1;
  } else {
    scan_ring(grid, 0, c, lo_cap, hi_cap, at, k, &found, best_d2, best);
  }
  for (const int64_t scanned = r;; ++r) {
    if (r > scanned) scan_ring(grid, r, c, lo_cap, hi_cap, at, k, &found, best_d2, best);
    int covered[2];
    for (int a = 0; a < 2; ++a) covered[a] = r >= lo_cap[a] && r >= hi_cap[a];
    if (covered[0] && covered[1]) return found;
    if (found == k) {
      /* the distance from the target to any cell outside the visited block */
      double gap = INFINITY;
      for (int a = 0; a < 2; ++a) {
        if (covered[a]) continue;
        const double inside = t[a] - (double)c[a]; /* in [0, 1) inside the grid */
        const double below = (inside + (double)r) * grid->width[a];
        const double above = ((double)r + 1.0 - inside) * grid->width[a];
        if (r < lo_cap[a] && below < gap) gap = below;
        if (r < hi_cap[a] && above < gap) gap = above;
      }
      if (best_d2[k - 1] <= gap * gap) return found;
    }
  }
}

/* The k nearest points (original indices) and their distances of targets first..last-1. */
static int nearest_part(const grid_t* grid, int64_t first, int64_t last, int k,
                        const double* targets, double* distance, int64_t* indices) {
  double best_d2[VCNN_MAX_NEAREST];
  int64_t best[VCNN_MAX_NEAREST];
  for (int64_t q = first; q < last; ++q) {
    if (nearest(grid, targets + 2 * q, k, best_d2, best) < k) return 1;
    for (int j = 0; j < k; ++j) {
      distance[q * k + j] = sqrt(best_d2[j]);
      indices[q * k + j] = grid->order[best[j]];
    }
  }
  return 0;
}

/* The `count` nearest points of every target (T, 2): distance (T, count) sorted and
   indices (T, count) original point indices. Status 1: fewer points than asked or count out of
   range. */
int vcnn_grid_nearest(int64_t parts, const int64_t* bounds, const int64_t* grid_sizes,
                      const double* grid_geometry, const int64_t* order, const int64_t* starts,
                      const int64_t* empty_rings, const double* sorted_points, int64_t count,
                      const double* targets, double* distance, int64_t* indices) {
  if (count < 1 || count > VCNN_MAX_NEAREST) return 1;
  const grid_t grid =
      make_grid(grid_sizes, grid_geometry, order, starts, empty_rings, sorted_points);
  int status = 0;
  VCNN_FOR_EACH_PART(p)
  status |= nearest_part(&grid, bounds[p], bounds[p + 1], (int)count, targets, distance, indices);
  return status;
}

/* The C^2 step 1 - t^3 (6 t^2 - 15 t + 10) of vcnn._regions.smooth_switch (start 0), clipped. */
VCNN_INLINE double switch_down(double t) {
  /* comparisons, not fmin/fmax: those are library calls without -ffast-math */
  t = t < 0.0 ? 0.0 : (t > 1.0 ? 1.0 : t);
  const double value = 1.0 - t * t * t * (t * (6.0 * t - 15.0) + 10.0);
  return value < 0.0 ? 0.0 : (value > 1.0 ? 1.0 : value);
}

/* Quadrature clouds of queries first..last-1 (see vcnn_quadrature_clouds). */
static int clouds_part(const grid_t* grid, int64_t first, int64_t last, int neighbours,
                       int64_t radial, int64_t angular, const double* rule, const int64_t* queries,
                       const double* frames, const double* points, const double* wall_distance,
                       const double* wall_gradient, int64_t* slot, double* sums,
                       int64_t* indices, float* weights, int64_t* counts) {
  const int k = neighbours + 1;
  const int64_t width = 1 + radial * angular * neighbours;
  const double* radii = rule;
  const double* area = rule + radial;
  const double* cos_angles = rule + 2 * radial;
  const double* sin_angles = cos_angles + angular;
  const double across = sin_angles[angular];
  const double step = 2.0 * M_PI / (double)angular;
  double best_d2[VCNN_MAX_NEAREST], distance[VCNN_MAX_NEAREST], share[VCNN_MAX_NEAREST];
  int64_t best[VCNN_MAX_NEAREST];
  int64_t written = first * width;
  for (int64_t q = first; q < last; ++q) {
    const double* frame = frames + 6 * q; /* origin, flow direction e, phi, along */
    const double ox = frame[0], oy = frame[1], ex = frame[2], ey = frame[3];
    const double nx = -ey, ny = ex, cos_phi = cos(frame[4]), sin_phi = sin(frame[4]);
    const double along = frame[5];
    /* the part's clouds one after another from row `first` on (no gaps between them) */
    int64_t* row_index = indices + written;
    float* row_weight = weights + written;
    /* the query first; then every other point once, in the order the nodes first reach it,
       its weights summed: the moments are linear in the weights, so merging is exact */
    row_index[0] = queries[q];
    sums[0] = 0.0;
    slot[queries[q]] = 0;
    int64_t entry = 1;
    for (int64_t i = 0; i < radial; ++i) {
      const double rho = radii[i];
      const double node_weight = along * across * area[i] * step;
      for (int64_t m = 0; m < angular; ++m) {
        /* theta = angle m + phi */
        const double cos_theta = cos_angles[m] * cos_phi - sin_angles[m] * sin_phi;
        const double sin_theta = sin_angles[m] * cos_phi + cos_angles[m] * sin_phi;
        const double local_along = (rho * cos_theta) * along;
        const double local_across = (rho * sin_theta) * across;
        const double node[2] = {ox + local_along * ex + local_across * nx,
                                oy + local_along * ey + local_across * ny};
        if (nearest(grid, node, k, best_d2, best) < k) return 1;
        for (int j = 0; j < k; ++j) distance[j] = sqrt(best_d2[j]);
        /* partition of unity: kappa(d / h) = (1 - (d / h)^2)^2, h the k-th distance */
        const double h = distance[neighbours];
        double total = 0.0;
        for (int j = 0; j < neighbours; ++j) {
          const double s = h > 0.0 ? distance[j] / h : 1.0;
          const double kernel = s < 1.0 ? 1.0 - s * s : 0.0;
          share[j] = kernel * kernel;
          total += share[j];
        }
        for (int j = 0; j < neighbours; ++j)
          share[j] = total > 0.0 ? share[j] / total : 1.0 / (double)neighbours;
        /* the signed wall distance at the node, extrapolated from each neighbour */
        double signed_distance = 0.0;
        for (int j = 0; j < neighbours; ++j) {
          const int64_t point = grid->order[best[j]];
          const double dx = wrapped(grid, 0, node[0] - points[2 * point]);
          const double dy = wrapped(grid, 1, node[1] - points[2 * point + 1]);
          signed_distance += share[j] * (wall_distance[point] + (dx * wall_gradient[2 * point] +
                                                                 dy * wall_gradient[2 * point + 1]));
        }
        double depth;
        if (h > 0.0)
          depth = signed_distance / h;
        else
          depth = (double)((signed_distance > 0.0) - (signed_distance < 0.0));
        const double inside = 1.0 - switch_down(depth + 0.5);
        for (int j = 0; j < neighbours; ++j) {
          const double weight = node_weight * inside * share[j];
          if (!(weight > 0.0)) continue; /* nothing to add: cut by a wall or at the width */
          const int64_t point = grid->order[best[j]];
          if (slot[point] < 0) {
            slot[point] = entry;
            row_index[entry] = point;
            sums[entry++] = 0.0;
          }
          sums[slot[point]] += weight;
        }
      }
    }
    for (int64_t e = 0; e < entry; ++e) {
      row_weight[e] = (float)sums[e];
      slot[row_index[e]] = -1;
    }
    counts[q] = entry;
    written += entry;
  }
  return 0;
}

/* Quadrature clouds of the queries (Q,): rule = {radii (R), radial weights (R), cosines (A)
   and sines (A) of the angles, across}, rule_sizes = {R, A}; frames (Q, 6) = {origin x, y, node direction e x, y, phi,
   along} per query; points (N, 2), wall_distance (N,), wall_gradient (N, 2); the parts (any
   number) run on `threads` threads; slots (threads, N) a workspace of -1s (left so); sums
   (threads, 1 + R A neighbours) a workspace. Out:
   the counts[q] entries of every query q: the query first (its weight: the nodes' that reach
   it, else 0), then every other point that a node gives weight, once, its weights summed. In
   indices and weights (Q (1 + R A neighbours),) the clouds of part p lie one after another
   from bounds[p] (1 + R A neighbours) on; the rest is not written. Status 1: fewer
   points than neighbours + 1, or neighbours out of range. */
int vcnn_quadrature_clouds(int64_t parts, const int64_t* bounds, const int64_t* grid_sizes,
                           const double* grid_geometry, const int64_t* order, const int64_t* starts,
                           const int64_t* empty_rings, const double* sorted_points,
                           int64_t neighbours,
                           const int64_t* rule_sizes, const double* rule, const int64_t* queries,
                           const double* frames, const double* points, const double* wall_distance,
                           const double* wall_gradient, int64_t threads, int64_t* slots,
                           double* sums, int64_t* indices, float* weights, int64_t* counts) {
  if (neighbours < 1 || neighbours + 1 > VCNN_MAX_NEAREST || threads < 1) return 1;
  const grid_t grid =
      make_grid(grid_sizes, grid_geometry, order, starts, empty_rings, sorted_points);
  const int64_t num_points = starts[grid_sizes[0] * grid_sizes[1]];
  const int64_t width = 1 + rule_sizes[0] * rule_sizes[1] * neighbours;
  int status = 0;
  /* more parts than threads, taken as threads come free: on a busy machine a thread that runs
     less does less (each part writes its own rows; the workspaces are the thread's) */
#ifdef _OPENMP
  _Pragma("omp parallel for schedule(dynamic, 1) num_threads((int)threads) reduction(|:status)")
#endif
  for (int64_t p = 0; p < parts; ++p) {
#ifdef _OPENMP
    const int64_t thread = omp_get_thread_num();
#else
    const int64_t thread = 0;
#endif
    status |= clouds_part(&grid, bounds[p], bounds[p + 1], (int)neighbours, rule_sizes[0],
                          rule_sizes[1], rule, queries, frames, points, wall_distance,
                          wall_gradient, slots + thread * num_points, sums + thread * width,
                          indices, weights, counts);
  }
  return status;
}
