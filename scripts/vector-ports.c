// Throughput of the instructions of the ggml-order tile kernels (block_dot/x86.rs), alone and
// mixed: which ones share the vector ports that bound a tile (docs/benchmarks.md, engine,
// seventeenth session). Each line runs 8 independent instructions per group; the figure is core
// cycles per group. Eight chains hide the latency of all but `vpdpbusd` on Golden Cove (5
// cycles: its line reads 6.0 there, where 16 chains take 8.0 per 16, so 1 per cycle per port).
// Build and run: gcc -O2 -mavx512f scripts/vector-ports.c -o /tmp/vector-ports && /tmp/vector-ports
#include <stdio.h>
#include <time.h>
#include <x86intrin.h>

#define ITERS 20000000L
#define CLOBBERS "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", \
  "xmm10", "xmm11", "xmm12", "xmm13", "xmm14", "xmm15", "xmm16", "xmm17", "xmm18", "xmm19", \
  "xmm20", "xmm21", "xmm22", "xmm23", "xmm24", "xmm25", "xmm26", "xmm27", "xmm30", "xmm31"
#define X8(i) i(0) i(1) i(2) i(3) i(4) i(5) i(6) i(7)
// Accumulating instructions write zmm0-7 (integer) and zmm10-17 (float), the others zmm20-27;
// zmm30 and zmm31 are the sources.
#define DP(n) "vpdpbusd %%zmm30, %%zmm31, %%zmm" #n "\n"
#define FMA(n) "vfmadd231ps %%zmm30, %%zmm31, %%zmm1" #n "\n"
#define CVT(n) "vcvtdq2ps %%zmm30, %%zmm2" #n "\n"
#define MUL(n) "vmulps %%zmm30, %%zmm31, %%zmm2" #n "\n"
#define BSD(n) "vbroadcastsd 8(%%rsp), %%zmm2" #n "\n"
#define LOAD(n) "vmovdqu64 64(%%rsp), %%zmm2" #n "\n"
#define MADDUBS(n) "vpmaddubsw %%zmm30, %%zmm31, %%zmm2" #n "\n"

static double seconds(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}

// Core cycles per second, from a chain of dependent integer multiplications (3 cycles each on
// Zen and Golden Cove; a chain of immediate additions would not do, as Golden Cove folds them at
// rename).
static double clock_hz(void) {
  long x = 1;
  double t = seconds();
  for (long i = 0; i < ITERS; i++) __asm__ volatile("imul %0, %0\n imul %0, %0\n imul %0, %0\n imul %0, %0" : "+r"(x));
  return ITERS * 12.0 / (seconds() - t);
}

#define RUN(name, body)                                                                         \
  {                                                                                             \
    double t = seconds();                                                                       \
    for (long i = 0; i < ITERS; i++) __asm__ volatile(body ::: CLOBBERS);                       \
    printf("%-22s %5.1f cycles per 8\n", name, (seconds() - t) * hz / ITERS);                   \
  }

int main(void) {
  double hz = clock_hz();
  printf("core clock %.2f GHz\n", hz / 1e9);
  RUN("dpbusd", X8(DP))
  RUN("fma", X8(FMA))
  RUN("cvt", X8(CVT))
  RUN("broadcast load 64", X8(BSD))
  RUN("load 512", X8(LOAD))
  RUN("dpbusd + fma", X8(DP) X8(FMA))
  RUN("dpbusd + cvt", X8(DP) X8(CVT))
  RUN("maddubs + fma", X8(MADDUBS) X8(FMA))
  RUN("dpbusd+cvt+fma", X8(DP) X8(CVT) X8(FMA))
  RUN("dpbusd+cvt+fma+mul", X8(DP) X8(CVT) X8(FMA) X8(MUL))
  RUN("dpbusd+cvt+fma+bsd", X8(DP) X8(CVT) X8(FMA) X8(BSD))
  return 0;
}
