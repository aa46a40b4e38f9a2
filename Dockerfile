# Minimal image; the multi-stage GPU/CPU build comes with the deployment work.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY service ./service
COPY trainer ./trainer
RUN pip install --no-cache-dir .
ENTRYPOINT ["t2i"]
CMD ["--help"]
