//! GDB Remote Serial Protocol client (all-stop mode) for QEMU's gdbstub over a Unix socket.
//!
//! Every byte from the stub is untrusted: packets are size-bounded, checksums verified, every
//! read has a deadline, and malformed data is an error, never a panic.

use std::collections::VecDeque;
use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use super::AttachError;

/// Largest packet payload accepted from the stub (QEMU's own limit is 4 KiB; target.xml
/// chunks are smaller than that).
pub const MAX_PACKET: usize = 256 * 1024;
/// Most stop replies kept while waiting for a command reply.
const MAX_QUEUED_STOPS: usize = 16;

/// Why the target stopped (a parsed stop reply).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopReply {
    /// `T`/`S` packet: signal and the thread that stopped (if reported).
    Signal {
        /// Signal number (5 = SIGTRAP: breakpoint/step; 2 = SIGINT: interrupt).
        signal: u8,
        /// Thread id of the stopping vCPU.
        thread: Option<u64>,
    },
    /// `W`/`X` packet: the target exited.
    Exited(u8),
}

impl StopReply {
    /// Parses a stop-reply payload; `None` if it is not one.
    pub fn parse(p: &[u8]) -> Option<StopReply> {
        let (&kind, rest) = p.split_first()?;
        match kind {
            b'T' | b'S' => {
                let signal =
                    u8::from_str_radix(std::str::from_utf8(rest.get(..2)?).ok()?, 16).ok()?;
                let mut thread = None;
                for field in rest.get(2..)?.split(|&b| b == b';') {
                    if let Some(v) = field.strip_prefix(b"thread:") {
                        thread = parse_thread_id(v);
                    }
                }
                Some(StopReply::Signal { signal, thread })
            }
            b'W' | b'X' => {
                let code = rest.get(..2).and_then(|h| std::str::from_utf8(h).ok());
                Some(StopReply::Exited(
                    code.and_then(|c| u8::from_str_radix(c, 16).ok())
                        .unwrap_or(0),
                ))
            }
            _ => None,
        }
    }
}

/// Parses a thread id `tid` or `p<pid>.<tid>` (hex).
pub fn parse_thread_id(v: &[u8]) -> Option<u64> {
    let s = std::str::from_utf8(v).ok()?;
    let s = match s.strip_prefix('p') {
        Some(mp) => mp.split_once('.')?.1,
        None => s,
    };
    if s.is_empty() || s.len() > 16 {
        return None;
    }
    u64::from_str_radix(s, 16).ok()
}

/// Hex-encodes bytes.
pub fn hex_encode(data: &[u8]) -> String {
    let mut s = String::with_capacity(data.len() * 2);
    for b in data {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

/// Decodes hex; `None` on odd length or a non-hex digit.
pub fn hex_decode(h: &[u8]) -> Option<Vec<u8>> {
    if !h.len().is_multiple_of(2) {
        return None;
    }
    h.chunks(2)
        .map(|c| u8::from_str_radix(std::str::from_utf8(c).ok()?, 16).ok())
        .collect()
}

fn checksum(data: &[u8]) -> u8 {
    data.iter().fold(0u8, |a, &b| a.wrapping_add(b))
}

/// Undoes `}` escapes and `*` run-length encoding of a received packet body.
pub fn decode_body(raw: &[u8]) -> Result<Vec<u8>, AttachError> {
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while let Some(&b) = raw.get(i) {
        match b {
            b'}' => {
                let n = raw
                    .get(i + 1)
                    .ok_or_else(|| proto("escape at end of packet"))?;
                out.push(n ^ 0x20);
                i += 2;
            }
            b'*' => {
                let prev = *out
                    .last()
                    .ok_or_else(|| proto("run-length with nothing to repeat"))?;
                let n = raw
                    .get(i + 1)
                    .ok_or_else(|| proto("run-length at end of packet"))?;
                let count = usize::from(n.checked_sub(29).ok_or_else(|| proto("bad run length"))?);
                if out.len().saturating_add(count) > MAX_PACKET {
                    return Err(proto("packet too large after run-length decoding"));
                }
                out.extend(std::iter::repeat_n(prev, count));
                i += 2;
            }
            _ => {
                out.push(b);
                i += 1;
            }
        }
    }
    Ok(out)
}

fn proto(msg: &str) -> AttachError {
    AttachError::Protocol(msg.to_string())
}

/// A connection to a gdbstub.
pub struct GdbClient {
    stream: UnixStream,
    rbuf: VecDeque<u8>,
    no_ack: bool,
    /// Stop replies that arrived while waiting for something else.
    stops: VecDeque<StopReply>,
    /// Console output (`O` packets) seen, bounded.
    console: Vec<u8>,
    /// A pipelined batch failed with replies still outstanding: later replies could be taken
    /// for the wrong command, so every later command fails.
    desync: bool,
}

impl std::fmt::Debug for GdbClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GdbClient").finish_non_exhaustive()
    }
}

impl GdbClient {
    /// Connects to the gdbstub listening on `path`.
    pub fn connect(path: &Path) -> Result<GdbClient, AttachError> {
        let stream = UnixStream::connect(path).map_err(|e| AttachError::Connect {
            path: path.to_path_buf(),
            source: e,
        })?;
        Ok(Self::from_stream(stream))
    }

    /// A client over an already connected stream.
    pub fn from_stream(stream: UnixStream) -> GdbClient {
        GdbClient {
            stream,
            rbuf: VecDeque::new(),
            no_ack: false,
            stops: VecDeque::new(),
            console: Vec::new(),
            desync: false,
        }
    }

    /// Reads more bytes into the buffer, waiting until `deadline`.
    fn fill(&mut self, deadline: Instant) -> Result<(), AttachError> {
        let now = Instant::now();
        if now >= deadline {
            return Err(AttachError::Timeout);
        }
        let wait = (deadline - now).max(Duration::from_millis(1));
        self.stream
            .set_read_timeout(Some(wait))
            .map_err(AttachError::Io)?;
        let mut buf = [0u8; 8192];
        match self.stream.read(&mut buf) {
            Ok(0) => Err(AttachError::Closed),
            Ok(n) => {
                self.rbuf.extend(&buf[..n]);
                Ok(())
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                Err(AttachError::Timeout)
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => Ok(()),
            Err(e) if is_gone(&e) => Err(AttachError::Closed),
            Err(e) => Err(AttachError::Io(e)),
        }
    }

    fn write_raw(&mut self, data: &[u8]) -> Result<(), AttachError> {
        self.stream
            .set_write_timeout(Some(Duration::from_secs(10)))
            .map_err(AttachError::Io)?;
        self.stream.write_all(data).map_err(|e| {
            if is_gone(&e) {
                AttachError::Closed
            } else {
                AttachError::Io(e)
            }
        })
    }

    /// Sends the interrupt byte (stops a running target).
    pub fn send_interrupt(&mut self) -> Result<(), AttachError> {
        self.write_raw(&[0x03])
    }

    /// Sends a packet (payload must not need escaping: hex or plain ASCII commands).
    pub fn send(&mut self, payload: &[u8], deadline: Instant) -> Result<(), AttachError> {
        if self.desync {
            return Err(proto(
                "the gdbstub's replies to a pipelined batch were lost (timeout); reconnect",
            ));
        }
        if payload
            .iter()
            .any(|b| matches!(b, b'$' | b'#' | b'}' | b'*'))
        {
            return Err(proto("packet payload needs escaping"));
        }
        let mut pkt = Vec::with_capacity(payload.len() + 4);
        pkt.push(b'$');
        pkt.extend_from_slice(payload);
        pkt.extend_from_slice(format!("#{:02x}", checksum(payload)).as_bytes());
        for _ in 0..5 {
            self.write_raw(&pkt)?;
            if self.no_ack {
                return Ok(());
            }
            // Wait for the ack; a packet before it (a stop reply) is kept for later.
            loop {
                match self.rbuf.front().copied() {
                    None => self.fill(deadline)?,
                    Some(b'+') => {
                        self.rbuf.pop_front();
                        return Ok(());
                    }
                    Some(b'-') => {
                        self.rbuf.pop_front();
                        break;
                    }
                    Some(b'$') => match self.take_packet()? {
                        Some(body) => self.stash(body),
                        None => self.fill(deadline)?,
                    },
                    Some(_) => {
                        self.rbuf.pop_front();
                    }
                }
            }
        }
        Err(proto("stub keeps rejecting our packet"))
    }

    /// Takes the first complete packet (`$...#xx` or a `%` notification) out of the receive
    /// buffer, dropping noise before it; acks it; returns its decoded body. `Ok(None)` when
    /// no complete packet has arrived yet (nothing of a partial packet is consumed, so a
    /// timeout never loses bytes).
    fn take_packet(&mut self) -> Result<Option<Vec<u8>>, AttachError> {
        loop {
            let buf = self.rbuf.make_contiguous();
            let Some(start) = buf.iter().position(|&b| b == b'$' || b == b'%') else {
                self.rbuf.clear();
                return Ok(None);
            };
            let Some(hash) = buf[start..]
                .iter()
                .position(|&b| b == b'#')
                .map(|h| start + h)
            else {
                if buf.len() - start > MAX_PACKET {
                    return Err(proto("packet too large"));
                }
                return Ok(None);
            };
            let Some(cs) = buf.get(hash + 1..hash + 3) else {
                return Ok(None);
            };
            let want = hex_decode(cs).and_then(|v| v.first().copied());
            let raw = buf[start + 1..hash].to_vec();
            let notification = buf[start] == b'%';
            self.rbuf.drain(..hash + 3);
            if want != Some(checksum(&raw)) {
                if !self.no_ack && !notification {
                    self.write_raw(b"-")?;
                }
                continue;
            }
            if notification {
                // Non-stop notifications: not used in all-stop mode.
                continue;
            }
            if !self.no_ack {
                self.write_raw(b"+")?;
            }
            return decode_body(&raw).map(Some);
        }
    }

    /// Keeps an unsolicited packet: stop replies are queued, console output kept.
    fn stash(&mut self, body: Vec<u8>) {
        if let Some(stop) = StopReply::parse(&body) {
            if self.stops.len() < MAX_QUEUED_STOPS {
                self.stops.push_back(stop);
            }
        } else if let Some(hex) = body.strip_prefix(b"O") {
            if let Some(text) = hex_decode(hex) {
                if self.console.len() < 64 * 1024 {
                    self.console.extend_from_slice(&text);
                }
            }
        }
    }

    /// Receives the next packet, skipping acks, noise and `O` console packets.
    pub fn recv(&mut self, deadline: Instant) -> Result<Vec<u8>, AttachError> {
        loop {
            let Some(body) = self.take_packet()? else {
                self.fill(deadline)?;
                continue;
            };
            if body.first() == Some(&b'O') && body.as_slice() != b"OK" && body.len() % 2 == 1 {
                self.stash(body);
                continue;
            }
            return Ok(body);
        }
    }

    /// Sends a command and returns its reply. Stop replies arriving meanwhile (they start
    /// with T/S/W/X) are queued for [`GdbClient::wait_stop`], except as the reply to `?`.
    pub fn command(&mut self, payload: &str, timeout: Duration) -> Result<Vec<u8>, AttachError> {
        let deadline = Instant::now() + timeout;
        self.send(payload.as_bytes(), deadline)?;
        for _ in 0..MAX_QUEUED_STOPS * 2 {
            let reply = self.recv(deadline)?;
            if StopReply::parse(&reply).is_some() && payload != "?" {
                self.stash(reply);
                continue;
            }
            return Ok(reply);
        }
        Err(proto("too many unsolicited stop replies"))
    }

    /// Sends several commands and returns their replies, in order. Without acks (the usual
    /// case with QEMU) they are pipelined: all packets go out before the first reply is read,
    /// so the batch costs about one round trip. With acks, one after the other.
    pub fn commands(
        &mut self,
        payloads: &[String],
        timeout: Duration,
    ) -> Result<Vec<Vec<u8>>, AttachError> {
        if !self.no_ack {
            return payloads.iter().map(|p| self.command(p, timeout)).collect();
        }
        let deadline = Instant::now() + timeout;
        for p in payloads {
            self.send(p.as_bytes(), deadline)?;
        }
        let mut replies = Vec::with_capacity(payloads.len());
        let mut stops = 0;
        while replies.len() < payloads.len() {
            let reply = match self.recv(deadline) {
                Ok(r) => r,
                Err(e) => {
                    self.desync = true;
                    return Err(e);
                }
            };
            if StopReply::parse(&reply).is_some() && payloads[replies.len()] != "?" {
                stops += 1;
                if stops > MAX_QUEUED_STOPS * 2 {
                    return Err(proto("too many unsolicited stop replies"));
                }
                self.stash(reply);
                continue;
            }
            replies.push(reply);
        }
        Ok(replies)
    }

    /// Like [`GdbClient::command`] but an `E..` reply is an error.
    pub fn command_ok(&mut self, payload: &str, timeout: Duration) -> Result<Vec<u8>, AttachError> {
        let r = self.command(payload, timeout)?;
        if r.first() == Some(&b'E') && r.len() == 3 {
            return Err(AttachError::Stub {
                command: payload.chars().take(40).collect(),
                reply: String::from_utf8_lossy(&r).into_owned(),
            });
        }
        Ok(r)
    }

    /// Waits for a stop reply until `deadline` (`Ok(None)` on timeout).
    pub fn wait_stop(&mut self, deadline: Instant) -> Result<Option<StopReply>, AttachError> {
        if let Some(s) = self.stops.pop_front() {
            return Ok(Some(s));
        }
        loop {
            match self.recv(deadline) {
                Ok(body) => {
                    if let Some(s) = StopReply::parse(&body) {
                        return Ok(Some(s));
                    }
                    // Anything else while running is noise; ignore it.
                }
                Err(AttachError::Timeout) => return Ok(None),
                Err(e) => return Err(e),
            }
        }
    }

    /// Drops queued stop replies.
    pub fn clear_stops(&mut self) {
        self.stops.clear();
    }

    /// Switches off acks if the stub supports it.
    pub fn start_no_ack(&mut self, timeout: Duration) -> Result<(), AttachError> {
        if self.command("QStartNoAckMode", timeout)?.as_slice() == b"OK" {
            self.no_ack = true;
        }
        Ok(())
    }

    /// Reads a whole `qXfer` object (`qXfer:<object>:read:<annex>:`).
    pub fn xfer_read(
        &mut self,
        object: &str,
        annex: &str,
        timeout: Duration,
    ) -> Result<Vec<u8>, AttachError> {
        let mut out = Vec::new();
        for _ in 0..256 {
            let r = self.command_ok(
                &format!("qXfer:{object}:read:{annex}:{:x},{:x}", out.len(), 0x800),
                timeout,
            )?;
            let (&kind, data) = r.split_first().ok_or_else(|| proto("empty qXfer reply"))?;
            if out.len() + data.len() > MAX_PACKET {
                return Err(proto("qXfer object too large"));
            }
            out.extend_from_slice(data);
            match kind {
                b'l' => return Ok(out),
                b'm' if !data.is_empty() => {}
                _ => return Err(proto("bad qXfer reply")),
            }
        }
        Err(proto("qXfer object too large"))
    }
}

fn is_gone(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        ErrorKind::BrokenPipe
            | ErrorKind::ConnectionReset
            | ErrorKind::ConnectionAborted
            | ErrorKind::UnexpectedEof
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_rle_and_escapes() {
        assert_eq!(decode_body(b"0* ").unwrap(), b"0000");
        assert_eq!(decode_body(b"a}\x03b").unwrap(), b"a#b");
        assert!(decode_body(b"*a").is_err());
        assert!(decode_body(b"a}").is_err());
        assert!(decode_body(b"a*\x10").is_err());
    }

    #[test]
    fn stop_replies() {
        assert_eq!(
            StopReply::parse(b"T05thread:02;"),
            Some(StopReply::Signal {
                signal: 5,
                thread: Some(2)
            })
        );
        assert_eq!(
            StopReply::parse(b"T02thread:p1.1;"),
            Some(StopReply::Signal {
                signal: 2,
                thread: Some(1)
            })
        );
        assert_eq!(
            StopReply::parse(b"S05"),
            Some(StopReply::Signal {
                signal: 5,
                thread: None
            })
        );
        assert_eq!(StopReply::parse(b"W00"), Some(StopReply::Exited(0)));
        assert_eq!(StopReply::parse(b"T"), None);
        assert_eq!(StopReply::parse(b"OK"), None);
        assert_eq!(parse_thread_id(b"p1.ffffffffffffffffff"), None);
    }

    #[test]
    fn hex() {
        assert_eq!(hex_encode(&[0, 0xab]), "00ab");
        assert_eq!(hex_decode(b"00ab"), Some(vec![0, 0xab]));
        assert_eq!(hex_decode(b"0"), None);
        assert_eq!(hex_decode(b"zz"), None);
    }

    fn framed(body: &str) -> Vec<u8> {
        format!("${body}#{:02x}", checksum(body.as_bytes())).into_bytes()
    }

    fn pair() -> (GdbClient, UnixStream) {
        let (a, b) = UnixStream::pair().unwrap();
        let mut c = GdbClient::from_stream(a);
        c.no_ack = true;
        (c, b)
    }

    fn soon(ms: u64) -> Instant {
        Instant::now() + Duration::from_millis(ms)
    }

    #[test]
    fn timeout_mid_packet_loses_nothing() {
        let (mut c, mut stub) = pair();
        let p = framed("T05thread:02;");
        stub.write_all(&p[..6]).unwrap();
        assert!(matches!(c.recv(soon(50)), Err(AttachError::Timeout)));
        stub.write_all(&p[6..]).unwrap();
        assert_eq!(c.recv(soon(1000)).unwrap(), b"T05thread:02;");
    }

    #[test]
    fn skips_noise_bad_checksums_and_console_output() {
        let (mut c, mut stub) = pair();
        let mut data = b"+++garbage".to_vec();
        data.extend_from_slice(b"$OK#00"); // bad checksum
        data.extend_from_slice(&framed("O6869")); // console "hi"
        data.extend_from_slice(&framed("%Stop:T05")); // not `$`: still framed as `$` here
        data.extend_from_slice(&framed("0*\\"));
        stub.write_all(&data).unwrap();
        assert_eq!(c.recv(soon(1000)).unwrap(), b"%Stop:T05");
        assert_eq!(c.recv(soon(1000)).unwrap(), vec![b'0'; 64]);
        assert_eq!(c.console, b"hi");
    }

    #[test]
    fn stop_reply_during_command_is_queued() {
        let (mut c, mut stub) = pair();
        let mut data = framed("T05thread:01;");
        data.extend_from_slice(&framed("OK"));
        stub.write_all(&data).unwrap();
        assert_eq!(
            c.command("Z1,1000,1", Duration::from_secs(1)).unwrap(),
            b"OK"
        );
        assert_eq!(
            c.wait_stop(soon(10)).unwrap(),
            Some(StopReply::Signal {
                signal: 5,
                thread: Some(1)
            })
        );
        assert_eq!(c.wait_stop(soon(10)).unwrap(), None);
        let mut sent = vec![0u8; 64];
        let n = stub.read(&mut sent).unwrap();
        assert_eq!(&sent[..n], framed("Z1,1000,1").as_slice());
    }

    #[test]
    fn pipelined_commands_go_out_before_the_first_reply() {
        let (mut c, mut stub) = pair();
        // The stub answers only after it has seen all three packets.
        let t = std::thread::spawn(move || {
            let want: Vec<u8> = [framed("Hg1"), framed("g"), framed("Hg2")].concat();
            let mut got = Vec::new();
            let mut buf = [0u8; 64];
            while got.len() < want.len() {
                let n = stub.read(&mut buf).unwrap();
                got.extend_from_slice(&buf[..n]);
            }
            assert_eq!(got, want);
            let mut out = framed("OK");
            out.extend_from_slice(&framed("T05thread:01;"));
            out.extend_from_slice(&framed("00ff"));
            out.extend_from_slice(&framed("E01"));
            stub.write_all(&out).unwrap();
        });
        let cmds = ["Hg1", "g", "Hg2"].map(String::from);
        let r = c.commands(&cmds, Duration::from_secs(2)).unwrap();
        assert_eq!(r, vec![b"OK".to_vec(), b"00ff".to_vec(), b"E01".to_vec()]);
        // The stop reply that came in between is kept for wait_stop.
        assert!(c.wait_stop(soon(10)).unwrap().is_some());
        t.join().unwrap();
    }

    #[test]
    fn a_batch_that_loses_its_replies_fails_every_later_command() {
        let (mut c, mut stub) = pair();
        stub.write_all(&framed("OK")).unwrap();
        let cmds = ["Hg1", "g"].map(String::from);
        assert!(matches!(
            c.commands(&cmds, Duration::from_millis(100)),
            Err(AttachError::Timeout)
        ));
        // The late `g` reply must never be taken for the next command's.
        stub.write_all(&framed("00ff")).unwrap();
        assert!(matches!(
            c.command("?", Duration::from_millis(100)),
            Err(AttachError::Protocol(_))
        ));
    }

    #[test]
    fn errors_not_panics() {
        let (mut c, mut stub) = pair();
        stub.write_all(&framed("E14")).unwrap();
        assert!(matches!(
            c.command_ok("m0,4", Duration::from_secs(1)),
            Err(AttachError::Stub { .. })
        ));
        // An endless packet is refused once it exceeds the bound.
        let big = vec![b'a'; MAX_PACKET + 16];
        let mut w = stub.try_clone().unwrap();
        let t = std::thread::spawn(move || {
            let mut d = b"$".to_vec();
            d.extend_from_slice(&big);
            let _ = w.write_all(&d);
        });
        let mut r = c.recv(soon(5000));
        while matches!(r, Err(AttachError::Timeout)) {
            r = c.recv(soon(5000));
        }
        assert!(matches!(r, Err(AttachError::Protocol(_))), "{r:?}");
        drop(stub);
        drop(c);
        t.join().unwrap();
    }

    #[test]
    fn closed_connection() {
        let (mut c, stub) = pair();
        drop(stub);
        assert!(matches!(c.recv(soon(1000)), Err(AttachError::Closed)));
        assert!(matches!(c.send_interrupt(), Err(AttachError::Closed)));
    }
}
