//! The API server: a Unix socket (mode 0600) serving one JSON request line per connection.
//! Connections are served concurrently, each on its own thread; requests go as typed actions
//! over a channel to the controller thread, which owns the guest and runs them one at a time
//! (like Firecracker's VmmAction loop), plus background work between them.

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use thiserror::Error;
use tracing::{debug, warn};

use super::error::ReqError;
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

/// Where a handler sends the response to one request, now or later.
#[derive(Debug)]
pub struct Reply(mpsc::Sender<Response>);

impl Reply {
    /// A reply and the receiver its response arrives on (for hosts and tests that call a
    /// [`Handler`] directly).
    pub fn channel() -> (Reply, mpsc::Receiver<Response>) {
        let (tx, rx) = mpsc::channel();
        (Reply(tx), rx)
    }

    /// Sends the response (the client may have gone; that is not an error).
    pub fn send(self, resp: Response) {
        let _ = self.0.send(resp);
    }
}

/// Something that answers API requests: the controller of one guest.
pub trait Handler {
    /// Handles one request: answers through `reply` now, or keeps it and answers later from
    /// [`Handler::tick`] (a long operation such as an unload waiting for its patch to become
    /// unreachable). Must not panic on any input.
    fn handle(&mut self, req: Request, reply: Reply);

    /// Background work between requests (re-checking held patches, advancing waiting
    /// operations); must return quickly when there is nothing to do.
    fn tick(&mut self) {}

    /// How soon [`Handler::tick`] wants to run again.
    fn tick_interval(&self) -> Duration {
        Duration::from_millis(100)
    }
}

/// A request on its way to the controller.
struct Action {
    req: Request,
    reply: Reply,
}

/// Most connections served at once; more get a `busy` error.
const MAX_CONNECTIONS: usize = 64;
/// Longest time a client may take to send its request line.
const REQUEST_DEADLINE: Duration = Duration::from_secs(10);

/// A bound API socket.
pub struct Server {
    listener: UnixListener,
    path: PathBuf,
    stop: Arc<AtomicBool>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server").finish_non_exhaustive()
    }
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

    /// Serves requests until the stop flag is set. The calling thread is the controller: it
    /// owns `handler` and runs every request and every tick, one at a time, so operations on
    /// the guest never interleave. Connections are read and answered on threads of their
    /// own, so a slow or silent client never delays another.
    pub fn serve(&self, handler: &mut dyn Handler) -> Result<(), ServerError> {
        let (tx, rx) = mpsc::channel::<Action>();
        let live = Arc::new(AtomicUsize::new(0));
        std::thread::scope(|scope| {
            let acceptor = scope.spawn(|| self.accept_loop(tx, live));
            let mut next_tick = Instant::now();
            while !self.stop.load(Ordering::Relaxed) && !acceptor.is_finished() {
                let wait = next_tick
                    .saturating_duration_since(Instant::now())
                    .min(Duration::from_millis(50));
                match rx.recv_timeout(wait) {
                    Ok(a) => handler.handle(a.req, a.reply),
                    Err(mpsc::RecvTimeoutError::Timeout) => {}
                    Err(mpsc::RecvTimeoutError::Disconnected) => break,
                }
                if Instant::now() >= next_tick {
                    handler.tick();
                    next_tick = Instant::now() + handler.tick_interval();
                }
            }
            self.stop.store(true, Ordering::Relaxed);
            // Pending replies are dropped with the handler's state; their clients see the
            // connection close.
            drop(rx);
            match acceptor.join() {
                Ok(r) => r,
                Err(_) => Ok(()),
            }
        })
    }

    fn accept_loop(
        &self,
        tx: mpsc::Sender<Action>,
        live: Arc<AtomicUsize>,
    ) -> Result<(), ServerError> {
        std::thread::scope(|scope| {
            while !self.stop.load(Ordering::Relaxed) {
                match self.listener.accept() {
                    Ok((stream, _)) => {
                        if live.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
                            live.fetch_sub(1, Ordering::SeqCst);
                            let _ = stream.set_nonblocking(false);
                            let _ = write_response(
                                &stream,
                                &ReqError::Busy(format!(
                                    "more than {MAX_CONNECTIONS} API connections at once; retry"
                                ))
                                .into(),
                            );
                            continue;
                        }
                        let (tx, live, stop) = (tx.clone(), live.clone(), &self.stop);
                        scope.spawn(move || {
                            if let Err(e) = serve_connection(stream, &tx, stop) {
                                debug!("API connection ended: {e}");
                            }
                            live.fetch_sub(1, Ordering::SeqCst);
                        });
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        self.stop.store(true, Ordering::Relaxed);
                        return Err(ServerError::Accept(e));
                    }
                }
            }
            Ok(())
        })
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Reads the request line of a connection (within [`REQUEST_DEADLINE`] in all), hands it to
/// the controller and writes its response.
fn serve_connection(
    stream: UnixStream,
    tx: &mpsc::Sender<Action>,
    stop: &AtomicBool,
) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    let deadline = Instant::now() + REQUEST_DEADLINE;
    let mut line = Vec::new();
    let mut buf = [0u8; 64 << 10];
    let mut reader = &stream;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || stop.load(Ordering::Relaxed) {
            return Ok(()); // too slow: dropped, like an idle connection
        }
        stream.set_read_timeout(Some(left.min(Duration::from_millis(200))))?;
        match reader.read(&mut buf) {
            Ok(0) if line.is_empty() => return Ok(()),
            Ok(0) => break,
            Ok(n) => {
                let chunk = &buf[..n];
                if let Some(nl) = chunk.iter().position(|&b| b == b'\n') {
                    line.extend_from_slice(&chunk[..nl]);
                    break;
                }
                line.extend_from_slice(chunk);
                if line.len() > MAX_REQUEST_BYTES {
                    break;
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock
                        | std::io::ErrorKind::TimedOut
                        | std::io::ErrorKind::Interrupted
                ) => {}
            Err(e) => return Err(e),
        }
    }
    let resp = if line.len() > MAX_REQUEST_BYTES {
        warn!("API request over {MAX_REQUEST_BYTES} bytes refused");
        ReqError::BadRequest(format!("request larger than {MAX_REQUEST_BYTES} bytes")).into()
    } else {
        match serde_json::from_slice::<Request>(&line) {
            Ok(req) => {
                let (rtx, rrx) = mpsc::channel();
                if tx
                    .send(Action {
                        req,
                        reply: Reply(rtx),
                    })
                    .is_err()
                {
                    return Ok(()); // the server is stopping
                }
                loop {
                    match rrx.recv_timeout(Duration::from_millis(200)) {
                        Ok(r) => break r,
                        Err(mpsc::RecvTimeoutError::Timeout) if !stop.load(Ordering::Relaxed) => {}
                        Err(_) => return Ok(()),
                    }
                }
            }
            Err(e) => ReqError::BadRequest(format!("malformed request: {e}")).into(),
        }
    };
    stream.set_write_timeout(Some(Duration::from_secs(10)))?;
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

    use std::io::{BufRead, BufReader};

    /// A server bound in a fresh temporary directory named after `tag`.
    fn bind_in(tag: &str) -> (PathBuf, Server) {
        let dir = std::env::temp_dir().join(format!("{tag}{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("api.sock");
        let server = Server::bind(&path).unwrap();
        (path, server)
    }

    struct Echo;
    impl Handler for Echo {
        fn handle(&mut self, req: Request, reply: Reply) {
            reply.send(Response::ok(serde_json::to_value(req).unwrap()))
        }
    }

    #[test]
    fn serves_requests_and_rejects_garbage() {
        let (path, server) = bind_in("hvpatch-api-test-");
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

    /// Answers `status` at once and `pause` only from its third tick (a long operation).
    #[derive(Default)]
    struct Slow {
        pending: Option<Reply>,
        ticks: u32,
    }
    impl Handler for Slow {
        fn handle(&mut self, req: Request, reply: Reply) {
            match req {
                Request::Pause {} => {
                    self.pending = Some(reply);
                    self.ticks = 0;
                }
                other => reply.send(Response::ok(serde_json::to_value(other).unwrap())),
            }
        }
        fn tick(&mut self) {
            self.ticks += 1;
            if self.ticks >= 3 {
                if let Some(r) = self.pending.take() {
                    r.send(Response::ok(serde_json::json!("paused later")));
                }
            }
        }
        fn tick_interval(&self) -> Duration {
            Duration::from_millis(100)
        }
    }

    #[test]
    fn silent_and_slow_clients_and_long_operations_delay_no_one() {
        let (path, server) = bind_in("hvpatch-api-slow-");
        let stop = server.stop_flag();
        let t = std::thread::spawn(move || server.serve(&mut Slow::default()));
        // One client connects and says nothing; another sends its request byte by byte.
        let _silent = UnixStream::connect(&path).unwrap();
        let mut slow = UnixStream::connect(&path).unwrap();
        let trickle = std::thread::spawn(move || {
            for b in br#"{"op":"status"}"#.iter().chain(b"\n") {
                slow.write_all(&[*b]).unwrap();
                std::thread::sleep(Duration::from_millis(30));
            }
            let mut line = String::new();
            BufReader::new(&slow).read_line(&mut line).unwrap();
            line
        });
        // A long operation is waiting in the controller.
        let long = {
            let path = path.clone();
            std::thread::spawn(move || {
                client::call(&path, &Request::Pause {}, Duration::from_secs(10)).unwrap()
            })
        };
        std::thread::sleep(Duration::from_millis(50));
        for _ in 0..5 {
            let t0 = Instant::now();
            let r = client::call(&path, &Request::Status {}, Duration::from_secs(5)).unwrap();
            assert!(r.ok);
            assert!(
                t0.elapsed() < Duration::from_millis(100),
                "status took {:?}",
                t0.elapsed()
            );
        }
        let r = long.join().unwrap();
        assert_eq!(r.result.unwrap(), "paused later");
        assert!(trickle.join().unwrap().contains("status"));
        stop.store(true, Ordering::Relaxed);
        t.join().unwrap().unwrap();
    }

    #[test]
    fn a_request_line_that_never_ends_is_dropped() {
        let (path, server) = bind_in("hvpatch-api-drop-");
        let stop = server.stop_flag();
        let t = std::thread::spawn(move || server.serve(&mut Echo));
        let mut s = UnixStream::connect(&path).unwrap();
        s.write_all(br#"{"op":"sta"#).unwrap();
        s.set_read_timeout(Some(REQUEST_DEADLINE + Duration::from_secs(5)))
            .unwrap();
        let t0 = Instant::now();
        let mut line = String::new();
        let n = BufReader::new(&s).read_line(&mut line).unwrap_or(0);
        assert_eq!(n, 0, "no answer to an unfinished request: {line:?}");
        assert!(t0.elapsed() <= REQUEST_DEADLINE + Duration::from_secs(2));
        stop.store(true, Ordering::Relaxed);
        t.join().unwrap().unwrap();
    }
}
