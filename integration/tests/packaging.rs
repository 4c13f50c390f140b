//! Packaging: the default configs document only real keys with valid values; `cargo deb` builds
//! both packages (packaging/build-debs.sh); `dpkg -i` of them (into a private root) puts the
//! binaries, configs, unit, tmpfiles entry and man pages where the unit and the configs expect
//! them; `systemd-analyze verify` accepts the installed unit; purge removes them. The daemon's
//! binary is linked with packed relative relocations.

use anyhow::{Context, Result};
use clip_config::ConfigFile as _;
use clip_integration::{TestDir, require_root, run, run_stdout};
use std::path::{Path, PathBuf};
use std::process::Command;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().map(Path::to_path_buf).unwrap_or_default()
}

/// The config with every commented `key = value` line and `[table]` header enabled.
fn uncommented(text: &str) -> String {
    text.lines()
        .map(|l| match l.strip_prefix('#') {
            Some(rest)
                if rest.starts_with('[')
                    || !rest.starts_with(' ')
                        && rest.split('=').next().is_some_and(|k| {
                            let k = k.trim();
                            !k.is_empty() && k.chars().all(|c| c.is_ascii_lowercase() || c == '_') && rest.contains('=')
                        }) =>
            {
                rest.to_string()
            }
            _ => l.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn default_configs_parse_as_shipped_and_with_every_key_enabled() -> Result<()> {
    let dir = repo_root().join("packaging/config");
    let snap = std::fs::read_to_string(dir.join("snapshotter.toml"))?;
    let builder = std::fs::read_to_string(dir.join("builder.toml"))?;
    clip_config::SnapshotterConfig::parse(&snap, Path::new("snapshotter.toml"))?;
    clip_config::BuilderConfig::parse(&builder, Path::new("builder.toml"))?;
    let all = uncommented(&snap);
    let cfg = clip_config::SnapshotterConfig::parse(&all, Path::new("snapshotter.toml (all keys)"))
        .with_context(|| all.clone())?;
    assert!(cfg.lazy.survive_restarts && cfg.lazy.cache_max_bytes > 0, "{all}");
    let all = uncommented(&builder);
    clip_config::BuilderConfig::parse(&all, Path::new("builder.toml (all keys)")).with_context(|| all.clone())?;
    Ok(())
}

/// `docs/configuration.md` shows real keys, and the `[lazy]` values it shows are the defaults.
#[test]
fn the_configuration_page_shows_real_keys_and_the_lazy_defaults() -> Result<()> {
    let page = std::fs::read_to_string(repo_root().join("docs/configuration.md"))?;
    let block: String = page
        .lines()
        .skip_while(|l| !l.starts_with("    root = "))
        .take_while(|l| l.starts_with("    "))
        .flat_map(|l| [&l[4..], "\n"])
        .collect();
    let cfg = clip_config::SnapshotterConfig::parse(&block, Path::new("docs/configuration.md"))
        .with_context(|| block.clone())?;
    assert_eq!(
        cfg.lazy,
        clip_config::LazyConfig::default(),
        "docs/configuration.md shows other [lazy] values than the defaults"
    );
    let keys = serde_json::to_value(&cfg.lazy)?;
    for (key, value) in keys.as_object().context("lazy keys")? {
        match value.as_object() {
            Some(section) => {
                let at = block.find(&format!("\n[lazy.{key}]")).with_context(|| format!("no [lazy.{key}] shown"))?;
                let shown: String = block[at + 1..]
                    .lines()
                    .skip(1)
                    .take_while(|l| !l.starts_with('['))
                    .flat_map(|l| ["\n", l])
                    .collect();
                for nested in section.keys() {
                    assert!(
                        shown.contains(&format!("\n{nested} = ")),
                        "docs/configuration.md does not show [lazy.{key}] {nested}"
                    );
                }
            }
            None => assert!(block.contains(&format!("\n{key} = ")), "docs/configuration.md does not show [lazy] {key}"),
        }
    }
    Ok(())
}

/// `snapshotter/build.rs` links the daemon with `-z pack-relative-relocs`: its relative
/// relocations (about 61,000) are `DT_RELR` bitmaps, not 24-byte `RELA` entries that the loader
/// reads at start and that stay resident (1.4 MB of the daemon's RSS, docs/benchmarks.md).
#[test]
fn the_daemon_binary_packs_its_relative_relocations() -> Result<()> {
    let bin = clip_integration::snapshotter::workspace_binary("clip-snapshotter")?;
    let dynamic = run_stdout(Command::new("readelf").arg("--dynamic").arg(&bin))?;
    let value = |tag: &str| {
        dynamic
            .lines()
            .find(|l| l.split_whitespace().nth(1) == Some(tag))
            .and_then(|l| l.split_whitespace().nth(2).map(str::to_string))
    };
    let relr_size: u64 =
        value("(RELRSZ)").with_context(|| format!("no DT_RELR in {}:\n{dynamic}", bin.display()))?.parse()?;
    let rela_size: u64 = value("(RELASZ)").map_or(Ok(0), |v| v.parse())?;
    assert!(relr_size > 0, "{dynamic}");
    assert!(rela_size < 64 << 10, "{rela_size} bytes of RELA relocations left:\n{dynamic}");
    Ok(())
}

#[test]
fn debian_packages_build_install_into_a_root_and_purge() -> Result<()> {
    require_root();
    let td = TestDir::new("debs")?;
    let out = td.sub("debs")?;
    run(Command::new("bash")
        .arg(repo_root().join("packaging/build-debs.sh"))
        // The binaries are those the test run built (packaging/build-debs.sh builds by itself).
        .args(["--profile", "dev", "--fast", "--no-build", "--out"])
        .arg(&out))?;
    let debs: Vec<PathBuf> = std::fs::read_dir(&out)?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "deb"))
        .collect();
    assert_eq!(debs.len(), 2, "{debs:?}");
    for deb in &debs {
        let info = run_stdout(Command::new("dpkg-deb").arg("-I").arg(deb))?;
        assert!(info.contains("Depends:"), "{info}");
        if deb.to_string_lossy().contains("clip-snapshotter") {
            assert!(info.contains("fuse3") && info.contains("postinst"), "{info}");
        } else {
            assert!(info.contains("buildah"), "{info}");
        }
    }

    // A private root with an empty dpkg database; maintainer scripts run unchrooted and honor
    // DPKG_ROOT (no systemd there: they start nothing).
    let root = td.sub("root")?;
    for d in ["var/lib/dpkg/info", "var/lib/dpkg/updates", "var/lib/dpkg/triggers"] {
        std::fs::create_dir_all(root.join(d))?;
    }
    std::fs::write(root.join("var/lib/dpkg/status"), "")?;
    std::fs::write(root.join("var/lib/dpkg/available"), "")?;
    let dpkg = |args: &[&str]| -> Result<()> {
        run(Command::new("dpkg")
            .arg(format!("--root={}", root.display()))
            .args(["--force-script-chrootless", "--force-depends"])
            .args(args))?;
        Ok(())
    };
    let mut install = vec!["-i".to_string()];
    install.extend(debs.iter().map(|d| d.display().to_string()));
    dpkg(&install.iter().map(String::as_str).collect::<Vec<_>>())?;
    for f in [
        "usr/bin/clip-snapshotter",
        "usr/bin/clip-builder",
        "etc/clip/snapshotter.toml",
        "etc/clip/builder.toml",
        "lib/systemd/system/clip-snapshotter.service",
        "usr/lib/tmpfiles.d/clip-snapshotter.conf",
        "usr/share/man/man1/clip-snapshotter.1.gz",
        "usr/share/man/man1/clip-builder.1.gz",
        "usr/share/doc/clip-snapshotter/examples/containerd-config-1.6.toml",
        "usr/share/doc/clip-snapshotter/examples/containerd-config-2.x.toml",
    ] {
        assert!(root.join(f).exists(), "{f} not installed");
    }
    // The unit's ExecStart and --config name what the package installed.
    let unit = std::fs::read_to_string(root.join("lib/systemd/system/clip-snapshotter.service"))?;
    assert!(unit.contains("ExecStart=/usr/bin/clip-snapshotter --config /etc/clip/snapshotter.toml"), "{unit}");
    let version = run_stdout(Command::new(root.join("usr/bin/clip-snapshotter")).arg("--version"))?;
    assert!(version.starts_with("clip-snapshotter "), "{version}");
    let version = run_stdout(Command::new(root.join("usr/bin/clip-builder")).arg("--version"))?;
    assert!(version.starts_with("clip-builder "), "{version}");
    clip_config::SnapshotterConfig::load(&root.join("etc/clip/snapshotter.toml"))?;
    clip_config::BuilderConfig::load(&root.join("etc/clip/builder.toml"))?;
    let man = run_stdout(
        Command::new("sh")
            .arg("-c")
            .arg(format!("zcat {}", root.join("usr/share/man/man1/clip-snapshotter.1.gz").display())),
    )?;
    assert!(man.contains(".SH") && man.contains("pull"), "{man}");

    // systemd-analyze verify on the installed unit, pointed at the installed binary.
    let units = td.sub("units")?;
    std::fs::write(
        units.join("clip-snapshotter.service"),
        unit.replace("/usr/bin/clip-snapshotter", &root.join("usr/bin/clip-snapshotter").display().to_string()),
    )?;
    let verify = Command::new("systemd-analyze").arg("verify").arg(units.join("clip-snapshotter.service")).output()?;
    assert!(verify.status.success(), "systemd-analyze verify: {}", String::from_utf8_lossy(&verify.stderr));

    dpkg(&["-P", "clip-snapshotter", "clip-builder"])?;
    for f in [
        "usr/bin/clip-snapshotter",
        "usr/bin/clip-builder",
        "etc/clip/snapshotter.toml",
        "lib/systemd/system/clip-snapshotter.service",
    ] {
        assert!(!root.join(f).exists(), "{f} left after purge");
    }
    Ok(())
}
