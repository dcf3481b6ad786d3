//! ferrun's Kubernetes operator for kubeflow.org/v1 PyTorchJobs (and Trainer v2 TrainJobs): the same objects users already
//! write for the Kubeflow training-operator, rendered into the same pods, services and
//! environment, with that operator's known bugs fixed.
//!
//! - [`crd`]: the PyTorchJob resource, field for field.
//! - [`defaults`], [`validate`]: the training-operator's defaults, its webhook's checks and
//!   those it misses.
//! - [`render`]: pods, services and environment as pure functions of a job; [`scheduling`]:
//!   its PodGroup (gang scheduling) and HorizontalPodAutoscaler.
//! - [`controller`]: the in-cluster controller (planner, API calls, leader election, metrics).
//! - [`lifecycle`]: conditions, replica counts, success and failure rules, restarts.
//! - [`local`]: a job run on this machine as local processes, no cluster needed.
//! - [`names`], [`policy`]: objects' names and labels; the API's policy words as enums.
//! - [`trainjob`]: Kubeflow Trainer v2 TrainJobs — read, checked, rendered, run locally.
//!
//! It stands alone: it shares the worker environment contract with the launcher through a
//! cross-crate test in `tests/`, not by importing the launcher.

pub mod controller;
pub mod crd;
pub mod defaults;
pub mod lifecycle;
pub mod local;
pub mod names;
pub mod policy;
pub mod render;
pub mod scheduling;
pub mod trainjob;
pub mod validate;

/// Why a job's text was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// Too large or too deeply nested to be a job (checked before parsing).
    #[error("{0}")]
    Shape(String),
    /// Not the kind of object expected, or a field of the wrong type or value.
    #[error("not a {kind}: {source}")]
    Parse {
        /// What was expected.
        kind: &'static str,
        /// The parser's message, with its place.
        source: serde_yaml::Error,
    },
    /// The object has no `metadata.name`.
    #[error("the {0} has no metadata.name")]
    Unnamed(&'static str),
    /// The job breaks the API's rules (every problem listed).
    #[error(transparent)]
    Invalid(#[from] validate::Invalid),
}

/// Reads a PyTorchJob from YAML (or JSON), applies the defaults and validates it.
///
/// # Errors
/// [`LoadError`]: the parse error's place, or every validation problem.
pub fn load_job(text: &str) -> Result<crd::PyTorchJob, LoadError> {
    let job: crd::PyTorchJob = parse(text, "PyTorchJob")?;
    if job.metadata.name.is_none() {
        return Err(LoadError::Unnamed("PyTorchJob"));
    }
    let job = defaults::with_defaults(&job);
    validate::validate(&job)?;
    Ok(job)
}

/// The `kind` a job's text declares (`PyTorchJob`, `TrainJob`, …), read before the rest so
/// that each kind gets its own reader and messages.
///
/// # Errors
/// The text is too large or deep, or not YAML.
pub fn kind_of(text: &str) -> Result<Option<String>, LoadError> {
    let value: serde_yaml::Value = parse(text, "Kubernetes object")?;
    Ok(value
        .get("kind")
        .and_then(|k| k.as_str())
        .map(str::to_owned))
}

/// Parses an object of `kind` from YAML (or JSON) once its text has passed [`check_shape`].
pub(crate) fn parse<T: serde::de::DeserializeOwned>(
    text: &str,
    kind: &'static str,
) -> Result<T, LoadError> {
    check_shape(text)?;
    serde_yaml::from_str(text).map_err(|source| LoadError::Parse { kind, source })
}

/// Largest job text accepted: Kubernetes (etcd) stores no object past 1.5 MiB.
pub const MAX_JOB_BYTES: usize = 1536 * 1024;
/// Deepest nesting accepted, in flow brackets or in indentation columns: a PyTorchJob nests
/// about 15 levels; parsing a hostile, deeply nested text takes time that grows much faster.
pub const MAX_DEPTH: usize = 64;
const MAX_INDENT: usize = 4 * MAX_DEPTH;

/// Refuses, before parsing, a text too large or too deeply nested to be a PyTorchJob.
pub(crate) fn check_shape(text: &str) -> Result<(), LoadError> {
    if text.len() > MAX_JOB_BYTES {
        return Err(LoadError::Shape(format!(
            "the job is {} bytes; Kubernetes takes objects of at most {MAX_JOB_BYTES}: is this the right file?",
            text.len()
        )));
    }
    let (mut depth, mut quote) = (0usize, None::<char>);
    for (n, line) in text.lines().enumerate() {
        let indent = line.len() - line.trim_start_matches([' ', '\t']).len();
        if indent > MAX_INDENT {
            return Err(LoadError::Shape(format!(
                "line {}: indented {indent} columns, past {MAX_INDENT}: a PyTorchJob nests far less deep",
                n + 1
            )));
        }
        for c in line.chars() {
            match (quote, c) {
                (Some(q), c) if c == q => quote = None,
                (Some(_), _) => {}
                (None, '"' | '\'') => quote = Some(c),
                (None, '#') => break,
                (None, '[' | '{') => {
                    depth += 1;
                    if depth > MAX_DEPTH {
                        return Err(LoadError::Shape(format!(
                            "line {}: brackets nested deeper than {MAX_DEPTH}: a PyTorchJob nests far less deep",
                            n + 1
                        )));
                    }
                }
                (None, ']' | '}') => depth = depth.saturating_sub(1),
                _ => {}
            }
        }
        // A quote open at the end of a line continues, as YAML's do.
    }
    Ok(())
}
