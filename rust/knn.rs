//! Exact k-nearest-neighbour graph on patch coordinates (docs/METHOD.md §2.2).
//!
//! For each patch `i` (in order) the edges `i -> j` go to its `min(k, P - 1)` nearest patches
//! `j != i` by Euclidean distance, nearest first, ties broken by the lower index `j`.
//!
//! The search buckets the points into a uniform grid and visits square rings of cells around the
//! query's cell. After ring `r` every unvisited point lies outside the visited square of cells, so
//! at least as far as the query's distance to that square's border; the search stops once the
//! current k-th best distance is *strictly* below that bound. An unvisited point can then neither
//! beat nor tie it, which keeps the lower-index tie rule exact on grid-aligned coordinates where
//! exact ties are the norm. The bound is shrunk by a small slack so that rounding in the cell
//! assignment can never make it optimistic.

use crate::error::{Error, Result};

/// Number of edges for a bag of `n` patches and `k` requested neighbours.
pub fn edge_count(n: usize, k: usize) -> usize {
    n * k.min(n.saturating_sub(1))
}

/// The uniform grid the points are bucketed into, with the points stored cell by cell.
struct Grid {
    min_x: f64,
    min_y: f64,
    cell: f64,
    nx: usize,
    ny: usize,
    /// Absolute slack subtracted from every distance bound, far above the rounding error of the
    /// cell assignment, so that the bound is never optimistic.
    slack: f64,
    /// CSR over cells (row-major, `cy * nx + cx`): the points of cell `c` are the entries
    /// `starts[c]..starts[c + 1]` of `xs`, `ys` and `ids`.
    starts: Vec<usize>,
    xs: Vec<f64>,
    ys: Vec<f64>,
    ids: Vec<u32>,
}

impl Grid {
    fn build(points: &[[f64; 2]], per_cell: usize) -> Grid {
        let n = points.len();
        let (mut min_x, mut min_y) = (f64::INFINITY, f64::INFINITY);
        let (mut max_x, mut max_y) = (f64::NEG_INFINITY, f64::NEG_INFINITY);
        for p in points {
            min_x = min_x.min(p[0]);
            max_x = max_x.max(p[0]);
            min_y = min_y.min(p[1]);
            max_y = max_y.max(p[1]);
        }
        let (w, h) = (max_x - min_x, max_y - min_y);
        let target = (n / per_cell.max(1)).max(1) as f64;
        // Area-based size, but never so small that a thin strip gets more than `target` cells
        // along its long side.
        let mut cell = (w * h / target).sqrt().max(w.max(h) / target);
        if !(cell.is_finite() && cell > 0.0) {
            cell = 1.0;
        }
        let cap = 2 * n + 2;
        let nx = ((w / cell).floor() as usize)
            .saturating_add(1)
            .clamp(1, cap);
        let ny = ((h / cell).floor() as usize)
            .saturating_add(1)
            .clamp(1, cap);
        let cell_index = |v: f64, lo: f64, count: usize| -> usize {
            let c = ((v - lo) / cell).floor();
            if c <= 0.0 {
                0
            } else {
                (c as usize).min(count - 1)
            }
        };
        let cell_of: Vec<usize> = points
            .iter()
            .map(|p| cell_index(p[1], min_y, ny) * nx + cell_index(p[0], min_x, nx))
            .collect();
        let mut starts = vec![0usize; nx * ny + 1];
        for &c in &cell_of {
            starts[c + 1] += 1;
        }
        for c in 0..nx * ny {
            starts[c + 1] += starts[c];
        }
        let mut fill = starts.clone();
        let (mut xs, mut ys, mut ids) = (vec![0.0; n], vec![0.0; n], vec![0u32; n]);
        for (i, &c) in cell_of.iter().enumerate() {
            let t = fill[c];
            xs[t] = points[i][0];
            ys[t] = points[i][1];
            ids[t] = i as u32;
            fill[c] += 1;
        }
        let scale = w.abs() + h.abs() + min_x.abs() + min_y.abs() + cell;
        Grid {
            min_x,
            min_y,
            cell,
            nx,
            ny,
            slack: 1e-9 * scale,
            starts,
            xs,
            ys,
            ids,
        }
    }

    /// A lower bound on the distance from `(px, py)` in cell `(cx, cy)` to every point outside
    /// the square of cells within Chebyshev distance `r`; `None` when that square covers the grid.
    fn outside_bound(&self, px: f64, py: f64, cx: usize, cy: usize, r: usize) -> Option<f64> {
        let mut bound = f64::INFINITY;
        if cx > r {
            bound = bound.min(px - (self.min_x + (cx - r) as f64 * self.cell));
        }
        if cx + r + 1 < self.nx {
            bound = bound.min(self.min_x + (cx + r + 1) as f64 * self.cell - px);
        }
        if cy > r {
            bound = bound.min(py - (self.min_y + (cy - r) as f64 * self.cell));
        }
        if cy + r + 1 < self.ny {
            bound = bound.min(self.min_y + (cy + r + 1) as f64 * self.cell - py);
        }
        if bound.is_infinite() {
            None
        } else {
            Some(bound - self.slack)
        }
    }
}

/// The `k` best `(squared distance, index)` pairs seen so far, sorted ascending.
struct Best {
    k: usize,
    items: Vec<(f64, u32)>,
}

impl Best {
    #[inline]
    fn offer(&mut self, d2: f64, j: u32) {
        let cand = (d2, j);
        if self.items.len() == self.k {
            match self.items.last() {
                Some(&worst) if less(cand, worst) => {
                    self.items.pop();
                }
                _ => return,
            }
        }
        let pos = self.items.partition_point(|&e| less(e, cand));
        self.items.insert(pos, cand);
    }

    fn full(&self) -> bool {
        self.items.len() == self.k
    }
}

#[inline]
fn less(a: (f64, u32), b: (f64, u32)) -> bool {
    a.0 < b.0 || (a.0 == b.0 && a.1 < b.1)
}

/// Exact k-NN graph of `points` as a flat `(2, E)` row-major buffer: the first `E` values are the
/// sources `i`, the next `E` the neighbours `j`, with `E = P * min(k, P - 1)`.
///
/// # Errors
/// [`Error::Data`] naming the first row with a NaN/Inf coordinate, or if `P` exceeds `u32::MAX`.
pub fn knn_edges(points: &[[f64; 2]], k: usize) -> Result<Vec<i64>> {
    let n = points.len();
    if let Some(row) = points
        .iter()
        .position(|p| !(p[0].is_finite() && p[1].is_finite()))
    {
        return Err(Error::Data(format!(
            "coordinate row {row} is not finite ({}, {})",
            points[row][0], points[row][1]
        )));
    }
    if n > u32::MAX as usize {
        return Err(Error::Data(format!(
            "too many patches for a k-NN graph: {n}"
        )));
    }
    let kk = k.min(n.saturating_sub(1));
    let e = n * kk;
    let mut out = vec![0i64; 2 * e];
    if kk == 0 {
        return Ok(out);
    }
    let grid = Grid::build(points, (kk / 2).max(2));
    let (src, dst) = out.split_at_mut(e);
    let mut best = Best {
        k: kk,
        items: Vec::with_capacity(kk + 1),
    };
    // Queries in cell order, so neighbouring queries scan the same (cached) cells.
    for cy in 0..grid.ny {
        for cx in 0..grid.nx {
            let c = cy * grid.nx + cx;
            for t in grid.starts[c]..grid.starts[c + 1] {
                let (px, py, i) = (grid.xs[t], grid.ys[t], grid.ids[t]);
                best.items.clear();
                let mut r = 0;
                loop {
                    visit_ring(&grid, px, py, i, cx, cy, r, &mut best);
                    match grid.outside_bound(px, py, cx, cy, r) {
                        None => break,
                        Some(bound) => {
                            // Strict: an unvisited point can neither beat nor tie the k-th best.
                            if best.full() && bound > 0.0 {
                                if let Some(&(worst, _)) = best.items.last() {
                                    if worst < bound * bound {
                                        break;
                                    }
                                }
                            }
                        }
                    }
                    r += 1;
                }
                let base = i as usize * kk;
                for (slot, &(_, j)) in best.items.iter().enumerate() {
                    src[base + slot] = i64::from(i);
                    dst[base + slot] = i64::from(j);
                }
            }
        }
    }
    Ok(out)
}

/// Offer every point of the cells at Chebyshev distance exactly `r` from `(cx, cy)`.
#[allow(clippy::too_many_arguments)]
fn visit_ring(
    grid: &Grid,
    px: f64,
    py: f64,
    i: u32,
    cx: usize,
    cy: usize,
    r: usize,
    best: &mut Best,
) {
    let (cx, cy, r_i) = (cx as isize, cy as isize, r as isize);
    let (nx, ny) = (grid.nx as isize, grid.ny as isize);
    let mut visit_cell = |x: isize, y: isize| {
        if x < 0 || y < 0 || x >= nx || y >= ny {
            return;
        }
        let c = y as usize * grid.nx + x as usize;
        for t in grid.starts[c]..grid.starts[c + 1] {
            let j = grid.ids[t];
            if j == i {
                continue;
            }
            let (dx, dy) = (grid.xs[t] - px, grid.ys[t] - py);
            best.offer(dx * dx + dy * dy, j);
        }
    };
    if r == 0 {
        visit_cell(cx, cy);
        return;
    }
    for x in (cx - r_i)..=(cx + r_i) {
        visit_cell(x, cy - r_i);
        visit_cell(x, cy + r_i);
    }
    for y in (cy - r_i + 1)..=(cy + r_i - 1) {
        visit_cell(cx - r_i, y);
        visit_cell(cx + r_i, y);
    }
}

/// Coordinates as `f64` pairs from a flat `(P, 2)` buffer.
pub fn pairs_from_flat<T: Copy + Into<f64>>(flat: &[T]) -> Vec<[f64; 2]> {
    flat.chunks_exact(2)
        .map(|c| [c[0].into(), c[1].into()])
        .collect()
}

/// Coordinates as `f64` pairs from a flat `(P, 2)` int64 buffer (exact for |v| < 2^53).
pub fn pairs_from_i64(flat: &[i64]) -> Vec<[f64; 2]> {
    flat.chunks_exact(2)
        .map(|c| [c[0] as f64, c[1] as f64])
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::subsample::Rng;

    /// Oracle: sort all other points by (squared distance, index).
    fn brute(points: &[[f64; 2]], k: usize) -> Vec<i64> {
        let n = points.len();
        let kk = k.min(n.saturating_sub(1));
        let mut src = Vec::new();
        let mut dst = Vec::new();
        for i in 0..n {
            let mut all: Vec<(f64, usize)> = (0..n)
                .filter(|&j| j != i)
                .map(|j| {
                    let dx = points[j][0] - points[i][0];
                    let dy = points[j][1] - points[i][1];
                    (dx * dx + dy * dy, j)
                })
                .collect();
            all.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
            for &(_, j) in all.iter().take(kk) {
                src.push(i as i64);
                dst.push(j as i64);
            }
        }
        src.extend(dst);
        src
    }

    fn random_points(n: usize, seed: u64, scale: f64) -> Vec<[f64; 2]> {
        let mut r = Rng::new(seed);
        (0..n)
            .map(|_| {
                [
                    (r.next_u64() >> 11) as f64 / (1u64 << 53) as f64 * scale,
                    (r.next_u64() >> 11) as f64 / (1u64 << 53) as f64 * scale,
                ]
            })
            .collect()
    }

    #[test]
    fn tiny_bags() {
        assert!(knn_edges(&[], 8).unwrap().is_empty());
        assert!(knn_edges(&[[3.0, 4.0]], 8).unwrap().is_empty());
        assert_eq!(
            knn_edges(&[[0.0, 0.0], [5.0, 5.0]], 8).unwrap(),
            vec![0, 1, 1, 0]
        );
        assert!(knn_edges(&[[0.0, 0.0], [1.0, 1.0]], 0).unwrap().is_empty());
    }

    #[test]
    fn hand_computed_line() {
        // Points on a line at x = 0, 1, 3, 6; k = 2.
        let pts = [[0.0, 0.0], [1.0, 0.0], [3.0, 0.0], [6.0, 0.0]];
        let got = knn_edges(&pts, 2).unwrap();
        // 0: 1 (d1), 2 (d3); 1: 0 (d1), 2 (d2); 2: 1 (d2), 0 (d3) vs 3 (d3) -> tie -> 0;
        // 3: 2 (d3), 1 (d5).
        assert_eq!(got, vec![0, 0, 1, 1, 2, 2, 3, 3, 1, 2, 0, 2, 1, 0, 2, 1]);
    }

    #[test]
    fn matches_brute_force_random_floats() {
        for (n, k, seed) in [
            (50, 8, 1),
            (300, 8, 2),
            (1000, 8, 3),
            (200, 30, 4),
            (17, 16, 5),
        ] {
            let pts = random_points(n, seed, 1000.0);
            assert_eq!(knn_edges(&pts, k).unwrap(), brute(&pts, k), "n={n} k={k}");
        }
    }

    #[test]
    fn matches_brute_force_on_grid_with_ties() {
        // A patch grid with spacing 256 inside a ragged blob, plus duplicated points.
        let mut pts = Vec::new();
        for y in 0..30 {
            for x in 0..40 {
                if (x * 7 + y * 3) % 5 != 0 {
                    pts.push([(x * 256) as f64, (y * 256) as f64]);
                }
            }
        }
        pts.push([256.0, 256.0]);
        pts.push([256.0, 256.0]);
        pts.push([0.0, 0.0]);
        for k in [1, 4, 8, 12] {
            assert_eq!(knn_edges(&pts, k).unwrap(), brute(&pts, k), "k={k}");
        }
    }

    #[test]
    fn k_larger_than_bag_and_degenerate_layouts() {
        let same = vec![[5.0, 5.0]; 6];
        assert_eq!(knn_edges(&same, 10).unwrap(), brute(&same, 10));
        let line: Vec<[f64; 2]> = (0..40).map(|i| [0.0, (i % 7) as f64]).collect();
        assert_eq!(knn_edges(&line, 8).unwrap(), brute(&line, 8));
        let pts = random_points(9, 8, 1.0);
        assert_eq!(knn_edges(&pts, 100).unwrap(), brute(&pts, 100));
        // Far-apart clusters: the grid is mostly empty.
        let mut two = random_points(30, 9, 1.0);
        two.extend(
            random_points(30, 10, 1.0)
                .iter()
                .map(|p| [p[0] + 1e6, p[1] - 1e6]),
        );
        assert_eq!(knn_edges(&two, 8).unwrap(), brute(&two, 8));
    }

    #[test]
    fn fuzz_against_brute_force() {
        let mut r = Rng::new(99);
        for case in 0..300 {
            let n = 1 + r.below(80) as usize;
            let k = r.below(12) as usize;
            let kind = case % 4;
            let offset = [0.0, -5e5, 1e6, 123.456][r.below(4) as usize];
            let pts: Vec<[f64; 2]> = (0..n)
                .map(|_| match kind {
                    // Small integer grid: many ties and duplicates.
                    0 => [
                        r.below(6) as f64 * 256.0 + offset,
                        r.below(5) as f64 * 256.0,
                    ],
                    // Thin strip.
                    1 => [offset, r.below(40) as f64],
                    // Two clusters far apart.
                    2 => {
                        let far = if r.below(2) == 0 { 0.0 } else { 1e5 };
                        [
                            r.below(1000) as f64 / 7.0 + far + offset,
                            r.below(1000) as f64 / 3.0,
                        ]
                    }
                    // Continuous.
                    _ => [
                        (r.next_u64() >> 11) as f64 / (1u64 << 53) as f64 * 50.0 + offset,
                        (r.next_u64() >> 11) as f64 / (1u64 << 53) as f64 * 50.0,
                    ],
                })
                .collect();
            assert_eq!(
                knn_edges(&pts, k).unwrap(),
                brute(&pts, k),
                "case {case} n={n} k={k}"
            );
        }
    }

    #[test]
    fn rejects_non_finite() {
        let err = knn_edges(&[[0.0, 0.0], [f64::NAN, 1.0]], 1).unwrap_err();
        assert!(
            matches!(err, Error::Data(ref m) if m.contains("row 1")),
            "{err:?}"
        );
    }

    #[test]
    fn edge_count_formula() {
        assert_eq!(edge_count(0, 8), 0);
        assert_eq!(edge_count(1, 8), 0);
        assert_eq!(edge_count(5, 8), 20);
        assert_eq!(edge_count(100, 8), 800);
    }
}
