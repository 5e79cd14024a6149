//! The few bits of the protobuf wire format ms2m needs: reading CRIU's stats
//! images and speaking CRIU's RPC protocol (`images/rpc.proto`). CRIU's
//! messages hold only varints, strings and nested messages (proto2, no
//! packed fields), so a full protobuf library would be dead weight here.

/// One field of a protobuf message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Field<'a> {
    Varint(u64),
    Bytes(&'a [u8]),
    Fixed64(u64),
    Fixed32(u32),
}

/// Reads a base-128 varint at the start of `buf`; returns it and its length.
pub(crate) fn read_varint(buf: &[u8]) -> Option<(u64, usize)> {
    let mut value = 0u64;
    for (i, byte) in buf.iter().enumerate().take(10) {
        value |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Some((value, i + 1));
        }
    }
    None
}

/// Splits a message into `(field number, field)` pairs, or says why it can't.
pub(crate) fn fields(mut buf: &[u8]) -> Result<Vec<(u32, Field<'_>)>, String> {
    let mut out = Vec::new();
    while !buf.is_empty() {
        let (key, n) = read_varint(buf).ok_or("truncated field key")?;
        buf = &buf[n..];
        let number = u32::try_from(key >> 3).map_err(|_| "field number out of range")?;
        let field = match key & 7 {
            0 => {
                let (v, n) = read_varint(buf).ok_or("truncated varint")?;
                buf = &buf[n..];
                Field::Varint(v)
            }
            1 => {
                let bytes: [u8; 8] = buf
                    .get(..8)
                    .ok_or("truncated fixed64")?
                    .try_into()
                    .map_err(|_| "fixed64")?;
                buf = &buf[8..];
                Field::Fixed64(u64::from_le_bytes(bytes))
            }
            2 => {
                let (len, n) = read_varint(buf).ok_or("truncated length")?;
                let len = usize::try_from(len).map_err(|_| "length out of range")?;
                let end = n.checked_add(len).ok_or("length out of range")?;
                let bytes = buf
                    .get(n..end)
                    .ok_or("length past the end of the message")?;
                buf = &buf[end..];
                Field::Bytes(bytes)
            }
            5 => {
                let bytes: [u8; 4] = buf
                    .get(..4)
                    .ok_or("truncated fixed32")?
                    .try_into()
                    .map_err(|_| "fixed32")?;
                buf = &buf[4..];
                Field::Fixed32(u32::from_le_bytes(bytes))
            }
            other => return Err(format!("unsupported wire type {other}")),
        };
        out.push((number, field));
    }
    Ok(out)
}

/// Appends `v` as a base-128 varint.
pub(crate) fn encode_varint(mut v: u64, out: &mut Vec<u8>) {
    loop {
        let byte = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

/// Builds one protobuf message, field by field (proto2 wire format: every
/// field is written only when the caller calls for it).
#[derive(Debug, Default)]
pub(crate) struct Encoder {
    buf: Vec<u8>,
}

impl Encoder {
    /// An empty message.
    pub(crate) fn new() -> Self {
        Self::default()
    }

    fn key(&mut self, field: u32, wire_type: u8) {
        encode_varint(
            (u64::from(field) << 3) | u64::from(wire_type),
            &mut self.buf,
        );
    }

    /// A varint field (`uint32`, `uint64`, enums).
    pub(crate) fn varint(&mut self, field: u32, v: u64) {
        self.key(field, 0);
        encode_varint(v, &mut self.buf);
    }

    /// A `bool` field.
    pub(crate) fn bool(&mut self, field: u32, v: bool) {
        self.varint(field, u64::from(v));
    }

    /// An `int32` field: negative values are sign-extended to 64 bits (ten
    /// bytes on the wire), as protobuf requires.
    pub(crate) fn int32(&mut self, field: u32, v: i32) {
        self.varint(field, i64::from(v) as u64);
    }

    /// A length-delimited field (`string`, `bytes`).
    pub(crate) fn bytes(&mut self, field: u32, v: &[u8]) {
        self.key(field, 2);
        encode_varint(v.len() as u64, &mut self.buf);
        self.buf.extend_from_slice(v);
    }

    /// A `string` field.
    pub(crate) fn string(&mut self, field: u32, v: &str) {
        self.bytes(field, v.as_bytes());
    }

    /// A nested message field, built by `build`.
    pub(crate) fn message(&mut self, field: u32, build: impl FnOnce(&mut Encoder)) {
        let mut inner = Encoder::new();
        build(&mut inner);
        self.bytes(field, &inner.buf);
    }

    /// The encoded message.
    pub(crate) fn finish(self) -> Vec<u8> {
        self.buf
    }
}

/// Field value conversions for decoders: each says what it expected.
impl Field<'_> {
    /// The field as a varint.
    pub(crate) fn as_u64(&self) -> Result<u64, String> {
        match self {
            Field::Varint(v) => Ok(*v),
            other => Err(format!("expected a varint, found {other:?}")),
        }
    }

    /// The field as an `int32` (a sign-extended varint).
    pub(crate) fn as_i32(&self) -> Result<i32, String> {
        // Truncation is the protobuf rule for int32 read from a 64-bit varint.
        Ok(self.as_u64()? as i32)
    }

    /// The field as a `uint32`.
    pub(crate) fn as_u32(&self) -> Result<u32, String> {
        let v = self.as_u64()?;
        u32::try_from(v).map_err(|_| format!("uint32 out of range: {v}"))
    }

    /// The field as a `bool`.
    pub(crate) fn as_bool(&self) -> Result<bool, String> {
        Ok(self.as_u64()? != 0)
    }

    /// The field as length-delimited bytes.
    pub(crate) fn as_bytes(&self) -> Result<&[u8], String> {
        match self {
            Field::Bytes(b) => Ok(b),
            other => Err(format!(
                "expected a length-delimited field, found {other:?}"
            )),
        }
    }

    /// The field as a UTF-8 string.
    pub(crate) fn as_string(&self) -> Result<String, String> {
        std::str::from_utf8(self.as_bytes()?)
            .map(str::to_owned)
            .map_err(|e| format!("string is not UTF-8: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varint_round_trip() {
        for v in [0u64, 1, 127, 128, 300, u32::MAX as u64, u64::MAX] {
            let mut buf = Vec::new();
            encode_varint(v, &mut buf);
            assert_eq!(read_varint(&buf), Some((v, buf.len())));
        }
    }

    #[test]
    fn truncated_input_is_an_error() {
        assert!(fields(&[0x08]).is_err());
        assert!(fields(&[0x0a, 0x05, 1, 2]).is_err());
        assert!(read_varint(&[0x80, 0x80]).is_none());
    }

    #[test]
    fn encoder_round_trip() {
        let mut e = Encoder::new();
        e.int32(1, -1);
        e.bool(2, true);
        e.string(3, "héllo");
        e.message(4, |m| m.varint(1, 300));
        e.varint(5, u64::MAX);
        let buf = e.finish();
        let f = fields(&buf).unwrap();
        assert_eq!(f.len(), 5);
        assert_eq!(f[0].0, 1);
        assert_eq!(f[0].1.as_i32().unwrap(), -1);
        // a negative int32 takes ten bytes: key + 10
        assert_eq!(buf[0], 0x08);
        assert_eq!(
            buf[1..11],
            [0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01]
        );
        assert!(f[1].1.as_bool().unwrap());
        assert_eq!(f[2].1.as_string().unwrap(), "héllo");
        let inner = fields(f[3].1.as_bytes().unwrap()).unwrap();
        assert_eq!(inner, vec![(1, Field::Varint(300))]);
        assert_eq!(f[4].1.as_u64().unwrap(), u64::MAX);
        assert!(f[4].1.as_u32().is_err());
        assert!(f[2].1.as_u64().is_err());
        assert!(f[0].1.as_bytes().is_err());
    }

    #[test]
    fn invalid_utf8_string_is_an_error() {
        let mut e = Encoder::new();
        e.bytes(1, &[0xff, 0xfe]);
        let buf = e.finish();
        let f = fields(&buf).unwrap();
        assert!(f[0].1.as_string().is_err());
    }

    #[test]
    fn nested_message() {
        // field 1 (bytes) holding field 2 = 150
        let msg = [0x0a, 0x03, 0x10, 0x96, 0x01];
        let top = fields(&msg).unwrap();
        let Field::Bytes(inner) = top[0].1 else {
            panic!("not bytes")
        };
        assert_eq!(fields(inner).unwrap(), vec![(2, Field::Varint(150))]);
    }
}
