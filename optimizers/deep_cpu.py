"""A compiled CPU kernel for ``DeepMomentum``'s default step: every fp32 tensor of a list in one call.

The reference is the pure rule (``deepopt.rules.deep``) with the dot objective, identity preconditioner and no
output nonlinearity or schedule, the options of ``DeepMomentum``'s CPU loop.  Per tensor (n coordinates, nb
key blocks G of ``KD`` coordinates, the last zero-padded; ``s_k = ‖g‖/√nb``, ``r = ‖Φ‖/√nb``, 1 for a zero
tensor)::

    1. m ← α m + g,  ‖g‖²
    2. Φ = act(G W₂ᵀ·pre/s_k)  (kept),  ‖Φ‖²,  C = GᵀΦ;   W₁ ← α W₁ + η C/(s_k r nb)   (in place)
    3. W ← W − lr·(m + Φ (W₁ s_k/r)ᵀ)

with ``act(z)`` = σ(z) − ½ for tanh (``pre`` = 2: σ(2z) − ½ = tanh(z)/2, the ½ cancels in Φ/r), max(z, 0) for
relu (``pre`` = 1), z for identity.  Each block is one ``KD``-wide vector, the three ``KD × H`` products run in
registers, and a pass reads each tensor once, which torch ops cannot do (``docs/notes/deep-momentum-speed.md``).
Threads (pthreads, ``torch.get_num_threads()``) split every large tensor's blocks and meet at a barrier after
each reduction; small tensors are left to one thread.  Sums of squares and C are accumulated in double.

The C source below is compiled on first use with the system's C compiler (``$CC``, else ``cc``; ``-O3
-march=native``) into ``$DEEPOPT_CACHE/kernels`` (default ``~/.cache/deepopt/kernels``), once per source, block
shape and CPU, and loaded with ``ctypes``.  Without a compiler, or with ``DEEPOPT_CPU_KERNELS=0``, ``available``
is False and ``DeepMomentum`` takes its torch loop, the same rule.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
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
PRE = {"identity": 1.0, "relu": 1.0, "tanh": 2.0}
WIDTHS = (2, 4, 8, 16, 32, 64)  # the KD and H the kernel takes: whole vectors, powers of two

SOURCE = r"""
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

/* KD (coordinates per key block) and H (memory width) are compile-time constants: -DKD=.. -DH=.. */
#define SMALL (1 << 16)     /* tensors with fewer coordinates are left to one thread */
#define FLUSH 256           /* blocks summed in float before a flush into the double accumulators */

typedef struct { pthread_mutex_t mu; pthread_cond_t cv; int count, total, generation; } barrier_t;

static void barrier_wait(barrier_t *b) {
    pthread_mutex_lock(&b->mu);
    int gen = b->generation;
    if (++b->count == b->total) { b->count = 0; b->generation++; pthread_cond_broadcast(&b->cv); }
    else while (gen == b->generation) pthread_cond_wait(&b->cv, &b->mu);
    pthread_mutex_unlock(&b->mu);
}

typedef struct {
    int T, nt, act;
    float **p; const float **g; float **m; float **w1; const float **w2; const int64_t *n;
    float *phi; float alpha, eta, lr, pre;
    const float *lr_ptr;             /* a tensor lr (fp32, read here), else NULL and lr holds it */
    double *sq_g, *sq_phi, *corr;   /* per thread: ‖g‖², ‖Φ‖², C (KD*H) */
    barrier_t bar;
    int go;                          /* the start gate: nt is final once it is set */
} ctx_t;

typedef struct { ctx_t *c; int tid; } arg_t;

/* Vectors of KD and H floats (both powers of two); GCC/Clang vector extensions, any instruction set. */
typedef float vk __attribute__((vector_size(4 * KD)));
typedef float vh __attribute__((vector_size(4 * H)));
typedef int32_t vhi __attribute__((vector_size(4 * H)));

static inline vk load_k(const float *x) { vk v; memcpy(&v, x, sizeof v); return v; }
static inline vh load_h(const float *x) { vh v; memcpy(&v, x, sizeof v); return v; }
static inline void store_k(float *x, vk v) { memcpy(x, &v, sizeof v); }
static inline void store_h(float *x, vh v) { memcpy(x, &v, sizeof v); }
static inline vh select_h(vhi mask, vh a, vh b) { return (vh)(((vhi)a & mask) | ((vhi)b & ~mask)); }

/* e^x, x clamped to [-87, 88]: x = k ln2 + r, e^r by a degree-6 polynomial (relative error ~2e-7) */
static inline vh exp_h(vh x) {
#if defined(__AVX512F__)
    if (sizeof(vh) == 64) {   /* the same steps with AVX-512's min/max, rounding and scaling by 2^k */
        __m512 v, k, r, s;
        vh q;
        memcpy(&v, &x, 64);
        /* max/min return their second operand when one is NaN: a NaN z stays NaN, as in the rule */
        v = _mm512_min_ps(_mm512_set1_ps(88.0f), _mm512_max_ps(_mm512_set1_ps(-87.0f), v));
        k = _mm512_roundscale_ps(_mm512_mul_ps(v, _mm512_set1_ps(1.44269504088896341f)),
                                 _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        r = _mm512_fnmadd_ps(k, _mm512_set1_ps(0.693145751953125f), v);
        r = _mm512_fnmadd_ps(k, _mm512_set1_ps(1.428606765330187045e-06f), r);
        memcpy(&x, &r, 64);
        q = 1.0f + x * (1.0f + x * (0.5f + x * (0.16666667163372040f + x * (0.041666667908430099f
            + x * (0.0083333337679505348f + x * 0.0013888889225199819f)))));
        memcpy(&s, &q, 64);
        s = _mm512_scalef_ps(s, k);
        memcpy(&q, &s, 64);
        return q;
    }
#endif
    const vh lo = (vh){0} - 87.0f, hi = (vh){0} + 88.0f;
    x = select_h(x < lo, lo, x);
    x = select_h(x > hi, hi, x);
    vh k = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;   /* round to nearest */
    vh r = x - k * 0.693145751953125f - k * 1.428606765330187045e-06f;
    vh q = 1.0f + r * (1.0f + r * (0.5f + r * (0.16666667163372040f + r * (0.041666667908430099f
           + r * (0.0083333337679505348f + r * 0.0013888889225199819f)))));
    vhi e = (__builtin_convertvector(k, vhi) + 127) << 23;
    return q * (vh)e;
}

static inline vh activate(vh z, int act) {
    if (act == 2) return 1.0f / (1.0f + exp_h(-z)) - 0.5f;
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
    arg_t *a = (arg_t *)argp;
    ctx_t *c = a->c;
    const int tid = a->tid;
    pthread_mutex_lock(&c->bar.mu);
    while (!c->go) pthread_cond_wait(&c->bar.cv, &c->bar.mu);
    pthread_mutex_unlock(&c->bar.mu);
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
        if (team > 1) barrier_wait(&c->bar);
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
        if (team > 1) barrier_wait(&c->bar);
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
        if (team > 1) barrier_wait(&c->bar);   /* every thread has read the old W1 */
        if (tid == 0) memcpy(w1, w1new, sizeof w1new);
        /* 3. W <- W - lr (m + phi (W1 s_k/r)^T) */
        const float lr = c->lr_ptr ? *c->lr_ptr : c->lr;
        for (int64_t b = b0; b < b1; b++) {
            vh ph = load_h(phi + b * H);
            vk u0 = {0}, u1 = {0};
            for (int j = 0; j < H; j += 2) { u0 += ph[j] * w1t[j]; u1 += ph[j + 1] * w1t[j + 1]; }
            vk u = u0 + u1;
            if (b < full) store_k(p + b * KD, load_k(p + b * KD) - lr * (load_k(m + b * KD) + u));
            else for (int i = 0; b * KD + i < n; i++) p[b * KD + i] -= lr * (m[b * KD + i] + u[i]);
        }
        if (team > 1) barrier_wait(&c->bar);   /* phi and the per-thread slots are reused by the next tensor */
    }
    return 0;
}

int deep_momentum_step(int T, float **p, const float **g, float **m, float **w1, const float **w2,
                       const int64_t *n, float *phi, double *slots, float alpha, float eta, float lr,
                       const float *lr_ptr, float pre, int act, int nt) {
    /* slots: 2*nt + nt*KD*H doubles */
    ctx_t c = {T, nt, act, p, g, m, w1, w2, n, phi, alpha, eta, lr, pre, lr_ptr, slots, slots + nt, slots + 2 * nt};
    pthread_mutex_init(&c.bar.mu, 0);
    pthread_cond_init(&c.bar.cv, 0);
    c.bar.count = 0; c.bar.generation = 0; c.go = 0;
    pthread_t threads[64];
    arg_t args[64];
    int started = 0;
    for (int i = 1; i < nt; i++) {   /* a thread that cannot start leaves the work to fewer */
        args[i].c = &c; args[i].tid = i;
        if (pthread_create(&threads[i], 0, worker, &args[i])) break;
        started++;
    }
    pthread_mutex_lock(&c.bar.mu);
    c.nt = c.bar.total = started + 1;
    c.go = 1;
    pthread_cond_broadcast(&c.bar.cv);
    pthread_mutex_unlock(&c.bar.mu);
    args[0].c = &c; args[0].tid = 0;
    worker(&args[0]);
    for (int i = 1; i <= started; i++) pthread_join(threads[i], 0);
    pthread_mutex_destroy(&c.bar.mu);
    pthread_cond_destroy(&c.bar.cv);
    return started + 1;
}
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
def _library(key_dim: int, hidden: int) -> ctypes.CDLL | None:
    """The compiled kernel for ``KD = key_dim``, ``H = hidden``, built on first use; None without a compiler."""
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None:
        log.info("deepopt: no C compiler found; DeepMomentum uses its torch CPU loop")
        return None
    flags = ["-O3", "-march=native", "-fPIC", "-shared", "-pthread", "-std=gnu11", f"-DKD={key_dim}", f"-DH={hidden}"]
    digest = hashlib.sha256("\n".join([SOURCE, compiler, *flags, _cpu_signature()]).encode()).hexdigest()[:16]
    path = _cache_dir() / f"deep_momentum_{key_dim}x{hidden}_{digest}.so"
    try:
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
                src, out = Path(tmp) / "deep_momentum.c", Path(tmp) / "lib.so"
                src.write_text(SOURCE)
                subprocess.run([compiler, *flags, str(src), "-o", str(out), "-lm"], check=True,
                               capture_output=True, timeout=120)
                os.replace(out, path)  # atomic: concurrent builds (test workers) leave one whole file
        lib = ctypes.CDLL(str(path))
    except (OSError, subprocess.SubprocessError) as e:
        log.info("deepopt: could not build the DeepMomentum CPU kernel (%s); using the torch CPU loop", e)
        return None
    fn = lib.deep_momentum_step
    ptrs = ctypes.POINTER(ctypes.c_void_p)
    fn.argtypes = [ctypes.c_int, ptrs, ptrs, ptrs, ptrs, ptrs, ctypes.POINTER(ctypes.c_int64), ctypes.c_void_p,
                   ctypes.c_void_p, ctypes.c_float, ctypes.c_float, ctypes.c_float, ctypes.c_void_p, ctypes.c_float,
                   ctypes.c_int, ctypes.c_int]
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
