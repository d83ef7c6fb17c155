//! File tests, as Cranelift has them: each `tests/filetests/*.ir` is a small module in IR text
//! form whose first line says what to run (`# run: PASS[,PASS] [--int8] [--keep-float P]
//! [--timesteps N]`); the module after those passes is expected to equal the text kept in the
//! file after the `# expected:` line (each line commented out with `# `, so the whole file
//! still parses as the input). `WCC_BLESS=1 cargo test --test filetests` rewrites the
//! expected part from what the passes produce now. No checkpoint is needed: passes read no
//! weight data.

use std::path::Path;

const MARKER: &str = "# expected:";

/// The pass list and options of a `# run:` line.
fn run_line(line: &str, file: &Path) -> (Vec<String>, wcc_passes::PassOptions) {
    let spec = line
        .strip_prefix("# run:")
        .unwrap_or_else(|| panic!("{}: the first line must be `# run: ...`", file.display()));
    let mut words = spec.split_whitespace();
    let passes = words.next().expect("a pass list").split(',').map(String::from).collect();
    let mut opts = wcc_passes::PassOptions::default();
    while let Some(w) = words.next() {
        match w {
            "--int8" => opts.int8 = true,
            "--keep-float" => {
                opts.keep_float = Some(words.next().expect("patterns").split(',').map(String::from).collect())
            }
            "--timesteps" => opts.timesteps = Some(words.next().expect("frames").parse().expect("a number")),
            other => panic!("{}: unknown option `{other}` in the run line", file.display()),
        }
    }
    (passes, opts)
}

fn check(file: &Path) -> Result<(), String> {
    let text = std::fs::read_to_string(file).unwrap();
    let (passes, opts) = run_line(text.lines().next().unwrap_or(""), file);
    let input = wcc_ir::parse_module(&text).map_err(|e| format!("{}: {e}", file.display()))?;
    wcc_ir::verify(&input).map_err(|e| format!("{}: the input is malformed: {e}", file.display()))?;
    let names: Vec<&str> = passes.iter().map(String::as_str).collect();
    let out = wcc_passes::run_observed(input, &names, &opts, &mut |_, _, _| Ok(())).map_err(|e| e.to_string())?;
    let got = wcc_ir::print_module(&out);
    let (head, expected) = match text.find(MARKER) {
        Some(at) => (&text[..at], &text[at + MARKER.len()..]),
        None => (text.as_str(), ""),
    };
    let expected: String = expected
        .lines()
        .skip(1)
        .map(|l| format!("{}\n", l.strip_prefix("# ").or_else(|| l.strip_prefix('#')).unwrap_or(l)))
        .collect();
    if got == expected {
        return Ok(());
    }
    if std::env::var_os("WCC_BLESS").is_some() {
        let commented: String =
            got.lines().map(|l| if l.is_empty() { "#\n".to_string() } else { format!("# {l}\n") }).collect();
        std::fs::write(file, format!("{}{MARKER}\n{commented}", head.trim_end().to_string() + "\n\n")).unwrap();
        eprintln!("blessed {}", file.display());
        return Ok(());
    }
    Err(format!(
        "{}: the module after {} differs from the expected text (WCC_BLESS=1 to accept):\n--- got\n{got}--- expected\n{expected}",
        file.display(),
        passes.join(",")
    ))
}

#[test]
fn every_file_test_gives_its_expected_module() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/filetests");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "ir"))
        .collect();
    files.sort();
    assert!(files.len() >= 2, "no file tests in {}", dir.display());
    let failures: Vec<String> = files.iter().filter_map(|f| check(f).err()).collect();
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn a_wrong_expectation_is_reported() {
    // The harness itself: an expectation that does not match fails (and names the file).
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("wrong.ir");
    let src =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/filetests/fuse-linear-gelu.ir"))
            .unwrap();
    let at = src.find(MARKER).unwrap();
    std::fs::write(&file, format!("{}{MARKER}\n# module \"nothing\" {{\n# }}\n", &src[..at])).unwrap();
    if std::env::var_os("WCC_BLESS").is_none() {
        let e = check(&file).unwrap_err();
        assert!(e.contains("wrong.ir") && e.contains("differs"), "{e}");
    }
}
