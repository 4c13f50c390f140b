//! [`MetaGuard`]: bounds what the `tar` crate holds in memory while it parses a hostile stream.
//! The crate reads a PAX extended header (`x`) or a GNU long name or long link (`L`, `K`)
//! whole into memory, whatever size its header claims: a few kilobytes of gzip can claim
//! gigabytes. The guard follows the archive's block structure as the bytes pass, the way the
//! crate does (headers of 512 bytes, data padded to 512, a PAX `size` record overriding the
//! size of the entry it describes, the archive ending at the first zero block), and fails the
//! stream at the header of such an entry larger than [`MAX_META`], before its data is read.

use std::io::{self, Read};

/// Largest PAX extended header or GNU long name/link accepted.
pub const MAX_META: u64 = 1 << 20;
const BLOCK: usize = 512;

/// A tar stream whose metadata entries are bounded (see the module docs).
pub struct MetaGuard<R> {
    inner: R,
    /// The header being assembled, and how much of it.
    block: [u8; BLOCK],
    filled: usize,
    /// Bytes of the current entry's data and padding still to pass.
    skip: u64,
    /// The data of the PAX header passing now (`Some` while it passes), and its size.
    pax: Option<Vec<u8>>,
    pax_size: u64,
    /// The `size` record of the last PAX header, for the entry it describes.
    pending_size: Option<u64>,
    /// The end-of-archive block passed: what follows is not parsed.
    ended: bool,
}

impl<R> std::fmt::Debug for MetaGuard<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetaGuard").field("skip", &self.skip).field("ended", &self.ended).finish_non_exhaustive()
    }
}

impl<R: Read> MetaGuard<R> {
    pub fn new(inner: R) -> Self {
        Self { inner, block: [0; BLOCK], filled: 0, skip: 0, pax: None, pax_size: 0, pending_size: None, ended: false }
    }

    pub fn get_mut(&mut self) -> &mut R {
        &mut self.inner
    }

    fn observe(&mut self, mut bytes: &[u8]) -> io::Result<()> {
        while !bytes.is_empty() && !self.ended {
            if self.skip > 0 {
                let k = usize::try_from(self.skip).unwrap_or(usize::MAX).min(bytes.len());
                if let Some(pax) = &mut self.pax {
                    let want = usize::try_from(self.pax_size).unwrap_or(usize::MAX).saturating_sub(pax.len());
                    pax.extend_from_slice(&bytes[..k.min(want)]);
                }
                self.skip -= k as u64;
                bytes = &bytes[k..];
                if self.skip == 0
                    && let Some(pax) = self.pax.take()
                {
                    self.pending_size = pax_size(&pax);
                }
                continue;
            }
            let k = (BLOCK - self.filled).min(bytes.len());
            self.block[self.filled..self.filled + k].copy_from_slice(&bytes[..k]);
            self.filled += k;
            bytes = &bytes[k..];
            if self.filled == BLOCK {
                self.filled = 0;
                self.header()?;
            }
        }
        Ok(())
    }

    /// A whole header passed: where its entry's data ends.
    fn header(&mut self) -> io::Result<()> {
        if self.block.iter().all(|b| *b == 0) {
            self.ended = true;
            return Ok(());
        }
        let header = tar::Header::from_byte_slice(&self.block);
        let kind = header.entry_type();
        let mut size = header.entry_size()?;
        if kind.is_gnu_sparse() {
            return Err(invalid("GNU sparse files are not supported in layers".into()));
        }
        let recognised = header.as_ustar().is_some() || header.as_gnu().is_some();
        let meta = kind.is_pax_local_extensions() || kind.is_gnu_longname() || kind.is_gnu_longlink();
        if meta && recognised && size > MAX_META {
            return Err(invalid(format!(
                "a tar metadata entry (type {:?}) of {size} bytes (at most {MAX_META})",
                kind.as_byte() as char
            )));
        }
        let extension = meta || kind.is_pax_global_extensions();
        if !extension && let Some(pax) = self.pending_size {
            size = pax;
        }
        // The tar crate attaches a PAX header to the next entry it returns; long names and
        // links come in between.
        if !(meta && recognised) {
            self.pending_size = None;
        }
        if kind.is_pax_local_extensions() && recognised {
            self.pax = Some(Vec::new());
            self.pax_size = size;
        }
        self.skip = size.checked_add(BLOCK as u64 - 1).ok_or_else(|| invalid("entry size overflows".into()))?
            & !(BLOCK as u64 - 1);
        if self.skip == 0
            && let Some(pax) = self.pax.take()
        {
            self.pending_size = pax_size(&pax);
        }
        Ok(())
    }
}

/// The `size` record of a PAX header, read as the tar crate reads it.
fn pax_size(records: &[u8]) -> Option<u64> {
    for ext in tar::PaxExtensions::new(records) {
        let ext = ext.ok()?;
        if ext.key() == Ok("size") {
            return ext.value().ok()?.parse().ok();
        }
    }
    None
}

fn invalid(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message)
}

impl<R: Read> Read for MetaGuard<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.observe(&buf[..n])?;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(bytes: &[u8]) -> io::Result<Vec<(String, Vec<u8>)>> {
        let mut archive = tar::Archive::new(MetaGuard::new(bytes));
        let mut out = Vec::new();
        for e in archive.entries()? {
            let mut e = e?;
            let mut data = Vec::new();
            e.read_to_end(&mut data)?;
            out.push((e.path()?.display().to_string(), data));
        }
        Ok(out)
    }

    fn header(kind: tar::EntryType, size: u64) -> tar::Header {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(kind);
        h.set_size(size);
        h.set_mode(0o644);
        h
    }

    #[test]
    fn ordinary_archives_pass_whole_with_long_names_and_pax_sizes() {
        let mut b = tar::Builder::new(Vec::new());
        let long = format!("{}/file", "d".repeat(300));
        b.append_data(&mut header(tar::EntryType::Regular, 3), &long, &b"abc"[..]).expect("long");
        b.append_pax_extensions([("SCHILY.xattr.user.a", &b"1"[..]), ("size", &b"5"[..])]).expect("pax");
        b.append_data(&mut header(tar::EntryType::Regular, 5), "sized", &b"hello"[..]).expect("sized");
        b.append_data(&mut header(tar::EntryType::Regular, 0), "empty", &b""[..]).expect("empty");
        let bytes = b.into_inner().expect("tar");
        let got = entries(&bytes).expect("parses");
        assert_eq!(got.len(), 3);
        assert_eq!(got[0], (long, b"abc".to_vec()));
        assert_eq!(got[1], ("sized".to_string(), b"hello".to_vec()));
    }

    #[test]
    fn a_pax_header_that_claims_gigabytes_fails_before_it_is_read() {
        for kind in [tar::EntryType::XHeader, tar::EntryType::GNULongName, tar::EntryType::GNULongLink] {
            let mut h = header(kind, 4 << 30);
            if kind != tar::EntryType::XHeader {
                h = tar::Header::new_gnu();
                h.set_entry_type(kind);
                h.set_size(4 << 30);
            }
            h.set_cksum();
            let mut bytes = h.as_bytes().to_vec();
            // The claimed data: far less than claimed, enough to show nothing was buffered.
            bytes.extend(std::iter::repeat_n(b'a', 1 << 16));
            let err = entries(&bytes).expect_err("refused");
            assert!(err.to_string().contains("metadata entry"), "{kind:?}: {err}");
        }
    }

    #[test]
    fn a_pax_size_record_is_followed_as_the_tar_crate_follows_it() {
        // The PAX size says 1024; the header says 0. A guard that ignored the record would take
        // the data for a header and miss the oversized long name after it.
        let mut b = tar::Builder::new(Vec::new());
        b.append_pax_extensions([("size", &b"1024"[..])]).expect("pax");
        b.append_data(&mut header(tar::EntryType::Regular, 0), "f", &[0u8; 1024][..]).expect("f");
        let mut bytes = b.into_inner().expect("tar");
        bytes.truncate(bytes.len() - 1024); // the end blocks
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::GNULongName);
        h.set_size(1 << 30);
        h.set_cksum();
        bytes.extend_from_slice(h.as_bytes());
        bytes.extend(std::iter::repeat_n(b'a', 4096));
        let err = entries(&bytes).expect_err("refused");
        assert!(err.to_string().contains("metadata entry"), "{err}");
    }
}
