//! Worker error files (`TORCHELASTIC_ERROR_FILE`), in torchrun's JSON format.
//!
//! A worker decorated with torch's `@record` writes
//! `{"message": {"message": "<Type>: <msg>", "extraInfo": {"py_callstack": "<traceback>", "timestamp": "<secs>"}}}`;
//! the newer short form is `{"message": "<msg>", "timestamp": <secs>}`. Both are read here.

use std::path::Path;

use serde_json::Value;

/// What a worker's error file says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorReport {
    /// The exception line, e.g. `RuntimeError: boom`.
    pub message: String,
    /// The Python traceback, when recorded.
    pub traceback: Option<String>,
    /// When the error was recorded (seconds since the epoch).
    pub timestamp: Option<i64>,
}

/// Reads an error file; `None` when the worker wrote none. A file that is not torchrun's
/// format still yields a report that says so, so that nothing the worker wrote is lost.
pub fn read(path: &Path) -> Option<ErrorReport> {
    let text = std::fs::read_to_string(path).ok()?;
    Some(parse(&text).unwrap_or_else(|why| ErrorReport {
        message: format!(
            "error file {} is not in torchrun's format ({why}): {}",
            path.display(),
            text.trim()
        ),
        traceback: None,
        timestamp: None,
    }))
}

fn parse(text: &str) -> Result<ErrorReport, String> {
    let json: Value = serde_json::from_str(text).map_err(|e| e.to_string())?;
    let as_int = |v: &Value| {
        v.as_i64()
            .or_else(|| v.as_str().and_then(|s| s.trim().parse().ok()))
    };
    match json.get("message") {
        Some(Value::Object(inner)) => {
            let extra = inner.get("extraInfo");
            Ok(ErrorReport {
                message: inner
                    .get("message")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_owned(),
                traceback: extra
                    .and_then(|e| e.get("py_callstack"))
                    .and_then(Value::as_str)
                    .map(str::to_owned),
                timestamp: extra.and_then(|e| e.get("timestamp")).and_then(as_int),
            })
        }
        Some(Value::String(message)) => Ok(ErrorReport {
            message: message.clone(),
            traceback: None,
            timestamp: json.get("timestamp").and_then(as_int),
        }),
        _ => Err("no \"message\" field".to_owned()),
    }
}

/// Writes the root cause into the launcher's own `TORCHELASTIC_ERROR_FILE` (set by a scheduler),
/// as torchrun's `@record` does: the worker's file, with `message.errorCode` set to its exit code.
///
/// # Errors
/// The file cannot be written.
pub fn write_for_scheduler(
    target: &Path,
    worker_file: Option<&Path>,
    message: &str,
    exit_code: i32,
) -> std::io::Result<()> {
    let from_worker = worker_file
        .and_then(|p| std::fs::read_to_string(p).ok())
        .and_then(|t| serde_json::from_str::<Value>(&t).ok())
        .filter(|v| v.get("message").is_some_and(Value::is_object));
    let mut json = from_worker.unwrap_or_else(|| {
        serde_json::json!({"message": {"message": message, "extraInfo": {
            "timestamp": chrono::Utc::now().timestamp().to_string()}}})
    });
    json["message"]["errorCode"] = Value::from(exit_code);
    std::fs::write(
        target,
        serde_json::to_vec(&json).map_err(std::io::Error::other)?,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_record_decorator_format() {
        let text = r#"{"message": {"message": "RuntimeError: boom", "extraInfo": {"py_callstack": "Traceback...\nRuntimeError: boom\n", "timestamp": "1764180000"}}}"#;
        let r = parse(text).expect("parse");
        assert_eq!(r.message, "RuntimeError: boom");
        assert_eq!(
            r.traceback.as_deref(),
            Some("Traceback...\nRuntimeError: boom\n")
        );
        assert_eq!(r.timestamp, Some(1_764_180_000));
    }

    #[test]
    fn reads_the_short_format() {
        let r = parse(r#"{"message": "oops", "timestamp": 12}"#).expect("parse");
        assert_eq!(
            (r.message.as_str(), r.traceback, r.timestamp),
            ("oops", None, Some(12))
        );
    }

    #[test]
    fn keeps_unreadable_files_in_the_report() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("error.json");
        assert_eq!(read(&path), None);
        std::fs::write(&path, "not json").expect("write");
        let r = read(&path).expect("report");
        assert!(r.message.contains("not in torchrun's format") && r.message.contains("not json"));
    }

    #[test]
    fn copies_the_root_cause_for_the_scheduler_with_its_exit_code() {
        let dir = tempfile::tempdir().expect("tempdir");
        let worker = dir.path().join("w.json");
        std::fs::write(
            &worker,
            r#"{"message": {"message": "E: x", "extraInfo": {"timestamp": "5"}}}"#,
        )
        .expect("write");
        let target = dir.path().join("launcher.json");
        write_for_scheduler(&target, Some(&worker), "unused", 3).expect("write");
        let v: Value =
            serde_json::from_slice(&std::fs::read(&target).expect("read")).expect("json");
        assert_eq!(v["message"]["errorCode"], 3);
        assert_eq!(v["message"]["message"], "E: x");
        write_for_scheduler(&target, None, "Signal 9 (SIGKILL)", 137).expect("write");
        let v: Value =
            serde_json::from_slice(&std::fs::read(&target).expect("read")).expect("json");
        assert_eq!(v["message"]["message"], "Signal 9 (SIGKILL)");
    }
}
