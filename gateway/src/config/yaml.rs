//! How the config file is read: serde-saphyr into derived types (the config's are in
//! `schema.rs`), through wrappers that keep reading after a mistake. This module knows no config
//! key: the scalar kinds beyond strings and booleans are `units.rs`'s.
//!
//! serde stops at the first error, but operators want every mistake of a file in one go. So no
//! value of the schema can make deserialization fail: a scalar is a [`Val`] holding its parsed
//! value or what is wrong with it, a mapping is a [`Sect`] that sets unknown and repeated keys
//! aside (with their lines) before the derived code sees them, a list is a [`List`], a free-form
//! mapping (labels, tags) is a [`Pairs`]. Each remembers its line. The validation pass then walks
//! the typed result, reports what these wrappers kept, and checks what only the whole file can
//! tell. Only a YAML syntax error stops the reading.

use serde::de::{
    self, DeserializeSeed, Deserializer, IgnoredAny, IntoDeserializer, MapAccess, SeqAccess,
    Visitor,
};
use serde::Deserialize;
use serde_saphyr::{MessageFormatter, Spanned};
use std::fmt;
use std::marker::PhantomData;

/// Parses `text`, a single YAML document, into `T`. The error is a syntax error (or more than
/// one document): its message and, when known, its 1-based line.
pub fn from_str<T: de::DeserializeOwned>(text: &str) -> Result<T, (Option<usize>, String)> {
    let options = serde_saphyr::options! {
        // YAML 1.2 booleans only: `yes`, `on` or `y` stay strings, as the YAML 1.2 core schema
        // (and every earlier podgate) reads them.
        strict_booleans: true,
        // A repeated key reaches [`Sect`] (which reports it) or [`Pairs`] (where the last value
        // counts). As with the saphyr tree podgate read before, a `<<` key is an ordinary (so
        // unknown) key, and a tag podgate does not know is a mistake.
        duplicate_keys: serde_saphyr::DuplicateKeyPolicy::PassThrough,
        merge_keys: serde_saphyr::MergeKeyPolicy::AsOrdinary,
        reject_unsupported_tags: true,
        with_snippet: false,
    };
    serde_saphyr::from_str_with_options(text, options).map_err(|e| {
        let e = e.without_snippet();
        let message = match e {
            serde_saphyr::Error::MultipleDocuments { .. } => {
                "expected one YAML document, found several".to_string()
            }
            _ => format!(
                "YAML syntax error: {}",
                serde_saphyr::DefaultMessageFormatter.format_message(e)
            ),
        };
        (e.location().map(|l| l.line() as usize), message)
    })
}

/// One YAML scalar as the file spells it, before a field gives it a meaning. A list or mapping
/// found where a scalar belongs is skipped and remembered by its kind only.
#[derive(Clone, Debug, PartialEq)]
pub enum Scalar {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    List,
    Map,
}

impl Scalar {
    /// What the user wrote, in words, for messages like "expected a string, found a number".
    pub fn kind(&self) -> &'static str {
        match self {
            Scalar::Null => "null",
            Scalar::Bool(_) => "a boolean",
            Scalar::Int(_) | Scalar::Float(_) => "a number",
            Scalar::Str(_) => "a string",
            Scalar::List => "a list",
            Scalar::Map => "a mapping",
        }
    }

    /// Any scalar but null as text: label values like `v1` and `2` are both meant as strings.
    pub fn text(&self) -> Option<String> {
        match self {
            Scalar::Bool(b) => Some(b.to_string()),
            Scalar::Int(i) => Some(i.to_string()),
            Scalar::Float(f) => Some(f.to_string()),
            Scalar::Str(s) => Some(s.clone()),
            Scalar::Null | Scalar::List | Scalar::Map => None,
        }
    }
}

/// What a wrapper makes of a mapping or a list. A wrapper expects one of the two; the other,
/// and any scalar, is skipped and kept as the kind found (`Err("a list")`).
trait Shape<'de>: Sized {
    fn map<A: MapAccess<'de>>(mut map: A) -> Result<Result<Self, &'static str>, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(Err("a mapping"))
    }
    fn seq<A: SeqAccess<'de>>(mut seq: A) -> Result<Result<Self, &'static str>, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Err("a list"))
    }
}

/// Reads any node as `T`'s shape, with the node's 1-based line. Never fails on well-formed YAML.
fn shaped<'de, T: Shape<'de>, D: Deserializer<'de>>(
    d: D,
) -> Result<(usize, Result<T, &'static str>), D::Error> {
    struct Shaped<T>(Result<T, &'static str>);
    struct V<T>(PhantomData<T>);
    impl<'de, T: Shape<'de>> Visitor<'de> for V<T> {
        type Value = Shaped<T>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("any YAML value")
        }
        fn visit_bool<E: de::Error>(self, _: bool) -> Result<Shaped<T>, E> {
            Ok(Shaped(Err("a boolean")))
        }
        fn visit_i64<E: de::Error>(self, _: i64) -> Result<Shaped<T>, E> {
            Ok(Shaped(Err("a number")))
        }
        fn visit_u64<E: de::Error>(self, _: u64) -> Result<Shaped<T>, E> {
            Ok(Shaped(Err("a number")))
        }
        fn visit_f64<E: de::Error>(self, _: f64) -> Result<Shaped<T>, E> {
            Ok(Shaped(Err("a number")))
        }
        fn visit_str<E: de::Error>(self, _: &str) -> Result<Shaped<T>, E> {
            Ok(Shaped(Err("a string")))
        }
        fn visit_unit<E: de::Error>(self) -> Result<Shaped<T>, E> {
            Ok(Shaped(Err("null")))
        }
        fn visit_none<E: de::Error>(self) -> Result<Shaped<T>, E> {
            Ok(Shaped(Err("null")))
        }
        fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Shaped<T>, D::Error> {
            d.deserialize_any(self)
        }
        fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Shaped<T>, A::Error> {
            T::seq(seq).map(Shaped)
        }
        fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Shaped<T>, A::Error> {
            T::map(map).map(Shaped)
        }
    }
    impl<'de, T: Shape<'de>> Deserialize<'de> for Shaped<T> {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            d.deserialize_any(V(PhantomData))
        }
    }
    let s = Spanned::<Shaped<T>>::deserialize(d)?;
    Ok((s.defined.line() as usize, s.value.0))
}

impl<'de> Deserialize<'de> for Scalar {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Scalar;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any YAML value")
            }
            fn visit_bool<E: de::Error>(self, b: bool) -> Result<Scalar, E> {
                Ok(Scalar::Bool(b))
            }
            fn visit_i64<E: de::Error>(self, i: i64) -> Result<Scalar, E> {
                Ok(Scalar::Int(i))
            }
            fn visit_u64<E: de::Error>(self, u: u64) -> Result<Scalar, E> {
                Ok(i64::try_from(u).map_or(Scalar::Float(u as f64), Scalar::Int))
            }
            fn visit_f64<E: de::Error>(self, f: f64) -> Result<Scalar, E> {
                Ok(Scalar::Float(f))
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Scalar, E> {
                Ok(Scalar::Str(s.to_string()))
            }
            fn visit_string<E: de::Error>(self, s: String) -> Result<Scalar, E> {
                Ok(Scalar::Str(s))
            }
            fn visit_unit<E: de::Error>(self) -> Result<Scalar, E> {
                Ok(Scalar::Null)
            }
            fn visit_none<E: de::Error>(self) -> Result<Scalar, E> {
                Ok(Scalar::Null)
            }
            fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Scalar, D::Error> {
                Scalar::deserialize(d)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Scalar, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(Scalar::List)
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Scalar, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(Scalar::Map)
            }
        }
        d.deserialize_any(V)
    }
}

/// A type written as one scalar: its rules, and what to tell the user when the scalar breaks
/// them (the field path and line are added by the caller).
pub trait Leaf: Sized {
    fn from_scalar(s: Scalar) -> Result<Self, String>;
}

impl Leaf for String {
    fn from_scalar(s: Scalar) -> Result<Self, String> {
        match s {
            Scalar::Str(s) => Ok(s),
            other => Err(format!("expected a string, found {}", other.kind())),
        }
    }
}

impl Leaf for bool {
    fn from_scalar(s: Scalar) -> Result<Self, String> {
        match s {
            Scalar::Bool(b) => Ok(b),
            other => Err(format!("expected true or false, found {}", other.kind())),
        }
    }
}

/// A scalar field: its line, and its value or what is wrong with it.
#[derive(Clone, Debug, PartialEq)]
pub struct Val<T> {
    pub line: usize,
    pub value: Result<T, String>,
}

impl<'de, T: Leaf> Deserialize<'de> for Val<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = Spanned::<Scalar>::deserialize(d)?;
        Ok(Val {
            line: s.defined.line() as usize,
            value: T::from_scalar(s.value),
        })
    }
}

/// A mistake inside a mapping that its derived type never saw: an unknown or repeated key, a
/// key that is not a string. `key` extends the mapping's field path when there is one.
#[derive(Clone, Debug, PartialEq)]
pub struct Problem {
    pub line: usize,
    pub key: Option<String>,
    pub message: String,
}

/// A mapping read into the derived struct `T`: its line (that of its first key), `T` unless the
/// file had something else than a mapping here, and the keys that were set aside.
#[derive(Clone, Debug, PartialEq)]
pub struct Sect<T> {
    pub line: usize,
    /// `Err(kind)` when the file holds a scalar or list here.
    pub value: Result<T, &'static str>,
    pub problems: Vec<Problem>,
}

/// A mapping as a derived struct, and the keys set aside on the way.
struct Body<T>(T, Vec<Problem>);

impl<'de, T: Deserialize<'de>> Shape<'de> for Body<T> {
    fn map<A: MapAccess<'de>>(mut map: A) -> Result<Result<Self, &'static str>, A::Error> {
        let mut problems = Vec::new();
        let fields = Fields {
            map: &mut map,
            problems: &mut problems,
        };
        Ok(Ok(Body(T::deserialize(fields)?, problems)))
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Sect<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let (line, body) = shaped::<Body<T>, D>(d)?;
        let (value, problems) = match body {
            Ok(Body(value, problems)) => (Ok(value), problems),
            Err(kind) => (Err(kind), Vec::new()),
        };
        Ok(Sect {
            line,
            value,
            problems,
        })
    }
}

/// Hands a mapping to a derived struct, minus the keys the struct does not have. The field
/// names come from serde derive itself (the `fields` of `deserialize_struct`), so the struct
/// declaration is the single list of allowed keys; `deny_unknown_fields` on it stays a backstop.
struct Fields<'a, A> {
    map: &'a mut A,
    problems: &'a mut Vec<Problem>,
}

impl<'de, A: MapAccess<'de>> Deserializer<'de> for Fields<'_, A> {
    type Error = A::Error;

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, A::Error> {
        visitor.visit_map(KnownKeys {
            map: self.map,
            fields,
            seen: Vec::new(),
            problems: self.problems,
        })
    }

    /// Only structs go through here; anything else sees a mapping with no allowed key.
    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, A::Error> {
        self.deserialize_struct("", &[], visitor)
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        option unit unit_struct newtype_struct seq tuple tuple_struct map enum identifier
        ignored_any
    }
}

struct KnownKeys<'a, A> {
    map: &'a mut A,
    fields: &'static [&'static str],
    seen: Vec<String>,
    problems: &'a mut Vec<Problem>,
}

impl<'de, A: MapAccess<'de>> MapAccess<'de> for KnownKeys<'_, A> {
    type Error = A::Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, A::Error> {
        while let Some(key) = self.map.next_key::<Spanned<Scalar>>()? {
            let line = key.defined.line() as usize;
            let (key, message) = match key.value {
                Scalar::Str(k) if !self.fields.contains(&k.as_str()) => {
                    let known = self.fields.join(", ");
                    (Some(k), format!("unknown key (expected one of: {known})"))
                }
                // serde-saphyr passes a repeated key through (the derived code would stop at
                // it): it is reported and its later value set aside.
                Scalar::Str(k) if self.seen.contains(&k) => (Some(k), "key given twice".into()),
                Scalar::Str(k) => {
                    self.seen.push(k.clone());
                    return seed.deserialize(k.into_deserializer()).map(Some);
                }
                other => (
                    None,
                    format!("keys must be strings, found {}", other.kind()),
                ),
            };
            self.problems.push(Problem { line, key, message });
            self.map.next_value::<IgnoredAny>()?;
        }
        Ok(None)
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, A::Error> {
        self.map.next_value_seed(seed)
    }
}

/// A list of `T` (itself a wrapper, so no item can fail), or the kind found instead.
#[derive(Clone, Debug, PartialEq)]
pub struct List<T> {
    pub line: usize,
    pub items: Result<Vec<T>, &'static str>,
}

impl<'de, T: Deserialize<'de>> Shape<'de> for Vec<T> {
    fn seq<A: SeqAccess<'de>>(mut seq: A) -> Result<Result<Self, &'static str>, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element()? {
            items.push(item);
        }
        Ok(Ok(items))
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for List<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let (line, items) = shaped(d)?;
        Ok(List { line, items })
    }
}

/// A free-form mapping (labels, tags): every entry as written, with the line of its key.
#[derive(Clone, Debug, PartialEq)]
pub struct Pairs {
    pub line: usize,
    pub entries: Result<Vec<(usize, Scalar, Scalar)>, &'static str>,
}

/// The entries of a free-form mapping.
struct Entries(Vec<(usize, Scalar, Scalar)>);

impl<'de> Shape<'de> for Entries {
    fn map<A: MapAccess<'de>>(mut map: A) -> Result<Result<Self, &'static str>, A::Error> {
        let mut entries: Vec<(usize, Scalar, Scalar)> = Vec::new();
        while let Some(key) = map.next_key::<Spanned<Scalar>>()? {
            let value: Scalar = map.next_value()?;
            // A repeated key's last value counts, as in any YAML map podgate reads.
            match entries.iter_mut().find(|e| e.1 == key.value) {
                Some(entry) => entry.2 = value,
                None => entries.push((key.defined.line() as usize, key.value, value)),
            }
        }
        Ok(Ok(Entries(entries)))
    }
}

impl<'de> Deserialize<'de> for Pairs {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let (line, entries) = shaped::<Entries, D>(d)?;
        Ok(Pairs {
            line,
            entries: entries.map(|e| e.0),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Inner {
        c: Option<Val<i64>>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Doc {
        a: Option<Val<i64>>,
        b: Option<Sect<Inner>>,
        l: Option<List<Sect<Inner>>>,
    }

    impl Leaf for i64 {
        fn from_scalar(s: Scalar) -> Result<Self, String> {
            match s {
                Scalar::Int(i) => Ok(i),
                other => Err(format!("expected a number, found {}", other.kind())),
            }
        }
    }

    #[test]
    fn lines_are_one_based_and_a_mapping_starts_at_its_first_key() {
        let doc: Sect<Doc> = from_str("a: 1\nb:\n  c: 2\n").unwrap();
        let doc = doc.value.unwrap();
        assert_eq!(doc.a.unwrap().line, 1);
        let b = doc.b.unwrap();
        assert_eq!(b.line, 3, "a nested mapping starts at its first key");
        assert_eq!(b.value.unwrap().c.unwrap().value, Ok(2));
    }

    #[test]
    fn reading_goes_on_after_every_kind_of_mistake() {
        let text = "a: x\nzz: 1\nb: [1]\nl:\n  - c: 1\n    d: 2\n    c: 3\n  - 7\n  - {c: no}\n";
        let doc: Sect<Doc> = from_str(text).unwrap();
        assert_eq!(doc.problems.len(), 1);
        assert_eq!(doc.problems[0].line, 2);
        assert_eq!(doc.problems[0].key.as_deref(), Some("zz"));
        assert!(doc.problems[0].message.contains("expected one of: a, b, l"));
        let doc = doc.value.unwrap();
        assert_eq!(
            doc.a.unwrap().value,
            Err("expected a number, found a string".into())
        );
        assert_eq!(doc.b.unwrap().value.unwrap_err(), "a list");
        let l = doc.l.unwrap();
        assert_eq!(l.line, 5);
        let items = l.items.unwrap();
        let first = &items[0];
        assert_eq!(
            first.value.as_ref().unwrap().c.as_ref().unwrap().value,
            Ok(1)
        );
        let messages: Vec<_> = first
            .problems
            .iter()
            .map(|p| (p.line, p.message.as_str()))
            .collect();
        assert_eq!(messages.len(), 2);
        assert_eq!(messages[0].0, 6);
        assert_eq!(messages[1], (7, "key given twice"));
        assert_eq!(
            (items[1].line, items[1].value.as_ref().unwrap_err()),
            (8, &"a number")
        );
        let third = items[2].value.as_ref().unwrap().c.as_ref().unwrap();
        assert_eq!((third.line, third.value.is_err()), (9, true));
    }

    #[test]
    fn syntax_errors_carry_their_line() {
        let (line, message) = from_str::<Sect<Doc>>("a: 1\nb: [\n  {c: 1\n").unwrap_err();
        assert!(line.is_some_and(|l| l >= 2), "{line:?} {message}");
        let (line, message) = from_str::<Sect<Doc>>("a: 1\n---\na: 2\n").unwrap_err();
        assert_eq!(line, Some(3), "{message}");
    }
}
