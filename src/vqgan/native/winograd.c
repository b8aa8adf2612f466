/* The data transforms of Winograd's F(4x4, 3x3) convolution, for 3x3 stride-1 "same" convolutions on the CPU
 * (float32, NCHW). The products in between are batched matrix products PyTorch runs (winograd.py).
 *
 * Why: a 3x3 convolution computes each 4x4 output tile from a 6x6 input tile with 144 multiplies per channel
 * pair directly, 36 in the Winograd domain: the channel-mixing work becomes 36 matrix products of a quarter
 * the size. What it costs is these transforms, a few passes over memory, which is why they are fused here.
 *
 *   forward:  V = B' d B per 6x6 input tile d (input),   M = U V (PyTorch),   y = A' m A per tile (output)
 *   backward: dM = A dy A' per 4x4 output tile (output_adjoint), for the weight gradient dU = dM V'
 *
 * Layouts: a tile row is numbered r = n * tiles_h + i; each call handles tile rows [first, last), so the caller
 * can go through an image in pieces whose transforms stay in cache. V and M are (36, channels, tiles) with tile
 * t = (r - first) * tiles_w + j, their 36 planes `plane` floats apart: the caller pads that so that the 36
 * streams each pass reads or writes do not fall on the same cache sets (4 KiB apart, they thrash). Tile (i, j) covers output rows 4i..4i+3 and columns 4j..4j+3, its input rows
 * 4i-1..4i+4 (zero padding outside the image). Eight neighbouring tiles of one row go through together, one per
 * vector lane, gathered from and scattered to image rows by shuffles. GCC vector extensions (GCC, Clang),
 * any architecture; threads are OpenMP threads where the compiler has it.
 */
#include <stdint.h>
#include <string.h>

typedef float v8 __attribute__((vector_size(32)));
enum { LANES = 8 };

static inline v8 load8(const float *p) {
    v8 v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline void store8(float *p, v8 v) { memcpy(p, &v, sizeof v); }

/* Stores the first `n` lanes of v at p. */
static inline void store_lanes(float *p, v8 v, int n) {
    if (n == LANES) {
        store8(p, v);
        return;
    }
    float tmp[LANES];
    memcpy(tmp, &v, sizeof tmp);
    memcpy(p, tmp, (size_t)n * sizeof(float));
}

static inline v8 load_lanes(const float *p, int n) {
    if (n == LANES) return load8(p);
    float tmp[LANES] = {0};
    memcpy(tmp, p, (size_t)n * sizeof(float));
    return load8(tmp);
}

/* B' applied to six values: the input transform along one axis */
static inline void input_1d(const v8 d[6], v8 out[6]) {
    out[0] = 4.0f * d[0] - 5.0f * d[2] + d[4];
    out[1] = d[3] + d[4] - 4.0f * (d[1] + d[2]);
    out[2] = 4.0f * (d[1] - d[2]) - d[3] + d[4];
    out[3] = 2.0f * (d[3] - d[1]) - d[2] + d[4];
    out[4] = 2.0f * (d[1] - d[3]) - d[2] + d[4];
    out[5] = 4.0f * d[1] - 5.0f * d[3] + d[5];
}

/* A' applied to six values: the output transform along one axis */
static inline void output_1d(const v8 m[6], v8 out[4]) {
    const v8 p12 = m[1] + m[2], m12 = m[1] - m[2], p34 = m[3] + m[4], m34 = m[3] - m[4];
    out[0] = m[0] + p12 + p34;
    out[1] = m12 + 2.0f * m34;
    out[2] = p12 + 4.0f * p34;
    out[3] = m12 + 8.0f * m34 + m[5];
}

/* A applied to four values: the adjoint of the output transform along one axis */
static inline void adjoint_1d(const v8 y[4], v8 out[6]) {
    const v8 p02 = y[0] + y[2], p13 = y[1] + y[3];
    const v8 q02 = y[0] + 4.0f * y[2], q13 = 2.0f * y[1] + 8.0f * y[3];
    out[0] = y[0];
    out[1] = p02 + p13;
    out[2] = p02 - p13;
    out[3] = q02 + q13;
    out[4] = q02 - q13;
    out[5] = y[3];
}

/* The 4x8 <-> 8x4 transposes between eight 4-float groups in a row (q0 = groups 0-1, ..., q3 = groups 6-7) and
 * four vectors of one element from each group, in the shapes that map to single AVX instructions: 128-bit
 * half swaps (vperm2f128), then in-half unpacks and moves. */
#if defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 12 && !defined(VQGAN_GCC_SHUFFLE))
#define SHUF(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else /* GCC before 12 */
typedef int32_t v8i __attribute__((vector_size(32)));
#define SHUF(a, b, ...) __builtin_shuffle(a, b, (v8i){__VA_ARGS__})
#endif

static inline void deinterleave4(v8 q0, v8 q1, v8 q2, v8 q3, v8 out[4]) {
    const v8 t0 = SHUF(q0, q2, 0, 1, 2, 3, 8, 9, 10, 11), t1 = SHUF(q0, q2, 4, 5, 6, 7, 12, 13, 14, 15);
    const v8 t2 = SHUF(q1, q3, 0, 1, 2, 3, 8, 9, 10, 11), t3 = SHUF(q1, q3, 4, 5, 6, 7, 12, 13, 14, 15);
    const v8 u0 = SHUF(t0, t1, 0, 8, 1, 9, 4, 12, 5, 13), u1 = SHUF(t0, t1, 2, 10, 3, 11, 6, 14, 7, 15);
    const v8 u2 = SHUF(t2, t3, 0, 8, 1, 9, 4, 12, 5, 13), u3 = SHUF(t2, t3, 2, 10, 3, 11, 6, 14, 7, 15);
    out[0] = SHUF(u0, u2, 0, 1, 8, 9, 4, 5, 12, 13);
    out[1] = SHUF(u0, u2, 2, 3, 10, 11, 6, 7, 14, 15);
    out[2] = SHUF(u1, u3, 0, 1, 8, 9, 4, 5, 12, 13);
    out[3] = SHUF(u1, u3, 2, 3, 10, 11, 6, 7, 14, 15);
}

/* d[s] lane k = p[4k + s] for s < 4 */
static inline void gather4(const float *p, v8 d[4]) {
    deinterleave4(load8(p), load8(p + 8), load8(p + 16), load8(p + 24), d);
}

/* d[s] lane k = p[4k + s] for s < 6: the six columns of eight overlapping 6-wide windows, 4 apart */
static inline void gather6(const float *p, v8 d[6]) {
    gather4(p, d);
    /* columns 4 and 5 are columns 0 and 1 one window on: shift a lane down, the last from p[32], p[33] */
    const v8 next0 = {p[32], p[32], p[32], p[32], p[32], p[32], p[32], p[32]};
    const v8 next1 = {p[33], p[33], p[33], p[33], p[33], p[33], p[33], p[33]};
    d[4] = SHUF(d[0], next0, 1, 2, 3, 4, 5, 6, 7, 8);
    d[5] = SHUF(d[1], next1, 1, 2, 3, 4, 5, 6, 7, 8);
}

/* p[4k + b] = t[b] lane k: the inverse of gather4 */
static inline void scatter4(float *p, const v8 t[4]) {
    const v8 u0 = SHUF(t[0], t[1], 0, 8, 1, 9, 4, 12, 5, 13), u1 = SHUF(t[0], t[1], 2, 10, 3, 11, 6, 14, 7, 15);
    const v8 u2 = SHUF(t[2], t[3], 0, 8, 1, 9, 4, 12, 5, 13), u3 = SHUF(t[2], t[3], 2, 10, 3, 11, 6, 14, 7, 15);
    /* in each half: rows of groups (0, 1, 2, 3) below, (4, 5, 6, 7) above */
    const v8 g0 = SHUF(u0, u2, 0, 1, 8, 9, 4, 5, 12, 13), g1 = SHUF(u0, u2, 2, 3, 10, 11, 6, 7, 14, 15);
    const v8 g2 = SHUF(u1, u3, 0, 1, 8, 9, 4, 5, 12, 13), g3 = SHUF(u1, u3, 2, 3, 10, 11, 6, 7, 14, 15);
    store8(p, SHUF(g0, g1, 0, 1, 2, 3, 8, 9, 10, 11));
    store8(p + 8, SHUF(g2, g3, 0, 1, 2, 3, 8, 9, 10, 11));
    store8(p + 16, SHUF(g0, g1, 4, 5, 6, 7, 12, 13, 14, 15));
    store8(p + 24, SHUF(g2, g3, 4, 5, 6, 7, 12, 13, 14, 15));
}

/* The `count` values of a row from column `col` on, zero where outside [0, width): edge tiles go through this */
static inline void copy_padded(float *dst, const float *line, int64_t col, int64_t width, int count) {
    const int64_t lo = col < 0 ? 0 : col, hi = col + count < width ? col + count : width;
    memset(dst, 0, (size_t)count * sizeof(float));
    if (hi > lo) memcpy(dst + (lo - col), line + lo, (size_t)(hi - lo) * sizeof(float));
}

/* V (36, C, T) from x (N, C, H, W) for tile rows [first, last) */
int vqgan_winograd_input(const float *x, float *v, int64_t channels, int64_t height, int64_t width, int64_t tiles_h,
                         int64_t tiles_w, int64_t first, int64_t last, int64_t plane, int n_threads) {
    const int64_t tiles = (last - first) * tiles_w;
#pragma omp parallel for collapse(2) num_threads(n_threads) schedule(static)
    for (int64_t c = 0; c < channels; c++)
        for (int64_t row = first; row < last; row++) {
            const int64_t i = row % tiles_h, n = row / tiles_h;
            const float *image = x + (n * channels + c) * height * width;
            float *out = v + c * tiles + (row - first) * tiles_w;
            for (int64_t j0 = 0; j0 < tiles_w; j0 += LANES) {
                const int lanes = tiles_w - j0 < LANES ? (int)(tiles_w - j0) : LANES;
                const int64_t left = 4 * j0 - 1; /* 4 * LANES + 2 columns from here: 36 */
                const int inside = left >= 0 && left + 36 <= width;
                v8 cols[6][6]; /* [a][s]: B' down each column s of the tile */
                v8 d[6][6];    /* [r][s] */
                for (int r = 0; r < 6; r++) {
                    const int64_t y = 4 * i - 1 + r;
                    if (y < 0 || y >= height) {
                        for (int s = 0; s < 6; s++) d[r][s] = (v8){0};
                    } else if (inside) {
                        gather6(image + y * width + left, d[r]);
                    } else {
                        float line[36];
                        copy_padded(line, image + y * width, left, width, 36);
                        gather6(line, d[r]);
                    }
                }
                for (int s = 0; s < 6; s++) {
                    v8 col[6], t[6];
                    for (int r = 0; r < 6; r++) col[r] = d[r][s];
                    input_1d(col, t);
                    for (int a = 0; a < 6; a++) cols[a][s] = t[a];
                }
                for (int a = 0; a < 6; a++) {
                    v8 t[6];
                    input_1d(cols[a], t);
                    for (int b = 0; b < 6; b++) store_lanes(out + (a * 6 + b) * plane + j0, t[b], lanes);
                }
            }
        }
    return 0;
}

/* y (N, C, H, W) = A' m A per tile of M (36, C, T), plus the channel's bias when given, for tile rows [first, last) */
int vqgan_winograd_output(const float *m, float *y, const float *bias, int64_t channels, int64_t height,
                          int64_t width, int64_t tiles_h, int64_t tiles_w, int64_t first, int64_t last,
                          int64_t plane, int n_threads) {
    const int64_t tiles = (last - first) * tiles_w;
#pragma omp parallel for collapse(2) num_threads(n_threads) schedule(static)
    for (int64_t c = 0; c < channels; c++)
        for (int64_t row = first; row < last; row++) {
            const int64_t i = row % tiles_h, n = row / tiles_h;
            float *image = y + (n * channels + c) * height * width;
            const float *in = m + c * tiles + (row - first) * tiles_w;
            const float b0 = bias ? bias[c] : 0.0f;
            for (int64_t j0 = 0; j0 < tiles_w; j0 += LANES) {
                const int lanes = tiles_w - j0 < LANES ? (int)(tiles_w - j0) : LANES;
                v8 half[4][6]; /* [a][eta]: A' along the first axis */
                for (int eta = 0; eta < 6; eta++) {
                    v8 col[6], t[4];
                    for (int xi = 0; xi < 6; xi++) col[xi] = load_lanes(in + (xi * 6 + eta) * plane + j0, lanes);
                    output_1d(col, t);
                    for (int a = 0; a < 4; a++) half[a][eta] = t[a];
                }
                const int64_t left = 4 * j0;
                const int inside = left + 4 * LANES <= width;
                for (int a = 0; a < 4 && 4 * i + a < height; a++) {
                    v8 t[4];
                    output_1d(half[a], t);
                    for (int b = 0; b < 4; b++) t[b] += b0;
                    float *line = image + (4 * i + a) * width + left;
                    if (inside) {
                        scatter4(line, t);
                    } else {
                        float tmp[4 * LANES];
                        scatter4(tmp, t);
                        memcpy(line, tmp, (size_t)(width - left) * sizeof(float));
                    }
                }
            }
        }
    return 0;
}

/* dM (36, C, T) = A dy A' per 4x4 tile of dy (N, C, H, W), zero beyond the image, for tile rows [first, last):
 * the gradient of M given the output's, which the weight gradient dU = dM V' needs */
int vqgan_winograd_output_adjoint(const float *dy, float *dm, int64_t channels, int64_t height, int64_t width,
                                  int64_t tiles_h, int64_t tiles_w, int64_t first, int64_t last, int64_t plane, int n_threads) {
    const int64_t tiles = (last - first) * tiles_w;
#pragma omp parallel for collapse(2) num_threads(n_threads) schedule(static)
    for (int64_t c = 0; c < channels; c++)
        for (int64_t row = first; row < last; row++) {
            const int64_t i = row % tiles_h, n = row / tiles_h;
            const float *image = dy + (n * channels + c) * height * width;
            float *out = dm + c * tiles + (row - first) * tiles_w;
            for (int64_t j0 = 0; j0 < tiles_w; j0 += LANES) {
                const int lanes = tiles_w - j0 < LANES ? (int)(tiles_w - j0) : LANES;
                const int64_t left = 4 * j0;
                const int inside = left + 4 * LANES <= width;
                v8 d[4][4]; /* [a][b] */
                for (int a = 0; a < 4; a++) {
                    const int64_t yy = 4 * i + a;
                    if (yy >= height) {
                        for (int b = 0; b < 4; b++) d[a][b] = (v8){0};
                    } else if (inside) {
                        gather4(image + yy * width + left, d[a]);
                    } else {
                        float line[4 * LANES];
                        copy_padded(line, image + yy * width, left, width, 4 * LANES);
                        gather4(line, d[a]);
                    }
                }
                v8 half[6][4]; /* [xi][b]: A along the first axis */
                for (int b = 0; b < 4; b++) {
                    v8 col[4], t[6];
                    for (int a = 0; a < 4; a++) col[a] = d[a][b];
                    adjoint_1d(col, t);
                    for (int xi = 0; xi < 6; xi++) half[xi][b] = t[xi];
                }
                for (int xi = 0; xi < 6; xi++) {
                    v8 t[6];
                    adjoint_1d(half[xi], t);
                    for (int eta = 0; eta < 6; eta++) store_lanes(out + (xi * 6 + eta) * plane + j0, t[eta], lanes);
                }
            }
        }
    return 0;
}

/* G applied to three values: the filter transform along one axis */
static inline void filter_1d(const v8 w[3], v8 out[6]) {
    const v8 p02 = w[0] + w[2];
    out[0] = 0.25f * w[0];
    out[1] = -(p02 + w[1]) * (1.0f / 6);
    out[2] = (w[1] - p02) * (1.0f / 6);
    out[3] = (1.0f / 24) * w[0] + (1.0f / 12) * w[1] + (1.0f / 6) * w[2];
    out[4] = (1.0f / 24) * w[0] - (1.0f / 12) * w[1] + (1.0f / 6) * w[2];
    out[5] = w[2];
}

/* G' applied to six values: the adjoint of the filter transform along one axis */
static inline void filter_adjoint_1d(const v8 u[6], v8 out[3]) {
    const v8 p34 = u[3] + u[4], m34 = u[3] - u[4];
    out[0] = 0.25f * u[0] - (1.0f / 6) * (u[1] + u[2]) + (1.0f / 24) * p34;
    out[1] = (1.0f / 6) * (u[2] - u[1]) + (1.0f / 12) * m34;
    out[2] = (1.0f / 6) * (p34 - u[1] - u[2]) + u[5];
}

/* U (36, out, in) = G w G' per filter of w (out, in, 3, 3); with `flip`, U (36, in, out) of the flipped,
 * transposed filters w'[i][o][r][s] = w[o][i][2-r][2-s], which turn the input gradient into a convolution */
int vqgan_winograd_weight(const float *w, float *u, int64_t out_channels, int64_t in_channels, int flip,
                          int n_threads) {
    const int64_t filters = out_channels * in_channels;
    const int64_t rows = flip ? in_channels : out_channels, cols = flip ? out_channels : in_channels;
#pragma omp parallel for num_threads(n_threads) schedule(static)
    for (int64_t row = 0; row < rows; row++)
        for (int64_t k0 = 0; k0 < cols; k0 += LANES) {
            const int lanes = cols - k0 < LANES ? (int)(cols - k0) : LANES;
            float taps[9][LANES] = {{0}};
            for (int k = 0; k < lanes; k++) {
                const float *f = flip ? w + ((k0 + k) * in_channels + row) * 9 : w + (row * in_channels + k0 + k) * 9;
                for (int q = 0; q < 9; q++) taps[q][k] = f[flip ? 8 - q : q];
            }
            v8 half[6][3]; /* [a][s]: G down each column s */
            for (int s = 0; s < 3; s++) {
                v8 col[3] = {load8(taps[s]), load8(taps[3 + s]), load8(taps[6 + s])}, t[6];
                filter_1d(col, t);
                for (int a = 0; a < 6; a++) half[a][s] = t[a];
            }
            for (int a = 0; a < 6; a++) {
                v8 t[6];
                filter_1d(half[a], t);
                for (int b = 0; b < 6; b++) store_lanes(u + (a * 6 + b) * filters + row * cols + k0, t[b], lanes);
            }
        }
    return 0;
}

/* dw (out, in, 3, 3) = G' dU G per filter of dU (36, out, in): the weight gradient from the transformed one's */
int vqgan_winograd_weight_adjoint(const float *du, float *dw, int64_t filters, int n_threads) {
#pragma omp parallel for num_threads(n_threads) schedule(static)
    for (int64_t p0 = 0; p0 < filters; p0 += LANES) {
        const int lanes = filters - p0 < LANES ? (int)(filters - p0) : LANES;
        v8 half[3][6]; /* [r][b]: G' along the first axis */
        for (int b = 0; b < 6; b++) {
            v8 col[6], t[3];
            for (int a = 0; a < 6; a++) col[a] = load_lanes(du + (a * 6 + b) * filters + p0, lanes);
            filter_adjoint_1d(col, t);
            for (int r = 0; r < 3; r++) half[r][b] = t[r];
        }
        float taps[9][LANES];
        for (int r = 0; r < 3; r++) {
            v8 t[3];
            filter_adjoint_1d(half[r], t);
            for (int s = 0; s < 3; s++) store8(taps[r * 3 + s], t[s]);
        }
        for (int k = 0; k < lanes; k++)
            for (int q = 0; q < 9; q++) dw[(p0 + k) * 9 + q] = taps[q][k];
    }
    return 0;
}

/* Channels-last (NHWC) versions, for inference: eight channels of one pixel are one vector, so a tile's 36
 * values load and store whole, no shuffles. V and M are (36, tiles, channels), planes `plane` floats apart. */

/* V (36, T, C) from x (N, H, W, C) for tile rows [first, last) */
int vqgan_winograd_input_nhwc(const float *x, float *v, int64_t channels, int64_t height, int64_t width,
                              int64_t tiles_h, int64_t tiles_w, int64_t first, int64_t last, int64_t plane,
                              int n_threads) {
    const int64_t tiles = (last - first) * tiles_w;
#pragma omp parallel for num_threads(n_threads) schedule(static)
    for (int64_t t = 0; t < tiles; t++) {
        const int64_t row = first + t / tiles_w, j = t % tiles_w, i = row % tiles_h, n = row / tiles_h;
        const float *image = x + n * height * width * channels;
        for (int64_t c0 = 0; c0 < channels; c0 += LANES) {
            const int lanes = channels - c0 < LANES ? (int)(channels - c0) : LANES;
            v8 half[6][6]; /* [a][s]: B' down each column s */
            for (int s = 0; s < 6; s++) {
                const int64_t col = 4 * j - 1 + s;
                v8 d[6], out[6];
                for (int r = 0; r < 6; r++) {
                    const int64_t y = 4 * i - 1 + r;
                    d[r] = (y >= 0 && y < height && col >= 0 && col < width)
                               ? load_lanes(image + (y * width + col) * channels + c0, lanes)
                               : (v8){0};
                }
                input_1d(d, out);
                for (int a = 0; a < 6; a++) half[a][s] = out[a];
            }
            for (int a = 0; a < 6; a++) {
                v8 out[6];
                input_1d(half[a], out);
                for (int b = 0; b < 6; b++) store_lanes(v + (a * 6 + b) * plane + t * channels + c0, out[b], lanes);
            }
        }
    }
    return 0;
}

/* y (N, H, W, C) = A' m A per tile of M (36, T, C), plus the bias when given, for tile rows [first, last) */
int vqgan_winograd_output_nhwc(const float *m, float *y, const float *bias, int64_t channels, int64_t height,
                               int64_t width, int64_t tiles_h, int64_t tiles_w, int64_t first, int64_t last,
                               int64_t plane, int n_threads) {
    const int64_t tiles = (last - first) * tiles_w;
#pragma omp parallel for num_threads(n_threads) schedule(static)
    for (int64_t t = 0; t < tiles; t++) {
        const int64_t row = first + t / tiles_w, j = t % tiles_w, i = row % tiles_h, n = row / tiles_h;
        float *image = y + n * height * width * channels;
        for (int64_t c0 = 0; c0 < channels; c0 += LANES) {
            const int lanes = channels - c0 < LANES ? (int)(channels - c0) : LANES;
            const v8 b0 = bias ? load_lanes(bias + c0, lanes) : (v8){0};
            v8 half[4][6]; /* [a][eta]: A' along the first axis */
            for (int eta = 0; eta < 6; eta++) {
                v8 col[6], out[4];
                for (int xi = 0; xi < 6; xi++) col[xi] = load_lanes(m + (xi * 6 + eta) * plane + t * channels + c0, lanes);
                output_1d(col, out);
                for (int a = 0; a < 4; a++) half[a][eta] = out[a];
            }
            for (int a = 0; a < 4 && 4 * i + a < height; a++) {
                v8 out[4];
                output_1d(half[a], out);
                for (int b = 0; b < 4 && 4 * j + b < width; b++)
                    store_lanes(image + ((4 * i + a) * width + 4 * j + b) * channels + c0, out[b] + b0, lanes);
            }
        }
    }
    return 0;
}
