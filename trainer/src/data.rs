//! The handwritten-digits data set that ships inside scikit-learn's wheel
//! (`sklearn/datasets/data/digits.csv.gz`: 1,797 rows of 64 pixel values 0–16 and a label
//! 0–9), found where pip installed it and split deterministically into train and held-out sets.
//!
//! # Trust
//! The file is read as untrusted input: it is decompressed with a size cap, and every row must
//! have 65 integer fields in range; anything else is a [`DataError`] naming the file and line.

use std::io::Read;
use std::path::{Path, PathBuf};

/// Pixels per image (8 × 8).
pub const FEATURES: usize = 64;
/// Digit classes.
pub const CLASSES: usize = 10;
/// Where the file lies inside a site-packages directory.
const IN_SITE_PACKAGES: &str = "sklearn/datasets/data/digits.csv.gz";
/// The decompressed file is ~280 KB; anything far larger is not the digits.
const MAX_BYTES: u64 = 16 << 20;
/// Every `HOLD_OUT`-th image (by index) is held out: 360 of 1,797, every class represented.
const HOLD_OUT: usize = 5;

/// Why the data cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// No data file was found.
    #[error(
        "the digits data was not found (looked in {looked}); install scikit-learn into the \
         Python environment on PATH (scripts/setup-python.sh does) or pass --data \
         PATH/TO/{IN_SITE_PACKAGES}"
    )]
    NotFound {
        /// Where it was looked for.
        looked: String,
    },
    /// The file cannot be read or is not the digits.
    #[error("{path}: {what}")]
    Bad {
        /// The file.
        path: String,
        /// What is wrong.
        what: String,
    },
}

/// Images and labels.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Split {
    /// Row-major `len × FEATURES`, scaled to 0–1.
    pub features: Vec<f32>,
    /// One label per image.
    pub labels: Vec<i64>,
}

impl Split {
    /// Images held.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether it holds none.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    fn push(&mut self, pixels: &[f32], label: i64) {
        self.features.extend_from_slice(pixels);
        self.labels.push(label);
    }
}

/// The data set, split.
#[derive(Debug, Clone, PartialEq)]
pub struct Digits {
    /// What training sees.
    pub train: Split,
    /// What accuracy is measured on.
    pub held_out: Split,
    /// The file read.
    pub path: PathBuf,
}

/// Finds the file: `explicit` if given, else in the site-packages of the active virtualenv
/// (`VIRTUAL_ENV`) or of each Python found on `PATH`.
///
/// # Errors
/// [`DataError::NotFound`] listing where it looked.
pub fn locate(explicit: Option<&Path>) -> Result<PathBuf, DataError> {
    if let Some(p) = explicit {
        return if p.is_file() {
            Ok(p.to_path_buf())
        } else {
            Err(DataError::NotFound {
                looked: p.display().to_string(),
            })
        };
    }
    let mut prefixes = Vec::new();
    if let Some(v) = std::env::var_os("VIRTUAL_ENV") {
        prefixes.push(PathBuf::from(v));
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            if dir.join("python3").is_file() {
                if let Some(prefix) = dir.parent() {
                    prefixes.push(prefix.to_path_buf());
                }
            }
        }
    }
    let mut looked = Vec::new();
    for prefix in prefixes {
        let lib = prefix.join("lib");
        let Ok(entries) = std::fs::read_dir(&lib) else {
            continue;
        };
        let mut pythons: Vec<PathBuf> = entries
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("python3"))
            })
            .collect();
        pythons.sort();
        for py in pythons {
            let candidate = py.join("site-packages").join(IN_SITE_PACKAGES);
            if candidate.is_file() {
                return Ok(candidate);
            }
            looked.push(py.join("site-packages").display().to_string());
        }
    }
    Err(DataError::NotFound {
        looked: if looked.is_empty() {
            "no virtualenv or Python on PATH".into()
        } else {
            looked.join(", ")
        },
    })
}

/// Reads and splits the file at `path`.
///
/// # Errors
/// [`DataError::Bad`] naming the file and, for a bad row, its line.
pub fn load(path: &Path) -> Result<Digits, DataError> {
    let bad = |what: String| DataError::Bad {
        path: path.display().to_string(),
        what,
    };
    let file = std::fs::File::open(path).map_err(|e| bad(e.to_string()))?;
    let mut text = String::new();
    flate2::read::GzDecoder::new(file)
        .take(MAX_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(|e| bad(format!("not a gzip-compressed text file: {e}")))?;
    if text.len() as u64 > MAX_BYTES {
        return Err(bad(format!(
            "decompresses to more than {MAX_BYTES} bytes: not the digits"
        )));
    }
    let (train, held_out) = parse(&text).map_err(bad)?;
    Ok(Digits {
        train,
        held_out,
        path: path.to_path_buf(),
    })
}

/// Parses the CSV text into (train, held-out).
fn parse(text: &str) -> Result<(Split, Split), String> {
    let (mut train, mut held_out) = (Split::default(), Split::default());
    let mut pixels = [0f32; FEATURES];
    let mut rows = 0usize;
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let mut fields = line.split(',');
        for (j, p) in pixels.iter_mut().enumerate() {
            let v: u8 = fields
                .next()
                .and_then(|f| f.trim().parse().ok())
                .filter(|&v| v <= 16)
                .ok_or_else(|| format!("line {}: pixel {j} is not an integer 0–16", n + 1))?;
            *p = f32::from(v) / 16.0;
        }
        let label: i64 = fields
            .next()
            .and_then(|f| f.trim().parse().ok())
            .filter(|&v| (0..CLASSES as i64).contains(&v))
            .ok_or_else(|| format!("line {}: the label is not a digit 0–9", n + 1))?;
        if fields.next().is_some() {
            return Err(format!("line {}: more than {} fields", n + 1, FEATURES + 1));
        }
        if rows % HOLD_OUT == HOLD_OUT - 1 {
            held_out.push(&pixels, label);
        } else {
            train.push(&pixels, label);
        }
        rows += 1;
    }
    if held_out.is_empty() {
        return Err(format!("{rows} rows: too few to hold any out"));
    }
    Ok((train, held_out))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(label: u8) -> String {
        let mut f: Vec<String> = (0..FEATURES).map(|i| (i % 17).to_string()).collect();
        f.push(label.to_string());
        f.join(",")
    }

    #[test]
    fn rows_split_one_in_five_held_out_and_scale_to_unit() {
        let text: Vec<String> = (0..10).map(|i| row(i % 10)).collect();
        let (train, held) = parse(&text.join("\n")).expect("parses");
        assert_eq!((train.len(), held.len()), (8, 2));
        assert_eq!(held.labels, vec![4, 9]);
        assert_eq!(train.features.len(), 8 * FEATURES);
        assert!(train.features.iter().all(|&x| (0.0..=1.0).contains(&x)));
    }

    #[test]
    fn bad_rows_name_their_line() {
        let mut lines: Vec<String> = (0..5).map(row).collect();
        lines[2] = lines[2].replacen("0,", "x,", 1);
        let err = parse(&lines.join("\n")).expect_err("refused");
        assert!(err.contains("line 3"), "{err}");
        let err = parse(&format!("{},3", row(1))).expect_err("refused");
        assert!(err.contains("more than 65 fields"), "{err}");
        let err = parse(&row(12)).expect_err("refused");
        assert!(err.contains("line 1: the label is not a digit"), "{err}");
        let err = parse(&row(3)).expect_err("one row holds nothing out");
        assert!(err.contains("too few"), "{err}");
    }

    #[test]
    fn a_missing_file_says_how_to_get_it() {
        let err = locate(Some(Path::new("/nonexistent/digits.csv.gz"))).expect_err("missing");
        assert!(err.to_string().contains("install scikit-learn"), "{err}");
    }

    #[test]
    fn a_file_that_is_not_gzip_is_refused_with_its_name() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("digits.csv.gz");
        std::fs::write(&p, b"plain text").expect("write");
        let err = load(&p).expect_err("refused").to_string();
        assert!(
            err.contains("digits.csv.gz") && err.contains("gzip"),
            "{err}"
        );
    }
}
