//! `ferrun-operator local` on jobs of shell commands: restart policies, backoffLimit,
//! activeDeadlineSeconds and cleanPodPolicy, as a user sees them (exit code and output).
//! Jobs that train with ferrun and torch are in the workspace's `tests/`.

use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// Runs `ferrun-operator local` on `yaml`; its output and how long it took.
fn local(yaml: &str) -> (Output, Duration) {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("job.yaml");
    std::fs::write(
        &path,
        yaml.replace("$DIR", &dir.path().display().to_string()),
    )
    .expect("write job");
    let started = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_ferrun-operator"))
        .args(["local", "--timeout", "40"])
        .arg(&path)
        .output()
        .expect("run ferrun-operator");
    (out, started.elapsed())
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A job with a Master and one Worker running these shell commands.
fn job(run_policy: &str, master: &str, worker_policy: &str, worker: &str) -> String {
    format!(
        r#"
apiVersion: kubeflow.org/v1
kind: PyTorchJob
metadata: {{name: shell}}
spec:
  runPolicy: {run_policy}
  pytorchReplicaSpecs:
    Master:
      replicas: 1
      template:
        spec:
          containers: [{{name: pytorch, image: img, command: [sh, -c, '{master}']}}]
    Worker:
      replicas: 1
      restartPolicy: {worker_policy}
      template:
        spec:
          containers: [{{name: pytorch, image: img, command: [sh, -c, '{worker}']}}]
"#
    )
}

#[test]
fn a_failed_worker_under_never_fails_the_job_and_clean_pod_policy_stops_the_master() {
    let (out, took) = local(&job(
        "{cleanPodPolicy: All}",
        "exec sleep 30",
        "Never",
        "exit 3",
    ));
    let text = text(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("job shell: Failed"), "{text}");
    assert!(text.contains("Worker replica 0 failed"), "{text}");
    assert!(
        text.contains("cleanPodPolicy All: stopping shell-master-0"),
        "{text}"
    );
    assert!(took < Duration::from_secs(20), "took {took:?}");
}

#[test]
fn the_deadline_is_enforced_with_no_other_event() {
    let (out, took) = local(&job(
        "{activeDeadlineSeconds: 1, cleanPodPolicy: Running}",
        "exec sleep 30",
        "OnFailure",
        "exec sleep 30",
    ));
    let text = text(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("DeadlineExceeded") || text.contains("past activeDeadlineSeconds 1"),
        "{text}"
    );
    assert!(took < Duration::from_secs(15), "took {took:?}");
}

#[test]
fn on_failure_restarts_in_place_and_the_master_decides_success() {
    // The worker fails once (its marker file is not there yet), then succeeds.
    let worker = "test -f $DIR/mark || { touch $DIR/mark; echo failing once; exit 3; }; \
                  echo worker done; touch $DIR/done";
    // The master ends once the restarted worker is done (bounded: 30 s of 50 ms looks).
    let master = "i=0; until [ -f $DIR/done ] || [ $i -ge 600 ]; do sleep 0.05; i=$((i+1)); done; \
                  echo master done";
    let (out, _) = local(&job("{}", master, "OnFailure", worker));
    let text = text(&out);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(text.contains("[shell-worker-0]: failing once"), "{text}");
    assert!(
        text.contains("shell-worker-0 exited with code 3 and is restarted"),
        "{text}"
    );
    assert!(text.contains("job shell: Succeeded"), "{text}");
}

#[test]
fn backoff_limit_counts_every_restart() {
    let (out, _) = local(&job(
        "{backoffLimit: 2, cleanPodPolicy: All}",
        "exec sleep 30",
        "OnFailure",
        "exit 5",
    ));
    let text = text(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("3 restarts exceed backoffLimit 2"), "{text}");
}

#[test]
fn exit_code_policy_recreates_on_signals_and_fails_on_the_programs_own_codes() {
    // 137 (SIGKILL, as an OOM kill) is retried; then 2, the program's own error, is final.
    let worker = "test -f $DIR/mark || { touch $DIR/mark; kill -9 $$; }; exit 2";
    let (out, _) = local(&job(
        "{cleanPodPolicy: All}",
        "exec sleep 30",
        "ExitCode",
        worker,
    ));
    let text = text(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("shell-worker-0 exited with code 137 and is recreated"),
        "{text}"
    );
    assert!(text.contains("Worker replica 0 failed"), "{text}");
}

#[test]
fn a_container_without_a_command_is_refused_with_the_fix() {
    let yaml = job("{}", "true", "Never", "true").replacen(", command: [sh, -c, 'true']", "", 1);
    let (out, _) = local(&yaml);
    let text = text(&out);
    assert_eq!(out.status.code(), Some(2), "{text}");
    assert!(
        text.contains("shell-master-0: container \"pytorch\" has no command"),
        "{text}"
    );
    assert!(text.contains("give `command:`"), "{text}");
}

#[test]
fn ctrl_c_stops_every_pod_and_exits_with_the_signal() {
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;
    use std::sync::mpsc;

    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("job.yaml");
    // A sleep no other process here runs, to look for leftovers by.
    std::fs::write(
        &path,
        job("{}", "exec sleep 37.25", "OnFailure", "exec sleep 37.25"),
    )
    .expect("write job");
    let mut child = Command::new(env!("CARGO_BIN_EXE_ferrun-operator"))
        .args(["local", "--timeout", "40"])
        .arg(&path)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start ferrun-operator");
    let (lines, seen) = mpsc::channel();
    let stdout = child.stdout.take().expect("stdout");
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = lines.send(line);
        }
    });
    let mut output = Vec::new();
    while !output
        .iter()
        .any(|l: &String| l.contains("job shell: Running"))
    {
        output.push(
            seen.recv_timeout(Duration::from_secs(20))
                .expect("the job runs within 20 s"),
        );
    }
    let started = Instant::now();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .expect("SIGINT");
    while let Ok(line) = seen.recv_timeout(Duration::from_secs(20)) {
        output.push(line);
    }
    let status = child.wait().expect("wait");
    let text = output.join("\n");
    assert_eq!(status.code(), Some(130), "{text}");
    // Under the 5 s SIGTERM grace: the pods got SIGTERM and obeyed it (no inherited mask).
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "took {:?}",
        started.elapsed()
    );
    assert!(
        text.contains("job shell: Failed") && text.contains("local mode got SIGINT"),
        "{text}"
    );
    let leftovers: Vec<String> = std::fs::read_dir("/proc")
        .expect("/proc")
        .filter_map(|e| std::fs::read(e.ok()?.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .filter(|c| c.starts_with("sleep 37.25"))
        .collect();
    assert!(leftovers.is_empty(), "pods left running: {leftovers:?}");
}
