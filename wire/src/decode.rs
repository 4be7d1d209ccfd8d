//! Decoding for the collector. Every length is checked against the bytes actually present, so
//! a truncated, corrupted or hostile message yields a [`DecodeError`], never a panic or an
//! allocation larger than the message itself.

use alloc::vec::Vec;
use core::fmt;

use crate::{
    BucketCounts, Kind, Level, TimerKind, HEADER_LEN, MAGIC, MAX_FRAMES, PROTOCOL_VERSION,
};

/// Why a message could not be decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecodeError {
    /// Fewer bytes than the layout needs.
    Truncated,
    /// The message does not start with the anyprof magic.
    BadMagic,
    /// The peer speaks another protocol version.
    Version(u16),
    /// A kind this version does not know.
    UnknownKind(u16),
    /// A field holds a value outside its range.
    BadValue(&'static str),
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeError::Truncated => write!(f, "message truncated"),
            DecodeError::BadMagic => write!(f, "not an anyprof message (bad magic)"),
            DecodeError::Version(v) => write!(
                f,
                "protocol version {v}, this collector speaks {PROTOCOL_VERSION}: \
                 use the libanyprof.so built with this anyprof"
            ),
            DecodeError::UnknownKind(k) => write!(f, "unknown message kind {k}"),
            DecodeError::BadValue(what) => write!(f, "bad value in field {what}"),
        }
    }
}

/// The first message of a connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hello {
    /// Process id.
    pub pid: u32,
    /// Parent process id.
    pub ppid: u32,
    /// CPU sampling rate requested per thread (0 = off).
    pub cpu_hz: u32,
    /// Timer mechanism in use.
    pub timer: TimerKind,
    /// Mean bytes between heap samples (0 = off, 1 = every allocation).
    pub mem_rate: u64,
    /// Wall-clock time at load, ns since the Unix epoch.
    pub start_realtime_ns: u64,
    /// CLOCK_MONOTONIC at load, ns; sample times are on this clock.
    pub start_monotonic_ns: u64,
    /// Path of the executable.
    pub exe: Vec<u8>,
    /// NUL-separated arguments.
    pub cmdline: Vec<u8>,
}

/// A loaded module (owned form of [`crate::ModuleInfo`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Module {
    /// Id unique within the connection.
    pub id: u32,
    /// Start of the executable range (runtime address).
    pub start: u64,
    /// End of the executable range (exclusive).
    pub end: u64,
    /// File offset of `start`.
    pub file_offset: u64,
    /// Runtime address minus ELF address.
    pub load_bias: u64,
    /// Path as the loader names it.
    pub path: Vec<u8>,
    /// GNU build id, possibly empty.
    pub build_id: Vec<u8>,
}

/// One CPU sample.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sample {
    /// Thread id.
    pub tid: u32,
    /// `FLAG_*` bits.
    pub flags: u8,
    /// CLOCK_MONOTONIC ns.
    pub time_ns: u64,
    /// Thread CPU time this sample stands for, ns.
    pub cpu_ns: u64,
    /// Leaf first: the interrupted PC, then return addresses.
    pub frames: Vec<u64>,
}

/// A decoded message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    /// See [`Kind::Hello`].
    Hello(Hello),
    /// See [`Kind::ModuleLoaded`].
    ModuleLoaded(Module),
    /// See [`Kind::ModuleUnloaded`].
    ModuleUnloaded(u32),
    /// See [`Kind::CpuSamples`].
    CpuSamples(Vec<Sample>),
    /// See [`Kind::Counters`]; index = [`crate::Counter`] value.
    Counters(Vec<u64>),
    /// See [`Kind::Log`].
    Log(Level, Vec<u8>),
    /// See [`Kind::Goodbye`]: final counters.
    Goodbye(Vec<u64>),
    /// See [`Kind::ThreadName`]: tid and name.
    ThreadName(u32, Vec<u8>),
    /// See [`Kind::HeapBuckets`].
    HeapBuckets(Vec<HeapBucket>),
    /// See [`Kind::MemStats`].
    MemStats(MemStats),
    /// See [`Kind::Control`].
    Control(crate::Command),
    /// See [`Kind::ThreadCreates`]: (count, creating stack) pairs.
    ThreadCreates(Vec<(u64, Vec<u64>)>),
    /// See [`Kind::Region`].
    Region(crate::shared::RegionInfo),
}

/// One heap bucket report.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeapBucket {
    /// Bucket id, unique within the process.
    pub id: u32,
    /// Usable size of the bucket's allocations.
    pub size: u64,
    /// Cumulative sampled counts.
    pub counts: BucketCounts,
    /// Return addresses, leaf first; empty on reports after the first.
    pub frames: Vec<u64>,
}

/// Exact allocator counters.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MemStats {
    /// Indexed by [`crate::MemStat`].
    pub fields: Vec<u64>,
    /// Allocations per size class (see [`crate::size_class`]).
    pub class_mallocs: Vec<u64>,
    /// Frees per size class.
    pub class_frees: Vec<u64>,
}

impl MemStats {
    /// A field's value (0 if not sent).
    pub fn get(&self, f: crate::MemStat) -> u64 {
        self.fields.get(f as usize).copied().unwrap_or(0)
    }
}

struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.buf.len() < n {
            return Err(DecodeError::Truncated);
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }
    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.array::<1>()?[0])
    }
    fn u16(&mut self) -> Result<u16, DecodeError> {
        Ok(u16::from_le_bytes(self.array()?))
    }
    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(self.array()?))
    }
    fn bytes(&mut self, max: usize) -> Result<Vec<u8>, DecodeError> {
        let n = self.u32()? as usize;
        if n > max {
            return Err(DecodeError::BadValue("length"));
        }
        Ok(self.take(n)?.to_vec())
    }
    fn frames(&mut self, n: usize) -> Result<Vec<u64>, DecodeError> {
        let raw = self.take(n * 8)?;
        Ok(raw
            .chunks_exact(8)
            .map(|c| {
                let mut b = [0u8; 8];
                b.copy_from_slice(c);
                u64::from_le_bytes(b)
            })
            .collect())
    }
    fn counters(&mut self) -> Result<Vec<u64>, DecodeError> {
        let n = self.u16()? as usize;
        if n * 8 > self.buf.len() {
            return Err(DecodeError::Truncated);
        }
        (0..n).map(|_| self.u64()).collect()
    }
}

/// Decodes one message (one datagram).
pub fn decode(buf: &[u8]) -> Result<Message, DecodeError> {
    if buf.len() < HEADER_LEN {
        return Err(DecodeError::Truncated);
    }
    let mut r = Reader { buf };
    if r.u32()? != MAGIC {
        return Err(DecodeError::BadMagic);
    }
    let version = r.u16()?;
    if version != PROTOCOL_VERSION {
        return Err(DecodeError::Version(version));
    }
    let raw_kind = r.u16()?;
    let kind = Kind::from_u16(raw_kind).ok_or(DecodeError::UnknownKind(raw_kind))?;
    Ok(match kind {
        Kind::Hello => Message::Hello(Hello {
            pid: r.u32()?,
            ppid: r.u32()?,
            cpu_hz: r.u32()?,
            timer: match r.u8()? {
                0 => TimerKind::Off,
                1 => TimerKind::ThreadCpuTimer,
                _ => return Err(DecodeError::BadValue("timer")),
            },
            mem_rate: r.u64()?,
            start_realtime_ns: r.u64()?,
            start_monotonic_ns: r.u64()?,
            exe: r.bytes(crate::MAX_PATH)?,
            cmdline: r.bytes(crate::MAX_CMDLINE)?,
        }),
        Kind::ModuleLoaded => {
            let m = Module {
                id: r.u32()?,
                start: r.u64()?,
                end: r.u64()?,
                file_offset: r.u64()?,
                load_bias: r.u64()?,
                path: r.bytes(crate::MAX_PATH)?,
                build_id: r.bytes(crate::MAX_BUILD_ID)?,
            };
            if m.end < m.start {
                return Err(DecodeError::BadValue("module range"));
            }
            Message::ModuleLoaded(m)
        }
        Kind::ModuleUnloaded => Message::ModuleUnloaded(r.u32()?),
        Kind::CpuSamples => {
            let mut samples = Vec::new();
            while !r.buf.is_empty() {
                let tid = r.u32()?;
                let flags = r.u8()?;
                let _reserved = r.u8()?;
                let n = r.u16()? as usize;
                if n > MAX_FRAMES {
                    return Err(DecodeError::BadValue("frame count"));
                }
                let time_ns = r.u64()?;
                let cpu_ns = r.u64()?;
                let frames = r.frames(n)?;
                samples.push(Sample {
                    tid,
                    flags,
                    time_ns,
                    cpu_ns,
                    frames,
                });
            }
            Message::CpuSamples(samples)
        }
        Kind::Counters => Message::Counters(r.counters()?),
        Kind::Goodbye => Message::Goodbye(r.counters()?),
        Kind::HeapBuckets => {
            let mut buckets = Vec::new();
            while !r.buf.is_empty() {
                let id = r.u32()?;
                let n = r.u16()? as usize;
                let _reserved = r.u16()?;
                if n > MAX_FRAMES {
                    return Err(DecodeError::BadValue("frame count"));
                }
                let size = r.u64()?;
                let counts = BucketCounts {
                    alloc_objects: r.u64()?,
                    alloc_bytes: r.u64()?,
                    free_objects: r.u64()?,
                    free_bytes: r.u64()?,
                };
                let frames = r.frames(n)?;
                buckets.push(HeapBucket {
                    id,
                    size,
                    counts,
                    frames,
                });
            }
            Message::HeapBuckets(buckets)
        }
        Kind::MemStats => {
            let fields = r.counters()?;
            let n = r.u16()? as usize;
            if n * 16 > r.buf.len() {
                return Err(DecodeError::Truncated);
            }
            let mut stats = MemStats {
                fields,
                ..MemStats::default()
            };
            for _ in 0..n {
                stats.class_mallocs.push(r.u64()?);
                stats.class_frees.push(r.u64()?);
            }
            Message::MemStats(stats)
        }
        Kind::Control => {
            Message::Control(crate::decode_command(buf).ok_or(DecodeError::BadValue("command"))?)
        }
        Kind::ThreadCreates => {
            let n = r.u32()? as usize;
            if n * 10 > r.buf.len() {
                return Err(DecodeError::Truncated);
            }
            let mut stacks = Vec::with_capacity(n);
            for _ in 0..n {
                let count = r.u64()?;
                let frames = r.u16()? as usize;
                if frames > MAX_FRAMES {
                    return Err(DecodeError::BadValue("frame count"));
                }
                stacks.push((count, r.frames(frames)?));
            }
            Message::ThreadCreates(stacks)
        }
        Kind::Region => Message::Region(crate::shared::RegionInfo {
            version: r.u32()?,
            size: r.u64()?,
            address: r.u64()?,
        }),
        Kind::ThreadName => {
            let tid = r.u32()?;
            Message::ThreadName(tid, r.bytes(crate::MAX_THREAD_NAME)?)
        }
        Kind::Log => {
            let level = match r.u8()? {
                1 => Level::Warn,
                2 => Level::Info,
                _ => return Err(DecodeError::BadValue("level")),
            };
            Message::Log(level, r.bytes(crate::MAX_LOG)?)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::*;

    fn hello_info(cmdline: &[u8]) -> HelloInfo<'_> {
        HelloInfo {
            pid: 7,
            ppid: 1,
            cpu_hz: 100,
            timer: TimerKind::ThreadCpuTimer,
            mem_rate: 524288,
            start_realtime_ns: 5,
            start_monotonic_ns: 6,
            exe: b"/bin/x",
            cmdline,
        }
    }

    #[test]
    fn heap_buckets_and_mem_stats_round_trip() {
        let mut buf = [0u8; MAX_MESSAGE];
        let mut batch = HeapBatch::new(&mut buf);
        let counts = BucketCounts {
            alloc_objects: 1,
            alloc_bytes: 2,
            free_objects: 3,
            free_bytes: 4,
        };
        assert!(batch.push(5, 64, &counts, &[10, 20]));
        assert!(batch.push(6, 128, &counts, &[]));
        let n = batch.len();
        let Message::HeapBuckets(b) = decode(&buf[..n]).unwrap() else {
            panic!()
        };
        assert_eq!(b.len(), 2);
        assert_eq!(
            (b[0].id, b[0].size, b[0].counts, b[0].frames.as_slice()),
            (5, 64, counts, &[10u64, 20][..])
        );
        assert!(b[1].frames.is_empty());

        let n = encode_mem_stats(&mut buf, &[1, 2, 3], &[4, 5], &[6, 7]).unwrap();
        let Message::MemStats(m) = decode(&buf[..n]).unwrap() else {
            panic!()
        };
        assert_eq!(
            (m.fields, m.class_mallocs, m.class_frees),
            ([1, 2, 3].to_vec(), [4, 5].to_vec(), [6, 7].to_vec())
        );
    }

    #[test]
    fn commands_and_thread_creates_round_trip() {
        let mut buf = [0u8; 256];
        for cmd in [
            Command::CpuStart(100),
            Command::CpuStop,
            Command::ThreadDump(7),
        ] {
            let n = encode_command(&mut buf, cmd).unwrap();
            assert_eq!(decode_command(&buf[..n]), Some(cmd));
            assert_eq!(decode(&buf[..n]).unwrap(), Message::Control(cmd));
            assert_eq!(decode_command(&buf[..n - 1]), None);
        }
        let stacks = [(2u64, &[1u64, 2][..]), (1, &[3][..])];
        let n = encode_thread_creates(&mut buf, stacks.iter().copied()).unwrap();
        let Message::ThreadCreates(s) = decode(&buf[..n]).unwrap() else {
            panic!()
        };
        assert_eq!(s, [(2, [1, 2].to_vec()), (1, [3].to_vec())]);
    }

    #[test]
    fn size_classes_are_powers_of_two() {
        assert_eq!(
            [
                size_class(0),
                size_class(1),
                size_class(2),
                size_class(3),
                size_class(4),
                size_class(5)
            ],
            [0, 0, 1, 2, 2, 3]
        );
        assert_eq!(size_class(4096), 12);
        assert_eq!(size_class(4097), 13);
        assert_eq!(size_class(u64::MAX), SIZE_CLASSES - 1);
        assert_eq!(size_class(1 << 63), 63);
        assert_eq!(size_class_limit(12), 4096);
    }

    #[test]
    fn round_trips_every_kind() {
        let mut buf = [0u8; MAX_MESSAGE];
        let n = encode_hello(&mut buf, &hello_info(b"x\0-y")).unwrap();
        let Message::Hello(h) = decode(&buf[..n]).unwrap() else {
            panic!()
        };
        assert_eq!(
            (h.pid, h.ppid, h.cpu_hz, h.exe.as_slice()),
            (7, 1, 100, &b"/bin/x"[..])
        );

        let m = ModuleInfo {
            id: 3,
            start: 0x1000,
            end: 0x2000,
            file_offset: 0x1000,
            load_bias: 0,
            path: b"/lib/a.so",
            build_id: &[1, 2, 3],
        };
        let n = encode_module_loaded(&mut buf, &m).unwrap();
        let Message::ModuleLoaded(d) = decode(&buf[..n]).unwrap() else {
            panic!()
        };
        assert_eq!(
            (d.id, d.start, d.end, d.build_id.as_slice()),
            (3, 0x1000, 0x2000, &[1u8, 2, 3][..])
        );

        let mut batch = SampleBatch::new(&mut buf);
        assert!(batch.push(11, FLAG_TRUNCATED, 100, 10_000_000, &[1, 2, 3]));
        assert!(batch.push(12, 0, 200, 9_000_000, &[4]));
        let n = batch.len();
        let Message::CpuSamples(s) = decode(&buf[..n]).unwrap() else {
            panic!()
        };
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].frames, [1, 2, 3]);
        assert_eq!(s[1].tid, 12);

        let n = encode_thread_name(&mut buf, 9, b"worker-1").unwrap();
        assert_eq!(
            decode(&buf[..n]).unwrap(),
            Message::ThreadName(9, b"worker-1".to_vec())
        );

        let n = encode_counters(&mut buf, Kind::Goodbye, &[1, 2, 3]).unwrap();
        assert_eq!(
            decode(&buf[..n]).unwrap(),
            Message::Goodbye([1, 2, 3].to_vec())
        );
    }

    #[test]
    fn full_batch_refuses_instead_of_overflowing() {
        let mut buf = [0u8; 100];
        let mut batch = SampleBatch::new(&mut buf);
        assert!(batch.push(1, 0, 0, 0, &[1, 2, 3, 4, 5, 6, 7]));
        assert!(!batch.push(1, 0, 0, 0, &[1, 2, 3, 4, 5, 6, 7]));
        assert_eq!(batch.count(), 1);
    }

    #[test]
    fn every_truncation_is_an_error_not_a_panic() {
        let mut buf = [0u8; 512];
        let n = encode_hello(&mut buf, &hello_info(b"x")).unwrap();
        for cut in 0..n {
            assert!(decode(&buf[..cut]).is_err(), "cut at {cut}");
        }
    }

    #[test]
    fn hostile_lengths_are_rejected() {
        let mut buf = [0u8; 64];
        let mut w = Writer::message(&mut buf, Kind::Log);
        w.u8(1);
        w.u32(u32::MAX);
        let n = w.finish().unwrap();
        assert!(decode(&buf[..n]).is_err());
        let mut w = Writer::message(&mut buf, Kind::Counters);
        w.u16(u16::MAX);
        let n = w.finish().unwrap();
        assert_eq!(decode(&buf[..n]), Err(DecodeError::Truncated));
    }
}
