//! Whose an object is, by its labels: the pure check behind `apply`
//! (refuse to write over what is not this instance's) and behind `delete`,
//! `list` and `reap` (touch only what is kiln's, even if the server ignored
//! a label selector).

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use crate::manifest::{INSTANCE_LABEL, MANAGED_BY_LABEL, MANAGER};

/// What kiln found under the name of an object it is about to apply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Owner {
    /// Nothing: the name is free.
    Absent,
    /// An object labelled as kiln's for this very instance.
    ThisInstance,
    /// Anything else; the text says what it is instead, for the error.
    Foreign(String),
}

/// Whether `meta` carries `managed-by=kiln`.
pub(crate) fn is_kilns(meta: &ObjectMeta) -> bool {
    label(meta, MANAGED_BY_LABEL) == Some(MANAGER)
}

/// Whether `meta` carries `managed-by=kiln` and `kiln.dev/instance=instance`.
pub(crate) fn is_instance(meta: &ObjectMeta, instance: &str) -> bool {
    is_kilns(meta) && label(meta, INSTANCE_LABEL) == Some(instance)
}

/// Who owns `existing` (`None`: there is no such object), as seen by `instance`.
pub(crate) fn owner(instance: &str, existing: Option<&ObjectMeta>) -> Owner {
    let Some(meta) = existing else { return Owner::Absent };
    if is_instance(meta, instance) {
        return Owner::ThisInstance;
    }
    if let (true, Some(other)) = (is_kilns(meta), label(meta, INSTANCE_LABEL)) {
        return Owner::Foreign(format!("labelled for kiln instance `{other}`"));
    }
    let labels: Vec<String> = meta.labels.iter().flatten().map(|(key, value)| format!("{key}={value}")).collect();
    Owner::Foreign(if labels.is_empty() { "no labels".to_owned() } else { format!("labels: {}", labels.join(", ")) })
}

fn label<'a>(meta: &'a ObjectMeta, key: &str) -> Option<&'a str> {
    meta.labels.as_ref()?.get(key).map(String::as_str)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(labels: &[(&str, &str)], expect: Owner) {
        let meta = ObjectMeta {
            labels: (!labels.is_empty())
                .then(|| labels.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()),
            ..ObjectMeta::default()
        };
        assert_eq!(owner("web", Some(&meta)), expect, "labels {labels:?}");
    }

    #[test]
    fn only_kilns_labels_for_this_instance_make_an_object_ours() {
        assert_eq!(owner("web", None), Owner::Absent);
        check(&[(MANAGED_BY_LABEL, MANAGER), (INSTANCE_LABEL, "web"), ("team", "a")], Owner::ThisInstance);
        check(&[], Owner::Foreign("no labels".into()));
        check(&[("app", "legacy")], Owner::Foreign("labels: app=legacy".into()));
        check(
            &[(MANAGED_BY_LABEL, MANAGER), (INSTANCE_LABEL, "api")],
            Owner::Foreign("labelled for kiln instance `api`".into()),
        );
        // Either label alone is not enough.
        check(&[(INSTANCE_LABEL, "web")], Owner::Foreign("labels: kiln.dev/instance=web".into()));
        check(&[(MANAGED_BY_LABEL, MANAGER)], Owner::Foreign("labels: app.kubernetes.io/managed-by=kiln".into()));
        check(
            &[(MANAGED_BY_LABEL, "helm"), (INSTANCE_LABEL, "web")],
            Owner::Foreign("labels: app.kubernetes.io/managed-by=helm, kiln.dev/instance=web".into()),
        );
    }
}
