//! The in-cluster controller: watches PyTorchJobs and their pods and services, plans each
//! reconcile with [`plan::plan`] and carries the plan out against the API server — children by
//! create and delete, the job's status by server-side apply, events through the events API.

mod apply;
pub mod http;
pub mod lease;
pub mod observe;
pub mod plan;

use apply::{api_error, carry_out, publish, write_status};

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::jiff::Timestamp;
use kube::api::ListParams;
use kube::core::DynamicObject;
use kube::runtime::controller::{Action, Config as ControllerConfig, Controller};
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::watcher;
use kube::{Api, Client, Resource, ResourceExt};

use crate::crd::PyTorchJob;
use crate::defaults::with_defaults;
use crate::lifecycle;
use crate::names::{CONTROLLER_NAME, JOB_NAME, OPERATOR_NAME};
use crate::policy::Condition;
use crate::validate::{validate, MANAGERS};
use plan::{observe, PlanOptions};

/// The field manager of this controller's server-side applies.
pub const MANAGER: &str = "ferrun-operator";

/// Why a reconcile failed (it is retried).
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    /// An API call failed.
    #[error("{what}: {source}")]
    Api {
        /// The call.
        what: String,
        /// Why.
        source: kube::Error,
    },
}

/// Counters served on `/metrics`.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Reconciles run.
    pub reconciles: AtomicU64,
    /// Reconciles that failed.
    pub failures: AtomicU64,
    /// Pods created.
    pub pods_created: AtomicU64,
    /// Pods deleted.
    pub pods_deleted: AtomicU64,
    /// Jobs that ended Succeeded.
    pub jobs_succeeded: AtomicU64,
    /// Jobs that ended Failed.
    pub jobs_failed: AtomicU64,
}

impl Metrics {
    /// The Prometheus text exposition of the counters.
    pub fn render(&self) -> String {
        let rows = [
            (
                "ferrun_operator_reconciles_total",
                "Reconciles run",
                &self.reconciles,
            ),
            (
                "ferrun_operator_reconcile_failures_total",
                "Reconciles that failed",
                &self.failures,
            ),
            (
                "ferrun_operator_pods_created_total",
                "Pods created",
                &self.pods_created,
            ),
            (
                "ferrun_operator_pods_deleted_total",
                "Pods deleted",
                &self.pods_deleted,
            ),
            (
                "ferrun_operator_jobs_succeeded_total",
                "Jobs that succeeded",
                &self.jobs_succeeded,
            ),
            (
                "ferrun_operator_jobs_failed_total",
                "Jobs that failed",
                &self.jobs_failed,
            ),
        ];
        rows.iter()
            .map(|(name, help, value)| {
                format!(
                    "# HELP {name} {help}.\n# TYPE {name} counter\n{name} {}\n",
                    value.load(Ordering::Relaxed)
                )
            })
            .collect()
    }
}

/// What every reconcile shares.
pub struct Context {
    /// The API client.
    pub client: Client,
    /// The planner's settings.
    pub options: PlanOptions,
    /// Events, as this controller.
    pub recorder: Recorder,
    /// Counters.
    pub metrics: Arc<Metrics>,
}

impl Context {
    /// A context for `client`, reporting events as `instance` (the pod's name).
    pub fn new(
        client: Client,
        options: PlanOptions,
        instance: Option<String>,
        metrics: Arc<Metrics>,
    ) -> Self {
        let reporter = Reporter {
            controller: MANAGER.into(),
            instance,
        };
        Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            options,
            metrics,
        }
    }
}

/// Reconciles one job.
///
/// # Errors
/// [`ReconcileError`] for a failed API call; the controller retries with back-off.
pub async fn reconcile(job: Arc<PyTorchJob>, ctx: Arc<Context>) -> Result<Action, ReconcileError> {
    ctx.metrics.reconciles.fetch_add(1, Ordering::Relaxed);
    let manager = job
        .spec
        .run_policy
        .as_ref()
        .and_then(|r| r.managed_by.as_deref());
    // Another controller's job (Kueue's MultiKueue…), or one being deleted: leave it alone.
    if manager.is_some_and(|m| !m.is_empty() && m != MANAGERS[0])
        || job.meta().deletion_timestamp.is_some()
    {
        return Ok(Action::await_change());
    }
    let namespace = job.namespace().unwrap_or_else(|| "default".into());
    let name = job.name_any();
    let jobs: Api<PyTorchJob> = Api::namespaced(ctx.client.clone(), &namespace);
    let defaulted = with_defaults(&job);
    if let Err(invalid) = validate(&defaulted) {
        let mut status = job.status.clone().unwrap_or_default();
        let now = k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(Timestamp::now());
        if lifecycle::set_condition(
            &mut status,
            Condition::Failed,
            "InvalidSpec",
            &invalid.to_string(),
            &now,
        ) {
            write_status(&jobs, &name, &status).await?;
            publish(&ctx, &job, true, "InvalidSpec", invalid.to_string()).await;
        }
        return Ok(Action::await_change());
    }
    let selector = format!("{JOB_NAME}={name},{OPERATOR_NAME}={CONTROLLER_NAME}");
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &namespace);
    let services: Api<Service> = Api::namespaced(ctx.client.clone(), &namespace);
    let listed = pods
        .list(&ListParams::default().labels(&selector))
        .await
        .map_err(api_error(format!("list the pods of {namespace}/{name}")))?;
    let observed: Vec<_> = listed.items.iter().filter_map(observe).collect();
    let service_names: Vec<String> = services
        .list(&ListParams::default().labels(&selector))
        .await
        .map_err(api_error(format!(
            "list the services of {namespace}/{name}"
        )))?
        .items
        .iter()
        .map(ResourceExt::name_any)
        .collect();
    let phase = match &ctx.options.render.gang {
        Some(gang) => {
            let groups: Api<DynamicObject> =
                Api::namespaced_with(ctx.client.clone(), &namespace, &gang.api_resource());
            let group = groups.get_opt(&name).await.map_err(api_error(format!(
                "read the PodGroup of {namespace}/{name} (is the gang scheduler installed?)"
            )))?;
            group.and_then(|g| g.data["status"]["phase"].as_str().map(str::to_owned))
        }
        None => None,
    };
    let plan = plan::plan(
        &defaulted,
        &observed,
        &service_names,
        phase.as_deref(),
        Timestamp::now(),
        &ctx.options,
    );
    carry_out(&ctx, &job, plan, &pods, &services, &jobs).await
}

/// Retries a failed reconcile after a pause.
pub fn error_policy(job: Arc<PyTorchJob>, error: &ReconcileError, ctx: Arc<Context>) -> Action {
    ctx.metrics.failures.fetch_add(1, Ordering::Relaxed);
    tracing::warn!("reconcile of {} failed: {error}", job.name_any());
    Action::requeue(Duration::from_secs(5))
}

/// The controller could not list PyTorchJobs: the CRD is missing, or the account may not.
#[derive(Debug, thiserror::Error)]
#[error("cannot list PyTorchJobs ({0}): is the CRD installed? `ferrun-operator crd | kubectl apply -f -`")]
pub struct NoCrd(#[source] pub kube::Error);

/// Runs the controller until a signal: jobs in `namespace` (all when `None`), their pods and
/// services by the operator's label, `concurrency` reconciles at once.
///
/// # Errors
/// When the PyTorchJob CRD is not installed (the message says how to install it).
pub async fn run(
    ctx: Arc<Context>,
    namespace: Option<&str>,
    concurrency: u16,
) -> Result<(), NoCrd> {
    let client = ctx.client.clone();
    let (jobs, pods, services): (Api<PyTorchJob>, Api<Pod>, Api<Service>) = match namespace {
        Some(ns) => (
            Api::namespaced(client.clone(), ns),
            Api::namespaced(client.clone(), ns),
            Api::namespaced(client, ns),
        ),
        None => (
            Api::all(client.clone()),
            Api::all(client.clone()),
            Api::all(client),
        ),
    };
    jobs.list(&ListParams::default().limit(1))
        .await
        .map_err(NoCrd)?;
    let children = watcher::Config::default().labels(&format!("{OPERATOR_NAME}={CONTROLLER_NAME}"));
    Controller::new(jobs, watcher::Config::default().any_semantic())
        .owns(pods, children.clone())
        .owns(services, children)
        .with_config(ControllerConfig::default().concurrency(concurrency))
        .shutdown_on_signal()
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            match result {
                Ok((job, _)) => tracing::debug!(
                    "reconciled {}/{}",
                    job.namespace.unwrap_or_default(),
                    job.name
                ),
                Err(e) => tracing::warn!("{e}"),
            }
        })
        .await;
    Ok(())
}
