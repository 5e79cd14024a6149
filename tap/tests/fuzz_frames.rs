//! Fuzz targets for the tap's frame handling (issue 9, bad input): bolero
//! `check!()`s that run as ordinary `cargo test`s on stable Rust, with
//! random inputs for `BOLERO_RANDOM_TEST_TIME_MS` (default 1 s each) or
//! `BOLERO_RANDOM_ITERATIONS`, and shrink a failing input before reporting
//! it with its `BOLERO_RANDOM_SEED`. `hack/test.sh` runs them briefly
//! (`MS2M_FUZZ_ITERATIONS`); docs/operations.md has the longer run.
//!
//! What must hold for any bytes a container's app or the broker sends:
//! the reader never panics, errors are errors (and stay errors), and the
//! frames it cuts are exactly the input's, whatever the chunking of reads.

use bolero::{check, TypeGenerator};
use ms2m_tap::codec::{
    CodecError, FrameReader, RawFrame, FRAME_BODY, FRAME_END, FRAME_HEADER, FRAME_HEARTBEAT,
    FRAME_METHOD, FRAME_MIN_SIZE, HEADER_LEN, OVERHEAD, PROTOCOL_HEADER,
};

/// What one run of the reader over an input produced.
#[derive(Debug, PartialEq)]
struct Outcome {
    /// The protocol header, when it was asked for and came whole.
    header: Option<[u8; 8]>,
    /// Each frame: kind, channel, and its bytes.
    frames: Vec<(u8, u16, Vec<u8>)>,
    /// The error that ended the run, if any (with the bytes of a bad
    /// protocol header left out: how many were in depends on the chunking).
    error: Option<CodecError>,
}

/// Feeds `data` to a fresh reader in chunks of the sizes in `chunks`
/// (cycled; 0 is taken as 1), half the time through `read_target` (as the
/// proxy reads sockets) and half through `extend`. Checks every frame
/// against the bytes and the limit as it comes out.
fn run(data: &[u8], chunks: &[u16], cap: u32, frame_max: Option<u32>, header: bool) -> Outcome {
    let mut r = FrameReader::new(cap);
    if let Some(fm) = frame_max {
        r.set_frame_max(fm);
    }
    let limit = r.limit();
    assert!(
        limit >= FRAME_MIN_SIZE,
        "limit {limit} below the spec's minimum"
    );
    assert!(
        limit <= cap.max(FRAME_MIN_SIZE),
        "limit {limit} above the cap {cap}"
    );
    let mut out = Outcome {
        header: None,
        frames: vec![],
        error: None,
    };
    let mut want_header = header;
    let mut fed = 0usize;
    let mut consumed = 0usize;
    let mut i = 0usize;
    while fed < data.len() {
        let n = usize::from(chunks.get(i % chunks.len().max(1)).copied().unwrap_or(4096)).max(1);
        let end = (fed + n).min(data.len());
        if i % 2 == 0 {
            r.read_target(end - fed).extend_from_slice(&data[fed..end]);
        } else {
            r.extend(&data[fed..end]);
        }
        fed = end;
        i += 1;
        assert_eq!(r.pending(), fed - consumed, "pending bytes after a read");
        loop {
            if want_header {
                match r.protocol_header() {
                    Ok(Some(h)) => {
                        assert_eq!(&h[..], &data[consumed..consumed + 8]);
                        assert_eq!(&h[..4], b"AMQP", "a header accepted without AMQP");
                        out.header = Some(h);
                        consumed += 8;
                        want_header = false;
                        continue;
                    }
                    Ok(None) => break,
                    Err(CodecError::BadProtocolHeader(got)) => {
                        assert!(
                            data[consumed..].starts_with(&got),
                            "error bytes not the input's"
                        );
                        assert!(!got.is_empty() && got.len() <= 8);
                        out.error = Some(CodecError::BadProtocolHeader(vec![]));
                        return out;
                    }
                    Err(e) => panic!("protocol_header gave a frame error: {e}"),
                }
            }
            match r.next_frame() {
                Ok(Some(f)) => {
                    check_frame(&r, &f, &data[consumed..], limit);
                    out.frames
                        .push((f.kind, f.channel, r.buffered()[f.range()].to_vec()));
                    consumed += f.len;
                }
                Ok(None) => break,
                Err(e) => {
                    check_error(&e, &data[consumed..], limit);
                    out.error = Some(e);
                    return out;
                }
            }
        }
    }
    out
}

/// A frame the reader returned is the next bytes of the input, well formed
/// and within the limit.
fn check_frame(r: &FrameReader, f: &RawFrame, rest: &[u8], limit: u32) {
    let buf = r.buffered();
    assert!(f.range().end <= buf.len(), "frame {f:?} beyond the buffer");
    let bytes = &buf[f.range()];
    assert!(
        rest.starts_with(bytes),
        "frame {f:?} is not the input's next bytes"
    );
    assert!(
        matches!(
            f.kind,
            FRAME_METHOD | FRAME_HEADER | FRAME_BODY | FRAME_HEARTBEAT
        ),
        "frame of unknown kind {} accepted",
        f.kind
    );
    assert!(f.len >= OVERHEAD && f.len as u64 <= u64::from(limit));
    let size = u32::from_be_bytes([bytes[3], bytes[4], bytes[5], bytes[6]]) as usize;
    assert_eq!(f.len, size + OVERHEAD);
    assert_eq!(f.payload_range().len(), size);
    assert_eq!(bytes[f.len - 1], FRAME_END);
    assert_eq!(f.channel, u16::from_be_bytes([bytes[1], bytes[2]]));
}

/// An error is justified by the input at that point.
fn check_error(e: &CodecError, rest: &[u8], limit: u32) {
    match e {
        CodecError::UnknownFrameType(k) => {
            assert_eq!(Some(k), rest.first());
            assert!(!matches!(
                *k,
                FRAME_METHOD | FRAME_HEADER | FRAME_BODY | FRAME_HEARTBEAT
            ));
        }
        CodecError::Oversized { size, limit: l } => {
            assert_eq!(*l, limit);
            assert!(*size > u64::from(limit));
            assert!(
                rest.len() >= HEADER_LEN,
                "oversized before the header was in"
            );
        }
        CodecError::BadFrameEnd(b) => assert_ne!(*b, FRAME_END),
        CodecError::BadProtocolHeader(_) => panic!("next_frame gave a protocol header error"),
    }
    // Every error renders as a message (it ends the connection with a log line).
    assert!(!e.to_string().is_empty());
}

#[derive(Debug, TypeGenerator)]
struct AnyInput {
    data: Vec<u8>,
    chunks: Vec<u16>,
    cap: u32,
    frame_max: Option<u32>,
    header: bool,
}

/// Arbitrary bytes in arbitrary reads: no panic, every frame is the
/// input's, every error is justified, and the outcome does not depend on
/// how the bytes were split into reads.
#[test]
fn frame_reader_takes_any_bytes_in_any_chunking() {
    check!().with_type::<AnyInput>().for_each(|i| {
        // Caps of a few KiB to a few MiB (the shim's [tap] max_frame range);
        // the reader raises anything lower to the spec's minimum.
        let cap = i.cap % (8 << 20);
        let chunked = run(&i.data, &i.chunks, cap, i.frame_max, i.header);
        let whole = run(&i.data, &[u16::MAX], cap, i.frame_max, i.header);
        assert_eq!(chunked, whole, "the chunking changed what the reader saw");
    });
}

/// A frame an app or broker could send (valid kind, small payload).
#[derive(Debug, TypeGenerator)]
struct GoodFrame {
    kind: u8,
    channel: u16,
    payload: Vec<u8>,
}

impl GoodFrame {
    fn encode(&self, out: &mut Vec<u8>) -> (u8, u16, usize) {
        let kind =
            [FRAME_METHOD, FRAME_HEADER, FRAME_BODY, FRAME_HEARTBEAT][usize::from(self.kind % 4)];
        let payload: &[u8] = if kind == FRAME_HEARTBEAT {
            &[]
        } else {
            &self.payload
        };
        out.push(kind);
        out.extend_from_slice(&self.channel.to_be_bytes());
        out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        out.extend_from_slice(payload);
        out.push(FRAME_END);
        (kind, self.channel, payload.len() + OVERHEAD)
    }
}

/// A well-formed stream (protocol header, then frames within the limit) in
/// arbitrary reads: every frame comes out, in order, byte for byte; no
/// error; nothing left over.
#[test]
fn frame_reader_cuts_valid_frames_whatever_the_reads() {
    check!()
        .with_type::<(Vec<GoodFrame>, Vec<u16>)>()
        .for_each(|(frames, chunks)| {
            let mut data = PROTOCOL_HEADER.to_vec();
            let mut want = vec![];
            for f in frames {
                let start = data.len();
                let (kind, ch, len) = f.encode(&mut data);
                want.push((kind, ch, data[start..start + len].to_vec()));
            }
            let got = run(&data, chunks, 1 << 20, None, true);
            assert_eq!(got.header, Some(PROTOCOL_HEADER));
            assert_eq!(got.error, None);
            assert_eq!(got.frames, want);
        });
}

/// A frame header claiming more than the limit is refused as soon as its
/// 7 header bytes are in, never buffered up to its claimed size.
#[test]
fn frame_reader_refuses_oversized_frames_at_the_header() {
    check!()
        .with_type::<(u8, u16, u32, u32)>()
        .for_each(|(kind, channel, size, frame_max)| {
            let kind =
                [FRAME_METHOD, FRAME_HEADER, FRAME_BODY, FRAME_HEARTBEAT][usize::from(kind % 4)];
            let mut r = FrameReader::new(1 << 20);
            r.set_frame_max(*frame_max);
            let limit = r.limit();
            let mut hdr = vec![kind];
            hdr.extend_from_slice(&channel.to_be_bytes());
            hdr.extend_from_slice(&size.to_be_bytes());
            r.extend(&hdr);
            let res = r.next_frame();
            if u64::from(*size) + OVERHEAD as u64 > u64::from(limit) {
                assert_eq!(
                    res,
                    Err(CodecError::Oversized {
                        size: u64::from(*size) + OVERHEAD as u64,
                        limit
                    })
                );
            } else {
                assert_eq!(
                    res,
                    Ok(None),
                    "a header within the limit waits for its payload"
                );
            }
        });
}
