/* Float16 kernels for index search (index.py), compiled on first use by native.py.
 *
 * numpy converts float16 to float32 one value at a time, so scoring a float16 index in numpy costs
 * several passes over every chunk. On an x86-64 CPU with F16C these convert eight values an instruction
 * (exactly: subnormals, infinities and NaNs included) and fuse the conversion into the dot products,
 * so the rows are read once, from memory, and never written out as float32.
 *
 * Compiled for any x86-64 CPU: the kernels carry their own target, and simclr_search_supported() tells
 * the caller whether this CPU can run them. Arrays are C-contiguous; no function keeps a pointer.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>

#define TARGET __attribute__((target("avx2,fma,f16c")))
#define PREFETCH_ROWS 4  /* rows asked for ahead of the hardware prefetcher: 10-15% faster here (2 to 16 alike) */

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

/* The float32 sum of row[d] * other[d], d < dim, with `other` float32, or with the row itself when NULL. */
TARGET static float dot_row(const uint16_t *row, const float *other, int64_t dim) {
    __m256 even = _mm256_setzero_ps(), odd = _mm256_setzero_ps();  /* two chains: FMA latency */
    int64_t d = 0;
    for (; d + 16 <= dim; d += 16) {
        __m256 first = load_half(row + d), second = load_half(row + d + 8);
        even = _mm256_fmadd_ps(first, other ? _mm256_loadu_ps(other + d) : first, even);
        odd = _mm256_fmadd_ps(second, other ? _mm256_loadu_ps(other + d + 8) : second, odd);
    }
    float sum = sum_lanes(_mm256_add_ps(even, odd));
    for (; d < dim; d++) {
        float value = _cvtsh_ss(row[d]);
        sum += value * (other ? other[d] : value);
    }
    return sum;
}

/* The float32 square root of the row's float32 sum of squares, at least 1e-12, as numpy's cosine takes it. */
TARGET static inline float row_length(const uint16_t *row, int64_t dim) {
    float length = _mm_cvtss_f32(_mm_sqrt_ss(_mm_set_ss(dot_row(row, 0, dim))));
    return length > 1e-12f ? length : 1e-12f;  /* NaN too: the row's scores are NaN already */
}

/* Whether (score, row) ranks below (other_score, other_row): a lower score, or the same score and a later row. */
static inline int ranks_below(float score, int64_t row, float other_score, int64_t other_row) {
    return score < other_score || (score == other_score && row > other_row);
}

static inline void swap_entries(float *scores, int64_t *rows, int64_t a, int64_t b) {
    float score = scores[a];
    int64_t row = rows[a];
    scores[a] = scores[b], rows[a] = rows[b];
    scores[b] = score, rows[b] = row;
}

/* Offers (score, row) to a heap of the best `k` so far, `*held` of them, the one that ranks lowest at [0]. */
static void offer(float *scores, int64_t *rows, int64_t *held, int64_t k, float score, int64_t row) {
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

/* The best k rows of rows (n, dim) float16, numbered from first_row, for each float32 query of queries
 * (num_queries, dim), by dot product, or by cosine when `divide_by_length` (rows not of unit length).
 * Query j's heap is best_scores[j * k:], best_rows[j * k:], held[j] of its k entries filled: on entry the
 * best of the rows before (held[j] = 0 at first), on return the best of those and these. exclude (or NULL)
 * holds a row each query must not return, or -1: it scores -inf. Ties go to the lower row. A row scoring
 * NaN (excluded or not) enters no heap; the first such row is returned, else -1.
 * The top-k is kept here, not merged in Python after each chunk: the search's threads then hold the GIL
 * only to hand over a chunk, and no longer wait on each other for it. */
TARGET int64_t simclr_half_top_k(const uint16_t *rows, int64_t n, int64_t dim, int64_t first_row,
                                 const float *queries, int64_t num_queries, int64_t k, const int64_t *exclude,
                                 int divide_by_length, float *best_scores, int64_t *best_rows, int64_t *held) {
    int64_t first_nan = -1;
    for (int64_t i = 0; i < n; i++) {
        const uint16_t *row = rows + i * dim;  /* 1 KiB at 512 dims: stays in L1 across the queries */
        if (i + PREFETCH_ROWS < n)
            for (int64_t byte = 0; byte < dim * 2; byte += 64)
                _mm_prefetch((const char *)(row + PREFETCH_ROWS * dim) + byte, _MM_HINT_T0);
        float length = divide_by_length ? row_length(row, dim) : 1.0f;
        for (int64_t j = 0; j < num_queries; j++) {
            float score = dot_row(row, queries + j * dim, dim);
            if (divide_by_length)
                score /= length;
            if (score != score) {
                if (first_nan < 0)
                    first_nan = first_row + i;
                continue;
            }
            if (exclude && exclude[j] == first_row + i)
                score = -INFINITY;
            offer(best_scores + j * k, best_rows + j * k, held + j, k, score, first_row + i);
        }
    }
    return first_nan;
}

/* out (count,) float32 = values (count,) float16, for many queries, which BLAS scores faster. */
TARGET void simclr_half_to_float(const uint16_t *values, int64_t count, float *out) {
    int64_t i = 0;
    for (; i + 8 <= count; i += 8)
        _mm256_storeu_ps(out + i, load_half(values + i));
    for (; i < count; i++)
        out[i] = _cvtsh_ss(values[i]);
}
