//! The kernel IR: what one kernel does, as static loop nests over flat buffers.
//!
//! A kernel receives an array of buffer base pointers, a pointer to the runtime's function
//! table, and a range `[start, end)` of its outermost (parallel) loop: the runtime splits
//! `0..parallel_extent` across threads and calls the kernel once per piece. Inside, the body
//! is structured: `For` loops with a constant step, `Let`/`Set` of local variables, `Store`s
//! to buffers. Expressions are typed: `i64` (indices, and integer scalars read from or
//! written to integer buffers), `f32`, and 128-bit vectors by element and lane count
//! (`f32x4`, `i32x4`, `i8x16`, `u8x16`; a vector load or store touches that many
//! consecutive elements). Buffers are typed too ([`Elem`]); an element is 1 or 4 bytes, and
//! addresses scale by the element's size. Integer dot products are one expression
//! ([`Expr::Dot4`]) that the emitter expands into the widening multiply/pairwise-add tree
//! Cranelift folds into `vpdpbusd` on VNNI targets. This is enough to express tiling,
//! register blocking and vectorisation explicitly; the emitters (Cranelift now, PTX later)
//! only translate, they do not schedule.

use std::fmt;

/// Variable ids. Ids 0 and 1 are the parallel range `start` and `end`.
pub type Var = u32;
pub const START: Var = 0;
pub const END: Var = 1;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Ty {
    I64,
    F32,
    F32x4,
    I32x4,
    I8x16,
    U8x16,
}

impl Ty {
    /// Lanes of a vector type (1 for scalars).
    pub fn lanes(self) -> usize {
        match self {
            Ty::I64 | Ty::F32 => 1,
            Ty::F32x4 | Ty::I32x4 => 4,
            Ty::I8x16 | Ty::U8x16 => 16,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Ty::I64 => "i64",
            Ty::F32 => "f32",
            Ty::F32x4 => "f32x4",
            Ty::I32x4 => "i32x4",
            Ty::I8x16 => "i8x16",
            Ty::U8x16 => "u8x16",
        }
    }

    /// The vector type this buffer element type is loaded as, lane for lane.
    pub fn vector_of(e: Elem) -> Ty {
        match e {
            Elem::F32 => Ty::F32x4,
            Elem::I32 => Ty::I32x4,
            Elem::I8 => Ty::I8x16,
            Elem::U8 => Ty::U8x16,
        }
    }

    /// The scalar type an element of `e` is read as: `f32`, or an integer widened to `i64`.
    pub fn scalar_of(e: Elem) -> Ty {
        if e == Elem::F32 {
            Ty::F32
        } else {
            Ty::I64
        }
    }
}

/// Element type of a buffer. Integer elements read as scalars are widened to `i64` (signed
/// for `i32` and `i8`, unsigned for `u8`); an `i64` stored to them keeps its low bits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Elem {
    F32,
    /// Token ids, positions; int8 zero-point sums.
    I32,
    /// Quantized weights.
    I8,
    /// Quantized activations (zero point 128).
    U8,
}

impl Elem {
    pub fn size(self) -> usize {
        match self {
            Elem::F32 | Elem::I32 => 4,
            Elem::I8 | Elem::U8 => 1,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Elem::F32 => "f32",
            Elem::I32 => "i32",
            Elem::I8 => "i8",
            Elem::U8 => "u8",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BinOp {
    Add,
    Sub,
    Mul,
    Div,
    /// On floats, as Rust's `f32::min`/`max`: a NaN operand loses to a number.
    Min,
    Max,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum UnOp {
    Neg,
    Abs,
    Sqrt,
    /// `e^x`, emitted inline as a polynomial (relative error ~2e-7); exactly 0 below -87.
    Exp,
    /// `e^x` to about five significant digits (relative error < 5e-5), for values about to
    /// be rounded to 8 bits: a degree-4 polynomial, one clamp. Below -87 it gives a value
    /// under 1e-37 rather than exactly 0; NaN stays NaN.
    ExpLow,
    /// `erf(x)`, emitted inline (Abramowitz–Stegun 7.1.26, absolute error < 2e-7).
    Erf,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CmpOp {
    Lt,
    Le,
    Eq,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Expr {
    Int(i64),
    F32(f32),
    Var(Var),
    /// Element `index` of buffer `buf` (four consecutive elements when `ty` is `F32x4`).
    Load {
        buf: u32,
        index: Box<Expr>,
        ty: Ty,
    },
    Bin(BinOp, Box<Expr>, Box<Expr>),
    /// `a * b + c`.
    Fma(Box<Expr>, Box<Expr>, Box<Expr>),
    Un(UnOp, Box<Expr>),
    /// `f32` → `f32x4`, `i64` → `i32x4` (low 32 bits).
    Splat(Box<Expr>),
    /// `f32x4` → `f32`: the sum / the maximum of the lanes.
    HSum(Box<Expr>),
    HMax(Box<Expr>),
    /// Four `f32` → one `f32x4`, or four `i64` → one `i32x4` (low 32 bits), lane `i` from
    /// element `i`.
    Pack(Vec<Expr>),
    /// `acc + dot4(w, x)`: lane `l` of the `i32x4` accumulator plus
    /// `Σ_{q<4} w[4l+q] · x[4l+q]` of an `i8x16` and a `u8x16` (exact: each product fits
    /// 16 bits, the sums 32 bits). Emitted as the tree Cranelift folds into `vpdpbusd`.
    Dot4 {
        acc: Box<Expr>,
        w: Box<Expr>,
        x: Box<Expr>,
    },
    /// Pairwise sums of two `i32x4`: `[a0+a1, a2+a3, b0+b1, b2+b3]`. Two levels of it turn
    /// four accumulators into one vector of their four totals.
    PairAdd(Box<Expr>, Box<Expr>),
    /// Conversion to `Ty`: `i32x4 → f32x4`, `i64 → f32` (round to nearest), `f32x4 → i32x4`
    /// and `f32 → i64` (round half to even, saturating, NaN → 0).
    Cvt(Ty, Box<Expr>),
    /// Four `i32x4` → one `u8x16` or `i8x16`, lane `4q+l` from lane `l` of operand `q`,
    /// saturating to the target's range.
    Narrow(Ty, Vec<Expr>),
    /// Lane `lane` of a vector, as a scalar (`i32x4` lanes widen to `i64`).
    Lane(Box<Expr>, u8),
    /// `if a <op> b (i64) then x else y`.
    Select {
        op: CmpOp,
        a: Box<Expr>,
        b: Box<Expr>,
        then: Box<Expr>,
        otherwise: Box<Expr>,
    },
    /// GPU kernels only: the thread's index in its block, or the block's index in the grid
    /// (`i64`, from 0).
    Gpu(GpuIdx),
    /// GPU kernels only: the `f32` value of the thread whose lane in the warp is this
    /// thread's lane XOR `mask` (a butterfly exchange; every lane of the warp takes part).
    ShflXor(Box<Expr>, u32),
}

/// The indices a GPU thread knows itself by.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GpuIdx {
    Thread,
    Block,
}

/// How a GPU kernel is launched: `grid` blocks of `block` threads (one dimension each).
/// The block size is a multiple of the warp (32).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct GpuLaunch {
    pub grid: u32,
    pub block: u32,
}

/// Lanes of a warp: the unit of `ShflXor`.
pub const WARP: u32 = 32;

#[derive(Clone, Debug, PartialEq)]
pub enum Stmt {
    /// Declares a local variable with its first value.
    Let {
        var: Var,
        value: Expr,
    },
    Set {
        var: Var,
        value: Expr,
    },
    Store {
        buf: u32,
        index: Expr,
        value: Expr,
    },
    /// `for var in (start..end).step_by(step)`, `step > 0`.
    For {
        var: Var,
        start: Expr,
        end: Expr,
        step: i64,
        body: Vec<Stmt>,
    },
    /// GPU kernels only: `if a <op> b (i64) { then }`.
    If {
        op: CmpOp,
        a: Expr,
        b: Expr,
        then: Vec<Stmt>,
    },
    /// GPU kernels only: every thread of the block waits here until all have arrived, and
    /// the shared-memory writes before it are visible to all after it. Reached by every
    /// thread of the block or by none (never under a condition that differs by thread).
    Barrier,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Buffer {
    pub name: String,
    pub elem: Elem,
    /// Length in elements; every access stays inside it.
    pub len: usize,
}

impl Buffer {
    pub fn bytes(&self) -> usize {
        self.len * self.elem.size()
    }
}

/// How a kernel uses a buffer (derived from its body): the artifact's notion, recorded in
/// the `.wbin` per kernel argument.
pub use wcc_format::Access;

impl Kernel {
    /// How the kernel uses each buffer: read, written, or both.
    pub fn access(&self) -> Vec<Access> {
        let mut read = vec![false; self.buffers.len()];
        let mut written = vec![false; self.buffers.len()];
        fn expr(e: &Expr, read: &mut [bool]) {
            e.visit(&mut |e| {
                if let Expr::Load { buf, .. } = e {
                    if let Some(r) = read.get_mut(*buf as usize) {
                        *r = true;
                    }
                }
            });
        }
        fn stmts(s: &[Stmt], read: &mut [bool], written: &mut [bool]) {
            for st in s {
                match st {
                    Stmt::Let { value, .. } | Stmt::Set { value, .. } => expr(value, read),
                    Stmt::Store { buf, index, value } => {
                        expr(index, read);
                        expr(value, read);
                        if let Some(w) = written.get_mut(*buf as usize) {
                            *w = true;
                        }
                    }
                    Stmt::For { start, end, body, .. } => {
                        expr(start, read);
                        expr(end, read);
                        stmts(body, read, written);
                    }
                    Stmt::If { a, b, then, .. } => {
                        expr(a, read);
                        expr(b, read);
                        stmts(then, read, written);
                    }
                    Stmt::Barrier => {}
                }
            }
        }
        stmts(&self.body, &mut read, &mut written);
        read.iter()
            .zip(&written)
            .map(|(&r, &w)| match (r, w) {
                (_, false) => Access::Read,
                (false, true) => Access::Write,
                (true, true) => Access::ReadWrite,
            })
            .collect()
    }
}

impl Expr {
    /// Calls `f` on this expression and every sub-expression, parents first.
    pub fn visit(&self, f: &mut dyn FnMut(&Expr)) {
        f(self);
        match self {
            Expr::Int(_) | Expr::F32(_) | Expr::Var(_) | Expr::Gpu(_) => {}
            Expr::Load { index, .. } => index.visit(f),
            Expr::ShflXor(a, _) => a.visit(f),
            Expr::Bin(_, a, b) | Expr::PairAdd(a, b) => {
                a.visit(f);
                b.visit(f);
            }
            Expr::Fma(a, b, c) => {
                a.visit(f);
                b.visit(f);
                c.visit(f);
            }
            Expr::Dot4 { acc, w, x } => {
                acc.visit(f);
                w.visit(f);
                x.visit(f);
            }
            Expr::Un(_, a) | Expr::Splat(a) | Expr::HSum(a) | Expr::HMax(a) | Expr::Cvt(_, a) | Expr::Lane(a, _) => {
                a.visit(f)
            }
            Expr::Pack(xs) | Expr::Narrow(_, xs) => xs.iter().for_each(|x| x.visit(f)),
            Expr::Select { a, b, then, otherwise, .. } => {
                a.visit(f);
                b.visit(f);
                then.visit(f);
                otherwise.visit(f);
            }
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Kernel {
    pub name: String,
    pub buffers: Vec<Buffer>,
    /// The outermost loop's trip count: the runtime calls the kernel on sub-ranges of it.
    pub parallel_extent: u64,
    /// Roughly how many floating-point operations one whole call does (for scheduling).
    pub flops: u64,
    pub body: Vec<Stmt>,
    /// Number of variables used (ids `0..vars`).
    pub vars: u32,
    /// `Some` for a GPU kernel: its grid and block. `start` and `end` then begin as `0` and
    /// `parallel_extent` in every thread; the body maps the threads onto the work itself.
    pub launch: Option<GpuLaunch>,
    /// Scratch memory the kernel owns, not passed in. Buffer index `buffers.len() + i` is
    /// `shared[i]`, uninitialised at the start. On a GPU it is per-block shared memory; on
    /// the CPU it is private to one call (one thread's slice of the parallel loop, on that
    /// thread's stack), so a kernel must write what it reads there within the parallel index
    /// that reads it (the fused attention keeps a few rows' scores there).
    pub shared: Vec<Buffer>,
}

impl Kernel {
    /// The buffer with index `buf`: an argument, or (past them) a shared-memory buffer.
    pub fn buffer(&self, buf: u32) -> Option<&Buffer> {
        let b = buf as usize;
        self.buffers.get(b).or_else(|| self.shared.get(b.checked_sub(self.buffers.len())?))
    }

    /// Bytes of shared memory one block uses.
    pub fn shared_bytes(&self) -> usize {
        self.shared.iter().map(Buffer::bytes).sum()
    }
}

/// Shorthand constructors for building kernel bodies.
pub mod build {
    use super::*;

    pub fn int(v: i64) -> Expr {
        Expr::Int(v)
    }
    pub fn f(v: f32) -> Expr {
        Expr::F32(v)
    }
    pub fn var(v: Var) -> Expr {
        Expr::Var(v)
    }
    pub fn bin(op: BinOp, a: Expr, b: Expr) -> Expr {
        Expr::Bin(op, Box::new(a), Box::new(b))
    }
    pub fn add(a: Expr, b: Expr) -> Expr {
        bin(BinOp::Add, a, b)
    }
    pub fn sub(a: Expr, b: Expr) -> Expr {
        bin(BinOp::Sub, a, b)
    }
    pub fn mul(a: Expr, b: Expr) -> Expr {
        bin(BinOp::Mul, a, b)
    }
    pub fn div(a: Expr, b: Expr) -> Expr {
        bin(BinOp::Div, a, b)
    }
    pub fn min(a: Expr, b: Expr) -> Expr {
        bin(BinOp::Min, a, b)
    }
    pub fn max(a: Expr, b: Expr) -> Expr {
        bin(BinOp::Max, a, b)
    }
    pub fn fma(a: Expr, b: Expr, c: Expr) -> Expr {
        Expr::Fma(Box::new(a), Box::new(b), Box::new(c))
    }
    pub fn un(op: UnOp, a: Expr) -> Expr {
        Expr::Un(op, Box::new(a))
    }
    pub fn splat(a: Expr) -> Expr {
        Expr::Splat(Box::new(a))
    }
    pub fn hsum(a: Expr) -> Expr {
        Expr::HSum(Box::new(a))
    }
    pub fn hmax(a: Expr) -> Expr {
        Expr::HMax(Box::new(a))
    }
    pub fn pack(lanes: Vec<Expr>) -> Expr {
        Expr::Pack(lanes)
    }
    pub fn load(buf: u32, index: Expr) -> Expr {
        Expr::Load { buf, index: Box::new(index), ty: Ty::F32 }
    }
    pub fn load4(buf: u32, index: Expr) -> Expr {
        Expr::Load { buf, index: Box::new(index), ty: Ty::F32x4 }
    }
    pub fn load_i(buf: u32, index: Expr) -> Expr {
        Expr::Load { buf, index: Box::new(index), ty: Ty::I64 }
    }
    /// A load of `ty` (a vector of the buffer's element type, or its scalar).
    pub fn load_as(ty: Ty, buf: u32, index: Expr) -> Expr {
        Expr::Load { buf, index: Box::new(index), ty }
    }
    pub fn dot4(acc: Expr, w: Expr, x: Expr) -> Expr {
        Expr::Dot4 { acc: Box::new(acc), w: Box::new(w), x: Box::new(x) }
    }
    pub fn pair_add(a: Expr, b: Expr) -> Expr {
        Expr::PairAdd(Box::new(a), Box::new(b))
    }
    pub fn cvt(ty: Ty, a: Expr) -> Expr {
        Expr::Cvt(ty, Box::new(a))
    }
    pub fn narrow(ty: Ty, parts: Vec<Expr>) -> Expr {
        Expr::Narrow(ty, parts)
    }
    pub fn lane(a: Expr, l: u8) -> Expr {
        Expr::Lane(Box::new(a), l)
    }
    pub fn select(op: CmpOp, a: Expr, b: Expr, then: Expr, otherwise: Expr) -> Expr {
        Expr::Select { op, a: Box::new(a), b: Box::new(b), then: Box::new(then), otherwise: Box::new(otherwise) }
    }
    pub fn store(buf: u32, index: Expr, value: Expr) -> Stmt {
        Stmt::Store { buf, index, value }
    }
    pub fn let_(var: Var, value: Expr) -> Stmt {
        Stmt::Let { var, value }
    }
    pub fn set(var: Var, value: Expr) -> Stmt {
        Stmt::Set { var, value }
    }
    pub fn for_(var: Var, start: Expr, end: Expr, step: i64, body: Vec<Stmt>) -> Stmt {
        Stmt::For { var, start, end, step, body }
    }
    pub fn if_(op: CmpOp, a: Expr, b: Expr, then: Vec<Stmt>) -> Stmt {
        Stmt::If { op, a, b, then }
    }
    pub fn thread() -> Expr {
        Expr::Gpu(GpuIdx::Thread)
    }
    pub fn block() -> Expr {
        Expr::Gpu(GpuIdx::Block)
    }
    pub fn shfl_xor(a: Expr, mask: u32) -> Expr {
        Expr::ShflXor(Box::new(a), mask)
    }
}

/// The name a variable is printed as: `start` and `end` for the parallel range, else `vN`.
pub fn var_name(v: Var) -> String {
    match v {
        START => "start".into(),
        END => "end".into(),
        _ => format!("v{v}"),
    }
}

impl CmpOp {
    pub fn symbol(self) -> &'static str {
        match self {
            CmpOp::Lt => "<",
            CmpOp::Le => "<=",
            CmpOp::Eq => "==",
        }
    }
}

impl UnOp {
    pub fn name(self) -> &'static str {
        match self {
            UnOp::Neg => "neg",
            UnOp::Abs => "abs",
            UnOp::Sqrt => "sqrt",
            UnOp::Exp => "exp",
            UnOp::ExpLow => "exp_low",
            UnOp::Erf => "erf",
        }
    }
}

impl BinOp {
    pub fn name(self) -> &'static str {
        match self {
            BinOp::Add => "add",
            BinOp::Sub => "sub",
            BinOp::Mul => "mul",
            BinOp::Div => "div",
            BinOp::Min => "min",
            BinOp::Max => "max",
        }
    }
}

/// Types of `start` and `end` only: what is known of variables without a kernel around.
fn range_types(v: Var) -> Option<Ty> {
    (v == START || v == END).then_some(Ty::I64)
}

impl Expr {
    /// The type of this expression under the emitter's typing rules, given the types of the
    /// variables (`var_ty`); `None` when it is ill-typed or a variable's type is unknown.
    pub fn ty(&self, var_ty: &dyn Fn(Var) -> Option<Ty>) -> Option<Ty> {
        let t = |e: &Expr| e.ty(var_ty);
        Some(match self {
            Expr::Int(_) => Ty::I64,
            Expr::F32(_) => Ty::F32,
            Expr::Var(v) => var_ty(*v)?,
            Expr::Load { index, ty, .. } => {
                (t(index)? == Ty::I64).then_some(())?;
                *ty
            }
            Expr::Bin(op, a, b) => {
                let (x, y) = (t(a)?, t(b)?);
                let bad = matches!(x, Ty::I8x16 | Ty::U8x16) || (x == Ty::I32x4 && *op == BinOp::Div);
                (x == y && !bad).then_some(x)?
            }
            Expr::Fma(a, b, c) => {
                let (x, y, z) = (t(a)?, t(b)?, t(c)?);
                (x == y && y == z && matches!(x, Ty::F32 | Ty::F32x4)).then_some(x)?
            }
            Expr::Un(_, a) => Some(t(a)?).filter(|x| matches!(x, Ty::F32 | Ty::F32x4))?,
            Expr::Splat(a) => match t(a)? {
                Ty::F32 => Ty::F32x4,
                Ty::I64 => Ty::I32x4,
                _ => return None,
            },
            Expr::HSum(a) | Expr::HMax(a) => (t(a)? == Ty::F32x4).then_some(Ty::F32)?,
            Expr::Pack(xs) => {
                let lane = t(xs.first()?)?;
                let ok = xs.len() == 4 && xs.iter().all(|x| t(x) == Some(lane));
                match lane {
                    Ty::F32 if ok => Ty::F32x4,
                    Ty::I64 if ok => Ty::I32x4,
                    _ => return None,
                }
            }
            Expr::Dot4 { acc, w, x } => {
                ((t(acc)?, t(w)?, t(x)?) == (Ty::I32x4, Ty::I8x16, Ty::U8x16)).then_some(Ty::I32x4)?
            }
            Expr::PairAdd(a, b) => ((t(a)?, t(b)?) == (Ty::I32x4, Ty::I32x4)).then_some(Ty::I32x4)?,
            Expr::Cvt(to, a) => match (t(a)?, *to) {
                (Ty::I32x4, Ty::F32x4) | (Ty::I64, Ty::F32) | (Ty::F32x4, Ty::I32x4) | (Ty::F32, Ty::I64) => *to,
                _ => return None,
            },
            Expr::Narrow(to, xs) => {
                let ok =
                    xs.len() == 4 && matches!(to, Ty::I8x16 | Ty::U8x16) && xs.iter().all(|x| t(x) == Some(Ty::I32x4));
                ok.then_some(*to)?
            }
            Expr::Lane(a, l) => match t(a)? {
                Ty::I32x4 if *l < 4 => Ty::I64,
                Ty::F32x4 if *l < 4 => Ty::F32,
                _ => return None,
            },
            Expr::Select { a, b, then, otherwise, .. } => {
                ((t(a)?, t(b)?) == (Ty::I64, Ty::I64)).then_some(())?;
                let (x, y) = (t(then)?, t(otherwise)?);
                (x == y).then_some(x)?
            }
            Expr::Gpu(_) => Ty::I64,
            Expr::ShflXor(a, _) => (t(a)? == Ty::F32).then_some(Ty::F32)?,
        })
    }

    /// The text form (see [`Kernel`]'s `Display`), given the types of variables (they name
    /// the result type of a `splat`).
    pub fn text(&self, var_ty: &dyn Fn(Var) -> Option<Ty>) -> String {
        let mut out = String::new();
        Printer { var_ty }.expr(&mut out, self, 0);
        out
    }
}

/// Without variable types: a `splat` of a variable other than `start`/`end` prints as
/// `splat(x)` rather than `splat.<ty>(x)`.
impl fmt::Display for Expr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text(&range_types))
    }
}

impl Stmt {
    /// One line of text: `let vN = …`, `vN = …`, `bufN[…] = …`, or a loop's header
    /// `for vN in a..b step s {` (without its body).
    pub fn line(&self, var_ty: &dyn Fn(Var) -> Option<Ty>) -> String {
        let p = Printer { var_ty };
        let mut out = String::new();
        match self {
            Stmt::Let { var, value } => {
                out.push_str(&format!("let {} = ", var_name(*var)));
                p.expr(&mut out, value, 0);
            }
            Stmt::Set { var, value } => {
                out.push_str(&format!("{} = ", var_name(*var)));
                p.expr(&mut out, value, 0);
            }
            Stmt::Store { buf, index, value } => {
                out.push_str(&format!("buf{buf}["));
                p.expr(&mut out, index, 0);
                out.push_str("] = ");
                p.expr(&mut out, value, 0);
            }
            Stmt::For { var, start, end, step, .. } => {
                out.push_str(&format!("for {} in ", var_name(*var)));
                p.expr(&mut out, start, 0);
                out.push_str("..");
                p.expr(&mut out, end, 0);
                if *step != 1 {
                    out.push_str(&format!(" step {step}"));
                }
                out.push_str(" {");
            }
            Stmt::If { op, a, b, .. } => {
                out.push_str("if ");
                p.expr(&mut out, a, 0);
                out.push_str(&format!(" {} ", op.symbol()));
                p.expr(&mut out, b, 0);
                out.push_str(" {");
            }
            Stmt::Barrier => out.push_str("barrier"),
        }
        out
    }
}

/// Binding strength of an expression's outermost operator in the text form: sums, products,
/// negation (and negative literals), then atoms (names, literals, calls, loads).
fn precedence(e: &Expr) -> u8 {
    match e {
        Expr::Bin(BinOp::Add | BinOp::Sub, ..) => 1,
        Expr::Bin(BinOp::Mul | BinOp::Div, ..) => 2,
        Expr::Un(UnOp::Neg, _) => 3,
        Expr::Int(v) if *v < 0 => 3,
        Expr::F32(v) if v.is_sign_negative() && !v.is_nan() => 3,
        _ => 4,
    }
}

struct Printer<'a> {
    var_ty: &'a dyn Fn(Var) -> Option<Ty>,
}

impl Printer<'_> {
    /// Writes `e`, parenthesised when it binds less tightly than `min`.
    fn expr(&self, out: &mut String, e: &Expr, min: u8) {
        let paren = precedence(e) < min;
        if paren {
            out.push('(');
        }
        match e {
            Expr::Int(v) => out.push_str(&v.to_string()),
            // `{:?}` is the shortest text that reads back as the same f32.
            Expr::F32(v) => out.push_str(&format!("{v:?}")),
            Expr::Var(v) => out.push_str(&var_name(*v)),
            Expr::Load { buf, index, ty } => {
                out.push_str(&format!("load.{} buf{buf}[", ty.name()));
                self.expr(out, index, 0);
                out.push(']');
            }
            Expr::Bin(op @ (BinOp::Add | BinOp::Sub | BinOp::Mul | BinOp::Div), a, b) => {
                let (p, sym) = match op {
                    BinOp::Add => (1, " + "),
                    BinOp::Sub => (1, " - "),
                    BinOp::Mul => (2, " * "),
                    _ => (2, " / "),
                };
                // Left-associative: an operand of the same strength on the right keeps its
                // parentheses, so the text shows the tree exactly.
                self.expr(out, a, p);
                out.push_str(sym);
                self.expr(out, b, p + 1);
            }
            Expr::Bin(op, a, b) => self.call(out, op.name(), &[a, b]),
            Expr::Fma(a, b, c) => self.call(out, "fma", &[a, b, c]),
            Expr::Un(UnOp::Neg, a) => {
                out.push('-');
                self.expr(out, a, 4);
            }
            Expr::Un(op, a) => self.call(out, op.name(), &[a]),
            Expr::Splat(a) => {
                let name = match a.ty(self.var_ty) {
                    Some(Ty::F32) => "splat.f32x4",
                    Some(Ty::I64) => "splat.i32x4",
                    _ => "splat",
                };
                self.call(out, name, &[a]);
            }
            Expr::HSum(a) => self.call(out, "hsum", &[a]),
            Expr::HMax(a) => self.call(out, "hmax", &[a]),
            Expr::Pack(xs) => self.call(out, "pack", &xs.iter().collect::<Vec<_>>()),
            Expr::Dot4 { acc, w, x } => self.call(out, "dot4", &[acc, w, x]),
            Expr::PairAdd(a, b) => self.call(out, "pair_add", &[a, b]),
            Expr::Cvt(to, a) => self.call(out, &format!("cvt.{}", to.name()), &[a]),
            Expr::Narrow(to, xs) => self.call(out, &format!("narrow.{}", to.name()), &xs.iter().collect::<Vec<_>>()),
            Expr::Lane(a, l) => {
                out.push_str("lane(");
                self.expr(out, a, 0);
                out.push_str(&format!(", {l})"));
            }
            Expr::Select { op, a, b, then, otherwise } => {
                out.push_str("select(");
                self.expr(out, a, 0);
                out.push_str(&format!(" {} ", op.symbol()));
                self.expr(out, b, 0);
                out.push_str(", ");
                self.expr(out, then, 0);
                out.push_str(", ");
                self.expr(out, otherwise, 0);
                out.push(')');
            }
            Expr::Gpu(GpuIdx::Thread) => out.push_str("thread"),
            Expr::Gpu(GpuIdx::Block) => out.push_str("block"),
            Expr::ShflXor(a, m) => {
                out.push_str("shfl_xor(");
                self.expr(out, a, 0);
                out.push_str(&format!(", {m})"));
            }
        }
        if paren {
            out.push(')');
        }
    }

    fn call(&self, out: &mut String, name: &str, args: &[&Expr]) {
        out.push_str(name);
        out.push('(');
        for (i, a) in args.iter().enumerate() {
            if i > 0 {
                out.push_str(", ");
            }
            self.expr(out, a, 0);
        }
        out.push(')');
    }
}

/// The kernel as text: its header, one line per buffer (element type, length, how the
/// kernel uses it), and the body with infix arithmetic, e.g.
///
/// ```text
/// kernel scale_8 (parallel 0..1) {
///   buf0 x: f32[8] read
///   buf1 out: f32[8] write
///   for v2 in start..end {
///     for v3 in 0..8 step 4 {
///       buf1[v3] = load.f32x4 buf0[v3] * splat.f32x4(0.5)
///     }
///   }
/// }
/// ```
impl fmt::Display for Kernel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.launch {
            None => writeln!(f, "kernel {} (parallel 0..{}) {{", self.name, self.parallel_extent)?,
            Some(l) => writeln!(
                f,
                "kernel {} (parallel 0..{}, grid {}, block {}) {{",
                self.name, self.parallel_extent, l.grid, l.block
            )?,
        }
        for ((i, b), a) in self.buffers.iter().enumerate().zip(self.access()) {
            writeln!(f, "  buf{i} {}: {}[{}] {}", b.name, b.elem.name(), b.len, a.name())?;
        }
        for (i, b) in self.shared.iter().enumerate() {
            let kind = if self.launch.is_some() { "shared" } else { "local" };
            writeln!(f, "  buf{} {}: {}[{}] {kind}", self.buffers.len() + i, b.name, b.elem.name(), b.len)?;
        }
        // Variable types as declared so far (like the emitter: a declaration stays visible
        // after its block, for printing).
        let mut types: std::collections::HashMap<Var, Ty> = [(START, Ty::I64), (END, Ty::I64)].into();
        fn stmts(
            f: &mut fmt::Formatter<'_>,
            s: &[Stmt],
            depth: usize,
            types: &mut std::collections::HashMap<Var, Ty>,
        ) -> fmt::Result {
            let pad = "  ".repeat(depth);
            for st in s {
                let line = st.line(&|v| types.get(&v).copied());
                writeln!(f, "{pad}{line}")?;
                match st {
                    Stmt::Let { var, value } => {
                        match value.ty(&|v| types.get(&v).copied()) {
                            Some(t) => types.insert(*var, t),
                            None => types.remove(var),
                        };
                    }
                    Stmt::For { var, body, .. } => {
                        types.insert(*var, Ty::I64);
                        stmts(f, body, depth + 1, types)?;
                        writeln!(f, "{pad}}}")?;
                    }
                    Stmt::If { then, .. } => {
                        stmts(f, then, depth + 1, types)?;
                        writeln!(f, "{pad}}}")?;
                    }
                    _ => {}
                }
            }
            Ok(())
        }
        stmts(f, &self.body, 1, &mut types)?;
        writeln!(f, "}}")
    }
}
