use wcc_ir::{DType, Op, TensorType};
fn bench(m: usize, n: usize, k: usize) {
    let tys = vec![
        TensorType::new(DType::U8, [m, k]),
        TensorType::f32([m]),
        TensorType::new(DType::I8, [n, k]),
        TensorType::f32([n]),
        TensorType::new(DType::I32, [n]),
        TensorType::f32([n]),
    ];
    let refs: Vec<&TensorType> = tys.iter().collect();
    let op = Op::QLinear { gelu: false, residual: false };
    let t = wcc_targets::Target::named("host").unwrap();
    let lowered = wcc_backend::lower::lower_op(&op, &refs, &TensorType::f32([m, n]), false, &t).unwrap();
    let kern = &lowered.launches[0].0;
    let jk = wcc_backend::jit::compile_for(kern, &t).unwrap();
    let mut bufs: Vec<Vec<u8>> = kern.buffers.iter().map(|b| vec![1u8; b.bytes()]).collect();
    let reps = (200_000_000 / (m * n * k)).max(5);
    let mut best = f64::MAX;
    for _ in 0..reps {
        let mut bb: Vec<&mut [u8]> = bufs.iter_mut().map(|v| v.as_mut_slice()).collect();
        let t0 = std::time::Instant::now();
        jk.run(&mut bb).unwrap();
        best = best.min(t0.elapsed().as_secs_f64());
    }
    println!("m={m} n={n} k={k}: {:.3} ms, {:.1} GB/s of weights, {:.1} GOP/s", best * 1e3, (n * k) as f64 / best / 1e9, (2 * m * n * k) as f64 / best / 1e9);
}
#[test]
fn dump() {
    bench(1, 51865, 512);
    bench(1, 2048, 512);
    bench(1, 512, 2048);
    bench(1500, 2048, 512);
    bench(1500, 512, 2048);
}
#[test]
fn listing() {
    let (m, n, k) = (1500usize, 2048usize, 512usize);
    let tys = vec![
        TensorType::new(DType::U8, [m, k]),
        TensorType::f32([m]),
        TensorType::new(DType::I8, [n, k]),
        TensorType::f32([n]),
        TensorType::new(DType::I32, [n]),
        TensorType::f32([n]),
    ];
    let refs: Vec<&TensorType> = tys.iter().collect();
    let op = Op::QLinear { gelu: false, residual: false };
    let t = wcc_targets::Target::named("host").unwrap();
    let lowered = wcc_backend::lower::lower_op(&op, &refs, &TensorType::f32([m, n]), false, &t).unwrap();
    let isa = wcc_backend::cranelift::isa(&t).unwrap();
    println!("{}", wcc_backend::cranelift::listing(&lowered.launches[0].0, &*isa).unwrap());
}
