//! Generates the bsfg.v1 messages and the gRPC service (tonic), using the vendored
//! protoc, plus the file descriptor set that server reflection serves.
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    // Chunks travel as `Bytes`: no copy between the wire and the object store.
    config.bytes(["."]);
    tonic_prost_build::configure()
        .btree_map(".")
        .file_descriptor_set_path(out.join("bsfg_v1_descriptor.bin"))
        .compile_with_config(
            config,
            &["../../proto/bsfg/v1/boundary.proto"],
            &["../../proto"],
        )?;
    println!("cargo:rerun-if-changed=../../proto/bsfg/v1/boundary.proto");
    Ok(())
}
