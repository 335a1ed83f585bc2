//! `kiln render --target k8s` and `kiln k8s …`, run as the real binary.
//! Every manifest rendered here passes `kubernetes-validate --strict` for
//! Kubernetes 1.37; the cluster is the FAKE API server of `fake_k8s` (no
//! real one runs here), reached through a kubeconfig.

use std::path::{Path, PathBuf};
use std::process::Output;

use expect_test::{Expect, expect};
use serde_json::json;

use crate::fake_k8s::{FakeApiServer, Reply, failure, labelled, list, namespace, pod, unlabelled, write_kubeconfig};
use crate::support::{assert_error, assert_success, kiln, repo_root};

fn assert_valid(yaml: &str) {
    kiln_testkit::assert_k8s_valid(yaml, kiln_k8s::KUBERNETES_VERSION);
}

fn example() -> PathBuf {
    repo_root().join("examples/hello/kiln.toml")
}

/// Writes `text` as `kiln.toml` (and a flat `keys/` tree beside it).
fn spec_file(dir: &Path, text: &str) -> PathBuf {
    std::fs::create_dir_all(dir.join("keys")).unwrap();
    std::fs::write(dir.join("keys/signer.key"), "not a real key\n").unwrap();
    let path = dir.join("kiln.toml");
    std::fs::write(&path, text).unwrap();
    path
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Renders, validates, and compares warnings + YAML with `expect`.
fn check_render(args: &[&str], expect: Expect) {
    let output = kiln(["render", "--target", "k8s"].iter().chain(args));
    let yaml = assert_success(&output);
    assert_valid(&yaml);
    expect.assert_eq(&format!("{}{yaml}", stderr(&output).lines().map(|l| format!("# {l}\n")).collect::<String>()));
}

#[test]
fn render_k8s_of_the_example() {
    check_render(
        &[example().to_str().unwrap(), "--host-address", "10.0.0.1"],
        expect![[r##"
        # warning: resources.storage: /mnt/data is an emptyDir with that size limit; it lasts as long as the Pod, not across runs like the VM's data disk
        # warning: network.publish tcp/8080:8080: port 8080 is the Service's port inside the cluster, not a port on a node
        apiVersion: v1
        kind: Secret
        data:
          api-token: ZGVtby1rZXktbm90LXNlY3JldDogYXBpIHRva2VuIGZvciB0aGUgaGVsbG8gZXhhbXBsZQo=
          db-password: ZGVtby1rZXktbm90LXNlY3JldAo=
          tls.key: >-
            LS0tLS1CRUdJTiBERU1PIEtFWSAoTk9UIFNFQ1JFVCktLS0tLQpkZW1vLWtleS1ub3Qtc2VjcmV0Ci0tLS0tRU5EIERFTU8gS0VZIChOT1QgU0VDUkVUKS0tLS0tCg==
        metadata:
          labels:
            app.kubernetes.io/managed-by: kiln
            kiln.dev/instance: hello
          name: hello-keystore
          namespace: default
        type: Opaque
        ---
        apiVersion: v1
        kind: Service
        metadata:
          labels:
            app.kubernetes.io/managed-by: kiln
            kiln.dev/instance: hello
          name: hello-host
          namespace: default
        spec:
          ports:
          - name: tcp-7000
            port: 7000
            protocol: TCP
            targetPort: 7000
        ---
        apiVersion: discovery.k8s.io/v1
        kind: EndpointSlice
        addressType: IPv4
        endpoints:
        - addresses:
          - "10.0.0.1"
          conditions:
            ready: true
        metadata:
          labels:
            app.kubernetes.io/managed-by: kiln
            endpointslice.kubernetes.io/managed-by: kiln.dev
            kiln.dev/instance: hello
            kubernetes.io/service-name: hello-host
          name: hello-host
          namespace: default
        ports:
        - name: tcp-7000
          port: 7000
          protocol: TCP
        ---
        apiVersion: v1
        kind: Service
        metadata:
          labels:
            app.kubernetes.io/managed-by: kiln
            kiln.dev/instance: hello
          name: hello
          namespace: default
        spec:
          ports:
          - name: tcp-8080
            port: 8080
            protocol: TCP
            targetPort: 8080
          selector:
            app.kubernetes.io/managed-by: kiln
            kiln.dev/instance: hello
        ---
        apiVersion: networking.k8s.io/v1
        kind: NetworkPolicy
        metadata:
          labels:
            app.kubernetes.io/managed-by: kiln
            kiln.dev/instance: hello
          name: hello
          namespace: default
        spec:
          egress:
          - ports:
            - port: 7000
              protocol: TCP
            to:
            - ipBlock:
                cidr: 10.0.0.1/32
          - ports:
            - port: 53
              protocol: UDP
            - port: 53
              protocol: TCP
            to:
            - namespaceSelector:
                matchLabels:
                  kubernetes.io/metadata.name: kube-system
              podSelector:
                matchLabels:
                  k8s-app: kube-dns
          ingress:
          - ports:
            - port: 8080
              protocol: TCP
          podSelector:
            matchLabels:
              app.kubernetes.io/managed-by: kiln
              kiln.dev/instance: hello
          policyTypes:
          - Ingress
          - Egress
        ---
        apiVersion: v1
        kind: Pod
        metadata:
          annotations:
            kiln.dev/name: hello
          labels:
            app.kubernetes.io/managed-by: kiln
            kiln.dev/instance: hello
          name: hello
          namespace: default
        spec:
          automountServiceAccountToken: false
          containers:
          - args:
            - --greeting
            - it's "quoted"; $(not run)
            env:
            - name: GREETING_STYLE
              value: warm
            - name: RPC_URL
              value: http://10.0.0.1:7000/rpc
            image: ghcr.io/kiln-example/hello-service:0.1
            name: service
            ports:
            - containerPort: 8080
              protocol: TCP
            resources:
              limits:
                cpu: "1"
                memory: 256Mi
              requests:
                cpu: "1"
                memory: 256Mi
            securityContext:
              allowPrivilegeEscalation: false
              capabilities:
                drop:
                - ALL
              readOnlyRootFilesystem: true
            volumeMounts:
            - mountPath: /srv/keystore
              name: keystore
              readOnly: true
            - mountPath: /mnt/data
              name: data
            - mountPath: /tmp
              name: tmp
          enableServiceLinks: false
          restartPolicy: Never
          securityContext:
            runAsNonRoot: true
            seccompProfile:
              type: RuntimeDefault
          volumes:
          - name: keystore
            secret:
              defaultMode: 256
              secretName: hello-keystore
          - emptyDir:
              sizeLimit: 64Mi
            name: data
          - emptyDir: {}
            name: tmp
    "##]],
    );
}

const EVERYTHING: &str = r#"
name = "signer"

[service]
image = "registry.example/signer@sha256:0123456789abcdef"
args = ["--listen", "0.0.0.0:9000"]
env = { RPC_URL = "http://localhost:8545", MODE = "strict" }
files = { keys = { path = "keys", secret = true } }

[resources]
cpus = 2
memory = "1GiB"
gpu = { count = 2, policy = "required", min_vram_gb = 24 }
confidentiality = "tee-required"

[network]
host_ports = [8545, "udp/53"]
publish = ["9000:9000"]

[vm]
vfio = ["0000:01:00.0"]

[kubernetes]
namespace = "signers"
node_selector = { pool = "secure" }
tolerations = [{ key = "dedicated", operator = "Equal", value = "signer", effect = "NoSchedule" }]
annotations = { team = "payments" }
labels = { tier = "backend" }
pull_secret = "regcred"
service_account = "signer"
files = "host-path"
security = { add_capabilities = ["NET_BIND_SERVICE"], run_as_user = 10001 }
"#;

const DEFAULTS: &str = r#"
namespace = "ignored-the-spec-names-one"
node_selector = { pool = "general", zone = "a" }
tolerations = [{ key = "kiln", operator = "Exists" }]
annotations = { owner = "platform" }
labels = { env = "prod" }
pull_secrets = ["mirror"]
host_address = "192.0.2.10"
tee_runtime_class = "kata-qemu-snp"
cluster_dns = false
"#;

/// Every policy at once, with the operator's defaults merged in.
#[test]
fn render_k8s_of_every_policy_with_operator_defaults() {
    let dir = tempfile::tempdir().unwrap();
    let spec = spec_file(dir.path(), EVERYTHING);
    let defaults = dir.path().join("defaults.toml");
    std::fs::write(&defaults, DEFAULTS).unwrap();
    let keys = dir.path().join("keys");
    let output = kiln(["render", "--target", "k8s", spec.to_str().unwrap(), "--defaults", defaults.to_str().unwrap()]);
    let yaml = assert_success(&output);
    assert_valid(&yaml);
    let shown = yaml.replace(keys.to_str().unwrap(), "<spec dir>/keys");
    let warnings = stderr(&output).replace(keys.to_str().unwrap(), "<spec dir>/keys");
    expect![[r##"
        # warning: network.publish tcp/9000:9000: port 9000 is the Service's port inside the cluster, not a port on a node
        # warning: vm.vfio has no Pod equivalent and is ignored
        # warning: rendered without a cluster: assumes it has RuntimeClass `kata-qemu-snp` (`kiln k8s apply` checks)
        # warning: mount `keys` is the node's directory `<spec dir>/keys`: the Pod only works on nodes that have it
        apiVersion: v1
        kind: Service
        metadata:
          labels:
            app.kubernetes.io/managed-by: kiln
            env: prod
            kiln.dev/instance: signer
            tier: backend
          name: signer-host
          namespace: signers
        spec:
          ports:
          - name: tcp-8545
            port: 8545
            protocol: TCP
            targetPort: 8545
          - name: udp-53
            port: 53
            protocol: UDP
            targetPort: 53
        ---
        apiVersion: discovery.k8s.io/v1
        kind: EndpointSlice
        addressType: IPv4
        endpoints:
        - addresses:
          - "192.0.2.10"
          conditions:
            ready: true
        metadata:
          labels:
            app.kubernetes.io/managed-by: kiln
            endpointslice.kubernetes.io/managed-by: kiln.dev
            env: prod
            kiln.dev/instance: signer
            kubernetes.io/service-name: signer-host
            tier: backend
          name: signer-host
          namespace: signers
        ports:
        - name: tcp-8545
          port: 8545
          protocol: TCP
        - name: udp-53
          port: 53
          protocol: UDP
        ---
        apiVersion: v1
        kind: Service
        metadata:
          labels:
            app.kubernetes.io/managed-by: kiln
            env: prod
            kiln.dev/instance: signer
            tier: backend
          name: signer
          namespace: signers
        spec:
          ports:
          - name: tcp-9000
            port: 9000
            protocol: TCP
            targetPort: 9000
          selector:
            app.kubernetes.io/managed-by: kiln
            kiln.dev/instance: signer
        ---
        apiVersion: networking.k8s.io/v1
        kind: NetworkPolicy
        metadata:
          labels:
            app.kubernetes.io/managed-by: kiln
            env: prod
            kiln.dev/instance: signer
            tier: backend
          name: signer
          namespace: signers
        spec:
          egress:
          - ports:
            - port: 8545
              protocol: TCP
            - port: 53
              protocol: UDP
            to:
            - ipBlock:
                cidr: 192.0.2.10/32
          ingress:
          - ports:
            - port: 9000
              protocol: TCP
          podSelector:
            matchLabels:
              app.kubernetes.io/managed-by: kiln
              kiln.dev/instance: signer
          policyTypes:
          - Ingress
          - Egress
        ---
        apiVersion: v1
        kind: Pod
        metadata:
          annotations:
            kiln.dev/name: signer
            owner: platform
            team: payments
          labels:
            app.kubernetes.io/managed-by: kiln
            env: prod
            kiln.dev/instance: signer
            tier: backend
          name: signer
          namespace: signers
        spec:
          affinity:
            nodeAffinity:
              requiredDuringSchedulingIgnoredDuringExecution:
                nodeSelectorTerms:
                - matchExpressions:
                  - key: nvidia.com/gpu.memory
                    operator: Gt
                    values:
                    - "24575"
          automountServiceAccountToken: true
          containers:
          - args:
            - --listen
            - 0.0.0.0:9000
            env:
            - name: MODE
              value: strict
            - name: RPC_URL
              value: http://192.0.2.10:8545
            image: registry.example/signer@sha256:0123456789abcdef
            name: service
            ports:
            - containerPort: 9000
              protocol: TCP
            resources:
              limits:
                cpu: "2"
                memory: 1Gi
                nvidia.com/gpu: "2"
              requests:
                cpu: "2"
                memory: 1Gi
            securityContext:
              allowPrivilegeEscalation: false
              capabilities:
                add:
                - NET_BIND_SERVICE
                drop:
                - ALL
              readOnlyRootFilesystem: true
            volumeMounts:
            - mountPath: /srv/keys
              name: keys
              readOnly: true
            - mountPath: /tmp
              name: tmp
          enableServiceLinks: false
          imagePullSecrets:
          - name: mirror
          - name: regcred
          nodeSelector:
            nvidia.com/gpu.present: "true"
            pool: secure
            zone: a
          restartPolicy: Never
          runtimeClassName: kata-qemu-snp
          securityContext:
            runAsNonRoot: true
            runAsUser: 10001
            seccompProfile:
              type: RuntimeDefault
          serviceAccountName: signer
          tolerations:
          - key: kiln
            operator: Exists
          - effect: NoSchedule
            key: dedicated
            operator: Equal
            value: signer
          - effect: NoSchedule
            key: nvidia.com/gpu
            operator: Exists
          volumes:
          - hostPath:
              path: <spec dir>/keys
              type: Directory
            name: keys
          - emptyDir: {}
            name: tmp
    "##]].assert_eq(&format!("{}{shown}", warnings.lines().map(|l| format!("# {l}\n")).collect::<String>()));
}

/// `--namespace` wins over the spec; the environment variable names the defaults.
#[test]
fn render_k8s_namespace_flag_and_defaults_from_the_environment() {
    let dir = tempfile::tempdir().unwrap();
    let defaults = dir.path().join("defaults.toml");
    std::fs::write(&defaults, "host_address = \"10.9.8.7\"\n").unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["render", "--target", "k8s", "-n", "team-a"])
        .arg(example())
        .env("KILN_K8S_DEFAULTS", &defaults)
        .output()
        .unwrap();
    let yaml = assert_success(&output);
    assert_valid(&yaml);
    assert!(yaml.contains("value: http://10.9.8.7:7000/rpc"), "{yaml}");
    assert_eq!(yaml.matches("namespace: team-a").count(), 6, "{yaml}");
}

/// Bad input: one clear error, nothing on stdout, before any cluster is asked.
#[test]
fn render_k8s_refuses_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let case = |name: &str, text: &str| {
        let case_dir = dir.path().join(name);
        spec_file(&case_dir, text)
    };
    let base = "name = \"web\"\n[service]\nimage = \"registry.example/web:1\"\n";
    let render = |spec: &Path, extra: &[&str]| {
        let mut args = vec!["render", "--target", "k8s", spec.to_str().unwrap()];
        args.extend_from_slice(extra);
        kiln(args)
    };
    let no_image = case("no-image", "name = \"web\"\n[service]\nbinary = \"web\"\n");
    assert_error(&render(&no_image, &[]), 1, "no service.image, which Kubernetes needs");
    let gpu = case("gpu", &format!("{base}[resources]\ngpu = {{ count = 0, policy = \"required\" }}\n"));
    assert_error(&render(&gpu, &[]), 1, "resources.gpu.policy is \"required\" but resources.gpu.count is 0");
    let bad_name = case("bad-name", "name = \"Web_1\"\n[service]\nimage = \"x\"\n");
    assert_error(&render(&bad_name, &[]), 1, "the name `Web_1` may only hold lowercase ASCII letters");
    let bad_namespace = case("bad-ns", &format!("{base}[kubernetes]\nnamespace = \"Prod\"\n"));
    assert_error(&render(&bad_namespace, &[]), 1, "kubernetes.namespace `Prod` is not a DNS label");
    let plain = case("plain", base);
    assert_error(&render(&plain, &["-n", "a.b"]), 1, "--namespace `a.b` is not a DNS label");
    let host_ports = case("host-ports", &format!("{base}[network]\nhost_ports = [7000]\n"));
    assert_error(&render(&host_ports, &[]), 1, "network.host_ports needs the host's address as Pods see it");
    let bad_toleration = case(
        "toleration",
        &format!(
            "{base}[kubernetes]\ntolerations = [{{ key = \"a\", operator = \"Exists\", effect = \"Sometimes\" }}]\n"
        ),
    );
    assert_error(&render(&bad_toleration, &[]), 1, "toleration effect `Sometimes` is not");
    let nested = case("nested", &format!("{base}[service.files]\nconf = {{ path = \"conf\" }}\n"));
    std::fs::create_dir_all(dir.path().join("nested/conf/sub")).unwrap();
    assert_error(&render(&nested, &[]), 1, "service.files.conf cannot go into a Pod");
    let huge = case("huge", &format!("{base}[service.files]\nblob = {{ path = \"blob\" }}\n"));
    std::fs::create_dir_all(dir.path().join("huge/blob")).unwrap();
    std::fs::write(dir.path().join("huge/blob/data"), vec![0u8; (1 << 20) + 1]).unwrap();
    assert_error(&render(&huge, &[]), 1, "more than the 1048576 bytes a Secret or ConfigMap can");
    // A socket (like a FIFO or a device) would block or never end if read.
    let socket = case("socket", &format!("{base}[service.files]\nrun = {{ path = \"run\" }}\n"));
    std::fs::create_dir_all(dir.path().join("socket/run")).unwrap();
    let _listener = std::os::unix::net::UnixListener::bind(dir.path().join("socket/run/agent.sock")).unwrap();
    assert_error(&render(&socket, &[]), 1, "agent.sock is not a regular file");
    let vm = kiln(["render", "--target", "vm", plain.to_str().unwrap(), "--host-address", "10.0.0.1"]);
    assert_error(&vm, 1, "--host-address are for --target k8s");
    let defaults = dir.path().join("bad-defaults.toml");
    std::fs::write(&defaults, "host_adress = \"10.0.0.1\"\n").unwrap();
    assert_error(&render(&plain, &["--defaults", defaults.to_str().unwrap()]), 1, "unknown field `host_adress`");
}

// --- the cluster commands, against the fake API server -------------------

fn kiln_k8s(server: &FakeApiServer, args: &[&str]) -> Output {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_kiln"));
    command.arg("k8s").args(args).arg("--kubeconfig").arg(server.kubeconfig());
    command.env_remove("KUBECONFIG").env_remove("KILN_K8S_DEFAULTS");
    command.output().unwrap()
}

fn running(name: &str, ns: &str) -> Reply {
    Reply::Json(
        200,
        pod(
            name,
            ns,
            json!({"phase": "Running", "podIP": "10.244.1.7",
                             "containerStatuses": [{"name": "service", "ready": true, "restartCount": 0,
                                                    "image": "x", "imageID": "", "state": {"running": {}}}]}),
        ),
    )
}

fn check_run(server: &FakeApiServer, output: &Output, expect: Expect) {
    server.assert_script_used();
    let code = output.status.code().unwrap_or(-1);
    expect.assert_eq(&format!(
        "{}\n=> exit {code}\n{}{}",
        server.transcript(),
        String::from_utf8_lossy(&output.stdout),
        stderr(output)
    ));
}

#[test]
fn fake_apiserver_cli_apply_waits_for_the_ip_then_status_logs_delete() {
    let server = FakeApiServer::start(vec![
        list("RuntimeClass", vec![]),
        list("EndpointSlice", vec![]),
        failure(404, "NotFound", "namespaces \"kiln-test\" not found"),
        Reply::Json(201, json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "kiln-test"}})),
        Reply::Echo,
        Reply::Echo,
        Reply::Echo,
        Reply::Echo,
        Reply::Echo,
        Reply::Echo,
        Reply::Json(200, pod("hello", "kiln-test", json!({"phase": "Pending"}))),
        running("hello", "kiln-test"),
    ]);
    let spec = example();
    let output = kiln_k8s(&server, &["apply", spec.to_str().unwrap(), "--host-address", "10.0.0.1"]);
    check_run(
        &server,
        &output,
        expect![[r#"
            GET /apis/node.k8s.io/v1/runtimeclasses?
            GET /apis/discovery.k8s.io/v1/namespaces/kiln-test/endpointslices?&limit=1
            GET /api/v1/namespaces/kiln-test
            POST /api/v1/namespaces?&fieldManager=kiln [application/json] {"apiVersion":"v1","kind":"Namespace","metadata":{"labels":{"app.kubernetes.io/managed-by":"kiln"},"name":"kiln-test"}}
            PATCH /api/v1/namespaces/kiln-test/secrets/hello-keystore?&fieldManager=kiln [application/apply-patch+yaml] <Secret/hello-keystore body #1>
            PATCH /api/v1/namespaces/kiln-test/services/hello-host?&fieldManager=kiln [application/apply-patch+yaml] <Service/hello-host body #2>
            PATCH /apis/discovery.k8s.io/v1/namespaces/kiln-test/endpointslices/hello-host?&fieldManager=kiln [application/apply-patch+yaml] <EndpointSlice/hello-host body #3>
            PATCH /api/v1/namespaces/kiln-test/services/hello?&fieldManager=kiln [application/apply-patch+yaml] <Service/hello body #4>
            PATCH /apis/networking.k8s.io/v1/namespaces/kiln-test/networkpolicies/hello?&fieldManager=kiln [application/apply-patch+yaml] <NetworkPolicy/hello body #5>
            PATCH /api/v1/namespaces/kiln-test/pods/hello?&fieldManager=kiln [application/apply-patch+yaml] <Pod/hello body #6>
            GET /api/v1/namespaces/kiln-test/pods/hello
            GET /api/v1/namespaces/kiln-test/pods/hello
            => exit 0
            kiln: hello runs as Pod hello in namespace kiln-test (IP 10.244.1.7)
                  logs: kiln k8s logs -n kiln-test -f hello; delete: kiln k8s delete -n kiln-test hello
            warning: resources.storage: /mnt/data is an emptyDir with that size limit; it lasts as long as the Pod, not across runs like the VM's data disk
            warning: network.publish tcp/8080:8080: port 8080 is the Service's port inside the cluster, not a port on a node
            kiln: applied Secret/hello-keystore
            kiln: applied Service/hello-host
            kiln: applied EndpointSlice/hello-host
            kiln: applied Service/hello
            kiln: applied NetworkPolicy/hello
            kiln: applied Pod/hello
        "#]],
    );
    // What was applied is what `kiln render` prints.
    let rendered = assert_success(&kiln([
        "render",
        "--target",
        "k8s",
        "-n",
        "kiln-test",
        spec.to_str().unwrap(),
        "--host-address",
        "10.0.0.1",
    ]));
    assert_valid(&rendered);
    let rendered: Vec<serde_json::Value> = serde_saphyr::from_multiple(&rendered).unwrap();
    assert_eq!(server.bodies()[1..], rendered[..]);

    let server = FakeApiServer::start(vec![running("hello", "kiln-test")]);
    let output = kiln_k8s(&server, &["status", "hello"]);
    check_run(
        &server,
        &output,
        expect![[r#"
        GET /api/v1/namespaces/kiln-test/pods/hello
        => exit 0
        hello: Running
          ip: 10.244.1.7
    "#]],
    );

    let server = FakeApiServer::start(vec![Reply::Text(200, "listening on :8080\nGET / 200\n")]);
    let output = kiln_k8s(&server, &["logs", "hello", "--tail", "2"]);
    check_run(
        &server,
        &output,
        expect![[r#"
        GET /api/v1/namespaces/kiln-test/pods/hello/log?&container=service&tailLines=2
        => exit 0
        listening on :8080
        GET / 200
    "#]],
    );

    let server = FakeApiServer::start(vec![Reply::Text(200, "listening on :8080\nbye\n")]);
    let output = kiln_k8s(&server, &["logs", "-f", "hello"]);
    check_run(
        &server,
        &output,
        expect![[r#"
        GET /api/v1/namespaces/kiln-test/pods/hello/log?&container=service&follow=true
        => exit 0
        listening on :8080
        bye
    "#]],
    );

    let labelled = |kind: &str, api_version: &str, name: &str| labelled(kind, api_version, name, "kiln-test", "hello");
    let server = FakeApiServer::start(vec![
        list("Pod", vec![pod("hello", "kiln-test", json!({"phase": "Running"}))]),
        Reply::Json(200, pod("hello", "kiln-test", json!({"phase": "Running"}))),
        list("NetworkPolicy", vec![labelled("NetworkPolicy", "networking.k8s.io/v1", "hello")]),
        Reply::Json(200, labelled("NetworkPolicy", "networking.k8s.io/v1", "hello")),
        list("Service", vec![labelled("Service", "v1", "hello"), labelled("Service", "v1", "hello-host")]),
        Reply::Json(200, labelled("Service", "v1", "hello")),
        failure(404, "NotFound", "services \"hello-host\" not found"),
        list("EndpointSlice", vec![]),
        failure(404, "NotFound", "the server could not find the requested resource"),
        list("Secret", vec![labelled("Secret", "v1", "hello-keystore")]),
        Reply::Json(200, labelled("Secret", "v1", "hello-keystore")),
        list("ConfigMap", vec![]),
    ]);
    let output = kiln_k8s(&server, &["delete", "hello", "-n", "kiln-test"]);
    check_run(
        &server,
        &output,
        expect![[r#"
            GET /api/v1/namespaces/kiln-test/pods?&labelSelector=app.kubernetes.io%2Fmanaged-by%3Dkiln%2Ckiln.dev%2Finstance%3Dhello
            DELETE /api/v1/namespaces/kiln-test/pods/hello? [application/json] {"preconditions":{"uid":"uid-pod-hello"}}
            GET /apis/networking.k8s.io/v1/namespaces/kiln-test/networkpolicies?&labelSelector=app.kubernetes.io%2Fmanaged-by%3Dkiln%2Ckiln.dev%2Finstance%3Dhello
            DELETE /apis/networking.k8s.io/v1/namespaces/kiln-test/networkpolicies/hello? [application/json] {"preconditions":{"uid":"uid-networkpolicy-hello"}}
            GET /api/v1/namespaces/kiln-test/services?&labelSelector=app.kubernetes.io%2Fmanaged-by%3Dkiln%2Ckiln.dev%2Finstance%3Dhello
            DELETE /api/v1/namespaces/kiln-test/services/hello? [application/json] {"preconditions":{"uid":"uid-service-hello"}}
            DELETE /api/v1/namespaces/kiln-test/services/hello-host? [application/json] {"preconditions":{"uid":"uid-service-hello-host"}}
            GET /apis/discovery.k8s.io/v1/namespaces/kiln-test/endpointslices?&labelSelector=app.kubernetes.io%2Fmanaged-by%3Dkiln%2Ckiln.dev%2Finstance%3Dhello
            GET /api/v1/namespaces/kiln-test/endpoints?&labelSelector=app.kubernetes.io%2Fmanaged-by%3Dkiln%2Ckiln.dev%2Finstance%3Dhello
            GET /api/v1/namespaces/kiln-test/secrets?&labelSelector=app.kubernetes.io%2Fmanaged-by%3Dkiln%2Ckiln.dev%2Finstance%3Dhello
            DELETE /api/v1/namespaces/kiln-test/secrets/hello-keystore? [application/json] {"preconditions":{"uid":"uid-secret-hello-keystore"}}
            GET /api/v1/namespaces/kiln-test/configmaps?&labelSelector=app.kubernetes.io%2Fmanaged-by%3Dkiln%2Ckiln.dev%2Finstance%3Dhello
            => exit 0
            kiln: deleted Pod/hello
            kiln: deleted NetworkPolicy/hello
            kiln: deleted Service/hello
            kiln: deleted Secret/hello-keystore
        "#]],
    );
}

#[test]
fn fake_apiserver_cli_tee_required_without_kata_applies_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let spec = spec_file(
        dir.path(),
        "name = \"vault\"\n[service]\nimage = \"registry.example/vault:1\"\n[resources]\nconfidentiality = \"tee-required\"\n",
    );
    let runc = json!({"apiVersion": "node.k8s.io/v1", "kind": "RuntimeClass", "metadata": {"name": "runc"}, "handler": "runc"});
    let server = FakeApiServer::start(vec![list("RuntimeClass", vec![runc]), list("EndpointSlice", vec![])]);
    let output = kiln_k8s(&server, &["apply", spec.to_str().unwrap()]);
    check_run(
        &server,
        &output,
        expect![[r#"
        GET /apis/node.k8s.io/v1/runtimeclasses?
        GET /apis/discovery.k8s.io/v1/namespaces/kiln-test/endpointslices?&limit=1
        => exit 1
        error: workload `vault` requires a TEE, but the cluster has no RuntimeClass `kata` (it has: runc)
    "#]],
    );
}

#[test]
fn fake_apiserver_cli_stops_at_a_server_error() {
    let dir = tempfile::tempdir().unwrap();
    let spec = spec_file(dir.path(), "name = \"web\"\n[service]\nimage = \"registry.example/web:1\"\n");
    let server = FakeApiServer::start(vec![
        list("RuntimeClass", vec![]),
        list("EndpointSlice", vec![]),
        namespace("kiln-test"),
        not_found("networkpolicies \"web\""),
        not_found("pods \"web\""),
        failure(500, "InternalError", "etcdserver: request timed out"),
    ]);
    let output = kiln_k8s(&server, &["apply", spec.to_str().unwrap(), "--no-wait"]);
    check_run(
        &server,
        &output,
        expect![[r#"
            GET /apis/node.k8s.io/v1/runtimeclasses?
            GET /apis/discovery.k8s.io/v1/namespaces/kiln-test/endpointslices?&limit=1
            GET /api/v1/namespaces/kiln-test
            GET /apis/networking.k8s.io/v1/namespaces/kiln-test/networkpolicies/web [application/json]
            GET /api/v1/namespaces/kiln-test/pods/web [application/json]
            PATCH /apis/networking.k8s.io/v1/namespaces/kiln-test/networkpolicies/web?&fieldManager=kiln [application/apply-patch+yaml] <NetworkPolicy/web body #0>
            => exit 1
            error: apply NetworkPolicy/web in namespace kiln-test failed: the API server answered 500 InternalError: etcdserver: request timed out
        "#]],
    );
}

fn not_found(what: &str) -> Reply {
    failure(404, "NotFound", &format!("{what} not found"))
}

/// `web` publishing 8080: Service/web, NetworkPolicy/web, Pod/web.
fn published_web(dir: &Path) -> PathBuf {
    spec_file(
        dir,
        "name = \"web\"\n[service]\nimage = \"registry.example/web:1\"\n[network]\npublish = [\"8080:80\"]\n",
    )
}

/// Someone else's Service named `web`, with a label of theirs.
fn foreign_service() -> serde_json::Value {
    let mut service = unlabelled("Service", "v1", "web", "kiln-test");
    service["metadata"]["labels"] = json!({"app": "legacy"});
    service["spec"] = json!({"ports": [{"port": 5432}]});
    service
}

/// The fake's answers while `apply` checks `web`'s three objects, the
/// Service being `service`.
fn checked_with(service: serde_json::Value) -> Vec<Reply> {
    vec![
        list("RuntimeClass", vec![]),
        list("EndpointSlice", vec![]),
        namespace("kiln-test"),
        Reply::Json(200, service),
        not_found("networkpolicies \"web\""),
        not_found("pods \"web\""),
    ]
}

#[test]
fn fake_apiserver_cli_apply_refuses_a_foreign_service_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let spec = published_web(dir.path());
    let server = FakeApiServer::start(checked_with(foreign_service()));
    let output = kiln_k8s(&server, &["apply", spec.to_str().unwrap(), "--no-wait"]);
    check_run(
        &server,
        &output,
        expect![[r#"
        GET /apis/node.k8s.io/v1/runtimeclasses?
        GET /apis/discovery.k8s.io/v1/namespaces/kiln-test/endpointslices?&limit=1
        GET /api/v1/namespaces/kiln-test
        GET /api/v1/namespaces/kiln-test/services/web [application/json]
        GET /apis/networking.k8s.io/v1/namespaces/kiln-test/networkpolicies/web [application/json]
        GET /api/v1/namespaces/kiln-test/pods/web [application/json]
        => exit 1
        warning: network.publish tcp/8080:80: port 8080 is the Service's port inside the cluster, not a port on a node
        error: Service/web (labels: app=legacy) exists in namespace `kiln-test` and does not belong to kiln instance `web`; nothing was applied; `kiln k8s apply --adopt` takes it over
    "#]],
    );
    assert!(server.bodies().is_empty(), "apply sent a body: {:?}", server.bodies());
}

#[test]
fn fake_apiserver_cli_apply_refuses_an_object_of_another_kiln_instance() {
    // `web`'s host Service is `web-host`, as is the published-port Service
    // of an instance named `web-host`.
    let dir = tempfile::tempdir().unwrap();
    let spec = spec_file(
        dir.path(),
        "name = \"web\"\n[service]\nimage = \"registry.example/web:1\"\n[network]\nhost_ports = [7000]\n",
    );
    let server = FakeApiServer::start(vec![
        list("RuntimeClass", vec![]),
        list("EndpointSlice", vec![]),
        namespace("kiln-test"),
        Reply::Json(200, labelled("Service", "v1", "web-host", "kiln-test", "web-host")),
        not_found("endpointslices \"web-host\""),
        not_found("networkpolicies \"web\""),
        not_found("pods \"web\""),
    ]);
    let output = kiln_k8s(&server, &["apply", spec.to_str().unwrap(), "--host-address", "10.0.0.1", "--no-wait"]);
    check_run(
        &server,
        &output,
        expect![[r#"
        GET /apis/node.k8s.io/v1/runtimeclasses?
        GET /apis/discovery.k8s.io/v1/namespaces/kiln-test/endpointslices?&limit=1
        GET /api/v1/namespaces/kiln-test
        GET /api/v1/namespaces/kiln-test/services/web-host [application/json]
        GET /apis/discovery.k8s.io/v1/namespaces/kiln-test/endpointslices/web-host [application/json]
        GET /apis/networking.k8s.io/v1/namespaces/kiln-test/networkpolicies/web [application/json]
        GET /api/v1/namespaces/kiln-test/pods/web [application/json]
        => exit 1
        error: Service/web-host (labelled for kiln instance `web-host`) exists in namespace `kiln-test` and does not belong to kiln instance `web`; nothing was applied; `kiln k8s apply --adopt` takes it over
    "#]],
    );
}

#[test]
fn fake_apiserver_cli_apply_adopt_takes_over_the_foreign_service() {
    let dir = tempfile::tempdir().unwrap();
    let spec = published_web(dir.path());
    let mut replies = checked_with(foreign_service());
    replies.extend([Reply::Echo, Reply::Echo, Reply::Echo]);
    let server = FakeApiServer::start(replies);
    let output = kiln_k8s(&server, &["apply", spec.to_str().unwrap(), "--no-wait", "--adopt"]);
    check_run(
        &server,
        &output,
        expect![[r#"
        GET /apis/node.k8s.io/v1/runtimeclasses?
        GET /apis/discovery.k8s.io/v1/namespaces/kiln-test/endpointslices?&limit=1
        GET /api/v1/namespaces/kiln-test
        GET /api/v1/namespaces/kiln-test/services/web [application/json]
        GET /apis/networking.k8s.io/v1/namespaces/kiln-test/networkpolicies/web [application/json]
        GET /api/v1/namespaces/kiln-test/pods/web [application/json]
        PATCH /api/v1/namespaces/kiln-test/services/web?&force=true&fieldManager=kiln [application/apply-patch+yaml] <Service/web body #0>
        PATCH /apis/networking.k8s.io/v1/namespaces/kiln-test/networkpolicies/web?&fieldManager=kiln [application/apply-patch+yaml] <NetworkPolicy/web body #1>
        PATCH /api/v1/namespaces/kiln-test/pods/web?&fieldManager=kiln [application/apply-patch+yaml] <Pod/web body #2>
        => exit 0
        kiln: web applied as Pod web in namespace kiln-test
              logs: kiln k8s logs -n kiln-test -f web; delete: kiln k8s delete -n kiln-test web
        warning: network.publish tcp/8080:80: port 8080 is the Service's port inside the cluster, not a port on a node
        kiln: applied Service/web (adopted)
        kiln: applied NetworkPolicy/web
        kiln: applied Pod/web
    "#]],
    );
    // The Service is applied as kiln renders it: with kiln's labels, so
    // `delete` and `gc` find it from now on.
    let service = &server.bodies()[0];
    assert_eq!(service["kind"], "Service");
    let labels = &service["metadata"]["labels"];
    assert_eq!(
        (&labels["app.kubernetes.io/managed-by"], &labels["kiln.dev/instance"]),
        (&json!("kiln"), &json!("web"))
    );
}

#[test]
fn fake_apiserver_cli_delete_leaves_the_foreign_service_and_pod() {
    // This fake ignores label selectors and lists the foreign Service and a
    // foreign Pod named `web` anyway: kiln must still send no DELETE.
    let mut foreign_pod = unlabelled("Pod", "v1", "web", "kiln-test");
    foreign_pod["spec"] = json!({"containers": [{"name": "main", "image": "x"}]});
    let server = FakeApiServer::start(vec![
        list("Pod", vec![foreign_pod]),
        list("NetworkPolicy", vec![]),
        list("Service", vec![foreign_service()]),
        list("EndpointSlice", vec![]),
        list("Endpoints", vec![]),
        list("Secret", vec![]),
        list("ConfigMap", vec![]),
    ]);
    let output = kiln_k8s(&server, &["delete", "web"]);
    check_run(
        &server,
        &output,
        expect![[r#"
        GET /api/v1/namespaces/kiln-test/pods?&labelSelector=app.kubernetes.io%2Fmanaged-by%3Dkiln%2Ckiln.dev%2Finstance%3Dweb
        GET /apis/networking.k8s.io/v1/namespaces/kiln-test/networkpolicies?&labelSelector=app.kubernetes.io%2Fmanaged-by%3Dkiln%2Ckiln.dev%2Finstance%3Dweb
        GET /api/v1/namespaces/kiln-test/services?&labelSelector=app.kubernetes.io%2Fmanaged-by%3Dkiln%2Ckiln.dev%2Finstance%3Dweb
        GET /apis/discovery.k8s.io/v1/namespaces/kiln-test/endpointslices?&labelSelector=app.kubernetes.io%2Fmanaged-by%3Dkiln%2Ckiln.dev%2Finstance%3Dweb
        GET /api/v1/namespaces/kiln-test/endpoints?&labelSelector=app.kubernetes.io%2Fmanaged-by%3Dkiln%2Ckiln.dev%2Finstance%3Dweb
        GET /api/v1/namespaces/kiln-test/secrets?&labelSelector=app.kubernetes.io%2Fmanaged-by%3Dkiln%2Ckiln.dev%2Finstance%3Dweb
        GET /api/v1/namespaces/kiln-test/configmaps?&labelSelector=app.kubernetes.io%2Fmanaged-by%3Dkiln%2Ckiln.dev%2Finstance%3Dweb
        => exit 0
        kiln: nothing of kiln's named web in namespace kiln-test
    "#]],
    );
    assert!(!server.transcript().contains("DELETE"), "a DELETE was sent");
}

#[test]
fn fake_apiserver_cli_status_of_a_missing_pod_ps_and_gc() {
    let server = FakeApiServer::start(vec![failure(404, "NotFound", "pods \"gone\" not found")]);
    let output = kiln_k8s(&server, &["status", "gone"]);
    check_run(
        &server,
        &output,
        expect![[r#"
        GET /api/v1/namespaces/kiln-test/pods/gone
        => exit 1
        error: Pod `gone` does not exist in namespace `kiln-test`
    "#]],
    );

    let ended = pod("batch", "kiln-test", json!({"phase": "Succeeded"}));
    let server = FakeApiServer::start(vec![list(
        "Pod",
        vec![ended.clone(), pod("web", "kiln-test", json!({"phase": "Running", "podIP": "10.244.0.9"}))],
    )]);
    let output = kiln_k8s(&server, &["ps"]);
    check_run(
        &server,
        &output,
        expect![[r#"
        GET /api/v1/namespaces/kiln-test/pods?&labelSelector=app.kubernetes.io%2Fmanaged-by%3Dkiln
        => exit 0
        NAME                                     STATE                    IP
        batch                                    Succeeded                -
        web                                      Running                  10.244.0.9
    "#]],
    );

    let server = FakeApiServer::start(vec![
        list("Pod", vec![ended.clone()]),
        list("Service", vec![]),
        list("NetworkPolicy", vec![]),
        list("Secret", vec![]),
        list("ConfigMap", vec![]),
        list("Pod", vec![ended.clone()]),
        Reply::Json(200, ended),
        list("NetworkPolicy", vec![]),
        list("Service", vec![]),
        list("EndpointSlice", vec![]),
        list("Endpoints", vec![]),
        list("Secret", vec![]),
        list("ConfigMap", vec![]),
    ]);
    let output = kiln_k8s(&server, &["gc"]);
    check_run(
        &server,
        &output,
        expect![[r#"
            GET /api/v1/namespaces/kiln-test/pods?&labelSelector=app.kubernetes.io%2Fmanaged-by%3Dkiln
            GET /api/v1/namespaces/kiln-test/services?&labelSelector=app.kubernetes.io%2Fmanaged-by%3Dkiln
            GET /apis/networking.k8s.io/v1/namespaces/kiln-test/networkpolicies?&labelSelector=app.kubernetes.io%2Fmanaged-by%3Dkiln
            GET /api/v1/namespaces/kiln-test/secrets?&labelSelector=app.kubernetes.io%2Fmanaged-by%3Dkiln
            GET /api/v1/namespaces/kiln-test/configmaps?&labelSelector=app.kubernetes.io%2Fmanaged-by%3Dkiln
            GET /api/v1/namespaces/kiln-test/pods?&labelSelector=app.kubernetes.io%2Fmanaged-by%3Dkiln%2Ckiln.dev%2Finstance%3Dbatch
            DELETE /api/v1/namespaces/kiln-test/pods/batch? [application/json] {"preconditions":{"uid":"uid-pod-batch"}}
            GET /apis/networking.k8s.io/v1/namespaces/kiln-test/networkpolicies?&labelSelector=app.kubernetes.io%2Fmanaged-by%3Dkiln%2Ckiln.dev%2Finstance%3Dbatch
            GET /api/v1/namespaces/kiln-test/services?&labelSelector=app.kubernetes.io%2Fmanaged-by%3Dkiln%2Ckiln.dev%2Finstance%3Dbatch
            GET /apis/discovery.k8s.io/v1/namespaces/kiln-test/endpointslices?&labelSelector=app.kubernetes.io%2Fmanaged-by%3Dkiln%2Ckiln.dev%2Finstance%3Dbatch
            GET /api/v1/namespaces/kiln-test/endpoints?&labelSelector=app.kubernetes.io%2Fmanaged-by%3Dkiln%2Ckiln.dev%2Finstance%3Dbatch
            GET /api/v1/namespaces/kiln-test/secrets?&labelSelector=app.kubernetes.io%2Fmanaged-by%3Dkiln%2Ckiln.dev%2Finstance%3Dbatch
            GET /api/v1/namespaces/kiln-test/configmaps?&labelSelector=app.kubernetes.io%2Fmanaged-by%3Dkiln%2Ckiln.dev%2Finstance%3Dbatch
            => exit 0
            kiln: deleted batch and its objects
        "#]],
    );
}

#[test]
fn unreachable_cluster_is_one_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    // A port nobody listens on: bound, then released.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let kubeconfig = dir.path().join("kubeconfig");
    write_kubeconfig(&kubeconfig, &format!("http://127.0.0.1:{port}"));
    let spec = spec_file(dir.path(), "name = \"web\"\n[service]\nimage = \"registry.example/web:1\"\n");
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["k8s", "apply"])
        .arg(&spec)
        .arg("--kubeconfig")
        .arg(&kubeconfig)
        .output()
        .unwrap();
    assert_error(&output, 1, "cannot reach the Kubernetes API server to list RuntimeClasses");
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["k8s", "status", "web", "--context", "nonexistent"])
        .arg("--kubeconfig")
        .arg(&kubeconfig)
        .output()
        .unwrap();
    assert_error(&output, 1, "cannot load the Kubernetes configuration for context `nonexistent`");
}
