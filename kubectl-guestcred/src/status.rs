//! `status`: one line per targeted VM of resets and key rebuilds.
use crate::cli::{Global, Output, Status};
use crate::follow::RunObject;
use crate::util::{Call, REBUILDS, RESETS, connect, exit, fail};
use guestcred_api::{GuestPasswordReset, KeypairRebuild, RunStatus, shards};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::ListParams;
use kube::{Api, Client, ResourceExt};

/// Columns padded like kubectl's tables (three spaces between columns).
pub fn table(rows: &[Vec<String>]) -> String {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..cols)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for r in rows {
        let mut line = String::new();
        for (c, cell) in r.iter().enumerate() {
            if c + 1 == r.len() {
                line.push_str(cell);
            } else {
                line.push_str(&format!("{cell:<w$}   ", w = widths[c]));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        format!("{}...", s.chars().take(n - 3).collect::<String>())
    }
}

/// Rows of one object: one per target, or one summary row while it has none.
fn rows(name: &str, run: Option<&RunStatus>, keys: bool) -> Vec<Vec<String>> {
    let dash = || "-".to_string();
    let Some(run) = run.filter(|r| !r.targets.is_empty()) else {
        let stalled = run.and_then(|r| {
            r.conditions
                .iter()
                .find(|c| c.type_ == guestcred_api::conditions::STALLED && c.status == "True")
        });
        let phase = run
            .and_then(|r| r.phase)
            .map_or("Pending".to_string(), |p| format!("{p:?}"));
        let mut row = vec![
            name.to_string(),
            dash(),
            dash(),
            phase,
            stalled.map_or_else(dash, |c| c.reason.clone()),
            "0".into(),
        ];
        if keys {
            row.extend([dash(), dash(), dash()]);
        }
        row.push(stalled.map_or_else(String::new, |c| truncate(&c.message, 60)));
        return vec![row];
    };
    run.targets
        .iter()
        .map(|t| {
            let mut row = vec![
                name.to_string(),
                t.vm.clone(),
                t.node.clone().unwrap_or_else(dash),
                format!("{:?}", t.state),
                t.reason.clone().unwrap_or_else(dash),
                t.attempts.to_string(),
            ];
            if keys {
                row.push(t.mode.clone().unwrap_or_else(dash));
                row.push(if t.keys.is_empty() {
                    dash()
                } else {
                    t.keys.join(",")
                });
                row.push(t.expires_at.as_ref().map_or_else(dash, |e| e.0.to_string()));
            }
            row.push(truncate(t.message.as_deref().unwrap_or(""), 60));
            row
        })
        .collect()
}

/// One kind's table: the header (`kind`'s column first; with `keys`, as for rebuilds, MODE,
/// KEYS and EXPIRES too) and the [`rows`] of each object.
async fn section<K: RunObject>(
    client: &Client,
    ns: &str,
    kind: &str,
    objects: &[K],
    keys: bool,
) -> String {
    let mut header = vec![kind, "VM", "NODE", "STATE", "REASON", "ATTEMPTS"];
    if keys {
        header.extend(["MODE", "KEYS", "EXPIRES"]);
    }
    header.push("MESSAGE");
    let mut t = vec![header.into_iter().map(String::from).collect()];
    for r in objects {
        let run = expanded(client, ns, r.run()).await;
        t.extend(rows(&r.name_any(), run.as_ref(), keys));
    }
    table(&t)
}

/// A large run's status with every target's record, read from the ConfigMaps its status
/// names (`api::shards`); a small run's as it is. Without permission to read them the
/// listed targets are shown, and a line says so.
async fn expanded(client: &Client, ns: &str, run: Option<&RunStatus>) -> Option<RunStatus> {
    let run = run?;
    if !run.is_sharded() {
        return Some(run.clone());
    }
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
    let mut parts = Vec::with_capacity(run.shards.len());
    for shard in &run.shards {
        let read = api.get(&shard.name).await.map_err(|e| {
            Call {
                verb: "get",
                resource: "configmaps",
                namespace: ns,
            }
            .error(e)
            .to_string()
        });
        let decoded = read.and_then(|cm| {
            let bytes = cm
                .binary_data
                .as_ref()
                .and_then(|d| d.get(shards::SHARD_KEY))
                .map(|b| b.0.clone())
                .unwrap_or_default();
            shards::decode(&bytes, shard).map_err(|e| e.to_string())
        });
        match decoded {
            Ok(p) => parts.push(p),
            Err(e) => {
                eprintln!("showing the {} listed targets only: {e}", run.targets.len());
                return Some(run.clone());
            }
        }
    }
    Some(shards::expand(run, parts))
}

async fn objects<K: RunObject + serde::Serialize>(
    client: &Client,
    ns: &str,
    a: &Status,
) -> anyhow::Result<Vec<K>> {
    let api: Api<K> = Api::namespaced(client.clone(), ns);
    if let Some(name) = &a.name {
        return api
            .get_opt(name)
            .await
            .map(|o| o.into_iter().collect())
            .map_err(|e| {
                Call {
                    verb: "get",
                    resource: K::RESOURCE,
                    namespace: ns,
                }
                .error(e)
            });
    }
    let mut lp = ListParams::default();
    if let Some(sel) = &a.selector {
        lp = lp.labels(sel);
    }
    let mut items = api
        .list(&lp)
        .await
        .map_err(|e| {
            Call {
                verb: "list",
                resource: K::RESOURCE,
                namespace: ns,
            }
            .error(e)
        })?
        .items;
    items.sort_by_key(|o| o.name_any());
    Ok(items)
}

pub async fn status(g: &Global, a: Status) -> anyhow::Result<()> {
    let (client, ns) = connect(g).await?;
    let resets: Vec<GuestPasswordReset> = objects(&client, &ns, &a).await?;
    let rebuilds: Vec<KeypairRebuild> = objects(&client, &ns, &a).await?;
    if let Some(name) = &a.name
        && resets.is_empty()
        && rebuilds.is_empty()
    {
        return Err(fail(
            exit::FAILED,
            format!("no {RESETS} or {REBUILDS} named {name:?} in namespace {ns:?}"),
        ));
    }
    let mut items: Vec<serde_json::Value> = Vec::new();
    for r in &resets {
        items.push(serde_json::to_value(r)?);
    }
    for r in &rebuilds {
        items.push(serde_json::to_value(r)?);
    }
    let doc = if a.name.is_some() && items.len() == 1 {
        items.remove(0)
    } else {
        serde_json::json!({"apiVersion": "v1", "kind": "List", "items": items, "metadata": {}})
    };
    match a.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&doc)?),
        Output::Yaml => print!("{}", serde_yaml::to_string(&doc)?),
        Output::Table => {
            if resets.is_empty() && rebuilds.is_empty() {
                println!("No resources found in {ns} namespace.");
                return Ok(());
            }
            let mut out = Vec::new();
            if !resets.is_empty() {
                out.push(section(&client, &ns, "RESET", &resets, false).await);
            }
            if !rebuilds.is_empty() {
                out.push(section(&client, &ns, "REBUILD", &rebuilds, true).await);
            }
            print!("{}", out.join("\n"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_line_up() {
        let t = table(&[
            vec!["A".into(), "BB".into(), "C".into()],
            vec!["aaaa".into(), "b".into(), "".into()],
        ]);
        assert_eq!(t, "A      BB   C\naaaa   b\n");
    }
}
