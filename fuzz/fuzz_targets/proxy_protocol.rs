//! The PROXY header parser, fed any bytes one prefix at a time as a socket would deliver them,
//! must never panic, must wait (`Incomplete`) until its answer is final, and must then give the
//! same answer for every longer input: more bytes never change a verdict.

#![no_main]

use libfuzzer_sys::fuzz_target;
use wsgate::proxy_protocol::{parse, Parsed, MAX_V1_HEADER, MAX_V2_HEADER};

fuzz_target!(|data: &[u8]| {
    // Past the largest header every verdict is final; longer inputs only slow the search.
    let data = &data[..data.len().min(MAX_V2_HEADER + 64)];
    let mut verdict: Option<(usize, Parsed)> = None;
    for end in 0..=data.len() {
        let parsed = parse(&data[..end]);
        match verdict {
            None if parsed == Parsed::Incomplete => {}
            None => verdict = Some((end, parsed)),
            Some((_, first)) => assert_eq!(parsed, first, "a verdict changed at {end} bytes"),
        }
    }
    match verdict {
        Some((at, Parsed::Done { header_len, .. })) => {
            assert_eq!(at, header_len, "done before or after the header's end");
            let bound = if data[0] == b'P' {
                MAX_V1_HEADER
            } else {
                MAX_V2_HEADER
            };
            assert!(header_len <= bound, "a header of {header_len} bytes");
        }
        Some((at, _)) => assert!(at <= MAX_V2_HEADER, "malformed only after {at} bytes"),
        // Still waiting: only a prefix shorter than the largest header may be incomplete.
        None => assert!(
            data.len() < MAX_V2_HEADER,
            "incomplete after {} bytes",
            data.len()
        ),
    }
});
