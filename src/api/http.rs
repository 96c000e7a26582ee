//! Just enough HTTP/1.1 (RFC 9112) over a Unix socket for Firecracker's API clients: `curl
//! --unix-socket`, the Go SDK, firecracker-containerd, Kata's FC driver. Hand-written instead of
//! a crate: hyper or tiny_http would bring an async runtime or a thread pool and several hundred
//! KiB of code into a binary whose start-up time and size are measured (README, "Boot speed"),
//! for a protocol subset of a few dozen lines (Firecracker likewise has its own `micro_http`).
//!
//! What it does: one thread, `poll(2)` over the listener and up to [`MAX_CONNECTIONS`] clients
//! (the Go SDK keeps idle keep-alive connections and opens new ones); requests with a
//! Content-Length body; keep-alive unless the client says `Connection: close` or speaks HTTP/1.0.
//! What it refuses, with a 4xx and by closing that connection: a request head over
//! [`MAX_HEAD_BYTES`] or a body over [`MAX_BODY_BYTES`] (413), chunked bodies (411), anything that
//! does not parse (400), a client that takes more than [`REQUEST_TIMEOUT`] to send one request
//! (408). One bad client never stops the server or the VM.

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::{Duration, Instant};

/// Largest request line plus headers.
pub const MAX_HEAD_BYTES: usize = 16 << 10;
/// Largest request body (Firecracker's API bodies are well under 4 KiB).
pub const MAX_BODY_BYTES: usize = 64 << 10;
/// How long a client may take to send one whole request once it has begun.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How many clients are served at once; a new one beyond this closes the longest idle.
pub const MAX_CONNECTIONS: usize = 16;

/// One parsed request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// GET, PUT, PATCH, ...
    pub method: String,
    /// The path, without a query string.
    pub path: String,
    /// The body (empty without Content-Length).
    pub body: Vec<u8>,
    /// The client asked to close the connection after this request.
    pub close: bool,
}

/// A response: status, and a JSON body or none.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// The status code.
    pub status: u16,
    /// A JSON body (None: no body, as for 204).
    pub body: Option<String>,
}

impl Response {
    /// 204 No Content: what Firecracker answers to a successful PUT or PATCH.
    pub fn no_content() -> Response {
        Response { status: 204, body: None }
    }

    /// 200 with a JSON body.
    pub fn json(body: String) -> Response {
        Response { status: 200, body: Some(body) }
    }

    /// A 4xx with Firecracker's error body, `{"fault_message": "..."}`.
    pub fn fault(status: u16, message: &str) -> Response {
        Response { status, body: Some(serde_json::json!({ "fault_message": message }).to_string()) }
    }

    fn reason(&self) -> &'static str {
        match self.status {
            200 => "OK",
            204 => "No Content",
            400 => "Bad Request",
            404 => "Not Found",
            405 => "Method Not Allowed",
            408 => "Request Timeout",
            411 => "Length Required",
            413 => "Payload Too Large",
            500 => "Internal Server Error",
            _ => "Unknown",
        }
    }

    /// The bytes on the wire.
    pub fn to_bytes(&self, close: bool) -> Vec<u8> {
        let mut head = format!("HTTP/1.1 {} {}\r\nServer: ember\r\n", self.status, self.reason());
        if close {
            head += "Connection: close\r\n";
        }
        match &self.body {
            Some(b) => {
                head += &format!("Content-Type: application/json\r\nContent-Length: {}\r\n\r\n", b.len());
                head += b;
            }
            None if self.status == 204 => head += "\r\n",
            None => head += "Content-Length: 0\r\n\r\n",
        }
        head.into_bytes()
    }
}

/// What [`parse`] found at the start of a buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    /// Not a whole request yet.
    Incomplete,
    /// A request, and how many bytes of the buffer it took.
    Request(Request, usize),
    /// A request that will never be served: answer this and close.
    Error(Response),
}

/// Parses the request at the start of `buf` (pure: the fuzz and unit tests drive it).
pub fn parse(buf: &[u8]) -> Parsed {
    let Some(head_end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        return if buf.len() > MAX_HEAD_BYTES {
            Parsed::Error(Response::fault(413, "the request head is too large"))
        } else {
            Parsed::Incomplete
        };
    };
    if head_end > MAX_HEAD_BYTES {
        return Parsed::Error(Response::fault(413, "the request head is too large"));
    }
    let bad = |why: &str| Parsed::Error(Response::fault(400, why));
    let Ok(head) = std::str::from_utf8(&buf[..head_end]) else { return bad("the request head is not UTF-8") };
    let mut lines = head.split("\r\n");
    let request_line = lines.next().unwrap_or_default();
    let mut parts = request_line.split(' ');
    let (Some(method), Some(target), Some(version), None) = (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return bad("malformed request line");
    };
    let http10 = match version {
        "HTTP/1.1" => false,
        "HTTP/1.0" => true,
        _ => return bad("only HTTP/1.0 and HTTP/1.1 are spoken here"),
    };
    if method.is_empty() || !method.bytes().all(|b| b.is_ascii_uppercase()) || !target.starts_with('/') {
        return bad("malformed request line");
    }
    let path = target.split('?').next().unwrap_or(target).to_string();
    let mut length: Option<usize> = None;
    let mut close = http10;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else { return bad("malformed header line") };
        let value = value.trim();
        match name.to_ascii_lowercase().as_str() {
            "content-length" => match value.parse::<usize>() {
                Ok(n) if length.is_none_or(|l| l == n) => length = Some(n),
                _ => return bad("bad Content-Length"),
            },
            "transfer-encoding" => {
                return Parsed::Error(Response::fault(411, "chunked bodies are not accepted: send Content-Length"));
            }
            "connection" => {
                let v = value.to_ascii_lowercase();
                close = v.contains("close") || (http10 && !v.contains("keep-alive"));
            }
            _ => {}
        }
    }
    let length = length.unwrap_or(0);
    if length > MAX_BODY_BYTES {
        return Parsed::Error(Response::fault(413, "the request body is too large"));
    }
    let body_start = head_end + 4;
    if buf.len() < body_start + length {
        return Parsed::Incomplete;
    }
    let body = buf[body_start..body_start + length].to_vec();
    Parsed::Request(Request { method: method.to_string(), path, body, close }, body_start + length)
}

struct Conn {
    stream: UnixStream,
    buf: Vec<u8>,
    /// When the request now being received began (None: idle).
    started: Option<Instant>,
    last_active: Instant,
}

/// The server: the listener and its clients.
pub struct Server {
    listener: UnixListener,
    conns: Vec<Conn>,
}

impl Server {
    /// Serves `listener`.
    pub fn new(listener: UnixListener) -> std::io::Result<Server> {
        listener.set_nonblocking(true)?;
        Ok(Server { listener, conns: Vec::new() })
    }

    /// Waits for the next whole request and answers it with `handle`. Never fails for a
    /// client's sake; an Err is the listener itself failing.
    pub fn serve_one(&mut self, handle: &mut dyn FnMut(&Request) -> Response) -> std::io::Result<()> {
        loop {
            // A request already buffered (pipelined) comes first.
            for i in 0..self.conns.len() {
                if let Some(done) = self.try_serve(i, handle) {
                    if done {
                        self.conns.remove(i);
                    }
                    return Ok(());
                }
            }
            self.wait_and_read()?;
        }
    }

    /// Serves connection `i` if it holds a whole request (or a bad one): Some(close it).
    fn try_serve(&mut self, i: usize, handle: &mut dyn FnMut(&Request) -> Response) -> Option<bool> {
        let c = &mut self.conns[i];
        match parse(&c.buf) {
            Parsed::Incomplete => None,
            Parsed::Error(resp) => {
                let _ = c.stream.write_all(&resp.to_bytes(true));
                Some(true)
            }
            Parsed::Request(req, used) => {
                c.buf.drain(..used);
                c.started = (!c.buf.is_empty()).then(Instant::now);
                let resp = handle(&req);
                let ok = c.stream.write_all(&resp.to_bytes(req.close)).is_ok();
                Some(req.close || !ok)
            }
        }
    }

    /// One poll over the listener and the clients: accepts, reads, times out.
    fn wait_and_read(&mut self) -> std::io::Result<()> {
        let mut fds = vec![libc::pollfd { fd: self.listener.as_raw_fd(), events: libc::POLLIN, revents: 0 }];
        fds.extend(self.conns.iter().map(|c| libc::pollfd {
            fd: c.stream.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }));
        let timeout_ms = if self.conns.iter().any(|c| c.started.is_some()) { 100 } else { -1 };
        // SAFETY: `fds` is a live array of `fds.len()` pollfd structures.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            return if e.kind() == std::io::ErrorKind::Interrupted { Ok(()) } else { Err(e) };
        }
        let mut gone = Vec::new();
        for (i, c) in self.conns.iter_mut().enumerate() {
            let revents = fds[i + 1].revents;
            if revents != 0 {
                let mut chunk = [0u8; 4096];
                match c.stream.read(&mut chunk) {
                    Ok(0) => gone.push(i),
                    Ok(k) => {
                        c.started.get_or_insert_with(Instant::now);
                        c.last_active = Instant::now();
                        c.buf.extend_from_slice(&chunk[..k]);
                        // Bounded: past the limits parse() answers 413 and the connection closes.
                        if c.buf.len() > MAX_HEAD_BYTES + MAX_BODY_BYTES + 4 {
                            c.buf.truncate(MAX_HEAD_BYTES + MAX_BODY_BYTES + 4);
                        }
                    }
                    Err(e)
                        if e.kind() == std::io::ErrorKind::WouldBlock
                            || e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(_) => gone.push(i),
                }
            }
            if !gone.contains(&i)
                && let Some(t) = c.started
                && t.elapsed() > REQUEST_TIMEOUT
                && matches!(parse(&c.buf), Parsed::Incomplete)
            {
                let _ = c.stream.write_all(&Response::fault(408, "the request was not sent in time").to_bytes(true));
                gone.push(i);
            }
        }
        for i in gone.into_iter().rev() {
            self.conns.remove(i);
        }
        if fds[0].revents != 0 {
            self.accept();
        }
        Ok(())
    }

    fn accept(&mut self) {
        while let Ok((stream, _)) = self.listener.accept() {
            // Non-blocking reads (poll says when); writes block, but at most this long.
            if stream.set_nonblocking(true).is_err() {
                continue;
            }
            let _ = stream.set_write_timeout(Some(REQUEST_TIMEOUT));
            if self.conns.len() >= MAX_CONNECTIONS
                && let Some(idle) = self.conns.iter().enumerate().min_by_key(|(_, c)| c.last_active).map(|(i, _)| i)
            {
                self.conns.remove(idle);
            }
            self.conns.push(Conn { stream, buf: Vec::new(), started: None, last_active: Instant::now() });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(s: &str) -> Parsed {
        parse(s.as_bytes())
    }

    #[test]
    fn curl_requests_parse() {
        let r = "PUT /machine-config HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
                 Content-Length: 2\r\n\r\n{}GET / HTTP/1.1\r\n\r\n";
        let Parsed::Request(first, used) = req(r) else { panic!() };
        assert_eq!(
            (first.method.as_str(), first.path.as_str(), &first.body[..], first.close),
            ("PUT", "/machine-config", &b"{}"[..], false)
        );
        let Parsed::Request(second, _) = parse(&r.as_bytes()[used..]) else { panic!() };
        assert_eq!(second.path, "/");
        let Parsed::Request(q, _) = req("GET /vm/config?x=1 HTTP/1.0\r\n\r\n") else { panic!() };
        assert_eq!((q.path.as_str(), q.close), ("/vm/config", true));
    }

    #[test]
    fn partial_requests_wait_and_bad_ones_are_answered() {
        assert_eq!(req("PUT / HTTP/1.1\r\nContent-Length: 10\r\n\r\n{}"), Parsed::Incomplete);
        assert_eq!(req("PUT / HTTP/1.1\r\nHost"), Parsed::Incomplete);
        let status = |s: &str| match req(s) {
            Parsed::Error(r) => r.status,
            other => panic!("{other:?}"),
        };
        assert_eq!(status("GARBAGE\r\n\r\n"), 400);
        assert_eq!(status("get / HTTP/1.1\r\n\r\n"), 400);
        assert_eq!(status("GET / HTTP/2\r\n\r\n"), 400);
        assert_eq!(status("GET / HTTP/1.1\r\nContent-Length: -1\r\n\r\n"), 400);
        assert_eq!(status("GET / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"), 400);
        assert_eq!(status("GET / HTTP/1.1\r\nno colon\r\n\r\n"), 400);
        assert_eq!(status("PUT / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"), 411);
        assert_eq!(status("PUT / HTTP/1.1\r\nContent-Length: 999999999\r\n\r\n"), 413);
        assert_eq!(status(&format!("GET /{} HTTP/1.1", "a".repeat(MAX_HEAD_BYTES + 1))), 413);
    }

    #[test]
    fn responses_look_like_firecrackers() {
        let r = String::from_utf8(Response::fault(400, "bad \"thing\"").to_bytes(false)).unwrap();
        assert!(r.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{r}");
        assert!(r.ends_with("{\"fault_message\":\"bad \\\"thing\\\"\"}"), "{r}");
        let r = String::from_utf8(Response::no_content().to_bytes(false)).unwrap();
        assert!(r.starts_with("HTTP/1.1 204 No Content\r\n") && r.ends_with("\r\n\r\n") && !r.contains("Length"));
    }
}
