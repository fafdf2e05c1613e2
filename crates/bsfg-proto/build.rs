//! Generates the bsfg.v1 messages with prost, using the vendored protoc.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc);
    config.btree_map(["."]);
    config.compile_protos(&["../../proto/bsfg/v1/boundary.proto"], &["../../proto"])?;
    println!("cargo:rerun-if-changed=../../proto/bsfg/v1/boundary.proto");
    Ok(())
}
