//! API client: connects to a server's Unix socket and sends one request.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use thiserror::Error;

use super::protocol::{Request, Response};

/// Errors talking to an API server.
#[derive(Debug, Error)]
pub enum ClientError {
    /// Could not connect.
    #[error("cannot connect to the API socket {path}: {source}")]
    Connect {
        /// Socket path.
        path: String,
        /// Cause.
        source: std::io::Error,
    },
    /// Socket I/O failed.
    #[error("API socket I/O: {0}")]
    Io(#[from] std::io::Error),
    /// The server answered something that is not a response.
    #[error("malformed response from the API server: {0}")]
    Malformed(String),
    /// The server closed the connection without answering.
    #[error("the API server closed the connection without answering")]
    Closed,
}

/// Sends `req` to the server at `path` and returns its response.
pub fn call(path: &Path, req: &Request, timeout: Duration) -> Result<Response, ClientError> {
    let stream = UnixStream::connect(path).map_err(|source| ClientError::Connect {
        path: path.display().to_string(),
        source,
    })?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let mut line = serde_json::to_vec(req).map_err(|e| ClientError::Malformed(e.to_string()))?;
    line.push(b'\n');
    (&stream).write_all(&line)?;
    let mut reader = BufReader::new(&stream);
    let mut resp = String::new();
    if reader.read_line(&mut resp)? == 0 {
        return Err(ClientError::Closed);
    }
    serde_json::from_str(&resp).map_err(|e| ClientError::Malformed(e.to_string()))
}
