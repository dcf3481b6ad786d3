//! Golden rendering: the pods, services and environment of several jobs, field by field, as
//! the training-operator 1.9 renders them (shared/reference/pytorchjob-contract.md §2), and
//! the validation that catches what its webhook lets through.

use ferrun_operator::crd::PyTorchJob;
use ferrun_operator::render::{self, MasterWait, RenderOptions};
use ferrun_operator::{defaults, load_job, names};
use k8s_openapi::api::core::v1::Pod;
use kube::CustomResourceExt;

fn job(yaml: &str) -> PyTorchJob {
    load_job(yaml).unwrap_or_else(|e| panic!("{e}"))
}

fn env_of(pod: &Pod) -> Vec<(String, String)> {
    let spec = pod.spec.as_ref().expect("pod spec");
    let container = defaults::main_container(&spec.containers).expect("container");
    container
        .env
        .clone()
        .unwrap_or_default()
        .into_iter()
        .map(|v| (v.name, v.value.unwrap_or_default()))
        .collect()
}

fn pairs(items: &[(&str, &str)]) -> Vec<(String, String)> {
    items
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

const MASTER_WORKER: &str = r#"
apiVersion: kubeflow.org/v1
kind: PyTorchJob
metadata: {name: mnist, namespace: team, uid: 1234-abcd}
spec:
  pytorchReplicaSpecs:
    Master:
      replicas: 1
      restartPolicy: ExitCode
      template:
        metadata: {labels: {app: mnist}, annotations: {note: kept}}
        spec:
          containers:
            - name: pytorch
              image: pytorch/pytorch:2.13
              command: [torchrun, train.py]
              env: [{name: USER_VAR, value: "1"}]
    worker:
      replicas: 2
      template:
        spec:
          containers:
            - name: pytorch
              image: pytorch/pytorch:2.13
              command: [torchrun, train.py]
"#;

#[test]
fn master_and_workers_render_as_the_training_operator_does() {
    let job = job(MASTER_WORKER);
    let options = RenderOptions::default();
    assert_eq!(
        names::replicas(&job),
        vec![
            ("Master".to_owned(), 0),
            ("Worker".to_owned(), 0),
            ("Worker".to_owned(), 1)
        ],
        "lower-case replica types are normalised"
    );
    let master = render::pod(&job, "Master", 0, &options);
    let meta = &master.metadata;
    assert_eq!(meta.name.as_deref(), Some("mnist-master-0"));
    assert_eq!(meta.namespace.as_deref(), Some("team"));
    let labels = meta.labels.clone().expect("labels");
    for (k, v) in [
        ("app", "mnist"),
        (
            "training.kubeflow.org/operator-name",
            "pytorchjob-controller",
        ),
        ("training.kubeflow.org/job-name", "mnist"),
        ("training.kubeflow.org/replica-type", "master"),
        ("training.kubeflow.org/replica-index", "0"),
        ("training.kubeflow.org/job-role", "master"),
    ] {
        assert_eq!(labels.get(k).map(String::as_str), Some(v), "label {k}");
    }
    assert_eq!(
        meta.annotations
            .as_ref()
            .and_then(|a| a.get("note"))
            .map(String::as_str),
        Some("kept")
    );
    let owner = &meta.owner_references.as_ref().expect("owner")[0];
    assert_eq!(
        (
            owner.api_version.as_str(),
            owner.kind.as_str(),
            owner.name.as_str(),
            owner.uid.as_str()
        ),
        ("kubeflow.org/v1", "PyTorchJob", "mnist", "1234-abcd")
    );
    assert_eq!(
        (owner.controller, owner.block_owner_deletion),
        (Some(true), Some(true))
    );
    let spec = master.spec.as_ref().expect("spec");
    assert_eq!(
        spec.restart_policy.as_deref(),
        Some("Never"),
        "ExitCode → Never"
    );
    let ports = spec.containers[0].ports.clone().expect("ports");
    assert_eq!(ports[0].name.as_deref(), Some("pytorchjob-port"));
    assert_eq!(ports[0].container_port, 23456);
    assert!(
        spec.init_containers.is_none(),
        "the master waits for nobody"
    );
    // The user's variables first, then the operator's in its order.
    assert_eq!(
        env_of(&master),
        pairs(&[
            ("USER_VAR", "1"),
            ("PYTHONUNBUFFERED", "1"),
            ("MASTER_PORT", "23456"),
            ("PET_MASTER_PORT", "23456"),
            ("MASTER_ADDR", "mnist-master-0"),
            ("PET_MASTER_ADDR", "mnist-master-0"),
            ("WORLD_SIZE", "3"),
            ("RANK", "0"),
            ("PET_NODE_RANK", "0"),
            ("PET_NPROC_PER_NODE", "auto"),
            ("PET_NNODES", "3"),
        ])
    );
    let worker = render::pod(&job, "Worker", 1, &options);
    assert_eq!(worker.metadata.name.as_deref(), Some("mnist-worker-1"));
    let labels = worker.metadata.labels.clone().expect("labels");
    assert!(!labels.contains_key("training.kubeflow.org/job-role"));
    let spec = worker.spec.as_ref().expect("spec");
    assert_eq!(
        spec.restart_policy.as_deref(),
        Some("OnFailure"),
        "the default"
    );
    let env = env_of(&worker);
    assert!(
        env.contains(&("RANK".into(), "2".into())),
        "worker i is node rank i+1"
    );
    assert!(env.contains(&("PET_NODE_RANK".into(), "2".into())));
    // torchrun containers keep the training-operator's nslookup init container.
    let init = &spec.init_containers.as_ref().expect("init container")[0];
    assert_eq!(init.name, "init-pytorch");
    assert_eq!(init.image.as_deref(), Some("alpine:3.10"));
    let script = &init.command.as_ref().expect("command")[2];
    assert!(
        script.contains("seq 100") && script.contains("nslookup mnist-master-0"),
        "{script}"
    );

    let service = render::service(&job, "Worker", 1);
    assert_eq!(service.metadata.name.as_deref(), Some("mnist-worker-1"));
    let sspec = service.spec.expect("service spec");
    assert_eq!(sspec.cluster_ip.as_deref(), Some("None"), "headless");
    let selector = sspec.selector.expect("selector");
    assert_eq!(selector.len(), 4, "no job-role in the selector");
    assert_eq!(selector["training.kubeflow.org/replica-index"], "1");
    let port = &sspec.ports.expect("ports")[0];
    assert_eq!(
        (port.name.as_deref(), port.port),
        (Some("pytorchjob-port"), 23456)
    );
}

#[test]
fn ferrun_containers_need_no_nslookup_init_container() {
    let yaml = MASTER_WORKER.replace(
        "command: [torchrun, train.py]",
        "command: [/usr/local/bin/ferrun, train.py]",
    );
    let job = job(&yaml);
    let auto = render::pod(&job, "Worker", 0, &RenderOptions::default());
    assert!(auto.spec.expect("spec").init_containers.is_none());
    let compat = RenderOptions {
        master_wait: MasterWait::Nslookup,
        ..RenderOptions::default()
    };
    let kept = render::pod(&job, "Worker", 0, &compat);
    assert!(kept.spec.expect("spec").init_containers.is_some());
}

#[test]
fn worker_only_jobs_get_no_master_variables_and_worker_0_holds_the_role() {
    let job = job(r#"
apiVersion: kubeflow.org/v1
kind: PyTorchJob
metadata: {name: solo}
spec:
  nprocPerNode: "4"
  pytorchReplicaSpecs:
    Worker:
      replicas: 2
      template:
        spec:
          containers: [{name: pytorch, image: img, command: [ferrun, t.py]}]
"#);
    let pod = render::pod(&job, "Worker", 0, &RenderOptions::default());
    assert_eq!(
        env_of(&pod),
        pairs(&[
            ("PYTHONUNBUFFERED", "1"),
            ("PET_NPROC_PER_NODE", "4"),
            ("PET_NNODES", "2"),
        ])
    );
    let labels = pod.metadata.labels.expect("labels");
    assert_eq!(labels["training.kubeflow.org/job-role"], "master");
}

#[test]
fn elastic_jobs_get_the_rendezvous_variables() {
    let job = job(r#"
apiVersion: kubeflow.org/v1
kind: PyTorchJob
metadata: {name: elastic}
spec:
  elasticPolicy:
    minReplicas: 2
    maxReplicas: 4
    maxRestarts: 3
    rdzvId: run-7
    rdzvConf: [{key: join_timeout, value: "60"}, {key: last_call_timeout, value: "5"}]
    standalone: true
  pytorchReplicaSpecs:
    Worker:
      replicas: 3
      template:
        spec:
          containers:
            - name: pytorch
              image: img
              ports: [{name: pytorchjob-port, containerPort: 29400}]
"#);
    let env = env_of(&render::pod(&job, "Worker", 2, &RenderOptions::default()));
    assert_eq!(
        env,
        pairs(&[
            ("PYTHONUNBUFFERED", "1"),
            ("PET_NPROC_PER_NODE", "auto"),
            ("PET_RDZV_ENDPOINT", "elastic-worker-0:29400"),
            ("PET_RDZV_BACKEND", "c10d"),
            ("PET_NNODES", "2:4"),
            ("PET_MAX_RESTARTS", "3"),
            ("PET_RDZV_ID", "run-7"),
            ("PET_RDZV_CONF", "join_timeout=60,last_call_timeout=5"),
            // The training-operator writes "", which torchrun cannot parse.
            ("PET_STANDALONE", "1"),
        ])
    );
    // Only one bound given: the other copies it; none: both are the workers' count.
    let one = job_with_elastic("minReplicas: 2");
    assert!(
        env_of(&render::pod(&one, "Worker", 0, &RenderOptions::default()))
            .contains(&("PET_NNODES".into(), "2:2".into()))
    );
    let none = job_with_elastic("rdzvHost: etcd.svc\n    rdzvPort: 2379\n    rdzvBackend: etcd");
    let env = env_of(&render::pod(&none, "Worker", 0, &RenderOptions::default()));
    assert!(env.contains(&("PET_NNODES".into(), "3:3".into())));
    assert!(env.contains(&("PET_RDZV_ENDPOINT".into(), "etcd.svc:2379".into())));
    assert!(env.contains(&("PET_RDZV_BACKEND".into(), "etcd".into())));
}

#[test]
fn an_elastic_job_naming_a_token_secret_gets_the_token_from_it() {
    let mut job = job_with_elastic("minReplicas: 2");
    job.metadata.annotations = Some(
        [(
            render::TOKEN_SECRET_ANNOTATION.to_owned(),
            "rdzv-token".to_owned(),
        )]
        .into(),
    );
    let pod = render::pod(&job, "Worker", 1, &RenderOptions::default());
    let spec = pod.spec.expect("spec");
    let env = defaults::main_container(&spec.containers)
        .and_then(|c| c.env.clone())
        .expect("env");
    let token = env
        .iter()
        .find(|v| v.name == "FERRUN_RDZV_TOKEN")
        .expect("the token variable");
    assert_eq!(token.value, None, "never the token itself in the pod spec");
    let secret = token
        .value_from
        .as_ref()
        .and_then(|f| f.secret_key_ref.as_ref())
        .expect("from a Secret");
    assert_eq!(
        (secret.name.as_str(), secret.key.as_str()),
        ("rdzv-token", "token")
    );
    assert!(ferrun_operator::validate::validate(&job).is_ok());
    // A name no Secret can have, or a static job: named problems.
    job.metadata.annotations = Some(
        [(
            render::TOKEN_SECRET_ANNOTATION.to_owned(),
            "Bad_Name".to_owned(),
        )]
        .into(),
    );
    let err = ferrun_operator::validate::validate(&job)
        .expect_err("bad name")
        .to_string();
    assert!(err.contains("name a Secret"), "{err}");
    job.spec.elastic_policy = None;
    job.metadata.annotations =
        Some([(render::TOKEN_SECRET_ANNOTATION.to_owned(), "ok".to_owned())].into());
    let err = ferrun_operator::validate::validate(&job)
        .expect_err("static")
        .to_string();
    assert!(err.contains("no elasticPolicy"), "{err}");
}

fn job_with_elastic(policy: &str) -> PyTorchJob {
    job(&format!(
        "
apiVersion: kubeflow.org/v1
kind: PyTorchJob
metadata: {{name: e}}
spec:
  elasticPolicy:
    {policy}
  pytorchReplicaSpecs:
    Worker:
      replicas: 3
      template:
        spec:
          containers: [{{name: pytorch, image: img}}]
"
    ))
}

#[test]
fn world_size_counts_processes_only_for_a_number_of_them() {
    for (nproc, world) in [("2", "6"), ("auto", "3"), ("cpu", "3"), ("gpu", "3")] {
        let yaml = MASTER_WORKER.replace(
            "spec:\n  pytorchReplicaSpecs:",
            &format!("spec:\n  nprocPerNode: \"{nproc}\"\n  pytorchReplicaSpecs:"),
        );
        let env = env_of(&render::pod(
            &job(&yaml),
            "Worker",
            0,
            &RenderOptions::default(),
        ));
        assert!(
            env.contains(&("WORLD_SIZE".into(), world.into())),
            "{nproc}: {env:?}"
        );
        assert!(env.contains(&("PET_NPROC_PER_NODE".into(), nproc.into())));
    }
}

#[test]
fn a_user_port_named_pytorchjob_port_is_the_master_port() {
    let yaml = MASTER_WORKER.replacen(
        "              env: [{name: USER_VAR, value: \"1\"}]",
        "              env: [{name: USER_VAR, value: \"1\"}]\n              ports: [{name: pytorchjob-port, containerPort: 29500}, {name: metrics, containerPort: 9090}]",
        1,
    );
    let job = job(&yaml);
    let env = env_of(&render::pod(&job, "Worker", 0, &RenderOptions::default()));
    assert!(env.contains(&("MASTER_PORT".into(), "29500".into())));
    let ports = render::service(&job, "Master", 0)
        .spec
        .expect("spec")
        .ports
        .expect("ports");
    let names: Vec<_> = ports
        .iter()
        .map(|p| (p.name.clone().unwrap_or_default(), p.port))
        .collect();
    assert_eq!(
        names,
        vec![("pytorchjob-port".into(), 29500), ("metrics".into(), 9090)]
    );
}

#[test]
fn invalid_jobs_are_refused_with_every_problem_named() {
    let long = "a".repeat(55);
    let yaml = MASTER_WORKER
        .replace("name: mnist,", &format!("name: {long},"))
        .replacen("- name: pytorch", "- name: trainer", 1)
        .replace("replicas: 2", "replicas: 12");
    let err = load_job(&yaml).expect_err("invalid").to_string();
    assert!(
        err.contains(&format!(
            "{long}-worker-11\" would have 65 characters (at most 63)"
        )),
        "{err}"
    );
    assert!(err.contains("no container is named \"pytorch\""), "{err}");
    // A policy is a word of the API: an unknown one is refused where it is read, with its
    // place and the words there are.
    let sometimes = MASTER_WORKER.replace("restartPolicy: ExitCode", "restartPolicy: Sometimes");
    let err = load_job(&sometimes).expect_err("policy").to_string();
    assert!(
        err.contains("restartPolicy: unknown variant `Sometimes`")
            && err.contains("`OnFailure`")
            && err.contains("line "),
        "{err}"
    );
    let two_masters = MASTER_WORKER.replacen("replicas: 1", "replicas: 2", 1);
    assert!(load_job(&two_masters)
        .expect_err("two masters")
        .to_string()
        .contains("exactly one Master"));
    let unknown = MASTER_WORKER.replace("worker:", "Chief:");
    assert!(load_job(&unknown)
        .expect_err("Chief")
        .to_string()
        .contains("unknown replica type \"Chief\""));
    assert!(load_job("kind: [")
        .expect_err("yaml")
        .to_string()
        .contains("not a PyTorchJob"));
}

#[test]
fn the_crd_has_the_scale_subresource_and_the_state_column() {
    let crd = serde_json::to_value(PyTorchJob::crd()).expect("json");
    assert_eq!(crd["spec"]["group"], "kubeflow.org");
    assert_eq!(crd["spec"]["names"]["plural"], "pytorchjobs");
    let version = &crd["spec"]["versions"][0];
    assert_eq!(version["name"], "v1");
    let scale = &version["subresources"]["scale"];
    assert_eq!(
        scale["specReplicasPath"],
        ".spec.pytorchReplicaSpecs.Worker.replicas"
    );
    assert_eq!(
        scale["statusReplicasPath"],
        ".status.replicaStatuses.Worker.active"
    );
    assert_eq!(
        scale["labelSelectorPath"],
        ".status.replicaStatuses.Worker.selector"
    );
    assert!(version["subresources"]["status"].is_object());
    let columns = version["additionalPrinterColumns"]
        .as_array()
        .expect("columns");
    assert_eq!(columns[0]["name"], "State");
    assert_eq!(columns[0]["jsonPath"], ".status.conditions[-1:].type");
}

#[test]
fn the_shipped_crd_is_the_generated_one() {
    let shipped =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/crd.yaml"))
            .expect("deploy/crd.yaml");
    let generated = serde_yaml::to_string(&PyTorchJob::crd()).expect("yaml");
    assert!(
        shipped == generated,
        "deploy/crd.yaml is stale: regenerate it with `cargo run -p ferrun-operator -- crd > deploy/crd.yaml`"
    );
}

#[test]
fn gang_scheduling_marks_pods_and_renders_the_pod_group() {
    use ferrun_operator::scheduling::Gang;
    let yaml = MASTER_WORKER.replace(
        "              command: [torchrun, train.py]\n              env:",
        "              command: [torchrun, train.py]\n              resources: {requests: {cpu: 500m, memory: 1Gi}, limits: {cpu: '1', nvidia.com/gpu: '1'}}\n              env:",
    );
    let job = job(&yaml);
    let volcano = RenderOptions {
        gang: Gang::from_flag("volcano"),
        ..RenderOptions::default()
    };
    let pod = render::pod(&job, "Worker", 1, &volcano);
    assert_eq!(
        pod.spec.as_ref().and_then(|s| s.scheduler_name.as_deref()),
        Some("volcano")
    );
    let annotations = pod.metadata.annotations.expect("annotations");
    assert_eq!(annotations["scheduling.k8s.io/group-name"], "mnist");
    assert_eq!(annotations["volcano.sh/task-spec"], "worker");
    let group = Gang::Volcano.pod_group(&job);
    assert_eq!(group.metadata.name.as_deref(), Some("mnist"));
    assert_eq!(
        group.types.as_ref().map(|t| t.api_version.as_str()),
        Some("scheduling.volcano.sh/v1beta1")
    );
    let spec = &group.data["spec"];
    assert_eq!(spec["minMember"], 3);
    assert_eq!(spec["queue"], "default");
    // Only the master has resources: requests win over limits, limits fill in the rest.
    assert_eq!(spec["minResources"]["cpu"], "500m");
    assert_eq!(spec["minResources"]["memory"], (1u64 << 30).to_string());
    assert_eq!(spec["minResources"]["nvidia.com/gpu"], "1");

    let plugins = Gang::from_flag("scheduler-plugins-scheduler").expect("gang");
    let options = RenderOptions {
        gang: Some(plugins.clone()),
        ..RenderOptions::default()
    };
    let pod = render::pod(&job, "Master", 0, &options);
    assert_eq!(
        pod.spec.as_ref().and_then(|s| s.scheduler_name.as_deref()),
        Some("scheduler-plugins-scheduler")
    );
    assert_eq!(
        pod.metadata.labels.expect("labels")["scheduling.x-k8s.io/pod-group"],
        "mnist"
    );
    let group = plugins.pod_group(&job);
    assert_eq!(
        group.types.as_ref().map(|t| t.api_version.as_str()),
        Some("scheduling.x-k8s.io/v1alpha1")
    );
    assert_eq!(Gang::from_flag(""), None);
}

#[test]
fn elastic_metrics_give_the_workers_an_autoscaler() {
    let with_metrics = job(r#"
apiVersion: kubeflow.org/v1
kind: PyTorchJob
metadata: {name: elastic, namespace: ns}
spec:
  elasticPolicy:
    minReplicas: 1
    maxReplicas: 5
    metrics:
      - type: Resource
        resource: {name: cpu, target: {type: Utilization, averageUtilization: 80}}
  pytorchReplicaSpecs:
    Worker:
      replicas: 2
      template: {spec: {containers: [{name: pytorch, image: img}]}}
"#);
    let hpa = ferrun_operator::scheduling::autoscaler(&with_metrics).expect("an autoscaler");
    assert_eq!(hpa.metadata.name.as_deref(), Some("elastic"));
    let spec = hpa.spec;
    assert_eq!((spec.min_replicas, spec.max_replicas), (Some(1), 5));
    assert_eq!(spec.scale_target_ref.kind, "PyTorchJob");
    assert_eq!(
        spec.scale_target_ref.api_version.as_deref(),
        Some("kubeflow.org/v1")
    );
    assert_eq!(spec.metrics.expect("metrics").len(), 1);
    assert!(ferrun_operator::scheduling::autoscaler(&job(MASTER_WORKER)).is_none());
}
