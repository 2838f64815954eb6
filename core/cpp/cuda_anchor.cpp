// The CUDA anchor of unclip-core (see build.rs): one call into libtorch_cuda.so, so that the
// linker keeps that library in every binary that uses unclip-core's device selection, and a way
// to hear libtorch's own reason when CUDA cannot be used.
//
// Declared here rather than through <ATen/cuda/CUDAContext.h>, which needs the CUDA toolkit's
// headers: `int at::cuda::warp_size()` is exported by libtorch_cuda.so
// (mangled _ZN2at4cuda9warp_sizeEv). It reads the current device's properties, so it throws
// libtorch's CUDA error when there is no usable device.
#include <cstddef>
#include <cstring>
#include <exception>

namespace at {
namespace cuda {
int warp_size();
}  // namespace cuda
}  // namespace at

namespace {
// Copies the first line of `text` into `out` (always NUL-terminated when capacity > 0).
void copy_first_line(const char* text, char* out, size_t capacity) {
  if (out == nullptr || capacity == 0) return;
  size_t n = 0;
  while (text[n] != '\0' && text[n] != '\n' && n + 1 < capacity) n++;
  std::memcpy(out, text, n);
  out[n] = '\0';
}
}  // namespace

// The current CUDA device's warp size, or -1 with libtorch's error message in `message`.
// Never lets a C++ exception cross into Rust.
extern "C" int unclip_cuda_warp_size(char* message, size_t capacity) {
  try {
    return at::cuda::warp_size();
  } catch (const std::exception& e) {
    copy_first_line(e.what(), message, capacity);
  } catch (...) {
    copy_first_line("unknown C++ exception from libtorch_cuda", message, capacity);
  }
  return -1;
}
