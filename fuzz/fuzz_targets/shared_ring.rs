//! The message ring of a process's shared region (`anyprof_wire::shared`) as the collector
//! reads it: the process controls the ring's positions and every byte of its data, so any
//! contents must give messages, `Ok(None)` or a `RingError` — never a panic, a read outside
//! the ring, or a message longer than `MAX_MESSAGE` — and a ring the writer filled must give
//! back exactly what was written.
#![no_main]

use std::sync::atomic::Ordering;
use std::sync::OnceLock;

use anyprof_wire::shared::{
    message_read_into, message_write, MessageRing, Shared, MESSAGE_RING_BYTES,
};
use anyprof_wire::MAX_MESSAGE;
use libfuzzer_sys::fuzz_target;

/// One ring for every input (it is 4 MiB): each input resets what it uses.
fn ring() -> &'static MessageRing {
    static REGION: OnceLock<Box<Shared>> = OnceLock::new();
    // SAFETY: all-zero is a valid Shared (atomics and plain integers only).
    &REGION
        .get_or_init(|| unsafe { Box::<Shared>::new_zeroed().assume_init() })
        .messages
}

fn word(data: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    for (i, x) in b.iter_mut().enumerate() {
        *x = data.get(at + i).copied().unwrap_or(0);
    }
    u64::from_le_bytes(b)
}

fuzz_target!(|data: &[u8]| {
    let ring = ring();
    let mut out = vec![0u8; MAX_MESSAGE];
    if data.first().is_some_and(|b| b & 1 == 0) {
        // Hostile: positions and bytes straight from the input.
        let tail = word(data, 1);
        let head = tail.wrapping_add(word(data, 9) % (2 * MESSAGE_RING_BYTES as u64));
        ring.tail.0.store(tail, Ordering::Relaxed);
        ring.head.0.store(head, Ordering::Relaxed);
        let bytes = data.get(17..).unwrap_or(&[]);
        let start = (tail % MESSAGE_RING_BYTES as u64) as usize;
        // SAFETY: the ring is ours alone here; the copy stays inside `data`.
        let dst = unsafe { &mut *ring.data.get() };
        for (i, b) in bytes.iter().enumerate() {
            if let Some(d) = dst.get_mut((start + i) % MESSAGE_RING_BYTES) {
                *d = *b;
            }
        }
        for _ in 0..4096 {
            // SAFETY: `ring` is a valid MessageRing.
            match unsafe { message_read_into(ring, &mut out) } {
                Ok(Some(n)) => assert!(n <= MAX_MESSAGE),
                Ok(None) | Err(_) => break,
            }
        }
    } else {
        // Honest: messages cut from the input, written then read back, across a wrap.
        let start = word(data, 1) & !7;
        ring.tail.0.store(start, Ordering::Relaxed);
        ring.head.0.store(start, Ordering::Relaxed);
        let mut written = Vec::new();
        for chunk in data.get(9..).unwrap_or(&[]).chunks(97) {
            if message_write(ring, chunk) {
                written.push(chunk.to_vec());
            }
        }
        for expected in written {
            // SAFETY: `ring` is a valid MessageRing.
            let n = unsafe { message_read_into(ring, &mut out) }
                .expect("a ring our writer filled reads back")
                .expect("every written message is there");
            assert_eq!(out.get(..n), Some(expected.as_slice()));
        }
        // SAFETY: as above.
        assert_eq!(unsafe { message_read_into(ring, &mut out) }, Ok(None));
    }
});
