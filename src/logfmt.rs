//! Log hygiene (SPEC §10, bounded observability): a log line carries at most
//! [`MAX_LOGGED_CHARS`] characters of any string a client chose (a filename, a URL, a
//! mimetype, an error that quotes input), so no request can write a megabyte log line, and
//! none of them raw if it could end the line or drive a terminal (the text format writes
//! fields as they are).

use std::fmt::{self, Write};

pub const MAX_LOGGED_CHARS: usize = 256;

/// Displays at most [`MAX_LOGGED_CHARS`] characters of the string, then how many were left
/// out; characters that could end the line, drive a terminal or hide text (controls, line and
/// paragraph separators, bidi and zero-width format characters) as Rust escapes (`\n`,
/// `\u{1b}`). Everything else, combining marks of a decomposed name included, as it is.
pub struct Clip<'a>(pub &'a str);

/// [`Clip`] as a string, to log as a `&str` field (`name = clip(&s).as_str()`), not with `%`:
/// the text format quotes a string field and escapes its quotes and backslashes, while it
/// writes a `%` field as it is, so a filename `x event=acked file_id=…` read as fields of its
/// own to whatever parses the line. The JSON format writes both as a JSON string.
pub fn clip(s: &str) -> String {
    Clip(s).to_string()
}

impl fmt::Display for Clip<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (shown, left) = match self.0.char_indices().nth(MAX_LOGGED_CHARS) {
            None => (self.0, 0),
            Some((cut, _)) => (&self.0[..cut], self.0[cut..].chars().count()),
        };
        for c in shown.chars() {
            match hidden(c) {
                true => write!(f, "{}", c.escape_debug())?,
                false => f.write_char(c)?,
            }
        }
        match left {
            0 => Ok(()),
            left => write!(f, "…(+{left} chars)"),
        }
    }
}

/// Characters that do not show as themselves: controls, and those that reorder or hide text
/// (a file name `invoice\u{202e}fdp.exe` reads as `invoiceexe.pdf`).
pub fn hidden(c: char) -> bool {
    c.is_control()
        || matches!(c,
            '\u{00ad}' // soft hyphen
            | '\u{061c}' // Arabic letter mark
            | '\u{180e}' // Mongolian vowel separator
            | '\u{200b}'..='\u{200f}' // zero-width space, joiners, LRM, RLM
            | '\u{2028}' | '\u{2029}' // line and paragraph separators
            | '\u{202a}'..='\u{202e}' // bidi embeddings and overrides
            | '\u{2060}'..='\u{2064}' // word joiner, invisible operators
            | '\u{2066}'..='\u{206f}' // bidi isolates, deprecated format characters
            | '\u{feff}' // zero-width no-break space
            | '\u{e0000}'..='\u{e007f}') // tags
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

    #[test]
    fn escapes_what_could_forge_a_line_or_drive_a_terminal() {
        let hostile =
            "a.txt\r\n2026-12-05T00:00:00Z  WARN forged\u{1b}[2J\u{202e}\u{7f}\u{85}\u{200b}";
        assert_eq!(
            Clip(hostile).to_string(),
            r"a.txt\r\n2026-12-05T00:00:00Z  WARN forged\u{1b}[2J\u{202e}\u{7f}\u{85}\u{200b}"
        );
        // Printable text, quotes and backslashes included, is shown as it is, and so are the
        // combining marks of a decomposed (NFD) name and emoji variation selectors.
        let plain = "naïve \"quoted\" C:\\dir\\文件 ☃.txt re\u{301}sume\u{301} ❤\u{fe0f} हिन्दी";
        assert_eq!(Clip(plain).to_string(), plain);
        // The bound counts the string's characters, not their escapes.
        let shown = Clip(&"\n".repeat(300)).to_string();
        assert_eq!(
            shown,
            format!("{}…(+44 chars)", r"\n".repeat(MAX_LOGGED_CHARS))
        );
    }

    proptest::proptest! {
        #[test]
        fn no_string_shows_a_line_break_control_or_bidi_character(s in "\\PC*|[\\x00-\\x{3000}]{0,300}") {
            let shown = Clip(&s).to_string();
            proptest::prop_assert!(
                !shown.chars().any(|c| c.is_control()
                    || matches!(c, '\u{2028}' | '\u{2029}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')),
                "{:?}", shown
            );
        }
    }
}
