//! Target descriptions: an architecture and the CPU features the generated code may use.
//! `host` detects the running CPU; named levels (`x86_64-v2`, `x86_64-v3`, `x86_64-v4`,
//! `aarch64`) give portable builds. wcc's CPU kernels need at least SSE4.1 on x86-64
//! (vector rounding) and NEON on aarch64.

/// Declares the x86-64 features wcc knows by name (in the order `host` reports them) and
/// their run-time detection, from one list.
macro_rules! x86_features {
    ($($name:tt),* $(,)?) => {
        pub const X86_FEATURES: &[&str] = &[$($name),*];

        #[cfg(target_arch = "x86_64")]
        fn detect_x86(feature: &str) -> bool {
            match feature {
                $($name => std::arch::is_x86_feature_detected!($name),)*
                _ => false,
            }
        }
    };
}

x86_features!(
    "sse3",
    "ssse3",
    "sse4.1",
    "sse4.2",
    "popcnt",
    "avx",
    "avx2",
    "fma",
    "bmi1",
    "bmi2",
    "lzcnt",
    "avx512f",
    "avx512vl",
    "avx512dq",
    "avx512bw",
    "avx512vnni",
    "avx512bf16",
    "avx512fp16",
    "f16c",
);

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// `x86_64` or `aarch64`.
    pub arch: String,
    pub features: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    #[error(
        "unknown target `{0}` (targets: host, x86_64-v2, x86_64-v3, x86_64-v4, aarch64, aarch64-i8mm, cuda-sm80, \
         cuda-sm89, cuda-sm90)"
    )]
    Unknown(String),
    #[error("the host architecture `{0}` is not supported (x86_64 and aarch64 are)")]
    UnsupportedHost(String),
    #[error("x86-64 targets need SSE4.1; this one lacks it")]
    TooOld,
}

impl Target {
    pub fn has(&self, feature: &str) -> bool {
        self.features.iter().any(|f| f == feature)
    }

    /// The LLVM-style triple.
    pub fn triple(&self) -> String {
        format!("{}-unknown-linux-gnu", self.arch)
    }

    /// Resolves `host` or a named level.
    pub fn named(name: &str) -> Result<Target, TargetError> {
        let x86 = |f: &[&str]| Target { arch: "x86_64".into(), features: f.iter().map(|s| s.to_string()).collect() };
        let arm = |f: &[&str]| Target { arch: "aarch64".into(), features: f.iter().map(|s| s.to_string()).collect() };
        const V2: &[&str] = &["sse3", "ssse3", "sse4.1", "sse4.2", "popcnt"];
        const V3: &[&str] =
            &["sse3", "ssse3", "sse4.1", "sse4.2", "popcnt", "avx", "avx2", "fma", "bmi1", "bmi2", "lzcnt", "f16c"];
        let t = match name {
            "host" => host()?,
            "x86_64-v2" => x86(V2),
            "x86_64-v3" => x86(V3),
            "x86_64-v4" => x86(&[V3, &["avx512f", "avx512vl", "avx512dq", "avx512bw"]].concat()),
            "aarch64" => arm(&["neon"]),
            // Armv8.6 (Neoverse V1/N2, Apple M2 and later): the mixed-sign `usdot`.
            "aarch64-i8mm" => arm(&AARCH64_FEATURES),
            other => match GPUS.iter().find(|g| g.name == other) {
                Some(g) => Target { arch: "nvptx64".into(), features: vec![format!("sm_{}", g.sm)] },
                None => return Err(TargetError::Unknown(other.into())),
            },
        };
        if t.arch == "x86_64" && !t.has("sse4.1") {
            return Err(TargetError::TooOld);
        }
        Ok(t)
    }
}

impl Target {
    /// The GPU this target names, if it is one.
    pub fn gpu(&self) -> Option<&'static GpuSpec> {
        if self.arch != "nvptx64" {
            return None;
        }
        GPUS.iter().find(|g| self.has(&format!("sm_{}", g.sm)))
    }

    /// The name `named` resolves to this target, for GPUs (`cuda-sm80`); `None` for CPUs.
    pub fn gpu_name(&self) -> Option<&'static str> {
        self.gpu().map(|g| g.name)
    }
}

/// What GPU schedules need to know of an NVIDIA GPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GpuSpec {
    pub name: &'static str,
    /// Compute capability ×10 (`80` for sm_80): the PTX `.target`.
    pub sm: u32,
    /// The PTX ISA version the emitted module declares (major, minor).
    pub ptx_isa: (u32, u32),
    pub warp: u32,
    /// Static shared memory per block (the 48 KiB a kernel may declare without opting in).
    pub shared_bytes: u32,
    /// Shared memory per multiprocessor, for choosing how many blocks fit at once.
    pub shared_per_sm: u32,
    pub max_threads_per_block: u32,
    pub multiprocessors: u32,
    /// Tensor-core `mma.sync` shapes (m, n, k) for f16/bf16 and for int8 operands.
    pub mma_f16: (u32, u32, u32),
    pub mma_i8: (u32, u32, u32),
}

/// The GPUs `Target::named` knows: A100 (sm_80), Ada (sm_89), H100 (sm_90).
pub const GPUS: [GpuSpec; 3] = [
    GpuSpec {
        name: "cuda-sm80",
        sm: 80,
        ptx_isa: (7, 0),
        warp: 32,
        shared_bytes: 48 * 1024,
        shared_per_sm: 164 * 1024,
        max_threads_per_block: 1024,
        multiprocessors: 108,
        mma_f16: (16, 8, 16),
        mma_i8: (16, 8, 32),
    },
    GpuSpec {
        name: "cuda-sm89",
        sm: 89,
        ptx_isa: (7, 8),
        warp: 32,
        shared_bytes: 48 * 1024,
        shared_per_sm: 100 * 1024,
        max_threads_per_block: 1024,
        multiprocessors: 128,
        mma_f16: (16, 8, 16),
        mma_i8: (16, 8, 32),
    },
    GpuSpec {
        name: "cuda-sm90",
        sm: 90,
        ptx_isa: (7, 8),
        warp: 32,
        shared_bytes: 48 * 1024,
        shared_per_sm: 228 * 1024,
        max_threads_per_block: 1024,
        multiprocessors: 132,
        mma_f16: (16, 8, 16),
        mma_i8: (16, 8, 32),
    },
];

/// The aarch64 features wcc knows by name: NEON (required), the signed dot product
/// (FEAT_DotProd, `sdot`) and the int8 matrix extension (FEAT_I8MM, whose `usdot` multiplies
/// unsigned activations by signed weights, the form of wcc's int8 kernels).
pub const AARCH64_FEATURES: [&str; 3] = ["neon", "dotprod", "i8mm"];

/// Whether the running CPU has `feature` (a name of [`X86_FEATURES`] or
/// [`AARCH64_FEATURES`]); unknown names are reported as absent.
pub fn host_has(feature: &str) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        detect_x86(feature)
    }
    #[cfg(target_arch = "aarch64")]
    {
        match feature {
            "neon" => std::arch::is_aarch64_feature_detected!("neon"),
            "dotprod" => std::arch::is_aarch64_feature_detected!("dotprod"),
            "i8mm" => std::arch::is_aarch64_feature_detected!("i8mm"),
            _ => false,
        }
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        let _ = feature;
        false
    }
}

/// The running machine.
pub fn host() -> Result<Target, TargetError> {
    let arch = std::env::consts::ARCH;
    match arch {
        "x86_64" => Ok(Target {
            arch: arch.into(),
            features: X86_FEATURES.iter().filter(|f| host_has(f)).map(|f| f.to_string()).collect(),
        }),
        "aarch64" => Ok(Target {
            arch: arch.into(),
            features: AARCH64_FEATURES.iter().filter(|f| host_has(f)).map(|f| f.to_string()).collect(),
        }),
        other => Err(TargetError::UnsupportedHost(other.into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_nest_and_unknown_names_are_refused() {
        let v2 = Target::named("x86_64-v2").unwrap();
        let v3 = Target::named("x86_64-v3").unwrap();
        assert!(v2.features.iter().all(|f| v3.has(f)));
        assert!(v3.has("avx2") && !v2.has("avx2"));
        assert!(Target::named("pentium").is_err());
        for name in ["cuda-sm80", "cuda-sm89", "cuda-sm90"] {
            let t = Target::named(name).unwrap();
            assert_eq!(t.gpu_name(), Some(name));
            assert_eq!(t.gpu().unwrap().warp, 32);
        }
        assert!(v3.gpu().is_none());
        let h = host().unwrap();
        assert!(h.features.iter().all(|f| host_has(f)));
    }
}
