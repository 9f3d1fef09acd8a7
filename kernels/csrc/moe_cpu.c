/* Fused MoE experts for CPU float32, for steps with few token-slots per expert (decode).
 *
 * One call per MoE layer does what kernels/fused_moe.py's reference does:
 *   out[t] = sum over t's local choices j of  w[t, j] * (W2[e] @ act(W13[e] @ x[t] + b13[e]) + b2[e])
 * on the weights as the model stores them, K-major:
 *   w13 [E][H][2F]  (row h: gate outputs [0, F), up outputs [F, 2F)),   w2 [E][F][H].
 *
 * At a few slots per expert the step is a stream of the routed experts' weights, and that is
 * the whole cost: each routed expert's W13 and W2 are read from memory once, front to back,
 * by one thread (experts are handed out dynamically, so the two streams of a 2-core machine
 * never share an expert). A GEMM over the K-major rows is a sum of scaled rows
 * (acc[m][:] += x[m][k] * W[k][:]), RB rows at a time, so the accumulators (one row per
 * slot, in L1) are loaded and stored once per RB weight rows.
 *
 * Threads: OpenMP. Built against the libgomp that PyTorch loads (same soname), so this file's
 * parallel regions share PyTorch's thread pool and its thread count (torch.set_num_threads).
 *
 * Built at first use by kernels/cpu_ext.py (gcc -O3 -march=native -fopenmp); when no compiler
 * is found the PyTorch path runs instead.
 */
#define _POSIX_C_SOURCE 199309L /* clock_gettime */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
/* The explicit vector path: 16 float lanes with AVX-512, 8 with AVX2 + FMA; without either the
 * `omp simd` loops below are what the compiler makes of them. */
#if defined(__AVX512F__)
#include <immintrin.h>
#define VL 16
typedef __m512 vf;
#define V_LOAD _mm512_loadu_ps
#define V_STORE _mm512_storeu_ps
#define V_SET1 _mm512_set1_ps
#define V_FMA _mm512_fmadd_ps
#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define VL 8
typedef __m256 vf;
#define V_LOAD _mm256_loadu_ps
#define V_STORE _mm256_storeu_ps
#define V_SET1 _mm256_set1_ps
#define V_FMA _mm256_fmadd_ps
#endif

#if VL == 16
#define V_ADD _mm512_add_ps
#define V_SUB _mm512_sub_ps
#define V_MUL _mm512_mul_ps
#define V_DIV _mm512_div_ps
#define V_MIN _mm512_min_ps
#define V_MAX _mm512_max_ps
#define V_FLOOR(x) _mm512_roundscale_ps((x), _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC)
/* 2^n for integral float lanes n, by the exponent bits */
#define V_POW2(n) _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), \
                                                                         _mm512_set1_epi32(127)), 23))
#elif VL == 8
#define V_ADD _mm256_add_ps
#define V_SUB _mm256_sub_ps
#define V_MUL _mm256_mul_ps
#define V_DIV _mm256_div_ps
#define V_MIN _mm256_min_ps
#define V_MAX _mm256_max_ps
#define V_FLOOR(x) _mm256_floor_ps(x)
#define V_POW2(n) _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), \
                                                                         _mm256_set1_epi32(127)), 23))
#endif

/* exp on VL lanes: x = n ln2 + r with |r| <= ln2 / 2, exp(r) by Cephes' degree-6 polynomial,
 * 2^n by the exponent bits; within 2 ulp of expf over the clamped range [-87.3, 88.37] (below
 * it 2^n would be a denormal: such inputs get exp(-87.3) = 1.3e-38, which a sum over
 * positive terms or a silu's 1 + exp(-g) does not see). */
#if defined(VL)
static inline vf v_exp(vf x) {
    x = V_MIN(V_MAX(x, V_SET1(-87.3f)), V_SET1(88.3762626647949f));
    const vf n = V_FLOOR(V_FMA(x, V_SET1(1.44269504088896341f), V_SET1(0.5f)));
    x = V_FMA(n, V_SET1(-0.693359375f), x);
    x = V_FMA(n, V_SET1(2.12194440e-4f), x);
    vf y = V_SET1(1.9875691500e-4f);
    y = V_FMA(y, x, V_SET1(1.3981999507e-3f));
    y = V_FMA(y, x, V_SET1(8.3334519073e-3f));
    y = V_FMA(y, x, V_SET1(4.1665795894e-2f));
    y = V_FMA(y, x, V_SET1(1.6666665459e-1f));
    y = V_FMA(y, x, V_SET1(5.0000001201e-1f));
    y = V_FMA(y, V_MUL(x, x), V_ADD(x, V_SET1(1.0f)));
    return V_MUL(y, V_POW2(n));
}
#endif

/* The router's sums: float on the vector paths (their lanes keep the partial sums short);
 * double in a build with neither, whose one running sum would drift past 1e-6 of float64 */
#if defined(VL)
typedef float route_acc;
#else
typedef double route_acc;
#endif

/* v[i] = exp(v[i] - m) for i < n; returns their sum */
static float exp_sub_sum(float *v, int64_t n, float m) {
    int64_t i = 0;
    route_acc sum = 0.0f;
#if defined(VL)
    vf acc = V_SET1(0.0f);
    const vf mv = V_SET1(m);
    for (; i + VL <= n; i += VL) {
        const vf e = v_exp(V_SUB(V_LOAD(v + i), mv));
        V_STORE(v + i, e);
        acc = V_ADD(acc, e);
    }
    float lanes[VL];
    V_STORE(lanes, acc);
    for (int l = 0; l < VL; ++l) sum += lanes[l];
#endif
    for (; i < n; ++i) {
        v[i] = expf(v[i] - m);
        sum += v[i];
    }
    return (float)sum;
}

/* h[f] = silu(g[f]) * u[f] = g / (1 + exp(-g)) * u for f < n */
static void silu_mul(const float *g, const float *u, float *h, int64_t n) {
    int64_t f = 0;
#if defined(VL)
    const vf one = V_SET1(1.0f), neg = V_SET1(-1.0f);
    for (; f + VL <= n; f += VL) {
        const vf gv = V_LOAD(g + f);
        const vf e = v_exp(V_MUL(gv, neg));
        V_STORE(h + f, V_MUL(V_DIV(gv, V_ADD(one, e)), V_LOAD(u + f)));
    }
#endif
    for (; f < n; ++f) h[f] = g[f] / (1.0f + expf(-g[f])) * u[f];
}

/* float lanes of the explicit vector path this build took (16: AVX-512, 8: AVX2 + FMA, 1:
 * neither), for the Python side's choice of kernel by slots per expert */
int moerun_vector_width(void) {
#if defined(VL)
    return VL;
#else
    return 1;
#endif
}

/* slots of one expert per work item (per pass over its weights): with AVX-512 a prefill's
 * slots of an expert (dozens) are one item and stream its weights once, through the register
 * tiles below; elsewhere 8 */
#if VL == 16
#define MB 64
#else
#define MB 8
#endif

enum { ACT_SILU = 0, ACT_SWIGLU_OAI = 1 };

#define RB 8 /* weight rows per accumulator round trip */

/* acc[m][0:N] += sum_k a[m][k] * W[k][0:N] for m < M (W row-major [Kd][N]), RB rows of W at
 * a time: each accumulator element is loaded and stored once per RB rows. */
static void rows_gemm(const float *const *a, int M, const float *W, int64_t Kd, int64_t N,
                      float *const *acc) {
    int64_t k = 0;
#if defined(VL)
    if (N % VL == 0 && M == 1) { /* decode's usual case: the RB broadcasts stay in registers */
        float *o = acc[0];
        for (; k + RB <= Kd; k += RB) {
            const float *w = W + k * N;
            vf xb[RB];
            for (int r = 0; r < RB; ++r) xb[r] = V_SET1(a[0][k + r]);
            for (int64_t n = 0; n < N; n += VL) {
                vf v = V_LOAD(o + n);
                for (int r = 0; r < RB; ++r) v = V_FMA(xb[r], V_LOAD(w + r * N + n), v);
                V_STORE(o + n, v);
            }
        }
    }
    /* the RB weight vectors of a column block are loaded once for all M slots */
    if (N % VL == 0) {
        for (; k + RB <= Kd; k += RB) {
            const float *w = W + k * N;
            float xs[MB][RB];
            for (int m = 0; m < M; ++m)
                for (int r = 0; r < RB; ++r) xs[m][r] = a[m][k + r];
            for (int64_t n = 0; n < N; n += VL) {
                vf wr[RB];
                for (int r = 0; r < RB; ++r) wr[r] = V_LOAD(w + r * N + n);
                for (int m = 0; m < M; ++m) {
                    vf v = V_LOAD(acc[m] + n);
                    for (int r = 0; r < RB; ++r) v = V_FMA(V_SET1(xs[m][r]), wr[r], v);
                    V_STORE(acc[m] + n, v);
                }
            }
        }
    }
#endif
    for (; k + RB <= Kd; k += RB) {
        const float *w = W + k * N;
        for (int m = 0; m < M; ++m) {
            float xs[RB];
            for (int r = 0; r < RB; ++r) xs[r] = a[m][k + r];
            float *restrict o = acc[m];
#pragma omp simd
            for (int64_t n = 0; n < N; ++n) {
                float v = o[n];
                for (int r = 0; r < RB; ++r) v += xs[r] * w[r * N + n];
                o[n] = v;
            }
        }
    }
    for (; k < Kd; ++k) {
        const float *w0 = W + k * N;
        for (int m = 0; m < M; ++m) {
            const float x0 = a[m][k];
            float *restrict o = acc[m];
#pragma omp simd
            for (int64_t n = 0; n < N; ++n) o[n] = o[n] + x0 * w0[n];
        }
    }
}

#if VL == 16
/* The same sums for M >= TG_MIN_M slots (a prefill's share of an expert): register tiles of
 * up to TG_M slots by TG_NV vectors (64 columns; 24 accumulators of AVX-512's 32 registers),
 * over the whole reduction per tile, each accumulator starting from acc and adding the rows
 * in k order: the same operations in the same order as rows_gemm, so the same bits. A
 * column panel of W (Kd x 64) is read from memory by the first block of slots (prefetching
 * TG_PF rows ahead) and from a contiguous copy in L2 by the others: W is streamed once per
 * item, and the arithmetic runs at the FMA units' rate instead of the accumulators' round
 * trips. */
#define TG_M 6
#define TG_NV 4
#define TG_MIN_M 16 /* below it rows_gemm streams W faster (2-core Xeon: 9.7 vs 12.8 ms at 8 slots, 15.1 vs 16.0 at 16) */
#define TG_PF 16

static inline __attribute__((always_inline)) void tg_tile(const float *const *a, const int MR, const float *w,
                                                          int64_t ldw, int64_t Kd, float *const *acc, int64_t n,
                                                          float *pack, const float *pf, int64_t ldpf) {
    vf c[TG_M][TG_NV];
    for (int i = 0; i < MR; ++i)
        for (int j = 0; j < TG_NV; ++j) c[i][j] = V_LOAD(acc[i] + n + j * VL);
    for (int64_t k = 0; k < Kd; ++k) {
        if (pf)
            for (int j = 0; j < TG_NV; ++j) _mm_prefetch((const char *)(pf + k * ldpf + j * VL), _MM_HINT_T1);
        vf b[TG_NV];
        for (int j = 0; j < TG_NV; ++j) b[j] = V_LOAD(w + k * ldw + j * VL);
        if (pack)
            for (int j = 0; j < TG_NV; ++j) V_STORE(pack + k * TG_NV * VL + j * VL, b[j]);
        for (int i = 0; i < MR; ++i) {
            const vf xv = V_SET1(a[i][k]);
            for (int j = 0; j < TG_NV; ++j) c[i][j] = V_FMA(xv, b[j], c[i][j]);
        }
    }
    for (int i = 0; i < MR; ++i)
        for (int j = 0; j < TG_NV; ++j) V_STORE(acc[i] + n + j * VL, c[i][j]);
}

/* The first block of slots reads a panel from W (rows N floats apart: at a power-of-two N
 * the panel's rows share a few L2 sets and would not stay there) and copies it to ``pack``
 * (Kd x TG_NV * VL floats, the caller's), which the other blocks read. */
static void tile_gemm(const float *const *a, int M, const float *W, int64_t Kd, int64_t N, float *const *acc,
                      float *pack) {
    for (int64_t n = 0; n < N; n += TG_NV * VL) {
        for (int m0 = 0; m0 < M; m0 += TG_M) {
            const int first = m0 == 0, last = m0 + TG_M >= M;
            const float *w = first ? W + n : pack;
            const int64_t ldw = first ? N : TG_NV * VL;
            float *pk = first && !last ? pack : NULL;
            /* the first block reads W's rows TG_PF rows ahead (a stride the hardware does
             * not follow) */
            const float *pf = first ? W + n + TG_PF * N : NULL;
            switch (M - m0 < TG_M ? M - m0 : TG_M) { /* a constant MR per call: registers */
            case 6: tg_tile(a + m0, 6, w, ldw, Kd, acc + m0, n, pk, pf, N); break;
            case 5: tg_tile(a + m0, 5, w, ldw, Kd, acc + m0, n, pk, pf, N); break;
            case 4: tg_tile(a + m0, 4, w, ldw, Kd, acc + m0, n, pk, pf, N); break;
            case 3: tg_tile(a + m0, 3, w, ldw, Kd, acc + m0, n, pk, pf, N); break;
            case 2: tg_tile(a + m0, 2, w, ldw, Kd, acc + m0, n, pk, pf, N); break;
            default: tg_tile(a + m0, 1, w, ldw, Kd, acc + m0, n, pk, pf, N); break;
            }
        }
    }
}
#endif

/* acc[m] += a[m] W for the M slots of one work item, by whichever form fits; ``pack`` (NULL:
 * rows_gemm only) is tile_gemm's panel buffer */
static void expert_gemm(const float *const *a, int M, const float *W, int64_t Kd, int64_t N, float *const *acc,
                        float *pack) {
#if VL == 16
    if (pack && M >= TG_MIN_M && N % (TG_NV * VL) == 0) {
        tile_gemm(a, M, W, Kd, N, acc, pack);
        return;
    }
#else
    (void)pack;
#endif
    rows_gemm(a, M, W, Kd, N, acc);
}

/* Returns 0, or -1 when scratch memory could not be allocated (nothing written then). */
int moe_experts_f32(const float *x, int64_t T, int64_t H, int64_t F,
                    const int64_t *ids, const float *weights, int64_t K,
                    int64_t expert_start, int64_t E,
                    const float *w13, const float *w2, const float *b13, const float *b2,
                    int act, float alpha, float limit, float *out) {
    const int64_t S = T * K;
    int64_t *count = calloc((size_t)E + 1, sizeof(int64_t));
    int64_t *order = malloc((size_t)(S > 0 ? S : 1) * sizeof(int64_t)); /* slots by expert */
    int64_t *pos = malloc((size_t)(S > 0 ? S : 1) * sizeof(int64_t));   /* slot -> row of y */
    float *y = malloc((size_t)(S > 0 ? S : 1) * (size_t)H * sizeof(float));
    int64_t *work = malloc((size_t)(S > 0 ? S : 1) * 2 * sizeof(int64_t));
    if (!count || !order || !pos || !y || !work) {
        free(count); free(order); free(pos); free(y); free(work);
        return -1;
    }
    /* counting sort of the local slots by expert (stable: slot order within an expert) */
    for (int64_t s = 0; s < S; ++s) {
        const int64_t e = ids[s] - expert_start;
        if (e >= 0 && e < E) count[e + 1]++;
    }
    for (int64_t e = 0; e < E; ++e) count[e + 1] += count[e];
    int64_t nwork = 0, mmax = 1; /* mmax: the largest item, which sizes the scratch */
    for (int64_t e = 0; e < E; ++e) /* work items: (first row, rows), at most MB rows each */
        for (int64_t r = count[e]; r < count[e + 1]; r += MB) {
            work[2 * nwork] = r;
            work[2 * nwork + 1] = (count[e + 1] - r < MB) ? count[e + 1] - r : MB;
            if (work[2 * nwork + 1] > mmax) mmax = work[2 * nwork + 1];
            nwork++;
        }
    {
        int64_t *fill = malloc((size_t)E * sizeof(int64_t));
        if (!fill) {
            free(count); free(order); free(pos); free(y); free(work);
            return -1;
        }
        memcpy(fill, count, (size_t)E * sizeof(int64_t));
        for (int64_t s = 0; s < S; ++s) {
            const int64_t e = ids[s] - expert_start;
            if (e >= 0 && e < E) {
                pos[s] = fill[e];
                order[fill[e]++] = s;
            } else {
                pos[s] = -1;
            }
        }
        free(fill);
    }
    int failed = 0;
#pragma omp parallel
    {
        float *gu = aligned_alloc(64, ((size_t)mmax * 2 * F * sizeof(float) + 63) / 64 * 64);
        float *hb = aligned_alloc(64, ((size_t)mmax * F * sizeof(float) + 63) / 64 * 64);
        float *pack = NULL; /* tile_gemm's panel buffer, when an item is large enough for it */
#if VL == 16
        if (mmax >= TG_MIN_M) /* without it, rows_gemm */
            pack = aligned_alloc(64, (size_t)(H > F ? H : F) * TG_NV * VL * sizeof(float));
#endif
        if (!gu || !hb) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t i = 0; i < nwork; ++i) {
            if (!gu || !hb) continue;
            const int64_t r0 = work[2 * i], M = work[2 * i + 1];
            const int64_t e = ids[order[r0]] - expert_start;
            const float *xa[MB];
            float *ga[MB], *ha[MB], *ya[MB];
            for (int64_t m = 0; m < M; ++m) {
                xa[m] = x + (order[r0 + m] / K) * H;
                ga[m] = gu + m * 2 * F;
                ha[m] = hb + m * F;
                ya[m] = y + (r0 + m) * H;
                if (b13) memcpy(ga[m], b13 + e * 2 * F, (size_t)(2 * F) * sizeof(float));
                else memset(ga[m], 0, (size_t)(2 * F) * sizeof(float));
                if (b2) memcpy(ya[m], b2 + e * H, (size_t)H * sizeof(float));
                else memset(ya[m], 0, (size_t)H * sizeof(float));
            }
            expert_gemm(xa, (int)M, w13 + e * H * 2 * F, H, 2 * F, ga, pack);
            for (int64_t m = 0; m < M; ++m) {
                const float *g = ga[m], *u = ga[m] + F;
                float *h = ha[m];
                if (act == ACT_SWIGLU_OAI) {
                    for (int64_t f = 0; f < F; ++f) {
                        const float gc = g[f] < limit ? g[f] : limit;
                        const float uc = u[f] < -limit ? -limit : (u[f] > limit ? limit : u[f]);
                        h[f] = gc / (1.0f + expf(-alpha * gc)) * (uc + 1.0f);
                    }
                } else {
                    silu_mul(g, u, h, F);
                }
            }
            expert_gemm((const float *const *)ha, (int)M, w2 + e * F * H, F, H, ya, pack);
            for (int64_t m = 0; m < M; ++m) {
                const float wt = weights[order[r0 + m]];
                float *restrict o = ya[m];
#pragma omp simd
                for (int64_t n = 0; n < H; ++n) o[n] *= wt;
            }
        }
        free(gu);
        free(hb);
        free(pack);
        /* the top-k sum, in choice order; a token with no local choice gets zeros */
#pragma omp for schedule(static)
        for (int64_t t = 0; t < T; ++t) {
            if (failed) continue;
            float *restrict o = out + t * H;
            memset(o, 0, (size_t)H * sizeof(float));
            for (int64_t j = 0; j < K; ++j) {
                const int64_t p = pos[t * K + j];
                if (p < 0) continue;
                const float *restrict v = y + p * H;
#pragma omp simd
                for (int64_t n = 0; n < H; ++n) o[n] += v[n];
            }
        }
    }
    free(count); free(order); free(pos); free(y); free(work);
    return failed ? -1 : 0;
}

/* ---- paged attention over the KV cache, float32 (kernels/attention.py's semantics) --------
 * Writes the step's new K/V rows into their cache slots, then for each new token t of
 * sequence b (rows [cu_q[b], cu_q[b + 1]) of q) attends over the keys at positions
 * j in [lo, pos[t]] (lo = pos[t] - window + 1 with a window, else 0), read through b's block
 * table: cache [num_blocks][block_size][Nkv][D], position j in block table[b][j / block_size],
 * row j % block_size. Query head h reads KV head h / G (G = Nq / Nkv); an optional sink logit
 * per query head joins the softmax denominator. Work items are (sequence, KV head): each
 * reads its keys and values once for its tokens' G heads. Scores, softmax and output in
 * float32. Returns 0, or -1 when scratch memory could not be allocated. */
static int attend_f32(const float *q, int64_t q_row, int64_t T, int64_t Nq, int64_t D,
                      float *kc, float *vc, int64_t block_size, int64_t Nkv,
                      const float *k_new, const float *v_new, int64_t new_row, const int64_t *slot,
                      const int64_t *table, int64_t B, int64_t P,
                      const int64_t *cu_q, const int64_t *pos, int64_t max_len,
                      float scale, int64_t window, const float *sinks, float *out) {
    const int64_t G = Nq / Nkv, row = Nkv * D;
    if (k_new) { /* a decode step's rows are a few KiB: threads only for a prefill's */
#pragma omp parallel for schedule(static) if (T * row > (1 << 16))
        for (int64_t t = 0; t < T; ++t) {
            memcpy(kc + slot[t] * row, k_new + t * new_row, (size_t)row * sizeof(float));
            memcpy(vc + slot[t] * row, v_new + t * new_row, (size_t)row * sizeof(float));
        }
    }
    int failed = 0;
#pragma omp parallel
    {
        float *s = malloc((size_t)(G * (max_len > 0 ? max_len : 1)) * sizeof(float));
        float *acc = malloc((size_t)(G * D) * sizeof(float));
        if (!s || !acc) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t item = 0; item < B * Nkv; ++item) {
            if (!s || !acc) continue;
            const int64_t b = item / Nkv, kvh = item % Nkv;
            const int64_t *tb = table + b * P;
            for (int64_t t = cu_q[b]; t < cu_q[b + 1]; ++t) {
                const int64_t hi = pos[t];
                const int64_t lo = (window > 0 && hi - window + 1 > 0) ? hi - window + 1 : 0;
                const int64_t L = hi - lo + 1;
                const float *qt = q + t * q_row + kvh * G * D;
                float mx[64], den[64];
                const int64_t Gc = G < 64 ? G : 64; /* G <= 64 is checked by the caller */
                for (int64_t j0 = lo; j0 <= hi;) { /* block by block: one table lookup per block */
                    const int64_t j1 = (j0 / block_size + 1) * block_size <= hi + 1 ? (j0 / block_size + 1) * block_size : hi + 1;
                    const float *kb = kc + (tb[j0 / block_size] * block_size + j0 % block_size) * row + kvh * D;
                    for (int64_t j = j0; j < j1; ++j, kb += row) {
                        for (int64_t g = 0; g < Gc; ++g) {
                            const float *qg = qt + g * D;
                            float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
                            for (int64_t d = 0; d < D; ++d) dot += qg[d] * kb[d];
                            s[g * L + (j - lo)] = dot * scale;
                        }
                    }
                    j0 = j1;
                }
                for (int64_t g = 0; g < Gc; ++g) {
                    float m = -INFINITY;
                    const float *sg = s + g * L;
                    for (int64_t j = 0; j < L; ++j) m = sg[j] > m ? sg[j] : m;
                    mx[g] = m;
                }
                for (int64_t g = 0; g < Gc; ++g) {
                    const float sink = sinks ? sinks[kvh * G + g] : -INFINITY;
                    const float m = sink > mx[g] ? sink : mx[g];
                    const float sum = sinks ? expf(sink - m) : 0.0f;
                    den[g] = sum + exp_sub_sum(s + g * L, L, m);
                }
                memset(acc, 0, (size_t)(G * D) * sizeof(float));
                for (int64_t j0 = lo; j0 <= hi;) {
                    const int64_t j1 = (j0 / block_size + 1) * block_size <= hi + 1 ? (j0 / block_size + 1) * block_size : hi + 1;
                    const float *vb = vc + (tb[j0 / block_size] * block_size + j0 % block_size) * row + kvh * D;
                    for (int64_t j = j0; j < j1; ++j, vb += row) {
                        for (int64_t g = 0; g < Gc; ++g) {
                            const float p = s[g * L + (j - lo)];
                            float *ag = acc + g * D;
#pragma omp simd
                            for (int64_t d = 0; d < D; ++d) ag[d] += p * vb[d];
                        }
                    }
                    j0 = j1;
                }
                for (int64_t g = 0; g < Gc; ++g) {
                    float *o = out + (t * Nq + kvh * G + g) * D;
                    const float inv = 1.0f / den[g];
                    for (int64_t d = 0; d < D; ++d) o[d] = acc[g * D + d] * inv;
                }
            }
        }
        free(s);
        free(acc);
    }
    return failed ? -1 : 0;
}

int paged_attention_f32(const float *q, int64_t T, int64_t Nq, int64_t D,
                        float *kc, float *vc, int64_t block_size, int64_t Nkv,
                        const float *k_new, const float *v_new, const int64_t *slot,
                        const int64_t *table, int64_t B, int64_t P,
                        const int64_t *cu_q, const int64_t *pos, int64_t max_len,
                        float scale, int64_t window, const float *sinks, float *out) {
    return attend_f32(q, Nq * D, T, Nq, D, kc, vc, block_size, Nkv, k_new, v_new, Nkv * D, slot, table, B, P,
                      cu_q, pos, max_len, scale, window, sinks, out);
}

/* ---- the per-layer glue of a decode step, float32 --------------------------------------
 * rope_qk_f32: rotate-half RoPE in place on the first R dims of every head of q [T][Nq][D]
 * and k [T][Nkv][D] (rows q_row / k_row floats apart, heads D apart), cos/sin [T][R]:
 *   x[i] <- x[i] cos[i] - x[i + R/2] sin[i],  x[i + R/2] <- x[i + R/2] cos[i + R/2] + x[i] sin[i + R/2]
 * (moerun.model.layers.apply_rope). add_rmsnorm_f32: h = a (+ b when given), written to h_out,
 * then x_out = w * h * rsqrt(mean(h^2) + eps), per row of H (RMSNorm after a residual add). */
static void rope_rows(float *x, int64_t T, int64_t N, int64_t D, int64_t row, const float *cos_t,
                      const float *sin_t, int64_t R) {
    const int64_t half = R / 2;
#pragma omp parallel for schedule(static) if (T * N * R > 65536)
    for (int64_t t = 0; t < T; ++t) {
        const float *c = cos_t + t * R, *s = sin_t + t * R;
        for (int64_t n = 0; n < N; ++n) {
            float *v = x + t * row + n * D;
#pragma omp simd
            for (int64_t i = 0; i < half; ++i) {
                const float x1 = v[i], x2 = v[i + half];
                v[i] = x1 * c[i] - x2 * s[i];
                v[i + half] = x2 * c[i + half] + x1 * s[i + half];
            }
        }
    }
}

void rope_qk_f32(float *q, int64_t Nq, int64_t q_row, float *k, int64_t Nkv, int64_t k_row, int64_t T,
                 int64_t D, const float *cos_t, const float *sin_t, int64_t R) {
    rope_rows(q, T, Nq, D, q_row, cos_t, sin_t, R);
    rope_rows(k, T, Nkv, D, k_row, cos_t, sin_t, R);
}

void add_rmsnorm_f32(const float *a, const float *b, float *h_out, const float *w, float eps,
                     int64_t T, int64_t H, float *x_out) {
#pragma omp parallel for schedule(static) if (T * H > 65536)
    for (int64_t t = 0; t < T; ++t) {
        const float *ra = a + t * H, *rb = b ? b + t * H : NULL;
        float *h = h_out + t * H, *x = x_out + t * H;
        float sq = 0.0f;
        if (rb) {
#pragma omp simd reduction(+ : sq)
            for (int64_t i = 0; i < H; ++i) {
                const float v = ra[i] + rb[i];
                h[i] = v;
                sq += v * v;
            }
        } else {
#pragma omp simd reduction(+ : sq)
            for (int64_t i = 0; i < H; ++i) sq += ra[i] * ra[i];
        }
        const float r = 1.0f / sqrtf(sq / (float)H + eps);
        const float *src = rb ? h : ra;
#pragma omp simd
        for (int64_t i = 0; i < H; ++i) x[i] = w[i] * (src[i] * r);
    }
}

/* ---- the softmax router, float32 ---------------------------------------------------------
 * For each token t of x [T][H]: logits l[e] = x[t] . W[e] (+ bias[e]) for the router weight
 * W [E][H]; probabilities p = softmax(l); the K largest by value, ties to the lower id,
 * in descending order; with renorm their weights are p / sum of the K p's; times scaling.
 * kernels/router.py's reference_route with scoring "softmax". E <= 1024 (checked by the
 * caller). */
static void route_rows(const float *x, int64_t T, int64_t H, const float *W, const float *bias, int64_t E,
                       int64_t K, int renorm, float scaling, float *w_out, int32_t *ids_out, int64_t *ids64) {
#pragma omp parallel for schedule(static) if (T * E * H > (1 << 18))
    for (int64_t t = 0; t < T; ++t) {
        float l[1024];
        const float *xt = x + t * H;
        for (int64_t e = 0; e < E; ++e) {
            const float *we = W + e * H;
            route_acc dot = 0.0f;
#pragma omp simd reduction(+ : dot)
            for (int64_t h = 0; h < H; ++h) dot += (route_acc)xt[h] * we[h];
            l[e] = bias ? (float)dot + bias[e] : (float)dot;
        }
        float m = -INFINITY;
        for (int64_t e = 0; e < E; ++e) m = l[e] > m ? l[e] : m;
        const float inv = 1.0f / exp_sub_sum(l, E, m);
        float *wt = w_out + t * K;
        int32_t *it = ids_out ? ids_out + t * K : NULL;
        int64_t *it64 = ids64 ? ids64 + t * K : NULL;
        float total = 0.0f;
        for (int64_t j = 0; j < K; ++j) {
            int64_t best = 0;
            for (int64_t e = 1; e < E; ++e) best = l[e] > l[best] ? e : best;
            wt[j] = l[best] * inv;
            if (it) it[j] = (int32_t)best;
            if (it64) it64[j] = best;
            total += wt[j];
            l[best] = -1.0f; /* below every probability: not chosen again */
        }
        const float scale = renorm ? scaling / total : scaling;
        for (int64_t j = 0; j < K; ++j) wt[j] *= scale;
    }
}

void route_softmax_f32(const float *x, int64_t T, int64_t H, const float *W, const float *bias, int64_t E,
                       int64_t K, int renorm, float scaling, float *w_out, int32_t *ids_out) {
    route_rows(x, T, H, W, bias, E, K, renorm, scaling, w_out, ids_out, NULL);
}

/* ---- a linear layer for a few rows, float32 ---------------------------------------------
 * out[T][N] = x[T][K] W[N][K]^T, W as nn.Linear stores it (row n: output n's weights). For a
 * decode step's LM head (T a few dozen, N tens of thousands): W streams from memory once and
 * x stays in L2. Dot products over K, LM_M rows of x by LM_N rows of W per register block
 * (12 vector accumulators and 4 vector registers for the operands: AVX2's 16); each W row
 * block is read from L1 for every block of x rows. Threads take LM_CHUNK rows of W at a time,
 * dynamically. The sums run lane-wise over K, then across the lanes. */
#define LM_M 4
#define LM_N 3
#define LM_CHUNK 48

#if defined(VL)
static inline float v_hsum(vf v) {
#if VL == 16
    return _mm512_reduce_add_ps(v);
#else
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
#endif
}
#endif

/* one (m, n) dot product of length K: the edges of the register blocks */
static float dot_f32(const float *a, const float *b, int64_t K) {
    float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
    for (int64_t k = 0; k < K; ++k) acc += a[k] * b[k];
    return acc;
}

#if VL == 16
/* AVX-512 (32 vector registers): MR <= 6 rows of x by 4 rows of W per register block, 24
 * accumulators. Within a thread's chunk of W rows (in L2 after the first block of x rows),
 * each block of x rows (24 KiB at K = 1024) stays in L1 while the chunk's rows of W pass by:
 * 4 loads from L2 per 24 FMAs, where the 4 x 3 block takes 4 per 12. */
#define LM512_M 6
#define LM512_N 4
#define LM512_CHUNK 64

static inline __attribute__((always_inline)) void lm_tile512(const float *x, int64_t ldx, int64_t K,
                                                             const float *w, float *out, int64_t N,
                                                             const int MR, const float *pf) {
    vf acc[LM512_M][LM512_N];
    for (int i = 0; i < MR; ++i)
        for (int j = 0; j < LM512_N; ++j) acc[i][j] = V_SET1(0.0f);
    const int64_t Kv = K - K % VL;
    for (int64_t k = 0; k < Kv; k += VL) {
        if (pf) _mm_prefetch((const char *)(pf + k), _MM_HINT_T1);
        vf b[LM512_N];
        for (int j = 0; j < LM512_N; ++j) b[j] = V_LOAD(w + j * K + k);
        for (int i = 0; i < MR; ++i) {
            const vf v = V_LOAD(x + i * ldx + k);
            for (int j = 0; j < LM512_N; ++j) acc[i][j] = V_FMA(v, b[j], acc[i][j]);
        }
    }
    for (int i = 0; i < MR; ++i)
        for (int j = 0; j < LM512_N; ++j) {
            float t = v_hsum(acc[i][j]);
            for (int64_t k = Kv; k < K; ++k) t += x[i * ldx + k] * w[j * K + k];
            out[i * N + j] = t;
        }
}

void linear_rows_f32(const float *x_in, int64_t T, int64_t K, const float *W, int64_t N, float *out) {
    const int64_t nchunks = (N + LM512_CHUNK - 1) / LM512_CHUNK;
    /* x's rows 64 bytes further apart than K: at K a multiple of 1024, rows 4 KiB apart share
     * their L1 sets, and a block's 6 rows with the 4 rows of W they meet evict each other */
    const int64_t ldx = K + 16;
    float *x = malloc((size_t)(T > 0 ? T : 1) * (size_t)ldx * sizeof(float));
    if (!x) {
        for (int64_t m = 0; m < T; ++m)
            for (int64_t n = 0; n < N; ++n) out[m * N + n] = dot_f32(x_in + m * K, W + n * K, K);
        return;
    }
    for (int64_t m = 0; m < T; ++m) memcpy(x + m * ldx, x_in + m * K, (size_t)K * sizeof(float));
    /* static: a thread's chunks are consecutive, so while its later blocks of x rows run from
     * L2 it prefetches the next chunk's W rows (one row a tile, one line per K step) and the
     * stream from memory overlaps the arithmetic instead of stalling the next chunk's start */
#pragma omp parallel for schedule(static)
    for (int64_t c = 0; c < nchunks; ++c) {
        const int64_t n0 = c * LM512_CHUNK, n_end = n0 + LM512_CHUNK < N ? n0 + LM512_CHUNK : N;
        const int64_t n_tiles = n0 + (n_end - n0) / LM512_N * LM512_N;
        int64_t next = 0; /* rows of the next chunk prefetched so far */
        for (int64_t m = 0; m < T; m += LM512_M) {
            const int mr = T - m < LM512_M ? (int)(T - m) : LM512_M;
            const float *xm = x + m * ldx;
            for (int64_t n = n0; n < n_tiles; n += LM512_N) {
                float *o = out + m * N + n;
                const float *pf = NULL;
                if (m > 0 && n_end + next < N && next < LM512_CHUNK) pf = W + (n_end + next++) * K;
                switch (mr) { /* a constant MR per call: the tile's loops unroll into registers */
                case 6: lm_tile512(xm, ldx, K, W + n * K, o, N, 6, pf); break;
                case 5: lm_tile512(xm, ldx, K, W + n * K, o, N, 5, pf); break;
                case 4: lm_tile512(xm, ldx, K, W + n * K, o, N, 4, pf); break;
                case 3: lm_tile512(xm, ldx, K, W + n * K, o, N, 3, pf); break;
                case 2: lm_tile512(xm, ldx, K, W + n * K, o, N, 2, pf); break;
                default: lm_tile512(xm, ldx, K, W + n * K, o, N, 1, pf); break;
                }
            }
            for (int64_t n = n_tiles; n < n_end; ++n)
                for (int i = 0; i < mr; ++i) out[(m + i) * N + n] = dot_f32(xm + i * ldx, W + n * K, K);
        }
    }
    free(x);
}
#else
void linear_rows_f32(const float *x, int64_t T, int64_t K, const float *W, int64_t N, float *out) {
    const int64_t nchunks = (N + LM_CHUNK - 1) / LM_CHUNK;
#pragma omp parallel for schedule(dynamic, 1)
    for (int64_t c = 0; c < nchunks; ++c) {
        const int64_t n_end = (c + 1) * LM_CHUNK < N ? (c + 1) * LM_CHUNK : N;
        int64_t n = c * LM_CHUNK;
#if defined(VL)
        const int64_t Kv = K - K % VL;
        for (; n + LM_N <= n_end; n += LM_N) {
            const float *w0 = W + n * K, *w1 = w0 + K, *w2 = w1 + K;
            int64_t m = 0;
            for (; m + LM_M <= T; m += LM_M) {
                const float *x0 = x + m * K, *x1 = x0 + K, *x2 = x1 + K, *x3 = x2 + K;
                vf a00 = V_SET1(0.0f), a01 = a00, a02 = a00, a10 = a00, a11 = a00, a12 = a00;
                vf a20 = a00, a21 = a00, a22 = a00, a30 = a00, a31 = a00, a32 = a00;
                for (int64_t k = 0; k < Kv; k += VL) {
                    const vf b0 = V_LOAD(w0 + k), b1 = V_LOAD(w1 + k), b2 = V_LOAD(w2 + k);
                    vf v = V_LOAD(x0 + k);
                    a00 = V_FMA(v, b0, a00); a01 = V_FMA(v, b1, a01); a02 = V_FMA(v, b2, a02);
                    v = V_LOAD(x1 + k);
                    a10 = V_FMA(v, b0, a10); a11 = V_FMA(v, b1, a11); a12 = V_FMA(v, b2, a12);
                    v = V_LOAD(x2 + k);
                    a20 = V_FMA(v, b0, a20); a21 = V_FMA(v, b1, a21); a22 = V_FMA(v, b2, a22);
                    v = V_LOAD(x3 + k);
                    a30 = V_FMA(v, b0, a30); a31 = V_FMA(v, b1, a31); a32 = V_FMA(v, b2, a32);
                }
                float r[LM_M][LM_N] = {
                    {v_hsum(a00), v_hsum(a01), v_hsum(a02)}, {v_hsum(a10), v_hsum(a11), v_hsum(a12)},
                    {v_hsum(a20), v_hsum(a21), v_hsum(a22)}, {v_hsum(a30), v_hsum(a31), v_hsum(a32)}};
                for (int i = 0; i < LM_M; ++i)
                    for (int j = 0; j < LM_N; ++j) {
                        float t = r[i][j];
                        for (int64_t k = Kv; k < K; ++k) t += x[(m + i) * K + k] * W[(n + j) * K + k];
                        out[(m + i) * N + n + j] = t;
                    }
            }
            for (; m < T; ++m)
                for (int j = 0; j < LM_N; ++j) out[m * N + n + j] = dot_f32(x + m * K, W + (n + j) * K, K);
        }
#endif
        for (; n < n_end; ++n)
            for (int64_t m = 0; m < T; ++m) out[m * N + n] = dot_f32(x + m * K, W + n * K, K);
    }
}
#endif

/* ---- a decode step's whole decoder stack in one call ------------------------------------
 * For each of L layers of a Mixtral-style MoE decoder (kernels above, and the BLAS sgemm
 * PyTorch links, for the dense projections), on the residual stream h [T][H] in place:
 *   x = rmsnorm(h) * in_norm;  [q|k|v] = x Wqkv^T (+ b);  rope on q, k;  write k, v to the
 *   cache, attend;  h += attn Wo^T (+ b);  x = rmsnorm(h) * post_norm;  route x (softmax,
 *   top-k);  h += experts(x).
 * moerun.model.cpu_fused decides when a model and a step qualify and lays out the arguments;
 * it is exactly DecoderLayer.forward's arithmetic in the same order, op by op. With marks
 * given, each phase's start (CLOCK_MONOTONIC seconds, what time.perf_counter reads on Linux)
 * and id are recorded for the profiler. Returns 0, -1 when scratch memory could not be
 * allocated, -2 without an sgemm. */
typedef void (*sgemm_fn)(const char *, const char *, const int *, const int *, const int *, const float *,
                         const float *, const int *, const float *, const int *, const float *, float *,
                         const int *);
static sgemm_fn sgemm_ptr = NULL;
void moerun_set_sgemm(void *fn) { sgemm_ptr = (sgemm_fn)fn; }

typedef struct {
    const float *in_norm, *post_norm;
    const float *wqkv, *bqkv; /* [Nq D + 2 Nkv D][H], its bias or NULL */
    const float *wo, *bo;     /* [H][Nq D] */
    const float *wg, *bg;     /* [E][H] */
    const float *w13, *w2;    /* K-major experts, as moe_experts_f32 takes them */
    float *kc, *vc;           /* this layer's cache [blocks][block_size][Nkv][D] */
    int64_t window;
} LayerArgs;

typedef struct {
    float *h, *x, *qkv, *attn, *a, *out; /* h [T][H] in and out; the rest scratch */
    float *route_w;                      /* [L][T][K] */
    int64_t *route_ids;                  /* [L][T][K] */
    const float *cos, *sin;              /* [T][R] */
    const int64_t *slot, *table, *cu_q, *pos;
    int64_t T, H, Nq, Nkv, D, R, E, K, F, B, P, max_len, block_size, renorm;
    float eps, scale, scaling, pad_;
    double *mark_t; /* NULL: no marks; else room for 7 per layer and one */
    int64_t *mark_ph;
    int64_t nmarks;
} StepArgs;

enum { PH_NORM = 0, PH_QKV, PH_ATTENTION, PH_O_PROJ, PH_ROUTER, PH_EXPERTS };


static void mark(StepArgs *s, int64_t ph) {
    if (!s->mark_t) return;
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    s->mark_t[s->nmarks] = (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
    s->mark_ph[s->nmarks++] = ph;
}

/* out[T][N] = x[T][K] W[N][K]^T (+ b[N]) */
static void linear(const float *x, int64_t T, int64_t K, const float *W, const float *b, int64_t N, float *out) {
    const int m = (int)N, n = (int)T, k = (int)K;
    const float one = 1.0f, zero = 0.0f;
    sgemm_ptr("T", "N", &m, &n, &k, &one, W, &k, x, &k, &zero, out, &m);
    if (b)
        for (int64_t t = 0; t < T; ++t) {
            float *o = out + t * N;
#pragma omp simd
            for (int64_t j = 0; j < N; ++j) o[j] += b[j];
        }
}

int decode_layers_f32(StepArgs *s, const LayerArgs *layers, int64_t L) {
    if (!sgemm_ptr) return -2;
    const int64_t T = s->T, H = s->H, Q = s->Nq * s->D, KV = s->Nkv * s->D, QKV = Q + 2 * KV, K = s->K;
    for (int64_t l = 0; l < L; ++l) {
        const LayerArgs *y = layers + l;
        mark(s, PH_NORM);
        add_rmsnorm_f32(s->h, NULL, s->h, y->in_norm, s->eps, T, H, s->x);
        mark(s, PH_QKV);
        linear(s->x, T, H, y->wqkv, y->bqkv, QKV, s->qkv);
        rope_qk_f32(s->qkv, s->Nq, QKV, s->qkv + Q, s->Nkv, QKV, T, s->D, s->cos, s->sin, s->R);
        mark(s, PH_ATTENTION);
        if (attend_f32(s->qkv, QKV, T, s->Nq, s->D, y->kc, y->vc, s->block_size, s->Nkv, s->qkv + Q, s->qkv + Q + KV,
                       QKV, s->slot, s->table, s->B, s->P, s->cu_q, s->pos, s->max_len, s->scale, y->window, NULL,
                       s->attn) != 0)
            return -1;
        mark(s, PH_O_PROJ);
        linear(s->attn, T, Q, y->wo, y->bo, H, s->a);
        mark(s, PH_NORM);
        add_rmsnorm_f32(s->h, s->a, s->h, y->post_norm, s->eps, T, H, s->x);
        mark(s, PH_ROUTER);
        float *rw = s->route_w + l * T * K;
        int64_t *ri = s->route_ids + l * T * K;
        route_rows(s->x, T, H, y->wg, y->bg, s->E, K, (int)s->renorm, s->scaling, rw, NULL, ri);
        mark(s, PH_EXPERTS);
        if (moe_experts_f32(s->x, T, H, s->F, ri, rw, K, 0, s->E, y->w13, y->w2, NULL, NULL, ACT_SILU, 0.0f, 0.0f,
                            s->out) != 0)
            return -1;
        for (int64_t t = 0; t < T; ++t) {
            float *hh = s->h + t * H;
            const float *o = s->out + t * H;
#pragma omp simd
            for (int64_t i = 0; i < H; ++i) hh[i] += o[i];
        }
    }
    mark(s, -1);
    return 0;
}

/* ---- greedy sampling's argmax, float32 --------------------------------------------------------
 * For each row b of x [B][V]: idx[b] = the index of its first maximum, the index torch.max(x,
 * dim=-1) gives (a row holding a NaN: its first NaN's), and finite[b] = 1 when every value of
 * the row is finite. One vectorised pass for the maximum and the finiteness (x - x is 0 only
 * for a finite x), then a scan for the first index holding it; threads over rows. */
void argmax_rows_f32(const float *x, int64_t B, int64_t V, int64_t *idx, uint8_t *finite) {
#pragma omp parallel for schedule(static) if (B * V > (1 << 16))
    for (int64_t b = 0; b < B; ++b) {
        const float *restrict r = x + b * V;
        float m = -INFINITY;
        int bad = 0;
#pragma omp simd reduction(max : m) reduction(| : bad)
        for (int64_t v = 0; v < V; ++v) {
            m = r[v] > m ? r[v] : m; /* a NaN compares false: skipped here, found below */
            bad |= !(r[v] - r[v] == 0.0f);
        }
        int64_t at = 0;
        if (bad)
            while (at < V && r[at] == r[at]) ++at; /* the first NaN, if any */
        if (!bad || at == V) { /* the first index holding m: 64 at a time, then within the block */
            at = 0;
            for (int64_t v0 = 0; v0 < V; v0 += 64) {
                const int64_t n = V - v0 < 64 ? V - v0 : 64;
                int hit = 0;
#pragma omp simd reduction(| : hit)
                for (int64_t v = 0; v < n; ++v) hit |= r[v0 + v] == m;
                if (hit) {
                    at = v0;
                    while (r[at] != m) ++at;
                    break;
                }
            }
        }
        idx[b] = at;
        finite[b] = (uint8_t)!bad;
    }
}
