//! `anyprof`: profile unmodified native programs the way Go's pprof profiles Go programs.
//!
//! This file is the command line: it parses arguments, runs the subcommand and turns errors
//! into one message with its causes and an exit code.

use std::process::ExitCode;

use clap::Parser;

mod attach_cmd;
mod oom;
mod record;
mod symbolize_cmd;

/// Profile any native program: CPU (and soon heap) profiles in pprof format.
#[derive(Parser)]
#[command(name = "anyprof", version, about, long_about = None)]
enum Cli {
    /// Run a program with the profiler loaded and write its profiles when it exits.
    Record(record::RecordArgs),
    /// Run the host daemon: preloaded processes connect to it, and it serves
    /// net/http/pprof endpoints for each of them.
    Serve(anyprof::serve::ServeArgs),
    /// CPU-profile running processes that were started without the profiler (perf
    /// events; they are not stopped or restarted), into one pprof file.
    Attach(attach_cmd::AttachArgs),
    /// Add function names, files, lines and inline frames to a profile written with
    /// --no-symbolize, where the binaries or their debug files are.
    Symbolize(symbolize_cmd::SymbolizeArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli {
        Cli::Record(args) => record::run(args),
        Cli::Serve(args) => anyprof::serve::run(args),
        Cli::Symbolize(args) => symbolize_cmd::run(args),
        Cli::Attach(args) => attach_cmd::run(args),
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("anyprof: error: {err}");
            for cause in err.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            ExitCode::from(2)
        }
    }
}
