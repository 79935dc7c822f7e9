/* Exact top-k scoring on a CPU with AVX-512 BF16 (models/bf16.py builds and loads it;
   docs/internals.md).

   One call scores up to 64 queries against every item:
   1. the product in bfloat16 with float32 sums (vdpbf16ps), 16 queries x 64 items at a time;
   2. per query, the items whose approximate score passes a running threshold are kept (at most
      CAP; when SOFT are kept, the threshold is raised by bisection to a value at least M of them
      reach), so no block of scores is ever written out;
   3. the kept items are scored again in float32 from the float32 scoring matrix, the k best returned;
   4. tau[q]: every item that was not kept scores at most tau[q] approximately. The caller accepts a
      row when its k-th exact score exceeds tau[q] plus the bfloat16 error bound and scores the
      other rows with the float32 scorer, so the result is the float32 top-k.
   Item vectors of any width (padded with zeros to a multiple of 32), k at most M. It began as an AMX prototype (docs/prototypes/amx-scorer/,
   measured on an Intel CPU); this is the same algorithm with the product on AVX-512 BF16, which
   AMD Zen 4 and later and Intel Cooper Lake and later have. */
#include <immintrin.h>
#include <stdint.h>
#include <stddef.h>
#include <math.h>
#include <unistd.h>
#include <sys/syscall.h>
/* `rows` (4, 8, 12 or 16) queries A ([rows][w] bf16) x one chunk of 64 items Ec ->
   buf[group][query][item], float32. Ec: [4 groups of 16 items][w / 2 pairs of dims][16 items][2],
   so one 64-byte row holds a pair of dims of 16 items, and a query's pair broadcast to 16 lanes
   scores all 16 at once. */
static inline void product_64(const uint16_t* A, const uint16_t* Ec, float buf[4][16][16], int rows, int w) {
  const size_t group = (size_t)(w / 2) * 32;
  for (int r0 = 0; r0 < rows; r0 += 4) {
    __m512 acc[4][4];
    for (int i = 0; i < 4; i++) for (int g = 0; g < 4; g++) acc[i][g] = _mm512_setzero_ps();
    for (int p = 0; p < w / 2; p++) {
      const uint16_t* row = Ec + (size_t)p * 32;
      __m512bh e0 = (__m512bh)_mm512_loadu_si512(row), e1 = (__m512bh)_mm512_loadu_si512(row + group),
               e2 = (__m512bh)_mm512_loadu_si512(row + 2 * group), e3 = (__m512bh)_mm512_loadu_si512(row + 3 * group);
      for (int i = 0; i < 4; i++) {
        int32_t pair;
        __builtin_memcpy(&pair, A + (size_t)(r0 + i) * w + 2 * p, 4);
        __m512bh q = (__m512bh)_mm512_set1_epi32(pair);
        acc[i][0] = _mm512_dpbf16_ps(acc[i][0], q, e0);
        acc[i][1] = _mm512_dpbf16_ps(acc[i][1], q, e1);
        acc[i][2] = _mm512_dpbf16_ps(acc[i][2], q, e2);
        acc[i][3] = _mm512_dpbf16_ps(acc[i][3], q, e3);
      }
    }
    for (int i = 0; i < 4; i++) for (int g = 0; g < 4; g++) _mm512_store_ps(buf[g][r0 + i], acc[i][g]);
  }
}

#define M 48
#define CAP 256
#define SOFT (M + 48)
typedef struct { float v[CAP]; int32_t i[CAP]; int n; float thr; int overflow; } keep_t;

/* Append the lanes of v / ii that mask mk selects at k->v + n / k->i + n. Compressed in a register
   and stored whole: a compress with a memory destination (vcompressps / vpcompressd m512) is
   microcoded on AMD Zen 4, where it took about half the kernel's time (docs/performance.md).
   The store writes 16 lanes: the lanes past the selected ones land on slots at or above the new
   count, which hold nothing yet; every caller has n <= CAP - 16 (the callers' checks), so they stay
   inside v and i. */
static inline void append(keep_t* k, int n, __mmask16 mk, __m512 v, __m512i ii) {
  _mm512_storeu_ps(k->v + n, _mm512_maskz_compress_ps(mk, v));
  _mm512_storeu_si512(k->i + n, _mm512_maskz_compress_epi32(mk, ii));
}

static int count_ge(const keep_t* k, float t) {
  int c = 0; __m512 tt = _mm512_set1_ps(t);
  for (int j = 0; j < k->n; j += 16) {
    __mmask16 live = k->n - j >= 16 ? 0xFFFF : (__mmask16)((1u << (k->n - j)) - 1);
    c += __builtin_popcount(_mm512_mask_cmp_ps_mask(live, _mm512_maskz_loadu_ps(live, k->v + j), tt, _CMP_GE_OQ));
  }
  return c;
}
/* raise the threshold to a value that at least M kept items reach (bisection on the values), keep those */
static void compact(keep_t* k) {
  float lo = k->thr, hi = -INFINITY;
  for (int j = 0; j < k->n; j++) hi = k->v[j] > hi ? k->v[j] : hi;
  if (lo == -INFINITY) { lo = hi; for (int j = 0; j < k->n; j++) lo = k->v[j] < lo ? k->v[j] : lo; }
  /* invariant: count_ge(lo) >= M */
  for (int it = 0; it < 24; it++) {
    float mid = lo + (hi - lo) * 0.5f;
    if (!(mid > lo)) break;
    int c = count_ge(k, mid);
    if (c >= M) { lo = mid; if (c <= M + 8) break; } else hi = mid;
  }
  int n = 0; __m512 tt = _mm512_set1_ps(lo);
  for (int j = 0; j < k->n; j += 16) {
    __mmask16 live = k->n - j >= 16 ? 0xFFFF : (__mmask16)((1u << (k->n - j)) - 1);
    __m512 v = _mm512_maskz_loadu_ps(live, k->v + j); __m512i ii = _mm512_maskz_loadu_epi32(live, k->i + j);
    __mmask16 mk = _mm512_mask_cmp_ps_mask(live, v, tt, _CMP_GE_OQ);
    append(k, n, mk, v, ii);  /* n <= j <= CAP - 16: it only overwrites slots already read */
    n += __builtin_popcount(mk);
  }
  k->n = n; k->thr = lo;
}

/* w: the vectors' width, a multiple of 32 (zeros pad narrower ones); Q: [B][w] bf16 (B a multiple
   of 4, at most 64); E: [nc][4][w / 2][16][2] bf16; bias: [nc*64] (-inf for the padding items);
   qf: [B][w] float queries; S: [V][w + 1] float (item vector, bias);
   k: at most M; workspace: workspace_bytes() bytes, 64-byte aligned, of the caller's (one call at a time);
   out: top_v [B][k], top_i [B][k] best first by exact float32 score; tau[B]: the approximate score at or
   above which every item outside the kept ones lies below (-inf: all items kept) */
size_t workspace_bytes(void) { return 64 * sizeof(keep_t); }

void score_topk(const uint16_t* Q, const uint16_t* E, const float* bias, int B, int nc, int w,
                const float* qf, const float* S, int k, float* top_v, int32_t* top_i, float* tau, float* kth,
                void* workspace)
{
  float buf[4][16][16] __attribute__((aligned(64)));
  keep_t* keep = (keep_t*)workspace;
  for (int q = 0; q < B; q++) { keep[q].n = 0; keep[q].thr = -INFINITY; keep[q].overflow = 0; }
  for (int c = 0; c < nc; c++) {
    const uint16_t* Ec = E + (size_t)c * 64 * w;
    const float* bc = bias + (size_t)c * 64;
    __m512 bb[4] = {_mm512_loadu_ps(bc), _mm512_loadu_ps(bc + 16), _mm512_loadu_ps(bc + 32), _mm512_loadu_ps(bc + 48)};
    for (int qt = 0; qt < B; qt += 16) {
      int rows = B - qt < 16 ? B - qt : 16;
      product_64(Q + (size_t)qt * w, Ec, buf, rows, w);
      for (int r = 0; r < rows; r++) {
        keep_t* kp = &keep[qt + r];
        __m512 t = _mm512_set1_ps(kp->thr);
        __m512 s0 = _mm512_add_ps(_mm512_load_ps(buf[0][r]), bb[0]);
        __m512 s1 = _mm512_add_ps(_mm512_load_ps(buf[1][r]), bb[1]);
        __m512 s2 = _mm512_add_ps(_mm512_load_ps(buf[2][r]), bb[2]);
        __m512 s3 = _mm512_add_ps(_mm512_load_ps(buf[3][r]), bb[3]);
        __m512 mx = _mm512_max_ps(_mm512_max_ps(s0, s1), _mm512_max_ps(s2, s3));
        if (!_mm512_cmp_ps_mask(mx, t, _CMP_GT_OQ)) continue;
        __m512 ss[4] = {s0, s1, s2, s3};
        for (int g = 0; g < 4; g++) {
          __mmask16 mk = _mm512_cmp_ps_mask(ss[g], t, _CMP_GT_OQ);
          if (!mk) continue;
          if (kp->n + 16 > SOFT) { compact(kp); t = _mm512_set1_ps(kp->thr); mk = _mm512_cmp_ps_mask(ss[g], t, _CMP_GT_OQ); if (!mk) continue; }
          if (kp->n + 16 > CAP) { kp->overflow = 1; continue; }
          int n = kp->n;
          __m512i ids = _mm512_add_epi32(_mm512_set1_epi32(c * 64 + g * 16), _mm512_set_epi32(15,14,13,12,11,10,9,8,7,6,5,4,3,2,1,0));
          append(kp, n, mk, ss[g], ids);  /* n <= CAP - 16: checked above */
          kp->n = n + __builtin_popcount(mk);
        }
      }
    }
  }
  for (int q = 0; q < B; q++) {
    keep_t* kp = &keep[q];
    if (kp->n > M) compact(kp);  /* thr stays -inf when no compaction ever ran: every item was kept */
    tau[q] = kp->overflow ? INFINITY : kp->thr;
    /* exact float32 scores of the kept items */
    const float* x = qf + (size_t)q * w;
    float ev[CAP]; int32_t ei[CAP]; int n = kp->n;
    for (int j = 0; j < n; j++) {
      const float* row = S + (size_t)kp->i[j] * (w + 1);
      __m512 acc = _mm512_setzero_ps();
      for (int d = 0; d < w; d += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(row + d), _mm512_loadu_ps(x + d), acc);
      ev[j] = _mm512_reduce_add_ps(acc) + row[w];
      ei[j] = kp->i[j];
    }
    /* the k best, best first (insertion sort of at most M) */
    for (int a = 1; a < n; a++) {
      float v = ev[a]; int32_t id = ei[a]; int b = a - 1;
      while (b >= 0 && ev[b] < v) { ev[b + 1] = ev[b]; ei[b + 1] = ei[b]; b--; }
      ev[b + 1] = v; ei[b + 1] = id;
    }
    for (int j = 0; j < k; j++) {
      top_v[(size_t)q * k + j] = j < n ? ev[j] : -INFINITY;
      top_i[(size_t)q * k + j] = j < n ? ei[j] : 0;
    }
    kth[q] = k <= n ? ev[k - 1] : -INFINITY;
  }
}
