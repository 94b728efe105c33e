// ranking.cu: per-query counts behind the Market-protocol CMC and AP (evaluate_ranking).
//
// What: for one query row of a float32 distance block, count the gallery NEGATIVES (items whose
//   pid differs from the query's) ranked before each of the query's positives. Items are ordered
//   by the key (distance, gallery index), which is exactly a stable ascending sort of the row,
//   encoded as one uint64: high 32 bits are an order-preserving image of the float32 bits (-0
//   folded onto +0, every NaN onto one NaN after +inf, as NumPy sorts), low 32 bits the column.
//   From these counts ranking.py gets each positive's rank in the kept list (junk removed) by a
//   prefix sum, then AP and the first-hit rank, without sorting the G items of a row.
// Layout: dist row-major [rows, ld], unit column stride. For row r the segment
//   pos_keys[seg_ptr[r] : seg_ptr[r] + pos_len[r]] holds the sorted keys of its positives (the
//   same-pid segment continues with junk entries this kernel never reads). counts is int32,
//   parallel to pos_keys, zero-filled by the caller; counts[seg_ptr[r] + m] receives the number
//   of negatives between positive m - 1 and positive m. g_code / q_code are dense pid codes.
// Accumulation: exact integer counts (int32, at most G per entry). Only bit operations on the
//   distances (no float compares), so CuPy's -ftz=true cannot change the order of subnormals.
// Tolerance: exact; the ranks equal those of the NumPy reference's stable argsort.
// Memory bound: reads rows * G * 4 bytes of distances plus G * 4 bytes of pid codes (L2
//   resident across rows); writes one int per positive. One block per row; the positive keys
//   and their counters live in shared memory when a row has at most SHARED_POS positives
//   (24 KiB), otherwise the block searches and counts in global memory.

#define SHARED_POS 2048

__device__ __forceinline__ unsigned long long rank_key(float d, long long col)
{
    unsigned int bits = __float_as_uint(d);
    const unsigned int mag = bits & 0x7fffffffu;
    if (mag == 0u) {
        bits = 0u;  // -0 sorts equal to +0 (tie broken by index), as in NumPy
    } else if (mag > 0x7f800000u) {
        bits = 0x7fc00000u;  // every NaN: one value after +inf
    }
    bits = (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
    return ((unsigned long long)bits << 32) | (unsigned long long)col;
}

__global__ void count_negatives_before(
    const float* __restrict__ dist, long long ld, long long n_cols,
    const int* __restrict__ q_code, const int* __restrict__ g_code,
    const long long* __restrict__ seg_ptr, const int* __restrict__ pos_len,
    const unsigned long long* __restrict__ pos_keys, int* __restrict__ counts)
{
    __shared__ unsigned long long s_keys[SHARED_POS];
    __shared__ int s_counts[SHARED_POS];

    const long long row = blockIdx.x;
    const int n_pos = pos_len[row];
    if (n_pos == 0) {
        return;  // uniform over the block: no positive, nothing to rank
    }
    const long long base = seg_ptr[row];
    const bool local = n_pos <= SHARED_POS;
    if (local) {
        for (int m = threadIdx.x; m < n_pos; m += blockDim.x) {
            s_keys[m] = pos_keys[base + m];
            s_counts[m] = 0;
        }
        __syncthreads();
    }
    const unsigned long long* keys = local ? s_keys : pos_keys + base;
    int* cnt = local ? s_counts : counts + base;
    const unsigned long long last = keys[n_pos - 1];
    const int pid = q_code[row];
    const float* d = dist + row * ld;

    for (long long j = threadIdx.x; j < n_cols; j += blockDim.x) {
        if (g_code[j] == pid) {
            continue;  // a positive (already in keys) or junk (removed by the protocol)
        }
        const unsigned long long key = rank_key(d[j], j);
        if (key > last) {
            continue;  // after every positive: changes neither AP nor CMC
        }
        int lo = 0, hi = n_pos - 1;  // lower bound; key < keys[n_pos - 1] (keys are distinct)
        while (lo < hi) {
            const int mid = (lo + hi) >> 1;
            if (keys[mid] < key) {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        atomicAdd(cnt + lo, 1);
    }
    if (local) {
        __syncthreads();
        for (int m = threadIdx.x; m < n_pos; m += blockDim.x) {
            counts[base + m] = s_counts[m];
        }
    }
}
