/* Kernels for index search (index.py), compiled on first use by native.py.
 *
 * numpy converts float16 to float32 one value at a time, so scoring a float16 index in numpy costs
 * several passes over every chunk. On an x86-64 CPU with F16C these convert eight values an instruction
 * (exactly: subnormals, infinities and NaNs included) and fuse the conversion into the dot products,
 * so the rows are read once, from memory, and never written out as float32. Float32 rows are scored
 * the same way, without the conversion. Either keeps the top k of each query as it goes (top_k below).
 *
 * Compiled for any x86-64 CPU: the kernels carry their own target, and simclr_search_supported() tells
 * the caller whether this CPU can run them. Arrays are C-contiguous; no function keeps a pointer.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>

#define TARGET __attribute__((target("avx2,fma,f16c")))
#define GROUP 4  /* rows scored side by side */
/* How far ahead rows are asked for, beyond the hardware prefetcher: the next group. On 100k x 512 float16
 * rows, 2-core AVX2 EPYC: 6.4-6.6 ms at best against 7.9-8.2 without, 6.1-6.9 eight rows ahead. */
#define PREFETCH_ROWS 4

int simclr_search_supported(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}

TARGET static inline float sum_lanes(__m256 lanes) {
    __m128 half = _mm_add_ps(_mm256_castps256_ps128(lanes), _mm256_extractf128_ps(lanes, 1));  /* (4,) */
    half = _mm_add_ps(half, _mm_movehl_ps(half, half));  /* (2,) */
    return _mm_cvtss_f32(_mm_add_ss(half, _mm_movehdup_ps(half)));
}

TARGET static inline __m256 load_half(const uint16_t *values) {
    return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)values));  /* 8 float16 -> 8 float32 */
}

/* out[r] = the float32 sum of row[d] * other[d], d < dim, for the `count` rows (float16 if `half`, else
 * float32) from `first`, `stride` bytes apart, with `other` float32, or with the row itself when NULL.
 * Read side by side, GROUP rows are as many streams from memory (one FMA chain each): in one run on
 * 200k x 2048 float32 rows, one row at a time took 97 ms at best, four at a time 66, against 61 ms to
 * read them. Each row's sum is added in the same order whatever `count`, so a row scores the same
 * wherever a chunk starts. */
TARGET static inline __attribute__((always_inline)) void dot_rows(const char *first, int64_t stride, int count,
                                                                  int half, const float *other, int64_t dim,
                                                                  float *out) {
    __m256 sums[GROUP];
    for (int r = 0; r < count; r++)
        sums[r] = _mm256_setzero_ps();
    int64_t d = 0;
    for (; d + 8 <= dim; d += 8) {
        __m256 query = other ? _mm256_loadu_ps(other + d) : _mm256_setzero_ps();
        for (int r = 0; r < count; r++) {
            const char *row = first + r * stride;
            __m256 values = half ? load_half((const uint16_t *)row + d) : _mm256_loadu_ps((const float *)row + d);
            sums[r] = _mm256_fmadd_ps(values, other ? query : values, sums[r]);
        }
    }
    for (int r = 0; r < count; r++) {
        const char *row = first + r * stride;
        float sum = sum_lanes(sums[r]);
        for (int64_t e = d; e < dim; e++) {
            float value = half ? _cvtsh_ss(((const uint16_t *)row)[e]) : ((const float *)row)[e];
            sum += value * (other ? other[e] : value);
        }
        out[r] = sum;
    }
}

/* dot_rows of `count` rows, up to GROUP, side by side when GROUP. */
TARGET static inline __attribute__((always_inline)) void dot_group(const char *first, int64_t stride, int64_t count,
                                                                   int half, const float *other, int64_t dim,
                                                                   float *out) {
    if (count == GROUP)
        dot_rows(first, stride, GROUP, half, other, dim, out);
    else
        for (int64_t r = 0; r < count; r++)
            dot_rows(first + r * stride, 0, 1, half, other, dim, out + r);
}

/* The float32 square root of a float32 sum of squares, at least 1e-12, as numpy's cosine takes it. */
TARGET static inline float length_of(float squares) {
    float length = _mm_cvtss_f32(_mm_sqrt_ss(_mm_set_ss(squares)));
    return length > 1e-12f ? length : 1e-12f;  /* NaN too: the row's scores are NaN already */
}

/* Whether (score, row) ranks below (other_score, other_row): a lower score, or the same score and a later row. */
TARGET static inline int ranks_below(float score, int64_t row, float other_score, int64_t other_row) {
    return score < other_score || (score == other_score && row > other_row);
}

TARGET static inline void swap_entries(float *scores, int64_t *rows, int64_t a, int64_t b) {
    float score = scores[a];
    int64_t row = rows[a];
    scores[a] = scores[b], rows[a] = rows[b];
    scores[b] = score, rows[b] = row;
}

/* Offers (score, row) to a heap of the best `k` so far, `*held` of them, the one that ranks lowest at [0]. */
TARGET static void offer(float *scores, int64_t *rows, int64_t *held, int64_t k, float score, int64_t row) {
    int64_t i;
    if (*held < k) {  /* room: added at the end, then moved up while it ranks below its parent */
        i = (*held)++;
        scores[i] = score, rows[i] = row;
        while (i > 0 && ranks_below(scores[i], rows[i], scores[(i - 1) / 2], rows[(i - 1) / 2])) {
            swap_entries(scores, rows, i, (i - 1) / 2);
            i = (i - 1) / 2;
        }
        return;
    }
    if (!ranks_below(scores[0], rows[0], score, row))
        return;
    scores[0] = score, rows[0] = row;  /* replaces the lowest, then goes down below every entry it outranks */
    for (i = 0;;) {
        int64_t lowest = i, child = 2 * i + 1;
        if (child < k && ranks_below(scores[child], rows[child], scores[lowest], rows[lowest]))
            lowest = child;
        if (child + 1 < k && ranks_below(scores[child + 1], rows[child + 1], scores[lowest], rows[lowest]))
            lowest = child + 1;
        if (lowest == i)
            return;
        swap_entries(scores, rows, i, lowest);
        i = lowest;
    }
}

/* The best k rows of rows (n, dim), float16 if `half` else float32, numbered from first_row, for each
 * float32 query of queries (num_queries, dim), by dot product, or by cosine when `divide_by_length` (rows
 * not of unit length). Query j's heap is best_scores[j * k:], best_rows[j * k:], held[j] of its k entries
 * filled: on entry the best of the rows before (held[j] = 0 at first), on return the best of those and
 * these. exclude (or NULL) holds a row each query must not return, or -1: it scores -inf. Ties go to the
 * lower row. A row scoring NaN (excluded or not) enters no heap; the first such row is returned, else -1.
 * The top-k is kept here, not merged in Python after each chunk: the search's threads then hold the GIL
 * only to hand over a chunk, and no longer wait on each other for it. */
TARGET static inline __attribute__((always_inline)) int64_t top_k(
        const char *rows, int half, int64_t n, int64_t dim, int64_t first_row, const float *queries,
        int64_t num_queries, int64_t k, const int64_t *exclude, int divide_by_length, float *best_scores,
        int64_t *best_rows, int64_t *held) {
    int64_t first_nan = -1, row_bytes = dim * (half ? 2 : 4);
    float lengths[GROUP], scores[GROUP];
    for (int64_t i = 0; i < n; i += GROUP) {
        const char *group = rows + i * row_bytes;  /* 4-8 KiB at 512 dims: stays in L1 across the queries */
        int64_t count = n - i < GROUP ? n - i : GROUP;
        if (i + GROUP + PREFETCH_ROWS <= n)
            for (int64_t byte = 0; byte < GROUP * row_bytes; byte += 64)
                _mm_prefetch(group + PREFETCH_ROWS * row_bytes + byte, _MM_HINT_T0);
        if (divide_by_length) {
            dot_group(group, row_bytes, count, half, 0, dim, lengths);
            for (int64_t r = 0; r < count; r++)
                lengths[r] = length_of(lengths[r]);
        }
        for (int64_t j = 0; j < num_queries; j++) {
            dot_group(group, row_bytes, count, half, queries + j * dim, dim, scores);
            for (int64_t r = 0; r < count; r++) {
                float score = divide_by_length ? scores[r] / lengths[r] : scores[r];
                int64_t row = first_row + i + r;
                if (score != score) {
                    if (first_nan < 0 || row < first_nan)
                        first_nan = row;
                    continue;
                }
                if (exclude && exclude[j] == row)
                    score = -INFINITY;
                if (held[j] == k && !ranks_below(best_scores[j * k], best_rows[j * k], score, row))
                    continue;  /* the common case, once the heap is full: not called */
                offer(best_scores + j * k, best_rows + j * k, held + j, k, score, row);
            }
        }
    }
    return first_nan;
}

TARGET int64_t simclr_half_top_k(const uint16_t *rows, int64_t n, int64_t dim, int64_t first_row,
                                 const float *queries, int64_t num_queries, int64_t k, const int64_t *exclude,
                                 int divide_by_length, float *best_scores, int64_t *best_rows, int64_t *held) {
    return top_k((const char *)rows, 1, n, dim, first_row, queries, num_queries, k, exclude, divide_by_length,
                 best_scores, best_rows, held);
}

TARGET int64_t simclr_float_top_k(const float *rows, int64_t n, int64_t dim, int64_t first_row,
                                  const float *queries, int64_t num_queries, int64_t k, const int64_t *exclude,
                                  int divide_by_length, float *best_scores, int64_t *best_rows, int64_t *held) {
    return top_k((const char *)rows, 0, n, dim, first_row, queries, num_queries, k, exclude, divide_by_length,
                 best_scores, best_rows, held);
}

/* out (count,) float32 = values (count,) float16, for many queries, which BLAS scores faster. */
TARGET void simclr_half_to_float(const uint16_t *values, int64_t count, float *out) {
    int64_t i = 0;
    for (; i + 8 <= count; i += 8)
        _mm256_storeu_ps(out + i, load_half(values + i));
    for (; i < count; i++)
        out[i] = _cvtsh_ss(values[i]);
}
