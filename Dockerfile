# syntax=docker/dockerfile:1
#
# undomail: build a static binary, run it as an unprivileged user.
#
#   docker build -t undomail .
#   docker build --build-arg WITH_ZFS=1 -t undomail:zfs .   # with the zfs CLI
#
# The binary is static (cgo for go-sqlite3, linked with -static; osusergo
# and netgo keep glibc's NSS out of it), so it also runs copied onto any
# Linux host. The runtime image is not distroless because undomail runs
# other programs: doveadm (dovecot-core) for rewinds, spamc for the
# optional retroactive spam filter and, with WITH_ZFS=1, zfs for the ZFS
# snapshot backend. See docs/operations.md.

FROM golang:1.26-bookworm AS build
WORKDIR /src
# Modules first: the layer is reused until go.mod or go.sum change.
COPY go.mod go.sum ./
RUN go mod download
COPY . .
RUN CGO_ENABLED=1 go build -trimpath \
      -tags 'sqlite_omit_load_extension osusergo netgo' \
      -ldflags '-s -w -linkmode external -extldflags "-static"' \
      -o /out/undomail ./cmd/undomail \
 && /out/undomail --help >/dev/null

FROM debian:bookworm-slim AS runtime
ARG WITH_ZFS=0
# libcap2-bin for setcap below; removed again afterwards.
RUN set -eux; \
    sed -i 's/^Components: main$/Components: main contrib/' /etc/apt/sources.list.d/debian.sources; \
    apt-get update; \
    apt-get install -y --no-install-recommends dovecot-core spamc ca-certificates libcap2-bin; \
    if [ "$WITH_ZFS" = 1 ]; then apt-get install -y --no-install-recommends zfsutils-linux; fi; \
    rm -rf /var/lib/apt/lists/*; \
    groupadd --system --gid 10025 undomail; \
    useradd --system --uid 10025 --gid undomail --home-dir /var/lib/undomail --shell /usr/sbin/nologin undomail; \
    install -d -o undomail -g undomail -m 0750 /var/lib/undomail
COPY --from=build /out/undomail /usr/local/bin/undomail
# CAP_SYS_PTRACE and CAP_DAC_READ_SEARCH let undomail read /proc/PID/fd of
# Dovecot's processes (the compose file shares Dovecot's PID namespace;
# the processes are not dumpable, so the directory is root's) to see that
# none still holds a file in the mail store before a rewind rolls it back.
# The container must be given both (cap_add); without them the kernel
# refuses to start the binary rather than let a rewind run blind.
RUN setcap cap_sys_ptrace,cap_dac_read_search=ep /usr/local/bin/undomail \
 && apt-get purge -y libcap2-bin && apt-get autoremove -y
COPY deploy/undomail/undomail.yaml /etc/undomail/undomail.yaml
COPY deploy/undomail/doveadm.conf /etc/undomail/doveadm.conf
USER undomail:undomail
# The undo log and blobs: mount a volume of its own, never the mail store.
VOLUME ["/var/lib/undomail"]
# SMTP front door, IMAP front end, LMTP capture, admin (high ports: the
# user is not root; the compose file publishes them as 25 and 143).
EXPOSE 2525 1143 10024 8025
ENTRYPOINT ["/usr/local/bin/undomail"]
CMD ["serve", "--config", "/etc/undomail/undomail.yaml"]
