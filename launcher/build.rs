//! Generates the rendezvous service's gRPC code from `proto/rendezvous.proto`, with the
//! vendored `protoc`, so a plain `cargo build` needs no system package.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/rendezvous.proto");
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_with_config(config, &["proto/rendezvous.proto"], &["proto"])?;
    Ok(())
}
