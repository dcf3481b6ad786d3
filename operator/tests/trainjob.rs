//! TrainJobs (Kubeflow Trainer v2): the pods and environment Trainer's torch plugin renders,
//! its webhook's checks, and `ferrun-operator local` running a TrainJob's nodes as processes
//! (shell commands here; ferrun and torch in the workspace's `tests/`).

use std::process::{Command, Output};

use ferrun_operator::trainjob::{self, crd::TrainJob, render, runtime};
use k8s_openapi::api::core::v1::Pod;

fn job(yaml: &str) -> TrainJob {
    trainjob::load_trainjob(yaml).unwrap_or_else(|e| panic!("{e}"))
}

const TWO_BY_TWO: &str = r#"
apiVersion: trainer.kubeflow.org/v1alpha1
kind: TrainJob
metadata: {name: digits, namespace: team}
spec:
  runtimeRef: {name: torch-distributed}
  trainer:
    numNodes: 2
    numProcPerNode: 2
    image: ghcr.io/ferrun/ferrun:0.1
    command: [ferrun, --no-python, ferrun-train]
    env: [{name: FERRUN_LOG, value: info}]
"#;

fn env(pod: &Pod) -> Vec<(String, String)> {
    let spec = pod.spec.as_ref().expect("spec");
    let node = spec
        .containers
        .iter()
        .find(|c| c.name == "node")
        .expect("node");
    node.env
        .iter()
        .flatten()
        .map(|v| {
            let value = v.value.clone().unwrap_or_else(|| {
                let from = v.value_from.as_ref().and_then(|f| f.field_ref.as_ref());
                format!("fieldRef:{}", from.expect("a value or a field").field_path)
            });
            (v.name.clone(), value)
        })
        .collect()
}

#[test]
fn two_nodes_get_torchruns_environment_as_trainer_renders_it() {
    let job = job(TWO_BY_TWO);
    let runtime = runtime::resolve(&job, &[]).expect("built-in runtime");
    trainjob::validate(&job, &runtime).expect("valid");
    let pods = render::pods(&job, &runtime);
    assert_eq!(pods.len(), 2);
    for (i, p) in pods.iter().enumerate() {
        let pod = &p.pod;
        let host = format!("digits-node-0-{i}");
        assert_eq!(pod.metadata.name.as_deref(), Some(host.as_str()));
        assert_eq!(pod.metadata.namespace.as_deref(), Some("team"));
        let spec = pod.spec.as_ref().expect("spec");
        assert_eq!(spec.hostname.as_deref(), Some(host.as_str()));
        assert_eq!(spec.subdomain.as_deref(), Some("digits"));
        let annotations = pod.metadata.annotations.clone().unwrap_or_default();
        assert_eq!(annotations[render::COMPLETION_INDEX], i.to_string());
        let index = "fieldRef:metadata.annotations['batch.kubernetes.io/job-completion-index']";
        assert_eq!(
            env(pod),
            [
                ("FERRUN_LOG", "info"),
                ("PET_NNODES", "2"),
                ("PET_NPROC_PER_NODE", "2"),
                ("PET_NODE_RANK", index),
                ("PET_MASTER_ADDR", "digits-node-0-0.digits"),
                ("PET_MASTER_PORT", "29500"),
                ("JOB_COMPLETION_INDEX", index),
            ]
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
        );
        let node = &spec.containers[0];
        assert_eq!(node.image.as_deref(), Some("ghcr.io/ferrun/ferrun:0.1"));
        assert_eq!(node.ports.as_ref().expect("ports")[0].container_port, 29500);
    }
    let service = render::service(&job);
    let spec = service.spec.expect("spec");
    assert_eq!(service.metadata.name.as_deref(), Some("digits"));
    assert_eq!(spec.cluster_ip.as_deref(), Some("None"));
    assert_eq!(
        spec.selector.expect("selector")[render::JOBSET_NAME],
        "digits"
    );
}

#[test]
fn processes_per_node_follow_the_torch_plugins_rules() {
    let with = |nproc: &str, resources: &str| {
        let yaml = format!(
            "apiVersion: trainer.kubeflow.org/v1alpha1\nkind: TrainJob\nmetadata: {{name: j}}\nspec:\n  runtimeRef: {{name: torch-distributed}}\n  trainer: {{{nproc} {resources}}}\n"
        );
        let job = job(&yaml);
        render::num_proc_per_node(&job, &runtime::torch_distributed())
    };
    assert_eq!(with("", ""), "auto");
    assert_eq!(with("numProcPerNode: 3,", ""), "3");
    assert_eq!(with("", "resourcesPerNode: {limits: {cpu: 4}}"), "4");
    assert_eq!(with("", "resourcesPerNode: {limits: {cpu: 500m}}"), "1");
    // GPUs in the limits and no requests: Trainer's `calculateNumProcPerNode` falls back to the
    // requests, finds none and gives 1 (recorded in TRAINJOB-CONTRACT.md); with requests, auto.
    assert_eq!(
        with("", "resourcesPerNode: {limits: {nvidia.com/gpu: 2}}"),
        "1"
    );
    assert_eq!(
        with(
            "",
            "resourcesPerNode: {limits: {nvidia.com/gpu: 2}, requests: {nvidia.com/gpu: 2}}"
        ),
        "auto"
    );
    assert_eq!(
        with(
            "numProcPerNode: cpu,",
            "resourcesPerNode: {requests: {cpu: 6}}"
        ),
        "6"
    );
    assert_eq!(
        with("numProcPerNode: 2,", "resourcesPerNode: {limits: {cpu: 8}}"),
        "2"
    );
}

#[test]
fn the_runtimes_environment_is_kept_and_the_trainers_replaces_it_by_name() {
    let runtime = r#"
apiVersion: trainer.kubeflow.org/v1alpha1
kind: ClusterTrainingRuntime
metadata: {name: mine}
spec:
  mlPolicy: {numNodes: 3, torch: {}}
  template:
    spec:
      replicatedJobs:
        - name: node
          template:
            metadata: {labels: {trainer.kubeflow.org/trainjob-ancestor-step: trainer}}
            spec:
              template:
                spec:
                  containers:
                    - name: node
                      image: ferrun:dev
                      command: [ferrun, train.py]
                      env: [{name: A, value: runtime}, {name: B, value: runtime}]
"#;
    let runtimes = trainjob::load_runtimes(runtime).expect("runtime");
    let job = job(
        "apiVersion: trainer.kubeflow.org/v1alpha1\nkind: TrainJob\nmetadata: {name: j}\nspec:\n  runtimeRef: {name: mine}\n  trainer: {env: [{name: B, value: job}]}\n",
    );
    let runtime = runtime::resolve(&job, &runtimes).expect("given runtime");
    let pods = render::pods(&job, &runtime);
    assert_eq!(pods.len(), 3, "the runtime's numNodes");
    let env = env(&pods[2].pod);
    assert_eq!(env[0], ("A".into(), "runtime".into()));
    assert_eq!(env[1], ("B".into(), "job".into()));
    assert!(env.contains(&("PET_NNODES".into(), "3".into())));
    assert!(env.contains(&("PET_NPROC_PER_NODE".into(), "auto".into())));
    let node = &pods[2].pod.spec.as_ref().expect("spec").containers[0];
    assert_eq!(
        node.command.clone().expect("command"),
        ["ferrun", "train.py"]
    );
}

#[test]
fn bad_trainjobs_are_refused_with_trainers_messages() {
    let reserved = TWO_BY_TWO.replace(
        "env: [{name: FERRUN_LOG, value: info}]",
        "env: [{name: PET_NODE_RANK, value: \"3\"}, {name: PET_MASTER_PORT, value: \"1\"}]",
    );
    let j = job(&reserved);
    let err = trainjob::validate(&j, &runtime::torch_distributed())
        .expect_err("reserved")
        .to_string();
    assert!(
        err.contains("spec.trainer.env: Invalid value: ")
            && err.contains("must not have reserved envs, invalid envs configured: [PET_MASTER_PORT PET_NODE_RANK]"),
        "{err}"
    );
    let nproc = TWO_BY_TWO.replace("numProcPerNode: 2", "numProcPerNode: many");
    let err = trainjob::validate(&job(&nproc), &runtime::torch_distributed())
        .expect_err("nproc")
        .to_string();
    assert!(
        err.contains("must have an int value or [auto cpu gpu]"),
        "{err}"
    );
    let none = TWO_BY_TWO.replace("  runtimeRef: {name: torch-distributed}\n", "");
    let err = runtime::resolve(&job(&none), &[])
        .expect_err("no runtime")
        .to_string();
    assert!(
        err.contains("spec.runtimeRef: Required value") && err.contains("torch-distributed"),
        "{err}"
    );
    let unknown = TWO_BY_TWO.replace("name: torch-distributed", "name: deepspeed");
    let err = runtime::resolve(&job(&unknown), &[])
        .expect_err("unknown")
        .to_string();
    assert!(
        err.contains("\"deepspeed\" not found") && err.contains("--runtime"),
        "{err}"
    );
    let long = TWO_BY_TWO.replace("name: digits,", &format!("name: {},", "d".repeat(60)));
    let err = trainjob::validate(&job(&long), &runtime::torch_distributed())
        .expect_err("long")
        .to_string();
    assert!(err.contains("at most 63"), "{err}");
    let cpu = TWO_BY_TWO.replace(
        "numProcPerNode: 2",
        "resourcesPerNode: {limits: {cpu: lots}}",
    );
    let err = trainjob::validate(&job(&cpu), &runtime::torch_distributed())
        .expect_err("cpu")
        .to_string();
    assert!(
        err.contains("resourcesPerNode.limits.cpu \"lots\": not a CPU quantity"),
        "{err}"
    );
    // Counts from a runtime are bounded before anything is rendered (no 2^31-pod vector).
    let mut huge = runtime::torch_distributed();
    huge.spec.template.spec.replicated_jobs[0].replicas = Some(i32::MAX);
    let err = trainjob::validate(&job(TWO_BY_TWO), &huge)
        .expect_err("huge")
        .to_string();
    assert!(
        err.contains("2147483647 copies") && err.contains("pods: at most 10000"),
        "{err}"
    );
    let err = trainjob::load_trainjob(&TWO_BY_TWO.replace("kind: TrainJob", "kind: PyTorchJob"))
        .expect_err("kind")
        .to_string();
    assert!(err.contains("expected TrainJob"), "{err}");
}

/// `ferrun-operator local` on a TrainJob file with a runtime file beside it.
fn local(job: &str, runtime: &str) -> Output {
    let dir = tempfile::tempdir().expect("temp dir");
    let (j, r) = (dir.path().join("job.yaml"), dir.path().join("runtime.yaml"));
    std::fs::write(&j, job.replace("$DIR", &dir.path().display().to_string())).expect("job");
    std::fs::write(
        &r,
        runtime.replace("$DIR", &dir.path().display().to_string()),
    )
    .expect("runtime");
    Command::new(env!("CARGO_BIN_EXE_ferrun-operator"))
        .args([
            "local",
            "--timeout",
            "40",
            "--master-port",
            "0",
            "--runtime",
        ])
        .args([&r, &j])
        .output()
        .expect("ferrun-operator")
}

const SHELL_RUNTIME: &str = r#"
apiVersion: trainer.kubeflow.org/v1alpha1
kind: ClusterTrainingRuntime
metadata: {name: shell}
spec:
  mlPolicy: {numNodes: 1, torch: {}}
  template:
    spec:
      replicatedJobs:
        - name: dataset-initializer
          template:
            spec:
              template:
                spec:
                  containers:
                    - name: dataset-initializer
                      image: busybox
                      command: [sh, -c, 'echo fetched | tee $DIR/dataset']
        - name: node
          template:
            metadata: {labels: {trainer.kubeflow.org/trainjob-ancestor-step: trainer}}
            spec:
              backoffLimit: 1
              template:
                spec:
                  containers: [{name: node, image: busybox}]
"#;

fn shell_job(command: &str) -> String {
    format!(
        "apiVersion: trainer.kubeflow.org/v1alpha1\nkind: TrainJob\nmetadata: {{name: sh}}\nspec:\n  runtimeRef: {{name: shell}}\n  trainer:\n    numNodes: 2\n    command: [sh, -c, '{command}']\n"
    )
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn local_mode_runs_the_initializer_then_every_node_with_its_rank_and_master() {
    let out = local(
        &shell_job("test -f $DIR/dataset && echo rank=$PET_NODE_RANK of $PET_NNODES master=$PET_MASTER_ADDR:$PET_MASTER_PORT index=$JOB_COMPLETION_INDEX"),
        SHELL_RUNTIME,
    );
    let text = text(&out);
    assert!(out.status.success(), "{text}");
    for rank in 0..2 {
        let line = format!("[sh-node-0-{rank}]: rank={rank} of 2 master=127.0.0.1:");
        assert!(text.contains(&line), "{line:?} in {text}");
        assert!(text.contains(&format!("index={rank}")), "{text}");
    }
    assert!(
        !text.contains(":29500"),
        "--master-port 0 picks a free port: {text}"
    );
    let initialized = text
        .find("[sh-dataset-initializer-0-0]: fetched")
        .expect("initializer ran");
    assert!(
        initialized < text.find("[sh-node-0-0]").expect("node 0 ran"),
        "{text}"
    );
    assert!(text.contains("trainjob sh: Complete"), "{text}");
}

#[test]
fn a_node_failing_past_its_jobs_backoff_limit_fails_the_trainjob() {
    // Node 1 fails once and is restarted (backoffLimit 1); failing again fails the job.
    let out = local(
        &shell_job("if [ $PET_NODE_RANK = 1 ]; then exit 3; fi; sleep 30"),
        SHELL_RUNTIME,
    );
    let text = text(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("sh-node-0-1 exited with code 3; restarted (1 of backoffLimit 1)"),
        "{text}"
    );
    assert!(
        text.contains("Failed (FailedJobs)") && text.contains("2 failures past backoffLimit 1"),
        "{text}"
    );
    assert!(!text.contains("Complete"), "{text}");
}

#[test]
fn a_trainjob_that_cannot_run_here_says_why_with_exit_code_2() {
    let reserved = shell_job("true").replace(
        "    numNodes: 2\n",
        "    numNodes: 2\n    env: [{name: PET_NNODES, value: \"9\"}]\n",
    );
    let out = local(&reserved, SHELL_RUNTIME);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out).contains("invalid envs configured: [PET_NNODES]"),
        "{}",
        text(&out)
    );
    let out = local(
        &shell_job("true").replace("name: shell}", "name: nowhere}"),
        SHELL_RUNTIME,
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out).contains("\"nowhere\" not found"),
        "{}",
        text(&out)
    );
    let no_command = shell_job("true").replace("    command: [sh, -c, 'true']\n", "");
    let out = local(&no_command, SHELL_RUNTIME);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out).contains("has no command"), "{}", text(&out));
}

#[test]
fn render_prints_what_trainer_gives_each_node() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("job.yaml");
    std::fs::write(&path, TWO_BY_TWO).expect("job");
    let out = Command::new(env!("CARGO_BIN_EXE_ferrun-operator"))
        .arg("render")
        .arg(&path)
        .output()
        .expect("render");
    assert!(out.status.success(), "{}", text(&out));
    let docs: Vec<serde_yaml::Value> = serde_yaml::Deserializer::from_slice(&out.stdout)
        .map(|d| serde::Deserialize::deserialize(d).expect("yaml"))
        .collect();
    let kinds: Vec<&str> = docs
        .iter()
        .map(|d| d["kind"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(kinds, ["Pod", "Pod", "Service"]);
    assert_eq!(docs[1]["spec"]["hostname"], "digits-node-0-1");
}
