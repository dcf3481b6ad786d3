//! Gang scheduling and autoscaling objects of a job, as the training-operator renders them: the
//! PodGroup (Volcano's or scheduler-plugins') with the pods' scheduler and group markings, and
//! the HorizontalPodAutoscaler of an elastic job's workers.

use std::collections::BTreeMap;

use k8s_openapi::api::autoscaling::v2::{
    CrossVersionObjectReference, HorizontalPodAutoscaler, HorizontalPodAutoscalerSpec,
};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::core::{ApiResource, DynamicObject, GroupVersionKind};
use serde_json::json;

use crate::crd::{PyTorchJob, WORKER};
use crate::names::{owner_reference, replicas, total_replicas};

/// Which gang scheduler places the pods (the training-operator's `--gang-scheduler-name`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Gang {
    /// Volcano (`scheduling.volcano.sh/v1beta1` PodGroups).
    Volcano,
    /// scheduler-plugins' coscheduling (`scheduling.x-k8s.io/v1alpha1`), under this scheduler name.
    SchedulerPlugins(String),
}

impl Gang {
    /// From the flag: empty for none, `volcano`, or a scheduler-plugins scheduler's name.
    pub fn from_flag(name: &str) -> Option<Self> {
        match name {
            "" => None,
            "volcano" => Some(Self::Volcano),
            other => Some(Self::SchedulerPlugins(other.into())),
        }
    }

    /// The PodGroup kind's API resource.
    pub fn api_resource(&self) -> ApiResource {
        let gvk = match self {
            Self::Volcano => GroupVersionKind::gvk("scheduling.volcano.sh", "v1beta1", "PodGroup"),
            Self::SchedulerPlugins(_) => {
                GroupVersionKind::gvk("scheduling.x-k8s.io", "v1alpha1", "PodGroup")
            }
        };
        ApiResource::from_gvk(&gvk)
    }

    fn scheduler_name(&self) -> &str {
        match self {
            Self::Volcano => "volcano",
            Self::SchedulerPlugins(name) => name,
        }
    }

    /// Marks a pod for its group: the scheduler (unless the template names one), and Volcano's
    /// annotations or scheduler-plugins' label.
    pub fn decorate(&self, job: &str, rtype: &str, pod: &mut Pod) {
        if let Some(spec) = pod.spec.as_mut() {
            spec.scheduler_name
                .get_or_insert_with(|| self.scheduler_name().to_owned());
        }
        match self {
            Self::Volcano => {
                let annotations = pod.metadata.annotations.get_or_insert_with(BTreeMap::new);
                annotations.insert("scheduling.k8s.io/group-name".into(), job.into());
                annotations.insert("volcano.sh/task-spec".into(), rtype.to_ascii_lowercase());
            }
            Self::SchedulerPlugins(_) => {
                let labels = pod.metadata.labels.get_or_insert_with(BTreeMap::new);
                labels.insert("scheduling.x-k8s.io/pod-group".into(), job.into());
            }
        }
    }

    /// The job's PodGroup: all its pods (or `minAvailable`) scheduled together.
    pub fn pod_group(&self, job: &PyTorchJob) -> DynamicObject {
        let policy = job
            .spec
            .run_policy
            .as_ref()
            .and_then(|r| r.scheduling_policy.clone())
            .unwrap_or_default();
        let min_member = policy.min_available.unwrap_or_else(|| total_replicas(job));
        let min_resources = policy
            .min_resources
            .clone()
            .unwrap_or_else(|| requests_of_first(job, min_member));
        let spec = match self {
            Self::Volcano => json!({
                "minMember": min_member,
                "queue": policy.queue.clone().unwrap_or_else(|| "default".into()),
                "priorityClassName": policy.priority_class,
                "minResources": min_resources,
            }),
            Self::SchedulerPlugins(_) => json!({
                "minMember": min_member,
                "minResources": min_resources,
                "scheduleTimeoutSeconds": policy.schedule_timeout_seconds,
            }),
        };
        let mut group = DynamicObject::new(job.job_name(), &self.api_resource())
            .within(job.metadata.namespace.as_deref().unwrap_or("default"));
        group.metadata = ObjectMeta {
            annotations: job.metadata.annotations.clone(),
            owner_references: Some(vec![owner_reference(job)]),
            ..group.metadata
        };
        group.data = json!({ "spec": spec });
        group
    }
}

/// Σ requests (limits where a request is missing) of the first `count` pods, masters first.
fn requests_of_first(job: &PyTorchJob, count: i32) -> BTreeMap<String, Quantity> {
    let mut totals: BTreeMap<String, f64> = BTreeMap::new();
    for (rtype, _) in replicas(job).into_iter().take(count.max(0) as usize) {
        let containers = job
            .replica(&rtype)
            .and_then(|r| r.template.spec.as_ref())
            .map(|p| p.containers.clone())
            .unwrap_or_default();
        for resources in containers.iter().filter_map(|c| c.resources.as_ref()) {
            let mut wanted = resources.limits.clone().unwrap_or_default();
            wanted.extend(resources.requests.clone().unwrap_or_default());
            for (name, quantity) in wanted {
                *totals.entry(name).or_default() += parse_quantity(&quantity.0);
            }
        }
    }
    totals
        .into_iter()
        .map(|(name, value)| (name, Quantity(format_quantity(value))))
        .collect()
}

/// A Kubernetes quantity as a plain number (`500m` → 0.5, `2Gi` → 2·2³⁰).
fn parse_quantity(text: &str) -> f64 {
    let suffixes: [(&str, f64); 11] = [
        ("Ki", 1024.0),
        ("Mi", 1024f64.powi(2)),
        ("Gi", 1024f64.powi(3)),
        ("Ti", 1024f64.powi(4)),
        ("m", 1e-3),
        ("k", 1e3),
        ("M", 1e6),
        ("G", 1e9),
        ("T", 1e12),
        ("P", 1e15),
        ("E", 1e18),
    ];
    for (suffix, scale) in suffixes {
        if let Some(number) = text.strip_suffix(suffix) {
            return number.parse::<f64>().unwrap_or(0.0) * scale;
        }
    }
    text.parse().unwrap_or(0.0)
}

/// A number as a quantity: whole numbers plain, fractions in milli-units.
fn format_quantity(value: f64) -> String {
    if value.fract() == 0.0 {
        format!("{value:.0}")
    } else {
        format!("{:.0}m", value * 1000.0)
    }
}

/// The HorizontalPodAutoscaler of an elastic job's workers, when its policy names metrics.
pub fn autoscaler(job: &PyTorchJob) -> Option<HorizontalPodAutoscaler> {
    let elastic = job.spec.elastic_policy.as_ref()?;
    let metrics = elastic.metrics.clone().filter(|m| !m.is_empty())?;
    let workers = job.replica(WORKER).map_or(1, |w| w.count());
    Some(HorizontalPodAutoscaler {
        metadata: ObjectMeta {
            name: Some(job.job_name().into()),
            namespace: job.metadata.namespace.clone(),
            owner_references: Some(vec![owner_reference(job)]),
            ..ObjectMeta::default()
        },
        spec: HorizontalPodAutoscalerSpec {
            scale_target_ref: CrossVersionObjectReference {
                api_version: Some("kubeflow.org/v1".into()),
                kind: "PyTorchJob".into(),
                name: job.job_name().into(),
            },
            min_replicas: Some(elastic.min_replicas.unwrap_or(workers)),
            max_replicas: elastic.max_replicas.unwrap_or(workers),
            metrics: Some(metrics),
            behavior: None,
        },
        status: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities_add_up() {
        assert_eq!(parse_quantity("500m"), 0.5);
        assert_eq!(parse_quantity("2Gi"), 2.0 * 1024f64.powi(3));
        assert_eq!(format_quantity(1.5), "1500m");
        assert_eq!(format_quantity(3.0), "3");
    }
}
