//! The operator's rendering and the launcher's contract, across crates: PyTorchJobs whose
//! containers run `ferrun` with a torch gloo script, run by the operator's local mode. The
//! environment rendered for each replica, handed to `ferrun`, must give the node rank, world
//! size and rendezvous the job means — and a failing worker under `OnFailure` must recover.

use std::path::Path;

use ferrun_operator::lifecycle::Verdict;
use ferrun_operator::load_job;
use ferrun_operator::local::{self, LocalOptions};
use ferrun_tests::{ferrun_binary, venv};

/// Master + `workers` Workers, `nproc` processes each, on `port`; each worker container's
/// command is `worker_command` (a shell line), the master's runs ferrun directly.
fn job_yaml(port: u16, workers: u32, nproc: u32, results: &Path, worker_command: &str) -> String {
    let ferrun = ferrun_binary().display().to_string();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("workers/gloo_job.py");
    let python = venv().join("bin/python");
    let env = format!(
        "[{{name: PYTHON_EXEC, value: {}}}, {{name: RESULT_DIR, value: {}}}, {{name: FERRUN_SCRIPT, value: {}}}]",
        python.display(),
        results.display(),
        script.display()
    );
    let worker_command = worker_command.replace("@ferrun@", &ferrun);
    format!(
        r#"
apiVersion: kubeflow.org/v1
kind: PyTorchJob
metadata: {{name: gloo}}
spec:
  nprocPerNode: "{nproc}"
  runPolicy: {{cleanPodPolicy: All}}
  pytorchReplicaSpecs:
    Master:
      template:
        spec:
          containers:
            - name: pytorch
              image: ghcr.io/ferrun/ferrun:0.1
              command: ["{ferrun}", "{script}"]
              env: {env}
              ports: [{{name: pytorchjob-port, containerPort: {port}}}]
    Worker:
      replicas: {workers}
      restartPolicy: OnFailure
      template:
        spec:
          containers:
            - name: pytorch
              image: ghcr.io/ferrun/ferrun:0.1
              command: [sh, -c, '{worker_command}']
              env: {env}
"#,
        script = script.display()
    )
}

/// Runs a job in local mode, bounded; one job at a time, so that on a small machine each gets
/// the cores its processes need.
fn run(yaml: &str) -> local::Outcome {
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _turn = ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let job = load_job(yaml).expect("job");
    let options = LocalOptions {
        timeout: Some(std::time::Duration::from_secs(50)),
        ..LocalOptions::default()
    };
    local::run(&job, &options).expect("local run")
}

fn results(dir: &Path) -> Vec<String> {
    let mut lines: Vec<String> = std::fs::read_dir(dir)
        .expect("results")
        .map(|e| std::fs::read_to_string(e.expect("entry").path()).expect("result"))
        .collect();
    lines.sort_by_key(|l| {
        l.split_whitespace()
            .next()
            .and_then(|r| r.trim_start_matches("rank=").parse::<u32>().ok())
    });
    lines
}

#[test]
fn master_and_two_workers_train_together_with_the_ranks_the_job_means() {
    let dir = tempfile::tempdir().expect("temp dir");
    let outcome = run(&job_yaml(
        free_port(),
        2,
        2,
        dir.path(),
        "exec @ferrun@ $FERRUN_SCRIPT",
    ));
    assert_eq!(outcome.verdict, Verdict::Succeeded);
    assert_eq!(outcome.restarts, 0);
    // 3 pods × 2 processes; pod i (master 0, worker j → j + 1) holds ranks 2i and 2i + 1.
    let expected: Vec<String> = (0..6)
        .map(|r| {
            format!(
                "rank={r} world=6 group_rank={} local_world=2 sum=21 trained=True identical=True",
                r / 2
            )
        })
        .collect();
    assert_eq!(results(dir.path()), expected);
}

#[test]
fn a_worker_failing_under_on_failure_is_restarted_and_the_job_succeeds() {
    let dir = tempfile::tempdir().expect("temp dir");
    let results_dir = dir.path().join("results");
    std::fs::create_dir(&results_dir).expect("results dir");
    let mark = dir.path().join("failed-once");
    // Worker 0 fails once before it starts ferrun; the kubelet-like restart brings it back and
    // ferrun's rendezvous (the master waits for every node) puts it in the job.
    let command = format!(
        "if [ $PET_NODE_RANK = 1 ] && [ ! -f {mark} ]; then touch {mark}; exit 7; fi; exec @ferrun@ $FERRUN_SCRIPT",
        mark = mark.display()
    );
    let outcome = run(&job_yaml(free_port(), 1, 1, &results_dir, &command));
    assert_eq!(outcome.verdict, Verdict::Succeeded);
    assert_eq!(outcome.restarts, 1, "worker 0 restarted once");
    assert!(outcome
        .status
        .conditions
        .iter()
        .any(|c| c.type_ == "Succeeded"));
    let expected: Vec<String> = (0..2)
        .map(|r| {
            format!(
                "rank={r} world=2 group_rank={r} local_world=1 sum=3 trained=True identical=True"
            )
        })
        .collect();
    assert_eq!(results(&results_dir), expected);
}

/// A port free right now on loopback (the kernel's pick).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

#[test]
fn an_elastic_job_rendered_by_the_operator_runs_ferruns_elastic_rendezvous_unchanged() {
    let dir = tempfile::tempdir().expect("temp dir");
    let ferrun = ferrun_binary().display().to_string();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("workers/gloo_job.py");
    let python = venv().join("bin/python");
    // Workers only, as elastic PyTorchJobs are: the operator renders PET_NNODES=2:2,
    // PET_RDZV_BACKEND=c10d, PET_RDZV_ENDPOINT=<worker-0>:<port>, PET_RDZV_ID and
    // PET_RDZV_CONF; `ferrun` takes them as torchrun would.
    let yaml = format!(
        r#"
apiVersion: kubeflow.org/v1
kind: PyTorchJob
metadata: {{name: elastic}}
spec:
  nprocPerNode: "1"
  elasticPolicy:
    minReplicas: 2
    maxReplicas: 2
    rdzvBackend: c10d
    rdzvId: elastic-job
    rdzvConf: [{{key: last_call_timeout, value: "1"}}]
  pytorchReplicaSpecs:
    Worker:
      replicas: 2
      restartPolicy: OnFailure
      template:
        spec:
          containers:
            - name: pytorch
              image: ghcr.io/ferrun/ferrun:0.1
              command: ["{ferrun}", "{script}"]
              env: [{{name: PYTHON_EXEC, value: {python}}}, {{name: RESULT_DIR, value: {results}}}]
              ports: [{{name: pytorchjob-port, containerPort: {port}}}]
"#,
        script = script.display(),
        python = python.display(),
        results = dir.path().display(),
        port = free_port(),
    );
    let outcome = run(&yaml);
    assert_eq!(outcome.verdict, Verdict::Succeeded);
    let lines = results(dir.path());
    assert_eq!(lines.len(), 2, "{lines:?}");
    for (rank, line) in lines.iter().enumerate() {
        assert!(
            line.starts_with(&format!("rank={rank} world=2 group_rank={rank} local_world=1 sum=3 trained=True identical=True")),
            "{line}"
        );
    }
}
