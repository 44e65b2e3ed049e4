package deploy

import (
	"bufio"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"

	"github.com/compose-spec/compose-go/v2/cli"
	"github.com/compose-spec/compose-go/v2/types"
	"github.com/moby/buildkit/frontend/dockerfile/instructions"
	"github.com/moby/buildkit/frontend/dockerfile/linter"
	"github.com/moby/buildkit/frontend/dockerfile/parser"

	"github.com/undomail/undomail/internal/config"
	"github.com/undomail/undomail/verb"
)

// loadCompose loads ../docker-compose.yml as docker compose would, with
// every profile enabled and the secrets it names present (deploy/secrets/init
// writes them on a real host).
func loadCompose(t *testing.T) *types.Project {
	t.Helper()
	opts, err := cli.NewProjectOptions([]string{"../docker-compose.yml"},
		cli.WithWorkingDirectory(".."), cli.WithProfiles([]string{"*"}), cli.WithEnv([]string{}))
	if err != nil {
		t.Fatal(err)
	}
	p, err := opts.LoadProject(context.Background())
	if err != nil {
		t.Fatalf("docker-compose.yml does not load: %v", err)
	}
	return p
}

// TestCompose checks docker-compose.yml against the compose specification
// and against what the deployment promises: only undomail publishes
// ports, its log volume is not the mail store's, the filter profile
// exists, every build context has its Dockerfile, and undomail shares
// Dovecot's socket directory, mail volume paths and PID namespace.
func TestCompose(t *testing.T) {
	p := loadCompose(t)
	for _, want := range []string{"dovecot", "postfix", "undomail", "spamassassin"} {
		if _, err := p.GetService(want); err != nil {
			t.Fatalf("service %s: %v", want, err)
		}
	}
	for _, s := range p.Services {
		if s.Name != "undomail" && len(s.Ports) > 0 {
			t.Errorf("service %s publishes ports %v: only undomail may face the network", s.Name, s.Ports)
		}
		if s.Build == nil {
			t.Errorf("service %s has no build", s.Name)
			continue
		}
		df := filepath.Join(s.Build.Context, s.Build.Dockerfile)
		if _, err := os.Stat(df); err != nil {
			t.Errorf("service %s: Dockerfile: %v", s.Name, err)
		}
	}
	sa, _ := p.GetService("spamassassin")
	if !slices.Contains(sa.Profiles, "filter") {
		t.Errorf("spamassassin is not behind the filter profile: %v", sa.Profiles)
	}

	u, _ := p.GetService("undomail")
	published := map[string]bool{}
	for _, port := range u.Ports {
		published[fmt.Sprintf("%s:%d", port.Published, port.Target)] = port.HostIP == "" || port.HostIP == "0.0.0.0"
		if port.Target == 8025 && port.HostIP != "127.0.0.1" {
			t.Errorf("the admin port is published on %q, want the host's loopback only", port.HostIP)
		}
	}
	if !published["25:2525"] || !published["143:1143"] {
		t.Errorf("undomail publishes %v, want SMTP 25 and IMAP 143", u.Ports)
	}
	if u.Pid != "service:dovecot" || !slices.Contains(u.CapAdd, "SYS_PTRACE") || !slices.Contains(u.CapAdd, "DAC_READ_SEARCH") {
		t.Errorf("undomail needs Dovecot's PID namespace, SYS_PTRACE and DAC_READ_SEARCH to see who holds the mail store (pid %q, cap_add %v)", u.Pid, u.CapAdd)
	}
	if u.User == "root" || u.User == "0" {
		t.Errorf("undomail runs as %s", u.User)
	}
	mounts := func(name string) map[string]string { // target -> source
		s, _ := p.GetService(name)
		m := map[string]string{}
		for _, v := range s.Volumes {
			m[v.Target] = v.Source
		}
		return m
	}
	um, dm := mounts("undomail"), mounts("dovecot")
	if um["/var/lib/undomail"] == "" || um["/var/lib/undomail"] == um["/srv/mail"] {
		t.Errorf("undomail's data dir must be a volume of its own: %v", um)
	}
	if dm["/srv/mail"] == "" || um["/srv/mail"] != dm["/srv/mail"] {
		t.Errorf("undomail and Dovecot must see the mail store at the same path: undomail %v, dovecot %v", um, dm)
	}
	if dm["/run/dovecot"] == "" || um["/run/dovecot"] != dm["/run/dovecot"] {
		t.Errorf("undomail must share Dovecot's base_dir: undomail %v, dovecot %v", um, dm)
	}
	if _, ok := dm["/var/lib/undomail"]; ok {
		t.Error("Dovecot must not see undomail's log volume")
	}
}

// TestComposeConfigs loads the configuration each compose service gets
// and checks it names the compose services and paths: undomail's with
// undomail's own config package, Dovecot's with doveconf, Postfix's with
// postconf.
func TestComposeConfigs(t *testing.T) {
	p := loadCompose(t)
	b, err := os.ReadFile("undomail/undomail.yaml")
	if err != nil {
		t.Fatal(err)
	}
	// As deploy/secrets/init writes it.
	cfgPath := filepath.Join(t.TempDir(), "undomail.yaml")
	if err := os.WriteFile(cfgPath, []byte(strings.Replace(string(b), "MASTER_PASSWORD", "from-init", 1)), 0o600); err != nil {
		t.Fatal(err)
	}
	cfg, err := config.Load(cfgPath)
	if err != nil {
		t.Fatalf("compose undomail.yaml: %v", err)
	}
	if err := cfg.Validate(); err != nil {
		t.Fatalf("compose undomail.yaml does not validate: %v", err)
	}
	u, _ := p.GetService("undomail")
	targets := map[uint32]bool{}
	for _, port := range u.Ports {
		targets[port.Target] = true
	}
	for key, addr := range map[string]string{"smtp.listen": cfg.SMTP.Listen, "imap.listen": cfg.IMAP.Listen, "admin.listen": cfg.Admin.Listen} {
		var port uint32
		fmt.Sscanf(addr[strings.LastIndex(addr, ":")+1:], "%d", &port)
		if !targets[port] {
			t.Errorf("%s %s is not a port the compose file publishes", key, addr)
		}
	}
	for key, host := range map[string]string{"smtp.upstream": cfg.SMTP.Upstream, "lmtp.upstream": cfg.LMTP.Upstream, "imap.upstream": cfg.IMAP.Upstream} {
		name := host[:strings.LastIndex(host, ":")]
		if _, err := p.GetService(name); err != nil {
			t.Errorf("%s %s: no such compose service", key, host)
		}
	}
	if !strings.HasPrefix(cfg.MailRoot, "/srv/mail/") || !strings.HasPrefix(cfg.Store, "copy:/srv/mail/") {
		t.Errorf("store %s and mail_root %s must share the mail volume (/srv/mail) for hard links", cfg.Store, cfg.MailRoot)
	}

	// Dovecot: doveconf parses the whole configuration, snippet included.
	// Users and groups of the image are mapped to ones this host has.
	dir := t.TempDir()
	if err := os.MkdirAll(filepath.Join(dir, "conf.d"), 0o755); err != nil {
		t.Fatal(err)
	}
	pw := filepath.Join(dir, "doveadm-password")
	os.WriteFile(pw, []byte("x\n"), 0o600)
	rep := strings.NewReplacer("= vmail", "= mail", "=vmail", "=mail", "= undomail", "= nogroup", "gid=undomail", "gid=nogroup",
		"/etc/dovecot/doveadm-password", pw, "= 10025", "= 8", "/run/dovecot", filepath.Join(dir, "run"))
	for _, f := range []string{"dovecot.conf", "conf.d/90-undomail.conf"} {
		b, err := os.ReadFile(filepath.Join("dovecot", f))
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, f), []byte(rep.Replace(string(b))), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	out, err := exec.Command("doveconf", "-c", filepath.Join(dir, "dovecot.conf"), "-n").CombinedOutput()
	if err != nil || strings.Contains(string(out), "Warning") {
		t.Fatalf("doveconf on the compose Dovecot config: %v\n%s", err, out)
	}
	for _, want := range []string{"port = 10143", "port = 24", "group = nogroup", "master = yes"} {
		if !strings.Contains(string(out), want) {
			t.Errorf("doveconf -n lacks %q:\n%s", want, out)
		}
	}

	// Postfix: postconf reads main.cf and names unknown parameters.
	pdir := t.TempDir()
	mb, err := os.ReadFile("postfix/main.cf")
	if err != nil {
		t.Fatal(err)
	}
	os.WriteFile(filepath.Join(pdir, "main.cf"), mb, 0o644)
	master, err := os.ReadFile("/usr/share/postfix/master.cf.dist")
	if err != nil {
		t.Fatalf("Debian's master.cf (package postfix; the image starts from it): %v", err)
	}
	os.WriteFile(filepath.Join(pdir, "master.cf"), master, 0o644)
	// The image's RUN edits master.cf with postconf: run them here too.
	for _, st := range parseDockerfile(t, "postfix/Dockerfile") {
		for _, c := range st.Commands {
			run, ok := c.(*instructions.RunCommand)
			if !ok {
				continue
			}
			for _, part := range strings.Split(strings.Join(run.CmdLine, " "), ";") {
				part = strings.TrimSpace(part)
				if !strings.HasPrefix(part, "postconf -") {
					continue
				}
				cmd := exec.Command("sh", "-c", "postconf -c "+pdir+strings.TrimPrefix(part, "postconf"))
				if out, err := cmd.CombinedOutput(); err != nil || len(out) > 0 {
					t.Fatalf("postfix/Dockerfile: %s: %v\n%s", part, err, out)
				}
			}
		}
	}
	out, err = exec.Command("postconf", "-c", pdir, "-M", "10025/inet", "smtp/inet").CombinedOutput()
	if err != nil || !strings.Contains(string(out), "10025      inet  n       -       n") || strings.Contains(string(out), "smtp      inet") {
		t.Fatalf("master.cf after the image's edits: smtpd must be on 10025 only, without chroot: %v\n%s", err, out)
	}
	out, err = exec.Command("postconf", "-c", pdir, "-P", "10026/inet/content_filter", "10026/inet/smtpd_relay_restrictions", "undomail-replay/unix/lmtp_lhlo_name").CombinedOutput()
	if err != nil || !strings.Contains(string(out), "10026/inet/content_filter = undomail-replay:inet:undomail:10024") ||
		!strings.Contains(string(out), "undomail-replay/unix/lmtp_lhlo_name = "+verb.ReplayLHLO) ||
		!strings.Contains(string(out), "10026/inet/smtpd_relay_restrictions = reject_unauth_destination") {
		t.Fatalf("master.cf after the image's edits: the replay service must send everything to the capture and refuse other domains: %v\n%s", err, out)
	}
	out, err = exec.Command("postconf", "-c", pdir, "-n").CombinedOutput()
	if err != nil || strings.Contains(string(out), "warning") {
		t.Fatalf("postconf on the compose Postfix main.cf: %v\n%s", err, out)
	}
	for _, want := range []string{"virtual_transport = lmtp:inet:undomail:10024", "smtpd_authorized_xclient_hosts = " + u.Networks["mail"].Ipv4Address} {
		if !strings.Contains(string(out), want) {
			t.Errorf("postconf -n lacks %q:\n%s", want, out)
		}
	}
}

// TestDockerfiles parses every Dockerfile with BuildKit and fails on any
// warning of its parse-time lint rules; undomail's must be multi-stage,
// build a static binary and run as a user that is not root.
func TestDockerfiles(t *testing.T) {
	files := []string{"../Dockerfile"}
	more, _ := filepath.Glob("*/Dockerfile")
	files = append(files, more...)
	if len(files) < 4 {
		t.Fatalf("Dockerfiles: %v, want undomail's and those of dovecot, postfix, spamassassin", files)
	}
	for _, f := range files {
		t.Run(f, func(t *testing.T) {
			stages := parseDockerfile(t, f)
			if f != "../Dockerfile" {
				return
			}
			if len(stages) < 2 {
				t.Fatalf("%d stage(s): want a build stage and a runtime stage", len(stages))
			}
			var build, final []string
			for _, c := range stages[0].Commands {
				build = append(build, c.(fmt.Stringer).String())
			}
			for _, c := range stages[len(stages)-1].Commands {
				final = append(final, c.(fmt.Stringer).String())
			}
			bs := strings.Join(build, "\n")
			for _, want := range []string{"CGO_ENABLED=1", "-extldflags \"-static\"", "osusergo", "netgo", "./cmd/undomail"} {
				if !strings.Contains(bs, want) {
					t.Errorf("build stage lacks %q:\n%s", want, bs)
				}
			}
			var user string
			for _, c := range stages[len(stages)-1].Commands {
				if u, ok := c.(*instructions.UserCommand); ok {
					user = u.User
				}
				if cp, ok := c.(*instructions.CopyCommand); ok && cp.From != "" && cp.From != stages[0].Name {
					t.Errorf("runtime stage copies from %q, not the build stage", cp.From)
				}
			}
			if user == "" || strings.HasPrefix(user, "root") || strings.HasPrefix(user, "0") {
				t.Errorf("runtime stage runs as %q, want an unprivileged user", user)
			}
			if !strings.Contains(strings.Join(final, "\n"), "COPY --from=build") {
				t.Errorf("runtime stage does not take the binary from the build stage:\n%s", strings.Join(final, "\n"))
			}
		})
	}
}

func parseDockerfile(t *testing.T, path string) []instructions.Stage {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	res, err := parser.Parse(f)
	if err != nil {
		t.Fatalf("parse %s: %v", path, err)
	}
	for _, w := range res.Warnings {
		t.Errorf("%s: %s", path, w.Short)
	}
	var lint []string
	stages, _, err := instructions.Parse(res.AST, linter.New(&linter.Config{
		Warn: func(rule, desc, url, msg string, loc []parser.Range) {
			lint = append(lint, fmt.Sprintf("%s:%v: %s: %s", path, loc, rule, msg))
		},
	}))
	if err != nil {
		t.Fatalf("parse %s: %v", path, err)
	}
	for _, l := range lint {
		t.Errorf("lint: %s", l)
	}
	if len(stages) == 0 {
		t.Fatalf("%s has no stages", path)
	}
	return stages
}

// TestSystemdUnit reads the unit the way systemd does (sections, keys,
// continuation lines) and checks the hardening and the rights
// docs/operations.md documents: its own user, the capabilities it names,
// /dev/zfs, writable paths limited to the log and the snapshots.
func TestSystemdUnit(t *testing.T) {
	u := readUnit(t, "systemd/undomail.service")
	for _, sec := range []string{"Unit", "Service", "Install"} {
		found := false
		for k := range u {
			found = found || strings.HasPrefix(k, sec+".")
		}
		if !found {
			t.Errorf("the unit has no [%s] section", sec)
		}
	}
	want := map[string]string{
		"Service.User":                    "undomail",
		"Service.Group":                   "undomail",
		"Service.NoNewPrivileges":         "yes",
		"Service.ProtectSystem":           "strict",
		"Service.ProtectHome":             "yes",
		"Service.PrivateTmp":              "yes",
		"Service.StateDirectory":          "undomail",
		"Service.AmbientCapabilities":     "CAP_NET_BIND_SERVICE CAP_SYS_PTRACE CAP_DAC_READ_SEARCH",
		"Service.CapabilityBoundingSet":   "CAP_NET_BIND_SERVICE CAP_SYS_PTRACE CAP_DAC_READ_SEARCH",
		"Service.DeviceAllow":             "/dev/zfs rw",
		"Service.RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
		"Service.SystemCallFilter":        "@system-service",
		"Service.SystemCallErrorNumber":   "EPERM",
	}
	for k, v := range want {
		if got := u[k]; got != v {
			t.Errorf("%s = %q, want %q", k, got, v)
		}
	}
	for _, forbidden := range []string{"Service.ProtectProc", "Service.PrivateDevices", "Service.PrivateUsers"} {
		if v, ok := u[forbidden]; ok && v != "no" {
			t.Errorf("%s = %s would hide what undomail needs (Dovecot's processes, /dev/zfs, zfs delegation by uid)", forbidden, v)
		}
	}
	argv := strings.Fields(u["Service.ExecStart"])
	if len(argv) < 4 || argv[1] != "serve" || argv[2] != "--config" {
		t.Fatalf("ExecStart = %q, want undomail serve --config FILE", u["Service.ExecStart"])
	}
	if !strings.Contains(u["Service.ReadWritePaths"], "/var/lib/undomail") {
		t.Errorf("ReadWritePaths = %q lacks the data dir", u["Service.ReadWritePaths"])
	}

	// The ZFS drop-in must undo every option that gives the service a
	// mount namespace of its own: a rewind's mount must reach Dovecot.
	zfs := readUnit(t, "systemd/undomail.service.d/zfs.conf")
	for _, k := range []string{"ProtectSystem", "ProtectHome", "PrivateTmp", "PrivateDevices", "ProtectKernelTunables",
		"ProtectKernelModules", "ProtectKernelLogs", "ProtectControlGroups", "ProtectProc", "ReadWritePaths",
		"ReadOnlyPaths", "InaccessiblePaths", "BindPaths", "TemporaryFileSystem"} {
		base, set := u["Service."+k]
		if !set || base == "no" || base == "" {
			continue
		}
		if v, ok := zfs["Service."+k]; !ok || (v != "no" && v != "") {
			t.Errorf("zfs.conf leaves %s=%s: ZFS mounts made by a rewind would stay in undomail's own mount namespace", k, base)
		}
	}
	if zfs["Service.User"] != "root" || !strings.Contains(zfs["Service.CapabilityBoundingSet"], "CAP_SYS_ADMIN") || zfs["Service.SystemCallFilter"] != "@mount" {
		t.Errorf("zfs.conf must run as root with CAP_SYS_ADMIN and allow @mount: %v", zfs)
	}

	// systemd's own checks, offline: the unit verifies with each drop-in
	// (with ExecStart pointing at a program that exists here), and its
	// exposure rating.
	b, err := os.ReadFile("systemd/undomail.service")
	if err != nil {
		t.Fatal(err)
	}
	for _, dropIn := range []string{"", "copy.conf", "zfs.conf"} {
		dir := t.TempDir()
		unit := filepath.Join(dir, "undomail.service")
		if err := os.WriteFile(unit, []byte(strings.Replace(string(b), argv[0], "/bin/true", 1)), 0o644); err != nil {
			t.Fatal(err)
		}
		if dropIn != "" {
			d, err := os.ReadFile(filepath.Join("systemd/undomail.service.d", dropIn))
			if err != nil {
				t.Fatal(err)
			}
			// The copy backend's mail user is the one this host has.
			d = []byte(strings.NewReplacer("User=vmail", "User=mail", "Group=vmail", "Group=mail").Replace(string(d)))
			os.Mkdir(filepath.Join(dir, "undomail.service.d"), 0o755)
			if err := os.WriteFile(filepath.Join(dir, "undomail.service.d", dropIn), d, 0o644); err != nil {
				t.Fatal(err)
			}
		}
		env := append(os.Environ(), "SYSTEMD_UNIT_PATH="+dir+":")
		cmd := exec.Command("systemd-analyze", "verify", "--man=no", "undomail.service")
		cmd.Env = env
		out, err := cmd.CombinedOutput()
		if err != nil || len(out) > 0 {
			t.Fatalf("systemd-analyze verify with drop-in %q: %v\n%s", dropIn, err, out)
		}
		cmd = exec.Command("systemd-analyze", "security", "--offline=yes", "--no-pager", "undomail.service")
		cmd.Env = env
		out, err = cmd.CombinedOutput()
		m := regexp.MustCompile(`Overall exposure level for undomail.service: ([0-9.]+) (\w+)`).FindStringSubmatch(string(out))
		if m == nil {
			t.Fatalf("systemd-analyze security with drop-in %q: %v\n%s", dropIn, err, out)
		}
		if dropIn == "zfs.conf" && !strings.Contains(string(out), "Service runs as root user") {
			t.Fatalf("systemd-analyze did not apply drop-in %s:\n%s", dropIn, out)
		}
		// systemd rates 0-10: OK, MEDIUM, EXPOSED, UNSAFE.
		if m[2] != "OK" {
			t.Errorf("systemd rates the unit's exposure with drop-in %q %s %s, want OK", dropIn, m[1], m[2])
		}
		t.Logf("systemd-analyze security, drop-in %q: exposure %s %s", dropIn, m[1], m[2])
	}
}

// readUnit returns Section.Key -> value of a systemd unit file; a key set
// twice keeps the last value, like systemd does for single-value keys.
func readUnit(t *testing.T, path string) map[string]string {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	out := map[string]string{}
	sc := bufio.NewScanner(f)
	section, pending := "", ""
	n := 0
	for sc.Scan() {
		n++
		line := strings.TrimSpace(sc.Text())
		if pending != "" {
			line = pending + " " + line
			pending = ""
		}
		if strings.HasSuffix(line, "\\") {
			pending = strings.TrimSuffix(line, "\\")
			continue
		}
		switch {
		case line == "" || line[0] == '#' || line[0] == ';':
		case line[0] == '[' && line[len(line)-1] == ']':
			section = line[1 : len(line)-1]
		case section == "":
			t.Fatalf("%s:%d: %q outside a section", path, n, line)
		default:
			k, v, ok := strings.Cut(line, "=")
			if !ok {
				t.Fatalf("%s:%d: %q is not KEY=VALUE", path, n, line)
			}
			out[section+"."+strings.TrimSpace(k)] = strings.Join(strings.Fields(v), " ")
		}
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
	return out
}
