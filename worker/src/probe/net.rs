//! Network probes (T17, T21): a session has no network at all, and no way to the host's
//! abstract Unix sockets; plain Unix sockets stay (the control).

use std::net::{SocketAddr, TcpStream, ToSocketAddrs, UdpSocket};
use std::os::fd::AsRawFd;
use std::time::Duration;

use nix::sys::socket::{AddressFamily, SockFlag, SockType, UnixAddr};
use serde_json::{Value, json};

use super::answer::Answer;

pub(super) fn tcp_connect(host: &str, port: u16) -> Answer {
    let connected = format!("{host}:{port}")
        .parse::<SocketAddr>()
        .map_err(std::io::Error::other)
        .and_then(|addr| TcpStream::connect_timeout(&addr, Duration::from_secs(3)));
    Answer::from_io(connected, |_| Value::Null)
}

pub(super) fn udp_send(host: &str, port: u16) -> Answer {
    let sent = UdpSocket::bind("0.0.0.0:0").and_then(|s| s.send_to(b"x", (host, port)));
    Answer::from_io(sent, |n| json!(n))
}

pub(super) fn resolve(name: &str) -> Answer {
    Answer::from_io((name, 80).to_socket_addrs(), |addrs| {
        json!(addrs.map(|a| a.to_string()).collect::<Vec<_>>())
    })
}

/// `socket(domain, type, 0)` with the test's numbers (packet, raw, vsock, ...), closed again.
pub(super) fn socket(domain: i32, kind: i32) -> Answer {
    // SAFETY: socket with integer arguments; the raw numbers are the point (a typed wrapper
    // cannot name every family). A created socket is closed below.
    let rc = unsafe { libc::socket(domain, kind, 0) };
    let answer = Answer::from_rc(rc.into(), Value::Null);
    super::close_if_open(rc);
    answer
}

/// T21: a connection to the abstract Unix socket `name` (a listener the test holds on the host).
pub(super) fn abstract_connect(name: &str) -> Answer {
    let socket = match nix::sys::socket::socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    ) {
        Ok(socket) => socket,
        Err(errno) => return Answer::failed(errno, "socket"),
    };
    let connected = UnixAddr::new_abstract(name.as_bytes())
        .and_then(|addr| nix::sys::socket::connect(socket.as_raw_fd(), &addr));
    Answer::from_nix(connected)
}
