//! A serde `Deserializer` over saphyr's `MarkedYaml`, so that a type error in a manifest names
//! the line of the node that caused it.
//!
//! Going YAML → `serde_json::Value` → typed would lose every position: serde_json's errors from
//! `from_value` carry none. Walking the marked tree directly keeps the span of each node, and an
//! error is stamped with the line of the innermost node it came out of.

use std::fmt;

use saphyr::{MarkedYaml, Scalar, YamlData};
use serde::de::{self, DeserializeOwned, DeserializeSeed, IntoDeserializer, Visitor};

/// A deserialization error and the (1-based) line of the YAML node where it happened.
#[derive(Debug)]
pub(crate) struct Error {
    pub(crate) message: String,
    pub(crate) line: Option<usize>,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {}

impl de::Error for Error {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        Error {
            message: msg.to_string(),
            line: None,
        }
    }
}

/// Deserializes `T` from one loaded YAML node (usually a document root).
pub(crate) fn from_node<T: DeserializeOwned>(node: &MarkedYaml<'_>) -> Result<T, Error> {
    T::deserialize(Node(node))
}

/// The YAML node under `key` in a mapping node, if `node` is a mapping and has it.
pub(crate) fn get<'a, 'i>(node: &'a MarkedYaml<'i>, key: &str) -> Option<&'a MarkedYaml<'i>> {
    match &strip_tags(node).data {
        YamlData::Mapping(map) => map
            .iter()
            .find(|(k, _)| as_str(k) == Some(key))
            .map(|(_, v)| v),
        _ => None,
    }
}

/// The string value of a scalar node.
pub(crate) fn as_str<'a>(node: &'a MarkedYaml<'_>) -> Option<&'a str> {
    match &strip_tags(node).data {
        YamlData::Value(Scalar::String(s)) => Some(s),
        YamlData::Representation(s, _, _) => Some(s),
        _ => None,
    }
}

/// The line (1-based) where `node` starts.
pub(crate) fn line(node: &MarkedYaml<'_>) -> usize {
    node.span.start.line()
}

// Tags carry no meaning for Kubernetes objects; the loader already resolved the core-schema ones.
fn strip_tags<'a, 'i>(mut node: &'a MarkedYaml<'i>) -> &'a MarkedYaml<'i> {
    while let YamlData::Tagged(_, inner) = &node.data {
        node = inner;
    }
    node
}

struct Node<'a, 'i>(&'a MarkedYaml<'i>);

impl Node<'_, '_> {
    /// Stamps an error that has no line yet with this node's line. Inner nodes stamp first, so
    /// the line is the innermost node's.
    fn locate<T>(&self, result: Result<T, Error>) -> Result<T, Error> {
        result.map_err(|mut e| {
            e.line.get_or_insert(line(self.0));
            e
        })
    }

    fn is_null(&self) -> bool {
        matches!(strip_tags(self.0).data, YamlData::Value(Scalar::Null))
    }
}

impl<'de> de::Deserializer<'de> for Node<'_, '_> {
    type Error = Error;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        let node = strip_tags(self.0);
        let result = match &node.data {
            YamlData::Value(Scalar::Null) => visitor.visit_unit(),
            YamlData::Value(Scalar::Boolean(b)) => visitor.visit_bool(*b),
            YamlData::Value(Scalar::Integer(i)) => visitor.visit_i64(*i),
            YamlData::Value(Scalar::FloatingPoint(f)) => visitor.visit_f64(f.into_inner()),
            YamlData::Value(Scalar::String(s)) => visitor.visit_str(s),
            YamlData::Representation(s, _, _) => visitor.visit_str(s),
            YamlData::Sequence(items) => visitor.visit_seq(Seq(items.iter())),
            YamlData::Mapping(map) => visitor.visit_map(Map {
                entries: map.iter(),
                value: None,
            }),
            YamlData::Alias(_) => Err(de::Error::custom("unresolved YAML alias")),
            YamlData::BadValue => Err(de::Error::custom(
                "invalid YAML value (a tag that does not fit the scalar?)",
            )),
            YamlData::Tagged(..) => unreachable!("strip_tags removed all tags"),
        };
        self.locate(result)
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        if self.is_null() {
            visitor.visit_none()
        } else {
            visitor.visit_some(self)
        }
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, Error> {
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Error> {
        // Kubernetes enums are plain strings in YAML.
        let result = match as_str(self.0) {
            Some(s) => visitor.visit_enum(s.into_deserializer()),
            None => Err(de::Error::custom("expected a string")),
        };
        self.locate(result)
    }

    fn deserialize_ignored_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        // Unknown fields are skipped without walking them, so nothing in them can fail.
        visitor.visit_unit()
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
        bytes byte_buf unit unit_struct seq tuple tuple_struct map struct identifier
    }
}

struct Seq<'a, 'i>(std::slice::Iter<'a, MarkedYaml<'i>>);

impl<'de> de::SeqAccess<'de> for Seq<'_, '_> {
    type Error = Error;

    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, Error> {
        self.0
            .next()
            .map(|item| seed.deserialize(Node(item)))
            .transpose()
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.0.len())
    }
}

struct Map<'a, 'i, I> {
    entries: I,
    value: Option<&'a MarkedYaml<'i>>,
}

impl<'de, 'a, 'i: 'a, I> de::MapAccess<'de> for Map<'a, 'i, I>
where
    I: Iterator<Item = (&'a MarkedYaml<'i>, &'a MarkedYaml<'i>)>,
{
    type Error = Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, Error> {
        match self.entries.next() {
            Some((key, value)) => {
                self.value = Some(value);
                seed.deserialize(Node(key)).map(Some)
            }
            None => Ok(None),
        }
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, Error> {
        match self.value.take() {
            Some(value) => seed.deserialize(Node(value)),
            None => Err(de::Error::custom("map value requested before its key")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::Service;
    use saphyr::LoadableYamlNode;

    fn load(text: &str) -> Vec<MarkedYaml<'_>> {
        MarkedYaml::load_from_str(text).expect("valid YAML")
    }

    #[test]
    fn deserializes_a_service() {
        let docs = load(
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: web\n  labels: {app: web}\nspec:\n  ports:\n  - name: http\n    port: 8000\n    targetPort: 80\n",
        );
        let service: Service = from_node(&docs[0]).unwrap();
        assert_eq!(service.metadata.name.as_deref(), Some("web"));
        let port = &service.spec.unwrap().ports.unwrap()[0];
        assert_eq!((port.name.as_deref(), port.port), (Some("http"), 8000));
        assert_eq!(
            port.target_port,
            Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(80))
        );
    }

    #[test]
    fn type_error_names_the_line_of_the_bad_value() {
        let docs = load(
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: web\nspec:\n  ports:\n  - name: http\n    port: eighty\n",
        );
        let err = from_node::<Service>(&docs[0]).unwrap_err();
        assert_eq!(err.line, Some(8), "{err}");
        assert!(err.message.contains("eighty"), "{err}");
    }

    #[test]
    fn quoted_numbers_stay_strings() {
        let docs = load("apiVersion: v1\nkind: Service\nspec:\n  ports:\n  - port: \"80\"\n");
        let err = from_node::<Service>(&docs[0]).unwrap_err();
        assert_eq!(err.line, Some(5), "{err}");
    }
}
