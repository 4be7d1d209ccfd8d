//! Symbolizes addresses of an ELF file from the command line, or times a whole-file run.
//!
//! ```text
//! cargo run --release -p anyprof-symbolizer --example symbolize -- FILE [HEX_ADDRESS...]
//! ```
//!
//! With addresses (file virtual addresses, as `nm` prints them), prints each answer. Without,
//! it is a small benchmark: it symbolizes the middle of every function in FILE's symbol tables
//! twice, once with an empty cache (opening the file, parsing what the lookups need) and once
//! warm, and prints the time per address.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyprof_symbolizer::{ObjectRef, Symbolized, Symbolizer};
use object::{Object, ObjectSymbol, SymbolKind};

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let Some(path) = args.next().map(PathBuf::from) else {
        eprintln!("usage: symbolize FILE [HEX_ADDRESS...]");
        return ExitCode::from(2);
    };
    let mut addresses = Vec::new();
    for arg in args {
        match u64::from_str_radix(arg.trim_start_matches("0x"), 16) {
            Ok(address) => addresses.push(address),
            Err(err) => {
                eprintln!("{arg:?} is not a hex address ({err}); give addresses as nm prints them");
                return ExitCode::from(2);
            }
        }
    }
    let object = ObjectRef {
        path: &path,
        build_id: &[],
    };
    let mut symbolizer = Symbolizer::new();

    if !addresses.is_empty() {
        for (address, answer) in addresses
            .iter()
            .zip(symbolizer.symbolize(&object, &addresses))
        {
            println!("{address:#x}");
            match answer {
                Symbolized::Frames(frames) => {
                    for frame in frames {
                        println!(
                            "  {} at {}:{}",
                            frame.function.as_deref().unwrap_or("??"),
                            frame.file.as_deref().unwrap_or("??"),
                            frame.line.map_or("?".to_owned(), |l| l.to_string()),
                        );
                    }
                }
                Symbolized::Miss(miss) => println!("  miss: {miss}"),
            }
        }
        return ExitCode::SUCCESS;
    }

    let data = match std::fs::read(&path) {
        Ok(data) => data,
        Err(err) => {
            eprintln!("cannot read {}: {err}", path.display());
            return ExitCode::FAILURE;
        }
    };
    let Ok(file) = object::File::parse(&*data) else {
        eprintln!("{} is not an object file", path.display());
        return ExitCode::FAILURE;
    };
    addresses = file
        .symbols()
        .chain(file.dynamic_symbols())
        .filter(|s| s.kind() == SymbolKind::Text && s.is_definition() && s.size() > 0)
        .map(|s| s.address() + s.size() / 2)
        .collect();
    addresses.sort_unstable();
    addresses.dedup();
    if addresses.is_empty() {
        eprintln!("{} has no function symbols to time", path.display());
        return ExitCode::FAILURE;
    }
    for run in ["cold", "warm"] {
        let start = Instant::now();
        let answers = symbolizer.symbolize(&object, &addresses);
        let elapsed = start.elapsed();
        let frames: usize = answers
            .iter()
            .map(|a| match a {
                Symbolized::Frames(frames) => frames.len(),
                Symbolized::Miss(_) => 0,
            })
            .sum();
        let misses = answers
            .iter()
            .filter(|a| matches!(a, Symbolized::Miss(_)))
            .count();
        println!(
            "{run}: {} addresses, {frames} frames, {misses} misses in {elapsed:?} ({:.0} ns/address)",
            addresses.len(),
            elapsed.as_nanos() as f64 / addresses.len() as f64
        );
    }
    ExitCode::SUCCESS
}
