//! Property tests (fuzzing on the stable toolchain) of the code that reads untrusted HTTP/1.1
//! bytes: request and response heads, the framing decided from them, and the chunked decoder.
//!
//! Each property runs 256 cases per `cargo test` (a bounded run in CI). For a longer run:
//! `PROPTEST_CASES=200000 cargo test -p podgate-gateway --release h1::props`. A failing case
//! proptest finds is written to `gateway/proptest-regressions/h1/props.txt`; commit that file
//! and it is replayed first on every later run.

use super::body::{Chunked, Framing, Out};
use super::head::{parse_request, parse_response, BodyLength, HeadInfo, MAX_HEAD};
use bytes::BytesMut;
use proptest::prelude::*;

/// Bytes that look like HTTP often enough to reach deep states: head fragments, separators,
/// framing field names and odd bytes, in any order.
fn http_ish() -> impl Strategy<Value = Vec<u8>> {
    let atoms = prop_oneof![
        Just(b"GET / HTTP/1.1\r\n".to_vec()),
        Just(b"HTTP/1.1 200 OK\r\n".to_vec()),
        Just(b"HTTP/1.1 200\r\n".to_vec()),
        Just(b"Host: a\r\n".to_vec()),
        Just(b"Content-Length: 5\r\n".to_vec()),
        Just(b"Content-Length: 5, 6\r\n".to_vec()),
        Just(b"Transfer-Encoding: chunked\r\n".to_vec()),
        Just(b"Connection: content-length, close\r\n".to_vec()),
        Just(b"\r\n".to_vec()),
        Just(b"\n".to_vec()),
        Just(b"\r".to_vec()),
        Just(b" \t:;,".to_vec()),
        Just(b"0\r\n\r\n".to_vec()),
        Just(b"\xff\xe4\x00".to_vec()),
        proptest::collection::vec(any::<u8>(), 0..12),
    ];
    proptest::collection::vec(atoms, 0..24).prop_map(|v| v.concat())
}

/// A chunked encoding of `data` in chunks of the given sizes, with optional extensions and
/// trailers, as a sender might write it.
fn encode(data: &[u8], sizes: &[usize], ext: bool, trailers: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut rest = data;
    let mut i = 0;
    while !rest.is_empty() {
        let n = sizes.get(i).copied().unwrap_or(7).clamp(1, rest.len());
        i += 1;
        out.extend_from_slice(format!("{n:X}").as_bytes());
        if ext {
            out.extend_from_slice(b" ;name=\"v\"");
        }
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(&rest[..n]);
        out.extend_from_slice(b"\r\n");
        rest = &rest[n..];
    }
    out.extend_from_slice(b"0\r\n");
    out.extend_from_slice(trailers);
    out.extend_from_slice(b"\r\n");
    out
}

/// Decodes `wire` fed in pieces cut at `cuts`: the data, and how many bytes the body took.
fn decode(wire: &[u8], cuts: &[usize]) -> Result<(Vec<u8>, usize, bool), String> {
    let mut f = Framing::Chunked(Chunked::default());
    let mut out = Vec::new();
    let mut at = 0;
    let mut points: Vec<usize> = cuts.iter().map(|c| c % (wire.len() + 1)).collect();
    points.push(wire.len());
    points.sort_unstable();
    for p in points {
        if p < at {
            continue;
        }
        let piece = &wire[at..p];
        let (take, done) = f
            .take_into(piece, &mut out, Out::Plain)
            .map_err(|e| e.0.to_string())?;
        at += take;
        if done {
            return Ok((out, at, true));
        }
        if take < piece.len() {
            return Err("stopped early without being done".into());
        }
    }
    Ok((out, at, false))
}

proptest! {
    #[test]
    fn request_heads_never_panic_and_ranges_stay_inside(bytes in http_ish()) {
        let mut buf = BytesMut::from(&bytes[..]);
        if let Ok(Some(req)) = parse_request(&mut buf) {
            prop_assert!(req.raw.len() <= MAX_HEAD);
            let _ = req.target();
            let info = HeadInfo::gather(req.headers());
            // Whatever the framing decision, it never panics and a length is a real number.
            let _ = info.request_length(req.minor);
            for (n, _) in req.headers() {
                prop_assert!(!n.is_empty());
            }
        }
    }

    #[test]
    fn response_heads_never_panic_and_ranges_stay_inside(bytes in http_ish()) {
        let mut buf = BytesMut::from(&bytes[..]);
        if let Ok(Some(resp)) = parse_response(&mut buf) {
            prop_assert!((100..=999).contains(&resp.status));
            let reason = resp.reason();
            prop_assert!(reason.iter().all(|b| *b == b'\t' || (b' '..=b'~').contains(b)));
            let info = HeadInfo::gather(resp.headers());
            let _ = info.response_length(resp.minor);
        }
    }

    #[test]
    fn the_chunked_decoder_never_panics_nor_overreads(bytes in http_ish(), cut in 0usize..64) {
        let _ = decode(&bytes, &[cut]);
    }

    #[test]
    fn valid_chunked_bodies_decode_whole_wherever_they_are_cut(
        data in proptest::collection::vec(any::<u8>(), 0..300),
        sizes in proptest::collection::vec(1usize..40, 0..20),
        ext in any::<bool>(),
        trailer in any::<bool>(),
        cuts in proptest::collection::vec(any::<usize>(), 0..6),
    ) {
        let trailers: &[u8] = if trailer { b"X-Sum: 1\r\n" } else { b"" };
        let mut wire = encode(&data, &sizes, ext, trailers);
        let body_len = wire.len();
        wire.extend_from_slice(b"GET /next HTTP/1.1\r\n\r\n");
        let (out, took, done) = decode(&wire, &cuts).map_err(TestCaseError::fail)?;
        prop_assert!(done);
        prop_assert_eq!(took, body_len);
        prop_assert_eq!(out, data.clone());

        // Re-encoded by podgate, the body decodes to the same data and checked trailers.
        let mut f = Framing::Chunked(Chunked::default());
        let mut again = Vec::new();
        let (n, done) = f.take_into(&wire, &mut again, Out::Chunked).unwrap();
        prop_assert!(done && n == body_len);
        let (data2, took2, done2) = decode(&again, &[]).map_err(TestCaseError::fail)?;
        prop_assert!(done2 && took2 == again.len());
        prop_assert_eq!(data2, data);
        prop_assert_eq!(again.ends_with(b"0\r\nX-Sum: 1\r\n\r\n"), trailer);
    }

    #[test]
    fn a_bare_lf_anywhere_in_chunk_framing_is_refused(
        data in proptest::collection::vec(b'a'..=b'z', 1..50),
        sizes in proptest::collection::vec(1usize..10, 0..6),
        pick in any::<usize>(),
    ) {
        let wire = encode(&data, &sizes, false, b"X: y\r\n");
        // Every CRLF is framing (the data has no CR/LF): drop the CR of one of them.
        let crs: Vec<usize> = wire.windows(2).enumerate()
            .filter(|(_, w)| w == b"\r\n").map(|(i, _)| i).collect();
        let at = crs[pick % crs.len()];
        let mut bad = wire.clone();
        bad.remove(at);
        prop_assert!(decode(&bad, &[]).is_err(), "{:?}", String::from_utf8_lossy(&bad));
    }

    #[test]
    fn content_length_is_taken_only_as_plain_digits(v in "[0-9+ ,xa-f-]{0,22}") {
        let head = format!("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: {v}\r\n\r\n");
        let mut buf = BytesMut::from(head.as_bytes());
        if let Ok(Some(req)) = parse_request(&mut buf) {
            let info = HeadInfo::gather(req.headers());
            if let Ok(BodyLength::Length(n)) = info.request_length(1) {
                prop_assert!(v.trim().bytes().all(|b| b.is_ascii_digit()));
                prop_assert_eq!(v.trim().parse::<u64>().ok(), Some(n));
            }
        }
    }
}
