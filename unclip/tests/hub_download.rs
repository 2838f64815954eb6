//! The `hub` feature's downloads, against a local stand-in for the hub (`HF_ENDPOINT`) that
//! serves the embedded model the way the hub's `resolve` endpoint does (commit and etag headers,
//! byte ranges): an id missing from the cache is fetched into it and loads; a second load makes
//! no request; a repo the server does not have is `ModelNotFound` with the download's reason.
//!
//! `cargo test -p unclip --features hub --test hub_download`
#![cfg(feature = "hub")]

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use unclip::{Error, LoadOptions, Unclip, hub};

const REPO: &str = "unclip-test/shapes";
const COMMIT: &str = "89abcdef0123456789abcdef0123456789abcdef";

fn shapes() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/shapes")
}

/// Answers one request: `GET /<REPO>/resolve/main/<file>` with an optional `Range: bytes=a-b`.
fn serve(mut stream: TcpStream, root: &Path) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut request = String::new();
    reader.read_line(&mut request).unwrap();
    let mut range = None;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap() == 0 || line.trim().is_empty() {
            break;
        }
        let lower = line.to_ascii_lowercase();
        if let Some(r) = lower.strip_prefix("range: bytes=") {
            let (a, b) = r.trim().split_once('-').unwrap();
            range = Some((a.parse::<usize>().unwrap(), b.parse::<usize>().ok()));
        }
    }
    let path = request.split_whitespace().nth(1).unwrap_or("");
    let prefix = format!("/{REPO}/resolve/main/");
    let file = path.strip_prefix(&prefix).filter(|f| !f.contains(".."));
    let body = file.and_then(|f| std::fs::read(root.join(f)).ok());
    let Some(body) = body else {
        let msg = "Entry not found";
        let head = format!(
            "HTTP/1.1 404 Not Found\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            msg.len()
        );
        stream.write_all(head.as_bytes()).unwrap();
        stream.write_all(msg.as_bytes()).unwrap();
        return;
    };
    let size = body.len();
    let (start, end) = match range {
        Some((a, b)) => (a.min(size), b.map_or(size, |b| (b + 1).min(size))),
        None => (0, size),
    };
    // A content hash stands in for the hub's etag (the blob's name in the cache).
    let etag: u64 = body
        .iter()
        .fold(1469598103934665603u64, |h, &b| (h ^ b as u64).wrapping_mul(1099511628211));
    let head = format!(
        "HTTP/1.1 206 Partial Content\r\nContent-Length: {}\r\nContent-Range: bytes {}-{}/{size}\r\n\
         ETag: \"{etag:016x}{size:08x}\"\r\nX-Repo-Commit: {COMMIT}\r\nConnection: close\r\n\r\n",
        end - start,
        start,
        end.saturating_sub(1),
    );
    stream.write_all(head.as_bytes()).unwrap();
    stream.write_all(&body[start..end]).unwrap();
}

/// A server on a free loopback port, counting the requests it answers.
fn start_server(root: PathBuf) -> (String, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let count = Arc::new(AtomicUsize::new(0));
    let counter = count.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            counter.fetch_add(1, Ordering::SeqCst);
            serve(stream, &root);
        }
    });
    (format!("http://{addr}"), count)
}

#[test]
fn a_missing_id_is_downloaded_into_the_cache_then_loaded_offline() {
    let cache = std::env::temp_dir().join(format!("unclip-hub-download-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&cache);
    let (endpoint, requests) = start_server(shapes());
    // SAFETY: the only test of this binary; nothing else reads the environment meanwhile.
    unsafe {
        std::env::set_var("HF_ENDPOINT", &endpoint);
        for proxy in
            ["http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"]
        {
            std::env::remove_var(proxy);
        }
    }

    let snap = hub::resolve_in(Path::new(REPO), Some(&cache)).unwrap();
    assert_eq!(snap, hub::repo_dir(&cache, REPO).join("snapshots").join(COMMIT));
    assert_eq!(
        std::fs::read_to_string(hub::repo_dir(&cache, REPO).join("refs/main")).unwrap(),
        COMMIT
    );
    for f in
        ["model_index.json", "decoder/diffusion_pytorch_model.safetensors", "tokenizer/vocab.json"]
    {
        let got = std::fs::read(snap.join(f)).unwrap();
        assert_eq!(
            got,
            std::fs::read(shapes().join(f)).unwrap(),
            "{f} differs from the served file"
        );
    }
    let fetched = requests.load(Ordering::SeqCst);
    assert!(fetched > 10, "{fetched} requests");
    let model = Unclip::from_pretrained(&snap, &LoadOptions::default()).unwrap();
    assert!(model.prior.is_some());

    // Now cached: resolving again asks the server nothing.
    assert_eq!(hub::resolve_in(Path::new(REPO), Some(&cache)).unwrap(), snap);
    assert_eq!(requests.load(Ordering::SeqCst), fetched);

    // A repo the server does not have: not found, with the download's reason.
    let err = hub::resolve_in(Path::new("nobody/nothing"), Some(&cache)).unwrap_err();
    let Error::ModelNotFound { download: Some(why), .. } = &err else {
        panic!("expected ModelNotFound with a download reason, got {err}");
    };
    assert!(why.contains("model_index.json") && why.contains("404"), "{why}");
    std::fs::remove_dir_all(&cache).unwrap();
}
