/* Dequantisation of a packed frozen weight into bf16 / fp16 / fp32: the same bits as kernels/quantize.py's PyTorch
 * code, 1.4-12x faster (kernels/native.py has the timings). Compiled on first use by kernels/native.py (cc -O3
 * -march=native, into the lorakit cache) and called through ctypes; lorakit uses it only where it is vectorised (AVX2 + FMA + F16C: x86-64-v3 and later) and
 * keeps the PyTorch path everywhere else. Each call splits its blocks over `threads` pthreads.
 *
 *   nf4   a block of `block` codes (two per byte, the even column in the high nibble) with absmax s:
 *         w = round(c_k s), c_k the NF4 code value and s both already rounded to the output dtype (PyTorch:
 *         the code table in the dtype, times absmax.to(dtype))
 *   int4  a group with scale s and zero z (rounded to the output dtype): w = round(fma(k, s, z)) (PyTorch's addcmul,
 *         whose AVX2/AVX-512 kernels fuse it; for a 16-bit s, k s is exact in float, so the fused and the two-step sums
 *         agree, while into fp32 under ATEN_CPU_CAPABILITY=default PyTorch's unfused sum may differ in the last bit)
 *   int8  a row or group with scale s (rounded to the output dtype): w = round(q s)
 *
 * round() is round-to-nearest-even into the output dtype (PyTorch's float -> bf16 / fp16 conversion), nothing for
 * fp32; a NaN becomes bf16 0xffff, as PyTorch's vectorised conversion writes it. A 4-bit block's 16 values are computed once; into a 16-bit dtype each code is then one byte shuffle
 * (pshufb looks 16 codes up in the table's low and high bytes), into fp32 one permute of two 8-float registers.
 */
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif

enum { KIND_BF16 = 0, KIND_F16 = 1, KIND_F32 = 2 };
enum { FORMAT_NF4 = 0, FORMAT_INT4 = 1, FORMAT_INT8 = 2 };

typedef struct {
    int format, kind;
    const void *q;
    const float *code, *scale, *zero; /* code: the 16 NF4 values in the output dtype; scale, zero: one per block */
    void *out;
    int64_t block;       /* values per block */
    int64_t first, last; /* this thread's blocks */
} Job;

static inline uint16_t round_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0xffff; /* NaN: as PyTorch's vectorised conversion */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static inline uint16_t round_f16(float f) {
#ifdef __AVX2__
    return _cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT);
#else
    _Float16 h = (_Float16)f;
    uint16_t r;
    memcpy(&r, &h, 2);
    return r;
#endif
}

static inline void store1(float v, int kind, void *out, int64_t i) {
    if (kind == KIND_F32) ((float *)out)[i] = v;
    else ((uint16_t *)out)[i] = kind == KIND_BF16 ? round_bf16(v) : round_f16(v);
}

static inline float value4(const Job *j, int k, float s, float z) {
    return j->format == FORMAT_NF4 ? j->code[k] * s : fmaf((float)k, s, z);
}

#ifdef __AVX2__
/* 8 floats -> 8 16-bit values (bf16: round to nearest even by integer adds, NaN as 0xffff) */
static inline __m128i round8(__m256 v, int kind) {
    if (kind == KIND_F16) return _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT);
    const __m256i u = _mm256_castps_si256(v), one = _mm256_set1_epi32(1);
    const __m256i bias = _mm256_add_epi32(_mm256_set1_epi32(0x7fff), _mm256_and_si256(_mm256_srli_epi32(u, 16), one));
    __m256i w = _mm256_srli_epi32(_mm256_add_epi32(u, bias), 16);
    const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    w = _mm256_blendv_epi8(w, _mm256_set1_epi32(0xffff), nan);
    return _mm_packus_epi32(_mm256_castsi256_si128(w), _mm256_extracti128_si256(w, 1));
}

/* 16-bit outputs: the 16 table values split into their low and high bytes, each code looked up by pshufb */
static void expand16(const uint8_t *q, __m128i t0, __m128i t1, uint16_t *out, int64_t nbytes) {
    const __m128i low = _mm_set1_epi16(0xff), nib = _mm_set1_epi8(15);
    const __m128i tlo = _mm_packus_epi16(_mm_and_si128(t0, low), _mm_and_si128(t1, low));
    const __m128i thi = _mm_packus_epi16(_mm_srli_epi16(t0, 8), _mm_srli_epi16(t1, 8));
    for (int64_t i = 0; i < nbytes; i += 16) { /* nbytes: a multiple of 16 (blocks of 32, 64 or 128) */
        const __m128i b = _mm_loadu_si128((const __m128i *)(q + i));
        const __m128i h = _mm_and_si128(_mm_srli_epi16(b, 4), nib), l = _mm_and_si128(b, nib);
        const __m128i i0 = _mm_unpacklo_epi8(h, l), i1 = _mm_unpackhi_epi8(h, l); /* codes in column order */
        const __m128i lo0 = _mm_shuffle_epi8(tlo, i0), hi0 = _mm_shuffle_epi8(thi, i0);
        const __m128i lo1 = _mm_shuffle_epi8(tlo, i1), hi1 = _mm_shuffle_epi8(thi, i1);
        __m128i *o = (__m128i *)(out + 2 * i);
        _mm_storeu_si128(o, _mm_unpacklo_epi8(lo0, hi0));
        _mm_storeu_si128(o + 1, _mm_unpackhi_epi8(lo0, hi0));
        _mm_storeu_si128(o + 2, _mm_unpacklo_epi8(lo1, hi1));
        _mm_storeu_si128(o + 3, _mm_unpackhi_epi8(lo1, hi1));
    }
}

/* fp32 outputs: 4 bytes (8 codes) at a time, two 8-entry permutes and a blend */
static void expand32(const uint8_t *q, __m256 lo, __m256 hi, float *out, int64_t nbytes) {
    const __m128i nib = _mm_set1_epi8(15);
    const __m256i seven = _mm256_set1_epi32(7);
    for (int64_t i = 0; i < nbytes; i += 4) {
        int32_t four;
        memcpy(&four, q + i, 4);
        const __m128i b = _mm_cvtsi32_si128(four);
        const __m256i k = _mm256_cvtepu8_epi32(_mm_unpacklo_epi8(_mm_and_si128(_mm_srli_epi16(b, 4), nib),
                                                                 _mm_and_si128(b, nib)));
        const __m256 upper = _mm256_castsi256_ps(_mm256_cmpgt_epi32(k, seven));
        _mm256_storeu_ps(out + 2 * i, _mm256_blendv_ps(_mm256_permutevar8x32_ps(lo, k),
                                                       _mm256_permutevar8x32_ps(hi, k), upper));
    }
}

static void run_4bit(const Job *j) {
    const int64_t half = j->block / 2;
    const __m256 first8 = _mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7), eight = _mm256_set1_ps(8);
    for (int64_t b = j->first; b < j->last; b++) {
        const uint8_t *q = (const uint8_t *)j->q + b * half;
        const __m256 s = _mm256_set1_ps(j->scale[b]);
        __m256 lo, hi; /* the block's 16 values in float */
        if (j->format == FORMAT_NF4) {
            lo = _mm256_mul_ps(_mm256_loadu_ps(j->code), s);
            hi = _mm256_mul_ps(_mm256_loadu_ps(j->code + 8), s);
        } else {
            const __m256 z = _mm256_set1_ps(j->zero[b]);
            lo = _mm256_fmadd_ps(first8, s, z);
            hi = _mm256_fmadd_ps(_mm256_add_ps(first8, eight), s, z);
        }
        if (j->kind == KIND_F32) expand32(q, lo, hi, (float *)j->out + b * j->block, half);
        else expand16(q, round8(lo, j->kind), round8(hi, j->kind), (uint16_t *)j->out + b * j->block, half);
    }
}
#else
static void run_4bit(const Job *j) {
    const int64_t half = j->block / 2;
    for (int64_t b = j->first; b < j->last; b++) {
        const uint8_t *q = (const uint8_t *)j->q + b * half;
        const float s = j->scale[b], z = j->format == FORMAT_INT4 ? j->zero[b] : 0.0f;
        for (int64_t i = 0; i < half; i++) {
            store1(value4(j, q[i] >> 4, s, z), j->kind, j->out, b * j->block + 2 * i);
            store1(value4(j, q[i] & 15, s, z), j->kind, j->out, b * j->block + 2 * i + 1);
        }
    }
}
#endif

static void run_int8(const Job *j) {
    for (int64_t b = j->first; b < j->last; b++) {
        const int8_t *q = (const int8_t *)j->q + b * j->block;
        const int64_t at = b * j->block;
        const float s = j->scale[b];
        int64_t i = 0;
#ifdef __AVX2__
        const __m256 sv = _mm256_set1_ps(s);
        for (; i + 8 <= j->block; i += 8) {
            const __m256i k = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(q + i)));
            const __m256 v = _mm256_mul_ps(_mm256_cvtepi32_ps(k), sv);
            if (j->kind == KIND_F32) _mm256_storeu_ps((float *)j->out + at + i, v);
            else _mm_storeu_si128((__m128i *)((uint16_t *)j->out + at + i), round8(v, j->kind));
        }
#endif
        for (; i < j->block; i++) store1((float)q[i] * s, j->kind, j->out, at + i);
    }
}

static void *run(void *arg) {
    const Job *j = (const Job *)arg;
    if (j->format == FORMAT_INT8) run_int8(j);
    else run_4bit(j);
    return NULL;
}

/* Whether this build has the vectorised loops (the plain C ones are no faster than PyTorch's). */
int lorakit_vectorised(void) {
#ifdef __AVX2__
    return 1;
#else
    return 0;
#endif
}

/* Dequantise `blocks` blocks of `block` values; returns 0, or -1 for an argument it cannot take. */
int lorakit_dequantize(int format, int kind, const void *q, const float *code, const float *scale, const float *zero,
                       void *out, int64_t blocks, int64_t block, int threads) {
    enum { MAX_THREADS = 64 };
    if (format < FORMAT_NF4 || format > FORMAT_INT8 || kind < KIND_BF16 || kind > KIND_F32 || block <= 0) return -1;
    if (format != FORMAT_INT8 && block % 32) return -1; /* 4-bit blocks: 32, 64 or 128 values */
    if (threads < 1) threads = 1;
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if (blocks * block < (int64_t)threads << 16) threads = 1; /* under 64K values a thread: not worth starting */
    Job jobs[MAX_THREADS];
    pthread_t ids[MAX_THREADS];
    int started[MAX_THREADS] = {0};
    for (int t = 0; t < threads; t++) {
        jobs[t] = (Job){format, kind, q, code, scale, zero, out, block, blocks * t / threads, blocks * (t + 1) / threads};
        if (t > 0) started[t] = pthread_create(&ids[t], NULL, run, &jobs[t]) == 0;
    }
    run(&jobs[0]);
    for (int t = 1; t < threads; t++) {
        if (started[t]) pthread_join(ids[t], NULL);
        else run(&jobs[t]); /* no thread could be made: its part is done here */
    }
    return 0;
}
