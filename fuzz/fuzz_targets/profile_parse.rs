//! Access profiles as a registry may hand them over, on arbitrary bytes: the profile JSON and
//! the manifest that carries it. Errors are fine; panics are not, and a parsed profile must
//! survive its own encoding.
#![no_main]

use clip_index::profile::{AccessProfile, profile_blob};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(p) = AccessProfile::parse(data) {
        let _ = p.check_image("sha256:0000000000000000000000000000000000000000000000000000000000000000");
        let again = AccessProfile::parse(&p.to_json()).expect("an encoded profile parses");
        assert_eq!(again.to_json(), p.to_json());
        let _ = p.reads_of("sha256:0000000000000000000000000000000000000000000000000000000000000000");
    }
    let _ = profile_blob(data, "sha256:0000000000000000000000000000000000000000000000000000000000000000");
});
