fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files =
        ["proto/rpc.proto", "proto/kv.proto", "proto/auth.proto", "proto/v3lock.proto", "proto/v3election.proto"];
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["proto"])?;
    // The codec encodes large messages off the runtime worker (src/codec.rs).
    tonic_prost_build::configure().build_client(true).codec_path("crate::codec::QuorateCodec").compile_fds(fds)?;
    Ok(())
}
