//! A FAKE Kubernetes API server for the `kiln k8s` CLI tests: no real API
//! server runs here, so a small HTTP/1.1 server on 127.0.0.1 answers with
//! scripted replies, in order, and records every request. The `kiln`
//! binary reaches it through a kubeconfig, exactly as it would a cluster.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use kiln_testkit::fake_apiserver::transcript_line;
use serde_json::{Value, json};

pub(crate) use kiln_testkit::fake_apiserver::{Reply, failure, labelled, list, pod, unlabelled};

pub(crate) fn namespace(name: &str) -> Reply {
    Reply::Json(200, json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}))
}

struct Script {
    replies: std::collections::VecDeque<Reply>,
    lines: Vec<String>,
    bodies: Vec<Value>,
}

/// The fake server and a kubeconfig pointing at it (context `fake`,
/// namespace `kiln-test`).
pub(crate) struct FakeApiServer {
    script: Arc<Mutex<Script>>,
    kubeconfig: PathBuf,
    _dir: tempfile::TempDir,
}

impl FakeApiServer {
    pub(crate) fn start(replies: Vec<Reply>) -> FakeApiServer {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let script = Arc::new(Mutex::new(Script { replies: replies.into(), lines: Vec::new(), bodies: Vec::new() }));
        let shared = Arc::clone(&script);
        // Detached: it lives until the test process ends.
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let script = Arc::clone(&shared);
                std::thread::spawn(move || serve(stream, &script));
            }
        });
        let dir = tempfile::tempdir().unwrap();
        let kubeconfig = dir.path().join("kubeconfig");
        write_kubeconfig(&kubeconfig, &format!("http://127.0.0.1:{port}"));
        FakeApiServer { script, kubeconfig, _dir: dir }
    }

    pub(crate) fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// One line per request so far: verb, path and query, content type,
    /// and the JSON body (or a reference to it when long).
    pub(crate) fn transcript(&self) -> String {
        self.script.lock().unwrap().lines.join("\n")
    }

    /// The JSON request bodies so far.
    pub(crate) fn bodies(&self) -> Vec<Value> {
        self.script.lock().unwrap().bodies.clone()
    }

    /// Panics unless every scripted reply was used.
    pub(crate) fn assert_script_used(&self) {
        let script = self.script.lock().unwrap();
        assert!(
            script.replies.is_empty(),
            "kiln sent fewer requests than scripted ({} left):\n{}",
            script.replies.len(),
            script.lines.join("\n")
        );
    }
}

/// A kubeconfig for `server`, as a file kube reads.
pub(crate) fn write_kubeconfig(path: &Path, server: &str) {
    let text = format!(
        "apiVersion: v1\nkind: Config\ncurrent-context: fake\n\
         clusters:\n- name: fake\n  cluster:\n    server: {server}\n\
         users:\n- name: fake\n  user:\n    token: fake-token\n\
         contexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\n    namespace: kiln-test\n"
    );
    std::fs::write(path, text).unwrap();
}

/// Serves one keep-alive connection until the client closes it.
fn serve(stream: TcpStream, script: &Mutex<Script>) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut writer = stream;
    loop {
        let mut request_line = String::new();
        if reader.read_line(&mut request_line).unwrap_or(0) == 0 {
            return;
        }
        let mut content_length = 0;
        let mut content_type = None;
        let mut chunked = false;
        loop {
            let mut header = String::new();
            if reader.read_line(&mut header).unwrap_or(0) == 0 {
                return;
            }
            let header = header.trim_end();
            if header.is_empty() {
                break;
            }
            let (name, value) = header.split_once(':').unwrap_or((header, ""));
            let value = value.trim();
            match name.to_ascii_lowercase().as_str() {
                "content-length" => content_length = value.parse().unwrap(),
                "content-type" => content_type = Some(value.to_owned()),
                "transfer-encoding" => chunked = value.eq_ignore_ascii_case("chunked"),
                _ => {}
            }
        }
        let body = if chunked { read_chunked(&mut reader) } else { read_exact(&mut reader, content_length) };
        let mut words = request_line.split_whitespace();
        let (method, target) = (words.next().unwrap_or("").to_owned(), words.next().unwrap_or("").to_owned());
        let (status, reply_type, reply_body) = {
            let mut script = script.lock().unwrap();
            let script = &mut *script;
            let line = transcript_line(&method, &target, content_type.as_deref(), &body, &mut script.bodies);
            script.lines.push(line);
            match script.replies.pop_front() {
                Some(reply) => reply.answer(&body),
                None => {
                    script.lines.push("  (not scripted: answered 500)".to_owned());
                    failure(500, "InternalError", "not scripted").answer(&body)
                }
            }
        };
        let head = format!(
            "HTTP/1.1 {status} X\r\ncontent-type: {reply_type}\r\ncontent-length: {}\r\n\r\n",
            reply_body.len()
        );
        if writer.write_all(head.as_bytes()).and_then(|()| writer.write_all(&reply_body)).is_err() {
            return;
        }
    }
}

fn read_exact(reader: &mut impl Read, len: usize) -> Vec<u8> {
    let mut body = vec![0; len];
    reader.read_exact(&mut body).unwrap();
    body
}

fn read_chunked(reader: &mut impl BufRead) -> Vec<u8> {
    let mut body = Vec::new();
    loop {
        let mut size = String::new();
        reader.read_line(&mut size).unwrap();
        let size = usize::from_str_radix(size.trim(), 16).unwrap();
        body.extend(read_exact(reader, size));
        let mut crlf = String::new();
        reader.read_line(&mut crlf).unwrap();
        if size == 0 {
            return body;
        }
    }
}
