//! Records as the agent's spool and the collector's journal keep them on disk:
//! `[length u32 LE][crc32 of the payload u32 LE][payload]`, appended one after another.
//! A crash can leave the last record torn; reading stops at the first record that is
//! short, oversized or fails its checksum, and says how long the intact prefix is, so the
//! file can be cut back to it.

/// Payloads longer than this are treated as corruption, not allocated.
pub const MAX_RECORD: usize = 16 * 1024 * 1024;

const HEADER: usize = 8;

/// Appends one record to `buffer`; `write` appends its payload.
pub fn frame(buffer: &mut Vec<u8>, write: impl FnOnce(&mut Vec<u8>)) {
    let start = buffer.len();
    buffer.extend_from_slice(&[0u8; HEADER]);
    write(buffer);
    let payload = &buffer[start + HEADER..];
    let length = (payload.len() as u32).to_le_bytes();
    let crc = crc32fast::hash(payload).to_le_bytes();
    buffer[start..start + 4].copy_from_slice(&length);
    buffer[start + 4..start + HEADER].copy_from_slice(&crc);
}

/// The intact records of `bytes`, in order: see [`Records`].
pub fn records(bytes: &[u8]) -> Records<'_> {
    Records { bytes, position: 0 }
}

/// Yields each intact record's payload, and stops at the first one that is not intact.
pub struct Records<'a> {
    bytes: &'a [u8],
    position: usize,
}

impl Records<'_> {
    /// Bytes up to the end of the last record yielded.
    pub fn position(&self) -> usize {
        self.position
    }
}

impl<'a> Iterator for Records<'a> {
    type Item = &'a [u8];

    fn next(&mut self) -> Option<&'a [u8]> {
        let header = self.bytes.get(self.position..self.position + HEADER)?;
        let length = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
        let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
        if length > MAX_RECORD {
            return None;
        }
        let start = self.position + HEADER;
        let payload = self.bytes.get(start..start + length)?;
        if crc32fast::hash(payload) != crc {
            return None;
        }
        self.position = start + length;
        Some(payload)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn framed(payloads: &[&[u8]]) -> Vec<u8> {
        let mut buffer = Vec::new();
        for payload in payloads {
            frame(&mut buffer, |out| out.extend_from_slice(payload));
        }
        buffer
    }

    #[test]
    fn records_round_trip_in_order() {
        let bytes = framed(&[b"one", b"", b"three"]);
        let mut reader = records(&bytes);
        let read: Vec<&[u8]> = reader.by_ref().collect();
        assert_eq!(read, [&b"one"[..], b"", b"three"]);
        assert_eq!(reader.position(), bytes.len());
    }

    #[test]
    fn reading_stops_at_a_torn_or_corrupt_record() {
        let whole = framed(&[b"kept", b"torn"]);
        let first_end = HEADER + 4;
        for cut in first_end..whole.len() {
            let mut reader = records(&whole[..cut]);
            assert_eq!(reader.by_ref().count(), 1, "cut at {cut}");
            assert_eq!(reader.position(), first_end);
        }
        let mut corrupt = whole.clone();
        let last = corrupt.len() - 1;
        corrupt[last] ^= 1;
        let mut reader = records(&corrupt);
        assert_eq!(reader.by_ref().count(), 1);
        assert_eq!(reader.position(), first_end);
    }

    #[test]
    fn an_oversized_length_is_corruption() {
        let mut bytes = framed(&[b"x"]);
        bytes[..4].copy_from_slice(&(MAX_RECORD as u32 + 1).to_le_bytes());
        assert_eq!(records(&bytes).count(), 0);
    }
}
