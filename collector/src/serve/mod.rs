//! `anyprof serve`: the host daemon. Preloaded processes connect to its Unix socket; it serves
//! net/http/pprof-compatible endpoints for each of them over HTTP, so that
//! `go tool pprof http://127.0.0.1:6060/debug/pprof/profile?seconds=10&pid=1234` works against
//! a C++ or Rust service exactly as against a Go service.
//!
//! Processes come and go: each connects (and reconnects after a daemon restart) by itself;
//! ended connections are reaped, with their reader threads and descriptors. CPU sampling
//! runs in a process only while a `profile` request for it is in progress.
//!
//! Who may see which process over HTTP is [`access`]'s rule; the limits that keep hostile or
//! slow clients from taking the daemon down are [`server`]'s.

pub mod access;
pub mod http;
pub mod server;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::Args;

use crate::collect::{Collector, Options};

/// Arguments of `anyprof serve`.
#[derive(Args, Debug, Clone)]
pub struct ServeArgs {
    /// Unix socket that preloaded processes connect to [default: /run/anyprof.sock as root,
    /// else $XDG_RUNTIME_DIR/anyprof.sock, else /tmp/anyprof-UID/anyprof.sock in a private
    /// directory]. Its directory must be writable only by root or you
    #[arg(long, value_name = "PATH", env = "ANYPROF_SOCKET")]
    pub socket: Option<PathBuf>,
    /// HTTP address for the pprof endpoints. Loopback by default, where each local user sees
    /// the processes it could ptrace (root: all). Any other address needs
    /// --expose-profiles-to-network
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:6060")]
    pub http: SocketAddr,
    /// Serve every connected process's profiles, stacks and command lines to whoever holds the
    /// daemon's token, on the --http address even if it is not loopback. The token is made at
    /// start and written to --token-file; requests carry it as ?token=T or
    /// `Authorization: Bearer T`
    #[arg(long)]
    pub expose_profiles_to_network: bool,
    /// Where --expose-profiles-to-network writes the token (readable by the daemon's user
    /// and the group `anyprof` if it exists) [default: /run/anyprof.token as root, else
    /// $XDG_RUNTIME_DIR/anyprof.token]
    #[arg(long, value_name = "PATH")]
    pub token_file: Option<PathBuf>,
    /// Also accept processes of this uid (repeatable); by default only the daemon's own uid
    /// and root may connect
    #[arg(long = "allow-uid", value_name = "UID")]
    pub allow_uid: Vec<u32>,
    /// Which processes started without the preload `/debug/pprof/profile?pid=P` may attach
    /// to with perf events (as `anyprof attach` does): `own`, a local user's request profiles
    /// the processes that user could ptrace, and root's and token holders' requests none;
    /// `any`, root's and token holders' requests profile every process too; `off`, only
    /// preloaded processes are profiled
    #[arg(long, value_enum, value_name = "WHO", default_value_t = http::AttachPolicy::Own)]
    pub attach: http::AttachPolicy,
    /// Longest CPU profile a request may ask for, in seconds
    #[arg(long, value_name = "SECS", default_value_t = 300)]
    pub max_seconds: u64,
    /// Most profile data kept per connected process, in MiB (stacks, modules, thread names
    /// and dumps, heap buckets); past it, new data from that process is dropped and counted,
    /// with one warning. 0: no cap
    #[arg(long, value_name = "MIB", default_value_t = crate::ingest::DEFAULT_MAX_PROCESS_MIB)]
    pub max_process_memory: usize,
    /// Most profile data kept for all the processes of one user together, in MiB, so that
    /// many connections cannot multiply --max-process-memory (root's processes have no such
    /// cap). 0: no cap
    #[arg(long, value_name = "MIB", default_value_t = crate::ingest::DEFAULT_MAX_USER_MIB)]
    pub max_user_memory: usize,
    /// Preloaded processes one non-root user may have connected at once (each costs the
    /// daemon a thread and two descriptors); more are closed when they connect, with a
    /// warning naming the uid at most once a minute. Root's processes have no such cap. 0: no
    /// cap
    #[arg(long, value_name = "N", default_value_t = crate::collect::DEFAULT_MAX_PROCESSES_PER_USER)]
    pub max_processes_per_user: usize,
    /// Short requests served at once; more wait for a free worker
    #[arg(long, value_name = "N", default_value_t = 32)]
    pub workers: usize,
    /// Long requests (`profile`, `heap?seconds=`, `allocs?seconds=`) served at once, apart
    /// from the short ones; more are refused (503). One non-root user may hold a quarter
    #[arg(long, value_name = "N", default_value_t = 32)]
    pub max_long_requests: usize,
    /// HTTP connections open at once; more are closed when accepted
    #[arg(long, value_name = "N", default_value_t = 512)]
    pub max_connections: usize,
    /// HTTP connections one local user (or, exposed, one remote address) may have open at
    /// once; root has no such cap
    #[arg(long, value_name = "N", default_value_t = 32)]
    pub max_connections_per_user: usize,
    /// Print the processes' informational messages and every refused connection
    #[arg(short, long)]
    pub verbose: bool,
    /// Serve profiles with addresses, mappings and build ids only, no names (and answer
    /// /debug/pprof/symbol with none): for a host without debug information. `anyprof
    /// symbolize` names a saved profile later where the binaries or debug files are
    #[arg(long = "no-symbolize")]
    pub no_symbolize: bool,
}

/// The daemon's default socket path (the preload tries the same places, with the same
/// checks): `/run/anyprof.sock` as root; else `$XDG_RUNTIME_DIR/anyprof.sock` if that
/// directory is ours and not writable by others; else `anyprof.sock` in the private
/// directory `/tmp/anyprof-UID`, created mode 0700 if missing and refused unless it is a
/// real directory of ours with mode 0700 (anyone can create a name in /tmp first).
pub fn default_socket() -> Result<PathBuf> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
    // SAFETY: geteuid cannot fail.
    let euid = unsafe { libc::geteuid() };
    if euid == 0 {
        return Ok(PathBuf::from("/run/anyprof.sock"));
    }
    let advice = "set XDG_RUNTIME_DIR to a directory only you can write to, or pass --socket PATH";
    if let Some(dir) = std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        let dir = PathBuf::from(dir);
        let meta = std::fs::metadata(&dir)
            .with_context(|| format!("XDG_RUNTIME_DIR={} cannot be used", dir.display()))?;
        if !meta.is_dir() || meta.uid() != euid || meta.mode() & 0o022 != 0 {
            anyhow::bail!(
                "XDG_RUNTIME_DIR={} is not a directory of yours that only you can write to \
                 (owner uid {}, mode {:o}): {advice}",
                dir.display(),
                meta.uid(),
                meta.mode() & 0o7777
            );
        }
        return Ok(dir.join("anyprof.sock"));
    }
    let dir = PathBuf::from(format!("/tmp/anyprof-{euid}"));
    match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
        Ok(()) => {
            // The umask may have taken bits away; nobody else can rename our entry in
            // the sticky /tmp, so this is still our directory.
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
                .with_context(|| format!("cannot make {} private", dir.display()))?;
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => {
            return Err(e).with_context(|| format!("cannot create {}; {advice}", dir.display()))
        }
    }
    let meta = std::fs::symlink_metadata(&dir)
        .with_context(|| format!("cannot examine {}", dir.display()))?;
    if !meta.file_type().is_dir() || meta.uid() != euid || meta.mode() & 0o7777 != 0o700 {
        anyhow::bail!(
            "{} is not a private directory of yours (a {}, owner uid {}, mode {:o}; expected a \
             directory of uid {euid} with mode 700): someone else may have created it to \
             receive your processes' profiles. Remove it, or {advice}",
            dir.display(),
            if meta.file_type().is_symlink() {
                "symlink"
            } else if meta.is_dir() {
                "directory"
            } else {
                "file"
            },
            meta.uid(),
            meta.mode() & 0o7777
        );
    }
    Ok(dir.join("anyprof.sock"))
}

/// Runs the daemon until it is killed (SIGINT and SIGTERM end it cleanly).
pub fn run(args: ServeArgs) -> Result<std::process::ExitCode> {
    // Before any thread starts, so that every thread inherits the mask and the signals
    // reach only `wait_for_termination`.
    let signals = block_termination_signals();
    if args.no_symbolize {
        crate::symbolize::NO_SYMBOLIZE.store(true, Ordering::SeqCst);
    }
    let exposed = args.expose_profiles_to_network;
    if !exposed && !access::is_loopback(args.http.ip()) {
        anyhow::bail!(
            "refusing to serve profiles on {}: it is not a loopback address, so anyone who can \
             reach it could read the memory layout, stacks and command lines of every \
             connected process. Listen on 127.0.0.1 (the default; each local user then sees \
             the processes it could ptrace), or pass --expose-profiles-to-network to serve \
             every process to the holders of a token the daemon writes to a file only root \
             (and the group anyprof) can read",
            args.http
        );
    }
    let token =
        if exposed {
            let file = args.token_file.clone().or_else(access::Token::default_file).context(
            "--expose-profiles-to-network needs a place for its token: pass --token-file PATH \
             (XDG_RUNTIME_DIR is not set)",
        )?;
            Some(access::Token::create(&file)?)
        } else {
            None
        };
    let socket = match args.socket.clone() {
        Some(socket) => socket,
        None => default_socket()?,
    };
    // SAFETY: geteuid cannot fail.
    let euid = unsafe { libc::geteuid() };
    let mut allowed = vec![euid, 0];
    allowed.extend(&args.allow_uid);
    allowed.sort_unstable();
    allowed.dedup();
    let collector = Arc::new(Collector::listen_at(
        socket.clone(),
        Options {
            verbose: args.verbose,
            trace_mem: false,
            read_regions_live: false,
            allowed_uids: Some(allowed),
            reap: true,
            max_process_bytes: (args.max_process_memory > 0)
                .then(|| args.max_process_memory.saturating_mul(1 << 20)),
            max_user_bytes: (args.max_user_memory > 0)
                .then(|| args.max_user_memory.saturating_mul(1 << 20)),
            max_connections_per_user: (args.max_processes_per_user > 0)
                .then_some(args.max_processes_per_user),
            hello_timeout: Some(crate::collect::HELLO_TIMEOUT),
        },
    )?);
    let token_note = token.as_ref().map(|t| {
        format!(
            "; exposed: every request needs the token in {} (?token=T or Authorization: Bearer T)",
            t.file().display()
        )
    });
    let state =
        Arc::new(http::State::new(collector.clone(), args.max_seconds).attaching(args.attach));
    let server = server::Server::start(
        server::Config {
            addr: args.http,
            workers: args.workers,
            long_requests: args.max_long_requests,
            max_connections: args.max_connections,
            max_connections_per_user: args.max_connections_per_user,
            max_seconds: args.max_seconds,
            token,
        },
        state,
    )?;
    eprintln!(
        "anyprof serve: processes connect to {}; pprof endpoints at http://{}/debug/pprof/{}",
        socket.display(),
        args.http,
        token_note.unwrap_or_default()
    );
    wait_for_termination(signals);
    server.shutdown();
    drop(collector); // removes the socket file
    Ok(std::process::ExitCode::SUCCESS)
}

/// Blocks SIGINT and SIGTERM in this thread (threads started later inherit the mask).
fn block_termination_signals() -> nix::sys::signal::SigSet {
    use nix::sys::signal::{SigSet, Signal};
    let mut set = SigSet::empty();
    set.add(Signal::SIGINT);
    set.add(Signal::SIGTERM);
    let _ = set.thread_block();
    set
}

/// Blocks until SIGINT or SIGTERM.
fn wait_for_termination(set: nix::sys::signal::SigSet) {
    let _ = set.wait();
}
