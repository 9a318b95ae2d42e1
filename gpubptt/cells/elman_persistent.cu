// The Elman cell, every step of a recurrence in ONE launch: each block owns R rows of the batch
// (rows are independent in both recurrences, so blocks never wait for each other) and keeps W in
// shared memory for all T steps; the state rows ping-pong between two shared buffers, one barrier
// per step. Each output is a dot product split over L lanes (two accumulators each, then a shuffle
// reduction), so a step costs a few hundred cycles, not H dependent shared-memory loads. W's rows
// are padded to H + 1 words so the lanes of a warp hit different banks whether they read a row
// (forward) or a column (backward). T is defined as float or double, and PHI(x) as
// tanh(x) or ((x) < (T)0 ? (T)0 : (x)) (relu), before this source is compiled.
__device__ __forceinline__ T group_sum(T acc, int L) {
    for (int o = L / 2; o > 0; o >>= 1) acc += __shfl_down_sync(0xffffffffu, acc, o, L);
    return acc;
}
__device__ __forceinline__ void load(T* Ws, T* buf, const T* W, const T* rows0, int H, int n) {
    const int Hp = H + 1;
    for (int i = threadIdx.x; i < H * H; i += blockDim.x) Ws[(i / H) * Hp + i % H] = W[i];
    for (int i = threadIdx.x; i < n; i += blockDim.x) buf[i] = rows0[i];
    __syncthreads();
}
extern "C" __global__ void fwd(const T* __restrict__ pre, const T* __restrict__ W, T* __restrict__ S,
                               int steps, int B, int H, int R, int L) {
    extern __shared__ unsigned char smem[];
    const int Hp = H + 1, b0 = blockIdx.x * R, n = min(R, B - b0) * H;
    T* Ws = (T*)smem;
    T* buf = Ws + H * Hp;
    load(Ws, buf, W, S + (long long)b0 * H, H, n);
    const int lane = threadIdx.x % L, groups = blockDim.x / L;
    const int n_pad = (n + groups - 1) / groups * groups;  // the same trip count in every warp
    for (int t = 0; t < steps; ++t) {
        const T* cur = buf + (t & 1) * R * H;
        T* nxt = buf + ((t + 1) & 1) * R * H;
        for (int o = threadIdx.x / L; o < n_pad; o += groups) {
            const bool valid = o < n;
            const int r = valid ? o / H : 0, h = valid ? o % H : 0;
            const long long g = ((long long)t * B + b0 + r) * H + h;
            const T p = (valid && lane == 0) ? pre[g] : (T)0;
            const T* s_row = cur + r * H;
            const T* w_row = Ws + h * Hp;  // row h of W: s_t = PHI(pre + W s_{t-1})
            T a0 = 0, a1 = 0;
            for (int j = lane; j < H; j += 2 * L) {
                a0 += s_row[j] * w_row[j];
                if (j + L < H) a1 += s_row[j + L] * w_row[j + L];
            }
            const T acc = group_sum(valid ? a0 + a1 : (T)0, L);
            if (valid && lane == 0) {
                const T v = PHI(p + acc);
                nxt[o] = v;
                S[g + (long long)B * H] = v;  // S[t + 1]
            }
        }
        __syncthreads();
    }
}
extern "C" __global__ void bwd(T* __restrict__ G, const T* __restrict__ W, const T* __restrict__ Dt,
                               int steps, int B, int H, int R, int L) {
    // G[steps] holds delta of the last step on entry; `steps` = T - 1 backward steps follow
    extern __shared__ unsigned char smem[];
    const int Hp = H + 1, b0 = blockIdx.x * R, n = min(R, B - b0) * H;
    T* Ws = (T*)smem;
    T* buf = Ws + H * Hp;
    load(Ws, buf, W, G + ((long long)steps * B + b0) * H, H, n);
    const int lane = threadIdx.x % L, groups = blockDim.x / L;
    const int n_pad = (n + groups - 1) / groups * groups;
    for (int k = 0; k < steps; ++k) {
        const int t = steps - 1 - k;
        const T* cur = buf + (k & 1) * R * H;
        T* nxt = buf + ((k + 1) & 1) * R * H;
        for (int o = threadIdx.x / L; o < n_pad; o += groups) {
            const bool valid = o < n;
            const int r = valid ? o / H : 0, h = valid ? o % H : 0;
            const long long g = ((long long)t * B + b0 + r) * H + h;
            const T direct = (valid && lane == 0) ? G[g] : (T)0;
            const T d = (valid && lane == 0) ? Dt[g] : (T)0;
            const T* delta = cur + r * H;
            T a0 = 0, a1 = 0;  // column h of W: (delta W)[h] = sum_j delta[j] W[j, h]
            for (int j = lane; j < H; j += 2 * L) {
                a0 += delta[j] * Ws[j * Hp + h];
                if (j + L < H) a1 += delta[j + L] * Ws[(j + L) * Hp + h];
            }
            const T acc = group_sum(valid ? a0 + a1 : (T)0, L);
            if (valid && lane == 0) {
                const T v = (direct + acc) * d;
                nxt[o] = v;
                G[g] = v;
            }
        }
        __syncthreads();
    }
}
