//! Big bodies without big buffers: a stream is a fixed pseudo-random pattern repeated, cut into
//! zero-copy slices, and a receiver checks every byte against the pattern as it arrives (a
//! memcmp per slice, fast even unoptimised), so 64 MiB costs neither memory nor much CPU.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::LazyLock;

use bytes::Bytes;
use futures_util::stream::{self, Stream};
use hyper::body::Frame;

/// A prime period, so the pattern never lines up with chunk or buffer sizes.
const PERIOD: usize = 65_521;
pub const CHUNK: usize = 64 * 1024;
pub const MIB: u64 = 1024 * 1024;

/// One period followed by the next `CHUNK` bytes of the sequence, so any chunk is one slice.
static PATTERN: LazyLock<Bytes> = LazyLock::new(|| {
    let mut state: u32 = 0x9e37_79b9;
    let mut bytes: Vec<u8> = (0..PERIOD)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            (state >> 24) as u8
        })
        .collect();
    let tail: Vec<u8> = (0..CHUNK).map(|i| bytes[i % PERIOD]).collect();
    bytes.extend(tail);
    Bytes::from(bytes)
});

/// Bytes `pos..pos + len` of the endless pattern; `len <= CHUNK`.
fn slice(pos: u64, len: usize) -> Bytes {
    let start = (pos % PERIOD as u64) as usize;
    PATTERN.slice(start..start + len)
}

/// Something to wait for halfway through a stream.
pub type Pause = Pin<Box<dyn Future<Output = ()> + Send>>;

/// `total` pattern bytes as body frames; with `pause = (at, wait)`, the stream stops after
/// exactly `at` bytes until `wait` completes.
pub fn frames(
    total: u64,
    pause: Option<(u64, Pause)>,
) -> impl Stream<Item = Result<Frame<Bytes>, Infallible>> + Send {
    stream::unfold((0u64, pause), move |(pos, mut pause)| async move {
        if pos >= total {
            return None;
        }
        if pause.as_ref().is_some_and(|(at, _)| pos >= *at) {
            if let Some((_, wait)) = pause.take() {
                wait.await;
            }
        }
        let mut len = (CHUNK as u64).min(total - pos);
        if let Some((at, _)) = &pause {
            len = len.min(at - pos);
        }
        let chunk = slice(pos, len as usize);
        Some((Ok(Frame::data(chunk)), (pos + len, pause)))
    })
}

/// Checks a received stream against the pattern, byte for byte.
#[derive(Debug, Default, Clone, Copy)]
pub struct Check {
    pub len: u64,
    pub mismatch_at: Option<u64>,
}

impl Check {
    pub fn feed(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            let n = data.len().min(CHUNK);
            if self.mismatch_at.is_none() && data[..n] != slice(self.len, n)[..] {
                self.mismatch_at = Some(self.len);
            }
            self.len += n as u64;
            data = &data[n..];
        }
    }

    /// Exactly `len` bytes, all of them the pattern's.
    pub fn is_pattern_of(&self, len: u64) -> bool {
        self.len == len && self.mismatch_at.is_none()
    }
}
