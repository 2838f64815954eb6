//! The crate's only unsafe code: the C interface of csrc/dist_shim.cpp and owning handles for
//! its stores and process groups. Each function here checks nothing about user input (pg.rs does)
//! but guarantees memory safety: handles are freed once, strings are NUL-terminated copies, C++
//! errors come back as `Err(String)` (the shim catches every exception; nothing unwinds here).

use std::ffi::{CStr, CString, c_char, c_int, c_void};
use std::ptr::{self, NonNull};

use tch::Tensor;

#[repr(C)]
struct RawStore {
    _opaque: [u8; 0],
}

#[repr(C)]
struct RawPg {
    _opaque: [u8; 0],
}

pub(crate) const GLOO: c_int = 0;
pub(crate) const NCCL: c_int = 1;
pub(crate) const SUM: c_int = 0;
pub(crate) const AVG: c_int = 1;
pub(crate) const MIN: c_int = 2;
pub(crate) const MAX: c_int = 3;

unsafe extern "C" {
    fn udist_has_nccl() -> c_int;
    fn udist_free_error(err: *mut c_char);
    fn udist_tcp_store_new(
        host: *const c_char,
        port: u16,
        is_server: c_int,
        world_size: c_int,
        timeout_ms: i64,
        out: *mut *mut RawStore,
        bound_port: *mut u16,
        err: *mut *mut c_char,
    ) -> c_int;
    fn udist_file_store_new(
        path: *const c_char,
        world_size: c_int,
        timeout_ms: i64,
        out: *mut *mut RawStore,
        err: *mut *mut c_char,
    ) -> c_int;
    fn udist_store_free(store: *mut RawStore);
    fn udist_pg_new(
        store: *mut RawStore,
        backend: c_int,
        rank: c_int,
        world_size: c_int,
        timeout_ms: i64,
        device_index: c_int,
        hostname: *const c_char,
        out: *mut *mut RawPg,
        err: *mut *mut c_char,
    ) -> c_int;
    fn udist_pg_free(pg: *mut RawPg);
    fn udist_all_reduce(
        pg: *mut RawPg,
        tensor: *mut c_void,
        op: c_int,
        err: *mut *mut c_char,
    ) -> c_int;
    fn udist_broadcast(
        pg: *mut RawPg,
        tensor: *mut c_void,
        root: c_int,
        err: *mut *mut c_char,
    ) -> c_int;
    fn udist_all_gather(
        pg: *mut RawPg,
        outputs: *mut *mut c_void,
        n_outputs: c_int,
        input: *mut c_void,
        err: *mut *mut c_char,
    ) -> c_int;
    fn udist_barrier(pg: *mut RawPg, err: *mut *mut c_char) -> c_int;
}

/// Turns the shim's (return code, error string) into a `Result`, freeing the string.
fn check(rc: c_int, err: *mut c_char) -> Result<(), String> {
    if rc == 0 {
        return Ok(());
    }
    if err.is_null() {
        return Err("c10d failed without a message".into());
    }
    // SAFETY: the shim stores a malloc'd NUL-terminated copy in `err` on failure; we own it.
    let msg = unsafe { CStr::from_ptr(err) }.to_string_lossy().into_owned();
    // SAFETY: freed exactly once, with the shim's allocator.
    unsafe { udist_free_error(err) };
    Err(msg)
}

fn c_string(what: &str, s: &str) -> Result<CString, String> {
    CString::new(s).map_err(|_| format!("{what} {s:?} contains a NUL byte"))
}

pub(crate) fn has_nccl() -> bool {
    // SAFETY: no arguments, no state.
    unsafe { udist_has_nccl() != 0 }
}

/// A c10d store (TCPStore or FileStore). c10d stores are internally synchronised.
pub(crate) struct StoreHandle(NonNull<RawStore>);

// SAFETY: the handle owns a c10::intrusive_ptr<c10d::Store>; c10d stores may be used and freed from
// any thread.
unsafe impl Send for StoreHandle {}

impl Drop for StoreHandle {
    fn drop(&mut self) {
        // SAFETY: created by the shim, freed once here.
        unsafe { udist_store_free(self.0.as_ptr()) }
    }
}

/// Connects to (or, with `is_server`, also starts) a TCPStore; returns it and its port.
pub(crate) fn tcp_store(
    host: &str,
    port: u16,
    is_server: bool,
    world_size: i32,
    timeout_ms: i64,
) -> Result<(StoreHandle, u16), String> {
    let host = c_string("host", host)?;
    let mut out = ptr::null_mut();
    let mut bound = 0u16;
    let mut err = ptr::null_mut();
    // SAFETY: valid C string and out-pointers that live across the call.
    let rc = unsafe {
        udist_tcp_store_new(
            host.as_ptr(),
            port,
            c_int::from(is_server),
            world_size,
            timeout_ms,
            &mut out,
            &mut bound,
            &mut err,
        )
    };
    check(rc, err)?;
    let handle = NonNull::new(out).ok_or("TCPStore: null handle")?;
    Ok((StoreHandle(handle), bound))
}

/// Opens a FileStore at `path` shared by `world_size` processes.
pub(crate) fn file_store(
    path: &str,
    world_size: i32,
    timeout_ms: i64,
) -> Result<StoreHandle, String> {
    let path = c_string("path", path)?;
    let mut out = ptr::null_mut();
    let mut err = ptr::null_mut();
    // SAFETY: valid C string and out-pointers that live across the call.
    let rc =
        unsafe { udist_file_store_new(path.as_ptr(), world_size, timeout_ms, &mut out, &mut err) };
    check(rc, err)?;
    Ok(StoreHandle(NonNull::new(out).ok_or("FileStore: null handle")?))
}

/// A c10d backend (ProcessGroupGloo or ProcessGroupNCCL). It keeps its store alive itself.
pub(crate) struct PgHandle(NonNull<RawPg>);

// SAFETY: c10d backends may be used from and dropped on another thread than the creator's. The
// handle is deliberately not `Sync`: collectives must be issued in the same order on every rank,
// which concurrent callers could not guarantee.
unsafe impl Send for PgHandle {}

impl Drop for PgHandle {
    fn drop(&mut self) {
        // SAFETY: created by the shim, freed once here.
        unsafe { udist_pg_free(self.0.as_ptr()) }
    }
}

pub(crate) struct PgArgs<'a> {
    pub backend: c_int,
    pub rank: i32,
    pub world_size: i32,
    pub timeout_ms: i64,
    pub device_index: i32,
    pub hostname: Option<&'a str>,
}

pub(crate) fn process_group(store: &StoreHandle, args: &PgArgs) -> Result<PgHandle, String> {
    let hostname = args.hostname.map(|h| c_string("hostname", h)).transpose()?;
    let mut out = ptr::null_mut();
    let mut err = ptr::null_mut();
    // SAFETY: the store handle is alive for the call (the group takes its own reference), the
    // hostname is a valid C string or null.
    let rc = unsafe {
        udist_pg_new(
            store.0.as_ptr(),
            args.backend,
            args.rank,
            args.world_size,
            args.timeout_ms,
            args.device_index,
            hostname.as_ref().map_or(ptr::null(), |h| h.as_ptr()),
            &mut out,
            &mut err,
        )
    };
    check(rc, err)?;
    Ok(PgHandle(NonNull::new(out).ok_or("process group: null handle")?))
}

impl PgHandle {
    /// In-place all-reduce of one tensor.
    pub(crate) fn all_reduce(&self, tensor: &mut Tensor, op: c_int) -> Result<(), String> {
        let mut err = ptr::null_mut();
        // SAFETY: `tensor` is a live at::Tensor borrowed mutably for the (blocking) call.
        let rc =
            unsafe { udist_all_reduce(self.0.as_ptr(), tensor.as_mut_ptr().cast(), op, &mut err) };
        check(rc, err)
    }

    /// In-place broadcast of one tensor from `root`.
    pub(crate) fn broadcast(&self, tensor: &mut Tensor, root: i32) -> Result<(), String> {
        let mut err = ptr::null_mut();
        // SAFETY: as in all_reduce.
        let rc =
            unsafe { udist_broadcast(self.0.as_ptr(), tensor.as_mut_ptr().cast(), root, &mut err) };
        check(rc, err)
    }

    /// Gathers `input` of every rank into `outputs` (one per rank, shaped like `input`).
    pub(crate) fn all_gather(&self, outputs: &mut [Tensor], input: &Tensor) -> Result<(), String> {
        let mut ptrs: Vec<*mut c_void> =
            outputs.iter_mut().map(|t| t.as_mut_ptr().cast()).collect();
        let n = c_int::try_from(ptrs.len()).map_err(|_| "too many outputs".to_string())?;
        let mut err = ptr::null_mut();
        // SAFETY: every output is borrowed mutably and alive for the blocking call; c10d only
        // reads `input` (the C signature is not const-qualified).
        let rc = unsafe {
            udist_all_gather(
                self.0.as_ptr(),
                ptrs.as_mut_ptr(),
                n,
                input.as_ptr() as *mut c_void,
                &mut err,
            )
        };
        check(rc, err)
    }

    pub(crate) fn barrier(&self) -> Result<(), String> {
        let mut err = ptr::null_mut();
        // SAFETY: a live handle; no other arguments.
        let rc = unsafe { udist_barrier(self.0.as_ptr(), &mut err) };
        check(rc, err)
    }
}
