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

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends a signal by name (HUP, TERM, …).
    pub fn signal(&self, name: &str) {
        let ok = Command::new("kill").args([&format!("-{name}"), &self.pid().to_string()]).status().unwrap();
        assert!(ok.success());
    }

    /// Waits for the process to exit on its own; its exit code.
    pub fn wait_exit(mut self, within: Duration) -> Option<i32> {
        let deadline = std::time::Instant::now() + within;
        while std::time::Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
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
    serve_logging(origin, dir, extra, None).await
}

/// As [`serve`], writing the process's logs (stderr) to `log`.
pub async fn serve_logging(origin: std::net::SocketAddr, dir: &Path, extra: &[&str], log: Option<&Path>) -> Serve {
    let port = free_port();
    let stderr = match log {
        Some(path) => Stdio::from(std::fs::File::create(path).unwrap()),
        None => Stdio::null(),
    };
    let server = Serve {
        child: Command::new(BIN)
            .args(["serve", "--listen", &format!("127.0.0.1:{port}"), "--origin", &format!("http://{origin}")])
            .args(["--cache-dir", dir.to_str().unwrap(), "--admin-listen", "127.0.0.1:0"])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(stderr)
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
