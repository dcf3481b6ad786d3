"""ferrun as Kubeflow Pipelines (KFP v2, kfp 2.17.3) steps.

Three pipelines, all on the image the repository's Dockerfile builds (``ferrun`` on PATH, also
as ``torchrun``; ``ferrun-train``; scikit-learn's digits):

- ``digits_pipeline``: a container component whose command is ``ferrun`` running the trainer on
  one node in ``nproc_per_node`` processes; its hyper-parameters are pipeline inputs, its
  metrics (JSON) and model (the consolidated checkpoint directory) output artifacts.
- ``digits_local_pipeline``: the same training as a lightweight component that calls
  ``ferrun``, because KFP's local SubprocessRunner runs only lightweight Python components (it
  refuses container components). ``run_local.py`` runs it on this machine with ``kfp.local``;
  its metrics artifact ends with the held-out accuracy.
- ``pytorchjob_pipeline(job)``: a step that submits a PyTorchJob whose replicas run ``ferrun``,
  waits for Succeeded or Failed and deletes it (what Kubeflow's pytorch-launcher component
  did, through the training SDK's ``TrainingClient``). The job is built by the plain function
  ``pytorchjob_manifest`` at compile time, so tests check it without a cluster.

Compile for a cluster: ``python examples/kfp/compile.py OUT_DIR`` (one IR YAML per pipeline).
"""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Metrics, Model, Output

#: The image every example names (the repository's Dockerfile).
IMAGE = "ghcr.io/ferrun/ferrun:0.1"
#: What ferrun-train shards (its --stage).
STAGES = ("ddp", "zero1", "zero2", "zero3")


@dsl.container_component
def ferrun_train(
    metrics: Output[Metrics],
    model: Output[Model],
    nproc_per_node: int = 4,
    epochs: int = 30,
    batch_size: int = 32,
    lr: float = 0.003,
    stage: str = "ddp",
):
    """Data-parallel training of the digits MLP under ferrun, on one multi-process node."""
    return dsl.ContainerSpec(
        image=IMAGE,
        command=["ferrun"],
        args=[
            "--standalone",
            "--nproc-per-node", nproc_per_node,
            "--no-python", "ferrun-train",
            "--epochs", epochs,
            "--batch-size", batch_size,
            "--lr", lr,
            "--stage", stage,
            "--metrics-file", metrics.path,
            "--checkpoint-dir", model.path,
        ],
    )


@dsl.pipeline(name="ferrun-digits", description="ferrun-train on the digits, one multi-process node")
def digits_pipeline(
    nproc_per_node: int = 4,
    epochs: int = 30,
    batch_size: int = 32,
    lr: float = 0.003,
    stage: str = "ddp",
) -> NamedTuple("Outputs", metrics=Metrics, model=Model):
    task = ferrun_train(
        nproc_per_node=nproc_per_node, epochs=epochs, batch_size=batch_size, lr=lr, stage=stage
    )
    outputs = NamedTuple("Outputs", metrics=Metrics, model=Model)
    return outputs(metrics=task.outputs["metrics"], model=task.outputs["model"])


# Lightweight components carry their own source: everything they use is inside them, and no
# kfp install is needed where ferrun's image (or this venv) already has it.
@dsl.component(base_image=IMAGE, install_kfp_package=False)
def ferrun_train_local(
    metrics: Output[Metrics],
    model: Output[Model],
    nproc_per_node: int = 4,
    epochs: int = 30,
    batch_size: int = 32,
    lr: float = 0.003,
    stage: str = "ddp",
):
    """The same training, calling ferrun from Python (runs under kfp.local's SubprocessRunner)."""
    import json
    import os
    import subprocess
    import tempfile

    stages = ("ddp", "zero1", "zero2", "zero3")
    if stage not in stages:
        raise ValueError(f"stage {stage!r}: use one of {', '.join(stages)}")
    for name, value in (("nproc_per_node", nproc_per_node), ("epochs", epochs), ("batch_size", batch_size)):
        if value < 1:
            raise ValueError(f"{name} is {value}: give at least 1")
    if not lr > 0:
        raise ValueError(f"lr is {lr}: give a positive learning rate")
    with tempfile.TemporaryDirectory() as scratch:
        found = os.path.join(scratch, "metrics.json")
        command = [
            "ferrun", "--standalone", "--nproc-per-node", str(nproc_per_node),
            "--no-python", "ferrun-train",
            "--epochs", str(epochs), "--batch-size", str(batch_size), "--lr", str(lr),
            "--stage", stage, "--metrics-file", found, "--checkpoint-dir", model.path,
        ]
        print("running:", " ".join(command), flush=True)
        done = subprocess.run(command)
        if done.returncode != 0:
            raise RuntimeError(f"ferrun exited with code {done.returncode} (its output is above)")
        with open(found) as f:
            result = json.load(f)
    for key in ("accuracy", "loss", "steps", "samples_per_s", "world_size"):
        metrics.log_metric(key, result[key])
    model.metadata["framework"] = "ferrun-train"
    model.metadata["stage"] = stage


@dsl.pipeline(name="ferrun-digits-local", description="ferrun-train on the digits, runnable with kfp.local")
def digits_local_pipeline(
    nproc_per_node: int = 4,
    epochs: int = 30,
    batch_size: int = 32,
    lr: float = 0.003,
    stage: str = "ddp",
) -> Metrics:
    task = ferrun_train_local(
        nproc_per_node=nproc_per_node, epochs=epochs, batch_size=batch_size, lr=lr, stage=stage
    )
    return task.outputs["metrics"]


def pytorchjob_manifest(
    name: str = "ferrun-digits",
    workers: int = 1,
    nproc_per_node: int = 2,
    epochs: int = 30,
    stage: str = "ddp",
    image: str = IMAGE,
    port: int = 23456,
) -> dict:
    """The PyTorchJob the launcher step submits: a Master and ``workers`` Workers, each
    container running ``ferrun`` with the trainer (the operator's PET_* environment gives the
    nodes, ranks and master)."""
    if stage not in STAGES:
        raise ValueError(f"stage {stage!r}: use one of {', '.join(STAGES)}")
    if workers < 0 or nproc_per_node < 1 or epochs < 1:
        raise ValueError("workers must be at least 0, nproc_per_node and epochs at least 1")
    container = {
        "name": "pytorch",
        "image": image,
        "command": ["ferrun", "--no-python", "ferrun-train"],
        "args": ["--epochs", str(epochs), "--stage", stage],
        "ports": [{"name": "pytorchjob-port", "containerPort": port}],
    }

    def replica(count: int) -> dict:
        return {
            "replicas": count,
            "restartPolicy": "OnFailure",
            "template": {"spec": {"containers": [container]}},
        }

    specs = {"Master": replica(1)}
    if workers:
        specs["Worker"] = replica(workers)
    return {
        "apiVersion": "kubeflow.org/v1",
        "kind": "PyTorchJob",
        "metadata": {"name": name},
        "spec": {
            "nprocPerNode": str(nproc_per_node),
            "runPolicy": {"cleanPodPolicy": "Running"},
            "pytorchReplicaSpecs": specs,
        },
    }


@dsl.component(base_image="python:3.11-slim", packages_to_install=["kubeflow-training==1.9.4"])
def launch_pytorchjob(job: dict, namespace: str, wait_timeout_s: int, delete_after: bool) -> str:
    """Creates the PyTorchJob, waits until it Succeeded or Failed, deletes it; fails the step
    when the job failed. Returns the job's last condition."""
    from kubeflow.training import TrainingClient
    from kubeflow.training.utils import utils

    client = TrainingClient(namespace=namespace, job_kind="PyTorchJob")
    job = dict(job, metadata=dict(job["metadata"], namespace=namespace))
    name = job["metadata"]["name"]
    model = client.api_client.deserialize(utils.FakeResponse(job), "KubeflowOrgV1PyTorchJob")
    client.create_job(job=model, namespace=namespace)
    print(f"created PyTorchJob {namespace}/{name}", flush=True)
    try:
        done = client.wait_for_job_conditions(
            name,
            namespace=namespace,
            job_kind="PyTorchJob",
            expected_conditions={"Succeeded", "Failed"},
            wait_timeout=wait_timeout_s,
            polling_interval=5,
        )
        last = done.status.conditions[-1]
        if client.is_job_failed(job=done, job_kind="PyTorchJob"):
            raise RuntimeError(f"PyTorchJob {namespace}/{name} failed: {last.reason}: {last.message}")
        return f"{last.type}: {last.message}"
    finally:
        if delete_after:
            client.delete_job(name, namespace=namespace, job_kind="PyTorchJob")


def pytorchjob_pipeline(job: dict):
    """A pipeline whose one step runs ``job`` (from ``pytorchjob_manifest``) as a PyTorchJob."""

    @dsl.pipeline(name="ferrun-pytorchjob", description="a ferrun PyTorchJob launched from a pipeline step")
    def pipeline(namespace: str = "kubeflow", wait_timeout_s: int = 3600, delete_after: bool = True) -> str:
        return launch_pytorchjob(
            job=job, namespace=namespace, wait_timeout_s=wait_timeout_s, delete_after=delete_after
        ).output

    return pipeline
