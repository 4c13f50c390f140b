//! Local index tools: index a layer blob on disk, describe an index, read a file through an index
//! by random access.

use anyhow::{Context, Result, bail};
use clip_index::format::EntryKind;
use clip_index::reader::FileFetcher;
use clip_index::{BuildOptions, Index};
use serde_json::json;
use std::io::Write;
use std::path::Path;

/// Indexes the layer blob at `blob` and writes the index to `output` (packed or plain); returns
/// the index and the size of its packed form (computed once: packing is zstd, `clip_index::format::ZSTD_LEVEL`).
pub fn index_file(blob: &Path, output: &Path, opts: &BuildOptions, packed: bool) -> Result<(Index, usize)> {
    let f = std::fs::File::open(blob).with_context(|| format!("open layer blob {}", blob.display()))?;
    let reader = std::io::BufReader::with_capacity(1 << 20, f);
    let index = clip_index::build_index(reader, opts).with_context(|| format!("index {}", blob.display()))?;
    let packed_bytes = index.pack()?;
    write_atomic(output, if packed { &packed_bytes } else { index.bytes() })?;
    Ok((index, packed_bytes.len()))
}

/// Opens an index file (checksum and structure checked).
pub fn open_index(path: &Path) -> Result<Index> {
    let bytes = std::fs::read(path).with_context(|| format!("read index {}", path.display()))?;
    let index = Index::open_any(bytes).with_context(|| format!("open index {}", path.display()))?;
    index.validate().with_context(|| format!("validate index {}", path.display()))?;
    Ok(index)
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    clip_fsutil::atomic_write(path, bytes, 0o644, clip_fsutil::Durability::Durable)
        .with_context(|| format!("write {}", path.display()))
}

/// A summary of an index as JSON (sizes, digests, spans, and every entry when `entries`);
/// `packed_size` is the size of [`Index::pack`]'s output.
pub fn describe(index: &Index, packed_size: usize, entries: bool) -> Result<serde_json::Value> {
    let mut spans = Vec::new();
    for i in 0..index.span_count() {
        let s = index.span(i)?;
        spans.push(json!({
            "kind": format!("{:?}", s.kind),
            "uncompressed": [s.uncomp_start, s.uncomp_end],
            "compressed": [s.comp_start, s.comp_end],
            "bits": s.bits,
            "sha256": hex_digest(&s.digest),
        }));
    }
    let mut list = Vec::new();
    if entries {
        for id in 0..index.entry_count() {
            let e = index.entry(id)?;
            let path = String::from_utf8_lossy(&index.path(id)?).into_owned();
            let mut v = json!({
                "path": format!("/{path}"),
                "type": e.kind.name(),
                "mode": format!("{:04o}", e.mode),
                "uid": e.uid,
                "gid": e.gid,
                "mtime": format!("{}.{:09}", e.mtime_sec, e.mtime_nsec),
                "nlink": e.nlink,
            });
            match e.kind {
                EntryKind::File => {
                    v["size"] = json!(e.size);
                    v["offset"] = json!(e.data_offset);
                }
                EntryKind::Symlink => v["target"] = json!(String::from_utf8_lossy(e.link)),
                EntryKind::Hardlink => {
                    v["target"] = json!(format!("/{}", String::from_utf8_lossy(&index.path(e.hardlink_target)?)));
                }
                EntryKind::CharDevice | EntryKind::BlockDevice => v["device"] = json!([e.dev_major, e.dev_minor]),
                _ => {}
            }
            let x = index.xattrs(&e)?;
            if !x.is_empty() {
                v["xattrs"] = x
                    .iter()
                    .map(|(k, val)| (String::from_utf8_lossy(k).into_owned(), json!(String::from_utf8_lossy(val))))
                    .collect::<serde_json::Map<_, _>>()
                    .into();
            }
            list.push(v);
        }
    }
    let mut v = json!({
        "index_digest": index.digest(),
        "index_size": index.bytes().len(),
        "packed_size": packed_size,
        "layer_digest": index.layer_digest(),
        "media_type": index.media_type()?,
        "compression": index.compression().name(),
        "compressed_size": index.compressed_size(),
        "uncompressed_size": index.uncompressed_size(),
        "span_size": index.span_size(),
        "entry_count": index.entry_count(),
        "spans": spans,
    });
    if entries {
        v["entries"] = list.into();
    }
    Ok(v)
}

fn hex_digest(d: &[u8; 32]) -> String {
    use std::fmt::Write as _;
    d.iter().fold(String::with_capacity(64), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// Human-readable form of [`describe`].
pub fn print_human(index: &Index, out: &mut dyn Write) -> Result<()> {
    let packed = index.pack()?.len();
    writeln!(out, "index      {} ({} bytes, {} packed)", index.digest(), index.bytes().len(), packed)?;
    writeln!(out, "layer      {} ({})", index.layer_digest(), index.media_type()?)?;
    writeln!(
        out,
        "sizes      {} compressed ({}), {} uncompressed; packed index is {:.3}% of the blob",
        index.compressed_size(),
        index.compression().name(),
        index.uncompressed_size(),
        packed as f64 * 100.0 / index.compressed_size().max(1) as f64
    )?;
    writeln!(out, "spans      {} (span size {})", index.span_count(), index.span_size())?;
    writeln!(out, "entries    {}", index.entry_count())?;
    for id in 0..index.entry_count() {
        let e = index.entry(id)?;
        let path = String::from_utf8_lossy(&index.path(id)?).into_owned();
        let extra = match e.kind {
            EntryKind::Symlink => format!(" -> {}", String::from_utf8_lossy(e.link)),
            EntryKind::Hardlink => format!(" => /{}", String::from_utf8_lossy(&index.path(e.hardlink_target)?)),
            EntryKind::CharDevice | EntryKind::BlockDevice => format!(" {},{}", e.dev_major, e.dev_minor),
            _ => String::new(),
        };
        writeln!(out, "{:<8} {:04o} {:>5}:{:<5} {:>10} /{path}{extra}", e.kind.name(), e.mode, e.uid, e.gid, e.size)?;
    }
    Ok(())
}

/// Writes the bytes of `path` in the layer, read through the index from ranges of `blob`.
pub fn cat(index: &Index, blob: &Path, path: &str, out: &mut dyn Write) -> Result<()> {
    let id = index.lookup(path)?.with_context(|| format!("{path}: not in the layer"))?;
    let e = index.entry(id)?;
    let f = std::fs::File::open(blob).with_context(|| format!("open layer blob {}", blob.display()))?;
    let fetcher = FileFetcher(f);
    let target = index.resolve_hardlink(e.clone())?;
    if target.kind != EntryKind::File {
        bail!("{path}: is a {}, not a regular file", target.kind.name());
    }
    let chunk = index.span_size().max(1 << 20);
    let mut off = 0;
    while off < target.size {
        let data = index.read(&fetcher, &e, off, chunk)?;
        if data.is_empty() {
            bail!("{path}: short read at {off}");
        }
        out.write_all(&data)?;
        off += data.len() as u64;
    }
    Ok(())
}
