//! Filename sanitizing, identical to the workspace runtime's Python `sanitize_filename`
//! (SPEC §5), so a URI is the same whichever path handled the upload.

/// Longest extension (dot included) kept when a name is cut.
const MAX_EXT_CHARS: usize = 16;

pub fn sanitize(original: &str, max_chars: usize) -> String {
    let base = original.rsplit('/').next().unwrap_or("");
    let chars: Vec<char> = base
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect();
    let name: String = if chars.len() > max_chars {
        match chars.iter().rposition(|&c| c == '.') {
            Some(dot) if chars.len() - dot <= MAX_EXT_CHARS => {
                let ext = &chars[dot..];
                let stem = &chars[..max_chars - ext.len()];
                stem.iter().chain(ext).collect()
            }
            _ => chars[..max_chars].iter().collect(),
        }
    } else {
        chars.into_iter().collect()
    };
    match name.as_str() {
        "" | "." | ".." => "file".to_string(),
        _ => name,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parity_table() {
        let long_b = format!("{}.pdf", "b".repeat(200));
        let long_b_out = format!("{}.pdf", "b".repeat(96));
        let a95 = format!("{}.pdf", "a".repeat(95));
        let long_ext = format!("{}.thisisaverylongextensionnotpreserved", "c".repeat(90));
        let long_ext_out: String = long_ext.chars().take(100).collect();
        let cases: Vec<(&str, &str)> = vec![
            // SPEC §5 cases
            ("../../etc/passwd", "passwd"),
            ("a/b/c.txt", "c.txt"),
            ("hello world.pdf", "hello_world.pdf"),
            ("weird;chars!?.txt", "weird_chars__.txt"),
            ("中文.docx", "__.docx"),
            ("file (1).pdf", "file__1_.pdf"),
            ("report-2026.05.04_v2.pdf", "report-2026.05.04_v2.pdf"),
            (&a95, &a95),
            (&long_b, &long_b_out),
            (&long_ext, &long_ext_out),
            ("..", "file"),
            // our own edge cases
            ("", "file"),
            (".", "file"),
            ("dir/", "file"),
            ("/", "file"),
            ("a/..", "file"),
            (".bashrc", ".bashrc"),
            ("...", "..."),
            ("UPPER.TXT", "UPPER.TXT"),
            ("back\\slash.txt", "back_slash.txt"),
            ("quote\".txt", "quote_.txt"),
            ("new\nline.txt", "new_line.txt"),
            ("tab\there", "tab_here"),
            ("emoji😀.png", "emoji_.png"),
            ("e\u{301}.txt", "e_.txt"), // combining accent: one code point, one underscore
            ("café.txt", "caf_.txt"),
            ("nul\0byte", "nul_byte"),
            ("  ", "__"),
        ];
        for (input, want) in cases {
            let got = sanitize(input, 100);
            assert_eq!(got, want, "sanitize({input:?})");
            assert!(got.chars().count() <= 100);
        }
    }

    #[test]
    fn long_name_with_extension_keeps_it_and_totals_the_cap() {
        let out = sanitize(&format!("{}.pdf", "b".repeat(200)), 100);
        assert_eq!(out.chars().count(), 100);
        assert!(out.ends_with(".pdf"));
        // an extension of exactly 16 chars (dot included) is kept
        let ext16 = format!(".{}", "e".repeat(15));
        let out = sanitize(&format!("{}{ext16}", "s".repeat(120)), 100);
        assert!(out.ends_with(&ext16) && out.chars().count() == 100);
        // 17 chars is not
        let ext17 = format!(".{}", "e".repeat(16));
        let out = sanitize(&format!("{}{ext17}", "s".repeat(120)), 100);
        assert_eq!(out, "s".repeat(100));
    }

    #[test]
    fn lower_cap_is_honoured() {
        let out = sanitize(&format!("{}.pdf", "x".repeat(80)), 40);
        assert_eq!(out.chars().count(), 40);
        assert!(out.ends_with(".pdf"));
    }
}
