//! The worker environment under `ferrun` is torchrun 2.13's, variable for variable.

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::Value;
use support::{ferrun, run, text, torchrun, worker};

const LIMIT: Duration = Duration::from_secs(50);

/// Runs `envdump.py` under a launcher and returns each rank's `{env, argv}` by rank.
fn dump(mut launcher: std::process::Command, flags: &[&str]) -> BTreeMap<u32, Value> {
    launcher
        .args(flags)
        .arg(worker("envdump.py"))
        .args(["--lr", "${local_rank}"]);
    let out = run(launcher, LIMIT);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "launcher failed:\n{stdout}\n{stderr}");
    support::env_records(&stdout)
}

/// Values that legitimately differ between two runs: ids, ports and paths.
const PER_RUN: [&str; 3] = [
    "TORCHELASTIC_RUN_ID",
    "MASTER_PORT",
    "TORCHELASTIC_ERROR_FILE",
];

fn assert_same_contract(flags: &[&str]) {
    let theirs = dump(torchrun(), flags);
    let ours = dump(ferrun(), flags);
    assert_eq!(
        ours.keys().collect::<Vec<_>>(),
        theirs.keys().collect::<Vec<_>>(),
        "ranks for {flags:?}"
    );
    for (rank, t) in &theirs {
        let o = &ours[rank];
        assert_eq!(
            o["argv"], t["argv"],
            "rank {rank} command line for {flags:?}"
        );
        for (name, tv) in t["env"].as_object().expect("env") {
            let ov = &o["env"][name];
            assert_eq!(
                ov.is_null(),
                tv.is_null(),
                "{name} present under one launcher only ({flags:?})"
            );
            if !PER_RUN.contains(&name.as_str()) {
                assert_eq!(ov, tv, "rank {rank}: {name} for {flags:?}");
            }
        }
        // Paths differ, but the layout is torchrun's: <run_id>_<rand>/attempt_<n>/<local_rank>/error.json.
        let path = o["env"]["TORCHELASTIC_ERROR_FILE"]
            .as_str()
            .expect("error file");
        let run_id = o["env"]["TORCHELASTIC_RUN_ID"].as_str().expect("run id");
        let local_rank = o["env"]["LOCAL_RANK"].as_str().expect("local rank");
        let suffix = format!("/attempt_0/{local_rank}/error.json");
        assert!(
            path.ends_with(&suffix) && path.contains(&format!("/{run_id}_")),
            "{path}"
        );
        assert_eq!(o["env"]["TORCHELASTIC_USE_AGENT_STORE"], "True");
    }
}

#[test]
fn default_single_node_run_matches_torchrun() {
    assert_same_contract(&["--nproc-per-node", "2"]);
}

#[test]
fn standalone_run_with_role_and_restarts_matches_torchrun() {
    assert_same_contract(&[
        "--standalone",
        "--nproc_per_node=3",
        "--role",
        "trainer",
        "--max-restarts",
        "2",
    ]);
}

#[test]
fn static_run_with_master_port_matches_torchrun() {
    // OMP_NUM_THREADS is only set for nproc > 1: both launchers leave it unset here.
    let port = support::free_port().to_string();
    let flags = [
        "--nproc-per-node",
        "1",
        "--master-port",
        &port,
        "--rdzv-id",
        "job-42",
    ];
    assert_same_contract(&flags);
    let ours = dump(ferrun(), &flags);
    assert_eq!(ours[&0]["env"]["MASTER_PORT"], port.as_str());
    assert_eq!(ours[&0]["env"]["TORCHELASTIC_RUN_ID"], "job-42");
}

#[test]
fn legacy_launch_passes_local_rank_like_torch_distributed_launch() {
    let mut legacy = torchrun();
    legacy.env("PYTHONWARNINGS", "ignore");
    let python = support::venv().join("bin/python");
    let mut theirs_cmd = std::process::Command::new(python);
    for (k, v) in legacy.get_envs() {
        if let Some(v) = v {
            theirs_cmd.env(k, v);
        }
    }
    theirs_cmd.args(["-m", "torch.distributed.launch"]);
    let theirs = dump(theirs_cmd, &["--nproc_per_node=2"]);
    let mut ours_cmd = ferrun();
    ours_cmd.arg("launch");
    let ours = dump(ours_cmd, &["--nproc_per_node=2"]);
    for rank in [0, 1] {
        assert_eq!(ours[&rank]["argv"], theirs[&rank]["argv"]);
        let argv = ours[&rank]["argv"].as_array().expect("argv");
        assert_eq!(
            argv[2].as_str(),
            Some(format!("--local-rank={rank}").as_str())
        );
    }
}

#[test]
fn pet_environment_is_the_default_and_the_command_line_wins() {
    let mut cmd = ferrun();
    cmd.env("PET_NPROC_PER_NODE", "3")
        .env("PET_ROLE", "from-env");
    let ranks = dump(cmd, &[]);
    assert_eq!(ranks.len(), 3);
    assert_eq!(ranks[&0]["env"]["ROLE_NAME"], "from-env");
    let mut cmd = ferrun();
    cmd.env("PET_NPROC_PER_NODE", "3");
    assert_eq!(dump(cmd, &["--nproc-per-node", "2"]).len(), 2);
}

#[test]
fn worker_env_parses_with_the_collective_contract() {
    let ours = dump(ferrun(), &["--nproc-per-node", "2", "--max-restarts", "1"]);
    for (rank, v) in ours {
        let env = v["env"].as_object().expect("env").clone();
        let parsed = ferrun_collective::WorkerEnv::from_lookup(|k| {
            env.get(k).and_then(Value::as_str).map(str::to_owned)
        })
        .expect("the launcher's env satisfies the contract");
        assert_eq!(
            (parsed.rank, parsed.world_size, parsed.max_restarts),
            (rank, 2, 1)
        );
        assert_eq!(parsed.omp_num_threads, Some(1));
    }
}

#[test]
fn pet_booleans_are_integers_as_in_torchrun() {
    let mut cmd = ferrun();
    cmd.env("PET_STANDALONE", "1");
    let on = dump(cmd, &[]);
    assert_eq!(
        on[&0]["env"]["TORCHELASTIC_RUN_ID"].as_str().map(str::len),
        Some(36),
        "a fresh uuid"
    );
    let mut cmd = ferrun();
    cmd.env("PET_STANDALONE", "0");
    let port = support::free_port().to_string();
    let off = dump(cmd, &["--rdzv-id", "fixed", "--master-port", &port]);
    assert_eq!(off[&0]["env"]["TORCHELASTIC_RUN_ID"], "fixed");
}

#[test]
fn module_no_python_and_run_path_entrypoints_run_the_worker() {
    // -m: the module is found from the working directory, as with `python -m`.
    let mut cmd = ferrun();
    cmd.current_dir(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/workers"));
    cmd.args(["--nproc-per-node", "2", "-m", "envdump"]);
    let out = run(cmd, LIMIT);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stdout.contains("[default1]:ENV ") && stdout.contains(r#"["-u", "-m", "envdump"]"#),
        "{stdout}"
    );

    // --no-python: any program, here a shell reading the contract.
    let mut cmd = ferrun();
    cmd.args([
        "--nproc-per-node",
        "2",
        "--no-python",
        "sh",
        "-c",
        "echo rank=$RANK of $WORLD_SIZE",
    ]);
    let out = run(cmd, LIMIT);
    let (stdout, _) = text(&out);
    assert!(
        stdout.contains("[default0]:rank=0 of 2") && stdout.contains("[default1]:rank=1 of 2"),
        "{stdout}"
    );

    // --run-path: runpy.run_path as __main__, with the script's own arguments.
    let mut cmd = ferrun();
    cmd.args([
        "--nproc-per-node",
        "1",
        "--run-path",
        &worker("envdump.py"),
        "--flag",
    ]);
    let out = run(cmd, LIMIT);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stdout.contains("[default0]:ENV ") && stdout.contains("\"--flag\"]"),
        "{stdout}"
    );
}

#[test]
fn pinned_gpus_match_torchrun_and_are_printed_once_at_start() {
    let flags = ["--nproc-per-node", "2", "--virtual-local-rank"];
    let with_gpus = |mut cmd: std::process::Command| {
        cmd.env("CUDA_VISIBLE_DEVICES", "4,5")
            .env("NCCL_DEBUG", "WARN");
        cmd
    };
    let theirs = dump(with_gpus(torchrun()), &flags);
    let ours = dump(with_gpus(ferrun()), &flags);
    for rank in [0u32, 1] {
        for name in ["LOCAL_RANK", "CUDA_VISIBLE_DEVICES"] {
            assert_eq!(
                ours[&rank]["env"][name], theirs[&rank]["env"][name],
                "rank {rank}: {name}"
            );
        }
    }
    assert_eq!(ours[&1]["env"]["CUDA_VISIBLE_DEVICES"], "5");

    let mut cmd = with_gpus(ferrun());
    cmd.args(["--pin-gpus", "--nproc-per-node", "2"])
        .arg(worker("envdump.py"));
    let out = run(cmd, LIMIT);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    let said = |needle: &str| stderr.matches(needle).count();
    assert_eq!(said("CUDA_VISIBLE_DEVICES per local rank"), 1, "{stderr}");
    assert_eq!(said("0→4 1→5"), 1, "{stderr}");
    assert_eq!(
        said("NCCL_DEBUG=WARN (yours, passed through)"),
        1,
        "{stderr}"
    );
    assert_eq!(
        said("TORCH_NCCL_ASYNC_ERROR_HANDLING=1 (set by ferrun)"),
        1,
        "{stderr}"
    );
}
