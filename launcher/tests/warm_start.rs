//! Warm starts (`--warm-start`) with real torch workers: a restarted worker finds torch
//! imported already, gets the new attempt's environment and nothing of the old one's, and
//! no pre-started interpreter outlives the launcher.

mod support;

use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;
use support::{ferrun, kill_all, run, stdout_lines, survivors_after, text, wait_for_lines, worker};

const LIMIT: Duration = Duration::from_secs(120);

/// The `WARM` records of a run, in the order printed.
fn records(stdout: &str) -> Vec<Value> {
    stdout
        .lines()
        .filter_map(|l| l.split_once("WARM ").map(|(_, json)| json))
        .map(|json| serde_json::from_str(json).expect("a JSON record"))
        .collect()
}

fn restart_once(warm: bool) -> (Vec<Value>, String) {
    let dir = tempfile::tempdir().expect("a working directory");
    let mut cmd = ferrun();
    cmd.current_dir(dir.path())
        .env("FERRUN_TEST_AGENT_ENV", "from the agent")
        .args(["--nproc-per-node", "2", "--max-restarts", "1"]);
    if warm {
        cmd.arg("--warm-start");
    }
    cmd.args([&worker("warm_check.py"), "--lr", "0.1"]);
    let out = run(cmd, LIMIT);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    let cwd = dir.path().canonicalize().expect("cwd");
    for r in records(&stdout) {
        assert_eq!(r["cwd"], cwd.display().to_string(), "{r}");
    }
    (records(&stdout), stderr)
}

#[test]
fn a_restarted_warm_worker_has_torch_imported_the_new_attempts_env_and_none_of_the_old_state() {
    let (records, stderr) = restart_once(true);
    assert_eq!(
        records.len(),
        4,
        "two ranks, two attempts: {records:?}\n{stderr}"
    );
    let first: Vec<&Value> = records.iter().filter(|r| r["restart"] == 0).collect();
    let second: Vec<&Value> = records.iter().filter(|r| r["restart"] == 1).collect();
    assert_eq!((first.len(), second.len()), (2, 2), "{records:?}");
    for r in &records {
        assert_eq!(
            r["pre_imported"], true,
            "torch was imported before the script: {r}"
        );
        assert_eq!(r["name"], "__main__", "{r}");
        assert_eq!(r["world"], 2, "{r}");
        assert_eq!(r["rank"], r["local_rank"], "{r}");
        assert_eq!(r["agent_env"], "from the agent", "{r}");
        assert_eq!(r["torch"], "2.13.0", "{r}");
        let argv: Vec<&str> = r["argv"]
            .as_array()
            .expect("argv")
            .iter()
            .map(|a| a.as_str().expect("str"))
            .collect();
        assert!(
            argv[0].ends_with("warm_check.py") && argv[1..] == ["--lr", "0.1"],
            "{r}"
        );
    }
    for r in &second {
        assert_eq!(r["leaked_env"], Value::Null, "no env of attempt 0: {r}");
        assert_eq!(
            r["leaked_global"],
            Value::Null,
            "no global of attempt 0: {r}"
        );
        assert!(
            first.iter().all(|f| f["pid"] != r["pid"]),
            "a fresh process: {r} vs {first:?}"
        );
    }
    assert!(stderr.contains("restarting it (1/1 restarts)"), "{stderr}");
}

#[test]
fn a_cold_worker_imports_torch_itself() {
    // The check above can fail: without --warm-start the script finds torch not imported.
    let (records, stderr) = restart_once(false);
    // (A cold rank 1 may be stopped before it prints, while it still imports torch.)
    let second = records.iter().filter(|r| r["restart"] == 1).count();
    assert_eq!(second, 2, "{records:?}\n{stderr}");
    assert!(
        records.iter().all(|r| r["pre_imported"] == false),
        "{records:?}"
    );
}

#[test]
fn a_module_that_cannot_be_pre_imported_leaves_the_worker_to_import_it() {
    let dir = tempfile::tempdir().expect("a working directory");
    let mut cmd = ferrun();
    cmd.current_dir(dir.path())
        .args([
            "--nproc-per-node",
            "1",
            "--max-restarts",
            "1",
            "--warm-start",
        ])
        .args(["--warm-start-import", "no_such_module_for_ferrun"])
        .arg(worker("warm_check.py"));
    let out = run(cmd, LIMIT);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(
        stderr.contains("cannot pre-import no_such_module_for_ferrun"),
        "{stderr}"
    );
    assert!(
        records(&stdout).iter().all(|r| r["pre_imported"] == true),
        "{stdout}"
    );
}

#[test]
fn warm_start_flags_that_cannot_work_are_named() {
    let script = worker("warm_check.py");
    for (args, expected) in [
        (
            &["--warm-start", "--no-python", "true"][..],
            "a --no-python program cannot use them",
        ),
        (
            &["--warm-start", "--warm-start-import", "os;rm", &script][..],
            "is not a module name",
        ),
        (
            &["--warm-start-import", "numpy", &script][..],
            "add --warm-start",
        ),
    ] {
        let mut cmd = ferrun();
        cmd.args(args);
        let out = run(cmd, LIMIT);
        let (_, stderr) = text(&out);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
    }
}

/// The launcher's children now (workers and idle interpreters).
fn children_of(pid: u32) -> Vec<i32> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Ok(child) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
        // The parent pid is the second field after the command's closing parenthesis.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if ppid == Some(pid) {
            found.push(child);
        }
    }
    found
}

#[test]
fn no_idle_interpreter_survives_a_sigkilled_launcher() {
    let mut cmd = ferrun();
    cmd.args(["--nproc-per-node", "2", "--warm-start", &worker("hold.py")])
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let mut child = cmd.spawn().expect("spawn");
    let lines = stdout_lines(&mut child);
    wait_for_lines(&lines, "ready", 2, LIMIT);
    let children = children_of(child.id());
    // Two workers and the two interpreters pre-started for the next attempt (and the keeper).
    assert!(children.len() >= 4, "{children:?}");
    child.kill().expect("SIGKILL the launcher");
    child.wait().expect("reap the launcher");
    let survivors = survivors_after(&children, Duration::from_secs(1));
    kill_all(&survivors);
    assert!(
        survivors.is_empty(),
        "{survivors:?} outlived the launcher by a second"
    );
}
