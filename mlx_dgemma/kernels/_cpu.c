/* The drafter's sampling step on the CPU: one multi-threaded pass per canvas position.
 *
 * Semantics of sampling.sample_step_mlx on MLX's CPU backend, float for float where it
 * decides a token: x = logit / t (a division), the Gumbel noise -log(-log(u)) with the
 * C library's logf (what MLX's CPU `log` calls) from the same counters as rng.gumbel,
 * and the first maximum wins ties, as mx.argmax. So the sampled and argmax tokens are
 * the MLX path's, bit for bit. exp is MLX's own CPU polynomial (simd/math.h), and the
 * sums run in double (the MLX path sums in float32): log-sum-exp and entropy agree to
 * float32 rounding. Optionally also writes softmax(logits / t) = exp(x - lse), the
 * self-conditioning probabilities, from the same pass (the row is still in cache).
 *
 * The noise is computed a block at a time with a vectorised copy of the C library's logf
 * (checked against it on every possible input first, see check_log) and MLX's exp.
 *
 * Built by setup.py as mlx_dgemma.kernels._cpu (optional: without a compiler the
 * package uses the pure-MLX path). Inputs and outputs are C-contiguous buffers (NumPy
 * views of evaluated MLX arrays); the work runs without the GIL on `threads` threads.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <dlfcn.h>
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define DG_BLOCK 512


static inline uint32_t dg_mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  x ^= x >> 16;
  return x;
}

/* The table of the C library's logf (glibc >= 2.28 and musl use Arm's optimized-routines
   algorithm, MIT licensed), for the vectorised log (log4 below); valid for positive
   normal floats, which is every input the noise gives. check_log() compares it with the
   platform's logf on all of those inputs before it is used, so a libm that differs
   keeps the scalar logf and the tokens stay the MLX path's. */
static const double DG_LOG_TAB[16][2] = {
    {0x1.661ec79f8f3bep+0, -0x1.57bf7808caadep-2}, {0x1.571ed4aaf883dp+0, -0x1.2bef0a7c06ddbp-2},
    {0x1.49539f0f010bp+0, -0x1.01eae7f513a67p-2},  {0x1.3c995b0b80385p+0, -0x1.b31d8a68224e9p-3},
    {0x1.30d190c8864a5p+0, -0x1.6574f0ac07758p-3}, {0x1.25e227b0b8eap+0, -0x1.1aa2bc79c81p-3},
    {0x1.1bb4a4a1a343fp+0, -0x1.a4e76ce8c0e5ep-4}, {0x1.12358f08ae5bap+0, -0x1.1973c5a611cccp-4},
    {0x1.0953f419900a7p+0, -0x1.252f438e10c1ep-5}, {0x1p+0, 0x0p+0},
    {0x1.e608cfd9a47acp-1, 0x1.aa5aa5df25984p-5},  {0x1.ca4b31f026aap-1, 0x1.c5e53aa362eb4p-4},
    {0x1.b2036576afce6p-1, 0x1.526e57720db08p-3},  {0x1.9c2d163a1aa2dp-1, 0x1.bc2860d22477p-3},
    {0x1.886e6037841edp-1, 0x1.1058bc8a07ee1p-2},  {0x1.767dcf5534862p-1, 0x1.4043057b6ee09p-2},
};

static inline float dg_uniform(uint32_t key, uint32_t token) {
  uint32_t h = dg_mix32(key ^ token);
  return ((float)(h >> 8) + 0.5f) * 5.9604644775390625e-08f; /* 2^-24 */
}

/* -log(-log(u)) as rng.gumbel computes it. The top hash value rounds u to 1.0: the
   noise is then +inf (log(-0) = -inf), as in the MLX path. */
static inline float dg_gumbel_libm(uint32_t key, uint32_t token) {
  return -logf(-logf(dg_uniform(key, token)));
}

/* MLX's CPU exp (mlx/backend/cpu/simd/math.h, Simd<float, 1>), operation for operation. */
static inline float dg_exp(float x_init) {
  float x = x_init * 1.442695f;
  /* floor(x + 0.5) (MLX adds 0.5 in double: exact); rintf and a tie fix vectorise */
  const float r0 = rintf(x);
  const float ipart = x - r0 == 0.5f ? r0 + 1.0f : r0;
  float fpart = x - ipart;
  x = 1.535336188319500e-4f;
  x = fmaf(x, fpart, 1.339887440266574e-3f);
  x = fmaf(x, fpart, 9.618437357674640e-3f);
  x = fmaf(x, fpart, 5.550332471162809e-2f);
  x = fmaf(x, fpart, 2.402264791363012e-1f);
  x = fmaf(x, fpart, 6.931472028550421e-1f);
  x = fmaf(x, fpart, 1.000000000000000f);
  int32_t epart = ((int32_t)ipart + 127) << 23;
  float two;
  memcpy(&two, &epart, sizeof two);
  float r = x_init != x_init ? x_init : two * x;
  r = x_init > 88.0f ? INFINITY : r;
  r = x_init < -88.0f ? 0.0f : r;
  return r;
}

typedef struct {
  const float* logits;
  const uint32_t* keys;
  float temp;
  Py_ssize_t V;
  Py_ssize_t row0, row1;
  int32_t* sampled;
  int32_t* argmax;
  float* entropy;
  float* lse;
  float* probs; /* NULL: not wanted */
  int failed;
} Job;

static int get_buffer(PyObject* obj, Py_buffer* view, int writable, Py_ssize_t itemsize, Py_ssize_t n,
                      const char* name) {
  int flags = PyBUF_C_CONTIGUOUS | (writable ? PyBUF_WRITABLE : 0);
  if (PyObject_GetBuffer(obj, view, flags) != 0) return -1;
  if (view->itemsize != itemsize || view->len != itemsize * n) {
    PyErr_Format(PyExc_ValueError, "%s: expected %zd items of %zd bytes, got %zd bytes", name, n, itemsize,
                 view->len);
    PyBuffer_Release(view);
    return -1;
  }
  return 0;
}

/* The four passes over a row, portable C (any CPU) ---------------------------------- */

/* x = l / t; returns max(x). */
static float scale_max_c(const float* l, float t, float* x, Py_ssize_t V) {
  float m = -INFINITY;
  for (Py_ssize_t v = 0; v < V; v++) {
    x[v] = l[v] / t;
    m = x[v] > m ? x[v] : m;
  }
  return m;
}

/* Adds sum exp(x - m) and sum exp(x - m) (x - m) over n tokens (terms with exp == 0
   count 0, as the MLX path's where(e > 0, ...)). */
static void sums_c(const float* x, float m, Py_ssize_t n, double* s, double* w) {
  float sf = 0.0f, wf = 0.0f;
  for (Py_ssize_t i = 0; i < n; i++) {
    const float xs = x[i] - m;
    const float e = dg_exp(xs);
    sf += e;
    wf += e > 0.0f ? e * xs : 0.0f;
  }
  *s += sf;
  *w += wf;
}

/* y = x + g for tokens t0 .. t0 + n - 1; returns max(y). */
static float noisy_c(const float* x, uint32_t key, uint32_t t0, float* y, Py_ssize_t n) {
  float m = -INFINITY;
  for (Py_ssize_t i = 0; i < n; i++) {
    y[i] = x[i] + dg_gumbel_libm(key, t0 + (uint32_t)i);
    m = y[i] > m ? y[i] : m;
  }
  return m;
}

static void probs_c(const float* x, float lse, float* p, Py_ssize_t n) {
  for (Py_ssize_t i = 0; i < n; i++) p[i] = dg_exp(x[i] - lse);
}

/* The same passes in AVX2 + FMA (x86-64, chosen at run time) ------------------------- */
#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
#define DG_AVX2 1
#include <immintrin.h>
#define DG_TARGET __attribute__((target("avx2,fma")))

DG_TARGET static inline float hmax8(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
  return _mm_cvtss_f32(m);
}

DG_TARGET static inline float hsum8(__m256 v) {
  float a[8];
  _mm256_storeu_ps(a, v);
  return ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]));
}

/* dg_exp, eight at a time (the same operations). */
DG_TARGET static inline __m256 exp8(__m256 x_init) {
  __m256 x = _mm256_mul_ps(x_init, _mm256_set1_ps(1.442695f));
  __m256 r0 = _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 tie = _mm256_cmp_ps(_mm256_sub_ps(x, r0), _mm256_set1_ps(0.5f), _CMP_EQ_OQ);
  __m256 ipart = _mm256_add_ps(r0, _mm256_and_ps(tie, _mm256_set1_ps(1.0f)));
  __m256 f = _mm256_sub_ps(x, ipart);
  __m256 p = _mm256_set1_ps(1.535336188319500e-4f);
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.339887440266574e-3f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(9.618437357674640e-3f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(5.550332471162809e-2f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(2.402264791363012e-1f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(6.931472028550421e-1f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.000000000000000f));
  __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(ipart), _mm256_set1_epi32(127)), 23);
  __m256 r = _mm256_mul_ps(_mm256_castsi256_ps(e), p);
  r = _mm256_blendv_ps(r, x_init, _mm256_cmp_ps(x_init, x_init, _CMP_UNORD_Q));
  r = _mm256_blendv_ps(r, _mm256_set1_ps(INFINITY), _mm256_cmp_ps(x_init, _mm256_set1_ps(88.0f), _CMP_GT_OQ));
  r = _mm256_blendv_ps(r, _mm256_setzero_ps(), _mm256_cmp_ps(x_init, _mm256_set1_ps(-88.0f), _CMP_LT_OQ));
  return r;
}

/* dg_log on four lanes, in double. */
DG_TARGET static inline __m128 log4(__m128i ix) {
  const __m128i tmp = _mm_sub_epi32(ix, _mm_set1_epi32(0x3f330000));
  const __m128i i = _mm_and_si128(_mm_srli_epi32(tmp, 19), _mm_set1_epi32(15));
  const __m128i k = _mm_srai_epi32(tmp, 23);
  const __m128i iz = _mm_sub_epi32(ix, _mm_and_si128(tmp, _mm_set1_epi32((int)0xff800000u)));
  const __m256d z = _mm256_cvtps_pd(_mm_castsi128_ps(iz));
  const __m128i i2 = _mm_slli_epi32(i, 1); /* row index in the flat table */
  const __m256d invc = _mm256_i32gather_pd(&DG_LOG_TAB[0][0], i2, 8);
  const __m256d logc = _mm256_i32gather_pd(&DG_LOG_TAB[0][1], i2, 8);
  const __m256d r = _mm256_fmadd_pd(z, invc, _mm256_set1_pd(-1.0));
  const __m256d y0 = _mm256_fmadd_pd(_mm256_cvtepi32_pd(k), _mm256_set1_pd(0x1.62e42fefa39efp-1), logc);
  const __m256d r2 = _mm256_mul_pd(r, r);
  __m256d y = _mm256_fmadd_pd(_mm256_set1_pd(0x1.5575b0be00b6ap-2), r, _mm256_set1_pd(-0x1.ffffef20a4123p-2));
  y = _mm256_fmadd_pd(_mm256_set1_pd(-0x1.00ea348b88334p-2), r2, y);
  y = _mm256_fmadd_pd(y, r2, _mm256_add_pd(y0, r));
  return _mm256_cvtpd_ps(y);
}

DG_TARGET static inline __m256 log8(__m256 x) {
  const __m256i ix = _mm256_castps_si256(x);
  const __m128 lo = log4(_mm256_castsi256_si128(ix)), hi = log4(_mm256_extracti128_si256(ix, 1));
  return _mm256_insertf128_ps(_mm256_castps128_ps256(lo), hi, 1);
}

DG_TARGET static float scale_max_avx2(const float* l, float t, float* x, Py_ssize_t V) {
  const __m256 tv = _mm256_set1_ps(t);
  __m256 m8 = _mm256_set1_ps(-INFINITY);
  Py_ssize_t v = 0;
  for (; v + 8 <= V; v += 8) {
    const __m256 xv = _mm256_div_ps(_mm256_loadu_ps(l + v), tv);
    _mm256_storeu_ps(x + v, xv);
    m8 = _mm256_max_ps(m8, xv);
  }
  const float m = hmax8(m8);
  const float mt = scale_max_c(l + v, t, x + v, V - v);
  return mt > m ? mt : m;
}

DG_TARGET static void sums_avx2(const float* x, float m, Py_ssize_t n, double* s, double* w) {
  const __m256 mv = _mm256_set1_ps(m);
  __m256 s8 = _mm256_setzero_ps(), w8 = _mm256_setzero_ps();
  Py_ssize_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 xs = _mm256_sub_ps(_mm256_loadu_ps(x + i), mv);
    const __m256 e = exp8(xs);
    s8 = _mm256_add_ps(s8, e);
    const __m256 pos = _mm256_cmp_ps(e, _mm256_setzero_ps(), _CMP_GT_OQ);
    w8 = _mm256_add_ps(w8, _mm256_and_ps(pos, _mm256_mul_ps(e, xs)));
  }
  *s += hsum8(s8);
  *w += hsum8(w8);
  sums_c(x + i, m, n - i, s, w);
}

DG_TARGET static float noisy_avx2(const float* x, uint32_t key, uint32_t t0, float* y, Py_ssize_t n) {
  const __m256i kv = _mm256_set1_epi32((int)key);
  const __m256i m1 = _mm256_set1_epi32(0x7FEB352D), m2 = _mm256_set1_epi32((int)0x846CA68Bu);
  __m256i tok = _mm256_add_epi32(_mm256_set1_epi32((int)t0), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  __m256 m8 = _mm256_set1_ps(-INFINITY);
  Py_ssize_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m256i h = _mm256_xor_si256(kv, tok);
    h = _mm256_xor_si256(h, _mm256_srli_epi32(h, 16));
    h = _mm256_mullo_epi32(h, m1);
    h = _mm256_xor_si256(h, _mm256_srli_epi32(h, 15));
    h = _mm256_mullo_epi32(h, m2);
    h = _mm256_xor_si256(h, _mm256_srli_epi32(h, 16));
    const __m256 u = _mm256_mul_ps(_mm256_add_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(h, 8)), _mm256_set1_ps(0.5f)),
                                   _mm256_set1_ps(5.9604644775390625e-08f));
    const __m256 wv = _mm256_sub_ps(_mm256_setzero_ps(), log8(u)); /* -log(u) */
    __m256 g = _mm256_sub_ps(_mm256_setzero_ps(), log8(wv));
    g = _mm256_blendv_ps(g, _mm256_set1_ps(INFINITY), _mm256_cmp_ps(u, _mm256_set1_ps(1.0f), _CMP_EQ_OQ));
    const __m256 yv = _mm256_add_ps(_mm256_loadu_ps(x + i), g);
    _mm256_storeu_ps(y + i, yv);
    m8 = _mm256_max_ps(m8, yv);
    tok = _mm256_add_epi32(tok, _mm256_set1_epi32(8));
  }
  const float m = hmax8(m8);
  const float mt = noisy_c(x + i, key, t0 + (uint32_t)i, y + i, n - i);
  return mt > m ? mt : m;
}

DG_TARGET static void probs_avx2(const float* x, float lse, float* p, Py_ssize_t n) {
  const __m256 lv = _mm256_set1_ps(lse);
  Py_ssize_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(p + i, exp8(_mm256_sub_ps(_mm256_loadu_ps(x + i), lv)));
  probs_c(x + i, lse, p + i, n - i);
}

DG_TARGET static long check_log_avx2(void) {
  long bad = 0;
  for (uint32_t j = 0; j < (1u << 24); j += 8) {
    float u[8], a[8], b[8];
    for (int q = 0; q < 8; q++) {
      u[q] = ((float)(j + q) + 0.5f) * 5.9604644775390625e-08f;
      a[q] = logf(u[q]);
    }
    _mm256_storeu_ps(b, log8(_mm256_loadu_ps(u)));
    for (int q = 0; q < 8; q++) bad += memcmp(&a[q], &b[q], sizeof a[q]) != 0;
    float w[8], c[8], d[8];
    for (int q = 0; q < 8; q++) {
      w[q] = u[q] < 1.0f ? -a[q] : 1.0f; /* u = 1 is handled apart (+inf noise) */
      c[q] = logf(w[q]);
    }
    _mm256_storeu_ps(d, log8(_mm256_loadu_ps(w)));
    for (int q = 0; q < 8; q++) bad += memcmp(&c[q], &d[q], sizeof c[q]) != 0;
  }
  return bad;
}
#endif

/* The passes in use: portable C, or AVX2 where the CPU has it (see PyInit__cpu); the
   vectorised noise only once check_log has matched it with the platform's logf. */
static float (*scale_max)(const float*, float, float*, Py_ssize_t) = scale_max_c;
static void (*sums)(const float*, float, Py_ssize_t, double*, double*) = sums_c;
static float (*noisy)(const float*, uint32_t, uint32_t, float*, Py_ssize_t) = noisy_c;
static void (*probs_pass)(const float*, float, float*, Py_ssize_t) = probs_c;
static int dg_avx2 = 0;


/* y = exp(x - m) over n values; returns their sum. */
static double exp_pass_c(const float* x, float m, float* y, Py_ssize_t n) {
  float s = 0.0f;
  for (Py_ssize_t i = 0; i < n; i++) {
    y[i] = dg_exp(x[i] - m);
    s += y[i];
  }
  return s;
}
#ifdef DG_AVX2
DG_TARGET static double exp_pass_avx2(const float* x, float m, float* y, Py_ssize_t n) {
  const __m256 mv = _mm256_set1_ps(m);
  __m256 s8 = _mm256_setzero_ps();
  Py_ssize_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(x + i), mv));
    _mm256_storeu_ps(y + i, e);
    s8 = _mm256_add_ps(s8, e);
  }
  return (double)hsum8(s8) + exp_pass_c(x + i, m, y + i, n - i);
}
#endif
static double (*exp_pass)(const float*, float, float*, Py_ssize_t) = exp_pass_c;

/* Attention on the CPU ----------------------------------------------------------------
 * out = softmax(q k^T * scale + mask) v per head, with grouped KV heads, in blocks of
 * query rows so that the scores never exist at full size (a block is rows x keys).
 * Scores and the weighted sum go through the process's CBLAS sgemm (OpenBLAS when
 * mlx_dgemma.runtime loaded it); the softmax (MLX's exp, vectorised) runs on `threads`
 * threads. Masks: causal over absolute positions (query i at q_pos0 + i, key j at
 * k_pos0 + j; visible when key <= query and, with a window W, key > query - W; only the
 * visible key range of a block is computed), or a key mask [B, S] (uint8), or none.
 */
typedef void (*sgemm_fn)(int, int, int, int, int, int, float, const float*, int, const float*, int, float, float*,
                         int);
static sgemm_fn dg_sgemm = NULL;
typedef void (*set_threads_fn)(int);
typedef int (*get_threads_fn)(void);
static set_threads_fn dg_blas_set_threads = NULL; /* OpenBLAS's, when it is the BLAS */
static get_threads_fn dg_blas_get_threads = NULL;
enum { CblasRowMajor = 101, CblasNoTrans = 111, CblasTrans = 112 };

typedef struct {
  float* S;       /* rows x ld scores, softmaxed in place */
  Py_ssize_t ld;  /* columns of S */
  Py_ssize_t r0, r1;
  const Py_ssize_t* lo; /* visible key range [lo, hi) per row, relative to S's first column */
  const Py_ssize_t* hi;
  const uint8_t* kmask; /* NULL, or visibility per column */
} SoftmaxJob;

static void softmax_row(float* x, Py_ssize_t n, Py_ssize_t lo, Py_ssize_t hi, const uint8_t* kmask) {
  float m = -INFINITY;
  for (Py_ssize_t j = lo; j < hi; j++)
    if (!kmask || kmask[j]) m = x[j] > m ? x[j] : m;
  if (m == -INFINITY) { /* nothing visible: weight 0 everywhere (output 0, not NaN) */
    memset(x, 0, sizeof(float) * (size_t)n);
    return;
  }
  for (Py_ssize_t j = 0; j < lo; j++) x[j] = 0.0f;
  for (Py_ssize_t j = hi; j < n; j++) x[j] = 0.0f;
  if (kmask)
    for (Py_ssize_t j = lo; j < hi; j++)
      if (!kmask[j]) x[j] = -INFINITY;
  double s = 0.0;
  for (Py_ssize_t b = lo; b < hi; b += DG_BLOCK) {
    Py_ssize_t nb = hi - b < DG_BLOCK ? hi - b : DG_BLOCK;
    s += exp_pass(x + b, m, x + b, nb);
  }
  const float inv = (float)(1.0 / s);
  for (Py_ssize_t j = lo; j < hi; j++) x[j] *= inv;
}

static void* softmax_worker(void* arg) {
  SoftmaxJob* j = (SoftmaxJob*)arg;
  for (Py_ssize_t r = j->r0; r < j->r1; r++) softmax_row(j->S + r * j->ld, j->ld, j->lo[r], j->hi[r], j->kmask);
  return NULL;
}

static void softmax_rows(float* S, Py_ssize_t rows, Py_ssize_t ld, const Py_ssize_t* lo, const Py_ssize_t* hi,
                         const uint8_t* kmask, int threads) {
  SoftmaxJob jobs[64];
  pthread_t tids[64];
  char started[64] = {0};
  if (threads > 64) threads = 64;
  if (threads > rows) threads = rows > 0 ? (int)rows : 1;
  for (int i = 0; i < threads; i++) {
    jobs[i] = (SoftmaxJob){S, ld, rows * i / threads, rows * (i + 1) / threads, lo, hi, kmask};
    if (i > 0) started[i] = pthread_create(&tids[i], NULL, softmax_worker, &jobs[i]) == 0;
  }
  for (int i = 0; i < threads; i++)
    if (!started[i]) softmax_worker(&jobs[i]);
  for (int i = 1; i < threads; i++)
    if (started[i]) pthread_join(tids[i], NULL);
}

typedef struct {
  const float *Q, *K, *V;
  float* O;
  const uint8_t* M;
  Py_ssize_t B, Hq, Hkv, L, S, D, Dv, Bk, R, rows_all, block_rows, per_head, n_units;
  float scale;
  int causal;
  Py_ssize_t q_pos0, k_pos0, window;
  Py_ssize_t next; /* the next block to take (shared, atomic) */
  int softmax_threads;
} AttnShared;

typedef struct {
  AttnShared* sh;
  int failed;
} AttnJob;

static void* attn_worker(void* arg) {
  AttnJob* job = (AttnJob*)arg;
  AttnShared* a = job->sh;
  float* Sbuf = (float*)malloc(sizeof(float) * (size_t)(a->block_rows * a->S));
  Py_ssize_t* lo = (Py_ssize_t*)malloc(sizeof(Py_ssize_t) * (size_t)a->block_rows * 2);
  if (!Sbuf || !lo) {
    free(Sbuf), free(lo);
    job->failed = 1;
    return NULL;
  }
  Py_ssize_t* hi = lo + a->block_rows;
  const Py_ssize_t L = a->L, S = a->S, D = a->D, Dv = a->Dv, R = a->R;
  for (;;) {
    const Py_ssize_t u = __atomic_fetch_add(&a->next, 1, __ATOMIC_RELAXED);
    if (u >= a->n_units) break;
    const Py_ssize_t bh = u / a->per_head, ub = u % a->per_head;
    const Py_ssize_t b = bh / a->Hkv, h = bh % a->Hkv;
    Py_ssize_t r0 = 0, n = 0; /* the ub-th block of this head's rows */
    for (Py_ssize_t i = 0; i <= ub; i++) {
      r0 += n;
      n = a->rows_all - r0 < a->block_rows ? a->rows_all - r0 : a->block_rows;
      if (a->causal && (r0 % L) + n > L) n = L - (r0 % L);
    }
    const float* Kh = a->K + ((b % a->Bk) * a->Hkv + h) * S * D;
    const float* Vh = a->V + ((b % a->Bk) * a->Hkv + h) * S * Dv;
    const float* Qh = a->Q + (b * a->Hq + h * R) * L * D; /* the R query heads of KV head h */
    float* Oh = a->O + (b * a->Hq + h * R) * L * Dv;
    const uint8_t* km = a->M ? a->M + b * S : NULL;
    Py_ssize_t kmin = S, kmax = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
      Py_ssize_t lo_i = 0, hi_i = S;
      if (a->causal) {
        const Py_ssize_t qp = a->q_pos0 + (r0 + i) % L;
        hi_i = qp - a->k_pos0 + 1;
        hi_i = hi_i < 0 ? 0 : (hi_i > S ? S : hi_i);
        if (a->window > 0) {
          lo_i = qp - a->window + 1 - a->k_pos0;
          lo_i = lo_i < 0 ? 0 : (lo_i > hi_i ? hi_i : lo_i);
        }
      }
      lo[i] = lo_i;
      hi[i] = hi_i;
      kmin = lo_i < kmin ? lo_i : kmin;
      kmax = hi_i > kmax ? hi_i : kmax;
    }
    if (kmax <= kmin) { /* no key visible to any row of the block */
      memset(Oh + r0 * Dv, 0, sizeof(float) * (size_t)(n * Dv));
      continue;
    }
    const Py_ssize_t nk = kmax - kmin;
    for (Py_ssize_t i = 0; i < n; i++) {
      lo[i] -= kmin;
      hi[i] -= kmin;
    }
    dg_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)n, (int)nk, (int)D, a->scale, Qh + r0 * D, (int)D,
             Kh + kmin * D, (int)D, 0.0f, Sbuf, (int)nk);
    softmax_rows(Sbuf, n, nk, lo, hi, km ? km + kmin : NULL, a->softmax_threads);
    dg_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)n, (int)Dv, (int)nk, 1.0f, Sbuf, (int)nk,
             Vh + kmin * Dv, (int)Dv, 0.0f, Oh + r0 * Dv, (int)Dv);
  }
  free(Sbuf), free(lo);
  return NULL;
}

static PyObject* attention(PyObject* self, PyObject* args) {
  PyObject *o_q, *o_k, *o_v, *o_out, *o_kmask;
  Py_ssize_t B, Hq, Hkv, L, S, D, Dv, Bk, q_pos0, k_pos0, window, block_rows;
  int causal, threads;
  float scale;
  if (!PyArg_ParseTuple(args, "OOOOnnnnnnnnfpnnnOni", &o_q, &o_k, &o_v, &o_out, &B, &Hq, &Hkv, &L, &S, &D, &Dv,
                        &Bk, &scale, &causal, &q_pos0, &k_pos0, &window, &o_kmask, &block_rows, &threads))
    return NULL;
  if (!dg_sgemm) return PyErr_Format(PyExc_RuntimeError, "attention: no cblas_sgemm in the process");
  if (B < 1 || Hq < 1 || Hkv < 1 || Hq % Hkv || L < 1 || S < 1 || D < 1 || Dv < 1 || (Bk != 1 && Bk != B) ||
      block_rows < 1)
    return PyErr_Format(PyExc_ValueError, "attention: bad shapes");
  Py_buffer bq, bk, bv, bo, bm;
  int have_m = o_kmask != Py_None, got = 0;
  if (get_buffer(o_q, &bq, 0, 4, B * Hq * L * D, "q") == 0) got++;
  if (got == 1 && get_buffer(o_k, &bk, 0, 4, Bk * Hkv * S * D, "k") == 0) got++;
  if (got == 2 && get_buffer(o_v, &bv, 0, 4, Bk * Hkv * S * Dv, "v") == 0) got++;
  if (got == 3 && get_buffer(o_out, &bo, 1, 4, B * Hq * L * Dv, "out") == 0) got++;
  if (got == 4 && (!have_m || get_buffer(o_kmask, &bm, 0, 1, B * S, "key mask") == 0)) got++;
  if (got < 5) {
    if (got > 0) PyBuffer_Release(&bq);
    if (got > 1) PyBuffer_Release(&bk);
    if (got > 2) PyBuffer_Release(&bv);
    if (got > 3) PyBuffer_Release(&bo);
    return NULL;
  }
  const Py_ssize_t R = Hq / Hkv, rows_all = R * L;
  if (block_rows > rows_all) block_rows = rows_all;
  /* the blocks: query rows of one (batch row, KV head), a causal block within one head */
  Py_ssize_t per_head = 0;
  for (Py_ssize_t r0 = 0; r0 < rows_all; per_head++) {
    Py_ssize_t n = rows_all - r0 < block_rows ? rows_all - r0 : block_rows;
    if (causal && (r0 % L) + n > L) n = L - (r0 % L);
    r0 += n;
  }
  AttnShared sh = {(const float*)bq.buf, (const float*)bk.buf, (const float*)bv.buf, (float*)bo.buf,
                   have_m ? (const uint8_t*)bm.buf : NULL, B, Hq, Hkv, L, S, D, Dv, Bk, R, rows_all, block_rows,
                   per_head, per_head * B * Hkv, scale, causal, q_pos0, k_pos0, window, 0, threads};
  /* Several blocks: threads over blocks, each with a single-threaded BLAS (OpenBLAS's
     threads inside small GEMMs cost more than they give). One block: the BLAS threads
     it and the softmax runs on `threads` threads. */
  int workers = threads > 64 ? 64 : threads;
  if (workers > sh.n_units) workers = (int)sh.n_units;
  if (workers < 2 || !dg_blas_set_threads || !dg_blas_get_threads) workers = 1;
  sh.softmax_threads = workers == 1 ? threads : 1;
  AttnJob jobs[64];
  pthread_t tids[64];
  char started[64] = {0};
  int failed = 0;
  Py_BEGIN_ALLOW_THREADS;
  const int blas_threads = workers > 1 ? dg_blas_get_threads() : 0;
  if (workers > 1) dg_blas_set_threads(1);
  for (int i = 0; i < workers; i++) {
    jobs[i] = (AttnJob){&sh, 0};
    if (i > 0) started[i] = pthread_create(&tids[i], NULL, attn_worker, &jobs[i]) == 0;
  }
  attn_worker(&jobs[0]);
  for (int i = 1; i < workers; i++)
    if (started[i]) pthread_join(tids[i], NULL);
  for (int i = 0; i < workers; i++) failed |= jobs[i].failed;
  if (workers > 1) dg_blas_set_threads(blas_threads);
  Py_END_ALLOW_THREADS;
  PyBuffer_Release(&bq), PyBuffer_Release(&bk), PyBuffer_Release(&bv), PyBuffer_Release(&bo);
  if (have_m) PyBuffer_Release(&bm);
  if (failed) return PyErr_NoMemory();
  Py_RETURN_NONE;
}


/* Mixture of experts on the CPU --------------------------------------------------------
 * y[n] = sum_k w[n, k] * down_e(gelu_tanh(gate_e(x_n)) * up_e(x_n)), e = idx[n, k]:
 * the (token, expert) pairs are grouped by expert (counting sort, token order kept), and
 * each used expert runs three GEMMs over its rows through the process's sgemm (threaded
 * by the BLAS); gather, activation and the weighted scatter-add are vectorised C.
 * Weights as SwitchGLU keeps them: gate, up [E, I, H]; down [E, H, I].
 */
static inline float gelu_tanh_c(float x) {
  const float z = 0.7978845608028654f * (x + 0.044715f * x * x * x);
  const float e = dg_exp(-2.0f * fabsf(z));
  const float t = (1.0f - e) / (1.0f + e);
  return 0.5f * x * (1.0f + (z < 0.0f ? -t : t));
}

static void geglu_c(const float* g, const float* u, float* a, Py_ssize_t n) {
  for (Py_ssize_t i = 0; i < n; i++) a[i] = gelu_tanh_c(g[i]) * u[i];
}

#ifdef DG_AVX2
DG_TARGET static void geglu_avx2(const float* g, const float* u, float* a, Py_ssize_t n) {
  const __m256 c0 = _mm256_set1_ps(0.7978845608028654f), c1 = _mm256_set1_ps(0.044715f);
  const __m256 one = _mm256_set1_ps(1.0f), half = _mm256_set1_ps(0.5f), sign = _mm256_set1_ps(-0.0f);
  Py_ssize_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 x = _mm256_loadu_ps(g + i);
    const __m256 z = _mm256_mul_ps(c0, _mm256_add_ps(x, _mm256_mul_ps(c1, _mm256_mul_ps(_mm256_mul_ps(x, x), x))));
    const __m256 e = exp8(_mm256_mul_ps(_mm256_set1_ps(-2.0f), _mm256_andnot_ps(sign, z)));
    __m256 t = _mm256_div_ps(_mm256_sub_ps(one, e), _mm256_add_ps(one, e));
    t = _mm256_or_ps(t, _mm256_and_ps(sign, z)); /* tanh is odd: take z's sign */
    const __m256 y = _mm256_mul_ps(_mm256_mul_ps(half, x), _mm256_add_ps(one, t));
    _mm256_storeu_ps(a + i, _mm256_mul_ps(y, _mm256_loadu_ps(u + i)));
  }
  geglu_c(g + i, u + i, a + i, n - i);
}
#endif
static void (*geglu)(const float*, const float*, float*, Py_ssize_t) = geglu_c;


typedef struct {
  const float *x, *Wg, *Wu, *Wd;
  const Py_ssize_t *start, *order;
  Py_ssize_t K, E, H, I, maxc;
  float* D; /* [pairs, H]: each pair's expert output, by pair index */
  Py_ssize_t* next; /* the next expert to take (shared) */
  int failed;
} MoeJob;

/* Experts taken one at a time from a shared counter; each writes only its own pairs' rows
   of D, so the threads never touch the same memory. */
static void* moe_worker(void* arg) {
  MoeJob* j = (MoeJob*)arg;
  const Py_ssize_t H = j->H, I = j->I, K = j->K;
  float* buf = (float*)malloc(sizeof(float) * (size_t)(j->maxc * (H + 3 * I) + 1));
  if (!buf) {
    j->failed = 1;
    return NULL;
  }
  float* xe = buf;              /* rows x H */
  float* ge = xe + j->maxc * H; /* rows x I */
  float* ue = ge + j->maxc * I;
  float* ae = ue + j->maxc * I;
  float* de = xe; /* rows x H: x rows are not needed after the first two GEMMs */
  for (;;) {
    const Py_ssize_t e = __atomic_fetch_add(j->next, 1, __ATOMIC_RELAXED);
    if (e >= j->E) break;
    const Py_ssize_t c = j->start[e + 1] - j->start[e];
    if (c == 0) continue;
    const Py_ssize_t* pe = j->order + j->start[e];
    for (Py_ssize_t r = 0; r < c; r++) memcpy(xe + r * H, j->x + (pe[r] / K) * H, sizeof(float) * (size_t)H);
    dg_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)c, (int)I, (int)H, 1.0f, xe, (int)H, j->Wg + e * I * H,
             (int)H, 0.0f, ge, (int)I);
    dg_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)c, (int)I, (int)H, 1.0f, xe, (int)H, j->Wu + e * I * H,
             (int)H, 0.0f, ue, (int)I);
    geglu(ge, ue, ae, c * I);
    dg_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)c, (int)H, (int)I, 1.0f, ae, (int)I, j->Wd + e * H * I,
             (int)I, 0.0f, de, (int)H);
    for (Py_ssize_t r = 0; r < c; r++) memcpy(j->D + pe[r] * H, de + r * H, sizeof(float) * (size_t)H);
  }
  free(buf);
  return NULL;
}

static PyObject* moe(PyObject* self, PyObject* args) {
  PyObject *o_x, *o_idx, *o_w, *o_g, *o_u, *o_d, *o_out;
  Py_ssize_t N, K, E, H, I;
  int threads = 1;
  if (!PyArg_ParseTuple(args, "OOOOOOOnnnnn|i", &o_x, &o_idx, &o_w, &o_g, &o_u, &o_d, &o_out, &N, &K, &E, &H, &I,
                        &threads))
    return NULL;
  if (!dg_sgemm) return PyErr_Format(PyExc_RuntimeError, "moe: no cblas_sgemm in the process");
  if (N < 0 || K < 1 || E < 1 || H < 1 || I < 1) return PyErr_Format(PyExc_ValueError, "moe: bad shapes");
  Py_buffer b[7];
  PyObject* objs[7] = {o_x, o_idx, o_w, o_g, o_u, o_d, o_out};
  const char* names[7] = {"x", "indices", "weights", "gate", "up", "down", "out"};
  const Py_ssize_t counts[7] = {N * H, N * K, N * K, E * I * H, E * I * H, E * H * I, N * H};
  int got = 0;
  for (; got < 7; got++)
    if (get_buffer(objs[got], &b[got], got == 6, 4, counts[got], names[got]) != 0) break;
  if (got < 7) {
    for (int i = 0; i < got; i++) PyBuffer_Release(&b[i]);
    return NULL;
  }
  const int32_t* idx = (const int32_t*)b[1].buf;
  const float* w = (const float*)b[2].buf;
  float* y = (float*)b[6].buf;
  const Py_ssize_t P = N * K;
  Py_ssize_t* start = (Py_ssize_t*)calloc((size_t)E + 1, sizeof(Py_ssize_t));
  Py_ssize_t* order = (Py_ssize_t*)malloc(sizeof(Py_ssize_t) * (size_t)(P > 0 ? P : 1));
  float* D = (float*)malloc(sizeof(float) * (size_t)(P * H + 1));
  Py_ssize_t maxc = 0;
  int bad_index = 0;
  for (Py_ssize_t p = 0; p < P; p++)
    if (idx[p] < 0 || idx[p] >= E) bad_index = 1;
  if (!start || !order || !D || bad_index) {
    free(start), free(order), free(D);
    for (int i = 0; i < 7; i++) PyBuffer_Release(&b[i]);
    if (bad_index) return PyErr_Format(PyExc_ValueError, "moe: an expert index is out of range");
    return PyErr_NoMemory();
  }
  for (Py_ssize_t p = 0; p < P; p++) start[idx[p] + 1]++;
  for (Py_ssize_t e = 0; e < E; e++) {
    maxc = start[e + 1] > maxc ? start[e + 1] : maxc;
    start[e + 1] += start[e];
  }
  int failed = 0;
  Py_BEGIN_ALLOW_THREADS;
  {
    Py_ssize_t* fill = (Py_ssize_t*)malloc(sizeof(Py_ssize_t) * (size_t)E);
    if (fill) {
      memcpy(fill, start, sizeof(Py_ssize_t) * (size_t)E);
      for (Py_ssize_t p = 0; p < P; p++) order[fill[idx[p]]++] = p;
      free(fill);
    } else {
      failed = 1;
    }
  }
  /* Small per-expert GEMMs: threads over experts with a single-threaded BLAS beat the
     BLAS threading inside each. Only with OpenBLAS, whose thread count can be set. */
  if (threads > 64) threads = 64;
  if (threads < 1 || !dg_blas_set_threads || !dg_blas_get_threads) threads = 1;
  Py_ssize_t next = 0;
  MoeJob jobs[64];
  pthread_t tids[64];
  char started[64] = {0};
  const int blas_threads = dg_blas_get_threads ? dg_blas_get_threads() : 0;
  if (!failed) {
    if (threads > 1) dg_blas_set_threads(1);
    for (int i = 0; i < threads; i++) {
      jobs[i] = (MoeJob){(const float*)b[0].buf, (const float*)b[3].buf, (const float*)b[4].buf,
                         (const float*)b[5].buf, start, order, K, E, H, I, maxc, D, &next, 0};
      if (i > 0) started[i] = pthread_create(&tids[i], NULL, moe_worker, &jobs[i]) == 0;
    }
    moe_worker(&jobs[0]);
    for (int i = 1; i < threads; i++)
      if (started[i]) pthread_join(tids[i], NULL);
    for (int i = 0; i < threads; i++) failed |= jobs[i].failed;
    if (threads > 1) dg_blas_set_threads(blas_threads);
  }
  if (!failed) { /* y[n] = sum_k w[n, k] D[n, k], in k order whatever the threads did */
    for (Py_ssize_t n = 0; n < N; n++) {
      float* yr = y + n * H;
      for (Py_ssize_t j = 0; j < H; j++) yr[j] = 0.0f;
      for (Py_ssize_t k = 0; k < K; k++) {
        const float wr = w[n * K + k];
        const float* dr = D + (n * K + k) * H;
        for (Py_ssize_t j = 0; j < H; j++) yr[j] += wr * dr[j];
      }
    }
  }
  Py_END_ALLOW_THREADS;
  free(start), free(order), free(D);
  for (int i = 0; i < 7; i++) PyBuffer_Release(&b[i]);
  if (failed) return PyErr_NoMemory();
  Py_RETURN_NONE;
}

static PyObject* geglu_py(PyObject* self, PyObject* args) {
  PyObject *o_g, *o_u, *o_a;
  Py_ssize_t n;
  if (!PyArg_ParseTuple(args, "OOOn", &o_g, &o_u, &o_a, &n)) return NULL;
  Py_buffer b[3];
  int got = 0;
  PyObject* objs[3] = {o_g, o_u, o_a};
  for (; got < 3; got++)
    if (get_buffer(objs[got], &b[got], got == 2, 4, n, "geglu") != 0) break;
  if (got == 3) geglu((const float*)b[0].buf, (const float*)b[1].buf, (float*)b[2].buf, n);
  for (int i = 0; i < got; i++) PyBuffer_Release(&b[i]);
  if (got < 3) return NULL;
  Py_RETURN_NONE;
}


/* Soft-capping of the logits: y = tanh(x / cap) * cap, tanh through MLX's exp
   (tanh(z) = sign(z) (1 - e) / (1 + e), e = exp(-2 |z|)): within a few 1e-7 of cap. */
static void softcap_c(const float* x, float* y, Py_ssize_t n, float cap) {
  for (Py_ssize_t i = 0; i < n; i++) {
    const float z = x[i] / cap;
    const float e = dg_exp(-2.0f * fabsf(z));
    const float t = (1.0f - e) / (1.0f + e);
    y[i] = (z < 0.0f ? -t : t) * cap;
  }
}
#ifdef DG_AVX2
DG_TARGET static void softcap_avx2(const float* x, float* y, Py_ssize_t n, float cap) {
  const __m256 cv = _mm256_set1_ps(cap), one = _mm256_set1_ps(1.0f), sign = _mm256_set1_ps(-0.0f);
  Py_ssize_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 z = _mm256_div_ps(_mm256_loadu_ps(x + i), cv);
    const __m256 e = exp8(_mm256_mul_ps(_mm256_set1_ps(-2.0f), _mm256_andnot_ps(sign, z)));
    __m256 t = _mm256_div_ps(_mm256_sub_ps(one, e), _mm256_add_ps(one, e));
    t = _mm256_or_ps(t, _mm256_and_ps(sign, z));
    _mm256_storeu_ps(y + i, _mm256_mul_ps(t, cv));
  }
  softcap_c(x + i, y + i, n - i, cap);
}
#endif
static void (*softcap_pass)(const float*, float*, Py_ssize_t, float) = softcap_c;

typedef struct {
  const float* x;
  float* y;
  Py_ssize_t n;
  float cap;
} CapJob;

static void* softcap_worker(void* arg) {
  CapJob* j = (CapJob*)arg;
  softcap_pass(j->x, j->y, j->n, j->cap);
  return NULL;
}

static PyObject* softcap(PyObject* self, PyObject* args) {
  PyObject *o_x, *o_y;
  Py_ssize_t n;
  float cap;
  int threads;
  if (!PyArg_ParseTuple(args, "OOnfi", &o_x, &o_y, &n, &cap, &threads)) return NULL;
  Py_buffer bx, by;
  if (get_buffer(o_x, &bx, 0, 4, n, "x") != 0) return NULL;
  if (get_buffer(o_y, &by, 1, 4, n, "y") != 0) {
    PyBuffer_Release(&bx);
    return NULL;
  }
  if (threads < 1) threads = 1;
  if (threads > 64) threads = 64;
  CapJob jobs[64];
  pthread_t tids[64];
  char started[64] = {0};
  Py_BEGIN_ALLOW_THREADS;
  for (int i = 0; i < threads; i++) {
    const Py_ssize_t a = n * i / threads, b = n * (i + 1) / threads;
    jobs[i] = (CapJob){(const float*)bx.buf + a, (float*)by.buf + a, b - a, cap};
    if (i > 0) started[i] = pthread_create(&tids[i], NULL, softcap_worker, &jobs[i]) == 0;
  }
  for (int i = 0; i < threads; i++)
    if (!started[i]) softcap_worker(&jobs[i]);
  for (int i = 1; i < threads; i++)
    if (started[i]) pthread_join(tids[i], NULL);
  Py_END_ALLOW_THREADS;
  PyBuffer_Release(&bx);
  PyBuffer_Release(&by);
  Py_RETURN_NONE;
}

/* Finds cblas_sgemm among the libraries loaded globally (OpenBLAS by runtime.py or
   LD_PRELOAD); returns whether attention() can run. */
static PyObject* find_sgemm(PyObject* self, PyObject* noargs) {
  dg_sgemm = (sgemm_fn)dlsym(RTLD_DEFAULT, "cblas_sgemm");
  dg_blas_set_threads = (set_threads_fn)dlsym(RTLD_DEFAULT, "openblas_set_num_threads");
  dg_blas_get_threads = (get_threads_fn)dlsym(RTLD_DEFAULT, "openblas_get_num_threads");
  return PyBool_FromLong(dg_sgemm != NULL);
}

static void dg_row(const Job* job, Py_ssize_t row, float* x) {
  const Py_ssize_t V = job->V;
  const float* l = job->logits + row * V;
  const uint32_t key = job->keys[row];
  const float m = scale_max(l, job->temp, x, V);
  Py_ssize_t am = 0;
  while (am < V - 1 && !(x[am] == m)) am++;

  double s = 0.0, w = 0.0;
  for (Py_ssize_t b = 0; b < V; b += DG_BLOCK) sums(x + b, m, V - b < DG_BLOCK ? V - b : DG_BLOCK, &s, &w);
  const float sf = (float)s;
  const float log_s = logf(sf);
  const float lse = m + log_s;
  job->lse[row] = lse;
  job->entropy[row] = log_s - (float)(w / s);
  job->argmax[row] = (int32_t)am;

  /* Gumbel-max: the first maximum of x + g, in blocks: noise for a block (vectorised),
     then the block's maximum, and the index only when the block can win. */
  float best = -INFINITY;
  Py_ssize_t bi = 0;
  float* y = x + V;
  for (Py_ssize_t b = 0; b < V; b += DG_BLOCK) {
    Py_ssize_t n = V - b < DG_BLOCK ? V - b : DG_BLOCK;
    float m_blk = noisy(x + b, key, (uint32_t)b, y, n);
    if (m_blk > best) {
      Py_ssize_t i = 0;
      while (i < n - 1 && !(y[i] == m_blk)) i++;
      best = m_blk;
      bi = b + i;
    }
  }
  job->sampled[row] = (int32_t)bi;
  if (job->probs) probs_pass(x, lse, job->probs + row * V, V);
}

static void* dg_worker(void* arg) {
  Job* job = (Job*)arg;
  float* x = (float*)malloc(sizeof(float) * (size_t)(job->V + DG_BLOCK));  /* x, then a block of y */
  if (!x) {
    job->failed = 1;
    return NULL;
  }
  for (Py_ssize_t r = job->row0; r < job->row1; r++) dg_row(job, r, x);
  free(x);
  return NULL;
}

static PyObject* sample_step(PyObject* self, PyObject* args) {
  PyObject *o_logits, *o_keys, *o_sampled, *o_argmax, *o_entropy, *o_lse, *o_probs;
  float temp;
  Py_ssize_t rows, V;
  int threads;
  if (!PyArg_ParseTuple(args, "OfOnnOOOOOi", &o_logits, &temp, &o_keys, &rows, &V, &o_sampled, &o_argmax,
                        &o_entropy, &o_lse, &o_probs, &threads))
    return NULL;
  if (rows < 0 || V < 1) return PyErr_Format(PyExc_ValueError, "sample_step: bad shape (%zd, %zd)", rows, V);
  Py_buffer b[7];
  int got = 0;
  PyObject* ins[7] = {o_logits, o_keys, o_sampled, o_argmax, o_entropy, o_lse, o_probs};
  const char* names[7] = {"logits", "keys", "sampled", "argmax", "entropy", "lse", "probs"};
  const Py_ssize_t sizes[7] = {4, 4, 4, 4, 4, 4, 4};
  const Py_ssize_t counts[7] = {rows * V, rows, rows, rows, rows, rows, rows * V};
  const int nbuf = o_probs == Py_None ? 6 : 7;
  for (; got < nbuf; got++)
    if (get_buffer(ins[got], &b[got], got >= 2, sizes[got], counts[got], names[got]) != 0) break;
  if (got < nbuf) {
    for (int i = 0; i < got; i++) PyBuffer_Release(&b[i]);
    return NULL;
  }
  if (threads < 1) threads = 1;
  if (threads > rows) threads = rows > 0 ? (int)rows : 1;
  Job* jobs = (Job*)calloc((size_t)threads, sizeof(Job));
  pthread_t* tids = (pthread_t*)calloc((size_t)threads, sizeof(pthread_t));
  char* started = (char*)calloc((size_t)threads, 1);
  int failed = !jobs || !tids || !started;
  if (!failed) {
    Py_BEGIN_ALLOW_THREADS;
    for (int i = 0; i < threads; i++) {
      Job* j = &jobs[i];
      j->logits = (const float*)b[0].buf;
      j->keys = (const uint32_t*)b[1].buf;
      j->temp = temp;
      j->V = V;
      j->row0 = rows * i / threads;
      j->row1 = rows * (i + 1) / threads;
      j->sampled = (int32_t*)b[2].buf;
      j->argmax = (int32_t*)b[3].buf;
      j->entropy = (float*)b[4].buf;
      j->lse = (float*)b[5].buf;
      j->probs = nbuf == 7 ? (float*)b[6].buf : NULL;
      /* the calling thread takes the first share (and any share a thread cannot take) */
      if (i > 0) started[i] = pthread_create(&tids[i], NULL, dg_worker, j) == 0;
    }
    for (int i = 0; i < threads; i++)
      if (!started[i]) dg_worker(&jobs[i]);
    for (int i = 1; i < threads; i++)
      if (started[i]) pthread_join(tids[i], NULL);
    for (int i = 0; i < threads; i++) failed |= jobs[i].failed;
    Py_END_ALLOW_THREADS;
  }
  free(started);
  free(jobs);
  free(tids);
  for (int i = 0; i < nbuf; i++) PyBuffer_Release(&b[i]);
  if (failed) return PyErr_NoMemory();
  Py_RETURN_NONE;
}

/* Mismatches of the vectorised log against the platform's logf on every input the noise
   gives (u on its 2^24 grid, then -log(u)); switches the vectorised noise on when there
   are none (so a libm with another logf keeps logf, and the MLX path's tokens). */
static PyObject* check_log(PyObject* self, PyObject* noargs) {
  long bad = 0;
#ifdef DG_AVX2
  if (dg_avx2) {
    Py_BEGIN_ALLOW_THREADS;
    bad = check_log_avx2();
    Py_END_ALLOW_THREADS;
    noisy = bad == 0 ? noisy_avx2 : noisy_c;
    return PyLong_FromLong(bad);
  }
#endif
  return PyLong_FromLong(bad); /* no vectorised log here: the noise calls logf itself */
}

static PyObject* info(PyObject* self, PyObject* noargs) {
  return Py_BuildValue("{s:O,s:O}", "avx2", dg_avx2 ? Py_True : Py_False, "vector_noise",
#ifdef DG_AVX2
                       noisy == noisy_avx2 ? Py_True : Py_False
#else
                       Py_False
#endif
  );
}

static PyObject* exp_(PyObject* self, PyObject* args) {
  float x;
  if (!PyArg_ParseTuple(args, "f", &x)) return NULL;
  return PyFloat_FromDouble(dg_exp(x));
}

/* Selects the portable C passes or, where the CPU has AVX2 and FMA, the vectorised ones
   (the vectorised noise needs check_log() as well). */
static void select_passes(int avx2) {
  scale_max = scale_max_c, sums = sums_c, probs_pass = probs_c, exp_pass = exp_pass_c;
  geglu = geglu_c, softcap_pass = softcap_c, noisy = noisy_c;
  dg_avx2 = 0;
#ifdef DG_AVX2
  if (avx2 && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
    dg_avx2 = 1;
    scale_max = scale_max_avx2;
    sums = sums_avx2;
    probs_pass = probs_avx2;
    exp_pass = exp_pass_avx2;
    geglu = geglu_avx2;
    softcap_pass = softcap_avx2;
  }
#else
  (void)avx2;
#endif
}

/* For tests: use_vector(False) runs the portable C passes, use_vector(True) the fastest. */
static PyObject* use_vector(PyObject* self, PyObject* args) {
  int on;
  if (!PyArg_ParseTuple(args, "p", &on)) return NULL;
  select_passes(on);
  Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"sample_step", sample_step, METH_VARARGS,
     "sample_step(logits, temp, keys, rows, V, sampled, argmax, entropy, lse, probs|None, threads)"},
    {"check_log", check_log, METH_NOARGS, "Compare the vectorised log with logf; enable it if equal."},
    {"attention", attention, METH_VARARGS,
     "attention(q, k, v, out, B, Hq, Hkv, L, S, D, Dv, Bk, scale, causal, q_pos0, k_pos0, window, key_mask|None, "
     "block_rows, threads)"},
    {"moe", moe, METH_VARARGS, "moe(x, indices, weights, gate, up, down, out, N, K, E, H, I[, threads])"},
    {"geglu", geglu_py, METH_VARARGS, "geglu(gate, up, out, n) (for tests)"},
    {"softcap", softcap, METH_VARARGS, "softcap(x, y, n, cap, threads): y = tanh(x / cap) * cap"},
    {"find_sgemm", find_sgemm, METH_NOARGS, "Look up cblas_sgemm in the process; whether attention can run."},
    {"use_vector", use_vector, METH_VARARGS, "use_vector(on): the AVX2 passes (where the CPU has them) or portable C"},
    {"info", info, METH_NOARGS, "Which passes are in use: {'avx2': bool, 'vector_noise': bool}."},
    {"exp", exp_, METH_VARARGS, "MLX's CPU exp of one float32 (for tests)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_cpu", "Fused CPU sampling step.", -1, methods};

PyMODINIT_FUNC PyInit__cpu(void) {
#ifdef DG_AVX2
  __builtin_cpu_init();
#endif
  select_passes(1);
  return PyModule_Create(&module);
}
