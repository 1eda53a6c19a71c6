"""A compiled CPU kernel for ``DeepMomentum``'s default step: every fp32 tensor of a list in one call.

The reference is the pure rule (``deepopt.rules.deep``) with the dot objective, identity preconditioner and no
output nonlinearity or schedule, the options of ``DeepMomentum``'s CPU loop.  Per tensor (n coordinates, nb
key blocks G of ``KD`` coordinates, the last zero-padded; ``s_k = ‖g‖/√nb``, ``r = ‖Φ‖/√nb``, 1 for a zero
tensor)::

    1. m ← α m + g,  ‖g‖²
    2. Φ = act(G W₂ᵀ·pre/s_k)  (kept),  ‖Φ‖²,  C = GᵀΦ;   W₁ ← α W₁ + η C/(s_k r nb)   (in place)
    3. W ← W − lr·(m + Φ (W₁ s_k/r)ᵀ)

with ``act(z)`` = 1/(1 + 2⁻ᶻ) − ½ for tanh (``pre`` = 2 log₂e: σ(2z) − ½ = tanh(z)/2, the ½ cancels in Φ/r),
max(z, 0) for relu (``pre`` = 1), z for identity.  Each block is one ``KD``-wide vector, the three ``KD × H``
products run in registers, and a pass reads each tensor once, which torch ops cannot do
(``docs/notes/deep-momentum-speed.md``).
``torch.get_num_threads()`` threads split every large tensor's blocks and meet at a barrier after each
reduction; small tensors are left to one thread (under 2¹² coordinates on torch's pool, 2¹⁶ on pthreads).  The
threads are torch's own OpenMP pool where torch runs on GNU OpenMP (its Linux wheels; the kernel is linked against
that very file, ``_openmp_runtime``), else pthreads of its own (also with ``DEEPOPT_CPU_KERNEL_OPENMP=0``): a
second team competes for the cores with torch's workers, which spin for a while after each op, and ran slower with
2 threads than with one after a backward pass.  Sums of squares and C are accumulated in double.

The C source below is compiled on first use with the system's C compiler (``$CC``, else ``cc``; ``-O3
-march=native``, then ``$DEEPOPT_CPU_KERNEL_FLAGS`` split on spaces, e.g. ``-mno-avx512f``) into
``$DEEPOPT_CACHE/kernels`` (default ``~/.cache/deepopt/kernels``), once per source, flags, block shape, CPU and
OpenMP runtime, and loaded with ``ctypes``.  The exponentials, square roots and reciprocals use AVX-512 where
the CPU has it (vectors of 16 coordinates in the momenta layout), else AVX2 + FMA (8), else plain vector code.
Without a compiler, or with ``DEEPOPT_CPU_KERNELS=0``, ``available`` is False and ``DeepMomentum`` takes its
torch loop, the same rule.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import math
import os
import platform
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path

import torch
from torch import Tensor

log = logging.getLogger(__name__)

ACTIVATIONS = {"identity": 0, "relu": 1, "tanh": 2}  # the C code's act codes; tanh as σ(2z) − ½
PRE = {"identity": 1.0, "relu": 1.0, "tanh": 2.0 / math.log(2.0)}  # tanh: 2z in the base-2 exponential's units
WIDTHS = (2, 4, 8, 16, 32, 64)  # the KD and H the kernel takes: whole vectors, powers of two

SOURCE = r"""
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>
#if defined(__AVX512F__) || defined(__AVX__)
#include <immintrin.h>
#endif

/* Compile-time constants: H (memory width) and KD (coordinates per key block: the blocks layout) or MJ (time
   scales: the momenta layout), -DH=.. -DKD=.. / -DMJ=.. */
#ifdef _OPENMP
#define SMALL (1 << 12)     /* tensors with fewer coordinates are left to one thread: torch's spinning pool meets at
                               a barrier in about a microsecond, */
#else
#define SMALL (1 << 16)     /* a futex-woken pthreads barrier in tens */
#endif
#define FLUSH 256           /* blocks summed in float before a flush into the double accumulators */

typedef struct { pthread_mutex_t mu; pthread_cond_t cv; int count, total, generation; } barrier_t;
typedef struct { void *c; int tid; } team_arg_t;

#ifdef _OPENMP
/* The team is the OpenMP runtime's that torch runs its own ops on (linked against the very library the process
   has loaded): its workers, still spinning after the backward's last op, take the work at once, where threads of
   our own would compete with them for the cores.  The team's size is published before any thread reads it. */
#include <omp.h>
#define TEAM_BARRIER(b) { _Pragma("omp barrier") }
int team_is_openmp(void) { return 1; }
static void team_start(barrier_t *b, const int *go) { (void)b; (void)go; }
static int run_team(void *(*fn)(void *), void *c, barrier_t *bar, int *go, int *team_nt, int nt) {
    (void)bar;
    int size = 1;
#pragma omp parallel num_threads(nt)
    {
#pragma omp single
        { *team_nt = size = omp_get_num_threads(); *go = 1; }
        team_arg_t arg = {c, omp_get_thread_num()};
        fn(&arg);
    }
    return size;
}
#else
static void barrier_wait(barrier_t *b) {
    pthread_mutex_lock(&b->mu);
    int gen = b->generation;
    if (++b->count == b->total) { b->count = 0; b->generation++; pthread_cond_broadcast(&b->cv); }
    else while (gen == b->generation) pthread_cond_wait(&b->cv, &b->mu);
    pthread_mutex_unlock(&b->mu);
}
#define TEAM_BARRIER(b) barrier_wait(b)
int team_is_openmp(void) { return 0; }

/* a started thread waits here until the team's size is final */
static void team_start(barrier_t *b, const int *go) {
    pthread_mutex_lock(&b->mu);
    while (!*go) pthread_cond_wait(&b->cv, &b->mu);
    pthread_mutex_unlock(&b->mu);
}

/* Runs fn(&{c, tid}) on a team of up to nt threads (this one is tid 0; a thread that cannot start leaves the work
   to fewer): the team's size is published to *team_nt and the barrier before *go opens; returns that size. */
static int run_team(void *(*fn)(void *), void *c, barrier_t *bar, int *go, int *team_nt, int nt) {
    pthread_mutex_init(&bar->mu, 0);
    pthread_cond_init(&bar->cv, 0);
    bar->count = 0; bar->generation = 0; *go = 0;
    pthread_t threads[64];
    team_arg_t args[64];
    int started = 0;
    for (int i = 1; i < nt; i++) {
        args[i].c = c; args[i].tid = i;
        if (pthread_create(&threads[i], 0, fn, &args[i])) break;
        started++;
    }
    pthread_mutex_lock(&bar->mu);
    *team_nt = bar->total = started + 1;
    *go = 1;
    pthread_cond_broadcast(&bar->cv);
    pthread_mutex_unlock(&bar->mu);
    args[0].c = c; args[0].tid = 0;
    fn(&args[0]);
    for (int i = 1; i <= started; i++) pthread_join(threads[i], 0);
    pthread_mutex_destroy(&bar->mu);
    pthread_cond_destroy(&bar->cv);
    return started + 1;
}
#endif

typedef struct {
    int T, nt, act;
    float **p; const float **g; float **m; float **w1; const float **w2; const int64_t *n;
    float *phi; float alpha, eta, lr, pre;
    const float *lr_ptr;             /* a tensor lr (fp32, read here), else NULL and lr holds it */
    double *sq_g, *sq_phi, *corr;   /* per thread: ‖g‖², ‖Φ‖², C (KD*H) */
    barrier_t bar;
    int go;                          /* the start gate: nt is final once it is set */
} ctx_t;

/* S 2^x: x = k + r with k = round(x) and |r| <= 1/2 (exact), 2^r by the degree-5 polynomial of least relative
   error on [-1/2, 1/2] (~9e-8); S (a constant) scales its coefficients, free.  The callers fold log2 e into
   their weights (x = z log2 e), so e^z costs no multiplication.  AVX-512 takes r and k apart in one instruction
   each and scales by 2^k with scalef; the other versions build 2^k in the exponent bits, x clamped to [-126, 127]
   first */
#define EXP2_C1 0.69314697759847210f
#define EXP2_C2 0.24022242084919213f
#define EXP2_C3 0.055507337442444925f
#define EXP2_C4 0.0096715126605633780f
#define EXP2_C5 0.0013264726899081252f

/* S 2^x for any vector type V of floats with I its int32 twin */
#define EXP2_PORTABLE(V, I, x, S) do { \
    const V lo_ = (V){0} - 126.0f, hi_ = (V){0} + 127.0f; \
    x = (V)((((I)(x < lo_)) & (I)lo_) | (~((I)(x < lo_)) & (I)x)); \
    x = (V)((((I)(x > hi_)) & (I)hi_) | (~((I)(x > hi_)) & (I)x)); \
    V k_ = (x + 12582912.0f) - 12582912.0f;   /* round to nearest */ \
    V r_ = x - k_; \
    V q_ = (S) + r_ * ((S) * EXP2_C1 + r_ * ((S) * EXP2_C2 + r_ * ((S) * EXP2_C3 + r_ * ((S) * EXP2_C4 \
                                                                              + r_ * ((S) * EXP2_C5))))); \
    I e_ = (__builtin_convertvector(k_, I) + 127) << 23; \
    x = q_ * (V)e_; \
} while (0)

/* q = S 2^r in the intrinsics of one family P (_mm512, _mm256) */
#define EXP2_POLY(P, r, q, S) do { \
    q = P##_fmadd_ps(r, P##_set1_ps((S) * EXP2_C5), P##_set1_ps((S) * EXP2_C4)); \
    q = P##_fmadd_ps(r, q, P##_set1_ps((S) * EXP2_C3)); \
    q = P##_fmadd_ps(r, q, P##_set1_ps((S) * EXP2_C2)); \
    q = P##_fmadd_ps(r, q, P##_set1_ps((S) * EXP2_C1)); \
    q = P##_fmadd_ps(r, q, P##_set1_ps(S)); \
} while (0)

#if defined(__AVX512F__)
/* S 2^x with AVX-512: x capped at 126 (a finite result, so that 1/(1 + S 2^x) is a number; min returns its second
   operand when one is NaN: a NaN stays NaN), k = roundscale, r = reduce (0 for x = -inf), q 2^k by scalef (exact
   for any k: 0 past the low end) */
static inline __attribute__((always_inline)) __m512 exp2_512(__m512 v, const float S) {
    v = _mm512_min_ps(_mm512_set1_ps(126.0f), v);
    __m512 k = _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), q;
    __m512 r = _mm512_reduce_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    EXP2_POLY(_mm512, r, q, S);
    return _mm512_scalef_ps(q, k);
}
#define EXP2_FAST(V, I, x, S) do { \
    if (sizeof(V) == 64) { __m512 v_; memcpy(&v_, &x, 64); v_ = exp2_512(v_, S); memcpy(&x, &v_, 64); } \
    else EXP2_PORTABLE(V, I, x, S); \
} while (0)
#elif defined(__AVX2__) && defined(__FMA__)
/* S 2^x with AVX2 + FMA: x clamped (min/max return their second operand when one is NaN: a NaN stays NaN), 2^k
   built in the exponent bits */
static inline __attribute__((always_inline)) __m256 exp2_256(__m256 v, const float S) {
    v = _mm256_min_ps(_mm256_set1_ps(127.0f), _mm256_max_ps(_mm256_set1_ps(-126.0f), v));
    __m256 k = _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), q, r = _mm256_sub_ps(v, k);
    EXP2_POLY(_mm256, r, q, S);
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(k), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(q, _mm256_castsi256_ps(e));
}
#define EXP2_FAST(V, I, x, S) do { \
    if (sizeof(V) % 32 == 0) \
        for (int o_ = 0; o_ < (int)sizeof(V); o_ += 32) { \
            __m256 v_; memcpy(&v_, (char *)&x + o_, 32); v_ = exp2_256(v_, S); memcpy((char *)&x + o_, &v_, 32); } \
    else EXP2_PORTABLE(V, I, x, S); \
} while (0)
#else
#define EXP2_FAST(V, I, x, S) EXP2_PORTABLE(V, I, x, S)
#endif

/* Coordinates ahead of the one being computed that a pass asks the memory for, in each of its streams (1 KB):
   the hardware's prefetchers alone leave the compute-bound passes waiting on memory (docs/meta-training.md, "The
   fused CPU step"); past a tensor's end it asks for nothing that faults */
#define AHEAD 256

#ifdef KD  /* the blocks layout: KD coordinates a key */
/* Vectors of KD and H floats (both powers of two); GCC/Clang vector extensions, any instruction set. */
typedef float vk __attribute__((vector_size(4 * KD)));
typedef float vh __attribute__((vector_size(4 * H)));
typedef int32_t vhi __attribute__((vector_size(4 * H)));

static inline vk load_k(const float *x) { vk v; memcpy(&v, x, sizeof v); return v; }
static inline vh load_h(const float *x) { vh v; memcpy(&v, x, sizeof v); return v; }
static inline void store_k(float *x, vk v) { memcpy(x, &v, sizeof v); }
static inline void store_h(float *x, vh v) { memcpy(x, &v, sizeof v); }
static inline vh select_h(vhi mask, vh a, vh b) { return (vh)(((vhi)a & mask) | ((vhi)b & ~mask)); }

static inline vh exp2_h(vh x) {
    EXP2_FAST(vh, vhi, x, 1.0f);
    return x;
}

static inline vh activate(vh z, int act) {
    if (act == 2) return 1.0f / (1.0f + exp2_h(-z)) - 0.5f;
    if (act == 1) return select_h(z > 0.0f, z, (vh){0});
    return z;
}

static inline double safe_rms(double sq, int64_t nb) { return sqrt((sq > 0.0 ? sq : 1.0) / (double)nb); }

/* block b of g (zero-padded past n) */
static inline vk key_block(const float *g, int64_t b, int64_t n) {
    if ((b + 1) * KD <= n) return load_k(g + b * KD);
    vk v = {0};
    for (int i = 0; b * KD + i < n; i++) v[i] = g[b * KD + i];
    return v;
}

static void *worker(void *argp) {
    team_arg_t *a = (team_arg_t *)argp;
    ctx_t *c = (ctx_t *)a->c;
    const int tid = a->tid;
    team_start(&c->bar, &c->go);
    vh w2t[KD], acc[KD];
    vk w1t[H];
    double cacc[KD * H];
    for (int t = 0; t < c->T; t++) {
        const int64_t n = c->n[t], nb = (n + KD - 1) / KD, full = n / KD;
        const int team = n < SMALL ? 1 : c->nt;
        if (tid >= team) continue;
        const int64_t b0 = nb * tid / team, b1 = nb * (tid + 1) / team;
        float *p = c->p[t], *m = c->m[t], *w1 = c->w1[t], *phi = c->phi;
        const float *g = c->g[t], *w2 = c->w2[t];
        const float alpha = c->alpha;
        const int act = c->act;
        /* 1. m <- alpha m + g, |g|^2 (in KD lanes, flushed into a double) */
        double sq = 0.0;
        for (int64_t bs = b0; bs < b1; bs += FLUSH) {
            const int64_t be = bs + FLUSH < b1 ? bs + FLUSH : b1;
            vk lanes = {0};
            for (int64_t b = bs; b < be && b < full; b++) {
                vk gv = load_k(g + b * KD);
                lanes += gv * gv;
                store_k(m + b * KD, alpha * load_k(m + b * KD) + gv);
            }
            for (int i = 0; i < KD; i++) sq += lanes[i];
        }
        if (b1 > full)
            for (int64_t i = full * KD; i < n; i++) { sq += (double)g[i] * g[i]; m[i] = alpha * m[i] + g[i]; }
        c->sq_g[tid] = sq;
        if (team > 1) TEAM_BARRIER(&c->bar);
        double sqk = 0.0;
        for (int j = 0; j < team; j++) sqk += c->sq_g[j];
        const double s_k = safe_rms(sqk, nb);
        const float scale = (float)(c->pre / s_k);
        for (int i = 0; i < KD; i++) for (int j = 0; j < H; j++) w2t[i][j] = w2[j * KD + i] * scale;
        /* 2. phi = act(G W2^T pre/s_k), |phi|^2, C = G^T phi */
        for (int k = 0; k < KD * H; k++) cacc[k] = 0.0;
        double sqp = 0.0;
        for (int64_t bs = b0; bs < b1; bs += FLUSH) {
            const int64_t be = bs + FLUSH < b1 ? bs + FLUSH : b1;
            for (int i = 0; i < KD; i++) acc[i] = (vh){0};
            vh lanes = {0};
            for (int64_t b = bs; b < be; b++) {
                __builtin_prefetch(g + b * KD + AHEAD);
                vk gb = key_block(g, b, n);
                vh z0 = {0}, z1 = {0};   /* two chains: the FMAs' latency overlaps */
                for (int i = 0; i < KD; i += 2) { z0 += gb[i] * w2t[i]; z1 += gb[i + 1] * w2t[i + 1]; }
                vh z = z0 + z1;
                z = activate(z, act);
                store_h(phi + b * H, z);
                lanes += z * z;
                for (int i = 0; i < KD; i++) acc[i] += gb[i] * z;
            }
            for (int j = 0; j < H; j++) sqp += lanes[j];
            for (int i = 0; i < KD; i++) for (int j = 0; j < H; j++) cacc[i * H + j] += acc[i][j];
        }
        c->sq_phi[tid] = sqp;
        memcpy(c->corr + (int64_t)tid * KD * H, cacc, sizeof cacc);
        if (team > 1) TEAM_BARRIER(&c->bar);
        double sqf = 0.0;
        for (int j = 0; j < team; j++) sqf += c->sq_phi[j];
        const double r = safe_rms(sqf, nb);
        /* W1 <- alpha W1 + eta C/(s_k r nb), computed by every thread; W1 s_k/r, transposed, for the read */
        float w1new[KD * H];
        const double cs = c->eta / (s_k * r * (double)nb);
        for (int k = 0; k < KD * H; k++) {
            double sum = 0.0;
            for (int j = 0; j < team; j++) sum += c->corr[(int64_t)j * KD * H + k];
            w1new[k] = (float)(sum * cs) + alpha * w1[k];
        }
        const float rs = (float)(s_k / r);
        for (int i = 0; i < KD; i++) for (int j = 0; j < H; j++) w1t[j][i] = w1new[i * H + j] * rs;
        if (team > 1) TEAM_BARRIER(&c->bar);   /* every thread has read the old W1 */
        if (tid == 0) memcpy(w1, w1new, sizeof w1new);
        /* 3. W <- W - lr (m + phi (W1 s_k/r)^T) */
        const float lr = c->lr_ptr ? *c->lr_ptr : c->lr;
        for (int64_t b = b0; b < b1; b++) {
            __builtin_prefetch(phi + b * H + AHEAD); __builtin_prefetch(p + b * KD + AHEAD);
            __builtin_prefetch(m + b * KD + AHEAD);
            vh ph = load_h(phi + b * H);
            vk u0 = {0}, u1 = {0};
            for (int j = 0; j < H; j += 2) { u0 += ph[j] * w1t[j]; u1 += ph[j + 1] * w1t[j + 1]; }
            vk u = u0 + u1;
            if (b < full) store_k(p + b * KD, load_k(p + b * KD) - lr * (load_k(m + b * KD) + u));
            else for (int i = 0; b * KD + i < n; i++) p[b * KD + i] -= lr * (m[b * KD + i] + u[i]);
        }
        if (team > 1) TEAM_BARRIER(&c->bar);   /* phi and the per-thread slots are reused by the next tensor */
    }
    return 0;
}

int deep_momentum_step(int T, float **p, const float **g, float **m, float **w1, const float **w2,
                       const int64_t *n, float *phi, double *slots, float alpha, float eta, float lr,
                       const float *lr_ptr, float pre, int act, int nt) {
    /* slots: 2*nt + nt*KD*H doubles */
    ctx_t c = {T, nt, act, p, g, m, w1, w2, n, phi, alpha, eta, lr, pre, lr_ptr, slots, slots + nt, slots + 2 * nt};
    return run_team(worker, &c, &c.bar, &c.go, &c.nt, nt);
}
#endif

/* ---- keys="momenta" (the shipped learned optimizer): every coordinate one key, one pass per tensor ----
   H hidden units, MJ time scales, MACT the features (0 tanh, 1 softsign) (compile-time: -DH=.. -DMJ=.. -DMACT=..),
   F = 2 + MJ keys; VL coordinates a vector. */
#ifdef MJ
#ifndef DOG
#define DOG 0   /* 1: also sum |u|^2 and |W_new - W_0|^2 per tensor (lr_adapt="dog") */
#endif
#if defined(__AVX512F__)
#define VL 16   /* one zmm register a vector: acc[H] and the keys stay in the 32 registers */
#else
#define VL 8    /* one ymm register (AVX2): 16 wide would spill acc[H] out of the 16 registers */
#endif
typedef float vc __attribute__((vector_size(4 * VL)));
typedef int32_t vci __attribute__((vector_size(4 * VL)));
static inline vc load_c(const float *x) { vc v; memcpy(&v, x, sizeof v); return v; }
static inline void store_c(float *x, vc v) { memcpy(x, &v, sizeof v); }
/* sqrt over a vector: AVX-512's or AVX's instruction, else per lane */
static inline vc sqrt_c(vc x) {
#if defined(__AVX512F__)
    for (int half = 0; half < VL / 16; half++) {
        __m512 v;
        memcpy(&v, (float *)&x + 16 * half, 64);
        v = _mm512_sqrt_ps(v);
        memcpy((float *)&x + 16 * half, &v, 64);
    }
#elif defined(__AVX__)
    for (int half = 0; half < VL / 8; half++) {
        __m256 v;
        memcpy(&v, (float *)&x + 8 * half, 32);
        v = _mm256_sqrt_ps(v);
        memcpy((float *)&x + 8 * half, &v, 32);
    }
#else
    for (int i = 0; i < VL; i++) x[i] = sqrtf(x[i]);
#endif
    return x;
}
/* ~1/x: AVX-512's rcp14 (14 bits), AVX2's rcp (12 bits), else 1/x per lane; one Newton step r(2 - x r) then has a
   relative error ~1e-7 */
static inline vc rcp_c(vc x) {
#if defined(__AVX512F__)
    for (int half = 0; half < VL / 16; half++) {
        __m512 v; memcpy(&v, (float *)&x + 16 * half, 64);
        v = _mm512_rcp14_ps(v);
        memcpy((float *)&x + 16 * half, &v, 64);
    }
    return x;
#elif defined(__AVX__)
    for (int half = 0; half < VL / 8; half++) {
        __m256 v; memcpy(&v, (float *)&x + 8 * half, 32);
        v = _mm256_rcp_ps(v);
        memcpy((float *)&x + 8 * half, &v, 32);
    }
    return x;
#else
    return 1.0f / x;
#endif
}
static inline vc recip_c(vc x) { vc r = rcp_c(x); return r * (2.0f - x * r); }

typedef struct {
    int T, nt;
    float **p; const float **g; float **m; float **v; float **e; float **w1; const float **w2;
    const float *w1_0; const int64_t *n; const float *lr, *bc2, *eps;   /* per tensor: lr_t, 1 - beta2^t, eps_t */
    float alpha, beta2, eta, wd, gamma[MJ];
    double *corr;                                                   /* 2 parities x nt threads x (H + 2) */
    const float **x0; double *dog;                                  /* DOG: W_0, and per tensor |u|^2, |W - W_0|^2 */
    barrier_t bar;
    int go;
} mctx_t;

/* One tensor's scalars, copied out of the context so that the stores of a block cannot alias them */
typedef struct { float lr, inv_bc2, alpha, beta2, eps, wd, gamma[MJ]; } mscal_t;

/* The features Phi = act(a), a = W2 k, from z = W2S_SCALE a (-DMACT=..).  tanh(a) = 2/(1 + e^-2a) - 1 with
   z = -2a log2 e: d = (1 + 2^z)/2 (the half folded into the exponential's coefficients), s ~ 1/d (rcp), and one
   Newton step folded into the read-out, Phi = s(2 - d s) - 1.  softsign(a) = a/(1 + |a|) with z = a */
#if MACT == 1
#define W2S_SCALE 1.0f
static inline vc features_c(vc z) { return z * recip_c(1.0f + (vc)((vci)z & 0x7fffffff)); }
#else
#define W2S_SCALE -2.8853900817779268f
static inline vc features_c(vc z) {
    EXP2_FAST(vc, vci, z, 0.5f);
    vc d = 0.5f + z, s = rcp_c(d);
    return s * (2.0f - d * s) - 1.0f;
}
#endif

/* VL coordinates i0.. of a tensor: the rule's per-coordinate step; C[h] += p_i Phi_ih in `acc`; w2s = W2S_SCALE W2;
   with DOG, sq[0] += u^2 and sq[1] += (W_new - W_0)^2 */
static inline __attribute__((always_inline)) void momenta_block(const mscal_t k, float *p, const float *g,
                                                                float *m, float *v, float *e, const float *x0,
                                                                int64_t n, int64_t i0, const float *w1,
                                                                const float *w2s, vc acc[H], vc sq[2]) {
    __builtin_prefetch(g + i0 + AHEAD); __builtin_prefetch(v + i0 + AHEAD); __builtin_prefetch(m + i0 + AHEAD);
    __builtin_prefetch(p + i0 + AHEAD);
    if (DOG) __builtin_prefetch(x0 + i0 + AHEAD);
    for (int j = 0; j < MJ; j++) __builtin_prefetch(e + j * n + i0 + AHEAD);
    vc gv = load_c(g + i0), vv = k.beta2 * load_c(v + i0) + (1.0f - k.beta2) * gv * gv;
    store_c(v + i0, vv);
    vc pv = gv / (sqrt_c(vv * k.inv_bc2) + k.eps), mv = k.alpha * load_c(m + i0) + pv, key[2 + MJ];
    store_c(m + i0, mv);
    key[0] = pv;
    key[1] = (1.0f - k.alpha) * mv;
#pragma GCC unroll 8
    for (int j = 0; j < MJ; j++) {
        vc ej = k.gamma[j] * load_c(e + j * n + i0) + (1.0f - k.gamma[j]) * pv;
        store_c(e + j * n + i0, ej);
        key[2 + j] = ej;
    }
    vc read = {0};
#pragma GCC unroll 64
    for (int h = 0; h < H; h++) {   /* unrolled: acc and key stay in registers */
        vc z = (vc){0};
#pragma GCC unroll 8
        for (int f = 0; f < 2 + MJ; f++) z += w2s[h * (2 + MJ) + f] * key[f];
        vc phi = features_c(z);
        read += w1[h] * phi;
        acc[h] += pv * phi;
    }
    vc w = load_c(p + i0), u = mv + read, wn = w - k.lr * (u + k.wd * w);   /* W - lr_t (u + wd W): decoupled decay */
    store_c(p + i0, wn);
#if DOG
    vc d = wn - load_c(x0 + i0);
    sq[0] += u * u;
    sq[1] += d * d;
#else
    (void)x0; (void)sq;
#endif
}

static void *momenta_worker(void *argp) {
    team_arg_t *a = (team_arg_t *)argp;
    mctx_t *c = (mctx_t *)a->c;
    const int tid = a->tid;
    team_start(&c->bar, &c->go);
    for (int t = 0; t < c->T; t++) {
        const int64_t n = c->n[t], nv = n / VL;
        const int team = n < SMALL ? 1 : c->nt;
        double *slot = c->corr + ((int64_t)(t & 1) * c->nt + tid) * (H + 2);
        if (tid < team) {
            const int64_t b0 = nv * tid / team, b1 = nv * (tid + 1) / team;
            float w1[H], w2s[H * (2 + MJ)];
            for (int h = 0; h < H; h++) w1[h] = c->w1[t][h];
            for (int f = 0; f < H * (2 + MJ); f++) w2s[f] = W2S_SCALE * c->w2[t][f];
            mscal_t k = {c->lr[t], 1.0f / c->bc2[t], c->alpha, c->beta2, c->eps[t], c->wd, {0}};
            for (int j = 0; j < MJ; j++) k.gamma[j] = c->gamma[j];
            float *p = c->p[t], *m = c->m[t], *v = c->v[t], *e = c->e[t];
            const float *g = c->g[t], *x0 = DOG ? c->x0[t] : 0;
            for (int h = 0; h < H + 2; h++) slot[h] = 0.0;
            vc acc[H], sq[2];
            for (int64_t bs = b0; bs < b1; bs += FLUSH) {
                for (int h = 0; h < H; h++) acc[h] = (vc){0};
                sq[0] = sq[1] = (vc){0};
                const int64_t be = bs + FLUSH < b1 ? bs + FLUSH : b1;
                for (int64_t b = bs; b < be; b++) momenta_block(k, p, g, m, v, e, x0, n, b * VL, w1, w2s, acc, sq);
                for (int h = 0; h < H; h++) for (int i = 0; i < VL; i++) slot[h] += acc[h][i];
                if (DOG) for (int i = 0; i < VL; i++) { slot[H] += sq[0][i]; slot[H + 1] += sq[1][i]; }
            }
            if (tid == team - 1 && nv * VL < n) {   /* the tail, zero-padded: p = 0 there adds nothing to C, */
                const int64_t r = n - nv * VL;   /* nor u = 0 and W = W_0 = 0 to the DoG sums */
                float tp[VL] = {0}, tg[VL] = {0}, tm[VL] = {0}, tv[VL] = {0}, tx[VL] = {0}, te[MJ * VL];
                memset(te, 0, sizeof te);
                for (int64_t i = 0; i < r; i++) {
                    tp[i] = p[nv * VL + i]; tg[i] = g[nv * VL + i]; tm[i] = m[nv * VL + i]; tv[i] = v[nv * VL + i];
                    if (DOG) tx[i] = x0[nv * VL + i];
                    for (int j = 0; j < MJ; j++) te[j * VL + i] = e[j * n + nv * VL + i];
                }
                for (int h = 0; h < H; h++) acc[h] = (vc){0};
                sq[0] = sq[1] = (vc){0};
                momenta_block(k, tp, tg, tm, tv, te, tx, VL, 0, w1, w2s, acc, sq);
                for (int h = 0; h < H; h++) for (int i = 0; i < VL; i++) slot[h] += acc[h][i];
                if (DOG) for (int i = 0; i < VL; i++) { slot[H] += sq[0][i]; slot[H + 1] += sq[1][i]; }
                for (int64_t i = 0; i < r; i++) {
                    p[nv * VL + i] = tp[i]; m[nv * VL + i] = tm[i]; v[nv * VL + i] = tv[i];
                    for (int j = 0; j < MJ; j++) e[j * n + nv * VL + i] = te[j * VL + i];
                }
            }
        }
        if (team > 1) TEAM_BARRIER(&c->bar);   /* every thread's C is in; the W1 reads of this tensor are done */
        if (tid == 0) {   /* W1 <- alpha W1 + (1 - alpha) W1_0 + eta C/n */
            double *slots = c->corr + (int64_t)(t & 1) * c->nt * (H + 2);
#if DOG
            for (int q = 0; q < 2; q++) {   /* |u|^2 and |W - W_0|^2 of the tensor */
                double sum = 0.0;
                for (int j = 0; j < team; j++) sum += slots[j * (H + 2) + H + q];
                c->dog[2 * t + q] = sum;
            }
#endif
            for (int h = 0; h < H; h++) {
                double sum = 0.0;
                for (int j = 0; j < team; j++) sum += slots[j * (H + 2) + h];
                c->w1[t][h] = c->alpha * c->w1[t][h] + (1.0f - c->alpha) * c->w1_0[h]
                              + (float)(c->eta * sum / (double)(n > 0 ? n : 1));
            }
        }
    }
    return 0;
}

int momenta_step(int T, float **p, const float **g, float **m, float **v, float **e, float **w1, const float **w2,
                 const float *w1_0, const int64_t *n, const float *lr, const float *bc2, const float *eps,
                 const float *gamma, float alpha, float beta2, float eta, float wd, double *corr, int nt,
                 const float **x0, double *dog) {
    /* corr: 2 * nt * (H + 2) doubles; x0 (T tensors) and dog (2 T doubles) are read / written with DOG only */
    mctx_t c = {T, nt, p, g, m, v, e, w1, w2, w1_0, n, lr, bc2, eps, alpha, beta2, eta, wd, {0}, corr, x0, dog};
    for (int j = 0; j < MJ; j++) c.gamma[j] = gamma[j];
    return run_team(momenta_worker, &c, &c.bar, &c.go, &c.nt, nt);
}
#endif
"""


def _cache_dir() -> Path:
    return Path(os.environ.get("DEEPOPT_CACHE", Path.home() / ".cache" / "deepopt")) / "kernels"


def _cpu_signature() -> str:
    """What ``-march=native`` depends on: the machine and, on Linux, the CPU's model and flags."""
    text = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            text += "".join(line for line in f if line.startswith(("model name", "flags", "Features")))[:4096]
    except OSError:
        pass
    return text


@cache
def _openmp_runtime() -> Path | None:
    """The GNU OpenMP runtime (``libgomp``) torch runs its ops on, read from ``/proc/self/maps``: the one inside
    torch's package (its Linux wheels ship one), else the only one mapped; None where there is none, where several
    are mapped and none is torch's (scikit-learn's wheels bring their own), or with ``DEEPOPT_CPU_KERNEL_OPENMP=0``."""
    if os.environ.get("DEEPOPT_CPU_KERNEL_OPENMP", "1") == "0":
        return None
    try:
        with open("/proc/self/maps") as f:
            paths = {Path(line.split()[-1]) for line in f if "/libgomp" in line}
    except OSError:
        return None
    package = Path(torch.__file__).resolve().parent
    own = [path for path in paths if path.resolve().is_relative_to(package)]
    if len(own) == 1:
        return own[0]
    return paths.pop() if len(paths) == 1 else None


def _compile(compiler: str, flags: list[str], out: Path, runtime: Path | None) -> None:
    """``SOURCE`` into the shared library ``out``; with ``runtime``, an OpenMP build linked against that very file
    (not the compiler's own ``-lgomp``, which could load a second runtime beside torch's)."""
    src = out.with_name("deep_momentum.c")
    src.write_text(SOURCE)
    run = dict(check=True, capture_output=True, timeout=120)
    if runtime is None:
        subprocess.run([compiler, *flags, str(src), "-o", str(out), "-lm"], **run)
        return
    obj = out.with_suffix(".o")
    subprocess.run([compiler, *flags, "-fopenmp", "-c", str(src), "-o", str(obj)], **run)
    subprocess.run([compiler, *flags, str(obj), "-o", str(out), str(runtime), f"-Wl,-rpath,{runtime.parent}", "-lm"],
                   **run)


def _build(name: str, defines: tuple[tuple[str, int], ...]) -> ctypes.CDLL | None:
    """``SOURCE`` compiled with ``-D`` these into ``deep_momentum_{name}_{digest}.so``, built once per source,
    defines, CPU and OpenMP runtime (the file is the cache): its threads are torch's OpenMP pool where the process
    has one (``_openmp_runtime``), else its own pthreads (also where the OpenMP build fails); None without a
    compiler or when the build fails."""
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None:
        log.info("deepopt: no C compiler found; DeepMomentum uses its torch CPU loop")
        return None
    flags = ["-O3", "-march=native", "-fPIC", "-shared", "-pthread", "-std=gnu11", *(f"-D{k}={v}" for k, v in defines),
             *os.environ.get("DEEPOPT_CPU_KERNEL_FLAGS", "").split()]
    error: Exception | None = None
    for runtime in dict.fromkeys((_openmp_runtime(), None)):
        digest = hashlib.sha256("\n".join([SOURCE, compiler, *flags, _cpu_signature(), str(runtime)]).encode())
        path = _cache_dir() / f"deep_momentum_{name}_{digest.hexdigest()[:16]}.so"
        try:
            if not path.exists():
                path.parent.mkdir(parents=True, exist_ok=True)
                with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
                    out = Path(tmp) / "lib.so"
                    _compile(compiler, flags, out, runtime)
                    os.replace(out, path)  # atomic: concurrent builds (test workers) leave one whole file
            return ctypes.CDLL(str(path))
        except (OSError, subprocess.SubprocessError) as e:
            error = e
    log.info("deepopt: could not build the DeepMomentum CPU kernel (%s); using the torch CPU loop", error)
    return None


def team_kind(lib: ctypes.CDLL) -> str:
    """The threads a built kernel runs on: ``"openmp"`` (the process's GNU OpenMP pool, torch's) or ``"pthreads"``."""
    return "openmp" if lib.team_is_openmp() else "pthreads"


_PTRS = ctypes.POINTER(ctypes.c_void_p)


@cache
def _library(key_dim: int, hidden: int) -> ctypes.CDLL | None:
    """The blocks layout's kernel for ``KD = key_dim``, ``H = hidden``."""
    lib = _build(f"{key_dim}x{hidden}", (("KD", key_dim), ("H", hidden)))
    if lib is not None:
        fn = lib.deep_momentum_step
        fn.argtypes = [ctypes.c_int, _PTRS, _PTRS, _PTRS, _PTRS, _PTRS, ctypes.POINTER(ctypes.c_int64), ctypes.c_void_p,
                       ctypes.c_void_p, ctypes.c_float, ctypes.c_float, ctypes.c_float, ctypes.c_void_p,
                       ctypes.c_float, ctypes.c_int, ctypes.c_int]
        fn.restype = ctypes.c_int
    return lib


@cache
def _momenta_library(hidden: int, timescales: int, activation: str = "tanh", dog: bool = False) -> ctypes.CDLL | None:
    """The momenta layout's kernel for ``H = hidden``, ``MJ = timescales``, the features ``activation`` and,
    with ``dog``, the sums of ``lr_adapt="dog"``."""
    lib = _build(f"momenta_{activation}_h{hidden}_j{timescales}{'_dog' if dog else ''}",
                 (("H", hidden), ("MJ", timescales), ("MACT", MOMENTA_ACTIVATIONS[activation]), ("DOG", int(dog))))
    if lib is not None:
        fn = lib.momenta_step
        fn.argtypes = [ctypes.c_int, *([_PTRS] * 7), ctypes.c_void_p, ctypes.POINTER(ctypes.c_int64),
                       *([ctypes.c_void_p] * 4), *([ctypes.c_float] * 4), ctypes.c_void_p,
                       ctypes.c_int, _PTRS, ctypes.c_void_p]
        fn.restype = ctypes.c_int
    return lib


def available(key_dim: int, hidden: int, activation: str) -> bool:
    """Whether the kernel can run this configuration: enabled (``DEEPOPT_CPU_KERNELS`` ≠ "0"), a block shape
    in ``WIDTHS``, a supported activation, and a C compiler to build it (tried once per shape)."""
    if os.environ.get("DEEPOPT_CPU_KERNELS", "1") == "0" or activation not in ACTIVATIONS:
        return False
    return all(w in WIDTHS for w in (key_dim, hidden)) and _library(key_dim, hidden) is not None


def deep_momentum_step_(params: list[Tensor], grads: list[Tensor], bufs: list[Tensor], w1: list[Tensor],
                        w2: list[Tensor], lr: float | Tensor, alpha: float, eta: float, activation: str,
                        phi: Tensor, threads: int | None = None) -> None:
    """One step of the rule (module docstring) over contiguous fp32 CPU tensors, in place on ``params``,
    ``bufs`` (momentum) and ``w1`` (``(KD, H)`` each); ``phi`` is a work buffer of at least
    ``max_i ceil(n_i/KD)·H`` floats.  A tensor ``lr`` is read by the kernel (no ``.item()``).  ``available``
    must hold."""
    kd, hidden = w1[0].shape
    lib = _library(kd, hidden)
    threads = max(1, min(64, threads or torch.get_num_threads()))
    count = len(params)
    table = ctypes.c_void_p * count

    def pointers(ts: list[Tensor]):
        return table(*(t.data_ptr() for t in ts))

    numels = (ctypes.c_int64 * count)(*(p.numel() for p in params))
    slots = torch.empty(threads * (2 + kd * hidden), dtype=torch.float64)
    lr_tensor = lr.detach().to(torch.float32) if isinstance(lr, Tensor) else None
    lib.deep_momentum_step(count, pointers(params), pointers(grads), pointers(bufs), pointers(w1), pointers(w2),
                           numels, phi.data_ptr(), slots.data_ptr(), alpha, eta,
                           0.0 if lr_tensor is not None else lr, None if lr_tensor is None else lr_tensor.data_ptr(),
                           PRE[activation], ACTIVATIONS[activation], threads)


MOMENTA_HIDDEN = (1, 2, 4, 8, 16, 32, 64)  # the H the momenta kernel takes
MAX_TIMESCALES = 4
MOMENTA_ACTIVATIONS = {"tanh": 0, "softsign": 1}  # both momenta kernels' features: their MACT (C) / ACT codes


def momenta_available(hidden: int, timescales: int, activation: str = "tanh", dog: bool = False) -> bool:
    """Whether the momenta layout's kernel can run: enabled, features in ``MOMENTA_ACTIVATIONS``, ``hidden`` in
    ``MOMENTA_HIDDEN``, 1 to ``MAX_TIMESCALES`` time scales, and a C compiler to build it."""
    return (os.environ.get("DEEPOPT_CPU_KERNELS", "1") != "0" and activation in MOMENTA_ACTIVATIONS
            and hidden in MOMENTA_HIDDEN and 1 <= timescales <= MAX_TIMESCALES
            and _momenta_library(hidden, timescales, activation, dog) is not None)


def momenta_step_(params: list[Tensor], grads: list[Tensor], bufs: list[Tensor], exp_avg_sqs: list[Tensor],
                  timescale_bufs: list[Tensor], w1: list[Tensor], w2: list[Tensor], w1_0: Tensor, lr: Tensor,
                  bias_correction2: Tensor, timescales: Tensor, alpha: float, beta2: float, eps: float | Tensor,
                  eta: float, weight_decay: float, activation: str = "tanh", threads: int | None = None,
                  origins: list[Tensor] | None = None) -> Tensor | None:
    """One step of the momenta layout (the shipped learned optimizer: Adam preconditioner, tanh or softsign
    features σ, dot objective, W₂ fixed, decoupled weight decay) over contiguous fp32 CPU tensors, in place on
    ``params``, ``bufs`` (m), ``exp_avg_sqs`` (v), ``timescale_bufs`` (e, ``(J, *shape)``) and ``w1`` (``(1, H)``
    each; ``w2`` is ``(H, 2 + J)``).  Per coordinate i, with ``lr`` and ``bias_correction2`` ``(T,)`` fp32 tensors
    of the tensors' ``lr_t`` and ``1 − β₂ᵗ``, and ``eps`` a number or a ``(T,)`` tensor (``relative_eps``'s per-tensor
    ε + κρ)::

        v ← β₂v + (1 − β₂)g²;   p = g/(√(v/(1 − β₂ᵗ)) + ε);   m ← αm + p;   e_j ← γ_j e_j + (1 − γ_j)p
        k = (p, (1 − α)m, e_1 … e_J);   Φ = σ(W₂k);   W ← W − lr_t·(m + W₁Φ) − lr_t·wd·W   (wd: the decay's rate λ)
        W₁ ← αW₁ + (1 − α)W₁⁰ + η·mean_i(p_i Φ_i)                        (after the pass: W₁ is read before)

    One pass over each tensor (threads split the large ones), C summed in double.  With ``origins`` (W₀ of each
    tensor, ``lr_adapt="dog"``) the pass also sums ``‖u‖²`` and ``‖W_new − W₀‖²`` per tensor and returns them as a
    ``(T, 2)`` fp64 tensor (else None).  ``momenta_available`` must hold."""
    hidden, count, n_scales = w1[0].shape[-1], len(params), timescales.numel()
    lib = _momenta_library(hidden, n_scales, activation, origins is not None)
    threads = max(1, min(64, threads or torch.get_num_threads()))
    table = ctypes.c_void_p * count

    def pointers(ts: list[Tensor]):
        return table(*(t.data_ptr() for t in ts))

    numels = (ctypes.c_int64 * count)(*(p.numel() for p in params))
    corr = torch.empty(2 * threads * (hidden + 2), dtype=torch.float64)
    dog = None if origins is None else torch.zeros(count, 2, dtype=torch.float64)
    eps = eps.expand(count) if isinstance(eps, Tensor) else torch.full((count,), float(eps))
    lr, bc2, eps, gammas, anchor = (x.detach().to(torch.float32).contiguous()
                                    for x in (lr, bias_correction2, eps, timescales, w1_0))
    lib.momenta_step(count, pointers(params), pointers(grads), pointers(bufs), pointers(exp_avg_sqs),
                     pointers(timescale_bufs), pointers(w1), pointers(w2), anchor.data_ptr(), numels, lr.data_ptr(),
                     bc2.data_ptr(), eps.data_ptr(), gammas.data_ptr(), alpha, beta2, eta, weight_decay,
                     corr.data_ptr(),
                     threads, None if origins is None else pointers(origins), None if dog is None else dog.data_ptr())
    return dog
