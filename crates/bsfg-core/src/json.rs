//! Strict JSON for `object_json`: what is accepted is stored exactly, as its RFC 8785
//! canonical form, or refused with the JSON path and the rule. Nothing is rounded,
//! merged or dropped on the way.
//!
//! RFC 8785 (JCS) is defined on I-JSON (RFC 7493), so the boundary applies I-JSON's
//! rules on top of RFC 8259 syntax:
//! - **numbers** must survive the trip through an IEEE 754 double: the canonical form
//!   (the shortest decimal that reads back as the same double) must have the same
//!   decimal value as the text sent. `3.0` and `3`, `1e2` and `100`, `0.1` pass;
//!   `9007199254740993`, a nanosecond timestamp such as `1764000000123456789`, or
//!   `0.10000000000000000001` would change value and are refused with a hint to send
//!   them as strings. Out-of-range numbers (`1e400`) are refused too. `-0` is stored
//!   as `0` (the same value).
//! - **object keys** must be unique after unescaping (`{"a":1,"\u0061":2}` is a
//!   duplicate); RFC 8259 leaves duplicates undefined and parsers disagree on them.
//! - **strings** must be valid Unicode (no lone surrogate escapes).
//! - **nesting** is at most [`MAX_DEPTH`] levels.
//!
//! Errors are `invalid_argument` with the field `fact.object_json` followed by the
//! path of the offending value (`fact.object_json.readings[3].ts_ns`).

use std::collections::HashSet;
use std::fmt::Write as _;

use crate::error::BoundaryError;

/// Deepest nesting of arrays and objects accepted (serde_json's own limit).
pub const MAX_DEPTH: usize = 128;

/// Parses `json` strictly (see the module docs) and returns its RFC 8785 canonical
/// form. `field` prefixes the path in errors.
pub fn canonicalize(field: &str, json: &str) -> Result<String, BoundaryError> {
    let mut checker = Checker {
        text: json.as_bytes(),
        pos: 0,
        path: field.to_owned(),
    };
    let value: serde_json::Value = match serde_json::from_str(json) {
        Ok(v) => v,
        Err(e) => {
            // serde_json refuses some values our rules explain better, with a path
            // (a number out of range); its own message is kept for syntax errors.
            return Err(match checker.value(0) {
                Err(BoundaryError::InvalidArgument { field, rule })
                    if !rule.starts_with("must be valid JSON") =>
                {
                    BoundaryError::InvalidArgument { field, rule }
                }
                _ => BoundaryError::invalid(field, format!("must be valid JSON: {e}")),
            });
        }
    };
    checker.value(0)?;
    serde_json_canonicalizer::to_string(&value)
        .map_err(|e| BoundaryError::invalid(field, format!("cannot be canonicalized: {e}")))
}

/// Walks text serde_json already accepted (so syntax holds), checking the I-JSON
/// rules serde_json does not: number exactness and duplicate keys. Defensive anyway:
/// unexpected bytes are reported, never panicked on.
struct Checker<'a> {
    text: &'a [u8],
    pos: usize,
    /// Path of the value being checked, `fact.object_json.a[2]`.
    path: String,
}

impl Checker<'_> {
    fn err(&self, rule: impl Into<String>) -> BoundaryError {
        BoundaryError::invalid(self.path.clone(), rule)
    }

    fn peek(&self) -> Option<u8> {
        self.text.get(self.pos).copied()
    }

    fn skip_ws(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.pos += 1;
        }
    }

    fn expect(&mut self, b: u8) -> Result<(), BoundaryError> {
        self.skip_ws();
        if self.peek() == Some(b) {
            self.pos += 1;
            Ok(())
        } else {
            Err(self.err(format!("must be valid JSON: expected `{}`", b as char)))
        }
    }

    fn value(&mut self, depth: usize) -> Result<(), BoundaryError> {
        self.skip_ws();
        match self.peek() {
            Some(b'{') => self.object(depth + 1),
            Some(b'[') => self.array(depth + 1),
            Some(b'"') => self.string().map(|_| ()),
            Some(b'-' | b'0'..=b'9') => self.number(),
            Some(b't') => self.literal(b"true"),
            Some(b'f') => self.literal(b"false"),
            Some(b'n') => self.literal(b"null"),
            _ => Err(self.err("must be valid JSON: expected a value")),
        }
    }

    fn literal(&mut self, word: &[u8]) -> Result<(), BoundaryError> {
        if self.text[self.pos..].starts_with(word) {
            self.pos += word.len();
            Ok(())
        } else {
            Err(self.err("must be valid JSON: bad literal"))
        }
    }

    fn nest(&self, depth: usize) -> Result<(), BoundaryError> {
        if depth > MAX_DEPTH {
            Err(self.err(format!(
                "must not nest arrays and objects deeper than {MAX_DEPTH} levels"
            )))
        } else {
            Ok(())
        }
    }

    /// Opens an array or object at `depth`; true when it closes at once (empty).
    fn open(&mut self, open: u8, close: u8, depth: usize) -> Result<bool, BoundaryError> {
        self.nest(depth)?;
        self.expect(open)?;
        self.skip_ws();
        let empty = self.peek() == Some(close);
        if empty {
            self.pos += 1;
        }
        Ok(empty)
    }

    /// After an element: true at `close` (consumed), false after a `,`.
    fn closes(&mut self, close: u8) -> Result<bool, BoundaryError> {
        self.skip_ws();
        match self.peek() {
            Some(b',') => {
                self.pos += 1;
                Ok(false)
            }
            Some(c) if c == close => {
                self.pos += 1;
                Ok(true)
            }
            _ => Err(self.err(format!(
                "must be valid JSON: expected `,` or `{}`",
                close as char
            ))),
        }
    }

    fn object(&mut self, depth: usize) -> Result<(), BoundaryError> {
        if self.open(b'{', b'}', depth)? {
            return Ok(());
        }
        let mut keys = HashSet::new();
        loop {
            self.skip_ws();
            let key = self.string()?;
            self.expect(b':')?;
            let outer = self.path.len();
            push_key(&mut self.path, &key);
            if !keys.insert(key) {
                return Err(self.err(
                    "duplicate object key: each key may appear once (I-JSON, RFC 7493 section 2.3); the value would otherwise be silently dropped",
                ));
            }
            self.value(depth)?;
            self.path.truncate(outer);
            if self.closes(b'}')? {
                return Ok(());
            }
        }
    }

    fn array(&mut self, depth: usize) -> Result<(), BoundaryError> {
        if self.open(b'[', b']', depth)? {
            return Ok(());
        }
        for i in 0usize.. {
            let outer = self.path.len();
            let _ = write!(self.path, "[{i}]");
            self.value(depth)?;
            self.path.truncate(outer);
            if self.closes(b']')? {
                break;
            }
        }
        Ok(())
    }

    /// Reads a string and returns it unescaped (keys are compared unescaped).
    fn string(&mut self) -> Result<String, BoundaryError> {
        if self.peek() != Some(b'"') {
            return Err(self.err("must be valid JSON: expected a string"));
        }
        self.pos += 1;
        let mut out = String::new();
        let mut run = self.pos;
        loop {
            match self.peek() {
                None => return Err(self.err("must be valid JSON: unterminated string")),
                Some(b'"') => {
                    out.push_str(self.slice(run, self.pos)?);
                    self.pos += 1;
                    return Ok(out);
                }
                Some(b'\\') => {
                    out.push_str(self.slice(run, self.pos)?);
                    self.pos += 1;
                    let c = self.escape()?;
                    out.push(c);
                    run = self.pos;
                }
                Some(_) => self.pos += 1,
            }
        }
    }

    fn slice(&self, from: usize, to: usize) -> Result<&str, BoundaryError> {
        std::str::from_utf8(&self.text[from..to])
            .map_err(|_| self.err("must be valid JSON: not UTF-8"))
    }

    fn escape(&mut self) -> Result<char, BoundaryError> {
        let Some(b) = self.peek() else {
            return Err(self.err("must be valid JSON: unterminated escape"));
        };
        self.pos += 1;
        Ok(match b {
            b'"' => '"',
            b'\\' => '\\',
            b'/' => '/',
            b'b' => '\u{8}',
            b'f' => '\u{c}',
            b'n' => '\n',
            b'r' => '\r',
            b't' => '\t',
            b'u' => {
                let hi = self.hex4()?;
                let code = if (0xD800..0xDC00).contains(&hi) {
                    if !self.text[self.pos..].starts_with(b"\\u") {
                        return Err(self.lone_surrogate());
                    }
                    self.pos += 2;
                    let lo = self.hex4()?;
                    if !(0xDC00..0xE000).contains(&lo) {
                        return Err(self.lone_surrogate());
                    }
                    0x10000 + ((hi - 0xD800) << 10) + (lo - 0xDC00)
                } else {
                    hi
                };
                char::from_u32(code).ok_or_else(|| self.lone_surrogate())?
            }
            _ => return Err(self.err("must be valid JSON: unknown escape")),
        })
    }

    fn lone_surrogate(&self) -> BoundaryError {
        self.err("strings must be valid Unicode: a lone surrogate escape is not a character")
    }

    fn hex4(&mut self) -> Result<u32, BoundaryError> {
        let digits = self
            .text
            .get(self.pos..self.pos + 4)
            .and_then(|d| std::str::from_utf8(d).ok())
            .and_then(|d| u32::from_str_radix(d, 16).ok())
            .ok_or_else(|| self.err("must be valid JSON: bad \\u escape"))?;
        self.pos += 4;
        Ok(digits)
    }

    fn number(&mut self) -> Result<(), BoundaryError> {
        let start = self.pos;
        while matches!(
            self.peek(),
            Some(b'-' | b'+' | b'.' | b'e' | b'E' | b'0'..=b'9')
        ) {
            self.pos += 1;
        }
        let text = self.slice(start, self.pos)?;
        check_number(text).map_err(|rule| self.err(rule))
    }
}

/// Appends `.key` (or `["key"]` when the key is not a plain identifier) to a path.
fn push_key(path: &mut String, key: &str) {
    let plain = !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if plain {
        path.push('.');
        path.push_str(key);
    } else {
        path.push('[');
        path.push_str(&serde_json::Value::String(key.to_owned()).to_string());
        path.push(']');
    }
}

/// Checks that the canonical form of the number `text` has the same decimal value.
fn check_number(text: &str) -> Result<(), String> {
    let hint = "send it as a JSON string to keep every digit";
    let value: f64 = text
        .parse()
        .map_err(|_| format!("number `{}` is not a JSON number", shorten(text)))?;
    if !value.is_finite() {
        return Err(format!(
            "number `{}` is outside the range of an IEEE 754 double (I-JSON, RFC 7493); {hint}",
            shorten(text)
        ));
    }
    let mut buf = ryu_js::Buffer::new();
    let canonical = buf.format_finite(value);
    if decimal(text) == decimal(canonical) {
        return Ok(());
    }
    Err(format!(
        "number `{}` cannot be held exactly by an IEEE 754 double (I-JSON, RFC 7493: integers up to 2^53, about 15 significant digits) and would be stored as `{canonical}`; {hint}",
        shorten(text)
    ))
}

fn shorten(text: &str) -> String {
    if text.len() <= 64 {
        text.to_owned()
    } else {
        format!("{}...({} characters)", &text[..48], text.len())
    }
}

/// The exact decimal value of a number's text, normalized: sign, significant digits
/// (no leading or trailing zeros) and the exponent of the last digit. Zero is
/// `(false, "", 0)` whatever its sign. `None` when the exponent does not fit.
fn decimal(text: &str) -> Option<(bool, String, i64)> {
    let (negative, rest) = match text.strip_prefix('-') {
        Some(r) => (true, r),
        None => (false, text),
    };
    let (mantissa, exponent) = match rest.find(['e', 'E']) {
        Some(i) => (&rest[..i], &rest[i + 1..]),
        None => (rest, "0"),
    };
    let (int, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    let mut digits: String = int.chars().chain(frac.chars()).collect();
    let leading = digits.len() - digits.trim_start_matches('0').len();
    digits.drain(..leading);
    let trailing = digits.len() - digits.trim_end_matches('0').len();
    digits.truncate(digits.len() - trailing);
    if digits.is_empty() {
        return Some((false, String::new(), 0));
    }
    let exponent: i64 = exponent.parse().ok()?;
    let exp = exponent
        .checked_sub(i64::try_from(frac.len()).ok()?)?
        .checked_add(i64::try_from(trailing).ok()?)?;
    Some((negative, digits, exp))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(json: &str) -> String {
        canonicalize("fact.object_json", json).unwrap_or_else(|e| panic!("{json}: {e}"))
    }

    fn refused(json: &str) -> (String, String) {
        match canonicalize("fact.object_json", json) {
            Err(BoundaryError::InvalidArgument { field, rule }) => (field, rule),
            other => panic!("{json} must be refused, got {other:?}"),
        }
    }

    #[test]
    fn numbers_a_double_holds_exactly_are_kept_in_canonical_form() {
        assert_eq!(
            ok("[3.0, 1e2, 0.1, -0, 9007199254740992, 1.5E-7, 1E21, 125e-6]"),
            "[3,100,0.1,0,9007199254740992,1.5e-7,1e+21,0.000125]"
        );
    }

    #[test]
    fn sixty_four_bit_integers_beyond_two_to_the_53_are_refused_with_their_path_and_a_hint() {
        let (field, rule) = refused(r#"{"ts_ns": 1764000000123456789, "id": 1}"#);
        assert_eq!(field, "fact.object_json.ts_ns");
        assert!(rule.contains("1764000000123456800"), "{rule}");
        assert!(rule.contains("as a JSON string"), "{rule}");
        let (field, _) = refused(r#"{"a": {"ids": [1, 9007199254740993]}}"#);
        assert_eq!(field, "fact.object_json.a.ids[1]");
        let (field, _) = refused("-9223372036854775807");
        assert_eq!(field, "fact.object_json");
    }

    #[test]
    fn big_decimals_and_out_of_range_numbers_are_refused() {
        for n in [
            "0.10000000000000000001",
            "3.141592653589793238462643383279",
            "1e400",
            "-1e400",
            "123456789012345678901234567890",
        ] {
            let (field, rule) = refused(&format!("{{\"v\":{n}}}"));
            assert_eq!(field, "fact.object_json.v", "{n}");
            assert!(rule.contains("double"), "{n}: {rule}");
        }
        // Underflow to zero is a change of value too.
        refused("1e-400");
        assert_eq!(ok("0e999999999999999999"), "0");
    }

    #[test]
    fn duplicate_keys_are_refused_even_when_spelled_with_escapes() {
        let (field, rule) = refused(r#"{"x": 1, "x": 2}"#);
        assert_eq!(field, "fact.object_json.x");
        assert!(rule.contains("duplicate object key"), "{rule}");
        let (field, _) = refused(r#"{"o": [{"a": 1, "\u0061": 2}]}"#);
        assert_eq!(field, "fact.object_json.o[0].a");
        let (field, _) = refused(r#"{"weird key": {"k":1, "k":1}}"#);
        assert_eq!(field, r#"fact.object_json["weird key"].k"#);
        // The same key in different objects is fine.
        assert_eq!(ok(r#"[{"a":1},{"a":2}]"#), r#"[{"a":1},{"a":2}]"#);
    }

    #[test]
    fn lone_surrogates_are_refused_and_pairs_kept() {
        assert!(canonicalize("f", r#"["\ud800"]"#).is_err());
        assert!(canonicalize("f", r#"{"\udc00x": 1}"#).is_err());
        assert_eq!(ok(r#""\ud83d\ude00\u00e9\/""#), "\"😀é/\"");
    }

    #[test]
    fn nesting_up_to_the_limit_is_kept_and_deeper_is_refused() {
        let depth = MAX_DEPTH - 1;
        let deep = format!("{}1{}", "[".repeat(depth), "]".repeat(depth));
        assert_eq!(ok(&deep), deep);
        let (_, rule) = refused(&format!("{}1{}", "[".repeat(200), "]".repeat(200)));
        assert!(rule.contains("JSON") || rule.contains("deeper"), "{rule}");
    }

    #[test]
    fn every_escape_round_trips_to_the_canonical_escapes() {
        assert_eq!(
            ok(r#""\"\\\/\b\f\n\r\t\u0001\u001f\u007f""#),
            "\"\\\"\\\\/\\b\\f\\n\\r\\t\\u0001\\u001f\u{7f}\""
        );
    }

    #[test]
    fn decimal_values_compare_by_value_not_spelling() {
        assert_eq!(decimal("100"), decimal("1e2"));
        assert_eq!(decimal("0.0100"), decimal("1e-2"));
        assert_eq!(decimal("-0.0"), decimal("0"));
        assert_ne!(decimal("-1"), decimal("1"));
        assert_eq!(decimal("1e99999999999999999999"), None);
    }
}
