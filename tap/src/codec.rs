//! Incremental AMQP 0-9-1 frame reader.
//!
//! The reader accumulates bytes from a socket and cuts them into whole frames
//! without decoding payloads: frames split across reads and several frames per
//! read are both handled. Frame headers are validated eagerly, so a frame that
//! claims a size above the limit is rejected as soon as its 7-byte header is
//! in, without buffering its payload.

use thiserror::Error;

/// Frame type octet of a method frame.
pub const FRAME_METHOD: u8 = 1;
/// Frame type octet of a content header frame.
pub const FRAME_HEADER: u8 = 2;
/// Frame type octet of a content body frame.
pub const FRAME_BODY: u8 = 3;
/// Frame type octet of a heartbeat frame.
pub const FRAME_HEARTBEAT: u8 = 8;
/// The frame-end octet every frame must end with.
pub const FRAME_END: u8 = 0xCE;
/// Size of the frame header (type, channel, size).
pub const HEADER_LEN: usize = 7;
/// Frame overhead: header plus frame-end octet.
pub const OVERHEAD: usize = HEADER_LEN + 1;
/// The AMQP 0-9-1 protocol header a client sends first.
pub const PROTOCOL_HEADER: [u8; 8] = *b"AMQP\x00\x00\x09\x01";
/// Frame size every peer must accept before connection.tune (spec: frame-min-size).
pub const FRAME_MIN_SIZE: u32 = 4096;

/// Framing errors; each one is fatal for the connection pair.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum CodecError {
    /// The frame type octet is not one of method/header/body/heartbeat.
    #[error("unknown frame type {0:#04x}")]
    UnknownFrameType(u8),
    /// The frame claims a size above the negotiated or absolute limit.
    #[error("frame of {size} bytes exceeds the limit of {limit} bytes")]
    Oversized {
        /// Total frame size claimed (header + payload + end octet).
        size: u64,
        /// The limit in force.
        limit: u32,
    },
    /// The octet after the payload is not 0xCE.
    #[error("bad frame-end octet {0:#04x} (expected 0xce)")]
    BadFrameEnd(u8),
    /// The client did not start with the AMQP 0-9-1 protocol header.
    #[error("bad protocol header {0:02x?}")]
    BadProtocolHeader(Vec<u8>),
}

/// A complete frame found in the reader's buffer (positions are relative to
/// [`FrameReader::buffered`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawFrame {
    /// Frame type octet.
    pub kind: u8,
    /// Channel number.
    pub channel: u16,
    /// Start of the whole frame in the buffer.
    pub start: usize,
    /// Length of the whole frame (header + payload + end octet).
    pub len: usize,
}

impl RawFrame {
    /// Range of the payload inside the buffer.
    pub fn payload_range(&self) -> std::ops::Range<usize> {
        self.start + HEADER_LEN..self.start + self.len - 1
    }
    /// Range of the whole frame inside the buffer.
    pub fn range(&self) -> std::ops::Range<usize> {
        self.start..self.start + self.len
    }
}

/// Incremental frame reader with a size limit.
#[derive(Debug)]
pub struct FrameReader {
    buf: Vec<u8>,
    pos: usize,
    limit: u32,
    cap: u32,
}

impl FrameReader {
    /// A reader that accepts frames up to `cap` bytes (absolute cap); the
    /// limit can later be lowered to the negotiated frame_max.
    pub fn new(cap: u32) -> Self {
        let cap = cap.max(FRAME_MIN_SIZE);
        FrameReader {
            buf: Vec::with_capacity(64 * 1024),
            pos: 0,
            limit: cap,
            cap,
        }
    }

    /// Apply a negotiated frame_max (0 = no limit: the absolute cap applies).
    pub fn set_frame_max(&mut self, frame_max: u32) {
        self.limit = if frame_max == 0 {
            self.cap
        } else {
            frame_max.clamp(FRAME_MIN_SIZE, self.cap)
        };
    }

    /// The limit in force.
    pub fn limit(&self) -> u32 {
        self.limit
    }

    /// The buffer to append freshly read bytes to (compacted, with at least
    /// `min` bytes of spare capacity): pass it to `AsyncReadExt::read_buf`.
    pub fn read_target(&mut self, min: usize) -> &mut Vec<u8> {
        if self.pos > 0 && self.pos == self.buf.len() {
            self.buf.clear();
            self.pos = 0;
        } else if self.pos > 0
            && (self.pos >= self.buf.len() / 2 || self.buf.capacity() - self.buf.len() < min)
        {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        if self.buf.capacity() - self.buf.len() < min {
            self.buf.reserve(min);
        }
        &mut self.buf
    }

    /// Append bytes (used by tests and by callers that read elsewhere).
    pub fn extend(&mut self, data: &[u8]) {
        if self.pos > 0 && self.pos == self.buf.len() {
            self.buf.clear();
            self.pos = 0;
        }
        self.buf.extend_from_slice(data);
    }

    /// The buffer frames point into.
    pub fn buffered(&self) -> &[u8] {
        &self.buf
    }

    /// Bytes not yet consumed.
    pub fn pending(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// Consume the 8-byte protocol header if it is complete. `Ok(None)`: need
    /// more bytes. Returns the header bytes.
    pub fn protocol_header(&mut self) -> Result<Option<[u8; 8]>, CodecError> {
        let avail = &self.buf[self.pos..];
        let n = avail.len().min(8);
        if avail[..n] != PROTOCOL_HEADER[..n] && (n < 4 || &avail[..4] != b"AMQP") {
            return Err(CodecError::BadProtocolHeader(avail[..n].to_vec()));
        }
        if avail.len() < 8 {
            return Ok(None);
        }
        let mut h = [0u8; 8];
        h.copy_from_slice(&avail[..8]);
        self.pos += 8;
        Ok(Some(h))
    }

    /// Cut the next complete frame. `Ok(None)`: need more bytes.
    pub fn next_frame(&mut self) -> Result<Option<RawFrame>, CodecError> {
        let avail = &self.buf[self.pos..];
        if avail.is_empty() {
            return Ok(None);
        }
        let kind = avail[0];
        if !matches!(
            kind,
            FRAME_METHOD | FRAME_HEADER | FRAME_BODY | FRAME_HEARTBEAT
        ) {
            return Err(CodecError::UnknownFrameType(kind));
        }
        if avail.len() < HEADER_LEN {
            return Ok(None);
        }
        let channel = u16::from_be_bytes([avail[1], avail[2]]);
        let size = u32::from_be_bytes([avail[3], avail[4], avail[5], avail[6]]);
        let total = size as u64 + OVERHEAD as u64;
        if total > self.limit as u64 {
            return Err(CodecError::Oversized {
                size: total,
                limit: self.limit,
            });
        }
        let total = total as usize;
        if avail.len() < total {
            return Ok(None);
        }
        let end = avail[total - 1];
        if end != FRAME_END {
            return Err(CodecError::BadFrameEnd(end));
        }
        let frame = RawFrame {
            kind,
            channel,
            start: self.pos,
            len: total,
        };
        self.pos += total;
        Ok(Some(frame))
    }
}

/// Encode a method frame (class already serialized by amq-protocol).
pub fn encode_method(
    channel: u16,
    class: &amq_protocol::protocol::AMQPClass,
    out: &mut Vec<u8>,
) -> Result<(), String> {
    use amq_protocol::frame::{gen_frame, AMQPFrame, WriteContext};
    let frame = AMQPFrame::Method(channel, class.clone());
    let ctx = WriteContext::from(std::mem::take(out));
    let res = gen_frame(&frame)(ctx).map(|ctx| ctx.into_inner().0);
    match res {
        Ok(buf) => {
            *out = buf;
            Ok(())
        }
        Err(e) => Err(format!("encoding method frame: {e:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, ch: u16, payload: &[u8]) -> Vec<u8> {
        let mut v = vec![kind];
        v.extend_from_slice(&ch.to_be_bytes());
        v.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        v.extend_from_slice(payload);
        v.push(FRAME_END);
        v
    }

    #[test]
    fn several_frames_per_read_and_split_frames() {
        let mut all = frame(FRAME_METHOD, 1, b"abc");
        all.extend(frame(FRAME_BODY, 2, b"hello world"));
        all.extend(frame(FRAME_HEARTBEAT, 0, b""));
        // whole
        let mut r = FrameReader::new(1 << 20);
        r.extend(&all);
        let mut got = vec![];
        while let Some(f) = r.next_frame().unwrap() {
            got.push((f.kind, f.channel, r.buffered()[f.payload_range()].to_vec()));
        }
        assert_eq!(got.len(), 3);
        assert_eq!(got[1], (FRAME_BODY, 2, b"hello world".to_vec()));
        // one byte at a time
        let mut r = FrameReader::new(1 << 20);
        let mut got2 = vec![];
        for b in &all {
            r.extend(std::slice::from_ref(b));
            while let Some(f) = r.next_frame().unwrap() {
                got2.push((f.kind, f.channel, r.buffered()[f.payload_range()].to_vec()));
            }
        }
        assert_eq!(got, got2);
        assert_eq!(r.pending(), 0);
    }

    #[test]
    fn read_target_roundtrip() {
        let all = frame(FRAME_METHOD, 7, &[1u8; 100]);
        let mut r = FrameReader::new(1 << 20);
        for chunk in all.chunks(13) {
            r.read_target(16).extend_from_slice(chunk);
        }
        let f = r.next_frame().unwrap().unwrap();
        assert_eq!(f.channel, 7);
        assert_eq!(f.len, 108);
        assert!(r.next_frame().unwrap().is_none());
    }

    #[test]
    fn oversized_rejected_from_header_alone() {
        let mut r = FrameReader::new(131072);
        r.extend(&[FRAME_BODY, 0, 1, 0x40, 0, 0, 0]); // claims 1 GiB
        assert!(matches!(
            r.next_frame(),
            Err(CodecError::Oversized { limit: 131072, .. })
        ));
    }

    #[test]
    fn negotiated_limit_applies() {
        let mut r = FrameReader::new(1 << 20);
        r.set_frame_max(4096);
        r.extend(&frame(FRAME_BODY, 1, &[0u8; 4089]));
        assert!(matches!(r.next_frame(), Err(CodecError::Oversized { .. })));
        let mut r = FrameReader::new(1 << 20);
        r.set_frame_max(4096);
        r.extend(&frame(FRAME_BODY, 1, &[0u8; 4088]));
        assert!(r.next_frame().unwrap().is_some());
        r.set_frame_max(0);
        assert_eq!(r.limit(), 1 << 20);
    }

    #[test]
    fn bad_end_and_unknown_type() {
        let mut f = frame(FRAME_METHOD, 1, b"abc");
        let last = f.len() - 1;
        f[last] = 0;
        let mut r = FrameReader::new(1 << 20);
        r.extend(&f);
        assert_eq!(r.next_frame(), Err(CodecError::BadFrameEnd(0)));
        let mut r = FrameReader::new(1 << 20);
        r.extend(b"GET / HTTP/1.1\r\n");
        assert_eq!(r.next_frame(), Err(CodecError::UnknownFrameType(b'G')));
    }

    #[test]
    fn protocol_header() {
        let mut r = FrameReader::new(1 << 20);
        r.extend(b"AMQ");
        assert_eq!(r.protocol_header(), Ok(None));
        r.extend(b"P\x00\x00\x09\x01");
        assert_eq!(r.protocol_header(), Ok(Some(PROTOCOL_HEADER)));
        let mut r = FrameReader::new(1 << 20);
        r.extend(b"HTTP/1.1");
        assert!(r.protocol_header().is_err());
    }
}
