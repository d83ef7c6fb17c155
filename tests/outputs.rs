//! Output formats: SRT and WebVTT cues, TSV rows and JSON segments agree with one another
//! and with the segments' times; files go into `--output-dir` named after the audio, and an
//! existing file is not replaced without `--force` (refused before any work, nothing
//! written).

mod common;
use common::*;

/// `HH:MM:SS,mmm` or `HH:MM:SS.mmm` in seconds.
fn seconds(clock: &str) -> f64 {
    let parts: Vec<f64> = clock.split([':', ',', '.']).map(|x| x.parse().unwrap()).collect();
    parts[0] * 3600.0 + parts[1] * 60.0 + parts[2] + parts[3] / 1000.0
}

#[test]
fn every_format_says_the_same_segments() {
    let dir = tempfile::tempdir().unwrap();
    let wbin = compile_tiny_int8(dir.path());
    let out = dir.path().join("out");
    wcc_ok(&["run", p(&wbin), p(&jfk()), "--timestamps", "--output-dir", p(&out), "--output-format", "all"]);
    let read = |ext: &str| std::fs::read_to_string(out.join(format!("jfk.{ext}"))).unwrap();
    let json: serde_json::Value = serde_json::from_str(&read("json")).unwrap();
    let segs: Vec<(f64, f64, String)> = json["segments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["start"].as_f64().unwrap(), s["end"].as_f64().unwrap(), s["text"].as_str().unwrap().to_string()))
        .collect();
    assert!(segs.len() >= 2, "{json}");
    for (i, s) in json["segments"].as_array().unwrap().iter().enumerate() {
        assert_eq!(s["id"], i);
        for key in ["tokens", "avg_logprob", "compression_ratio", "no_speech_prob", "temperature"] {
            assert!(!s[key].is_null(), "segment {i} lacks {key}");
        }
    }
    // SRT: numbered cues, `,` before the milliseconds.
    let srt = read("srt");
    let cues: Vec<&str> = srt.split("\n\n").filter(|c| !c.trim().is_empty()).collect();
    assert_eq!(cues.len(), segs.len());
    for (i, (cue, (start, end, text))) in cues.iter().zip(&segs).enumerate() {
        let lines: Vec<&str> = cue.lines().collect();
        assert_eq!(lines[0], (i + 1).to_string());
        let (a, b) = lines[1].split_once(" --> ").unwrap();
        assert!(a.contains(',') && (seconds(a) - start).abs() < 1e-3 && (seconds(b) - end).abs() < 1e-3, "{cue}");
        assert_eq!(lines[2], text);
    }
    // WebVTT: the header, `.` before the milliseconds, the same cues.
    let vtt = read("vtt");
    assert!(vtt.starts_with("WEBVTT\n\n"));
    let cues: Vec<&str> = vtt["WEBVTT\n\n".len()..].split("\n\n").filter(|c| !c.trim().is_empty()).collect();
    assert_eq!(cues.len(), segs.len());
    for (cue, (start, _, text)) in cues.iter().zip(&segs) {
        let (a, _) = cue.lines().next().unwrap().split_once(" --> ").unwrap();
        assert!(a.contains('.') && (seconds(a) - start).abs() < 1e-3);
        assert_eq!(cue.lines().nth(1).unwrap(), text);
    }
    // TSV: milliseconds.
    let tsv = read("tsv");
    let rows: Vec<Vec<&str>> = tsv.lines().skip(1).map(|l| l.split('\t').collect()).collect();
    assert_eq!(tsv.lines().next(), Some("start\tend\ttext"));
    for (r, (start, end, text)) in rows.iter().zip(&segs) {
        assert_eq!(r[0].parse::<i64>().unwrap(), (start * 1000.0).round() as i64);
        assert_eq!(r[1].parse::<i64>().unwrap(), (end * 1000.0).round() as i64);
        assert_eq!(r[2], text);
    }
    assert_eq!(read("txt").lines().collect::<Vec<_>>(), segs.iter().map(|s| s.2.as_str()).collect::<Vec<_>>());
    // The same SRT on stdout.
    assert_eq!(wcc_ok(&["run", p(&wbin), p(&jfk()), "--timestamps", "--output-format", "srt"]), srt);

    // Existing files: refused before any work, naming the file, nothing changed; --force
    // replaces them.
    std::fs::write(out.join("jfk.srt"), "mine").unwrap();
    let run = wcc(&["run", p(&wbin), p(&jfk()), "--output-dir", p(&out), "--output-format", "srt"]);
    let e = String::from_utf8_lossy(&run.stderr);
    assert!(!run.status.success() && e.contains("jfk.srt exists") && e.contains("--force"), "{e}");
    assert_eq!(read("srt"), "mine");
    wcc_ok(&["run", p(&wbin), p(&jfk()), "--output-dir", p(&out), "--output-format", "srt", "--force"]);
    assert!(read("srt").starts_with("1\n00:00:00,000 --> "));
    // `all` is for files only; an output directory that is a file is refused.
    let e = wcc_err(&["run", p(&wbin), p(&jfk()), "--output-format", "all"]);
    assert!(e.contains("--output-dir"), "{e}");
    let e = wcc_err(&["run", p(&wbin), p(&jfk()), "--output-dir", p(&out.join("jfk.txt"))]);
    assert!(e.contains("not a directory"), "{e}");
}

#[test]
fn a_progress_bar_shows_on_a_terminal_only_for_long_audio() {
    let dir = tempfile::tempdir().unwrap();
    let wbin = compile_tiny_int8(dir.path());
    let long = shared_data().join("audio/longform/ljspeech_LJ001-0001_0016.wav");
    // Piped stderr: nothing but errors there.
    let run = wcc(&["run", p(&wbin), p(&long)]);
    assert!(run.status.success() && run.stderr.is_empty(), "{}", String::from_utf8_lossy(&run.stderr));
    // On a terminal (util-linux `script` gives the command one): the bar, ending at the
    // recording's length; none for a clip that fits one window.
    let bin = env!("CARGO_BIN_EXE_wcc");
    let on_tty = |audio: &std::path::Path| -> Option<String> {
        let cmd = format!("{bin} run {} {} > /dev/null", p(&wbin), p(audio));
        let out = std::process::Command::new("script").args(["-qec", &cmd, "/dev/null"]).output().ok()?;
        Some(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    match (on_tty(&long), on_tty(&jfk())) {
        (Some(long_tty), Some(short_tty)) => {
            assert!(long_tty.contains("[##############################] 111/111 s"), "{long_tty:?}");
            assert!(!short_tty.contains('#'), "{short_tty:?}");
        }
        _ => eprintln!("`script` is not available: the terminal half is not checked"),
    }
}
