//! ferrun-train end to end: real worker processes under `ferrun`, the real digits from the
//! scikit-learn wheel in ferrun's venv (`scripts/setup-python.sh` installs it).

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(600);

/// The venv's bin first on PATH: the trainer finds the digits there.
fn path_with_venv() -> String {
    let venv = ferrun_tests::venv();
    format!(
        "{}:{}",
        venv.join("bin").display(),
        std::env::var("PATH").unwrap_or_default()
    )
}

/// `ferrun --standalone --nproc-per-node n [launcher…] ferrun-train args…`.
fn launch_with(n: usize, launcher: &[&str], env: &[(&str, &str)], args: &[&str]) -> Output {
    let mut cmd = Command::new(ferrun_tests::ferrun_binary());
    cmd.args(["--standalone", "--nproc-per-node", &n.to_string()])
        .args(launcher)
        .arg("--no-python")
        .arg(env!("CARGO_BIN_EXE_ferrun-train"))
        .args(args)
        .env("PATH", path_with_venv())
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    ferrun_tests::output_within(cmd.spawn().expect("ferrun"), LIMIT)
}

fn text(out: &Output) -> String {
    format!(
        "{}\n--- stderr ---\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Runs and expects success; stdout.
fn train(n: usize, args: &[&str]) -> String {
    let out = launch_with(n, &["--max-restarts", "0"], &[], args);
    assert!(out.status.success(), "{}", text(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The `final:` line's `key=value`.
fn final_value(stdout: &str, key: &str) -> String {
    let line = stdout
        .lines()
        .find_map(|l| l.split_once("final: ").map(|(_, rest)| rest.to_owned()))
        .unwrap_or_else(|| panic!("no final line in:\n{stdout}"));
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(&format!("{key}=")).map(str::to_owned))
        .unwrap_or_else(|| panic!("no {key} in {line}"))
}

fn accuracy(stdout: &str) -> f64 {
    final_value(stdout, "accuracy").parse().expect("accuracy")
}

fn params(path: &Path) -> Vec<f32> {
    std::fs::read(path)
        .expect("dumped parameters")
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Trains 20 plain-SGD steps (`steps-0` for none) and dumps the parameters; their path.
fn sgd_run(dir: &Path, name: &str, n: usize, batch: usize, extra: &[&str]) -> PathBuf {
    let dump = dir.join(name);
    let steps = if name.ends_with("steps-0") { "0" } else { "20" };
    let mut args = vec![
        "--optimizer",
        "sgd",
        "--momentum",
        "0",
        "--lr",
        "0.05",
        "--max-steps",
        steps,
        "--dump-params",
        dump.to_str().expect("utf-8"),
    ];
    let batch = batch.to_string();
    args.extend(["--batch-size", &batch]);
    args.extend(extra);
    train(n, &args);
    dump
}

#[test]
fn the_main_job_reaches_095_on_the_held_out_digits_at_four_ranks_and_at_one() {
    for n in [4, 1] {
        let out = train(n, &[]);
        assert!(
            out.lines()
                .filter(|l| l.contains("held-out accuracy"))
                .count()
                == 30,
            "one progress line per epoch from rank 0:\n{out}"
        );
        let acc = accuracy(&out);
        assert!(acc >= 0.95, "{n} ranks: held-out accuracy {acc}\n{out}");
    }
}

/// Two ranks × 16 see, step by step, the same 32 samples as one rank × 32 (the sampler's
/// order does not depend on the world size), and the averaged gradient is the same mean. What
/// differs is only the order of f32 additions: the batch sum of 32 terms is taken as two sums
/// of 16 and averaged. Each gradient element then differs by a few roundings (~1e-7 relative
/// of gradients of order 1); 20 steps of lr 0.05 move a parameter by at most 20 × 0.05 × that,
/// ~1e-7, and the dynamics do not amplify it in 20 steps. 1e-5 is that bound with a wide
/// margin, and two orders of magnitude below the steps' own movement (checked too).
#[test]
fn n_ranks_of_batch_b_match_one_rank_of_batch_n_b_and_overlap_changes_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let two = sgd_run(dir.path(), "two", 2, 16, &[]);
    let one = sgd_run(dir.path(), "one", 1, 32, &[]);
    let initial = sgd_run(dir.path(), "initial-steps-0", 1, 32, &[]);
    let (two, one, initial) = (params(&two), params(&one), params(&initial));
    let moved = max_diff(&one, &initial);
    assert!(moved > 1e-3, "training moved the parameters ({moved})");
    let diff = max_diff(&two, &one);
    assert!(diff <= 1e-5, "2 × 16 vs 1 × 32: max |Δ| = {diff}");
    // Overlap changes when buckets are reduced, not what: bitwise the same. Small buckets so
    // that there are several, reduced while backward runs.
    let buckets = ["--bucket-mb", "0.02", "--first-bucket-mb", "0.01"];
    let overlapped = sgd_run(dir.path(), "overlap", 2, 16, &buckets);
    let mut after: Vec<&str> = buckets.to_vec();
    after.push("--no-overlap");
    let after = sgd_run(dir.path(), "after", 2, 16, &after);
    assert_eq!(
        params(&overlapped),
        params(&after),
        "overlap changed the result"
    );
    assert!(max_diff(&params(&overlapped), &two) <= 1e-5);
}

#[test]
fn zero_stages_one_to_three_reach_the_parameters_of_ddp() {
    let dir = tempfile::tempdir().expect("tempdir");
    let small = ["--bucket-mb", "0.02", "--first-bucket-mb", "0.01"];
    let ddp = params(&sgd_run(dir.path(), "ddp", 4, 8, &small));
    for stage in ["zero1", "zero2", "zero3"] {
        let mut args = small.to_vec();
        args.extend(["--stage", stage]);
        let got = params(&sgd_run(dir.path(), stage, 4, 8, &args));
        // Reduce-scatter sums in another order than all-reduce: the same f32 roundings as
        // above, bounded the same way.
        let diff = max_diff(&got, &ddp);
        assert!(diff <= 1e-5, "{stage}: max |Δ| from DDP = {diff}");
    }
}

#[test]
fn a_worker_killed_mid_epoch_restarts_from_the_checkpoint_and_trains_on() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ckpt = dir.path().join("ckpt");
    let ckpt = ckpt.to_str().expect("utf-8");
    // 4 ranks × 32: 12 steps an epoch (the last of 8 samples). Rank 2 dies before step 93,
    // mid-epoch 8; the latest checkpoint is step 90's, 6 steps × 32 × 4 into that epoch.
    let out = launch_with(
        4,
        &["--max-restarts", "1"],
        &[("FERRUN_TRAIN_KILL_AT_STEP", "93:2")],
        &["--checkpoint-dir", ckpt, "--checkpoint-every", "5"],
    );
    let all = text(&out);
    assert!(out.status.success(), "{all}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("(step 90, epoch 8, 768 samples into it; written by 4 ranks, now 4)"),
        "resumed from the last checkpoint before the kill, mid-epoch:\n{all}"
    );
    assert!(
        all.contains("SIGKILL") || all.contains("signal 9") || all.contains("-9"),
        "{all}"
    );
    let acc = accuracy(&stdout);
    assert!(
        acc >= 0.95,
        "held-out accuracy after the restart: {acc}\n{all}"
    );
    assert!(Path::new(ckpt).join("final").join("state.json").is_file());
}

#[test]
fn a_job_of_four_resumes_at_two_where_its_epoch_stood() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ckpt = dir.path().join("ckpt");
    let ckpt = ckpt.to_str().expect("utf-8");
    train(
        4,
        &[
            "--checkpoint-dir",
            ckpt,
            "--checkpoint-every",
            "10",
            "--max-steps",
            "50",
        ],
    );
    let out = train(
        2,
        &["--checkpoint-dir", ckpt, "--resume", "--stage", "zero2"],
    );
    // Step 50 at 12 steps an epoch: epoch 5 (1-based), 2 steps × 32 × 4 ranks into it.
    assert!(
        out.contains("(step 50, epoch 5, 256 samples into it; written by 4 ranks, now 2)"),
        "{out}"
    );
    let acc = accuracy(&out);
    assert!(
        acc >= 0.95,
        "held-out accuracy after resuming at 2: {acc}\n{out}"
    );
}

#[test]
fn bad_input_is_refused_with_what_to_do() {
    // An unknown stage: a usage error (exit 2) listing the stages.
    let out = Command::new(env!("CARGO_BIN_EXE_ferrun-train"))
        .args(["--stage", "zero4"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("zero4") && err.contains("zero3"), "{err}");
    // A restart count that is not one (it decides whether to resume).
    let out = Command::new(env!("CARGO_BIN_EXE_ferrun-train"))
        .env("TORCHELASTIC_RESTART_COUNT", "abc")
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("\"abc\" is not a restart count"), "{err}");
    // A data file that does not exist.
    let out = launch_with(1, &[], &[], &["--data", "/nonexistent/digits.csv.gz"]);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("install scikit-learn"),
        "{}",
        text(&out)
    );
    // A checkpoint of another model, then a corrupt one: errors naming the file and the fix.
    let dir = tempfile::tempdir().expect("tempdir");
    let ckpt = dir.path().join("ckpt");
    let c = ckpt.to_str().expect("utf-8");
    train(
        1,
        &[
            "--checkpoint-dir",
            c,
            "--checkpoint-every",
            "5",
            "--max-steps",
            "5",
        ],
    );
    let out = launch_with(
        1,
        &[],
        &[],
        &["--checkpoint-dir", c, "--resume", "--hidden", "64"],
    );
    assert!(!out.status.success());
    assert!(
        text(&out).contains("pass the same --hidden"),
        "{}",
        text(&out)
    );
    let shard = ckpt.join("step-00000005").join("shard-00000-of-00001.bin");
    let len = std::fs::metadata(&shard).expect("shard").len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&shard)
        .and_then(|f| f.set_len(len / 2))
        .expect("truncate");
    let out = launch_with(1, &[], &[], &["--checkpoint-dir", c, "--resume"]);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("shard-00000-of-00001.bin"),
        "{}",
        text(&out)
    );
}
