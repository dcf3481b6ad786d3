//! Where NCCL's library is: the places pip's `nvidia-nccl-*` wheels and Debian's `libnccl2` put
//! `libnccl.so.2` (its soname), which cudarc's loader does not look for.
//!
//! [`candidates`] is pure: the driver reads the environment, `/proc/self/maps` and the Python
//! prefixes, and hands them in.
//!
//! # Trust
//! Paths come from this process's environment and its own memory map; each is only handed to
//! the dynamic loader, which fails cleanly on a path that holds no library.

use std::path::{Path, PathBuf};

/// NCCL's soname: what every packaging of NCCL 2 ships.
pub const SONAME: &str = "libnccl.so.2";

/// What the search looks at.
#[derive(Debug, Default, Clone)]
pub struct Search {
    /// `FERRUN_NCCL_LIBRARY`: this file and nothing else.
    pub forced: Option<PathBuf>,
    /// `/proc/self/maps`: an NCCL already loaded (by torch) is the one to share.
    pub maps: String,
    /// `LD_LIBRARY_PATH`.
    pub ld_library_path: Option<String>,
    /// Python `site-packages` (and `dist-packages`) folders, where pip puts `nvidia/nccl/lib`.
    pub site_packages: Vec<PathBuf>,
}

/// The files to try, best first, each once. The last is the bare soname, for the loader's
/// own search (`ld.so.cache`, where Debian's `libnccl2` is).
pub fn candidates(search: &Search) -> Vec<PathBuf> {
    if let Some(forced) = &search.forced {
        return vec![forced.clone()];
    }
    let mut out: Vec<PathBuf> = Vec::new();
    let mut push = |p: PathBuf| {
        if !out.contains(&p) {
            out.push(p);
        }
    };
    for line in search.maps.lines() {
        // `addr perms offset dev inode   /path/to/libnccl.so.2`
        if let Some(path) = line.split_whitespace().nth(5) {
            let name = Path::new(path).file_name().and_then(|n| n.to_str());
            if matches!(name, Some(n) if n.starts_with("libnccl.so")) {
                push(PathBuf::from(path));
            }
        }
    }
    for dir in search.ld_library_path.iter().flat_map(|p| p.split(':')) {
        if !dir.is_empty() {
            push(Path::new(dir).join(SONAME));
        }
    }
    for site in &search.site_packages {
        push(site.join("nvidia/nccl/lib").join(SONAME));
    }
    push(PathBuf::from("/usr/lib/x86_64-linux-gnu").join(SONAME));
    push(PathBuf::from("/usr/lib/aarch64-linux-gnu").join(SONAME));
    push(PathBuf::from(SONAME));
    out
}

/// The `site-packages` folders under Python prefixes: `$VIRTUAL_ENV`, `$CONDA_PREFIX`, the
/// prefix of the `python3` on `PATH` (a venv's `bin/..`), `~/.local`, `/usr/local` and `/usr`.
pub fn site_packages(prefixes: &[PathBuf]) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for prefix in prefixes {
        let Ok(entries) = std::fs::read_dir(prefix.join("lib")) else {
            continue;
        };
        let mut pythons: Vec<PathBuf> = entries
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().starts_with("python3"))
            .map(|e| e.path())
            .collect();
        pythons.sort();
        for python in pythons {
            for sub in ["site-packages", "dist-packages"] {
                let dir = python.join(sub);
                if dir.is_dir() {
                    out.push(dir);
                }
            }
        }
    }
    out
}

/// The search as this process sees it.
pub fn this_process() -> Search {
    let env = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty());
    let mut prefixes: Vec<PathBuf> = ["VIRTUAL_ENV", "CONDA_PREFIX", "FERRUN_VENV"]
        .into_iter()
        .filter_map(|v| env(v).map(PathBuf::from))
        .collect();
    if let Some(path) = env("PATH") {
        for dir in std::env::split_paths(&path) {
            if dir.join("python3").is_file() {
                if let Some(prefix) = dir.parent() {
                    prefixes.push(prefix.to_path_buf());
                }
                break;
            }
        }
    }
    if let Some(home) = env("HOME") {
        // `pip install --user`.
        prefixes.push(PathBuf::from(home).join(".local"));
    }
    prefixes.extend([PathBuf::from("/usr/local"), PathBuf::from("/usr")]);
    Search {
        forced: env("FERRUN_NCCL_LIBRARY").map(PathBuf::from),
        maps: std::fs::read_to_string("/proc/self/maps").unwrap_or_default(),
        ld_library_path: env("LD_LIBRARY_PATH").map(|v| v.to_string_lossy().into_owned()),
        site_packages: site_packages(&prefixes),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_loaded_nccl_comes_first_then_the_path_then_pip_then_debian() {
        let search = Search {
            forced: None,
            maps: "7f00-7f01 r-xp 00000000 08:01 42   /venv/nvidia/nccl/lib/libnccl.so.2\n\
                   7f01-7f02 r--p 00000000 08:01 43   /usr/lib/libc.so.6\n\
                   7f02-7f03 rw-p 00000000 00:00 0\n"
                .into(),
            ld_library_path: Some("/opt/nccl/lib::/venv/nvidia/nccl/lib".into()),
            site_packages: vec![PathBuf::from("/venv/lib/python3.11/site-packages")],
        };
        let found = candidates(&search);
        assert_eq!(
            found,
            [
                "/venv/nvidia/nccl/lib/libnccl.so.2",
                "/opt/nccl/lib/libnccl.so.2",
                "/venv/lib/python3.11/site-packages/nvidia/nccl/lib/libnccl.so.2",
                "/usr/lib/x86_64-linux-gnu/libnccl.so.2",
                "/usr/lib/aarch64-linux-gnu/libnccl.so.2",
                "libnccl.so.2",
            ]
            .map(PathBuf::from)
        );
    }

    #[test]
    fn a_forced_library_is_the_only_candidate() {
        let search = Search {
            forced: Some("/x/libnccl.so.2".into()),
            ld_library_path: Some("/opt".into()),
            ..Search::default()
        };
        assert_eq!(candidates(&search), [PathBuf::from("/x/libnccl.so.2")]);
    }

    #[test]
    fn site_packages_are_found_under_each_prefix() {
        let root = tempfile::tempdir().expect("tempdir");
        let site = root.path().join("lib/python3.11/site-packages");
        std::fs::create_dir_all(&site).expect("mkdir");
        std::fs::create_dir_all(root.path().join("lib/pkgconfig")).expect("mkdir");
        let missing = root.path().join("absent");
        assert_eq!(site_packages(&[root.path().to_path_buf(), missing]), [site]);
    }
}
