/* This CPU's fp32 peak: AVX-512 fused multiply-adds with nothing else in the loop.
 *
 *     gcc -O3 -march=native -fopenmp benchmarks/cpu_peak.c -o /tmp/cpu_peak
 *     OMP_NUM_THREADS=2 /tmp/cpu_peak
 *
 * Twelve independent accumulators per thread: an FMA has a latency of about 4 cycles and a
 * core can start two per cycle, so fewer chains would measure the latency, not the rate.
 * What a matmul kernel (or a whole model) reaches is read against this number in
 * benchmarks/deploy_results.md. Needs AVX-512 (-march=native on a CPU without it fails to
 * compile the intrinsics, which is the answer for such a CPU).
 */
#include <immintrin.h>
#include <omp.h>
#include <stdio.h>

int main(void) {
    const long iters = 200000000;
    double best = 0;
    for (int rep = 0; rep < 5; rep++) {
        double t0 = omp_get_wtime();
        float sink = 0;  /* read at the end, so the compiler cannot drop the loop */
#pragma omp parallel reduction(+ : sink)
        {
            __m512 acc[12], m = _mm512_set1_ps(0.999999f), c = _mm512_set1_ps(1e-7f);
            for (int k = 0; k < 12; k++) acc[k] = _mm512_set1_ps((float)k);
            for (long i = 0; i < iters; i++)
                for (int k = 0; k < 12; k++) acc[k] = _mm512_fmadd_ps(acc[k], m, c);
            for (int k = 0; k < 12; k++) sink += _mm512_reduce_add_ps(acc[k]);
        }
        double t = omp_get_wtime() - t0;
        double flops = 2.0 * 16 * 12 * iters * omp_get_max_threads();  /* 16 lanes, 2 FLOP per FMA */
        if (flops / t > best) best = flops / t;
        printf("round %d: %.0f GFLOP/s (%g)\n", rep, flops / t / 1e9, sink);
    }
    printf("best: %.0f GFLOP/s fp32 on %d threads\n", best / 1e9, omp_get_max_threads());
    return 0;
}
