//! The Cranelift emitter: one kernel of the kernel IR → one function of machine code.
//!
//! Signature (the platform C convention): `fn(bufs: *const *mut u8, rt: *const u8,
//! start: i64, end: i64)`. Buffer base pointers are loaded from `bufs` once at entry.
//! Vectors are 128-bit (`f32x4`), Cranelift's widest; FMA is used where the target has it.
//! `exp` and `erf` are expanded inline as polynomials, so the code calls nothing and needs
//! no relocations: the function's bytes (with their own constant pool) run wherever they
//! are placed.

use std::sync::Arc;

use cranelift_codegen::control::ControlPlane;
use cranelift_codegen::ir::condcodes::{FloatCC, IntCC};
use cranelift_codegen::ir::types::{F32, F32X4, I32, I32X4, I64, I8X16};
use cranelift_codegen::ir::{
    AbiParam, Endianness, Function, InstBuilder, MemFlagsData, Signature, StackSlotData, StackSlotKind, Type,
    UserFuncName, Value,
};
use cranelift_codegen::isa::TargetIsa;
use cranelift_codegen::settings::{self, Configurable};
use cranelift_codegen::Context;
use cranelift_frontend::{FunctionBuilder, FunctionBuilderContext, Variable};
use wcc_targets::Target;

use crate::kir::{BinOp, CmpOp, Elem, Expr, Kernel, Stmt, Ty, UnOp, END, START};
use crate::BackendError;

/// Cranelift's name for each target feature it knows.
fn cranelift_flag(feature: &str) -> Option<&'static str> {
    Some(match feature {
        "sse3" => "has_sse3",
        "ssse3" => "has_ssse3",
        "sse4.1" => "has_sse41",
        "sse4.2" => "has_sse42",
        "popcnt" => "has_popcnt",
        "avx" => "has_avx",
        "avx2" => "has_avx2",
        "fma" => "has_fma",
        "bmi1" => "has_bmi1",
        "bmi2" => "has_bmi2",
        "lzcnt" => "has_lzcnt",
        "avx512f" => "has_avx512f",
        "avx512vl" => "has_avx512vl",
        "avx512dq" => "has_avx512dq",
        "avx512bw" => "has_avx512bw",
        // With avx512vl, the widening dot-product tree becomes one EVEX `vpdpbusd`.
        "avx512vnni" => "has_avx512vnni",
        // aarch64: the dot-product tree becomes one `usdot` (unsigned × signed) with i8mm.
        "dotprod" => "has_dotprod",
        "i8mm" => "has_i8mm",
        _ => return None,
    })
}

/// The Cranelift ISA for a target, optimising for speed.
pub fn isa(target: &Target) -> Result<Arc<dyn TargetIsa>, BackendError> {
    let err = |e: &dyn std::fmt::Display| BackendError(format!("target {}: {e}", target.triple()));
    let mut flags = settings::builder();
    flags.set("opt_level", "speed").map_err(|e| err(&e))?;
    flags.set("enable_verifier", "true").map_err(|e| err(&e))?;
    // A kernel's local buffers (its stack frame) can exceed a page: probe each page inline
    // (no call, so no relocation), so a frame never skips a thread's guard page.
    flags.set("enable_probestack", "true").map_err(|e| err(&e))?;
    flags.set("probestack_strategy", "inline").map_err(|e| err(&e))?;
    let mut b = cranelift_codegen::isa::lookup_by_name(&target.triple()).map_err(|e| err(&e))?;
    for f in &target.features {
        // Features this Cranelift version has no setting for are simply not used.
        if let Some(flag) = cranelift_flag(f) {
            let _ = b.enable(flag);
        }
    }
    b.finish(settings::Flags::new(flags)).map_err(|e| err(&e))
}

/// The kernel's signature for `isa`.
pub fn signature(isa: &dyn TargetIsa) -> Signature {
    let mut sig = Signature::new(isa.default_call_conv());
    for _ in 0..4 {
        sig.params.push(AbiParam::new(I64));
    }
    sig
}

/// Builds the Cranelift function of a kernel.
pub fn function(k: &Kernel, isa: &dyn TargetIsa) -> Result<Function, BackendError> {
    // The emitter translates what it is given: a kernel that could read or write outside its
    // buffers, or outside its parallel slice, is refused before it becomes machine code.
    crate::kir_verify::verify(k).map_err(|e| BackendError(e.to_string()))?;
    let mut func = Function::with_name_signature(UserFuncName::user(0, 0), signature(isa));
    let mut fctx = FunctionBuilderContext::new();
    let mut b = FunctionBuilder::new(&mut func, &mut fctx);
    let entry = b.create_block();
    b.append_block_params_for_function_params(entry);
    b.switch_to_block(entry);
    let params = b.block_params(entry).to_vec();
    let mut e = Emitter {
        b,
        vars: vec![None; k.vars.max(2) as usize],
        bases: vec![],
        elems: k.buffers.iter().chain(&k.shared).map(|b| b.elem).collect(),
        fma: isa.isa_flags().iter().any(|f| f.name == "has_fma" && f.as_bool() == Some(true))
            || isa.name() == "aarch64",
        arm: isa.name() == "aarch64",
        name: k.name.clone(),
        read_only: k.access().iter().map(|a| *a == wcc_format::Access::Read).collect(),
        levels: vec![0; k.vars.max(2) as usize],
        depth: 0,
    };
    for (i, _) in k.buffers.iter().enumerate() {
        let trusted = MemFlagsData::trusted();
        let p = e.b.ins().load(I64, trusted, params[0], (8 * i) as i32);
        e.bases.push(p);
    }
    // Local buffers: 16-byte aligned stack slots of this call's frame.
    for b in &k.shared {
        let bytes = u32::try_from(b.bytes())
            .map_err(|_| BackendError(format!("kernel {}: local buffer {} is too large", k.name, b.name)))?;
        let slot = e.b.create_sized_stack_slot(StackSlotData::new(StackSlotKind::ExplicitSlot, bytes, 4));
        let p = e.b.ins().stack_addr(I64, slot, 0);
        e.bases.push(p);
    }
    for (v, p) in [(START, params[2]), (END, params[3])] {
        let var = e.b.declare_var(I64);
        e.b.def_var(var, p);
        e.vars[v as usize] = Some((var, Ty::I64));
    }
    e.stmts(&k.body)?;
    e.b.ins().return_(&[]);
    e.b.seal_all_blocks();
    e.b.finalize(isa.frontend_config());
    Ok(func)
}

/// Compiles a kernel to position-independent machine code.
pub fn compile(k: &Kernel, isa: &dyn TargetIsa) -> Result<Vec<u8>, BackendError> {
    let func = function(k, isa)?;
    let mut ctx = Context::for_function(func);
    let code = ctx
        .compile(isa, &mut ControlPlane::default())
        .map_err(|e| BackendError(format!("kernel {}: cranelift: {:?}", k.name, e.inner)))?;
    if !code.buffer.relocs().is_empty() {
        return Err(BackendError(format!("kernel {} needs relocations; kernels must be self-contained", k.name)));
    }
    Ok(code.code_buffer().to_vec())
}

/// The kernel's machine code as text (Cranelift's listing of the final instructions), for
/// tests and dumps that check an instruction was selected (`vpdpbusd`, `usdot`) on any host,
/// without a disassembler for the target.
pub fn listing(k: &Kernel, isa: &dyn TargetIsa) -> Result<String, BackendError> {
    let func = function(k, isa)?;
    let mut ctx = Context::for_function(func);
    ctx.set_disasm(true);
    let code = ctx
        .compile(isa, &mut ControlPlane::default())
        .map_err(|e| BackendError(format!("kernel {}: cranelift: {:?}", k.name, e.inner)))?;
    Ok(code.vcode.clone().unwrap_or_default())
}

struct Emitter<'a> {
    b: FunctionBuilder<'a>,
    vars: Vec<Option<(Variable, Ty)>>,
    bases: Vec<Value>,
    elems: Vec<Elem>,
    fma: bool,
    /// aarch64: operand order of the dot-product tree (see `Expr::Dot4`).
    arm: bool,
    name: String,
    /// Per buffer: the kernel never stores to it (see `movable_flags`).
    read_only: Vec<bool>,
    /// Per variable: the depth of the innermost loop whose iterations it can change with
    /// (0: constant for the whole kernel). A loop variable has its loop's depth, a `let` the
    /// deepest of what it reads, a variable `set` in a loop at least that loop's depth.
    levels: Vec<u32>,
    /// Loops the statement being emitted is nested in.
    depth: u32,
}

fn clif(ty: Ty) -> Type {
    match ty {
        Ty::I64 => I64,
        Ty::F32 => F32,
        Ty::F32x4 => F32X4,
        Ty::I32x4 => I32X4,
        // Cranelift's integer vectors carry no sign: the operations choose it.
        Ty::I8x16 | Ty::U8x16 => I8X16,
    }
}

/// The terms of a sum of integers (`a + b + ...`), constants folded into `constant`.
fn flatten_sum<'e>(e: &'e Expr, terms: &mut Vec<&'e Expr>, constant: &mut i64) {
    match e {
        Expr::Bin(BinOp::Add, a, b) => {
            flatten_sum(a, terms, constant);
            flatten_sum(b, terms, constant);
        }
        Expr::Int(c) => *constant = constant.wrapping_add(*c),
        _ => terms.push(e),
    }
}

impl Emitter<'_> {
    fn notrap(&mut self) -> MemFlagsData {
        MemFlagsData::new().with_notrap()
    }

    /// The loop depth an expression's value varies at (see `levels`).
    fn level(&self, e: &Expr) -> u32 {
        let mut l = 0;
        e.visit(&mut |x| {
            if let Expr::Var(v) = x {
                l = l.max(self.levels.get(*v as usize).copied().unwrap_or(u32::MAX));
            }
        });
        l
    }

    fn set_level(&mut self, var: u32, level: u32) {
        let slot = var as usize;
        if slot >= self.levels.len() {
            self.levels.resize(slot + 1, 0);
        }
        self.levels[slot] = level;
    }

    /// The flags of a load from `buf` at `index`. A load from a buffer this kernel never
    /// writes, at an index that changes with every iteration of the innermost loop around it,
    /// is given to Cranelift as pure (`readonly`, `notrap`, `can_move`), so it is placed
    /// right before its first use rather than where the kernel IR wrote it: a register block
    /// then holds one weight vector at a time instead of all of them at once (which spilled
    /// the int8 product's accumulators). That is sound because nothing writes the buffer
    /// while the kernel runs (other threads write only their own slices of the outputs), and
    /// a load whose address depends on the innermost loop's variable cannot be hoisted out of
    /// that loop, so it still runs only in iterations that exist, where the kernel verifier
    /// proved its index in bounds. Any other load keeps its place (a load hoisted out of a
    /// loop that runs zero times could read past a buffer).
    fn load_flags(&self, buf: u32, index: &Expr) -> MemFlagsData {
        let movable = self.depth > 0
            && self.read_only.get(buf as usize).copied().unwrap_or(false)
            && self.level(index) == self.depth;
        if movable {
            MemFlagsData::new().with_notrap().with_readonly().with_can_move()
        } else {
            MemFlagsData::new().with_notrap()
        }
    }

    fn err<T>(&self, msg: impl Into<String>) -> Result<T, BackendError> {
        Err(BackendError(format!("kernel {}: {}", self.name, msg.into())))
    }

    fn stmts(&mut self, body: &[Stmt]) -> Result<(), BackendError> {
        for s in body {
            self.stmt(s)?;
        }
        Ok(())
    }

    fn stmt(&mut self, s: &Stmt) -> Result<(), BackendError> {
        match s {
            Stmt::If { .. } | Stmt::Barrier => return self.err("`if` and barriers are for GPU kernels"),
            Stmt::Let { var, value } => {
                let level = self.level(value);
                self.set_level(*var, level);
                let (v, ty) = self.expr(value)?;
                let cv = self.b.declare_var(clif(ty));
                self.b.def_var(cv, v);
                let slot = *var as usize;
                if slot >= self.vars.len() {
                    self.vars.resize(slot + 1, None);
                }
                self.vars[slot] = Some((cv, ty));
            }
            Stmt::Set { var, value } => {
                let level = self.level(value).max(self.depth).max(self.levels.get(*var as usize).copied().unwrap_or(0));
                self.set_level(*var, level);
                let (v, ty) = self.expr(value)?;
                let Some((cv, vty)) = self.vars.get(*var as usize).copied().flatten() else {
                    return self.err(format!("v{var} is set before it is declared"));
                };
                if vty != ty {
                    return self.err(format!("v{var} is {vty:?}, assigned {ty:?}"));
                }
                self.b.def_var(cv, v);
            }
            Stmt::Store { buf, index, value } => {
                let (v, ty) = self.expr(value)?;
                let Some(&elem) = self.elems.get(*buf as usize) else {
                    return self.err(format!("buffer {buf} does not exist"));
                };
                let addr = self.address(*buf, index)?;
                let fl = self.notrap();
                match (elem, ty) {
                    (Elem::F32, Ty::F32 | Ty::F32x4) | (Elem::I32, Ty::I32x4) => {
                        self.b.ins().store(fl, v, addr, 0);
                    }
                    (Elem::I8, Ty::I8x16) | (Elem::U8, Ty::U8x16) => {
                        self.b.ins().store(fl, v, addr, 0);
                    }
                    (Elem::I32, Ty::I64) => {
                        self.b.ins().istore32(fl, v, addr, 0);
                    }
                    (Elem::I8 | Elem::U8, Ty::I64) => {
                        self.b.ins().istore8(fl, v, addr, 0);
                    }
                    _ => return self.err(format!("cannot store {} to a {} buffer", ty.name(), elem.name())),
                }
            }
            Stmt::For { var, start, end, step, body } => {
                if *step <= 0 {
                    return self.err("loop step must be positive");
                }
                let (s, st) = self.expr(start)?;
                let (e, et) = self.expr(end)?;
                if st != Ty::I64 || et != Ty::I64 {
                    return self.err("loop bounds must be integers");
                }
                let iv = self.b.declare_var(I64);
                self.b.def_var(iv, s);
                let slot = *var as usize;
                if slot >= self.vars.len() {
                    self.vars.resize(slot + 1, None);
                }
                self.vars[slot] = Some((iv, Ty::I64));
                self.depth += 1;
                self.set_level(*var, self.depth);
                let (header, body_block, exit) = (self.b.create_block(), self.b.create_block(), self.b.create_block());
                self.b.ins().jump(header, &[]);
                self.b.switch_to_block(header);
                let i = self.b.use_var(iv);
                let c = self.b.ins().icmp(IntCC::SignedLessThan, i, e);
                self.b.ins().brif(c, body_block, &[], exit, &[]);
                // Seal each block as soon as all its predecessors exist, so that a variable
                // the loop does not assign reaches the body as the value from before the
                // loop, not as a block parameter of the header: only then is an expression of
                // such variables seen as loop-invariant (and hoisted out of the loop).
                self.b.seal_block(body_block);
                self.b.switch_to_block(body_block);
                self.stmts(body)?;
                let i = self.b.use_var(iv);
                let next = self.b.ins().iadd_imm_s(i, *step);
                self.b.def_var(iv, next);
                self.b.ins().jump(header, &[]);
                self.b.seal_block(header);
                self.b.seal_block(exit);
                self.b.switch_to_block(exit);
                self.depth -= 1;
            }
        }
        Ok(())
    }

    fn address(&mut self, buf: u32, index: &Expr) -> Result<Value, BackendError> {
        let Some(&base) = self.bases.get(buf as usize) else {
            return self.err(format!("buffer {buf} does not exist"));
        };
        let size = self.elems[buf as usize].size() as i64;
        // The index as a sum: the terms that do not change in the innermost loop are added
        // to the base first, then the others, then the constant. Cranelift then sees a
        // loop-invariant pointer (hoisted, one register) plus the loop's index plus a
        // displacement, which is one x86 address operand; an index summed in the kernel's
        // order would keep the buffer base and every invariant offset live in the loop.
        let mut terms = vec![];
        let mut constant = 0i64;
        flatten_sum(index, &mut terms, &mut constant);
        let (inner, outer): (Vec<&Expr>, Vec<&Expr>) =
            terms.into_iter().partition(|t| self.depth > 0 && self.level(t) >= self.depth);
        let mut addr = base;
        for group in [outer, inner] {
            for t in group {
                let (i, ty) = self.expr(t)?;
                if ty != Ty::I64 {
                    return self.err("indices must be integers");
                }
                let off = if size == 1 { i } else { self.b.ins().imul_imm_s(i, size) };
                addr = self.b.ins().iadd(addr, off);
            }
        }
        if constant != 0 {
            addr = self.b.ins().iadd_imm_s(addr, constant * size);
        }
        Ok(addr)
    }

    fn fconst(&mut self, ty: Ty, v: f32) -> Value {
        let s = self.b.ins().f32const(v);
        match ty {
            Ty::F32x4 => self.b.ins().splat(F32X4, s),
            _ => s,
        }
    }

    fn iconst32(&mut self, ty: Ty, v: i64) -> Value {
        let s = self.b.ins().iconst(I32, v);
        match ty {
            Ty::F32x4 => self.b.ins().splat(I32X4, s),
            _ => s,
        }
    }

    fn float_bits(&mut self, ty: Ty, v: Value) -> Value {
        match ty {
            Ty::F32x4 => {
                let fl = MemFlagsData::new().with_endianness(Endianness::Little);
                self.b.ins().bitcast(I32X4, fl, v)
            }
            _ => {
                let fl = MemFlagsData::new();
                self.b.ins().bitcast(I32, fl, v)
            }
        }
    }

    fn bits_as_float(&mut self, ty: Ty, v: Value) -> Value {
        match ty {
            Ty::F32x4 => {
                let fl = MemFlagsData::new().with_endianness(Endianness::Little);
                self.b.ins().bitcast(F32X4, fl, v)
            }
            _ => {
                let fl = MemFlagsData::new();
                self.b.ins().bitcast(F32, fl, v)
            }
        }
    }

    fn fma(&mut self, a: Value, b: Value, c: Value) -> Value {
        if self.fma {
            self.b.ins().fma(a, b, c)
        } else {
            let p = self.b.ins().fmul(a, b);
            self.b.ins().fadd(p, c)
        }
    }

    /// The float minimum or maximum as Rust's `f32::min`/`max` (and the interpreter) define
    /// it: `a` if it is the smaller/larger or `b` is NaN, else `b` (so a NaN operand loses
    /// to a number). Two compares, an or and a blend: Cranelift's IEEE `fmin`/`fmax`
    /// expand to several more instructions on x86, in loops (row maxima) that they bound.
    fn min_max(&mut self, ty: Ty, a: Value, b: Value, max: bool) -> Value {
        let cc = if max { FloatCC::GreaterThan } else { FloatCC::LessThan };
        let better = self.b.ins().fcmp(cc, a, b);
        let b_nan = self.b.ins().fcmp(FloatCC::Unordered, b, b);
        let take_a = self.b.ins().bor(better, b_nan);
        self.select_f(ty, take_a, a, b)
    }

    /// `if cond then a else b` per lane (`cond` from an `fcmp` of this type).
    fn select_f(&mut self, ty: Ty, cond: Value, a: Value, b: Value) -> Value {
        match ty {
            Ty::F32x4 => {
                let mask = self.bits_as_float(ty, cond);
                self.b.ins().bitselect(mask, a, b)
            }
            _ => self.b.ins().select(cond, a, b),
        }
    }

    /// `e^x`: range reduction `x = n·ln2 + r`, a degree-6 Taylor polynomial on
    /// `|r| ≤ ln2/2` (relative error < 2e-7), and `2^n` built in the exponent bits.
    /// Inputs below -87.3 give exactly 0 (so a `-inf` mask gives a zero weight); NaN stays
    /// NaN. Written for x86's vector unit: the clamps are a compare and a blend (IEEE
    /// `fmin`/`fmax` expand to several instructions each), and `n` is rounded and turned
    /// into an integer by adding `1.5·2^23` (the float's low mantissa bits are then `n`),
    /// not by a rounding plus a saturating conversion.
    fn exp(&mut self, ty: Ty, x: Value) -> Value {
        let (lo, hi) = (self.fconst(ty, crate::math::EXP_LO), self.fconst(ty, crate::math::EXP_HI));
        let over = self.b.ins().fcmp(FloatCC::GreaterThan, x, hi);
        let xc = self.select_f(ty, over, hi, x);
        let under = self.b.ins().fcmp(FloatCC::LessThan, x, lo);
        let xc = self.select_f(ty, under, lo, xc);
        let res = self.exp_clamped(ty, xc, true);
        let zero = self.fconst(ty, 0.0);
        self.select_f(ty, under, zero, res)
    }

    /// `UnOp::ExpLow`: `exp`'s range reduction with `ln 2` in one constant and a degree-4
    /// Taylor polynomial (relative error < 5e-5 on `|r| ≤ ln2/2`), and only the lower clamp
    /// (which keeps `2^n` a normal number); about half of `exp`'s instructions.
    fn exp_low(&mut self, ty: Ty, x: Value) -> Value {
        let lo = self.fconst(ty, crate::math::EXP_LO);
        let under = self.b.ins().fcmp(FloatCC::LessThan, x, lo);
        let xc = self.select_f(ty, under, lo, x);
        self.exp_clamped(ty, xc, false)
    }

    /// `e^x` for `x` in `[-87.3, 88.7]` (or NaN): `x = n·ln2 + r` with `n` rounded by adding
    /// `1.5·2^23`, then a Taylor polynomial in `r` times `2^n` built in the exponent bits.
    /// `precise`: `ln 2` in two constants and degree 6 (relative error < 2e-7); else one
    /// constant and degree 4 (< 5e-5).
    fn exp_clamped(&mut self, ty: Ty, xc: Value, precise: bool) -> Value {
        let log2e = self.fconst(ty, std::f32::consts::LOG2_E);
        let magic = self.fconst(ty, crate::math::EXP_MAGIC);
        // t + 1.5·2^23 rounds t to the nearest integer n (|n| ≤ 128 here).
        let tm = self.fma(xc, log2e, magic);
        let n = self.b.ins().fsub(tm, magic);
        let (r, coeffs): (Value, &[f32]) = if precise {
            let (ln2_hi, ln2_lo) = (self.fconst(ty, crate::math::LN2_HI), self.fconst(ty, crate::math::LN2_LO));
            let r = self.fma(n, ln2_hi, xc);
            (self.fma(n, ln2_lo, r), &crate::math::EXP_COEFFS)
        } else {
            let ln2 = self.fconst(ty, -std::f32::consts::LN_2);
            (self.fma(n, ln2, xc), &crate::math::EXP_LOW_COEFFS)
        };
        let mut p = self.fconst(ty, coeffs[0]);
        for &c in &coeffs[1..] {
            let cv = self.fconst(ty, c);
            p = self.fma(p, r, cv);
        }
        // The bits of tm are 0x4B400000 + n (two's complement in the low bits); adding
        // 127 - 0x4B400000 leaves n + 127, the biased exponent of 2^n, shifted into place.
        let bits = self.float_bits(ty, tm);
        let bias = self.iconst32(ty, (127i32 - 0x4B40_0000) as u32 as i64);
        let e = self.b.ins().iadd(bits, bias);
        let e = self.b.ins().ishl_imm_u(e, 23);
        let scale = self.bits_as_float(ty, e);
        self.b.ins().fmul(p, scale)
    }

    /// `erf(x)` by Abramowitz & Stegun 7.1.26: `1 - poly(t)·e^(-x²)`, `t = 1/(1 + p|x|)`,
    /// with the sign of `x` put back in the sign bit.
    fn erf(&mut self, ty: Ty, x: Value) -> Value {
        let a = self.b.ins().fabs(x);
        let one = self.fconst(ty, 1.0);
        let p = self.fconst(ty, crate::math::ERF_P);
        let d = self.fma(p, a, one);
        let t = self.b.ins().fdiv(one, d);
        let mut poly = self.fconst(ty, crate::math::ERF_A[0]);
        for &c in &crate::math::ERF_A[1..] {
            let cv = self.fconst(ty, c);
            poly = self.fma(poly, t, cv);
        }
        poly = self.b.ins().fmul(poly, t);
        let a2 = self.b.ins().fmul(a, a);
        let na2 = self.b.ins().fneg(a2);
        let e = self.exp(ty, na2);
        let pe = self.b.ins().fmul(poly, e);
        let y = self.b.ins().fsub(one, pe);
        let xb = self.float_bits(ty, x);
        let sign_mask = self.iconst32(ty, i32::MIN as i64);
        let sign = self.b.ins().band(xb, sign_mask);
        let yb = self.float_bits(ty, y);
        let r = self.b.ins().bor(yb, sign);
        self.bits_as_float(ty, r)
    }

    fn expr(&mut self, e: &Expr) -> Result<(Value, Ty), BackendError> {
        Ok(match e {
            Expr::Gpu(_) | Expr::ShflXor(..) => return self.err("thread indices and shuffles are for GPU kernels"),
            Expr::Int(v) => (self.b.ins().iconst(I64, *v), Ty::I64),
            Expr::F32(v) => (self.b.ins().f32const(*v), Ty::F32),
            Expr::Var(v) => match self.vars.get(*v as usize).copied().flatten() {
                Some((cv, ty)) => (self.b.use_var(cv), ty),
                None => return self.err(format!("v{v} is used before it is declared")),
            },
            Expr::Load { buf, index, ty } => {
                let addr = self.address(*buf, index)?;
                let elem = self.elems[*buf as usize];
                let flags = self.load_flags(*buf, index);
                match (elem, ty) {
                    (Elem::I32, Ty::I64) => (self.b.ins().sload32(flags, addr, 0), Ty::I64),
                    (Elem::I8, Ty::I64) => (self.b.ins().sload8(I64, flags, addr, 0), Ty::I64),
                    (Elem::U8, Ty::I64) => (self.b.ins().uload8(I64, flags, addr, 0), Ty::I64),
                    (Elem::F32, Ty::F32) => (self.b.ins().load(F32, flags, addr, 0), *ty),
                    (e, &t) if t == Ty::vector_of(e) => (self.b.ins().load(clif(t), flags, addr, 0), t),
                    _ => return self.err(format!("cannot load {} from a {} buffer", ty.name(), elem.name())),
                }
            }
            Expr::Bin(op, a, b) => {
                let (x, tx) = self.expr(a)?;
                let (y, ty) = self.expr(b)?;
                if tx != ty {
                    return self.err(format!("{op:?} of {tx:?} and {ty:?}"));
                }
                if matches!(tx, Ty::I8x16 | Ty::U8x16) || (tx == Ty::I32x4 && *op == BinOp::Div) {
                    return self.err(format!("{op:?} of {}", tx.name()));
                }
                let i = self.b.ins();
                let v = match (tx, op) {
                    (Ty::I64 | Ty::I32x4, BinOp::Add) => i.iadd(x, y),
                    (Ty::I64 | Ty::I32x4, BinOp::Sub) => i.isub(x, y),
                    (Ty::I64 | Ty::I32x4, BinOp::Mul) => i.imul(x, y),
                    (Ty::I64, BinOp::Div) => i.sdiv(x, y),
                    (Ty::I64 | Ty::I32x4, BinOp::Min) => i.smin(x, y),
                    (Ty::I64 | Ty::I32x4, BinOp::Max) => i.smax(x, y),
                    (_, BinOp::Add) => i.fadd(x, y),
                    (_, BinOp::Sub) => i.fsub(x, y),
                    (_, BinOp::Mul) => i.fmul(x, y),
                    (_, BinOp::Div) => i.fdiv(x, y),
                    (_, BinOp::Min) => return Ok((self.min_max(tx, x, y, false), tx)),
                    (_, BinOp::Max) => return Ok((self.min_max(tx, x, y, true), tx)),
                };
                (v, tx)
            }
            Expr::Fma(a, b, c) => {
                let (x, tx) = self.expr(a)?;
                let (y, ty) = self.expr(b)?;
                let (z, tz) = self.expr(c)?;
                if tx != ty || ty != tz || !matches!(tx, Ty::F32 | Ty::F32x4) {
                    return self.err(format!("fma of {tx:?}, {ty:?}, {tz:?}"));
                }
                (self.fma(x, y, z), tx)
            }
            Expr::Un(op, a) => {
                let (x, t) = self.expr(a)?;
                if !matches!(t, Ty::F32 | Ty::F32x4) {
                    return self.err(format!("{op:?} of {}", t.name()));
                }
                let v = match op {
                    UnOp::Neg => self.b.ins().fneg(x),
                    UnOp::Abs => self.b.ins().fabs(x),
                    UnOp::Sqrt => self.b.ins().sqrt(x),
                    UnOp::Exp => self.exp(t, x),
                    UnOp::ExpLow => self.exp_low(t, x),
                    UnOp::Erf => self.erf(t, x),
                };
                (v, t)
            }
            Expr::Splat(a) => {
                let (x, t) = self.expr(a)?;
                match t {
                    Ty::F32 => (self.b.ins().splat(F32X4, x), Ty::F32x4),
                    Ty::I64 => {
                        let x = self.b.ins().ireduce(I32, x);
                        (self.b.ins().splat(I32X4, x), Ty::I32x4)
                    }
                    _ => return self.err(format!("splat of {}", t.name())),
                }
            }
            Expr::Dot4 { acc, w, x } => {
                let (c, tc) = self.expr(acc)?;
                let (a, ta) = self.expr(w)?;
                let (x_, tb) = self.expr(x)?;
                if (tc, ta, tb) != (Ty::I32x4, Ty::I8x16, Ty::U8x16) {
                    return self.err(format!("dot4 of {}, {}, {}", tc.name(), ta.name(), tb.name()));
                }
                // Exactly the tree of Cranelift's `vpdpbusd` rule (x64 lower.isle) and of its
                // aarch64 `usdot` rule (FEAT_I8MM): products of sign- and zero-extended
                // halves in i16 (exact: |i8·u8| < 2^15), widened and summed pairwise twice,
                // added to the accumulator. The rules match the product's operands in a
                // fixed order (x64: signed first; aarch64: unsigned first), so the order
                // follows the ISA. Without VNNI / i8mm the same tree is computed by the
                // generic lowering, with the same result.
                let unsigned_first = self.arm;
                let b = &mut self.b;
                let mul = |b: &mut FunctionBuilder, s: Value, u: Value| {
                    if unsigned_first {
                        b.ins().imul(u, s)
                    } else {
                        b.ins().imul(s, u)
                    }
                };
                let (al, bl) = (b.ins().swiden_low(a), b.ins().uwiden_low(x_));
                let lo = mul(b, al, bl);
                let (ah, bh) = (b.ins().swiden_high(a), b.ins().uwiden_high(x_));
                let hi = mul(b, ah, bh);
                let (lol, loh) = (b.ins().swiden_low(lo), b.ins().swiden_high(lo));
                let pl = b.ins().iadd_pairwise(lol, loh);
                let (hil, hih) = (b.ins().swiden_low(hi), b.ins().swiden_high(hi));
                let ph = b.ins().iadd_pairwise(hil, hih);
                let p = b.ins().iadd_pairwise(pl, ph);
                (b.ins().iadd(p, c), Ty::I32x4)
            }
            Expr::PairAdd(a, b) => {
                let (x, tx) = self.expr(a)?;
                let (y, ty) = self.expr(b)?;
                if tx != Ty::I32x4 || ty != Ty::I32x4 {
                    return self.err(format!("pair_add of {} and {}", tx.name(), ty.name()));
                }
                (self.b.ins().iadd_pairwise(x, y), Ty::I32x4)
            }
            Expr::Cvt(to, a) => {
                let (x, t) = self.expr(a)?;
                let v = match (t, to) {
                    (Ty::I32x4, Ty::F32x4) => self.b.ins().fcvt_from_sint(F32X4, x),
                    (Ty::I64, Ty::F32) => self.b.ins().fcvt_from_sint(F32, x),
                    (Ty::F32x4, Ty::I32x4) => {
                        let r = self.b.ins().nearest(x);
                        self.b.ins().fcvt_to_sint_sat(I32X4, r)
                    }
                    (Ty::F32, Ty::I64) => {
                        let r = self.b.ins().nearest(x);
                        self.b.ins().fcvt_to_sint_sat(I64, r)
                    }
                    _ => return self.err(format!("conversion of {} to {}", t.name(), to.name())),
                };
                (v, *to)
            }
            Expr::Narrow(to, parts) => {
                if parts.len() != 4 || !matches!(to, Ty::I8x16 | Ty::U8x16) {
                    return self.err(format!("narrow of {} parts to {}", parts.len(), to.name()));
                }
                let mut vs = Vec::new();
                for p in parts {
                    let (v, t) = self.expr(p)?;
                    if t != Ty::I32x4 {
                        return self.err(format!("narrow of {}", t.name()));
                    }
                    vs.push(v);
                }
                let lo = self.b.ins().snarrow(vs[0], vs[1]);
                let hi = self.b.ins().snarrow(vs[2], vs[3]);
                let v = if *to == Ty::U8x16 { self.b.ins().unarrow(lo, hi) } else { self.b.ins().snarrow(lo, hi) };
                (v, *to)
            }
            Expr::Lane(a, l) => {
                let (x, t) = self.expr(a)?;
                if *l as usize >= t.lanes() || !matches!(t, Ty::I32x4 | Ty::F32x4) {
                    return self.err(format!("lane {l} of {}", t.name()));
                }
                let v = self.b.ins().extractlane(x, *l);
                if t == Ty::I32x4 {
                    (self.b.ins().sextend(I64, v), Ty::I64)
                } else {
                    (v, Ty::F32)
                }
            }
            Expr::Pack(lanes) => {
                if lanes.len() != 4 {
                    return self.err("pack takes four lanes");
                }
                let mut v = None;
                let mut ty = Ty::F32x4;
                for (l, e) in lanes.iter().enumerate() {
                    let (x, t) = self.expr(e)?;
                    let (x, vt) = match t {
                        Ty::F32 => (x, F32X4),
                        // i64 lanes keep their low 32 bits.
                        Ty::I64 => (self.b.ins().ireduce(I32, x), I32X4),
                        _ => return self.err(format!("pack of {}", t.name())),
                    };
                    ty = if vt == I32X4 { Ty::I32x4 } else { Ty::F32x4 };
                    v = Some(match v {
                        None => self.b.ins().splat(vt, x),
                        Some(acc) => self.b.ins().insertlane(acc, x, l as u8),
                    });
                }
                (v.expect("four lanes"), ty)
            }
            Expr::HSum(a) | Expr::HMax(a) => {
                let (x, t) = self.expr(a)?;
                if t != Ty::F32x4 {
                    return self.err(format!("horizontal reduction of {t:?}"));
                }
                let lanes: Vec<Value> = (0..4).map(|l| self.b.ins().extractlane(x, l)).collect();
                let sum = matches!(e, Expr::HSum(_));
                let pair = |s: &mut Self, p: Value, q: Value| {
                    if sum {
                        s.b.ins().fadd(p, q)
                    } else {
                        s.min_max(Ty::F32, p, q, true)
                    }
                };
                let l = pair(self, lanes[0], lanes[1]);
                let r = pair(self, lanes[2], lanes[3]);
                (pair(self, l, r), Ty::F32)
            }
            Expr::Select { op, a, b, then, otherwise } => {
                let (x, tx) = self.expr(a)?;
                let (y, ty) = self.expr(b)?;
                if tx != Ty::I64 || ty != Ty::I64 {
                    return self.err("select compares integers");
                }
                let cc = match op {
                    CmpOp::Lt => IntCC::SignedLessThan,
                    CmpOp::Le => IntCC::SignedLessThanOrEqual,
                    CmpOp::Eq => IntCC::Equal,
                };
                let c = self.b.ins().icmp(cc, x, y);
                let (t, tt) = self.expr(then)?;
                let (o, to) = self.expr(otherwise)?;
                if tt != to {
                    return self.err(format!("select of {tt:?} and {to:?}"));
                }
                (self.b.ins().select(c, t, o), tt)
            }
        })
    }
}
