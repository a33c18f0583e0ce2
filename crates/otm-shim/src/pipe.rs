//! Byte streams between blocking code (packing and unpacking archives) and async bodies, through
//! a bounded channel: at most a few chunks are in memory at any time, whatever the archive's size.

use bytes::Bytes;
use std::io::{self, Read, Write};
use tokio::sync::mpsc;

/// Bytes gathered before a chunk goes out.
pub const CHUNK: usize = 64 << 10;

/// Chunks in flight between the two sides.
pub const DEPTH: usize = 8;

/// A channel that carries chunks or the error that ended the stream.
pub fn channel() -> (
    mpsc::Sender<io::Result<Bytes>>,
    mpsc::Receiver<io::Result<Bytes>>,
) {
    mpsc::channel(DEPTH)
}

/// The blocking, writing end: [`CHUNK`]-sized chunks into the channel. Writes fail with
/// `BrokenPipe` once the reading end is gone. Call only outside the async runtime's threads.
#[derive(Debug)]
pub struct Writer {
    tx: mpsc::Sender<io::Result<Bytes>>,
    buf: Vec<u8>,
}

impl Writer {
    pub fn new(tx: mpsc::Sender<io::Result<Bytes>>) -> Self {
        Writer {
            tx,
            buf: Vec::with_capacity(CHUNK),
        }
    }

    fn send(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = Bytes::from(std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK)));
        self.tx
            .blocking_send(Ok(chunk))
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the reading end went away"))
    }

    /// Ends the stream with an error, so the reading end fails instead of seeing a short stream.
    pub fn fail(self, e: io::Error) {
        let _ = self.tx.blocking_send(Err(e));
    }
}

impl Write for Writer {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = data.len().min(CHUNK - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == CHUNK {
            self.send()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.send()
    }
}

/// The blocking, reading end: the chunks in order, an error the writing end sent, or the end of
/// the stream once every sender is gone. Call only outside the async runtime's threads.
#[derive(Debug)]
pub struct Reader {
    rx: mpsc::Receiver<io::Result<Bytes>>,
    chunk: Bytes,
}

impl Reader {
    pub fn new(rx: mpsc::Receiver<io::Result<Bytes>>) -> Self {
        Reader {
            rx,
            chunk: Bytes::new(),
        }
    }
}

impl Read for Reader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.chunk.is_empty() {
            match self.rx.blocking_recv() {
                Some(Ok(chunk)) => self.chunk = chunk,
                Some(Err(e)) => return Err(e),
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.chunk.len());
        buf[..n].copy_from_slice(&self.chunk.split_to(n));
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_and_errors_cross_in_order() {
        let (tx, rx) = channel();
        let writer = std::thread::spawn(move || {
            let mut w = Writer::new(tx);
            for i in 0..1000u32 {
                w.write_all(&i.to_le_bytes()).unwrap();
            }
            w.write_all(&vec![9u8; 3 * CHUNK + 5]).unwrap();
            w.flush().unwrap();
            w.fail(io::Error::other("packing failed"));
        });
        let mut r = Reader::new(rx);
        let mut got = vec![0u8; 4000 + 3 * CHUNK + 5];
        r.read_exact(&mut got).unwrap();
        assert_eq!(&got[4..8], &1u32.to_le_bytes());
        assert!(got[4000..].iter().all(|&b| b == 9));
        let err = r.read(&mut [0u8; 10]).unwrap_err();
        assert_eq!(err.to_string(), "packing failed");
        writer.join().unwrap();
    }

    #[test]
    fn the_writer_stops_when_the_reader_is_gone() {
        let (tx, rx) = channel();
        drop(rx);
        let mut w = Writer::new(tx);
        let err = w.write_all(&vec![0u8; 2 * CHUNK]).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::BrokenPipe);
    }
}
