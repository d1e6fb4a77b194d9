# The webhook image: `docker build -t ghcr.io/nix-flake-webhook/nix-flake-webhook:0.1.0 .`
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY webhook ./webhook
COPY manifests ./manifests
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
# Matches runAsUser in manifests/base/deployment.yaml; no shell login, no home to write.
USER 65532:65532
EXPOSE 8443
ENTRYPOINT ["nix-flake-webhook"]
CMD ["serve", "--cert=/etc/nix-flake-webhook/tls/tls.crt", "--key=/etc/nix-flake-webhook/tls/tls.key"]
