//! `add-key`, `remove-key` (a KeypairRebuild with `removeFingerprints`) and `list-keys` (a
//! KeypairRebuild with mode Inspect, whose target reports the guest's keys in status).
use crate::cli::{AddKey, Global, ListKeys, Mode, Output, RemoveKey, Targets};
use crate::follow::{self, Outcome, conclude};
use crate::password::CREATED_BY;
use crate::targets;
use crate::util::{Call, REBUILDS, connect, exit, fail, object_name};
use guestcred_api::keypair::{GuestKeys, KeyMode, KeyStrategy, display_comment, is_fingerprint};
use guestcred_api::{KeypairRebuild, KeypairRebuildSpec, RunSpec, TargetState, TargetStatus};
use kube::api::{DeleteParams, PostParams};
use kube::{Api, Client};
use std::collections::BTreeMap;
use std::io::Read;
use std::time::{Duration, Instant};

/// The keys of an authorized_keys-format text, parsed as the controller and the shim parse
/// them (`guestcred_api::authorized_keys`: options before the key as sshd reads them,
/// blank lines and comments skipped); each (line, fingerprint). An error names the line,
/// never its content.
pub fn parse_keys(text: &str, source: &str) -> anyhow::Result<Vec<(String, String)>> {
    let entries = guestcred_api::authorized_keys::parse(text)
        .map_err(|e| fail(exit::USAGE, format!("{source}, {e}")))?;
    Ok(entries
        .into_iter()
        .map(|e| (e.line, e.fingerprint))
        .collect())
}

pub async fn add_key(g: &Global, a: AddKey) -> anyhow::Result<()> {
    let (text, source) = if a.file.as_os_str() == "-" {
        let mut s = String::new();
        std::io::stdin().read_to_string(&mut s)?;
        (s, "standard input".to_string())
    } else {
        let s = std::fs::read_to_string(&a.file)
            .map_err(|e| fail(exit::USAGE, format!("{}: {e}", a.file.display())))?;
        (s, a.file.display().to_string())
    };
    let keys = parse_keys(&text, &source)?;
    let ttl_seconds = match a.ttl {
        None => None,
        Some(d) if (10..=31_536_000).contains(&d.as_secs()) => Some(d.as_secs() as u32),
        Some(_) => return Err(fail(exit::USAGE, "--ttl must be 10s to 365d")),
    };
    let own = serde_json::json!({
        "publicKeys": {"inline": keys.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>()},
        "mode": match a.mode {
            Mode::Auto => KeyMode::Auto,
            Mode::Live => KeyMode::Live,
        },
        "strategy": if a.replace { KeyStrategy::Replace } else { KeyStrategy::Append },
        "ttlSeconds": ttl_seconds,
    });
    let Some((api, ns, name)) = create_run(g, &a.targets, &a.user, "key", own).await? else {
        return Ok(());
    };
    for (_, fp) in &keys {
        println!("  key {fp}");
    }
    if !a.follow.enabled() {
        return Ok(());
    }
    let outcome = follow::follow(&api, &ns, &name, a.follow.timeout).await?;
    if let Outcome::Finished(run) = &outcome {
        for t in run.targets.iter().filter(|t| t.verified == Some(true)) {
            let expiry = t
                .expires_at
                .as_ref()
                .map_or(String::new(), |e| format!(", removed again at {}", e.0));
            println!(
                "{}: {} key(s) verified in the guest ({}){expiry}",
                t.vm,
                t.keys.len(),
                t.mode.as_deref().unwrap_or("-")
            );
        }
    }
    conclude::<KeypairRebuild>(&name, outcome)
}

/// What add-key and remove-key share: the spec from the target, user and rollout flags and
/// the command's `own` fields; with `--dry-run` the VMs are printed and nothing is created
/// (`None`); else KeypairRebuild `<vm>-<kind>-<random>` is created and announced.
async fn create_run(
    g: &Global,
    t: &Targets,
    user: &str,
    kind: &str,
    own: serde_json::Value,
) -> anyhow::Result<Option<(Api<KeypairRebuild>, String, String)>> {
    let common = run_spec(t, user)?;
    let (client, ns) = connect(g).await?;
    if t.dry_run {
        targets::dry_run(&client, &ns, t).await?;
        return Ok(None);
    }
    let name = targets::name(t, kind);
    let spec = spec_json(common, own)?;
    let api = create(&client, &ns, &name, spec).await?;
    println!("keypairrebuild.guestcred.io/{name} created");
    Ok(Some((api, ns, name)))
}

/// The target, user and rollout part of the spec (shared with set-password).
fn run_spec(t: &Targets, user: &str) -> anyhow::Result<RunSpec> {
    Ok(RunSpec {
        target: targets::target_spec(t)?,
        user: Some(user.to_string()),
        rollout: t.rollout.spec(false)?,
    })
}

/// The spec as JSON: `common` and this command's own fields. JSON rather than a struct
/// literal: fields the API gains later take their defaults here, as they would in
/// `kubectl apply` of the same YAML.
fn spec_json(common: RunSpec, own: serde_json::Value) -> anyhow::Result<serde_json::Value> {
    let mut spec = serde_json::to_value(common)?;
    if let (Some(spec), serde_json::Value::Object(own)) = (spec.as_object_mut(), own) {
        spec.extend(own);
    }
    Ok(spec)
}

/// Create KeypairRebuild `name` with `spec` (JSON, so fields the API gains later take
/// their defaults, as in `kubectl apply` of the same YAML), labelled as the plugin's.
async fn create(
    client: &Client,
    ns: &str,
    name: &str,
    spec: serde_json::Value,
) -> anyhow::Result<Api<KeypairRebuild>> {
    let spec: KeypairRebuildSpec = serde_json::from_value(spec)?;
    let mut obj = KeypairRebuild::new(name, spec);
    obj.metadata.namespace = Some(ns.to_string());
    obj.metadata.labels = Some(BTreeMap::from([(
        CREATED_BY.0.to_string(),
        CREATED_BY.1.to_string(),
    )]));
    let api: Api<KeypairRebuild> = Api::namespaced(client.clone(), ns);
    api.create(&PostParams::default(), &obj)
        .await
        .map_err(|e| {
            Call {
                verb: "create",
                resource: REBUILDS,
                namespace: ns,
            }
            .error(e)
        })?;
    Ok(api)
}

pub async fn remove_key(g: &Global, a: RemoveKey) -> anyhow::Result<()> {
    for fp in &a.fingerprint {
        if !is_fingerprint(fp) {
            return Err(fail(
                exit::USAGE,
                format!(
                    "--fingerprint {fp:?} is not a SHA256 fingerprint: use the SHA256:<43 characters> form that list-keys and ssh-keygen -lf KEYFILE print"
                ),
            ));
        }
    }
    let mut fps = a.fingerprint.clone();
    fps.sort();
    fps.dedup();
    if fps.len() > guestcred_api::keypair::MAX_REMOVE_FINGERPRINTS {
        return Err(fail(
            exit::USAGE,
            format!(
                "at most {} fingerprints per command",
                guestcred_api::keypair::MAX_REMOVE_FINGERPRINTS
            ),
        ));
    }
    let own = serde_json::json!({
        "mode": KeyMode::Live,
        "removeFingerprints": fps,
    });
    let Some((api, ns, name)) = create_run(g, &a.targets, &a.user, "rmkey", own).await? else {
        return Ok(());
    };
    if !a.follow.enabled() {
        return Ok(());
    }
    let outcome = follow::follow(&api, &ns, &name, a.follow.timeout).await?;
    if let Outcome::Finished(run) = &outcome {
        for t in run
            .targets
            .iter()
            .filter(|t| t.state == TargetState::Succeeded)
        {
            println!("{}: {}", t.vm, t.message.as_deref().unwrap_or("removed"));
        }
    }
    conclude::<KeypairRebuild>(&name, outcome)
}

pub async fn list_keys(g: &Global, a: ListKeys) -> anyhow::Result<()> {
    let (client, ns) = connect(g).await?;
    let name = object_name(&a.vm, "keys");
    let spec = serde_json::json!({
        "target": {"vmName": a.vm},
        "user": a.user,
        "mode": KeyMode::Inspect,
    });
    let api = create(&client, &ns, &name, spec).await?;
    let result = wait_for_report(&api, &ns, &name, a.timeout).await;
    // A read-only question leaves nothing behind, unless it is still going on.
    if !matches!(&result, Err(e) if e.downcast_ref::<crate::util::Exit>().is_some_and(|x| x.code == exit::TIMEOUT))
        && let Err(e) = api.delete(&name, &DeleteParams::default()).await
    {
        eprintln!(
            "warning: could not delete kpr/{name}: {}",
            Call {
                verb: "delete",
                resource: REBUILDS,
                namespace: &ns,
            }
            .error(e)
        );
    }
    let (target, report) = result?;
    print_report(&target, &report, a.output)
}

/// Wait until the Inspect object's target has its report (or failed, or stalled).
async fn wait_for_report(
    api: &Api<KeypairRebuild>,
    ns: &str,
    name: &str,
    timeout: Duration,
) -> anyhow::Result<(TargetStatus, GuestKeys)> {
    let call = Call {
        verb: "get",
        resource: REBUILDS,
        namespace: ns,
    };
    let start = Instant::now();
    loop {
        let obj = api.get(name).await.map_err(|e| call.error(e))?;
        let generation = obj.metadata.generation;
        if let Some(run) = obj.status.as_ref().map(|s| &s.run)
            && run.observed_generation == generation
        {
            if let Some(t) = run.targets.first() {
                match (t.state, &t.guest_keys) {
                    (TargetState::Succeeded, Some(keys)) => return Ok((t.clone(), keys.clone())),
                    (TargetState::Failed | TargetState::Skipped, _) => {
                        return Err(fail(
                            exit::FAILED,
                            format!(
                                "kpr/{name}: cannot read the keys of {}: {} {}",
                                t.vm,
                                t.reason.as_deref().unwrap_or("Failed"),
                                t.message.as_deref().unwrap_or("")
                            ),
                        ));
                    }
                    _ => {}
                }
            }
            if let Some(c) = run.conditions.iter().find(|c| {
                c.type_ == guestcred_api::conditions::STALLED
                    && c.status == "True"
                    && c.observed_generation == generation
            }) {
                return Err(fail(
                    exit::FAILED,
                    format!("kpr/{name} is stalled: {}: {}", c.reason, c.message),
                ));
            }
        }
        if start.elapsed() > timeout {
            return Err(fail(
                exit::TIMEOUT,
                format!(
                    "timed out waiting for the key report of kpr/{name}; it goes on (see `kubectl guestcred status {name}`, then delete it)"
                ),
            ));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The report as a table (stdout; notes on stderr), or as JSON / YAML.
fn print_report(t: &TargetStatus, r: &GuestKeys, output: Output) -> anyhow::Result<()> {
    let user = t.user.as_deref().unwrap_or("-");
    match output {
        Output::Json | Output::Yaml => {
            let mut value = serde_json::to_value(r)?;
            value["vm"] = t.vm.clone().into();
            value["user"] = user.into();
            if output == Output::Json {
                println!("{}", serde_json::to_string_pretty(&value)?);
            } else {
                print!("{}", serde_yaml::to_string(&value)?);
            }
        }
        Output::Table => {
            if r.keys.is_empty() {
                eprintln!("No keys found for user {user} in {}.", t.vm);
            } else {
                let mut rows = vec![vec![
                    "FINGERPRINT".to_string(),
                    "TYPE".into(),
                    "COMMENT".into(),
                    "MANAGED".into(),
                    "EXPIRES".into(),
                ]];
                for k in &r.keys {
                    rows.push(vec![
                        k.fingerprint.clone(),
                        display_comment(&k.key_type),
                        k.comment
                            .as_deref()
                            .map_or_else(|| "-".into(), display_comment),
                        if k.managed { "yes" } else { "no" }.into(),
                        k.expires_at
                            .as_ref()
                            .map_or_else(|| "-".into(), |e| e.0.to_string()),
                    ]);
                }
                print!("{}", crate::status::table(&rows));
            }
            if r.not_shown > 0 {
                eprintln!(
                    "{} more key(s) not shown ({} in all; the report lists at most {}).",
                    r.not_shown,
                    r.total,
                    guestcred_api::keypair::MAX_GUEST_KEYS
                );
            }
            if r.unreadable_lines > 0 {
                eprintln!(
                    "{} line(s) of the file are not keys (sshd ignores them too).",
                    r.unreadable_lines
                );
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_checked_by_line() {
        let ok = "# mine\n\nssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHhBi1jBX9Ym7ChMW8hNbdC0Y9eVU1uYpcBrIhWGr2Mh me@x\n";
        let keys = parse_keys(ok, "f").unwrap();
        assert_eq!(keys.len(), 1);
        assert!(keys[0].1.starts_with("SHA256:"), "{}", keys[0].1);
        let err = parse_keys("ssh-ed25519 AAAA\n", "f")
            .unwrap_err()
            .to_string();
        assert!(err.contains("f, line 1"), "{err}");
        assert!(parse_keys("# only a comment\n", "f").is_err());
    }

    #[test]
    fn keys_with_options_are_taken_as_sshd_reads_them() {
        let line = "from=\"10.0.0.0/8\",no-agent-forwarding ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHhBi1jBX9Ym7ChMW8hNbdC0Y9eVU1uYpcBrIhWGr2Mh me@x";
        let keys = parse_keys(line, "f").expect("options accepted");
        assert_eq!(keys[0].0, line, "options kept in the line");
    }
}
