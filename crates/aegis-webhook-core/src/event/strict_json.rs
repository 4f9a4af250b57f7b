//! JSON reading that refuses an object with the same key twice, which
//! `serde_json::Value` would otherwise settle silently by keeping the last one.
//!
//! serde_json has no switch for this, so a small `Visitor` builds the `Value`
//! itself and checks each key against the object read so far. The crates that
//! do the same are young single-author ones or live inside larger projects, and
//! none names the repeated key's JSON path, which the intake's messages need.
//! Depth stays bounded by serde_json's own recursion limit (128), which applies
//! to every nested `deserialize_any`.

use std::cell::RefCell;
use std::fmt;

use serde::de::{self, DeserializeSeed, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Number, Value};

use super::excerpt;

/// Why a document was not read.
#[derive(Debug)]
pub(super) enum StrictJsonError {
    /// Not JSON: serde_json's own message, with line and column.
    Syntax(serde_json::Error),
    /// Well-formed JSON with a key repeated in one object: the key's JSON path
    /// ("data.cveId").
    DuplicateKey(String),
}

/// Reads one JSON document into a `Value`, refusing duplicate keys at every
/// depth. Syntax comes first: a document that is not JSON is `Syntax` even if it
/// also repeats a key, so the two kinds of refusal stay apart.
pub(super) fn from_slice(bytes: &[u8]) -> Result<Value, StrictJsonError> {
    let duplicate = RefCell::new(None);
    let mut deserializer = serde_json::Deserializer::from_slice(bytes);
    let value = ValueSeed {
        path: Path::Root,
        duplicate: &duplicate,
    }
    .deserialize(&mut deserializer)
    .and_then(|value| deserializer.end().map(|()| value))
    .map_err(StrictJsonError::Syntax)?;
    match duplicate.into_inner() {
        Some(path) => Err(StrictJsonError::DuplicateKey(path)),
        None => Ok(value),
    }
}

/// Where a value sits in the document, kept as a chain on the stack and only
/// formatted when a key turns out to be repeated.
#[derive(Clone, Copy)]
enum Path<'a> {
    Root,
    Key(&'a Path<'a>, &'a str),
    Index(&'a Path<'a>, usize),
}

impl fmt::Display for Path<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Path::Root => Ok(()),
            Path::Key(Path::Root, key) => f.write_str(&excerpt(key)),
            Path::Key(parent, key) => write!(f, "{parent}.{}", excerpt(key)),
            Path::Index(parent, index) => write!(f, "{parent}[{index}]"),
        }
    }
}

/// Reads the value at `path`. The first duplicate found is recorded in
/// `duplicate` and reading goes on, so a syntax error further on still wins.
struct ValueSeed<'p, 'd> {
    path: Path<'p>,
    duplicate: &'d RefCell<Option<String>>,
}

impl<'de> DeserializeSeed<'de> for ValueSeed<'_, '_> {
    type Value = Value;

    fn deserialize<D: de::Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

// Mirrors serde_json's own `Value` visitor (without `arbitrary_precision`, which
// this workspace does not enable), with a path for the nested values.
impl<'de> Visitor<'de> for ValueSeed<'_, '_> {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, value: bool) -> Result<Value, E> {
        Ok(Value::Bool(value))
    }

    fn visit_i64<E>(self, value: i64) -> Result<Value, E> {
        Ok(Value::Number(value.into()))
    }

    fn visit_u64<E>(self, value: u64) -> Result<Value, E> {
        Ok(Value::Number(value.into()))
    }

    fn visit_f64<E>(self, value: f64) -> Result<Value, E> {
        Ok(Number::from_f64(value).map_or(Value::Null, Value::Number))
    }

    fn visit_str<E>(self, value: &str) -> Result<Value, E> {
        Ok(Value::String(value.to_owned()))
    }

    fn visit_string<E>(self, value: String) -> Result<Value, E> {
        Ok(Value::String(value))
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::new();
        loop {
            let seed = ValueSeed {
                path: Path::Index(&self.path, items.len()),
                duplicate: self.duplicate,
            };
            match seq.next_element_seed(seed)? {
                Some(item) => items.push(item),
                None => return Ok(Value::Array(items)),
            }
        }
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut object = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            let seed = ValueSeed {
                path: Path::Key(&self.path, &key),
                duplicate: self.duplicate,
            };
            if object.contains_key(&key) {
                let mut duplicate = self.duplicate.borrow_mut();
                if duplicate.is_none() {
                    *duplicate = Some(seed.path.to_string());
                }
            }
            let value = map.next_value_seed(seed)?;
            object.insert(key, value);
        }
        Ok(Value::Object(object))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn duplicate(json: &str) -> Option<String> {
        match from_slice(json.as_bytes()) {
            Err(StrictJsonError::DuplicateKey(path)) => Some(path),
            Err(StrictJsonError::Syntax(error)) => panic!("{json}: not JSON: {error}"),
            Ok(_) => None,
        }
    }

    #[test]
    fn reads_the_same_value_as_serde_json() {
        let text = r#"{"a":[1,-2,3.5,1e300,"x\u00e9",true,false,null,{}],"b":{"c":{"d":[]}},"e":18446744073709551615}"#;
        let strict = from_slice(text.as_bytes()).expect("valid");
        let loose: Value = serde_json::from_str(text).expect("valid");
        assert_eq!(strict, loose);
    }

    #[test]
    fn a_repeated_key_is_named_by_its_path_at_any_depth() {
        assert_eq!(duplicate(r#"{"a":1,"a":2}"#).as_deref(), Some("a"));
        assert_eq!(
            duplicate(r#"{"data":{"cveId":"x","cveId":"y"}}"#).as_deref(),
            Some("data.cveId")
        );
        assert_eq!(
            duplicate(r#"{"data":{"component":{"name":"a","version":"1","name":"b"}}}"#).as_deref(),
            Some("data.component.name")
        );
        assert_eq!(duplicate(r#"{"x":[{},{"k":1,"k":1}]}"#).as_deref(), Some("x[1].k"));
        assert_eq!(duplicate(r#"[{"k":1,"k":1}]"#).as_deref(), Some("[0].k"));
        assert_eq!(duplicate(r#"{"a":{"k":1},"b":{"k":1}}"#), None, "keys are per object");
    }

    #[test]
    fn the_first_duplicate_is_reported() {
        assert_eq!(duplicate(r#"{"a":1,"b":1,"b":2,"a":2}"#).as_deref(), Some("b"));
    }

    #[test]
    fn a_syntax_error_wins_over_a_duplicate_before_it() {
        assert!(matches!(
            from_slice(br#"{"a":1,"a":2"#),
            Err(StrictJsonError::Syntax(_))
        ));
        assert!(matches!(
            from_slice(br#"{"a":1,"a":2}}"#),
            Err(StrictJsonError::Syntax(_))
        ));
    }

    #[test]
    fn a_long_key_is_shortened_in_the_path() {
        let key = "k".repeat(10_000);
        let path = duplicate(&format!(r#"{{"{key}":1,"{key}":2}}"#)).expect("duplicate");
        assert!(path.len() < 100, "{path}");
    }

    #[test]
    fn nesting_stays_bounded_by_serde_jsons_recursion_limit() {
        let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
        assert!(matches!(from_slice(deep.as_bytes()), Err(StrictJsonError::Syntax(_))));
    }
}
