// fewstep::solver_update on CUDA: the Triton kernel of fewstep/kernels/solver_update.py written out in CUDA,
// meant to give the same bits (outputs and noise) for the same buffers, coefficients and seed.
//
// What "the same bits" takes, as read off Triton 3.x's PTX for sm_90 (enable_fp_fusion=True):
// * a row with one input is fl(c0 * v0); with more, LLVM contracts the chain
//   ((v0*c0 + v1*c1) + v2*c2) + ... into fma(v0, c0, fl(v1 * c1)), then fma(v_i, c_i, acc) for i >= 2;
// * noise: the Philox words of csrc/philox.h; uniforms fl(fl(int) * scale); libdevice logf / cosf (the same
//   routines nvcc links for logf / cosf without --use_fast_math); sqrt is sqrt.approx.ftz.f32 (Triton lowers
//   tl.sqrt to it); every product rounds on its own (__fmul_rn: nvcc may not contract it).
// Nothing here depends on flush-to-zero: the arguments of logf / cosf / sqrt are normal numbers.
//
// Each thread handles kVec consecutive elements: one 16-byte load per fp32 row (8 bytes for 16-bit types)
// when N is a multiple of kVec and every buffer is 16-byte aligned, element by element otherwise.
#include "solver_update.h"

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "philox.h"

namespace fewstep {
namespace {

// fewstep/kernels/native.py's CUDA_MAX_REG_IN / CUDA_MAX_ROWS carry the same numbers.
constexpr int kMaxRegIn = 8;
constexpr int kMaxRows = 8;
constexpr int kMaxCols = kMaxRegIn + 3;  // O_u, O_c, the state rows, z
constexpr int kVec = 4;
constexpr int kThreads = 256;

struct Params {
  float* state;
  const void* net_out;
  void* net_in;
  const int64_t* seed;
  float* z_out;  // nullptr: do not record the noise
  int64_t n;
  uint64_t noise_offset;
  int n_out;    // columns read from net_out (O_u, O_c), first
  int n_state;  // columns read from the state, next
  int n_cols;   // n_out + n_state + has_z (z is the last column)
  int n_reg_out;
  int has_net_in;
  int guided;
  int vec_ok;
  int64_t col_offset[kMaxCols];  // element offset of each column in net_out or the state
  int64_t out_offset[kMaxRows];  // element offset of each output state row
  float coef[kMaxRows][kMaxCols];
};

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(double v) { return __double2float_rn(v); }
__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_f32(float v);
template <>
__device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <>
__device__ __forceinline__ double from_f32<double>(float v) { return static_cast<double>(v); }
template <>
__device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

template <typename T>
__device__ __forceinline__ T bits_to(unsigned short w);
template <>
__device__ __forceinline__ __half bits_to<__half>(unsigned short w) { return __ushort_as_half(w); }
template <>
__device__ __forceinline__ __nv_bfloat16 bits_to<__nv_bfloat16>(unsigned short w) { return __ushort_as_bfloat16(w); }
__device__ __forceinline__ unsigned to_bits(__half v) { return __half_as_ushort(v); }
__device__ __forceinline__ unsigned to_bits(__nv_bfloat16 v) { return __bfloat16_as_ushort(v); }

// kVec elements of T as one vector access (16 bytes for fp32, 8 for 16-bit types, 2 x 16 for fp64).  Stores are
// written in PTX: nvcc split float4 / uint2 stores of the output rows into scalar stores (seen in its sm_90 PTX).
// The pointers are generic addresses of global memory, which st.global accepts as they are.
template <typename T>
struct VecIO;
template <>
struct VecIO<float> {
  static __device__ __forceinline__ void load(const float* p, float (&v)[kVec]) {
    const float4 q = *reinterpret_cast<const float4*>(p);
    v[0] = q.x, v[1] = q.y, v[2] = q.z, v[3] = q.w;
  }
  static __device__ __forceinline__ void store(float* p, const float (&v)[kVec]) {
    asm volatile("st.global.v4.f32 [%0], {%1, %2, %3, %4};" ::"l"(p), "f"(v[0]), "f"(v[1]), "f"(v[2]), "f"(v[3])
                 : "memory");
  }
};
template <>
struct VecIO<double> {
  static __device__ __forceinline__ void load(const double* p, float (&v)[kVec]) {
    const double2 a = reinterpret_cast<const double2*>(p)[0], b = reinterpret_cast<const double2*>(p)[1];
    v[0] = to_f32(a.x), v[1] = to_f32(a.y), v[2] = to_f32(b.x), v[3] = to_f32(b.y);
  }
  static __device__ __forceinline__ void store(double* p, const float (&v)[kVec]) {
    asm volatile("st.global.v2.f64 [%0], {%1, %2};" ::"l"(p), "d"(double(v[0])), "d"(double(v[1])) : "memory");
    asm volatile("st.global.v2.f64 [%0], {%1, %2};" ::"l"(p + 2), "d"(double(v[2])), "d"(double(v[3])) : "memory");
  }
};
template <typename T>  // __half, __nv_bfloat16: four 16-bit words in a uint2
struct VecIO16 {
  static __device__ __forceinline__ void load(const T* p, float (&v)[kVec]) {
    const uint2 q = *reinterpret_cast<const uint2*>(p);
    const unsigned w[kVec] = {q.x & 0xFFFFu, q.x >> 16, q.y & 0xFFFFu, q.y >> 16};
#pragma unroll
    for (int k = 0; k < kVec; ++k) v[k] = to_f32(bits_to<T>(static_cast<unsigned short>(w[k])));
  }
  static __device__ __forceinline__ void store(T* p, const float (&v)[kVec]) {
    unsigned w[kVec];
#pragma unroll
    for (int k = 0; k < kVec; ++k) w[k] = to_bits(from_f32<T>(v[k]));
    asm volatile("st.global.v2.u32 [%0], {%1, %2};" ::"l"(p), "r"(w[0] | (w[1] << 16)), "r"(w[2] | (w[3] << 16))
                 : "memory");
  }
};
template <>
struct VecIO<__half> : VecIO16<__half> {};
template <>
struct VecIO<__nv_bfloat16> : VecIO16<__nv_bfloat16> {};

template <typename T>
__device__ __forceinline__ void load(const T* p, bool vec, int64_t rem, float (&out)[kVec]) {
  if (vec) {
    VecIO<T>::load(p, out);
  } else {
#pragma unroll
    for (int k = 0; k < kVec; ++k) out[k] = k < rem ? to_f32(p[k]) : 0.0f;
  }
}

template <typename T>
__device__ __forceinline__ void store(T* p, bool vec, int64_t rem, const float (&v)[kVec]) {
  if (vec) {
    VecIO<T>::store(p, v);
  } else {
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      if (k < rem) p[k] = from_f32<T>(v[k]);
    }
  }
}

__device__ __forceinline__ float sqrt_approx(float x) {
  float r;
  asm("sqrt.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
  return r;
}

// tl.randn(seed, offset): pair_uniform_to_normal's first output (triton/language/random.py).
__device__ __forceinline__ float philox_normal(uint64_t seed, uint64_t offset) {
  uint32_t a, b;
  philox_pair(seed, offset, a, b);
  const float u1 = fmaxf(kMinUniform, __fmul_rn(__int2float_rn(uniform_int(a)), kUniformScale));
  const float u2 = __fmul_rn(__int2float_rn(uniform_int(b)), kUniformScale);
  const float th = __fmul_rn(kTwoPi, u2);
  const float r = sqrt_approx(__fmul_rn(-2.0f, logf(u1)));
  return __fmul_rn(r, cosf(th));
}

template <typename OutT, typename InT>
__global__ void __launch_bounds__(kThreads) solver_update_kernel(const Params p) {
  const int64_t base = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) * kVec;
  if (base >= p.n) return;
  const int64_t rem = p.n - base;
  const bool vec = p.vec_ok && rem >= kVec;

  // every input is loaded before any output is stored: a stage may read and write the same state row
  float z[kVec];
  if (p.n_cols > p.n_out + p.n_state) {
    const uint64_t seed = static_cast<uint64_t>(*p.seed);
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      z[k] = k < rem ? philox_normal(seed, p.noise_offset + static_cast<uint64_t>(base + k)) : 0.0f;
    }
    if (p.z_out != nullptr) store(p.z_out + base, vec, rem, z);
  }
  float v[kMaxCols][kVec];
  const OutT* net_out = static_cast<const OutT*>(p.net_out);
#pragma unroll
  for (int i = 0; i < kMaxCols; ++i) {
    if (i < p.n_out) {
      load(net_out + p.col_offset[i] + base, vec, rem, v[i]);
    } else if (i < p.n_out + p.n_state) {
      load(p.state + p.col_offset[i] + base, vec, rem, v[i]);
    } else if (i < p.n_cols) {  // z, the last column
#pragma unroll
      for (int k = 0; k < kVec; ++k) v[i][k] = z[k];
    }
  }

  const int n_rows = p.n_reg_out + p.has_net_in;
#pragma unroll
  for (int o = 0; o < kMaxRows; ++o) {
    if (o < n_rows) {  // a guard, not a break: the loop then unrolls and p.coef[o][i] are constant offsets
      float acc[kVec];
#pragma unroll
      for (int k = 0; k < kVec; ++k) {
        acc[k] = p.n_cols == 1 ? __fmul_rn(v[0][k], p.coef[o][0])
                               : __fmaf_rn(v[0][k], p.coef[o][0], __fmul_rn(v[1][k], p.coef[o][1]));
      }
#pragma unroll
      for (int i = 2; i < kMaxCols; ++i) {
        if (i < p.n_cols) {
#pragma unroll
          for (int k = 0; k < kVec; ++k) acc[k] = __fmaf_rn(v[i][k], p.coef[o][i], acc[k]);
        }
      }
      if (o < p.n_reg_out) {
        store(p.state + p.out_offset[o] + base, vec, rem, acc);
      } else {
        InT* net_in = static_cast<InT*>(p.net_in);
        store(net_in + base, vec, rem, acc);
        if (p.guided) store(net_in + p.n + base, vec, rem, acc);
      }
    }
  }
}

template <typename OutT, typename InT>
void launch(const Params& p, cudaStream_t stream) {
  const int64_t per_block = int64_t(kThreads) * kVec;
  const int64_t blocks = (p.n + per_block - 1) / per_block;
  TORCH_CHECK(blocks < (int64_t(1) << 31), "fewstep::solver_update: N = ", p.n, " is too large for one launch");
  solver_update_kernel<OutT, InT><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename OutT>
void launch_in(c10::ScalarType in, const Params& p, cudaStream_t stream) {
  switch (in) {
    case at::kDouble: return launch<OutT, double>(p, stream);
    case at::kHalf: return launch<OutT, __half>(p, stream);
    case at::kBFloat16: return launch<OutT, __nv_bfloat16>(p, stream);
    default: return launch<OutT, float>(p, stream);
  }
}

bool aligned(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

void solver_update_cuda(const at::Tensor& state, const std::optional<at::Tensor>& net_out,
                        const std::optional<at::Tensor>& net_in, const std::optional<at::Tensor>& seed,
                        const std::optional<at::Tensor>& z_out, c10::IntArrayRef reg_in, c10::IntArrayRef reg_out,
                        c10::ArrayRef<double> coef, bool has_ou, bool has_oc, bool has_z, bool has_net_in,
                        bool guided, int64_t noise_index) {
  const int64_t n = check_solver_update_args(state, net_out, net_in, seed, z_out, reg_in, reg_out, coef, has_ou,
                                             has_oc, has_z, has_net_in, guided, noise_index);
  TORCH_CHECK(int64_t(reg_in.size()) <= kMaxRegIn && int64_t(reg_out.size()) + has_net_in <= kMaxRows,
              "fewstep::solver_update on CUDA reads at most ", kMaxRegIn, " state rows and writes ", kMaxRows,
              " outputs per stage, got ", reg_in.size(), " and ", int64_t(reg_out.size()) + has_net_in);
  const int n_rows = int(reg_out.size()) + int(has_net_in);
  if (n_rows == 0 || n == 0) return;
  const c10::cuda::CUDAGuard guard(state.device());

  Params p{};
  p.state = state.data_ptr<float>();
  const bool has_out = has_ou || has_oc;
  p.net_out = has_out ? net_out->data_ptr() : nullptr;
  p.net_in = has_net_in ? net_in->data_ptr() : nullptr;
  p.seed = has_z ? seed->data_ptr<int64_t>() : nullptr;
  p.z_out = has_z && z_out.has_value() ? z_out->data_ptr<float>() : nullptr;
  p.n = n;
  p.noise_offset = static_cast<uint64_t>(noise_index) * static_cast<uint64_t>(n);
  p.n_out = int(has_ou) + int(has_oc);
  p.n_state = int(reg_in.size());
  p.n_cols = p.n_out + p.n_state + int(has_z);
  p.n_reg_out = int(reg_out.size());
  p.has_net_in = has_net_in;
  p.guided = guided;
  int c = 0;
  if (has_ou) p.col_offset[c++] = 0;
  if (has_oc) p.col_offset[c++] = guided ? n : 0;
  for (int64_t r : reg_in) p.col_offset[c++] = r * n;
  for (int o = 0; o < p.n_reg_out; ++o) p.out_offset[o] = reg_out[o] * n;
  for (int o = 0; o < n_rows; ++o) {
    for (int i = 0; i < p.n_cols; ++i) p.coef[o][i] = static_cast<float>(coef[o * p.n_cols + i]);
  }
  p.vec_ok = n % kVec == 0 && aligned(p.state) && (!has_out || aligned(p.net_out)) &&
             (!has_net_in || aligned(p.net_in)) && (p.z_out == nullptr || aligned(p.z_out));

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(state.device().index()).stream();
  switch (has_out ? net_out->scalar_type() : at::kFloat) {
    case at::kDouble: return launch_in<double>(has_net_in ? net_in->scalar_type() : at::kFloat, p, stream);
    case at::kHalf: return launch_in<__half>(has_net_in ? net_in->scalar_type() : at::kFloat, p, stream);
    case at::kBFloat16:
      return launch_in<__nv_bfloat16>(has_net_in ? net_in->scalar_type() : at::kFloat, p, stream);
    default: return launch_in<float>(has_net_in ? net_in->scalar_type() : at::kFloat, p, stream);
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(fewstep, CUDA, m) { m.impl("solver_update", &solver_update_cuda); }

}  // namespace fewstep
