//! Compile `proto/` with protox (pure Rust, no protoc) into prost types.
fn main() {
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(["tandem/v1/event.proto"], ["proto"]).expect("compile proto/");
    prost_build::Config::new()
        .compile_fds(fds)
        .expect("generate Rust for proto/");
}
