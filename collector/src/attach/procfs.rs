//! What `/proc` says about a process `anyprof attach` profiles: its threads, its executable
//! file mappings, its names. Collector side (std); nothing here touches the process itself.

use std::io;
use std::path::PathBuf;

/// One executable mapping of a file, as a line of `/proc/PID/maps` states it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ExecMapping {
    pub start: u64,
    pub end: u64,
    /// File offset of `start`.
    pub offset: u64,
    /// The path as the process sees it (inside its own mount namespace).
    pub path: Vec<u8>,
}

/// The thread ids of `pid` now.
pub fn threads(pid: u32) -> io::Result<Vec<u32>> {
    let mut tids = Vec::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        if let Some(tid) = entry?.file_name().to_str().and_then(|s| s.parse().ok()) {
            tids.push(tid);
        }
    }
    tids.sort_unstable();
    Ok(tids)
}

/// Whether `pid` still runs: some thread of it has not ended (its main thread may have,
/// with `pthread_exit`, while others go on).
pub fn is_running(pid: u32) -> bool {
    let alive = |stat: &[u8]| {
        // The state is the first field after the command name, which is in parentheses and
        // may itself hold spaces and parentheses.
        stat.iter()
            .rposition(|&b| b == b')')
            .and_then(|end| stat.get(end + 2))
            .is_some_and(|&state| state != b'Z' && state != b'X')
    };
    if std::fs::read(format!("/proc/{pid}/stat")).is_ok_and(|s| alive(&s)) {
        return true;
    }
    threads(pid)
        .unwrap_or_default()
        .iter()
        .any(|tid| std::fs::read(format!("/proc/{pid}/task/{tid}/stat")).is_ok_and(|s| alive(&s)))
}

/// The name of the vDSO's mapping in `/proc/PID/maps`.
pub const VDSO: &[u8] = b"[vdso]";

/// The executable file mappings of `pid`, and its vDSO (no anonymous code).
pub fn exec_mappings(pid: u32) -> io::Result<Vec<ExecMapping>> {
    let maps = std::fs::read(format!("/proc/{pid}/maps"))?;
    Ok(maps
        .split(|&b| b == b'\n')
        .filter_map(parse_maps_line)
        .collect())
}

/// `start-end perms offset dev inode path` → an executable file mapping (or the vDSO), else
/// `None`.
pub fn parse_maps_line(line: &[u8]) -> Option<ExecMapping> {
    let mut fields = line.splitn(6, |&b| b == b' ');
    let range = fields.next()?;
    let perms = fields.next()?;
    let offset = fields.next()?;
    let _dev = fields.next()?;
    let inode = fields.next()?;
    let path = fields.next()?.trim_ascii_start();
    let vdso = path == VDSO;
    if perms.get(2) != Some(&b'x') || !(vdso || inode != b"0" && path.starts_with(b"/")) {
        return None;
    }
    let hex = |b: &[u8]| u64::from_str_radix(std::str::from_utf8(b).ok()?, 16).ok();
    let dash = range.iter().position(|&b| b == b'-')?;
    // A file replaced on disk since it was mapped is shown with " (deleted)".
    let path = path.strip_suffix(b" (deleted)").unwrap_or(path);
    Some(ExecMapping {
        start: hex(&range[..dash])?,
        end: hex(&range[dash + 1..])?,
        offset: hex(offset)?,
        path: path.to_vec(),
    })
}

/// Where this process reads a file of `pid`'s: through its root, so that a process in a
/// container (another mount namespace) gets its own files, not the host's.
pub fn file_of(pid: u32, path: &[u8]) -> PathBuf {
    use std::os::unix::ffi::OsStrExt;
    let mut p = PathBuf::from(format!("/proc/{pid}/root"));
    p.push(std::ffi::OsStr::from_bytes(
        path.strip_prefix(b"/").unwrap_or(path),
    ));
    p
}

/// A thread's name (`comm`), if it still runs.
pub fn thread_name(pid: u32, tid: u32) -> Option<String> {
    let comm = std::fs::read(format!("/proc/{pid}/task/{tid}/comm")).ok()?;
    Some(String::from_utf8_lossy(comm.trim_ascii_end()).into_owned())
}

/// The executable's path (as the process sees it) and its NUL-separated arguments.
pub fn exe_and_cmdline(pid: u32) -> (Vec<u8>, Vec<u8>) {
    use std::os::unix::ffi::OsStrExt;
    let exe = std::fs::read_link(format!("/proc/{pid}/exe"))
        .map(|p| p.as_os_str().as_bytes().to_vec())
        .unwrap_or_default();
    let exe = exe
        .strip_suffix(b" (deleted)")
        .map(<[u8]>::to_vec)
        .unwrap_or(exe);
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    (exe, cmdline)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_lines_give_executable_file_mappings_only() {
        let line = b"7f0000001000-7f0000002000 r-xp 00001000 08:01 1234   /usr/lib/libc.so.6";
        assert_eq!(
            parse_maps_line(line),
            Some(ExecMapping {
                start: 0x7f0000001000,
                end: 0x7f0000002000,
                offset: 0x1000,
                path: b"/usr/lib/libc.so.6".to_vec(),
            })
        );
        let deleted = b"1000-2000 r-xp 00000000 08:01 99 /tmp/a b (deleted)";
        assert_eq!(parse_maps_line(deleted).unwrap().path, b"/tmp/a b");
        assert_eq!(
            parse_maps_line(b"1000-2000 r--p 00000000 08:01 1 /usr/lib/x"),
            None
        );
        assert_eq!(
            parse_maps_line(b"1000-2000 r-xp 00000000 00:00 0 [heap]"),
            None
        );
        assert_eq!(
            parse_maps_line(b"1000-2000 r-xp 00000000 00:00 0 [vdso]")
                .unwrap()
                .path,
            VDSO
        );
        assert_eq!(parse_maps_line(b"1000-2000 r-xp 00000000 00:00 0 "), None);
    }
}
