//! RFC 6455 frames, seen from a proxy: an incremental header tracker fed whatever each read
//! returns (split anywhere), and an encoder for the few frames wsgate writes itself.
//!
//! The tracker never holds payload. It keeps at most the 14 header bytes that a read cut in
//! two, and tells its caller where each header ends and each frame ends, so that the caller
//! can count, check limits, or insert a frame of its own at a boundary. Pure: no IO.

/// Opcodes (RFC 6455 §5.2).
pub const CONTINUATION: u8 = 0x0;
pub const TEXT: u8 = 0x1;
pub const BINARY: u8 = 0x2;
pub const CLOSE: u8 = 0x8;
pub const PING: u8 = 0x9;
pub const PONG: u8 = 0xA;

/// RSV1, the bit permessage-deflate claims (RFC 7692 §6).
pub const RSV1: u8 = 0b100;

/// The longest a frame header can be: 2 + 8 length bytes + 4 mask bytes.
pub const MAX_HEADER_LEN: usize = 14;

/// Control frames carry at most this much payload (RFC 6455 §5.5).
pub const MAX_CONTROL_PAYLOAD: usize = 125;

/// Close codes wsgate sends (RFC 6455 §7.4.1, and the IANA registry for 1012).
pub mod close_code {
    pub const NORMAL: u16 = 1000;
    pub const GOING_AWAY: u16 = 1001;
    pub const PROTOCOL_ERROR: u16 = 1002;
    pub const MESSAGE_TOO_BIG: u16 = 1009;
    pub const SERVICE_RESTART: u16 = 1012;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub fin: bool,
    /// RSV1..RSV3 as the low three bits.
    pub rsv: u8,
    pub opcode: u8,
    pub mask: Option<[u8; 4]>,
    pub payload_len: u64,
}

impl Header {
    pub fn is_control(&self) -> bool {
        self.opcode & 0x8 != 0
    }

    /// Neither a data opcode (0-2) nor a control one (8-10): reserved by RFC 6455 §5.2.
    pub fn is_reserved_opcode(&self) -> bool {
        matches!(self.opcode, 0x3..=0x7 | 0xB..=0xF)
    }

    /// Parses a whole header from the start of `bytes`; `None` when more bytes are needed.
    /// Returns the header and its length.
    pub fn parse(bytes: &[u8]) -> Option<(Header, usize)> {
        let [first, second, ..] = *bytes else {
            return None;
        };
        let (extended, len7) = match second & 0x7f {
            126 => (2, 0),
            127 => (8, 0),
            len => (0, u64::from(len)),
        };
        let masked = second & 0x80 != 0;
        let len = 2 + extended + if masked { 4 } else { 0 };
        if bytes.len() < len {
            return None;
        }
        let payload_len = match extended {
            0 => len7,
            n => bytes[2..2 + n]
                .iter()
                .fold(0, |acc, b| acc << 8 | u64::from(*b)),
        };
        let mask = masked.then(|| {
            let at = 2 + extended;
            [bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]
        });
        let header = Header {
            fin: first & 0x80 != 0,
            rsv: (first >> 4) & 0b111,
            opcode: first & 0x0f,
            mask,
            payload_len,
        };
        Some((header, len))
    }
}

/// What `Tracker::advance` stopped at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// A header ended exactly where the consumed bytes end; its payload follows.
    Header(Header),
    /// A frame's last payload byte ended exactly there: the stream is at a boundary.
    FrameEnd,
}

/// Follows frame boundaries through one direction of a stream.
#[derive(Debug, Clone, Default)]
pub struct Tracker {
    /// Bytes of a header that a read cut in two.
    head: [u8; MAX_HEADER_LEN],
    head_len: u8,
    /// The frame whose payload is being skipped, and how much of it is left.
    current: Option<Header>,
    payload_left: u64,
}

impl Tracker {
    pub fn new() -> Tracker {
        Tracker::default()
    }

    /// Between two frames: nothing of a header or payload is outstanding.
    pub fn at_boundary(&self) -> bool {
        self.current.is_none() && self.head_len == 0
    }

    /// The frame whose payload is passing, if a header has been read and its payload has not
    /// ended.
    pub fn current(&self) -> Option<&Header> {
        self.current.as_ref()
    }

    /// How many payload bytes of the current frame have gone by (the offset into its mask).
    pub fn payload_offset(&self) -> u64 {
        self.current
            .map_or(0, |header| header.payload_len - self.payload_left)
    }

    /// Consumes `data` up to the next event, returning how many bytes it took and the event
    /// found there, or all of `data` and `None`. A zero-length payload ends (`FrameEnd`) on
    /// the call after its `Header`, having consumed nothing.
    pub fn advance(&mut self, data: &[u8]) -> (usize, Option<Event>) {
        if self.current.is_some() {
            if self.payload_left == 0 {
                self.current = None;
                return (0, Some(Event::FrameEnd));
            }
            let take = self.payload_left.min(data.len() as u64);
            self.payload_left -= take;
            if self.payload_left == 0 {
                self.current = None;
                return (take as usize, Some(Event::FrameEnd));
            }
            return (take as usize, None);
        }
        if self.head_len == 0 {
            // The common case: a whole header within this read is parsed in place.
            if let Some((header, len)) = Header::parse(data) {
                self.start(header);
                return (len, Some(Event::Header(header)));
            }
        }
        // Gather header bytes one read at a time; at most 14 are ever kept.
        let have = usize::from(self.head_len);
        let take = (MAX_HEADER_LEN - have).min(data.len());
        self.head[have..have + take].copy_from_slice(&data[..take]);
        match Header::parse(&self.head[..have + take]) {
            Some((header, len)) => {
                self.head_len = 0;
                self.start(header);
                (len - have, Some(Event::Header(header)))
            }
            None => {
                self.head_len = (have + take) as u8;
                (take, None)
            }
        }
    }

    fn start(&mut self, header: Header) {
        self.current = Some(header);
        self.payload_left = header.payload_len;
    }
}

/// XORs `data` with `key`, as if `data` began `offset` bytes into a masked payload. Masking
/// and unmasking are the same operation.
pub fn apply_mask(data: &mut [u8], key: [u8; 4], offset: u64) {
    let shift = (offset % 4) as usize;
    for (i, byte) in data.iter_mut().enumerate() {
        *byte ^= key[(i + shift) % 4];
    }
}

/// Appends one final frame to `out`; `mask` is required from a client (RFC 6455 §5.3) and
/// forbidden from a server.
pub fn encode(out: &mut Vec<u8>, opcode: u8, payload: &[u8], mask: Option<[u8; 4]>) {
    out.reserve(MAX_HEADER_LEN + payload.len());
    out.push(0x80 | opcode);
    let mask_bit = if mask.is_some() { 0x80 } else { 0 };
    match payload.len() {
        len @ 0..=125 => out.push(mask_bit | len as u8),
        len @ 126..=0xffff => {
            out.push(mask_bit | 126);
            out.extend_from_slice(&(len as u16).to_be_bytes());
        }
        len => {
            out.push(mask_bit | 127);
            out.extend_from_slice(&(len as u64).to_be_bytes());
        }
    }
    let start = out.len() + mask.map_or(0, |_| 4);
    if let Some(key) = mask {
        out.extend_from_slice(&key);
    }
    out.extend_from_slice(payload);
    if let Some(key) = mask {
        apply_mask(&mut out[start..], key, 0);
    }
}

/// Appends a Close frame with `code` and a UTF-8 `reason` cut to fit a control frame.
pub fn encode_close(out: &mut Vec<u8>, code: u16, reason: &str, mask: Option<[u8; 4]>) {
    let mut payload = [0u8; MAX_CONTROL_PAYLOAD];
    payload[..2].copy_from_slice(&code.to_be_bytes());
    let mut reason_len = reason.len().min(MAX_CONTROL_PAYLOAD - 2);
    while !reason.is_char_boundary(reason_len) {
        reason_len -= 1;
    }
    payload[2..2 + reason_len].copy_from_slice(&reason.as_bytes()[..reason_len]);
    encode(out, CLOSE, &payload[..2 + reason_len], mask);
}

/// The status code at the start of an (unmasked) Close payload; an empty payload has none.
pub fn close_code(payload: &[u8]) -> Option<u16> {
    match payload {
        [high, low, ..] => Some(u16::from_be_bytes([*high, *low])),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every header and frame end in `stream`, by offset, feeding it in `chunk`-sized reads.
    fn events(stream: &[u8], chunk: usize) -> Vec<(usize, Event)> {
        let mut tracker = Tracker::new();
        let mut found = Vec::new();
        let mut offset = 0;
        for piece in stream.chunks(chunk) {
            let mut rest = piece;
            // Each step consumes bytes or reports an event; a piece ends within 2 steps a byte.
            for _ in 0..=2 * piece.len() + 2 {
                let (taken, event) = tracker.advance(rest);
                offset += taken;
                rest = &rest[taken..];
                match event {
                    Some(event) => found.push((offset, event)),
                    None if rest.is_empty() => break,
                    None => {}
                }
            }
        }
        // A zero-length frame that ends the stream ends on one more call.
        if let (0, Some(event)) = tracker.advance(&[]) {
            found.push((offset, event));
        }
        found
    }

    #[test]
    fn encode_then_parse_round_trips_every_length_form() {
        for len in [0usize, 1, 125, 126, 0xffff, 0x10000] {
            for mask in [None, Some([1, 2, 3, 4])] {
                let payload: Vec<u8> = (0..len).map(|i| i as u8).collect();
                let mut out = Vec::new();
                encode(&mut out, BINARY, &payload, mask);
                let (header, header_len) = Header::parse(&out).unwrap();
                assert_eq!(header.payload_len, len as u64);
                assert_eq!(header.mask, mask);
                assert!(header.fin);
                assert_eq!(header.opcode, BINARY);
                assert_eq!(out.len(), header_len + len);
                let mut body = out[header_len..].to_vec();
                if let Some(key) = mask {
                    apply_mask(&mut body, key, 0);
                }
                assert_eq!(body, payload, "len {len}");
                assert_eq!(Header::parse(&out[..header_len - 1]), None);
            }
        }
    }

    #[test]
    fn tracker_finds_the_same_boundaries_whatever_the_read_size() {
        let mut stream = Vec::new();
        encode(&mut stream, TEXT, b"hello", Some([9, 8, 7, 6]));
        encode(&mut stream, PING, b"", None);
        encode(&mut stream, BINARY, &[0x88; 300], None);
        encode_close(
            &mut stream,
            close_code::GOING_AWAY,
            "bye",
            Some([1, 1, 1, 1]),
        );
        let whole = events(&stream, stream.len());
        let ends: Vec<usize> = whole
            .iter()
            .filter(|(_, e)| *e == Event::FrameEnd)
            .map(|(at, _)| *at)
            .collect();
        assert_eq!(ends, [11, 13, 13 + 4 + 300, stream.len()]);
        for chunk in 1..40 {
            assert_eq!(events(&stream, chunk), whole, "chunk {chunk}");
        }
    }

    #[test]
    fn payload_offset_unmasks_a_payload_read_in_pieces() {
        let key = [0xa1, 0xb2, 0xc3, 0xd4];
        let mut stream = Vec::new();
        encode_close(&mut stream, 4001, "split", Some(key));
        let mut tracker = Tracker::new();
        let (taken, event) = tracker.advance(&stream[..3]);
        assert_eq!((taken, event), (3, None));
        let (taken, event) = tracker.advance(&stream[3..]);
        assert!(matches!(event, Some(Event::Header(h)) if h.opcode == CLOSE));
        let mut payload = Vec::new();
        for piece in stream[3 + taken..].chunks(3) {
            let mut bytes = piece.to_vec();
            apply_mask(&mut bytes, key, tracker.payload_offset());
            tracker.advance(piece);
            payload.extend(bytes);
        }
        assert_eq!(close_code(&payload), Some(4001));
        assert_eq!(&payload[2..], b"split");
        assert!(tracker.at_boundary());
    }

    #[test]
    fn close_reason_is_cut_on_a_char_boundary() {
        let mut out = Vec::new();
        encode_close(&mut out, 1001, &"é".repeat(100), None);
        let (header, len) = Header::parse(&out).unwrap();
        assert!(header.payload_len as usize <= MAX_CONTROL_PAYLOAD);
        assert!(std::str::from_utf8(&out[len + 2..]).is_ok());
    }

    #[test]
    fn header_fields_are_read() {
        let (header, len) = Header::parse(&[0b0100_0001, 0x05]).unwrap();
        assert_eq!(len, 2);
        assert!(!header.fin);
        assert_eq!(header.rsv, RSV1);
        assert_eq!(header.opcode, TEXT);
        assert!(!header.is_control());
        let (header, _) = Header::parse(&[0x8B, 0x00]).unwrap();
        assert!(header.is_reserved_opcode() && header.is_control());
    }
}

#[cfg(test)]
#[path = "frame_props.rs"]
mod props;
