//! The API server: a Unix socket (mode 0600) serving one JSON request line per connection, one
//! connection at a time, so operations on the guest never interleave.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;
use tracing::{debug, warn};

use super::protocol::{Request, Response, MAX_REQUEST_BYTES};

/// Errors setting up or running the API server.
#[derive(Debug, Error)]
pub enum ServerError {
    /// The socket path is taken by a live server.
    #[error("API socket {0} is in use by a running server")]
    InUse(PathBuf),
    /// Binding or configuring the socket failed.
    #[error("cannot create the API socket {path}: {source}")]
    Bind {
        /// Socket path.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// Accepting connections failed.
    #[error("API socket accept: {0}")]
    Accept(std::io::Error),
}

/// Something that answers API requests.
pub trait Handler {
    /// Handles one request. Must not panic on any input.
    fn handle(&mut self, req: Request) -> Response;

    /// Background work between requests (re-checking held patches); called often, so it must
    /// return quickly when there is nothing to do.
    fn tick(&mut self) {}
}

/// A bound API socket.
pub struct Server {
    listener: UnixListener,
    path: PathBuf,
    stop: Arc<AtomicBool>,
}

impl Server {
    /// Binds `path` with mode 0600. A stale socket file (no server behind it) is replaced.
    pub fn bind(path: &Path) -> Result<Server, ServerError> {
        if path.exists() {
            if UnixStream::connect(path).is_ok() {
                return Err(ServerError::InUse(path.to_path_buf()));
            }
            let _ = std::fs::remove_file(path);
        }
        let bind_err = |source| ServerError::Bind {
            path: path.to_path_buf(),
            source,
        };
        let listener = UnixListener::bind(path).map_err(bind_err)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(bind_err)?;
        listener.set_nonblocking(true).map_err(bind_err)?;
        Ok(Server {
            listener,
            path: path.to_path_buf(),
            stop: Arc::new(AtomicBool::new(false)),
        })
    }

    /// A flag that makes [`Server::serve`] return when set.
    pub fn stop_flag(&self) -> Arc<AtomicBool> {
        self.stop.clone()
    }

    /// Serves requests until the stop flag is set.
    pub fn serve(&self, handler: &mut dyn Handler) -> Result<(), ServerError> {
        while !self.stop.load(Ordering::Relaxed) {
            handler.tick();
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if let Err(e) = serve_connection(stream, handler) {
                        debug!("API connection ended: {e}");
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(ServerError::Accept(e)),
            }
        }
        Ok(())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Serves the one request of a connection (clients connect once per request, so an idle client
/// cannot hold the server).
fn serve_connection(stream: UnixStream, handler: &mut dyn Handler) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut line = Vec::new();
    let n = BufReader::new(&stream)
        .take(MAX_REQUEST_BYTES as u64 + 1)
        .read_until(b'\n', &mut line)?;
    if n == 0 {
        return Ok(());
    }
    let resp = if line.len() > MAX_REQUEST_BYTES {
        warn!("API request over {MAX_REQUEST_BYTES} bytes refused");
        Response::err(
            "bad_request",
            format!("request larger than {MAX_REQUEST_BYTES} bytes"),
        )
    } else {
        match serde_json::from_slice::<Request>(&line) {
            Ok(req) => handler.handle(req),
            Err(e) => Response::err("bad_request", format!("malformed request: {e}")),
        }
    };
    write_response(&stream, &resp)
}

fn write_response(mut stream: &UnixStream, resp: &Response) -> std::io::Result<()> {
    let mut out = serde_json::to_vec(resp).unwrap_or_else(|e| {
        format!(r#"{{"ok":false,"error":{{"kind":"internal","message":"{e}"}}}}"#).into_bytes()
    });
    out.push(b'\n');
    stream.write_all(&out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::client;

    struct Echo;
    impl Handler for Echo {
        fn handle(&mut self, req: Request) -> Response {
            Response::ok(serde_json::to_value(req).unwrap())
        }
    }

    #[test]
    fn serves_requests_and_rejects_garbage() {
        let dir = std::env::temp_dir().join(format!("hvpatch-api-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("api.sock");
        let server = Server::bind(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(matches!(Server::bind(&path), Err(ServerError::InUse(_))));
        let stop = server.stop_flag();
        let t = std::thread::spawn(move || server.serve(&mut Echo));

        let r = client::call(&path, &Request::Status {}, Duration::from_secs(5)).unwrap();
        assert!(r.ok);
        assert_eq!(r.result.unwrap()["op"], "status");

        let mut s = UnixStream::connect(&path).unwrap();
        s.write_all(b"{not json\n").unwrap();
        let mut line = String::new();
        BufReader::new(&s).read_line(&mut line).unwrap();
        let r: Response = serde_json::from_str(&line).unwrap();
        assert!(!r.ok);
        assert_eq!(r.error.unwrap().kind, "bad_request");

        stop.store(true, Ordering::Relaxed);
        t.join().unwrap().unwrap();
        assert!(!path.exists(), "socket removed when the server goes");
    }
}
