//! What the dynamic loader reads whole of a shared library. Loading a library, `ld.so` walks
//! every relocation (`.rela.dyn`, `.rela.plt`, `.relr.dyn`), looks up the name of each symbol
//! they name (`.gnu.hash`, `.dynsym`, `.dynstr`, `.gnu.version`) and writes the relocated
//! pointers (`PT_GNU_RELRO`: `.data.rel.ro`, `.got`). On `import torch` those tables are touched
//! all through (11 MB of `.dynstr` in `libtorch_cuda.so`, 15 of its 23 MB touched; 18 of 49 MB
//! in `libtorch_cpu.so`), in an order no window ahead of a miss follows: one round trip per
//! 256 KiB span of them. Their places are in the library's headers, so at a library's first miss
//! the prefetcher reads the ELF and program headers and the dynamic section and fetches these
//! ranges at once, in parallel ([`crate::prefetch`]).
//!
//! The bytes are the image's, and hostile: only 64-bit little-endian `ET_DYN` files are read,
//! every count and offset is bounded, and ranges lie inside the file; the worst a lying header
//! can do is fetch [`MAX_RANGE_BYTES`] of the file's own spans.

use std::ops::Range;

/// A file smaller than this is not looked at (the prefetcher's file window covers it).
pub const MIN_FILE_BYTES: u64 = 8 << 20;
/// The ranges of one library, together, at most (else none are fetched).
pub const MAX_RANGE_BYTES: u64 = 96 << 20;
/// Ranges nearer than this are fetched as one.
const MERGE_GAP: u64 = 256 << 10;
const MAX_PHDRS: u64 = 128;
const MAX_DYNAMIC_BYTES: u64 = 64 << 10;
const MAX_SECTIONS: u64 = 1024;
const PAGE: u64 = 4096;
/// A larger file's relocated pages are not looked for (their map would be large).
const MAX_RELOCATED_FILE_BYTES: u64 = 4 << 30;
/// Relocation tables are read in pieces of this (a whole number of entries of every kind).
pub const RELOCATIONS_READ_BYTES: u64 = 48 * 21_845;

const SHT_DYNSYM: u32 = 11;
const SHT_GNU_HASH: u32 = 0x6fff_fff6;
const SHT_GNU_VERSYM: u32 = 0x6fff_ffff;

const PT_LOAD: u32 = 1;
const PT_DYNAMIC: u32 = 2;
const PT_GNU_RELRO: u32 = 0x6474_e552;

const DT_NULL: u64 = 0;
const DT_PLTRELSZ: u64 = 2;
const DT_STRTAB: u64 = 5;
const DT_SYMTAB: u64 = 6;
const DT_RELA: u64 = 7;
const DT_RELASZ: u64 = 8;
const DT_STRSZ: u64 = 10;
const DT_REL: u64 = 17;
const DT_RELSZ: u64 = 18;
const DT_PLTREL: u64 = 20;
const DT_JMPREL: u64 = 23;
const DT_RELRSZ: u64 = 35;
const DT_RELR: u64 = 36;
const DT_GNU_HASH: u64 = 0x6fff_fef5;
const DT_VERSYM: u64 = 0x6fff_fff0;

const SYM_SIZE: u64 = 24;

/// Why a file's loader ranges are not known.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotALibrary {
    #[error("not a 64-bit little-endian ELF shared object")]
    NotElf,
    #[error("its {0} lie outside the file")]
    Outside(&'static str),
    #[error("no dynamic section")]
    NoDynamic,
    #[error("{0} bytes of tables, more than the bound")]
    TooLarge(u64),
    #[error("its bytes could not be read")]
    Unreadable,
}

#[derive(Debug, Clone, Copy)]
struct Load {
    vaddr: u64,
    offset: u64,
    filesz: u64,
}

/// How a relocation table's entries are laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Entries {
    /// `Elf64_Rela`: 24 bytes, `r_offset` first.
    Rela,
    /// `Elf64_Rel`: 16 bytes, `r_offset` first.
    Rel,
    /// `.relr.dyn`: 8-byte words, an address or a bitmap of the 63 words after the last.
    Relr,
}

/// A shared library as the loader sees it, from its headers: the tables it reads whole
/// ([`Self::loader_ranges`]) and the pages its relocations write ([`Self::relocated_pages`]).
#[derive(Debug, Clone)]
pub struct Library {
    size: u64,
    /// `PT_LOAD` segments, by address.
    loads: Vec<Load>,
    /// `PT_GNU_RELRO` in the file.
    relro: Option<Range<u64>>,
    /// The file ranges the loader reads whole, merged and sorted.
    tables: Vec<Range<u64>>,
    /// The relocation tables in the file.
    relocations: Vec<(Range<u64>, Entries)>,
}

impl Library {
    /// Reads a library's headers. `read(offset, len)` gives the file's bytes (`None`: not
    /// readable); `size` is the file's.
    pub fn read(size: u64, read: &mut dyn FnMut(u64, u64) -> Option<Vec<u8>>) -> Result<Self, NotALibrary> {
        let header = read(0, 64).ok_or(NotALibrary::Unreadable)?;
        if header.len() < 64
            || &header[..4] != b"\x7fELF"
            || header[4] != 2
            || header[5] != 1
            || u16_at(&header, 16) != 3
        {
            return Err(NotALibrary::NotElf);
        }
        let (phoff, phentsize, phnum) =
            (u64_at(&header, 0x20), u64::from(u16_at(&header, 0x36)), u64::from(u16_at(&header, 0x38)));
        if phentsize != 56 || phnum == 0 || phnum > MAX_PHDRS {
            return Err(NotALibrary::NotElf);
        }
        let ph_bytes = phnum * phentsize;
        if phoff.checked_add(ph_bytes).is_none_or(|end| end > size) {
            return Err(NotALibrary::Outside("program headers"));
        }
        let phdrs = read(phoff, ph_bytes).ok_or(NotALibrary::Unreadable)?;
        let mut loads = Vec::new();
        let (mut dynamic, mut relro) = (None, None);
        for ph in phdrs.chunks_exact(56) {
            let (offset, vaddr, filesz) = (u64_at(ph, 8), u64_at(ph, 16), u64_at(ph, 32));
            match u32_at(ph, 0) {
                PT_LOAD => loads.push(Load { vaddr, offset, filesz }),
                PT_DYNAMIC => dynamic = Some((offset, filesz)),
                PT_GNU_RELRO => relro = Some((offset, filesz)),
                _ => {}
            }
        }
        loads.sort_by_key(|l| l.vaddr);
        let (dyn_off, dyn_len) = dynamic.ok_or(NotALibrary::NoDynamic)?;
        if dyn_len > MAX_DYNAMIC_BYTES || dyn_off.checked_add(dyn_len).is_none_or(|end| end > size) {
            return Err(NotALibrary::Outside("dynamic section"));
        }
        let dynamic = read(dyn_off, dyn_len).ok_or(NotALibrary::Unreadable)?;
        let tag = |t: u64| -> Option<u64> {
            dynamic
                .chunks_exact(16)
                .map(|d| (u64_at(d, 0), u64_at(d, 8)))
                .take_while(|(k, _)| *k != DT_NULL)
                .find(|(k, _)| *k == t)
                .map(|(_, v)| v)
        };
        let sizes = section_sizes(&header, size, read);
        let mut tables: Vec<(u64, u64, Option<Entries>)> = Vec::new();
        let (strtab, symtab) = (tag(DT_STRTAB), tag(DT_SYMTAB));
        if let (Some(strtab), Some(strsz)) = (strtab, tag(DT_STRSZ)) {
            tables.push((strtab, strsz, None));
        }
        let plt = if tag(DT_PLTREL) == Some(DT_REL) { Entries::Rel } else { Entries::Rela };
        for (addr, len, entries) in [
            (DT_RELA, DT_RELASZ, Entries::Rela),
            (DT_REL, DT_RELSZ, Entries::Rel),
            (DT_JMPREL, DT_PLTRELSZ, plt),
            (DT_RELR, DT_RELRSZ, Entries::Relr),
        ] {
            if let (Some(a), Some(l)) = (tag(addr), tag(len)) {
                tables.push((a, l, Some(entries)));
            }
        }
        // `.dynsym`, `.gnu.hash` and `.gnu.version` have no size in the dynamic section: their
        // section headers give it; without them, the linkers' layout (`.gnu.hash`, `.dynsym`,
        // `.dynstr` in a row). A library rewritten by patchelf has `.dynstr` moved away.
        if let Some(sym) = symtab {
            let layout = strtab.filter(|s| *s > sym).map(|s| s - sym);
            if let Some(len) = sizes.get(&sym).copied().or(layout) {
                tables.push((sym, len, None));
                if let Some(versym) = tag(DT_VERSYM) {
                    tables.push((versym, sizes.get(&versym).copied().unwrap_or(len / SYM_SIZE * 2), None));
                }
            }
            if let Some(hash) = tag(DT_GNU_HASH)
                && let Some(len) = sizes.get(&hash).copied().or((hash < sym).then(|| sym - hash))
            {
                tables.push((hash, len, None));
            }
        }
        let mut ranges: Vec<Range<u64>> = Vec::new();
        let mut relocations = Vec::new();
        // A table outside its segment or the file is left out (its reads are left to demand).
        for (vaddr, len, entries) in tables {
            let Some(load) = load_of(&loads, vaddr) else { continue };
            let Some(start) = load.offset.checked_add(vaddr - load.vaddr) else { continue };
            if let Some(end) =
                start.checked_add(len).filter(|e| *e <= size && *e <= load.offset.saturating_add(load.filesz))
            {
                ranges.push(start..end);
                if let Some(entries) = entries {
                    relocations.push((start..end, entries));
                }
            }
        }
        if ranges.is_empty() {
            return Err(NotALibrary::Outside("dynamic tables"));
        }
        let relro = match relro {
            Some((offset, len)) => {
                Some(offset..offset.checked_add(len).filter(|e| *e <= size).ok_or(NotALibrary::Outside("RELRO"))?)
            }
            None => None,
        };
        ranges.extend(relro.clone());
        let tables = merge(ranges);
        let total: u64 = tables.iter().map(|r| r.end - r.start).sum();
        if total > MAX_RANGE_BYTES {
            return Err(NotALibrary::TooLarge(total));
        }
        Ok(Self { size, loads, relro, tables, relocations })
    }

    /// The file ranges the loader reads whole, merged and sorted: the dynamic-linking tables
    /// and RELRO.
    pub fn loader_ranges(&self) -> &[Range<u64>] {
        &self.tables
    }

    /// The pages, as page-aligned file ranges merged when adjacent and sorted, that the
    /// loader's relocations write outside RELRO (which [`Self::loader_ranges`] holds whole):
    /// the pointers in `.data` and `.got.plt`. A library's `.data` can be tens of MB of which its
    /// relocations touch a few percent, scattered (libcublasLt: 412 of 14,772 pages, every one
    /// of them a page `import torch` reads). `read` gives the file's bytes, as for [`Self::read`];
    /// the relocation tables are read in pieces of [`RELOCATIONS_READ_BYTES`]. A table that cannot
    /// be read ends the walk with what was found.
    pub fn relocated_pages(&self, read: &mut dyn FnMut(u64, u64) -> Option<Vec<u8>>) -> Vec<Range<u64>> {
        if self.size > MAX_RELOCATED_FILE_BYTES {
            return Vec::new();
        }
        let pages = self.size.div_ceil(PAGE);
        let mut written = vec![0u64; pages.div_ceil(64) as usize];
        let relro = self.relro.clone().unwrap_or(0..0);
        let mut mark = |vaddr: u64| {
            let Some(load) = load_of(&self.loads, vaddr) else { return };
            let offset = load.offset.saturating_add(vaddr - load.vaddr);
            if offset < self.size && !relro.contains(&offset) {
                let page = offset / PAGE;
                if let Some(w) = written.get_mut((page / 64) as usize) {
                    *w |= 1 << (page % 64);
                }
            }
        };
        'tables: for (range, entries) in &self.relocations {
            let stride = match entries {
                Entries::Rela => 24,
                Entries::Rel => 16,
                Entries::Relr => 8,
            };
            let mut relr_next = 0u64;
            let mut at = range.start;
            while at < range.end {
                let len = RELOCATIONS_READ_BYTES.min(range.end - at);
                let Some(bytes) = read(at, len) else { break 'tables };
                for entry in bytes.chunks_exact(stride as usize) {
                    let word = u64_at(entry, 0);
                    match entries {
                        Entries::Rela | Entries::Rel => mark(word),
                        Entries::Relr if word & 1 == 0 => {
                            mark(word);
                            relr_next = word.wrapping_add(8);
                        }
                        Entries::Relr => {
                            for bit in 1..64 {
                                if word >> bit & 1 == 1 {
                                    mark(relr_next.wrapping_add((bit - 1) * 8));
                                }
                            }
                            relr_next = relr_next.wrapping_add(63 * 8);
                        }
                    }
                }
                at += len;
            }
        }
        let mut runs: Vec<Range<u64>> = Vec::new();
        let pages = written
            .iter()
            .enumerate()
            .flat_map(|(w, bits)| (0..64).filter(move |b| bits >> b & 1 == 1).map(move |b| w as u64 * 64 + b));
        for page in pages {
            let (start, end) = (page * PAGE, ((page + 1) * PAGE).min(self.size));
            match runs.last_mut() {
                Some(last) if last.end == start => last.end = end,
                _ => runs.push(start..end),
            }
        }
        runs
    }
}

/// The segment holding address `vaddr` in the file (its file bytes, not the zeroed tail).
fn load_of(loads: &[Load], vaddr: u64) -> Option<&Load> {
    let at = loads.partition_point(|l| l.vaddr <= vaddr).checked_sub(1)?;
    loads.get(at).filter(|l| vaddr - l.vaddr < l.filesz)
}

/// The sizes of the allocated symbol, hash and version sections, by address, from the section
/// headers (none when they are missing, too many or outside the file).
fn section_sizes(
    header: &[u8],
    size: u64,
    read: &mut dyn FnMut(u64, u64) -> Option<Vec<u8>>,
) -> std::collections::HashMap<u64, u64> {
    let mut sizes = std::collections::HashMap::new();
    let (shoff, shentsize, shnum) =
        (u64_at(header, 0x28), u64::from(u16_at(header, 0x3a)), u64::from(u16_at(header, 0x3c)));
    if shentsize != 64 || shnum == 0 || shnum > MAX_SECTIONS || shoff.checked_add(shnum * 64).is_none_or(|e| e > size) {
        return sizes;
    }
    let Some(shdrs) = read(shoff, shnum * 64) else { return sizes };
    for sh in shdrs.chunks_exact(64) {
        if matches!(u32_at(sh, 4), SHT_DYNSYM | SHT_GNU_HASH | SHT_GNU_VERSYM) {
            sizes.insert(u64_at(sh, 16), u64_at(sh, 32));
        }
    }
    sizes
}

/// Sorted, empty ones dropped, those within [`MERGE_GAP`] of each other joined.
fn merge(mut ranges: Vec<Range<u64>>) -> Vec<Range<u64>> {
    ranges.retain(|r| r.end > r.start);
    ranges.sort_by_key(|r| r.start);
    let mut out: Vec<Range<u64>> = Vec::with_capacity(ranges.len());
    for r in ranges {
        match out.last_mut() {
            Some(last) if r.start <= last.end.saturating_add(MERGE_GAP) => last.end = last.end.max(r.end),
            _ => out.push(r),
        }
    }
    out
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    b.get(at..at + 2).map_or(0, |s| u16::from_le_bytes([s[0], s[1]]))
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    b.get(at..at + 4).and_then(|s| s.try_into().ok()).map_or(0, u32::from_le_bytes)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    b.get(at..at + 8).and_then(|s| s.try_into().ok()).map_or(0, u64::from_le_bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shared libraries of this machine's own C library, read whole.
    fn library(path: &str) -> Option<Vec<u8>> {
        std::fs::read(path).ok()
    }

    fn ranges_of(bytes: &[u8]) -> Result<Vec<Range<u64>>, NotALibrary> {
        library_of(bytes).map(|l| l.loader_ranges().to_vec())
    }

    fn library_of(bytes: &[u8]) -> Result<Library, NotALibrary> {
        Library::read(bytes.len() as u64, &mut reader(bytes))
    }

    fn reader(bytes: &[u8]) -> impl FnMut(u64, u64) -> Option<Vec<u8>> + '_ {
        |off, len| {
            let (s, e) = (off as usize, (off + len) as usize);
            bytes.get(s..e.min(bytes.len())).map(<[u8]>::to_vec)
        }
    }

    #[test]
    fn a_real_librarys_tables_are_found_inside_it() {
        // libc, and a C++ library with many symbols, as the test machine has them.
        let mut seen = 0;
        for path in ["/lib/x86_64-linux-gnu/libc.so.6", "/usr/lib/x86_64-linux-gnu/libstdc++.so.6"] {
            let Some(bytes) = library(path) else { continue };
            seen += 1;
            let ranges = ranges_of(&bytes).expect(path);
            assert!(!ranges.is_empty(), "{path}");
            let total: u64 = ranges.iter().map(|r| r.end - r.start).sum();
            assert!(total > 16 << 10 && total < bytes.len() as u64 / 2, "{path}: {total} of {} bytes", bytes.len());
            assert!(ranges.windows(2).all(|w| w[0].end + MERGE_GAP < w[1].start), "{path}: {ranges:?}");
            assert!(ranges.iter().all(|r| r.end <= bytes.len() as u64));
        }
        assert!(seen > 0, "no shared library to read on this machine");
    }

    #[test]
    fn hostile_headers_are_refused_and_never_read_outside_the_file() {
        let Some(good) = library("/lib/x86_64-linux-gnu/libc.so.6") else { return };
        assert_eq!(ranges_of(b"#!/bin/sh\n"), Err(NotALibrary::NotElf));
        assert_eq!(ranges_of(&[0u8; 4096]), Err(NotALibrary::NotElf));
        // Every single-field corruption of the headers: refused, or ranges still in the file.
        let phoff = u64_at(&good, 0x20) as usize;
        for at in (0..64).chain(phoff..phoff + 56 * 12) {
            for value in [0u8, 0xff, 0x7f] {
                let mut bad = good.clone();
                bad[at] = value;
                if let Ok(lib) = library_of(&bad) {
                    let ranges = lib.loader_ranges();
                    let total: u64 = ranges.iter().map(|r| r.end - r.start).sum();
                    assert!(ranges.iter().all(|r| r.end <= bad.len() as u64) && total <= MAX_RANGE_BYTES);
                    let pages = lib.relocated_pages(&mut reader(&bad));
                    assert!(pages.iter().all(|r| r.end <= bad.len() as u64 && r.start < r.end), "{pages:?}");
                }
            }
        }
        // Offsets and sizes at the top of the range: refused or left out, never an overflow.
        for n in 0..u64::from(u16_at(&good, 0x38)).min(12) as usize {
            for field in [8, 16, 32] {
                let mut bad = good.clone();
                let at = phoff + n * 56 + field;
                bad[at..at + 8].copy_from_slice(&u64::MAX.to_le_bytes());
                if let Ok(ranges) = ranges_of(&bad) {
                    assert!(ranges.iter().all(|r| r.end <= bad.len() as u64));
                }
            }
        }
        // A file cut short: what lies past its end is never asked for.
        let cut = &good[..good.len() / 3];
        let mut asked_past = false;
        let _ = Library::read(cut.len() as u64, &mut |off, len| {
            asked_past |= off + len > cut.len() as u64;
            cut.get(off as usize..(off + len) as usize).map(<[u8]>::to_vec)
        });
        assert!(!asked_past);
    }

    /// Without section headers (stripped with `sstrip`) the sizes come from the linker's layout,
    /// and every table is still found.
    #[test]
    fn without_section_headers_the_layout_gives_the_sizes() {
        let Some(mut bytes) = library("/usr/lib/x86_64-linux-gnu/libstdc++.so.6") else { return };
        let with = ranges_of(&bytes).expect("with section headers");
        bytes[0x3c..0x3e].copy_from_slice(&[0, 0]);
        let without = ranges_of(&bytes).expect("without section headers");
        assert_eq!(with, without);
    }

    /// [`crate::testutil::elf_library`] with 32 KiB of data: a RELA relocation into RELRO (left
    /// out), one into page 5, one outside every segment (left out); a RELR address on page 7,
    /// then a bitmap of the words after it (the first on page 7, the third on page 8).
    fn synthetic_library() -> Vec<u8> {
        crate::testutil::elf_library(0x8000, &[0x14010, 0x15008, 0x9999_9999], &[0x17ff0, 1 | 1 << 1 | 1 << 3])
    }

    #[test]
    fn the_pages_relocations_write_outside_relro_are_found_exactly() {
        let bytes = synthetic_library();
        let lib = library_of(&bytes).expect("synthetic library");
        assert_eq!(lib.relocated_pages(&mut reader(&bytes)), vec![0x5000..0x6000, 0x7000..0x9000]);
        // Read in pieces: the same pages.
        let mut pieces = 0;
        let pages = lib.relocated_pages(&mut |off, len| {
            pieces += 1;
            reader(&bytes)(off, len)
        });
        assert_eq!(pages, vec![0x5000..0x6000, 0x7000..0x9000]);
        assert_eq!(pieces, 2, "one read per relocation table this small");
    }

    /// A real library's relocations: every page found lies in a segment's file bytes, outside
    /// RELRO, and some are found.
    #[test]
    fn a_real_librarys_relocated_pages_lie_in_its_writable_data() {
        let Some(bytes) = library("/usr/lib/x86_64-linux-gnu/libstdc++.so.6") else { return };
        let lib = library_of(&bytes).expect("libstdc++");
        let pages = lib.relocated_pages(&mut reader(&bytes));
        assert!(!pages.is_empty(), "libstdc++ writes no page outside RELRO?");
        let relro = lib.relro.clone().expect("RELRO");
        let last = lib.loads.iter().max_by_key(|l| l.offset).expect("a segment");
        for r in &pages {
            assert!(r.start % PAGE == 0 && r.end <= bytes.len() as u64);
            assert!(r.start >= relro.start.min(last.offset) && r.end <= last.offset + last.filesz + PAGE, "{r:?}");
            assert!(!relro.contains(&r.start) || r.start < relro.start, "{r:?} in RELRO {relro:?}");
        }
    }

    /// Relocation entries of random words: every page found is still in the file.
    #[test]
    fn hostile_relocations_name_only_pages_of_the_file() {
        let mut bytes = synthetic_library();
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for at in (0x2000..0x2048).chain(0x3000..0x3010).step_by(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            bytes[at..at + 8].copy_from_slice(&(x % 0x20000).to_le_bytes());
        }
        let lib = library_of(&bytes).expect("synthetic library");
        let pages = lib.relocated_pages(&mut reader(&bytes));
        assert!(pages.iter().all(|r| r.end <= bytes.len() as u64 && !(0x4000..0x5000).contains(&r.start)));
        // A table that cannot be read: nothing found, no error.
        assert!(lib.relocated_pages(&mut |_, _| None).is_empty());
    }

    #[test]
    fn near_ranges_merge_and_far_ones_do_not() {
        let m = merge(vec![10..20, 0..5, 5..8, 30 + MERGE_GAP..40 + MERGE_GAP, 7..7]);
        assert_eq!(m, vec![0..20, 30 + MERGE_GAP..40 + MERGE_GAP]);
    }
}
