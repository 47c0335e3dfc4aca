# Dockerfile: wormhole-mailbox as a small image: one static binary, run
# as an unprivileged user, its state and usage log on the /data volume.
#
#   docker build -t wormhole-mailbox .
#   docker run -d --name wormhole-mailbox --restart=always \
#       -p 4000:4000 -p 4001:4001 -v wormhole-mailbox:/data wormhole-mailbox
#
# Port 4000 is the mailbox (ws://HOST:4000/v1), 4001 the TCP transit relay
# (hint tcp:HOST:4001). Give `docker stop` time for the relay's shutdown
# grace: docker stop -t 40.
#
# The binary is built by the command the README gives for a binary
# (a test checks that they agree, and that it makes a static binary).

FROM golang:1.26 AS build
WORKDIR /src
COPY go.mod go.sum ./
RUN go mod download
COPY *.go ./
RUN CGO_ENABLED=0 go build -trimpath -ldflags='-s -w' -o wormhole-mailbox .
RUN mkdir /data

FROM scratch
COPY --from=build /src/wormhole-mailbox /usr/local/bin/wormhole-mailbox
# The volume's mount point belongs to the user the server runs as; a new
# named volume takes its owner from it.
COPY --from=build --chown=65532:65532 /data /data
USER 65532:65532
WORKDIR /data
VOLUME /data
EXPOSE 4000 4001
# /healthz on the metrics listener, which CMD keeps inside the container,
# answers 200 while the server can do its job.
HEALTHCHECK --interval=30s --timeout=10s --start-period=10s \
    CMD ["/usr/local/bin/wormhole-mailbox", "healthcheck", "http://127.0.0.1:9400/healthz"]
ENTRYPOINT ["/usr/local/bin/wormhole-mailbox"]
CMD ["--port=tcp:4000", "--channel-db=/data/relay.jsonl", "--usage-db=/data/usage.jsonl", "--blur-usage=3600", "--transit-port=tcp:4001", "--metrics-listen=127.0.0.1:9400"]
