//! The few Protocol Buffers encodings an ONNX file and a TensorBoard event need, written out:
//! varints, 32- and 64-bit floats and length-delimited fields (strings, bytes, nested
//! messages). A generated binding would need `protoc` at build time for about sixty lines of
//! encoding.

/// A message being encoded: fields are appended in the order they are set.
#[derive(Default, Clone)]
pub struct Message(Vec<u8>);

const VARINT: u64 = 0;
const LENGTH_DELIMITED: u64 = 2;
const FIXED64: u64 = 1;
const FIXED32: u64 = 5;

impl Message {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn into_bytes(self) -> Vec<u8> {
        self.0
    }

    fn varint(&mut self, mut v: u64) {
        while v >= 0x80 {
            self.0.push((v as u8 & 0x7f) | 0x80);
            v >>= 7;
        }
        self.0.push(v as u8);
    }

    fn key(&mut self, field: u32, wire: u64) {
        self.varint(((field as u64) << 3) | wire);
    }

    /// An `int32`/`int64`/enum field: negative values as ten-byte two's complement, as protobuf
    /// encodes them.
    pub fn int(mut self, field: u32, v: i64) -> Self {
        self.key(field, VARINT);
        self.varint(v as u64);
        self
    }

    /// A repeated integer field, one key per element (proto2's unpacked encoding, which ONNX's
    /// `onnx.proto` declares and every parser reads).
    pub fn ints(mut self, field: u32, values: impl IntoIterator<Item = i64>) -> Self {
        for v in values {
            self = self.int(field, v);
        }
        self
    }

    pub fn float(mut self, field: u32, v: f32) -> Self {
        self.key(field, FIXED32);
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }

    pub fn double(mut self, field: u32, v: f64) -> Self {
        self.key(field, FIXED64);
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }

    pub fn bytes(mut self, field: u32, bytes: &[u8]) -> Self {
        self.key(field, LENGTH_DELIMITED);
        self.varint(bytes.len() as u64);
        self.0.extend_from_slice(bytes);
        self
    }

    pub fn string(self, field: u32, s: &str) -> Self {
        self.bytes(field, s.as_bytes())
    }

    pub fn message(self, field: u32, m: &Message) -> Self {
        self.bytes(field, &m.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Byte strings from the Protocol Buffers encoding guide.
    #[test]
    fn encodes_as_the_protobuf_guide_shows() {
        assert_eq!(Message::new().int(1, 150).into_bytes(), [0x08, 0x96, 0x01]);
        assert_eq!(Message::new().string(2, "testing").into_bytes(), b"\x12\x07testing");
        assert_eq!(Message::new().int(1, -2).into_bytes(), [0x08, 0xfe, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01]);
        assert_eq!(Message::new().float(1, 1.0).into_bytes(), [0x0d, 0x00, 0x00, 0x80, 0x3f]);
        let inner = Message::new().int(1, 150);
        assert_eq!(Message::new().message(3, &inner).into_bytes(), [0x1a, 0x03, 0x08, 0x96, 0x01]);
    }
}
