# The ESM-2 pretraining recipe on an NGC PyTorch image. The image already ships CUDA, cuDNN, NCCL, PyTorch and
# TransformerEngine built for one another; only the recipe's remaining requirements are installed on top, under a
# constraint file pinning the image's compiled stack (torch, TransformerEngine, Triton, flash-attn, NVIDIA libraries,
# NumPy), so pip can neither replace nor upgrade them: a requirement that would need another version fails the build.
#
#   docker build -t esm2-te .                                            # from the recipe folder
#   docker run --gpus all --ipc=host --rm esm2-te torchrun --nproc_per_node=8 train_fsdp2.py --config-name L0_sanity
#   enroot import -o esm2-te.sqsh dockerd://esm2-te                      # the image for slurm.sh (CONTAINER_IMAGE)
#
# Pick another NGC release with --build-arg BASE_IMAGE=nvcr.io/nvidia/pytorch:<yy.mm>-py3.
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:25.09-py3
FROM ${BASE_IMAGE}

WORKDIR /workspace/esm2

COPY requirements.txt .
RUN pip list --format=freeze \
        | grep -iE '^(torch|torchvision|torchaudio|triton|pytorch-triton|transformer[-_]engine[a-z0-9_-]*|flash[-_]attn|apex|nvidia-[a-z0-9_-]+|numpy)==' \
        > /tmp/image-constraints.txt \
    && if ! grep -iqE '^transformer[-_]engine' /tmp/image-constraints.txt; then \
        echo "The base image has no TransformerEngine: use an NGC PyTorch image (nvcr.io/nvidia/pytorch)." >&2; \
        exit 1; \
    fi \
    && pip install --no-cache-dir --constraint /tmp/image-constraints.txt --requirement requirements.txt \
    && rm /tmp/image-constraints.txt

COPY . .
