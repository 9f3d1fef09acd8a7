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
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#define MB 8 /* slots of one expert per pass over its weights */

enum { ACT_SILU = 0, ACT_SWIGLU_OAI = 1 };

#define RB 8 /* weight rows per accumulator round trip */

/* acc[m][0:N] += sum_k a[m][k] * W[k][0:N] for m < M (W row-major [Kd][N]), RB rows of W at
 * a time: each accumulator element is loaded and stored once per RB rows. */
static void rows_gemm(const float *const *a, int M, const float *W, int64_t Kd, int64_t N,
                      float *const *acc) {
    int64_t k = 0;
#if defined(__AVX512F__)
    /* the RB weight vectors of a column block are loaded once for all M slots */
    if (N % 16 == 0) {
        for (; k + RB <= Kd; k += RB) {
            const float *w = W + k * N;
            float xs[MB][RB];
            for (int m = 0; m < M; ++m)
                for (int r = 0; r < RB; ++r) xs[m][r] = a[m][k + r];
            for (int64_t n = 0; n < N; n += 16) {
                __m512 wr[RB];
                for (int r = 0; r < RB; ++r) wr[r] = _mm512_loadu_ps(w + r * N + n);
                for (int m = 0; m < M; ++m) {
                    __m512 v = _mm512_loadu_ps(acc[m] + n);
                    for (int r = 0; r < RB; ++r) v = _mm512_fmadd_ps(_mm512_set1_ps(xs[m][r]), wr[r], v);
                    _mm512_storeu_ps(acc[m] + n, v);
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
    int64_t nwork = 0;
    for (int64_t e = 0; e < E; ++e) /* work items: (first row, rows), at most MB rows each */
        for (int64_t r = count[e]; r < count[e + 1]; r += MB) {
            work[2 * nwork] = r;
            work[2 * nwork + 1] = (count[e + 1] - r < MB) ? count[e + 1] - r : MB;
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
        float *gu = aligned_alloc(64, ((size_t)MB * 2 * F * sizeof(float) + 63) / 64 * 64);
        float *hb = aligned_alloc(64, ((size_t)MB * F * sizeof(float) + 63) / 64 * 64);
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
            rows_gemm(xa, (int)M, w13 + e * H * 2 * F, H, 2 * F, ga);
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
                    for (int64_t f = 0; f < F; ++f) h[f] = g[f] / (1.0f + expf(-g[f])) * u[f];
                }
            }
            rows_gemm((const float *const *)ha, (int)M, w2 + e * F * H, F, H, ya);
            for (int64_t m = 0; m < M; ++m) {
                const float wt = weights[order[r0 + m]];
                float *restrict o = ya[m];
#pragma omp simd
                for (int64_t n = 0; n < H; ++n) o[n] *= wt;
            }
        }
        free(gu);
        free(hb);
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
int paged_attention_f32(const float *q, int64_t T, int64_t Nq, int64_t D,
                        float *kc, float *vc, int64_t block_size, int64_t Nkv,
                        const float *k_new, const float *v_new, const int64_t *slot,
                        const int64_t *table, int64_t B, int64_t P,
                        const int64_t *cu_q, const int64_t *pos, int64_t max_len,
                        float scale, int64_t window, const float *sinks, float *out) {
    const int64_t G = Nq / Nkv, row = Nkv * D;
    if (k_new) {
#pragma omp parallel for schedule(static)
        for (int64_t t = 0; t < T; ++t) {
            memcpy(kc + slot[t] * row, k_new + t * row, (size_t)row * sizeof(float));
            memcpy(vc + slot[t] * row, v_new + t * row, (size_t)row * sizeof(float));
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
                const float *qt = q + (t * Nq + kvh * G) * D;
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
                    float sum = sinks ? expf(sink - m) : 0.0f;
                    float *sg = s + g * L;
                    for (int64_t j = 0; j < L; ++j) {
                        sg[j] = expf(sg[j] - m);
                        sum += sg[j];
                    }
                    den[g] = sum;
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
