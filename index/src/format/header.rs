//! The fixed 152-byte header of an index (`index/FORMAT.md`, "Header"): the one place in code
//! where its layout is written down. Encoding, opening and splitting off the windows all go
//! through [`Header`].

use super::codes::{HEADER_LEN, MAGIC, rd_u32, rd_u64};
use crate::IndexError;
use crate::error::format_err;

/// Byte offsets of the header fields.
const VERSION_AT: usize = 8;
const COMPRESSION_AT: usize = 12;
const FLAGS_AT: usize = 13;
const SPAN_SIZE_AT: usize = 16;
const COMPRESSED_SIZE_AT: usize = 24;
const UNCOMPRESSED_SIZE_AT: usize = 32;
const LAYER_DIGEST_AT: usize = 40;
const MEDIA_TYPE_AT: usize = 72;
const ENTRY_COUNT_AT: usize = 80;
const XATTR_COUNT_AT: usize = 84;
const CHECKPOINT_COUNT_AT: usize = 88;
const WINDOW_TABLE_AT: usize = 92;
const SECTIONS_AT: usize = 96;

/// Where the sections lie in the index (absolute offsets; lengths in bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Sections {
    pub entries_off: u64,
    pub xattrs_off: u64,
    pub checkpoints_off: u64,
    pub strings_off: u64,
    pub strings_len: u64,
    pub windows_off: u64,
    pub windows_len: u64,
}

/// The header's fields, undecoded (enums stay raw bytes; [`super::Index::open`] checks them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Header {
    pub version: u32,
    pub compression: u8,
    pub flags: u8,
    pub span_size: u64,
    pub compressed_size: u64,
    pub uncompressed_size: u64,
    pub layer_digest: [u8; 32],
    /// Offset and length of the media type in the strings.
    pub media_type: (u32, u32),
    pub entry_count: u32,
    pub xattr_count: u32,
    pub checkpoint_count: u32,
    /// Version 2: offset of the window digest table inside the strings (0 in version 1).
    pub window_table: u32,
    pub sections: Sections,
}

impl Header {
    /// The header's bytes.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        let mut put = |at: usize, v: &[u8]| b[at..at + v.len()].copy_from_slice(v);
        put(0, MAGIC);
        put(VERSION_AT, &self.version.to_le_bytes());
        put(COMPRESSION_AT, &[self.compression]);
        put(FLAGS_AT, &[self.flags]);
        put(SPAN_SIZE_AT, &self.span_size.to_le_bytes());
        put(COMPRESSED_SIZE_AT, &self.compressed_size.to_le_bytes());
        put(UNCOMPRESSED_SIZE_AT, &self.uncompressed_size.to_le_bytes());
        put(LAYER_DIGEST_AT, &self.layer_digest);
        put(MEDIA_TYPE_AT, &self.media_type.0.to_le_bytes());
        put(MEDIA_TYPE_AT + 4, &self.media_type.1.to_le_bytes());
        put(ENTRY_COUNT_AT, &self.entry_count.to_le_bytes());
        put(XATTR_COUNT_AT, &self.xattr_count.to_le_bytes());
        put(CHECKPOINT_COUNT_AT, &self.checkpoint_count.to_le_bytes());
        put(WINDOW_TABLE_AT, &self.window_table.to_le_bytes());
        let s = &self.sections;
        let sections = [
            s.entries_off,
            s.xattrs_off,
            s.checkpoints_off,
            s.strings_off,
            s.strings_len,
            s.windows_off,
            s.windows_len,
        ];
        for (i, v) in sections.into_iter().enumerate() {
            put(SECTIONS_AT + 8 * i, &v.to_le_bytes());
        }
        b
    }

    /// Reads the header at the start of `b` (which must be at least [`HEADER_LEN`] long) and
    /// checks the magic; the caller checks the values.
    pub fn decode(b: &[u8]) -> Result<Self, IndexError> {
        if b.len() < HEADER_LEN {
            return Err(format_err(format!("{} bytes is too short for an index header", b.len())));
        }
        if &b[..MAGIC.len()] != MAGIC {
            return Err(format_err("not a CLIP index (bad magic)"));
        }
        let sec = |i: usize| rd_u64(b, SECTIONS_AT + 8 * i);
        let mut layer_digest = [0u8; 32];
        layer_digest.copy_from_slice(&b[LAYER_DIGEST_AT..LAYER_DIGEST_AT + 32]);
        Ok(Self {
            version: rd_u32(b, VERSION_AT),
            compression: b[COMPRESSION_AT],
            flags: b[FLAGS_AT],
            span_size: rd_u64(b, SPAN_SIZE_AT),
            compressed_size: rd_u64(b, COMPRESSED_SIZE_AT),
            uncompressed_size: rd_u64(b, UNCOMPRESSED_SIZE_AT),
            layer_digest,
            media_type: (rd_u32(b, MEDIA_TYPE_AT), rd_u32(b, MEDIA_TYPE_AT + 4)),
            entry_count: rd_u32(b, ENTRY_COUNT_AT),
            xattr_count: rd_u32(b, XATTR_COUNT_AT),
            checkpoint_count: rd_u32(b, CHECKPOINT_COUNT_AT),
            window_table: rd_u32(b, WINDOW_TABLE_AT),
            sections: Sections {
                entries_off: sec(0),
                xattrs_off: sec(1),
                checkpoints_off: sec(2),
                strings_off: sec(3),
                strings_len: sec(4),
                windows_off: sec(5),
                windows_len: sec(6),
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encode_and_decode_agree() {
        let h = Header {
            version: 2,
            compression: 1,
            flags: 1,
            span_size: 3,
            compressed_size: 4,
            uncompressed_size: 5,
            layer_digest: [7; 32],
            media_type: (8, 9),
            entry_count: 10,
            xattr_count: 11,
            checkpoint_count: 12,
            window_table: 13,
            sections: Sections {
                entries_off: 14,
                xattrs_off: 15,
                checkpoints_off: 16,
                strings_off: 17,
                strings_len: 18,
                windows_off: 19,
                windows_len: 20,
            },
        };
        let b = h.encode();
        assert_eq!(&b[..8], MAGIC);
        assert_eq!(rd_u64(&b, HEADER_LEN - 8), 20, "the last section field ends the header");
        assert_eq!(Header::decode(&b).expect("decode"), h);
        let mut bad = b;
        bad[0] ^= 1;
        assert!(Header::decode(&bad).is_err());
        assert!(Header::decode(&b[..100]).is_err());
    }
}
