//! IR → IR transformations. Each pass is a function `Module -> Result<Module>` in a file of
//! its own, whose doc comment says what it rewrites and why that is sound. [`run`] applies
//! passes by name and verifies the module after each one.

mod hoist_cross_kv;

pub use hoist_cross_kv::hoist_cross_kv;

use wcc_ir::Module;

#[derive(Debug, thiserror::Error)]
pub enum PassError {
    #[error("pass `{pass}`: {msg}")]
    Failed { pass: &'static str, msg: String },
    #[error("unknown pass `{0}` (passes: {list})", list = PASSES.iter().map(|p| p.0).collect::<Vec<_>>().join(", "))]
    Unknown(String),
}

type PassFn = fn(Module) -> Result<Module, PassError>;

/// Every pass, by name, in the default order.
pub const PASSES: &[(&str, PassFn)] = &[("hoist-cross-kv", hoist_cross_kv)];

/// Runs the named passes in order; the verifier runs after each and a failure names the pass.
pub fn run(mut module: Module, names: &[&str]) -> Result<Module, PassError> {
    for &name in names {
        let (pass_name, f) = PASSES
            .iter()
            .find(|(n, _)| *n == name)
            .ok_or_else(|| PassError::Unknown(name.to_string()))?;
        module = f(module)?;
        wcc_ir::verify(&module).map_err(|e| PassError::Failed {
            pass: pass_name,
            msg: format!("left the module malformed: {e}"),
        })?;
    }
    Ok(module)
}
