//! A streaming `multipart/form-data` parser with hard bounds (SPEC §10, bounded parsing).
//!
//! Why not multer: it buffers a part's header block and the preamble until their terminator
//! shows up, however long that takes, so one 40 MiB "header" costs 40 MiB of RAM and is then
//! accepted. Here every buffer has a ceiling: the preamble and each part's header block are
//! refused past their limit, and part data is handed on as it arrives (the buffer holds at
//! most one incoming chunk plus the tail that might be the start of a delimiter).

use std::{fmt, pin::Pin};

use bytes::{Buf, Bytes, BytesMut};
use futures::{Stream, StreamExt};
use memchr::memmem;

/// Bounds of the parser (SPEC §10).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Bytes before the first delimiter.
    pub max_preamble: usize,
    /// Bytes of one part's header block, its blank line included.
    pub max_part_header: usize,
    /// Bytes after the closing delimiter (clients send a CRLF, or nothing).
    pub max_epilogue: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_preamble: 8 * 1024,
            max_part_header: 8 * 1024,
            max_epilogue: 8 * 1024,
        }
    }
}

/// Headers a part may carry; more is malformed (8 KiB could hold hundreds of tiny ones).
const MAX_PART_HEADERS: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum MultipartError {
    /// The body is not valid multipart, or breaks a bound; the text says which (for logs).
    #[error("malformed multipart body: {0}")]
    Malformed(&'static str),
    /// The underlying body failed (client gone, our own cap or deadline).
    #[error("request body failed: {0}")]
    Body(#[source] BoxError),
}

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The boundary of a `multipart/form-data` Content-Type, if it is one.
pub fn boundary(content_type: &str) -> Option<String> {
    let (essence, params) = content_type.split_once(';')?;
    if !essence.trim().eq_ignore_ascii_case("multipart/form-data") {
        return None;
    }
    let value =
        params_of(params).find_map(|(k, v)| k.eq_ignore_ascii_case("boundary").then_some(v))?;
    // RFC 2046: 1 to 70 characters, not ending in a space.
    let valid = (1..=70).contains(&value.len())
        && !value.ends_with(' ')
        && value.bytes().all(|b| b.is_ascii_graphic() || b == b' ');
    valid.then_some(value)
}

/// One part's head: what the staging code needs of its headers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PartHead {
    /// The `name` of its Content-Disposition.
    pub name: Option<String>,
    /// The `filename*` (RFC 5987) or `filename` of its Content-Disposition; `None` when absent.
    pub filename: Option<String>,
    /// Its Content-Type, as sent (possibly not UTF-8: lossily decoded).
    pub content_type: Option<String>,
    /// Bytes of the header block (non-file parts count them against their budget).
    pub header_bytes: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Before the first delimiter.
    Preamble {
        skipped: usize,
    },
    /// Just after a delimiter: `--` closes, CRLF opens a part.
    AfterDelimiter,
    Headers,
    /// Inside a part's data.
    Data,
    /// The part's data ended; the next call moves past its delimiter.
    EndOfPart,
    Done,
}

pub struct Multipart<S> {
    stream: S,
    buf: BytesMut,
    /// `\r\n--<boundary>`.
    delimiter: Vec<u8>,
    finder: memmem::Finder<'static>,
    state: State,
    eof: bool,
    limits: Limits,
    /// Bytes taken from the body so far.
    received: u64,
}

impl<S> Multipart<S> {
    /// The size of the part whose head [`next_part`](Self::next_part) just returned, were it
    /// the last one and the body, `body_len` bytes long, ended the way clients end it (the
    /// closing delimiter and CRLF): a guess, to be checked against the part's end. Asked
    /// before any of the part's data was read (later the answer is wrong); `None` outside a
    /// part's data, or when the body could not hold even that.
    pub fn last_part_size(&self, body_len: u64) -> Option<u64> {
        if self.state != State::Data {
            return None;
        }
        // The buffer holds the last bytes received, from the data's start on.
        let data_at = self.received.checked_sub(self.buf.len() as u64)?;
        let closing = self.delimiter.len() as u64 + b"--\r\n".len() as u64;
        body_len.checked_sub(data_at)?.checked_sub(closing)
    }
}

impl<S, E> Multipart<S>
where
    S: Stream<Item = Result<Bytes, E>> + Unpin,
    E: Into<BoxError>,
{
    pub fn new(stream: S, boundary: &str, limits: Limits) -> Self {
        let delimiter = format!("\r\n--{boundary}").into_bytes();
        let finder = memmem::Finder::new(&delimiter).into_owned();
        // A virtual CRLF in front: the first delimiter may open the body without one.
        let mut buf = BytesMut::with_capacity(16 * 1024);
        buf.extend_from_slice(b"\r\n");
        Multipart {
            stream,
            buf,
            delimiter,
            finder,
            state: State::Preamble { skipped: 0 },
            eof: false,
            limits,
            received: 0,
        }
    }

    /// The next non-empty chunk of the body, `None` at its end.
    async fn next_raw(&mut self) -> Result<Option<Bytes>, MultipartError> {
        if self.eof {
            return Ok(None);
        }
        loop {
            match self.stream.next().await {
                Some(Ok(chunk)) if chunk.is_empty() => continue,
                Some(Ok(chunk)) => {
                    self.received += chunk.len() as u64;
                    return Ok(Some(chunk));
                }
                Some(Err(e)) => return Err(MultipartError::Body(e.into())),
                None => {
                    self.eof = true;
                    return Ok(None);
                }
            }
        }
    }

    /// Reads more of the body into the buffer; false at its end.
    async fn fill(&mut self) -> Result<bool, MultipartError> {
        match self.next_raw().await? {
            Some(chunk) => {
                self.buf.extend_from_slice(&chunk);
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// How many bytes at the end of `data` could be the start of a delimiter (and so cannot
    /// be handed on as data yet). Almost always 0 for file data: only a tail from a `\r`
    /// that matches the delimiter's beginning counts.
    fn partial_delimiter(&self, data: &[u8]) -> usize {
        let window = data.len().min(self.delimiter.len() - 1);
        let tail = &data[data.len() - window..];
        (0..window)
            .find(|&i| self.delimiter.starts_with(&tail[i..]))
            .map_or(0, |i| window - i)
    }

    /// The next part's head, skipping whatever is left of the current part's data; `None`
    /// after the closing delimiter.
    pub async fn next_part(&mut self) -> Result<Option<PartHead>, MultipartError> {
        loop {
            match self.state {
                State::Done => return Ok(None),
                State::Data => while self.next_chunk().await?.is_some() {},
                State::EndOfPart => {
                    self.buf.advance(self.delimiter.len());
                    self.state = State::AfterDelimiter;
                }
                State::Preamble { skipped } => self.skip_preamble(skipped).await?,
                State::AfterDelimiter => self.after_delimiter().await?,
                State::Headers => return self.headers().await.map(Some),
            }
        }
    }

    async fn skip_preamble(&mut self, skipped: usize) -> Result<(), MultipartError> {
        if let Some(at) = self.finder.find(&self.buf) {
            if skipped + at > self.limits.max_preamble + 2 {
                return Err(MultipartError::Malformed("preamble too long"));
            }
            self.buf.advance(at + self.delimiter.len());
            self.state = State::AfterDelimiter;
            return Ok(());
        }
        // Keep what could be the start of a delimiter; the rest is preamble.
        let drop = self.buf.len().saturating_sub(self.delimiter.len() - 1);
        self.buf.advance(drop);
        let skipped = skipped + drop;
        if skipped > self.limits.max_preamble + 2 {
            return Err(MultipartError::Malformed("preamble too long"));
        }
        self.state = State::Preamble { skipped };
        if !self.fill().await? {
            return Err(MultipartError::Malformed("no delimiter"));
        }
        Ok(())
    }

    async fn after_delimiter(&mut self) -> Result<(), MultipartError> {
        loop {
            match after_boundary(&self.buf, self.limits.max_part_header) {
                Some(AfterBoundary::Close) => {
                    // The close delimiter. The epilogue is ignored, but read to the body's
                    // end first: a body cut short of its length, or a chunked one without its
                    // last chunk, is truncated, and an upload is whole only once its body is.
                    // Done before the epilogue is read: whatever happens there, none of it is
                    // ever parsed as a part.
                    let epilogue = self.buf.len() - 2;
                    self.buf.clear();
                    self.state = State::Done;
                    return self.skip_epilogue(epilogue).await;
                }
                Some(AfterBoundary::Open(line)) => {
                    self.buf.advance(line);
                    self.state = State::Headers;
                    return Ok(());
                }
                Some(AfterBoundary::PaddingTooLong) => {
                    return Err(MultipartError::Malformed("delimiter line too long"))
                }
                Some(AfterBoundary::Bad) => {
                    return Err(MultipartError::Malformed("bad delimiter line"))
                }
                None if self.fill().await? => {}
                None => return Err(MultipartError::Malformed("truncated after a delimiter")),
            }
        }
    }

    /// Reads the rest of the body, `seen` bytes of it already, up to `max_epilogue`.
    async fn skip_epilogue(&mut self, mut seen: usize) -> Result<(), MultipartError> {
        loop {
            if seen > self.limits.max_epilogue {
                return Err(MultipartError::Malformed("epilogue too long"));
            }
            match self.next_raw().await? {
                Some(chunk) => seen += chunk.len(),
                None => return Ok(()),
            }
        }
    }

    async fn headers(&mut self) -> Result<PartHead, MultipartError> {
        let end = loop {
            if self.buf.starts_with(b"\r\n") {
                break 2;
            }
            let window = self.buf.len().min(self.limits.max_part_header);
            if let Some(at) = memmem::find(&self.buf[..window], b"\r\n\r\n") {
                break at + 4;
            }
            if self.buf.len() >= self.limits.max_part_header {
                return Err(MultipartError::Malformed("part header too long"));
            }
            if !self.fill().await? {
                return Err(MultipartError::Malformed("truncated part header"));
            }
        };
        // RFC 2046 makes a part's body optional (`MIME-part-headers [CRLF *OCTET]`), and
        // some senders leave it out for an empty part: the header block's last CRLF is then
        // the next delimiter's own. Read as data, that delimiter, the next part's head and
        // its bytes became this part's content, and that part was lost (a red team's 200).
        // Go's parser, the platform's, takes such a part as empty.
        let empty = loop {
            match self.delimiter_line_at(end) {
                Some(found) => break found,
                None if self.fill().await? => {}
                None => break false,
            }
        };
        let head = parse_head(&self.buf[..end])?;
        self.buf.advance(if empty { end - 2 } else { end });
        self.state = State::Data;
        Ok(head)
    }

    /// Whether the buffer holds a whole delimiter line from `at` on: `--<boundary>` and then
    /// `--`, or transport padding and CRLF (as Go's `peekBufferIsEmptyPart` asks, so data
    /// that merely begins with the boundary stays data); `None` while it cannot tell yet.
    fn delimiter_line_at(&self, at: usize) -> Option<bool> {
        let dash_boundary = &self.delimiter[2..];
        let rest = &self.buf[at..];
        let common = rest.len().min(dash_boundary.len());
        if rest[..common] != dash_boundary[..common] {
            return Some(false);
        }
        let after = rest.get(dash_boundary.len()..)?;
        after_boundary(after, self.limits.max_part_header)
            .map(|line| matches!(line, AfterBoundary::Close | AfterBoundary::Open(_)))
    }

    /// Reads and discards the rest of the body (its own caps and deadlines bound this), so
    /// the client sees an error answer rather than a reset connection.
    pub async fn drain(&mut self) {
        self.buf.clear();
        self.state = State::Done;
        while !self.eof {
            match self.stream.next().await {
                Some(Ok(_)) => {}
                Some(Err(_)) | None => self.eof = true,
            }
        }
    }

    /// The next piece of the current part's data; `None` at its end.
    pub async fn next_chunk(&mut self) -> Result<Option<Bytes>, MultipartError> {
        loop {
            if self.state != State::Data {
                return Ok(None);
            }
            if let Some(at) = self.finder.find(&self.buf) {
                self.state = State::EndOfPart;
                if at > 0 {
                    return Ok(Some(self.buf.split_to(at).freeze()));
                }
                return Ok(None);
            }
            // Everything but a possible delimiter start at the end is data.
            let ready = self.buf.len() - self.partial_delimiter(&self.buf);
            if ready > 0 {
                return Ok(Some(self.buf.split_to(ready).freeze()));
            }
            let Some(chunk) = self.next_raw().await? else {
                return Err(MultipartError::Malformed("truncated part data"));
            };
            // The bulk of a file: a chunk with no delimiter in it, nothing carried over, is
            // handed on as it is — no copy. Anything else goes through the buffer.
            if self.buf.is_empty() && self.finder.find(&chunk).is_none() {
                let keep = self.partial_delimiter(&chunk);
                if keep < chunk.len() {
                    self.buf.extend_from_slice(&chunk[chunk.len() - keep..]);
                    return Ok(Some(chunk.slice(..chunk.len() - keep)));
                }
            }
            self.buf.extend_from_slice(&chunk);
        }
    }
}

impl<S> fmt::Debug for Multipart<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Multipart")
            .field("state", &self.state)
            .field("buffered", &self.buf.len())
            .finish()
    }
}

/// What follows a `--<boundary>` in the body.
enum AfterBoundary {
    /// `--`: the close delimiter.
    Close,
    /// Transport padding and CRLF, this many bytes: a part opens after them.
    Open(usize),
    PaddingTooLong,
    Bad,
}

/// Reads what follows a boundary (`after`); `None` while it cannot tell yet. Transport
/// padding (RFC 2046: linear white space) may follow a delimiter, at most `max_pad` bytes.
fn after_boundary(after: &[u8], max_pad: usize) -> Option<AfterBoundary> {
    let pad = after
        .iter()
        .take_while(|b| **b == b' ' || **b == b'\t')
        .count();
    if pad > max_pad {
        return Some(AfterBoundary::PaddingTooLong);
    }
    let rest = &after[pad..];
    if rest.len() < 2 {
        return None;
    }
    Some(match rest {
        [b'-', b'-', ..] if pad == 0 => AfterBoundary::Close,
        [b'\r', b'\n', ..] => AfterBoundary::Open(pad + 2),
        _ => AfterBoundary::Bad,
    })
}

/// A boxed body stream, as the HTTP layer hands it over.
pub type BodyStream = Pin<Box<dyn Stream<Item = Result<Bytes, BoxError>> + Send>>;

fn parse_head(block: &[u8]) -> Result<PartHead, MultipartError> {
    // httparse refuses control characters in a value, and browsers send a file's name as it
    // is but for CR, LF and `"` (HTML's form-data encoding): a Linux file named `a\x01b.txt`
    // was a 400, where Go's parser (the platform's) takes it and SPEC §5 makes it `a_b.txt`
    // (and §4 a control character in Content-Type `application/octet-stream`). So the block
    // is parsed with them masked, and each value read back from the block as it came.
    let mut masked = block.to_vec();
    let mut in_value = false;
    for b in masked.iter_mut() {
        match *b {
            b'\n' => in_value = false,
            b':' => in_value = true,
            b'\r' | b'\t' => {}
            c if in_value && c.is_ascii_control() => *b = b'!',
            _ => {}
        }
    }
    // The value's place in `masked` is its place in `block` (a value not found there, as
    // an empty one might be, is taken as it is).
    let original = |value: &[u8]| -> Vec<u8> {
        (value.as_ptr() as usize)
            .checked_sub(masked.as_ptr() as usize)
            .and_then(|at| block.get(at..at.checked_add(value.len())?))
            .unwrap_or(value)
            .to_vec()
    };
    let mut headers = [httparse::EMPTY_HEADER; MAX_PART_HEADERS];
    let parsed = match httparse::parse_headers(&masked, &mut headers) {
        Ok(httparse::Status::Complete((_, parsed))) => parsed,
        Ok(httparse::Status::Partial) => return Err(MultipartError::Malformed("partial header")),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(MultipartError::Malformed("too many part headers"))
        }
        Err(_) => return Err(MultipartError::Malformed("bad part header")),
    };
    let mut head = PartHead {
        header_bytes: block.len(),
        ..PartHead::default()
    };
    for h in parsed {
        let raw = original(h.value);
        let value = String::from_utf8_lossy(&raw);
        if h.name.eq_ignore_ascii_case("content-disposition") {
            let (name, filename) = disposition(&value)?;
            head.name = name;
            head.filename = filename;
        } else if h.name.eq_ignore_ascii_case("content-type") {
            head.content_type = Some(value.into_owned());
        }
    }
    Ok(head)
}

/// `form-data; name="files"; filename="a.txt"` → (name, filename). `filename*` (RFC 5987)
/// wins over `filename`, as in Go's mime package and browsers.
fn disposition(value: &str) -> Result<(Option<String>, Option<String>), MultipartError> {
    let (kind, params) = value.split_once(';').unwrap_or((value, ""));
    if !kind
        .trim_matches([' ', '\t'])
        .eq_ignore_ascii_case("form-data")
    {
        return Err(MultipartError::Malformed("part is not form-data"));
    }
    let (mut name, mut filename, mut extended) = (None, None, None);
    for (key, v) in params_of(params) {
        match key.to_ascii_lowercase().as_str() {
            "name" => name = Some(v),
            "filename" => filename = Some(v),
            "filename*" => extended = ext_value(&v),
            _ => {}
        }
    }
    Ok((name, extended.or(filename)))
}

/// RFC 5987 `charset'lang'percent-encoded`; UTF-8, US-ASCII and ISO-8859-1 are understood.
/// US-ASCII is read as UTF-8, as Go's mime package passes its bytes on: a name it takes is
/// the same name here (SPEC §5: whichever path handled the upload).
fn ext_value(v: &str) -> Option<String> {
    let mut it = v.splitn(3, '\'');
    let (charset, _lang, encoded) = (it.next()?, it.next()?, it.next()?);
    let bytes: Vec<u8> = percent_encoding::percent_decode_str(encoded).collect();
    if charset.eq_ignore_ascii_case("utf-8") || charset.eq_ignore_ascii_case("us-ascii") {
        String::from_utf8(bytes).ok()
    } else if charset.eq_ignore_ascii_case("iso-8859-1") {
        Some(bytes.into_iter().map(char::from).collect())
    } else {
        None
    }
}

/// `; key=value; key="quoted \" value"` pairs. A quoted value unescapes `\` before a tspecial
/// only (Go's rule): a browser's `C:\dir\a.txt` keeps its backslashes.
fn params_of(params: &str) -> impl Iterator<Item = (String, String)> + '_ {
    let mut rest = params;
    std::iter::from_fn(move || loop {
        rest = rest.trim_start_matches([';', ' ', '\t']);
        if rest.is_empty() {
            return None;
        }
        let eq = rest.find(['=', ';']).unwrap_or(rest.len());
        let key = rest[..eq].trim().to_string();
        if rest[eq..].starts_with('=') {
            rest = rest[eq + 1..].trim_start();
            let value = if let Some(quoted) = rest.strip_prefix('"') {
                let (v, used) = unquote(quoted);
                rest = &quoted[used..];
                v
            } else {
                let end = rest.find(';').unwrap_or(rest.len());
                let v = rest[..end].trim().to_string();
                rest = &rest[end..];
                v
            };
            return Some((key, value));
        }
        rest = &rest[eq..];
        if !key.is_empty() {
            return Some((key, String::new()));
        }
    })
}

/// The value of a quoted string (its opening quote already consumed), and how many bytes of
/// `s` it used, closing quote included. An unterminated string runs to the end.
fn unquote(s: &str) -> (String, usize) {
    const TSPECIALS: &str = "()<>@,;:\\\"/[]?=";
    let mut out = String::new();
    let mut chars = s.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        match c {
            '"' => return (out, i + 1),
            '\\' => match chars.peek() {
                Some(&(_, next)) if TSPECIALS.contains(next) => {
                    out.push(next);
                    chars.next();
                }
                _ => out.push('\\'),
            },
            c => out.push(c),
        }
    }
    (out, s.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    type Chunks = Vec<Result<Bytes, std::io::Error>>;

    fn split(body: &[u8], sizes: &[usize]) -> Chunks {
        let mut out = Vec::new();
        let mut rest = body;
        let mut i = 0;
        while !rest.is_empty() {
            let n = sizes.get(i).copied().unwrap_or(7).clamp(1, rest.len());
            out.push(Ok(Bytes::copy_from_slice(&rest[..n])));
            rest = &rest[n..];
            i += 1;
        }
        out
    }

    /// Every part as (head, data), or the first error.
    fn parse_all(
        chunks: Chunks,
        boundary: &str,
        limits: Limits,
    ) -> Result<Vec<(PartHead, Vec<u8>)>, MultipartError> {
        futures::executor::block_on(async {
            let mut mp = Multipart::new(futures::stream::iter(chunks), boundary, limits);
            let mut parts = Vec::new();
            while let Some(head) = mp.next_part().await? {
                let mut data = Vec::new();
                while let Some(c) = mp.next_chunk().await? {
                    data.extend_from_slice(&c);
                }
                parts.push((head, data));
            }
            Ok(parts)
        })
    }

    fn body(boundary: &str, parts: &[(&str, Option<&str>, &[u8])]) -> Vec<u8> {
        let mut out = Vec::new();
        for (name, filename, data) in parts {
            out.extend_from_slice(format!("--{boundary}\r\n").as_bytes());
            let mut disp = format!("Content-Disposition: form-data; name=\"{name}\"");
            if let Some(f) = filename {
                disp.push_str(&format!("; filename=\"{f}\""));
            }
            out.extend_from_slice(disp.as_bytes());
            out.extend_from_slice(b"\r\nContent-Type: text/plain\r\n\r\n");
            out.extend_from_slice(data);
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
        out
    }

    /// A body of `files` parts holding `datas`; `None` when a delimiter is inside one.
    fn files_body(boundary: &str, datas: &[Vec<u8>]) -> Option<Vec<u8>> {
        let delimiter = format!("\r\n--{boundary}");
        if datas
            .iter()
            .any(|d| memmem::find(d, delimiter.as_bytes()).is_some())
        {
            return None;
        }
        let parts: Vec<(&str, Option<&str>, &[u8])> = datas
            .iter()
            .map(|d| ("files", Some("f.bin"), d.as_slice()))
            .collect();
        Some(body(boundary, &parts))
    }

    #[test]
    fn parses_parts_split_anywhere() {
        let b = "XyZ";
        let raw = body(
            b,
            &[
                ("files", Some("a.txt"), b"hello\r\n--Xy"),
                ("note", None, b""),
            ],
        );
        for size in 1..raw.len() {
            let parts = parse_all(split(&raw, &[size; 1000]), b, Limits::default()).unwrap();
            assert_eq!(parts.len(), 2, "chunk size {size}");
            assert_eq!(parts[0].0.filename.as_deref(), Some("a.txt"));
            assert_eq!(parts[0].0.content_type.as_deref(), Some("text/plain"));
            assert_eq!(parts[0].1, b"hello\r\n--Xy");
            assert_eq!(parts[1].0.name.as_deref(), Some("note"));
            assert_eq!(parts[1].0.filename, None);
            assert_eq!(parts[1].1, b"");
        }
    }

    #[test]
    fn bounds_are_enforced() {
        let b = "bnd";
        let limits = Limits::default();
        let mut long_preamble = vec![b'x'; limits.max_preamble + 10];
        long_preamble.extend(body(b, &[("files", Some("a"), b"1")]));
        assert!(matches!(
            parse_all(split(&long_preamble, &[4096; 100]), b, limits),
            Err(MultipartError::Malformed("preamble too long"))
        ));
        let mut ok_preamble = vec![b'x'; limits.max_preamble - 2];
        ok_preamble.extend_from_slice(b"\r\n");
        ok_preamble.extend(body(b, &[("files", Some("a"), b"1")]));
        assert_eq!(
            parse_all(split(&ok_preamble, &[4096; 100]), b, limits)
                .unwrap()
                .len(),
            1
        );

        let mut long_header = format!("--{b}\r\nX-Pad: ").into_bytes();
        long_header.extend(vec![b'p'; limits.max_part_header]);
        long_header.extend_from_slice(b"\r\n\r\ndata\r\n--bnd--");
        assert!(matches!(
            parse_all(split(&long_header, &[1000; 100]), b, limits),
            Err(MultipartError::Malformed("part header too long"))
        ));
    }

    #[test]
    fn the_body_is_read_to_its_end_after_the_closing_delimiter() {
        let b = "bnd";
        let limits = Limits::default();
        let with_epilogue = |n: usize| {
            let mut raw = body(b, &[("files", Some("a"), b"1")]);
            raw.extend(vec![b'e'; n]);
            raw
        };
        for n in [0, 2, limits.max_epilogue - 2] {
            let parts = parse_all(split(&with_epilogue(n), &[1000; 100]), b, limits);
            assert_eq!(parts.unwrap().len(), 1, "an epilogue of {n} bytes");
        }
        assert!(matches!(
            parse_all(
                split(&with_epilogue(limits.max_epilogue), &[1000; 100]),
                b,
                limits
            ),
            Err(MultipartError::Malformed("epilogue too long"))
        ));
        // A body that fails after its closing delimiter (cut short of its Content-Length, or
        // chunked without its last chunk) is not a whole upload.
        let mut chunks = split(&with_epilogue(2), &[5; 100]);
        chunks.push(Err(std::io::Error::other("body cut short")));
        assert!(matches!(
            parse_all(chunks, b, limits),
            Err(MultipartError::Body(_))
        ));
    }

    /// A part with no body at all, its head followed at once by the next delimiter (RFC
    /// 2046; Go's parser takes it so): an empty part, whatever the chunks' edges.
    #[test]
    fn a_part_without_a_body_is_empty() {
        let raw = b"--bnd\r\nContent-Disposition: form-data; name=\"note\"\r\n\r\n\
                    --bnd\r\nContent-Disposition: form-data; name=\"files\"; filename=\"e.txt\"\r\n\r\n\
                    --bnd\r\nContent-Disposition: form-data; name=\"files\"; filename=\"b.txt\"\r\n\r\nBBBB\r\n\
                    --bnd--\r\n";
        for sizes in [
            &[raw.len()][..],
            &[1; 400],
            &[7; 100],
            &[50, 3, 60, 2, 1000],
        ] {
            let parts = parse_all(split(raw, sizes), "bnd", Limits::default()).unwrap();
            let got: Vec<(Option<&str>, &[u8])> = parts
                .iter()
                .map(|(head, data)| (head.filename.as_deref(), &data[..]))
                .collect();
            assert_eq!(
                got,
                [
                    (None, &b""[..]),
                    (Some("e.txt"), b""),
                    (Some("b.txt"), b"BBBB")
                ],
                "{sizes:?}"
            );
        }
        // Data that only begins with the boundary is data.
        let raw =
            b"--bnd\r\nContent-Disposition: form-data; name=\"files\"; filename=\"d.txt\"\r\n\r\n\
                    --bndX\r\n--bnd--\r\n";
        for sizes in [&[raw.len()][..], &[1; 200]] {
            let parts = parse_all(split(raw, sizes), "bnd", Limits::default()).unwrap();
            assert_eq!(parts.len(), 1);
            assert_eq!(parts[0].1, b"--bndX", "{sizes:?}");
        }
    }

    #[test]
    fn malformed_bodies() {
        let b = "bnd";
        let cases: [&[u8]; 6] = [
            b"",
            b"no delimiter at all",
            b"--bnd\r\nContent-Disposition: form-data; name=\"files\"\r\n\r\ntruncated",
            b"--bnd\r\nContent-Disposition: form-data; name=\"files\"",
            b"--bndjunk\r\n\r\n--bnd--",
            b"--bnd\r\nContent-Disposition: attachment\r\n\r\nx\r\n--bnd--",
        ];
        for raw in cases {
            assert!(
                matches!(
                    parse_all(split(raw, &[3; 100]), b, Limits::default()),
                    Err(MultipartError::Malformed(_))
                ),
                "{:?}",
                String::from_utf8_lossy(raw)
            );
        }
        // No parts at all is well-formed (the caller decides it has no files).
        assert_eq!(
            parse_all(split(b"--bnd--\r\n", &[3]), b, Limits::default())
                .unwrap()
                .len(),
            0
        );
    }

    #[test]
    fn control_characters_in_values_are_kept_as_sent() {
        let head = parse_head(
            b"Content-Disposition: form-data; name=\"files\"; filename=\"a\x01b\x7f.txt\"\r\n\
              Content-Type: text/pl\x00ain\r\n\r\n",
        )
        .unwrap();
        assert_eq!(head.name.as_deref(), Some("files"));
        assert_eq!(head.filename.as_deref(), Some("a\u{1}b\u{7f}.txt"));
        assert_eq!(head.content_type.as_deref(), Some("text/pl\u{0}ain"));
        // In a header's name they are still malformed.
        assert!(matches!(
            parse_head(b"Content\x01Type: text/plain\r\n\r\n"),
            Err(MultipartError::Malformed(_))
        ));
    }

    #[test]
    fn dispositions() {
        let d = |s: &str| disposition(s).unwrap();
        assert_eq!(
            d("form-data; name=\"files\"; filename=\"a b.txt\""),
            (Some("files".into()), Some("a b.txt".into()))
        );
        assert_eq!(
            d("form-data; name=files; filename=x.pdf"),
            (Some("files".into()), Some("x.pdf".into()))
        );
        assert_eq!(
            d("form-data; name=\"files\"; filename=\"C:\\dir\\a.txt\""),
            (Some("files".into()), Some("C:\\dir\\a.txt".into()))
        );
        assert_eq!(
            d("form-data; name=\"f\"; filename=\"q\\\"uote\""),
            (Some("f".into()), Some("q\"uote".into()))
        );
        assert_eq!(
            d("form-data; name=\"files\"; filename=\"fallback.txt\"; filename*=UTF-8''%E4%B8%AD.txt"),
            (Some("files".into()), Some("中.txt".into()))
        );
        // US-ASCII, as Go's parser takes it, and Python's for ASCII names (a white-box audit:
        // the part was taken for a form field, and the upload answered 400 `no files field`).
        assert_eq!(
            d("form-data; name=\"files\"; filename*=us-ascii''abc.txt"),
            (Some("files".into()), Some("abc.txt".into()))
        );
        assert_eq!(
            d("FORM-DATA; NAME=\"files\"; FILENAME=\"\""),
            (Some("files".into()), Some("".into()))
        );
        assert_eq!(d("form-data; name=\"files\""), (Some("files".into()), None));
        assert_eq!(
            d("form-data; name=\"a;b\"; filename=\"c;d\""),
            (Some("a;b".into()), Some("c;d".into()))
        );
    }

    #[test]
    fn boundaries() {
        assert_eq!(
            boundary("multipart/form-data; boundary=abc").as_deref(),
            Some("abc")
        );
        assert_eq!(
            boundary("Multipart/Form-Data; charset=x; boundary=\"a b:c\"").as_deref(),
            Some("a b:c")
        );
        assert_eq!(boundary("multipart/mixed; boundary=abc"), None);
        assert_eq!(boundary("multipart/form-data"), None);
        assert_eq!(boundary("multipart/form-data; boundary="), None);
        assert_eq!(
            boundary(&format!("multipart/form-data; boundary={}", "x".repeat(71))),
            None
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(10_000))]

        /// Any body, split anywhere: no panic, and buffered bytes never pass the bounds.
        #[test]
        fn arbitrary_bodies_never_panic(
            raw in proptest::collection::vec(any::<u8>(), 0..600),
            sizes in proptest::collection::vec(1usize..64, 1..40),
        ) {
            let limits = Limits { max_preamble: 64, max_part_header: 64, max_epilogue: 64 };
            let _ = parse_all(split(&raw, &sizes), "b", limits);
        }

        /// The size foreseen from the body's length right after a part's head is the last
        /// part's exactly, and never an earlier part's.
        #[test]
        fn the_last_parts_size_is_foreseen(
            datas in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..200), 1..4),
            sizes in proptest::collection::vec(1usize..300, 1..40),
        ) {
            let b = "Zq1-boundary";
            let raw = files_body(b, &datas);
            prop_assume!(raw.is_some());
            let raw = raw.unwrap_or_default();
            let foreseen = futures::executor::block_on(async {
                let chunks = split(&raw, &sizes);
                let mut mp = Multipart::new(futures::stream::iter(chunks), b, Limits::default());
                let mut foreseen = Vec::new();
                while mp.next_part().await.unwrap().is_some() {
                    foreseen.push(mp.last_part_size(raw.len() as u64));
                    while mp.next_chunk().await.unwrap().is_some() {}
                    prop_assert_eq!(mp.last_part_size(raw.len() as u64), None);
                }
                Ok(foreseen)
            })?;
            let last = datas.len() - 1;
            for (i, (guess, data)) in foreseen.iter().zip(&datas).enumerate() {
                prop_assert_eq!(*guess == Some(data.len() as u64), i == last);
            }
        }

        /// Well-formed bodies with arbitrary part data round-trip exactly, however split.
        #[test]
        fn well_formed_bodies_round_trip(
            datas in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..200), 1..4),
            sizes in proptest::collection::vec(1usize..300, 1..40),
        ) {
            let b = "Zq1-boundary";
            let raw = files_body(b, &datas);
            prop_assume!(raw.is_some());
            let raw = raw.unwrap_or_default();
            let got = parse_all(split(&raw, &sizes), b, Limits::default()).unwrap();
            let got: Vec<Vec<u8>> = got.into_iter().map(|(_, d)| d).collect();
            prop_assert_eq!(got, datas);
        }
    }
}
