//! `pod_state`: what a Pod's status means, from Pods as the API server
//! returns them.

use expect_test::{Expect, expect};
use k8s_openapi::api::core::v1::Pod;
use kiln_k8s::pod_state;
use serde_json::json;

fn check(status: serde_json::Value, expect: Expect) {
    let pod: Pod = serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "web"},
        "spec": {"containers": [{"name": "service", "image": "x"}], "nodeName": "node-1"},
        "status": status,
    }))
    .expect("a Pod");
    let state = pod_state(&pod);
    let fatal = state.reason.as_ref().is_some_and(|r| r.is_fatal());
    expect.assert_eq(&format!(
        "{state} | ip {} | fatal {fatal}",
        state.pod_ip.map(|ip| ip.to_string()).unwrap_or_else(|| "-".to_owned())
    ));
}

#[test]
fn phases_and_reasons() {
    check(json!({}), expect!["Unknown | ip - | fatal false"]);
    check(json!({"phase": "Pending"}), expect!["Pending | ip - | fatal false"]);
    check(
        json!({"phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
            "message": "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."}]}),
        expect![
            "Pending (Unschedulable): 0/3 nodes are available: 3 Insufficient nvidia.com/gpu. | ip - | fatal false"
        ],
    );
    check(
        json!({"phase": "Pending", "podIP": "10.1.2.3", "containerStatuses": [{"name": "service", "image": "x", "imageID": "",
            "ready": false, "restartCount": 0,
            "state": {"waiting": {"reason": "ImagePullBackOff", "message": "Back-off pulling image \"x\""}}}]}),
        expect![[r#"Pending (ImagePullBackOff): Back-off pulling image "x" | ip 10.1.2.3 | fatal true"#]],
    );
    check(
        json!({"phase": "Pending", "containerStatuses": [{"name": "service", "image": "x", "imageID": "", "ready": false,
            "restartCount": 0, "state": {"waiting": {"reason": "ErrImagePull"}}}]}),
        expect!["Pending (ErrImagePull) | ip - | fatal true"],
    );
    check(
        json!({"phase": "Pending", "containerStatuses": [{"name": "service", "image": "x", "imageID": "", "ready": false,
            "restartCount": 0, "state": {"waiting": {"reason": "ContainerCreating"}}}]}),
        expect!["Pending | ip - | fatal false"],
    );
    check(
        json!({"phase": "Pending", "containerStatuses": [{"name": "service", "image": "x", "imageID": "", "ready": false,
            "restartCount": 0, "state": {"waiting": {"reason": "CreateContainerConfigError",
            "message": "container has runAsNonRoot and image will run as root"}}}]}),
        expect![
            "Pending (CreateContainerConfigError): container has runAsNonRoot and image will run as root | ip - | fatal true"
        ],
    );
    check(
        json!({"phase": "Running", "podIP": "10.1.2.3", "containerStatuses": [{"name": "service", "image": "x", "imageID": "",
            "ready": true, "restartCount": 0, "state": {"running": {"startedAt": "2026-01-01T00:00:00Z"}}}]}),
        expect!["Running | ip 10.1.2.3 | fatal false"],
    );
    check(
        json!({"phase": "Running", "podIP": "10.1.2.3", "containerStatuses": [{"name": "service", "image": "x", "imageID": "",
            "ready": false, "restartCount": 4, "state": {"waiting": {"reason": "CrashLoopBackOff"}},
            "lastState": {"terminated": {"exitCode": 2, "reason": "Error"}}}]}),
        expect!["Running (CrashLoopBackOff), exit code 2 | ip 10.1.2.3 | fatal false"],
    );
    check(
        json!({"phase": "Running", "podIP": "10.1.2.3", "containerStatuses": [{"name": "service", "image": "x", "imageID": "",
            "ready": false, "restartCount": 4, "state": {"waiting": {"reason": "CrashLoopBackOff"}},
            "lastState": {"terminated": {"exitCode": 137, "reason": "OOMKilled"}}}]}),
        expect!["Running (OOMKilled), exit code 137 | ip 10.1.2.3 | fatal true"],
    );
    check(
        json!({"phase": "Failed", "podIP": "10.1.2.3", "containerStatuses": [{"name": "service", "image": "x", "imageID": "",
            "ready": false, "restartCount": 0, "state": {"terminated": {"exitCode": 137, "reason": "OOMKilled"}}}]}),
        expect!["Failed (OOMKilled), exit code 137 | ip 10.1.2.3 | fatal true"],
    );
    check(
        json!({"phase": "Succeeded", "containerStatuses": [{"name": "service", "image": "x", "imageID": "",
            "ready": false, "restartCount": 0, "state": {"terminated": {"exitCode": 0, "reason": "Completed"}}}]}),
        expect!["Succeeded, exit code 0 | ip - | fatal false"],
    );
    check(
        json!({"phase": "Failed", "reason": "Evicted", "message": "The node was low on resource: memory."}),
        expect!["Failed (Evicted): The node was low on resource: memory. | ip - | fatal false"],
    );
    check(json!({"phase": "Running", "podIP": "fd00::7"}), expect!["Running | ip fd00::7 | fatal false"]);
}
