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
    slow_reader_with(addr, path, "").await
}

/// [`slow_reader`] with more header lines (each ending in CRLF) in the request.
pub async fn slow_reader_with(addr: SocketAddr, path: &str, header_lines: &str) -> tokio::net::TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut s = socket.connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\n{header_lines}\r\n").as_bytes()).await.unwrap();
    s
}

/// How a raw read ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RawEnd {
    /// The server closed the connection cleanly (FIN).
    Eof,
    /// The read failed (e.g. connection reset).
    Error(String),
}

/// An HTTP/1.0 response read to the end of the connection.
pub struct Http10Reply {
    /// None when no complete response head arrived.
    pub status: Option<u16>,
    pub headers: http::HeaderMap,
    pub body: Vec<u8>,
    pub end: RawEnd,
}

/// Sends `GET path HTTP/1.0` with `headers` and reads until the server closes the connection
/// (the caller bounds the wait). Err only when the connection cannot be made or written.
pub async fn http10_get(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> std::io::Result<Http10Reply> {
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    let mut req = format!("GET {path} HTTP/1.0\r\nhost: {addr}\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).await?;
    let mut bytes = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    let end = loop {
        match s.read(&mut buf).await {
            Ok(0) => break RawEnd::Eof,
            Ok(n) => bytes.extend_from_slice(&buf[..n]),
            Err(e) => break RawEnd::Error(e.to_string()),
        }
    };
    let Some(split) = bytes.windows(4).position(|w| w == b"\r\n\r\n") else {
        return Ok(Http10Reply { status: None, headers: http::HeaderMap::new(), body: bytes, end });
    };
    let head = String::from_utf8_lossy(&bytes[..split]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines.next().and_then(|l| l.split(' ').nth(1)).and_then(|c| c.parse().ok());
    let mut map = http::HeaderMap::new();
    for line in lines {
        if let Some((k, v)) = line.split_once(':') {
            if let (Ok(k), Ok(v)) = (http::HeaderName::from_bytes(k.trim().as_bytes()), v.trim().parse()) {
                map.append(k, v);
            }
        }
    }
    Ok(Http10Reply { status, headers: map, body: bytes[split + 4..].to_vec(), end })
}
