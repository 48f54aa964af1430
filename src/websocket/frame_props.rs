//! Property tests of the frame tracker against a reference parser.
//!
//! The reference reads a whole buffer front to back with a cursor and shares no code with
//! `Header::parse` or `Tracker`; the tracker is then fed the same bytes cut into random reads
//! (empty and 1-byte ones included) and must report the same events at the same offsets.

use std::ops::Range;

use proptest::prelude::*;

use super::*;

/// Keeps a case's stream small enough that 256 cases run in about a second in debug.
const MAX_STREAM: usize = 300 * 1024;

/// One frame to write: every header field free, including reserved opcodes and RSV bits.
#[derive(Debug, Clone)]
struct Spec {
    fin: bool,
    rsv: u8,
    opcode: u8,
    mask: Option<[u8; 4]>,
    len: usize,
    /// 0: the shortest length form; 1: at least the 16-bit one; 2: the 64-bit one. Longer forms
    /// than needed break RFC 6455's "minimal" rule, but a proxy must still follow them.
    form: u8,
    /// Payload bytes come from this seed, so a 64 KiB payload costs one `u64` to generate.
    seed: u64,
}

impl Spec {
    fn payload(&self) -> Vec<u8> {
        let mut state = self.seed | 1;
        (0..self.len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect()
    }

    /// Writes the frame by hand, not with `encode` (which only writes final, minimal frames).
    fn write(&self, out: &mut Vec<u8>) {
        out.push(u8::from(self.fin) << 7 | self.rsv << 4 | self.opcode);
        let mask_bit = if self.mask.is_some() { 0x80 } else { 0 };
        if self.len <= 125 && self.form == 0 {
            out.push(mask_bit | self.len as u8);
        } else if self.len <= 0xffff && self.form <= 1 {
            out.push(mask_bit | 126);
            out.extend_from_slice(&(self.len as u16).to_be_bytes());
        } else {
            out.push(mask_bit | 127);
            out.extend_from_slice(&(self.len as u64).to_be_bytes());
        }
        let payload = self.payload();
        match self.mask {
            Some(key) => {
                out.extend_from_slice(&key);
                out.extend(payload.iter().zip(key.iter().cycle()).map(|(b, k)| b ^ k));
            }
            None => out.extend_from_slice(&payload),
        }
    }
}

/// A frame as the reference found it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Found {
    start: usize,
    header: Header,
    /// The payload's place in the buffer; its end may lie past the buffer's end.
    payload: Range<u64>,
}

/// Every frame whose header lies wholly within `buf`, read front to back.
fn reference_parse(buf: &[u8]) -> Vec<Found> {
    let mut found = Vec::new();
    let mut at = 0usize;
    // Each pass consumes at least the 2-byte header start, so this ends.
    while at + 2 <= buf.len() {
        let start = at;
        let (b0, b1) = (buf[at], buf[at + 1]);
        at += 2;
        let width = match b1 & 0x7f {
            126 => 2,
            127 => 8,
            _ => 0,
        };
        let mask_len = if b1 & 0x80 != 0 { 4 } else { 0 };
        if buf.len() - at < width + mask_len {
            break;
        }
        let mut payload_len = u64::from(b1 & 0x7f);
        if width > 0 {
            payload_len = 0;
            for byte in &buf[at..at + width] {
                payload_len = payload_len * 256 + u64::from(*byte);
            }
        }
        at += width;
        let mask = (mask_len == 4).then(|| [buf[at], buf[at + 1], buf[at + 2], buf[at + 3]]);
        at += mask_len;
        let header = Header {
            fin: b0 >= 0x80,
            rsv: (b0 & 0x70) >> 4,
            opcode: b0 & 0x0f,
            mask,
            payload_len,
        };
        let end = (at as u64).saturating_add(payload_len);
        found.push(Found {
            start,
            header,
            payload: at as u64..end,
        });
        if end > buf.len() as u64 {
            break;
        }
        at = end as usize;
    }
    found
}

/// The events a tracker must report for `frames` in a buffer of `len` bytes, by offset.
fn expected_events(frames: &[Found], len: usize) -> Vec<(usize, Event)> {
    let mut events = Vec::new();
    for frame in frames {
        events.push((frame.payload.start as usize, Event::Header(frame.header)));
        if frame.payload.end <= len as u64 {
            events.push((frame.payload.end as usize, Event::FrameEnd));
        }
    }
    events
}

/// What feeding a tracker produced.
struct Fed {
    events: Vec<(usize, Event)>,
    /// The unmasked payload bytes of each frame whose header was reported, in order.
    payloads: Vec<Vec<u8>>,
}

/// Feeds `stream` to a tracker in reads of `reads` sizes (cycled), checking at every call what
/// can be checked locally: `at_boundary`, `current` and `payload_offset` against the reference.
/// `drain`: after a read is used up, keep calling while events come (a zero-length frame's end)
/// rather than leave them for the next read.
fn feed(stream: &[u8], frames: &[Found], reads: &[usize], drain: bool) -> Fed {
    let mut tracker = Tracker::new();
    let mut fed = Fed {
        events: Vec::new(),
        payloads: Vec::new(),
    };
    let mut offset = 0;
    let (mut headers, mut ends) = (0usize, 0usize);
    let mut sizes = reads.iter().cycle();
    let mut last = false;
    // Every cycle of `reads` takes at least one byte (the strategy ensures a non-zero size), so
    // the stream is used up within this many reads; one more, empty, flushes a trailing event.
    for _ in 0..=reads.len() * (stream.len() + 1) {
        let size = *sizes.next().expect("reads is not empty");
        let piece = &stream[offset..stream.len().min(offset + size)];
        let mut rest = piece;
        // A call consumes bytes or reports an event, and each byte brings at most two events.
        for _ in 0..=2 * piece.len() + 2 {
            let before = (tracker.current().copied(), tracker.payload_offset());
            let (taken, event) = tracker.advance(rest);
            assert!(taken <= rest.len(), "took {taken} of {}", rest.len());
            if let (Some(header), Some(last)) = (before.0, fed.payloads.last_mut()) {
                // Bytes taken while a frame was current are its payload, at `payload_offset`.
                let mut bytes = rest[..taken].to_vec();
                if let Some(key) = header.mask {
                    apply_mask(&mut bytes, key, before.1);
                }
                last.extend(bytes);
            }
            offset += taken;
            rest = &rest[taken..];
            match event {
                Some(Event::Header(_)) => {
                    headers += 1;
                    fed.payloads.push(Vec::new());
                }
                Some(Event::FrameEnd) => ends += 1,
                None => {}
            }
            if let Some(event) = event {
                fed.events.push((offset, event));
            }
            let boundary = if ends == 0 {
                0
            } else {
                frames[ends - 1].payload.end as usize
            };
            assert_eq!(
                tracker.at_boundary(),
                headers == ends && offset == boundary,
                "at_boundary at offset {offset} ({headers} headers, {ends} ends)"
            );
            match (headers > ends).then(|| &frames[headers - 1]) {
                Some(frame) => {
                    assert_eq!(tracker.current(), Some(&frame.header), "at {offset}");
                    assert_eq!(
                        tracker.payload_offset(),
                        offset as u64 - frame.payload.start,
                        "payload_offset at {offset}"
                    );
                }
                None => assert_eq!(tracker.current(), None, "at {offset}"),
            }
            if rest.is_empty() && (event.is_none() || !drain) {
                break;
            }
        }
        if last {
            break;
        }
        last = offset == stream.len();
    }
    assert_eq!(offset, stream.len(), "the whole stream was consumed");
    fed
}

fn payload_len() -> impl Strategy<Value = usize> {
    prop_oneof![
        2 => Just(0),
        6 => 1..=125usize,
        1 => Just(125),
        1 => Just(126),
        2 => 127..=0xffffusize,
        1 => Just(0xffff),
        1 => 0x10000..=0x10400usize,
    ]
}

fn spec() -> impl Strategy<Value = Spec> {
    (
        any::<bool>(),
        0..8u8,
        0..16u8,
        any::<Option<[u8; 4]>>(),
        payload_len(),
        prop_oneof![6 => Just(0u8), 1 => Just(1), 1 => Just(2)],
        any::<u64>(),
    )
        .prop_map(|(fin, rsv, opcode, mask, len, form, seed)| Spec {
            fin,
            rsv,
            opcode,
            mask,
            len,
            form,
            seed,
        })
}

/// Read sizes, at least one of them non-zero.
fn reads() -> impl Strategy<Value = Vec<usize>> {
    let size = prop_oneof![
        1 => Just(0usize),
        3 => Just(1),
        3 => 2..=16usize,
        2 => 17..=600usize,
        2 => 601..=80_000usize,
    ];
    prop::collection::vec(size, 1..24)
        .prop_filter("a read takes bytes", |r| r.iter().any(|&n| n > 0))
}

/// The frames of `specs` back to back, stopping before `MAX_STREAM` (but keeping the first).
fn write_all(specs: &[Spec]) -> (Vec<u8>, usize) {
    let mut stream = Vec::new();
    let mut count = 0;
    for spec in specs {
        if count > 0 && stream.len() + spec.len + MAX_HEADER_LEN > MAX_STREAM {
            break;
        }
        spec.write(&mut stream);
        count += 1;
    }
    (stream, count)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn tracker_agrees_with_the_reference_however_the_stream_is_cut(
        specs in prop::collection::vec(spec(), 1..16),
        reads in reads(),
        drain in any::<bool>(),
    ) {
        let (stream, count) = write_all(&specs);
        let specs = &specs[..count];
        let frames = reference_parse(&stream);
        // The reference reads back what was written, so it can stand for the truth below.
        prop_assert_eq!(frames.len(), specs.len());
        for (frame, spec) in frames.iter().zip(specs) {
            let header = frame.header;
            prop_assert_eq!(
                (header.fin, header.rsv, header.opcode, header.mask, header.payload_len),
                (spec.fin, spec.rsv, spec.opcode, spec.mask, spec.len as u64)
            );
        }
        prop_assert_eq!(frames.last().map(|f| f.payload.end), Some(stream.len() as u64));

        let fed = feed(&stream, &frames, &reads, drain);
        prop_assert_eq!(&fed.events, &expected_events(&frames, stream.len()));
        prop_assert_eq!(fed.payloads.len(), specs.len());
        for (i, (got, spec)) in fed.payloads.iter().zip(specs).enumerate() {
            prop_assert!(*got == spec.payload(), "payload of frame {} differs", i);
        }
    }

    #[test]
    fn header_parse_agrees_with_the_reference_and_waits_for_every_byte(
        spec in spec(),
    ) {
        let mut bytes = Vec::new();
        spec.write(&mut bytes);
        let frame = &reference_parse(&bytes)[0];
        let header_len = (frame.payload.start - frame.start as u64) as usize;
        prop_assert_eq!(Header::parse(&bytes), Some((frame.header, header_len)));
        for cut in 0..header_len {
            prop_assert_eq!(Header::parse(&bytes[..cut]), None, "cut at {}", cut);
        }
    }

    /// Any bytes at all (a truncated last frame, absurd 64-bit lengths): no panic, and the same
    /// events as the reference up to where the bytes stop.
    #[test]
    fn tracker_follows_arbitrary_bytes(
        bytes in prop::collection::vec(any::<u8>(), 0..512),
        reads in reads(),
        drain in any::<bool>(),
    ) {
        let frames = reference_parse(&bytes);
        let fed = feed(&bytes, &frames, &reads, drain);
        prop_assert_eq!(&fed.events, &expected_events(&frames, bytes.len()));
    }
}
