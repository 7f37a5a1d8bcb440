# syntax=docker/dockerfile:1
#
# shoal's container image: one static binary on a distroless base, run as a
# non-root user, with shoal as PID 1 (it reaps every zombie in the container
# and turns SIGTERM into a graceful stop of its workers).
#
#   docker build --build-arg VERSION=v1.2.3 -t shoal .
#   docker run --rm -p 8000:8000 -p 9441:9441 --cpus 2 \
#       --sysctl net.ipv4.tcp_migrate_req=1 shoal
#
# The built-in hello-world worker listens on 8000, /metrics, /healthz and
# /readyz on 9441. To run your own server under shoal, copy /shoal out of
# this image into yours: see deploy/docker/Dockerfile.node-example.
# test/container_test.go checks this file against the binary.

ARG GO_VERSION=1.26

# The build runs on the build machine's platform and cross-compiles, so a
# multi-platform build (docker buildx build --platform linux/amd64,linux/arm64)
# needs no emulation.
FROM --platform=$BUILDPLATFORM golang:${GO_VERSION} AS build
ARG TARGETOS
ARG TARGETARCH
ARG VERSION=dev
WORKDIR /src
COPY go.mod go.sum ./
RUN --mount=type=cache,target=/go/pkg/mod go mod download
COPY . .
# Static (no libc: the final image has none), reproducible paths, no symbol
# table, and the version that 'shoal version' prints.
RUN --mount=type=cache,target=/go/pkg/mod --mount=type=cache,target=/root/.cache/go-build \
    CGO_ENABLED=0 GOOS=${TARGETOS} GOARCH=${TARGETARCH} \
    go build -trimpath -ldflags "-s -w -X main.version=${VERSION}" -o /out/shoal .

# distroless/static: CA certificates, tzdata, /etc/passwd with nonroot
# (65532), and nothing else: no shell, no libc, no package manager.
FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /out/shoal /shoal
# Numeric, so that Kubernetes' runAsNonRoot can verify it without a lookup.
USER 65532:65532
# 8000: the workers' port (--port, $PORT); 9441: /metrics, /healthz, /readyz
# (--metrics-addr).
EXPOSE 8000 9441
# shoal stops gracefully on SIGTERM: SIGTERM to every worker, then SIGKILL
# after --stop-timeout (10s). Give 'docker stop' more: docker stop -t 15.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/shoal"]
