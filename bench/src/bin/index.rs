//! Index benchmark on the numpy layer of the test bed's python image:
//! - indexing time as a ratio to `pigz -dc BLOB > /dev/null` (zlib inflate) in the same run;
//! - packed index size as a fraction of the compressed layer;
//! - latency of random 4 KiB reads from the local blob through the index.
//!
//! Run: `cargo run --release -p clip-bench --bin index-bench` (as root; builds the image once).

use clip_bench::median;
use clip_index::format::EntryKind;
use clip_index::reader::FileFetcher;
use clip_index::{BuildOptions, Index};
use clip_integration::images::{TestImage, blob_path, layout_layers};
use std::process::{Command, Stdio};
use std::time::Instant;

fn main() -> anyhow::Result<()> {
    let layout = TestImage::Python.layout()?;
    let layers = layout_layers(&layout, "pyapp")?;
    // Layer 3 is python3-numpy.
    let (digest, media_type, size) = layers.get(2).cloned().ok_or_else(|| anyhow::anyhow!("no numpy layer"))?;
    let blob = blob_path(&layout, &digest)?;
    let reps = 5;
    let mut pigz = Vec::new();
    let mut indexing = Vec::new();
    let mut index: Option<Index> = None;
    for _ in 0..reps {
        let t = Instant::now();
        let st = Command::new("pigz").arg("-dc").arg(&blob).stdout(Stdio::null()).status()?;
        anyhow::ensure!(st.success(), "pigz failed");
        pigz.push(t.elapsed());
        let t = Instant::now();
        let f = std::io::BufReader::with_capacity(1 << 20, std::fs::File::open(&blob)?);
        let opts = BuildOptions {
            expected_digest: Some(digest.clone()),
            media_type: media_type.clone(),
            ..BuildOptions::default()
        };
        index = Some(clip_index::build_index(f, &opts)?);
        indexing.push(t.elapsed());
    }
    let index = index.ok_or_else(|| anyhow::anyhow!("no index"))?;
    let (p, i) = (median(&pigz), median(&indexing));
    let packed = index.pack()?.len();

    // Random 4 KiB reads: deterministic pseudo-random files and offsets.
    let files: Vec<u32> = (0..index.entry_count())
        .filter(|id| index.entry(*id).is_ok_and(|e| e.kind == EntryKind::File && e.size >= 4096))
        .collect();
    let fetcher = FileFetcher(std::fs::File::open(&blob)?);
    let mut state = 0x9e37_79b9_7f4a_7c15_u64;
    let mut lat = Vec::new();
    for _ in 0..300 {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let e = index.entry(files[(state % files.len() as u64) as usize])?;
        let off = (state >> 20) % (e.size - 4096 + 1);
        let t = Instant::now();
        let data = index.read(&fetcher, &e, off, 4096)?;
        lat.push(t.elapsed());
        anyhow::ensure!(data.len() == 4096, "short read");
    }
    lat.sort();
    let p50 = lat[lat.len() / 2];
    let p99 = lat[lat.len() * 99 / 100];
    let max = lat[lat.len() - 1];

    println!(
        "## clip-index on the numpy layer ({digest}, {size} bytes compressed, {} uncompressed)\n",
        index.uncompressed_size()
    );
    println!("| measure | value | target |");
    println!("|---|---|---|");
    println!("| pigz -dc (median of {reps}) | {:.3} s | |", p.as_secs_f64());
    println!("| clip index (median of {reps}) | {:.3} s | |", i.as_secs_f64());
    println!("| indexing / pigz -dc | {:.2}x | ≤ 1.25x |", i.as_secs_f64() / p.as_secs_f64());
    println!("| index size, packed (plain) | {packed} B ({} B) | |", index.bytes().len());
    println!("| packed index / compressed layer | {:.3}% | ≤ 1.5% |", packed as f64 * 100.0 / size as f64);
    println!("| entries, spans | {}, {} | |", index.entry_count(), index.span_count());
    println!(
        "| random 4 KiB read, local blob: p50 / p99 / max of 300 | {:.2} / {:.2} / {:.2} ms | < 10 ms |",
        p50.as_secs_f64() * 1e3,
        p99.as_secs_f64() * 1e3,
        max.as_secs_f64() * 1e3
    );
    Ok(())
}
