//! What a manifest file holds: its YAML documents parsed into the objects the `manifests:` source
//! uses (Service, EndpointSlice, the labels of a Pod), `List` documents looked into, other kinds
//! ignored; problems named by document and line.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use saphyr::{LoadableYamlNode, MarkedYaml, YamlData};

use super::{yaml, SERVICE_NAME_LABEL};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

/// One usable object found in a file.
#[derive(Clone)]
pub(super) enum Object {
    Service(Box<Service>),
    Slice {
        service: String,
        slice: Box<EndpointSlice>,
    },
    /// Only what label subsets need of a Pod.
    Pod {
        namespace: Option<String>,
        name: String,
        labels: BTreeMap<String, String>,
    },
}

/// Parses one file: its usable objects plus per-object problems (objects skipped), or an error
/// that makes the whole file unusable.
pub(super) fn parse_file(bytes: &[u8]) -> Result<(Vec<Object>, Vec<String>), String> {
    let text = std::str::from_utf8(bytes).map_err(|e| format!("not UTF-8: {e}"))?;
    let docs = MarkedYaml::load_from_str(text).map_err(|e| {
        let mark = e.marker();
        format!(
            "document {}, line {} column {}: YAML syntax error: {}",
            document_at_line(text, mark.line()),
            mark.line(),
            mark.col() + 1,
            e.info()
        )
    })?;
    let mut objects = Vec::new();
    let mut problems = Vec::new();
    // Empty documents (a trailing `---`, comments only) yield nothing and are not counted, so the
    // numbers match what a person counts: the documents with content.
    let docs = docs.iter().filter(|doc| {
        !matches!(
            doc.data,
            YamlData::BadValue | YamlData::Value(saphyr::Scalar::Null)
        )
    });
    for (index, doc) in docs.enumerate() {
        let at = Location {
            document: index + 1,
        };
        parse_object(doc, at, &mut objects, &mut problems)?;
    }
    Ok((objects, problems))
}

#[derive(Clone, Copy)]
struct Location {
    document: usize,
}

impl Location {
    fn describe(self, line: usize) -> String {
        format!("document {}, line {line}", self.document)
    }
}

/// Adds the object in `node` (or, for a `List`, its items) to `objects`.
fn parse_object(
    node: &MarkedYaml<'_>,
    at: Location,
    objects: &mut Vec<Object>,
    problems: &mut Vec<String>,
) -> Result<(), String> {
    let line = yaml::line(node);
    let kind = yaml::get(node, "kind").and_then(yaml::as_str);
    let api_version = yaml::get(node, "apiVersion").and_then(yaml::as_str);
    let Some(kind) = kind else {
        return Err(format!(
            "{}: not a Kubernetes object (no kind)",
            at.describe(line)
        ));
    };
    let typed = |e: yaml::Error| {
        format!(
            "{}: {kind}: {}",
            at.describe(e.line.unwrap_or(line)),
            e.message
        )
    };
    match (api_version.unwrap_or(""), kind) {
        ("v1", "Service") => {
            let service: Service = yaml::from_node(node).map_err(typed)?;
            if service.metadata.name.as_deref().unwrap_or("").is_empty() {
                problems.push(format!(
                    "{}: Service without metadata.name; skipped",
                    at.describe(line)
                ));
            } else {
                objects.push(Object::Service(Box::new(service)));
            }
        }
        ("discovery.k8s.io/v1", "EndpointSlice") => {
            let slice: EndpointSlice = yaml::from_node(node).map_err(typed)?;
            let name = slice.metadata.name.as_deref().unwrap_or("");
            let service = slice
                .metadata
                .labels
                .as_ref()
                .and_then(|labels| labels.get(SERVICE_NAME_LABEL))
                .filter(|s| !s.is_empty())
                .cloned();
            if name.is_empty() {
                problems.push(format!(
                    "{}: EndpointSlice without metadata.name; skipped",
                    at.describe(line)
                ));
            } else if let Some(service) = service {
                objects.push(Object::Slice {
                    service,
                    slice: Box::new(slice),
                });
            } else {
                problems.push(format!(
                    "{}: EndpointSlice {name} has no label {SERVICE_NAME_LABEL}, so it belongs to no Service; skipped",
                    at.describe(line)
                ));
            }
        }
        ("v1", "Pod") => {
            // Only the metadata: the rest of a Pod (`kubectl get pods -o yaml` has plenty) is not
            // needed, and a field this version of the API types does not know must not make the
            // file unusable.
            let meta: ObjectMeta = match yaml::get(node, "metadata") {
                Some(meta) => yaml::from_node(meta).map_err(typed)?,
                None => ObjectMeta::default(),
            };
            match meta.name.filter(|n| !n.is_empty()) {
                Some(name) => objects.push(Object::Pod {
                    namespace: meta.namespace,
                    name,
                    labels: meta.labels.unwrap_or_default(),
                }),
                None => problems.push(format!(
                    "{}: Pod without metadata.name; skipped",
                    at.describe(line)
                )),
            }
        }
        // `kubectl get svc,endpointslices -o yaml` writes one List; the API's ServiceList etc.
        // have the same shape.
        (_, list) if list.ends_with("List") => {
            if let Some(items) = yaml::get(node, "items") {
                match &items.data {
                    YamlData::Sequence(items) => {
                        for item in items {
                            parse_object(item, at, objects, problems)?;
                        }
                    }
                    YamlData::Value(saphyr::Scalar::Null) => {}
                    _ => {
                        return Err(format!(
                            "{}: {list}: items is not a list",
                            at.describe(yaml::line(items))
                        ));
                    }
                }
            }
        }
        // Likely meant for us but in a version we do not read (e.g. discovery.k8s.io/v1beta1):
        // worth a warning, yet not an error, since the rest of the file is fine.
        (api_version, kind @ ("Service" | "EndpointSlice" | "Pod")) => {
            log::warn!(
                "{}: ignoring {kind} with apiVersion {api_version:?} (podgate reads {})",
                at.describe(line),
                if kind == "EndpointSlice" {
                    "discovery.k8s.io/v1"
                } else {
                    "v1"
                }
            );
        }
        (api_version, kind) => {
            log::debug!("{}: ignoring {kind} ({api_version})", at.describe(line));
        }
    }
    Ok(())
}

/// The number of the document (1-based, counting documents with content) that holds `line`,
/// for syntax errors, where the parser gives a line but no document. Counts `---` markers
/// at column 0, which YAML reserves for document starts.
fn document_at_line(text: &str, line: usize) -> usize {
    let mut document = 1;
    let mut content_seen = false;
    for text_line in text.lines().take(line.saturating_sub(1)) {
        let is_marker =
            text_line == "---" || text_line.starts_with("--- ") || text_line.starts_with("---\t");
        if is_marker {
            // The first marker of a file usually opens document 1 rather than a second one.
            if content_seen {
                document += 1;
                content_seen = false;
            }
        } else {
            let trimmed = text_line.trim_start();
            if !trimmed.is_empty() && !trimmed.starts_with('#') && !trimmed.starts_with('%') {
                content_seen = true;
            }
        }
    }
    document
}
