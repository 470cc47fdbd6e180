// datadam-fast: CUDA extension for the spatial attention op (backend="cuda").
//
//   forward(feats: list[Tensor], power: float) -> (maps: list[Tensor], norms: list[Tensor])
//   backward(feats, maps, norms, grad_maps, power: float) -> list[Tensor]
//
// Contract: datadam_fast/backends/__init__.py; math: datadam_fast/reference.py; kernels and their
// design: spatial_attention_kernels.cuh (torch-free, so it can be compile-checked without a CUDA
// build of PyTorch).
//
// This file is the PyTorch glue: argument checks, layout handling, output/scratch allocation,
// grouping of the layers into launches, device guard and current stream. Only the public C++ API
// is used (torch/extension.h, c10/cuda/CUDAGuard.h, c10/cuda/CUDAStream.h; the c10 stream API
// instead of ATen/cuda/CUDAContext.h keeps cuBLAS/cuSPARSE headers out of the build).
//
// Layouts: NCHW-contiguous and channels_last-contiguous feature maps are read in place and their
// gradient is produced in the same memory format. Any other strides (e.g. a channel slice, a
// transposed view) are first copied with .contiguous() (NCHW) and get an NCHW-contiguous gradient.
// Layers are grouped by dtype; each group of up to kMaxLayers layers costs two kernel launches
// per direction, whatever the number of layers.
//
// DATADAM_FAST_HOST_EMULATION (tests only, tests/loss/test_backend_cuda.py): this file is compiled by
// the host C++ compiler against CPU tensors, with the kernels run by a CPU emulation of the
// thread model; the few lines that differ are marked by that macro.
#include "spatial_attention_kernels.cuh"

namespace ddk = datadam_fast::cuda;

// Every kernel the extension launches, instantiated in both nvcc passes (see below).
template cudaError_t ddk::launch_forward<float>(const ddk::Params&, cudaStream_t);
template cudaError_t ddk::launch_forward<double>(const ddk::Params&, cudaStream_t);
template cudaError_t ddk::launch_forward<__half>(const ddk::Params&, cudaStream_t);
template cudaError_t ddk::launch_forward<__nv_bfloat16>(const ddk::Params&, cudaStream_t);
template cudaError_t ddk::launch_backward<float>(const ddk::Params&, cudaStream_t);
template cudaError_t ddk::launch_backward<double>(const ddk::Params&, cudaStream_t);
template cudaError_t ddk::launch_backward<__half>(const ddk::Params&, cudaStream_t);
template cudaError_t ddk::launch_backward<__nv_bfloat16>(const ddk::Params&, cudaStream_t);

// The PyTorch glue is host code only. Hiding it from the device passes (__CUDA_ARCH__ defined)
// keeps cicc from parsing the whole of torch/extension.h once per architecture (about 25 s of
// the build). The set of kernel instantiations is the same in every pass (the explicit
// instantiations above), as the CUDA programming guide requires for templates launched from host.
#if !defined(__CUDA_ARCH__)

#include <torch/extension.h>

#if !defined(DATADAM_FAST_HOST_EMULATION)
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

#include <cmath>
#include <cstdint>
#include <limits>
#include <mutex>
#include <string>
#include <tuple>
#include <vector>

namespace {

#if !defined(DATADAM_FAST_HOST_EMULATION)
constexpr bool kEmulated = false;
#define DATADAM_FAST_CHECK_LAUNCH(expr) C10_CUDA_CHECK(expr)

int num_sms(int device) {
  static std::mutex mu;
  static std::vector<int> cache;
  std::lock_guard<std::mutex> lock(mu);
  if (device >= static_cast<int>(cache.size())) cache.resize(device + 1, 0);
  if (cache[device] == 0) {
    int v = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, device));
    cache[device] = v > 0 ? v : 1;
  }
  return cache[device];
}

// Device guard, current stream and SM count for the device of the first feature map.
struct DeviceScope {
  c10::cuda::CUDAGuard guard;
  cudaStream_t stream;
  int sms;
  explicit DeviceScope(const at::Tensor& t)
      : guard(t.device()),
        stream(c10::cuda::getCurrentCUDAStream(t.get_device()).stream()),
        sms(num_sms(t.get_device())) {}
};
#else
// Test-only host emulation (see spatial_attention_kernels.cuh): CPU tensors, no device or stream.
constexpr bool kEmulated = true;
int g_emulated_sms = 132;
#define DATADAM_FAST_CHECK_LAUNCH(expr) \
  TORCH_CHECK((expr) == cudaSuccess, "datadam_fast cuda (emulated): launch failed")
struct DeviceScope {
  cudaStream_t stream = nullptr;
  int sms = g_emulated_sms;
  explicit DeviceScope(const at::Tensor&) {}
};
#endif

bool supported_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble;
}

at::ScalarType acc_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

std::string shape_str(const at::Tensor& t) {
  std::string s = "[";
  for (int64_t i = 0; i < t.dim(); ++i) s += (i ? ", " : "") + std::to_string(t.size(i));
  return s + "]";
}

void check_feats(const std::vector<at::Tensor>& feats, double power) {
  TORCH_CHECK(std::isfinite(power) && power >= 1.0,
              "datadam_fast cuda: power must be a finite float >= 1, got ", power);
  for (size_t i = 0; i < feats.size(); ++i) {
    const at::Tensor& f = feats[i];
    TORCH_CHECK(f.defined(), "datadam_fast cuda: layer ", i, ": undefined tensor");
    TORCH_CHECK(f.is_cuda() || kEmulated, "datadam_fast cuda: layer ", i,
                ": expected a CUDA tensor, got device ", f.device());
    TORCH_CHECK(f.device() == feats[0].device(), "datadam_fast cuda: layer ", i, " is on ",
                f.device(), " but layer 0 is on ", feats[0].device(), "; move them to one device");
    TORCH_CHECK(supported_dtype(f.scalar_type()), "datadam_fast cuda: layer ", i,
                ": expected float32, float16, bfloat16 or float64, got ", f.scalar_type());
    TORCH_CHECK(f.dim() == 4, "datadam_fast cuda: layer ", i,
                ": expected a 4-d [N, C, H, W] tensor, got shape ", shape_str(f));
    TORCH_CHECK(f.numel() > 0, "datadam_fast cuda: layer ", i, ": empty tensor of shape ",
                shape_str(f));
  }
}

// The feature map as the kernels read it, and its layout.
struct Feat {
  at::Tensor t;
  int layout;
  int64_t N, C, HW;
};

Feat prepare(const at::Tensor& f) {
  Feat r;
  if (f.is_contiguous()) {
    r.t = f;
    r.layout = ddk::kNCHW;
  } else if (f.is_contiguous(at::MemoryFormat::ChannelsLast)) {
    r.t = f;
    r.layout = ddk::kNHWC;
  } else {
    r.t = f.contiguous();
    r.layout = ddk::kNCHW;
  }
  r.N = f.size(0);
  r.C = f.size(1);
  r.HW = f.size(2) * f.size(3);
  return r;
}

bool aligned16(const void* p) { return (reinterpret_cast<std::uintptr_t>(p) & 15u) == 0; }

template <typename T> struct CudaType { using type = T; };
template <> struct CudaType<at::Half> { using type = __half; };
template <> struct CudaType<at::BFloat16> { using type = __nv_bfloat16; };

void check_grid(int64_t blocks) {
  TORCH_CHECK(blocks > 0 && blocks <= std::numeric_limits<int32_t>::max(),
              "datadam_fast cuda: problem too large for one launch (", blocks, " blocks)");
}

// Indices of the layers, grouped by dtype and chunked to at most kMaxLayers per launch.
std::vector<std::vector<size_t>> launch_groups(const std::vector<Feat>& fs) {
  std::vector<std::vector<size_t>> groups;
  const at::ScalarType order[] = {at::kFloat, at::kBFloat16, at::kHalf, at::kDouble};
  for (at::ScalarType st : order) {
    std::vector<size_t> cur;
    for (size_t i = 0; i < fs.size(); ++i) {
      if (fs[i].t.scalar_type() != st) continue;
      cur.push_back(i);
      if (cur.size() == static_cast<size_t>(ddk::kMaxLayers)) {
        groups.push_back(cur);
        cur.clear();
      }
    }
    if (!cur.empty()) groups.push_back(cur);
  }
  return groups;
}

template <typename scalar_t>
void run_forward_group(const std::vector<Feat>& fs, const std::vector<size_t>& idx,
                       std::vector<at::Tensor>& maps, std::vector<at::Tensor>& norms, double power,
                       int sms, cudaStream_t stream) {
  using T = typename CudaType<scalar_t>::type;
  ddk::Params p{};
  p.num_layers = static_cast<int>(idx.size());
  p.power_f = static_cast<float>(power);
  p.power_d = power;
  int64_t fb = 0, mb = 0, npart = 0, napart = 0;
  std::vector<int64_t> part_off(idx.size(), -1), apart_off(idx.size(), -1);
  for (size_t j = 0; j < idx.size(); ++j) {
    const Feat& f = fs[idx[j]];
    ddk::LayerDesc& d = p.layer[j];
    ddk::plan_layer<T>(d, f.N, f.C, f.HW, f.layout, aligned16(f.t.data_ptr()), sms, /*forward=*/true);
    d.feat = f.t.data_ptr();
    d.maps = maps[idx[j]].data_ptr();
    d.norms = norms[idx[j]].data_ptr();
    p.fstart[j] = fb;
    p.mstart[j] = mb;
    fb += f.N * d.hw_tiles * d.c_chunks;
    mb += f.N * d.map_tiles;
    if (d.c_chunks == 1) {
      part_off[j] = npart;
      npart += f.N * d.hw_tiles;
    } else {
      apart_off[j] = napart;
      napart += d.c_chunks * f.N * f.HW;
    }
  }
  p.fstart[idx.size()] = fb;
  p.mstart[idx.size()] = mb;
  check_grid(fb);
  check_grid(mb);
  const at::TensorOptions dev = fs[idx[0]].t.options();
  at::Tensor part = at::empty({npart > 0 ? npart : 1}, dev.dtype(at::kDouble));
  at::Tensor apart;
  if (napart > 0) apart = at::empty({napart}, dev.dtype(acc_dtype(fs[idx[0]].t.scalar_type())));
  for (size_t j = 0; j < idx.size(); ++j) {
    ddk::LayerDesc& d = p.layer[j];
    if (part_off[j] >= 0) d.part = part.data_ptr<double>() + part_off[j];
    if (apart_off[j] >= 0) {
      d.apart = static_cast<char*>(apart.data_ptr()) + apart_off[j] * apart.element_size();
    }
  }
  DATADAM_FAST_CHECK_LAUNCH(ddk::launch_forward<T>(p, stream));
}

template <typename scalar_t>
void run_backward_group(const std::vector<Feat>& fs, const std::vector<size_t>& idx,
                        const std::vector<at::Tensor>& maps, const std::vector<at::Tensor>& norms,
                        const std::vector<at::Tensor>& gmaps, std::vector<at::Tensor>& grads,
                        double power, int sms, cudaStream_t stream) {
  using T = typename CudaType<scalar_t>::type;
  ddk::Params p{};
  p.num_layers = static_cast<int>(idx.size());
  p.power_f = static_cast<float>(power);
  p.power_d = power;
  int64_t fb = 0, mb = 0, npart = 0;
  std::vector<int64_t> part_off(idx.size());
  for (size_t j = 0; j < idx.size(); ++j) {
    const size_t i = idx[j];
    const Feat& f = fs[i];
    ddk::LayerDesc& d = p.layer[j];
    const bool aligned = aligned16(f.t.data_ptr()) && aligned16(grads[i].data_ptr());
    ddk::plan_layer<T>(d, f.N, f.C, f.HW, f.layout, aligned, sms, /*forward=*/false);
    d.feat = f.t.data_ptr();
    d.grad = grads[i].data_ptr();
    d.maps = maps[i].data_ptr();
    d.norms = norms[i].data_ptr();
    d.gmaps = gmaps[i].data_ptr();
    p.fstart[j] = fb;
    p.mstart[j] = mb;
    fb += f.N * d.hw_tiles * d.c_chunks;
    mb += f.N * d.map_tiles;
    part_off[j] = npart;
    npart += f.N * d.map_tiles;
  }
  p.fstart[idx.size()] = fb;
  p.mstart[idx.size()] = mb;
  check_grid(fb);
  check_grid(mb);
  at::Tensor part = at::empty({npart}, fs[idx[0]].t.options().dtype(at::kDouble));
  for (size_t j = 0; j < idx.size(); ++j) p.layer[j].part = part.data_ptr<double>() + part_off[j];
  DATADAM_FAST_CHECK_LAUNCH(ddk::launch_backward<T>(p, stream));
}

template <typename Fn>
void dispatch(at::ScalarType st, Fn&& fn) {
  switch (st) {
    case at::kFloat: fn(float{}); break;
    case at::kDouble: fn(double{}); break;
    case at::kHalf: fn(at::Half{}); break;
    case at::kBFloat16: fn(at::BFloat16{}); break;
    default: TORCH_CHECK(false, "datadam_fast cuda: unsupported dtype ", st);
  }
}

}  // namespace

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> spatial_attention_forward(
    std::vector<at::Tensor> feats, double power) {
  check_feats(feats, power);
  std::vector<at::Tensor> maps, norms;
  if (feats.empty()) return std::make_tuple(maps, norms);
  const DeviceScope scope(feats[0]);
  std::vector<Feat> fs;
  fs.reserve(feats.size());
  for (const auto& f : feats) {
    fs.push_back(prepare(f));
    const at::TensorOptions o = f.options().dtype(acc_dtype(f.scalar_type()));
    maps.push_back(at::empty({fs.back().N, fs.back().HW}, o));
    norms.push_back(at::empty({fs.back().N}, o));
  }
  for (const auto& idx : launch_groups(fs)) {
    dispatch(fs[idx[0]].t.scalar_type(), [&](auto tag) {
      using scalar_t = decltype(tag);
      run_forward_group<scalar_t>(fs, idx, maps, norms, power, scope.sms, scope.stream);
    });
  }
  return std::make_tuple(maps, norms);
}

std::vector<at::Tensor> spatial_attention_backward(std::vector<at::Tensor> feats,
                                                   std::vector<at::Tensor> maps,
                                                   std::vector<at::Tensor> norms,
                                                   std::vector<at::Tensor> grad_maps,
                                                   double power) {
  check_feats(feats, power);
  const size_t L = feats.size();
  TORCH_CHECK(maps.size() == L && norms.size() == L && grad_maps.size() == L,
              "datadam_fast cuda backward: got ", L, " feature maps, ", maps.size(), " maps, ",
              norms.size(), " norms and ", grad_maps.size(), " map gradients; expected one each");
  std::vector<at::Tensor> grads;
  if (L == 0) return grads;
  const DeviceScope scope(feats[0]);
  std::vector<Feat> fs;
  std::vector<at::Tensor> m_c(L), n_c(L), g_c(L);
  for (size_t i = 0; i < L; ++i) {
    fs.push_back(prepare(feats[i]));
    const Feat& f = fs.back();
    const at::ScalarType acc = acc_dtype(feats[i].scalar_type());
    for (const at::Tensor* t : {&maps[i], &norms[i], &grad_maps[i]}) {
      TORCH_CHECK(t->defined() && t->device() == feats[i].device(), "datadam_fast cuda backward: layer ",
                  i, ": maps, norms and grad_maps must be defined and on ", feats[i].device());
    }
    TORCH_CHECK(maps[i].dim() == 2 && maps[i].size(0) == f.N && maps[i].size(1) == f.HW,
                "datadam_fast cuda backward: layer ", i, ": maps has shape ", shape_str(maps[i]),
                ", expected [", f.N, ", ", f.HW, "] for features ", shape_str(feats[i]));
    TORCH_CHECK(grad_maps[i].dim() == 2 && grad_maps[i].size(0) == f.N && grad_maps[i].size(1) == f.HW,
                "datadam_fast cuda backward: layer ", i, ": grad_maps has shape ", shape_str(grad_maps[i]),
                ", expected [", f.N, ", ", f.HW, "]");
    TORCH_CHECK(norms[i].dim() == 1 && norms[i].size(0) == f.N, "datadam_fast cuda backward: layer ", i,
                ": norms has shape ", shape_str(norms[i]), ", expected [", f.N, "]");
    TORCH_CHECK(at::isFloatingType(maps[i].scalar_type()) && at::isFloatingType(norms[i].scalar_type()) &&
                    at::isFloatingType(grad_maps[i].scalar_type()),
                "datadam_fast cuda backward: layer ", i, ": maps, norms and grad_maps must be floating");
    // small [N, HW] / [N] tensors: bring them to the accumulation dtype, contiguous (grad_maps
    // may be an expanded view, e.g. the gradient of a sum)
    m_c[i] = maps[i].to(acc).contiguous();
    n_c[i] = norms[i].to(acc).contiguous();
    g_c[i] = grad_maps[i].to(acc).contiguous();
    grads.push_back(at::empty(feats[i].sizes(), f.t.options(),
                              f.layout == ddk::kNHWC ? at::MemoryFormat::ChannelsLast
                                                     : at::MemoryFormat::Contiguous));
  }
  for (const auto& idx : launch_groups(fs)) {
    dispatch(fs[idx[0]].t.scalar_type(), [&](auto tag) {
      using scalar_t = decltype(tag);
      run_backward_group<scalar_t>(fs, idx, m_c, n_c, g_c, grads, power, scope.sms, scope.stream);
    });
  }
  return grads;
}

#if !defined(DATADAM_FAST_HOST_EMULATION)
// Dispatcher registration: datadam_fast::cuda_fwd / cuda_bwd, CUDA kernels (schemas in a fragment:
// the namespace is shared with the ops datadam_fast/ops.py defines in Python). Fake kernels and
// the autograd formula are registered in Python (datadam_fast/backends/cuda.py). The emulated
// test build (CPU tensors) registers nothing: it is reached through the pybind functions below.
namespace {
std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> cuda_fwd(at::TensorList feats, double p) {
  return spatial_attention_forward(feats.vec(), p);
}
std::vector<at::Tensor> cuda_bwd(at::TensorList feats, at::TensorList maps, at::TensorList norms,
                                 at::TensorList grad_maps, double p) {
  return spatial_attention_backward(feats.vec(), maps.vec(), norms.vec(), grad_maps.vec(), p);
}
}  // namespace

TORCH_LIBRARY_FRAGMENT(datadam_fast, m) {
  m.def("cuda_fwd(Tensor[] feats, float power) -> (Tensor[] maps, Tensor[] norms)");
  m.def("cuda_bwd(Tensor[] feats, Tensor[] maps, Tensor[] norms, Tensor[] grad_maps, float power) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(datadam_fast, CUDA, m) {
  m.impl("cuda_fwd", &cuda_fwd);
  m.impl("cuda_bwd", &cuda_bwd);
}
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "datadam-fast CUDA kernels: grouped spatial attention forward/backward "
            "(torch.ops.datadam_fast.cuda_fwd / cuda_bwd; the functions here serve the emulated test build)";
  m.def("forward", &spatial_attention_forward,
        "forward(feats, power) -> (maps, norms): L2-normalised sum_c |f|^p maps of every layer",
        py::arg("feats"), py::arg("power"));
  m.def("backward", &spatial_attention_backward,
        "backward(feats, maps, norms, grad_maps, power) -> grads (dtype/memory format of feats)",
        py::arg("feats"), py::arg("maps"), py::arg("norms"), py::arg("grad_maps"), py::arg("power"));
  m.attr("MAX_LAYERS_PER_LAUNCH") = ddk::kMaxLayers;
  m.attr("EMULATED") = kEmulated;
  m.attr("NORM_EPS") = ddk::kNormEps;
#if defined(DATADAM_FAST_HOST_EMULATION)
  m.def("_set_emulated_num_sms", [](int v) { g_emulated_sms = v > 0 ? v : 1; });
#endif
}

#endif  // !defined(__CUDA_ARCH__)
