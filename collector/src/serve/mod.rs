//! `anyprof serve`: the host daemon. Preloaded processes connect to its Unix socket; it serves
//! net/http/pprof-compatible endpoints for each of them over HTTP, so that
//! `go tool pprof http://127.0.0.1:6060/debug/pprof/profile?seconds=10&pid=1234` works against
//! a C++ or Rust service exactly as against a Go service.
//!
//! Processes come and go: each connects (and reconnects after a daemon restart) by itself;
//! ended connections are reaped, with their reader threads and descriptors. CPU sampling
//! runs in a process only while a `profile` request for it is in progress.

pub mod http;

use std::net::SocketAddr;
use std::path::PathBuf;
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
    /// HTTP address for the pprof endpoints. Loopback by default: profiles reveal code and
    /// data layout, so listening on other interfaces is for you to choose explicitly
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:6060")]
    pub http: SocketAddr,
    /// Also accept processes of this uid (repeatable); by default only the daemon's own uid
    /// and root may connect
    #[arg(long = "allow-uid", value_name = "UID")]
    pub allow_uid: Vec<u32>,
    /// Longest CPU profile a request may ask for, in seconds
    #[arg(long, value_name = "SECS", default_value_t = 300)]
    pub max_seconds: u64,
    /// Most profile data kept per connected process, in MiB (stacks, modules, thread names
    /// and dumps, heap buckets); past it, new data from that process is dropped and counted,
    /// with one warning. 0: no cap
    #[arg(long, value_name = "MIB", default_value_t = crate::ingest::DEFAULT_MAX_PROCESS_MIB)]
    pub max_process_memory: usize,
    /// Requests served at once; more wait for a free worker
    #[arg(long, value_name = "N", default_value_t = 32)]
    pub workers: usize,
    /// Print the processes' informational messages and every refused connection
    #[arg(short, long)]
    pub verbose: bool,
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
            allowed_uids: Some(allowed),
            reap: true,
            max_process_bytes: (args.max_process_memory > 0)
                .then(|| args.max_process_memory.saturating_mul(1 << 20)),
        },
    )?);
    let server = tiny_http::Server::http(args.http)
        .map_err(|e| anyhow::anyhow!("{e}"))
        .with_context(|| format!("cannot listen for HTTP on {}", args.http))?;
    eprintln!(
        "anyprof serve: processes connect to {}; pprof endpoints at http://{}/debug/pprof/",
        socket.display(),
        args.http
    );
    let server = Arc::new(server);
    let state = Arc::new(http::State::new(collector.clone(), args.max_seconds));
    let workers: Vec<_> = (0..args.workers.max(1))
        .map(|i| {
            let (server, state) = (server.clone(), state.clone());
            std::thread::Builder::new()
                .name(format!("http-{i}"))
                .spawn(move || {
                    while let Ok(request) = server.recv() {
                        http::handle(&state, request);
                    }
                })
        })
        .collect::<std::io::Result<_>>()?;
    wait_for_termination();
    // Each call wakes one worker blocked in recv(): one per worker.
    for _ in 0..workers.len() {
        server.unblock();
    }
    for w in workers {
        let _ = w.join();
    }
    drop(collector); // removes the socket file
    Ok(std::process::ExitCode::SUCCESS)
}

/// Blocks until SIGINT or SIGTERM.
fn wait_for_termination() {
    use nix::sys::signal::{SigSet, Signal};
    let mut set = SigSet::empty();
    set.add(Signal::SIGINT);
    set.add(Signal::SIGTERM);
    // Block them in this thread (threads spawned later inherit the mask), then wait.
    let _ = set.thread_block();
    let _ = set.wait();
}
