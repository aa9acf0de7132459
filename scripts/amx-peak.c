// Peak int8 throughput of one core's AMX unit (TDPBUSD on 16x64 tiles, four accumulators), the
// headroom over the VNNI tile kernels for batched CPU matmuls (docs/benchmarks.md, engine).
// Build and run: gcc -O2 -mamx-int8 -mamx-tile scripts/amx-peak.c -o /tmp/amx-peak && /tmp/amx-peak
// Linux grants a process the AMX tile state on request (arch_prctl ARCH_REQ_XCOMP_PERM).
#include <immintrin.h>
#include <stdio.h>
#include <stdint.h>
#include <string.h>
#include <unistd.h>
#include <sys/syscall.h>
#include <time.h>
#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18
typedef struct { uint8_t palette, start_row, r[14]; uint16_t colsb[16]; uint8_t rows[16]; } cfg_t;
int main() {
  long rc = syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA);
  printf("arch_prctl rc=%ld\n", rc);
  if (rc) return 1;
  cfg_t cfg; memset(&cfg, 0, sizeof cfg); cfg.palette = 1;
  for (int i = 0; i < 8; i++) { cfg.colsb[i] = 64; cfg.rows[i] = 16; }
  _tile_loadconfig(&cfg);
  static int8_t a[16*64], b[16*64]; static int32_t c[16*16];
  for (int i = 0; i < 1024; i++) { a[i] = i % 7; b[i] = i % 5 - 2; }
  _tile_loadd(1, a, 64); _tile_loadd(2, b, 64); _tile_zero(0); _tile_zero(3); _tile_zero(4); _tile_zero(5);
  struct timespec t0, t1; clock_gettime(CLOCK_MONOTONIC, &t0);
  long n = 20000000;
  for (long i = 0; i < n; i++) { _tile_dpbusd(0, 1, 2); _tile_dpbusd(3, 1, 2); _tile_dpbusd(4, 1, 2); _tile_dpbusd(5, 1, 2); }
  clock_gettime(CLOCK_MONOTONIC, &t1);
  _tile_stored(0, c, 64);
  double s = (t1.tv_sec - t0.tv_sec) + (t1.tv_nsec - t0.tv_nsec) * 1e-9;
  printf("c[0]=%d (the result, so the loop is not elided)\n%.1f GMAC/s (one thread)\n", c[0], 4.0 * n * 16 * 16 * 64 / s / 1e9);
  _tile_release();
  return 0;
}
