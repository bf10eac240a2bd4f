# stas_pipeline on NVIDIA's PyTorch container: the container's torch, torchvision and CUDA stay as they are.
#   docker build -t stas_pipeline .
#   docker run --gpus all --ipc=host -v /path/to/data:/data stas_pipeline stas --help
# Another NGC release: docker build --build-arg NGC_TAG=26.10 -t stas_pipeline .
ARG NGC_TAG=25.10
FROM nvcr.io/nvidia/pytorch:${NGC_TAG}-py3

ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /workspace/stas_pipeline

COPY setup.cfg pyproject.toml README.md ./
COPY docker/install.sh docker/install.sh
COPY stas_pipeline stas_pipeline
COPY data_prep data_prep
RUN bash docker/install.sh

COPY benchmarks benchmarks
# bundles/ is a link to the package's own bundles (the card's commands run from here)
RUN ln -s stas_pipeline/bundles bundles

CMD ["stas", "--help"]
