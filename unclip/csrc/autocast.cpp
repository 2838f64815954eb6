// libtorch's autocast switches for any device type (tch 0.26 exposes only CUDA's), for the
// training loop's `run.precision`. Every function catches C++ exceptions: nothing unwinds into
// Rust.
#include <c10/core/DeviceType.h>
#include <c10/core/ScalarType.h>

#include <cstdint>
#include <exception>

// Declared exactly as in ATen/autocast_mode.h, which is not included: it pulls in all of ATen
// and would cost every build a minute of compiling for seven declarations. A mismatch with the
// linked libtorch fails the link, it cannot go unnoticed.
namespace at::autocast {
bool is_autocast_enabled(c10::DeviceType device_type);
void set_autocast_enabled(c10::DeviceType device_type, bool enabled);
c10::ScalarType get_autocast_dtype(c10::DeviceType device_type);
void set_autocast_dtype(c10::DeviceType device_type, c10::ScalarType dtype);
void clear_cache();
int increment_nesting();
int decrement_nesting();
}  // namespace at::autocast

extern "C" {

// Enters an autocast region on `device_type` (c10::DeviceType) in `dtype` (c10::ScalarType);
// stores the previous state for unclip_autocast_exit. Returns 0, or -1 on a C++ exception.
int unclip_autocast_enter(int8_t device_type, int8_t dtype, int8_t* was_enabled,
                          int8_t* was_dtype) {
  try {
    auto d = static_cast<c10::DeviceType>(device_type);
    *was_enabled = at::autocast::is_autocast_enabled(d) ? 1 : 0;
    *was_dtype = static_cast<int8_t>(at::autocast::get_autocast_dtype(d));
    at::autocast::set_autocast_dtype(d, static_cast<c10::ScalarType>(dtype));
    at::autocast::set_autocast_enabled(d, true);
    at::autocast::increment_nesting();
    return 0;
  } catch (...) {
    return -1;
  }
}

// Leaves the region: restores the previous state; the outermost exit drops the cached casts of
// the weights (they change at the next optimizer step), as torch.autocast's exit does.
int unclip_autocast_exit(int8_t device_type, int8_t was_enabled, int8_t was_dtype) {
  try {
    auto d = static_cast<c10::DeviceType>(device_type);
    if (at::autocast::decrement_nesting() == 0) {
      at::autocast::clear_cache();
    }
    at::autocast::set_autocast_enabled(d, was_enabled != 0);
    at::autocast::set_autocast_dtype(d, static_cast<c10::ScalarType>(was_dtype));
    return 0;
  } catch (...) {
    return -1;
  }
}
}
