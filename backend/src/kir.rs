//! The kernel IR: what one kernel does, as static loop nests over flat buffers.
//!
//! A kernel receives an array of buffer base pointers, a pointer to the runtime's function
//! table, and a range `[start, end)` of its outermost (parallel) loop: the runtime splits
//! `0..parallel_extent` across threads and calls the kernel once per piece. Inside, the body
//! is structured: `For` loops with a constant step, `Let`/`Set` of local variables, `Store`s
//! to buffers. Expressions are typed `i64` (indices), `f32` or `f32x4` (four lanes, loaded
//! from and stored to four consecutive elements). This is enough to express tiling, register
//! blocking and vectorisation explicitly; the emitters (Cranelift now, PTX later) only
//! translate, they do not schedule.

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
}

/// Element type of a buffer as the kernel reads it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Elem {
    F32,
    /// Read as i32, widened to i64 (token ids, positions).
    I32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BinOp {
    Add,
    Sub,
    Mul,
    Div,
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
    /// `f32` → `f32x4`.
    Splat(Box<Expr>),
    /// `f32x4` → `f32`: the sum / the maximum of the lanes.
    HSum(Box<Expr>),
    HMax(Box<Expr>),
    /// Four `f32` → one `f32x4` (lane `i` from element `i`).
    Pack(Vec<Expr>),
    /// `if a <op> b (i64) then x else y`.
    Select {
        op: CmpOp,
        a: Box<Expr>,
        b: Box<Expr>,
        then: Box<Expr>,
        otherwise: Box<Expr>,
    },
}

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
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Buffer {
    pub name: String,
    pub elem: Elem,
    /// Length in elements; every access stays inside it.
    pub len: usize,
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
}

impl fmt::Display for Kernel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "kernel {} (parallel 0..{}) {{", self.name, self.parallel_extent)?;
        for (i, b) in self.buffers.iter().enumerate() {
            writeln!(f, "  buf{i} {}: {:?}[{}]", b.name, b.elem, b.len)?;
        }
        fn stmts(f: &mut fmt::Formatter<'_>, s: &[Stmt], depth: usize) -> fmt::Result {
            let pad = "  ".repeat(depth);
            for st in s {
                match st {
                    Stmt::Let { var, value } => writeln!(f, "{pad}let v{var} = {value:?}")?,
                    Stmt::Set { var, value } => writeln!(f, "{pad}v{var} = {value:?}")?,
                    Stmt::Store { buf, index, value } => writeln!(f, "{pad}buf{buf}[{index:?}] = {value:?}")?,
                    Stmt::For { var, start, end, step, body } => {
                        writeln!(f, "{pad}for v{var} in {start:?}..{end:?} step {step} {{")?;
                        stmts(f, body, depth + 1)?;
                        writeln!(f, "{pad}}}")?;
                    }
                }
            }
            Ok(())
        }
        stmts(f, &self.body, 1)?;
        writeln!(f, "}}")
    }
}
