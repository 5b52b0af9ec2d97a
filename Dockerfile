# One image for every inferq role (api, worker, flower); the command picks the role.
FROM python:3.11-slim
RUN apt-get update && apt-get install -y --no-install-recommends build-essential cmake git \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /app
# Same llama.cpp build flags as the Makefile: no AMX / AVX-512 (see README).
ENV CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON -DGGML_AVX512=OFF"
RUN pip install --no-cache-dir llama-cpp-python==0.3.36
COPY pyproject.toml README.md ./
COPY api api
COPY queueing queueing
COPY workers workers
COPY engines engines
COPY ops ops
# EXTRAS: the pyproject extras; PACKAGES: more packages. docker-compose.yml's worker-cuda builds with
# EXTRAS=llamacpp,vllm-cuda (vLLM's wheel brings its CUDA torch) and PACKAGES="gguf accelerate", which
# `inferq models prepare` needs to derive vLLM's model folder from the packaged GGUF.
ARG EXTRAS=llamacpp
ARG PACKAGES=
RUN pip install --no-cache-dir ".[${EXTRAS}]" ${PACKAGES}
ENV INFERQ_HOST=0.0.0.0
EXPOSE 8000 5555
CMD ["inferq", "api"]
