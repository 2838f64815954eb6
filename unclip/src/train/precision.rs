//! `run.precision`: training's forward passes in bf16 (or f16 on CUDA) through libtorch's
//! autocast — matrix products and convolutions in the low precision, the ops autocast keeps in
//! f32 (losses, reductions) in f32 — while the weights, their gradients, AdamW and the EMA stay
//! f32 (master weights). tch 0.26 switches only CUDA's autocast, so a small C++ shim
//! (`csrc/autocast.cpp`) reaches libtorch's per-device switches; this module is its only caller.

use super::config::Precision;
use super::{Result, TrainError};
use tch::Device;

mod ffi {
    unsafe extern "C" {
        pub fn unclip_autocast_enter(
            device_type: i8,
            dtype: i8,
            was_enabled: *mut i8,
            was_dtype: *mut i8,
        ) -> i32;
        pub fn unclip_autocast_exit(device_type: i8, was_enabled: i8, was_dtype: i8) -> i32;
    }
}

/// c10::DeviceType of the devices autocast is offered on (validated by the config).
fn device_type(device: Device) -> Option<i8> {
    match device {
        Device::Cpu => Some(0),
        Device::Cuda(_) => Some(1),
        _ => None,
    }
}

/// c10::ScalarType codes.
fn dtype(p: Precision) -> Option<i8> {
    match p {
        Precision::F32 => None,
        Precision::F16 => Some(5),
        Precision::Bf16 => Some(15),
    }
}

/// An open autocast region; dropping it restores the previous state (also on an error).
struct Region {
    device_type: i8,
    was_enabled: i8,
    was_dtype: i8,
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: plain integers in, the shim catches every C++ exception.
        unsafe { ffi::unclip_autocast_exit(self.device_type, self.was_enabled, self.was_dtype) };
    }
}

/// Runs `f` under autocast in `precision` on `device` (`f32`: as it is).
pub(crate) fn autocast<T>(
    precision: Precision,
    device: Device,
    f: impl FnOnce() -> T,
) -> Result<T> {
    let Some(kind) = dtype(precision) else {
        return Ok(f());
    };
    let d = device_type(device).ok_or_else(|| {
        TrainError::stage("run", format!("run.precision: no autocast on {device:?}"))
    })?;
    let (mut was_enabled, mut was_dtype) = (0i8, 0i8);
    // SAFETY: the out-pointers are live locals; the shim catches every C++ exception.
    let rc = unsafe { ffi::unclip_autocast_enter(d, kind, &mut was_enabled, &mut was_dtype) };
    if rc != 0 {
        return Err(TrainError::stage(
            "run",
            format!("run.precision: libtorch refused autocast on {device:?}"),
        ));
    }
    let _region = Region { device_type: d, was_enabled, was_dtype };
    Ok(f())
}
