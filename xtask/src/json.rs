//! Just enough JSON to read `kiln ... --json` summaries, so xtask needs no
//! serde: objects, arrays, strings, numbers (kept as text), booleans, null.

use anyhow::{Context, Result, bail};

#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Json {
    Null,
    Bool(bool),
    /// The number's text, so large integers convert exactly.
    Number(String),
    String(String),
    Array(Vec<Json>),
    Object(Vec<(String, Json)>),
}

impl Json {
    pub(crate) fn parse(text: &str) -> Result<Json> {
        let mut parser = Parser { bytes: text.as_bytes(), at: 0 };
        let value = parser.value()?;
        parser.skip_space();
        if parser.at != parser.bytes.len() {
            bail!("trailing text after JSON value at byte {}", parser.at);
        }
        Ok(value)
    }

    pub(crate) fn get(&self, key: &str) -> Option<&Json> {
        match self {
            Json::Object(fields) => fields.iter().find(|(name, _)| name == key).map(|(_, value)| value),
            _ => None,
        }
    }

    /// The field `key` as an unsigned integer.
    pub(crate) fn u64_field(&self, key: &str) -> Result<u64> {
        match self.get(key) {
            Some(Json::Number(text)) => text.parse().with_context(|| format!("`{key}` is not a whole number: {text}")),
            Some(other) => bail!("`{key}` is not a number: {other:?}"),
            None => bail!("no `{key}` field"),
        }
    }

    /// The field `key` as text; numbers and booleans are shown as written.
    pub(crate) fn text_field(&self, key: &str) -> Result<String> {
        match self.get(key) {
            Some(Json::String(text) | Json::Number(text)) => Ok(text.clone()),
            Some(Json::Bool(value)) => Ok(value.to_string()),
            Some(other) => bail!("`{key}` is not a scalar: {other:?}"),
            None => bail!("no `{key}` field"),
        }
    }
}

struct Parser<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl Parser<'_> {
    fn skip_space(&mut self) {
        while self.bytes.get(self.at).is_some_and(u8::is_ascii_whitespace) {
            self.at += 1;
        }
    }

    fn peek(&mut self) -> Result<u8> {
        self.skip_space();
        self.bytes.get(self.at).copied().context("JSON ends too early")
    }

    fn expect(&mut self, byte: u8) -> Result<()> {
        if self.peek()? != byte {
            bail!("expected `{}` at byte {}", byte as char, self.at);
        }
        self.at += 1;
        Ok(())
    }

    fn value(&mut self) -> Result<Json> {
        match self.peek()? {
            b'{' => self.object(),
            b'[' => self.array(),
            b'"' => Ok(Json::String(self.string()?)),
            b't' => self.literal("true", Json::Bool(true)),
            b'f' => self.literal("false", Json::Bool(false)),
            b'n' => self.literal("null", Json::Null),
            b'-' | b'0'..=b'9' => Ok(self.number()),
            other => bail!("unexpected `{}` at byte {}", other as char, self.at),
        }
    }

    fn object(&mut self) -> Result<Json> {
        let mut fields = Vec::new();
        self.sequence(b'{', b'}', |parser| {
            parser.skip_space();
            let key = parser.string()?;
            parser.expect(b':')?;
            fields.push((key, parser.value()?));
            Ok(())
        })?;
        Ok(Json::Object(fields))
    }

    fn array(&mut self) -> Result<Json> {
        let mut items = Vec::new();
        self.sequence(b'[', b']', |parser| {
            items.push(parser.value()?);
            Ok(())
        })?;
        Ok(Json::Array(items))
    }

    /// `open`, then `item`s separated by commas, then `close`: an object's
    /// or an array's frame, with `item` parsing each member.
    fn sequence(&mut self, open: u8, close: u8, mut item: impl FnMut(&mut Self) -> Result<()>) -> Result<()> {
        self.expect(open)?;
        if self.peek()? == close {
            self.at += 1;
            return Ok(());
        }
        loop {
            item(self)?;
            match self.peek()? {
                b',' => self.at += 1,
                byte if byte == close => {
                    self.at += 1;
                    return Ok(());
                }
                other => bail!("expected `,` or `{}` at byte {}, got `{}`", close as char, self.at, other as char),
            }
        }
    }

    fn literal(&mut self, word: &str, value: Json) -> Result<Json> {
        if !self.bytes[self.at..].starts_with(word.as_bytes()) {
            bail!("bad literal at byte {}", self.at);
        }
        self.at += word.len();
        Ok(value)
    }

    fn number(&mut self) -> Json {
        let start = self.at;
        while self.bytes.get(self.at).is_some_and(|b| b.is_ascii_digit() || b"+-.eE".contains(b)) {
            self.at += 1;
        }
        Json::Number(String::from_utf8_lossy(&self.bytes[start..self.at]).into_owned())
    }

    fn string(&mut self) -> Result<String> {
        self.expect(b'"')?;
        let mut text = String::new();
        loop {
            let start = self.at;
            while self.bytes.get(self.at).is_some_and(|&b| b != b'"' && b != b'\\') {
                self.at += 1;
            }
            text.push_str(std::str::from_utf8(&self.bytes[start..self.at]).context("JSON string is not UTF-8")?);
            match self.bytes.get(self.at) {
                Some(b'"') => {
                    self.at += 1;
                    return Ok(text);
                }
                Some(b'\\') => {
                    let escape = *self.bytes.get(self.at + 1).context("JSON ends inside an escape")?;
                    self.at += 2;
                    match escape {
                        b'"' => text.push('"'),
                        b'\\' => text.push('\\'),
                        b'/' => text.push('/'),
                        b'b' => text.push('\u{8}'),
                        b'f' => text.push('\u{c}'),
                        b'n' => text.push('\n'),
                        b'r' => text.push('\r'),
                        b't' => text.push('\t'),
                        b'u' => text.push(self.unicode_escape()?),
                        other => bail!("bad escape `\\{}` in JSON string", other as char),
                    }
                }
                _ => bail!("unterminated JSON string"),
            }
        }
    }

    /// The code point after `\u`, joining UTF-16 surrogate pairs.
    fn unicode_escape(&mut self) -> Result<char> {
        let first = self.hex4()?;
        let code = if (0xD800..0xDC00).contains(&first) && self.bytes[self.at..].starts_with(b"\\u") {
            self.at += 2;
            let second = self.hex4()?;
            0x10000 + ((first - 0xD800) << 10) + (second.wrapping_sub(0xDC00) & 0x3FF)
        } else {
            first
        };
        Ok(char::from_u32(code).unwrap_or(char::REPLACEMENT_CHARACTER))
    }

    fn hex4(&mut self) -> Result<u32> {
        let digits = self.bytes.get(self.at..self.at + 4).context("JSON ends inside \\u escape")?;
        let digits = std::str::from_utf8(digits).context("bad \\u escape")?;
        let value = u32::from_str_radix(digits, 16).with_context(|| format!("bad \\u escape `{digits}`"))?;
        self.at += 4;
        Ok(value)
    }
}

#[cfg(test)]
mod tests {
    use super::Json;

    #[test]
    fn reads_a_kiln_summary() {
        let json = Json::parse(
            r#" {"path":"out/a b.img","image_bytes":110100480,"fat_type":"FAT16","ok":true,
                "mode":"0600","nested":{"list":[1,-2.5e3,null]},"escaped":"tab\tq\"\u00e9\ud83d\ude00"} "#,
        )
        .expect("valid JSON");
        assert_eq!(json.u64_field("image_bytes").expect("number"), 110_100_480);
        assert_eq!(json.text_field("fat_type").expect("text"), "FAT16");
        assert_eq!(json.text_field("ok").expect("bool"), "true");
        assert_eq!(json.text_field("escaped").expect("text"), "tab\tq\"é😀");
        assert_eq!(
            json.get("nested").and_then(|nested| nested.get("list")),
            Some(&Json::Array(vec![Json::Number("1".into()), Json::Number("-2.5e3".into()), Json::Null]))
        );
        assert!(json.u64_field("fat_type").is_err());
        assert!(json.u64_field("missing").is_err());
    }

    #[test]
    fn rejects_malformed_input() {
        for bad in ["", "{", r#"{"a" 1}"#, r#"{"a":1,}"#, r#""open"#, "[1 2]", "{} x", "tru"] {
            assert!(Json::parse(bad).is_err(), "accepted {bad:?}");
        }
    }
}
