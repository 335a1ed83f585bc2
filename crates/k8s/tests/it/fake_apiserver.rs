//! The client against a FAKE API server: kube-rs's `tower_test::mock`
//! stands in for the cluster (no real API server runs here). Each test
//! scripts the replies and checks the exact requests kiln sent: verb, path,
//! query (field manager, selectors), content type and body.

use std::future::Future;
use std::net::IpAddr;
use std::pin::pin;
use std::time::Duration;

use expect_test::{Expect, expect};
use http::{Request, Response};
use kiln_k8s::kube::Client;
use kiln_k8s::kube::client::Body;
use kiln_k8s::{Cluster, Firewall, ForeignObjects, HostPort, Protocol, PublishedPort, Target, Workload, render};
use kiln_k8s::{INSTANCE_LABEL, MANAGED_BY_LABEL, MANAGER};
use kiln_testkit::fake_apiserver::{self as fake, Reply, failure, list};
use serde_json::{Value, json};
use tower_test::mock;

use crate::chain;
use crate::validate::assert_valid;
use crate::with;

fn pod(status: Value) -> Value {
    fake::pod("web", "default", status)
}

fn labelled(kind: &str, api_version: &str, name: &str, instance: &str) -> Value {
    fake::labelled(kind, api_version, name, "default", instance)
}

/// What the fake server saw: one line per request, and the JSON bodies.
struct Seen {
    transcript: String,
    bodies: Vec<Value>,
}

/// Runs `call` against a fake API server that answers with `replies`, in
/// order, and records every request. Fails if kiln sent fewer requests
/// than scripted; a request beyond the script gets no answer (the fake
/// hangs up), which surfaces as an error of `call`.
async fn fake_apiserver<T, F, Fut>(replies: Vec<Reply>, call: F) -> (T, Seen)
where
    F: FnOnce(Cluster) -> Fut,
    Fut: Future<Output = T>,
{
    let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
    let expected = replies.len();
    let server = tokio::spawn(async move {
        let mut handle = pin!(handle);
        let mut lines = Vec::new();
        let mut bodies = Vec::new();
        for reply in replies {
            let Some((request, send)) = handle.next_request().await else { break };
            let (parts, body) = request.into_parts();
            let bytes = body.collect_bytes().await.expect("request body");
            let content_type = parts.headers.get(http::header::CONTENT_TYPE).map(|v| v.to_str().expect("ASCII header"));
            let line =
                fake::transcript_line(parts.method.as_str(), &parts.uri.to_string(), content_type, &bytes, &mut bodies);
            lines.push(line);
            let (code, _, body) = reply.answer(&bytes);
            let response = Response::builder().status(code).body(Body::from(body));
            send.send_response(response.expect("response"));
        }
        (lines, bodies)
    });
    let result = call(Cluster::from_client(Client::new(service, "default"))).await;
    let (lines, bodies) = server.await.expect("fake API server task");
    assert_eq!(lines.len(), expected, "kiln sent fewer requests than scripted:\n{}", lines.join("\n"));
    (result, Seen { transcript: lines.join("\n"), bodies })
}

fn check<T: std::fmt::Debug>(result: &Result<T, kiln_k8s::Error>, seen: &Seen, expect: Expect) {
    let outcome = match result {
        Ok(value) => format!("Ok({value:?})"),
        Err(err) => format!("Err({})", chain(err)),
    };
    expect.assert_eq(&format!("{}\n=> {outcome}", seen.transcript));
}

/// What `apply` applied, as the CLI prints it.
fn names(applied: Vec<kiln_k8s::Applied>) -> Vec<String> {
    applied.iter().map(ToString::to_string).collect()
}

fn web() -> Workload {
    Workload::new("web", "registry.example/web:1")
}

#[tokio::test]
async fn fake_apiserver_apply_creates_the_namespace_then_applies_every_object_pod_last() {
    let workload = with(web(), |it| {
        it.firewall = Firewall {
            host_ports: vec![HostPort { protocol: Protocol::Tcp, port: 8545 }],
            published_ports: vec![PublishedPort { protocol: Protocol::Tcp, host_port: 8080, guest_port: 80 }],
            ..Firewall::default()
        }
    });
    let target = Target { host_address: Some(IpAddr::from([10, 0, 0, 1])), ..Target::default() };
    let manifests = render(&workload, &target).expect("renders");
    assert_valid(&manifests.to_yaml().expect("YAML"));
    let replies = vec![
        failure(404, "NotFound", "namespaces \"default\" not found"),
        Reply::Json(201, json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "default"}})),
        Reply::Echo,
        Reply::Echo,
        Reply::Echo,
        Reply::Echo,
        Reply::Echo,
    ];
    let applied = manifests.clone();
    let (result, seen) =
        fake_apiserver(
            replies,
            |cluster| async move { cluster.apply(&applied, ForeignObjects::Refuse).await.map(names) },
        )
        .await;
    check(
        &result,
        &seen,
        expect![[r#"
            GET /api/v1/namespaces/default
            POST /api/v1/namespaces?&fieldManager=kiln [application/json] {"apiVersion":"v1","kind":"Namespace","metadata":{"labels":{"app.kubernetes.io/managed-by":"kiln"},"name":"default"}}
            PATCH /api/v1/namespaces/default/services/web-host?&fieldManager=kiln [application/apply-patch+yaml] <Service/web-host body #1>
            PATCH /apis/discovery.k8s.io/v1/namespaces/default/endpointslices/web-host?&fieldManager=kiln [application/apply-patch+yaml] <EndpointSlice/web-host body #2>
            PATCH /api/v1/namespaces/default/services/web?&fieldManager=kiln [application/apply-patch+yaml] <Service/web body #3>
            PATCH /apis/networking.k8s.io/v1/namespaces/default/networkpolicies/web?&fieldManager=kiln [application/apply-patch+yaml] <NetworkPolicy/web body #4>
            PATCH /api/v1/namespaces/default/pods/web?&fieldManager=kiln [application/apply-patch+yaml] <Pod/web body #5>
            => Ok(["Service/web-host", "EndpointSlice/web-host", "Service/web", "NetworkPolicy/web", "Pod/web"])"#]],
    );
    // The apply bodies are exactly the rendered objects.
    let rendered: Vec<Value> = manifests.objects().into_iter().map(kiln_k8s::Object::to_json).collect();
    assert_eq!(seen.bodies[1..], rendered[..]);
}

#[tokio::test]
async fn fake_apiserver_apply_treats_a_namespace_conflict_as_created() {
    let manifests = render(&web(), &Target::default()).expect("renders");
    assert_valid(&manifests.to_yaml().expect("YAML"));
    let replies = vec![
        failure(404, "NotFound", "namespaces \"default\" not found"),
        failure(409, "AlreadyExists", "namespaces \"default\" already exists"),
        Reply::Echo,
        Reply::Echo,
    ];
    let (result, seen) =
        fake_apiserver(
            replies,
            |cluster| async move { cluster.apply(&manifests, ForeignObjects::Refuse).await.map(names) },
        )
        .await;
    check(
        &result,
        &seen,
        expect![[r#"
            GET /api/v1/namespaces/default
            POST /api/v1/namespaces?&fieldManager=kiln [application/json] {"apiVersion":"v1","kind":"Namespace","metadata":{"labels":{"app.kubernetes.io/managed-by":"kiln"},"name":"default"}}
            PATCH /apis/networking.k8s.io/v1/namespaces/default/networkpolicies/web?&fieldManager=kiln [application/apply-patch+yaml] <NetworkPolicy/web body #1>
            PATCH /api/v1/namespaces/default/pods/web?&fieldManager=kiln [application/apply-patch+yaml] <Pod/web body #2>
            => Ok(["NetworkPolicy/web", "Pod/web"])"#]],
    );
}

#[tokio::test]
async fn fake_apiserver_apply_stops_at_a_server_error() {
    let manifests = render(&web(), &Target::default()).expect("renders");
    assert_valid(&manifests.to_yaml().expect("YAML"));
    let replies = vec![
        Reply::Json(200, json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "default"}})),
        not_found("networkpolicies \"web\""),
        Reply::Json(200, labelled("Pod", "v1", "web", "web")),
        failure(500, "InternalError", "etcdserver: request timed out"),
    ];
    let (result, seen) =
        fake_apiserver(
            replies,
            |cluster| async move { cluster.apply(&manifests, ForeignObjects::Refuse).await.map(names) },
        )
        .await;
    check(
        &result,
        &seen,
        expect![[r#"
            GET /api/v1/namespaces/default
            GET /apis/networking.k8s.io/v1/namespaces/default/networkpolicies/web [application/json]
            GET /api/v1/namespaces/default/pods/web [application/json]
            PATCH /apis/networking.k8s.io/v1/namespaces/default/networkpolicies/web?&fieldManager=kiln [application/apply-patch+yaml] <NetworkPolicy/web body #0>
            => Err(apply NetworkPolicy/web in namespace default failed: the API server answered 500 InternalError: etcdserver: request timed out)"#]],
    );
}

/// `web` publishing port 80: Service/web, NetworkPolicy/web, Pod/web.
fn web_published() -> Workload {
    with(web(), |it| {
        it.firewall = Firewall {
            published_ports: vec![PublishedPort { protocol: Protocol::Tcp, host_port: 8080, guest_port: 80 }],
            ..Firewall::default()
        }
    })
}

fn unlabelled(kind: &str, api_version: &str, name: &str) -> Value {
    fake::unlabelled(kind, api_version, name, "default")
}

fn not_found(what: &str) -> Reply {
    failure(404, "NotFound", &format!("{what} not found"))
}

#[tokio::test]
async fn fake_apiserver_apply_refuses_a_foreign_object_before_writing_anything() {
    let manifests = render(&web_published(), &Target::default()).expect("renders");
    let mut foreign = unlabelled("Service", "v1", "web");
    foreign["metadata"]["labels"] = json!({"app": "legacy"});
    let replies = vec![
        Reply::Json(200, json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "default"}})),
        Reply::Json(200, foreign),
        not_found("networkpolicies \"web\""),
        not_found("pods \"web\""),
    ];
    let (result, seen) =
        fake_apiserver(
            replies,
            |cluster| async move { cluster.apply(&manifests, ForeignObjects::Refuse).await.map(names) },
        )
        .await;
    check(
        &result,
        &seen,
        expect![[r#"
            GET /api/v1/namespaces/default
            GET /api/v1/namespaces/default/services/web [application/json]
            GET /apis/networking.k8s.io/v1/namespaces/default/networkpolicies/web [application/json]
            GET /api/v1/namespaces/default/pods/web [application/json]
            => Err(Service/web (labels: app=legacy) exists in namespace `default` and does not belong to kiln instance `web`; nothing was applied; `kiln k8s apply --adopt` takes it over)"#]],
    );
}

#[tokio::test]
async fn fake_apiserver_apply_refuses_an_object_of_another_kiln_instance() {
    // Instance `web`'s host Service is `web-host`; so is the published-port
    // Service of an instance named `web-host`.
    let workload = with(web(), |it| {
        it.firewall =
            Firewall { host_ports: vec![HostPort { protocol: Protocol::Tcp, port: 7000 }], ..Firewall::default() }
    });
    let target = Target { host_address: Some(IpAddr::from([10, 0, 0, 1])), ..Target::default() };
    let manifests = render(&workload, &target).expect("renders");
    let replies = vec![
        Reply::Json(200, json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "default"}})),
        Reply::Json(200, labelled("Service", "v1", "web-host", "web-host")),
        not_found("endpointslices \"web-host\""),
        Reply::Json(200, labelled("NetworkPolicy", "networking.k8s.io/v1", "web", "web")),
        Reply::Json(200, unlabelled("Pod", "v1", "web")),
    ];
    let (result, seen) =
        fake_apiserver(
            replies,
            |cluster| async move { cluster.apply(&manifests, ForeignObjects::Refuse).await.map(names) },
        )
        .await;
    check(
        &result,
        &seen,
        expect![[r#"
            GET /api/v1/namespaces/default
            GET /api/v1/namespaces/default/services/web-host [application/json]
            GET /apis/discovery.k8s.io/v1/namespaces/default/endpointslices/web-host [application/json]
            GET /apis/networking.k8s.io/v1/namespaces/default/networkpolicies/web [application/json]
            GET /api/v1/namespaces/default/pods/web [application/json]
            => Err(Service/web-host (labelled for kiln instance `web-host`) and Pod/web (no labels) exist in namespace `default` and do not belong to kiln instance `web`; nothing was applied; `kiln k8s apply --adopt` takes them over)"#]],
    );
}

#[tokio::test]
async fn fake_apiserver_apply_adopt_takes_over_a_foreign_object_and_forces_only_existing_ones() {
    let manifests = render(&web_published(), &Target::default()).expect("renders");
    let replies = vec![
        Reply::Json(200, json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "default"}})),
        Reply::Json(200, unlabelled("Service", "v1", "web")),
        Reply::Json(200, labelled("NetworkPolicy", "networking.k8s.io/v1", "web", "web")),
        not_found("pods \"web\""),
        Reply::Echo,
        Reply::Echo,
        Reply::Echo,
    ];
    let applied = manifests.clone();
    let (result, seen) =
        fake_apiserver(
            replies,
            |cluster| async move { cluster.apply(&applied, ForeignObjects::Adopt).await.map(names) },
        )
        .await;
    check(
        &result,
        &seen,
        expect![[r#"
            GET /api/v1/namespaces/default
            GET /api/v1/namespaces/default/services/web [application/json]
            GET /apis/networking.k8s.io/v1/namespaces/default/networkpolicies/web [application/json]
            GET /api/v1/namespaces/default/pods/web [application/json]
            PATCH /api/v1/namespaces/default/services/web?&force=true&fieldManager=kiln [application/apply-patch+yaml] <Service/web body #0>
            PATCH /apis/networking.k8s.io/v1/namespaces/default/networkpolicies/web?&force=true&fieldManager=kiln [application/apply-patch+yaml] <NetworkPolicy/web body #1>
            PATCH /api/v1/namespaces/default/pods/web?&fieldManager=kiln [application/apply-patch+yaml] <Pod/web body #2>
            => Ok(["Service/web (adopted)", "NetworkPolicy/web", "Pod/web"])"#]],
    );
    // The adopted Service is applied as rendered: with kiln's labels.
    let rendered: Vec<Value> = manifests.objects().into_iter().map(kiln_k8s::Object::to_json).collect();
    assert_eq!(seen.bodies, rendered);
    let labels = &seen.bodies[0]["metadata"]["labels"];
    assert_eq!((labels[MANAGED_BY_LABEL].as_str(), labels[INSTANCE_LABEL].as_str()), (Some(MANAGER), Some("web")));
}

#[tokio::test]
async fn fake_apiserver_apply_does_not_force_onto_an_object_created_after_the_check() {
    let manifests = render(&web_published(), &Target::default()).expect("renders");
    let replies = vec![
        Reply::Json(200, json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "default"}})),
        not_found("services \"web\""),
        not_found("networkpolicies \"web\""),
        not_found("pods \"web\""),
        // Someone created Service/web between kiln's GET and its apply.
        failure(409, "Conflict", "Apply failed with 1 conflict: conflict with \"kubectl-create\": .spec.ports"),
    ];
    let (result, seen) =
        fake_apiserver(
            replies,
            |cluster| async move { cluster.apply(&manifests, ForeignObjects::Refuse).await.map(names) },
        )
        .await;
    check(
        &result,
        &seen,
        expect![[r#"
        GET /api/v1/namespaces/default
        GET /api/v1/namespaces/default/services/web [application/json]
        GET /apis/networking.k8s.io/v1/namespaces/default/networkpolicies/web [application/json]
        GET /api/v1/namespaces/default/pods/web [application/json]
        PATCH /api/v1/namespaces/default/services/web?&fieldManager=kiln [application/apply-patch+yaml] <Service/web body #0>
        => Err(apply Service/web in namespace default (it did not exist when kiln checked; something else created it since) failed: the API server answered 409 Conflict: Apply failed with 1 conflict: conflict with "kubectl-create": .spec.ports)"#]],
    );
}

#[tokio::test]
async fn fake_apiserver_status_reads_the_pod() {
    let replies = vec![Reply::Json(
        200,
        pod(json!({"phase": "Pending", "containerStatuses": [{"name": "service", "image": "x", "imageID": "",
            "ready": false, "restartCount": 0, "state": {"waiting": {"reason": "ImagePullBackOff"}}}]})),
    )];
    let (result, seen) = fake_apiserver(replies, |cluster| async move { cluster.status("web").await }).await;
    check(
        &result.map(|s| s.to_string()),
        &seen,
        expect![[r#"
        GET /api/v1/namespaces/default/pods/web
        => Ok("Pending (ImagePullBackOff)")"#]],
    );
}

#[tokio::test]
async fn fake_apiserver_status_of_a_missing_pod() {
    let replies = vec![failure(404, "NotFound", "pods \"web\" not found")];
    let (result, seen) = fake_apiserver(replies, |cluster| async move { cluster.status("web").await }).await;
    check(
        &result,
        &seen,
        expect![[r#"
        GET /api/v1/namespaces/default/pods/web
        => Err(Pod `web` does not exist in namespace `default`)"#]],
    );
}

#[tokio::test(start_paused = true)]
async fn fake_apiserver_wait_polls_until_the_pod_has_an_ip() {
    let replies = vec![
        Reply::Json(200, pod(json!({"phase": "Pending"}))),
        // The sandbox has an address, the image is still being pulled: not yet.
        Reply::Json(
            200,
            pod(json!({"phase": "Pending", "podIP": "10.244.1.7", "containerStatuses": [{"name": "service",
                "image": "x", "imageID": "", "ready": false, "restartCount": 0,
                "state": {"waiting": {"reason": "ContainerCreating"}}}]})),
        ),
        Reply::Json(200, pod(json!({"phase": "Running", "podIP": "10.244.1.7"}))),
    ];
    let (result, seen) =
        fake_apiserver(replies, |cluster| async move { cluster.wait_for_ip("web", Duration::from_secs(60)).await })
            .await;
    check(
        &result,
        &seen,
        expect![[r#"
        GET /api/v1/namespaces/default/pods/web
        GET /api/v1/namespaces/default/pods/web
        GET /api/v1/namespaces/default/pods/web
        => Ok(10.244.1.7)"#]],
    );
}

#[tokio::test(start_paused = true)]
async fn fake_apiserver_wait_gives_up_when_the_image_cannot_be_pulled() {
    let replies = vec![Reply::Json(
        200,
        pod(json!({"phase": "Pending", "containerStatuses": [{"name": "service", "image": "x", "imageID": "",
            "ready": false, "restartCount": 0,
            "state": {"waiting": {"reason": "ErrImagePull", "message": "manifest unknown"}}}]})),
    )];
    let (result, seen) =
        fake_apiserver(replies, |cluster| async move { cluster.wait_for_ip("web", Duration::from_secs(60)).await })
            .await;
    check(
        &result,
        &seen,
        expect![[r#"
        GET /api/v1/namespaces/default/pods/web
        => Err(Pod `web` will not get an IP address: Pending (ErrImagePull): manifest unknown)"#]],
    );
}

#[tokio::test(start_paused = true)]
async fn fake_apiserver_wait_times_out_at_the_deadline() {
    let unschedulable = || {
        Reply::Json(
            200,
            pod(json!({"phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "False",
                "reason": "Unschedulable", "message": "0/3 nodes are available"}]})),
        )
    };
    let replies = vec![unschedulable(), unschedulable(), unschedulable()];
    let (result, seen) =
        fake_apiserver(replies, |cluster| async move { cluster.wait_for_ip("web", Duration::from_millis(1200)).await })
            .await;
    check(
        &result,
        &seen,
        expect![[r#"
        GET /api/v1/namespaces/default/pods/web
        GET /api/v1/namespaces/default/pods/web
        GET /api/v1/namespaces/default/pods/web
        => Err(Pod `web` has no IP address after 1s (last state: Pending (Unschedulable): 0/3 nodes are available))"#]],
    );
}

#[tokio::test]
async fn fake_apiserver_logs_of_the_service_container() {
    let replies = vec![Reply::Text(200, "listening on :80\nready\n")];
    let (result, seen) = fake_apiserver(replies, |cluster| async move { cluster.logs("web", Some(100)).await }).await;
    check(
        &result,
        &seen,
        expect![[r#"
        GET /api/v1/namespaces/default/pods/web/log?&container=service&tailLines=100
        => Ok("listening on :80\nready\n")"#]],
    );
}

#[tokio::test]
async fn fake_apiserver_follow_logs_streams_until_the_container_ends() {
    let replies = vec![Reply::Text(200, "line 1\nline 2\n")];
    let (result, seen) = fake_apiserver(replies, |cluster| async move {
        let mut out = Vec::new();
        cluster.follow_logs("web", &mut out).await.map(|()| String::from_utf8(out).expect("UTF-8"))
    })
    .await;
    check(
        &result,
        &seen,
        expect![[r#"
        GET /api/v1/namespaces/default/pods/web/log?&container=service&follow=true
        => Ok("line 1\nline 2\n")"#]],
    );
}

#[tokio::test]
async fn fake_apiserver_logs_of_a_missing_pod() {
    let replies = vec![failure(404, "NotFound", "pods \"web\" not found")];
    let (result, seen) = fake_apiserver(replies, |cluster| async move { cluster.logs("web", None).await }).await;
    check(
        &result,
        &seen,
        expect![[r#"
        GET /api/v1/namespaces/default/pods/web/log?&container=service
        => Err(Pod `web` does not exist in namespace `default`)"#]],
    );
}

#[tokio::test]
async fn fake_apiserver_delete_removes_the_pod_and_everything_labelled() {
    let replies = vec![
        list("Pod", vec![pod(json!({"phase": "Running"}))]),
        Reply::Json(200, pod(json!({"phase": "Running"}))),
        list("NetworkPolicy", vec![labelled("NetworkPolicy", "networking.k8s.io/v1", "web", "web")]),
        Reply::Json(200, labelled("NetworkPolicy", "networking.k8s.io/v1", "web", "web")),
        list("Service", vec![labelled("Service", "v1", "web", "web"), labelled("Service", "v1", "web-host", "web")]),
        Reply::Json(200, labelled("Service", "v1", "web", "web")),
        failure(404, "NotFound", "services \"web-host\" not found"),
        list("EndpointSlice", vec![labelled("EndpointSlice", "discovery.k8s.io/v1", "web-host", "web")]),
        Reply::Json(200, labelled("EndpointSlice", "discovery.k8s.io/v1", "web-host", "web")),
        list("Endpoints", vec![]),
        list("Secret", vec![labelled("Secret", "v1", "web-keystore", "web")]),
        Reply::Json(200, labelled("Secret", "v1", "web-keystore", "web")),
        list("ConfigMap", vec![]),
    ];
    let (result, seen) = fake_apiserver(replies, |cluster| async move { cluster.delete("web").await }).await;
    check(
        &result,
        &seen,
        expect![[r#"
            GET /api/v1/namespaces/default/pods?&labelSelector=app.kubernetes.io%2Fmanaged-by%3Dkiln%2Ckiln.dev%2Finstance%3Dweb
            DELETE /api/v1/namespaces/default/pods/web? [application/json] {"preconditions":{"uid":"uid-pod-web"}}
            GET /apis/networking.k8s.io/v1/namespaces/default/networkpolicies?&labelSelector=app.kubernetes.io%2Fmanaged-by%3Dkiln%2Ckiln.dev%2Finstance%3Dweb
            DELETE /apis/networking.k8s.io/v1/namespaces/default/networkpolicies/web? [application/json] {"preconditions":{"uid":"uid-networkpolicy-web"}}
            GET /api/v1/namespaces/default/services?&labelSelector=app.kubernetes.io%2Fmanaged-by%3Dkiln%2Ckiln.dev%2Finstance%3Dweb
            DELETE /api/v1/namespaces/default/services/web? [application/json] {"preconditions":{"uid":"uid-service-web"}}
            DELETE /api/v1/namespaces/default/services/web-host? [application/json] {"preconditions":{"uid":"uid-service-web-host"}}
            GET /apis/discovery.k8s.io/v1/namespaces/default/endpointslices?&labelSelector=app.kubernetes.io%2Fmanaged-by%3Dkiln%2Ckiln.dev%2Finstance%3Dweb
            DELETE /apis/discovery.k8s.io/v1/namespaces/default/endpointslices/web-host? [application/json] {"preconditions":{"uid":"uid-endpointslice-web-host"}}
            GET /api/v1/namespaces/default/endpoints?&labelSelector=app.kubernetes.io%2Fmanaged-by%3Dkiln%2Ckiln.dev%2Finstance%3Dweb
            GET /api/v1/namespaces/default/secrets?&labelSelector=app.kubernetes.io%2Fmanaged-by%3Dkiln%2Ckiln.dev%2Finstance%3Dweb
            DELETE /api/v1/namespaces/default/secrets/web-keystore? [application/json] {"preconditions":{"uid":"uid-secret-web-keystore"}}
            GET /api/v1/namespaces/default/configmaps?&labelSelector=app.kubernetes.io%2Fmanaged-by%3Dkiln%2Ckiln.dev%2Finstance%3Dweb
            => Ok(Deleted { pod: true, others: ["NetworkPolicy/web", "Service/web", "EndpointSlice/web-host", "Secret/web-keystore"] })"#]],
    );
}

#[tokio::test]
async fn fake_apiserver_delete_of_a_missing_instance_is_done() {
    let replies = vec![
        list("Pod", vec![]),
        list("NetworkPolicy", vec![]),
        list("Service", vec![]),
        // A cluster without EndpointSlices: the kind itself is not found.
        failure(404, "NotFound", "the server could not find the requested resource"),
        list("Endpoints", vec![]),
        list("Secret", vec![]),
        list("ConfigMap", vec![]),
    ];
    let (result, seen) = fake_apiserver(replies, |cluster| async move { cluster.delete("web").await }).await;
    check(
        &result,
        &seen,
        expect![[r#"
            GET /api/v1/namespaces/default/pods?&labelSelector=app.kubernetes.io%2Fmanaged-by%3Dkiln%2Ckiln.dev%2Finstance%3Dweb
            GET /apis/networking.k8s.io/v1/namespaces/default/networkpolicies?&labelSelector=app.kubernetes.io%2Fmanaged-by%3Dkiln%2Ckiln.dev%2Finstance%3Dweb
            GET /api/v1/namespaces/default/services?&labelSelector=app.kubernetes.io%2Fmanaged-by%3Dkiln%2Ckiln.dev%2Finstance%3Dweb
            GET /apis/discovery.k8s.io/v1/namespaces/default/endpointslices?&labelSelector=app.kubernetes.io%2Fmanaged-by%3Dkiln%2Ckiln.dev%2Finstance%3Dweb
            GET /api/v1/namespaces/default/endpoints?&labelSelector=app.kubernetes.io%2Fmanaged-by%3Dkiln%2Ckiln.dev%2Finstance%3Dweb
            GET /api/v1/namespaces/default/secrets?&labelSelector=app.kubernetes.io%2Fmanaged-by%3Dkiln%2Ckiln.dev%2Finstance%3Dweb
            GET /api/v1/namespaces/default/configmaps?&labelSelector=app.kubernetes.io%2Fmanaged-by%3Dkiln%2Ckiln.dev%2Finstance%3Dweb
            => Ok(Deleted { pod: false, others: [] })"#]],
    );
}

#[tokio::test]
async fn fake_apiserver_delete_fails_on_a_forbidden_pod() {
    let replies = vec![
        list("Pod", vec![pod(json!({"phase": "Running"}))]),
        failure(403, "Forbidden", "pods \"web\" is forbidden: User \"ci\" cannot delete resource"),
    ];
    let (result, seen) = fake_apiserver(replies, |cluster| async move { cluster.delete("web").await }).await;
    check(
        &result,
        &seen,
        expect![[r#"
            GET /api/v1/namespaces/default/pods?&labelSelector=app.kubernetes.io%2Fmanaged-by%3Dkiln%2Ckiln.dev%2Finstance%3Dweb
            DELETE /api/v1/namespaces/default/pods/web? [application/json] {"preconditions":{"uid":"uid-pod-web"}}
            => Err(delete Pod/web failed: the API server answered 403 Forbidden: pods "web" is forbidden: User "ci" cannot delete resource)"#]],
    );
}

#[tokio::test]
async fn fake_apiserver_delete_never_deletes_what_is_not_the_instances() {
    // This fake ignores label selectors, so kiln's own check is what keeps
    // the foreign objects alive; a real server would not list them at all.
    let mut other = labelled("Service", "v1", "web-host", "web-host");
    other["metadata"]["labels"]["team"] = json!("b");
    let replies = vec![
        list("Pod", vec![unlabelled("Pod", "v1", "web")]),
        list("NetworkPolicy", vec![]),
        list("Service", vec![unlabelled("Service", "v1", "web"), other, labelled("Service", "v1", "web-old", "web")]),
        // web-old was replaced since it was listed: the UID precondition fails.
        failure(
            409,
            "Conflict",
            "Precondition failed: UID in precondition: uid-service-web-old, UID in object meta: 4d2c",
        ),
        list("EndpointSlice", vec![]),
        list("Endpoints", vec![]),
        list("Secret", vec![]),
        list("ConfigMap", vec![]),
    ];
    let (result, seen) = fake_apiserver(replies, |cluster| async move { cluster.delete("web").await }).await;
    check(
        &result,
        &seen,
        expect![[r#"
            GET /api/v1/namespaces/default/pods?&labelSelector=app.kubernetes.io%2Fmanaged-by%3Dkiln%2Ckiln.dev%2Finstance%3Dweb
            GET /apis/networking.k8s.io/v1/namespaces/default/networkpolicies?&labelSelector=app.kubernetes.io%2Fmanaged-by%3Dkiln%2Ckiln.dev%2Finstance%3Dweb
            GET /api/v1/namespaces/default/services?&labelSelector=app.kubernetes.io%2Fmanaged-by%3Dkiln%2Ckiln.dev%2Finstance%3Dweb
            DELETE /api/v1/namespaces/default/services/web-old? [application/json] {"preconditions":{"uid":"uid-service-web-old"}}
            GET /apis/discovery.k8s.io/v1/namespaces/default/endpointslices?&labelSelector=app.kubernetes.io%2Fmanaged-by%3Dkiln%2Ckiln.dev%2Finstance%3Dweb
            GET /api/v1/namespaces/default/endpoints?&labelSelector=app.kubernetes.io%2Fmanaged-by%3Dkiln%2Ckiln.dev%2Finstance%3Dweb
            GET /api/v1/namespaces/default/secrets?&labelSelector=app.kubernetes.io%2Fmanaged-by%3Dkiln%2Ckiln.dev%2Finstance%3Dweb
            GET /api/v1/namespaces/default/configmaps?&labelSelector=app.kubernetes.io%2Fmanaged-by%3Dkiln%2Ckiln.dev%2Finstance%3Dweb
            => Ok(Deleted { pod: false, others: [] })"#]],
    );
}

#[tokio::test]
async fn fake_apiserver_reap_leaves_pods_that_are_not_kilns() {
    // An ended Pod without kiln's labels (the fake ignores the selector).
    let mut legacy = unlabelled("Pod", "v1", "legacy");
    legacy["spec"] = json!({"containers": [{"name": "main", "image": "x"}]});
    legacy["status"] = json!({"phase": "Failed"});
    let replies = vec![
        list("Pod", vec![legacy]),
        list("Service", vec![unlabelled("Service", "v1", "legacy")]),
        list("NetworkPolicy", vec![]),
        list("Secret", vec![]),
        list("ConfigMap", vec![]),
    ];
    let (result, seen) = fake_apiserver(replies, |cluster| async move { cluster.reap().await }).await;
    check(
        &result,
        &seen,
        expect![[r#"
            GET /api/v1/namespaces/default/pods?&labelSelector=app.kubernetes.io%2Fmanaged-by%3Dkiln
            GET /api/v1/namespaces/default/services?&labelSelector=app.kubernetes.io%2Fmanaged-by%3Dkiln
            GET /apis/networking.k8s.io/v1/namespaces/default/networkpolicies?&labelSelector=app.kubernetes.io%2Fmanaged-by%3Dkiln
            GET /api/v1/namespaces/default/secrets?&labelSelector=app.kubernetes.io%2Fmanaged-by%3Dkiln
            GET /api/v1/namespaces/default/configmaps?&labelSelector=app.kubernetes.io%2Fmanaged-by%3Dkiln
            => Ok([])"#]],
    );
}

#[tokio::test]
async fn fake_apiserver_detects_runtime_classes_and_endpoint_slices() {
    let replies = vec![
        Reply::Json(
            200,
            json!({"apiVersion": "node.k8s.io/v1", "kind": "RuntimeClassList", "metadata": {}, "items": [
                {"apiVersion": "node.k8s.io/v1", "kind": "RuntimeClass", "metadata": {"name": "kata"}, "handler": "kata"},
                {"apiVersion": "node.k8s.io/v1", "kind": "RuntimeClass", "metadata": {"name": "gvisor"}, "handler": "runsc"}]}),
        ),
        list("EndpointSlice", vec![]),
    ];
    let (result, seen) = fake_apiserver(replies, |cluster| async move {
        cluster.detect(Target::default()).await.map(|t| (t.runtime_classes, t.endpoint_slices, t.fallback_namespace))
    })
    .await;
    check(
        &result,
        &seen,
        expect![[r#"
        GET /apis/node.k8s.io/v1/runtimeclasses?
        GET /apis/discovery.k8s.io/v1/namespaces/default/endpointslices?&limit=1
        => Ok((["gvisor", "kata"], true, "default"))"#]],
    );
}

#[tokio::test]
async fn fake_apiserver_list_and_reap() {
    let failed = pod(json!({"phase": "Failed"}));
    let mut running = pod(json!({"phase": "Running", "podIP": "10.244.0.9"}));
    running["metadata"]["name"] = json!("api");
    running["metadata"]["labels"]["kiln.dev/instance"] = json!("api");
    let replies = vec![
        list("Pod", vec![failed, running]),
        list("Service", vec![labelled("Service", "v1", "api", "api"), labelled("Service", "v1", "old-host", "old")]),
        list("NetworkPolicy", vec![]),
        list("Secret", vec![]),
        list("ConfigMap", vec![]),
        // delete("old"): its Pod is long gone.
        list("Pod", vec![]),
        list("NetworkPolicy", vec![]),
        list("Service", vec![labelled("Service", "v1", "old-host", "old")]),
        Reply::Json(200, labelled("Service", "v1", "old-host", "old")),
        list("EndpointSlice", vec![]),
        list("Endpoints", vec![]),
        list("Secret", vec![]),
        list("ConfigMap", vec![]),
        // delete("web"): it failed.
        list("Pod", vec![pod(json!({"phase": "Failed"}))]),
        Reply::Json(200, pod(json!({"phase": "Failed"}))),
        list("NetworkPolicy", vec![]),
        list("Service", vec![]),
        list("EndpointSlice", vec![]),
        list("Endpoints", vec![]),
        list("Secret", vec![]),
        list("ConfigMap", vec![]),
    ];
    let (result, seen) = fake_apiserver(replies, |cluster| async move { cluster.reap().await }).await;
    check(
        &result,
        &seen,
        expect![[r#"
            GET /api/v1/namespaces/default/pods?&labelSelector=app.kubernetes.io%2Fmanaged-by%3Dkiln
            GET /api/v1/namespaces/default/services?&labelSelector=app.kubernetes.io%2Fmanaged-by%3Dkiln
            GET /apis/networking.k8s.io/v1/namespaces/default/networkpolicies?&labelSelector=app.kubernetes.io%2Fmanaged-by%3Dkiln
            GET /api/v1/namespaces/default/secrets?&labelSelector=app.kubernetes.io%2Fmanaged-by%3Dkiln
            GET /api/v1/namespaces/default/configmaps?&labelSelector=app.kubernetes.io%2Fmanaged-by%3Dkiln
            GET /api/v1/namespaces/default/pods?&labelSelector=app.kubernetes.io%2Fmanaged-by%3Dkiln%2Ckiln.dev%2Finstance%3Dold
            GET /apis/networking.k8s.io/v1/namespaces/default/networkpolicies?&labelSelector=app.kubernetes.io%2Fmanaged-by%3Dkiln%2Ckiln.dev%2Finstance%3Dold
            GET /api/v1/namespaces/default/services?&labelSelector=app.kubernetes.io%2Fmanaged-by%3Dkiln%2Ckiln.dev%2Finstance%3Dold
            DELETE /api/v1/namespaces/default/services/old-host? [application/json] {"preconditions":{"uid":"uid-service-old-host"}}
            GET /apis/discovery.k8s.io/v1/namespaces/default/endpointslices?&labelSelector=app.kubernetes.io%2Fmanaged-by%3Dkiln%2Ckiln.dev%2Finstance%3Dold
            GET /api/v1/namespaces/default/endpoints?&labelSelector=app.kubernetes.io%2Fmanaged-by%3Dkiln%2Ckiln.dev%2Finstance%3Dold
            GET /api/v1/namespaces/default/secrets?&labelSelector=app.kubernetes.io%2Fmanaged-by%3Dkiln%2Ckiln.dev%2Finstance%3Dold
            GET /api/v1/namespaces/default/configmaps?&labelSelector=app.kubernetes.io%2Fmanaged-by%3Dkiln%2Ckiln.dev%2Finstance%3Dold
            GET /api/v1/namespaces/default/pods?&labelSelector=app.kubernetes.io%2Fmanaged-by%3Dkiln%2Ckiln.dev%2Finstance%3Dweb
            DELETE /api/v1/namespaces/default/pods/web? [application/json] {"preconditions":{"uid":"uid-pod-web"}}
            GET /apis/networking.k8s.io/v1/namespaces/default/networkpolicies?&labelSelector=app.kubernetes.io%2Fmanaged-by%3Dkiln%2Ckiln.dev%2Finstance%3Dweb
            GET /api/v1/namespaces/default/services?&labelSelector=app.kubernetes.io%2Fmanaged-by%3Dkiln%2Ckiln.dev%2Finstance%3Dweb
            GET /apis/discovery.k8s.io/v1/namespaces/default/endpointslices?&labelSelector=app.kubernetes.io%2Fmanaged-by%3Dkiln%2Ckiln.dev%2Finstance%3Dweb
            GET /api/v1/namespaces/default/endpoints?&labelSelector=app.kubernetes.io%2Fmanaged-by%3Dkiln%2Ckiln.dev%2Finstance%3Dweb
            GET /api/v1/namespaces/default/secrets?&labelSelector=app.kubernetes.io%2Fmanaged-by%3Dkiln%2Ckiln.dev%2Finstance%3Dweb
            GET /api/v1/namespaces/default/configmaps?&labelSelector=app.kubernetes.io%2Fmanaged-by%3Dkiln%2Ckiln.dev%2Finstance%3Dweb
            => Ok(["old", "web"])"#]],
    );
}

#[tokio::test]
async fn unreachable_cluster_is_a_clear_error() {
    // A real connection attempt (no fake) to a port that was just free.
    let port = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("address").port();
    let config = kiln_k8s::kube::Config::new(format!("http://127.0.0.1:{port}").parse().expect("URL"));
    let client = Client::try_from(config).expect("client");
    let err = Cluster::from_client(client).status("web").await.expect_err("nothing listens there");
    expect![[r#"
        cannot reach the Kubernetes API server to get Pod web
           caused by: ServiceError: client error (Connect)
           caused by: client error (Connect)
           caused by: tcp connect error
           caused by: Connection refused (os error 111)"#]]
    .assert_eq(&chain(&err));
}

#[tokio::test]
async fn kubeconfig_contexts_and_a_clear_error_for_an_unknown_one() {
    // Only the file is read; no request is sent.
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("config");
    std::fs::write(
        &path,
        "apiVersion: v1\nkind: Config\ncurrent-context: dev\n\
         clusters:\n- name: c\n  cluster: {server: 'https://127.0.0.1:6443'}\n\
         users:\n- name: u\n  user: {token: not-a-secret}\n\
         contexts:\n- name: dev\n  context: {cluster: c, user: u}\n\
         - name: prod\n  context: {cluster: c, user: u, namespace: services}\n",
    )
    .expect("write kubeconfig");
    let dev = Cluster::connect_with_kubeconfig(&path, None).await.expect("current context");
    let prod = Cluster::connect_with_kubeconfig(&path, Some("prod")).await.expect("named context");
    let missing = Cluster::connect_with_kubeconfig(&path, Some("staging")).await.expect_err("no such context");
    expect![[r#"
        default services
        cannot load the Kubernetes configuration for context `staging`
           caused by: failed to load current context: staging"#]]
    .assert_eq(&format!("{} {}\n{}", dev.namespace(), prod.namespace(), chain(&missing)));
}
