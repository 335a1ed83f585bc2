//! The builders, one expect-test per policy combination. Every manifest
//! rendered here also passes `kubernetes-validate --strict` and reads back
//! (YAML → objects) equal to what was built.

use std::collections::BTreeMap;
use std::net::IpAddr;

use expect_test::{Expect, expect};
use kiln_k8s::{
    Confidentiality, DataVolume, Firewall, Gpu, GpuPolicy, HostPort, KubernetesOptions, Manifests, Mount, MountSource,
    PodSecurity, Protocol, PublishedPort, Resources, Target, Toleration, Workload, is_dns_label, render,
};
use proptest::prelude::*;

use crate::validate::assert_valid;
use crate::with;

const MIB: u64 = 1 << 20;

fn workload() -> Workload {
    Workload::new("rpc-client", "ghcr.io/example/rpc-client:1.4.2")
}

fn target() -> Target {
    Target { host_address: Some(IpAddr::from([10, 0, 0, 1])), ..Target::default() }
}

fn with_gpu(policy: GpuPolicy, count: u32, min_vram_gib: Option<u32>) -> Workload {
    with(workload(), |it| {
        it.resources = with(Resources::default(), |it| it.gpu = Some(Gpu { count, policy, min_vram_gb: min_vram_gib }))
    })
}

/// Renders, validates against the schema, reads the YAML back and
/// compares it with the objects built.
fn render_checked(workload: &Workload, target: &Target) -> Manifests {
    let manifests = render(workload, target).unwrap_or_else(|err| panic!("render failed: {err}"));
    let yaml = manifests.to_yaml().expect("render YAML");
    assert_valid(&yaml);
    assert_round_trip(&manifests, &yaml);
    for object in manifests.objects() {
        let name = object.describe();
        let name = name.split_once('/').expect("Kind/name").1;
        assert!(is_dns_label(name), "{name} is not a DNS label");
    }
    manifests
}

fn assert_round_trip(manifests: &Manifests, yaml: &str) {
    let read_back: Vec<serde_json::Value> = serde_saphyr::from_multiple(yaml).expect("the YAML stream parses");
    let built: Vec<serde_json::Value> = manifests.objects().into_iter().map(kiln_k8s::Object::to_json).collect();
    assert_eq!(read_back, built, "YAML does not read back as the objects built");
}

fn warnings(manifests: &Manifests) -> String {
    manifests.warnings.iter().map(|w| format!("# warning: {w}\n")).collect()
}

/// Every object, as `kiln render --target k8s` prints them.
fn check(workload: &Workload, target: &Target, expect: Expect) {
    let manifests = render_checked(workload, target);
    expect.assert_eq(&format!("{}{}", warnings(&manifests), manifests.to_yaml().expect("YAML")));
}

/// Only what scheduling policy decides: the Pod's node selector, affinity,
/// tolerations, RuntimeClass and the container's resources.
fn check_scheduling(workload: &Workload, target: &Target, expect: Expect) {
    let manifests = render_checked(workload, target);
    let pod = serde_json::to_value(&manifests.pod).expect("Pod serializes");
    let spec = &pod["spec"];
    let mut picked = serde_json::Map::new();
    for key in ["nodeSelector", "affinity", "tolerations", "runtimeClassName"] {
        if !spec[key].is_null() {
            picked.insert(key.to_owned(), spec[key].clone());
        }
    }
    if !spec["containers"][0]["resources"].is_null() {
        picked.insert("resources".to_owned(), spec["containers"][0]["resources"].clone());
    }
    let yaml = serde_saphyr::to_string(&picked).expect("YAML");
    expect.assert_eq(&format!("{}{yaml}", warnings(&manifests)));
}

/// One object kind's part of the output, by `Kind/name` prefix.
fn check_objects(workload: &Workload, target: &Target, kinds: &[&str], expect: Expect) {
    let manifests = render_checked(workload, target);
    let mut out = warnings(&manifests);
    for object in manifests.objects() {
        let name = object.describe();
        if kinds.iter().any(|kind| name.starts_with(&format!("{kind}/"))) {
            out.push_str(&object.to_yaml().expect("YAML"));
            out.push_str("---\n");
        }
    }
    expect.assert_eq(&out);
}

fn check_error(workload: &Workload, target: &Target, expect: Expect) {
    match render(workload, target) {
        Ok(_) => panic!("rendered, expected an error"),
        Err(err) => expect.assert_eq(&crate::chain(&err)),
    }
}

#[test]
fn minimal_workload() {
    check(
        &workload(),
        &Target::default(),
        expect![[r#"
        apiVersion: networking.k8s.io/v1
        kind: NetworkPolicy
        metadata:
          labels:
            app.kubernetes.io/managed-by: kiln
            kiln.dev/instance: rpc-client
          name: rpc-client
          namespace: default
        spec:
          egress:
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
          podSelector:
            matchLabels:
              app.kubernetes.io/managed-by: kiln
              kiln.dev/instance: rpc-client
          policyTypes:
          - Ingress
          - Egress
        ---
        apiVersion: v1
        kind: Pod
        metadata:
          annotations:
            kiln.dev/name: rpc-client
          labels:
            app.kubernetes.io/managed-by: kiln
            kiln.dev/instance: rpc-client
          name: rpc-client
          namespace: default
        spec:
          automountServiceAccountToken: false
          containers:
          - image: ghcr.io/example/rpc-client:1.4.2
            name: service
            securityContext:
              allowPrivilegeEscalation: false
              capabilities:
                drop:
                - ALL
              readOnlyRootFilesystem: true
            volumeMounts:
            - mountPath: /tmp
              name: tmp
          enableServiceLinks: false
          restartPolicy: Never
          securityContext:
            runAsNonRoot: true
            seccompProfile:
              type: RuntimeDefault
          volumes:
          - emptyDir: {}
            name: tmp
    "#]],
    );
}

#[test]
fn full_workload() {
    let workload = with(workload(), |it| {
        it.args = vec!["--listen".to_owned(), "0.0.0.0:8080".to_owned()];
        it.env = vec![
            ("RUST_LOG".to_owned(), "info".to_owned()),
            ("RPC_URL".to_owned(), "http://127.0.0.1:8545/v1?x=1".to_owned()),
        ];
        it.mounts = vec![
            Mount {
                name: "keystore".to_owned(),
                mount_path: "/run/keystore".to_owned(),
                source: MountSource::Files {
                    files: [("key.json".to_owned(), b"{\"k\":1}".to_vec())].into(),
                    secret: true,
                },
            },
            Mount {
                name: "config".to_owned(),
                mount_path: "/etc/rpc-client".to_owned(),
                source: MountSource::Files {
                    files: [
                        ("client.toml".to_owned(), b"port = 8080\n".to_vec()),
                        ("blob.bin".to_owned(), vec![0, 159, 146, 150]),
                    ]
                    .into(),
                    secret: false,
                },
            },
        ];
        it.resources = with(Resources::default(), |it| {
            it.millicpus = Some(1500);
            it.memory_bytes = Some(512 * MIB);
            it.gpu = None;
        });
        it.firewall = Firewall {
            egress: false,
            host_ports: vec![HostPort { protocol: Protocol::Tcp, port: 8545 }],
            published_ports: vec![PublishedPort { protocol: Protocol::Tcp, host_port: 8080, guest_port: 80 }],
        };
    });
    check(
        &workload,
        &target(),
        expect![[r#"
        apiVersion: v1
        kind: Secret
        data:
          key.json: eyJrIjoxfQ==
        metadata:
          labels:
            app.kubernetes.io/managed-by: kiln
            kiln.dev/instance: rpc-client
          name: rpc-client-keystore
          namespace: default
        type: Opaque
        ---
        apiVersion: v1
        kind: ConfigMap
        binaryData:
          blob.bin: AJ+Slg==
        data:
          client.toml: |
            port = 8080
        metadata:
          labels:
            app.kubernetes.io/managed-by: kiln
            kiln.dev/instance: rpc-client
          name: rpc-client-config
          namespace: default
        ---
        apiVersion: v1
        kind: Service
        metadata:
          labels:
            app.kubernetes.io/managed-by: kiln
            kiln.dev/instance: rpc-client
          name: rpc-client-host
          namespace: default
        spec:
          ports:
          - name: tcp-8545
            port: 8545
            protocol: TCP
            targetPort: 8545
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
            kiln.dev/instance: rpc-client
            kubernetes.io/service-name: rpc-client-host
          name: rpc-client-host
          namespace: default
        ports:
        - name: tcp-8545
          port: 8545
          protocol: TCP
        ---
        apiVersion: v1
        kind: Service
        metadata:
          labels:
            app.kubernetes.io/managed-by: kiln
            kiln.dev/instance: rpc-client
          name: rpc-client
          namespace: default
        spec:
          ports:
          - name: tcp-8080
            port: 8080
            protocol: TCP
            targetPort: 80
          selector:
            app.kubernetes.io/managed-by: kiln
            kiln.dev/instance: rpc-client
        ---
        apiVersion: networking.k8s.io/v1
        kind: NetworkPolicy
        metadata:
          labels:
            app.kubernetes.io/managed-by: kiln
            kiln.dev/instance: rpc-client
          name: rpc-client
          namespace: default
        spec:
          egress:
          - ports:
            - port: 8545
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
            - port: 80
              protocol: TCP
          podSelector:
            matchLabels:
              app.kubernetes.io/managed-by: kiln
              kiln.dev/instance: rpc-client
          policyTypes:
          - Ingress
          - Egress
        ---
        apiVersion: v1
        kind: Pod
        metadata:
          annotations:
            kiln.dev/name: rpc-client
          labels:
            app.kubernetes.io/managed-by: kiln
            kiln.dev/instance: rpc-client
          name: rpc-client
          namespace: default
        spec:
          automountServiceAccountToken: false
          containers:
          - args:
            - --listen
            - 0.0.0.0:8080
            env:
            - name: RUST_LOG
              value: info
            - name: RPC_URL
              value: http://10.0.0.1:8545/v1?x=1
            image: ghcr.io/example/rpc-client:1.4.2
            name: service
            ports:
            - containerPort: 80
              protocol: TCP
            resources:
              limits:
                cpu: 1500m
                memory: 512Mi
              requests:
                cpu: 1500m
                memory: 512Mi
            securityContext:
              allowPrivilegeEscalation: false
              capabilities:
                drop:
                - ALL
              readOnlyRootFilesystem: true
            volumeMounts:
            - mountPath: /run/keystore
              name: keystore
              readOnly: true
            - mountPath: /etc/rpc-client
              name: config
              readOnly: true
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
              secretName: rpc-client-keystore
          - configMap:
              defaultMode: 292
              name: rpc-client-config
            name: config
          - emptyDir: {}
            name: tmp
    "#]],
    );
}

#[test]
fn gpu_required_with_min_vram() {
    check_scheduling(
        &with_gpu(GpuPolicy::Required, 2, Some(40)),
        &target(),
        expect![[r#"
            affinity:
              nodeAffinity:
                requiredDuringSchedulingIgnoredDuringExecution:
                  nodeSelectorTerms:
                  - matchExpressions:
                    - key: nvidia.com/gpu.memory
                      operator: Gt
                      values:
                      - "40959"
            nodeSelector:
              nvidia.com/gpu.present: "true"
            resources:
              limits:
                nvidia.com/gpu: "2"
            tolerations:
            - effect: NoSchedule
              key: nvidia.com/gpu
              operator: Exists
        "#]],
    );
}

#[test]
fn gpu_required_without_min_vram() {
    check_scheduling(
        &with_gpu(GpuPolicy::Required, 1, None),
        &target(),
        expect![[r#"
            nodeSelector:
              nvidia.com/gpu.present: "true"
            resources:
              limits:
                nvidia.com/gpu: "1"
            tolerations:
            - effect: NoSchedule
              key: nvidia.com/gpu
              operator: Exists
        "#]],
    );
}

#[test]
fn gpu_preferred_falls_back_to_cpu() {
    check_scheduling(
        &with_gpu(GpuPolicy::Preferred, 1, Some(16)),
        &target(),
        expect![[r##"
        # warning: GPU preferred: the Pod is steered to GPU nodes (weight 80) but requests no `nvidia.com/gpu`, so it can start on a CPU node; the device plugin hands GPUs only to Pods that request them, so use `required` to be given one
        affinity:
          nodeAffinity:
            preferredDuringSchedulingIgnoredDuringExecution:
            - preference:
                matchExpressions:
                - key: nvidia.com/gpu.present
                  operator: In
                  values:
                  - "true"
                - key: nvidia.com/gpu.memory
                  operator: Gt
                  values:
                  - "16383"
              weight: 80
        tolerations:
        - effect: NoSchedule
          key: nvidia.com/gpu
          operator: Exists
    "##]],
    );
}

#[test]
fn gpu_policy_none_ignores_the_count() {
    check_scheduling(
        &with_gpu(GpuPolicy::None, 4, Some(16)),
        &target(),
        expect![[r#"
        {}
    "#]],
    );
}

#[test]
fn confidentiality_policies() {
    let kata = Target { runtime_classes: vec!["gvisor".to_owned(), "kata".to_owned()], ..target() };
    let plain = Target { runtime_classes: vec!["gvisor".to_owned()], ..target() };
    let with = |confidentiality| with(workload(), |it| it.confidentiality = confidentiality);
    check_scheduling(
        &with(Confidentiality::TeeRequired),
        &kata,
        expect![[r#"
        runtimeClassName: kata
    "#]],
    );
    check_scheduling(
        &with(Confidentiality::TeePreferred),
        &kata,
        expect![[r#"
        runtimeClassName: kata
    "#]],
    );
    check_scheduling(
        &with(Confidentiality::TeePreferred),
        &plain,
        expect![[r#"
        # warning: TEE preferred, but the cluster has no RuntimeClass `kata`: the Pod runs without one
        {}
    "#]],
    );
    check_scheduling(
        &with(Confidentiality::StandardRequired),
        &kata,
        expect![[r#"
        {}
    "#]],
    );
    check_scheduling(
        &with(Confidentiality::Any),
        &kata,
        expect![[r#"
        {}
    "#]],
    );
    let custom = Target {
        tee_runtime_class: "kata-qemu-snp".to_owned(),
        runtime_classes: vec!["kata-qemu-snp".to_owned()],
        ..target()
    };
    check_scheduling(
        &with(Confidentiality::TeeRequired),
        &custom,
        expect![[r#"
        runtimeClassName: kata-qemu-snp
    "#]],
    );
}

#[test]
fn operator_defaults_merge_with_instance_overrides() {
    let toleration = |key: &str| Toleration {
        key: Some(key.to_owned()),
        operator: Some("Exists".to_owned()),
        effect: Some("NoSchedule".to_owned()),
        ..Toleration::default()
    };
    let target = Target {
        defaults: with(KubernetesOptions::default(), |it| {
            it.namespace = Some("services".to_owned());
            it.node_selector = [("pool".to_owned(), "general".to_owned()), ("zone".to_owned(), "a".to_owned())].into();
            it.tolerations = vec![toleration("dedicated")];
            it.annotations = [("team".to_owned(), "infra".to_owned())].into();
            it.labels = [("cost-centre".to_owned(), "42".to_owned())].into();
            it.image_pull_secrets = vec!["registry".to_owned()];
        }),
        ..target()
    };
    let workload = with(workload(), |it| {
        it.kubernetes = with(KubernetesOptions::default(), |it| {
            it.namespace = Some("rpc".to_owned());
            it.node_selector = [("pool".to_owned(), "rpc".to_owned())].into();
            it.tolerations = vec![toleration("dedicated"), toleration("spot")];
            it.annotations = [("team".to_owned(), "rpc".to_owned()), ("owner".to_owned(), "ana".to_owned())].into();
            it.labels = [("app.kubernetes.io/managed-by".to_owned(), "someone-else".to_owned())].into();
            it.image_pull_secrets = vec!["registry".to_owned(), "mirror".to_owned()];
        })
    });
    check_objects(
        &workload,
        &target,
        &["Pod"],
        expect![[r#"
        apiVersion: v1
        kind: Pod
        metadata:
          annotations:
            kiln.dev/name: rpc-client
            owner: ana
            team: rpc
          labels:
            app.kubernetes.io/managed-by: kiln
            cost-centre: "42"
            kiln.dev/instance: rpc-client
          name: rpc-client
          namespace: rpc
        spec:
          automountServiceAccountToken: false
          containers:
          - image: ghcr.io/example/rpc-client:1.4.2
            name: service
            securityContext:
              allowPrivilegeEscalation: false
              capabilities:
                drop:
                - ALL
              readOnlyRootFilesystem: true
            volumeMounts:
            - mountPath: /tmp
              name: tmp
          enableServiceLinks: false
          imagePullSecrets:
          - name: registry
          - name: mirror
          nodeSelector:
            pool: rpc
            zone: a
          restartPolicy: Never
          securityContext:
            runAsNonRoot: true
            seccompProfile:
              type: RuntimeDefault
          tolerations:
          - effect: NoSchedule
            key: dedicated
            operator: Exists
          - effect: NoSchedule
            key: spot
            operator: Exists
          volumes:
          - emptyDir: {}
            name: tmp
        ---
    "#]],
    );
}

#[test]
fn security_context_relaxed() {
    let workload = with(workload(), |it| {
        it.kubernetes = with(KubernetesOptions::default(), |it| {
            it.security = PodSecurity {
                run_as_root: true,
                writable_root_filesystem: true,
                allow_privilege_escalation: true,
                add_capabilities: vec!["NET_BIND_SERVICE".to_owned()],
                unconfined_seccomp: true,
                run_as_user: Some(0),
            }
        })
    });
    check_objects(
        &workload,
        &target(),
        &["Pod"],
        expect![[r#"
        apiVersion: v1
        kind: Pod
        metadata:
          annotations:
            kiln.dev/name: rpc-client
          labels:
            app.kubernetes.io/managed-by: kiln
            kiln.dev/instance: rpc-client
          name: rpc-client
          namespace: default
        spec:
          automountServiceAccountToken: false
          containers:
          - image: ghcr.io/example/rpc-client:1.4.2
            name: service
            securityContext:
              allowPrivilegeEscalation: true
              capabilities:
                add:
                - NET_BIND_SERVICE
                drop:
                - ALL
              readOnlyRootFilesystem: false
          enableServiceLinks: false
          restartPolicy: Never
          securityContext:
            runAsUser: 0
            seccompProfile:
              type: Unconfined
        ---
    "#]],
    );
}

#[test]
fn host_ports_as_legacy_endpoints_on_a_cluster_without_slices() {
    let workload = with(workload(), |it| {
        it.firewall = Firewall {
            host_ports: vec![
                HostPort { protocol: Protocol::Tcp, port: 8545 },
                HostPort { protocol: Protocol::Udp, port: 9000 },
            ],
            ..Firewall::default()
        }
    });
    let old = Target { endpoint_slices: false, ..target() };
    check_objects(
        &workload,
        &old,
        &["Service", "Endpoints", "EndpointSlice"],
        expect![[r#"
        apiVersion: v1
        kind: Service
        metadata:
          labels:
            app.kubernetes.io/managed-by: kiln
            kiln.dev/instance: rpc-client
          name: rpc-client-host
          namespace: default
        spec:
          ports:
          - name: tcp-8545
            port: 8545
            protocol: TCP
            targetPort: 8545
          - name: udp-9000
            port: 9000
            protocol: UDP
            targetPort: 9000
        ---
        apiVersion: v1
        kind: Endpoints
        metadata:
          labels:
            app.kubernetes.io/managed-by: kiln
            kiln.dev/instance: rpc-client
          name: rpc-client-host
          namespace: default
        subsets:
        - addresses:
          - ip: "10.0.0.1"
          ports:
          - name: tcp-8545
            port: 8545
            protocol: TCP
          - name: udp-9000
            port: 9000
            protocol: UDP
        ---
    "#]],
    );
}

#[test]
fn ipv6_host_and_egress_on() {
    let workload = with(workload(), |it| {
        it.env = vec![
            ("WS".to_owned(), "ws://[::1]:8546".to_owned()),
            ("OTHER".to_owned(), "http://example.com:80".to_owned()),
        ];
        it.firewall = Firewall {
            egress: true,
            host_ports: vec![HostPort { protocol: Protocol::Tcp, port: 8546 }],
            ..Firewall::default()
        };
    });
    let target = Target { host_address: Some("fd00::1".parse().expect("IPv6")), allow_cluster_dns: false, ..target() };
    check_objects(
        &workload,
        &target,
        &["NetworkPolicy", "EndpointSlice"],
        expect![[r#"
        apiVersion: discovery.k8s.io/v1
        kind: EndpointSlice
        addressType: IPv6
        endpoints:
        - addresses:
          - fd00::1
          conditions:
            ready: true
        metadata:
          labels:
            app.kubernetes.io/managed-by: kiln
            endpointslice.kubernetes.io/managed-by: kiln.dev
            kiln.dev/instance: rpc-client
            kubernetes.io/service-name: rpc-client-host
          name: rpc-client-host
          namespace: default
        ports:
        - name: tcp-8546
          port: 8546
          protocol: TCP
        ---
        apiVersion: networking.k8s.io/v1
        kind: NetworkPolicy
        metadata:
          labels:
            app.kubernetes.io/managed-by: kiln
            kiln.dev/instance: rpc-client
          name: rpc-client
          namespace: default
        spec:
          egress:
          - {}
          podSelector:
            matchLabels:
              app.kubernetes.io/managed-by: kiln
              kiln.dev/instance: rpc-client
          policyTypes:
          - Ingress
          - Egress
        ---
    "#]],
    );
    let manifests = render(&workload, &target).expect("renders");
    let env = serde_json::to_value(&manifests.pod.spec.expect("spec").containers[0].env).expect("env");
    expect![[r#"[{"name":"WS","value":"ws://[fd00::1]:8546"},{"name":"OTHER","value":"http://example.com:80"}]"#]]
        .assert_eq(&env.to_string());
}

#[test]
fn keystore_from_a_host_path() {
    let workload = with(workload(), |it| {
        it.mounts = vec![Mount {
            name: "keystore".to_owned(),
            mount_path: "/run/keystore".to_owned(),
            source: MountSource::HostPath("/var/lib/kiln/keystores/rpc-client".to_owned()),
        }]
    });
    check_objects(
        &workload,
        &target(),
        &["Pod"],
        expect![[r#"
        # warning: mount `keystore` is the node's directory `/var/lib/kiln/keystores/rpc-client`: the Pod only works on nodes that have it
        apiVersion: v1
        kind: Pod
        metadata:
          annotations:
            kiln.dev/name: rpc-client
          labels:
            app.kubernetes.io/managed-by: kiln
            kiln.dev/instance: rpc-client
          name: rpc-client
          namespace: default
        spec:
          automountServiceAccountToken: false
          containers:
          - image: ghcr.io/example/rpc-client:1.4.2
            name: service
            securityContext:
              allowPrivilegeEscalation: false
              capabilities:
                drop:
                - ALL
              readOnlyRootFilesystem: true
            volumeMounts:
            - mountPath: /run/keystore
              name: keystore
              readOnly: true
            - mountPath: /tmp
              name: tmp
          enableServiceLinks: false
          restartPolicy: Never
          securityContext:
            runAsNonRoot: true
            seccompProfile:
              type: RuntimeDefault
          volumes:
          - hostPath:
              path: /var/lib/kiln/keystores/rpc-client
              type: Directory
            name: keystore
          - emptyDir: {}
            name: tmp
        ---
    "#]],
    );
}

#[test]
fn loopback_without_a_host_address_is_kept_with_a_warning() {
    let workload = with(workload(), |it| it.env = vec![("RPC".to_owned(), "http://localhost:8545".to_owned())]);
    let manifests = render_checked(&workload, &Target::default());
    expect![[r#"
        # warning: environment variable `RPC` points at the loopback address, which inside a Pod is the Pod itself; give the target a host address to rewrite it
    "#]].assert_eq(&warnings(&manifests));
}

#[test]
fn long_and_odd_names() {
    let names = ["Rpc_Client.Main", &"x".repeat(80), "a"];
    let out: Vec<String> = names
        .iter()
        .map(|name| {
            let manifests = render_checked(
                &with(workload(), |it| {
                    it.name = (*name).to_owned();
                    it.firewall = Firewall {
                        host_ports: vec![HostPort { protocol: Protocol::Tcp, port: 1 }],
                        ..Firewall::default()
                    };
                    it.mounts = vec![Mount {
                        name: "keystore".to_owned(),
                        mount_path: "/k".to_owned(),
                        source: MountSource::Files { files: BTreeMap::new(), secret: true },
                    }];
                }),
                &target(),
            );
            manifests.objects().iter().map(|o| o.describe()).collect::<Vec<_>>().join(" ")
        })
        .collect();
    expect![[r#"
        Secret/rpc-client-main-343ffe69-keystore Service/rpc-client-main-343ffe69-host EndpointSlice/rpc-client-main-343ffe69-host NetworkPolicy/rpc-client-main-343ffe69 Pod/rpc-client-main-343ffe69
        Secret/xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx-keystore-f2d6160c Service/xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx-1879e320-host EndpointSlice/xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx-1879e320-host NetworkPolicy/xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx-1879e320 Pod/xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx-1879e320
        Secret/a-keystore Service/a-host EndpointSlice/a-host NetworkPolicy/a Pod/a"#]].assert_eq(&out.join("\n"));
}

#[test]
fn bad_input_is_refused_before_anything_is_applied() {
    let t = target();
    check_error(&with(workload(), |it| it.image = String::new()), &t, expect!["workload `rpc-client` has no image"]);
    check_error(
        &with(workload(), |it| it.image = "ghcr.io/x:1 --privileged".to_owned()),
        &t,
        expect!["workload `rpc-client`: image `ghcr.io/x:1 --privileged` contains whitespace or control characters"],
    );
    check_error(
        &with_gpu(GpuPolicy::Required, 0, None),
        &t,
        expect!["workload `rpc-client`: GPU required with count 0; ask for at least one GPU or set the policy to none"],
    );
    check_error(
        &with_gpu(GpuPolicy::Preferred, 0, None),
        &t,
        expect![
            "workload `rpc-client`: GPU preferred with count 0; ask for at least one GPU or set the policy to none"
        ],
    );
    check_error(
        &with_gpu(GpuPolicy::Required, 1, Some(0)),
        &t,
        expect!["workload `rpc-client`: a minimum of 0 GiB of GPU memory; leave it unset instead"],
    );
    check_error(
        &with(workload(), |it| it.name = "rpc client".to_owned()),
        &t,
        expect![
            "`rpc client` cannot become a Kubernetes name: ' ' is not allowed (use letters, digits, `-`, `_` and `.`)"
        ],
    );
    check_error(
        &with(workload(), |it| it.name = "--".to_owned()),
        &t,
        expect!["`--` cannot become a Kubernetes name: it has no letter or digit"],
    );
    check_error(
        &with(workload(), |it| it.name = "ünicode".to_owned()),
        &t,
        expect![
            "`ünicode` cannot become a Kubernetes name: 'ü' is not allowed (use letters, digits, `-`, `_` and `.`)"
        ],
    );
    check_error(
        &with(workload(), |it| it.confidentiality = Confidentiality::TeeRequired),
        &t,
        expect!["workload `rpc-client` requires a TEE, but the cluster has no RuntimeClass `kata` (it has: none)"],
    );
    let runc = Target { runtime_classes: vec!["runc".to_owned(), "gvisor".to_owned()], ..target() };
    check_error(
        &with(workload(), |it| it.confidentiality = Confidentiality::TeeRequired),
        &runc,
        expect![
            "workload `rpc-client` requires a TEE, but the cluster has no RuntimeClass `kata` (it has: runc, gvisor)"
        ],
    );
    let host_ports =
        Firewall { host_ports: vec![HostPort { protocol: Protocol::Tcp, port: 8545 }], ..Firewall::default() };
    check_error(
        &with(workload(), |it| it.firewall = host_ports.clone()),
        &Target::default(),
        expect![
            "workload `rpc-client`: the firewall lists host ports, but the target has no host address for Pods to reach"
        ],
    );
    let port_zero = Firewall { host_ports: vec![HostPort { protocol: Protocol::Tcp, port: 0 }], ..Firewall::default() };
    check_error(
        &with(workload(), |it| it.firewall = port_zero),
        &t,
        expect![[r#"
            workload `rpc-client`: invalid firewall
               caused by: Firewall spec is invalid: host port tcp/0: port 0 is not a port"#]],
    );
    let mount = |name: &str, path: &str, file: &str| Mount {
        name: name.to_owned(),
        mount_path: path.to_owned(),
        source: MountSource::Files { files: [(file.to_owned(), Vec::new())].into(), secret: true },
    };
    check_error(
        &with(workload(), |it| it.mounts = vec![mount("keystore", "run/keys", "k")]),
        &t,
        expect!["workload `rpc-client`: mount `keystore`: `run/keys` is not an absolute path"],
    );
    check_error(
        &with(workload(), |it| it.mounts = vec![mount("keystore", "/run/../etc", "k")]),
        &t,
        expect!["workload `rpc-client`: mount `keystore`: `/run/../etc` has an empty, `.` or `..` component"],
    );
    check_error(
        &with(workload(), |it| it.mounts = vec![mount("keystore", "/run/keys", "../k")]),
        &t,
        expect![
            "workload `rpc-client`: mount `keystore`: file `../k` has '/'; file names may hold letters, digits, `-`, `_` and `.`"
        ],
    );
    check_error(
        &with(workload(), |it| it.mounts = vec![mount("a", "/run/keys", "k"), mount("b", "/run/keys/", "k")]),
        &t,
        expect!["workload `rpc-client`: two mounts at `/run/keys/`"],
    );
    check_error(
        &with(workload(), |it| it.env = vec![("A".to_owned(), "1".to_owned()), ("A".to_owned(), "2".to_owned())]),
        &t,
        expect!["workload `rpc-client`: environment variable `A` is set twice"],
    );
    check_error(
        &with(workload(), |it| {
            it.kubernetes = with(KubernetesOptions::default(), |it| it.namespace = Some("Prod".to_owned()))
        }),
        &t,
        expect!["workload `rpc-client`: namespace `Prod` is not a DNS label (lower-case letters, digits, `-`)"],
    );
    let options = |options: KubernetesOptions| with(workload(), |it| it.kubernetes = options);
    check_error(
        &options(with(KubernetesOptions::default(), |it| it.labels = [("team".to_owned(), "a b".to_owned())].into())),
        &t,
        expect![
            "workload `rpc-client`: label value `a b` (key `team`) must be 1-63 letters, digits, `-`, `_` or `.`, starting and ending with a letter or digit"
        ],
    );
    check_error(
        &options(with(KubernetesOptions::default(), |it| {
            it.node_selector = [("Bad_Prefix/zone".to_owned(), "a".to_owned())].into()
        })),
        &t,
        expect![
            "workload `rpc-client`: label key `Bad_Prefix/zone` has prefix `Bad_Prefix`, which is not a DNS subdomain"
        ],
    );
    check_error(
        &options(with(KubernetesOptions::default(), |it| it.annotations = [("".to_owned(), "x".to_owned())].into())),
        &t,
        expect![
            "workload `rpc-client`: annotation key `` must be 1-63 letters, digits, `-`, `_` or `.`, starting and ending with a letter or digit"
        ],
    );
    check_error(
        &options(with(KubernetesOptions::default(), |it| it.image_pull_secrets = vec!["Registry".to_owned()])),
        &t,
        expect![
            "workload `rpc-client`: `Registry` is not a valid Secret or ServiceAccount name (a lower-case DNS subdomain)"
        ],
    );
    check_error(
        &with(workload(), |it| it.resources = with(Resources::default(), |it| it.memory_bytes = Some(0))),
        &t,
        expect!["workload `rpc-client`: 0 bytes of memory requested"],
    );
    let big = Mount {
        name: "keystore".to_owned(),
        mount_path: "/srv/keystore".to_owned(),
        source: MountSource::Files {
            files: [("a".to_owned(), vec![0; 700 << 10]), ("b".to_owned(), vec![0; 400 << 10])].into(),
            secret: true,
        },
    };
    check_error(
        &with(workload(), |it| it.mounts = vec![big]),
        &t,
        expect![
            "workload `rpc-client`: mount `keystore` holds 1126400 bytes, more than the 1048576 a Secret can; mount it from the node instead"
        ],
    );
    let data = |mount_path: &str, size_bytes| Some(DataVolume { mount_path: mount_path.to_owned(), size_bytes });
    check_error(
        &with(workload(), |it| it.data_volume = data("/mnt/data", 0)),
        &t,
        expect!["workload `rpc-client`: data volume of 0 bytes"],
    );
    check_error(
        &with(workload(), |it| {
            it.data_volume = data("/run/keys", MIB);
            it.mounts = vec![mount("keystore", "/run/keys", "k")];
        }),
        &t,
        expect!["workload `rpc-client`: the data volume clashes with a mount named `data` or at `/run/keys`"],
    );
}

/// The microVM's data disk becomes a size-limited, writable emptyDir.
#[test]
fn data_volume() {
    let workload = with(workload(), |it| {
        it.data_volume = Some(DataVolume { mount_path: "/mnt/data".to_owned(), size_bytes: 64 * MIB })
    });
    let manifests = render_checked(&workload, &target());
    let spec = serde_json::to_value(&manifests.pod).expect("Pod serializes")["spec"].clone();
    let picked =
        serde_json::json!({ "volumes": spec["volumes"], "volumeMounts": spec["containers"][0]["volumeMounts"] });
    expect![[r#"
        volumeMounts:
        - mountPath: /mnt/data
          name: data
        - mountPath: /tmp
          name: tmp
        volumes:
        - emptyDir:
            sizeLimit: 64Mi
          name: data
        - emptyDir: {}
          name: tmp
    "#]]
    .assert_eq(&serde_saphyr::to_string(&picked).expect("YAML"));
}

fn arb_workload() -> impl Strategy<Value = Workload> {
    let protocol = prop_oneof![Just(Protocol::Tcp), Just(Protocol::Udp)];
    let policy = prop_oneof![Just(GpuPolicy::None), Just(GpuPolicy::Preferred), Just(GpuPolicy::Required)];
    let confidentiality = prop_oneof![
        Just(Confidentiality::Any),
        Just(Confidentiality::StandardRequired),
        Just(Confidentiality::TeePreferred),
        Just(Confidentiality::TeeRequired),
    ];
    (
        "[A-Za-z0-9][A-Za-z0-9._-]{0,90}",
        proptest::collection::btree_map("[A-Z_]{1,8}", "[ -~]{0,30}", 0..4),
        proptest::collection::btree_set((protocol.clone(), 1u16..), 0..3),
        proptest::collection::btree_map((protocol, 1u16..), 1u16.., 0..3),
        (policy, 1u32..8, proptest::option::of(1u32..80)),
        confidentiality,
        (proptest::option::of(1u32..64_000), proptest::option::of(1u64..(1 << 40))),
        any::<bool>(),
        proptest::collection::btree_map(
            "[a-z0-9_-][a-z0-9._-]{0,11}",
            proptest::collection::vec(any::<u8>(), 0..16),
            0..3,
        ),
        proptest::option::of(1u64..(1 << 40)),
    )
        .prop_map(
            |(
                name,
                env,
                host_ports,
                published,
                (policy, count, vram),
                confidentiality,
                (cpu, memory),
                egress,
                files,
                data_bytes,
            )| {
                with(Workload::new(name, "registry.example/app@sha256:0123".to_owned()), |it| {
                    it.env = env.into_iter().collect();
                    it.mounts = vec![Mount {
                        name: "keystore".to_owned(),
                        mount_path: "/run/keystore".to_owned(),
                        source: MountSource::Files { files, secret: egress },
                    }];
                    it.data_volume =
                        data_bytes.map(|size_bytes| DataVolume { mount_path: "/mnt/data".to_owned(), size_bytes });
                    it.resources = with(Resources::default(), |it| {
                        it.millicpus = cpu;
                        it.memory_bytes = memory;
                        it.gpu = Some(Gpu { count, policy, min_vram_gb: vram });
                    });
                    it.confidentiality = confidentiality;
                    it.firewall = Firewall {
                        egress,
                        host_ports: host_ports
                            .into_iter()
                            .map(|(protocol, port)| HostPort { protocol, port })
                            .collect(),
                        published_ports: published
                            .into_iter()
                            .map(|((protocol, host_port), guest_port)| PublishedPort {
                                protocol,
                                host_port,
                                guest_port,
                            })
                            .collect(),
                    };
                })
            },
        )
}

/// Build → YAML → read back → compare, for random workloads; every name a
/// DNS label, every object labelled with its instance, rendering
/// deterministic. All streams rendered are then validated against the
/// schema in one `kubernetes-validate` run (one run per case would take
/// a second each).
#[test]
fn rendered_manifests_round_trip() {
    use std::cell::RefCell;

    use proptest::test_runner::{Config, TestCaseError, TestRunner};

    let rendered = RefCell::new(Vec::new());
    let mut runner = TestRunner::new(Config { cases: 64, ..Config::default() });
    let outcome = runner.run(&(arb_workload(), any::<bool>()), |(workload, kata)| {
        let target = Target { runtime_classes: if kata { vec!["kata".to_owned()] } else { Vec::new() }, ..target() };
        let manifests = match render(&workload, &target) {
            Ok(manifests) => manifests,
            Err(err) => {
                // The only inputs the strategy makes that must fail.
                let tee_missing = workload.confidentiality == Confidentiality::TeeRequired && !kata;
                prop_assert!(tee_missing, "unexpected error: {err}");
                return Ok(());
            }
        };
        let yaml = manifests.to_yaml().map_err(|err| TestCaseError::fail(err.to_string()))?;
        assert_round_trip(&manifests, &yaml);
        prop_assert_eq!(render(&workload, &target).expect("renders twice"), manifests.clone());
        for object in manifests.objects() {
            let described = object.describe();
            let name = described.split_once('/').expect("Kind/name").1;
            prop_assert!(is_dns_label(name), "{}", described);
        }
        prop_assert!(yaml.matches("kiln.dev/instance: ").count() >= manifests.objects().len());
        rendered.borrow_mut().push(yaml);
        Ok(())
    });
    if let Err(failure) = outcome {
        panic!("{failure}");
    }
    let rendered = rendered.into_inner();
    assert!(rendered.len() > 16, "only {} of 64 random workloads rendered", rendered.len());
    assert_valid(&rendered.join("---\n"));
}
