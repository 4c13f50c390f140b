//! A shared library's first miss. `ld.so` loading a library reads its dynamic-linking tables
//! whole, then writes a pointer at every relocation's target: RELRO (fetched whole with the
//! tables) and, outside it, pages of `.data` and `.got.plt`. A large `.data` is written in a few
//! scattered pages (libcublasLt: 412 of its 14,772, in 89 of its 197 spans; `import torch` reads
//! exactly those), which a window after each read follows badly: it fetched 44 MB of that
//! `.data` to use 26. So the tables are fetched first ([`tables`]), then read to find the
//! relocated pages, whose spans are fetched, one run per request, in parallel
//! ([`relocated_runs`]); a read of them is no right guess and opens no window. A page is
//! fetched with the kernel's read-around of it ([`READ_AROUND_BYTES`]).

use crate::elf::Library;
use crate::spans::SpanCache;
use std::collections::VecDeque;
use std::ops::Range;

/// The kernel reads a page of a mapped file that faults with the pages around it: half its
/// read-ahead before, half after (`do_sync_mmap_readahead`); layerfs's FUSE read-ahead is the
/// kernel's default of 128 KiB. A relocated page's spans alone are not enough: the container's
/// read of it waits for the spans of its neighbours too (measured on `import torch`: 14 reads in
/// libcublasLt's `.data` fetched a span beside a relocated one).
const READ_AROUND_BYTES: u64 = 64 << 10;

/// Reads the library's bytes at `data` through the cache for the prefetcher.
fn reader(cache: &SpanCache, data: &Range<u64>) -> impl FnMut(u64, u64) -> Option<Vec<u8>> {
    move |offset: u64, len: u64| {
        let start = data.start.checked_add(offset)?;
        cache.read_for_prefetch(start, start.checked_add(len)?.min(data.end)).ok()
    }
}

/// The library whose data lies at `data` (none when it is not a shared library) and the spans
/// of its loader's tables, in runs of at most `group` (first, last).
pub(super) fn tables(cache: &SpanCache, data: &Range<u64>, group: u32) -> Option<(Library, Vec<(u32, u32)>)> {
    let library = match Library::read(data.end - data.start, &mut reader(cache, data)) {
        Ok(l) => l,
        Err(why) => {
            tracing::trace!(layer = %cache.layer(), at = data.start, %why, "not a shared library");
            return None;
        }
    };
    let ranges = library.loader_ranges();
    let mut runs = Vec::new();
    for r in ranges {
        let Ok(spans) = cache.index().spans_for(data.start + r.start, r.end - r.start) else { continue };
        let last = *spans.end();
        for first in spans.step_by(group.max(1) as usize) {
            runs.push((first, first.saturating_add(group.max(1) - 1).min(last)));
        }
    }
    let bytes: u64 = ranges.iter().map(|r| r.end - r.start).sum();
    tracing::debug!(layer = %cache.layer(), at = data.start, ranges = ranges.len(), bytes, "a shared library's loader tables are fetched ahead");
    Some((library, runs))
}

/// The runs of spans (first, last) of the pages `library`'s relocations write, with their
/// read-around, that its tables' spans do not hold. Reads the relocation tables (waiting for
/// their fetches in flight).
pub(super) fn relocated_runs(cache: &SpanCache, data: &Range<u64>, library: &Library) -> VecDeque<(u32, u32)> {
    let pages = library.relocated_pages(&mut reader(cache, data));
    let index = cache.index();
    let size = data.end - data.start;
    let spans_of = |r: &Range<u64>| index.spans_for(data.start + r.start, r.end - r.start).ok();
    let around =
        |r: &Range<u64>| r.start.saturating_sub(READ_AROUND_BYTES)..r.end.saturating_add(READ_AROUND_BYTES).min(size);
    let tables: Vec<_> = library.loader_ranges().iter().filter_map(spans_of).collect();
    let mut runs: VecDeque<(u32, u32)> = VecDeque::new();
    for spans in pages.iter().map(around).filter_map(|r| spans_of(&r)) {
        for i in spans.filter(|i| !tables.iter().any(|t| t.contains(i))) {
            match runs.back_mut() {
                Some((_, last)) if *last + 1 >= i => *last = (*last).max(i),
                _ => runs.push_back((i, i)),
            }
        }
    }
    let spans: u32 = runs.iter().map(|(a, b)| b - a + 1).sum();
    tracing::debug!(layer = %cache.layer(), at = data.start, page_ranges = pages.len(), runs = runs.len(), spans, "a shared library's relocated pages are fetched ahead");
    runs
}

#[cfg(test)]
mod tests {
    use super::super::*;
    use super::READ_AROUND_BYTES;
    use crate::elf::Library;
    use crate::testutil::{SlowBlob, span_range, wait_until};
    use std::time::Duration;

    fn cache(index: &Arc<clip_index::Index>, blob: &Arc<SlowBlob>, dir: &std::path::Path) -> Arc<SpanCache> {
        let observer = Prefetcher::start(library_policy()).map(|p| p as Arc<dyn MissObserver>);
        let options = crate::SpanCacheOptions { observer, ..Default::default() };
        Arc::new(SpanCache::with_options(index.clone(), dir.to_path_buf(), blob.clone(), options).expect("cache"))
    }

    /// A layer of small files and this machine's libstdc++ (many symbols) padded to a large
    /// file, behind a blob answering after `delay`: its index, blob, the library's data range,
    /// its bytes and the spans of its loader tables and relocated pages (with their read-around). None without libstdc++.
    #[allow(clippy::type_complexity)]
    fn library_layer(
        delay: Duration,
    ) -> Option<(Arc<clip_index::Index>, Arc<SlowBlob>, std::ops::Range<u64>, Vec<u8>, Vec<u32>)> {
        let lib = std::fs::read("/usr/lib/x86_64-linux-gnu/libstdc++.so.6").ok()?;
        let mut data = lib;
        data.resize((crate::elf::MIN_FILE_BYTES + (1 << 20)) as usize, 0);
        let mut files: Vec<(String, Vec<u8>)> = (0..8).map(|n| (format!("a{n}"), vec![n as u8; 64 << 10])).collect();
        files.push(("libstdc++.so.6".into(), data.clone()));
        let (index, blob) = crate::testutil::layer_of(&files, delay);
        let id = index.lookup("/libstdc++.so.6").expect("lookup").expect("entry");
        let entry = index.entry(id).expect("entry");
        let file = entry.data_offset..entry.data_offset + entry.size;
        let mut read = |o: u64, l: u64| data.get(o as usize..(o + l) as usize).map(<[u8]>::to_vec);
        let library = Library::read(entry.size, &mut read).expect("libstdc++ has loader tables");
        // The tables, and the pages the relocations write (fetched after them).
        let relocated = library
            .relocated_pages(&mut read)
            .into_iter()
            .map(|r| r.start.saturating_sub(READ_AROUND_BYTES)..(r.end + READ_AROUND_BYTES).min(entry.size));
        let ranges = library.loader_ranges().iter().cloned().chain(relocated);
        let table_spans =
            ranges.flat_map(|r| index.spans_for(file.start + r.start, r.end - r.start).expect("spans")).collect();
        Some((index, blob, file, data, table_spans))
    }

    fn library_policy() -> PrefetchPolicy {
        PrefetchPolicy {
            threads: 2,
            neighbour_spans: 0,
            neighbours_after_misses: 0,
            file_spans: 32,
            group_spans: 8,
            library_tables: true,
        }
    }

    #[test]
    fn a_shared_librarys_loader_tables_are_fetched_at_its_first_miss_and_nothing_else_far() {
        let Some((index, blob, file, _, table_spans)) = library_layer(Duration::from_millis(5)) else { return };
        let dir = tempfile::tempdir().expect("tmp");
        let c = cache(&index, &blob, dir.path());
        // ld.so's first read: the ELF and program headers.
        c.read_hinted(file.start, file.start + 832, 0, Some(file.clone())).expect("read");
        assert!(wait_until(|| table_spans.iter().all(|i| c.is_cached(*i))), "the loader's tables were not fetched");
        // Spans of the library that are neither its tables nor in the first window: not fetched.
        std::thread::sleep(Duration::from_millis(200));
        let all = index.spans_for(file.start, file.end - file.start).expect("spans");
        let window_end = index.spans_for(file.start, 1).expect("span").end() + LARGE_FILE_FIRST_SPANS;
        let far: Vec<u32> = all.filter(|i| *i > window_end && !table_spans.contains(i)).collect();
        assert!(!far.is_empty());
        let fetched_far: Vec<&u32> = far.iter().filter(|i| c.is_cached(**i)).collect();
        assert!(fetched_far.is_empty(), "fetched beyond the tables: {fetched_far:?}");
        // A later miss in the same library does not look at it again.
        let before = blob.requests.load(Ordering::SeqCst);
        let (a, b) = span_range(&index, far[far.len() / 2]);
        c.read_hinted(a, b, 0, Some(file.clone())).expect("read");
        std::thread::sleep(Duration::from_millis(200));
        assert!(blob.requests.load(Ordering::SeqCst) - before <= 3, "a second miss re-read the library's tables");
    }

    /// As ld.so does: the headers read, then the dynamic section touched at once. The prefetcher
    /// finds that section's span in flight for the reader and waits for it (it gave up before,
    /// and fetched no table at all).
    #[test]
    fn a_librarys_tables_are_fetched_while_a_reader_fetches_its_dynamic_section() {
        let Some((index, blob, file, data, table_spans)) = library_layer(Duration::from_millis(300)) else { return };
        let phoff = u64::from_le_bytes(data[0x20..0x28].try_into().expect("phoff")) as usize;
        let phnum = u16::from_le_bytes([data[0x38], data[0x39]]) as usize;
        let dynamic = (0..phnum)
            .map(|n| &data[phoff + n * 56..phoff + (n + 1) * 56])
            .find(|ph| ph[..4] == [2, 0, 0, 0])
            .map(|ph| u64::from_le_bytes(ph[8..16].try_into().expect("p_offset")))
            .expect("PT_DYNAMIC");
        let dir = tempfile::tempdir().expect("tmp");
        let c = cache(&index, &blob, dir.path());
        let (c2, f2) = (c.clone(), file.clone());
        let headers = std::thread::spawn({
            let (c, file) = (c.clone(), file.clone());
            move || c.read_hinted(file.start, file.start + 832, 0, Some(file)).map(|_| ())
        });
        std::thread::sleep(Duration::from_millis(100));
        let at = f2.start + dynamic;
        let section = std::thread::spawn(move || c2.read_hinted(at, at + 16, 0, Some(f2)).map(|_| ()));
        headers.join().expect("join").expect("headers");
        section.join().expect("join").expect("dynamic section");
        assert!(wait_until(|| table_spans.iter().all(|i| c.is_cached(*i))), "the loader's tables were not fetched");
    }

    /// A library with a large `.data` of which its relocations write two pages, far apart: at
    /// its first miss, their spans are fetched and nothing between them; reading them opens no
    /// window (a right guess would).
    #[test]
    fn the_pages_a_librarys_relocations_write_are_fetched_and_their_reads_open_no_window() {
        let data_len = crate::elf::MIN_FILE_BYTES + (1 << 20);
        let targets = [0x14000 + (2 << 20) + 8, 0x14000 + (6 << 20) + 16];
        let bytes = crate::testutil::elf_library(data_len, &targets, &[]);
        let files = vec![("a".to_string(), vec![1u8; 64 << 10]), ("libdata.so".to_string(), bytes)];
        let (index, blob) = crate::testutil::layer_of(&files, Duration::from_millis(5));
        let entry = index.entry(index.lookup("/libdata.so").expect("lookup").expect("entry")).expect("entry");
        let file = entry.data_offset..entry.data_offset + entry.size;
        // Each relocated page with the kernel's read-around of it.
        let pages = [0x4000 + (2 << 20), 0x4000 + (6 << 20)];
        let around = |page: u64| index.spans_for(file.start + page - READ_AROUND_BYTES, 4096 + 2 * READ_AROUND_BYTES);
        let wanted: Vec<u32> = pages.iter().flat_map(|p| around(*p).expect("spans")).collect();
        let dir = tempfile::tempdir().expect("tmp");
        let c = cache(&index, &blob, dir.path());
        c.read_hinted(file.start, file.start + 832, 0, Some(file.clone())).expect("read");
        assert!(wait_until(|| wanted.iter().all(|i| c.is_cached(*i))), "the relocated pages were not fetched");
        std::thread::sleep(Duration::from_millis(200));
        let (low, high) = (wanted[0] - 4, wanted[wanted.len() - 1] + 4);
        let beside: Vec<u32> = (low..=high).filter(|i| !wanted.contains(i) && c.is_cached(*i)).collect();
        assert!(beside.is_empty(), "fetched beside the relocated pages: {beside:?}");
        // The loader writes them: no window after either.
        let before = blob.requests.load(Ordering::SeqCst);
        for page in pages {
            let at = file.start + page;
            c.read_hinted(at, at + 8, 0, Some(file.clone())).expect("read");
        }
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(blob.requests.load(Ordering::SeqCst), before, "a read of a relocated page fetched more");
        let beside: Vec<u32> = (low..=high).filter(|i| !wanted.contains(i) && c.is_cached(*i)).collect();
        assert!(beside.is_empty(), "a read of a relocated page fetched beside it: {beside:?}");
    }
}
