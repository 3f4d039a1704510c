//! WhatsApp's stream framing: a 3-byte big-endian length before every frame, and the
//! 4-byte connection header `WA 06 03` once, before the client's first frame. Websocket
//! messages and frames are independent: one message may hold several frames or part of one.

use wacore_binary::consts::WA_CONN_HEADER;

/// Largest payload a 3-byte length can describe.
pub(crate) const MAX_WIRE_FRAME: usize = (1 << 24) - 1;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub(crate) enum FrameError {
    #[error("the connection did not start with the WhatsApp header")]
    BadHeader,
    #[error("frame of {len} bytes exceeds the limit of {max}")]
    TooLarge { len: usize, max: usize },
}

/// Splits a client's byte stream into frames, refusing anything above `max_frame` bytes
/// before buffering it.
pub(crate) struct FrameReader {
    buf: Vec<u8>,
    header_pending: bool,
    max_frame: usize,
}

impl FrameReader {
    pub(crate) fn new(max_frame: usize) -> Self {
        Self {
            buf: Vec::new(),
            header_pending: true,
            max_frame: max_frame.min(MAX_WIRE_FRAME),
        }
    }

    pub(crate) fn feed(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// The next complete frame, `Ok(None)` when more bytes are needed.
    pub(crate) fn next_frame(&mut self) -> Result<Option<Vec<u8>>, FrameError> {
        if self.header_pending {
            let seen = self.buf.len().min(WA_CONN_HEADER.len());
            if self.buf[..seen] != WA_CONN_HEADER[..seen] {
                return Err(FrameError::BadHeader);
            }
            if seen < WA_CONN_HEADER.len() {
                return Ok(None);
            }
            self.buf.drain(..WA_CONN_HEADER.len());
            self.header_pending = false;
        }
        if self.buf.len() < 3 {
            return Ok(None);
        }
        let len = usize::from(self.buf[0]) << 16
            | usize::from(self.buf[1]) << 8
            | usize::from(self.buf[2]);
        if len > self.max_frame {
            return Err(FrameError::TooLarge {
                len,
                max: self.max_frame,
            });
        }
        if self.buf.len() < 3 + len {
            return Ok(None);
        }
        let frame = self.buf[3..3 + len].to_vec();
        self.buf.drain(..3 + len);
        if self.buf.is_empty() && self.buf.capacity() > 64 * 1024 {
            // Do not keep a large frame's allocation alive on an idle connection.
            self.buf = Vec::new();
        }
        Ok(Some(frame))
    }
}

/// Prefixes a payload with its 3-byte length. Callers never produce more than
/// [`MAX_WIRE_FRAME`] bytes (every server node is small).
pub(crate) fn encode_frame(payload: &[u8]) -> Vec<u8> {
    debug_assert!(payload.len() <= MAX_WIRE_FRAME);
    let len = payload.len();
    let mut out = Vec::with_capacity(3 + len);
    out.extend_from_slice(&[(len >> 16) as u8, (len >> 8) as u8, len as u8]);
    out.extend_from_slice(payload);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_header(frames: &[&[u8]]) -> Vec<u8> {
        let mut bytes = WA_CONN_HEADER.to_vec();
        for f in frames {
            bytes.extend(encode_frame(f));
        }
        bytes
    }

    #[test]
    fn frames_split_across_and_within_messages_come_out_whole() {
        let stream = with_header(&[b"hello", b"", b"world!"]);
        let mut reader = FrameReader::new(1024);
        let mut out = Vec::new();
        for byte in stream {
            reader.feed(&[byte]);
            while let Some(frame) = reader.next_frame().unwrap() {
                out.push(frame);
            }
        }
        assert_eq!(out, vec![b"hello".to_vec(), Vec::new(), b"world!".to_vec()]);
    }

    #[test]
    fn a_wrong_header_is_refused_as_soon_as_it_differs() {
        let mut reader = FrameReader::new(1024);
        reader.feed(b"GE");
        assert_eq!(reader.next_frame(), Err(FrameError::BadHeader));
    }

    #[test]
    fn an_oversized_length_is_refused_before_its_bytes_arrive() {
        let mut reader = FrameReader::new(10);
        let mut bytes = WA_CONN_HEADER.to_vec();
        bytes.extend_from_slice(&[0, 0, 11]);
        reader.feed(&bytes);
        assert_eq!(
            reader.next_frame(),
            Err(FrameError::TooLarge { len: 11, max: 10 })
        );
    }
}
