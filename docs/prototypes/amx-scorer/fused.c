/* PROTOTYPE, not used by recur: exact top-k scoring on a CPU with AMX (docs/prototypes/amx-scorer/README.md).

   One call scores up to 64 queries against every item:
   1. the product in bfloat16 on AMX tiles (float32 sums), 16 queries x 64 items at a time;
   2. per query, the items whose approximate score passes a running threshold are kept (at most
      CAP; when SOFT are kept, the threshold is raised by bisection to a value at least M of them reach);
   3. the kept items are scored again in float32 from the float32 scoring matrix, the k best returned;
   4. tau[q]: every item that was not kept scores at most tau[q] approximately. The caller accepts a
      row when its k-th exact score exceeds tau[q] plus the bfloat16 error bound, and scores the
      other rows with the float32 scorer: the result is then the float32 top-k.
   start_thresholds (optional, before score_topk): each query's starting threshold from its chunk
   maxima, for flat scores where many items would pass a threshold that starts at -inf.
   Build: gcc -O3 -march=native -mamx-tile -mamx-bf16 -shared -fPIC fused.c -o fused.so -lm
   Known gaps before it could ship: buffers are static (one caller thread; start_thresholds' holds
   at most 4,096 chunks, 262,144 items, unchecked), no exclusions, 64-wide item vectors only, k at
   most M. */
#include <immintrin.h>
#include <stdint.h>
#include <stddef.h>
#include <math.h>
#include <unistd.h>
#include <sys/syscall.h>
#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18
typedef struct { uint8_t palette_id; uint8_t start_row; uint8_t reserved[14]; uint16_t colsb[16]; uint8_t rows[16]; } __attribute__((packed)) tilecfg;
int amx_init(void) { return (int)syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA); }

/* AMX on for this thread: the caller's tile configuration kept in `saved`, restored by
   _tile_loadconfig(saved) (a saved palette 0 releases the tiles) */
static inline void tiles_on(tilecfg* saved) {
  _tile_storeconfig(saved);
  tilecfg cfg = {0};
  cfg.palette_id = 1;
  for (int i = 0; i < 8; i++) { cfg.colsb[i] = 64; cfg.rows[i] = 16; }
  _tile_loadconfig(&cfg);
}

/* 16 queries A ([16][64] bf16) x one chunk of 64 items Ec -> buf[tile][query][item], float32 */
static inline void product_64(const uint16_t* A, const uint16_t* Ec, float buf[4][16][16]) {
  _tile_loadd(4, A, 128);
  _tile_loadd(5, A + 32, 128);
  _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
  _tile_loadd(6, Ec + 0 * 1024, 64); _tile_loadd(7, Ec + 0 * 1024 + 512, 64);
  _tile_dpbf16ps(0, 4, 6); _tile_dpbf16ps(0, 5, 7);
  _tile_loadd(6, Ec + 1 * 1024, 64); _tile_loadd(7, Ec + 1 * 1024 + 512, 64);
  _tile_dpbf16ps(1, 4, 6); _tile_dpbf16ps(1, 5, 7);
  _tile_loadd(6, Ec + 2 * 1024, 64); _tile_loadd(7, Ec + 2 * 1024 + 512, 64);
  _tile_dpbf16ps(2, 4, 6); _tile_dpbf16ps(2, 5, 7);
  _tile_loadd(6, Ec + 3 * 1024, 64); _tile_loadd(7, Ec + 3 * 1024 + 512, 64);
  _tile_dpbf16ps(3, 4, 6); _tile_dpbf16ps(3, 5, 7);
  _tile_stored(0, buf[0], 64); _tile_stored(1, buf[1], 64); _tile_stored(2, buf[2], 64); _tile_stored(3, buf[3], 64);
}

#define M 48
#define CAP 256
#define SOFT (M + 48)
typedef struct { float v[CAP]; int32_t i[CAP]; int n; float thr; int overflow; } keep_t;

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
    _mm512_mask_compressstoreu_ps(k->v + n, mk, v);
    _mm512_mask_compressstoreu_epi32(k->i + n, mk, ii);
    n += __builtin_popcount(mk);
  }
  k->n = n; k->thr = lo;
}

/* A starting threshold per query for score_topk: the largest value that at least M chunk maxima
   reach (so at least M items score that much or more), lowered by one float step so that those
   items pass score_topk's "greater than" test. Costs one more product of every item. */
void start_thresholds(const uint16_t* Q, const uint16_t* E, const float* bias, int B, int nc, float* start)
{
  static float cmax[64 * 4096];  /* nc <= 4096 */
  tilecfg saved __attribute__((aligned(64)));
  tiles_on(&saved);
  float buf[4][16][16] __attribute__((aligned(64)));
  for (int c = 0; c < nc; c++) {
    const uint16_t* Ec = E + (size_t)c * 4 * 2 * 16 * 32;
    const float* bc = bias + (size_t)c * 64;
    __m512 b0 = _mm512_loadu_ps(bc), b1 = _mm512_loadu_ps(bc + 16), b2 = _mm512_loadu_ps(bc + 32), b3 = _mm512_loadu_ps(bc + 48);
    for (int qt = 0; qt < B; qt += 16) {
      product_64(Q + (size_t)qt * 64, Ec, buf);
      for (int r = 0; r < 16; r++) {
        __m512 m = _mm512_max_ps(_mm512_max_ps(_mm512_add_ps(_mm512_load_ps(buf[0][r]), b0), _mm512_add_ps(_mm512_load_ps(buf[1][r]), b1)),
                                 _mm512_max_ps(_mm512_add_ps(_mm512_load_ps(buf[2][r]), b2), _mm512_add_ps(_mm512_load_ps(buf[3][r]), b3)));
        cmax[(size_t)(qt + r) * nc + c] = _mm512_reduce_max_ps(m);
      }
    }
  }
  _tile_loadconfig(&saved);
  for (int q = 0; q < B; q++) {
    const float* cm = cmax + (size_t)q * nc;
    if (nc <= M) { start[q] = -INFINITY; continue; }
    float lo = INFINITY, hi = -INFINITY;
    for (int c = 0; c < nc; c++) { lo = cm[c] < lo ? cm[c] : lo; hi = cm[c] > hi ? cm[c] : hi; }
    for (int it = 0; it < 32; it++) {  /* invariant: at least M maxima >= lo */
      float mid = lo + (hi - lo) * 0.5f;
      if (!(mid > lo)) break;
      int cnt = 0; __m512 tt = _mm512_set1_ps(mid);
      for (int c = 0; c < nc; c += 16) {
        __mmask16 live = nc - c >= 16 ? 0xFFFF : (__mmask16)((1u << (nc - c)) - 1);
        cnt += __builtin_popcount(_mm512_mask_cmp_ps_mask(live, _mm512_maskz_loadu_ps(live, cm + c), tt, _CMP_GE_OQ));
      }
      if (cnt >= M) { lo = mid; if (cnt <= M + 4) break; } else hi = mid;
    }
    start[q] = nextafterf(lo, -INFINITY);
  }
}

/* Q: [B][64] bf16 (B multiple of 16, <= 64); E: [nc][4][2][16][16][2] bf16; bias: [nc*64] (-inf padding);
   qf: [B][64] float queries; S: [V][65] float (item vector, bias);
   out: top_v [B][k], top_i [B][k] best first by exact float32 score; tau[B]: the approximate score at or
   above which every item outside the kept ones lies below (-inf: all items kept) */
void score_topk(const uint16_t* Q, const uint16_t* E, const float* bias, int B, int nc,
                const float* qf, const float* S, int k, float* top_v, int32_t* top_i, float* tau, float* kth,
                const float* start)
{
  tilecfg saved __attribute__((aligned(64)));
  tiles_on(&saved);
  float buf[4][16][16] __attribute__((aligned(64)));
  static keep_t keep[64];
  for (int q = 0; q < B; q++) { keep[q].n = 0; keep[q].thr = start ? start[q] : -INFINITY; keep[q].overflow = 0; }
  for (int c = 0; c < nc; c++) {
    const uint16_t* Ec = E + (size_t)c * 4 * 2 * 16 * 32;
    const float* bc = bias + (size_t)c * 64;
    __m512 bb[4] = {_mm512_loadu_ps(bc), _mm512_loadu_ps(bc + 16), _mm512_loadu_ps(bc + 32), _mm512_loadu_ps(bc + 48)};
    for (int qt = 0; qt < B; qt += 16) {
      product_64(Q + (size_t)qt * 64, Ec, buf);
      for (int r = 0; r < 16; r++) {
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
          _mm512_mask_compressstoreu_ps(kp->v + n, mk, ss[g]);
          __m512i ids = _mm512_add_epi32(_mm512_set1_epi32(c * 64 + g * 16), _mm512_set_epi32(15,14,13,12,11,10,9,8,7,6,5,4,3,2,1,0));
          _mm512_mask_compressstoreu_epi32(kp->i + n, mk, ids);
          kp->n = n + __builtin_popcount(mk);
        }
      }
    }
  }
  _tile_loadconfig(&saved);
  for (int q = 0; q < B; q++) {
    keep_t* kp = &keep[q];
    if (kp->n > M) compact(kp);  /* thr stays -inf when no compaction ever ran: every item was kept */
    tau[q] = kp->overflow ? INFINITY : kp->thr;
    /* exact float32 scores of the kept items */
    const float* x = qf + (size_t)q * 64;
    __m512 x0 = _mm512_loadu_ps(x), x1 = _mm512_loadu_ps(x + 16), x2 = _mm512_loadu_ps(x + 32), x3 = _mm512_loadu_ps(x + 48);
    float ev[CAP]; int32_t ei[CAP]; int n = kp->n;
    for (int j = 0; j < n; j++) {
      const float* row = S + (size_t)kp->i[j] * 65;
      __m512 acc = _mm512_mul_ps(_mm512_loadu_ps(row), x0);
      acc = _mm512_fmadd_ps(_mm512_loadu_ps(row + 16), x1, acc);
      acc = _mm512_fmadd_ps(_mm512_loadu_ps(row + 32), x2, acc);
      acc = _mm512_fmadd_ps(_mm512_loadu_ps(row + 48), x3, acc);
      ev[j] = _mm512_reduce_add_ps(acc) + row[64];
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
