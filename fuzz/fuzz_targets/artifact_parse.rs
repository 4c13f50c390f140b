//! What a registry hands clip about an image's index, on arbitrary bytes: the index artifact
//! manifest, and a cosign signature payload. Errors are fine; panics are not, and whatever
//! parses must survive its own encoding.
#![no_main]

use clip_index::artifact::{BlobKind, IndexArtifact};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(a) = IndexArtifact::parse(data) {
        let _ = a.subject_digest();
        for layer in a.indexed_layers() {
            let _ = a.blob_for(&layer, BlobKind::Index);
            let _ = a.blob_for(&layer, BlobKind::Windows);
        }
        let _ = a.referenced_blobs();
        let bytes = a.to_bytes().expect("a parsed artifact encodes");
        let again = IndexArtifact::parse(&bytes).expect("an encoded artifact parses");
        assert_eq!(again.blobs(), a.blobs());
    }
    let _ = clip_trust::payload::signed_digest(data);
});
