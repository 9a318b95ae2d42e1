// The Elman cell, one step of each recurrence in ONE kernel, for the small (B, H) where cuBLAS
// picks slow kernels (measured on an H100: a (16, 128) x (128, 128) product took ~50 us inside a
// graph, a fused step ~3). T is defined as float or double, and PHI(x) as
// tanh(x) or ((x) < (T)0 ? (T)0 : (x)) (relu), before this source is compiled.
extern "C" __global__ void fwd(const T* __restrict__ s_prev, const T* __restrict__ W,
                                 const T* __restrict__ pre, T* __restrict__ out, int B, int H) {
    // one warp per output (b, h): lanes stride over j, so rows of s_prev and W load coalesced
    long long warp = ((long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    int lane = threadIdx.x & 31;
    if (warp >= (long long)B * H) return;  // whole warps leave together
    long long b = warp / H, h = warp % H;
    const T* s_row = s_prev + b * H;
    const T* w_row = W + h * H;
    T acc = 0;
    for (int j = lane; j < H; j += 32) acc += s_row[j] * w_row[j];
    for (int o = 16; o > 0; o >>= 1) acc += __shfl_down_sync(0xffffffffu, acc, o);
    if (lane == 0) out[b * H + h] = PHI(pre[b * H + h] + acc);
}
extern "C" __global__ void bwd(const T* __restrict__ d_next, const T* __restrict__ W,
                                 const T* __restrict__ d, T* __restrict__ g, int B, int H) {
    // one thread per output (b, h): neighbours read neighbouring columns of W (coalesced)
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long long)B * H) return;
    long long b = i / H, h = i % H;
    const T* d_row = d_next + b * H;
    T acc = 0;
    for (int j = 0; j < H; ++j) acc += d_row[j] * W[(long long)j * H + h];
    g[i] = (g[i] + acc) * d[i];  // d: the step factor (tanh: 1 - s^2; relu: 1 or 0)
}
