//! A minimal binding of the CUDA driver API, loaded at run time.
//!
//! The driver library (`libcuda.so.1`, else `libcuda.so`) is opened with `libloading` when
//! [`Cuda::open`] is called, so a binary built with this module runs on machines without a
//! GPU: there `open` returns [`CudaError::NoDriver`] or [`CudaError::NoDevice`], never panics.
//!
//! Lifetimes: [`Cuda`], every [`Module`] and every [`DeviceBuffer`] share one handle on the
//! library and on device 0's primary context; the context is released when the last of them
//! is dropped, so buffers and modules may outlive the `Cuda` they came from. A [`Function`] is
//! a plain copy of a driver handle: it is valid only while its `Module` lives. None of these
//! types is `Send` or `Sync`: use them on the thread that called `open` (its current context).

use std::ffi::{c_char, c_int, c_uint, c_void, CStr, CString};
use std::ptr;
use std::rc::Rc;

use libloading::Library;

#[derive(Debug, thiserror::Error)]
pub enum CudaError {
    /// The driver library could not be opened (or lacks a needed function).
    #[error("{0}")]
    NoDriver(String),
    /// The driver works but reports no device.
    #[error("the CUDA driver reports no device")]
    NoDevice,
    /// A driver call failed.
    #[error("CUDA call {call} failed: {name} (code {code})")]
    Call { call: &'static str, code: i32, name: String },
    /// `cuModuleLoadDataEx` failed; `log` is the JIT (ptxas) error log.
    #[error("CUDA could not load the PTX module (code {code}): {log}")]
    Jit { code: i32, log: String },
    /// Bounds or size misuse caught before calling the driver.
    #[error("CUDA misuse: {0}")]
    Misuse(String),
}

type CuResult = c_int;
type CuDevice = c_int;
type Handle = *mut c_void; // CUcontext, CUmodule, CUfunction, CUstream
type DevPtr = u64;

const CUDA_SUCCESS: CuResult = 0;
const CUDA_ERROR_NO_DEVICE: CuResult = 100;
const ATTR_CC_MAJOR: c_int = 75;
const ATTR_CC_MINOR: c_int = 76;
const JIT_ERROR_LOG_BUFFER: c_int = 5;
const JIT_ERROR_LOG_BUFFER_SIZE_BYTES: c_int = 6;
const FUNC_ATTR_MAX_DYNAMIC_SHARED: c_int = 8;
/// Dynamic shared memory above this needs the opt-in attribute.
const DEFAULT_MAX_SHARED: u32 = 48 * 1024;
const JIT_LOG_BYTES: usize = 16 * 1024;

#[cfg(windows)]
const LIBRARIES: &[&str] = &["nvcuda.dll"];
#[cfg(not(windows))]
const LIBRARIES: &[&str] = &["libcuda.so.1", "libcuda.so"];

/// The driver's entry points, each copied out of `lib`, which is kept alive beside them.
#[allow(clippy::type_complexity)]
struct Api {
    init: unsafe extern "C" fn(c_uint) -> CuResult,
    device_get_count: unsafe extern "C" fn(*mut c_int) -> CuResult,
    device_get: unsafe extern "C" fn(*mut CuDevice, c_int) -> CuResult,
    device_get_name: unsafe extern "C" fn(*mut c_char, c_int, CuDevice) -> CuResult,
    device_get_attribute: unsafe extern "C" fn(*mut c_int, c_int, CuDevice) -> CuResult,
    primary_ctx_retain: unsafe extern "C" fn(*mut Handle, CuDevice) -> CuResult,
    primary_ctx_release: unsafe extern "C" fn(CuDevice) -> CuResult,
    ctx_set_current: unsafe extern "C" fn(Handle) -> CuResult,
    ctx_synchronize: unsafe extern "C" fn() -> CuResult,
    module_load_data_ex:
        unsafe extern "C" fn(*mut Handle, *const c_void, c_uint, *mut c_int, *mut *mut c_void) -> CuResult,
    module_unload: unsafe extern "C" fn(Handle) -> CuResult,
    module_get_function: unsafe extern "C" fn(*mut Handle, Handle, *const c_char) -> CuResult,
    func_set_attribute: Option<unsafe extern "C" fn(Handle, c_int, c_int) -> CuResult>,
    mem_alloc: unsafe extern "C" fn(*mut DevPtr, usize) -> CuResult,
    mem_free: unsafe extern "C" fn(DevPtr) -> CuResult,
    memcpy_htod: unsafe extern "C" fn(DevPtr, *const c_void, usize) -> CuResult,
    memcpy_dtoh: unsafe extern "C" fn(*mut c_void, DevPtr, usize) -> CuResult,
    memcpy_dtod: unsafe extern "C" fn(DevPtr, DevPtr, usize) -> CuResult,
    memset_d8: unsafe extern "C" fn(DevPtr, u8, usize) -> CuResult,
    launch_kernel: unsafe extern "C" fn(
        Handle,
        c_uint,
        c_uint,
        c_uint,
        c_uint,
        c_uint,
        c_uint,
        c_uint,
        Handle,
        *mut *mut c_void,
        *mut *mut c_void,
    ) -> CuResult,
    get_error_name: unsafe extern "C" fn(CuResult, *mut *const c_char) -> CuResult,
    get_error_string: unsafe extern "C" fn(CuResult, *mut *const c_char) -> CuResult,
    /// Streams and graphs: optional (a driver without them runs launches one by one).
    graphs: Option<GraphApi>,
    _lib: Library,
}

/// The stream-capture and graph entry points (CUDA 11.4+ names).
struct GraphApi {
    stream_create: unsafe extern "C" fn(*mut Handle, c_uint) -> CuResult,
    stream_destroy: unsafe extern "C" fn(Handle) -> CuResult,
    stream_synchronize: unsafe extern "C" fn(Handle) -> CuResult,
    begin_capture: unsafe extern "C" fn(Handle, c_int) -> CuResult,
    end_capture: unsafe extern "C" fn(Handle, *mut Handle) -> CuResult,
    instantiate: unsafe extern "C" fn(*mut Handle, Handle, u64) -> CuResult,
    graph_launch: unsafe extern "C" fn(Handle, Handle) -> CuResult,
    exec_destroy: unsafe extern "C" fn(Handle) -> CuResult,
    graph_destroy: unsafe extern "C" fn(Handle) -> CuResult,
}

/// `CU_STREAM_CAPTURE_MODE_RELAXED`: capture does not forbid other threads' calls.
const CAPTURE_RELAXED: c_int = 2;

impl Api {
    fn load() -> Result<Api, CudaError> {
        let mut first_err = None;
        for &name in LIBRARIES {
            // SAFETY: loading the NVIDIA driver library runs its initialisers, which have no
            // preconditions on our side.
            match unsafe { Library::new(name) } {
                Ok(lib) => return Api::bind(lib, name),
                Err(e) => first_err = first_err.or(Some((name, e.to_string()))),
            }
        }
        let (name, err) = first_err.unwrap_or(("libcuda", "not found".into()));
        let detail = if err.contains(name) { err } else { format!("{name}: {err}") };
        Err(CudaError::NoDriver(format!("no CUDA driver on this machine ({detail})")))
    }

    fn bind(lib: Library, libname: &str) -> Result<Api, CudaError> {
        macro_rules! sym {
            ($name:literal) => {
                // SAFETY: the symbol is the CUDA 12 driver function of that name, and the
                // pointer type it is read as (the field's) is its prototype in cuda.h. The
                // copied pointer stays valid because `lib` is stored in the same `Api`.
                match unsafe { lib.get(concat!($name, "\0").as_bytes()) } {
                    Ok(s) => Some(*s),
                    Err(_) => None,
                }
            };
        }
        macro_rules! need {
            ($name:literal) => {
                sym!($name).ok_or_else(|| {
                    CudaError::NoDriver(format!(
                        "no usable CUDA driver on this machine ({libname} lacks {}; driver too old?)",
                        $name
                    ))
                })?
            };
        }
        Ok(Api {
            init: need!("cuInit"),
            device_get_count: need!("cuDeviceGetCount"),
            device_get: need!("cuDeviceGet"),
            device_get_name: need!("cuDeviceGetName"),
            device_get_attribute: need!("cuDeviceGetAttribute"),
            primary_ctx_retain: need!("cuDevicePrimaryCtxRetain"),
            primary_ctx_release: need!("cuDevicePrimaryCtxRelease_v2"),
            ctx_set_current: need!("cuCtxSetCurrent"),
            ctx_synchronize: need!("cuCtxSynchronize"),
            module_load_data_ex: need!("cuModuleLoadDataEx"),
            module_unload: need!("cuModuleUnload"),
            module_get_function: need!("cuModuleGetFunction"),
            func_set_attribute: sym!("cuFuncSetAttribute"),
            mem_alloc: need!("cuMemAlloc_v2"),
            mem_free: need!("cuMemFree_v2"),
            memcpy_htod: need!("cuMemcpyHtoD_v2"),
            memcpy_dtoh: need!("cuMemcpyDtoH_v2"),
            memcpy_dtod: need!("cuMemcpyDtoD_v2"),
            memset_d8: need!("cuMemsetD8_v2"),
            launch_kernel: need!("cuLaunchKernel"),
            get_error_name: need!("cuGetErrorName"),
            get_error_string: need!("cuGetErrorString"),
            graphs: (|| {
                Some(GraphApi {
                    stream_create: sym!("cuStreamCreate")?,
                    stream_destroy: sym!("cuStreamDestroy_v2")?,
                    stream_synchronize: sym!("cuStreamSynchronize")?,
                    begin_capture: sym!("cuStreamBeginCapture_v2")?,
                    end_capture: sym!("cuStreamEndCapture")?,
                    instantiate: sym!("cuGraphInstantiateWithFlags")?,
                    graph_launch: sym!("cuGraphLaunch")?,
                    exec_destroy: sym!("cuGraphExecDestroy")?,
                    graph_destroy: sym!("cuGraphDestroy")?,
                })
            })(),
            _lib: lib,
        })
    }

    /// `Ok` for `CUDA_SUCCESS`, else the error named by the driver.
    fn check(&self, call: &'static str, code: CuResult) -> Result<(), CudaError> {
        if code == CUDA_SUCCESS {
            return Ok(());
        }
        let text = |f: unsafe extern "C" fn(CuResult, *mut *const c_char) -> CuResult| {
            let mut p: *const c_char = ptr::null();
            // SAFETY: `f` writes a pointer to a static NUL-terminated driver string, or fails
            // and leaves `p` null (checked before reading).
            let ok = unsafe { f(code, &mut p) } == CUDA_SUCCESS && !p.is_null();
            // SAFETY: `p` is non-null and points at a static C string owned by the driver.
            ok.then(|| unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
        };
        let name = match (text(self.get_error_name), text(self.get_error_string)) {
            (Some(n), Some(s)) => format!("{n}: {s}"),
            (Some(n), None) => n,
            (None, Some(s)) => s,
            (None, None) => "unknown CUresult".into(),
        };
        Err(CudaError::Call { call, code, name })
    }
}

/// The library plus the retained primary context of one device; released on drop, when the
/// last `Cuda`, `Module` or `DeviceBuffer` holding it goes.
struct Context {
    api: Api,
    device: CuDevice,
}

impl Drop for Context {
    fn drop(&mut self) {
        // SAFETY: `open` retained this device's primary context exactly once for this `Context`.
        unsafe { (self.api.primary_ctx_release)(self.device) };
    }
}

/// Device 0 of the CUDA driver, its primary context current on the calling thread.
pub struct Cuda {
    ctx: Rc<Context>,
    name: String,
    cc: (i32, i32),
}

impl Cuda {
    /// Opens the driver, initialises it and makes device 0's primary context current.
    pub fn open() -> Result<Cuda, CudaError> {
        let api = Api::load()?;
        // SAFETY: cuInit takes flags 0 and no pointers.
        match unsafe { (api.init)(0) } {
            CUDA_ERROR_NO_DEVICE => return Err(CudaError::NoDevice),
            code => api.check("cuInit", code)?,
        }
        let mut count: c_int = 0;
        // SAFETY: `count` is a valid out-pointer for one int.
        api.check("cuDeviceGetCount", unsafe { (api.device_get_count)(&mut count) })?;
        if count <= 0 {
            return Err(CudaError::NoDevice);
        }
        let mut device: CuDevice = 0;
        // SAFETY: `device` is a valid out-pointer; ordinal 0 < count.
        api.check("cuDeviceGet", unsafe { (api.device_get)(&mut device, 0) })?;
        let mut raw = [0 as c_char; 256];
        // SAFETY: `raw` holds `raw.len()` bytes; the driver writes a NUL-terminated name into it.
        api.check("cuDeviceGetName", unsafe { (api.device_get_name)(raw.as_mut_ptr(), raw.len() as c_int, device) })?;
        raw[raw.len() - 1] = 0;
        // SAFETY: `raw` is NUL-terminated (last byte forced to 0 above).
        let name = unsafe { CStr::from_ptr(raw.as_ptr()) }.to_string_lossy().into_owned();
        let mut cc = (0, 0);
        for (out, attr) in [(&mut cc.0, ATTR_CC_MAJOR), (&mut cc.1, ATTR_CC_MINOR)] {
            // SAFETY: `out` is a valid out-pointer for one int; `device` came from cuDeviceGet.
            let code = unsafe { (api.device_get_attribute)(out, attr, device) };
            api.check("cuDeviceGetAttribute", code)?;
        }
        let mut raw_ctx: Handle = ptr::null_mut();
        // SAFETY: `raw_ctx` is a valid out-pointer; `device` came from cuDeviceGet.
        api.check("cuDevicePrimaryCtxRetain", unsafe { (api.primary_ctx_retain)(&mut raw_ctx, device) })?;
        // From here the `Context` owns the retain: its Drop releases it on any error below.
        let ctx = Rc::new(Context { api, device });
        // SAFETY: `raw_ctx` is the primary context just retained, alive while `ctx` lives.
        ctx.api.check("cuCtxSetCurrent", unsafe { (ctx.api.ctx_set_current)(raw_ctx) })?;
        Ok(Cuda { ctx, name, cc })
    }

    pub fn device_name(&self) -> String {
        self.name.clone()
    }

    /// (major, minor), e.g. (9, 0) for an H100.
    pub fn compute_capability(&self) -> (i32, i32) {
        self.cc
    }

    /// JIT-compiles `ptx` (NUL-terminated copy made here); on failure the error carries the
    /// ptxas log.
    pub fn load_module(&self, ptx: &str) -> Result<Module, CudaError> {
        let image = CString::new(ptx).map_err(|_| CudaError::Misuse("PTX text contains a NUL byte".into()))?;
        let mut log = vec![0u8; JIT_LOG_BYTES];
        let mut options = [JIT_ERROR_LOG_BUFFER, JIT_ERROR_LOG_BUFFER_SIZE_BYTES];
        // The size option's value is the integer itself, stored in the pointer-sized slot.
        let mut values = [log.as_mut_ptr() as *mut c_void, (JIT_LOG_BYTES - 1) as *mut c_void];
        let mut module: Handle = ptr::null_mut();
        // SAFETY: `image` is a NUL-terminated PTX text; `options`/`values` are two matching
        // entries; the log buffer has the announced size and outlives the call.
        let code = unsafe {
            (self.ctx.api.module_load_data_ex)(
                &mut module,
                image.as_ptr() as *const c_void,
                options.len() as c_uint,
                options.as_mut_ptr(),
                values.as_mut_ptr(),
            )
        };
        if code != CUDA_SUCCESS {
            let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
            let mut text = String::from_utf8_lossy(&log[..end]).trim().to_string();
            if text.is_empty() {
                text = match self.ctx.api.check("cuModuleLoadDataEx", code) {
                    Err(CudaError::Call { name, .. }) => name,
                    _ => "no JIT log".into(),
                };
            }
            return Err(CudaError::Jit { code, log: text });
        }
        Ok(Module { ctx: self.ctx.clone(), raw: module })
    }

    /// A zero-filled device allocation of `bytes` (at least 1 byte is allocated).
    pub fn alloc(&self, bytes: usize) -> Result<DeviceBuffer, CudaError> {
        let api = &self.ctx.api;
        let size = bytes.max(1);
        let mut ptr: DevPtr = 0;
        // SAFETY: `ptr` is a valid out-pointer; the primary context is current on this thread.
        api.check("cuMemAlloc_v2", unsafe { (api.mem_alloc)(&mut ptr, size) })?;
        let buf = DeviceBuffer { ctx: self.ctx.clone(), ptr, len: bytes };
        // SAFETY: [ptr, ptr+size) is the allocation just made.
        api.check("cuMemsetD8_v2", unsafe { (api.memset_d8)(ptr, 0, size) })?;
        Ok(buf)
    }

    pub fn synchronize(&self) -> Result<(), CudaError> {
        // SAFETY: no arguments; a context is current.
        self.ctx.api.check("cuCtxSynchronize", unsafe { (self.ctx.api.ctx_synchronize)() })
    }

    /// Launches `f` on `grid` blocks of `block` threads with `shared_bytes` dynamic shared
    /// memory (0 is the usual: kernels declare static shared arrays), passing each u64 in
    /// `args` as one `.param .u64` kernel parameter (device pointers). Asynchronous on the
    /// default (null) stream; errors inside the kernel surface at a later synchronising call.
    /// `f`'s module must still be loaded, and `args` must match the kernel's parameter list.
    pub fn launch(&self, f: Function, grid: u32, block: u32, shared_bytes: u32, args: &[u64]) -> Result<(), CudaError> {
        self.launch_on(None, f, grid, block, shared_bytes, args)
    }

    /// A stream of its own (blocking: it waits for, and is waited for by, the default
    /// stream, so synchronous copies stay ordered with it). `None` when the driver has no
    /// stream and graph entry points.
    pub fn stream(&self) -> Result<Option<Stream>, CudaError> {
        let Some(g) = &self.ctx.api.graphs else { return Ok(None) };
        let mut raw: Handle = ptr::null_mut();
        // SAFETY: `raw` is a valid out-pointer; flags 0 is CU_STREAM_DEFAULT.
        self.ctx.api.check("cuStreamCreate", unsafe { (g.stream_create)(&mut raw, 0) })?;
        Ok(Some(Stream { ctx: self.ctx.clone(), raw }))
    }

    /// Records the launches `record` makes on `stream` (through [`Cuda::launch_on`]) into a
    /// graph, without running them; [`Graph::launch`] replays them all as one submission.
    pub fn capture(
        &self,
        stream: &Stream,
        record: &mut dyn FnMut(&Stream) -> Result<(), CudaError>,
    ) -> Result<Graph, CudaError> {
        let api = &self.ctx.api;
        let Some(g) = &api.graphs else { return Err(CudaError::Misuse("this driver has no graphs".into())) };
        // SAFETY: `stream.raw` is a live stream of this context.
        api.check("cuStreamBeginCapture_v2", unsafe { (g.begin_capture)(stream.raw, CAPTURE_RELAXED) })?;
        let recorded = record(stream);
        let mut graph: Handle = ptr::null_mut();
        // SAFETY: the stream is capturing (begun above); `graph` is a valid out-pointer. Capture
        // is ended even when recording failed, so the stream is usable again.
        let ended = api.check("cuStreamEndCapture", unsafe { (g.end_capture)(stream.raw, &mut graph) });
        if let Err(e) = recorded.and(ended) {
            if !graph.is_null() {
                // SAFETY: a graph the capture produced, destroyed once, here.
                unsafe { (g.graph_destroy)(graph) };
            }
            return Err(e);
        }
        let mut exec: Handle = ptr::null_mut();
        // SAFETY: `graph` is the graph just captured; `exec` a valid out-pointer; flags 0.
        let code = unsafe { (g.instantiate)(&mut exec, graph, 0) };
        if let Err(e) = api.check("cuGraphInstantiateWithFlags", code) {
            // SAFETY: `graph` was created by the capture above and is destroyed once.
            unsafe { (g.graph_destroy)(graph) };
            return Err(e);
        }
        Ok(Graph { ctx: self.ctx.clone(), graph, exec })
    }

    /// [`Cuda::launch`] on `stream` (`None`: the default stream).
    pub fn launch_on(
        &self,
        stream: Option<&Stream>,
        f: Function,
        grid: u32,
        block: u32,
        shared_bytes: u32,
        args: &[u64],
    ) -> Result<(), CudaError> {
        if grid == 0 || block == 0 || block > 1024 {
            return Err(CudaError::Misuse(format!("launch of {grid} blocks of {block} threads")));
        }
        let api = &self.ctx.api;
        if shared_bytes > DEFAULT_MAX_SHARED {
            let set = api.func_set_attribute.ok_or_else(|| {
                CudaError::Misuse("over 48 KiB dynamic shared memory needs cuFuncSetAttribute".into())
            })?;
            // SAFETY: `f.raw` is a function of a loaded module (documented precondition).
            let code = unsafe { set(f.raw, FUNC_ATTR_MAX_DYNAMIC_SHARED, shared_bytes as c_int) };
            api.check("cuFuncSetAttribute", code)?;
        }
        let mut args = args.to_vec();
        let mut params: Vec<*mut c_void> = args.iter_mut().map(|a| a as *mut u64 as *mut c_void).collect();
        // SAFETY: `params` holds one pointer per kernel parameter, each to a live u64 that the
        // driver copies before returning; `f.raw` is a function of a loaded module; the stream
        // is a live stream of this context or null (the default stream); a null `extra`
        // means none.
        let code = unsafe {
            (api.launch_kernel)(
                f.raw,
                grid,
                1,
                1,
                block,
                1,
                1,
                shared_bytes,
                stream.map_or(ptr::null_mut(), |s| s.raw),
                if params.is_empty() { ptr::null_mut() } else { params.as_mut_ptr() },
                ptr::null_mut(),
            )
        };
        api.check("cuLaunchKernel", code)
    }
}

/// A stream of the context; destroyed on drop.
pub struct Stream {
    ctx: Rc<Context>,
    raw: Handle,
}

impl Stream {
    /// Waits for everything submitted to the stream.
    pub fn synchronize(&self) -> Result<(), CudaError> {
        let api = &self.ctx.api;
        let g = api.graphs.as_ref().expect("a stream exists only with the graph entry points");
        // SAFETY: `self.raw` is a live stream.
        api.check("cuStreamSynchronize", unsafe { (g.stream_synchronize)(self.raw) })
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        if let Some(g) = &self.ctx.api.graphs {
            // SAFETY: the stream was created by `Cuda::stream` and is destroyed only here.
            unsafe { (g.stream_destroy)(self.raw) };
        }
    }
}

/// A captured sequence of launches, instantiated; destroyed on drop. The kernels it holds
/// must stay loaded while it is launched (their `Module` alive).
pub struct Graph {
    ctx: Rc<Context>,
    graph: Handle,
    exec: Handle,
}

impl Graph {
    /// Replays the recorded launches on `stream`, in order, as one submission.
    pub fn launch(&self, stream: &Stream) -> Result<(), CudaError> {
        let api = &self.ctx.api;
        let g = api.graphs.as_ref().expect("a graph exists only with the graph entry points");
        // SAFETY: `self.exec` is an instantiated graph of this context; `stream.raw` is live.
        api.check("cuGraphLaunch", unsafe { (g.graph_launch)(self.exec, stream.raw) })
    }
}

impl Drop for Graph {
    fn drop(&mut self) {
        if let Some(g) = &self.ctx.api.graphs {
            // SAFETY: both were created by `Cuda::capture` and are destroyed only here.
            unsafe {
                (g.exec_destroy)(self.exec);
                (g.graph_destroy)(self.graph);
            }
        }
    }
}

/// A loaded PTX module; unloaded on drop (its `Function`s become invalid then).
pub struct Module {
    ctx: Rc<Context>,
    raw: Handle,
}

impl Module {
    pub fn function(&self, name: &str) -> Result<Function, CudaError> {
        let cname =
            CString::new(name).map_err(|_| CudaError::Misuse(format!("kernel name {name:?} contains a NUL")))?;
        let mut raw: Handle = ptr::null_mut();
        // SAFETY: `self.raw` is a loaded module, `cname` NUL-terminated, `raw` an out-pointer.
        let code = unsafe { (self.ctx.api.module_get_function)(&mut raw, self.raw, cname.as_ptr()) };
        self.ctx.api.check("cuModuleGetFunction", code)?;
        Ok(Function { raw })
    }
}

impl Drop for Module {
    fn drop(&mut self) {
        // SAFETY: `self.raw` was loaded by `load_module` and is unloaded only here.
        unsafe { (self.ctx.api.module_unload)(self.raw) };
    }
}

/// A kernel handle (CUfunction). Valid only while the [`Module`] it came from is alive:
/// launching it after the module is dropped is a use of a dangling driver handle.
#[derive(Clone, Copy, Debug)]
pub struct Function {
    raw: Handle,
}

/// A device allocation of `len` bytes; freed on drop.
pub struct DeviceBuffer {
    ctx: Rc<Context>,
    ptr: DevPtr,
    len: usize,
}

impl DeviceBuffer {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The device address, to pass as a kernel argument.
    pub fn ptr(&self) -> u64 {
        self.ptr
    }

    fn range(&self, what: &str, offset: usize, len: usize) -> Result<DevPtr, CudaError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len => Ok(self.ptr + offset as u64),
            _ => Err(CudaError::Misuse(format!(
                "{what} of {len} bytes at offset {offset} past a buffer of {} bytes",
                self.len
            ))),
        }
    }

    /// Copies `data` to bytes `offset..offset + data.len()` (synchronous for the host).
    pub fn upload(&self, offset: usize, data: &[u8]) -> Result<(), CudaError> {
        let dst = self.range("upload", offset, data.len())?;
        if data.is_empty() {
            return Ok(());
        }
        // SAFETY: the destination range lies inside this allocation (checked); `data` is a
        // live host slice of the copied length.
        let code = unsafe { (self.ctx.api.memcpy_htod)(dst, data.as_ptr() as *const c_void, data.len()) };
        self.ctx.api.check("cuMemcpyHtoD_v2", code)
    }

    /// Copies bytes `offset..offset + out.len()` into `out`, after prior default-stream work.
    pub fn download(&self, offset: usize, out: &mut [u8]) -> Result<(), CudaError> {
        let src = self.range("download", offset, out.len())?;
        if out.is_empty() {
            return Ok(());
        }
        // SAFETY: the source range lies inside this allocation (checked); `out` is a live,
        // writable host slice of the copied length.
        let code = unsafe { (self.ctx.api.memcpy_dtoh)(out.as_mut_ptr() as *mut c_void, src, out.len()) };
        self.ctx.api.check("cuMemcpyDtoH_v2", code)
    }

    /// Device-to-device copy of `len` bytes from offset `from` to offset `to`; the two ranges
    /// must not overlap.
    pub fn copy_within(&self, from: usize, to: usize, len: usize) -> Result<(), CudaError> {
        let src = self.range("copy source", from, len)?;
        let dst = self.range("copy destination", to, len)?;
        if len == 0 {
            return Ok(());
        }
        if from < to + len && to < from + len {
            return Err(CudaError::Misuse(format!("overlapping copy of {len} bytes from {from} to {to}")));
        }
        // SAFETY: both ranges lie inside this allocation and are disjoint (checked).
        let code = unsafe { (self.ctx.api.memcpy_dtod)(dst, src, len) };
        self.ctx.api.check("cuMemcpyDtoD_v2", code)
    }
}

impl Drop for DeviceBuffer {
    fn drop(&mut self) {
        // SAFETY: `self.ptr` came from cuMemAlloc_v2 and is freed only here; the context it
        // lives in is kept alive by `self.ctx`.
        unsafe { (self.ctx.api.mem_free)(self.ptr) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `add_one(float* x, u64 n)`: x[i] += 1.0 for i < n, one thread per element.
    const ADD_ONE_PTX: &str = r#"
.version 7.8
.target sm_80
.address_size 64

.visible .entry add_one(
    .param .u64 add_one_param_0,
    .param .u64 add_one_param_1
)
{
    .reg .pred  %p<2>;
    .reg .f32   %f<3>;
    .reg .b32   %r<5>;
    .reg .b64   %rd<7>;

    ld.param.u64        %rd1, [add_one_param_0];
    ld.param.u64        %rd2, [add_one_param_1];
    mov.u32             %r1, %ctaid.x;
    mov.u32             %r2, %ntid.x;
    mov.u32             %r3, %tid.x;
    mad.lo.u32          %r4, %r1, %r2, %r3;
    cvt.u64.u32         %rd3, %r4;
    setp.ge.u64         %p1, %rd3, %rd2;
    @%p1 bra            $L_done;
    cvta.to.global.u64  %rd4, %rd1;
    shl.b64             %rd5, %rd3, 2;
    add.s64             %rd6, %rd4, %rd5;
    ld.global.f32       %f1, [%rd6];
    add.rn.f32          %f2, %f1, 0f3F800000;
    st.global.f32       [%rd6], %f2;
$L_done:
    ret;
}
"#;

    fn floats(bytes: &[u8]) -> Vec<f32> {
        bytes.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()
    }

    #[test]
    fn cuda_open_reports_or_runs() {
        let cuda = match Cuda::open() {
            Err(e @ (CudaError::NoDriver(_) | CudaError::NoDevice)) => {
                let msg = e.to_string();
                assert!(msg.contains("CUDA") && !msg.contains('\n'), "{msg}");
                eprintln!("no device: {msg}");
                return;
            }
            Err(e) => panic!("unexpected error opening CUDA: {e}"),
            Ok(cuda) => cuda,
        };
        eprintln!("device: {} sm_{:?}", cuda.device_name(), cuda.compute_capability());
        assert!(!cuda.device_name().is_empty() && cuda.compute_capability().0 >= 1);

        // Memory: zero fill, upload, device-to-device copy, download.
        const MIB: usize = 1 << 20;
        let buf = cuda.alloc(MIB).unwrap();
        assert_eq!(buf.len(), MIB);
        let half = MIB / 2;
        let pattern: Vec<u8> = (0..half).map(|i| (i * 7 + i / 251) as u8).collect();
        let mut back = vec![0xAAu8; MIB];
        buf.download(0, &mut back).unwrap();
        assert!(back.iter().all(|&b| b == 0), "alloc is not zero-filled");
        buf.upload(0, &pattern).unwrap();
        buf.copy_within(0, half, half).unwrap();
        buf.download(0, &mut back).unwrap();
        assert_eq!(&back[..half], &pattern[..]);
        assert_eq!(&back[half..], &pattern[..]);
        // Misuse is caught before the driver.
        assert!(matches!(buf.upload(MIB - 3, &[0; 4]), Err(CudaError::Misuse(_))));
        assert!(matches!(buf.upload(usize::MAX, &[0; 1]), Err(CudaError::Misuse(_))));
        assert!(matches!(buf.download(MIB, &mut [0; 1]), Err(CudaError::Misuse(_))));
        assert!(matches!(buf.copy_within(0, MIB - 10, 11), Err(CudaError::Misuse(_))));
        assert!(matches!(buf.copy_within(0, 10, 11), Err(CudaError::Misuse(_))));
        let empty = cuda.alloc(0).unwrap();
        assert_eq!(empty.len(), 0);
        empty.upload(0, &[]).unwrap();

        // A kernel: x[i] += 1 for i < n; x[n..] untouched.
        let module = cuda.load_module(ADD_ONE_PTX).unwrap();
        let f = module.function("add_one").unwrap();
        assert!(matches!(module.function("nope"), Err(CudaError::Call { .. })));
        let n = 1000usize;
        let xs: Vec<f32> = (0..n + 24).map(|i| i as f32 * 0.5).collect();
        let bytes: Vec<u8> = xs.iter().flat_map(|x| x.to_le_bytes()).collect();
        let dev = cuda.alloc(bytes.len()).unwrap();
        dev.upload(0, &bytes).unwrap();
        let block = 256u32;
        let grid = n.div_ceil(block as usize) as u32;
        cuda.launch(f, grid, block, 0, &[dev.ptr(), n as u64]).unwrap();
        cuda.synchronize().unwrap();
        let mut out = vec![0u8; bytes.len()];
        dev.download(0, &mut out).unwrap();
        let ys = floats(&out);
        for (i, (&x, &y)) in xs.iter().zip(&ys).enumerate() {
            let want = if i < n { x + 1.0 } else { x };
            assert_eq!(y, want, "element {i}");
        }

        // A PTX that fails to JIT reports the ptxas message.
        let bad = ADD_ONE_PTX.replace("add.rn.f32", "add.bogus.f32");
        match cuda.load_module(&bad) {
            Err(e @ CudaError::Jit { .. }) => {
                eprintln!("bad PTX: {e}");
                assert!(!e.to_string().is_empty());
            }
            Err(e) => panic!("expected a JIT error, got {e}"),
            Ok(_) => panic!("bogus PTX loaded"),
        }
        // Buffers and modules may outlive the `Cuda` they came from.
        drop(cuda);
        dev.download(0, &mut out).unwrap();
        drop(module);
    }
}
