/* Compiled kernels for TopK training on a CPU (loaded by sae_nb/training/kernels.py).

   Plain C with a C interface (no torch headers), so compiling takes about a second; the
   Python side hands over tensors' data pointers. Each function splits its rows over
   `threads` POSIX threads, which sleep between calls (no spinning pool beside torch's).

   sae_round_rows:  x (rows, cols) -> bfloat16 (round to nearest even), with each row's norm,
                    the norm of its rounding error and of the rounded row, optionally after
                    subtracting a shift vector.
   sae_screen_topk: the k largest of each row of x @ W^T + bias, given that product in
                    bfloat16 (the screen) and a bound on the screen's error: the candidates
                    are recomputed in float32 and a row is certified when no column left out
                    can beat its k-th value. Rows not certified are reported, not guessed.
   sae_row_topk:    the k largest of each row of a float32 matrix (the float32 encoder's
                    top-k); rows holding NaN or inf, or many ties at the cut, are reported. */

#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

/* Run fn(arg, start, stop) over [0, n) split into `threads` contiguous parts. */
typedef void (*part_fn)(void *arg, int64_t start, int64_t stop);

typedef struct {
    part_fn fn;
    void *arg;
    int64_t start, stop;
} part;

static void *run_part(void *p) {
    part *q = (part *)p;
    q->fn(q->arg, q->start, q->stop);
    return NULL;
}

static void split_rows(part_fn fn, void *arg, int64_t n, int threads) {
    if (threads > 64) threads = 64;
    if (threads < 1 || n < 2 * threads) threads = 1;
    part parts[64];
    pthread_t ids[64];
    int started[64];
    int64_t step = (n + threads - 1) / threads;
    for (int t = 0; t < threads; t++) {
        parts[t].fn = fn;
        parts[t].arg = arg;
        parts[t].start = t * step < n ? t * step : n;
        parts[t].stop = (t + 1) * step < n ? (t + 1) * step : n;
    }
    for (int t = 1; t < threads; t++)
        started[t] = pthread_create(&ids[t], NULL, run_part, &parts[t]) == 0;
    run_part(&parts[0]);
    for (int t = 1; t < threads; t++) {
        if (started[t])
            pthread_join(ids[t], NULL);
        else
            run_part(&parts[t]); /* no thread to be had: run it here */
    }
}

/* ---- rounding to bfloat16 ---- */

static inline float from_bf16(uint16_t h) {
    uint32_t b = (uint32_t)h << 16;
    float f;
    memcpy(&f, &b, 4);
    return f;
}

typedef struct {
    const float *src;
    const float *shift; /* (cols,) or NULL */
    int64_t cols;
    float *shifted; /* (rows, cols) or NULL: src - shift, in float32 */
    uint16_t *dst;
    float *norm, *err, *rounded;
} round_args;

/* One row: d = bfloat16(s - shift) rounded to nearest even (NaN kept NaN), out = s - shift,
   and the three norms, in float32 (their rounding is far inside the slack's margin). */
static void round_row(const float *restrict s, const float *restrict shift, int n,
                      float *restrict out, uint16_t *restrict d, float *norms) {
    float n2 = 0.0f, e2 = 0.0f, d2 = 0.0f;
#pragma omp simd reduction(+ : n2, e2, d2)
    for (int i = 0; i < n; i++) {
        float v = s[i] - shift[i];
        out[i] = v;
        uint32_t b;
        memcpy(&b, &v, 4);
        uint32_t even = (b + 0x7fffu + ((b >> 16) & 1u)) >> 16;
        uint32_t h = (b & 0x7fffffffu) > 0x7f800000u ? ((b >> 16) | 0x40u) : even;
        d[i] = (uint16_t)h;
        float w = from_bf16((uint16_t)h);
        n2 += v * v;
        e2 += (w - v) * (w - v);
        d2 += w * w;
    }
    norms[0] = sqrtf(n2);
    norms[1] = sqrtf(e2);
    norms[2] = sqrtf(d2);
}

static void round_part(void *p, int64_t start, int64_t stop) {
    round_args *a = (round_args *)p;
    int64_t C = a->cols;
    float *zeros = (float *)calloc((size_t)C, sizeof(float));
    float *scratch = a->shifted ? NULL : (float *)malloc(sizeof(float) * (size_t)C);
    for (int64_t r = start; r < stop; r++) {
        float norms[3] = {NAN, NAN, NAN};
        if (zeros && (a->shifted || scratch))
            round_row(a->src + r * C, a->shift ? a->shift : zeros, (int)C,
                      a->shifted ? a->shifted + r * C : scratch, a->dst + r * C, norms);
        a->norm[r] = norms[0]; /* NaN (out of memory) fails every row's certificate */
        a->err[r] = norms[1];
        a->rounded[r] = norms[2];
    }
    free(zeros);
    free(scratch);
}

int sae_round_rows(const float *src, const float *shift, int64_t rows, int64_t cols,
                   float *shifted, uint16_t *dst, float *norm, float *err, float *rounded,
                   int threads) {
    round_args a = {src, shift, cols, shifted, dst, norm, err, rounded};
    split_rows(round_part, &a, rows, threads);
    return 0;
}

/* ---- selection ---- */

/* How many of a[0..n) are >= t (NaN never is). */
static inline int count_ge(const float *a, int n, float t) {
    int c = 0;
#pragma omp simd reduction(+ : c)
    for (int i = 0; i < n; i++) c += a[i] >= t;
    return c;
}

/* A threshold t with at least `want` of a[0..n) >= t, as high as bisection between lo (which
   must have that many) and hi finds in `halvings` steps: with 30, the want-th largest value
   or just below it. Branch-free counting: faster here than a quickselect's unpredictable
   swaps. */
static float at_least(const float *a, int n, int want, float lo, float hi, int halvings) {
    for (int it = 0; it < halvings; it++) {
        float mid = lo + (hi - lo) * 0.5f;
        if (!(mid > lo && mid < hi)) break;
        if (count_ge(a, n, mid) >= want) lo = mid;
        else hi = mid;
    }
    return lo;
}

/* 32 running sums (4-8 vector registers): one would wait on each add's latency. */
static inline float dot(const float *restrict a, const float *restrict b, int n) {
    float acc[32] = {0};
    int i = 0;
    for (; i + 32 <= n; i += 32)
#pragma omp simd
        for (int l = 0; l < 32; l++) acc[l] += a[i + l] * b[i + l];
    float sum = 0.0f;
    for (; i < n; i++) sum += a[i] * b[i];
    for (int l = 0; l < 32; l++) sum += acc[l];
    return sum;
}

static inline void prefetch_row(const float *p, int64_t n) {
    for (int64_t i = 0; i < n; i += 16) __builtin_prefetch(p + i);
}

typedef struct {
    const uint16_t *screen; /* (B, F) bfloat16: x_rounded @ W_rounded^T, no bias */
    const float *x;         /* (B, D) the input the exact values use */
    const float *W;         /* (F, D) latent-major */
    const float *bias;      /* (F,) */
    const float *slack;     /* (B,) each row's bound on |screen - exact|, but for rounding */
    int64_t F, D, k, m;
    float c3, bias_max;
    float *vals;
    int64_t *idx;
    uint8_t *ok;
    int64_t *dots;
} screen_args;

/* out[j] = s[j] (bfloat16) + bias[j] */
static void widen_add(const uint16_t *restrict s, const float *restrict bias,
                      float *restrict out, int n) {
#pragma omp simd
    for (int j = 0; j < n; j++) out[j] = from_bf16(s[j]) + bias[j];
}

/* Rearrange v/j[0..n) so that v/j[0..k) hold the k largest values (n >= k, all finite,
   lo and hi their minimum and maximum); returns the k-th largest. */
static float keep_top_k(float *v, int32_t *j, int n, int k, float lo, float hi) {
    float kth = n > k ? at_least(v, n, k, lo, hi, 30) : lo;
    /* at_least stops within float rounding of the k-th value: move those at or above it
       first, then drop the smallest of them until k are left (ties at the cut). */
    int top = 0;
    for (int i = 0; i < n; i++)
        if (v[i] >= kth) {
            float tv = v[i];
            int32_t tj = j[i];
            v[i] = v[top];
            j[i] = j[top];
            v[top] = tv;
            j[top++] = tj;
        }
    for (; top > k; top--) {
        int low = 0;
        for (int q = 1; q < top; q++) low = v[q] < v[low] ? q : low;
        float tv = v[low];
        int32_t tj = j[low];
        v[low] = v[top - 1];
        j[low] = j[top - 1];
        v[top - 1] = tv;
        j[top - 1] = tj;
    }
    kth = v[0];
    for (int i = 1; i < k; i++) kth = v[i] < kth ? v[i] : kth;
    return kth;
}

/* Every entry of row[0..F) at least t into sv/sj, in column order; the count, or cap + 1 when
   there are more than cap. */
static int collect(const float *row, int64_t F, float t, const float *gm, int G, int cap,
                   float *sv, int32_t *sj) {
    int n = 0;
#if defined(__AVX512F__)
    (void)gm;
    (void)G;
    const __m512 tv = _mm512_set1_ps(t);
    const __m512i lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13,
                                            14, 15);
    int64_t j = 0;
    for (; j + 16 <= F; j += 16) {
        __m512 v = _mm512_loadu_ps(row + j);
        __mmask16 hit = _mm512_cmp_ps_mask(v, tv, _CMP_GE_OQ);
        if (!hit) continue;
        int c = __builtin_popcount(hit);
        if (n + c > cap) return cap + 1;
        _mm512_mask_compressstoreu_ps(sv + n, hit, v);
        _mm512_mask_compressstoreu_epi32(sj + n, hit,
                                         _mm512_add_epi32(lanes, _mm512_set1_epi32((int)j)));
        n += c;
    }
    for (; j < F; j++)
        if (row[j] >= t) {
            if (n == cap) return cap + 1;
            sv[n] = row[j];
            sj[n++] = (int32_t)j;
        }
#else
    /* only the groups whose maximum reaches t hold such entries (column j in group j mod G) */
    for (int g = 0; g < G; g++) {
        if (!(gm[g] >= t)) continue;
        for (int64_t j = g; j < F; j += G)
            if (row[j] >= t) {
                if (n == cap) return cap + 1;
                sv[n] = row[j];
                sj[n++] = (int32_t)j;
            }
    }
#endif
    return n;
}

/* gm[g] = max of row[j] over j = g mod G; lo and hi the smallest and largest of those, or
   NaN for both when the row holds NaN anywhere. */
static void group_maxima(const float *row, int64_t F, int G, float *gm, float *lo, float *hi) {
    int nan = 0;
    for (int g = 0; g < G; g++) {
        gm[g] = row[g];
        nan |= row[g] != row[g];
    }
    for (int64_t j0 = G; j0 < F; j0 += G) {
        int len = (int)(F - j0 < G ? F - j0 : G);
        const float *blk = row + j0;
#pragma omp simd reduction(| : nan)
        for (int g = 0; g < len; g++) {
            gm[g] = blk[g] > gm[g] ? blk[g] : gm[g];
            nan |= blk[g] != blk[g];
        }
    }
    float l = gm[0], h = gm[0];
    for (int g = 1; g < G; g++) {
        l = gm[g] < l ? gm[g] : l;
        h = gm[g] > h ? gm[g] : h;
    }
    *lo = nan ? NAN : l;
    *hi = nan ? NAN : h;
}

static void screen_part(void *p, int64_t start, int64_t stop) {
    screen_args *a = (screen_args *)p;
    const float *restrict bias = a->bias;
    const int64_t F = a->F, k = a->k;
    const int m = (int)(a->m < F ? a->m : F);
    /* G groups of columns (column j in group j mod G); the m-th largest group maximum is at
       most the row's m-th largest value, since m groups hold m distinct columns >= it. */
    const int G = (int)(4 * (int64_t)m < F ? 4 * m : F);
    const int cap = 8 * m;
    float *row = (float *)malloc(sizeof(float) * (size_t)F);
    float *gm = (float *)malloc(sizeof(float) * (size_t)G);
    float *sv = (float *)malloc(sizeof(float) * (size_t)cap);
    int32_t *sj = (int32_t *)malloc(sizeof(int32_t) * (size_t)cap);
    float *ev = (float *)malloc(sizeof(float) * (size_t)cap);
    int32_t *ej = (int32_t *)malloc(sizeof(int32_t) * (size_t)cap);
    int32_t *order = (int32_t *)malloc(sizeof(int32_t) * (size_t)cap);
    int64_t dots = 0;
    if (!row || !gm || !sv || !sj || !ev || !ej || !order) {
        for (int64_t r = start; r < stop; r++) a->ok[r] = 0;
        goto done;
    }
    for (int64_t r = start; r < stop; r++) {
        const uint16_t *restrict s = a->screen + r * F;
        const float *x = a->x + r * a->D;
        const float E = a->slack[r];
        a->ok[r] = 0;
        /* The screen's values with the bias, and the groups' maxima. */
        widen_add(s, bias, row, (int)F);
        float lo, hi;
        group_maxima(row, F, G, gm, &lo, &hi);
        if (!isfinite(lo) || !isfinite(hi)) continue; /* NaN or inf: not certified */
        float t0 = G > m ? at_least(gm, G, m, lo, hi, 16) : -INFINITY; /* near enough */
        /* Candidates: every column >= t0 (at least m); the rest are < t0. */
        int n = collect(row, F, t0, gm, G, cap, sv, sj);
        if (n > cap || n < k) continue; /* many ties at the cut, or NaN: not certified */
        /* Recompute the best k by the screen (about), then whichever others might still beat
           the k-th recomputed value. */
        int want = (int)(k < n ? k : n), first = 0, rest = n;
        float t1 = at_least(sv, n, want, t0, hi, 16);
        for (int i = 0; i < n; i++) order[sv[i] >= t1 ? first++ : --rest] = i;
        int c = 0;
        for (int i = 0; i < first; i++) {
            int q = order[i];
            if (i + 1 < first) prefetch_row(a->W + (int64_t)sj[order[i + 1]] * a->D, a->D);
            ev[c] = dot(x, a->W + (int64_t)sj[q] * a->D, (int)a->D) + bias[sj[q]];
            ej[c++] = sj[q];
        }
        float emin = ev[0], emax = ev[0];
        for (int i = 1; i < c; i++) {
            emin = ev[i] < emin ? ev[i] : emin;
            emax = ev[i] > emax ? ev[i] : emax;
        }
        float kth = c > k ? at_least(ev, c, (int)k, emin, emax, 16) : emin; /* <= the k-th */
        for (int i = first; i < n; i++) {
            int q = order[i];
            float v = sv[q];
            if (v + a->c3 * (fabsf(v) + a->bias_max) + E < kth) continue; /* cannot beat it */
            ev[c] = dot(x, a->W + (int64_t)sj[q] * a->D, (int)a->D) + bias[sj[q]];
            ej[c++] = sj[q];
        }
        dots += c;
        /* The k largest recomputed values: those above the k-th, then ties at it. */
        emin = ev[0];
        emax = ev[0];
        for (int i = 1; i < c; i++) {
            emin = ev[i] < emin ? ev[i] : emin;
            emax = ev[i] > emax ? ev[i] : emax;
        }
        if (!isfinite(emin) || !isfinite(emax)) continue;
        kth = keep_top_k(ev, ej, c, (int)k, emin, emax);
        /* Every column not recomputed is below t0 or could not beat the k-th value. */
        float drop = t0;
        float above = drop + a->c3 * (fabsf(drop) + a->bias_max) + E;
        int certified = drop == -INFINITY ? (E == E) : (kth > above || above <= 0.0f);
        if (!certified) continue;
        a->ok[r] = 1;
        for (int i = 0; i < k; i++) {
            a->vals[r * k + i] = ev[i];
            a->idx[r * k + i] = ej[i];
        }
    }
done:
    if (stop > start) a->dots[start] = dots; /* each part's count, at its first row */
    free(row);
    free(gm);
    free(sv);
    free(sj);
    free(ev);
    free(ej);
    free(order);
}

int sae_screen_topk(const uint16_t *screen, const float *x, const float *W, const float *bias,
                    const float *slack, int64_t B, int64_t F, int64_t D, int64_t k, int64_t m,
                    float c3, float bias_max, float *vals, int64_t *idx, uint8_t *ok,
                    int64_t *dots, int threads) {
    if (k < 1 || m < k || F < k || F > INT32_MAX || D > INT32_MAX) return 1;
    screen_args a = {screen, x, W, bias, slack, F, D, k, m, c3, bias_max, vals, idx, ok, dots};
    split_rows(screen_part, &a, B, threads);
    return 0;
}

typedef struct {
    const float *pre; /* (B, F) */
    int64_t F, k;
    float *vals;
    int64_t *idx;
    uint8_t *ok;
} topk_args;

static void topk_part(void *p, int64_t start, int64_t stop) {
    topk_args *a = (topk_args *)p;
    const int64_t F = a->F;
    const int k = (int)a->k;
    /* G groups: the k-th largest group maximum is at most the row's k-th largest value */
    const int G = (int)(4 * (int64_t)k < F ? 4 * k : F);
    const int cap = 16 * k > 256 ? 16 * k : 256;
    float *gm = (float *)malloc(sizeof(float) * (size_t)G);
    float *sv = (float *)malloc(sizeof(float) * (size_t)cap);
    int32_t *sj = (int32_t *)malloc(sizeof(int32_t) * (size_t)cap);
    for (int64_t r = start; r < stop; r++) {
        const float *row = a->pre + r * F;
        a->ok[r] = 0;
        if (!gm || !sv || !sj) continue;
        float lo, hi;
        group_maxima(row, F, G, gm, &lo, &hi);
        if (!isfinite(lo) || !isfinite(hi)) continue; /* NaN or inf in the row */
        float t0 = G > k ? at_least(gm, G, k, lo, hi, 16) : -INFINITY;
        int n = collect(row, F, t0, gm, G, cap, sv, sj);
        if (n > cap || n < k) continue; /* many ties at the cut */
        float emin = sv[0], emax = sv[0];
        for (int i = 1; i < n; i++) {
            emin = sv[i] < emin ? sv[i] : emin;
            emax = sv[i] > emax ? sv[i] : emax;
        }
        keep_top_k(sv, sj, n, k, emin, emax);
        for (int i = 0; i < k; i++) {
            a->vals[r * k + i] = sv[i];
            a->idx[r * k + i] = sj[i];
        }
        a->ok[r] = 1;
    }
    free(gm);
    free(sv);
    free(sj);
}

int sae_row_topk(const float *pre, int64_t B, int64_t F, int64_t k, float *vals, int64_t *idx,
                 uint8_t *ok, int threads) {
    if (k < 1 || F < k || F > INT32_MAX || k > INT32_MAX / 16) return 1;
    topk_args a = {pre, F, k, vals, idx, ok};
    split_rows(topk_part, &a, B, threads);
    return 0;
}
