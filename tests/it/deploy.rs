//! The ready-made deployments in `examples/deploy/` (systemd, Docker, Kubernetes, Grafana),
//! checked for what can be checked without a cluster, a Docker daemon or a running systemd:
//! every config they carry passes `wsgate check`, the units pass `systemd-analyze verify`,
//! and the numbers that must agree across files (drain period and stop timeouts, listener
//! addresses and sockets or ports, probe paths, and the dashboard's metric names and labels, which
//! are checked against what a running gateway's /metrics exports) do. A part whose tool is missing
//! prints `SKIP deploy test: ...` and passes; `.ci/run` installs them (Debian's `systemd` for
//! systemd-analyze, `python3-yaml` to read the Kubernetes manifest).

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value as Json;

use crate::support::binary::{self, BIN};
use crate::support::tls::Pki;
use crate::support::WAIT;

const DEPLOY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/deploy");
/// Where the unit files expect the binary; tests substitute the one cargo just built.
const INSTALLED_BIN: &str = "/usr/local/bin/wsgate";
/// What wsgate takes on top of `timeouts.drain` before it exits: 5 s for closed tunnels to
/// log (`server::CLOSE_GRACE`), 1 s for the runtime to shut down (`main`).
const AFTER_DRAIN: f64 = 6.0;

fn read(name: &str) -> String {
    let path = Path::new(DEPLOY).join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

fn skip(what: &str, why: &str) {
    eprintln!("SKIP deploy test: {what}: {why}");
}

/// A folder under the temp dir for one test, removed on drop.
struct Scratch {
    dir: PathBuf,
}

impl Scratch {
    fn new(name: &str) -> Scratch {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static COUNT: AtomicUsize = AtomicUsize::new(0);
        let n = COUNT.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!(
            "wsgate-it-deploy-{}-{n}-{name}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).expect("create a scratch folder");
        Scratch { dir }
    }

    fn write(&self, name: &str, contents: &str) -> PathBuf {
        let path = self.dir.join(name);
        std::fs::create_dir_all(path.parent().unwrap()).expect("create a folder");
        std::fs::write(&path, contents).expect("write a scratch file");
        path
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Runs a tool to completion within `WAIT`, stdout and stderr captured.
fn run_tool(command: &mut Command) -> Output {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {command:?}: {e}"));
    let pipe = |mut p: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            let _ = p.read_to_end(&mut bytes);
            bytes
        })
    };
    let stdout = pipe(Box::new(child.stdout.take().unwrap()));
    let stderr = pipe(Box::new(child.stderr.take().unwrap()));
    let deadline = Instant::now() + WAIT;
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{command:?} did not finish within {WAIT:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Output {
        status,
        stdout: stdout.join().unwrap(),
        stderr: stderr.join().unwrap(),
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

// ---- wsgate configs -------------------------------------------------------------------------

/// Runs `wsgate check` on `config` placed as `config.toml` in a scratch folder, beside a
/// throwaway certificate pair at `tls/fullchain.pem` and `tls/privkey.pem`: the examples name
/// their certificates relative to the config file's folder (as `/etc/wsgate/tls/...` is to
/// `/etc/wsgate/config.toml`), and `check` loads every certificate, so the file is checked
/// exactly as shipped, with only the keys made up.
#[track_caller]
fn assert_check_passes(what: &str, config: &str) {
    let scratch = Scratch::new("check");
    let pki = Pki::new();
    let issued = pki.issue("example", &["example.com"]);
    std::fs::create_dir_all(scratch.dir.join("tls")).unwrap();
    std::fs::copy(&issued.cert, scratch.dir.join("tls/fullchain.pem")).unwrap();
    std::fs::copy(&issued.key, scratch.dir.join("tls/privkey.pem")).unwrap();
    let path = scratch.write("config.toml", config);
    let output = binary::run(&["check", "--config", path.to_str().unwrap()]);
    let stderr = text(&output.stderr);
    assert!(
        !stderr.contains("unknown field `admin`"),
        "{what}: this wsgate has no [admin] table yet (issue 14's metrics and admin listener); \
         the examples are written for the wsgate that has it:\n{stderr}"
    );
    assert!(
        output.status.success(),
        "{what} fails `wsgate check` ({}):\n{stderr}",
        output.status
    );
}

fn toml_of(config: &str) -> toml::Table {
    config.parse().expect("the example config is TOML")
}

/// `timeouts.drain` in seconds (wsgate's default when absent: 30 s).
fn drain_seconds(config: &toml::Table) -> f64 {
    let drain = config
        .get("timeouts")
        .and_then(|t| t.get("drain"))
        .and_then(|d| d.as_str())
        .unwrap_or("30s");
    duration_seconds(drain)
}

/// `"250ms"`, `"30s"`, `"2m"`, `"1h"`, as wsgate reads durations.
fn duration_seconds(text: &str) -> f64 {
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: f64 = number
        .parse()
        .unwrap_or_else(|_| panic!("duration {text:?}"));
    match unit {
        "ms" => number / 1000.0,
        "s" => number,
        "m" => number * 60.0,
        "h" => number * 3600.0,
        _ => panic!("duration {text:?}: unknown unit"),
    }
}

/// `(name, bind)` of each `[[listener]]`.
fn listeners(config: &toml::Table) -> Vec<(String, String)> {
    let listeners = config["listener"].as_array().expect("[[listener]]");
    listeners
        .iter()
        .map(|l| {
            let field = |key: &str| l[key].as_str().expect("a string").to_owned();
            (field("name"), field("bind"))
        })
        .collect()
}

fn port_of(bind: &str) -> u64 {
    let port = bind.rsplit(':').next().unwrap();
    port.parse()
        .unwrap_or_else(|_| panic!("no port in {bind:?}"))
}

#[test]
fn production_config_passes_check() {
    assert_check_passes("examples/deploy/config.toml", &read("config.toml"));
}

#[test]
fn container_config_passes_check() {
    let config = read("config.container.toml");
    assert_check_passes("examples/deploy/config.container.toml", &config);
    let config = toml_of(&config);
    for (name, bind) in listeners(&config) {
        assert!(
            port_of(&bind) >= 1024,
            "listener {name:?} binds {bind}: the container runs without CAP_NET_BIND_SERVICE"
        );
    }
}

// ---- systemd --------------------------------------------------------------------------------

fn systemd_analyze() -> Option<&'static str> {
    let found = ["/usr/bin/systemd-analyze", "/bin/systemd-analyze"]
        .into_iter()
        .find(|p| Path::new(p).exists());
    if found.is_none() {
        skip(
            "systemd units",
            "systemd-analyze is not installed (apt-get install systemd)",
        );
    }
    found
}

/// The unit files in a scratch folder, with the installed binary's path replaced by the one
/// cargo built: `verify` checks that every Exec*= program exists.
fn units_with_this_binary(scratch: &Scratch) -> (PathBuf, PathBuf) {
    let unit = |name: &str| scratch.write(name, &read(name).replace(INSTALLED_BIN, BIN));
    (unit("wsgate.socket"), unit("wsgate.service"))
}

#[test]
fn systemd_units_pass_systemd_analyze_verify() {
    let Some(analyze) = systemd_analyze() else {
        return;
    };
    let scratch = Scratch::new("units");
    let (socket, service) = units_with_this_binary(&scratch);
    let output = run_tool(
        Command::new(analyze)
            .args(["verify", "--man=no"])
            .arg(&socket)
            .arg(&service),
    );
    let stderr = text(&output.stderr);
    // verify exits 0 on an unknown key or section ("..., ignoring"): any word about our
    // units is a failure.
    let about_ours: Vec<&str> = stderr.lines().filter(|l| l.contains("wsgate")).collect();
    assert!(
        output.status.success() && about_ours.is_empty(),
        "systemd-analyze verify ({}):\n{stderr}",
        output.status
    );
}

#[test]
fn systemd_service_sandbox_stays_tight() {
    let Some(analyze) = systemd_analyze() else {
        return;
    };
    let scratch = Scratch::new("security");
    let (_, service) = units_with_this_binary(&scratch);
    // Exposure in tenths, 0 (locked down) to 100; the unit scores 1.4 with systemd 252. Over
    // 2.0 means a sandboxing line was lost.
    let output = run_tool(
        Command::new(analyze)
            .args(["security", "--offline=yes", "--threshold=20", "--no-pager"])
            .arg(&service),
    );
    let stderr = text(&output.stderr);
    if stderr.contains("--offline") || stderr.contains("unrecognized option") {
        skip(
            "systemd sandbox exposure",
            "this systemd-analyze has no `security --offline` (systemd 250+)",
        );
        return;
    }
    assert!(
        output.status.success(),
        "systemd-analyze security: exposure over 2.0 ({}):\n{}{stderr}",
        output.status,
        text(&output.stdout)
    );
}

/// A unit file's `[section] key=value` lines; a key given twice keeps both values, in order.
fn unit_file(contents: &str) -> BTreeMap<(String, String), Vec<String>> {
    let mut section = String::new();
    let mut entries: BTreeMap<(String, String), Vec<String>> = BTreeMap::new();
    for line in contents.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.to_owned();
            continue;
        }
        let (key, value) = line.split_once('=').expect("key=value");
        entries
            .entry((section.clone(), key.trim().to_owned()))
            .or_default()
            .push(value.trim().to_owned());
    }
    entries
}

#[test]
fn systemd_units_agree_with_the_config() {
    let service = unit_file(&read("wsgate.service"));
    let socket = unit_file(&read("wsgate.socket"));
    let get = |unit: &BTreeMap<(String, String), Vec<String>>, section: &str, key: &str| {
        unit.get(&(section.to_owned(), key.to_owned()))
            .cloned()
            .unwrap_or_default()
    };
    let one = |section: &str, key: &str| -> String {
        let values = get(&service, section, key);
        assert_eq!(values.len(), 1, "wsgate.service: one {key}= in [{section}]");
        values[0].clone()
    };

    let config_arg = "--config /etc/wsgate/config.toml";
    assert_eq!(
        one("Service", "ExecStart"),
        format!("{INSTALLED_BIN} {config_arg}")
    );
    assert_eq!(
        one("Service", "ExecStartPre"),
        format!("{INSTALLED_BIN} check {config_arg}")
    );
    assert_eq!(
        get(&service, "Service", "ExecReload")
            .last()
            .map(String::as_str),
        Some("/bin/kill -HUP $MAINPID")
    );
    assert_eq!(one("Service", "Restart"), "on-failure");
    assert!(get(&service, "Unit", "Requires").contains(&"wsgate.socket".to_owned()));
    for (key, value) in [
        ("DynamicUser", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("NoNewPrivileges", "yes"),
        ("SystemCallFilter", "@system-service"),
    ] {
        assert!(
            get(&service, "Service", key).contains(&value.to_owned()),
            "wsgate.service: {key}={value}"
        );
    }
    assert!(
        !get(&service, "Service", "RestrictAddressFamilies").is_empty(),
        "wsgate.service: RestrictAddressFamilies="
    );

    let config = toml_of(&read("config.toml"));
    let stop = duration_seconds(&one("Service", "TimeoutStopSec"));
    let drain = drain_seconds(&config);
    assert!(
        stop > drain + AFTER_DRAIN,
        "TimeoutStopSec={stop}s must exceed timeouts.drain ({drain}s) + {AFTER_DRAIN}s, or \
         systemd kills wsgate mid-drain"
    );

    // wsgate matches inherited sockets by address, exactly: every listener with a socket in
    // wsgate.socket binds precisely that address, and no socket is left unclaimed.
    let streams: BTreeSet<String> = get(&socket, "Socket", "ListenStream").into_iter().collect();
    let binds: BTreeSet<String> = listeners(&config).into_iter().map(|(_, b)| b).collect();
    assert_eq!(
        streams, binds,
        "wsgate.socket's ListenStream= must be the config's listener binds"
    );
    // The admin listener binds itself; a privileged port would need a capability.
    let admin = config["admin"]["bind"].as_str().expect("[admin] bind");
    assert!(
        port_of(admin) >= 1024
            || get(&service, "Service", "AmbientCapabilities")
                .iter()
                .any(|c| c.contains("CAP_NET_BIND_SERVICE")),
        "admin bind {admin} needs CAP_NET_BIND_SERVICE in wsgate.service"
    );
}

// ---- Kubernetes -----------------------------------------------------------------------------

const PYTHON: &str = "/usr/bin/python3";

/// The manifest's documents as JSON, read by Debian's python3-yaml, as the other tests use
/// Debian's programs: `serde_yaml` is archived, and one test's input does not justify a
/// dev-dependency on one of its young forks.
fn kubernetes_documents() -> Option<Vec<Json>> {
    if !Path::new(PYTHON).exists() {
        skip(
            "kubernetes.yaml",
            &format!("{PYTHON} is not installed (apt-get install python3-yaml)"),
        );
        return None;
    }
    let script = "import json, sys, yaml\n\
                  docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d is not None]\n\
                  json.dump(docs, sys.stdout)\n";
    let output = run_tool(
        Command::new(PYTHON)
            .args(["-c", script])
            .arg(Path::new(DEPLOY).join("kubernetes.yaml")),
    );
    let stderr = text(&output.stderr);
    if stderr.contains("No module named 'yaml'") {
        skip(
            "kubernetes.yaml",
            "python3 has no yaml module (apt-get install python3-yaml)",
        );
        return None;
    }
    assert!(
        output.status.success(),
        "kubernetes.yaml is not valid YAML:\n{stderr}"
    );
    let docs: Json = serde_json::from_slice(&output.stdout).expect("JSON from python");
    Some(docs.as_array().expect("a list").clone())
}

fn of_kind<'a>(docs: &'a [Json], kind: &str) -> &'a Json {
    let found: Vec<&Json> = docs.iter().filter(|d| d["kind"] == kind).collect();
    assert_eq!(found.len(), 1, "kubernetes.yaml: one {kind}");
    found[0]
}

fn str_of(value: &Json) -> &str {
    value
        .as_str()
        .unwrap_or_else(|| panic!("a string: {value}"))
}

/// Every `key: value` of `selector` is among `labels`.
fn selects(selector: &Json, labels: &Json) -> bool {
    let selector = selector.as_object().expect("a selector");
    !selector.is_empty() && selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

#[test]
fn kubernetes_manifest_is_complete_and_consistent() {
    let Some(docs) = kubernetes_documents() else {
        return;
    };
    for doc in &docs {
        assert!(
            doc["apiVersion"].is_string() && doc["metadata"]["name"].is_string(),
            "every document has apiVersion and metadata.name: {doc}"
        );
    }
    let config_map = of_kind(&docs, "ConfigMap");
    let deployment = of_kind(&docs, "Deployment");
    let service = of_kind(&docs, "Service");
    let budget = of_kind(&docs, "PodDisruptionBudget");
    let policy = of_kind(&docs, "NetworkPolicy");

    // The config: the same text as config.container.toml, and valid.
    let config_text = str_of(&config_map["data"]["config.toml"]);
    assert!(
        config_text == read("config.container.toml"),
        "the ConfigMap's config.toml must be examples/deploy/config.container.toml, verbatim"
    );
    assert_check_passes("kubernetes.yaml's ConfigMap", config_text);
    let config = toml_of(config_text);
    assert_eq!(
        config["reload"]["watch"].as_bool(),
        Some(true),
        "reload.watch: a ConfigMap edit reaches the pods without a restart"
    );

    // Labels: the Deployment, Service, budget and policy all select the pods.
    let pod = &deployment["spec"]["template"];
    let labels = &pod["metadata"]["labels"];
    assert!(selects(
        &deployment["spec"]["selector"]["matchLabels"],
        labels
    ));
    assert!(selects(&service["spec"]["selector"], labels));
    assert!(selects(&budget["spec"]["selector"]["matchLabels"], labels));
    assert!(selects(
        &policy["spec"]["podSelector"]["matchLabels"],
        labels
    ));

    let spec = &pod["spec"];
    let containers = spec["containers"].as_array().expect("containers");
    assert_eq!(containers.len(), 1);
    let container = &containers[0];

    // Ports: one per listener, named after it, at its bind's port; and the admin port.
    let port_named = |name: &str| -> u64 {
        let ports = container["ports"].as_array().expect("ports");
        let port = ports.iter().find(|p| p["name"] == name);
        let port = port.unwrap_or_else(|| panic!("no container port named {name:?}"));
        port["containerPort"].as_u64().unwrap()
    };
    for (name, bind) in listeners(&config) {
        assert_eq!(port_named(&name), port_of(&bind), "listener {name:?}");
    }
    let admin_bind = config["admin"]["bind"].as_str().expect("[admin] bind");
    let admin_port = port_of(admin_bind);
    assert!(
        !admin_bind.starts_with("127.") && !admin_bind.starts_with("[::1]"),
        "the kubelet cannot reach a loopback admin bind ({admin_bind})"
    );
    let probe_port = |probe: &Json| -> u64 {
        match &probe["httpGet"]["port"] {
            Json::String(name) => port_named(name),
            number => number.as_u64().expect("a port"),
        }
    };
    let readiness = &container["readinessProbe"];
    assert_eq!(readiness["httpGet"]["path"], "/readyz");
    assert_eq!(
        probe_port(readiness),
        admin_port,
        "readiness on the admin port"
    );
    let liveness = &container["livenessProbe"];
    assert_eq!(liveness["httpGet"]["path"], "/healthz");
    assert_eq!(
        probe_port(liveness),
        admin_port,
        "liveness on the admin port"
    );

    // Stopping: preStop sleep, then the drain, all inside the grace period.
    let pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
        .as_f64()
        .expect("a preStop sleep");
    let grace = spec["terminationGracePeriodSeconds"]
        .as_f64()
        .expect("terminationGracePeriodSeconds");
    let drain = drain_seconds(&config);
    assert!(
        grace > pre_stop + drain + AFTER_DRAIN,
        "terminationGracePeriodSeconds {grace} must exceed preStop {pre_stop} + drain {drain} \
         + {AFTER_DRAIN}"
    );

    // Privileges.
    let pod_security = &spec["securityContext"];
    let security = &container["securityContext"];
    assert!(pod_security["runAsNonRoot"] == true || security["runAsNonRoot"] == true);
    assert_ne!(pod_security["runAsUser"], 0);
    assert_eq!(security["readOnlyRootFilesystem"], true);
    assert_eq!(security["allowPrivilegeEscalation"], false);
    let dropped = security["capabilities"]["drop"].as_array().expect("drop");
    assert!(
        dropped.contains(&Json::from("ALL")),
        "capabilities: drop ALL"
    );
    assert!(
        security["capabilities"]["add"].is_null(),
        "no capability added"
    );
    let resources = &container["resources"];
    assert!(resources["requests"]["cpu"].is_string() || resources["requests"]["cpu"].is_number());
    assert!(resources["requests"]["memory"].is_string());
    assert!(resources["limits"]["memory"].is_string());

    // The config file: --config names it; its folder is a mounted volume (not a subPath, which
    // the kubelet never updates) that projects the ConfigMap's key and the TLS files the
    // config names.
    let args: Vec<&str> = container["args"]
        .as_array()
        .expect("args")
        .iter()
        .map(str_of)
        .collect();
    let at = args
        .iter()
        .position(|a| *a == "--config")
        .expect("--config");
    let config_path = Path::new(args[at + 1]);
    let config_dir = config_path.parent().unwrap().to_str().unwrap();
    let mounts = container["volumeMounts"].as_array().expect("volumeMounts");
    let mount = mounts
        .iter()
        .find(|m| m["mountPath"] == config_dir)
        .unwrap_or_else(|| panic!("no volume mounted at {config_dir}"));
    assert!(
        mount["subPath"].is_null(),
        "a subPath mount is never updated"
    );
    let volumes = spec["volumes"].as_array().expect("volumes");
    let volume = volumes
        .iter()
        .find(|v| v["name"] == mount["name"])
        .expect("the mounted volume");
    let mut projected = BTreeSet::new();
    for source in volume["projected"]["sources"]
        .as_array()
        .expect("projected")
    {
        let (kind, name) = if source["configMap"].is_object() {
            ("ConfigMap", &source["configMap"])
        } else {
            ("Secret", &source["secret"])
        };
        if kind == "ConfigMap" {
            assert_eq!(name["name"], config_map["metadata"]["name"]);
        }
        for item in name["items"].as_array().expect("items") {
            projected.insert(str_of(&item["path"]).to_owned());
        }
    }
    let file_name = config_path.file_name().unwrap().to_str().unwrap();
    assert!(projected.contains(file_name), "{file_name} is projected");
    for listener in config["listener"].as_array().unwrap() {
        let Some(tls) = listener.get("tls") else {
            continue;
        };
        for pair in tls["certificates"].as_array().unwrap() {
            for file in ["cert", "key"] {
                let path = pair[file].as_str().unwrap();
                assert!(
                    projected.contains(path),
                    "the config's {file} {path:?} is not projected into {config_dir}"
                );
            }
        }
    }

    // The Service exposes the listeners (by port name), never the admin port.
    let exposed = service["spec"]["ports"].as_array().expect("Service ports");
    let names: BTreeSet<String> = listeners(&config).into_iter().map(|(n, _)| n).collect();
    for port in exposed {
        let target = str_of(&port["targetPort"]);
        assert!(
            names.contains(target),
            "Service targetPort {target:?} is a listener's port"
        );
    }
    // The NetworkPolicy narrows the admin port to named sources.
    let ingress = policy["spec"]["ingress"].as_array().expect("ingress rules");
    let admin_rules: Vec<&Json> = ingress
        .iter()
        .filter(|r| {
            r["ports"]
                .as_array()
                .unwrap()
                .iter()
                .any(|p| p["port"] == "admin")
        })
        .collect();
    assert!(
        !admin_rules.is_empty() && admin_rules.iter().all(|r| r["from"].is_array()),
        "the admin port is open only to the sources a NetworkPolicy rule names"
    );
}

// ---- Grafana --------------------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// A metric's name, type and labels.
type Metric = (String, Kind, BTreeSet<String>);

/// What `/metrics` exports, read from a running gateway (with a TLS listener, a route and an
/// upstream, so that every family has a series) rather than from a second copy of the table
/// that could drift from the code.
fn exported_metrics() -> &'static [Metric] {
    static METRICS: std::sync::OnceLock<Vec<Metric>> = std::sync::OnceLock::new();
    METRICS.get_or_init(|| {
        let runtime = tokio::runtime::Runtime::new().expect("runtime");
        let text = runtime.block_on(async {
            let pki = Pki::new();
            let leaf = pki.issue("leaf", &["app.test"]);
            let config = format!(
                "{}\n[[listener]]\nname = \"tls\"\nbind = \"127.0.0.1:0\"\n[listener.tls]\ncertificates = [{{ cert = {:?}, key = {:?} }}]\n\n[admin]\nbind = \"127.0.0.1:0\"\n",
                crate::support::proxy_config(&["127.0.0.1:9".parse().unwrap()]),
                leaf.cert,
                leaf.key
            );
            let gw = crate::support::TestGateway::start(&config).await;
            let admin = gw.admin.expect("admin");
            crate::support::get(admin, "admin", "/metrics").await.text().to_owned()
        });
        let mut families: BTreeMap<String, (Kind, BTreeSet<String>)> = BTreeMap::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').expect("# TYPE name type");
                let kind = match kind {
                    "counter" => Kind::Counter,
                    "gauge" => Kind::Gauge,
                    "histogram" => Kind::Histogram,
                    other => panic!("unexpected metric type {other}"),
                };
                families.insert(name.to_owned(), (kind, BTreeSet::new()));
            } else if !line.starts_with('#') && !line.is_empty() {
                let series = line.split(['{', ' ']).next().expect("a series name");
                let family = families
                    .iter_mut()
                    .rev()
                    .find(|(name, _)| series.starts_with(name.as_str()))
                    .expect("a sample of a declared family");
                if let Some((_, labels)) = line.split_once('{') {
                    let labels = labels.split('}').next().expect("closed labels");
                    for pair in labels.split(',').filter(|p| !p.is_empty()) {
                        let name = pair.split('=').next().expect("name=value");
                        if name != "le" {
                            family.1 .1.insert(name.to_owned());
                        }
                    }
                }
            }
        }
        families
            .into_iter()
            .map(|(name, (kind, labels))| (name, kind, labels))
            .collect()
    })
}

/// Labels Prometheus adds to every scraped series.
const TARGET_LABELS: &[&str] = &["job", "instance"];

/// What one PromQL expression uses: series names (as written), label names in matchers and
/// in `by`/`without`/`on`/`ignoring` lists, and the text before each series name.
#[derive(Default, Debug)]
struct Uses {
    series: Vec<(String, String)>,
    labels: BTreeSet<String>,
}

/// A small PromQL scanner: enough to find names, not a parser. Strings and range brackets
/// are skipped; an identifier followed by `(` is a function or an aggregation.
fn promql_uses(expr: &str) -> Uses {
    const GROUPING: &[&str] = &[
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
    ];
    // Operators, and the aggregations, which may take `by (...)` before their `(`.
    const WORDS: &[&str] = &[
        "and",
        "or",
        "unless",
        "bool",
        "offset",
        "sum",
        "min",
        "max",
        "avg",
        "group",
        "count",
        "stddev",
        "stdvar",
        "topk",
        "bottomk",
        "quantile",
        "count_values",
    ];
    let chars: Vec<char> = expr.chars().collect();
    let mut uses = Uses::default();
    let mut i = 0;
    let ident = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    let mut pending_group = false;
    while i < chars.len() {
        let c = chars[i];
        if c == '"' || c == '\'' {
            i += 1;
            while i < chars.len() && chars[i] != c {
                i += if chars[i] == '\\' { 2 } else { 1 };
            }
            i += 1;
        } else if c == '[' {
            while i < chars.len() && chars[i] != ']' {
                i += 1;
            }
            i += 1;
        } else if c == '{' {
            // Matchers: `label op "value"`, comma-separated.
            i += 1;
            while i < chars.len() && chars[i] != '}' {
                if chars[i] == '"' {
                    i += 1;
                    while i < chars.len() && chars[i] != '"' {
                        i += if chars[i] == '\\' { 2 } else { 1 };
                    }
                    i += 1;
                } else if ident(chars[i]) {
                    let start = i;
                    while i < chars.len() && ident(chars[i]) {
                        i += 1;
                    }
                    uses.labels.insert(chars[start..i].iter().collect());
                } else {
                    i += 1;
                }
            }
            i += 1;
        } else if c == '(' && pending_group {
            pending_group = false;
            let end = i + chars[i..].iter().position(|&c| c == ')').expect("a ')'");
            let list: String = chars[i + 1..end].iter().collect();
            for label in list.split(',').map(str::trim).filter(|l| !l.is_empty()) {
                uses.labels.insert(label.to_owned());
            }
            i = end + 1;
        } else if ident(c) && !c.is_ascii_digit() {
            let start = i;
            while i < chars.len() && ident(chars[i]) {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let next = chars[i..].iter().find(|c| !c.is_whitespace());
            if GROUPING.contains(&word.as_str()) {
                pending_group = true;
            } else if next == Some(&'(') || WORDS.contains(&word.as_str()) {
                // A function, an aggregation or an operator.
            } else {
                let before: String = chars[..start].iter().collect();
                uses.series.push((word, before));
            }
        } else if c.is_ascii_digit() {
            // A number, with its exponent or decimals.
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                i += 1;
            }
        } else {
            i += 1;
        }
    }
    uses
}

/// The spec metric a series name belongs to, and whether it names a histogram's `_bucket`.
fn metric_of(series: &str) -> Option<(&'static Metric, bool)> {
    if let Some(m) = exported_metrics()
        .iter()
        .find(|m| m.0 == series && m.1 != Kind::Histogram)
    {
        return Some((m, false));
    }
    for suffix in ["_bucket", "_sum", "_count"] {
        if let Some(base) = series.strip_suffix(suffix) {
            if let Some(m) = exported_metrics()
                .iter()
                .find(|m| m.0 == base && m.1 == Kind::Histogram)
            {
                return Some((m, suffix == "_bucket"));
            }
        }
    }
    None
}

#[test]
fn promql_scanner_finds_series_and_labels() {
    let uses = promql_uses(
        "histogram_quantile(0.99, sum by (upstream, le) (rate(a_bucket{job=~\"$job\", \
         x!=\"{}\"}[$__rate_interval]))) / ignoring(z) b * 1e3",
    );
    let series: Vec<&str> = uses.series.iter().map(|(s, _)| s.as_str()).collect();
    assert_eq!(series, ["a_bucket", "b"]);
    let labels: Vec<&str> = uses.labels.iter().map(String::as_str).collect();
    assert_eq!(labels, ["job", "le", "upstream", "x", "z"]);
}

#[test]
fn grafana_dashboard_is_a_dashboard_over_the_spec_metrics() {
    let dashboard: Json =
        serde_json::from_str(&read("grafana-dashboard.json")).expect("the dashboard is JSON");
    assert!(dashboard["schemaVersion"].as_u64().expect("schemaVersion") >= 36);
    assert!(!str_of(&dashboard["title"]).is_empty());
    assert!(!str_of(&dashboard["uid"]).is_empty());
    let variables = dashboard["templating"]["list"]
        .as_array()
        .expect("templating");
    let datasource = variables
        .iter()
        .find(|v| v["type"] == "datasource" && v["query"] == "prometheus")
        .expect("a Prometheus datasource variable");
    let datasource_ref = format!("${{{}}}", str_of(&datasource["name"]));

    let panels = dashboard["panels"].as_array().expect("panels");
    let mut ids = BTreeSet::new();
    let mut used = BTreeSet::new();
    for panel in panels {
        let title = str_of(&panel["title"]);
        assert!(
            ids.insert(panel["id"].as_u64().expect("an id")),
            "{title}: id"
        );
        let grid = &panel["gridPos"];
        let at = |k: &str| {
            grid[k]
                .as_u64()
                .unwrap_or_else(|| panic!("{title}: gridPos.{k}"))
        };
        assert!(
            at("w") >= 1 && at("h") >= 1 && at("x") + at("w") <= 24,
            "{title}: gridPos"
        );
        let _ = at("y");
        if panel["type"] == "row" {
            continue;
        }
        assert!(panel["type"].is_string(), "{title}: type");
        assert_eq!(
            panel["datasource"]["uid"], datasource_ref,
            "{title}: the datasource variable"
        );
        let targets = panel["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{title}: no targets");
        for target in targets {
            assert!(target["refId"].is_string(), "{title}: refId");
            let expr = str_of(&target["expr"]);
            let uses = promql_uses(expr);
            assert!(!uses.series.is_empty(), "{title}: {expr} names no metric");
            let mut labels: BTreeSet<&str> = TARGET_LABELS.iter().copied().collect();
            for (series, before) in &uses.series {
                let Some((metric, bucket)) = metric_of(series) else {
                    panic!("{title}: {series} is not a metric /metrics exports ({expr})");
                };
                used.insert(metric.0.as_str());
                labels.extend(metric.2.iter().map(String::as_str));
                if bucket {
                    labels.insert("le");
                }
                let before = before.trim_end();
                if metric.1 != Kind::Gauge {
                    assert!(
                        before.ends_with("rate(") || before.ends_with("increase("),
                        "{title}: {series} is a counter: rate() or increase() it ({expr})"
                    );
                }
            }
            for label in &uses.labels {
                assert!(
                    labels.contains(label.as_str()),
                    "{title}: label {label:?} is not one of {labels:?} ({expr})"
                );
            }
            let legend = target["legendFormat"].as_str().unwrap_or("");
            for part in legend.split("{{").skip(1) {
                let label = part.split("}}").next().unwrap().trim();
                assert!(
                    labels.contains(label),
                    "{title}: legend names {label:?}, not a label of {expr}"
                );
            }
        }
    }
    let unused: Vec<&str> = exported_metrics()
        .iter()
        .map(|m| m.0.as_str())
        .filter(|m| !used.contains(m))
        .collect();
    assert!(unused.is_empty(), "metrics with no panel: {unused:?}");
}

// ---- Docker ---------------------------------------------------------------------------------

/// A Dockerfile's instructions, continuation lines joined: `(INSTRUCTION, arguments)`.
fn dockerfile(contents: &str) -> Vec<(String, String)> {
    let mut instructions = Vec::new();
    let mut current = String::new();
    for line in contents.lines() {
        let trimmed = line.trim();
        if current.is_empty() && (trimmed.is_empty() || trimmed.starts_with('#')) {
            continue;
        }
        if trimmed.starts_with('#') {
            continue; // a comment between continuation lines
        }
        match trimmed.strip_suffix('\\') {
            Some(part) => {
                current.push_str(part);
                current.push(' ');
            }
            None => {
                current.push_str(trimmed);
                let (op, args) = current
                    .split_once(char::is_whitespace)
                    .unwrap_or((&current, ""));
                instructions.push((op.to_ascii_uppercase(), args.trim().to_owned()));
                current.clear();
            }
        }
    }
    instructions
}

struct Stage {
    image: String,
    name: Option<String>,
    instructions: Vec<(String, String)>,
}

fn stages(instructions: Vec<(String, String)>) -> Vec<Stage> {
    let mut stages: Vec<Stage> = Vec::new();
    for (op, args) in instructions {
        if op == "FROM" {
            let words: Vec<&str> = args.split_whitespace().collect();
            let name = match words.as_slice() {
                [_, as_, name] if as_.eq_ignore_ascii_case("as") => Some((*name).to_owned()),
                [_] => None,
                _ => panic!("FROM {args}"),
            };
            stages.push(Stage {
                image: words[0].to_owned(),
                name,
                instructions: Vec::new(),
            });
        } else {
            stages
                .last_mut()
                .expect("an instruction before FROM")
                .instructions
                .push((op, args));
        }
    }
    stages
}

#[test]
fn dockerfile_builds_the_binary_into_a_nonroot_image() {
    let stages = stages(dockerfile(&read("Dockerfile")));
    assert!(stages.len() >= 2, "a multi-stage build");
    let builder = &stages[0];
    assert_eq!(builder.image, "rust:1-bookworm");
    assert_eq!(builder.name.as_deref(), Some("builder"));
    let runs: Vec<&str> = builder
        .instructions
        .iter()
        .filter(|(op, _)| op == "RUN")
        .map(|(_, args)| args.as_str())
        .collect();
    assert!(
        runs.len() >= 2
            && runs
                .iter()
                .all(|r| r.contains("cargo build --release --locked")),
        "a dependency layer, then the real build: {runs:?}"
    );
    // The dependency layer stubs every target Cargo.toml declares, or cargo refuses it.
    let manifest: toml::Table =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml"))
            .unwrap()
            .parse()
            .unwrap();
    let benches: BTreeSet<&str> = manifest["bench"]
        .as_array()
        .expect("[[bench]]")
        .iter()
        .map(|b| b["name"].as_str().unwrap())
        .collect();
    let stubbed: BTreeSet<&str> = runs[0]
        .split("for bench in ")
        .nth(1)
        .and_then(|rest| rest.split(';').next())
        .expect("a `for bench in ...;` loop")
        .split_whitespace()
        .collect();
    assert_eq!(
        stubbed, benches,
        "the stubbed benches are Cargo.toml's [[bench]]es"
    );

    // Everything COPY takes from the context is let through by Dockerfile.dockerignore.
    let ignore = read("Dockerfile.dockerignore");
    let allowed: BTreeSet<&str> = ignore
        .lines()
        .filter_map(|l| l.trim().strip_prefix('!'))
        .map(|l| l.trim_end_matches('/'))
        .collect();
    assert!(
        ignore.lines().any(|l| l.trim() == "*"),
        "the ignore file allows a list"
    );
    for stage in &stages {
        for (op, args) in &stage.instructions {
            if op == "COPY" && !args.starts_with("--from") {
                let words: Vec<&str> = args.split_whitespace().collect();
                for source in &words[..words.len() - 1] {
                    assert!(
                        allowed.contains(source.trim_end_matches('/')),
                        "COPY {source}: left out by Dockerfile.dockerignore"
                    );
                }
            }
        }
    }

    let runtime = stages.last().unwrap();
    assert_ne!(runtime.image, "builder");
    let find = |op: &str| -> Vec<&str> {
        runtime
            .instructions
            .iter()
            .filter(|(o, _)| o == op)
            .map(|(_, a)| a.as_str())
            .collect()
    };
    let copied = find("COPY");
    let binary = copied
        .iter()
        .find(|c| c.starts_with("--from=builder") && c.contains("wsgate"))
        .expect("the binary copied from the builder");
    let installed = binary.split_whitespace().last().unwrap();
    let entrypoint = find("ENTRYPOINT");
    assert_eq!(entrypoint.len(), 1);
    assert!(
        entrypoint[0].contains(&format!("\"{installed}\"")),
        "ENTRYPOINT runs {installed}"
    );
    let user = find("USER");
    match user.last() {
        Some(user) => {
            let name = user.split(':').next().unwrap();
            assert!(name != "root" && name != "0", "USER {user} is root");
        }
        None => assert!(
            runtime.image.ends_with(":nonroot"),
            "no USER: a nonroot image"
        ),
    }
    assert_eq!(find("STOPSIGNAL"), ["SIGTERM"]);
    let exposed: BTreeSet<u64> = find("EXPOSE")
        .iter()
        .flat_map(|e| e.split_whitespace())
        .map(|p| p.trim_end_matches("/tcp").parse().expect("a port"))
        .collect();
    let config = toml_of(&read("config.container.toml"));
    let mut ports: BTreeSet<u64> = listeners(&config).iter().map(|(_, b)| port_of(b)).collect();
    ports.insert(port_of(config["admin"]["bind"].as_str().unwrap()));
    assert_eq!(exposed, ports, "EXPOSE the container config's ports");
    let cmd = find("CMD").join(" ");
    assert!(cmd.contains("\"--config\""), "CMD names the config: {cmd}");
}
