//! How podgate reaches a cluster's API server: the `kubeconfig:`, `in_cluster:` and `server:`
//! access kinds, turned into a kube `Config` before any connection is made, with an error that
//! names the cluster and the file or URL at fault ([`KubeError`]).

use std::path::{Path, PathBuf};

use ::kube::config::{InClusterError, KubeConfigOptions, Kubeconfig, KubeconfigError};
use ::kube::Config;

/// How to reach one cluster's API server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Access {
    /// A kubeconfig file and optionally one of its contexts (its `current-context` otherwise).
    ///
    /// Supported credentials: client certificates, bearer tokens, token files (re-read by kube at
    /// least once a minute). Exec plugins and auth providers are refused: podgate does not run
    /// commands named in a config file.
    Kubeconfig {
        /// The kubeconfig file; relative paths inside it are relative to its folder.
        path: PathBuf,
        /// The context to use.
        context: Option<String>,
    },
    /// The service account of the Pod podgate runs in: `KUBERNETES_SERVICE_HOST`/`_PORT`, and the
    /// token and CA under `/var/run/secrets/kubernetes.io/serviceaccount/` (both re-read by kube,
    /// so rotated tokens and CAs are picked up).
    InCluster,
    /// An API server URL, with an optional bearer-token file (re-read at least once a minute)
    /// and an optional CA bundle (re-read about once a minute; system roots when unset).
    Server {
        /// `https://host:port` (or `http://` for a local proxy such as `kubectl proxy`).
        url: String,
        /// File holding the bearer token.
        token_file: Option<PathBuf>,
        /// PEM file of the CAs that sign the API server's certificate.
        ca_file: Option<PathBuf>,
    },
}

/// Why a cluster's access material cannot be used; found by [`KubeCluster::new`] before any
/// connection is made.
#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    /// The kubeconfig cannot be read or parsed, or its selected entries are incomplete.
    #[error("cluster {cluster}: kubeconfig {}: {source}", .path.display())]
    Kubeconfig {
        /// The cluster's configured name.
        cluster: String,
        /// The kubeconfig file.
        path: PathBuf,
        /// What kube said.
        source: KubeconfigError,
    },
    /// The kubeconfig has no context of that name.
    #[error(
        "cluster {cluster}: kubeconfig {} has no context {context:?} (its contexts: {})",
        .path.display(),
        list(.available)
    )]
    UnknownContext {
        /// The cluster's configured name.
        cluster: String,
        /// The kubeconfig file.
        path: PathBuf,
        /// The context asked for (or the kubeconfig's `current-context`).
        context: String,
        /// The contexts the file has.
        available: Vec<String>,
    },
    /// No context was given and the kubeconfig has no `current-context`.
    #[error(
        "cluster {cluster}: kubeconfig {} has no current-context; name one with `context:` (its contexts: {})",
        .path.display(),
        list(.available)
    )]
    NoContext {
        /// The cluster's configured name.
        cluster: String,
        /// The kubeconfig file.
        path: PathBuf,
        /// The contexts the file has.
        available: Vec<String>,
    },
    /// The context's user gets its credentials from a command or an auth-provider plugin.
    #[error(
        "cluster {cluster}: kubeconfig {} user {user:?} uses {mechanism}, which podgate does not \
         run; give it a token, a token file or a client certificate",
        .path.display()
    )]
    UnsupportedCredentials {
        /// The cluster's configured name.
        cluster: String,
        /// The kubeconfig file.
        path: PathBuf,
        /// The kubeconfig user.
        user: String,
        /// `an exec credential plugin` or `an auth-provider plugin`.
        mechanism: &'static str,
    },
    /// Not running in a Pod, or the service account files are missing.
    #[error("cluster {cluster}: in-cluster access: {source}")]
    InCluster {
        /// The cluster's configured name.
        cluster: String,
        /// What kube said.
        source: InClusterError,
    },
    /// The `server:` URL (or the proxy URL) cannot be used.
    #[error("cluster {cluster}: URL {url:?}: {reason}")]
    Url {
        /// The cluster's configured name.
        cluster: String,
        /// The URL as given.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A token file cannot be read.
    #[error("cluster {cluster}: cannot read token file {}: {source}", .path.display())]
    TokenFile {
        /// The cluster's configured name.
        cluster: String,
        /// The file.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// TLS material (CA bundle, client certificate or key) cannot be used.
    #[error("cluster {cluster}: TLS setup: {source}")]
    Tls {
        /// The cluster's configured name.
        cluster: String,
        /// What kube said.
        source: ::kube::Error,
    },
}

fn list(items: &[String]) -> String {
    if items.is_empty() {
        "none".to_owned()
    } else {
        items.join(", ")
    }
}

/// The token file must be readable, and must not carry whitespace around the token: kube-rs
/// (unlike client-go) sends the file's content untrimmed, and a newline in a header is refused,
/// so `echo $TOKEN > file` would fail on every request.
pub(super) fn check_token_file(cluster: &str, path: &Path) -> Result<(), KubeError> {
    let error = |source| KubeError::TokenFile {
        cluster: cluster.to_owned(),
        path: path.to_path_buf(),
        source,
    };
    let token = std::fs::read_to_string(path).map_err(error)?;
    if token.trim() != token {
        return Err(error(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "the token has whitespace (a trailing newline?) around it, which would be sent as part \
             of it; write the file without it (e.g. printf %s \"$TOKEN\" > file)",
        )));
    }
    if token.is_empty() {
        return Err(error(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "the file is empty",
        )));
    }
    Ok(())
}

/// Turns [`Access`] into a kube [`Config`], reading every file it names.
pub(super) fn load_config(cluster: &str, access: &Access) -> Result<Config, KubeError> {
    match access {
        Access::Kubeconfig { path, context } => load_kubeconfig(cluster, path, context.as_deref()),
        Access::InCluster => Config::incluster().map_err(|source| KubeError::InCluster {
            cluster: cluster.to_owned(),
            source,
        }),
        Access::Server {
            url,
            token_file,
            ca_file,
        } => {
            let bad_url = |reason: String| KubeError::Url {
                cluster: cluster.to_owned(),
                url: url.clone(),
                reason,
            };
            let uri: http::Uri = url.parse().map_err(|e| bad_url(format!("{e}")))?;
            if !matches!(uri.scheme_str(), Some("https" | "http")) || uri.host().is_none() {
                return Err(bad_url(
                    "expected https://host[:port] (or http:// for a local proxy)".to_owned(),
                ));
            }
            let mut config = Config::new(uri);
            config.auth_info.token_file = token_file
                .as_ref()
                .map(|p| p.to_string_lossy().into_owned());
            // kube re-reads this file about once a minute, so a rotated CA is picked up.
            config.root_cert_file.clone_from(ca_file);
            Ok(config)
        }
    }
}

fn load_kubeconfig(cluster: &str, path: &Path, context: Option<&str>) -> Result<Config, KubeError> {
    let kubeconfig_error = |source| KubeError::Kubeconfig {
        cluster: cluster.to_owned(),
        path: path.to_path_buf(),
        source,
    };
    let kubeconfig = Kubeconfig::read_from(path).map_err(kubeconfig_error)?;
    let available: Vec<String> = kubeconfig.contexts.iter().map(|c| c.name.clone()).collect();
    let name = match context
        .map(str::to_owned)
        .or(kubeconfig.current_context.clone())
    {
        Some(name) => name,
        None => {
            return Err(KubeError::NoContext {
                cluster: cluster.to_owned(),
                path: path.to_path_buf(),
                available,
            })
        }
    };
    let Some(named) = kubeconfig.contexts.iter().find(|c| c.name == name) else {
        return Err(KubeError::UnknownContext {
            cluster: cluster.to_owned(),
            path: path.to_path_buf(),
            context: name,
            available,
        });
    };
    let user = named.context.as_ref().and_then(|c| c.user.clone());
    if let Some(user) = user {
        let auth = kubeconfig
            .auth_infos
            .iter()
            .find(|a| a.name == user)
            .and_then(|a| a.auth_info.as_ref());
        let mechanism = match auth {
            Some(a) if a.exec.is_some() => Some("an exec credential plugin"),
            Some(a) if a.auth_provider.is_some() => Some("an auth-provider plugin"),
            _ => None,
        };
        if let Some(mechanism) = mechanism {
            return Err(KubeError::UnsupportedCredentials {
                cluster: cluster.to_owned(),
                path: path.to_path_buf(),
                user,
                mechanism,
            });
        }
    }
    let options = KubeConfigOptions {
        context: Some(name),
        ..KubeConfigOptions::default()
    };
    // Declared async, but only reads what is already in memory (and the CA/cert files it
    // names); it never awaits anything, so blocking on it is instant and needs no runtime.
    futures::executor::block_on(Config::from_custom_kubeconfig(kubeconfig, &options))
        .map_err(kubeconfig_error)
}
