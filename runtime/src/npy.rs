//! Minimal `.npy` (format 1.0, little-endian f32, C order) reading and writing, for dumping
//! features and comparing with Python references.

use std::path::Path;

#[derive(Debug, thiserror::Error)]
#[error("{path}: {msg}")]
pub struct NpyError {
    pub path: String,
    pub msg: String,
}

pub fn write_f32(path: &Path, shape: &[usize], data: &[f32]) -> Result<(), NpyError> {
    let err = |msg: String| NpyError { path: path.display().to_string(), msg };
    if shape.iter().product::<usize>() != data.len() {
        return Err(err(format!("shape {shape:?} does not hold {} values", data.len())));
    }
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let tuple = if dims.len() == 1 { format!("({},)", dims[0]) } else { format!("({})", dims.join(", ")) };
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {tuple}, }}");
    // Header padded with spaces so that the data starts at a multiple of 64, ending in '\n'.
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut out = Vec::with_capacity(10 + header.len() + data.len() * 4);
    out.extend_from_slice(b"\x93NUMPY\x01\x00");
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    for v in data {
        out.extend_from_slice(&v.to_le_bytes());
    }
    std::fs::write(path, out).map_err(|e| err(e.to_string()))
}

/// Reads a little-endian f32 C-order array: `(shape, data)`.
pub fn read_f32(path: &Path) -> Result<(Vec<usize>, Vec<f32>), NpyError> {
    let err = |msg: String| NpyError { path: path.display().to_string(), msg };
    let b = std::fs::read(path).map_err(|e| err(e.to_string()))?;
    if b.len() < 10 || &b[..6] != b"\x93NUMPY" {
        return Err(err("not a .npy file".into()));
    }
    let (hlen, hstart) = match b[6] {
        1 => (u16::from_le_bytes([b[8], b[9]]) as usize, 10),
        2 | 3 if b.len() >= 12 => (u32::from_le_bytes([b[8], b[9], b[10], b[11]]) as usize, 12),
        v => return Err(err(format!("unsupported .npy version {v}"))),
    };
    let header = std::str::from_utf8(b.get(hstart..hstart + hlen).ok_or_else(|| err("truncated header".into()))?)
        .map_err(|_| err("header is not text".into()))?;
    if !header.contains("'descr': '<f4'") || header.contains("'fortran_order': True") {
        return Err(err(format!("only little-endian f32 C-order arrays are read, header: {header}")));
    }
    let shape_txt = header
        .split("'shape':")
        .nth(1)
        .and_then(|s| s.split('(').nth(1))
        .and_then(|s| s.split(')').next())
        .ok_or_else(|| err("no shape in header".into()))?;
    let shape: Vec<usize> = shape_txt
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().map_err(|_| err(format!("bad shape `{shape_txt}`"))))
        .collect::<Result<_, _>>()?;
    let data_bytes = &b[hstart + hlen..];
    let n: usize = shape.iter().product();
    if data_bytes.len() != n * 4 {
        return Err(err(format!("{} data bytes for shape {shape:?}", data_bytes.len())));
    }
    Ok((shape, data_bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()))
}
