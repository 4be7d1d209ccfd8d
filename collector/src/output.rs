//! Writing output files safely, and names for them.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use anyhow::{Context, Result};

/// Writes `bytes` to `path` through a temporary file and a rename, so that a crash or a full
/// disk never leaves a half-written profile under the final name. (No fsync: a profile is not
/// worth making the program's run wait for the disk; the rename is atomic all the same.)
///
/// The temporary file gets a fresh random name and is created exclusively (`O_EXCL`, so a
/// symlink or a file planted under any name in the directory is never followed or
/// overwritten), with the permissions the umask gives a new file. The rename replaces whatever
/// entry `path` was, a planted symlink included, and never writes through it.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_as(path, bytes, false)
}

/// [`write_atomic`] for replacing a file the user named (`anyprof symbolize -o IN`, or
/// `--force`): when `path` is a regular file (not a symlink), the new file gets its read and
/// write permissions (a 0600 profile stays 0600 whatever the umask) and, when we are root, its
/// owner and group, before the rename.
pub fn write_atomic_replacing(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_as(path, bytes, true)
}

fn write_atomic_as(path: &Path, bytes: &[u8], keep_old: bool) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let mut prefix = std::ffi::OsString::from(".");
    prefix.push(path.file_name().unwrap_or_default());
    prefix.push(".");
    let old = keep_old
        .then(|| std::fs::symlink_metadata(path).ok())
        .flatten()
        .filter(std::fs::Metadata::is_file);
    let write = || -> std::io::Result<()> {
        let mut tmp = tempfile::Builder::new()
            .prefix(&prefix)
            .suffix(".tmp")
            // Replacing: no one else may open it before it has the old file's permissions.
            .permissions(std::fs::Permissions::from_mode(if old.is_some() {
                0o600
            } else {
                0o666
            }))
            .tempfile_in(dir)?;
        if let Some(old) = &old {
            // SAFETY: geteuid cannot fail.
            if unsafe { libc::geteuid() } == 0 {
                std::os::unix::fs::fchown(tmp.as_file(), Some(old.uid()), Some(old.gid()))?;
            }
            // After the chown, which clears set-id bits; only read and write bits are kept.
            tmp.as_file()
                .set_permissions(std::fs::Permissions::from_mode(old.mode() & 0o666))?;
        }
        tmp.write_all(bytes)?;
        // On failure the temporary file is removed when `tmp` is dropped.
        tmp.persist(path).map_err(|e| e.error)?;
        Ok(())
    };
    write().with_context(|| format!("cannot write {}", path.display()))
}

/// Refuses an output directory that another user controls, after it was created or found:
/// `dir` itself a symlink owned by neither us (effective uid) nor root, or the directory it
/// is (or points to) owned by neither. In a directory anyone may write to, such as `/tmp`,
/// another user can create the name first (a symlink to a directory of ours, or a directory
/// of theirs) and so choose where the profiles go or read and replace them.
pub fn check_output_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    // SAFETY: geteuid cannot fail.
    let euid = unsafe { libc::geteuid() };
    let trusted = |uid: u32| uid == 0 || uid == euid;
    let owner = |uid: u32| match nix::unistd::User::from_uid(uid.into()) {
        Ok(Some(user)) => format!("uid {uid} ({})", user.name),
        _ => format!("uid {uid}"),
    };
    let advice = "pass -o a directory of yours, or a new name in one";
    // Without a trailing slash, so that lstat looks at the last component itself.
    let mut entry: std::path::PathBuf = dir.components().collect();
    if entry.as_os_str().is_empty() {
        entry = ".".into();
    }
    let link = std::fs::symlink_metadata(&entry)
        .with_context(|| format!("cannot examine the output directory {}", dir.display()))?;
    if link.file_type().is_symlink() && !trusted(link.uid()) {
        anyhow::bail!(
            "refusing to write profiles to {}: it is a symlink owned by {}, neither you (uid \
             {euid}) nor root, so that user chooses where the profiles would go; {advice}",
            dir.display(),
            owner(link.uid())
        );
    }
    let meta = std::fs::metadata(&entry)
        .with_context(|| format!("cannot examine the output directory {}", dir.display()))?;
    if !meta.is_dir() {
        anyhow::bail!(
            "the output directory {} is not a directory; {advice}",
            dir.display()
        );
    }
    if !trusted(meta.uid()) {
        anyhow::bail!(
            "refusing to write profiles to {}: the directory is owned by {}, neither you (uid \
             {euid}) nor root, so that user could read or replace them; {advice}",
            dir.display(),
            owner(meta.uid())
        );
    }
    Ok(())
}

/// Local time as `YYYYMMDD-HHMMSS`, for default directory names.
pub fn timestamp() -> String {
    // SAFETY: time(NULL) and localtime_r with valid pointers.
    unsafe {
        let now = libc::time(std::ptr::null_mut());
        let mut tm: libc::tm = std::mem::zeroed();
        libc::localtime_r(&now, &mut tm);
        format!(
            "{:04}{:02}{:02}-{:02}{:02}{:02}",
            tm.tm_year + 1900,
            tm.tm_mon + 1,
            tm.tm_mday,
            tm.tm_hour,
            tm.tm_min,
            tm.tm_sec
        )
    }
}

/// Now, in nanoseconds since the Unix epoch.
pub fn unix_nanos() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i64)
}
