//! Cost of following frame boundaries through a tunnel's byte stream, as `Tracker` sees it.

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use wsgate::websocket::frame::{self, Event, Tracker};

/// About 1 MiB of `size`-byte masked binary frames, as a client sends them.
fn stream(size: usize) -> (Vec<u8>, usize) {
    let payload = vec![0x5a; size];
    let mut one = Vec::new();
    frame::encode(
        &mut one,
        frame::BINARY,
        &payload,
        Some([0x37, 0xfa, 0x21, 0x3d]),
    );
    let count = (1 << 20) / one.len();
    (one.repeat(count), one.len())
}

/// Feeds `stream` in `read`-byte pieces and counts the frames that end.
fn track(stream: &[u8], read: usize) -> u64 {
    let mut tracker = Tracker::new();
    let mut frames = 0;
    for piece in stream.chunks(read) {
        let mut rest = piece;
        while !rest.is_empty() {
            let (taken, event) = tracker.advance(rest);
            rest = &rest[taken..];
            frames += u64::from(event == Some(Event::FrameEnd));
        }
    }
    frames
}

fn tracker(c: &mut Criterion) {
    let mut group = c.benchmark_group("tracker");
    let (big, _) = stream(16 * 1024);
    let (small, small_frame) = stream(64);
    for (name, stream, read) in [
        ("16k_frames_64k_reads", &big, 64 * 1024),
        ("64b_frames_64k_reads", &small, 64 * 1024),
        // The echo case: every read returns exactly one message.
        ("64b_frames_frame_per_read", &small, small_frame),
    ] {
        group.throughput(Throughput::Bytes(stream.len() as u64));
        group.bench_function(name, |b| b.iter(|| track(black_box(stream), read)));
    }
    group.finish();
}

criterion_group!(benches, tracker);
criterion_main!(benches);
