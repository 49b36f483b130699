//! Records on the upgrade socket, with file descriptors passed alongside (SCM_RIGHTS).
//!
//! A record is a 5-byte header (kind, payload length u32) sent in one `sendmsg` together
//! with its descriptors, then its payload. The receiver reads exactly the header with
//! `recvmsg` (the descriptors arrive with it) and exactly the payload with plain reads, so
//! it never reads into the next record, whose descriptors would otherwise be lost.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::UnixStream;

/// Old → new: the listening sockets (payload: their names, one per line, in fd order).
pub const LISTENERS: u8 = b'L';
/// New → old: the new process accepts on them; the old one may stop.
pub const READY: u8 = b'R';
/// Old → new: one client (payload: its `SessionState`; one fd, its socket).
pub const CLIENT: u8 = b'C';
/// Old → new: one database's listening clients, to subscribe before they come (payload:
/// `state::encode_plan`).
pub const LISTEN_PLAN: u8 = b'N';
/// Old → new: no more clients follow.
pub const END: u8 = b'E';
/// New → old: a cancel request for a key the new process does not know (payload: process
/// id and secret, i32 each): its client may still be on the old process.
pub const CANCEL: u8 = b'X';

/// The most descriptors one record carries.
pub const MAX_FDS: usize = 64;
/// The largest payload accepted.
const MAX_PAYLOAD: usize = super::state::MAX_STATE + 1024;

/// One record as received.
pub struct Record {
    pub kind: u8,
    pub payload: Vec<u8>,
    pub fds: Vec<OwnedFd>,
}

/// Sends one record with `fds` attached.
pub async fn send(
    stream: &mut UnixStream,
    kind: u8,
    payload: &[u8],
    fds: &[RawFd],
) -> io::Result<()> {
    if fds.len() > MAX_FDS || payload.len() > MAX_PAYLOAD {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "record too large",
        ));
    }
    let len = u32::try_from(payload.len()).map_err(|_| io::ErrorKind::InvalidInput)?;
    let mut header = [0u8; 5];
    header[0] = kind;
    header[1..].copy_from_slice(&len.to_be_bytes());
    let mut sent = 0;
    while sent < header.len() {
        let rest = header.get(sent..).unwrap_or_default();
        // The descriptors go with the first byte only.
        let attach = if sent == 0 { fds } else { &[] };
        let n = stream
            .async_io(Interest::WRITABLE, || {
                sendmsg(stream.as_raw_fd(), rest, attach)
            })
            .await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        sent += n;
    }
    stream.write_all(payload).await
}

/// Receives one record; `Ok(None)` at a clean end of the stream.
pub async fn recv(stream: &mut UnixStream) -> io::Result<Option<Record>> {
    let mut header = [0u8; 5];
    let mut fds = Vec::new();
    let mut got = 0;
    while got < header.len() {
        let rest = header.get_mut(got..).unwrap_or_default();
        let n = stream
            .async_io(Interest::READABLE, || {
                recvmsg(stream.as_raw_fd(), rest, &mut fds)
            })
            .await?;
        if n == 0 {
            if got == 0 && fds.is_empty() {
                return Ok(None);
            }
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        got += n;
    }
    let [kind, a, b, c, d] = header;
    let len = u32::from_be_bytes([a, b, c, d]) as usize;
    if len > MAX_PAYLOAD {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "record too large",
        ));
    }
    let mut payload = vec![0; len];
    stream.read_exact(&mut payload).await?;
    Ok(Some(Record { kind, payload, fds }))
}

/// The cmsg buffer for up to [`MAX_FDS`] descriptors, aligned for `cmsghdr`.
#[repr(C, align(8))]
struct ControlBuffer([u8; 512]);

fn sendmsg(socket: RawFd, bytes: &[u8], fds: &[RawFd]) -> io::Result<usize> {
    let mut iov = libc::iovec {
        iov_base: bytes.as_ptr().cast_mut().cast(),
        iov_len: bytes.len(),
    };
    let mut control = ControlBuffer([0; 512]);
    let fd_bytes = std::mem::size_of_val(fds);
    // SAFETY: msghdr is plain data; every pointer set below outlives the call, and the
    // control message is written inside `control`, whose size CMSG_SPACE bounds (64 fds
    // take 256 bytes of data, far under 512).
    let rc = unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        if !fds.is_empty() {
            let space = libc::CMSG_SPACE(fd_bytes as u32) as usize;
            msg.msg_control = control.0.as_mut_ptr().cast();
            msg.msg_controllen = space as _;
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(fd_bytes as u32) as _;
            std::ptr::copy_nonoverlapping(
                fds.as_ptr().cast::<u8>(),
                libc::CMSG_DATA(cmsg),
                fd_bytes,
            );
        }
        libc::sendmsg(socket, &msg, libc::MSG_NOSIGNAL)
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(rc as usize)
}

fn recvmsg(socket: RawFd, buf: &mut [u8], fds: &mut Vec<OwnedFd>) -> io::Result<usize> {
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let mut control = ControlBuffer([0; 512]);
    // SAFETY: as in sendmsg; the kernel writes at most msg_controllen bytes of control
    // data, and each descriptor read from it is new to this process (CLOEXEC), owned once.
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.0.as_mut_ptr().cast();
        msg.msg_controllen = control.0.len() as _;
        let rc = libc::recvmsg(socket, &mut msg, libc::MSG_CMSG_CLOEXEC);
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(cmsg);
                let header = libc::CMSG_LEN(0) as usize;
                let n = ((*cmsg).cmsg_len as usize).saturating_sub(header)
                    / std::mem::size_of::<RawFd>();
                for i in 0..n {
                    let fd = std::ptr::read_unaligned(data.cast::<RawFd>().add(i));
                    fds.push(OwnedFd::from_raw_fd(fd));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
        if msg.msg_flags & libc::MSG_CTRUNC != 0 {
            // Some descriptors were dropped by the kernel: the record cannot be trusted.
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "too many descriptors in one record",
            ));
        }
        Ok(rc as usize)
    }
}

/// The process id of the peer of a connected Unix socket (SO_PEERCRED).
pub fn peer_pid(stream: &UnixStream) -> io::Result<i32> {
    let cred = stream.peer_cred()?;
    cred.pid()
        .ok_or_else(|| io::Error::other("the peer's process id is unknown"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_record_carries_its_descriptors_and_the_next_one_its_own() {
        let (mut a, mut b) = UnixStream::pair().unwrap();
        let (r1, _w1) = std::io::pipe().unwrap();
        let (r2, _w2) = std::io::pipe().unwrap();
        let fd1: OwnedFd = r1.into();
        let fd2: OwnedFd = r2.into();
        send(&mut a, CLIENT, b"first", &[fd1.as_raw_fd()])
            .await
            .unwrap();
        send(&mut a, CLIENT, b"second!", &[fd2.as_raw_fd()])
            .await
            .unwrap();
        send(&mut a, END, b"", &[]).await.unwrap();
        drop(a);
        let one = recv(&mut b).await.unwrap().unwrap();
        assert_eq!(
            (one.kind, &one.payload[..], one.fds.len()),
            (CLIENT, &b"first"[..], 1)
        );
        let two = recv(&mut b).await.unwrap().unwrap();
        assert_eq!((&two.payload[..], two.fds.len()), (&b"second!"[..], 1));
        let end = recv(&mut b).await.unwrap().unwrap();
        assert_eq!((end.kind, end.fds.len()), (END, 0));
        assert!(recv(&mut b).await.unwrap().is_none());
    }
}
