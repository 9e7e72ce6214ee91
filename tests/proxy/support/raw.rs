//! Raw HTTP/1.1 over TCP, for what a well-behaved client library would never send.

use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// What came back on a raw connection.
pub struct RawReply {
    pub bytes: Vec<u8>,
    /// The server closed the connection (EOF) before the read timeout.
    pub closed: bool,
}

impl RawReply {
    /// The status code of the first response, if any.
    pub fn status(&self) -> Option<u16> {
        let text = String::from_utf8_lossy(&self.bytes);
        text.strip_prefix("HTTP/1.1 ").and_then(|r| r.get(..3)).and_then(|c| c.parse().ok())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.bytes).into_owned()
    }

    /// How many responses (status lines) came back.
    pub fn responses(&self) -> usize {
        self.text().matches("HTTP/1.1 ").count()
    }
}

/// Sends `request` as is and reads until the server closes or `wait` passes in silence.
pub async fn raw(addr: SocketAddr, request: &[u8], wait: Duration) -> RawReply {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(request).await.unwrap();
    let mut bytes = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match tokio::time::timeout(wait, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return RawReply { bytes, closed: true },
            Ok(Ok(n)) => bytes.extend_from_slice(&buf[..n]),
            Err(_) => return RawReply { bytes, closed: false },
        }
    }
}

/// A client with a 4 KiB receive buffer that has sent `GET path` and reads nothing yet: the
/// server can only push a few KiB before it must wait for this reader.
pub async fn slow_reader(addr: SocketAddr, path: &str) -> tokio::net::TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut s = socket.connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n").as_bytes()).await.unwrap();
    s
}
