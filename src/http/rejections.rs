//! hyper's own answers to requests it cannot parse, in JSON like every other error (SPEC
//! §10): hyper answers a malformed request line or header with `400`, and a request head over
//! `HEAD_MAX` or with over 100 headers with `431`, each with an empty body, before the router
//! sees a request. No hook changes them, so the connection's writer replaces them on their
//! way out: each is a response head of its own, written in one piece just before hyper closes
//! the connection.
//!
//! Only as a connection's first bytes, and only before any request reached the router: later
//! writes carry our own responses, whose bodies are a client's bytes (a file that reads like a
//! rejection, downloaded after its head was sent, was rewritten, and the extra bytes read as
//! the next response on that connection), and a routed request's answer may be a push
//! workspace's own empty 400, relayed with its length. A malformed request after others on one
//! connection keeps hyper's empty body.
//!
//! A HEAD's rejection gets the fields a GET's would and no body (RFC 9110 §9.3.2): its client
//! reads no body after it, and would take one for the next answer.

use std::{
    io::{self, IoSlice},
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use axum::http::StatusCode;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::{error::ApiError, shed::Connection};

/// A connection's stream whose writes of hyper's empty rejections go out with a JSON body.
pub struct JsonRejections<S> {
    inner: S,
    /// The replacement of a rejection hyper believes written, and how much of it went.
    pending: Option<(Vec<u8>, usize)>,
    /// Bytes went out as written: no later write is a rejection's.
    started: bool,
    /// The connection's first bytes read (its first request's method), up to `HEAD `.
    first: [u8; 5],
    first_len: usize,
    /// The connection, which knows whether a request of it reached the router: the answer of
    /// one is never hyper's rejection (a push workspace's empty 400 is relayed as it came).
    connection: Arc<Connection>,
}

impl<S> JsonRejections<S> {
    pub fn new(inner: S, connection: Arc<Connection>) -> Self {
        JsonRejections {
            inner,
            pending: None,
            started: false,
            first: [0; 5],
            first_len: 0,
            connection,
        }
    }

    /// The connection's first request, the one a rejection answers, is a HEAD.
    fn answers_head(&self) -> bool {
        self.first[..self.first_len] == *b"HEAD "
    }
}

/// The error of each status hyper answers on its own: a framework rejection, as the
/// router's are ([`ApiError::Rejected`]).
fn rejection(status: &str) -> Option<ApiError> {
    let (status, message) = match status {
        "400" => (StatusCode::BAD_REQUEST, "malformed HTTP request"),
        "431" => (
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "request header fields too large",
        ),
        _ => return None,
    };
    let message = message.to_string();
    Some(ApiError::Rejected { status, message })
}

/// `head` with a JSON body, when it is one of hyper's empty rejections: `HTTP/1.1 <status>`
/// with `Content-Length: 0`, a head alone. For a HEAD request, the body's fields without it.
fn with_json_body(head: &[u8], for_head: bool) -> Option<Vec<u8>> {
    let head = std::str::from_utf8(head).ok()?;
    let (start, rest) = head.split_once("\r\n")?;
    let error = rejection(start.strip_prefix("HTTP/1.1 ")?.get(..3)?)?;
    let fields = rest.strip_suffix("\r\n\r\n")?;
    if fields.contains("\r\n\r\n") {
        return None;
    }
    let fields: Vec<&str> = fields.split("\r\n").collect();
    if !fields
        .iter()
        .any(|f| f.eq_ignore_ascii_case("content-length: 0"))
    {
        return None;
    }
    let body = serde_json::to_string(&error.body()).ok()?;
    let mut out =
        format!("{start}\r\nContent-Type: application/json\r\nX-Content-Type-Options: nosniff\r\n");
    for field in fields
        .iter()
        .filter(|f| !f.to_ascii_lowercase().starts_with("content-length:"))
    {
        out.push_str(field);
        out.push_str("\r\n");
    }
    out.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
    if !for_head {
        out.push_str(&body);
    }
    Some(out.into_bytes())
}

/// Bytes a write would send, when they may be a rejection (small, starting as one does).
fn rejection_candidate(bufs: &[IoSlice<'_>]) -> Option<Vec<u8>> {
    let first = bufs.iter().find(|b| !b.is_empty())?;
    let total: usize = bufs.iter().map(|b| b.len()).sum();
    if !first.starts_with(b"HTTP/1.1 4") || total > 1024 {
        return None;
    }
    Some(bufs.iter().flat_map(|b| b.iter().copied()).collect())
}

impl<S: AsyncWrite + Unpin> JsonRejections<S> {
    /// Sends what is left of a replacement; ready once it is all out.
    fn poll_pending(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while let Some((bytes, sent)) = &mut self.pending {
            if *sent == bytes.len() {
                self.pending = None;
                break;
            }
            let n = std::task::ready!(Pin::new(&mut self.inner).poll_write(cx, &bytes[*sent..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            *sent += n;
        }
        Poll::Ready(Ok(()))
    }

    fn poll_write_slices(
        &mut self,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        std::task::ready!(self.poll_pending(cx))?;
        if !self.started && !self.connection.served() {
            let for_head = self.answers_head();
            if let Some(replaced) =
                rejection_candidate(bufs).and_then(|b| with_json_body(&b, for_head))
            {
                let len = bufs.iter().map(|b| b.len()).sum();
                self.pending = Some((replaced, 0));
                self.started = true;
                // Taken whole: the replacement answers it, sent from here on.
                let _ = self.poll_pending(cx)?;
                return Poll::Ready(Ok(len));
            }
        }
        let written = std::task::ready!(Pin::new(&mut self.inner).poll_write_vectored(cx, bufs))?;
        self.started |= written > 0;
        Poll::Ready(Ok(written))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for JsonRejections<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().poll_write_slices(cx, &[IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().poll_write_slices(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        std::task::ready!(this.poll_pending(cx))?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        std::task::ready!(this.poll_pending(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for JsonRejections<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        std::task::ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
        let mut read = &buf.filled()[before..];
        if this.first_len == 0 {
            // The parser skips empty lines before a request line (RFC 9112 §2.2), so does this.
            let blank = read
                .iter()
                .take_while(|b| matches!(b, b'\r' | b'\n'))
                .count();
            read = &read[blank..];
        }
        let take = read.len().min(this.first.len() - this.first_len);
        this.first[this.first_len..this.first_len + take].copy_from_slice(&read[..take]);
        this.first_len += take;
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const HYPER_431: &str = "HTTP/1.1 431 Request Header Fields Too Large\r\nConnection: close\r\nContent-Length: 0\r\nDate: Sat, 05 Dec 2026 23:47:16 GMT\r\n\r\n";

    #[test]
    fn an_empty_rejection_gets_its_json_body() {
        let out = String::from_utf8(with_json_body(HYPER_431.as_bytes(), false).unwrap()).unwrap();
        let body = r#"{"error":"request header fields too large"}"#;
        assert_eq!(
            out,
            format!(
                "HTTP/1.1 431 Request Header Fields Too Large\r\nContent-Type: application/json\r\n\
                 X-Content-Type-Options: nosniff\r\nConnection: close\r\n\
                 Date: Sat, 05 Dec 2026 23:47:16 GMT\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )
        );
        let head = String::from_utf8(with_json_body(HYPER_431.as_bytes(), true).unwrap()).unwrap();
        assert_eq!(head, out.strip_suffix(body).unwrap(), "a HEAD's: no body");
    }

    #[test]
    fn other_responses_pass_as_written() {
        let ours = "HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\nContent-Length: 17\r\n\r\n";
        assert!(
            with_json_body(ours.as_bytes(), false).is_none(),
            "a body follows"
        );
        let ok = "HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n";
        assert!(with_json_body(ok.as_bytes(), false).is_none());
        let gone = "HTTP/1.1 410 Gone\r\nContent-Length: 0\r\n\r\n";
        assert!(
            with_json_body(gone.as_bytes(), false).is_none(),
            "not hyper's"
        );
        let two = format!("{HYPER_431}{HYPER_431}");
        assert!(
            with_json_body(two.as_bytes(), false).is_none(),
            "pipelined heads"
        );
        let part = &HYPER_431[..HYPER_431.len() - 2];
        assert!(
            with_json_body(part.as_bytes(), false).is_none(),
            "half a head"
        );
    }

    /// Everything a wrapper over a 16-byte pipe sends when `writes` are written, flushed and
    /// the stream shut down: partial writes and waits on the way.
    async fn sent_through(writes: Vec<Vec<u8>>) -> Vec<u8> {
        sent_through_after(writes, false).await
    }

    /// [`sent_through`], on a connection one of whose requests reached the router when
    /// `routed`.
    async fn sent_through_after(writes: Vec<Vec<u8>>, routed: bool) -> Vec<u8> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let connection = Arc::new(super::super::shed::Idle::new(1))
            .add(Arc::new(std::sync::atomic::AtomicBool::new(false)), false);
        if routed {
            connection.begin();
        }
        let (near, mut far) = tokio::io::duplex(16);
        let writer = tokio::spawn(async move {
            let mut stream = JsonRejections::new(near, connection);
            for w in writes {
                stream.write_all(&w).await.unwrap();
            }
            stream.flush().await.unwrap();
            stream.shutdown().await.unwrap();
        });
        let mut sent = Vec::new();
        far.read_to_end(&mut sent).await.unwrap();
        writer.await.unwrap();
        sent
    }

    #[tokio::test]
    async fn a_rejection_goes_out_whole_through_partial_writes() {
        let sent = sent_through(vec![HYPER_431.as_bytes().to_vec()]).await;
        assert_eq!(sent, with_json_body(HYPER_431.as_bytes(), false).unwrap());
    }

    #[tokio::test]
    async fn only_a_connections_first_bytes_can_be_a_rejection() {
        // A download whose bytes read like a rejection, after its own head.
        let head = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n",
            HYPER_431.len()
        );
        let writes = vec![head.clone().into_bytes(), HYPER_431.as_bytes().to_vec()];
        let sent = sent_through(writes).await;
        assert_eq!(sent, format!("{head}{HYPER_431}").into_bytes());
    }

    /// A push workspace's own empty 400, relayed with its length as a connection's first
    /// answer, goes out as the workspace sent it: it is not hyper's (a white-box audit).
    #[tokio::test]
    async fn a_routed_requests_empty_answer_is_not_a_rejection() {
        let relayed = "HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n";
        let sent = sent_through_after(vec![relayed.as_bytes().to_vec()], true).await;
        assert_eq!(sent, relayed.as_bytes());
        let sent = sent_through_after(vec![relayed.as_bytes().to_vec()], false).await;
        assert_ne!(sent, relayed.as_bytes(), "hyper's own, before any request");
    }

    proptest! {
        /// Whatever a write holds, it is passed on as written or replaced by a rejection
        /// with a JSON body whose Content-Length is its length.
        #[test]
        fn replacements_are_well_formed(head in "HTTP/1\\.1 4[0-9]{2} [A-Za-z ]{0,20}\r\n([A-Za-z-]{1,12}: [ -~]{0,20}\r\n){0,4}(Content-Length: 0\r\n)?\r\n") {
            if let Some(out) = with_json_body(head.as_bytes(), false) {
                let out = String::from_utf8(out).unwrap();
                let (head, body) = out.split_once("\r\n\r\n").unwrap();
                let len: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("Content-Length: "))
                    .unwrap()
                    .parse()
                    .unwrap();
                prop_assert_eq!(len, body.len());
                let v: serde_json::Value = serde_json::from_str(body).unwrap();
                prop_assert!(v["error"].is_string());
            }
        }
    }
}
