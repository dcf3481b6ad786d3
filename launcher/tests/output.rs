//! Worker output: live rank prefixes, --tee, --redirects, --log-dir, --local-ranks-filter,
//! duplicate filters and the prefix template.

mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use support::{ferrun, run, text, worker};

const LIMIT: Duration = Duration::from_secs(30);

fn launch(flags: &[&str], env: &[(&str, &str)]) -> (String, String) {
    let mut cmd = ferrun();
    cmd.args(["--nproc-per-node", "2"])
        .args(flags)
        .arg(worker("output.py"));
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = run(cmd, LIMIT);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    (stdout, stderr)
}

/// The single `<run_id>_*` directory under a log dir.
fn run_dir(log_dir: &Path) -> PathBuf {
    let dirs: Vec<_> = std::fs::read_dir(log_dir)
        .expect("log dir")
        .map(|e| e.expect("entry").path())
        .collect();
    assert_eq!(dirs.len(), 1, "{dirs:?}");
    dirs[0].clone()
}

#[test]
fn lines_are_prefixed_with_role_and_local_rank_on_their_own_stream() {
    let (stdout, stderr) = launch(&[], &[]);
    for rank in [0, 1] {
        assert!(
            stdout
                .lines()
                .any(|l| l == format!("[default{rank}]:out from {rank}")),
            "{stdout}"
        );
        assert!(
            stderr
                .lines()
                .any(|l| l == format!("[default{rank}]:err from {rank} loss=1.0")),
            "{stderr}"
        );
    }
}

#[test]
fn the_prefix_template_is_honoured() {
    let (stdout, _) = launch(
        &["--role", "trainer"],
        &[(
            "TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE",
            "<${role_name}|${rank}> ",
        )],
    );
    assert!(
        stdout.lines().any(|l| l == "<trainer|1> out from 1"),
        "{stdout}"
    );
}

#[test]
fn tee_writes_torchruns_layout_and_the_console() {
    let logs = tempfile::tempdir().expect("tempdir");
    let log_dir = logs.path().to_str().expect("utf8");
    let (stdout, _) = launch(
        &[
            "--tee",
            "3",
            "--log-dir",
            log_dir,
            "--rdzv-id",
            "tee-run",
            "--master-port",
            &support::free_port().to_string(),
        ],
        &[],
    );
    assert!(stdout.contains("[default1]:out from 1"), "{stdout}");
    let run = run_dir(logs.path());
    assert!(run
        .file_name()
        .expect("name")
        .to_string_lossy()
        .starts_with("tee-run_"));
    for rank in [0, 1] {
        let dir = run.join(format!("attempt_0/{rank}"));
        assert_eq!(
            std::fs::read_to_string(dir.join("stdout.log")).expect("stdout.log"),
            format!("out from {rank}\n")
        );
        assert_eq!(
            std::fs::read_to_string(dir.join("stderr.log")).expect("stderr.log"),
            format!("err from {rank} loss=1.0\n")
        );
    }
}

#[test]
fn redirects_keep_a_stream_off_the_console() {
    let logs = tempfile::tempdir().expect("tempdir");
    let (stdout, stderr) = launch(
        &[
            "--redirects",
            "0:1",
            "--log-dir",
            logs.path().to_str().expect("utf8"),
        ],
        &[],
    );
    assert!(
        !stdout.contains("out from 0") && stdout.contains("[default1]:out from 1"),
        "{stdout}"
    );
    assert!(stderr.contains("err from 0"), "{stderr}");
    let file = run_dir(logs.path()).join("attempt_0/0/stdout.log");
    assert_eq!(
        std::fs::read_to_string(file).expect("stdout.log"),
        "out from 0\n"
    );
}

#[test]
fn local_ranks_filter_shows_only_the_chosen_ranks() {
    let (stdout, stderr) = launch(&["--local-ranks-filter", "1"], &[]);
    assert!(
        stdout.contains("out from 1") && !stdout.contains("out from 0"),
        "{stdout}"
    );
    assert!(!stderr.contains("err from 0"), "{stderr}");
}

#[test]
fn duplicate_filters_collect_matching_lines_of_every_rank() {
    let logs = tempfile::tempdir().expect("tempdir");
    launch(
        &[
            "--duplicate-stderr-filters",
            "loss=",
            "--log-dir",
            logs.path().to_str().expect("utf8"),
        ],
        &[],
    );
    let filtered =
        std::fs::read_to_string(run_dir(logs.path()).join("attempt_0/filtered_stderr.log"))
            .expect("file");
    let mut lines: Vec<_> = filtered.lines().collect();
    lines.sort_unstable();
    assert_eq!(
        lines,
        [
            "[default0]:err from 0 loss=1.0",
            "[default1]:err from 1 loss=1.0"
        ]
    );
}
