# The image users put in their PyTorchJobs: ferrun (the torchrun drop-in) on top of PyTorch,
# plus ferrun-operator for the controller's Deployment. Written, not built here (no Docker
# engine on the development machines).
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p ferrun-launcher -p ferrun-operator

FROM python:3.11-slim-bookworm
RUN pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
COPY --from=build /src/target/release/ferrun /src/target/release/ferrun-operator /usr/local/bin/
USER 65532
ENTRYPOINT ["ferrun"]
