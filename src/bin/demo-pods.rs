//! Runs the quickstart's three demo Pods of service `httpbin`: versions v1, v2 and v3 on
//! 127.0.0.11:8080, 127.0.0.12:8080 and 127.0.0.13:8080 — one loopback IP per Pod and the same
//! port on each, as Pods have in a cluster (conf/quickstart/cluster lists them).
//!
//! They answer with the Pod names of conf/quickstart/cluster (`httpbin-v1-6d8f9`, ...).
//! `demo-pods NAME=IP:PORT ...` runs other Pods instead; the version is the part of NAME that
//! looks like `v1`, else the part after its last '-'.

use podgate::demo::{serve, DemoPod};

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "-h" || a == "--help") {
        eprintln!(
            "usage: demo-pods [NAME=IP:PORT ...]   (default: the quickstart's three httpbin Pods)"
        );
        return;
    }
    if args.is_empty() {
        args = [
            "httpbin-v1-6d8f9=127.0.0.11:8080",
            "httpbin-v2-5c7b4=127.0.0.12:8080",
            "httpbin-v3-8a1e2=127.0.0.13:8080",
        ]
        .map(String::from)
        .to_vec();
    }
    let mut tasks = Vec::new();
    for a in args {
        let Some((name, addr)) = a.split_once('=') else {
            eprintln!("demo-pods: `{a}` is not NAME=IP:PORT");
            std::process::exit(64);
        };
        let listener = match tokio::net::TcpListener::bind(addr).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!("demo-pods: cannot listen on {addr}: {e}");
                std::process::exit(1);
            }
        };
        let looks_like_version = |p: &&str| {
            p.len() > 1 && p.starts_with('v') && p[1..].bytes().all(|b| b.is_ascii_digit())
        };
        let version = name
            .split('-')
            .find(looks_like_version)
            .or_else(|| name.rsplit('-').next())
            .unwrap_or(name)
            .to_string();
        eprintln!("demo-pods: {name} listening on {addr}");
        tasks.push(tokio::spawn(serve(
            listener,
            DemoPod {
                name: name.to_string(),
                version,
            },
        )));
    }
    for t in tasks {
        let _ = t.await;
    }
}
