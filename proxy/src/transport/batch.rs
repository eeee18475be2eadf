//! Datagrams in batches: `recvmmsg(2)` reads every datagram queued on a socket (up to a batch)
//! in one system call, `sendmmsg(2)` sends what one loop turn produced for a socket in one.
//! Through nix's safe wrappers (`unsafe` stays forbidden). On loopback the per-datagram system
//! calls were the largest single cost of a relayed message (docs/PERFORMANCE.md).

use std::io::{self, IoSlice, IoSliceMut};
use std::net::SocketAddr;
use std::os::fd::AsRawFd;

use bytes::Bytes;
use nix::sys::socket::{recvmmsg, sendmmsg, MsgFlags, MultiHeaders, SockaddrStorage};
use tokio::io::Interest;
use tokio::net::UdpSocket;

/// Datagrams one `recvmmsg` reads at most.
pub const RECV_BATCH: usize = 32;
/// Datagrams one `sendmmsg` sends at most.
pub const SEND_BATCH: usize = 64;
/// Room per datagram: the largest UDP payload, so nothing is ever truncated.
const SLOT: usize = 65_536;

/// Receive buffers for [`recv_batch`], allocated once.
pub struct RecvBuffers {
    buf: Vec<u8>,
}

impl Default for RecvBuffers {
    fn default() -> Self {
        RecvBuffers {
            buf: vec![0; SLOT * RECV_BATCH],
        }
    }
}

impl std::fmt::Debug for RecvBuffers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RecvBuffers")
    }
}

fn to_std(a: &SockaddrStorage) -> Option<SocketAddr> {
    if let Some(v4) = a.as_sockaddr_in() {
        return Some(SocketAddr::V4((*v4).into()));
    }
    a.as_sockaddr_in6().map(|v6| SocketAddr::V6((*v6).into()))
}

/// Reads up to `max` (at most [`RECV_BATCH`]) queued datagrams from `sock` with one system
/// call, appending each (copied out, exactly sized) with its source to `out`. Returns how many
/// were read: 0 when nothing was queued (the socket's readiness is then cleared).
pub fn recv_batch(
    sock: &UdpSocket,
    bufs: &mut RecvBuffers,
    max: usize,
    out: &mut Vec<(Bytes, SocketAddr)>,
) -> io::Result<usize> {
    let n = max.clamp(1, RECV_BATCH);
    let res = sock.try_io(Interest::READABLE, || {
        let mut headers = MultiHeaders::<SockaddrStorage>::preallocate(n, None);
        let mut slices: Vec<[IoSliceMut<'_>; 1]> = bufs
            .buf
            .chunks_mut(SLOT)
            .take(n)
            .map(|c| [IoSliceMut::new(c)])
            .collect();
        let results = recvmmsg(
            sock.as_raw_fd(),
            &mut headers,
            slices.iter_mut(),
            MsgFlags::MSG_DONTWAIT,
            None,
        )
        .map_err(io::Error::from)?;
        let mut got = Vec::with_capacity(n);
        for msg in results {
            let from = msg.address.as_ref().and_then(to_std);
            got.push((msg.bytes, from));
        }
        Ok(got)
    });
    match res {
        Ok(got) => {
            let count = got.len();
            for (i, (len, from)) in got.into_iter().enumerate() {
                // A datagram without a usable source address cannot be answered: dropped.
                if let Some(from) = from {
                    let start = i * SLOT;
                    out.push((Bytes::copy_from_slice(&bufs.buf[start..start + len]), from));
                }
            }
            Ok(count)
        }
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(0),
        Err(e) => Err(e),
    }
}

fn to_nix(a: SocketAddr) -> SockaddrStorage {
    match a {
        SocketAddr::V4(v4) => SockaddrStorage::from(v4),
        SocketAddr::V6(v6) => SockaddrStorage::from(v6),
    }
}

/// What [`send_batch`] did with a queue of datagrams.
#[derive(Debug, Default)]
pub struct Sent {
    /// Datagrams handed to the kernel, from the front of the queue.
    pub sent: usize,
    /// The socket buffer is full: the rest wait (the caller sends them when writable).
    pub blocked: bool,
    /// The datagram at `sent` was refused (unreachable, too big ...): the caller fails it and
    /// sends the rest in a new batch.
    pub refused: Option<io::Error>,
}

/// Sends the datagrams of `queue` (destination, bytes) in order, [`SEND_BATCH`] per system
/// call, until all went, the socket buffer is full, or one is refused.
pub fn send_batch(sock: &UdpSocket, queue: &[(SocketAddr, Bytes)]) -> Sent {
    let mut done = Sent::default();
    while done.sent < queue.len() {
        let chunk = &queue[done.sent..queue.len().min(done.sent + SEND_BATCH)];
        let res = sock.try_io(Interest::WRITABLE, || {
            let mut headers = MultiHeaders::<SockaddrStorage>::preallocate(chunk.len(), None);
            let slices: Vec<[IoSlice<'_>; 1]> =
                chunk.iter().map(|(_, b)| [IoSlice::new(b)]).collect();
            let addrs: Vec<Option<SockaddrStorage>> =
                chunk.iter().map(|(a, _)| Some(to_nix(*a))).collect();
            let results = sendmmsg(
                sock.as_raw_fd(),
                &mut headers,
                &slices,
                &addrs,
                [],
                MsgFlags::MSG_DONTWAIT,
            )
            .map_err(io::Error::from)?;
            Ok(results.count())
        });
        match res {
            Ok(0) => {
                done.blocked = true;
                break;
            }
            Ok(n) => done.sent += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                done.blocked = true;
                break;
            }
            // sendmmsg reports an error only for the first datagram of the call.
            Err(e) => {
                done.refused = Some(e);
                break;
            }
        }
    }
    done
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn pair() -> (UdpSocket, UdpSocket) {
        let a = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let b = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        (a, b)
    }

    /// 150 datagrams of many sizes (up to 60 000 bytes) go out in batches and come back in
    /// batches, in order, whole, with their source (in rounds of five, so that the receiver's
    /// socket buffer never overflows).
    #[tokio::test]
    async fn batches_carry_every_datagram_whole_and_in_order() {
        let (a, b) = pair().await;
        let to = b.local_addr().unwrap();
        let mut bufs = RecvBuffers::default();
        let mut got = Vec::new();
        let mut expected = Vec::new();
        for round in 0..30u8 {
            let queue: Vec<(SocketAddr, Bytes)> = [1usize, 17, 1400, 9000, 60_000]
                .iter()
                .enumerate()
                .map(|(k, len)| {
                    let mut v = vec![round; *len];
                    v[0] = k as u8;
                    (to, Bytes::from(v))
                })
                .collect();
            let mut sent = 0;
            while sent < queue.len() {
                // tokio knows a socket is writable once its reactor has seen it so.
                a.writable().await.unwrap();
                let done = send_batch(&a, &queue[sent..]);
                assert!(done.refused.is_none());
                sent += done.sent;
            }
            expected.extend(queue.into_iter().map(|(_, b)| b));
            while got.len() < expected.len() {
                tokio::time::timeout(std::time::Duration::from_secs(10), b.readable())
                    .await
                    .expect("datagrams lost")
                    .unwrap();
                let n = recv_batch(&b, &mut bufs, RECV_BATCH, &mut got).unwrap();
                assert!(n <= RECV_BATCH);
            }
        }
        assert_eq!(got.len(), 150);
        for (i, (bytes, from)) in got.iter().enumerate() {
            assert_eq!(*from, a.local_addr().unwrap());
            assert_eq!(bytes, &expected[i], "datagram {i}");
        }
        // Nothing queued: 0, not an error.
        assert_eq!(recv_batch(&b, &mut bufs, 4, &mut got).unwrap(), 0);
    }

    /// A datagram the kernel refuses (an IPv6 destination on an IPv4 socket) is reported at
    /// its position; the ones before it went.
    #[tokio::test]
    async fn a_refused_datagram_is_reported_at_its_place() {
        let (a, b) = pair().await;
        let to = b.local_addr().unwrap();
        let v6: SocketAddr = "[2001:db8::1]:5060".parse().unwrap();
        let queue = vec![
            (to, Bytes::from_static(b"one")),
            (v6, Bytes::from_static(b"two")),
            (to, Bytes::from_static(b"three")),
        ];
        a.writable().await.unwrap();
        let done = send_batch(&a, &queue);
        assert_eq!(done.sent, 1);
        assert!(done.refused.is_some());
        let rest = send_batch(&a, &queue[2..]);
        assert_eq!(rest.sent, 1);
        let mut bufs = RecvBuffers::default();
        let mut got = Vec::new();
        while got.len() < 2 {
            b.readable().await.unwrap();
            recv_batch(&b, &mut bufs, RECV_BATCH, &mut got).unwrap();
        }
        assert_eq!(got[0].0, "one");
        assert_eq!(got[1].0, "three");
    }
}
