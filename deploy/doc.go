// Package deploy holds the deployment files (systemd unit, the compose
// deployment's Dovecot, Postfix and SpamAssassin images and configs) and
// their tests. The tests validate docker-compose.yml and every Dockerfile
// without a Docker engine: the compose file with compose-go (the loader
// docker compose itself uses), Dockerfiles with BuildKit's parser and
// parse-time lint rules (what docker build runs first), configuration
// files with the programs that read them (doveconf, postconf, undomail's config package).
package deploy
