//! API keys: every consumer's keys in one ring, and how a request's key is found in it.
//!
//! The ring holds SHA-256 digests of the keys, never the keys. A presented key is hashed, its
//! digest's first 8 bytes pick a bucket, and every digest of that bucket is compared with the
//! presented one in constant time (`subtle`), without stopping at a match: how long a check
//! takes says nothing about how much of a key was right. The ring is rebuilt in the background
//! when a key file changes and swapped in whole (`ArcSwap`); a request reads a snapshot.

use super::RequestView;
use ring::digest::{digest, SHA256};
use std::collections::HashMap;
use std::sync::Arc;
use subtle::ConstantTimeEq;

type Digest = [u8; 32];

fn sha256(key: &[u8]) -> Digest {
    let mut out = [0; 32];
    out.copy_from_slice(digest(&SHA256, key).as_ref());
    out
}

/// Every key of every consumer, as digests.
#[derive(Default)]
pub struct KeyRing {
    buckets: HashMap<u64, Vec<(Digest, Arc<str>)>>,
    len: usize,
}

impl std::fmt::Debug for KeyRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "KeyRing({} keys)", self.len)
    }
}

impl KeyRing {
    /// The ring of `(consumer, keys)`. A key listed for two consumers names neither (it is left
    /// out and named in the returned problems by its consumers, never by its value).
    pub fn build(consumers: &[(Arc<str>, Vec<String>)]) -> (KeyRing, Vec<String>) {
        let mut owner: HashMap<Digest, Option<Arc<str>>> = HashMap::new();
        let mut problems = Vec::new();
        for (name, keys) in consumers {
            for key in keys {
                let d = sha256(key.as_bytes());
                match owner.get_mut(&d) {
                    None => {
                        owner.insert(d, Some(name.clone()));
                    }
                    Some(Some(other)) if other != name => {
                        problems.push(format!(
                            "a key is listed for consumers `{other}` and `{name}`; it is \
                             refused until one file drops it"
                        ));
                        *owner.get_mut(&d).expect("present") = None;
                    }
                    Some(_) => {}
                }
            }
        }
        let mut ring = KeyRing::default();
        for (d, name) in owner {
            if let Some(name) = name {
                ring.buckets.entry(bucket(&d)).or_default().push((d, name));
                ring.len += 1;
            }
        }
        (ring, problems)
    }

    /// The consumer whose key `key` is.
    pub fn find(&self, key: &[u8]) -> Option<Arc<str>> {
        let d = sha256(key);
        let candidates = self.buckets.get(&bucket(&d))?;
        let mut found = None;
        for (stored, name) in candidates {
            if bool::from(stored.ct_eq(&d)) {
                found = Some(name);
            }
        }
        found.cloned()
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

fn bucket(d: &Digest) -> u64 {
    u64::from_le_bytes([d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]])
}

/// What a request carries where a key is expected.
#[derive(Debug, PartialEq, Eq)]
pub enum Presented<'a> {
    Absent,
    /// The field or parameter is given more than once (refused: which one counts is a guess
    /// another hop may make differently), or its value is empty.
    Ambiguous,
    Key(std::borrow::Cow<'a, [u8]>),
}

/// The key in header field `name`.
pub fn from_header<'a>(req: &RequestView<'a>, name: &str) -> Presented<'a> {
    let mut values = req.header_values(name);
    match (values.next(), values.next()) {
        (None, _) => Presented::Absent,
        (Some(v), None) => match v.trim_ascii() {
            [] => Presented::Ambiguous,
            v => Presented::Key(v.into()),
        },
        (Some(_), Some(_)) => Presented::Ambiguous,
    }
}

/// The key in query parameter `name` (compared as written), percent-decoded. `+` stays `+`:
/// keys are often base64, and a `+` sent raw means itself.
pub fn from_query<'a>(query: Option<&'a str>, name: &str) -> Presented<'a> {
    let mut found: Option<&'a str> = None;
    for pair in query.unwrap_or("").split('&') {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        if k == name {
            if found.is_some() {
                return Presented::Ambiguous;
            }
            found = Some(v);
        }
    }
    match found {
        None => Presented::Absent,
        Some("") => Presented::Ambiguous,
        Some(v) => match percent_decode(v) {
            Some(k) => Presented::Key(k),
            None => Presented::Ambiguous,
        },
    }
}

/// `%XX` decoding; `None` for a broken escape.
pub fn percent_decode(s: &str) -> Option<std::borrow::Cow<'_, [u8]>> {
    if !s.contains('%') {
        return Some(s.as_bytes().into());
    }
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = |c: u8| (c as char).to_digit(16);
            let hi = hex(*b.get(i + 1)?)?;
            let lo = hex(*b.get(i + 2)?)?;
            out.push((hi * 16 + lo) as u8);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    Some(out.into())
}

/// The query without every `name=…` parameter (for a key that must not reach the Pod);
/// `None` when nothing is left.
pub fn query_without(query: &str, name: &str) -> Option<String> {
    let kept: Vec<&str> = query
        .split('&')
        .filter(|p| p.split_once('=').map_or(*p, |(k, _)| k) != name)
        .collect();
    let joined = kept.join("&");
    (!joined.is_empty()).then_some(joined)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ring() -> KeyRing {
        let consumers = [
            (
                Arc::from("shop"),
                vec!["k-shop-1".to_string(), "k-shop-2".into()],
            ),
            (Arc::from("ops"), vec!["k-ops".to_string(), "shared".into()]),
            (Arc::from("pay"), vec!["shared".to_string()]),
        ];
        let (ring, problems) = KeyRing::build(&consumers);
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(
            !problems[0].contains("shared"),
            "a problem never shows the key"
        );
        ring
    }

    #[test]
    fn keys_name_their_consumer_and_a_shared_key_names_none() {
        let ring = ring();
        assert_eq!(ring.len(), 3);
        assert_eq!(ring.find(b"k-shop-2").as_deref(), Some("shop"));
        assert_eq!(ring.find(b"k-ops").as_deref(), Some("ops"));
        assert_eq!(ring.find(b"shared"), None);
        assert_eq!(ring.find(b"k-shop-"), None);
        assert_eq!(ring.find(b""), None);
    }

    #[test]
    fn query_keys_are_found_decoded_and_removed() {
        let q = Some("a=1&apikey=ab%2Bc+d&b=2");
        assert_eq!(
            from_query(q, "apikey"),
            Presented::Key(b"ab+c+d".to_vec().into())
        );
        assert_eq!(
            from_query(Some("apikey=1&apikey=2"), "apikey"),
            Presented::Ambiguous
        );
        assert_eq!(from_query(Some("apikey="), "apikey"), Presented::Ambiguous);
        assert_eq!(
            from_query(Some("apikey=%zz"), "apikey"),
            Presented::Ambiguous
        );
        assert_eq!(from_query(Some("xapikey=1"), "apikey"), Presented::Absent);
        assert_eq!(from_query(None, "apikey"), Presented::Absent);
        assert_eq!(
            query_without("a=1&apikey=x&b", "apikey").as_deref(),
            Some("a=1&b")
        );
        assert_eq!(query_without("apikey=x", "apikey"), None);
    }

    proptest! {
        /// Any query: no panic, and a key found is the decoded value of the one parameter of
        /// that name; removing it leaves no parameter of that name.
        #[test]
        fn query_extraction_never_panics(q in "[a-z0-9=&%+.~-]{0,40}") {
            if let Presented::Key(k) = from_query(Some(&q), "k") {
                prop_assert!(!k.is_empty());
                prop_assert_eq!(q.split('&').filter(|p| p.split_once('=').map_or(*p, |x| x.0) == "k").count(), 1);
            }
            if let Some(rest) = query_without(&q, "k") {
                prop_assert_eq!(from_query(Some(&rest), "k"), Presented::Absent);
            }
        }

        #[test]
        fn percent_decoding_never_panics_and_round_trips(bytes in proptest::collection::vec(any::<u8>(), 0..32)) {
            let encoded: String = bytes.iter().map(|b| format!("%{b:02X}")).collect();
            let decoded = percent_decode(&encoded).unwrap();
            prop_assert_eq!(decoded.as_ref(), bytes.as_slice());
            let s = String::from_utf8_lossy(&bytes);
            let _ = percent_decode(&s);
        }
    }
}
