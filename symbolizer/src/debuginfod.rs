//! debuginfod: debug files fetched by build id from the servers `DEBUGINFOD_URLS` names, as
//! gdb, perf and the elfutils tools fetch them, and kept in the same cache.
//!
//! The protocol is one request: `GET <server>/buildid/<hex build id>/debuginfo` answers the
//! debug file or 404. The servers are tried in the order given; a server that cannot be
//! reached is left alone for a minute, and a build id that was not fetched is not asked for
//! again by the same client for ten minutes (a daemon keeps its client for months).
//!
//! # The cache, shared with gdb and perf
//!
//! `$DEBUGINFOD_CACHE_PATH`, else `$XDG_CACHE_HOME/debuginfod_client`, else
//! `~/.cache/debuginfod_client`, laid out as elfutils lays it out: `<cache>/<build id>/debuginfo`.
//! A file found there is used without asking any server. A download goes to a temporary file
//! in the same directory (created exclusively, mode 0600), is checked to be an ELF file with
//! the build id asked for, and only then renamed into place, so a partial or wrong file never
//! replaces a good one. A build id that no server has leaves an empty `debuginfo` (elfutils'
//! negative-cache mark): it is not asked again until it is older than `<cache>/cache_miss_s`
//! seconds (600 when that file is missing), as elfutils does. Files are written with the
//! rights of the process that symbolizes (never those of a profiled process).
//!
//! The cache is trusted only if another user cannot have put files in it: its directory is
//! checked once, when the client is made, without following a link (owned by this user or
//! root, writable by neither group nor others, not a symbolic link). A cache that fails the
//! check is not used at all, neither read nor written, and debuginfod is not asked (there is
//! nowhere to keep what it sends); one warning says so and what to change. Everything in it is
//! then reached through that opened directory: `<build id>` is made with `mkdirat`, files are
//! opened with `O_NOFOLLOW | O_NONBLOCK` and must be regular files, `cache_miss_s` is read to
//! at most 32 bytes.
//!
//! The caller may say, per client, that only objects owned by root and writable by no one
//! else are looked up ([`DebuginfodConfig::only_root_owned_objects`]): a daemon symbolizing
//! for other users turns it on, so that a user cannot make it download, for a build id of the
//! user's choosing, into root's cache.
//!
//! # Limits
//!
//! Each request gives up when the server has not connected, answered or sent data for
//! `$DEBUGINFOD_TIMEOUT` seconds (default [`DEFAULT_TIMEOUT`]; elfutils waits 90), and after
//! `$DEBUGINFOD_MAXTIME` seconds in all if that is set. A file larger than
//! `$DEBUGINFOD_MAXSIZE` bytes (default [`DEFAULT_MAX_SIZE`]) is not downloaded, so a hostile
//! or broken server cannot fill the disk. Anything a server sends that is not the debug file
//! asked for is thrown away with a warning that names the URL.
//!
//! Downloads run in parallel, [`MAX_PARALLEL`] at a time. On a terminal, each one that is
//! large or slow is announced as it starts and then says every few seconds how far it has
//! come (a line of its own each time, naming its module, as several run at once);
//! [`Debuginfod::summary`] says in one line what was fetched.

use std::collections::{HashMap, HashSet, VecDeque};
use std::ffi::CString;
use std::fs::File;
use std::io::{self, IsTerminal, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use crate::elf::{self, ElfFacts};
use crate::mmap::MappedFile;

/// How long a request may wait for a connection, for the answer, or for more data, when
/// `DEBUGINFOD_TIMEOUT` does not say: shorter than elfutils' 90 s, since someone is waiting
/// for their profiles (and Ctrl-C writes them without the names at any time).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// The largest debug file downloaded when `DEBUGINFOD_MAXSIZE` does not say: 2 GiB.
pub const DEFAULT_MAX_SIZE: u64 = 2 << 30;

/// Downloads at once.
pub const MAX_PARALLEL: usize = 8;

/// How long an empty (negative) cache entry stands when `<cache>/cache_miss_s` does not say;
/// elfutils' default.
const DEFAULT_CACHE_MISS: Duration = Duration::from_secs(600);

/// How long a build id that was not fetched (no server had it, or none answered) is not
/// asked again by the same client: a daemon runs for months, servers come back and gain
/// files.
pub(crate) const RETRY_AFTER: Duration = DEFAULT_CACHE_MISS;

/// How long a server that could not be reached is left alone.
const DEAD_FOR: Duration = Duration::from_secs(60);

/// Downloads this large, or of unknown size, are announced on a terminal.
const ANNOUNCE_BYTES: u64 = 1 << 20;
/// How often an announced download says how far it has come.
const PROGRESS_EVERY: Duration = Duration::from_secs(3);

/// Build ids shorter or longer than this (in bytes) are not asked for: real ones are 16
/// (MD5, UUID) to 20 (SHA-1) bytes, a few toolchains use 8 or 32.
pub(crate) const BUILD_ID_LEN: std::ops::RangeInclusive<usize> = 8..=64;

/// The most build ids whose outcome a client remembers; past it the oldest is forgotten (and
/// asked again if wanted again). A daemon meets new builds for months.
const MAX_OUTCOMES: usize = 4096;

/// The most distinct warnings remembered (each printed once); past it the oldest is forgotten.
const MAX_WARNED: usize = 256;

/// A limit for each download in all that a daemon may set as its default
/// ([`DebuginfodConfig::default_max_time`]): five minutes.
pub const DAEMON_MAX_TIME: Duration = Duration::from_secs(300);

/// Where and how to fetch debug files.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DebuginfodConfig {
    /// Server base URLs, tried in order (`DEBUGINFOD_URLS`, separated by spaces).
    pub urls: Vec<String>,
    /// The client cache directory shared with gdb and perf.
    pub cache_dir: PathBuf,
    /// Longest wait for a connection, the answer, or more data, per request.
    pub timeout: Duration,
    /// Longest time for one download in all, if limited.
    pub max_time: Option<Duration>,
    /// Largest file downloaded.
    pub max_size: u64,
    /// Announce downloads as they start (stderr is a terminal, or `DEBUGINFOD_PROGRESS` is
    /// set).
    pub progress: bool,
    /// Longest time for one download in all when `max_time` (`DEBUGINFOD_MAXTIME`) is not
    /// set; `None` from the environment. A daemon sets it (e.g. [`DAEMON_MAX_TIME`]) so that
    /// a server trickling bytes cannot hold a download for ever.
    pub default_max_time: Option<Duration>,
    /// Ask only for objects whose file, as opened (with the rights of the process they were
    /// opened for), is owned by root and writable by neither group nor others: objects a
    /// local user cannot have made. `false` from the environment; a root daemon that
    /// symbolizes for other users sets it.
    pub only_root_owned_objects: bool,
}

impl DebuginfodConfig {
    /// The configuration elfutils would take from this process's environment, or `None` when
    /// `DEBUGINFOD_URLS` is unset or empty. `Err` says which setting is wrong and how to fix
    /// it (a cache directory cannot be found, a number does not parse).
    pub fn from_env() -> Result<Option<DebuginfodConfig>, String> {
        DebuginfodConfig::from_vars(|name| std::env::var_os(name))
    }

    /// [`DebuginfodConfig::from_env`] with the variables from `var`.
    fn from_vars(
        var: impl Fn(&str) -> Option<std::ffi::OsString>,
    ) -> Result<Option<DebuginfodConfig>, String> {
        let get = |name: &str| var(name).filter(|v| !v.is_empty());
        let urls: Vec<String> = get("DEBUGINFOD_URLS")
            .map(|v| {
                v.to_string_lossy()
                    .split_whitespace()
                    .map(|u| u.trim_end_matches('/').to_string())
                    .filter(|u| !u.is_empty())
                    .collect()
            })
            .unwrap_or_default();
        if urls.is_empty() {
            return Ok(None);
        }
        let cache_dir = match (
            get("DEBUGINFOD_CACHE_PATH"),
            get("XDG_CACHE_HOME"),
            get("HOME"),
        ) {
            (Some(path), _, _) => PathBuf::from(path),
            (None, Some(xdg), _) => PathBuf::from(xdg).join("debuginfod_client"),
            (None, None, Some(home)) => PathBuf::from(home).join(".cache/debuginfod_client"),
            (None, None, None) => {
                return Err(
                    "DEBUGINFOD_URLS is set, but there is no cache directory for the \
                            downloads: set DEBUGINFOD_CACHE_PATH (or HOME)"
                        .into(),
                )
            }
        };
        let seconds = |name: &str| -> Result<Option<Duration>, String> {
            get(name)
                .map(|v| {
                    v.to_string_lossy()
                        .trim()
                        .parse::<u64>()
                        .map(Duration::from_secs)
                        .map_err(|_| format!("{name} must be a number of seconds"))
                })
                .transpose()
        };
        let timeout = seconds("DEBUGINFOD_TIMEOUT")?
            .filter(|t| !t.is_zero())
            .unwrap_or(DEFAULT_TIMEOUT);
        let max_time = seconds("DEBUGINFOD_MAXTIME")?.filter(|t| !t.is_zero());
        let max_size = get("DEBUGINFOD_MAXSIZE")
            .map(|v| {
                v.to_string_lossy()
                    .trim()
                    .parse::<u64>()
                    .map_err(|_| "DEBUGINFOD_MAXSIZE must be a number of bytes".to_string())
            })
            .transpose()?
            .filter(|&n| n > 0)
            .unwrap_or(DEFAULT_MAX_SIZE);
        Ok(Some(DebuginfodConfig {
            urls,
            cache_dir,
            timeout,
            max_time,
            max_size,
            // elfutils' variable for its progress meter turns the announcements on too.
            progress: io::stderr().is_terminal() || get("DEBUGINFOD_PROGRESS").is_some(),
            default_max_time: None,
            only_root_owned_objects: false,
        }))
    }
}

/// A debuginfod client with its cache and what it learnt this run.
pub(crate) struct Debuginfod {
    config: DebuginfodConfig,
    /// The cache directory, opened and checked once; `None` when it failed the check (then
    /// nothing is read from it, written to it, or asked of a server).
    cache: Option<OwnedFd>,
    agent: ureq::Agent,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// What each build id came to and when, so that it is asked once a run (a daemon asks
    /// again for one not found after [`RETRY_AFTER`]). At most [`MAX_OUTCOMES`].
    outcomes: HashMap<Vec<u8>, (Option<PathBuf>, Instant)>,
    /// Servers that could not be reached, and when; not asked for [`DEAD_FOR`].
    dead: HashMap<String, Instant>,
    /// Warnings already printed, and the order they came in (at most [`MAX_WARNED`]).
    warned: HashSet<String>,
    warned_order: VecDeque<String>,
    downloaded: usize,
    downloaded_bytes: u64,
    from_cache: usize,
    not_found: usize,
    /// Build ids the negative cache says no server has (not asked this run).
    known_missing: usize,
    failed: usize,
}

/// One object whose debug file is wanted.
pub(crate) struct Wanted<'a> {
    pub(crate) build_id: &'a [u8],
    /// For messages: the object's file name, as [`printable`] shows it.
    pub(crate) name: String,
}

/// `text` with control characters (newlines, escape sequences) escaped, for names that come
/// from files or servers and go into messages: they cannot forge or hide a line of the log.
pub(crate) fn printable(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c.is_control() || c == '\\' {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

impl State {
    fn remember(&mut self, id: &[u8], found: Option<PathBuf>) {
        if self.outcomes.len() >= MAX_OUTCOMES && !self.outcomes.contains_key(id) {
            let oldest = self
                .outcomes
                .iter()
                .min_by_key(|(_, (_, when))| *when)
                .map(|(id, _)| id.clone());
            if let Some(oldest) = oldest {
                self.outcomes.remove(&oldest);
            }
        }
        self.outcomes.insert(id.to_vec(), (found, Instant::now()));
    }

    /// Whether `message` is new (then it is remembered).
    fn first_time(&mut self, message: &str) -> bool {
        if self.warned.contains(message) {
            return false;
        }
        if self.warned_order.len() >= MAX_WARNED {
            if let Some(oldest) = self.warned_order.pop_front() {
                self.warned.remove(&oldest);
            }
        }
        self.warned.insert(message.to_string());
        self.warned_order.push_back(message.to_string());
        true
    }
}

impl Debuginfod {
    pub(crate) fn new(config: DebuginfodConfig) -> Debuginfod {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_connect(Some(config.timeout))
            .timeout_recv_response(Some(config.timeout))
            .timeout_per_read(Some(config.timeout))
            .timeout_global(config.max_time.or(config.default_max_time))
            .http_status_as_error(false)
            .user_agent(concat!("anyprof/", env!("CARGO_PKG_VERSION")))
            .build()
            .into();
        let (cache, refused) = match open_cache(&config.cache_dir) {
            Ok(fd) => (Some(fd), None),
            Err(why) => (None, Some(why)),
        };
        let client = Debuginfod {
            config,
            cache,
            agent,
            state: Mutex::new(State::default()),
        };
        if let Some(why) = refused {
            client.warn(format!(
                "the debuginfod cache {} is not used and debuginfod is not asked: {why}. Make \
                 it a directory of your own that only you can write (chown, chmod go-w; not a \
                 symbolic link), or set DEBUGINFOD_CACHE_PATH to one",
                client.config.cache_dir.display()
            ));
        }
        client
    }

    /// Whether debug files may be asked for an object whose file, as opened, is owned by
    /// root and writable by root alone (`root_owned`).
    pub(crate) fn may_ask_for(&self, root_owned: bool) -> bool {
        root_owned || !self.config.only_root_owned_objects
    }

    /// The debug file of each wanted object, from the cache or downloaded, in the same order:
    /// the path of the cached file, or `None` if no server has it (or none answered).
    /// Downloads run in parallel. Must run with this process's own file-system rights.
    pub(crate) fn fetch_all(&self, wanted: &[Wanted<'_>]) -> Vec<Option<PathBuf>> {
        let known = |state: &State, id: &[u8]| -> Option<Option<PathBuf>> {
            match state.outcomes.get(id) {
                Some((found @ Some(_), _)) => Some(found.clone()),
                Some((None, when)) if when.elapsed() < RETRY_AFTER => Some(None),
                _ => None,
            }
        };
        let mut answers: Vec<Option<Option<PathBuf>>> = {
            let state = self.lock();
            wanted.iter().map(|w| known(&state, w.build_id)).collect()
        };
        let todo: Vec<usize> = (0..wanted.len())
            .filter(|&i| answers[i].is_none())
            // The same build id twice in one call (two paths of one library) is asked once.
            .filter(|&i| !wanted[..i].iter().any(|w| w.build_id == wanted[i].build_id))
            .collect();
        let results = crate::symbolizer::parallel_map_on(MAX_PARALLEL, todo, |i| {
            // A bug in parsing what a server sent costs this object only.
            (
                i,
                crate::panics::catch(|| self.fetch(&wanted[i])).unwrap_or(None),
            )
        });
        let mut state = self.lock();
        for (i, found) in results {
            state.remember(wanted[i].build_id, found.clone());
            answers[i] = Some(found);
        }
        wanted
            .iter()
            .zip(answers)
            .map(|(w, answer)| {
                answer.unwrap_or_else(|| {
                    state
                        .outcomes
                        .get(w.build_id)
                        .and_then(|(found, _)| found.clone())
                })
            })
            .collect()
    }

    /// One line on what this run fetched, or `None` if it asked no server (everything came
    /// from the cache, or nothing was wanted): a run that only reads the cache says nothing.
    pub(crate) fn summary(&self) -> Option<String> {
        let state = self.lock();
        if state.downloaded + state.not_found + state.failed == 0 {
            return None;
        }
        let mut parts = Vec::new();
        if state.downloaded > 0 {
            parts.push(format!(
                "{} downloaded ({})",
                files(state.downloaded),
                mib(state.downloaded_bytes)
            ));
        }
        if state.from_cache > 0 {
            parts.push(format!("{} from the cache", files(state.from_cache)));
        }
        if state.not_found + state.known_missing > 0 {
            parts.push(format!(
                "{} on no server",
                files(state.not_found + state.known_missing)
            ));
        }
        if state.failed > 0 {
            parts.push(format!(
                "{} not fetched (see the warnings)",
                files(state.failed)
            ));
        }
        Some(format!(
            "debuginfod ({}): {}; cache {}",
            self.config.urls.join(" "),
            parts.join(", "),
            self.config.cache_dir.display()
        ))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn warn(&self, message: String) {
        // Parts of it came from servers and files: no line of it can start a line of its own.
        let message = printable(&message);
        if self.lock().first_time(&message) {
            eprintln!("anyprof: warning: {message}");
        }
    }

    /// The debug file for one object: cached, or downloaded into the cache.
    fn fetch(&self, wanted: &Wanted<'_>) -> Option<PathBuf> {
        if !BUILD_ID_LEN.contains(&wanted.build_id.len()) {
            return None;
        }
        let Some(root) = &self.cache else {
            // Said once when the client was made.
            self.lock().failed += 1;
            return None;
        };
        let hex: String = wanted.build_id.iter().map(|b| format!("{b:02x}")).collect();
        let dir = self.config.cache_dir.join(&hex);
        let target = dir.join("debuginfo");
        let entry = open_at(root, &hex, libc::O_DIRECTORY).ok();
        // An entry directory must be as private as the cache (only we or root can have made it
        // there, but it may have been made with another umask).
        let entry = entry.filter(|fd| fstat(fd).is_ok_and(|m| trusted_dir(&m)));
        if let Some(entry) = &entry {
            if let Ok(file) = open_at(entry, "debuginfo", 0) {
                match fstat(&file) {
                    Ok(meta) if is_regular(&meta) && meta.st_size > 0 => {
                        self.lock().from_cache += 1;
                        return Some(target);
                    }
                    Ok(meta) if is_regular(&meta) => {
                        let modified = SystemTime::UNIX_EPOCH
                            + Duration::from_secs(u64::try_from(meta.st_mtime).unwrap_or(0));
                        let age = SystemTime::now()
                            .duration_since(modified)
                            .unwrap_or(Duration::ZERO);
                        if age <= self.cache_miss(root) {
                            self.lock().known_missing += 1;
                            return None;
                        }
                    }
                    _ => {}
                }
            }
        }
        let alive: Vec<&String> = {
            let state = self.lock();
            self.config
                .urls
                .iter()
                .filter(|url| state.dead.get(*url).is_none_or(|t| t.elapsed() >= DEAD_FOR))
                .collect()
        };
        if alive.is_empty() {
            self.lock().failed += 1;
            return None;
        }
        let entry = self.prepare_dir(root, &hex, &dir);
        let writable = entry.is_some();
        // Whether some server said 404, and whether any said anything else.
        let (mut any_answered, mut any_failed) = (false, false);
        for url in alive {
            match self.download(url, &hex, wanted, writable.then_some(&dir)) {
                Download::Done(path, bytes) => {
                    let mut state = self.lock();
                    state.downloaded += 1;
                    state.downloaded_bytes += bytes;
                    return Some(path);
                }
                Download::NotFound => any_answered = true,
                Download::Unreachable(why) => {
                    any_failed = true;
                    self.lock().dead.insert(url.clone(), Instant::now());
                    self.warn(format!(
                        "debuginfod server {url} cannot be reached ({why}); it is left alone \
                         for a minute. Check DEBUGINFOD_URLS"
                    ));
                }
                Download::Failed(why) => {
                    any_failed = true;
                    self.warn(why);
                }
            }
        }
        let not_found = any_answered && !any_failed;
        {
            let mut state = self.lock();
            if not_found {
                state.not_found += 1;
            } else {
                state.failed += 1;
            }
        }
        // elfutils' negative mark: only when every server that answered said it has no such
        // file (not for a server that failed, sent garbage or too much: the user may fix
        // that and try again at once), and never over a file that is there now (another
        // client may just have fetched it): an old empty mark gets a new time, nothing else
        // is touched.
        if let (true, Some(entry)) = (not_found, &entry) {
            mark_missing(entry);
        }
        None
    }

    /// How long a negative cache entry stands: `<cache>/cache_miss_s`, as elfutils reads it
    /// (a regular file, at most 32 bytes read).
    fn cache_miss(&self, root: &OwnedFd) -> Duration {
        let read = || -> Option<Duration> {
            let file = File::from(open_at(root, "cache_miss_s", 0).ok()?);
            if !file.metadata().ok()?.is_file() {
                return None;
            }
            let mut text = Vec::new();
            file.take(32).read_to_end(&mut text).ok()?;
            let seconds = std::str::from_utf8(&text).ok()?.trim().parse().ok()?;
            Some(Duration::from_secs(seconds))
        };
        read().unwrap_or(DEFAULT_CACHE_MISS)
    }

    /// Makes `<cache>/<build id>/` (`dir`, named `hex` in the opened cache `root`) and returns
    /// it opened if files may be written in it: it must be this user's and writable by it
    /// alone.
    fn prepare_dir(&self, root: &OwnedFd, hex: &str, dir: &Path) -> Option<OwnedFd> {
        let name = CString::new(hex).ok()?;
        // SAFETY: `root` is an open descriptor and `name` a NUL-terminated string that lives
        // across the call.
        let made = unsafe { libc::mkdirat(root.as_raw_fd(), name.as_ptr(), 0o700) };
        let made = if made == 0 {
            Ok(())
        } else {
            let err = io::Error::last_os_error();
            match err.kind() {
                io::ErrorKind::AlreadyExists => Ok(()),
                _ => Err(err),
            }
        };
        if let Err(err) = made {
            self.warn(format!(
                "cannot create the debuginfod cache directory {} ({err}): nothing is \
                 downloaded. Set DEBUGINFOD_CACHE_PATH to a directory you can write",
                dir.display()
            ));
            return None;
        }
        // SAFETY: geteuid has no preconditions and cannot fail.
        let euid = unsafe { libc::geteuid() };
        let entry = open_at(root, hex, libc::O_DIRECTORY).ok();
        match entry {
            Some(fd) if fstat(&fd).is_ok_and(|m| m.st_uid == euid && m.st_mode & 0o022 == 0) => {
                remove_stale_downloads(dir);
                Some(fd)
            }
            _ => {
                self.warn(format!(
                    "the debuginfod cache directory {} is not yours alone (owned by another \
                     user, writable by others, or not a directory): nothing is downloaded into \
                     it. Remove it, or set DEBUGINFOD_CACHE_PATH to a directory of your own",
                    dir.display()
                ));
                None
            }
        }
    }

    /// Asks one server for one build id's debug file, and keeps it in `dir` if there is one.
    fn download(
        &self,
        server: &str,
        hex: &str,
        wanted: &Wanted<'_>,
        dir: Option<&PathBuf>,
    ) -> Download {
        let url = format!("{server}/buildid/{hex}/debuginfo");
        let response = match self.agent.get(&url).call() {
            Ok(response) => response,
            Err(err) => return Download::Unreachable(err.to_string()),
        };
        let status = response.status().as_u16();
        if status == 404 {
            return Download::NotFound;
        }
        if status != 200 {
            return Download::Failed(format!(
                "debuginfod server answered {status} for {url}; the debug file of {} is not \
                 fetched",
                wanted.name
            ));
        }
        let Some(dir) = dir else {
            return Download::Failed(format!(
                "the debug file of {} at {url} is not downloaded: the cache cannot be written",
                wanted.name
            ));
        };
        let max = self.config.max_size;
        let length = response
            .headers()
            .get("content-length")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok());
        if length.is_some_and(|n| n > max) {
            return Download::Failed(too_big(&url, max));
        }
        let announced = self.config.progress && length.is_none_or(|n| n >= ANNOUNCE_BYTES);
        if announced {
            let size = length.map(|n| format!(" ({})", mib(n))).unwrap_or_default();
            eprintln!(
                "anyprof: downloading debug info for {}{size} from {server}...",
                wanted.name
            );
        }
        let mut temp = match tempfile::Builder::new()
            .prefix(TEMP_PREFIX)
            .tempfile_in(dir)
        {
            Ok(temp) => temp,
            Err(err) => {
                return Download::Failed(format!(
                    "cannot write into the debuginfod cache {} ({err}); the debug file of {} \
                     is not downloaded",
                    dir.display(),
                    wanted.name
                ))
            }
        };
        let body = response.into_body().into_reader().take(max + 1);
        let mut body = Progress {
            inner: body,
            name: &wanted.name,
            total: length,
            done: 0,
            next: Instant::now() + PROGRESS_EVERY,
            every: announced.then_some(PROGRESS_EVERY),
            out: io::stderr(),
        };
        let copied = io::copy(&mut body, temp.as_file_mut()).and_then(|n| {
            temp.as_file_mut().flush()?;
            Ok(n)
        });
        let bytes = match copied {
            Ok(n) if n > max => return Download::Failed(too_big(&url, max)),
            Ok(n) => n,
            Err(err) => {
                return Download::Failed(format!(
                    "downloading {url} failed ({err}); the debug file of {} is not fetched",
                    wanted.name
                ))
            }
        };
        // Parsed as any local file is: opened without blocking, checked, mapped or read.
        if let Err(why) = check_debug_file(temp.path(), wanted.build_id) {
            return Download::Failed(format!(
                "debuginfod server sent something else than the debug file asked for at \
                 {url} ({why}); it is ignored. Check that DEBUGINFOD_URLS names debuginfod \
                 servers"
            ));
        }
        let target = dir.join("debuginfo");
        match temp.persist(&target) {
            Ok(file) => {
                drop::<File>(file);
                Download::Done(target, bytes)
            }
            Err(err) => Download::Failed(format!(
                "cannot keep the download of {url} in the debuginfod cache ({})",
                err.error
            )),
        }
    }
}

/// A download's body, which says every [`PROGRESS_EVERY`] on `out` how far it has come, when
/// `every` is set (downloads announced on a terminal): several run at once, so each report is
/// a line of its own that names its module.
struct Progress<'a, R, W> {
    inner: R,
    name: &'a str,
    total: Option<u64>,
    done: u64,
    next: Instant,
    every: Option<Duration>,
    out: W,
}

impl<R: Read, W: Write> Read for Progress<'_, R, W> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.done = self.done.saturating_add(n as u64);
        if let Some(every) = self.every.filter(|_| n > 0) {
            let now = Instant::now();
            if now >= self.next {
                self.next = now + every;
                let of = self
                    .total
                    .map(|t| {
                        let percent = self.done.saturating_mul(100) / t.max(1);
                        format!(" of {} ({percent}%)", mib(t))
                    })
                    .unwrap_or_default();
                let _ = writeln!(
                    self.out,
                    "anyprof: debug info for {}: {}{of}",
                    self.name,
                    mib(self.done)
                );
            }
        }
        Ok(n)
    }
}

/// Opens the cache directory `dir` (made, with its parents, if it is missing) and checks it
/// can be trusted: not a symbolic link, a directory owned by this user or root, writable by
/// neither group nor others. `Err` says what is wrong.
fn open_cache(dir: &Path) -> Result<OwnedFd, String> {
    if let Err(err) = std::fs::symlink_metadata(dir) {
        if err.kind() != io::ErrorKind::NotFound {
            return Err(format!("it cannot be looked at ({err})"));
        }
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|err| format!("it cannot be created ({err})"))?;
    }
    let meta = std::fs::symlink_metadata(dir).map_err(|err| format!("{err}"))?;
    if meta.file_type().is_symlink() {
        return Err("it is a symbolic link".into());
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(dir)
        .map_err(|err| format!("it cannot be opened as a directory ({err})"))?;
    let fd = OwnedFd::from(file);
    let opened = fstat(&fd).map_err(|err| format!("{err}"))?;
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    if opened.st_uid != euid && opened.st_uid != 0 {
        return Err(format!(
            "it is owned by uid {}, not by you (uid {euid}) or root",
            opened.st_uid
        ));
    }
    if opened.st_mode & 0o022 != 0 {
        return Err(format!(
            "it is writable by group or others (mode {:o})",
            opened.st_mode & 0o7777
        ));
    }
    Ok(fd)
}

/// Whether the directory whose `fstat` is `meta` is as private as the cache must be.
fn trusted_dir(meta: &libc::stat) -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    (meta.st_uid == euid || meta.st_uid == 0) && meta.st_mode & 0o022 == 0
}

fn is_regular(meta: &libc::stat) -> bool {
    meta.st_mode & libc::S_IFMT == libc::S_IFREG
}

/// Opens `name` in the directory `dir` for reading, without following a link or blocking
/// (`O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC`, plus `flags`).
fn open_at(dir: &OwnedFd, name: &str, flags: libc::c_int) -> io::Result<OwnedFd> {
    let name = CString::new(name).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: `dir` is an open descriptor and `name` a NUL-terminated string that lives across
    // the call.
    let fd = unsafe {
        libc::openat(
            dir.as_raw_fd(),
            name.as_ptr(),
            libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC | flags,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: openat just returned this descriptor, which nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn fstat(fd: &OwnedFd) -> io::Result<libc::stat> {
    // SAFETY: an all-zero `stat` is a valid value of this plain C struct.
    let mut meta: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `fd` is open; `meta` is a valid, writable `stat` that fstat fills in.
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut meta) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(meta)
}

/// Leaves elfutils' negative mark, an empty `debuginfo`, in the opened entry directory: made
/// if there is nothing, its time renewed if it is an empty regular file, and anything else
/// (a file another client just fetched) left alone.
fn mark_missing(entry: &OwnedFd) {
    let name = c"debuginfo";
    // SAFETY: an all-zero `stat` is a valid value of this plain C struct.
    let mut meta: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `entry` is open, `name` is NUL-terminated, `meta` is valid for writes.
    let looked = unsafe {
        libc::fstatat(
            entry.as_raw_fd(),
            name.as_ptr(),
            &mut meta,
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if looked == 0 {
        if is_regular(&meta) && meta.st_size == 0 {
            // SAFETY: as above; a null `times` means now; the link itself is not followed.
            unsafe {
                libc::utimensat(
                    entry.as_raw_fd(),
                    name.as_ptr(),
                    std::ptr::null(),
                    libc::AT_SYMLINK_NOFOLLOW,
                )
            };
        }
        return;
    }
    // SAFETY: as above; O_EXCL makes it only if nothing is there (not even a link).
    let fd = unsafe {
        libc::openat(
            entry.as_raw_fd(),
            name.as_ptr(),
            libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            0o644 as libc::c_uint,
        )
    };
    if fd >= 0 {
        // SAFETY: openat just returned this descriptor, which nothing else owns.
        drop(unsafe { OwnedFd::from_raw_fd(fd) });
    }
}

/// Removes the temporary files of downloads in `dir` that have not been written to for an
/// hour: those of a collector that was stopped while it downloaded (a concurrent download
/// writes to its file all the time).
fn remove_stale_downloads(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let stale = entry
            .metadata()
            .ok()
            .and_then(|m| m.modified().ok())
            .and_then(|m| SystemTime::now().duration_since(m).ok())
            .is_some_and(|age| age > STALE_DOWNLOAD);
        if stale && entry.file_name().to_string_lossy().starts_with(TEMP_PREFIX) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// The name of a download's temporary file starts with this.
const TEMP_PREFIX: &str = ".debuginfo.";

/// A temporary download file not written to for this long was left by a stopped collector.
const STALE_DOWNLOAD: Duration = Duration::from_secs(3600);

/// What one request came to.
enum Download {
    Done(PathBuf, u64),
    NotFound,
    /// No answer at all: connection refused, name not found, timed out before an answer.
    Unreachable(String),
    /// An answer that is no use; the text is the warning.
    Failed(String),
}

/// Whether the file at `path` is an ELF file with `build_id`.
fn check_debug_file(path: &Path, build_id: &[u8]) -> Result<(), String> {
    let map = MappedFile::open(path).map_err(|_| "it cannot be read back".to_string())?;
    let file = elf::parse(map.bytes()).map_err(|miss| miss.to_string())?;
    match ElfFacts::read(&file).build_id {
        Some(id) if id == build_id => Ok(()),
        Some(_) => Err("an ELF file with another build id".into()),
        None => Err("an ELF file without a build id".into()),
    }
}

fn too_big(url: &str, max: u64) -> String {
    format!(
        "the debug file at {url} is larger than {} and is not downloaded; raise \
         DEBUGINFOD_MAXSIZE (bytes) to fetch it",
        mib(max)
    )
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1u64 << 20) as f64)
}

fn files(n: usize) -> String {
    if n == 1 {
        "1 debug file".into()
    } else {
        format!("{n} debug files")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(cache: &Path, urls: Vec<String>) -> DebuginfodConfig {
        DebuginfodConfig {
            urls,
            cache_dir: cache.to_path_buf(),
            timeout: Duration::from_secs(2),
            max_time: None,
            max_size: 1 << 20,
            progress: false,
            default_max_time: None,
            only_root_owned_objects: false,
        }
    }

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("anyprof-dbgd-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// A cached file is used without asking the (unreachable) server; a fresh negative mark
    /// stops the asking too; a stale one does not.
    #[test]
    fn the_cache_answers_first() {
        let cache = scratch("cache");
        let exe = std::env::current_exe().unwrap();
        let id = [0xab, 0xcd, 0, 0, 0, 0, 0, 1];
        std::fs::create_dir_all(cache.join("abcd000000000001")).unwrap();
        std::fs::copy(&exe, cache.join("abcd000000000001/debuginfo")).unwrap();
        std::fs::create_dir_all(cache.join("0102000000000000")).unwrap();
        std::fs::write(cache.join("0102000000000000/debuginfo"), b"").unwrap();
        // Port 1 on loopback: refused at once.
        let client = Debuginfod::new(config(&cache, vec!["http://127.0.0.1:1".into()]));
        let wanted = [
            Wanted {
                build_id: &id,
                name: "a".into(),
            },
            Wanted {
                build_id: &[1, 2, 0, 0, 0, 0, 0, 0],
                name: "b".into(),
            },
        ];
        let found = client.fetch_all(&wanted);
        assert_eq!(
            found[0].as_deref(),
            Some(&*cache.join("abcd000000000001/debuginfo"))
        );
        assert_eq!(found[1], None);
        assert!(client.lock().dead.is_empty(), "no server was asked");

        // A mark older than cache_miss_s is asked again (and the server is then found dead).
        std::fs::write(cache.join("cache_miss_s"), b"0\n").unwrap();
        std::thread::sleep(Duration::from_millis(1100));
        let client = Debuginfod::new(config(&cache, vec!["http://127.0.0.1:1".into()]));
        assert_eq!(client.fetch_all(&wanted[1..]), vec![None]);
        assert!(client.lock().dead.contains_key("http://127.0.0.1:1"));
        // Unreachable is not "not found": the old mark is left, no new one is made.
        std::fs::remove_dir_all(&cache).unwrap();
    }

    /// A cache directory owned by another user (nobody) is not used at all: a debug file
    /// planted there is not taken, its FIFO `cache_miss_s` is not opened (which would hang),
    /// nothing is made in it, no server is asked; one warning says why.
    #[test]
    fn a_cache_of_another_user_is_not_used() {
        if unsafe_geteuid() != 0 {
            eprintln!("skipped: needs root to make a directory owned by nobody");
            return;
        }
        let cache = scratch("foreign");
        let exe = std::env::current_exe().unwrap();
        let planted = [0xab, 0xcd, 0, 0, 0, 0, 0, 2];
        let missing = [0x01, 0x02, 0, 0, 0, 0, 0, 2];
        std::fs::create_dir_all(cache.join("abcd000000000002")).unwrap();
        std::fs::copy(&exe, cache.join("abcd000000000002/debuginfo")).unwrap();
        std::fs::create_dir_all(cache.join("0102000000000002")).unwrap();
        std::fs::write(cache.join("0102000000000002/debuginfo"), b"").unwrap();
        let fifo = std::ffi::CString::new(
            cache
                .join("cache_miss_s")
                .into_os_string()
                .into_encoded_bytes(),
        )
        .unwrap();
        // SAFETY: `fifo` is a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);
        let chown = |path: &Path| {
            let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
            // SAFETY: `c` is a NUL-terminated path.
            assert_eq!(unsafe { libc::lchown(c.as_ptr(), 65534, 65534) }, 0);
        };
        for entry in [
            "",
            "abcd000000000002",
            "abcd000000000002/debuginfo",
            "0102000000000002",
            "0102000000000002/debuginfo",
            "cache_miss_s",
        ] {
            chown(&cache.join(entry));
        }
        let before: Vec<_> = std::fs::read_dir(&cache)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        let (done, answer) = std::sync::mpsc::channel();
        let config = config(&cache, vec!["http://127.0.0.1:1".into()]);
        std::thread::spawn(move || {
            let client = Debuginfod::new(config);
            let wanted = [
                Wanted {
                    build_id: &planted,
                    name: "a".into(),
                },
                Wanted {
                    build_id: &missing,
                    name: "b".into(),
                },
            ];
            let found = client.fetch_all(&wanted);
            let _ = client.fetch_all(&wanted);
            let state = client.lock();
            let _ = done.send((found, state.warned.clone(), state.dead.clone()));
        });
        let (found, warned, dead) = answer
            .recv_timeout(Duration::from_secs(20))
            .expect("the client hung on the cache of another user");
        assert_eq!(
            found,
            vec![None, None],
            "a file planted by another user was used"
        );
        assert_eq!(warned.len(), 1, "{warned:?}");
        let warning = warned.iter().next().unwrap();
        assert!(
            warning.contains(&*cache.display().to_string())
                && warning.contains("owned by uid 65534"),
            "{warning}"
        );
        assert!(dead.is_empty(), "a server was asked");
        let after: Vec<_> = std::fs::read_dir(&cache)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(
            before.len(),
            after.len(),
            "something was made in the cache: {after:?}"
        );
        std::fs::remove_dir_all(&cache).unwrap();
    }

    /// Build ids shorter than 8 or longer than 64 bytes are not asked for.
    #[test]
    fn odd_build_ids_are_not_asked_for() {
        let cache = scratch("odd-ids");
        let client = Debuginfod::new(config(&cache, vec!["http://127.0.0.1:1".into()]));
        let long = [7u8; 65];
        let wanted = [
            Wanted {
                build_id: &[1, 2],
                name: "short".into(),
            },
            Wanted {
                build_id: &long,
                name: "long".into(),
            },
        ];
        assert_eq!(client.fetch_all(&wanted), vec![None, None]);
        assert!(client.lock().dead.is_empty(), "a server was asked");
        assert_eq!(std::fs::read_dir(&cache).unwrap().count(), 0);
        std::fs::remove_dir_all(&cache).unwrap();
    }

    fn unsafe_geteuid() -> u32 {
        // SAFETY: geteuid has no preconditions and cannot fail.
        unsafe { libc::geteuid() }
    }

    /// The negative mark never replaces a file that is there: a debug file another client
    /// just put in place stays, a link is not followed, an old empty mark gets a new time.
    #[test]
    fn the_negative_mark_replaces_nothing() {
        let dir = scratch("mark");
        let open = |d: &Path| -> OwnedFd {
            OwnedFd::from(
                std::fs::OpenOptions::new()
                    .read(true)
                    .custom_flags(libc::O_DIRECTORY)
                    .open(d)
                    .unwrap(),
            )
        };
        let fetched = dir.join("fetched");
        std::fs::create_dir(&fetched).unwrap();
        std::fs::write(fetched.join("debuginfo"), b"\x7fELF good").unwrap();
        mark_missing(&open(&fetched));
        assert_eq!(
            std::fs::read(fetched.join("debuginfo")).unwrap(),
            b"\x7fELF good"
        );

        let linked = dir.join("linked");
        std::fs::create_dir(&linked).unwrap();
        std::fs::write(dir.join("elsewhere"), b"keep").unwrap();
        std::os::unix::fs::symlink(dir.join("elsewhere"), linked.join("debuginfo")).unwrap();
        mark_missing(&open(&linked));
        assert_eq!(std::fs::read(dir.join("elsewhere")).unwrap(), b"keep");
        assert!(std::fs::symlink_metadata(linked.join("debuginfo"))
            .unwrap()
            .is_symlink());

        let empty = dir.join("empty");
        std::fs::create_dir(&empty).unwrap();
        mark_missing(&open(&empty));
        let made = std::fs::metadata(empty.join("debuginfo")).unwrap();
        assert!(made.is_file() && made.len() == 0);
        let old = SystemTime::now() - Duration::from_secs(3600);
        std::fs::File::options()
            .write(true)
            .open(empty.join("debuginfo"))
            .unwrap()
            .set_modified(old)
            .unwrap();
        mark_missing(&open(&empty));
        let renewed = std::fs::metadata(empty.join("debuginfo"))
            .unwrap()
            .modified()
            .unwrap();
        assert!(renewed > old + Duration::from_secs(1800));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn names_from_elsewhere_are_printed_on_one_line() {
        assert_eq!(printable("libx.so"), "libx.so");
        assert_eq!(
            printable("a\nanyprof: warning: forged\u{1b}[2K"),
            "a\\nanyprof: warning: forged\\u{1b}[2K"
        );
    }

    /// The remembered outcomes and warnings stay bounded, forgetting the oldest.
    #[test]
    fn memory_of_outcomes_and_warnings_is_bounded() {
        let mut state = State::default();
        for i in 0..MAX_OUTCOMES as u64 + 10 {
            state.remember(&i.to_le_bytes(), None);
        }
        assert_eq!(state.outcomes.len(), MAX_OUTCOMES);
        assert!(state
            .outcomes
            .contains_key(&(MAX_OUTCOMES as u64 + 9).to_le_bytes()[..]));
        for i in 0..MAX_WARNED + 10 {
            assert!(state.first_time(&format!("w{i}")));
        }
        assert_eq!(state.warned.len(), MAX_WARNED);
        assert!(!state.first_time(&format!("w{}", MAX_WARNED + 9)));
        assert!(state.first_time("w0"), "the oldest was forgotten");
    }

    /// A server that sends `body` without a length (to the end of the connection), to every
    /// request.
    fn endless_server(body: Vec<u8>) -> String {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let mut request = [0u8; 4096];
                let _ = stream.read(&mut request);
                let _ = stream.write_all(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n");
                let _ = stream.write_all(&body);
            }
        });
        format!("http://127.0.0.1:{port}")
    }

    /// A body without a length is cut at the size limit: nothing is kept, no temporary file
    /// is left, and the build id is not marked as missing (raising the limit helps at once).
    #[test]
    fn a_long_download_says_how_far_it_has_come() {
        let data = vec![7u8; 3 << 20];
        let mut out = Vec::new();
        let mut body = Progress {
            inner: io::Cursor::new(&data).take(u64::MAX),
            name: "libbig.so",
            total: Some(data.len() as u64),
            done: 0,
            next: Instant::now(),
            every: Some(Duration::ZERO),
            out: &mut out,
        };
        let mut chunk = [0u8; 1 << 20];
        while body.read(&mut chunk).unwrap() > 0 {}
        let said = String::from_utf8(out).unwrap();
        assert!(
            said.contains("anyprof: debug info for libbig.so: 1.0 MiB of 3.0 MiB (33%)")
                && said.contains("3.0 MiB of 3.0 MiB (100%)"),
            "{said}"
        );
        let mut quiet = Vec::new();
        let mut body = Progress {
            inner: io::Cursor::new(&data),
            name: "libbig.so",
            total: None,
            done: 0,
            next: Instant::now(),
            every: None,
            out: &mut quiet,
        };
        while body.read(&mut chunk).unwrap() > 0 {}
        assert!(quiet.is_empty(), "a download not announced says nothing");
    }

    #[test]
    fn downloads_stop_at_the_size_limit() {
        let cache = scratch("size");
        let url = endless_server(vec![0x7f; (1 << 20) + 4096]);
        let client = Debuginfod::new(config(&cache, vec![url]));
        let wanted = [Wanted {
            build_id: &[0xee, 0xff, 0, 0, 0, 0, 0, 0],
            name: "big".into(),
        }];
        assert_eq!(client.fetch_all(&wanted), vec![None]);
        let left: Vec<_> = std::fs::read_dir(cache.join("eeff000000000000"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert!(left.is_empty(), "{left:?}");
        assert_eq!(client.lock().failed, 1);
        let warned = client.lock().warned.clone();
        assert!(
            warned.iter().any(|w| w.contains("larger than 1.0 MiB")),
            "{warned:?}"
        );
        std::fs::remove_dir_all(&cache).unwrap();
    }

    #[test]
    fn environment_is_read_as_elfutils_reads_it() {
        let read = |vars: &[(&str, &str)]| {
            let vars: HashMap<String, std::ffi::OsString> = vars
                .iter()
                .map(|(k, v)| (k.to_string(), v.into()))
                .collect();
            DebuginfodConfig::from_vars(|name| vars.get(name).cloned())
        };
        assert_eq!(read(&[("HOME", "/h")]), Ok(None));
        assert_eq!(read(&[("DEBUGINFOD_URLS", " "), ("HOME", "/h")]), Ok(None));
        let urls = ("DEBUGINFOD_URLS", " http://a:1/  https://b/x ");
        let c = read(&[urls, ("HOME", "/h")]).unwrap().unwrap();
        assert_eq!(c.urls, ["http://a:1", "https://b/x"]);
        assert_eq!(c.cache_dir, Path::new("/h/.cache/debuginfod_client"));
        assert_eq!(c.timeout, DEFAULT_TIMEOUT);
        assert_eq!(c.max_size, DEFAULT_MAX_SIZE);
        assert_eq!(c.max_time, None);
        let c = read(&[urls, ("HOME", "/h"), ("XDG_CACHE_HOME", "/xdg")])
            .unwrap()
            .unwrap();
        assert_eq!(c.cache_dir, Path::new("/xdg/debuginfod_client"));
        let c = read(&[
            urls,
            ("XDG_CACHE_HOME", "/xdg"),
            ("DEBUGINFOD_CACHE_PATH", "/c"),
            ("DEBUGINFOD_TIMEOUT", "5"),
            ("DEBUGINFOD_MAXTIME", "60"),
            ("DEBUGINFOD_MAXSIZE", "1000"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!(c.cache_dir, Path::new("/c"));
        assert_eq!(c.timeout, Duration::from_secs(5));
        assert_eq!(c.max_time, Some(Duration::from_secs(60)));
        assert_eq!(c.max_size, 1000);
        assert!(read(&[urls, ("HOME", "/h"), ("DEBUGINFOD_TIMEOUT", "soon")]).is_err());
        let err = read(&[urls]).unwrap_err();
        assert!(err.contains("DEBUGINFOD_CACHE_PATH"), "{err}");
    }
}
