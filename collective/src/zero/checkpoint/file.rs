//! The shard file: magic, header, arrays; written atomically, read as untrusted input.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::reduce::{bytes_of, bytes_of_mut};

use super::err;
use crate::zero::ZeroError;

pub(super) const MAGIC: &[u8; 8] = b"FERRUNZ1";
/// The largest header a shard may declare.
pub const MAX_HEADER: usize = 64 << 20;

#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub(super) struct Header {
    /// `(logical start, length)` runs, ascending and disjoint.
    runs: Vec<(usize, usize)>,
    /// Arrays stored, in order: `master`, then the optimizer's state.
    arrays: usize,
}

/// Writes `bytes` to `path` through a temporary file, synced, then renamed over it.
pub(super) fn write_atomic(path: &Path, parts: &[&[u8]]) -> Result<(), ZeroError> {
    let tmp = path.with_extension("tmp");
    let io = |e: std::io::Error| err(path, e.to_string());
    let mut f = File::create(&tmp).map_err(io)?;
    for p in parts {
        f.write_all(p).map_err(io)?;
    }
    f.sync_all().map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

/// Writes one shard file: magic, header, arrays.
pub(super) fn write_file(
    dir: &Path,
    name: &str,
    runs: &[(usize, usize)],
    arrays: &[Vec<f32>],
) -> Result<(), ZeroError> {
    std::fs::create_dir_all(dir).map_err(|e| err(dir, e.to_string()))?;
    let header = Header {
        runs: runs.to_vec(),
        arrays: arrays.len(),
    };
    let header = serde_json::to_vec(&header).map_err(|e| err(dir, e.to_string()))?;
    let len = u32::try_from(header.len())
        .ok()
        .filter(|&l| l as usize <= MAX_HEADER)
        .ok_or_else(|| err(dir, "the shard's header is too large"))?
        .to_le_bytes();
    let mut parts: Vec<&[u8]> = vec![MAGIC, &len, &header];
    parts.extend(arrays.iter().map(|a| bytes_of(a)));
    write_atomic(&dir.join(name), &parts)
}

/// The shards' runs together must hold every element once.
pub(super) fn covers(shards: &[Shard], numel: usize) -> Result<(), String> {
    let mut runs: Vec<(usize, usize)> = shards
        .iter()
        .flat_map(|s| s.runs.iter().copied())
        .filter(|r| r.1 > 0)
        .collect();
    runs.sort_unstable();
    let mut next = 0;
    for (start, len) in runs {
        if start != next {
            return Err(format!("its shards do not hold elements {next}..{start} of the model exactly once; a shard is missing or damaged"));
        }
        next = start + len;
    }
    if next != numel {
        return Err(format!(
            "its shards hold {next} of the model's {numel} elements; a shard is missing"
        ));
    }
    Ok(())
}

pub(super) fn read_capped(path: &Path, cap: usize) -> Result<Vec<u8>, ZeroError> {
    let f = File::open(path).map_err(|e| err(path, e.to_string()))?;
    let len = f.metadata().map_err(|e| err(path, e.to_string()))?.len();
    if len > cap as u64 {
        return Err(err(path, format!("{len} bytes; at most {cap} expected")));
    }
    std::fs::read(path).map_err(|e| err(path, e.to_string()))
}

/// An open shard file, its header checked against the model and the file's size.
pub(super) struct Shard {
    path: PathBuf,
    file: File,
    runs: Vec<(usize, usize)>,
    /// Where the values start, and values per array.
    data: u64,
    per_array: usize,
}

impl Shard {
    pub(super) fn open(
        dir: &Path,
        name: &str,
        numel: usize,
        arrays: usize,
    ) -> Result<Self, ZeroError> {
        let path = dir.join(name);
        let valid = name.starts_with("shard-")
            && name.ends_with(".bin")
            && name
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'.')
            && !name.contains("..");
        if !valid {
            return Err(err(
                dir,
                format!("the manifest names {name:?}, not a shard file"),
            ));
        }
        let file = File::open(&path)
            .map_err(|e| err(&path, format!("missing or unreadable shard: {e}")))?;
        let size = file
            .metadata()
            .map_err(|e| err(&path, e.to_string()))?
            .len();
        let mut head = [0u8; 12];
        file.read_exact_at(&mut head, 0)
            .map_err(|_| err(&path, "shorter than its header"))?;
        if &head[..8] != MAGIC {
            return Err(err(&path, "not a ferrun ZeRO shard (bad magic)"));
        }
        let hlen = u32::from_le_bytes([head[8], head[9], head[10], head[11]]) as usize;
        if hlen > MAX_HEADER || 12 + hlen as u64 > size {
            return Err(err(
                &path,
                format!("declares a header of {hlen} bytes in a file of {size}"),
            ));
        }
        let mut header = vec![0u8; hlen];
        file.read_exact_at(&mut header, 12)
            .map_err(|e| err(&path, e.to_string()))?;
        let header: Header =
            serde_json::from_slice(&header).map_err(|e| err(&path, format!("bad header: {e}")))?;
        if header.arrays != arrays {
            return Err(err(
                &path,
                format!("holds {} arrays; {arrays} expected", header.arrays),
            ));
        }
        let mut end = 0usize;
        let mut per_array = 0usize;
        for &(start, len) in &header.runs {
            let stop = start
                .checked_add(len)
                .filter(|&s| s <= numel && start >= end);
            let Some(stop) = stop else {
                return Err(err(
                    &path,
                    format!(
                        "run {start}+{len} is outside the model's {numel} elements or out of order"
                    ),
                ));
            };
            end = stop;
            per_array += len;
        }
        let want = (12 + hlen as u64).checked_add((per_array as u64) * 4 * arrays as u64);
        if want != Some(size) {
            return Err(err(
                &path,
                format!("{size} bytes; its header says {want:?}"),
            ));
        }
        Ok(Self {
            path,
            file,
            runs: header.runs,
            data: 12 + hlen as u64,
            per_array,
        })
    }

    /// Reads the part of `wanted` (logical) this shard holds into `out` (indexed from
    /// `wanted.start`), array by array.
    pub(super) fn read_into(
        &self,
        wanted: std::ops::Range<usize>,
        out: &mut [Vec<f32>],
    ) -> Result<(), ZeroError> {
        let mut at = 0usize;
        for &(start, len) in &self.runs {
            let (lo, hi) = (start.max(wanted.start), (start + len).min(wanted.end));
            if lo < hi {
                for (a, dst) in out.iter_mut().enumerate() {
                    let offset = self.data + 4 * (a * self.per_array + at + (lo - start)) as u64;
                    let dst = &mut dst[lo - wanted.start..hi - wanted.start];
                    self.file
                        .read_exact_at(bytes_of_mut(dst), offset)
                        .map_err(|e| err(&self.path, e.to_string()))?;
                }
            }
            at += len;
        }
        Ok(())
    }
}
