//! A safe wrapper over zlib's inflate (`libz-rs-sys`), with the calls zran-style random access
//! needs and flate2 does not expose: `inflate(Z_BLOCK)`, `data_type`, `inflatePrime`,
//! `inflateSetDictionary`, `inflateGetDictionary`, `inflateReset2`.
//!
//! This is the crate's only `unsafe` code. Every call passes a `z_stream` that this type owns,
//! that was initialised by `inflateInit2_` and lives in a `Box` (zlib keeps a back pointer to it,
//! so it must not move), and in/out pointers derived from slices that outlive the call.
#![allow(unsafe_code)]

use crate::IndexError;
use libz_rs_sys as z;

/// `windowBits` for a gzip wrapper (header and trailer parsed by zlib).
pub const GZIP: i32 = 31;
/// `windowBits` for raw deflate.
pub const RAW: i32 = -15;
/// Size of deflate's history window.
pub const WINDOW_SIZE: usize = 32 * 1024;

/// Outcome of one inflate call.
#[derive(Debug, Clone, Copy)]
pub struct Step {
    pub consumed: usize,
    pub produced: usize,
    /// The end of a gzip member (or raw deflate stream) was reached.
    pub stream_end: bool,
}

/// An inflate stream.
pub struct Inflater {
    strm: Box<z::z_stream>,
}

impl std::fmt::Debug for Inflater {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inflater").field("data_type", &self.strm.data_type).finish()
    }
}

fn zerr(what: &str, code: i32) -> IndexError {
    IndexError::Compressed(format!("{what} failed (zlib code {code})"))
}

impl Inflater {
    /// A new stream with `window_bits` ([`GZIP`] or [`RAW`]).
    pub fn new(window_bits: i32) -> Result<Self, IndexError> {
        let mut strm = Box::new(z::z_stream::default());
        // SAFETY: `strm` is a default-initialised z_stream (null allocators select the built-in
        // allocator); version and size identify this library's own struct layout.
        let rc = unsafe {
            z::inflateInit2_(&raw mut *strm, window_bits, z::zlibVersion(), std::mem::size_of::<z::z_stream>() as i32)
        };
        if rc != z::Z_OK {
            return Err(zerr("inflateInit2", rc));
        }
        Ok(Self { strm })
    }

    /// Resets the stream for a new member/stream with `window_bits`.
    pub fn reset(&mut self, window_bits: i32) -> Result<(), IndexError> {
        // SAFETY: the stream was initialised in `new`.
        let rc = unsafe { z::inflateReset2(&raw mut *self.strm, window_bits) };
        if rc == z::Z_OK { Ok(()) } else { Err(zerr("inflateReset2", rc)) }
    }

    /// Inserts `bits` bits of `value` into the input bit buffer (resuming mid-byte).
    pub fn prime(&mut self, bits: i32, value: i32) -> Result<(), IndexError> {
        // SAFETY: the stream was initialised in `new`.
        let rc = unsafe { z::inflatePrime(&raw mut *self.strm, bits, value) };
        if rc == z::Z_OK { Ok(()) } else { Err(zerr("inflatePrime", rc)) }
    }

    /// Sets the history window (raw streams only).
    pub fn set_dictionary(&mut self, dict: &[u8]) -> Result<(), IndexError> {
        let len = u32::try_from(dict.len()).map_err(|_| zerr("inflateSetDictionary", -2))?;
        // SAFETY: `dict` is valid for `len` bytes during the call; zlib copies it.
        let rc = unsafe { z::inflateSetDictionary(&raw mut *self.strm, dict.as_ptr(), len) };
        if rc == z::Z_OK { Ok(()) } else { Err(zerr("inflateSetDictionary", rc)) }
    }

    /// The current history window (up to 32 KiB of the most recent output).
    pub fn dictionary(&self) -> Result<Vec<u8>, IndexError> {
        let mut buf = vec![0u8; WINDOW_SIZE];
        let mut len: u32 = 0;
        // SAFETY: `buf` has room for 32 KiB, the most zlib ever copies.
        let rc = unsafe { z::inflateGetDictionary(&raw const *self.strm, buf.as_mut_ptr(), &raw mut len) };
        if rc != z::Z_OK {
            return Err(zerr("inflateGetDictionary", rc));
        }
        buf.truncate(len as usize);
        Ok(buf)
    }

    /// zlib's `data_type` after the last call: bit 7 = stopped at a block boundary, bit 6 = that
    /// block was the last, bits 0-2 = unused bits in the last input byte consumed.
    pub fn data_type(&self) -> i32 {
        self.strm.data_type
    }

    /// One inflate call with `flush` (`Z_NO_FLUSH` or `Z_BLOCK`).
    pub fn inflate(&mut self, input: &[u8], output: &mut [u8], flush: i32) -> Result<Step, IndexError> {
        let avail_in = u32::try_from(input.len()).unwrap_or(u32::MAX);
        let avail_out = u32::try_from(output.len()).unwrap_or(u32::MAX);
        self.strm.next_in = input.as_ptr();
        self.strm.avail_in = avail_in;
        self.strm.next_out = output.as_mut_ptr();
        self.strm.avail_out = avail_out;
        // SAFETY: next_in/next_out point into slices valid for avail_in/avail_out bytes for the
        // duration of the call; the pointers are cleared below before the slices go away.
        let rc = unsafe { z::inflate(&raw mut *self.strm, flush) };
        let consumed = (avail_in - self.strm.avail_in) as usize;
        let produced = (avail_out - self.strm.avail_out) as usize;
        self.strm.next_in = std::ptr::null();
        self.strm.avail_in = 0;
        self.strm.next_out = std::ptr::null_mut();
        self.strm.avail_out = 0;
        match rc {
            z::Z_OK | z::Z_BUF_ERROR => Ok(Step { consumed, produced, stream_end: false }),
            z::Z_STREAM_END => Ok(Step { consumed, produced, stream_end: true }),
            z::Z_NEED_DICT => Err(IndexError::Compressed("stream needs a preset dictionary".into())),
            code => Err(IndexError::Compressed(format!("inflate failed (zlib code {code})"))),
        }
    }
}

impl Drop for Inflater {
    fn drop(&mut self) {
        // SAFETY: the stream was initialised in `new` and is ended exactly once.
        unsafe {
            z::inflateEnd(&raw mut *self.strm);
        }
    }
}

// SAFETY: the z_stream is owned exclusively by this value and holds no thread-bound state.
#[allow(unsafe_code)]
unsafe impl Send for Inflater {}
