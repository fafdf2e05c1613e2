//! Names that become JetStream stream, consumer or bucket names, or subject tokens.
//!
//! JetStream names may not contain whitespace, `.`, `*`, `>`, path separators or
//! control characters; these checks accept a conservative subset everywhere.

use crate::error::BoundaryError;

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == '-'
}

fn check_name(field: &str, value: &str, max: usize, what: &str) -> Result<(), BoundaryError> {
    if value.is_empty() || value.len() > max || !value.chars().all(is_name_char) {
        return Err(BoundaryError::invalid(
            field,
            format!("{what} must be 1-{max} characters of letters, digits, `_` and `-`"),
        ));
    }
    Ok(())
}

/// A zone name: a configuration string, never an enum (ADR-0025).
pub fn validate_zone(field: &str, value: &str) -> Result<(), BoundaryError> {
    check_name(field, value, 64, "a zone name")
}

/// A durable consumer name.
pub fn validate_consumer(field: &str, value: &str) -> Result<(), BoundaryError> {
    check_name(field, value, 128, "a consumer name")
}

/// An object store bucket name.
pub fn validate_bucket(field: &str, value: &str) -> Result<(), BoundaryError> {
    check_name(field, value, 64, "a bucket name")
}

/// A stream class name (`operational`, `audit`): lowercase, becomes a subject token.
pub fn validate_class(field: &str, value: &str) -> Result<(), BoundaryError> {
    let ok = !value.is_empty()
        && value.len() <= 32
        && value
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if ok {
        Ok(())
    } else {
        Err(BoundaryError::invalid(
            field,
            "a stream class must be 1-32 characters of [a-z0-9_]",
        ))
    }
}

/// An object key: 1-1024 bytes, no control characters, no leading `/`, no `..` segment.
pub fn validate_object_key(field: &str, value: &str) -> Result<(), BoundaryError> {
    let ok = !value.is_empty()
        && value.len() <= 1024
        && !value.starts_with('/')
        && !value.chars().any(|c| c.is_control() || c == '\\')
        && !value.split('/').any(|seg| seg == ".." || seg.is_empty());
    if ok {
        Ok(())
    } else {
        Err(BoundaryError::invalid(
            field,
            "an object key must be 1-1024 bytes with no control characters, backslashes, empty or `..` segments",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_with_dots_wildcards_or_spaces_are_rejected() {
        for bad in ["", "a.b", "a*", "a>", "a b", "ä"] {
            assert!(validate_zone("z", bad).is_err(), "{bad:?}");
            assert!(validate_consumer("c", bad).is_err(), "{bad:?}");
        }
        validate_zone("z", "plant-a_1").expect("valid");
    }

    #[test]
    fn object_keys_reject_traversal() {
        for bad in ["", "/abs", "a/../b", "a//b", "a\\b"] {
            assert!(validate_object_key("k", bad).is_err(), "{bad:?}");
        }
        validate_object_key("k", "B1042/report.v2.pdf").expect("valid");
    }
}
