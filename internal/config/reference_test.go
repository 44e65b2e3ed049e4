package config

import (
	"flag"
	"fmt"
	"go/ast"
	"go/parser"
	"go/token"
	"os"
	"path/filepath"
	"reflect"
	"regexp"
	"slices"
	"strings"
	"testing"
)

// The configuration reference in docs/configuration.md is generated from
// this package: keys and types from the Config struct, descriptions from
// the fields' doc comments, defaults from Default(), examples from the
// table below. TestReference fails when the document and the code differ;
// `go test ./internal/config -run TestReference -update` rewrites the
// generated part.
var update = flag.Bool("update", false, "rewrite the generated reference in docs/configuration.md")

const (
	referencePath  = "../../docs/configuration.md"
	operationsPath = "../../docs/operations.md"
)

const (
	beginMarker = "<!-- BEGIN REFERENCE: generated from internal/config by `go test ./internal/config -run TestReference -update`; edit config.go, not this. -->"
	endMarker   = "<!-- END REFERENCE -->"
)

// examples gives every option an example value, as YAML. Each one is
// loaded in TestReference, so it must parse into its key.
var examples = map[string]string{
	"data_dir":                    "/srv/undomail",
	"hostname":                    "mail.example.org",
	"log_level":                   "debug",
	"store":                       "zfs:tank/vmail",
	"mail_root":                   "/var/vmail",
	"snapshots.every":             "1h",
	"snapshots.prune_log":         "true",
	"snapshots.log_archive":       "/srv/undomail-archive",
	"snapshots.keep_hourly":       "24",
	"snapshots.keep_daily":        "30",
	"dovecot.doveadm":             "[docker, exec, dovecot, doveadm]",
	"dovecot.quiesce":             "[[systemctl, stop, dovecot]]",
	"dovecot.resume":              "[[systemctl, start, dovecot]]",
	"dovecot.master_user":         "undomail",
	"dovecot.master_password":     "a-long-random-secret",
	"smtp.listen":                 "0.0.0.0:25",
	"smtp.upstream":               "127.0.0.1:10025",
	"smtp.xclient":                "false",
	"smtp.allow_insecure_auth":    "true",
	"smtp.tls_cert":               "/etc/ssl/mail/fullchain.pem",
	"smtp.tls_key":                "/etc/ssl/mail/privkey.pem",
	"smtp.max_message_bytes":      "52428800",
	"smtp.outbound_delay":         "30s",
	"smtp.postfix_config":         "/etc/postfix",
	"smtp.postfix_exec":           "[sudo, -n]",
	"smtp.replay_upstream":        "127.0.0.1:10026",
	"smtp.upstream_timeout":       "2m",
	"smtp.client_timeout":         "10m",
	"lmtp.listen":                 "127.0.0.1:10024",
	"lmtp.upstream":               "127.0.0.1:24",
	"lmtp.max_message_bytes":      "52428800",
	"lmtp.upstream_timeout":       "2m",
	"lmtp.client_timeout":         "10m",
	"imap.listen":                 "0.0.0.0:993",
	"imap.upstream":               "127.0.0.1:10143",
	"imap.tls_cert":               "/etc/ssl/mail/fullchain.pem",
	"imap.tls_key":                "/etc/ssl/mail/privkey.pem",
	"imap.implicit_tls":           "true",
	"imap.allow_insecure_auth":    "true",
	"imap.upstream_timeout":       "10s",
	"imap.idle_timeout":           "31m",
	"admin.listen":                "127.0.0.1:8025",
	"admin.token":                 "0f1e2d3c4b5a69788796a5b4c3d2e1f0",
	"admin.tls_cert":              "/etc/ssl/mail/fullchain.pem",
	"admin.tls_key":               "/etc/ssl/mail/privkey.pem",
	"admin.allow_insecure_remote": "true",

	"imap.login_timeout":               "1m",
	"imap.max_connections":             "5000",
	"imap.max_connections_per_address": "20",

	"compensation.postmaster":                  "Mail administrator <postmaster@example.org>",
	"drills.every":                             "24h",
	"drills.notify":                            "postmaster@example.org",
	"drills.webhook":                           "https://monitor.example.org/hooks/undomail-drill",
	"compensation.contact":                     "\"the help desk, help@example.org, extension 4711\"",
	"compensation.operator":                    "postmaster@example.org",
	"compensation.subject":                     "\"Your mailbox was repaired\"",
	"compensation.domain":                      "example.org",
	"compensation.policies.read_removed":       "explain",
	"compensation.policies.read_moved":         "notify",
	"compensation.policies.misdelivered":       "notify",
	"compensation.policies.refused_by_mistake": "notify",
	"compensation.policies.held_outside":       "ignore",
	"compensation.policies.read_changed":       "explain",
	"compensation.policies.delivery_lost":      "explain",
	"compensation.policies.action_failed":      "notify",
	"compensation.policies.sent_onwards":       "explain",
	"compensation.policies.action_cancelled":   "ignore",
}

// option is one leaf key of the configuration.
type option struct {
	key     string // dotted path, e.g. smtp.listen
	typ     string // for operators: string, boolean, integer, duration, ...
	doc     string // the field's doc comment, as one paragraph
	def     string // the default, as YAML
	example string
}

// section is a group of options under one key (or the top level).
type section struct {
	key, doc string
	goName   string // the struct type
	options  []option
}

// structDocs parses the package's files: for each struct type its doc comment and
// the doc comment of each field.
func structDocs(t *testing.T) (types map[string]string, fields map[string]map[string]string) {
	t.Helper()
	pkgs, err := filepath.Glob("*.go")
	if err != nil {
		t.Fatal(err)
	}
	types, fields = map[string]string{}, map[string]map[string]string{}
	for _, name := range pkgs {
		if strings.HasSuffix(name, "_test.go") {
			continue
		}
		f, err := parser.ParseFile(token.NewFileSet(), name, nil, parser.ParseComments)
		if err != nil {
			t.Fatal(err)
		}
		for _, d := range f.Decls {
			g, ok := d.(*ast.GenDecl)
			if !ok || g.Tok != token.TYPE {
				continue
			}
			for _, s := range g.Specs {
				ts := s.(*ast.TypeSpec)
				types[ts.Name.Name] = g.Doc.Text()
				st, ok := ts.Type.(*ast.StructType)
				if !ok {
					continue
				}
				fields[ts.Name.Name] = map[string]string{}
				for _, fl := range st.Fields.List {
					for _, n := range fl.Names {
						fields[ts.Name.Name][n.Name] = fl.Doc.Text()
					}
				}
			}
		}
	}
	return types, fields
}

// reference lists every option of Config with its documentation. It fails
// the test for an option without a doc comment or an example.
func reference(t *testing.T) []section {
	t.Helper()
	types, fields := structDocs(t)
	// walk returns the section of v's options, then its struct fields as
	// sections of their own, depth first, in declaration order.
	var walk func(sec section, v reflect.Value, prefix string) []section
	walk = func(sec section, v reflect.Value, prefix string) []section {
		vt := v.Type()
		var subs []section
		for i := range vt.NumField() {
			f := vt.Field(i)
			key := prefix + yamlKey(f)
			if f.Type.Kind() == reflect.Struct && f.Type != reflect.TypeOf(Duration(0)) {
				sub := section{key: key, doc: types[f.Type.Name()], goName: f.Type.Name()}
				subs = append(subs, walk(sub, v.Field(i), key+".")...)
				continue
			}
			sec.options = append(sec.options, leaf(t, key, f, v.Field(i), fields[vt.Name()][f.Name]))
		}
		return append([]section{sec}, subs...)
	}
	return walk(section{doc: types["Config"]}, reflect.ValueOf(Default()), "")
}

func yamlKey(f reflect.StructField) string {
	name, _, _ := strings.Cut(f.Tag.Get("yaml"), ",")
	return name
}

func leaf(t *testing.T, key string, f reflect.StructField, v reflect.Value, doc string) option {
	t.Helper()
	if strings.TrimSpace(doc) == "" {
		t.Errorf("%s (%s): no doc comment in config.go; it is the option's description in the reference", key, f.Name)
	}
	ex, ok := examples[key]
	if !ok {
		t.Errorf("%s: no example in reference_test.go's examples", key)
	}
	// The doc comment starts with the Go name; operators know the key.
	doc = strings.Join(strings.Fields(doc), " ")
	name := "`" + key[strings.LastIndex(key, ".")+1:] + "`"
	if rest, ok := strings.CutPrefix(doc, f.Name+" "); ok {
		doc = name + " " + rest
	} else if rest, ok := strings.CutPrefix(doc, f.Name+":"); ok {
		doc = name + ":" + rest
	}
	return option{key: key, typ: typeName(f.Type), doc: doc, def: yamlValue(v), example: ex}
}

func typeName(t reflect.Type) string {
	switch {
	case t == reflect.TypeOf(Duration(0)):
		return "duration"
	case t.Kind() == reflect.Pointer:
		return typeName(t.Elem())
	case t.Kind() == reflect.Bool:
		return "boolean"
	case t.Kind() == reflect.Int, t.Kind() == reflect.Int64:
		return "integer"
	case t.Kind() == reflect.String:
		return "string"
	case t.Kind() == reflect.Slice && t.Elem().Kind() == reflect.Slice:
		return "list of commands"
	case t.Kind() == reflect.Slice:
		return "command (list of strings)"
	}
	return t.String()
}

// yamlValue renders a default as an operator would write it.
func yamlValue(v reflect.Value) string {
	switch {
	case v.Type() == reflect.TypeOf(Duration(0)):
		return Duration(v.Int()).String()
	case v.Kind() == reflect.Pointer && v.IsNil():
		// smtp.xclient: nil means on; TestReference checks that.
		return "true"
	case v.Kind() == reflect.Pointer:
		return yamlValue(v.Elem())
	case v.Kind() == reflect.String:
		return fmt.Sprintf("%q", v.String())
	case v.Kind() == reflect.Slice:
		parts := make([]string, v.Len())
		for i := range parts {
			parts[i] = strings.Trim(yamlValue(v.Index(i)), `"`)
		}
		return "[" + strings.Join(parts, ", ") + "]"
	}
	return fmt.Sprint(v.Interface())
}

// render writes the generated part of docs/configuration.md.
func render(secs []section) string {
	var b strings.Builder
	b.WriteString(beginMarker + "\n")
	for _, s := range secs {
		title := "Top level"
		if s.key != "" {
			title = "`" + s.key + ":`"
		}
		fmt.Fprintf(&b, "\n### %s\n\n", title)
		if s.key != "" && s.doc != "" {
			// "SMTP is the front door: ..." -> "The front door: ..."
			doc := strings.Join(strings.Fields(s.doc), " ")
			if rest, ok := strings.CutPrefix(doc, s.goName+" is "); ok {
				doc = strings.ToUpper(rest[:1]) + rest[1:]
			} else if rest, ok := strings.CutPrefix(doc, s.goName+" "); ok {
				doc = "`" + s.key + "` " + rest
			}
			b.WriteString(doc + "\n\n")
		}
		b.WriteString("| key | type | default | example |\n| --- | --- | --- | --- |\n")
		for _, o := range s.options {
			fmt.Fprintf(&b, "| [`%s`](#%s) | %s | `%s` | `%s` |\n", o.key, anchor(o.key), o.typ, o.def, o.example)
		}
		for _, o := range s.options {
			fmt.Fprintf(&b, "\n#### `%s`\n\n%s\n", o.key, o.doc)
		}
	}
	b.WriteString("\n" + endMarker)
	return b.String()
}

// anchor is the id GitHub gives the heading "#### `KEY`".
func anchor(key string) string {
	return strings.ReplaceAll(key, ".", "")
}

// TestReference keeps docs/configuration.md's reference identical to what
// the code says, every option documented with a default and an example,
// every example loadable into its key, and every key the prose names real.
func TestReference(t *testing.T) {
	secs := reference(t)
	if t.Failed() {
		t.FailNow()
	}
	if !Default().SMTP.XClientEnabled() {
		t.Fatal("the reference says smtp.xclient defaults to true, but the default config has it off")
	}
	b, err := os.ReadFile(referencePath)
	if err != nil {
		t.Fatalf("read the configuration reference: %v", err)
	}
	doc := string(b)
	i, j := strings.Index(doc, beginMarker), strings.Index(doc, endMarker)
	if i < 0 || j < i {
		t.Fatalf("%s lacks the generated reference between %q and %q", referencePath, beginMarker, endMarker)
	}
	want := render(secs)
	if got := doc[i : j+len(endMarker)]; got != want {
		if *update {
			if err := os.WriteFile(referencePath, []byte(doc[:i]+want+doc[j+len(endMarker):]), 0o644); err != nil {
				t.Fatal(err)
			}
			t.Logf("rewrote %s", referencePath)
		} else {
			t.Errorf("%s is out of date with internal/config; run go test ./internal/config -run TestReference -update\n%s",
				referencePath, firstDiff(got, want))
		}
	}

	// Every example is a value of its key's type.
	keys := map[string]bool{}
	for _, s := range secs {
		for _, o := range s.options {
			keys[o.key] = true
			path := strings.Split(o.key, ".")
			var y strings.Builder
			for d, p := range path[:len(path)-1] {
				fmt.Fprintf(&y, "%s%s:\n", strings.Repeat("  ", d), p)
			}
			fmt.Fprintf(&y, "%s%s: %s\n", strings.Repeat("  ", len(path)-1), path[len(path)-1], o.example)
			if _, err := Load(write(t, y.String())); err != nil {
				t.Errorf("example for %s does not load: %v\n%s", o.key, err, y.String())
			}
		}
	}
	for k := range examples {
		if !keys[k] {
			t.Errorf("examples lists %s, which is not an option", k)
		}
	}

	// The prose (outside the generated part) names only real keys.
	prose := doc[:i] + doc[j:]
	sections := []string{}
	for _, s := range secs[1:] {
		sections = append(sections, s.key)
	}
	re := regexp.MustCompile("`((?:" + strings.Join(sections, "|") + `)\.[a-z_.]+)` + "[`:\\[ ]")
	for _, m := range re.FindAllStringSubmatch(prose, -1) {
		if !keys[m[1]] {
			t.Errorf("%s names %s, which is not an option", referencePath, m[1])
		}
	}
	// So does the operations guide.
	ops, err := os.ReadFile(operationsPath)
	if err != nil {
		t.Fatalf("read the operations guide: %v", err)
	}
	for _, m := range re.FindAllStringSubmatch(string(ops), -1) {
		if !keys[m[1]] {
			t.Errorf("%s names %s, which is not an option", operationsPath, m[1])
		}
	}
	re = regexp.MustCompile("`([a-z_]+)`")
	for _, m := range re.FindAllStringSubmatch(prose, -1) {
		if strings.Contains(m[1], "_") && !keys[m[1]] && !slices.Contains(sections, m[1]) && !knownProseWord[m[1]] {
			t.Errorf("%s names `%s`, which is not a top-level option (add it to knownProseWord if it is not meant as one)", referencePath, m[1])
		}
	}

	// Every YAML block in the document is a configuration undomail loads.
	for n, block := range yamlBlocks(doc) {
		if _, err := Load(write(t, block)); err != nil {
			t.Errorf("%s: YAML example %d does not load: %v\n%s", referencePath, n+1, err, block)
		}
	}
}

// knownProseWord are snake_case words the prose uses that are not options
// (Dovecot and Postfix settings).
var knownProseWord = map[string]bool{
	"mail_location": true, "virtual_transport": true, "smtpd_authorized_xclient_hosts": true,
	"message_size_limit": true, "auth_master_user_separator": true, "user_version": true,
}

// yamlBlocks returns the contents of the ```yaml fences in doc.
func yamlBlocks(doc string) []string {
	var out []string
	for {
		i := strings.Index(doc, "```yaml\n")
		if i < 0 {
			return out
		}
		doc = doc[i+len("```yaml\n"):]
		j := strings.Index(doc, "```")
		if j < 0 {
			return out
		}
		out = append(out, doc[:j])
		doc = doc[j:]
	}
}

func firstDiff(got, want string) string {
	g, w := strings.Split(got, "\n"), strings.Split(want, "\n")
	for i := range min(len(g), len(w)) {
		if g[i] != w[i] {
			return fmt.Sprintf("line %d of the generated part:\n got %s\nwant %s", i+1, g[i], w[i])
		}
	}
	return fmt.Sprintf("generated part has %d lines, want %d", len(g), len(w))
}
