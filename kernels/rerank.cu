// rerank.cu: the three device steps of k-reciprocal re-ranking (rerank_k_reciprocal).
//
// What: with M = [[qq, qg], [qg^T, gg]] (N = Q + G) the published algorithm works on
//   dist[i, j] = sq(M[j, i]) / max_k sq(M[k, i]), sq = the square in the inputs' common dtype S
//   rounded to float32. Row i of dist is COLUMN i of M, so rerank.py walks M by column blocks,
//   each block a vertical stack of two row-major matrices: (qq, qg^T chunk) for query columns,
//   (qg, gg) for gallery columns. Nothing of size N x N is ever formed.
//   column_max_sq  per column (and row slice): max of sq(M[:, i]) as float32 bits, plus a flag
//                  for non-finite inputs (bit 0 top matrix, bit 1 bottom matrix).
//   column_topk    per column (and row slice): the k smallest keys (dist[i, j] float32 bits << 32
//                  | j): the stable-argsort order, ties by ascending j. Slices merge in rerank.py.
//   jaccard_accumulate  acc[r, g] += min(V[i, c], V[Q + g, c]) over the nonzeros c of query row
//                  i = row0 + r, through the inverted (column) index of the gallery rows of V.
//   rerank_finalize  out = (1 - lambda) * (1 - t / (2 - t)) + lambda * dist[i, Q + g], t = acc.
// Layout: row-major inputs with unit column stride, leading dimensions in elements; half_t is
//   float16 storage (no cuda_fp16.h needed). V is CSR (row_ptr int64, cols int32, vals
//   float32); the inverted index is CSR by column (col_ptr int64, gallery item int32, value
//   float32). Without __CUDA_ARCH__ the file is plain C++: the CPU tests build it with g++ and
//   run the kernels' logic on the host.
// Accumulation: squares exactly as NumPy (S = half: rounded to half; float; double: rounded
//   once to float32), divisions and the final blend in float32 with explicit round-to-nearest
//   PTX without .ftz (CuPy passes -ftz=true), conversions likewise (a plain (double)x compiles
//   to cvt.ftz), so dist and its order are bit-identical to the reference. No float32
//   compare. The Jaccard overlap m is summed in float64 (atomics: order varies, <= 1e-16
//   relative) and rounded once to float32, as the reference's float64 bincount.
// Tolerance: neighbour lists exact; final distances within 1e-6 of the NumPy reference (its
//   float32 exp and float64 sums in another order); tests use atol 1e-5.
// Memory bound: column passes read each input twice (max, then top-k): 2 * s * (Q + G)^2 bytes
//   and write n_slices * n_cols * (8k + 8) bytes; Jaccard reads the inverted-index lists of the
//   query's nonzeros and does one float64 atomic per (query entry, gallery entry) pair into a
//   [rows, G] float64 accumulator (L2 resident per row); finalize streams rows * G * (8 + s + 4).

struct half_t {
    unsigned short bits;
};

#ifdef __CUDA_ARCH__
// Explicitly rounded operations: inline PTX without .ftz, never contracted into an FMA.
__device__ __forceinline__ float f16_to_f32(unsigned short h)
{
    float r;
    asm("cvt.f32.f16 %0, %1;" : "=f"(r) : "h"(h));
    return r;
}

__device__ __forceinline__ unsigned short f32_to_f16(float x)
{
    unsigned short r;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r) : "f"(x));
    return r;
}

__device__ __forceinline__ float f64_to_f32(double x)
{
    float r;
    asm("cvt.rn.f32.f64 %0, %1;" : "=f"(r) : "d"(x));
    return r;
}

__device__ __forceinline__ double f32_to_f64(float x)
{
    double r;
    asm("cvt.f64.f32 %0, %1;" : "=d"(r) : "f"(x));  // exact; (double)x would be cvt.ftz
    return r;
}

__device__ __forceinline__ float f32_mul(float a, float b)
{
    float r;
    asm("mul.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
    return r;
}

__device__ __forceinline__ float f32_div(float a, float b)
{
    float r;
    asm("div.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
    return r;
}

__device__ __forceinline__ float f32_add(float a, float b)
{
    float r;
    asm("add.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
    return r;
}

__device__ __forceinline__ float f32_sub(float a, float b)
{
    float r;
    asm("sub.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
    return r;
}
#else
// Host build of this file (the CPU tests run the kernels' logic as C++, compiled with
// -ffp-contract=off): the same IEEE round-to-nearest operations in plain C++.
inline float f16_to_f32(unsigned short h)
{
    _Float16 v;
    memcpy(&v, &h, 2);
    return (float)v;
}
inline unsigned short f32_to_f16(float x)
{
    const _Float16 v = (_Float16)x;
    unsigned short r;
    memcpy(&r, &v, 2);
    return r;
}
inline float f64_to_f32(double x) { return (float)x; }
inline double f32_to_f64(float x) { return (double)x; }
inline float f32_mul(float a, float b) { return a * b; }
inline float f32_div(float a, float b) { return a / b; }
inline float f32_add(float a, float b) { return a + b; }
inline float f32_sub(float a, float b) { return a - b; }
#endif

// Exact widening of a stored value (a half or a float fits a float exactly).
__device__ __forceinline__ float as_f32(half_t x) { return f16_to_f32(x.bits); }
__device__ __forceinline__ float as_f32(float x) { return x; }
__device__ float as_f32(double x) = delete;  // a square in half or float never takes a double
__device__ __forceinline__ double as_f64(half_t x) { return f32_to_f64(f16_to_f32(x.bits)); }
__device__ __forceinline__ double as_f64(float x) { return f32_to_f64(x); }
__device__ __forceinline__ double as_f64(double x) { return x; }

// Finiteness from the bits: independent of -ftz and of fast-math flags.
__device__ __forceinline__ bool is_finite_value(half_t x) { return (x.bits & 0x7c00u) != 0x7c00u; }
__device__ __forceinline__ bool is_finite_value(float x)
{
    return (__float_as_uint(x) & 0x7f800000u) != 0x7f800000u;
}
__device__ __forceinline__ bool is_finite_value(double x)
{
    return (__double_as_longlong(x) & 0x7ff0000000000000ll) != 0x7ff0000000000000ll;
}

// sq(x) in the common dtype S, rounded to float32: NumPy's np.power(x.astype(S), 2).astype(f32).
template <typename S>
struct SquareIn;

template <>
struct SquareIn<half_t> {
    template <typename T>
    __device__ __forceinline__ static float apply(T x)
    {
        const float f = as_f32(x);
        return f16_to_f32(f32_to_f16(f32_mul(f, f)));  // the float product is exact
    }
};

template <>
struct SquareIn<float> {
    template <typename T>
    __device__ __forceinline__ static float apply(T x)
    {
        const float f = as_f32(x);
        return f32_mul(f, f);
    }
};

template <>
struct SquareIn<double> {
    template <typename T>
    __device__ __forceinline__ static float apply(T x)
    {
        const double f = as_f64(x);
        return f64_to_f32(__dmul_rn(f, f));
    }
};

template <typename TA, typename TB, typename S>
__global__ void column_max_sq(
    const TA* __restrict__ a, long long lda, long long rows_a,
    const TB* __restrict__ b, long long ldb, long long rows_b,
    long long n_cols, long long rows_per_slice,
    unsigned int* __restrict__ max_bits, int* __restrict__ flags)
{
    const long long col = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    if (col >= n_cols) {
        return;
    }
    const long long r0 = blockIdx.y * rows_per_slice;
    const long long r1 = min(r0 + rows_per_slice, rows_a + rows_b);
    unsigned int best = 0u;  // squares are >= +0: their bits order like the floats
    int flag = 0;
    for (long long r = r0; r < min(r1, rows_a); ++r) {
        const TA x = a[r * lda + col];
        flag |= is_finite_value(x) ? 0 : 1;
        best = max(best, __float_as_uint(SquareIn<S>::apply(x)));
    }
    for (long long r = max(r0, rows_a); r < r1; ++r) {
        const TB x = b[(r - rows_a) * ldb + col];
        flag |= is_finite_value(x) ? 0 : 2;
        best = max(best, __float_as_uint(SquareIn<S>::apply(x)));
    }
    max_bits[blockIdx.y * n_cols + col] = best;
    flags[blockIdx.y * n_cols + col] = flag;
}

// Insert key into the ascending list best[0..k) whose last entry it beats; returns the new last.
__device__ __forceinline__ unsigned long long insert_key(
    unsigned long long* best, int k, unsigned long long key)
{
    int pos = k - 1;
    while (pos > 0 && best[pos - 1] > key) {
        best[pos] = best[pos - 1];
        --pos;
    }
    best[pos] = key;
    return best[k - 1];
}

template <typename TA, typename TB, typename S, int CAP>
__global__ void column_topk(
    const TA* __restrict__ a, long long lda, long long rows_a,
    const TB* __restrict__ b, long long ldb, long long rows_b,
    long long n_cols, long long rows_per_slice, const float* __restrict__ col_max, int k,
    unsigned long long* __restrict__ out)
{
    const long long col = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    if (col >= n_cols || k < 1 || k > CAP) {
        return;
    }
    const long long r0 = blockIdx.y * rows_per_slice;
    const long long r1 = min(r0 + rows_per_slice, rows_a + rows_b);
    const float m = col_max[col];
    unsigned long long best[CAP];
    for (int i = 0; i < k; ++i) {
        best[i] = ~0ull;  // padding for slices shorter than k; sorts after every real key
    }
    unsigned long long worst = ~0ull;
    for (long long r = r0; r < min(r1, rows_a); ++r) {
        const float d = f32_div(SquareIn<S>::apply(a[r * lda + col]), m);
        const unsigned long long key = ((unsigned long long)__float_as_uint(d) << 32) | r;
        if (key < worst) {
            worst = insert_key(best, k, key);
        }
    }
    for (long long r = max(r0, rows_a); r < r1; ++r) {
        const float d = f32_div(SquareIn<S>::apply(b[(r - rows_a) * ldb + col]), m);
        const unsigned long long key = ((unsigned long long)__float_as_uint(d) << 32) | r;
        if (key < worst) {
            worst = insert_key(best, k, key);
        }
    }
    unsigned long long* dst = out + (blockIdx.y * n_cols + col) * k;
    for (int i = 0; i < k; ++i) {
        dst[i] = best[i];
    }
}

__global__ void jaccard_accumulate(
    const long long* __restrict__ row_ptr, const int* __restrict__ row_cols,
    const float* __restrict__ row_vals, const long long* __restrict__ col_ptr,
    const int* __restrict__ col_items, const float* __restrict__ col_vals,
    long long row0, long long n_gallery, double* __restrict__ acc)
{
    const long long i = row0 + blockIdx.x;
    double* dst = acc + blockIdx.x * n_gallery;
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int n_warps = blockDim.x >> 5;
    // One warp per nonzero of the query row, its lanes along that column's gallery list: the
    // gallery items of one list are distinct, so the atomics of one instruction never collide.
    for (long long e = row_ptr[i] + warp; e < row_ptr[i + 1]; e += n_warps) {
        const int c = row_cols[e];
        const double v = f32_to_f64(row_vals[e]);  // min in float64: no flushed float compare
        for (long long t = col_ptr[c] + lane; t < col_ptr[c + 1]; t += 32) {
            const double w = f32_to_f64(col_vals[t]);
            atomicAdd(dst + col_items[t], w < v ? w : v);
        }
    }
}

template <typename T, typename S>
__global__ void rerank_finalize(
    const double* __restrict__ acc, const T* __restrict__ qg, long long ld_qg,
    const float* __restrict__ col_max, long long n_rows, long long n_gallery,
    float w_jaccard, float w_original, float* __restrict__ out, long long ld_out)
{
    const long long total = n_rows * n_gallery;
    for (long long idx = blockIdx.x * (long long)blockDim.x + threadIdx.x; idx < total;
         idx += (long long)gridDim.x * blockDim.x) {
        const long long r = idx / n_gallery;
        const long long g = idx - r * n_gallery;
        const float t = f64_to_f32(acc[idx]);
        const float jaccard = f32_sub(1.0f, f32_div(t, f32_sub(2.0f, t)));
        const float original = f32_div(SquareIn<S>::apply(qg[r * ld_qg + g]), col_max[r]);
        out[r * ld_out + g] = f32_add(f32_mul(jaccard, w_jaccard), f32_mul(original, w_original));
    }
}
