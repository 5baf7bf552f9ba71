# ultrapixel serve, built from this repository (docs/DEPLOY.md).
#
#   docker build -t ultrapixel .
#   docker run --gpus all -p 7860:7860 -v hf:/hf ultrapixel
#
# Stage 1 compiles the kernels with the pinned nvcc (tools/install-cuda-toolchain.sh fetches
# it from PyPI) and the binary; stage 2 is NVIDIA's CUDA runtime image (cuBLASLt, NVRTC; the
# driver comes from the host through the NVIDIA container toolkit) with the binary alone.

FROM rust:1-bookworm AS build
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv g++ \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN NVCC="$(tools/install-cuda-toolchain.sh)" UPX_REQUIRE_NVCC=1 UPX_STRICT_PTXAS=1 \
        cargo build --release --locked --bin ultrapixel \
    && cp target/release/ultrapixel /usr/local/bin/ultrapixel

FROM nvidia/cuda:13.0.0-runtime-ubuntu24.04
COPY --from=build /usr/local/bin/ultrapixel /usr/local/bin/ultrapixel
RUN useradd --create-home --uid 10001 ultrapixel \
    && mkdir -p /hf /cache \
    && chown ultrapixel /hf /cache
USER ultrapixel
# The model files (a volume filled by `ultrapixel download`, or read-only) and the one-time
# conversion of ultrapixel_t2i (writable; an emptyDir is enough).
ENV HF_HOME=/hf UPX_CACHE=/cache
EXPOSE 7860
ENTRYPOINT ["ultrapixel"]
# GPU 0; add `--devices 0,1,...` for every GPU of the host, and `--token-file` (a mounted
# secret) beyond a private network.
CMD ["serve", "--listen", "0.0.0.0:7860"]
