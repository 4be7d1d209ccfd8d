//! Symbolization throughput: addresses per second, cold and warm, for one ELF file.
//!
//! ```text
//! cargo run --release -p anyprof-symbolizer --example throughput -- [--addresses N] [--repeat K] FILE
//! ```
//!
//! Picks N addresses (default 20000) spread evenly over FILE's function symbols — every
//! function gets its share, at pseudo-random offsets inside it, and the batch is shuffled, as
//! the addresses of a profile arrive — and times three ways of asking for them:
//!
//! - **cold**: a new [`Symbolizer`] per batch, so opening the file, mapping it and parsing the
//!   DWARF units and symbol tables the addresses touch are included (the file itself is in the
//!   page cache after the first repeat);
//! - **warm**: the same batch again on a symbolizer that has answered it once;
//! - **warm, 1 per call**: one address per call on a warm symbolizer, which adds the per-call
//!   cost (cache lookup, the check that the file was not replaced).
//!
//! Each is repeated K times (default 5); the median rate is printed with the min–max range.
//! This is what `bench/run.sh` runs; `examples/symbolize.rs` answers single addresses.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyprof_symbolizer::{ObjectRef, Symbolized, Symbolizer};
use object::{Object, ObjectSection, ObjectSymbol, SymbolKind};

/// At most this many single-address calls per repeat of the "1 per call" run.
const SINGLE_CALLS: usize = 2000;

struct Options {
    path: PathBuf,
    addresses: usize,
    repeat: usize,
}

fn parse_args() -> Result<Options, String> {
    let mut path = None;
    let mut addresses = 20_000;
    let mut repeat = 5;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut number = |name: &str| -> Result<usize, String> {
            let value = args.next().ok_or(format!("{name} needs a number"))?;
            match value.parse() {
                Ok(n) if n > 0 => Ok(n),
                _ => Err(format!("{name} needs a positive number, not {value:?}")),
            }
        };
        match arg.as_str() {
            "--addresses" => addresses = number("--addresses")?,
            "--repeat" => repeat = number("--repeat")?,
            _ if arg.starts_with('-') => return Err(format!("unknown option {arg}")),
            _ if path.is_none() => path = Some(PathBuf::from(arg)),
            _ => return Err("give one FILE".to_owned()),
        }
    }
    let path = path.ok_or("give the ELF FILE to symbolize in")?;
    Ok(Options {
        path,
        addresses,
        repeat,
    })
}

/// A small deterministic generator (xorshift64*), so every run times the same addresses.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// What the file offers: (address, size) of each distinct function, and whether it has DWARF.
fn functions(data: &[u8]) -> Result<(Vec<(u64, u64)>, bool), String> {
    let file = object::File::parse(data).map_err(|err| format!("not an object file: {err}"))?;
    let mut functions: Vec<(u64, u64)> = file
        .symbols()
        .chain(file.dynamic_symbols())
        .filter(|s| s.kind() == SymbolKind::Text && s.is_definition() && s.size() > 0)
        .map(|s| (s.address(), s.size()))
        .collect();
    functions.sort_unstable();
    // Aliases (several names for one function, as libc has) count once.
    functions.dedup_by_key(|&mut (address, _)| address);
    let dwarf = file
        .section_by_name(".debug_info")
        .is_some_and(|s| s.size() > 0);
    Ok((functions, dwarf))
}

/// N addresses spread evenly over the functions, at random offsets inside them, shuffled.
fn pick_addresses(functions: &[(u64, u64)], n: usize) -> Vec<u64> {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut addresses: Vec<u64> = (0..n)
        .map(|i| {
            let (address, size) = functions[i * functions.len() / n];
            address + rng.below(size)
        })
        .collect();
    for i in (1..addresses.len()).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        addresses.swap(i, j);
    }
    addresses
}

/// Hits, hits with a source line, frames in all, and misses by reason.
#[derive(Default, PartialEq)]
struct Tally {
    hits: usize,
    with_line: usize,
    frames: usize,
    misses: BTreeMap<String, usize>,
}

impl Tally {
    fn of(answers: &[Symbolized]) -> Tally {
        let mut tally = Tally::default();
        for answer in answers {
            match answer {
                Symbolized::Frames(frames) => {
                    tally.hits += 1;
                    tally.frames += frames.len();
                    if frames.iter().any(|f| f.line.is_some()) {
                        tally.with_line += 1;
                    }
                }
                Symbolized::Miss(miss) => *tally.misses.entry(miss.to_string()).or_default() += 1,
            }
        }
        tally
    }

    fn misses(&self) -> usize {
        self.misses.values().sum()
    }
}

/// One timed way of symbolizing: per-repeat durations for `count` addresses.
struct Run {
    name: &'static str,
    count: usize,
    times: Vec<Duration>,
    tally: Tally,
}

impl Run {
    fn rates(&self) -> Vec<f64> {
        let mut rates: Vec<f64> = self
            .times
            .iter()
            .map(|t| self.count as f64 / t.as_secs_f64())
            .collect();
        rates.sort_by(f64::total_cmp);
        rates
    }
}

fn human_rate(rate: f64) -> String {
    if rate >= 1e6 {
        format!("{:.2} M/s", rate / 1e6)
    } else {
        format!("{:.1} k/s", rate / 1e3)
    }
}

fn main() -> ExitCode {
    let options = match parse_args() {
        Ok(options) => options,
        Err(err) => {
            eprintln!("throughput: {err}");
            eprintln!("usage: throughput [--addresses N] [--repeat K] FILE");
            return ExitCode::from(2);
        }
    };
    let path = &options.path;
    let data = match std::fs::read(path) {
        Ok(data) => data,
        Err(err) => {
            eprintln!("throughput: cannot read {}: {err}", path.display());
            return ExitCode::FAILURE;
        }
    };
    let (functions, dwarf) = match functions(&data) {
        Ok(found) => found,
        Err(err) => {
            eprintln!("throughput: {}: {err}", path.display());
            return ExitCode::FAILURE;
        }
    };
    drop(data);
    if functions.is_empty() {
        eprintln!("throughput: {} has no function symbols", path.display());
        return ExitCode::FAILURE;
    }
    let addresses = pick_addresses(&functions, options.addresses);
    let object = ObjectRef {
        path,
        build_id: &[],
    };

    // Cold: a new symbolizer per repeat.
    let mut cold = Run {
        name: "cold (new Symbolizer)",
        count: addresses.len(),
        times: Vec::new(),
        tally: Tally::default(),
    };
    for _ in 0..options.repeat {
        let mut symbolizer = Symbolizer::new();
        let start = Instant::now();
        let answers = std::hint::black_box(symbolizer.symbolize(&object, &addresses));
        cold.times.push(start.elapsed());
        cold.tally = Tally::of(&answers);
    }

    // Warm: the same symbolizer, asked for the same batch again.
    let mut symbolizer = Symbolizer::new();
    let first = Tally::of(&symbolizer.symbolize(&object, &addresses));
    let mut warm = Run {
        name: "warm (same Symbolizer)",
        count: addresses.len(),
        times: Vec::new(),
        tally: Tally::default(),
    };
    for _ in 0..options.repeat {
        let start = Instant::now();
        let answers = std::hint::black_box(symbolizer.symbolize(&object, &addresses));
        warm.times.push(start.elapsed());
        warm.tally = Tally::of(&answers);
    }

    // Warm, one address per call.
    let singles = &addresses[..addresses.len().min(SINGLE_CALLS)];
    let mut single = Run {
        name: "warm, 1 address per call",
        count: singles.len(),
        times: Vec::new(),
        tally: Tally::default(),
    };
    for _ in 0..options.repeat {
        let mut answers = Vec::with_capacity(singles.len());
        let start = Instant::now();
        for address in singles {
            answers.extend(symbolizer.symbolize(&object, std::slice::from_ref(address)));
        }
        single.times.push(start.elapsed());
        single.tally = Tally::of(std::hint::black_box(&answers));
    }

    let size = std::fs::metadata(path).map_or(0, |m| m.len());
    println!(
        "{} ({:.1} MiB, {} functions, {}): {} addresses, {} repeats",
        path.display(),
        size as f64 / (1024.0 * 1024.0),
        functions.len(),
        if dwarf {
            "DWARF in the file"
        } else {
            "no DWARF in the file"
        },
        addresses.len(),
        options.repeat,
    );
    println!(
        "  {:<27} {:>11} {:>21} {:>10} {:>12} {:>10} {:>7}",
        "run", "addresses", "median rate [min–max]", "time", "hits", "with line", "misses"
    );
    for run in [&cold, &warm, &single] {
        let rates = run.rates();
        let median = rates[rates.len() / 2];
        let mut times = run.times.clone();
        times.sort();
        println!(
            "  {:<27} {:>11} {:>10} [{:.2}–{:.2}x] {:>8.2} ms {:>12} {:>10} {:>7}",
            run.name,
            run.count,
            human_rate(median),
            rates[0] / median,
            rates[rates.len() - 1] / median,
            times[times.len() / 2].as_secs_f64() * 1e3,
            run.tally.hits,
            run.tally.with_line,
            run.tally.misses(),
        );
    }
    let frames_per_hit = warm.tally.frames as f64 / warm.tally.hits.max(1) as f64;
    println!("  {frames_per_hit:.2} frames per hit (inline chains)");
    if !dwarf && warm.tally.with_line > 0 {
        println!("  lines and inline frames come from a separate debug file (/usr/lib/debug)");
    }
    for (reason, count) in &warm.tally.misses {
        println!("  miss ×{count}: {reason}");
    }
    // The same addresses must get the same answers however they are asked.
    if first != warm.tally || first != cold.tally {
        eprintln!("throughput: cold and warm answers differ");
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}
