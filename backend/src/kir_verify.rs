//! A static check of a kernel before it is emitted: [`verify`].
//!
//! - **Types**: every expression is typed by the rules the Cranelift emitter enforces
//!   (loads and stores by element type, arithmetic on matching types, `fma` on floats,
//!   `dot4` of `i32x4`, `i8x16`, `u8x16`, `pack` of four `f32` or four `i64`, the
//!   conversion pairs, …); a `Set` keeps its variable's type; loop bounds and indices are
//!   `i64`.
//! - **Scope**: a variable is used only after its `Let` or `For` in an enclosing block
//!   (`start` and `end` are always bound); a `Set` targets a variable declared so, and never
//!   a loop variable or the parallel range.
//! - **Bounds**: every load and store stays inside its buffer, for every value of the
//!   parallel range. Integer expressions are evaluated to intervals (`start` and `end` range
//!   over `0..=parallel_extent`, a loop variable from its start's lowest value to the last
//!   value its end allows, a `Let` gets its value's interval, an `i64` variable that is ever
//!   `Set` is unknown, an integer loaded from a buffer ranges over its element type). To be
//!   precise on the loops [`crate::lower`] builds, expressions keep their structure (through
//!   `Let`s), and two shapes are recognised: `x - (x / c) * c` (a remainder, in
//!   `0..c` when `x ≥ 0`) and `a + ((b - a) / c) * c` (`b - a` rounded to a multiple of `c`
//!   towards zero, so between `a` and `b`). A loop `for j in a..e step s` whose end is
//!   `a + x·s'` (`s'` a multiple of `s`) ends with `j ≤ e - s`, so an access of up to `s`
//!   lanes at `j` stays below `e`.
//! - **Parallel slices**: the runtime runs pieces of `0..parallel_extent` on different
//!   threads, so each parallel index must store to its own elements: with the parallel
//!   range fixed to one index `p` (loops with known bounds enumerated, up to a budget, but
//!   for long innermost loops, whose stores are usually contiguous), the
//!   elements each buffer is stored to for `p` and for `p + 1` must be disjoint, for the
//!   pairs at the start, the middle and the end of the range. Stores outside the parallel
//!   loop (the top-level `for v in start..end`) are an error when the extent is above 1.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::rc::Rc;

use crate::kir::{var_name, BinOp, Buffer, Elem, Expr, Kernel, Stmt, Ty, Var, END, START};

/// What is wrong with a kernel; each names the kernel and the variable, buffer or
/// statement concerned (`at`: the statement's one-line text, shortened).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum KernelError {
    /// `var` is used where no `Let`/`For` of it is in scope.
    UnboundVar { kernel: String, var: Var, at: String },
    /// A `Set` of a variable with no declaration in scope.
    UndeclaredSet { kernel: String, var: Var, at: String },
    /// A GPU-only construct (thread or block index, shuffle, `if`, barrier, shared memory,
    /// a launch shape): this verifier proves CPU kernels; GPU kernels are checked by the
    /// simulating interpreter (`gpusim`).
    GpuConstruct { kernel: String, at: String },
    /// A `Set` of a loop variable, `start` or `end`.
    AssignToLoopVar { kernel: String, var: Var, at: String },
    /// A variable declared with an id not below [`Kernel::vars`].
    VarOutOfRange { kernel: String, var: Var, vars: u32, at: String },
    /// An expression or statement that breaks the typing rules (`what` says how).
    TypeMismatch { kernel: String, what: String, at: String },
    /// An access to a buffer index the kernel does not have.
    BadBuffer { kernel: String, buf: u32, buffers: usize, at: String },
    /// A loop whose step is not positive.
    BadStep { kernel: String, var: Var, step: i64 },
    /// An access (`at`: the load, or the store's target) whose index may lie in
    /// `index.0..=index.1`: with `lanes` elements from there it may leave `0..len`.
    OutOfBounds { kernel: String, buffer: String, buf: u32, index: (i64, i64), lanes: usize, len: usize, at: String },
    /// A store outside the parallel loop in a kernel whose parallel extent is above 1.
    UnslicedStore { kernel: String, buffer: String, buf: u32, extent: u64, at: String },
    /// Parallel indices `p` and `q` (= `p + 1`) both store to elements `elements.0..=elements.1`
    /// of the buffer (`at`: a store of `p` there).
    StoreOutsideSlice { kernel: String, buffer: String, buf: u32, p: u64, q: u64, elements: (i64, i64), at: String },
}

impl KernelError {
    /// The name of the kernel concerned.
    pub fn kernel(&self) -> &str {
        match self {
            KernelError::UnboundVar { kernel, .. }
            | KernelError::UndeclaredSet { kernel, .. }
            | KernelError::AssignToLoopVar { kernel, .. }
            | KernelError::VarOutOfRange { kernel, .. }
            | KernelError::TypeMismatch { kernel, .. }
            | KernelError::BadBuffer { kernel, .. }
            | KernelError::BadStep { kernel, .. }
            | KernelError::OutOfBounds { kernel, .. }
            | KernelError::UnslicedStore { kernel, .. }
            | KernelError::StoreOutsideSlice { kernel, .. }
            | KernelError::GpuConstruct { kernel, .. } => kernel,
        }
    }
}

impl fmt::Display for KernelError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "kernel {}: ", self.kernel())?;
        match self {
            KernelError::UnboundVar { var, at, .. } => {
                write!(f, "{} is used where it is not declared, in `{at}`", var_name(*var))
            }
            KernelError::UndeclaredSet { var, at, .. } => {
                write!(f, "{} is assigned but not declared in an enclosing block, in `{at}`", var_name(*var))
            }
            KernelError::AssignToLoopVar { var, at, .. } => {
                write!(
                    f,
                    "{} is a loop variable or the parallel range and cannot be assigned, in `{at}`",
                    var_name(*var)
                )
            }
            KernelError::VarOutOfRange { var, vars, at, .. } => {
                write!(f, "{} is declared but the kernel has only {vars} variables, in `{at}`", var_name(*var))
            }
            KernelError::TypeMismatch { what, at, .. } => write!(f, "type mismatch: {what}, in `{at}`"),
            KernelError::GpuConstruct { at, .. } => {
                write!(f, "a GPU-only construct in `{at}` (this verifier proves CPU kernels)")
            }
            KernelError::BadBuffer { buf, buffers, at, .. } => {
                write!(f, "buffer {buf} does not exist (the kernel has {buffers}), in `{at}`")
            }
            KernelError::BadStep { var, step, .. } => {
                write!(f, "the loop over {} has step {step}; steps must be positive", var_name(*var))
            }
            KernelError::OutOfBounds { buffer, buf, index, lanes, len, at, .. } => {
                let last = index.1 as i128 + *lanes as i128 - 1;
                write!(f, "`{at}` may touch elements {}..={last} of buf{buf} {buffer}, which has {len}", index.0)
            }
            KernelError::UnslicedStore { buffer, buf, extent, at, .. } => write!(
                f,
                "a store to buf{buf} {buffer} outside the parallel loop, with a parallel extent of {extent}, in `{at}`"
            ),
            KernelError::StoreOutsideSlice { buffer, buf, p, q, elements, at, .. } => write!(
                f,
                "parallel indices {p} and {q} both store to elements {}..={} of buf{buf} {buffer}, in `{at}`",
                elements.0, elements.1
            ),
        }
    }
}

/// Checks a kernel's types, scopes, bounds and parallel slices (see the module's
/// documentation); the first problem found is the error.
pub fn verify(k: &Kernel) -> Result<(), KernelError> {
    // Shared buffers are allowed: on the CPU they are the call's private scratch (see
    // `Kernel::shared`), bounds-checked like the others and outside the slice check.
    if k.launch.is_some() {
        return Err(KernelError::GpuConstruct { kernel: k.name.clone(), at: "the kernel's launch shape".into() });
    }
    Walker::new(k, None).run()?;
    check_slices(k)
}

/// How many loop iterations one parallel index may enumerate when its stores are collected
/// (loops past it are evaluated once, over intervals).
const ENUMERATION_BUDGET: u64 = 1 << 16;

/// Innermost loops (no loop with stores inside) with more iterations than this are evaluated
/// once, over intervals, rather than enumerated.
const MAX_ENUMERATED_LEAF: u64 = 64;

/// Structured expressions larger than this become opaque (their interval kept).
const MAX_SYM_SIZE: u32 = 256;

/// Longest statement text kept in an error.
const MAX_TEXT: usize = 160;

/// A closed interval of `i64`, empty when `lo > hi`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Iv {
    lo: i64,
    hi: i64,
}

impl Iv {
    const FULL: Iv = Iv { lo: i64::MIN, hi: i64::MAX };
    const EMPTY: Iv = Iv { lo: 1, hi: 0 };

    fn new(lo: i64, hi: i64) -> Iv {
        Iv { lo, hi }
    }

    fn point(v: i64) -> Iv {
        Iv { lo: v, hi: v }
    }

    /// The interval of exact bounds `lo..=hi`; anything outside `i64` means the operation may
    /// wrap, so the result is unknown.
    fn exact(lo: i128, hi: i128) -> Iv {
        if lo < i64::MIN as i128 || hi > i64::MAX as i128 {
            Iv::FULL
        } else {
            Iv { lo: lo as i64, hi: hi as i64 }
        }
    }

    fn is_empty(self) -> bool {
        self.lo > self.hi
    }

    fn is_point(self) -> bool {
        self.lo == self.hi
    }

    fn meet(self, o: Iv) -> Iv {
        Iv { lo: self.lo.max(o.lo), hi: self.hi.min(o.hi) }
    }

    fn join(self, o: Iv) -> Iv {
        Iv { lo: self.lo.min(o.lo), hi: self.hi.max(o.hi) }
    }

    fn corners(self, o: Iv, f: impl Fn(i128, i128) -> i128) -> Iv {
        let c = [
            f(self.lo as i128, o.lo as i128),
            f(self.lo as i128, o.hi as i128),
            f(self.hi as i128, o.lo as i128),
            f(self.hi as i128, o.hi as i128),
        ];
        Iv::exact(*c.iter().min().unwrap(), *c.iter().max().unwrap())
    }

    fn op(self, op: BinOp, o: Iv) -> Iv {
        if self.is_empty() || o.is_empty() {
            return Iv::EMPTY;
        }
        let (a, b) = (self, o);
        match op {
            BinOp::Add => Iv::exact(a.lo as i128 + b.lo as i128, a.hi as i128 + b.hi as i128),
            BinOp::Sub => Iv::exact(a.lo as i128 - b.hi as i128, a.hi as i128 - b.lo as i128),
            BinOp::Mul => a.corners(b, |x, y| x * y),
            // Truncating division is monotone in each operand while the divisor keeps its
            // sign, so the corners bound it; a divisor that may be 0 gives nothing.
            BinOp::Div if b.lo > 0 || b.hi < 0 => a.corners(b, |x, y| x / y),
            BinOp::Div => Iv::FULL,
            BinOp::Min => Iv::new(a.lo.min(b.lo), a.hi.min(b.hi)),
            BinOp::Max => Iv::new(a.lo.max(b.lo), a.hi.max(b.hi)),
        }
    }

    /// The values of `x - (x / c) * c` (truncating division, `c > 0`) for `x` in `self`.
    fn remainder(self, c: i64) -> Iv {
        let m = c - 1;
        if self.lo >= 0 {
            Iv::new(0, m.min(self.hi))
        } else if self.hi <= 0 {
            Iv::new((-m).max(self.lo), 0)
        } else {
            Iv::new(-m, m)
        }
    }
}

/// An `i64` expression with its variables resolved: constants, opaque values (a loop
/// variable, a loaded integer, …) and arithmetic on them, with the interval of its values.
/// Structure is kept so that the remainder and rounding shapes can be recognised through
/// `Let`s; equal structure means equal values (opaque values are numbered per binding).
#[derive(Clone, Debug)]
struct Sym {
    node: Rc<Node>,
    iv: Iv,
    size: u32,
}

#[derive(Debug, PartialEq)]
enum Node {
    Const(i64),
    Atom(u32),
    Bin(BinOp, Sym, Sym),
}

impl PartialEq for Sym {
    fn eq(&self, o: &Sym) -> bool {
        Rc::ptr_eq(&self.node, &o.node) || self.node == o.node
    }
}

impl Sym {
    fn constant(v: i64) -> Sym {
        Sym { node: Rc::new(Node::Const(v)), iv: Iv::point(v), size: 1 }
    }

    fn is_const(&self, c: i64) -> bool {
        matches!(*self.node, Node::Const(v) if v == c)
    }

    /// `(x, c)` when this is `x * c` or `c * x` for a constant `c`.
    fn times_const(&self) -> Option<(&Sym, i64)> {
        match &*self.node {
            Node::Bin(BinOp::Mul, x, y) => match (&*x.node, &*y.node) {
                (_, Node::Const(c)) => Some((x, *c)),
                (Node::Const(c), _) => Some((y, *c)),
                _ => None,
            },
            _ => None,
        }
    }

    /// Whether this is provably a multiple of `step`: a constant one, or `x * c` with `c` one.
    fn multiple_of(&self, step: i64) -> bool {
        match &*self.node {
            Node::Const(c) => c % step == 0,
            _ => self.times_const().is_some_and(|(_, c)| c % step == 0),
        }
    }
}

#[derive(Clone, Debug)]
struct Binding {
    ty: Ty,
    /// The value of an `i64` variable.
    sym: Option<Sym>,
    /// `Let` variables may be `Set`; loop variables and the parallel range may not.
    assignable: bool,
}

/// One store of the parallel index being enumerated: elements `lo..=hi` of a buffer.
type Footprint<'k> = Vec<Vec<(i64, i64, &'k Stmt)>>;

struct Walker<'k> {
    k: &'k Kernel,
    /// `Some(p)`: collecting the stores of parallel index `p` (the kernel is known to be
    /// well formed); `None`: checking everything over the whole parallel range.
    slice: Option<u64>,
    env: HashMap<Var, Binding>,
    /// Per open block: what each declaration in it replaced.
    undo: Vec<Vec<(Var, Option<Binding>)>>,
    /// Variables that are `Set` somewhere: their `i64` values are unknown.
    assigned: HashSet<Var>,
    atoms: u32,
    /// False inside loops that provably never run: their accesses are not checked.
    reachable: bool,
    in_parallel: bool,
    stmt: Option<&'k Stmt>,
    budget: u64,
    stores: Footprint<'k>,
}

fn collect_assigned(body: &[Stmt], out: &mut HashSet<Var>) {
    for s in body {
        match s {
            Stmt::Set { var, .. } => {
                out.insert(*var);
            }
            Stmt::For { body, .. } => collect_assigned(body, out),
            _ => {}
        }
    }
}

fn contains_store(body: &[Stmt]) -> bool {
    body.iter().any(|s| match s {
        Stmt::Store { .. } => true,
        Stmt::For { body, .. } => contains_store(body),
        _ => false,
    })
}

fn shorten(mut s: String) -> String {
    if s.chars().count() > MAX_TEXT {
        s = s.chars().take(MAX_TEXT - 1).collect();
        s.push('…');
    }
    s
}

impl<'k> Walker<'k> {
    fn new(k: &'k Kernel, slice: Option<u64>) -> Walker<'k> {
        let mut assigned = HashSet::new();
        collect_assigned(&k.body, &mut assigned);
        Walker {
            k,
            slice,
            env: HashMap::new(),
            undo: vec![],
            assigned,
            atoms: 0,
            reachable: true,
            in_parallel: false,
            stmt: None,
            budget: ENUMERATION_BUDGET,
            stores: vec![vec![]; k.buffers.len()],
        }
    }

    fn run(&mut self) -> Result<(), KernelError> {
        self.enter();
        let extent = self.k.parallel_extent.min(i64::MAX as u64 - 1) as i64;
        let (s, e) = match self.slice {
            Some(p) => (Sym::constant(p as i64), Sym::constant(p as i64 + 1)),
            None => (self.atom(Iv::new(0, extent)), self.atom(Iv::new(0, extent))),
        };
        self.declare(START, Binding { ty: Ty::I64, sym: Some(s), assignable: false });
        self.declare(END, Binding { ty: Ty::I64, sym: Some(e), assignable: false });
        let k = self.k;
        self.stmts(&k.body, true)?;
        self.leave();
        Ok(())
    }

    fn enter(&mut self) {
        self.undo.push(vec![]);
    }

    fn leave(&mut self) {
        for (v, old) in self.undo.pop().expect("an open block").into_iter().rev() {
            match old {
                Some(b) => self.env.insert(v, b),
                None => self.env.remove(&v),
            };
        }
    }

    fn declare(&mut self, v: Var, b: Binding) {
        let old = self.env.insert(v, b);
        self.undo.last_mut().expect("an open block").push((v, old));
    }

    /// An opaque value in `iv` (a constant when `iv` is a point).
    fn atom(&mut self, iv: Iv) -> Sym {
        if iv.is_point() {
            return Sym::constant(iv.lo);
        }
        self.atoms += 1;
        Sym { node: Rc::new(Node::Atom(self.atoms)), iv, size: 1 }
    }

    fn bin(&mut self, op: BinOp, a: Sym, b: Sym) -> Sym {
        let mut iv = a.iv.op(op, b.iv);
        match op {
            // x - (x / c) * c
            BinOp::Sub => {
                if let Some((q, c)) = b.times_const() {
                    if let Node::Bin(BinOp::Div, x, d) = &*q.node {
                        if c > 0 && d.is_const(c) && *x == a {
                            iv = iv.meet(a.iv.remainder(c));
                        }
                    }
                }
            }
            // a + ((b - a) / c) * c lies between a and b.
            BinOp::Add => {
                for (p, r) in [(&a, &b), (&b, &a)] {
                    if let Some((q, c)) = r.times_const() {
                        if let Node::Bin(BinOp::Div, diff, d) = &*q.node {
                            if let Node::Bin(BinOp::Sub, hi, lo) = &*diff.node {
                                // (Only when `b - a` cannot wrap.)
                                let exact = hi.iv.hi as i128 - lo.iv.lo as i128 <= i64::MAX as i128
                                    && hi.iv.lo as i128 - lo.iv.hi as i128 >= i64::MIN as i128;
                                if c > 0 && d.is_const(c) && lo == p && exact {
                                    iv = iv.meet(p.iv.join(hi.iv));
                                }
                            }
                        }
                    }
                }
            }
            _ => {}
        }
        let size = a.size + b.size + 1;
        if iv.is_point() {
            Sym::constant(iv.lo)
        } else if size > MAX_SYM_SIZE {
            self.atom(iv)
        } else {
            Sym { node: Rc::new(Node::Bin(op, a, b)), iv, size }
        }
    }

    fn var_ty(&self) -> impl Fn(Var) -> Option<Ty> + '_ {
        |v| self.env.get(&v).map(|b| b.ty)
    }

    /// The current statement's text, for errors.
    fn at(&self) -> String {
        self.stmt.map(|s| shorten(s.line(&self.var_ty()))).unwrap_or_default()
    }

    fn name(&self) -> String {
        self.k.name.clone()
    }

    fn mismatch<T>(&self, what: String) -> Result<T, KernelError> {
        Err(KernelError::TypeMismatch { kernel: self.name(), what, at: self.at() })
    }

    fn buffer(&self, buf: u32) -> Result<&'k Buffer, KernelError> {
        self.k.buffer(buf).ok_or_else(|| KernelError::BadBuffer {
            kernel: self.name(),
            buf,
            buffers: self.k.buffers.len() + self.k.shared.len(),
            at: self.at(),
        })
    }

    fn declared(&self, var: Var) -> Result<(), KernelError> {
        let vars = self.k.vars.max(2);
        if var >= vars {
            return Err(KernelError::VarOutOfRange { kernel: self.name(), var, vars, at: self.at() });
        }
        Ok(())
    }

    /// Checks that `lanes` elements from `index` lie inside buffer `buf`.
    fn in_bounds(&self, buf: u32, index: &Sym, lanes: usize, what: &dyn Fn() -> String) -> Result<(), KernelError> {
        if self.slice.is_some() || !self.reachable || index.iv.is_empty() {
            return Ok(());
        }
        let b = self.k.buffer(buf).expect("checked by `buffer`");
        let iv = index.iv;
        if iv.lo < 0 || iv.hi as i128 + lanes as i128 > b.len as i128 {
            return Err(KernelError::OutOfBounds {
                kernel: self.name(),
                buffer: b.name.clone(),
                buf,
                index: (iv.lo, iv.hi),
                lanes,
                len: b.len,
                at: shorten(what()),
            });
        }
        Ok(())
    }

    fn index(&mut self, index: &'k Expr) -> Result<Sym, KernelError> {
        match self.expr(index)? {
            (Ty::I64, Some(s)) => Ok(s),
            (t, _) => self.mismatch(format!("an index of type {}", t.name())),
        }
    }

    fn stmts(&mut self, body: &'k [Stmt], top: bool) -> Result<(), KernelError> {
        for s in body {
            self.stmt(s, top)?;
        }
        Ok(())
    }

    fn stmt(&mut self, s: &'k Stmt, top: bool) -> Result<(), KernelError> {
        self.stmt = Some(s);
        match s {
            Stmt::If { .. } | Stmt::Barrier => {
                return Err(KernelError::GpuConstruct { kernel: self.name(), at: self.at() });
            }
            Stmt::Let { var, value } => {
                let (ty, sym) = self.expr(value)?;
                self.stmt = Some(s);
                self.declared(*var)?;
                let sym = match ty {
                    Ty::I64 if self.assigned.contains(var) => Some(self.atom(Iv::FULL)),
                    Ty::I64 => sym,
                    _ => None,
                };
                self.declare(*var, Binding { ty, sym, assignable: true });
            }
            Stmt::Set { var, value } => {
                let (ty, _) = self.expr(value)?;
                self.stmt = Some(s);
                match self.env.get(var) {
                    None => return Err(KernelError::UndeclaredSet { kernel: self.name(), var: *var, at: self.at() }),
                    Some(b) if !b.assignable => {
                        return Err(KernelError::AssignToLoopVar { kernel: self.name(), var: *var, at: self.at() })
                    }
                    Some(b) if b.ty != ty => {
                        let what = format!("{} is {}, assigned {}", var_name(*var), b.ty.name(), ty.name());
                        return self.mismatch(what);
                    }
                    Some(_) => {}
                }
            }
            Stmt::Store { buf, index, value } => {
                let b = self.buffer(*buf)?;
                let (ty, _) = self.expr(value)?;
                self.stmt = Some(s);
                let at = self.index(index)?;
                self.stmt = Some(s);
                let ok = matches!(
                    (b.elem, ty),
                    (Elem::F32, Ty::F32 | Ty::F32x4)
                        | (Elem::I32, Ty::I32x4 | Ty::I64)
                        | (Elem::I8, Ty::I8x16 | Ty::I64)
                        | (Elem::U8, Ty::U8x16 | Ty::I64)
                );
                if !ok {
                    return self.mismatch(format!(
                        "a store of {} to buf{buf} {} of {}",
                        ty.name(),
                        b.name,
                        b.elem.name()
                    ));
                }
                let lanes = ty.lanes();
                // A call's private scratch is not shared with other parallel indices.
                let local = *buf as usize >= self.k.buffers.len();
                if self.slice.is_none() && !self.in_parallel && self.k.parallel_extent > 1 && !local {
                    return Err(KernelError::UnslicedStore {
                        kernel: self.name(),
                        buffer: b.name.clone(),
                        buf: *buf,
                        extent: self.k.parallel_extent,
                        at: self.at(),
                    });
                }
                let what = || format!("store.{} buf{buf}[{}]", ty.name(), index.text(&self.var_ty()));
                self.in_bounds(*buf, &at, lanes, &what)?;
                if self.slice.is_some() && self.reachable && !at.iv.is_empty() && !local {
                    let last = at.iv.hi.saturating_add(lanes as i64 - 1);
                    self.stores[*buf as usize].push((at.iv.lo, last, s));
                }
            }
            Stmt::For { var, start, end, step, body } => {
                let (st, ss) = self.expr(start)?;
                let (et, es) = self.expr(end)?;
                self.stmt = Some(s);
                let (Some(ss), Some(es)) = (ss.filter(|_| st == Ty::I64), es.filter(|_| et == Ty::I64)) else {
                    return self.mismatch(format!("loop bounds of types {} and {}", st.name(), et.name()));
                };
                if *step <= 0 {
                    return Err(KernelError::BadStep { kernel: self.name(), var: *var, step: *step });
                }
                self.declared(*var)?;
                let parallel = top && *start == Expr::Var(START) && *end == Expr::Var(END);
                if self.slice.is_some() {
                    if !contains_store(body) || !self.reachable {
                        return Ok(());
                    }
                    if ss.iv.is_point() && es.iv.is_point() {
                        let (a, e) = (ss.iv.lo as i128, es.iv.lo as i128);
                        let trips = if e > a { ((e - a + *step as i128 - 1) / *step as i128) as u64 } else { 0 };
                        // An innermost loop's stores are usually contiguous, where the
                        // interval over the loop is exact: long ones are not enumerated.
                        let leaf = !body.iter().any(|s| matches!(s, Stmt::For { body, .. } if contains_store(body)));
                        if trips <= self.budget && (!leaf || trips <= MAX_ENUMERATED_LEAF) {
                            self.budget -= trips;
                            for t in 0..trips {
                                let v = (a + t as i128 * *step as i128) as i64;
                                self.enter();
                                let b = Binding { ty: Ty::I64, sym: Some(Sym::constant(v)), assignable: false };
                                self.declare(*var, b);
                                self.stmts(body, false)?;
                                self.leave();
                            }
                            return Ok(());
                        }
                    }
                }
                let iv = loop_var(&ss, &es, *step);
                let sym = self.atom(iv);
                let saved = (self.reachable, self.in_parallel);
                self.reachable &= !iv.is_empty();
                self.in_parallel |= parallel;
                self.enter();
                self.declare(*var, Binding { ty: Ty::I64, sym: Some(sym), assignable: false });
                let r = self.stmts(body, false);
                self.leave();
                (self.reachable, self.in_parallel) = saved;
                r?;
            }
        }
        Ok(())
    }

    fn expr(&mut self, e: &'k Expr) -> Result<(Ty, Option<Sym>), KernelError> {
        Ok(match e {
            Expr::Gpu(_) | Expr::ShflXor(..) => {
                return Err(KernelError::GpuConstruct { kernel: self.name(), at: self.at() });
            }
            Expr::Int(v) => (Ty::I64, Some(Sym::constant(*v))),
            Expr::F32(_) => (Ty::F32, None),
            Expr::Var(v) => match self.env.get(v) {
                Some(b) => (b.ty, b.sym.clone()),
                None => return Err(KernelError::UnboundVar { kernel: self.name(), var: *v, at: self.at() }),
            },
            Expr::Load { buf, index, ty } => {
                let b = self.buffer(*buf)?;
                let at = self.index(index)?;
                let ok = match (b.elem, *ty) {
                    (Elem::I32 | Elem::I8 | Elem::U8, Ty::I64) | (Elem::F32, Ty::F32) => true,
                    (e, t) => t == Ty::vector_of(e),
                };
                if !ok {
                    return self.mismatch(format!(
                        "a load of {} from buf{buf} {} of {}",
                        ty.name(),
                        b.name,
                        b.elem.name()
                    ));
                }
                self.in_bounds(*buf, &at, ty.lanes(), &|| e.text(&self.var_ty()))?;
                let sym = (*ty == Ty::I64).then(|| {
                    self.atom(match b.elem {
                        Elem::U8 => Iv::new(0, 255),
                        Elem::I8 => Iv::new(-128, 127),
                        _ => Iv::new(i32::MIN as i64, i32::MAX as i64),
                    })
                });
                (*ty, sym)
            }
            Expr::Bin(op, a, b) => {
                let (ta, sa) = self.expr(a)?;
                let (tb, sb) = self.expr(b)?;
                if ta != tb || matches!(ta, Ty::I8x16 | Ty::U8x16) || (ta == Ty::I32x4 && *op == BinOp::Div) {
                    return self.mismatch(format!("{} of {} and {}", op.name(), ta.name(), tb.name()));
                }
                match (sa, sb) {
                    (Some(x), Some(y)) => (ta, Some(self.bin(*op, x, y))),
                    _ => (ta, None),
                }
            }
            Expr::Fma(a, b, c) => {
                let ts = [self.expr(a)?.0, self.expr(b)?.0, self.expr(c)?.0];
                if ts[0] != ts[1] || ts[1] != ts[2] || !matches!(ts[0], Ty::F32 | Ty::F32x4) {
                    return self.mismatch(format!("fma of {}, {}, {}", ts[0].name(), ts[1].name(), ts[2].name()));
                }
                (ts[0], None)
            }
            Expr::Un(op, a) => {
                let t = self.expr(a)?.0;
                if !matches!(t, Ty::F32 | Ty::F32x4) {
                    return self.mismatch(format!("{} of {}", op.name(), t.name()));
                }
                (t, None)
            }
            Expr::Splat(a) => match self.expr(a)?.0 {
                Ty::F32 => (Ty::F32x4, None),
                Ty::I64 => (Ty::I32x4, None),
                t => return self.mismatch(format!("splat of {}", t.name())),
            },
            Expr::HSum(a) | Expr::HMax(a) => match self.expr(a)?.0 {
                Ty::F32x4 => (Ty::F32, None),
                t => return self.mismatch(format!("a horizontal reduction of {}", t.name())),
            },
            Expr::Pack(xs) => {
                if xs.len() != 4 {
                    return self.mismatch(format!("pack of {} lanes", xs.len()));
                }
                let mut ts = Vec::with_capacity(4);
                for x in xs {
                    ts.push(self.expr(x)?.0);
                }
                match ts[0] {
                    Ty::F32 | Ty::I64 if ts.iter().all(|&t| t == ts[0]) => {}
                    _ => {
                        let names: Vec<&str> = ts.iter().map(|t| t.name()).collect();
                        return self.mismatch(format!("pack of {}", names.join(", ")));
                    }
                }
                (if ts[0] == Ty::F32 { Ty::F32x4 } else { Ty::I32x4 }, None)
            }
            Expr::Dot4 { acc, w, x } => {
                let ts = (self.expr(acc)?.0, self.expr(w)?.0, self.expr(x)?.0);
                if ts != (Ty::I32x4, Ty::I8x16, Ty::U8x16) {
                    return self.mismatch(format!("dot4 of {}, {}, {}", ts.0.name(), ts.1.name(), ts.2.name()));
                }
                (Ty::I32x4, None)
            }
            Expr::PairAdd(a, b) => {
                let ts = (self.expr(a)?.0, self.expr(b)?.0);
                if ts != (Ty::I32x4, Ty::I32x4) {
                    return self.mismatch(format!("pair_add of {} and {}", ts.0.name(), ts.1.name()));
                }
                (Ty::I32x4, None)
            }
            Expr::Cvt(to, a) => {
                let t = self.expr(a)?.0;
                match (t, *to) {
                    (Ty::I32x4, Ty::F32x4) | (Ty::I64, Ty::F32) | (Ty::F32x4, Ty::I32x4) => (*to, None),
                    // Saturating: any i64.
                    (Ty::F32, Ty::I64) => (Ty::I64, Some(self.atom(Iv::FULL))),
                    _ => return self.mismatch(format!("a conversion of {} to {}", t.name(), to.name())),
                }
            }
            Expr::Narrow(to, parts) => {
                if parts.len() != 4 || !matches!(to, Ty::I8x16 | Ty::U8x16) {
                    return self.mismatch(format!("narrow of {} parts to {}", parts.len(), to.name()));
                }
                for p in parts {
                    let t = self.expr(p)?.0;
                    if t != Ty::I32x4 {
                        return self.mismatch(format!("narrow of {}", t.name()));
                    }
                }
                (*to, None)
            }
            Expr::Lane(a, l) => match self.expr(a)?.0 {
                Ty::I32x4 if *l < 4 => (Ty::I64, Some(self.atom(Iv::new(i32::MIN as i64, i32::MAX as i64)))),
                Ty::F32x4 if *l < 4 => (Ty::F32, None),
                t => return self.mismatch(format!("lane {l} of {}", t.name())),
            },
            Expr::Select { a, b, then, otherwise, .. } => {
                let (ta, tb) = (self.expr(a)?.0, self.expr(b)?.0);
                if (ta, tb) != (Ty::I64, Ty::I64) {
                    return self.mismatch(format!("select comparing {} and {}", ta.name(), tb.name()));
                }
                // Both sides are evaluated (the emitter selects between values).
                let (tt, st) = self.expr(then)?;
                let (to, so) = self.expr(otherwise)?;
                if tt != to {
                    return self.mismatch(format!("select of {} and {}", tt.name(), to.name()));
                }
                match (st, so) {
                    (Some(x), Some(y)) => (tt, Some(self.atom(x.iv.join(y.iv)))),
                    _ => (tt, None),
                }
            }
        })
    }
}

/// The values `for j in s..e step step` gives `j` in its body: from `s`'s lowest value to
/// the last value below `e`'s highest, tighter when `s` is known or `e - s` is a multiple
/// of the step (`e` is `s + x·c`, `c` a multiple of it): then the last `j` is `≤ e - step`.
fn loop_var(s: &Sym, e: &Sym, step: i64) -> Iv {
    let lo = s.iv.lo;
    let mut hi = e.iv.hi as i128 - 1;
    if s.iv.is_point() {
        let span = hi - s.iv.lo as i128;
        hi = if span < 0 { s.iv.lo as i128 - 1 } else { s.iv.lo as i128 + span / step as i128 * step as i128 };
    }
    if let Node::Bin(BinOp::Add, x, y) = &*e.node {
        if (x == s && y.multiple_of(step)) || (y == s && x.multiple_of(step)) {
            hi = hi.min(e.iv.hi as i128 - step as i128);
        }
    }
    if s.iv.is_empty() || e.iv.is_empty() || hi < lo as i128 {
        Iv::EMPTY
    } else {
        Iv::new(lo, hi as i64)
    }
}

/// Sorted, merged elements of one buffer's stores.
fn merged(stores: &[(i64, i64, &Stmt)]) -> Vec<(i64, i64)> {
    let mut v: Vec<(i64, i64)> = stores.iter().map(|&(lo, hi, _)| (lo, hi)).collect();
    v.sort_unstable();
    let mut out: Vec<(i64, i64)> = Vec::with_capacity(v.len());
    for (lo, hi) in v {
        match out.last_mut() {
            Some(last) if lo <= last.1.saturating_add(1) => last.1 = last.1.max(hi),
            _ => out.push((lo, hi)),
        }
    }
    out
}

/// The first elements both sorted, merged lists hold.
fn overlap(a: &[(i64, i64)], b: &[(i64, i64)]) -> Option<(i64, i64)> {
    let (mut i, mut j) = (0, 0);
    while i < a.len() && j < b.len() {
        let (lo, hi) = (a[i].0.max(b[j].0), a[i].1.min(b[j].1));
        if lo <= hi {
            return Some((lo, hi));
        }
        if a[i].1 < b[j].1 {
            i += 1;
        } else {
            j += 1;
        }
    }
    None
}

/// Stores of adjacent parallel indices touch different elements: checked for the first,
/// middle and last pairs of the range.
fn check_slices(k: &Kernel) -> Result<(), KernelError> {
    let n = k.parallel_extent;
    if n < 2 {
        return Ok(());
    }
    let mut pairs = vec![(0, 1), (n / 2 - 1, n / 2), (n - 2, n - 1)];
    pairs.dedup();
    let mut footprints: HashMap<u64, Footprint> = HashMap::new();
    for (p, q) in pairs {
        for i in [p, q] {
            if let std::collections::hash_map::Entry::Vacant(e) = footprints.entry(i) {
                let mut w = Walker::new(k, Some(i));
                w.run()?;
                e.insert(w.stores);
            }
        }
        let (fp, fq) = (&footprints[&p], &footprints[&q]);
        for (buf, (sp, sq)) in fp.iter().zip(fq).enumerate() {
            if let Some(elements) = overlap(&merged(sp), &merged(sq)) {
                let at = sp
                    .iter()
                    .find(|&&(lo, hi, _)| lo <= elements.1 && elements.0 <= hi)
                    .map(|&(_, _, s)| shorten(s.line(&|_| None)))
                    .unwrap_or_default();
                return Err(KernelError::StoreOutsideSlice {
                    kernel: k.name.clone(),
                    buffer: k.buffers[buf].name.clone(),
                    buf: buf as u32,
                    p,
                    q,
                    elements,
                    at,
                });
            }
        }
    }
    Ok(())
}
