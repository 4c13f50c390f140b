//! `clip-index`: the only crate that knows the CLIP index's bytes.
