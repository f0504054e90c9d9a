//! Why a request to the API server failed (the reason counted in `errors_by_reason` and logged),
//! and the pace of retries: exponential backoff with jitter, and a random spread of watch
//! timeouts so that many watches do not act in lockstep.

use std::hash::{BuildHasher, Hasher, RandomState};
use std::time::Duration;

use ::kube::core::Status;
use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};

use super::KubeOptions;

/// Why a request failed, as counted in `errors_by_reason` and logged.
pub(crate) struct Failure {
    pub(crate) reason: &'static str,
    pub(crate) message: String,
}

impl Failure {
    pub(super) fn new(reason: &'static str, message: String) -> Failure {
        Failure { reason, message }
    }

    pub(super) fn is_gone(&self) -> bool {
        self.reason == "gone"
    }

    /// A `Status` from an HTTP error answer or a watch ERROR event.
    pub(super) fn from_status(status: &Status) -> Failure {
        let code = status.code;
        let (reason, what) = match code {
            401 => (
                "unauthorized",
                "the API server rejected the credentials (401 Unauthorized)".to_owned(),
            ),
            403 => (
                "forbidden",
                "access denied (403 Forbidden): podgate needs get, list and watch on services, \
                 on discovery.k8s.io endpointslices and (for label subsets) on pods in this \
                 namespace"
                    .to_owned(),
            ),
            404 => ("not_found", "not found (404)".to_owned()),
            410 => ("gone", "resourceVersion too old (410 Gone)".to_owned()),
            429 => ("throttled", "throttled by the API server (429)".to_owned()),
            500..=599 => ("server_error", format!("API server error ({code})")),
            _ => ("rejected", format!("request rejected ({code})")),
        };
        let message = if status.message.is_empty() {
            what
        } else {
            format!("{what}: {}", status.message)
        };
        Failure::new(reason, message)
    }

    pub(super) fn from_client(error: &::kube::Error) -> Failure {
        use ::kube::Error as E;
        match error {
            E::Api(status) => Failure::from_status(status),
            E::HyperError(_) | E::Service(_) | E::ReadEvents(_) => {
                if has_timeout(error) {
                    Failure::new(
                        "timeout",
                        format!("the API server did not answer in time: {}", chain(error)),
                    )
                } else {
                    Failure::new(
                        "connect",
                        format!("cannot reach the API server: {}", chain(error)),
                    )
                }
            }
            E::SerdeError(_) | E::FromUtf8(_) | E::LinesCodecMaxLineLengthExceeded => Failure::new(
                "decode",
                format!("cannot decode the API server's answer: {}", chain(error)),
            ),
            E::Auth(_) => Failure::new(
                "credentials",
                format!("cannot load the credentials: {}", chain(error)),
            ),
            _ => Failure::new("other", chain(error)),
        }
    }
}

/// `error` and its sources, each once (kube's messages often repeat their source's).
fn chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        let part = e.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = e.source();
    }
    text
}

fn has_timeout(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut current = Some(error);
    while let Some(e) = current {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            if io.kind() == std::io::ErrorKind::TimedOut {
                return true;
            }
        }
        current = e.source();
    }
    false
}

/// Exponential backoff with jitter, reset by progress.
pub(super) struct Retry {
    builder: ExponentialBuilder,
    current: ExponentialBackoff,
    max: Duration,
}

impl Retry {
    pub(super) fn new(options: &KubeOptions) -> Retry {
        let builder = ExponentialBuilder::default()
            .with_min_delay(options.retry_min)
            .with_max_delay(options.retry_max)
            .with_factor(2.0)
            .with_jitter()
            .without_max_times();
        Retry {
            builder,
            current: builder.build(),
            max: options.retry_max,
        }
    }

    pub(super) fn next(&mut self) -> Duration {
        self.current.next().unwrap_or(self.max)
    }

    pub(super) fn reset(&mut self) {
        self.current = self.builder.build();
    }
}

/// A number in [0, 1) that differs between calls; only used to spread watch timeouts.
pub(super) fn spread() -> f64 {
    let mut hasher = RandomState::new().build_hasher();
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default(),
    );
    (hasher.finish() >> 11) as f64 / (1u64 << 53) as f64
}
