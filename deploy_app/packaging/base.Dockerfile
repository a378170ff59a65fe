# Copyright (c) LCA-DB MONAI plugin contributors
# Licensed under the Apache License, Version 2.0 (the "License"); see the repository's LICENSE.
#
# Base image of the LCA-DB MAP built where no container registry but a local one is reachable
# (`python -m deploy_app.map build`): Debian made by debootstrap and `docker import` (ROOTFS), with the build host's
# local certificate authorities (pip inside the MAP build reaches PyPI through them where the host does), python3,
# pip and jq, and, for the CPU variant, the CPU build of PyTorch from the wheel(s) in wheels/ (empty for CUDA: pip
# installs PyTorch from PyPI with its CUDA libraries when the MAP is built).
ARG ROOTFS
FROM ${ROOTFS}
ENV DEBIAN_FRONTEND=noninteractive
COPY ca-certificates/ /usr/local/share/ca-certificates/
RUN apt-get update \
    && apt-get install -y --no-install-recommends --no-install-suggests ca-certificates jq python3 python3-pip \
    && update-ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && rm -f /usr/lib/python3*/EXTERNALLY-MANAGED
RUN --mount=type=bind,source=wheels,target=/tmp/wheels \
    if ls /tmp/wheels/*.whl >/dev/null 2>&1; then \
        python3 -m pip install --no-cache-dir --cert /etc/ssl/certs/ca-certificates.crt /tmp/wheels/*.whl; \
    fi
