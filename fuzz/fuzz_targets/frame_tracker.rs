//! The frame tracker, fed any bytes in two parts and random-sized reads, must never panic and
//! must report what `Header::parse` finds reading the whole buffer front to back.

#![no_main]

use libfuzzer_sys::fuzz_target;
use wsgate::websocket::frame::{Event, Header, Tracker};

fuzz_target!(|data: &[u8]| {
    // The first two bytes pick the split point, the third seeds the read sizes.
    let [high, low, seed, stream @ ..] = data else {
        return;
    };
    let split = usize::from(u16::from_be_bytes([*high, *low])) % (stream.len() + 1);
    let (first, second) = stream.split_at(split);
    let mut feeder = Feeder {
        tracker: Tracker::new(),
        offset: 0,
        events: Vec::new(),
        rng: u32::from(*seed) << 8 | 0x9e,
    };
    feeder.feed(first);
    feeder.feed(second);
    // An empty read flushes the end of a zero-length last frame.
    feeder.read(&[]);
    assert_eq!(feeder.offset, stream.len());
    assert_eq!(feeder.events, whole(stream));
});

/// Every header and frame end in `buf` by offset, parsing the whole buffer with `Header::parse`.
fn whole(buf: &[u8]) -> Vec<(usize, Event)> {
    let mut events = Vec::new();
    let mut at = 0;
    while let Some((header, len)) = Header::parse(&buf[at..]) {
        at += len;
        events.push((at, Event::Header(header)));
        let left = (buf.len() - at) as u64;
        if header.payload_len > left {
            break;
        }
        at += header.payload_len as usize;
        events.push((at, Event::FrameEnd));
    }
    events
}

struct Feeder {
    tracker: Tracker,
    offset: usize,
    events: Vec<(usize, Event)>,
    rng: u32,
}

impl Feeder {
    /// Feeds `part` in reads of 0 to 31 bytes (xorshift), then whatever a bound leaves.
    fn feed(&mut self, mut part: &[u8]) {
        for _ in 0..=2 * part.len() {
            if part.is_empty() {
                return;
            }
            self.rng ^= self.rng << 13;
            self.rng ^= self.rng >> 17;
            self.rng ^= self.rng << 5;
            let size = (self.rng % 32) as usize;
            let (piece, rest) = part.split_at(size.min(part.len()));
            self.read(piece);
            part = rest;
        }
        self.read(part);
    }

    /// One read: calls the tracker until it has taken all of `piece` and has no event left.
    fn read(&mut self, mut piece: &[u8]) {
        // A call takes bytes or reports an event, and a byte brings at most two events.
        for _ in 0..=2 * piece.len() + 2 {
            let (taken, event) = self.tracker.advance(piece);
            piece = &piece[taken..];
            self.offset += taken;
            match event {
                Some(event) => self.events.push((self.offset, event)),
                None => {
                    assert!(piece.is_empty(), "no event, yet bytes left");
                    return;
                }
            }
            if event == Some(Event::FrameEnd) {
                assert!(self.tracker.at_boundary());
            }
        }
        panic!("the tracker stopped making progress");
    }
}
