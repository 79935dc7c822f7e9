/* PROTOTYPE, not built by recur: the AMX product of the prototype exact scorer
   (docs/prototypes/amx-scorer/README.md). The scorer itself shipped as models/native/bf16_topk.c,
   with its product on AVX-512 BF16 instead; this file holds what differs on AMX, to put back in
   that kernel on an Intel CPU with AMX-BF16:
   - product_64 below in place of the kernel's (the same item layout: AMX's B tiles);
   - tiles_on(&saved) before score_topk's loop over the chunks and _tile_loadconfig(&saved) after it;
   - amx_init() once per process before the first call (Linux gives a process AMX only on request);
   - build flags -mamx-tile -mamx-bf16 added to models/bf16.py's FLAGS. */
#include <immintrin.h>
#include <stdint.h>
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

