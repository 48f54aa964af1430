//! What one direction of a WebSocket tunnel knows about its frames: counts, limits, strict
//! checks, the Close each peer sent, and the control frames wsgate inserts at boundaries.
//! Pure: it turns each read into the bytes to write on, and never does IO.

use crate::websocket::frame::{self, close_code, Event, Header, Tracker};

use super::Side;

/// Payload of the Pings wsgate sends; the Pong that echoes it is wsgate's and goes no further.
pub(super) const PING_TOKEN_LEN: usize = 8;

/// Per-direction rules, fixed for the tunnel's life.
#[derive(Debug, Clone, Copy)]
pub(super) struct Rules {
    /// The peer this direction reads from.
    pub from: Side,
    /// `u64::MAX` for no limit: a word, not an `Option`'s two, in every tunnel.
    pub max_frame: u64,
    pub max_message: u64,
    pub strict: bool,
    /// permessage-deflate was negotiated, so RSV1 may be set on a message's first frame.
    pub deflate: bool,
    /// wsgate pings this direction's source, so Pongs carrying its token are its own.
    pub pinged: bool,
}

/// A frame wsgate writes toward this direction's destination at its next boundary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Control {
    Ping,
    Close(u16),
}

/// Why a direction's source is being closed on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Violation {
    /// A frame's payload over `max_frame`.
    FrameTooBig,
    /// A message's payload, fragments together, over `max_message`.
    MessageTooBig,
    /// Strict mode: what was wrong.
    Protocol(ProtocolError),
}

/// What strict mode refuses (RFC 6455 §5.1-§5.5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProtocolError {
    UnmaskedClientFrame,
    MaskedServerFrame,
    ReservedOpcode,
    ReservedBits,
    ControlFrameTooLong,
    FragmentedControlFrame,
    BadFragmentation,
}

impl ProtocolError {
    pub fn as_str(self) -> &'static str {
        match self {
            ProtocolError::UnmaskedClientFrame => "unmasked_client_frame",
            ProtocolError::MaskedServerFrame => "masked_server_frame",
            ProtocolError::ReservedOpcode => "reserved_opcode",
            ProtocolError::ReservedBits => "reserved_bits",
            ProtocolError::ControlFrameTooLong => "control_frame_too_long",
            ProtocolError::FragmentedControlFrame => "fragmented_control_frame",
            ProtocolError::BadFragmentation => "bad_fragmentation",
        }
    }
}

impl Violation {
    pub fn as_str(self) -> &'static str {
        match self {
            Violation::FrameTooBig => "max_frame",
            Violation::MessageTooBig => "max_message",
            Violation::Protocol(what) => what.as_str(),
        }
    }

    /// What the peer that broke the rule is told (RFC 6455 §7.4.1).
    pub fn close_code(self) -> u16 {
        match self {
            Violation::FrameTooBig | Violation::MessageTooBig => close_code::MESSAGE_TOO_BIG,
            Violation::Protocol(_) => close_code::PROTOCOL_ERROR,
        }
    }
}

/// Frames, messages and the Close code one peer sent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FrameCounts {
    pub frames: u64,
    pub messages: u64,
    /// The code of the Close this peer sent, if it sent one with a code.
    pub close_code: Option<u16>,
}

/// Which control payload bytes are being kept, and what for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
enum Capture {
    #[default]
    None,
    /// The first two bytes: the status code.
    Close,
    /// A Pong that may be wsgate's own; its header began at this offset of the current read
    /// (reads are at most 64 KiB).
    Pong { start: u32 },
}

#[derive(Debug)]
pub(super) struct Watch {
    rules: Rules,
    tracker: Tracker,
    pub counts: FrameCounts,
    /// Payload bytes of the message in progress, fragments together.
    message_len: u64,
    /// A data frame without FIN was seen: continuations follow.
    in_message: bool,
    capture: CaptureBuf,
    /// Waiting for the next boundary.
    pub inject: Option<Control>,
    /// A Close went to the destination (passed on, or wsgate's): nothing more may follow it.
    pub close_sent: bool,
    /// The source's Close has been read whole.
    pub close_heard: bool,
    /// After wsgate's Close: the source's bytes are still read (to see its Close) but dropped.
    pub discard: bool,
    /// Bytes of a frame went on that wsgate then refused: the destination's stream is broken
    /// and cannot be given a Close.
    pub cut_mid_frame: bool,
}

#[derive(Debug, Clone, Copy)]
struct CaptureBuf {
    what: Capture,
    bytes: [u8; PING_TOKEN_LEN],
    len: u8,
}

impl Default for CaptureBuf {
    fn default() -> Self {
        CaptureBuf {
            what: Capture::None,
            bytes: [0; PING_TOKEN_LEN],
            len: 0,
        }
    }
}

/// The bytes to write on, built only when a read had to be changed.
struct Output<'a> {
    data: &'a [u8],
    edited: Option<Vec<u8>>,
    /// `data[..handled]` is already kept or dropped.
    handled: usize,
}

impl<'a> Output<'a> {
    fn edited(&mut self) -> &mut Vec<u8> {
        let (data, handled) = (self.data, self.handled);
        self.edited.get_or_insert_with(|| data[..handled].to_vec())
    }

    fn keep_to(&mut self, to: usize) {
        if let Some(out) = &mut self.edited {
            out.extend_from_slice(&self.data[self.handled..to]);
        }
        self.handled = to;
    }

    fn drop_to(&mut self, to: usize) {
        self.edited();
        self.handled = to;
    }

    fn insert(&mut self, bytes: impl FnOnce(&mut Vec<u8>)) {
        bytes(self.edited());
    }

    fn finish(mut self) -> Option<Vec<u8>> {
        self.keep_to(self.data.len());
        self.edited
    }
}

impl Watch {
    pub fn new(rules: Rules) -> Watch {
        Watch {
            rules,
            tracker: Tracker::new(),
            counts: FrameCounts::default(),
            message_len: 0,
            in_message: false,
            capture: CaptureBuf::default(),
            inject: None,
            close_sent: false,
            close_heard: false,
            discard: false,
            cut_mid_frame: false,
        }
    }

    /// Frames wsgate writes toward an upstream server are masked, as a client's must be
    /// (RFC 6455 §5.3); toward a client they are not.
    fn our_mask(&self) -> Option<[u8; 4]> {
        (self.rules.from == Side::Client).then(random_mask)
    }

    pub fn at_boundary(&self) -> bool {
        self.tracker.at_boundary()
    }

    /// Writes a pending control frame into `out` if the stream is at a boundary; a Close
    /// ends what this direction passes on.
    pub fn inject_now(&mut self, out: &mut Vec<u8>) {
        if self.close_sent {
            self.inject = None;
        }
        if !self.tracker.at_boundary() {
            return;
        }
        match self.inject.take() {
            None => {}
            Some(Control::Ping) => frame::encode(out, frame::PING, ping_token(), self.our_mask()),
            Some(Control::Close(code)) => {
                frame::encode_close(out, code, reason(code), self.our_mask());
                self.close_sent = true;
                self.discard = true;
            }
        }
    }

    /// Follows `data` (one read from the source) and returns what to write instead of it,
    /// or `None` to write it unchanged, plus the rule the source broke, if it broke one.
    pub fn scan(&mut self, data: &[u8]) -> (Option<Vec<u8>>, Option<Violation>) {
        let mut output = Output {
            data,
            edited: None,
            handled: 0,
        };
        let mut violation = None;
        let mut at = 0;
        // Each step consumes bytes or reports an event; a read ends within two steps a byte.
        for _ in 0..=2 * data.len() + 2 {
            if self.inject.is_some() && self.tracker.at_boundary() && !self.discard {
                output.keep_to(at);
                output.insert(|out| self.inject_now(out));
            }
            if self.discard {
                output.drop_to(at);
            }
            let boundary = self.tracker.at_boundary();
            let payload = self.tracker.current().copied();
            let offset = self.tracker.payload_offset();
            let (taken, event) = self.tracker.advance(&data[at..]);
            if let Some(header) = payload {
                self.capture(&data[at..at + taken], &header, offset);
            }
            let start = at;
            at += taken;
            match event {
                Some(Event::Header(header)) => {
                    let header_start = boundary.then_some(start);
                    if let Err(broken) = self.on_header(&header, header_start) {
                        violation = Some(broken);
                        self.refuse(&mut output, header_start, at);
                    }
                }
                Some(Event::FrameEnd) => self.on_frame_end(&mut output, at),
                None if at == data.len() => break,
                None => {}
            }
        }
        if self.discard {
            output.drop_to(data.len());
        }
        if let Capture::Pong { .. } = self.capture.what {
            // Its first bytes were in this read and have gone on: so must the rest.
            self.capture.what = Capture::None;
        }
        (output.finish(), violation)
    }

    /// The source broke a rule with the frame whose header ended at `at`: nothing of it goes
    /// on, and the destination gets a Close 1001 in its place, unless the frame's first bytes
    /// had gone on with an earlier read: then that stream is broken and gets no Close.
    fn refuse(&mut self, output: &mut Output<'_>, header_start: Option<usize>, at: usize) {
        self.capture = CaptureBuf::default();
        match header_start {
            Some(start) => {
                output.keep_to(start);
                if !self.close_sent {
                    let mask = self.our_mask();
                    output.insert(|out| {
                        let code = close_code::GOING_AWAY;
                        frame::encode_close(out, code, reason(code), mask);
                    });
                }
            }
            None => self.cut_mid_frame = !self.close_sent,
        }
        self.close_sent = true;
        self.inject = None;
        self.discard = true;
        output.drop_to(at);
    }

    fn on_header(&mut self, header: &Header, start: Option<usize>) -> Result<(), Violation> {
        let rules = self.rules;
        self.counts.frames += 1;
        if rules.strict {
            strict_check(header, &rules, self.in_message)?;
        }
        if header.is_control() {
            self.capture = CaptureBuf::default();
            self.capture.what = match header.opcode {
                frame::CLOSE => Capture::Close,
                frame::PONG if rules.pinged && header.payload_len == PING_TOKEN_LEN as u64 => {
                    // A Pong whose header a read cut in two has partly gone on; it goes on
                    // whole (an unsolicited Pong is harmless, RFC 6455 §5.5.3).
                    start.map_or(Capture::None, |start| Capture::Pong {
                        start: start as u32,
                    })
                }
                _ => Capture::None,
            };
            return Ok(());
        }
        if header.payload_len > rules.max_frame {
            return Err(Violation::FrameTooBig);
        }
        self.message_len = if header.opcode == frame::CONTINUATION {
            self.message_len.saturating_add(header.payload_len)
        } else {
            header.payload_len
        };
        if self.message_len > rules.max_message {
            return Err(Violation::MessageTooBig);
        }
        self.in_message = !header.fin;
        if header.fin {
            self.counts.messages += 1;
        }
        Ok(())
    }

    fn on_frame_end(&mut self, output: &mut Output<'_>, at: usize) {
        let capture = std::mem::take(&mut self.capture);
        match capture.what {
            Capture::None => {}
            Capture::Close => {
                self.counts.close_code = frame::close_code(&capture.bytes[..capture.len.into()]);
                self.close_heard = true;
                if !self.discard {
                    self.close_sent = true;
                }
            }
            Capture::Pong { start } => {
                if capture.bytes == *ping_token() && !self.discard {
                    output.keep_to(start as usize);
                    output.drop_to(at);
                }
            }
        }
    }

    /// Keeps the first control payload bytes that matter, unmasked.
    fn capture(&mut self, payload: &[u8], header: &Header, offset: u64) {
        let want = match self.capture.what {
            Capture::None => return,
            Capture::Close => 2,
            Capture::Pong { .. } => PING_TOKEN_LEN,
        };
        let have = usize::from(self.capture.len);
        let take = want.saturating_sub(have).min(payload.len());
        let kept = &mut self.capture.bytes[have..have + take];
        kept.copy_from_slice(&payload[..take]);
        if let Some(key) = header.mask {
            frame::apply_mask(kept, key, offset);
        }
        self.capture.len += take as u8;
    }
}

/// RFC 6455 §5.1-§5.5 as a proxy can check them without reading payloads.
fn strict_check(header: &Header, rules: &Rules, in_message: bool) -> Result<(), Violation> {
    let masked = header.mask.is_some();
    match rules.from {
        Side::Client if !masked => {
            return Err(Violation::Protocol(ProtocolError::UnmaskedClientFrame))
        }
        Side::Upstream if masked => {
            return Err(Violation::Protocol(ProtocolError::MaskedServerFrame))
        }
        _ => {}
    }
    if header.is_reserved_opcode() {
        return Err(Violation::Protocol(ProtocolError::ReservedOpcode));
    }
    let first_of_message = !header.is_control() && header.opcode != frame::CONTINUATION;
    let allowed_rsv = if rules.deflate && first_of_message {
        frame::RSV1
    } else {
        0
    };
    if header.rsv & !allowed_rsv != 0 {
        return Err(Violation::Protocol(ProtocolError::ReservedBits));
    }
    if header.is_control() {
        if header.payload_len > frame::MAX_CONTROL_PAYLOAD as u64 {
            return Err(Violation::Protocol(ProtocolError::ControlFrameTooLong));
        }
        if !header.fin {
            return Err(Violation::Protocol(ProtocolError::FragmentedControlFrame));
        }
    } else if (header.opcode == frame::CONTINUATION) != in_message {
        return Err(Violation::Protocol(ProtocolError::BadFragmentation));
    }
    Ok(())
}

/// The payload of every Ping wsgate sends: random per process, so that a peer's own Pongs
/// are not mistaken for answers to wsgate's.
pub(super) fn ping_token() -> &'static [u8; PING_TOKEN_LEN] {
    static TOKEN: std::sync::OnceLock<[u8; PING_TOKEN_LEN]> = std::sync::OnceLock::new();
    TOKEN.get_or_init(random)
}

/// Mask keys must be unpredictable (RFC 6455 §5.3); they are needed only for the few frames
/// wsgate writes itself, so the system's generator is cheap enough.
fn random_mask() -> [u8; 4] {
    random()
}

fn random<const N: usize>() -> [u8; N] {
    use ring::rand::SecureRandom;
    let mut bytes = [0; N];
    // The system generator fails only on a broken kernel; a fixed value is still valid here.
    let _ = ring::rand::SystemRandom::new().fill(&mut bytes);
    bytes
}

/// A short reason in each Close wsgate sends, for client libraries that show it.
fn reason(code: u16) -> &'static str {
    match code {
        close_code::GOING_AWAY => "going away",
        close_code::MESSAGE_TOO_BIG => "message too big",
        close_code::PROTOCOL_ERROR => "protocol error",
        close_code::SERVICE_RESTART => "service restart",
        _ => "",
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn rules(from: Side, pinged: bool) -> Rules {
        Rules {
            from,
            max_frame: u64::MAX,
            max_message: u64::MAX,
            strict: false,
            deflate: false,
            pinged,
        }
    }

    /// Frames with random opcodes and lengths (control frames short, as the RFC wants).
    fn stream(frames: &[(u8, usize)], masked: bool) -> Vec<u8> {
        let mut out = Vec::new();
        for (i, &(opcode, len)) in frames.iter().enumerate() {
            let payload = vec![i as u8; len];
            frame::encode(&mut out, opcode, &payload, masked.then_some([1, 2, 3, 4]));
        }
        out
    }

    fn frames() -> impl Strategy<Value = Vec<(u8, usize)>> {
        let frame = prop_oneof![
            (Just(frame::TEXT), 0usize..300),
            (Just(frame::BINARY), 0usize..70_000),
            (Just(frame::PING), 0usize..126),
            (Just(frame::PONG), 0usize..126),
        ];
        proptest::collection::vec(frame, 0..12)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        /// With nothing to insert or refuse, every read goes on unchanged however the stream
        /// is cut, and the counts are the frames'.
        #[test]
        fn a_watch_with_nothing_to_do_changes_no_byte(
            frames in frames(),
            masked in any::<bool>(),
            cuts in proptest::collection::vec(0usize..80_000, 0..8),
        ) {
            let bytes = stream(&frames, masked);
            let from = if masked { Side::Client } else { Side::Upstream };
            // Pinged, but no Pong carries wsgate's token: none may be taken out.
            let mut watch = Watch::new(rules(from, true));
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c % (bytes.len() + 1)).collect();
            cuts.push(0);
            cuts.push(bytes.len());
            cuts.sort_unstable();
            for piece in cuts.windows(2) {
                let (edited, violation) = watch.scan(&bytes[piece[0]..piece[1]]);
                prop_assert!(edited.is_none());
                prop_assert!(violation.is_none());
            }
            prop_assert!(watch.at_boundary());
            prop_assert_eq!(watch.counts.frames, frames.len() as u64);
        }

        /// A Pong answering wsgate's Ping, whole within a read, is taken out; everything else
        /// around it goes on in order.
        #[test]
        fn only_wsgate_s_own_pong_is_taken_out(
            before in frames(),
            after in frames(),
        ) {
            let mut bytes = stream(&before, true);
            let kept_before = bytes.len();
            frame::encode(&mut bytes, frame::PONG, ping_token(), Some([9, 9, 9, 9]));
            let rest = stream(&after, true);
            bytes.extend(&rest);
            let mut watch = Watch::new(rules(Side::Client, true));
            let (edited, _) = watch.scan(&bytes);
            let expected = [&bytes[..kept_before], &rest[..]].concat();
            prop_assert_eq!(edited.unwrap_or_else(|| bytes.clone()), expected);
        }
    }
}
