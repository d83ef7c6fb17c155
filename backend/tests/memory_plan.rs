//! The arena plan of real models: temporaries that are live at the same time never overlap,
//! sharing makes the arena smaller than the buffers it places, and kernels only touch the
//! arena or the weights within bounds.

use wcc_format::BufRef;

fn model_dir(name: &str) -> std::path::PathBuf {
    wcc_frontend::resolve_model(name).unwrap_or_else(|e| panic!("{e}: run scripts/fetch-models {name}"))
}

#[test]
fn live_temporaries_never_overlap_and_sharing_pays() {
    for name in ["tiny.en", "base"] {
        let loaded = wcc_frontend::load(&model_dir(name)).unwrap();
        let module = wcc_passes::run(loaded.module, &wcc_passes::default_pipeline()).unwrap();
        let p = wcc_backend::program::build(&module, &loaded.checkpoint, &wcc_targets::host().unwrap()).unwrap();
        let mut unshared = 0usize;
        for temps in &p.temporaries {
            for (i, a) in temps.iter().enumerate() {
                unshared += a.bytes;
                assert!(a.first <= a.last);
                assert!(p.persistent_bytes as usize + a.offset + a.bytes <= p.arena_bytes as usize);
                for b in &temps[i + 1..] {
                    let live_together = a.first <= b.last && b.first <= a.last;
                    let overlap = a.offset < b.offset + b.bytes && b.offset < a.offset + a.bytes;
                    assert!(!(live_together && overlap), "{name}: {a:?} and {b:?} share memory while both live");
                }
            }
        }
        let temp_region = p.arena_bytes - p.persistent_bytes;
        eprintln!(
            "{name}: arena {:.1} MB = {:.1} MB persistent + {:.1} MB temporaries (unshared: {:.1} MB, {:.1}x)",
            p.arena_bytes as f64 / 1e6,
            p.persistent_bytes as f64 / 1e6,
            temp_region as f64 / 1e6,
            unshared as f64 / 1e6,
            unshared as f64 / temp_region as f64
        );
        assert!((temp_region as usize) < unshared, "{name}: sharing saved nothing");
        for g in &p.graphs {
            for l in &g.launches {
                for b in &l.buffers {
                    match *b {
                        BufRef::Arena { offset, len } => assert!(offset + len <= p.arena_bytes),
                        BufRef::Weight { offset, len } => {
                            assert!(offset + len <= p.weights.len() as u64)
                        }
                    }
                }
            }
        }
    }
}
