use super::*;
use std::collections::HashMap;

struct FakeEnv {
    vars: HashMap<String, String>,
    cwd: PathBuf,
    gpus: u32,
}

impl Environment for FakeEnv {
    fn var(&self, name: &str) -> Option<String> {
        self.vars.get(name).cloned()
    }
    fn which(&self, program: &str) -> Option<PathBuf> {
        (program == "python3").then(|| PathBuf::from("/usr/bin/python3"))
    }
    fn cwd(&self) -> PathBuf {
        self.cwd.clone()
    }
    fn devices(&self) -> Devices {
        Devices {
            gpus: self.gpus,
            gpu_source: "fake".into(),
            cpus: 2,
        }
    }
}

fn launch(argv: &[&str], vars: &[(&str, &str)]) -> Result<LaunchConfig, ConfigError> {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("train.py"), "").expect("write");
    let env = FakeEnv {
        vars: vars
            .iter()
            .map(|(k, v)| ((*k).into(), (*v).into()))
            .collect(),
        cwd: dir.path().to_path_buf(),
        gpus: 0,
    };
    let mut full = vec!["ferrun"];
    full.extend_from_slice(argv);
    let (flavor, args) = crate::configuration::cli::parse(full)
        .map_err(|e| panic!("{e}"))
        .expect("parse");
    LaunchConfig::from_args(flavor, &args, &env)
}

fn text(command: &[std::ffi::OsString]) -> Vec<String> {
    command
        .iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect()
}

#[test]
fn builds_torchrun_command_lines() {
    let c = launch(
        &["--nproc-per-node", "2", "train.py", "--lr", "${local_rank}"],
        &[],
    )
    .expect("ok");
    assert_eq!(
        text(&c.command),
        [
            "/usr/bin/python3",
            "-u",
            "train.py",
            "--lr",
            "${local_rank}"
        ]
    );
    assert!(c.set_omp_num_threads);
    let c = launch(&["-m", "pkg.main", "x"], &[("PYTHON_EXEC", "/opt/py")]).expect("ok");
    assert_eq!(text(&c.command), ["/opt/py", "-u", "-m", "pkg.main", "x"]);
    assert!(!c.set_omp_num_threads);
    let c = launch(&["launch", "train.py", "--lr", "1"], &[]).expect("ok");
    assert_eq!(
        text(&c.command)[2..],
        ["train.py", "--local-rank=${local_rank}", "--lr", "1"]
    );
    let c = launch(&["launch", "--use-env", "train.py"], &[]).expect("ok");
    assert_eq!(
        text(&c.command).last().map(String::as_str),
        Some("train.py")
    );
}

#[test]
fn single_node_runs_get_a_free_port_unless_one_is_given() {
    let c = launch(&["train.py"], &[]).expect("ok");
    assert_eq!((c.master_addr.as_str(), c.master_port), ("localhost", None));
    assert_eq!(c.run_id.len(), 36, "a uuid: {}", c.run_id);
    let c = launch(
        &["--master-port", "1234", "--rdzv-id", "r", "train.py"],
        &[],
    )
    .expect("ok");
    assert_eq!(
        (c.master_addr.as_str(), c.master_port, c.run_id.as_str()),
        ("127.0.0.1", Some(1234), "r")
    );
    let c = launch(&["--rdzv-endpoint", "[::1]:29555", "train.py"], &[]).expect("ok");
    assert_eq!(
        (c.master_addr.as_str(), c.master_port),
        ("::1", Some(29555))
    );
}

#[test]
fn rejects_bad_input_with_the_flag_named() {
    let cases: &[(&[&str], &str)] = &[
        (
            &["--nnodes", "3:2", "train.py"],
            "--nnodes \"3:2\" is not valid",
        ),
        (&["--nnodes", "1:2:3", "train.py"], "--nnodes"),
        (&["--nnodes", "0", "train.py"], "--nnodes"),
        (
            &["--nnodes", "1:2", "train.py"],
            "an elastic range needs --rdzv-backend c10d",
        ),
        (
            &["--nnodes", "2", "--standalone", "train.py"],
            "--standalone",
        ),
        (
            &["--nnodes", "2", "--rdzv-backend", "c10d", "train.py"],
            "needs --rdzv-endpoint host:port",
        ),
        (
            &["--nnodes", "1:2", "--rdzv-backend", "etcd", "train.py"],
            "etcd's client address",
        ),
        (
            &[
                "--nnodes",
                "1:2",
                "--rdzv-backend",
                "c10d",
                "--rdzv-endpoint",
                "h:1",
                "--rdzv-conf",
                "token=abc",
                "train.py",
            ],
            "token must be 16 to 4096",
        ),
        (
            &[
                "--nnodes",
                "1:2",
                "--rdzv-backend",
                "c10d",
                "--rdzv-endpoint",
                "h:1",
                "--rdzv-id",
                "a/b",
                "train.py",
            ],
            "--rdzv-id \"a/b\"",
        ),
        (
            &[
                "--nnodes",
                "1:2",
                "--rdzv-backend",
                "c10d",
                "--rdzv-endpoint",
                "h:1",
                "--rdzv-conf",
                "keep_alive_max_attempt=0",
                "train.py",
            ],
            "keep_alive_max_attempt=0",
        ),
        (
            &[
                "--nnodes",
                "1:2",
                "--rdzv-backend",
                "c10d",
                "--rdzv-endpoint",
                "h:1",
                "--rdzv-conf",
                "tls_ca=/no/such/ca.pem",
                "train.py",
            ],
            "tls_ca=/no/such/ca.pem: No such file",
        ),
        (
            &[
                "--nnodes",
                "1:2",
                "--rdzv-backend",
                "c10d",
                "--rdzv-endpoint",
                "h:1",
                "--rdzv-conf",
                "tls_cert=/c.pem",
                "train.py",
            ],
            "need tls_ca too",
        ),
        (
            &["--nnodes", "2", "--node-rank", "2", "train.py"],
            "--node-rank 2 is out of range",
        ),
        (
            &["--nnodes", "2", "--rdzv-conf", "join_timeout=x", "train.py"],
            "join_timeout",
        ),
        (
            &["--node-rank", "1", "train.py"],
            "--node-rank 1 is out of range",
        ),
        (&["--nproc-per-node", "gpu", "train.py"], "no GPU found"),
        (
            &["--nproc-per-node", "x", "train.py"],
            "--nproc-per-node \"x\"",
        ),
        (
            &["--rdzv-backend", "zk", "train.py"],
            "--rdzv-backend \"zk\"",
        ),
        (
            &["--rdzv-endpoint", "h:99999", "train.py"],
            "--rdzv-endpoint",
        ),
        (&["--rdzv-conf", "a=1,b", "train.py"], "--rdzv-conf"),
        (
            &["--signals-to-handle", "SIGTERM,SIGNOPE", "train.py"],
            "SIGNOPE",
        ),
        (
            &["--shutdown-timeout", "-1", "train.py"],
            "--shutdown-timeout",
        ),
        (&["-t", "5", "train.py"], "--tee"),
        (&["-m", "--no-python", "x"], "exclude each other"),
        (
            &["missing.py"],
            "training script \"missing.py\" does not exist",
        ),
        (&["--no-python", "no-such-program-xyz"], "was not found"),
    ];
    for (argv, expected) in cases {
        let err = launch(argv, &[]).expect_err("must fail").to_string();
        assert!(err.contains(expected), "{argv:?}: {err}");
    }
}

#[test]
fn multi_node_static_defaults_to_port_29500_and_the_given_run_id() {
    let c = launch(
        &[
            "--nnodes",
            "2",
            "--node-rank",
            "1",
            "--master-addr",
            "10.0.0.1",
            "train.py",
        ],
        &[],
    )
    .expect("ok");
    let spec = c.nodes.expect("multi-node");
    assert_eq!(
        (spec.master_addr.as_str(), spec.master_port, spec.node_rank),
        ("10.0.0.1", 29500, 1)
    );
    assert_eq!(
        (c.run_id.as_str(), spec.join_timeout),
        ("none", Duration::from_secs(600))
    );
    let c = launch(
        &[
            "--nnodes",
            "2",
            "--rdzv-conf",
            "join_timeout=7",
            "--rdzv-endpoint",
            "h:1234",
            "train.py",
        ],
        &[],
    )
    .expect("ok");
    let spec = c.nodes.expect("multi-node");
    assert_eq!(
        (
            spec.master_addr.as_str(),
            spec.master_port,
            spec.join_timeout
        ),
        ("h", 1234, Duration::from_secs(7))
    );
}

#[test]
fn shutdown_timeout_comes_from_flag_then_torch_env_then_30s() {
    let c = launch(&["train.py"], &[("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "5")]).expect("ok");
    assert_eq!(c.shutdown_timeout, Duration::from_secs(5));
    let c = launch(
        &["--shutdown-timeout", "0.5", "train.py"],
        &[("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "5")],
    )
    .expect("ok");
    assert_eq!(c.shutdown_timeout, Duration::from_millis(500));
    assert_eq!(
        launch(&["train.py"], &[]).expect("ok").shutdown_timeout,
        Duration::from_secs(30)
    );
}
