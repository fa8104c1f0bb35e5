//! The resource-type registry: built-in kinds (one line each) and kinds served from CRDs.

use std::cmp::Ordering;

use serde_json::{Value, json};

use super::error::ApiError;

/// Storage key of a resource type: objects live under (group, plural), whatever the version.
pub(crate) type ResKey = (String, String);

/// One printer column (`additionalPrinterColumns` or a built-in default).
#[derive(Clone, Debug)]
pub(crate) struct Column {
    pub name: String,
    pub type_: String,
    pub format: String,
    pub description: String,
    pub priority: i64,
    pub json_path: String,
}

/// One served version of a resource type.
#[derive(Clone, Debug)]
pub(crate) struct VersionInfo {
    pub name: String,
    pub status: bool,
    pub columns: Vec<Column>,
    /// The CRD's openAPIV3Schema, if any (served in /openapi/v3, never enforced).
    pub schema: Option<Value>,
}

#[derive(Clone, Debug)]
pub(crate) struct ResourceType {
    pub group: String,
    pub kind: String,
    pub list_kind: String,
    pub plural: String,
    pub singular: String,
    pub namespaced: bool,
    pub short_names: Vec<String>,
    pub categories: Vec<String>,
    /// Served versions, highest priority first.
    pub versions: Vec<VersionInfo>,
    /// Only `create` is allowed (TokenReview-like virtual resources): never stored.
    pub create_only: bool,
    pub from_crd: bool,
}

impl ResourceType {
    pub fn key(&self) -> ResKey {
        (self.group.clone(), self.plural.clone())
    }

    pub fn version(&self, v: &str) -> Option<&VersionInfo> {
        self.versions.iter().find(|x| x.name == v)
    }

    pub fn has_status(&self, v: &str) -> bool {
        self.version(v).is_some_and(|x| x.status)
    }

    pub fn api_version(&self, v: &str) -> String {
        if self.group.is_empty() {
            v.to_string()
        } else {
            format!("{}/{}", self.group, v)
        }
    }

    /// `secrets` or `widgets.example.com`, as the real server names resources in messages.
    pub fn qualified(&self) -> String {
        if self.group.is_empty() {
            self.plural.clone()
        } else {
            format!("{}.{}", self.plural, self.group)
        }
    }

    pub fn verbs(&self) -> Vec<&'static str> {
        if self.create_only {
            vec!["create"]
        } else {
            vec![
                "create",
                "delete",
                "deletecollection",
                "get",
                "list",
                "patch",
                "update",
                "watch",
            ]
        }
    }
}

const NAMESPACED: bool = true;
const CLUSTER: bool = false;
const STATUS: bool = true;
const NO_STATUS: bool = false;

/// One built-in kind. `columns` are `Name=.json.path` pairs shown between Name and Age.
struct Builtin {
    group: &'static str,
    version: &'static str,
    kind: &'static str,
    plural: &'static str,
    namespaced: bool,
    status: bool,
    short_names: &'static [&'static str],
    categories: &'static [&'static str],
    columns: &'static [(&'static str, &'static str)],
}

#[rustfmt::skip]
const BUILTINS: &[Builtin] = &[
    Builtin { group: "", version: "v1", kind: "Namespace", plural: "namespaces", namespaced: CLUSTER, status: STATUS, short_names: &["ns"], categories: &[], columns: &[("Status", ".status.phase")] },
    Builtin { group: "", version: "v1", kind: "Secret", plural: "secrets", namespaced: NAMESPACED, status: NO_STATUS, short_names: &[], categories: &[], columns: &[("Type", ".type")] },
    Builtin { group: "", version: "v1", kind: "ConfigMap", plural: "configmaps", namespaced: NAMESPACED, status: NO_STATUS, short_names: &["cm"], categories: &[], columns: &[] },
    Builtin { group: "", version: "v1", kind: "Pod", plural: "pods", namespaced: NAMESPACED, status: STATUS, short_names: &["po"], categories: &["all"], columns: &[("Status", ".status.phase"), ("Node", ".spec.nodeName")] },
    Builtin { group: "", version: "v1", kind: "Node", plural: "nodes", namespaced: CLUSTER, status: STATUS, short_names: &["no"], categories: &[], columns: &[] },
    Builtin { group: "", version: "v1", kind: "Service", plural: "services", namespaced: NAMESPACED, status: NO_STATUS, short_names: &["svc"], categories: &["all"], columns: &[("Type", ".spec.type"), ("Cluster-IP", ".spec.clusterIP")] },
    Builtin { group: "", version: "v1", kind: "ServiceAccount", plural: "serviceaccounts", namespaced: NAMESPACED, status: NO_STATUS, short_names: &["sa"], categories: &[], columns: &[] },
    Builtin { group: "", version: "v1", kind: "Event", plural: "events", namespaced: NAMESPACED, status: NO_STATUS, short_names: &["ev"], categories: &[], columns: &[("Type", ".type"), ("Reason", ".reason"), ("Message", ".message")] },
    Builtin { group: "events.k8s.io", version: "v1", kind: "Event", plural: "events", namespaced: NAMESPACED, status: NO_STATUS, short_names: &["ev"], categories: &[], columns: &[("Type", ".type"), ("Reason", ".reason"), ("Note", ".note")] },
    Builtin { group: "coordination.k8s.io", version: "v1", kind: "Lease", plural: "leases", namespaced: NAMESPACED, status: NO_STATUS, short_names: &[], categories: &[], columns: &[("Holder", ".spec.holderIdentity")] },
    Builtin { group: "apiextensions.k8s.io", version: "v1", kind: "CustomResourceDefinition", plural: "customresourcedefinitions", namespaced: CLUSTER, status: STATUS, short_names: &["crd", "crds"], categories: &["api-extensions"], columns: &[] },
    Builtin { group: "apps", version: "v1", kind: "Deployment", plural: "deployments", namespaced: NAMESPACED, status: STATUS, short_names: &["deploy"], categories: &["all"], columns: &[("Ready", ".status.readyReplicas")] },
    Builtin { group: "apps", version: "v1", kind: "DaemonSet", plural: "daemonsets", namespaced: NAMESPACED, status: STATUS, short_names: &["ds"], categories: &["all"], columns: &[("Ready", ".status.numberReady")] },
    Builtin { group: "rbac.authorization.k8s.io", version: "v1", kind: "Role", plural: "roles", namespaced: NAMESPACED, status: NO_STATUS, short_names: &[], categories: &[], columns: &[] },
    Builtin { group: "rbac.authorization.k8s.io", version: "v1", kind: "RoleBinding", plural: "rolebindings", namespaced: NAMESPACED, status: NO_STATUS, short_names: &[], categories: &[], columns: &[("Role", ".roleRef.name")] },
    Builtin { group: "rbac.authorization.k8s.io", version: "v1", kind: "ClusterRole", plural: "clusterroles", namespaced: CLUSTER, status: NO_STATUS, short_names: &[], categories: &[], columns: &[] },
    Builtin { group: "rbac.authorization.k8s.io", version: "v1", kind: "ClusterRoleBinding", plural: "clusterrolebindings", namespaced: CLUSTER, status: NO_STATUS, short_names: &[], categories: &[], columns: &[("Role", ".roleRef.name")] },
    Builtin { group: "networking.k8s.io", version: "v1", kind: "NetworkPolicy", plural: "networkpolicies", namespaced: NAMESPACED, status: NO_STATUS, short_names: &["netpol"], categories: &[], columns: &[] },
    Builtin { group: "authentication.k8s.io", version: "v1", kind: "TokenReview", plural: "tokenreviews", namespaced: CLUSTER, status: NO_STATUS, short_names: &[], categories: &[], columns: &[] },
    Builtin { group: "authorization.k8s.io", version: "v1", kind: "SelfSubjectAccessReview", plural: "selfsubjectaccessreviews", namespaced: CLUSTER, status: NO_STATUS, short_names: &[], categories: &[], columns: &[] },
];

pub(crate) const CRD_GROUP: &str = "apiextensions.k8s.io";
pub(crate) const CRD_PLURAL: &str = "customresourcedefinitions";

fn col(name: &str, type_: &str, format: &str, json_path: &str, priority: i64) -> Column {
    Column {
        name: name.to_string(),
        type_: type_.to_string(),
        format: format.to_string(),
        description: String::new(),
        priority,
        json_path: json_path.to_string(),
    }
}

fn age_column() -> Column {
    col("Age", "date", "", ".metadata.creationTimestamp", 0)
}

pub(crate) fn builtin_types() -> Vec<ResourceType> {
    BUILTINS
        .iter()
        .map(|b| {
            let mut columns: Vec<Column> = b
                .columns
                .iter()
                .map(|(n, p)| col(n, "string", "", p, 0))
                .collect();
            columns.push(age_column());
            ResourceType {
                group: b.group.to_string(),
                kind: b.kind.to_string(),
                list_kind: format!("{}List", b.kind),
                plural: b.plural.to_string(),
                singular: b.kind.to_lowercase(),
                namespaced: b.namespaced,
                short_names: b.short_names.iter().map(|s| s.to_string()).collect(),
                categories: b.categories.iter().map(|s| s.to_string()).collect(),
                versions: vec![VersionInfo {
                    name: b.version.to_string(),
                    status: b.status,
                    columns,
                    schema: None,
                }],
                create_only: matches!(b.plural, "tokenreviews" | "selfsubjectaccessreviews"),
                from_crd: false,
            }
        })
        .collect()
}

/// The string at `key` of `v`, or `default`.
fn text(v: &Value, key: &str, default: &str) -> String {
    str_at(v, &[key]).unwrap_or(default).to_string()
}

fn str_at<'a>(v: &'a Value, path: &[&str]) -> Option<&'a str> {
    path.iter().try_fold(v, |v, k| v.get(k))?.as_str()
}

/// The strings of the array at `path` in `v` (empty when there is none).
pub(crate) fn strings_at(v: &Value, path: &[&str]) -> Vec<String> {
    path.iter()
        .try_fold(v, |v, k| v.get(k))
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// Reads a CRD object into a resource type, checking what the real server would reject.
pub(crate) fn crd_to_type(crd: &Value) -> Result<ResourceType, ApiError> {
    let name = str_at(crd, &["metadata", "name"]).unwrap_or_default();
    let invalid = |msg: &str| {
        ApiError::invalid(
            "customresourcedefinitions",
            CRD_GROUP,
            name,
            &format!("CustomResourceDefinition.apiextensions.k8s.io \"{name}\" is invalid: {msg}"),
        )
    };
    let group =
        str_at(crd, &["spec", "group"]).ok_or_else(|| invalid("spec.group: Required value"))?;
    let plural = str_at(crd, &["spec", "names", "plural"])
        .ok_or_else(|| invalid("spec.names.plural: Required value"))?;
    let kind = str_at(crd, &["spec", "names", "kind"])
        .ok_or_else(|| invalid("spec.names.kind: Required value"))?;
    if name != format!("{plural}.{group}") {
        return Err(invalid(&format!(
            "metadata.name: Invalid value: \"{name}\": must be spec.names.plural+\".\"+spec.group"
        )));
    }
    let namespaced = match str_at(crd, &["spec", "scope"]) {
        Some("Namespaced") => true,
        Some("Cluster") => false,
        _ => {
            return Err(invalid(
                "spec.scope: Unsupported value: must be Namespaced or Cluster",
            ));
        }
    };
    let raw_versions = crd
        .pointer("/spec/versions")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    if raw_versions.is_empty() {
        return Err(invalid(
            "spec.versions: Invalid value: must have exactly one version marked as storage version",
        ));
    }
    if raw_versions
        .iter()
        .filter(|v| v.get("storage").and_then(Value::as_bool) == Some(true))
        .count()
        != 1
    {
        return Err(invalid(
            "spec.versions: Invalid value: must have exactly one version marked as storage version",
        ));
    }
    let mut versions = Vec::new();
    for v in &raw_versions {
        if v.get("served").and_then(Value::as_bool) != Some(true) {
            continue;
        }
        let Some(vname) = v.get("name").and_then(Value::as_str) else {
            return Err(invalid("spec.versions.name: Required value"));
        };
        let columns = match v.get("additionalPrinterColumns").and_then(Value::as_array) {
            Some(cols) => cols
                .iter()
                .map(|c| Column {
                    name: text(c, "name", ""),
                    type_: text(c, "type", "string"),
                    format: text(c, "format", ""),
                    description: text(c, "description", ""),
                    priority: c.get("priority").and_then(Value::as_i64).unwrap_or(0),
                    json_path: text(c, "jsonPath", ""),
                })
                .collect(),
            None => vec![age_column()],
        };
        versions.push(VersionInfo {
            name: vname.to_string(),
            status: v.pointer("/subresources/status").is_some(),
            columns,
            schema: v.pointer("/schema/openAPIV3Schema").cloned(),
        });
    }
    versions.sort_by(|a, b| compare_versions(&a.name, &b.name));
    Ok(ResourceType {
        group: group.to_string(),
        kind: kind.to_string(),
        list_kind: str_at(crd, &["spec", "names", "listKind"])
            .map(str::to_string)
            .unwrap_or_else(|| format!("{kind}List")),
        plural: plural.to_string(),
        singular: str_at(crd, &["spec", "names", "singular"])
            .map(str::to_string)
            .unwrap_or_else(|| kind.to_lowercase()),
        namespaced,
        short_names: strings_at(crd, &["spec", "names", "shortNames"]),
        categories: strings_at(crd, &["spec", "names", "categories"]),
        versions,
        create_only: false,
        from_crd: true,
    })
}

/// The status the real apiextensions controller writes once names are accepted.
pub(crate) fn crd_status(crd: &Value, rt: &ResourceType, now: &str) -> Value {
    let old_conditions = crd
        .pointer("/status/conditions")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    // Keep lastTransitionTime when the condition was already True: it only moves on a flip.
    let since = |ty: &str| {
        old_conditions
            .iter()
            .find(|c| c.get("type").and_then(Value::as_str) == Some(ty))
            .filter(|c| c.get("status").and_then(Value::as_str) == Some("True"))
            .and_then(|c| c.get("lastTransitionTime").cloned())
            .unwrap_or_else(|| Value::String(now.to_string()))
    };
    let storage = crd
        .pointer("/spec/versions")
        .and_then(Value::as_array)
        .and_then(|vs| {
            vs.iter()
                .find(|v| v.get("storage").and_then(Value::as_bool) == Some(true))
        })
        .and_then(|v| v.get("name").cloned())
        .unwrap_or(Value::Null);
    let mut stored: Vec<Value> = crd
        .pointer("/status/storedVersions")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    if !stored.contains(&storage) {
        stored.push(storage);
    }
    let mut accepted = json!({
        "plural": rt.plural, "singular": rt.singular, "kind": rt.kind, "listKind": rt.list_kind,
    });
    if !rt.short_names.is_empty() {
        accepted["shortNames"] = json!(rt.short_names);
    }
    if !rt.categories.is_empty() {
        accepted["categories"] = json!(rt.categories);
    }
    json!({
        "acceptedNames": accepted,
        "conditions": [
            {"type": "NamesAccepted", "status": "True", "reason": "NoConflicts",
             "message": "no conflicts found", "lastTransitionTime": since("NamesAccepted")},
            {"type": "Established", "status": "True", "reason": "InitialNamesAccepted",
             "message": "the initial names have been accepted", "lastTransitionTime": since("Established")},
        ],
        "storedVersions": stored,
    })
}

/// Kubernetes version priority: GA > beta > alpha, higher numbers first, others last by name.
pub(crate) fn compare_versions(a: &str, b: &str) -> Ordering {
    fn parse(v: &str) -> Option<(u8, u64, u64)> {
        let rest = v.strip_prefix('v')?;
        let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
        let major: u64 = digits.parse().ok()?;
        let tail = &rest[digits.len()..];
        if tail.is_empty() {
            return Some((3, major, 0));
        }
        let (level, n) = if let Some(n) = tail.strip_prefix("beta") {
            (2, n)
        } else if let Some(n) = tail.strip_prefix("alpha") {
            (1, n)
        } else {
            return None;
        };
        Some((level, major, n.parse().ok()?))
    }
    match (parse(a), parse(b)) {
        (Some(x), Some(y)) => y.cmp(&x),
        (Some(_), None) => Ordering::Less,
        (None, Some(_)) => Ordering::Greater,
        (None, None) => a.cmp(b),
    }
}
