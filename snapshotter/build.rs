//! Links the daemon's binary with packed relative relocations (`DT_RELR`, glibc ≥ 2.36). A
//! position-independent Rust binary carries a relative relocation for every pointer in its
//! read-only data (vtables, panic locations, string tables), and the loader reads each at start:
//! as 24-byte `RELA` entries the daemon's 61,000 were 1.46 MB of the binary, resident for the
//! daemon's life; as `RELR` bitmaps they are 17 KB. Measured in docs/benchmarks.md (index memory);
//! checked by integration/tests/packaging.rs.
fn main() {
    let os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    let env = std::env::var("CARGO_CFG_TARGET_ENV").unwrap_or_default();
    if os == "linux" && env == "gnu" {
        println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
    }
    println!("cargo:rerun-if-changed=build.rs");
}
