//! `anyprof_wire::decode_command`, the allocation-free decoder the preload runs on what the
//! collector sends: never panics, and agrees with the encoder.
#![no_main]

use anyprof_wire::{decode_command, encode_command};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Some(cmd) = decode_command(data) {
        let mut buf = [0u8; 64];
        let n = encode_command(&mut buf, cmd).expect("a command fits in 64 bytes");
        // The decoder reads a prefix; what it read re-encodes to the same bytes, except the
        // argument of a stop, which is ignored.
        let mut back = buf[..n].to_vec();
        if cmd == anyprof_wire::Command::CpuStop {
            back[9..13].copy_from_slice(&data[9..13]);
        }
        assert_eq!(&data[..n], &back[..]);
    }
});
