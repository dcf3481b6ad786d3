//! What a job becomes, as pure functions of the job (defaults applied): pods
//! `<job>-master-0` / `<job>-worker-<i>`, one headless service per pod, and the environment
//! of training-operator 1.9 — names, labels, owner references and variables alike, so that
//! existing torchrun command lines keep working.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Container, EnvVar, EnvVarSource, Pod, PodSpec, ResourceRequirements, SecretKeySelector,
    Service, ServicePort, ServiceSpec,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use crate::crd::{PyTorchJob, MASTER, WORKER};
use crate::defaults::{job_port, main_container};
use crate::names::{is_master_role, owner_reference, pod_name, selector, total_replicas, JOB_ROLE};

/// How workers wait for the master before they start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MasterWait {
    /// No init container where the training container runs `ferrun`, whose agents wait for
    /// the master's store themselves (bounded by its join timeout, and on the port, not only
    /// the name); the training-operator's `nslookup` init container otherwise.
    #[default]
    Auto,
    /// Always the training-operator's `nslookup` init container.
    Nslookup,
    /// No init container.
    None,
}

impl std::str::FromStr for MasterWait {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "auto" => Ok(Self::Auto),
            "nslookup" => Ok(Self::Nslookup),
            "none" => Ok(Self::None),
            other => Err(format!("{other:?}: use auto, nslookup or none")),
        }
    }
}

/// Rendering settings (the operator's flags).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RenderOptions {
    /// Gang scheduling of every job's pods, if any.
    pub gang: Option<crate::scheduling::Gang>,
    /// How workers wait for the master.
    pub master_wait: MasterWait,
    /// Image of the `nslookup` init container.
    pub init_image: String,
    /// Its tries, two seconds apart.
    pub init_max_tries: u32,
}

impl Default for RenderOptions {
    fn default() -> Self {
        Self {
            gang: None,
            master_wait: MasterWait::Auto,
            init_image: "alpine:3.10".into(),
            init_max_tries: 100,
        }
    }
}

fn var(name: &str, value: impl Into<String>) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: Some(value.into()),
        value_from: None,
    }
}

/// The variables the operator appends to every container of a replica's pod, in the
/// training-operator's order.
pub fn environment(job: &PyTorchJob, rtype: &str, index: i32) -> Vec<EnvVar> {
    let name = job.job_name();
    let spec = &job.spec;
    let mut env = vec![var("PYTHONUNBUFFERED", "1")];
    if job.replica(MASTER).is_some() {
        let port = job_port(job, MASTER).to_string();
        let addr = pod_name(name, MASTER, 0);
        env.push(var("MASTER_PORT", &port));
        env.push(var("PET_MASTER_PORT", port));
        env.push(var("MASTER_ADDR", &addr));
        env.push(var("PET_MASTER_ADDR", addr));
        // A number of processes per pod, or 1 for auto/cpu/gpu (the operator cannot know).
        let nproc = spec
            .nproc_per_node
            .as_deref()
            .and_then(|n| n.parse::<i32>().ok())
            .unwrap_or(1);
        let rank = if rtype == WORKER { index + 1 } else { index };
        env.push(var("WORLD_SIZE", (total_replicas(job) * nproc).to_string()));
        env.push(var("RANK", rank.to_string()));
        env.push(var("PET_NODE_RANK", rank.to_string()));
    }
    if let Some(nproc) = &spec.nproc_per_node {
        env.push(var("PET_NPROC_PER_NODE", nproc));
    }
    let Some(elastic) = &spec.elastic_policy else {
        env.push(var("PET_NNODES", total_replicas(job).to_string()));
        return env;
    };
    let host = elastic
        .rdzv_host
        .clone()
        .unwrap_or_else(|| pod_name(name, WORKER, 0));
    let port = elastic.rdzv_port.unwrap_or_else(|| job_port(job, WORKER));
    env.push(var("PET_RDZV_ENDPOINT", format!("{host}:{port}")));
    env.push(var(
        "PET_RDZV_BACKEND",
        elastic.rdzv_backend.as_deref().unwrap_or("c10d"),
    ));
    let (min, max) = (
        elastic.min_replicas.unwrap_or(1),
        elastic.max_replicas.unwrap_or(1),
    );
    env.push(var("PET_NNODES", format!("{min}:{max}")));
    if let Some(restarts) = elastic.max_restarts {
        env.push(var("PET_MAX_RESTARTS", restarts.to_string()));
    }
    if let Some(nproc) = elastic.n_proc_per_node {
        env.push(var("PET_NPROC_PER_NODE", nproc.to_string()));
    }
    if let Some(id) = &elastic.rdzv_id {
        env.push(var("PET_RDZV_ID", id));
    }
    if let Some(conf) = elastic.rdzv_conf.as_ref().filter(|c| !c.is_empty()) {
        let pairs: Vec<String> = conf
            .iter()
            .map(|c| format!("{}={}", c.key, c.value))
            .collect();
        env.push(var("PET_RDZV_CONF", pairs.join(",")));
    }
    if elastic.standalone == Some(true) {
        // The training-operator writes "", which torchrun's int() parsing rejects.
        env.push(var("PET_STANDALONE", "1"));
    }
    if let Some(secret) = token_secret(job) {
        // The rendezvous token from the Secret, never in the pod spec itself.
        env.push(EnvVar {
            name: TOKEN_ENV.into(),
            value: None,
            value_from: Some(EnvVarSource {
                secret_key_ref: Some(SecretKeySelector {
                    name: secret.to_owned(),
                    key: TOKEN_SECRET_KEY.into(),
                    optional: Some(false),
                }),
                ..EnvVarSource::default()
            }),
        });
    }
    env
}

/// The annotation naming the Secret whose [`TOKEN_SECRET_KEY`] holds the job's rendezvous
/// token (ferrun's `FERRUN_RDZV_TOKEN`); the PyTorchJob schema has no field for it.
pub const TOKEN_SECRET_ANNOTATION: &str = "ferrun.io/rdzv-token-secret";
/// The key of the token in that Secret.
pub const TOKEN_SECRET_KEY: &str = "token";
/// The variable the launcher reads the token from.
pub const TOKEN_ENV: &str = "FERRUN_RDZV_TOKEN";

/// The Secret an elastic job names for its rendezvous token.
pub fn token_secret(job: &PyTorchJob) -> Option<&str> {
    job.metadata
        .annotations
        .as_ref()?
        .get(TOKEN_SECRET_ANNOTATION)
        .map(String::as_str)
}

/// Whether a container's command starts `ferrun`.
pub fn runs_ferrun(container: &Container) -> bool {
    let first = container
        .command
        .as_ref()
        .and_then(|c| c.first())
        .or_else(|| container.args.as_ref().and_then(|a| a.first()));
    first.is_some_and(|c| c.rsplit('/').next() == Some("ferrun"))
}

/// The pod of replica `index` of `rtype`.
pub fn pod(job: &PyTorchJob, rtype: &str, index: i32, options: &RenderOptions) -> Pod {
    let name = job.job_name();
    let replica = job.replica(rtype).cloned().unwrap_or_default();
    let template = replica.template;
    let mut meta = template.metadata.unwrap_or_default();
    let mut labels = meta.labels.take().unwrap_or_default();
    labels.extend(selector(name, rtype, index));
    if is_master_role(job, rtype, index) {
        labels.insert(JOB_ROLE.into(), "master".into());
    }
    let mut spec: PodSpec = template.spec.unwrap_or_default();
    spec.restart_policy = Some(replica.restart_policy.unwrap_or_default().for_pod().into());
    let env = environment(job, rtype, index);
    for container in &mut spec.containers {
        container
            .env
            .get_or_insert_with(Vec::new)
            .extend(env.iter().cloned());
    }
    let ferrun = main_container(&spec.containers).is_some_and(runs_ferrun);
    let wait = match options.master_wait {
        MasterWait::Auto => !ferrun,
        MasterWait::Nslookup => true,
        MasterWait::None => false,
    };
    if rtype == WORKER && job.replica(MASTER).is_some() && wait {
        spec.init_containers
            .get_or_insert_with(Vec::new)
            .push(init_container(name, options));
    }
    let mut pod = Pod {
        metadata: ObjectMeta {
            name: Some(pod_name(name, rtype, index)),
            namespace: job.metadata.namespace.clone(),
            labels: Some(labels),
            annotations: meta.annotations,
            finalizers: meta.finalizers,
            owner_references: Some(vec![owner_reference(job)]),
            ..ObjectMeta::default()
        },
        spec: Some(spec),
        status: None,
    };
    if let Some(gang) = &options.gang {
        gang.decorate(name, rtype, &mut pod);
    }
    pod
}

/// The training-operator's init container: waits until the master's name resolves.
fn init_container(job: &str, options: &RenderOptions) -> Container {
    let master = pod_name(job, MASTER, 0);
    let script = format!(
        "err=1;for i in $(seq {});do if nslookup {master};then err=0&&break;fi;echo waiting for master;sleep 2;done;exit $err",
        options.init_max_tries
    );
    let amounts = |cpu: &str, memory: &str| {
        BTreeMap::from([
            ("cpu".to_owned(), Quantity(cpu.into())),
            ("memory".to_owned(), Quantity(memory.into())),
        ])
    };
    Container {
        name: "init-pytorch".into(),
        image: Some(options.init_image.clone()),
        image_pull_policy: Some("IfNotPresent".into()),
        command: Some(vec!["sh".into(), "-c".into(), script]),
        resources: Some(ResourceRequirements {
            limits: Some(amounts("100m", "20Mi")),
            requests: Some(amounts("50m", "10Mi")),
            ..ResourceRequirements::default()
        }),
        ..Container::default()
    }
}

/// The headless service of replica `index` of `rtype`: the pod's name in DNS.
pub fn service(job: &PyTorchJob, rtype: &str, index: i32) -> Service {
    let name = job.job_name();
    let ports = job
        .replica(rtype)
        .and_then(|r| r.template.spec.as_ref())
        .and_then(|pod| main_container(&pod.containers))
        .and_then(|c| c.ports.clone())
        .unwrap_or_default()
        .into_iter()
        .map(|p| ServicePort {
            name: p.name,
            port: p.container_port,
            ..ServicePort::default()
        })
        .collect();
    Service {
        metadata: ObjectMeta {
            name: Some(pod_name(name, rtype, index)),
            namespace: job.metadata.namespace.clone(),
            labels: Some(selector(name, rtype, index)),
            owner_references: Some(vec![owner_reference(job)]),
            ..ObjectMeta::default()
        },
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".into()),
            selector: Some(selector(name, rtype, index)),
            ports: Some(ports),
            ..ServiceSpec::default()
        }),
        status: None,
    }
}
