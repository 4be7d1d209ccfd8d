//! `anyprof symbolize IN -o OUT [--debug-dir DIR]...`: adds functions, files, lines and inline
//! frames to a profile written without them (`anyprof record --no-symbolize`, `anyprof serve
//! --no-symbolize`), on a host where the binaries or their debug files are.
//!
//! This file is the command: it reads and checks the input, refuses to replace a file it was
//! not asked to, and writes the result through a temporary file and a rename (so `-o IN`
//! names the profile in place without ever leaving half of it). The naming itself is
//! [`anyprof::offline`]'s.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::Args;
use prost::Message;

use anyprof::offline::{MappingOutcome, Report};
use anyprof::pprof::Profile;

/// Arguments of `anyprof symbolize`.
#[derive(Args, Debug)]
pub struct SymbolizeArgs {
    /// The profile to name: a .pb.gz that `anyprof record --no-symbolize` or `anyprof serve
    /// --no-symbolize` wrote (any pprof profile with mappings and build ids will do)
    #[arg(value_name = "IN")]
    pub input: PathBuf,
    /// Where to write the named profile (IN itself to name it in place)
    #[arg(short = 'o', long = "output", value_name = "OUT")]
    pub output: PathBuf,
    /// Also look here for the binaries and debug files, by build id (DIR/.build-id/xx/rest
    /// and DIR/.build-id/xx/rest.debug, as /usr/lib/debug and debuginfod caches hold them) and
    /// by file name (DIR/libfoo.so); repeatable, searched in order before /usr/lib/debug
    #[arg(long = "debug-dir", value_name = "DIR")]
    pub debug_dirs: Vec<PathBuf>,
    /// Replace OUT if it exists
    #[arg(short, long)]
    pub force: bool,
    /// Print nothing but warnings
    #[arg(short, long)]
    pub quiet: bool,
}

/// Runs `anyprof symbolize`.
pub fn run(args: SymbolizeArgs) -> Result<ExitCode> {
    for dir in &args.debug_dirs {
        if !dir.is_dir() {
            bail!(
                "--debug-dir {} is not a directory: pass a directory that holds the binaries \
                 or their debug files (as DIR/.build-id/xx/rest[.debug] or by file name)",
                dir.display()
            );
        }
    }
    let profile = read_profile(&args.input)?;
    if args.output.exists() && !args.force && !same_file(&args.input, &args.output) {
        bail!(
            "{} exists: pass --force to replace it, or another -o (-o {} names the profile in \
             place)",
            args.output.display(),
            args.input.display()
        );
    }
    let mut symbolizer = anyprof::symbolize::new_symbolizer(&args.debug_dirs, args.quiet);
    let (profile, report) =
        anyprof::offline::symbolize_profile(profile, &mut symbolizer, &args.debug_dirs);
    warn_unnamed(&report);
    anyprof::output::write_atomic_replacing(
        &args.output,
        &anyprof::pprof::encode_gzipped(&profile),
    )?;
    if !args.quiet {
        print_report(&report, &args.output);
    }
    Ok(ExitCode::SUCCESS)
}

/// Reads a pprof profile (gzip-compressed or plain), with one message that says what is
/// wrong with a file that is not one.
fn read_profile(path: &Path) -> Result<Profile> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let wanted = "pass a profile that anyprof record or anyprof serve wrote (cpu.pb.gz, \
                  heap.pb.gz, allocs.pb.gz, ...)";
    let raw = if bytes.starts_with(&[0x1f, 0x8b]) {
        match anyprof::pprof::gunzip_capped(&bytes, anyprof::pprof::MAX_DECOMPRESSED) {
            Ok(raw) => raw,
            Err(e) if e.kind() == std::io::ErrorKind::FileTooLarge => bail!(
                "{} is not a profile anyprof will read: {e}; {wanted}",
                path.display()
            ),
            Err(e) => bail!(
                "{} is gzip-compressed but cannot be decompressed ({e}); it may be cut short: \
                 {wanted}",
                path.display()
            ),
        }
    } else {
        bytes
    };
    let profile = Profile::decode(&raw[..]).ok().filter(looks_like_a_profile);
    profile.with_context(|| {
        format!(
            "{} is not a pprof profile (neither a gzip-compressed nor a plain profile \
             protobuf): {wanted}",
            path.display()
        )
    })
}

/// What pprof checks first (`string_table[0]` is ""), and that the strings that name the
/// mappings exist: a file of another kind that happens to decode fails these.
fn looks_like_a_profile(p: &Profile) -> bool {
    let strings = p.string_table.len() as i64;
    let in_range = |i: i64| (0..strings).contains(&i);
    p.string_table.first().is_some_and(String::is_empty)
        && p.mapping
            .iter()
            .all(|m| m.id != 0 && in_range(m.filename) && in_range(m.build_id))
        && p.location.iter().all(|l| l.id != 0)
}

/// Whether `a` and `b` name the same existing file.
fn same_file(a: &Path, b: &Path) -> bool {
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

/// One warning per mapping whose locations stay unnamed for a reason the user can fix.
fn warn_unnamed(report: &Report) {
    for (file, build_id, outcome) in &report.mappings {
        let build_id_text = if build_id.is_empty() {
            "no build id".to_string()
        } else {
            format!("build id {build_id}")
        };
        match outcome {
            MappingOutcome::NotFound { unnamed } => {
                let layout = match build_id.get(..2) {
                    Some(first) if build_id.len() > 2 => format!(
                        "DIR/.build-id/{first}/{}.debug or the binary as \
                         DIR/.build-id/{first}/{}",
                        &build_id[2..],
                        &build_id[2..]
                    ),
                    _ => "the binary under its own name".to_string(),
                };
                eprintln!(
                    "anyprof: no file for {file} ({build_id_text}): its {unnamed} location(s) \
                     stay unnamed. Pass --debug-dir DIR with {layout}, or run this where \
                     {file} is installed"
                );
            }
            MappingOutcome::BuildIdMismatch {
                path,
                found,
                unnamed,
            } => {
                let found = if found.is_empty() { "none" } else { found };
                eprintln!(
                    "anyprof: warning: {} is not the {file} that was profiled (its build id is \
                     {found}, the profile's {build_id}): not used, so as not to attach wrong \
                     names; its {unnamed} location(s) stay unnamed. Pass --debug-dir DIR \
                     with that build's binary or debug file",
                    path.display()
                );
            }
            MappingOutcome::Unplaceable { path, why, unnamed } => eprintln!(
                "anyprof: warning: {} has the build id of {file} but does not match where it \
                 was loaded ({why}): its {unnamed} location(s) stay unnamed",
                path.display()
            ),
            MappingOutcome::NoFile { .. } | MappingOutcome::Named { .. } => {}
        }
    }
}

fn print_report(report: &Report, output: &Path) {
    let found = report
        .mappings
        .iter()
        .filter(|(_, _, o)| matches!(o, MappingOutcome::Named { .. }))
        .count();
    if report.unnamed == 0 {
        eprintln!(
            "anyprof: every location already had a name ({}); nothing to add",
            report.already_named
        );
    } else {
        eprintln!(
            "anyprof: named {} of {} unnamed location(s), in {found} of {} module(s)",
            report.named,
            report.unnamed,
            report.mappings.len()
        );
        if report.already_named > 0 {
            eprintln!(
                "anyprof: {} location(s) had names already and were left as they were",
                report.already_named
            );
        }
    }
    eprintln!(
        "anyprof: wrote {0}  (view it with: go tool pprof -top {0})",
        output.display()
    );
}
