//! A simulating interpreter for GPU kernels of the kernel IR ([`run`]): it executes a
//! kernel with a launch shape ([`Kernel::launch`]) on byte buffers, as the GPU would, and
//! turns every access the GPU would not define into an error ([`SimError`]).
//!
//! **What it simulates.** Blocks run one after another; the threads of a block run in
//! lockstep (SIMT): each statement is executed for every *active* thread before the next.
//! A `For` whose bounds differ by thread keeps running while any thread is still inside it
//! (the others are masked off until it exits); an `If` masks off the threads whose condition
//! is false. Variables are per thread, shared memory per block, global buffers are the
//! caller's. Arithmetic follows the Cranelift emitter bit for bit where the kernel IR fixes
//! it (wrapping integers, `cvt` rounding half to even and saturating, saturating `narrow`,
//! exact `dot4`, `min`/`max` where a NaN loses); `exp` and `erf` are computed precisely
//! (`f32::exp`, a series in `f64`) and `fma` rounds once up to a rare last-bit difference
//! (a product exact in `f64`, then the sum), within the emitters' own error.
//!
//! **What it catches.** A GPU kernel is wrong when its result depends on the order in which
//! threads run, and lockstep execution alone would hide that (it picks one order, and a
//! missing barrier still reads the right value). So every access is checked against the
//! happens-before order a GPU guarantees, not against the order simulated:
//!
//! - an access (every lane of it) outside its buffer ([`SimError::OutOfBounds`]);
//! - in shared memory, a read of an element another thread wrote, or a write of an element
//!   another thread read or wrote, with no barrier between ([`SimError::SharedRace`]), and a
//!   read of an element no thread of the block has written ([`SimError::Uninit`]);
//! - in global memory, the same between two threads of different blocks (blocks never
//!   synchronise within a launch), or of one block with no barrier between
//!   ([`SimError::GlobalRace`]); reads of elements nobody writes are free;
//! - a barrier reached by only some threads of the block, a shuffle by only some lanes of a
//!   warp ([`SimError::DivergentBarrier`], [`SimError::DivergentShuffle`]);
//! - type errors, undefined variables (per thread: a `let` under an `if` that only some
//!   threads ran), integer division by zero, malformed IR: errors, never panics.
//!
//! Per element the trackers keep the last writer and its barrier epoch, and the last reader
//! and its epoch plus one more reader of that epoch and one reader of an earlier block: that
//! is exactly enough to decide, at each access, whether some earlier conflicting access is
//! unordered with it (a later barrier of the same block orders everything before it, so
//! older accesses need not be kept; blocks run one after another, so an earlier block's
//! accesses are all complete). Since the check is against the GPU's ordering and not the
//! simulated one, a kernel that passes computes the same result under every schedule of its
//! warps and blocks, for the input run (and for every input of its shapes when, as in the
//! kernels wcc builds, its indices and branches depend on shapes only, not on data). What it
//! cannot show is a wrong result the reference would share, or speed.

use std::fmt;

use crate::kir::{var_name, BinOp, Buffer, CmpOp, Elem, Expr, GpuIdx, Kernel, Stmt, Ty, UnOp, Var, END, START, WARP};

/// Where an error happened: the kernel, the block and thread (in the block), and the
/// statement being executed (its one-line text; a loop's or `if`'s header).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Site {
    pub kernel: String,
    pub block: u32,
    pub thread: u32,
    pub stmt: String,
}

impl fmt::Display for Site {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "kernel {}, block {}, thread {}, in `{}`", self.kernel, self.block, self.thread, self.stmt)
    }
}

/// The kind of a race: this thread's access after the other thread's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Race {
    /// A read of an element the other thread wrote.
    ReadAfterWrite,
    /// A write of an element the other thread read.
    WriteAfterRead,
    /// A write of an element the other thread wrote.
    WriteAfterWrite,
}

impl fmt::Display for Race {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Race::ReadAfterWrite => "read after a write",
            Race::WriteAfterRead => "write after a read",
            Race::WriteAfterWrite => "write after a write",
        })
    }
}

/// Why a simulated launch failed. Buffers are named by index (`buf`, as in the kernel's
/// text) and name; element indices count elements, not bytes.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SimError {
    /// The kernel has no launch shape: it is a CPU kernel.
    #[error("kernel {kernel}: not a GPU kernel (it has no launch shape)")]
    NotGpu { kernel: String },
    /// A launch no GPU runs: an empty grid, a block that is not a whole number of warps or
    /// over 1024 threads, more shared memory than any GPU gives a block, or more threads in
    /// all than the trackers number (2³² − 2).
    #[error("kernel {kernel}: cannot launch a grid of {grid} blocks of {block} threads: {why}")]
    Launch { kernel: String, grid: u32, block: u32, why: String },
    /// `run` was given a different number of buffers than the kernel takes.
    #[error("kernel {kernel}: given {got} buffers, it takes {expected}")]
    BufferCount { kernel: String, expected: usize, got: usize },
    /// A buffer given to `run` is shorter than the kernel's declaration of it.
    #[error("kernel {kernel}: buf{buf} {name} is given {got} bytes, it needs {need}")]
    BufferSize { kernel: String, buf: u32, name: String, need: usize, got: usize },
    /// A load (`store: false`) or store of `lanes` elements from `index` leaves the buffer.
    #[error(
        "{site}: {} of {lanes} element(s) at {index} of buf{buf} {name}, which has {len}",
        if *store { "store" } else { "load" }
    )]
    OutOfBounds { site: Site, buf: u32, name: String, index: i64, lanes: usize, len: usize, store: bool },
    /// An access to a shared-memory element that thread `other` of the same block accessed
    /// (`kind`: which two accesses) with no barrier between.
    #[error(
        "{site}: shared-memory race on element {index} of buf{buf} {name}: {kind} by thread {other}, \
         with no barrier between"
    )]
    SharedRace { site: Site, buf: u32, name: String, index: usize, kind: Race, other: u32 },
    /// An access to a global element that another thread (block `other_block`, thread
    /// `other_thread`) accessed in the same launch, unordered: in another block (blocks do
    /// not synchronise), or in this block with no barrier between.
    #[error(
        "{site}: global-memory race on element {index} of buf{buf} {name}: {kind} by block {other_block} \
         thread {other_thread}, unordered within the launch"
    )]
    GlobalRace { site: Site, buf: u32, name: String, index: usize, kind: Race, other_block: u32, other_thread: u32 },
    /// A read of a shared-memory element no thread of this block has written (shared
    /// memory starts undefined in every block).
    #[error("{site}: read of element {index} of shared buf{buf} {name}, which this block has not written")]
    Uninit { site: Site, buf: u32, name: String, index: usize },
    /// A barrier reached by `active` of the block's `block` threads (the others are masked
    /// off by an `if` or a finished loop): on a GPU it hangs or is undefined. The site names
    /// the first thread that did not arrive.
    #[error("{site}: barrier reached by {active} of the block's {block} threads")]
    DivergentBarrier { site: Site, active: u32, block: u32 },
    /// A shuffle executed by `active` of the 32 lanes of warp `warp` (it needs all).
    #[error("{site}: shuffle in warp {warp} with {active} of its 32 lanes active")]
    DivergentShuffle { site: Site, warp: u32, active: u32 },
    /// An expression or statement that breaks the typing rules (`what` says how).
    #[error("{site}: type error: {what}")]
    Type { site: Site, what: String },
    /// A variable read (or `Set`) by a thread that has not declared it.
    #[error("{site}: {var} is not defined in this thread")]
    Undefined { site: Site, var: String },
    /// An `i64` division by zero, or of `i64::MIN` by -1 (a trap on the CPU).
    #[error("{site}: integer division {num} / {den}")]
    Division { site: Site, num: i64, den: i64 },
    /// IR no emitter accepts: a missing buffer, a loop step that is not positive, a shuffle
    /// mask past the warp, a lane past the vector, a variable id past [`Kernel::vars`], …
    #[error("{site}: malformed: {what}")]
    Malformed { site: Site, what: String },
}

/// Runs the GPU kernel `k` on `bufs` (one byte slice per [`Kernel::buffers`] entry,
/// little-endian, at least [`Buffer::bytes`] long): every block of the grid, each in
/// lockstep, checking each access as the module documentation says. On an error the buffers
/// hold what was written up to it.
pub fn run(k: &Kernel, bufs: &mut [&mut [u8]]) -> Result<(), SimError> {
    let kernel = || k.name.clone();
    let Some(launch) = k.launch else { return Err(SimError::NotGpu { kernel: kernel() }) };
    let (grid, block) = (launch.grid, launch.block);
    let bad = |why: &str| Err(SimError::Launch { kernel: kernel(), grid, block, why: why.into() });
    if grid == 0 {
        return bad("the grid is empty");
    }
    if block == 0 || block % WARP != 0 || block > MAX_BLOCK {
        return bad("a block is a whole number of warps, at most 1024 threads");
    }
    if u64::from(grid) * u64::from(block) >= u64::from(NONE - 1) {
        return bad("more threads than the simulator numbers");
    }
    let shared_bytes = k.shared.iter().fold(0usize, |s, b| s.saturating_add(b.len.saturating_mul(b.elem.size())));
    if shared_bytes > MAX_SHARED {
        return bad("more shared memory than any GPU gives a block (227 KiB)");
    }
    if k.vars > MAX_VARS {
        return bad("more variables than the simulator keeps per thread (65536)");
    }
    if bufs.len() != k.buffers.len() {
        return Err(SimError::BufferCount { kernel: kernel(), expected: k.buffers.len(), got: bufs.len() });
    }
    for (i, (b, data)) in k.buffers.iter().zip(bufs.iter()).enumerate() {
        let need = b.len.saturating_mul(b.elem.size());
        if data.len() < need {
            return Err(SimError::BufferSize {
                kernel: kernel(),
                buf: i as u32,
                name: b.name.clone(),
                need,
                got: data.len(),
            });
        }
    }
    let written: Vec<bool> = k.access().iter().map(|a| *a != crate::kir::Access::Read).collect();
    let mut track: Vec<Option<Tracker>> =
        k.buffers.iter().zip(&written).map(|(b, &w)| w.then(|| Tracker::new(b.len, block, false))).collect();
    track.extend(k.shared.iter().map(|b| Some(Tracker::new(b.len, block, true))));
    let mut sim = Sim {
        k,
        bdim: block,
        block: 0,
        epoch: 0,
        nglob: k.buffers.len(),
        globals: bufs.iter_mut().map(|b| &mut **b).collect(),
        shared: k.shared.iter().map(|b| vec![0u8; b.bytes()]).collect(),
        track,
        vars: vec![],
        cur: None,
    };
    for b in 0..grid {
        sim.run_block(b)?;
    }
    Ok(())
}

/// The most threads a block can have on any CUDA GPU.
const MAX_BLOCK: u32 = 1024;
/// The most shared memory any GPU gives one block (H100: 227 KiB, with the opt-in).
const MAX_SHARED: usize = 227 * 1024;
/// The most variables a kernel may have here (each is a value per thread).
const MAX_VARS: u32 = 1 << 16;
/// "No thread" in the trackers.
const NONE: u32 = u32::MAX;

/// One thread's or block's accesses to one element, as far as later accesses can conflict
/// with them. Ids are threads of the block (shared memory) or global thread ids
/// (`block · blockDim + thread`); epochs count barriers (and blocks) over the whole launch.
#[derive(Clone, Copy)]
struct Slot {
    /// The last writer and the epoch of its write.
    wr: u32,
    we: u32,
    /// The last reader and the epoch of its read.
    rd: u32,
    re: u32,
    /// Another reader of epoch `re` (same block as `rd`), if any.
    rd2: u32,
    /// A reader from a block before `rd`'s, if any (it conflicts with every later write).
    rob: u32,
}

const FRESH: Slot = Slot { wr: NONE, we: 0, rd: NONE, re: 0, rd2: NONE, rob: NONE };

/// The happens-before bookkeeping of one buffer (see [`Slot`]).
struct Tracker {
    slots: Vec<Slot>,
    /// Threads per block, to tell whether two global ids share a block.
    per_block: u32,
    /// Shared memory: one block's threads only; a read of a never-written element is an error.
    shared: bool,
}

/// What a tracked access conflicts with.
enum Conflict {
    Uninit,
    Race(Race, u32),
}

impl Tracker {
    fn new(len: usize, per_block: u32, shared: bool) -> Tracker {
        Tracker { slots: vec![FRESH; len], per_block, shared }
    }

    fn same_block(&self, a: u32, b: u32) -> bool {
        self.shared || a / self.per_block == b / self.per_block
    }

    /// Whether an access by `id` at `epoch` is ordered after one by `other` at `then`:
    /// the same thread, or the same block with a barrier between.
    fn ordered(&self, other: u32, then: u32, id: u32, epoch: u32) -> bool {
        other == id || (then != epoch && self.same_block(other, id))
    }

    #[inline]
    fn read(&mut self, e: usize, id: u32, epoch: u32) -> Result<(), Conflict> {
        let s = self.slots[e];
        if s.wr != id {
            if s.wr == NONE {
                if self.shared {
                    return Err(Conflict::Uninit);
                }
            } else if !self.ordered(s.wr, s.we, id, epoch) {
                return Err(Conflict::Race(Race::ReadAfterWrite, s.wr));
            }
        }
        // The usual cases first: a reader of this epoch again, or a second one recorded.
        if s.re == epoch && (s.rd == id || s.rd2 != NONE) {
            return Ok(());
        }
        let n = &mut self.slots[e];
        if s.rd == id {
            (n.re, n.rd2) = (epoch, NONE);
        } else if s.rd == NONE {
            (n.rd, n.re) = (id, epoch);
        } else if !(self.shared || s.rd / self.per_block == id / self.per_block) {
            if s.rob == NONE {
                n.rob = s.rd;
            }
            (n.rd, n.re, n.rd2) = (id, epoch, NONE);
        } else if s.re != epoch {
            (n.rd, n.re, n.rd2) = (id, epoch, NONE);
        } else {
            n.rd2 = id;
        }
        Ok(())
    }

    #[inline]
    fn write(&mut self, e: usize, id: u32, epoch: u32) -> Result<(), Conflict> {
        let s = self.slots[e];
        if s.wr != NONE && !self.ordered(s.wr, s.we, id, epoch) {
            return Err(Conflict::Race(Race::WriteAfterWrite, s.wr));
        }
        if s.rob != NONE && !self.same_block(s.rob, id) {
            return Err(Conflict::Race(Race::WriteAfterRead, s.rob));
        }
        if s.rd != NONE && !self.ordered(s.rd, s.re, id, epoch) {
            return Err(Conflict::Race(Race::WriteAfterRead, s.rd));
        }
        // `rd2` read in epoch `re` too, and differs from `rd` (which is `id` if we got here).
        if s.rd2 != NONE && s.re == epoch {
            return Err(Conflict::Race(Race::WriteAfterRead, s.rd2));
        }
        self.slots[e].wr = id;
        self.slots[e].we = epoch;
        Ok(())
    }
}

/// One expression's values for the active threads (position `j`: thread `act[j]`), or one
/// variable's values for all threads of the block (index: thread). One type per column.
#[derive(Clone, Debug)]
enum Col {
    I(Vec<i64>),
    F(Vec<f32>),
    F4(Vec<[f32; 4]>),
    I4(Vec<[i32; 4]>),
    S16(Vec<[i8; 16]>),
    U16(Vec<[u8; 16]>),
}

/// Runs `$body` with `$v` bound to the column's vector and `$mk` to its variant's constructor.
macro_rules! per_col {
    ($c:expr, $v:ident, $mk:ident => $body:expr) => {
        match $c {
            Col::I($v) => {
                #[allow(unused_variables)]
                let $mk = Col::I;
                $body
            }
            Col::F($v) => {
                #[allow(unused_variables)]
                let $mk = Col::F;
                $body
            }
            Col::F4($v) => {
                #[allow(unused_variables)]
                let $mk = Col::F4;
                $body
            }
            Col::I4($v) => {
                #[allow(unused_variables)]
                let $mk = Col::I4;
                $body
            }
            Col::S16($v) => {
                #[allow(unused_variables)]
                let $mk = Col::S16;
                $body
            }
            Col::U16($v) => {
                #[allow(unused_variables)]
                let $mk = Col::U16;
                $body
            }
        }
    };
}

/// Two columns of the same type: `$body` with `$x`, `$y` their vectors and `$mk` the
/// constructor; `$other` when the types differ.
macro_rules! per_col2 {
    ($a:expr, $b:expr, $x:ident, $y:ident, $mk:ident => $body:expr, $other:expr) => {
        match ($a, $b) {
            (Col::I($x), Col::I($y)) => {
                #[allow(unused_variables)]
                let $mk = Col::I;
                $body
            }
            (Col::F($x), Col::F($y)) => {
                #[allow(unused_variables)]
                let $mk = Col::F;
                $body
            }
            (Col::F4($x), Col::F4($y)) => {
                #[allow(unused_variables)]
                let $mk = Col::F4;
                $body
            }
            (Col::I4($x), Col::I4($y)) => {
                #[allow(unused_variables)]
                let $mk = Col::I4;
                $body
            }
            (Col::S16($x), Col::S16($y)) => {
                #[allow(unused_variables)]
                let $mk = Col::S16;
                $body
            }
            (Col::U16($x), Col::U16($y)) => {
                #[allow(unused_variables)]
                let $mk = Col::U16;
                $body
            }
            _ => $other,
        }
    };
}

impl Col {
    fn ty(&self) -> Ty {
        match self {
            Col::I(_) => Ty::I64,
            Col::F(_) => Ty::F32,
            Col::F4(_) => Ty::F32x4,
            Col::I4(_) => Ty::I32x4,
            Col::S16(_) => Ty::I8x16,
            Col::U16(_) => Ty::U8x16,
        }
    }

    fn zeros(ty: Ty, n: usize) -> Col {
        match ty {
            Ty::I64 => Col::I(vec![0; n]),
            Ty::F32 => Col::F(vec![0.0; n]),
            Ty::F32x4 => Col::F4(vec![[0.0; 4]; n]),
            Ty::I32x4 => Col::I4(vec![[0; 4]; n]),
            Ty::I8x16 => Col::S16(vec![[0; 16]; n]),
            Ty::U8x16 => Col::U16(vec![[0; 16]; n]),
        }
    }
}

/// A variable's values in every thread of the block, and which threads have defined it.
struct VarSlot {
    col: Col,
    def: Vec<bool>,
    /// Threads that have not defined it (0: the checks are skipped).
    undef: usize,
}

impl VarSlot {
    fn full(col: Col, n: usize) -> VarSlot {
        VarSlot { col, def: vec![true; n], undef: 0 }
    }
}

/// The elements an access of `ty` to an `elem` buffer touches (`None`: not allowed). A store
/// of an `i64` to an integer buffer keeps its low bits; `f32x4` may be stored to `f32`.
fn access_lanes(elem: Elem, ty: Ty) -> Option<usize> {
    match (elem, ty) {
        (Elem::F32, Ty::F32) | (Elem::I32 | Elem::I8 | Elem::U8, Ty::I64) => Some(1),
        (e, t) if t == Ty::vector_of(e) => Some(t.lanes()),
        _ => None,
    }
}

/// The binary operators on floats and on (wrapping) integers, per lane.
trait Arith {
    fn f(a: f32, b: f32) -> f32;
    fn i(a: i64, b: i64) -> i64;
    fn w(a: i32, b: i32) -> i32;
}

macro_rules! arith {
    ($name:ident, |$a:ident, $b:ident| $f:expr, $i:expr, $w:expr) => {
        struct $name;
        impl Arith for $name {
            fn f($a: f32, $b: f32) -> f32 {
                $f
            }
            fn i($a: i64, $b: i64) -> i64 {
                $i
            }
            fn w($a: i32, $b: i32) -> i32 {
                $w
            }
        }
    };
}

arith!(OpAdd, |a, b| a + b, a.wrapping_add(b), a.wrapping_add(b));
arith!(OpSub, |a, b| a - b, a.wrapping_sub(b), a.wrapping_sub(b));
arith!(OpMul, |a, b| a * b, a.wrapping_mul(b), a.wrapping_mul(b));
// Integer division is checked before it gets here (`i64`) or refused (`i32x4`).
arith!(OpDiv, |a, b| a / b, a.checked_div(b).unwrap_or(0), a.checked_div(b).unwrap_or(0));
arith!(OpMin, |a, b| fmin(a, b), a.min(b), a.min(b));
arith!(OpMax, |a, b| fmax(a, b), a.max(b), a.max(b));

/// `f32::min` as the emitter computes it: `a` if it is smaller or `b` is NaN, else `b`.
fn fmin(a: f32, b: f32) -> f32 {
    if a < b || b.is_nan() {
        a
    } else {
        b
    }
}

fn fmax(a: f32, b: f32) -> f32 {
    if a > b || b.is_nan() {
        a
    } else {
        b
    }
}

fn zip<T: Copy>(a: &mut [T], b: &[T], f: impl Fn(T, T) -> T) {
    for (p, q) in a.iter_mut().zip(b) {
        *p = f(*p, *q);
    }
}

fn lanes<T: Copy, const N: usize>(a: [T; N], b: [T; N], f: impl Fn(T, T) -> T) -> [T; N] {
    std::array::from_fn(|l| f(a[l], b[l]))
}

/// `x op y` of two columns whose types were checked to allow it.
fn arith<O: Arith>(x: Col, y: Col) -> Col {
    match (x, y) {
        (Col::F(mut a), Col::F(b)) => {
            zip(&mut a, &b, O::f);
            Col::F(a)
        }
        (Col::F4(mut a), Col::F4(b)) => {
            zip(&mut a, &b, |p, q| lanes(p, q, O::f));
            Col::F4(a)
        }
        (Col::I(mut a), Col::I(b)) => {
            zip(&mut a, &b, O::i);
            Col::I(a)
        }
        (Col::I4(mut a), Col::I4(b)) => {
            zip(&mut a, &b, |p, q| lanes(p, q, O::w));
            Col::I4(a)
        }
        (x, _) => x,
    }
}

/// `x op c` of an `i64` column and a constant.
fn with_const<O: Arith>(x: &mut [i64], c: i64) {
    x.iter_mut().for_each(|p| *p = O::i(*p, c));
}

/// `a * b + c` rounded once, but for a rare last-bit difference: the product is exact in
/// `f64`, the sum is rounded to `f64` and then to `f32`.
fn fused(a: f32, b: f32, c: f32) -> f32 {
    (f64::from(a) * f64::from(b) + f64::from(c)) as f32
}

fn unary(op: UnOp, x: f32) -> f32 {
    match op {
        UnOp::Neg => -x,
        UnOp::Abs => x.abs(),
        UnOp::Sqrt => x.sqrt(),
        // As the emitters: exactly 0 below -87.3 (a `-inf` mask gives a zero weight).
        UnOp::Exp if x < -87.3 => 0.0,
        UnOp::Exp | UnOp::ExpLow => x.exp(),
        UnOp::Erf => erf(x),
    }
}

/// `erf(x)` to about `f64` precision below |x| = 3 (its Maclaurin series), and by
/// Abramowitz–Stegun 7.1.26 above (absolute error < 1.5e-7 where erf is within 2.3e-5 of ±1).
fn erf(x: f32) -> f32 {
    let a = f64::from(x).abs();
    let r = if a < 3.0 {
        // erf(a) = 2/√π Σ (-1)^n a^(2n+1) / (n! (2n+1))
        let (a2, mut term, mut sum) = (a * a, a, 0.0f64);
        for n in 0..200 {
            let t = term / f64::from(2 * n + 1);
            sum += t;
            if t.abs() <= 1e-17 * sum.abs() {
                break;
            }
            term *= -a2 / f64::from(n + 1);
        }
        sum * std::f64::consts::FRAC_2_SQRT_PI
    } else {
        let t = 1.0 / (1.0 + 0.327_591_1 * a);
        let poly =
            t * (0.254_829_592 + t * (-0.284_496_736 + t * (1.421_413_741 + t * (-1.453_152_027 + t * 1.061_405_429))));
        1.0 - poly * (-a * a).exp()
    };
    (r as f32).copysign(x)
}

fn compare(op: CmpOp, a: i64, b: i64) -> bool {
    match op {
        CmpOp::Lt => a < b,
        CmpOp::Le => a <= b,
        CmpOp::Eq => a == b,
    }
}

fn le<const N: usize>(data: &[u8], at: usize) -> [u8; N] {
    let mut b = [0u8; N];
    b.copy_from_slice(&data[at..at + N]);
    b
}

/// The state of one launch: the buffers, the trackers, and the block being run.
struct Sim<'k, 'm> {
    k: &'k Kernel,
    bdim: u32,
    block: u32,
    /// Barrier epochs, counted over the launch (each block starts a new one).
    epoch: u32,
    /// Number of global buffers: buffer ids from here are shared.
    nglob: usize,
    globals: Vec<&'m mut [u8]>,
    shared: Vec<Vec<u8>>,
    /// Per buffer id (globals, then shared): the tracker, for buffers the kernel writes.
    track: Vec<Option<Tracker>>,
    vars: Vec<Option<VarSlot>>,
    /// The statement being executed, for errors.
    cur: Option<&'k Stmt>,
}

impl<'k> Sim<'k, '_> {
    fn run_block(&mut self, b: u32) -> Result<(), SimError> {
        self.block = b;
        self.epoch = self.epoch.wrapping_add(1);
        for (data, tr) in self.shared.iter_mut().zip(&mut self.track[self.nglob..]) {
            data.fill(0);
            if let Some(tr) = tr {
                tr.slots.fill(FRESH);
            }
        }
        let n = self.bdim as usize;
        self.vars = (0..self.k.vars.max(2)).map(|_| None).collect();
        let extent = self.k.parallel_extent as i64;
        self.vars[START as usize] = Some(VarSlot::full(Col::I(vec![0; n]), n));
        self.vars[END as usize] = Some(VarSlot::full(Col::I(vec![extent; n]), n));
        let act: Vec<u32> = (0..self.bdim).collect();
        let k = self.k;
        self.cur = None;
        self.exec(&k.body, &act)
    }

    fn site(&self, t: u32) -> Site {
        let types = |v: Var| {
            let s = self.vars.get(v as usize)?.as_ref()?;
            (s.def.get(t as usize) == Some(&true)).then(|| s.col.ty())
        };
        Site {
            kernel: self.k.name.clone(),
            block: self.block,
            thread: t,
            stmt: self.cur.map(|s| s.line(&types)).unwrap_or_default(),
        }
    }

    fn type_err(&self, act: &[u32], what: String) -> SimError {
        SimError::Type { site: self.site(act.first().copied().unwrap_or(0)), what }
    }

    fn malformed(&self, act: &[u32], what: String) -> SimError {
        SimError::Malformed { site: self.site(act.first().copied().unwrap_or(0)), what }
    }

    fn ints(&self, c: Col, act: &[u32], what: &str) -> Result<Vec<i64>, SimError> {
        match c {
            Col::I(v) => Ok(v),
            c => Err(self.type_err(act, format!("{what} is {}, not i64", c.ty().name()))),
        }
    }

    /// Executes `body` for the threads `act` (ascending, not empty).
    fn exec(&mut self, body: &'k [Stmt], act: &[u32]) -> Result<(), SimError> {
        for s in body {
            self.cur = Some(s);
            match s {
                Stmt::Let { var, value } => {
                    let c = self.eval(value, act)?;
                    self.assign(*var, c, act, true)?;
                }
                Stmt::Set { var, value } => {
                    let c = self.eval(value, act)?;
                    self.assign(*var, c, act, false)?;
                }
                Stmt::Store { buf, index, value } => {
                    let v = self.eval(value, act)?;
                    let i = self.eval(index, act)?;
                    let i = self.ints(i, act, "a store index")?;
                    self.store(*buf, &i, v, act)?;
                }
                Stmt::For { var, start, end, step, body } => self.for_loop(s, *var, start, end, *step, body, act)?,
                Stmt::If { op, a, b, then } => {
                    let x = self.eval(a, act)?;
                    let x = self.ints(x, act, "an `if` operand")?;
                    let y = self.eval(b, act)?;
                    let y = self.ints(y, act, "an `if` operand")?;
                    let sub: Vec<u32> = act
                        .iter()
                        .zip(x.iter().zip(&y))
                        .filter(|(_, (p, q))| compare(*op, **p, **q))
                        .map(|(t, _)| *t)
                        .collect();
                    if !sub.is_empty() {
                        self.exec(then, &sub)?;
                    }
                }
                Stmt::Barrier => {
                    if act.len() != self.bdim as usize {
                        // The first thread that did not arrive.
                        let missing = (0..self.bdim).zip(act.iter().copied().chain([NONE])).find(|(t, a)| t != a);
                        let t = missing.map_or(0, |(t, _)| t);
                        let (site, active) = (self.site(t), act.len() as u32);
                        return Err(SimError::DivergentBarrier { site, active, block: self.bdim });
                    }
                    self.epoch = self.epoch.wrapping_add(1);
                }
            }
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn for_loop(
        &mut self,
        s: &'k Stmt,
        var: Var,
        start: &'k Expr,
        end: &'k Expr,
        step: i64,
        body: &'k [Stmt],
        act: &[u32],
    ) -> Result<(), SimError> {
        if step <= 0 {
            return Err(self.malformed(act, format!("loop step {step} is not positive")));
        }
        let lo = self.eval(start, act)?;
        let lo = self.ints(lo, act, "a loop start")?;
        let hi = self.eval(end, act)?;
        let hi = self.ints(hi, act, "a loop end")?;
        self.assign(var, Col::I(lo), act, true)?;
        let mut ends = vec![0i64; self.bdim as usize];
        for (&t, &e) in act.iter().zip(&hi) {
            ends[t as usize] = e;
        }
        let mut inner = Vec::with_capacity(act.len());
        loop {
            // While every thread of `act` is inside (the usual case), `act` itself runs.
            let all = match self.vars.get(var as usize) {
                Some(Some(VarSlot { col: Col::I(x), def, undef })) => {
                    let inside = |t: u32| (*undef == 0 || def[t as usize]) && x[t as usize] < ends[t as usize];
                    let all = act.iter().all(|&t| inside(t));
                    if !all {
                        inner.clear();
                        inner.extend(act.iter().filter(|&&t| inside(t)));
                    }
                    all
                }
                _ => {
                    let what = format!("loop variable {} is no longer an i64", var_name(var));
                    return Err(self.type_err(act, what));
                }
            };
            let running: &[u32] = if all { act } else { &inner };
            if running.is_empty() {
                return Ok(());
            }
            self.exec(body, running)?;
            self.cur = Some(s);
            if let Some(Some(VarSlot { col: Col::I(x), .. })) = self.vars.get_mut(var as usize) {
                for &t in running {
                    x[t as usize] = x[t as usize].saturating_add(step);
                }
            }
        }
    }

    /// `var = c` in the threads `act`; `declare` (`let`, a loop's start) may change the
    /// variable's type (the threads that keep an older value of another type lose it).
    fn assign(&mut self, var: Var, c: Col, act: &[u32], declare: bool) -> Result<(), SimError> {
        let n = self.bdim as usize;
        let nvars = self.vars.len();
        let Some(slot) = self.vars.get_mut(var as usize) else {
            let what = format!("{} is past the kernel's {nvars} variables", var_name(var));
            return Err(self.malformed(act, what));
        };
        let same_ty = slot.as_ref().map(|s| s.col.ty()) == Some(c.ty());
        let all_defined = slot.as_ref().is_some_and(|s| s.undef == 0);
        if act.len() == n && (declare || (same_ty && all_defined)) {
            // The whole block: the column is the new value (`act` is then `0..n`).
            match slot {
                Some(s) => {
                    s.col = c;
                    if s.undef > 0 {
                        s.def.fill(true);
                        s.undef = 0;
                    }
                }
                None => *slot = Some(VarSlot::full(c, n)),
            }
            return Ok(());
        }
        if declare && !same_ty {
            *slot = Some(VarSlot { col: Col::zeros(c.ty(), n), def: vec![false; n], undef: n });
        }
        let Some(s) = slot.as_mut() else {
            return Err(SimError::Undefined { site: self.site(act.first().copied().unwrap_or(0)), var: var_name(var) });
        };
        if !declare && s.undef > 0 {
            if let Some(&t) = act.iter().find(|&&t| !s.def[t as usize]) {
                return Err(SimError::Undefined { site: self.site(t), var: var_name(var) });
            }
        }
        let (have, got) = (s.col.ty(), c.ty());
        let ok = per_col2!(&mut s.col, c, dst, src, _mk => {
            for (&t, v) in act.iter().zip(src) {
                dst[t as usize] = v;
            }
            true
        }, false);
        if !ok {
            let what = format!("{} is {}, assigned {}", var_name(var), have.name(), got.name());
            return Err(self.type_err(act, what));
        }
        if s.undef > 0 {
            for &t in act {
                if !s.def[t as usize] {
                    s.def[t as usize] = true;
                    s.undef -= 1;
                }
            }
        }
        Ok(())
    }

    fn read_var(&self, v: Var, act: &[u32]) -> Result<Col, SimError> {
        let slot = self.vars.get(v as usize).and_then(Option::as_ref);
        let missing = match slot {
            None => act.first().copied(),
            Some(s) if s.undef > 0 => act.iter().copied().find(|&t| !s.def[t as usize]),
            Some(_) => None,
        };
        match (slot, missing) {
            // The whole block (`act` is `0..n`): the column as it is.
            (Some(s), None) if act.len() == self.bdim as usize => Ok(s.col.clone()),
            (Some(s), None) => Ok(per_col!(&s.col, x, mk => mk(act.iter().map(|&t| x[t as usize]).collect()))),
            (_, t) => Err(SimError::Undefined { site: self.site(t.unwrap_or(0)), var: var_name(v) }),
        }
    }

    fn buffer(&self, buf: u32, act: &[u32]) -> Result<&'k Buffer, SimError> {
        let k = self.k;
        k.buffer(buf).ok_or_else(|| {
            let n = k.buffers.len() + k.shared.len();
            self.malformed(act, format!("buf{buf} does not exist (the kernel has {n})"))
        })
    }

    fn data(&self, b: usize) -> &[u8] {
        if b < self.nglob {
            &self.globals[b]
        } else {
            &self.shared[b - self.nglob]
        }
    }

    fn data_mut(&mut self, b: usize) -> &mut [u8] {
        if b < self.nglob {
            &mut self.globals[b]
        } else {
            &mut self.shared[b - self.nglob]
        }
    }

    /// Checks the accesses of `lanes` elements from `idx[j]` by thread `act[j]`: bounds,
    /// then races and (shared) uninitialised reads, recording them.
    fn check(&mut self, buf: u32, idx: &[i64], lanes: usize, act: &[u32], store: bool) -> Result<(), SimError> {
        let b = self.buffer(buf, act)?;
        if let Some(j) = idx.iter().position(|&i| i < 0 || (i as u64).saturating_add(lanes as u64) > b.len as u64) {
            let site = self.site(act[j]);
            let (name, index, len) = (b.name.clone(), idx[j], b.len);
            return Err(SimError::OutOfBounds { site, buf, name, index, lanes, len, store });
        }
        let shared = buf as usize >= self.nglob;
        let base = if shared { 0 } else { self.block * self.bdim };
        let epoch = self.epoch;
        let Some(tr) = self.track.get_mut(buf as usize).and_then(Option::as_mut) else { return Ok(()) };
        // Scalar loads, the usual case, on their own loop.
        let fail = match (store, lanes) {
            (false, 1) => idx.iter().zip(act).find_map(|(&i, &t)| {
                let e = i as usize;
                tr.read(e, base + t, epoch).err().map(|c| (t, e, c))
            }),
            _ => idx.iter().zip(act).find_map(|(&i, &t)| {
                (i as usize..i as usize + lanes).find_map(|e| {
                    let r = if store { tr.write(e, base + t, epoch) } else { tr.read(e, base + t, epoch) };
                    r.err().map(|c| (t, e, c))
                })
            }),
        };
        let Some((t, index, c)) = fail else { return Ok(()) };
        let (site, name) = (self.site(t), b.name.clone());
        Err(match c {
            Conflict::Uninit => SimError::Uninit { site, buf, name, index },
            Conflict::Race(kind, other) if shared => SimError::SharedRace { site, buf, name, index, kind, other },
            Conflict::Race(kind, other) => SimError::GlobalRace {
                site,
                buf,
                name,
                index,
                kind,
                other_block: other / self.bdim,
                other_thread: other % self.bdim,
            },
        })
    }

    fn load(&mut self, buf: u32, ty: Ty, idx: &[i64], act: &[u32]) -> Result<Col, SimError> {
        let elem = self.buffer(buf, act)?.elem;
        let Some(lanes) = access_lanes(elem, ty) else {
            return Err(self.type_err(act, format!("load of {} from buf{buf}, a {} buffer", ty.name(), elem.name())));
        };
        self.check(buf, idx, lanes, act, false)?;
        let d = self.data(buf as usize);
        let at = |i: i64| i as usize * elem.size();
        let f = |o: usize| f32::from_le_bytes(le(d, o));
        let w = |o: usize| i32::from_le_bytes(le(d, o));
        Ok(match (elem, ty) {
            (Elem::F32, Ty::F32) => Col::F(idx.iter().map(|&i| f(at(i))).collect()),
            (Elem::I32, Ty::I64) => Col::I(idx.iter().map(|&i| i64::from(w(at(i)))).collect()),
            (Elem::I8, Ty::I64) => Col::I(idx.iter().map(|&i| i64::from(d[at(i)] as i8)).collect()),
            (Elem::U8, Ty::I64) => Col::I(idx.iter().map(|&i| i64::from(d[at(i)])).collect()),
            (Elem::F32, _) => Col::F4(idx.iter().map(|&i| std::array::from_fn(|l| f(at(i) + 4 * l))).collect()),
            (Elem::I32, _) => Col::I4(idx.iter().map(|&i| std::array::from_fn(|l| w(at(i) + 4 * l))).collect()),
            (Elem::I8, _) => Col::S16(idx.iter().map(|&i| le::<16>(d, at(i)).map(|x| x as i8)).collect()),
            (Elem::U8, _) => Col::U16(idx.iter().map(|&i| le::<16>(d, at(i))).collect()),
        })
    }

    fn store(&mut self, buf: u32, idx: &[i64], v: Col, act: &[u32]) -> Result<(), SimError> {
        let elem = self.buffer(buf, act)?.elem;
        let Some(lanes) = access_lanes(elem, v.ty()) else {
            return Err(self.type_err(act, format!("store of {} to buf{buf}, a {} buffer", v.ty().name(), elem.name())));
        };
        self.check(buf, idx, lanes, act, true)?;
        let size = elem.size();
        let d = self.data_mut(buf as usize);
        let put = |d: &mut [u8], i: i64, bytes: &[u8]| {
            let o = i as usize * size;
            d[o..o + bytes.len()].copy_from_slice(bytes);
        };
        match (elem, v) {
            (Elem::F32, Col::F(v)) => idx.iter().zip(v).for_each(|(&i, x)| put(d, i, &x.to_le_bytes())),
            (Elem::F32, Col::F4(v)) => idx.iter().zip(v).for_each(|(&i, x)| {
                (0..4).for_each(|l| put(d, i + l as i64, &x[l].to_le_bytes()));
            }),
            (Elem::I32, Col::I4(v)) => idx.iter().zip(v).for_each(|(&i, x)| {
                (0..4).for_each(|l| put(d, i + l as i64, &x[l].to_le_bytes()));
            }),
            (Elem::I32, Col::I(v)) => idx.iter().zip(v).for_each(|(&i, x)| put(d, i, &(x as i32).to_le_bytes())),
            (Elem::I8 | Elem::U8, Col::I(v)) => idx.iter().zip(v).for_each(|(&i, x)| put(d, i, &[x as u8])),
            (_, Col::S16(v)) => idx.iter().zip(v).for_each(|(&i, x)| put(d, i, &x.map(|b| b as u8))),
            (_, Col::U16(v)) => idx.iter().zip(v).for_each(|(&i, x)| put(d, i, &x)),
            // Excluded by `access_lanes`.
            _ => {}
        }
        Ok(())
    }

    /// The values of `e` for the threads `act` (ascending, not empty).
    fn eval(&mut self, e: &'k Expr, act: &[u32]) -> Result<Col, SimError> {
        let n = act.len();
        Ok(match e {
            Expr::Int(v) => Col::I(vec![*v; n]),
            Expr::F32(v) => Col::F(vec![*v; n]),
            Expr::Var(v) => self.read_var(*v, act)?,
            Expr::Gpu(GpuIdx::Thread) => Col::I(act.iter().map(|&t| i64::from(t)).collect()),
            Expr::Gpu(GpuIdx::Block) => Col::I(vec![i64::from(self.block); n]),
            Expr::Load { buf, index, ty } => {
                let i = self.eval(index, act)?;
                let i = self.ints(i, act, "a load index")?;
                self.load(*buf, *ty, &i, act)?
            }
            // An `i64` operation with a constant on the right (`x * 16`, `x + 1`): in place.
            Expr::Bin(op @ (BinOp::Add | BinOp::Sub | BinOp::Mul | BinOp::Min | BinOp::Max), a, b)
                if matches!(**b, Expr::Int(_)) =>
            {
                let Expr::Int(c) = **b else { unreachable!("matched above") };
                let mut x = match self.eval(a, act)? {
                    Col::I(x) => x,
                    x => return Err(self.type_err(act, format!("{} of {} and i64", op.name(), x.ty().name()))),
                };
                match op {
                    BinOp::Add => with_const::<OpAdd>(&mut x, c),
                    BinOp::Sub => with_const::<OpSub>(&mut x, c),
                    BinOp::Mul => with_const::<OpMul>(&mut x, c),
                    BinOp::Min => with_const::<OpMin>(&mut x, c),
                    _ => with_const::<OpMax>(&mut x, c),
                }
                Col::I(x)
            }
            Expr::Bin(op, a, b) => {
                let x = self.eval(a, act)?;
                let y = self.eval(b, act)?;
                let (tx, ty) = (x.ty(), y.ty());
                let bad = tx != ty || matches!(tx, Ty::I8x16 | Ty::U8x16) || (tx == Ty::I32x4 && *op == BinOp::Div);
                if bad {
                    return Err(self.type_err(act, format!("{} of {} and {}", op.name(), tx.name(), ty.name())));
                }
                match (op, x, y) {
                    (BinOp::Div, Col::I(mut a), Col::I(b)) => {
                        for ((p, &q), &t) in a.iter_mut().zip(&b).zip(act) {
                            match p.checked_div(q) {
                                Some(r) => *p = r,
                                None => return Err(SimError::Division { site: self.site(t), num: *p, den: q }),
                            }
                        }
                        Col::I(a)
                    }
                    (BinOp::Add, x, y) => arith::<OpAdd>(x, y),
                    (BinOp::Sub, x, y) => arith::<OpSub>(x, y),
                    (BinOp::Mul, x, y) => arith::<OpMul>(x, y),
                    (BinOp::Div, x, y) => arith::<OpDiv>(x, y),
                    (BinOp::Min, x, y) => arith::<OpMin>(x, y),
                    (BinOp::Max, x, y) => arith::<OpMax>(x, y),
                }
            }
            Expr::Fma(a, b, c) => {
                let x = self.eval(a, act)?;
                let y = self.eval(b, act)?;
                let z = self.eval(c, act)?;
                match (x, y, z) {
                    (Col::F(mut x), Col::F(y), Col::F(z)) => {
                        for ((p, q), r) in x.iter_mut().zip(y).zip(z) {
                            *p = fused(*p, q, r);
                        }
                        Col::F(x)
                    }
                    (Col::F4(mut x), Col::F4(y), Col::F4(z)) => {
                        for ((p, q), r) in x.iter_mut().zip(y).zip(z) {
                            *p = std::array::from_fn(|l| fused(p[l], q[l], r[l]));
                        }
                        Col::F4(x)
                    }
                    (x, y, z) => {
                        let what = format!("fma of {}, {}, {}", x.ty().name(), y.ty().name(), z.ty().name());
                        return Err(self.type_err(act, what));
                    }
                }
            }
            Expr::Un(op, a) => match self.eval(a, act)? {
                Col::F(mut x) => {
                    x.iter_mut().for_each(|p| *p = unary(*op, *p));
                    Col::F(x)
                }
                Col::F4(mut x) => {
                    x.iter_mut().flatten().for_each(|p| *p = unary(*op, *p));
                    Col::F4(x)
                }
                x => return Err(self.type_err(act, format!("{} of {}", op.name(), x.ty().name()))),
            },
            Expr::Splat(a) => match self.eval(a, act)? {
                Col::F(x) => Col::F4(x.into_iter().map(|v| [v; 4]).collect()),
                Col::I(x) => Col::I4(x.into_iter().map(|v| [v as i32; 4]).collect()),
                x => return Err(self.type_err(act, format!("splat of {}", x.ty().name()))),
            },
            Expr::HSum(a) | Expr::HMax(a) => {
                let sum = matches!(e, Expr::HSum(_));
                match self.eval(a, act)? {
                    Col::F4(x) if sum => Col::F(x.into_iter().map(|v| (v[0] + v[1]) + (v[2] + v[3])).collect()),
                    Col::F4(x) => Col::F(x.into_iter().map(|v| fmax(fmax(v[0], v[1]), fmax(v[2], v[3]))).collect()),
                    x => return Err(self.type_err(act, format!("horizontal reduction of {}", x.ty().name()))),
                }
            }
            Expr::Pack(xs) => {
                let parts = self.parts(xs, act, "pack")?;
                match &parts[..] {
                    [Col::F(a), Col::F(b), Col::F(c), Col::F(d)] => {
                        Col::F4((0..n).map(|j| [a[j], b[j], c[j], d[j]]).collect())
                    }
                    [Col::I(a), Col::I(b), Col::I(c), Col::I(d)] => {
                        Col::I4((0..n).map(|j| [a[j] as i32, b[j] as i32, c[j] as i32, d[j] as i32]).collect())
                    }
                    _ => {
                        let tys: Vec<&str> = parts.iter().map(|p| p.ty().name()).collect();
                        return Err(self.type_err(act, format!("pack of {}", tys.join(", "))));
                    }
                }
            }
            Expr::Dot4 { acc, w, x } => {
                let c = self.eval(acc, act)?;
                let a = self.eval(w, act)?;
                let b = self.eval(x, act)?;
                match (c, a, b) {
                    (Col::I4(mut c), Col::S16(a), Col::U16(b)) => {
                        for ((c, a), b) in c.iter_mut().zip(a).zip(b) {
                            *c = std::array::from_fn(|l| {
                                let dot: i32 = (4 * l..4 * l + 4).map(|q| i32::from(a[q]) * i32::from(b[q])).sum();
                                c[l].wrapping_add(dot)
                            });
                        }
                        Col::I4(c)
                    }
                    (c, a, b) => {
                        let what = format!("dot4 of {}, {}, {}", c.ty().name(), a.ty().name(), b.ty().name());
                        return Err(self.type_err(act, what));
                    }
                }
            }
            Expr::PairAdd(a, b) => match (self.eval(a, act)?, self.eval(b, act)?) {
                (Col::I4(mut x), Col::I4(y)) => {
                    for (p, q) in x.iter_mut().zip(y) {
                        *p = [
                            p[0].wrapping_add(p[1]),
                            p[2].wrapping_add(p[3]),
                            q[0].wrapping_add(q[1]),
                            q[2].wrapping_add(q[3]),
                        ];
                    }
                    Col::I4(x)
                }
                (x, y) => {
                    return Err(self.type_err(act, format!("pair_add of {} and {}", x.ty().name(), y.ty().name())))
                }
            },
            Expr::Cvt(to, a) => match (self.eval(a, act)?, to) {
                (Col::I4(x), Ty::F32x4) => Col::F4(x.into_iter().map(|v| v.map(|l| l as f32)).collect()),
                (Col::I(x), Ty::F32) => Col::F(x.into_iter().map(|v| v as f32).collect()),
                // `as` saturates and takes NaN to 0.
                (Col::F4(x), Ty::I32x4) => {
                    Col::I4(x.into_iter().map(|v| v.map(|l| l.round_ties_even() as i32)).collect())
                }
                (Col::F(x), Ty::I64) => Col::I(x.into_iter().map(|v| v.round_ties_even() as i64).collect()),
                (x, _) => return Err(self.type_err(act, format!("conversion of {} to {}", x.ty().name(), to.name()))),
            },
            Expr::Narrow(to, xs) => {
                let parts = self.parts(xs, act, "narrow")?;
                let [Col::I4(a), Col::I4(b), Col::I4(c), Col::I4(d)] = &parts[..] else {
                    let tys: Vec<&str> = parts.iter().map(|p| p.ty().name()).collect();
                    return Err(self.type_err(act, format!("narrow of {}", tys.join(", "))));
                };
                let lane = |j: usize, i: usize| [a, b, c, d][i / 4][j][i % 4];
                match to {
                    Ty::U8x16 => {
                        Col::U16((0..n).map(|j| std::array::from_fn(|i| lane(j, i).clamp(0, 255) as u8)).collect())
                    }
                    Ty::I8x16 => {
                        Col::S16((0..n).map(|j| std::array::from_fn(|i| lane(j, i).clamp(-128, 127) as i8)).collect())
                    }
                    _ => return Err(self.type_err(act, format!("narrow to {}", to.name()))),
                }
            }
            Expr::Lane(a, l) => {
                let x = self.eval(a, act)?;
                let l = *l as usize;
                match x {
                    Col::I4(x) if l < 4 => Col::I(x.into_iter().map(|v| i64::from(v[l])).collect()),
                    Col::F4(x) if l < 4 => Col::F(x.into_iter().map(|v| v[l]).collect()),
                    x => return Err(self.type_err(act, format!("lane {l} of {}", x.ty().name()))),
                }
            }
            Expr::Select { op, a, b, then, otherwise } => {
                // Both arms are evaluated (and their loads checked), as the emitters do.
                let x = self.eval(a, act)?;
                let x = self.ints(x, act, "a select operand")?;
                let y = self.eval(b, act)?;
                let y = self.ints(y, act, "a select operand")?;
                let p = self.eval(then, act)?;
                let q = self.eval(otherwise, act)?;
                let (tp, tq) = (p.ty(), q.ty());
                let r = per_col2!(p, q, p, q, mk => {
                    let mut p = p;
                    for (j, v) in p.iter_mut().enumerate() {
                        if !compare(*op, x[j], y[j]) {
                            *v = q[j];
                        }
                    }
                    Some(mk(p))
                }, None);
                match r {
                    Some(r) => r,
                    None => return Err(self.type_err(act, format!("select of {} and {}", tp.name(), tq.name()))),
                }
            }
            Expr::ShflXor(a, mask) => {
                if *mask >= WARP {
                    return Err(self.malformed(act, format!("shuffle mask {mask} reaches past the warp")));
                }
                let x = match self.eval(a, act)? {
                    Col::F(x) => x,
                    x => return Err(self.type_err(act, format!("shuffle of {}", x.ty().name()))),
                };
                let mut out = Vec::with_capacity(n);
                for (j, &t) in act.iter().enumerate() {
                    let lane = t % WARP;
                    let first = t - lane;
                    // `act` ascends without repeats: the warp is whole iff its first and last
                    // lanes are 31 positions apart.
                    let base = j.wrapping_sub(lane as usize);
                    let whole = act.get(base) == Some(&first) && act.get(base.wrapping_add(31)) == Some(&(first + 31));
                    if !whole {
                        let active = act.iter().filter(|&&u| u / WARP == t / WARP).count() as u32;
                        return Err(SimError::DivergentShuffle { site: self.site(t), warp: t / WARP, active });
                    }
                    out.push(x[base + (lane ^ mask) as usize]);
                }
                Col::F(out)
            }
        })
    }

    fn parts(&mut self, xs: &'k [Expr], act: &[u32], what: &str) -> Result<Vec<Col>, SimError> {
        if xs.len() != 4 {
            return Err(self.malformed(act, format!("{what} of {} parts (it takes 4)", xs.len())));
        }
        xs.iter().map(|x| self.eval(x, act)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kir::build::*;
    use crate::kir::GpuLaunch;

    fn fb(name: &str, len: usize) -> Buffer {
        Buffer { name: name.into(), elem: Elem::F32, len }
    }

    fn buf(name: &str, elem: Elem, len: usize) -> Buffer {
        Buffer { name: name.into(), elem, len }
    }

    fn gpu(name: &str, buffers: Vec<Buffer>, shared: Vec<Buffer>, grid: u32, block: u32, body: Vec<Stmt>) -> Kernel {
        Kernel {
            name: name.into(),
            buffers,
            parallel_extent: grid as u64,
            flops: 0,
            body,
            vars: 16,
            launch: Some(GpuLaunch { grid, block }),
            shared,
        }
    }

    fn bytes_f(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    fn floats(b: &[u8]) -> Vec<f32> {
        b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
    }

    /// Runs `k` on zero-filled buffers (with `init` where given).
    fn sim(k: &Kernel, init: &[(usize, Vec<u8>)]) -> (Result<(), SimError>, Vec<Vec<u8>>) {
        let mut bufs: Vec<Vec<u8>> = k.buffers.iter().map(|b| vec![0u8; b.bytes()]).collect();
        for (i, data) in init {
            bufs[*i] = data.clone();
        }
        let mut refs: Vec<&mut [u8]> = bufs.iter_mut().map(|b| b.as_mut_slice()).collect();
        let r = run(k, &mut refs);
        (r, bufs)
    }

    const ROW: i64 = 300;

    /// Block `b` sums row `b` of `x` (300 floats) with 64 threads: strided partial sums, a
    /// butterfly in each warp, lane 0 of each warp to `red[warp]`, (a barrier), thread 0
    /// adds both.
    fn row_sum(rows: u32, barrier: bool) -> Kernel {
        let (acc, j, warp, lane) = (2, 3, 4, 5);
        let mut body = vec![
            let_(acc, f(0.0)),
            for_(
                j,
                thread(),
                int(ROW),
                64,
                vec![set(acc, add(var(acc), load(0, add(mul(block(), int(ROW)), var(j)))))],
            ),
        ];
        for mask in [16, 8, 4, 2, 1] {
            body.push(set(acc, add(var(acc), shfl_xor(var(acc), mask))));
        }
        body.extend([
            let_(warp, div(thread(), int(32))),
            let_(lane, sub(thread(), mul(var(warp), int(32)))),
            if_(CmpOp::Eq, var(lane), int(0), vec![store(2, var(warp), var(acc))]),
        ]);
        if barrier {
            body.push(Stmt::Barrier);
        }
        body.push(if_(CmpOp::Eq, thread(), int(0), vec![store(1, block(), add(load(2, int(0)), load(2, int(1))))]));
        gpu(
            "row_sum",
            vec![fb("x", rows as usize * ROW as usize), fb("sums", rows as usize)],
            vec![fb("red", 2)],
            rows,
            64,
            body,
        )
    }

    #[test]
    fn block_reduction_sums_rows_and_a_missing_barrier_is_a_race() {
        let rows = 5;
        let x: Vec<f32> = (0..rows * ROW as usize).map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.01).collect();
        let (r, out) = sim(&row_sum(rows as u32, true), &[(0, bytes_f(&x))]);
        r.unwrap();
        for (row, got) in floats(&out[1]).into_iter().enumerate() {
            let want: f32 = x[row * ROW as usize..][..ROW as usize].iter().sum();
            assert!((got - want).abs() <= 1e-4 * (1.0 + want.abs()), "row {row}: {got} vs {want}");
        }
        let (r, _) = sim(&row_sum(rows as u32, false), &[(0, bytes_f(&x))]);
        match r {
            Err(SimError::SharedRace { site, name, index: 1, kind: Race::ReadAfterWrite, other: 32, .. }) => {
                assert_eq!((site.block, site.thread, name.as_str()), (0, 0, "red"));
                assert!(site.stmt.starts_with("buf1[block] = "), "{}", site.stmt);
            }
            r => panic!("expected a shared-memory race, got {r:?}"),
        }
    }

    #[test]
    fn out_of_bounds_store_names_the_buffer() {
        let k = gpu("oob", vec![fb("out", 64)], vec![], 1, 64, vec![store(0, add(thread(), int(1)), f(1.0))]);
        match sim(&k, &[]).0 {
            Err(e @ SimError::OutOfBounds { .. }) => {
                let SimError::OutOfBounds { site, buf, ref name, index, lanes, len, store } = e.clone() else {
                    unreachable!()
                };
                assert_eq!(
                    (site.thread, buf, name.as_str(), index, lanes, len, store),
                    (63, 0, "out", 64, 1, 64, true)
                );
                assert!(e.to_string().contains("buf0 out"), "{e}");
            }
            r => panic!("expected out of bounds, got {r:?}"),
        }
        // An f32x4 load whose last lane is past the end.
        let k = gpu(
            "oob4",
            vec![fb("x", 8), fb("out", 32)],
            vec![],
            1,
            32,
            vec![store(1, thread(), hsum(load4(0, int(5))))],
        );
        assert!(matches!(sim(&k, &[]).0, Err(SimError::OutOfBounds { index: 5, lanes: 4, store: false, .. })));
    }

    #[test]
    fn global_race_is_caught() {
        let k = gpu("race", vec![fb("out", 1)], vec![], 1, 32, vec![store(0, int(0), f(1.0))]);
        match sim(&k, &[]).0 {
            Err(SimError::GlobalRace {
                site,
                kind: Race::WriteAfterWrite,
                other_block: 0,
                other_thread: 0,
                index: 0,
                ..
            }) => {
                assert_eq!(site.thread, 1)
            }
            r => panic!("expected a global race, got {r:?}"),
        }
        // Across blocks: each block's thread 0 writes element 0.
        let k = gpu(
            "race2",
            vec![fb("out", 1)],
            vec![],
            2,
            32,
            vec![if_(CmpOp::Eq, thread(), int(0), vec![store(0, int(0), f(1.0))])],
        );
        assert!(matches!(
            sim(&k, &[]).0,
            Err(SimError::GlobalRace { other_block: 0, site: Site { block: 1, .. }, .. })
        ));
        // Every block's thread 0 reads x[1]; block 1 then writes it (after block 0's read).
        let body = vec![if_(
            CmpOp::Eq,
            thread(),
            int(0),
            vec![store(1, block(), load(0, int(1))), if_(CmpOp::Eq, block(), int(1), vec![store(0, int(1), f(2.0))])],
        )];
        let k = gpu("race3", vec![fb("x", 2), fb("y", 2)], vec![], 2, 32, body);
        match sim(&k, &[]).0 {
            Err(SimError::GlobalRace {
                site,
                kind: Race::WriteAfterRead,
                other_block: 0,
                other_thread: 0,
                index: 1,
                ..
            }) => {
                assert_eq!((site.block, site.thread), (1, 0))
            }
            r => panic!("expected a global race, got {r:?}"),
        }
    }

    #[test]
    fn barrier_orders_global_accesses_within_a_block() {
        // Thread t writes x[t]; after a barrier thread t reads x[63 - t] and writes y[t].
        let body = vec![
            store(0, thread(), cvt(Ty::F32, thread())),
            Stmt::Barrier,
            store(1, thread(), load(0, sub(int(63), thread()))),
        ];
        let k = gpu("ordered", vec![fb("x", 64), fb("y", 64)], vec![], 1, 64, body.clone());
        let (r, out) = sim(&k, &[]);
        r.unwrap();
        assert_eq!(floats(&out[1])[0], 63.0);
        let k = gpu("unordered", vec![fb("x", 64), fb("y", 64)], vec![], 1, 64, vec![body[0].clone(), body[2].clone()]);
        assert!(matches!(sim(&k, &[]).0, Err(SimError::GlobalRace { kind: Race::ReadAfterWrite, .. })));
    }

    #[test]
    fn uninitialised_shared_read_is_caught() {
        let k = gpu(
            "uninit",
            vec![fb("out", 32)],
            vec![fb("tile", 32)],
            1,
            32,
            vec![store(0, thread(), load(1, thread()))],
        );
        match sim(&k, &[]).0 {
            Err(SimError::Uninit { site, name, index: 0, buf: 1 }) => {
                assert_eq!((site.thread, name.as_str()), (0, "tile"))
            }
            r => panic!("expected an uninitialised read, got {r:?}"),
        }
    }

    #[test]
    fn divergent_barrier_and_shuffle_are_caught() {
        let k =
            gpu("div", vec![fb("out", 64)], vec![], 1, 64, vec![if_(CmpOp::Lt, thread(), int(3), vec![Stmt::Barrier])]);
        match sim(&k, &[]).0 {
            Err(SimError::DivergentBarrier { site, active: 3, block: 64 }) => assert_eq!(site.thread, 3),
            r => panic!("expected a divergent barrier, got {r:?}"),
        }
        let body = vec![if_(CmpOp::Lt, thread(), int(16), vec![store(0, thread(), shfl_xor(f(1.0), 1))])];
        let k = gpu("shfl", vec![fb("out", 64)], vec![], 1, 64, body);
        assert!(matches!(sim(&k, &[]).0, Err(SimError::DivergentShuffle { warp: 0, active: 16, .. })));
    }

    #[test]
    fn type_errors_and_undefined_variables_are_errors() {
        let k = gpu("ty", vec![fb("out", 32)], vec![], 1, 32, vec![store(0, thread(), add(f(1.0), int(1)))]);
        assert!(matches!(sim(&k, &[]).0, Err(SimError::Type { .. })));
        // v2 is declared only by threads below 4; thread 4 reads it.
        let body = vec![if_(CmpOp::Lt, thread(), int(4), vec![let_(2, f(1.0))]), store(0, thread(), var(2))];
        let k = gpu("undef", vec![fb("out", 32)], vec![], 1, 32, body);
        match sim(&k, &[]).0 {
            Err(SimError::Undefined { site, var }) => assert_eq!((site.thread, var.as_str()), (4, "v2")),
            r => panic!("expected an undefined variable, got {r:?}"),
        }
        // A `set` by every thread of a variable only some declared.
        let body = vec![if_(CmpOp::Lt, thread(), int(4), vec![let_(2, f(1.0))]), set(2, f(2.0))];
        let k = gpu("undef_set", vec![fb("out", 32)], vec![], 1, 32, body);
        assert!(matches!(sim(&k, &[]).0, Err(SimError::Undefined { site: Site { thread: 4, .. }, .. })));
        let mut k = gpu("cpu", vec![fb("out", 32)], vec![], 1, 32, vec![]);
        k.launch = None;
        assert!(matches!(sim(&k, &[]).0, Err(SimError::NotGpu { .. })));
        // Malformed kernels are errors, not panics.
        let bad: Vec<(Vec<Stmt>, u32)> = vec![
            (vec![store(7, thread(), f(1.0))], 32),
            (vec![store(0, thread(), load_as(Ty::I8x16, 0, int(0)))], 32),
            (vec![store(0, thread(), shfl_xor(f(1.0), 32))], 32),
            (vec![store(0, thread(), lane(splat(f(1.0)), 4))], 32),
            (vec![store(0, thread(), cvt(Ty::F32, div(int(1), sub(thread(), thread()))))], 32),
            (vec![for_(2, int(0), int(4), 0, vec![])], 32),
            (vec![let_(99, int(0))], 32),
            (vec![store(0, thread(), pack(vec![f(1.0)]))], 32),
            (vec![for_(2, int(0), int(4), 1, vec![let_(2, f(1.0))])], 32),
            (vec![], 48),
            (vec![store(0, int(-1), f(1.0))], 32),
            (vec![store(0, int(i64::MAX), f(1.0))], 32),
        ];
        for (body, block) in bad {
            let k = gpu("bad", vec![fb("out", 32)], vec![], 1, block, body.clone());
            assert!(sim(&k, &[]).0.is_err(), "{body:?}");
        }
    }

    #[test]
    fn vector_loads_dot4_narrow_and_cvt_give_the_expected_bytes() {
        // Thread 0 only: q = cvt.i32x4(a[0..4]); out32 = dot4(q, w, x); u8/i8 narrowings of
        // [q, q·1000, -q, q]; scalars: cvt.i64 of a[4..8] stored to an i32 buffer.
        let a = [1.5f32, 2.5, -0.5, 300.7, f32::NAN, 1e20, -2.5, 3.5];
        let w: Vec<u8> = (0..16).map(|i| (i as i8 - 8) as u8).collect(); // -8..8
        let x: Vec<u8> = (0..16).map(|i| 200 + i as u8).collect(); // 200..216
        let q = 2;
        let big = mul(var(q), splat(int(1000)));
        let neg = sub(splat(int(0)), var(q));
        let body = vec![if_(
            CmpOp::Eq,
            thread(),
            int(0),
            vec![
                let_(q, cvt(Ty::I32x4, load4(0, int(0)))),
                store(3, int(0), dot4(var(q), load_as(Ty::I8x16, 1, int(0)), load_as(Ty::U8x16, 2, int(0)))),
                store(4, int(0), narrow(Ty::U8x16, vec![var(q), big.clone(), neg.clone(), var(q)])),
                store(5, int(0), narrow(Ty::I8x16, vec![var(q), big, neg, var(q)])),
                store(6, int(0), cvt(Ty::I64, load(0, int(4)))),
                store(6, int(1), cvt(Ty::I64, load(0, int(5)))),
                store(6, int(2), cvt(Ty::I64, load(0, int(6)))),
                store(6, int(3), cvt(Ty::I64, load(0, int(7)))),
                store(7, int(0), pair_add(var(q), load_as(Ty::I32x4, 6, int(0)))),
            ],
        )];
        let bufs = vec![
            fb("a", 8),
            buf("w", Elem::I8, 16),
            buf("x", Elem::U8, 16),
            buf("dot", Elem::I32, 4),
            buf("nu", Elem::U8, 16),
            buf("ns", Elem::I8, 16),
            buf("ints", Elem::I32, 4),
            buf("pairs", Elem::I32, 4),
        ];
        let k = gpu("vec", bufs, vec![], 1, 32, body);
        let (r, out) = sim(&k, &[(0, bytes_f(&a)), (1, w.clone()), (2, x.clone())]);
        r.unwrap();
        let i32s =
            |b: &[u8]| b.chunks_exact(4).map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect::<Vec<_>>();
        // Round half to even: 1.5 → 2, 2.5 → 2, -0.5 → 0, 300.7 → 301.
        let qv = [2, 2, 0, 301];
        let dot: Vec<i32> = (0..4)
            .map(|l| qv[l] + (0..4).map(|j| (w[4 * l + j] as i8) as i32 * x[4 * l + j] as i32).sum::<i32>())
            .collect();
        assert_eq!(i32s(&out[3]), dot);
        assert_eq!(dot[0], 2 - 8 * 200 - 7 * 201 - 6 * 202 - 5 * 203);
        assert_eq!(out[4], [2, 2, 0, 255, 255, 255, 0, 255, 0, 0, 0, 0, 2, 2, 0, 255]);
        let ns: Vec<i8> = out[5].iter().map(|&b| b as i8).collect();
        assert_eq!(ns, [2, 2, 0, 127, 127, 127, 0, 127, -2, -2, 0, -128, 2, 2, 0, 127]);
        // NaN → 0; 1e20 saturates to i64::MAX, whose low 32 bits are -1; -2.5 → -2; 3.5 → 4.
        assert_eq!(i32s(&out[6]), [0, -1, -2, 4]);
        assert_eq!(i32s(&out[7]), [4, 301, -1, 2]);
    }

    #[test]
    fn erf_and_exp_are_accurate() {
        // erf from a table (Abramowitz–Stegun, Table 7.1).
        for (x, want) in [
            (0.0f32, 0.0f64),
            (0.1, 0.112_462_916),
            (0.5, 0.520_499_878),
            (1.0, 0.842_700_793),
            (2.0, 0.995_322_265),
            (3.5, 0.999_999_257),
        ] {
            for s in [1.0f32, -1.0] {
                let got = erf(s * x);
                assert!((f64::from(got) - f64::from(s) * want).abs() < 2e-7, "erf({}) = {got}", s * x);
            }
        }
        assert!(erf(f32::NAN).is_nan());
        assert_eq!(erf(f32::INFINITY), 1.0);
        assert_eq!(unary(UnOp::Exp, -90.0), 0.0);
        assert_eq!(fmin(f32::NAN, 1.0), 1.0);
        assert_eq!(fmax(1.0, f32::NAN), 1.0);
    }

    /// Speed: a 128-thread block running a loop of a load, an fma and a store index; and a
    /// 16×16-tiled matrix product through shared memory (32×384 by 384×1536, 256 threads).
    #[test]
    #[ignore = "a measurement; run with --ignored --nocapture"]
    fn speed() {
        let (acc, j) = (2, 3);
        let iters = 20_000i64;
        let body = vec![
            let_(acc, f(0.0)),
            for_(
                j,
                int(0),
                int(iters),
                1,
                vec![set(acc, fma(load(0, add(mul(var(j), int(128)), thread())), f(1.0001), var(acc)))],
            ),
            store(1, thread(), var(acc)),
        ];
        let k = gpu("speed", vec![fb("x", 128 * iters as usize), fb("out", 128)], vec![], 1, 128, body);
        let t = std::time::Instant::now();
        sim(&k, &[]).0.unwrap();
        let s = t.elapsed().as_secs_f64();
        // Per iteration and thread: fma, load, add, mul, var, int, thread, f32, var (9 nodes),
        // the set and the loop step.
        let thread_iters = 128.0 * iters as f64;
        println!(
            "loop: {:.1} M thread-iterations/s, {:.0} M nodes/s",
            thread_iters / s / 1e6,
            9.0 * thread_iters / s / 1e6
        );

        let (m, n, kk, t16) = (32i64, 1536i64, 384i64, 16i64);
        let (ti, tj, ty, tx, row, col, k0, q) = (4, 5, 6, 7, 8, 9, 10, 11);
        let tn = n / t16;
        let body = vec![
            let_(ti, div(block(), int(tn))),
            let_(tj, sub(block(), mul(var(ti), int(tn)))),
            let_(ty, div(thread(), int(t16))),
            let_(tx, sub(thread(), mul(var(ty), int(t16)))),
            let_(row, add(mul(var(ti), int(t16)), var(ty))),
            let_(col, add(mul(var(tj), int(t16)), var(tx))),
            let_(acc, f(0.0)),
            for_(
                k0,
                int(0),
                int(kk),
                t16,
                vec![
                    store(
                        3,
                        add(mul(var(ty), int(t16)), var(tx)),
                        load(0, add(mul(var(row), int(kk)), add(var(k0), var(tx)))),
                    ),
                    store(
                        4,
                        add(mul(var(ty), int(t16)), var(tx)),
                        load(1, add(mul(add(mul(var(tj), int(t16)), var(ty)), int(kk)), add(var(k0), var(tx)))),
                    ),
                    Stmt::Barrier,
                    for_(
                        q,
                        int(0),
                        int(t16),
                        1,
                        vec![set(
                            acc,
                            fma(
                                load(3, add(mul(var(ty), int(t16)), var(q))),
                                load(4, add(mul(var(tx), int(t16)), var(q))),
                                var(acc),
                            ),
                        )],
                    ),
                    Stmt::Barrier,
                ],
            ),
            store(2, add(mul(var(row), int(n)), var(col)), var(acc)),
        ];
        let (mu, nu, ku) = (m as usize, n as usize, kk as usize);
        let bufs = vec![fb("x", mu * ku), fb("w", nu * ku), fb("out", mu * nu)];
        let grid = (m / t16 * tn) as u32;
        let k = gpu("gemm", bufs, vec![fb("x_tile", 256), fb("w_tile", 256)], grid, 256, body);
        let x: Vec<f32> = (0..mu * ku).map(|i| (i % 7) as f32 - 3.0).collect();
        let w: Vec<f32> = (0..nu * ku).map(|i| (i % 5) as f32 * 0.5).collect();
        let t = std::time::Instant::now();
        let (r, out) = sim(&k, &[(0, bytes_f(&x)), (1, bytes_f(&w))]);
        r.unwrap();
        let s = t.elapsed().as_secs_f64();
        let out = floats(&out[2]);
        for (i, jj) in [(0, 0), (5, 700), (31, 1535)] {
            let want: f32 = (0..ku).map(|p| x[i * ku + p] * w[jj * ku + p]).sum();
            assert_eq!(out[i * nu + jj], want);
        }
        // Per inner iteration and thread: 15 nodes (2 tracked shared loads).
        let inner = (m * n * kk) as f64;
        println!(
            "gemm 32x384x1536: {s:.2} s, {:.1} M inner thread-iterations/s, {:.0} M nodes/s",
            inner / s / 1e6,
            15.0 * inner / s / 1e6
        );
    }
}
