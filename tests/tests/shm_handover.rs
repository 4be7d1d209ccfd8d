//! The preload's side of the shared region (issue 13, points 2 and 3), against a minimal
//! stand-in collector written here with the public `anyprof_wire::shared` API: the hand-over
//! is one Region datagram carrying a sealed memfd, then the hello, then the process closes
//! its socket; afterwards the program (and its forked child) finds no descriptor of ours by
//! listing `/proc/self/fd` or probing with `fcntl`, and every message arrives through the
//! message ring, the last flush marked `finished`.

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyprof_tests::{
    binaries, clean_command, compile, files_in, heap_record_command, read_profile_in, run,
    scratch_dir,
};
use anyprof_wire::shared::{self as shm, Shared, SHARED_MAGIC, SHARED_SIZE, SHARED_VERSION};
use anyprof_wire::{decode, Message};

/// A listening `SOCK_SEQPACKET` socket at `path`.
fn listen(path: &Path) -> libc::c_int {
    // SAFETY: plain socket(2) call.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC, 0) };
    assert!(fd >= 0);
    // SAFETY: a zeroed sockaddr_un is valid.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_os_str().as_encoded_bytes();
    assert!(bytes.len() < addr.sun_path.len(), "socket path too long");
    for (d, &s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = s as libc::c_char;
    }
    let len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
    // SAFETY: valid address of `len` bytes; fd is ours.
    let ok = unsafe {
        libc::bind(fd, (&addr as *const libc::sockaddr_un).cast(), len) == 0
            && libc::listen(fd, 16) == 0
    };
    assert!(ok, "bind/listen: {}", std::io::Error::last_os_error());
    fd
}

/// Waits up to `timeout` for a connection.
fn accept(listener: libc::c_int, timeout: Duration) -> Option<libc::c_int> {
    let mut pfd = libc::pollfd {
        fd: listener,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    if unsafe { libc::poll(&mut pfd, 1, timeout.as_millis() as libc::c_int) } != 1 {
        return None;
    }
    // SAFETY: accept on our listening socket.
    let fd = unsafe {
        libc::accept4(
            listener,
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            libc::SOCK_CLOEXEC,
        )
    };
    (fd >= 0).then_some(fd)
}

/// Receives one datagram and the descriptors that came with it.
fn recv(conn: libc::c_int) -> (Vec<u8>, Vec<libc::c_int>) {
    let mut buf = vec![0u8; 65536];
    let mut control = [0u64; 16];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: a zeroed msghdr is valid; we point it at live buffers.
    let mut hdr: libc::msghdr = unsafe { std::mem::zeroed() };
    hdr.msg_iov = &mut iov;
    hdr.msg_iovlen = 1;
    hdr.msg_control = control.as_mut_ptr().cast();
    hdr.msg_controllen = std::mem::size_of_val(&control);
    // SAFETY: hdr points to valid buffers for the call.
    let n = unsafe { libc::recvmsg(conn, &mut hdr, libc::MSG_CMSG_CLOEXEC) };
    assert!(n >= 0, "recvmsg: {}", std::io::Error::last_os_error());
    buf.truncate(n as usize);
    let mut fds = Vec::new();
    // SAFETY: walking the control messages the kernel wrote into `control`.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&hdr);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(cmsg).cast::<libc::c_int>();
                let count = ((*cmsg).cmsg_len - libc::CMSG_LEN(0) as usize) / 4;
                for i in 0..count {
                    fds.push(data.add(i).read_unaligned());
                }
            }
            cmsg = libc::CMSG_NXTHDR(&hdr, cmsg);
        }
    }
    (buf, fds)
}

/// One process's session as the stand-in collector saw it.
struct Session {
    pid: u32,
    kinds: Vec<&'static str>,
    finished: bool,
}

fn kind_name(m: &Message) -> &'static str {
    match m {
        Message::Hello(_) => "Hello",
        Message::CpuSamples(_) => "CpuSamples",
        Message::HeapBuckets(_) => "HeapBuckets",
        Message::Goodbye(_) => "Goodbye",
        Message::ModuleLoaded(_) => "ModuleLoaded",
        Message::MemStats(_) => "MemStats",
        _ => "other",
    }
}

/// Takes the hand-over on `conn`, maps the region and reads its message ring (writing the
/// heartbeat) until the process marks it finished or `deadline` passes.
fn serve(conn: libc::c_int, deadline: Instant) -> Session {
    let (region, fds) = recv(conn);
    let Ok(Message::Region(info)) = decode(&region) else {
        panic!("first datagram is not a Region message: {region:?}");
    };
    assert_eq!(fds.len(), 1, "the Region datagram carries the memfd");
    assert_eq!(info.version, SHARED_VERSION);
    assert_eq!(info.size, SHARED_SIZE as u64);
    let (hello, more) = recv(conn);
    assert!(more.is_empty());
    let Ok(Message::Hello(hello)) = decode(&hello) else {
        panic!("second datagram is not the hello");
    };
    // The process closed its end right after the hello.
    let (rest, _) = recv(conn);
    assert!(rest.is_empty(), "nothing follows the hello on the socket");
    // SAFETY: closing our accepted socket.
    unsafe { libc::close(conn) };

    let memfd = fds[0];
    // SAFETY: fcntl/fstat on the descriptor we received.
    let (seals, size) = unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        libc::fstat(memfd, &mut st);
        (libc::fcntl(memfd, libc::F_GET_SEALS), st.st_size)
    };
    let wanted = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
    assert_eq!(seals & wanted, wanted, "memfd seals {seals:#x}");
    assert_eq!(size as usize, SHARED_SIZE);
    // SAFETY: mapping the whole memfd shared; unmapped below.
    let map = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            SHARED_SIZE,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            memfd,
            0,
        )
    };
    assert_ne!(map, libc::MAP_FAILED);
    // SAFETY: our copy of the descriptor; the mapping keeps the memory.
    unsafe { libc::close(memfd) };
    // SAFETY: the mapping is SHARED_SIZE bytes of a valid (all-zero-is-valid) Shared; the
    // other process only writes atomics and ring data, which we read through atomics and
    // the volatile ring reader.
    let shared = unsafe { &*(map as *const Shared) };
    use std::sync::atomic::Ordering::{Acquire, Release};
    assert_eq!(shared.header.magic.load(Acquire), SHARED_MAGIC);
    assert_eq!(shared.header.pid.load(Acquire), hello.pid);

    let mut kinds = Vec::new();
    let mut out = Vec::new();
    let mut finished = false;
    while Instant::now() < deadline {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: valid timespec.
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
        let ms = ts.tv_sec as u64 * 1000 + ts.tv_nsec as u64 / 1_000_000;
        shared.header.collector_seen_ms.store(ms, Release);
        let done = shared.header.finished.load(Acquire) == shm::FINISHED;
        // SAFETY: the ring lies inside our live mapping.
        while unsafe { shm::message_read_one(&shared.messages, &mut out) }.expect("ring intact") {
            let m = decode(&out).expect("every ring message decodes");
            kinds.push(kind_name(&m));
        }
        if done {
            finished = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    // SAFETY: unmapping our mapping; `shared` is not used after.
    unsafe { libc::munmap(map, SHARED_SIZE) };
    Session {
        pid: hello.pid,
        kinds,
        finished,
    }
}

#[test]
fn region_handed_over_as_a_sealed_memfd_and_no_descriptor_of_ours_remains() {
    let bins = binaries();
    let dir = scratch_dir("shm_handover");
    let program = compile("shm_fds.c", &["-O1"], &dir);
    // Descriptors inherited from the test harness (cargo's jobserver) are the baseline.
    let direct = clean_command(&program)
        .output()
        .expect("run the program directly");
    assert!(direct.status.success());
    let baseline = String::from_utf8_lossy(&direct.stdout).into_owned();
    let fds_of = |out: &str, who: &str| {
        out.lines()
            .find_map(|l| l.strip_prefix(who))
            .and_then(|l| l.split(" memfd:").next())
            .map(str::to_owned)
            .unwrap_or_else(|| panic!("no line for {who} in:\n{out}"))
    };
    let socket = dir.join("c.sock");
    let listener = listen(&socket);
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut cmd = clean_command(&program);
    cmd.env("LD_PRELOAD", &bins.preload)
        .env("ANYPROF_SOCKET", &socket)
        .env("ANYPROF_MODE", "record")
        .env("ANYPROF_CPU_HZ", "1000")
        .env("ANYPROF_MEM_RATE", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: the closure only calls setpgid, which is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            libc::setpgid(0, 0);
            Ok(())
        })
    };
    let child = cmd.spawn().expect("start the test program");
    let mut threads = Vec::new();
    // The program and its forked child each hand over a region of their own.
    for _ in 0..2 {
        let conn = accept(listener, Duration::from_secs(30)).expect("a hand-over");
        threads.push(std::thread::spawn(move || serve(conn, deadline)));
    }
    let out = child.wait_with_output().expect("wait for the program");
    let sessions: Vec<Session> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    // SAFETY: closing our listener.
    unsafe { libc::close(listener) };
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for who in ["child fds:", "parent fds:"] {
        assert_eq!(
            fds_of(&stdout, who),
            fds_of(&baseline, who),
            "{who} a descriptor of ours is visible (without anyprof:\n{baseline}with:\n{stdout})"
        );
    }
    assert_eq!(
        stdout.matches("memfd: yes").count(),
        2,
        "the program and its child each map a region:\n{stdout}"
    );
    assert_ne!(sessions[0].pid, sessions[1].pid);
    for s in &sessions {
        assert!(s.finished, "pid {}: no finished flag: {:?}", s.pid, s.kinds);
        for kind in [
            "ModuleLoaded",
            "CpuSamples",
            "HeapBuckets",
            "MemStats",
            "Goodbye",
        ] {
            assert!(
                s.kinds.contains(&kind),
                "pid {}: no {kind} in the ring: {:?}",
                s.pid,
                s.kinds
            );
        }
    }
}

/// A forked child's region starts with an empty heap profile (no copy of its parent's
/// buckets, no memory of its parent's sampled blocks): its profile holds what it allocated,
/// and the frees of its parent's blocks are not its own. Needs the collector's region reader.
#[test]
fn a_forked_childs_heap_profile_holds_only_what_it_allocated() {
    let dir = scratch_dir("shm_fork_heap");
    let program = compile("shm_fork_heap.c", &["-O1", "-g"], &dir);
    let out_dir = dir.join("profile");
    let out = run(&mut heap_record_command(
        &out_dir,
        &["--mem-rate", "1"],
        &program,
        &[],
    ));
    assert_eq!(out.code, 0, "{}", out.stderr_text());
    let files = files_in(&out_dir);
    // heap.pb.gz holds both; each has its own file too.
    let child_file = anyprof_tests::other_process_files(&out_dir, "heap")
        .into_iter()
        .next()
        .unwrap_or_else(|| panic!("no heap profile of the forked child: {files:?}"));
    let parent_file = anyprof_tests::program_profile_path(&out_dir, "heap");
    let file_name = |p: &std::path::Path| p.file_name().map(|n| n.to_string_lossy().into_owned());
    let parent = read_profile_in(&out_dir, &file_name(&parent_file).unwrap_or_default(), &out)
        .heap_values_by_site();
    let child = read_profile_in(&out_dir, &file_name(&child_file).unwrap_or_default(), &out)
        .heap_values_by_site();
    // [alloc_objects, alloc_space, inuse_objects, inuse_space]; usable sizes are a little
    // over the 64 KiB asked for.
    let is_blocks = |v: Option<&[i64; 4]>, n: i64| {
        v.is_some_and(|v| {
            let bytes_ok = |b: i64| (n * 65536..n * (65536 + 64)).contains(&b);
            v[0] == n && v[2] == n && bytes_ok(v[1]) && bytes_ok(v[3])
        })
    };
    assert!(
        is_blocks(parent.get("parent_site"), 160),
        "parent: {parent:?}"
    );
    assert!(!parent.contains_key("child_site"), "parent: {parent:?}");
    assert!(is_blocks(child.get("child_site"), 80), "child: {child:?}");
    assert!(
        child.get("parent_site").is_none_or(|v| *v == [0; 4]),
        "the child's profile shows its parent's allocations or their frees: {child:?}"
    );
}
