//! The `lotecache` binary as a child process, for what only a real process shows: flags,
//! exit codes, kill -9, restarts.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub const BIN: &str = env!("CARGO_BIN_EXE_lotecache");

/// A running `lotecache serve`, killed (SIGKILL) when dropped.
pub struct Serve {
    child: Child,
    pub port: u16,
}

impl Serve {
    pub fn addr(&self) -> std::net::SocketAddr {
        ([127, 0, 0, 1], self.port).into()
    }

    /// SIGKILL, no chance to clean up.
    pub fn kill9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Starts `lotecache serve` with these arguments on a free port and waits until it listens.
pub async fn serve(origin: std::net::SocketAddr, dir: &Path, extra: &[&str]) -> Serve {
    let port = free_port();
    let server = Serve {
        child: Command::new(BIN)
            .args(["serve", "--listen", &format!("127.0.0.1:{port}"), "--origin", &format!("http://{origin}")])
            .args(["--cache-dir", dir.to_str().unwrap(), "--admin-listen", "127.0.0.1:0"])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
        port,
    };
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
            return server;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("lotecache serve did not start listening");
}
