//! QEMU's stream framing: each frame is preceded by its length as a u32, big-endian.
//!
//! [`StreamRx`] reassembles frames from reads of any size (a read may end inside the length
//! prefix or inside a frame: `partial_read`). Frames are handed out as ranges of its own
//! buffer, so they can be forwarded without a copy; the buffer is compacted only on the next
//! read. An oversized length is skipped byte by byte without being buffered, so a stream can
//! never make the engine allocate. [`StreamTx`] frames outgoing frames into a bounded buffer
//! and survives short writes.
use std::io::{self, Read, Write};
use std::ops::Range;

/// What [`StreamRx::next_frame`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    /// A whole frame at this range of [`StreamRx::buf`].
    Frame(Range<usize>),
    /// A frame longer than the limit was (or is being) skipped; its length.
    Oversized(usize),
    /// A zero-length frame.
    Empty,
    /// Nothing complete yet: read more.
    NeedMore,
}

/// Reassembly of incoming frames.
#[derive(Debug)]
pub struct StreamRx {
    buf: Box<[u8]>,
    start: usize,
    end: usize,
    skip: usize,
    max_frame: usize,
}

impl StreamRx {
    /// A reassembler for frames of at most `max_frame` bytes, with a buffer of `capacity`
    /// bytes (at least `max_frame + 4`).
    pub fn new(max_frame: usize, capacity: usize) -> Self {
        let capacity = capacity.max(max_frame + 4);
        Self { buf: vec![0u8; capacity].into_boxed_slice(), start: 0, end: 0, skip: 0, max_frame }
    }

    /// The buffer that frame ranges refer to.
    pub fn buf(&self) -> &[u8] {
        &self.buf
    }

    /// Reads once from `r` after moving any partial frame to the front. `Ok(0)` is end of
    /// stream. Frame ranges handed out before are invalid afterwards.
    pub fn fill(&mut self, r: &mut impl Read) -> io::Result<usize> {
        if self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        let Some(space) = self.buf.get_mut(self.end..) else { return Ok(0) };
        if space.is_empty() {
            // Cannot happen: a whole frame always fits, and complete frames are consumed.
            return Err(io::Error::other("stream reassembly buffer is full"));
        }
        let n = r.read(space)?;
        self.end += n;
        Ok(n)
    }

    /// The next complete frame, if any.
    pub fn next_frame(&mut self) -> Next {
        if self.skip > 0 {
            let take = self.skip.min(self.end - self.start);
            self.start += take;
            self.skip -= take;
            if self.skip > 0 {
                return Next::NeedMore;
            }
        }
        let Some(prefix) = self.buf.get(self.start..self.start + 4) else { return Next::NeedMore };
        if self.end - self.start < 4 {
            return Next::NeedMore;
        }
        let len = u32::from_be_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]) as usize;
        if len == 0 {
            self.start += 4;
            return Next::Empty;
        }
        if len > self.max_frame {
            self.start += 4;
            self.skip = len;
            let take = self.skip.min(self.end - self.start);
            self.start += take;
            self.skip -= take;
            return Next::Oversized(len);
        }
        if self.end - self.start - 4 < len {
            return Next::NeedMore;
        }
        let frame = self.start + 4..self.start + 4 + len;
        self.start = frame.end;
        Next::Frame(frame)
    }

    /// Bytes buffered but not yet handed out.
    #[cfg(test)]
    pub fn pending(&self) -> usize {
        self.end - self.start
    }
}

/// Framing of outgoing frames into a bounded buffer.
#[derive(Debug)]
pub struct StreamTx {
    buf: Box<[u8]>,
    start: usize,
    end: usize,
}

impl StreamTx {
    /// A buffer of `capacity` bytes.
    pub fn new(capacity: usize) -> Self {
        Self { buf: vec![0u8; capacity].into_boxed_slice(), start: 0, end: 0 }
    }

    /// Appends one framed frame; false if it does not fit now (flush first).
    pub fn push(&mut self, frame: &[u8]) -> bool {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
        let need = 4 + frame.len();
        let Ok(len) = u32::try_from(frame.len()) else { return false };
        let Some(dst) = self.buf.get_mut(self.end..self.end + need) else { return false };
        dst[..4].copy_from_slice(&len.to_be_bytes());
        dst[4..].copy_from_slice(frame);
        self.end += need;
        true
    }

    /// True when nothing is waiting.
    pub fn is_empty(&self) -> bool {
        self.start == self.end
    }

    /// Bytes waiting to be written.
    pub fn waiting(&self) -> usize {
        self.end - self.start
    }

    /// Drops every waiting frame no byte of which has been written, keeping the rest of a frame
    /// that is partly out (the stream's framing must stay whole). Returns the frames dropped and
    /// their bytes (without length prefixes).
    pub fn drop_unstarted(&mut self) -> (usize, usize) {
        // Frames lie back to back from the start of the buffer: find the end of the one that
        // holds `start` (or `start` itself, when it falls between two frames).
        let mut pos = 0;
        while pos < self.start {
            pos += 4 + self.frame_len(pos);
        }
        let keep = pos;
        let (mut frames, mut bytes) = (0, 0);
        while pos < self.end {
            let len = self.frame_len(pos);
            frames += 1;
            bytes += len;
            pos += 4 + len;
        }
        self.end = keep.min(self.end);
        if self.start >= self.end {
            self.start = 0;
            self.end = 0;
        }
        (frames, bytes)
    }

    fn frame_len(&self, at: usize) -> usize {
        let mut b = [0u8; 4];
        if let Some(h) = self.buf.get(at..at + 4) {
            b.copy_from_slice(h);
        }
        // A prefix this buffer wrote itself; capped so that a walk always ends.
        (u32::from_be_bytes(b) as usize).min(self.buf.len())
    }

    /// Writes as much as the socket takes; `Ok(true)` when everything went.
    pub fn flush(&mut self, w: &mut impl Write) -> io::Result<bool> {
        while self.start < self.end {
            match w.write(self.buf.get(self.start..self.end).unwrap_or_default()) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => self.start += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        self.start = 0;
        self.end = 0;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reader that hands out `chunks` one read at a time (an empty chunk would read as the
    /// end of the stream, so there are none).
    struct Chunks(Vec<Vec<u8>>);
    impl Read for Chunks {
        fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
            self.0.retain(|c| !c.is_empty());
            if self.0.is_empty() {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            let c = self.0.remove(0);
            let n = c.len().min(out.len());
            out[..n].copy_from_slice(&c[..n]);
            if n < c.len() {
                self.0.insert(0, c[n..].to_vec());
            }
            Ok(n)
        }
    }

    fn framed(frames: &[&[u8]]) -> Vec<u8> {
        let mut v = Vec::new();
        for f in frames {
            v.extend_from_slice(&u32::try_from(f.len()).unwrap().to_be_bytes());
            v.extend_from_slice(f);
        }
        v
    }

    fn drain(rx: &mut StreamRx, r: &mut Chunks) -> Vec<Next> {
        let mut out = Vec::new();
        loop {
            match rx.next_frame() {
                Next::NeedMore => match rx.fill(r) {
                    Ok(0) | Err(_) => return out,
                    Ok(_) => {}
                },
                Next::Frame(range) => out.push(Next::Frame(0..rx.buf()[range].len())),
                other => out.push(other),
            }
        }
    }

    /// seed: testPartialRead
    #[test]
    fn partial_read() {
        let bytes = framed(&[b"first-frame", b"second", b"3"]);
        // Every way of cutting the stream into two reads, and one byte per read.
        for cut in 0..=bytes.len() {
            let mut r = Chunks(vec![bytes[..cut].to_vec(), bytes[cut..].to_vec()]);
            let mut rx = StreamRx::new(64, 68);
            let got = drain(&mut rx, &mut r);
            assert_eq!(got, vec![Next::Frame(0..11), Next::Frame(0..6), Next::Frame(0..1)], "cut at {cut}");
        }
        let mut r = Chunks(bytes.iter().map(|b| vec![*b]).collect());
        let mut rx = StreamRx::new(64, 68);
        assert_eq!(drain(&mut rx, &mut r).len(), 3);
        assert_eq!(rx.pending(), 0);
    }

    #[test]
    fn frame_bytes_are_exact() {
        let bytes = framed(&[b"abc", b"defg"]);
        let mut r = Chunks(vec![bytes]);
        let mut rx = StreamRx::new(64, 68);
        rx.fill(&mut r).unwrap();
        let Next::Frame(a) = rx.next_frame() else { panic!() };
        assert_eq!(&rx.buf()[a], b"abc");
        let Next::Frame(b) = rx.next_frame() else { panic!() };
        assert_eq!(&rx.buf()[b], b"defg");
        assert_eq!(rx.next_frame(), Next::NeedMore);
    }

    #[test]
    fn oversized_and_empty_frames_are_skipped_without_buffering() {
        let big = vec![7u8; 10_000];
        let bytes = framed(&[b"ok", &big, b"", b"after"]);
        let mut r = Chunks(bytes.chunks(100).map(<[u8]>::to_vec).collect());
        let mut rx = StreamRx::new(1514, 2048);
        let got = drain(&mut rx, &mut r);
        assert_eq!(got, vec![Next::Frame(0..2), Next::Oversized(10_000), Next::Empty, Next::Frame(0..5)]);
        // A hostile length near u32::MAX is skipped too, never allocated.
        let mut r = Chunks(vec![u32::MAX.to_be_bytes().to_vec(), vec![1; 50]]);
        let mut rx = StreamRx::new(1514, 2048);
        assert_eq!(drain(&mut rx, &mut r), vec![Next::Oversized(u32::MAX as usize)]);
    }

    #[test]
    fn tx_frames_and_survives_short_writes() {
        struct Slow(Vec<u8>, usize);
        impl Write for Slow {
            fn write(&mut self, b: &[u8]) -> io::Result<usize> {
                if self.1 == 0 {
                    return Err(io::ErrorKind::WouldBlock.into());
                }
                let n = b.len().min(3).min(self.1);
                self.1 -= n;
                self.0.extend_from_slice(&b[..n]);
                Ok(n)
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let mut tx = StreamTx::new(32);
        assert!(tx.push(b"hello"));
        assert!(tx.push(b"world!"));
        assert!(!tx.push(&[0; 30]), "does not fit");
        let mut w = Slow(Vec::new(), 10);
        assert!(!tx.flush(&mut w).unwrap());
        w.1 = 100;
        assert!(tx.flush(&mut w).unwrap());
        assert_eq!(w.0, framed(&[b"hello", b"world!"]));
        assert!(tx.is_empty());
    }

    #[test]
    fn dropping_keeps_the_frame_in_progress_whole() {
        struct Take(Vec<u8>, usize);
        impl Write for Take {
            fn write(&mut self, b: &[u8]) -> io::Result<usize> {
                let n = b.len().min(self.1);
                if n == 0 {
                    return Err(io::ErrorKind::WouldBlock.into());
                }
                self.1 -= n;
                self.0.extend_from_slice(&b[..n]);
                Ok(n)
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        for cut in 0..=24 {
            let mut tx = StreamTx::new(64);
            for f in [&b"first"[..], b"second", b"third"] {
                assert!(tx.push(f));
            }
            let mut w = Take(Vec::new(), cut);
            let _ = tx.flush(&mut w);
            let (frames, bytes) = tx.drop_unstarted();
            w.1 = usize::MAX;
            tx.flush(&mut w).unwrap();
            // What came out is whole frames only: the ones started before the drop.
            let whole = [
                framed(&[]),
                framed(&[b"first"]),
                framed(&[b"first", b"second"]),
                framed(&[b"first", b"second", b"third"]),
            ];
            let i = whole.iter().position(|x| *x == w.0).unwrap_or_else(|| panic!("cut {cut}: {:?}", w.0));
            assert_eq!(i + frames, 3, "cut {cut}");
            assert_eq!(bytes, [b"first".len(), 6, 5][i..].iter().sum::<usize>(), "cut {cut}");
            assert!(tx.is_empty());
        }
    }
}
