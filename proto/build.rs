//! Generates the Rust for `trazor/v1/*.proto` at build time.
//!
//! `protox` parses the .proto files in pure Rust, so building needs no `protoc` binary.
use anyhow::Context as _;

fn main() -> anyhow::Result<()> {
    let protos = ["trazor/v1/ingest.proto", "trazor/v1/feed.proto"];
    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    let descriptors = protox::compile(protos, ["."]).context("parsing the .proto files")?;
    tonic_prost_build::configure()
        .compile_fds(descriptors)
        .context("generating Rust from the .proto descriptors")?;
    Ok(())
}
