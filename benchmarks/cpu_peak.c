/* This CPU's arithmetic peak: fused multiply-adds (fp32) and u8 x s8 products (int8) with
 * nothing else in the loop.
 *
 *     gcc -O3 -march=native -fopenmp benchmarks/cpu_peak.c -o /tmp/cpu_peak
 *     OMP_NUM_THREADS=2 /tmp/cpu_peak
 *
 * Twelve independent accumulators per thread: an FMA has a latency of about 4 cycles and a
 * core can start two per cycle, so fewer chains would measure the latency, not the rate.
 * What a matmul kernel (or a whole model) reaches is read against these numbers in
 * benchmarks/deploy_results.md.
 *
 * With AVX-512 the fp32 loop uses 16-lane FMAs. Without it (AVX2) it uses 8-lane FMAs, and the
 * int8 loop times the instruction pair an AVX2 int8 GEMM is built from when the CPU has no VNNI
 * (oneDNN's and ONNX Runtime's kernels alike): vpmaddubsw multiplies 32 u8 x s8 pairs and adds
 * neighbours into 16 int16, vpmaddwd against ones widens those into 8 int32, and vpaddd
 * accumulates: 32 multiply-adds (64 int8 operations) per three instructions.
 */
#include <immintrin.h>
#include <omp.h>
#include <stdio.h>

#define CHAINS 12
#define INT8_CHAINS 4

static double fp32_round(long iters, float *sink_out) {
    double t0 = omp_get_wtime();
    float sink = 0; /* read at the end, so the compiler cannot drop the loop */
#pragma omp parallel reduction(+ : sink)
    {
#ifdef __AVX512F__
        __m512 acc[CHAINS], m = _mm512_set1_ps(0.999999f), c = _mm512_set1_ps(1e-7f);
        for (int k = 0; k < CHAINS; k++) acc[k] = _mm512_set1_ps((float)k);
        for (long i = 0; i < iters; i++)
            for (int k = 0; k < CHAINS; k++) acc[k] = _mm512_fmadd_ps(acc[k], m, c);
        for (int k = 0; k < CHAINS; k++) sink += _mm512_reduce_add_ps(acc[k]);
#else
        __m256 acc[CHAINS], m = _mm256_set1_ps(0.999999f), c = _mm256_set1_ps(1e-7f);
        for (int k = 0; k < CHAINS; k++) acc[k] = _mm256_set1_ps((float)k);
        for (long i = 0; i < iters; i++)
            for (int k = 0; k < CHAINS; k++) acc[k] = _mm256_fmadd_ps(acc[k], m, c);
        float lanes[8];
        for (int k = 0; k < CHAINS; k++) {
            _mm256_storeu_ps(lanes, acc[k]);
            for (int j = 0; j < 8; j++) sink += lanes[j];
        }
#endif
    }
    *sink_out = sink;
    return omp_get_wtime() - t0;
}

#ifndef __AVX512F__
static double int8_round(long iters, int *sink_out) {
    double t0 = omp_get_wtime();
    int sink = 0;
#pragma omp parallel reduction(+ : sink)
    {
        /* Only vpaddd is on the accumulator's chain (1 cycle), so four chains keep the units
         * busy. The empty asm tells the compiler each a[k] may change every step (it emits no
         * instruction), so the products cannot be hoisted out of the loop or shared. */
        __m256i acc[INT8_CHAINS], a[INT8_CHAINS];
        const __m256i ones = _mm256_set1_epi16(1), b = _mm256_set1_epi8(-2);
        for (int k = 0; k < INT8_CHAINS; k++) {
            acc[k] = _mm256_set1_epi32(k);
            a[k] = _mm256_set1_epi8((char)(3 + k));
        }
        for (long i = 0; i < iters; i++)
            for (int k = 0; k < INT8_CHAINS; k++) {
                __asm__ volatile("" : "+x"(a[k]));
                __m256i p = _mm256_maddubs_epi16(a[k], b);
                acc[k] = _mm256_add_epi32(acc[k], _mm256_madd_epi16(p, ones));
            }
        int lanes[8];
        for (int k = 0; k < INT8_CHAINS; k++) {
            _mm256_storeu_si256((__m256i *)lanes, acc[k]);
            for (int j = 0; j < 8; j++) sink += lanes[j];
        }
    }
    *sink_out = sink;
    return omp_get_wtime() - t0;
}
#endif

int main(void) {
    const long iters = 100000000;
    const int threads = omp_get_max_threads();
#ifdef __AVX512F__
    const int lanes = 16;
#else
    const int lanes = 8;
#endif
    double best = 0;
    for (int rep = 0; rep < 5; rep++) {
        float sink;
        double t = fp32_round(iters, &sink);
        double flops = 2.0 * lanes * CHAINS * iters * threads; /* 2 FLOP per lane per FMA */
        if (flops / t > best) best = flops / t;
        printf("fp32 round %d: %.0f GFLOP/s (%g)\n", rep, flops / t / 1e9, sink);
    }
    printf("fp32 best: %.0f GFLOP/s (%d-lane FMA) on %d threads\n", best / 1e9, lanes, threads);
#ifndef __AVX512F__
    best = 0;
    for (int rep = 0; rep < 5; rep++) {
        int sink;
        double t = int8_round(iters, &sink);
        double ops = 2.0 * 32 * INT8_CHAINS * iters * threads; /* 32 u8 x s8 multiply-adds per chain step */
        if (ops / t > best) best = ops / t;
        printf("int8 round %d: %.0f GOP/s (%d)\n", rep, ops / t / 1e9, sink);
    }
    printf("int8 best: %.0f GOP/s (vpmaddubsw + vpmaddwd + vpaddd) on %d threads\n", best / 1e9, threads);
#endif
    return 0;
}
