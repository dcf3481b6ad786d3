//! The main job: torch DDP over ferrun's torch backend trains under
//! `ferrun --standalone --nproc-per-node 4`.

mod support;

use std::path::Path;
use std::time::Duration;

use support::{ferrun, run, text};

#[test]
fn ddp_trains_and_every_rank_ends_with_the_same_parameters() {
    let out_dir = tempfile::tempdir().expect("tempdir");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/python/ddp_train.py");
    let mut cmd = ferrun();
    cmd.args(["--standalone", "--nproc-per-node", "4"])
        .arg(&script)
        .args([
            "--epochs",
            "6",
            "--out",
            out_dir.path().to_str().expect("utf8"),
        ]);
    let out = run(cmd, Duration::from_secs(55));
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    let losses: Vec<f64> = stdout
        .lines()
        .filter_map(|l| l.strip_prefix("[default0]:epoch"))
        .map(|l| l.rsplit(' ').next().expect("loss").parse().expect("float"))
        .collect();
    assert_eq!(losses.len(), 6, "{stdout}");
    assert!(
        stdout.contains("4 ranks over ferrun hold identical parameters"),
        "{stdout}"
    );
    assert!(losses[5] < losses[0], "loss did not fall: {losses:?}");
    let params: Vec<Vec<u8>> = (0..4)
        .map(|r| {
            std::fs::read(out_dir.path().join(format!("rank{r}.bin"))).expect("saved parameters")
        })
        .collect();
    for (rank, p) in params.iter().enumerate() {
        assert!(
            !p.is_empty() && p == &params[0],
            "rank {rank}'s parameters differ from rank 0's"
        );
    }
}

#[test]
fn a_restarted_gloo_group_rendezvouses_again_on_the_agent_store() {
    let mut cmd = ferrun();
    cmd.args([
        "--nproc-per-node",
        "2",
        "--max-restarts",
        "1",
        "--shutdown-timeout",
        "2",
    ])
    .arg(support::worker("gloo_restart.py"));
    let out = run(cmd, Duration::from_secs(55));
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    for rank in [0, 1] {
        assert!(
            stdout.contains(&format!(
                "[default{rank}]:attempt 1 rank {rank} sum 3 expected 3"
            )),
            "{stdout}"
        );
    }
}
