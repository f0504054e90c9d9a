//! Body pieces as they travel through the pipeline, both ways: data, the end with its trailer
//! fields, or why the sender's side broke off.

use bytes::Bytes;
use http::{HeaderMap, HeaderValue};

/// Why an exchange ended before its answer was delivered whole: one of `proxy::ended`'s
/// values (the access log's `ended`).
pub(crate) type Ended = &'static str;

/// Why the client's side of an exchange broke off.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ClientFail {
    /// It went away, reset the stream or stalled past its timeout (which of these it was):
    /// nothing more to answer.
    Gone(Ended),
    /// Its body broke the framing (a bad chunk, more or less than its `content-length`): 400.
    Bad,
    /// Its body passed the route's `max_body`: 413.
    TooLarge,
}

/// Trailer fields, as the codec that read them holds them.
#[derive(Debug)]
pub(crate) enum Trailers {
    /// HTTP/1.1 field lines (`name: value\r\n` each), already checked and filtered
    /// (`proxy/h1/body.rs` `write_trailers`).
    Lines(Vec<u8>),
    Map(HeaderMap),
}

impl Trailers {
    /// The first value of field `name` (lower case).
    pub(crate) fn get(&self, name: &str) -> Option<&[u8]> {
        match self {
            Trailers::Map(m) => m.get(name).map(HeaderValue::as_bytes),
            Trailers::Lines(lines) => lines.split(|b| *b == b'\n').find_map(|line| {
                let (n, v) = line.split_at(line.iter().position(|b| *b == b':')?);
                n.eq_ignore_ascii_case(name.as_bytes())
                    .then(|| v[1..].trim_ascii())
            }),
        }
    }
}

/// A piece of the request body.
#[derive(Debug)]
pub(crate) enum BodyEvent {
    Data(Bytes),
    /// The end of the body, with an HTTP/1.1 client's checked trailer lines, if any.
    End(Option<Trailers>),
    Failed(ClientFail),
}

/// Where request body pieces come from.
pub(crate) trait BodySource: Send {
    /// The next piece of the body, decoded from the client's framing. Once the end was given,
    /// waits until the client goes away (`Failed(Gone)`; over HTTP/1.1 that never comes), so a
    /// caller can watch for a cancelled stream with the same call.
    fn next(&mut self) -> impl std::future::Future<Output = BodyEvent> + Send;
}
