//! The local spool for `[kafka] required = false`: events Kafka did not take wait in a bounded
//! append-only file (bincode records, length-prefixed) and are sent again when it is back. A full
//! spool is reported loudly (log line and `tandem_kafka_spool_full_total`).

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::PathBuf;

use anyhow::{anyhow, Context, Result};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Spooled {
    pub key: Vec<u8>,
    pub payload: Vec<u8>,
    pub headers: Vec<(String, Vec<u8>)>,
}

pub struct Spool {
    path: PathBuf,
    file: File,
    /// Where the next record to resend starts.
    read_pos: u64,
    size: u64,
    max: u64,
}

impl Spool {
    pub fn open(path: PathBuf, max: u64) -> Result<Spool> {
        let file = OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("[kafka]: opening the spool {}", path.display()))?;
        let size = file.metadata()?.len();
        Ok(Spool {
            path,
            file,
            read_pos: 0,
            size,
            max,
        })
    }

    /// Bytes waiting.
    pub fn pending(&self) -> u64 {
        self.size - self.read_pos
    }

    /// Append one record; `false` when the spool is full (nothing written).
    pub fn push(&mut self, r: &Spooled) -> Result<bool> {
        let body = bincode::serde::encode_to_vec(r, bincode::config::standard())
            .map_err(|e| anyhow!("encoding a spool record: {e}"))?;
        let len = 4 + body.len() as u64;
        if self.size + len > self.max {
            return Ok(false);
        }
        let mut buf = Vec::with_capacity(len as usize);
        buf.extend_from_slice(&(body.len() as u32).to_le_bytes());
        buf.extend_from_slice(&body);
        self.file
            .write_all(&buf)
            .with_context(|| format!("[kafka]: writing the spool {}", self.path.display()))?;
        self.size += len;
        Ok(true)
    }

    /// Up to `n` records to send again (they count as taken; a crash sends them once more).
    pub fn take(&mut self, n: usize) -> Result<Vec<Spooled>> {
        let mut out = Vec::new();
        let mut f = &self.file;
        f.seek(SeekFrom::Start(self.read_pos))?;
        while out.len() < n && self.read_pos < self.size {
            let mut len = [0u8; 4];
            f.read_exact(&mut len)?;
            let mut body = vec![0u8; u32::from_le_bytes(len) as usize];
            f.read_exact(&mut body)?;
            let (r, _) = bincode::serde::decode_from_slice(&body, bincode::config::standard())
                .map_err(|e| anyhow!("spool {} is damaged: {e}", self.path.display()))?;
            out.push(r);
            self.read_pos += 4 + body.len() as u64;
        }
        Ok(out)
    }

    /// Everything taken was delivered: start the file over when nothing else waits.
    pub fn settle(&mut self) -> Result<()> {
        if self.read_pos == self.size && self.size > 0 {
            self.file.set_len(0)?;
            self.read_pos = 0;
            self.size = 0;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_bounded_and_reset_when_drained() {
        let path = std::env::temp_dir().join(format!("tandem-spool-test-{}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let r = |i: u8| Spooled {
            key: vec![i],
            payload: vec![i; 10],
            headers: vec![("site".into(), b"D".to_vec())],
        };
        let mut s = Spool::open(path.clone(), 100).unwrap();
        assert!(s.push(&r(1)).unwrap());
        assert!(s.push(&r(2)).unwrap());
        let mut n = 2;
        while s.push(&r(9)).unwrap() {
            n += 1;
        }
        assert!(n < 10, "bounded by max bytes");
        // Reopened (as after a crash): everything is still there.
        let mut s = Spool::open(path.clone(), 100).unwrap();
        let got = s.take(2).unwrap();
        assert_eq!(got, vec![r(1), r(2)]);
        s.settle().unwrap();
        assert!(s.pending() > 0, "not drained yet: nothing reset");
        s.take(100).unwrap();
        s.settle().unwrap();
        assert_eq!(
            (s.pending(), std::fs::metadata(&path).unwrap().len()),
            (0, 0)
        );
        let _ = std::fs::remove_file(&path);
    }
}
