//! ferrun in Kubeflow, across crates and with the real kfp SDK: the pipelines of
//! `examples/kfp/` compiled (their IR checked) and run on this machine with kfp.local; the
//! PyTorchJob their launcher step submits, validated, rendered and run by `ferrun-operator
//! local`; TrainJobs rendered as Trainer v2 would, their nodes running `ferrun`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use ferrun_operator::trainjob::{self, local as trainjob_local, runtime};
use ferrun_operator::{load_job, names, render};
use ferrun_tests::{ferrun_binary, output_within, venv, workspace_binary};
use serde_yaml::Value;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The venv's python and this build's binaries first on PATH, as a user's shell would have.
fn path() -> String {
    let target = ferrun_binary()
        .parent()
        .expect("target dir")
        .display()
        .to_string();
    let bin = venv().join("bin").display().to_string();
    format!(
        "{target}:{bin}:{}",
        std::env::var("PATH").unwrap_or_default()
    )
}

/// One job at a time: on a small machine each gets the cores its processes need.
fn turn() -> std::sync::MutexGuard<'static, ()> {
    static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());
    ONE_AT_A_TIME.lock().unwrap_or_else(PoisonError::into_inner)
}

fn run(cmd: &mut Command, limit: u64) -> Output {
    let child = cmd
        .env("PATH", path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    output_within(child, Duration::from_secs(limit))
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn python(args: &[&str]) -> Output {
    run(
        Command::new(venv().join("bin/python"))
            .args(args)
            .current_dir(repo()),
        300,
    )
}

fn strings(v: &Value) -> Vec<String> {
    v.as_sequence()
        .expect("a list")
        .iter()
        .map(|s| s.as_str().expect("a string").to_owned())
        .collect()
}

fn keys(v: &Value) -> Vec<String> {
    let mut k: Vec<String> = v
        .as_mapping()
        .expect("a mapping")
        .keys()
        .map(|k| k.as_str().expect("key").to_owned())
        .collect();
    k.sort();
    k
}

/// `v` with every number a float: KFP's IR keeps constants as protobuf Struct values, whose
/// numbers are doubles (`1.0` for the manifest's `1`).
fn numbers_as_floats(v: &Value) -> Value {
    match v {
        Value::Number(n) => Value::from(n.as_f64().expect("a number")),
        Value::Sequence(s) => Value::Sequence(s.iter().map(numbers_as_floats).collect()),
        Value::Mapping(m) => Value::Mapping(
            m.iter()
                .map(|(k, v)| (k.clone(), numbers_as_floats(v)))
                .collect(),
        ),
        other => other.clone(),
    }
}

fn compiled() -> (tempfile::TempDir, impl Fn(&str) -> Value) {
    let dir = tempfile::tempdir().expect("temp dir");
    let out = python(&["examples/kfp/compile.py", &dir.path().display().to_string()]);
    assert!(out.status.success(), "{}", text(&out));
    let root = dir.path().to_owned();
    (dir, move |file: &str| {
        let ir = std::fs::read_to_string(root.join(file)).expect("IR");
        serde_yaml::from_str(&ir).expect("IR YAML")
    })
}

#[test]
fn the_pipelines_compile_to_ir_whose_steps_run_ferrun_with_their_placeholders() {
    let (_dir, ir) = compiled();
    let digits = ir("digits.yaml");
    assert_eq!(digits["schemaVersion"], "2.1.0");
    assert_eq!(digits["sdkVersion"], "kfp-2.17.3");
    assert_eq!(
        digits["components"]["comp-ferrun-train"]["executorLabel"],
        "exec-ferrun-train"
    );
    let container = &digits["deploymentSpec"]["executors"]["exec-ferrun-train"]["container"];
    assert_eq!(container["image"], "ghcr.io/ferrun/ferrun:0.1");
    assert_eq!(strings(&container["command"]), ["ferrun"]);
    let param = |p: &str| format!("{{{{$.inputs.parameters['{p}']}}}}");
    let artifact = |a: &str| format!("{{{{$.outputs.artifacts['{a}'].path}}}}");
    let expected = [
        "--standalone".into(),
        "--nproc-per-node".into(),
        param("nproc_per_node"),
        "--no-python".into(),
        "ferrun-train".into(),
        "--epochs".into(),
        param("epochs"),
        "--batch-size".into(),
        param("batch_size"),
        "--lr".into(),
        param("lr"),
        "--stage".into(),
        param("stage"),
        "--metrics-file".into(),
        artifact("metrics"),
        "--checkpoint-dir".into(),
        artifact("model"),
    ];
    assert_eq!(strings(&container["args"]), expected);
    let root = &digits["root"];
    assert_eq!(
        keys(&root["inputDefinitions"]["parameters"]),
        ["batch_size", "epochs", "lr", "nproc_per_node", "stage"]
    );
    assert_eq!(
        root["inputDefinitions"]["parameters"]["epochs"]["parameterType"],
        "NUMBER_INTEGER"
    );
    assert_eq!(
        keys(&root["outputDefinitions"]["artifacts"]),
        ["metrics", "model"]
    );
    assert_eq!(
        root["outputDefinitions"]["artifacts"]["metrics"]["artifactType"]["schemaTitle"],
        "system.Metrics"
    );

    // The local pipeline's step is a lightweight component: kfp's executor in ferrun's image,
    // no kfp installed at run time.
    let local = ir("digits-local.yaml");
    let container = &local["deploymentSpec"]["executors"]["exec-ferrun-train-local"]["container"];
    assert_eq!(container["image"], "ghcr.io/ferrun/ferrun:0.1");
    let command = strings(&container["command"]).join(" ");
    assert!(
        command.contains("kfp.dsl.executor_main") && !command.contains("pip install"),
        "{command}"
    );
    assert!(strings(&container["args"])
        .iter()
        .any(|a| a == "ferrun_train_local"));
    assert_eq!(
        keys(&local["root"]["outputDefinitions"]["artifacts"]),
        ["Output"]
    );

    // The launcher step submits the job the plain function builds, through the training SDK.
    let launcher = ir("pytorchjob.yaml");
    let container = &launcher["deploymentSpec"]["executors"]["exec-launch-pytorchjob"]["container"];
    assert!(strings(&container["command"])
        .join(" ")
        .contains("kubeflow-training==1.9.4"));
    let job = &launcher["root"]["dag"]["tasks"]["launch-pytorchjob"]["inputs"]["parameters"]["job"]
        ["runtimeValue"]["constant"];
    let manifest: Value =
        serde_yaml::from_slice(&manifest("j = p.pytorchjob_manifest()")).expect("manifest JSON");
    assert_eq!(numbers_as_floats(job), numbers_as_floats(&manifest));
    assert_eq!(
        keys(&launcher["root"]["inputDefinitions"]["parameters"]),
        ["delete_after", "namespace", "wait_timeout_s"]
    );
}

#[test]
fn the_local_pipeline_trains_and_its_metrics_artifact_holds_the_accuracy() {
    let _turn = turn();
    let out = python(&[
        "examples/kfp/run_local.py",
        "--epochs",
        "20",
        "--nproc-per-node",
        "4",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last: Value = serde_yaml::from_str(stdout.lines().last().expect("a line")).expect("JSON");
    let accuracy = last["metrics"]["accuracy"].as_f64().expect("accuracy");
    assert!(
        accuracy >= 0.95,
        "held-out accuracy {accuracy}: {}",
        text(&out)
    );
    assert_eq!(last["metrics"]["world_size"].as_f64(), Some(4.0));
    assert!(last["uri"]
        .as_str()
        .is_some_and(|u| u.ends_with("/metrics")));
}

#[test]
fn a_malformed_pipeline_parameter_fails_the_step_saying_what_to_give() {
    let out = python(&["examples/kfp/run_local.py", "--stage", "zero9"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains("stage 'zero9': use one of ddp, zero1, zero2, zero3"),
        "{}",
        text(&out)
    );
    let out = python(&["examples/kfp/run_local.py", "--epochs", "0"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out).contains("epochs is 0: give at least 1"),
        "{}",
        text(&out)
    );
}

/// The held-out accuracy on rank 0's `final: accuracy=…` line.
fn final_accuracy(text: &str) -> f64 {
    text.split("final: accuracy=")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no final line from rank 0 in {text}"))
}

/// A port free right now on loopback (the kernel's pick).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

#[test]
fn the_launcher_steps_pytorchjob_is_valid_means_its_world_and_runs_to_succeeded() {
    let port = free_port();
    let manifest = manifest(&format!(
        "j = p.pytorchjob_manifest(workers=1, nproc_per_node=2, epochs=20, port={port})"
    ));
    let job = load_job(&String::from_utf8_lossy(&manifest)).expect("the operator takes it");
    let replicas = names::replicas(&job);
    assert_eq!(replicas.len(), 2);
    for (rank, (rtype, index)) in replicas.iter().enumerate() {
        let env: Vec<(String, String)> = render::environment(&job, rtype, *index)
            .into_iter()
            .map(|v| (v.name, v.value.unwrap_or_default()))
            .collect();
        for (k, v) in [
            ("WORLD_SIZE", "4".to_owned()),
            ("PET_NPROC_PER_NODE", "2".into()),
            ("PET_NNODES", "2".into()),
            ("PET_NODE_RANK", rank.to_string()),
            ("MASTER_ADDR", "ferrun-digits-master-0".into()),
            ("MASTER_PORT", port.to_string()),
        ] {
            assert!(
                env.contains(&(k.to_owned(), v.clone())),
                "{k}={v} in {env:?}"
            );
        }
    }
    // The step's own code (the training SDK's TrainingClient) against a stand-in API server
    // that runs each created job with `ferrun-operator local`.
    let _turn = turn();
    let out = launcher_step(&manifest);
    let text = text(&out);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("result: Succeeded: PyTorchJob is successfully completed."),
        "{text}"
    );
    let accuracy = final_accuracy(&text);
    assert!(accuracy >= 0.95, "{accuracy}: {text}");
    assert!(text.contains("world=4"), "{text}");
    let path = "/apis/kubeflow.org/v1/namespaces/team/pytorchjobs";
    let requests = text.split("requests: ").nth(1).expect("requests line");
    assert!(
        requests.starts_with(&format!("[\"POST {path}\", \"GET {path}/ferrun-digits\"")),
        "{requests}"
    );
    assert!(
        requests
            .trim_end()
            .ends_with(&format!("\"DELETE {path}/ferrun-digits\"]")),
        "{requests}"
    );
}

/// Runs the launcher step's Python function on `job` (JSON) against the stand-in API server.
fn launcher_step(job: &[u8]) -> Output {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("job.json");
    std::fs::write(&file, job).expect("job file");
    let script = repo().join("tests/workers/kfp_launcher_step.py");
    python(&[
        &script.display().to_string(),
        &file.display().to_string(),
        "team",
    ])
}

/// A PyTorchJob from `examples/kfp`'s builder, as JSON: `build` is Python that binds `j`, with
/// the pipelines module as `p`.
fn manifest(build: &str) -> Vec<u8> {
    let code = format!(
        "import json, sys; sys.path.insert(0, 'examples/kfp'); import ferrun_pipelines as p; {build}; print(json.dumps(j))"
    );
    let out = python(&["-c", &code]);
    assert!(out.status.success(), "{}", text(&out));
    out.stdout
}

#[test]
fn a_pytorchjob_that_fails_fails_the_launcher_step_and_is_still_deleted() {
    let port = free_port();
    // A stage the trainer refuses (exit 2), past the builder's own check, and no retries.
    let manifest = manifest(&format!(
        "j = p.pytorchjob_manifest(workers=0, port={port}); j['spec']['runPolicy']['backoffLimit'] = 0; c = j['spec']['pytorchReplicaSpecs']['Master']['template']['spec']['containers'][0]; c['args'] = ['--stage', 'zero9']"
    ));
    let _turn = turn();
    let out = launcher_step(&manifest);
    let text = text(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("the step failed: PyTorchJob team/ferrun-digits failed: PyTorchJobFailed"),
        "{text}"
    );
    assert!(
        text.contains("DELETE /apis/kubeflow.org/v1/namespaces/team/pytorchjobs/ferrun-digits"),
        "{text}"
    );
}

#[test]
fn trainers_environment_for_two_nodes_of_two_gives_every_worker_its_place() {
    let results = tempfile::tempdir().expect("temp dir");
    let script = repo().join("tests/workers/gloo_job.py");
    let yaml = format!(
        r#"
apiVersion: trainer.kubeflow.org/v1alpha1
kind: TrainJob
metadata: {{name: gloo}}
spec:
  runtimeRef: {{name: torch-distributed}}
  trainer:
    numNodes: 2
    numProcPerNode: 2
    command: ["{ferrun}", "{script}"]
    env:
      - {{name: PYTHON_EXEC, value: "{python}"}}
      - {{name: RESULT_DIR, value: "{results}"}}
"#,
        ferrun = ferrun_binary().display(),
        script = script.display(),
        python = venv().join("bin/python").display(),
        results = results.path().display(),
    );
    let job = trainjob::load_trainjob(&yaml).expect("TrainJob");
    let runtime = runtime::resolve(&job, &[]).expect("torch-distributed");
    let options = trainjob_local::RunOptions {
        timeout: Some(Duration::from_secs(120)),
        master_port: Some(free_port()),
        forward_signals: false,
    };
    let _turn = turn();
    let outcome = trainjob_local::run(&job, &runtime, &options).expect("local run");
    assert!(outcome.succeeded(), "{outcome:?}");
    let mut lines: Vec<String> = std::fs::read_dir(results.path())
        .expect("results")
        .map(|e| std::fs::read_to_string(e.expect("entry").path()).expect("result"))
        .collect();
    lines.sort();
    // Node i (its completion index) holds ranks 2i and 2i + 1.
    let expected: Vec<String> = (0..4)
        .map(|r| {
            format!(
                "rank={r} world=4 group_rank={} local_world=2 sum=10 trained=True identical=True",
                r / 2
            )
        })
        .collect();
    assert_eq!(lines, expected);
}

#[test]
fn the_example_trainjob_trains_the_digits_under_local_mode() {
    let _turn = turn();
    let out = run(
        Command::new(workspace_binary("ferrun-operator"))
            .args([
                "local",
                "--timeout",
                "240",
                "--master-port",
                "0",
                "--runtime",
            ])
            .arg(repo().join("examples/trainjob/ferrun-runtime.yaml"))
            .arg(repo().join("examples/trainjob/ferrun-digits.yaml")),
        300,
    );
    let text = text(&out);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("trainjob ferrun-digits: Complete"), "{text}");
    let accuracy = final_accuracy(&text);
    assert!(accuracy >= 0.95, "{accuracy}: {text}");
    assert!(text.contains("world=4"), "2 nodes × 2 processes: {text}");
}

#[test]
fn ferrun_called_as_torchrun_is_ferrun_and_every_example_names_the_image_that_has_both() {
    // The image links `torchrun` to `ferrun`: the same binary under that name must launch.
    let dir = tempfile::tempdir().expect("temp dir");
    let torchrun = dir.path().join("torchrun");
    std::os::unix::fs::symlink(ferrun_binary(), &torchrun).expect("symlink");
    let out = run(
        Command::new(&torchrun).args([
            "--standalone",
            "--nproc-per-node",
            "2",
            "--no-python",
            "sh",
            "-c",
            "echo rank=$RANK of $WORLD_SIZE",
        ]),
        60,
    );
    let text = text(&out);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("rank=0 of 2") && text.contains("rank=1 of 2"),
        "{text}"
    );
    let dockerfile = std::fs::read_to_string(repo().join("Dockerfile")).expect("Dockerfile");
    for needed in [
        "ln -s ferrun /usr/local/bin/torchrun",
        "/src/target/release/ferrun-train",
        "scikit-learn==1.9.1",
        "kfp==2.17.3",
    ] {
        assert!(dockerfile.contains(needed), "the Dockerfile has {needed:?}");
    }
    let mut named = Vec::new();
    for file in [
        "examples/operator/ddp-local.yaml",
        "examples/trainjob/ferrun-runtime.yaml",
        "examples/kfp/ferrun_pipelines.py",
    ] {
        let text = std::fs::read_to_string(repo().join(file)).expect("example");
        // Where an image is set: `image: …` in YAML, `IMAGE = …` in the pipelines.
        let python = file.ends_with(".py");
        let setting = |l: &&str| {
            let l = l.trim_start();
            if python {
                l.starts_with("IMAGE =")
            } else {
                l.starts_with("image:") || l.starts_with("- image:")
            }
        };
        named.extend(text.lines().filter(setting).map(|l| {
            let image = l.split_whitespace().last().unwrap_or_default();
            (file, image.trim_matches('"').to_owned())
        }));
    }
    assert!(named.len() >= 4, "{named:?}");
    for (file, image) in named {
        assert_eq!(image, "ghcr.io/ferrun/ferrun:0.1", "{file}");
    }
}
