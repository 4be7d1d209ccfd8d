//! Who may see what over HTTP: the access rule of `anyprof serve`.
//!
//! A profile reveals a process's code, data layout, addresses and command line, so the daemon
//! (usually root) must not hand one to a user who could not read it from the process itself.
//! The rule:
//!
//! * **Loopback (the default).** The daemon learns which local user opened the TCP connection
//!   from the kernel's socket table, as identd does: the client's socket is the one whose local
//!   address and port are the connection's remote ones, and the kernel records the uid that
//!   created it ([`peer_uid`]: sock_diag, the interface `ss` uses, with `/proc/net/tcp{,6}`
//!   as fallback). Root sees every process. Any other uid sees exactly the processes it could
//!   `ptrace` for reading ([`may_trace`]): the process's real, effective and saved uids all
//!   equal the requester's uid, its real, effective and saved gids are all one group the
//!   requester belongs to, and the process is dumpable (`/proc/PID` is owned by that uid, which
//!   is not the case for setuid programs or after a change of credentials). A process the
//!   requester may not see answers exactly like a pid that is not connected.
//!   Every request's `Host` header must name the loopback (`127.x.x.x`, `[::1]`, `localhost`,
//!   with or without port; [`host_is_loopback`]), so that a web page whose host name an attacker
//!   re-points at 127.0.0.1 (DNS rebinding) cannot read profiles through the user's browser.
//! * **Other addresses** only with `--expose-profiles-to-network`: then every request must
//!   carry the daemon's token ([`Token`]: random, made at start, written to a file that only
//!   root and the `anyprof` group can read), as `?token=T` or `Authorization: Bearer T`, and a
//!   token holder sees every process.

use std::fs::File;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// Who a request is from, as far as profiles go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Viewer {
    /// Root, or a holder of the token: every process.
    All,
    /// A local user: the processes this uid could ptrace.
    Uid(u32),
}

impl Viewer {
    /// Whether this viewer may see process `pid`.
    pub fn sees(self, pid: u32) -> bool {
        match self {
            Viewer::All => true,
            Viewer::Uid(uid) => may_trace(uid, pid),
        }
    }
}

/// Whether an address is the local host only (127.0.0.0/8, ::1, or ::ffff:127.x.x.x).
pub fn is_loopback(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback(),
        IpAddr::V6(v6) => {
            v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
    }
}

/// Whether a `Host` header value names the loopback: `127.x.x.x`, `[::1]` or `localhost`,
/// each with or without `:port`.
pub fn host_is_loopback(host: &str) -> bool {
    let host = host.trim();
    let name = if let Some(rest) = host.strip_prefix('[') {
        // [v6] or [v6]:port
        let Some((inner, after)) = rest.split_once(']') else {
            return false;
        };
        if !(after.is_empty() || port_ok(after.strip_prefix(':'))) {
            return false;
        }
        return inner
            .parse::<std::net::Ipv6Addr>()
            .is_ok_and(|a| a.is_loopback());
    } else {
        match host.split_once(':') {
            Some((name, port)) if port_ok(Some(port)) => name,
            Some(_) => return false,
            None => host,
        }
    };
    name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::Ipv4Addr>()
            .is_ok_and(|a| a.is_loopback())
}

fn port_ok(port: Option<&str>) -> bool {
    port.is_some_and(|p| !p.is_empty() && p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit()))
}

// ---------------------------------------------------------------------------------------
// Which uid opened a loopback connection
// ---------------------------------------------------------------------------------------

/// The uid that owns the client's end of a TCP connection on this host: `client` is the
/// connection's remote address as the server sees it, `server` its local address. None when
/// the kernel no longer knows the socket (the client has gone) or the lookup is not possible.
pub fn peer_uid(client: SocketAddr, server: SocketAddr) -> Option<u32> {
    let (client, server) = (unmap(client), unmap(server));
    sock_diag_uid(client, server).or_else(|| proc_net_uid(client, server))
}

/// `::ffff:a.b.c.d` as the IPv4 address it is: the client's socket is an IPv4 one then.
fn unmap(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), v6.port()),
            None => addr,
        },
        v4 => v4,
    }
}

/// The 16 address bytes of `inet_diag_sockid` (IPv4 in the first 4).
fn addr_bytes(ip: IpAddr) -> [u8; 16] {
    let mut out = [0u8; 16];
    match ip {
        IpAddr::V4(v4) => out[..4].copy_from_slice(&v4.octets()),
        IpAddr::V6(v6) => out = v6.octets(),
    }
    out
}

/// Asks the kernel for exactly one socket through NETLINK_SOCK_DIAG (sock_diag(7)): the TCP
/// socket whose local end is `client` and remote end is `server`, and reads its `idiag_uid`.
/// An exact lookup costs the same however many sockets the host has (reading /proc/net/tcp
/// with 2,000 sockets takes about 9 ms).
fn sock_diag_uid(client: SocketAddr, server: SocketAddr) -> Option<u32> {
    const SOCK_DIAG_BY_FAMILY: u16 = 20;
    const NLMSG_ERROR: u16 = 2;
    const HEADER: usize = 16; // struct nlmsghdr
    const REQUEST: usize = 56; // struct inet_diag_req_v2
    let family = match client {
        SocketAddr::V4(_) => libc::AF_INET,
        SocketAddr::V6(_) => libc::AF_INET6,
    };
    if matches!(server, SocketAddr::V4(_)) != matches!(client, SocketAddr::V4(_)) {
        return None;
    }
    // struct nlmsghdr { u32 len; u16 type; u16 flags; u32 seq; u32 pid; }
    let mut msg = Vec::with_capacity(HEADER + REQUEST);
    msg.extend_from_slice(&((HEADER + REQUEST) as u32).to_ne_bytes());
    msg.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    msg.extend_from_slice(&(libc::NLM_F_REQUEST as u16).to_ne_bytes());
    msg.extend_from_slice(&1u32.to_ne_bytes());
    msg.extend_from_slice(&0u32.to_ne_bytes());
    // struct inet_diag_req_v2 { u8 family, protocol, ext, pad; u32 states; sockid id; }
    msg.extend_from_slice(&[family as u8, libc::IPPROTO_TCP as u8, 0, 0]);
    msg.extend_from_slice(&u32::MAX.to_ne_bytes());
    // struct inet_diag_sockid { be16 sport, dport; be32 src[4], dst[4]; u32 if; u32 cookie[2]; }
    // "src" is the socket's own end: the client's.
    msg.extend_from_slice(&client.port().to_be_bytes());
    msg.extend_from_slice(&server.port().to_be_bytes());
    msg.extend_from_slice(&addr_bytes(client.ip()));
    msg.extend_from_slice(&addr_bytes(server.ip()));
    msg.extend_from_slice(&0u32.to_ne_bytes());
    msg.extend_from_slice(&[0xff; 8]); // INET_DIAG_NOCOOKIE
    debug_assert_eq!(msg.len(), HEADER + REQUEST);

    // SAFETY: socket(2) with constant arguments; the result is checked before use.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            libc::NETLINK_SOCK_DIAG,
        )
    };
    if fd < 0 {
        return None;
    }
    // SAFETY: `fd` is a descriptor we just created and own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: a zeroed sockaddr_nl is the kernel (nl_pid 0) as destination.
    let mut kernel: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    kernel.nl_family = libc::AF_NETLINK as u16;
    // SAFETY: `msg` and `kernel` are valid for the lengths given.
    let sent = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            msg.as_ptr() as *const libc::c_void,
            msg.len(),
            0,
            &kernel as *const libc::sockaddr_nl as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
        )
    };
    if sent != msg.len() as isize {
        return None;
    }
    // The answer is one inet_diag_msg (or an error), well under 1 KiB; a second receive
    // would only bring NLMSG_DONE, which an exact request does not send.
    let timeout = libc::timeval {
        tv_sec: 1,
        tv_usec: 0,
    };
    // SAFETY: setsockopt with a valid timeval of the size given.
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            &timeout as *const libc::timeval as *const libc::c_void,
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        );
    }
    let mut buf = [0u8; 4096];
    // SAFETY: `buf` is valid for writes of its length.
    let n = unsafe {
        libc::recv(
            fd.as_raw_fd(),
            buf.as_mut_ptr() as *mut libc::c_void,
            buf.len(),
            0,
        )
    };
    let reply = buf.get(..usize::try_from(n).ok()?)?;
    let kind = u16::from_ne_bytes(reply.get(4..6)?.try_into().ok()?);
    if kind == NLMSG_ERROR || kind != SOCK_DIAG_BY_FAMILY {
        return None;
    }
    // struct inet_diag_msg { u8 family, state, timer, retrans; sockid id (48 bytes);
    //   u32 expires, rqueue, wqueue, uid, inode; }: uid at offset 64.
    let body = reply.get(HEADER..)?;
    // The kernel's exact lookup falls back to a listening socket on the client's port when
    // the client's socket is gone: accept only a connected socket with our whole four-tuple.
    let state = *body.get(1)?;
    let inode = u32::from_ne_bytes(body.get(68..72)?.try_into().ok()?);
    let sport = u16::from_be_bytes(body.get(4..6)?.try_into().ok()?);
    let dport = u16::from_be_bytes(body.get(6..8)?.try_into().ok()?);
    let (src, dst) = (body.get(8..24)?, body.get(24..40)?);
    let len = if client.is_ipv4() { 4 } else { 16 };
    if !owned_by_a_live_socket(state, u64::from(inode))
        || sport != client.port()
        || dport != server.port()
        || src[..len] != addr_bytes(client.ip())[..len]
        || dst[..len] != addr_bytes(server.ip())[..len]
    {
        return None;
    }
    Some(u32::from_ne_bytes(body.get(64..68)?.try_into().ok()?))
}

/// The same lookup through `/proc/net/tcp` or `/proc/net/tcp6`: the entry whose local
/// address is `client` and remote address is `server`; its `uid` column.
fn proc_net_uid(client: SocketAddr, server: SocketAddr) -> Option<u32> {
    let table = match client {
        SocketAddr::V4(_) => "/proc/net/tcp",
        SocketAddr::V6(_) => "/proc/net/tcp6",
    };
    let text = std::fs::read_to_string(table).ok()?;
    uid_in_table(&text, client, server)
}

/// `addr:port` as /proc/net/tcp prints it: each 32-bit word of the address as the kernel
/// holds it (network order bytes read as a native integer) in %08X, then the port in %04X.
fn proc_net_addr(addr: SocketAddr) -> String {
    let bytes = match addr.ip() {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    };
    let mut out = String::new();
    for word in bytes.chunks_exact(4) {
        let w = u32::from_ne_bytes([word[0], word[1], word[2], word[3]]);
        out.push_str(&format!("{w:08X}"));
    }
    out.push_str(&format!(":{:04X}", addr.port()));
    out
}

fn uid_in_table(text: &str, client: SocketAddr, server: SocketAddr) -> Option<u32> {
    let (local, remote) = (proc_net_addr(client), proc_net_addr(server));
    text.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        // sl local rem st tx:rx tr:when retrnsmt uid timeout inode ...
        let state = u8::from_str_radix(fields.get(3)?, 16).ok()?;
        let inode: u64 = fields.get(9)?.parse().ok()?;
        if fields.get(1)?.eq_ignore_ascii_case(&local)
            && fields.get(2)?.eq_ignore_ascii_case(&remote)
            && owned_by_a_live_socket(state, inode)
        {
            fields.get(7)?.parse().ok()
        } else {
            None
        }
    })
}

/// Whether a socket-table entry in TCP state `state` with inode `inode` still belongs to a
/// socket its creator holds, so that its uid says who is asking. A client that has closed
/// leaves an orphan or a TIME_WAIT entry, which the kernel reports with uid 0 and inode 0:
/// taken at face value it would make anyone root. A listening socket on the same port is
/// not the client either.
fn owned_by_a_live_socket(state: u8, inode: u64) -> bool {
    const ESTABLISHED: u8 = 1;
    const FIN_WAIT1: u8 = 4;
    const FIN_WAIT2: u8 = 5;
    const CLOSE_WAIT: u8 = 8;
    inode != 0 && matches!(state, ESTABLISHED | FIN_WAIT1 | FIN_WAIT2 | CLOSE_WAIT)
}

// ---------------------------------------------------------------------------------------
// Which processes a uid could ptrace
// ---------------------------------------------------------------------------------------

/// Whether `uid` could ptrace (for reading) process `pid`, by the kernel's own rule for a
/// caller without CAP_SYS_PTRACE: all of the process's uids are `uid`, all of its gids are one
/// group `uid` belongs to, it holds no capabilities, and it is dumpable (the kernel then owns
/// `/proc/PID` by its uid; a setuid program, or one that changed credentials, is owned by
/// root). Root may trace all.
pub fn may_trace(uid: u32, pid: u32) -> bool {
    if uid == 0 {
        return true;
    }
    let dir = PathBuf::from(format!("/proc/{pid}"));
    let Ok(status) = std::fs::read_to_string(dir.join("status")) else {
        return false;
    };
    let ids = |key: &str| -> Option<[u32; 3]> {
        let line = status.lines().find_map(|l| l.strip_prefix(key))?;
        let mut it = line.split_whitespace().map(|v| v.parse::<u32>().ok());
        Some([it.next()??, it.next()??, it.next()??])
    };
    let (Some(uids), Some(gids)) = (ids("Uid:"), ids("Gid:")) else {
        return false;
    };
    if uids.iter().any(|&u| u != uid) || gids.iter().any(|&g| g != gids[0]) {
        return false;
    }
    // A process with capabilities the user does not have (ambient or inherited ones given
    // to a service) may not be traced by that user either.
    let no_capabilities = status
        .lines()
        .find_map(|l| l.strip_prefix("CapPrm:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        == Some(0);
    if !no_capabilities {
        return false;
    }
    // Dumpable: checked after reading the ids, so that a process that changes credentials
    // in between is seen with root's ownership.
    let Ok(meta) = std::fs::metadata(&dir) else {
        return false;
    };
    if meta.uid() != uid {
        return false;
    }
    in_group(uid, gids[0])
}

/// Whether user `uid` belongs to group `gid` (its primary group or a supplementary one).
fn in_group(uid: u32, gid: u32) -> bool {
    use nix::unistd::{Gid, Uid, User};
    let Ok(Some(user)) = User::from_uid(Uid::from_raw(uid)) else {
        return false;
    };
    if user.gid.as_raw() == gid {
        return true;
    }
    let Ok(name) = std::ffi::CString::new(user.name.as_bytes()) else {
        return false;
    };
    nix::unistd::getgrouplist(&name, user.gid)
        .is_ok_and(|groups| groups.contains(&Gid::from_raw(gid)))
}

// ---------------------------------------------------------------------------------------
// The token of an exposed daemon
// ---------------------------------------------------------------------------------------

/// The secret every request to a daemon listening beyond the loopback must carry.
pub struct Token {
    value: String,
    file: PathBuf,
}

impl Token {
    /// The default token file: `/run/anyprof.token` as root, else in `$XDG_RUNTIME_DIR`.
    pub fn default_file() -> Option<PathBuf> {
        // SAFETY: geteuid cannot fail.
        if unsafe { libc::geteuid() } == 0 {
            return Some(PathBuf::from("/run/anyprof.token"));
        }
        std::env::var_os("XDG_RUNTIME_DIR")
            .filter(|d| !d.is_empty())
            .map(|d| PathBuf::from(d).join("anyprof.token"))
    }

    /// Makes a new random token and writes it to `file`, readable by the daemon's user and,
    /// when a group `anyprof` exists, by that group (mode 0640), by no one else. An old file
    /// there is replaced; the new one is created exclusively, never through a symbolic link.
    pub fn create(file: &Path) -> Result<Token> {
        let mut raw = [0u8; 32];
        File::open("/dev/urandom")
            .and_then(|mut f| f.read_exact(&mut raw))
            .context("reading /dev/urandom for the HTTP token")?;
        let value: String = raw.iter().map(|b| format!("{b:02x}")).collect();
        match std::fs::remove_file(file) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("removing the old token file {}", file.display()))
            }
        }
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(file)
            .with_context(|| {
                format!(
                    "creating the token file {} (choose another place with --token-file)",
                    file.display()
                )
            })?;
        if let Ok(Some(group)) = nix::unistd::Group::from_name("anyprof") {
            nix::unistd::fchown(f.as_raw_fd(), None, Some(group.gid))
                .with_context(|| format!("giving {} to group anyprof", file.display()))?;
            f.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o640))
                .with_context(|| format!("chmod 0640 {}", file.display()))?;
        }
        writeln!(f, "{value}").with_context(|| format!("writing {}", file.display()))?;
        Ok(Token {
            value,
            file: file.to_path_buf(),
        })
    }

    /// Where the token was written.
    pub fn file(&self) -> &Path {
        &self.file
    }

    /// The token itself.
    pub fn value(&self) -> &str {
        &self.value
    }

    /// Whether `given` is the token (compared in constant time).
    pub fn matches(&self, given: &str) -> bool {
        let (a, b) = (self.value.as_bytes(), given.as_bytes());
        a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
    }
}

impl Drop for Token {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.file);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    #[test]
    fn loopback_host_names() {
        for ok in [
            "127.0.0.1",
            "127.0.0.1:6060",
            "127.1.2.3:80",
            "localhost",
            "LOCALHOST:6060",
            "[::1]",
            "[::1]:6060",
        ] {
            assert!(host_is_loopback(ok), "{ok} is loopback");
        }
        for bad in [
            "evil.example",
            "evil.example:6060",
            "localhost.evil.example",
            "127.0.0.1.evil.example",
            "10.0.0.1:6060",
            "[::2]:6060",
            "[::1]x",
            "localhost:",
            "localhost:60x",
            "",
        ] {
            assert!(!host_is_loopback(bad), "{bad} is not loopback");
        }
    }

    #[test]
    fn addresses_as_proc_net_prints_them() {
        let a: SocketAddr = "127.0.0.1:6060".parse().unwrap();
        assert_eq!(proc_net_addr(a), "0100007F:17AC");
        let b: SocketAddr = "[::1]:80".parse().unwrap();
        assert_eq!(proc_net_addr(b), "00000000000000000000000001000000:0050");
    }

    /// Both lookups find the uid of our own client socket (this test's euid).
    #[test]
    fn peer_uid_of_our_own_connection() {
        // SAFETY: geteuid cannot fail.
        let me = unsafe { libc::geteuid() };
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server_side, peer) = listener.accept().unwrap();
        let local = server_side.local_addr().unwrap();
        assert_eq!(peer, client.local_addr().unwrap());
        assert_eq!(sock_diag_uid(peer, local), Some(me), "sock_diag");
        assert_eq!(proc_net_uid(peer, local), Some(me), "/proc/net/tcp");
        assert_eq!(peer_uid(peer, local), Some(me));
        // A four-tuple that does not exist is not found.
        let wrong = SocketAddr::new(peer.ip(), peer.port().wrapping_add(1));
        assert_eq!(sock_diag_uid(wrong, local), None);
        assert_eq!(proc_net_uid(wrong, local), None);
        // With no connection on a four-tuple, the kernel's lookup falls back to a socket
        // listening on the "client" port: that is not a client.
        let listening = listener.local_addr().unwrap();
        let nowhere = SocketAddr::new(listening.ip(), 1);
        assert_eq!(sock_diag_uid(listening, nowhere), None);

        // IPv6 loopback, where the host has it.
        if let Ok(listener6) = TcpListener::bind("[::1]:0") {
            let _client6 = std::net::TcpStream::connect(listener6.local_addr().unwrap()).unwrap();
            let (server6, peer6) = listener6.accept().unwrap();
            let local6 = server6.local_addr().unwrap();
            assert_eq!(sock_diag_uid(peer6, local6), Some(me), "sock_diag, IPv6");
            assert_eq!(proc_net_uid(peer6, local6), Some(me), "/proc/net/tcp6");
        }
    }

    /// A client that closed leaves a TIME_WAIT or orphaned entry that the kernel reports
    /// with uid 0: it must not make the request root's.
    #[test]
    fn a_closed_client_is_nobodys() {
        // SAFETY: geteuid cannot fail.
        let me = unsafe { libc::geteuid() };
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server_side, peer) = listener.accept().unwrap();
        let local = server_side.local_addr().unwrap();
        assert_eq!(peer_uid(peer, local), Some(me));
        drop(client); // FIN_WAIT2 without an owner, then TIME_WAIT once we close too
        drop(server_side);
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert_eq!(sock_diag_uid(peer, local), None, "sock_diag");
        assert_eq!(proc_net_uid(peer, local), None, "/proc/net/tcp");
        // The same from a table as the kernel prints it: TIME_WAIT (06), uid 0, inode 0.
        let table = format!(
            "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
             0: {} {} 06 00000000:00000000 03:00000F9C 00000000     0        0 0 3 0000000000000000\n",
            proc_net_addr(peer),
            proc_net_addr(local)
        );
        assert_eq!(uid_in_table(&table, peer, local), None);
        let live = table
            .replace(" 06 ", " 01 ")
            .replace("     0        0 0 3", "  1000        0 4242 3");
        assert_eq!(uid_in_table(&live, peer, local), Some(1000));
    }

    /// A process of nobody's that holds capabilities nobody lacks is not nobody's to see.
    #[test]
    fn capabilities_hide_a_process_from_its_user() {
        // SAFETY: geteuid cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: needs root to start processes as nobody");
            return;
        }
        let start = |caps: &[&str]| {
            let mut cmd = std::process::Command::new("setpriv");
            cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
                .args(caps)
                .args(["sleep", "30"]);
            cmd.spawn().expect("running setpriv (util-linux)")
        };
        let mut plain = start(&[]);
        let mut capable = start(&[
            "--inh-caps=+net_bind_service",
            "--ambient-caps=+net_bind_service",
        ]);
        std::thread::sleep(std::time::Duration::from_millis(300)); // both have exec'd sleep
        let (plain_seen, capable_seen) =
            (may_trace(65534, plain.id()), may_trace(65534, capable.id()));
        for child in [&mut plain, &mut capable] {
            let _ = child.kill();
            let _ = child.wait();
        }
        assert!(plain_seen, "nobody sees its own plain process");
        assert!(
            !capable_seen,
            "nobody sees its process that holds a capability"
        );
    }

    #[test]
    fn may_trace_own_processes() {
        // SAFETY: geteuid cannot fail.
        let me = unsafe { libc::geteuid() };
        let pid = std::process::id();
        assert!(may_trace(me, pid));
        if me == 0 {
            // pid 1 is root's; nobody may not trace it, nor us.
            assert!(!may_trace(65534, 1));
            assert!(!may_trace(65534, pid));
        }
        assert!(!may_trace(65534, u32::MAX - 1), "no such process");
    }

    #[test]
    fn token_compare() {
        let dir = std::env::temp_dir().join(format!("anyprof-token-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("t");
        let t = Token::create(&path).unwrap();
        let on_disk = std::fs::read_to_string(&path).unwrap();
        assert_eq!(on_disk.trim(), t.value());
        assert_eq!(t.value().len(), 64);
        assert!(t.matches(t.value()));
        assert!(!t.matches(""));
        assert!(!t.matches(&t.value()[1..]));
        let mode = std::fs::metadata(&path).unwrap().mode() & 0o777;
        assert_eq!(mode & 0o007, 0, "token file mode {mode:o}");
        drop(t);
        assert!(!path.exists());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
