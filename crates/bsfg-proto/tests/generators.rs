//! The contract's options for other languages' code generators: protoc (the vendored
//! one the build uses) generates Java, C#, PHP, Ruby and Objective-C from
//! `proto/bsfg/v1/boundary.proto` into the packages and namespaces a project in that
//! language expects, and Go's import path is declared.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Command;

fn proto_dir() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../proto")
}

fn generate(lang: &str, out: &Path) {
    std::fs::create_dir_all(out).unwrap();
    let protoc = protoc_bin_vendored::protoc_bin_path().expect("vendored protoc");
    let o = Command::new(protoc)
        .arg("-I")
        .arg(proto_dir())
        .arg(format!("--{lang}_out={}", out.display()))
        .arg(proto_dir().join("bsfg/v1/boundary.proto"))
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "protoc --{lang}_out: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

#[test]
fn other_languages_generate_into_their_own_packages_and_namespaces() {
    let dir = tempfile::tempdir().unwrap();
    let d = |l: &str| dir.path().join(l);

    generate("java", &d("java"));
    // java_package + java_multiple_files: one file per message under io/bsfg/v1.
    let fact = read(&d("java").join("io/bsfg/v1/FactMessage.java"));
    assert!(fact.contains("package io.bsfg.v1;"), "Java package");
    assert!(d("java").join("io/bsfg/v1/BoundaryProto.java").is_file());

    generate("csharp", &d("csharp"));
    let cs = read(&d("csharp").join("Boundary.cs"));
    assert!(cs.contains("namespace Bsfg.V1"), "C# namespace");

    generate("php", &d("php"));
    let php = read(&d("php").join("Bsfg/V1/FactMessage.php"));
    assert!(php.contains("namespace Bsfg\\V1;"), "PHP namespace");

    generate("ruby", &d("ruby"));
    let rb = read(&d("ruby").join("bsfg/v1/boundary_pb.rb"));
    assert!(rb.contains("module Bsfg\n  module V1"), "Ruby modules");

    generate("objc", &d("objc"));
    let objc = read(&d("objc").join("bsfg/v1/Boundary.pbobjc.h"));
    assert!(objc.contains("BSFFactMessage"), "Objective-C prefix");

    let proto = read(&proto_dir().join("bsfg/v1/boundary.proto"));
    assert!(
        proto.contains("option go_package = \"github.com/bsfg/bsfg/gen/go/bsfg/v1;bsfgv1\";"),
        "Go import path"
    );
}
