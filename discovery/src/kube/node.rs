//! podgate's own zone, read from the Node it runs on: `GET /api/v1/nodes/{name}` and its
//! `topology.kubernetes.io/zone` label (the legacy `failure-domain.beta.kubernetes.io/zone` when
//! only that one is set, as kube-proxy and the scheduler still read it).
//!
//! Asked once at start-up. Every failure is a [`NodeZoneError`] that says what to fix; the
//! caller logs it and routes zone-aware upstreams to all zones: a missing zone costs locality,
//! never availability.

use std::time::Duration;

use ::kube::Api;
use k8s_openapi::api::core::v1::Node;

use super::failure::Failure;
use super::KubeCluster;

/// The zone label Kubernetes sets on nodes (GA since 1.17).
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";
/// Its deprecated predecessor, still set by some providers alone.
pub const LEGACY_ZONE_LABEL: &str = "failure-domain.beta.kubernetes.io/zone";

/// Why the node's zone could not be learned.
#[derive(Debug, thiserror::Error)]
pub enum NodeZoneError {
    /// The API client could not be built from the cluster's access material.
    #[error("cluster {cluster}: cannot build the API client: {reason}")]
    Client {
        /// The cluster's configured name.
        cluster: String,
        /// What kube said.
        reason: String,
    },
    /// 403: the service account may not read nodes.
    #[error(
        "cluster {cluster}: not allowed to read node {node} (403 Forbidden): give podgate's \
         service account `get` on `nodes` (a ClusterRole: nodes are cluster-scoped){}",
        detail(.message)
    )]
    Forbidden {
        /// The cluster's configured name.
        cluster: String,
        /// The node asked for.
        node: String,
        /// The API server's message.
        message: String,
    },
    /// 404: no node of that name (`NODE_NAME` not from `spec.nodeName`, or another cluster).
    #[error(
        "cluster {cluster}: node {node} not found (404): is NODE_NAME set from the downward API \
         (fieldRef spec.nodeName), and is this the cluster podgate runs in?"
    )]
    NotFound {
        /// The cluster's configured name.
        cluster: String,
        /// The node asked for.
        node: String,
    },
    /// Any other failure: unreachable, timeout, an error status, an answer that does not decode.
    #[error("cluster {cluster}: cannot read node {node}: {message}")]
    Request {
        /// The cluster's configured name.
        cluster: String,
        /// The node asked for.
        node: String,
        /// What went wrong.
        message: String,
    },
    /// The node has neither zone label.
    #[error("cluster {cluster}: node {node} has no {ZONE_LABEL} label (nor {LEGACY_ZONE_LABEL})")]
    NoLabel {
        /// The cluster's configured name.
        cluster: String,
        /// The node asked for.
        node: String,
    },
    /// The label's value is not a valid label value (the answer is not trusted blindly).
    #[error("cluster {cluster}: node {node}: label {label} = {value:?} is not a zone name")]
    BadLabel {
        /// The cluster's configured name.
        cluster: String,
        /// The node asked for.
        node: String,
        /// The label read.
        label: &'static str,
        /// Its value (at most 100 characters of it).
        value: String,
    },
}

fn detail(message: &str) -> String {
    if message.is_empty() {
        String::new()
    } else {
        format!(": {message}")
    }
}

/// A Kubernetes label value: at most 63 characters, alphanumerics with `-`, `_`, `.` inside.
fn is_label_value(v: &str) -> bool {
    let b = v.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.first().is_some_and(u8::is_ascii_alphanumeric)
        && b.last().is_some_and(u8::is_ascii_alphanumeric)
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
}

/// The zone labels of a node: the GA one, else the legacy one.
fn zone_of(cluster: &str, node: &str, n: &Node) -> Result<String, NodeZoneError> {
    let labels = n.metadata.labels.as_ref();
    let found = [ZONE_LABEL, LEGACY_ZONE_LABEL]
        .into_iter()
        .find_map(|label| labels.and_then(|l| l.get(label)).map(|v| (label, v)));
    let Some((label, value)) = found else {
        return Err(NodeZoneError::NoLabel {
            cluster: cluster.to_owned(),
            node: node.to_owned(),
        });
    };
    if !is_label_value(value) {
        return Err(NodeZoneError::BadLabel {
            cluster: cluster.to_owned(),
            node: node.to_owned(),
            label,
            value: value.chars().take(100).collect(),
        });
    }
    Ok(value.clone())
}

impl KubeCluster {
    /// The zone label of node `node`, asked of this cluster's API server within `timeout`.
    /// Must run inside a tokio runtime (the client spawns its connection task on it).
    pub async fn node_zone(&self, node: &str, timeout: Duration) -> Result<String, NodeZoneError> {
        let cluster = self.name().to_owned();
        let client =
            ::kube::Client::try_from(self.config.clone()).map_err(|e| NodeZoneError::Client {
                cluster: cluster.clone(),
                reason: e.to_string(),
            })?;
        let api: Api<Node> = Api::all(client);
        let answer = match tokio::time::timeout(timeout, api.get(node)).await {
            Ok(answer) => answer,
            Err(_) => {
                return Err(NodeZoneError::Request {
                    cluster,
                    node: node.to_owned(),
                    message: format!("no answer within {timeout:?}"),
                })
            }
        };
        match answer {
            Ok(n) => zone_of(&cluster, node, &n),
            Err(::kube::Error::Api(status)) if status.code == 403 => {
                Err(NodeZoneError::Forbidden {
                    cluster,
                    node: node.to_owned(),
                    message: status.message.clone(),
                })
            }
            Err(::kube::Error::Api(status)) if status.code == 404 => Err(NodeZoneError::NotFound {
                cluster,
                node: node.to_owned(),
            }),
            Err(e) => Err(NodeZoneError::Request {
                cluster,
                node: node.to_owned(),
                message: Failure::from_client(&e).message,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(labels: &[(&str, &str)]) -> Node {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "n1", "labels": labels.iter().cloned().collect::<std::collections::BTreeMap<_, _>>()},
        }))
        .unwrap()
    }

    #[test]
    fn the_ga_label_wins_then_the_legacy_one() {
        let both = node(&[(ZONE_LABEL, "eu-1a"), (LEGACY_ZONE_LABEL, "old")]);
        assert_eq!(zone_of("c", "n1", &both).unwrap(), "eu-1a");
        let legacy = node(&[(LEGACY_ZONE_LABEL, "old-1b")]);
        assert_eq!(zone_of("c", "n1", &legacy).unwrap(), "old-1b");
        let none = node(&[("kubernetes.io/hostname", "n1")]);
        let e = zone_of("c", "n1", &none).unwrap_err().to_string();
        assert!(
            e.contains("node n1 has no topology.kubernetes.io/zone label"),
            "{e}"
        );
        let bad = node(&[(ZONE_LABEL, "a b\n")]);
        assert!(matches!(
            zone_of("c", "n1", &bad),
            Err(NodeZoneError::BadLabel { .. })
        ));
    }
}
