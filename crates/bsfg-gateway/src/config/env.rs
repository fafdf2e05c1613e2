//! `${VAR}` and `${VAR:-default}` in the zone file's string values.
//!
//! Expansion runs on the parsed document, inside string values only: a variable's value
//! can never add a key, close a quote or change a table, and every problem keeps the
//! span of the string it came from (so `bsfg validate` names its file and line).
//! `$${` writes a literal `${`. A variable that is unset, or set but empty, with no
//! default is a problem; `${VAR:-}` makes an empty default explicit.

use std::borrow::Cow;

use bsfg_core::component::{Checks, DeTable, DeValue, Spanned};

/// Expands every string value of `doc` in place through `lookup` (the process
/// environment in the gateway; a map in tests). Every reference that could not be
/// expanded is recorded in `c` at its value's span and key; the values holding one
/// are left as written.
pub fn expand_table(
    doc: &mut DeTable<'_>,
    lookup: &dyn Fn(&str) -> Option<String>,
    c: &mut Checks,
) {
    table(doc, "", lookup, c);
}

fn join(prefix: &str, key: &str) -> String {
    if prefix.is_empty() {
        key.to_owned()
    } else {
        format!("{prefix}.{key}")
    }
}

fn table(
    t: &mut DeTable<'_>,
    prefix: &str,
    lookup: &dyn Fn(&str) -> Option<String>,
    out: &mut Checks,
) {
    for (k, v) in t.iter_mut() {
        let key = join(prefix, k.get_ref());
        value(v, &key, lookup, out);
    }
}

fn value(
    v: &mut Spanned<DeValue<'_>>,
    key: &str,
    lookup: &dyn Fn(&str) -> Option<String>,
    out: &mut Checks,
) {
    let span = v.span();
    match v.get_mut() {
        DeValue::String(s) if s.contains('$') => match expand(s, lookup) {
            Ok(Some(new)) => *s = Cow::Owned(new),
            Ok(None) => {}
            Err(rules) => {
                for rule in rules {
                    out.at(span.clone(), key, rule);
                }
            }
        },
        DeValue::Array(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                value(item, &format!("{key}[{i}]"), lookup, out);
            }
        }
        DeValue::Table(t) => table(t, key, lookup, out),
        _ => {}
    }
}

fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Expands one string: `Ok(None)` when it holds no reference (nothing to change),
/// `Ok(Some(text))` expanded, `Err(rules)` one rule per reference that failed.
pub fn expand(
    s: &str,
    lookup: &dyn Fn(&str) -> Option<String>,
) -> Result<Option<String>, Vec<String>> {
    if !s.contains("${") {
        return Ok(None);
    }
    let mut out = String::with_capacity(s.len());
    let mut errors = Vec::new();
    let mut rest = s;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at..];
        if let Some(tail) = after.strip_prefix("$${") {
            out.push_str("${");
            rest = tail;
            continue;
        }
        let Some(body_start) = after.strip_prefix("${") else {
            out.push('$');
            rest = &after[1..];
            continue;
        };
        let Some(end) = body_start.find('}') else {
            errors.push("`${` without its closing `}` (write `$${` for a literal `${`)".to_owned());
            rest = "";
            break;
        };
        let body = &body_start[..end];
        rest = &body_start[end + 1..];
        let (name, default) = match body.split_once(":-") {
            Some((n, d)) => (n, Some(d)),
            None => (body, None),
        };
        if !valid_name(name) {
            errors.push(format!(
                "`${{{body}}}`: a variable name is letters, digits and `_`, not starting with a digit (`${{NAME}}` or `${{NAME:-default}}`)"
            ));
            continue;
        }
        match (lookup(name).filter(|v| !v.is_empty()), default) {
            (Some(v), _) => out.push_str(&v),
            (None, Some(d)) => out.push_str(d),
            (None, None) => errors.push(format!(
                "environment variable {name} is not set (or empty) and `${{{name}}}` has no default (write `${{{name}:-default}}` for one)"
            )),
        }
    }
    out.push_str(rest);
    if errors.is_empty() {
        Ok(Some(out))
    } else {
        Err(errors)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        match name {
            "HOST" => Some("10.0.0.5".into()),
            "EMPTY" => Some(String::new()),
            _ => None,
        }
    }

    #[test]
    fn a_set_variable_a_default_and_a_literal_dollar_expand_as_written() {
        let cases = [
            ("${HOST}:7443", "10.0.0.5:7443"),
            ("${MISSING:-127.0.0.1}:7443", "127.0.0.1:7443"),
            ("${HOST:-127.0.0.1}", "10.0.0.5"),
            ("${EMPTY:-fallback}", "fallback"),
            ("${MISSING:-}", ""),
            ("price $5 and $${HOST}", "price $5 and ${HOST}"),
            ("a${HOST}b${HOST}c", "a10.0.0.5b10.0.0.5c"),
        ];
        for (input, want) in cases {
            assert_eq!(expand(input, &env), Ok(Some(want.to_owned())), "{input}");
        }
        assert_eq!(expand("no reference $x", &env), Ok(None));
    }

    #[test]
    fn an_unset_or_empty_variable_without_default_or_a_bad_reference_is_named() {
        for (input, needle) in [
            ("${MISSING}", "MISSING is not set"),
            ("${EMPTY}", "EMPTY is not set (or empty)"),
            ("${1ABC}", "variable name"),
            ("${}", "variable name"),
            ("${HOST", "without its closing"),
        ] {
            let errors = expand(input, &env).expect_err(input);
            assert!(
                errors.iter().any(|e| e.contains(needle)),
                "{input}: {errors:?}"
            );
        }
        let two = expand("${A}/${B}", &env).expect_err("two unset");
        assert_eq!(two.len(), 2, "each reference is reported: {two:?}");
    }
}
