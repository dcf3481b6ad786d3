//! Carrying a plan out against the API server: children by create and delete (an object
//! already there, or already gone, is fine), the PodGroup and autoscaler by server-side apply,
//! events, and last the job's status by server-side apply.

use std::sync::atomic::Ordering;

use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::{Pod, Service};
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::core::DynamicObject;
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use kube::{Api, Resource, ResourceExt};
use serde_json::json;

use super::plan::Plan;
use super::{Context, ReconcileError, MANAGER};
use crate::crd::{JobStatus, PyTorchJob};
use crate::lifecycle::is_true;
use crate::policy::Condition;

/// Wraps an API error with the call that failed.
pub(super) fn api_error(what: impl Into<String>) -> impl FnOnce(kube::Error) -> ReconcileError {
    let what = what.into();
    move |source| ReconcileError::Api { what, source }
}

/// Whether an API error only says the object is already as wanted (created or gone).
pub(super) fn settled(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(status) if status.code == 409 || status.code == 404)
}

/// Makes the API calls a plan asks for, children first, then the status.
pub(super) async fn carry_out(
    ctx: &Context,
    job: &PyTorchJob,
    plan: Plan,
    pods: &Api<Pod>,
    services: &Api<Service>,
    jobs: &Api<PyTorchJob>,
) -> Result<Action, ReconcileError> {
    let name = job.name_any();
    let was = |kind| job.status.as_ref().is_some_and(|s| is_true(s, kind));
    let (succeeded_before, failed_before) = (was(Condition::Succeeded), was(Condition::Failed));
    for deletion in &plan.delete_pods {
        let params = if deletion.force {
            DeleteParams::default().grace_period(0)
        } else {
            DeleteParams::default()
        };
        match pods.delete(&deletion.name, &params).await {
            Ok(_) => {
                ctx.metrics.pods_deleted.fetch_add(1, Ordering::Relaxed);
                publish(
                    ctx,
                    job,
                    false,
                    "SuccessfulDeletePod",
                    format!("Deleted pod: {}", deletion.name),
                )
                .await;
            }
            Err(e) if settled(&e) => {}
            Err(e) => return Err(api_error(format!("delete pod {}", deletion.name))(e)),
        }
    }
    for service in &plan.delete_services {
        match services.delete(service, &DeleteParams::default()).await {
            Ok(_) => {
                publish(
                    ctx,
                    job,
                    false,
                    "SuccessfulDeleteService",
                    format!("Deleted service: {service}"),
                )
                .await
            }
            Err(e) if settled(&e) => {}
            Err(e) => return Err(api_error(format!("delete service {service}"))(e)),
        }
    }
    for pod in &plan.create_pods {
        let pod_name = pod.name_any();
        match pods.create(&PostParams::default(), pod).await {
            Ok(_) => {
                ctx.metrics.pods_created.fetch_add(1, Ordering::Relaxed);
                publish(
                    ctx,
                    job,
                    false,
                    "SuccessfulCreatePod",
                    format!("Created pod: {pod_name}"),
                )
                .await;
            }
            Err(e) if settled(&e) => {}
            Err(e) => return Err(api_error(format!("create pod {pod_name}"))(e)),
        }
    }
    for service in &plan.create_services {
        let service_name = service.name_any();
        match services.create(&PostParams::default(), service).await {
            Ok(_) => {
                publish(
                    ctx,
                    job,
                    false,
                    "SuccessfulCreateService",
                    format!("Created service: {service_name}"),
                )
                .await
            }
            Err(e) if settled(&e) => {}
            Err(e) => return Err(api_error(format!("create service {service_name}"))(e)),
        }
    }
    apply_group_and_autoscaler(ctx, job, &plan).await?;
    for note in &plan.notes {
        publish(ctx, job, note.warning, &note.reason, note.message.clone()).await;
    }
    if plan.delete_job {
        match jobs.delete(&name, &DeleteParams::background()).await {
            Ok(_) => {}
            Err(e) if settled(&e) => {}
            Err(e) => return Err(api_error(format!("delete job {name} (its TTL passed)"))(e)),
        }
        return Ok(Action::await_change());
    }
    if job.status.as_ref() != Some(&plan.status) {
        write_status(jobs, &name, &plan.status).await?;
        if is_true(&plan.status, Condition::Succeeded) && !succeeded_before {
            ctx.metrics.jobs_succeeded.fetch_add(1, Ordering::Relaxed);
        }
        if is_true(&plan.status, Condition::Failed) && !failed_before {
            ctx.metrics.jobs_failed.fetch_add(1, Ordering::Relaxed);
        }
    }
    Ok(plan
        .requeue_after
        .map_or_else(Action::await_change, Action::requeue))
}

/// Applies or deletes the job's PodGroup and HorizontalPodAutoscaler as the plan says.
async fn apply_group_and_autoscaler(
    ctx: &Context,
    job: &PyTorchJob,
    plan: &Plan,
) -> Result<(), ReconcileError> {
    let namespace = job.namespace().unwrap_or_else(|| "default".into());
    let name = job.name_any();
    let apply = PatchParams::apply(MANAGER).force();
    if let Some(gang) = &ctx.options.render.gang {
        let groups: Api<DynamicObject> =
            Api::namespaced_with(ctx.client.clone(), &namespace, &gang.api_resource());
        if let Some(group) = &plan.apply_pod_group {
            groups
                .patch(&name, &apply, &Patch::Apply(group))
                .await
                .map_err(api_error(format!("apply the PodGroup of {name}")))?;
        }
        if plan.delete_pod_group {
            match groups.delete(&name, &DeleteParams::default()).await {
                Ok(_) => {
                    publish(
                        ctx,
                        job,
                        false,
                        "SuccessfulDeletePodGroup",
                        format!("Deleted PodGroup: {name}"),
                    )
                    .await
                }
                Err(e) if settled(&e) => {}
                Err(e) => return Err(api_error(format!("delete the PodGroup of {name}"))(e)),
            }
        }
    }
    let autoscalers: Api<HorizontalPodAutoscaler> = Api::namespaced(ctx.client.clone(), &namespace);
    if let Some(hpa) = &plan.apply_autoscaler {
        autoscalers
            .patch(&name, &apply, &Patch::Apply(hpa))
            .await
            .map_err(api_error(format!(
                "apply the HorizontalPodAutoscaler of {name}"
            )))?;
    }
    if plan.delete_autoscaler {
        match autoscalers.delete(&name, &DeleteParams::default()).await {
            Ok(_) => {}
            Err(e) if settled(&e) => {}
            Err(e) => {
                return Err(api_error(format!(
                    "delete the HorizontalPodAutoscaler of {name}"
                ))(e))
            }
        }
    }
    Ok(())
}

/// Writes the job's status by server-side apply (only the fields this controller owns).
pub(super) async fn write_status(
    jobs: &Api<PyTorchJob>,
    name: &str,
    status: &JobStatus,
) -> Result<(), ReconcileError> {
    let patch = json!({
        "apiVersion": "kubeflow.org/v1",
        "kind": "PyTorchJob",
        "status": status,
    });
    jobs.patch_status(
        name,
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await
    .map_err(api_error(format!("write the status of {name}")))?;
    Ok(())
}

/// Records an event on the job; a failure to do so is logged, not fatal.
pub(super) async fn publish(
    ctx: &Context,
    job: &PyTorchJob,
    warning: bool,
    reason: &str,
    note: String,
) {
    let event = Event {
        type_: if warning {
            EventType::Warning
        } else {
            EventType::Normal
        },
        reason: reason.into(),
        note: Some(note),
        action: "Reconcile".into(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&event, &job.object_ref(&())).await {
        tracing::warn!("cannot record event {reason} on {}: {e}", job.name_any());
    }
}
