//! Log hygiene (SPEC §10, bounded observability): a log line carries at most
//! [`MAX_LOGGED_CHARS`] characters of any string a client chose (a filename, a URL, a
//! mimetype, an error that quotes input), so no request can write a megabyte log line.

use std::fmt;

pub const MAX_LOGGED_CHARS: usize = 256;

/// Displays at most [`MAX_LOGGED_CHARS`] characters of the string, then how many were left out.
pub struct Clip<'a>(pub &'a str);

impl fmt::Display for Clip<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0.char_indices().nth(MAX_LOGGED_CHARS) {
            None => f.write_str(self.0),
            Some((cut, _)) => {
                let left = self.0[cut..].chars().count();
                write!(f, "{}…(+{left} chars)", &self.0[..cut])
            }
        }
    }
}

impl fmt::Debug for Clip<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clips_long_strings_by_chars() {
        assert_eq!(Clip("short").to_string(), "short");
        let long = "é".repeat(1000);
        let shown = Clip(&long).to_string();
        assert!(shown.starts_with(&"é".repeat(MAX_LOGGED_CHARS)));
        assert!(shown.ends_with("…(+744 chars)"), "{shown}");
    }
}
