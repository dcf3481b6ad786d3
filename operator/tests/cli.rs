//! The `ferrun-operator` command line: what a user sees from `crd`, `render` and `run`, and
//! the exit codes scripts rely on (0 done, 1 job failed, 2 bad input or setup).

use std::process::{Command, Output};

fn operator(args: &[&str], envs: &[(&str, &str)]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ferrun-operator"))
        .args(args)
        .envs(envs.iter().copied())
        .output()
        .expect("run ferrun-operator")
}

fn example() -> String {
    concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../examples/operator/ddp-local.yaml"
    )
    .into()
}

#[test]
fn crd_prints_the_custom_resource_definition() {
    let out = operator(&["crd"], &[]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.starts_with("apiVersion: apiextensions.k8s.io/v1\nkind: CustomResourceDefinition\n"),
        "{}",
        &text[..200]
    );
    assert!(text.contains("name: pytorchjobs.kubeflow.org"));
}

#[test]
fn render_prints_every_pod_and_service_of_the_example() {
    let out = operator(&["render", &example()], &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let docs: Vec<serde_yaml::Value> = text
        .split("---\n")
        .filter(|d| !d.trim().is_empty())
        .map(|d| serde_yaml::from_str(d).expect("yaml"))
        .collect();
    let names: Vec<(String, String)> = docs
        .iter()
        .map(|d| {
            (
                d["kind"].as_str().unwrap_or_default().to_owned(),
                d["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
            )
        })
        .collect();
    let expected: Vec<(String, String)> = [
        "ddp-local-master-0",
        "ddp-local-worker-0",
        "ddp-local-worker-1",
    ]
    .iter()
    .flat_map(|n| {
        [
            ("Pod".to_owned(), (*n).to_owned()),
            ("Service".to_owned(), (*n).to_owned()),
        ]
    })
    .collect();
    assert_eq!(names, expected);
}

#[test]
fn a_missing_or_bad_job_file_is_named_with_exit_code_2() {
    let out = operator(&["local", "/nonexistent/job.yaml"], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("read /nonexistent/job.yaml"));
}

#[test]
fn run_without_a_cluster_says_what_is_missing() {
    let home = tempfile::tempdir().expect("home");
    let out = operator(
        &["run", "--metrics-addr", "127.0.0.1:0"],
        &[
            ("HOME", &home.path().display().to_string()),
            ("KUBECONFIG", "/nonexistent/kubeconfig"),
            ("KUBERNETES_SERVICE_HOST", ""),
        ],
    );
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(
            "no Kubernetes configuration (an in-cluster service account, or ~/.kube/config)"
        ),
        "{err}"
    );
}

/// The example job with `Worker` replicas set to `replicas`, in a temporary file.
fn job_file(dir: &std::path::Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write job");
    path.display().to_string()
}

#[test]
fn absurd_replica_counts_and_hostile_yaml_are_refused_quickly_with_a_reason() {
    let dir = tempfile::tempdir().expect("tmp");
    let example = std::fs::read_to_string(example()).expect("example");
    assert!(example.contains("replicas: 2"), "the example has 2 workers");
    let huge = example.replacen("replicas: 2", "replicas: 2147483647", 1);
    let nested_flow = format!("a: {}{}\n", "[".repeat(100_000), "]".repeat(100_000));
    let mut nested_block = String::from("a:\n");
    for depth in 1..600 {
        nested_block.push_str(&" ".repeat(depth));
        nested_block.push_str("b:\n");
    }
    let oversized = format!("# {}\n{example}", "x".repeat(2 << 20));
    for (name, text, reason) in [
        ("huge.yaml", huge.as_str(), "at most 10000 replicas"),
        ("flow.yaml", nested_flow.as_str(), "nested deeper than 64"),
        ("block.yaml", nested_block.as_str(), "indented"),
        ("big.yaml", oversized.as_str(), "at most 1572864"),
    ] {
        let path = job_file(dir.path(), name, text);
        for verb in ["render", "local"] {
            let started = std::time::Instant::now();
            let out = operator(&[verb, &path], &[]);
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{verb} {name}: {stderr}");
            assert!(stderr.contains(reason), "{verb} {name}: {stderr}");
            // The bound is the behaviour: such input once took 20–67 s, or aborted.
            assert!(
                started.elapsed() < std::time::Duration::from_secs(10),
                "{verb} {name}"
            );
        }
    }
}
