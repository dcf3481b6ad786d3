# The one image every example names (ghcr.io/ferrun/ferrun): PyTorchJob containers, TrainJob
# nodes and Kubeflow Pipelines steps. It holds
# - `ferrun`, also on PATH as `torchrun` (existing YAML that calls `torchrun …` runs ferrun
#   unchanged; `python -m torch.distributed.launch …` users write `ferrun launch …`);
# - `ferrun-train`, the digits trainer, and scikit-learn, whose wheel carries the digits;
# - torch 2.13.0 (CPU) for Python workers and as the trainer's libtorch, and the kfp SDK, so
#   that KFP lightweight components run in it without installing anything;
# - `ferrun-operator`, for the controller's Deployment.
# Written, not built here (no Docker engine on the development machines).

# Both stages keep torch in the same virtualenv path: ferrun-train finds libtorch through the
# rpath the build gives it (trainer/build.rs).
ARG VENV=/opt/ferrun/venv

FROM rust:1.95-bookworm AS build
ARG VENV
RUN apt-get update && apt-get install -y --no-install-recommends python3-venv \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv "$VENV" \
    && "$VENV/bin/pip" install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
WORKDIR /src
COPY . .
RUN LIBTORCH="$VENV/lib/python3.11/site-packages/torch" \
    cargo build --release --locked -p ferrun-launcher -p ferrun-operator -p ferrun-trainer

FROM debian:bookworm-slim
ARG VENV
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv "$VENV" \
    && "$VENV/bin/pip" install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu \
    && "$VENV/bin/pip" install --no-cache-dir scikit-learn==1.9.1 kfp==2.17.3
COPY --from=build /src/target/release/ferrun /src/target/release/ferrun-train \
    /src/target/release/ferrun-operator /usr/local/bin/
RUN ln -s ferrun /usr/local/bin/torchrun
# The venv first: `python`, `python3` and the trainer's data lookup find torch and the digits.
ENV PATH="$VENV/bin:$PATH" VIRTUAL_ENV="$VENV" PYTHONUNBUFFERED=1
USER 65532
ENTRYPOINT ["ferrun"]
