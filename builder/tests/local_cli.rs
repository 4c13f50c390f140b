//! `clip-builder index`, `inspect` and `cat` on a layer made with `tar` and `gzip`.

use std::path::Path;
use std::process::Command;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_clip-builder"))
}

fn ok(cmd: &mut Command) -> Vec<u8> {
    let out = cmd.output().expect("run");
    assert!(out.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
    out.stdout
}

#[test]
fn index_inspect_and_cat_a_gzip_layer() {
    let td = tempfile::tempdir().expect("tempdir");
    let d = td.path();
    let src = d.join("src");
    std::fs::create_dir_all(src.join("usr/bin")).expect("mkdir");
    let big: Vec<u8> = (0..3_000_000u32).flat_map(|i| (i.wrapping_mul(2_654_435_761)).to_le_bytes()).collect();
    std::fs::write(src.join("usr/bin/tool"), &big).expect("write");
    std::fs::write(src.join("hello.txt"), b"hello\n").expect("write");
    let layer = d.join("layer.tar.gz");
    ok(Command::new("sh").arg("-c").arg(format!("tar -C {} -cf - . | gzip -c > {}", src.display(), layer.display())));
    let idx = d.join("layer.idx");
    let digest = format!("sha256:{}", sha256_hex(&layer));
    let out = ok(bin().args(["index", "--layer"]).arg(&layer).arg("--output").arg(&idx).args([
        "--span-size",
        "1048576",
        "--packed",
        "--json",
        "--digest",
        &digest,
    ]));
    let summary: serde_json::Value = serde_json::from_slice(&out).expect("json");
    assert_eq!(summary["layer_digest"], digest.as_str());
    assert_eq!(summary["compression"], "gzip");
    assert!(summary["spans"].as_array().expect("spans").len() >= 10);

    let out = ok(bin().arg("inspect").arg(&idx).arg("--json"));
    let v: serde_json::Value = serde_json::from_slice(&out).expect("json");
    let paths: Vec<&str> =
        v["entries"].as_array().expect("entries").iter().filter_map(|e| e["path"].as_str()).collect();
    assert!(paths.contains(&"/usr/bin/tool") && paths.contains(&"/hello.txt"), "{paths:?}");

    let got = ok(bin().args(["cat", "--index"]).arg(&idx).arg("--layer").arg(&layer).arg("/usr/bin/tool"));
    assert!(got == big, "cat returned different bytes");
    let got = ok(bin().args(["cat", "--index"]).arg(&idx).arg("--layer").arg(&layer).arg("hello.txt"));
    assert_eq!(got, b"hello\n");

    // A wrong digest and a missing path are clear errors.
    let out = bin()
        .args(["index", "--layer"])
        .arg(&layer)
        .arg("--output")
        .arg(d.join("x.idx"))
        .args(["--digest", &format!("sha256:{}", "0".repeat(64))])
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("digest mismatch"));
    let out = bin().args(["cat", "--index"]).arg(&idx).arg("--layer").arg(&layer).arg("/nope").output().expect("run");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not in the layer"));
}

fn sha256_hex(p: &Path) -> String {
    let out = Command::new("sha256sum").arg(p).output().expect("sha256sum");
    String::from_utf8_lossy(&out.stdout).split_whitespace().next().unwrap_or_default().to_string()
}
