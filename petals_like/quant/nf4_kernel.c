/* NF4 products on CPU, loaded by quant/native.py (compiled on first use with the machine's C compiler).
 *
 * The layout is quant/nf4.py's (and bitsandbytes'): a weight [out, in] read as one flat row-major
 * array, cut into blocks of 64 values with a float32 absmax each; byte k holds value 2k in its high
 * four bits and value 2k + 1 in its low four bits, both indices into the 16-value NF4 code.
 *
 * nf4_linear: y[m, rows] = x[m, in] @ W[rows, in].T for a range of weight rows, decoding each block of
 * the weight once into registers and multiplying it with every row of x (in % 64 == 0, so a block
 * never straddles two weight rows). x comes split into its even and odd columns, the order in which
 * a byte's two values come out of the code lookup, so the inner loop needs no shuffle.
 * nf4_dequantize: blocks [first, first + count) into float32, in the weight's order.
 *
 * With AVX-512 a code lookup is one vpermps of a 16-float register; with AVX2, two 8-float lookups
 * and a blend on the index's fourth bit; elsewhere plain C.
 */
#include <stddef.h>
#include <stdint.h>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#define BLOCK 64
#define MAX_ROWS 8

static const float CODE[16] = {
    -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,
    -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,
    0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f, 0.33791524171829224f,
    0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f, 1.0f,
};

int nf4_max_rows(void) { return MAX_ROWS; }

const char *nf4_isa(void) {
#if defined(__AVX512F__)
    return "avx512";
#elif defined(__AVX2__) && defined(__FMA__)
    return "avx2";
#else
    return "c";
#endif
}

#if defined(__AVX512F__)

static inline __attribute__((always_inline)) void rows_m(
    const float *xe, const float *xo, int64_t in, const uint8_t *packed, const float *absmax,
    float *y, int64_t out, int64_t first, int64_t last, const int m) {
    const __m512 code = _mm512_loadu_ps(CODE);
    const int64_t half = in / 2, blocks = in / BLOCK;
    for (int64_t o = first; o < last; o++) {
        const uint8_t *p = packed + o * half;
        const float *s = absmax + o * blocks;
        __m512 acc_hi[MAX_ROWS], acc_lo[MAX_ROWS];
        for (int r = 0; r < m; r++) acc_hi[r] = acc_lo[r] = _mm512_setzero_ps();
        for (int64_t b = 0; b < blocks; b++) {
            const __m512 scale = _mm512_set1_ps(s[b]);
            for (int64_t k = b * (BLOCK / 2); k < (b + 1) * (BLOCK / 2); k += 16) {
                const __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(p + k)));
                /* vpermps reads the index's low four bits only: no mask for the low nibble */
                const __m512 hi = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(bytes, 4), code), scale);
                const __m512 lo = _mm512_mul_ps(_mm512_permutexvar_ps(bytes, code), scale);
                for (int r = 0; r < m; r++) {
                    acc_hi[r] = _mm512_fmadd_ps(hi, _mm512_loadu_ps(xe + r * half + k), acc_hi[r]);
                    acc_lo[r] = _mm512_fmadd_ps(lo, _mm512_loadu_ps(xo + r * half + k), acc_lo[r]);
                }
            }
        }
        for (int r = 0; r < m; r++) y[r * out + o] = _mm512_reduce_add_ps(_mm512_add_ps(acc_hi[r], acc_lo[r]));
    }
}

static void decode_blocks(const uint8_t *packed, const float *absmax, int64_t count, float *dst) {
    const __m512 code = _mm512_loadu_ps(CODE);
    /* interleave: element 2i from the high nibbles' lookup, 2i + 1 from the low nibbles' */
    const __m512i first16 = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    const __m512i last16 = _mm512_set_epi32(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8);
    for (int64_t b = 0; b < count; b++) {
        const __m512 scale = _mm512_set1_ps(absmax[b]);
        for (int k = 0; k < BLOCK / 2; k += 16) {
            const __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(packed + b * (BLOCK / 2) + k)));
            const __m512 hi = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(bytes, 4), code), scale);
            const __m512 lo = _mm512_mul_ps(_mm512_permutexvar_ps(bytes, code), scale);
            float *d = dst + b * BLOCK + 2 * k;
            _mm512_storeu_ps(d, _mm512_permutex2var_ps(hi, first16, lo));
            _mm512_storeu_ps(d + 16, _mm512_permutex2var_ps(hi, last16, lo));
        }
    }
}

#elif defined(__AVX2__) && defined(__FMA__)

static inline __attribute__((always_inline)) __m256 lookup8(__m256i index, __m256 low_code, __m256 high_code) {
    /* the index's fourth bit, moved to the sign bit, picks between code[0:8] and code[8:16] */
    const __m256 bit3 = _mm256_castsi256_ps(_mm256_slli_epi32(index, 28));
    return _mm256_blendv_ps(_mm256_permutevar8x32_ps(low_code, index), _mm256_permutevar8x32_ps(high_code, index), bit3);
}

static inline __attribute__((always_inline)) void rows_m(
    const float *xe, const float *xo, int64_t in, const uint8_t *packed, const float *absmax,
    float *y, int64_t out, int64_t first, int64_t last, const int m) {
    const __m256 low_code = _mm256_loadu_ps(CODE), high_code = _mm256_loadu_ps(CODE + 8);
    const int64_t half = in / 2, blocks = in / BLOCK;
    for (int64_t o = first; o < last; o++) {
        const uint8_t *p = packed + o * half;
        const float *s = absmax + o * blocks;
        __m256 acc_hi[MAX_ROWS], acc_lo[MAX_ROWS];
        for (int r = 0; r < m; r++) acc_hi[r] = acc_lo[r] = _mm256_setzero_ps();
        for (int64_t b = 0; b < blocks; b++) {
            const __m256 scale = _mm256_set1_ps(s[b]);
            for (int64_t k = b * (BLOCK / 2); k < (b + 1) * (BLOCK / 2); k += 8) {
                const __m256i bytes = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(p + k)));
                const __m256 hi = _mm256_mul_ps(lookup8(_mm256_srli_epi32(bytes, 4), low_code, high_code), scale);
                const __m256 lo = _mm256_mul_ps(lookup8(bytes, low_code, high_code), scale);
                for (int r = 0; r < m; r++) {
                    acc_hi[r] = _mm256_fmadd_ps(hi, _mm256_loadu_ps(xe + r * half + k), acc_hi[r]);
                    acc_lo[r] = _mm256_fmadd_ps(lo, _mm256_loadu_ps(xo + r * half + k), acc_lo[r]);
                }
            }
        }
        for (int r = 0; r < m; r++) {
            const __m256 sum8 = _mm256_add_ps(acc_hi[r], acc_lo[r]);
            __m128 sum4 = _mm_add_ps(_mm256_castps256_ps128(sum8), _mm256_extractf128_ps(sum8, 1));
            sum4 = _mm_add_ps(sum4, _mm_movehl_ps(sum4, sum4));
            sum4 = _mm_add_ss(sum4, _mm_movehdup_ps(sum4));
            y[r * out + o] = _mm_cvtss_f32(sum4);
        }
    }
}

#else

static inline void rows_m(
    const float *xe, const float *xo, int64_t in, const uint8_t *packed, const float *absmax,
    float *y, int64_t out, int64_t first, int64_t last, const int m) {
    const int64_t half = in / 2, blocks = in / BLOCK;
    for (int64_t o = first; o < last; o++) {
        const uint8_t *p = packed + o * half;
        const float *s = absmax + o * blocks;
        float acc[MAX_ROWS] = {0};
        for (int64_t b = 0; b < blocks; b++) {
            float part[MAX_ROWS] = {0};
            for (int64_t k = b * (BLOCK / 2); k < (b + 1) * (BLOCK / 2); k++) {
                const float hi = CODE[p[k] >> 4], lo = CODE[p[k] & 15];
                for (int r = 0; r < m; r++) part[r] += hi * xe[r * half + k] + lo * xo[r * half + k];
            }
            for (int r = 0; r < m; r++) acc[r] += part[r] * s[b];
        }
        for (int r = 0; r < m; r++) y[r * out + o] = acc[r];
    }
}

#endif

#if !defined(__AVX512F__)
static void decode_blocks(const uint8_t *packed, const float *absmax, int64_t count, float *dst) {
    for (int64_t b = 0; b < count; b++)
        for (int k = 0; k < BLOCK / 2; k++) {
            const uint8_t byte = packed[b * (BLOCK / 2) + k];
            dst[b * BLOCK + 2 * k] = CODE[byte >> 4] * absmax[b];
            dst[b * BLOCK + 2 * k + 1] = CODE[byte & 15] * absmax[b];
        }
}
#endif

/* y[m, out] (row stride out) for weight rows [first, last); m in 1..MAX_ROWS. Returns -1 on bad arguments. */
int nf4_linear(const float *xe, const float *xo, int64_t m, int64_t in, const uint8_t *packed, const float *absmax,
               float *y, int64_t out, int64_t first, int64_t last) {
    if (m < 1 || m > MAX_ROWS || in % BLOCK || first < 0 || last > out || first > last) return -1;
    switch (m) { /* a constant row count per case, so the compiler unrolls the row loops */
        case 1: rows_m(xe, xo, in, packed, absmax, y, out, first, last, 1); break;
        case 2: rows_m(xe, xo, in, packed, absmax, y, out, first, last, 2); break;
        case 3: rows_m(xe, xo, in, packed, absmax, y, out, first, last, 3); break;
        case 4: rows_m(xe, xo, in, packed, absmax, y, out, first, last, 4); break;
        case 5: rows_m(xe, xo, in, packed, absmax, y, out, first, last, 5); break;
        case 6: rows_m(xe, xo, in, packed, absmax, y, out, first, last, 6); break;
        case 7: rows_m(xe, xo, in, packed, absmax, y, out, first, last, 7); break;
        default: rows_m(xe, xo, in, packed, absmax, y, out, first, last, 8); break;
    }
    return 0;
}

/* count blocks of 64 values into dst (count * 64 floats), from packed (count * 32 bytes) and absmax. */
void nf4_dequantize(const uint8_t *packed, const float *absmax, int64_t count, float *dst) {
    decode_blocks(packed, absmax, count, dst);
}
