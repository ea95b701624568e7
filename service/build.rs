//! Compiles the gRPC API in proto/ (tonic server and client, and the file
//! descriptor set that gRPC reflection serves).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("thumbup_descriptor.bin"))
        .compile_protos(&["../proto/thumbup/v1/thumbup.proto"], &["../proto"])?;
    println!("cargo:rerun-if-changed=../proto");
    Ok(())
}
