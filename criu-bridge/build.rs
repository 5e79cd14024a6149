//! Generates the Rust types for CRIU's RPC and statistics messages from the
//! vendored `proto/rpc.proto` and `proto/stats.proto` (CRIU 4.2.1), with
//! protobuf-codegen's pure-Rust parser: no `protoc` needed.

fn main() {
    let protos = ["proto/rpc.proto", "proto/stats.proto"];
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    protobuf_codegen::Codegen::new()
        .pure()
        .include("proto")
        .inputs(protos)
        // No reflection: ms2m only encodes and decodes these messages.
        .customize(protobuf_codegen::Customize::default().lite_runtime(true))
        .cargo_out_dir("criu_proto")
        .run_from_script();
}
