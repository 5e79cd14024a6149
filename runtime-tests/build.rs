//! Generates the CRI client (runtime.v1 RuntimeService and ImageService)
//! from the vendored `proto/cri/api.proto` for `src/cri.rs`. Needs `protoc`
//! (Debian's protobuf-compiler, installed by hack/setup.sh).
fn main() {
    println!("cargo:rerun-if-changed=proto/cri/api.proto");
    tonic_prost_build::configure()
        .build_server(false)
        .build_transport(false)
        .disable_comments(["."])
        .compile_protos(&["proto/cri/api.proto"], &["proto/cri"])
        .unwrap_or_else(|e| panic!("generating the CRI client from proto/cri/api.proto: {e}"));
}
