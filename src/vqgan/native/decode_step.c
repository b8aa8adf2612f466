/* One KV-cached GPT sampling step on the CPU: token embedding, every block (LayerNorm, fused q/k/v product,
 * attention of the new position over the cached ones, output projection, GELU MLP, residuals), the final
 * LayerNorm and the logits, in one call.
 *
 * Why: at a handful of batch rows a step is bound by streaming the weights (and the cached keys and values)
 * from memory. MKL's generic kernels (what it runs on AMD CPUs) and a hundred small PyTorch ops per step reach
 * a fraction of that bandwidth; here every weight is read once per step for all rows, from a layout packed for
 * it, and the threads (PyTorch's OpenMP threads where the compiler has OpenMP) meet at spin barriers between
 * the phases. The arithmetic is PyTorch's (float32, erf GELU, biased-variance LayerNorm, softmax scaled by
 * 1/sqrt(head_dim)); only the order of the additions differs. Written with GCC vector extensions (GCC, Clang),
 * so it builds for any architecture; vqgan.native compiles it for the host CPU.
 */
#include <math.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#ifndef _OPENMP
#include <pthread.h>
#endif
#include <stdint.h>
#include <string.h>

typedef float v8 __attribute__((vector_size(32)));

typedef struct { /* the w_ matrices packed by vqgan_pack */
    const float *w_qkv, *b_qkv, *w_proj, *b_proj, *ln1_w, *ln1_b, *ln2_w, *ln2_b, *w_fc1, *b_fc1, *w_fc2, *b_fc2;
    float *keys, *values; /* (batch, n_head, capacity, head_dim), the new position is written at `pos` */
} Layer;

typedef struct {
    int32_t n_layer, n_head, n_embd, hidden, vocab, capacity;
    float eps;
    const float *tok_emb, *pos_emb, *lnf_w, *lnf_b, *head; /* head: packed (vocab, n_embd), no bias */
    const Layer *layers;
} Model;

typedef struct {
    const Model *m;
    const int64_t *idx;
    int batch, pos, n_threads;
    float *logits;
    float *x, *h, *qkv, *y, *mlp; /* scratch: (batch, C), (batch, C), (batch, 3C), (batch, C), (batch, hidden) */
    int count, sense;             /* the barrier */
    int go;                       /* set once n_threads is final (pthreads) */
} Step;

enum { STORE, ADD, GELU };

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

static void barrier(Step *s, int *local_sense) {
    if (s->n_threads == 1) return;
    *local_sense = !*local_sense;
    if (__atomic_add_fetch(&s->count, 1, __ATOMIC_ACQ_REL) == s->n_threads) {
        __atomic_store_n(&s->count, 0, __ATOMIC_RELAXED);
        __atomic_store_n(&s->sense, *local_sense, __ATOMIC_RELEASE);
    } else {
        while (__atomic_load_n(&s->sense, __ATOMIC_ACQUIRE) != *local_sense) cpu_relax();
    }
}

static inline v8 load8(const float *p) {
    v8 v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline float sum8(v8 v) {
    return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
}

static inline float gelu(float v) { return 0.5f * v * (1.0f + erff(v * 0.70710678118654752440f)); }

static inline void finish(float *out, float v, int mode) {
    if (mode == ADD) *out += v;
    else if (mode == GELU) *out = gelu(v);
    else *out = v;
}

/* Weights are packed once into panels of 16 output rows stored k-major (panel p, input i: 16 floats), so the
 * product streams each panel front to back, a cache line per step of i, broadcasting one input value per row:
 * streamed this way the weights arrive 2-3x faster than read row by row. The last panel is padded with zeros. */
#define PANEL 16

void vqgan_pack(const float *w, int n, int k, float *out) {
    int panels = (n + PANEL - 1) / PANEL;
    for (int p = 0; p < panels; p++)
        for (int i = 0; i < k; i++)
            for (int j = 0; j < PANEL; j++) {
                int row = p * PANEL + j;
                out[((size_t)p * k + i) * PANEL + j] = row < n ? w[(size_t)row * k + i] : 0.0f;
            }
}

/* Panels p0..p1-1 of out (rows x n, row stride ldo) = x @ W^T + b for the `rows` rows of x (rows x k,
 * contiguous), four rows at a time: eight accumulators stay in registers. */
static void matmul(const float *x, int rows, int k, const float *packed, const float *b, int n, float *out, int ldo,
                   int p0, int p1, int mode) {
    for (int p = p0; p < p1; p++) {
        const float *panel = packed + (size_t)p * k * PANEL;
        int col = p * PANEL, width = n - col < PANEL ? n - col : PANEL;
        for (int r = 0; r < rows; r += 4) {
            const float *x0 = x + (size_t)r * k;
            const float *x1 = x + (size_t)(r + 1 < rows ? r + 1 : r) * k;
            const float *x2 = x + (size_t)(r + 2 < rows ? r + 2 : r) * k;
            const float *x3 = x + (size_t)(r + 3 < rows ? r + 3 : r) * k;
            v8 a00 = {0}, a01 = {0}, a10 = {0}, a11 = {0}, a20 = {0}, a21 = {0}, a30 = {0}, a31 = {0};
            for (int i = 0; i < k; i++) {
                __builtin_prefetch(panel + (size_t)(i + 64) * PANEL);
                v8 lo = load8(panel + (size_t)i * PANEL), hi = load8(panel + (size_t)i * PANEL + 8);
                a00 += x0[i] * lo; a01 += x0[i] * hi;
                a10 += x1[i] * lo; a11 += x1[i] * hi;
                a20 += x2[i] * lo; a21 += x2[i] * hi;
                a30 += x3[i] * lo; a31 += x3[i] * hi;
            }
            v8 acc[4][2] = {{a00, a01}, {a10, a11}, {a20, a21}, {a30, a31}};
            for (int j = 0; j < 4 && r + j < rows; j++)
                for (int c = 0; c < width; c++)
                    finish(out + (size_t)(r + j) * ldo + col + c, acc[j][c / 8][c % 8] + (b ? b[col + c] : 0.0f), mode);
        }
    }
}

static int panels(int n) { return (n + PANEL - 1) / PANEL; }

static void layer_norm(const float *x, const float *w, const float *b, float eps, int c, float *out) {
    float mean = 0.0f, var = 0.0f;
    for (int i = 0; i < c; i++) mean += x[i];
    mean /= c;
    for (int i = 0; i < c; i++) var += (x[i] - mean) * (x[i] - mean);
    float rstd = 1.0f / sqrtf(var / c + eps);
    for (int i = 0; i < c; i++) out[i] = (x[i] - mean) * rstd * w[i] + b[i];
}

/* This thread's share [lo, hi) of n items. */
static void share(int n, int tid, int n_threads, int *lo, int *hi) {
    *lo = (int)((int64_t)n * tid / n_threads);
    *hi = (int)((int64_t)n * (tid + 1) / n_threads);
}

static inline float dot(const float *restrict a, const float *restrict b, int n) {
    v8 acc = {0};
    int i = 0;
    for (; i + 8 <= n; i += 8) acc += load8(a + i) * load8(b + i);
    float total = sum8(acc);
    for (; i < n; i++) total += a[i] * b[i];
    return total;
}

/* Attention of the new position of (batch row, head) `bh` over the cached positions 0..pos, after writing its
 * own key and value at pos. `scores` has room for `capacity` floats, `acc` for head_dim. */
static void attend(Step *s, const Layer *L, int bh, float *restrict scores, float *restrict acc) {
    const Model *m = s->m;
    int c = m->n_embd, d = c / m->n_head, b = bh / m->n_head, head = bh % m->n_head, pos = s->pos;
    size_t base = (size_t)bh * m->capacity * d;
    float *keys = L->keys + base, *values = L->values + base;
    const float *q = s->qkv + (size_t)b * 3 * c + head * d;
    memcpy(keys + (size_t)pos * d, q + c, d * sizeof(float));
    memcpy(values + (size_t)pos * d, q + 2 * c, d * sizeof(float));
    float scale = 1.0f / sqrtf((float)d), top = -INFINITY, total = 0.0f;
    for (int t = 0; t <= pos; t++) {
        scores[t] = dot(q, keys + (size_t)t * d, d) * scale;
        if (scores[t] > top) top = scores[t];
    }
    for (int t = 0; t <= pos; t++) total += (scores[t] = expf(scores[t] - top));
    for (int i = 0; i < d; i++) acc[i] = 0.0f;
    for (int t = 0; t <= pos; t++) {
        const float *restrict value = values + (size_t)t * d;
        float p = scores[t];
        for (int i = 0; i < d; i++) acc[i] += p * value[i];
    }
    float *y = s->y + (size_t)b * c + head * d;
    for (int i = 0; i < d; i++) y[i] = acc[i] / total;
}

static void run(Step *s, int tid) {
    const Model *m = s->m;
    int c = m->n_embd, rows = s->batch, nt = s->n_threads, sense = 0, lo, hi;
    float scores[m->capacity], acc[c / m->n_head];
    if (tid == 0)
        for (int r = 0; r < rows; r++) {
            const float *e = m->tok_emb + (size_t)s->idx[r] * c, *p = m->pos_emb + (size_t)s->pos * c;
            for (int i = 0; i < c; i++) s->x[(size_t)r * c + i] = e[i] + p[i];
        }
    for (int l = 0; l < m->n_layer; l++) {
        const Layer *L = &m->layers[l];
        if (tid == 0)
            for (int r = 0; r < rows; r++) layer_norm(s->x + (size_t)r * c, L->ln1_w, L->ln1_b, m->eps, c, s->h + (size_t)r * c);
        barrier(s, &sense);
        share(panels(3 * c), tid, nt, &lo, &hi);
        matmul(s->h, rows, c, L->w_qkv, L->b_qkv, 3 * c, s->qkv, 3 * c, lo, hi, STORE);
        barrier(s, &sense);
        share(rows * m->n_head, tid, nt, &lo, &hi);
        for (int bh = lo; bh < hi; bh++) attend(s, L, bh, scores, acc);
        barrier(s, &sense);
        share(panels(c), tid, nt, &lo, &hi);
        matmul(s->y, rows, c, L->w_proj, L->b_proj, c, s->x, c, lo, hi, ADD);
        barrier(s, &sense);
        if (tid == 0)
            for (int r = 0; r < rows; r++) layer_norm(s->x + (size_t)r * c, L->ln2_w, L->ln2_b, m->eps, c, s->h + (size_t)r * c);
        barrier(s, &sense);
        share(panels(m->hidden), tid, nt, &lo, &hi);
        matmul(s->h, rows, c, L->w_fc1, L->b_fc1, m->hidden, s->mlp, m->hidden, lo, hi, GELU);
        barrier(s, &sense);
        share(panels(c), tid, nt, &lo, &hi);
        matmul(s->mlp, rows, m->hidden, L->w_fc2, L->b_fc2, c, s->x, c, lo, hi, ADD);
        barrier(s, &sense);
    }
    if (tid == 0)
        for (int r = 0; r < rows; r++) layer_norm(s->x + (size_t)r * c, m->lnf_w, m->lnf_b, m->eps, c, s->h + (size_t)r * c);
    barrier(s, &sense);
    share(panels(m->vocab), tid, nt, &lo, &hi);
    matmul(s->h, rows, c, m->head, NULL, m->vocab, s->logits, m->vocab, lo, hi, STORE);
}

#ifndef _OPENMP
typedef struct { Step *s; int tid; } Worker;

static void *worker_main(void *arg) {
    Worker *w = arg;
    while (!__atomic_load_n(&w->s->go, __ATOMIC_ACQUIRE)) cpu_relax();
    run(w->s, w->tid);
    return NULL;
}
#endif

/* logits (batch, vocab) for tokens idx (batch,) at position pos, whose keys and values join the cache.
 * scratch holds batch * (6 * n_embd + hidden) floats. Returns 0, -1 for a token id out of range, -2 for a
 * position past the cache's capacity. */
int vqgan_decode_step(const Model *m, const int64_t *idx, int batch, int pos, float *logits, float *scratch,
                      int n_threads) {
    if (pos < 0 || pos >= m->capacity) return -2;
    for (int r = 0; r < batch; r++)
        if (idx[r] < 0 || idx[r] >= m->vocab) return -1;
    int c = m->n_embd;
    Step s = {m, idx, batch, pos, n_threads < 1 ? 1 : (n_threads > 64 ? 64 : n_threads), logits,
              scratch, scratch + (size_t)batch * c, scratch + (size_t)batch * 2 * c, scratch + (size_t)batch * 5 * c,
              scratch + (size_t)batch * 6 * c, 0, 0, 0};
#ifdef _OPENMP
    /* PyTorch's own OpenMP threads (the same libgomp.so.1 is loaded once per process): threads of a second
     * pool would spin against them for the same cores between steps. */
#pragma omp parallel num_threads(s.n_threads)
    {
#pragma omp single
        s.n_threads = omp_get_num_threads();
        run(&s, omp_get_thread_num());
    }
#else
    pthread_t threads[64];
    Worker workers[64];
    int started = 1;
    for (; started < s.n_threads; started++) {
        workers[started] = (Worker){&s, started};
        if (pthread_create(&threads[started], NULL, worker_main, &workers[started])) break;
    }
    s.n_threads = started; /* if a thread could not start, the others share its work */
    __atomic_store_n(&s.go, 1, __ATOMIC_RELEASE);
    run(&s, 0);
    for (int t = 1; t < started; t++) pthread_join(threads[t], NULL);
#endif
    return 0;
}
