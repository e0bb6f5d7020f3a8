// Host launch code of the CUDA nll_loss ops (device code and Note [CUDA nll_loss kernels]: nll_loss.cuh).
// Semantics: exactly the CPU op's (csrc/cpu/nll_loss.cpp), which are torch.nn.functional.nll_loss's.
//
// The same file is compiled by g++ for the SIMT emulator (tests/simt/emulated_ops.cpp, XENT_SIMT_EMULATOR):
// then the tensors are CPU tensors, launches run the device code on the CPU and the ops are CPU kernels of
// the `xent_emulated` library. Everything that differs lives in host_compat.h. (The emulated build compiles
// every .cu of csrc/cuda into one translation unit: this file's host helpers live in their own namespace.)
//
// No host synchronisation: nothing computed on the device is read here. The forward's sums (loss and
// total_weight) are reduced on the device in a fixed order (finish_kernel); the backward reads grad_loss and
// total_weight on the device.
#include "nll_loss.cuh"
#include "host_compat.h"
#include "class_losses_host.h"
#include "nll_loss_ops.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_strided.h>
#include <torch/library.h>

#include <limits>
#include <optional>
#include <tuple>

namespace xent::cuda::nll_host {
namespace {

using host::ceil_div;
using host::cptr;
using host::mptr;

// The position dims (N, d1, ..., dk) of `t` (shaped like the input): its merged dims without the class dim;
// nullopt when more than kMaxPositionDims remain.
std::optional<nll::PositionDims> position_dims(const at::Tensor& t) { return host::merge_dims(t, /*skip=*/1); }

int64_t class_stride(const at::Tensor& t) { return t.size(1) == 1 ? 0 : t.stride(1); }

// The arguments of a kernel (Params: nll::FwdParams or nll::ScatterParams) with what both read per position
// filled in (`pos`), for the tensor the kernel indexes (`indexed`: the input in the forward, the gradient in
// the backward) with its position dims.
template <template <class, class> class Params, class scalar_t, class target_t>
Params<scalar_t, target_t> with_positions(const at::Tensor& indexed, const nll::PositionDims& dims,
                                          const at::Tensor& target, int64_t P, int64_t ignore_index,
                                          const at::Tensor& weight) {
  using acc_t = typename nll::AccType<scalar_t>::type;
  Params<scalar_t, target_t> a;
  a.pos.dims = dims;
  a.pos.sc = class_stride(indexed);
  a.pos.target = cptr<target_t>(target);
  a.pos.P = P;
  a.pos.C = indexed.size(1);
  a.pos.ignore_index = ignore_index;
  a.pos.weight = cptr<acc_t>(weight);
  return a;
}

// Calls f(Tag<scalar_t>{}, Tag<target_t>{}) for the input's and the target's dtypes.
template <class F>
void dispatch_dtypes(const at::Tensor& input, const at::Tensor& target, F&& f) {
  host::dispatch_float_dtype(input.scalar_type(), "nll_loss", [&](auto tag) {
    host::dispatch_index_dtype(target.scalar_type(), "nll_loss", [&](auto ttag) { f(tag, ttag); });
  });
}

int64_t num_positions(const at::Tensor& input) {
  int64_t P = 1;
  for (const int64_t s : position_sizes(input)) P *= s;
  return P;
}

unsigned position_blocks(int64_t P) {
  const int64_t blocks = ceil_div(P, nll::kPositionsPerBlock);
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), "nll_loss: input too large for the CUDA kernels");
  return static_cast<unsigned>(blocks);
}

// ---- Forward (nll_loss_ops.h checks the ops' arguments and registers them) ----
std::tuple<at::Tensor, at::Tensor> nll_forward(const at::Tensor& input, const at::Tensor& target,
                                               const std::optional<at::Tensor>& weight_opt, int64_t reduction,
                                               int64_t ignore_index) {
  host::DeviceGuard guard(input.device());
  const bool none = reduction == at::Reduction::None;
  at::Tensor loss = none ? at::empty(position_sizes(input), input.options()) : at::empty({}, input.options());
  at::Tensor total_weight = at::empty({}, input.options());
  const int64_t P = num_positions(input);
  if (P == 0) {
    total_weight.zero_();
    host::fill_empty_reduction(loss, reduction);
    return {loss, total_weight};
  }
  at::Tensor x = input;
  auto dims = position_dims(x);
  if (!dims) {  // more than kMaxPositionDims non-mergeable dims: rare; read a contiguous copy
    x = contiguous_strides(input);
    dims = position_dims(x);
    TORCH_INTERNAL_ASSERT(dims.has_value());
  }
  const at::Tensor t = target.contiguous();
  const at::Tensor w = weight_for_kernel(input, weight_opt);
  const xent_stream_t stream = host::current_stream(input.device());
  const unsigned blocks = position_blocks(P);
  at::Tensor partials = at::empty({2 * static_cast<int64_t>(blocks)}, input.options().dtype(at::kDouble));

  dispatch_dtypes(input, t, [&](auto tag, auto ttag) {
    using scalar_t = typename decltype(tag)::type;
    using target_t = typename decltype(ttag)::type;
    auto a = with_positions<nll::FwdParams, scalar_t, target_t>(x, *dims, t, P, ignore_index, w);
    a.x = cptr<scalar_t>(x);
    a.loss = none ? mptr<scalar_t>(loss) : nullptr;
    a.partials = mptr<double>(partials);
    a.n_blocks = blocks;
    auto* fwd = &nll::fwd_kernel<scalar_t, target_t>;
    XENT_LAUNCH(blocks, nll::kBlock, 0, stream, fwd)(a);
    XENT_CUDA_LAUNCH_CHECK();
    nll::FinishParams<scalar_t> f;
    f.partials = cptr<double>(partials);
    f.n = blocks;
    f.mean = reduction == at::Reduction::Mean;
    f.loss = none ? nullptr : mptr<scalar_t>(loss);
    f.total_weight = mptr<scalar_t>(total_weight);
    auto* finish = &nll::finish_kernel<scalar_t>;
    XENT_LAUNCH(1, nll::kFinishBlock, 0, stream, finish)(f);
    XENT_CUDA_LAUNCH_CHECK();
  });
  return {loss, total_weight};
}

// ---- Backward ----
at::Tensor nll_backward(const at::Tensor& grad_loss, const at::Tensor& input, const at::Tensor& target,
                        const std::optional<at::Tensor>& weight_opt, const at::Tensor& total_weight,
                        int64_t reduction, int64_t ignore_index) {
  const bool none = reduction == at::Reduction::None;
  host::DeviceGuard guard(input.device());

  // A dense gradient with the input's strides (as the fake kernel promises). When its position dims do not
  // merge into kMaxPositionDims, the kernels write a contiguous temporary that is copied into it.
  at::Tensor grad = at::empty_strided(input.sizes(), dense_strides_like(input), input.options());
  const int64_t P = num_positions(input);
  if (P == 0) return grad;
  at::Tensor gk = grad;
  auto dims = position_dims(gk);
  if (!dims) {
    gk = at::empty(input.sizes(), input.options());
    dims = position_dims(gk);
    TORCH_INTERNAL_ASSERT(dims.has_value());
  }
  const at::Tensor t = target.contiguous();
  const at::Tensor w = weight_for_kernel(input, weight_opt);
  // Upstream gradient: per position in the input's dtype when it has it (converted in the kernel, as the CPU
  // op's grad_loss.to(acc)), else in the accumulation dtype; a 0-d one (and total_weight) in double, as the
  // CPU op's item<double>() (small device-side conversions, no synchronisation).
  at::Tensor gl_s, gl_a, gl_d, tw_d;
  if (none) {
    if (grad_loss.scalar_type() == input.scalar_type()) {
      gl_s = grad_loss.contiguous();
    } else {
      gl_a = grad_loss.to(acc_dtype(input.scalar_type())).contiguous();
    }
  } else {
    gl_d = grad_loss.to(at::kDouble).contiguous();
    if (reduction == at::Reduction::Mean) tw_d = total_weight.reshape({}).to(at::kDouble).contiguous();
  }
  const xent_stream_t stream = host::current_stream(input.device());
  const unsigned blocks = position_blocks(P);

  // 1. Zero the gradient's whole storage (dense: numel elements from its data pointer).
  const int64_t bytes = gk.numel() * static_cast<int64_t>(gk.element_size());
  if (bytes > 0) {
    const int64_t fill_blocks = ceil_div(bytes / 16 + 1, nll::kFillVectorsPerBlock);
    TORCH_CHECK(fill_blocks <= std::numeric_limits<int32_t>::max(), "nll_loss: input too large for the CUDA kernels");
    auto* kernel = &nll::zero_fill_kernel;
    XENT_LAUNCH(static_cast<unsigned>(fill_blocks), nll::kBlock, 0, stream, kernel)(
        static_cast<unsigned char*>(gk.mutable_data_ptr()), bytes);
    XENT_CUDA_LAUNCH_CHECK();
  }
  // 2. Then (same stream) one element per non-ignored position. Runs even when the gradient is empty
  // (C == 0): it still checks the targets, as the CPU op does.
  dispatch_dtypes(input, t, [&](auto tag, auto ttag) {
    using scalar_t = typename decltype(tag)::type;
    using target_t = typename decltype(ttag)::type;
    using acc_t = typename nll::AccType<scalar_t>::type;
    auto a = with_positions<nll::ScatterParams, scalar_t, target_t>(gk, *dims, t, P, ignore_index, w);
    a.grad = mptr<scalar_t>(gk);
    a.grad_loss_s = cptr<scalar_t>(gl_s);
    a.grad_loss_a = cptr<acc_t>(gl_a);
    a.grad_loss_d = cptr<double>(gl_d);
    a.total_weight_d = cptr<double>(tw_d);
    a.per_position = none;
    auto* kernel = &nll::scatter_kernel<scalar_t, target_t>;
    XENT_LAUNCH(blocks, nll::kBlock, 0, stream, kernel)(a);
    XENT_CUDA_LAUNCH_CHECK();
  });
  if (!gk.is_same(grad)) grad.copy_(gk);
  return grad;
}

} // namespace
} // namespace xent::cuda::nll_host

TORCH_LIBRARY_IMPL(XENT_CUDA_LIBRARY, XENT_CUDA_DISPATCH_KEY, m) {
  xent::register_nll_loss<&xent::cuda::nll_host::nll_forward, &xent::cuda::nll_host::nll_backward>(m);
}
