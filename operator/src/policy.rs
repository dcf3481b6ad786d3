//! The words of the PyTorchJob API that decide behaviour — restart policies, clean-pod
//! policies and condition types — as enums. A job's text is parsed into them once, at the
//! edge (an unknown word is a parse error that lists the known ones); everything after compares
//! enums, never strings.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A replica's `restartPolicy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
pub enum RestartPolicy {
    /// Restart the container whatever its exit.
    Always,
    /// Restart it when it fails (the training-operator's default).
    #[default]
    OnFailure,
    /// Never restart: a failure fails the job.
    Never,
    /// Recreate the pod for exit codes of 128 and more (signals: preemption, OOM, eviction);
    /// other failures fail the job.
    ExitCode,
}

impl RestartPolicy {
    /// The kubelet's restart policy for the pod (`ExitCode` → `Never`: the operator decides on
    /// recreation from the exit code).
    pub fn for_pod(self) -> &'static str {
        match self {
            Self::Always => "Always",
            Self::OnFailure => "OnFailure",
            Self::Never | Self::ExitCode => "Never",
        }
    }
}

/// `runPolicy.cleanPodPolicy`: which pods are deleted when the job ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
pub enum CleanPodPolicy {
    /// Every pod (and every service).
    All,
    /// The pods still running or pending.
    Running,
    /// None (the training-operator's default).
    #[default]
    None,
}

/// A job condition's type, as the training-operator writes them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Condition {
    /// The job was accepted.
    Created,
    /// A pod runs.
    Running,
    /// A pod is being restarted or recreated.
    Restarting,
    /// The job succeeded.
    Succeeded,
    /// The job is suspended.
    Suspended,
    /// The job failed.
    Failed,
}

impl Condition {
    /// The type as written in the job's status.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Created => "Created",
            Self::Running => "Running",
            Self::Restarting => "Restarting",
            Self::Succeeded => "Succeeded",
            Self::Suspended => "Suspended",
            Self::Failed => "Failed",
        }
    }

    /// The condition `Condition::<name>` reads as (types written by others are `None`).
    pub fn parse(name: &str) -> Option<Self> {
        [
            Self::Created,
            Self::Running,
            Self::Restarting,
            Self::Succeeded,
            Self::Suspended,
            Self::Failed,
        ]
        .into_iter()
        .find(|c| c.as_str() == name)
    }

    /// Whether this is a terminal condition.
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed)
    }
}

impl std::fmt::Display for Condition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unknown_policy_is_refused_with_the_known_ones() {
        let e = serde_yaml::from_str::<RestartPolicy>("Sometimes").unwrap_err();
        let text = e.to_string();
        assert!(text.contains("Sometimes"), "{text}");
        assert!(
            text.contains("OnFailure") && text.contains("ExitCode"),
            "{text}"
        );
        assert_eq!(
            serde_yaml::from_str::<CleanPodPolicy>("Running").unwrap(),
            CleanPodPolicy::Running
        );
    }

    #[test]
    fn conditions_read_back_as_written() {
        for c in [
            "Created",
            "Running",
            "Restarting",
            "Succeeded",
            "Suspended",
            "Failed",
        ] {
            assert_eq!(Condition::parse(c).map(Condition::as_str), Some(c));
        }
        assert_eq!(Condition::parse("PodsReady"), None);
    }
}
