//! ferrun's store against torch 2.13's own TCPStore: torch's client on ferrun's server, and
//! ferrun's client on torch's server, each compared with torch-to-torch / ferrun-to-ferrun.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use ferrun_collective::store::{StoreClient, StoreError, StoreServer};

/// The python of the torch 2.13 venv that `scripts/setup-python.sh` installs.
fn python() -> PathBuf {
    let venv = std::env::var_os("FERRUN_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var("HOME").unwrap_or_else(|_| "/root".into()))
                .join(".cache/ferrun/venv-torch-2.13.0")
        });
    let python = venv.join("bin/python");
    assert!(
        python.exists(),
        "no torch venv at {}: run scripts/test.sh (it installs torch 2.13.0) or set FERRUN_VENV",
        venv.display()
    );
    python
}

fn script(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/torch")
        .join(name)
}

/// Runs store_ops.py against `port` (0: torch's own server) and returns its JSON output.
fn torch_client_results(port: u16) -> serde_json::Value {
    let out = Command::new(python())
        .arg(script("store_ops.py"))
        .arg(port.to_string())
        .env("PYTHONWARNINGS", "ignore")
        .stderr(Stdio::piped())
        .output()
        .expect("run python");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "store_ops.py failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.lines().last().expect("output")).expect("json")
}

#[test]
fn torch_client_sees_the_same_answers_from_ferrun_and_from_torch() {
    let reference = torch_client_results(0);
    let server = StoreServer::bind("127.0.0.1:0".parse().expect("addr")).expect("bind");
    let ours = torch_client_results(server.local_addr().port());
    let (reference, ours) = (
        reference.as_array().expect("list"),
        ours.as_array().expect("list"),
    );
    assert_eq!(ours.len(), reference.len());
    for (o, r) in ours.iter().zip(reference) {
        assert_eq!(o, r, "torch's client got different answers (ferrun, torch)");
    }
    assert!(
        ours.iter()
            .any(|r| r[0] == "wait timeout" && r[1] == "error DistStoreError"),
        "{ours:?}"
    );
}

/// The same operations through ferrun's client, as a transcript.
async fn ferrun_client_transcript(port: u16) -> Vec<String> {
    let t = Duration::from_secs(30);
    let mut c = StoreClient::connect("127.0.0.1", port, t)
        .await
        .expect("connect");
    let mut log = Vec::new();
    let text = |v: Vec<u8>| String::from_utf8_lossy(&v).into_owned();
    log.push(text(c.get("from_torch").await.expect("get")));
    c.set("k", b"v").await.expect("set");
    log.push(text(c.get("k").await.expect("get")));
    log.push(c.add("n", 5).await.expect("add").to_string());
    log.push(text(c.compare_set("k", b"v", b"w").await.expect("cas")));
    log.push(text(
        c.compare_set("absent", b"e", b"z").await.expect("cas"),
    ));
    log.push(c.check(&["k", "nope"]).await.expect("check").to_string());
    let timeout = c.wait(&["never"], Duration::from_millis(200)).await;
    log.push(matches!(timeout, Err(StoreError::Timeout { .. })).to_string());
    c.multi_set(&[("a", b"1"), ("b", b"2")])
        .await
        .expect("multi_set");
    log.push(format!(
        "{:?}",
        c.multi_get(&["b", "a"]).await.expect("multi_get")
    ));
    log.push(c.delete_key("a").await.expect("delete").to_string());
    c.append("b", b"3").await.expect("append");
    log.push(text(c.get("b").await.expect("get")));
    log.push(c.num_keys().await.expect("num_keys").to_string());
    let mut run = c.prefixed("attempt_0");
    run.set("x", b"y").await.expect("prefixed set");
    log.push(text(run.get("x").await.expect("prefixed get")));
    log
}

#[tokio::test]
async fn ferrun_client_sees_the_same_answers_from_torch_and_from_ferrun() {
    let mut torch = Command::new(python())
        .arg(script("torch_server.py"))
        .env("PYTHONWARNINGS", "ignore")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start torch's server");
    let mut line = String::new();
    BufReader::new(torch.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("port");
    let torch_port: u16 = line.trim().parse().expect("port number");
    let theirs = ferrun_client_transcript(torch_port).await;
    drop(torch.stdin.take());
    torch.wait().expect("torch server exits");

    let server = StoreServer::bind("127.0.0.1:0".parse().expect("addr")).expect("bind");
    let mut seed = StoreClient::connect(
        "127.0.0.1",
        server.local_addr().port(),
        Duration::from_secs(30),
    )
    .await
    .expect("connect");
    seed.set("from_torch", b"hello").await.expect("seed");
    let ours = ferrun_client_transcript(server.local_addr().port()).await;
    assert_eq!(ours, theirs);
    assert_eq!(theirs[0], "hello");
}
