// fewstep::solver_update: one solver stage, ``outputs = coef @ inputs`` per element in fp32, in place.
//
// The op mirrors the Triton kernel in fewstep/kernels/solver_update.py (same buffers, same column order, same
// noise stream); fewstep/kernels/native.py checks its arguments with the Triton launcher's checks before it
// calls the op, so the checks here only keep a direct call from reading or writing out of bounds.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

#include <optional>

namespace fewstep {

// Version of the op's contract (schema, semantics).  fewstep/kernels/native.py refuses a built extension whose
// build info carries another number: bump both together.
#define FEWSTEP_NATIVE_API 1

// The schema, registered in solver_update.cpp.
constexpr const char* kSolverUpdateSchema =
    "solver_update(Tensor(a!) state, Tensor? net_out, Tensor(b!)? net_in, Tensor? seed, Tensor(c!)? z_out, "
    "int[] reg_in, int[] reg_out, float[] coef, bool has_ou, bool has_oc, bool has_z, bool has_net_in, "
    "bool guided, int noise_index) -> ()";

// Shapes, dtypes and devices only (no data is read): shared by the CPU, CUDA and Meta kernels.  Returns N,
// the elements per state row.
int64_t check_solver_update_args(const at::Tensor& state, const std::optional<at::Tensor>& net_out,
                                 const std::optional<at::Tensor>& net_in, const std::optional<at::Tensor>& seed,
                                 const std::optional<at::Tensor>& z_out, c10::IntArrayRef reg_in,
                                 c10::IntArrayRef reg_out, c10::ArrayRef<double> coef, bool has_ou, bool has_oc,
                                 bool has_z, bool has_net_in, bool guided, int64_t noise_index);

}  // namespace fewstep
