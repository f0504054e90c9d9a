//! An adversarial corpus for podgate's own HTTP/1.1 path (RFC 9112 §6–§7 framing, §11 request
//! smuggling, and the upstream-side versions of each), after issue 15.
//!
//! Each case is a row: the exact bytes a client sends (in steps), the exact bytes a raw-socket
//! Pod answers, and what must be seen on both sides: what the client read (status, headers,
//! body, whether podgate closed the connection) and what the Pod received (the request lines and
//! header fields as podgate re-wrote them, the body bytes, how many requests on how many
//! connections). The Pod and the client read podgate's output with a strict parser
//! (`support/wire.rs`): one framing header, `chunked` only, CRLF only, no chunk extensions.
//!
//! Every case starts its own podgate on its own Pod and, once the client side is done, ends
//! podgate: the Pod then has everything podgate ever wrote to it, so "nothing after a rejected
//! request reached the Pod" is exact, not a matter of waiting long enough.
//!
//! Where RFC 9112 leaves a choice, the expectation is what nginx 1.22 does with the same bytes;
//! the cases where this file chose are marked `CHOSEN:`.

mod support;

use std::sync::Arc;
use support::wire::*;
use support::Gateway;

/// One thing the client does or expects.
#[derive(Debug)]
enum Step {
    Send(Vec<u8>),
    /// The next answer is this one.
    Answer(Exp),
    /// podgate ends the connection with no further byte.
    Closed,
    /// An answer with this status and then the end of the connection, or the end straight
    /// away (podgate may already have answered or started the request when it finds the error).
    RejectOrClose(u16),
    /// An answer with this status, or an answer whose head came and whose body was cut short
    /// by the end of the connection (an error found after podgate started relaying).
    FailOrCut(u16),
    /// This answer, or a 502 (where the rules leave podgate the choice).
    AnswerOrBadGateway(Exp),
    /// A new client connection replaces the current one.
    Reconnect,
    /// Inside a tunnel: send these bytes, read exactly those back.
    Tunnel(&'static [u8], &'static [u8]),
}

/// An expected answer.
#[derive(Debug)]
struct Exp {
    status: u16,
    /// The request was a HEAD: no body follows whatever the head says.
    head_only: bool,
    body: Option<Vec<u8>>,
    /// Fields that must be there: the value equal (case-insensitively) or one of its tokens.
    has: Vec<(&'static str, &'static str)>,
    /// Fields that must not be there.
    lacks: Vec<&'static str>,
    /// Trailers the client may get (others are an error).
    trailers_within: Vec<(&'static str, &'static str)>,
}

fn ans(status: u16) -> Exp {
    Exp {
        status,
        head_only: false,
        body: None,
        has: Vec::new(),
        lacks: Vec::new(),
        trailers_within: Vec::new(),
    }
}

impl Exp {
    fn body(mut self, body: impl AsRef<[u8]>) -> Self {
        self.body = Some(body.as_ref().to_vec());
        self
    }
    fn head_only(mut self) -> Self {
        self.head_only = true;
        self
    }
    fn has(mut self, name: &'static str, value: &'static str) -> Self {
        self.has.push((name, value));
        self
    }
    fn lacks(mut self, name: &'static str) -> Self {
        self.lacks.push(name);
        self
    }
    fn trailers_within(mut self, t: &[(&'static str, &'static str)]) -> Self {
        self.trailers_within = t.to_vec();
        self
    }
}

/// A request as the Pod must receive it.
#[derive(Debug, Clone)]
struct PReq {
    line: String,
    /// Fields other than the framing ones and those podgate adds (`x-forwarded-*`,
    /// `x-request-id`), names lowercased, sorted when compared.
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    /// Trailers the Pod may get (forwarding them is allowed, not required).
    trailers_within: Vec<(String, String)>,
}

/// `method_target` plus ` HTTP/1.1`, with `host: a.test`.
fn preq(method_target: &str) -> PReq {
    PReq {
        line: format!("{method_target} HTTP/1.1"),
        headers: vec![("host".into(), "a.test".into())],
        body: Vec::new(),
        trailers_within: Vec::new(),
    }
}

impl PReq {
    fn h(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.to_ascii_lowercase(), value.into()));
        self
    }
    fn body(mut self, body: impl AsRef<[u8]>) -> Self {
        self.body = body.as_ref().to_vec();
        self
    }
    fn trailers_within(mut self, t: &[(&str, &str)]) -> Self {
        self.trailers_within = t
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect();
        self
    }
}

/// What the Pod must have seen once podgate is gone.
#[derive(Debug)]
struct PodExp {
    /// Complete requests over all connections, in order.
    requests: Vec<PReq>,
    /// How many connections podgate opened, when it matters.
    connections: Option<usize>,
    /// Whether an incomplete request (a body podgate gave up on) may be left on a connection.
    partial: bool,
    /// The bytes the Pod got in a tunnel after its 101.
    tunnel: Option<&'static [u8]>,
}

impl PodExp {
    /// Nothing reached the Pod: not a byte, not a connection.
    fn nothing() -> Self {
        PodExp {
            requests: Vec::new(),
            connections: Some(0),
            partial: false,
            tunnel: None,
        }
    }
    /// Exactly these requests, on this many connections.
    fn got(requests: Vec<PReq>, connections: usize) -> Self {
        PodExp {
            requests,
            connections: Some(connections),
            partial: false,
            tunnel: None,
        }
    }
    /// No complete request; at most one started one that podgate abandoned.
    fn abandoned() -> Self {
        PodExp {
            requests: Vec::new(),
            connections: None,
            partial: true,
            tunnel: None,
        }
    }
}

struct Case {
    steps: Vec<Step>,
    /// The Pod's replies to its first requests, in order; later ones get [`Reply::naming`].
    replies: Vec<Reply>,
    pod: PodExp,
}

fn send(bytes: impl AsRef<[u8]>) -> Step {
    Step::Send(bytes.as_ref().to_vec())
}

/// `GET path` with `Host: a.test`.
fn get(path: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: a.test\r\n\r\n").into_bytes()
}

/// The answer the Pod's default reply gives to `method_target`.
fn named(method_target: &str) -> Exp {
    ans(200).body(method_target)
}

fn cat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

// ------------------------------------------------------------------------------------------
// Row shapes.

/// A request head podgate must refuse with `status` and a close, with nothing reaching a Pod.
fn refused(status: u16, bytes: &[u8]) -> Case {
    Case {
        steps: vec![send(bytes), Step::Answer(ans(status)), Step::Closed],
        replies: Vec::new(),
        pod: PodExp::nothing(),
    }
}

/// Like [`refused`], with a request smuggled behind the bad one that must never be seen.
fn refused_then_smuggle(status: u16, bytes: &[u8]) -> Case {
    refused(status, &cat(&[bytes, &get("/smuggled")]))
}

/// A chunked request body that breaks the grammar, with a request behind it: the body is never
/// completed at the Pod and nothing behind it reaches the Pod.
fn bad_chunked(body: &[u8]) -> Case {
    let bytes = cat(&[
        b"POST /c HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\n\r\n",
        body,
        &get("/smuggled"),
    ]);
    Case {
        steps: vec![send(bytes), Step::RejectOrClose(400)],
        replies: Vec::new(),
        pod: PodExp::abandoned(),
    }
}

/// A valid chunked request with `body` (whose data is `data`), then a pipelined GET.
fn good_chunked(te: &str, body: &[u8], data: &[u8]) -> Case {
    let head = format!("POST /c HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: {te}\r\n\r\n");
    Case {
        steps: vec![
            send(cat(&[head.as_bytes(), body, &get("/next")])),
            Step::Answer(named("POST /c")),
            Step::Answer(named("GET /next")),
        ],
        replies: Vec::new(),
        pod: PodExp::got(vec![preq("POST /c").body(data), preq("GET /next")], 1),
    }
}

/// `case` with the trailers its first Pod request may carry.
fn with_trailers(mut case: Case, trailers: &[(&str, &str)]) -> Case {
    let first = case.pod.requests.remove(0).trailers_within(trailers);
    case.pod.requests.insert(0, first);
    case
}

/// The Pod's first answer (to `GET /r`) is `reply`; the client must see `exp`. Then `GET /s` on
/// the same client connection is answered by the Pod, on the same Pod connection if `reused`.
fn relayed(reply: Reply, exp: Exp, reused: bool) -> Case {
    Case {
        steps: vec![
            send(get("/r")),
            Step::Answer(exp),
            send(get("/s")),
            Step::Answer(named("GET /s")),
        ],
        replies: vec![reply],
        pod: PodExp::got(
            vec![preq("GET /r"), preq("GET /s")],
            if reused { 1 } else { 2 },
        ),
    }
}

/// Like [`relayed`] for a HEAD request: the client reads no body.
fn relayed_head(reply: Reply, reused: bool) -> Case {
    Case {
        steps: vec![
            send(b"HEAD /r HTTP/1.1\r\nHost: a.test\r\n\r\n"),
            Step::Answer(ans(200).head_only()),
            send(get("/s")),
            Step::Answer(named("GET /s")),
        ],
        replies: vec![reply],
        pod: PodExp::got(
            vec![preq("HEAD /r"), preq("GET /s")],
            if reused { 1 } else { 2 },
        ),
    }
}

/// The Pod's first answer is `reply`, whose framing podgate cannot trust: the client gets a 502
/// (`cut`: or an answer cut short, when the error is in the body), and the Pod connection is not
/// used again: `GET /s` from a new client connection reaches the Pod on a new connection and is
/// answered with its own answer, never with bytes left over from the first.
fn untrusted(reply: Reply, cut: bool) -> Case {
    Case {
        steps: vec![
            send(get("/r")),
            if cut {
                Step::FailOrCut(502)
            } else {
                Step::Answer(ans(502))
            },
            Step::Reconnect,
            send(get("/s")),
            Step::Answer(named("GET /s")),
        ],
        replies: vec![reply],
        pod: PodExp::got(vec![preq("GET /r"), preq("GET /s")], 2),
    }
}

/// A request hidden in a body: bypassing routing, it reached a Pod in issue 15.
const DISGUISED: &[u8] = b"DELETE /internal HTTP/1.1\r\nHost: a.test\r\n\r\n";

const SMUGGLED_ANSWER: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nsmuggled";

// ------------------------------------------------------------------------------------------
// The corpus.

macro_rules! corpus {
    ($($(#[doc = $doc:literal])* $name:ident: $case:expr;)*) => {
        $(
            $(#[doc = $doc])*
            #[tokio::test]
            async fn $name() {
                run(stringify!($name), $case).await;
            }
        )*
    };
}

corpus! {
    // --- Baseline: well-formed traffic passes whole and in order ---------------------------

    /// Pipelined GET, Content-Length POST, chunked POST, GET: four answers in order, four
    /// requests on one Pod connection, each body whole.
    baseline_pipelined_requests: Case {
        steps: vec![
            send(cat(&[
                &get("/one"),
                b"POST /two HTTP/1.1\r\nHost: a.test\r\nContent-Length: 5\r\n\r\nhello",
                b"POST /three HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\n\r\n\
                  5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
                &get("/four"),
            ])),
            Step::Answer(named("GET /one")),
            Step::Answer(named("POST /two")),
            Step::Answer(named("POST /three")),
            Step::Answer(named("GET /four")),
        ],
        replies: vec![],
        pod: PodExp::got(vec![
            preq("GET /one"),
            preq("POST /two").body("hello"),
            preq("POST /three").body("hello world"),
            preq("GET /four"),
        ], 1),
    };

    // --- Head syntax (RFC 9112 §2, §5) ---------------------------------------------------------

    /// obs-fold (§5.2): a server MUST reject it or replace it; podgate rejects.
    obs_fold_is_refused: refused(400, b"GET /x HTTP/1.1\r\nHost: a.test\r\nX-A: 1\r\n  2\r\n\r\n");
    /// obs-fold continuing Transfer-Encoding, the classic way to hide it from one parser.
    obs_fold_hiding_transfer_encoding_is_refused: refused_then_smuggle(400,
        b"POST /x HTTP/1.1\r\nHost: a.test\r\nContent-Length: 5\r\nTransfer-Encoding:\r\n chunked\r\n\r\n0\r\n\r\n");
    /// A bare CR inside a field value (§2.2: MUST be rejected or replaced by SP).
    bare_cr_in_a_value_is_refused: refused(400, b"GET /x HTTP/1.1\r\nHost: a.test\r\nX-A: 1\r2\r\n\r\n");
    /// A bare CR as a line end.
    bare_cr_line_end_is_refused: refused(400, b"GET /x HTTP/1.1\rHost: a.test\r\n\r\n");
    /// A NUL in a field value.
    nul_in_a_value_is_refused: refused(400, b"GET /x HTTP/1.1\r\nHost: a.test\r\nX-A: 1\x002\r\n\r\n");
    /// CHOSEN: bare LF line ends in a request head are accepted (§2.2 MAY; nginx 1.22 accepts
    /// them), and the Pod gets a head podgate wrote with CRLF. A request behind it is separate.
    bare_lf_line_ends_are_read_as_lines: Case {
        steps: vec![
            send(cat(&[b"GET /x HTTP/1.1\nHost: a.test\nX-A: 1\n\n", &get("/next")])),
            Step::Answer(named("GET /x")),
            Step::Answer(named("GET /next")),
        ],
        replies: vec![],
        pod: PodExp::got(vec![preq("GET /x").h("x-a", "1"), preq("GET /next")], 1),
    };
    /// CHOSEN: a bare LF ending a head whose other lines end in CRLF (nginx accepts); the body
    /// behind it is read by its Content-Length.
    bare_lf_ending_the_head_is_a_line_end: Case {
        steps: vec![
            send(cat(&[b"POST /x HTTP/1.1\r\nHost: a.test\r\nContent-Length: 5\r\n\nhello", &get("/next")])),
            Step::Answer(named("POST /x")),
            Step::Answer(named("GET /next")),
        ],
        replies: vec![],
        pod: PodExp::got(vec![preq("POST /x").body("hello"), preq("GET /next")], 1),
    };
    /// Whitespace between a field name and the colon (§5.1: MUST be rejected with 400).
    space_before_colon_is_refused: refused(400, b"GET /x HTTP/1.1\r\nHost: a.test\r\nX-A : 1\r\n\r\n");
    /// The same on Transfer-Encoding, with a Content-Length another parser would use.
    space_before_colon_on_transfer_encoding_is_refused: refused_then_smuggle(400,
        b"POST /x HTTP/1.1\r\nHost: a.test\r\nContent-Length: 5\r\nTransfer-Encoding : chunked\r\n\r\n0\r\n\r\n");
    /// A tab between a field name and the colon.
    tab_before_colon_is_refused: refused(400, b"GET /x HTTP/1.1\r\nHost: a.test\r\nContent-Length\t: 0\r\n\r\n");
    /// HTTP/1.1 without Host (RFC 9112 §3.2: 400). CHOSEN: and the connection closed, as nginx.
    missing_host_is_refused: refused(400, b"GET /x HTTP/1.1\r\n\r\n");
    /// Two Host fields (§3.2: 400). CHOSEN: and closed (nginx closes after a 400).
    two_hosts_are_refused: refused(400, b"GET /x HTTP/1.1\r\nHost: a.test\r\nHost: b.test\r\n\r\n");
    /// Two Host fields with the same value are still two.
    two_equal_hosts_are_refused: refused(400, b"GET /x HTTP/1.1\r\nHost: a.test\r\nHost: a.test\r\n\r\n");

    // --- Content-Length (RFC 9112 §6.3, RFC 9110 §8.6) ---------------------------------------

    two_equal_content_lengths_are_refused: refused_then_smuggle(400,
        b"POST /x HTTP/1.1\r\nHost: a.test\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello");
    two_different_content_lengths_are_refused: refused_then_smuggle(400,
        b"POST /x HTTP/1.1\r\nHost: a.test\r\nContent-Length: 0\r\nContent-Length: 5\r\n\r\nhello");
    listed_content_length_is_refused: refused_then_smuggle(400,
        b"POST /x HTTP/1.1\r\nHost: a.test\r\nContent-Length: 5, 5\r\n\r\nhello");
    content_length_with_plus_sign_is_refused: refused_then_smuggle(400,
        b"POST /x HTTP/1.1\r\nHost: a.test\r\nContent-Length: +5\r\n\r\nhello");
    content_length_with_minus_sign_is_refused: refused_then_smuggle(400,
        b"POST /x HTTP/1.1\r\nHost: a.test\r\nContent-Length: -5\r\n\r\nhello");
    content_length_in_hex_is_refused: refused_then_smuggle(400,
        b"POST /x HTTP/1.1\r\nHost: a.test\r\nContent-Length: 0x5\r\n\r\nhello");
    content_length_with_inner_space_is_refused: refused_then_smuggle(400,
        b"POST /x HTTP/1.1\r\nHost: a.test\r\nContent-Length: 1 5\r\n\r\nhello");
    /// CHOSEN: an empty Content-Length is not all digits (nginx: 400).
    empty_content_length_is_refused: refused_then_smuggle(400,
        b"POST /x HTTP/1.1\r\nHost: a.test\r\nContent-Length: \r\n\r\nhello");
    /// u64::MAX + 1.
    overflowing_content_length_is_refused: refused_then_smuggle(400,
        b"POST /x HTTP/1.1\r\nHost: a.test\r\nContent-Length: 18446744073709551616\r\n\r\nhello");
    /// CHOSEN: spaces around the value are optional whitespace, not part of it (RFC 9110 §5.5;
    /// nginx accepts spaces, and answers 400 to tabs, so tabs are left out).
    content_length_with_optional_whitespace_is_read: Case {
        steps: vec![
            send(cat(&[b"POST /x HTTP/1.1\r\nHost: a.test\r\nContent-Length:  5  \r\n\r\nhello", &get("/next")])),
            Step::Answer(named("POST /x")),
            Step::Answer(named("GET /next")),
        ],
        replies: vec![],
        pod: PodExp::got(vec![preq("POST /x").body("hello"), preq("GET /next")], 1),
    };
    content_length_and_transfer_encoding_are_refused: refused_then_smuggle(400,
        b"POST /x HTTP/1.1\r\nHost: a.test\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n");
    transfer_encoding_and_content_length_are_refused: refused_then_smuggle(400,
        b"POST /x HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n0\r\n\r\n");
    /// A valid request first, then the smuggling attempt: the first is answered, the second
    /// refused, and nothing after it reaches the Pod.
    pipelined_request_before_a_smuggling_attempt_is_served: Case {
        steps: vec![
            send(cat(&[
                &get("/ok"),
                b"POST /x HTTP/1.1\r\nHost: a.test\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
                &get("/smuggled"),
            ])),
            Step::Answer(named("GET /ok")),
            Step::Answer(ans(400)),
            Step::Closed,
        ],
        replies: vec![],
        pod: PodExp::got(vec![preq("GET /ok")], 1),
    };

    /// Found by the differential test: framing that is refused is refused on the head alone,
    /// without waiting for a body that may never come.
    refused_transfer_codings_are_answered_on_the_head: Case {
        steps: vec![
            send(b"POST /x HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n"),
            Step::Answer(ans(501)),
            Step::Closed,
        ],
        replies: vec![],
        pod: PodExp::nothing(),
    };
    refused_http10_transfer_encoding_is_answered_on_the_head: Case {
        steps: vec![
            send(b"POST /x HTTP/1.0\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\n\r\n"),
            Step::Answer(ans(400)),
            Step::Closed,
        ],
        replies: vec![],
        pod: PodExp::nothing(),
    };
    /// Found by the differential test: with a Connection option removing Content-Length, the
    /// Pod answered the body as a second request and that answer waited in the pooled
    /// connection for the next client. Here that next client must get its own answer.
    a_request_in_a_body_never_answers_the_next_client: Case {
        steps: vec![
            send(cat(&[
                format!(
                    "POST /x HTTP/1.1\r\nHost: a.test\r\nConnection: content-length\r\nContent-Length: {}\r\n\r\n",
                    DISGUISED.len()
                ).as_bytes(),
                DISGUISED,
            ])),
            Step::Answer(named("POST /x")),
            Step::Reconnect,
            send(get("/victim")),
            Step::Answer(named("GET /victim")),
        ],
        replies: vec![],
        pod: PodExp::got(vec![preq("POST /x").body(DISGUISED), preq("GET /victim")], 1),
    };

    // --- Transfer-Encoding (RFC 9112 §6.1, §6.3) ---------------------------------------------

    gzip_then_chunked_is_not_implemented: refused_then_smuggle(501,
        b"POST /x HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n");
    chunked_twice_in_a_list_is_not_implemented: refused_then_smuggle(501,
        b"POST /x HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked, chunked\r\n\r\n0\r\n\r\n");
    chunked_in_two_fields_is_not_implemented: refused_then_smuggle(501,
        b"POST /x HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n");
    gzip_alone_is_not_implemented: refused_then_smuggle(501,
        b"POST /x HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: gzip\r\n\r\nhello");
    identity_is_not_implemented: refused_then_smuggle(501,
        b"POST /x HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: identity\r\n\r\nhello");
    /// A coding that only contains the word.
    xchunked_is_not_implemented: refused_then_smuggle(501,
        b"POST /x HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n");
    /// Transfer-Encoding in an HTTP/1.0 request (§6.1: the framing is faulty; MUST close).
    transfer_encoding_in_http10_is_refused: refused_then_smuggle(400,
        b"POST /x HTTP/1.0\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n");
    /// CHOSEN: coding names are case-insensitive (RFC 9110 §10.1.4; nginx accepts `Chunked`).
    chunked_in_capitals_is_chunked: good_chunked("Chunked", b"5\r\nhello\r\n0\r\n\r\n", b"hello");

    // --- Chunked bodies (RFC 9112 §7.1) ------------------------------------------------------

    /// Chunk extensions are read past and not passed on.
    chunk_extensions_are_dropped: good_chunked("chunked",
        b"5;a=b\r\nhello\r\n6;c=\"d;e\";f\r\n world\r\n0;g=h\r\n\r\n", b"hello world");
    empty_chunked_body: good_chunked("chunked", b"0\r\n\r\n", b"");
    /// CHOSEN: 16 hex digits is the bound (issue 15: "more than 16 hex digits" is refused);
    /// leading zeros within it are a size like any other (nginx accepts them).
    chunk_size_of_16_digits_is_read: good_chunked("chunked", b"0000000000000005\r\nhello\r\n0\r\n\r\n", b"hello");
    chunk_size_of_17_digits_is_refused: bad_chunked(b"00000000000000005\r\nhello\r\n0\r\n\r\n");
    negative_chunk_size_is_refused: bad_chunked(b"-5\r\nhello\r\n0\r\n\r\n");
    missing_chunk_size_is_refused: bad_chunked(b"\r\nhello\r\n0\r\n\r\n");
    hex_prefixed_chunk_size_is_refused: bad_chunked(b"0x5\r\nhello\r\n0\r\n\r\n");
    bare_lf_after_chunk_size_is_refused: bad_chunked(b"5\nhello\r\n0\r\n\r\n");
    bare_lf_in_a_chunk_extension_is_refused: bad_chunked(b"5;a\nhello\r\n0\r\n\r\n");
    bare_lf_after_chunk_data_is_refused: bad_chunked(b"5\r\nhello\n0\r\n\r\n");
    chunk_data_longer_than_its_size_is_refused: bad_chunked(b"5\r\nhelloXX\r\n0\r\n\r\n");
    bare_lf_after_the_last_chunk_is_refused: bad_chunked(b"5\r\nhello\r\n0\n\r\n");
    /// Issue 15, class 2: `0\r\n\n` ends the body for a strict Pod, which then runs what
    /// follows as a request.
    bare_lf_ending_the_trailer_section_is_refused: bad_chunked(b"5\r\nhello\r\n0\r\n\n");
    /// Issue 15, class 2: `0\r\nX: y\n\n`.
    bare_lf_ending_a_trailer_field_is_refused: bad_chunked(b"5\r\nhello\r\n0\r\nX: y\n\n");
    bare_lf_ending_a_trailer_field_then_crlf_is_refused: bad_chunked(b"5\r\nhello\r\n0\r\nX: y\n\r\n");
    /// CHOSEN: a CRLF-ended trailer line that is not a field (no colon) ends where its CRLF is,
    /// so the framing is not in doubt: accepted as nginx does (it ignores request trailers), and
    /// the line is not passed on.
    trailer_line_without_colon_is_not_passed_on: with_trailers(good_chunked("chunked",
        b"5\r\nhello\r\n0\r\nnot a field\r\nX-T: 1\r\n\r\n", b"hello"),
        &[("x-t", "1")]);
    /// CHOSEN: obs-fold in a trailer, likewise (nginx accepts it); the Pod may get the field
    /// unfolded, cut at the fold, or not at all.
    obs_fold_in_a_trailer_is_not_passed_on: with_trailers(good_chunked("chunked",
        b"5\r\nhello\r\n0\r\nX-T: 1\r\n 2\r\n\r\n", b"hello"),
        &[("x-t", "1"), ("x-t", "1 2")]);
    /// Found by the differential test: a bare CR inside a trailer value.
    bare_cr_in_a_trailer_is_refused: bad_chunked(b"5\r\nhello\r\n0\r\nX-T: \rpp\r\n\r\n");
    /// Trailer fields end with the empty line; a request behind them is the next request.
    trailers_are_fields: Case {
        steps: vec![
            send(cat(&[
                b"POST /c HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\n\r\n\
                  5\r\nhello\r\n0\r\nX-T: 1\r\nX-U: 2\r\n\r\n",
                &get("/next"),
            ])),
            Step::Answer(named("POST /c")),
            Step::Answer(named("GET /next")),
        ],
        replies: vec![],
        pod: PodExp::got(vec![
            preq("POST /c").body("hello").trailers_within(&[("x-t", "1"), ("x-u", "2")]),
            preq("GET /next"),
        ], 1),
    };
    /// CHOSEN: framing and routing fields in a trailer are dropped, not refused (nginx ignores
    /// request trailers).
    framing_fields_in_a_trailer_are_not_passed_on: Case {
        steps: vec![
            send(cat(&[
                b"POST /c HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\n\r\n\
                  5\r\nhello\r\n0\r\nContent-Length: 50\r\nTransfer-Encoding: chunked\r\n\
                  Host: evil.test\r\nTrailer: X-T\r\nX-T: 1\r\n\r\n",
                &get("/next"),
            ])),
            Step::Answer(named("POST /c")),
            Step::Answer(named("GET /next")),
        ],
        replies: vec![],
        pod: PodExp::got(vec![
            preq("POST /c").body("hello").trailers_within(&[("x-t", "1")]),
            preq("GET /next"),
        ], 1),
    };

    // --- Connection options (RFC 9110 §7.6.1) -------------------------------------------------

    /// Issue 15, class 1: `Connection: content-length` must not take the framing away; the body
    /// (a request in disguise) stays a body.
    connection_cannot_remove_content_length: Case {
        steps: vec![
            send(cat(&[
                format!(
                    "POST /x HTTP/1.1\r\nHost: a.test\r\nConnection: content-length\r\nContent-Length: {}\r\n\r\n",
                    DISGUISED.len()
                ).as_bytes(),
                DISGUISED,
                &get("/next"),
            ])),
            Step::Answer(named("POST /x")),
            Step::Answer(named("GET /next")),
        ],
        replies: vec![],
        pod: PodExp::got(vec![
            preq("POST /x").body(DISGUISED),
            preq("GET /next"),
        ], 1),
    };
    connection_cannot_remove_transfer_encoding: Case {
        steps: vec![
            send(cat(&[
                b"POST /x HTTP/1.1\r\nHost: a.test\r\nConnection: transfer-encoding\r\nTransfer-Encoding: chunked\r\n\r\n\
                  5\r\nhello\r\n0\r\n\r\n",
                &get("/next"),
            ])),
            Step::Answer(named("POST /x")),
            Step::Answer(named("GET /next")),
        ],
        replies: vec![],
        pod: PodExp::got(vec![preq("POST /x").body("hello"), preq("GET /next")], 1),
    };
    connection_cannot_remove_host: Case {
        steps: vec![
            send(cat(&[
                b"POST /x HTTP/1.1\r\nConnection: host, keep-alive\r\nHost: a.test\r\nContent-Length: 5\r\n\r\nhello",
                &get("/next"),
            ])),
            Step::Answer(named("POST /x")),
            Step::Answer(named("GET /next")),
        ],
        replies: vec![],
        pod: PodExp::got(vec![preq("POST /x").body("hello"), preq("GET /next")], 1),
    };
    /// Hop-by-hop fields, standard and named in Connection, stay on the client's hop.
    hop_by_hop_fields_are_not_passed_on: Case {
        steps: vec![
            send(b"GET /h HTTP/1.1\r\nHost: a.test\r\nConnection: x-secret, keep-alive\r\nX-Secret: 1\r\n\
                   Keep-Alive: timeout=5\r\nProxy-Connection: keep-alive\r\nTE: trailers\r\nTrailer: X-T\r\n\
                   Upgrade: websocket\r\nX-Kept: yes\r\n\r\n"),
            Step::Answer(named("GET /h")),
        ],
        replies: vec![],
        pod: PodExp::got(vec![preq("GET /h").h("x-kept", "yes")], 1),
    };
    /// `Connection: close` is honoured after the answer.
    connection_close_ends_the_connection: Case {
        steps: vec![
            send(b"GET /x HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n"),
            Step::Answer(named("GET /x").has("connection", "close")),
            Step::Closed,
        ],
        replies: vec![],
        pod: PodExp::got(vec![preq("GET /x")], 1),
    };

    // --- Expect (RFC 9110 §10.1.1) ------------------------------------------------------------

    /// podgate answers 100 itself, then reads the body; the Pod gets no Expect.
    expect_continue_is_answered_by_podgate: Case {
        steps: vec![
            send(b"POST /e HTTP/1.1\r\nHost: a.test\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n"),
            Step::Answer(ans(100)),
            send(b"hello"),
            Step::Answer(named("POST /e")),
        ],
        replies: vec![],
        pod: PodExp::got(vec![preq("POST /e").body("hello")], 1),
    };

    // --- Upgrades (RFC 9110 §7.8) -------------------------------------------------------------

    websocket_upgrade_is_tunnelled_after_101: Case {
        steps: vec![
            send(b"GET /ws HTTP/1.1\r\nHost: a.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
                   Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"),
            Step::Answer(ans(101).has("upgrade", "websocket").has("connection", "upgrade")),
            Step::Tunnel(b"ping", b"PING"),
            Step::Tunnel(b"GET /not-a-request HTTP/1.1\r\n\r\n", b"GET /NOT-A-REQUEST HTTP/1.1\r\n\r\n"),
        ],
        replies: vec![Reply::echo(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n",
        )],
        pod: PodExp {
            tunnel: Some(b"pingGET /not-a-request HTTP/1.1\r\n\r\n"),
            ..PodExp::got(vec![preq("GET /ws")
                .h("connection", "upgrade")
                .h("upgrade", "websocket")
                .h("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
                .h("sec-websocket-version", "13")], 1)
        },
    };
    /// h2c is not tunnelled: the request goes on as a plain one, and the request behind it is
    /// the next request.
    h2c_upgrade_is_dropped: Case {
        steps: vec![
            send(cat(&[
                b"GET /x HTTP/1.1\r\nHost: a.test\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n\
                  HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n",
                &get("/next"),
            ])),
            Step::Answer(named("GET /x")),
            Step::Answer(named("GET /next")),
        ],
        replies: vec![],
        pod: PodExp::got(vec![preq("GET /x"), preq("GET /next")], 1),
    };
    /// A Pod that switches to h2c anyway gets no tunnel: 502, and its connection is dropped.
    h2c_upgrade_answered_with_101_is_bad_gateway: Case {
        steps: vec![
            send(b"GET /x HTTP/1.1\r\nHost: a.test\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n\
                   HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n"),
            Step::Answer(ans(502)),
            Step::Reconnect,
            send(get("/s")),
            Step::Answer(named("GET /s")),
        ],
        replies: vec![Reply::keep(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\n",
        )],
        pod: PodExp::got(vec![preq("GET /x"), preq("GET /s")], 2),
    };

    // --- The upstream side: framing of the Pod's answers --------------------------------------

    pod_two_different_content_lengths_is_bad_gateway: untrusted(Reply::keep(
        "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 10\r\n\r\nokHTTP/1.1"), false);
    pod_content_length_and_transfer_encoding_is_bad_gateway: untrusted(Reply::keep(
        "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n"), false);
    pod_transfer_encoding_and_content_length_is_bad_gateway: untrusted(Reply::keep(
        "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n2\r\nok\r\n0\r\n\r\n"), false);
    pod_gzip_transfer_encoding_is_bad_gateway: untrusted(Reply::keep(
        "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nnot really gzip"), false);
    /// CHOSEN: the rule is "a TE other than chunked" from a Pod; `gzip, chunked` is one.
    pod_gzip_chunked_transfer_encoding_is_bad_gateway: untrusted(Reply::keep(
        "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n"), false);
    /// CHOSEN: a list of identical values is one length (RFC 9110 §8.6 lets a recipient take
    /// it as the single value, as it does identical duplicate fields, which the Pod rules
    /// accept; nginx 1.22 ignores the field and reads to the close, newer nginx answers 502).
    pod_listed_equal_content_lengths_are_one: relayed(
        Reply::keep("HTTP/1.1 200 OK\r\nContent-Length: 2, 2\r\n\r\nok"), ans(200).body("ok"), true);
    /// A list of different values cannot be a length.
    pod_listed_different_content_lengths_is_bad_gateway: untrusted(Reply::keep(
        "HTTP/1.1 200 OK\r\nContent-Length: 2, 3\r\n\r\nok!"), false);
    /// CHOSEN: as above.
    pod_content_length_with_sign_is_bad_gateway: untrusted(Reply::keep(
        "HTTP/1.1 200 OK\r\nContent-Length: +2\r\n\r\nok"), false);
    /// CHOSEN (RFC 9112 §6.1): Transfer-Encoding in an HTTP/1.0 answer is faulty framing:
    /// podgate may relay the de-chunked body (nginx 1.22 does) or answer 502, and either way the
    /// Pod connection is closed after it (the RFC's MUST), even though the Pod asked to keep it.
    pod_transfer_encoding_in_an_http10_answer_is_not_reused: Case {
        steps: vec![
            send(get("/r")),
            Step::AnswerOrBadGateway(ans(200).body("ok")),
            Step::Reconnect,
            send(get("/s")),
            Step::Answer(named("GET /s")),
        ],
        replies: vec![Reply::keep(
            "HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
        )],
        pod: PodExp::got(vec![preq("GET /r"), preq("GET /s")], 2),
    };
    /// Identical duplicates from a Pod are one length (RFC 9110 §8.6 MAY); the client gets one.
    pod_identical_content_lengths_are_one: relayed(
        Reply::keep("HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello"),
        ans(200).body("hello"), true);
    /// Issue 15, class 1, answer side.
    pod_connection_cannot_remove_content_length: relayed(
        Reply::keep("HTTP/1.1 200 OK\r\nConnection: content-length\r\nContent-Length: 5\r\n\r\nhello"),
        ans(200).body("hello"), true);
    pod_connection_cannot_remove_transfer_encoding: relayed(
        Reply::keep("HTTP/1.1 200 OK\r\nConnection: transfer-encoding\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"),
        ans(200).body("hello"), true);
    /// Hop-by-hop fields of the answer stay on the Pod's hop.
    pod_hop_by_hop_fields_are_not_passed_on: relayed(
        Reply::keep("HTTP/1.1 200 OK\r\nConnection: x-secret\r\nX-Secret: 1\r\nKeep-Alive: timeout=5\r\n\
                     X-Kept: yes\r\nContent-Length: 2\r\n\r\nok"),
        ans(200).body("ok").has("x-kept", "yes").lacks("x-secret").lacks("keep-alive"), true);
    /// A Pod that says it closes is not used again.
    pod_connection_close_is_not_reused: relayed(
        Reply::keep("HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok"),
        ans(200).body("ok"), false);
    /// Bytes after a Content-Length body are not an answer to anything: not passed on, and the
    /// connection they came on is not used again.
    pod_bytes_after_the_body_are_not_an_answer: relayed(
        Reply::keep([&b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"[..], SMUGGLED_ANSWER].concat()),
        ans(200).body("ok"), false);
    /// A body ended by the close reaches the client whole.
    pod_close_delimited_body_is_relayed: Case {
        steps: vec![
            send(get("/r")),
            Step::Answer(ans(200).body("until the Pod closes")),
            Step::Reconnect,
            send(get("/s")),
            Step::Answer(named("GET /s")),
        ],
        replies: vec![Reply::close("HTTP/1.1 200 OK\r\n\r\nuntil the Pod closes")],
        pod: PodExp::got(vec![preq("GET /r"), preq("GET /s")], 2),
    };
    /// A Pod that closes inside a Content-Length body: the client cannot get a whole answer.
    pod_closing_inside_the_body_cuts_the_answer: untrusted(Reply::close(
        "HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello"), true);

    // --- The upstream side: heads ---------------------------------------------------------

    /// Issue 15, class 4: no reason phrase made podgate panic.
    pod_status_line_without_reason: relayed(
        Reply::keep("HTTP/1.1 200\r\nContent-Length: 2\r\n\r\nok"), ans(200).body("ok"), true);
    pod_status_line_with_empty_reason: relayed(
        Reply::keep("HTTP/1.1 200 \r\nContent-Length: 2\r\n\r\nok"), ans(200).body("ok"), true);
    /// Issue 15, class 4: a non-ASCII reason phrase (obs-text is allowed in it).
    pod_status_line_with_non_ascii_reason: relayed(
        Reply::keep(b"HTTP/1.1 200 \xd6K \xff\r\nContent-Length: 2\r\n\r\nok"), ans(200).body("ok"), true);
    /// CHOSEN: bare LF line ends in an answer head are read as lines (nginx accepts them).
    pod_bare_lf_line_ends_are_read_as_lines: relayed(
        Reply::keep("HTTP/1.1 200 OK\nContent-Length: 2\nX-A: 1\n\nok"),
        ans(200).body("ok").has("x-a", "1"), true);
    /// CHOSEN: obs-fold in an answer is bad framing from a Pod (httparse refuses it).
    pod_obs_fold_is_bad_gateway: untrusted(Reply::keep(
        "HTTP/1.1 200 OK\r\nX-A: 1\r\n 2\r\nContent-Length: 2\r\n\r\nok"), false);
    /// CHOSEN: as above, for whitespace before a colon.
    pod_space_before_colon_is_bad_gateway: untrusted(Reply::keep(
        "HTTP/1.1 200 OK\r\nContent-Length : 2\r\n\r\nok"), false);
    /// CHOSEN: as above, for a bare CR.
    pod_bare_cr_is_bad_gateway: untrusted(Reply::keep(
        "HTTP/1.1 200 OK\r\nX-A: 1\r2\r\nContent-Length: 2\r\n\r\nok"), false);

    // --- The upstream side: chunked answers ---------------------------------------------------

    pod_chunked_answer_is_relayed: relayed(
        Reply::keep("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"),
        ans(200).body("hello world"), true);
    /// CHOSEN: as on the request side, the client gets podgate's chunk framing, without
    /// extensions.
    pod_chunk_extensions_are_dropped: relayed(
        Reply::keep("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;a=b\r\nhello\r\n0;c\r\n\r\n"),
        ans(200).body("hello"), true);
    /// Trailers reach the client only as fields podgate wrote, never framing ones.
    pod_trailers_are_fields: relayed(
        Reply::keep("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nX-T: 1\r\n\
                     Content-Length: 9\r\nTransfer-Encoding: chunked\r\n\r\n"),
        ans(200).body("hello").trailers_within(&[("x-t", "1")]), true);
    pod_bad_chunk_size_is_bad_gateway: untrusted(Reply::keep(
        "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n"), true);
    pod_chunk_size_of_17_digits_is_bad_gateway: untrusted(Reply::keep(
        "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n00000000000000005\r\nhello\r\n0\r\n\r\n"), true);
    pod_bare_lf_after_chunk_size_is_bad_gateway: untrusted(Reply::keep(
        "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\nhello\r\n0\r\n\r\n"), true);
    pod_bare_lf_after_chunk_data_is_bad_gateway: untrusted(Reply::keep(
        "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\n0\r\n\r\n"), true);
    /// `0\r\n\n` and an answer behind it, which a strict reader takes as the next answer.
    pod_bare_lf_ending_the_trailer_section_is_bad_gateway: untrusted(Reply::keep(
        [&b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\n"[..], SMUGGLED_ANSWER].concat()), true);
    pod_bare_lf_ending_a_trailer_field_is_bad_gateway: untrusted(Reply::keep(
        [&b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nX: y\n\n"[..], SMUGGLED_ANSWER].concat()), true);
    pod_chunked_answer_cut_short_is_cut: untrusted(Reply::close(
        "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"), true);

    // --- The upstream side: answers that have no body ---------------------------------------

    pod_204_is_relayed: relayed(
        Reply::keep("HTTP/1.1 204 No Content\r\n\r\n"), ans(204).body(""), true);
    /// A body after a 204 is not part of the answer, nor of the next one.
    pod_body_after_204_is_dropped: relayed(
        Reply::keep("HTTP/1.1 204 No Content\r\n\r\nhello"), ans(204).body(""), false);
    pod_body_after_204_with_content_length_is_dropped: relayed(
        Reply::keep("HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\nhello"), ans(204).body(""), false);
    pod_body_after_304_is_dropped: relayed(
        Reply::keep("HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\nhello"), ans(304).body(""), false);
    pod_answer_to_head_is_relayed: relayed_head(
        Reply::keep("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"), true);
    pod_body_after_head_answer_is_dropped: relayed_head(
        Reply::keep("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"), false);
    pod_100_before_the_answer_is_dropped: relayed(
        Reply::keep("HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"),
        ans(200).body("ok"), true);
    pod_103_before_the_answer_is_dropped: relayed(
        Reply::keep("HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\n\
                     HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"),
        ans(200).body("ok"), true);
    /// 101 to a request that asked for no upgrade.
    pod_101_without_upgrade_is_bad_gateway: untrusted(Reply::keep(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"), false);
}

// ------------------------------------------------------------------------------------------
// Running a case.

async fn run(name: &str, case: Case) {
    let replies = Arc::new(case.replies);
    let script: Script = Arc::new(move |n, req| {
        replies
            .get(n)
            .cloned()
            .unwrap_or_else(|| Reply::naming(req))
    });
    let pod = RawPod::start(script).await;
    let gw = Gateway::start(&one_pod_config(pod.addr), &[]).await;
    let mut failures = Vec::new();
    let mut transcripts = Vec::new();
    let mut client = RawClient::connect(gw.addr).await;
    for (i, step) in case.steps.iter().enumerate() {
        if let Err(e) = run_step(&mut client, &mut transcripts, step, gw.addr).await {
            failures.push(format!("client step {i} ({}): {e}", step_text(step)));
            break;
        }
    }
    transcripts.push(std::mem::take(&mut client.transcript));
    let log = gw.log_text();
    // Ending podgate ends every Pod connection: the Pod then holds all podgate ever sent it.
    drop(gw);
    let conns = pod.settled().await;
    check_pod(&case.pod, &conns, &mut failures);
    if log.contains("panicked") {
        failures.push("podgate panicked".into());
    }
    if !failures.is_empty() {
        let mut msg = format!("case {name}:\n  {}\n", failures.join("\n  "));
        for (i, t) in transcripts.iter().enumerate() {
            msg.push_str(&format!("client connection {i} read: \"{}\"\n", show(t)));
        }
        for (i, c) in conns.iter().enumerate() {
            msg.push_str(&format!("Pod connection {i} got: \"{}\"\n", show(&c.raw)));
        }
        let tail: Vec<&str> = log.lines().rev().take(15).collect();
        msg.push_str("podgate log (last lines):\n");
        for l in tail.iter().rev() {
            msg.push_str(&format!("  {l}\n"));
        }
        panic!("{msg}");
    }
}

fn step_text(step: &Step) -> String {
    match step {
        Step::Send(b) => format!("send \"{}\"", show(b)),
        Step::Answer(e) => exp_text(e),
        Step::AnswerOrBadGateway(e) => format!("{} or 502", exp_text(e)),
        Step::Tunnel(s, r) => format!("tunnel \"{}\" -> \"{}\"", show(s), show(r)),
        other => format!("{other:?}"),
    }
}

fn exp_text(e: &Exp) -> String {
    format!(
        "answer {}{} body {} has {:?} lacks {:?}",
        e.status,
        if e.head_only { " to HEAD" } else { "" },
        e.body
            .as_ref()
            .map_or("any".to_string(), |b| format!("\"{}\"", show(b))),
        e.has,
        e.lacks
    )
}

fn got_text(got: &Got) -> String {
    match got {
        Got::Answer(m) => format!(
            "answer {:?} {:?} body \"{}\" trailers {:?}",
            m.start,
            m.headers,
            show(&m.body),
            m.trailers
        ),
        Got::Closed => "the end of the connection".into(),
        Got::Truncated(b) => format!("an answer cut short: \"{}\"", show(b)),
        Got::Malformed(e, b) => format!("malformed bytes ({e}): \"{}\"", show(b)),
        Got::Silent(b) => format!("silence after \"{}\"", show(b)),
    }
}

async fn run_step(
    client: &mut RawClient,
    transcripts: &mut Vec<Vec<u8>>,
    step: &Step,
    addr: std::net::SocketAddr,
) -> Result<(), String> {
    match step {
        Step::Send(bytes) => client.send(bytes).await,
        Step::Reconnect => {
            let old = std::mem::replace(client, RawClient::connect(addr).await);
            transcripts.push(old.transcript);
        }
        Step::Answer(exp) => match client.next(exp.head_only).await {
            Got::Answer(m) => check_answer(exp, &m)?,
            other => return Err(format!("expected an answer, got {}", got_text(&other))),
        },
        Step::AnswerOrBadGateway(exp) => match client.next(exp.head_only).await {
            Got::Answer(m) if m.status() == 502 => {}
            Got::Answer(m) => check_answer(exp, &m)?,
            other => return Err(format!("expected an answer, got {}", got_text(&other))),
        },
        Step::Closed => match client.next(false).await {
            Got::Closed => {}
            other => return Err(format!("expected the end, got {}", got_text(&other))),
        },
        Step::RejectOrClose(status) => match client.next(false).await {
            Got::Closed => {}
            Got::Answer(m) if m.status() == *status => match client.next(false).await {
                Got::Closed => {}
                other => {
                    return Err(format!(
                        "expected the end after the {status}, got {}",
                        got_text(&other)
                    ))
                }
            },
            other => {
                return Err(format!(
                    "expected {status} or the end, got {}",
                    got_text(&other)
                ))
            }
        },
        Step::FailOrCut(status) => match client.next(false).await {
            Got::Answer(m) if m.status() == *status => {}
            Got::Truncated(b) if b.windows(4).any(|w| w == b"\r\n\r\n") => {}
            other => {
                return Err(format!(
                    "expected {status} or an answer cut short, got {}",
                    got_text(&other)
                ))
            }
        },
        Step::Tunnel(out, back) => {
            client.send(out).await;
            let got = client.exact(back.len()).await;
            if got != *back {
                return Err(format!("tunnel gave back \"{}\"", show(&got)));
            }
        }
    }
    Ok(())
}

fn check_answer(exp: &Exp, m: &Message) -> Result<(), String> {
    let mut wrong = Vec::new();
    if m.status() != exp.status {
        wrong.push(format!("status {} instead of {}", m.status(), exp.status));
    }
    if let Some(body) = &exp.body {
        if &m.body != body {
            wrong.push(format!(
                "body \"{}\" instead of \"{}\"",
                show(&m.body),
                show(body)
            ));
        }
    }
    for (name, value) in &exp.has {
        let found = m.headers.iter().any(|(n, v)| {
            n.eq_ignore_ascii_case(name)
                && (v.eq_ignore_ascii_case(value)
                    || v.split(',').any(|t| t.trim().eq_ignore_ascii_case(value)))
        });
        if !found {
            wrong.push(format!("no {name}: {value}"));
        }
    }
    for name in &exp.lacks {
        if m.header(name).is_some() {
            wrong.push(format!("{name} was passed on"));
        }
    }
    // podgate writes its own Connection field: only its own tokens may be in it.
    for (n, v) in &m.headers {
        if n == "connection"
            && !v.split(',').all(|t| {
                ["close", "keep-alive", "upgrade"]
                    .iter()
                    .any(|k| t.trim().eq_ignore_ascii_case(k))
            })
        {
            wrong.push(format!("connection: {v} was passed on"));
        }
    }
    for t in &m.trailers {
        if !exp
            .trailers_within
            .iter()
            .any(|(n, v)| t.0 == *n && t.1 == *v)
        {
            wrong.push(format!("trailer {t:?} was passed on"));
        }
    }
    if wrong.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "{} in answer {:?} {:?} body \"{}\"",
            wrong.join(", "),
            m.start,
            m.headers,
            show(&m.body)
        ))
    }
}

/// The fields of a request as the Pod got them, minus framing and the ones podgate adds, and
/// minus a Connection field of podgate's own (`keep-alive` / `close`); sorted.
fn comparable(headers: &Fields) -> Vec<(String, String)> {
    const PODGATE_ADDS: [&str; 6] = [
        "content-length",
        "transfer-encoding",
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-forwarded-host",
        "x-request-id",
    ];
    let mut out: Vec<(String, String)> = headers
        .iter()
        .filter(|(n, _)| !PODGATE_ADDS.contains(&n.as_str()))
        .filter(|(n, v)| {
            n != "connection"
                || !v.split(',').all(|t| {
                    ["close", "keep-alive"].contains(&t.trim().to_ascii_lowercase().as_str())
                })
        })
        .map(|(n, v)| {
            let v = if n == "connection" {
                v.to_ascii_lowercase()
            } else {
                v.clone()
            };
            (n.clone(), v)
        })
        .collect();
    out.sort();
    out
}

fn check_pod(exp: &PodExp, conns: &[PodConn], failures: &mut Vec<String>) {
    if let Some(n) = exp.connections {
        if conns.len() != n {
            failures.push(format!(
                "the Pod saw {} connections instead of {n}",
                conns.len()
            ));
        }
    }
    for (i, c) in conns.iter().enumerate() {
        if let Some(e) = &c.error {
            failures.push(format!(
                "Pod connection {i}: podgate wrote what a strict parser refuses: {e}"
            ));
        }
        if !c.closed {
            failures.push(format!("Pod connection {i} still open after podgate ended"));
        }
        if !c.leftover.is_empty() && !exp.partial {
            failures.push(format!(
                "Pod connection {i} ended inside a request: \"{}\"",
                show(&c.leftover)
            ));
        }
    }
    let got: Vec<&Message> = conns.iter().flat_map(|c| &c.requests).collect();
    for (i, m) in got.iter().enumerate() {
        let Some(want) = exp.requests.get(i) else {
            failures.push(format!(
                "the Pod got an unexpected request {i}: {:?} {:?} body \"{}\"",
                m.start,
                m.headers,
                show(&m.body)
            ));
            continue;
        };
        let mut want_headers = want.headers.clone();
        want_headers.sort();
        let wrong_trailer = m
            .trailers
            .iter()
            .find(|t| !want.trailers_within.contains(t));
        if m.start != want.line
            || comparable(&m.headers) != want_headers
            || m.body != want.body
            || wrong_trailer.is_some()
        {
            failures.push(format!(
                "Pod request {i}: got {:?} {:?} body \"{}\" trailers {:?}; want {:?} {:?} body \"{}\" trailers within {:?}",
                m.start,
                comparable(&m.headers),
                show(&m.body),
                m.trailers,
                want.line,
                want_headers,
                show(&want.body),
                want.trailers_within
            ));
        }
        if m.body.is_empty() && matches!(m.framing, Framed::Length(n) if n > 0) {
            failures.push(format!(
                "Pod request {i}: framing {:?} for an empty body",
                m.framing
            ));
        }
    }
    if got.len() < exp.requests.len() {
        failures.push(format!(
            "the Pod got {} requests instead of {}",
            got.len(),
            exp.requests.len()
        ));
    }
    let tunnel: Vec<u8> = conns.iter().flat_map(|c| c.tunnel.clone()).collect();
    match exp.tunnel {
        Some(want) if tunnel != want => failures.push(format!(
            "the Pod's tunnel got \"{}\" instead of \"{}\"",
            show(&tunnel),
            show(want)
        )),
        None if !tunnel.is_empty() => {
            failures.push(format!("the Pod got tunnel bytes \"{}\"", show(&tunnel)))
        }
        _ => {}
    }
}
