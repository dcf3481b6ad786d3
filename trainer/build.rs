//! Links ferrun-train against the libtorch torch-sys found (tch's own link flags do not reach
//! downstream binaries: the rpath and libtorch's place in DT_NEEDED are set here), and compiles
//! the gradient-hook shim against the same libtorch's headers.

use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-changed=shim/hooks.cpp");
    let Some(lib) = std::env::var_os("DEP_TCH_LIBTORCH_LIB") else {
        panic!(
            "torch-sys did not say where libtorch is: build the trainer through \
             scripts/libtorch-env.sh (it sets LIBTORCH to the venv's torch 2.13.0)"
        );
    };
    let lib = PathBuf::from(lib);
    let root = lib
        .parent()
        .map(PathBuf::from)
        .unwrap_or_else(|| lib.clone());
    cc::Build::new()
        .cpp(true)
        .file("shim/hooks.cpp")
        .include(root.join("include"))
        .include(root.join("include/torch/csrc/api/include"))
        .flag("-std=c++17")
        .flag("-D_GLIBCXX_USE_CXX11_ABI=1")
        .flag_if_supported("-Wno-unused-parameter")
        .flag_if_supported("-Wno-deprecated-declarations")
        .warnings(false)
        .compile("ferrun_hooks");
    println!("cargo:rustc-link-arg=-Wl,-rpath={}", lib.display());
    // Keeps libtorch (and through it libtorch_cuda where the wheel has it) in DT_NEEDED.
    println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
    println!("cargo:rustc-link-arg=-ltorch");
    println!("cargo:rustc-link-arg=-ltorch_cpu");
    println!("cargo:rustc-link-arg=-lc10");
}
