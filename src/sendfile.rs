//! Zero-copy sending of stored content: a large body served from a content file is handed to
//! hyper as a read-only memory map registered here by address range; when the connection
//! writer ([`crate::server::client_io::ClientIo`]) is asked to write bytes inside a registered range, it
//! sends them with `sendfile(2)` from the file instead of copying them through user memory
//! (what nginx does with `sendfile on`). Nothing in user space reads the mapped pages.
//!
//! Integrity: only files whose fingerprint matches their last successful verification are
//! registered, and before every `sendfile` the file's fingerprint is checked again on its
//! descriptor; a changed file fails the write, and hyper aborts the response (never a complete
//! `200` or `206` with changed bytes).

use crate::fingerprint::Fingerprint;
use bytes::Bytes;
use std::{
    collections::BTreeMap,
    fs::File,
    io,
    os::fd::AsRawFd,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, RwLock,
    },
    task::{Context, Poll},
};
use tokio::io::AsyncWrite;

/// A registered memory range backed by a content file.
#[derive(Clone)]
pub struct Region {
    pub len: usize,
    pub file: Arc<File>,
    pub fingerprint: Fingerprint,
}

/// Start address → region.
static REGIONS: RwLock<BTreeMap<usize, Region>> = RwLock::new(BTreeMap::new());
/// How many regions are live: writes skip the lookup entirely while there are none.
static LIVE: AtomicUsize = AtomicUsize::new(0);

/// Owns a mapping and its registration; dropping it unregisters and unmaps.
struct Mapped {
    map: memmap2::Mmap,
    /// Kept alive with the mapping (the store's "file is being read" guard).
    _keep: Box<dyn Send + Sync>,
}

impl AsRef<[u8]> for Mapped {
    fn as_ref(&self) -> &[u8] {
        &self.map
    }
}

impl Drop for Mapped {
    fn drop(&mut self) {
        if REGIONS.write().unwrap_or_else(|p| p.into_inner()).remove(&(self.map.as_ptr() as usize)).is_some() {
            LIVE.fetch_sub(1, Ordering::Release);
        }
    }
}

/// Maps `file` (whose state is `fingerprint`, already verified) and registers it: the returned
/// bytes, written through a `ClientIo`, go out with `sendfile`.
pub fn map(file: File, fingerprint: Fingerprint, keep: Box<dyn Send + Sync>) -> io::Result<Bytes> {
    // SAFETY: content files are never truncated or rewritten in place by lotecache (cacache
    // writes new files and renames them); the pages are only handed to the kernel.
    let map = unsafe { memmap2::Mmap::map(&file)? };
    let region = Region { len: map.len(), file: Arc::new(file), fingerprint };
    REGIONS.write().unwrap_or_else(|p| p.into_inner()).insert(map.as_ptr() as usize, region);
    LIVE.fetch_add(1, Ordering::Release);
    Ok(Bytes::from_owner(Mapped { map, _keep: keep }))
}

/// The region `buf` lies in, with `buf`'s offset in it.
pub fn lookup(buf: &[u8]) -> Option<(Region, u64)> {
    if buf.is_empty() || LIVE.load(Ordering::Acquire) == 0 {
        return None;
    }
    let addr = buf.as_ptr() as usize;
    let regions = REGIONS.read().unwrap_or_else(|p| p.into_inner());
    let (&start, region) = regions.range(..=addr).next_back()?;
    (addr + buf.len() <= start + region.len).then(|| (region.clone(), (addr - start) as u64))
}

/// The file changed while it was being sent.
#[derive(Debug, thiserror::Error)]
#[error("content file changed while it was sent; response aborted")]
pub struct ChangedWhileSending;

/// Sends `len` bytes of `region` from `offset` to the socket `fd`; `Err(WouldBlock)` when the
/// socket is full. Before every call, checks the file is unchanged (one `fstat`): a body may be
/// a slice of the region (a `Range` answer), so any call may be the one that sends its last
/// bytes.
pub fn send(fd: &impl AsRawFd, region: &Region, offset: u64, len: usize) -> io::Result<usize> {
    let now = Fingerprint::of(&region.file.metadata()?);
    if now != region.fingerprint {
        return Err(io::Error::other(ChangedWhileSending));
    }
    let mut off = offset as libc::off_t;
    // SAFETY: plain syscall on two descriptors we own; `off` is a valid pointer.
    let n = unsafe { libc::sendfile(fd.as_raw_fd(), region.file.as_raw_fd(), &mut off, len) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// A socket that can also send file ranges without copying them.
pub trait ZeroCopySocket: AsyncWrite + Unpin + AsRawFd {
    fn poll_writable(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
    fn try_send(&self, f: impl FnOnce() -> io::Result<usize>) -> io::Result<usize>;
}

impl ZeroCopySocket for tokio::net::TcpStream {
    fn poll_writable(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.poll_write_ready(cx)
    }

    fn try_send(&self, f: impl FnOnce() -> io::Result<usize>) -> io::Result<usize> {
        self.try_io(tokio::io::Interest::WRITABLE, f)
    }
}

/// Sends `len` bytes of a registered file region from `offset` to `socket` with `sendfile`,
/// waiting for the socket to be writable.
pub fn poll_send<S: ZeroCopySocket>(
    socket: &S,
    cx: &mut Context<'_>,
    region: &Region,
    offset: u64,
    len: usize,
) -> Poll<io::Result<usize>> {
    loop {
        match socket.poll_writable(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Ready(Ok(())) => {}
        }
        match socket.try_send(|| send(socket, region, offset, len)) {
            Ok(n) => return Poll::Ready(Ok(n)),
            // try_io cleared the readiness: wait for the socket again.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Poll::Ready(Err(e)),
        }
    }
}
