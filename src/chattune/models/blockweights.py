"""Block weights, lossless low-bit weights for decoding on a CPU: a linear layer whose fp32 weights are exactly
4-bit or 8-bit block values is computed from those few bytes instead of from the fp32 copy.

Why: one decode step multiplies a handful of rows by every weight, so on a CPU it is bound by reading the weights
from memory. The bundled model is converted from a GGUF file whose linear layers are Q4_1 (blocks of 32: w =
d*q + m, q in 0..15, d and m fp16) and whose embedding/output head is Q8_0 (w = d*q, q in -127..127): its fp32
weights hold no more information than those blocks, at 8x / 4x the bytes. torch has no kernel that multiplies
fp32 activations by such blocks without first expanding them (its int8 weight-only matmul measured 2-30x slower
than fp32 here, and dynamic quantisation changes the activations), so this module carries one, in C with AVX2
(and AVX-512 for the Q4 rows, chosen at run time where the CPU has it), compiled once with the system's C compiler
and loaded with ctypes.

Exactness: a layer is read from its blocks only when they, expanded again in fp32 exactly as the GGUF reader did,
give back every one of its fp32 weights bit for bit; otherwise it stays fp32 (e.g. layers merged with an adapter or
trained in full). What differs from the fp32 matmul is only the order in which the products are summed, which is
float noise (tested against the fp32 result); a row's result never depends on the other rows of the batch. Only
calls with at most `MAX_ROWS` rows (decode steps) use the kernel; longer inputs (prefill) go to torch's matmul,
and so does anything that needs gradients.

The same library carries one decoder layer of a decode step in two C calls (`layer_front`: RMSNorm, the fused
q/k/v projection, the rotary rotation; `layer_back`: attention over the cache, o_proj, residual, RMSNorm, the
fused gate/up projection, SiLU, down_proj, residual), which models/decode_step.py uses for Llama-layout layers whose
projections are all read from blocks: a layer then costs two calls from Python instead of some thirty tensor ops;
and where every layer is such a layer, `decode_layers` runs all of them (the new keys and values written into the
cache's storage) and the head in one call.

The kernel parallelises with OpenMP: linked against libgomp by soname, it shares the runtime torch already loaded
(and torch's thread count), so the two never compete with two pools of spinning threads.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import subprocess
import types
from pathlib import Path

import torch
import torch.nn.functional as F

MAX_ROWS = 32  # measured: at 32 rows the block kernel still beats fp32 (157 vs 200 ms a step), at prefill sizes not
BLOCK = 32

_SOURCE = r"""
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static inline float half(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);
    return _cvtsh_ss(h);
}

/* How many rows a thread takes at a time: about 64 KB of blocks. Measured (2 threads, 30 layers' gate/up, 33 MB):
   chunks of 16 rows ran at 10 GB/s, not faster than one thread, because the threads' alternating small chunks
   defeat the hardware prefetcher; 64 KB chunks ran at 15-17 GB/s. One static half per thread was as fast on an
   idle machine but 30x slower when another process held a core (the paused thread's half holds up the step);
   chunks of this size still let the running thread take over. */
static inline int rows_per_chunk(int row_bytes, int O, int threads) {
    int rows = 65536 / row_bytes;
    const int share = O / (4 * (threads > 0 ? threads : 1));  /* at least ~4 chunks a thread: balanced ends */
    if (rows > share) rows = share;
    return rows > 16 ? rows : 16;
}

/* The four products of one block of 32, in two short chains so that they overlap in the pipeline. */
static inline __m256 dot32(__m256 w0, __m256 w1, __m256 w2, __m256 w3, const float *xb) {
    __m256 a = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xb + 8), _mm256_mul_ps(w0, _mm256_loadu_ps(xb)));
    __m256 c = _mm256_fmadd_ps(w3, _mm256_loadu_ps(xb + 24), _mm256_mul_ps(w2, _mm256_loadu_ps(xb + 16)));
    return _mm256_add_ps(a, c);
}

/* Q4 rows: per block of 32 weights 20 bytes, [d fp16][mn fp16][16 bytes: element j in the low nibble of byte j,
   element j+16 in its high nibble]; weight = d*q + mn. xv[m, b] holds 8 partial sums of x's block b (their sum is
   the block's sum), which the mn term multiplies. One instantiation per row count M (<= 8) keeps the
   accumulators in registers. Rows are handed out in chunks of about 64 KB (dynamic schedule, rows_per_chunk): a
   thread that the OS pauses does not hold up the others. */
#define Q4_KERNEL(M)                                                                                              \
static void q4_m##M(const float *x, int K, const uint8_t *w, const float *xv, int O, float *y, int threads) {    \
    const int nb = K / 32;                                                                                      \
    const __m128i low = _mm_set1_epi8(0x0F);                                                                    \
    const int chunk = rows_per_chunk(nb * 20, O, threads);                                                             \
    _Pragma("omp parallel for schedule(dynamic, chunk) num_threads(threads)")                                   \
    for (int o = 0; o < O; o++) {                                                                               \
        __m256 acc[M], accm[M];                                                                                 \
        for (int m = 0; m < M; m++) { acc[m] = _mm256_setzero_ps(); accm[m] = _mm256_setzero_ps(); }           \
        const uint8_t *row = w + (size_t)o * nb * 20;                                                           \
        for (int b = 0; b < nb; b++) {                                                                          \
            const uint8_t *blk = row + 20 * b;                                                                  \
            __m128i raw = _mm_loadu_si128((const __m128i *)(blk + 4));                                          \
            __m128i lo = _mm_and_si128(raw, low), hi = _mm_and_si128(_mm_srli_epi16(raw, 4), low);              \
            __m256 w0 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo));                                           \
            __m256 w1 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)));                        \
            __m256 w2 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi));                                           \
            __m256 w3 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)));                        \
            __m256 dv = _mm256_set1_ps(half(blk)), mv = _mm256_set1_ps(half(blk + 2));                          \
            for (int m = 0; m < M; m++) {                                                                       \
                acc[m] = _mm256_fmadd_ps(dv, dot32(w0, w1, w2, w3, x + (size_t)m * K + 32 * b), acc[m]);        \
                accm[m] = _mm256_fmadd_ps(mv, _mm256_loadu_ps(xv + ((size_t)m * nb + b) * 8), accm[m]);         \
            }                                                                                                   \
        }                                                                                                       \
        for (int m = 0; m < M; m++) y[(size_t)m * O + o] = hsum(_mm256_add_ps(acc[m], accm[m]));               \
    }                                                                                                           \
}

/* Q8 rows: per block of 32 weights 34 bytes, [d fp16][32 int8]; weight = d*q. */
#define Q8_KERNEL(M)                                                                                              \
static void q8_m##M(const float *x, int K, const uint8_t *w, int O, float *y, int threads) {                     \
    const int nb = K / 32;                                                                                      \
    const int chunk = rows_per_chunk(nb * 34, O, threads);                                                             \
    _Pragma("omp parallel for schedule(dynamic, chunk) num_threads(threads)")                                   \
    for (int o = 0; o < O; o++) {                                                                               \
        __m256 acc[M];                                                                                          \
        for (int m = 0; m < M; m++) acc[m] = _mm256_setzero_ps();                                               \
        const uint8_t *row = w + (size_t)o * nb * 34;                                                           \
        for (int b = 0; b < nb; b++) {                                                                          \
            const uint8_t *qb = row + 34 * b + 2;                                                               \
            __m256 w0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)qb)));         \
            __m256 w1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(qb + 8))));   \
            __m256 w2 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(qb + 16))));  \
            __m256 w3 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(qb + 24))));  \
            __m256 dv = _mm256_set1_ps(half(qb - 2));                                                           \
            for (int m = 0; m < M; m++)                                                                         \
                acc[m] = _mm256_fmadd_ps(dv, dot32(w0, w1, w2, w3, x + (size_t)m * K + 32 * b), acc[m]);        \
        }                                                                                                       \
        for (int m = 0; m < M; m++) y[(size_t)m * O + o] = hsum(acc[m]);                                        \
    }                                                                                                           \
}

Q4_KERNEL(1) Q4_KERNEL(2) Q4_KERNEL(3) Q4_KERNEL(4) Q4_KERNEL(5) Q4_KERNEL(6) Q4_KERNEL(7) Q4_KERNEL(8)
Q8_KERNEL(1) Q8_KERNEL(2) Q8_KERNEL(3) Q8_KERNEL(4) Q8_KERNEL(5) Q8_KERNEL(6) Q8_KERNEL(7) Q8_KERNEL(8)

/* The same Q4 rows with 16-wide AVX-512 where the CPU has it (chosen at run time: the library is built for AVX2).
   Each block's 32 weights become two vectors of d*q (exact in fp32: 4 bits times fp16's 11) that every row
   multiplies with one FMA each; the mn term is one scalar product with the block's sum of x, xs[m, b]. Measured on
   an AVX-512 AMD EPYC against the AVX2 kernel, one layer's four matrices on one thread: 9% less time for one
   row, 18% for eight. */
#define Q4_KERNEL_512(M)                                                                                          \
__attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma,f16c")))                                                 \
static void q4z_m##M(const float *x, int K, const uint8_t *w, const float *xs, int O, float *y, int threads) {    \
    const int nb = K / 32;                                                                                      \
    const __m128i low = _mm_set1_epi8(0x0F);                                                                    \
    const int chunk = rows_per_chunk(nb * 20, O, threads);                                                      \
    _Pragma("omp parallel for schedule(dynamic, chunk) num_threads(threads)")                                   \
    for (int o = 0; o < O; o++) {                                                                               \
        __m512 a0[M], a1[M];                                                                                    \
        float mm[M];                                                                                            \
        for (int m = 0; m < M; m++) { a0[m] = _mm512_setzero_ps(); a1[m] = _mm512_setzero_ps(); mm[m] = 0.0f; } \
        const uint8_t *row = w + (size_t)o * nb * 20;                                                           \
        for (int b = 0; b < nb; b++) {                                                                          \
            const uint8_t *blk = row + 20 * b;                                                                  \
            __m128i raw = _mm_loadu_si128((const __m128i *)(blk + 4));                                          \
            __m128i lo = _mm_and_si128(raw, low), hi = _mm_and_si128(_mm_srli_epi16(raw, 4), low);              \
            const __m512 dv = _mm512_set1_ps(half(blk));                                                        \
            const float mv = half(blk + 2);                                                                     \
            const __m512 w0 = _mm512_mul_ps(dv, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(lo)));                  \
            const __m512 w1 = _mm512_mul_ps(dv, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(hi)));                  \
            for (int m = 0; m < M; m++) {                                                                       \
                const float *xb = x + (size_t)m * K + 32 * b;                                                   \
                a0[m] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xb), a0[m]);                                        \
                a1[m] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xb + 16), a1[m]);                                   \
                mm[m] += mv * xs[(size_t)m * nb + b];                                                           \
            }                                                                                                   \
        }                                                                                                       \
        for (int m = 0; m < M; m++) y[(size_t)m * O + o] = _mm512_reduce_add_ps(_mm512_add_ps(a0[m], a1[m])) + mm[m]; \
    }                                                                                                           \
}

Q4_KERNEL_512(1) Q4_KERNEL_512(2) Q4_KERNEL_512(3) Q4_KERNEL_512(4) Q4_KERNEL_512(5) Q4_KERNEL_512(6)
Q4_KERNEL_512(7) Q4_KERNEL_512(8)

typedef void (*q4_fn)(const float *, int, const uint8_t *, const float *, int, float *, int);
typedef void (*q8_fn)(const float *, int, const uint8_t *, int, float *, int);
static const q4_fn Q4[8] = {q4_m1, q4_m2, q4_m3, q4_m4, q4_m5, q4_m6, q4_m7, q4_m8};
static const q4_fn Q4Z[8] = {q4z_m1, q4z_m2, q4z_m3, q4z_m4, q4z_m5, q4z_m6, q4z_m7, q4z_m8};

/* 1: the AVX-512 kernels, 0: the AVX2 ones; decided once: the CPU's flags, unless CHATTUNE_BLOCK_KERNEL=avx2. */
static int wide = -1;

int block_kernel_width(void) {
    if (wide < 0) {
        const char *asked = getenv("CHATTUNE_BLOCK_KERNEL");
        wide = !(asked && strcmp(asked, "avx2") == 0) && __builtin_cpu_supports("avx512f")
               && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
    }
    return wide ? 512 : 256;
}
static const q8_fn Q8[8] = {q8_m1, q8_m2, q8_m3, q8_m4, q8_m5, q8_m6, q8_m7, q8_m8};

/* y[M,O] = x[M,K] W^T, the rows of x in chunks of 8 (each chunk reads the weights once). */
void q4_matmul(const float *x, int M, int K, const uint8_t *w, int O, float *y, int threads) {
    const int nb = K / 32;
    if (block_kernel_width() == 512) {
        float *xs = (float *)malloc(sizeof(float) * (size_t)M * nb);
        for (int m = 0; m < M; m++)
            for (int b = 0; b < nb; b++) {
                const float *p = x + (size_t)m * K + 32 * b;
                float t = 0.0f;
                for (int i = 0; i < 32; i++) t += p[i];
                xs[(size_t)m * nb + b] = t;
            }
        for (int r = 0; r < M; r += 8) {
            const int n = M - r < 8 ? M - r : 8;
            Q4Z[n - 1](x + (size_t)r * K, K, w, xs + (size_t)r * nb, O, y + (size_t)r * O, threads);
        }
        free(xs);
        return;
    }
    float *xv = (float *)malloc(sizeof(float) * (size_t)M * nb * 8);
    for (int m = 0; m < M; m++)
        for (int b = 0; b < nb; b++) {
            const float *p = x + (size_t)m * K + 32 * b;
            __m256 s = _mm256_add_ps(_mm256_add_ps(_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)),
                                     _mm256_add_ps(_mm256_loadu_ps(p + 16), _mm256_loadu_ps(p + 24)));
            _mm256_storeu_ps(xv + ((size_t)m * nb + b) * 8, s);
        }
    for (int r = 0; r < M; r += 8) {
        const int n = M - r < 8 ? M - r : 8;
        Q4[n - 1](x + (size_t)r * K, K, w, xv + (size_t)r * nb * 8, O, y + (size_t)r * O, threads);
    }
    free(xv);
}

void q8_matmul(const float *x, int M, int K, const uint8_t *w, int O, float *y, int threads) {
    for (int r = 0; r < M; r += 8) {
        const int n = M - r < 8 ? M - r : 8;
        Q8[n - 1](x + (size_t)r * K, K, w, O, y + (size_t)r * O, threads);
    }
}

/* ---- One decoder layer of a decode step, in two calls (serve/engine.py via models/decode_step.py), for
   Llama-layout layers whose seven projections are all packed. Between the two, Python appends the new keys and
   values to the cache. ---- */

/* A projection: packed blocks (kind 4 or 8), an optional bias, and optional LoRA adapters as one down-projection
   la [rank, K] and one up-projection lbt [rank, O] (transposed, scalings folded in). */
typedef struct { int kind; const uint8_t *w; const float *bias; const float *la; const float *lbt; int rank; } Proj;

static inline float dot(const float *a, const float *b, int n) {
    int i = 0;
    float r = 0.0f;
    if (n >= 8) {
        __m256 acc = _mm256_setzero_ps();
        for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
        r = hsum(acc);
    }
    for (; i < n; i++) r += a[i] * b[i];
    return r;
}

/* y [M, O] = x [M, K] W^T + bias + (x la^T) lbt. */
static void project(const Proj *p, const float *x, int M, int K, int O, float *y, int threads) {
    if (p->kind == 4) q4_matmul(x, M, K, p->w, O, y, threads); else q8_matmul(x, M, K, p->w, O, y, threads);
    if (p->bias) for (int m = 0; m < M; m++) for (int o = 0; o < O; o++) y[(size_t)m * O + o] += p->bias[o];
    if (!p->la) return;
    float *ax = (float *)malloc(sizeof(float) * (size_t)p->rank);
    for (int m = 0; m < M; m++) {
        const float *xm = x + (size_t)m * K;
        float *ym = y + (size_t)m * O;
        for (int r = 0; r < p->rank; r++) ax[r] = dot(p->la + (size_t)r * K, xm, K);
        for (int r = 0; r < p->rank; r++) {
            const float a = ax[r], *row = p->lbt + (size_t)r * O;
            for (int o = 0; o < O; o++) ym[o] += a * row[o];
        }
    }
    free(ax);
}

/* y = weight * x / sqrt(mean(x^2) + eps), row by row, with fp32 statistics (transformers' LlamaRMSNorm). */
static void rms_norm(const float *x, int M, int K, const float *weight, float eps, float *y) {
    for (int m = 0; m < M; m++) {
        const float *r = x + (size_t)m * K;
        float *out = y + (size_t)m * K;
        const float scale = 1.0f / sqrtf(dot(r, r, K) / K + eps);
        for (int k = 0; k < K; k++) out[k] = weight[k] * (r[k] * scale);
    }
}

/* Front half: h = norm(x); y = project(h) as [q heads | k heads | v heads] per row; then the rotary rotation
   (x*cos + rotate_half(x)*sin) on the q and k heads, cos/sin [M, hd] per row. */
void layer_front(const float *x, int M, int K, const float *norm, float eps, const Proj *qkv, int O,
                 const float *cos, const float *sin, int hd, int qk_heads, float *y, int threads) {
    float *h = (float *)malloc(sizeof(float) * (size_t)M * K);
    rms_norm(x, M, K, norm, eps, h);
    project(qkv, h, M, K, O, y, threads);
    free(h);
    const int half = hd / 2;
    for (int m = 0; m < M; m++) {
        const float *c = cos + (size_t)m * hd, *s = sin + (size_t)m * hd;
        for (int j = 0; j < qk_heads; j++) {
            float *t = y + (size_t)m * O + (size_t)j * hd;
            for (int i = 0; i < half; i++) {
                const float a = t[i], b = t[i + half];
                t[i] = a * c[i] - b * s[i];
                t[i + half] = b * c[i + half] + a * s[i + half];
            }
        }
    }
}

/* Attention of one new query per row and head over the cache keys/values: the first T of `cap` slots of
   [M, kv_heads, cap, hd] (grouped-query: query head j reads kv head j / (heads / kv_heads)); mask [M, T]
   (nonzero: attend) or NULL. out [M, heads*hd]. */
static void attend(const float *y, int ystride, int M, int heads, int kv_heads, int hd, const float *keys,
                   const float *values, int T, int cap, const int64_t *mask, float scale, float *out, int threads) {
    const int group = heads / kv_heads;
    #pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
    for (int p = 0; p < M * heads; p++) {
        const int m = p / heads, j = p % heads;
        const float *q = y + (size_t)m * ystride + (size_t)j * hd;
        const size_t base = ((size_t)m * kv_heads + j / group) * (size_t)cap * hd;
        const float *kk = keys + base, *vv = values + base;
        float *o = out + (size_t)m * heads * hd + (size_t)j * hd;
        float *w = (float *)malloc(sizeof(float) * (size_t)T);
        float top = -INFINITY;
        for (int t = 0; t < T; t++) {
            if (mask && !mask[(size_t)m * T + t]) { w[t] = -INFINITY; continue; }
            w[t] = dot(q, kk + (size_t)t * hd, hd) * scale;
            if (w[t] > top) top = w[t];
        }
        float sum = 0.0f;
        for (int t = 0; t < T; t++) { w[t] = w[t] == -INFINITY ? 0.0f : expf(w[t] - top); sum += w[t]; }
        for (int i = 0; i < hd; i++) o[i] = 0.0f;
        for (int t = 0; t < T; t++) {
            if (w[t] == 0.0f) continue;
            const float a = w[t] / sum;
            const float *v = vv + (size_t)t * hd;
            for (int i = 0; i < hd; i++) o[i] += a * v[i];
        }
        free(w);
    }
}

/* Back half, in place on x [M, K]: x += o_proj(attention); x += down(silu(gate(h)) * up(h)), h = norm2(x). */
void layer_back(float *x, int M, int K, const float *y, int ystride, int heads, int kv_heads, int hd,
                const float *keys, const float *values, int T, int cap, const int64_t *mask, float scale, const Proj *o,
                const float *norm, float eps, const Proj *gate_up, int inter, const Proj *down, int threads) {
    const int width = heads * hd;
    float *a = (float *)malloc(sizeof(float) * (size_t)M * (width > K ? width : K));
    float *t = (float *)malloc(sizeof(float) * (size_t)M * K);
    float *gu = (float *)malloc(sizeof(float) * (size_t)M * 2 * inter);
    attend(y, ystride, M, heads, kv_heads, hd, keys, values, T, cap, mask, scale, a, threads);
    project(o, a, M, width, K, t, threads);
    for (size_t i = 0; i < (size_t)M * K; i++) x[i] += t[i];
    rms_norm(x, M, K, norm, eps, a);
    project(gate_up, a, M, K, 2 * inter, gu, threads);
    for (int m = 0; m < M; m++) {  /* silu(gate) * up, into the first `inter` columns of each row */
        float *g = gu + (size_t)m * 2 * inter, *u = g + inter;
        for (int i = 0; i < inter; i++) g[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
        if (m) memmove(gu + (size_t)m * inter, g, sizeof(float) * inter);
    }
    project(down, gu, M, inter, K, t, threads);
    for (size_t i = 0; i < (size_t)M * K; i++) x[i] += t[i];
    free(a); free(t); free(gu);
}

/* ---- A whole decode step's decoder layers in one call (models/decode_step.py, when every layer is a C layer):
   per layer the front half, the new keys and values written into the cache's storage at slot T, the back half over
   T + 1 slots; then, where the head is packed, the final norm and the head. One call instead of two per layer keeps
   Python (and the GIL, which a server's event loop also wants) out of the step. ---- */
typedef struct {
    const float *norm1; float eps1; Proj qkv; int qkv_out; int q_heads; int kv_heads; int hd; float scale;
    Proj o; const float *norm2; float eps2; Proj gate_up; int inter; Proj down;
    float *keys; float *values; int cap;  /* the cache's storage [M, kv_heads, cap, hd] */
} Layer;

void decode_layers(int n, const Layer *layers, float *x, int M, int K, const float *cos, const float *sin, int T,
                   const int64_t *mask, const float *norm, float eps, const Proj *head, int vocab, float *logits,
                   int threads) {
    int widest = 0;
    for (int l = 0; l < n; l++) if (layers[l].qkv_out > widest) widest = layers[l].qkv_out;
    float *y = (float *)malloc(sizeof(float) * (size_t)M * widest);
    for (int l = 0; l < n; l++) {
        const Layer *L = &layers[l];
        const int O = L->qkv_out, hd = L->hd, qk = L->q_heads + L->kv_heads;
        layer_front(x, M, K, L->norm1, L->eps1, &L->qkv, O, cos, sin, hd, qk, y, threads);
        for (int m = 0; m < M; m++)
            for (int h = 0; h < L->kv_heads; h++) {
                const size_t slot = (((size_t)m * L->kv_heads + h) * L->cap + T) * hd;
                memcpy(L->keys + slot, y + (size_t)m * O + (size_t)(L->q_heads + h) * hd, sizeof(float) * hd);
                memcpy(L->values + slot, y + (size_t)m * O + (size_t)(qk + h) * hd, sizeof(float) * hd);
            }
        layer_back(x, M, K, y, O, L->q_heads, L->kv_heads, hd, L->keys, L->values, T + 1, L->cap, mask, L->scale,
                   &L->o, L->norm2, L->eps2, &L->gate_up, L->inter, &L->down, threads);
    }
    free(y);
    if (head) {
        float *h = (float *)malloc(sizeof(float) * (size_t)M * K);
        rms_norm(x, M, K, norm, eps, h);
        project(head, h, M, K, vocab, logits, threads);
        free(h);
    }
}
"""

_LIB = None


def kernel_cache_dir() -> Path:
    from chattune.models.bundled import cache_dir

    return cache_dir() / "kernels"


def why_unavailable() -> str | None:
    """None when the kernel can run here, else why not (in words)."""
    if not hasattr(torch.backends, "cpu") or torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return "the CPU has no AVX2"
    try:
        _library()
    except (OSError, subprocess.CalledProcessError, FileNotFoundError) as e:
        return f"the kernel could not be built ({type(e).__name__}: {str(e).strip()[:200]})"
    return None


def _library():
    """Build (once per source, cached under ~/.cache/chattune/kernels) and load the kernel library."""
    global _LIB
    if _LIB is not None:
        return _LIB
    digest = hashlib.sha256(_SOURCE.encode()).hexdigest()[:16]
    folder = kernel_cache_dir()
    so = folder / f"packed-{digest}.so"  # the builds keep the module's former name: existing ones are reused
    if not so.exists():
        folder.mkdir(parents=True, exist_ok=True)
        src = folder / f"packed-{digest}.c"
        src.write_text(_SOURCE)
        tmp = folder / f".packed-{digest}.{os.getpid()}.so"
        compiler = os.environ.get("CC", "cc")
        subprocess.run([compiler, "-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-shared", "-fPIC", str(src), "-o",
                        str(tmp), "-lm"], check=True, capture_output=True, text=True)
        os.replace(tmp, so)  # atomic: a concurrent build or a crash never leaves half a library
        for old in folder.glob("packed-*"):  # builds of earlier versions of the source
            if old.stem != so.stem:
                old.unlink(missing_ok=True)
    lib = ctypes.CDLL(str(so))
    p, i = ctypes.c_void_p, ctypes.c_int  # pointers are passed as plain ints (data_ptr()): no casts per call
    lib.q4_matmul.argtypes = [p, i, i, p, i, p, i]
    lib.q8_matmul.argtypes = [p, i, i, p, i, p, i]
    lib.q4_matmul.restype = lib.q8_matmul.restype = None
    f = ctypes.c_float
    lib.layer_front.argtypes = [p, i, i, p, f, p, i, p, p, i, i, p, i]
    lib.layer_back.argtypes = [p, i, i, p, i, i, i, i, p, p, i, i, p, f, p, p, f, p, i, p, i]
    lib.layer_front.restype = lib.layer_back.restype = None
    lib.decode_layers.argtypes = [i, p, p, i, i, p, p, i, p, p, f, p, i, p, i]
    lib.decode_layers.restype = None
    lib.block_kernel_width.argtypes, lib.block_kernel_width.restype = [], ctypes.c_int
    _LIB = lib
    return lib


class Proj(ctypes.Structure):
    """The C side's `Proj`: a block-weight projection with its bias and LoRA adapters (addresses; 0 for none)."""
    _fields_ = [("kind", ctypes.c_int), ("w", ctypes.c_void_p), ("bias", ctypes.c_void_p), ("la", ctypes.c_void_p),
                ("lbt", ctypes.c_void_p), ("rank", ctypes.c_int)]


class Layer(ctypes.Structure):
    """The C side's `Layer`: one decoder layer of `decode_layers` (norms, projections, shapes, and the addresses of
    its cache's storage with that storage's slot count `cap`)."""
    _fields_ = [("norm1", ctypes.c_void_p), ("eps1", ctypes.c_float), ("qkv", Proj), ("qkv_out", ctypes.c_int),
                ("q_heads", ctypes.c_int), ("kv_heads", ctypes.c_int), ("hd", ctypes.c_int),
                ("scale", ctypes.c_float), ("o", Proj), ("norm2", ctypes.c_void_p), ("eps2", ctypes.c_float),
                ("gate_up", Proj), ("inter", ctypes.c_int), ("down", Proj), ("keys", ctypes.c_void_p),
                ("values", ctypes.c_void_p), ("cap", ctypes.c_int)]


def _fp16_exact(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float16).to(torch.float32)


def _halves(t: torch.Tensor) -> torch.Tensor:
    """fp32 values that are exactly fp16, as their fp16 bytes [..., 2]."""
    return t.to(torch.float16).contiguous().view(torch.uint8).reshape(*t.shape, 2)


def _blocks(w: torch.Tensor) -> torch.Tensor | None:
    """An fp32 weight [O, K] as blocks of 32 along K [O, K/32, 32], or None where it cannot be blocks."""
    o, k = w.shape
    if k % BLOCK or w.dtype != torch.float32:
        return None
    return w.reshape(o, k // BLOCK, BLOCK)


def q4_blocks(w: torch.Tensor):
    """(q uint8 [O, K/32, 32], d, mn [O, K/32]) if every weight of `w` [O, K] equals d*q + mn in fp32 (as the GGUF
    reader expands Q4_1) for some q in 0..15 and fp16 d, mn per block of 32; else None."""
    blocks = _blocks(w)
    if blocks is None:
        return None
    mn = blocks.amin(-1)
    d = _fp16_exact((blocks.amax(-1) - mn) / 15)
    if not torch.equal(_fp16_exact(mn), mn):
        return None
    safe = torch.where(d == 0, torch.ones_like(d), d)
    q = torch.round((blocks - mn[..., None]) / safe[..., None]).clamp_(0, 15)
    if not torch.equal(d[..., None] * q + mn[..., None], blocks):
        return None
    return q.to(torch.uint8), d, mn


def q8_blocks(w: torch.Tensor):
    """(q int8 [O, K/32, 32], d [O, K/32]) if every weight equals d*q in fp32 for q in -127..127 and fp16 d per block
    of 32 (GGUF's Q8_0); else None."""
    blocks = _blocks(w)
    if blocks is None:
        return None
    d = _fp16_exact(blocks.abs().amax(-1) / 127)
    safe = torch.where(d == 0, torch.ones_like(d), d)
    q = torch.round(blocks / safe[..., None]).clamp_(-127, 127)
    if not torch.equal(d[..., None] * q, blocks):
        return None
    return q.to(torch.int8), d


def q4_layout(w: torch.Tensor) -> torch.Tensor | None:
    """The kernel's Q4 layout of `w` [O, K] (uint8 [O, K/32*20]: per block d, mn as fp16, then 16 bytes of two
    nibbles), or None if `w` is not exactly such blocks."""
    found = q4_blocks(w)
    if found is None:
        return None
    q, d, mn = found
    nibbles = q[..., :16] | (q[..., 16:] << 4)
    return torch.cat([_halves(d), _halves(mn), nibbles], dim=-1).reshape(w.shape[0], -1).contiguous()


def q8_layout(w: torch.Tensor) -> torch.Tensor | None:
    """The kernel's Q8 layout (uint8 [O, K/32*34]: per block d as fp16, then 32 int8), or None."""
    found = q8_blocks(w)
    if found is None:
        return None
    q, d = found
    return torch.cat([_halves(d), q.view(torch.uint8)], dim=-1).reshape(w.shape[0], -1).contiguous()


def could_be_blocks(w: torch.Tensor) -> bool:
    """Whether the first row of `w` is exactly Q4_1 or Q8_0 blocks: an ordinary fp32/bf16-trained weight fails here
    at the cost of one row, instead of the several full-size passes of the whole search (a weight that passes is
    still checked whole)."""
    row = w[:1]
    return q4_blocks(row) is not None or q8_blocks(row) is not None


class BlockWeight:
    """A weight in the kernel's layout: kind "q4" or "q8", the uint8 tensor and its address."""

    def __init__(self, kind: str, data: torch.Tensor):
        self.kind, self.data, self.ptr = kind, data, data.data_ptr()

    @classmethod
    def of(cls, w: torch.Tensor) -> "BlockWeight | None":
        with torch.no_grad():
            if not could_be_blocks(w.detach()):
                return None
            data = q4_layout(w.detach())
            if data is not None:
                return cls("q4", data)
            data = q8_layout(w.detach())
            return cls("q8", data) if data is not None else None


def block_linear(x: torch.Tensor, weight: BlockWeight, out_features: int, bias: torch.Tensor | None = None):
    """x [..., K] (fp32) times the block weight; the same as F.linear up to the order of the sums."""
    lib = _LIB or _library()
    k = x.shape[-1]
    if not x.is_contiguous():
        x = x.contiguous()
    m = x.numel() // k
    y = torch.empty(x.shape[:-1] + (out_features,), dtype=torch.float32)
    if weight.kind == "q4":
        lib.q4_matmul(x.data_ptr(), m, k, weight.ptr, out_features, y.data_ptr(), torch.get_num_threads())
    else:
        lib.q8_matmul(x.data_ptr(), m, k, weight.ptr, out_features, y.data_ptr(), torch.get_num_threads())
    if bias is not None:
        y += bias
    return y


def _forward(self, x: torch.Tensor) -> torch.Tensor:
    """nn.Linear.forward of a layer read from its blocks: the kernel for a few fp32 CPU rows without autograd, else
    torch."""
    if x.numel() <= MAX_ROWS * x.shape[-1] and x.dtype == torch.float32 and not x.is_cuda \
            and not (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)):
        return block_linear(x, self._chattune_packed, self.out_features, self.bias)
    return F.linear(x, self.weight, self.bias)


def attach_block_weights(model: torch.nn.Module) -> dict:
    """Give every CPU fp32 nn.Linear whose weight is exactly Q4_1 or Q8_0 blocks the block-weight decode path (in
    place; the fp32 weights stay, for longer inputs and gradients). Returns how many linear layers got which:
    {"q4": n, "q8": n, "fp32": n}. A weight shared by several layers is converted once. For models that are only
    run from now on (`serve`, `chat`): the blocks are a copy, so weights changed later would not be seen."""
    counts = {"q4": 0, "q8": 0, "fp32": 0}
    done: dict[int, BlockWeight | None] = {}
    for module in model.modules():
        if type(module) is not torch.nn.Linear:
            continue
        w = module.weight
        if w.device.type != "cpu" or w.dtype != torch.float32:
            counts["fp32"] += 1
            continue
        if w.data_ptr() not in done:
            done[w.data_ptr()] = BlockWeight.of(w)
        blocks = done[w.data_ptr()]
        if blocks is None:
            counts["fp32"] += 1
            continue
        module._chattune_packed = blocks  # (attribute name kept: models/decode_step.py and evaluate/run.py read it)
        module.forward = types.MethodType(_forward, module)
        counts[blocks.kind] += 1
    return counts


def enable(model: torch.nn.Module, log=print) -> dict | None:
    """Switch a loaded CPU fp32 model to the block-weight decode path where its weights allow it, saying what was
    done. Returns attach_block_weights' counts, or None where nothing changed (GPU, other dtypes, no kernel, no exact
    layer)."""
    try:
        param = next(model.parameters())
    except StopIteration:
        return None
    if param.device.type != "cpu" or param.dtype != torch.float32:
        return None
    why = why_unavailable()
    if why:
        log(f"decode: torch's fp32 matmuls ({why}; the packed-weight kernel needs AVX2 and a C compiler)")
        return None
    counts = attach_block_weights(model)
    total = sum(counts.values())
    if counts["q4"] + counts["q8"] == 0:
        log("decode: torch's fp32 matmuls (no linear layer's weights are exactly 4-bit or 8-bit blocks)")
        return None
    rest = f", {counts['fp32']} others in fp32" if counts["fp32"] else ""
    log(f"decode: {counts['q4'] + counts['q8']} of {total} linear layers read from the exact 4-/8-bit blocks their "
        f"fp32 weights hold ({counts['q4']} Q4_1, {counts['q8']} Q8_0{rest}): the same weights in fewer bytes per "
        "token (--block-weights off: fp32 matmuls)")
    return counts
