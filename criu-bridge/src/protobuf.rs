//! The few bits of the protobuf wire format needed to read CRIU's stats
//! images. CRIU's stats messages hold only varints and one level of nested
//! messages, so a full protobuf library would be dead weight here.

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

#[cfg(test)]
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
